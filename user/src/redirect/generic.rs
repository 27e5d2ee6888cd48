//! The host on a back-end without call-site retargeting: no call site is retargeted
//! (the entry's jump serves every caller).

use crate::symbols::SymbolIndex;

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
