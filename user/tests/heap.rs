//! Load, enable, disable and unload of a patch file, hundreds of times in one process:
//! the heap klp uses must not grow with the cycles (a leak per load or per transition
//! would, without bound, in a program patched for months). The log ring is kept small
//! here, so that its filling is not counted.

#[path = "common/scratch.rs"]
mod scratch;

use std::path::PathBuf;
use std::time::Duration;

mod common;
#[path = "common/loadfix.rs"]
mod loadfix;

use klp_user::loader::LoadOptions;
use klp_user::{Config, Process};

unsafe extern "C" {
    fn klp_loadee_compute(x: i32) -> i32;
    fn klp_loadee_helper_ref(x: i32) -> i32;
}

fn compute(x: i32) -> i32 {
    // SAFETY: a plain C function of tests/c/loadee.c, linked into this executable.
    unsafe { klp_loadee_compute(x) }
}

const MANIFEST: &str = r#"{
  "patch": { "objects": [ { "object": "vmlinux",
     "funcs": [ { "old": "klp_loadee_compute", "new": "klp_loadee_compute_fixed" } ] } ] }
}"#;

fn convert() -> PathBuf {
    let d = scratch::scratch_dir("klp-heap");
    loadfix::convert_loadfix(MANIFEST, &klp_convert::Options::default(), &d, "heapfix")
}

/// The bytes the allocator has handed out and not got back (every arena).
fn in_use() -> usize {
    // SAFETY: `malloc_trim` and `mallinfo2` have no preconditions.
    unsafe {
        libc::malloc_trim(0);
        let mi = libc::mallinfo2();
        mi.uordblks + mi.hblkhd
    }
}

fn cycle(p: &'static Process, path: &std::path::Path) {
    p.load_file(path, &LoadOptions::default())
        .unwrap_or_else(|e| panic!("load: {e}\nlog: {:?}", p.log().0));
    assert!(p.wait_transition(Duration::from_secs(20)));
    assert_eq!(compute(1), 12, "the fix runs");
    p.disable("heapfix").expect("disable");
    assert!(p.wait_transition(Duration::from_secs(20)));
    p.run_due_work();
    p.unload("heapfix").expect("unload");
    assert_eq!(compute(1), 2, "reverted");
}

/// The measurement proper: run in a child process started with the per-thread caches
/// of glibc's allocator turned off (`GLIBC_TUNABLES=glibc.malloc.tcache_count=0`):
/// `mallinfo2` counts the chunks a thread's cache keeps as in use, and those caches
/// fill up over the first hundreds of cycles (seen: +161 KiB over 600 cycles with them,
/// +192 bytes over 200 without), which would hide a small leak or fake a large one.
fn measure() {
    let p = Process::init(Config {
        log_capacity: 8,
        ..Config::default()
    });
    // SAFETY: as `compute` (keeps the static helper referenced).
    assert_eq!(unsafe { klp_loadee_helper_ref(1) }, 10);
    let path = convert();
    // Warm-up: caches (the analysis of this executable, the symbol index), the log
    // ring, the allocator's own structures.
    for _ in 0..10 {
        cycle(p, &path);
    }
    let n = if std::env::var("KLP_TEST_RUNNER").is_ok_and(|r| !r.trim().is_empty()) {
        30
    } else {
        100
    };
    let before = in_use();
    for _ in 0..n {
        cycle(p, &path);
    }
    let after = in_use();
    let per = (after as f64 - before as f64) / n as f64;
    eprintln!("heap in use: {before} -> {after} bytes over {n} cycles ({per:.1} bytes a cycle)");
    // A leak of the smallest chunk (32 bytes) per cycle fails.
    assert!(per < 16.0, "the heap grows by {per:.1} bytes a load cycle");
}

#[test]
#[cfg_attr(
    klp_sanitizer,
    ignore = "the sanitizers' allocators are not glibc's: mallinfo2 does not see them"
)]
fn load_cycles_do_not_grow_the_heap() {
    if std::env::var_os("KLP_HEAP_CHILD").is_some() {
        measure();
        return;
    }
    let exe = std::env::current_exe().expect("own path");
    let out = common::bin_command(&exe.display().to_string())
        .args([
            "--exact",
            "load_cycles_do_not_grow_the_heap",
            "--nocapture",
            "--test-threads",
            "1",
        ])
        .env("KLP_HEAP_CHILD", "1")
        .env("GLIBC_TUNABLES", "glibc.malloc.tcache_count=0")
        .output()
        .expect("run the measurement");
    let err = String::from_utf8_lossy(&out.stderr);
    eprint!("{err}");
    assert!(out.status.success(), "the measurement failed: {out:?}");
    assert!(err.contains("heap in use:"), "the measurement ran: {err}");
}
