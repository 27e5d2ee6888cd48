//! GOT-relative references relaxed into direct ones (AAELF64 §5.7.7 and GNU ld's /
//! lld's GOT relaxation), for a converter
//! ([`Arch::relax_got`](klp_arch::Arch::relax_got)).
//!
//! * `R_AARCH64_ADR_GOT_PAGE` on `adrp xN, :got:foo` → the same `adrp` with
//!   `R_AARCH64_ADR_PREL_PG_HI21`;
//! * `R_AARCH64_LD64_GOT_LO12_NC` on `ldr xT, [xN, :got_lo12:foo]` (`f9400000 | imm12
//!   << 10 | N << 5 | T`) → `add xT, xN, :lo12:foo` (`91000000 | N << 5 | T`) with
//!   `R_AARCH64_ADD_ABS_LO12_NC`.
//!
//! Addend 0. Other GOT types (`R_AARCH64_LD64_GOTPAGE_LO15`, …) are not relaxable.

use klp_arch::relax::bytes_at;
use klp_arch::{GotRef, RelaxFound, RelaxRefused, Relaxed};

/// `R_AARCH64_ADR_PREL_PG_HI21`.
const ADR_PREL_PG_HI21: u32 = 275;
/// `R_AARCH64_ADD_ABS_LO12_NC`.
const ADD_ABS_LO12_NC: u32 = 277;
/// `R_AARCH64_ADR_GOT_PAGE`.
pub const ADR_GOT_PAGE: u32 = 311;
/// `R_AARCH64_LD64_GOT_LO12_NC`.
pub const LD64_GOT_LO12_NC: u32 = 312;

/// Whether `r_type` is relaxed here.
pub fn relaxable(r_type: u32) -> bool {
    matches!(r_type, ADR_GOT_PAGE | LD64_GOT_LO12_NC)
}

/// See the module docs.
pub fn relax(text: &mut [u8], got: &GotRef) -> Result<Option<Relaxed>, RelaxRefused> {
    if !relaxable(got.r_type) {
        return Ok(None);
    }
    let expected = if got.r_type == ADR_GOT_PAGE {
        "on `adrp xN, :got:foo` with addend 0"
    } else {
        "on `ldr xT, [xN, :got_lo12:foo]` (64-bit, unsigned offset, T not xzr) with addend 0"
    };
    let refuse = |found: RelaxFound| RelaxRefused { expected, found };
    let offset = got.offset;
    if !offset.is_multiple_of(4) {
        return Err(refuse(RelaxFound::Unaligned { offset, align: 4 }));
    }
    let Some(&[b0, b1, b2, b3]) = bytes_at(text, offset, 4) else {
        return Err(refuse(RelaxFound::PastEnd));
    };
    let insn = u32::from_le_bytes([b0, b1, b2, b3]);
    let found = |addend: Option<i64>| refuse(RelaxFound::Word { word: insn, addend });
    if got.addend != 0 {
        return Err(found(Some(got.addend)));
    }
    if got.r_type == ADR_GOT_PAGE {
        // ADRP: op = 1, bits 28..24 = 10000.
        if insn & 0x9f00_0000 != 0x9000_0000 {
            return Err(found(None));
        }
        return Ok(Some(Relaxed {
            r_type: ADR_PREL_PG_HI21,
            offset,
            rewrite: "adrp :got: → adrp",
        }));
    }
    // LDR (immediate, unsigned offset), 64-bit: size = 11, opc = 01.
    let rt = insn & 0x1f;
    if insn & 0xffc0_0000 != 0xf940_0000 || rt == 31 {
        return Err(found(None));
    }
    // ADD (immediate), 64-bit, no shift, imm12 = 0 (the relocation writes it):
    // Rn and Rd = the ldr's Rn and Rt.
    let add = 0x9100_0000 | (insn & 0x3ff);
    let dst = usize::try_from(offset)
        .ok()
        .and_then(|at| text.get_mut(at..at.checked_add(4)?));
    let Some(dst) = dst else {
        return Err(refuse(RelaxFound::PastEnd));
    };
    dst.copy_from_slice(&add.to_le_bytes());
    Ok(Some(Relaxed {
        r_type: ADD_ABS_LO12_NC,
        offset,
        rewrite: "ldr :got_lo12: → add :lo12:",
    }))
}

#[cfg(test)]
mod tests {
    extern crate std;
    use super::*;
    use std::vec::Vec;

    fn read_u32_le(b: &[u8]) -> u32 {
        u32::from_le_bytes([b[0], b[1], b[2], b[3]])
    }

    fn relax_at(
        t: &mut [u8],
        r_type: u32,
        offset: u64,
        addend: i64,
    ) -> Result<Option<Relaxed>, RelaxRefused> {
        relax(
            t,
            &GotRef {
                r_type,
                offset,
                addend,
                address: None,
            },
        )
    }

    #[test]
    fn adrp_and_ldr() {
        // adrp x1, 0; ldr x1, [x1] (gcc -fPIE).
        let mut t = [0x9000_0001u32, 0xf940_0021]
            .iter()
            .flat_map(|w| w.to_le_bytes())
            .collect::<Vec<_>>();
        let d = relax_at(&mut t, 311, 0, 0).unwrap().unwrap();
        assert_eq!((d.r_type, d.offset), (275, 0));
        let d = relax_at(&mut t, 312, 4, 0).unwrap().unwrap();
        assert_eq!((d.r_type, d.offset), (277, 4));
        // add x1, x1, #0 = 0x91000021; the adrp is unchanged.
        assert_eq!(read_u32_le(&t[0..4]), 0x9000_0001);
        assert_eq!(read_u32_le(&t[4..8]), 0x9100_0021);
        // ldr x3, [x2]: Rn 2, Rt 3 -> add x3, x2, #0.
        let mut t = 0xf940_0043u32.to_le_bytes().to_vec();
        relax_at(&mut t, 312, 0, 0).unwrap().unwrap();
        assert_eq!(read_u32_le(&t), 0x9100_0043);
        // Refused: ldr w1 (32-bit), ldr xzr, an adr in place of adrp, an addend.
        for (insn, ty, addend) in [
            (0xb940_0021u32, 312, 0),
            (0xf940_003fu32, 312, 0),
            (0x1000_0001u32, 311, 0),
            (0x9000_0001u32, 311, 8),
        ] {
            let mut t = insn.to_le_bytes().to_vec();
            assert!(relax_at(&mut t, ty, 0, addend).is_err());
            assert_eq!(read_u32_le(&t), insn);
        }
        // What was found, as values; unaligned; not relaxable (CALL26).
        let mut t = 0x9000_0001u32.to_le_bytes().to_vec();
        assert_eq!(
            relax_at(&mut t, 311, 0, 8).unwrap_err().found,
            RelaxFound::Word {
                word: 0x9000_0001,
                addend: Some(8)
            }
        );
        assert_eq!(
            relax_at(&mut t, 311, 2, 0).unwrap_err().found,
            RelaxFound::Unaligned {
                offset: 2,
                align: 4
            }
        );
        assert_eq!(relax_at(&mut t, 283, 0, 0), Ok(None));
    }
}
