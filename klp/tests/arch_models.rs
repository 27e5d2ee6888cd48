//! The core's stack check fed by the native architecture's real reliable unwinder.
//!
//! Each task's stack is laid out in the build architecture's own format
//! (`Arch::model_stack`: frame pointers, frame records or back chains) and walked by
//! that architecture's walker whenever the core asks for a reliable trace. Natively
//! this exercises the x86_64 back-end; `ci/test` runs the same test under QEMU for
//! every other back-end of `ci/arches`.

mod common;

use std::collections::BTreeMap;

use klp::arch::{Arch, Native, UnwindError};
use klp::{Addr, Blocked, FuncDesc, Klp, ObjectDesc, PatchDesc, PatchState, TraceError};
use klp_arch::model::HandStack;

use common::taskhost::{Stack, TaskHost};

const TEXT: Addr = 0x40_0000;
const TEXT_END: Addr = 0x50_0000;
const VICTIM: Addr = TEXT + 0x1000;
const NEW_VICTIM: Addr = TEXT + 0x8000;
const OTHER: Addr = TEXT + 0x2000;
const CALLER: Addr = TEXT + 0x3000;
const PATCH: &str = "arch_models_patch";

/// The arch's walker over the task's stack, laid out in the arch's format.
fn walk(trace: &[Addr]) -> Result<Vec<Addr>, UnwindError> {
    let mut mem = HandStack::new(0x7ffe_0000_0000, TEXT..TEXT_END);
    let start = Native::model_stack(&mut mem, trace).expect("the model stack fits");
    klp_arch::trace_reliable::<Native>(&mem, &start).map(|t| t.as_slice().to_vec())
}

/// A host whose tasks' stacks are laid out in the native format and walked by the
/// native unwinder when the core checks them.
fn host(traces: &[(u64, Vec<Addr>)]) -> TaskHost {
    let tasks: Vec<(u64, Stack)> = traces
        .iter()
        .map(|(id, t)| (*id, Stack::Trace(t.clone())))
        .collect();
    TaskHost::new(
        &tasks,
        PATCH,
        ("victim", VICTIM),
        NEW_VICTIM,
        Native::HAVE_RELIABLE_STACKTRACE,
        |t| {
            walk(t).map_err(|e| match e {
                UnwindError::BufferFull => TraceError::TooDeep,
                _ => TraceError::Unreliable,
            })
        },
    )
}

fn patch() -> PatchDesc<TaskHost> {
    PatchDesc::new(PATCH).object(ObjectDesc::vmlinux().func(FuncDesc::new("victim", NEW_VICTIM)))
}

#[test]
fn model_stacks_walk_back_to_their_traces() {
    let trace = vec![OTHER + 4, VICTIM + 0x10, CALLER + 8];
    assert_eq!(walk(&trace), Ok(trace.clone()), "on {}", Native::NAME);
    assert_eq!(
        walk(&[OTHER + 4, 0x1234, CALLER + 8]),
        Err(UnwindError::UnknownReturnAddress { addr: 0x1234 })
    );
}

#[test]
fn stack_check_uses_the_native_unwinder() {
    let deep: Vec<Addr> = (0..100).map(|i| CALLER + 4 * i).collect();
    let mut host = host(&[
        (1, vec![CALLER + 4]),                                // current
        (2, vec![OTHER + 4, VICTIM + 0x10, CALLER + 8]),      // sleeps in victim
        (3, vec![OTHER + 4, CALLER + 8]),                     // elsewhere
        (4, deep),                                            // 100 frames
        (5, vec![OTHER + 4, TEXT_END + 0x10, VICTIM + 0x20]), // unknown return address
        (6, vec![VICTIM + 0x40]),                             // stopped inside victim
    ]);
    let mut klp = Klp::new();
    klp.enable_patch(&mut host, patch()).expect("enable");
    assert!(host.walks > 0, "the core asked for traces");
    assert!(
        klp.transition_patch().is_some(),
        "blocked tasks keep it open"
    );

    assert_eq!(host.state(1), PatchState::Patched);
    assert_eq!(host.state(3), PatchState::Patched);
    for t in [2, 4, 5, 6] {
        assert_eq!(host.state(t), PatchState::Unpatched, "task {t}");
    }

    let mut blocked: BTreeMap<u64, String> = BTreeMap::new();
    klp.blockers(&mut host, &mut |_, t, b| {
        blocked.insert(t.0, format!("{b:?}"));
    });
    let show = |b: Blocked<'_>| format!("{b:?}");
    assert_eq!(
        blocked.get(&2),
        Some(&show(Blocked::SleepingOn {
            func: "victim",
            addr: VICTIM + 0x10,
            frame: 1
        }))
    );
    assert_eq!(
        blocked.get(&4),
        Some(&show(Blocked::Unreliable(TraceError::TooDeep)))
    );
    assert_eq!(
        blocked.get(&5),
        Some(&show(Blocked::Unreliable(TraceError::Unreliable)))
    );
    assert_eq!(
        blocked.get(&6),
        Some(&show(Blocked::SleepingOn {
            func: "victim",
            addr: VICTIM + 0x40,
            frame: 0
        }))
    );
    assert_eq!(blocked.len(), 4, "{blocked:?}");

    // Task 2 leaves victim: the next attempt switches it.
    host.set_stack(2, Stack::Trace(vec![OTHER + 4, CALLER + 8]));
    let mut switched = true;
    klp.blockers(&mut host, &mut |_, t, _| switched &= t.0 != 2);
    assert!(switched, "task 2 no longer blocks");
}
