//! The C API of `include/klp.h`.
//!
//! Every function returns 0 or a negative errno (the kernel's convention) and never
//! unwinds: a NULL pointer or a string that is not UTF-8 is `-EINVAL`; an unexpected
//! panic (none is known) is caught and reported as `-ENOTRECOVERABLE`.

use std::ffi::{CStr, c_char, c_int};
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::Path;

use klp_user::loader::LoadOptions;

use crate::process;

/// The string argument `p` of `what`, or `-EINVAL` with a sentence on stderr when it
/// is NULL or not UTF-8.
fn str_arg<'a>(p: *const c_char, what: &str) -> Result<&'a str, c_int> {
    if p.is_null() {
        eprintln!("libklp: {what}: the argument is NULL.");
        return Err(-libc::EINVAL);
    }
    // SAFETY: the caller passes a NUL-terminated string (klp.h), non-null (checked);
    // the caller of this function only reads it during its own call.
    let s = unsafe { CStr::from_ptr(p) };
    s.to_str().map_err(|_| {
        eprintln!("libklp: {what}: the argument is not UTF-8 text.");
        -libc::EINVAL
    })
}

/// Runs `f`, turning a panic into `-ENOTRECOVERABLE` with a sentence.
fn guarded(what: &str, f: impl FnOnce() -> c_int) -> c_int {
    match catch_unwind(AssertUnwindSafe(f)) {
        Ok(r) => r,
        Err(_) => {
            eprintln!(
                "libklp: {what}: internal error (a panic); nothing can be assumed about the operation."
            );
            -libc::ENOTRECOVERABLE
        }
    }
}

/// `klp_safe_point()`: the calling thread switches to the transition's target if it is
/// pending ([`klp_user::safe_point`]). Call it where the thread runs no patched
/// function (a loop's head).
#[unsafe(no_mangle)]
pub extern "C" fn klp_safe_point() {
    let _ = catch_unwind(klp_user::safe_point);
}

/// `klp_load_patch(path)`: loads the livepatch object at `path` and enables its patch
/// ([`klp_user::Process::load_file`]). 0, or a negative errno with the reason on
/// stderr.
///
/// # Safety
///
/// `path` is null or a NUL-terminated string.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn klp_load_patch(path: *const c_char) -> c_int {
    guarded("klp_load_patch", || {
        let path = match str_arg(path, "klp_load_patch") {
            Ok(s) => s,
            Err(e) => return e,
        };
        match process().load_file(Path::new(path), &LoadOptions::default()) {
            Ok(loaded) => {
                for w in &loaded.warnings {
                    eprintln!("libklp: {}: warning: {w}", loaded.name);
                }
                0
            }
            Err(e) => {
                eprintln!("libklp: {}", e.message);
                -e.errno.0.abs()
            }
        }
    })
}

/// `klp_enable(name)`: writes 1 to the patch's `enabled` (only meaningful to reverse a
/// disabling transition, as in the kernel). 0 or a negative errno.
///
/// # Safety
///
/// `name` is null or a NUL-terminated string.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn klp_enable(name: *const c_char) -> c_int {
    guarded("klp_enable", || match str_arg(name, "klp_enable") {
        Ok(n) => process().enable(n).map_or_else(|e| -e.0.abs(), |()| 0),
        Err(e) => e,
    })
}

/// `klp_disable(name)`: writes 0 to the patch's `enabled` (starts the unpatching
/// transition). 0 or a negative errno.
///
/// # Safety
///
/// `name` is null or a NUL-terminated string.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn klp_disable(name: *const c_char) -> c_int {
    guarded("klp_disable", || match str_arg(name, "klp_disable") {
        Ok(n) => process().disable(n).map_or_else(|e| -e.0.abs(), |()| 0),
        Err(e) => e,
    })
}

/// `klp_version()`: this library's version, a static string.
#[unsafe(no_mangle)]
pub extern "C" fn klp_version() -> *const c_char {
    VERSION.as_ptr()
}

/// The version string `klp_version` returns.
pub const VERSION: &CStr =
    match CStr::from_bytes_with_nul(concat!(env!("CARGO_PKG_VERSION"), "\0").as_bytes()) {
        Ok(c) => c,
        Err(_) => c"?",
    };

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn null_and_non_utf8_arguments_are_einval() {
        // SAFETY: null and NUL-terminated strings, as the functions accept.
        unsafe {
            assert_eq!(klp_load_patch(std::ptr::null()), -libc::EINVAL);
            assert_eq!(klp_enable(std::ptr::null()), -libc::EINVAL);
            assert_eq!(klp_disable(std::ptr::null()), -libc::EINVAL);
            let bad = c"\xff\xfe";
            assert_eq!(klp_load_patch(bad.as_ptr()), -libc::EINVAL);
            assert_eq!(klp_enable(bad.as_ptr()), -libc::EINVAL);
            assert_eq!(klp_disable(bad.as_ptr()), -libc::EINVAL);
        }
    }

    #[test]
    fn a_missing_file_is_enoent_and_an_unknown_patch_is_refused() {
        // SAFETY: NUL-terminated strings.
        unsafe {
            assert_eq!(
                klp_load_patch(c"/nonexistent/fix.klp.o".as_ptr()),
                -libc::ENOENT
            );
            assert_eq!(klp_disable(c"no_such_patch".as_ptr()), -libc::ENOENT);
            assert_eq!(klp_enable(c"no_such_patch".as_ptr()), -libc::ENOENT);
        }
    }

    #[test]
    fn the_version_is_the_crate_version() {
        // SAFETY: `klp_version` returns a static NUL-terminated string.
        let v = unsafe { CStr::from_ptr(klp_version()) };
        assert_eq!(v.to_str().ok(), Some(env!("CARGO_PKG_VERSION")));
        klp_safe_point();
    }
}
