//! The host on a back-end without extras: every site's stub enters the entry
//! trampoline (the stub's value is the site), and no call site is retargeted (the
//! entry's jump serves every caller).

use klp::arch::Native;
use klp_arch::Live;

use crate::symbols::SymbolIndex;

/// What a site's stub hands over and where it enters: the site, the trampoline.
pub(crate) fn stub_entry(site: u64) -> (u64, u64) {
    (site, Native::trampoline())
}

/// No fast entry path: every stub enters the trampoline.
pub(crate) fn fast_entry_address() -> Option<u64> {
    None
}

/// No fast entry path (for recognising a thread inside it).
pub(crate) const FAST_ENTRY: Option<unsafe extern "C" fn()> = None;

/// No call site is retargeted: `0` of them point at `to`.
pub(crate) fn retarget_callers(
    _index: &SymbolIndex,
    _func: u64,
    _to: Option<u64>,
    _sync: &mut dyn FnMut(),
) -> usize {
    0
}

/// No call sites are known.
pub(crate) fn callers_of(_index: &SymbolIndex, _func: u64) -> Vec<u64> {
    Vec::new()
}

/// No call site calls a replacement directly.
pub(crate) fn retargeted(_func: u64) -> Vec<u64> {
    Vec::new()
}
