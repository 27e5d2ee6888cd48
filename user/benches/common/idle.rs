//! What both benchmarks share: the process, configured as klp-preload configures a
//! preloaded program (scan-only stack checks), idle registered threads, and a bare
//! signal round trip to each of them, the baseline of a transition's cost per thread.

use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Barrier};
use std::time::Duration;

use klp_user::stack::{CheckOptions, WalkPolicy};
use klp_user::{Config, Process};

/// The process, as klp-preload's defaults make it.
pub fn process() -> &'static Process {
    Process::init(Config {
        checks: CheckOptions {
            policy: WalkPolicy::ScanOnly,
            ..CheckOptions::default()
        },
        ..Config::default()
    })
}

/// On a back-end that retargets call sites (x86_64), the direct call of `f` in `caller`
/// was retargeted to the replacement (the steady state's call site).
pub fn assert_retargeted(p: &Process, f: u64, caller: &str) {
    if <klp::arch::Native as klp_arch::CallSites>::RETARGETS_CALLS {
        let callers = p.with_core(|_, h| h.retargeted_callers(f));
        assert!(
            callers.iter().any(|c| p
                .with_core(|_, h| h.symbols().describe(*c))
                .contains(caller)),
            "the call in {caller} was retargeted"
        );
    }
}

pub const THREADS: usize = 1000;
const ROUND_TRIP_SIG: libc::c_int = libc::SIGUSR2;

/// Per-thread acknowledgement words of the bare round trip.
static ACKS: [AtomicU32; THREADS] = [const { AtomicU32::new(0) }; THREADS];
thread_local! {
    static SLOT: std::cell::Cell<usize> = const { std::cell::Cell::new(usize::MAX) };
}

extern "C" fn ack(_sig: libc::c_int) {
    let i = SLOT.with(std::cell::Cell::get);
    if let Some(a) = ACKS.get(i) {
        a.fetch_add(1, Ordering::Release);
    }
}

/// One signal round trip to `tid`: send, then wait until its handler acknowledged.
pub fn round_trip(i: usize, tid: i32) {
    let a = &ACKS[i];
    let before = a.load(Ordering::Acquire);
    // SAFETY: `tgkill` has no memory preconditions; `tid` is a live thread of ours.
    unsafe { libc::syscall(libc::SYS_tgkill, libc::getpid(), tid, ROUND_TRIP_SIG) };
    while a.load(Ordering::Acquire) == before {
        std::hint::spin_loop();
    }
}

/// Idle registered threads, sleeping in `idle_wait` until stopped.
pub struct Idle {
    stop: Arc<AtomicBool>,
    /// The threads' ids, in start order.
    pub tids: Vec<i32>,
    handles: Vec<std::thread::JoinHandle<()>>,
}

impl Idle {
    pub fn new() -> Idle {
        Idle {
            stop: Arc::new(AtomicBool::new(false)),
            tids: Vec::new(),
            handles: Vec::new(),
        }
    }

    /// Starts threads until there are `n`; returns once they all have their tids.
    pub fn grow(&mut self, n: usize) {
        let first = self.tids.len();
        let more = n - first;
        let tids: Arc<Vec<AtomicU64>> = Arc::new((0..more).map(|_| AtomicU64::new(0)).collect());
        let ready = Arc::new(Barrier::new(more + 1));
        for k in 0..more {
            let (stop, tids, ready) = (self.stop.clone(), tids.clone(), ready.clone());
            let h = std::thread::Builder::new()
                .stack_size(64 << 10)
                .spawn(move || {
                    SLOT.with(|s| s.set(first + k));
                    // SAFETY: `gettid` has no preconditions.
                    let tid = unsafe { libc::gettid() };
                    tids[k].store(tid as u64, Ordering::Release);
                    ready.wait();
                    while !stop.load(Ordering::Acquire) {
                        klp_user::thread::idle_wait(Duration::from_secs(3600));
                    }
                })
                .expect("spawn");
            self.handles.push(h);
        }
        ready.wait();
        self.tids
            .extend(tids.iter().map(|t| t.load(Ordering::Acquire) as i32));
    }

    /// Stops and joins every thread.
    pub fn stop(self) {
        self.stop.store(true, Ordering::Release);
        for r in klp_user::thread::threads() {
            klp_user::thread::wake(&r);
        }
        for h in self.handles {
            h.join().expect("idle thread");
        }
    }
}

/// Installs [`ack`] for the round trip's signal.
pub fn install_ack_handler() {
    // SAFETY: `ack` is async-signal-safe (a thread-local read and an atomic add).
    unsafe {
        let mut sa: libc::sigaction = std::mem::zeroed();
        sa.sa_sigaction = ack as *const () as usize;
        sa.sa_flags = libc::SA_RESTART;
        libc::sigemptyset(&mut sa.sa_mask);
        libc::sigaction(ROUND_TRIP_SIG, &sa, std::ptr::null_mut());
    }
}
