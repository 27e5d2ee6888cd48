//! fix_rs_in_rust.rs: fix_rs.c's replacement of rsprog's `rsprog_compute`
//! (user/examples/rsprog.rs), written in Rust: `ci/patchfile` compiles it with
//! `rustc --emit=obj` into an ordinary object and loads the klp-convert'ed result like
//! the C fix.
//!
//! The program's `square`, `BIAS` and `COMPUTED` are ordinary Rust items of the
//! program, not exported, known by their mangled names only: `ci/patchfile` finds them
//! with `nm` and passes them in the environment (`SQUARE=_ZN6rsprog6square17h…E` …),
//! which `link_name` takes; klp-convert turns the references into
//! `.klp.sym.vmlinux.<mangled name>,0`.
#![no_std]

use core::sync::atomic::{AtomicI64, AtomicU64, Ordering};

unsafe extern "C" {
    #[link_name = env!("SQUARE")]
    fn square(x: i64) -> i64;
    #[link_name = env!("BIAS")]
    static BIAS: AtomicI64;
    #[link_name = env!("COMPUTED")]
    static COMPUTED: AtomicU64;
}

/// The fixed `rsprog_compute`: the bias is added.
#[unsafe(no_mangle)]
pub extern "C" fn rsprog_compute_fixed(x: i64) -> i64 {
    // SAFETY: the three are the program's `square` (extern "C"), and its statics of
    // these types, resolved by klp in the running program.
    unsafe {
        COMPUTED.fetch_add(1, Ordering::Relaxed);
        square(x).wrapping_add(BIAS.load(Ordering::Relaxed))
    }
}
