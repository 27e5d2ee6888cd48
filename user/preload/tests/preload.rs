//! libklp.so in a real program: a small C program built with the x86_64 patch-site
//! flags, linked with `-lklp` for its C API, runs under `LD_PRELOAD=libklp.so`, and the
//! test talks to it through its control socket (`klp_user::ctl::request`).
//!
//! Shown: the main thread (waiting in `pthread_join`) and the program's threads are
//! tasks; a library the program `dlopen`s is announced to the core as a module (the
//! log line `libklp: module 'libtplug' loaded`, on stderr with `KLP_LOG=stderr`);
//! `klp_load_patch` of a missing file is `-ENOENT` and of NULL `-EINVAL`; the program
//! exits normally with its main's status, and removes its socket.
//!
//! Where libklp.so comes from: cargo builds the package's cdylib before its
//! integration tests, next to the `deps/` directory that holds this test's
//! executable (`target/<profile>/libklp.so`); the test finds it from its own path
//! (`std::env::current_exe`), so it works with any `CARGO_TARGET_DIR`. x86_64 only:
//! the C program is built with the host's gcc.
#![cfg(all(target_arch = "x86_64", target_os = "linux"))]

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

const PROG: &str = r#"
#include <dlfcn.h>
#include <errno.h>
#include <pthread.h>
#include <stdio.h>
#include <string.h>
#include <time.h>
#include <unistd.h>
#include "klp.h"

static const char *dir;

static void nap(void) { struct timespec ts = { 0, 20000000 }; nanosleep(&ts, NULL); }

static int exists(const char *name)
{
	char p[4096];
	snprintf(p, sizeof(p), "%s/%s", dir, name);
	return access(p, F_OK) == 0;
}

__attribute__((noinline)) static int work(int x) { return x * 2; }

static void *worker(void *arg)
{
	(void)arg;
	while (!exists("stop"))
		if (work(3) == 6)
			nap();
	return NULL;
}

int main(int argc, char **argv)
{
	pthread_t t[2];
	char lib[4096];
	void *h = NULL;
	int i;

	if (argc < 2)
		return 2;
	dir = argv[1];
	printf("version %s\n", klp_version());
	printf("load missing %d (-ENOENT is %d)\n", klp_load_patch("/nonexistent/fix.klp.o"), -ENOENT);
	printf("load null %d (-EINVAL is %d)\n", klp_load_patch(NULL), -EINVAL);
	printf("disable unknown %d\n", klp_disable("no_such_patch"));
	klp_safe_point();
	for (i = 0; i < 2; i++)
		pthread_create(&t[i], NULL, worker, NULL);
	printf("started %d\n", (int)getpid());
	fflush(stdout);
	while (!exists("open"))
		nap();
	snprintf(lib, sizeof(lib), "%s/libtplug.so", dir);
	h = dlopen(lib, RTLD_NOW);
	printf("dlopen %s\n", h ? "ok" : dlerror());
	fflush(stdout);
	for (i = 0; i < 2; i++)
		pthread_join(t[i], NULL);
	if (h)
		dlclose(h);
	printf("done\n");
	fflush(stdout);
	return 7;
}
"#;

const PLUG: &str = "int tplug(void) { return 42; }\n";

/// The directory of this test's build profile (`target/<profile>`): this executable
/// lives in its `deps/`.
fn profile_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("the test's own path");
    let deps = exe.parent().expect("deps/");
    deps.parent().expect("the profile directory").to_path_buf()
}

/// The `libklp.so` cargo built for this test: the library target is an rlib too, so
/// the integration tests depend on it and it is built before them, in `deps/` (and
/// copied up to the profile directory by a plain `cargo build`).
fn libklp() -> PathBuf {
    let dir = profile_dir();
    let candidates = [dir.join("deps").join("libklp.so"), dir.join("libklp.so")];
    let found = candidates.iter().find(|p| p.is_file()).cloned();
    found.unwrap_or_else(|| {
        panic!(
            "{} is missing: cargo builds it before this test (cargo test -p klp-preload)",
            candidates[0].display()
        )
    })
}

fn gcc(args: &[&str], dir: &Path) {
    let out = Command::new("gcc")
        .args(args)
        .current_dir(dir)
        .output()
        .expect("gcc runs");
    assert!(
        out.status.success(),
        "gcc {args:?} failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

struct Prog {
    child: Child,
    dir: PathBuf,
}

impl Drop for Prog {
    fn drop(&mut self) {
        let _ = std::fs::write(self.dir.join("stop"), "");
        let t0 = Instant::now();
        while t0.elapsed() < Duration::from_secs(5) {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Reads lines of `r` into `lines` until one satisfies `want` (at most `within`).
fn wait_line(
    r: &mut impl BufRead,
    lines: &mut Vec<String>,
    want: impl Fn(&str) -> bool,
    within: Duration,
) -> String {
    let t0 = Instant::now();
    loop {
        let mut l = String::new();
        let n = r.read_line(&mut l).expect("read the program's output");
        assert!(n > 0, "the program ended; its output: {lines:#?}");
        let l = l.trim_end().to_string();
        lines.push(l.clone());
        if want(&l) {
            return l;
        }
        assert!(
            t0.elapsed() < within,
            "not seen in time; output: {lines:#?}"
        );
    }
}

fn ask(sock: &Path, op: &str) -> Value {
    let t0 = Instant::now();
    loop {
        match klp_user::ctl::request(sock, &json!({ "op": op })) {
            Ok(v) => return v,
            Err(e) if t0.elapsed() < Duration::from_secs(20) => {
                let _ = e;
                std::thread::sleep(Duration::from_millis(50));
            }
            Err(e) => panic!("{op} through {}: {e}", sock.display()),
        }
    }
}

#[test]
fn an_unmodified_program_runs_as_tasks_and_its_libraries_as_modules() {
    let lib = libklp();
    let libdir = lib.parent().expect("dir").to_path_buf();
    let include = Path::new(env!("CARGO_MANIFEST_DIR")).join("include");
    let dir = std::env::temp_dir().join(format!("klp-preload-test-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("temp dir");
    std::fs::write(dir.join("prog.c"), PROG).expect("write prog.c");
    std::fs::write(dir.join("tplug.c"), PLUG).expect("write tplug.c");
    let inc = format!("-I{}", include.display());
    let ldir = format!("-L{}", libdir.display());
    let rpath = format!("-Wl,-rpath,{}", libdir.display());
    gcc(
        &[
            "-O2",
            "-Wall",
            "-Werror",
            "-fno-omit-frame-pointer",
            "-fpatchable-function-entry=5",
            &inc,
            "prog.c",
            "-o",
            "prog",
            &ldir,
            &rpath,
            "-lklp",
            "-lpthread",
            "-ldl",
        ],
        &dir,
    );
    gcc(
        &[
            "-O2",
            "-fPIC",
            "-shared",
            "-fpatchable-function-entry=5",
            "tplug.c",
            "-o",
            "libtplug.so",
        ],
        &dir,
    );

    let sock = dir.join("klp.sock");
    let err_path = dir.join("stderr");
    let child = Command::new(dir.join("prog"))
        .arg(&dir)
        .env("LD_PRELOAD", &lib)
        .env("KLP_LOG", "stderr")
        .env("KLP_SOCKET", &sock)
        .stdout(Stdio::piped())
        .stderr(std::fs::File::create(&err_path).expect("stderr file"))
        .spawn()
        .expect("start the program");
    let mut prog = Prog {
        child,
        dir: dir.clone(),
    };
    let mut out = BufReader::new(prog.child.stdout.take().expect("stdout"));
    let mut lines = Vec::new();
    let wait = Duration::from_secs(30);
    let started = wait_line(&mut out, &mut lines, |l| l.starts_with("started "), wait);
    let pid: i64 = started["started ".len()..].parse().expect("pid");
    assert_eq!(pid, i64::from(prog.child.id()));

    // The C API.
    assert!(
        lines.iter().any(|l| l == "load missing -2 (-ENOENT is -2)"),
        "{lines:#?}"
    );
    assert!(
        lines.iter().any(|l| l == "load null -22 (-EINVAL is -22)"),
        "{lines:#?}"
    );
    assert!(
        lines.iter().any(|l| l == "disable unknown -2"),
        "{lines:#?}"
    );
    assert!(
        lines
            .iter()
            .any(|l| l == &format!("version {}", env!("CARGO_PKG_VERSION"))),
        "{lines:#?}"
    );

    // The main thread, waiting in pthread_join, and both workers are tasks; so are
    // klp's own two threads (marked).
    // (klp's worker registers from its own thread: until it has, it shows as a
    // thread still starting, with no tid yet; wait for it.)
    let tid = |t: &Value| t.get("tid").and_then(Value::as_i64).unwrap_or(0);
    let deadline = Instant::now() + Duration::from_secs(20);
    let threads = loop {
        let t = ask(&sock, "threads");
        let starting = t.as_array().is_some_and(|l| l.iter().any(|x| tid(x) == 0));
        if !starting || Instant::now() > deadline {
            break t;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let list = threads.as_array().expect("a thread list");
    let kthread = |t: &Value| t.get("kthread").and_then(Value::as_bool).unwrap_or(true);
    let program: Vec<i64> = list.iter().filter(|t| !kthread(t)).map(tid).collect();
    assert!(
        program.contains(&pid),
        "the main thread is no task: {threads}"
    );
    assert_eq!(program.len(), 3, "main and two workers: {threads}");
    assert_eq!(list.iter().filter(|t| kthread(t)).count(), 2, "{threads}");

    // A library opened with dlopen is a module of the core.
    std::fs::write(dir.join("open"), "").expect("trigger");
    wait_line(&mut out, &mut lines, |l| l.starts_with("dlopen "), wait);
    assert!(lines.iter().any(|l| l == "dlopen ok"), "{lines:#?}");
    let log = std::fs::read_to_string(&err_path).expect("stderr");
    assert!(
        log.lines().any(|l| l == "libklp: module 'libtplug' loaded"),
        "{log}"
    );
    // The control socket still answers after the module arrived.
    assert!(ask(&sock, "list").as_array().is_some_and(Vec::is_empty));

    // Ends normally: main's status, the library announced as gone, the socket removed.
    std::fs::write(dir.join("stop"), "").expect("stop");
    wait_line(&mut out, &mut lines, |l| l == "done", wait);
    let status = prog.child.wait().expect("exit status");
    assert_eq!(status.code(), Some(7), "{lines:#?}");
    let log = std::fs::read_to_string(&err_path).expect("stderr");
    assert!(
        log.lines()
            .any(|l| l == "libklp: module 'libtplug' unloaded"),
        "{log}"
    );
    assert!(!sock.exists(), "the socket is left behind");
    drop(prog);
    let _ = std::fs::remove_dir_all(&dir);
}
