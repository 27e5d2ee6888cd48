//! Relocations of livepatch objects: the shared types of `apply_relocate_add`.

use core::fmt;

/// One relocation to write, already resolved (the core resolved the symbol).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Reloc {
    /// `ELF64_R_TYPE(r_info)`, in the arch's numbering.
    pub r_type: u32,
    /// `r_offset`: where in the section the field starts.
    pub offset: u64,
    /// `S`: the resolved symbol value (for a branch into another object: the address
    /// of the call stub the host made for it, see the arch's `reloc.rs`).
    pub sym: u64,
    /// `A`: `r_addend`.
    pub addend: i64,
    /// The symbol lives in another object (another module, another TOC). ppc64le uses
    /// it to turn the nop after a `bl` into the TOC restore, as the kernel does.
    pub external: bool,
}

/// Per-object values some relocation types need.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RelocCtx {
    /// ppc64le: the TOC pointer (`.TOC.` = r2) of the object being relocated.
    pub toc: Option<u64>,
}

/// Why a relocation could not be written. The section is left unchanged on error.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum RelocError {
    /// The back-end does not implement this relocation type.
    UnsupportedType { r_type: u32 },
    /// The value does not fit the field (it is never truncated).
    Overflow { r_type: u32, value: i128 },
    /// The value's low bits would be dropped by the field.
    Misaligned { r_type: u32, value: i128 },
    /// The field does not lie inside the section.
    OutOfSection { offset: u64, size: usize },
    /// x86_64: the field is not zero, so it was already written (the kernel refuses).
    NotZero { offset: u64 },
    /// The instruction at the field is not the one this relocation type patches.
    UnexpectedInsn { offset: u64, found: u32 },
    /// A TOC-relative relocation without a TOC in the context.
    NoToc,
    /// The build has no back-end for this architecture.
    Unsupported,
}

impl RelocError {
    /// The errno the kernel's `apply_relocate_add` returns for this error.
    pub const fn errno(&self) -> i32 {
        match self {
            RelocError::Overflow { .. } | RelocError::Misaligned { .. } => crate::errno::ENOEXEC,
            RelocError::UnsupportedType { .. } => crate::errno::ENOEXEC,
            RelocError::UnexpectedInsn { .. } => crate::errno::ENOEXEC,
            RelocError::NotZero { .. } => crate::errno::ENOEXEC,
            RelocError::OutOfSection { .. } | RelocError::NoToc => crate::errno::ENOEXEC,
            RelocError::Unsupported => crate::errno::ENOSYS,
        }
    }
}

impl fmt::Display for RelocError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RelocError::UnsupportedType { r_type } => {
                write!(f, "unsupported relocation type {r_type}")
            }
            RelocError::Overflow { r_type, value } => {
                write!(f, "relocation type {r_type} overflow: value {value:#x}")
            }
            RelocError::Misaligned { r_type, value } => {
                write!(f, "relocation type {r_type}: value {value:#x} misaligned")
            }
            RelocError::OutOfSection { offset, size } => {
                write!(
                    f,
                    "relocation at {offset:#x} outside section of {size} bytes"
                )
            }
            RelocError::NotZero { offset } => {
                write!(f, "relocation target at {offset:#x} is not zero")
            }
            RelocError::UnexpectedInsn { offset, found } => {
                write!(f, "unexpected instruction {found:08x} at {offset:#x}")
            }
            RelocError::NoToc => f.write_str("TOC-relative relocation without a TOC"),
            RelocError::Unsupported => f.write_str("no architecture back-end in this build"),
        }
    }
}

/// Helpers for writing relocation fields safely.
pub mod field {
    use super::RelocError;
    use crate::Endian;

    /// The `n`-byte field at `offset` of `section`.
    pub fn get(section: &mut [u8], offset: u64, n: usize) -> Result<&mut [u8], RelocError> {
        let size = section.len();
        let err = RelocError::OutOfSection { offset, size };
        let start = usize::try_from(offset).map_err(|_| err)?;
        let end = start.checked_add(n).ok_or(err)?;
        section.get_mut(start..end).ok_or(err)
    }

    /// Reads the `N`-byte field at `offset` as an unsigned value.
    pub fn read<const N: usize>(
        section: &mut [u8],
        offset: u64,
        endian: Endian,
    ) -> Result<u64, RelocError> {
        let f = get(section, offset, N)?;
        let acc = |v: u64, b: &u8| (v << 8) | u64::from(*b);
        Ok(match endian {
            Endian::Little => f.iter().rev().fold(0, acc),
            Endian::Big => f.iter().fold(0, acc),
        })
    }

    /// Writes the low `N` bytes of `v` to the field at `offset`.
    pub fn write<const N: usize>(
        section: &mut [u8],
        offset: u64,
        v: u64,
        endian: Endian,
    ) -> Result<(), RelocError> {
        let f = get(section, offset, N)?;
        // The value's bytes, least significant first, zero-extended past its 8 bytes.
        let bytes = v.to_le_bytes().into_iter().chain(core::iter::repeat(0));
        match endian {
            Endian::Little => f.iter_mut().zip(bytes).for_each(|(d, b)| *d = b),
            Endian::Big => f.iter_mut().rev().zip(bytes).for_each(|(d, b)| *d = b),
        }
        Ok(())
    }

    /// `value` as a signed field of `bits` bits, or an overflow error.
    pub fn signed(r_type: u32, value: i128, bits: u32) -> Result<u64, RelocError> {
        let err = RelocError::Overflow { r_type, value };
        // It fits when every bit from the field's sign bit up is a copy of the sign.
        match bits.checked_sub(1).and_then(|sign| value.checked_shr(sign)) {
            Some(0 | -1) => i64::try_from(value).map(|v| v as u64).map_err(|_| err),
            _ => Err(err),
        }
    }

    /// `value` as an unsigned field of `bits` bits, or an overflow error.
    pub fn unsigned(r_type: u32, value: i128, bits: u32) -> Result<u64, RelocError> {
        let err = RelocError::Overflow { r_type, value };
        // It fits when it is not negative and nothing is left above the field.
        match value.checked_shr(bits) {
            Some(0) => u64::try_from(value).map_err(|_| err),
            _ => Err(err),
        }
    }

    /// Fails unless the low `bits` bits of `value` are zero.
    pub fn aligned(r_type: u32, value: i128, bits: u32) -> Result<(), RelocError> {
        // (Zero has all its bits zero, however many `trailing_zeros` counts.)
        if value != 0 && value.trailing_zeros() < bits {
            return Err(RelocError::Misaligned { r_type, value });
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::RelocError;
    use super::field;
    use crate::Endian;

    #[test]
    fn field_bounds_and_order() {
        let mut s = [0u8; 8];
        field::write::<4>(&mut s, 4, 0x1122_3344, Endian::Big).unwrap();
        assert_eq!(s, [0, 0, 0, 0, 0x11, 0x22, 0x33, 0x44]);
        field::write::<2>(&mut s, 0, 0xaabb, Endian::Little).unwrap();
        assert_eq!(&s[..2], &[0xbb, 0xaa]);
        assert_eq!(field::read::<4>(&mut s, 4, Endian::Big), Ok(0x1122_3344));
        assert_eq!(
            field::write::<4>(&mut s, 5, 0, Endian::Big),
            Err(RelocError::OutOfSection { offset: 5, size: 8 })
        );
        assert!(field::get(&mut s, u64::MAX, 1).is_err());
    }

    #[test]
    fn ranges() {
        assert_eq!(field::signed(1, -(1 << 31), 32), Ok((-(1i64 << 31)) as u64));
        assert!(field::signed(1, 1 << 31, 32).is_err());
        assert!(field::unsigned(1, -1, 32).is_err());
        assert!(field::unsigned(1, (1 << 32) - 1, 32).is_ok());
        assert!(field::aligned(1, 6, 2).is_err());
        assert!(field::aligned(1, 8, 2).is_ok());
    }

    #[test]
    fn widths_at_and_past_the_edges() {
        let over = |value| Err(RelocError::Overflow { r_type: 1, value });
        // No signed value fits a field of no bits; a width past i128's is refused
        // (instead of overflowing a shift).
        assert_eq!(field::signed(1, 0, 0), over(0));
        assert_eq!(field::signed(1, 1, 200), over(1));
        assert_eq!(field::unsigned(1, 0, 0), Ok(0));
        assert_eq!(field::unsigned(1, 1, 0), over(1));
        assert_eq!(field::unsigned(1, 1, 200), over(1));
        // 64-bit fields: the whole range of i64 / u64, nothing more.
        assert_eq!(field::signed(1, i128::from(i64::MIN), 64), Ok(1 << 63));
        assert_eq!(field::signed(1, -1, 64), Ok(u64::MAX));
        assert_eq!(field::signed(1, 1 << 63, 64), over(1 << 63));
        assert_eq!(field::unsigned(1, u64::MAX.into(), 64), Ok(u64::MAX));
        assert_eq!(field::unsigned(1, 1 << 64, 64), over(1 << 64));
        // Wider than the u64 they return: never truncated.
        assert_eq!(field::signed(1, 1 << 64, 100), over(1 << 64));
        assert_eq!(field::unsigned(1, 1 << 64, 100), over(1 << 64));
        assert!(field::aligned(1, 0, 200).is_ok());
        assert!(field::aligned(1, 1 << 100, 100).is_ok());
        assert!(field::aligned(1, 1 << 100, 101).is_err());
    }

    #[test]
    fn fields_wider_than_a_u64() {
        let mut s = [0xaau8; 10];
        field::write::<10>(&mut s, 0, 0x1122_3344_5566_7788, Endian::Big).unwrap();
        assert_eq!(s, [0, 0, 0x11, 0x22, 0x33, 0x44, 0x55, 0x66, 0x77, 0x88]);
        assert_eq!(
            field::read::<10>(&mut s, 0, Endian::Big),
            Ok(0x1122_3344_5566_7788)
        );
        field::write::<10>(&mut s, 0, 0x1122_3344_5566_7788, Endian::Little).unwrap();
        assert_eq!(s, [0x88, 0x77, 0x66, 0x55, 0x44, 0x33, 0x22, 0x11, 0, 0]);
        assert_eq!(
            field::read::<10>(&mut s, 0, Endian::Little),
            Ok(0x1122_3344_5566_7788)
        );
    }
}
