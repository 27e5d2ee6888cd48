//! The site state machine: a registered site holds the original bytes, a call of the
//! entry trampoline (each thread's state decides) or a direct branch to the one live
//! implementation (the steady state); the callers retargeted with the direct branch.

use klp::{Addr, Errno, HookError, Host, RedirectView, Target};

use super::{DECIDER_WAIT, Process, ProcessHost, lock};
use crate::redirect::{self, SiteState};
use crate::stack;
use crate::symbols::SymbolIndex;

/// Where a return address inside a `patchable!` body is reported: just past the
/// wrapper's site, an address inside the wrapper's symbol on every architecture.
const FOLD_OFFSET: u64 = 4;

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

impl ProcessHost {
    /// Rewrites the site to call the entry trampoline (the view is published already),
    /// or to jump straight to the implementation if the view is a steady one.
    pub(super) fn register_site(&mut self, site: Addr) -> Result<(), HookError> {
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
    pub(super) fn unregister_site(&mut self, site: Addr) {
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
    pub(super) fn publish_view(&mut self, site: Addr, view: Option<RedirectView>) {
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

    /// Folds addresses inside the body of a registered `patchable!` function into its
    /// wrapper (the function the core knows), so that a thread running the body is seen
    /// inside the function.
    pub(super) fn fold_bodies(&self, trace: &mut [Addr]) {
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
    /// `--emit-relocs` call `to` itself (where the back-end retargets call sites:
    /// x86_64, `redirect::callsites`); `None` points them back at `func` (before the
    /// site leaves the jump state, so no thread can run a stale replacement once a
    /// transition starts).
    fn retarget_callers(&mut self, func: Addr, to: Option<Addr>) {
        let answer = self.config.checks.answer;
        redirect::callsites::retarget_callers(&self.index, func, to, &mut || {
            stack::sync_core(answer)
        });
    }

    /// The direct call sites of `func` known from relocations (where the host
    /// retargets call sites; empty elsewhere).
    pub fn callers_of(&self, func: Addr) -> Vec<Addr> {
        redirect::callsites::callers_of(&self.index, func)
    }

    /// The call sites of `func` that call its replacement directly now (where the
    /// host retargets call sites; empty elsewhere).
    pub fn retargeted_callers(&self, func: Addr) -> Vec<Addr> {
        redirect::callsites::retargeted(func)
    }
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

impl Process {
    /// What the patch site of the function at `func` holds now: the trampoline during
    /// transitions, a direct jump in the steady state; `None` when it is not patched.
    pub fn site_state(&self, func: Addr) -> Option<SiteKind> {
        lock(&self.core).host.site_state(func)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::process::Config;

    #[test]
    fn functions_without_a_site_are_refused() {
        let p = Process::new(Config::default());
        let mut c = lock(&p.core);
        let f = site_error as *const () as u64;
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
