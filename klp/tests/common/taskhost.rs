//! A host of tasks for the core's transition tests: one livepatch module replacing one
//! function of vmlinux, kernel threads whose stack checks answer through the test's
//! own function, and a record of what the core did to them, in order.

use std::collections::BTreeMap;
use std::ops::ControlFlow;

use klp::{
    Addr, Comm, HookError, Host, IdleTask, PatchId, PatchState, Record, RedirectView, TaskId,
    TraceError,
};

/// The size of the old and the new function.
pub const SIZE: u64 = 0x100;

/// What a task's stack check is given.
#[derive(Clone, Debug)]
pub enum Stack {
    /// The return addresses, innermost first.
    Trace(Vec<Addr>),
    /// The check fails with this error.
    Fails(TraceError),
}

/// One task.
#[derive(Debug)]
pub struct Task {
    pub stack: Stack,
    pub state: PatchState,
    pub pending: bool,
}

/// One event of the host, in the order the core caused them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Event {
    /// A stack check that gave a trace.
    Traced(u64),
    /// A stack check that failed.
    Failed(u64),
    Switched(u64, PatchState),
    Done(u64),
    Logged,
}

/// How a task's [`Stack`] becomes a trace (the identity, or a real unwinder's walk).
pub type Walk = fn(&[Addr]) -> Result<Vec<Addr>, TraceError>;

/// The host.
pub struct TaskHost {
    pub tasks: BTreeMap<u64, Task>,
    pub events: Vec<Event>,
    pub log: Vec<String>,
    /// Stack checks asked for.
    pub walks: usize,
    /// The livepatch module's name.
    patch: &'static str,
    /// The old function: its name and address; and the new one's address.
    old: (&'static str, Addr),
    new: Addr,
    reliable: bool,
    walk: Walk,
}

impl TaskHost {
    /// Tasks `tasks` (all idle), a livepatch module `patch` replacing `old` by a
    /// function at `new`, traces made by `walk`; `reliable`: the host has reliable
    /// stack traces.
    pub fn new(
        tasks: &[(u64, Stack)],
        patch: &'static str,
        old: (&'static str, Addr),
        new: Addr,
        reliable: bool,
        walk: Walk,
    ) -> Self {
        TaskHost {
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
            log: Vec::new(),
            walks: 0,
            patch,
            old,
            new,
            reliable,
            walk,
        }
    }

    pub fn state(&self, t: u64) -> PatchState {
        self.tasks[&t].state
    }

    /// Gives task `t` a new stack.
    pub fn set_stack(&mut self, t: u64, stack: Stack) {
        self.tasks.get_mut(&t).expect("task").stack = stack;
    }
}

impl Host for TaskHost {
    fn log(&mut self, rec: &Record<'_>) {
        self.log.push(rec.to_string());
        self.events.push(Event::Logged);
    }
    fn warn(&mut self, what: &str) {
        panic!("WARN: {what}");
    }
    fn reliable_stacktrace(&self) -> bool {
        self.reliable
    }
    fn module_is_livepatch(&self, m: &str) -> bool {
        m == self.patch
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
        if obj.is_none() && name == self.old.0 {
            let _ = f(self.old.1);
        }
    }
    fn symbol_size(&self, addr: Addr) -> Option<u64> {
        [self.old.1, self.new].contains(&addr).then_some(SIZE)
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
        self.walks += 1;
        let walked = match &self.tasks[&t.0].stack {
            Stack::Trace(tr) => (self.walk)(tr),
            Stack::Fails(e) => Err(*e),
        };
        match walked {
            Ok(tr) if tr.len() <= entries.len() => {
                self.events.push(Event::Traced(t.0));
                entries[..tr.len()].copy_from_slice(&tr);
                Ok(tr.len())
            }
            Ok(_) => {
                self.events.push(Event::Failed(t.0));
                Err(TraceError::TooDeep)
            }
            Err(e) => {
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
