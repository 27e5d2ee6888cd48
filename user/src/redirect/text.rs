//! Text made writable for a write: the pages of a site (or of a stub) are readable,
//! writable *and* executable while the write runs (other threads keep running them),
//! then read + execute again.

use std::sync::atomic::{AtomicI32, AtomicU32, Ordering};

use klp::Errno;

/// The errno of the injected failure (0: none armed) and how many text writes pass
/// before it ([`fail_text_write`]).
static FAIL_ERRNO: AtomicI32 = AtomicI32::new(0);
static FAIL_SKIP: AtomicU32 = AtomicU32::new(0);

/// Fault injection: the text write after the next `skip` ones fails as if `mprotect(2)`
/// had returned `errno` (once; `errno` 0 disarms). Everything after the failed call is
/// the real error path. For tests of what a refused `mprotect` leaves behind.
pub fn fail_text_write(skip: u32, errno: i32) {
    FAIL_SKIP.store(skip, Ordering::SeqCst);
    FAIL_ERRNO.store(errno, Ordering::SeqCst);
}

fn injected_failure() -> Option<Errno> {
    let e = FAIL_ERRNO.load(Ordering::SeqCst);
    if e == 0 {
        return None;
    }
    if FAIL_SKIP
        .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
        .is_ok()
    {
        return None;
    }
    FAIL_ERRNO
        .compare_exchange(e, 0, Ordering::SeqCst, Ordering::SeqCst)
        .ok()
        .map(Errno::from_ret)
}

/// The page size (at least 4 KiB).
pub(crate) fn page_size() -> u64 {
    // SAFETY: `sysconf` has no preconditions.
    (unsafe { libc::sysconf(libc::_SC_PAGESIZE) }).max(4096) as u64
}

/// The text pages made writable for a write of `[at, at + len)` (read + execute again
/// when dropped).
///
/// Under ThreadSanitizer (`cfg(klp_tsan)`), the writing thread's memory accesses are
/// hidden from it while the value lives: it has no shadow memory for text, and its
/// instrumented stores to the site (atomics over code bytes) crashed inside the runtime
/// (`SEGV` in `StoreShadow`, ci/test's TSan run). Code that is executed, not read, by
/// the other threads is outside what it can check anyway.
#[derive(Debug)]
pub(crate) struct Writable {
    start: u64,
    len: usize,
}

#[cfg(klp_tsan)]
mod tsan {
    use std::ffi::{c_char, c_int};

    // ThreadSanitizer's annotation interface (its runtime defines them).
    unsafe extern "C" {
        fn AnnotateIgnoreReadsBegin(file: *const c_char, line: c_int);
        fn AnnotateIgnoreReadsEnd(file: *const c_char, line: c_int);
        fn AnnotateIgnoreWritesBegin(file: *const c_char, line: c_int);
        fn AnnotateIgnoreWritesEnd(file: *const c_char, line: c_int);
    }

    pub(super) fn ignore_begin() {
        // SAFETY: the annotations take a file name (any string, or null) and a line.
        unsafe {
            AnnotateIgnoreReadsBegin(c"text.rs".as_ptr(), 0);
            AnnotateIgnoreWritesBegin(c"text.rs".as_ptr(), 0);
        }
    }

    pub(super) fn ignore_end() {
        // SAFETY: as above; each end follows its begin on the same thread (a
        // `Writable` is dropped in the function that made it).
        unsafe {
            AnnotateIgnoreWritesEnd(c"text.rs".as_ptr(), 0);
            AnnotateIgnoreReadsEnd(c"text.rs".as_ptr(), 0);
        }
    }
}

impl Writable {
    /// Makes the pages of `[at, at + len)` readable, writable and executable (other
    /// threads keep running them); the kernel's error if it refuses.
    ///
    /// # Safety
    ///
    /// 1. `[at, at + len)` lies in read + execute pages: text of a loaded object or a
    ///    stub page of klp (they are made read + execute again when the value drops).
    pub(crate) unsafe fn new(at: u64, len: u64) -> Result<Writable, Errno> {
        let page = page_size();
        let start = at & !(page - 1);
        let end = at
            .checked_add(len)
            .and_then(|e| e.checked_add(page - 1))
            .ok_or(Errno::EINVAL)?
            & !(page - 1);
        let len = usize::try_from(end - start).map_err(|_| Errno::EINVAL)?;
        if let Some(e) = injected_failure() {
            return Err(e);
        }
        let rwx = libc::PROT_READ | libc::PROT_WRITE | libc::PROT_EXEC;
        // SAFETY: the range covers whole read + execute pages (condition 1); they stay
        // executable while writable, so threads running them are not disturbed.
        if unsafe { libc::mprotect(start as *mut libc::c_void, len, rwx) } != 0 {
            let e = std::io::Error::last_os_error()
                .raw_os_error()
                .unwrap_or(libc::EPERM);
            return Err(Errno::from_ret(e));
        }
        #[cfg(klp_tsan)]
        tsan::ignore_begin();
        Ok(Writable { start, len })
    }
}

impl Drop for Writable {
    fn drop(&mut self) {
        #[cfg(klp_tsan)]
        tsan::ignore_end();
        // SAFETY: the pages were read + execute before `new` (its condition 1) and
        // are again.
        unsafe {
            libc::mprotect(
                self.start as *mut libc::c_void,
                self.len,
                libc::PROT_READ | libc::PROT_EXEC,
            )
        };
    }
}
