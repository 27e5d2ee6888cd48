//! ppc64le patch sites.
//!
//! Under ELFv2 a function has a *global* entry (the symbol address), which computes the
//! TOC pointer from r12 (`addis r2,r12,…; addi r2,r2,…`), and a *local* entry after it,
//! which callers in the same object use. The offset of the local entry is encoded in
//! bits 5–7 of the symbol's `st_other`. The patch site is at the local entry, so that
//! both kinds of call pass through it:
//!
//! | form | words at the local entry |
//! |---|---|
//! | [`form::PROFILE_KERNEL`] | `mflr r0; bl _mcount` (`-pg -mprofile-kernel`, the kernel's site) |
//! | [`form::NOPS`] | `nop; nop` (patchable entry where the toolchain places it after the TOC setup) |
//!
//! Supported local-entry offsets: 0 (no TOC setup; `st_other` field 0 or 1) and 8
//! (field 3, the two-instruction TOC setup, which is checked). Others are refused.
//!
//! Redirects (8 bytes):
//! * `Call`: `mflr r0; bl trampoline`: the trampoline finds the caller's return
//!   address in r0, as with `-mprofile-kernel`.
//! * `Jump`: `b new_func` (its local entry) in the first word. Only valid when the new
//!   function uses the same TOC (`Redirect::same_toc`): otherwise the caller's r2
//!   would be wrong on return, and the livepatch handler ([`crate::toc`]) is needed.

use klp_arch::{
    EncodeError, Endian, FuncInfo, InsnBytes, Redirect, RedirectKind, Site, SiteError, SiteForm,
    read_u32,
};

use crate::insn;

/// The forms of the table above: the `code` of a [`SiteForm`] (for
/// [`form::PROFILE_KERNEL`], `target` is `_mcount`'s address).
pub mod form {
    /// `mflr r0; bl _mcount`.
    pub const PROFILE_KERNEL: u8 = 1;
    /// `nop; nop`.
    pub const NOPS: u8 = 2;
}

/// Bytes a redirect rewrites.
pub const LEN: usize = 8;

/// The local-entry offset in bytes encoded in `st_other` (ELFv2
/// `PPC64_LOCAL_ENTRY_OFFSET`), or `None` for the reserved value 7.
pub const fn local_entry_offset(st_other: u8) -> Option<u64> {
    let v = (st_other >> 5) & 7;
    if v == 7 {
        return None;
    }
    Some(((1u64 << v) >> 2) << 2)
}

/// Recognises the site of `func` (see the module docs).
pub fn find(code: &[u8], func: FuncInfo) -> Result<Site, SiteError> {
    let st_other = func.st_other;
    let off = match local_entry_offset(st_other) {
        Some(o @ (0 | 8)) => o as usize,
        _ => return Err(SiteError::LocalEntry { st_other }),
    };
    if off == 8 {
        let w0 = read_u32(code, 0, Endian::Little);
        let w1 = read_u32(code, 4, Endian::Little);
        let toc = matches!(
            (w0, w1),
            (Some(a), Some(b)) if a & 0xffff_0000 == insn::ADDIS_R2_R12
                && b & 0xffff_0000 == insn::ADDI_R2_R2
        );
        if !toc {
            return Err(SiteError::NoTocSetup {
                at: func.addr,
                found: InsnBytes::prefix_of(code),
            });
        }
    }
    let at = func.addr.wrapping_add(off as u64);
    let body = code.get(off..).unwrap_or(&[]);
    let (Some(w0), Some(w1)) = (
        read_u32(body, 0, Endian::Little),
        read_u32(body, 4, Endian::Little),
    ) else {
        return Err(SiteError::Truncated {
            at,
            have: body.len(),
            needed: LEN,
        });
    };
    let form = match (w0, w1) {
        (insn::MFLR_R0, bl) if bl & !insn::LI_MASK == insn::BL => {
            SiteForm::new(form::PROFILE_KERNEL)
                .calling(insn::branch_target(bl, at.wrapping_add(4)).unwrap_or(0))
        }
        (insn::NOP, insn::NOP) => SiteForm::new(form::NOPS),
        _ => {
            return Err(SiteError::Unrecognised {
                at,
                found: InsnBytes::prefix_of(body),
            });
        }
    };
    Ok(Site {
        func,
        offset: off as u8,
        form,
        original: InsnBytes::prefix_of(body.get(..LEN).unwrap_or(&[])),
    })
}

/// The bytes performing `redirect` at `site`.
pub fn encode(site: &Site, redirect: Redirect) -> Result<InsnBytes, EncodeError> {
    let from = site.addr();
    let (w0, w1) = match redirect.kind {
        RedirectKind::Call => (
            insn::MFLR_R0,
            insn::bl(from.wrapping_add(4), redirect.target)?,
        ),
        RedirectKind::Jump => {
            if !redirect.same_toc {
                return Err(EncodeError::NeedsTocHandler {
                    to: redirect.target,
                });
            }
            (
                insn::b(from, redirect.target)?,
                read_u32(site.original.as_slice(), 4, Endian::Little).unwrap_or(insn::NOP),
            )
        }
    };
    let mut out = InsnBytes::EMPTY;
    // Two words always fit in an InsnBytes.
    let _ = out.push_u32(w0, Endian::Little);
    let _ = out.push_u32(w1, Endian::Little);
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Ppc64le;
    use klp_arch::Arch;

    const F: u64 = 0xc000_0000_0010_0000;
    /// `st_other` with local-entry field 3 (8 bytes).
    const LOCAL8: u8 = 3 << 5;

    fn w(words: &[u32]) -> std::vec::Vec<u8> {
        words.iter().flat_map(|x| x.to_le_bytes()).collect()
    }

    fn fi(st_other: u8) -> FuncInfo {
        FuncInfo { addr: F, st_other }
    }

    // addis r2,r12,0x1b; addi r2,r2,-0x7e00 as gcc emits them.
    const TOC: [u32; 2] = [0x3c4c_001b, 0x3842_8200];

    #[test]
    fn local_entry_offsets() {
        assert_eq!(local_entry_offset(0), Some(0));
        assert_eq!(local_entry_offset(1 << 5), Some(0));
        assert_eq!(local_entry_offset(2 << 5), Some(4));
        assert_eq!(local_entry_offset(3 << 5), Some(8));
        assert_eq!(local_entry_offset(6 << 5), Some(64));
        assert_eq!(local_entry_offset(7 << 5), None);
        assert_eq!(
            local_entry_offset(3 << 5 | 0x1f),
            Some(8),
            "low bits ignored"
        );
    }

    #[test]
    fn profile_kernel_after_toc_setup() {
        // bl at F+12 to F-0x100 (mcount).
        let bl = insn::bl(F + 12, F - 0x100).unwrap();
        let s = Ppc64le::find_site(&w(&[TOC[0], TOC[1], insn::MFLR_R0, bl]), fi(LOCAL8)).unwrap();
        assert_eq!(
            s.form,
            SiteForm::new(form::PROFILE_KERNEL).calling(F - 0x100)
        );
        assert_eq!((s.addr(), s.len()), (F + 8, 8));
    }

    #[test]
    fn nops_at_local_entry_and_without_toc() {
        let s =
            Ppc64le::find_site(&w(&[TOC[0], TOC[1], insn::NOP, insn::NOP]), fi(LOCAL8)).unwrap();
        assert_eq!((s.form, s.offset), (SiteForm::new(form::NOPS), 8));
        let s = Ppc64le::find_site(&w(&[insn::NOP, insn::NOP]), fi(0)).unwrap();
        assert_eq!((s.form, s.offset), (SiteForm::new(form::NOPS), 0));
        let s = Ppc64le::find_site(&w(&[insn::NOP, insn::NOP]), fi(1 << 5)).unwrap();
        assert_eq!(s.offset, 0);
    }

    #[test]
    fn refusals() {
        // st_other says 8 but no TOC setup is there.
        let c = w(&[insn::NOP, insn::NOP, insn::NOP, insn::NOP]);
        assert_eq!(
            Ppc64le::find_site(&c, fi(LOCAL8)),
            Err(SiteError::NoTocSetup {
                at: F,
                found: InsnBytes::from_slice(&c).unwrap()
            })
        );
        for v in [2u8, 4, 5, 6, 7] {
            assert_eq!(
                Ppc64le::find_site(&c, fi(v << 5)),
                Err(SiteError::LocalEntry { st_other: v << 5 })
            );
        }
        // The prologue without a site: mflr r0; std r0,16(r1).
        let c = w(&[TOC[0], TOC[1], insn::MFLR_R0, 0xf801_0010]);
        assert_eq!(
            Ppc64le::find_site(&c, fi(LOCAL8)),
            Err(SiteError::Unrecognised {
                at: F + 8,
                found: InsnBytes::from_slice(&c[8..]).unwrap()
            })
        );
        assert!(matches!(
            Ppc64le::find_site(&w(&[TOC[0], TOC[1], insn::NOP]), fi(LOCAL8)),
            Err(SiteError::Truncated { have: 4, .. })
        ));
        // A gcc-12 patchable entry puts the nops *before* the TOC setup: refused.
        let c = w(&[insn::NOP, insn::NOP, TOC[0], TOC[1]]);
        assert!(Ppc64le::find_site(&c, fi(LOCAL8)).is_err());
    }

    #[test]
    fn redirect_and_restore() {
        let s =
            Ppc64le::find_site(&w(&[TOC[0], TOC[1], insn::NOP, insn::NOP]), fi(LOCAL8)).unwrap();
        // Call: mflr r0 at F+8; bl at F+12 to F+0x1000 -> offset 0xff4.
        let c = Ppc64le::encode_redirect(&s, Redirect::call(F + 0x1000)).unwrap();
        assert_eq!(c.as_slice(), &w(&[0x7c08_02a6, 0x4800_0ff5])[..]);
        // Jump at F+8 to F+8-0x10 -> 0x4bfffff0.
        let j = Ppc64le::encode_redirect(&s, Redirect::jump(F - 8)).unwrap();
        assert_eq!(j.as_slice(), &w(&[0x4bff_fff0, insn::NOP])[..]);
        assert_eq!(
            Ppc64le::restore(&s).as_slice(),
            &w(&[insn::NOP, insn::NOP])[..]
        );
        let other_toc = Redirect {
            same_toc: false,
            ..Redirect::jump(F + 0x40)
        };
        assert_eq!(
            Ppc64le::encode_redirect(&s, other_toc),
            Err(EncodeError::NeedsTocHandler { to: F + 0x40 })
        );
        assert!(Ppc64le::encode_redirect(&s, Redirect::call(F + 12 + (1 << 25) - 4)).is_ok());
        assert_eq!(
            Ppc64le::encode_redirect(&s, Redirect::call(F + 12 + (1 << 25))),
            Err(EncodeError::OutOfRange {
                from: F + 12,
                to: F + 12 + (1 << 25),
                limit: 1 << 25
            })
        );
        assert!(Ppc64le::encode_redirect(&s, Redirect::jump(F + 8 - (1 << 25))).is_ok());
        assert!(Ppc64le::encode_redirect(&s, Redirect::jump(F + 4 - (1 << 25))).is_err());
    }

    extern crate std;
}
