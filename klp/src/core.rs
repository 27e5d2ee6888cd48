//! The livepatch core: patches, objects, functions, redirect records and the life cycle.
//!
//! [`Klp`] holds everything the kernel keeps under `klp_mutex`. Every public method is
//! one locked operation of the kernel (enable, a sysfs write, a module arriving, a work
//! item running); the caller serialises them (`&mut self`). The host is passed in for
//! the duration of each call.

use alloc::collections::BTreeSet;
use alloc::format;
use alloc::string::{String, ToString};
use alloc::vec::Vec;

use crate::errno::{Errno, KResult};
use crate::host::{Addr, HookError, Host, PatchId, PatchState};
use crate::log::{Level, PREFIX, Record};
use crate::model::{CallbackCx, PatchDesc, SharedCallbacks, State};
use crate::redirect::{RedirectView, Target};

/// Size of the stack-check buffer: a trace with this many entries is unreliable.
pub const MAX_STACK_ENTRIES: usize = 100;
/// Failed completion attempts between two rounds of signals.
pub const SIGNALS_TIMEOUT: u32 = 15;
/// A module object's name must be shorter than this.
pub const MODULE_NAME_LEN: usize = 56;
/// A function or symbol name must be shorter than this.
pub const KSYM_NAME_LEN: usize = 512;

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

impl Func {
    pub(crate) fn name(&self) -> &str {
        self.old_name.as_deref().unwrap_or("")
    }

    /// The sysfs directory name `<old_name>,<sympos or 1>`.
    pub(crate) fn dir_name(&self) -> String {
        format!("{},{}", self.name(), self.old_sympos.max(1))
    }

    fn target(&self) -> Target {
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

/// Points at one function of one patch.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(crate) struct FuncRef {
    pub(crate) patch: PatchId,
    pub(crate) obj: usize,
    pub(crate) func: usize,
}

/// The redirect record of one patched address (`struct klp_ops`).
pub(crate) struct Ops {
    pub(crate) old_func: Addr,
    pub(crate) site: Addr,
    /// Bottom first; the last entry is the top (the active one).
    pub(crate) stack: Vec<FuncRef>,
}

/// A redirect record as tools see it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RecordInfo {
    /// The patched function.
    pub old_func: Addr,
    /// Its entry site.
    pub site: Addr,
    /// The stack: (patch, implementation), bottom first; the last entry is active.
    pub stack: Vec<(PatchId, Target)>,
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
    pub(crate) alive: BTreeSet<String>,
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
            alive: BTreeSet::new(),
            next_id: 1,
        }
    }
}

impl<H> core::fmt::Debug for Klp<H> {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("Klp")
            .field("list", &self.list)
            .field("transition", &self.transition)
            .field("target", &self.target)
            .field("signals_cnt", &self.signals_cnt)
            .finish_non_exhaustive()
    }
}

pub(crate) fn log<H: Host>(host: &mut H, level: Level, func: &'static str, text: &str) {
    let line = format!("{PREFIX}{text}");
    host.log(Record {
        level,
        func,
        text: &line,
    });
}

/// The sysfs layer's own warning about a duplicate name (no `livepatch: ` prefix).
fn sysfs_warn_dup<H: Host>(host: &mut H, text: &str) {
    host.log(Record {
        level: Level::Warn,
        func: "sysfs_warn_dup",
        text,
    });
}

impl<H: Host> Klp<H> {
    /// An initialised livepatch core (the root directory exists) with nothing loaded.
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
        self.patch(r.patch)?.objs.get(r.obj)?.funcs.get(r.func)
    }

    fn func_mut(&mut self, r: FuncRef) -> Option<&mut Func> {
        self.patch_mut(r.patch)?
            .objs
            .get_mut(r.obj)?
            .funcs
            .get_mut(r.func)
    }

    fn patch_name(&self, id: PatchId) -> String {
        self.patch(id).map(|p| p.name.clone()).unwrap_or_default()
    }

    /// The patch of a given name whose sysfs directory exists.
    pub fn find_patch(&self, name: &str) -> Option<PatchId> {
        self.patches
            .iter()
            .find(|p| p.dir && p.name == name)
            .map(|p| p.id)
    }

    // ------------------------------------------------------------------ callbacks

    /// Runs one callback of object `oi` of patch `id`; returns `pre_patch`'s result (0
    /// for the others, or when there is no callback).
    pub(crate) fn run_callback(&mut self, host: &mut H, id: PatchId, oi: usize, which: Cb) -> i32 {
        let prev: Option<Vec<State>> = self.transition.map(|tp| {
            let mut v = Vec::new();
            for pid in &self.list {
                if *pid == tp {
                    break;
                }
                if let Some(p) = self.patch(*pid) {
                    v.extend(p.states.iter().cloned());
                }
            }
            v
        });
        let Some(p) = self.patch_mut(id) else {
            return 0;
        };
        let Some(obj) = p.objs.get(oi) else {
            return 0;
        };
        let Some(cb) = obj.callbacks.clone() else {
            return 0;
        };
        let obj_name = obj.name.clone();
        let patch_name = p.name.clone();
        let mut states = core::mem::take(&mut p.states);
        let mut cx = CallbackCx {
            host,
            patch: &patch_name,
            obj: obj_name.as_deref(),
            states: &mut states,
            prev: prev.as_deref(),
        };
        let ret = match which {
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
        };
        if let Some(p) = self.patch_mut(id) {
            p.states = states;
        }
        ret
    }

    /// The pre-patch step: run `pre_patch`, remember whether post_unpatch may run.
    pub(crate) fn pre_patch_step(&mut self, host: &mut H, id: PatchId, oi: usize) -> i32 {
        let ret = self.run_callback(host, id, oi, Cb::PrePatch);
        if let Some(o) = self.patch_mut(id).and_then(|p| p.objs.get_mut(oi)) {
            o.post_unpatch_enabled = ret == 0;
        }
        ret
    }

    /// The post-unpatch step: run `post_unpatch` once per successful pre-patch step.
    pub(crate) fn post_unpatch_step(&mut self, host: &mut H, id: PatchId, oi: usize) {
        let enabled = self
            .patch(id)
            .and_then(|p| p.objs.get(oi))
            .is_some_and(|o| o.post_unpatch_enabled);
        if enabled {
            self.run_callback(host, id, oi, Cb::PostUnpatch);
        }
        if let Some(o) = self.patch_mut(id).and_then(|p| p.objs.get_mut(oi)) {
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
        let cands = host.symbol_candidates(objname, name);
        let mut count: u64 = 0;
        let mut addr: Addr = 0;
        for a in cands {
            addr = a;
            count += 1;
            if (sympos > 0 && count == sympos) || (sympos == 0 && count > 1) {
                break;
            }
        }
        if count == 0 {
            log(
                host,
                Level::Err,
                "klp_find_object_symbol",
                &format!("symbol '{name}' not found in symbol table"),
            );
            Err(Errno::EINVAL)
        } else if count > 1 && sympos == 0 {
            log(
                host,
                Level::Err,
                "klp_find_object_symbol",
                &format!(
                    "unresolvable ambiguity for symbol '{name}' in object '{}'",
                    objname.unwrap_or("(null)")
                ),
            );
            Err(Errno::EINVAL)
        } else if sympos > 0 && sympos != count {
            log(
                host,
                Level::Err,
                "klp_find_object_symbol",
                &format!(
                    "symbol position {sympos} for symbol '{name}' in object '{}' not found",
                    objname.unwrap_or("vmlinux")
                ),
            );
            Err(Errno::EINVAL)
        } else {
            Ok(addr)
        }
    }

    /// `klp_init_object_loaded`: resolve every function of a present object.
    pub(crate) fn init_object_loaded(
        &mut self,
        host: &mut H,
        id: PatchId,
        oi: usize,
    ) -> KResult<()> {
        let Some(obj) = self.patch(id).and_then(|p| p.objs.get(oi)) else {
            return Err(Errno::EINVAL);
        };
        let objname = obj.name.clone();
        let nfuncs = obj.funcs.len();
        for fi in 0..nfuncs {
            let r = FuncRef {
                patch: id,
                obj: oi,
                func: fi,
            };
            let Some(f) = self.func(r) else { continue };
            let (name, sympos, nop, new_func) =
                (f.name().to_string(), f.old_sympos, f.nop, f.new_func);
            let old = Self::find_object_symbol(host, objname.as_deref(), &name, sympos)?;
            let Some(old_size) = host.symbol_size(old) else {
                log(
                    host,
                    Level::Err,
                    "klp_init_object_loaded",
                    &format!("kallsyms size lookup failed for '{name}'"),
                );
                return Err(Errno::ENOENT);
            };
            let new = if nop { Some(old) } else { new_func };
            let new_size = new.and_then(|a| host.symbol_size(a));
            let Some(new_size) = new_size else {
                log(
                    host,
                    Level::Err,
                    "klp_init_object_loaded",
                    &format!("kallsyms size lookup failed for '{name}' replacement"),
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
        let name = f.name().to_string();
        match self.ops_index(old) {
            Some(i) => {
                if let Some(o) = self.ops.get_mut(i) {
                    o.stack.push(r);
                }
                if let Some(f) = self.func_mut(r) {
                    f.patched = true;
                }
                self.publish_one(host, i);
            }
            None => {
                let Some(site) = host.hook_site(old) else {
                    log(
                        host,
                        Level::Err,
                        "klp_patch_func",
                        &format!("failed to find location for function '{name}'"),
                    );
                    return Err(Errno::EINVAL);
                };
                self.ops.push(Ops {
                    old_func: old,
                    site,
                    stack: alloc::vec![r],
                });
                // Publish before registering so that the handler never runs without a
                // view (the kernel's record exists before its ftrace registration).
                if let Some(f) = self.func_mut(r) {
                    f.patched = true;
                }
                let idx = self.ops.len() - 1;
                self.publish_one(host, idx);
                if let Err(e) = host.hook_register(site) {
                    let text = match e {
                        HookError::Filter(e) => format!(
                            "failed to set ftrace filter for function '{name}' ({})",
                            e.to_kernel()
                        ),
                        HookError::Register(e) => format!(
                            "failed to register ftrace handler for function '{name}' ({})",
                            e.to_kernel()
                        ),
                    };
                    log(host, Level::Err, "klp_patch_func", &text);
                    self.ops.pop();
                    host.hook_publish(site, None);
                    if let Some(f) = self.func_mut(r) {
                        f.patched = false;
                    }
                    return Err(match e {
                        HookError::Filter(e) | HookError::Register(e) => e,
                    });
                }
            }
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
        let Some(obj) = self.patch(id).and_then(|p| p.objs.get(oi)) else {
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
        if let Some(o) = self.patch_mut(id).and_then(|p| p.objs.get_mut(oi)) {
            o.patched = true;
        }
        Ok(())
    }

    /// `__klp_unpatch_object`.
    pub(crate) fn unpatch_object(&mut self, host: &mut H, id: PatchId, oi: usize, nops_only: bool) {
        let Some(obj) = self.patch(id).and_then(|p| p.objs.get(oi)) else {
            return;
        };
        let todo: Vec<usize> = obj
            .funcs
            .iter()
            .enumerate()
            .filter(|(_, f)| f.patched && (!nops_only || f.nop))
            .map(|(i, _)| i)
            .collect();
        for fi in todo {
            self.unpatch_func(
                host,
                FuncRef {
                    patch: id,
                    obj: oi,
                    func: fi,
                },
            );
        }
        if let Some(o) = self.patch_mut(id).and_then(|p| p.objs.get_mut(oi))
            && (o.dynamic || !nops_only)
        {
            o.patched = false;
        }
    }

    /// `klp_unpatch_objects` / `klp_unpatch_objects_dynamic`.
    pub(crate) fn unpatch_objects(&mut self, host: &mut H, id: PatchId, nops_only: bool) {
        let n = self.patch(id).map_or(0, |p| p.objs.len());
        for oi in 0..n {
            let patched = self
                .patch(id)
                .and_then(|p| p.objs.get(oi))
                .is_some_and(|o| o.patched);
            if patched {
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

    /// `klp_enable_patch`: registers, initialises and enables a patch. Its result is the
    /// result of loading the patch module. On error nothing of the patch remains.
    pub fn enable_patch(&mut self, host: &mut H, desc: PatchDesc<H>) -> KResult<PatchId> {
        if desc.objs.iter().any(|o| o.funcs.is_none()) {
            return Err(Errno::EINVAL);
        }
        if !host.module_is_livepatch(&desc.module) {
            log(
                host,
                Level::Err,
                "klp_enable_patch",
                &format!("module {} is not marked as a livepatch module", desc.module),
            );
            return Err(Errno::EINVAL);
        }
        if !host.reliable_stacktrace() {
            log(
                host,
                Level::Warn,
                "klp_enable_patch",
                "This architecture doesn't have support for the livepatch consistency model.",
            );
            log(
                host,
                Level::Warn,
                "klp_enable_patch",
                "The livepatch transition may never complete.",
            );
        }
        let states: Vec<State> = desc.states.into_iter().take_while(|s| s.id != 0).collect();
        if !self.is_patch_compatible(&states, desc.replace) {
            log(
                host,
                Level::Err,
                "klp_enable_patch",
                &format!(
                    "Livepatch patch ({}) is not compatible with the already installed livepatches.",
                    desc.module
                ),
            );
            return Err(Errno::EINVAL);
        }
        if !host.module_get(&desc.module) {
            return Err(Errno::ENODEV);
        }
        let id = PatchId(self.next_id);
        self.next_id += 1;
        let objs = desc
            .objs
            .into_iter()
            .map(|o| Object {
                name: o.name,
                funcs: o
                    .funcs
                    .unwrap_or_default()
                    .into_iter()
                    .map(|f| Func {
                        old_name: f.old_name,
                        new_func: f.new_func,
                        old_sympos: f.old_sympos,
                        old_func: None,
                        old_size: 0,
                        new_size: 0,
                        nop: false,
                        patched: false,
                        transition: false,
                    })
                    .collect(),
                callbacks: o.callbacks,
                loaded: false,
                dynamic: false,
                patched: false,
                post_unpatch_enabled: false,
            })
            .collect();
        self.patches.push(Patch {
            id,
            name: desc.module,
            objs,
            states,
            replace: desc.replace,
            enabled: false,
            forced: false,
            dir: false,
            module_ref: true,
        });
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
        let name = self.patch_name(id);
        if self.patches.iter().any(|p| p.dir && p.name == name) {
            sysfs_warn_dup(
                host,
                &format!("sysfs: cannot create duplicate filename '/kernel/livepatch/{name}'"),
            );
            return Err(Errno::EEXIST);
        }
        if let Some(p) = self.patch_mut(id) {
            p.dir = true;
        }
        if self.patch(id).is_some_and(|p| p.replace) {
            self.add_nops(id);
        }
        let nobjs = self.patch(id).map_or(0, |p| p.objs.len());
        for oi in 0..nobjs {
            self.init_object(host, id, oi)?;
        }
        self.list.push(id);
        Ok(())
    }

    /// `klp_add_nops`: cover every function the listed patches patch.
    fn add_nops(&mut self, id: PatchId) {
        let mut wanted: Vec<(Option<String>, String, u64)> = Vec::new();
        for pid in &self.list {
            if let Some(old) = self.patch(*pid) {
                for o in &old.objs {
                    for f in &o.funcs {
                        wanted.push((o.name.clone(), f.name().to_string(), f.old_sympos));
                    }
                    if o.funcs.is_empty() {
                        wanted.push((o.name.clone(), String::new(), u64::MAX));
                    }
                }
            }
        }
        let Some(p) = self.patch_mut(id) else { return };
        for (objname, fname, sympos) in wanted {
            let oi = match p.objs.iter().position(|o| o.matches(objname.as_deref())) {
                Some(i) => i,
                None => {
                    p.objs.push(Object {
                        name: objname.clone(),
                        funcs: Vec::new(),
                        callbacks: None,
                        loaded: false,
                        dynamic: true,
                        patched: false,
                        post_unpatch_enabled: false,
                    });
                    p.objs.len() - 1
                }
            };
            if sympos == u64::MAX {
                continue; // an old object without functions: only the object is needed
            }
            let Some(obj) = p.objs.get_mut(oi) else {
                continue;
            };
            let norm = |s: u64| if s == 0 { 1 } else { s };
            if obj
                .funcs
                .iter()
                .any(|f| f.name() == fname && norm(f.old_sympos) == norm(sympos))
            {
                continue;
            }
            obj.funcs.push(Func {
                old_name: Some(fname),
                new_func: None,
                old_sympos: sympos,
                old_func: None,
                old_size: 0,
                new_size: 0,
                nop: true,
                patched: false,
                transition: false,
            });
        }
    }

    /// `klp_init_object` (and `klp_init_func` for each of its functions).
    fn init_object(&mut self, host: &mut H, id: PatchId, oi: usize) -> KResult<()> {
        let alive = self.alive.clone();
        let Some(p) = self.patch_mut(id) else {
            return Err(Errno::EINVAL);
        };
        let pname = p.name.clone();
        // Directory names of the objects before this one (duplicates collide in sysfs).
        let earlier: Vec<String> = p
            .objs
            .iter()
            .take(oi)
            .map(|o| o.display_name().to_string())
            .collect();
        let Some(obj) = p.objs.get_mut(oi) else {
            return Err(Errno::EINVAL);
        };
        if let Some(n) = &obj.name
            && n.len() >= MODULE_NAME_LEN
        {
            return Err(Errno::EINVAL);
        }
        obj.patched = false;
        obj.loaded = match &obj.name {
            None => true,
            Some(n) => alive.contains(n),
        };
        let dname = obj.display_name().to_string();
        if earlier.contains(&dname) {
            sysfs_warn_dup(
                host,
                &format!(
                    "sysfs: cannot create duplicate filename '/kernel/livepatch/{pname}/{dname}'"
                ),
            );
            return Err(Errno::EEXIST);
        }
        let mut seen: Vec<String> = Vec::new();
        for f in &mut obj.funcs {
            let Some(n) = &f.old_name else {
                return Err(Errno::EINVAL);
            };
            if f.new_func.is_none() && !f.nop {
                return Err(Errno::EINVAL);
            }
            if n.len() >= KSYM_NAME_LEN {
                return Err(Errno::EINVAL);
            }
            f.patched = false;
            f.transition = false;
            let d = f.dir_name();
            if seen.contains(&d) {
                sysfs_warn_dup(
                    host,
                    &format!(
                        "sysfs: cannot create duplicate filename '/kernel/livepatch/{pname}/{dname}/{d}'"
                    ),
                );
                return Err(Errno::EEXIST);
            }
            seen.push(d);
        }
        let loaded = obj.loaded;
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
        if self.patch(id).is_some_and(|p| p.enabled) {
            host.warn("__klp_enable_patch: patch already enabled");
            return Err(Errno::EINVAL);
        }
        let name = self.patch_name(id);
        log(
            host,
            Level::Notice,
            "__klp_enable_patch",
            &format!("enabling patch '{name}'"),
        );
        self.init_transition(host, id, PatchState::Patched);
        let nobjs = self.patch(id).map_or(0, |p| p.objs.len());
        let mut result = Ok(());
        for oi in 0..nobjs {
            let Some(obj) = self.patch(id).and_then(|p| p.objs.get(oi)) else {
                continue;
            };
            if !obj.loaded {
                continue;
            }
            let oname = obj.display_name().to_string();
            let ret = self.pre_patch_step(host, id, oi);
            if ret != 0 {
                log(
                    host,
                    Level::Warn,
                    "__klp_enable_patch",
                    &format!("pre-patch callback failed for object '{oname}'"),
                );
                result = Err(Errno::from_ret(ret));
                break;
            }
            if let Err(e) = self.patch_object(host, id, oi) {
                log(
                    host,
                    Level::Warn,
                    "__klp_enable_patch",
                    &format!("failed to patch object '{oname}'"),
                );
                result = Err(e);
                break;
            }
        }
        if let Err(e) = result {
            log(
                host,
                Level::Warn,
                "__klp_enable_patch",
                &format!("failed to enable patch '{name}'"),
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

    /// `__klp_disable_patch` (writing 0 to `enabled`).
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
            let patched = self
                .patch(id)
                .and_then(|p| p.objs.get(oi))
                .is_some_and(|o| o.patched);
            if patched {
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
    /// the module; its load must then fail with that error.
    pub fn module_coming(&mut self, host: &mut H, module: &str) -> KResult<()> {
        if module == "vmlinux" {
            log(
                host,
                Level::Err,
                "klp_module_coming",
                "vmlinux.ko: invalid module name",
            );
            return Err(Errno::EINVAL);
        }
        self.alive.insert(module.to_string());
        let list = self.list.clone();
        for pid in list {
            let Some(oi) = self
                .patch(pid)
                .and_then(|p| p.objs.iter().position(|o| o.matches(Some(module))))
            else {
                continue;
            };
            let pname = self.patch_name(pid);
            if let Some(o) = self.patch_mut(pid).and_then(|p| p.objs.get_mut(oi)) {
                o.loaded = true;
            }
            let r = self.coming_one(host, pid, oi, &pname, module);
            if let Err(e) = r {
                log(
                    host,
                    Level::Warn,
                    "klp_module_coming",
                    &format!(
                        "patch '{pname}' failed for module '{module}', refusing to load module '{module}'"
                    ),
                );
                self.alive.remove(module);
                if let Some(o) = self.patch_mut(pid).and_then(|p| p.objs.get_mut(oi)) {
                    o.loaded = false;
                }
                self.cleanup_module_patches_limited(host, module, Some(pid));
                return Err(e);
            }
        }
        Ok(())
    }

    fn coming_one(
        &mut self,
        host: &mut H,
        pid: PatchId,
        oi: usize,
        pname: &str,
        module: &str,
    ) -> KResult<()> {
        if let Err(e) = self.init_object_loaded(host, pid, oi) {
            log(
                host,
                Level::Warn,
                "klp_module_coming",
                &format!(
                    "failed to initialize patch '{pname}' for module '{module}' ({})",
                    e.to_kernel()
                ),
            );
            return Err(e);
        }
        log(
            host,
            Level::Notice,
            "klp_module_coming",
            &format!("applying patch '{pname}' to loading module '{module}'"),
        );
        let ret = self.pre_patch_step(host, pid, oi);
        if ret != 0 {
            log(
                host,
                Level::Warn,
                "klp_module_coming",
                &format!("pre-patch callback failed for object '{module}'"),
            );
            return Err(Errno::from_ret(ret));
        }
        if let Err(e) = self.patch_object(host, pid, oi) {
            log(
                host,
                Level::Warn,
                "klp_module_coming",
                &format!(
                    "failed to apply patch '{pname}' to module '{module}' ({})",
                    e.to_kernel()
                ),
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
        self.alive.remove(module);
        self.cleanup_module_patches_limited(host, module, None);
    }

    fn cleanup_module_patches_limited(
        &mut self,
        host: &mut H,
        module: &str,
        limit: Option<PatchId>,
    ) {
        let list = self.list.clone();
        for pid in list {
            if Some(pid) == limit {
                break;
            }
            let Some(oi) = self
                .patch(pid)
                .and_then(|p| p.objs.iter().position(|o| o.matches(Some(module))))
            else {
                continue;
            };
            if !self
                .patch(pid)
                .and_then(|p| p.objs.get(oi))
                .is_some_and(|o| o.loaded)
            {
                continue;
            }
            let pname = self.patch_name(pid);
            if self.transition != Some(pid) {
                self.run_callback(host, pid, oi, Cb::PreUnpatch);
            }
            log(
                host,
                Level::Notice,
                "klp_cleanup_module_patches_limited",
                &format!("reverting patch '{pname}' on unloading module '{module}'"),
            );
            self.unpatch_object(host, pid, oi, false);
            self.post_unpatch_step(host, pid, oi);
            if let Some(o) = self.patch_mut(pid).and_then(|p| p.objs.get_mut(oi)) {
                o.loaded = false;
                for f in &mut o.funcs {
                    f.old_func = None;
                    if f.nop {
                        f.new_func = None;
                    }
                }
            }
        }
    }

    // ------------------------------------------------------------------ misc public

    /// Whether `module` is livepatch-alive.
    pub fn module_alive(&self, module: &str) -> bool {
        self.alive.contains(module)
    }

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
    pub fn listed(&self) -> Vec<PatchId> {
        self.list.clone()
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
    pub fn records(&self) -> Vec<RecordInfo> {
        self.ops
            .iter()
            .map(|o| RecordInfo {
                old_func: o.old_func,
                site: o.site,
                stack: o
                    .stack
                    .iter()
                    .filter_map(|r| self.func(*r).map(|f| (r.patch, f.target())))
                    .collect(),
            })
            .collect()
    }

    /// The old functions a patch currently has on the redirect stacks, with their
    /// replacement, for tests and tools: `(object, old_name, old_func, target)`.
    pub fn patched_funcs(&self, id: PatchId) -> Vec<(Option<String>, String, Addr, Target)> {
        let mut v = Vec::new();
        if let Some(p) = self.patch(id) {
            for o in &p.objs {
                for f in &o.funcs {
                    if let (true, Some(a)) = (f.patched, f.old_func) {
                        v.push((o.name.clone(), f.name().to_string(), a, f.target()));
                    }
                }
            }
        }
        v
    }
}
