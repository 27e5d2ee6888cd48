//! Linking a user-space patch object (see `klp_arch::LinkClass`): every call that
//! leaves the patch goes through a stub that saves the caller's TOC pointer and enters
//! the callee's global entry with r12 = its address (the callee sets up its own r2);
//! the `nop` after the `bl` restores r2 (see [`crate::reloc`]).

use klp_arch::{EncodeError, LinkClass, MAX_CALL_STUB};

use crate::insn;
use crate::reloc::REL24;

/// The class of `r_type`.
pub fn class(r_type: u32) -> LinkClass {
    match r_type {
        REL24 => LinkClass::Call,
        _ => LinkClass::Plain,
    }
}

/// `std r2,24(r1)`; r12 = `target` (five instructions); `mtctr r12; bctr`: 32 bytes,
/// clobbers r12 and ctr (volatile; r12 is what a global entry expects).
pub fn call_stub(
    at: u64,
    target: u64,
    out: &mut [u8; MAX_CALL_STUB],
) -> Result<usize, EncodeError> {
    if !at.is_multiple_of(4) {
        return Err(EncodeError::Misaligned {
            from: at,
            to: target,
            align: 4,
        });
    }
    let [l0, l1, l2, l3, l4] = insn::load_r12(target);
    let words: [u32; 8] = [
        insn::STD_R2_24_R1,
        l0,
        l1,
        l2,
        l3,
        l4,
        insn::MTCTR_R12,
        insn::BCTR,
    ];
    for (dst, w) in out.chunks_exact_mut(4).zip(words) {
        dst.copy_from_slice(&w.to_le_bytes());
    }
    Ok(core::mem::size_of_val(&words))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classes() {
        assert_eq!(class(REL24), LinkClass::Call);
        assert_eq!(class(crate::reloc::TOC16_HA), LinkClass::Plain);
    }

    #[test]
    fn stub_builds_the_target_in_r12() {
        let mut out = [0; MAX_CALL_STUB];
        let n = call_stub(0x1000, 0x1122_3344_5566_7788, &mut out).unwrap();
        assert_eq!(n, 32);
        let mut w = [0u32; 8];
        for (d, c) in w.iter_mut().zip(out.chunks_exact(4)) {
            *d = u32::from_le_bytes(c.try_into().unwrap());
        }
        assert_eq!(
            w,
            [
                0xf841_0018,
                0x3d80_1122,
                0x618c_3344,
                0x798c_07c6,
                0x658c_5566,
                0x618c_7788,
                0x7d89_03a6,
                0x4e80_0420
            ]
        );
    }
}
