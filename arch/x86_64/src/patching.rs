//! Rewriting a live x86_64 site (the plans of [`klp_arch::patching`]).
//!
//! A site is 5 bytes: a `nopl 0x0(%rax,%rax,1)` (klp-user's `patchable!` wrappers,
//! `-mfentry -mnop-mcount`) or, in C built with `-fpatchable-function-entry=5`, five
//! one-byte nops. Its states:
//!
//! | state | bytes |
//! |---|---|
//! | original | once rewritten, one instruction: five one-byte nops come back as the 5-byte nop ([`crate::site::settled`], as ftrace settles its sites at boot), so only a site's first write pays the breakpoint protocol's rounds |
//! | trampoline | `jmp stub`; the site's stub ([`stub_bytes_to`]) sets `r11` and jumps to the entry trampoline |
//! | jump | `jmp new_function` (only within ±2 GiB) |
//!
//! ## The plan
//!
//! A site that is one instruction now (a nop of its length, a `jmp`) and lies in one
//! aligned 8-byte word is replaced by one atomic store of that word; no thread can be
//! inside one instruction, so serialising every core is enough ([`Sync::Core`]).
//! Any other write follows the kernel's `text_poke_bp`: `int3` on the first byte, the
//! other bytes, the first byte. While it runs, a thread that reaches the breakpoint is
//! sent into the site's stub, as if the site had jumped there ([`TrapEntry`]): the
//! trampoline's decision is right in every state of the site, because a site only ever
//! jumps straight to the implementation the decision would choose. When the site is a
//! run of one-byte nops, a thread may be stopped in its middle: the rounds after each
//! step (a signal to every thread) move it past the run ([`Resume`]); it had begun the
//! original function, and the run's other bytes are nops.

use klp_arch::patching::{
    MAX_STUB, Plan, PlanCtx, PlanError, Resume, SitePlanner, SiteState, Sync, TrapEntry,
};
use klp_arch::{Arch, Redirect, Site};

use crate::site::{form, is_one_instruction, settled};
use crate::{X86_64, insn};

/// Bytes a site has.
pub const SITE_LEN: usize = insn::BRANCH_LEN;

/// Bytes of a site's stub ([`stub_bytes_to`]).
pub const STUB_LEN: usize = 24;

/// `int3`.
pub const INT3: u8 = 0xcc;

/// `si_code` of the `SIGTRAP` an `int3` raises (the kernel's `SI_KERNEL`).
const SI_KERNEL: i32 = 0x80;

/// A site's stub that loads `r11` = `value` and jumps to `target`:
///
/// ```text
/// 49 bb <value: 8 bytes>      movabs r11, value
/// ff 25 00 00 00 00           jmp    qword ptr [rip + 0]
/// <target: 8 bytes>
/// ```
///
/// Position-independent and reach-independent: the stub may be anywhere within
/// ±2 GiB of its site (the site's `jmp rel32`), and reaches `target` wherever it is.
/// The trampoline's contract takes the site in `r11`; a host's own entry path may
/// take something else there (its own contract).
pub fn stub_bytes_to(value: u64, target: u64) -> [u8; STUB_LEN] {
    let mut b = [0u8; STUB_LEN];
    let parts = [0x49, 0xbb]
        .into_iter()
        .chain(value.to_le_bytes())
        .chain([0xff, 0x25, 0, 0, 0, 0])
        .chain(target.to_le_bytes());
    for (d, s) in b.iter_mut().zip(parts) {
        *d = s;
    }
    b
}

impl SitePlanner for X86_64 {
    const TRAP_SIGNAL: Option<i32> = Some(5);
    const TRAP_BYTES: &'static [u8] = &[INT3];

    fn live_site(site: &Site) -> bool {
        site.form.code == form::NOPS && site.len() == SITE_LEN
    }

    fn plan(site: &Site, now: &[u8], to: SiteState, ctx: &PlanCtx) -> Result<Plan, PlanError> {
        if !Self::live_site(site) {
            return Err(PlanError::NotLive);
        }
        if now.len() != SITE_LEN {
            return Err(PlanError::Unknown);
        }
        let new = match to {
            SiteState::Original => settled(site),
            SiteState::Trampoline => X86_64::encode_redirect(site, Redirect::jump(ctx.stub))
                .map_err(|_| PlanError::OutOfReach { to: ctx.stub })?,
            SiteState::Jump(t) => X86_64::encode_redirect(site, Redirect::jump(t))
                .map_err(|_| PlanError::OutOfReach { to: t })?,
        };
        let new = new.as_slice();
        let mut plan = Plan::new();
        if now == new {
            return Ok(plan);
        }
        let whole = is_one_instruction(site, now);
        let in_one_word = (ctx.addr % 8)
            .checked_add(SITE_LEN as u64)
            .is_some_and(|e| e <= 8);
        if whole && in_one_word {
            plan.push(0, new, Sync::Core).ok_or(PlanError::Unknown)?;
            return Ok(plan);
        }
        let sync = if whole { Sync::Core } else { Sync::Round };
        let (first, rest) = new.split_first().ok_or(PlanError::Unknown)?;
        plan.push(0, &[INT3], sync).ok_or(PlanError::Unknown)?;
        plan.push(1, rest, sync).ok_or(PlanError::Unknown)?;
        plan.push(0, &[*first], sync).ok_or(PlanError::Unknown)?;
        plan.trap = Some(TrapEntry {
            at: ctx.addr,
            pc: ctx.stub,
            link: None,
            push: None,
        });
        let end = ctx.addr.wrapping_add(SITE_LEN as u64);
        plan.resume = Some(Resume {
            from: ctx.addr.wrapping_add(1),
            end,
            to: end,
        });
        Ok(plan)
    }

    fn stub(value: u64, target: u64, out: &mut [u8; MAX_STUB]) -> usize {
        for (d, s) in out.iter_mut().zip(stub_bytes_to(value, target)) {
            *d = s;
        }
        STUB_LEN
    }

    fn stub_reaches(site: &Site, stub: u64) -> bool {
        X86_64::encode_redirect(site, Redirect::jump(stub)).is_ok()
    }

    /// `int3` reports the address after it.
    fn trap_address(pc: u64, code: i32, _addr: u64) -> Option<u64> {
        (code == SI_KERNEL).then(|| pc.wrapping_sub(1))
    }

    fn wrapper_body(at: u64, code: &[u8]) -> Option<u64> {
        match code.first()? {
            &insn::JMP_REL32 => insn::rel32_target(code, at, insn::JMP_REL32),
            0xeb => {
                let d = *code.get(1)? as i8;
                Some(at.wrapping_add(2).wrapping_add(d as i64 as u64))
            }
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    extern crate std;

    use super::*;
    use klp_arch::FuncInfo;
    use std::vec::Vec;

    /// An 8-aligned site, and one whose 5 bytes cross an 8-byte boundary.
    const S: u64 = 0x40_1000;
    const CROSSING: u64 = 0x40_1006;
    const STUB: u64 = 0x40_9000;

    fn site_at(addr: u64, code: &[u8]) -> Site {
        X86_64::find_site(code, FuncInfo::at(addr)).expect("a site")
    }

    fn ctx(addr: u64) -> PlanCtx {
        PlanCtx {
            addr,
            stub: STUB,
            trampoline: 0,
        }
    }

    fn stores(p: &Plan) -> Vec<(u8, Vec<u8>, Sync)> {
        p.steps()
            .map(|s| (s.offset, s.bytes.as_slice().to_vec(), s.sync))
            .collect()
    }

    /// `jmp STUB` from S: rel32 = 0x9000 - 0x1000 - 5 = 0x7ffb, by hand.
    const JMP_STUB: [u8; 5] = [0xe9, 0xfb, 0x7f, 0, 0];

    #[test]
    fn one_instruction_in_one_word_is_one_store() {
        let site = site_at(S, &insn::NOP5);
        let p = X86_64::plan(&site, &insn::NOP5, SiteState::Trampoline, &ctx(S)).expect("plan");
        assert_eq!(stores(&p), [(0, JMP_STUB.to_vec(), Sync::Core)]);
        assert_eq!((p.trap, p.resume), (None, None));
        let back = X86_64::plan(&site, &JMP_STUB, SiteState::Original, &ctx(S)).expect("plan");
        assert_eq!(stores(&back), [(0, insn::NOP5.to_vec(), Sync::Core)]);
        assert!(
            X86_64::plan(&site, &insn::NOP5, SiteState::Original, &ctx(S))
                .expect("plan")
                .is_empty()
        );
    }

    #[test]
    fn a_run_of_nops_takes_the_breakpoint_and_rounds() {
        let nops = [0x90; 5];
        let site = site_at(S, &nops);
        let p = X86_64::plan(&site, &nops, SiteState::Trampoline, &ctx(S)).expect("plan");
        assert_eq!(
            stores(&p),
            [
                (0, std::vec![INT3], Sync::Round),
                (1, JMP_STUB[1..].to_vec(), Sync::Round),
                (0, std::vec![0xe9], Sync::Round),
            ]
        );
        assert_eq!(
            p.trap,
            Some(TrapEntry {
                at: S,
                pc: STUB,
                link: None,
                push: None
            })
        );
        assert_eq!(
            p.resume,
            Some(Resume {
                from: S + 1,
                end: S + 5,
                to: S + 5
            })
        );
        // Restored, the site is the one 5-byte nop: later writes are one store.
        let back = X86_64::plan(&site, &JMP_STUB, SiteState::Original, &ctx(S)).expect("plan");
        assert_eq!(back.result(JMP_STUB), Some(insn::NOP5));
        assert_eq!(back.steps().count(), 1);
    }

    #[test]
    fn a_site_across_words_uses_the_breakpoint_with_core_serialisation() {
        let site = site_at(CROSSING, &insn::NOP5);
        let p = X86_64::plan(
            &site,
            &insn::NOP5,
            SiteState::Jump(CROSSING + 0x100),
            &ctx(CROSSING),
        )
        .expect("plan");
        assert_eq!(p.steps().count(), 3);
        assert!(p.steps().all(|s| s.sync == Sync::Core));
        // jmp +0x100 from CROSSING: rel32 = 0x100 - 5 = 0xfb.
        assert_eq!(p.result(insn::NOP5), Some([0xe9, 0xfb, 0, 0, 0]));
        assert!(p.trap.is_some());
    }

    #[test]
    fn refusals_and_decoding() {
        let site = site_at(S, &insn::NOP5);
        let far = S + (1 << 31) + 5;
        assert_eq!(
            X86_64::plan(&site, &insn::NOP5, SiteState::Jump(far), &ctx(S)),
            Err(PlanError::OutOfReach { to: far })
        );
        assert!(X86_64::stub_reaches(&site, S + 5 + (1 << 31) - 1));
        assert!(!X86_64::stub_reaches(&site, S + 5 + (1 << 31)));
        assert_eq!(X86_64::trap_address(S + 1, SI_KERNEL, 0), Some(S));
        assert_eq!(X86_64::trap_address(S + 1, 1, 0), None);
        assert_eq!(
            X86_64::wrapper_body(S, &[0xe9, 0xfb, 0x0f, 0, 0]),
            Some(S + 0x1000)
        );
        assert_eq!(X86_64::wrapper_body(S, &[0xeb, 0xfe]), Some(S));
        assert_eq!(X86_64::wrapper_body(S, &[0xe8, 0, 0, 0, 0]), None);
        let mut out = [0u8; MAX_STUB];
        assert_eq!(X86_64::stub(0x1122, 0x3344, &mut out), 24);
        assert_eq!(
            out[..12],
            [0x49, 0xbb, 0x22, 0x11, 0, 0, 0, 0, 0, 0, 0xff, 0x25]
        );
        assert_eq!(out[16..18], [0x44, 0x33]);
    }
}
