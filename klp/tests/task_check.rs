//! `Host::task_check_done`: the core tells the host once it has acted on a task's stack
//! check — switched the task or not — so that a host that keeps a checked task stopped
//! (the process host) releases it then, and not as a side effect of another call.

use std::collections::BTreeMap;
use std::ops::ControlFlow;

use klp::{
    Addr, Comm, FuncDesc, HookError, Host, IdleTask, Klp, ObjectDesc, PatchDesc, PatchId,
    PatchState, Record, RedirectView, TaskId, TraceError,
};

const OLD: Addr = 0x40_1000;
const NEW: Addr = 0x40_8000;
const CALLER: Addr = 0x40_3000;
const SIZE: u64 = 0x100;
const PATCH: &str = "task_check_patch";

/// What a task's stack check answers.
#[derive(Clone)]
enum Stack {
    Trace(Vec<Addr>),
    Fails(TraceError),
}

struct Task {
    stack: Stack,
    state: PatchState,
    pending: bool,
}

/// One event of the host, in the order the core caused them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Event {
    /// A stack check that gave a trace.
    Traced(u64),
    /// A stack check that failed.
    Failed(u64),
    Switched(u64, PatchState),
    Done(u64),
    Logged,
}

struct CheckHost {
    tasks: BTreeMap<u64, Task>,
    events: Vec<Event>,
}

impl CheckHost {
    fn new(tasks: &[(u64, Stack)]) -> Self {
        CheckHost {
            tasks: tasks
                .iter()
                .map(|(id, stack)| {
                    (
                        *id,
                        Task {
                            stack: stack.clone(),
                            state: PatchState::Idle,
                            pending: false,
                        },
                    )
                })
                .collect(),
            events: Vec::new(),
        }
    }

    fn state(&self, t: u64) -> PatchState {
        self.tasks[&t].state
    }

    /// Checks the protocol on the events so far: every stack check of a task is
    /// followed by exactly one `Done` of the same task before anything else is checked
    /// or logged, and after the task's switch when there is one. Returns how many
    /// checks gave a trace and how many `Done`s came.
    fn verify(&self) -> (usize, usize) {
        let mut open: Option<u64> = None;
        let (mut traced, mut done) = (0, 0);
        for (i, e) in self.events.iter().enumerate() {
            match *e {
                Event::Traced(t) | Event::Failed(t) => {
                    assert_eq!(open, None, "event {i}: a check before the last one's end");
                    open = Some(t);
                    if matches!(e, Event::Traced(_)) {
                        traced += 1;
                    }
                }
                Event::Switched(t, _) => {
                    if let Some(o) = open {
                        assert_eq!(o, t, "event {i}: a switch of another task");
                    }
                }
                Event::Done(t) => {
                    assert_eq!(open, Some(t), "event {i}: done without its check");
                    open = None;
                    done += 1;
                }
                Event::Logged => assert_eq!(open, None, "event {i}: a log line mid-check"),
            }
        }
        assert_eq!(open, None, "the last check was never done");
        (traced, done)
    }
}

impl Host for CheckHost {
    fn log(&mut self, _: &Record<'_>) {
        self.events.push(Event::Logged);
    }
    fn warn(&mut self, what: &str) {
        panic!("WARN: {what}");
    }
    fn reliable_stacktrace(&self) -> bool {
        true
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
        if let (None, "old") = (obj, name) {
            let _ = f(OLD);
        }
    }
    fn symbol_size(&self, addr: Addr) -> Option<u64> {
        [OLD, NEW].contains(&addr).then_some(SIZE)
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
        self.events.push(Event::Switched(t.0, s));
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
        match self.tasks[&t.0].stack.clone() {
            Stack::Trace(tr) => {
                self.events.push(Event::Traced(t.0));
                entries[..tr.len()].copy_from_slice(&tr);
                Ok(tr.len())
            }
            Stack::Fails(e) => {
                self.events.push(Event::Failed(t.0));
                Err(e)
            }
        }
    }
    fn task_check_done(&mut self, t: TaskId) {
        self.events.push(Event::Done(t.0));
    }
    fn fake_signal(&mut self, _: TaskId) {}
    fn wake_kthread(&mut self, _: TaskId) {}
    fn wake_cpu(&mut self, _: u32) {}
    fn synchronize(&mut self) {}
    fn schedule_retry(&mut self) {}
    fn schedule_free(&mut self, _: PatchId) {}
}

fn patch() -> PatchDesc<CheckHost> {
    PatchDesc::new(PATCH).object(ObjectDesc::vmlinux().func(FuncDesc::new("old", NEW)))
}

#[test]
fn task_check_done_follows_every_check_switched_or_not() {
    let mut host = CheckHost::new(&[
        (1, Stack::Trace(vec![CALLER + 4])),             // switches
        (2, Stack::Trace(vec![OLD + 0x10, CALLER + 8])), // sleeps in the old function
        (3, Stack::Fails(TraceError::Unreliable)),
        (4, Stack::Trace(vec![CALLER + 0x10])), // switches
    ]);
    let mut klp = Klp::new();
    klp.enable_patch(&mut host, patch()).expect("enable");
    assert!(
        klp.transition_patch().is_some(),
        "tasks 2 and 3 keep it open"
    );
    for t in [1, 4] {
        assert_eq!(host.state(t), PatchState::Patched, "task {t}");
    }
    for t in [2, 3] {
        assert_eq!(host.state(t), PatchState::Unpatched, "task {t}");
    }
    let (traced, done) = host.verify();
    assert_eq!(traced, 3, "tasks 1, 2 and 4 were traced: {:?}", host.events);
    assert_eq!(
        done, 4,
        "one per check, failed ones included: {:?}",
        host.events
    );
    // A switched task hears it after its switch.
    let switched = host
        .events
        .iter()
        .position(|e| *e == Event::Switched(4, PatchState::Patched))
        .expect("task 4 switched");
    assert_eq!(host.events.get(switched + 1), Some(&Event::Done(4)));
    // Not switched: done right after its check.
    let checked = host
        .events
        .iter()
        .position(|e| *e == Event::Traced(2))
        .expect("task 2 checked");
    assert_eq!(host.events.get(checked + 1), Some(&Event::Done(2)));

    // What blocks the transition: the same protocol, nothing switched.
    host.events.clear();
    let mut blocked = Vec::new();
    klp.blockers(&mut host, &mut |_, t, _| blocked.push(t.0));
    assert_eq!(blocked, [2, 3]);
    assert_eq!(host.verify(), (1, 2), "{:?}", host.events);
    assert!(
        !host.events.iter().any(|e| matches!(e, Event::Switched(..))),
        "{:?}",
        host.events
    );

    // The tasks leave: the next attempt switches them, each check done once.
    host.events.clear();
    for t in [2, 3] {
        host.tasks.get_mut(&t).expect("task").stack = Stack::Trace(vec![CALLER + 8]);
    }
    assert!(klp.try_complete_transition(&mut host), "completes");
    let (traced, done) = host.verify();
    assert_eq!((traced, done), (2, 2), "{:?}", host.events);
}
