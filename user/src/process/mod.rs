//! The process as the core's world: [`ProcessHost`] implements [`klp::Host`], and
//! [`Process`] owns the core and serialises every operation on it.
//!
//! There is one [`Process`] per process ([`Process::global`]), as there is one
//! livepatch core per kernel: the threads' patch states are process-wide.
//!
//! What maps to what:
//!
//! | kernel | here |
//! |---|---|
//! | tasks | registered threads ([`crate::thread`]); no idle tasks |
//! | vmlinux / modules | the executable / loaded shared objects ([`crate::symbols`]) |
//! | kallsyms | the symbol index |
//! | `stack_trace_save_tsk_reliable` | a stop by signal and the arch unwinder ([`crate::stack`]) |
//! | a task running on another CPU | a thread that blocks klp's signal (read from `/proc`; qemu-user keeps guest masks to itself, so there such a thread shows as not answering the stack check instead) |
//! | fake signal | klp's signal plus a wake-up of [`crate::thread::idle_wait`] |
//! | `klp_synchronize_transition` | a signal round every thread acknowledges |
//! | `klp_transition_work`, `free_work` | klp's worker thread (every ~1 s / at once) |
//! | livepatch module refs | patches registered through [`Process::enable_patch`] |
//! | module coming / going | [`Process::dlopen`], [`Library::close`], [`Process::refresh_modules`] |
//! | ftrace (the entry hook) | the site of a [`crate::patchable!`] function (or of a C function built with patchable entries) rewritten to branch to the architecture's entry trampoline, whose decision reads the published views, or — in the steady state — straight to the one live implementation ([`crate::redirect`]) |
//! | dmesg | a ring buffer ([`Process::log`]), optionally copied to stderr |
//!
//! Dynamic debug starts as in the kernel: `pr_debug` lines are dropped unless
//! [`Config::dyndbg`] is set.
//!
//! ## The parts
//!
//! * this module: [`ProcessHost`]'s state, [`Process`] (the core and its lock, the
//!   worker, the core operations);
//! * `host`: the [`klp::Host`] adapter — the core's questions answered from the
//!   threads, the stack checks, the symbol index and the patch modules;
//! * `sites`: the site state machine (original, trampoline, direct jump) and the
//!   callers retargeted with it;
//! * `library`: shared objects opened and closed as modules;
//! * `report`: what the process shows of itself (patches, threads, the transition's
//!   blockers, the log).

mod host;
mod library;
mod report;
mod sites;

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::time::{Duration, Instant};

use klp::{Addr, Errno, Klp, PatchDesc, PatchId, RedirectView, TaskId};

use crate::redirect::{self, SiteState};
use crate::stack::{self, CheckOptions, TraceFailure};
use crate::symbols::{Changes, SymbolIndex};
use crate::thread::{self, ForkGate, ThreadRecord};

pub use library::Library;
pub use report::{BlockReason, Blocker, PatchInfo, ThreadInfo, TransitionStatus};
pub use sites::SiteKind;

/// Settings of the process host.
#[derive(Clone, Debug)]
pub struct Config {
    /// Copy every log line to stderr.
    pub log_stderr: bool,
    /// Emit the core's `pr_debug` lines (the kernel's default is off).
    pub dyndbg: bool,
    /// Functions whose debug lines stay off even with `dyndbg` (the selftests switch off
    /// `klp_try_switch_task`).
    pub dyndbg_off: Vec<&'static str>,
    /// Lines kept in the log ring.
    pub log_capacity: usize,
    /// How stack checks are done (handshake timeouts, walk policy).
    pub checks: CheckOptions,
    /// Delay of the retry work (the kernel's `round_jiffies_relative(HZ)`).
    pub retry_interval: Duration,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            log_stderr: false,
            dyndbg: false,
            dyndbg_off: Vec::new(),
            log_capacity: 4096,
            checks: CheckOptions::default(),
            retry_interval: Duration::from_secs(1),
        }
    }
}

/// How long `klp_synchronize_transition` (and a site's removal) waits for threads
/// still inside the redirect decision before going on with a log line. The kernel's
/// wait is unbounded; a bound keeps a thread stopped by a debugger from hanging klp, and
/// it is long enough for a thread descheduled under load: under qemu-user on a busy
/// machine a decision can be held up for longer than the 1 s this used to be, and a
/// thread may then decide with its new state on a view it read before the transition
/// completed (the redirect test saw two such decisions in a loaded CI run).
const DECIDER_WAIT: Duration = Duration::from_secs(5);
/// How long a batch stop waits for the next thread to answer before it leaves the
/// rest to be stopped one by one ([`stack::Batch::stop`]).
const BATCH_QUIET: Duration = Duration::from_millis(20);

/// The log ring.
#[derive(Debug, Default)]
pub struct LogRing {
    lines: VecDeque<String>,
    total: u64,
    cap: usize,
}

impl LogRing {
    fn push(&mut self, line: String) {
        if self.lines.len() >= self.cap.max(1) {
            self.lines.pop_front();
        }
        self.lines.push_back(line);
        self.total += 1;
    }
}

#[derive(Debug, Default)]
struct PatchModule {
    refcnt: u32,
}

/// The world of the core inside this process. See the module documentation.
#[derive(Debug)]
pub struct ProcessHost {
    config: Config,
    log: Arc<Mutex<LogRing>>,
    index: Arc<SymbolIndex>,
    modules: BTreeMap<String, PatchModule>,
    views: HashMap<Addr, RedirectView>,
    /// Registered sites, as found (their original bytes), and what they hold now.
    sites: HashMap<Addr, (klp::arch::Site, SiteState)>,
    /// Sites that could not jump straight to a replacement: the log says so once
    /// while the site is registered, not at every settle.
    out_of_reach: std::collections::HashSet<Addr>,
    /// The thread held after its stack check, until the core is done with it (see
    /// [`klp::Host::stack_trace_reliable`]).
    held: Option<stack::Hold>,
    /// The threads stopped together before a completion attempt checks them
    /// ([`klp::Host::prepare_checks`]); each leaves it when it is checked.
    batch: Option<stack::Batch>,
    /// The bodies of registered `patchable!` wrappers: `(start, end, wrapper site)`.
    bodies: Vec<(Addr, Addr, Addr)>,
    cache: HashMap<TaskId, Arc<ThreadRecord>>,
    failures: HashMap<TaskId, TraceFailure>,
    retry_due: Option<Instant>,
    free_queue: Vec<PatchId>,
    warnings: u64,
    /// The patch files loaded into the process ([`crate::loader`]), by patch name.
    patch_files: crate::loader::PatchFiles,
}

impl ProcessHost {
    /// Whether the patch module `name` is loaded (its patch not yet freed).
    pub(crate) fn patch_module_loaded(&self, name: &str) -> bool {
        self.modules.contains_key(name)
    }

    /// Takes in a loaded patch file as the patch module `name`: its module registered,
    /// its code indexed.
    pub(crate) fn add_patch_file(
        &mut self,
        name: &str,
        file: crate::loader::PatchFile,
        indexed: Arc<crate::symbols::LoadedObject>,
    ) {
        crate::symbols::add_patch_object(indexed.clone());
        self.index = Arc::new(self.index.with_current_patches());
        stack::forget_code();
        self.patch_files.insert(name.to_string(), (file, indexed));
        self.modules
            .insert(name.to_string(), PatchModule::default());
    }

    /// Forgets the patch module `name` if nothing holds it (its enable failed).
    pub(crate) fn patch_module_put_back(&mut self, name: &str) {
        if self.modules.get(name).is_some_and(|m| m.refcnt == 0) {
            self.modules.remove(name);
        }
    }

    /// Unmaps the patch file `name` (its patch is gone or never ran). Returns whether
    /// there was one.
    pub(crate) fn drop_patch_file(&mut self, name: &str) -> bool {
        let Some((file, indexed)) = self.patch_files.remove(name) else {
            return false;
        };
        crate::symbols::remove_patch_object(indexed.bias);
        self.index = Arc::new(self.index.with_current_patches());
        stack::forget_code();
        drop(file);
        true
    }

    /// The names of the patch files loaded.
    pub fn patch_files(&self) -> Vec<String> {
        self.patch_files.keys().cloned().collect()
    }

    fn rec(&self, t: TaskId) -> Option<Arc<ThreadRecord>> {
        match self.cache.get(&t) {
            Some(r) => Some(r.clone()),
            None => thread::find(t),
        }
    }

    fn line(&self, text: String) {
        if self.config.log_stderr {
            eprintln!("{text}");
        }
        lock(&self.log).push(text);
    }

    /// The symbol index in use.
    pub fn symbols(&self) -> &Arc<SymbolIndex> {
        &self.index
    }

    /// The view published for `site`, if any.
    pub fn view(&self, site: Addr) -> Option<RedirectView> {
        self.views.get(&site).copied()
    }

    /// Number of `WARN`s the core reported.
    pub fn warnings(&self) -> u64 {
        self.warnings
    }

    /// Why the last stack check of `t` failed, if it did.
    pub fn last_failure(&self, t: TaskId) -> Option<TraceFailure> {
        self.failures.get(&t).copied()
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

struct Core {
    klp: Klp<ProcessHost>,
    host: ProcessHost,
}

/// The process host and its core. See the module documentation.
pub struct Process {
    core: Mutex<Core>,
    log: Arc<Mutex<LogRing>>,
    stop: AtomicBool,
}

impl std::fmt::Debug for Process {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Process").finish_non_exhaustive()
    }
}

static GLOBAL: OnceLock<Process> = OnceLock::new();

impl Process {
    /// Creates the process's host with `config`, unless it exists already (then the
    /// existing one is returned and `config` is ignored: see [`Process::configured`]).
    pub fn init(config: Config) -> &'static Process {
        // The core's locks for `fork(2)`: the thread registry, below this module, asks
        // for them through what is registered here.
        thread::set_core_lock(fork_lock);
        let mut fresh = false;
        let p = GLOBAL.get_or_init(|| {
            fresh = true;
            Process::new(config)
        });
        if fresh {
            p.boot();
        }
        p
    }

    /// The process's host (created with the default configuration on first use).
    pub fn global() -> &'static Process {
        Self::init(Config::default())
    }

    /// The configuration in force.
    pub fn configured(&self) -> Config {
        lock(&self.core).host.config.clone()
    }

    fn new(config: Config) -> Process {
        let log = Arc::new(Mutex::new(LogRing {
            cap: config.log_capacity,
            ..LogRing::default()
        }));
        Process {
            core: Mutex::new(Core {
                klp: Klp::new(),
                host: ProcessHost {
                    config,
                    log: log.clone(),
                    index: Arc::new(SymbolIndex::default()),
                    modules: BTreeMap::new(),
                    views: HashMap::new(),
                    sites: HashMap::new(),
                    out_of_reach: std::collections::HashSet::new(),
                    bodies: Vec::new(),
                    held: None,
                    batch: None,
                    cache: HashMap::new(),
                    failures: HashMap::new(),
                    retry_due: None,
                    free_queue: Vec::new(),
                    warnings: 0,
                    patch_files: Default::default(),
                },
            }),
            log,
            stop: AtomicBool::new(false),
        }
    }

    /// Indexes the loaded objects (every shared object loaded now is a live module)
    /// and starts the worker thread.
    fn boot(&'static self) {
        stack::install_handler();
        redirect::register_with_stack();
        self.refresh_modules();
        let spawned = std::thread::Builder::new()
            .name("klp-worker".into())
            .spawn(move || {
                thread::mark_kthread();
                while !self.stop.load(Ordering::Acquire) {
                    thread::idle_wait(Duration::from_millis(50));
                    self.run_due_work();
                }
            });
        if spawned.is_err() {
            self.with_core(|_, h| h.line("klp-user: cannot start the worker thread".into()));
        }
    }

    /// Runs one core operation: registers the caller, holds the fork gate and the core
    /// lock, and publishes the target for late-registering threads.
    pub fn with_core<R>(&self, f: impl FnOnce(&mut Klp<ProcessHost>, &mut ProcessHost) -> R) -> R {
        thread::register_current();
        let gate = ForkGate::exclusive();
        let mut c = lock(&self.core);
        let Core { klp, host } = &mut *c;
        host.cache = thread::threads().into_iter().map(|r| (r.id, r)).collect();
        let r = f(klp, host);
        host.held = None;
        host.batch = None;
        thread::publish_target(&gate, klp.target());
        r
    }

    /// Runs the retry work if it is due and the pending free work.
    pub fn run_due_work(&self) {
        let due = {
            let c = lock(&self.core);
            !c.host.free_queue.is_empty() || c.host.retry_due.is_some_and(|d| Instant::now() >= d)
        };
        if due {
            self.with_core(|klp, host| {
                for id in std::mem::take(&mut host.free_queue) {
                    klp.free_work(host, id);
                }
                if host.retry_due.is_some_and(|d| Instant::now() >= d) {
                    host.retry_due = None;
                    klp.retry_work(host);
                }
            });
        }
    }

    /// Runs the retry work now (one completion attempt), then the free work.
    pub fn retry_now(&self) {
        self.with_core(|klp, host| {
            host.retry_due = None;
            klp.retry_work(host);
            for id in std::mem::take(&mut host.free_queue) {
                klp.free_work(host, id);
            }
        });
    }

    /// Loads a patch: registers its module as a livepatch module and enables it
    /// (`insmod` of a livepatch module). On error nothing of it remains. Callbacks run
    /// on whichever thread performs the core operation, with the core locked: they must
    /// not call into [`Process`].
    pub fn enable_patch(&self, desc: PatchDesc<ProcessHost>) -> Result<PatchId, Errno> {
        self.with_core(|klp, host| {
            let name = desc.module.clone();
            if host.modules.contains_key(&name) {
                host.line(format!("klp-user: patch module '{name}' is already loaded"));
                return Err(Errno::EEXIST);
            }
            host.modules.insert(name.clone(), PatchModule::default());
            let r = klp.enable_patch(host, desc);
            if r.is_err() && host.modules.get(&name).is_some_and(|m| m.refcnt == 0) {
                host.modules.remove(&name);
            }
            r
        })
    }

    /// Whether the patch module `name` is still loaded (`lsmod`): from
    /// [`Process::enable_patch`] until its patch is freed after being disabled.
    pub fn loaded(&self, name: &str) -> bool {
        lock(&self.core).host.modules.contains_key(name)
    }

    /// Re-indexes the loaded objects; tells the core about modules that went away and
    /// modules that arrived. Returns what changed and the modules the core refused
    /// (a patch could not be applied to them), with the error.
    pub fn refresh_modules(&self) -> (Changes, Vec<(String, Errno)>) {
        self.with_core(|klp, host| {
            let (idx, ch) = host.index.refresh();
            host.index = Arc::new(idx);
            if !ch.added.is_empty() || !ch.removed.is_empty() {
                stack::forget_code();
            }
            for m in &ch.removed {
                klp.module_going(host, m);
            }
            let mut refused = Vec::new();
            for m in &ch.added {
                if m == "vmlinux" {
                    continue;
                }
                if let Err(e) = klp.module_coming(host, m) {
                    refused.push((m.clone(), e));
                }
            }
            (ch, refused)
        })
    }

    /// Reads a sysfs attribute under `/sys/kernel/livepatch`.
    pub fn sysfs_read(&self, path: &[&str]) -> Result<String, Errno> {
        lock(&self.core).klp.sysfs_read_string(path)
    }

    /// Writes a sysfs attribute under `/sys/kernel/livepatch`.
    pub fn sysfs_write(&self, path: &[&str], data: &str) -> Result<usize, Errno> {
        self.with_core(|klp, host| klp.sysfs_write(host, path, data))
    }

    /// `echo 1 > enabled` (only meaningful to reverse a disabling transition, as in
    /// the kernel).
    pub fn enable(&self, patch: &str) -> Result<(), Errno> {
        self.sysfs_write(&[patch, "enabled"], "1").map(drop)
    }

    /// `echo 0 > enabled`.
    pub fn disable(&self, patch: &str) -> Result<(), Errno> {
        self.sysfs_write(&[patch, "enabled"], "0").map(drop)
    }

    /// `echo 1 > force`.
    pub fn force(&self, patch: &str) -> Result<(), Errno> {
        self.sysfs_write(&[patch, "force"], "1").map(drop)
    }
}

/// The core's locks (the core, then its log) for `fork(2)`'s prepare handler
/// ([`thread::install_atfork`], registered with [`thread::set_core_lock`]), when the
/// process host exists; released when the value drops.
fn fork_lock() -> Option<Box<dyn std::any::Any>> {
    let p = GLOBAL.get()?;
    let core = lock(&p.core);
    let log = lock(&p.log);
    Some(Box::new((core, log)))
}
