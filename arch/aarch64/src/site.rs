//! aarch64 patch sites.
//!
//! Recognised unpatched forms (after an optional `bti c`, which stays untouched):
//!
//! | form | words |
//! |---|---|
//! | [`form::NOPS`] | `nop; nop` (`-fpatchable-function-entry=2`) |
//! | [`form::MOV_X9_NOP`] | `mov x9, x30; nop` (what the kernel's ftrace leaves after boot) |
//!
//! Redirects (8 bytes, both words):
//! * `Call`: `mov x9, x30; bl trampoline`: the trampoline finds the caller's return
//!   address in x9 and the return point into the function in x30.
//! * `Jump`: a `b new_func`; x30 still holds the caller's return address, so
//!   `new_func` returns straight to the caller. Placed so that only `nop`/`b`/`bl`
//!   words change, which the architecture allows to be rewritten while other CPUs run
//!   them: in the first word (`b new_func; nop`) for [`form::NOPS`], in the
//!   second (`mov x9, x30; b new_func`, x9 being a scratch register) for
//!   [`form::MOV_X9_NOP`], whose first word stays.

use klp_arch::{
    EncodeError, Endian, FuncInfo, InsnBytes, Redirect, RedirectKind, Site, SiteError, SiteForm,
    read_u32,
};

use crate::insn;

/// The forms of the table above: the `code` of a [`SiteForm`] (its `landing_pad`
/// says whether `bti c` precedes the site).
pub mod form {
    /// `nop; nop`.
    pub const NOPS: u8 = 1;
    /// `mov x9, x30; nop`.
    pub const MOV_X9_NOP: u8 = 2;
}

/// Bytes a redirect rewrites.
pub const LEN: usize = 8;

/// Recognises the site at the entry of `func` (see the module docs).
pub fn find(code: &[u8], func: FuncInfo) -> Result<Site, SiteError> {
    let bti = read_u32(code, 0, Endian::Little) == Some(insn::BTI_C);
    let off = if bti { 4 } else { 0 };
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
        (insn::NOP, insn::NOP) => SiteForm::new(form::NOPS).landing_pad(bti),
        (insn::MOV_X9_X30, insn::NOP) => SiteForm::new(form::MOV_X9_NOP).landing_pad(bti),
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
            insn::MOV_X9_X30,
            insn::bl(from.wrapping_add(4), redirect.target)?,
        ),
        RedirectKind::Jump => match site.form {
            SiteForm {
                code: form::MOV_X9_NOP,
                ..
            } => (
                insn::MOV_X9_X30,
                insn::b(from.wrapping_add(4), redirect.target)?,
            ),
            _ => (
                insn::b(from, redirect.target)?,
                read_u32(site.original.as_slice(), 4, Endian::Little).unwrap_or(insn::NOP),
            ),
        },
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
    use crate::Aarch64;
    use klp_arch::Arch;

    const F: u64 = 0xffff_8000_8010_0000;
    const NOP: [u8; 4] = [0x1f, 0x20, 0x03, 0xd5];
    const BTI: [u8; 4] = [0x5f, 0x24, 0x03, 0xd5];
    const MOV: [u8; 4] = [0xe9, 0x03, 0x1e, 0xaa];
    const STP: [u8; 4] = [0xfd, 0x7b, 0xbf, 0xa9]; // stp x29, x30, [sp, #-16]!

    fn code(words: &[[u8; 4]]) -> std::vec::Vec<u8> {
        words.concat()
    }

    #[test]
    fn two_nops() {
        let s = Aarch64::find_site(&code(&[NOP, NOP, STP]), FuncInfo::at(F)).unwrap();
        assert_eq!(s.form, SiteForm::new(form::NOPS));
        assert_eq!((s.addr(), s.len()), (F, 8));
    }

    #[test]
    fn bti_then_two_nops() {
        let s = Aarch64::find_site(&code(&[BTI, NOP, NOP, STP]), FuncInfo::at(F)).unwrap();
        assert_eq!(s.form, SiteForm::new(form::NOPS).landing_pad(true));
        assert_eq!((s.addr(), s.len()), (F + 4, 8));
    }

    #[test]
    fn kernel_boot_form() {
        let s = Aarch64::find_site(&code(&[MOV, NOP]), FuncInfo::at(F)).unwrap();
        assert_eq!(s.form, SiteForm::new(form::MOV_X9_NOP));
        let s = Aarch64::find_site(&code(&[BTI, MOV, NOP]), FuncInfo::at(F)).unwrap();
        assert_eq!(s.form, SiteForm::new(form::MOV_X9_NOP).landing_pad(true));
    }

    #[test]
    fn refusals_show_the_bytes() {
        let c = code(&[STP, NOP]);
        assert_eq!(
            Aarch64::find_site(&c, FuncInfo::at(F)),
            Err(SiteError::Unrecognised {
                at: F,
                found: InsnBytes::from_slice(&c).unwrap()
            })
        );
        // One nop only.
        assert!(matches!(
            Aarch64::find_site(&code(&[NOP, STP]), FuncInfo::at(F)),
            Err(SiteError::Unrecognised { .. })
        ));
        assert_eq!(
            Aarch64::find_site(&code(&[BTI, NOP]), FuncInfo::at(F)),
            Err(SiteError::Truncated {
                at: F + 4,
                have: 4,
                needed: 8
            })
        );
        // Already redirected (a `b` in the first slot).
        assert!(Aarch64::find_site(&code(&[[0, 0, 0, 0x14], NOP]), FuncInfo::at(F)).is_err());
    }

    #[test]
    fn redirect_and_restore() {
        let s = Aarch64::find_site(&code(&[BTI, NOP, NOP]), FuncInfo::at(F)).unwrap();
        // Call: mov x9, x30 at F+4; bl at F+8 to F+0x1008 -> imm26 = 0x400.
        let c = Aarch64::encode_redirect(&s, Redirect::call(F + 0x1008)).unwrap();
        assert_eq!(c.as_slice(), &code(&[MOV, [0x00, 0x04, 0x00, 0x94]])[..]);
        // Jump: b at F+4 back to F - 0x100 -> imm26 = -0x41.
        let j = Aarch64::encode_redirect(&s, Redirect::jump(F - 0x100)).unwrap();
        assert_eq!(j.as_slice(), &code(&[[0xbf, 0xff, 0xff, 0x17], NOP])[..]);
        assert_eq!(Aarch64::restore(&s).as_slice(), &code(&[NOP, NOP])[..]);
        // Range: the bl sits at F+8.
        assert!(Aarch64::encode_redirect(&s, Redirect::call(F + 8 + (1 << 27) - 4)).is_ok());
        assert_eq!(
            Aarch64::encode_redirect(&s, Redirect::call(F + 8 + (1 << 27))),
            Err(EncodeError::OutOfRange {
                from: F + 8,
                to: F + 8 + (1 << 27),
                limit: 1 << 27
            })
        );
        assert!(Aarch64::encode_redirect(&s, Redirect::jump(F + 4 - (1 << 27))).is_ok());
        assert!(Aarch64::encode_redirect(&s, Redirect::jump(F - (1 << 27))).is_err());
    }

    #[test]
    fn kernel_form_jumps_from_the_second_word() {
        let s = Aarch64::find_site(&code(&[MOV, NOP, STP]), FuncInfo::at(F)).unwrap();
        // Jump: mov x9, x30 stays; b at F+4 to F+0x1004 -> imm26 = 0x400.
        let j = Aarch64::encode_redirect(&s, Redirect::jump(F + 0x1004)).unwrap();
        assert_eq!(j.as_slice(), &code(&[MOV, [0x00, 0x04, 0x00, 0x14]])[..]);
        let c = Aarch64::encode_redirect(&s, Redirect::call(F + 0x1004)).unwrap();
        assert_eq!(c.as_slice(), &code(&[MOV, [0x00, 0x04, 0x00, 0x94]])[..]);
        assert_eq!(Aarch64::restore(&s).as_slice(), &code(&[MOV, NOP])[..]);
        // Range: the b sits at F+4.
        assert!(Aarch64::encode_redirect(&s, Redirect::jump(F + 4 - (1 << 27))).is_ok());
        assert!(Aarch64::encode_redirect(&s, Redirect::jump(F - (1 << 27))).is_err());
        assert!(Aarch64::encode_redirect(&s, Redirect::jump(F + 4 + (1 << 27))).is_err());
        // Redirected, the site is no longer recognised as unpatched.
        assert!(Aarch64::find_site(j.as_slice(), FuncInfo::at(F)).is_err());
    }

    extern crate std;
}
