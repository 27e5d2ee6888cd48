//! The process's patch sites: finding them, and rewriting them while other threads run
//! them, with the plans of the native back-end ([`klp_arch::patching`]).
//!
//! The back-end decides everything about the machine: which entry forms it rewrites
//! live ([`SitePlanner::live_site`]), the bytes of each state, the order of the stores
//! and what each needs before the next ([`SitePlanner::plan`]), what a thread caught
//! in between does ([`Resume`], [`TrapEntry`]), and the stores themselves
//! ([`Live::store_text`]). This module does what only a process can: it reads the
//! site, makes its pages writable (`text`), gives each site its stub near it
//! (`stubs`), runs the synchronisation rounds and the core serialisation the plan
//! asks for, applies the plan's [`Resume`] rule when klp's signal handler runs during
//! a round ([`on_sync`]), and owns the signal handler of the plan's trap
//! ([`SitePlanner::TRAP_SIGNAL`]), which sends a trapping thread where the plan says
//! (the trap table is shared with x86_64's call-site retargeting).
//!
//! Text writes (sites, stubs, call sites) are serialised by [`TEXT`]; the site's
//! pages are read + write + execute while a plan runs (other threads keep running
//! them), then read + execute again.

use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

use klp::Errno;
use klp::arch::{Arch, FuncInfo, Native, Site};
use klp_arch::Live;
use klp_arch::patching::{
    MAX_STUB, PlanCtx, Resume, SitePlanner, SiteState, Sync, TargetInfo, TrapEntry,
};

use crate::symbols::SymbolIndex;

/// Serialises text writes.
pub(crate) static TEXT: Mutex<()> = Mutex::new(());

/// A hold of [`TEXT`]: the witness taken by the functions that are only sound while no
/// other text write is under way.
pub(crate) type TextGuard<'a> = std::sync::MutexGuard<'a, ()>;

/// How long a core serialisation waits for the threads' answers where `membarrier`
/// is unavailable.
const SYNC_TIMEOUT: std::time::Duration = std::time::Duration::from_millis(500);

/// The most bytes that precede a site in a function (x86_64's `endbr64`, aarch64's
/// `bti c`, ppc64le's global-entry TOC setup).
const PREFIX_MAX: u64 = 16;

/// The site at the entry of the function that starts at `addr` (a function symbol of
/// the index whose first bytes are an unpatched site the back-end rewrites live). A
/// form that calls something (`bl _mcount`) is only a site when a function symbol
/// starts there: the same shape calling a stub is a site in its trampoline state.
pub fn find(index: &SymbolIndex, addr: u64) -> Option<Site> {
    let (_, sym) = index.lookup(addr)?;
    if sym.addr != addr || !sym.func {
        return None;
    }
    // The site and what may precede it (a landing pad, ppc64le's TOC setup).
    let max = Native::MAX_SITE_LEN as u64 + PREFIX_MAX;
    let len = if sym.size == 0 {
        max
    } else {
        sym.size.min(max)
    };
    if len == 0 || !index.is_text(addr) || !index.is_text(addr + len - 1) {
        return None;
    }
    // SAFETY: `addr..addr + len` lies in an executable (hence mapped and readable)
    // segment of a loaded object, inside the function's symbol.
    let code = unsafe { std::slice::from_raw_parts(addr as *const u8, len as usize) };
    let func = FuncInfo {
        addr,
        st_other: sym.st_other,
    };
    let site = Native::find_site(code, func).ok()?;
    if !Native::live_site(&site) {
        return None;
    }
    let calls = site.form.target;
    if calls != 0
        && !index
            .lookup(calls)
            .is_some_and(|(_, s)| s.func && s.addr == calls)
    {
        return None;
    }
    Some(site)
}

/// The body a `patchable!` wrapper branches to right after its site: `(start, end)`
/// of the function symbol entered (at its start or, on ppc64le, its local entry).
pub fn body_of(index: &SymbolIndex, site: &Site) -> Option<(u64, u64)> {
    let at = site.addr() + site.len() as u64;
    let end = site.func.addr.checked_add(index.size_of(site.func.addr)?)?;
    let n = end.checked_sub(at)?.min(8);
    if n == 0 || !index.is_text(at) || !index.is_text(at + n - 1) {
        return None;
    }
    // SAFETY: `at..at + n` is in an executable segment, inside the wrapper's symbol.
    let code = unsafe { std::slice::from_raw_parts(at as *const u8, n as usize) };
    let target = Native::wrapper_body(at, code)?;
    let (_, s) = index.lookup(target)?;
    (s.addr == target || Native::local_entry(s.addr, s.st_other) == target)
        .then_some((s.addr, s.addr + s.size.max(1)))
}

/// What the back-end needs to know about a replacement `target` of `site`.
fn target_info(index: &SymbolIndex, site: u64, target: u64) -> TargetInfo {
    let so = index.lookup(site);
    let to = index.lookup(target);
    TargetInfo {
        addr: target,
        same_object: matches!((so, to), (Some((a, _)), Some((b, _))) if std::ptr::eq(a, b)),
        symbol: to.map(|(_, s)| (s.addr, s.st_other)),
    }
}

/// The word the trampoline's decision returns for `target` at `site` (the back-end
/// may tag it: ppc64le's other-TOC bit).
pub fn published_target(index: &SymbolIndex, site: u64, target: u64) -> u64 {
    Native::published_target(&target_info(index, site, target))
}

/// Reads the site's bytes now. `TEXT` is held by the caller (`_text`: no write under
/// way).
fn read_site(site: &Site, _text: &TextGuard<'_>) -> Vec<u8> {
    let mut now = vec![0u8; site.len()];
    // SAFETY: the site is text of a loaded object (`find`), mapped and readable (klp
    // never maps text execute-only); `now` holds `site.len()` bytes and does not
    // overlap it.
    unsafe { std::ptr::copy_nonoverlapping(site.addr() as *const u8, now.as_mut_ptr(), now.len()) };
    now
}

/// Turns the back-end's fast entry path on if it has one and it can run here (once):
/// klp-user is part of the main executable, so its thread-local record pointer lies in
/// the executable's static TLS block, at one fixed offset from every thread's pointer.
/// Elsewhere (klp-user inside a shared object, whose TLS may be allocated per thread)
/// every site enters the trampoline directly. Returns whether it is on.
pub(crate) fn fast_path_ready() -> bool {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let Some(tp) = Native::thread_pointer() else {
            return;
        };
        if in_main_executable(super::decide_entry as *const () as u64) {
            Native::enable_fast_path(crate::thread::current_cell().wrapping_sub(tp));
        }
    });
    Native::fast_entry().is_some()
}

/// Whether `addr` lies in the main executable (the object whose program headers the
/// kernel passed as `AT_PHDR`).
fn in_main_executable(addr: u64) -> bool {
    // SAFETY: `getauxval` has no preconditions.
    let phdr = unsafe { libc::getauxval(libc::AT_PHDR) };
    let base_of = |a: u64| {
        // SAFETY: an all-zero `Dl_info` (null pointers, zeros) is a valid value.
        let mut info: libc::Dl_info = unsafe { std::mem::zeroed() };
        // SAFETY: `dladdr` only reads the loader's tables and writes `info`.
        let ok = unsafe { libc::dladdr(a as *const libc::c_void, &mut info) } != 0;
        (ok && !info.dli_fbase.is_null()).then_some(info.dli_fbase as u64)
    };
    phdr != 0 && base_of(phdr).is_some_and(|b| Some(b) == base_of(addr))
}

/// What a site's stub hands over and where it enters: the site's slot and the fast
/// entry path when it runs here, else the site and the trampoline.
fn stub_entry(site: u64) -> (u64, u64) {
    match (super::slot_addr(site), super::fast_entry_address()) {
        (Some(slot), Some(fast)) => (slot, fast),
        _ => (site, Native::trampoline()),
    }
}

/// The stub of `site` ([`super::stubs`]; `TEXT` held by the caller, `_text`).
fn stub_for(site: &Site, sync: &mut dyn FnMut(), _text: &TextGuard<'_>) -> Result<u64, Errno> {
    let (value, entry) = stub_entry(site.addr());
    let mut bytes = [0u8; MAX_STUB];
    let n = Native::stub(value, entry, &mut bytes);
    let bytes = bytes
        .get(..n)
        .filter(|b| !b.is_empty())
        .ok_or(Errno::ENOSYS)?;
    // SAFETY: `TEXT` is held by the caller (`_text`, the witness) (1); `write_text`
    // copies and makes the bytes ready to execute (2).
    unsafe {
        super::stubs::stub_for(
            site.addr(),
            bytes,
            &|a| Native::stub_reaches(site, a),
            Native::write_text,
            sync,
        )
    }
}

/// Tells the back-end the process's hardware capabilities, once.
fn tell_hwcap() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        // SAFETY: `getauxval` has no preconditions.
        Native::set_hwcap(unsafe { libc::getauxval(libc::AT_HWCAP) });
    });
}

/// Rewrites `site` to state `to` (the bytes in memory say where it starts). `sync`
/// runs a synchronisation round. Fails, with nothing written to the site, with
/// `ERANGE` when `to` cannot be encoded at this site (a jump out of reach or not
/// allowed, no stub page within reach), `EINVAL` when the site is not one the
/// back-end rewrites live or holds bytes it did not write, `EPERM` when the text
/// cannot be made writable or the trap handler installed.
pub fn set(
    index: &SymbolIndex,
    site: &Site,
    to: SiteState,
    sync: &mut dyn FnMut(),
) -> Result<(), Errno> {
    if !Native::live_site(site) {
        return Err(Errno::EINVAL);
    }
    let addr = site.addr();
    // A refused jump costs nothing: decided before the stub is made.
    let to = match to {
        SiteState::Jump(t) => {
            SiteState::Jump(Native::jump_entry(&target_info(index, addr, t)).ok_or(Errno::ERANGE)?)
        }
        s => s,
    };
    let text = TEXT.lock().unwrap_or_else(|e| e.into_inner());
    Native::set_decision(super::decide_entry);
    super::register_with_stack();
    tell_hwcap();
    let ctx = PlanCtx {
        addr,
        stub: stub_for(site, sync, &text)?,
        trampoline: Native::trampoline(),
    };
    let plan = Native::plan(site, &read_site(site, &text), to, &ctx)
        .map_err(|e| Errno::from_ret(e.errno()))?;
    if plan.is_empty() {
        return Ok(());
    }
    if plan.trap.is_some() && !install_trap_handler() {
        return Err(Errno::EPERM);
    }
    // SAFETY: the site is text of a loaded object (`find`) (1).
    let _w = unsafe { super::text::Writable::new(addr, site.len() as u64) }?;
    let armed = plan.trap.and_then(|e| arm(e, &text));
    if plan.trap.is_some() && armed.is_none() {
        return Err(Errno::EBUSY);
    }
    if let Some(r) = plan.resume {
        arm_resume(r, &text);
    }
    let mut result = Ok(());
    for step in plan.steps() {
        let dst = (addr + u64::from(step.offset)) as *mut u8;
        // SAFETY: the site's pages are writable (`_w`) (1); this is the plan's next
        // step, and the previous one's synchronisation has run (2); `TEXT` is held (3).
        if !unsafe { Native::store_text(dst, step.bytes.as_slice()) } {
            result = Err(Errno::EINVAL);
            break;
        }
        match step.sync {
            Sync::Round => sync(),
            Sync::Core => crate::stack::sync_core(SYNC_TIMEOUT),
        }
    }
    disarm_resume();
    if let Some(a) = armed {
        SITE_TRAPS.fetch_add(a.hits(), Ordering::Relaxed);
    }
    // A stack check that read the site while it was being written may have memoised
    // that a return address there does not follow a call.
    crate::stack::forget_code();
    result
}

// ------------------------------------------------------------------ resume rule

/// The [`Resume`] rule of the plan running now (`RESUME_FROM` 0: none).
static RESUME_FROM: AtomicU64 = AtomicU64::new(0);
static RESUME_END: AtomicU64 = AtomicU64::new(0);
static RESUME_TO: AtomicU64 = AtomicU64::new(0);

/// Arms the plan's resume rule, under `TEXT` (`_text`: one plan at a time).
fn arm_resume(r: Resume, _text: &TextGuard<'_>) {
    RESUME_END.store(r.end, Ordering::Release);
    RESUME_TO.store(r.to, Ordering::Release);
    RESUME_FROM.store(r.from, Ordering::SeqCst);
}

fn disarm_resume() {
    RESUME_FROM.store(0, Ordering::SeqCst);
}

/// The rule armed now, if any (what a round applies).
fn resume_rule() -> Option<Resume> {
    let from = RESUME_FROM.load(Ordering::SeqCst);
    (from != 0).then(|| Resume {
        from,
        end: RESUME_END.load(Ordering::Acquire),
        to: RESUME_TO.load(Ordering::Acquire),
    })
}

/// Applies the running plan's [`Resume`] rule to a thread interrupted by klp's
/// signal (called by its handler during every synchronisation round).
///
/// # Safety
///
/// 1. `uc` is the `ucontext_t` of an `SA_SIGINFO` handler on the interrupted thread.
pub(crate) unsafe fn on_sync(uc: *mut libc::c_void) {
    let Some(rule) = resume_rule() else {
        return;
    };
    // SAFETY: condition 1.
    let pc = unsafe { klp_arch::live::regs_from_ucontext::<Native>(uc) }.pc;
    if let Some(to) = rule.apply(pc) {
        // SAFETY: condition 1; the plan says a thread at `pc` may resume at `to`.
        unsafe { klp_arch::live::set_pc_in_ucontext::<Native>(uc, to) };
    }
}

// ------------------------------------------------------------------ trap table

/// How many traps may be armed at once (a site plan's, and a batch of call sites).
pub(crate) const TRAP_SLOTS: usize = 32;

/// One armed [`TrapEntry`]; `at` 0: free. The writer (under [`TEXT`]) stores the
/// other fields before `at` and clears `at` to disarm.
#[derive(Debug)]
struct TrapSlot {
    at: AtomicU64,
    pc: AtomicU64,
    /// The link value plus one (0: none).
    link: AtomicU64,
    /// The word to push plus one (0: none).
    push: AtomicU64,
    /// Threads sent on since the slot was armed.
    hits: AtomicU64,
}

static TRAPS: [TrapSlot; TRAP_SLOTS] = [const {
    TrapSlot {
        at: AtomicU64::new(0),
        pc: AtomicU64::new(0),
        link: AtomicU64::new(0),
        push: AtomicU64::new(0),
        hits: AtomicU64::new(0),
    }
}; TRAP_SLOTS];

/// Threads that reached the trap of a site being written and were sent on.
static SITE_TRAPS: AtomicU64 = AtomicU64::new(0);

/// How many threads reached the trap of a site while it was being written (x86_64's
/// breakpoint, s390x's operation exception) and were sent on, so far.
pub fn site_traps() -> u64 {
    SITE_TRAPS.load(Ordering::Relaxed)
}

/// klp's handler of the back-end's trap signal and the disposition it found.
static TRAP: super::TrapHandler = super::TrapHandler::new();

/// An armed trap; dropping it disarms it.
#[derive(Debug)]
pub(crate) struct ArmedTrap(&'static TrapSlot);

impl ArmedTrap {
    /// How many threads reached this trap and were sent on so far.
    pub(crate) fn hits(&self) -> u64 {
        self.0.hits.load(Ordering::Acquire)
    }
}

impl Drop for ArmedTrap {
    fn drop(&mut self) {
        self.0.at.store(0, Ordering::SeqCst);
    }
}

/// Arms `e` in a free slot (`TEXT` held by the caller, `_text`: the slots have one
/// writer); `None` when all are taken.
pub(crate) fn arm(e: TrapEntry, _text: &TextGuard<'_>) -> Option<ArmedTrap> {
    let slot = TRAPS.iter().find(|s| s.at.load(Ordering::Acquire) == 0)?;
    slot.pc.store(e.pc, Ordering::Release);
    slot.link
        .store(e.link.map_or(0, |l| l.wrapping_add(1)), Ordering::Release);
    slot.push
        .store(e.push.map_or(0, |p| p.wrapping_add(1)), Ordering::Release);
    slot.hits.store(0, Ordering::Release);
    slot.at.store(e.at, Ordering::SeqCst);
    Some(ArmedTrap(slot))
}

/// Installs the trap handler (once); returns whether it is installed. False on a
/// back-end whose plans use no trap.
pub(crate) fn install_trap_handler() -> bool {
    Native::TRAP_SIGNAL.is_some_and(|sig| TRAP.install(sig, on_trap))
}

/// The armed entry whose trap this signal is, read consistently, with its slot.
fn armed_entry(pc: u64, code: i32, addr: u64) -> Option<(&'static TrapSlot, TrapEntry)> {
    for s in &TRAPS {
        let at = s.at.load(Ordering::Acquire);
        if at == 0 || !Native::trapped_at(at, pc, code, addr) {
            continue;
        }
        let e = TrapEntry {
            at,
            pc: s.pc.load(Ordering::Acquire),
            link: s.link.load(Ordering::Acquire).checked_sub(1),
            push: s.push.load(Ordering::Acquire).checked_sub(1),
        };
        std::sync::atomic::fence(Ordering::Acquire);
        if s.at.load(Ordering::Relaxed) == at {
            return Some((s, e));
        }
    }
    None
}

/// A thread that reaches an armed trap resumes where its entry says (pushing its
/// return address, setting the link register). A thread that trapped on a trap
/// already replaced (it was not scheduled before the writer's round gave up waiting,
/// and the write finished meanwhile) runs the instruction there now. Any other signal
/// goes to the previous disposition. Async-signal-safe: atomics, the interrupted
/// context and the interrupted stack only.
extern "C" fn on_trap(sig: libc::c_int, info: *mut libc::siginfo_t, uc: *mut libc::c_void) {
    // SAFETY: with `SA_SIGINFO` the kernel passes the interrupted context, valid for
    // the duration of the handler (condition 1 of `regs_from_ucontext`).
    let regs = unsafe { klp_arch::live::regs_from_ucontext::<Native>(uc) };
    let (code, addr) = if info.is_null() {
        (0, 0)
    } else {
        // SAFETY: `info` is the handler's valid `siginfo_t`.
        unsafe { ((*info).si_code, (*info).si_addr() as u64) }
    };
    if let Some((slot, e)) = armed_entry(regs.pc, code, addr) {
        if let Some(v) = e.push {
            let sp = regs.sp.wrapping_sub(8);
            // SAFETY: the interrupted thread was about to execute the trapped call,
            // which stores its return address at exactly `sp - 8` of its own stack:
            // that word is the thread's writable stack and holds nothing live (below
            // the stack pointer of a thread about to push); the kernel put this
            // handler's frame below the red zone (or on the alternate stack), so the
            // store does not touch it. If the stack were not writable, the call would
            // have faulted the same way.
            unsafe { std::ptr::write_volatile(sp as *mut u64, v) };
            // SAFETY: the live frame of this handler; the thread resumes as after the
            // call's push.
            unsafe { klp_arch::live::set_sp_in_ucontext::<Native>(uc, sp) };
        }
        if let Some(l) = e.link {
            // SAFETY: the live frame of this handler.
            unsafe { klp_arch::live::set_trap_link_in_ucontext::<Native>(uc, l) };
        }
        // SAFETY: the live frame; the plan says the thread resumes there.
        unsafe { klp_arch::live::set_pc_in_ucontext::<Native>(uc, e.pc) };
        slot.hits.fetch_add(1, Ordering::Relaxed);
        return;
    }
    if let Some(at) = Native::trap_address(regs.pc, code, addr) {
        let trap = Native::TRAP_BYTES;
        let mut now = [0u8; 8];
        if let Some(buf) = now.get_mut(..trap.len()) {
            // SAFETY: the trap was fetched from `at`, so those bytes are mapped text
            // (readable: klp never maps text execute-only).
            unsafe { std::ptr::copy_nonoverlapping(at as *const u8, buf.as_mut_ptr(), buf.len()) };
            if !trap.is_empty() && buf != trap {
                // SAFETY: the live frame; the instruction at `at` is whole again.
                unsafe { klp_arch::live::set_pc_in_ucontext::<Native>(uc, at) };
                return;
            }
        }
    }
    TRAP.forward(sig, info, uc);
}

#[cfg(test)]
mod tests {
    use super::*;

    crate::patchable! {
        /// A site of this test binary, taken through every state.
        fn klp_sites_unit(x: u64) -> u64 {
            std::hint::black_box(x) + 1
        }
    }

    crate::patchable! {
        /// The site refused a jump (its own: tests run in parallel).
        fn klp_sites_unit_far(x: u64) -> u64 {
            std::hint::black_box(x) + 1
        }
    }

    extern "C" fn unit_v2(x: u64) -> u64 {
        std::hint::black_box(x) + 101
    }

    fn bytes_at(site: &Site) -> Vec<u8> {
        let g = TEXT.lock().unwrap_or_else(|e| e.into_inner());
        read_site(site, &g)
    }

    /// `find`, `body_of` and `set` on a real wrapper of this program, called in each
    /// state (one registered thread: a round is only counted).
    #[test]
    fn a_real_site_goes_through_its_states() {
        std::thread::spawn(|| {
            crate::thread::register_current();
            let f = klp_sites_unit as *const () as u64;
            let index = SymbolIndex::load();
            let site = find(&index, f).expect("the wrapper's site");
            let body = klp_sites_unit::body as *const () as u64;
            assert_eq!(body_of(&index, &site).map(|b| b.0), Some(body));
            let v2 = unit_v2 as *const () as u64;
            let steps = [
                (SiteState::Trampoline, 2),
                (SiteState::Jump(v2), 102),
                (SiteState::Trampoline, 2),
                (SiteState::Original, 2),
                (SiteState::Jump(v2), 102),
                (SiteState::Original, 2),
            ];
            for (to, result) in steps {
                set(&index, &site, to, &mut || ()).expect("set");
                assert_eq!(klp_sites_unit(1), result, "{to:?}");
                if to == SiteState::Original {
                    // Restored: the back-end sees its original state there (its plans'
                    // bytes are checked by hand in its own crate), and finds the site.
                    let ctx = PlanCtx {
                        addr: site.addr(),
                        stub: site.addr(),
                        trampoline: 0,
                    };
                    let back = Native::plan(&site, &bytes_at(&site), SiteState::Original, &ctx);
                    assert!(back.is_ok_and(|p| p.is_empty()), "restored");
                    assert_eq!(find(&index, f).map(|s| s.addr()), Some(site.addr()));
                }
                assert_eq!(resume_rule(), None, "disarmed");
            }
            let mut rounds = 0;
            set(&index, &site, SiteState::Original, &mut || rounds += 1).expect("set");
            assert_eq!(rounds, 0, "nothing to write");
            assert!(TRAPS.iter().all(|s| s.at.load(Ordering::Relaxed) == 0));
        })
        .join()
        .expect("thread");
    }

    #[test]
    fn an_unreachable_jump_writes_nothing() {
        std::thread::spawn(|| {
            crate::thread::register_current();
            let f = klp_sites_unit_far as *const () as u64;
            let index = SymbolIndex::load();
            let site = find(&index, f).expect("the site");
            let before = bytes_at(&site);
            let mut rounds = 0;
            // Far from every branch's reach, and no function of this program.
            let far = f ^ (1 << 46);
            assert_eq!(
                set(&index, &site, SiteState::Jump(far), &mut || rounds += 1),
                Err(Errno::ERANGE)
            );
            // Nothing written to the site (its stub may have been made, with its round).
            assert_eq!(bytes_at(&site), before);
            assert!(rounds <= 1, "{rounds} rounds");
        })
        .join()
        .expect("thread");
    }

    /// The record a fast entry path finds at the thread pointer plus the offset the
    /// host gave it.
    fn record_seen_by_fast_path(off: u64) -> u64 {
        let tp = Native::thread_pointer().expect("a thread pointer");
        // SAFETY: `tp + off` is this thread's `CURRENT` cell (the offset the fast path
        // was enabled with); a read only.
        unsafe { std::ptr::read_volatile((tp.wrapping_add(off)) as *const u64) }
    }

    #[test]
    fn the_fast_path_finds_each_threads_record() {
        if Native::thread_pointer().is_none() {
            return;
        }
        assert!(fast_path_ready(), "klp-user is part of the test executable");
        let tp = Native::thread_pointer().expect("a thread pointer");
        let off = crate::thread::current_cell().wrapping_sub(tp);
        let here = std::thread::spawn(move || {
            let before = record_seen_by_fast_path(off);
            let rec = crate::thread::register_current();
            (
                before,
                record_seen_by_fast_path(off),
                std::sync::Arc::as_ptr(&rec) as u64,
            )
        });
        let (before, after, rec) = here.join().expect("thread");
        assert_eq!(after, rec);
        assert!(before == 0 || before == rec, "{before:#x}");
        assert_eq!(
            record_seen_by_fast_path(off),
            crate::thread::current_raw() as u64
        );
    }

    #[test]
    fn the_slot_holds_the_decision_for_each_state() {
        // What a fast entry path reads; a stub-entered call of a real site is covered
        // by the redirect and consistency tests.
        let site = 0x7777_0000_5000;
        let v = klp::RedirectView {
            top: klp::Target::Func(0x2000),
            top_transition: true,
            below: klp::Target::Func(0x1000),
        };
        assert!(super::super::publish(site, Some(v)));
        let slot = super::super::slot_addr(site).expect("slot");
        let at = |st: klp::PatchState| {
            let i = crate::thread::state_index(st) as u64;
            let a = slot + klp_arch::live::fast::SLOT_BY_STATE as u64 + 8 * i;
            // SAFETY: `a` is an answer word of a slot of the static table.
            unsafe { &*(a as *const AtomicU64) }.load(Ordering::Relaxed)
        };
        assert_eq!(at(klp::PatchState::Unpatched), 0x1000);
        assert_eq!(at(klp::PatchState::Patched), 0x2000);
        assert_eq!(
            at(klp::PatchState::Idle),
            klp_arch::live::fast::SLOW,
            "an anomaly: slow path"
        );
        super::super::publish(
            site,
            Some(klp::RedirectView {
                top_transition: false,
                below: klp::Target::Original,
                ..v
            }),
        );
        for st in [
            klp::PatchState::Idle,
            klp::PatchState::Unpatched,
            klp::PatchState::Patched,
        ] {
            assert_eq!(at(st), 0x2000, "steady: the top for {st:?}");
        }
        super::super::publish(site, None);
        assert_eq!(at(klp::PatchState::Patched), 0, "no record: the original");
    }

    #[test]
    fn the_resume_rule_moves_only_threads_in_its_range() {
        let g = TEXT.lock().unwrap_or_else(|e| e.into_inner());
        arm_resume(
            Resume {
                from: 0x1004,
                end: 0x1008,
                to: 0x1000,
            },
            &g,
        );
        let rule = resume_rule().expect("armed");
        assert_eq!(rule.apply(0x1004), Some(0x1000));
        assert_eq!(rule.apply(0x1008), None);
        disarm_resume();
        assert_eq!(resume_rule(), None);
    }

    #[test]
    fn traps_are_armed_and_disarmed() {
        let g = TEXT.lock().unwrap_or_else(|e| e.into_inner());
        let a = arm(
            TrapEntry {
                at: 0x7777_0000_9000,
                pc: 0x42,
                link: Some(7),
                push: None,
            },
            &g,
        )
        .expect("a slot");
        let taken = TRAPS
            .iter()
            .find(|s| s.at.load(Ordering::Relaxed) == 0x7777_0000_9000)
            .expect("armed");
        assert_eq!(taken.link.load(Ordering::Relaxed), 8);
        assert_eq!(taken.push.load(Ordering::Relaxed), 0);
        drop(a);
        assert!(
            TRAPS
                .iter()
                .all(|s| s.at.load(Ordering::Relaxed) != 0x7777_0000_9000)
        );
    }
}
