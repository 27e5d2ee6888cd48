//! `--patch-callers`: a replaced function that gcc inlined into a caller brings the
//! caller into the description, replaced by the patch's copy of it; a caller the
//! patch does not define, or a target without debug information, is refused.
//!
//! Built with the host's gcc and run natively (like toolchain.rs); the DWARF reading
//! is tested on every architecture's gcc output in klp-inline's own tests.
#![cfg(target_arch = "x86_64")]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn workdir(test: &str) -> PathBuf {
    let d = Path::new(env!("CARGO_TARGET_TMPDIR"))
        .join("klp-convert-callers")
        .join(test);
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn gcc(dir: &Path, args: &[&str]) {
    let o = Command::new("gcc")
        .args(args)
        .current_dir(dir)
        .output()
        .expect("gcc");
    assert!(
        o.status.success(),
        "gcc {args:?}: {}",
        String::from_utf8_lossy(&o.stderr)
    );
}

fn klp_convert(dir: &Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_klp-convert"))
        .args(args)
        .current_dir(dir)
        .output()
        .unwrap()
}

const PROG: &str = r#"
static int counter;
static int compute(int x) { counter++; return x + 1; }      /* inlined at -O2 */
__attribute__((noinline)) int worker(int x) { return compute(x) * 2; }
__attribute__((noinline)) int other_(int x) { return x - 3; }
/* A call through a pointer keeps an out-of-line copy of compute, which a patch replaces. */
int (*volatile fp)(int) = compute;
int main(int argc, char **argv) { (void)argv; return worker(argc) + other_(argc) + fp(argc); }
"#;

/// The fix of `compute`, and a fixed copy of its caller `worker` (it calls the new
/// `compute`, inlined again).
const FIX: &str = r#"
extern int counter;
static int compute_fixed(int x) { counter += 2; return x + 100; }
int compute_new(int x) { return compute_fixed(x); }
int worker(int x) { return compute_fixed(x) * 2; }
"#;

const MANIFEST: &str = r#"{ "patch": { "objects": [ { "object": "vmlinux",
  "funcs": [ { "old": "compute", "new": "compute_new" } ] } ] } }"#;

fn setup(test: &str, debug: bool, fix: &str) -> PathBuf {
    let d = workdir(test);
    std::fs::write(d.join("prog.c"), PROG).unwrap();
    std::fs::write(d.join("fix.c"), fix).unwrap();
    std::fs::write(d.join("fix.json"), MANIFEST).unwrap();
    let mut args = vec!["-O2", "-o", "prog", "prog.c"];
    if debug {
        args.insert(0, "-g");
    }
    gcc(&d, &args);
    gcc(&d, &["-O2", "-fPIC", "-c", "fix.c", "-o", "fix.o"]);
    d
}

#[test]
fn the_callers_that_inlined_a_function_are_replaced_too() {
    let d = setup("added", true, FIX);
    let o = klp_convert(
        &d,
        &[
            "-v",
            "--patch-callers",
            "-t",
            "vmlinux=prog",
            "-m",
            "fix.json",
            "fix.o",
            "-o",
            "out.o",
        ],
    );
    let err = String::from_utf8_lossy(&o.stderr);
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(o.status.success(), "{err}{out}");
    let text = format!("{out}{err}");
    assert!(
        text.contains("'worker' of vmlinux inlines 'compute'"),
        "the note: {text}"
    );
    // The description now replaces worker with the patch's worker.
    let data = std::fs::read(d.join("out.o")).unwrap();
    let obj = klp::elf::PatchObject::parse(&data).unwrap();
    let mut funcs = Vec::new();
    for o in obj.klp_objects().unwrap() {
        let o = o.unwrap();
        for f in obj.klp_funcs(&o) {
            let f = f.unwrap();
            funcs.push((f.old_name.to_string(), f.new_func.symbol.name.to_string()));
        }
    }
    assert_eq!(
        funcs,
        [
            ("compute".to_string(), "compute_new".to_string()),
            ("worker".to_string(), "worker".to_string())
        ]
    );
    assert!(!funcs.iter().any(|f| f.0 == "other_"));

    // Without the option the description is the manifest's alone.
    let o = klp_convert(
        &d,
        &[
            "-t",
            "vmlinux=prog",
            "-m",
            "fix.json",
            "fix.o",
            "-o",
            "plain.o",
        ],
    );
    assert!(o.status.success());
    let data = std::fs::read(d.join("plain.o")).unwrap();
    let obj = klp::elf::PatchObject::parse(&data).unwrap();
    let n: usize = obj
        .klp_objects()
        .unwrap()
        .map(|o| obj.klp_funcs(&o.unwrap()).count())
        .sum();
    assert_eq!(n, 1);
}

#[test]
fn a_caller_the_patch_does_not_define_is_refused() {
    let fix = "extern int counter;\nint compute_new(int x) { counter += 2; return x + 100; }\n";
    let d = setup("missing", true, fix);
    let o = klp_convert(
        &d,
        &[
            "--patch-callers",
            "-t",
            "vmlinux=prog",
            "-m",
            "fix.json",
            "fix.o",
            "-o",
            "out.o",
        ],
    );
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("'compute' is inlined into 'worker', which the patch does not define"),
        "{err}"
    );
    assert!(!d.join("out.o").exists(), "no output on a refusal");
}

#[test]
fn a_target_without_debug_information_is_refused() {
    let d = setup("nodebug", false, FIX);
    let o = klp_convert(
        &d,
        &[
            "--patch-callers",
            "-t",
            "vmlinux=prog",
            "-m",
            "fix.json",
            "fix.o",
            "-o",
            "out.o",
        ],
    );
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("build it with -g"), "{err}");
}
