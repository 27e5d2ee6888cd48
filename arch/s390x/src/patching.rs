//! Rewriting a live s390x site (the plans of [`klp_arch::patching`]).
//!
//! The site is one 6-byte instruction in every state: `brcl 0,…` as found
//! ([`form::BRCL`]; `-pg -mfentry -mnop-mcount`, and klp-user's `patchable!`
//! wrappers):
//!
//! | state | bytes |
//! |---|---|
//! | original | `brcl 0,d` as found (`c0 04`, a nop whatever `d`) |
//! | trampoline | `brasl %r0,stub` (`c0 05`); the site's stub ([`stub_bytes_to`]) jumps to the entry trampoline through r1 |
//! | jump | `jg new_function` (`c0 f4`, only within ±4 GiB) |
//!
//! ## The plan
//!
//! The first halfword (opcode and mask/register) and the 4-byte displacement are
//! written with aligned halfword stores; each is block-concurrent, the instruction as a
//! whole is not, so the displacement is only rewritten while the first halfword makes
//! it irrelevant:
//! * `c0 04`, `brcl 0`: a nop whatever the displacement;
//! * `00 00`, the trap: operation code 00 is never assigned, so the instruction raises
//!   an operation exception (`SIGILL`) whatever follows. (0x0001 and 0x0002 are
//!   avoided: the kernel gives them to ptrace and uprobes.)
//!
//! With a synchronisation round after each step:
//! 1. if the displacement changes while the site branches: the first halfword becomes
//!    the nop when the new state is the original, the trap otherwise;
//! 2. the displacement;
//! 3. the new first halfword.
//!
//! A CPU runs the instructions it fetched until it serialises, and the round after each
//! step serialises every thread (a signal interrupts it). So after step 1's round no
//! thread can still combine the old branching halfword with a displacement being
//! written, and after step 2's round every thread that sees the new first halfword
//! sees the whole new displacement with it. A site that is the nop already (installing
//! the trampoline) skips step 1: the first halfword flips once, from `c0 04` to
//! `c0 05`, the kernel's enabling of an ftrace site.
//!
//! The nop is not a safe intermediate everywhere: whoever calls the function while the
//! site is the nop runs the original body. That is right while a site is being
//! installed or removed, but not between the trampoline and a jump, where threads run
//! a replacement. There the trap stands in ([`TrapEntry`]): a thread that reaches it
//! is sent into the entry trampoline as if the site had called it through its stub
//! (r0 = `S + 6`, the pc the trampoline itself), and the trampoline's decision is right
//! in every state of the site. No thread is ever inside the site (one instruction), so
//! the plan has no [`klp_arch::patching::Resume`] rule.

use klp_arch::patching::{
    MAX_STUB, Plan, PlanCtx, PlanError, SitePlanner, SiteState, Sync, TrapEntry,
};
use klp_arch::{Arch, Redirect, Site, SiteForm};

use crate::site::form;
use crate::{S390x, insn};

/// Bytes of a site.
pub const LEN: usize = insn::RIL_LEN;

/// The first halfword of the trap (operation code 00).
pub const TRAP: [u8; 2] = [0x00, 0x00];

/// Bytes of a site's stub ([`stub_bytes_to`]).
pub const STUB_LEN: usize = 24;

/// `si_code` of an illegal-opcode `SIGILL` (`ILL_ILLOPC`).
const ILL_ILLOPC: i32 = 1;

/// A site's stub that continues at `target`:
///
/// ```text
/// c0 10 00 00 00 08     larl %r1, .+16      (the literal below)
/// e3 10 10 00 00 04     lg   %r1, 0(%r1)
/// 07 f1                 br   %r1
/// 07 07                 nopr %r7            (padding)
/// <target, 8 bytes big-endian>
/// ```
///
/// Register contract: only r1 changes (volatile, never an argument, and free at the
/// trampoline's entry). r0 (= `S + 6`, from the site's `brasl %r0`), r14 (the caller's
/// return address), r15, the arguments and the condition code reach `target` as the
/// site left them. Position-independent: the stub may be anywhere within `brasl`
/// reach of its site (place it 8-byte aligned: the literal is then aligned).
pub fn stub_bytes_to(target: u64) -> [u8; STUB_LEN] {
    let mut b = [0u8; STUB_LEN];
    let parts = [
        0xc0, 0x10, 0, 0, 0, 8, 0xe3, 0x10, 0x10, 0, 0, 0x04, 0x07, 0xf1, 0x07, 0x07,
    ]
    .into_iter()
    .chain(target.to_be_bytes());
    for (d, s) in b.iter_mut().zip(parts) {
        *d = s;
    }
    b
}

/// The bytes of state `to` at `site`.
fn bytes_of(site: &Site, to: SiteState, ctx: &PlanCtx) -> Result<[u8; LEN], PlanError> {
    let (r, target) = match to {
        SiteState::Original => {
            return site
                .original
                .as_slice()
                .try_into()
                .map_err(|_| PlanError::NotLive);
        }
        SiteState::Trampoline => (Redirect::call(ctx.stub), ctx.stub),
        SiteState::Jump(t) => (Redirect::jump(t), t),
    };
    let b = S390x::encode_redirect(site, r).map_err(|_| PlanError::OutOfReach { to: target })?;
    b.as_slice().try_into().map_err(|_| PlanError::Unknown)
}

impl SitePlanner for S390x {
    const TRAP_SIGNAL: Option<i32> = Some(4);
    const TRAP_BYTES: &'static [u8] = &TRAP;

    fn live_site(site: &Site) -> bool {
        site.form == SiteForm::new(form::BRCL) && site.len() == LEN && site.addr().is_multiple_of(2)
    }

    fn plan(site: &Site, now: &[u8], to: SiteState, ctx: &PlanCtx) -> Result<Plan, PlanError> {
        if !Self::live_site(site) {
            return Err(PlanError::NotLive);
        }
        let new = bytes_of(site, to, ctx)?;
        let (op_old, d_old) = now.split_at_checked(2).ok_or(PlanError::Unknown)?;
        if d_old.len() != LEN - 2
            || ![insn::BRCL_0, insn::BRASL_R0, insn::JG]
                .iter()
                .any(|o| o == op_old)
        {
            return Err(PlanError::Unknown);
        }
        let (op_new, d_new) = new.split_at(2);
        let hold: &[u8] = if op_new == insn::BRCL_0 {
            &insn::BRCL_0
        } else {
            &TRAP
        };
        let mut plan = Plan::new();
        let mut op = op_old;
        if d_old != d_new {
            if op != insn::BRCL_0 {
                if hold == TRAP {
                    plan.trap = Some(TrapEntry {
                        at: ctx.addr,
                        pc: ctx.trampoline,
                        link: Some(ctx.addr.wrapping_add(LEN as u64)),
                        push: None,
                    });
                }
                plan.push(0, hold, Sync::Round).ok_or(PlanError::Unknown)?;
                op = hold;
            }
            plan.push(2, d_new, Sync::Round).ok_or(PlanError::Unknown)?;
        }
        if op != op_new {
            plan.push(0, op_new, Sync::Round)
                .ok_or(PlanError::Unknown)?;
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
        insn::brasl_r0(site.addr(), stub).is_ok()
    }

    /// An operation exception reports the instruction's address in `si_addr`.
    fn trap_address(_pc: u64, code: i32, addr: u64) -> Option<u64> {
        (code == ILL_ILLOPC).then_some(addr)
    }

    /// The reported address, or a PSW at the trap or past its 2 bytes (whichever the
    /// kernel or an emulator reports; `si_code` is not relied on).
    fn trapped_at(at: u64, pc: u64, _code: i32, addr: u64) -> bool {
        addr == at || pc == at || pc == at.wrapping_add(TRAP.len() as u64)
    }

    fn wrapper_body(at: u64, code: &[u8]) -> Option<u64> {
        let (op, d) = code.split_first_chunk::<2>()?;
        if *op != insn::JG {
            return None;
        }
        let d = i32::from_be_bytes(*d.first_chunk::<4>()?);
        Some(at.wrapping_add(i64::from(d).wrapping_mul(2) as u64))
    }
}

/// No call site is retargeted: the entry's branch serves every caller (every item is
/// the trait's default).
impl klp_arch::CallSites for S390x {}

#[cfg(test)]
mod tests {
    extern crate std;

    use super::*;
    use klp_arch::FuncInfo;
    use std::vec::Vec;

    const S: u64 = 0x100_0000;

    fn ctx() -> PlanCtx {
        PlanCtx {
            addr: S,
            stub: S + 0x1000,
            trampoline: S + 0x9000,
        }
    }

    fn site() -> Site {
        S390x::find_site(&insn::BRCL_0_0, FuncInfo::at(S)).expect("site")
    }

    fn stores(p: &Plan) -> Vec<(u8, Vec<u8>)> {
        p.steps()
            .map(|s| (s.offset, s.bytes.as_slice().to_vec()))
            .collect()
    }

    /// `brasl %r0, S+0x1000`: `c0 05` + 0x1000 / 2 = 0x800 halfwords, by hand.
    const TRAMP: [u8; 6] = [0xc0, 0x05, 0, 0, 0x08, 0];
    /// `jg S+0x2000`: `c0 f4` + 0x1000 halfwords.
    const JUMP: [u8; 6] = [0xc0, 0xf4, 0, 0, 0x10, 0];

    #[test]
    fn installing_flips_the_first_halfword_once() {
        let p = S390x::plan(&site(), &insn::BRCL_0_0, SiteState::Trampoline, &ctx()).expect("plan");
        assert_eq!(
            stores(&p),
            [(2, std::vec![0, 0, 0x08, 0]), (0, std::vec![0xc0, 0x05])]
        );
        assert_eq!(p.result(insn::BRCL_0_0), Some(TRAMP));
        assert_eq!(p.trap, None, "the nop holds while the displacement changes");
    }

    #[test]
    fn trampoline_to_jump_holds_the_trap_and_enters_the_trampoline() {
        let p = S390x::plan(&site(), &TRAMP, SiteState::Jump(S + 0x2000), &ctx()).expect("plan");
        assert_eq!(
            stores(&p),
            [
                (0, TRAP.to_vec()),
                (2, std::vec![0, 0, 0x10, 0]),
                (0, std::vec![0xc0, 0xf4])
            ]
        );
        assert_eq!(p.result(TRAMP), Some(JUMP));
        assert_eq!(
            p.trap,
            Some(TrapEntry {
                at: S,
                pc: S + 0x9000,
                link: Some(S + 6),
                push: None
            })
        );
        // Back to the original: the nop holds, no trap.
        let p = S390x::plan(&site(), &JUMP, SiteState::Original, &ctx()).expect("plan");
        assert_eq!(p.result(JUMP), Some(insn::BRCL_0_0));
        assert_eq!(stores(&p)[0], (0, insn::BRCL_0.to_vec()));
        assert_eq!(p.trap, None);
    }

    #[test]
    fn every_transition_shows_only_whole_instructions_or_a_hold() {
        let states = [
            (SiteState::Original, insn::BRCL_0_0),
            (SiteState::Trampoline, TRAMP),
            (SiteState::Jump(S + 0x2000), JUMP),
        ];
        for (from, now) in states {
            for (to, want) in states {
                let p = S390x::plan(&site(), &now, to, &ctx()).expect("plan");
                assert_eq!(p.result(now), Some(want), "{from:?} -> {to:?}");
                let mut mem = now;
                for s in p.steps() {
                    let at = usize::from(s.offset);
                    mem[at..at + s.bytes.len()].copy_from_slice(s.bytes.as_slice());
                    // A branching first halfword only ever sits on its own displacement.
                    let ok =
                        mem == now || mem == want || mem[..2] == insn::BRCL_0 || mem[..2] == TRAP;
                    assert!(ok, "{from:?} -> {to:?}: {mem:x?}");
                }
                if mem[..2] == TRAP || p.steps().any(|s| s.bytes.as_slice() == TRAP) {
                    assert!(p.trap.is_some());
                }
            }
        }
    }

    #[test]
    fn refusals_and_decoding() {
        let far = S + (1 << 32);
        assert_eq!(
            S390x::plan(&site(), &insn::BRCL_0_0, SiteState::Jump(far), &ctx()),
            Err(PlanError::OutOfReach { to: far })
        );
        assert_eq!(
            S390x::plan(
                &site(),
                &[0x07, 0x00, 0x07, 0x00, 0x07, 0x00],
                SiteState::Original,
                &ctx()
            ),
            Err(PlanError::Unknown)
        );
        assert_eq!(
            S390x::wrapper_body(0x1000, &[0xc0, 0xf4, 0, 0, 0, 8]),
            Some(0x1010)
        );
        assert_eq!(
            S390x::wrapper_body(0x1000, &[0xc0, 0xf4, 0xff, 0xff, 0xff, 0xff]),
            Some(0x0ffe)
        );
        assert_eq!(S390x::wrapper_body(0x1000, &[0xc0, 0x04, 0, 0, 0, 8]), None);
        assert_eq!(S390x::trap_address(2, ILL_ILLOPC, 0x1000), Some(0x1000));
        assert_eq!(S390x::trap_address(2, 2, 0x1000), None);
        assert!(S390x::trapped_at(0x1000, 0x1002, 0, 0));
        assert!(S390x::trapped_at(0x1000, 0x2000, 4, 0x1000));
        assert!(!S390x::trapped_at(0x1000, 0x1006, 4, 0x1004));
        let mut out = [0u8; MAX_STUB];
        assert_eq!(S390x::stub(0, 0x1122_3344_5566_7788, &mut out), 24);
        assert_eq!(
            out[16..24],
            [0x11, 0x22, 0x33, 0x44, 0x55, 0x66, 0x77, 0x88]
        );
    }
}
