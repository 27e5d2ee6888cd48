//! Redirection of the process's functions: patchable functions, the published views
//! and the trampoline's decision.
//!
//! ## Patchable functions ([`patchable!`](crate::patchable))
//!
//! Stable Rust has no `-Zpatchable-function-entry` (and LLVM has no usable one for
//! s390x at all), so a patchable function is made of two: a `#[unsafe(naked)]` wrapper
//! that carries the function's (unmangled) name and whose whole body is the patch site
//! followed by a tail branch, and an `#[inline(never)]` inner function holding the body.
//! Each back-end's `live` module writes its wrapper (`patchable_wrapper!`, selected by
//! `klp-backends`):
//!
//! | arch | wrapper |
//! |---|---|
//! | x86_64 | `nopl 0x0(%rax,%rax,1)` (5 bytes) · `jmp body` |
//! | aarch64 | `mov x9, x30; nop` · `b body` |
//! | ppc64le | global entry `addis r2,r12,…; addi r2,r2,…` · local entry: `nop; nop` · `b body` |
//! | s390x | `brcl 0,0` (6 bytes) · `jg body` |
//!
//! Both use the `extern "C"` ABI, so the wrapper leaves every argument register and the
//! stack exactly as the caller set them and the body (or a replacement with the same
//! signature) receives them untouched. Argument and return types should therefore be
//! FFI-safe (the compiler warns otherwise). The wrapper is `#[unsafe(no_mangle)]`: its
//! symbol is the function's name, which is what a patch names (two patchable functions
//! with one name in one program clash at link time). The inner function is
//! `name::body`, in a module named like the function (modules and functions live in
//! different namespaces); it sees the enclosing module's items through `use super::*`.
//! Without a back-end (`klp_backends::Unsupported`) the macro produces a plain
//! `#[unsafe(no_mangle)] extern "C"` function, which has no site.
//!
//! A thread inside the body has return addresses in `name::body`, not in the wrapper;
//! the host folds them into the wrapper when it reports stack traces
//! ([`crate::ProcessHost`]), so the consistency model sees the function.
//!
//! ## Published views
//!
//! [`klp::Host::hook_publish`] stores each site's [`RedirectView`] in a fixed table of
//! slots (open addressing, keyed by the site address; a slot, once given to a site,
//! stays that site's for the life of the process, so a reader never races with a
//! reuse). A slot is a seqlock of plain atomics: the writer (serialised by a lock)
//! makes the sequence odd, stores the fields, makes it even; a reader retries while the
//! sequence is odd or changed. Readers never lock and never allocate.
//!
//! ## Site states
//!
//! A registered site is in one of three states (`SiteState`), chosen by the host
//! (`ProcessHost::settle`) from the published view:
//!
//! * **trampoline** while any implementation below the top may still run (a transition,
//!   or a record whose top is the original): the site branches (with link where the
//!   architecture has one) to the architecture's entry trampoline
//!   (`klp_arch_<arch>::live::trampoline`, each with its register contract), which
//!   calls [`decide_entry`] with the site and continues at the chosen implementation;
//! * **jump** — the steady state — once the view has one live implementation and no
//!   transition: the site is a single direct branch to it, and a call costs one branch
//!   more than calling the replacement directly — not even that, where the back-end
//!   retargets call sites (x86_64, `klp_arch::callsite`), for the calls found in the
//!   relocations kept by `--emit-relocs`, which are pointed at the replacement itself
//!   (`callsites`). The trampoline comes back (the callers
//!   first, before the core lets any thread change state) when the next transition
//!   starts. A branch that cannot reach the replacement keeps the trampoline (same
//!   behaviour, slower);
//! * **original**: the bytes as found, once the record is gone.
//!
//! In the trampoline state a site branches to its own small stub, placed within the
//! site's branch reach, which jumps on to the trampoline wherever it is (module
//! `stubs`): a function of a shared library mapped far from the executable is
//! redirected like one of the executable.
//!
//! The back-end's plans (`klp_arch::patching`, run by [`sites`]) say how a site goes
//! from one state to another while other threads run it: which stores, in which
//! order, with which synchronisation after each, and what a thread caught in between
//! does; each back-end's `patching.rs` documents its encodings and why no thread can
//! run a half-written site.

//! ## The decision
//!
//! On x86_64 a site's stub enters a fast path first (the back-end's `Live::fast_entry`): with the
//! site's slot in a scratch register, it reads the thread's state byte through the
//! fixed offset of its thread-local record pointer and takes the slot's precomputed
//! answer for that state (`Slot::by_state`, written by `publish` under the same
//! sequence), saving no argument register and calling nothing; an unregistered
//! thread, a slot being written, or an answer that needs the full decision (an idle
//! thread in a transition: an anomaly to count) goes on to the trampoline.
//!
//! The decision reads the site's view and the calling thread's state from its
//! [`crate::thread::ThreadRecord`] (through the thread-local pointer of
//! [`crate::thread`]; no lock, no allocation) and returns `klp::decide`'s choice. A
//! thread that is not registered (only threads created without `pthread_create`, or the
//! main thread before it first used klp) is not registered from the trampoline — that
//! would allocate and lock: it runs [`crate::thread`]'s `!target` state, the code every
//! thread ran before the transition began. Such a thread is not a task of the core, so
//! the consistency model does not cover it; [`unregistered_calls`] counts its decisions
//! so that a program can see it. Call [`crate::thread::register_current`] early on such
//! threads.
//!
//! While it decides, a thread marks itself (`in_decide` in its record, a counter for
//! unregistered threads); `hook_unregister` and the core's `synchronize` run a
//! barrier (`membarrier(2)`, else a synchronisation round) and wait for the marks to
//! clear, so no decision that began before is still running when they return (the
//! mark is a plain store; the barrier orders it, see `wait_deciders`; the fast path
//! raises and drops the same mark). Not covered: a thread that has left the site
//! but not yet entered the decision (the trampoline's prologue, a few instructions) is
//! not waited for; it then decides with whatever view is published. That is harmless while patch
//! code is never unmapped (patches are linked into the process); closing it needs a
//! mark set by the trampoline itself.
//!
//! ## Text writes
//!
//! Serialised by one lock ([`sites::TEXT`]); the site's pages are made writable
//! *and* executable for the write (other threads keep running them), then read +
//! execute again. Synchronisation rounds ([`crate::stack::sync_round`]) make every
//! registered thread run klp's signal handler — a context-synchronising kernel entry
//! and exit, and a full barrier — and let the architecture move a thread found in the
//! middle of a multi-instruction site (`on_sync`). Where no thread can be inside the
//! instructions being replaced (x86_64: the site is one instruction now; a call's
//! displacement), `membarrier(PRIVATE_EXPEDITED_SYNC_CORE)` does the same for every
//! thread at once ([`crate::stack::sync_core`]).
//!
//! The table has 4096 slots; a site that finds none is refused (`-EBUSY`).

use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

use klp::{RedirectView, Target};

/// Declares a live-patchable `extern "C"` function (see the [module
/// documentation](crate::redirect)).
///
/// ```
/// klp_user::patchable! {
///     /// Adds one.
///     pub fn klp_doc_add_one(x: u64) -> u64 {
///         x + 1
///     }
/// }
/// assert_eq!(klp_doc_add_one(1), 2);
/// ```
#[macro_export]
macro_rules! patchable {
    ($(#[$m:meta])* $vis:vis fn $name:ident($($arg:ident : $ty:ty),* $(,)?) $(-> $ret:ty)? $body:block) => {
        $crate::__patchable_wrapper! {
            $(#[$m])* $vis fn $name($($arg: $ty),*) $(-> $ret)?
        }

        #[doc(hidden)]
        #[allow(non_snake_case, unused_imports)]
        mod $name {
            use super::*;
            #[inline(never)]
            pub(super) extern "C" fn body($($arg: $ty),*) $(-> $ret)? $body
        }
    };
}

/// What a site holds (the back-end's plans take it between the states, [`sites::set`]).
pub(crate) use klp_arch::patching::SiteState;

pub(crate) mod sites;
pub use sites::site_traps;

/// The site functions, for the tests of each architecture's sites in `tests/` (not a
/// stable interface).
#[doc(hidden)]
pub mod testing {
    pub use super::sites::{body_of, find, published_target, set};
    pub use klp_arch::patching::SiteState;
}
pub(crate) mod stubs;
pub(crate) mod text;
pub use text::fail_text_write;

// Call-site retargeting for the steady state, where the back-end has it
// (`klp_arch::callsite`; none elsewhere: the entry's jump serves every caller).
pub(crate) mod callsites;

/// The signal handler of a plan's trap (x86_64's `SIGTRAP`, s390x's `SIGILL`):
/// installed once, with klp's own signal blocked while it runs (a synchronisation round
/// must not be acknowledged by a thread between the trap and its redirect), and
/// passing every signal it does not own to the disposition it found.
#[derive(Debug)]
pub(crate) struct TrapHandler {
    once: std::sync::Once,
    installed: std::sync::atomic::AtomicBool,
    old: std::sync::atomic::AtomicUsize,
    old_flags: std::sync::atomic::AtomicUsize,
}

impl TrapHandler {
    pub(crate) const fn new() -> Self {
        TrapHandler {
            once: std::sync::Once::new(),
            installed: std::sync::atomic::AtomicBool::new(false),
            old: std::sync::atomic::AtomicUsize::new(0),
            old_flags: std::sync::atomic::AtomicUsize::new(0),
        }
    }

    /// Installs `handler` for `sig` (the first call only); returns whether it is
    /// installed. `handler` must only touch atomics, the interrupted context and the
    /// interrupted stack, and call [`TrapHandler::forward`] for foreign signals.
    pub(crate) fn install(
        &self,
        sig: libc::c_int,
        handler: extern "C" fn(libc::c_int, *mut libc::siginfo_t, *mut libc::c_void),
    ) -> bool {
        self.once.call_once(|| {
            // SAFETY: all-zero `sigaction`s are valid; `handler` has the `SA_SIGINFO`
            // signature and is async-signal-safe (the contract above).
            unsafe {
                let mut sa: libc::sigaction = std::mem::zeroed();
                let mut old: libc::sigaction = std::mem::zeroed();
                sa.sa_sigaction = handler as *const () as usize;
                sa.sa_flags = libc::SA_SIGINFO | libc::SA_ONSTACK | libc::SA_RESTART;
                libc::sigemptyset(&mut sa.sa_mask);
                libc::sigaddset(&mut sa.sa_mask, crate::sys::signal_number());
                if libc::sigaction(sig, &sa, &mut old) == 0 {
                    self.old.store(old.sa_sigaction, Ordering::Release);
                    self.old_flags
                        .store(old.sa_flags as usize, Ordering::Release);
                    self.installed.store(true, Ordering::Release);
                }
            }
        });
        self.installed.load(Ordering::Acquire)
    }

    /// Hands a signal the handler does not own to the previous disposition (the
    /// default one is restored and the signal raised again).
    pub(crate) fn forward(
        &self,
        sig: libc::c_int,
        info: *mut libc::siginfo_t,
        uc: *mut libc::c_void,
    ) {
        let old = self.old.load(Ordering::Acquire);
        if old == libc::SIG_DFL || old == libc::SIG_IGN {
            // SAFETY: restoring the default disposition and re-raising the signal (it
            // is delivered once the handler returns) is async-signal-safe.
            unsafe {
                libc::signal(sig, libc::SIG_DFL);
                libc::raise(sig);
            }
        } else if self.old_flags.load(Ordering::Acquire) & libc::SA_SIGINFO as usize != 0 {
            // SAFETY: the previous handler was installed with `SA_SIGINFO`, so it has
            // this signature.
            let f = unsafe {
                std::mem::transmute::<
                    usize,
                    extern "C" fn(libc::c_int, *mut libc::siginfo_t, *mut libc::c_void),
                >(old)
            };
            f(sig, info, uc);
        } else {
            // SAFETY: the previous handler was installed without `SA_SIGINFO`.
            let f = unsafe { std::mem::transmute::<usize, extern "C" fn(libc::c_int)>(old) };
            f(sig);
        }
    }
}

/// Called by klp's signal handler on every synchronisation round, before the thread
/// acknowledges it: lets a site write in progress move a thread interrupted in the
/// middle of a multi-instruction site (the plan's resume rule, [`sites::on_sync`]).
///
/// # Safety
///
/// 1. `uc` is the `ucontext_t` the kernel passed to an `SA_SIGINFO` handler running on
///    the interrupted thread.
pub(crate) unsafe fn on_sync(uc: *mut libc::c_void) {
    // SAFETY: condition 1 is passed on.
    unsafe { sites::on_sync(uc) }
}

/// Tells the stack checks, which sit below the redirects, what they need from them
/// ([`crate::stack::register_redirect`]): the decision function (a thread inside it
/// gets no trace) and [`on_sync`]. Once per process; called before a site is first
/// written ([`sites::set`]) or a view first published ([`publish`]), and when the
/// process host boots.
pub(crate) fn register_with_stack() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| crate::stack::register_redirect(decide_entry, on_sync));
}

// ------------------------------------------------------------------ the slot table

const SLOTS: usize = 4096;
const SLOT_BITS: u32 = 12;
const _: () = assert!(1 << SLOT_BITS == SLOTS);

const F_PRESENT: u64 = 1;
const F_TRANSITION: u64 = 2;

/// In [`Slot::by_state`]: no precomputed answer, take the full decision.
const SLOW: u64 = klp_arch::live::fast::SLOW;

/// One site's published view (see the module documentation), laid out as a back-end's
/// fast entry path reads it (`klp_arch::live::fast`).
#[derive(Debug)]
#[repr(C)]
struct Slot {
    site: AtomicU64,
    seq: AtomicU64,
    /// The decision for each value of a thread's state byte (indexed as
    /// [`crate::thread::state_index`]; [`SLOW`] where the full decision must run: an
    /// idle thread during a transition, which counts an anomaly), under the same
    /// sequence: what a back-end's fast entry path reads.
    by_state: [AtomicU64; 4],
    flags: AtomicU64,
    top: AtomicU64,
    below: AtomicU64,
}

const _: () = {
    use klp_arch::live::fast;
    assert!(std::mem::offset_of!(Slot, site) == fast::SLOT_SITE);
    assert!(std::mem::offset_of!(Slot, seq) == fast::SLOT_SEQ);
    assert!(std::mem::offset_of!(Slot, by_state) == fast::SLOT_BY_STATE);
};

/// The address of `site`'s slot, if it has one (slots are never reused: the address
/// stays `site`'s for the life of the process): what a site's stub hands a fast entry
/// path.
fn slot_addr(site: u64) -> Option<u64> {
    slot(site, false).map(|s| s as *const Slot as u64)
}

impl Slot {
    const fn new() -> Slot {
        Slot {
            site: AtomicU64::new(0),
            seq: AtomicU64::new(0),
            by_state: [const { AtomicU64::new(0) }; 4],
            flags: AtomicU64::new(0),
            top: AtomicU64::new(0),
            below: AtomicU64::new(0),
        }
    }
}

static TABLE: [Slot; SLOTS] = [const { Slot::new() }; SLOTS];
static WRITERS: Mutex<()> = Mutex::new(());

fn home(site: u64) -> usize {
    ((site >> 2).wrapping_mul(0x9e37_79b9_7f4a_7c15) >> (64 - SLOT_BITS)) as usize
}

fn target_word(t: Target) -> u64 {
    match t {
        Target::Original => 0,
        Target::Func(a) => a,
    }
}

fn word_target(w: u64) -> Target {
    if w == 0 {
        Target::Original
    } else {
        Target::Func(w)
    }
}

/// The slot of `site`; with `insert`, claims a free one (writers only).
fn slot(site: u64, insert: bool) -> Option<&'static Slot> {
    if site == 0 {
        return None;
    }
    let mut i = home(site);
    for _ in 0..SLOTS {
        let s = TABLE.get(i)?;
        let k = s.site.load(Ordering::Acquire);
        if k == site {
            return Some(s);
        }
        if k == 0 {
            if !insert {
                return None;
            }
            match s
                .site
                .compare_exchange(0, site, Ordering::AcqRel, Ordering::Acquire)
            {
                Ok(_) => return Some(s),
                Err(k) if k == site => return Some(s),
                Err(_) => {}
            }
        }
        i = (i + 1) % SLOTS;
    }
    None
}

/// Where the sites' stubs enter when the back-end's fast entry path runs in this
/// process (x86_64; the stub then carries the site's slot instead of the site); `None`
/// when every stub enters the trampoline.
pub fn fast_entry_address() -> Option<u64> {
    sites::fast_path_ready().then(<klp::arch::Native as klp_arch::Live>::fast_entry)?
}

/// Publishes `view` for `site` (`None`: no record). Returns `false` if the table is
/// full (the site then decides "original").
pub(crate) fn publish(site: u64, view: Option<RedirectView>) -> bool {
    register_with_stack();
    let _w = WRITERS.lock().unwrap_or_else(|e| e.into_inner());
    let Some(s) = slot(site, view.is_some()) else {
        return view.is_none();
    };
    let seq = s.seq.load(Ordering::Relaxed);
    s.seq.store(seq.wrapping_add(1), Ordering::Relaxed);
    std::sync::atomic::fence(Ordering::Release);
    let mut by_state = [SLOW; 4];
    match view {
        Some(v) => {
            s.top.store(target_word(v.top), Ordering::Relaxed);
            s.below.store(target_word(v.below), Ordering::Relaxed);
            let f = F_PRESENT | if v.top_transition { F_TRANSITION } else { 0 };
            s.flags.store(f, Ordering::Relaxed);
            for st in [
                klp::PatchState::Idle,
                klp::PatchState::Unpatched,
                klp::PatchState::Patched,
            ] {
                let (t, anomaly) = klp::decide(&v, st);
                if let Some(w) = by_state.get_mut(crate::thread::state_index(st)) {
                    *w = if anomaly == klp::Anomaly::None {
                        target_word(t)
                    } else {
                        SLOW
                    };
                }
            }
        }
        None => {
            s.flags.store(0, Ordering::Relaxed);
            by_state = [0; 4];
        }
    }
    for (slot, w) in s.by_state.iter().zip(by_state) {
        slot.store(w, Ordering::Relaxed);
    }
    s.seq.store(seq.wrapping_add(2), Ordering::Release);
    true
}

/// Records (or, with `present` false, forgets) the end of a registered site
/// (`site + len`): the return address the site's branch-and-link leaves while it enters
/// the trampoline, which the stack checks' conservative scan never keeps (the set is
/// theirs: [`crate::stack`]'s scan, below the redirects).
pub(crate) fn set_site_end(end: u64, present: bool) {
    crate::stack::set_site_end(end, present);
}

/// The view published for `site`. Lock-free, no allocation.
pub fn view(site: u64) -> Option<RedirectView> {
    let s = slot(site, false)?;
    loop {
        let a = s.seq.load(Ordering::Acquire);
        if a & 1 != 0 {
            std::hint::spin_loop();
            continue;
        }
        let flags = s.flags.load(Ordering::Relaxed);
        let top = s.top.load(Ordering::Relaxed);
        let below = s.below.load(Ordering::Relaxed);
        std::sync::atomic::fence(Ordering::Acquire);
        if s.seq.load(Ordering::Relaxed) != a {
            continue;
        }
        return (flags & F_PRESENT != 0).then_some(RedirectView {
            top: word_target(top),
            top_transition: flags & F_TRANSITION != 0,
            below: word_target(below),
        });
    }
}

/// Decisions taken for threads that are not registered (see the module documentation).
static UNREGISTERED_CALLS: AtomicU64 = AtomicU64::new(0);
/// Unregistered threads inside the decision now.
static UNREGISTERED_IN: AtomicU64 = AtomicU64::new(0);
/// Decisions that found an idle thread in a transition (the kernel's `WARN_ON_ONCE`).
static ANOMALIES: AtomicU64 = AtomicU64::new(0);

/// How many redirect decisions were taken for threads klp does not know.
pub fn unregistered_calls() -> u64 {
    UNREGISTERED_CALLS.load(Ordering::Relaxed)
}

/// How many decisions found an idle thread while the function was in transition.
pub fn anomalies() -> u64 {
    ANOMALIES.load(Ordering::Relaxed)
}

/// The decision the trampoline calls for `site`: 0 to run the original body, else the
/// replacement's address. No lock, no allocation, no panic.
pub extern "C" fn decide_entry(site: u64) -> u64 {
    let p = crate::thread::current_raw();
    // SAFETY: a non-null `CURRENT` points to this thread's record, which the registry
    // keeps alive until this thread's exit guard clears `CURRENT` first.
    let rec = unsafe { p.as_ref() };
    let prev = match rec {
        Some(r) => {
            // A plain store, ordered before the view's loads for this thread only: the
            // waiter's side of the barrier is a synchronisation round, in which every
            // registered thread runs a signal handler (a full barrier on that thread),
            // as with `membarrier` (see `wait_deciders`). A locked `xchg` here would be
            // the slowest instruction of the whole decision.
            let prev = r.in_decide.load(Ordering::Relaxed);
            r.in_decide.store(1, Ordering::Relaxed);
            std::sync::atomic::compiler_fence(Ordering::SeqCst);
            prev
        }
        None => {
            UNREGISTERED_IN.fetch_add(1, Ordering::SeqCst);
            0
        }
    };
    let out = match view(site) {
        None => 0,
        Some(v) => {
            let state = rec.map_or_else(crate::thread::unregistered_state, |r| r.patch_state());
            let (t, anomaly) = klp::decide(&v, state);
            if anomaly != klp::Anomaly::None {
                ANOMALIES.fetch_add(1, Ordering::Relaxed);
            }
            target_word(t)
        }
    };
    match rec {
        Some(r) => r.in_decide.store(prev, Ordering::Release),
        None => {
            UNREGISTERED_CALLS.fetch_add(1, Ordering::Relaxed);
            UNREGISTERED_IN.fetch_sub(1, Ordering::Release);
        }
    }
    out
}

/// Waits (at most `limit`) until no thread is inside [`decide_entry`]; returns whether
/// none is. Called after a site was restored, with `sync` running a synchronisation
/// round first: a registered thread that had marked itself before the round is seen
/// marked after it (the round is a full barrier on every registered thread), and one
/// that had not reached the site by then runs the restored bytes.
pub(crate) fn wait_deciders(limit: std::time::Duration, sync: &mut dyn FnMut()) -> bool {
    std::sync::atomic::fence(Ordering::SeqCst);
    sync();
    let me = crate::thread::current_raw();
    let start = std::time::Instant::now();
    loop {
        let busy = crate::thread::with_registry(|recs| {
            recs.iter()
                .any(|r| !std::ptr::eq(&**r, me) && r.in_decide.load(Ordering::Acquire) != 0)
        }) || UNREGISTERED_IN.load(Ordering::Acquire) != 0;
        if !busy {
            return true;
        }
        if start.elapsed() >= limit {
            return false;
        }
        std::thread::yield_now();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn views_round_trip_through_the_table() {
        let site = 0x7777_0000_1230;
        assert_eq!(view(site), None);
        let v = RedirectView {
            top: Target::Func(0x1000),
            top_transition: true,
            below: Target::Original,
        };
        assert!(publish(site, Some(v)));
        assert_eq!(view(site), Some(v));
        assert_eq!(view(site + 16), None);
        assert!(publish(site, None));
        assert_eq!(view(site), None);
        assert!(publish(
            site,
            Some(RedirectView {
                top_transition: false,
                ..v
            })
        ));
        assert_eq!(view(site).map(|v| v.top_transition), Some(false));
        assert!(publish(site, None));
    }

    #[test]
    fn the_decision_reads_the_view_and_the_threads_state() {
        std::thread::spawn(|| {
            let site = 0x7777_0000_3000;
            let rec = crate::thread::register_current();
            assert_eq!(decide_entry(site), 0, "no view: the original");
            let v = RedirectView {
                top: Target::Func(0x2000),
                top_transition: true,
                below: Target::Func(0x1000),
            };
            publish(site, Some(v));
            rec.set_patch_state(klp::PatchState::Unpatched);
            assert_eq!(decide_entry(site), 0x1000, "unpatched: the entry below");
            rec.set_patch_state(klp::PatchState::Patched);
            assert_eq!(decide_entry(site), 0x2000, "patched: the top");
            publish(
                site,
                Some(RedirectView {
                    below: Target::Original,
                    ..v
                }),
            );
            rec.set_patch_state(klp::PatchState::Unpatched);
            assert_eq!(decide_entry(site), 0, "below is the original");
            rec.set_patch_state(klp::PatchState::Idle);
            publish(
                site,
                Some(RedirectView {
                    top_transition: false,
                    ..v
                }),
            );
            assert_eq!(decide_entry(site), 0x2000, "steady state: the top");
            assert_eq!(rec.in_decide.load(Ordering::Relaxed), 0, "mark cleared");
            publish(site, None);
            assert_eq!(decide_entry(site), 0);
            assert!(wait_deciders(std::time::Duration::from_secs(1), &mut || {}));
        })
        .join()
        .expect("thread");
    }

    #[test]
    fn readers_never_see_a_torn_view() {
        let site = 0x7777_0000_2000;
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let s2 = stop.clone();
        let reader = std::thread::spawn(move || {
            let mut seen = 0u64;
            while !s2.load(Ordering::Acquire) || seen == 0 {
                if let Some(v) = view(site) {
                    // Every published view has below = top + 1 and transition = odd top.
                    let (Target::Func(t), Target::Func(b)) = (v.top, v.below) else {
                        panic!("{v:?}");
                    };
                    assert_eq!(b, t + 1);
                    assert_eq!(v.top_transition, t % 2 == 1);
                    seen += 1;
                }
            }
            seen
        });
        for i in (1..20_000u64).chain([7]) {
            publish(
                site,
                Some(RedirectView {
                    top: Target::Func(i),
                    top_transition: i % 2 == 1,
                    below: Target::Func(i + 1),
                }),
            );
        }
        stop.store(true, Ordering::Release);
        assert!(reader.join().expect("reader") > 0);
        publish(site, None);
    }
}
