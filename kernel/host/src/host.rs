//! [`KHost`]: the core's [`Host`] over the running kernel.

use alloc::string::String;
use alloc::vec::Vec;
use core::ffi::{c_char, c_int, c_uint, c_ulong, c_void};
use core::fmt::Write;
use core::ops::ControlFlow;
use core::ptr;
use core::sync::atomic::{AtomicPtr, Ordering};

use klp::log::Level;
use klp::{
    Addr, CallbackCx, Callbacks, Comm, HookError, Host, IdleTask, PatchId, PatchState, Record,
    TASK_COMM_LEN, TaskId, TraceError,
};

use crate::ffi::{self, CObject, CPatch, CView, CallbackKind, HOOK_STAGE_FILTER, Module, Task};
use crate::line::Line;

/// One patch module the core knows by name: the kernel objects behind the name.
#[derive(Debug)]
pub struct PatchMod {
    /// The module's (and the patch's) name.
    pub name: String,
    /// Its `struct module`.
    pub cmod: *mut Module,
    /// Its `struct klp_patch`.
    pub cpatch: *mut CPatch,
    /// The core's id, once `enable_patch` returned it.
    pub id: Option<PatchId>,
}

/// The kernel as the core's world. Its only state is the table of patch modules; every
/// other answer comes from the kernel through the shim.
#[derive(Debug, Default)]
pub struct KHost {
    pub(crate) mods: Vec<PatchMod>,
}

/// A task pointer as the core's task id, and back.
fn task(t: TaskId) -> *mut Task {
    ptr::with_exposed_provenance_mut(t.0 as usize)
}

fn task_id(t: *mut Task) -> TaskId {
    TaskId(t.expose_provenance() as u64)
}

fn state_to_c(s: PatchState) -> c_int {
    s.as_i32()
}

pub(crate) fn state_from_c(s: c_int) -> PatchState {
    match s {
        0 => PatchState::Unpatched,
        1 => PatchState::Patched,
        _ => PatchState::Idle,
    }
}

/// `s` with a terminating NUL in a buffer of `N` bytes; `None` if it does not fit or
/// holds a NUL (no kernel name can be such a string).
fn c_name<const N: usize>(s: &str) -> Option<[u8; N]> {
    if s.as_bytes().contains(&0) {
        return None;
    }
    let mut buf = [0u8; N];
    buf.get_mut(..s.len())?.copy_from_slice(s.as_bytes());
    // The byte after the name must exist and is already 0.
    buf.get(s.len())?;
    Some(buf)
}

impl KHost {
    /// The host with no patch module known.
    pub const fn new() -> KHost {
        KHost { mods: Vec::new() }
    }

    /// The newest entry for `name`.
    pub(crate) fn module(&self, name: &str) -> Option<&PatchMod> {
        self.mods.iter().rev().find(|m| m.name == name)
    }

    /// The entry of the patch with core id `id`.
    pub(crate) fn by_id(&self, id: PatchId) -> Option<&PatchMod> {
        self.mods.iter().find(|m| m.id == Some(id))
    }
}

/// The callback in which a callback of a C object runs now, for
/// `klp_get_prev_state()`: the core hands its callbacks a [`CallbackCx`], and the
/// kernel's API finds "the patch in transition" without being handed anything.
static CALLBACK_CX: AtomicPtr<c_void> = AtomicPtr::new(ptr::null_mut());
/// The task that runs that callback.
static CALLBACK_TASK: AtomicPtr<Task> = AtomicPtr::new(ptr::null_mut());

/// Runs `f` with the callback context of the current task, if the current task is
/// inside a callback of a C object.
///
/// # Safety
///
/// Only from a callback's own call chain (the C callback calling back into klp), so
/// that the context the core handed the callback is alive and not otherwise in use.
pub(crate) unsafe fn with_callback_cx<R>(
    f: impl FnOnce(&mut CallbackCx<'_, KHost>) -> R,
) -> Option<R> {
    let p = CALLBACK_CX.load(Ordering::Acquire);
    // SAFETY: `current` is always valid.
    let me = unsafe { ffi::klp_c_current() };
    if p.is_null() || CALLBACK_TASK.load(Ordering::Acquire) != me {
        return None;
    }
    // SAFETY: (1) `p` was stored by `CCallbacks::run` from the `&mut CallbackCx` the
    // core handed it, and is cleared before that call returns; `run` does not touch the
    // context while the C callback (our caller, per this function's contract) runs.
    let cx = unsafe { &mut *p.cast::<CallbackCx<'_, KHost>>() };
    Some(f(cx))
}

/// The callbacks of one `struct klp_object`, run by the shim.
#[derive(Debug)]
pub(crate) struct CCallbacks {
    pub(crate) obj: *mut CObject,
}

// SAFETY: the object is a static of the patch module, which stays loaded while the
// core holds the patch; the shim only reads its callback pointers.
unsafe impl Send for CCallbacks {}
// SAFETY: as for `Send`; the core runs callbacks under `klp_mutex`, one at a time.
unsafe impl Sync for CCallbacks {}

impl CCallbacks {
    fn run(&self, cx: &mut CallbackCx<'_, KHost>, kind: CallbackKind) -> c_int {
        // SAFETY: `current` is always valid.
        let me = unsafe { ffi::klp_c_current() };
        let saved = CALLBACK_CX.swap(ptr::from_mut(cx).cast(), Ordering::AcqRel);
        let saved_task = CALLBACK_TASK.swap(me, Ordering::AcqRel);
        // SAFETY: `obj` is the patch's live `struct klp_object` (see `Send`).
        let ret = unsafe { ffi::klp_c_callback(self.obj, kind) };
        CALLBACK_TASK.store(saved_task, Ordering::Release);
        CALLBACK_CX.store(saved, Ordering::Release);
        ret
    }
}

impl Callbacks<KHost> for CCallbacks {
    fn pre_patch(&self, cx: &mut CallbackCx<'_, KHost>) -> i32 {
        self.run(cx, CallbackKind::PrePatch)
    }
    fn post_patch(&self, cx: &mut CallbackCx<'_, KHost>) {
        self.run(cx, CallbackKind::PostPatch);
    }
    fn pre_unpatch(&self, cx: &mut CallbackCx<'_, KHost>) {
        self.run(cx, CallbackKind::PreUnpatch);
    }
    fn post_unpatch(&self, cx: &mut CallbackCx<'_, KHost>) {
        self.run(cx, CallbackKind::PostUnpatch);
    }
}

/// The `struct klp_state` behind a core [`klp::State`] (its `data`).
#[derive(Debug)]
pub(crate) struct CStatePtr(pub(crate) *mut ffi::CState);
// SAFETY: a static of the patch module (see `CCallbacks`); only handed back to C.
unsafe impl Send for CStatePtr {}
// SAFETY: as for `Send`.
unsafe impl Sync for CStatePtr {}

fn level_to_c(l: Level) -> c_int {
    match l {
        Level::Err => 3,
        Level::Warn => 4,
        Level::Notice => 5,
        Level::Info => 6,
        Level::Debug => 7,
    }
}

impl Host for KHost {
    fn log(&mut self, rec: &Record<'_>) {
        let mut line = Line::new();
        let _ = write!(line, "{rec}");
        let s = line.as_bytes();
        // SAFETY: pointers and lengths describe live buffers for the call.
        unsafe {
            ffi::klp_c_log(
                level_to_c(rec.level),
                rec.func.as_ptr().cast(),
                rec.func.len(),
                s.as_ptr().cast(),
                s.len(),
            )
        }
    }

    fn warn(&mut self, what: &str) {
        // SAFETY: pointer and length describe `what`.
        unsafe { ffi::klp_c_warn(what.as_ptr().cast(), what.len()) }
    }

    fn reliable_stacktrace(&self) -> bool {
        // SAFETY: no preconditions.
        unsafe { ffi::klp_c_reliable_stacktrace() }
    }

    fn module_is_livepatch(&self, patch_module: &str) -> bool {
        self.module(patch_module).is_some_and(|m| {
            // SAFETY: the module is the caller of `klp_enable_patch` (its init), alive.
            unsafe { ffi::klp_c_module_is_livepatch(m.cmod) }
        })
    }

    fn module_get(&mut self, patch_module: &str) -> bool {
        self.module(patch_module).is_some_and(|m| {
            // SAFETY: as in `module_is_livepatch`.
            unsafe { ffi::klp_c_module_get(m.cmod) }
        })
    }

    fn module_put(&mut self, patch_module: &str) {
        if let Some(m) = self.module(patch_module) {
            // SAFETY: the core puts only the reference it took with `module_get`.
            unsafe { ffi::klp_c_module_put(m.cmod) }
        }
    }

    fn apply_object_relocs(&mut self, patch_module: &str, obj: &str) -> Result<(), klp::Errno> {
        let Some(m) = self.module(patch_module) else {
            return Err(klp::Errno::EINVAL);
        };
        let Some(name) = c_name::<{ klp::MODULE_NAME_LEN }>(obj) else {
            return Err(klp::Errno::EINVAL);
        };
        // SAFETY: the patch module holds a reference of the core's; `name` is
        // NUL-terminated.
        let ret = unsafe { ffi::klp_c_object_relocs(m.cmod, name.as_ptr().cast(), true) };
        if ret < 0 {
            Err(klp::Errno::from_ret(ret))
        } else {
            Ok(())
        }
    }

    fn clear_object_relocs(&mut self, patch_module: &str, obj: &str) {
        let (Some(m), Some(name)) = (
            self.module(patch_module),
            c_name::<{ klp::MODULE_NAME_LEN }>(obj),
        ) else {
            return;
        };
        // SAFETY: as in `apply_object_relocs`.
        unsafe { ffi::klp_c_object_relocs(m.cmod, name.as_ptr().cast(), false) };
    }

    fn for_each_symbol(
        &self,
        obj: Option<&str>,
        name: &str,
        f: &mut dyn FnMut(Addr) -> ControlFlow<()>,
    ) {
        unsafe extern "C" fn cb(ctx: *mut c_void, addr: c_ulong) -> c_int {
            // SAFETY: `ctx` is the `&mut &mut dyn FnMut` below, alive for the walk.
            let f = unsafe { &mut *ctx.cast::<&mut dyn FnMut(Addr) -> ControlFlow<()>>() };
            match f(addr) {
                ControlFlow::Break(()) => 1,
                ControlFlow::Continue(()) => 0,
            }
        }
        let Some(cname) = c_name::<{ klp::KSYM_NAME_LEN + 1 }>(name) else {
            return;
        };
        let cobj = match obj {
            None => None,
            Some(o) => match c_name::<{ klp::MODULE_NAME_LEN }>(o) {
                Some(b) => Some(b),
                None => return,
            },
        };
        let obj_ptr: *const c_char = cobj.as_ref().map_or(ptr::null(), |b| b.as_ptr().cast());
        let mut fref: &mut dyn FnMut(Addr) -> ControlFlow<()> = f;
        // SAFETY: strings are NUL-terminated and live for the call; `cb` matches the
        // context it is given.
        unsafe {
            ffi::klp_c_for_each_symbol(
                obj_ptr,
                cname.as_ptr().cast(),
                cb,
                ptr::from_mut(&mut fref).cast(),
            )
        }
    }

    fn symbol_size(&self, addr: Addr) -> Option<u64> {
        let mut size: c_ulong = 0;
        // SAFETY: `size` is a valid out-pointer.
        unsafe { ffi::klp_c_symbol_size(addr, &mut size) }.then_some(size)
    }

    fn hook_site(&self, addr: Addr) -> Option<Addr> {
        // SAFETY: any address may be looked up.
        let loc = unsafe { ffi::klp_c_ftrace_location(addr) };
        (loc != 0).then_some(loc)
    }

    fn hook_register(&mut self, site: Addr) -> Result<(), HookError> {
        let mut stage: c_int = HOOK_STAGE_FILTER;
        // SAFETY: `site` came from `hook_site`; `stage` is a valid out-pointer.
        let ret = unsafe { ffi::klp_c_hook_register(site, &mut stage) };
        if ret >= 0 {
            Ok(())
        } else if stage == HOOK_STAGE_FILTER {
            Err(HookError::Filter(klp::Errno::from_ret(ret)))
        } else {
            Err(HookError::Register(klp::Errno::from_ret(ret)))
        }
    }

    fn hook_unregister(&mut self, site: Addr) {
        // SAFETY: the core unregisters only sites it registered.
        unsafe { ffi::klp_c_hook_unregister(site) }
    }

    fn hook_publish(&mut self, site: Addr, view: Option<klp::RedirectView>) {
        let cview = CView::from_view(view);
        // SAFETY: `cview` lives for the call; the core publishes only registered sites.
        unsafe { ffi::klp_c_hook_publish(site, &cview) }
    }

    fn for_each_task(&mut self, f: &mut dyn FnMut(&mut Self, TaskId)) {
        struct Cx<'a> {
            host: *mut KHost,
            f: &'a mut dyn FnMut(&mut KHost, TaskId),
        }
        unsafe extern "C" fn cb(ctx: *mut c_void, t: *mut Task) {
            // SAFETY: `ctx` is the `Cx` below, alive for the walk.
            let cx = unsafe { &mut *ctx.cast::<Cx<'_>>() };
            // SAFETY: `host` comes from the `&mut self` of the walk, which is not used
            // while the walk runs.
            (cx.f)(unsafe { &mut *cx.host }, task_id(t));
        }
        let mut cx = Cx { host: self, f };
        // SAFETY: `cb` matches the context.
        unsafe { ffi::klp_c_for_each_task(cb, ptr::from_mut(&mut cx).cast()) }
    }

    fn for_each_idle_task(&mut self, f: &mut dyn FnMut(&mut Self, IdleTask)) {
        struct Cx<'a> {
            host: *mut KHost,
            f: &'a mut dyn FnMut(&mut KHost, IdleTask),
        }
        unsafe extern "C" fn cb(ctx: *mut c_void, t: *mut Task, cpu: c_uint, online: bool) {
            // SAFETY: as in `for_each_task`.
            let cx = unsafe { &mut *ctx.cast::<Cx<'_>>() };
            let it = IdleTask {
                task: task_id(t),
                cpu,
                online,
            };
            // SAFETY: as in `for_each_task`.
            (cx.f)(unsafe { &mut *cx.host }, it);
        }
        let mut cx = Cx { host: self, f };
        // SAFETY: `cb` matches the context.
        unsafe { ffi::klp_c_for_each_idle_task(cb, ptr::from_mut(&mut cx).cast()) }
    }

    fn current(&self) -> TaskId {
        // SAFETY: no preconditions.
        task_id(unsafe { ffi::klp_c_current() })
    }

    fn patch_state(&self, t: TaskId) -> PatchState {
        // SAFETY: the core names tasks it got from the walks (under `tasklist_lock`) or
        // `current`.
        state_from_c(unsafe { ffi::klp_c_patch_state(task(t)) })
    }

    fn set_patch_state(&mut self, t: TaskId, s: PatchState) {
        // SAFETY: as in `patch_state`.
        unsafe { ffi::klp_c_set_patch_state(task(t), state_to_c(s)) }
    }

    fn patch_pending(&self, t: TaskId) -> bool {
        // SAFETY: as in `patch_state`.
        unsafe { ffi::klp_c_patch_pending(task(t)) }
    }

    fn set_patch_pending(&mut self, t: TaskId, pending: bool) {
        // SAFETY: as in `patch_state`.
        unsafe { ffi::klp_c_set_patch_pending(task(t), pending) }
    }

    fn publish_target(&mut self, target: PatchState) {
        // SAFETY: no preconditions.
        unsafe { ffi::klp_c_publish_target(state_to_c(target)) }
    }

    fn task_ident(&self, t: TaskId) -> (Comm, i64) {
        let mut buf = [0u8; TASK_COMM_LEN];
        // SAFETY: as in `patch_state`; `buf` has room for the 16 bytes.
        let pid = unsafe { ffi::klp_c_task_ident(task(t), buf.as_mut_ptr()) };
        let len = buf.iter().position(|b| *b == 0).unwrap_or(TASK_COMM_LEN);
        let name = buf
            .get(..len)
            .and_then(|b| core::str::from_utf8(b).ok())
            .unwrap_or("?");
        (Comm::new(name), i64::from(pid))
    }

    fn is_kthread(&self, t: TaskId) -> bool {
        // SAFETY: as in `patch_state`.
        unsafe { ffi::klp_c_is_kthread(task(t)) }
    }

    fn task_running_elsewhere(&self, t: TaskId) -> bool {
        // SAFETY: as in `patch_state`; called inside `task_call`.
        unsafe { ffi::klp_c_task_running_elsewhere(task(t)) }
    }

    fn stack_trace_reliable(
        &mut self,
        t: TaskId,
        entries: &mut [Addr],
    ) -> Result<usize, TraceError> {
        let n = c_uint::try_from(entries.len()).unwrap_or(c_uint::MAX);
        // SAFETY: as in `patch_state`, inside `task_call` (the task cannot run);
        // `entries` has room for `n` unsigned longs (u64 on this target).
        let ret = unsafe { ffi::klp_c_stack_trace_reliable(task(t), entries.as_mut_ptr(), n) };
        usize::try_from(ret).map_err(|_| TraceError::Unreliable)
    }

    fn task_call(&mut self, t: TaskId, f: &mut dyn FnMut(&mut Self)) {
        struct Cx<'a> {
            host: *mut KHost,
            f: &'a mut dyn FnMut(&mut KHost),
        }
        unsafe extern "C" fn cb(ctx: *mut c_void) {
            // SAFETY: as in `for_each_task`.
            let cx = unsafe { &mut *ctx.cast::<Cx<'_>>() };
            // SAFETY: as in `for_each_task`.
            (cx.f)(unsafe { &mut *cx.host });
        }
        let mut cx = Cx { host: self, f };
        // SAFETY: as in `patch_state`; `cb` matches the context.
        unsafe { ffi::klp_c_task_call(task(t), cb, ptr::from_mut(&mut cx).cast()) }
    }

    fn fake_signal(&mut self, t: TaskId) {
        // SAFETY: as in `patch_state`.
        unsafe { ffi::klp_c_fake_signal(task(t)) }
    }

    fn wake_kthread(&mut self, t: TaskId) {
        // SAFETY: as in `patch_state`.
        unsafe { ffi::klp_c_wake_kthread(task(t)) }
    }

    fn wake_cpu(&mut self, cpu: u32) {
        // SAFETY: any possible CPU.
        unsafe { ffi::klp_c_wake_cpu(cpu) }
    }

    fn synchronize(&mut self) {
        // SAFETY: process context under `klp_mutex`.
        unsafe { ffi::klp_c_synchronize() }
    }

    fn schedule_retry(&mut self) {
        // SAFETY: no preconditions.
        unsafe { ffi::klp_c_schedule_retry() }
    }

    fn schedule_free(&mut self, patch: PatchId) {
        match self.by_id(patch) {
            // SAFETY: the patch module holds the core's reference until `free_work`.
            Some(m) => unsafe { ffi::klp_c_schedule_free(m.cpatch) },
            None => self.warn("klp_free_patch_async: unknown patch"),
        }
    }
}
