//! `rsprog`: the Rust program of `ci/patchfile`, live-patched from a patch file.
//!
//! A Rust program becomes live-patchable by linking klp-user and calling
//! [`Process::init`] and [`Process::serve`] at its start (libklp.so is for C
//! programs); the functions a patch may replace are declared with
//! [`klp_user::patchable!`], which gives them a patch site and a C name. Nothing else
//! is special: the fix (`user/tests/patchfile/fix_rs.c`) calls [`square`] and reads
//! [`BIAS`] and [`COMPUTED`], ordinary items of this program that it does not export —
//! their names are mangled (`nm` shows them, e.g. `_ZN6rsprog6square17h…E`) and the
//! patch names them so; klp-convert makes them `.klp.sym.vmlinux.<mangled name>,0`.
//!
//! Four worker threads keep calling [`rsprog_compute`], with a safe point
//! ([`klp_user::safe_point`]) at the head of their loop; the main thread prints one
//! line every 200 ms with each worker's last result, like `prog.c`:
//!
//! ```text
//! tick 12: compute 1 4 9 16; computed 80; bias 100
//! ```
//!
//! The bug: `rsprog_compute` leaves out the bias (the results should be 101 104 109
//! 116; `PROG_BIAS` sets another bias).
//!
//! ```text
//! rsprog [SECONDS]      stops by itself after SECONDS (default 600), or on SIGTERM/SIGINT
//! ```
//!
//! Build it with frame pointers, as `ci/patchfile` does: `cargo rustc -p klp-user
//! --example rsprog -- -C force-frame-pointers=yes` (s390x also `-C
//! target-feature=+backchain`).

use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use klp_user::ctl::ServeOptions;
use klp_user::{Config, Process};

/// What every result must include.
static BIAS: AtomicI64 = AtomicI64::new(100);
/// Computations since the last report.
static COMPUTED: AtomicU64 = AtomicU64::new(0);
static RESULTS: [AtomicI64; 4] = [const { AtomicI64::new(0) }; 4];
static STOP: AtomicBool = AtomicBool::new(false);

/// A helper of the program, called by the fix too. `extern "C"` gives it C's calling
/// convention (a C fix calls it); its name stays a mangled Rust name, and it is not
/// exported.
#[inline(never)]
extern "C" fn square(x: i64) -> i64 {
    x * x
}

klp_user::patchable! {
    /// The bug: the bias is left out.
    pub fn rsprog_compute(x: i64) -> i64 {
        COMPUTED.fetch_add(1, Ordering::Relaxed);
        square(x)
    }
}

/// SIGTERM and SIGINT, blocked in every thread and taken by the main thread.
fn stop_signals() -> libc::sigset_t {
    // SAFETY: `sigemptyset`/`sigaddset` initialise and fill the set they are given.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGTERM);
        libc::sigaddset(&mut set, libc::SIGINT);
        set
    }
}

/// Waits `d` for one of `set`: true if it came.
fn signalled(set: &libc::sigset_t, d: Duration) -> bool {
    let ts = libc::timespec {
        tv_sec: d.as_secs() as libc::time_t,
        tv_nsec: d.subsec_nanos() as libc::c_long,
    };
    // SAFETY: `set` and `ts` are valid for the call; no siginfo is asked for.
    unsafe { libc::sigtimedwait(set, std::ptr::null_mut(), &ts) > 0 }
}

fn run(seconds: u64, set: libc::sigset_t) -> i32 {
    let p = Process::init(Config::default());
    let server = match p.serve(ServeOptions::default()) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("rsprog: cannot serve klp's control socket: {e}");
            return 1;
        }
    };
    if let Some(b) = std::env::var("PROG_BIAS").ok().and_then(|b| b.parse().ok()) {
        BIAS.store(b, Ordering::Relaxed);
    }
    let mut workers = Vec::new();
    for (i, result) in RESULTS.iter().enumerate() {
        let w = std::thread::Builder::new()
            .name(format!("worker{}", i + 1))
            .spawn(move || {
                while !STOP.load(Ordering::Relaxed) {
                    // The loop's head runs no replaceable function: a transition
                    // switches the thread here (README: long-running loops call it).
                    // Without it, a stack check may find a stale copy of a return
                    // address into `rsprog_compute` or its replacement in a frame the
                    // thread reuses (the trampoline's word on s390x, a link register
                    // save slot on ppc64le) and keep the thread waiting.
                    klp_user::safe_point();
                    result.store(rsprog_compute(i as i64 + 1), Ordering::Relaxed);
                    std::thread::sleep(Duration::from_millis(10));
                }
            });
        match w {
            Ok(w) => workers.push(w),
            Err(e) => {
                eprintln!("rsprog: cannot start a worker thread: {e}");
                STOP.store(true, Ordering::Relaxed);
                break;
            }
        }
    }
    println!("rsprog {}: {} workers", std::process::id(), workers.len());
    let end = Instant::now() + Duration::from_secs(seconds);
    let mut tick = 0u64;
    while !STOP.load(Ordering::Relaxed) && Instant::now() < end {
        if signalled(&set, Duration::from_millis(200)) {
            break;
        }
        let r: [i64; 4] = core::array::from_fn(|i| RESULTS[i].load(Ordering::Relaxed));
        println!(
            "tick {tick}: compute {} {} {} {}; computed {}; bias {}",
            r[0],
            r[1],
            r[2],
            r[3],
            COMPUTED.swap(0, Ordering::Relaxed),
            BIAS.load(Ordering::Relaxed)
        );
        tick += 1;
    }
    STOP.store(true, Ordering::Relaxed);
    for w in workers {
        let _ = w.join();
    }
    drop(server);
    0
}

fn main() {
    let seconds = match std::env::args().nth(1).map(|s| s.parse::<u64>()) {
        None => 600,
        Some(Ok(s)) => s,
        Some(Err(_)) => {
            eprintln!("usage: rsprog [SECONDS]");
            std::process::exit(2);
        }
    };
    // Blocked before any thread exists: every thread inherits the mask, and the main
    // thread takes the signals in `signalled`.
    let set = stop_signals();
    // SAFETY: `set` is an initialised signal set; no old mask is asked for.
    unsafe { libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) };
    // The main thread is not created by `pthread_create`: this is its outermost
    // walkable frame, so that its stack checks are complete.
    let code = klp_user::thread::run_as_task(move || run(seconds, set));
    std::process::exit(code);
}
