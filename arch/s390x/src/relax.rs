//! GOT-relative references relaxed into direct ones (GNU ld's
//! `elf_s390_relocate_section`), for a converter
//! ([`Arch::relax_got`](klp_arch::Arch::relax_got)).
//!
//! `R_390_GOTENT` on `lgrl %rN, foo@GOTENT` (`c4 N8`) → `larl %rN, foo` (`c0 N0`) with
//! `R_390_PC32DBL`, addend 2; refused when the symbol's address is odd (`larl` reaches
//! even addresses only). Other GOT types (`R_390_GOT12`, …) are not relaxable.

use klp_arch::relax::bytes_at;
use klp_arch::{GotRef, InsnBytes, RelaxFound, RelaxRefused, Relaxed};

/// `R_390_PC32DBL`.
const PC32DBL: u32 = 19;
/// `R_390_GOTENT`.
pub const GOTENT: u32 = 26;

/// Whether `r_type` is relaxed here.
pub fn relaxable(r_type: u32) -> bool {
    r_type == GOTENT
}

/// See the module docs.
pub fn relax(text: &mut [u8], got: &GotRef) -> Result<Option<Relaxed>, RelaxRefused> {
    if !relaxable(got.r_type) {
        return Ok(None);
    }
    let refuse = |found: RelaxFound| RelaxRefused {
        expected: "on `lgrl %rN, foo@GOTENT` with addend 2 and an even address of foo",
        found,
    };
    let offset = got.offset;
    let Some(start) = offset.checked_sub(2) else {
        return Err(refuse(RelaxFound::NoRoom { offset }));
    };
    let Some(insn) = bytes_at(text, start, 6) else {
        return Err(refuse(RelaxFound::PastEnd));
    };
    let found = |addend: Option<i64>| {
        refuse(RelaxFound::Bytes {
            bytes: InsnBytes::prefix_of(insn),
            addend,
        })
    };
    // LGRL: RIL-b, opcode c4 / 8.
    let &[op, reg_op, ..] = insn else {
        return Err(refuse(RelaxFound::PastEnd));
    };
    if op != 0xc4 || reg_op & 0x0f != 0x08 {
        return Err(found(None));
    }
    if got.addend != 2 {
        return Err(found(Some(got.addend)));
    }
    if let Some(address) = got.address.filter(|a| a & 1 == 1) {
        return Err(refuse(RelaxFound::OddAddress { address }));
    }
    // LARL: RIL-b, opcode c0 / 0, same register.
    let dst = usize::try_from(start)
        .ok()
        .and_then(|at| text.get_mut(at..at.checked_add(2)?));
    let Some(dst) = dst else {
        return Err(refuse(RelaxFound::PastEnd));
    };
    dst.copy_from_slice(&[0xc0, reg_op & 0xf0]);
    Ok(Some(Relaxed {
        r_type: PC32DBL,
        offset,
        rewrite: "lgrl → larl",
    }))
}

#[cfg(test)]
mod tests {
    extern crate std;
    use super::*;
    use std::vec;

    fn relax_at(
        t: &mut [u8],
        offset: u64,
        addend: i64,
        address: Option<u64>,
    ) -> Result<Option<Relaxed>, RelaxRefused> {
        relax(
            t,
            &GotRef {
                r_type: GOTENT,
                offset,
                addend,
                address,
            },
        )
    }

    #[test]
    fn lgrl_to_larl() {
        // lgrl %r2, 0 (c4 28 …): field at 2.
        let mut t = vec![0xc4, 0x28, 0, 0, 0, 0, 0x07, 0xfe];
        let d = relax_at(&mut t, 2, 2, Some(0x1000)).unwrap().unwrap();
        assert_eq!((d.r_type, d.offset), (19, 2));
        assert_eq!(t[..2], [0xc0, 0x20]);
        // An odd address, a wrong addend, and lg in place of lgrl are refused.
        for (bytes, addend, address) in [
            (vec![0xc4, 0x28, 0, 0, 0, 0], 2, Some(0x1001)),
            (vec![0xc4, 0x28, 0, 0, 0, 0], 0, None),
            (vec![0xe3, 0x10, 0, 0, 0, 0x04], 2, None),
        ] {
            let mut t = bytes.clone();
            assert!(relax_at(&mut t, 2, addend, address).is_err());
            assert_eq!(t, bytes);
        }
        let mut t = vec![0xc4, 0x28, 0, 0, 0, 0];
        assert_eq!(
            relax_at(&mut t, 2, 2, Some(0x1001)).unwrap_err().found,
            RelaxFound::OddAddress { address: 0x1001 }
        );
        // Not relaxable: PC32DBL.
        let got = GotRef {
            r_type: 19,
            offset: 2,
            addend: 2,
            address: None,
        };
        assert_eq!(relax(&mut t, &got), Ok(None));
    }
}
