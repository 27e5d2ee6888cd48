//! The core hosted by the process: every scenario runs in sequence in one test, because
//! the host is process-wide (one core per process, like one per kernel).

use std::sync::{Arc, mpsc};
use std::time::Duration;

use klp::{Errno, FuncDesc, ObjectDesc, PatchDesc, PatchState};
use klp_user::{Config, Process, ProcessHost, thread};

const WAIT: Duration = Duration::from_secs(60);

#[inline(never)]
#[unsafe(no_mangle)]
pub extern "C" fn klp_user_test_target(x: u64) -> u64 {
    std::hint::black_box(x) + 1
}

#[inline(never)]
#[unsafe(no_mangle)]
pub extern "C" fn klp_user_test_replacement(x: u64) -> u64 {
    std::hint::black_box(x) + 2
}

fn repl() -> u64 {
    klp_user_test_replacement as *const () as u64
}

fn patch(name: &str, obj: Option<&str>, func: &str) -> PatchDesc<ProcessHost> {
    let o = match obj {
        None => ObjectDesc::vmlinux(),
        Some(m) => ObjectDesc::module(m),
    };
    PatchDesc::new(name).object(o.func(FuncDesc::new(func, repl())))
}

fn log_after(p: &Process, since: u64) -> String {
    p.log_since(since).join("\n")
}

fn all_idle(p: &Process) -> bool {
    p.threads()
        .iter()
        .all(|t| t.state == PatchState::Idle && !t.pending)
}

/// A thread that blocks klp's signal (the core sees it as running), and can create
/// threads and pass a safe point on request.
struct Blocker {
    cmd: mpsc::Sender<&'static str>,
    ans: mpsc::Receiver<(PatchState, bool, PatchState, bool)>,
    handle: Option<std::thread::JoinHandle<()>>,
    tid: i32,
}

impl Blocker {
    fn start() -> Blocker {
        let (cmd, cmd_rx) = mpsc::channel::<&'static str>();
        let (ans_tx, ans) = mpsc::channel();
        let (tid_tx, tid_rx) = mpsc::channel();
        let handle = std::thread::spawn(move || {
            // SAFETY: a zeroed sigset is initialised by sigemptyset; blocking one signal
            // in this thread has no other effect.
            unsafe {
                let mut set: libc::sigset_t = std::mem::zeroed();
                libc::sigemptyset(&mut set);
                libc::sigaddset(&mut set, klp_user::stack::signal_number());
                libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
            }
            let me = thread::current_record().expect("registered");
            tid_tx.send(me.tid()).ok();
            while let Ok(c) = cmd_rx.recv() {
                match c {
                    "spawn" => {
                        let mine = (me.patch_state(), me.pending());
                        let child = std::thread::spawn(|| {
                            let r = thread::current_record().expect("child registered");
                            (r.patch_state(), r.pending())
                        })
                        .join()
                        .expect("child");
                        ans_tx.send((mine.0, mine.1, child.0, child.1)).ok();
                    }
                    "safe_point" => {
                        klp_user::safe_point();
                        ans_tx
                            .send((me.patch_state(), me.pending(), me.patch_state(), false))
                            .ok();
                    }
                    _ => return,
                }
            }
        });
        let tid = tid_rx.recv().expect("tid");
        Blocker {
            cmd,
            ans,
            handle: Some(handle),
            tid,
        }
    }

    fn ask(&self, c: &'static str) -> (PatchState, bool, PatchState, bool) {
        self.cmd.send(c).expect("send");
        self.ans.recv_timeout(WAIT).expect("answer")
    }
}

impl Drop for Blocker {
    fn drop(&mut self) {
        let _ = self.cmd.send("exit");
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}

fn enable_of_a_loaded_function_fails_cleanly(p: &Process) {
    let since = p.log().1;
    let f = klp_user_test_target as *const () as u64;
    assert_eq!(
        p.symbols().candidates(None, "klp_user_test_target"),
        &[f],
        "the executable's symbol is indexed"
    );
    let r = p.enable_patch(patch("lp_loaded", None, "klp_user_test_target"));
    assert_eq!(r, Err(Errno::EINVAL));
    let log = log_after(p, since);
    assert!(
        log.contains("livepatch: enabling patch 'lp_loaded'")
            && log
                .contains("livepatch: failed to find location for function 'klp_user_test_target'")
            && log.contains("livepatch: failed to enable patch 'lp_loaded'"),
        "{log}"
    );
    assert!(p.list().is_empty());
    assert!(!p.patch_module_loaded("lp_loaded"));
    assert!(all_idle(p));
    assert_eq!(klp_user_test_target(1), 2, "the function is unchanged");
}

fn unknown_symbol_and_bad_input(p: &Process) {
    let since = p.log().1;
    let r = p.enable_patch(patch("lp_unknown", None, "klp_user_no_such_symbol"));
    assert_eq!(r, Err(Errno::EINVAL));
    assert!(
        log_after(p, since)
            .contains("livepatch: symbol 'klp_user_no_such_symbol' not found in symbol table")
    );
    // A patch with callbacks: they run on whichever thread performs the operation.
    static CALLS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    struct Cb;
    impl klp::Callbacks<ProcessHost> for Cb {
        fn pre_patch(&self, _: &mut klp::CallbackCx<'_, ProcessHost>) -> i32 {
            CALLS.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            0
        }
        fn post_unpatch(&self, _: &mut klp::CallbackCx<'_, ProcessHost>) {
            CALLS.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        }
    }
    let d = PatchDesc::new("lp_cb").object(ObjectDesc::vmlinux().callbacks(Arc::new(Cb)));
    p.enable_patch(d).expect("a patch with callbacks");
    assert!(p.wait_transition(WAIT));
    p.disable("lp_cb").expect("disable");
    assert!(p.wait_transition(WAIT));
    let deadline = std::time::Instant::now() + WAIT;
    while !p.list().is_empty() && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(10));
    }
    assert_eq!(CALLS.load(std::sync::atomic::Ordering::SeqCst), 2);
    // Unknown patches in sysfs.
    assert_eq!(p.disable("nope"), Err(Errno::ENOENT));
    assert!(p.list().is_empty() && all_idle(p));
}

fn transitions_of_patches_whose_objects_are_not_loaded(p: &Process) {
    let since = p.log().1;
    let id = p
        .enable_patch(patch("lp_a", Some("libklp_absent_a"), "f_a"))
        .expect("enable");
    assert!(p.wait_transition(WAIT), "{}", log_after(p, since));
    let l = p.list();
    assert_eq!(l.len(), 1);
    let a = &l[0];
    assert_eq!(
        (
            a.name.as_str(),
            a.enabled,
            a.transition,
            a.replace,
            a.stack_order
        ),
        ("lp_a", true, false, false, 1)
    );
    assert_eq!(a.objects.len(), 1);
    assert_eq!(a.objects[0].0, "libklp_absent_a");
    assert!(!a.objects[0].1, "not loaded: not patched");
    assert_eq!(a.objects[0].2, vec!["f_a,1".to_string()]);
    let log = log_after(p, since);
    assert!(
        log.contains("livepatch: 'lp_a': starting patching transition"),
        "{log}"
    );
    assert!(
        log.contains("livepatch: 'lp_a': patching complete"),
        "{log}"
    );
    assert!(all_idle(p));
    assert_eq!(p.sysfs_read(&["lp_a", "enabled"]), Ok("1\n".into()));
    let _ = id;

    // Atomic replace by a cumulative patch.
    let mut d = patch("lp_b", Some("libklp_absent_b"), "f_b");
    d.replace = true;
    p.enable_patch(d).expect("replace");
    assert!(p.wait_transition(WAIT));
    p.run_due_work();
    std::thread::sleep(Duration::from_millis(200));
    p.run_due_work();
    let l = p.list();
    assert_eq!(l.len(), 1, "{l:?}");
    assert_eq!(
        (l[0].name.as_str(), l[0].replace, l[0].stack_order),
        ("lp_b", true, 1)
    );
    assert!(
        !p.patch_module_loaded("lp_a"),
        "the replaced patch's module is released"
    );
    // The replacing patch carries nops for the replaced patch's object.
    assert!(
        l[0].objects.iter().all(|o| o.0 != "libklp_absent_a"),
        "nops freed"
    );

    // Disable.
    p.disable("lp_b").expect("disable");
    assert!(p.wait_transition(WAIT));
    p.run_due_work();
    assert!(p.list().is_empty());
    assert!(!p.patch_module_loaded("lp_b"));
    assert!(all_idle(p));
}

fn new_threads_inherit_their_creators_state(p: &Process) {
    let b = Blocker::start();
    let since = p.log().1;
    p.enable_patch(patch("lp_c", Some("libklp_absent_c"), "f_c"))
        .expect("enable");
    // The blocker cannot be checked (it blocks the signal): the transition stays.
    assert!(!p.wait_transition(Duration::from_millis(300)));
    let st = p.status().expect("in transition");
    assert_eq!(st.patch, "lp_c");
    assert_eq!(st.target, PatchState::Patched);
    let bl = st
        .blockers
        .iter()
        .find(|x| x.thread.tid == b.tid)
        .expect("the blocker blocks");
    // Natively the blocked signal is visible in /proc (running); under qemu-user it is
    // not, and the thread does not answer the stack check instead.
    assert!(
        bl.reason == klp_user::BlockReason::Running
            || (bl.reason == klp_user::BlockReason::Unreliable(klp::TraceError::Unreliable)
                && bl.detail.as_deref() == Some("NoAnswer")),
        "{bl:?}"
    );
    assert!(st.switched < st.total);
    // An unswitched creator: its child starts unswitched and pending.
    let (ps, pp, cs, cp) = b.ask("spawn");
    assert_eq!((ps, pp), (PatchState::Unpatched, true));
    assert_eq!(
        (cs, cp),
        (PatchState::Unpatched, true),
        "the child inherits"
    );
    // A switched creator (this thread passes a safe point): the child is switched.
    klp_user::safe_point();
    let me = thread::current_record().expect("registered");
    assert_eq!(
        (me.patch_state(), me.pending()),
        (PatchState::Patched, false)
    );
    let child = std::thread::spawn(|| {
        let r = thread::current_record().expect("registered");
        (r.patch_state(), r.pending())
    })
    .join()
    .expect("child");
    assert_eq!(child, (PatchState::Patched, false));
    // The blocker passes a safe point: the transition completes.
    let (s, pend, _, _) = b.ask("safe_point");
    assert_eq!((s, pend), (PatchState::Patched, false));
    assert!(p.wait_transition(WAIT), "{}", log_after(p, since));
    assert!(all_idle(p));
    assert!(p.status().is_none());

    // Reverse a disabling transition, then force it.
    p.disable("lp_c").expect("disable");
    assert!(!p.wait_transition(Duration::from_millis(300)));
    assert_eq!(p.enable("lp_c"), Ok(()), "reverse");
    let log = log_after(p, since);
    assert!(
        log.contains("livepatch: 'lp_c': starting patching transition"),
        "{log}"
    );
    assert_eq!(p.sysfs_read(&["lp_c", "enabled"]), Ok("1\n".into()));
    p.force("lp_c").expect("force");
    assert!(p.wait_transition(WAIT));
    let log = log_after(p, since);
    assert!(
        log.contains("livepatch: forcing remaining tasks to the patched state"),
        "{log}"
    );
    assert_eq!(p.list()[0].name, "lp_c");
    // Disable again (the blocker is forced through as well).
    p.disable("lp_c").expect("disable");
    assert!(!p.wait_transition(Duration::from_millis(300)));
    p.force("lp_c").expect("force");
    assert!(p.wait_transition(WAIT));
    p.run_due_work();
    assert!(p.list().is_empty());
    assert!(
        p.patch_module_loaded("lp_c"),
        "a forced patch keeps its module reference, as in the kernel"
    );
    drop(b);
    assert!(all_idle(p));
}

fn dlopen_is_module_coming(p: &Process) {
    assert!(!p.symbols().has_module("libresolv"), "not loaded yet");
    p.enable_patch(patch("lp_resolv", Some("libresolv"), "__b64_ntop"))
        .expect("enable for a library that is not loaded");
    assert!(p.wait_transition(WAIT));
    let since = p.log().1;
    // A library no patch is about loads.
    let anl = p.dlopen("libanl.so.1").expect("dlopen libanl");
    assert_eq!(anl.name, "libanl");
    assert!(p.symbols().has_module("libanl"));
    // The patched library: the patch applies when it loads, finds no site, and the
    // load is refused as a module's would be.
    assert_eq!(p.dlopen("libresolv.so.2").err(), Some(Errno::EINVAL));
    let log = log_after(p, since);
    assert!(
        log.contains("livepatch: applying patch 'lp_resolv' to loading module 'libresolv'")
            && log.contains("livepatch: failed to find location for function '__b64_ntop'")
            && log.contains("refusing to load module 'libresolv'"),
        "{log}"
    );
    assert!(!p.symbols().has_module("libresolv"), "closed again");
    let ch = anl.close(p);
    assert!(ch.removed.contains(&"libanl".to_string()) || p.symbols().has_module("libanl"));
    p.disable("lp_resolv").expect("disable");
    assert!(p.wait_transition(WAIT));
    p.run_due_work();
    assert!(p.list().is_empty());
}

fn synchronize_and_second_transition(p: &Process) {
    let b = Blocker::start();
    p.enable_patch(patch("lp_d", Some("libklp_absent_d"), "f_d"))
        .expect("enable");
    assert!(!p.wait_transition(Duration::from_millis(200)));
    // A second transition while one runs.
    assert_eq!(
        p.enable_patch(patch("lp_e", Some("libklp_absent_e"), "f_e")),
        Err(Errno::EBUSY)
    );
    assert!(!p.patch_module_loaded("lp_e"));
    // Writing 0 to `enabled` of the patch in transition reverses it: the blocker, which
    // had not switched, is already at the new target.
    assert_eq!(p.disable("lp_d"), Ok(()));
    assert_eq!(p.sysfs_read(&["lp_d", "enabled"]), Ok("0\n".into()));
    assert!(p.wait_transition(WAIT));
    p.run_due_work();
    assert!(p.list().is_empty());
    assert_eq!(p.force("lp_d"), Err(Errno::ENOENT), "gone");
    drop(b);
    assert_eq!(p.warnings(), 0, "no WARN from the core: {:?}", p.log().0);
}

/// Threads keep creating threads while patches are enabled, replaced and disabled:
/// every child inherits a consistent state (the fork gate), so the core never finds a
/// task that is not idle when a transition starts, nor one still pending when it ends.
fn thread_creation_races_transitions(p: &Process) {
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
    let stop = Arc::new(AtomicBool::new(false));
    let born = Arc::new(AtomicU64::new(0));
    let spawners: Vec<_> = (0..4)
        .map(|_| {
            let (stop, born) = (stop.clone(), born.clone());
            std::thread::spawn(move || {
                while !stop.load(Ordering::Acquire) {
                    klp_user::safe_point();
                    let b = born.clone();
                    std::thread::spawn(move || {
                        klp_user::safe_point();
                        b.fetch_add(1, Ordering::Relaxed);
                    })
                    .join()
                    .expect("child");
                }
            })
        })
        .collect();
    let warnings = p.warnings();
    for round in 0..3 {
        let name = format!("lp_race{round}");
        let mut d = patch(&name, Some("libklp_absent_race"), "f");
        d.replace = true;
        p.enable_patch(d).expect("enable");
        assert!(p.wait_transition(WAIT), "round {round}");
    }
    p.disable("lp_race2").expect("disable");
    assert!(p.wait_transition(WAIT));
    stop.store(true, Ordering::Release);
    for s in spawners {
        s.join().expect("spawner");
    }
    p.run_due_work();
    std::thread::sleep(Duration::from_millis(100));
    p.run_due_work();
    assert!(born.load(Ordering::Relaxed) > 0);
    assert!(p.list().is_empty(), "{:?}", p.list());
    assert!(all_idle(p));
    assert_eq!(p.warnings(), warnings, "{:?}", p.log().0);
}

#[test]
fn the_process_hosts_the_core() {
    let p = Process::init(Config {
        dyndbg: true,
        dyndbg_off: vec!["klp_try_switch_task"],
        ..Config::default()
    });
    enable_of_a_loaded_function_fails_cleanly(p);
    unknown_symbol_and_bad_input(p);
    transitions_of_patches_whose_objects_are_not_loaded(p);
    new_threads_inherit_their_creators_state(p);
    dlopen_is_module_coming(p);
    synchronize_and_second_transition(p);
    thread_creation_races_transitions(p);
}
