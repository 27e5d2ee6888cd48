//! Bad input leaves the process unchanged: patches naming a function without a patch
//! site or an unknown symbol, a patch enabled while a transition runs, duplicate names,
//! and malformed or misplaced sysfs writes each fail with the kernel's error code and log
//! lines, and afterwards the patch list, the site bytes and states, the functions'
//! results and every thread's patch state are exactly as before. Each battery runs twice:
//! with nothing patched, and with a patch enabled.
//!
//! Every scenario runs in sequence in one test, because the host is process-wide.

#[path = "common/park.rs"]
mod park;

#[path = "common/host.rs"]
mod host;
use std::time::{Duration, Instant};

use klp::{Errno, FuncDesc, ObjectDesc, PatchDesc, PatchState, TaskId};
use klp_user::{PatchInfo, Process, ProcessHost, SiteKind};
use park::{Parker, maybe_park};

const WAIT: Duration = Duration::from_secs(60);

klp_user::patchable! {
    /// A patchable function.
    pub fn klp_bad_f(x: u64) -> u64 {
        std::hint::black_box(x) + 1
    }
}

klp_user::patchable! {
    /// Another, which parks the calling thread if it asked to.
    pub fn klp_bad_g(x: u64) -> u64 {
        maybe_park();
        std::hint::black_box(x) + 2
    }
}

/// A function without a patch site.
#[inline(never)]
#[unsafe(no_mangle)]
pub extern "C" fn klp_bad_plain(x: u64) -> u64 {
    std::hint::black_box(x) + 3
}

extern "C" fn f_v2(x: u64) -> u64 {
    std::hint::black_box(x) + 101
}

extern "C" fn f_v3(x: u64) -> u64 {
    std::hint::black_box(x) + 1001
}

extern "C" fn g_v2(x: u64) -> u64 {
    maybe_park();
    std::hint::black_box(x) + 102
}

extern "C" fn plain_v2(x: u64) -> u64 {
    std::hint::black_box(x) + 103
}

fn addr(f: *const ()) -> u64 {
    f as u64
}

fn f_addr() -> u64 {
    addr(klp_bad_f as *const ())
}

fn g_addr() -> u64 {
    addr(klp_bad_g as *const ())
}

fn plain_addr() -> u64 {
    addr(klp_bad_plain as *const ())
}

/// 8 bytes at the function's patch site: its entry, or on ppc64le its local entry
/// (past the global entry's two TOC instructions).
fn site_bytes(f: u64) -> [u8; 8] {
    let at = if cfg!(klp_arch = "ppc64le") { f + 8 } else { f };
    // SAFETY: `f` is a function of this program at least 16 bytes long (every
    // wrapper is, and `klp_bad_plain` has a call and a frame): the bytes are mapped
    // text.
    unsafe { std::ptr::read_volatile(at as *const [u8; 8]) }
}

/// Everything a failed operation must leave as it was.
#[derive(Debug, PartialEq, Eq)]
struct Snapshot {
    list: Vec<PatchInfo>,
    listed: Vec<String>,
    /// Per function: (name, site bytes, site state).
    sites: Vec<(&'static str, [u8; 8], Option<SiteKind>)>,
    /// What f, g and the plain function return to the test thread.
    results: [u64; 3],
    /// Every registered thread: (task, patch state, pending).
    threads: Vec<(TaskId, PatchState, bool)>,
    /// Patch modules still loaded, among the names this test uses.
    loaded: Vec<String>,
    warnings: u64,
}

const NAMES: [&str; 11] = [
    "bad_base",
    "bad_nosite",
    "bad_nosym",
    "bad_sympos",
    "bad_hold",
    "bad_second",
    "bad_second_replace",
    "bad_dupfn",
    "bad_dupobj",
    "bad_reuse",
    "bad_none",
];

fn snapshot(p: &Process) -> Snapshot {
    let mut threads: Vec<_> = p
        .threads()
        .into_iter()
        .map(|t| (t.task, t.state, t.pending))
        .collect();
    threads.sort();
    Snapshot {
        list: p.list(),
        listed: p.listed(),
        sites: [
            ("klp_bad_f", f_addr()),
            ("klp_bad_g", g_addr()),
            ("klp_bad_plain", plain_addr()),
        ]
        .into_iter()
        .map(|(n, a)| (n, site_bytes(a), p.site_state(a)))
        .collect(),
        results: [klp_bad_f(1), klp_bad_g(1), klp_bad_plain(1)],
        threads,
        loaded: NAMES
            .iter()
            .filter(|n| p.loaded(n))
            .map(|n| n.to_string())
            .collect(),
        warnings: p.warnings(),
    }
}

fn patch(name: &str, funcs: &[(&str, u64)]) -> PatchDesc<ProcessHost> {
    let mut o = ObjectDesc::vmlinux();
    for (n, a) in funcs {
        o = o.func(FuncDesc::new(n, *a));
    }
    PatchDesc::new(name).object(o)
}

fn lines(v: &[&str]) -> Vec<String> {
    v.iter().map(|s| s.to_string()).collect()
}

/// Lines logged since `since`, without the periodic lines of a transition that is
/// held open meanwhile (the worker's retries).
fn logged(p: &Process, since: u64) -> Vec<String> {
    p.log_since(since)
        .into_iter()
        .filter(|l| l != "livepatch: signaling remaining tasks")
        .collect()
}

/// Runs `op`, which must fail with `err` and log exactly `log`, and leave the process
/// as it was.
fn refused<T: std::fmt::Debug>(
    p: &Process,
    what: &str,
    err: Errno,
    log: &[String],
    op: impl FnOnce() -> Result<T, Errno>,
) {
    let before = snapshot(p);
    let since = p.log().1;
    let r = op();
    assert_eq!(r.as_ref().err(), Some(&err), "{what}: {r:?}");
    assert_eq!(&logged(p, since), log, "{what}: the log");
    let after = snapshot(p);
    assert_eq!(before, after, "{what}: the process changed");
}

fn wait_gone(p: &Process, name: &str) {
    let deadline = Instant::now() + WAIT;
    while p.list().iter().any(|x| x.name == name) || p.loaded(name) {
        assert!(Instant::now() < deadline, "{name} freed");
        p.run_due_work();
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// (a) A function without a patch site: `-EINVAL`, the kernel's failed-enable
/// sequence, and the function patched before it in the same patch is rolled back.
fn no_site(p: &Process, f_impl: u64) {
    refused(
        p,
        "no patch site",
        Errno::EINVAL,
        &lines(&[
            "livepatch: enabling patch 'bad_nosite'",
            "livepatch: 'bad_nosite': initializing patching transition",
            "livepatch: failed to find location for function 'klp_bad_plain'",
            "livepatch: failed to patch object 'vmlinux'",
            "livepatch: failed to enable patch 'bad_nosite'",
            "livepatch: 'bad_nosite': canceling patching transition, going to unpatch",
            "livepatch: 'bad_nosite': completing unpatching transition",
            "livepatch: 'bad_nosite': unpatching complete",
        ]),
        || {
            p.enable_patch(patch(
                "bad_nosite",
                &[
                    ("klp_bad_f", f_impl),
                    ("klp_bad_plain", addr(plain_v2 as *const ())),
                ],
            ))
        },
    );
}

/// (b) Unknown symbols: `-EINVAL` from the resolver, before anything is enabled.
fn unknown_symbol(p: &Process) {
    refused(
        p,
        "unknown symbol",
        Errno::EINVAL,
        &lines(&["livepatch: symbol 'klp_bad_no_such_function' not found in symbol table"]),
        || {
            p.enable_patch(patch(
                "bad_nosym",
                &[
                    ("klp_bad_g", addr(g_v2 as *const ())),
                    ("klp_bad_no_such_function", addr(g_v2 as *const ())),
                ],
            ))
        },
    );
    refused(
        p,
        "symbol position",
        Errno::EINVAL,
        &lines(&[
            "livepatch: symbol position 2 for symbol 'klp_bad_g' in object 'vmlinux' not found",
        ]),
        || {
            p.enable_patch(
                PatchDesc::new("bad_sympos").object(
                    ObjectDesc::vmlinux()
                        .func(FuncDesc::new("klp_bad_g", addr(g_v2 as *const ())).sympos(2)),
                ),
            )
        },
    );
}

/// (d) Duplicate names: a loaded patch module's name (`-EEXIST` from the loader), two
/// functions or two objects with one sysfs name inside a patch (`-EEXIST` from sysfs).
fn duplicates(p: &Process, loaded: &str) {
    refused(
        p,
        "duplicate module",
        Errno::EEXIST,
        &[format!(
            "klp-user: patch module '{loaded}' is already loaded"
        )],
        || p.enable_patch(patch(loaded, &[("klp_bad_g", addr(g_v2 as *const ()))])),
    );
    refused(
        p,
        "duplicate function",
        Errno::EEXIST,
        &lines(&[
            "sysfs: cannot create duplicate filename '/kernel/livepatch/bad_dupfn/vmlinux/klp_bad_g,1'",
        ]),
        || {
            p.enable_patch(patch(
                "bad_dupfn",
                &[
                    ("klp_bad_g", addr(g_v2 as *const ())),
                    ("klp_bad_g", addr(g_v2 as *const ())),
                ],
            ))
        },
    );
    refused(
        p,
        "duplicate object",
        Errno::EEXIST,
        &lines(&["sysfs: cannot create duplicate filename '/kernel/livepatch/bad_dupobj/vmlinux'"]),
        || {
            p.enable_patch(
                PatchDesc::new("bad_dupobj")
                    .object(
                        ObjectDesc::vmlinux()
                            .func(FuncDesc::new("klp_bad_g", addr(g_v2 as *const ()))),
                    )
                    .object(
                        ObjectDesc::vmlinux()
                            .func(FuncDesc::new("klp_bad_f", addr(f_v3 as *const ()))),
                    ),
            )
        },
    );
}

/// (e) sysfs writes that the kernel refuses, on an enabled patch outside a transition,
/// and writes that succeed without an effect.
fn bad_writes(p: &Process, name: &str) {
    let none: &[String] = &[];
    for v in ["2", "", "\n", "x", "o", " 1"] {
        refused(p, &format!("enabled = {v:?}"), Errno::EINVAL, none, || {
            p.sysfs_write(&[name, "enabled"], v)
        });
        refused(p, &format!("force = {v:?}"), Errno::EINVAL, none, || {
            p.sysfs_write(&[name, "force"], v)
        });
    }
    refused(p, "enabled = 1 again", Errno::EINVAL, none, || {
        p.enable(name)
    });
    refused(p, "enabled = on again", Errno::EINVAL, none, || {
        p.sysfs_write(&[name, "enabled"], "on\n")
    });
    refused(p, "force outside a transition", Errno::EINVAL, none, || {
        p.force(name)
    });
    refused(p, "write transition", Errno::EACCES, none, || {
        p.sysfs_write(&[name, "transition"], "1")
    });
    refused(p, "write replace", Errno::EACCES, none, || {
        p.sysfs_write(&[name, "replace"], "1")
    });
    refused(p, "write stack_order", Errno::EACCES, none, || {
        p.sysfs_write(&[name, "stack_order"], "1")
    });
    refused(p, "write patched", Errno::EACCES, none, || {
        p.sysfs_write(&[name, "vmlinux", "patched"], "0")
    });
    refused(p, "write an object directory", Errno::EISDIR, none, || {
        p.sysfs_write(&[name, "vmlinux"], "0")
    });
    refused(p, "read force", Errno::EACCES, none, || {
        p.sysfs_read(&[name, "force"])
    });
    refused(p, "unknown attribute", Errno::ENOENT, none, || {
        p.sysfs_write(&[name, "enable"], "0")
    });
    refused(p, "unknown patch", Errno::ENOENT, none, || {
        p.sysfs_write(&["bad_none", "enabled"], "0")
    });
    refused(p, "disable an unknown patch", Errno::ENOENT, none, || {
        p.disable("bad_none")
    });
    // Accepted without an effect: `force` = 0 on any patch.
    let before = snapshot(p);
    assert_eq!(p.sysfs_write(&[name, "force"], "0"), Ok(1));
    assert_eq!(p.sysfs_write(&[name, "force"], "off\n"), Ok(4));
    assert_eq!(snapshot(p), before, "force = 0 changes nothing");
}

/// The bad inputs that need no transition, with `name` an enabled patch.
fn battery(p: &Process, name: &str, f_impl: u64) {
    no_site(p, f_impl);
    unknown_symbol(p);
    duplicates(p, name);
    bad_writes(p, name);
}

/// (c) While a transition is held open by a thread parked in g: enabling another patch
/// (plain or replace) is `-EBUSY` and silent, disabling another patch is `-EBUSY`,
/// and malformed or misplaced writes neither reverse nor force the transition.
fn during_a_transition(p: &Process) {
    let parker = Parker::start(|| klp_bad_g(1), WAIT);
    let since = p.log().1;
    p.enable_patch(patch("bad_hold", &[("klp_bad_g", addr(g_v2 as *const ()))]))
        .expect("enable bad_hold");
    assert!(!p.wait_transition(Duration::from_millis(300)), "held open");
    // Every other thread switches (the test thread at the safe points of the waits).
    let deadline = Instant::now() + WAIT;
    loop {
        let st = p.status().expect("in transition");
        assert_eq!(st.patch, "bad_hold");
        if st.switched + 1 == st.total
            && st.blockers.len() == 1
            && st.blockers.iter().all(|b| b.thread.tid == parker.tid)
        {
            break;
        }
        assert!(Instant::now() < deadline, "{st:?}");
        klp_user::safe_point();
        p.retry_now();
        std::thread::sleep(Duration::from_millis(10));
    }
    assert_eq!(klp_bad_g(1), 103, "the test thread runs the new g");
    let held = snapshot(p);
    assert!(
        held.list
            .iter()
            .any(|x| x.name == "bad_hold" && x.transition && x.enabled),
        "{:?}",
        held.list
    );

    let none: &[String] = &[];
    refused(p, "enable during a transition", Errno::EBUSY, none, || {
        p.enable_patch(patch(
            "bad_second",
            &[("klp_bad_f", addr(f_v3 as *const ()))],
        ))
    });
    refused(
        p,
        "enable a replace patch during a transition",
        Errno::EBUSY,
        none,
        || {
            let mut d = patch(
                "bad_second_replace",
                &[("klp_bad_f", addr(f_v3 as *const ()))],
            );
            d.replace = true;
            p.enable_patch(d)
        },
    );
    refused(p, "disable another patch", Errno::EBUSY, none, || {
        p.disable("bad_base")
    });
    refused(p, "force another patch", Errno::EINVAL, none, || {
        p.force("bad_base")
    });
    refused(p, "enable another patch again", Errno::EINVAL, none, || {
        p.enable("bad_base")
    });
    refused(
        p,
        "enabled = 1 on the patching one",
        Errno::EINVAL,
        none,
        || p.enable("bad_hold"),
    );
    for v in ["2", "", "x"] {
        refused(
            p,
            &format!("reverse with {v:?}"),
            Errno::EINVAL,
            none,
            || p.sysfs_write(&["bad_hold", "enabled"], v),
        );
        refused(p, &format!("force with {v:?}"), Errno::EINVAL, none, || {
            p.sysfs_write(&["bad_hold", "force"], v)
        });
    }
    refused(
        p,
        "duplicate of the patch in transition",
        Errno::EEXIST,
        &["klp-user: patch module 'bad_hold' is already loaded".to_string()],
        || p.enable_patch(patch("bad_hold", &[("klp_bad_f", addr(f_v3 as *const ()))])),
    );
    // Init runs first: a patch that would fail to patch is refused as busy, one that
    // names an unknown symbol fails its resolution.
    refused(p, "no site during a transition", Errno::EBUSY, none, || {
        p.enable_patch(patch(
            "bad_nosite",
            &[
                ("klp_bad_f", addr(f_v3 as *const ())),
                ("klp_bad_plain", addr(plain_v2 as *const ())),
            ],
        ))
    });
    unknown_symbol(p);
    assert_eq!(snapshot(p), held);
    assert!(!p.wait_transition(Duration::from_millis(100)), "still held");

    // The transition then completes as if nothing had happened.
    assert_eq!(parker.finish(), 3, "the parker ran the old g");
    assert!(p.wait_transition(WAIT), "{:?}", p.log_since(since));
    let log = p.log_since(since);
    assert!(
        log.iter()
            .any(|l| l == "livepatch: 'bad_hold': patching complete")
            && !log.iter().any(|l| l.contains("reversing")
                || l.contains("forcing")
                || l.contains("bad_second")),
        "{log:?}"
    );
    assert_eq!(klp_bad_g(1), 103);
    p.disable("bad_hold").expect("disable bad_hold");
    assert!(p.wait_transition(WAIT));
    wait_gone(p, "bad_hold");
    assert_eq!(klp_bad_g(1), 3);
}

#[test]
fn bad_input_leaves_the_process_unchanged() {
    let p = host::init();
    assert!(p.site_state(plain_addr()).is_none());
    assert!(
        p.symbols().size_of(plain_addr()).is_some(),
        "the plain function is a sized symbol: only its missing site can fail"
    );
    let pristine = snapshot(p);
    assert_eq!(pristine.results, [2, 3, 4]);
    assert!(pristine.list.is_empty());

    // Nothing patched.
    no_site(p, addr(f_v2 as *const ()));
    unknown_symbol(p);
    refused(p, "disable, nothing loaded", Errno::ENOENT, &[], || {
        p.disable("bad_base")
    });
    assert_eq!(snapshot(p), pristine);
    // Nothing of a refused patch remains: its name can be used again.
    p.enable_patch(patch(
        "bad_nosite",
        &[("klp_bad_g", addr(g_v2 as *const ()))],
    ))
    .expect("the name is free");
    assert!(p.wait_transition(WAIT));
    assert_eq!(klp_bad_g(1), 103);
    p.disable("bad_nosite").expect("disable");
    assert!(p.wait_transition(WAIT));
    wait_gone(p, "bad_nosite");
    assert_eq!(snapshot(p), pristine);

    // With f patched (its site a direct jump to f_v2): the refused patches must leave
    // f's redirect as it is, including the one that patches f before failing.
    p.enable_patch(patch("bad_base", &[("klp_bad_f", addr(f_v2 as *const ()))]))
        .expect("enable bad_base");
    assert!(p.wait_transition(WAIT));
    let base = snapshot(p);
    assert_eq!(base.results, [102, 3, 4]);
    assert_eq!(
        base.sites.first().map(|s| s.2),
        Some(Some(SiteKind::Jump(addr(f_v2 as *const ())))),
        "{base:?}"
    );
    assert_ne!(
        base.sites.first().map(|s| s.1),
        pristine.sites.first().map(|s| s.1)
    );
    battery(p, "bad_base", addr(f_v3 as *const ()));
    during_a_transition(p);
    assert_eq!(snapshot(p), base);

    p.disable("bad_base").expect("disable bad_base");
    assert!(p.wait_transition(WAIT));
    wait_gone(p, "bad_base");
    assert_eq!(snapshot(p), pristine);
    assert_eq!(klp_user::redirect::anomalies(), 0);
    assert_eq!(klp_user::redirect::unregistered_calls(), 0);
    assert_eq!(p.warnings(), 0, "{:?}", p.log().0);
}
