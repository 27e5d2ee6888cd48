//! Rewriting a live riscv64 site (the plans of [`klp_arch::patching`]).
//!
//! A site `S` is two 4-byte aligned words `w0 w1` (see [`crate::site`]): `nop; nop`
//! (gcc without the C extension, and klp-user's `patchable!` wrappers), four `c.nop`s
//! (gcc with C, `-fpatchable-function-entry=4`), or the armed `auipc t0; nop`. Its
//! states (`A` = `auipc t0, hi(stub)`, `R` = `jalr t0, lo(stub)(t0)`, both encoded for
//! the site's own stub, so that `R` after `A` enters the stub with `t0 = S + 8`):
//!
//! | state | `w0` | `w1` |
//! |---|---|---|
//! | original | as found (`nop`, `c.nop c.nop`, or the found `auipc t0`) | as found (`nop`, `c.nop c.nop`) |
//! | trampoline | `A` | `R`; the stub ([`stub_bytes_to`]) jumps to the entry trampoline through `t1` |
//! | jump | `jal zero, F` (only within ±1 MiB of `S`) | left as it was (`R`, `nop`, `c.nop c.nop`, or [`NOP_C`]) |
//!
//! What a thread does with the words it fetched: `nop`/`c.nop`/`A` then `nop`/`c.nop`
//! is the original function (`t0` is a temporary, dead at a function's entry); `jal
//! zero, F` goes to `F` with `ra` still the caller's return address (a direct call of
//! `F`; `w1` is not reached); `A` then `R` enters the stub, then the trampoline, with
//! `t0 = S + 8` and `ra` the caller's return address. The bad combinations:
//! * `R` after anything but this `A`: `jalr` through a `t0` the matching `auipc` never
//!   set (a stale or foreign value);
//! * a thread standing at `S + 2` or `S + 6` (between two `c.nop`s) that fetches the
//!   upper half of a 32-bit instruction written there since: garbage.
//!
//! ## The `c.nop` halves
//!
//! A 4-byte store over two `c.nop`s changes the halfword a thread standing between
//! them is about to execute. [`NOP_C`] (`addi zero, sp, 0`, a HINT that executes as a
//! no-op) is a 32-bit no-op whose upper half is `c.nop` (0x0001): stored over
//! `c.nop c.nop` it changes only the lower half, so a thread at the middle still runs
//! a `c.nop`, and a thread at the start runs one no-op or two. A word therefore goes
//! between `c.nop c.nop` and any other 32-bit instruction through [`NOP_C`], with a
//! round (below) in between: after it, no thread stands in the middle of that word,
//! and none can get there while the word holds a 32-bit instruction. This replaces
//! the kernel's one-time "settle" at boot, which a running process cannot have; no
//! moment without threads in the site is needed.
//!
//! ## The plan
//!
//! Each step is one aligned 4-byte store of a whole instruction (the RISC-V kernel's
//! ftrace relies on the same: an aligned 32-bit instruction fetch sees the old or the
//! new word), followed by the coherence sequence on every hart
//! (`live::klp_riscv64_sync_icache`: `fence.i` and `riscv_flush_icache`), and
//! a synchronisation round ([`Sync::Round`]). During every round a thread found inside
//! the site past its first halfword (`S + 2 ≤ pc < S + 8`) resumes at `S` ([`Resume`]):
//! it has run at most `w0` and a `c.nop` of `w1`, in a version nobody knows, and
//! running the site again from the start is harmless (nothing but `t0`, dead at entry,
//! has changed; `ra`, `sp` and the arguments are the caller's). So after a step's
//! round, every thread that reaches `S + 4` executed the current `w0` first, and none
//! stands inside a word that was changed. Between two rounds, a thread fetches each
//! word in the version before or after the step's store; only one word changes per
//! step, so whatever it fetched is the state before or after the step. Every state of
//! a plan is therefore checked alone: no state ever holds `R` after a `w0` other than
//! `A` or `jal`, and a word only changes from or to `c.nop c.nop` through [`NOP_C`].
//!
//! The orders (`o0 o1` the original words):
//! * to the trampoline: from a jump, `w1 := R` first (unreachable behind the `jal`),
//!   then `w0 := A`; otherwise `w1` out of `c.nop c.nop` (to [`NOP_C`]), then
//!   `w0 := A` (through [`NOP_C`] from `c.nop`s), then `w1 := R`. The original
//!   behaviour lasts until the last store, and a thread that ran the old `w0` is moved
//!   back before `R` appears;
//! * to the original: `w1 := o1` first (the `R` goes while `w0` still holds `A` or
//!   `jal`), then `w0 := o0`; a C site ends with its `c.nop`s back, so that its bytes
//!   are the ones found and the site is found again later;
//! * to a jump: `w0 := jal zero, F` only (through [`NOP_C`] from `c.nop`s); `w1` stays.
//!
//! At most four steps (a C site from or to its `c.nop`s); each transition runs only
//! the behaviours of its two end states (the tests explore every interleaving of a
//! thread's fetches with the stores and rounds).
//!
//! Limits: the rounds reach the host's registered threads only. A thread the host
//! does not know, or one interrupted inside the site by another signal whose handler
//! runs through the whole write, is not moved; it may then run `R` after a stale `w0`
//! or a torn halfword. A jump to a target out of `jal`'s reach is refused, writing
//! nothing (the site then stays on the trampoline).

use klp_arch::patching::{
    MAX_STUB, Plan, PlanCtx, PlanError, Resume, SitePlanner, SiteState, Sync,
};
use klp_arch::{Endian, Site, read_u32};

use crate::Riscv64;
use crate::insn::{self, reg};
use crate::site::{LEN, SITE_ALIGN, form};

/// `addi zero, sp, 0`: I-type, imm 0, `rs1` = 2 (`2 << 15` = 0x10000), funct3 0,
/// `rd` 0, opcode 0x13. A HINT (no architectural effect) whose upper halfword is
/// `c.nop` (0x0001); see the module docs.
pub const NOP_C: u32 = 0x0001_0013;
/// Two `c.nop`s read as one little-endian word.
pub const C_NOPS: u32 = 0x0001_0001;

/// Bytes of a site's stub ([`stub_bytes_to`]).
pub const STUB_LEN: usize = 24;

/// `auipc t1, 0`: U-type, `rd` = 6 (`6 << 7` = 0x300), opcode 0x17.
const AUIPC_T1: u32 = 0x0000_0317;
/// `ld t1, 16(t1)`: imm 16 (`16 << 20`), `rs1` 6 (0x30000), funct3 3 (0x3000), `rd` 6
/// (0x300), opcode 0x03.
const LD_T1_16: u32 = 0x0103_3303;
/// `jalr zero, 0(t1)` (`jr t1`): `rs1` 6 (0x30000), opcode 0x67.
const JR_T1: u32 = 0x0003_0067;

/// A site's stub that continues at `target`:
///
/// ```text
/// 00000317   auipc t1, 0
/// 01033303   ld    t1, 16(t1)     (the literal below)
/// 00030067   jalr  zero, 0(t1)
/// 00000013   nop                  (aligns the literal)
/// <target, 8 bytes little-endian>
/// ```
///
/// Register contract: only `t1` (a temporary that the psABI lets PLT entries and
/// linker stubs clobber on any call, and that the trampoline's contract allows) changes;
/// `t0` (= `S + 8`, from the site's `jalr t0`), `ra` (the caller's return address),
/// `t2` (the static chain), the arguments and `sp` reach `target` as the site left
/// them. Position-independent: the stub may be anywhere within the `auipc` pair's reach
/// of its site, and reaches `target` wherever it is. Place it 8-byte aligned (the
/// literal is then aligned).
pub fn stub_bytes_to(target: u64) -> [u8; STUB_LEN] {
    let mut b = [0u8; STUB_LEN];
    let bytes = [AUIPC_T1, LD_T1_16, JR_T1, insn::NOP]
        .into_iter()
        .flat_map(u32::to_le_bytes)
        .chain(target.to_le_bytes());
    for (d, s) in b.iter_mut().zip(bytes) {
        *d = s;
    }
    b
}

/// Whether `w` is `jal zero, <any>`.
fn is_jump(w: u32) -> bool {
    insn::opcode(w) == insn::op::JAL && insn::rd(w) == reg::ZERO
}

/// The words of a site: its original ones, and the trampoline state's (if the stub is
/// within reach).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Words {
    original: [u32; 2],
    /// `[A, R]`.
    call: Option<[u32; 2]>,
}

impl Words {
    /// Whether the site has `c.nop`s (then [`NOP_C`] may stand in either word).
    fn c(&self) -> bool {
        self.original.contains(&C_NOPS)
    }

    /// Whether `cur` is a state the plans write (see the module docs): `w0` original,
    /// [`NOP_C`] (C sites), `A` or a `jal zero`; `w1` original, [`NOP_C`] (C sites) or
    /// `R`; and `R` only behind `A` or a `jal`.
    fn known(&self, cur: [u32; 2]) -> bool {
        let [c0, c1] = cur;
        let [o0, o1] = self.original;
        let a = self.call.map(|[a, _]| a);
        let r = self.call.map(|[_, r]| r);
        let settle = |w: u32| self.c() && w == NOP_C;
        let known0 = c0 == o0 || settle(c0) || Some(c0) == a || is_jump(c0);
        let known1 = c1 == o1 || settle(c1) || Some(c1) == r;
        let guarded = Some(c1) != r || Some(c0) == a || is_jump(c0);
        known0 && known1 && guarded
    }
}

/// The stores of one plan, in order: `(word index, word)`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct Steps {
    now: [u32; 2],
    out: [Option<(u8, u32)>; klp_arch::patching::MAX_STEPS],
    len: usize,
}

impl Steps {
    fn new(now: [u32; 2]) -> Steps {
        Steps {
            now,
            ..Steps::default()
        }
    }

    /// Stores `w` into word `i` unless it holds it already.
    fn put(&mut self, i: usize, w: u32) -> Result<(), PlanError> {
        let slot = self.now.get_mut(i).ok_or(PlanError::Unknown)?;
        if *slot == w {
            return Ok(());
        }
        *slot = w;
        let at = self.out.get_mut(self.len).ok_or(PlanError::Unknown)?;
        *at = Some((i as u8, w));
        self.len = self.len.saturating_add(1);
        Ok(())
    }

    /// Stores `w` into word `i`, through [`NOP_C`] when the word goes from or to two
    /// `c.nop`s (see the module docs).
    fn settle(&mut self, i: usize, w: u32) -> Result<(), PlanError> {
        let cur = self.now.get(i).copied().ok_or(PlanError::Unknown)?;
        let plain = |x: u32| x != C_NOPS && x != NOP_C;
        if (cur == C_NOPS && plain(w)) || (plain(cur) && w == C_NOPS) {
            self.put(i, NOP_C)?;
        }
        self.put(i, w)
    }
}

/// Where the site's states go, as stores (see the module docs for the orders).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Goal {
    Original,
    Trampoline,
    /// `jal zero, F`.
    Jump(u32),
}

/// The word stores that take a site with `words`, holding `cur`, to `goal`.
fn word_steps(words: &Words, cur: [u32; 2], goal: Goal) -> Result<Steps, PlanError> {
    if !words.known(cur) {
        return Err(PlanError::Unknown);
    }
    let mut s = Steps::new(cur);
    match goal {
        Goal::Original => {
            let [o0, o1] = words.original;
            s.settle(1, o1)?;
            s.settle(0, o0)?;
        }
        Goal::Jump(j) => s.settle(0, j)?,
        Goal::Trampoline => {
            let [a, r] = words.call.ok_or(PlanError::Unknown)?;
            if is_jump(cur[0]) {
                s.settle(1, r)?;
                s.put(0, a)?;
            } else {
                if cur[1] == C_NOPS {
                    s.put(1, NOP_C)?;
                }
                s.settle(0, a)?;
                s.put(1, r)?;
            }
        }
    }
    Ok(s)
}

/// The rule of every round of a plan at `addr`: past the first halfword, back to the
/// start.
pub const fn resume_rule(addr: u64) -> Resume {
    Resume {
        from: addr.wrapping_add(2),
        end: addr.wrapping_add(LEN as u64),
        to: addr,
    }
}

impl SitePlanner for Riscv64 {
    fn live_site(site: &Site) -> bool {
        matches!(site.form.code, form::NOPS | form::C_NOPS | form::ARMED)
            && site.len() == LEN
            && site.addr().is_multiple_of(SITE_ALIGN)
    }

    fn plan(site: &Site, now: &[u8], to: SiteState, ctx: &PlanCtx) -> Result<Plan, PlanError> {
        if !Self::live_site(site) {
            return Err(PlanError::NotLive);
        }
        let word = |b: &[u8], i| read_u32(b, i, Endian::Little).ok_or(PlanError::Unknown);
        let o = site.original.as_slice();
        let words = Words {
            original: [word(o, 0)?, word(o, 4)?],
            call: insn::call_t0(ctx.addr, ctx.stub).ok(),
        };
        let cur = [word(now, 0)?, word(now, 4)?];
        let goal = match to {
            SiteState::Original => Goal::Original,
            SiteState::Trampoline => {
                if words.call.is_none() {
                    return Err(PlanError::OutOfReach { to: ctx.stub });
                }
                Goal::Trampoline
            }
            SiteState::Jump(t) => Goal::Jump(
                insn::jal(reg::ZERO, ctx.addr, t).map_err(|_| PlanError::OutOfReach { to: t })?,
            ),
        };
        let steps = word_steps(&words, cur, goal)?;
        let mut plan = Plan::new();
        for (i, w) in steps.out.into_iter().flatten() {
            plan.push(i.saturating_mul(4), &w.to_le_bytes(), Sync::Round)
                .ok_or(PlanError::Unknown)?;
        }
        if !plan.is_empty() {
            plan.resume = Some(resume_rule(ctx.addr));
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
        insn::call_t0(site.addr(), stub).is_ok()
    }

    /// The wrapper's tail branch: `auipc rd, hi; jalr zero, lo(rd)` (what
    /// `patchable_wrapper!` emits, `rd` = `t1`), or a
    /// `jal zero`.
    fn wrapper_body(at: u64, code: &[u8]) -> Option<u64> {
        let w0 = read_u32(code, 0, Endian::Little)?;
        if is_jump(w0) {
            return insn::jal_target(w0, at);
        }
        let w1 = read_u32(code, 4, Endian::Little)?;
        let rd = insn::rd(w0);
        let pair = insn::opcode(w0) == insn::op::AUIPC
            && rd != reg::ZERO
            && w1 & !insn::I_IMM == insn::jalr(reg::ZERO, rd, 0);
        pair.then(|| {
            at.wrapping_add(insn::u_imm(w0) as u64)
                .wrapping_add(insn::i_imm(w1) as u64)
        })
    }
}

/// No call site is retargeted: the entry's branch serves every caller (every item is
/// the trait's default).
impl klp_arch::CallSites for Riscv64 {}

#[cfg(test)]
mod tests {
    extern crate std;

    use super::*;
    use klp_arch::{Arch, FuncInfo};
    use std::collections::BTreeSet;
    use std::vec;
    use std::vec::Vec;

    const NOP: u32 = insn::NOP;
    const S: u64 = 0x40_0000;
    /// The stub 0x1000 above the site: hi = (0x1000 + 0x800) >> 12 = 1, lo = 0.
    const STUB: u64 = S + 0x1000;
    /// `auipc t0, 1`: `1 << 12` | `5 << 7` (0x280) | 0x17.
    const A: u32 = 0x0000_1297;
    /// `jalr t0, 0(t0)`: `rs1` 5 (0x28000) | `rd` 5 (0x280) | 0x67.
    const R: u32 = 0x0002_82e7;
    /// `jal zero, S + 0x800`: imm[11] -> bit 20.
    const J: u32 = 0x0010_006f;
    const F: u64 = S + 0x800;
    /// `jal zero, S - 0x100`: -0x100 = imm[20:8] all set: bit 31 (imm[20]), bits
    /// 19:12 (imm[19:12] = 0xff), bit 20 (imm[11]), bits 30:29 of imm[10:1] (imm[10:8]
    /// -> bits 30:28): 0x80000000 | 0xff000 | 0x100000 | 0x70000000.
    const J2: u32 = 0xf01f_f06f;
    const F2: u64 = S - 0x100;

    fn bytes(w: [u32; 2]) -> [u8; 8] {
        let mut b = [0u8; 8];
        b[..4].copy_from_slice(&w[0].to_le_bytes());
        b[4..].copy_from_slice(&w[1].to_le_bytes());
        b
    }

    fn site_of(w: [u32; 2]) -> Site {
        Riscv64::find_site(&bytes(w), FuncInfo::at(S)).expect("site")
    }

    fn ctx() -> PlanCtx {
        PlanCtx {
            addr: S,
            stub: STUB,
            trampoline: S + 0x10_0000,
        }
    }

    fn words_of(site: &Site) -> Words {
        let o = site.original.as_slice();
        Words {
            original: [
                read_u32(o, 0, Endian::Little).unwrap(),
                read_u32(o, 4, Endian::Little).unwrap(),
            ],
            call: Some([A, R]),
        }
    }

    /// The plan's steps as `(offset, word, sync)`.
    fn plan_words(site: &Site, now: [u32; 2], to: SiteState) -> Result<Vec<(u8, u32)>, PlanError> {
        let p = Riscv64::plan(site, &bytes(now), to, &ctx())?;
        assert_eq!(p.trap, None);
        let st: Vec<(u8, u32)> = p
            .steps()
            .map(|s| {
                assert_eq!(s.sync, Sync::Round);
                let b = s.bytes.as_slice();
                (s.offset, u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            })
            .collect();
        let rule = (!st.is_empty()).then_some(Resume {
            from: S + 2,
            end: S + 8,
            to: S,
        });
        assert_eq!(p.resume, rule);
        Ok(st)
    }

    /// What a thread does at the site.
    #[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
    enum Runs {
        /// Falls through to `S + 8`.
        Original,
        /// Enters the stub with `t0 = S + 8`.
        Trampoline,
        /// Jumps to this address with `ra` untouched.
        Jump(u64),
        /// Anything else: a torn instruction, a `jalr` through a stale `t0`.
        Broken,
    }

    /// Every outcome of a thread running the site while memory goes through `mems`
    /// (the state before the plan, then after each step), the `r`-th round (after
    /// store `r`) applying `rule`. Between its rounds `r` and `r + 1`, each of the
    /// thread's fetches sees version `r` or `r + 1` of the word it reads (an aligned
    /// word is fetched whole; the `c.nop` at an odd halfword is the upper half of a
    /// word fetched on its own). A thread may enter at any time. The thread's state is
    /// (pc offset, `t0`, rounds taken); explored exhaustively.
    fn explore(mems: &[[u32; 2]], rule: Option<Resume>) -> BTreeSet<Runs> {
        let n = mems.len() - 1;
        let mut out = BTreeSet::new();
        let mut seen = BTreeSet::new();
        let mut todo: Vec<(u64, Option<u64>, usize)> = (0..=n).map(|r| (0, None, r)).collect();
        while let Some(st) = todo.pop() {
            if !seen.insert(st) {
                continue;
            }
            let (pc, t0, r) = st;
            if pc == 8 {
                out.insert(Runs::Original);
                continue;
            }
            if r < n {
                let at = S + pc;
                let moved = rule.and_then(|x| x.apply(at)).map_or(pc, |to| to - S);
                todo.push((moved, t0, r + 1));
            }
            for v in [r, (r + 1).min(n)] {
                let w = mems[v][(pc / 4) as usize];
                if pc % 4 == 2 {
                    if w >> 16 == u32::from(insn::C_NOP) {
                        todo.push((pc + 2, t0, r));
                    } else {
                        out.insert(Runs::Broken);
                    }
                    continue;
                }
                if w & 0xffff == u32::from(insn::C_NOP) {
                    todo.push((pc + 2, t0, r));
                } else if !insn::is_32bit(w as u16) {
                    out.insert(Runs::Broken);
                } else if w == NOP || w == NOP_C {
                    todo.push((pc + 4, t0, r));
                } else if insn::is_auipc_t0(w) {
                    let t = (S + pc).wrapping_add(insn::u_imm(w) as u64);
                    todo.push((pc + 4, Some(t), r));
                } else if w & !insn::I_IMM == insn::JALR_T0_T0 {
                    let to = t0.map(|t| t.wrapping_add(insn::i_imm(w) as u64));
                    out.insert(if to == Some(STUB) && pc == 4 {
                        Runs::Trampoline
                    } else {
                        Runs::Broken
                    });
                } else if is_jump(w) && pc == 0 {
                    out.insert(Runs::Jump(insn::jal_target(w, S).unwrap()));
                } else {
                    out.insert(Runs::Broken);
                }
            }
        }
        out
    }

    /// What a thread does at a site holding `w` (no write under way).
    fn runs(w: [u32; 2]) -> BTreeSet<Runs> {
        explore(&[w], None)
    }

    /// The states a plan goes through, from `from`.
    fn states(from: [u32; 2], steps: &[(u8, u32)]) -> Vec<[u32; 2]> {
        let mut m = from;
        let mut out = vec![m];
        for &(off, w) in steps {
            m[usize::from(off / 4)] = w;
            out.push(m);
        }
        out
    }

    /// Every known state of each site form (the states any plan writes, as the
    /// closure from the original below shows).
    fn known_states(words: &Words) -> Vec<[u32; 2]> {
        let w0 = [words.original[0], NOP_C, A, J, J2];
        let w1 = [words.original[1], NOP_C, R];
        let mut out = Vec::new();
        for a in w0 {
            for b in w1 {
                if words.known([a, b]) && !out.contains(&[a, b]) {
                    out.push([a, b]);
                }
            }
        }
        out
    }

    fn forms() -> [[u32; 2]; 3] {
        [[NOP, NOP], [C_NOPS, C_NOPS], [0x0000_3297, NOP]]
    }

    /// Every transition between the states, from every known state of each form: each
    /// stored word is a whole aligned word, the plan ends in the goal, a thread
    /// interleaving its fetches with the stores and rounds in any way runs the
    /// behaviour of the start or of the end state and nothing else, and every state a
    /// plan passes through is known (a plan cut short can be resumed).
    #[test]
    fn every_transition_keeps_each_thread_consistent() {
        let rule = Some(resume_rule(S));
        let goals = [
            SiteState::Original,
            SiteState::Trampoline,
            SiteState::Jump(F),
            SiteState::Jump(F2),
        ];
        let mut checked = 0;
        for original in forms() {
            let site = site_of(original);
            let words = words_of(&site);
            let all = known_states(&words);
            assert!(all.contains(&original) && all.contains(&[A, R]));
            for &from in &all {
                let before = runs(from);
                assert_eq!(before.len(), 1, "{from:x?} runs {before:?}");
                assert!(!before.contains(&Runs::Broken), "{from:x?}");
                for to in goals {
                    let steps = plan_words(&site, from, to).expect("a plan");
                    assert!(steps.len() <= 4);
                    let mems = states(from, &steps);
                    let end = *mems.last().unwrap();
                    for m in &mems {
                        assert!(words.known(*m), "{from:x?} -> {to:?}: {m:x?}");
                    }
                    let after = runs(end);
                    let want = match to {
                        SiteState::Original => Runs::Original,
                        SiteState::Trampoline => Runs::Trampoline,
                        SiteState::Jump(t) => Runs::Jump(t),
                    };
                    assert_eq!(after, [want].into(), "{from:x?} -> {to:?}: {end:x?}");
                    if to == SiteState::Original {
                        assert_eq!(end, original, "restored as found");
                    }
                    let ok: BTreeSet<Runs> = before.union(&after).copied().collect();
                    let got = explore(&mems, rule);
                    assert!(
                        got.is_subset(&ok),
                        "{from:x?} -> {to:?} via {mems:x?}: {got:?}"
                    );
                    checked += 1;
                    let again = plan_words(&site, end, to).expect("a plan");
                    assert!(again.is_empty(), "{from:x?} -> {to:?} twice: {again:x?}");
                }
            }
        }
        assert!(checked > 60, "{checked}");
    }

    /// The checker finds the hazards the plans avoid.
    #[test]
    fn the_model_sees_the_hazards() {
        // `R` written after `A` with no round rule: a thread that ran the old `nop`
        // and stood at `S + 4` jumps through a stale `t0`.
        let mems = [[NOP, NOP], [A, NOP], [A, R]];
        assert!(explore(&mems, None).contains(&Runs::Broken));
        assert!(!explore(&mems, Some(resume_rule(S))).contains(&Runs::Broken));
        // `A` straight over `c.nop`s: a thread between them runs half an `auipc`.
        let mems = [[C_NOPS, NOP_C], [A, NOP_C]];
        assert!(explore(&mems, Some(resume_rule(S))).contains(&Runs::Broken));
        // Through NOP_C, with its round, it cannot.
        let mems = [[C_NOPS, NOP_C], [NOP_C, NOP_C], [A, NOP_C]];
        assert!(!explore(&mems, Some(resume_rule(S))).contains(&Runs::Broken));
        // `c.nop`s straight back over a `jal`: a thread that ran the new first `c.nop`
        // may fetch the old upper half.
        let mems = [[J, C_NOPS], [C_NOPS, C_NOPS]];
        assert!(explore(&mems, Some(resume_rule(S))).contains(&Runs::Broken));
        // Both words at once are not a step; R behind a nop is unsafe on its own.
        assert_eq!(runs([NOP, R]), [Runs::Broken].into());
        assert_eq!(runs([0x0000_2297, R]), [Runs::Broken].into(), "another hi");
    }

    /// The plans of a `nop; nop` site, by hand.
    #[test]
    fn nop_site_plans() {
        let site = site_of([NOP, NOP]);
        let p = |now, to| plan_words(&site, now, to);
        assert_eq!(
            p([NOP, NOP], SiteState::Trampoline),
            Ok(vec![(0, A), (4, R)])
        );
        assert_eq!(p([A, R], SiteState::Original), Ok(vec![(4, NOP), (0, NOP)]));
        assert_eq!(p([A, R], SiteState::Jump(F)), Ok(vec![(0, J)]));
        assert_eq!(p([J, R], SiteState::Trampoline), Ok(vec![(0, A)]));
        assert_eq!(p([J, R], SiteState::Jump(F2)), Ok(vec![(0, J2)]));
        assert_eq!(p([J, R], SiteState::Original), Ok(vec![(4, NOP), (0, NOP)]));
        assert_eq!(p([NOP, NOP], SiteState::Jump(F)), Ok(vec![(0, J)]));
        assert_eq!(p([J, NOP], SiteState::Trampoline), Ok(vec![(4, R), (0, A)]));
        assert_eq!(p([J, NOP], SiteState::Original), Ok(vec![(0, NOP)]));
        assert_eq!(p([A, NOP], SiteState::Trampoline), Ok(vec![(4, R)]));
        assert_eq!(p([NOP, NOP], SiteState::Original), Ok(vec![]));
        // The bytes of the trampoline state: auipc t0, 1; jalr t0, 0(t0).
        let t = Riscv64::plan(&site, &bytes([NOP, NOP]), SiteState::Trampoline, &ctx())
            .unwrap()
            .result(bytes([NOP, NOP]));
        assert_eq!(t, Some([0x97, 0x12, 0x00, 0x00, 0xe7, 0x82, 0x02, 0x00]));
    }

    /// The plans of a `c.nop` site, by hand: every word through `addi zero, sp, 0`.
    #[test]
    fn c_nop_site_plans() {
        let site = site_of([C_NOPS, C_NOPS]);
        assert_eq!(site.form.code, form::C_NOPS);
        let p = |now, to| plan_words(&site, now, to);
        let cc = C_NOPS;
        assert_eq!(
            p([cc, cc], SiteState::Trampoline),
            Ok(vec![(4, NOP_C), (0, NOP_C), (0, A), (4, R)])
        );
        assert_eq!(
            p([A, R], SiteState::Original),
            Ok(vec![(4, NOP_C), (4, cc), (0, NOP_C), (0, cc)])
        );
        assert_eq!(
            p([cc, cc], SiteState::Jump(F)),
            Ok(vec![(0, NOP_C), (0, J)])
        );
        assert_eq!(
            p([J, cc], SiteState::Trampoline),
            Ok(vec![(4, NOP_C), (4, R), (0, A)])
        );
        assert_eq!(
            p([J, cc], SiteState::Original),
            Ok(vec![(0, NOP_C), (0, cc)])
        );
        assert_eq!(p([A, R], SiteState::Jump(F)), Ok(vec![(0, J)]));
        assert_eq!(
            p([J, R], SiteState::Original),
            Ok(vec![(4, NOP_C), (4, cc), (0, NOP_C), (0, cc)])
        );
        // An interrupted plan goes on from where it stopped.
        assert_eq!(
            p([NOP_C, NOP_C], SiteState::Trampoline),
            Ok(vec![(0, A), (4, R)])
        );
        // addi zero, sp, 0 as bytes; its upper half is c.nop.
        assert_eq!(NOP_C.to_le_bytes(), [0x13, 0x00, 0x01, 0x00]);
        assert_eq!((NOP_C >> 16) as u16, insn::C_NOP);
        assert_eq!(C_NOPS.to_le_bytes(), [0x01, 0x00, 0x01, 0x00]);
    }

    #[test]
    fn unknown_words_are_refused() {
        let site = site_of([NOP, NOP]);
        let p = |now, to| plan_words(&site, now, to);
        assert_eq!(p([NOP, R], SiteState::Original), Err(PlanError::Unknown));
        assert_eq!(
            p([NOP_C, NOP], SiteState::Original),
            Err(PlanError::Unknown),
            "no settling word on a site without c.nops"
        );
        assert_eq!(
            p([0x0000_2297, R], SiteState::Trampoline),
            Err(PlanError::Unknown),
            "another stub's auipc"
        );
        assert_eq!(p([R, NOP], SiteState::Original), Err(PlanError::Unknown));
        assert_eq!(
            p([0x0000_00ef, NOP], SiteState::Original),
            Err(PlanError::Unknown),
            "jal ra"
        );
        let short = Riscv64::plan(&site, &[0x13, 0, 0, 0], SiteState::Original, &ctx());
        assert_eq!(short, Err(PlanError::Unknown));
        let c = site_of([C_NOPS, C_NOPS]);
        assert_eq!(
            plan_words(&c, [C_NOPS, R], SiteState::Original),
            Err(PlanError::Unknown)
        );
    }

    #[test]
    fn out_of_reach_and_foreign_sites_are_refused() {
        let site = site_of([NOP, NOP]);
        let far = S + (1 << 20);
        assert_eq!(
            Riscv64::plan(&site, &bytes([NOP, NOP]), SiteState::Jump(far), &ctx()),
            Err(PlanError::OutOfReach { to: far })
        );
        let stub = S + (1 << 31);
        let c = PlanCtx { stub, ..ctx() };
        assert_eq!(
            Riscv64::plan(&site, &bytes([NOP, NOP]), SiteState::Trampoline, &c),
            Err(PlanError::OutOfReach { to: stub })
        );
        assert_eq!(
            Riscv64::plan(&site, &bytes([NOP, NOP]), SiteState::Original, &c),
            Ok(Plan::new())
        );
        let odd = Site {
            func: FuncInfo::at(S + 2),
            ..site
        };
        assert!(!Riscv64::live_site(&odd));
        let c2 = PlanCtx {
            addr: S + 2,
            ..ctx()
        };
        assert_eq!(
            Riscv64::plan(&odd, &bytes([NOP, NOP]), SiteState::Original, &c2),
            Err(PlanError::NotLive)
        );
        assert!(Riscv64::live_site(&site));
        assert!(Riscv64::live_site(&site_of([C_NOPS, C_NOPS])));
    }

    #[test]
    fn the_stub_and_the_wrapper_body_decode_by_hand() {
        let mut out = [0u8; MAX_STUB];
        assert_eq!(Riscv64::stub(0, 0x1122_3344_5566_7788, &mut out), 24);
        assert_eq!(
            out[..24],
            [
                0x17, 0x03, 0x00, 0x00, // auipc t1, 0
                0x03, 0x33, 0x03, 0x01, // ld t1, 16(t1)
                0x67, 0x00, 0x03, 0x00, // jr t1
                0x13, 0x00, 0x00, 0x00, // nop
                0x88, 0x77, 0x66, 0x55, 0x44, 0x33, 0x22, 0x11
            ]
        );
        assert_eq!(out[24..], [0; MAX_STUB - 24]);
        // The wrapper's tail: auipc t1, 1 (0x1317); jalr zero, -4(t1): imm 0xffc <<
        // 20, rs1 6 (0x30000), opcode 0x67 = 0xffc30067.
        let tail = bytes([0x0000_1317, 0xffc3_0067]);
        assert_eq!(Riscv64::wrapper_body(S, &tail), Some(S + 0x1000 - 4));
        // jal zero, S + 0x800.
        assert_eq!(Riscv64::wrapper_body(S, &J.to_le_bytes()), Some(F));
        // jalr ra (a call, not a tail), or a pair with different registers: no body.
        assert_eq!(
            Riscv64::wrapper_body(S, &bytes([0x0000_1317, 0xffc3_00e7])),
            None
        );
        assert_eq!(
            Riscv64::wrapper_body(S, &bytes([0x0000_1317, 0xffc2_8067])),
            None,
            "jr t0 after auipc t1"
        );
        assert_eq!(
            Riscv64::wrapper_body(S, &0x0000_1317u32.to_le_bytes()),
            None
        );
        let site = site_of([NOP, NOP]);
        assert!(Riscv64::stub_reaches(&site, S + 0x7fff_f7fe));
        assert!(!Riscv64::stub_reaches(&site, S + 0x7fff_f800));
    }
}
