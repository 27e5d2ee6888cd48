//! Linking a user-space patch object (see `klp_arch::LinkClass`): `bl`/`b` get a stub
//! beyond ±128 MiB (the kernel's module PLT), GOT page/offset pairs a slot.

use klp_arch::{EncodeError, LinkClass, MAX_CALL_STUB};

use crate::reloc::{ADR_PREL_PG_HI21, CALL26, JUMP26, LDST64_ABS_LO12_NC};

/// `R_AARCH64_ADR_GOT_PAGE`: `adrp` of the GOT entry's page.
pub const ADR_GOT_PAGE: u32 = 311;
/// `R_AARCH64_LD64_GOT_LO12_NC`: `ldr` of the GOT entry.
pub const LD64_GOT_LO12_NC: u32 = 312;

/// The class of `r_type`.
pub fn class(r_type: u32) -> LinkClass {
    match r_type {
        CALL26 | JUMP26 => LinkClass::Call,
        // `adrp x, slot` + `ldr x, [x, :lo12:slot]` loads what the GOT entry held.
        ADR_GOT_PAGE => LinkClass::GotSlot {
            as_type: ADR_PREL_PG_HI21,
        },
        LD64_GOT_LO12_NC => LinkClass::GotSlot {
            as_type: LDST64_ABS_LO12_NC,
        },
        _ => LinkClass::Plain,
    }
}

/// `ldr x16, .+8; br x16; .quad target`: 16 bytes, clobbers x16 (IP0, the register
/// the procedure call standard gives linker veneers).
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
    const LDR_X16_LIT8: u32 = 0x5800_0000 | (2 << 5) | 16;
    const BR_X16: u32 = 0xd61f_0000 | (16 << 5);
    let mut code = [0u8; 16];
    for (dst, w) in code.chunks_exact_mut(4).zip([LDR_X16_LIT8, BR_X16]) {
        dst.copy_from_slice(&w.to_le_bytes());
    }
    if let Some(lit) = code.get_mut(8..) {
        lit.copy_from_slice(&target.to_le_bytes());
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
        assert_eq!(class(CALL26), LinkClass::Call);
        assert_eq!(class(JUMP26), LinkClass::Call);
        assert_eq!(class(ADR_GOT_PAGE), LinkClass::GotSlot { as_type: 275 });
        assert_eq!(class(LD64_GOT_LO12_NC), LinkClass::GotSlot { as_type: 286 });
        assert_eq!(class(ADR_PREL_PG_HI21), LinkClass::Plain);
    }

    #[test]
    fn stub() {
        let mut out = [0; MAX_CALL_STUB];
        let n = call_stub(0x4000, 0x0123_4567_89ab_cdef, &mut out).unwrap();
        assert_eq!(n, 16);
        // objdump: 58000050 ldr x16, 8; d61f0200 br x16.
        assert_eq!(&out[..8], &[0x50, 0, 0, 0x58, 0x00, 0x02, 0x1f, 0xd6]);
        assert_eq!(&out[8..16], &0x0123_4567_89ab_cdefu64.to_le_bytes());
        assert!(call_stub(0x4004, 0, &mut out).is_err());
    }
}
