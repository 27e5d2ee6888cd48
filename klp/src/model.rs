//! The patch model, as a patch author describes it.
//!
//! A patch ([`PatchDesc`]) names the module that carries it and lists objects
//! ([`ObjectDesc`]: vmlinux or a module by name); each object lists the functions to
//! replace ([`FuncDesc`]) and may carry [`Callbacks`]. A patch may declare system
//! [`State`]s and the atomic-replace flag. The description is only checked when it is
//! enabled ([`crate::Klp::enable_patch`]), with the kernel's error codes, so that every
//! malformed patch the kernel can be handed is representable here too.

use alloc::string::String;
#[cfg(not(no_global_oom_handling))]
use alloc::string::ToString;
use alloc::sync::Arc;
use alloc::vec::Vec;
use core::any::Any;
use core::fmt;

use crate::core::Patch;
use crate::errno::KResult;
use crate::fallible::{try_push, try_string};
use crate::host::{Addr, Host, PatchId};

/// One function to replace (`struct klp_func`).
#[derive(Debug, PartialEq, Eq)]
#[cfg_attr(not(no_global_oom_handling), derive(Clone))]
pub struct FuncDesc {
    /// Symbol name of the function to patch (`None` is refused with `-EINVAL`).
    pub old_name: Option<String>,
    /// Address of the replacement (`None` is refused with `-EINVAL`).
    pub new_func: Option<Addr>,
    /// Which same-named symbol, counted from 1; 0 = the name must be unique.
    pub old_sympos: u64,
}

impl FuncDesc {
    /// `old_name` replaced by the function at `new_func`, name unique in its object;
    /// `-ENOMEM` if the name cannot be copied.
    pub fn try_new(old_name: &str, new_func: Addr) -> KResult<FuncDesc> {
        Ok(FuncDesc {
            old_name: Some(try_string(old_name)?),
            new_func: Some(new_func),
            old_sympos: 0,
        })
    }

    /// `old_name` replaced by the function at `new_func`, name unique in its object.
    #[cfg(not(no_global_oom_handling))]
    pub fn new(old_name: &str, new_func: Addr) -> FuncDesc {
        FuncDesc {
            old_name: Some(old_name.to_string()),
            new_func: Some(new_func),
            old_sympos: 0,
        }
    }

    /// Selects the `sympos`-th symbol of that name.
    pub fn sympos(mut self, sympos: u64) -> FuncDesc {
        self.old_sympos = sympos;
        self
    }
}

/// Opaque data that callbacks attach to a [`State`] and hand over between patches.
pub type StateData = Arc<dyn Any + Send + Sync>;

/// A system state a patch changes (`struct klp_state`).
#[derive(Clone)]
pub struct State {
    /// Non-zero identifier (an entry with id 0 ends the list, as in the kernel).
    pub id: u64,
    /// Version of the change; only ever compared.
    pub version: u32,
    /// Free-form data owned by the patch's callbacks.
    pub data: Option<StateData>,
}

impl State {
    /// A state record without data.
    pub fn new(id: u64, version: u32) -> State {
        State {
            id,
            version,
            data: None,
        }
    }
}

impl fmt::Debug for State {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("State")
            .field("id", &self.id)
            .field("version", &self.version)
            .field("data", &self.data.is_some())
            .finish()
    }
}

/// What a callback can see and do (`struct klp_object *obj` plus the state API).
pub struct CallbackCx<'a, H> {
    /// The world.
    pub host: &'a mut H,
    pub(crate) patches: &'a mut [Patch<H>],
    pub(crate) list: &'a [PatchId],
    pub(crate) transition: Option<PatchId>,
    /// Index of the callback's patch in `patches`.
    pub(crate) me: usize,
    /// Index of the callback's object in that patch.
    pub(crate) obj: usize,
}

impl<H: Host> CallbackCx<'_, H> {
    /// Name of the patch (its module).
    pub fn patch_name(&self) -> &str {
        self.patches.get(self.me).map_or("", |p| p.name.as_str())
    }

    /// The object's name: `None` for vmlinux, else the module name.
    pub fn obj_name(&self) -> Option<&str> {
        self.patches
            .get(self.me)
            .and_then(|p| p.objs.get(self.obj))
            .and_then(|o| o.name.as_deref())
    }

    /// `klp_get_state(patch, id)`: this patch's own state record.
    pub fn state(&mut self, id: u64) -> Option<&mut State> {
        self.patches
            .get_mut(self.me)?
            .states
            .iter_mut()
            .find(|s| s.id == id)
    }

    /// `klp_get_prev_state(id)`: the state of the last patch listed before the patch in
    /// transition. Outside a transition this WARNs and returns `None`.
    pub fn prev_state(&mut self, id: u64) -> Option<&State> {
        let Some(tp) = self.transition else {
            self.host
                .warn("klp_get_prev_state() called with no transition");
            return None;
        };
        let patches: &[Patch<H>] = self.patches;
        let mut found = None;
        for pid in self.list.iter().take_while(|p| **p != tp) {
            if let Some(s) = patches
                .iter()
                .find(|p| p.id == *pid)
                .and_then(|p| p.states.iter().find(|s| s.id == id))
            {
                found = Some(s);
            }
        }
        found
    }
}

impl<H: Host> fmt::Debug for CallbackCx<'_, H> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CallbackCx")
            .field("patch", &self.patch_name())
            .field("obj", &self.obj_name())
            .finish_non_exhaustive()
    }
}

/// Per-object callbacks (`struct klp_callbacks`). Every method is optional; a missing
/// `pre_patch` counts as success. See the callbacks seed for when each one runs.
pub trait Callbacks<H> {
    /// Before the object is patched. A non-zero return (a negative errno) refuses it.
    fn pre_patch(&self, cx: &mut CallbackCx<'_, H>) -> i32 {
        let _ = cx;
        0
    }
    /// After the patch took effect for every task.
    fn post_patch(&self, cx: &mut CallbackCx<'_, H>) {
        let _ = cx;
    }
    /// Before unpatching starts.
    fn pre_unpatch(&self, cx: &mut CallbackCx<'_, H>) {
        let _ = cx;
    }
    /// After unpatching finished; only after a successful `pre_patch` step.
    fn post_unpatch(&self, cx: &mut CallbackCx<'_, H>) {
        let _ = cx;
    }
}

/// Callbacks as a patch holds them: shared, and usable from whichever thread performs
/// the core operation (a kernel runs them on any CPU).
pub type SharedCallbacks<H> = Arc<dyn Callbacks<H> + Send + Sync>;

/// One patched binary (`struct klp_object`).
pub struct ObjectDesc<H> {
    /// `None` for vmlinux (the main program), else the module's name.
    pub name: Option<String>,
    /// The functions; `None` (no array at all) is refused with `-EINVAL`.
    pub funcs: Option<Vec<FuncDesc>>,
    /// Optional callbacks.
    pub callbacks: Option<SharedCallbacks<H>>,
}

impl<H> ObjectDesc<H> {
    /// A module object, with no functions yet; `-ENOMEM` if the name cannot be copied.
    pub fn try_module(name: &str) -> KResult<ObjectDesc<H>> {
        Ok(ObjectDesc {
            name: Some(try_string(name)?),
            funcs: Some(Vec::new()),
            callbacks: None,
        })
    }

    /// Adds a function; `-ENOMEM` if the list cannot grow.
    pub fn try_func(mut self, f: FuncDesc) -> KResult<ObjectDesc<H>> {
        try_push(self.funcs.get_or_insert_with(Vec::new), f)?;
        Ok(self)
    }

    /// The vmlinux object, with no functions yet.
    pub fn vmlinux() -> ObjectDesc<H> {
        ObjectDesc {
            name: None,
            funcs: Some(Vec::new()),
            callbacks: None,
        }
    }

    /// A module object, with no functions yet.
    #[cfg(not(no_global_oom_handling))]
    pub fn module(name: &str) -> ObjectDesc<H> {
        ObjectDesc {
            name: Some(name.to_string()),
            funcs: Some(Vec::new()),
            callbacks: None,
        }
    }

    /// Adds a function.
    #[cfg(not(no_global_oom_handling))]
    pub fn func(mut self, f: FuncDesc) -> ObjectDesc<H> {
        self.funcs.get_or_insert_with(Vec::new).push(f);
        self
    }

    /// Sets the callbacks.
    pub fn callbacks(mut self, cb: SharedCallbacks<H>) -> ObjectDesc<H> {
        self.callbacks = Some(cb);
        self
    }
}

impl<H> fmt::Debug for ObjectDesc<H> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ObjectDesc")
            .field("name", &self.name)
            .field("funcs", &self.funcs)
            .field("callbacks", &self.callbacks.is_some())
            .finish()
    }
}

/// A livepatch (`struct klp_patch`).
pub struct PatchDesc<H> {
    /// The module that carries the patch; its name is the patch name.
    pub module: String,
    /// The objects, in order.
    pub objs: Vec<ObjectDesc<H>>,
    /// System states the patch changes (the list ends at the first id 0).
    pub states: Vec<State>,
    /// Atomic replace: this cumulative patch replaces every listed patch.
    pub replace: bool,
}

impl<H> PatchDesc<H> {
    /// An empty patch carried by `module`; `-ENOMEM` if the name cannot be copied.
    pub fn try_new(module: &str) -> KResult<PatchDesc<H>> {
        Ok(PatchDesc {
            module: try_string(module)?,
            objs: Vec::new(),
            states: Vec::new(),
            replace: false,
        })
    }

    /// Adds an object; `-ENOMEM` if the list cannot grow.
    pub fn try_object(mut self, o: ObjectDesc<H>) -> KResult<PatchDesc<H>> {
        try_push(&mut self.objs, o)?;
        Ok(self)
    }

    /// Declares a system state; `-ENOMEM` if the list cannot grow.
    pub fn try_state(mut self, id: u64, version: u32) -> KResult<PatchDesc<H>> {
        try_push(&mut self.states, State::new(id, version))?;
        Ok(self)
    }

    /// An empty patch carried by `module`.
    #[cfg(not(no_global_oom_handling))]
    pub fn new(module: &str) -> PatchDesc<H> {
        PatchDesc {
            module: module.to_string(),
            objs: Vec::new(),
            states: Vec::new(),
            replace: false,
        }
    }

    /// Adds an object.
    #[cfg(not(no_global_oom_handling))]
    pub fn object(mut self, o: ObjectDesc<H>) -> PatchDesc<H> {
        self.objs.push(o);
        self
    }

    /// Declares a system state.
    #[cfg(not(no_global_oom_handling))]
    pub fn state(mut self, id: u64, version: u32) -> PatchDesc<H> {
        self.states.push(State::new(id, version));
        self
    }

    /// Sets the atomic-replace flag.
    pub fn replace(mut self, replace: bool) -> PatchDesc<H> {
        self.replace = replace;
        self
    }
}

impl<H> fmt::Debug for PatchDesc<H> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PatchDesc")
            .field("module", &self.module)
            .field("objs", &self.objs)
            .field("states", &self.states)
            .field("replace", &self.replace)
            .finish()
    }
}
