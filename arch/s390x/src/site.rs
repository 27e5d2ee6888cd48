//! s390x patch sites.
//!
//! | form | bytes |
//! |---|---|
//! | [`form::BRCL`] | `brcl 0,…` (`c0 04 ….`), the kernel's site from `-mfentry -mnop-mcount` |
//! | [`form::NOPS`] | a run of `nopr` (`07 00`) / `nop` (`47 00 00 00`) of at least 6 bytes (`-fpatchable-function-entry`, `-mhotpatch`) |
//!
//! The site is the shortest prefix of the nop run that holds a 6-byte branch and ends on
//! an instruction boundary; the rest is filled with `nopr`.
//!
//! Redirects:
//! * `Call`: `brasl %r0,trampoline`: r14 (the caller's return address) stays intact,
//!   and the trampoline returns through r0.
//! * `Jump`: `jg new_func`: `new_func` returns through r14 straight to the caller.

use klp_arch::{
    EncodeError, FuncInfo, InsnBytes, Redirect, RedirectKind, Site, SiteError, SiteForm,
};

use crate::insn;

/// The forms of the table above: the `code` of a [`SiteForm`].
pub mod form {
    /// `brcl 0,…`.
    pub const BRCL: u8 = 1;
    /// A run of hotpatch nops.
    pub const NOPS: u8 = 2;
}

/// Longest site: 4 bytes of nops, then a 6-byte `brcl` (or 2 + 4 + 4).
pub const MAX_LEN: usize = 10;

/// Recognises the site at the entry of `func` (see the module docs).
pub fn find(code: &[u8], func: FuncInfo) -> Result<Site, SiteError> {
    let at = func.addr;
    let found = InsnBytes::prefix_of(code);
    if !func.addr.is_multiple_of(2) {
        return Err(SiteError::Unrecognised { at, found });
    }
    let mut len = 0usize;
    while len < insn::RIL_LEN {
        match code
            .get(len..)
            .and_then(insn::nop_len)
            .and_then(|n| len.checked_add(n))
        {
            Some(next) => len = next,
            None => break,
        }
    }
    if len == 0 {
        if code.len() < insn::RIL_LEN {
            return Err(SiteError::Truncated {
                at,
                have: code.len(),
                needed: insn::RIL_LEN,
            });
        }
        return Err(SiteError::Unrecognised { at, found });
    }
    if len < insn::RIL_LEN {
        return Err(SiteError::TooShort {
            at,
            found,
            needed: insn::RIL_LEN as u8,
        });
    }
    let form = if code.starts_with(&insn::BRCL_0) {
        SiteForm::new(form::BRCL)
    } else {
        SiteForm::new(form::NOPS)
    };
    let original = code
        .get(..len)
        .and_then(InsnBytes::from_slice)
        .ok_or(SiteError::Unrecognised { at, found })?;
    Ok(Site {
        func,
        offset: 0,
        form,
        original,
    })
}

/// The bytes performing `redirect` at `site`: the branch, then `nopr`s.
pub fn encode(site: &Site, redirect: Redirect) -> Result<InsnBytes, EncodeError> {
    let from = site.addr();
    let branch = match redirect.kind {
        RedirectKind::Call => insn::brasl_r0(from, redirect.target)?,
        RedirectKind::Jump => insn::jg(from, redirect.target)?,
    };
    let mut out = InsnBytes::EMPTY;
    let mut fill = || -> Option<()> {
        out.extend(&branch)?;
        while out.len() < site.len() {
            out.extend(&insn::NOPR)?;
        }
        Some(())
    };
    // A site is at most MAX_LEN < CAPACITY bytes, so this cannot fail; say so if it did.
    fill().ok_or(EncodeError::OutOfRange {
        from,
        to: redirect.target,
        limit: 0,
    })?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::S390x;
    use klp_arch::Arch;

    const F: u64 = 0x0000_0000_0012_3400;
    // stmg %r11,%r15,88(%r15)
    const STMG: [u8; 6] = [0xeb, 0xbf, 0xf0, 0x58, 0x00, 0x24];

    fn site(code: &[u8]) -> Result<Site, SiteError> {
        S390x::find_site(code, FuncInfo::at(F))
    }

    #[test]
    fn brcl() {
        let s = site(&[&insn::BRCL_0_0[..], &STMG[..]].concat()).unwrap();
        assert_eq!(
            (s.form, s.addr(), s.len()),
            (SiteForm::new(form::BRCL), F, 6)
        );
    }

    #[test]
    fn hotpatch_nops() {
        // -fpatchable-function-entry=3: three nopr.
        let s = site(&[0x07, 0, 0x07, 0, 0x07, 0, 0xeb]).unwrap();
        assert_eq!((s.form, s.len()), (SiteForm::new(form::NOPS), 6));
        // -mhotpatch=0,1 style: nopr then nop: 6 bytes.
        let s = site(&[0x07, 0, 0x47, 0, 0, 0, 0xeb]).unwrap();
        assert_eq!(s.len(), 6);
        // nop + nop: 8 bytes (boundary after the second).
        let s = site(&[0x47, 0, 0, 0, 0x47, 0, 0, 0]).unwrap();
        assert_eq!(s.len(), 8);
        // Two nopr only: too short.
        assert!(matches!(
            site(&[0x07, 0, 0x07, 0, 0xeb, 0xbf]),
            Err(SiteError::TooShort { needed: 6, .. })
        ));
    }

    #[test]
    fn refusals() {
        assert_eq!(
            site(&STMG),
            Err(SiteError::Unrecognised {
                at: F,
                found: InsnBytes::from_slice(&STMG).unwrap()
            })
        );
        // Already redirected with jg.
        assert!(site(&[0xc0, 0xf4, 0, 0, 0, 8]).is_err());
        assert!(matches!(
            site(&[0xc0, 0x04]),
            Err(SiteError::Truncated { .. })
        ));
        assert!(
            S390x::find_site(&insn::BRCL_0_0, FuncInfo::at(F + 1)).is_err(),
            "odd address"
        );
    }

    #[test]
    fn redirect_and_restore() {
        let s = site(&insn::BRCL_0_0).unwrap();
        // brasl %r0,F+0x1000: 0x800 halfwords.
        let c = S390x::encode_redirect(&s, Redirect::call(F + 0x1000)).unwrap();
        assert_eq!(c.as_slice(), &[0xc0, 0x05, 0, 0, 0x08, 0]);
        let j = S390x::encode_redirect(&s, Redirect::jump(F - 2)).unwrap();
        assert_eq!(j.as_slice(), &[0xc0, 0xf4, 0xff, 0xff, 0xff, 0xff]);
        assert_eq!(S390x::restore(&s).as_slice(), &insn::BRCL_0_0);
        // A longer site keeps its length: branch + nopr.
        let s = site(&[0x47, 0, 0, 0, 0x47, 0, 0, 0]).unwrap();
        let j = S390x::encode_redirect(&s, Redirect::jump(F + 0x10)).unwrap();
        assert_eq!(j.as_slice(), &[0xc0, 0xf4, 0, 0, 0, 8, 0x07, 0]);
        assert!(S390x::encode_redirect(&s, Redirect::jump(F + (1 << 32) - 2)).is_ok());
        assert_eq!(
            S390x::encode_redirect(&s, Redirect::jump(F + (1 << 32))),
            Err(EncodeError::OutOfRange {
                from: F,
                to: F + (1 << 32),
                limit: 1 << 32
            })
        );
        assert!(S390x::encode_redirect(&s, Redirect::call(F + 0x11)).is_err());
    }
}
