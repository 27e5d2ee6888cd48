//! riscv64 relocations of a livepatch object (`apply_relocate_add` of
//! `arch/riscv/kernel/module.c`).
//!
//! Values are computed modulo 2^64 (`V = S + A`, `P` the field's address), then
//! range-checked as the field reads them; nothing is truncated silently. Where this
//! back-end is stricter than the kernel, it says so:
//!
//! | type | field | check |
//! |---|---|---|
//! | `R_RISCV_64` | 8 bytes, `V` | none |
//! | `R_RISCV_32` | 4 bytes, `V` | `V` fits 32 bits unsigned (the kernel's `v != (u32)v`) |
//! | `R_RISCV_32_PCREL`, `R_RISCV_PLT32` | 4 bytes, `V - P` | signed 32 bits |
//! | `R_RISCV_BRANCH` | B-type, `V - P` | signed 13 bits, even; the kernel truncates |
//! | `R_RISCV_JAL` | J-type, `V - P` | signed 21 bits, even; the kernel truncates |
//! | `R_RISCV_RVC_BRANCH` | CB-type, `V - P` | signed 9 bits, even; the kernel truncates |
//! | `R_RISCV_RVC_JUMP` | CJ-type, `V - P` | signed 12 bits, even; the kernel truncates |
//! | `R_RISCV_CALL`, `R_RISCV_CALL_PLT` | `auipc` + `jalr`, `V - P` | `[-2^31 - 2^11, 2^31 - 2^11)` (the kernel's check), even |
//! | `R_RISCV_PCREL_HI20` | `auipc`, `V - P` | as `CALL` (not necessarily even: data) |
//! | `R_RISCV_PCREL_LO12_I`/`_S` | I/S-type: the low part of the paired `HI20`'s value | see below |
//! | `R_RISCV_HI20` | `lui`, `V` | `V` (as signed) in `[-2^31 - 2^11, 2^31 - 2^11)`; the kernel truncates to 32 bits |
//! | `R_RISCV_LO12_I`/`_S` | I/S-type, low 12 bits of `V` | none (the `HI20` checks the range) |
//! | `R_RISCV_ADD8/16/32/64`, `SUB6/8/16/32/64`, `SET6/8/16/32` | the field `±= V` / `= V` | none: modular by definition (they compute label differences in pairs) |
//! | `R_RISCV_RELAX`, `R_RISCV_ALIGN` | — | ignored (see below) |
//!
//! Every type that patches an instruction also checks that the field holds that kind
//! of instruction ([`RelocError::UnexpectedInsn`]); the kernel does not.
//!
//! # The `PCREL_LO12` pair
//!
//! `auipc` + `addi`/load/store address a symbol in two relocations: `PCREL_HI20`
//! against the symbol at the `auipc`, and `PCREL_LO12_I`/`_S` at the second
//! instruction, whose *symbol is the `auipc`'s label*. The low part is that of the
//! `HI20`'s value `S_hi + A_hi - P_hi`, which only the `HI20` relocation knows: the
//! kernel searches the relocation section for the `PCREL_HI20` (or `GOT_HI20`) whose
//! place is the `LO12`'s symbol value. One [`Reloc`] at a time (the interface's
//! [`Arch::apply_relocation`](klp_arch::Arch::apply_relocation)) cannot express that
//! lookup, so there a `LO12` is [`RelocError::UnsupportedType`]: the `LO12` types are
//! *partnered* ([`Arch::is_partnered`](klp_arch::Arch::is_partnered)), written by
//! [`apply_partnered`] once the section's other entries are, with the same search
//! among them. [`apply_all`] applies a whole relocation section in order, as the
//! kernel does.
//!
//! # Deliberate differences
//!
//! * `R_RISCV_GOT_HI20` needs a GOT entry, which a process loader makes itself (see
//!   `link.rs`: it writes `PCREL_HI20` against its slot); here it is unsupported, like
//!   the kernel without `CONFIG_MODULE_SECTIONS`.
//! * `R_RISCV_ALIGN` marks padding `nop`s that a relaxing linker would partly delete.
//!   Left in place they are still correct code (only the alignment they asked for is
//!   lost, and a patch site that loses its 4-byte alignment is refused by `site.rs`),
//!   so it is ignored like `R_RISCV_RELAX`. The kernel builds modules with
//!   `-mno-relax`.
//! * TLS, `GPREL`, `*_ULEB128` and the dynamic types are unsupported.

use klp_arch::{Endian, Reloc, RelocError, field};

use crate::insn::{self, op};

/// `R_RISCV_32`.
pub const R_32: u32 = 1;
/// `R_RISCV_64`.
pub const R_64: u32 = 2;
/// `R_RISCV_BRANCH`.
pub const BRANCH: u32 = 16;
/// `R_RISCV_JAL`.
pub const JAL: u32 = 17;
/// `R_RISCV_CALL`.
pub const CALL: u32 = 18;
/// `R_RISCV_CALL_PLT`.
pub const CALL_PLT: u32 = 19;
/// `R_RISCV_GOT_HI20`.
pub const GOT_HI20: u32 = 20;
/// `R_RISCV_PCREL_HI20`.
pub const PCREL_HI20: u32 = 23;
/// `R_RISCV_PCREL_LO12_I`.
pub const PCREL_LO12_I: u32 = 24;
/// `R_RISCV_PCREL_LO12_S`.
pub const PCREL_LO12_S: u32 = 25;
/// `R_RISCV_HI20`.
pub const HI20: u32 = 26;
/// `R_RISCV_LO12_I`.
pub const LO12_I: u32 = 27;
/// `R_RISCV_LO12_S`.
pub const LO12_S: u32 = 28;
/// `R_RISCV_ADD8`.
pub const ADD8: u32 = 33;
/// `R_RISCV_ADD16`.
pub const ADD16: u32 = 34;
/// `R_RISCV_ADD32`.
pub const ADD32: u32 = 35;
/// `R_RISCV_ADD64`.
pub const ADD64: u32 = 36;
/// `R_RISCV_SUB8`.
pub const SUB8: u32 = 37;
/// `R_RISCV_SUB16`.
pub const SUB16: u32 = 38;
/// `R_RISCV_SUB32`.
pub const SUB32: u32 = 39;
/// `R_RISCV_SUB64`.
pub const SUB64: u32 = 40;
/// `R_RISCV_ALIGN`.
pub const ALIGN: u32 = 43;
/// `R_RISCV_RVC_BRANCH`.
pub const RVC_BRANCH: u32 = 44;
/// `R_RISCV_RVC_JUMP`.
pub const RVC_JUMP: u32 = 45;
/// `R_RISCV_RELAX`.
pub const RELAX: u32 = 51;
/// `R_RISCV_SUB6`.
pub const SUB6: u32 = 52;
/// `R_RISCV_SET6`.
pub const SET6: u32 = 53;
/// `R_RISCV_SET8`.
pub const SET8: u32 = 54;
/// `R_RISCV_SET16`.
pub const SET16: u32 = 55;
/// `R_RISCV_SET32`.
pub const SET32: u32 = 56;
/// `R_RISCV_32_PCREL`.
pub const PCREL32: u32 = 57;
/// `R_RISCV_PLT32`.
pub const PLT32: u32 = 59;

const LE: Endian = Endian::Little;

/// Reads the 32-bit instruction at `off`, checks its opcode is one of `ops`, and
/// returns it.
fn insn_at(section: &mut [u8], off: u64, ops: &[u32]) -> Result<u32, RelocError> {
    let w = field::read::<4>(section, off, LE)? as u32;
    if !ops.contains(&insn::opcode(w)) {
        return Err(RelocError::UnexpectedInsn {
            offset: off,
            found: w,
        });
    }
    Ok(w)
}

/// Reads the 16-bit instruction at `off` and checks `insn & 0xe003` is one of `ops`
/// (the quadrant and `funct3` of a compressed instruction).
fn c_insn_at(section: &mut [u8], off: u64, ops: &[u16]) -> Result<u16, RelocError> {
    let h = field::read::<2>(section, off, LE)? as u16;
    if !ops.contains(&(h & 0xe003)) {
        return Err(RelocError::UnexpectedInsn {
            offset: off,
            found: u32::from(h),
        });
    }
    Ok(h)
}

fn put(section: &mut [u8], off: u64, w: u32) -> Result<(), RelocError> {
    field::write::<4>(section, off, u64::from(w), LE)
}

/// A PC-relative branch offset of `bits` bits (signed, even), as the field's `u32`.
fn branch(t: u32, pcrel: i128, bits: u32) -> Result<u32, RelocError> {
    let v = field::signed(t, pcrel, bits)?;
    field::aligned(t, pcrel, 1)?;
    Ok(v as u32)
}

/// The `auipc` pair's range: `[-2^31 - 2^11, 2^31 - 2^11)`.
fn pair(t: u32, value: i128) -> Result<i64, RelocError> {
    let err = RelocError::Overflow { r_type: t, value };
    // Shifted up by 2^11 it is a signed 32-bit value.
    field::signed(t, value.wrapping_add(1 << 11), 32).map_err(|_| err)?;
    i64::try_from(value).map_err(|_| err)
}

/// The low 12 bits of `v` as the signed value the `LO12` half adds (the kernel's
/// `v - ((v + 0x800) & 0xfffff000)` in 32 bits).
fn lo12(v: u64) -> u32 {
    insn::hi_lo(v as i32 as i64).1 as u32
}

/// Writes the `LO12_I`/`LO12_S` immediate `lo` (`PCREL_` or absolute).
fn put_lo12(section: &mut [u8], off: u64, s_type: bool, lo: u32) -> Result<(), RelocError> {
    if s_type {
        let w = insn_at(section, off, &[op::STORE, op::STORE_FP])?;
        put(section, off, insn::set_s_imm(w, lo))
    } else {
        let w = insn_at(
            section,
            off,
            &[op::LOAD, op::LOAD_FP, op::OP_IMM, op::OP_IMM_32, op::JALR],
        )?;
        put(section, off, insn::set_i_imm(w, lo))
    }
}

/// `field = f(field)` for an `N`-byte data field.
fn rmw<const N: usize>(
    section: &mut [u8],
    off: u64,
    f: impl FnOnce(u64) -> u64,
) -> Result<(), RelocError> {
    let old = field::read::<N>(section, off, LE)?;
    field::write::<N>(section, off, f(old), LE)
}

/// Applies `r` to `section`, loaded at `section_addr` (one relocation; a `PCREL_LO12`
/// needs [`apply_all`]).
pub fn apply(section: &mut [u8], section_addr: u64, r: &Reloc) -> Result<(), RelocError> {
    let v = r.sym.wrapping_add(r.addend as u64);
    let p = section_addr.wrapping_add(r.offset);
    let pcrel = i128::from(v.wrapping_sub(p) as i64);
    let t = r.r_type;
    let off = r.offset;
    match t {
        R_64 => field::write::<8>(section, off, v, LE),
        R_32 => field::write::<4>(section, off, field::unsigned(t, v.into(), 32)?, LE),
        PCREL32 | PLT32 => field::write::<4>(section, off, field::signed(t, pcrel, 32)?, LE),
        BRANCH => {
            let imm = branch(t, pcrel, 13)?;
            let w = insn_at(section, off, &[op::BRANCH])?;
            put(section, off, insn::set_b_imm(w, imm))
        }
        JAL => {
            let imm = branch(t, pcrel, 21)?;
            let w = insn_at(section, off, &[op::JAL])?;
            put(section, off, insn::set_j_imm(w, imm))
        }
        RVC_BRANCH => {
            let imm = branch(t, pcrel, 9)?;
            // c.beqz (funct3 110) or c.bnez (111), quadrant 1.
            let h = c_insn_at(section, off, &[0xc001, 0xe001])?;
            field::write::<2>(section, off, insn::set_cb_imm(h, imm).into(), LE)
        }
        RVC_JUMP => {
            let imm = branch(t, pcrel, 12)?;
            // c.j (funct3 101), quadrant 1 (c.jal is RV32 only).
            let h = c_insn_at(section, off, &[0xa001])?;
            field::write::<2>(section, off, insn::set_cj_imm(h, imm).into(), LE)
        }
        CALL | CALL_PLT => {
            let d = pair(t, pcrel)?;
            field::aligned(t, pcrel, 1)?;
            let (hi, lo) = insn::hi_lo(d);
            let w0 = insn_at(section, off, &[op::AUIPC])?;
            let off1 = off.checked_add(4).ok_or(RelocError::OutOfSection {
                offset: off,
                size: section.len(),
            })?;
            let w1 = insn_at(section, off1, &[op::JALR])?;
            put(section, off, insn::set_u_imm(w0, (hi as u32) << 12))?;
            put(section, off1, insn::set_i_imm(w1, lo as u32))
        }
        PCREL_HI20 => {
            let (hi, _) = insn::hi_lo(pair(t, pcrel)?);
            let w = insn_at(section, off, &[op::AUIPC])?;
            put(section, off, insn::set_u_imm(w, (hi as u32) << 12))
        }
        HI20 => {
            let (hi, _) = insn::hi_lo(pair(t, i128::from(v as i64))?);
            let w = insn_at(section, off, &[op::LUI])?;
            put(section, off, insn::set_u_imm(w, (hi as u32) << 12))
        }
        LO12_I | LO12_S => put_lo12(section, off, t == LO12_S, lo12(v)),
        ADD8 => rmw::<1>(section, off, |x| x.wrapping_add(v)),
        ADD16 => rmw::<2>(section, off, |x| x.wrapping_add(v)),
        ADD32 => rmw::<4>(section, off, |x| x.wrapping_add(v)),
        ADD64 => rmw::<8>(section, off, |x| x.wrapping_add(v)),
        SUB6 => rmw::<1>(section, off, |x| (x & 0xc0) | (x.wrapping_sub(v) & 0x3f)),
        SUB8 => rmw::<1>(section, off, |x| x.wrapping_sub(v)),
        SUB16 => rmw::<2>(section, off, |x| x.wrapping_sub(v)),
        SUB32 => rmw::<4>(section, off, |x| x.wrapping_sub(v)),
        SUB64 => rmw::<8>(section, off, |x| x.wrapping_sub(v)),
        SET6 => rmw::<1>(section, off, |x| (x & 0xc0) | (v & 0x3f)),
        SET8 => field::write::<1>(section, off, v, LE),
        SET16 => field::write::<2>(section, off, v, LE),
        SET32 => field::write::<4>(section, off, v, LE),
        RELAX | ALIGN => Ok(()),
        _ => Err(RelocError::UnsupportedType { r_type: t }),
    }
}

/// The low part the `PCREL_LO12` entry `lo` takes: the kernel's search, through
/// `candidates` (the other entries of its section, in the order searched), for the
/// `PCREL_HI20` whose place is the `LO12`'s symbol. Errors: the symbol is not in the
/// section ([`RelocError::OutOfSection`]), no `PCREL_HI20` is there
/// ([`RelocError::UnexpectedInsn`] with the word found at that place), a `GOT_HI20` is
/// (unsupported, see the module docs), or the `HI20`'s value is out of range.
pub fn pcrel_lo12<'r>(
    section: &mut [u8],
    section_addr: u64,
    lo: &Reloc,
    candidates: impl IntoIterator<Item = &'r Reloc>,
) -> Result<u32, RelocError> {
    let hi_loc = lo.sym;
    let hi_off = hi_loc.wrapping_sub(section_addr);
    let hi = candidates.into_iter().find(|h| {
        section_addr.wrapping_add(h.offset) == hi_loc
            && (h.r_type == PCREL_HI20 || h.r_type == GOT_HI20)
    });
    let Some(hi) = hi else {
        let found = field::read::<4>(section, hi_off, LE)? as u32;
        return Err(RelocError::UnexpectedInsn {
            offset: hi_off,
            found,
        });
    };
    if hi.r_type == GOT_HI20 {
        return Err(RelocError::UnsupportedType { r_type: GOT_HI20 });
    }
    let value = hi.sym.wrapping_add(hi.addend as u64).wrapping_sub(hi_loc);
    pair(hi.r_type, i128::from(value as i64))?;
    Ok(insn::hi_lo(value as i64).1 as u32)
}

/// Writes the `PCREL_LO12` entry `lo`, its partner searched in `written` (the
/// interface's [`Arch::apply_partnered`](klp_arch::Arch::apply_partnered)).
pub fn apply_partnered(
    section: &mut [u8],
    section_addr: u64,
    lo: &Reloc,
    written: &[Reloc],
) -> Result<(), RelocError> {
    match lo.r_type {
        PCREL_LO12_I | PCREL_LO12_S => {
            let v = pcrel_lo12(section, section_addr, lo, written)?;
            put_lo12(section, lo.offset, lo.r_type == PCREL_LO12_S, v)
        }
        t => Err(RelocError::UnsupportedType { r_type: t }),
    }
}

/// Applies a whole relocation section, in order, as the kernel's `apply_relocate_add`
/// does (including the `PCREL_LO12` pair search, from the entry on and around). On
/// error, returns the index of the relocation that failed; the relocations before it
/// stay applied (as in the kernel), the failed one changed nothing.
pub fn apply_all(
    section: &mut [u8],
    section_addr: u64,
    relocs: &[Reloc],
) -> Result<(), (usize, RelocError)> {
    for (i, r) in relocs.iter().enumerate() {
        let res = match r.r_type {
            PCREL_LO12_I | PCREL_LO12_S => {
                let around = relocs.get(i..).into_iter().chain(relocs.get(..i)).flatten();
                pcrel_lo12(section, section_addr, r, around)
                    .and_then(|lo| put_lo12(section, r.offset, r.r_type == PCREL_LO12_S, lo))
            }
            _ => apply(section, section_addr, r),
        };
        res.map_err(|e| (i, e))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Riscv64;
    use klp_arch::{Arch, RelocCtx};

    extern crate std;
    use std::vec::Vec;

    const BASE: u64 = 0xffff_ffff_0100_0000;
    /// Where the field starts: offset 4 of the section.
    const P: u64 = BASE + 4;

    fn rel(r_type: u32, offset: u64, sym: u64, addend: i64) -> Reloc {
        Reloc {
            r_type,
            offset,
            sym,
            addend,
            external: false,
        }
    }

    /// A 16-byte section holding `words` from offset 4.
    fn sec(words: &[u32]) -> [u8; 16] {
        let mut s = [0u8; 16];
        for (i, w) in words.iter().enumerate() {
            s[4 + 4 * i..8 + 4 * i].copy_from_slice(&w.to_le_bytes());
        }
        s
    }

    fn word(s: &[u8], i: usize) -> u32 {
        u32::from_le_bytes(s[4 + 4 * i..8 + 4 * i].try_into().unwrap())
    }

    /// Applies one relocation at offset 4 over `words`; the words after, or the error
    /// (with the section checked unchanged).
    fn on(words: &[u32], t: u32, sym: u64, addend: i64) -> Result<Vec<u32>, RelocError> {
        let mut s = sec(words);
        let before = s;
        let r =
            Riscv64::apply_relocation(&mut s, BASE, &rel(t, 4, sym, addend), &RelocCtx::default());
        match r {
            Ok(()) => Ok((0..words.len()).map(|i| word(&s, i)).collect()),
            Err(e) => {
                assert_eq!(s, before, "a failed relocation changed the section");
                Err(e)
            }
        }
    }

    fn one(w: u32, t: u32, sym: u64) -> Result<u32, RelocError> {
        on(&[w], t, sym, 0).map(|v| v[0])
    }

    fn over(r_type: u32, value: i128) -> Result<u32, RelocError> {
        Err(RelocError::Overflow { r_type, value })
    }

    // Instructions with zero immediates, from the ISA tables:
    /// `beq a0, a1, 0`: rs2 11 << 20, rs1 10 << 15, funct3 000, opcode 0x63.
    const BEQ: u32 = 0x00b5_0063;
    /// `jal ra, 0`.
    const JAL_RA: u32 = 0x0000_00ef;
    /// `auipc ra, 0`: rd 1 << 7, opcode 0x17.
    const AUIPC_RA: u32 = 0x0000_0097;
    /// `jalr ra, 0(ra)`: rs1 1 << 15, rd 1 << 7, opcode 0x67.
    const JALR_RA: u32 = 0x0000_80e7;
    /// `auipc a0, 0`: rd 10 << 7.
    const AUIPC_A0: u32 = 0x0000_0517;
    /// `addi a0, a0, 0`.
    const ADDI_A0: u32 = 0x0005_0513;
    /// `ld a0, 0(a0)`: funct3 011.
    const LD_A0: u32 = 0x0005_3503;
    /// `sd a1, 0(a0)`: rs2 11, rs1 10, funct3 011, opcode 0x23.
    const SD_A1: u32 = 0x00b5_3023;
    /// `lui a0, 0`: rd 10 << 7, opcode 0x37.
    const LUI_A0: u32 = 0x0000_0537;
    /// `c.beqz a0, 0`: funct3 110, rs1' = 2 (a0 = x10) << 7, quadrant 01.
    const C_BEQZ: u16 = 0xc101;
    /// `c.j 0`: funct3 101, quadrant 01.
    const C_J: u16 = 0xa001;

    #[test]
    fn branch() {
        // beq +0x10: imm[4] -> bit 11 (imm[4:1] at 11:8) -> 0x800.
        assert_eq!(one(BEQ, BRANCH, P + 0x10), Ok(0x00b5_0863));
        // The last forward target +0xffe: imm[11] -> bit 7, imm[10:5] -> 0x7e000000,
        // imm[4:1] -> 0xf00.
        assert_eq!(one(BEQ, BRANCH, P + 0xffe), Ok(0x7eb5_0fe3));
        // The last backward target -0x1000: imm[12] -> bit 31.
        assert_eq!(one(BEQ, BRANCH, P - 0x1000), Ok(0x80b5_0063));
        assert_eq!(one(BEQ, BRANCH, P + 0x1000), over(BRANCH, 0x1000));
        assert_eq!(one(BEQ, BRANCH, P - 0x1002), over(BRANCH, -0x1002));
        assert_eq!(
            one(BEQ, BRANCH, P + 3),
            Err(RelocError::Misaligned {
                r_type: BRANCH,
                value: 3
            })
        );
        assert_eq!(
            one(ADDI_A0, BRANCH, P),
            Err(RelocError::UnexpectedInsn {
                offset: 4,
                found: ADDI_A0
            })
        );
    }

    #[test]
    fn jal() {
        // jal ra, +0x800: imm[11] -> bit 20.
        assert_eq!(one(JAL_RA, JAL, P + 0x800), Ok(0x0010_00ef));
        assert_eq!(one(JAL_RA, JAL, P + 0xf_fffe), Ok(0x7fff_f0ef));
        assert_eq!(one(JAL_RA, JAL, P - 0x10_0000), Ok(0x8000_00ef));
        assert_eq!(one(JAL_RA, JAL, P + 0x10_0000), over(JAL, 0x10_0000));
        assert_eq!(one(JAL_RA, JAL, P - 0x10_0002), over(JAL, -0x10_0002));
        assert!(matches!(
            one(JAL_RA, JAL, P + 1),
            Err(RelocError::Misaligned { .. })
        ));
        assert!(matches!(
            one(BEQ, JAL, P),
            Err(RelocError::UnexpectedInsn { .. })
        ));
    }

    #[test]
    fn rvc() {
        let c = |h: u16, t, sym| -> Result<u16, RelocError> {
            let mut s = [0u8; 8];
            s[4..6].copy_from_slice(&h.to_le_bytes());
            let before = s;
            let r = rel(t, 4, sym, 0);
            match Riscv64::apply_relocation(&mut s, BASE, &r, &RelocCtx::default()) {
                Ok(()) => {
                    assert_eq!(&s[6..], &[0, 0], "only two bytes are written");
                    Ok(u16::from_le_bytes([s[4], s[5]]))
                }
                Err(e) => {
                    assert_eq!(s, before);
                    Err(e)
                }
            }
        };
        // c.beqz a0, +0xfe: imm[7:6] -> bits 6:5, imm[5] -> bit 2, imm[4:3] -> bits
        // 11:10, imm[2:1] -> bits 4:3: 0xc101 | 0x60 | 0x4 | 0xc00 | 0x18.
        assert_eq!(c(C_BEQZ, RVC_BRANCH, P + 0xfe), Ok(0xcd7d));
        // -0x100: imm[8] -> bit 12.
        assert_eq!(c(C_BEQZ, RVC_BRANCH, P - 0x100), Ok(0xd101));
        // c.bnez (funct3 111) takes it too: +2 -> imm[1] -> bit 3.
        assert_eq!(c(0xe101, RVC_BRANCH, P + 2), Ok(0xe109));
        assert_eq!(
            c(C_BEQZ, RVC_BRANCH, P + 0x100),
            Err(RelocError::Overflow {
                r_type: RVC_BRANCH,
                value: 0x100
            })
        );
        assert!(c(C_BEQZ, RVC_BRANCH, P - 0x102).is_err());
        assert!(matches!(
            c(C_BEQZ, RVC_BRANCH, P + 1),
            Err(RelocError::Misaligned { .. })
        ));
        // c.j +0x7fe: every CJ bit but imm[11] (bits 11:2).
        assert_eq!(c(C_J, RVC_JUMP, P + 0x7fe), Ok(0xaffd));
        // -0x800: imm[11] -> bit 12.
        assert_eq!(c(C_J, RVC_JUMP, P - 0x800), Ok(0xb001));
        assert_eq!(
            c(C_J, RVC_JUMP, P + 0x800),
            Err(RelocError::Overflow {
                r_type: RVC_JUMP,
                value: 0x800
            })
        );
        assert!(c(C_J, RVC_JUMP, P - 0x802).is_err());
        assert!(matches!(
            c(C_J, RVC_JUMP, P + 3),
            Err(RelocError::Misaligned { .. })
        ));
        assert_eq!(
            c(C_BEQZ, RVC_JUMP, P),
            Err(RelocError::UnexpectedInsn {
                offset: 4,
                found: 0xc101
            })
        );
        assert!(matches!(
            c(0x0001, RVC_BRANCH, P),
            Err(RelocError::UnexpectedInsn { .. })
        ));
    }

    #[test]
    fn call() {
        let pair = [AUIPC_RA, JALR_RA];
        // call +0x12345678: hi = 0x12345, lo = 0x678.
        assert_eq!(
            on(&pair, CALL, P + 0x1234_5678, 0),
            Ok(std::vec![0x1234_5097, 0x6780_80e7])
        );
        // CALL_PLT the same; with the addend: -0x12345678 -> hi field 0xedcbb, lo 0x988.
        assert_eq!(
            on(&pair, CALL_PLT, P, -0x1234_5678),
            Ok(std::vec![0xedcb_b097, 0x9880_80e7])
        );
        // The edges: 2^31 - 2^11 - 2 -> hi 0x7ffff, lo 0x7fe; -2^31 - 2^11 -> hi
        // 0x80000, lo 0x800.
        assert_eq!(
            on(&pair, CALL, P + 0x7fff_f7fe, 0),
            Ok(std::vec![0x7fff_f097, 0x7fe0_80e7])
        );
        assert_eq!(
            on(&pair, CALL, P - 0x8000_0800, 0),
            Ok(std::vec![0x8000_0097, 0x8000_80e7])
        );
        assert_eq!(
            on(&pair, CALL, P + 0x7fff_f800, 0),
            Err(RelocError::Overflow {
                r_type: CALL,
                value: 0x7fff_f800
            })
        );
        assert_eq!(
            on(&pair, CALL, P - 0x8000_0802, 0),
            Err(RelocError::Overflow {
                r_type: CALL,
                value: -0x8000_0802
            })
        );
        assert!(matches!(
            on(&pair, CALL, P + 0x101, 0),
            Err(RelocError::Misaligned { .. })
        ));
        // The second word must be the jalr: nothing is written when it is not.
        assert_eq!(
            on(&[AUIPC_RA, ADDI_A0], CALL, P + 0x100, 0),
            Err(RelocError::UnexpectedInsn {
                offset: 8,
                found: ADDI_A0
            })
        );
        assert!(matches!(
            on(&[ADDI_A0, JALR_RA], CALL, P, 0),
            Err(RelocError::UnexpectedInsn { offset: 4, .. })
        ));
        // The pair must fit in the section: the auipc in its last word.
        let mut s = [0u8; 8];
        s[4..].copy_from_slice(&AUIPC_RA.to_le_bytes());
        assert_eq!(
            Riscv64::apply_relocation(&mut s, BASE, &rel(CALL, 4, P, 0), &RelocCtx::default()),
            Err(RelocError::OutOfSection { offset: 8, size: 8 })
        );
    }

    #[test]
    fn pcrel_hi20_and_absolute_pairs() {
        // auipc a0 to P + 0x12345678 (data: odd is fine): hi 0x12345.
        assert_eq!(one(AUIPC_A0, PCREL_HI20, P + 0x1234_5679), Ok(0x1234_5517));
        assert_eq!(
            one(AUIPC_A0, PCREL_HI20, P + 0x7fff_f800),
            over(PCREL_HI20, 0x7fff_f800)
        );
        assert_eq!(one(AUIPC_A0, PCREL_HI20, P + 0x7fff_f7ff), Ok(0x7fff_f517));
        assert_eq!(one(AUIPC_A0, PCREL_HI20, P - 0x8000_0800), Ok(0x8000_0517));
        assert!(one(AUIPC_A0, PCREL_HI20, P - 0x8000_0801).is_err());
        assert!(matches!(
            one(LUI_A0, PCREL_HI20, P),
            Err(RelocError::UnexpectedInsn { .. })
        ));
        // lui a0, %hi(0x12345fff): hi = (0x12345fff + 0x800) >> 12 = 0x12346.
        assert_eq!(one(LUI_A0, HI20, 0x1234_5fff), Ok(0x1234_6537));
        // %lo(0x12345fff) = 0xfff - 0x1000 = -1 -> imm field 0xfff.
        assert_eq!(one(ADDI_A0, LO12_I, 0x1234_5fff), Ok(0xfff5_0513));
        assert_eq!(one(LD_A0, LO12_I, 0x1234_5678), Ok(0x6785_3503));
        // sd a1, %lo(0x7ff)(a0): imm[11:5] 0x3f -> 0x7e000000, imm[4:0] -> 0xf80.
        assert_eq!(one(SD_A1, LO12_S, 0x7ff), Ok(0x7eb5_3fa3));
        // A kernel address (negative as i64) is in range of lui: 0xffffffff80001000
        // -> hi = -0x7ffff (field 0x80001).
        assert_eq!(one(LUI_A0, HI20, 0xffff_ffff_8000_1000), Ok(0x8000_1537));
        assert_eq!(one(LUI_A0, HI20, 0x7fff_f800), over(HI20, 0x7fff_f800));
        assert_eq!(
            one(LUI_A0, HI20, 0xffff_ffff_7fff_f7ff),
            over(HI20, -0x8000_0801)
        );
        assert!(matches!(
            one(SD_A1, LO12_I, 0),
            Err(RelocError::UnexpectedInsn { .. })
        ));
        assert!(matches!(
            one(ADDI_A0, LO12_S, 0),
            Err(RelocError::UnexpectedInsn { .. })
        ));
        assert!(matches!(
            one(AUIPC_A0, HI20, 0),
            Err(RelocError::UnexpectedInsn { .. })
        ));
    }

    #[test]
    fn pcrel_lo12_pairs() {
        // auipc a0 at offset 4, addi a0 at 8, sd a1 at 12 (16-byte section).
        let mut s = sec(&[AUIPC_A0, ADDI_A0, SD_A1]);
        let target = P + 0x1234_5678;
        let relocs = [
            rel(PCREL_HI20, 4, target, 0),
            rel(RELAX, 4, 0, 0),
            rel(PCREL_LO12_I, 8, P, 0),
            rel(PCREL_LO12_S, 12, P, 0),
        ];
        assert_eq!(apply_all(&mut s, BASE, &relocs), Ok(()));
        // hi 0x12345, lo 0x678 (S-type: 0x678 = imm[11:5] 0x33, imm[4:0] 0x18).
        assert_eq!(
            [word(&s, 0), word(&s, 1), word(&s, 2)],
            [0x1234_5517, 0x6785_0513, 0x66b5_3c23]
        );
        // A low part that is negative: target - 1 from an aligned hi.
        let mut s = sec(&[AUIPC_A0, ADDI_A0]);
        let relocs = [
            rel(PCREL_LO12_I, 8, P, 0),
            rel(PCREL_HI20, 4, P + 0x1000, -1),
        ];
        // The search goes on past the LO12 and around: the HI20 may come later.
        assert_eq!(apply_all(&mut s, BASE, &relocs), Ok(()));
        assert_eq!([word(&s, 0), word(&s, 1)], [0x0000_1517, 0xfff5_0513]);
    }

    #[test]
    fn partnered_entries_through_the_interface() {
        // What a host does: every other entry first, as written (a GOT reference
        // already turned into a PCREL_HI20 against the host's slot), then the LO12s.
        let mut s = sec(&[AUIPC_A0, LD_A0, SD_A1]);
        let slot = P + 0x8_0010;
        let written = [rel(PCREL_HI20, 4, slot, 0), rel(RELAX, 4, 0, 0)];
        for r in &written {
            Riscv64::apply_relocation(&mut s, BASE, r, &RelocCtx::default()).unwrap();
        }
        assert!(Riscv64::is_partnered(PCREL_LO12_I) && Riscv64::is_partnered(PCREL_LO12_S));
        assert!(!Riscv64::is_partnered(PCREL_HI20) && !Riscv64::is_partnered(LO12_I));
        let lo = rel(PCREL_LO12_I, 8, P, 0);
        assert_eq!(
            Riscv64::apply_partnered(&mut s, BASE, &lo, &written),
            Ok(())
        );
        let lo_s = rel(PCREL_LO12_S, 12, P, 0);
        assert_eq!(
            Riscv64::apply_partnered(&mut s, BASE, &lo_s, &written),
            Ok(())
        );
        // auipc a0, 0x80; ld a0, 16(a0); sd a1, 16(a0).
        assert_eq!(
            [word(&s, 0), word(&s, 1), word(&s, 2)],
            [0x0008_0517, 0x0105_3503, 0x00b5_3823]
        );
        // Its partner not among the written: the auipc found is named.
        let before = s;
        assert_eq!(
            Riscv64::apply_partnered(&mut s, BASE, &lo, &written[1..]),
            Err(RelocError::UnexpectedInsn {
                offset: 4,
                found: 0x0008_0517
            })
        );
        // Not a partnered type.
        assert_eq!(
            Riscv64::apply_partnered(&mut s, BASE, &rel(LO12_I, 8, P, 0), &written),
            Err(RelocError::UnsupportedType { r_type: LO12_I })
        );
        assert_eq!(s, before, "refusals write nothing");
    }

    #[test]
    fn pcrel_lo12_refusals() {
        let mut s = sec(&[AUIPC_A0, ADDI_A0]);
        let lo = rel(PCREL_LO12_I, 8, P, 0);
        // Alone, through the one-relocation interface.
        assert_eq!(
            Riscv64::apply_relocation(&mut s, BASE, &lo, &RelocCtx::default()),
            Err(RelocError::UnsupportedType {
                r_type: PCREL_LO12_I
            })
        );
        // No HI20 at the auipc.
        assert_eq!(
            apply_all(&mut s, BASE, &[lo]),
            Err((
                0,
                RelocError::UnexpectedInsn {
                    offset: 4,
                    found: AUIPC_A0
                }
            ))
        );
        // The label outside the section.
        assert_eq!(
            apply_all(&mut s, BASE, &[rel(PCREL_LO12_I, 8, BASE + 0x100, 0)]),
            Err((
                0,
                RelocError::OutOfSection {
                    offset: 0x100,
                    size: 16
                }
            ))
        );
        // A GOT_HI20 pair needs the loader's slot.
        assert_eq!(
            apply_all(&mut s, BASE, &[rel(GOT_HI20, 4, 0x1000, 0), lo]),
            Err((0, RelocError::UnsupportedType { r_type: GOT_HI20 }))
        );
        assert_eq!(
            pcrel_lo12(&mut s, BASE, &lo, &[rel(GOT_HI20, 4, 0x1000, 0)]),
            Err(RelocError::UnsupportedType { r_type: GOT_HI20 })
        );
        // A HI20 out of range fails at the HI20, and its LO12 with it.
        let far = rel(PCREL_HI20, 4, P + (1 << 31), 0);
        assert_eq!(
            pcrel_lo12(&mut s, BASE, &lo, &[far]),
            Err(RelocError::Overflow {
                r_type: PCREL_HI20,
                value: 1 << 31
            })
        );
        assert_eq!(s, sec(&[AUIPC_A0, ADDI_A0]), "nothing was written");
        // The LO12's instruction is checked.
        let mut s = sec(&[AUIPC_A0, SD_A1]);
        assert_eq!(
            apply_all(&mut s, BASE, &[rel(PCREL_HI20, 4, P, 0), lo]),
            Err((
                1,
                RelocError::UnexpectedInsn {
                    offset: 8,
                    found: SD_A1
                }
            ))
        );
    }

    fn data<const N: usize>(t: u32, init: u64, sym: u64, addend: i64) -> Result<u64, RelocError> {
        let mut s = [0u8; 16];
        s[4..4 + N].copy_from_slice(&init.to_le_bytes()[..N]);
        let before = s;
        match Riscv64::apply_relocation(&mut s, BASE, &rel(t, 4, sym, addend), &RelocCtx::default())
        {
            Ok(()) => {
                assert!(s[4 + N..].iter().all(|&b| b == 0), "wrote past the field");
                let mut b = [0u8; 8];
                b[..N].copy_from_slice(&s[4..4 + N]);
                Ok(u64::from_le_bytes(b))
            }
            Err(e) => {
                assert_eq!(s, before);
                Err(e)
            }
        }
    }

    #[test]
    fn data_fields() {
        assert_eq!(
            data::<8>(R_64, 0, 0x1122_3344_5566_7788, 0),
            Ok(0x1122_3344_5566_7788)
        );
        assert_eq!(data::<8>(R_64, 0, 0, -1), Ok(u64::MAX));
        assert_eq!(data::<4>(R_32, 0, 0xffff_fffe, 1), Ok(0xffff_ffff));
        assert_eq!(
            data::<4>(R_32, 0, 0x1_0000_0000, 0),
            Err(RelocError::Overflow {
                r_type: R_32,
                value: 0x1_0000_0000
            })
        );
        assert_eq!(
            data::<4>(R_32, 0, 0, -1),
            Err(RelocError::Overflow {
                r_type: R_32,
                value: u64::MAX.into()
            }),
            "the kernel's v != (u32)v: no negative values"
        );
        assert_eq!(data::<4>(PCREL32, 0, P - 1, 0), Ok(0xffff_ffff));
        assert_eq!(data::<4>(PLT32, 0, P + 0x7fff_ffff, 0), Ok(0x7fff_ffff));
        assert_eq!(
            data::<4>(PCREL32, 0, P + 0x8000_0000, 0),
            Err(RelocError::Overflow {
                r_type: PCREL32,
                value: 0x8000_0000
            })
        );
        assert_eq!(data::<4>(PCREL32, 0, P - 0x8000_0000, 0), Ok(0x8000_0000));
        assert!(data::<4>(PLT32, 0, P - 0x8000_0001, 0).is_err());
    }

    #[test]
    fn label_differences() {
        // ADD/SUB pairs compute `a - b` in place, modulo the field.
        assert_eq!(data::<8>(ADD64, 5, 0x1000, 0x10), Ok(0x1015));
        assert_eq!(data::<8>(SUB64, 0x1015, 0x1000, 0), Ok(0x15));
        assert_eq!(data::<8>(SUB64, 0, 1, 0), Ok(u64::MAX));
        assert_eq!(
            data::<4>(ADD32, 0xffff_ffff, 0x8000_0001, 0),
            Ok(0x8000_0000)
        );
        assert_eq!(data::<4>(SUB32, 0x10, 0x20, 0), Ok(0xffff_fff0));
        assert_eq!(data::<2>(ADD16, 0xfffe, 3, 0), Ok(1));
        assert_eq!(data::<2>(SUB16, 1, 2, 0), Ok(0xffff));
        assert_eq!(data::<1>(ADD8, 0xff, 2, 0), Ok(1));
        assert_eq!(data::<1>(SUB8, 0, 1, 0), Ok(0xff));
        // 6-bit fields keep the byte's top two bits (DWARF's DW_CFA_advance_loc).
        assert_eq!(data::<1>(SUB6, 0x41, 2, 0), Ok(0x7f));
        assert_eq!(data::<1>(SET6, 0x40, 0x1234_5675, 0), Ok(0x75));
        assert_eq!(data::<1>(SET8, 0xaa, 0x1234_5678, 0), Ok(0x78));
        assert_eq!(data::<2>(SET16, 0, 0x1234_5678, 0), Ok(0x5678));
        assert_eq!(data::<4>(SET32, 0, 0x1234_5678_9abc, 0), Ok(0x5678_9abc));
    }

    #[test]
    fn ignored_and_refused() {
        assert_eq!(data::<8>(RELAX, 7, 0x1000, 0), Ok(7));
        assert_eq!(data::<8>(ALIGN, 7, 0x1000, 0), Ok(7));
        for t in [0, 3, 5, 11, GOT_HI20, 21, 29, 41, 46, 58, 60, 61, 1024] {
            assert_eq!(
                data::<8>(t, 0, 0, 0),
                Err(RelocError::UnsupportedType { r_type: t }),
                "type {t}"
            );
        }
    }

    #[test]
    fn out_of_section() {
        let mut s = [0u8; 8];
        for (t, off, sym) in [
            (R_64, 1, P),
            (R_32, 5, 0),
            (ADD16, 7, 0),
            (BRANCH, 6, P),
            (RVC_JUMP, 8, P),
            (LO12_S, 6, 0),
        ] {
            let r = rel(t, off, sym, 0);
            assert_eq!(
                Riscv64::apply_relocation(&mut s, BASE, &r, &RelocCtx::default()),
                Err(RelocError::OutOfSection {
                    offset: off,
                    size: 8
                }),
                "type {t}"
            );
        }
        let r = rel(CALL, u64::MAX - 1, P, 0);
        assert!(matches!(
            Riscv64::apply_relocation(&mut s, BASE, &r, &RelocCtx::default()),
            Err(RelocError::OutOfSection { .. })
        ));
        assert_eq!(s, [0; 8]);
    }
}
