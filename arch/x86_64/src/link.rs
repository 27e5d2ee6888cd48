//! Linking a user-space patch object (see `klp_arch::LinkClass`): calls through
//! `R_X86_64_PLT32` get a stub when out of `rel32` reach, GOT references a slot.

use klp_arch::{EncodeError, LinkClass, MAX_CALL_STUB};

use crate::reloc::{R_X86_64_PC32, R_X86_64_PLT32};

/// `R_X86_64_GOTPCREL`: `G + GOT + A - P`.
pub const R_X86_64_GOTPCREL: u32 = 9;
/// `R_X86_64_GOTPCRELX`: as `GOTPCREL`, on an instruction a linker may relax.
pub const R_X86_64_GOTPCRELX: u32 = 41;
/// `R_X86_64_REX_GOTPCRELX`: as `GOTPCRELX`, with a REX prefix.
pub const R_X86_64_REX_GOTPCRELX: u32 = 42;

/// The class of `r_type`.
pub fn class(r_type: u32) -> LinkClass {
    match r_type {
        R_X86_64_PLT32 => LinkClass::Call,
        // The slot's address PC-relative is what the GOT entry's address was.
        R_X86_64_GOTPCREL | R_X86_64_GOTPCRELX | R_X86_64_REX_GOTPCRELX => LinkClass::GotSlot {
            as_type: R_X86_64_PC32,
        },
        _ => LinkClass::Plain,
    }
}

/// `jmp *0(%rip)` followed by the target: 14 bytes, no register clobbered.
pub fn call_stub(
    _at: u64,
    target: u64,
    out: &mut [u8; MAX_CALL_STUB],
) -> Result<usize, EncodeError> {
    let mut code = [0u8; 14];
    let (jmp, lit) = code.split_at_mut(6);
    jmp.copy_from_slice(&[0xff, 0x25, 0, 0, 0, 0]);
    lit.copy_from_slice(&target.to_le_bytes());
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
        assert_eq!(class(R_X86_64_PLT32), LinkClass::Call);
        assert_eq!(
            class(R_X86_64_REX_GOTPCRELX),
            LinkClass::GotSlot { as_type: 2 }
        );
        assert_eq!(class(R_X86_64_PC32), LinkClass::Plain);
    }

    #[test]
    fn stub_jumps_through_its_literal() {
        let mut out = [0; MAX_CALL_STUB];
        let n = call_stub(0x1000, 0x1122_3344_5566_7788, &mut out).unwrap();
        // ff 25 00000000: jmp *(%rip + 0), the literal right after the instruction.
        assert_eq!(
            &out[..n],
            &[
                0xff, 0x25, 0, 0, 0, 0, 0x88, 0x77, 0x66, 0x55, 0x44, 0x33, 0x22, 0x11
            ]
        );
    }
}
