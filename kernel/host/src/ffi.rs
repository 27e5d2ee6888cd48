//! The C shim's side of the interface (`klp_c_*`, defined in `kernel/shim/klp_shim.c`).
//!
//! Pointers to kernel objects (`struct task_struct`, `struct module`, `struct
//! klp_patch`, `struct klp_object`, `struct klp_state`) are opaque here: this crate
//! never reads their fields, it hands them back to the shim. Strings go out as pointer
//! and length (the shim prints them with `%.*s`) or, where the kernel API wants a C
//! string, NUL-terminated in a buffer of this crate's.

use core::ffi::{c_char, c_int, c_uint, c_ulong, c_void};

/// Declares an opaque kernel type, only ever handled through a pointer.
macro_rules! opaque {
    ($($(#[$doc:meta])* $name:ident;)*) => {$(
        $(#[$doc])*
        #[repr(C)]
        #[derive(Debug)]
        pub struct $name {
            _opaque: [u8; 0],
        }
    )*};
}

opaque! {
    /// `struct task_struct`.
    Task;
    /// `struct module`.
    Module;
    /// `struct klp_patch` of `include/linux/livepatch.h`.
    CPatch;
    /// `struct klp_object`.
    CObject;
    /// `struct klp_state`.
    CState;
}

/// What the ftrace handler of one patched function decides from (`struct klp_c_view`
/// in the shim): [`klp::RedirectView`] in a C layout. `valid == 0`: no record.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CView {
    /// The top implementation's address (0: the original function).
    pub top: u64,
    /// The implementation below the top (0: the original function).
    pub below: u64,
    /// Whether the top belongs to the patch in transition.
    pub top_transition: u8,
    /// Whether this view describes a record at all.
    pub valid: u8,
}

/// An implementation's address as the view holds it (0: the original function).
pub fn target_addr(t: klp::Target) -> u64 {
    match t {
        klp::Target::Original => 0,
        klp::Target::Func(a) => a,
    }
}

fn target_of(a: u64) -> klp::Target {
    if a == 0 {
        klp::Target::Original
    } else {
        klp::Target::Func(a)
    }
}

impl CView {
    /// The core's view in the shim's layout (`None`: no record).
    pub fn from_view(view: Option<klp::RedirectView>) -> CView {
        view.map_or(CView::default(), |v| CView {
            top: target_addr(v.top),
            below: target_addr(v.below),
            top_transition: u8::from(v.top_transition),
            valid: 1,
        })
    }

    /// The core's view back (of a valid view).
    pub fn to_view(&self) -> klp::RedirectView {
        klp::RedirectView {
            top: target_of(self.top),
            top_transition: self.top_transition != 0,
            below: target_of(self.below),
        }
    }
}

const _: () = {
    assert!(core::mem::size_of::<CView>() == 24);
    assert!(core::mem::offset_of!(CView, top) == 0);
    assert!(core::mem::offset_of!(CView, below) == 8);
    assert!(core::mem::offset_of!(CView, top_transition) == 16);
    assert!(core::mem::offset_of!(CView, valid) == 17);
};

/// Which callback of a `struct klp_callbacks` to run.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CallbackKind {
    /// `pre_patch`
    PrePatch = 0,
    /// `post_patch`
    PostPatch = 1,
    /// `pre_unpatch`
    PreUnpatch = 2,
    /// `post_unpatch`
    PostUnpatch = 3,
}

/// `ftrace` registration stages, for [`klp_c_hook_register`]'s `*stage`.
pub const HOOK_STAGE_FILTER: c_int = 0;

unsafe extern "C" {
    // ----- memory, log, faults -----
    /// `kmalloc` of `size` bytes: `GFP_KERNEL` if `may_sleep` and interrupts are on,
    /// else `GFP_ATOMIC`.
    pub fn klp_c_alloc(size: usize, may_sleep: bool) -> *mut c_void;
    /// `kmalloc(size, gfp | __GFP_ZERO)`: a shadow variable, with its caller's flags.
    pub fn klp_c_alloc_gfp(size: usize, gfp: c_uint) -> *mut c_void;
    /// `local_irq_save()`: the flags to restore.
    pub fn klp_c_irq_save() -> c_ulong;
    /// `local_irq_restore(flags)`.
    pub fn klp_c_irq_restore(flags: c_ulong);
    /// `kfree`.
    pub fn klp_c_free(p: *mut c_void);
    /// Prints `msg` at printk `level` (3 err … 7 debug) from the call site that belongs
    /// to `func` (the debug lines of `klp_try_switch_task` have their own).
    pub fn klp_c_log(
        level: c_int,
        func: *const c_char,
        func_len: usize,
        msg: *const c_char,
        len: usize,
    );
    /// `WARN_ONCE` with `msg`.
    pub fn klp_c_warn(msg: *const c_char, len: usize);
    /// `panic()` with `msg`. Does not return.
    pub fn klp_c_panic(msg: *const c_char, len: usize) -> !;

    // ----- configuration and modules -----
    /// `klp_have_reliable_stack()`.
    pub fn klp_c_reliable_stacktrace() -> bool;
    /// `is_livepatch_module(mod)`.
    pub fn klp_c_module_is_livepatch(m: *mut Module) -> bool;
    /// `try_module_get(mod)`.
    pub fn klp_c_module_get(m: *mut Module) -> bool;
    /// `module_put(mod)`.
    pub fn klp_c_module_put(m: *mut Module);
    /// Writes (`apply`) or clears the patch module's `.klp.rela.<obj>.*` sections
    /// (`klp_apply_object_relocs` / `klp_clear_object_relocs`). `obj` is NUL-terminated.
    pub fn klp_c_object_relocs(pmod: *mut Module, obj: *const c_char, apply: bool) -> c_int;

    // ----- symbols -----
    /// `kallsyms_on_each_match_symbol` (`obj` NULL) or `module_kallsyms_on_each_symbol`
    /// filtered by name; `cb` returns non-zero to stop. Strings NUL-terminated.
    pub fn klp_c_for_each_symbol(
        obj: *const c_char,
        name: *const c_char,
        cb: unsafe extern "C" fn(ctx: *mut c_void, addr: c_ulong) -> c_int,
        ctx: *mut c_void,
    );
    /// `kallsyms_lookup_size_offset(addr, &size, NULL)`.
    pub fn klp_c_symbol_size(addr: c_ulong, size: *mut c_ulong) -> bool;

    // ----- ftrace -----
    /// `ftrace_location(addr)` (0: none).
    pub fn klp_c_ftrace_location(addr: c_ulong) -> c_ulong;
    /// Allocates the ftrace ops of `site` and registers the handler; on failure sets
    /// `*stage` ([`HOOK_STAGE_FILTER`] or 1 for the registration) and returns `-errno`.
    pub fn klp_c_hook_register(site: c_ulong, stage: *mut c_int) -> c_int;
    /// Unregisters and frees the ops of `site` (waits for running handlers).
    pub fn klp_c_hook_unregister(site: c_ulong);
    /// Publishes what the handler of `site` decides from.
    pub fn klp_c_hook_publish(site: c_ulong, view: *const CView);

    // ----- tasks -----
    /// `for_each_process_thread` under `tasklist_lock`.
    pub fn klp_c_for_each_task(
        cb: unsafe extern "C" fn(ctx: *mut c_void, t: *mut Task),
        ctx: *mut c_void,
    );
    /// The idle task of every possible CPU.
    pub fn klp_c_for_each_idle_task(
        cb: unsafe extern "C" fn(ctx: *mut c_void, t: *mut Task, cpu: c_uint, online: bool),
        ctx: *mut c_void,
    );
    /// `current`.
    pub fn klp_c_current() -> *mut Task;
    /// `task->patch_state` (-1, 0, 1).
    pub fn klp_c_patch_state(t: *mut Task) -> c_int;
    /// Sets `task->patch_state`.
    pub fn klp_c_set_patch_state(t: *mut Task, s: c_int);
    /// `TIF_PATCH_PENDING`.
    pub fn klp_c_patch_pending(t: *mut Task) -> bool;
    /// Sets or clears `TIF_PATCH_PENDING`.
    pub fn klp_c_set_patch_pending(t: *mut Task, pending: bool);
    /// Copies `task->comm` (16 bytes, NUL-padded) and returns the pid.
    pub fn klp_c_task_ident(t: *mut Task, comm: *mut u8) -> c_int;
    /// `task->flags & PF_KTHREAD`.
    pub fn klp_c_is_kthread(t: *mut Task) -> bool;
    /// `task_curr(task) && task != current`.
    pub fn klp_c_task_running_elsewhere(t: *mut Task) -> bool;
    /// `stack_trace_save_tsk_reliable(task, entries, n)`.
    pub fn klp_c_stack_trace_reliable(t: *mut Task, entries: *mut c_ulong, n: c_uint) -> c_int;
    /// `task_call_func(task, …)` running `cb(ctx)`.
    pub fn klp_c_task_call(
        t: *mut Task,
        cb: unsafe extern "C" fn(ctx: *mut c_void),
        ctx: *mut c_void,
    );
    /// `set_notify_signal(task)`.
    pub fn klp_c_fake_signal(t: *mut Task);
    /// `wake_up_state(task, TASK_INTERRUPTIBLE)`.
    pub fn klp_c_wake_kthread(t: *mut Task);
    /// `wake_up_if_idle(cpu)`.
    pub fn klp_c_wake_cpu(cpu: c_uint);
    /// `synchronize_rcu_tasks_rude()`.
    pub fn klp_c_synchronize();
    /// Stores the transition's target where `klp_update_patch_state` reads it.
    pub fn klp_c_publish_target(state: c_int);

    // ----- work -----
    /// Schedules `klp_transition_work` in about a second.
    pub fn klp_c_schedule_retry();
    /// Schedules the patch's `free_work`.
    pub fn klp_c_schedule_free(p: *mut CPatch);

    // ----- callbacks -----
    /// Runs one callback of `obj` (after pointing `obj->mod` at its module); a missing
    /// `pre_patch` returns 0.
    pub fn klp_c_callback(obj: *mut CObject, kind: CallbackKind) -> c_int;
}
