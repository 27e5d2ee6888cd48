//! The consistency model: moving every task from one version of the patched code to
//! the other, only when that is safe for the task.

use alloc::borrow::ToOwned;
use alloc::format;
use alloc::string::String;
use alloc::vec::Vec;

use crate::core::{Cb, Klp, MAX_STACK_ENTRIES, SIGNALS_TIMEOUT, log};
use crate::host::{Addr, Host, PatchState, TaskId, TraceError};
use crate::log::Level;

/// Why [`Klp::try_switch_task`] could not switch a task.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Blocked {
    /// The architecture has no reliable stack traces.
    NoReliableStacks,
    /// The task runs on another CPU.
    Running,
    /// Its stack could not be walked reliably.
    Unreliable(TraceError),
    /// Its stack holds code the transition affects.
    SleepingOn {
        /// `old_name` of the function whose code is on the stack.
        func: String,
        /// The return address found in that code.
        addr: Addr,
        /// Position of that frame in the trace (0 = innermost).
        frame: usize,
    },
}

impl<H: Host> Klp<H> {
    fn all_tasks(host: &H) -> Vec<TaskId> {
        let mut v = host.tasks();
        v.extend(host.idle_tasks().into_iter().map(|i| i.task));
        v
    }

    /// `klp_init_transition`.
    pub(crate) fn init_transition(
        &mut self,
        host: &mut H,
        id: crate::host::PatchId,
        state: PatchState,
    ) {
        if self.target != PatchState::Idle {
            host.warn("klp_init_transition: a transition is already set up");
        }
        self.transition = Some(id);
        self.target = state;
        let name = self.name_of(id).unwrap_or("").to_owned();
        log(
            host,
            Level::Debug,
            "klp_init_transition",
            &format!("'{name}': initializing {} transition", state.verb()),
        );
        let initial = state.inverted();
        let mut warned = false;
        for t in Self::all_tasks(host) {
            if host.patch_state(t) != PatchState::Idle && !warned {
                host.warn("klp_init_transition: task not idle");
                warned = true;
            }
            host.set_patch_state(t, initial);
        }
        if let Some(p) = self.patch_mut(id) {
            for o in &mut p.objs {
                for f in &mut o.funcs {
                    f.transition = true;
                }
            }
        }
        self.publish_all(host);
    }

    /// `klp_start_transition`.
    pub(crate) fn start_transition(&mut self, host: &mut H) {
        if self.target == PatchState::Idle {
            host.warn("klp_start_transition: no target");
        }
        let name = self
            .transition
            .and_then(|id| self.name_of(id))
            .unwrap_or("")
            .to_owned();
        log(
            host,
            Level::Notice,
            "klp_start_transition",
            &format!("'{name}': starting {} transition", self.target.verb()),
        );
        for t in Self::all_tasks(host) {
            if host.patch_state(t) != self.target {
                host.set_patch_pending(t, true);
            }
        }
        self.sched_key = true;
        self.signals_cnt = 0;
    }

    /// Computes what code the transition forbids on stacks: `(start, size, old_name)`.
    fn forbidden_ranges(&self) -> Vec<(Addr, u64, String)> {
        let mut v = Vec::new();
        let Some(id) = self.transition else {
            return v;
        };
        let Some(p) = self.patch(id) else { return v };
        for (oi, o) in p.objs.iter().enumerate() {
            if !o.patched {
                continue;
            }
            for (fi, f) in o.funcs.iter().enumerate() {
                let range = if self.target == PatchState::Unpatched {
                    f.new_func.map(|a| (a, f.new_size))
                } else {
                    let me = crate::core::FuncRef {
                        patch: id,
                        obj: oi,
                        func: fi,
                    };
                    f.old_func.and_then(|old| {
                        let ops = self.ops.iter().find(|o| o.old_func == old)?;
                        let pos = ops.stack.iter().position(|r| *r == me)?;
                        if ops.stack.len() == 1 || pos == 0 {
                            Some((old, f.old_size))
                        } else {
                            let g = self.func(*ops.stack.get(pos - 1)?)?;
                            g.new_func.map(|a| (a, g.new_size))
                        }
                    })
                };
                if let Some((a, s)) = range {
                    v.push((a, s, f.name().into()));
                }
            }
        }
        v
    }

    /// Why `t` cannot switch to the target now, if anything blocks it: the checks of
    /// `klp_try_switch_task` (reliable stacks at all, not running elsewhere, a reliable
    /// trace of fewer than [`MAX_STACK_ENTRIES`] entries, no forbidden code on it).
    fn examine(
        &self,
        host: &mut H,
        t: TaskId,
        ranges: &[(Addr, u64, String)],
    ) -> Result<(), Blocked> {
        if !host.reliable_stacktrace() {
            return Err(Blocked::NoReliableStacks);
        }
        if t != host.current() && host.task_running_elsewhere(t) {
            return Err(Blocked::Running);
        }
        let trace = match host.stack_trace_reliable(t, MAX_STACK_ENTRIES) {
            Ok(tr) if tr.len() < MAX_STACK_ENTRIES => tr,
            Ok(_) => return Err(Blocked::Unreliable(TraceError::TooDeep)),
            Err(e) => return Err(Blocked::Unreliable(e)),
        };
        for (start, size, name) in ranges {
            let hit = |a: &Addr| *a >= *start && *a < start.saturating_add(*size);
            if let Some(frame) = trace.iter().position(hit) {
                return Err(Blocked::SleepingOn {
                    func: name.clone(),
                    addr: trace.get(frame).copied().unwrap_or(0),
                    frame,
                });
            }
        }
        Ok(())
    }

    /// `klp_try_switch_task`: switches `t` to the target if that is safe now.
    pub fn try_switch_task(&mut self, host: &mut H, t: TaskId) -> Result<(), Blocked> {
        if host.patch_state(t) == self.target {
            return Ok(());
        }
        let ranges = self.forbidden_ranges();
        if let Err(b) = self.examine(host, t, &ranges) {
            let (comm, pid) = host.task_ident(t);
            let why = match &b {
                Blocked::NoReliableStacks => return Err(b),
                Blocked::Running => String::from("is running"),
                Blocked::Unreliable(_) => String::from("has an unreliable stack"),
                Blocked::SleepingOn { func, .. } => format!("is sleeping on function {func}"),
            };
            log(
                host,
                Level::Debug,
                "klp_try_switch_task",
                &format!("klp_try_switch_task: {comm}:{pid} {why}"),
            );
            return Err(b);
        }
        host.set_patch_pending(t, false);
        host.set_patch_state(t, self.target);
        Ok(())
    }

    /// What blocks each task that has not switched yet, without changing anything: the
    /// explanation a tool shows during a long transition.
    pub fn blockers(&self, host: &mut H) -> Vec<(TaskId, Blocked)> {
        let mut v = Vec::new();
        if self.transition.is_none() {
            return v;
        }
        let ranges = self.forbidden_ranges();
        for t in Self::all_tasks(host) {
            if host.patch_state(t) == self.target {
                continue;
            }
            if let Err(b) = self.examine(host, t, &ranges) {
                v.push((t, b));
            }
        }
        v
    }

    /// `klp_try_complete_transition`: one completion attempt. Returns whether the
    /// transition completed.
    pub fn try_complete_transition(&mut self, host: &mut H) -> bool {
        if self.target == PatchState::Idle {
            host.warn("klp_try_complete_transition: no target");
        }
        let mut complete = true;
        let tasks = host.tasks();
        let pending: Vec<TaskId> = tasks
            .iter()
            .copied()
            .filter(|t| host.patch_state(*t) != self.target)
            .collect();
        if !pending.is_empty() {
            host.prepare_checks(&pending);
        }
        for t in tasks {
            if self.try_switch_task(host, t).is_err() {
                complete = false;
            }
        }
        for it in host.idle_tasks() {
            if it.online {
                if self.try_switch_task(host, it.task).is_err() {
                    complete = false;
                    host.wake_cpu(it.cpu);
                }
            } else if host.patch_state(it.task) != self.target {
                host.set_patch_pending(it.task, false);
                host.set_patch_state(it.task, self.target);
            }
        }
        if !complete {
            if self.signals_cnt > 0 && self.signals_cnt.is_multiple_of(SIGNALS_TIMEOUT) {
                self.send_signals(host);
            }
            self.signals_cnt += 1;
            host.schedule_retry();
            return false;
        }
        self.sched_key = false;
        let Some(id) = self.transition else {
            return true;
        };
        self.complete_transition(host);
        let (enabled, replace) = self
            .patch(id)
            .map_or((false, false), |p| (p.enabled, p.replace));
        if !enabled {
            self.free_patch_async(host, id);
        } else if replace {
            let before: Vec<_> = self.list.iter().copied().take_while(|x| *x != id).collect();
            for old in before {
                self.free_patch_async(host, old);
            }
        }
        true
    }

    /// The retry work item: one more completion attempt if a transition still runs.
    pub fn retry_work(&mut self, host: &mut H) {
        if self.transition.is_some() {
            self.try_complete_transition(host);
        }
    }

    /// `klp_complete_transition`.
    pub(crate) fn complete_transition(&mut self, host: &mut H) {
        let Some(id) = self.transition else { return };
        let name = self.name_of(id).unwrap_or("").to_owned();
        let target = self.target;
        log(
            host,
            Level::Debug,
            "klp_complete_transition",
            &format!("'{name}': completing {} transition", target.verb()),
        );
        let replace = self.patch(id).is_some_and(|p| p.replace);
        if replace && target == PatchState::Patched {
            let before: Vec<_> = self.list.iter().copied().take_while(|x| *x != id).collect();
            for old in before {
                if let Some(p) = self.patch_mut(old) {
                    p.enabled = false;
                }
                self.unpatch_objects(host, old, false);
            }
            self.unpatch_objects(host, id, true);
            self.free_nops(id);
        }
        if target == PatchState::Unpatched {
            self.unpatch_objects(host, id, false);
            host.synchronize();
        }
        if let Some(p) = self.patch_mut(id) {
            for o in &mut p.objs {
                for f in &mut o.funcs {
                    f.transition = false;
                }
            }
        }
        self.publish_all(host);
        if target == PatchState::Patched {
            host.synchronize();
        }
        let mut warned = false;
        for t in Self::all_tasks(host) {
            if host.patch_pending(t) && !warned {
                host.warn("klp_complete_transition: task still pending");
                warned = true;
            }
            host.set_patch_state(t, PatchState::Idle);
        }
        let nobjs = self.patch(id).map_or(0, |p| p.objs.len());
        for oi in 0..nobjs {
            let loaded = self
                .patch(id)
                .and_then(|p| p.objs.get(oi))
                .is_some_and(|o| o.loaded);
            if !loaded {
                continue;
            }
            if target == PatchState::Patched {
                self.run_callback(host, id, oi, Cb::PostPatch);
            } else {
                self.post_unpatch_step(host, id, oi);
            }
        }
        log(
            host,
            Level::Notice,
            "klp_complete_transition",
            &format!("'{name}': {} complete", target.verb()),
        );
        self.target = PatchState::Idle;
        self.transition = None;
    }

    /// `klp_cancel_transition`: undo an enable that failed before it started.
    pub(crate) fn cancel_transition(&mut self, host: &mut H) {
        if self.target != PatchState::Patched {
            host.warn("klp_cancel_transition: not patching");
            return;
        }
        let name = self
            .transition
            .and_then(|id| self.name_of(id))
            .unwrap_or("")
            .to_owned();
        log(
            host,
            Level::Debug,
            "klp_cancel_transition",
            &format!("'{name}': canceling patching transition, going to unpatch"),
        );
        self.target = PatchState::Unpatched;
        self.complete_transition(host);
    }

    /// `klp_reverse_transition`.
    pub(crate) fn reverse_transition(&mut self, host: &mut H) {
        let Some(id) = self.transition else { return };
        let name = self.name_of(id).unwrap_or("").to_owned();
        let dir = if self.target == PatchState::Patched {
            "patching to unpatching"
        } else {
            "unpatching to patching"
        };
        log(
            host,
            Level::Debug,
            "klp_reverse_transition",
            &format!("'{name}': reversing transition from {dir}"),
        );
        for t in Self::all_tasks(host) {
            host.set_patch_pending(t, false);
        }
        host.synchronize();
        if let Some(p) = self.patch_mut(id) {
            p.enabled = !p.enabled;
        }
        self.target = self.target.inverted();
        self.start_transition(host);
    }

    /// `klp_force_transition`: switch every remaining task without a stack check.
    pub(crate) fn force_transition(&mut self, host: &mut H) {
        log(
            host,
            Level::Warn,
            "klp_force_transition",
            "forcing remaining tasks to the patched state",
        );
        for t in Self::all_tasks(host) {
            self.update_patch_state(host, t);
        }
        let Some(id) = self.transition else { return };
        if self.target == PatchState::Unpatched {
            if let Some(p) = self.patch_mut(id) {
                p.forced = true;
            }
        } else if self.patch(id).is_some_and(|p| p.replace) {
            let others: Vec<_> = self.list.iter().copied().filter(|x| *x != id).collect();
            for o in others {
                if let Some(p) = self.patch_mut(o) {
                    p.forced = true;
                }
            }
        }
    }

    /// `klp_send_signals`.
    fn send_signals(&mut self, host: &mut H) {
        if self.signals_cnt == SIGNALS_TIMEOUT {
            log(
                host,
                Level::Notice,
                "klp_send_signals",
                "signaling remaining tasks",
            );
        }
        for t in host.tasks() {
            if !host.patch_pending(t) {
                continue;
            }
            if host.is_kthread(t) {
                host.wake_kthread(t);
            } else {
                host.fake_signal(t);
            }
        }
    }

    /// `klp_update_patch_state`: the safe-point switch. Call it for the current task at
    /// the return to user mode and in the idle loop (or for a task that cannot run).
    pub fn update_patch_state(&self, host: &mut H, t: TaskId) {
        if host.patch_pending(t) {
            host.set_patch_pending(t, false);
            host.set_patch_state(t, self.target);
        }
    }

    /// The scheduler hook: the current task `t` is about to sleep freezably. If a
    /// transition runs and the task is pending, try to switch it with a stack check.
    pub fn sched_try_switch(&mut self, host: &mut H, t: TaskId) {
        if self.sched_key && host.patch_pending(t) {
            let _ = self.try_switch_task(host, t);
        }
    }

    /// Fork: the child copies the parent's pending flag and state.
    pub fn fork_inherit(host: &mut H, parent: TaskId, child: TaskId) {
        let (s, p) = (host.patch_state(parent), host.patch_pending(parent));
        host.set_patch_state(child, s);
        host.set_patch_pending(child, p);
    }

    /// The number of failed completion attempts since the transition (re)started.
    pub fn signals_count(&self) -> u32 {
        self.signals_cnt
    }
}
