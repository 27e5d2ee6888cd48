//! The loader's warnings about inlined functions (`loader/inlined.rs`, klp-inline), on a
//! patch file loaded into this process: a function that no caller inlined gives no
//! warning, through the whole load (the program read from `/proc/self/exe`, analysed,
//! and the analysis kept for the next load).
//!
//! A patch of a function that *is* inlined needs such a target in this executable,
//! with a patch site (built by build.rs with the patchable-entry flags, as
//! tests/c/loadee.c is); the positive case is checked by the loader's unit test on a
//! Rust function of the unit-test program, and by klp-inline's tests on gcc output.

use std::path::PathBuf;
use std::time::{Duration, Instant};

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

/// tests/c/loadfix.o converted against this executable and libklploadlib.so (its
/// other replacement's symbols), as `dir/name.klp.o`.
fn convert(name: &str) -> PathBuf {
    let fix = std::fs::read(env!("KLP_LOADFIX_O")).expect("loadfix.o");
    let exe = std::fs::read("/proc/self/exe").expect("own executable");
    let lib = std::fs::read(env!("KLP_LOADLIB_SO")).expect("libklploadlib.so");
    let targets = [
        klp_convert::TargetInput {
            name: "vmlinux".into(),
            file: "/proc/self/exe".into(),
            data: &exe,
        },
        klp_convert::TargetInput {
            name: "libklploadlib".into(),
            file: env!("KLP_LOADLIB_SO").into(),
            data: &lib,
        },
    ];
    let m = klp_convert::Manifest::from_json(MANIFEST).expect("manifest");
    let out = klp_convert::convert(
        "loadfix.o",
        &fix,
        &targets,
        &m,
        &klp_convert::Options::default(),
    )
    .expect("klp-convert");
    let d = std::env::temp_dir().join(format!("klp-inlined-{}", std::process::id()));
    std::fs::create_dir_all(&d).expect("temp dir");
    let path = d.join(format!("{name}.klp.o"));
    std::fs::write(&path, out.data).expect("write patch file");
    path
}

fn wait(p: &Process) {
    assert!(
        p.wait_transition(Duration::from_secs(20)),
        "transition ends"
    );
}

#[test]
fn a_function_nobody_inlined_gives_no_warning() {
    let p = Process::init(Config::default());
    // SAFETY: as above (keeps the static helper referenced).
    assert_eq!(unsafe { klp_loadee_helper_ref(1) }, 10);
    let path = convert("noinline");
    assert_eq!(compute(1), 2, "the bug");
    for round in 0..2 {
        let t = Instant::now();
        let loaded = p
            .load_file(&path, &LoadOptions::default())
            .unwrap_or_else(|e| panic!("load: {e}\nlog: {:?}", p.log().0));
        println!("load {round}: {:?}", t.elapsed());
        assert_eq!(loaded.name, "noinline");
        assert_eq!(loaded.warnings, Vec::<String>::new());
        wait(p);
        assert_eq!(compute(1), 12, "the fix runs");
        p.disable("noinline").expect("disable");
        wait(p);
        p.run_due_work();
        p.unload("noinline").expect("unload");
        assert_eq!(compute(1), 2, "reverted");
    }
    let _ = std::fs::remove_file(&path);
}
