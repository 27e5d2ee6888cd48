//! The POSIX primitives the host's threads, stack checks and redirects share: futex
//! waits and wake-ups, the monotonic clock, klp's real-time signal and the entry of its
//! handler. Depends on nothing of klp-user, so every module may use it (see the layering
//! in the crate documentation).
//!
//! Everything here is async-signal-safe (system calls and atomics only): klp's signal
//! handler uses it.

use std::sync::atomic::{AtomicPtr, AtomicU32, Ordering};
use std::time::Duration;

/// klp's signal: `SIGRTMIN + 3`.
pub fn signal_number() -> libc::c_int {
    libc::SIGRTMIN() + 3
}

/// Waits on a futex word for at most `d` (a single wait: spurious returns are fine).
pub(crate) fn futex_wait_for(word: &AtomicU32, val: u32, d: Duration) {
    let ts = libc::timespec {
        tv_sec: d.as_secs() as _,
        tv_nsec: d.subsec_nanos() as _,
    };
    // SAFETY: `word` is a valid aligned u32 and the timeout pointer is valid for the
    // call. FUTEX_WAIT only reads the word.
    unsafe {
        libc::syscall(
            libc::SYS_futex,
            word.as_ptr(),
            libc::FUTEX_WAIT | libc::FUTEX_PRIVATE_FLAG,
            val,
            &ts as *const libc::timespec,
        );
    }
}

/// Wakes every waiter on a futex word.
pub(crate) fn futex_wake(word: &AtomicU32) {
    // SAFETY: `word` is a valid aligned u32; FUTEX_WAKE does not access memory.
    unsafe {
        libc::syscall(
            libc::SYS_futex,
            word.as_ptr(),
            libc::FUTEX_WAKE | libc::FUTEX_PRIVATE_FLAG,
            i32::MAX,
        );
    }
}

/// `CLOCK_MONOTONIC` in nanoseconds (async-signal-safe, unlike `Instant` in principle).
pub(crate) fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid out-parameter; `clock_gettime` is async-signal-safe.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    (ts.tv_sec as u64).wrapping_mul(1_000_000_000) + ts.tv_nsec as u64
}

/// What klp's signal does on the thread it interrupts, given the handler's `ucontext_t`.
/// It must be async-signal-safe.
///
/// # Safety
///
/// 1. The argument is the `ucontext_t` the kernel passed to the `SA_SIGINFO` handler
///    running on the calling thread.
pub(crate) type SignalFn = unsafe fn(*mut libc::c_void);

/// The [`SignalFn`] klp's handler runs (null: none yet). Set by the stack checks
/// (`stack::install_handler`) before they send the signal for the first time.
static SIGNAL_FN: AtomicPtr<()> = AtomicPtr::new(std::ptr::null_mut());

/// Makes `f` what klp's signal runs.
pub(crate) fn set_signal_fn(f: SignalFn) {
    SIGNAL_FN.store(f as *mut (), Ordering::Release);
}

/// Installs klp's signal handler (once per process): it runs the [`SignalFn`] set by
/// [`set_signal_fn`], if any, with `errno` saved and restored.
pub(crate) fn install_signal_handler() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        // SAFETY: an all-zero `sigaction` is valid; `handler` has the `SA_SIGINFO`
        // signature and is async-signal-safe (see its documentation).
        unsafe {
            let mut sa: libc::sigaction = std::mem::zeroed();
            sa.sa_sigaction = handler as *const () as usize;
            sa.sa_flags = libc::SA_SIGINFO | libc::SA_ONSTACK | libc::SA_RESTART;
            libc::sigemptyset(&mut sa.sa_mask);
            libc::sigaction(signal_number(), &sa, std::ptr::null_mut());
        }
    });
}

/// The handler. Async-signal-safe: it saves and restores `errno` and runs the
/// [`SignalFn`] (async-signal-safe by its contract).
extern "C" fn handler(_sig: libc::c_int, _info: *mut libc::siginfo_t, uc: *mut libc::c_void) {
    // SAFETY: `__errno_location` returns this thread's errno slot.
    let errno = unsafe { *libc::__errno_location() };
    let f = SIGNAL_FN.load(Ordering::Acquire);
    if !f.is_null() {
        // SAFETY: only `set_signal_fn` stores into `SIGNAL_FN`, and it stores a
        // `SignalFn`: the pointer is one, cast back to its own type.
        let f = unsafe { std::mem::transmute::<*mut (), SignalFn>(f) };
        // SAFETY: `uc` is this handler's third argument, on this thread (1).
        unsafe { f(uc) };
    }
    // SAFETY: as above.
    unsafe { *libc::__errno_location() = errno };
}
