//! The kernel's livepatch selftest modules (`test_modules/`), recreated for the
//! simulated kernel with the same names, parameters, patched functions, callbacks and
//! printed text.

use std::collections::BTreeMap;
use std::rc::Rc;
use std::sync::Arc;
use std::sync::atomic::{AtomicI32, Ordering};

use klp::{CallbackCx, Callbacks, Errno, FuncDesc, ObjectDesc, PatchDesc, TaskId};

use crate::kernel::Kernel;
use crate::world::{Activity, Body, Kind, ParamValue, Sleep, World};

/// Type of a module parameter.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ParamKind {
    /// `int`
    Int,
    /// `bool`
    Bool,
    /// array of `int`
    IntArray,
}

/// A module parameter.
#[derive(Clone, Debug)]
pub struct ParamDef {
    /// Name.
    pub name: &'static str,
    /// Type.
    pub kind: ParamKind,
    /// sysfs permissions (0 = no file).
    pub perm: u32,
    /// Default value.
    pub default: ParamValue,
}

/// Defines a module's functions in the world (at load).
pub type DefineFn = fn(&mut World, &str);
/// A module's init function.
pub type InitFn = fn(&mut Kernel) -> Result<(), Errno>;
/// A module's exit function.
pub type ExitFn = fn(&mut Kernel);

/// A loadable module.
#[derive(Clone, Debug)]
pub struct ModuleDef {
    /// Name.
    pub name: &'static str,
    /// `MODULE_INFO(livepatch, "Y")`.
    pub livepatch: bool,
    /// Parameters.
    pub params: Vec<ParamDef>,
    /// Its functions.
    pub define_funcs: DefineFn,
    /// Init.
    pub init: InitFn,
    /// Exit.
    pub exit: ExitFn,
}

fn body(f: impl Fn(&mut World, TaskId) -> String + 'static) -> Body {
    Rc::new(f)
}

fn no_funcs(_: &mut World, _: &str) {}
fn no_exit(_: &mut Kernel) {}

fn int_param(name: &'static str, perm: u32) -> ParamDef {
    ParamDef {
        name,
        kind: ParamKind::Int,
        perm,
        default: ParamValue::Int(0),
    }
}

fn param_int(k: &Kernel, module: &str, name: &str) -> i64 {
    match k.world.param(module, name) {
        Some(ParamValue::Int(v)) => *v,
        _ => 0,
    }
}

fn func_addr(k: &Kernel, module: &str, name: &str) -> Option<u64> {
    k.world.addr_of(Some(module), name)
}

/// Enables `desc` from a livepatch module's init and remembers the patch.
pub(crate) fn enable(k: &mut Kernel, module: &str, desc: PatchDesc<World>) -> Result<(), Errno> {
    let id = crate::failalloc::core(|| k.klp.enable_patch(&mut k.world, desc))?;
    if let Some(m) = k.world.modules.get_mut(module) {
        m.patch = Some(id);
    }
    Ok(())
}

/// Every module the simulated kernel can load, by name.
pub fn catalog() -> BTreeMap<String, ModuleDef> {
    let mut v = vec![
        ModuleDef {
            name: "test_klp_livepatch",
            livepatch: true,
            params: vec![],
            define_funcs: |w, m| {
                w.define(
                    Some(m),
                    "livepatch_cmdline_proc_show",
                    0x40,
                    true,
                    body(|_, _| "test_klp_livepatch: this has been live patched\n".into()),
                );
            },
            init: |k| {
                let m = "test_klp_livepatch";
                let new = func_addr(k, m, "livepatch_cmdline_proc_show").unwrap_or(0);
                let desc = PatchDesc::new(m)
                    .object(ObjectDesc::vmlinux().func(FuncDesc::new("cmdline_proc_show", new)));
                enable(k, m, desc)
            },
            exit: no_exit,
        },
        ModuleDef {
            name: "test_klp_atomic_replace",
            livepatch: true,
            params: vec![int_param("replace", 0o644)],
            define_funcs: |w, m| {
                w.define(
                    Some(m),
                    "livepatch_meminfo_proc_show",
                    0x40,
                    true,
                    body(|_, _| "test_klp_atomic_replace: this has been live patched\n".into()),
                );
            },
            init: |k| {
                let m = "test_klp_atomic_replace";
                let new = func_addr(k, m, "livepatch_meminfo_proc_show").unwrap_or(0);
                let replace = param_int(k, m, "replace") != 0;
                let desc = PatchDesc::new(m)
                    .object(ObjectDesc::vmlinux().func(FuncDesc::new("meminfo_proc_show", new)))
                    .replace(replace);
                enable(k, m, desc)
            },
            exit: no_exit,
        },
        ModuleDef {
            name: "test_klp_callbacks_demo",
            livepatch: true,
            params: vec![int_param("pre_patch_ret", 0o644)],
            define_funcs: |w, m| {
                w.define(
                    Some(m),
                    "patched_work_func",
                    0x40,
                    true,
                    body(|w, _| {
                        w.pr_mod("test_klp_callbacks_demo", "patched_work_func");
                        String::new()
                    }),
                );
            },
            init: |k| {
                let m = "test_klp_callbacks_demo";
                let new = func_addr(k, m, "patched_work_func").unwrap_or(0);
                let cb: klp::SharedCallbacks<World> = Arc::new(DemoCallbacks {
                    module: m,
                    pre_patch_ret_param: true,
                });
                let desc = PatchDesc::new(m)
                    .object(ObjectDesc::vmlinux().callbacks(cb.clone()))
                    .object(ObjectDesc::module("test_klp_callbacks_mod").callbacks(cb.clone()))
                    .object(
                        ObjectDesc::module("test_klp_callbacks_busy")
                            .func(FuncDesc::new("busymod_work_func", new))
                            .callbacks(cb),
                    );
                enable(k, m, desc)
            },
            exit: no_exit,
        },
        ModuleDef {
            name: "test_klp_callbacks_demo2",
            livepatch: true,
            params: vec![int_param("replace", 0o644)],
            define_funcs: no_funcs,
            init: |k| {
                let m = "test_klp_callbacks_demo2";
                let cb: klp::SharedCallbacks<World> = Arc::new(DemoCallbacks {
                    module: m,
                    pre_patch_ret_param: false,
                });
                let replace = param_int(k, m, "replace") != 0;
                let desc = PatchDesc::new(m)
                    .object(ObjectDesc::vmlinux().callbacks(cb))
                    .replace(replace);
                enable(k, m, desc)
            },
            exit: no_exit,
        },
        ModuleDef {
            name: "test_klp_callbacks_mod",
            livepatch: false,
            params: vec![],
            define_funcs: no_funcs,
            init: |k| {
                k.world
                    .pr_mod("test_klp_callbacks_mod", "test_klp_callbacks_mod_init");
                Ok(())
            },
            exit: |k| {
                k.world
                    .pr_mod("test_klp_callbacks_mod", "test_klp_callbacks_mod_exit");
            },
        },
        ModuleDef {
            name: "test_klp_callbacks_busy",
            livepatch: false,
            params: vec![ParamDef {
                name: "block_transition",
                kind: ParamKind::Bool,
                perm: 0o644,
                default: ParamValue::Bool(false),
            }],
            define_funcs: |w, m| {
                w.define(
                    Some(m),
                    "busymod_work_func",
                    0x80,
                    true,
                    body(|w, _| {
                        w.pr_mod("test_klp_callbacks_busy", "busymod_work_func enter");
                        "entered".into()
                    }),
                );
            },
            init: busy_init,
            exit: busy_exit,
        },
        ModuleDef {
            name: "test_klp_state",
            livepatch: true,
            params: vec![],
            define_funcs: no_funcs,
            init: |k| state_init(k, "test_klp_state", 1),
            exit: no_exit,
        },
        ModuleDef {
            name: "test_klp_state2",
            livepatch: true,
            params: vec![],
            define_funcs: no_funcs,
            init: |k| state_init(k, "test_klp_state2", 2),
            exit: no_exit,
        },
        ModuleDef {
            name: "test_klp_state3",
            livepatch: true,
            params: vec![],
            define_funcs: no_funcs,
            init: |k| state_init(k, "test_klp_state3", 2),
            exit: no_exit,
        },
        ModuleDef {
            name: "test_klp_syscall",
            livepatch: true,
            params: vec![ParamDef {
                name: "klp_pids",
                kind: ParamKind::IntArray,
                perm: 0,
                default: ParamValue::IntArray(vec![]),
            }],
            define_funcs: |w, m| {
                w.define(
                    Some(m),
                    "lp_sys_getpid",
                    0x60,
                    true,
                    body(|w, t| {
                        let pid = w.task(t).map_or(0, |x| x.pid);
                        let m = "test_klp_syscall";
                        let pending = w.var(m, "npids_pending");
                        if pending > 0 {
                            let npids = w.var(m, "npids") as usize;
                            if let Some(mm) = w.modules.get_mut(m)
                                && let Some((ParamValue::IntArray(pids), _)) =
                                    mm.params.get_mut("klp_pids")
                                && let Some(slot) = pids.iter_mut().take(npids).find(|x| **x == pid)
                            {
                                *slot = 0;
                                w.set_var(m, "npids_pending", pending - 1);
                            }
                        }
                        pid.to_string()
                    }),
                );
            },
            init: |k| {
                let m = "test_klp_syscall";
                let n = match k.world.param(m, "klp_pids") {
                    Some(ParamValue::IntArray(v)) => v.len() as i64,
                    _ => 0,
                };
                k.world.set_var(m, "npids_pending", n);
                k.world.set_var(m, "npids", n);
                k.world.files.insert(
                    "/sys/kernel/test_klp_syscall/npids".into(),
                    (
                        m.to_string(),
                        body(|w, _| format!("{}\n", w.var("test_klp_syscall", "npids_pending"))),
                    ),
                );
                let new = func_addr(k, m, "lp_sys_getpid").unwrap_or(0);
                let old = format!("{}sys_getpid", k.arch_prefix);
                let desc =
                    PatchDesc::new(m).object(ObjectDesc::vmlinux().func(FuncDesc::new(&old, new)));
                enable(k, m, desc)
            },
            exit: no_exit,
        },
        ModuleDef {
            name: "test_klp_kprobe",
            livepatch: false,
            params: vec![ParamDef {
                name: "has_post_handler",
                kind: ParamKind::Bool,
                perm: 0o444,
                default: ParamValue::Bool(true),
            }],
            define_funcs: no_funcs,
            init: |k| {
                let m = "test_klp_kprobe";
                let post = matches!(
                    k.world.param(m, "has_post_handler"),
                    Some(ParamValue::Bool(true))
                );
                k.world
                    .kprobes
                    .push((m.to_string(), "cmdline_proc_show".to_string(), post));
                if k.world.kprobes_enabled {
                    let site = k.world.addr_of(None, "cmdline_proc_show").unwrap_or(0);
                    let r = k.world.ftrace_register(crate::world::FtraceOps {
                        owner: crate::world::FtraceOwner::Kprobe(m.to_string()),
                        site,
                        ipmodify: post,
                        permanent: false,
                    });
                    if let Err(e) = r {
                        k.world.kprobes.retain(|(mm, _, _)| mm != m);
                        return Err(e);
                    }
                }
                Ok(())
            },
            exit: no_exit,
        },
        ModuleDef {
            name: "test_klp_mod_target",
            livepatch: false,
            params: vec![],
            define_funcs: |w, m| {
                w.define(
                    Some(m),
                    "test_klp_mod_target_show",
                    0x40,
                    true,
                    body(|_, _| "test_klp_mod_target: original output\n".into()),
                );
            },
            init: |k| {
                let m = "test_klp_mod_target";
                k.world.pr_mod(m, "test_klp_mod_target_init");
                let show = func_addr(k, m, "test_klp_mod_target_show").unwrap_or(0);
                k.world.files.insert(
                    "/proc/test_klp_mod_target".into(),
                    (m.to_string(), body(move |w, t| w.call(t, show))),
                );
                Ok(())
            },
            exit: |k| {
                k.world
                    .pr_mod("test_klp_mod_target", "test_klp_mod_target_exit");
            },
        },
        ModuleDef {
            name: "test_klp_mod_patch",
            livepatch: true,
            params: vec![],
            define_funcs: |w, m| {
                w.define(
                    Some(m),
                    "livepatch_mod_target_show",
                    0x40,
                    true,
                    body(|_, _| "test_klp_mod_patch: this has been live patched\n".into()),
                );
            },
            init: |k| {
                let m = "test_klp_mod_patch";
                let new = func_addr(k, m, "livepatch_mod_target_show").unwrap_or(0);
                let desc = PatchDesc::new(m).object(
                    ObjectDesc::module("test_klp_mod_target")
                        .func(FuncDesc::new("test_klp_mod_target_show", new)),
                );
                enable(k, m, desc)
            },
            exit: no_exit,
        },
    ];
    v.push(crate::shadow_fixture::module());
    v.into_iter().map(|m| (m.name.to_string(), m)).collect()
}

/// The callbacks of test_klp_callbacks_demo and _demo2 (`callback_info`).
struct DemoCallbacks {
    module: &'static str,
    pre_patch_ret_param: bool,
}

fn callback_info(cx: &mut CallbackCx<'_, World>, module: &str, cb: &str) {
    let line = match cx.obj_name() {
        None => format!("{cb}: vmlinux"),
        Some(o) => {
            let st = cx
                .host
                .mod_state(o)
                .map_or("[MODULE_STATE_UNFORMED] Still setting it up", |s| {
                    s.describe()
                });
            format!("{cb}: {o} -> {st}")
        }
    };
    cx.host.pr_mod(module, &line);
}

impl Callbacks<World> for DemoCallbacks {
    fn pre_patch(&self, cx: &mut CallbackCx<'_, World>) -> i32 {
        let _h = crate::failalloc::host();
        callback_info(cx, self.module, "pre_patch_callback");
        if self.pre_patch_ret_param {
            match cx.host.param(self.module, "pre_patch_ret") {
                Some(ParamValue::Int(v)) => *v as i32,
                _ => 0,
            }
        } else {
            0
        }
    }
    fn post_patch(&self, cx: &mut CallbackCx<'_, World>) {
        let _h = crate::failalloc::host();
        callback_info(cx, self.module, "post_patch_callback");
    }
    fn pre_unpatch(&self, cx: &mut CallbackCx<'_, World>) {
        let _h = crate::failalloc::host();
        callback_info(cx, self.module, "pre_unpatch_callback");
    }
    fn post_unpatch(&self, cx: &mut CallbackCx<'_, World>) {
        let _h = crate::failalloc::host();
        callback_info(cx, self.module, "post_unpatch_callback");
    }
}

// ---------------------------------------------------------------- callbacks_busy

fn busy_init(k: &mut Kernel) -> Result<(), Errno> {
    let m = "test_klp_callbacks_busy";
    k.world.pr_mod(m, "test_klp_callbacks_busy_init");
    let idle = worker_idle_stack(&k.world);
    // A new kworker: forked by kthreadd, it inherits kthreadd's livepatch state.
    let parent = k.world.kthreadd;
    let worker = k
        .world
        .spawn(parent, "kworker/1:1", Kind::Kthread, idle, Activity::Sleep);
    k.world.set_var(m, "worker", worker.0 as i64);
    let f = k.world.addr_of(Some(m), "busymod_work_func").unwrap_or(0);
    // schedule_work(): the worker runs busymod_work_func (through the entry hook).
    let prev = k.world.current;
    k.world.current = worker;
    let pow = k.world.ret_in("process_one_work");
    if let Some(t) = k.world.task_mut(worker) {
        let n = t.stack.len();
        t.stack.insert(n.saturating_sub(1), pow);
    }
    let out = k.world.call(worker, f);
    k.world.current = prev;
    if out != "entered" {
        // The work function was redirected: the replacement ran instead and returned.
        if let Some(t) = k.world.task_mut(worker) {
            t.stack.retain(|a| *a != pow);
        }
        return Ok(());
    }
    let block = matches!(
        k.world.param(m, "block_transition"),
        Some(ParamValue::Bool(true))
    );
    // The worker now sleeps inside busymod_work_func (msleep(20) in a loop).
    let stack = vec![
        k.world.ret_in("ret_from_fork"),
        k.world.ret_in("kthread"),
        k.world.ret_in("worker_thread"),
        pow,
        f + 0x20,
        k.world.ret_in("msleep"),
        k.world.ret_in("schedule_timeout"),
        k.world.ret_in("schedule"),
    ];
    if let Some(t) = k.world.task_mut(worker) {
        t.stack = stack;
        t.sleep = Sleep::Uninterruptible;
        t.activity = Activity::BusyWork {
            module: m.to_string(),
        };
    }
    if !block {
        busy_work_leave(k, worker, m.to_string());
    }
    Ok(())
}

fn worker_idle_stack(w: &World) -> Vec<u64> {
    vec![
        w.ret_in("ret_from_fork"),
        w.ret_in("kthread"),
        w.ret_in("worker_thread"),
        w.ret_in("schedule"),
    ]
}

/// The busy worker sees `block_transition` cleared and leaves `busymod_work_func`.
pub fn busy_work_leave(k: &mut Kernel, worker: TaskId, module: String) {
    k.world.pr_mod(&module, "busymod_work_func exit");
    let idle = worker_idle_stack(&k.world);
    if let Some(t) = k.world.task_mut(worker) {
        t.stack = idle;
        t.sleep = Sleep::Interruptible;
        t.activity = Activity::Sleep;
    }
}

fn busy_exit(k: &mut Kernel) {
    let m = "test_klp_callbacks_busy";
    if let Some(mm) = k.world.modules.get_mut(m)
        && let Some((v, _)) = mm.params.get_mut("block_transition")
    {
        *v = ParamValue::Bool(false);
    }
    let worker = TaskId(k.world.var(m, "worker") as u64);
    if matches!(
        k.world.task(worker).map(|t| &t.activity),
        Some(Activity::BusyWork { .. })
    ) {
        busy_work_leave(k, worker, m.to_string());
    }
    k.world.pr_mod(m, "test_klp_callbacks_busy_exit");
}

// ---------------------------------------------------------------- state, state2, state3

const CONSOLE_LOGLEVEL_STATE: u64 = 1;
const CONSOLE_LOGLEVEL_MOTORMOUTH: i32 = 15;

fn state_init(k: &mut Kernel, m: &'static str, version: u32) -> Result<(), Errno> {
    let cb: klp::SharedCallbacks<World> = Arc::new(StateCallbacks { module: m, version });
    let desc = PatchDesc::new(m)
        .object(ObjectDesc::vmlinux().callbacks(cb))
        .state(CONSOLE_LOGLEVEL_STATE, version)
        .replace(true);
    enable(k, m, desc)
}

/// Callbacks of test_klp_state (version 1) and test_klp_state2/3 (version 2, which
/// knows how to take the change over from an older patch).
struct StateCallbacks {
    module: &'static str,
    version: u32,
}

impl StateCallbacks {
    fn say(&self, cx: &mut CallbackCx<'_, World>, helper: &str, text: &str) {
        cx.host.pr_mod(self.module, &format!("{helper}: {text}"));
    }
    fn has_prev(&self, cx: &mut CallbackCx<'_, World>) -> bool {
        self.version >= 2 && cx.prev_state(CONSOLE_LOGLEVEL_STATE).is_some()
    }
}

fn level_of(s: &klp::State) -> Option<&AtomicI32> {
    s.data.as_ref()?.downcast_ref::<AtomicI32>()
}

impl Callbacks<World> for StateCallbacks {
    fn pre_patch(&self, cx: &mut CallbackCx<'_, World>) -> i32 {
        let _h = crate::failalloc::host();
        callback_info(cx, self.module, "pre_patch_callback");
        let h = "allocate_loglevel_state";
        if self.has_prev(cx) {
            self.say(cx, h, "space to store console_loglevel already allocated");
            return 0;
        }
        let Some(s) = cx.state(CONSOLE_LOGLEVEL_STATE) else {
            return Errno::EINVAL.to_kernel();
        };
        s.data = Some(Arc::new(AtomicI32::new(0)));
        self.say(cx, h, "allocating space to store console_loglevel");
        0
    }

    fn post_patch(&self, cx: &mut CallbackCx<'_, World>) {
        let _h = crate::failalloc::host();
        callback_info(cx, self.module, "post_patch_callback");
        let h = "fix_console_loglevel";
        if cx.state(CONSOLE_LOGLEVEL_STATE).is_none() {
            return;
        }
        if self.version >= 2
            && let Some(prev) = cx.prev_state(CONSOLE_LOGLEVEL_STATE).cloned()
        {
            self.say(cx, h, "taking over the console_loglevel change");
            if let Some(s) = cx.state(CONSOLE_LOGLEVEL_STATE) {
                s.data = prev.data;
            }
            return;
        }
        self.say(cx, h, "fixing console_loglevel");
        let cur = cx.host.console_loglevel;
        if let Some(l) = cx.state(CONSOLE_LOGLEVEL_STATE).and_then(|s| level_of(s)) {
            l.store(cur, Ordering::Relaxed);
        }
        cx.host.console_loglevel = CONSOLE_LOGLEVEL_MOTORMOUTH;
    }

    fn pre_unpatch(&self, cx: &mut CallbackCx<'_, World>) {
        let _h = crate::failalloc::host();
        callback_info(cx, self.module, "pre_unpatch_callback");
        let h = "restore_console_loglevel";
        if self.has_prev(cx) {
            self.say(
                cx,
                h,
                "passing the console_loglevel change back to the old livepatch",
            );
            return;
        }
        let Some(saved) = cx
            .state(CONSOLE_LOGLEVEL_STATE)
            .map(|s| level_of(s).map(|l| l.load(Ordering::Relaxed)))
        else {
            return;
        };
        self.say(cx, h, "restoring console_loglevel");
        if let Some(v) = saved {
            cx.host.console_loglevel = v;
        }
    }

    fn post_unpatch(&self, cx: &mut CallbackCx<'_, World>) {
        let _h = crate::failalloc::host();
        callback_info(cx, self.module, "post_unpatch_callback");
        let h = "free_loglevel_state";
        if self.has_prev(cx) {
            self.say(cx, h, "keeping space to store console_loglevel");
            return;
        }
        let Some(s) = cx.state(CONSOLE_LOGLEVEL_STATE) else {
            return;
        };
        s.data = None;
        self.say(cx, h, "freeing space for the stored console_loglevel");
    }
}
