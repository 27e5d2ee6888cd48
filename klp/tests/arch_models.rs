//! The core's stack check fed by the native architecture's real reliable unwinder.
//!
//! Each task's stack is laid out in the build architecture's own format
//! (`Arch::model_stack`: x86_64 frame pointers, aarch64 frame records, ppc64le and
//! s390x back chains) and walked by that architecture's walker whenever the core asks
//! for a reliable trace. Natively this exercises the x86_64 back-end; `ci/test` runs the
//! same test under QEMU for aarch64, ppc64le and s390x.

use std::collections::BTreeMap;
use std::ops::ControlFlow;

use klp::arch::{Arch, Native, UnwindError};
use klp::{
    Addr, Blocked, Comm, FuncDesc, HookError, Host, IdleTask, Klp, ObjectDesc, PatchDesc, PatchId,
    PatchState, Record, RedirectView, TaskId, TraceError,
};
use klp_arch::model::HandStack;

const TEXT: Addr = 0x40_0000;
const TEXT_END: Addr = 0x50_0000;
const VICTIM: Addr = TEXT + 0x1000;
const NEW_VICTIM: Addr = TEXT + 0x8000;
const OTHER: Addr = TEXT + 0x2000;
const CALLER: Addr = TEXT + 0x3000;
const SIZE: u64 = 0x100;
const PATCH: &str = "arch_models_patch";

struct Task {
    trace: Vec<Addr>,
    state: PatchState,
    pending: bool,
}

struct ModelHost {
    tasks: BTreeMap<u64, Task>,
    log: Vec<String>,
    walks: usize,
}

impl ModelHost {
    fn new(traces: &[(u64, Vec<Addr>)]) -> Self {
        let tasks = traces
            .iter()
            .map(|(id, trace)| {
                (
                    *id,
                    Task {
                        trace: trace.clone(),
                        state: PatchState::Idle,
                        pending: false,
                    },
                )
            })
            .collect();
        ModelHost {
            tasks,
            log: Vec::new(),
            walks: 0,
        }
    }

    fn state(&self, t: u64) -> PatchState {
        self.tasks[&t].state
    }
}

/// The arch's walker over the task's stack, laid out in the arch's format.
fn walk(trace: &[Addr]) -> Result<Vec<Addr>, UnwindError> {
    let mut mem = HandStack::new(0x7ffe_0000_0000, TEXT..TEXT_END);
    let start = Native::model_stack(&mut mem, trace).expect("the model stack fits");
    klp_arch::trace_reliable::<Native>(&mem, &start).map(|t| t.as_slice().to_vec())
}

impl Host for ModelHost {
    fn log(&mut self, rec: &Record<'_>) {
        self.log.push(rec.to_string());
    }
    fn warn(&mut self, what: &str) {
        panic!("WARN: {what}");
    }
    fn reliable_stacktrace(&self) -> bool {
        Native::HAVE_RELIABLE_STACKTRACE
    }
    fn module_is_livepatch(&self, m: &str) -> bool {
        m == PATCH
    }
    fn module_get(&mut self, _: &str) -> bool {
        true
    }
    fn module_put(&mut self, _: &str) {}
    fn for_each_symbol(
        &self,
        obj: Option<&str>,
        name: &str,
        f: &mut dyn FnMut(Addr) -> ControlFlow<()>,
    ) {
        if let (None, "victim") = (obj, name) {
            let _ = f(VICTIM);
        }
    }
    fn symbol_size(&self, addr: Addr) -> Option<u64> {
        [VICTIM, NEW_VICTIM].contains(&addr).then_some(SIZE)
    }
    fn hook_site(&self, addr: Addr) -> Option<Addr> {
        Some(addr)
    }
    fn hook_register(&mut self, _: Addr) -> Result<(), HookError> {
        Ok(())
    }
    fn hook_unregister(&mut self, _: Addr) {}
    fn hook_publish(&mut self, _: Addr, _: Option<RedirectView>) {}
    fn for_each_task(&mut self, f: &mut dyn FnMut(&mut Self, TaskId)) {
        let ids: Vec<u64> = self.tasks.keys().copied().collect();
        for k in ids {
            f(self, TaskId(k));
        }
    }
    fn for_each_idle_task(&mut self, _: &mut dyn FnMut(&mut Self, IdleTask)) {}
    fn current(&self) -> TaskId {
        TaskId(1)
    }
    fn patch_state(&self, t: TaskId) -> PatchState {
        self.tasks[&t.0].state
    }
    fn set_patch_state(&mut self, t: TaskId, s: PatchState) {
        self.tasks.get_mut(&t.0).expect("task").state = s;
    }
    fn patch_pending(&self, t: TaskId) -> bool {
        self.tasks[&t.0].pending
    }
    fn set_patch_pending(&mut self, t: TaskId, pending: bool) {
        self.tasks.get_mut(&t.0).expect("task").pending = pending;
    }
    fn task_ident(&self, t: TaskId) -> (Comm, i64) {
        (Comm::new(&format!("task{}", t.0)), t.0 as i64)
    }
    fn is_kthread(&self, _: TaskId) -> bool {
        true
    }
    fn task_running_elsewhere(&self, _: TaskId) -> bool {
        false
    }
    fn stack_trace_reliable(
        &mut self,
        t: TaskId,
        entries: &mut [Addr],
    ) -> Result<usize, TraceError> {
        self.walks += 1;
        match walk(&self.tasks[&t.0].trace) {
            Ok(tr) if tr.len() <= entries.len() => {
                entries[..tr.len()].copy_from_slice(&tr);
                Ok(tr.len())
            }
            Ok(_) | Err(UnwindError::BufferFull) => Err(TraceError::TooDeep),
            Err(_) => Err(TraceError::Unreliable),
        }
    }
    fn fake_signal(&mut self, _: TaskId) {}
    fn wake_kthread(&mut self, _: TaskId) {}
    fn wake_cpu(&mut self, _: u32) {}
    fn synchronize(&mut self) {}
    fn schedule_retry(&mut self) {}
    fn schedule_free(&mut self, _: PatchId) {}
}

fn patch() -> PatchDesc<ModelHost> {
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
    let mut host = ModelHost::new(&[
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
    host.tasks.get_mut(&2).expect("task").trace = vec![OTHER + 4, CALLER + 8];
    let mut switched = true;
    klp.blockers(&mut host, &mut |_, t, _| switched &= t.0 != 2);
    assert!(switched, "task 2 no longer blocks");
}
