//! The control socket and `klpctl`, end to end against a server in this process.

mod common;

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::time::Duration;

use klp::{FuncDesc, ObjectDesc, PatchDesc};
use klp_user::ctl::{ServeOptions, klpctl, request};
use klp_user::{Process, thread};
use serde_json::{Value, json};

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
    let d = std::env::temp_dir().join(format!("klp-user-ctl-{}", std::process::id()));
    std::fs::create_dir_all(&d).expect("temp dir");
    d
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
        "lp_ctl  enabled=1 transition=1 forced=0 replace=0 stack_order=1\n  libklp_absent  patched=0\n    f,1\n"
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
    assert!(out.starts_with("TID      STATE  PENDING  COMM\n"), "{out}");
    assert!(out.contains("klp-ctl [klp]"), "{out}");

    // Errors are typed.
    let (c, out) = ctl(&path, &["enable", "nope"]);
    assert_eq!(
        (c, out.as_str()),
        (1, "klpctl: enable nope: -ENOENT (-2)\n")
    );
    let e = request(&path, &json!({"op": "force", "patch": "lp_ctl", "x": 1}));
    assert!(e.is_ok(), "force the running transition: {e:?}");
    assert!(p.wait_transition(Duration::from_secs(60)));
    let (c, out) = ctl(&path, &["list"]);
    assert_eq!(c, 0);
    // Forcing a patching transition does not mark a non-replace patch (the kernel
    // marks the patch of a forced *unpatching* transition, and the replaced patches).
    assert!(
        out.starts_with("lp_ctl  enabled=1 transition=0 forced=0"),
        "{out}"
    );
    let e = request(&path, &json!({"op": "enable", "patch": "lp_ctl"})).expect_err("enabled");
    assert_eq!((e.kind.as_str(), e.errno), ("errno", Some(-22)));
    let e = request(&path, &json!({"op": "fly"})).expect_err("unknown op");
    assert_eq!(e.kind, "unknown_op");
    let e = request(&path, &json!({"nop": 1})).expect_err("no op");
    assert_eq!(e.kind, "bad_request");
    let e = request(&path, &json!({"op": "disable"})).expect_err("no patch");
    assert_eq!(e.kind, "bad_request");
    let e = request(&path, &json!("list")).expect_err("not an object");
    assert_eq!(e.kind, "bad_request");

    // Disable (forced through the blocker) and clean up.
    let (c, out) = ctl(&path, &["disable", "lp_ctl"]);
    assert_eq!((c, out.as_str()), (0, ""));
    let (c, _) = ctl(&path, &["force", "lp_ctl"]);
    assert_eq!(c, 0);
    assert!(p.wait_transition(Duration::from_secs(60)));
    p.run_due_work();
    let (c, out) = ctl(&path, &["list"]);
    assert_eq!((c, out.as_str()), (0, "no patches\n"));
    tx.send(()).ok();
    h.join().expect("blocker");

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
    assert_eq!(e.kind, "permission");
    assert!(e.message.contains(&format!("uid {me}")), "{e:?}");
    drop(s2);
    assert!(!other.exists(), "the socket is removed");

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
        assert_eq!(
            String::from_utf8_lossy(&o.stderr),
            "klpctl: disable nope: -ENOENT (-2)\n"
        );
    }
    drop(server);
    assert!(!path.exists());
    let _ = std::fs::remove_dir(dir());
}
