//! The simulated kernel: the world plus the livepatch core, boot, the module loader,
//! and the scheduler that moves virtual time.

use std::collections::BTreeMap;
use std::rc::Rc;

use klp::{Errno, Klp, PatchState, TaskId};

use crate::failalloc;
use crate::modules::{self, ModuleDef, ParamKind};
use crate::world::{
    Activity, Body, Kind, LoadedModule, ModState, NSEC_PER_SEC, ParamValue, Sleep, TICK_NS, Work,
    World,
};

/// The boot command line (`/proc/cmdline`).
pub const CMDLINE: &str = "BOOT_IMAGE=/boot/vmlinuz-6.19.0-klp-sim root=/dev/vda1 ro console=ttyS0";

/// The simulated kernel.
pub struct Kernel {
    /// The livepatch core.
    pub klp: Klp<World>,
    /// Everything else.
    pub world: World,
    /// The shell that runs scenario commands.
    pub shell: TaskId,
    /// The kworker that runs the core's work items.
    pub kworker: TaskId,
    /// Module definitions available to `insmod`, by name.
    pub catalog: BTreeMap<String, ModuleDef>,
    /// ELF livepatch modules available to `insmod`, by name (see `elfmod`).
    pub elf_catalog: BTreeMap<String, Rc<[u8]>>,
    /// The machine's architecture name (for the syscall prefix).
    pub arch_prefix: &'static str,
}

impl std::fmt::Debug for Kernel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Kernel")
            .field("klp", &self.klp)
            .finish_non_exhaustive()
    }
}

/// Why a module could not be loaded or removed; `Errno` is what the syscall returned.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ModError {
    /// No such module file.
    NotFound,
    /// The syscall failed with this error.
    Errno(Errno),
    /// `rmmod`: not loaded.
    NotLoaded,
    /// `rmmod`: in use.
    InUse,
}

fn body(f: impl Fn(&mut World, TaskId) -> String + 'static) -> Body {
    Rc::new(f)
}

impl Kernel {
    /// Boots a kernel with `ncpus` CPUs and the selftest modules available.
    pub fn boot(ncpus: u32) -> Kernel {
        Kernel::boot_with(ncpus, None)
    }

    /// Boots a kernel whose stacks are laid out and walked as on `model` (its syscall
    /// names follow that architecture too); `None`: the native architecture's names and
    /// directly read traces.
    pub fn boot_with(ncpus: u32, model: Option<crate::stackmodel::ArchModel>) -> Kernel {
        let mut w = World::empty(ncpus);
        w.stack_model = model;
        let prefix = model.map_or_else(syscall_prefix, |m| m.syscall_prefix());
        // vmlinux text: the functions that show up on stacks and that patches target.
        let nop = || body(|_, _| String::new());
        for name in [
            "ret_from_fork",
            "kthread",
            "worker_thread",
            "process_one_work",
            "schedule",
            "__schedule",
            "schedule_timeout",
            "msleep",
            "do_idle",
            "cpu_startup_entry",
            "entry_SYSCALL_64",
            "do_syscall_64",
            "__do_sys_wait4",
            "do_wait",
            "ksys_read",
            "vfs_read",
            "seq_read_iter",
            "proc_reg_read_iter",
            "__do_sys_init_module",
            "do_init_module",
            "do_one_initcall",
            "__do_sys_delete_module",
            "ksys_write",
            "vfs_write",
            "kernfs_fop_write_iter",
            "kprobe_ftrace_ops",
            "klp_transition_work_fn",
            "klp_free_patch_work_fn",
        ] {
            w.define(None, name, 0x80, true, nop());
        }
        w.define(
            None,
            "cmdline_proc_show",
            0x40,
            true,
            body(|_, _| format!("{CMDLINE}\n")),
        );
        w.define(
            None,
            "meminfo_proc_show",
            0x300,
            true,
            body(|_, _| {
                "MemTotal:        8148524 kB\nMemFree:         7311004 kB\nMemAvailable:    7662168 kB\n"
                    .to_string()
            }),
        );
        w.define(
            None,
            &format!("{prefix}sys_getpid"),
            0x30,
            true,
            body(|w, t| w.task(t).map_or(0, |x| x.pid).to_string()),
        );

        // Tasks: idle tasks, init, kthreadd, a kworker for the core's work, a shell.
        for cpu in 0..ncpus {
            let st = vec![
                w.ret_in("cpu_startup_entry"),
                w.ret_in("do_idle"),
                w.ret_in("schedule"),
            ];
            let id = w.spawn(
                None,
                &format!("swapper/{cpu}"),
                Kind::Idle(cpu),
                st,
                Activity::IdleLoop,
            );
            if let Some(t) = w.task_mut(id) {
                t.comm = format!("swapper/{cpu}");
            }
        }
        let init_stack = vec![
            w.ret_in("entry_SYSCALL_64"),
            w.ret_in("do_syscall_64"),
            w.ret_in("__do_sys_wait4"),
            w.ret_in("do_wait"),
            w.ret_in("schedule"),
        ];
        w.spawn(None, "init", Kind::User, init_stack, Activity::Sleep);
        let kt = vec![
            w.ret_in("ret_from_fork"),
            w.ret_in("kthread"),
            w.ret_in("schedule"),
        ];
        let kthreadd = w.spawn(None, "kthreadd", Kind::Kthread, kt, Activity::Sleep);
        w.kthreadd = Some(kthreadd);
        let kw_stack = vec![
            w.ret_in("ret_from_fork"),
            w.ret_in("kthread"),
            w.ret_in("worker_thread"),
            w.ret_in("schedule"),
        ];
        let kworker = w.spawn(
            Some(kthreadd),
            "kworker/0:1",
            Kind::Kthread,
            kw_stack,
            Activity::Sleep,
        );
        let sh_stack = init_stack_of(&w);
        let shell = w.spawn(None, "bash", Kind::User, sh_stack, Activity::Sleep);
        w.current = shell;
        let mut k = Kernel {
            klp: Klp::new(),
            world: w,
            shell,
            kworker,
            catalog: modules::catalog(),
            elf_catalog: BTreeMap::new(),
            arch_prefix: prefix,
        };
        // The selftests' preamble: `setup_config` enables ftrace and dynamic debug.
        k.world.ftrace_enabled = true;
        k
    }

    // ----------------------------------------------------------------- process context

    /// Runs `f` as a short-lived child process of the shell (e.g. `insmod`), which
    /// inherits the shell's livepatch state, is the current task while `f` runs and
    /// exits afterwards (passing the return-to-user safe point on the way).
    pub fn in_process<R>(&mut self, comm: &str, f: impl FnOnce(&mut Kernel, TaskId) -> R) -> R {
        let st = init_stack_of(&self.world);
        let t = self
            .world
            .spawn(Some(self.shell), comm, Kind::User, st, Activity::Sleep);
        Klp::<World>::fork_inherit(&mut self.world, self.shell, t);
        let prev = self.world.current;
        self.world.current = t;
        let r = f(self, t);
        self.world.current = prev;
        // The child returns to user space, exits and is reaped; the shell, woken from
        // wait(), passes the return-to-user safe point too.
        let klp = &self.klp;
        klp.update_patch_state(&mut self.world, t);
        klp.update_patch_state(&mut self.world, self.shell);
        self.world.reap(t);
        r
    }

    /// Runs a work item in the kworker's context.
    fn run_work(&mut self, w: Work) {
        let prev = self.world.current;
        self.world.current = self.kworker;
        let wf = match w {
            Work::Retry => "klp_transition_work_fn",
            Work::Free(_) => "klp_free_patch_work_fn",
        };
        let ret = self.world.ret_in(wf);
        let pow = self.world.ret_in("process_one_work");
        if let Some(t) = self.world.task_mut(self.kworker) {
            let n = t.stack.len();
            t.stack.insert(n.saturating_sub(1), pow);
            let n = t.stack.len();
            t.stack.insert(n.saturating_sub(1), ret);
        }
        match w {
            Work::Retry => failalloc::core(|| self.klp.retry_work(&mut self.world)),
            Work::Free(id) => failalloc::core(|| self.klp.free_work(&mut self.world, id)),
        }
        if let Some(t) = self.world.task_mut(self.kworker) {
            t.stack.retain(|a| *a != ret && *a != pow);
        }
        self.world.current = prev;
    }

    /// Runs every work item that is due now.
    pub fn run_due_works(&mut self) {
        loop {
            let now = self.world.now_ns;
            let Some(i) = self
                .world
                .works
                .iter()
                .enumerate()
                .filter(|(_, (due, _))| *due <= now)
                .min_by_key(|(_, (due, _))| *due)
                .map(|(i, _)| i)
            else {
                break;
            };
            let (_, w) = self.world.works.remove(i);
            self.run_work(w);
        }
    }

    /// One scheduler tick: tasks run, sleepers that were woken react, safe points are
    /// passed, due work items run; then the clock moves by one tick.
    pub fn tick(&mut self) {
        self.run_due_works();
        self.world.assign_cpus();
        let ids: Vec<TaskId> = self.world.tasks.iter().map(|t| t.id).collect();
        for id in ids {
            let Some(t) = self.world.task(id).cloned() else {
                continue;
            };
            if t.dead {
                continue;
            }
            match &t.activity {
                Activity::GetpidLoop => {
                    if t.on_cpu.is_some() {
                        // Return to user space (a safe point), then the next syscall.
                        failalloc::core(|| self.klp.update_patch_state(&mut self.world, id));
                        let prev = self.world.current;
                        self.world.current = id;
                        let name = format!("{}sys_getpid", self.arch_prefix);
                        self.world.call_name(id, &name);
                        self.world.current = prev;
                    }
                }
                Activity::IdleLoop => {
                    if t.woken {
                        if let Some(x) = self.world.task_mut(id) {
                            x.woken = false;
                        }
                        failalloc::core(|| self.klp.update_patch_state(&mut self.world, id));
                    }
                }
                Activity::BusyWork { module } => {
                    let block = matches!(
                        self.world.param(module, "block_transition"),
                        Some(ParamValue::Bool(true))
                    );
                    if !block {
                        modules::busy_work_leave(self, id, module.clone());
                    }
                }
                Activity::Sleep => {
                    if t.woken {
                        if let Some(x) = self.world.task_mut(id) {
                            x.woken = false;
                        }
                        // A woken user task leaves its wait through the return-to-user
                        // path (a fake signal) and goes back to sleep.
                        if t.kind == Kind::User {
                            failalloc::core(|| self.klp.update_patch_state(&mut self.world, id));
                        }
                        if t.freezable {
                            failalloc::core(|| self.klp.sched_try_switch(&mut self.world, id));
                        }
                    }
                }
            }
        }
        self.world.now_ns += TICK_NS;
        self.run_due_works();
    }

    /// Lets virtual time pass.
    pub fn advance(&mut self, ns: u64) {
        let end = self.world.now_ns + ns;
        while self.world.now_ns < end {
            self.tick();
        }
    }

    /// Lets `secs` seconds pass.
    pub fn sleep_secs(&mut self, secs: f64) {
        let ns = (secs * NSEC_PER_SEC as f64).round() as u64;
        self.advance(ns);
    }

    // ----------------------------------------------------------------- modules

    /// Whether a module file exists.
    pub fn module_exists(&self, name: &str) -> bool {
        self.catalog.contains_key(name) || self.elf_catalog.contains_key(name)
    }

    /// `insmod`: loads module `name` with `params` (`key=value`).
    pub fn insmod(&mut self, name: &str, params: &[String]) -> Result<(), ModError> {
        if self.world.modules.contains_key(name) {
            return Err(ModError::Errno(Errno::EEXIST));
        }
        if let Some(file) = self.elf_catalog.get(name).cloned() {
            return self.insmod_elf(name, file, params);
        }
        let Some(def) = self.catalog.get(name).cloned() else {
            return Err(ModError::NotFound);
        };
        let mut values = BTreeMap::new();
        for p in &def.params {
            values.insert(p.name.to_string(), (p.default.clone(), p.perm));
        }
        if def.livepatch && !self.world.tainted {
            self.world.tainted = true;
            self.world
                .printk(&format!("{name}: tainting kernel with TAINT_LIVEPATCH"));
        }
        self.world.modules.insert(
            name.to_string(),
            LoadedModule {
                name: name.to_string(),
                state: ModState::Coming,
                refcnt: 0,
                params: values,
                livepatch: def.livepatch,
                patch: None,
            },
        );
        (def.define_funcs)(&mut self.world, name);
        if let Err(e) = failalloc::core(|| self.klp.module_coming(&mut self.world, name)) {
            self.unlink_module(name);
            return Err(ModError::Errno(e));
        }
        // As `load_module`: the parameters are parsed after the livepatch arrival (so
        // their warnings follow its lines), and a rejected one takes the module back
        // out through the going path.
        for kv in params {
            let (k, v) = kv.split_once('=').unwrap_or((kv.as_str(), ""));
            let Some(pd) = def.params.iter().find(|p| p.name == k) else {
                self.world
                    .printk(&format!("{name}: unknown parameter '{k}' ignored"));
                continue;
            };
            let Some(val) = parse_param(pd.kind, v) else {
                self.world
                    .printk(&format!("{name}: '{v}' invalid for parameter '{k}'"));
                if let Some(m) = self.world.modules.get_mut(name) {
                    m.state = ModState::Going;
                }
                failalloc::core(|| self.klp.module_going(&mut self.world, name));
                self.unlink_module(name);
                return Err(ModError::Errno(Errno::EINVAL));
            };
            if let Some(m) = self.world.modules.get_mut(name) {
                m.params.insert(k.to_string(), (val, pd.perm));
            }
        }
        let r = (def.init)(self);
        if let Err(e) = r {
            if let Some(m) = self.world.modules.get_mut(name) {
                m.state = ModState::Going;
            }
            failalloc::core(|| self.klp.module_going(&mut self.world, name));
            self.unlink_module(name);
            return Err(ModError::Errno(e));
        }
        if let Some(m) = self.world.modules.get_mut(name) {
            m.state = ModState::Live;
        }
        Ok(())
    }

    pub(crate) fn unlink_module(&mut self, name: &str) {
        self.world.modules.remove(name);
        self.world
            .funcs
            .retain(|_, f| f.obj.as_deref() != Some(name));
        self.world.files.retain(|_, (m, _)| m != name);
        self.world.kprobes.retain(|(m, _, _)| m != name);
        self.world
            .ftrace
            .retain(|o| !matches!(&o.owner, crate::world::FtraceOwner::Kprobe(m) if m == name));
    }

    /// `insmod` as the shell runs it: in a short-lived child process.
    pub fn insmod_cmd(&mut self, name: &str, params: &[&str]) -> Result<(), ModError> {
        let params: Vec<String> = params.iter().map(|p| p.to_string()).collect();
        self.in_process("insmod", |k, _| k.insmod(name, &params))
    }

    /// `rmmod` as the shell runs it: in a short-lived child process.
    pub fn rmmod_cmd(&mut self, name: &str) -> Result<(), ModError> {
        self.in_process("rmmod", |k, _| k.rmmod(name))
    }

    /// `rmmod`.
    pub fn rmmod(&mut self, name: &str) -> Result<(), ModError> {
        let Some(m) = self.world.modules.get(name) else {
            return Err(ModError::NotLoaded);
        };
        if m.refcnt > 0 {
            return Err(ModError::InUse);
        }
        if self.world.elf_images.contains_key(name) {
            if let Some(m) = self.world.modules.get_mut(name) {
                m.state = ModState::Going;
            }
            failalloc::core(|| self.klp.module_going(&mut self.world, name));
            self.unlink_elf(name);
            return Ok(());
        }
        let Some(def) = self.catalog.get(name).cloned() else {
            return Err(ModError::NotLoaded);
        };
        if let Some(m) = self.world.modules.get_mut(name) {
            m.state = ModState::Going;
        }
        (def.exit)(self);
        failalloc::core(|| self.klp.module_going(&mut self.world, name));
        self.unlink_module(name);
        Ok(())
    }

    /// The patch-state value of a task, as `/proc/<pid>/patch_state` shows it.
    pub fn patch_state_of(&self, pid: i64) -> Option<PatchState> {
        self.world.task_by_pid(pid).map(|t| t.patch_state)
    }

    /// Everything observable about the livepatch state of the machine, except the log
    /// and the clock: patches, redirect records, views, the sysfs tree, tasks' states,
    /// modules, ftrace registrations and pending work. Tests compare snapshots taken
    /// before and after a failed operation.
    pub fn snapshot(&self) -> String {
        use std::fmt::Write as _;
        let mut s = String::new();
        let _ = writeln!(s, "listed: {:?}", self.klp.listed());
        let _ = writeln!(
            s,
            "transition: {:?} target {:?} key {}",
            self.klp.transition_patch(),
            self.klp.target(),
            self.klp.sched_key()
        );
        for r in self.klp.records() {
            let _ = writeln!(s, "record: {r:?}");
        }
        let _ = writeln!(s, "views: {:?}", self.world.views);
        fn walk(k: &Kernel, path: &mut Vec<String>, out: &mut String) {
            let refs: Vec<&str> = path.iter().map(String::as_str).collect();
            let Ok(entries) = k.klp.sysfs_entries(&refs) else {
                return;
            };
            for e in entries {
                path.push(e);
                let refs: Vec<&str> = path.iter().map(String::as_str).collect();
                let node = k.klp.sysfs_node(&refs);
                let val = k.klp.sysfs_read_string(&refs).ok();
                let _ = writeln!(out, "sysfs: {} {node:?} {val:?}", path.join("/"));
                walk(k, path, out);
                path.pop();
            }
        }
        walk(self, &mut Vec::new(), &mut s);
        for t in &self.world.tasks {
            let _ = writeln!(
                s,
                "task {} {} {:?} pending {}",
                t.pid, t.comm, t.patch_state, t.pending
            );
        }
        for (n, m) in &self.world.modules {
            let _ = writeln!(
                s,
                "module {n} {:?} refcnt {} alive {} params {:?}",
                m.state,
                m.refcnt,
                self.klp.module_alive(n),
                m.params
            );
        }
        let _ = writeln!(
            s,
            "ftrace: {:?} enabled {}",
            self.world.ftrace, self.world.ftrace_enabled
        );
        let _ = writeln!(s, "works: {:?}", self.world.works);
        let _ = writeln!(s, "funcs: {}", self.world.funcs.len());
        for (n, img) in &self.world.elf_images {
            let _ = writeln!(s, "elf image {n}: {:016x}", img.digest());
        }
        s
    }

    /// Checks the core's invariants against the world (for tests).
    pub fn check_invariants(&self) -> Result<(), String> {
        let idle = self.klp.transition_patch().is_none();
        for t in &self.world.tasks {
            if idle {
                if t.patch_state != PatchState::Idle || t.pending {
                    return Err(format!("task {} not idle while no transition runs", t.pid));
                }
            } else {
                if t.patch_state == PatchState::Idle {
                    return Err(format!("task {} idle during a transition", t.pid));
                }
                if t.pending && t.patch_state == self.klp.target() {
                    return Err(format!("task {} pending but already at target", t.pid));
                }
            }
        }
        if idle {
            // Every record's stack matches the listed patches, in list order, and only
            // patched functions of listed patches are on it; no nops survive.
            let listed = self.klp.listed();
            for r in self.klp.records() {
                let (old, site) = (r.old_func, r.site);
                let stack: Vec<_> = r.stack().collect();
                if stack.is_empty() {
                    return Err(format!("empty redirect record at {old:#x}"));
                }
                let order: Vec<usize> = stack
                    .iter()
                    .map(|(p, _)| listed.iter().position(|x| x == p).unwrap_or(usize::MAX))
                    .collect();
                if order.contains(&usize::MAX) {
                    return Err(format!("record {old:#x} holds an unlisted patch"));
                }
                if order.windows(2).any(|w| w[0] >= w[1]) {
                    return Err(format!("record {old:#x} out of list order"));
                }
                if stack.iter().any(|(_, t)| *t == klp::Target::Original) {
                    return Err(format!("nop left on record {old:#x}"));
                }
                if self.world.views.get(&site).is_none_or(|v| v.top_transition) {
                    return Err(format!("bad published view at {site:#x}"));
                }
            }
            let on_records: usize = self.klp.records().map(|r| r.depth()).sum();
            let mut patched = 0;
            for p in listed {
                if !self.klp.is_enabled(*p) {
                    return Err("a listed patch is not enabled while idle".into());
                }
                let name = self.klp.name_of(*p).unwrap_or("").to_string();
                // Every object whose target is present is patched; the others are not.
                for o in self.klp.sysfs_entries(&[&name]).unwrap_or_default() {
                    if matches!(
                        self.klp.sysfs_node(&[&name, &o]),
                        Some(klp::sysfs::Node::Dir)
                    ) {
                        let loaded = o == "vmlinux" || self.klp.module_alive(&o);
                        let want = if loaded { "1\n" } else { "0\n" };
                        if self
                            .klp
                            .sysfs_read_string(&[&name, &o, "patched"])
                            .as_deref()
                            != Ok(want)
                        {
                            return Err(format!("{name}/{o}/patched out of step"));
                        }
                    }
                }
                for f in self.klp.patched_funcs(*p) {
                    let (fname, old) = (f.old_name, f.old_func);
                    patched += 1;
                    let ok = self
                        .klp
                        .records()
                        .any(|r| r.old_func == old && r.stack().any(|(q, _)| q == *p));
                    if !ok {
                        return Err(format!("{name}: {fname} is not on its record"));
                    }
                }
            }
            if patched != on_records {
                return Err(format!(
                    "{on_records} record entries for {patched} patched functions"
                ));
            }
        }
        if self.klp.sched_key() != self.klp.transition_patch().is_some() {
            return Err("scheduler key out of step with the transition".into());
        }
        Ok(())
    }
}

/// The kernel's syscall symbol prefix on the architecture the simulator runs on
/// (`__x64_sys_getpid` on x86_64, …), so that test_klp_syscall patches the same name.
pub fn syscall_prefix() -> &'static str {
    <klp::arch::Native as klp_arch::Arch>::SYSCALL_PREFIX
}

/// The kernel stack of a user task blocked in `wait4` (the shell, init).
fn init_stack_of(w: &World) -> Vec<klp::Addr> {
    vec![
        w.ret_in("entry_SYSCALL_64"),
        w.ret_in("do_syscall_64"),
        w.ret_in("__do_sys_wait4"),
        w.ret_in("do_wait"),
        w.ret_in("schedule"),
    ]
}

/// Parses a module parameter value.
pub fn parse_param(kind: ParamKind, v: &str) -> Option<ParamValue> {
    match kind {
        ParamKind::Int => parse_int(v).map(ParamValue::Int),
        ParamKind::Bool => match v {
            "" => Some(ParamValue::Bool(true)),
            _ => klp::sysfs::parse_bool(v).ok().map(ParamValue::Bool),
        },
        ParamKind::IntArray => {
            let mut out = Vec::new();
            for part in v.split(',') {
                out.push(parse_int(part)?);
            }
            Some(ParamValue::IntArray(out))
        }
    }
}

fn parse_int(v: &str) -> Option<i64> {
    let v = v.trim_end_matches('\n');
    let (neg, body) = match v.strip_prefix('-') {
        Some(b) => (true, b),
        None => (false, v.strip_prefix('+').unwrap_or(v)),
    };
    let n = if let Some(h) = body.strip_prefix("0x").or_else(|| body.strip_prefix("0X")) {
        i64::from_str_radix(h, 16).ok()?
    } else if body.len() > 1 && body.starts_with('0') {
        i64::from_str_radix(&body[1..], 8).ok()?
    } else {
        body.parse::<i64>().ok()?
    };
    Some(if neg { -n } else { n })
}

impl Kernel {
    /// Marks a task as sleeping in `sleep` mode (for tests and fixtures).
    pub fn set_sleep(&mut self, t: TaskId, s: Sleep) {
        if let Some(x) = self.world.task_mut(t) {
            x.sleep = s;
        }
    }

    /// Makes one completion attempt now if a transition runs (for tests).
    pub fn attempt(&mut self) {
        if self.klp.transition_patch().is_some() {
            failalloc::core(|| self.klp.try_complete_transition(&mut self.world));
        }
    }
}
