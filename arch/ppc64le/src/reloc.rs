//! ppc64le relocations of a livepatch object (`apply_relocate_add`).
//!
//! 16-bit fields (`@l`, `@h`, `@ha`, `@toc…`) are the halfword at `r_offset`, which on
//! little-endian is the low half of the instruction word. `DS`-form fields keep the
//! two low bits of the instruction.
//!
//! `REL24` to a symbol in another object (`Reloc::external`): the caller's `bl` goes to
//! a call stub the host made for that target (its address is the relocation's `S`),
//! the stub saves r2 at 24(r1) before switching TOC, and the `nop` after the `bl`
//! becomes `ld r2,24(r1)` to restore it — exactly the kernel's rule, including its
//! error when that instruction is not a `nop`. [`clear`] puts the `nop` back.

use klp_arch::{Endian, Reloc, RelocCtx, RelocError, field};

use crate::insn;

/// `R_PPC64_ADDR32`.
pub const ADDR32: u32 = 1;
/// `R_PPC64_ADDR16_LO`.
pub const ADDR16_LO: u32 = 4;
/// `R_PPC64_ADDR16_HI`.
pub const ADDR16_HI: u32 = 5;
/// `R_PPC64_ADDR16_HA`.
pub const ADDR16_HA: u32 = 6;
/// `R_PPC64_REL24`: `bl`/`b`, signed 26 bits, 4-aligned.
pub const REL24: u32 = 10;
/// `R_PPC64_REL32`.
pub const REL32: u32 = 26;
/// `R_PPC64_ADDR64`.
pub const ADDR64: u32 = 38;
/// `R_PPC64_REL64`.
pub const REL64: u32 = 44;
/// `R_PPC64_TOC16`: `S + A - .TOC.`, signed 16 bits.
pub const TOC16: u32 = 47;
/// `R_PPC64_TOC16_LO`.
pub const TOC16_LO: u32 = 48;
/// `R_PPC64_TOC16_HI`.
pub const TOC16_HI: u32 = 49;
/// `R_PPC64_TOC16_HA`.
pub const TOC16_HA: u32 = 50;
/// `R_PPC64_TOC16_DS`.
pub const TOC16_DS: u32 = 63;
/// `R_PPC64_TOC16_LO_DS`.
pub const TOC16_LO_DS: u32 = 64;
/// `R_PPC64_REL16_LO` (the global entry's `addi r2,r2,(.TOC.-func)@l`).
pub const REL16_LO: u32 = 250;
/// `R_PPC64_REL16_HI`.
pub const REL16_HI: u32 = 251;
/// `R_PPC64_REL16_HA` (the global entry's `addis r2,r12,(.TOC.-func)@ha`).
pub const REL16_HA: u32 = 252;

const LE: Endian = Endian::Little;

fn half(section: &mut [u8], off: u64, v: u16) -> Result<(), RelocError> {
    field::write::<2>(section, off, u64::from(v), LE)
}

/// `@ha`/`@hi` values must be reachable by a 32-bit `addis`+`addi` pair.
fn check_hi(t: u32, v: u64) -> Result<u64, RelocError> {
    field::signed(t, i128::from(v as i64), 32)
}

fn ds(t: u32, section: &mut [u8], off: u64, v: u64) -> Result<(), RelocError> {
    field::aligned(t, i128::from(v as i64), 2)?;
    let old = field::read::<2>(section, off, LE)?;
    half(section, off, ((old & 3) | (v & 0xfffc)) as u16)
}

/// Offset of the word after the `bl` at `offset` (where an external call's TOC restore
/// goes): an offset past the end of the address space is outside the section, never
/// wrapped around to its start.
fn next_word(section: &[u8], offset: u64) -> Result<u64, RelocError> {
    offset.checked_add(4).ok_or(RelocError::OutOfSection {
        offset,
        size: section.len(),
    })
}

/// Applies `r` to `section`, loaded at `section_addr`.
pub fn apply(
    section: &mut [u8],
    section_addr: u64,
    r: &Reloc,
    ctx: &RelocCtx,
) -> Result<(), RelocError> {
    let s_a = r.sym.wrapping_add(r.addend as u64);
    let p = section_addr.wrapping_add(r.offset);
    let t = r.r_type;
    let off = r.offset;
    let toc = || {
        ctx.toc
            .ok_or(RelocError::NoToc)
            .map(|toc| s_a.wrapping_sub(toc))
    };
    match t {
        ADDR64 => field::write::<8>(section, off, s_a, LE),
        REL64 => field::write::<8>(section, off, s_a.wrapping_sub(p), LE),
        ADDR32 => {
            let v = i128::from(s_a as i64);
            if !(-(1i128 << 31)..(1i128 << 32)).contains(&v) {
                return Err(RelocError::Overflow {
                    r_type: t,
                    value: v,
                });
            }
            field::write::<4>(section, off, v as u64, LE)
        }
        REL32 => {
            let v = field::signed(t, i128::from(s_a.wrapping_sub(p) as i64), 32)?;
            field::write::<4>(section, off, v, LE)
        }
        ADDR16_LO => half(section, off, insn::lo(s_a)),
        ADDR16_HI => half(section, off, insn::hi(check_hi(t, s_a)?)),
        ADDR16_HA => half(section, off, insn::ha(check_hi(t, s_a)?)),
        REL16_LO => half(section, off, insn::lo(s_a.wrapping_sub(p))),
        REL16_HI => half(section, off, insn::hi(check_hi(t, s_a.wrapping_sub(p))?)),
        REL16_HA => half(section, off, insn::ha(check_hi(t, s_a.wrapping_sub(p))?)),
        TOC16 => {
            let v = field::signed(t, i128::from(toc()? as i64), 16)?;
            half(section, off, v as u16)
        }
        TOC16_LO => half(section, off, insn::lo(toc()?)),
        TOC16_HI => half(section, off, insn::hi(check_hi(t, toc()?)?)),
        TOC16_HA => half(section, off, insn::ha(check_hi(t, toc()?)?)),
        TOC16_DS => {
            let v = field::signed(t, i128::from(toc()? as i64), 16)?;
            ds(t, section, off, v)
        }
        TOC16_LO_DS => ds(t, section, off, toc()?),
        REL24 => {
            let d = i128::from(s_a.wrapping_sub(p) as i64);
            let v = field::signed(t, d, 26)?;
            field::aligned(t, d, 2)?;
            let next = next_word(section, off)?;
            if r.external {
                let found = field::read::<4>(section, next, LE)? as u32;
                if found != insn::NOP {
                    return Err(RelocError::UnexpectedInsn {
                        offset: next,
                        found,
                    });
                }
            }
            let old = field::read::<4>(section, off, LE)? as u32;
            let new = (old & !insn::LI_MASK) | (v as u32 & insn::LI_MASK);
            field::write::<4>(section, off, u64::from(new), LE)?;
            if r.external {
                field::write::<4>(section, next, u64::from(insn::LD_R2_24_R1), LE)?;
            }
            Ok(())
        }
        _ => Err(RelocError::UnsupportedType { r_type: t }),
    }
}

/// Undoes what [`apply`] changed outside the relocated field itself: the TOC restore
/// after an external `bl` becomes a `nop` again (the kernel's `clear_relocate_add`).
pub fn clear(section: &mut [u8], r: &Reloc) -> Result<(), RelocError> {
    if r.r_type == REL24 && r.external {
        let next = next_word(section, r.offset)?;
        if field::read::<4>(section, next, LE)? as u32 == insn::LD_R2_24_R1 {
            field::write::<4>(section, next, u64::from(insn::NOP), LE)?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Ppc64le;
    use klp_arch::Arch;

    const BASE: u64 = 0xc008_0000_0001_0000;
    const P: u64 = BASE + 8;
    const TOC: u64 = 0xc008_0000_0002_8000;

    fn rel(r_type: u32, sym: u64, addend: i64, external: bool) -> Reloc {
        Reloc {
            r_type,
            offset: 8,
            sym,
            addend,
            external,
        }
    }

    /// Section of 16 bytes with `w0` at 8 and `w1` at 12; returns both words after.
    fn on(w0: u32, w1: u32, r: Reloc) -> Result<(u32, u32), RelocError> {
        let mut s = [0u8; 16];
        s[8..12].copy_from_slice(&w0.to_le_bytes());
        s[12..16].copy_from_slice(&w1.to_le_bytes());
        Ppc64le::apply_relocation(&mut s, BASE, &r, &RelocCtx { toc: Some(TOC) })?;
        let w = |i: usize| u32::from_le_bytes(s[i..i + 4].try_into().unwrap());
        Ok((w(8), w(12)))
    }

    #[test]
    fn rel24_local_and_external() {
        // bl P+0x100 -> 0x48000101.
        assert_eq!(
            on(0x4800_0001, 0, rel(REL24, P + 0x100, 0, false)),
            Ok((0x4800_0101, 0))
        );
        // External: nop after the bl becomes ld r2,24(r1).
        assert_eq!(
            on(0x4800_0001, insn::NOP, rel(REL24, P - 0x20, 0, true)),
            Ok((0x4bff_ffe1, 0xe841_0018))
        );
        assert_eq!(
            on(0x4800_0001, 0x7c08_02a6, rel(REL24, P + 8, 0, true)),
            Err(RelocError::UnexpectedInsn {
                offset: 12,
                found: 0x7c08_02a6
            })
        );
        assert!(on(0x4800_0001, 0, rel(REL24, P + (1 << 25) - 4, 0, false)).is_ok());
        assert_eq!(
            on(0x4800_0001, 0, rel(REL24, P + (1 << 25), 0, false)),
            Err(RelocError::Overflow {
                r_type: REL24,
                value: 1 << 25
            })
        );
        assert!(on(0x4800_0001, 0, rel(REL24, P - (1 << 25), 0, false)).is_ok());
        assert!(on(0x4800_0001, 0, rel(REL24, P - (1 << 25) - 4, 0, false)).is_err());
        assert!(matches!(
            on(0x4800_0001, 0, rel(REL24, P + 6, 0, false)),
            Err(RelocError::Misaligned { .. })
        ));
    }

    #[test]
    fn external_call_clear_and_reapply() {
        let mut s = [0u8; 16];
        s[8..12].copy_from_slice(&0x4800_0001u32.to_le_bytes());
        s[12..16].copy_from_slice(&insn::NOP.to_le_bytes());
        let r = rel(REL24, P + 0x40, 0, true);
        apply(&mut s, BASE, &r, &RelocCtx::default()).unwrap();
        let applied = s;
        clear(&mut s, &r).unwrap();
        assert_eq!(&s[12..16], &insn::NOP.to_le_bytes());
        apply(&mut s, BASE, &r, &RelocCtx::default()).unwrap();
        assert_eq!(s, applied);
    }

    #[test]
    fn external_call_at_the_end_of_the_address_space() {
        // The word after the `bl` is past u64::MAX: an error, not the section's start
        // (which holds a TOC restore / a nop that must stay untouched).
        let off = u64::MAX - 3;
        let mut s = [0u8; 16];
        s[0..4].copy_from_slice(&insn::LD_R2_24_R1.to_le_bytes());
        let r = Reloc {
            offset: off,
            ..rel(REL24, P, 0, true)
        };
        let err = Err(RelocError::OutOfSection {
            offset: off,
            size: 16,
        });
        assert_eq!(clear(&mut s, &r), err);
        assert_eq!(&s[0..4], &insn::LD_R2_24_R1.to_le_bytes(), "unchanged");
        s[0..4].copy_from_slice(&0x7c08_02a6u32.to_le_bytes());
        assert_eq!(apply(&mut s, BASE, &r, &RelocCtx::default()), err);
    }

    #[test]
    fn toc16_family() {
        // addis r3,r2,x@toc@ha; the halfword at r_offset is the immediate.
        let sym = TOC + 0x1_8000;
        assert_eq!(
            on(0x3c62_0000, 0, rel(TOC16_HA, sym, 0, false)),
            Ok((0x3c62_0002, 0))
        );
        assert_eq!(
            on(0x3863_0000, 0, rel(TOC16_LO, sym, 0, false)),
            Ok((0x3863_8000, 0))
        );
        assert_eq!(
            on(0x3c62_0000, 0, rel(TOC16_HI, sym, 0, false)),
            Ok((0x3c62_0001, 0))
        );
        // ld r3,x@toc@l(r3): DS form keeps the two low bits (0 for ld).
        assert_eq!(
            on(0xe863_0000, 0, rel(TOC16_LO_DS, TOC + 0x1234, 0, false)),
            Ok((0xe863_1234, 0))
        );
        assert!(matches!(
            on(0xe863_0000, 0, rel(TOC16_LO_DS, TOC + 0x1236, 0, false)),
            Err(RelocError::Misaligned { .. })
        ));
        // lwa keeps its XO bits (0b10).
        assert_eq!(
            on(0xe862_0002, 0, rel(TOC16_DS, TOC - 8, 0, false)),
            Ok((0xe862_fffa, 0))
        );
        assert!(on(0xe862_0002, 0, rel(TOC16_DS, TOC + 0x8000, 0, false)).is_err());
        assert_eq!(
            on(0x3862_0000, 0, rel(TOC16, TOC - 0x8000, 0, false)),
            Ok((0x3862_8000, 0))
        );
        assert_eq!(
            on(0x3862_0000, 0, rel(TOC16, TOC + 0x8000, 0, false)),
            Err(RelocError::Overflow {
                r_type: TOC16,
                value: 0x8000
            })
        );
        assert!(on(0x3c62_0000, 0, rel(TOC16_HA, TOC + (1 << 31), 0, false)).is_err());
        let mut s = [0u8; 16];
        assert_eq!(
            apply(
                &mut s,
                BASE,
                &rel(TOC16_HA, 0, 0, false),
                &RelocCtx::default()
            ),
            Err(RelocError::NoToc)
        );
    }

    #[test]
    fn global_entry_toc_setup() {
        // addis r2,r12,(.TOC.-func)@ha at P; addi r2,r2,(.TOC.-func)@l at P+4.
        // .TOC. - P = 0x1_7ff8: ha = 0x1 (lo 0x7ff8 is positive), lo = 0x7ff8.
        let (w0, _) = on(0x3c4c_0000, 0, rel(REL16_HA, TOC, 0, false)).unwrap();
        assert_eq!(w0, 0x3c4c_0001);
        let (w0, _) = on(0x3c4c_0000, 0, rel(REL16_HA, TOC + 8, 0, false)).unwrap();
        assert_eq!(w0, 0x3c4c_0002, "lo 0x8000 is negative: ha rounds up");
        let (w0, _) = on(0x3842_0000, 0, rel(REL16_LO, TOC, 0, false)).unwrap();
        assert_eq!(w0, 0x3842_7ff8);
        let (w0, _) = on(0x3c4c_0000, 0, rel(REL16_HI, TOC, 0, false)).unwrap();
        assert_eq!(w0, 0x3c4c_0001);
    }

    #[test]
    fn data_and_addr16() {
        let mut s = [0u8; 16];
        let ctx = RelocCtx::default();
        apply(
            &mut s,
            BASE,
            &rel(ADDR64, 0x1122_3344_5566_7788, 0, false),
            &ctx,
        )
        .unwrap();
        assert_eq!(&s[8..], &[0x88, 0x77, 0x66, 0x55, 0x44, 0x33, 0x22, 0x11]);
        apply(&mut s, BASE, &rel(REL64, P + 0x10, 0, false), &ctx).unwrap();
        assert_eq!(&s[8..], &[0x10, 0, 0, 0, 0, 0, 0, 0]);
        apply(&mut s, BASE, &rel(REL32, P - 2, 0, false), &ctx).unwrap();
        assert_eq!(&s[8..12], &[0xfe, 0xff, 0xff, 0xff]);
        assert!(apply(&mut s, BASE, &rel(REL32, P + (1 << 31), 0, false), &ctx).is_err());
        apply(&mut s, BASE, &rel(ADDR32, 0xffff_ffff, 0, false), &ctx).unwrap();
        assert!(apply(&mut s, BASE, &rel(ADDR32, BASE, 0, false), &ctx).is_err());
        assert_eq!(
            on(0x3860_0000, 0, rel(ADDR16_LO, 0x1234_5678, 0, false)),
            Ok((0x3860_5678, 0))
        );
        assert_eq!(
            on(0x3c60_0000, 0, rel(ADDR16_HA, 0x1234_8000, 0, false)),
            Ok((0x3c60_1235, 0))
        );
        assert_eq!(
            on(0x3c60_0000, 0, rel(ADDR16_HI, 0x1234_8000, 0, false)),
            Ok((0x3c60_1234, 0))
        );
        assert!(
            on(0x3c60_0000, 0, rel(ADDR16_HA, BASE, 0, false)).is_err(),
            "needs 64-bit sequence"
        );
        assert_eq!(
            apply(&mut s, BASE, &rel(9999, 0, 0, false), &ctx),
            Err(RelocError::UnsupportedType { r_type: 9999 })
        );
    }
}
