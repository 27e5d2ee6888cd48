//! Allocation failure injected into the core.
//!
//! The kernel can refuse any allocation; the core must then fail the operation with
//! `-ENOMEM` and leave everything as it was. [`FailAlloc`] is a global allocator for test
//! binaries that fails the Nth allocation the *core* makes after [`arm`]: allocations
//! inside [`core`] sections (the simulator wraps its calls into `klp` in them) count,
//! except those inside [`host`] sections (the simulator's [`klp::Host`] methods and its
//! modules' callbacks, which are the world's code, not the core's; a [`core`] section
//! inside a host section — the core's ELF code called by a host method — counts
//! again). It also tracks
//! every allocation the core makes while armed, so a test can see that a failed
//! operation left none of them behind.
//!
//! Outside a test binary that installs it (`#[global_allocator]`), the sections only
//! move two thread-local counters.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::ptr;

/// How many core allocations made while armed can be alive at once.
const TRACK_SLOTS: usize = 8192;

thread_local! {
    /// Whether the innermost section is the core's.
    static IN_CORE: Cell<bool> = const { Cell::new(false) };
    static ARMED: Cell<bool> = const { Cell::new(false) };
    static FAIL_AT: Cell<Option<u64>> = const { Cell::new(None) };
    static SEEN: Cell<u64> = const { Cell::new(0) };
    static FAILED: Cell<bool> = const { Cell::new(false) };
    static OVERFLOW: Cell<bool> = const { Cell::new(false) };
    static LIVE: [Cell<usize>; TRACK_SLOTS] = const { [const { Cell::new(0) }; TRACK_SLOTS] };
}

/// A section of code (the core's or the world's) until dropped; restores the
/// enclosing one.
#[derive(Debug)]
#[must_use]
pub struct Section {
    outer: bool,
}

fn enter(core: bool) -> Section {
    let outer = IN_CORE.try_with(|c| c.replace(core)).unwrap_or(false);
    Section { outer }
}

impl Drop for Section {
    fn drop(&mut self) {
        let _ = IN_CORE.try_with(|c| c.set(self.outer));
    }
}

/// Runs `f` as core code: its allocations may be failed.
pub fn core<R>(f: impl FnOnce() -> R) -> R {
    let _s = enter(true);
    f()
}

/// Marks the current thread as running the world's code (a host method, a callback)
/// until dropped.
pub fn host() -> Section {
    enter(false)
}

/// Starts counting (and tracking) the core's allocations on this thread; with
/// `Some(n)`, the allocation after the first `n` fails (`n = 0`: the first one).
pub fn arm(fail_at: Option<u64>) {
    SEEN.set(0);
    FAILED.set(false);
    OVERFLOW.set(false);
    FAIL_AT.set(fail_at);
    LIVE.with(|t| t.iter().for_each(|c| c.set(0)));
    ARMED.set(true);
}

/// What happened between [`arm`] and [`disarm`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Report {
    /// Allocations the core asked for (the failed one included).
    pub core_allocs: u64,
    /// Whether the armed failure happened.
    pub failed: bool,
    /// Core allocations made while armed that are still alive.
    pub live: usize,
    /// More core allocations were alive at once than can be tracked (the report is
    /// then incomplete).
    pub overflow: bool,
}

/// Stops counting; reports.
pub fn disarm() -> Report {
    ARMED.set(false);
    let live = LIVE.with(|t| t.iter().filter(|c| c.get() != 0).count());
    Report {
        core_allocs: SEEN.get(),
        failed: FAILED.get(),
        live,
        overflow: OVERFLOW.get(),
    }
}

fn armed() -> bool {
    ARMED.try_with(Cell::get).unwrap_or(false)
}

fn in_core() -> bool {
    IN_CORE.try_with(Cell::get).unwrap_or(false)
}

/// Counts a core allocation; whether it must fail.
fn inject() -> bool {
    if !armed() || !in_core() {
        return false;
    }
    let n = SEEN.get();
    SEEN.set(n + 1);
    if FAIL_AT.get() == Some(n) {
        FAILED.set(true);
        return true;
    }
    false
}

fn track(p: *mut u8) {
    if p.is_null() || !armed() || !in_core() {
        return;
    }
    let _ = LIVE.try_with(|t| match t.iter().find(|c| c.get() == 0) {
        Some(c) => c.set(p as usize),
        None => OVERFLOW.set(true),
    });
}

/// Forgets `p`; whether it was tracked.
fn untrack(p: *mut u8) -> bool {
    if !armed() {
        return false;
    }
    LIVE.try_with(|t| match t.iter().find(|c| c.get() == p as usize) {
        Some(c) => {
            c.set(0);
            true
        }
        None => false,
    })
    .unwrap_or(false)
}

/// The global allocator of the allocation-failure tests (see the module docs).
#[derive(Debug)]
pub struct FailAlloc;

// SAFETY: every method forwards to `System` with the caller's arguments, which meet
// `System`'s requirements because they meet `GlobalAlloc`'s; a refused allocation returns
// null, which `GlobalAlloc` allows for `alloc`, `alloc_zeroed` and `realloc` (the old
// block then stays valid and owned by the caller).
unsafe impl GlobalAlloc for FailAlloc {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        if inject() {
            return ptr::null_mut();
        }
        // SAFETY: the caller's `layout` has a non-zero size (GlobalAlloc::alloc's
        // condition), which is System::alloc's.
        let p = unsafe { System.alloc(layout) };
        track(p);
        p
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        if inject() {
            return ptr::null_mut();
        }
        // SAFETY: as for `alloc`.
        let p = unsafe { System.alloc_zeroed(layout) };
        track(p);
        p
    }

    unsafe fn dealloc(&self, p: *mut u8, layout: Layout) {
        untrack(p);
        // SAFETY: `p` was allocated by this allocator (so by System) with `layout`, as
        // the caller guarantees.
        unsafe { System.dealloc(p, layout) }
    }

    unsafe fn realloc(&self, p: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        if new_size > layout.size() && inject() {
            return ptr::null_mut();
        }
        // SAFETY: the caller's guarantees for `p`, `layout` and `new_size` are System's.
        let q = unsafe { System.realloc(p, layout, new_size) };
        if !q.is_null() && untrack(p) {
            // A block the core allocated while armed moved: it is still the core's.
            let _ = LIVE.try_with(|t| match t.iter().find(|c| c.get() == 0) {
                Some(c) => c.set(q as usize),
                None => OVERFLOW.set(true),
            });
        }
        q
    }
}
