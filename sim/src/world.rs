//! The simulated kernel's world: tasks, CPUs, symbols, functions, modules, the ftrace
//! layer, work items, the virtual clock and the log. It implements [`klp::Host`].

use std::collections::BTreeMap;
use std::ops::ControlFlow;
use std::rc::Rc;

use klp::{
    Addr, Comm, Errno, HookError, Host, IdleTask, Level, PatchId, PatchState, Record, RedirectView,
    Target, TaskId, TraceError,
};

/// Virtual nanoseconds per second.
pub const NSEC_PER_SEC: u64 = 1_000_000_000;
/// Length of one scheduler tick of the simulation.
pub const TICK_NS: u64 = 10_000_000;

/// The body of a simulated function: runs in the world on behalf of a task and
/// produces the text it shows (a `show` function's output, a syscall's result).
pub type Body = Rc<dyn Fn(&mut World, TaskId) -> String>;

/// A function of vmlinux or of a module.
#[derive(Clone)]
#[allow(missing_debug_implementations)]
pub struct FuncDef {
    /// Symbol name.
    pub name: String,
    /// Owning object: `None` = vmlinux.
    pub obj: Option<String>,
    /// Entry address.
    pub addr: Addr,
    /// Symbol size.
    pub size: u64,
    /// Whether the function has an ftrace site (it is not `notrace`).
    pub traceable: bool,
    /// What it does when called.
    pub body: Body,
}

/// What a task does when the simulation runs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Activity {
    /// Sleeps where its stack says, until something wakes it.
    Sleep,
    /// A user program that calls `getpid` in a loop (test_klp-call_getpid).
    GetpidLoop,
    /// A kworker running `busymod_work_func` of test_klp_callbacks_busy, polling the
    /// module's `block_transition` every 20 ms.
    BusyWork {
        /// The module whose parameter it polls.
        module: String,
    },
    /// The idle task of a CPU.
    IdleLoop,
}

/// The kind of a task.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// A user process or thread.
    User,
    /// A kernel thread.
    Kthread,
    /// The idle task of a CPU.
    Idle(u32),
}

/// How a task sleeps.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Sleep {
    /// Can be woken by signals (`TASK_INTERRUPTIBLE`).
    Interruptible,
    /// Cannot (`TASK_UNINTERRUPTIBLE`).
    Uninterruptible,
}

/// A simulated task.
#[derive(Clone, Debug)]
pub struct Task {
    /// Identity.
    pub id: TaskId,
    /// Process id (idle tasks: 0).
    pub pid: i64,
    /// Command name.
    pub comm: String,
    /// Kind.
    pub kind: Kind,
    /// `patch_state`.
    pub patch_state: PatchState,
    /// `TIF_PATCH_PENDING`.
    pub pending: bool,
    /// Kernel stack: return addresses, outermost first.
    pub stack: Vec<Addr>,
    /// How it sleeps when it is not running.
    pub sleep: Sleep,
    /// Freezable sleep (the scheduler hook tries to switch it when it goes to sleep).
    pub freezable: bool,
    /// Its stack cannot be walked reliably (e.g. it was interrupted in kernel mode).
    pub unreliable: bool,
    /// What it does.
    pub activity: Activity,
    /// It has exited (a zombie): its trace is reliably empty.
    pub dead: bool,
    /// The CPU it is running on, if any.
    pub on_cpu: Option<u32>,
    /// Woken up (idle tasks: pass the idle loop; others: leave an interruptible wait).
    pub woken: bool,
}

/// Owner of an ftrace registration.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum FtraceOwner {
    /// The livepatch handler.
    Livepatch,
    /// A kprobe registered by a module.
    Kprobe(String),
}

/// One ftrace registration on one function.
#[derive(Clone, Debug)]
pub struct FtraceOps {
    /// Who registered.
    pub owner: FtraceOwner,
    /// Entry address of the function.
    pub site: Addr,
    /// `FTRACE_OPS_FL_IPMODIFY`.
    pub ipmodify: bool,
    /// `FTRACE_OPS_FL_PERMANENT`.
    pub permanent: bool,
}

/// A module parameter's value.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ParamValue {
    /// `int`
    Int(i64),
    /// `bool`
    Bool(bool),
    /// `int` array
    IntArray(Vec<i64>),
}

impl ParamValue {
    /// Formats the value as sysfs shows it.
    pub fn show(&self) -> String {
        match self {
            ParamValue::Int(v) => format!("{v}"),
            ParamValue::Bool(b) => (if *b { "Y" } else { "N" }).to_string(),
            ParamValue::IntArray(v) => v
                .iter()
                .map(|x| x.to_string())
                .collect::<Vec<_>>()
                .join(","),
        }
    }
}

/// Module state (`enum module_state`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ModState {
    /// Normal state.
    Live,
    /// Running module_init.
    Coming,
    /// Going away.
    Going,
}

impl ModState {
    /// The text the callback fixtures print.
    pub fn describe(self) -> &'static str {
        match self {
            ModState::Live => "[MODULE_STATE_LIVE] Normal state",
            ModState::Coming => "[MODULE_STATE_COMING] Full formed, running module_init",
            ModState::Going => "[MODULE_STATE_GOING] Going away",
        }
    }
}

/// A loaded module.
#[derive(Clone, Debug)]
pub struct LoadedModule {
    /// Name.
    pub name: String,
    /// State.
    pub state: ModState,
    /// Reference count.
    pub refcnt: i64,
    /// Parameters with their permissions.
    pub params: BTreeMap<String, (ParamValue, u32)>,
    /// `livepatch=Y`.
    pub livepatch: bool,
    /// The patch it registered, if it is a livepatch module.
    pub patch: Option<PatchId>,
}

/// Deferred work.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Work {
    /// `klp_transition_work`.
    Retry,
    /// A patch's `free_work`.
    Free(PatchId),
}

/// The function tracer.
#[derive(Clone, Debug, Default)]
pub struct Tracer {
    /// `current_tracer` is `function`.
    pub function: bool,
    /// `set_ftrace_filter`.
    pub filter: Vec<String>,
    /// `tracing_on`.
    pub on: bool,
    /// The trace buffer (one function name per entry).
    pub trace: Vec<String>,
}

/// The simulated world (everything but the livepatch core).
pub struct World {
    /// Virtual time.
    pub now_ns: u64,
    /// The kernel log: (time, text).
    pub dmesg: Vec<(u64, String)>,
    /// All tasks, idle tasks included.
    pub tasks: Vec<Task>,
    /// Number of possible CPUs.
    pub ncpus: u32,
    /// Online mask.
    pub online: Vec<bool>,
    /// The current task.
    pub current: TaskId,
    /// Every function, by entry address.
    pub funcs: BTreeMap<Addr, FuncDef>,
    /// Loaded modules.
    pub modules: BTreeMap<String, LoadedModule>,
    /// ftrace registrations.
    pub ftrace: Vec<FtraceOps>,
    /// `kernel.ftrace_enabled`.
    pub ftrace_enabled: bool,
    /// Published redirect views by site.
    pub views: BTreeMap<Addr, RedirectView>,
    /// Pending works: (due time, work).
    pub works: Vec<(u64, Work)>,
    /// Whether the reliable stack walker exists.
    pub reliable: bool,
    /// Dynamic debug: livepatch debug lines on, and functions switched off.
    pub dyndbg_livepatch: bool,
    /// Functions whose debug lines are off.
    pub dyndbg_off: Vec<String>,
    /// Kprobes globally enabled.
    pub kprobes_enabled: bool,
    /// Kprobes registered by modules: (module, function, has post handler).
    pub kprobes: Vec<(String, String, bool)>,
    /// The function tracer.
    pub tracer: Tracer,
    /// `console_loglevel` (the state fixtures change it).
    pub console_loglevel: i32,
    /// The taint message was printed.
    pub tainted: bool,
    /// Internal-consistency warnings (`WARN`) seen.
    pub warnings: Vec<String>,
    /// Extra files created by modules: path → (module, show function).
    pub files: BTreeMap<String, (String, Body)>,
    /// Next pid.
    pub next_pid: i64,
    next_task: u64,
    next_text: Addr,
    /// Next round-robin start for the busy tasks.
    rr: usize,
    /// Calls a task made to each function, for invariant checks: (task, fn, impl addr).
    pub call_log: Vec<(TaskId, Addr, Addr)>,
    /// How many tasks the core has signalled or woken (`klp_send_signals`), for tests.
    pub signals_sent: u64,
    /// Whether to keep `call_log`.
    pub record_calls: bool,
    /// Shadow-variable store of the simulated kernel.
    pub shadow: klp::shadow::ShadowStore,
    /// The loaded sections of modules loaded from ELF files, by module.
    pub elf_images: BTreeMap<String, crate::elfmod::ElfImage>,
    /// The architecture whose stack format and reliable unwinder the stack checks use;
    /// `None`: the trace is read directly from the simulated frames.
    pub stack_model: Option<crate::stackmodel::ArchModel>,
    /// kthreadd, the parent of every kernel thread.
    pub kthreadd: Option<TaskId>,
    /// Module-private variables: (module, name) → value.
    pub vars: BTreeMap<(String, String), i64>,
}

impl std::fmt::Debug for World {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("World")
            .field("now_ns", &self.now_ns)
            .field("tasks", &self.tasks.len())
            .finish_non_exhaustive()
    }
}

/// Base of vmlinux text.
pub const VMLINUX_BASE: Addr = 0xffff_ffff_8100_0000;
/// Base of module text.
pub const MODULES_BASE: Addr = 0xffff_ffff_c000_0000;

impl World {
    /// A world with `ncpus` CPUs, nothing else.
    pub fn empty(ncpus: u32) -> World {
        World {
            now_ns: 0,
            dmesg: Vec::new(),
            tasks: Vec::new(),
            ncpus,
            online: vec![true; ncpus as usize],
            current: TaskId(0),
            funcs: BTreeMap::new(),
            modules: BTreeMap::new(),
            ftrace: Vec::new(),
            ftrace_enabled: true,
            views: BTreeMap::new(),
            works: Vec::new(),
            reliable: true,
            dyndbg_livepatch: true,
            dyndbg_off: vec!["klp_try_switch_task".to_string()],
            kprobes_enabled: true,
            kprobes: Vec::new(),
            tracer: Tracer::default(),
            console_loglevel: 7,
            tainted: false,
            warnings: Vec::new(),
            files: BTreeMap::new(),
            next_pid: 1,
            next_task: 1,
            next_text: MODULES_BASE,
            elf_images: BTreeMap::new(),
            rr: 0,
            call_log: Vec::new(),
            signals_sent: 0,
            record_calls: false,
            shadow: klp::shadow::ShadowStore::new(),
            vars: BTreeMap::new(),
            kthreadd: None,
            stack_model: None,
        }
    }

    /// A module-private variable (0 if unset).
    pub fn var(&self, module: &str, name: &str) -> i64 {
        self.vars
            .get(&(module.to_string(), name.to_string()))
            .copied()
            .unwrap_or(0)
    }

    /// Sets a module-private variable.
    pub fn set_var(&mut self, module: &str, name: &str, v: i64) {
        self.vars.insert((module.to_string(), name.to_string()), v);
    }

    // ----------------------------------------------------------------- log

    /// Appends one record to the kernel log.
    pub fn printk(&mut self, text: &str) {
        self.dmesg.push((self.now_ns, text.to_string()));
    }

    /// `pr_info` of a module (`<module>: text`).
    pub fn pr_mod(&mut self, module: &str, text: &str) {
        self.printk(&format!("{module}: {text}"));
    }

    // ----------------------------------------------------------------- functions

    /// Reserves `size` bytes of module memory aligned to `align` (a power of two).
    pub fn reserve_text(&mut self, size: u64, align: u64) -> Addr {
        let a = self.next_text.next_multiple_of(align.max(1));
        self.next_text = (a + size).next_multiple_of(0x10);
        a
    }

    /// Defines a function of `obj` at a given address (a loaded ELF module's symbol).
    pub fn define_at(
        &mut self,
        obj: Option<&str>,
        name: &str,
        addr: Addr,
        size: u64,
        traceable: bool,
        body: Body,
    ) {
        self.funcs.insert(
            addr,
            FuncDef {
                name: name.to_string(),
                obj: obj.map(str::to_string),
                addr,
                size,
                traceable,
                body,
            },
        );
    }

    /// Defines a function in `obj` (or vmlinux) and returns its address.
    pub fn define(
        &mut self,
        obj: Option<&str>,
        name: &str,
        size: u64,
        traceable: bool,
        body: Body,
    ) -> Addr {
        let addr = match obj {
            None => self
                .funcs
                .range(VMLINUX_BASE..MODULES_BASE)
                .next_back()
                .map_or(VMLINUX_BASE, |(a, f)| {
                    a + f.size.max(0x10).next_multiple_of(0x10)
                }),
            Some(_) => {
                let a = self.next_text;
                self.next_text += size.max(0x10).next_multiple_of(0x10);
                a
            }
        };
        self.define_at(obj, name, addr, size, traceable, body);
        addr
    }

    /// Address of function `name` in `obj`, the first one in symbol order.
    pub fn addr_of(&self, obj: Option<&str>, name: &str) -> Option<Addr> {
        self.funcs
            .values()
            .find(|f| f.name == name && f.obj.as_deref() == obj)
            .map(|f| f.addr)
    }

    /// Address of a function by name in any object (vmlinux first).
    pub fn lookup_any(&self, name: &str) -> Option<Addr> {
        self.addr_of(None, name)
            .or_else(|| self.funcs.values().find(|f| f.name == name).map(|f| f.addr))
    }

    /// The function containing `addr`.
    pub fn func_at(&self, addr: Addr) -> Option<&FuncDef> {
        let (_, f) = self.funcs.range(..=addr).next_back()?;
        (addr < f.addr + f.size).then_some(f)
    }

    /// A return address inside function `name` (as a frame on a stack).
    pub fn ret_in(&self, name: &str) -> Addr {
        self.lookup_any(name).map_or(0, |a| a + 0x1c)
    }

    /// Calls the function at `addr` on behalf of task `t`, through the entry hook: the
    /// function tracer records it and the livepatch handler may redirect it.
    pub fn call(&mut self, t: TaskId, addr: Addr) -> String {
        let mut target = addr;
        let lp = self.ftrace_enabled
            && self
                .ftrace
                .iter()
                .any(|o| o.site == addr && o.owner == FtraceOwner::Livepatch);
        if let (true, Some(view)) = (lp, self.views.get(&addr).copied()) {
            let st = self.task(t).map_or(PatchState::Idle, |x| x.patch_state);
            let (choice, anomaly) = klp::decide(&view, st);
            if anomaly != klp::Anomaly::None {
                self.warn("klp_ftrace_handler: task patch state is idle during a transition");
            }
            if let Target::Func(a) = choice {
                target = a;
            }
        }
        if self.record_calls {
            self.call_log.push((t, addr, target));
        }
        // The function tracer sees the entry site of the called function, and, when the
        // call was redirected, the replacement's own entry site as well.
        self.trace_entry(addr);
        if target != addr {
            self.trace_entry(target);
        }
        let Some(f) = self.funcs.get(&target).cloned() else {
            return String::new();
        };
        let ret = target + 0x1c;
        if let Some(task) = self.task_mut(t) {
            task.stack.push(ret);
        }
        let out = (f.body)(self, t);
        if let Some(task) = self.task_mut(t) {
            task.stack.pop();
        }
        out
    }

    fn trace_entry(&mut self, addr: Addr) {
        let Some(f) = self.funcs.get(&addr) else {
            return;
        };
        if self.ftrace_enabled
            && self.tracer.on
            && self.tracer.function
            && f.traceable
            && (self.tracer.filter.is_empty() || self.tracer.filter.contains(&f.name))
        {
            let n = f.name.clone();
            self.tracer.trace.push(n);
        }
    }

    /// Calls function `name` (vmlinux first) on behalf of `t`.
    pub fn call_name(&mut self, t: TaskId, name: &str) -> String {
        match self.lookup_any(name) {
            Some(a) => self.call(t, a),
            None => String::new(),
        }
    }

    // ----------------------------------------------------------------- tasks

    /// The task with id `t`.
    pub fn task(&self, t: TaskId) -> Option<&Task> {
        self.tasks.iter().find(|x| x.id == t)
    }

    /// The task with id `t`, mutably.
    pub fn task_mut(&mut self, t: TaskId) -> Option<&mut Task> {
        self.tasks.iter_mut().find(|x| x.id == t)
    }

    /// The task with pid `pid` (not idle tasks).
    pub fn task_by_pid(&self, pid: i64) -> Option<&Task> {
        self.tasks
            .iter()
            .find(|x| x.pid == pid && !matches!(x.kind, Kind::Idle(_)) && !x.dead)
    }

    /// Creates a task. `parent` (if any) passes on its livepatch state (fork).
    pub fn spawn(
        &mut self,
        parent: Option<TaskId>,
        comm: &str,
        kind: Kind,
        stack: Vec<Addr>,
        activity: Activity,
    ) -> TaskId {
        let id = TaskId(self.next_task);
        self.next_task += 1;
        let pid = match kind {
            Kind::Idle(_) => 0,
            _ => {
                let p = self.next_pid;
                self.next_pid += 1;
                p
            }
        };
        let (ps, pend) = parent
            .and_then(|p| self.task(p))
            .map_or((PatchState::Idle, false), |p| (p.patch_state, p.pending));
        self.tasks.push(Task {
            id,
            pid,
            comm: comm.to_string(),
            kind,
            patch_state: ps,
            pending: pend,
            stack,
            sleep: Sleep::Interruptible,
            freezable: false,
            unreliable: false,
            activity,
            dead: false,
            on_cpu: None,
            woken: false,
        });
        id
    }

    /// Removes a task that exited.
    pub fn reap(&mut self, t: TaskId) {
        self.tasks.retain(|x| x.id != t);
    }

    /// Records an internal-consistency warning.
    pub fn warn(&mut self, what: &str) {
        self.warnings.push(what.to_string());
        self.printk("------------[ cut here ]------------");
        self.printk(&format!("WARNING: {what}"));
    }

    /// Schedules `w` to run after `delay_ns`.
    pub fn queue(&mut self, delay_ns: u64, w: Work) {
        self.works.push((self.now_ns + delay_ns, w));
    }

    /// `round_jiffies_relative(HZ)` for the retry: about one second, on a whole second.
    pub fn retry_delay(&self) -> u64 {
        let j = self.now_ns + NSEC_PER_SEC;
        let rem = j % NSEC_PER_SEC;
        let rounded = if rem < NSEC_PER_SEC / 4 {
            j - rem
        } else {
            j - rem + NSEC_PER_SEC
        };
        if rounded <= self.now_ns {
            NSEC_PER_SEC
        } else {
            rounded - self.now_ns
        }
    }

    /// Which tasks would be on a CPU in the tick starting now: busy user tasks, round
    /// robin over the online CPUs. Returns (task, cpu).
    pub fn assign_cpus(&mut self) {
        for t in &mut self.tasks {
            t.on_cpu = None;
        }
        let busy: Vec<usize> = self
            .tasks
            .iter()
            .enumerate()
            .filter(|(_, t)| t.activity == Activity::GetpidLoop && !t.dead)
            .map(|(i, _)| i)
            .collect();
        let cpus: Vec<u32> = (0..self.ncpus)
            .filter(|c| self.online.get(*c as usize).copied().unwrap_or(false))
            .collect();
        if busy.is_empty() || cpus.is_empty() {
            return;
        }
        let n = busy.len();
        for (k, cpu) in cpus.iter().enumerate() {
            if k >= n {
                break;
            }
            let idx = busy[(self.rr + k) % n];
            if let Some(t) = self.tasks.get_mut(idx) {
                t.on_cpu = Some(*cpu);
            }
        }
        self.rr = (self.rr + cpus.len()) % n;
    }

    /// Parameter value of a loaded module.
    pub fn param(&self, module: &str, name: &str) -> Option<&ParamValue> {
        self.modules.get(module)?.params.get(name).map(|(v, _)| v)
    }

    /// State of a loaded module.
    pub fn mod_state(&self, module: &str) -> Option<ModState> {
        self.modules.get(module).map(|m| m.state)
    }

    /// Registers an ftrace user on `site`.
    pub fn ftrace_register(&mut self, ops: FtraceOps) -> Result<(), Errno> {
        if ops.permanent && !self.ftrace_enabled {
            return Err(Errno::EBUSY);
        }
        if ops.ipmodify && self.ftrace.iter().any(|o| o.site == ops.site && o.ipmodify) {
            return Err(Errno::EBUSY);
        }
        self.ftrace.push(ops);
        Ok(())
    }

    /// Sets `kernel.ftrace_enabled`.
    pub fn set_ftrace_enabled(&mut self, on: bool) -> Result<(), Errno> {
        if !on && self.ftrace.iter().any(|o| o.permanent) {
            return Err(Errno::EBUSY);
        }
        self.ftrace_enabled = on;
        Ok(())
    }

    /// Arms or disarms the kprobes of the world after `kprobes_enabled` changed.
    pub fn rearm_kprobes(&mut self) {
        self.ftrace
            .retain(|o| !matches!(o.owner, FtraceOwner::Kprobe(_)));
        if !self.kprobes_enabled {
            return;
        }
        let probes = self.kprobes.clone();
        for (m, f, post) in probes {
            if let Some(site) = self.addr_of(None, &f) {
                let r = self.ftrace_register(FtraceOps {
                    owner: FtraceOwner::Kprobe(m),
                    site,
                    ipmodify: post,
                    permanent: false,
                });
                if r.is_err() {
                    self.printk("Kprobes globally enabled, but failed to enable some probes");
                }
            }
        }
    }
}

impl Host for World {
    fn log(&mut self, rec: &Record<'_>) {
        let _h = crate::failalloc::host();
        if rec.level == Level::Debug
            && (!self.dyndbg_livepatch || self.dyndbg_off.iter().any(|f| f == rec.func))
        {
            return;
        }
        self.printk(&rec.to_string());
    }

    fn warn(&mut self, what: &str) {
        let _h = crate::failalloc::host();
        World::warn(self, what);
    }

    fn reliable_stacktrace(&self) -> bool {
        let _h = crate::failalloc::host();
        self.reliable
    }

    fn module_is_livepatch(&self, m: &str) -> bool {
        let _h = crate::failalloc::host();
        self.modules.get(m).is_some_and(|x| x.livepatch)
    }

    fn module_get(&mut self, m: &str) -> bool {
        let _h = crate::failalloc::host();
        match self.modules.get_mut(m) {
            Some(x) if x.state != ModState::Going => {
                x.refcnt += 1;
                true
            }
            _ => false,
        }
    }

    fn module_put(&mut self, m: &str) {
        let _h = crate::failalloc::host();
        if let Some(x) = self.modules.get_mut(m) {
            x.refcnt -= 1;
        }
    }

    fn apply_object_relocs(&mut self, patch_module: &str, obj: &str) -> Result<(), Errno> {
        let _h = crate::failalloc::host();
        crate::elfmod::object_relocs(self, patch_module, obj, false)
    }

    fn clear_object_relocs(&mut self, patch_module: &str, obj: &str) {
        let _h = crate::failalloc::host();
        let _ = crate::elfmod::object_relocs(self, patch_module, obj, true);
    }

    fn for_each_symbol(
        &self,
        obj: Option<&str>,
        name: &str,
        f: &mut dyn FnMut(Addr) -> ControlFlow<()>,
    ) {
        let _h = crate::failalloc::host();
        for func in self.funcs.values() {
            if func.name == name && func.obj.as_deref() == obj && f(func.addr).is_break() {
                return;
            }
        }
    }

    fn symbol_size(&self, addr: Addr) -> Option<u64> {
        let _h = crate::failalloc::host();
        self.func_at(addr).map(|f| f.size)
    }

    fn hook_site(&self, addr: Addr) -> Option<Addr> {
        let _h = crate::failalloc::host();
        self.func_at(addr).filter(|f| f.traceable).map(|f| f.addr)
    }

    fn hook_register(&mut self, site: Addr) -> Result<(), HookError> {
        let _h = crate::failalloc::host();
        self.ftrace_register(FtraceOps {
            owner: FtraceOwner::Livepatch,
            site,
            ipmodify: true,
            permanent: true,
        })
        .map_err(HookError::Register)
    }

    fn hook_unregister(&mut self, site: Addr) {
        let _h = crate::failalloc::host();
        self.ftrace
            .retain(|o| !(o.site == site && o.owner == FtraceOwner::Livepatch));
    }

    fn hook_publish(&mut self, site: Addr, view: Option<RedirectView>) {
        let _h = crate::failalloc::host();
        match view {
            Some(v) => {
                self.views.insert(site, v);
            }
            None => {
                self.views.remove(&site);
            }
        }
    }

    fn for_each_task(&mut self, f: &mut dyn FnMut(&mut Self, TaskId)) {
        let _h = crate::failalloc::host();
        let mut i = 0;
        while let Some(t) = self.tasks.get(i) {
            i += 1;
            if !matches!(t.kind, Kind::Idle(_)) {
                let id = t.id;
                f(self, id);
            }
        }
    }

    fn for_each_idle_task(&mut self, f: &mut dyn FnMut(&mut Self, IdleTask)) {
        let _h = crate::failalloc::host();
        let mut i = 0;
        while let Some(t) = self.tasks.get(i) {
            i += 1;
            if let Kind::Idle(cpu) = t.kind {
                let it = IdleTask {
                    task: t.id,
                    cpu,
                    online: self.online.get(cpu as usize).copied().unwrap_or(false),
                };
                f(self, it);
            }
        }
    }

    fn current(&self) -> TaskId {
        let _h = crate::failalloc::host();
        self.current
    }

    fn patch_state(&self, t: TaskId) -> PatchState {
        let _h = crate::failalloc::host();
        self.task(t).map_or(PatchState::Idle, |x| x.patch_state)
    }

    fn set_patch_state(&mut self, t: TaskId, s: PatchState) {
        let _h = crate::failalloc::host();
        if let Some(x) = self.task_mut(t) {
            x.patch_state = s;
        }
    }

    fn patch_pending(&self, t: TaskId) -> bool {
        let _h = crate::failalloc::host();
        self.task(t).is_some_and(|x| x.pending)
    }

    fn set_patch_pending(&mut self, t: TaskId, p: bool) {
        let _h = crate::failalloc::host();
        if let Some(x) = self.task_mut(t) {
            x.pending = p;
        }
    }

    fn task_ident(&self, t: TaskId) -> (Comm, i64) {
        let _h = crate::failalloc::host();
        self.task(t)
            .map_or((Comm::default(), 0), |x| (Comm::new(&x.comm), x.pid))
    }

    fn is_kthread(&self, t: TaskId) -> bool {
        let _h = crate::failalloc::host();
        self.task(t).is_some_and(|x| x.kind == Kind::Kthread)
    }

    fn task_running_elsewhere(&self, t: TaskId) -> bool {
        let _h = crate::failalloc::host();
        let Some(x) = self.task(t) else { return false };
        if x.dead {
            return false;
        }
        match x.kind {
            // An idle task runs whenever its CPU has nothing else to do.
            Kind::Idle(cpu) => !self.tasks.iter().any(|o| o.on_cpu == Some(cpu)),
            _ => x.on_cpu.is_some(),
        }
    }

    fn stack_trace_reliable(
        &mut self,
        t: TaskId,
        entries: &mut [Addr],
    ) -> Result<usize, TraceError> {
        let _h = crate::failalloc::host();
        let Some(x) = self.task(t) else {
            return Ok(0);
        };
        if x.dead {
            return Ok(0);
        }
        let trace = match self.stack_model {
            Some(model) => model.trace(&x.stack, x.unreliable, entries.len())?,
            None if x.unreliable => return Err(TraceError::Unreliable),
            None => x.stack.iter().rev().copied().collect(),
        };
        if trace.len() > entries.len() {
            return Err(TraceError::TooDeep);
        }
        entries[..trace.len()].copy_from_slice(&trace);
        Ok(trace.len())
    }

    fn fake_signal(&mut self, t: TaskId) {
        let _h = crate::failalloc::host();
        self.signals_sent += 1;
        if let Some(x) = self.task_mut(t)
            && x.sleep == Sleep::Interruptible
        {
            x.woken = true;
        }
    }

    fn wake_kthread(&mut self, t: TaskId) {
        let _h = crate::failalloc::host();
        self.signals_sent += 1;
        if let Some(x) = self.task_mut(t)
            && x.sleep == Sleep::Interruptible
        {
            x.woken = true;
        }
    }

    fn wake_cpu(&mut self, cpu: u32) {
        let _h = crate::failalloc::host();
        if let Some(x) = self.tasks.iter_mut().find(|x| x.kind == Kind::Idle(cpu)) {
            x.woken = true;
        }
    }

    fn synchronize(&mut self) {}

    fn schedule_retry(&mut self) {
        let _h = crate::failalloc::host();
        if !self.works.iter().any(|(_, w)| *w == Work::Retry) {
            let d = self.retry_delay();
            self.queue(d, Work::Retry);
        }
    }

    fn schedule_free(&mut self, patch: PatchId) {
        let _h = crate::failalloc::host();
        self.queue(0, Work::Free(patch));
    }
}
