//! s390x instructions the back-end writes or recognises (big-endian bytes).

use klp_arch::{EncodeError, displacement};

/// `brcl 0,0` (`jgnop`): the 6-byte nop of `-mnop-mcount` and the kernel's ftrace.
pub const BRCL_0_0: [u8; 6] = [0xc0, 0x04, 0, 0, 0, 0];
/// `nopr` (`bcr 0,%r0`), 2 bytes.
pub const NOPR: [u8; 2] = [0x07, 0x00];
/// `nop` (`bc 0,0`), 4 bytes.
pub const NOP4: [u8; 4] = [0x47, 0x00, 0x00, 0x00];
/// First two bytes of `brcl 0,…` (any offset: the branch is never taken).
pub const BRCL_0: [u8; 2] = [0xc0, 0x04];
/// First two bytes of `brasl %r0,…`: call, return address in r0 (how `-mfentry`
/// calls `__fentry__`, keeping r14, the caller's return address, intact).
pub const BRASL_R0: [u8; 2] = [0xc0, 0x05];
/// First two bytes of `brcl 15,…` (`jg`): an unconditional branch.
pub const JG: [u8; 2] = [0xc0, 0xf4];
/// Length of the RIL-b/c instructions above.
pub const RIL_LEN: usize = 6;
/// Reach of a 32-bit halfword offset: `[-4 GiB, 4 GiB)`, even targets only.
pub const RIL_LIMIT: u64 = 1 << 32;

fn ril(op: [u8; 2], from: u64, to: u64) -> Result<[u8; 6], EncodeError> {
    let d = displacement(from, to, RIL_LIMIT, 2)?;
    let h = ((d >> 1) as i32).to_be_bytes();
    Ok([op[0], op[1], h[0], h[1], h[2], h[3]])
}

/// `brasl %r0,to`, placed at `from`.
pub fn brasl_r0(from: u64, to: u64) -> Result<[u8; 6], EncodeError> {
    ril(BRASL_R0, from, to)
}

/// `jg to` (`brcl 15,to`), placed at `from`.
pub fn jg(from: u64, to: u64) -> Result<[u8; 6], EncodeError> {
    ril(JG, from, to)
}

/// Length of the nop `code` starts with: `brcl 0,*`, `nop` or `nopr`.
pub fn nop_len(code: &[u8]) -> Option<usize> {
    if code.starts_with(&BRCL_0) && code.len() >= RIL_LEN {
        Some(RIL_LEN)
    } else if code.starts_with(&NOP4) {
        Some(4)
    } else if code.starts_with(&NOPR) {
        Some(2)
    } else {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // Golden bytes from the z/Architecture Principles of Operation (RIL-b BRASL
    // C0x5, RIL-c BRCL C0x4 with M1 = 15; I2 = offset in halfwords), cross-checked
    // by `ci/objdump-check`.
    #[test]
    fn branches_golden() {
        assert_eq!(brasl_r0(0x1000, 0x2000), Ok([0xc0, 0x05, 0, 0, 0x08, 0]));
        assert_eq!(jg(0x1000, 0x0ffe), Ok([0xc0, 0xf4, 0xff, 0xff, 0xff, 0xff]));
        assert_eq!(jg(0, 0xffff_fffe), Ok([0xc0, 0xf4, 0x7f, 0xff, 0xff, 0xff]));
        assert_eq!(brasl_r0(1 << 32, 0), Ok([0xc0, 0x05, 0x80, 0, 0, 0]));
    }

    #[test]
    fn range_edges() {
        assert_eq!(
            jg(0, 1 << 32),
            Err(EncodeError::OutOfRange {
                from: 0,
                to: 1 << 32,
                limit: 1 << 32
            })
        );
        assert!(brasl_r0((1 << 32) + 2, 0).is_err());
        assert!(matches!(
            jg(0, 3),
            Err(EncodeError::Misaligned { align: 2, .. })
        ));
    }

    #[test]
    fn nops() {
        assert_eq!(nop_len(&BRCL_0_0), Some(6));
        assert_eq!(nop_len(&[0xc0, 0x04, 0, 0, 0x12, 0x34]), Some(6));
        assert_eq!(nop_len(&[0xc0, 0x04, 0]), None);
        assert_eq!(nop_len(&NOP4), Some(4));
        assert_eq!(nop_len(&NOPR), Some(2));
        assert_eq!(nop_len(&[0x07, 0xfe]), None, "br %r14 is not a nop");
    }
}
