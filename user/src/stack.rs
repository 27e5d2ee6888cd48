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
//! ppc64le, s390x), then every word between sp and the entry frame that points into
//! loaded text, innermost first, without duplicates. A missed frame is impossible (every
//! return address of a live frame is in that range or in the link register); a stale
//! code pointer on the stack can only make the check stricter.
//!
//! On s390x the unwinder needs the back chain, which the ABI makes optional and which
//! the prebuilt std and C library do not keep: there the default policy
//! ([`WalkPolicy::NATIVE`]) is [`WalkPolicy::ScanOnly`], which checks that sp lies on the
//! thread's stack below its entry frame and relies on the scan alone (sound for the
//! same reason). A program built entirely with `-C target-feature=+backchain` /
//! `-mbackchain` can choose [`WalkPolicy::Unwinder`].

use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use klp::arch::{StackBounds, StackMemory, UnwindError, UnwindStart};

use crate::symbols::SymbolIndex;
use crate::thread::{self, ThreadRecord, cap};

/// Interrupted registers of a thread.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Regs {
    /// Program counter.
    pub pc: u64,
    /// Stack pointer.
    pub sp: u64,
    /// Frame pointer (x86_64 `rbp`, aarch64 `x29`; 0 on back-chain arches).
    pub fp: u64,
    /// Link register (aarch64 `x30`, ppc64le `lr`, s390x `r14`; 0 on x86_64).
    pub lr: u64,
}

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
    /// The default of this build: [`WalkPolicy::ScanOnly`] on s390x, else
    /// [`WalkPolicy::Unwinder`].
    pub const NATIVE: WalkPolicy = if cfg!(target_arch = "s390x") {
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

static HOLD_NS: AtomicU64 = AtomicU64::new(2_000_000_000);
static CAPTURE_LOCK: Mutex<()> = Mutex::new(());
static SYNC_GEN: AtomicU64 = AtomicU64::new(0);

/// klp's signal: `SIGRTMIN + 3`.
pub fn signal_number() -> libc::c_int {
    libc::SIGRTMIN() + 3
}

/// Installs the handler (once per process).
pub(crate) fn install_handler() {
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

fn futex_wait(word: &std::sync::atomic::AtomicU32, val: u32, ns: i64) {
    let ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: ns as _,
    };
    // SAFETY: `word` is a valid aligned u32 for the duration of the call; the timeout
    // pointer is valid. FUTEX_WAIT only reads the word.
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

/// Waits on a futex word for at most `d` (a single wait: spurious returns are fine).
pub(crate) fn futex_wait_for(word: &std::sync::atomic::AtomicU32, val: u32, d: Duration) {
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

pub(crate) fn futex_wake(word: &std::sync::atomic::AtomicU32) {
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

fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid out-parameter; `clock_gettime` is async-signal-safe.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    (ts.tv_sec as u64).wrapping_mul(1_000_000_000) + ts.tv_nsec as u64
}

/// Reads the interrupted registers.
///
/// # Safety
///
/// 1. `uc` is the `ucontext_t` the kernel passed to an `SA_SIGINFO` handler.
unsafe fn regs_of(uc: *const libc::c_void) -> Regs {
    // SAFETY: condition 1.
    let uc = unsafe { &*(uc as *const libc::ucontext_t) };
    cfg_regs(uc)
}

#[cfg(target_arch = "x86_64")]
fn cfg_regs(uc: &libc::ucontext_t) -> Regs {
    let g = &uc.uc_mcontext.gregs;
    let r = |i: libc::c_int| g.get(i as usize).copied().unwrap_or(0) as u64;
    Regs {
        pc: r(libc::REG_RIP),
        sp: r(libc::REG_RSP),
        fp: r(libc::REG_RBP),
        lr: 0,
    }
}

#[cfg(target_arch = "aarch64")]
fn cfg_regs(uc: &libc::ucontext_t) -> Regs {
    let m = &uc.uc_mcontext;
    Regs {
        pc: m.pc,
        sp: m.sp,
        fp: m.regs[29],
        lr: m.regs[30],
    }
}

#[cfg(target_arch = "powerpc64")]
fn cfg_regs(uc: &libc::ucontext_t) -> Regs {
    let g = &uc.uc_mcontext.gp_regs;
    Regs {
        pc: g[32],
        sp: g[1],
        fp: 0,
        lr: g[36],
    }
}

#[cfg(target_arch = "s390x")]
fn cfg_regs(uc: &libc::ucontext_t) -> Regs {
    let m = &uc.uc_mcontext;
    Regs {
        pc: m.psw.addr,
        sp: m.gregs[15],
        fp: 0,
        lr: m.gregs[14],
    }
}

/// The handler. Async-signal-safe: it touches only the thread's record (atomics),
/// `errno` (saved and restored), `clock_gettime` and `futex`.
extern "C" fn handler(_sig: libc::c_int, _info: *mut libc::siginfo_t, uc: *mut libc::c_void) {
    // SAFETY: `__errno_location` returns this thread's errno slot.
    let errno = unsafe { *libc::__errno_location() };
    let p = thread::current_raw();
    if !p.is_null() {
        // SAFETY: the record outlives the thread's registration, and the thread cannot
        // unregister while it runs this handler.
        let rec = unsafe { &*p };
        on_signal(rec, uc);
    }
    // SAFETY: as above.
    unsafe { *libc::__errno_location() = errno };
}

fn on_signal(rec: &ThreadRecord, uc: *mut libc::c_void) {
    rec.signals.fetch_add(1, Ordering::Relaxed);
    let req = rec.sync_req.load(Ordering::Acquire);
    if rec.sync_ack.load(Ordering::Relaxed) != req {
        // SAFETY: `uc` is the handler's third argument, on this thread.
        unsafe { crate::redirect::on_sync(uc) };
        std::sync::atomic::fence(Ordering::SeqCst);
        rec.sync_ack.store(req, Ordering::Release);
    }
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
                futex_wait(&rec.cap, cap::CAPTURED, 1_000_000);
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

fn tgkill(tid: i32) -> bool {
    // SAFETY: `tgkill` has no memory preconditions.
    unsafe { libc::syscall(libc::SYS_tgkill, libc::getpid(), tid, signal_number()) == 0 }
}

/// Sends the signal to a registered, started, alive thread (under the registry lock,
/// so the thread cannot finish unregistering meanwhile).
pub(crate) fn signal(rec: &ThreadRecord) -> bool {
    install_handler();
    thread::with_registry(|regs| {
        let known = regs.iter().any(|r| std::ptr::eq(&**r, rec));
        known && rec.alive() && rec.tid() != 0 && tgkill(rec.tid())
    })
}

/// Stops `rec` in the handler, runs `f` on its interrupted registers while it is held,
/// then releases it.
pub fn with_stopped<R>(
    rec: &ThreadRecord,
    t: CheckOptions,
    f: impl FnOnce(Regs) -> R,
) -> Result<R, TraceFailure> {
    let _one = CAPTURE_LOCK.lock().unwrap_or_else(|e| e.into_inner());
    HOLD_NS.store(
        t.hold.as_nanos().min(u64::MAX as u128) as u64,
        Ordering::Relaxed,
    );
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
    if !signal(rec) {
        rec.cap.store(cap::IDLE, Ordering::Release);
        return Err(TraceFailure::Gone);
    }
    loop {
        match rec.cap.load(Ordering::Acquire) {
            cap::CAPTURED => break,
            cap::REQUESTED if start.elapsed() < t.answer => {
                futex_wait(&rec.cap, cap::REQUESTED, 200_000);
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
            _ => return Err(TraceFailure::NoAnswer),
        }
    }
    let regs = Regs {
        pc: rec.regs[0].load(Ordering::Relaxed),
        sp: rec.regs[1].load(Ordering::Relaxed),
        fp: rec.regs[2].load(Ordering::Relaxed),
        lr: rec.regs[3].load(Ordering::Relaxed),
    };
    let out = f(regs);
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
    if released {
        Ok(out)
    } else {
        rec.cap.store(cap::IDLE, Ordering::Release);
        Err(TraceFailure::Resumed)
    }
}

/// A thread's stack as the arch unwinder reads it: words in `[floor, high)` only (the
/// part of the stack that is live: at or above the interrupted sp).
#[derive(Debug)]
pub struct ThreadStack<'a> {
    bounds: StackBounds,
    floor: u64,
    index: &'a SymbolIndex,
}

impl<'a> ThreadStack<'a> {
    /// The live stack `[sp, high)` of a thread whose stack is `[low, high)` and whose
    /// walks end at `end`.
    ///
    /// # Safety
    ///
    /// 1. `[sp & !7, high)` is mapped, readable memory of a thread that does not run
    ///    while this value is used (it is held in the handler, or it is the caller).
    pub unsafe fn new(low: u64, high: u64, end: u64, sp: u64, index: &'a SymbolIndex) -> Self {
        ThreadStack {
            bounds: StackBounds { low, high, end },
            floor: (sp & !7).max(low),
            index,
        }
    }
}

impl StackMemory for ThreadStack<'_> {
    fn bounds(&self) -> StackBounds {
        self.bounds
    }

    fn read_u64(&self, addr: u64) -> Option<u64> {
        let in_range = addr >= self.floor
            && addr.is_multiple_of(8)
            && addr.checked_add(8).is_some_and(|e| e <= self.bounds.high);
        if !in_range {
            return None;
        }
        // SAFETY: `[floor, high)` is readable and stable (condition 1 of `new`), the
        // address is inside it and 8-aligned.
        Some(unsafe { std::ptr::read_volatile(addr as *const u64) })
    }

    fn is_text(&self, addr: u64) -> bool {
        self.index.is_text(addr)
    }
}

/// Whether the architecture keeps the innermost return address in a link register.
const HAS_LR: bool = !cfg!(target_arch = "x86_64");

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
    let mut a = mem.floor;
    while a < mem.bounds.end {
        if let Some(w) = mem.read_u64(a)
            && mem.is_text(w)
        {
            push(w, out)?;
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
    let start = capture_here();
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

#[inline(always)]
fn capture_here() -> UnwindStart {
    #[cfg(target_arch = "x86_64")]
    let s = klp_arch_x86_64::live::capture();
    #[cfg(target_arch = "aarch64")]
    let s = klp_arch_aarch64::live::capture();
    #[cfg(all(target_arch = "powerpc64", target_endian = "little"))]
    let s = klp_arch_ppc64le::live::capture();
    #[cfg(target_arch = "s390x")]
    let s = klp_arch_s390x::live::capture();
    s
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
    let (low, high) = rec.stack();
    let end = rec.entry_frame();
    let mut out = Vec::with_capacity(max);
    with_stopped(rec, t, |regs| {
        // SAFETY: the thread is held in the handler; its stack above the interrupted sp
        // is mapped and does not change until it is released (condition 1).
        let mem = unsafe { ThreadStack::new(low, high, end, regs.sp, index) };
        trace_into(&mem, regs, t.policy, max, &mut out)
    })??;
    Ok(out)
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::sync::atomic::AtomicBool;

    #[inline(never)]
    fn spin_here(stop: &AtomicBool, ready: &AtomicBool) -> u64 {
        let mut n = 0u64;
        ready.store(true, Ordering::Release);
        while !stop.load(Ordering::Acquire) {
            n = std::hint::black_box(n.wrapping_add(1));
        }
        n
    }

    #[inline(never)]
    fn spin_outer(stop: &AtomicBool, ready: &AtomicBool) -> u64 {
        let n = spin_here(stop, ready);
        std::hint::black_box(n)
    }

    fn contains_fn(idx: &SymbolIndex, trace: &[u64], f: u64) -> bool {
        let size = idx.size_of(f).expect("sized");
        trace.iter().any(|&a| a >= f && a < f + size)
    }

    struct Spinner {
        stop: Arc<AtomicBool>,
        rec: Arc<ThreadRecord>,
        handle: Option<std::thread::JoinHandle<u64>>,
    }

    impl Spinner {
        fn start(block_signal: bool) -> Spinner {
            let stop = Arc::new(AtomicBool::new(false));
            let ready = Arc::new(AtomicBool::new(false));
            let (s2, r2) = (stop.clone(), ready.clone());
            let (tx, rx) = std::sync::mpsc::channel();
            let handle = std::thread::spawn(move || {
                let _ = tx.send(thread::current_record());
                if block_signal {
                    // SAFETY: a zeroed sigset is valid input to sigemptyset, which
                    // initialises it; blocking a signal in this thread is harmless.
                    unsafe {
                        let mut set: libc::sigset_t = std::mem::zeroed();
                        libc::sigemptyset(&mut set);
                        libc::sigaddset(&mut set, signal_number());
                        libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
                    }
                }
                spin_outer(&s2, &r2)
            });
            let rec = rx.recv().ok().flatten().expect("registered");
            while !ready.load(Ordering::Acquire) {
                std::thread::yield_now();
            }
            Spinner {
                stop,
                rec,
                handle: Some(handle),
            }
        }
    }

    impl Drop for Spinner {
        fn drop(&mut self) {
            self.stop.store(true, Ordering::Release);
            if let Some(h) = self.handle.take() {
                let _ = h.join();
            }
        }
    }

    static SERIAL: Mutex<()> = Mutex::new(());

    #[test]
    fn stops_a_thread_and_walks_its_stack() {
        let _s = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
        install_handler();
        let sp = Spinner::start(false);
        let idx = SymbolIndex::load();
        let (low, high) = sp.rec.stack();
        let regs = with_stopped(&sp.rec, CheckOptions::default(), |r| r).expect("answers");
        assert!(idx.is_text(regs.pc), "{regs:x?}");
        assert!(
            regs.sp >= low && regs.sp < high,
            "{regs:x?} {low:#x} {high:#x}"
        );
        assert!(sp.rec.signals_handled() >= 1);
        let t = trace_of(
            &sp.rec,
            &idx,
            CheckOptions::default(),
            klp::MAX_STACK_ENTRIES,
        );
        let f = spin_here as *const () as u64;
        match t {
            Ok(tr) => {
                assert!(contains_fn(&idx, &tr, f), "spin_here missing: {tr:x?}");
                assert!(tr.len() < klp::MAX_STACK_ENTRIES);
                eprintln!("trace of {} entries", tr.len());
            }
            Err(e) => panic!("trace failed: {e:?}"),
        }
        // Both policies see the spinning function, except the unwinder on s390x, which
        // needs a back chain the prebuilt std does not keep.
        for policy in [WalkPolicy::Unwinder, WalkPolicy::ScanOnly] {
            let o = CheckOptions {
                policy,
                ..CheckOptions::default()
            };
            match trace_of(&sp.rec, &idx, o, klp::MAX_STACK_ENTRIES) {
                Ok(tr) => {
                    // The spinning function and its caller: no frame is missed.
                    assert!(contains_fn(&idx, &tr, f), "{policy:?}: {tr:x?}");
                    let outer = spin_outer as *const () as u64;
                    assert!(contains_fn(&idx, &tr, outer), "{policy:?}: {tr:x?}");
                }
                Err(TraceFailure::Walk(e))
                    if cfg!(target_arch = "s390x") && policy == WalkPolicy::Unwinder =>
                {
                    eprintln!("s390x unwinder refused the stack, as documented: {e}");
                }
                Err(e) => panic!("{policy:?}: {e:?}"),
            }
        }
        // The thread keeps running after the check.
        let before = sp.rec.signals_handled();
        assert!(with_stopped(&sp.rec, CheckOptions::default(), |_| ()).is_ok());
        assert_eq!(sp.rec.signals_handled(), before + 1);
    }

    #[test]
    fn a_thread_that_blocks_the_signal_does_not_answer() {
        let _s = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
        install_handler();
        let sp = Spinner::start(true);
        let t = CheckOptions {
            answer: Duration::from_millis(100),
            hold: Duration::from_secs(1),
            policy: WalkPolicy::NATIVE,
        };
        let start = Instant::now();
        assert_eq!(with_stopped(&sp.rec, t, |r| r), Err(TraceFailure::NoAnswer));
        assert!(start.elapsed() < Duration::from_secs(5));
        assert_eq!(sp.rec.cap.load(Ordering::Acquire), cap::IDLE);
    }

    #[test]
    fn a_hold_that_outlasts_its_timeout_is_abandoned() {
        let _s = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
        install_handler();
        let sp = Spinner::start(false);
        let t = CheckOptions {
            hold: Duration::from_millis(5),
            ..CheckOptions::default()
        };
        let r = with_stopped(&sp.rec, t, |_| {
            std::thread::sleep(Duration::from_millis(300))
        });
        assert_eq!(r, Err(TraceFailure::Resumed));
        // The slot is free again and the thread answers the next request.
        assert!(with_stopped(&sp.rec, CheckOptions::default(), |r| r.pc).is_ok());
        HOLD_NS.store(2_000_000_000, Ordering::Relaxed);
    }

    #[test]
    fn an_exited_thread_is_gone() {
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            tx.send(thread::current_record()).ok();
        })
        .join()
        .expect("thread");
        let rec = rx.recv().ok().flatten().expect("registered");
        assert!(!rec.alive());
        let idx = SymbolIndex::default();
        assert_eq!(
            trace_of(&rec, &idx, CheckOptions::default(), 100),
            Err(TraceFailure::Gone)
        );
        assert_eq!(
            with_stopped(&rec, CheckOptions::default(), |_| ()),
            Err(TraceFailure::Gone)
        );
    }

    #[test]
    fn own_trace_sees_the_caller() {
        let idx = SymbolIndex::load();
        let rec = thread::register_current();
        #[inline(never)]
        fn probe(rec: &ThreadRecord, idx: &SymbolIndex) -> Result<Vec<u64>, TraceFailure> {
            let r = own_trace(rec, idx, WalkPolicy::NATIVE, klp::MAX_STACK_ENTRIES);
            std::hint::black_box(r)
        }
        match probe(&rec, &idx) {
            Ok(tr) => assert!(contains_fn(&idx, &tr, probe as *const () as u64), "{tr:x?}"),
            Err(e) => panic!("{e:?}"),
        }
    }

    #[test]
    fn late_registered_threads_have_no_entry_frame() {
        let rec = Arc::new(ThreadRecord::for_test());
        let idx = SymbolIndex::default();
        // SAFETY: nothing is read: the walk stops before touching memory.
        let mem = unsafe { ThreadStack::new(0x1000, 0x2000, rec.entry_frame(), 0x1800, &idx) };
        for p in [WalkPolicy::Unwinder, WalkPolicy::ScanOnly] {
            assert_eq!(
                trace(&mem, Regs::default(), p, 100),
                Err(TraceFailure::NoEntryFrame)
            );
        }
    }

    #[test]
    fn thread_stack_reads_only_the_live_stack() {
        let words = [1u64, 2, 3, 4];
        let base = words.as_ptr() as u64;
        let idx = SymbolIndex::default();
        // SAFETY: `words` is readable for its whole length and unchanged meanwhile.
        let mem = unsafe { ThreadStack::new(base, base + 32, base + 24, base + 8, &idx) };
        assert_eq!(mem.read_u64(base), None, "below sp");
        assert_eq!(mem.read_u64(base + 8), Some(2));
        assert_eq!(mem.read_u64(base + 24), Some(4));
        assert_eq!(mem.read_u64(base + 28), None, "unaligned");
        assert_eq!(mem.read_u64(base + 32), None, "above the stack");
        assert_eq!(mem.bounds().end, base + 24);
    }

    #[test]
    fn sync_round_is_acknowledged_by_every_thread() {
        let _s = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
        let a = Spinner::start(false);
        let b = Spinner::start(false);
        let (acked, asked) = sync_round(Duration::from_secs(5));
        assert!(asked >= 2);
        assert_eq!(acked, asked);
        assert!(a.rec.sync_ack.load(Ordering::Acquire) > 0);
        assert!(b.rec.sync_ack.load(Ordering::Acquire) > 0);
    }
}
