//! ppc64le instructions the back-end writes, recognises or relocates.

use klp_arch::{EncodeError, displacement};

/// `nop` (`ori r0,r0,0`).
pub const NOP: u32 = 0x6000_0000;
/// `mflr r0`.
pub const MFLR_R0: u32 = 0x7c08_02a6;
/// `b` with a zero offset (`I` form, opcode 18, AA = 0, LK = 0).
pub const B: u32 = 0x4800_0000;
/// `bl` with a zero offset (LK = 1).
pub const BL: u32 = 0x4800_0001;
/// `addis r2,r12,0`: first word of the global entry's TOC setup.
pub const ADDIS_R2_R12: u32 = 0x3c4c_0000;
/// `addi r2,r2,0`: second word of the TOC setup.
pub const ADDI_R2_R2: u32 = 0x3842_0000;
/// `ld r2,24(r1)`: restores the caller's TOC after a call through a stub.
pub const LD_R2_24_R1: u32 = 0xe841_0018;
/// `std r2,24(r1)`: saves the TOC in the caller's frame (done by a call stub).
pub const STD_R2_24_R1: u32 = 0xf841_0018;
/// `mtctr r12`.
pub const MTCTR_R12: u32 = 0x7d89_03a6;
/// `bctr`.
pub const BCTR: u32 = 0x4e80_0420;
/// `lis; ori; sldi; oris; ori`: r12 = `v`, from immediates (no TOC, no LR).
pub const fn load_r12(v: u64) -> [u32; 5] {
    [
        0x3d80_0000 | ((v >> 48) & 0xffff) as u32, // lis   r12,v@highest
        0x618c_0000 | ((v >> 32) & 0xffff) as u32, // ori   r12,r12,v@higher
        0x798c_07c6,                               // sldi  r12,r12,32
        0x658c_0000 | ((v >> 16) & 0xffff) as u32, // oris  r12,r12,v@h
        0x618c_0000 | (v & 0xffff) as u32,         // ori   r12,r12,v@l
    ]
}

/// Reach of `b`/`bl`: `[-32 MiB, 32 MiB)`.
pub const BRANCH_LIMIT: u64 = 1 << 25;
/// The displacement bits of `b`/`bl` (`LI || 0b00`).
pub const LI_MASK: u32 = 0x03ff_fffc;

fn branch(op: u32, from: u64, to: u64) -> Result<u32, EncodeError> {
    let d = displacement(from, to, BRANCH_LIMIT, 4)?;
    Ok(op | (d as u32 & LI_MASK))
}

/// `b to`, placed at `from`.
pub fn b(from: u64, to: u64) -> Result<u32, EncodeError> {
    branch(B, from, to)
}

/// `bl to`, placed at `from`.
pub fn bl(from: u64, to: u64) -> Result<u32, EncodeError> {
    branch(BL, from, to)
}

/// The target of a relative `b`/`bl` at `from`, if `insn` is one.
pub fn branch_target(insn: u32, from: u64) -> Option<u64> {
    if insn & !LI_MASK != B && insn & !LI_MASK != BL {
        return None;
    }
    let d = i64::from(((insn & LI_MASK) << 6) as i32 >> 6);
    Some(from.wrapping_add(d as u64))
}

/// `#lo(v)`: the low 16 bits.
pub const fn lo(v: u64) -> u16 {
    v as u16
}

/// `#hi(v)`: bits 16–31.
pub const fn hi(v: u64) -> u16 {
    (v >> 16) as u16
}

/// `#ha(v)`: bits 16–31 adjusted for the sign of the low half, so that
/// `(ha << 16) + (lo as i16)` gives back `v`.
pub const fn ha(v: u64) -> u16 {
    (v.wrapping_add(0x8000) >> 16) as u16
}

#[cfg(test)]
mod tests {
    use super::*;

    // Golden words from the Power ISA I-form (opcode 18, LI, AA, LK), cross-checked
    // by `ci/objdump-check`.
    #[test]
    fn branches_golden() {
        assert_eq!(b(0x1000, 0x1000), Ok(0x4800_0000));
        assert_eq!(bl(0x1000, 0x1010), Ok(0x4800_0011));
        assert_eq!(b(0x1000, 0x0ffc), Ok(0x4bff_fffc));
        assert_eq!(bl(0, 0x1ff_fffc), Ok(0x49ff_fffd));
        assert_eq!(b(0x200_0000, 0), Ok(0x4a00_0000), "exactly -32 MiB");
    }

    #[test]
    fn branch_range_edges() {
        assert_eq!(
            bl(0, 0x200_0000),
            Err(EncodeError::OutOfRange {
                from: 0,
                to: 0x200_0000,
                limit: 1 << 25
            })
        );
        assert!(b(0x200_0004, 0).is_err());
        assert!(matches!(b(0, 6), Err(EncodeError::Misaligned { .. })));
    }

    #[test]
    fn decode_and_halves() {
        assert_eq!(branch_target(0x4bff_fffc, 0x1000), Some(0xffc));
        assert_eq!(branch_target(0x4800_0011, 0x1000), Some(0x1010));
        assert_eq!(branch_target(NOP, 0), None);
        assert_eq!(branch_target(0x4800_0002, 0), None, "absolute branch");
        assert_eq!(
            (lo(0x1234_8000), hi(0x1234_8000), ha(0x1234_8000)),
            (0x8000, 0x1234, 0x1235)
        );
        assert_eq!(ha(0x1234_7fff), 0x1234);
    }
}
