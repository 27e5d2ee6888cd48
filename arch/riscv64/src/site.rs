//! riscv64 patch sites.
//!
//! Recognised unpatched forms (8 bytes at the function's symbol; riscv has no landing
//! pad in the code gcc 12 emits, so [`SiteForm::landing_pad`] is always false):
//!
//! | form | bytes (memory order) | from |
//! |---|---|---|
//! | [`form::NOPS`] | `13 00 00 00 13 00 00 00` (`nop; nop`) | gcc without the C extension (`-march=rv64g`): `-fpatchable-function-entry=2` (or more: the site is the first two); the kernel's `ftrace_make_nop` form (v6.5–v6.15) |
//! | [`form::C_NOPS`] | `01 00 01 00 01 00 01 00` (4 × `c.nop`) | gcc with the C extension (`-march=rv64gc`, the default of `riscv64-linux-gnu-gcc`): `-fpatchable-function-entry=4` (the kernel's `CC_FLAGS_FTRACE` with `RISCV_ISA_C`; `=8,4` with call ops from v6.16 puts 4 more before the symbol) |
//! | [`form::ARMED`] | `auipc t0, hi; nop` | [`armed`]: a site made ready for one-word writes; the kernel's `ftrace_init_nop` form from v6.16 (the `auipc` stays, only the second word toggles) |
//!
//! gcc counts `-fpatchable-function-entry` in *instructions*, and with the C extension
//! its `nop`s assemble as 2-byte `c.nop`s: `=2` then gives only 4 bytes (refused as
//! [`SiteError::TooShort`]), `=4` the 8 bytes a site needs. Without C, `=2` gives the 8
//! bytes. `-fpatchable-function-entry=4` therefore works for both (16 bytes of `nop`
//! without C, of which the site is the first 8). With C, gcc aligns functions to 2
//! bytes only (`.align 1`); add `-falign-functions=4` (see "Writing a site").
//!
//! # Redirects (8 bytes, two 4-byte instructions)
//!
//! * `Call`: `auipc t0, hi; jalr t0, lo(t0)`, reaching the trampoline within
//!   `[-2^31 - 2^11, 2^31 - 2^11)` of the site (the kernel's ftrace call since v6.5).
//!   **On entry to the trampoline** `ra` still holds the caller's return address,
//!   `t0` holds the return point into the function (`site + 8`, the first instruction
//!   after the site), `sp` and the argument registers `a0`–`a7` are as the caller left
//!   them. The trampoline resumes at `t0` (the original body) or jumps (`jr`, no link)
//!   to the new function, which therefore **enters with `ra` = the caller's return
//!   address** and returns straight to the caller. `t0` is a temporary that is dead at
//!   a function's entry under the psABI, so the site may clobber it.
//! * `Jump`: `jal zero, new_func` in the first word, `nop` in the second: `ra` and `t0`
//!   are untouched and `new_func` returns straight to the caller. Its reach is `jal`'s,
//!   `[-1 MiB, 1 MiB)`; a farther target is [`EncodeError::OutOfRange`] (the core then
//!   stays on the trampoline). A two-word `auipc t0; jalr zero` jump would reach
//!   ±2 GiB, but it would put a second `auipc` value in the first word, which breaks
//!   the write order below.
//!
//! # Writing a site
//!
//! No store rewrites the 8 bytes for every other hart at once: a naturally aligned
//! 4-byte store is fetched by another hart (after the coherence sequence, see the
//! crate docs) as either the old or the new instruction, but the two words of a site
//! change one at a time, and a thread can stop (preemption, a signal) between
//! executing the first word and the second. The hazard is a thread that executed an
//! *old* first word and then runs a *new* `jalr …(t0)`: it jumps through a `t0` the
//! matching `auipc` never set. The order that avoids it, which is the kernel's since
//! v6.16:
//!
//! 1. The site must be 4-byte aligned, so that each word is one aligned store:
//!    [`encode`] refuses another site with [`EncodeError::Misaligned`] `{ align: 4 }`.
//!    (The kernel selects `FUNCTION_ALIGNMENT_4B` for the same reason.)
//! 2. [`form::C_NOPS`] is four instructions: a thread may stand at `site + 2` or
//!    `site + 6`, in the middle of any word written there. It is first **settled**
//!    ([`settled`]: `nop; nop`) once, at a moment when no thread's pc is inside the
//!    site (the kernel does it at boot and at module load, before the code runs).
//! 3. It is then **armed** ([`armed`]: the first word becomes `auipc t0, hi(T)` for the
//!    trampoline `T`). That store alone is harmless (`t0` is dead), but before any
//!    `jalr` is stored in the second word, no thread may be at `site + 4` having
//!    executed the old first word: one more moment with no thread's pc at `site + 4`.
//! 4. From then on the first word only ever holds `auipc t0, hi(T)` (the same `T`;
//!    moving to a trampoline with another `hi` repeats step 3) or `jal zero, F`. Every
//!    thread at `site + 4` has then executed `auipc t0, hi(T)`, so the second word may
//!    hold `nop` or `jalr t0, lo(T)(t0)` at any time, and every transition is two
//!    single-word stores in the order [`store_order`] gives:
//!    * to a `Jump`: the first word first. New entries jump; the second word is no
//!      longer reached by new entries. (The encoder gives `nop` there; a host may
//!      leave the `Call`'s `jalr` instead, so that a thread stalled at `site + 4`
//!      still reaches the trampoline rather than the old body.)
//!    * to a `Call`, or back to [`armed`]: the second word first, then the first.
//!    * to undo a redirect, a host writes [`armed`] rather than [`Arch::restore`]'s
//!      original bytes: going back to `nop; nop` (or the `c.nop`s) would need steps 2
//!      and 3 again. (The kernel's `ftrace_make_nop` from v6.16 also only rewrites the
//!      `jalr`.)
//!
//! A process cannot have step 2's moment without threads in the site. Its host uses
//! the plans of [`crate::patching`] instead: the same two word states and store orders,
//! a synchronisation round after every store that moves threads inside the site back
//! to its start (for steps 2 and 3), the `c.nop`s settled through a 32-bit no-op whose
//! upper half is `c.nop`, and the original bytes written back on restore.
//!
//! [`Arch::restore`]: klp_arch::Arch::restore

use klp_arch::{
    EncodeError, Endian, FuncInfo, InsnBytes, Redirect, RedirectKind, Site, SiteError, SiteForm,
    read_u16, read_u32,
};

use crate::insn::{self, reg};

/// The forms of the table above: the `code` of a [`SiteForm`].
pub mod form {
    /// `nop; nop`.
    pub const NOPS: u8 = 1;
    /// Four `c.nop`s.
    pub const C_NOPS: u8 = 2;
    /// `auipc t0, hi; nop`. Its [`SiteForm::target`](klp_arch::SiteForm) is the
    /// value the `auipc` puts in `t0` (`site + (hi << 12)`).
    pub const ARMED: u8 = 3;
}

/// Bytes a redirect rewrites.
pub const LEN: usize = 8;
/// The alignment a site needs to be written with single-word stores.
pub const SITE_ALIGN: u64 = 4;

const LE: Endian = Endian::Little;

/// The length of the run of `nop`s and `c.nop`s at the start of `code`, counting no
/// further than a site's length.
fn nop_run(code: &[u8]) -> usize {
    let mut len = 0usize;
    while len < LEN {
        let step = if read_u16(code, len, LE) == Some(insn::C_NOP) {
            2
        } else if read_u32(code, len, LE) == Some(insn::NOP) {
            4
        } else {
            break;
        };
        len = len.saturating_add(step);
    }
    len
}

/// Whether `code` ends within the instruction at `at`.
fn ends_inside(code: &[u8], at: usize) -> bool {
    let rest = code.len().saturating_sub(at);
    match read_u16(code, at, LE) {
        None => true,
        Some(h) => insn::is_32bit(h) && rest < 4,
    }
}

/// Recognises the site at the entry of `func` (see the module docs).
pub fn find(code: &[u8], func: FuncInfo) -> Result<Site, SiteError> {
    let at = func.addr;
    let found = InsnBytes::prefix_of(code);
    let w0 = read_u32(code, 0, LE);
    let w1 = read_u32(code, 4, LE);
    let halves = [0, 2, 4, 6].map(|o| read_u16(code, o, LE));
    let form = match (w0, w1) {
        (Some(insn::NOP), Some(insn::NOP)) => Some(SiteForm::new(form::NOPS)),
        (Some(a), Some(insn::NOP)) if insn::is_auipc_t0(a) => {
            Some(SiteForm::new(form::ARMED).calling(at.wrapping_add(insn::u_imm(a) as u64)))
        }
        _ if halves == [Some(insn::C_NOP); 4] => Some(SiteForm::new(form::C_NOPS)),
        _ => None,
    };
    if let Some(form) = form {
        let original = code
            .get(..LEN)
            .and_then(InsnBytes::from_slice)
            .ok_or(SiteError::Unrecognised { at, found })?;
        return Ok(Site {
            func,
            offset: 0,
            form,
            original,
        });
    }
    let run = nop_run(code);
    let truncated = SiteError::Truncated {
        at,
        have: code.len(),
        needed: LEN,
    };
    if code.len() < LEN && w0.is_some_and(insn::is_auipc_t0) && w1.is_none() {
        // The first word of the armed form, cut short.
        return Err(truncated);
    }
    if run >= LEN {
        // A run that mixes `nop` and `c.nop`: no compiler emits it.
        return Err(SiteError::Unrecognised { at, found });
    }
    if code.len() < LEN && ends_inside(code, run) {
        return Err(truncated);
    }
    if run == 0 {
        return Err(SiteError::Unrecognised { at, found });
    }
    Err(SiteError::TooShort {
        at,
        found,
        needed: LEN as u8,
    })
}

fn words(w: [u32; 2]) -> InsnBytes {
    let mut out = InsnBytes::EMPTY;
    for x in w {
        // Two words always fit in an InsnBytes.
        let _ = out.push_u32(x, LE);
    }
    out
}

fn aligned(site: &Site, to: u64) -> Result<u64, EncodeError> {
    let from = site.addr();
    if !from.is_multiple_of(SITE_ALIGN) {
        return Err(EncodeError::Misaligned {
            from,
            to,
            align: SITE_ALIGN,
        });
    }
    Ok(from)
}

/// The bytes performing `redirect` at `site` (see the module docs).
pub fn encode(site: &Site, redirect: Redirect) -> Result<InsnBytes, EncodeError> {
    let to = redirect.target;
    let from = aligned(site, to)?;
    let w = match redirect.kind {
        RedirectKind::Call => insn::call_t0(from, to)?,
        RedirectKind::Jump => [insn::jal(reg::ZERO, from, to)?, insn::NOP],
    };
    Ok(words(w))
}

/// The site as one instruction per word: `nop; nop` for the `nop` forms (what the
/// kernel's `ftrace_init_nop` made of gcc's `c.nop`s up to v6.15), the armed site as it
/// is. Written once while no thread is inside the site (step 2 of the module docs).
pub fn settled(site: &Site) -> InsnBytes {
    if site.form.code == form::ARMED {
        return site.original;
    }
    words([insn::NOP, insn::NOP])
}

/// `auipc t0, hi(trampoline); nop`: the site ready to become a `Call` to `trampoline`
/// with a store of its second word (step 3 of the module docs).
pub fn armed(site: &Site, trampoline: u64) -> Result<InsnBytes, EncodeError> {
    let from = aligned(site, trampoline)?;
    Ok(words([insn::auipc_t0_for(from, trampoline)?, insn::NOP]))
}

/// The order in which a host stores the two words of `next` (offsets into the site):
/// the first word first when it is a `jal` (a `Jump`), the second word first
/// otherwise (a `Call`, [`armed`]). See step 4 of the module docs.
pub fn store_order(next: &[u8]) -> [usize; 2] {
    match read_u32(next, 0, LE) {
        Some(w) if insn::opcode(w) == insn::op::JAL => [0, 4],
        _ => [4, 0],
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Riscv64;
    use klp_arch::Arch;

    extern crate std;
    use std::vec::Vec;

    const F: u64 = 0xffff_ffff_8010_0000;
    /// `nop` as gcc emits it without C (objdump: `00000013 nop`).
    const NOP: [u8; 4] = [0x13, 0, 0, 0];
    /// `c.nop` (objdump: `0001 nop`).
    const CNOP: [u8; 2] = [0x01, 0x00];
    /// `addi sp, sp, -16` (objdump: `ff010113`).
    const ADDI_SP: [u8; 4] = [0x13, 0x01, 0x01, 0xff];
    /// `c.addi sp, -16` (objdump: `1141`).
    const C_ADDI_SP: [u8; 2] = [0x41, 0x11];
    /// `sd s0, 0(sp)` compressed (objdump: `e022`).
    const C_SD_S0: [u8; 2] = [0x22, 0xe0];

    fn site(code: &[u8]) -> Result<Site, SiteError> {
        Riscv64::find_site(code, FuncInfo::at(F))
    }

    fn cat(parts: &[&[u8]]) -> Vec<u8> {
        parts.concat()
    }

    fn le(w: &[u32]) -> Vec<u8> {
        w.iter().flat_map(|x| x.to_le_bytes()).collect()
    }

    #[test]
    fn rv64g_nops() {
        // gcc -march=rv64g -fpatchable-function-entry=2.
        let s = site(&cat(&[&NOP, &NOP, &ADDI_SP])).unwrap();
        assert_eq!(s.form, SiteForm::new(form::NOPS));
        assert_eq!((s.addr(), s.len(), s.offset), (F, 8, 0));
        assert_eq!(s.original.as_slice(), &cat(&[&NOP, &NOP])[..]);
        // -fpatchable-function-entry=4: four nops, the site is the first two.
        let s = site(&cat(&[&NOP, &NOP, &NOP, &NOP, &ADDI_SP])).unwrap();
        assert_eq!((s.form, s.len()), (SiteForm::new(form::NOPS), 8));
    }

    #[test]
    fn rv64gc_c_nops() {
        // gcc -march=rv64gc -fpatchable-function-entry=4.
        let s = site(&cat(&[&CNOP, &CNOP, &CNOP, &CNOP, &C_ADDI_SP, &C_SD_S0])).unwrap();
        assert_eq!(s.form, SiteForm::new(form::C_NOPS));
        assert_eq!(s.original.as_slice(), &[1, 0, 1, 0, 1, 0, 1, 0]);
        assert_eq!(settled(&s).as_slice(), &cat(&[&NOP, &NOP])[..]);
        assert_eq!(Riscv64::restore(&s), s.original);
    }

    #[test]
    fn armed_form() {
        let s = site(&cat(&[&NOP, &NOP])).unwrap();
        // The trampoline 0x3000 above the site: hi = (0x3000 + 0x800) >> 12 = 3.
        let a = armed(&s, F + 0x3000).unwrap();
        assert_eq!(a.as_slice(), &le(&[0x0000_3297, insn::NOP])[..]);
        let s2 = site(a.as_slice()).unwrap();
        assert_eq!(s2.form, SiteForm::new(form::ARMED).calling(F + 0x3000));
        assert_eq!(settled(&s2), s2.original);
        // auipc t0, -1 (0xfffff297): t0 = site - 0x1000.
        let s3 = site(&le(&[0xffff_f297, insn::NOP])).unwrap();
        assert_eq!(s3.form, SiteForm::new(form::ARMED).calling(F - 0x1000));
        // From the armed site, a Call to the same trampoline changes the second word only.
        let c = Riscv64::encode_redirect(&s2, Redirect::call(F + 0x3000)).unwrap();
        assert_eq!(&c.as_slice()[..4], &a.as_slice()[..4]);
        assert_eq!(&c.as_slice()[4..], &0x0002_82e7u32.to_le_bytes());
    }

    #[test]
    fn refusals_show_the_bytes() {
        // A prologue without a site (gcc without -fpatchable-function-entry).
        let c = cat(&[&C_ADDI_SP, &C_SD_S0, &NOP, &NOP]);
        assert_eq!(
            site(&c),
            Err(SiteError::Unrecognised {
                at: F,
                found: InsnBytes::from_slice(&c).unwrap()
            })
        );
        // Too short: -march=rv64gc -fpatchable-function-entry=2 (two c.nops).
        let c = cat(&[&CNOP, &CNOP, &C_ADDI_SP, &C_SD_S0, &ADDI_SP]);
        assert_eq!(
            site(&c),
            Err(SiteError::TooShort {
                at: F,
                found: InsnBytes::from_slice(&c).unwrap(),
                needed: 8
            })
        );
        // Too short: -march=rv64g -fpatchable-function-entry=1.
        let c = cat(&[&NOP, &ADDI_SP]);
        assert_eq!(
            site(&c),
            Err(SiteError::TooShort {
                at: F,
                found: InsnBytes::from_slice(&c).unwrap(),
                needed: 8
            })
        );
        // Three c.nops then a 4-byte instruction.
        assert!(matches!(
            site(&cat(&[&CNOP, &CNOP, &CNOP, &ADDI_SP])),
            Err(SiteError::TooShort { needed: 8, .. })
        ));
        // A run mixing nop and c.nop: no compiler emits it.
        let c = cat(&[&CNOP, &NOP, &CNOP, &ADDI_SP]);
        assert_eq!(
            site(&c),
            Err(SiteError::Unrecognised {
                at: F,
                found: InsnBytes::from_slice(&c).unwrap()
            })
        );
        // auipc t1 (not t0) then nop is no armed site.
        assert!(matches!(
            site(&le(&[0x0000_3317, insn::NOP])),
            Err(SiteError::Unrecognised { .. })
        ));
    }

    #[test]
    fn truncated_code() {
        let t = |have| {
            Err(SiteError::Truncated {
                at: F,
                have,
                needed: 8,
            })
        };
        assert_eq!(site(&NOP), t(4));
        assert_eq!(site(&cat(&[&CNOP, &CNOP, &CNOP])), t(6));
        assert_eq!(site(&cat(&[&NOP, &NOP[..2]])), t(6), "half a nop");
        assert_eq!(site(&cat(&[&CNOP, &CNOP, &CNOP, &[1]])), t(7));
        assert_eq!(
            site(&0x0000_3297u32.to_le_bytes()),
            t(4),
            "half an armed site"
        );
        assert_eq!(site(&[]), t(0));
        // A short but complete other instruction is no site, whatever follows.
        assert!(matches!(
            site(&C_ADDI_SP),
            Err(SiteError::Unrecognised { .. })
        ));
    }

    #[test]
    fn redirected_sites_are_not_unpatched() {
        let s = site(&cat(&[&NOP, &NOP])).unwrap();
        for r in [Redirect::call(F + 0x10_0000), Redirect::jump(F + 0x1000)] {
            let b = Riscv64::encode_redirect(&s, r).unwrap();
            assert!(matches!(
                site(b.as_slice()),
                Err(SiteError::Unrecognised { .. })
            ));
        }
    }

    #[test]
    fn call_and_jump_words() {
        let s = site(&cat(&[&CNOP, &CNOP, &CNOP, &CNOP])).unwrap();
        // Call F + 0x12345678: d = 0x12345678, hi = 0x12345e78 >> 12 = 0x12345,
        // lo = 0x678 -> auipc t0, 0x12345 = 0x12345297; jalr t0, 0x678(t0) =
        // (0x678 << 20) | 0x282e7 = 0x678282e7.
        let c = Riscv64::encode_redirect(&s, Redirect::call(F + 0x1234_5678)).unwrap();
        assert_eq!(c.as_slice(), &le(&[0x1234_5297, 0x6782_82e7])[..]);
        // Call F - 0x12345678: d = -0x12345678, hi = (-0x12345678 + 0x800) >> 12 =
        // -0x12345 (field 0xedcbb), lo = -0x678 (field 0x988).
        let c = Riscv64::encode_redirect(&s, Redirect::call(F - 0x1234_5678)).unwrap();
        assert_eq!(c.as_slice(), &le(&[0xedcb_b297, 0x9882_82e7])[..]);
        // Jump F + 0x800: imm[11] -> bit 20 -> 0x0010006f; then a nop.
        let j = Riscv64::encode_redirect(&s, Redirect::jump(F + 0x800)).unwrap();
        assert_eq!(j.as_slice(), &le(&[0x0010_006f, insn::NOP])[..]);
        assert_eq!(Riscv64::restore(&s).as_slice(), &[1, 0, 1, 0, 1, 0, 1, 0]);
    }

    #[test]
    fn range_edges() {
        // A process's address (the kernel's F has no 2 GiB above it).
        const F: u64 = 0x3f_8010_0000;
        let s = Riscv64::find_site(&cat(&[&NOP, &NOP]), FuncInfo::at(F)).unwrap();
        let enc = |r| Riscv64::encode_redirect(&s, r);
        // Call: [-2^31 - 2^11, 2^31 - 2^11) from the auipc at F.
        assert!(enc(Redirect::call(F + 0x7fff_f7fe)).is_ok());
        assert_eq!(
            enc(Redirect::call(F + 0x7fff_f800)),
            Err(EncodeError::OutOfRange {
                from: F,
                to: F + 0x7fff_f800,
                limit: insn::PAIR_FORWARD
            })
        );
        assert!(enc(Redirect::call(F - 0x8000_0800)).is_ok());
        assert!(enc(Redirect::call(F - 0x8000_0802)).is_err());
        // Jump: [-1 MiB, 1 MiB) from the jal at F.
        assert_eq!(
            enc(Redirect::jump(F + 0xf_fffe)).map(|b| b.as_slice().to_vec()),
            Ok(le(&[0x7fff_f06f, insn::NOP]))
        );
        assert_eq!(
            enc(Redirect::jump(F + 0x10_0000)),
            Err(EncodeError::OutOfRange {
                from: F,
                to: F + 0x10_0000,
                limit: 1 << 20
            })
        );
        assert_eq!(
            enc(Redirect::jump(F - 0x10_0000)).map(|b| b.as_slice().to_vec()),
            Ok(le(&[0x8000_006f, insn::NOP]))
        );
        assert!(enc(Redirect::jump(F - 0x10_0002)).is_err());
        assert_eq!(
            enc(Redirect::jump(F + 0x101)),
            Err(EncodeError::Misaligned {
                from: F,
                to: F + 0x101,
                align: 2
            })
        );
    }

    #[test]
    fn a_site_off_a_word_boundary_is_not_written() {
        let s = Riscv64::find_site(&[1, 0, 1, 0, 1, 0, 1, 0], FuncInfo::at(F + 2)).unwrap();
        assert_eq!(s.form, SiteForm::new(form::C_NOPS));
        let e = Err(EncodeError::Misaligned {
            from: F + 2,
            to: F + 0x100,
            align: 4,
        });
        assert_eq!(Riscv64::encode_redirect(&s, Redirect::call(F + 0x100)), e);
        assert_eq!(Riscv64::encode_redirect(&s, Redirect::jump(F + 0x100)), e);
        assert_eq!(armed(&s, F + 0x100), e);
    }

    #[test]
    fn store_orders() {
        let s = site(&cat(&[&NOP, &NOP])).unwrap();
        let c = Riscv64::encode_redirect(&s, Redirect::call(F + 0x4000)).unwrap();
        let j = Riscv64::encode_redirect(&s, Redirect::jump(F + 0x4000)).unwrap();
        let a = armed(&s, F + 0x4000).unwrap();
        assert_eq!(store_order(j.as_slice()), [0, 4], "a jump: its jal first");
        assert_eq!(store_order(c.as_slice()), [4, 0], "a call: its jalr first");
        assert_eq!(store_order(a.as_slice()), [4, 0]);
        assert_eq!(store_order(&[]), [4, 0]);
    }
}
