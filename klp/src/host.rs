//! What the core needs from the world it acts on.
//!
//! The core owns every livepatch *decision*; a [`Host`] owns the *world*: tasks and their
//! stacks, symbol tables, the entry hook of each function (ftrace in the kernel), work
//! items and the clock, the log. The simulated kernel (`klp-sim`) and the user-space host
//! implement this trait; an in-kernel host would map it onto the kernel's own facilities.
//!
//! Per-task livepatch state (`patch_state` and the pending flag) is stored by the host,
//! next to its tasks, and read and written through this trait: the host's redirect path
//! and safe points must reach it without taking the core's lock.

use core::fmt;
use core::ops::ControlFlow;

use crate::errno::Errno;
use crate::log::Record;
use crate::redirect::RedirectView;

/// Identity of a patch inside one [`crate::Klp`] (never reused).
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Debug)]
pub struct PatchId(pub u64);

/// An address in the patched world (kernel or process).
pub type Addr = u64;

/// Host-chosen identity of a task (a thread). Idle tasks get their own ids.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Debug)]
pub struct TaskId(pub u64);

/// A task's livepatch state (`task->patch_state`).
#[derive(Clone, Copy, PartialEq, Eq, Debug, Hash, PartialOrd, Ord)]
pub enum PatchState {
    /// No transition is running (`KLP_TRANSITION_IDLE`, -1).
    Idle,
    /// Runs the previous code of the transition patch's functions (0).
    Unpatched,
    /// Runs the transition patch's new code (1).
    Patched,
}

impl PatchState {
    /// The kernel's integer value (-1, 0, 1), as `/proc/<pid>/patch_state` shows it.
    pub const fn as_i32(self) -> i32 {
        match self {
            PatchState::Idle => -1,
            PatchState::Unpatched => 0,
            PatchState::Patched => 1,
        }
    }

    /// The opposite target (`!S`); `Idle` stays `Idle`.
    pub const fn inverted(self) -> PatchState {
        match self {
            PatchState::Idle => PatchState::Idle,
            PatchState::Unpatched => PatchState::Patched,
            PatchState::Patched => PatchState::Unpatched,
        }
    }

    /// `"patching"` / `"unpatching"`, as the transition messages print it.
    pub const fn verb(self) -> &'static str {
        match self {
            PatchState::Patched => "patching",
            _ => "unpatching",
        }
    }
}

/// Size of a task's command name buffer, terminating NUL included (`TASK_COMM_LEN`).
pub const TASK_COMM_LEN: usize = 16;

/// A task's command name (`task->comm`): at most 15 bytes, held in place so that a
/// message can name a task without allocating. Longer names are cut at a character
/// boundary, as the kernel cuts them.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct Comm {
    buf: [u8; TASK_COMM_LEN],
    len: u8,
}

impl Comm {
    /// `name`, cut to fit.
    pub fn new(name: &str) -> Comm {
        let mut c = Comm::default();
        let mut len = 0;
        for (i, ch) in name.char_indices() {
            let end = i.saturating_add(ch.len_utf8());
            if end >= TASK_COMM_LEN {
                break;
            }
            len = end;
        }
        if let (Some(dst), Some(src)) = (c.buf.get_mut(..len), name.as_bytes().get(..len)) {
            dst.copy_from_slice(src);
            c.len = u8::try_from(len).unwrap_or(0);
        }
        c
    }

    /// The name.
    pub fn as_str(&self) -> &str {
        self.buf
            .get(..usize::from(self.len))
            .and_then(|b| core::str::from_utf8(b).ok())
            .unwrap_or("")
    }
}

impl fmt::Display for Comm {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl fmt::Debug for Comm {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self.as_str(), f)
    }
}

/// The idle task of one possible CPU.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct IdleTask {
    /// The task.
    pub task: TaskId,
    /// Its CPU.
    pub cpu: u32,
    /// Whether the CPU is online.
    pub online: bool,
}

/// Why a reliable stack trace could not be taken.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TraceError {
    /// The walker could not guarantee that it saw every return address.
    Unreliable,
    /// The trace would have more than [`crate::MAX_STACK_ENTRIES`] entries.
    TooDeep,
}

/// A failure of the entry hook (ftrace) layer when a redirect is set up.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HookError {
    /// Restricting the registration to the site failed.
    Filter(Errno),
    /// Registering the handler failed (for example `-EBUSY`: another IP-modifying user
    /// holds the function, or the hook layer is globally disabled).
    Register(Errno),
}

/// The world the core acts on. See the module documentation.
///
/// Methods that observe tasks are called with the core's lock held, exactly where the
/// kernel holds the task-list lock; a host with real concurrency must give them the
/// same guarantees (a task created during a loop either shows up in it or inherits the
/// state the loop has already set, see [`crate::Klp::fork_inherit`]).
pub trait Host {
    // ----- log -----
    /// Emits one log line. The host applies its dynamic-debug policy to debug records
    /// and formats the ones it prints (`{rec}` is the whole line).
    fn log(&mut self, rec: &Record<'_>);
    /// Reports an internal-consistency failure (the kernel's `WARN`). The core always takes
    /// the documented fallback afterwards; the host decides how loud this is.
    fn warn(&mut self, what: &str);

    // ----- configuration -----
    /// Whether this world has a reliable stack walker (`HAVE_RELIABLE_STACKTRACE`).
    fn reliable_stacktrace(&self) -> bool;

    // ----- the modules that carry patches -----
    /// Whether the patch module is marked as a livepatch module (`livepatch=Y`).
    fn module_is_livepatch(&self, patch_module: &str) -> bool;
    /// Takes a reference on the patch module; `false` if it is going away.
    fn module_get(&mut self, patch_module: &str) -> bool;
    /// Drops the reference taken by [`Host::module_get`].
    fn module_put(&mut self, patch_module: &str);
    /// `klp_apply_object_relocs`: the module object `obj` of the patch carried by
    /// `patch_module` is present now (at enable, or on its arrival); write the patch
    /// module's `.klp.rela.<obj>.*` sections, with [`crate::elf::reloc::write_relocs`]
    /// over the module's loaded image. An error fails the enable or refuses the
    /// arriving module. The default, for patch modules without livepatch relocation
    /// sections (patches described in code), has nothing to do.
    fn apply_object_relocs(&mut self, patch_module: &str, obj: &str) -> Result<(), Errno> {
        let _ = (patch_module, obj);
        Ok(())
    }
    /// `klp_clear_object_relocs`: `obj` went away (or its arrival failed after its
    /// relocations were written); undo them with [`crate::elf::reloc::clear_relocs`] so
    /// that they can be written again when it comes back. Default: nothing.
    fn clear_object_relocs(&mut self, patch_module: &str, obj: &str) {
        let _ = (patch_module, obj);
    }

    // ----- symbols -----
    /// Hands `f` the address of every symbol named exactly `name` in object `obj`
    /// (`None` = vmlinux), in symbol table order, until `f` breaks
    /// (`kallsyms_on_each_match_symbol`). A module object that is not loaded has none.
    fn for_each_symbol(
        &self,
        obj: Option<&str>,
        name: &str,
        f: &mut dyn FnMut(Addr) -> ControlFlow<()>,
    );
    /// Size of the symbol that contains `addr` (`kallsyms_lookup_size_offset`).
    fn symbol_size(&self, addr: Addr) -> Option<u64>;

    // ----- the entry hook (ftrace) -----
    /// The patchable entry site of the function containing `addr`, if it has one.
    fn hook_site(&self, addr: Addr) -> Option<Addr>;
    /// Installs the livepatch handler on `site` (filter + register).
    fn hook_register(&mut self, site: Addr) -> Result<(), HookError>;
    /// Removes the handler from `site`. Must not return while a handler call that began
    /// before it can still be running.
    fn hook_unregister(&mut self, site: Addr);
    /// Publishes what the handler of `site` must decide from now on (`None`: the record
    /// is gone). The core calls this after every change of the record.
    fn hook_publish(&mut self, site: Addr, view: Option<RedirectView>);

    // ----- tasks -----
    /// Calls `f` for every task except the idle tasks, in a stable order
    /// (`for_each_process_thread`). `f` gets the host back to act on the task.
    fn for_each_task(&mut self, f: &mut dyn FnMut(&mut Self, TaskId));
    /// Calls `f` for the idle task of every possible CPU (`for_each_possible_cpu`).
    fn for_each_idle_task(&mut self, f: &mut dyn FnMut(&mut Self, IdleTask));
    /// The task on whose behalf the core runs now.
    fn current(&self) -> TaskId;
    /// `task->patch_state`.
    fn patch_state(&self, t: TaskId) -> PatchState;
    /// Sets `task->patch_state`.
    fn set_patch_state(&mut self, t: TaskId, s: PatchState);
    /// The transition's target changed (`klp_target_state`): a host whose safe points
    /// read the target without the core's lock (the kernel's `klp_update_patch_state`
    /// on the entry paths) publishes it here. The core calls this before it sets any
    /// task's pending flag for the new target, as the kernel orders its stores.
    /// Default: nothing (the core's own [`crate::Klp::update_patch_state`] reads it).
    fn publish_target(&mut self, target: PatchState) {
        let _ = target;
    }
    /// `TIF_PATCH_PENDING`.
    fn patch_pending(&self, t: TaskId) -> bool;
    /// Sets or clears `TIF_PATCH_PENDING`.
    fn set_patch_pending(&mut self, t: TaskId, pending: bool);
    /// Command name (`comm`) and pid, for messages.
    fn task_ident(&self, t: TaskId) -> (Comm, i64);
    /// Whether the task is a kernel thread.
    fn is_kthread(&self, t: TaskId) -> bool;
    /// Whether the task runs on a CPU right now and is not [`Host::current`] (it cannot be
    /// checked: `is running`). Otherwise the host keeps it off the CPUs until the check
    /// ends.
    fn task_running_elsewhere(&self, t: TaskId) -> bool;
    /// A reliable trace of the task's stack (`stack_trace_save_tsk_reliable`): writes
    /// every return address, innermost first, into `entries` and returns how many there
    /// are. A stack with more return addresses than `entries` holds is
    /// [`TraceError::TooDeep`]. A task without a stack (a zombie) has an empty trace.
    fn stack_trace_reliable(
        &mut self,
        t: TaskId,
        entries: &mut [Addr],
    ) -> Result<usize, TraceError>;
    /// Called by the core once it has acted on the result of
    /// [`Host::stack_trace_reliable`] for `t`: it switched the task, or left it as it was
    /// (its stack holds code the transition affects, the trace failed, or the core only
    /// wanted to know what blocks it, [`crate::Klp::blockers`]). Every call of
    /// `stack_trace_reliable` is followed by exactly one call of this for the same task,
    /// before the core checks another task or logs. A host that keeps a checked task
    /// stopped, so that the check and the switch are one step for the task (as the
    /// kernel's runqueue lock makes them), releases it here. Default: nothing.
    fn task_check_done(&mut self, t: TaskId) {
        let _ = t;
    }
    /// Runs `f` with task `t` kept off every CPU (`task_call_func`): the check of a task
    /// and its switch happen inside, so the task cannot start running between the stack
    /// check and the change of its state. Inside `f` the core only calls
    /// [`Host::task_running_elsewhere`], [`Host::stack_trace_reliable`],
    /// [`Host::reliable_stacktrace`], [`Host::current`], [`Host::patch_state`],
    /// [`Host::set_patch_pending`], [`Host::set_patch_state`] and
    /// [`Host::task_check_done`]; it logs only after `f` returned. A host whose tasks cannot run while the core looks at them (the
    /// simulator), or that keeps a task held by other means, just calls `f` (the default).
    fn task_call(&mut self, t: TaskId, f: &mut dyn FnMut(&mut Self)) {
        let _ = t;
        f(self);
    }
    /// Called by `klp_try_complete_transition` before it checks the tasks whose state
    /// is not `target` yet. A host that must stop a task to read its stack can stop
    /// them all at once here instead of one after the other; the kernel needs no such
    /// step (it reads a sleeping task's stack in place). The checks that follow are the
    /// same either way. Default: nothing.
    fn prepare_checks(&mut self, target: PatchState) {
        let _ = target;
    }
    /// Sends the fake signal to a user task (it leaves interruptible waits and system
    /// calls and passes the return-to-user safe point).
    fn fake_signal(&mut self, t: TaskId);
    /// Wakes a kernel thread if it sleeps interruptibly.
    fn wake_kthread(&mut self, t: TaskId);
    /// Wakes `cpu` if it is idle, so that its idle task passes the idle loop.
    fn wake_cpu(&mut self, cpu: u32);
    /// Waits until every CPU has passed through the scheduler (`klp_synchronize_transition`).
    fn synchronize(&mut self);

    // ----- deferred work -----
    /// Schedules the retry work (`klp_transition_work`) about one second from now. The
    /// host later calls [`crate::Klp::retry_work`]. Scheduling it again while it is
    /// pending is a no-op.
    fn schedule_retry(&mut self);
    /// Schedules the end of freeing `patch` (`free_work`). The host later calls
    /// [`crate::Klp::free_work`] with the same id.
    fn schedule_free(&mut self, patch: PatchId);
}
