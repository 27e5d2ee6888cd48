//! x86_64 relocations of a livepatch object (`apply_relocate_add`).
//!
//! As in the kernel, a field must be zero before it is written (a non-zero field was
//! already relocated), and [`clear`] zeroes it again so a section can be re-applied
//! when its target module comes back. Unlike the kernel, `PC32`/`PLT32` are checked
//! for overflow instead of being silently truncated.

use klp_arch::{Endian, Reloc, RelocError, field};

/// `R_X86_64_NONE`.
pub const R_X86_64_NONE: u32 = 0;
/// `R_X86_64_64`: `S + A`, 64 bits.
pub const R_X86_64_64: u32 = 1;
/// `R_X86_64_PC32`: `S + A - P`, signed 32 bits.
pub const R_X86_64_PC32: u32 = 2;
/// `R_X86_64_PLT32`: treated as `PC32` (a module has no PLT).
pub const R_X86_64_PLT32: u32 = 4;
/// `R_X86_64_32`: `S + A`, zero-extended 32 bits.
pub const R_X86_64_32: u32 = 10;
/// `R_X86_64_32S`: `S + A`, sign-extended 32 bits.
pub const R_X86_64_32S: u32 = 11;
/// `R_X86_64_PC64`: `S + A - P`, 64 bits.
pub const R_X86_64_PC64: u32 = 24;

fn size_of(r_type: u32) -> Result<usize, RelocError> {
    match r_type {
        R_X86_64_NONE => Ok(0),
        R_X86_64_64 | R_X86_64_PC64 => Ok(8),
        R_X86_64_PC32 | R_X86_64_PLT32 | R_X86_64_32 | R_X86_64_32S => Ok(4),
        _ => Err(RelocError::UnsupportedType { r_type }),
    }
}

/// Applies `r` to `section`, loaded at `section_addr`.
pub fn apply(section: &mut [u8], section_addr: u64, r: &Reloc) -> Result<(), RelocError> {
    let size = size_of(r.r_type)?;
    if size == 0 {
        return Ok(());
    }
    // Machine arithmetic: modulo 2^64, then range-checked as the field reads it.
    let s_a = r.sym.wrapping_add(r.addend as u64);
    let p = section_addr.wrapping_add(r.offset);
    let t = r.r_type;
    let value = match t {
        R_X86_64_64 => s_a,
        R_X86_64_PC64 => s_a.wrapping_sub(p),
        R_X86_64_32 => field::unsigned(t, i128::from(s_a), 32)?,
        R_X86_64_32S => field::signed(t, i128::from(s_a as i64), 32)?,
        _ => field::signed(t, i128::from(s_a.wrapping_sub(p) as i64), 32)?,
    };
    let current = if size == 8 {
        field::read::<8>(section, r.offset, Endian::Little)?
    } else {
        field::read::<4>(section, r.offset, Endian::Little)?
    };
    if current != 0 {
        return Err(RelocError::NotZero { offset: r.offset });
    }
    if size == 8 {
        field::write::<8>(section, r.offset, value, Endian::Little)
    } else {
        field::write::<4>(section, r.offset, value, Endian::Little)
    }
}

/// Zeroes the field of `r` again (the kernel's `clear_relocate_add`).
pub fn clear(section: &mut [u8], r: &Reloc) -> Result<(), RelocError> {
    let size = size_of(r.r_type)?;
    field::get(section, r.offset, size)?.fill(0);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::X86_64;
    use klp_arch::{Arch, RelocCtx};

    const BASE: u64 = 0xffff_ffff_4000_0000;

    fn rel(r_type: u32, offset: u64, sym: u64, addend: i64) -> Reloc {
        Reloc {
            r_type,
            offset,
            sym,
            addend,
            external: false,
        }
    }

    fn apply1(r: Reloc) -> Result<[u8; 16], RelocError> {
        let mut s = [0u8; 16];
        X86_64::apply_relocation(&mut s, BASE, &r, &RelocCtx::default())?;
        Ok(s)
    }

    #[test]
    fn abs64() {
        let s = apply1(rel(R_X86_64_64, 8, 0x1122_3344_5566_7788, 0x10)).unwrap();
        assert_eq!(&s[8..], &[0x98, 0x77, 0x66, 0x55, 0x44, 0x33, 0x22, 0x11]);
    }

    #[test]
    fn pc32_and_plt32() {
        // S + A - P = (BASE + 0x100) - 4 - (BASE + 4) = 0xf8.
        for t in [R_X86_64_PC32, R_X86_64_PLT32] {
            let s = apply1(rel(t, 4, BASE + 0x100, -4)).unwrap();
            assert_eq!(&s[4..8], &[0xf8, 0, 0, 0]);
        }
        let s = apply1(rel(R_X86_64_PC32, 0, BASE - 0x10, 0)).unwrap();
        assert_eq!(&s[..4], &[0xf0, 0xff, 0xff, 0xff]);
        // Edges: P + 0x7fffffff fits, one more overflows.
        assert!(apply1(rel(R_X86_64_PC32, 0, BASE + 0x7fff_ffff, 0)).is_ok());
        assert_eq!(
            apply1(rel(R_X86_64_PLT32, 0, BASE + 0x8000_0000, 0)),
            Err(RelocError::Overflow {
                r_type: R_X86_64_PLT32,
                value: 0x8000_0000
            })
        );
        assert!(apply1(rel(R_X86_64_PC32, 0, BASE - 0x8000_0000, 0)).is_ok());
        assert!(apply1(rel(R_X86_64_PC32, 0, BASE - 0x8000_0001, 0)).is_err());
    }

    #[test]
    fn abs32_and_32s() {
        let s = apply1(rel(R_X86_64_32, 0, 0xffff_fff0, 0xf)).unwrap();
        assert_eq!(&s[..4], &[0xff; 4]);
        assert!(matches!(
            apply1(rel(R_X86_64_32, 0, 0xffff_fff0, 0x10)),
            Err(RelocError::Overflow { .. })
        ));
        assert!(
            apply1(rel(R_X86_64_32, 0, BASE, 0)).is_err(),
            "kernel address"
        );
        // 32S: kernel addresses in the top 2 GiB fit.
        let s = apply1(rel(R_X86_64_32S, 0, 0xffff_ffff_8000_0000, 0)).unwrap();
        assert_eq!(&s[..4], &[0, 0, 0, 0x80]);
        assert!(apply1(rel(R_X86_64_32S, 0, 0xffff_ffff_7fff_ffff, 0)).is_err());
        assert!(apply1(rel(R_X86_64_32S, 0, 0x7fff_ffff, 0)).is_ok());
        assert!(apply1(rel(R_X86_64_32S, 0, 0x8000_0000, 0)).is_err());
    }

    #[test]
    fn pc64() {
        let s = apply1(rel(R_X86_64_PC64, 8, 0x10, 0)).unwrap();
        // 0x10 - (BASE + 8) mod 2^64 = 0x0000_0000_c000_0008.
        assert_eq!(&s[8..], &[0x08, 0, 0, 0xc0, 0, 0, 0, 0]);
    }

    #[test]
    fn refusals() {
        assert_eq!(
            apply1(rel(9, 0, 0, 0)),
            Err(RelocError::UnsupportedType { r_type: 9 })
        );
        assert_eq!(
            apply1(rel(R_X86_64_64, 12, 0, 0)),
            Err(RelocError::OutOfSection {
                offset: 12,
                size: 16
            })
        );
        assert_eq!(apply1(rel(R_X86_64_NONE, 99, 0, 0)), Ok([0; 16]));
        let mut s = [0u8; 8];
        let r = rel(R_X86_64_PC32, 0, BASE + 0x40, 0);
        apply(&mut s, BASE, &r).unwrap();
        let before = s;
        assert_eq!(
            apply(&mut s, BASE, &r),
            Err(RelocError::NotZero { offset: 0 })
        );
        assert_eq!(s, before, "unchanged on error");
        clear(&mut s, &r).unwrap();
        assert_eq!(s, [0; 8]);
        apply(&mut s, BASE, &r).unwrap();
        assert_eq!(s, before, "re-applied after clear");
    }
}
