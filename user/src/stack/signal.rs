//! Signal plumbing: klp's real-time signal ([`crate::sys::signal_number`]), what its
//! handler does on the interrupted thread, and `tgkill`.

use std::sync::atomic::Ordering;

use super::{handshake, sync};
use crate::sys;
use crate::thread::{self, Registered, ThreadRecord};

/// Installs the handler (once per process), with what it runs on each thread.
pub(crate) fn install_handler() {
    sys::set_signal_fn(on_klp_signal);
    sys::install_signal_handler();
}

/// What klp's signal does on the thread it interrupts (run by the handler of
/// [`crate::sys`], which saves `errno`). Async-signal-safe: it touches only the thread's
/// record (atomics), `clock_gettime` and `futex`.
///
/// # Safety
///
/// 1. `uc` is the `ucontext_t` the kernel passed to the `SA_SIGINFO` handler running on
///    the calling thread.
unsafe fn on_klp_signal(uc: *mut libc::c_void) {
    let p = thread::current_raw();
    if !p.is_null() {
        // SAFETY: the record outlives the thread's registration, and the thread cannot
        // unregister while it runs this handler.
        let rec = unsafe { &*p };
        rec.in_handler.fetch_add(1, Ordering::AcqRel);
        // SAFETY: condition 1.
        unsafe { on_signal(rec, uc) };
        rec.in_handler.fetch_sub(1, Ordering::AcqRel);
    }
}

/// The handler's work on a registered thread: a synchronisation round, then a stop.
///
/// # Safety
///
/// 1. `uc` is the `ucontext_t` the kernel passed to the `SA_SIGINFO` handler running on
///    the calling thread, `rec`'s.
unsafe fn on_signal(rec: &ThreadRecord, uc: *mut libc::c_void) {
    rec.signals.fetch_add(1, Ordering::Relaxed);
    // SAFETY: condition 1 is both callees' condition 1.
    unsafe {
        sync::on_signal(rec, uc);
        handshake::on_signal(rec, uc);
    }
}

/// Sends klp's signal to thread `tid` of this process. The registry is locked (the
/// witness), so a registered thread cannot finish unregistering meanwhile and its tid
/// cannot have been reused.
pub(super) fn tgkill(tid: i32, _registry: &Registered<'_>) -> bool {
    // SAFETY: `tgkill` has no memory preconditions.
    unsafe { libc::syscall(libc::SYS_tgkill, libc::getpid(), tid, sys::signal_number()) == 0 }
}

/// Sends the signal to a registered, started, alive thread (under the registry lock,
/// so the thread cannot finish unregistering meanwhile).
pub(crate) fn signal(rec: &ThreadRecord) -> bool {
    install_handler();
    thread::with_registry(|regs| {
        let known = regs.iter().any(|r| std::ptr::eq(&**r, rec));
        known && rec.alive() && rec.tid() != 0 && tgkill(rec.tid(), regs)
    })
}
