//! The control socket and `klpctl`, end to end against a server in this process; the
//! connection diagnoses (no such process, not klp, stale socket); `klpctl inspect`.

mod common;
#[path = "../../klp/tests/common/elfbuild.rs"]
mod elfbuild;
#[path = "common/scratch.rs"]
mod scratch;

use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard, mpsc};
use std::time::Duration;

use klp::{FuncDesc, ObjectDesc, PatchDesc};
use klp_user::ctl::{ErrorKind, ServeOptions, Target, klpctl, request, request_to};
use klp_user::{Process, thread};
use serde_json::{Value, json};

/// The tests that start transitions of this process's core take turns (one
/// transition at a time).
fn serial() -> MutexGuard<'static, ()> {
    static M: Mutex<()> = Mutex::new(());
    M.lock().unwrap_or_else(|e| e.into_inner())
}

fn run(args: &[&str]) -> (i32, String) {
    let v: Vec<String> = args.iter().map(|s| s.to_string()).collect();
    let mut out = String::new();
    let code = klpctl(&v, &mut out);
    (code, out)
}

#[inline(never)]
#[unsafe(no_mangle)]
pub extern "C" fn klp_user_ctl_replacement(x: u64) -> u64 {
    std::hint::black_box(x) + 2
}

fn ctl(path: &Path, args: &[&str]) -> (i32, String) {
    let mut v = vec!["--socket".to_string(), path.display().to_string()];
    v.extend(args.iter().map(|s| s.to_string()));
    let mut out = String::new();
    let code = klpctl(&v, &mut out);
    (code, out)
}

fn dir() -> PathBuf {
    scratch::scratch_dir("klp-user-ctl")
}

/// A process id that no process has (a child that has exited and was reaped).
fn dead_pid() -> u32 {
    let mut c = std::process::Command::new("true")
        .spawn()
        .expect("spawn true");
    let pid = c.id();
    c.wait().expect("wait");
    pid
}

/// A thread that blocks klp's signal until told to pass a safe point and exit.
fn blocker() -> (mpsc::Sender<()>, std::thread::JoinHandle<()>, i32) {
    let (tx, rx) = mpsc::channel::<()>();
    let (tid_tx, tid_rx) = mpsc::channel();
    let h = std::thread::spawn(move || {
        // SAFETY: a zeroed sigset is initialised by sigemptyset; blocking one signal in
        // this thread has no other effect.
        unsafe {
            let mut set: libc::sigset_t = std::mem::zeroed();
            libc::sigemptyset(&mut set);
            libc::sigaddset(&mut set, klp_user::stack::signal_number());
            libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
        }
        tid_tx
            .send(thread::current_record().expect("registered").tid())
            .ok();
        let _ = rx.recv();
        klp_user::safe_point();
    });
    let tid = tid_rx.recv().expect("tid");
    (tx, h, tid)
}

#[test]
fn control_socket_end_to_end() {
    let _s = serial();
    let p = Process::global();
    let path = dir().join("ctl.sock");
    let server = p
        .serve(ServeOptions {
            path: Some(path.clone()),
            allowed_uids: Vec::new(),
            ..ServeOptions::default()
        })
        .expect("serve");
    assert_eq!(server.path(), path.as_path());
    let mode = std::fs::metadata(&path)
        .expect("socket")
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600);

    // Nothing loaded.
    let (c, out) = ctl(&path, &["list"]);
    assert_eq!((c, out.as_str()), (0, "no patches\n"));
    let (c, out) = ctl(&path, &["status"]);
    assert_eq!((c, out.as_str()), (0, "no transition\n"));
    let (c, out) = ctl(&path, &["--json", "status"]);
    assert_eq!((c, out.as_str()), (0, "null\n"));

    // A transition blocked by a thread that cannot be checked.
    let (tx, h, btid) = blocker();
    let d = PatchDesc::new("lp_ctl").object(ObjectDesc::module("libklp_absent").func(
        FuncDesc::new("f", klp_user_ctl_replacement as *const () as u64),
    ));
    p.enable_patch(d).expect("enable");
    let (c, out) = ctl(&path, &["status"]);
    assert_eq!(c, 0, "{out}");
    assert!(out.starts_with("'lp_ctl': patching ["), "{out}");
    // Natively the blocked signal is seen in /proc (`is running`); qemu-user keeps
    // guest signal masks to itself, so there the thread simply does not answer.
    assert!(
        out.contains(&format!(
            ":{btid} is running (does not answer klp's signal)"
        )) || out.contains(&format!(":{btid} has an unreliable stack (NoAnswer)")),
        "{out}"
    );
    let (c, out) = ctl(&path, &["--json", "status"]);
    assert_eq!(c, 0);
    let v: Value = serde_json::from_str(&out).expect("json");
    assert_eq!(v["patch"], "lp_ctl");
    assert_eq!(v["target"], "patching");
    assert!(v["switched"].as_u64() < v["total"].as_u64());
    let b = v["blockers"]
        .as_array()
        .expect("blockers")
        .iter()
        .find(|b| b["tid"] == json!(btid))
        .expect("the blocker is listed");
    assert!(
        b["reason"] == "running" || (b["reason"] == "unreliable" && b["detail"] == "NoAnswer"),
        "{b}"
    );

    let (c, out) = ctl(&path, &["list"]);
    assert_eq!(c, 0);
    assert_eq!(
        out,
        "lp_ctl: enabled, in transition (stack order 1)\n  library libklp_absent: not patched (not loaded)\n    f\n"
    );
    let (c, out) = ctl(&path, &["--json", "list"]);
    assert_eq!(c, 0);
    let v: Value = serde_json::from_str(&out).expect("json");
    assert_eq!(v[0]["name"], "lp_ctl");
    assert_eq!(v[0]["transition"], true);
    assert_eq!(v[0]["objects"][0]["functions"][0], "f,1");

    let (c, out) = ctl(&path, &["--json", "threads"]);
    assert_eq!(c, 0);
    let v: Value = serde_json::from_str(&out).expect("json");
    let t = v
        .as_array()
        .expect("threads")
        .iter()
        .find(|t| t["tid"] == json!(btid))
        .expect("the blocker");
    assert_eq!(
        (t["patch_state"].clone(), t["pending"].clone()),
        (json!(0), json!(true))
    );
    let (c, out) = ctl(&path, &["threads"]);
    assert_eq!(c, 0);
    assert!(
        out.starts_with("TID      STATE      PENDING  NAME\n"),
        "{out}"
    );
    assert!(
        out.contains(&format!("{btid:<8} unpatched  yes      ")),
        "{out}"
    );
    assert!(out.contains("klp-ctl [klp]"), "{out}");

    // Errors are sentences with the errno in brackets.
    let (c, out) = ctl(&path, &["enable", "nope"]);
    assert_eq!(
        (c, out.as_str()),
        (
            1,
            "klpctl: there is no patch 'nope' in this process (-ENOENT): `klpctl list` shows its patches\n"
        )
    );
    let (c, out) = ctl(&path, &["--json", "enable", "nope"]);
    assert_eq!(c, 1);
    let v: Value = serde_json::from_str(&out).expect("json");
    assert_eq!(
        (v["error"]["kind"].clone(), v["error"]["errno"].clone()),
        (json!("errno"), json!(-2))
    );
    let (c, out) = ctl(&path, &["enable", "lp_ctl"]);
    assert_eq!(
        (c, out.as_str()),
        (1, "klpctl: patch 'lp_ctl' is already enabled (-EINVAL)\n")
    );

    // Force the patching transition through the blocker (fields a request does not
    // define are ignored).
    let e = request(&path, &json!({"op": "force", "patch": "lp_ctl", "x": 1}));
    assert!(e.is_ok(), "force the running transition: {e:?}");
    assert!(p.wait_transition(Duration::from_secs(60)));
    let (c, out) = ctl(&path, &["list"]);
    assert_eq!(c, 0);
    // Forcing a patching transition does not mark a non-replace patch (the kernel
    // marks the patch of a forced *unpatching* transition, and the replaced patches).
    assert_eq!(
        out,
        "lp_ctl: enabled (stack order 1)\n  library libklp_absent: not patched (not loaded)\n    f\n"
    );
    let (c, out) = ctl(&path, &["force", "lp_ctl"]);
    assert_eq!(
        (c, out.as_str()),
        (
            1,
            "klpctl: patch 'lp_ctl' is not in transition, there is nothing to force (-EINVAL): `klpctl status` shows the transition\n"
        )
    );

    // Waiting for a transition the blocker holds: one line per change, then the
    // message saying it goes on and how to see or force it, exit status 3.
    let (c, out) = ctl(&path, &["--timeout", "0.5", "disable", "lp_ctl"]);
    assert_eq!(c, 3, "{out}");
    let lines: Vec<&str> = out.lines().collect();
    assert!(
        lines[0].starts_with("'lp_ctl': unpatching ")
            && lines[0].contains("threads switched; waiting for ")
            && lines[0].contains(&format!(":{btid} ")),
        "{out}"
    );
    for w in lines.windows(2) {
        assert_ne!(w[0], w[1], "one line per change: {out}");
    }
    let sock = path.display().to_string();
    let last = lines.last().expect("a line");
    assert!(
        last.starts_with(
            "klpctl: the unpatching transition of 'lp_ctl' is still running after 0.5 s ("
        ) && last.ends_with(&format!(
            " threads switched): `klpctl --socket {sock} status` shows what holds it, \
             `klpctl --socket {sock} force lp_ctl` ends it at once (safe only if the threads \
             it waits for are not in the code being replaced)"
        )),
        "{out}"
    );
    let (c, out) = ctl(&path, &["force", "lp_ctl"]);
    assert_eq!(
        (c, out.as_str()),
        (
            0,
            "forced the transition of 'lp_ctl': every thread has switched\n"
        )
    );
    assert!(p.wait_transition(Duration::from_secs(60)));
    p.run_due_work();
    let (c, out) = ctl(&path, &["list"]);
    assert_eq!((c, out.as_str()), (0, "no patches\n"));
    // Its unpatching was forced: the patch stays held, and unload says why at once.
    let t0 = std::time::Instant::now();
    let (c, out) = ctl(&path, &["unload", "lp_ctl"]);
    assert_eq!(c, 1, "{out}");
    assert!(
        out.starts_with("klpctl: ")
            && out.contains("(-EBUSY)")
            && out.ends_with(
                "; 'lp_ctl' is disabled and still held: a patch whose transition was forced \
                 stays loaded until the process exits\n"
            ),
        "{out}"
    );
    assert!(t0.elapsed() < Duration::from_secs(10), "{:?}", t0.elapsed());
    tx.send(()).ok();
    h.join().expect("blocker");

    // Bad requests, typed.
    let e = request(&path, &json!({"op": "fly"})).expect_err("unknown op");
    assert_eq!(e.kind, ErrorKind::UnknownOp);
    assert!(e.message.contains("load, unload"), "{e:?}");
    let e = request(&path, &json!({"nop": 1})).expect_err("no op");
    assert_eq!(e.kind, ErrorKind::BadRequest);
    let e = request(&path, &json!({"op": "disable"})).expect_err("no patch");
    assert_eq!(e.kind, ErrorKind::BadRequest);
    assert!(e.message.contains("missing field `patch`"), "{e:?}");
    let e = request(&path, &json!("list")).expect_err("not an object");
    assert_eq!(e.kind, ErrorKind::BadRequest);
    let e = request(&path, &json!({"op": "load"})).expect_err("no path");
    assert_eq!(e.kind, ErrorKind::BadRequest);
    assert!(e.message.contains("missing field `path`"), "{e:?}");
    let e = request(
        &path,
        &json!({"op": "load", "path": "/x.ko", "require_signature": "yes"}),
    )
    .expect_err("not a bool");
    assert_eq!(e.kind, ErrorKind::BadRequest);
    let e = request(&path, &json!({"op": "load", "path": "fix.ko"})).expect_err("relative");
    assert_eq!(e.kind, ErrorKind::BadRequest);
    assert!(e.message.contains("is not absolute"), "{e:?}");
    let e = request(
        &path,
        &json!({"op": "load", "path": "/x.ko", "trusted_keys": "keys"}),
    )
    .expect_err("relative keys");
    assert_eq!(e.kind, ErrorKind::BadRequest);
    let e = request(&path, &json!({"op": "unload"})).expect_err("no patch");
    assert_eq!(e.kind, ErrorKind::BadRequest);

    // Loading a file that is not there: the loader's sentence, with -ENOENT.
    let missing = dir().join("missing.ko.klp");
    let e = request(&path, &json!({"op": "load", "path": missing})).expect_err("no file");
    assert_eq!((e.kind, e.errno), (ErrorKind::Errno, Some(-2)), "{e:?}");
    assert!(
        e.message.starts_with(&format!(
            "cannot read the patch file {} (-ENOENT)",
            missing.display()
        )),
        "{e:?}"
    );
    // klpctl checks the file first, with the same sentence.
    let (c, out) = ctl(&path, &["load", &missing.display().to_string()]);
    assert_eq!(
        (c, out.as_str()),
        (
            1,
            format!(
                "klpctl: cannot read the patch file {} (-ENOENT): No such file or directory\n",
                missing.display()
            )
            .as_str()
        )
    );
    // An unload the loader refuses is an errno error with its sentence.
    let e =
        request(&path, &json!({"op": "unload", "patch": "never_loaded"})).expect_err("not loaded");
    assert_eq!(e.kind, ErrorKind::Errno, "{e:?}");
    assert!(e.errno.is_some_and(|n| n < 0), "{e:?}");
    assert!(e.message.contains("(-E"), "{e:?}");
    let (c, out) = ctl(&path, &["unload", "never_loaded"]);
    assert_eq!(c, 1, "{out}");
    assert!(out.starts_with("klpctl: ") && out.contains("(-E"), "{out}");

    // A peer whose uid is not allowed is refused.
    // SAFETY: `geteuid` has no preconditions.
    let me = unsafe { libc::geteuid() };
    let other = dir().join("other.sock");
    let s2 = p
        .serve(ServeOptions {
            path: Some(other.clone()),
            allowed_uids: vec![me.wrapping_add(1)],
            ..ServeOptions::default()
        })
        .expect("serve");
    let e = request(&other, &json!({"op": "list"})).expect_err("refused");
    assert_eq!(e.kind, ErrorKind::Permission);
    assert!(e.message.contains(&format!("uid {me}")), "{e:?}");
    assert!(e.message.contains("(-EACCES)"), "{e:?}");
    drop(s2);
    assert!(!other.exists(), "the socket is removed");

    // A server that loads only from one directory.
    let only = dir().join("only");
    std::fs::create_dir_all(&only).expect("dir");
    let s4_path = dir().join("only.sock");
    let s4 = p
        .serve(ServeOptions {
            path: Some(s4_path.clone()),
            load_dir: Some(only.clone()),
            ..ServeOptions::default()
        })
        .expect("serve");
    let e = request(&s4_path, &json!({"op": "load", "path": "/etc/passwd"})).expect_err("outside");
    assert_eq!(e.kind, ErrorKind::Permission, "{e:?}");
    assert!(
        e.message.contains(&format!("only from {}", only.display())),
        "{e:?}"
    );
    let sneaky = only.join("..").join("missing.ko.klp");
    let e = request(&s4_path, &json!({"op": "load", "path": sneaky})).expect_err("..");
    assert_eq!(e.kind, ErrorKind::Permission, "{e:?}");
    let inside = only.join("missing.ko.klp");
    let e = request(&s4_path, &json!({"op": "load", "path": inside})).expect_err("missing");
    assert_eq!((e.kind, e.errno), (ErrorKind::Errno, Some(-2)), "{e:?}");
    drop(s4);

    // The default socket of this process, found by pid.
    let s3 = p
        .serve(ServeOptions::default())
        .expect("serve the default path");
    assert_eq!(
        s3.path(),
        klp_user::ctl::default_socket_path(std::process::id()).as_path()
    );
    let mut out = String::new();
    let pid = std::process::id().to_string();
    let code = klpctl(&["--pid".into(), pid, "list".into()], &mut out);
    assert_eq!((code, out.as_str()), (0, "no patches\n"));
    drop(s3);

    // The real binary (under QEMU through the emulator: without binfmt_misc a foreign
    // child cannot be started directly; `ci/test` sets `KLP_TEST_RUNNER`).
    {
        let o = common::bin_command(env!("CARGO_BIN_EXE_klpctl"))
            .args(["--socket", &path.display().to_string(), "--json", "list"])
            .output()
            .expect("run klpctl");
        assert!(o.status.success(), "{o:?}");
        assert_eq!(String::from_utf8_lossy(&o.stdout), "[]\n");
        let o = common::bin_command(env!("CARGO_BIN_EXE_klpctl"))
            .args(["--socket", &path.display().to_string(), "disable", "nope"])
            .output()
            .expect("run klpctl");
        assert_eq!(o.status.code(), Some(1));
        assert_eq!(String::from_utf8_lossy(&o.stdout), "");
        assert_eq!(
            String::from_utf8_lossy(&o.stderr),
            "klpctl: there is no patch 'nope' in this process (-ENOENT): `klpctl list` shows its patches\n"
        );
        let o = common::bin_command(env!("CARGO_BIN_EXE_klpctl"))
            .args(["list"])
            .output()
            .expect("run klpctl");
        assert_eq!(o.status.code(), Some(2));
    }
    drop(server);
    assert!(!path.exists());
}

/// Mangled names are shown demangled in `list`, a patch enabled and disabled by
/// klpctl waits for its transitions (here short ones), and `unload` of an enabled
/// patch disables it first.
#[test]
#[cfg_attr(
    klp_tsan,
    ignore = "ThreadSanitizer defers signals: stack checks of other threads see stale contexts or no answer"
)]
fn demangled_names_and_waited_transitions() {
    let _s = serial();
    let p = Process::global();
    let path = dir().join("dm.sock");
    let server = p
        .serve(ServeOptions {
            path: Some(path.clone()),
            ..ServeOptions::default()
        })
        .expect("serve");
    let d = PatchDesc::new("lp_dm").object(
        ObjectDesc::module("libklp_absent")
            .func(FuncDesc::new(
                "_ZN3app6handle17h0123456789abcdefE",
                klp_user_ctl_replacement as *const () as u64,
            ))
            .func(
                FuncDesc::new(
                    "_ZN2ns5parseEPKc",
                    klp_user_ctl_replacement as *const () as u64,
                )
                .sympos(2),
            ),
    );
    p.enable_patch(d).expect("enable");
    assert!(
        p.wait_transition(Duration::from_secs(60)),
        "{:?}",
        p.status()
    );
    let (c, out) = ctl(&path, &["list"]);
    assert_eq!(c, 0);
    assert_eq!(
        out,
        "lp_dm: enabled (stack order 1)\n  library libklp_absent: not patched (not loaded)\n    app::handle\n    ns::parse(char const*) (symbol position 2)\n"
    );
    // JSON keeps the raw names.
    let (c, out) = ctl(&path, &["--json", "list"]);
    assert_eq!(c, 0);
    let v: Value = serde_json::from_str(&out).expect("json");
    assert_eq!(
        v[0]["objects"][0]["functions"][0],
        "_ZN3app6handle17h0123456789abcdefE,1"
    );

    // Disable, waited for: the last line says what happened.
    let (c, out) = ctl(&path, &["disable", "lp_dm"]);
    assert_eq!(c, 0, "{out}");
    assert!(
        out.ends_with("'lp_dm' is disabled: every thread runs the code it replaced\n"),
        "{out}"
    );
    assert!(p.status().is_none());
    p.run_due_work();

    // Unload of an enabled patch disables it first and waits.
    let d = PatchDesc::new("lp_unl").object(ObjectDesc::module("libklp_absent").func(
        FuncDesc::new("g", klp_user_ctl_replacement as *const () as u64),
    ));
    p.enable_patch(d).expect("enable");
    assert!(p.wait_transition(Duration::from_secs(60)));
    let (c, out) = ctl(&path, &["unload", "lp_unl"]);
    assert!(
        out.starts_with("disabling 'lp_unl' before it is unloaded\n"),
        "{out}"
    );
    // The patch was not loaded from a file: the loader refuses it (an errno sentence),
    // but it is disabled.
    assert_eq!(c, 1, "{out}");
    assert!(out.contains("klpctl: ") && out.contains("(-E"), "{out}");
    assert!(p.status().is_none());
    assert!(
        !p.list().iter().any(|x| x.name == "lp_unl" && x.enabled),
        "{:?}",
        p.list()
    );
    p.run_due_work();
    drop(server);
}

/// A socket file nobody listens on is stale: klpctl says so and removes it.
#[test]
fn a_stale_socket_is_removed() {
    let path = dir().join("stale.sock");
    let _ = std::fs::remove_file(&path);
    let l = UnixListener::bind(&path).expect("bind");
    drop(l);
    assert!(path.exists(), "the socket file stays after its listener");
    let (c, out) = ctl(&path, &["list"]);
    assert_eq!(
        (c, out),
        (
            1,
            format!(
                "klpctl: the process does not answer (-ECONNREFUSED): the control socket {} \
                 was stale (nothing listens on it); it has been removed\n",
                path.display()
            )
        )
    );
    assert!(!path.exists(), "removed");

    // By pid: the process is gone and its socket stayed.
    let pid = dead_pid();
    let sock = klp_user::ctl::default_socket_path(pid);
    // An earlier process with this pid may have been killed and left its socket (pids
    // wrap): the path is made free first, as a server does before it binds.
    let _ = std::fs::remove_file(&sock);
    let l = UnixListener::bind(&sock).expect("bind");
    drop(l);
    let e = request_to(&Target::pid(pid), &json!({"op": "list"})).expect_err("stale");
    assert_eq!(e.kind, ErrorKind::NoSuchProcess, "{e:?}");
    assert_eq!(e.errno, Some(-i64::from(libc::ESRCH)));
    assert_eq!(
        e.message,
        format!(
            "there is no process {pid} (-ESRCH): the control socket {} was stale (process \
             {pid} is gone); it has been removed",
            sock.display()
        )
    );
    assert!(!sock.exists(), "removed");
}

/// `--pid` of no process, and of a live process that does not run klp.
#[test]
fn no_such_process_and_not_klp() {
    let pid = dead_pid();
    let (c, out) = run(&["--pid", &pid.to_string(), "status"]);
    assert_eq!(
        (c, out),
        (
            1,
            format!(
                "klpctl: there is no process {pid} (-ESRCH): `pgrep -a NAME` finds a \
                 program's process id\n"
            )
        )
    );
    let mut child = std::process::Command::new("sleep")
        .arg("30")
        .spawn()
        .expect("spawn sleep");
    let pid = child.id();
    let (c, out) = run(&["--pid", &pid.to_string(), "list"]);
    let _ = child.kill();
    let _ = child.wait();
    assert_eq!(
        (c, out),
        (
            1,
            format!(
                "klpctl: process {pid} does not run klp: it has no control socket at {} \
                 (-ENOENT); a program serves one by calling klp_user::Process::serve\n",
                klp_user::ctl::default_socket_path(pid).display()
            )
        )
    );
    let e = request_to(&Target::pid(pid), &json!({"op": "list"})).expect_err("gone now");
    assert_eq!(e.kind, ErrorKind::NoSuchProcess, "{e:?}");
}

/// A patch file (x86_64, klp-build's description): vmlinux with a mangled Rust
/// function at symbol position 2 and a C function, `mymod` with a C++ function and a
/// callback, and livepatch relocations needing symbols of both.
fn patch_file() -> Vec<u8> {
    elfbuild::patch(
        62,
        false,
        1,
        &[
            (
                None,
                &[
                    ("_ZN3app6handle17h0123456789abcdefE", 2, "new_handle"),
                    ("cmdline_proc_show", 0, "new_cmdline"),
                ],
            ),
            (Some("mymod"), &[("_ZN2ns5parseEPKc", 0, "new_parse")]),
        ],
        &["__klp_pre_patch_callback_mymod"],
        &[
            ("vmlinux", "vmlinux", "static_fn", 2),
            ("vmlinux", "vmlinux", "_ZN3app5STATE17h0123456789abcdefE", 0),
            ("mymod", "mymod", "mod_fn", 0),
        ],
    )
}

#[test]
fn inspect_a_patch_file() {
    let d = dir().join("inspect");
    std::fs::create_dir_all(&d).expect("dir");
    let file = d.join("fix.ko.klp");
    std::fs::write(&file, patch_file()).expect("write");
    let f = file.display().to_string();
    // No process needed.
    let (c, out) = run(&["inspect", &f]);
    assert_eq!(c, 0, "{out}");
    assert_eq!(
        out,
        format!(
            "{f}
  patch       fix (from the file name)
  built for   x86_64
  replace     no: it is added on top of the patches already enabled
  in the program:
    replaces app::handle (the 2nd of that name) with new_handle
    replaces cmdline_proc_show with new_cmdline
    relocations .klp.rela.vmlinux..data.klp (2 entries, written into .data.klp)
    needs symbols:
      static_fn (the 2nd of that name)
      app::STATE
  in library mymod:
    replaces ns::parse(char const*) with new_parse
    callback pre_patch: __klp_pre_patch_callback_mymod
    relocations .klp.rela.mymod..data.klp (1 entry, written into .data.klp)
    needs symbols:
      mod_fn
"
        )
    );
    assert!(!out.contains("vmlinux "), "{out}");

    // JSON: raw names, demangled beside them, the program as null.
    let (c, out) = run(&["--json", "inspect", &f]);
    assert_eq!(c, 0, "{out}");
    let v: Value = serde_json::from_str(&out).expect("json");
    assert_eq!(v["name"], "fix");
    assert_eq!(v["replace"], false);
    assert_eq!(v["objects"][0]["object"], Value::Null);
    assert_eq!(
        v["objects"][0]["functions"][0]["old_name"],
        "_ZN3app6handle17h0123456789abcdefE"
    );
    assert_eq!(
        v["objects"][0]["functions"][0]["old_name_demangled"],
        "app::handle"
    );
    assert_eq!(v["objects"][0]["functions"][0]["sympos"], 2);
    assert_eq!(v["objects"][1]["object"], "mymod");
    assert_eq!(
        v["objects"][1]["callbacks"]["pre_patch"],
        "__klp_pre_patch_callback_mymod"
    );
    assert_eq!(v["objects"][1]["relocation_sections"][0]["entries"], 1);
    assert_eq!(v["objects"][0]["symbols"][0]["sympos"], 2);

    // The name from .modinfo wins over the file name; klp_replace=Y is seen.
    let mut bytes = patch_file();
    let at = bytes
        .windows(24)
        .position(|w| w == b"license=GPL\0livepatch=Y\0")
        .expect("modinfo");
    bytes[at..at + 24].copy_from_slice(b"name=hotfx\0klp_replace=Y");
    let other = d.join("other.o");
    std::fs::write(&other, &bytes).expect("write");
    let (c, out) = run(&["--json", "inspect", &other.display().to_string()]);
    assert_eq!(c, 0, "{out}");
    let v: Value = serde_json::from_str(&out).expect("json");
    assert_eq!(
        (v["name"].clone(), v["name_from"].clone()),
        (json!("hotfx"), json!("modinfo"))
    );
    assert_eq!(v["replace"], true);
    assert_eq!(v["livepatch"], false);
    let (c, out) = run(&["inspect", &other.display().to_string()]);
    assert_eq!(c, 0, "{out}");
    assert!(
        out.contains("  patch       hotfx (from the modinfo)\n"),
        "{out}"
    );
    assert!(
        out.contains("  replace     yes: enabling it replaces every patch enabled before it\n"),
        "{out}"
    );
    assert!(
        out.contains("  warning: the file is not marked as a livepatch (no livepatch=Y in .modinfo): it would be refused\n"),
        "{out}"
    );
    let obj = klp::elf::PatchObject::parse(&bytes).expect("parse");
    assert_eq!(
        klp_user::loader::describe::patch_name(&obj, Path::new("/x/y.ko.klp")),
        "hotfx"
    );
    let plain = patch_file();
    let obj = klp::elf::PatchObject::parse(&plain).expect("parse");
    assert_eq!(
        klp_user::loader::describe::patch_name(&obj, Path::new("/x/y.ko.klp")),
        "y"
    );
    assert_eq!(
        klp_user::loader::describe::patch_name(&obj, Path::new("noext")),
        "noext"
    );

    // Errors: no file, not a patch file.
    let missing = d.join("missing.ko");
    let (c, out) = run(&["inspect", &missing.display().to_string()]);
    assert_eq!(c, 1);
    assert!(
        out.starts_with(&format!(
            "klpctl: cannot read the patch file {} (-ENOENT)",
            missing.display()
        )),
        "{out}"
    );
    let junk = d.join("junk.ko");
    std::fs::write(&junk, [0u8; 100]).expect("write");
    let (c, out) = run(&["inspect", &junk.display().to_string()]);
    assert_eq!(c, 1);
    assert_eq!(
        out,
        format!(
            "klpctl: {} is not a livepatch object klp can read: not an ELF file (-ENOEXEC)\n",
            junk.display()
        )
    );
}

/// `klpctl load` sends the absolute path of the file; the process reads it. While the
/// loader is being written this is an errno sentence; what stays true is that the
/// answer is either a loaded patch or a sentence with the errno in brackets.
#[test]
fn load_sends_the_absolute_path() {
    let _s = serial();
    let p = Process::global();
    let d = dir().join("load");
    std::fs::create_dir_all(&d).expect("dir");
    std::fs::write(d.join("fix.ko.klp"), patch_file()).expect("write");
    let path = d.join("s.sock");
    let server = p
        .serve(ServeOptions {
            path: Some(path.clone()),
            load_dir: Some(d.clone()),
            ..ServeOptions::default()
        })
        .expect("serve");
    // A relative path from klpctl's working directory: klpctl makes it absolute (the
    // server, limited to `d`, would refuse anything else).
    let cwd = std::env::current_dir().expect("cwd");
    let mut rel = PathBuf::new();
    for _ in cwd.components().skip(1) {
        rel.push("..");
    }
    rel.push(d.strip_prefix("/").expect("absolute"));
    rel.push("fix.ko.klp");
    assert!(rel.is_relative());
    let (c, out) = ctl(
        &path,
        &["--timeout", "5", "load", &rel.display().to_string()],
    );
    match c {
        0 => assert!(out.starts_with("loaded 'fix' from "), "{out}"),
        _ => {
            assert_eq!(c, 1, "{out}");
            assert!(
                out.starts_with("klpctl: ") && out.contains("(-E") && !out.contains("only from"),
                "{out}"
            );
        }
    }
    if c == 0 {
        let (c, out) = ctl(&path, &["unload", "fix"]);
        assert_eq!(c, 0, "{out}");
    }
    drop(server);
}

klp_user::patchable! {
    /// The function the patch files of these tests replace; never called while
    /// patched (the replacement in an `elfbuild` patch file is not real code).
    pub fn klp_ctl_loaded_target(x: u64) -> u64 {
        std::hint::black_box(x) + 1
    }
}

/// A patch file for this machine replacing `klp_ctl_loaded_target`, named `fixload`,
/// written with the native back-end's machine, byte order and 64-bit absolute
/// relocation; `None` without a back-end.
fn native_patch_file(dir: &Path) -> Option<PathBuf> {
    use klp::arch::{Arch, Endian, Native};
    if !klp::arch::SUPPORTED {
        return None;
    }
    let (machine, big, abs64) = (
        Native::ELF_MACHINE,
        Native::ENDIAN == Endian::Big,
        Native::ABS64_RELOC,
    );
    let bytes = elfbuild::patch(
        machine,
        big,
        abs64,
        &[(
            None,
            &[("klp_ctl_loaded_target", 0, "klp_ctl_loaded_target_new")],
        )],
        &[],
        &[],
    );
    let path = dir.join("fixload.ko.klp");
    std::fs::write(&path, bytes).expect("write patch file");
    Some(path)
}

/// What klpctl printed around its wait for `patch`'s transition: the progress lines
/// (one per change, each about the patch; how many depends on timing) left out.
fn waited(out: &str, patch: &str) -> Vec<String> {
    let progress = format!("'{patch}': ");
    let lines: Vec<&str> = out.lines().collect();
    for w in lines.windows(2) {
        assert_ne!(w[0], w[1], "one line per change: {out}");
    }
    lines
        .into_iter()
        .filter(|l| !(l.starts_with(&progress) && l.contains(" threads switched")))
        .map(str::to_string)
        .collect()
}

/// The whole life of a patch file through klpctl: load (waited for), a second load
/// refused while enabled, disable, load again (the disabled one is replaced), unload
/// of the enabled patch (disabled first, waited for), unload of nothing.
#[test]
#[cfg_attr(
    klp_tsan,
    ignore = "ThreadSanitizer defers signals: stack checks of other threads see stale contexts or no answer"
)]
fn load_disable_reload_and_unload_through_klpctl() {
    let _s = serial();
    let p = Process::global();
    assert_eq!(klp_ctl_loaded_target(1), 2);
    let d = dir().join("life");
    std::fs::create_dir_all(&d).expect("dir");
    let Some(file) = native_patch_file(&d) else {
        eprintln!(
            "skipped: no test patch files for {}",
            std::env::consts::ARCH
        );
        return;
    };
    let f = file.display().to_string();
    let path = d.join("s.sock");
    let server = p
        .serve(ServeOptions {
            path: Some(path.clone()),
            ..ServeOptions::default()
        })
        .expect("serve");
    let (c, out) = ctl(&path, &["load", &f]);
    if c == 1 && out.contains("(-ENOSYS)") {
        eprintln!("skipped: this architecture loads no patch files: {out}");
        return;
    }
    assert_eq!(c, 0, "{out}\n{:?}", p.log().0);
    assert_eq!(
        waited(&out, "fixload"),
        [
            format!("loaded 'fixload' from {f} (1 function)"),
            "'fixload' is enabled: every thread runs the new code".to_string()
        ]
    );
    let (c, out) = ctl(&path, &["list"]);
    assert_eq!(
        (c, out.as_str()),
        (
            0,
            "fixload: enabled (stack order 1)\n  the program: patched\n    klp_ctl_loaded_target\n"
        )
    );
    // Loaded and enabled: refused, with the loader's sentence.
    let (c, out) = ctl(&path, &["load", &f]);
    assert_eq!(c, 1, "{out}");
    assert!(
        out.starts_with("klpctl: a patch named 'fixload' is loaded already (-EEXIST)"),
        "{out}"
    );
    // Disabled: loading it again works (klpctl waits while the disabled patch is freed).
    let (c, out) = ctl(&path, &["disable", "fixload"]);
    assert_eq!(c, 0, "{out}");
    assert_eq!(
        waited(&out, "fixload"),
        ["'fixload' is disabled: every thread runs the code it replaced"]
    );
    assert_eq!(klp_ctl_loaded_target(1), 2, "the original runs");
    let (c, out) = ctl(&path, &["--json", "load", &f]);
    assert_eq!(c, 0, "{out}");
    let mut lines = out.lines();
    let v: Value = serde_json::from_str(lines.next().expect("loaded")).expect("json");
    assert_eq!(
        v,
        json!({"name": "fixload", "warnings": [], "signer": null})
    );
    let v: Value = serde_json::from_str(lines.next().expect("done")).expect("json");
    assert_eq!(
        v,
        json!({"patch": "fixload", "done": true, "enabled": true})
    );
    // Unload of the enabled patch: disabled first, then removed.
    let (c, out) = ctl(&path, &["unload", "fixload"]);
    assert_eq!(c, 0, "{out}");
    assert_eq!(
        waited(&out, "fixload"),
        [
            "disabling 'fixload' before it is unloaded",
            "unloaded 'fixload'"
        ]
    );
    assert!(p.list().iter().all(|x| x.name != "fixload"));
    assert_eq!(klp_ctl_loaded_target(2), 3, "the original runs");
    let (c, out) = ctl(&path, &["unload", "fixload"]);
    assert_eq!(
        (c, out.as_str()),
        (
            1,
            "klpctl: no patch file named 'fixload' is loaded (-ENOENT): klpctl list shows the patches\n"
        )
    );
    drop(server);
}
