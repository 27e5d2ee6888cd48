//! The stop / hold / release handshake with a thread, on its record's capture slot
//! (futex words), and the capture of its interrupted registers from the `ucontext`.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use klp::arch::Native;

use super::{CheckOptions, Regs, TraceFailure, signal};
use crate::sys::{futex_wait_for, futex_wake, monotonic_ns};
use crate::thread::{ThreadRecord, cap};

/// How long a stopped thread waits in the handler for its release (set from
/// [`CheckOptions::hold`] under the capture lock, [`set_hold`]).
pub(super) static HOLD_NS: AtomicU64 = AtomicU64::new(2_000_000_000);
/// Tests only: how long [`stop`] waits after the signal before it looks for the answer
/// (a checker kept off the CPU), in microseconds.
#[cfg(test)]
pub(super) static LOOK_LATE_US: AtomicU64 = AtomicU64::new(0);
/// One stop at a time: taken by [`capture_lock`], released when its guard drops.
static CAPTURE_LOCK: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// The guard of [`CAPTURE_LOCK`] (`Send`: a hold may be dropped by another thread).
/// Only [`capture_lock`] makes one: functions that need the lock held take it as a
/// witness.
#[derive(Debug)]
pub(super) struct CaptureGuard {
    _private: (),
}

impl Drop for CaptureGuard {
    fn drop(&mut self) {
        CAPTURE_LOCK.store(false, Ordering::Release);
    }
}

/// Takes the capture lock (one stop at a time), spinning until it is free.
pub(super) fn capture_lock() -> CaptureGuard {
    while CAPTURE_LOCK
        .compare_exchange_weak(false, true, Ordering::Acquire, Ordering::Relaxed)
        .is_err()
    {
        std::thread::yield_now();
    }
    CaptureGuard { _private: () }
}

/// Reads the interrupted registers.
///
/// # Safety
///
/// 1. `uc` is the `ucontext_t` the kernel passed to an `SA_SIGINFO` handler.
unsafe fn regs_of(uc: *const libc::c_void) -> Regs {
    // SAFETY: condition 1 is `regs_from_ucontext`'s.
    unsafe { klp_arch::live::regs_from_ucontext::<Native>(uc) }
}

/// The capture and hold part of klp's handler: if a stop was requested, publishes the
/// interrupted registers and holds the thread until it is released (or the hold
/// times out).
///
/// # Safety
///
/// 1. `uc` is the `ucontext_t` the kernel passed to the `SA_SIGINFO` handler running
///    on this thread.
pub(super) unsafe fn on_signal(rec: &ThreadRecord, uc: *mut libc::c_void) {
    if rec.cap.load(Ordering::Acquire) != cap::REQUESTED {
        return;
    }
    // SAFETY: `uc` is the handler's third argument (condition 1).
    let regs = unsafe { regs_of(uc) };
    for (slot, v) in rec.regs.iter().zip([regs.pc, regs.sp, regs.fp, regs.lr]) {
        slot.store(v, Ordering::Relaxed);
    }
    if rec
        .cap
        .compare_exchange(
            cap::REQUESTED,
            cap::CAPTURED,
            Ordering::AcqRel,
            Ordering::Acquire,
        )
        .is_err()
    {
        return;
    }
    futex_wake(&rec.cap);
    let deadline = monotonic_ns().saturating_add(HOLD_NS.load(Ordering::Relaxed));
    loop {
        match rec.cap.load(Ordering::Acquire) {
            cap::CAPTURED => {
                if monotonic_ns() > deadline {
                    if rec
                        .cap
                        .compare_exchange(
                            cap::CAPTURED,
                            cap::ABANDONED,
                            Ordering::AcqRel,
                            Ordering::Acquire,
                        )
                        .is_ok()
                    {
                        return;
                    }
                    continue;
                }
                // Until the release wakes it (or the deadline): a held thread costs
                // no CPU, which matters when a batch holds a thousand of them.
                let left = deadline.saturating_sub(monotonic_ns()).max(1);
                futex_wait_for(&rec.cap, cap::CAPTURED, Duration::from_nanos(left));
            }
            cap::RELEASED => {
                let _ = rec.cap.compare_exchange(
                    cap::RELEASED,
                    cap::IDLE,
                    Ordering::AcqRel,
                    Ordering::Acquire,
                );
                return;
            }
            _ => return,
        }
    }
}

/// Stops `rec` in the handler, runs `f` on its interrupted registers while it is held,
/// then releases it.
pub fn with_stopped<R>(
    rec: &ThreadRecord,
    t: CheckOptions,
    f: impl FnOnce(Regs) -> R,
) -> Result<R, TraceFailure> {
    let one = capture_lock();
    let regs = stop(rec, t, &one)?;
    let out = f(regs);
    if release(rec) {
        Ok(out)
    } else {
        Err(TraceFailure::Resumed)
    }
}

/// A thread held in klp's handler after a stack check ([`super::trace_of_held`]); dropping it
/// releases the thread. Only one thread is held at a time (the capture lock).
#[derive(Debug)]
pub struct Hold {
    rec: Arc<ThreadRecord>,
    /// The capture lock, unless the thread was stopped by a [`super::Batch`] (which
    /// holds it while it stops its threads only).
    _one: Option<CaptureGuard>,
}

impl Hold {
    /// The hold of `rec`, stopped by [`stop`] under the capture lock `one` (kept until
    /// the hold drops), or by a batch (`None`).
    pub(super) fn new(rec: Arc<ThreadRecord>, one: Option<CaptureGuard>) -> Hold {
        Hold { rec, _one: one }
    }

    /// The held thread.
    pub fn record(&self) -> &Arc<ThreadRecord> {
        &self.rec
    }
}

impl Drop for Hold {
    fn drop(&mut self) {
        release(&self.rec);
    }
}

/// Asks `rec` to stop in the handler and waits until it holds; returns its
/// interrupted registers. The caller holds the capture lock (`_one`, the witness: one
/// stop at a time, and the hold time is set for this one) and calls [`release`].
pub(super) fn stop(
    rec: &ThreadRecord,
    t: CheckOptions,
    one: &CaptureGuard,
) -> Result<Regs, TraceFailure> {
    set_hold(t, one);
    let start = Instant::now();
    // The previous handshake with this thread may still be ending (its handler resets
    // the slot after the release): wait for a free slot, boundedly.
    while rec
        .cap
        .compare_exchange(
            cap::IDLE,
            cap::REQUESTED,
            Ordering::AcqRel,
            Ordering::Acquire,
        )
        .is_err()
    {
        if start.elapsed() >= t.answer {
            return Err(TraceFailure::NoAnswer);
        }
        std::thread::sleep(Duration::from_micros(50));
    }
    if !signal::signal(rec) {
        rec.cap.store(cap::IDLE, Ordering::Release);
        return Err(TraceFailure::Gone);
    }
    #[cfg(test)]
    std::thread::sleep(Duration::from_micros(LOOK_LATE_US.load(Ordering::Relaxed)));
    loop {
        match rec.cap.load(Ordering::Acquire) {
            cap::CAPTURED => break,
            cap::REQUESTED if start.elapsed() < t.answer => {
                futex_wait_for(&rec.cap, cap::REQUESTED, Duration::from_nanos(200_000));
            }
            cap::REQUESTED => {
                // Too late: withdraw the request (a late handler then does nothing).
                if rec
                    .cap
                    .compare_exchange(
                        cap::REQUESTED,
                        cap::IDLE,
                        Ordering::AcqRel,
                        Ordering::Acquire,
                    )
                    .is_ok()
                {
                    return Err(TraceFailure::NoAnswer);
                }
            }
            _ => {
                // The handler captured and then gave up the hold before this thread
                // looked (its deadline passed: a checker kept off the CPU that long).
                // Free the slot, or every later stop of the thread would wait for it
                // in vain (found by the loom model of this handshake).
                let _ = rec.cap.compare_exchange(
                    cap::ABANDONED,
                    cap::IDLE,
                    Ordering::AcqRel,
                    Ordering::Acquire,
                );
                return Err(TraceFailure::NoAnswer);
            }
        }
    }
    Ok(captured_regs(rec))
}

/// How long a stopped thread waits in the handler for its release: `t.hold`. Under the
/// capture lock (`_one`, the witness): the value is the one stop's, or the one batch's.
pub(super) fn set_hold(t: CheckOptions, _one: &CaptureGuard) {
    HOLD_NS.store(
        t.hold.as_nanos().min(u64::MAX as u128) as u64,
        Ordering::Relaxed,
    );
}

/// The registers `rec`'s handler captured (read after seeing `cap::CAPTURED`, which
/// the handler stores after them).
pub(super) fn captured_regs(rec: &ThreadRecord) -> Regs {
    Regs {
        pc: rec.regs[0].load(Ordering::Relaxed),
        sp: rec.regs[1].load(Ordering::Relaxed),
        fp: rec.regs[2].load(Ordering::Relaxed),
        lr: rec.regs[3].load(Ordering::Relaxed),
    }
}

/// Releases a thread stopped by [`stop`]; `false` if it had stopped waiting (its hold
/// timed out) and resumed on its own.
pub(super) fn release(rec: &ThreadRecord) -> bool {
    let released = rec
        .cap
        .compare_exchange(
            cap::CAPTURED,
            cap::RELEASED,
            Ordering::AcqRel,
            Ordering::Acquire,
        )
        .is_ok();
    futex_wake(&rec.cap);
    if !released {
        rec.cap.store(cap::IDLE, Ordering::Release);
    }
    released
}
