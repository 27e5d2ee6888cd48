//! Linking a user-space patch object (see `klp_arch::LinkClass`): `brasl`/`jg` through
//! `R_390_PLT32DBL` get a stub beyond ±4 GiB, `R_390_GOTENT` a slot.

use klp_arch::{EncodeError, LinkClass, MAX_CALL_STUB};

use crate::reloc::{R_390_PC32DBL, R_390_PLT32DBL};

/// `R_390_GOTENT`: `(G + GOT + A - P) >> 1`, the GOT entry's address in halfwords
/// (`lgrl %r, sym@GOTENT`).
pub const R_390_GOTENT: u32 = 26;

/// The class of `r_type`.
pub fn class(r_type: u32) -> LinkClass {
    match r_type {
        R_390_PLT32DBL => LinkClass::Call,
        // `lgrl %r, slot` loads what the GOT entry held.
        R_390_GOTENT => LinkClass::GotSlot {
            as_type: R_390_PC32DBL,
        },
        _ => LinkClass::Plain,
    }
}

/// `lgrl %r1, .+8; br %r1; .quad target`: 16 bytes, clobbers r1 (volatile, the
/// register the ABI's PLT entries use).
pub fn call_stub(
    at: u64,
    target: u64,
    out: &mut [u8; MAX_CALL_STUB],
) -> Result<usize, EncodeError> {
    if !at.is_multiple_of(8) {
        return Err(EncodeError::Misaligned {
            from: at,
            to: target,
            align: 8,
        });
    }
    // lgrl: RIL-b, opcode c4.8, r1 in the high nibble of the second byte, the literal
    // 8 bytes = 4 halfwords ahead. br %r1: bcr 15,%r1.
    let mut code = [0xc4, 0x18, 0, 0, 0, 4, 0x07, 0xf1, 0, 0, 0, 0, 0, 0, 0, 0];
    if let Some(lit) = code.get_mut(8..) {
        lit.copy_from_slice(&target.to_be_bytes());
    }
    out.get_mut(..code.len())
        .ok_or(EncodeError::Unsupported)?
        .copy_from_slice(&code);
    Ok(code.len())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classes() {
        assert_eq!(class(R_390_PLT32DBL), LinkClass::Call);
        assert_eq!(class(R_390_GOTENT), LinkClass::GotSlot { as_type: 19 });
        assert_eq!(class(R_390_PC32DBL), LinkClass::Plain);
    }

    #[test]
    fn stub() {
        let mut out = [0; MAX_CALL_STUB];
        let n = call_stub(0x8000, 0x0000_03ff_1234_5678, &mut out).unwrap();
        assert_eq!(&out[..8], &[0xc4, 0x18, 0, 0, 0, 4, 0x07, 0xf1]);
        assert_eq!(&out[8..n], &0x0000_03ff_1234_5678u64.to_be_bytes());
        assert!(call_stub(0x8002, 0, &mut out).is_err());
    }
}
