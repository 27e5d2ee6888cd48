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

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::ffi::CString;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::time::{Duration, Instant};

use std::ops::ControlFlow;

use klp::{
    Addr, Blocked, Comm, Errno, HookError, Host, IdleTask, Klp, Level, PatchDesc, PatchId,
    PatchState, Record, RedirectView, Target, TaskId, TraceError,
};

use crate::redirect::{self, SiteState};
use crate::stack::{self, CheckOptions, TraceFailure};
use crate::symbols::{Changes, SymbolIndex};
use crate::thread::{self, ForkGate, ThreadRecord};

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

/// Where a return address inside a `patchable!` body is reported: just past the
/// wrapper's site, an address inside the wrapper's symbol on every architecture.
const FOLD_OFFSET: u64 = 4;
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

/// What a registered site holds (see [`ProcessHost::site_state`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SiteKind {
    /// The original bytes (being removed).
    Original,
    /// A call of the entry trampoline: each thread's state decides.
    Trampoline,
    /// A direct branch to this implementation (the steady state).
    Jump(Addr),
}

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
    /// The thread held after its stack check, until it is switched (see
    /// [`Host::stack_trace_reliable`]).
    held: Option<stack::Hold>,
    /// The threads stopped together before a completion attempt checks them
    /// ([`Host::prepare_checks`]); each leaves it when it is checked.
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

    /// Folds addresses inside the body of a registered `patchable!` function into its
    /// wrapper (the function the core knows), so that a thread running the body is seen
    /// inside the function.
    fn fold_bodies(&self, trace: &mut [Addr]) {
        if self.bodies.is_empty() {
            return;
        }
        for a in trace.iter_mut() {
            if let Some(&(_, _, site)) = self.bodies.iter().find(|b| *a >= b.0 && *a < b.1) {
                *a = site + FOLD_OFFSET;
            }
        }
    }

    /// What the registered site of the function at `func` holds now (`None`: not
    /// registered).
    pub fn site_state(&self, func: Addr) -> Option<SiteKind> {
        let (_, (_, s)) = self.sites.iter().find(|(_, (f, _))| f.func.addr == func)?;
        Some(match s {
            SiteState::Original => SiteKind::Original,
            SiteState::Trampoline => SiteKind::Trampoline,
            SiteState::Jump(t) => SiteKind::Jump(*t),
        })
    }

    /// Brings a registered site to what `view` asks: a direct jump to the one live
    /// implementation when the view is steady (no transition, a replacement on top)
    /// and the jump can be encoded, the trampoline otherwise. The view is published
    /// before the site changes, so a thread that still takes the old jump runs what
    /// its state allows: a transition only starts after this returns.
    fn settle(&mut self, site: Addr, view: Option<RedirectView>) {
        let Some(&(found, now)) = self.sites.get(&site) else {
            return;
        };
        let want = match view {
            Some(RedirectView {
                top: Target::Func(to),
                top_transition: false,
                ..
            }) => SiteState::Jump(to),
            _ => SiteState::Trampoline,
        };
        if want == now {
            return;
        }
        let answer = self.config.checks.answer;
        let mut sync = || {
            stack::sync_round(answer);
        };
        // Leaving the jump state: the callers go back to the function's entry first.
        if matches!(now, SiteState::Jump(_)) {
            self.retarget_callers(found.func.addr, None);
        }
        match redirect::sites::set(&self.index, &found, want, &mut sync) {
            Ok(()) => {
                self.sites.insert(site, (found, want));
                if let SiteState::Jump(to) = want {
                    self.retarget_callers(found.func.addr, Some(to));
                }
            }
            Err(e) if want != SiteState::Trampoline => {
                // A jump out of reach: the trampoline keeps deciding (same result).
                if let SiteState::Jump(to) = want
                    && self.out_of_reach.insert(site)
                {
                    self.line(format!(
                        "klp-user: site {site:#x} stays on the trampoline: no direct jump to {to:#x} ({})",
                        e.to_kernel()
                    ));
                }
                if now != SiteState::Trampoline
                    && redirect::sites::set(&self.index, &found, SiteState::Trampoline, &mut sync)
                        .is_ok()
                {
                    self.sites.insert(site, (found, SiteState::Trampoline));
                }
            }
            Err(e) => self.warn(&format!(
                "klp-user: cannot put site {site:#x} back on the trampoline ({})",
                e.to_kernel()
            )),
        }
    }

    /// In the jump state, the direct calls of `func` found in the relocations kept by
    /// `--emit-relocs` call `to` itself (where the host retargets call sites: x86_64,
    /// `redirect::callsites`); `None` points them back at `func` (before the site
    /// leaves the jump state, so no thread can run a stale replacement once a
    /// transition starts).
    fn retarget_callers(&mut self, func: Addr, to: Option<Addr>) {
        let answer = self.config.checks.answer;
        redirect::native::retarget_callers(&self.index, func, to, &mut || stack::sync_core(answer));
    }

    /// The direct call sites of `func` known from relocations (where the host
    /// retargets call sites; empty elsewhere).
    pub fn callers_of(&self, func: Addr) -> Vec<Addr> {
        redirect::native::callers_of(&self.index, func)
    }

    /// The call sites of `func` that call its replacement directly now (where the
    /// host retargets call sites; empty elsewhere).
    pub fn retargeted_callers(&self, func: Addr) -> Vec<Addr> {
        redirect::native::retargeted(func)
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

/// The log line of a site that could not be rewritten: what failed, the errno in
/// brackets, and the remedy where there is one. Nothing was changed.
fn site_error(index: &SymbolIndex, site: Addr, e: Errno) -> String {
    let func = index.lookup(site).map_or_else(
        || "a function".to_string(),
        |(_, s)| format!("'{}'", s.name),
    );
    let (what, remedy) = match e {
        Errno::ENOMEM => (
            "the kernel refused to make its text writable (mprotect)",
            "; free memory or raise the data size limit (ulimit -d)",
        ),
        Errno::EACCES | Errno::EPERM => (
            "the kernel refused to make its text writable (mprotect)",
            "; a W^X policy (SELinux execmod, PaX) forbids writing text",
        ),
        Errno::ERANGE => ("the branch cannot reach its target", ""),
        _ => ("the site could not be rewritten", ""),
    };
    format!(
        "klp-user: cannot patch {func} at {site:#x}: {what} [{}]{remedy}; nothing was changed",
        e.name().unwrap_or("?")
    )
}

/// Whether `sig` is blocked in thread `tid` (`SigBlk` of its status file).
fn signal_blocked(tid: i32, sig: libc::c_int) -> bool {
    let Ok(s) = std::fs::read_to_string(format!("/proc/self/task/{tid}/status")) else {
        return false;
    };
    sigblk_has(&s, sig)
}

/// Whether the `SigBlk:` mask of a `/proc/.../status` text contains `sig`.
fn sigblk_has(status: &str, sig: libc::c_int) -> bool {
    status
        .lines()
        .find_map(|l| l.strip_prefix("SigBlk:"))
        .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
        .is_some_and(|mask| sig >= 1 && mask & (1u64 << (sig - 1)) != 0)
}

impl Host for ProcessHost {
    fn log(&mut self, rec: &Record<'_>) {
        self.held = None;
        if rec.level == Level::Debug
            && (!self.config.dyndbg || self.config.dyndbg_off.contains(&rec.func))
        {
            return;
        }
        self.line(rec.to_string());
    }

    fn warn(&mut self, what: &str) {
        self.warnings += 1;
        self.line(format!("WARNING: {what}"));
    }

    fn reliable_stacktrace(&self) -> bool {
        klp::arch::SUPPORTED && <klp::arch::Native as klp::arch::Arch>::HAVE_RELIABLE_STACKTRACE
    }

    fn module_is_livepatch(&self, patch_module: &str) -> bool {
        self.modules.contains_key(patch_module)
    }

    fn module_get(&mut self, patch_module: &str) -> bool {
        match self.modules.get_mut(patch_module) {
            Some(m) => {
                m.refcnt += 1;
                true
            }
            None => false,
        }
    }

    fn module_put(&mut self, patch_module: &str) {
        if let Some(m) = self.modules.get_mut(patch_module) {
            m.refcnt = m.refcnt.saturating_sub(1);
            if m.refcnt == 0 {
                self.modules.remove(patch_module);
            }
        }
    }

    /// Writes the `.klp.rela.<obj>` sections of a patch file when `obj` is present.
    fn apply_object_relocs(&mut self, patch_module: &str, obj: &str) -> Result<(), Errno> {
        let Some((mut file, indexed)) = self.patch_files.remove(patch_module) else {
            return Ok(());
        };
        let r = crate::loader::object_arrived(self, &mut file, obj);
        self.patch_files
            .insert(patch_module.to_string(), (file, indexed));
        r.map_err(|e| {
            self.line(format!("klp-user: {patch_module}: {}", e.message));
            e.errno
        })
    }

    /// Clears them again when `obj` goes.
    fn clear_object_relocs(&mut self, patch_module: &str, obj: &str) {
        let Some((mut file, indexed)) = self.patch_files.remove(patch_module) else {
            return;
        };
        if let Err(e) = crate::loader::object_left(&mut file, obj) {
            self.line(format!("klp-user: {patch_module}: {}", e.message));
        }
        self.patch_files
            .insert(patch_module.to_string(), (file, indexed));
    }

    fn for_each_symbol(
        &self,
        obj: Option<&str>,
        name: &str,
        f: &mut dyn FnMut(Addr) -> ControlFlow<()>,
    ) {
        for a in self.index.candidates(obj, name) {
            if f(*a).is_break() {
                return;
            }
        }
    }

    fn symbol_size(&self, addr: Addr) -> Option<u64> {
        self.index.size_of(addr)
    }

    /// The patch site at the entry of a function the symbol index knows (a
    /// [`crate::patchable!`] wrapper, or a C function built with patchable entries), as
    /// the architecture's part of [`crate::redirect`] recognises it.
    fn hook_site(&self, addr: Addr) -> Option<Addr> {
        redirect::sites::find(&self.index, addr).map(|s| s.addr())
    }

    /// Rewrites the site to call the entry trampoline (the view is published already),
    /// or to jump straight to the implementation if the view is a steady one.
    fn hook_register(&mut self, site: Addr) -> Result<(), HookError> {
        let func = self.index.lookup(site).map(|(_, s)| s.addr);
        let Some(found) = func.and_then(|f| redirect::sites::find(&self.index, f)) else {
            return Err(HookError::Register(Errno::EINVAL));
        };
        if found.addr() != site {
            return Err(HookError::Register(Errno::EINVAL));
        }
        if redirect::view(site).is_none() {
            self.line(format!("klp-user: no redirect slot for site {site:#x}"));
            return Err(HookError::Register(Errno::EBUSY));
        }
        let answer = self.config.checks.answer;
        if let Err(e) =
            redirect::sites::set(&self.index, &found, SiteState::Trampoline, &mut || {
                stack::sync_round(answer);
            })
        {
            self.line(site_error(&self.index, site, e));
            return Err(HookError::Register(e));
        }
        if let Some((start, end)) = redirect::sites::body_of(&self.index, &found) {
            self.bodies.push((start, end, site));
        }
        redirect::set_site_end(found.addr() + found.len() as u64, true);
        self.sites.insert(site, (found, SiteState::Trampoline));
        if let Some(v) = self.views.get(&site).copied() {
            self.settle(site, Some(v));
        }
        Ok(())
    }

    /// Restores the site's original bytes, then waits until no thread still runs the
    /// trampoline's decision (bounded; a timeout is logged).
    fn hook_unregister(&mut self, site: Addr) {
        self.out_of_reach.remove(&site);
        let Some((found, state)) = self.sites.remove(&site) else {
            return;
        };
        redirect::set_site_end(found.addr() + found.len() as u64, false);
        self.bodies.retain(|b| b.2 != site);
        if matches!(state, SiteState::Jump(_)) {
            self.retarget_callers(found.func.addr, None);
        }
        let answer = self.config.checks.answer;
        if let Err(e) = redirect::sites::set(&self.index, &found, SiteState::Original, &mut || {
            stack::sync_round(answer);
        }) {
            self.warn(&format!(
                "klp-user: cannot restore site {site:#x} ({})",
                e.to_kernel()
            ));
        }
        if !redirect::wait_deciders(DECIDER_WAIT, &mut || stack::barrier(answer)) {
            self.line(format!(
                "klp-user: a thread is still deciding at site {site:#x} after {} s",
                DECIDER_WAIT.as_secs()
            ));
        }
    }

    /// Publishes the view for the trampoline's decision, then settles the site: a
    /// direct jump when the view is steady, the trampoline otherwise.
    fn hook_publish(&mut self, site: Addr, view: Option<RedirectView>) {
        let tag = |t: Target| match t {
            Target::Func(a) => {
                Target::Func(redirect::sites::published_target(&self.index, site, a))
            }
            Target::Original => Target::Original,
        };
        let word_view = view.map(|v| RedirectView {
            top: tag(v.top),
            below: tag(v.below),
            ..v
        });
        if !redirect::publish(site, word_view) {
            self.line(format!("klp-user: redirect table full, site {site:#x}"));
        }
        match view {
            Some(v) => {
                self.views.insert(site, v);
            }
            None => {
                self.views.remove(&site);
            }
        }
        self.settle(site, view);
    }

    fn for_each_task(&mut self, f: &mut dyn FnMut(&mut Self, TaskId)) {
        for r in thread::threads().iter().filter(|r| r.alive()) {
            f(self, r.id);
        }
    }

    /// A process has no idle tasks.
    fn for_each_idle_task(&mut self, _: &mut dyn FnMut(&mut Self, IdleTask)) {}

    fn current(&self) -> TaskId {
        thread::register_current().id
    }

    fn patch_state(&self, t: TaskId) -> PatchState {
        self.rec(t).map_or(PatchState::Idle, |r| r.patch_state())
    }

    fn set_patch_state(&mut self, t: TaskId, s: PatchState) {
        if let Some(r) = self.rec(t) {
            r.set_patch_state(s);
        }
        if self.held.as_ref().is_some_and(|h| h.record().id == t) {
            self.held = None;
        }
    }

    fn patch_pending(&self, t: TaskId) -> bool {
        self.rec(t).is_some_and(|r| r.pending())
    }

    fn set_patch_pending(&mut self, t: TaskId, pending: bool) {
        if let Some(r) = self.rec(t) {
            r.set_pending(pending);
        }
    }

    fn task_ident(&self, t: TaskId) -> (Comm, i64) {
        self.rec(t).map_or((Comm::default(), 0), |r| {
            (Comm::new(&r.comm()), i64::from(r.tid()))
        })
    }

    fn is_kthread(&self, t: TaskId) -> bool {
        self.rec(t).is_some_and(|r| r.is_kthread())
    }

    /// A thread the batch holds answered klp's signal and cannot run; any other is
    /// asked `/proc` whether it blocks the signal (then a stop cannot reach it), unless
    /// it is inside klp's own handler.
    fn task_running_elsewhere(&self, t: TaskId) -> bool {
        if self.batch.as_ref().is_some_and(|b| b.holds(t)) {
            return false;
        }
        // A thread inside klp's own handler (leaving it after the release of a check,
        // or answering a synchronisation round) shows the signal blocked while it is
        // there: it does not block it, and a stop waits for it to leave. Read before
        // and after `/proc`, since it may enter or leave meanwhile.
        self.rec(t).is_some_and(|r| {
            let in_handler = || r.in_handler.load(Ordering::Acquire) != 0;
            r.alive()
                && r.tid() != 0
                && !in_handler()
                && signal_blocked(r.tid(), stack::signal_number())
                && !in_handler()
        })
    }

    /// The thread stays stopped after a successful check until the core switches it
    /// ([`Host::set_patch_state`]) or asks anything else: the check and the switch are
    /// one step for the thread, as under the kernel's runqueue lock.
    fn stack_trace_reliable(
        &mut self,
        t: TaskId,
        entries: &mut [Addr],
    ) -> Result<usize, TraceError> {
        let max = entries.len();
        self.held = None;
        let batched = self
            .batch
            .as_mut()
            .and_then(|b| b.trace_held(t, &self.index, self.config.checks, max));
        let Some(r) = self.rec(t) else {
            return Ok(0);
        };
        let traced = batched
            .unwrap_or_else(|| stack::trace_of_held(&r, &self.index, self.config.checks, max));
        match traced {
            Ok((mut v, hold)) => {
                self.held = hold;
                self.failures.remove(&t);
                self.fold_bodies(&mut v);
                let Some(dst) = entries.get_mut(..v.len()) else {
                    return Err(TraceError::TooDeep);
                };
                dst.copy_from_slice(&v);
                Ok(v.len())
            }
            Err(TraceFailure::Gone) => Ok(0),
            Err(e) => {
                self.failures.insert(t, e);
                Err(match e {
                    TraceFailure::TooDeep => TraceError::TooDeep,
                    _ => TraceError::Unreliable,
                })
            }
        }
    }

    fn fake_signal(&mut self, t: TaskId) {
        if let Some(r) = self.rec(t) {
            thread::wake(&r);
            stack::signal(&r);
        }
    }

    fn wake_kthread(&mut self, t: TaskId) {
        self.fake_signal(t);
    }

    fn wake_cpu(&mut self, _cpu: u32) {}

    /// Waits until no thread is inside the trampoline's decision with what was
    /// published before (a `membarrier(2)` barrier, then the threads' in-decision
    /// marks; see `redirect::wait_deciders`).
    fn synchronize(&mut self) {
        let answer = self.config.checks.answer;
        if !redirect::wait_deciders(DECIDER_WAIT, &mut || stack::barrier(answer)) {
            self.line(format!(
                "klp-user: a thread is still deciding after {} s",
                DECIDER_WAIT.as_secs()
            ));
        }
    }

    /// Stops every thread about to be checked at once (see [`stack::Batch`]): one
    /// wave of signals instead of one round trip per thread.
    fn prepare_checks(&mut self, target: PatchState) {
        self.held = None;
        self.batch = None;
        let recs: Vec<_> = thread::threads()
            .iter()
            .filter(|r| r.alive() && r.patch_state() != target)
            .filter_map(|r| self.rec(r.id))
            .collect();
        if recs.len() < 2 {
            return;
        }
        self.batch = Some(stack::Batch::stop(&recs, self.config.checks, BATCH_QUIET));
    }

    fn schedule_retry(&mut self) {
        if self.retry_due.is_none() {
            self.retry_due = Some(Instant::now() + self.config.retry_interval);
        }
    }

    fn schedule_free(&mut self, patch: PatchId) {
        self.free_queue.push(patch);
    }
}

struct Core {
    klp: Klp<ProcessHost>,
    host: ProcessHost,
}

/// A loaded shared object, opened through [`Process::dlopen`].
#[derive(Debug)]
pub struct Library {
    handle: usize,
    /// Its module name.
    pub name: String,
}

impl Library {
    /// `dlclose`s the library, telling the core first that the module goes (the
    /// kernel's order: a module's patches are removed before its memory is freed). If
    /// the object stays loaded for other users, it comes back at once.
    pub fn close(self, p: &Process) -> Changes {
        // SAFETY: `handle` came from a successful `dlopen` and is closed once (`self` is
        // consumed); `libc::dlclose` is the C library's.
        unsafe { p.close_library(self.handle as *mut libc::c_void, libc::dlclose) }.1
    }
}

impl Process {
    /// Closes a library handle with `close` (the C library's `dlclose`, or the one an
    /// interposer found), in the kernel's module-removal order: if this close unloads
    /// the object, its patches are removed and its livepatch relocations cleared while
    /// its code is still mapped; then it is closed; if it is in fact still loaded (other
    /// handles hold it), it arrives again. Returns what `close` returned and the modules
    /// that went (or arrived).
    ///
    /// # Safety
    ///
    /// 1. `handle` is a handle `dlopen` returned that has not been closed.
    /// 2. `close` is `dlclose` (or behaves like it on `handle`).
    pub unsafe fn close_library(
        &self,
        handle: *mut libc::c_void,
        close: unsafe extern "C" fn(*mut libc::c_void) -> libc::c_int,
    ) -> (libc::c_int, Changes) {
        let path = library_path(handle);
        let name = path.as_deref().map(crate::symbols::module_name);
        let tracked = name
            .as_deref()
            .is_some_and(|n| lock(&self.core).host.index.has_module(n));
        if let (true, Some(n)) = (tracked, name.as_deref()) {
            self.with_core(|klp, host| klp.module_going(host, n));
        }
        // SAFETY: conditions 1 and 2.
        let r = unsafe { close(handle) };
        let mut changes = Changes::default();
        if let (true, Some(n), Some(path)) = (tracked, name.as_deref(), path.as_deref()) {
            let still = still_loaded(path);
            if !still {
                changes.removed.push(n.to_string());
            }
            self.with_core(|klp, host| {
                let (idx, _) = host.index.refresh();
                host.index = Arc::new(idx);
                stack::forget_code();
                if still && let Err(e) = klp.module_coming(host, n) {
                    host.line(format!(
                        "klp-user: {n} stays loaded but its patches could not be applied again ({})",
                        e.to_kernel()
                    ));
                }
            });
        } else {
            changes = self.refresh_modules().0;
        }
        (r, changes)
    }
}

/// The path of the object a `dlopen` handle refers to (`dlinfo`'s link map).
fn library_path(handle: *mut libc::c_void) -> Option<String> {
    let mut map: *mut libc::c_void = std::ptr::null_mut();
    // SAFETY: `handle` is an open handle (the caller's condition); RTLD_DI_LINKMAP
    // stores a `struct link_map *` into `map`.
    let r = unsafe {
        libc::dlinfo(
            handle,
            libc::RTLD_DI_LINKMAP,
            (&mut map as *mut *mut libc::c_void).cast(),
        )
    };
    if r != 0 || map.is_null() {
        return None;
    }
    // SAFETY: glibc's `struct link_map` starts with `l_addr` then `l_name`, a
    // NUL-terminated string owned by the dynamic linker while the object is loaded.
    let name = unsafe { *(map as *const *const libc::c_char).add(1) };
    if name.is_null() {
        return None;
    }
    // SAFETY: as above.
    let s = unsafe { std::ffi::CStr::from_ptr(name) }
        .to_string_lossy()
        .into_owned();
    (!s.is_empty()).then_some(s)
}

/// Whether the object at `path` is still loaded (`dlopen` with `RTLD_NOLOAD`).
fn still_loaded(path: &str) -> bool {
    let Ok(c) = CString::new(path) else {
        return false;
    };
    // SAFETY: `c` is NUL-terminated; RTLD_NOLOAD loads nothing, it only finds.
    let h = unsafe { libc::dlopen(c.as_ptr(), libc::RTLD_NOW | libc::RTLD_NOLOAD) };
    if h.is_null() {
        return false;
    }
    // SAFETY: `h` balances the reference RTLD_NOLOAD took.
    unsafe { libc::dlclose(h) };
    true
}

/// One patch as `/sys/kernel/livepatch/<name>` shows it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PatchInfo {
    /// Directory name.
    pub name: String,
    /// `enabled`.
    pub enabled: bool,
    /// `transition`.
    pub transition: bool,
    /// Whether a forced transition involved it (`force` itself is write-only).
    pub forced: bool,
    /// `replace`.
    pub replace: bool,
    /// `stack_order`.
    pub stack_order: u64,
    /// The objects: (name, `patched`, function directories).
    pub objects: Vec<(String, bool, Vec<String>)>,
}

/// One thread as the control interface shows it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ThreadInfo {
    /// Task id.
    pub task: TaskId,
    /// Kernel thread id.
    pub tid: i32,
    /// Command name.
    pub comm: String,
    /// `patch_state`.
    pub state: PatchState,
    /// Pending flag.
    pub pending: bool,
    /// klp's own service thread.
    pub kthread: bool,
}

/// What blocks one thread of the running transition.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Blocker {
    /// The thread.
    pub thread: ThreadInfo,
    /// The core's reason.
    pub reason: BlockReason,
    /// The host's detail when the stack could not be checked.
    pub detail: Option<String>,
    /// The blocking frame's address described with the symbol index.
    pub frame_symbol: Option<String>,
}

/// Why a thread cannot switch yet: the core's [`Blocked`], kept.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum BlockReason {
    /// The architecture has no reliable stack traces.
    NoReliableStacks,
    /// The thread runs (or cannot be stopped for a check).
    Running,
    /// Its stack could not be walked reliably.
    Unreliable(TraceError),
    /// Its stack holds code the transition affects.
    SleepingOn {
        /// The function whose code is on the stack.
        func: String,
        /// The return address found in that code.
        addr: Addr,
        /// Position of that frame in the trace (0 = innermost).
        frame: usize,
    },
}

impl From<Blocked<'_>> for BlockReason {
    fn from(b: Blocked<'_>) -> Self {
        match b {
            Blocked::NoReliableStacks => BlockReason::NoReliableStacks,
            Blocked::Running => BlockReason::Running,
            Blocked::Unreliable(e) => BlockReason::Unreliable(e),
            Blocked::SleepingOn { func, addr, frame } => BlockReason::SleepingOn {
                func: func.to_string(),
                addr,
                frame,
            },
        }
    }
}

/// A running transition.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TransitionStatus {
    /// The patch in transition.
    pub patch: String,
    /// The target state.
    pub target: PatchState,
    /// Threads (tasks) in total.
    pub total: usize,
    /// Threads already at the target.
    pub switched: usize,
    /// What blocks the others.
    pub blockers: Vec<Blocker>,
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

    /// `dlopen`s a shared object and announces it to the core (patches for it apply
    /// now). If the core refuses it, the library is closed again and the error
    /// returned, like a module whose load fails.
    pub fn dlopen(&self, path: &str) -> Result<Library, Errno> {
        let c = CString::new(path).map_err(|_| Errno::EINVAL)?;
        // SAFETY: `c` is a NUL-terminated path; loading runs the object's constructors,
        // which is what the caller asks for.
        let h = unsafe { libc::dlopen(c.as_ptr(), libc::RTLD_NOW | libc::RTLD_LOCAL) };
        if h.is_null() {
            lock(&self.log).push(format!("klp-user: dlopen '{path}' failed"));
            return Err(Errno::ENOENT);
        }
        let name = crate::symbols::module_name(path);
        let (_, refused) = self.refresh_modules();
        if let Some((_, e)) = refused.into_iter().find(|(m, _)| *m == name) {
            // SAFETY: `h` came from the successful `dlopen` above and is closed once.
            unsafe { libc::dlclose(h) };
            self.refresh_modules();
            return Err(e);
        }
        Ok(Library {
            handle: h as usize,
            name,
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

    /// The patches, as the sysfs tree shows them.
    pub fn list(&self) -> Vec<PatchInfo> {
        let c = lock(&self.core);
        let klp = &c.klp;
        let attr = |p: &str, a: &str| -> u64 {
            klp.sysfs_read_string(&[p, a])
                .ok()
                .and_then(|s| s.trim().parse().ok())
                .unwrap_or(0)
        };
        let mut out = Vec::new();
        for name in klp.sysfs_entries(&[]).unwrap_or_default() {
            let Some(id) = klp.find_patch(&name) else {
                continue;
            };
            let entries = klp.sysfs_entries(&[&name]).unwrap_or_default();
            let mut objects = Vec::new();
            for o in entries.iter().skip(5) {
                let patched = klp
                    .sysfs_read_string(&[&name, o, "patched"])
                    .is_ok_and(|s| s.trim() == "1");
                let funcs = klp
                    .sysfs_entries(&[&name, o])
                    .unwrap_or_default()
                    .into_iter()
                    .filter(|f| f != "patched")
                    .collect();
                objects.push((o.clone(), patched, funcs));
            }
            out.push(PatchInfo {
                enabled: attr(&name, "enabled") == 1,
                transition: attr(&name, "transition") == 1,
                forced: klp.is_forced(id),
                replace: attr(&name, "replace") == 1,
                stack_order: attr(&name, "stack_order"),
                name,
                objects,
            });
        }
        out
    }

    /// Every registered thread with its patch state.
    pub fn threads(&self) -> Vec<ThreadInfo> {
        thread::threads()
            .iter()
            .filter(|r| r.alive())
            .map(|r| info(r))
            .collect()
    }

    /// The running transition and what blocks it (stops each unswitched thread for a
    /// stack check), or `None`.
    pub fn status(&self) -> Option<TransitionStatus> {
        self.with_core(|klp, host| {
            let id = klp.transition_patch()?;
            let patch = klp.name_of(id).unwrap_or("").to_string();
            let target = klp.target();
            let recs: Vec<_> = host.cache.values().filter(|r| r.alive()).cloned().collect();
            let total = recs.len();
            let switched = recs.iter().filter(|r| r.patch_state() == target).count();
            let mut blockers = Vec::new();
            klp.blockers(host, &mut |host, t, reason| {
                let Some(r) = host.rec(t) else { return };
                let frame_symbol = match reason {
                    Blocked::SleepingOn { addr, .. } => Some(host.index.describe(addr)),
                    _ => None,
                };
                let detail = host.failures.get(&t).map(|f| format!("{f:?}"));
                blockers.push(Blocker {
                    thread: info(&r),
                    reason: reason.into(),
                    detail,
                    frame_symbol,
                });
            });
            Some(TransitionStatus {
                patch,
                target,
                total,
                switched,
                blockers,
            })
        })
    }

    /// Waits until no transition runs (the worker retries every ~1 s), at most
    /// `timeout`. Returns whether the transition ended.
    pub fn wait_transition(&self, timeout: Duration) -> bool {
        let start = Instant::now();
        loop {
            if lock(&self.core).klp.transition_patch().is_none() {
                return true;
            }
            if start.elapsed() >= timeout {
                return false;
            }
            thread::safe_point();
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// The log ring's lines, oldest first, and the number of lines ever logged.
    pub fn log(&self) -> (Vec<String>, u64) {
        let l = lock(&self.log);
        (l.lines.iter().cloned().collect(), l.total)
    }

    /// The lines logged after the first `since` lines (if still in the ring).
    pub fn log_since(&self, since: u64) -> Vec<String> {
        let l = lock(&self.log);
        let first = l.total - l.lines.len() as u64;
        let skip = since.saturating_sub(first) as usize;
        l.lines.iter().skip(skip).cloned().collect()
    }

    /// The current symbol index.
    pub fn symbols(&self) -> Arc<SymbolIndex> {
        lock(&self.core).host.index.clone()
    }

    /// The names of the listed patches, in stack order.
    pub fn listed(&self) -> Vec<String> {
        let c = lock(&self.core);
        c.klp
            .listed()
            .iter()
            .filter_map(|id| c.klp.name_of(*id).map(str::to_string))
            .collect()
    }

    /// Whether a patch module is still referenced.
    pub fn patch_module_loaded(&self, name: &str) -> bool {
        lock(&self.core).host.modules.contains_key(name)
    }

    /// Number of core `WARN`s so far.
    pub fn warnings(&self) -> u64 {
        lock(&self.core).host.warnings
    }

    /// What the patch site of the function at `func` holds now: the trampoline during
    /// transitions, a direct jump in the steady state; `None` when it is not patched.
    pub fn site_state(&self, func: Addr) -> Option<SiteKind> {
        lock(&self.core).host.site_state(func)
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

fn info(r: &ThreadRecord) -> ThreadInfo {
    ThreadInfo {
        task: r.id,
        tid: r.tid(),
        comm: r.comm(),
        state: r.patch_state(),
        pending: r.pending(),
        kthread: r.is_kthread(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dynamic_debug_starts_off_as_in_the_kernel() {
        let p = Process::new(Config::default());
        let mut c = lock(&p.core);
        let h = &mut c.host;
        h.log(&Record {
            level: Level::Debug,
            func: "klp_init_transition",
            prefix: klp::log::PREFIX,
            args: format_args!("'x': initializing patching transition"),
        });
        h.log(&Record {
            level: Level::Notice,
            func: "klp_start_transition",
            prefix: klp::log::PREFIX,
            args: format_args!("'{}': starting {} transition", 'x', "patching"),
        });
        h.warn("something odd");
        drop(c);
        assert_eq!(
            p.log().0,
            vec![
                "livepatch: 'x': starting patching transition".to_string(),
                "WARNING: something odd".to_string()
            ]
        );
        assert_eq!(p.warnings(), 1);

        let p = Process::new(Config {
            dyndbg: true,
            dyndbg_off: vec!["klp_try_switch_task"],
            ..Config::default()
        });
        let mut c = lock(&p.core);
        for f in ["klp_init_transition", "klp_try_switch_task"] {
            c.host.log(&Record {
                level: Level::Debug,
                func: f,
                prefix: "",
                args: format_args!("{f}"),
            });
        }
        drop(c);
        assert_eq!(p.log().0, vec!["klp_init_transition".to_string()]);
    }

    #[test]
    fn the_log_ring_keeps_the_last_lines() {
        let p = Process::new(Config {
            log_capacity: 3,
            ..Config::default()
        });
        for i in 0..5 {
            lock(&p.log).push(format!("l{i}"));
        }
        assert_eq!(p.log(), (vec!["l2".into(), "l3".into(), "l4".into()], 5));
        assert_eq!(p.log_since(3), vec!["l3".to_string(), "l4".to_string()]);
        assert_eq!(p.log_since(0).len(), 3, "older lines are gone");
        assert!(p.log_since(5).is_empty());
    }

    #[test]
    fn sigblk_parsing() {
        let st = "Name:\tx\nSigPnd:\t0000000000000000\nSigBlk:\t0000000400000002\n";
        assert!(sigblk_has(st, 2));
        assert!(sigblk_has(st, 35));
        assert!(!sigblk_has(st, 1));
        assert!(!sigblk_has(st, 0));
        assert!(!sigblk_has("Name: x\n", 2));
    }

    #[test]
    fn functions_without_a_site_are_refused() {
        let p = Process::new(Config::default());
        let mut c = lock(&p.core);
        let f = sigblk_has as *const () as u64;
        assert_eq!(c.host.hook_site(f), None);
        assert_eq!(
            c.host.hook_register(f),
            Err(HookError::Register(Errno::EINVAL))
        );
        let mut idle = 0;
        c.host.for_each_idle_task(&mut |_, _| idle += 1);
        assert_eq!(idle, 0);
    }
}
