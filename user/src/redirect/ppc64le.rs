//! ppc64le (ELFv2): patchable wrappers, site recognition and text writes.
//!
//! ## The wrapper
//!
//! A naked function has no global entry of its own, so the wrapper writes one: the
//! TOC setup from r12, then `.localentry` (the symbol's `st_other` says "local entry
//! at +8"), then the site at the local entry and a tail branch to the body:
//!
//! ```text
//! name:     addis r2,r12,.TOC.-name@ha    <- global entry (callers from other objects,
//!           addi  r2,r2,.TOC.-name@l          calls through pointers: r12 = name)
//! name+8:   nop                           <- local entry = the site (callers in this
//!           nop                               object: r2 is already this TOC)
//!           b     name::body+8            <- the linker picks the body's local entry
//! ```
//!
//! Every call passes the site, whichever entry it uses, and the body always runs with
//! this object's TOC. The unit tests check both entries, a caller with another r2, and
//! the `b` to the body's local entry.
//!
//! ## Site states
//!
//! The site is the two words at the local entry (`S`), in one of two forms: the
//! wrapper's `nop; nop` ([`psite::form::NOPS`]), or the `mflr r0; bl _mcount` of C
//! built with `-pg -mprofile-kernel` ([`psite::form::PROFILE_KERNEL`], the kernel's
//! site; gcc 12 places `-fpatchable-function-entry` nops before the global entry's TOC
//! setup, where local calls skip them). In its original state such a site calls
//! `_mcount` with the `-mprofile-kernel` convention (r0 = the caller's return address;
//! `_mcount` must return to `S + 8` with LR = r0), which glibc's `_mcount` does not
//! follow: the C code must link a no-op of its own, as the kernel's
//! (`mflr r12; mtctr r12; mtlr r0; bctr`), hidden in a shared object so that the `bl`
//! needs no PLT stub (the test library's `cfuncs.c` has one).
//!
//! | state | word 0 (`S`) | word 1 (`S + 4`) |
//! |---|---|---|
//! | original | `nop` / `mflr r0` | `nop` / `bl _mcount` |
//! | trampoline | `mflr r0` | `bl stub`; the site's stub ([`super::stubs`]) jumps to `entry_trampoline` ([`klp_arch_ppc64le::live::trampoline`]) through CTR |
//! | jump | `b T_local` | `bl stub` (never reached) |
//!
//! `T_local` is `T` plus the local-entry offset of `T`'s `st_other`. A jump is only
//! written when `T` shares the site's TOC (same object, not a "caller-saved r2"
//! function) and is within ±32 MiB of `S`; otherwise `set` fails with `ERANGE` and the
//! trampoline stays (the host's rule). The `bl` reaches ±32 MiB too, hence the stub
//! within that reach, wherever the trampoline is. The word the trampoline's decision
//! returns carries the trampoline's other-TOC tag when `T` lives in another object
//! ([`published_target`]).
//!
//! A tagged target is called from the trampoline's detour frame, which keeps the
//! caller's r2 and return address: such a `T` must take no stack arguments and no
//! variable arguments (see the trampoline's documentation). An object is assumed to
//! have one TOC (no linker `--multi-toc` groups), so "same object" means "same TOC".
//!
//! ## Write protocol
//!
//! Each step is one aligned 4-byte store (single-copy atomic for instruction fetch),
//! the cache sequence `dcbst; sync; icbi; sync; isync`, then a synchronisation round
//! (every thread takes a signal: a context-synchronising event after which it fetches
//! the new word). One lock serialises text writes; the pages are RWX during the write,
//! RX after. The steps:
//!
//! | from → to | stores in order |
//! |---|---|
//! | original → trampoline | w0 = `mflr r0`; w1 = `bl stub` |
//! | trampoline → original | w1 = original; w0 = original |
//! | trampoline → jump, jump → jump | w0 = `b T` |
//! | jump → trampoline | w0 = `mflr r0` |
//! | original → jump | via trampoline |
//! | jump → original | via trampoline |
//!
//! A store of the word already there is skipped (a `-mprofile-kernel` site keeps its
//! `mflr r0`, so only its `bl` changes between `_mcount` and the stub). A site's stub
//! is made (with a round of its own) before any site branches to it.
//!
//! Why every intermediate pair is safe (a thread may execute word 0 of one state and
//! word 1 of the next):
//! * `(mflr, nop)`: the original body runs (r0 is a volatile non-argument register);
//!   `(mflr, bl _mcount)` too, through the no-op.
//! * `(nop, bl)` never exists: a thread would call the trampoline with a stale r0 (not
//!   its return address). `bl` is written only after `mflr` and a round; during every
//!   round of a write [`on_sync`] moves a thread stopped at `S + 4` back to `S`, so a
//!   thread that ran the old word 0 runs the current one instead (every word 0 may be
//!   run again from `S`: `nop` and `mflr r0` change no live register, LR is still the
//!   caller's return address, and `b T` enters `T` as a direct call would). Removal
//!   writes `nop` over `bl` first.
//! * `(b T, bl)`: `b` skips word 1; a thread past an old `mflr` calls the trampoline,
//!   whose decision is right in every state (the view is published before the site
//!   changes).
//!
//! Not covered (as on x86_64): a thread that does not take klp's signal, and a thread
//! interrupted at `S + 4` by another signal whose handler is running during the round.

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

use klp::Errno;
use klp::arch::{Arch, FuncInfo, Redirect, Site, SiteForm};
use klp_arch::{Endian, read_u32};
use klp_arch_ppc64le::live::trampoline;
use klp_arch_ppc64le::{Ppc64le, insn, site as psite};

use super::SiteState;
use crate::symbols::SymbolIndex;

/// The wrapper of [`crate::patchable!`] on ppc64le: a global entry that sets up the
/// TOC from r12, the site (`nop; nop`) at the local entry, then a tail branch to the
/// body.
#[doc(hidden)]
#[macro_export]
macro_rules! __patchable_wrapper {
    ($(#[$m:meta])* $vis:vis fn $name:ident($($arg:ident : $ty:ty),*) $(-> $ret:ty)?) => {
        $(#[$m])*
        #[unsafe(no_mangle)]
        #[unsafe(naked)]
        $vis extern "C" fn $name($($arg: $ty),*) $(-> $ret)? {
            ::core::arch::naked_asm!(
                "0:",
                "addis 2, 12, (.TOC.-0b)@ha",
                "addi 2, 2, (.TOC.-0b)@l",
                ::core::concat!(".localentry ", ::core::stringify!($name), ", .-0b"),
                "nop",
                "nop",
                "b {body}",
                body = sym $name::body,
            )
        }
    };
}

/// Serialises text writes.
static TEXT: Mutex<()> = Mutex::new(());

/// The site being written (0: none); read by [`on_sync`].
static PATCHING: AtomicU64 = AtomicU64::new(0);

/// The local entries of the targets [`published_target`] found in the site's own
/// object (same TOC): `(site, target) → target's local entry`. What `set` may jump to.
static SAME_TOC: Mutex<BTreeMap<(u64, u64), u64>> = Mutex::new(BTreeMap::new());

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// The ELFv2 local-entry field of `st_other` (bits 5–7).
fn local_field(st_other: u8) -> u8 {
    st_other >> 5
}

/// Writes new text and makes it visible to instruction fetch (for the patch loader).
pub(crate) const WRITE_TEXT: Option<unsafe fn(*mut u8, &[u8])> =
    Some(klp_arch_ppc64le::live::write_text);

/// The site at the local entry of the function that starts at `addr` (a function
/// symbol of the index whose local entry holds two nops).
pub(crate) fn find(index: &SymbolIndex, addr: u64) -> Option<Site> {
    let (_, sym) = index.lookup(addr)?;
    if sym.addr != addr || !sym.func {
        return None;
    }
    let off = psite::local_entry_offset(sym.st_other)?;
    let len = off + psite::LEN as u64;
    if sym.size < len || !index.is_text(addr) || !index.is_text(addr + len - 1) {
        return None;
    }
    // SAFETY: `addr..addr + len` lies in an executable (hence mapped and readable)
    // segment of a loaded object, inside the function's symbol.
    let code = unsafe { std::slice::from_raw_parts(addr as *const u8, len as usize) };
    let func = FuncInfo {
        addr,
        st_other: sym.st_other,
    };
    let site = Ppc64le::find_site(code, func).ok()?;
    match site.form {
        SiteForm {
            code: psite::form::NOPS,
            ..
        } => Some(site),
        // A site in its trampoline state has the same shape, but calls a stub, which
        // no symbol names.
        SiteForm {
            code: psite::form::PROFILE_KERNEL,
            target: mcount,
            ..
        } => index
            .lookup(mcount)
            .is_some_and(|(_, m)| m.func && m.addr == mcount)
            .then_some(site),
        _ => None,
    }
}

/// The body a `patchable!` wrapper branches to: the `b` right after the site, which
/// targets the body's local entry.
pub(crate) fn body_of(index: &SymbolIndex, site: &Site) -> Option<(u64, u64)> {
    let at = site.addr() + psite::LEN as u64;
    let size = index.size_of(site.func.addr)?;
    if size < (at - site.func.addr) + 4 || !index.is_text(at) {
        return None;
    }
    // SAFETY: `at..at + 4` is in an executable segment, inside the wrapper's symbol
    // (checked above); it is 4-aligned like every instruction.
    let w = unsafe { (at as *const u32).read() };
    let w = u32::from_le(w);
    if w & !insn::LI_MASK != insn::B {
        return None;
    }
    let target = insn::branch_target(w, at)?;
    let (_, s) = index.lookup(target)?;
    let local = s.addr + psite::local_entry_offset(s.st_other)?;
    (target == local).then_some((s.addr, s.addr + s.size.max(1)))
}

/// The words of the trampoline state: `mflr r0; bl stub`, the site's stub made if it
/// does not exist yet (`TEXT` held by the caller).
fn call_words(site: &Site, sync: &mut dyn FnMut()) -> Result<[u32; 2], Errno> {
    let from = site.addr() + 4;
    // SAFETY: `TEXT` is held by the caller (1); `write_text` copies and does the cache
    // maintenance (2).
    let stub = unsafe {
        super::stubs::stub_for(
            site.addr(),
            &trampoline::stub_bytes(),
            &|a| insn::bl(from, a).is_ok(),
            klp_arch_ppc64le::live::write_text,
            sync,
        )
    }?;
    let b = Ppc64le::encode_redirect(site, Redirect::call(stub)).map_err(|_| Errno::ERANGE)?;
    words(b.as_slice()).ok_or(Errno::EINVAL)
}

fn words(b: &[u8]) -> Option<[u32; 2]> {
    Some([
        read_u32(b, 0, Endian::Little)?,
        read_u32(b, 4, Endian::Little)?,
    ])
}

/// The `b` to the local entry of `target` (recorded by [`published_target`]), or
/// `ERANGE` when `target` has another TOC, is unknown, or is out of reach.
fn jump_word(site: &Site, target: u64) -> Result<u32, Errno> {
    let local = lock(&SAME_TOC)
        .get(&(site.addr(), target))
        .copied()
        .ok_or(Errno::ERANGE)?;
    let b = Ppc64le::encode_redirect(site, Redirect::jump(local)).map_err(|_| Errno::ERANGE)?;
    read_u32(b.as_slice(), 0, Endian::Little).ok_or(Errno::EINVAL)
}

/// Whether the site's words are those of `state`.
fn holds(now: [u32; 2], state: SiteState, orig: [u32; 2], call: [u32; 2]) -> bool {
    match state {
        SiteState::Original => now == orig,
        SiteState::Trampoline => now == call,
        SiteState::Jump(_) => now[0] & !insn::LI_MASK == insn::B && now[1] == call[1],
    }
}

/// Rewrites `site` from state `from` to state `to` (see the module documentation).
/// `sync` runs a synchronisation round. Fails (nothing written to the site) with
/// `ERANGE` when `to` cannot be encoded at this site (a jump out of reach or to another
/// TOC, no stub page within reach), `EINVAL` when the site does not hold `from`,
/// `EPERM` when its page cannot be made writable.
pub(crate) fn set(
    site: &Site,
    from: SiteState,
    to: SiteState,
    sync: &mut dyn FnMut(),
) -> Result<(), Errno> {
    if from == to {
        return Ok(());
    }
    let orig = words(site.original.as_slice()).ok_or(Errno::EINVAL)?;
    // A refused jump costs nothing: checked before the stub is made.
    let jump = match to {
        SiteState::Jump(t) => jump_word(site, t)?,
        _ => 0,
    };
    let _g = lock(&TEXT);
    let call = call_words(site, sync)?;
    let [mflr, bl] = call;
    let mut steps: Vec<(u64, u32)> = Vec::with_capacity(3);
    let mut via = |s: SiteState, to: SiteState| match (s, to) {
        (SiteState::Original, SiteState::Trampoline) => steps.extend([(0, mflr), (4, bl)]),
        (SiteState::Trampoline, SiteState::Original) => {
            steps.extend([(4, orig[1]), (0, orig[0])]);
        }
        (_, SiteState::Jump(_)) => steps.push((0, jump)),
        (SiteState::Jump(_), SiteState::Trampoline) => steps.push((0, mflr)),
        _ => {}
    };
    match (from, to) {
        (SiteState::Original, SiteState::Jump(_)) | (SiteState::Jump(_), SiteState::Original) => {
            via(from, SiteState::Trampoline);
            via(SiteState::Trampoline, to);
        }
        _ => via(from, to),
    }
    trampoline::set_decision(super::decide_entry);
    write(site, &steps, |now| holds(now, from, orig, call), sync)
}

/// Performs `steps` (offset from the site, word) with a round after each, skipping a
/// store of the word already there, if the site holds what `expect` accepts (else
/// `EINVAL`, nothing written). `TEXT` is held by the caller.
fn write(
    site: &Site,
    steps: &[(u64, u32)],
    expect: impl Fn([u32; 2]) -> bool,
    sync: &mut dyn FnMut(),
) -> Result<(), Errno> {
    let addr = site.addr();
    // SAFETY: the site's 8 bytes were read when it was found; its object is loaded
    // (sites are dropped before their object is unloaded). Aligned word reads.
    let now = unsafe {
        [
            u32::from_le((addr as *const u32).read_volatile()),
            u32::from_le(((addr + 4) as *const u32).read_volatile()),
        ]
    };
    if !expect(now) {
        return Err(Errno::EINVAL);
    }
    let mut mem = now;
    let steps: Vec<(u64, u32)> = steps
        .iter()
        .copied()
        .filter(|&(off, w)| match mem.get_mut((off / 4) as usize) {
            Some(m) if *m != w => {
                *m = w;
                true
            }
            _ => false,
        })
        .collect();
    if steps.is_empty() {
        return Ok(());
    }
    // SAFETY: the site is text of a loaded object (`find`) (1).
    let _w = unsafe { super::text::Writable::new(addr, psite::LEN as u64) }?;
    PATCHING.store(addr, Ordering::SeqCst);
    for &(off, word) in &steps {
        // SAFETY: the word is mapped and writable now, 4-aligned (1); the order of the
        // steps and the rounds keep every state a thread can see safe to execute (the
        // module documentation), and `TEXT` serialises text writes (2).
        unsafe { trampoline::write_word((addr + off) as *mut u8, word) };
        sync();
    }
    PATCHING.store(0, Ordering::SeqCst);
    Ok(())
}

/// While a site is written, a thread stopped at `S + 4` goes back to `S`: it may have
/// run the old word 0, and word 1 may become a `bl` that needs the new one (module
/// documentation). Re-running word 0 is harmless in every state.
///
/// # Safety
///
/// 1. `uc` is the `ucontext_t` of an `SA_SIGINFO` handler on the interrupted thread.
pub(crate) unsafe fn on_sync(uc: *mut libc::c_void) {
    let site = PATCHING.load(Ordering::SeqCst);
    if site == 0 {
        return;
    }
    // SAFETY: condition 1.
    let ctx = unsafe { &mut *(uc as *mut libc::ucontext_t) };
    if let Some(pc) = ctx.uc_mcontext.gp_regs.get_mut(NIP)
        && *pc == site + 4
    {
        *pc = site;
    }
}

/// Index of the program counter in `gp_regs` (`PT_NIP`).
const NIP: usize = 32;

/// The word the trampoline's decision returns for `target` at `site`: `target` when it
/// shares the site's TOC (same object, and its `st_other` does not mark r2 as
/// caller-saved), else `target | OTHER_TOC`, which makes the trampoline keep the
/// caller's r2 and return address around the call. A same-TOC target that starts a
/// symbol is also recorded with its local entry, for `set`'s jumps.
pub(crate) fn published_target(index: &SymbolIndex, site: u64, target: u64) -> u64 {
    let (Some((so, _)), Some((to, ts))) = (index.lookup(site), index.lookup(target)) else {
        return target | trampoline::OTHER_TOC;
    };
    let at_symbol = ts.addr == target;
    if !std::ptr::eq(so, to) || (at_symbol && local_field(ts.st_other) == 1) {
        return target | trampoline::OTHER_TOC;
    }
    if at_symbol && let Some(off) = psite::local_entry_offset(ts.st_other) {
        lock(&SAME_TOC).insert((site, target), target + off);
    }
    target
}

#[cfg(test)]
mod tests {
    use super::*;

    static SEEN: AtomicU64 = AtomicU64::new(0);

    crate::patchable! {
        /// Reads a static (through the TOC), so a wrong r2 shows.
        pub fn klp_ppc64le_redirect_probe(x: u64) -> u64 {
            SEEN.fetch_add(1, Ordering::Relaxed);
            x + 1
        }
    }

    crate::patchable! {
        /// Patched by the state walk below.
        pub fn klp_ppc64le_redirect_walk(x: u64) -> u64 {
            std::hint::black_box(x) + 1
        }
    }

    crate::patchable! {
        /// Refused jumps.
        pub fn klp_ppc64le_redirect_refuse(x: u64) -> u64 {
            std::hint::black_box(x) + 1
        }
    }

    extern "C" fn walk_v2(x: u64) -> u64 {
        std::hint::black_box(x) + 101
    }

    extern "C" fn walk_v3(x: u64) -> u64 {
        std::hint::black_box(x) + 1001
    }

    fn addr(f: *const ()) -> u64 {
        f as u64
    }

    fn site_words(f: u64) -> [u32; 2] {
        // SAFETY: `f` is a wrapper of this program: its 16 bytes are mapped text.
        unsafe {
            [
                u32::from_le(((f + 8) as *const u32).read_volatile()),
                u32::from_le(((f + 12) as *const u32).read_volatile()),
            ]
        }
    }

    /// Calls `f` at its global entry the way a caller in another object does: r12 = `f`,
    /// r2 = that caller's TOC (here a junk value), restoring its own r2 afterwards.
    #[unsafe(naked)]
    extern "C" fn call_from_other_toc(_f: u64, _x: u64) -> u64 {
        core::arch::naked_asm!(
            "mflr 0",
            "std 0, 16(1)",
            "stdu 1, -32(1)",
            "std 2, 24(1)",
            "mtctr 3",
            "mr 12, 3",
            "mr 3, 4",
            "li 2, 0x1230",
            "bctrl",
            "ld 2, 24(1)",
            "addi 1, 1, 32",
            "ld 0, 16(1)",
            "mtlr 0",
            "blr",
        )
    }

    #[test]
    fn the_wrapper_has_a_global_entry_a_site_and_a_branch_to_the_body() {
        let index = SymbolIndex::load();
        let f = addr(klp_ppc64le_redirect_probe as *const ());
        let (_, sym) = index.lookup(f).expect("indexed");
        assert_eq!(local_field(sym.st_other), 3, ".localentry at +8");
        // SAFETY: the wrapper's first words are mapped text.
        let w = unsafe { [(f as *const u32).read(), ((f + 4) as *const u32).read()] };
        assert_eq!(w[0] & 0xffff_0000, insn::ADDIS_R2_R12);
        assert_eq!(w[1] & 0xffff_0000, insn::ADDI_R2_R2);
        assert_eq!(site_words(f), [insn::NOP, insn::NOP]);
        let site = find(&index, f).expect("a site");
        assert_eq!(
            (site.addr(), site.form),
            (f + 8, SiteForm::new(psite::form::NOPS))
        );
        let body = addr(klp_ppc64le_redirect_probe::body as *const ());
        let (start, end) = body_of(&index, &site).expect("the body");
        assert_eq!(start, body);
        assert!(end > start);
        assert!(find(&index, f + 8).is_none(), "not a symbol start");
    }

    #[test]
    fn both_entries_reach_the_body_with_this_objects_toc() {
        let before = SEEN.load(Ordering::Relaxed);
        assert_eq!(klp_ppc64le_redirect_probe(1), 2, "a local call");
        let f = addr(klp_ppc64le_redirect_probe as *const ());
        assert_eq!(call_from_other_toc(f, 41), 42, "global entry, foreign r2");
        assert!(SEEN.load(Ordering::Relaxed) >= before + 2);
    }

    #[test]
    fn targets_in_another_object_are_tagged() {
        let index = SymbolIndex::load();
        let site = addr(klp_ppc64le_redirect_walk as *const ()) + 8;
        let v2 = addr(walk_v2 as *const ());
        assert_eq!(published_target(&index, site, v2), v2);
        let getpid = libc::getpid as *const () as u64;
        assert_eq!(
            published_target(&index, site, getpid),
            getpid | trampoline::OTHER_TOC,
            "libc has its own TOC"
        );
        assert_eq!(published_target(&index, site, 0), trampoline::OTHER_TOC);
    }

    #[test]
    fn on_sync_moves_a_thread_at_the_second_word_back() {
        let _g = lock(&TEXT);
        // SAFETY: an all-zero `ucontext_t` is a valid value of the type.
        let mut uc: libc::ucontext_t = unsafe { std::mem::zeroed() };
        let site = 0x1000_0008;
        let p = &mut uc as *mut libc::ucontext_t as *mut libc::c_void;
        for (pc, patching, after) in [
            (site + 4, site, site),
            (site, site, site),
            (site + 8, site, site + 8),
            (site + 4, 0, site + 4),
        ] {
            uc.uc_mcontext.gp_regs[NIP] = pc;
            PATCHING.store(patching, Ordering::SeqCst);
            // SAFETY: `p` points to a ucontext_t (only the pc slot is used).
            unsafe { on_sync(p) };
            assert_eq!(uc.uc_mcontext.gp_regs[NIP], after, "pc {pc:#x}");
        }
        PATCHING.store(0, Ordering::SeqCst);
    }

    /// Original → trampoline → jump → another jump → trampoline → original, and the
    /// shortcuts: the words every synchronisation round sees (the order of the stores),
    /// and the function's result in every state.
    #[test]
    fn every_state_and_transition() {
        use SiteState::{Jump, Original, Trampoline};
        let index = SymbolIndex::load();
        let f = addr(klp_ppc64le_redirect_walk as *const ());
        let site = find(&index, f).expect("a site");
        let (v2, v3) = (addr(walk_v2 as *const ()), addr(walk_v3 as *const ()));
        let seen = std::cell::RefCell::new(Vec::new());
        let mut sync = || seen.borrow_mut().push(site_words(f));
        let b = |t: u64| {
            let (_, sym) = index.lookup(t).expect("indexed");
            let local = t + psite::local_entry_offset(sym.st_other).expect("offset");
            insn::b(f + 8, local).expect("in reach")
        };
        let (nop, mflr) = (insn::NOP, insn::MFLR_R0);

        // Refused, nothing written: the target is not published yet, then the site
        // does not hold the state `set` is told it holds.
        assert_eq!(
            set(&site, Trampoline, Jump(v2), &mut sync),
            Err(Errno::ERANGE)
        );
        assert_eq!(published_target(&index, site.addr(), v2), v2);
        assert_eq!(published_target(&index, site.addr(), v3), v3);
        assert_eq!(
            set(&site, Trampoline, Jump(v2), &mut sync),
            Err(Errno::EINVAL)
        );
        assert_eq!(site_words(f), [nop, nop]);
        // The second call made the site's stub (one round), nothing else.
        assert_eq!(*seen.borrow(), [[nop, nop]]);
        let bl = stub_call(&site)[1];
        assert!(bl >> 26 == 18 && bl & 3 == 1, "bl: {bl:#x}");

        type Step = (SiteState, SiteState, Vec<[u32; 2]>, u64);
        let steps: [Step; 8] = [
            (Original, Trampoline, vec![[mflr, nop], [mflr, bl]], 2),
            (Trampoline, Jump(v2), vec![[b(v2), bl]], 102),
            (Jump(v2), Jump(v3), vec![[b(v3), bl]], 1002),
            (Jump(v3), Trampoline, vec![[mflr, bl]], 2),
            (Trampoline, Original, vec![[mflr, nop], [nop, nop]], 2),
            (
                Original,
                Jump(v2),
                vec![[mflr, nop], [mflr, bl], [b(v2), bl]],
                102,
            ),
            (
                Jump(v2),
                Original,
                vec![[mflr, bl], [mflr, nop], [nop, nop]],
                2,
            ),
            (Original, Original, vec![], 2),
        ];
        for (from, to, rounds, result) in steps {
            seen.borrow_mut().clear();
            set(&site, from, to, &mut sync).expect("set");
            assert_eq!(*seen.borrow(), rounds, "{from:?} -> {to:?}");
            // No view is published for this site: the trampoline runs the original.
            assert_eq!(klp_ppc64le_redirect_walk(1), result, "{to:?}");
        }
        assert_eq!(site_words(f), [nop, nop]);
    }

    /// The trampoline words of `site` (its stub exists already or is made here), after
    /// checking that the `bl` goes to a stub of the trampoline.
    fn stub_call(site: &Site) -> [u32; 2] {
        let call = {
            let _g = lock(&TEXT);
            call_words(site, &mut || {}).expect("stub")
        };
        let stub = insn::branch_target(call[1], site.addr() + 4).expect("bl");
        // SAFETY: the stub's bytes are mapped text.
        let bytes = unsafe { std::ptr::read_volatile(stub as *const [u8; 32]) };
        assert_eq!(bytes, trampoline::stub_bytes(), "bl to the site's stub");
        call
    }

    fn mcount_calls() -> u64 {
        MCOUNT.load(Ordering::Relaxed)
    }

    static MCOUNT: AtomicU64 = AtomicU64::new(0);

    /// An `_mcount` of the `-mprofile-kernel` convention that counts its calls: back
    /// to the function (LR) with LR = r0 (the caller's return address).
    #[unsafe(naked)]
    extern "C" fn unit_mcount() {
        core::arch::naked_asm!(
            "0:",
            "addis 11, 2, {n}@toc@ha",
            "addi 11, 11, {n}@toc@l",
            "1: ldarx 12, 0, 11",
            "addi 12, 12, 1",
            "stdcx. 12, 0, 11",
            "bne- 1b",
            "mflr 12",
            "mtctr 12",
            "mtlr 0",
            "bctr",
            n = sym MCOUNT,
        )
    }

    /// The shape gcc gives a C function with `-pg -mprofile-kernel`: TOC setup,
    /// `mflr r0; bl _mcount` at the local entry, then the body (here a branch to it).
    #[unsafe(naked)]
    #[unsafe(no_mangle)]
    extern "C" fn klp_ppc64le_unit_pk(_x: u64) -> u64 {
        core::arch::naked_asm!(
            "0:",
            "addis 2, 12, (.TOC.-0b)@ha",
            "addi 2, 2, (.TOC.-0b)@l",
            ".localentry klp_ppc64le_unit_pk, .-0b",
            "mflr 0",
            "bl {mcount}",
            "b {body}",
            mcount = sym unit_mcount,
            body = sym pk_body,
        )
    }

    extern "C" fn pk_body(x: u64) -> u64 {
        std::hint::black_box(x) + 1
    }

    extern "C" fn pk_v2(x: u64) -> u64 {
        std::hint::black_box(x) + 101
    }

    /// A `-mprofile-kernel` site: recognised (not in its trampoline state), its
    /// `mflr r0` kept in every state but the jump, its `bl` switched between `_mcount`
    /// and the stub.
    #[test]
    fn a_profile_kernel_site() {
        use SiteState::{Jump, Original, Trampoline};
        let index = SymbolIndex::load();
        let f = addr(klp_ppc64le_unit_pk as *const ());
        let site = find(&index, f).expect("a site");
        let mcount = addr(unit_mcount as *const ());
        assert_eq!(site.addr(), f + 8);
        assert_eq!(
            site.form,
            SiteForm::new(psite::form::PROFILE_KERNEL).calling(mcount)
        );
        let orig = site_words(f);
        assert_eq!(orig[0], insn::MFLR_R0);
        let before = mcount_calls();
        assert_eq!(klp_ppc64le_unit_pk(1), 2);
        assert_eq!(mcount_calls(), before + 1, "the original calls _mcount");
        let v2 = addr(pk_v2 as *const ());
        assert_eq!(published_target(&index, site.addr(), v2), v2);
        let seen = std::cell::RefCell::new(Vec::new());
        let mut sync = || seen.borrow_mut().push(site_words(f));
        set(&site, Original, Trampoline, &mut sync).expect("set");
        let call = stub_call(&site);
        assert_eq!(call[0], insn::MFLR_R0);
        // The stub's round, then one store: the `bl`.
        assert_eq!(*seen.borrow(), [orig, call]);
        assert!(find(&index, f).is_none(), "a `bl` to a stub is not a site");
        assert_eq!(klp_ppc64le_unit_pk(1), 2, "no view: the original");
        set(&site, Trampoline, Jump(v2), &mut sync).expect("set");
        assert_eq!(klp_ppc64le_unit_pk(1), 102);
        seen.borrow_mut().clear();
        set(&site, Jump(v2), Original, &mut sync).expect("set");
        assert_eq!(*seen.borrow(), [call, orig]);
        let before = mcount_calls();
        assert_eq!(klp_ppc64le_unit_pk(1), 2);
        assert_eq!(mcount_calls(), before + 1);
    }

    #[test]
    fn refused_jumps_leave_the_site_alone() {
        let index = SymbolIndex::load();
        let f = addr(klp_ppc64le_redirect_refuse as *const ());
        let site = find(&index, f).expect("a site");
        let mut sync = || {};
        let getpid = libc::getpid as *const () as u64;
        published_target(&index, site.addr(), getpid);
        set(&site, SiteState::Original, SiteState::Trampoline, &mut sync).expect("set");
        let before = site_words(f);
        for t in [getpid, f + 0x1234] {
            assert_eq!(
                set(&site, SiteState::Trampoline, SiteState::Jump(t), &mut sync),
                Err(Errno::ERANGE)
            );
            assert_eq!(site_words(f), before);
        }
        assert_eq!(
            set(&site, SiteState::Original, SiteState::Trampoline, &mut sync),
            Err(Errno::EINVAL),
            "the site is not in its original state"
        );
        set(&site, SiteState::Trampoline, SiteState::Original, &mut sync).expect("set");
        assert_eq!(site_words(f), [insn::NOP, insn::NOP]);
        assert_eq!(klp_ppc64le_redirect_refuse(1), 2);
    }
}

/// No fast entry path on this architecture: every stub enters the trampoline.
pub(crate) const FAST_ENTRY: Option<unsafe extern "C" fn()> = None;
