//! Stack checks of threads: stop a thread with a signal, read its interrupted
//! registers, walk its stack.
//!
//! ## The handshake
//!
//! The checker sets the thread's capture slot to `REQUESTED` and sends it klp's
//! real-time signal ([`signal_number`]) with `tgkill`. The handler (async-signal-safe:
//! atomics, `futex` and `clock_gettime` only, no allocation, no lock) copies pc, sp,
//! frame pointer and link register from the `ucontext`, publishes them (`CAPTURED`) and
//! *holds* the thread in the handler until the checker releases it, so the stack does
//! not change while it is read (the kernel keeps a task off the CPUs during its check).
//! Every wait is bounded: a thread that does not answer within the answer timeout is
//! reported as not answering (the core then sees an unreliable stack), and a handler
//! that is not released within the hold timeout abandons the hold, which the checker
//! notices and turns into an unreliable result.
//!
//! ## The walk
//!
//! A trace is accepted only if the architecture's reliable unwinder (`klp-arch`, through
//! [`klp::arch::Native`]) walks from the interrupted registers to the thread's entry
//! frame (recorded by [`crate::thread`] when the thread started): that proves that sp and
//! the frame chain are consistent and lie on this thread's stack. Because the thread was
//! interrupted at an arbitrary instruction, in code that may lack frame pointers (the C
//! library, Rust built without `-C force-frame-pointers`), the chain alone could miss
//! frames; so the trace reported is a *superset*: the pc, the link register (aarch64,
//! ppc64le, s390x), then every word between sp and the entry frame that is a plausible
//! return address, innermost first, without duplicates, then the unwinder's entries. A
//! missed frame is impossible (every return address of a live frame is in that range or
//! in the link register); a stale return address on the stack can only make the check
//! stricter.
//!
//! A scanned word is a plausible return address when it points into loaded text and
//! the code right before it is a call instruction ([`klp::arch::Arch::follows_call`] on
//! up to [`klp_arch::MAX_CALL_LEN`] bytes, taken only where they are text too, and
//! copied by the kernel so that a stale index cannot fault; unreadable bytes keep the
//! word). That leaves out code pointers that are not return addresses — a function
//! pointer held in a local, the address of a function's entry in a spilled register —
//! which would otherwise report the thread as running that function for as long as the
//! slot lives. The arch decoders err towards "is a call", so the filter never drops a
//! real return address. The return address a site leaves while it enters the entry
//! trampoline — just past the site: x86_64's trampoline pushes `S + 5` after the site's
//! `jmp`, the others' sites branch and link — is never kept
//! (the site ends the redirects record, `scan::set_site_end`): a thread in the trampoline is refused anyway (below), and a
//! stale copy of that word left below a live frame (a thread that went through the
//! trampoline and then sleeps in a callee at the same depth) would otherwise hold the
//! transition for as long as the thread sleeps.
//!
//! A thread caught in the redirect machinery — its pc in the entry trampoline or the
//! decision function, its record marked as deciding, or a return address into the
//! decision function (in the link register or on the stack) — gets no trace
//! ([`UnwindError::Trampoline`]; the core retries it later): it may hold a decision
//! taken in its current state that its stack cannot show (see `Machinery`). The
//! conservative scan used to cover part of this by accident, through the chosen
//! implementation's address left in the decision's locals.
//!
//! Not covered: a thread stopped inside a signal handler of its own whose signal frame
//! is on this stack. The code the handler interrupted is recorded only in the frame's
//! saved pc, which follows no call (the unfiltered scan used to pick it up); the
//! unwinder does not recognise signal frames either.
//!
//! On s390x the unwinder needs the back chain, which the ABI makes optional and which
//! the prebuilt std and C library do not keep: there the default policy
//! ([`WalkPolicy::NATIVE`]) is [`WalkPolicy::ScanOnly`], which checks that sp lies on the
//! thread's stack below its entry frame and relies on the scan alone (sound for the
//! same reason). A program built entirely with `-C target-feature=+backchain` /
//! `-mbackchain` can choose [`WalkPolicy::Unwinder`].
//!
//! ## The parts
//!
//! * `signal`: klp's real-time signal — what its handler does on a thread, `tgkill`
//!   (the handler's entry and the signal number are [`crate::sys`]'s);
//! * `handshake`: the stop / hold / release handshake on a thread's capture slot, the
//!   capture of its registers from the `ucontext`, the capture lock;
//! * `scan`: the stack memory of a held thread and the scan's filter;
//! * `trace`: traces put together, the redirect machinery's refusal;
//! * `batch`: threads stopped together ([`Batch`]);
//! * `sync`: synchronisation rounds and `membarrier(2)`.
//!
//! The stack checks sit below the redirects: what they need from them (the decision
//! function, the resume rule a round applies, the site ends the scan skips) is
//! registered from above ([`register_redirect`], `set_site_end`).

mod batch;
mod handshake;
mod scan;
mod signal;
mod sync;
#[cfg(test)]
mod tests;
mod trace;

use std::time::Duration;

use klp::arch::{Native, UnwindError};
use klp_arch::Live;

pub use crate::sys::signal_number;
pub use batch::Batch;
pub use handshake::{Hold, with_stopped};
pub(crate) use scan::set_site_end;
pub use scan::{ThreadStack, forget_code};
pub(crate) use signal::{install_handler, signal};
pub use sync::{barrier, sync_core, sync_round};
pub use trace::{HeldTrace, own_trace, trace, trace_of, trace_of_held};

/// Interrupted registers of a thread (the back-end's [`klp_arch::Regs`]).
pub use klp_arch::Regs;

/// Why no trace could be taken.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TraceFailure {
    /// The thread has not started or has exited.
    Gone,
    /// The thread did not answer the signal in time (it blocks the signal, or is
    /// stopped): it is treated as running.
    NoAnswer,
    /// The thread left the handler before the walk ended.
    Resumed,
    /// The thread's stack end is unknown (a thread that registered late).
    NoEntryFrame,
    /// The architecture's reliable unwinder refused the stack.
    Walk(UnwindError),
    /// More than the allowed number of entries.
    TooDeep,
}

/// How a trace is accepted.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WalkPolicy {
    /// The architecture's reliable unwinder must walk from the interrupted registers to
    /// the entry frame; the scan then adds what the chain cannot show.
    Unwinder,
    /// The scan alone, after checking that sp lies on the thread's stack below its
    /// entry frame. Sound for the same reason as the scan (every return address of a
    /// live frame is between sp and the entry frame, or in the link register); used
    /// where the unwinder cannot succeed in user space: on s390x the back chain is
    /// optional in the ABI and absent from the prebuilt std and C library.
    ScanOnly,
}

impl WalkPolicy {
    /// The default of this build: [`WalkPolicy::ScanOnly`] where the back-end cannot
    /// walk a user-space stack (`Live::USER_STACK_WALKABLE`: s390x), else
    /// [`WalkPolicy::Unwinder`].
    pub const NATIVE: WalkPolicy = if !Native::USER_STACK_WALKABLE {
        WalkPolicy::ScanOnly
    } else {
        WalkPolicy::Unwinder
    };
}

/// How stack checks are done: the handshake's timeouts and the walk policy.
#[derive(Clone, Copy, Debug)]
pub struct CheckOptions {
    /// How long to wait for the thread's answer.
    pub answer: Duration,
    /// How long the handler holds the thread at most.
    pub hold: Duration,
    /// How a trace is accepted.
    pub policy: WalkPolicy,
}

impl Default for CheckOptions {
    fn default() -> Self {
        CheckOptions {
            answer: Duration::from_millis(500),
            hold: Duration::from_secs(2),
            policy: WalkPolicy::NATIVE,
        }
    }
}

/// What the stack checks need from the redirect machinery, which sits above them
/// ([`crate::redirect`] registers it, see the layering in the crate documentation):
/// the decision function its entry trampoline calls (a thread inside it gets no trace:
/// `trace::Machinery`), and what a synchronisation round does on each thread (the
/// plan's resume rule, run by klp's handler before the thread acknowledges the round).
/// Registering again replaces both.
pub(crate) fn register_redirect(decide: extern "C" fn(u64) -> u64, on_sync: sync::SyncFn) {
    trace::set_decision(decide);
    sync::set_on_sync(on_sync);
}
