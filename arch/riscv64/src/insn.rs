//! riscv64 instructions the back-end writes, recognises or relocates.
//!
//! Encodings are those of the RISC-V unprivileged ISA manual (RV64I base, "C" standard
//! extension). The immediate formats used here, with the instruction bit each
//! immediate bit goes to:
//!
//! | format | instruction bits |
//! |---|---|
//! | U (`lui`, `auipc`) | `imm[31:12]` → 31:12, `rd` 11:7, `opcode` 6:0 |
//! | I (`jalr`, loads, `addi`) | `imm[11:0]` → 31:20, `rs1` 19:15, `funct3` 14:12, `rd` 11:7 |
//! | S (stores) | `imm[11:5]` → 31:25, `imm[4:0]` → 11:7 |
//! | B (branches) | `imm[12]` → 31, `imm[10:5]` → 30:25, `imm[4:1]` → 11:8, `imm[11]` → 7 |
//! | J (`jal`) | `imm[20]` → 31, `imm[10:1]` → 30:21, `imm[11]` → 20, `imm[19:12]` → 19:12 |
//! | CB (`c.beqz`, `c.bnez`) | `imm[8]` → 12, `imm[4:3]` → 11:10, `imm[7:6]` → 6:5, `imm[2:1]` → 4:3, `imm[5]` → 2 |
//! | CJ (`c.j`) | `imm[11]` → 12, `imm[4]` → 11, `imm[9:8]` → 10:9, `imm[10]` → 8, `imm[6]` → 7, `imm[7]` → 6, `imm[3:1]` → 5:3, `imm[5]` → 2 |
//!
//! `auipc rd, hi; jalr rd', lo(rd)` reaches `pc + (hi << 12) + lo` with `hi` a signed
//! 20-bit and `lo` a signed 12-bit value: displacements in `[-2^31 - 2^11, 2^31 - 2^11)`
//! (the kernel's `riscv_insn_valid_32bit_offset`). `hi = (d + 0x800) >> 12` rounds so
//! that `lo = d - (hi << 12)` lies in `[-2048, 2047]`.

use klp_arch::{EncodeError, displacement};

/// `nop` (`addi x0, x0, 0`).
pub const NOP: u32 = 0x0000_0013;
/// `c.nop` (the compressed nop, 16 bits).
pub const C_NOP: u16 = 0x0001;

/// Register numbers.
pub mod reg {
    /// `zero` (x0).
    pub const ZERO: u32 = 0;
    /// `ra` (x1), the return address.
    pub const RA: u32 = 1;
    /// `t0` (x5), the alternate link register; holds the return point of a site's call.
    pub const T0: u32 = 5;
    /// `t1` (x6), the call stub's scratch register.
    pub const T1: u32 = 6;
}

/// Major opcodes (bits 6:0).
pub mod op {
    /// `lb`, `lh`, `lw`, `ld`, `lbu`, `lhu`, `lwu`.
    pub const LOAD: u32 = 0x03;
    /// `flw`, `fld`.
    pub const LOAD_FP: u32 = 0x07;
    /// `addi`, `slti`, `xori`, …
    pub const OP_IMM: u32 = 0x13;
    /// `auipc`.
    pub const AUIPC: u32 = 0x17;
    /// `addiw`, `slliw`, …
    pub const OP_IMM_32: u32 = 0x1b;
    /// `sb`, `sh`, `sw`, `sd`.
    pub const STORE: u32 = 0x23;
    /// `fsw`, `fsd`.
    pub const STORE_FP: u32 = 0x27;
    /// `lui`.
    pub const LUI: u32 = 0x37;
    /// `beq`, `bne`, `blt`, …
    pub const BRANCH: u32 = 0x63;
    /// `jalr`.
    pub const JALR: u32 = 0x67;
    /// `jal`.
    pub const JAL: u32 = 0x6f;
}

/// `auipc t0, 0`: U-type, `rd` = 5 → `5 << 7` = 0x280, opcode 0x17.
pub const AUIPC_T0: u32 = 0x0000_0297;
/// `jalr t0, 0(t0)`: I-type, `rs1` = 5 → `5 << 15` = 0x28000, `rd` = 5 → 0x280,
/// opcode 0x67 (the kernel's `JALR_T0`).
pub const JALR_T0_T0: u32 = 0x0002_82e7;
/// `jal zero, 0` (`j .`).
pub const JAL_X0: u32 = 0x0000_006f;

/// Reach of `jal`: `[-1 MiB, 1 MiB)`, in steps of 2 bytes.
pub const JAL_LIMIT: u64 = 1 << 20;
/// The forward bound of `auipc` + 12-bit offset (exclusive): `2^31 - 2^11`.
pub const PAIR_FORWARD: u64 = (1 << 31) - (1 << 11);
/// The backward bound of `auipc` + 12-bit offset (inclusive): `2^31 + 2^11`.
pub const PAIR_BACKWARD: u64 = (1 << 31) + (1 << 11);
/// Instructions are 2-byte aligned (the "C" extension); a branch target must be even.
pub const INSN_ALIGN: u64 = 2;

/// Mask of the U-type immediate (bits 31:12).
pub const U_IMM: u32 = 0xffff_f000;
/// Mask of the I-type immediate (bits 31:20).
pub const I_IMM: u32 = 0xfff0_0000;
/// Mask of the S-type immediate (bits 31:25 and 11:7).
pub const S_IMM: u32 = 0xfe00_0f80;
/// Mask of the B-type immediate (bits 31:25 and 11:7).
pub const B_IMM: u32 = 0xfe00_0f80;
/// Mask of the J-type immediate (bits 31:12).
pub const J_IMM: u32 = 0xffff_f000;
/// Mask of the CB-type immediate of `c.beqz`/`c.bnez` (bits 12:10 and 6:2).
pub const CB_IMM: u16 = 0x1c7c;
/// Mask of the CJ-type immediate of `c.j` (bits 12:2).
pub const CJ_IMM: u16 = 0x1ffc;

/// The major opcode of a 32-bit instruction.
pub const fn opcode(insn: u32) -> u32 {
    insn & 0x7f
}

/// The `rd` field.
pub const fn rd(insn: u32) -> u32 {
    (insn >> 7) & 0x1f
}

/// The `rs1` field.
pub const fn rs1(insn: u32) -> u32 {
    (insn >> 15) & 0x1f
}

/// A U-type instruction.
pub const fn u_type(opcode: u32, rd: u32, imm: u32) -> u32 {
    (imm & U_IMM) | ((rd & 0x1f) << 7) | (opcode & 0x7f)
}

/// An I-type instruction (`imm` is the low 12 bits of a signed value).
pub const fn i_type(opcode: u32, funct3: u32, rd: u32, rs1: u32, imm: u32) -> u32 {
    ((imm & 0xfff) << 20)
        | ((rs1 & 0x1f) << 15)
        | ((funct3 & 7) << 12)
        | ((rd & 0x1f) << 7)
        | (opcode & 0x7f)
}

/// `auipc rd, hi20` (`hi20` the signed 20-bit upper immediate).
pub const fn auipc(rd: u32, hi20: i32) -> u32 {
    u_type(op::AUIPC, rd, (hi20 as u32) << 12)
}

/// `jalr rd, lo12(rs1)`.
pub const fn jalr(rd: u32, rs1: u32, lo12: i32) -> u32 {
    i_type(op::JALR, 0, rd, rs1, lo12 as u32)
}

/// `ld rd, imm(rs1)` (funct3 = 3).
pub const fn ld(rd: u32, rs1: u32, imm: i32) -> u32 {
    i_type(op::LOAD, 3, rd, rs1, imm as u32)
}

/// Splits a displacement into the `auipc` and 12-bit parts (see the module docs); the
/// caller has checked the range.
pub const fn hi_lo(d: i64) -> (i32, i32) {
    let hi = d.wrapping_add(0x800) >> 12;
    let lo = d.wrapping_sub(hi << 12);
    (hi as i32, lo as i32)
}

/// The displacement from `from` to `to` if an `auipc` pair reaches it.
pub fn pair_displacement(from: u64, to: u64) -> Result<i64, EncodeError> {
    let err = EncodeError::OutOfRange {
        from,
        to,
        limit: PAIR_FORWARD,
    };
    // `[-2^31 - 2^11, 2^31 - 2^11)` is `[-2^31, 2^31)` shifted down by 2^11.
    let shifted = displacement(from, to.wrapping_add(1 << 11), 1 << 31, 1).map_err(|_| err)?;
    if to.abs_diff(from) > PAIR_BACKWARD {
        // The shifted target wrapped around the address space.
        return Err(err);
    }
    let d = shifted.wrapping_sub(1 << 11);
    if d.rem_euclid(INSN_ALIGN as i64) != 0 {
        return Err(EncodeError::Misaligned {
            from,
            to,
            align: INSN_ALIGN,
        });
    }
    Ok(d)
}

/// `auipc t0, hi; jalr t0, lo(t0)` placed at `from`, calling `to` with the return
/// point (`from + 8`) in `t0` (the kernel's ftrace call).
pub fn call_t0(from: u64, to: u64) -> Result<[u32; 2], EncodeError> {
    let (hi, lo) = hi_lo(pair_displacement(from, to)?);
    Ok([auipc(reg::T0, hi), jalr(reg::T0, reg::T0, lo)])
}

/// `auipc t0, hi` placed at `from`, the first word of [`call_t0`] to `to`.
pub fn auipc_t0_for(from: u64, to: u64) -> Result<u32, EncodeError> {
    call_t0(from, to).map(|[w0, _]| w0)
}

/// Puts a J-type offset (bits 20:1 of `off`) into `insn`.
pub const fn set_j_imm(insn: u32, off: u32) -> u32 {
    (insn & !J_IMM)
        | ((off & 0x10_0000) << 11)
        | ((off & 0x7fe) << 20)
        | ((off & 0x800) << 9)
        | (off & 0xf_f000)
}

/// Puts a B-type offset (bits 12:1 of `off`) into `insn`.
pub const fn set_b_imm(insn: u32, off: u32) -> u32 {
    (insn & !B_IMM)
        | ((off & 0x1000) << 19)
        | ((off & 0x7e0) << 20)
        | ((off & 0x1e) << 7)
        | ((off & 0x800) >> 4)
}

/// Puts the U-type immediate `imm & 0xfffff000` into `insn`.
pub const fn set_u_imm(insn: u32, imm: u32) -> u32 {
    (insn & !U_IMM) | (imm & U_IMM)
}

/// Puts a 12-bit I-type immediate into `insn`.
pub const fn set_i_imm(insn: u32, imm: u32) -> u32 {
    (insn & !I_IMM) | ((imm & 0xfff) << 20)
}

/// Puts a 12-bit S-type immediate into `insn`.
pub const fn set_s_imm(insn: u32, imm: u32) -> u32 {
    (insn & !S_IMM) | ((imm & 0xfe0) << 20) | ((imm & 0x1f) << 7)
}

/// Puts a CB-type offset (bits 8:1 of `off`) into `c.beqz`/`c.bnez`.
pub const fn set_cb_imm(insn: u16, off: u32) -> u16 {
    let imm = ((off & 0x100) << 4)
        | ((off & 0x18) << 7)
        | ((off & 0xc0) >> 1)
        | ((off & 0x6) << 2)
        | ((off & 0x20) >> 3);
    (insn & !CB_IMM) | (imm as u16 & CB_IMM)
}

/// Puts a CJ-type offset (bits 11:1 of `off`) into `c.j`.
pub const fn set_cj_imm(insn: u16, off: u32) -> u16 {
    let imm = ((off & 0x800) << 1)
        | ((off & 0x10) << 7)
        | ((off & 0x300) << 1)
        | ((off & 0x400) >> 2)
        | ((off & 0x40) << 1)
        | ((off & 0x80) >> 1)
        | ((off & 0xe) << 2)
        | ((off & 0x20) >> 3);
    (insn & !CJ_IMM) | (imm as u16 & CJ_IMM)
}

/// `jal rd, to`, placed at `from`.
pub fn jal(rd: u32, from: u64, to: u64) -> Result<u32, EncodeError> {
    let d = displacement(from, to, JAL_LIMIT, INSN_ALIGN)?;
    Ok(set_j_imm(JAL_X0 | ((rd & 0x1f) << 7), d as u32))
}

/// The target of a `jal` at `from`, if `insn` is one.
pub fn jal_target(insn: u32, from: u64) -> Option<u64> {
    if opcode(insn) != op::JAL {
        return None;
    }
    // Gather imm[20:1] back, then sign-extend from bit 20.
    let imm = ((insn >> 11) & 0x10_0000)
        | ((insn >> 20) & 0x7fe)
        | ((insn >> 9) & 0x800)
        | (insn & 0xf_f000);
    let off = i64::from(((imm << 11) as i32) >> 11);
    Some(from.wrapping_add(off as u64))
}

/// The signed value an `auipc`/`lui` adds (`imm[31:12] << 12`, sign-extended).
pub const fn u_imm(insn: u32) -> i64 {
    (insn & U_IMM) as i32 as i64
}

/// The signed 12-bit immediate of an I-type instruction.
pub const fn i_imm(insn: u32) -> i64 {
    (insn as i32 >> 20) as i64
}

/// Whether `insn` is `auipc t0, <any>`.
pub const fn is_auipc_t0(insn: u32) -> bool {
    insn & !U_IMM == AUIPC_T0
}

/// Whether the halfword `h` opens a 32-bit instruction (its low two bits are `11`).
pub const fn is_32bit(h: u16) -> bool {
    h & 3 == 3
}

#[cfg(test)]
mod tests {
    use super::*;

    // Golden words derived by hand from the encoding tables in the module docs.

    #[test]
    fn fixed_words() {
        // addi x0, x0, 0: imm 0, rs1 0, funct3 000, rd 0, opcode 0010011 = 0x13.
        assert_eq!(i_type(op::OP_IMM, 0, 0, 0, 0), NOP);
        assert_eq!(auipc(reg::T0, 0), AUIPC_T0);
        assert_eq!(jalr(reg::T0, reg::T0, 0), JALR_T0_T0);
        // jr t1 = jalr x0, 0(t1): rs1 6 -> 6 << 15 = 0x30000, opcode 0x67.
        assert_eq!(jalr(reg::ZERO, reg::T1, 0), 0x0003_0067);
        // ld t1, 16(t1): imm 16 -> 0x0100_0000, rs1 6 -> 0x30000, funct3 3 -> 0x3000,
        // rd 6 -> 0x300, opcode 0x03.
        assert_eq!(ld(reg::T1, reg::T1, 16), 0x0103_3303);
    }

    #[test]
    fn jal_edges() {
        let p = 0x8000_0000u64;
        // +0xffffe (the last forward target): imm[20] = 0, imm[19:12] = 0xff,
        // imm[11] = 1, imm[10:1] = 0x3ff -> (0x3ff << 21) | (1 << 20) | (0xff << 12)
        // | 0x6f = 0x7fe00000 + 0x100000 + 0xff000 + 0x6f.
        assert_eq!(jal(reg::ZERO, p, p + 0xf_fffe), Ok(0x7fff_f06f));
        // -0x100000 (the last backward target): only imm[20] set -> bit 31.
        assert_eq!(jal(reg::ZERO, p, p - 0x10_0000), Ok(0x8000_006f));
        // +8 with rd = ra: imm[3] -> bit 23 (imm[k] at bit 20 + k for k in 1..=10),
        // rd 1 -> 0x80.
        assert_eq!(jal(reg::RA, p, p + 8), Ok(0x0080_00ef));
        // -2: all imm bits set -> 0xfffff000 | 0x6f.
        assert_eq!(jal(reg::ZERO, p, p - 2), Ok(0xffff_f06f));
        assert_eq!(
            jal(reg::ZERO, p, p + 0x10_0000),
            Err(EncodeError::OutOfRange {
                from: p,
                to: p + 0x10_0000,
                limit: 1 << 20
            })
        );
        assert_eq!(
            jal(reg::ZERO, p, p - 0x10_0002),
            Err(EncodeError::OutOfRange {
                from: p,
                to: p - 0x10_0002,
                limit: 1 << 20
            })
        );
        assert_eq!(
            jal(reg::ZERO, p, p + 3),
            Err(EncodeError::Misaligned {
                from: p,
                to: p + 3,
                align: 2
            })
        );
    }

    #[test]
    fn jal_decode() {
        let p = 0x8000_0000u64;
        assert_eq!(jal_target(0x7fff_f06f, p), Some(p + 0xf_fffe));
        assert_eq!(jal_target(0x8000_006f, p), Some(p - 0x10_0000));
        assert_eq!(jal_target(0xffff_f06f, p), Some(p - 2));
        assert_eq!(jal_target(NOP, p), None);
    }

    #[test]
    fn call_pair_edges() {
        let p = 0x1_0000_0000u64;
        // d = 0x1000: hi = 0x1800 >> 12 = 1, lo = 0 -> auipc t0, 1 = 0x1297.
        assert_eq!(call_t0(p, p + 0x1000), Ok([0x0000_1297, 0x0002_82e7]));
        // d = 0x800: hi = 1, lo = 0x800 - 0x1000 = -0x800 -> imm field 0x800 (bit 31).
        assert_eq!(call_t0(p, p + 0x800), Ok([0x0000_1297, 0x8002_82e7]));
        // d = 0x7fe: hi = 0xffe >> 12 = 0, lo = 0x7fe -> 0x7fe << 20 = 0x7fe00000.
        assert_eq!(call_t0(p, p + 0x7fe), Ok([0x0000_0297, 0x7fe2_82e7]));
        // d = -4: hi = 0x7fc >> 12 = 0, lo = -4 -> 0xffc << 20.
        assert_eq!(call_t0(p, p - 4), Ok([0x0000_0297, 0xffc2_82e7]));
        // The last forward target, d = 2^31 - 2^11 - 2 = 0x7ffff7fe:
        // hi = 0x7ffffffe >> 12 = 0x7ffff, lo = 0x7fe.
        assert_eq!(call_t0(p, p + 0x7fff_f7fe), Ok([0x7fff_f297, 0x7fe2_82e7]));
        // The last backward target, d = -2^31 - 2^11: hi = -2^31 >> 12 = -0x80000
        // (field 0x80000 -> bit 31), lo = -0x800 (field 0x800 -> bit 31).
        assert_eq!(call_t0(p, p - 0x8000_0800), Ok([0x8000_0297, 0x8002_82e7]));
        let out = |to| {
            Err(EncodeError::OutOfRange {
                from: p,
                to,
                limit: PAIR_FORWARD,
            })
        };
        assert_eq!(call_t0(p, p + 0x7fff_f800), out(p + 0x7fff_f800));
        assert_eq!(call_t0(p, p - 0x8000_0802), out(p - 0x8000_0802));
        // No wrap-around at either end of the address space.
        let wrap = |from, to| {
            Err(EncodeError::OutOfRange {
                from,
                to,
                limit: PAIR_FORWARD,
            })
        };
        assert_eq!(call_t0(0, u64::MAX - 0x7ff), wrap(0, u64::MAX - 0x7ff));
        assert_eq!(call_t0(u64::MAX - 1, 0), wrap(u64::MAX - 1, 0));
        assert_eq!(
            call_t0(p, p + 1),
            Err(EncodeError::Misaligned {
                from: p,
                to: p + 1,
                align: 2
            })
        );
    }

    #[test]
    fn immediate_fields() {
        // beq x0, x0, +0xffe (the last forward B offset): imm[12] = 0, imm[11] = 1 ->
        // bit 7, imm[10:5] = 0x3f -> 0x7e000000, imm[4:1] = 0xf -> 0xf00.
        assert_eq!(set_b_imm(0x0000_0063, 0xffe), 0x7e00_0fe3);
        // -0x1000: imm[12] only -> bit 31.
        assert_eq!(set_b_imm(0x0000_0063, 0xffff_f000), 0x8000_0063);
        // addi a0, a0, 0 = 0x00050513; imm -1 -> 0xfff << 20.
        assert_eq!(set_i_imm(0x0005_0513, 0xffff_ffff), 0xfff5_0513);
        // sd a1, 0(a0) = 0x00b53023; imm 0x7ff: imm[11:5] = 0x3f -> 0x7e000000,
        // imm[4:0] = 0x1f -> 0xf80.
        assert_eq!(set_s_imm(0x00b5_3023, 0x7ff), 0x7eb5_3fa3);
        assert_eq!(set_u_imm(0x0000_0517, 0x1234_5fff), 0x1234_5517);
        // c.beqz a0, +0xfe (the last forward CB offset) = 0xc101 base (rs1' = 2):
        // imm[8] = 0, imm[7:6] = 3 -> bits 6:5 (0x60), imm[5] = 1 -> bit 2 (0x4),
        // imm[4:3] = 3 -> bits 11:10 (0xc00), imm[2:1] = 3 -> bits 4:3 (0x18).
        assert_eq!(set_cb_imm(0xc101, 0xfe), 0xcd7d);
        // -0x100: imm[8] only -> bit 12.
        assert_eq!(set_cb_imm(0xc101, 0xffff_ff00), 0xd101);
        // c.j +0x7fe = 0xa001 base: every imm bit but imm[11] -> bits 11:2 (0xffc).
        assert_eq!(set_cj_imm(0xa001, 0x7fe), 0xaffd);
        // -0x800: imm[11] only -> bit 12.
        assert_eq!(set_cj_imm(0xa001, 0xffff_f800), 0xb001);
        // +0x10: imm[4] -> bit 11.
        assert_eq!(set_cj_imm(0xa001, 0x10), 0xa801);
    }

    #[test]
    fn decoders() {
        assert_eq!(u_imm(0x8000_0297), -(1 << 31));
        assert_eq!(u_imm(0x0000_1297), 0x1000);
        assert_eq!(i_imm(0xffc2_82e7), -4);
        assert!(is_auipc_t0(0x1234_5297));
        assert!(!is_auipc_t0(0x1234_5317), "auipc t1");
        assert!(is_32bit(0x0013) && !is_32bit(C_NOP));
        assert_eq!(
            (opcode(JALR_T0_T0), rd(JALR_T0_T0), rs1(JALR_T0_T0)),
            (op::JALR, 5, 5)
        );
    }
}
