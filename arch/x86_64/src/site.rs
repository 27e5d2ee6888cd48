//! x86_64 patch sites.
//!
//! Recognised unpatched forms (after an optional `endbr64`, which stays untouched):
//!
//! | form | bytes | from |
//! |---|---|---|
//! | [`form::NOPS`] | a run of nops of at least 5 bytes (`0f 1f 44 00 00`, `90 90 90 90 90`, `66 90 66 90 90`, …) | `-mfentry -mnop-mcount`, ftrace's idle site, `-fpatchable-function-entry=N`, LLVM's byte-counted `-Zpatchable-function-entry` |
//! | [`form::FENTRY`] | `e8 rel32` (`call __fentry__`) | `-pg -mfentry` |
//!
//! The site is the shortest prefix of the nop run that holds a 5-byte branch and ends
//! on an instruction boundary; a redirect writes `call`/`jmp rel32` and fills the rest
//! of the site with one-byte nops, so code after the site still starts where it did.

use klp_arch::{
    EncodeError, FuncInfo, InsnBytes, Redirect, RedirectKind, Site, SiteError, SiteForm,
};

use crate::insn;

/// The forms of the table above: the `code` of a [`SiteForm`] (its `landing_pad`
/// says whether `endbr64` precedes the site; `target` is `__fentry__`'s address).
pub mod form {
    /// A run of nops.
    pub const NOPS: u8 = 1;
    /// `call __fentry__`.
    pub const FENTRY: u8 = 2;
}

/// Longest site: a nop run of up to 4 bytes followed by an 11-byte nop.
pub const MAX_LEN: usize = 15;

/// Recognises the site at the entry of `func` (see the module docs).
pub fn find(code: &[u8], func: FuncInfo) -> Result<Site, SiteError> {
    let (endbr, off) = if code.starts_with(&insn::ENDBR64) {
        (true, insn::ENDBR64.len())
    } else {
        (false, 0)
    };
    let at = func.addr.wrapping_add(off as u64);
    let body = code.get(off..).unwrap_or(&[]);
    let found = InsnBytes::prefix_of(body);
    if body.first() == Some(&insn::CALL_REL32) {
        let Some(target) = insn::rel32_target(body, at, insn::CALL_REL32) else {
            return Err(SiteError::Truncated {
                at,
                have: body.len(),
                needed: insn::BRANCH_LEN,
            });
        };
        return Ok(Site {
            func,
            offset: off as u8,
            form: SiteForm::new(form::FENTRY)
                .landing_pad(endbr)
                .calling(target),
            original: InsnBytes::prefix_of(body.get(..insn::BRANCH_LEN).unwrap_or(&[])),
        });
    }
    let mut len = 0usize;
    while len < insn::BRANCH_LEN {
        match body
            .get(len..)
            .and_then(insn::nop_len)
            .and_then(|n| len.checked_add(n))
        {
            Some(next) => len = next,
            None => break,
        }
    }
    if len == 0 {
        if body.len() < insn::BRANCH_LEN {
            return Err(SiteError::Truncated {
                at,
                have: body.len(),
                needed: insn::BRANCH_LEN,
            });
        }
        return Err(SiteError::Unrecognised { at, found });
    }
    if len < insn::BRANCH_LEN {
        return Err(SiteError::TooShort {
            at,
            found,
            needed: insn::BRANCH_LEN as u8,
        });
    }
    let original = body
        .get(..len)
        .and_then(InsnBytes::from_slice)
        .ok_or(SiteError::Unrecognised { at, found })?;
    Ok(Site {
        func,
        offset: off as u8,
        form: SiteForm::new(form::NOPS).landing_pad(endbr),
        original,
    })
}

/// The bytes performing `redirect` at `site`: `call`/`jmp rel32`, then `nop`s.
pub fn encode(site: &Site, redirect: Redirect) -> Result<InsnBytes, EncodeError> {
    let from = site.addr();
    let branch = match redirect.kind {
        RedirectKind::Call => insn::call(from, redirect.target)?,
        RedirectKind::Jump => insn::jmp(from, redirect.target)?,
    };
    let mut out = InsnBytes::EMPTY;
    let mut fill = || -> Option<()> {
        out.extend(&branch)?;
        while out.len() < site.len() {
            out.extend(&[insn::NOP1])?;
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

/// The bytes that undo a redirect and leave the site one instruction: a site of several
/// nops (gcc's `-fpatchable-function-entry=5` emits five `90`) becomes the one nop of its
/// length, as Linux's ftrace rewrites its call sites to its ideal nop at boot; any other
/// site gets its original bytes back. Once a site is one instruction no thread can be
/// inside it, so a writer can replace it with one store and a core serialisation
/// instead of the breakpoint protocol's rounds (which signal every thread three times).
pub fn settled(site: &Site) -> InsnBytes {
    if site.form.code == form::NOPS
        && let Some(nop) = site.len().checked_sub(1).and_then(|i| insn::NOPS.get(i))
        && let Some(b) = InsnBytes::from_slice(nop)
    {
        return b;
    }
    site.original
}

/// Whether `current`, the bytes at `site` now, are one instruction covering the whole
/// site (a nop of its length, or a `call`/`jmp rel32` of a 5-byte site): then no thread
/// can be stopped inside the site, and one store may replace it.
pub fn is_one_instruction(site: &Site, current: &[u8]) -> bool {
    let len = site.len();
    current.len() == len
        && (insn::nop_len(current) == Some(len)
            || (len == insn::BRANCH_LEN
                && matches!(current.first(), Some(&insn::CALL_REL32 | &insn::JMP_REL32))))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::X86_64;
    use klp_arch::Arch;

    const F: u64 = 0xffff_ffff_8100_0000;

    fn site(code: &[u8]) -> Result<Site, SiteError> {
        X86_64::find_site(code, FuncInfo::at(F))
    }

    #[test]
    fn nop5() {
        let s = site(&[0x0f, 0x1f, 0x44, 0x00, 0x00, 0x55, 0x48, 0x89, 0xe5]).unwrap();
        assert_eq!(s.form, SiteForm::new(form::NOPS));
        assert_eq!((s.addr(), s.len()), (F, 5));
        assert_eq!(s.original.as_slice(), &[0x0f, 0x1f, 0x44, 0x00, 0x00]);
    }

    #[test]
    fn endbr_then_nop5() {
        let s = site(&[0xf3, 0x0f, 0x1e, 0xfa, 0x0f, 0x1f, 0x44, 0x00, 0x00, 0x55]).unwrap();
        assert_eq!(s.form, SiteForm::new(form::NOPS).landing_pad(true));
        assert_eq!((s.offset, s.len()), (4, 5));
    }

    #[test]
    fn fentry_call() {
        // call __fentry__ at F+0x1000: rel32 = 0x1000 - 5 = 0xffb.
        let s = site(&[0xe8, 0xfb, 0x0f, 0x00, 0x00, 0x55]).unwrap();
        assert_eq!(s.form, SiteForm::new(form::FENTRY).calling(F + 0x1000));
        let s = site(&[0xf3, 0x0f, 0x1e, 0xfa, 0xe8, 0, 0, 0, 0]).unwrap();
        assert_eq!(
            s.form,
            SiteForm::new(form::FENTRY).landing_pad(true).calling(F + 9)
        );
    }

    #[test]
    fn gcc_one_byte_nops() {
        let s = site(&[0x90; 16]).unwrap();
        assert_eq!(s.len(), 5, "only as many nops as the branch needs");
    }

    #[test]
    fn llvm_byte_counted_nops() {
        // -Zpatchable-function-entry=2 gives `66 90`: too short for a branch.
        let e = site(&[0x66, 0x90, 0x55, 0x48, 0x89, 0xe5]).unwrap_err();
        assert_eq!(
            e,
            SiteError::TooShort {
                at: F,
                found: InsnBytes::from_slice(&[0x66, 0x90, 0x55, 0x48, 0x89, 0xe5]).unwrap(),
                needed: 5
            }
        );
        // =7: `0f 1f 80 00 00 00 00`, one instruction: the site is all 7 bytes.
        let s = site(&[0x0f, 0x1f, 0x80, 0, 0, 0, 0, 0x55]).unwrap();
        assert_eq!(s.len(), 7);
        // =6 as `66 90` + `0f 1f 40 00`: the boundary after 6 bytes.
        let s = site(&[0x66, 0x90, 0x0f, 0x1f, 0x40, 0x00, 0x55]).unwrap();
        assert_eq!(s.len(), 6);
    }

    #[test]
    fn refuses_other_code_with_the_bytes() {
        let code = [0x55, 0x48, 0x89, 0xe5, 0x90, 0x90];
        assert_eq!(
            site(&code),
            Err(SiteError::Unrecognised {
                at: F,
                found: InsnBytes::from_slice(&code).unwrap()
            })
        );
        // Already redirected: a jmp is not an unpatched form.
        assert!(matches!(
            site(&[0xe9, 0, 0, 0, 0]),
            Err(SiteError::Unrecognised { .. })
        ));
        assert!(matches!(
            site(&[0xe8, 0, 0]),
            Err(SiteError::Truncated { needed: 5, .. })
        ));
        assert!(matches!(site(&[]), Err(SiteError::Truncated { .. })));
        let shown = std::format!("{}", site(&code).unwrap_err());
        assert!(shown.contains("55 48 89 e5 90 90"), "{shown}");
    }

    #[test]
    fn redirect_and_restore() {
        let code = [0x66, 0x0f, 0x1f, 0x44, 0x00, 0x00, 0x55];
        let s = site(&code).unwrap();
        let call = X86_64::encode_redirect(&s, Redirect::call(F + 0x106)).unwrap();
        // e8, rel32 = 0x106 - 5 = 0x101, then one nop to keep the boundary at 6.
        assert_eq!(call.as_slice(), &[0xe8, 0x01, 0x01, 0x00, 0x00, 0x90]);
        let jmp = X86_64::encode_redirect(&s, Redirect::jump(F - 0x1000)).unwrap();
        assert_eq!(jmp.as_slice(), &[0xe9, 0xfb, 0xef, 0xff, 0xff, 0x90]);
        assert_eq!(X86_64::restore(&s).as_slice(), &code[..6]);
        let far = Redirect::jump(F + 5 - (1 << 31) - 1);
        assert_eq!(
            X86_64::encode_redirect(&s, far),
            Err(EncodeError::OutOfRange {
                from: F,
                to: F + 5 - (1 << 31) - 1,
                limit: 1 << 31
            })
        );
    }

    #[test]
    fn a_site_settles_as_one_instruction() {
        // gcc's five one-byte nops: five instructions, settled as the 5-byte nop.
        let s = site(&[0x90, 0x90, 0x90, 0x90, 0x90, 0x55]).unwrap();
        assert!(!is_one_instruction(&s, s.original.as_slice()));
        assert_eq!(settled(&s).as_slice(), &insn::NOP5);
        assert!(is_one_instruction(&s, settled(&s).as_slice()));
        // `66 90 66 90 90` (three nops) likewise; after an endbr64 too.
        let s = site(&[0xf3, 0x0f, 0x1e, 0xfa, 0x66, 0x90, 0x66, 0x90, 0x90]).unwrap();
        assert_eq!(settled(&s).as_slice(), &insn::NOP5);
        // A 6-byte site (`66 90` + `0f 1f 40 00`) settles as the 6-byte nop.
        let s = site(&[0x66, 0x90, 0x0f, 0x1f, 0x40, 0x00, 0x55]).unwrap();
        assert_eq!(
            settled(&s).as_slice(),
            &[0x66, 0x0f, 0x1f, 0x44, 0x00, 0x00]
        );
        assert!(is_one_instruction(&s, settled(&s).as_slice()));
        // Already one instruction: unchanged.
        let s = site(&insn::NOP5).unwrap();
        assert_eq!(settled(&s), s.original);
        assert!(is_one_instruction(&s, s.original.as_slice()));
        // `call __fentry__` is restored as found, and is one instruction.
        let s = site(&[0xe8, 0x10, 0x20, 0x00, 0x00, 0x55]).unwrap();
        assert_eq!(settled(&s), s.original);
        assert!(is_one_instruction(&s, s.original.as_slice()));
        // A redirect of a 5-byte site is one instruction; of a longer one it is not
        // (the jump, then a nop).
        let s5 = site(&[0x90; 5]).unwrap();
        let jmp = X86_64::encode_redirect(&s5, Redirect::jump(F + 0x100)).unwrap();
        assert!(is_one_instruction(&s5, jmp.as_slice()));
        let s6 = site(&[0x66, 0x0f, 0x1f, 0x44, 0x00, 0x00]).unwrap();
        let jmp = X86_64::encode_redirect(&s6, Redirect::jump(F + 0x100)).unwrap();
        assert!(!is_one_instruction(&s6, jmp.as_slice()));
        // Bytes of another length never are.
        assert!(!is_one_instruction(&s5, &insn::NOP5[..4]));
    }

    extern crate std;
}
