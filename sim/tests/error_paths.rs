//! Every error path of the core leaves the machine exactly as it was: the snapshot
//! (patches, redirect records, sysfs tree, tasks, modules, ftrace, work) taken after a
//! failed operation equals the one taken before, and the error is the kernel's.

use std::collections::BTreeMap;
use std::rc::Rc;
use std::sync::Arc;

use klp::{CallbackCx, Callbacks, Errno, FuncDesc, ObjectDesc, PatchDesc, PatchState};
use klp_sim::Kernel;
use klp_sim::kernel::ModError;
use klp_sim::modules::ModuleDef;
use klp_sim::world::{Activity, Kind, LoadedModule, ModState, World};

fn boot() -> Kernel {
    Kernel::boot(2)
}

/// Registers a loaded livepatch module `name` with one replacement function `new_fn`.
fn lp_module(k: &mut Kernel, name: &str) -> u64 {
    k.world.modules.insert(
        name.to_string(),
        LoadedModule {
            name: name.to_string(),
            state: ModState::Live,
            refcnt: 0,
            params: BTreeMap::new(),
            livepatch: true,
            patch: None,
        },
    );
    k.world.define(
        Some(name),
        "new_fn",
        0x40,
        true,
        Rc::new(|_, _| "new".into()),
    )
}

/// insmod that must fail with an errno.
fn insmod_errno(k: &mut Kernel, m: &str, params: &[&str]) -> Result<(), Errno> {
    match k.insmod_cmd(m, params) {
        Err(ModError::Errno(e)) => Err(e),
        other => panic!("insmod {m}: {other:?}"),
    }
}

fn log_tail(k: &Kernel, n: usize) -> Vec<String> {
    let d = &k.world.dmesg;
    d[d.len().saturating_sub(n)..]
        .iter()
        .map(|(_, l)| l.clone())
        .collect()
}

/// Runs `op` on a kernel prepared by `setup`; asserts it fails with `want` and leaves
/// the snapshot unchanged; returns the log lines it printed.
fn fails_cleanly(
    setup: impl FnOnce(&mut Kernel),
    op: impl FnOnce(&mut Kernel) -> Result<(), Errno>,
    want: Errno,
) -> Vec<String> {
    let mut k = boot();
    setup(&mut k);
    let before = k.snapshot();
    let n = k.world.dmesg.len();
    let r = op(&mut k);
    assert_eq!(r, Err(want));
    k.run_due_works();
    assert_eq!(k.snapshot(), before, "state changed by a failed operation");
    assert!(k.world.warnings.is_empty(), "{:?}", k.world.warnings);
    k.world.dmesg[n..].iter().map(|(_, l)| l.clone()).collect()
}

fn enable(k: &mut Kernel, desc: PatchDesc<World>) -> Result<(), Errno> {
    k.klp.enable_patch(&mut k.world, desc).map(|_| ())
}

fn one_func(module: &str, old: &str, new: u64) -> PatchDesc<World> {
    PatchDesc::new(module).object(ObjectDesc::vmlinux().func(FuncDesc::new(old, new)))
}

#[test]
fn unknown_symbol() {
    let log = fails_cleanly(
        |k| {
            lp_module(k, "p");
        },
        |k| {
            let new = k.world.addr_of(Some("p"), "new_fn").unwrap_or(0);
            enable(k, one_func("p", "no_such_function", new))
        },
        Errno::EINVAL,
    );
    assert!(
        log.contains(&"livepatch: symbol 'no_such_function' not found in symbol table".to_string()),
        "{log:?}"
    );
    // The patch directory appeared and went away: no enabling line, nothing else.
    assert!(!log.iter().any(|l| l.contains("enabling patch")), "{log:?}");
}

#[test]
fn ambiguous_and_missing_positions() {
    let setup = |k: &mut Kernel| {
        lp_module(k, "p");
        k.world
            .define(None, "dup_fn", 0x20, true, Rc::new(|_, _| "a".into()));
        k.world
            .define(None, "dup_fn", 0x20, true, Rc::new(|_, _| "b".into()));
    };
    let log = fails_cleanly(
        setup,
        |k| {
            let new = k.world.addr_of(Some("p"), "new_fn").unwrap_or(0);
            enable(k, one_func("p", "dup_fn", new))
        },
        Errno::EINVAL,
    );
    assert!(
        log.contains(
            &"livepatch: unresolvable ambiguity for symbol 'dup_fn' in object '(null)'".to_string()
        ),
        "{log:?}"
    );
    let log = fails_cleanly(
        setup,
        |k| {
            let new = k.world.addr_of(Some("p"), "new_fn").unwrap_or(0);
            enable(
                k,
                PatchDesc::new("p")
                    .object(ObjectDesc::vmlinux().func(FuncDesc::new("dup_fn", new).sympos(3))),
            )
        },
        Errno::EINVAL,
    );
    assert!(
        log.contains(
            &"livepatch: symbol position 3 for symbol 'dup_fn' in object 'vmlinux' not found"
                .to_string()
        ),
        "{log:?}"
    );
    // Position 2 exists: the second symbol is patched.
    let mut k = boot();
    setup(&mut k);
    let new = k.world.addr_of(Some("p"), "new_fn").unwrap_or(0);
    let second = k.world.symbol_candidates_for_test("dup_fn")[1];
    enable(
        &mut k,
        PatchDesc::new("p")
            .object(ObjectDesc::vmlinux().func(FuncDesc::new("dup_fn", new).sympos(2))),
    )
    .expect("sympos 2");
    assert_eq!(k.klp.records().next().map(|r| r.old_func), Some(second));
    assert!(k.klp.sysfs_node(&["p", "vmlinux", "dup_fn,2"]).is_some());
}

#[test]
fn malformed_descriptions() {
    let cases: Vec<Box<dyn Fn(u64) -> PatchDesc<World>>> = vec![
        // An object entry without a funcs array.
        Box::new(|_| {
            let mut o = ObjectDesc::vmlinux();
            o.funcs = None;
            PatchDesc::new("p").object(o)
        }),
        // A function without name or replacement.
        Box::new(|new| {
            PatchDesc::new("p").object(ObjectDesc::vmlinux().func(FuncDesc {
                old_name: None,
                new_func: Some(new),
                old_sympos: 0,
            }))
        }),
        Box::new(|_| {
            PatchDesc::new("p").object(ObjectDesc::vmlinux().func(FuncDesc {
                old_name: Some("cmdline_proc_show".into()),
                new_func: None,
                old_sympos: 0,
            }))
        }),
        // Names at the kernel's limits.
        Box::new(|new| {
            PatchDesc::new("p").object(
                ObjectDesc::module(&"m".repeat(klp::MODULE_NAME_LEN)).func(FuncDesc::new("x", new)),
            )
        }),
        Box::new(|new| {
            PatchDesc::new("p").object(
                ObjectDesc::vmlinux().func(FuncDesc::new(&"f".repeat(klp::KSYM_NAME_LEN), new)),
            )
        }),
    ];
    for c in cases {
        fails_cleanly(
            |k| {
                lp_module(k, "p");
            },
            |k| {
                let new = k.world.addr_of(Some("p"), "new_fn").unwrap_or(0);
                enable(k, c(new))
            },
            Errno::EINVAL,
        );
    }
    // The same function twice in one object collides in sysfs.
    fails_cleanly(
        |k| {
            lp_module(k, "p");
        },
        |k| {
            let new = k.world.addr_of(Some("p"), "new_fn").unwrap_or(0);
            enable(
                k,
                PatchDesc::new("p").object(
                    ObjectDesc::vmlinux()
                        .func(FuncDesc::new("cmdline_proc_show", new))
                        .func(FuncDesc::new("cmdline_proc_show", new).sympos(1)),
                ),
            )
        },
        Errno::EEXIST,
    );
}

#[test]
fn not_a_livepatch_module() {
    let log = fails_cleanly(
        |k| {
            lp_module(k, "p");
            if let Some(m) = k.world.modules.get_mut("p") {
                m.livepatch = false;
            }
        },
        |k| {
            let new = k.world.addr_of(Some("p"), "new_fn").unwrap_or(0);
            enable(k, one_func("p", "cmdline_proc_show", new))
        },
        Errno::EINVAL,
    );
    assert_eq!(
        log,
        vec!["livepatch: module p is not marked as a livepatch module".to_string()]
    );
}

#[test]
fn function_without_entry_site() {
    let log = fails_cleanly(
        |k| {
            lp_module(k, "p");
            k.world.define(
                None,
                "notrace_fn",
                0x20,
                false,
                Rc::new(|_, _| String::new()),
            );
        },
        |k| {
            let new = k.world.addr_of(Some("p"), "new_fn").unwrap_or(0);
            enable(k, one_func("p", "notrace_fn", new))
        },
        Errno::EINVAL,
    );
    for want in [
        "livepatch: enabling patch 'p'",
        "livepatch: failed to find location for function 'notrace_fn'",
        "livepatch: failed to patch object 'vmlinux'",
        "livepatch: failed to enable patch 'p'",
        "livepatch: 'p': unpatching complete",
    ] {
        assert!(log.contains(&want.to_string()), "{want}: {log:?}");
    }
}

#[test]
fn second_function_fails_after_first_was_patched() {
    // The first function is patched, the second has no site: everything is undone.
    fails_cleanly(
        |k| {
            lp_module(k, "p");
            k.world.define(
                None,
                "notrace_fn",
                0x20,
                false,
                Rc::new(|_, _| String::new()),
            );
        },
        |k| {
            let new = k.world.addr_of(Some("p"), "new_fn").unwrap_or(0);
            enable(
                k,
                PatchDesc::new("p").object(
                    ObjectDesc::vmlinux()
                        .func(FuncDesc::new("cmdline_proc_show", new))
                        .func(FuncDesc::new("notrace_fn", new)),
                ),
            )
        },
        Errno::EINVAL,
    );
}

#[test]
fn ip_modify_conflict_and_ftrace_disabled() {
    let log = fails_cleanly(
        |k| {
            k.insmod_cmd("test_klp_kprobe", &["has_post_handler=true"])
                .expect("kprobe");
        },
        |k| insmod_errno(k, "test_klp_livepatch", &[]),
        Errno::EBUSY,
    );
    assert!(
        log.contains(
            &"livepatch: failed to register ftrace handler for function 'cmdline_proc_show' (-16)"
                .to_string()
        )
    );
    fails_cleanly(
        |k| {
            k.world.set_ftrace_enabled(false).expect("sysctl");
        },
        |k| insmod_errno(k, "test_klp_livepatch", &[]),
        Errno::EBUSY,
    );
}

#[test]
fn failing_pre_patch_refuses_the_patch() {
    let log = fails_cleanly(
        |k| {
            k.insmod_cmd("test_klp_callbacks_mod", &[]).expect("mod");
        },
        |k| insmod_errno(k, "test_klp_callbacks_demo", &["pre_patch_ret=-19"]),
        Errno::ENODEV,
    );
    assert!(log.contains(&"livepatch: pre-patch callback failed for object 'vmlinux'".to_string()));
}

/// A pre_patch failure on the second object: the first object was patched and gets its
/// post_unpatch; the second (whose pre_patch failed) gets none.
#[test]
fn failing_pre_patch_on_a_later_object_runs_post_unpatch_for_earlier_ones() {
    struct Cb(&'static str, i32);
    impl Callbacks<World> for Cb {
        fn pre_patch(&self, cx: &mut CallbackCx<'_, World>) -> i32 {
            cx.host.printk(&format!("{}: pre", self.0));
            self.1
        }
        fn post_unpatch(&self, cx: &mut CallbackCx<'_, World>) {
            cx.host.printk(&format!("{}: post_unpatch", self.0));
        }
    }
    let log = fails_cleanly(
        |k| {
            lp_module(k, "p");
            k.insmod_cmd("test_klp_mod_target", &[]).expect("target");
        },
        |k| {
            let new = k.world.addr_of(Some("p"), "new_fn").unwrap_or(0);
            enable(
                k,
                PatchDesc::new("p")
                    .object(
                        ObjectDesc::vmlinux()
                            .func(FuncDesc::new("cmdline_proc_show", new))
                            .callbacks(Arc::new(Cb("objA", 0))),
                    )
                    .object(
                        ObjectDesc::module("test_klp_mod_target")
                            .callbacks(Arc::new(Cb("objB", -5))),
                    ),
            )
        },
        Errno(5),
    );
    let got: Vec<&str> = log
        .iter()
        .map(String::as_str)
        .filter(|l| l.starts_with("obj"))
        .collect();
    assert_eq!(got, ["objA: pre", "objB: pre", "objA: post_unpatch"]);
}

#[test]
fn incompatible_states_refused_before_anything() {
    let log = fails_cleanly(
        |k| {
            k.insmod_cmd("test_klp_state2", &[]).expect("state2");
            k.sleep_secs(2.0);
        },
        |k| insmod_errno(k, "test_klp_state", &[]),
        Errno::EINVAL,
    );
    assert_eq!(
        log,
        vec![
            "livepatch: Livepatch patch (test_klp_state) is not compatible with the already installed livepatches."
        ]
    );
}

#[test]
fn cumulative_patch_must_carry_every_state() {
    // A replace patch without state 1 over test_klp_state (which has it).
    fails_cleanly(
        |k| {
            k.insmod_cmd("test_klp_state", &[]).expect("state");
            k.sleep_secs(2.0);
            lp_module(k, "p");
        },
        |k| {
            let new = k.world.addr_of(Some("p"), "new_fn").unwrap_or(0);
            enable(k, one_func("p", "cmdline_proc_show", new).replace(true))
        },
        Errno::EINVAL,
    );
    // A non-replace patch may touch the state with the same or a higher version only.
    let mut k = boot();
    k.insmod_cmd("test_klp_state2", &[]).expect("state2");
    k.sleep_secs(2.0);
    lp_module(&mut k, "p");
    let new = k.world.addr_of(Some("p"), "new_fn").unwrap_or(0);
    assert_eq!(
        enable(&mut k, one_func("p", "cmdline_proc_show", new).state(1, 1)),
        Err(Errno::EINVAL)
    );
    assert_eq!(
        enable(&mut k, one_func("p", "cmdline_proc_show", new).state(1, 3)),
        Ok(())
    );
}

/// A stalled transition: the busy worker sleeps in busymod_work_func.
fn stalled(k: &mut Kernel) {
    k.insmod_cmd("test_klp_callbacks_busy", &["block_transition=Y"])
        .expect("busy");
    k.insmod_cmd("test_klp_callbacks_demo", &[]).expect("demo");
    k.sleep_secs(3.0);
    assert_eq!(
        k.klp
            .sysfs_read_string(&["test_klp_callbacks_demo", "transition"])
            .as_deref(),
        Ok("1\n")
    );
}

#[test]
fn second_transition_is_busy_and_silent() {
    let log = fails_cleanly(
        |k| {
            stalled(k);
            lp_module(k, "p");
        },
        |k| {
            let new = k.world.addr_of(Some("p"), "new_fn").unwrap_or(0);
            enable(k, one_func("p", "meminfo_proc_show", new))
        },
        Errno::EBUSY,
    );
    assert!(log.is_empty(), "{log:?}");
    // Disabling another patch during the transition is busy too.
    fails_cleanly(
        |k| {
            k.insmod_cmd("test_klp_livepatch", &[]).expect("lp");
            k.sleep_secs(2.0);
            stalled(k);
        },
        |k| {
            k.klp
                .sysfs_write(&mut k.world, &["test_klp_livepatch", "enabled"], "0\n")
                .map(|_| ())
        },
        Errno::EBUSY,
    );
}

#[test]
fn bad_sysfs_writes() {
    let setup = |k: &mut Kernel| {
        k.insmod_cmd("test_klp_livepatch", &[]).expect("lp");
        k.sleep_secs(2.0);
    };
    let p = "test_klp_livepatch";
    for (attr, val, want) in [
        ("enabled", "1\n", Errno::EINVAL),
        ("enabled", "maybe\n", Errno::EINVAL),
        ("enabled", "\n", Errno::EINVAL),
        ("force", "1\n", Errno::EINVAL),
        ("force", "x\n", Errno::EINVAL),
        ("transition", "1\n", Errno::EACCES),
        ("replace", "0\n", Errno::EACCES),
        ("stack_order", "1\n", Errno::EACCES),
        ("nonexistent", "1\n", Errno::ENOENT),
        ("vmlinux", "1\n", Errno::EISDIR),
    ] {
        fails_cleanly(
            setup,
            |k| k.klp.sysfs_write(&mut k.world, &[p, attr], val).map(|_| ()),
            want,
        );
    }
    fails_cleanly(
        setup,
        |k| k.klp.sysfs_read_string(&[p, "force"]).map(|_| ()),
        Errno::EACCES,
    );
    // force 0 is accepted and does nothing.
    let mut k = boot();
    setup(&mut k);
    let before = k.snapshot();
    assert_eq!(k.klp.sysfs_write(&mut k.world, &[p, "force"], "0\n"), Ok(2));
    assert_eq!(k.snapshot(), before);
}

#[test]
fn refused_module_leaves_no_trace() {
    let log = fails_cleanly(
        |k| {
            k.insmod_cmd("test_klp_callbacks_demo", &[]).expect("demo");
            k.sleep_secs(2.0);
            if let Some(p) = k
                .world
                .modules
                .get_mut("test_klp_callbacks_demo")
                .and_then(|m| m.params.get_mut("pre_patch_ret"))
            {
                p.0 = klp_sim::world::ParamValue::Int(-19);
            }
        },
        |k| insmod_errno(k, "test_klp_callbacks_mod", &[]),
        Errno::ENODEV,
    );
    assert!(
        log.iter()
            .any(|l| l.contains("refusing to load module 'test_klp_callbacks_mod'"))
    );
}

#[test]
fn module_named_vmlinux_is_refused() {
    let log = fails_cleanly(
        |k| {
            k.catalog.insert(
                "vmlinux".into(),
                ModuleDef {
                    name: "vmlinux",
                    livepatch: false,
                    params: vec![],
                    define_funcs: |_, _| {},
                    init: |_| Ok(()),
                    exit: |_| {},
                },
            );
        },
        |k| insmod_errno(k, "vmlinux", &[]),
        Errno::EINVAL,
    );
    assert_eq!(log, vec!["livepatch: vmlinux.ko: invalid module name"]);
}

#[test]
fn disabled_patch_cannot_come_back_and_replaced_ones_are_gone() {
    let mut k = boot();
    k.insmod_cmd("test_klp_livepatch", &[]).expect("lp");
    k.sleep_secs(2.0);
    k.klp
        .sysfs_write(&mut k.world, &["test_klp_livepatch", "enabled"], "0\n")
        .expect("disable");
    k.sleep_secs(2.0);
    assert_eq!(
        k.klp
            .sysfs_write(&mut k.world, &["test_klp_livepatch", "enabled"], "1\n"),
        Err(Errno::ENOENT)
    );
    assert_eq!(k.world.modules["test_klp_livepatch"].refcnt, 0);
}

/// The unpatching transition of a patch whose new code a task sleeps in is forced:
/// the patch is marked forced, keeps its module reference, and the module can never be
/// removed.
#[test]
fn forced_unpatching_keeps_the_module() {
    let mut k = boot();
    k.insmod_cmd("test_klp_livepatch", &[]).expect("lp");
    k.sleep_secs(2.0);
    let newf = k
        .world
        .addr_of(Some("test_klp_livepatch"), "livepatch_cmdline_proc_show")
        .expect("new");
    let st = vec![
        k.world.ret_in("entry_SYSCALL_64"),
        newf + 0x10,
        k.world.ret_in("schedule"),
    ];
    let t = k
        .world
        .spawn(None, "reader", Kind::User, st, Activity::Sleep);
    k.set_sleep(t, klp_sim::world::Sleep::Uninterruptible);
    k.klp
        .sysfs_write(&mut k.world, &["test_klp_livepatch", "enabled"], "0\n")
        .expect("disable");
    k.sleep_secs(5.0);
    assert!(
        k.klp.transition_patch().is_some(),
        "the reader blocks the unpatching"
    );
    assert_eq!(
        k.world.task(t).map(|x| x.patch_state),
        Some(PatchState::Patched)
    );
    let mut blockers = Vec::new();
    k.klp.blockers(&mut k.world, &mut |_, bt, b| {
        blockers.push(format!("{bt:?} {b:?}"));
        if bt == t
            && matches!(b, klp::Blocked::SleepingOn { func, .. } if func == "cmdline_proc_show")
        {
            blockers.push("found".into());
        }
    });
    assert!(blockers.iter().any(|b| b == "found"), "{blockers:?}");
    k.klp
        .sysfs_write(&mut k.world, &["test_klp_livepatch", "force"], "1\n")
        .expect("force");
    k.sleep_secs(2.0);
    assert!(k.klp.transition_patch().is_none());
    assert_eq!(k.world.modules["test_klp_livepatch"].refcnt, 1);
    assert_eq!(k.rmmod_cmd("test_klp_livepatch"), Err(ModError::InUse));
    assert!(
        log_tail(&k, 20)
            .iter()
            .any(|l| l == "livepatch: forcing remaining tasks to the patched state")
    );
}

trait Cands {
    fn symbol_candidates_for_test(&self, name: &str) -> Vec<u64>;
}
impl Cands for World {
    fn symbol_candidates_for_test(&self, name: &str) -> Vec<u64> {
        let mut v = Vec::new();
        <World as klp::Host>::for_each_symbol(self, None, name, &mut |a| {
            v.push(a);
            std::ops::ControlFlow::Continue(())
        });
        v
    }
}

/// A patch for a module function the arriving module does not have: the module is
/// refused with the kernel's messages, and nothing changes.
#[test]
fn arriving_module_without_the_patched_function_is_refused() {
    let log = fails_cleanly(
        |k| {
            let new = lp_module(k, "p");
            enable(
                k,
                PatchDesc::new("p").object(
                    ObjectDesc::module("test_klp_callbacks_mod")
                        .func(FuncDesc::new("missing_fn", new)),
                ),
            )
            .expect("patch for a module that is not loaded");
        },
        |k| insmod_errno(k, "test_klp_callbacks_mod", &[]),
        Errno::EINVAL,
    );
    assert_eq!(
        log,
        vec![
            "livepatch: symbol 'missing_fn' not found in symbol table",
            "livepatch: failed to initialize patch 'p' for module 'test_klp_callbacks_mod' (-22)",
            "livepatch: patch 'p' failed for module 'test_klp_callbacks_mod', refusing to load module 'test_klp_callbacks_mod'",
        ]
    );
}

/// A module function without an entry site: patching it at arrival fails, the earlier
/// patches that did patch the module are reverted.
#[test]
fn arriving_module_that_cannot_be_patched_is_reverted_from_earlier_patches() {
    let mut k = boot();
    // The earlier patch: test_klp_mod_patch, for test_klp_mod_target_show.
    k.insmod_cmd("test_klp_mod_patch", &[]).expect("mod_patch");
    k.sleep_secs(2.0);
    // The later patch wants a function of the same module that has no site.
    let new = lp_module(&mut k, "p");
    enable(
        &mut k,
        PatchDesc::new("p").object(
            ObjectDesc::module("test_klp_mod_target").func(FuncDesc::new("notrace_in_mod", new)),
        ),
    )
    .expect("p");
    k.sleep_secs(2.0);
    k.catalog
        .get_mut("test_klp_mod_target")
        .expect("target")
        .define_funcs = |w, m| {
        w.define(
            Some(m),
            "test_klp_mod_target_show",
            0x40,
            true,
            Rc::new(|_, _| "test_klp_mod_target: original output\n".into()),
        );
        w.define(
            Some(m),
            "notrace_in_mod",
            0x20,
            false,
            Rc::new(|_, _| String::new()),
        );
    };
    let before = k.snapshot();
    let n = k.world.dmesg.len();
    let r = k.insmod_cmd("test_klp_mod_target", &[]);
    assert_eq!(r, Err(ModError::Errno(Errno::EINVAL)));
    k.run_due_works();
    assert_eq!(k.snapshot(), before);
    let log: Vec<&str> = k.world.dmesg[n..].iter().map(|(_, l)| l.as_str()).collect();
    assert_eq!(
        log,
        vec![
            "livepatch: applying patch 'test_klp_mod_patch' to loading module 'test_klp_mod_target'",
            "livepatch: applying patch 'p' to loading module 'test_klp_mod_target'",
            "livepatch: failed to find location for function 'notrace_in_mod'",
            "livepatch: failed to apply patch 'p' to module 'test_klp_mod_target' (-22)",
            "livepatch: patch 'p' failed for module 'test_klp_mod_target', refusing to load module 'test_klp_mod_target'",
            "livepatch: reverting patch 'test_klp_mod_patch' on unloading module 'test_klp_mod_target'",
        ]
    );
}
