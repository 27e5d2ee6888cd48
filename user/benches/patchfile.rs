//! Costs of live patching this process from a patch file with the real `klpctl`, each
//! against a baseline measured in the same run (see BENCHMARKS.md, "Patch files"):
//!
//! * `load/N threads`: `klpctl --pid <this process> load <file>` until it exits with
//!   "patching complete" (it waits for the transition's end), with 1, 100 and 1000
//!   idle registered threads (sleeping in `idle_wait`), vs a bare signal round trip to
//!   each of those threads, one after the other (signal, wait for the handler's
//!   acknowledgement: the baseline of `benches/redirect.rs`'s `threads`). The file is
//!   `tests/c/loadfix.o` converted by klp-convert against this executable
//!   (`klp_loadee_compute` → `klp_loadee_compute_fixed`, `tests/c/loadee.c` is linked
//!   into the benches), written once. The process serves its control socket as a
//!   preloaded program does (scan-only stack checks, the default socket path). Between
//!   iterations the patch is disabled and unloaded through the library (not timed).
//!   Two informational rows split the load: `klpctl --pid <this process> list` (the
//!   client's own start, connection and one request) and `Process::load_file` called
//!   in the process (reading, linking and enabling the file, and the first completion
//!   attempt, which completes the transition of idle threads);
//! * `steady`: once the file's patch is complete, a call of `klp_loadee_compute`
//!   through a non-inlined caller (`call_patched`: the call site as the compiler emits
//!   it, retargeted to the replacement on x86_64) vs the same-shaped caller calling
//!   `klp_loadee_compute_fixed` (`call_replacement`). The replacement lives in the
//!   loaded patch image, which no link editor sees: its address comes from the symbol
//!   index (`[patch klpbench]`), and the baseline calls it through a static (`call
//!   *slot(%rip)`, the form of an unrelaxed GOT call) — the replacement's own code,
//!   reached by an indirect call where the contender has a direct one.
//!
//! `cargo bench -p klp-user --bench patchfile` (about 3 minutes).

use std::hint::black_box;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use criterion::{Criterion, criterion_group};

#[path = "common/idle.rs"]
mod idle;
#[path = "../tests/common/loadfix.rs"]
mod loadfix;
use idle::{Idle, THREADS, process};
use klp_user::ctl::ServeOptions;
use klp_user::loader::LoadOptions;
use klp_user::{Process, SiteKind};

unsafe extern "C" {
    fn klp_loadee_compute(x: i32) -> i32;
    fn klp_loadee_helper_ref(x: i32) -> i32;
}

/// The patch's name (the file's stem).
const NAME: &str = "klpbench";
const KLPCTL: &str = env!("CARGO_BIN_EXE_klpctl");

fn compute(x: i32) -> i32 {
    // SAFETY: a plain C function of tests/c/loadee.c, linked into this executable.
    unsafe { klp_loadee_compute(x) }
}

/// A call site of the patched function, as a caller compiles it (retargeted to the
/// replacement in the steady state on x86_64).
#[inline(never)]
fn call_patched(x: i32) -> i32 {
    // SAFETY: as in `compute`.
    unsafe { klp_loadee_compute(x) }
}

/// The address of `klp_loadee_compute_fixed` in the loaded patch image.
static FIXED: AtomicUsize = AtomicUsize::new(0);

/// The same caller shape calling the replacement (through [`FIXED`]: it cannot be
/// linked against).
#[inline(never)]
fn call_replacement(x: i32) -> i32 {
    let a = FIXED.load(Ordering::Relaxed);
    // SAFETY: `FIXED` holds the address of `int klp_loadee_compute_fixed(int)` of the
    // loaded patch image while the steady-state group runs (set and checked there).
    let f: extern "C" fn(i32) -> i32 = unsafe { std::mem::transmute(a) };
    f(x)
}

/// tests/c/loadfix.o converted against this executable (and libklploadlib.so, as in
/// tests/loader.rs), written to `dir`.
fn patch_file(dir: &Path) -> PathBuf {
    const MANIFEST: &str = r#"{
      "patch": { "objects": [ { "object": "vmlinux",
         "funcs": [ { "old": "klp_loadee_compute", "new": "klp_loadee_compute_fixed" } ] } ] }
    }"#;
    loadfix::convert_loadfix(MANIFEST, &klp_convert::Options::default(), dir, NAME)
}

/// `klpctl --pid <us> <args>`, which must exit with 0.
fn klpctl(args: &[&str]) {
    let pid = std::process::id().to_string();
    let o = Command::new(KLPCTL)
        .args(["--pid", &pid])
        .args(args)
        .output()
        .expect("run klpctl");
    assert!(
        o.status.success(),
        "klpctl {args:?}: {:?}\n{}{}",
        o.status,
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
}

/// `klpctl load` of `file` (the callers check that the fix runs).
fn load(file: &Path) {
    klpctl(&["load", &file.display().to_string()]);
}

/// Disables and unloads the patch through the library; the bug is back.
fn unload(p: &Process) {
    p.disable(NAME).expect("disable");
    assert!(
        p.wait_transition(Duration::from_secs(20)),
        "the unpatching transition ends"
    );
    let start = Instant::now();
    loop {
        p.run_due_work();
        match p.unload(NAME) {
            Ok(()) => break,
            Err(e) if start.elapsed() < Duration::from_secs(20) => {
                let _ = e;
                std::thread::sleep(Duration::from_millis(1));
            }
            Err(e) => panic!("unload: {e}"),
        }
    }
    assert_eq!(compute(1), 2, "reverted");
}

fn steady(c: &mut Criterion, p: &Process, file: &Path) {
    load(file);
    assert_eq!(compute(1), 12, "the fix runs after klpctl load");
    let f = klp_loadee_compute as *const () as u64;
    let idx = p.symbols();
    let fixed = idx.candidates(Some(&format!("[patch {NAME}]")), "klp_loadee_compute_fixed");
    assert_eq!(fixed.len(), 1, "the replacement is indexed: {fixed:?}");
    assert_eq!(
        p.site_state(f),
        Some(SiteKind::Jump(fixed[0])),
        "steady state"
    );
    FIXED.store(fixed[0] as usize, Ordering::Relaxed);
    assert_eq!(call_replacement(1), 12);
    assert_eq!(call_patched(1), 12);
    idle::assert_retargeted(p, f, "call_patched");
    let mut g = c.benchmark_group("steady");
    g.bench_function("call of the replacement (same caller, its address)", |b| {
        b.iter(|| call_replacement(black_box(1)))
    });
    g.bench_function("patched call (from the file)", |b| {
        b.iter(|| call_patched(black_box(1)))
    });
    g.finish();
    FIXED.store(0, Ordering::Relaxed);
    unload(p);
}

/// `iters` times: `load` timed, then (not timed) a check that the fix runs and the
/// patch's unload.
fn loaded_and_unloaded(p: &Process, iters: u64, mut load: impl FnMut()) -> Duration {
    let mut total = Duration::ZERO;
    for _ in 0..iters {
        let t0 = Instant::now();
        load();
        total += t0.elapsed();
        assert_eq!(compute(1), 12, "the fix runs");
        unload(p);
    }
    total
}

fn threads(c: &mut Criterion, p: &'static Process, file: &Path) {
    idle::install_ack_handler();
    let mut idle = Idle::new();
    for n in [1, 100, THREADS] {
        idle.grow(n);
        let tids = idle.tids.clone();
        let mut g = c.benchmark_group(format!("load/{n} threads"));
        g.sample_size(10)
            .warm_up_time(Duration::from_secs(2))
            .measurement_time(Duration::from_secs(5));
        g.bench_function("bare signal round trip to each thread", |b| {
            b.iter_custom(|iters| {
                let t0 = Instant::now();
                for _ in 0..iters {
                    for (i, t) in tids.iter().enumerate() {
                        idle::round_trip(i, *t);
                    }
                }
                t0.elapsed()
            })
        });
        g.bench_function("klpctl load until patching complete", |b| {
            b.iter_custom(|iters| loaded_and_unloaded(p, iters, || load(file)))
        });
        g.bench_function("(info) klpctl list", |b| b.iter(|| klpctl(&["list"])));
        g.bench_function("(info) Process::load_file in the process", |b| {
            b.iter_custom(|iters| {
                loaded_and_unloaded(p, iters, || {
                    p.load_file(file, &LoadOptions::default())
                        .unwrap_or_else(|e| panic!("load_file: {e}"));
                    assert!(
                        p.wait_transition(Duration::from_secs(20)),
                        "transition ends"
                    );
                })
            })
        });
        g.finish();
    }
    idle.stop();
}

fn benches(c: &mut Criterion) {
    let p = process();
    klp_user::thread::register_current();
    // SAFETY: as in `compute` (keeps the static helper the fix calls referenced).
    assert_eq!(unsafe { klp_loadee_helper_ref(1) }, 10);
    assert_eq!(compute(1), 2, "the bug");
    let dir = std::env::temp_dir().join(format!("klp-bench-patchfile-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let file = patch_file(&dir);
    let server = p.serve(ServeOptions::default()).expect("serve the socket");
    steady(c, p, &file);
    threads(c, p, &file);
    drop(server);
    let _ = std::fs::remove_dir_all(&dir);
}

criterion_group!(group, benches);

/// `criterion_main!`, run as the main thread's outermost walkable frame so that stack
/// checks of this thread are complete (the main thread is not created by
/// `pthread_create`).
fn main() {
    klp_user::thread::run_as_task(|| {
        group();
        Criterion::default().configure_from_args().final_summary();
    });
}
