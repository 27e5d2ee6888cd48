//! Costs of live patching a running process, each against a baseline measured in the
//! same run (see BENCHMARKS.md):
//!
//! * `steady`: a call of a patched function once its transition is complete vs a
//!   direct call of the replacement (x86_64: the call site itself was retargeted to the
//!   replacement); and the same through a function pointer, which still enters the
//!   function's site (a direct jump) vs the replacement through a pointer;
//! * `transition`: a call of a patched function while a transition runs (the site
//!   calls the entry trampoline, which decides for the calling thread) vs a call of an
//!   unpatched `patchable!` function (its site is a nop);
//! * `threads`: the time to patch (enable + complete the transition) with 1000 idle
//!   threads vs a bare signal round trip to each of those threads, one after the other
//!   (signal, wait for the handler's acknowledgement).
//!
//! `cargo bench -p klp-user --bench redirect`.

use std::hint::black_box;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use criterion::{Criterion, criterion_group};

#[path = "common/idle.rs"]
mod idle;
use idle::{Idle, THREADS, process};
use klp::{FuncDesc, ObjectDesc, PatchDesc};
use klp_user::{Process, ProcessHost, SiteKind};

/// Set while a thread must stay parked inside [`klp_bench_trans`].
static PARK: AtomicBool = AtomicBool::new(false);
static PARKED: AtomicBool = AtomicBool::new(false);

fn park_here() {
    PARKED.store(true, Ordering::Release);
    while PARK.load(Ordering::Acquire) {
        std::thread::sleep(Duration::from_millis(1));
    }
}

klp_user::patchable! {
    /// Patched; measured in the steady state.
    pub fn klp_bench_steady(x: u64) -> u64 {
        x.wrapping_add(1)
    }
}

klp_user::patchable! {
    /// Never patched: the baseline of a call through a nop site.
    pub fn klp_bench_plain(x: u64) -> u64 {
        if x == u64::MAX && PARK.load(Ordering::Relaxed) {
            park_here();
        }
        x.wrapping_add(1)
    }
}

klp_user::patchable! {
    /// Patched; measured while a thread parked inside it holds the transition open.
    pub fn klp_bench_trans(x: u64) -> u64 {
        if x == u64::MAX && PARK.load(Ordering::Relaxed) {
            park_here();
        }
        x.wrapping_add(1)
    }
}

klp_user::patchable! {
    /// Patched with 1000 idle threads around.
    pub fn klp_bench_idle(x: u64) -> u64 {
        x.wrapping_add(1)
    }
}

/// The replacement of every patched function.
#[inline(never)]
extern "C" fn bench_v2(x: u64) -> u64 {
    x.wrapping_add(2)
}

/// A call site of the replacement: the baseline of [`call_patched`], same shape.
#[inline(never)]
fn call_replacement(x: u64) -> u64 {
    bench_v2(x)
}

/// A call site of the patched function, as a caller compiles it (through the GOT in
/// a position-independent executable; retargeted in the steady state on x86_64). A
/// call written straight into the measuring loop would not show it: the compiler
/// loads the function's address once before the loop and calls the register, which
/// is a function pointer (measured separately).
#[inline(never)]
fn call_patched(x: u64) -> u64 {
    klp_bench_steady(x)
}

fn addr(f: *const ()) -> u64 {
    f as u64
}

fn patch(name: &str, func: &str, to: u64) -> PatchDesc<ProcessHost> {
    PatchDesc::new(name).object(ObjectDesc::vmlinux().func(FuncDesc::new(func, to)))
}

/// Enables `desc` and drives its transition to the end without the worker's 1 s
/// pauses (forcing if some stale word keeps a check from passing for 5 s).
fn complete(p: &Process, desc: PatchDesc<ProcessHost>) {
    let name = desc.module.clone();
    p.enable_patch(desc).expect("enable");
    finish(p, &name);
}

fn finish(p: &Process, name: &str) {
    let start = Instant::now();
    let mut forced = false;
    while let Some(st) = p.status() {
        if start.elapsed() > Duration::from_secs(5) && !forced {
            eprintln!("{name}: forcing a transition blocked by {:?}", st.blockers);
            let _ = p.force(name);
            forced = true;
        }
        p.retry_now();
    }
}

fn disable_and_free(p: &Process, name: &str) {
    p.disable(name).expect("disable");
    finish(p, name);
    while p.list().iter().any(|x| x.name == name) {
        p.run_due_work();
        std::thread::sleep(Duration::from_millis(1));
    }
}

fn steady(c: &mut Criterion) {
    let p = process();
    klp_user::thread::register_current();
    let f = addr(klp_bench_steady as *const ());
    let v2 = addr(bench_v2 as *const ());
    complete(p, patch("bench_steady", "klp_bench_steady", v2));
    assert_eq!(p.site_state(f), Some(SiteKind::Jump(v2)), "steady state");
    assert_eq!(klp_bench_steady(1), 3);
    let mut g = c.benchmark_group("steady");
    g.bench_function("direct call of the replacement", |b| {
        b.iter(|| call_replacement(black_box(1)))
    });
    g.bench_function("patched call", |b| b.iter(|| call_patched(black_box(1))));
    let replacement: extern "C" fn(u64) -> u64 = bench_v2;
    let patched: extern "C" fn(u64) -> u64 = klp_bench_steady;
    g.bench_function("replacement through a pointer", |b| {
        b.iter(|| black_box(replacement)(black_box(1)))
    });
    g.bench_function("patched function through a pointer", |b| {
        b.iter(|| black_box(patched)(black_box(1)))
    });
    g.finish();
    idle::assert_retargeted(p, f, "call_patched");
    disable_and_free(p, "bench_steady");
}

fn transition(c: &mut Criterion) {
    let p = process();
    klp_user::thread::register_current();
    PARK.store(true, Ordering::Release);
    let parked = std::thread::spawn(|| klp_bench_trans(u64::MAX));
    while !PARKED.load(Ordering::Acquire) {
        std::thread::yield_now();
    }
    let f = addr(klp_bench_trans as *const ());
    p.enable_patch(patch(
        "bench_trans",
        "klp_bench_trans",
        addr(bench_v2 as *const ()),
    ))
    .expect("enable");
    p.retry_now();
    assert!(
        p.status().is_some(),
        "the parked thread holds the transition"
    );
    assert_eq!(p.site_state(f), Some(SiteKind::Trampoline));
    let mut g = c.benchmark_group("transition");
    g.bench_function("unpatched call", |b| {
        b.iter(|| klp_bench_plain(black_box(1)))
    });
    g.bench_function("patched call in transition", |b| {
        b.iter(|| klp_bench_trans(black_box(1)))
    });
    // The part of it spent in the decision (the wrapper's site is at its entry on
    // x86_64, aarch64 and s390x).
    if !cfg!(klp_arch = "ppc64le") {
        g.bench_function("full decision alone (trampoline path)", |b| {
            b.iter(|| klp_user::redirect::decide_entry(black_box(f)))
        });
    }
    g.finish();
    assert!(p.status().is_some(), "still in transition");
    PARK.store(false, Ordering::Release);
    parked.join().expect("parked thread");
    finish(p, "bench_trans");
    disable_and_free(p, "bench_trans");
}

/// Patch names are never reused: a forced patch keeps its module loaded, as in the
/// kernel.
static ROUND: AtomicU64 = AtomicU64::new(0);

fn threads(c: &mut Criterion) {
    let p = process();
    klp_user::thread::register_current();
    idle::install_ack_handler();
    let mut idle = Idle::new();
    idle.grow(THREADS);
    let tids = idle.tids.clone();
    let to = addr(bench_v2 as *const ());
    let mut g = c.benchmark_group("threads");
    g.sample_size(10);
    g.bench_function("bare signal round trip to each of 1000 threads", |b| {
        b.iter(|| {
            for (i, t) in tids.iter().enumerate() {
                idle::round_trip(i, *t);
            }
        })
    });
    g.bench_function("transition of 1000 idle threads", |b| {
        b.iter_custom(|n| {
            let mut total = Duration::ZERO;
            let first = ROUND.fetch_add(n, Ordering::Relaxed);
            for round in first..first + n {
                let name = format!("bench_idle_{round}");
                let t0 = Instant::now();
                complete(p, patch(&name, "klp_bench_idle", to));
                total += t0.elapsed();
                disable_and_free(p, &name);
            }
            total
        })
    });
    g.finish();
    assert_eq!(klp_bench_idle(1), 2);
    idle.stop();
}

criterion_group!(benches, steady, transition, threads);

/// `criterion_main!`, run as the main thread's outermost walkable frame so that stack
/// checks of this thread are complete (the main thread is not created by
/// `pthread_create`).
fn main() {
    klp_user::thread::run_as_task(|| {
        benches();
        Criterion::default().configure_from_args().final_summary();
    });
}
