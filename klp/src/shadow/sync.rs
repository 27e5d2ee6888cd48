//! The atomics of the epoch reclamation ([`super::epoch`]): `core`'s, or
//! [loom](https://docs.rs/loom)'s in the crate's own unit tests built with `--cfg loom`
//! (`RUSTFLAGS="--cfg loom" cargo test -p klp --lib loom_`, see `ci/test`). `loom` is a
//! dev-dependency: a build of the library itself with `--cfg loom` (as a dependency of
//! another crate's loom tests) keeps `core`'s atomics.
//!
//! Loom's atomics are not `const`-constructible, so the constructors that build them
//! are `const fn` only outside loom ([`loom_const_fn!`]); under loom the store cannot be
//! a `static`, and only the loom models are meant to run (the other unit tests would
//! use loom's atomics outside a model, which panics).

#[cfg(not(all(test, loom)))]
pub(crate) use core::sync::atomic::{AtomicPtr, AtomicUsize, Ordering, fence};
#[cfg(all(test, loom))]
pub(crate) use loom::sync::atomic::{AtomicPtr, AtomicUsize, Ordering, fence};

/// Declares a function that is `const fn` except under `cfg(all(test, loom))`.
macro_rules! loom_const_fn {
    ($(#[$m:meta])* $vis:vis fn $($rest:tt)*) => {
        #[cfg(not(all(test, loom)))]
        $(#[$m])* $vis const fn $($rest)*
        #[cfg(all(test, loom))]
        $(#[$m])* $vis fn $($rest)*
    };
}
pub(crate) use loom_const_fn;
