//! aarch64 instructions the back-end writes, recognises or relocates.

use klp_arch::{EncodeError, displacement};

/// `nop`.
pub const NOP: u32 = 0xd503_201f;
/// `bti c`: the landing pad that may precede the site.
pub const BTI_C: u32 = 0xd503_245f;
/// `mov x9, x30` (`orr x9, xzr, x30`): saves the caller's return address before the
/// `bl` to the trampoline clobbers x30 (the kernel's patchable-entry convention).
pub const MOV_X9_X30: u32 = 0xaa1e_03e9;
/// `b` with a zero offset.
pub const B: u32 = 0x1400_0000;
/// `bl` with a zero offset.
pub const BL: u32 = 0x9400_0000;
/// Reach of `b`/`bl`: `[-128 MiB, 128 MiB)`.
pub const BRANCH_LIMIT: u64 = 1 << 27;
/// Mask of the 26-bit immediate of `b`/`bl`.
pub const IMM26: u32 = 0x03ff_ffff;

fn branch(op: u32, from: u64, to: u64) -> Result<u32, EncodeError> {
    let d = displacement(from, to, BRANCH_LIMIT, 4)?;
    Ok(op | ((d >> 2) as u32 & IMM26))
}

/// `b to`, placed at `from`.
pub fn b(from: u64, to: u64) -> Result<u32, EncodeError> {
    branch(B, from, to)
}

/// `bl to`, placed at `from`.
pub fn bl(from: u64, to: u64) -> Result<u32, EncodeError> {
    branch(BL, from, to)
}

/// The target of a `b`/`bl` at `from`, if `insn` is one.
pub fn branch_target(insn: u32, from: u64) -> Option<u64> {
    if insn & !IMM26 != B && insn & !IMM26 != BL {
        return None;
    }
    let imm = i64::from(((insn & IMM26) << 6) as i32 >> 6) << 2;
    Some(from.wrapping_add(imm as u64))
}

/// Puts a 21-bit `adr`/`adrp` immediate into `insn` (immlo in bits 29–30, immhi in
/// bits 5–23).
pub fn set_adr_imm(insn: u32, imm: u32) -> u32 {
    let immlo = imm & 3;
    let immhi = (imm >> 2) & 0x7_ffff;
    (insn & !((3 << 29) | (0x7_ffff << 5))) | (immlo << 29) | (immhi << 5)
}

/// Puts a 12-bit immediate into bits 10–21 (`add`, `ldr`/`str` unsigned offset).
pub fn set_imm12(insn: u32, imm: u32) -> u32 {
    (insn & !(0xfff << 10)) | ((imm & 0xfff) << 10)
}

/// Puts a 19-bit immediate into bits 5–23 (`b.cond`, `cbz`, `ldr literal`).
pub fn set_imm19(insn: u32, imm: u32) -> u32 {
    (insn & !(0x7_ffff << 5)) | ((imm & 0x7_ffff) << 5)
}

/// Puts a 14-bit immediate into bits 5–18 (`tbz`/`tbnz`).
pub fn set_imm14(insn: u32, imm: u32) -> u32 {
    (insn & !(0x3fff << 5)) | ((imm & 0x3fff) << 5)
}

/// Puts a 26-bit immediate into bits 0–25 (`b`/`bl`).
pub fn set_imm26(insn: u32, imm: u32) -> u32 {
    (insn & !IMM26) | (imm & IMM26)
}

#[cfg(test)]
mod tests {
    use super::*;

    // Golden words from the Arm ARM encodings (B: 0b000101 imm26, BL: 0b100101
    // imm26, offset = imm26 * 4), cross-checked by `ci/objdump-check`.
    #[test]
    fn branches_golden() {
        assert_eq!(b(0x1000, 0x1000), Ok(0x1400_0000));
        assert_eq!(bl(0x1000, 0x1004), Ok(0x9400_0001));
        assert_eq!(b(0x1000, 0x0ffc), Ok(0x17ff_ffff));
        assert_eq!(bl(0x40_0000, 0x40_0000 + 0x7ff_fffc), Ok(0x95ff_ffff));
        assert_eq!(b(0x800_0000, 0), Ok(0x1600_0000), "exactly -128 MiB");
    }

    #[test]
    fn branch_range_edges() {
        assert_eq!(
            b(0x800_0000, 0x1000_0000),
            Err(EncodeError::OutOfRange {
                from: 0x800_0000,
                to: 0x1000_0000,
                limit: 1 << 27
            })
        );
        assert!(b(0x800_0004, 0).is_err(), "128 MiB + 4 back");
        assert_eq!(
            bl(0, 2),
            Err(EncodeError::Misaligned {
                from: 0,
                to: 2,
                align: 4
            })
        );
    }

    #[test]
    fn decode() {
        assert_eq!(branch_target(0x17ff_ffff, 0x1000), Some(0x0ffc));
        assert_eq!(branch_target(0x9400_0001, 0x1000), Some(0x1004));
        assert_eq!(branch_target(NOP, 0x1000), None);
    }

    #[test]
    fn immediate_fields() {
        // adrp x0, #0: 0x90000000; imm = 0x12345 -> immlo = 1, immhi = 0x48d1.
        assert_eq!(set_adr_imm(0x9000_0000, 0x12345), 0xb009_1a20);
        // add x0, x0, #0 = 0x91000000; imm12 0xabc.
        assert_eq!(set_imm12(0x9100_0000, 0xabc), 0x912a_f000);
        assert_eq!(set_imm19(0x5400_0000, 0x7_ffff), 0x54ff_ffe0);
        assert_eq!(set_imm14(0x3600_0000, 0x3fff), 0x3607_ffe0);
        assert_eq!(set_imm26(0x9400_0000, u32::MAX), 0x97ff_ffff);
    }
}
