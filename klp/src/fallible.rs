//! Growing collections without an infallible allocation.
//!
//! The core is built with `no_global_oom_handling` for the kernel, where `Vec::push`,
//! `String::from`, `clone` and `collect` do not exist: every allocation must be able to
//! fail and be reported as `-ENOMEM`. These helpers are the few ways the core grows a
//! collection; each one reserves first and fails with [`Errno::ENOMEM`] before anything
//! changes.

use alloc::string::String;
use alloc::vec::Vec;

use crate::errno::{Errno, KResult};

/// Appends `x` to `v`, allocating room for it first. On failure `v` is unchanged and
/// `x` is dropped.
pub fn try_push<T>(v: &mut Vec<T>, x: T) -> KResult<()> {
    v.try_reserve(1).map_err(|_| Errno::ENOMEM)?;
    push_reserved(v, x).map_err(|_| Errno::ENOMEM)
}

/// Appends `x` to `v` only if `v` has room for it already (never allocates); gives `x`
/// back otherwise.
pub fn push_reserved<T>(v: &mut Vec<T>, x: T) -> Result<(), T> {
    let len = v.len();
    let Some(slot) = v.spare_capacity_mut().first_mut() else {
        return Err(x);
    };
    slot.write(x);
    // SAFETY: `set_len` requires (1) `new_len <= capacity()` and (2) the elements at
    // `old_len..new_len` to be initialised. (1) The spare capacity had a first slot, so
    // `len < capacity()`. (2) That slot, index `len`, was just written.
    unsafe { v.set_len(len.saturating_add(1)) };
    Ok(())
}

/// Makes sure `v` can hold `total` elements without allocating again.
pub fn reserve_total<T>(v: &mut Vec<T>, total: usize) -> KResult<()> {
    let more = total.saturating_sub(v.len());
    v.try_reserve(more).map_err(|_| Errno::ENOMEM)
}

/// An owned copy of `s` (`kstrdup`).
pub fn try_string(s: &str) -> KResult<String> {
    let mut bytes: Vec<u8> = Vec::new();
    bytes
        .try_reserve_exact(s.len())
        .map_err(|_| Errno::ENOMEM)?;
    for b in s.bytes() {
        // Cannot fail: the room for every byte is reserved.
        push_reserved(&mut bytes, b).map_err(|_| Errno::ENOMEM)?;
    }
    String::from_utf8(bytes).map_err(|_| Errno::EINVAL)
}

/// `Some(copy)` of an optional string.
pub fn try_opt_string(s: Option<&str>) -> KResult<Option<String>> {
    s.map(try_string).transpose()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn push_and_copy() {
        let mut v = Vec::new();
        for i in 0..100 {
            try_push(&mut v, i).unwrap();
        }
        assert_eq!(v, (0..100).collect::<Vec<_>>());
        let mut w: Vec<u8> = Vec::new();
        assert_eq!(push_reserved(&mut w, 7), Err(7));
        reserve_total(&mut w, 2).unwrap();
        assert_eq!(push_reserved(&mut w, 7), Ok(()));
        assert_eq!(push_reserved(&mut w, 8), Ok(()));
        assert_eq!(w, [7, 8]);
        assert_eq!(try_string("héllo").unwrap(), "héllo");
        assert_eq!(try_string("").unwrap(), "");
        assert_eq!(try_opt_string(None).unwrap(), None);
    }
}
