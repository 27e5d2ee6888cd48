//! Rewriting a live aarch64 site (the plans of [`klp_arch::patching`]).
//!
//! A site is two aligned words `w0 w1` at a patchable entry: the `mov x9, x30; nop`
//! the kernel's ftrace leaves after boot (what klp-user's `patchable!` wrappers
//! start with), or the `nop; nop` of C built with `-fpatchable-function-entry=2`
//! (possibly after a `bti c` that stays untouched). Its states:
//!
//! | state | `w0` | `w1` |
//! |---|---|---|
//! | original | as found (`mov x9, x30`, or `nop` until the first install) | `nop` |
//! | trampoline | `mov x9, x30` | `bl stub`; the site's stub ([`stub_bytes_to`]) jumps to the entry trampoline through `x16` |
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
//! which a process that is already running cannot do.
//!
//! ## The plan
//!
//! Each step is one aligned 4-byte store of a whole instruction (single-copy atomic
//! for instruction fetch), followed by the cache maintenance of [`crate::CACHE_SYNC`]
//! on the writer and a synchronisation round (an exception return on every thread is a
//! context synchronisation event). The one-time `w0 = mov x9, x30` comes first, with
//! its round; then `w1`. During the rounds a thread found at `w1` (`pc == S + 4`)
//! resumes at `w0` ([`Resume`]): it ran `w0` in a version nobody knows, and running it
//! again is harmless (`nop` and `mov x9, x30` are idempotent, `x30` is still the
//! caller's return address). After the `w0` round every thread that reaches `w1` ran
//! `mov x9, x30` first, so `w1` may become a `bl`. Every later change is one `w1` store
//! between `nop`, `bl` and `b`, each safe whichever version a thread fetches.
//!
//! Limits: the rounds reach the host's registered threads only. A thread the host
//! does not know (or one interrupted at `w1` by another signal whose handler runs
//! through the whole write) that ran the original `nop` in `w0` and resumes at a `bl`
//! would enter the trampoline with a stale `x9`; only the first install of a C site
//! has that window. A jump to a target out of reach of `w1` is refused, writing
//! nothing.

use klp_arch::patching::{
    MAX_STUB, Plan, PlanCtx, PlanError, Resume, SitePlanner, SiteState, Sync,
};
use klp_arch::{Endian, Site, read_u32};

use crate::site::{LEN, form};
use crate::{Aarch64, insn};

/// Bytes of a site's stub ([`stub_bytes_to`]).
pub const STUB_LEN: usize = 16;

/// `ldr x16, <pc + 8>`: loads the stub's literal.
const LDR_X16_LITERAL8: u32 = 0x5800_0050;
/// `br x16`.
const BR_X16: u32 = 0xd61f_0200;

/// A site's stub that continues at `target`:
///
/// ```text
/// 58000050   ldr x16, 8      (the literal below)
/// d61f0200   br  x16
/// <target, 8 bytes little-endian>
/// ```
///
/// Register contract: only `x16` (IP0, which the trampoline's contract allows to be
/// clobbered) changes; `x30` (= `S + 8`, from the site's `bl`), `x9` (the caller's
/// return address), the arguments and `sp` reach `target` as the site left them.
/// Position-independent: the stub may be anywhere within `bl` reach of its site, and
/// reaches `target` wherever it is. Place it 8-byte aligned (the literal is then
/// aligned).
pub fn stub_bytes_to(target: u64) -> [u8; STUB_LEN] {
    let mut b = [0u8; STUB_LEN];
    let words = LDR_X16_LITERAL8
        .to_le_bytes()
        .into_iter()
        .chain(BR_X16.to_le_bytes())
        .chain(target.to_le_bytes());
    for (d, s) in b.iter_mut().zip(words) {
        *d = s;
    }
    b
}

fn is_b(w: u32) -> bool {
    w & !insn::IMM26 == insn::B
}

fn is_bl(w: u32) -> bool {
    w & !insn::IMM26 == insn::BL
}

/// Whether the words `cur` are a state the plans write: `w0` the original `nop` or
/// `mov x9, x30`; `w1` `nop`, `bl` or `b`, and branching only after `mov x9, x30`.
fn known(cur: [u32; 2]) -> bool {
    let [c0, c1] = cur;
    let known0 = c0 == insn::NOP || c0 == insn::MOV_X9_X30;
    let known1 = c1 == insn::NOP || is_b(c1) || is_bl(c1);
    known0 && known1 && (c0 == insn::MOV_X9_X30 || c1 == insn::NOP)
}

/// The word stores `(offset, word)`, in order, that take a site holding `cur` to `w1`
/// in its second word: `mov x9, x30` into `w0` first when `w1` is to branch and `w0`
/// still holds the original `nop`.
fn word_steps(cur: [u32; 2], w1: u32) -> Result<[Option<(u8, u32)>; 2], PlanError> {
    if !known(cur) {
        return Err(PlanError::Unknown);
    }
    let first = (w1 != insn::NOP && cur[0] == insn::NOP).then_some((0, insn::MOV_X9_X30));
    let second = (w1 != cur[1]).then_some((4, w1));
    Ok([first, second])
}

impl SitePlanner for Aarch64 {
    fn live_site(site: &Site) -> bool {
        matches!(site.form.code, form::NOPS | form::MOV_X9_NOP)
            && site.len() == LEN
            && site.addr().is_multiple_of(4)
    }

    fn plan(site: &Site, now: &[u8], to: SiteState, ctx: &PlanCtx) -> Result<Plan, PlanError> {
        if !Self::live_site(site) {
            return Err(PlanError::NotLive);
        }
        let word = |i| read_u32(now, i, Endian::Little).ok_or(PlanError::Unknown);
        let cur = [word(0)?, word(4)?];
        let from = ctx.addr.wrapping_add(4);
        let w1 = match to {
            SiteState::Original => insn::NOP,
            SiteState::Jump(t) => insn::b(from, t).map_err(|_| PlanError::OutOfReach { to: t })?,
            SiteState::Trampoline => {
                insn::bl(from, ctx.stub).map_err(|_| PlanError::OutOfReach { to: ctx.stub })?
            }
        };
        let mut plan = Plan::new();
        for (i, w) in word_steps(cur, w1)?.into_iter().flatten() {
            plan.push(i, &w.to_le_bytes(), Sync::Round)
                .ok_or(PlanError::Unknown)?;
        }
        if !plan.is_empty() {
            plan.resume = Some(Resume {
                from: ctx.addr.wrapping_add(4),
                end: ctx.addr.wrapping_add(8),
                to: ctx.addr,
            });
        }
        Ok(plan)
    }

    fn stub(_value: u64, target: u64, out: &mut [u8; MAX_STUB]) -> usize {
        let b = stub_bytes_to(target);
        for (d, s) in out.iter_mut().zip(b) {
            *d = s;
        }
        STUB_LEN
    }

    fn stub_reaches(site: &Site, stub: u64) -> bool {
        insn::bl(site.addr().wrapping_add(4), stub).is_ok()
    }

    fn wrapper_body(at: u64, code: &[u8]) -> Option<u64> {
        let w = read_u32(code, 0, Endian::Little)?;
        if !is_b(w) {
            return None;
        }
        insn::branch_target(w, at)
    }
}

/// No call site is retargeted: the entry's branch serves every caller (every item is
/// the trait's default).
impl klp_arch::CallSites for Aarch64 {}

#[cfg(test)]
mod tests {
    extern crate std;

    use super::*;
    use klp_arch::{Arch, FuncInfo};
    use std::vec;
    use std::vec::Vec;

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

    fn steps(cur: [u32; 2], w1: u32) -> Result<Vec<(u8, u32)>, PlanError> {
        word_steps(cur, w1).map(|s| s.into_iter().flatten().collect())
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
                    let steps = steps(from, w1).expect("a known state");
                    let mut mem = from;
                    let mut seen = vec![mem];
                    for &(off, w) in &steps {
                        let i = usize::from(off / 4);
                        let before = mem;
                        if !guaranteed(mem[i], w) {
                            assert_eq!((i, mem[i], w), (0, NOP, MOV), "{from:x?}->{w1:x}");
                        }
                        mem[i] = w;
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
                    assert!(orig0 == NOP || steps.iter().all(|(off, _)| *off == 4));
                }
            }
        }
    }

    #[test]
    fn unknown_words_are_refused() {
        assert_eq!(
            steps([NOP, BL], BL),
            Err(PlanError::Unknown),
            "bl after nop"
        );
        assert_eq!(steps([NOP, B], NOP), Err(PlanError::Unknown));
        assert_eq!(steps([0xd280_0000, NOP], BL), Err(PlanError::Unknown));
        assert_eq!(steps([MOV, MOV], BL), Err(PlanError::Unknown));
        assert_eq!(steps([MOV, BL], BL), Ok(vec![]));
        assert_eq!(steps([NOP, NOP], BL), Ok(vec![(0, MOV), (4, BL)]));
        assert_eq!(steps([NOP, NOP], NOP), Ok(vec![]));
        assert_eq!(steps([MOV, BL], NOP), Ok(vec![(4, NOP)]));
        assert_eq!(steps([MOV, BL], B), Ok(vec![(4, B)]));
        assert_eq!(steps([MOV, B], BL), Ok(vec![(4, BL)]));
    }

    const S: u64 = 0x40_0000;

    fn words(w: [u32; 2]) -> [u8; 8] {
        let mut b = [0u8; 8];
        b[..4].copy_from_slice(&w[0].to_le_bytes());
        b[4..].copy_from_slice(&w[1].to_le_bytes());
        b
    }

    fn c_site() -> Site {
        Aarch64::find_site(&words([NOP, NOP]), FuncInfo::at(S)).expect("site")
    }

    fn ctx() -> PlanCtx {
        PlanCtx {
            addr: S,
            stub: S + 0x1000,
            trampoline: S + 0x10_0000,
        }
    }

    /// The whole plan on a C site: `mov x9, x30` first, then the `bl` to the stub
    /// (`bl` at S+4 to S+0x1000: imm26 = 0xffc / 4 = 0x3ff, by hand), with the
    /// second-word rule; restoring stores `nop` only.
    #[test]
    fn a_c_site_gets_its_mov_once_then_branches() {
        let site = c_site();
        let p =
            Aarch64::plan(&site, &words([NOP, NOP]), SiteState::Trampoline, &ctx()).expect("plan");
        let st: Vec<_> = p
            .steps()
            .map(|s| (s.offset, s.bytes.as_slice().to_vec(), s.sync))
            .collect();
        assert_eq!(
            st,
            [
                (0, MOV.to_le_bytes().to_vec(), Sync::Round),
                (4, 0x9400_03ffu32.to_le_bytes().to_vec(), Sync::Round),
            ]
        );
        assert_eq!(
            p.resume,
            Some(Resume {
                from: S + 4,
                end: S + 8,
                to: S
            })
        );
        assert_eq!(p.trap, None);
        let tramp = p.result(words([NOP, NOP])).expect("in the site");
        let back = Aarch64::plan(&site, &tramp, SiteState::Original, &ctx()).expect("plan");
        assert_eq!(
            back.result(tramp),
            Some(words([MOV, NOP])),
            "mov x9, x30 stays"
        );
        assert_eq!(back.steps().count(), 1);
        let same = Aarch64::plan(&site, &words([MOV, NOP]), SiteState::Original, &ctx());
        assert!(same.expect("plan").is_empty());
    }

    #[test]
    fn out_of_reach_and_foreign_sites_are_refused() {
        let site = c_site();
        let far = S + 4 + (1 << 27);
        assert_eq!(
            Aarch64::plan(&site, &words([NOP, NOP]), SiteState::Jump(far), &ctx()),
            Err(PlanError::OutOfReach { to: far })
        );
        assert_eq!(
            Aarch64::plan(&site, &words([NOP, BL]), SiteState::Original, &ctx()),
            Err(PlanError::Unknown)
        );
        let odd = Site {
            func: FuncInfo::at(S + 2),
            ..site
        };
        assert!(!Aarch64::live_site(&odd));
        assert_eq!(
            Aarch64::plan(&odd, &words([NOP, NOP]), SiteState::Original, &ctx()),
            Err(PlanError::NotLive)
        );
    }

    #[test]
    fn the_stub_and_the_wrapper_body_decode_by_hand() {
        let mut out = [0u8; MAX_STUB];
        assert_eq!(Aarch64::stub(0, 0x1122_3344_5566_7788, &mut out), 16);
        assert_eq!(
            out[..16],
            [
                0x50, 0, 0, 0x58, 0x00, 0x02, 0x1f, 0xd6, 0x88, 0x77, 0x66, 0x55, 0x44, 0x33, 0x22,
                0x11
            ]
        );
        // `b .+0x100` = 0x14000040.
        assert_eq!(
            Aarch64::wrapper_body(S, &0x1400_0040u32.to_le_bytes()),
            Some(S + 0x100)
        );
        assert_eq!(
            Aarch64::wrapper_body(S, &0x9400_0040u32.to_le_bytes()),
            None,
            "bl"
        );
        let site = c_site();
        assert!(Aarch64::stub_reaches(&site, S + 4 + (1 << 27) - 4));
        assert!(!Aarch64::stub_reaches(&site, S + 4 + (1 << 27)));
    }
}
