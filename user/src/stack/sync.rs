//! Synchronisation rounds (every registered thread runs klp's handler) and
//! `membarrier(2)`.

use std::sync::atomic::{AtomicPtr, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use super::signal::{install_handler, signal};
use crate::thread::{self, ThreadRecord};

static SYNC_GEN: AtomicU64 = AtomicU64::new(0);

/// What a synchronisation round does on each thread, before the thread acknowledges it
/// (given the handler's `ucontext_t`): the redirects' resume rule ([`super::register_redirect`]).
///
/// # Safety
///
/// 1. The argument is the `ucontext_t` the kernel passed to an `SA_SIGINFO` handler
///    running on the interrupted thread.
pub(crate) type SyncFn = unsafe fn(*mut libc::c_void);

/// The registered [`SyncFn`] (null: none yet; a round then only acknowledges).
static ON_SYNC: AtomicPtr<()> = AtomicPtr::new(std::ptr::null_mut());

/// Makes `f` what a round does on each thread.
pub(super) fn set_on_sync(f: SyncFn) {
    ON_SYNC.store(f as *mut (), Ordering::Release);
}

/// The round part of klp's handler: acknowledges a round this thread has not
/// acknowledged yet, after running the registered [`SyncFn`].
///
/// # Safety
///
/// 1. `uc` is the `ucontext_t` the kernel passed to the `SA_SIGINFO` handler running
///    on this thread.
pub(super) unsafe fn on_signal(rec: &ThreadRecord, uc: *mut libc::c_void) {
    let req = rec.sync_req.load(Ordering::Acquire);
    if rec.sync_ack.load(Ordering::Relaxed) != req {
        let f = ON_SYNC.load(Ordering::Acquire);
        if !f.is_null() {
            // SAFETY: only `set_on_sync` stores into `ON_SYNC`, and it stores a
            // `SyncFn`: the pointer is one, cast back to its own type.
            let f = unsafe { std::mem::transmute::<*mut (), SyncFn>(f) };
            // SAFETY: condition 1 is the `SyncFn`'s.
            unsafe { f(uc) };
        }
        std::sync::atomic::fence(Ordering::SeqCst);
        rec.sync_ack.store(req, Ordering::Release);
    }
}

/// A private expedited `membarrier(2)` command (the register command is the next bit),
/// and whether the process registered for it (decided on first use).
#[derive(Debug)]
struct Membarrier {
    cmd: libc::c_long,
    registered: std::sync::OnceLock<bool>,
}

/// `MEMBARRIER_CMD_PRIVATE_EXPEDITED`: every running thread of the process executes a
/// full memory barrier before the call returns (a thread that is not running passes
/// one when it is scheduled).
static PRIVATE_EXPEDITED: Membarrier = Membarrier::new(1 << 3);
/// `MEMBARRIER_CMD_PRIVATE_EXPEDITED_SYNC_CORE`: the same, and every thread also
/// executes a core-serialising instruction before it runs user code again (what the
/// kernel's `text_poke_sync` gets with an IPI to every CPU; the kernel implements it
/// on x86 and arm64 only).
static PRIVATE_EXPEDITED_SYNC_CORE: Membarrier = Membarrier::new(1 << 5);

impl Membarrier {
    const fn new(cmd: libc::c_long) -> Membarrier {
        Membarrier {
            cmd,
            registered: std::sync::OnceLock::new(),
        }
    }

    /// Runs the command, registering for it on first use; `false` where the kernel
    /// (or an emulator) does not offer it.
    fn run(&self) -> bool {
        const QUERY: libc::c_long = 0;
        let ok = *self.registered.get_or_init(|| {
            // SAFETY: `membarrier` has no memory arguments.
            let cmds = unsafe { libc::syscall(libc::SYS_membarrier, QUERY, 0, 0) };
            // SAFETY: as above.
            let register = || unsafe { libc::syscall(libc::SYS_membarrier, self.cmd << 1, 0, 0) };
            cmds > 0 && cmds & self.cmd != 0 && register() == 0
        });
        // SAFETY: as above; the process registered for the command.
        ok && unsafe { libc::syscall(libc::SYS_membarrier, self.cmd, 0, 0) } == 0
    }
}

/// The synchronisation a text write needs when no thread can be in the middle of the
/// instructions it changes (each is replaced whole): a barrier and a core-serialising
/// event on every thread (`PRIVATE_EXPEDITED_SYNC_CORE`), else a [`sync_round`]. A write
/// that may find a thread inside a run of instructions it replaces needs the round
/// (its handler moves such a thread: `on_sync`).
pub fn sync_core(timeout: Duration) {
    if !PRIVATE_EXPEDITED_SYNC_CORE.run() {
        sync_round(timeout);
    }
}

/// A full memory barrier on every thread of the process: `membarrier(2)` where it is
/// available, else a synchronisation round ([`sync_round`], which also reaches only
/// registered threads that do not block klp's signal). Unlike a synchronisation round
/// it runs no code on the other threads (nothing is moved out of a site being
/// written): text writes keep using rounds.
pub fn barrier(timeout: Duration) {
    if !PRIVATE_EXPEDITED.run() {
        sync_round(timeout);
    }
}

/// A membarrier-like round: every other registered, started thread runs the handler
/// (a full barrier) after this call began. Returns `(acknowledged, asked)`; threads
/// that do not answer within `timeout` are not waited for.
pub fn sync_round(timeout: Duration) -> (usize, usize) {
    install_handler();
    let round = SYNC_GEN.fetch_add(1, Ordering::AcqRel) + 1;
    let me = thread::current_raw();
    let asked: Vec<_> = thread::threads()
        .into_iter()
        .filter(|r| r.alive() && r.tid() != 0 && !std::ptr::eq(&**r, me))
        .collect();
    std::sync::atomic::fence(Ordering::SeqCst);
    let mut sent = Vec::new();
    for r in &asked {
        r.sync_req.store(round, Ordering::Release);
        if signal(r) {
            sent.push(r.clone());
        }
    }
    let start = Instant::now();
    loop {
        let acked = sent
            .iter()
            .filter(|r| r.sync_ack.load(Ordering::Acquire) >= round || !r.alive())
            .count();
        if acked == sent.len() || start.elapsed() >= timeout {
            return (acked + (asked.len() - sent.len()), asked.len());
        }
        std::thread::sleep(Duration::from_micros(100));
    }
}
