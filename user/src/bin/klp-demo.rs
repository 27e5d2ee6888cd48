//! `klp-demo`: a multi-threaded program that keeps serving requests while it is
//! live-patched from outside.
//!
//! It holds only the buggy code and its serving logic: four worker threads call the
//! request handler [`klp_demo_handle`] (version 1, whose bug is that it answers 1 for
//! every request), and the main thread prints, every 500 ms, how many answers each
//! version gave. The fixes are patch files (`user/demo/`, C compiled and turned into
//! livepatch objects by `klp-convert`) that `ci/demo` loads with `klpctl --pid PID
//! load`, while the program runs: klp serves its control socket.
//!
//! Signals let a script hold a request inside the handler, to show a transition that
//! waits for the thread running the code being replaced:
//!
//! * `SIGUSR1`: the next request waits in [`klp_demo_wait_point`] (which the handler
//!   calls, and so do the fixes), and says so on stdout;
//! * `SIGUSR2`: that request goes on;
//! * `SIGTERM`, `SIGINT`: the program stops (its socket removed).
//!
//! ```text
//! klp-demo [SECONDS]      stops by itself after SECONDS (default 600)
//! ```
//!
//! klp's log lines (`livepatch: …`) go to stderr as they happen. It runs on x86_64,
//! aarch64, ppc64le and s390x (`ci/demo --arch A` runs it under QEMU).

mod demo {
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
    use std::sync::{Condvar, Mutex, MutexGuard};
    use std::time::{Duration, Instant};

    use klp_user::ctl::ServeOptions;
    use klp_user::{Config, Process};

    klp_user::patchable! {
        /// The request handler. Version 1 has a bug: it answers 1 (its version) for
        /// every request. The patches in `user/demo/` replace it.
        pub fn klp_demo_handle(req: u64) -> u64 {
            klp_demo_wait_point(req);
            std::hint::black_box(req);
            1
        }
    }

    /// Where a request waits when the program was asked to hold one (`SIGUSR1`), until
    /// `SIGUSR2`. The handler calls it, and so do the fixes (a C name, so that a patch
    /// can call it; klp-convert resolves it in this program).
    #[unsafe(no_mangle)]
    #[inline(never)]
    pub extern "C" fn klp_demo_wait_point(req: u64) {
        if !ARMED.load(Ordering::Relaxed) {
            return;
        }
        let mut hold = lock_hold();
        if *hold != Hold::Armed {
            return;
        }
        ARMED.store(false, Ordering::Relaxed);
        *hold = Hold::Waiting;
        // SAFETY: `gettid` has no preconditions.
        let tid = unsafe { libc::gettid() };
        println!("request {req} waits inside the handler, on thread {tid}, until SIGUSR2");
        while *hold == Hold::Waiting {
            hold = match HOLD_CV.wait(hold) {
                Ok(g) => g,
                Err(e) => e.into_inner(),
            };
        }
        *hold = Hold::Idle;
        drop(hold);
        println!("request {req} goes on");
    }

    /// The state of the held request.
    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    enum Hold {
        /// Nothing asked.
        Idle,
        /// The next request is to wait (`SIGUSR1`).
        Armed,
        /// A request waits.
        Waiting,
        /// The waiting request may go on (`SIGUSR2`).
        Released,
    }

    static HOLD: Mutex<Hold> = Mutex::new(Hold::Idle);
    static HOLD_CV: Condvar = Condvar::new();
    /// `HOLD` is `Armed`: the workers' fast path.
    static ARMED: AtomicBool = AtomicBool::new(false);

    fn lock_hold() -> MutexGuard<'static, Hold> {
        HOLD.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Answers per version since the last report (index = version).
    static COUNTS: [AtomicU64; 4] = [const { AtomicU64::new(0) }; 4];
    static STOP: AtomicBool = AtomicBool::new(false);
    const PERIOD: Duration = Duration::from_millis(500);

    fn report() {
        let c: [u64; 4] = core::array::from_fn(|i| COUNTS[i].swap(0, Ordering::Relaxed));
        println!(
            "answers in the last {} ms: v1 {:>6}  v2 {:>6}  v3 {:>6}",
            PERIOD.as_millis(),
            c[1],
            c[2],
            c[3]
        );
    }

    /// The signals the main thread takes with `sigtimedwait` (blocked in every thread).
    pub fn signals() -> libc::sigset_t {
        // SAFETY: `sigemptyset`/`sigaddset` initialise and fill the set they are given.
        unsafe {
            let mut set: libc::sigset_t = std::mem::zeroed();
            libc::sigemptyset(&mut set);
            for s in [libc::SIGUSR1, libc::SIGUSR2, libc::SIGTERM, libc::SIGINT] {
                libc::sigaddset(&mut set, s);
            }
            set
        }
    }

    /// The next of `signals()` within `timeout`, if any.
    fn next_signal(set: &libc::sigset_t, timeout: Duration) -> Option<i32> {
        let ts = libc::timespec {
            tv_sec: timeout.as_secs() as libc::time_t,
            tv_nsec: timeout.subsec_nanos() as libc::c_long,
        };
        // SAFETY: `set` and `ts` are valid for the call; no siginfo is asked for.
        let s = unsafe { libc::sigtimedwait(set, std::ptr::null_mut(), &ts) };
        (s > 0).then_some(s)
    }

    fn on_signal(sig: i32) -> bool {
        match sig {
            libc::SIGUSR1 => {
                let mut hold = lock_hold();
                if *hold == Hold::Idle {
                    *hold = Hold::Armed;
                    ARMED.store(true, Ordering::Relaxed);
                    println!("SIGUSR1: the next request will wait inside the handler");
                }
            }
            libc::SIGUSR2 => {
                let mut hold = lock_hold();
                match *hold {
                    Hold::Waiting => {
                        *hold = Hold::Released;
                        HOLD_CV.notify_all();
                    }
                    Hold::Armed => {
                        *hold = Hold::Idle;
                        ARMED.store(false, Ordering::Relaxed);
                    }
                    Hold::Idle | Hold::Released => {}
                }
            }
            _ => return false,
        }
        true
    }

    pub fn run(seconds: u64, set: libc::sigset_t) -> i32 {
        let p = Process::init(Config {
            log_stderr: true,
            ..Config::default()
        });
        let server = match p.serve(ServeOptions::default()) {
            Ok(s) => s,
            Err(e) => {
                eprintln!("klp-demo: cannot serve klp's control socket: {e}");
                return 1;
            }
        };
        println!(
            "klp-demo {}: serving requests on 4 threads (SIGUSR1 holds the next request inside the handler, SIGUSR2 lets it go on, SIGTERM stops)",
            std::process::id()
        );
        let mut workers = Vec::new();
        for i in 0..4u64 {
            let w = std::thread::Builder::new()
                .name(format!("worker{}", i + 1))
                .spawn(move || {
                    let mut req = i;
                    while !STOP.load(Ordering::Relaxed) {
                        let v = klp_demo_handle(req) as usize;
                        if let Some(c) = COUNTS.get(v) {
                            c.fetch_add(1, Ordering::Relaxed);
                        }
                        req += 4;
                        std::thread::sleep(Duration::from_micros(200));
                    }
                });
            match w {
                Ok(w) => workers.push(w),
                Err(e) => {
                    eprintln!("klp-demo: cannot start a worker thread: {e}");
                    STOP.store(true, Ordering::Relaxed);
                    break;
                }
            }
        }
        let end = Instant::now() + Duration::from_secs(seconds);
        let mut next = Instant::now() + PERIOD;
        while !STOP.load(Ordering::Relaxed) {
            let now = Instant::now();
            if now >= end {
                break;
            }
            if now >= next {
                report();
                next += PERIOD;
                continue;
            }
            if let Some(sig) = next_signal(&set, next - now)
                && !on_signal(sig)
            {
                break;
            }
        }
        STOP.store(true, Ordering::Relaxed);
        // A held request must not keep its worker from ending.
        on_signal(libc::SIGUSR2);
        for w in workers {
            let _ = w.join();
        }
        drop(server);
        println!("klp-demo: stopped");
        0
    }
}

fn main() {
    let seconds = match std::env::args().nth(1).map(|s| s.parse::<u64>()) {
        None => 600,
        Some(Ok(s)) => s,
        Some(Err(_)) => {
            eprintln!("usage: klp-demo [SECONDS]");
            std::process::exit(2);
        }
    };
    // Blocked before any thread exists, so that every thread inherits the mask and the
    // signals reach the main thread's `sigtimedwait` only.
    let set = demo::signals();
    // SAFETY: `set` is an initialised signal set; no old mask is asked for.
    unsafe { libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) };
    // The main thread is not created by `pthread_create`: make this its outermost
    // walkable frame, so that its stack checks are complete.
    let code = klp_user::thread::run_as_task(move || demo::run(seconds, set));
    std::process::exit(code);
}
