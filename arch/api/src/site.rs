//! Patch sites and redirects: the types shared by every architecture.

use core::fmt;

use crate::InsnBytes;

/// What the core knows about a function whose entry it wants to patch.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FuncInfo {
    /// Address of the function symbol (on ppc64le: the global entry point).
    pub addr: u64,
    /// The symbol's `st_other` byte (ppc64le keeps the local-entry offset there).
    pub st_other: u8,
}

impl FuncInfo {
    /// A function at `addr` with `st_other == 0`.
    pub const fn at(addr: u64) -> Self {
        FuncInfo { addr, st_other: 0 }
    }
}

/// Which unpatched entry form a back-end recognised at a site.
///
/// The forms are the back-end's own: `code` is one of the constants its `site.rs`
/// documents (`klp_arch_x86_64::site::form::NOPS`, …), so this crate lists no
/// architecture. The core only carries the value from `find_site` to the back-end's
/// `encode_redirect`; a host may match on the constants of the back-end it runs on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SiteForm {
    /// The back-end's number for the form (codes start at 1; 0 is never a form).
    pub code: u8,
    /// Whether a landing pad (`endbr64`, `bti c`) precedes the site.
    pub landing_pad: bool,
    /// The address a call in the unpatched form goes to (`call __fentry__`,
    /// `bl _mcount`), else 0.
    pub target: u64,
}

impl SiteForm {
    /// Form `code` with no landing pad and no call target.
    pub const fn new(code: u8) -> Self {
        SiteForm {
            code,
            landing_pad: false,
            target: 0,
        }
    }

    /// The same form, with or without a landing pad before it.
    pub const fn landing_pad(self, landing_pad: bool) -> Self {
        SiteForm {
            landing_pad,
            ..self
        }
    }

    /// The same form, whose unpatched bytes call `target`.
    pub const fn calling(self, target: u64) -> Self {
        SiteForm { target, ..self }
    }
}

/// A recognised, unpatched patch site.
///
/// # Invariants
///
/// `original.len() == len` and `offset + len` bytes of code were present at `func.addr`
/// when the site was recognised.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Site {
    /// The function the site belongs to.
    pub func: FuncInfo,
    /// Offset of the first byte that a redirect rewrites, from `func.addr`
    /// (past `endbr64`/`bti c`; on ppc64le: the local entry point).
    pub offset: u8,
    /// Which form was found.
    pub form: SiteForm,
    /// The bytes a redirect rewrites, as found; writing them back restores the site.
    pub original: InsnBytes,
}

impl Site {
    /// Address of the first byte a redirect rewrites.
    pub fn addr(&self) -> u64 {
        self.func.addr.wrapping_add(u64::from(self.offset))
    }

    /// Number of bytes a redirect rewrites.
    pub fn len(&self) -> usize {
        self.original.len()
    }

    /// Always false for a recognised site.
    pub fn is_empty(&self) -> bool {
        self.original.is_empty()
    }
}

/// How a redirect reaches its target.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RedirectKind {
    /// Branch-and-link to a trampoline, which later resumes either after the site or at
    /// the implementation the core chose (the ftrace model; the caller's return address
    /// is kept where the arch's trampoline contract says).
    Call,
    /// A plain branch straight to the new function: the steady state once a function
    /// has a single live implementation. The caller's return address stays untouched.
    Jump,
}

/// A request to redirect a site.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Redirect {
    /// Call a trampoline, or jump to the new function.
    pub kind: RedirectKind,
    /// The trampoline or the new function (on ppc64le: its local entry).
    pub target: u64,
    /// Whether the target runs with the same TOC as the patched function. Only ppc64le
    /// cares: a `Jump` to code with another TOC needs the livepatch handler instead.
    pub same_toc: bool,
}

impl Redirect {
    /// A call to a trampoline at `target`.
    pub const fn call(target: u64) -> Self {
        Redirect {
            kind: RedirectKind::Call,
            target,
            same_toc: true,
        }
    }

    /// A direct jump to a new function at `target` that shares the caller's TOC.
    pub const fn jump(target: u64) -> Self {
        Redirect {
            kind: RedirectKind::Jump,
            target,
            same_toc: true,
        }
    }
}

/// Why code at a function entry is not a patch site we can use.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum SiteError {
    /// The bytes at `at` are none of the arch's unpatched entry forms.
    Unrecognised { at: u64, found: InsnBytes },
    /// A run of nops was found but is shorter than the redirect needs.
    TooShort {
        at: u64,
        found: InsnBytes,
        needed: u8,
    },
    /// Fewer bytes of code were supplied than the form needs.
    Truncated { at: u64, have: usize, needed: usize },
    /// ppc64le: `st_other` encodes a local-entry offset we do not support.
    LocalEntry { st_other: u8 },
    /// ppc64le: the global entry does not hold the TOC setup its `st_other` promises.
    NoTocSetup { at: u64, found: InsnBytes },
    /// The build has no back-end for this architecture.
    Unsupported,
}

impl SiteError {
    /// The errno the kernel would return (`-EINVAL` for every site problem).
    pub const fn errno(&self) -> i32 {
        match self {
            SiteError::Unsupported => crate::errno::ENOSYS,
            _ => crate::errno::EINVAL,
        }
    }
}

impl fmt::Display for SiteError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SiteError::Unrecognised { at, found } => {
                write!(f, "no patch site at {at:#x}: found {found}")
            }
            SiteError::TooShort { at, found, needed } => write!(
                f,
                "patch site at {at:#x} too short: found {found}, need {needed} bytes"
            ),
            SiteError::Truncated { at, have, needed } => write!(
                f,
                "code at {at:#x} truncated: have {have} bytes, need {needed}"
            ),
            SiteError::LocalEntry { st_other } => {
                write!(f, "unsupported local entry (st_other {st_other:#x})")
            }
            SiteError::NoTocSetup { at, found } => {
                write!(f, "no TOC setup at global entry {at:#x}: found {found}")
            }
            SiteError::Unsupported => f.write_str("no architecture back-end in this build"),
        }
    }
}

/// A branch displacement that does not fit, or a target that is misaligned.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum EncodeError {
    /// `to - from` is outside `[-limit, limit)`.
    OutOfRange { from: u64, to: u64, limit: u64 },
    /// The target (or the displacement) is not a multiple of `align`.
    Misaligned { from: u64, to: u64, align: u64 },
    /// ppc64le: a direct jump to code with another TOC; use the livepatch handler.
    NeedsTocHandler { to: u64 },
    /// The build has no back-end for this architecture.
    Unsupported,
}

impl EncodeError {
    /// The errno the kernel would return.
    pub const fn errno(&self) -> i32 {
        match self {
            EncodeError::Unsupported => crate::errno::ENOSYS,
            _ => crate::errno::ERANGE,
        }
    }
}

impl fmt::Display for EncodeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            EncodeError::OutOfRange { from, to, limit } => write!(
                f,
                "branch from {from:#x} to {to:#x} out of range (limit ±{limit:#x})"
            ),
            EncodeError::Misaligned { from, to, align } => write!(
                f,
                "branch from {from:#x} to {to:#x} not aligned to {align} bytes"
            ),
            EncodeError::NeedsTocHandler { to } => write!(
                f,
                "direct jump to {to:#x} would lose the TOC; use the livepatch handler"
            ),
            EncodeError::Unsupported => f.write_str("no architecture back-end in this build"),
        }
    }
}

/// Checks that `to - from` lies in `[-limit, limit)` and is a multiple of `align`,
/// and returns it. Shared by every arch's branch encoder.
pub fn displacement(from: u64, to: u64, limit: u64, align: u64) -> Result<i64, EncodeError> {
    let out_of_range = EncodeError::OutOfRange { from, to, limit };
    // Computed as a distance and a direction: the addresses never wrap around.
    let dist = to.abs_diff(from);
    let forward = to >= from;
    // `[-limit, limit)`: a forward distance below the limit, a backward one up to it.
    if (forward && dist >= limit) || (!forward && dist > limit) {
        return Err(out_of_range);
    }
    if align > 1 && !dist.is_multiple_of(align) {
        return Err(EncodeError::Misaligned { from, to, align });
    }
    // |d| <= limit fits only if limit <= 2^63; every arch's limit does.
    let d = if forward {
        i64::try_from(dist).ok()
    } else {
        0i64.checked_sub_unsigned(dist)
    };
    d.ok_or(out_of_range)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn displacement_edges() {
        let lim = 1 << 27;
        assert_eq!(
            displacement(0x1000, 0x1000 + lim - 4, lim, 4),
            Ok(lim as i64 - 4)
        );
        assert!(matches!(
            displacement(0x1000, 0x1000 + lim, lim, 4),
            Err(EncodeError::OutOfRange { .. })
        ));
        assert_eq!(
            displacement(lim + 0x10, 0x10, lim, 4),
            Ok(-(lim as i64)),
            "the negative limit itself is reachable"
        );
        assert!(displacement(lim + 0x10, 0xc, lim, 4).is_err());
        assert_eq!(
            displacement(0, 2, 16, 4),
            Err(EncodeError::Misaligned {
                from: 0,
                to: 2,
                align: 4
            })
        );
        assert!(displacement(u64::MAX, 0, lim, 1).is_err(), "no wrap-around");
        assert!(displacement(0, u64::MAX, lim, 1).is_err(), "no wrap-around");
    }

    #[test]
    fn displacement_at_the_ends_of_i64() {
        let half = 1u64 << 63;
        assert_eq!(displacement(half, 0, half, 1), Ok(i64::MIN));
        assert_eq!(displacement(0, half - 1, half, 1), Ok(i64::MAX));
        let out = |from, to| {
            Err(EncodeError::OutOfRange {
                from,
                to,
                limit: u64::MAX,
            })
        };
        assert_eq!(displacement(0, half, u64::MAX, 1), out(0, half));
        assert_eq!(displacement(half + 1, 0, u64::MAX, 1), out(half + 1, 0));
        assert_eq!(
            displacement(0, half + 2, u64::MAX, 4),
            Err(EncodeError::Misaligned {
                from: 0,
                to: half + 2,
                align: 4
            }),
            "the alignment is checked before the i64 conversion"
        );
    }
}
