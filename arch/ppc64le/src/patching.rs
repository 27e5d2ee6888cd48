//! Rewriting a live ppc64le site (the plans of [`klp_arch::patching`]).
//!
//! The site is the two words at a function's local entry (`S`), in one of two forms:
//! `nop; nop` ([`form::NOPS`], klp-user's `patchable!` wrappers), or the
//! `mflr r0; bl _mcount` of C built with `-pg -mprofile-kernel`
//! ([`form::PROFILE_KERNEL`], the kernel's site).
//!
//! | state | word 0 (`S`) | word 1 (`S + 4`) |
//! |---|---|---|
//! | original | `nop` / `mflr r0` | `nop` / `bl _mcount` |
//! | trampoline | `mflr r0` | `bl stub`; the site's stub ([`stub_bytes_to`]) jumps to the entry trampoline through CTR |
//! | jump | `b T_local` | `bl stub` (never reached) |
//!
//! `T_local` is the local entry of `T`. A jump is only written when `T` shares the
//! site's TOC (same object, not a "caller-saved r2" function) and is within ±32 MiB
//! of `S` ([`SitePlanner::jump_entry`]); otherwise the trampoline stays. The word the
//! trampoline's decision returns carries [`OTHER_TOC`] when `T` has another TOC
//! ([`SitePlanner::published_target`]): the trampoline then calls it from a detour
//! frame that keeps the caller's r2.
//!
//! ## The plan
//!
//! Each step is one aligned 4-byte store (single-copy atomic for instruction fetch),
//! the cache sequence of [`crate::CACHE_SYNC`], then a synchronisation round. The
//! steps:
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
//! A store of the word already there is left out (a `-mprofile-kernel` site keeps its
//! `mflr r0`, so only its `bl` changes between `_mcount` and the stub).
//!
//! Why every intermediate pair is safe (a thread may execute word 0 of one state and
//! word 1 of the next):
//! * `(mflr, nop)`: the original body runs (r0 is a volatile non-argument register);
//!   `(mflr, bl _mcount)` too, through the no-op `_mcount`.
//! * `(nop, bl)` never exists: a thread would call the trampoline with a stale r0 (not
//!   its return address). `bl` is written only after `mflr` and a round; during every
//!   round a thread stopped at `S + 4` resumes at `S` ([`Resume`]), so a thread that
//!   ran the old word 0 runs the current one instead (every word 0 may be run again
//!   from `S`: `nop` and `mflr r0` change no live register, LR is still the caller's
//!   return address, and `b T` enters `T` as a direct call would). Removal writes the
//!   original word 1 over `bl` first.
//! * `(b T, bl)`: `b` skips word 1; a thread past an old `mflr` calls the trampoline,
//!   whose decision is right in every state (the view is published before the site
//!   changes).

use klp_arch::patching::{
    MAX_STUB, Plan, PlanCtx, PlanError, Resume, SitePlanner, SiteState, Sync, TargetInfo,
};
use klp_arch::{Arch, Endian, Redirect, Site, read_u32};

use crate::insn::{BCTR, MTCTR_R12};
use crate::site::{LEN, form, local_entry_offset};
use crate::{Ppc64le, insn};

/// The tag of a replacement with another TOC in the word the trampoline's decision
/// returns (instructions are 4-aligned, so bit 0 is free).
pub const OTHER_TOC: u64 = 1;

/// Bytes of a site's stub ([`stub_bytes_to`]).
pub const STUB_LEN: usize = 32;

/// `trap`: pads the stub (never reached).
const TRAP: u32 = 0x7fe0_0008;

/// A site's stub that continues at `target`:
///
/// ```text
/// lis   r12, target@highest
/// ori   r12, r12, target@higher
/// sldi  r12, r12, 32
/// oris  r12, r12, target@h
/// ori   r12, r12, target@l
/// mtctr r12
/// bctr
/// trap                          (padding)
/// ```
///
/// Register contract: only r12 and CTR change (both volatile, neither an argument,
/// and r12 is dead at a local entry, where every site is). LR (= `S + 8`, from the
/// site's `bl`), r0 (the caller's return address), r2 (the patched function's TOC),
/// the arguments and r1 reach `target` as the site left them. The address is built
/// from immediates, so the stub needs no TOC and no `bcl` (which would clobber LR);
/// it may be anywhere within `bl` reach of its site.
pub fn stub_bytes_to(target: u64) -> [u8; STUB_LEN] {
    let [l0, l1, l2, l3, l4] = insn::load_r12(target);
    let words = [l0, l1, l2, l3, l4, MTCTR_R12, BCTR, TRAP];
    let mut b = [0u8; STUB_LEN];
    for (d, w) in b.chunks_exact_mut(4).zip(words) {
        d.copy_from_slice(&w.to_le_bytes());
    }
    b
}

/// The ELFv2 local-entry field of `st_other` (bits 5–7); 1 marks a function that
/// treats r2 as caller-saved (it may change the TOC pointer).
fn local_field(st_other: u8) -> u8 {
    st_other >> 5
}

fn words(b: &[u8]) -> Option<[u32; 2]> {
    Some([
        read_u32(b, 0, Endian::Little)?,
        read_u32(b, 4, Endian::Little)?,
    ])
}

/// Which state the words `now` are, given the original words and the trampoline
/// state's.
fn state_of(now: [u32; 2], orig: [u32; 2], call: [u32; 2]) -> Option<SiteState> {
    if now == orig {
        Some(SiteState::Original)
    } else if now == call {
        Some(SiteState::Trampoline)
    } else if now[0] & !insn::LI_MASK == insn::B && now[1] == call[1] {
        Some(SiteState::Jump(0))
    } else {
        None
    }
}

impl SitePlanner for Ppc64le {
    fn live_site(site: &Site) -> bool {
        matches!(site.form.code, form::NOPS | form::PROFILE_KERNEL)
            && site.len() == LEN
            && site.addr().is_multiple_of(4)
    }

    fn plan(site: &Site, now: &[u8], to: SiteState, ctx: &PlanCtx) -> Result<Plan, PlanError> {
        if !Self::live_site(site) {
            return Err(PlanError::NotLive);
        }
        let orig = words(site.original.as_slice()).ok_or(PlanError::NotLive)?;
        let now = words(now).ok_or(PlanError::Unknown)?;
        let call = Ppc64le::encode_redirect(site, Redirect::call(ctx.stub))
            .ok()
            .and_then(|b| words(b.as_slice()))
            .ok_or(PlanError::OutOfReach { to: ctx.stub })?;
        let jump = match to {
            SiteState::Jump(t) => Ppc64le::encode_redirect(site, Redirect::jump(t))
                .ok()
                .and_then(|b| read_u32(b.as_slice(), 0, Endian::Little))
                .ok_or(PlanError::OutOfReach { to: t })?,
            _ => 0,
        };
        let from = state_of(now, orig, call).ok_or(PlanError::Unknown)?;
        let [mflr, bl] = call;
        // The stores of one leg, `(offset, word)`.
        let leg = |s: SiteState, to: SiteState| -> [Option<(u8, u32)>; 2] {
            match (s, to) {
                (SiteState::Original, SiteState::Trampoline) => [Some((0, mflr)), Some((4, bl))],
                (SiteState::Trampoline, SiteState::Original) => {
                    [Some((4, orig[1])), Some((0, orig[0]))]
                }
                (_, SiteState::Jump(_)) => [Some((0, jump)), None],
                (SiteState::Jump(_), SiteState::Trampoline) => [Some((0, mflr)), None],
                _ => [None, None],
            }
        };
        let legs = match (from, to) {
            (SiteState::Original, SiteState::Jump(_))
            | (SiteState::Jump(_), SiteState::Original) => [
                leg(from, SiteState::Trampoline),
                leg(SiteState::Trampoline, to),
            ],
            _ => [leg(from, to), [None, None]],
        };
        let mut mem = now;
        let mut plan = Plan::new();
        for (off, w) in legs.into_iter().flatten().flatten() {
            let Some(m) = mem.get_mut(usize::from(off / 4)) else {
                continue;
            };
            if *m != w {
                *m = w;
                plan.push(off, &w.to_le_bytes(), Sync::Round)
                    .ok_or(PlanError::Unknown)?;
            }
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
        for (d, s) in out.iter_mut().zip(stub_bytes_to(target)) {
            *d = s;
        }
        STUB_LEN
    }

    fn stub_reaches(site: &Site, stub: u64) -> bool {
        insn::bl(site.addr().wrapping_add(4), stub).is_ok()
    }

    fn wrapper_body(at: u64, code: &[u8]) -> Option<u64> {
        let w = read_u32(code, 0, Endian::Little)?;
        if w & !insn::LI_MASK != insn::B {
            return None;
        }
        insn::branch_target(w, at)
    }

    fn published_target(t: &TargetInfo) -> u64 {
        let caller_saved_r2 = t
            .symbol
            .is_some_and(|(start, st_other)| start == t.addr && local_field(st_other) == 1);
        if !t.same_object || caller_saved_r2 {
            t.addr | OTHER_TOC
        } else {
            t.addr
        }
    }

    fn jump_entry(t: &TargetInfo) -> Option<u64> {
        let (start, st_other) = t.symbol?;
        if !t.same_object || start != t.addr || local_field(st_other) == 1 {
            return None;
        }
        t.addr.checked_add(local_entry_offset(st_other)?)
    }
}

/// No call site is retargeted: the entry's branch serves every caller (every item is
/// the trait's default).
impl klp_arch::CallSites for Ppc64le {}

#[cfg(test)]
mod tests {
    extern crate std;

    use super::*;
    use klp_arch::FuncInfo;
    use std::vec::Vec;

    const S: u64 = 0x1000_0100;
    const STUB: u64 = S + 0x1000;
    const NOP: u32 = insn::NOP;
    const MFLR: u32 = insn::MFLR_R0;
    /// `bl .+0xffc` from S+4 (LI = 0xffc, AA = 0, LK = 1), by hand.
    const BL_STUB: u32 = 0x4800_0ffd;
    /// `b .+0x800` from S, by hand.
    const B_T: u32 = 0x4800_0800;

    fn bytes(w: [u32; 2]) -> [u8; 8] {
        let mut b = [0u8; 8];
        b[..4].copy_from_slice(&w[0].to_le_bytes());
        b[4..].copy_from_slice(&w[1].to_le_bytes());
        b
    }

    fn site_of(w: [u32; 2]) -> Site {
        Ppc64le::find_site(&bytes(w), FuncInfo::at(S)).expect("a site")
    }

    fn ctx() -> PlanCtx {
        PlanCtx {
            addr: S,
            stub: STUB,
            trampoline: 0,
        }
    }

    fn stores(p: &Plan) -> Vec<(u8, u32)> {
        p.steps()
            .map(|s| {
                (
                    s.offset,
                    read_u32(s.bytes.as_slice(), 0, Endian::Little).unwrap(),
                )
            })
            .collect()
    }

    /// What a thread runs on fetching word 0 of one state and word 1 of another.
    fn stale_r0(w0: u32, w1: u32) -> bool {
        w0 == NOP && w1 & !insn::LI_MASK == insn::BL
    }

    #[test]
    fn every_transition_of_the_table() {
        let site = site_of([NOP, NOP]);
        let states = [
            (SiteState::Original, [NOP, NOP]),
            (SiteState::Trampoline, [MFLR, BL_STUB]),
            (SiteState::Jump(S + 0x800), [B_T, BL_STUB]),
        ];
        for (from, now) in states {
            for (to, want) in states {
                let p = Ppc64le::plan(&site, &bytes(now), to, &ctx()).expect("plan");
                assert_eq!(
                    p.result(bytes(now)),
                    Some(bytes(want)),
                    "{from:?} -> {to:?}"
                );
                // Every pair a thread can run is safe.
                let mut mem = now;
                for (off, w) in stores(&p) {
                    let before = mem;
                    mem[usize::from(off / 4)] = w;
                    assert!(!stale_r0(before[0], mem[1]), "{from:?} -> {to:?}: {mem:x?}");
                    assert!(!stale_r0(mem[0], mem[1]), "{from:?} -> {to:?}: {mem:x?}");
                }
                if from == to {
                    assert!(p.is_empty());
                } else {
                    assert_eq!(
                        p.resume.map(|r| (r.from, r.end, r.to)),
                        Some((S + 4, S + 8, S))
                    );
                }
            }
        }
        let p = Ppc64le::plan(&site, &bytes([NOP, NOP]), SiteState::Trampoline, &ctx());
        assert_eq!(stores(&p.expect("plan")), [(0, MFLR), (4, BL_STUB)]);
        let p = Ppc64le::plan(&site, &bytes([MFLR, BL_STUB]), SiteState::Original, &ctx());
        assert_eq!(stores(&p.expect("plan")), [(4, NOP), (0, NOP)]);
    }

    #[test]
    fn a_profile_kernel_site_changes_only_its_bl() {
        let mcount = S - 0x100;
        let bl_mcount = insn::bl(S + 4, mcount).unwrap();
        let site = site_of([MFLR, bl_mcount]);
        let p = Ppc64le::plan(
            &site,
            &bytes([MFLR, bl_mcount]),
            SiteState::Trampoline,
            &ctx(),
        );
        assert_eq!(stores(&p.expect("plan")), [(4, BL_STUB)]);
        let p = Ppc64le::plan(&site, &bytes([MFLR, BL_STUB]), SiteState::Original, &ctx());
        assert_eq!(stores(&p.expect("plan")), [(4, bl_mcount)]);
    }

    #[test]
    fn refusals() {
        let site = site_of([NOP, NOP]);
        let far = S + (1 << 25);
        assert_eq!(
            Ppc64le::plan(&site, &bytes([NOP, NOP]), SiteState::Jump(far), &ctx()),
            Err(PlanError::OutOfReach { to: far })
        );
        assert_eq!(
            Ppc64le::plan(&site, &bytes([NOP, BL_STUB]), SiteState::Original, &ctx()),
            Err(PlanError::Unknown),
            "nop before bl is no state"
        );
    }

    #[test]
    fn targets_and_jump_entries_follow_the_toc() {
        const LOCAL8: u8 = 3 << 5;
        let t = |same_object, symbol| TargetInfo {
            addr: 0x2000,
            same_object,
            symbol,
        };
        assert_eq!(
            Ppc64le::published_target(&t(true, Some((0x2000, LOCAL8)))),
            0x2000
        );
        assert_eq!(
            Ppc64le::jump_entry(&t(true, Some((0x2000, LOCAL8)))),
            Some(0x2008)
        );
        assert_eq!(
            Ppc64le::jump_entry(&t(true, Some((0x2000, 0)))),
            Some(0x2000)
        );
        assert_eq!(
            Ppc64le::published_target(&t(false, Some((0x2000, LOCAL8)))),
            0x2001
        );
        assert_eq!(Ppc64le::jump_entry(&t(false, Some((0x2000, LOCAL8)))), None);
        // Field 1: r2 is caller-saved.
        assert_eq!(
            Ppc64le::published_target(&t(true, Some((0x2000, 1 << 5)))),
            0x2001
        );
        assert_eq!(Ppc64le::jump_entry(&t(true, Some((0x2000, 1 << 5)))), None);
        // Inside a function: no jump, same TOC.
        assert_eq!(Ppc64le::jump_entry(&t(true, Some((0x1f00, LOCAL8)))), None);
        assert_eq!(Ppc64le::published_target(&t(true, None)), 0x2000);
    }

    #[test]
    fn the_stub_and_the_wrapper_body() {
        let mut out = [0u8; MAX_STUB];
        assert_eq!(Ppc64le::stub(0, 0x1122_3344_5566_7788, &mut out), 32);
        // mtctr r12; bctr; trap at the end.
        assert_eq!(
            out[20..32],
            [
                0xa6, 0x03, 0x89, 0x7d, 0x20, 0x04, 0x80, 0x4e, 0x08, 0, 0xe0, 0x7f
            ]
        );
        assert_eq!(
            Ppc64le::wrapper_body(S, &B_T.to_le_bytes()),
            Some(S + 0x800)
        );
        assert_eq!(Ppc64le::wrapper_body(S, &BL_STUB.to_le_bytes()), None);
        let site = site_of([NOP, NOP]);
        assert!(Ppc64le::stub_reaches(&site, S + 4 + (1 << 25) - 4));
        assert!(!Ppc64le::stub_reaches(&site, S + 4 + (1 << 25)));
    }
}
