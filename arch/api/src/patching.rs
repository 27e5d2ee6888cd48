//! Rewriting a live patch site: its states, and the plan of stores that takes it from
//! the bytes it holds to the bytes of another state while other threads run it.
//!
//! A host that patches code other threads are executing (the user-space host; the
//! kernel has `text_poke` for this) cannot replace a multi-byte instruction in one go
//! on most architectures. Each back-end knows which stores its instruction fetch sees
//! whole, which intermediate byte sequences are safe to execute, and what to do with a
//! thread caught in between; it writes that down as a [`Plan`], which is pure data
//! and tested on every host. The host executes the plan: it makes the text writable,
//! performs each [`Step`] with the back-end's store ([`crate::Live::store_text`]),
//! then brings every thread to see it ([`Sync`]), and meanwhile applies the plan's
//! [`Resume`] rule at each synchronisation and its [`TrapEntry`] when a thread hits
//! the plan's trap instruction.

use crate::{Arch, InsnBytes, Site};

/// What a registered site holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SiteState {
    /// The unpatched bytes (as found, or the back-end's equivalent form).
    Original,
    /// A branch (with link where the arch has one) to the site's stub, which enters
    /// the entry trampoline that decides per thread.
    Trampoline,
    /// A direct branch to the one live implementation at this address (the steady
    /// state; on ppc64le the local entry the host resolved).
    Jump(u64),
}

/// How the other threads are brought to see a step's store before the next one.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Sync {
    /// A synchronisation round: every thread is interrupted (a context-synchronising
    /// kernel entry and exit, and a full barrier) and the plan's [`Resume`] rule is
    /// applied to it while it is.
    Round,
    /// Instruction-fetch serialisation on every CPU suffices
    /// (`membarrier(MEMBARRIER_CMD_PRIVATE_EXPEDITED_SYNC_CORE)`): no thread can be
    /// inside the bytes written (the store replaced one whole instruction by another).
    Core,
}

/// One store of a plan.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Step {
    /// Offset of the first byte from the site's address.
    pub offset: u8,
    /// The bytes, stored with the back-end's store for their length.
    pub bytes: InsnBytes,
    /// What follows the store.
    pub sync: Sync,
}

/// A thread found with its pc in `[from, to_end)` at a synchronisation round of the
/// plan resumes at `to`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Resume {
    /// First pc the rule applies to.
    pub from: u64,
    /// First pc past the range.
    pub end: u64,
    /// Where such a thread resumes.
    pub to: u64,
}

impl Resume {
    /// Where a thread at `pc` resumes, if the rule moves it.
    pub const fn apply(&self, pc: u64) -> Option<u64> {
        if pc >= self.from && pc < self.end {
            Some(self.to)
        } else {
            None
        }
    }
}

/// A thread that traps on the instruction at `at` while the plan runs resumes as if
/// the site had branched: at `pc`, with the back-end's trap link register
/// ([`crate::UcontextLayout::trap_link`]) set to `link` if given, and with `push`
/// pushed on its stack if given (an emulated call's return address).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TrapEntry {
    /// The address of the trapping instruction.
    pub at: u64,
    /// Where the thread resumes.
    pub pc: u64,
    /// The value of the trap link register.
    pub link: Option<u64>,
    /// A word pushed on the thread's stack (x86_64: a return address).
    pub push: Option<u64>,
}

/// The most steps a plan has.
pub const MAX_STEPS: usize = 4;

/// The stores that take a site from one state to another, in order, and what to do
/// with threads meanwhile. An empty plan: the site holds the bytes already.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Plan {
    steps: [Option<Step>; MAX_STEPS],
    /// The rule applied at each synchronisation round while the plan runs.
    pub resume: Option<Resume>,
    /// What a thread that traps on the plan's trap instruction does.
    pub trap: Option<TrapEntry>,
}

impl Default for Plan {
    fn default() -> Self {
        Plan::new()
    }
}

impl Plan {
    /// No step, no rule.
    pub const fn new() -> Plan {
        Plan {
            steps: [None; MAX_STEPS],
            resume: None,
            trap: None,
        }
    }

    /// Appends a step; `None` (the plan unchanged) when it is full or `bytes` is
    /// empty.
    pub fn push(&mut self, offset: u8, bytes: &[u8], sync: Sync) -> Option<()> {
        let bytes = InsnBytes::from_slice(bytes).filter(|b| !b.is_empty())?;
        let slot = self.steps.iter_mut().find(|s| s.is_none())?;
        *slot = Some(Step {
            offset,
            bytes,
            sync,
        });
        Some(())
    }

    /// The steps, in order.
    pub fn steps(&self) -> impl Iterator<Item = &Step> {
        self.steps.iter().map_while(Option::as_ref)
    }

    /// Whether the plan stores nothing.
    pub fn is_empty(&self) -> bool {
        self.steps().next().is_none()
    }

    /// The bytes a site holding `now` holds after the plan (for tests: `None` when a
    /// step lies outside `now`).
    pub fn result<const N: usize>(&self, now: [u8; N]) -> Option<[u8; N]> {
        let mut out = now;
        for s in self.steps() {
            let at = usize::from(s.offset);
            let end = at.checked_add(s.bytes.len())?;
            out.get_mut(at..end)?.copy_from_slice(s.bytes.as_slice());
        }
        Some(out)
    }
}

/// Why a site cannot be taken to a state.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum PlanError {
    /// The state's branch does not reach its target (a jump, or the stub); nothing is
    /// written (`-ERANGE`).
    OutOfReach { to: u64 },
    /// The site holds bytes that are none of the states the back-end writes
    /// (`-EINVAL`).
    Unknown,
    /// The site is not one the back-end rewrites live (`-EINVAL`).
    NotLive,
}

impl PlanError {
    /// The errno of the error (positive).
    pub const fn errno(&self) -> i32 {
        match self {
            PlanError::OutOfReach { .. } => crate::errno::ERANGE,
            PlanError::Unknown | PlanError::NotLive => crate::errno::EINVAL,
        }
    }
}

/// What a plan needs to know besides the site: where things are.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PlanCtx {
    /// The site's address (`site.addr()`, repeated for convenience).
    pub addr: u64,
    /// The site's stub (which the trampoline state branches to).
    pub stub: u64,
    /// The entry trampoline (where a thread trapped by a plan may be sent).
    pub trampoline: u64,
}

/// The most bytes a site's stub has.
pub const MAX_STUB: usize = 32;

/// What the host knows about a replacement a site may jump to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TargetInfo {
    /// The replacement's address.
    pub addr: u64,
    /// Whether it lives in the same loaded object as the site.
    pub same_object: bool,
    /// The function symbol it lies in: `(start, st_other)`.
    pub symbol: Option<(u64, u8)>,
}

/// How a back-end's sites are rewritten while other threads run them (see the module
/// documentation). Knowledge: every item is pure and tested on every host. The
/// defaults describe a back-end whose sites a host cannot rewrite live.
pub trait SitePlanner: Arch {
    /// The signal a plan's trap instruction raises (`SIGTRAP` = 5, `SIGILL` = 4), if
    /// the back-end's plans use one.
    const TRAP_SIGNAL: Option<i32> = None;

    /// The bytes of the trap instruction (for recognising a trap whose plan is over).
    const TRAP_BYTES: &'static [u8] = &[];

    /// Whether a host may rewrite `site` live: the forms and lengths [`Self::plan`]
    /// handles.
    fn live_site(site: &Site) -> bool {
        let _ = site;
        false
    }

    /// The stores taking `site`, whose bytes are `now`, to state `to`.
    fn plan(site: &Site, now: &[u8], to: SiteState, ctx: &PlanCtx) -> Result<Plan, PlanError> {
        let _ = (site, now, to, ctx);
        Err(PlanError::NotLive)
    }

    /// Writes into `out` the site's stub: code placed at any address within the site's
    /// reach that hands `value` to `target` (x86_64: in `r11`; elsewhere `value` is
    /// unused) and jumps there, keeping the trampoline's entry contract. Returns its
    /// length; 0 when the back-end has none.
    fn stub(value: u64, target: u64, out: &mut [u8; MAX_STUB]) -> usize {
        let _ = (value, target, out);
        0
    }

    /// Whether the site's trampoline-state branch reaches a stub at `stub`.
    fn stub_reaches(site: &Site, stub: u64) -> bool {
        let _ = (site, stub);
        false
    }

    /// Where a signal of [`Self::TRAP_SIGNAL`] says a trap instruction was: from the
    /// interrupted pc, `si_code` and `si_addr`. `None`: not a trap of a plan's kind.
    fn trap_address(pc: u64, code: i32, addr: u64) -> Option<u64> {
        let _ = (pc, code, addr);
        None
    }

    /// Whether a signal of [`Self::TRAP_SIGNAL`] (interrupted pc, `si_code`,
    /// `si_addr`) is the trap of a plan at `at`. Default: [`Self::trap_address`] is
    /// `at`.
    fn trapped_at(at: u64, pc: u64, code: i32, addr: u64) -> bool {
        Self::trap_address(pc, code, addr) == Some(at)
    }

    /// The target of the tail branch a patchable wrapper has right after its site,
    /// from the bytes there (`at`: their address).
    fn wrapper_body(at: u64, code: &[u8]) -> Option<u64> {
        let _ = (at, code);
        None
    }

    /// The word the entry trampoline's decision returns for a replacement (ppc64le
    /// tags one with another TOC). Default: its address.
    fn published_target(t: &TargetInfo) -> u64 {
        t.addr
    }

    /// Where a site's direct jump to a replacement goes, if it may jump there at all
    /// (ppc64le: only to the local entry of a function with the site's TOC). Default:
    /// the replacement's address.
    fn jump_entry(t: &TargetInfo) -> Option<u64> {
        Some(t.addr)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plans_keep_their_steps_in_order_and_refuse_overflow() {
        let mut p = Plan::new();
        assert!(p.is_empty());
        assert_eq!(p.push(0, &[], Sync::Round), None, "empty store");
        for i in 0..MAX_STEPS as u8 {
            assert_eq!(p.push(i, &[i], Sync::Core), Some(()));
        }
        assert_eq!(p.push(9, &[9], Sync::Core), None, "full");
        let offs: [u8; MAX_STEPS] = core::array::from_fn(|i| i as u8);
        assert!(p.steps().map(|s| s.offset).eq(offs));
        assert_eq!(p.result([7u8; 5]), Some([0, 1, 2, 3, 7]));
        let mut q = Plan::new();
        q.push(4, &[1, 2], Sync::Round);
        assert_eq!(q.result([0u8; 5]), None, "a step past the site");
    }

    #[test]
    fn resume_rules_cover_their_range_only() {
        let r = Resume {
            from: 0x101,
            end: 0x105,
            to: 0x105,
        };
        assert_eq!(r.apply(0x100), None);
        assert_eq!(r.apply(0x101), Some(0x105));
        assert_eq!(r.apply(0x104), Some(0x105));
        assert_eq!(r.apply(0x105), None);
        assert_eq!(PlanError::OutOfReach { to: 1 }.errno(), 34);
        assert_eq!(PlanError::Unknown.errno(), 22);
    }
}
