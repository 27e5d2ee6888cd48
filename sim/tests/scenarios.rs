//! The kernel's livepatch selftests (`scenarios/*.klpt`, copied from the spec) and
//! klp's own scenarios (`scenarios/extra/*.klpt`) on the simulated kernel.

use std::path::{Path, PathBuf};
use std::process::Command;

mod common;

use klp_sim::scenario::{Outcome, run_file_in, run_text};
use klp_sim::stackmodel::ArchModel;

fn files(dir: &str) -> Vec<PathBuf> {
    let d = Path::new(env!("CARGO_MANIFEST_DIR")).join(dir);
    let mut v: Vec<PathBuf> = std::fs::read_dir(&d)
        .unwrap_or_else(|e| panic!("{}: {e}", d.display()))
        .map(|e| e.expect("dir entry").path())
        .filter(|p| p.extension().is_some_and(|x| x == "klpt"))
        .collect();
    v.sort();
    v
}

fn run_all(dir: &str, min: usize) {
    // The ELF objects `elf_module` loads, for every back-end, written for this run.
    // (One directory per call: the tests run in parallel and each removes its own.)
    static CALLS: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let n = CALLS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let fixtures =
        std::env::temp_dir().join(format!("klp-sim-fixtures-{}-{n}", std::process::id()));
    common::write_elf_fixtures(&fixtures);
    let fs = files(dir);
    assert!(
        fs.len() >= min,
        "expected at least {min} scenarios in {dir}"
    );
    let mut failed = Vec::new();
    // Stacks read directly, then laid out and walked as on each architecture.
    let models = std::iter::once(None).chain(ArchModel::all().into_iter().map(Some));
    for model in models {
        for f in &fs {
            match run_file_in(f, model, &fixtures) {
                Ok(Outcome::Pass) => {}
                other => failed.push(format!("{} ({model:?}): {other:?}", f.display())),
            }
        }
    }
    let _ = std::fs::remove_dir_all(&fixtures);
    assert!(
        failed.is_empty(),
        "failing scenarios:\n{}",
        failed.join("\n")
    );
}

#[test]
fn shipped_kselftest_scenarios_pass() {
    run_all("tests/scenarios", 19);
}

#[test]
fn klp_extra_scenarios_pass() {
    run_all("tests/scenarios/extra", 16);
}

/// Every shipped scenario, with one expected line changed, fails with a diff that shows
/// both the expected and the actual line.
#[test]
fn altered_expectations_fail_with_a_diff() {
    for f in files("tests/scenarios") {
        let text = std::fs::read_to_string(&f).expect("read");
        let Some(pos) = text.find("\n> ") else {
            continue;
        };
        let mut altered = text.clone();
        altered.insert_str(pos + 3, "CHANGED ");
        match run_text(&altered) {
            Ok(Outcome::Fail(msg)) => {
                assert!(msg.contains("- CHANGED "), "{}: {msg}", f.display());
                assert!(msg.contains("\n+ "), "{}: {msg}", f.display());
            }
            other => panic!("{}: altered scenario did not fail: {other:?}", f.display()),
        }
    }
}

/// A scenario whose command fails its own check (here a wrong sysfs value) fails.
#[test]
fn failing_command_fails_the_scenario() {
    let text = "#! wrong value\n$ load_lp test_klp_livepatch\n$ check_sysfs_value test_klp_livepatch enabled 0\n$ check_result\n";
    match run_text(text) {
        Ok(Outcome::Fail(m)) => assert!(m.contains("Unexpected value"), "{m}"),
        other => panic!("{other:?}"),
    }
}

#[test]
fn malformed_scenarios_are_rejected() {
    assert!(run_text("no title\n").is_err());
    assert!(run_text("#! t\n> stray expectation\n").is_err());
    assert!(run_text("#! t\n$ load_lp \"unterminated\n").is_err());
    assert!(run_text("#! t\nrandom line\n").is_err());
}

#[test]
fn unknown_verbs_and_modules_fail() {
    for text in [
        "#! t\n$ frobnicate\n",
        "#! t\n$ load_lp test_klp_nonexistent\n",
        "#! t\n$ load_mod test_klp_livepatch\n",
        "#! t\n$ load_lp test_klp_callbacks_mod\n",
    ] {
        assert!(matches!(run_text(text), Ok(Outcome::Fail(_))), "{text}");
    }
}

/// The `klp-sim` binary, through the emulator when the tests run under QEMU
/// (`ci/test` sets `KLP_TEST_RUNNER`, e.g. `qemu-s390x -L /usr/s390x-linux-gnu`).
fn klp_sim() -> Command {
    let bin = env!("CARGO_BIN_EXE_klp-sim");
    let runner = std::env::var("KLP_TEST_RUNNER").unwrap_or_default();
    let mut words = runner.split_whitespace();
    match words.next() {
        Some(emu) => {
            let mut c = Command::new(emu);
            c.args(words).arg(bin);
            c
        }
        None => Command::new(bin),
    }
}

/// The binary: PASS and exit 0 on a shipped scenario; FAIL, a diff and a non-zero exit
/// on an altered one.
#[test]
fn binary_reports_pass_and_fail() {
    let good = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/scenarios/livepatch-1.klpt");
    let out = klp_sim().arg("run").arg(&good).output().expect("run");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}");
    assert!(stdout.contains("PASS"), "{stdout}");

    let text = std::fs::read_to_string(&good).expect("read");
    let bad = text.replace("patching complete", "patching completed");
    let dir = std::env::temp_dir().join(format!("klp-sim-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("tmp");
    let badf = dir.join("altered.klpt");
    std::fs::write(&badf, bad).expect("write");
    let out = klp_sim()
        .arg("run")
        .arg(&good)
        .arg(&badf)
        .output()
        .expect("run");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(!out.status.success(), "{stdout}");
    assert!(stdout.contains("FAIL"), "{stdout}");
    assert!(
        stdout.contains("- livepatch: 'test_klp_livepatch': patching completed"),
        "{stdout}"
    );
    assert!(
        stdout.contains("+ livepatch: 'test_klp_livepatch': patching complete"),
        "{stdout}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// The demo runs and shows the live change, the blocking task and the reversal.
#[test]
fn demo_shows_the_live_change() {
    let mut out = Vec::new();
    klp_sim::demo::run(&mut out).expect("demo");
    let s = String::from_utf8(out).expect("utf8");
    for want in [
        "test_klp_livepatch: this has been live patched",
        "blocked: kworker/1:1",
        "sleeping in busymod_work_func (frame #3",
        "livepatch: signaling remaining tasks",
        "reversing transition from patching to unpatching",
        "test_klp_atomic_replace: this has been live patched",
        "MemTotal:",
    ] {
        assert!(s.contains(want), "missing {want:?} in:\n{s}");
    }
}
