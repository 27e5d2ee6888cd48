//! The livepatch core: patches, objects, functions, redirect records and the life cycle.
//!
//! [`Klp`] holds everything the kernel keeps under `klp_mutex`. Every public method is
//! one locked operation of the kernel (enable, a sysfs write, a module arriving, a work
//! item running); the caller serialises them (`&mut self`). The host is passed in for
//! the duration of each call.
//!
//! Every allocation can fail (see [`crate::fallible`]): the operation then returns
//! `-ENOMEM` and leaves the core and the host as they were, as the kernel's
//! `klp_init_patch`, `klp_patch_func` or `klp_module_coming` do.

use alloc::string::String;
use alloc::vec::Vec;
use core::fmt;
use core::ops::ControlFlow;

use crate::errno::{Errno, KResult};
use crate::fallible::{push_reserved, reserve_total, try_push, try_string};
use crate::host::{Addr, HookError, Host, PatchId, PatchState};
use crate::log::{Level, Record, klp_log};
use crate::model::{CallbackCx, PatchDesc, SharedCallbacks, State};
use crate::redirect::{RedirectView, Target};
use crate::transition::Scratch;

/// Size of the stack-check buffer: a trace with this many entries is unreliable.
pub const MAX_STACK_ENTRIES: usize = 100;
/// Failed completion attempts between two rounds of signals.
pub const SIGNALS_TIMEOUT: u32 = 15;
/// A module object's name must be shorter than this.
pub const MODULE_NAME_LEN: usize = 56;
/// A function or symbol name must be shorter than this.
pub const KSYM_NAME_LEN: usize = 512;

/// Why [`SymposScan`] found no address.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SymposError {
    /// No symbol of that name.
    NotFound,
    /// Position 0 (the name must be unique) and more than one symbol.
    Ambiguous,
    /// Fewer symbols of that name than the position asked for.
    Beyond {
        /// How many there are.
        count: u64,
    },
}

/// The kernel's sympos rule (`klp_find_object_symbol`): offered the addresses of the
/// symbols of one name in symbol-table order, it keeps the `sympos`-th (1-based; 0: the
/// name must be unique) and says when to stop looking.
#[derive(Clone, Copy, Debug)]
pub struct SymposScan {
    sympos: u64,
    count: u64,
    addr: Addr,
}

impl SymposScan {
    /// A scan for position `sympos`.
    pub const fn new(sympos: u64) -> SymposScan {
        SymposScan {
            sympos,
            count: 0,
            addr: 0,
        }
    }

    /// Offers the next candidate; `Break` once the answer cannot change.
    pub fn offer(&mut self, addr: Addr) -> ControlFlow<()> {
        self.addr = addr;
        self.count = self.count.saturating_add(1);
        let (s, n) = (self.sympos, self.count);
        if (s > 0 && n == s) || (s == 0 && n > 1) {
            ControlFlow::Break(())
        } else {
            ControlFlow::Continue(())
        }
    }

    /// The address, or why there is none (the kernel's order of checks).
    pub fn finish(&self) -> Result<Addr, SymposError> {
        if self.count == 0 {
            Err(SymposError::NotFound)
        } else if self.count > 1 && self.sympos == 0 {
            Err(SymposError::Ambiguous)
        } else if self.sympos > 0 && self.sympos != self.count {
            Err(SymposError::Beyond { count: self.count })
        } else {
            Ok(self.addr)
        }
    }
}

/// `old_sympos` as the sysfs directory shows it (0 counts as 1).
fn norm_sympos(s: u64) -> u64 {
    s.max(1)
}

/// One function of a patch, as the core tracks it.
pub(crate) struct Func {
    pub(crate) old_name: Option<String>,
    pub(crate) new_func: Option<Addr>,
    pub(crate) old_sympos: u64,
    pub(crate) old_func: Option<Addr>,
    pub(crate) old_size: u64,
    pub(crate) new_size: u64,
    pub(crate) nop: bool,
    pub(crate) patched: bool,
    pub(crate) transition: bool,
}

/// The sysfs directory name of a function, `<old_name>,<sympos or 1>`.
#[derive(Clone, Copy, Debug)]
pub struct FuncDirName<'a> {
    name: &'a str,
    sympos: u64,
}

impl fmt::Display for FuncDirName<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{},{}", self.name, self.sympos)
    }
}

impl FuncDirName<'_> {
    /// Whether `s` is exactly this name (the number written without leading zeros).
    pub(crate) fn is(&self, s: &str) -> bool {
        let Some(num) = s
            .strip_prefix(self.name)
            .and_then(|rest| rest.strip_prefix(','))
        else {
            return false;
        };
        !num.starts_with('0')
            && num.bytes().all(|b| b.is_ascii_digit())
            && num.parse::<u64>() == Ok(self.sympos)
    }
}

impl Func {
    pub(crate) fn name(&self) -> &str {
        self.old_name.as_deref().unwrap_or("")
    }

    /// The sysfs directory name `<old_name>,<sympos or 1>`.
    pub(crate) fn dir_name(&self) -> FuncDirName<'_> {
        FuncDirName {
            name: self.name(),
            sympos: norm_sympos(self.old_sympos),
        }
    }

    /// Whether two functions have the same sysfs directory (`klp_find_func`).
    fn same_dir(&self, other: &Func) -> bool {
        self.name() == other.name() && norm_sympos(self.old_sympos) == norm_sympos(other.old_sympos)
    }

    pub(crate) fn target(&self) -> Target {
        match (self.nop, self.new_func) {
            (false, Some(a)) => Target::Func(a),
            _ => Target::Original,
        }
    }
}

/// One object of a patch, as the core tracks it.
pub(crate) struct Object<H> {
    pub(crate) name: Option<String>,
    pub(crate) funcs: Vec<Func>,
    pub(crate) callbacks: Option<SharedCallbacks<H>>,
    /// `obj->mod != NULL` (always true for vmlinux once initialised).
    pub(crate) loaded: bool,
    pub(crate) dynamic: bool,
    pub(crate) patched: bool,
    pub(crate) post_unpatch_enabled: bool,
    /// Its livepatch relocation sections are written (module objects only).
    pub(crate) relocs: bool,
}

impl<H> Object<H> {
    pub(crate) fn display_name(&self) -> &str {
        self.name.as_deref().unwrap_or("vmlinux")
    }

    fn matches(&self, other_name: Option<&str>) -> bool {
        self.name.as_deref() == other_name
    }
}

/// One patch, as the core tracks it.
pub(crate) struct Patch<H> {
    pub(crate) id: PatchId,
    pub(crate) name: String,
    pub(crate) objs: Vec<Object<H>>,
    pub(crate) states: Vec<State>,
    pub(crate) replace: bool,
    pub(crate) enabled: bool,
    pub(crate) forced: bool,
    /// The sysfs directory `/sys/kernel/livepatch/<name>` exists.
    pub(crate) dir: bool,
    /// Holds a reference on its module (until free-finish).
    pub(crate) module_ref: bool,
}

impl<H> Patch<H> {
    fn func_count(&self) -> usize {
        self.objs
            .iter()
            .fold(0usize, |n, o| n.saturating_add(o.funcs.len()))
    }
}

/// Points at one function of one patch.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(crate) struct FuncRef {
    pub(crate) patch: PatchId,
    pub(crate) obj: usize,
    pub(crate) func: usize,
}

/// The function `r` points at, in `patches`.
pub(crate) fn func_in<H>(patches: &[Patch<H>], r: FuncRef) -> Option<&Func> {
    patches
        .iter()
        .find(|p| p.id == r.patch)?
        .objs
        .get(r.obj)?
        .funcs
        .get(r.func)
}

/// The redirect record of one patched address (`struct klp_ops`).
pub(crate) struct Ops {
    pub(crate) old_func: Addr,
    pub(crate) site: Addr,
    /// Bottom first; the last entry is the top (the active one).
    pub(crate) stack: Vec<FuncRef>,
}

/// A redirect record as tools see it (borrowed from the core).
pub struct RecordInfo<'a, H> {
    /// The patched function.
    pub old_func: Addr,
    /// Its entry site.
    pub site: Addr,
    stack: &'a [FuncRef],
    patches: &'a [Patch<H>],
}

impl<H> RecordInfo<'_, H> {
    /// The stack: (patch, implementation), bottom first; the last entry is active.
    pub fn stack(&self) -> impl Iterator<Item = (PatchId, Target)> + '_ {
        self.stack
            .iter()
            .filter_map(|r| func_in(self.patches, *r).map(|f| (r.patch, f.target())))
    }

    /// The number of entries on the stack.
    pub fn depth(&self) -> usize {
        self.stack.len()
    }
}

impl<H> fmt::Debug for RecordInfo<'_, H> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RecordInfo")
            .field("old_func", &self.old_func)
            .field("site", &self.site)
            .field("stack", &DebugIter(|| self.stack()))
            .finish()
    }
}

/// Debug-prints what an iterator yields, as a list.
struct DebugIter<F>(F);

impl<F, I> fmt::Debug for DebugIter<F>
where
    F: Fn() -> I,
    I: Iterator,
    I::Item: fmt::Debug,
{
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_list().entries((self.0)()).finish()
    }
}

/// One function a patch has on the redirect stacks (see [`Klp::patched_funcs`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PatchedFunc<'a> {
    /// The object (`None` for vmlinux).
    pub object: Option<&'a str>,
    /// The function's name.
    pub old_name: &'a str,
    /// Its address.
    pub old_func: Addr,
    /// What the patch runs instead.
    pub target: Target,
}

/// Which callback to run.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(crate) enum Cb {
    PrePatch,
    PostPatch,
    PreUnpatch,
    PostUnpatch,
}

/// The livepatch core. See the crate documentation.
pub struct Klp<H> {
    pub(crate) patches: Vec<Patch<H>>,
    /// `klp_patches`: enabled or in-transition patches, in stack order.
    pub(crate) list: Vec<PatchId>,
    pub(crate) ops: Vec<Ops>,
    pub(crate) transition: Option<PatchId>,
    pub(crate) target: PatchState,
    pub(crate) signals_cnt: u32,
    pub(crate) sched_key: bool,
    /// Modules that are livepatch-alive (arrival processed, removal not yet).
    pub(crate) alive: Vec<String>,
    /// What the stack checks of a transition use, allocated before it starts.
    pub(crate) scratch: Scratch,
    next_id: u64,
}

impl<H> Default for Klp<H> {
    fn default() -> Self {
        Klp {
            patches: Vec::new(),
            list: Vec::new(),
            ops: Vec::new(),
            transition: None,
            target: PatchState::Idle,
            signals_cnt: 0,
            sched_key: false,
            alive: Vec::new(),
            scratch: Scratch::default(),
            next_id: 1,
        }
    }
}

impl<H> fmt::Debug for Klp<H> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Klp")
            .field("list", &self.list)
            .field("transition", &self.transition)
            .field("target", &self.target)
            .field("signals_cnt", &self.signals_cnt)
            .finish_non_exhaustive()
    }
}

/// The sysfs layer's own warning about a duplicate name (no `livepatch: ` prefix).
fn sysfs_warn_dup<H: Host>(host: &mut H, args: fmt::Arguments<'_>) {
    host.log(&Record {
        level: Level::Warn,
        func: "sysfs_warn_dup",
        prefix: "",
        args,
    });
}

impl<H: Host> Klp<H> {
    /// An initialised livepatch core (the root directory exists) with nothing loaded.
    /// Allocates nothing.
    pub fn new() -> Self {
        Self::default()
    }

    // ------------------------------------------------------------------ lookups

    pub(crate) fn patch(&self, id: PatchId) -> Option<&Patch<H>> {
        self.patches.iter().find(|p| p.id == id)
    }

    pub(crate) fn patch_mut(&mut self, id: PatchId) -> Option<&mut Patch<H>> {
        self.patches.iter_mut().find(|p| p.id == id)
    }

    pub(crate) fn func(&self, r: FuncRef) -> Option<&Func> {
        func_in(&self.patches, r)
    }

    fn func_mut(&mut self, r: FuncRef) -> Option<&mut Func> {
        self.patch_mut(r.patch)?
            .objs
            .get_mut(r.obj)?
            .funcs
            .get_mut(r.func)
    }

    fn obj_mut(&mut self, id: PatchId, oi: usize) -> Option<&mut Object<H>> {
        self.patch_mut(id)?.objs.get_mut(oi)
    }

    fn obj(&self, id: PatchId, oi: usize) -> Option<&Object<H>> {
        self.patch(id)?.objs.get(oi)
    }

    /// The patch of a given name whose sysfs directory exists.
    pub fn find_patch(&self, name: &str) -> Option<PatchId> {
        self.patches
            .iter()
            .find(|p| p.dir && p.name == name)
            .map(|p| p.id)
    }

    /// Whether `module` is livepatch-alive.
    pub fn module_alive(&self, module: &str) -> bool {
        self.alive.iter().any(|m| m == module)
    }

    // ------------------------------------------------------------------ callbacks

    /// Runs one callback of object `oi` of patch `id`; returns `pre_patch`'s result (0
    /// for the others, or when the object has no callbacks). A patch or object that does
    /// not exist is an internal error: it WARNs and returns `-EINVAL`.
    pub(crate) fn run_callback(&mut self, host: &mut H, id: PatchId, oi: usize, which: Cb) -> i32 {
        let Some(me) = self.patches.iter().position(|p| p.id == id) else {
            host.warn("klp_run_callback: no such patch");
            return Errno::EINVAL.to_kernel();
        };
        let Some(obj) = self.patches.get(me).and_then(|p| p.objs.get(oi)) else {
            host.warn("klp_run_callback: no such object");
            return Errno::EINVAL.to_kernel();
        };
        let Some(cb) = obj.callbacks.clone() else {
            return 0;
        };
        let mut cx = CallbackCx {
            host,
            patches: &mut self.patches,
            list: &self.list,
            transition: self.transition,
            me,
            obj: oi,
        };
        match which {
            Cb::PrePatch => cb.pre_patch(&mut cx),
            Cb::PostPatch => {
                cb.post_patch(&mut cx);
                0
            }
            Cb::PreUnpatch => {
                cb.pre_unpatch(&mut cx);
                0
            }
            Cb::PostUnpatch => {
                cb.post_unpatch(&mut cx);
                0
            }
        }
    }

    /// The pre-patch step: run `pre_patch`, remember whether post_unpatch may run.
    pub(crate) fn pre_patch_step(&mut self, host: &mut H, id: PatchId, oi: usize) -> i32 {
        let ret = self.run_callback(host, id, oi, Cb::PrePatch);
        if let Some(o) = self.obj_mut(id, oi) {
            o.post_unpatch_enabled = ret == 0;
        }
        ret
    }

    /// The post-unpatch step: run `post_unpatch` once per successful pre-patch step.
    pub(crate) fn post_unpatch_step(&mut self, host: &mut H, id: PatchId, oi: usize) {
        let enabled = self.obj(id, oi).is_some_and(|o| o.post_unpatch_enabled);
        if enabled {
            self.run_callback(host, id, oi, Cb::PostUnpatch);
        }
        if let Some(o) = self.obj_mut(id, oi) {
            o.post_unpatch_enabled = false;
        }
    }

    // ------------------------------------------------------------------ symbols

    /// `klp_find_object_symbol`: resolves `name` at position `sympos` in `objname`.
    pub(crate) fn find_object_symbol(
        host: &mut H,
        objname: Option<&str>,
        name: &str,
        sympos: u64,
    ) -> KResult<Addr> {
        let mut scan = SymposScan::new(sympos);
        host.for_each_symbol(objname, name, &mut |a| scan.offer(a));
        match scan.finish() {
            Ok(addr) => Ok(addr),
            Err(SymposError::NotFound) => {
                klp_log!(
                    host,
                    Level::Err,
                    "klp_find_object_symbol",
                    "symbol '{name}' not found in symbol table"
                );
                Err(Errno::EINVAL)
            }
            Err(SymposError::Ambiguous) => {
                klp_log!(
                    host,
                    Level::Err,
                    "klp_find_object_symbol",
                    "unresolvable ambiguity for symbol '{name}' in object '{}'",
                    objname.unwrap_or("(null)")
                );
                Err(Errno::EINVAL)
            }
            Err(SymposError::Beyond { .. }) => {
                klp_log!(
                    host,
                    Level::Err,
                    "klp_find_object_symbol",
                    "symbol position {sympos} for symbol '{name}' in object '{}' not found",
                    objname.unwrap_or("vmlinux")
                );
                Err(Errno::EINVAL)
            }
        }
    }

    /// `klp_init_object_loaded`: resolve every function of a present object.
    pub(crate) fn init_object_loaded(
        &mut self,
        host: &mut H,
        id: PatchId,
        oi: usize,
    ) -> KResult<()> {
        let obj = self.obj(id, oi).ok_or(Errno::EINVAL)?;
        let nfuncs = obj.funcs.len();
        // Only module-specific sections are written here: vmlinux's were written when
        // the patch module was loaded.
        if let (Some(m), false) = (obj.name.as_deref(), obj.relocs) {
            let pname = self.patch(id).map_or("", |p| p.name.as_str());
            host.apply_object_relocs(pname, m)?;
            if let Some(o) = self.obj_mut(id, oi) {
                o.relocs = true;
            }
        }
        for fi in 0..nfuncs {
            let r = FuncRef {
                patch: id,
                obj: oi,
                func: fi,
            };
            let Some(obj) = self.obj(id, oi) else {
                return Err(Errno::EINVAL);
            };
            let Some(f) = obj.funcs.get(fi) else { continue };
            let name = f.name();
            let old = Self::find_object_symbol(host, obj.name.as_deref(), name, f.old_sympos)?;
            let Some(old_size) = host.symbol_size(old) else {
                klp_log!(
                    host,
                    Level::Err,
                    "klp_init_object_loaded",
                    "kallsyms size lookup failed for '{name}'"
                );
                return Err(Errno::ENOENT);
            };
            let new = if f.nop { Some(old) } else { f.new_func };
            let Some(new_size) = new.and_then(|a| host.symbol_size(a)) else {
                klp_log!(
                    host,
                    Level::Err,
                    "klp_init_object_loaded",
                    "kallsyms size lookup failed for '{name}' replacement"
                );
                return Err(Errno::ENOENT);
            };
            if let Some(f) = self.func_mut(r) {
                f.old_func = Some(old);
                f.old_size = old_size;
                f.new_func = new;
                f.new_size = new_size;
            }
        }
        Ok(())
    }

    /// Forgets what [`Klp::init_object_loaded`] resolved and wrote (the object went
    /// away, or its arrival failed).
    fn forget_object(&mut self, host: &mut H, id: PatchId, oi: usize) {
        let pname = self.patch(id).map_or("", |p| p.name.as_str());
        if let Some(o) = self.obj(id, oi)
            && o.relocs
        {
            host.clear_object_relocs(pname, o.display_name());
        }
        if let Some(o) = self.obj_mut(id, oi) {
            o.relocs = false;
            o.loaded = false;
            for f in &mut o.funcs {
                f.old_func = None;
                f.old_size = 0;
                f.new_size = 0;
                if f.nop {
                    f.new_func = None;
                }
            }
        }
    }

    // ------------------------------------------------------------------ redirect records

    fn ops_index(&self, old_func: Addr) -> Option<usize> {
        self.ops.iter().position(|o| o.old_func == old_func)
    }

    fn view_of(&self, ops: &Ops) -> Option<RedirectView> {
        let top = self.func(*ops.stack.last()?)?;
        let below = ops
            .stack
            .len()
            .checked_sub(2)
            .and_then(|i| ops.stack.get(i))
            .and_then(|r| self.func(*r))
            .map_or(Target::Original, Func::target);
        Some(RedirectView {
            top: top.target(),
            top_transition: top.transition,
            below,
        })
    }

    /// Publishes the view of every redirect record.
    pub(crate) fn publish_all(&self, host: &mut H) {
        for o in &self.ops {
            let v = self.view_of(o);
            host.hook_publish(o.site, v);
        }
    }

    fn publish_one(&self, host: &mut H, idx: usize) {
        if let Some(o) = self.ops.get(idx) {
            let v = self.view_of(o);
            host.hook_publish(o.site, v);
        }
    }

    /// `klp_patch_func`.
    fn patch_func(&mut self, host: &mut H, r: FuncRef) -> KResult<()> {
        let Some(f) = self.func(r) else {
            return Err(Errno::EINVAL);
        };
        let (Some(old), false) = (f.old_func, f.patched) else {
            host.warn("klp_patch_func: function unresolved or already patched");
            return Err(Errno::EINVAL);
        };
        if let Some(i) = self.ops_index(old) {
            let o = self.ops.get_mut(i).ok_or(Errno::EINVAL)?;
            try_push(&mut o.stack, r)?;
            if let Some(f) = self.func_mut(r) {
                f.patched = true;
            }
            self.publish_one(host, i);
            return Ok(());
        }
        let Some(site) = host.hook_site(old) else {
            klp_log!(
                host,
                Level::Err,
                "klp_patch_func",
                "failed to find location for function '{}'",
                f.name()
            );
            return Err(Errno::EINVAL);
        };
        // The record is allocated whole before anything changes (`kzalloc(ops)`).
        let mut stack = Vec::new();
        try_push(&mut stack, r)?;
        try_push(
            &mut self.ops,
            Ops {
                old_func: old,
                site,
                stack,
            },
        )?;
        // Publish before registering so that the handler never runs without a view (the
        // kernel's record exists before its ftrace registration).
        if let Some(f) = self.func_mut(r) {
            f.patched = true;
        }
        let idx = self.ops.len().saturating_sub(1);
        self.publish_one(host, idx);
        if let Err(e) = host.hook_register(site) {
            let name = self.func(r).map_or("", Func::name);
            match e {
                HookError::Filter(e) => klp_log!(
                    host,
                    Level::Err,
                    "klp_patch_func",
                    "failed to set ftrace filter for function '{name}' ({})",
                    e.to_kernel()
                ),
                HookError::Register(e) => klp_log!(
                    host,
                    Level::Err,
                    "klp_patch_func",
                    "failed to register ftrace handler for function '{name}' ({})",
                    e.to_kernel()
                ),
            }
            self.ops.pop();
            host.hook_publish(site, None);
            if let Some(f) = self.func_mut(r) {
                f.patched = false;
            }
            return Err(match e {
                HookError::Filter(e) | HookError::Register(e) => e,
            });
        }
        Ok(())
    }

    /// `klp_unpatch_func`.
    fn unpatch_func(&mut self, host: &mut H, r: FuncRef) {
        let Some(f) = self.func(r) else { return };
        let (Some(old), true) = (f.old_func, f.patched) else {
            host.warn("klp_unpatch_func: function not patched");
            return;
        };
        let Some(i) = self.ops_index(old) else {
            host.warn("klp_unpatch_func: no redirect record");
            return;
        };
        let (single, site) = match self.ops.get(i) {
            Some(o) => (o.stack.len() == 1, o.site),
            None => return,
        };
        if single {
            host.hook_unregister(site);
            self.ops.remove(i);
            host.hook_publish(site, None);
        } else {
            if let Some(o) = self.ops.get_mut(i) {
                o.stack.retain(|x| *x != r);
            }
            self.publish_one(host, i);
        }
        if let Some(f) = self.func_mut(r) {
            f.patched = false;
        }
    }

    /// `klp_patch_object`.
    pub(crate) fn patch_object(&mut self, host: &mut H, id: PatchId, oi: usize) -> KResult<()> {
        let Some(obj) = self.obj(id, oi) else {
            return Err(Errno::EINVAL);
        };
        if obj.patched {
            host.warn("klp_patch_object: object already patched");
            return Err(Errno::EINVAL);
        }
        let n = obj.funcs.len();
        for fi in 0..n {
            let r = FuncRef {
                patch: id,
                obj: oi,
                func: fi,
            };
            if let Err(e) = self.patch_func(host, r) {
                self.unpatch_object(host, id, oi, false);
                return Err(e);
            }
        }
        if let Some(o) = self.obj_mut(id, oi) {
            o.patched = true;
        }
        Ok(())
    }

    /// `__klp_unpatch_object`.
    pub(crate) fn unpatch_object(&mut self, host: &mut H, id: PatchId, oi: usize, nops_only: bool) {
        let n = self.obj(id, oi).map_or(0, |o| o.funcs.len());
        for fi in 0..n {
            let r = FuncRef {
                patch: id,
                obj: oi,
                func: fi,
            };
            if self
                .func(r)
                .is_some_and(|f| f.patched && (!nops_only || f.nop))
            {
                self.unpatch_func(host, r);
            }
        }
        if let Some(o) = self.obj_mut(id, oi)
            && (o.dynamic || !nops_only)
        {
            o.patched = false;
        }
    }

    /// `klp_unpatch_objects` / `klp_unpatch_objects_dynamic`.
    pub(crate) fn unpatch_objects(&mut self, host: &mut H, id: PatchId, nops_only: bool) {
        let n = self.patch(id).map_or(0, |p| p.objs.len());
        for oi in 0..n {
            if self.obj(id, oi).is_some_and(|o| o.patched) {
                self.unpatch_object(host, id, oi, nops_only);
            }
        }
    }

    /// Frees the nop functions and dynamic objects of a patch.
    pub(crate) fn free_nops(&mut self, id: PatchId) {
        if let Some(p) = self.patch_mut(id) {
            p.objs.retain(|o| !o.dynamic);
            for o in &mut p.objs {
                o.funcs.retain(|f| !f.nop);
            }
        }
    }

    // ------------------------------------------------------------------ freeing

    /// Free start: unlist the patch and free its objects.
    pub(crate) fn free_patch_start(&mut self, id: PatchId) {
        self.list.retain(|x| *x != id);
        if let Some(p) = self.patch_mut(id) {
            p.objs.clear();
        }
    }

    /// Free finish: remove the directory and drop the module reference unless forced.
    pub(crate) fn free_patch_finish(&mut self, host: &mut H, id: PatchId) {
        let Some(idx) = self.patches.iter().position(|p| p.id == id) else {
            return;
        };
        let p = self.patches.remove(idx);
        if p.module_ref && !p.forced {
            host.module_put(&p.name);
        }
        drop(p);
        self.compact();
    }

    /// Gives back the memory of tables that became empty, so that a core without
    /// patches holds no memory (and a failed first enable leaves none behind).
    pub(crate) fn compact(&mut self) {
        if self.patches.is_empty() {
            self.patches = Vec::new();
            self.scratch = Scratch::default();
        }
        if self.list.is_empty() {
            self.list = Vec::new();
        }
        if self.ops.is_empty() {
            self.ops = Vec::new();
        }
        if self.alive.is_empty() {
            self.alive = Vec::new();
        }
    }

    pub(crate) fn free_patch_async(&mut self, host: &mut H, id: PatchId) {
        self.free_patch_start(id);
        host.schedule_free(id);
    }

    /// The work item that finishes freeing a patch.
    pub fn free_work(&mut self, host: &mut H, id: PatchId) {
        self.free_patch_finish(host, id);
    }

    // ------------------------------------------------------------------ enable

    /// The core's own copy of a patch description (`klp_init_patch_early`): every
    /// allocation it needs is made here, before anything is registered.
    fn adopt(desc_objs: Vec<crate::model::ObjectDesc<H>>) -> KResult<Vec<Object<H>>> {
        let mut objs = Vec::new();
        reserve_total(&mut objs, desc_objs.len())?;
        for o in desc_objs {
            let dfuncs = o.funcs.unwrap_or_default();
            let mut funcs = Vec::new();
            reserve_total(&mut funcs, dfuncs.len())?;
            for f in dfuncs {
                let func = Func {
                    old_name: f.old_name,
                    new_func: f.new_func,
                    old_sympos: f.old_sympos,
                    old_func: None,
                    old_size: 0,
                    new_size: 0,
                    nop: false,
                    patched: false,
                    transition: false,
                };
                push_reserved(&mut funcs, func).map_err(|_| Errno::ENOMEM)?;
            }
            let obj = Object {
                name: o.name,
                funcs,
                callbacks: o.callbacks,
                loaded: false,
                dynamic: false,
                patched: false,
                post_unpatch_enabled: false,
                relocs: false,
            };
            push_reserved(&mut objs, obj).map_err(|_| Errno::ENOMEM)?;
        }
        Ok(objs)
    }

    /// `klp_enable_patch`: registers, initialises and enables a patch. Its result is the
    /// result of loading the patch module. On error nothing of the patch remains.
    pub fn enable_patch(&mut self, host: &mut H, desc: PatchDesc<H>) -> KResult<PatchId> {
        if desc.objs.iter().any(|o| o.funcs.is_none()) {
            return Err(Errno::EINVAL);
        }
        if !host.module_is_livepatch(&desc.module) {
            klp_log!(
                host,
                Level::Err,
                "klp_enable_patch",
                "module {} is not marked as a livepatch module",
                desc.module
            );
            return Err(Errno::EINVAL);
        }
        if !host.reliable_stacktrace() {
            klp_log!(
                host,
                Level::Warn,
                "klp_enable_patch",
                "This architecture doesn't have support for the livepatch consistency model."
            );
            klp_log!(
                host,
                Level::Warn,
                "klp_enable_patch",
                "The livepatch transition may never complete."
            );
        }
        let PatchDesc {
            module,
            objs,
            mut states,
            replace,
        } = desc;
        if let Some(end) = states.iter().position(|s| s.id == 0) {
            states.truncate(end);
        }
        if !self.is_patch_compatible(&states, replace) {
            klp_log!(
                host,
                Level::Err,
                "klp_enable_patch",
                "Livepatch patch ({module}) is not compatible with the already installed livepatches."
            );
            return Err(Errno::EINVAL);
        }
        let objs = Self::adopt(objs)?;
        let room = self.patches.len().saturating_add(1);
        reserve_total(&mut self.patches, room)?;
        let Some(next) = self.next_id.checked_add(1) else {
            return Err(Errno::ENOSPC);
        };
        if !host.module_get(&module) {
            return Err(Errno::ENODEV);
        }
        let id = PatchId(self.next_id);
        self.next_id = next;
        let patch = Patch {
            id,
            name: module,
            objs,
            states,
            replace,
            enabled: false,
            forced: false,
            dir: false,
            module_ref: true,
        };
        if push_reserved(&mut self.patches, patch).is_err() {
            // Not reached: the room was reserved above.
            host.warn("klp_enable_patch: reserved room vanished");
            return Err(Errno::ENOMEM);
        }
        let r = self
            .init_patch(host, id)
            .and_then(|()| self.enable_inner(host, id));
        match r {
            Ok(()) => Ok(id),
            Err(e) => {
                self.free_patch_start(id);
                self.free_patch_finish(host, id);
                Err(e)
            }
        }
    }

    /// `klp_init_patch`.
    fn init_patch(&mut self, host: &mut H, id: PatchId) -> KResult<()> {
        let p = self.patch(id).ok_or(Errno::EINVAL)?;
        if self.patches.iter().any(|q| q.dir && q.name == p.name) {
            sysfs_warn_dup(
                host,
                format_args!(
                    "sysfs: cannot create duplicate filename '/kernel/livepatch/{}'",
                    p.name
                ),
            );
            return Err(Errno::EEXIST);
        }
        let replace = p.replace;
        if let Some(p) = self.patch_mut(id) {
            p.dir = true;
        }
        if replace {
            self.add_nops(id)?;
        }
        let nobjs = self.patch(id).map_or(0, |p| p.objs.len());
        for oi in 0..nobjs {
            self.init_object(host, id, oi)?;
        }
        // The stack checks of this patch's transitions (and of any later disable of it,
        // which has no more functions) need room for one range per function.
        let nfuncs = self.patch(id).map_or(0, Patch::func_count);
        self.scratch.reserve(nfuncs)?;
        try_push(&mut self.list, id)
    }

    /// `klp_add_nops`: cover every function the listed patches patch with a nop
    /// function of the new patch (`klp_alloc_object_dynamic`, `klp_alloc_func_nop`).
    fn add_nops(&mut self, id: PatchId) -> KResult<()> {
        for li in 0..self.list.len() {
            let Some(&old) = self.list.get(li) else { break };
            let nobjs = self.patch(old).map_or(0, |p| p.objs.len());
            for ooi in 0..nobjs {
                let oi = self.nop_object(id, old, ooi)?;
                let nfuncs = self.obj(old, ooi).map_or(0, |o| o.funcs.len());
                for ofi in 0..nfuncs {
                    let Some(old_func) = self.obj(old, ooi).and_then(|o| o.funcs.get(ofi)) else {
                        break;
                    };
                    let exists = self
                        .obj(id, oi)
                        .is_some_and(|o| o.funcs.iter().any(|f| f.same_dir(old_func)));
                    if exists {
                        continue;
                    }
                    let nop = Func {
                        old_name: Some(try_string(old_func.name())?),
                        new_func: None,
                        old_sympos: old_func.old_sympos,
                        old_func: None,
                        old_size: 0,
                        new_size: 0,
                        nop: true,
                        patched: false,
                        transition: false,
                    };
                    let o = self.obj_mut(id, oi).ok_or(Errno::EINVAL)?;
                    try_push(&mut o.funcs, nop)?;
                }
            }
        }
        Ok(())
    }

    /// The object of patch `id` that matches object `ooi` of patch `old`, created as a
    /// dynamic object if missing.
    fn nop_object(&mut self, id: PatchId, old: PatchId, ooi: usize) -> KResult<usize> {
        let old_name = self.obj(old, ooi).ok_or(Errno::EINVAL)?.name.as_deref();
        let p = self.patch(id).ok_or(Errno::EINVAL)?;
        if let Some(i) = p.objs.iter().position(|o| o.matches(old_name)) {
            return Ok(i);
        }
        let obj = Object {
            name: old_name.map(try_string).transpose()?,
            funcs: Vec::new(),
            callbacks: None,
            loaded: false,
            dynamic: true,
            patched: false,
            post_unpatch_enabled: false,
            relocs: false,
        };
        let p = self.patch_mut(id).ok_or(Errno::EINVAL)?;
        try_push(&mut p.objs, obj)?;
        Ok(p.objs.len().saturating_sub(1))
    }

    /// `klp_init_object` (and `klp_init_func` for each of its functions).
    fn init_object(&mut self, host: &mut H, id: PatchId, oi: usize) -> KResult<()> {
        let p = self.patch(id).ok_or(Errno::EINVAL)?;
        let obj = p.objs.get(oi).ok_or(Errno::EINVAL)?;
        if let Some(n) = &obj.name
            && n.len() >= MODULE_NAME_LEN
        {
            return Err(Errno::EINVAL);
        }
        let loaded = match &obj.name {
            None => true,
            Some(n) => self.module_alive(n),
        };
        // Objects before this one with the same directory name collide in sysfs.
        let dname = obj.display_name();
        if p.objs.iter().take(oi).any(|o| o.display_name() == dname) {
            sysfs_warn_dup(
                host,
                format_args!(
                    "sysfs: cannot create duplicate filename '/kernel/livepatch/{}/{dname}'",
                    p.name
                ),
            );
            return Err(Errno::EEXIST);
        }
        for (fi, f) in obj.funcs.iter().enumerate() {
            let Some(n) = &f.old_name else {
                return Err(Errno::EINVAL);
            };
            if f.new_func.is_none() && !f.nop {
                return Err(Errno::EINVAL);
            }
            if n.len() >= KSYM_NAME_LEN {
                return Err(Errno::EINVAL);
            }
            if obj.funcs.iter().take(fi).any(|g| g.same_dir(f)) {
                sysfs_warn_dup(
                    host,
                    format_args!(
                        "sysfs: cannot create duplicate filename '/kernel/livepatch/{}/{dname}/{}'",
                        p.name,
                        f.dir_name()
                    ),
                );
                return Err(Errno::EEXIST);
            }
        }
        if let Some(o) = self.obj_mut(id, oi) {
            o.patched = false;
            o.loaded = loaded;
            for f in &mut o.funcs {
                f.patched = false;
                f.transition = false;
            }
        }
        if loaded {
            self.init_object_loaded(host, id, oi)?;
        }
        Ok(())
    }

    /// `__klp_enable_patch`.
    fn enable_inner(&mut self, host: &mut H, id: PatchId) -> KResult<()> {
        if self.transition.is_some() {
            return Err(Errno::EBUSY);
        }
        let Some(p) = self.patch(id) else {
            return Err(Errno::EINVAL);
        };
        if p.enabled {
            host.warn("__klp_enable_patch: patch already enabled");
            return Err(Errno::EINVAL);
        }
        klp_log!(
            host,
            Level::Notice,
            "__klp_enable_patch",
            "enabling patch '{}'",
            p.name
        );
        self.init_transition(host, id, PatchState::Patched);
        let nobjs = self.patch(id).map_or(0, |p| p.objs.len());
        let mut result = Ok(());
        for oi in 0..nobjs {
            if !self.obj(id, oi).is_some_and(|o| o.loaded) {
                continue;
            }
            let ret = self.pre_patch_step(host, id, oi);
            if ret != 0 {
                let oname = self.obj(id, oi).map_or("", |o| o.display_name());
                klp_log!(
                    host,
                    Level::Warn,
                    "__klp_enable_patch",
                    "pre-patch callback failed for object '{oname}'"
                );
                result = Err(Errno::from_ret(ret));
                break;
            }
            if let Err(e) = self.patch_object(host, id, oi) {
                let oname = self.obj(id, oi).map_or("", |o| o.display_name());
                klp_log!(
                    host,
                    Level::Warn,
                    "__klp_enable_patch",
                    "failed to patch object '{oname}'"
                );
                result = Err(e);
                break;
            }
        }
        if let Err(e) = result {
            let name = self.patch(id).map_or("", |p| p.name.as_str());
            klp_log!(
                host,
                Level::Warn,
                "__klp_enable_patch",
                "failed to enable patch '{name}'"
            );
            self.cancel_transition(host);
            return Err(e);
        }
        self.start_transition(host);
        if let Some(p) = self.patch_mut(id) {
            p.enabled = true;
        }
        self.try_complete_transition(host);
        Ok(())
    }

    /// `__klp_disable_patch` (writing 0 to `enabled`). Allocates nothing: the room its
    /// stack checks need was reserved when the patch was enabled.
    pub(crate) fn disable_patch(&mut self, host: &mut H, id: PatchId) -> KResult<()> {
        if !self.patch(id).is_some_and(|p| p.enabled) {
            host.warn("__klp_disable_patch: patch not enabled");
            return Err(Errno::EINVAL);
        }
        if self.transition.is_some() {
            return Err(Errno::EBUSY);
        }
        self.init_transition(host, id, PatchState::Unpatched);
        let nobjs = self.patch(id).map_or(0, |p| p.objs.len());
        for oi in 0..nobjs {
            if self.obj(id, oi).is_some_and(|o| o.patched) {
                self.run_callback(host, id, oi, Cb::PreUnpatch);
            }
        }
        self.start_transition(host);
        if let Some(p) = self.patch_mut(id) {
            p.enabled = false;
        }
        self.try_complete_transition(host);
        Ok(())
    }

    // ------------------------------------------------------------------ modules

    /// `klp_module_coming`: a module is loading (before its init runs). An error refuses
    /// the module; its load must then fail with that error, and nothing of the arrival
    /// remains.
    pub fn module_coming(&mut self, host: &mut H, module: &str) -> KResult<()> {
        if module == "vmlinux" {
            klp_log!(
                host,
                Level::Err,
                "klp_module_coming",
                "vmlinux.ko: invalid module name"
            );
            return Err(Errno::EINVAL);
        }
        // `mod->klp_alive = true`: the one allocation of an arrival, made first.
        try_push(&mut self.alive, try_string(module)?)?;
        for li in 0..self.list.len() {
            let Some(&pid) = self.list.get(li) else { break };
            let Some(oi) = self
                .patch(pid)
                .and_then(|p| p.objs.iter().position(|o| o.matches(Some(module))))
            else {
                continue;
            };
            if let Some(o) = self.obj_mut(pid, oi) {
                o.loaded = true;
            }
            if let Err(e) = self.coming_one(host, pid, oi, module) {
                let pname = self.patch(pid).map_or("", |p| p.name.as_str());
                klp_log!(
                    host,
                    Level::Warn,
                    "klp_module_coming",
                    "patch '{pname}' failed for module '{module}', refusing to load module '{module}'"
                );
                self.alive.retain(|m| m != module);
                self.forget_object(host, pid, oi);
                self.cleanup_module_patches_limited(host, module, Some(pid));
                self.compact();
                return Err(e);
            }
        }
        Ok(())
    }

    fn coming_one(&mut self, host: &mut H, pid: PatchId, oi: usize, module: &str) -> KResult<()> {
        if let Err(e) = self.init_object_loaded(host, pid, oi) {
            let pname = self.patch(pid).map_or("", |p| p.name.as_str());
            klp_log!(
                host,
                Level::Warn,
                "klp_module_coming",
                "failed to initialize patch '{pname}' for module '{module}' ({})",
                e.to_kernel()
            );
            return Err(e);
        }
        let pname = self.patch(pid).map_or("", |p| p.name.as_str());
        klp_log!(
            host,
            Level::Notice,
            "klp_module_coming",
            "applying patch '{pname}' to loading module '{module}'"
        );
        let ret = self.pre_patch_step(host, pid, oi);
        if ret != 0 {
            klp_log!(
                host,
                Level::Warn,
                "klp_module_coming",
                "pre-patch callback failed for object '{module}'"
            );
            return Err(Errno::from_ret(ret));
        }
        if let Err(e) = self.patch_object(host, pid, oi) {
            let pname = self.patch(pid).map_or("", |p| p.name.as_str());
            klp_log!(
                host,
                Level::Warn,
                "klp_module_coming",
                "failed to apply patch '{pname}' to module '{module}' ({})",
                e.to_kernel()
            );
            self.post_unpatch_step(host, pid, oi);
            return Err(e);
        }
        if self.transition != Some(pid) {
            self.run_callback(host, pid, oi, Cb::PostPatch);
        }
        Ok(())
    }

    /// `klp_module_going`: a module is being removed (after its exit function), or its
    /// load failed after [`Klp::module_coming`] succeeded.
    pub fn module_going(&mut self, host: &mut H, module: &str) {
        self.alive.retain(|m| m != module);
        self.cleanup_module_patches_limited(host, module, None);
        self.compact();
    }

    fn cleanup_module_patches_limited(
        &mut self,
        host: &mut H,
        module: &str,
        limit: Option<PatchId>,
    ) {
        for li in 0..self.list.len() {
            let Some(&pid) = self.list.get(li) else { break };
            if Some(pid) == limit {
                break;
            }
            let Some(oi) = self
                .patch(pid)
                .and_then(|p| p.objs.iter().position(|o| o.matches(Some(module))))
            else {
                continue;
            };
            if !self.obj(pid, oi).is_some_and(|o| o.loaded) {
                continue;
            }
            if self.transition != Some(pid) {
                self.run_callback(host, pid, oi, Cb::PreUnpatch);
            }
            let pname = self.patch(pid).map_or("", |p| p.name.as_str());
            klp_log!(
                host,
                Level::Notice,
                "klp_cleanup_module_patches_limited",
                "reverting patch '{pname}' on unloading module '{module}'"
            );
            self.unpatch_object(host, pid, oi, false);
            self.post_unpatch_step(host, pid, oi);
            self.forget_object(host, pid, oi);
        }
    }

    // ------------------------------------------------------------------ misc public

    /// The patch in transition, if any.
    pub fn transition_patch(&self) -> Option<PatchId> {
        self.transition
    }

    /// The state tasks are moving to (`Idle` when no transition runs).
    pub fn target(&self) -> PatchState {
        self.target
    }

    /// Whether the scheduler hook is armed (`klp_sched_try_switch_key`).
    pub fn sched_key(&self) -> bool {
        self.sched_key
    }

    /// The listed patches (enabled or in transition), in stack order.
    pub fn listed(&self) -> &[PatchId] {
        &self.list
    }

    /// The name of a patch that still exists.
    pub fn name_of(&self, id: PatchId) -> Option<&str> {
        self.patch(id).map(|p| p.name.as_str())
    }

    /// Whether a patch still exists (its directory has not been removed).
    pub fn exists(&self, id: PatchId) -> bool {
        self.patch(id).is_some()
    }

    /// Whether a patch is enabled.
    pub fn is_enabled(&self, id: PatchId) -> bool {
        self.patch(id).is_some_and(|p| p.enabled)
    }

    /// Whether a patch was part of a forced transition.
    pub fn is_forced(&self, id: PatchId) -> bool {
        self.patch(id).is_some_and(|p| p.forced)
    }

    /// The current view of the redirect record at `site`, if there is one.
    pub fn view(&self, site: Addr) -> Option<RedirectView> {
        self.ops
            .iter()
            .find(|o| o.site == site)
            .and_then(|o| self.view_of(o))
    }

    /// Every redirect record, for tests and tools.
    pub fn records(&self) -> impl Iterator<Item = RecordInfo<'_, H>> + '_ {
        self.ops.iter().map(|o| RecordInfo {
            old_func: o.old_func,
            site: o.site,
            stack: &o.stack,
            patches: &self.patches,
        })
    }

    /// The old functions a patch currently has on the redirect stacks, with their
    /// replacement, for tests and tools.
    pub fn patched_funcs(&self, id: PatchId) -> impl Iterator<Item = PatchedFunc<'_>> + '_ {
        self.patch(id)
            .into_iter()
            .flat_map(|p| p.objs.iter())
            .flat_map(|o| {
                o.funcs
                    .iter()
                    .filter_map(move |f| match (f.patched, f.old_func) {
                        (true, Some(a)) => Some(PatchedFunc {
                            object: o.name.as_deref(),
                            old_name: f.name(),
                            old_func: a,
                            target: f.target(),
                        }),
                        _ => None,
                    })
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn func_dir_names() {
        let d = FuncDirName {
            name: "cmdline_proc_show",
            sympos: 1,
        };
        assert!(d.is("cmdline_proc_show,1"));
        for bad in [
            "cmdline_proc_show,01",
            "cmdline_proc_show,2",
            "cmdline_proc_show,",
            "cmdline_proc_show",
            "cmdline_proc_show,1 ",
            "cmdline_proc_sho,1",
            "cmdline_proc_show,+1",
        ] {
            assert!(!d.is(bad), "{bad}");
        }
        let big = FuncDirName {
            name: "a,b",
            sympos: u64::MAX,
        };
        assert!(big.is("a,b,18446744073709551615"));
        assert!(!big.is("a,b,18446744073709551616"));
    }
}
