//! s390x relocations of a livepatch object (`apply_relocate_add`), big-endian.
//!
//! `*DBL` types count halfwords: the value must be even and is stored shifted right by
//! one, as the kernel's `apply_rela_bits` does. `PLT*` types are handled like their
//! `PC*` twins: for a symbol in another object the host passes the address of the call
//! stub it made as `S`.

use klp_arch::{Endian, Reloc, RelocError, field};

/// `R_390_16`: `S + A`, unsigned 16 bits.
pub const R_390_16: u32 = 3;
/// `R_390_32`: `S + A`, unsigned 32 bits.
pub const R_390_32: u32 = 4;
/// `R_390_PC32`: `S + A - P`, signed 32 bits.
pub const R_390_PC32: u32 = 5;
/// `R_390_PLT32`.
pub const R_390_PLT32: u32 = 8;
/// `R_390_PC16`.
pub const R_390_PC16: u32 = 16;
/// `R_390_PC16DBL`: halfwords, signed 16 bits (`brc`, `brasl`'s 16-bit cousins).
pub const R_390_PC16DBL: u32 = 17;
/// `R_390_PLT16DBL`.
pub const R_390_PLT16DBL: u32 = 18;
/// `R_390_PC32DBL`: halfwords, signed 32 bits (`larl`, `brasl`, `jg`).
pub const R_390_PC32DBL: u32 = 19;
/// `R_390_PLT32DBL`.
pub const R_390_PLT32DBL: u32 = 20;
/// `R_390_64`: `S + A`.
pub const R_390_64: u32 = 22;
/// `R_390_PC64`: `S + A - P`.
pub const R_390_PC64: u32 = 23;
/// `R_390_PLT64`.
pub const R_390_PLT64: u32 = 25;

const BE: Endian = Endian::Big;

/// Applies `r` to `section`, loaded at `section_addr`.
pub fn apply(section: &mut [u8], section_addr: u64, r: &Reloc) -> Result<(), RelocError> {
    let s_a = r.sym.wrapping_add(r.addend as u64);
    let p = section_addr.wrapping_add(r.offset);
    let pc = i128::from(s_a.wrapping_sub(p) as i64);
    let t = r.r_type;
    let off = r.offset;
    match t {
        R_390_64 => field::write::<8>(section, off, s_a, BE),
        R_390_PC64 | R_390_PLT64 => field::write::<8>(section, off, pc as u64, BE),
        R_390_32 => field::write::<4>(section, off, field::unsigned(t, i128::from(s_a), 32)?, BE),
        R_390_16 => field::write::<2>(section, off, field::unsigned(t, i128::from(s_a), 16)?, BE),
        R_390_PC32 | R_390_PLT32 => field::write::<4>(section, off, field::signed(t, pc, 32)?, BE),
        R_390_PC16 => field::write::<2>(section, off, field::signed(t, pc, 16)?, BE),
        R_390_PC32DBL | R_390_PLT32DBL => {
            field::aligned(t, pc, 1)?;
            field::write::<4>(section, off, field::signed(t, pc >> 1, 32)?, BE)
        }
        R_390_PC16DBL | R_390_PLT16DBL => {
            field::aligned(t, pc, 1)?;
            field::write::<2>(section, off, field::signed(t, pc >> 1, 16)?, BE)
        }
        _ => Err(RelocError::UnsupportedType { r_type: t }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::S390x;
    use klp_arch::{Arch, RelocCtx};

    const BASE: u64 = 0x3ff_8000_0000;
    const P: u64 = BASE + 2;

    fn rel(r_type: u32, sym: u64, addend: i64) -> Reloc {
        Reloc {
            r_type,
            offset: 2,
            sym,
            addend,
            external: false,
        }
    }

    fn on(r: Reloc) -> Result<[u8; 10], RelocError> {
        let mut s = [0u8; 10];
        // brasl %r14,0 with its I2 field at offset 2.
        s[0] = 0xc0;
        s[1] = 0xe5;
        S390x::apply_relocation(&mut s, BASE, &r, &RelocCtx::default())?;
        Ok(s)
    }

    #[test]
    fn pc32dbl_and_plt32dbl() {
        // brasl to P - 2 + 0x1000 (the instruction starts at P - 2): the addend -2 is
        // what the assembler emits; offset from P-2 = 0x1000 -> 0x800 halfwords.
        for t in [R_390_PC32DBL, R_390_PLT32DBL] {
            let s = on(rel(t, P - 2 + 0x1000, 2)).unwrap();
            assert_eq!(&s[..6], &[0xc0, 0xe5, 0, 0, 0x08, 0x00]);
        }
        let s = on(rel(R_390_PC32DBL, P - 0x100, 0)).unwrap();
        assert_eq!(&s[2..6], &[0xff, 0xff, 0xff, 0x80]);
        assert!(on(rel(R_390_PC32DBL, P + (1 << 32) - 2, 0)).is_ok());
        assert_eq!(
            on(rel(R_390_PC32DBL, P + (1 << 32), 0)),
            Err(RelocError::Overflow {
                r_type: R_390_PC32DBL,
                value: 1 << 31
            })
        );
        assert!(on(rel(R_390_PC32DBL, P - (1 << 32), 0)).is_ok());
        assert!(on(rel(R_390_PC32DBL, P - (1 << 32) - 2, 0)).is_err());
        assert_eq!(
            on(rel(R_390_PLT32DBL, P + 3, 0)),
            Err(RelocError::Misaligned {
                r_type: R_390_PLT32DBL,
                value: 3
            })
        );
    }

    #[test]
    fn pc16dbl() {
        let s = on(rel(R_390_PC16DBL, P + 0xfffe, 0)).unwrap();
        assert_eq!(&s[2..4], &[0x7f, 0xff]);
        assert!(on(rel(R_390_PC16DBL, P + 0x10000, 0)).is_err());
        assert!(on(rel(R_390_PLT16DBL, P - 0x10000, 0)).is_ok());
    }

    #[test]
    fn data() {
        let s = on(rel(R_390_64, 0x1122_3344_5566_7788, 0)).unwrap();
        assert_eq!(&s[2..], &[0x11, 0x22, 0x33, 0x44, 0x55, 0x66, 0x77, 0x88]);
        let s = on(rel(R_390_PC64, P - 1, 0)).unwrap();
        assert_eq!(&s[2..], &[0xff; 8]);
        let s = on(rel(R_390_PLT64, P + 0x10, 0)).unwrap();
        assert_eq!(&s[2..], &[0, 0, 0, 0, 0, 0, 0, 0x10]);
        let s = on(rel(R_390_32, 0xdead_beef, 0)).unwrap();
        assert_eq!(&s[2..6], &[0xde, 0xad, 0xbe, 0xef]);
        assert!(on(rel(R_390_32, 0x1_0000_0000, 0)).is_err());
        let s = on(rel(R_390_16, 0xbeef, 0)).unwrap();
        assert_eq!(&s[2..4], &[0xbe, 0xef]);
        assert!(on(rel(R_390_16, 0x1_0000, 0)).is_err());
        let s = on(rel(R_390_PC32, P - 5, 0)).unwrap();
        assert_eq!(&s[2..6], &[0xff, 0xff, 0xff, 0xfb]);
        assert!(on(rel(R_390_PLT32, P + (1 << 31), 0)).is_err());
        let s = on(rel(R_390_PC16, P + 0x7fff, 0)).unwrap();
        assert_eq!(&s[2..4], &[0x7f, 0xff]);
        assert!(on(rel(R_390_PC16, P + 0x8000, 0)).is_err());
    }

    #[test]
    fn refusals() {
        assert_eq!(
            on(rel(57, 0, 0)),
            Err(RelocError::UnsupportedType { r_type: 57 })
        );
        let mut s = [0u8; 4];
        assert_eq!(
            apply(&mut s, BASE, &rel(R_390_64, 0, 0)),
            Err(RelocError::OutOfSection { offset: 2, size: 4 })
        );
    }
}
