//! The native back-end's entry path, where the host has no fast path of its own:
//! every site's stub enters the entry trampoline (the stub's value is the site).

use klp::arch::Native;
use klp_arch::Live;

/// What a site's stub hands over and where it enters: the site, the trampoline.
pub(crate) fn stub_entry(site: u64) -> (u64, u64) {
    (site, Native::trampoline())
}

/// No fast entry path: every stub enters the trampoline.
pub(crate) const FAST_ENTRY: Option<unsafe extern "C" fn()> = None;
