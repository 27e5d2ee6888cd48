//! aarch64 relocations of a livepatch object (`apply_relocate_add`).
//!
//! Values are computed modulo 2^64 and then range-checked as the field reads them;
//! nothing is ever truncated. The `*_NC` ("no check") types skip the range check as
//! their names say, but this back-end still refuses a `LDST*_ABS_LO12_NC` value whose
//! low bits the scaled field would drop (the kernel writes it silently).

use klp_arch::{Endian, Reloc, RelocError, field};

use crate::insn;

/// `R_AARCH64_ABS64`: `S + A`.
pub const ABS64: u32 = 257;
/// `R_AARCH64_ABS32`: `S + A`, must fit 32 bits signed or unsigned.
pub const ABS32: u32 = 258;
/// `R_AARCH64_ABS16`: `S + A`, must fit 16 bits signed or unsigned.
pub const ABS16: u32 = 259;
/// `R_AARCH64_PREL64`: `S + A - P`.
pub const PREL64: u32 = 260;
/// `R_AARCH64_PREL32`: `S + A - P`, signed 32 bits.
pub const PREL32: u32 = 261;
/// `R_AARCH64_PREL16`: `S + A - P`, signed 16 bits.
pub const PREL16: u32 = 262;
/// `R_AARCH64_ADR_PREL_LO21`: `adr`, `S + A - P`, signed 21 bits.
pub const ADR_PREL_LO21: u32 = 274;
/// `R_AARCH64_ADR_PREL_PG_HI21`: `adrp`, `Page(S + A) - Page(P)`, signed 33 bits.
pub const ADR_PREL_PG_HI21: u32 = 275;
/// `R_AARCH64_ADR_PREL_PG_HI21_NC`: as above, unchecked.
pub const ADR_PREL_PG_HI21_NC: u32 = 276;
/// `R_AARCH64_ADD_ABS_LO12_NC`: `add`, `(S + A) & 0xfff`.
pub const ADD_ABS_LO12_NC: u32 = 277;
/// `R_AARCH64_LDST8_ABS_LO12_NC`.
pub const LDST8_ABS_LO12_NC: u32 = 278;
/// `R_AARCH64_TSTBR14`: `tbz`/`tbnz`, signed 16 bits, 4-aligned.
pub const TSTBR14: u32 = 279;
/// `R_AARCH64_CONDBR19`: `b.cond`/`cbz`, signed 21 bits, 4-aligned.
pub const CONDBR19: u32 = 280;
/// `R_AARCH64_JUMP26`: `b`, signed 28 bits, 4-aligned.
pub const JUMP26: u32 = 282;
/// `R_AARCH64_CALL26`: `bl`, signed 28 bits, 4-aligned.
pub const CALL26: u32 = 283;
/// `R_AARCH64_LDST16_ABS_LO12_NC`.
pub const LDST16_ABS_LO12_NC: u32 = 284;
/// `R_AARCH64_LDST32_ABS_LO12_NC`.
pub const LDST32_ABS_LO12_NC: u32 = 285;
/// `R_AARCH64_LDST64_ABS_LO12_NC`.
pub const LDST64_ABS_LO12_NC: u32 = 286;
/// `R_AARCH64_LDST128_ABS_LO12_NC`.
pub const LDST128_ABS_LO12_NC: u32 = 299;

const LE: Endian = Endian::Little;

fn patch_insn(
    section: &mut [u8],
    offset: u64,
    f: impl FnOnce(u32) -> u32,
) -> Result<(), RelocError> {
    let old = field::read::<4>(section, offset, LE)? as u32;
    field::write::<4>(section, offset, u64::from(f(old)), LE)
}

fn ldst(t: u32, section: &mut [u8], offset: u64, s_a: u64, scale: u32) -> Result<(), RelocError> {
    let lo = i128::from(s_a & 0xfff);
    field::aligned(t, lo, scale)?;
    patch_insn(section, offset, |i| {
        insn::set_imm12(i, (lo >> scale) as u32)
    })
}

/// `S + A` for an absolute data field of `bits` bits, which may be read as signed or
/// as unsigned: values in `[-2^(bits-1), 2^bits)` fit (the kernel's `reloc_data`).
fn abs(t: u32, s_a: u64, bits: u32) -> Result<u64, RelocError> {
    let v = i128::from(s_a as i64);
    field::signed(t, v, bits).or_else(|_| field::unsigned(t, v, bits))
}

/// Applies `r` to `section`, loaded at `section_addr`.
pub fn apply(section: &mut [u8], section_addr: u64, r: &Reloc) -> Result<(), RelocError> {
    let s_a = r.sym.wrapping_add(r.addend as u64);
    let p = section_addr.wrapping_add(r.offset);
    let prel = i128::from(s_a.wrapping_sub(p) as i64);
    let t = r.r_type;
    let off = r.offset;
    match t {
        ABS64 => field::write::<8>(section, off, s_a, LE),
        PREL64 => field::write::<8>(section, off, prel as u64, LE),
        ABS32 => field::write::<4>(section, off, abs(t, s_a, 32)?, LE),
        ABS16 => field::write::<2>(section, off, abs(t, s_a, 16)?, LE),
        PREL32 => field::write::<4>(section, off, field::signed(t, prel, 32)?, LE),
        PREL16 => field::write::<2>(section, off, field::signed(t, prel, 16)?, LE),
        ADR_PREL_LO21 => {
            let v = field::signed(t, prel, 21)?;
            patch_insn(section, off, |i| insn::set_adr_imm(i, v as u32))
        }
        ADR_PREL_PG_HI21 | ADR_PREL_PG_HI21_NC => {
            let pages = i128::from(((s_a & !0xfff).wrapping_sub(p & !0xfff) as i64) >> 12);
            let v = if t == ADR_PREL_PG_HI21 {
                field::signed(t, pages, 21)?
            } else {
                pages as u64
            };
            patch_insn(section, off, |i| insn::set_adr_imm(i, v as u32))
        }
        ADD_ABS_LO12_NC => ldst(t, section, off, s_a, 0),
        LDST8_ABS_LO12_NC => ldst(t, section, off, s_a, 0),
        LDST16_ABS_LO12_NC => ldst(t, section, off, s_a, 1),
        LDST32_ABS_LO12_NC => ldst(t, section, off, s_a, 2),
        LDST64_ABS_LO12_NC => ldst(t, section, off, s_a, 3),
        LDST128_ABS_LO12_NC => ldst(t, section, off, s_a, 4),
        TSTBR14 | CONDBR19 | JUMP26 | CALL26 => {
            let bits = match t {
                TSTBR14 => 16,
                CONDBR19 => 21,
                _ => 28,
            };
            let v = field::signed(t, prel, bits)?;
            field::aligned(t, prel, 2)?;
            let imm = (v >> 2) as u32;
            patch_insn(section, off, |i| match t {
                TSTBR14 => insn::set_imm14(i, imm),
                CONDBR19 => insn::set_imm19(i, imm),
                _ => insn::set_imm26(i, imm),
            })
        }
        _ => Err(RelocError::UnsupportedType { r_type: t }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Aarch64;
    use klp_arch::{Arch, RelocCtx};

    const BASE: u64 = 0xffff_8000_7800_0000;

    fn rel(r_type: u32, offset: u64, sym: u64, addend: i64) -> Reloc {
        Reloc {
            r_type,
            offset,
            sym,
            addend,
            external: false,
        }
    }

    /// Applies `r` to a section holding `word` at offset 4; returns that word.
    fn on(word: u32, r_type: u32, sym: u64, addend: i64) -> Result<u32, RelocError> {
        let mut s = [0u8; 12];
        s[4..8].copy_from_slice(&word.to_le_bytes());
        Aarch64::apply_relocation(
            &mut s,
            BASE,
            &rel(r_type, 4, sym, addend),
            &RelocCtx::default(),
        )?;
        Ok(u32::from_le_bytes(s[4..8].try_into().unwrap()))
    }

    fn data(r_type: u32, sym: u64, addend: i64) -> Result<[u8; 12], RelocError> {
        let mut s = [0u8; 12];
        Aarch64::apply_relocation(
            &mut s,
            BASE,
            &rel(r_type, 4, sym, addend),
            &RelocCtx::default(),
        )?;
        Ok(s)
    }

    const P: u64 = BASE + 4;

    #[test]
    fn call26_jump26() {
        // bl P+0x100: imm26 = 0x40.
        assert_eq!(on(0x9400_0000, CALL26, P + 0xf0, 0x10), Ok(0x9400_0040));
        assert_eq!(on(0x1400_0000, JUMP26, P - 4, 0), Ok(0x17ff_ffff));
        assert_eq!(
            on(0x9400_0000, CALL26, P + (1 << 27) - 4, 0),
            Ok(0x95ff_ffff)
        );
        assert_eq!(
            on(0x9400_0000, CALL26, P + (1 << 27), 0),
            Err(RelocError::Overflow {
                r_type: CALL26,
                value: 1 << 27
            })
        );
        assert_eq!(on(0x9400_0000, CALL26, P - (1 << 27), 0), Ok(0x9600_0000));
        assert!(on(0x9400_0000, CALL26, P - (1 << 27) - 4, 0).is_err());
        assert_eq!(
            on(0x9400_0000, CALL26, P + 2, 0),
            Err(RelocError::Misaligned {
                r_type: CALL26,
                value: 2
            })
        );
    }

    #[test]
    fn condbr19_tstbr14() {
        // b.eq P+8: imm19 = 2 -> 0x54000040.
        assert_eq!(on(0x5400_0000, CONDBR19, P + 8, 0), Ok(0x5400_0040));
        assert!(on(0x5400_0000, CONDBR19, P + (1 << 20), 0).is_err());
        assert!(on(0x5400_0000, CONDBR19, P + (1 << 20) - 4, 0).is_ok());
        // tbz x0, #0, P+0x7ffc: imm14 = 0x1fff.
        assert_eq!(on(0x3600_0000, TSTBR14, P + 0x7ffc, 0), Ok(0x3603_ffe0));
        assert!(on(0x3600_0000, TSTBR14, P + 0x8000, 0).is_err());
    }

    #[test]
    fn adrp_add_ldst() {
        // adrp x0 to a page 0x12345 pages above P's page.
        let target = (P & !0xfff) + (0x12345 << 12) + 0x678;
        assert_eq!(
            on(0x9000_0000, ADR_PREL_PG_HI21, target, 0),
            Ok(0xb009_1a20)
        );
        // add x0, x0, #:lo12: -> 0x678.
        assert_eq!(on(0x9100_0000, ADD_ABS_LO12_NC, target, 0), Ok(0x9119_e000));
        // ldr x1, [x0, #:lo12:] scaled by 8: 0x678 / 8 = 0xcf.
        assert_eq!(
            on(0xf940_0001, LDST64_ABS_LO12_NC, target, 0),
            Ok(0xf943_3c01)
        );
        assert_eq!(
            on(0x3940_0001, LDST8_ABS_LO12_NC, target + 1, 0),
            Ok(0x3959_e401)
        );
        assert_eq!(
            on(0x7940_0001, LDST16_ABS_LO12_NC, target, 0),
            Ok(0x794c_f001)
        );
        assert_eq!(
            on(0xb940_0001, LDST32_ABS_LO12_NC, target, 0),
            Ok(0xb946_7801)
        );
        assert_eq!(
            on(0x3dc0_0001, LDST128_ABS_LO12_NC, target - 8, 0),
            Ok(0x3dc1_9c01)
        );
        assert_eq!(
            on(0xf940_0001, LDST64_ABS_LO12_NC, target + 4, 0),
            Err(RelocError::Misaligned {
                r_type: LDST64_ABS_LO12_NC,
                value: 0x67c
            })
        );
        // Range of adrp: +-4 GiB in pages.
        let far = (P & !0xfff) + (1 << 32);
        assert!(on(0x9000_0000, ADR_PREL_PG_HI21, far, 0).is_err());
        assert!(on(0x9000_0000, ADR_PREL_PG_HI21, far - 0x1000, 0).is_ok());
        assert!(on(0x9000_0000, ADR_PREL_PG_HI21_NC, far, 0).is_ok());
        // adr: +-1 MiB.
        assert_eq!(on(0x1000_0000, ADR_PREL_LO21, P + 5, 0), Ok(0x3000_0020));
        assert!(on(0x1000_0000, ADR_PREL_LO21, P + (1 << 20), 0).is_err());
    }

    #[test]
    fn data_relocs() {
        let s = data(ABS64, 0x1122_3344_5566_7788, 0).unwrap();
        assert_eq!(&s[4..], &[0x88, 0x77, 0x66, 0x55, 0x44, 0x33, 0x22, 0x11]);
        let s = data(PREL32, P - 1, 0).unwrap();
        assert_eq!(&s[4..8], &[0xff; 4]);
        assert!(data(PREL32, P + (1 << 31), 0).is_err());
        assert!(data(PREL32, P + (1 << 31) - 1, 0).is_ok());
        let s = data(PREL64, P + 0x10, 0).unwrap();
        assert_eq!(&s[4..], &[0x10, 0, 0, 0, 0, 0, 0, 0]);
        assert_eq!(&data(ABS32, 0xffff_ffff, 0).unwrap()[4..8], &[0xff; 4]);
        assert!(data(ABS32, 0x1_0000_0000, 0).is_err());
        assert!(data(ABS32, (-(1i64 << 31)) as u64, 0).is_ok());
        assert!(data(ABS32, (-(1i64 << 31) - 1) as u64, 0).is_err());
        assert_eq!(&data(ABS16, 0xffff, 0).unwrap()[4..6], &[0xff, 0xff]);
        assert!(data(ABS16, 0x1_0000, 0).is_err());
        assert_eq!(&data(PREL16, P + 0x7fff, 0).unwrap()[4..6], &[0xff, 0x7f]);
        assert!(data(PREL16, P + 0x8000, 0).is_err());
    }

    #[test]
    fn refusals() {
        assert_eq!(
            data(1024, 0, 0),
            Err(RelocError::UnsupportedType { r_type: 1024 })
        );
        let mut s = [0u8; 6];
        assert_eq!(
            Aarch64::apply_relocation(&mut s, BASE, &rel(ABS64, 0, 0, 0), &RelocCtx::default()),
            Err(RelocError::OutOfSection { offset: 0, size: 6 })
        );
    }
}
