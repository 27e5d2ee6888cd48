//! Architectures without an entry trampoline: no function has a usable site, so
//! enabling a patch of a loaded function fails like the kernel without an ftrace
//! location (`failed to find location for function '…'`, `-EINVAL`).

use klp::Errno;
use klp::arch::Site;

use super::SiteState;
use crate::symbols::SymbolIndex;

/// Without a trampoline a "patchable" function is a plain `extern "C"` function that
/// calls its body.
#[doc(hidden)]
#[macro_export]
macro_rules! __patchable_wrapper {
    ($(#[$m:meta])* $vis:vis fn $name:ident($($arg:ident : $ty:ty),*) $(-> $ret:ty)?) => {
        $(#[$m])*
        #[unsafe(no_mangle)]
        #[inline(never)]
        $vis extern "C" fn $name($($arg: $ty),*) $(-> $ret)? {
            $name::body($($arg),*)
        }
    };
}

/// No text writer on this architecture.
pub(crate) const WRITE_TEXT: Option<unsafe fn(*mut u8, &[u8])> = None;

/// No site on this architecture.
pub(crate) fn find(_index: &SymbolIndex, _addr: u64) -> Option<Site> {
    None
}

/// No wrapper bodies on this architecture.
pub(crate) fn body_of(_index: &SymbolIndex, _site: &Site) -> Option<(u64, u64)> {
    None
}

/// Never reached (no site is ever found); refuses.
pub(crate) fn set(
    _site: &Site,
    _from: SiteState,
    _to: SiteState,
    _sync: &mut dyn FnMut(),
) -> Result<(), Errno> {
    Err(Errno::ENOSYS)
}

/// Nothing to fix up.
///
/// # Safety
///
/// 1. `uc` is the `ucontext_t` of an `SA_SIGINFO` handler (unused).
pub(crate) unsafe fn on_sync(_uc: *mut libc::c_void) {}

/// The word the trampoline's decision returns for `target` at `site`: the address
/// itself (this architecture needs no tag).
pub(crate) fn published_target(_index: &SymbolIndex, _site: u64, target: u64) -> u64 {
    target
}

/// No fast entry path on this architecture: every stub enters the trampoline.
pub(crate) const FAST_ENTRY: Option<unsafe extern "C" fn()> = None;
