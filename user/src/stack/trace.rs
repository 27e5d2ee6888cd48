//! Trace assembly: the redirect machinery's refusal, the scan and the unwinder's
//! entries put together ([`trace`]), for a held thread ([`trace_of`],
//! [`trace_of_held`]) or the caller ([`own_trace`]).

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use klp::arch::{Native, StackMemory, UnwindError, UnwindStart};
use klp_arch::Live;

use super::handshake::{self, Hold};
use super::scan::{CodeReader, ThreadStack};
use super::{CheckOptions, Regs, TraceFailure, WalkPolicy};
use crate::symbols::SymbolIndex;
use crate::thread::{self, ThreadRecord, cap};

/// Whether the architecture keeps the innermost return address in a link register.
const HAS_LR: bool = Native::HAS_LINK_REGISTER;

/// The trace of a stopped thread (see the module docs), at most `max - 1` entries.
pub fn trace(
    mem: &ThreadStack<'_>,
    regs: Regs,
    policy: WalkPolicy,
    max: usize,
) -> Result<Vec<u64>, TraceFailure> {
    let mut out = Vec::with_capacity(max);
    trace_into(mem, regs, policy, max, &mut out).map(|()| out)
}

/// [`trace`] into `out`, which must have room for `max` entries: nothing is allocated,
/// so a thread held in the handler while it holds an allocator lock cannot stall it.
fn trace_into(
    mem: &ThreadStack<'_>,
    regs: Regs,
    policy: WalkPolicy,
    max: usize,
    out: &mut Vec<u64>,
) -> Result<(), TraceFailure> {
    out.clear();
    if mem.bounds.end == 0 {
        return Err(TraceFailure::NoEntryFrame);
    }
    let machinery = Machinery::of(mem.index);
    if machinery.holds_pc(regs.pc) {
        return Err(TraceFailure::Walk(UnwindError::Trampoline {
            addr: regs.pc,
        }));
    }
    if HAS_LR && machinery.holds_return(regs.lr) {
        return Err(TraceFailure::Walk(UnwindError::Trampoline {
            addr: regs.lr,
        }));
    }
    let start = UnwindStart {
        pc: regs.pc,
        sp: regs.sp,
        fp: regs.fp,
    };
    let walked = match policy {
        WalkPolicy::Unwinder => klp_arch::trace_reliable::<klp::arch::Native>(mem, &start)
            .map_err(TraceFailure::Walk)?,
        WalkPolicy::ScanOnly => {
            let b = mem.bounds;
            if regs.sp < b.low || regs.sp >= b.end || !regs.sp.is_multiple_of(8) {
                return Err(TraceFailure::Walk(UnwindError::FrameOutsideStack {
                    frame: regs.sp,
                }));
            }
            if regs.pc == 0 || !mem.is_text(regs.pc) {
                return Err(TraceFailure::Walk(UnwindError::UnknownReturnAddress {
                    addr: regs.pc,
                }));
            }
            klp_arch::Trace::new()
        }
    };
    let push = |a: u64, out: &mut Vec<u64>| -> Result<(), TraceFailure> {
        if !out.contains(&a) {
            if out.len() + 1 >= max || out.len() == out.capacity() {
                return Err(TraceFailure::TooDeep);
            }
            out.push(a);
        }
        Ok(())
    };
    push(regs.pc, out)?;
    if HAS_LR && mem.is_text(regs.lr) {
        push(regs.lr, out)?;
    }
    let mut code = CodeReader::new();
    let mut a = mem.floor;
    while a < mem.bounds.end {
        if let Some(w) = mem.read_u64(a)
            && !out.contains(&w)
            && mem.returns_after_call(&mut code, w)
        {
            if machinery.holds_return(w) {
                return Err(TraceFailure::Walk(UnwindError::Trampoline { addr: w }));
            }
            push(mem.attribute(w), out)?;
        }
        a += 8;
    }
    for &w in walked.as_slice() {
        push(w, out)?;
    }
    Ok(())
}

/// The trace of the calling thread, from its own registers.
#[inline(never)]
pub fn own_trace(
    rec: &ThreadRecord,
    index: &SymbolIndex,
    policy: WalkPolicy,
    max: usize,
) -> Result<Vec<u64>, TraceFailure> {
    let start = Native::capture();
    let (low, high) = rec.stack();
    // SAFETY: the stack above this frame's sp is this thread's live stack, which does
    // not change while this function runs (condition 1).
    let mem = unsafe { ThreadStack::new(low, high, rec.entry_frame(), start.sp, index) };
    trace(
        &mem,
        Regs {
            pc: start.pc,
            sp: start.sp,
            fp: start.fp,
            lr: 0,
        },
        policy,
        max,
    )
}

/// The entry trampoline of this build's redirects.
pub(super) fn trampoline_address() -> u64 {
    Native::trampoline()
}

/// The decision function the entry trampoline calls (0: not registered yet), set by
/// the redirects ([`super::register_redirect`]) before a site calls the trampoline.
static DECISION: AtomicU64 = AtomicU64::new(0);

/// Records the decision function (see [`DECISION`]).
pub(super) fn set_decision(decide: extern "C" fn(u64) -> u64) {
    DECISION.store(decide as *const () as u64, Ordering::Release);
}

/// The decision function's address, once registered.
fn decision() -> Option<u64> {
    Some(DECISION.load(Ordering::Acquire)).filter(|&a| a != 0)
}

/// The redirect machinery where a thread may hold a decision taken in its current
/// patch state but not yet acted on: the entry trampoline (its prologue is harmless,
/// its epilogue carries the chosen implementation in a register) and the decision
/// function with everything it calls. Such a thread's stack cannot show the
/// implementation it is about to run: the trampoline's `S + len` only names the
/// patched function, which is not what a transition checks once a replacement is
/// involved (unpatching checks the replacement, stacking the previous one). A thread
/// found there is unreliable for now (the kernel never meets this state: its ftrace
/// handler runs with preemption disabled). Not recognised when the index lacks the
/// symbols (a stripped binary, which cannot be patched anyway).
#[derive(Clone, Copy, Debug)]
pub(super) struct Machinery {
    /// The entry trampoline's symbol `[start, end)`.
    pub(super) trampoline: Option<(u64, u64)>,
    /// The decision function's symbol `[start, end)`.
    pub(super) decide: Option<(u64, u64)>,
    /// The fast entry path's symbol `[start, end)` (x86_64): it reads the thread's
    /// state and the slot and jumps on, like the trampoline's epilogue.
    fast: Option<(u64, u64)>,
}

impl Machinery {
    pub(super) fn of(index: &SymbolIndex) -> Machinery {
        let range = |a: u64| {
            index
                .lookup(a)
                .map(|(_, s)| (s.addr, s.addr.saturating_add(s.size.max(1))))
        };
        Machinery {
            trampoline: range(trampoline_address()),
            decide: decision().and_then(range),
            fast: Native::fast_entry().and_then(range),
        }
    }

    fn in_decide(&self, a: u64) -> bool {
        self.decide.is_some_and(|(s, e)| a >= s && a < e)
    }

    /// Whether the interrupted pc is in the machinery.
    pub(super) fn holds_pc(&self, pc: u64) -> bool {
        let within = |r: Option<(u64, u64)>| r.is_some_and(|(s, e)| pc >= s && pc < e);
        self.in_decide(pc) || within(self.trampoline) || within(self.fast)
    }

    /// Whether a return address (the link register, a scanned word) shows a call made
    /// by the decision function: the thread is in a callee of it. (A return address
    /// into the trampoline alone is no sign: ppc64le's trampoline calls an
    /// other-TOC replacement from its detour frame, for as long as that one runs;
    /// while the decision runs, the pc or a return address into it shows it.)
    pub(super) fn holds_return(&self, ra: u64) -> bool {
        self.in_decide(ra)
    }
}

/// The trace of task `rec`: its own registers if it is the caller, else a stop by
/// signal.
pub fn trace_of(
    rec: &ThreadRecord,
    index: &SymbolIndex,
    t: CheckOptions,
    max: usize,
) -> Result<Vec<u64>, TraceFailure> {
    if !rec.alive() || rec.tid() == 0 {
        // Not started yet, or gone: no stack that could hold patched code.
        return if rec.alive() {
            Ok(Vec::new())
        } else {
            Err(TraceFailure::Gone)
        };
    }
    if std::ptr::eq(thread::current_raw(), rec) {
        return own_trace(rec, index, t.policy, max);
    }
    // SAFETY: `with_stopped` runs the walk while the thread is held (condition 1).
    handshake::with_stopped(rec, t, |regs| unsafe {
        walk_stopped(rec, regs, index, t, max)
    })?
}

/// The trace of `rec`, stopped with interrupted registers `regs`.
///
/// # Safety
///
/// 1. `rec`'s thread is held in klp's handler (its stack above `regs.sp` is mapped and
///    does not change) for the whole call.
unsafe fn walk_stopped(
    rec: &ThreadRecord,
    regs: Regs,
    index: &SymbolIndex,
    t: CheckOptions,
    max: usize,
) -> Result<Vec<u64>, TraceFailure> {
    let (low, high) = rec.stack();
    let end = rec.entry_frame();
    // SAFETY: condition 1.
    let mem = unsafe { ThreadStack::new(low, high, end, regs.sp, index) };
    // A thread inside the redirect decision may have read its state already and act on
    // it after the check (see `Machinery`). The mark was stored by the thread before the
    // signal, whose handler published it (the capture).
    if rec.in_decide.load(Ordering::Acquire) != 0 {
        return Err(TraceFailure::Walk(UnwindError::Trampoline {
            addr: regs.pc,
        }));
    }
    let mut out = Vec::with_capacity(max);
    trace_into(&mem, regs, t.policy, max, &mut out)?;
    Ok(out)
}

/// [`trace_of`], but the thread stays held in the handler after the walk, until the
/// returned [`Hold`] is dropped (`None` for the calling thread, or a thread not
/// started or gone). The core's `klp_try_switch_task` checks a task and switches it
/// with the task unable to run in between (the kernel holds its runqueue lock): the
/// host drops the hold when the core is done with the task (`Host::task_check_done`:
/// after the switch, or the decision not to switch).
pub fn trace_of_held(
    rec: &Arc<ThreadRecord>,
    index: &SymbolIndex,
    t: CheckOptions,
    max: usize,
) -> Result<(Vec<u64>, Option<Hold>), TraceFailure> {
    if !rec.alive() || rec.tid() == 0 || std::ptr::eq(thread::current_raw(), &**rec) {
        return trace_of(rec, index, t, max).map(|v| (v, None));
    }
    let one = handshake::capture_lock();
    let regs = handshake::stop(rec, t, &one)?;
    let hold = Hold::new(rec.clone(), Some(one));
    walk_held(hold, regs, index, t, max)
}

/// The trace of a thread held in the handler with interrupted registers `regs`; on
/// success the hold is handed back, still holding.
pub(super) fn walk_held(
    hold: Hold,
    regs: Regs,
    index: &SymbolIndex,
    t: CheckOptions,
    max: usize,
) -> Result<(Vec<u64>, Option<Hold>), TraceFailure> {
    let rec = hold.record().clone();
    // SAFETY: `hold` keeps the thread in the handler until it is dropped (1).
    let out = unsafe { walk_stopped(&rec, regs, index, t, max) }?;
    // Still held? (A hold that timed out has let the thread run: the trace is stale.)
    if rec.cap.load(Ordering::Acquire) != cap::CAPTURED {
        drop(hold);
        return Err(TraceFailure::Resumed);
    }
    Ok((out, Some(hold)))
}

/// A trace taken while the thread is held, with the hold that keeps it stopped.
pub type HeldTrace = Result<(Vec<u64>, Option<Hold>), TraceFailure>;
