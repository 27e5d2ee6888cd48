//! What the process shows of itself: the patches as sysfs shows them, the threads, the
//! running transition and what blocks it, the log.

use std::sync::Arc;
use std::time::{Duration, Instant};

use klp::{Addr, Blocked, PatchState, TaskId, TraceError};

use super::{Process, lock};
use crate::symbols::SymbolIndex;
use crate::thread::{self, ThreadRecord};

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

impl Process {
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
    use crate::process::Config;

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
}
