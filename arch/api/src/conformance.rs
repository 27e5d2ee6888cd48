//! Checks every back-end must pass, whatever its architecture.
//!
//! Each back-end's tests call [`check`] with a [`Sample`] of its own (a real unpatched
//! entry and targets around its branch range), and the core's tests call
//! [`check_robustness`] on the back-end it selected. The functions return the first
//! violated property instead of panicking, so they can also run outside tests.

use crate::model::HandStack;
use crate::{
    Arch, EncodeError, FuncInfo, Redirect, RedirectKind, Reloc, RelocCtx, RelocError, SiteError,
    UnwindError, UnwindStart, trace_reliable,
};

/// A back-end's sample for [`check`].
#[derive(Clone, Copy, Debug)]
pub struct Sample<'a> {
    /// Code at a function entry holding an unpatched site.
    pub code: &'a [u8],
    /// The function.
    pub func: FuncInfo,
    /// A target every redirect kind reaches from the site.
    pub near: u64,
    /// A target out of reach of every redirect kind.
    pub far: u64,
}

/// A violated property.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Failure(pub &'static str);

fn ensure(ok: bool, what: &'static str) -> Result<(), Failure> {
    if ok { Ok(()) } else { Err(Failure(what)) }
}

/// The site, redirect and restore properties on `s`, then [`check_robustness`].
pub fn check<A: Arch>(s: &Sample<'_>) -> Result<(), Failure> {
    let site = A::find_site(s.code, s.func).map_err(|_| Failure("sample is not a site"))?;
    ensure(
        site.len() <= A::MAX_SITE_LEN,
        "site longer than MAX_SITE_LEN",
    )?;
    ensure(!site.is_empty(), "empty site")?;
    let off = usize::from(site.offset);
    let found = s.code.get(off..).and_then(|c| c.get(..site.len()));
    ensure(
        found == Some(site.original.as_slice()),
        "original is not the code",
    )?;
    ensure(
        A::restore(&site) == site.original,
        "restore is not the original",
    )?;
    for kind in [RedirectKind::Call, RedirectKind::Jump] {
        let r = Redirect {
            kind,
            target: s.near,
            same_toc: true,
        };
        let bytes = A::encode_redirect(&site, r).map_err(|_| Failure("near target refused"))?;
        ensure(
            bytes.len() == site.len(),
            "redirect length differs from the site",
        )?;
        ensure(bytes != site.original, "redirect leaves the site unchanged")?;
        // A jump must not pass for an unpatched site. (A `Call` may: a call to the
        // trampoline has the same shape as the compiler's `call __fentry__` or
        // `mflr r0; bl _mcount`; the core remembers what it wrote.)
        if kind == RedirectKind::Jump {
            let mut patched = [0u8; 64];
            let n = s.code.len().min(patched.len());
            if let (Some(dst), Some(src)) = (patched.get_mut(..n), s.code.get(..n)) {
                dst.copy_from_slice(src);
            }
            if let Some(dst) = patched
                .get_mut(off..)
                .and_then(|p| p.get_mut(..bytes.len()))
            {
                dst.copy_from_slice(bytes.as_slice());
            }
            ensure(
                A::find_site(patched.get(..n).unwrap_or(&[]), s.func).is_err(),
                "a redirected site is recognised as unpatched",
            )?;
        }
        let far = Redirect { target: s.far, ..r };
        match A::encode_redirect(&site, far) {
            Err(EncodeError::OutOfRange { to, limit, .. }) => {
                ensure(to == s.far && limit > 0, "range error without its values")?
            }
            _ => return Err(Failure("far target not refused as out of range")),
        }
    }
    check_model_stacks::<A>()?;
    check_robustness::<A>()
}

/// [`Arch::model_stack`] round-trips through the reliable walker for every depth up to
/// the 100-entry limit, and the limit itself is reported as [`UnwindError::BufferFull`].
pub fn check_model_stacks<A: Arch>() -> Result<(), Failure> {
    let text = 0x40_0000u64..0x50_0000;
    let mut trace = [0u64; crate::MAX_STACK_ENTRIES];
    // Return addresses 4 bytes into consecutive 64-byte functions of `text`.
    for (t, addr) in trace.iter_mut().zip((0x40_0004..text.end).step_by(0x40)) {
        *t = addr;
    }
    for n in 1..=crate::MAX_STACK_ENTRIES {
        let mut mem = HandStack::new(0x7fff_0000_0000, text.clone());
        let want = trace.get(..n).unwrap_or(&[]);
        let start = A::model_stack(&mut mem, want).ok_or(Failure("model stack does not fit"))?;
        match trace_reliable::<A>(&mem, &start) {
            Ok(t) if n < crate::MAX_STACK_ENTRIES => {
                ensure(t.as_slice() == want, "model stack walks to another trace")?
            }
            Err(UnwindError::BufferFull) if n == crate::MAX_STACK_ENTRIES => {}
            _ => return Err(Failure("model stack not walked as built")),
        }
    }
    Ok(())
}

/// Properties that need no sample: bad input gives errors, never a panic, and the
/// constants are consistent.
pub fn check_robustness<A: Arch>() -> Result<(), Failure> {
    ensure(!A::NAME.is_empty(), "empty NAME")?;
    ensure(A::ELF_MACHINE != 0, "ELF_MACHINE is EM_NONE")?;
    // Every prefix of junk and of all-zero code is refused without a panic.
    let junk = [0xffu8; 24];
    for n in 0..junk.len() {
        for code in [junk.get(..n), [0u8; 24].get(..n)].into_iter().flatten() {
            match A::find_site(code, FuncInfo::at(0x1000)) {
                Err(SiteError::Unrecognised { .. } | SiteError::Truncated { .. })
                | Err(SiteError::TooShort { .. }) => {}
                Err(_) => return Err(Failure("junk refused with an unexpected error")),
                Ok(_) => return Err(Failure("junk recognised as a site")),
            }
        }
    }
    // Relocations: unknown types and fields outside the section are errors.
    let mut sec = [0u8; 8];
    let ctx = RelocCtx { toc: Some(0x1000) };
    let r = Reloc {
        r_type: u32::MAX,
        offset: 0,
        sym: 0,
        addend: 0,
        external: false,
    };
    ensure(
        A::apply_relocation(&mut sec, 0, &r, &ctx)
            == Err(RelocError::UnsupportedType { r_type: u32::MAX }),
        "unknown relocation type not refused",
    )?;
    for r_type in 0..1024 {
        for offset in [6u64, 8, u64::MAX - 2] {
            let r = Reloc {
                r_type,
                offset,
                ..r
            };
            let before = sec;
            if let Err(e) = A::apply_relocation(&mut sec, 0x1000, &r, &ctx) {
                ensure(sec == before, "a failed relocation changed the section")?;
                let _ = e.errno();
            }
        }
    }
    // Unwinding garbage: an error, never a panic or a loop.
    let mem = HandStack::new(0x8000, 0x1000..0x2000);
    for start in [
        UnwindStart::default(),
        UnwindStart {
            pc: 0x1000,
            sp: 0x8000,
            fp: 0x8000,
        },
        UnwindStart {
            pc: 0x1000,
            sp: u64::MAX,
            fp: u64::MAX,
        },
    ] {
        match trace_reliable::<A>(&mem, &start) {
            Ok(_) if A::HAVE_RELIABLE_STACKTRACE => {
                return Err(Failure("a zeroed stack walked as reliable"));
            }
            Err(UnwindError::Unsupported) if A::HAVE_RELIABLE_STACKTRACE => {
                return Err(Failure("reliable unwinder says unsupported"));
            }
            _ => {}
        }
    }
    Ok(())
}
