//! Per-site stubs near their sites: how a site reaches the entry trampoline from
//! anywhere in the address space.
//!
//! A site's branch has a limited reach (x86_64 `jmp rel32` ±2 GiB, aarch64 `bl`
//! ±128 MiB, ppc64le `bl` ±32 MiB, s390x `brasl` ±4 GiB), and the trampoline lives in
//! the executable: a function of a shared library mapped far from it could not branch
//! there. So a site in its trampoline state branches (with its usual call form) to a
//! small *stub* placed within its reach, and the stub jumps to the trampoline with an
//! absolute address, keeping the registers of the trampoline's entry contract (each
//! architecture's `stub_bytes` documents what it clobbers). These pages are the
//! per-library trampolines (the kernel's module PLTs / ftrace trampolines).
//!
//! Every site gets its stub, whether or not the trampoline is within reach: one path
//! for every site (so the stub is exercised by every trampoline call, not only by far
//! libraries), and on x86_64 the stub also carries the site's address. The cost is one
//! more direct-then-indirect branch on the trampoline path only; the steady state is a
//! direct jump from the site and never passes a stub.
//!
//! Stubs are allocated once per site address and never freed (a thread may still be on
//! its way through one; after a library is unloaded its stubs stay mapped and are
//! reused if a site appears at the same address). They are packed into anonymous pages
//! mapped near the site (`MAP_FIXED_NOREPLACE` hints at growing distances, keeping only
//! a page that lies wholly within reach). A new stub is written while no site branches
//! to it, with the architecture's text writer (which does the cache maintenance), then
//! every registered thread goes through a synchronisation round (a context
//! synchronisation on each, as the kernel's `flush_icache_range` does on arm64) before
//! the caller makes any site branch to it. Callers hold their architecture's text lock.

use std::collections::HashMap;
use std::sync::Mutex;

use klp::Errno;

/// Writes freshly made text (`dst..dst + bytes.len()` mapped and writable, executed
/// by nobody) and makes it visible to instruction fetch: the architecture's
/// `live::write_text`.
pub(crate) type TextWriter = unsafe fn(*mut u8, &[u8]);

/// The stubs by site and the stub pages `(start, bytes used)`.
#[derive(Debug, Default)]
struct Pool {
    by_site: HashMap<u64, u64>,
    pages: Vec<(u64, u64)>,
}

static POOL: Mutex<Option<Pool>> = Mutex::new(None);

/// Stubs start at multiples of this (an aligned literal on aarch64 and s390x).
const ALIGN: u64 = 8;

/// Maps a read + execute page of `page` bytes whose every stub slot is within reach:
/// hints at growing distances below and above `site`, until both directions are out
/// of reach. (A hint that is taken elsewhere may be ignored by the kernel, or by QEMU,
/// which treats `MAP_FIXED_NOREPLACE` as a plain hint; a page out of reach is given
/// back.)
fn map_near(site: u64, page: u64, reaches: &dyn Fn(u64) -> bool) -> Option<u64> {
    const STEP: u64 = 1 << 20;
    let base = site & !(page - 1);
    // The first and the last slot of a page starting at `a`.
    let within = |a: u64| reaches(a) && reaches(a + page - ALIGN);
    for k in 1..4096u64 {
        let below = base.checked_sub(k * STEP);
        let above = base.checked_add(k * STEP);
        let usable = |h: Option<u64>| h.filter(|&h| reaches(h) || reaches(h + page - ALIGN));
        let (below, above) = (usable(below), usable(above));
        if below.is_none() && above.is_none() {
            return None;
        }
        for hint in [below, above].into_iter().flatten() {
            // SAFETY: an anonymous private mapping at a hint, with `MAP_FIXED_NOREPLACE`
            // (never over an existing mapping), has no memory preconditions.
            let p = unsafe {
                libc::mmap(
                    hint as *mut libc::c_void,
                    page as usize,
                    libc::PROT_READ | libc::PROT_EXEC,
                    libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_FIXED_NOREPLACE,
                    -1,
                    0,
                )
            };
            if p == libc::MAP_FAILED {
                continue;
            }
            let a = p as u64;
            if within(a) {
                return Some(a);
            }
            // SAFETY: `p` is the page just mapped, used by nobody.
            unsafe { libc::munmap(p, page as usize) };
        }
    }
    None
}

/// The stub of the site at `site`: the existing one, or `bytes` written into a slot
/// that the site's branch reaches (`reaches(address)`), followed by one `sync` round.
/// Fails with `ERANGE` when no page within reach can be mapped, `EPERM` when a stub
/// page cannot be made writable, `EINVAL` for an empty or oversized stub; the site is
/// never touched here.
///
/// # Safety
///
/// 1. The caller holds its architecture's text lock (stub pages are text).
/// 2. `write` writes new text and does the architecture's cache maintenance.
pub(crate) unsafe fn stub_for(
    site: u64,
    bytes: &[u8],
    reaches: &dyn Fn(u64) -> bool,
    write: TextWriter,
    sync: &mut dyn FnMut(),
) -> Result<u64, Errno> {
    let mut g = POOL.lock().unwrap_or_else(|e| e.into_inner());
    let pool = g.get_or_insert_with(Pool::default);
    if let Some(&s) = pool.by_site.get(&site) {
        return Ok(s);
    }
    let page = super::text::page_size();
    let len = (bytes.len() as u64).next_multiple_of(ALIGN);
    if bytes.is_empty() || len > page {
        return Err(Errno::EINVAL);
    }
    let slot = pool
        .pages
        .iter_mut()
        .find(|(start, used)| *used + len <= page && reaches(*start + *used));
    let (start, at) = match slot {
        Some((start, used)) => {
            let at = *start + *used;
            *used += len;
            (*start, at)
        }
        None => {
            let start = map_near(site, page, reaches).ok_or(Errno::ERANGE)?;
            pool.pages.push((start, len));
            (start, start)
        }
    };
    // SAFETY: `start` is a read + execute stub page of ours (1); the other stubs on
    // it stay executable while it is writable.
    let w = unsafe { super::text::Writable::new(start, page) }?;
    // SAFETY: `at..at + bytes.len()` lies in the page (`len` fits after `used`), which
    // is writable now; no site branches to this slot yet, so nobody executes it; text
    // writes are serialised by the caller's lock (1); `write` is a text writer (2).
    unsafe { write(at as *mut u8, bytes) };
    drop(w);
    pool.by_site.insert(site, at);
    drop(g);
    sync();
    Ok(at)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A writer that only copies (the test stubs are never executed).
    unsafe fn copy(dst: *mut u8, bytes: &[u8]) {
        // SAFETY: the caller's contract: `dst` is writable for `bytes.len()` bytes.
        unsafe { std::ptr::copy_nonoverlapping(bytes.as_ptr(), dst, bytes.len()) };
    }

    #[test]
    fn stubs_are_made_once_near_their_site_and_packed() {
        let page = crate::redirect::text::page_size();
        // A site address inside a fresh mapping of ours, so nothing else is near it.
        let site = {
            // SAFETY: an anonymous private mapping has no preconditions.
            let p = unsafe {
                libc::mmap(
                    std::ptr::null_mut(),
                    page as usize,
                    libc::PROT_NONE,
                    libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                    -1,
                    0,
                )
            };
            assert_ne!(p, libc::MAP_FAILED);
            p as u64 + 0x10
        };
        let reach = 1u64 << 28;
        let reaches = |a: u64| a.abs_diff(site) < reach;
        let mut rounds = 0;
        let bytes = [0xa5u8; 20];
        // SAFETY: test stubs are only written, never run; no text lock is needed for
        // pages only this test touches.
        let s1 = unsafe { stub_for(site, &bytes, &reaches, copy, &mut || rounds += 1) };
        let s1 = s1.expect("a stub");
        assert!(reaches(s1) && s1.is_multiple_of(ALIGN), "{s1:#x} {site:#x}");
        // SAFETY: the stub's bytes are mapped and readable.
        assert_eq!(unsafe { *(s1 as *const [u8; 20]) }, bytes);
        assert_eq!(rounds, 1, "a round after a new stub");
        // SAFETY: as above.
        let again = unsafe { stub_for(site, &bytes, &reaches, copy, &mut || rounds += 1) };
        assert_eq!((again, rounds), (Ok(s1), 1), "made once");
        // Another site whose reach is only the first stub's page: it shares the page.
        let first = s1 & !(page - 1);
        let same_page = |a: u64| a >= first && a < first + page;
        // SAFETY: as above.
        let s2 = unsafe { stub_for(site + 4, &bytes, &same_page, copy, &mut || rounds += 1) };
        let s2 = s2.expect("room in the first page");
        assert!(same_page(s2) && s2 >= s1 + 24 && s2.is_multiple_of(ALIGN));
        assert_eq!(rounds, 2);
        let nowhere = |_: u64| false;
        // SAFETY: as above.
        let none = unsafe { stub_for(site + 8, &bytes, &nowhere, copy, &mut || {}) };
        assert_eq!(none, Err(Errno::ERANGE));
        // SAFETY: as above.
        let empty = unsafe { stub_for(site + 12, &[], &reaches, copy, &mut || {}) };
        assert_eq!(empty, Err(Errno::EINVAL));
    }
}
