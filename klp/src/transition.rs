//! The consistency model: moving every task from one version of the patched code to
//! the other, only when that is safe for the task.
//!
//! Nothing here allocates: the code a transition forbids on stacks (one range per
//! function) is computed once per completion attempt into room reserved when the patch
//! was initialised, and stack traces are written into a buffer of
//! [`MAX_STACK_ENTRIES`] kept in the core, as the kernel keeps its `entries` array.

use alloc::vec::Vec;

use crate::core::{Cb, FuncRef, Klp, MAX_STACK_ENTRIES, Patch, SIGNALS_TIMEOUT, func_in};
use crate::errno::KResult;
use crate::fallible::{push_reserved, reserve_total};
use crate::host::{Addr, Host, PatchId, PatchState, TaskId, TraceError};
use crate::log::{Level, klp_log};

/// Why [`Klp::try_switch_task`] could not switch a task. Names are borrowed from the
/// core.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Blocked<'a> {
    /// The architecture has no reliable stack traces.
    NoReliableStacks,
    /// The task runs on another CPU.
    Running,
    /// Its stack could not be walked reliably.
    Unreliable(TraceError),
    /// Its stack holds code the transition affects.
    SleepingOn {
        /// `old_name` of the function whose code is on the stack.
        func: &'a str,
        /// The return address found in that code.
        addr: Addr,
        /// Position of that frame in the trace (0 = innermost).
        frame: usize,
    },
}

/// Code a transition forbids on a task's stack: `[start, start + size)` belongs to
/// `func`'s old (or, when unpatching, new) implementation.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Range {
    start: Addr,
    size: u64,
    func: FuncRef,
}

/// [`Blocked`] before the function's name is looked up.
#[derive(Clone, Copy, Debug)]
enum Why {
    NoReliableStacks,
    Running,
    Unreliable(TraceError),
    SleepingOn {
        func: FuncRef,
        addr: Addr,
        frame: usize,
    },
}

impl Why {
    fn name<H>(self, patches: &[Patch<H>]) -> Blocked<'_> {
        match self {
            Why::NoReliableStacks => Blocked::NoReliableStacks,
            Why::Running => Blocked::Running,
            Why::Unreliable(e) => Blocked::Unreliable(e),
            Why::SleepingOn { func, addr, frame } => Blocked::SleepingOn {
                func: func_in(patches, func).map_or("", |f| f.name()),
                addr,
                frame,
            },
        }
    }
}

/// What the stack checks use, owned by the core so that they allocate nothing.
#[derive(Debug)]
pub(crate) struct Scratch {
    ranges: Vec<Range>,
    /// Whether `ranges` holds every range of the current attempt (room ran out
    /// otherwise, and no task may be switched by a stack check).
    complete: bool,
    entries: [Addr; MAX_STACK_ENTRIES],
}

impl Default for Scratch {
    fn default() -> Self {
        Scratch {
            ranges: Vec::new(),
            complete: true,
            entries: [0; MAX_STACK_ENTRIES],
        }
    }
}

impl Scratch {
    /// Makes room for the ranges of a patch with `funcs` functions.
    pub(crate) fn reserve(&mut self, funcs: usize) -> KResult<()> {
        reserve_total(&mut self.ranges, funcs)
    }

    /// `klp_check_stack` for one task, without the message: the checks of
    /// `klp_try_switch_task` (reliable stacks at all, not running elsewhere, a reliable
    /// trace of fewer than [`MAX_STACK_ENTRIES`] entries, no forbidden code on it).
    /// The flag says whether [`Host::stack_trace_reliable`] was asked for the task: the
    /// caller then owes the host [`Host::task_check_done`] once it has acted on the
    /// result.
    fn examine<H: Host>(&mut self, host: &mut H, t: TaskId) -> (Result<(), Why>, bool) {
        if !host.reliable_stacktrace() {
            return (Err(Why::NoReliableStacks), false);
        }
        if t != host.current() && host.task_running_elsewhere(t) {
            return (Err(Why::Running), false);
        }
        if !self.complete {
            return (Err(Why::Unreliable(TraceError::Unreliable)), false);
        }
        (self.check_trace(host, t), true)
    }

    /// The trace part of [`Scratch::examine`]: the host's reliable trace of `t`, and no
    /// forbidden code on it.
    fn check_trace<H: Host>(&mut self, host: &mut H, t: TaskId) -> Result<(), Why> {
        let n = match host.stack_trace_reliable(t, &mut self.entries) {
            Ok(n) if n < MAX_STACK_ENTRIES => n,
            Ok(_) => return Err(Why::Unreliable(TraceError::TooDeep)),
            Err(e) => return Err(Why::Unreliable(e)),
        };
        let trace = self.entries.get(..n).unwrap_or(&[]);
        for r in &self.ranges {
            let hit = |a: &Addr| *a >= r.start && *a < r.start.saturating_add(r.size);
            if let Some(frame) = trace.iter().position(hit) {
                return Err(Why::SleepingOn {
                    func: r.func,
                    addr: trace.get(frame).copied().unwrap_or(0),
                    frame,
                });
            }
        }
        Ok(())
    }

    /// `klp_try_switch_task` once the ranges are computed: switches `t` to `target` if
    /// that is safe now, or prints why not.
    fn switch<H: Host>(
        &mut self,
        patches: &[Patch<H>],
        target: PatchState,
        host: &mut H,
        t: TaskId,
    ) -> Result<(), Why> {
        if host.patch_state(t) == target {
            return Ok(());
        }
        // `klp_check_and_switch_task` under `task_call_func`: the check and the switch
        // with the task held, the message after.
        let mut checked = Ok(());
        // The host hears that the core is done with the task's check once it has been
        // switched, or left as it was (`Host::task_check_done`): a host that keeps a
        // checked task stopped releases it there.
        host.task_call(t, &mut |h| {
            let (result, traced) = self.examine(h, t);
            if result.is_ok() {
                h.set_patch_pending(t, false);
                h.set_patch_state(t, target);
            }
            if traced {
                h.task_check_done(t);
            }
            checked = result;
        });
        if let Err(why) = checked {
            let (comm, pid) = host.task_ident(t);
            match why.name(patches) {
                Blocked::NoReliableStacks => {}
                Blocked::Running => klp_log!(
                    host,
                    Level::Debug,
                    "klp_try_switch_task",
                    "klp_try_switch_task: {comm}:{pid} is running"
                ),
                Blocked::Unreliable(_) => klp_log!(
                    host,
                    Level::Debug,
                    "klp_try_switch_task",
                    "klp_try_switch_task: {comm}:{pid} has an unreliable stack"
                ),
                Blocked::SleepingOn { func, .. } => klp_log!(
                    host,
                    Level::Debug,
                    "klp_try_switch_task",
                    "klp_try_switch_task: {comm}:{pid} is sleeping on function {func}"
                ),
            }
            return Err(why);
        }
        Ok(())
    }
}

/// Calls `f` for every task, the idle tasks last.
fn each_task<H: Host>(host: &mut H, f: &mut dyn FnMut(&mut H, TaskId)) {
    host.for_each_task(&mut |h, t| f(h, t));
    host.for_each_idle_task(&mut |h, it| f(h, it.task));
}

impl<H: Host> Klp<H> {
    /// `klp_init_transition`.
    pub(crate) fn init_transition(&mut self, host: &mut H, id: PatchId, state: PatchState) {
        if self.target != PatchState::Idle {
            host.warn("klp_init_transition: a transition is already set up");
        }
        self.transition = Some(id);
        self.target = state;
        host.publish_target(self.target);
        klp_log!(
            host,
            Level::Debug,
            "klp_init_transition",
            "'{}': initializing {} transition",
            self.name_of(id).unwrap_or(""),
            state.verb()
        );
        let initial = state.inverted();
        let mut warned = false;
        each_task(host, &mut |h, t| {
            if h.patch_state(t) != PatchState::Idle && !warned {
                h.warn("klp_init_transition: task not idle");
                warned = true;
            }
            h.set_patch_state(t, initial);
        });
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
        klp_log!(
            host,
            Level::Notice,
            "klp_start_transition",
            "'{}': starting {} transition",
            self.transition
                .and_then(|id| self.name_of(id))
                .unwrap_or(""),
            self.target.verb()
        );
        let target = self.target;
        each_task(host, &mut |h, t| {
            if h.patch_state(t) != target {
                h.set_patch_pending(t, true);
            }
        });
        self.sched_key = true;
        self.signals_cnt = 0;
    }

    /// Computes what code the transition forbids on stacks, into the reserved room.
    fn compute_ranges(&mut self, host: &mut H) {
        let scratch = &mut self.scratch;
        scratch.ranges.clear();
        scratch.complete = true;
        let Some(id) = self.transition else { return };
        let Some(p) = self.patches.iter().find(|p| p.id == id) else {
            return;
        };
        for (oi, o) in p.objs.iter().enumerate() {
            if !o.patched {
                continue;
            }
            for (fi, f) in o.funcs.iter().enumerate() {
                let me = FuncRef {
                    patch: id,
                    obj: oi,
                    func: fi,
                };
                let range = if self.target == PatchState::Unpatched {
                    f.new_func.map(|a| (a, f.new_size))
                } else {
                    f.old_func.and_then(|old| {
                        let ops = self.ops.iter().find(|o| o.old_func == old)?;
                        let pos = ops.stack.iter().position(|r| *r == me)?;
                        if ops.stack.len() == 1 || pos == 0 {
                            Some((old, f.old_size))
                        } else {
                            let below = *ops.stack.get(pos.checked_sub(1)?)?;
                            let g = func_in(&self.patches, below)?;
                            g.new_func.map(|a| (a, g.new_size))
                        }
                    })
                };
                if let Some((start, size)) = range {
                    let r = Range {
                        start,
                        size,
                        func: me,
                    };
                    if push_reserved(&mut scratch.ranges, r).is_err() {
                        scratch.complete = false;
                    }
                }
            }
        }
        if !scratch.complete {
            // Not reached: init_patch reserved one range per function. Without every
            // range no stack check can clear a task, so none is switched by one.
            host.warn("klp_try_complete_transition: no room for the stack-check ranges");
        }
    }

    /// `klp_try_switch_task`: switches `t` to the target if that is safe now.
    pub fn try_switch_task(&mut self, host: &mut H, t: TaskId) -> Result<(), Blocked<'_>> {
        if host.patch_state(t) == self.target {
            return Ok(());
        }
        self.compute_ranges(host);
        let target = self.target;
        self.scratch
            .switch(&self.patches, target, host, t)
            .map_err(|why| why.name(&self.patches))
    }

    /// Calls `f` with what blocks each task that has not switched yet, without changing
    /// anything: the explanation a tool shows during a long transition.
    pub fn blockers(&mut self, host: &mut H, f: &mut dyn FnMut(&mut H, TaskId, Blocked<'_>)) {
        if self.transition.is_none() {
            return;
        }
        self.compute_ranges(host);
        let target = self.target;
        let (scratch, patches) = (&mut self.scratch, &self.patches);
        each_task(host, &mut |h, t| {
            if h.patch_state(t) == target {
                return;
            }
            let (result, traced) = scratch.examine(h, t);
            if let Err(why) = result {
                f(h, t, why.name(patches));
            }
            if traced {
                h.task_check_done(t);
            }
        });
    }

    /// `klp_try_complete_transition`: one completion attempt. Returns whether the
    /// transition completed.
    pub fn try_complete_transition(&mut self, host: &mut H) -> bool {
        if self.target == PatchState::Idle {
            host.warn("klp_try_complete_transition: no target");
        }
        self.compute_ranges(host);
        let target = self.target;
        host.prepare_checks(target);
        let mut complete = true;
        {
            let (scratch, patches) = (&mut self.scratch, &self.patches);
            host.for_each_task(&mut |h, t| {
                if scratch.switch(patches, target, h, t).is_err() {
                    complete = false;
                }
            });
            host.for_each_idle_task(&mut |h, it| {
                if it.online {
                    if scratch.switch(patches, target, h, it.task).is_err() {
                        complete = false;
                        h.wake_cpu(it.cpu);
                    }
                } else if h.patch_state(it.task) != target {
                    h.set_patch_pending(it.task, false);
                    h.set_patch_state(it.task, target);
                }
            });
        }
        if !complete {
            if self.signals_cnt > 0 && self.signals_cnt.is_multiple_of(SIGNALS_TIMEOUT) {
                self.send_signals(host);
            }
            // The kernel's counter wraps; 2^32 is no multiple of 15, so a wrap only
            // shifts the next round of signals.
            self.signals_cnt = self.signals_cnt.wrapping_add(1);
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
            // Every patch listed before the replacing one goes.
            while let Some(&old) = self.list.first() {
                if old == id {
                    break;
                }
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
        let target = self.target;
        klp_log!(
            host,
            Level::Debug,
            "klp_complete_transition",
            "'{}': completing {} transition",
            self.name_of(id).unwrap_or(""),
            target.verb()
        );
        let replace = self.patch(id).is_some_and(|p| p.replace);
        if replace && target == PatchState::Patched {
            for li in 0..self.list.len() {
                let Some(&old) = self.list.get(li) else { break };
                if old == id {
                    break;
                }
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
        each_task(host, &mut |h, t| {
            if h.patch_pending(t) && !warned {
                h.warn("klp_complete_transition: task still pending");
                warned = true;
            }
            h.set_patch_state(t, PatchState::Idle);
        });
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
        klp_log!(
            host,
            Level::Notice,
            "klp_complete_transition",
            "'{}': {} complete",
            self.name_of(id).unwrap_or(""),
            target.verb()
        );
        self.target = PatchState::Idle;
        host.publish_target(self.target);
        self.transition = None;
    }

    /// `klp_cancel_transition`: undo an enable that failed before it started.
    pub(crate) fn cancel_transition(&mut self, host: &mut H) {
        if self.target != PatchState::Patched {
            host.warn("klp_cancel_transition: not patching");
            return;
        }
        klp_log!(
            host,
            Level::Debug,
            "klp_cancel_transition",
            "'{}': canceling patching transition, going to unpatch",
            self.transition
                .and_then(|id| self.name_of(id))
                .unwrap_or("")
        );
        self.target = PatchState::Unpatched;
        host.publish_target(self.target);
        self.complete_transition(host);
    }

    /// `klp_reverse_transition`.
    pub(crate) fn reverse_transition(&mut self, host: &mut H) {
        let Some(id) = self.transition else { return };
        let dir = if self.target == PatchState::Patched {
            "patching to unpatching"
        } else {
            "unpatching to patching"
        };
        klp_log!(
            host,
            Level::Debug,
            "klp_reverse_transition",
            "'{}': reversing transition from {dir}",
            self.name_of(id).unwrap_or("")
        );
        each_task(host, &mut |h, t| h.set_patch_pending(t, false));
        host.synchronize();
        if let Some(p) = self.patch_mut(id) {
            p.enabled = !p.enabled;
        }
        self.target = self.target.inverted();
        host.publish_target(self.target);
        self.start_transition(host);
    }

    /// `klp_force_transition`: switch every remaining task without a stack check.
    pub(crate) fn force_transition(&mut self, host: &mut H) {
        klp_log!(
            host,
            Level::Warn,
            "klp_force_transition",
            "forcing remaining tasks to the patched state"
        );
        let target = self.target;
        each_task(host, &mut |h, t| {
            if h.patch_pending(t) {
                h.set_patch_pending(t, false);
                h.set_patch_state(t, target);
            }
        });
        let Some(id) = self.transition else { return };
        if self.target == PatchState::Unpatched {
            if let Some(p) = self.patch_mut(id) {
                p.forced = true;
            }
        } else if self.patch(id).is_some_and(|p| p.replace) {
            for p in &mut self.patches {
                if p.id != id && self.list.contains(&p.id) {
                    p.forced = true;
                }
            }
        }
    }

    /// `klp_send_signals`.
    fn send_signals(&mut self, host: &mut H) {
        if self.signals_cnt == SIGNALS_TIMEOUT {
            klp_log!(
                host,
                Level::Notice,
                "klp_send_signals",
                "signaling remaining tasks"
            );
        }
        host.for_each_task(&mut |h, t| {
            if !h.patch_pending(t) {
                return;
            }
            if h.is_kthread(t) {
                h.wake_kthread(t);
            } else {
                h.fake_signal(t);
            }
        });
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
