//! aarch64: patchable wrappers, site recognition and text writes.
//!
//! A site is two aligned words `w0 w1` at a patchable entry: the wrapper's
//! `mov x9, x30; nop` (the form the kernel's ftrace leaves after boot), or the
//! `nop; nop` of C built with `-fpatchable-function-entry=2` (possibly after a `bti c`
//! that stays untouched). Its states:
//!
//! | state | `w0` | `w1` |
//! |---|---|---|
//! | original | as found (`mov x9, x30`, or `nop` until the first install) | `nop` |
//! | trampoline | `mov x9, x30` | `bl stub`; the site's stub ([`super::stubs`]) jumps to `entry_trampoline` ([`klp_arch_aarch64::live::trampoline`]) through `x16` |
//! | jump | `mov x9, x30` | `b new_function` (only within ±128 MiB of `w1`) |
//!
//! What a thread does with the words it fetched: `mov x9, x30` (or the original
//! `nop`) then `nop` is the original function (`x9` is a temporary, dead at a
//! function's entry); then `b T` goes to `T` with `x30` still the caller's return
//! address (a direct call of `T`, whatever `x9` holds); then `bl` enters the
//! trampoline, which expects the caller's return address in `x9`. The one bad
//! combination is a `nop` in `w0` followed by the `bl`: the trampoline would "return"
//! to a stale `x9`.
//!
//! ## Staying within the architecture's guarantee
//!
//! The Arm architecture allows an instruction to be rewritten while other CPUs may run
//! it only when the old and the new instruction are both among `B`, `BL`, `BRK`,
//! `HVC`, `ISB`, `NOP`, `SMC`, `SVC`. At run time only `w1` changes, between `nop`,
//! `bl` and `b`. `w0` is written at most once per site, from `nop` to `mov x9, x30`,
//! the first time a C site (`nop; nop`) leaves its original state; it then stays, also
//! when the site is restored (`mov x9, x30; nop` behaves as the original). That one
//! write is outside the guarantee: the kernel makes it at boot, before the code runs,
//! which a process that is already running cannot do. A `patchable!` wrapper starts
//! with `mov x9, x30` and never needs it.
//!
//! ## Writes
//!
//! Each write is one aligned 4-byte store of a whole instruction (single-copy atomic
//! for instruction fetch: a thread sees the old or the new word, never a mix), followed
//! by `dc cvau; dsb ish; ic ivau; dsb ish; isb` on the writing thread and a
//! synchronisation round: every registered thread takes a signal, whose exception
//! return is a context synchronisation event, so it fetches the new word afterwards.
//! All writes, with their rounds, are serialised by one lock (`TEXT`; QEMU also crashes
//! when two threads change the protections of the same text at once); the site's pages
//! are read + write + execute during the write, read + execute again afterwards. A
//! site's stub is made (with a round of its own) before any site branches to it.
//!
//! The order (see `plan`): the one-time `w0 = mov x9, x30` first, with its round; then
//! `w1`. During the round after the `w0` store, [`on_sync`] moves a thread found at
//! `w1` (`pc == site + 4`) back to `w0`: it ran `w0` in a version nobody knows, and
//! running it again is harmless (`nop` and `mov x9, x30` are idempotent, `x30` is still
//! the caller's return address). After that round every registered thread that reaches
//! `w1` ran `mov x9, x30` first, so `w1` may become a `bl`. Every later change is one
//! `w1` store between `nop`, `bl` and `b`, each safe whichever version a thread
//! fetches: a thread past `w0` has run `mov x9, x30`.
//!
//! Limits:
//! * The rounds reach registered threads only. A thread klp does not know (or one
//!   interrupted at `w1` by another signal whose handler runs through the whole
//!   write) that ran the original `nop` in `w0` and resumes at a `bl` would enter the
//!   trampoline with a stale `x9`; only the first install of a C site has that window.
//! * A jump to a target out of reach of `w1` is refused with `ERANGE`, writing nothing
//!   (the site stays on the trampoline).

use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

use klp::Errno;
use klp::arch::{Arch, FuncInfo, InsnBytes, Redirect, Site, SiteForm};
use klp_arch_aarch64::live::trampoline;
use klp_arch_aarch64::site::form;
use klp_arch_aarch64::{Aarch64, insn};

use super::SiteState;
use crate::symbols::SymbolIndex;

/// The wrapper of [`crate::patchable!`] on aarch64: the `mov x9, x30; nop` site, then
/// a tail branch to the body.
#[doc(hidden)]
#[macro_export]
macro_rules! __patchable_wrapper {
    ($(#[$m:meta])* $vis:vis fn $name:ident($($arg:ident : $ty:ty),*) $(-> $ret:ty)?) => {
        $(#[$m])*
        #[unsafe(no_mangle)]
        #[unsafe(naked)]
        $vis extern "C" fn $name($($arg: $ty),*) $(-> $ret)? {
            ::core::arch::naked_asm!(
                "mov x9, x30",
                "nop",
                "b {body}",
                body = sym $name::body,
            )
        }
    };
}

/// Serialises text writes (and their protection changes) process-wide.
static TEXT: Mutex<()> = Mutex::new(());

/// The site whose `w0` is being written (0: none); see [`on_sync`].
static PATCHING: AtomicU64 = AtomicU64::new(0);

/// Bytes of a site.
const LEN: u64 = klp_arch_aarch64::site::LEN as u64;

/// Writes new text and makes it visible to instruction fetch (for the patch loader).
pub(crate) const WRITE_TEXT: Option<unsafe fn(*mut u8, &[u8])> =
    Some(klp_arch_aarch64::live::write_text);

/// The site at the entry of the function that starts at `addr` (a function symbol of
/// the index whose first words are an unpatched aarch64 site).
pub(crate) fn find(index: &SymbolIndex, addr: u64) -> Option<Site> {
    let (_, sym) = index.lookup(addr)?;
    if sym.addr != addr || !sym.func || !addr.is_multiple_of(4) {
        return None;
    }
    // An optional `bti c`, then the two words.
    let len = sym.size.min(LEN + 4);
    if len < LEN || !index.is_text(addr) || !index.is_text(addr + len - 1) {
        return None;
    }
    // SAFETY: `addr..addr + len` lies in an executable (hence mapped and readable)
    // segment of a loaded object, inside the function's symbol.
    let code = unsafe { std::slice::from_raw_parts(addr as *const u8, len as usize) };
    let site = Aarch64::find_site(code, FuncInfo::at(addr)).ok()?;
    (matches!(site.form.code, form::NOPS | form::MOV_X9_NOP) && site.len() as u64 == LEN)
        .then_some(site)
}

/// The body a `patchable!` wrapper branches to: the `b` right after the site.
pub(crate) fn body_of(index: &SymbolIndex, site: &Site) -> Option<(u64, u64)> {
    let at = site.addr() + LEN;
    let size = index.size_of(site.func.addr)?;
    if !index.is_text(at) || size < (at - site.func.addr) + 4 {
        return None;
    }
    // SAFETY: `at` is 4-byte aligned (the site is), in an executable segment, inside
    // the wrapper's symbol (its size covers the word, checked above).
    let word = unsafe { std::ptr::read_volatile(at as *const u32) };
    if !is_b(word) {
        return None;
    }
    let target = insn::branch_target(word, at)?;
    let (_, s) = index.lookup(target)?;
    (s.addr == target).then_some((target, target + s.size.max(1)))
}

/// While the one-time `w0` store of a C site is being synchronised, a thread
/// interrupted at the second word is moved back to the first (see the module
/// documentation): it ran the first word, in its old or new version, and running it
/// again is harmless.
///
/// # Safety
///
/// 1. `uc` is the `ucontext_t` of an `SA_SIGINFO` handler on the interrupted thread.
pub(crate) unsafe fn on_sync(uc: *mut libc::c_void) {
    let site = PATCHING.load(Ordering::Acquire);
    if site == 0 {
        return;
    }
    // SAFETY: condition 1.
    let ctx = unsafe { &mut *(uc as *mut libc::ucontext_t) };
    if ctx.uc_mcontext.pc == site + 4 {
        ctx.uc_mcontext.pc = site;
    }
}

fn is_b(w: u32) -> bool {
    w & !insn::IMM26 == insn::B
}

fn is_bl(w: u32) -> bool {
    w & !insn::IMM26 == insn::BL
}

/// The second word of `state` at `site` (the first is `mov x9, x30` in every state but
/// the original). `ERANGE` when a jump target is out of reach; the trampoline state
/// branches to the site's stub, made here if it does not exist yet (`TEXT` held).
fn second_word(site: &Site, state: SiteState, sync: &mut dyn FnMut()) -> Result<u32, Errno> {
    // The encodings of the kernel's form, whose first word is `mov x9, x30` already.
    let mut mov_nop = InsnBytes::EMPTY;
    for w in [insn::MOV_X9_X30, insn::NOP] {
        mov_nop
            .push_u32(w, klp_arch::Endian::Little)
            .ok_or(Errno::EINVAL)?;
    }
    let bti = site.form.landing_pad;
    let kernel_form = Site {
        form: SiteForm::new(form::MOV_X9_NOP).landing_pad(bti),
        original: mov_nop,
        ..*site
    };
    let redirect = match state {
        SiteState::Original => return Ok(insn::NOP),
        SiteState::Jump(to) => Redirect::jump(to),
        SiteState::Trampoline => Redirect::call(stub_for(site, sync)?),
    };
    let b = Aarch64::encode_redirect(&kernel_form, redirect).map_err(|_| Errno::ERANGE)?;
    klp_arch::read_u32(b.as_slice(), 4, klp_arch::Endian::Little).ok_or(Errno::EINVAL)
}

/// The stub of `site` ([`super::stubs`]; `TEXT` held by the caller).
fn stub_for(site: &Site, sync: &mut dyn FnMut()) -> Result<u64, Errno> {
    let from = site.addr() + 4;
    // SAFETY: `TEXT` is held by the caller (1); `write_text` copies and does the cache
    // maintenance (2).
    unsafe {
        super::stubs::stub_for(
            site.addr(),
            &trampoline::stub_bytes(),
            &|a| insn::bl(from, a).is_ok(),
            klp_arch_aarch64::live::write_text,
            sync,
        )
    }
}

/// Whether the words `cur` are a state this module writes: `w0` the original `nop` or
/// `mov x9, x30`; `w1` `nop`, `bl` or `b`, and branching only after `mov x9, x30`.
fn known(cur: [u32; 2]) -> bool {
    let [c0, c1] = cur;
    let known0 = c0 == insn::NOP || c0 == insn::MOV_X9_X30;
    let known1 = c1 == insn::NOP || is_b(c1) || is_bl(c1);
    known0 && known1 && (c0 == insn::MOV_X9_X30 || c1 == insn::NOP)
}

/// The word stores (index, word), in order, that take a site holding `cur` to `w1` in
/// its second word; a sync round follows each. `mov x9, x30` goes into `w0` first
/// when `w1` is to branch and `w0` still holds the original `nop`. `EINVAL` if `cur`
/// is not a state this module writes.
fn plan(cur: [u32; 2], w1: u32) -> Result<Vec<(usize, u32)>, Errno> {
    if !known(cur) {
        return Err(Errno::EINVAL);
    }
    let mut steps = Vec::with_capacity(2);
    if w1 != insn::NOP && cur[0] == insn::NOP {
        steps.push((0, insn::MOV_X9_X30));
    }
    if w1 != cur[1] {
        steps.push((1, w1));
    }
    Ok(steps)
}

/// Rewrites `site` to state `to` (see the module documentation; the words in memory,
/// not `from`, say where it starts). `sync` runs a synchronisation round. Fails, with
/// nothing written to the site, with `ERANGE` when `to` cannot be encoded at this site
/// (a jump target out of reach, or no stub page within reach), `EINVAL` when the site
/// holds words this module did not write, `EPERM` when the text cannot be made
/// writable.
pub(crate) fn set(
    site: &Site,
    _from: SiteState,
    to: SiteState,
    sync: &mut dyn FnMut(),
) -> Result<(), Errno> {
    let addr = site.addr();
    if !addr.is_multiple_of(4) || site.len() as u64 != LEN {
        return Err(Errno::EINVAL);
    }
    let _g = TEXT.lock().unwrap_or_else(|e| e.into_inner());
    trampoline::set_decision(super::decide_entry);
    // SAFETY: the site's two aligned words are mapped text of a loaded object (the
    // site was found there); text writes are serialised by `TEXT`, held.
    let cur = unsafe {
        [
            std::ptr::read_volatile(addr as *const u32),
            std::ptr::read_volatile((addr + 4) as *const u32),
        ]
    };
    if !known(cur) {
        return Err(Errno::EINVAL);
    }
    let steps = plan(cur, second_word(site, to, sync)?)?;
    if steps.is_empty() {
        return Ok(());
    }
    // SAFETY: the site is text of a loaded object (`find`) (1).
    let _w = unsafe { super::text::Writable::new(addr, LEN) }?;
    for (i, w) in steps {
        if i == 0 {
            PATCHING.store(addr, Ordering::Release);
        }
        // SAFETY: the word is aligned, mapped and writable now (1); the order of the
        // stores and the rounds between them is the protocol of the module
        // documentation (2); `TEXT` is held (3).
        unsafe { trampoline::klp_aarch64_write_word((addr + 4 * i as u64) as *mut u32, w) };
        sync();
        PATCHING.store(0, Ordering::Release);
    }
    Ok(())
}

/// The word the trampoline's decision returns for `target` at `site`: the address
/// itself (this architecture needs no tag).
pub(crate) fn published_target(_index: &SymbolIndex, _site: u64, target: u64) -> u64 {
    target
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOP: u32 = insn::NOP;
    const MOV: u32 = insn::MOV_X9_X30;
    const BL: u32 = insn::BL | 0x40;
    const B: u32 = insn::B | 0x80;
    const B2: u32 = insn::B | 0x100;

    /// What a thread does on fetching `w0` then `w1` (the second fetch possibly of a
    /// later state): original, trampoline, jump, or broken.
    #[derive(Debug, PartialEq, Clone, Copy)]
    enum Runs {
        Original,
        Trampoline,
        Jump(u32),
        StaleX9,
    }

    fn runs(w0: u32, w1: u32) -> Runs {
        match (w0, w1) {
            (_, b) if is_b(b) => Runs::Jump(b),
            (NOP, bl) if is_bl(bl) => Runs::StaleX9,
            (_, bl) if is_bl(bl) => Runs::Trampoline,
            _ => Runs::Original,
        }
    }

    /// Whether the architecture allows rewriting `old` into `new` while it may run.
    fn guaranteed(old: u32, new: u32) -> bool {
        let ok = |w: u32| w == NOP || is_b(w) || is_bl(w);
        ok(old) && ok(new)
    }

    /// Every transition between the states, from both original forms: the states in
    /// memory between the stores (what a thread fetching both words after a round
    /// sees) run the old or the new behaviour, never a stale `x9`; a thread that
    /// fetched `w0` of one state and `w1` of the next (no round between those two
    /// stores) is never broken; and the only store outside the architecture's
    /// guarantee is the one-time `nop` → `mov x9, x30` of `w0`.
    #[test]
    fn every_transition_keeps_each_thread_consistent() {
        for orig0 in [NOP, MOV] {
            let states = [[orig0, NOP], [MOV, NOP], [MOV, BL], [MOV, B], [MOV, B2]];
            for from in states {
                for w1 in [NOP, BL, B, B2] {
                    let steps = plan(from, w1).expect("a known state");
                    let mut mem = from;
                    let mut seen = vec![mem];
                    for (i, w) in &steps {
                        let before = mem;
                        if !guaranteed(mem[*i], *w) {
                            assert_eq!((*i, mem[*i], *w), (0, NOP, MOV), "{from:x?}->{w1:x}");
                        }
                        mem[*i] = *w;
                        assert_ne!(runs(before[0], mem[1]), Runs::StaleX9, "{from:x?}->{w1:x}");
                        seen.push(mem);
                    }
                    assert_eq!(mem[1], w1);
                    if w1 != NOP {
                        assert_eq!(mem[0], MOV);
                    }
                    let (a, z) = (runs(from[0], from[1]), runs(mem[0], mem[1]));
                    for s in &seen {
                        let r = runs(s[0], s[1]);
                        assert!(r == a || r == z, "{from:x?}->{w1:x}: {s:x?} runs {r:?}");
                    }
                    assert!(steps.len() <= 2);
                    assert!(orig0 == NOP || steps.iter().all(|(i, _)| *i == 1));
                }
            }
        }
    }

    #[test]
    fn unknown_words_are_refused() {
        assert_eq!(plan([NOP, BL], BL), Err(Errno::EINVAL), "bl after nop");
        assert_eq!(plan([NOP, B], NOP), Err(Errno::EINVAL));
        assert_eq!(plan([0xd280_0000, NOP], BL), Err(Errno::EINVAL));
        assert_eq!(plan([MOV, MOV], BL), Err(Errno::EINVAL));
        assert_eq!(plan([MOV, BL], BL), Ok(vec![]));
        assert_eq!(plan([NOP, NOP], BL), Ok(vec![(0, MOV), (1, BL)]));
        assert_eq!(plan([NOP, NOP], NOP), Ok(vec![]));
        assert_eq!(plan([MOV, BL], NOP), Ok(vec![(1, NOP)]));
        assert_eq!(plan([MOV, BL], B), Ok(vec![(1, B)]));
        assert_eq!(plan([MOV, B], BL), Ok(vec![(1, BL)]));
    }

    crate::patchable! {
        /// A site of this test binary.
        fn klp_a64_unit_site(x: u64) -> u64 {
            std::hint::black_box(x) + 1
        }
    }

    extern "C" fn unit_body(x: u64) -> u64 {
        std::hint::black_box(x) + 1
    }

    /// The site C built with `-fpatchable-function-entry=2` has.
    #[unsafe(naked)]
    #[unsafe(no_mangle)]
    extern "C" fn klp_a64_unit_c_site(_x: u64) -> u64 {
        core::arch::naked_asm!("nop", "nop", "b {body}", body = sym unit_body)
    }

    extern "C" fn unit_v2(x: u64) -> u64 {
        std::hint::black_box(x) + 101
    }

    fn words_at(a: u64) -> [u32; 2] {
        // SAFETY: `a` is the site of a wrapper of this program: two mapped words.
        unsafe { std::ptr::read_volatile(a as *const [u32; 2]) }
    }

    /// `find`, `body_of` and `set` on a real wrapper, called in each state (one
    /// thread: a round is only counted).
    #[test]
    fn a_real_site_goes_through_its_states() {
        std::thread::spawn(|| {
            crate::thread::register_current();
            let f = klp_a64_unit_site as *const () as u64;
            let index = SymbolIndex::load();
            let site = find(&index, f).expect("the wrapper's site");
            assert_eq!((site.addr(), words_at(f)), (f, [MOV, NOP]));
            assert_eq!(site.form, SiteForm::new(form::MOV_X9_NOP));
            let body = klp_a64_unit_site::body as *const () as u64;
            assert_eq!(body_of(&index, &site).map(|b| b.0), Some(body));

            let mut rounds = 0;
            let far = SiteState::Jump(f + 4 + (1 << 27));
            assert_eq!(
                set(&site, SiteState::Original, far, &mut || rounds += 1),
                Err(Errno::ERANGE)
            );
            assert_eq!((words_at(f), rounds), ([MOV, NOP], 0), "nothing written");
            let v2 = unit_v2 as *const () as u64;
            // Rounds: one per word written, plus one after the site's new stub.
            let steps = [
                (SiteState::Trampoline, 2, 2),
                (SiteState::Jump(v2), 102, 1),
                (SiteState::Trampoline, 2, 1),
                (SiteState::Original, 2, 1),
                (SiteState::Jump(v2), 102, 1),
                (SiteState::Original, 2, 1),
                (SiteState::Trampoline, 2, 1),
                (SiteState::Original, 2, 1),
            ];
            let mut from = SiteState::Original;
            for (to, result, writes) in steps {
                let mut rounds = 0;
                set(&site, from, to, &mut || rounds += 1).expect("set");
                assert_eq!(rounds, writes, "{from:?} -> {to:?}");
                assert_eq!(klp_a64_unit_site(1), result, "{to:?}");
                let [w0, w1] = words_at(f);
                assert_eq!(w0, MOV, "w0 never changes");
                if to == SiteState::Trampoline {
                    let stub = insn::branch_target(w1, f + 4).expect("bl");
                    // SAFETY: the stub's 16 bytes are mapped text.
                    let b = unsafe { std::ptr::read_volatile(stub as *const [u8; 16]) };
                    assert_eq!(b, trampoline::stub_bytes(), "bl to the site's stub");
                }
                from = to;
            }
            assert_eq!(words_at(f), [MOV, NOP], "restored");
            assert_eq!(set(&site, from, from, &mut || rounds += 1), Ok(()));
            assert_eq!(rounds, 0);
            assert_eq!(PATCHING.load(Ordering::Acquire), 0);
        })
        .join()
        .expect("thread");
    }

    /// A `nop; nop` site: `w0` becomes `mov x9, x30` once, with the fix-up of
    /// [`on_sync`] armed during its round only, and keeps it.
    #[test]
    fn a_c_site_gets_its_mov_once() {
        std::thread::spawn(|| {
            crate::thread::register_current();
            let f = klp_a64_unit_c_site as *const () as u64;
            let index = SymbolIndex::load();
            let site = find(&index, f).expect("the site");
            assert_eq!(site.form, SiteForm::new(form::NOPS));
            assert_eq!(words_at(f), [NOP, NOP]);
            let mut armed = Vec::new();
            let mut sync = || armed.push(PATCHING.load(Ordering::Acquire));
            set(&site, SiteState::Original, SiteState::Trampoline, &mut sync).expect("set");
            // The stub's round, the `w0` round (armed), the `w1` round.
            assert_eq!(armed, [0, f, 0]);
            assert_eq!(words_at(f)[0], MOV);
            assert!(is_bl(words_at(f)[1]));
            assert_eq!(klp_a64_unit_c_site(1), 2);
            armed.clear();
            let mut sync = || armed.push(PATCHING.load(Ordering::Acquire));
            set(&site, SiteState::Trampoline, SiteState::Original, &mut sync).expect("set");
            assert_eq!(armed, [0]);
            assert_eq!(words_at(f), [MOV, NOP], "mov x9, x30 stays");
            assert_eq!(klp_a64_unit_c_site(1), 2);
            // Found again, it is the kernel's form.
            let again = find(&index, f).expect("the site");
            assert_eq!(again.form, SiteForm::new(form::MOV_X9_NOP));
        })
        .join()
        .expect("thread");
    }

    #[test]
    fn a_thread_at_the_second_word_goes_back_to_the_first() {
        // SAFETY: an all-zero `ucontext_t` is a valid value.
        let mut uc: libc::ucontext_t = unsafe { std::mem::zeroed() };
        let site = 0x7777_0000_4000;
        let _g = TEXT.lock().unwrap_or_else(|e| e.into_inner());
        let p = &mut uc as *mut libc::ucontext_t as *mut libc::c_void;
        for (pc, patching, after) in [
            (site + 4, site, site),
            (site, site, site),
            (site + 8, site, site + 8),
            (site + 4, 0, site + 4),
        ] {
            uc.uc_mcontext.pc = pc;
            PATCHING.store(patching, Ordering::Release);
            // SAFETY: `p` points to a `ucontext_t` (only its pc is used).
            unsafe { on_sync(p) };
            assert_eq!(uc.uc_mcontext.pc, after, "{pc:#x}");
        }
        PATCHING.store(0, Ordering::Release);
    }
}

/// No fast entry path on this architecture: every stub enters the trampoline.
pub(crate) const FAST_ENTRY: Option<unsafe extern "C" fn()> = None;
