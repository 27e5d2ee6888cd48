//! GOT-relative references relaxed into direct ones, as a static linker does.
//!
//! Position-independent code reaches a symbol it cannot assume local through a GOT
//! entry. A livepatch object has no GOT, and the livepatch core writes direct
//! references only; a symbol a converter resolves to the running image (a `.klp.sym`
//! of the program or kernel) is, however, exactly the case in which a static linker
//! rewrites the GOT load into a direct address computation. The rules are each
//! psABI's, so they live in the back-ends ([`Arch::relax_got`](crate::Arch::relax_got));
//! a converter asks, and reports what was done or refused.
//!
//! Nothing here allocates: a refusal carries what was found as values
//! ([`RelaxFound`]), which the converter renders for people.

use crate::InsnBytes;

/// A GOT-relative relocation to relax: one entry of a relocation section, against a
/// symbol that resolves into the running image.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GotRef {
    /// `r_type`.
    pub r_type: u32,
    /// `r_offset`: the field's place in the relocated section.
    pub offset: u64,
    /// `r_addend`.
    pub addend: i64,
    /// The symbol's address in its target, when known (s390x's `larl` reaches even
    /// addresses only).
    pub address: Option<u64>,
}

/// A relaxation done: the direct relocation to write in place of the GOT reference.
/// Its symbol and addend are the GOT reference's.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Relaxed {
    /// The direct type.
    pub r_type: u32,
    /// `r_offset` after the rewrite (x86_64's `jmp` moves it one byte back).
    pub offset: u64,
    /// The instruction rewrite, for people (`mov → lea`).
    pub rewrite: &'static str,
}

/// Why a GOT reference of a relaxable type could not be relaxed: what the rule needs,
/// and what was found. Nothing was changed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RelaxRefused {
    /// What the rule needs, for people (``on `adrp xN, :got:foo` with addend 0``).
    pub expected: &'static str,
    /// What was found instead.
    pub found: RelaxFound,
}

/// What a relaxation rule found instead of what it needs (see [`RelaxRefused`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum RelaxFound {
    /// The field at `offset` leaves no room for the instruction's opcode before it.
    NoRoom {
        /// The field's offset.
        offset: u64,
    },
    /// The instruction runs past the end of the section.
    PastEnd,
    /// The field at `offset` is not an `align`-byte aligned instruction.
    Unaligned {
        /// The field's offset.
        offset: u64,
        /// The alignment instructions have.
        align: u8,
    },
    /// The instruction's bytes (memory order), and the addend when that is what is
    /// wrong with an instruction that fits.
    Bytes {
        /// The instruction.
        bytes: InsnBytes,
        /// The addend, when it is the problem.
        addend: Option<i64>,
    },
    /// The instruction as a 32-bit word, and the addend when that is what is wrong.
    Word {
        /// The instruction.
        word: u32,
        /// The addend, when it is the problem.
        addend: Option<i64>,
    },
    /// The instruction at `offset` that a partnered entry of the reference relocates
    /// (see [`Arch::is_partnered`](crate::Arch::is_partnered)) is `word`.
    PartnerWord {
        /// The partnered entry's offset.
        offset: u64,
        /// The instruction there.
        word: u32,
    },
    /// A partnered entry's place is not a whole instruction of the section.
    PartnerPastEnd {
        /// The partnered entry's offset.
        offset: u64,
    },
    /// The reference has no partnered entry, which the rule needs to rewrite the
    /// instruction that uses the GOT entry.
    NoPartner,
    /// The symbol is at an odd address in its target.
    OddAddress {
        /// The address.
        address: u64,
    },
}

impl core::fmt::Display for RelaxFound {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        let addend = |f: &mut core::fmt::Formatter<'_>, a: &Option<i64>| match a {
            Some(a) => write!(f, ", with addend {a}"),
            None => Ok(()),
        };
        match self {
            RelaxFound::NoRoom { offset } => write!(
                f,
                "the field at {offset:#x} leaves no room for the instruction's opcode before it"
            ),
            RelaxFound::PastEnd => f.write_str("the instruction runs past the end of the section"),
            RelaxFound::Unaligned { offset, align } => write!(
                f,
                "the field at {offset:#x} is not a {align}-byte aligned instruction"
            ),
            RelaxFound::Bytes { bytes, addend: a } => {
                write!(f, "the instruction there is `{bytes}`")?;
                addend(f, a)
            }
            RelaxFound::Word { word, addend: a } => {
                write!(f, "the instruction there is {word:#010x}")?;
                addend(f, a)
            }
            RelaxFound::PartnerWord { offset, word } => write!(
                f,
                "the instruction at {offset:#x} that uses the GOT entry is {word:#010x}"
            ),
            RelaxFound::PartnerPastEnd { offset } => write!(
                f,
                "the instruction at {offset:#x} that uses the GOT entry runs past the end of \
                 the section"
            ),
            RelaxFound::NoPartner => {
                f.write_str("no entry of its relocation section pairs with it to use the GOT entry")
            }
            RelaxFound::OddAddress { address } => write!(
                f,
                "the symbol is at the odd address {address:#x} in its target"
            ),
        }
    }
}

/// The `len` bytes of `text` from `from`, if they are all there.
pub fn bytes_at(text: &[u8], from: u64, len: u64) -> Option<&[u8]> {
    let start = usize::try_from(from).ok()?;
    let end = start.checked_add(usize::try_from(len).ok()?)?;
    text.get(start..end)
}

#[cfg(test)]
mod tests {
    extern crate std;
    use super::*;
    use std::string::ToString;

    #[test]
    fn rendering() {
        let b = InsnBytes::prefix_of(&[0x48, 0x03, 0x05, 0, 0, 0, 0]);
        assert_eq!(
            RelaxFound::Bytes {
                bytes: b,
                addend: None
            }
            .to_string(),
            "the instruction there is `48 03 05 00 00 00 00`"
        );
        assert_eq!(
            RelaxFound::Word {
                word: 0x9000_0001,
                addend: Some(8)
            }
            .to_string(),
            "the instruction there is 0x90000001, with addend 8"
        );
        assert_eq!(
            RelaxFound::OddAddress { address: 0x1001 }.to_string(),
            "the symbol is at the odd address 0x1001 in its target"
        );
        assert_eq!(bytes_at(&[1, 2, 3], 1, 2), Some(&[2u8, 3][..]));
        assert_eq!(bytes_at(&[1, 2, 3], 2, 2), None);
        assert_eq!(bytes_at(&[1, 2, 3], u64::MAX, 2), None);
    }
}
