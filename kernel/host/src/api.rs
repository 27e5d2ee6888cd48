//! The `klp_rs_*` entry points the C shim calls.
//!
//! Functions that reach the core are `unsafe`: their callers hold `klp_mutex` (the
//! shim's wrappers of the kernel API take it, as the kernel's livepatch functions
//! do), so at most one of them runs at a time and none re-enters another.

use alloc::boxed::Box;
use alloc::sync::Arc;
use core::cell::UnsafeCell;
use core::ffi::{CStr, c_char, c_int, c_uint, c_ulong, c_void};
use core::ptr;

use klp::fallible::{try_opt_string, try_push, try_string};
use klp::shadow::{ShadowCx, ShadowError, ShadowStore};
use klp::{
    Errno, FuncDesc, Host, Klp, ObjectDesc, PatchDesc, SharedCallbacks, State, StateData, decide,
};

use crate::ffi::{self, CObject, CPatch, CState, CView, Module};
use crate::host::{CCallbacks, CStatePtr, KHost, PatchMod, with_callback_cx};

/// The core and its host: one per kernel.
struct Global {
    core: UnsafeCell<Option<Klp<KHost>>>,
    host: UnsafeCell<KHost>,
}

// SAFETY: every access goes through `with_core`, whose callers hold `klp_mutex`.
unsafe impl Sync for Global {}

static G: Global = Global {
    core: UnsafeCell::new(None),
    host: UnsafeCell::new(KHost::new()),
};

/// Runs `f` on the core and the host.
///
/// # Safety
///
/// 1. The caller holds `klp_mutex`.
/// 2. No other `with_core` call is running on this task (the shim never calls back
///    into the core from inside one).
unsafe fn with_core<R>(f: impl FnOnce(&mut Klp<KHost>, &mut KHost) -> R) -> R {
    // SAFETY: (1) the mutex excludes other tasks, (2) excludes this one: no other
    // reference to either cell exists.
    let (core, host) = unsafe { (&mut *G.core.get(), &mut *G.host.get()) };
    let core = core.get_or_insert_with(Klp::new);
    // SAFETY: `current` is always valid.
    let me = unsafe { ffi::klp_c_current() };
    let outer = crate::rt::CORE_TASK.swap(me, core::sync::atomic::Ordering::AcqRel);
    let r = f(core, host);
    crate::rt::CORE_TASK.store(outer, core::sync::atomic::Ordering::Release);
    r
}

fn neg(e: Errno) -> c_int {
    e.to_kernel()
}

/// 0 or `-errno`.
fn status(r: klp::KResult<()>) -> c_int {
    r.map_or_else(neg, |()| 0)
}

/// A C string as `&str`; `None` for NULL or text that is not UTF-8.
///
/// # Safety
///
/// 1. `p` is NULL or a NUL-terminated string alive for `'a`.
unsafe fn c_str<'a>(p: *const c_char) -> Option<&'a str> {
    if p.is_null() {
        return None;
    }
    // SAFETY: (1).
    unsafe { CStr::from_ptr(p) }.to_str().ok()
}

// ------------------------------------------------------------------ patch description

/// A patch being described by the shim (`klp_enable_patch` walking the static arrays).
pub struct Desc(PatchDesc<KHost>);

impl core::fmt::Debug for Desc {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        self.0.fmt(f)
    }
}

/// Starts the description of the patch carried by module `name`; NULL on `-ENOMEM`
/// or a name that is not UTF-8.
///
/// # Safety
///
/// 1. `name` is a NUL-terminated string.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn klp_rs_desc_new(name: *const c_char, replace: bool) -> *mut Desc {
    // SAFETY: (1).
    let Some(name) = (unsafe { c_str(name) }) else {
        return ptr::null_mut();
    };
    let Ok(d) = PatchDesc::try_new(name) else {
        return ptr::null_mut();
    };
    match Box::try_new(Desc(d.replace(replace))) {
        Ok(b) => Box::into_raw(b),
        Err(_) => ptr::null_mut(),
    }
}

/// Drops a description that was not handed to [`klp_rs_enable`].
///
/// # Safety
///
/// 1. `d` came from [`klp_rs_desc_new`] and is not used afterwards.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn klp_rs_desc_free(d: *mut Desc) {
    if !d.is_null() {
        // SAFETY: (1).
        drop(unsafe { Box::from_raw(d) });
    }
}

/// Adds an object: `name` NULL for vmlinux; `has_funcs` false for an object whose
/// `funcs` is NULL (refused by the core); `cobj` runs its callbacks if `has_callbacks`.
///
/// # Safety
///
/// 1. `d` came from [`klp_rs_desc_new`]; `name` is NULL or NUL-terminated.
/// 2. `cobj` is the patch module's `struct klp_object`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn klp_rs_desc_object(
    d: *mut Desc,
    name: *const c_char,
    has_funcs: bool,
    cobj: *mut CObject,
    has_callbacks: bool,
) -> c_int {
    // SAFETY: (1).
    let d = unsafe { &mut *d };
    let mut o = if name.is_null() {
        ObjectDesc::vmlinux()
    } else {
        // SAFETY: (1).
        let Some(n) = (unsafe { c_str(name) }) else {
            return neg(Errno::EINVAL);
        };
        match ObjectDesc::try_module(n) {
            Ok(o) => o,
            Err(e) => return neg(e),
        }
    };
    if !has_funcs {
        o.funcs = None;
    }
    if has_callbacks {
        let Ok(cb) = Arc::try_new(CCallbacks { obj: cobj }) else {
            return neg(Errno::ENOMEM);
        };
        let cb: SharedCallbacks<KHost> = cb;
        o.callbacks = Some(cb);
    }
    status(try_push(&mut d.0.objs, o))
}

/// Adds a function to the last object. `old_name` may be NULL (refused by the core).
///
/// # Safety
///
/// 1. `d` came from [`klp_rs_desc_new`]; `old_name` is NULL or NUL-terminated.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn klp_rs_desc_func(
    d: *mut Desc,
    old_name: *const c_char,
    new_func: c_ulong,
    sympos: c_ulong,
) -> c_int {
    // SAFETY: (1).
    let d = unsafe { &mut *d };
    // SAFETY: (1).
    let name = unsafe { c_str(old_name) };
    if name.is_none() && !old_name.is_null() {
        return neg(Errno::EINVAL);
    }
    let old_name = match try_opt_string(name) {
        Ok(n) => n,
        Err(e) => return neg(e),
    };
    let f = FuncDesc {
        old_name,
        new_func: (new_func != 0).then_some(new_func),
        old_sympos: sympos,
    };
    let Some(funcs) = d.0.objs.last_mut().and_then(|o| o.funcs.as_mut()) else {
        return neg(Errno::EINVAL);
    };
    status(try_push(funcs, f))
}

/// Declares a system state, backed by the patch's `struct klp_state`.
///
/// # Safety
///
/// 1. `d` came from [`klp_rs_desc_new`].
/// 2. `cstate` is the patch module's `struct klp_state`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn klp_rs_desc_state(
    d: *mut Desc,
    id: c_ulong,
    version: c_uint,
    cstate: *mut CState,
) -> c_int {
    // SAFETY: (1).
    let d = unsafe { &mut *d };
    let Ok(data) = Arc::try_new(CStatePtr(cstate)) else {
        return neg(Errno::ENOMEM);
    };
    let data: StateData = data;
    let mut s = State::new(id, version);
    s.data = Some(data);
    status(try_push(&mut d.0.states, s))
}

/// `klp_enable_patch`: hands the description to the core (it is consumed).
///
/// # Safety
///
/// 1. `klp_mutex` is held (see [`with_core`]).
/// 2. `d` came from [`klp_rs_desc_new`] and is not used afterwards.
/// 3. `cpatch` and `cmod` are the patch and its module, which is in its init.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn klp_rs_enable(
    d: *mut Desc,
    cpatch: *mut CPatch,
    cmod: *mut Module,
) -> c_int {
    // SAFETY: (2).
    let desc = unsafe { Box::from_raw(d) }.0;
    let name = match try_string(&desc.module) {
        Ok(n) => n,
        Err(e) => return neg(e),
    };
    // SAFETY: (1).
    unsafe {
        with_core(|core, host| {
            let entry = PatchMod {
                name,
                cmod,
                cpatch,
                id: None,
            };
            if let Err(e) = try_push(&mut host.mods, entry) {
                return neg(e);
            }
            match core.enable_patch(host, desc) {
                Ok(id) => {
                    if let Some(m) = host.mods.last_mut() {
                        m.id = Some(id);
                    }
                    0
                }
                Err(e) => {
                    host.mods.pop();
                    neg(e)
                }
            }
        })
    }
}

// ------------------------------------------------------------------ life cycle

/// `klp_module_coming`.
///
/// # Safety
///
/// 1. `klp_mutex` is held; `name` is NUL-terminated.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn klp_rs_module_coming(name: *const c_char) -> c_int {
    // SAFETY: (1).
    let Some(name) = (unsafe { c_str(name) }) else {
        return neg(Errno::EINVAL);
    };
    // SAFETY: (1).
    unsafe { with_core(|core, host| status(core.module_coming(host, name))) }
}

/// `klp_module_going`.
///
/// # Safety
///
/// 1. `klp_mutex` is held; `name` is NUL-terminated.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn klp_rs_module_going(name: *const c_char) {
    // SAFETY: (1).
    if let Some(name) = unsafe { c_str(name) } {
        // SAFETY: (1).
        unsafe { with_core(|core, host| core.module_going(host, name)) }
    }
}

/// `klp_transition_work_fn`.
///
/// # Safety
///
/// 1. `klp_mutex` is held.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn klp_rs_retry_work() {
    // SAFETY: (1).
    unsafe { with_core(|core, host| core.retry_work(host)) }
}

/// The end of freeing `cpatch` (`klp_free_patch_work_fn`, after the shim removed its
/// kobjects): the core drops it and puts the module.
///
/// # Safety
///
/// 1. `klp_mutex` is held.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn klp_rs_free_work(cpatch: *mut CPatch) {
    // SAFETY: (1).
    unsafe {
        with_core(|core, host| {
            let Some(pos) = host.mods.iter().position(|m| m.cpatch == cpatch) else {
                host.warn("klp_free_patch_work_fn: unknown patch");
                return;
            };
            if let Some(id) = host.mods.get(pos).and_then(|m| m.id) {
                core.free_work(host, id);
            }
            host.mods.remove(pos);
        })
    }
}

/// `__klp_sched_try_switch` for `current`.
///
/// # Safety
///
/// 1. `klp_mutex` is held.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn klp_rs_sched_try_switch() {
    // SAFETY: (1).
    unsafe {
        with_core(|core, host| {
            let me = host.current();
            core.sched_try_switch(host, me);
        })
    }
}

/// Whether `cond_resched` should try to switch tasks (a transition is running).
///
/// # Safety
///
/// 1. `klp_mutex` is held.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn klp_rs_sched_key() -> bool {
    // SAFETY: (1).
    unsafe { with_core(|core, _| core.sched_key()) }
}

// ------------------------------------------------------------------ sysfs

/// Mode bit that marks a directory in [`klp_rs_sysfs_node`]'s answer (`S_IFDIR`).
const S_IFDIR: c_int = 0o040000;

/// Patch attributes of the core that Linux 6.12 does not have (`stack_order` came in
/// 6.14): the kernel built here follows 6.12's ABI, so they are not shown.
const NOT_IN_6_12: [&str; 1] = ["stack_order"];

/// A path under `/sys/kernel/livepatch`: up to four components from the shim, and room
/// for one more (a directory's entry).
#[derive(Clone, Copy)]
struct Path<'a> {
    parts: [&'a str; 5],
    n: usize,
}

impl<'a> Path<'a> {
    /// The shim's path, if it has at most four components that are strings.
    ///
    /// # Safety
    ///
    /// 1. `path` points to `n` NUL-terminated strings alive for `'a`.
    unsafe fn from_c(path: *const *const c_char, n: c_uint) -> Option<Path<'a>> {
        let n = usize::try_from(n).ok()?;
        if n > 4 {
            return None;
        }
        let mut parts = [""; 5];
        for (i, slot) in parts.iter_mut().enumerate().take(n) {
            // SAFETY: (1): `i < n`.
            let p = unsafe { *path.add(i) };
            // SAFETY: (1).
            *slot = unsafe { c_str(p) }?;
        }
        Some(Path { parts, n })
    }

    fn as_slice(&self) -> &[&'a str] {
        self.parts.get(..self.n).unwrap_or(&[])
    }

    /// Whether the path names something Linux 6.12 has (see [`NOT_IN_6_12`]).
    fn visible(&self) -> bool {
        !matches!(self.as_slice(), [_, a] if NOT_IN_6_12.contains(a))
    }

    /// The path of `name` inside this directory.
    fn child(&self, name: &'a str) -> Option<Path<'a>> {
        let mut c = *self;
        *c.parts.get_mut(self.n)? = name;
        c.n = self.n.checked_add(1)?;
        Some(c)
    }
}

/// The visible path the shim names, if any.
///
/// # Safety
///
/// 1. `path` points to `n` NUL-terminated strings.
unsafe fn visible_path<'a>(path: *const *const c_char, n: c_uint) -> Option<Path<'a>> {
    // SAFETY: (1).
    unsafe { Path::from_c(path, n) }.filter(Path::visible)
}

fn node_mode(n: klp::sysfs::Node) -> c_int {
    let m = c_int::try_from(klp::sysfs::mode_of(n)).unwrap_or(0);
    match n {
        klp::sysfs::Node::Dir => m | S_IFDIR,
        klp::sysfs::Node::Attr(_) => m,
    }
}

/// What is at `path` under `/sys/kernel/livepatch`: its mode (with `S_IFDIR` for a
/// directory) or `-ENOENT`.
///
/// # Safety
///
/// 1. `klp_mutex` is held; `path` points to `n` NUL-terminated strings.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn klp_rs_sysfs_node(path: *const *const c_char, n: c_uint) -> c_int {
    // SAFETY: (1).
    let Some(p) = (unsafe { visible_path(path, n) }) else {
        return neg(Errno::ENOENT);
    };
    // SAFETY: (1).
    unsafe {
        with_core(|core, _| {
            core.sysfs_node(p.as_slice())
                .map_or(neg(Errno::ENOENT), node_mode)
        })
    }
}

/// Calls `cb` with each entry of the directory at `path`: its name and mode (as
/// [`klp_rs_sysfs_node`] gives it).
///
/// # Safety
///
/// 1. `klp_mutex` is held; `path` points to `n` NUL-terminated strings.
/// 2. `cb` does not call back into the core.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn klp_rs_sysfs_list(
    path: *const *const c_char,
    n: c_uint,
    cb: unsafe extern "C" fn(ctx: *mut c_void, name: *const c_char, len: usize, mode: c_int),
    ctx: *mut c_void,
) -> c_int {
    // SAFETY: (1).
    let Some(dir) = (unsafe { visible_path(path, n) }) else {
        return neg(Errno::ENOENT);
    };
    // SAFETY: (1).
    unsafe {
        with_core(|core, _| {
            let mut names = crate::line::Line::new();
            let r = core.sysfs_list(dir.as_slice(), &mut |name| {
                names.clear();
                let _ = core::fmt::Write::write_fmt(&mut names, format_args!("{name}"));
                let Ok(s) = core::str::from_utf8(names.as_bytes()) else {
                    return;
                };
                let Some(child) = dir.child(s) else { return };
                if !child.visible() {
                    return;
                }
                let mode = core.sysfs_node(child.as_slice()).map_or(0, node_mode);
                // (Inside the `unsafe` block below.) SAFETY: (2); the name lives for
                // the call.
                cb(ctx, s.as_ptr().cast(), s.len(), mode);
            });
            match r {
                Ok(()) => 0,
                Err(e) => neg(e),
            }
        })
    }
}

/// Reads the attribute at `path` into `buf` (a page). Returns the length or `-errno`.
///
/// # Safety
///
/// 1. `klp_mutex` is held; `path` points to `n` NUL-terminated strings.
/// 2. `buf` has room for [`klp::sysfs::SYSFS_PAGE`] bytes.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn klp_rs_sysfs_show(
    path: *const *const c_char,
    n: c_uint,
    buf: *mut u8,
) -> isize {
    // SAFETY: (1).
    let Some(p) = (unsafe { visible_path(path, n) }) else {
        return neg(Errno::ENOENT) as isize;
    };
    // SAFETY: (2).
    let page = unsafe { core::slice::from_raw_parts_mut(buf, klp::sysfs::SYSFS_PAGE) };
    // SAFETY: (1).
    unsafe {
        with_core(|core, _| match core.sysfs_read(p.as_slice(), page) {
            Ok(len) => isize::try_from(len).unwrap_or(0),
            Err(e) => neg(e) as isize,
        })
    }
}

/// Writes `len` bytes of `buf` to the attribute at `path`. Returns `len` or `-errno`.
///
/// # Safety
///
/// 1. `klp_mutex` is held; `path` points to `n` NUL-terminated strings.
/// 2. `buf` holds `len` readable bytes.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn klp_rs_sysfs_store(
    path: *const *const c_char,
    n: c_uint,
    buf: *const u8,
    len: usize,
) -> isize {
    // SAFETY: (1).
    let Some(p) = (unsafe { visible_path(path, n) }) else {
        return neg(Errno::ENOENT) as isize;
    };
    // SAFETY: (2).
    let bytes = unsafe { core::slice::from_raw_parts(buf, len) };
    let Ok(data) = core::str::from_utf8(bytes) else {
        return neg(Errno::EINVAL) as isize;
    };
    // SAFETY: (1).
    unsafe {
        with_core(
            |core, host| match core.sysfs_write(host, p.as_slice(), data) {
                Ok(_) => isize::try_from(len).unwrap_or(0),
                Err(e) => neg(e) as isize,
            },
        )
    }
}

// ------------------------------------------------------------------ redirect

/// The redirect decision of the ftrace handler: where a task in `state` (-1, 0, 1)
/// continues — the address of an implementation, or 0 for the original function.
/// `*anomaly` is set when the view is in transition and the task's state is idle
/// (the kernel WARNs once).
///
/// # Safety
///
/// 1. `view` points to a valid view; `anomaly` is a valid out-pointer.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn klp_rs_decide(
    view: *const CView,
    state: c_int,
    anomaly: *mut bool,
) -> u64 {
    // SAFETY: (1).
    let v = unsafe { &*view };
    let rv = v.to_view();
    let state = crate::host::state_from_c(state);
    let (t, a) = decide(&rv, state);
    // SAFETY: (1).
    unsafe { *anomaly = a != klp::Anomaly::None };
    crate::ffi::target_addr(t)
}

// ------------------------------------------------------------------ states

/// `klp_get_prev_state(id)`, from inside a callback. NULL when there is none, or when
/// called outside a callback of a livepatch object (then it WARNs: the kernel's
/// version needs a transition, and a transition's callbacks are where it is used).
///
/// # Safety
///
/// 1. Called by a callback of a `struct klp_object` that the core runs, or outside any
///    core operation.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn klp_rs_get_prev_state(id: c_ulong) -> *mut CState {
    // SAFETY: (1).
    let found = unsafe {
        with_callback_cx(|cx| {
            cx.prev_state(id)
                .and_then(|s| s.data.as_ref())
                .and_then(|d| d.downcast_ref::<CStatePtr>())
                .map_or(ptr::null_mut(), |c| c.0)
        })
    };
    match found {
        Some(p) => p,
        None => {
            let what = "klp_get_prev_state() called outside a livepatch callback";
            // SAFETY: pointer and length describe `what`.
            unsafe { ffi::klp_c_warn(what.as_ptr().cast(), what.len()) };
            ptr::null_mut()
        }
    }
}

// ------------------------------------------------------------------ relocations

/// `Elf64_Shdr`.
#[repr(C)]
#[derive(Debug)]
pub struct Elf64Shdr {
    sh_name: u32,
    sh_type: u32,
    sh_flags: u64,
    sh_addr: u64,
    sh_offset: u64,
    sh_size: u64,
    sh_link: u32,
    sh_info: u32,
    sh_addralign: u64,
    sh_entsize: u64,
}

/// `Elf64_Sym`.
#[repr(C)]
#[derive(Debug)]
struct Elf64Sym {
    st_name: u32,
    st_info: u8,
    st_other: u8,
    st_shndx: u16,
    st_value: u64,
    st_size: u64,
}

/// `Elf64_Rela`.
#[repr(C)]
#[derive(Debug)]
struct Elf64Rela {
    r_offset: u64,
    r_info: u64,
    r_addend: i64,
}

const _: () = {
    assert!(core::mem::size_of::<Elf64Shdr>() == 64);
    assert!(core::mem::offset_of!(Elf64Shdr, sh_addr) == 16);
    assert!(core::mem::offset_of!(Elf64Shdr, sh_size) == 32);
    assert!(core::mem::size_of::<Elf64Sym>() == 24);
    assert!(core::mem::offset_of!(Elf64Sym, st_shndx) == 6);
    assert!(core::mem::offset_of!(Elf64Sym, st_value) == 8);
    assert!(core::mem::size_of::<Elf64Rela>() == 24);
    assert!(core::mem::offset_of!(Elf64Rela, r_info) == 8);
};

const RELA_SIZE: u64 = core::mem::size_of::<Elf64Rela>() as u64;
const SYM_SIZE: u64 = core::mem::size_of::<Elf64Sym>() as u64;

/// `SHN_LIVEPATCH`.
const SHN_LIVEPATCH: u16 = 0xff20;

/// The decisions of `klp_write_section_relocs` for section `secndx` of a patch
/// module: returns 1 if the section is not a livepatch relocation section of `objname`
/// (NULL: vmlinux), so there is nothing to do; `-EINVAL` (with the kernel's message)
/// for a malformed section name; 0 when the caller should write (`apply`) or clear
/// the relocations — with `apply`, every symbol they use is resolved first and its
/// address stored in `st_value`, as `apply_relocate_add` expects.
///
/// # Safety
///
/// 1. `sechdrs`, `shstrtab` and `strtab` are the module loader's views of the patch
///    module (`struct load_info` or `mod->klp_info`), `symndx` and `secndx` valid
///    section indices in them; the symbol table is writable.
/// 2. `objname` is NULL or NUL-terminated.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn klp_rs_section_relocs(
    sechdrs: *mut Elf64Shdr,
    shstrtab: *const c_char,
    strtab: *const c_char,
    symndx: c_uint,
    secndx: c_uint,
    objname: *const c_char,
    apply: bool,
) -> c_int {
    // The module loader calls this without `klp_mutex`: the host used here has no
    // state, only symbol look-ups and the log.
    let mut host = KHost::new();
    // SAFETY: (1).
    let sec = unsafe { &*sechdrs.add(secndx as usize) };
    // SAFETY: (1): section names are NUL-terminated in `shstrtab`.
    let Some(name) = (unsafe { c_str(shstrtab.add(sec.sh_name as usize)) }) else {
        return neg(Errno::EINVAL);
    };
    if !name.starts_with(".klp.rela.") {
        return 1;
    }
    let Some(sec_objname) = klp::elf::parse_rela_objname(name) else {
        host.log(&klp::Record {
            level: klp::Level::Err,
            func: "klp_write_section_relocs",
            prefix: klp::log::PREFIX,
            args: format_args!("section {name} has an incorrectly formatted name"),
        });
        return neg(Errno::EINVAL);
    };
    // SAFETY: (2).
    let want = unsafe { c_str(objname) }.unwrap_or("vmlinux");
    if want != sec_objname {
        return 1;
    }
    if !apply {
        return 0;
    }
    // SAFETY: (1).
    let symtab = unsafe { &*sechdrs.add(symndx as usize) };
    let syms = symtab.sh_addr as usize as *mut Elf64Sym;
    let relas = sec.sh_addr as usize as *const Elf64Rela;
    let count = sec.sh_size.checked_div(RELA_SIZE).unwrap_or(0);
    let nsyms = symtab.sh_size.checked_div(SYM_SIZE).unwrap_or(0);
    for i in 0..count {
        // SAFETY: (1): the section holds `count` relocations.
        let r = unsafe { &*relas.add(i as usize) };
        let si = r.r_info >> 32;
        if si >= nsyms {
            return neg(Errno::EINVAL);
        }
        // SAFETY: (1): `si` is inside the symbol table, which is writable.
        let sym = unsafe { &mut *syms.add(si as usize) };
        // SAFETY: (1): symbol names are NUL-terminated in `strtab`.
        let sname = unsafe { c_str(strtab.add(sym.st_name as usize)) }.unwrap_or("");
        if sym.st_shndx != SHN_LIVEPATCH {
            host.log(&klp::Record {
                level: klp::Level::Err,
                func: "klp_resolve_symbols",
                prefix: klp::log::PREFIX,
                args: format_args!("symbol {sname} is not marked as a livepatch symbol"),
            });
            return neg(Errno::EINVAL);
        }
        match klp::elf::reloc::resolve_livepatch_symbol(&mut host, sname, sec_objname) {
            Ok(addr) => sym.st_value = addr,
            Err(e) => return neg(e),
        }
    }
    0
}

// ------------------------------------------------------------------ shadow variables

static SHADOWS: ShadowStore = ShadowStore::new();

/// `klp_shadow_ctor_t`.
pub type ShadowCtor = Option<
    unsafe extern "C" fn(obj: *mut c_void, data: *mut c_void, ctor_data: *mut c_void) -> c_int,
>;
/// `klp_shadow_dtor_t`.
pub type ShadowDtor = Option<unsafe extern "C" fn(obj: *mut c_void, data: *mut c_void)>;

fn key(obj: *mut c_void) -> usize {
    obj.expose_provenance()
}

/// The calling context of a shadow-variable call: the variable's memory comes from
/// `kmalloc` with the caller's `gfp_t` (before any lock), and interrupts are off while a
/// shard's spin lock is held (`spin_lock_irqsave`), so that the API can be used from
/// any context the kernel allows. The store's own tables, grown under the lock, come
/// from the global allocator, which is `GFP_ATOMIC` there.
struct KernelCx {
    gfp: c_uint,
}

// SAFETY: (1) `kmalloc(.., gfp | __GFP_ZERO)` of `size_for`'s size is zeroed and
// aligned as the layout asks (see `Kmalloc::size_for`), and `kfree` (the global
// allocator's `dealloc`) frees it; (2) `local_irq_restore` undoes `local_irq_save`.
unsafe impl ShadowCx for KernelCx {
    fn alloc_zeroed(&self, layout: core::alloc::Layout) -> *mut u8 {
        let Some(size) = crate::rt::Kmalloc::size_for(layout) else {
            return ptr::null_mut();
        };
        // SAFETY: any size and flags may be asked for; null on failure.
        unsafe { ffi::klp_c_alloc_gfp(size, self.gfp) }.cast()
    }

    fn lock_enter(&self) -> usize {
        // SAFETY: no preconditions.
        let flags = unsafe { ffi::klp_c_irq_save() };
        usize::try_from(flags).unwrap_or(0)
    }

    fn lock_exit(&self, token: usize) {
        // SAFETY: `token` is what `lock_enter` saved (ShadowCx condition 2).
        unsafe { ffi::klp_c_irq_restore(token as c_ulong) }
    }
}

/// `klp_shadow_get`.
///
/// # Safety
///
/// 1. None beyond the kernel API's (lock-free; any context).
#[unsafe(no_mangle)]
pub unsafe extern "C" fn klp_rs_shadow_get(obj: *mut c_void, id: c_ulong) -> *mut c_void {
    SHADOWS
        .get(key(obj), id)
        .map_or(ptr::null_mut(), |a| a.as_ptr().cast())
}

/// `klp_shadow_alloc` (`get_or` false) and `klp_shadow_get_or_alloc` (true), with the
/// caller's `gfp`. The error code of a failure is stored in `*err` for the shim's
/// message: `-EEXIST` (duplicate), the constructor's error, `-ENOMEM`.
///
/// # Safety
///
/// 1. `gfp` suits the calling context (the kernel API's contract); `ctor` follows
///    `klp_shadow_ctor_t`'s (runs under a spin lock with interrupts off, does not call
///    the shadow API); `err` is a valid out-pointer.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn klp_rs_shadow_alloc(
    obj: *mut c_void,
    id: c_ulong,
    size: usize,
    gfp: c_uint,
    ctor: ShadowCtor,
    ctor_data: *mut c_void,
    get_or: bool,
    err: *mut c_int,
) -> *mut c_void {
    let run = |o: usize, data: &mut [u8]| -> Result<(), i32> {
        let Some(ctor) = ctor else { return Ok(()) };
        // SAFETY: (1): the constructor gets the parent, the zeroed data and its
        // argument, as in the kernel.
        let r = unsafe {
            ctor(
                ptr::with_exposed_provenance_mut(o),
                data.as_mut_ptr().cast(),
                ctor_data,
            )
        };
        if r == 0 { Ok(()) } else { Err(r) }
    };
    let cx = KernelCx { gfp };
    let store = SHADOWS.in_cx(&cx);
    let res = if get_or {
        store.get_or_alloc_with(key(obj), id, size, run)
    } else {
        store.alloc_with(key(obj), id, size, run)
    };
    match res {
        Ok(a) => {
            // SAFETY: (1).
            unsafe { *err = 0 };
            a.as_ptr().cast()
        }
        Err(e) => {
            let code = match e {
                ShadowError::Exists { .. } => neg(Errno::EEXIST),
                other => other.errno(),
            };
            // SAFETY: (1).
            unsafe {
                *err = if code > 0 {
                    code.saturating_neg()
                } else {
                    code
                }
            };
            ptr::null_mut()
        }
    }
}

/// `klp_shadow_free`.
///
/// # Safety
///
/// 1. `dtor` follows `klp_shadow_dtor_t`'s contract (as the constructor's).
#[unsafe(no_mangle)]
pub unsafe extern "C" fn klp_rs_shadow_free(obj: *mut c_void, id: c_ulong, dtor: ShadowDtor) {
    let cx = KernelCx { gfp: 0 };
    SHADOWS.in_cx(&cx).free_with(key(obj), id, |o, r| {
        if let Some(dtor) = dtor {
            // SAFETY: (1).
            unsafe {
                dtor(
                    ptr::with_exposed_provenance_mut(o),
                    r.addr().as_ptr().cast(),
                )
            }
        }
    });
}

/// `klp_shadow_free_all`.
///
/// # Safety
///
/// 1. As [`klp_rs_shadow_free`].
#[unsafe(no_mangle)]
pub unsafe extern "C" fn klp_rs_shadow_free_all(id: c_ulong, dtor: ShadowDtor) {
    let cx = KernelCx { gfp: 0 };
    SHADOWS.in_cx(&cx).free_all_with(id, |o, r| {
        if let Some(dtor) = dtor {
            // SAFETY: (1).
            unsafe {
                dtor(
                    ptr::with_exposed_provenance_mut(o),
                    r.addr().as_ptr().cast(),
                )
            }
        }
    });
}
