//! The redirect decision: which implementation a call to a patched function runs.
//!
//! The kernel's `klp_ftrace_handler` reads the top of the function's stack of patch
//! entries and, during a transition, the calling task's own state. The core keeps those
//! stacks; after every change it hands the host a [`RedirectView`] — everything the
//! decision needs, in one value — and the host's entry hook calls [`decide`]. The
//! decision is pure: no locks, no allocation, usable from any context.

use crate::host::{Addr, PatchState};

/// What an entry of a function stack stands for.
#[derive(Clone, Copy, PartialEq, Eq, Debug, Hash)]
pub enum Target {
    /// Run the original function body (a nop entry, or no entry at all).
    Original,
    /// Continue at this replacement function.
    Func(Addr),
}

/// The state of one redirect record, as the handler needs it.
#[derive(Clone, Copy, PartialEq, Eq, Debug, Hash)]
pub struct RedirectView {
    /// The top entry: the newest patch's implementation.
    pub top: Target,
    /// Whether the top entry belongs to the patch in transition.
    pub top_transition: bool,
    /// The entry directly below the top (the previous implementation), or `Original`.
    pub below: Target,
}

/// What happened in [`decide`] besides the choice, for hosts that report anomalies.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Anomaly {
    /// None.
    None,
    /// The top entry is in transition but the task's state is `Idle` (the kernel WARNs
    /// once and behaves as for `Patched`).
    IdleInTransition,
}

/// The handler's decision for a task in state `state` (§4.3 of the contract):
///
/// | top in transition | task state | runs |
/// |---|---|---|
/// | no | any | top |
/// | yes | patched | top |
/// | yes | unpatched | the entry below, or the original |
/// | yes | idle (must not happen) | top, with [`Anomaly::IdleInTransition`] |
pub fn decide(view: &RedirectView, state: PatchState) -> (Target, Anomaly) {
    if !view.top_transition {
        return (view.top, Anomaly::None);
    }
    match state {
        PatchState::Patched => (view.top, Anomaly::None),
        PatchState::Unpatched => (view.below, Anomaly::None),
        PatchState::Idle => (view.top, Anomaly::IdleInTransition),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const V: RedirectView = RedirectView {
        top: Target::Func(0x200),
        top_transition: true,
        below: Target::Func(0x100),
    };

    #[test]
    fn decision_table() {
        let steady = RedirectView {
            top_transition: false,
            ..V
        };
        for s in [PatchState::Idle, PatchState::Unpatched, PatchState::Patched] {
            assert_eq!(decide(&steady, s).0, Target::Func(0x200));
        }
        assert_eq!(decide(&V, PatchState::Patched).0, Target::Func(0x200));
        assert_eq!(decide(&V, PatchState::Unpatched).0, Target::Func(0x100));
        assert_eq!(
            decide(&V, PatchState::Idle),
            (Target::Func(0x200), Anomaly::IdleInTransition)
        );
        let first = RedirectView {
            below: Target::Original,
            ..V
        };
        assert_eq!(decide(&first, PatchState::Unpatched).0, Target::Original);
        let nop = RedirectView {
            top: Target::Original,
            ..V
        };
        assert_eq!(decide(&nop, PatchState::Patched).0, Target::Original);
    }
}
