//! aarch64: patchable wrappers, site recognition and text writes.
//!
//! A site is two aligned words `w0 w1` at a patchable entry: the wrapper's
//! `nop; nop` (C built with `-fpatchable-function-entry=2` has the same, possibly after
//! a `bti c` that stays untouched; the kernel's boot form `mov x9, x30; nop` is
//! accepted too). Its states:
//!
//! | state | `w0` | `w1` |
//! |---|---|---|
//! | original | as found (`nop` or `mov x9, x30`) | `nop` |
//! | trampoline | `mov x9, x30` | `bl entry_trampoline` ([`klp_arch_aarch64::live::trampoline`]) |
//! | jump | `b new_function` (only within ±128 MiB) | whatever it held (never reached) |
//!
//! What a thread does with the words it fetched: `b T` goes to `T` with `x30` still
//! the caller's return address (a direct call of `T`); `nop` or `mov x9, x30`
//! followed by `nop` is the original function (`x9` is a temporary, dead at a
//! function's entry); `mov x9, x30` followed by `bl` enters the trampoline, which
//! expects the caller's return address in `x9`. The one bad combination is having run
//! a `nop` in `w0` and then the `bl` in `w1`: the trampoline would "return" to a stale
//! `x9`.
//!
//! ## Writes
//!
//! Each write is one aligned 4-byte store of a whole instruction (single-copy atomic
//! for instruction fetch: a thread sees the old or the new word, never a mix), followed
//! by `dc cvau; dsb ish; ic ivau; dsb ish; isb` on the writing thread and a
//! synchronisation round: every registered thread takes a signal, whose exception
//! return is a context synchronisation event, so it fetches the new word afterwards.
//! While a site is being written, each round also moves a thread found at `w1`
//! (`pc == site + 4`) back to `w0` ([`on_sync`]): such a thread ran `w0` but which
//! version is unknown; running `w0` again is harmless whatever it holds (`nop` and
//! `mov x9, x30` are idempotent, `x30` is still the caller's return address, and a
//! `b T` is what the site says now). All writes, with their rounds, are serialised by
//! one lock (`TEXT`; QEMU also crashes when two threads change the protections of
//! the same text at once); the site's pages are read + write + execute during the
//! write, read + execute again afterwards.
//!
//! At most two words change, each stored only if it differs. The order (see `plan`):
//! `w0` first only when it holds `nop` (original → trampoline: `w0 = mov x9, x30`,
//! round, `w1 = bl`, round); in every other case `w1` first. Each pair of states:
//!
//! * **original → trampoline**: after `w0 = mov`, the site behaves as the original.
//!   The round moves a thread that ran the old `nop` and stopped at `w1` back to `w0`;
//!   every registered thread fetches `mov` afterwards, so whoever reaches `bl` ran
//!   `mov` first.
//! * **trampoline → original**: `w1 = nop` (site = `mov; nop`, the original), round,
//!   `w0 = nop` (if the original had one), round. A `nop` in `w0` never meets a `bl`.
//! * **trampoline → jump**: `w0 = b T`, round. A thread that ran `mov` enters the
//!   trampoline, which chooses `T` too (a site only jumps where the decision would).
//! * **jump → trampoline**: `w1 = bl` if it is not one already (unreachable behind
//!   `b`), round; `w0 = mov`, round. No moment runs the original body.
//! * **jump → original**: `w1 = nop` (unreachable), round; `w0` = its original, round.
//!   The core restores a site only when every thread runs the original.
//! * **original → jump**, **jump → jump**: `w0 = b T`, one store.
//!
//! Limits:
//! * The rounds reach registered threads only. A thread klp does not know (or one
//!   interrupted at `w1` by another signal whose handler runs through the whole
//!   write) that ran a `nop` in `w0` and resumes at a `bl` would enter the trampoline
//!   with a stale `x9`.
//! * The Arm architecture guarantees concurrent modification and execution only when
//!   the old and the new instruction are both among `B`, `BL`, `BRK`, `HVC`, `ISB`,
//!   `NOP`, `SMC`, `SVC`. The `w1` stores (`nop`/`bl`) and `w0` stores between `nop`
//!   and `b` qualify; a `w0` store to or from `mov x9, x30` does not (the kernel
//!   writes that word once, before the code runs, and at run time changes only the
//!   `nop`/`bl` word).
//! * The trampoline lives in the main executable: a site more than 128 MiB away (a
//!   shared library) cannot call it, and [`set`] refuses with `ERANGE`, writing
//!   nothing; so does a jump to a target out of reach (the site stays on the
//!   trampoline).

use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

use klp::Errno;
use klp::arch::{Arch, FuncInfo, InsnBytes, Redirect, Site, SiteForm};
use klp_arch_aarch64::live::trampoline;
use klp_arch_aarch64::{Aarch64, insn};

use super::SiteState;
use crate::symbols::SymbolIndex;

/// The wrapper of [`crate::patchable!`] on aarch64: the two-nop site, then a tail
/// branch to the body.
#[doc(hidden)]
#[macro_export]
macro_rules! __patchable_wrapper {
    ($(#[$m:meta])* $vis:vis fn $name:ident($($arg:ident : $ty:ty),*) $(-> $ret:ty)?) => {
        $(#[$m])*
        #[unsafe(no_mangle)]
        #[unsafe(naked)]
        $vis extern "C" fn $name($($arg: $ty),*) $(-> $ret)? {
            ::core::arch::naked_asm!(
                "nop",
                "nop",
                "b {body}",
                body = sym $name::body,
            )
        }
    };
}

/// Serialises text writes (and their protection changes) process-wide.
static TEXT: Mutex<()> = Mutex::new(());

/// The site being written (0: none); see [`on_sync`].
static PATCHING: AtomicU64 = AtomicU64::new(0);

/// Bytes of a site.
const LEN: u64 = klp_arch_aarch64::site::LEN as u64;

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
    (matches!(
        site.form,
        SiteForm::A64Nops { .. } | SiteForm::A64MovX9Nop { .. }
    ) && site.len() as u64 == LEN)
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
    if word & !insn::IMM26 != insn::B {
        return None;
    }
    let target = insn::branch_target(word, at)?;
    let (_, s) = index.lookup(target)?;
    (s.addr == target).then_some((target, target + s.size.max(1)))
}

/// A thread interrupted at the second word of a site being written is moved back to
/// the first (see the module documentation): it ran the first word, in its old or
/// new version, and running it again is harmless.
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

/// The two words of `bytes` (little-endian), if it holds at least two.
fn words(bytes: &[u8]) -> Option<[u32; 2]> {
    let w = |i: usize| {
        bytes
            .get(i..i + 4)
            .and_then(|b| b.try_into().ok())
            .map(u32::from_le_bytes)
    };
    Some([w(0)?, w(4)?])
}

/// The words `state` needs at `site`; `None`: left as it is.
fn wanted(site: &Site, state: SiteState) -> Result<[Option<u32>; 2], Errno> {
    let encode = |r: Redirect| -> Result<[u32; 2], Errno> {
        let b: InsnBytes = Aarch64::encode_redirect(site, r).map_err(|_| Errno::ERANGE)?;
        words(b.as_slice()).ok_or(Errno::EINVAL)
    };
    Ok(match state {
        SiteState::Original => {
            let [o0, o1] = words(site.original.as_slice()).ok_or(Errno::EINVAL)?;
            [Some(o0), Some(o1)]
        }
        SiteState::Trampoline => {
            let [w0, w1] = encode(Redirect::call(trampoline::address()))?;
            [Some(w0), Some(w1)]
        }
        SiteState::Jump(to) => [Some(encode(Redirect::jump(to))?[0]), None],
    })
}

fn is_b(w: u32) -> bool {
    w & !insn::IMM26 == insn::B
}

fn is_bl(w: u32) -> bool {
    w & !insn::IMM26 == insn::BL
}

/// The word stores (index, word), in order, that take a site holding `cur` (original
/// words `orig`) to `want`; a sync round follows each. `EINVAL` if `cur` is not a
/// state this module writes.
fn plan(cur: [u32; 2], orig: [u32; 2], want: [Option<u32>; 2]) -> Result<Vec<(usize, u32)>, Errno> {
    let [c0, c1] = cur;
    let known0 = c0 == orig[0] || c0 == insn::MOV_X9_X30 || is_b(c0);
    let known1 = c1 == orig[1] || is_bl(c1);
    if !known0 || !known1 || (c0 == insn::NOP && is_bl(c1)) {
        return Err(Errno::EINVAL);
    }
    let w0 = want[0].filter(|w| *w != c0).map(|w| (0, w));
    let w1 = want[1].filter(|w| *w != c1).map(|w| (1, w));
    // `w1` is reached only through `w0`: a `nop` there must become `mov x9, x30`
    // before `w1` may hold a `bl`; in every other state `w1` goes first (it is either
    // unreachable behind a `b`, or a `nop`/`bl` after `mov x9, x30`).
    let order = if c0 == insn::NOP { [w0, w1] } else { [w1, w0] };
    Ok(order.into_iter().flatten().collect())
}

/// Rewrites `site` to state `to` (see the module documentation; the words in memory,
/// not `from`, say where it starts). `sync` runs a synchronisation round. Fails, with
/// nothing written, with `ERANGE` when `to` cannot be encoded at this site (the
/// trampoline or a jump target out of reach), `EINVAL` when the site holds words this
/// module did not write, `EPERM` when the text cannot be made writable.
pub(crate) fn set(
    site: &Site,
    _from: SiteState,
    to: SiteState,
    sync: &mut dyn FnMut(),
) -> Result<(), Errno> {
    let want = wanted(site, to)?;
    let orig = words(site.original.as_slice()).ok_or(Errno::EINVAL)?;
    trampoline::set_decision(super::decide_entry);
    let addr = site.addr();
    if !addr.is_multiple_of(4) {
        return Err(Errno::EINVAL);
    }
    let _g = TEXT.lock().unwrap_or_else(|e| e.into_inner());
    // SAFETY: the site's two aligned words are mapped text of a loaded object (the
    // site was found there); text writes are serialised by `TEXT`, held.
    let cur = unsafe {
        [
            std::ptr::read_volatile(addr as *const u32),
            std::ptr::read_volatile((addr + 4) as *const u32),
        ]
    };
    let steps = plan(cur, orig, want)?;
    if steps.is_empty() {
        return Ok(());
    }
    // SAFETY: `sysconf` has no preconditions.
    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) }.max(4096) as u64;
    let start = addr & !(page - 1);
    let end = (addr + LEN + page - 1) & !(page - 1);
    let rwx = libc::PROT_READ | libc::PROT_WRITE | libc::PROT_EXEC;
    // SAFETY: the range covers whole pages of a loaded object's text; it stays
    // executable while writable, so threads running it are not disturbed.
    if unsafe { libc::mprotect(start as *mut libc::c_void, (end - start) as usize, rwx) } != 0 {
        return Err(Errno::EPERM);
    }
    PATCHING.store(addr, Ordering::Release);
    for (i, w) in steps {
        // SAFETY: the word is aligned, mapped and writable now (1); the order of the
        // stores and the rounds between them is the protocol of the module
        // documentation (2); `TEXT` is held (3).
        unsafe { trampoline::klp_aarch64_write_word((addr + 4 * i as u64) as *mut u32, w) };
        sync();
    }
    PATCHING.store(0, Ordering::Release);
    // SAFETY: as for the first `mprotect`; text is read + execute again.
    unsafe {
        libc::mprotect(
            start as *mut libc::c_void,
            (end - start) as usize,
            libc::PROT_READ | libc::PROT_EXEC,
        )
    };
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
            (b, _) if is_b(b) => Runs::Jump(b),
            (NOP, bl) if is_bl(bl) => Runs::StaleX9,
            (_, bl) if is_bl(bl) => Runs::Trampoline,
            _ => Runs::Original,
        }
    }

    fn want(w0: u32, w1: Option<u32>) -> [Option<u32>; 2] {
        [Some(w0), w1]
    }

    /// Every transition between the states, from both original forms: the states in
    /// memory between the stores (what a thread fetching both words after a round
    /// sees) run the old or the new behaviour, never the original in between two
    /// others, never a stale `x9`; and a thread that fetched `w0` of one state and `w1`
    /// of the next (no round between those two stores) is never broken.
    #[test]
    fn every_transition_keeps_each_thread_consistent() {
        for orig0 in [NOP, MOV] {
            let orig = [orig0, NOP];
            let o = [Some(orig0), Some(NOP)];
            let t = want(MOV, Some(BL));
            // `[MOV, NOP]` is also what a `nop; nop` site holds between two stores.
            let states = [orig, [MOV, BL], [B, BL], [B, NOP], [MOV, NOP]];
            for from in &states {
                for to in [o, t, want(B, None), want(B2, None)] {
                    let steps = plan(*from, orig, to).expect("a known state");
                    let mut mem = *from;
                    let mut seen = vec![mem];
                    for (i, w) in &steps {
                        let before = mem;
                        mem[*i] = *w;
                        // The fetch of w0 before this store, of w1 after it.
                        assert_ne!(runs(before[0], mem[1]), Runs::StaleX9, "{from:x?}->{to:x?}");
                        seen.push(mem);
                    }
                    let last = *seen.last().expect("start");
                    for (k, w) in to.iter().enumerate() {
                        if let Some(w) = w {
                            assert_eq!(last[k], *w, "{from:x?}->{to:x?}");
                        }
                    }
                    let (a, z) = (runs(from[0], from[1]), runs(last[0], last[1]));
                    for s in &seen {
                        let r = runs(s[0], s[1]);
                        assert!(r == a || r == z, "{from:x?}->{to:x?}: {s:x?} runs {r:?}");
                    }
                    assert!(steps.len() <= 2);
                }
            }
        }
    }

    #[test]
    fn unknown_words_are_refused() {
        let orig = [NOP, NOP];
        let t = want(MOV, Some(BL));
        assert_eq!(plan([NOP, BL], orig, t), Err(Errno::EINVAL));
        assert_eq!(plan([0xd280_0000, NOP], orig, t), Err(Errno::EINVAL));
        assert_eq!(plan([NOP, MOV], orig, t), Err(Errno::EINVAL));
        assert_eq!(plan([MOV, BL], orig, t), Ok(vec![]));
        assert_eq!(plan([NOP, NOP], orig, t), Ok(vec![(0, MOV), (1, BL)]));
        assert_eq!(
            plan([MOV, BL], orig, [Some(NOP), Some(NOP)]),
            Ok(vec![(1, NOP), (0, NOP)])
        );
        assert_eq!(plan([MOV, BL], orig, want(B, None)), Ok(vec![(0, B)]));
        assert_eq!(plan([B, BL], orig, t), Ok(vec![(0, MOV)]));
    }

    crate::patchable! {
        /// A site of this test binary.
        fn klp_a64_unit_site(x: u64) -> u64 {
            std::hint::black_box(x) + 1
        }
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
            assert_eq!((site.addr(), words_at(f)), (f, [NOP, NOP]));
            let body = klp_a64_unit_site::body as *const () as u64;
            assert_eq!(body_of(&index, &site).map(|b| b.0), Some(body));

            let mut rounds = 0;
            let mut sync = || rounds += 1;
            let far = SiteState::Jump(f + (1 << 28));
            assert_eq!(
                set(&site, SiteState::Original, far, &mut sync),
                Err(Errno::ERANGE)
            );
            assert_eq!(words_at(f), [NOP, NOP], "nothing written");
            let steps = [
                (SiteState::Trampoline, 2, 2),
                (SiteState::Jump(unit_v2 as *const () as u64), 102, 1),
                (SiteState::Trampoline, 2, 1),
                (SiteState::Original, 2, 2),
                (SiteState::Jump(unit_v2 as *const () as u64), 102, 1),
                (SiteState::Original, 2, 1),
            ];
            let mut from = SiteState::Original;
            for (to, result, writes) in steps {
                let mut rounds = 0;
                set(&site, from, to, &mut || rounds += 1).expect("set");
                assert_eq!(rounds, writes, "{from:?} -> {to:?}");
                assert_eq!(klp_a64_unit_site(1), result, "{to:?}");
                from = to;
            }
            assert_eq!(words_at(f), [NOP, NOP], "restored");
            assert_eq!(set(&site, from, from, &mut sync), Ok(()));
            assert_eq!(rounds, 0);
            assert_eq!(PATCHING.load(Ordering::Acquire), 0);
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
