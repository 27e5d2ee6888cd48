//! Text made writable for a write: the pages of a site (or of a stub) are readable,
//! writable *and* executable while the write runs (other threads keep running them),
//! then read + execute again.

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
    /// threads keep running them); `None` if the kernel refuses.
    ///
    /// # Safety
    ///
    /// 1. `[at, at + len)` lies in read + execute pages: text of a loaded object or a
    ///    stub page of klp (they are made read + execute again when the value drops).
    pub(crate) unsafe fn new(at: u64, len: u64) -> Option<Writable> {
        let page = page_size();
        let start = at & !(page - 1);
        let end = at.checked_add(len)?.checked_add(page - 1)? & !(page - 1);
        let len = usize::try_from(end - start).ok()?;
        let rwx = libc::PROT_READ | libc::PROT_WRITE | libc::PROT_EXEC;
        // SAFETY: the range covers whole read + execute pages (condition 1); they stay
        // executable while writable, so threads running them are not disturbed.
        let w = (unsafe { libc::mprotect(start as *mut libc::c_void, len, rwx) } == 0)
            .then_some(Writable { start, len });
        #[cfg(klp_tsan)]
        if w.is_some() {
            tsan::ignore_begin();
        }
        w
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
