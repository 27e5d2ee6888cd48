//! Allocation failure injected at every step of the core's operations.
//!
//! For each operation, the operation is first run with the core's allocations counted
//! (none failed); then, for every N below that count, it is run again on a freshly
//! booted kernel with the core's Nth allocation failing. Each such run must return
//! `-ENOMEM`, leave the machine's snapshot (patches, redirect records, sysfs, tasks,
//! modules, ftrace, work) exactly as it was, leave none of the core's allocations
//! behind, raise no WARN, and print only lines the kernel prints on that path.
//! Operations that allocate nothing are shown to allocate nothing. Run with
//! `--nocapture` to see the number of failure points per operation.

mod common;

use std::collections::BTreeSet;

use klp::Errno;
use klp::shadow::{ShadowError, ShadowStore};
use klp_sim::Kernel;
use klp_sim::failalloc::{self, FailAlloc, Report};
use klp_sim::kernel::ModError;

#[global_allocator]
static ALLOC: FailAlloc = FailAlloc;

fn insmod(k: &mut Kernel, m: &str, params: &[&str]) -> Result<(), Errno> {
    match k.insmod_cmd(m, params) {
        Ok(()) => Ok(()),
        Err(ModError::Errno(e)) => Err(e),
        Err(other) => panic!("insmod {m}: {other:?}"),
    }
}

fn rmmod(k: &mut Kernel, m: &str) -> Result<(), Errno> {
    k.rmmod_cmd(m).map_err(|e| panic!("rmmod {m}: {e:?}"))
}

fn write(k: &mut Kernel, path: &str, v: &str) -> Result<(), Errno> {
    k.write_file(path, v)
}

/// Loads a livepatch and lets its transition finish.
fn loaded(k: &mut Kernel, m: &str, params: &[&str]) {
    insmod(k, m, params).unwrap_or_else(|e| panic!("insmod {m}: {e:?}"));
    k.sleep_secs(3.0);
    assert!(k.klp.transition_patch().is_none(), "{m} settled");
}

/// A transition held up by a kworker sleeping in patched code.
fn stuck(k: &mut Kernel) {
    insmod(k, "test_klp_callbacks_busy", &["block_transition=Y"]).expect("busy");
    k.sleep_secs(1.0);
    insmod(k, "test_klp_callbacks_demo", &[]).expect("demo");
    k.sleep_secs(2.0);
    assert!(k.klp.transition_patch().is_some(), "the transition waits");
}

struct Op {
    name: &'static str,
    setup: fn(&mut Kernel),
    run: fn(&mut Kernel) -> Result<(), Errno>,
    /// Lines the kernel prints when this operation fails part-way, beyond those of
    /// its successful run.
    failure_lines: &'static [&'static str],
}

fn lines_since(k: &Kernel, n: usize) -> Vec<String> {
    k.world.dmesg[n..].iter().map(|(_, l)| l.clone()).collect()
}

/// Runs `op` once with the core's allocations counted; returns the report and the
/// lines it printed.
fn counted(op: &Op) -> (Report, Vec<String>) {
    let mut k = Kernel::boot(2);
    (op.setup)(&mut k);
    k.run_due_works();
    let n = k.world.dmesg.len();
    failalloc::arm(None);
    let r = (op.run)(&mut k);
    let rep = failalloc::disarm();
    assert_eq!(r, Ok(()), "{}: succeeds without failures", op.name);
    assert!(!rep.overflow, "{}: tracking overflowed", op.name);
    (rep, lines_since(&k, n))
}

/// Fails each of the core's allocations of `op` in turn; returns how many there are.
fn sweep(op: &Op) -> u64 {
    let (full, ok_lines) = counted(op);
    let allowed: BTreeSet<String> = ok_lines
        .into_iter()
        .chain(op.failure_lines.iter().map(|s| s.to_string()))
        .collect();
    for n in 0..full.core_allocs {
        let mut k = Kernel::boot(2);
        (op.setup)(&mut k);
        k.run_due_works();
        let before = k.snapshot();
        let log_start = k.world.dmesg.len();
        failalloc::arm(Some(n));
        let r = (op.run)(&mut k);
        let rep = failalloc::disarm();
        let what = format!("{}: allocation {n} of {} failed", op.name, full.core_allocs);
        assert!(rep.failed, "{what}: the failure was not reached");
        assert!(!rep.overflow, "{what}: tracking overflowed");
        assert_eq!(r, Err(Errno::ENOMEM), "{what}");
        assert_eq!(rep.live, 0, "{what}: the core kept allocations");
        k.run_due_works();
        assert_eq!(k.snapshot(), before, "{what}: state changed");
        assert!(
            k.world.warnings.is_empty(),
            "{what}: {:?}",
            k.world.warnings
        );
        let lines = lines_since(&k, log_start);
        for l in &lines {
            assert!(
                allowed.contains(l),
                "{what}: unexpected line {l:?} in {lines:#?}"
            );
        }
        // The kernel pairs these: an enable that started reports its failure.
        let started = lines.iter().any(|l| l.contains(": enabling patch '"));
        let reported = lines
            .iter()
            .any(|l| l.contains(": failed to enable patch '"));
        assert_eq!(started, reported, "{what}: {lines:#?}");
    }
    full.core_allocs
}

fn report(op: &Op, points: u64) {
    println!(
        "alloc-failure: {}: {points} failure points, each -ENOMEM with the state unchanged",
        op.name
    );
}

const ENABLE_FAIL: &[&str] = &[
    "livepatch: failed to patch object 'vmlinux'",
    "livepatch: failed to enable patch 'test_klp_livepatch'",
    "livepatch: 'test_klp_livepatch': canceling patching transition, going to unpatch",
    "livepatch: 'test_klp_livepatch': completing unpatching transition",
    "livepatch: 'test_klp_livepatch': unpatching complete",
];

#[test]
fn enable_plain() {
    let op = Op {
        name: "enable",
        setup: |_| {},
        run: |k| insmod(k, "test_klp_livepatch", &[]),
        failure_lines: ENABLE_FAIL,
    };
    let n = sweep(&op);
    assert!(
        n >= 3,
        "enable allocates its objects, record and stack entry"
    );
    report(&op, n);
}

#[test]
fn enable_with_replace() {
    let op = Op {
        name: "enable with replace",
        setup: |k| loaded(k, "test_klp_livepatch", &[]),
        run: |k| insmod(k, "test_klp_atomic_replace", &["replace=1"]),
        failure_lines: &[
            "livepatch: failed to patch object 'vmlinux'",
            "livepatch: failed to enable patch 'test_klp_atomic_replace'",
            "livepatch: 'test_klp_atomic_replace': canceling patching transition, going to unpatch",
            "livepatch: 'test_klp_atomic_replace': completing unpatching transition",
            "livepatch: 'test_klp_atomic_replace': unpatching complete",
        ],
    };
    let n = sweep(&op);
    let plain = counted(&Op {
        name: "enable without replace",
        setup: |k| loaded(k, "test_klp_livepatch", &[]),
        run: |k| insmod(k, "test_klp_atomic_replace", &["replace=0"]),
        failure_lines: &[],
    })
    .0
    .core_allocs;
    assert!(n > plain, "the nop functions allocate too ({n} vs {plain})");
    report(&op, n);
}

#[test]
fn enable_with_callbacks() {
    let op = Op {
        name: "enable with callbacks",
        setup: |k| insmod(k, "test_klp_callbacks_mod", &[]).expect("target module"),
        run: |k| insmod(k, "test_klp_callbacks_demo", &[]),
        failure_lines: &[
            "livepatch: failed to patch object 'vmlinux'",
            "livepatch: failed to patch object 'test_klp_callbacks_mod'",
            "livepatch: failed to enable patch 'test_klp_callbacks_demo'",
            "livepatch: 'test_klp_callbacks_demo': canceling patching transition, going to unpatch",
            "livepatch: 'test_klp_callbacks_demo': completing unpatching transition",
            "livepatch: 'test_klp_callbacks_demo': unpatching complete",
            "test_klp_callbacks_demo: post_unpatch_callback: vmlinux",
            "test_klp_callbacks_demo: post_unpatch_callback: test_klp_callbacks_mod -> [MODULE_STATE_LIVE] Normal state",
        ],
    };
    let n = sweep(&op);
    assert!(n >= 3);
    report(&op, n);
}

#[test]
fn enable_with_states() {
    let op = Op {
        name: "enable with system states",
        setup: |k| loaded(k, "test_klp_state", &[]),
        run: |k| insmod(k, "test_klp_state2", &[]),
        failure_lines: &[
            "livepatch: failed to patch object 'vmlinux'",
            "livepatch: failed to enable patch 'test_klp_state2'",
            "livepatch: 'test_klp_state2': canceling patching transition, going to unpatch",
            "livepatch: 'test_klp_state2': completing unpatching transition",
            "livepatch: 'test_klp_state2': unpatching complete",
            "test_klp_state2: post_unpatch_callback: vmlinux",
            "test_klp_state2: restore_console_loglevel: restoring console_loglevel",
            "test_klp_state2: free_loglevel_state: freeing space for loglevel",
        ],
    };
    let n = sweep(&op);
    assert!(n >= 1);
    report(&op, n);
}

#[test]
fn module_arrival() {
    let op = Op {
        name: "module arrival",
        setup: |k| loaded(k, "test_klp_callbacks_demo", &[]),
        run: |k| insmod(k, "test_klp_callbacks_mod", &[]),
        failure_lines: &[
            "livepatch: failed to apply patch 'test_klp_callbacks_demo' to module 'test_klp_callbacks_mod' (-12)",
            "livepatch: patch 'test_klp_callbacks_demo' failed for module 'test_klp_callbacks_mod', refusing to load module 'test_klp_callbacks_mod'",
            "test_klp_callbacks_demo: post_unpatch_callback: test_klp_callbacks_mod -> [MODULE_STATE_COMING] Full formed, running module_init",
        ],
    };
    let n = sweep(&op);
    assert!(n >= 1, "the arrival allocates");
    report(&op, n);
}

#[test]
fn module_arrival_with_functions() {
    let op = Op {
        name: "module arrival with patched functions",
        setup: |k| loaded(k, "test_klp_callbacks_demo", &[]),
        run: |k| insmod(k, "test_klp_callbacks_busy", &[]),
        failure_lines: &[
            "livepatch: failed to apply patch 'test_klp_callbacks_demo' to module 'test_klp_callbacks_busy' (-12)",
            "livepatch: patch 'test_klp_callbacks_demo' failed for module 'test_klp_callbacks_busy', refusing to load module 'test_klp_callbacks_busy'",
            "test_klp_callbacks_demo: post_unpatch_callback: test_klp_callbacks_busy -> [MODULE_STATE_COMING] Full formed, running module_init",
        ],
    };
    let n = sweep(&op);
    assert!(
        n >= 2,
        "the arrival, the redirect record and its stack allocate"
    );
    report(&op, n);
}

#[test]
fn loading_an_elf_patch() {
    let op = Op {
        name: "loading an ELF patch",
        setup: |k| k.add_elf_module(common::LP, common::elf_patch()),
        run: |k| insmod(k, common::LP, &[]),
        failure_lines: &[
            "livepatch: failed to patch object 'vmlinux'",
            "livepatch: failed to enable patch 'elf_lp'",
            "livepatch: 'elf_lp': canceling patching transition, going to unpatch",
            "livepatch: 'elf_lp': completing unpatching transition",
            "livepatch: 'elf_lp': unpatching complete",
        ],
    };
    let n = sweep(&op);
    assert!(
        n >= 5,
        "the relocation staging, the records and the redirect allocate"
    );
    report(&op, n);
}

#[test]
fn module_arrival_with_elf_relocations() {
    let op = Op {
        name: "module arrival with livepatch relocations",
        setup: |k| {
            k.add_elf_module(common::LP, common::elf_patch());
            loaded(k, common::LP, &[]);
        },
        run: |k| insmod(k, common::BUSY, &[]),
        failure_lines: &[
            "livepatch: failed to initialize patch 'elf_lp' for module 'test_klp_callbacks_busy' (-12)",
            "livepatch: failed to apply patch 'elf_lp' to module 'test_klp_callbacks_busy' (-12)",
            "livepatch: patch 'elf_lp' failed for module 'test_klp_callbacks_busy', refusing to load module 'test_klp_callbacks_busy'",
        ],
    };
    let n = sweep(&op);
    assert!(
        n >= 3,
        "staging the module's section and its redirect allocate"
    );
    report(&op, n);
}

/// Operations that allocate nothing cannot fail for want of memory: the test shows
/// they allocate nothing, and still work.
fn allocates_nothing(op: &Op) {
    let (rep, _) = counted(op);
    assert_eq!(rep.core_allocs, 0, "{} allocates", op.name);
    assert_eq!(rep.live, 0);
    println!(
        "alloc-failure: {}: 0 allocations: it cannot fail for want of memory",
        op.name
    );
}

#[test]
fn operations_that_allocate_nothing() {
    for op in [
        Op {
            name: "disable",
            setup: |k| loaded(k, "test_klp_livepatch", &[]),
            run: |k| write(k, "/sys/kernel/livepatch/test_klp_livepatch/enabled", "0"),
            failure_lines: &[],
        },
        Op {
            name: "reverse",
            setup: stuck,
            run: |k| {
                write(
                    k,
                    "/sys/kernel/livepatch/test_klp_callbacks_demo/enabled",
                    "0",
                )
            },
            failure_lines: &[],
        },
        Op {
            name: "force",
            setup: stuck,
            run: |k| {
                write(
                    k,
                    "/sys/kernel/livepatch/test_klp_callbacks_demo/force",
                    "1",
                )
            },
            failure_lines: &[],
        },
        Op {
            name: "completion attempts",
            setup: stuck,
            run: |k| {
                k.sleep_secs(20.0);
                Ok(())
            },
            failure_lines: &[],
        },
        Op {
            name: "module removal",
            setup: |k| {
                loaded(k, "test_klp_callbacks_demo", &[]);
                insmod(k, "test_klp_callbacks_mod", &[]).expect("mod");
            },
            run: |k| rmmod(k, "test_klp_callbacks_mod"),
            failure_lines: &[],
        },
    ] {
        allocates_nothing(&op);
    }
}

/// Shadow variables: `alloc` and `get_or_alloc` fail with `NoMem` at every allocation
/// and leave the store as it was.
#[test]
fn shadow_alloc_and_get_or_alloc() {
    type ShadowOp = fn(&ShadowStore, usize) -> Result<(), ShadowError>;
    let ops: [(&str, ShadowOp); 2] = [
        ("shadow alloc", |s, obj| s.alloc(obj, 7, 24).map(drop)),
        ("shadow get_or_alloc", |s, obj| {
            s.get_or_alloc(obj, 7, 24).map(drop)
        }),
    ];
    for (name, op) in ops {
        // A store that already holds variables, so the failing one may need a bigger
        // table as well as its own node.
        let fill = |s: &ShadowStore| {
            for obj in 0..40 {
                s.alloc(0x1000 + obj * 64, 1, 8).expect("fill");
            }
        };
        let probe = ShadowStore::new();
        fill(&probe);
        failalloc::arm(None);
        failalloc::core(|| op(&probe, 0x9000)).expect("succeeds");
        let full = failalloc::disarm();
        assert!(full.core_allocs >= 1, "{name} allocates");
        for n in 0..full.core_allocs {
            let store = ShadowStore::new();
            fill(&store);
            let len = store.len();
            failalloc::arm(Some(n));
            let r = failalloc::core(|| op(&store, 0x9000));
            let rep = failalloc::disarm();
            assert!(rep.failed, "{name}: allocation {n}");
            assert_eq!(r, Err(ShadowError::NoMem), "{name}: allocation {n}");
            assert_eq!(rep.live, 0, "{name}: allocation {n} left memory behind");
            assert_eq!(store.len(), len);
            assert!(store.get(0x9000, 7).is_none());
            for obj in 0..40 {
                assert!(
                    store.get(0x1000 + obj * 64, 1).is_some(),
                    "{name}: lost {obj}"
                );
            }
            // And the store still works.
            store.alloc(0x9000, 7, 24).expect("after the failure");
        }
        println!(
            "alloc-failure: {name}: {} failure points, each NoMem with the store unchanged",
            full.core_allocs
        );
    }
}
