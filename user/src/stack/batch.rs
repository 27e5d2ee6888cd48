//! Threads stopped together before a completion attempt checks them.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use super::handshake::{self, Hold};
use super::signal::{install_handler, tgkill};
use super::trace::{HeldTrace, walk_held};
use super::{CheckOptions, Regs};
use crate::symbols::SymbolIndex;
use crate::thread::{self, ThreadRecord, cap};

/// Threads stopped together ([`Batch::stop`]): each was signalled at once and is held
/// in the handler with its interrupted registers until it is taken for a check
/// ([`Batch::trace_held`]) or the batch is dropped. The capture lock is taken while
/// the batch stops its threads only: a thread it holds is protected by its own
/// handshake state (another stop waits for it to be released), and a thread that did
/// not answer can then be stopped on its own ([`super::trace_of_held`]).
#[derive(Debug)]
pub struct Batch {
    held: std::collections::HashMap<klp::TaskId, (Arc<ThreadRecord>, Regs)>,
}

impl Batch {
    /// Signals every thread of `recs` (other than the caller, started and alive) at
    /// once and waits until each has stopped in the handler, until `t.answer` passed,
    /// or until no thread has answered for `quiet`: threads that have not answered by
    /// then are left alone (their requests withdrawn) and can be checked one by one
    /// as before.
    pub fn stop(recs: &[Arc<ThreadRecord>], t: CheckOptions, quiet: Duration) -> Batch {
        let one = handshake::capture_lock();
        install_handler();
        handshake::set_hold(t, &one);
        let me = thread::current_raw();
        let mut asked = Vec::with_capacity(recs.len());
        // The whole wave under one hold of the registry lock (a thread cannot finish
        // unregistering meanwhile, as in `signal`): no thread this wave stops can be
        // holding that lock, which the stops that follow need.
        thread::with_registry(|regs| {
            let known: std::collections::HashSet<*const ThreadRecord> =
                regs.iter().map(Arc::as_ptr).collect();
            for r in recs {
                if std::ptr::eq(&**r, me)
                    || !known.contains(&Arc::as_ptr(r))
                    || !r.alive()
                    || r.tid() == 0
                {
                    continue;
                }
                if r.cap
                    .compare_exchange(
                        cap::IDLE,
                        cap::REQUESTED,
                        Ordering::AcqRel,
                        Ordering::Acquire,
                    )
                    .is_err()
                {
                    continue;
                }
                if tgkill(r.tid(), regs) {
                    asked.push(r.clone());
                } else {
                    r.cap.store(cap::IDLE, Ordering::Release);
                }
            }
        });
        let start = Instant::now();
        let mut last = start;
        let mut held = std::collections::HashMap::with_capacity(asked.len());
        let mut waiting = asked;
        loop {
            let before = waiting.len();
            waiting.retain(|r| {
                if r.cap.load(Ordering::Acquire) != cap::CAPTURED {
                    return true;
                }
                held.insert(r.id, (r.clone(), handshake::captured_regs(r)));
                false
            });
            if waiting.is_empty() {
                break;
            }
            let now = Instant::now();
            if waiting.len() != before {
                last = now;
            }
            if now.duration_since(start) >= t.answer || now.duration_since(last) >= quiet {
                // Withdraw what is still only requested (a late handler then does
                // nothing); one that captured meanwhile is released with the batch.
                for r in waiting.drain(..) {
                    if r.cap
                        .compare_exchange(
                            cap::REQUESTED,
                            cap::IDLE,
                            Ordering::AcqRel,
                            Ordering::Acquire,
                        )
                        .is_err()
                    {
                        handshake::release(&r);
                    }
                }
                break;
            }
            std::thread::sleep(Duration::from_micros(20));
        }
        drop(one);
        Batch { held }
    }

    /// Whether thread `id` is held by this batch (it answered klp's signal, so it does
    /// not block it, and it cannot run).
    pub fn holds(&self, id: klp::TaskId) -> bool {
        self.held.contains_key(&id)
    }

    /// How many threads the batch holds.
    pub fn len(&self) -> usize {
        self.held.len()
    }

    /// Whether the batch holds no thread.
    pub fn is_empty(&self) -> bool {
        self.held.is_empty()
    }

    /// The trace of held thread `id` (as [`super::trace_of_held`]), taken out of the batch:
    /// on success the returned [`Hold`] keeps it stopped. `None` if the batch does not
    /// hold it.
    pub fn trace_held(
        &mut self,
        id: klp::TaskId,
        index: &SymbolIndex,
        t: CheckOptions,
        max: usize,
    ) -> Option<HeldTrace> {
        let (rec, regs) = self.held.remove(&id)?;
        let hold = Hold::new(rec, None);
        Some(walk_held(hold, regs, index, t, max))
    }
}

impl Drop for Batch {
    fn drop(&mut self) {
        for (_, (r, _)) in self.held.drain() {
            handshake::release(&r);
        }
    }
}
