//! The [`klp::Host`] adapter: the core's questions answered from the threads
//! ([`crate::thread`]), the stack checks ([`crate::stack`]), the symbol index and the
//! patch modules; the sites' calls go to the site state machine (`sites`).

use std::ops::ControlFlow;
use std::sync::atomic::Ordering;
use std::time::Instant;

use klp::{
    Addr, Comm, Errno, HookError, Host, IdleTask, Level, PatchId, PatchState, Record, RedirectView,
    TaskId, TraceError,
};

use super::{BATCH_QUIET, DECIDER_WAIT, ProcessHost};
use crate::redirect;
use crate::stack::{self, TraceFailure};
use crate::thread;

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
        self.register_site(site)
    }

    /// Restores the site's original bytes, then waits until no thread still runs the
    /// trampoline's decision (bounded; a timeout is logged).
    fn hook_unregister(&mut self, site: Addr) {
        self.unregister_site(site);
    }

    /// Publishes the view for the trampoline's decision, then settles the site: a
    /// direct jump when the view is steady, the trampoline otherwise.
    fn hook_publish(&mut self, site: Addr, view: Option<RedirectView>) {
        self.publish_view(site, view);
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

    /// The thread stays stopped after a successful check until the core is done with
    /// it ([`Host::task_check_done`]: switched, or left as it was): the check and the
    /// switch are one step for the thread, as under the kernel's runqueue lock. A hold
    /// still kept (a core that did not say so) ends at the next check, at the next
    /// batch, or when the core operation ends.
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

    /// Releases the thread held since its stack check (see
    /// [`Host::stack_trace_reliable`]).
    fn task_check_done(&mut self, _t: TaskId) {
        self.held = None;
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::process::{Config, Process, lock};

    /// The protocol of `Host::task_check_done`: a thread whose stack check succeeded
    /// stays stopped — a log line in between does not release it — until the core says
    /// it is done with it.
    #[test]
    #[cfg_attr(
        klp_tsan,
        ignore = "ThreadSanitizer defers signals: the handler's context is stale"
    )]
    fn a_checked_thread_stays_held_until_the_core_is_done_with_it() {
        use std::sync::Arc;
        use std::sync::atomic::AtomicBool;
        use std::time::{Duration, Instant};

        use crate::symbols::SymbolIndex;
        use crate::thread::cap;

        stack::install_handler();
        let stop = Arc::new(AtomicBool::new(false));
        let (tx, rx) = std::sync::mpsc::channel();
        let spinning = stop.clone();
        let h = std::thread::spawn(move || {
            let _ = tx.send(thread::current_record());
            let mut n = 0u64;
            while !spinning.load(Ordering::Acquire) {
                n = std::hint::black_box(n.wrapping_add(1));
            }
            n
        });
        let rec = rx.recv().ok().flatten().expect("registered");
        let p = Process::new(Config::default());
        let mut c = lock(&p.core);
        let host = &mut c.host;
        host.index = Arc::new(SymbolIndex::load());
        let mut entries = [0; klp::MAX_STACK_ENTRIES];
        match host.stack_trace_reliable(rec.id, &mut entries) {
            Ok(_) => {
                assert!(host.held.is_some(), "held after a successful check");
                assert_eq!(rec.cap.load(Ordering::Acquire), cap::CAPTURED);
                host.log(&Record {
                    level: Level::Notice,
                    func: "klp_try_switch_task",
                    prefix: klp::log::PREFIX,
                    args: format_args!("a line between the check and the switch"),
                });
                assert!(host.held.is_some(), "a log line releases nothing");
                host.task_check_done(rec.id);
                assert!(host.held.is_none(), "released once the core is done");
                let start = Instant::now();
                while rec.cap.load(Ordering::Acquire) != cap::IDLE {
                    assert!(
                        start.elapsed() < Duration::from_secs(5),
                        "the thread runs again"
                    );
                    std::thread::yield_now();
                }
            }
            // The unwinder may refuse the stack (s390x without a back chain): then
            // nothing is held and there is nothing to check.
            Err(e) => eprintln!(
                "no reliable trace of a spinning thread here ({e:?}, {:?}): nothing held",
                host.last_failure(rec.id)
            ),
        }
        drop(c);
        stop.store(true, Ordering::Release);
        let _ = h.join();
    }

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
    fn sigblk_parsing() {
        let st = "Name:\tx\nSigPnd:\t0000000000000000\nSigBlk:\t0000000400000002\n";
        assert!(sigblk_has(st, 2));
        assert!(sigblk_has(st, 35));
        assert!(!sigblk_has(st, 1));
        assert!(!sigblk_has(st, 0));
        assert!(!sigblk_has("Name: x\n", 2));
    }
}
