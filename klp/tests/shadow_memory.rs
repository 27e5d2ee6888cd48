//! Shadow variables: memory is returned when variables are freed, growth to 10^5+ and
//! back, and out-of-memory is an error, not an abort.
//!
//! This binary installs a global allocator that counts, per thread, the bytes live and
//! can be told to fail on the current thread; its tests also run one at a time.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::sync::Mutex;

use klp::shadow::{ShadowError, ShadowId, ShadowStore};

struct Counting;

thread_local! {
    /// Makes this thread's allocations fail (other threads, like the test harness's, are
    /// unaffected). Const-initialised, so reading it never allocates.
    static FAIL: Cell<bool> = const { Cell::new(false) };
    /// Bytes allocated minus bytes freed by this thread (the store allocates and frees on
    /// the calling thread here, and other threads' allocations do not disturb the count).
    static LIVE_BYTES: Cell<isize> = const { Cell::new(0) };
}

fn account(delta: isize) {
    LIVE_BYTES.with(|l| l.set(l.get() + delta));
}

fn set_fail(on: bool) {
    FAIL.with(|f| f.set(on));
}

fn failing() -> bool {
    FAIL.with(Cell::get)
}

// SAFETY: forwards to `System`, only counting, or returning null (allowed) when told to.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        if failing() {
            return std::ptr::null_mut();
        }
        // SAFETY: the caller's contract for `alloc` is passed through.
        let p = unsafe { System.alloc(layout) };
        if !p.is_null() {
            account(layout.size() as isize);
        }
        p
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        if failing() {
            return std::ptr::null_mut();
        }
        // SAFETY: the caller's contract for `alloc_zeroed` is passed through.
        let p = unsafe { System.alloc_zeroed(layout) };
        if !p.is_null() {
            account(layout.size() as isize);
        }
        p
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        account(-(layout.size() as isize));
        // SAFETY: the caller's contract for `dealloc` is passed through.
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

static SERIAL: Mutex<()> = Mutex::new(());

fn live() -> isize {
    LIVE_BYTES.with(Cell::get)
}

#[test]
fn grow_to_100k_and_shrink_back_returns_memory() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let store = Box::new(ShadowStore::new());
    let base = live();
    const N: usize = 120_000;
    for i in 0..N {
        store
            .alloc_with(0x1_0000 + i * 64, (i % 3) as u64, 8, |o, d| {
                d.copy_from_slice(&(o as u64).to_ne_bytes());
                Ok(())
            })
            .unwrap();
    }
    assert_eq!(store.len(), N);
    let peak = live() - base;
    assert!(
        peak >= (N * 8) as isize,
        "the variables are accounted for: {peak}"
    );
    // Every variable is still found with its data.
    let g = store.pin();
    for i in (0..N).step_by(97) {
        let obj = 0x1_0000 + i * 64;
        let b = g.get(obj, (i % 3) as u64).unwrap().bytes().unwrap();
        assert_eq!(b, &(obj as u64).to_ne_bytes()[..]);
    }
    drop(g);
    // Shrink: free two thirds one by one, the rest with free_all.
    for i in 0..N {
        if i % 3 != 2 {
            assert!(store.free(0x1_0000 + i * 64, (i % 3) as u64));
        }
    }
    assert_eq!(store.free_all(2), N / 3);
    assert!(store.is_empty());
    store.reclaim();
    assert_eq!(store.pending_reclaim(), 0);
    let left = live() - base;
    assert!(
        left <= 0,
        "all node and table memory returned: {left} bytes left of {peak}"
    );
    // Growing again after shrinking works.
    for i in 0..1000 {
        store.alloc(i, 1, 8).unwrap();
    }
    assert_eq!(store.free_all(1), 1000);
    store.reclaim();
    assert!(live() - base <= 0);
}

#[test]
fn memory_of_typed_values_is_returned() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    const V: ShadowId<Vec<u8>> = ShadowId::new(5);
    let store = Box::new(ShadowStore::new());
    let base = live();
    {
        let g = store.pin();
        for i in 0..5_000 {
            assert!(V.alloc(&g, i, vec![1u8; 100]).is_ok());
        }
    }
    assert!(live() - base >= 500_000);
    assert_eq!(V.free_all(&store), 5_000);
    store.reclaim();
    assert!(live() - base <= 0, "the Vec buffers were dropped too");
}

#[test]
fn out_of_memory_is_an_error_and_leaves_the_store_usable() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let store = Box::new(ShadowStore::new());
    store.alloc(1, 1, 8).unwrap();
    let mut ran = false;
    set_fail(true);
    let r1 = store.alloc_with(2, 1, 8, |_, _| {
        ran = true;
        Ok(())
    });
    let r2 = store.get_or_alloc(3, 1, 8);
    let r3 = store.alloc(4, 1, usize::MAX - 64);
    let found = store.get(1, 1).is_some();
    set_fail(false);
    assert_eq!(r1, Err(ShadowError::NoMem));
    assert!(!ran, "no ctor without memory");
    assert_eq!(r2, Err(ShadowError::NoMem));
    assert_eq!(r3, Err(ShadowError::NoMem));
    assert!(found, "reads need no allocation");
    assert!(store.get(2, 1).is_none());
    // A huge size fails cleanly even with memory available.
    assert_eq!(store.alloc(5, 1, usize::MAX / 2), Err(ShadowError::NoMem));
    assert!(store.alloc(2, 1, 8).is_ok());
    assert_eq!(store.len(), 2);
}

#[test]
fn inserts_fail_and_frees_work_while_out_of_memory() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let store = Box::new(ShadowStore::new());
    for i in 0..10_000 {
        store.alloc(i * 8, 9, 8).unwrap();
    }
    set_fail(true);
    let failures = (10_000..12_000)
        .filter(|i| store.alloc(i * 8, 9, 8) == Err(ShadowError::NoMem))
        .count();
    // Freeing needs no memory (a failed shrink keeps the bigger table).
    let freed = (0..5_000).filter(|i| store.free(i * 8, 9)).count();
    let len = store.len();
    set_fail(false);
    assert_eq!(failures, 2_000);
    assert_eq!(freed, 5_000);
    assert_eq!(len, 5_000);
    for i in 0..5_000 {
        assert!(store.get(i * 8, 9).is_none());
        assert!(store.get((5_000 + i) * 8, 9).is_some());
    }
    assert_eq!(store.free_all(9), 5_000);
}

#[test]
fn churn_without_explicit_reclaim_stays_bounded() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let store = Box::new(ShadowStore::new());
    let base = live();
    let mut worst_pending = 0;
    let mut worst_bytes = 0;
    for round in 0..100usize {
        for i in 0..1_000usize {
            store.alloc(round * 1_000 + i, 4, 64).unwrap();
        }
        assert_eq!(store.free_all(4), 1_000);
        worst_pending = worst_pending.max(store.pending_reclaim());
        worst_bytes = worst_bytes.max(live() - base);
    }
    // 100k variables went through the store; the shards' own batch reclaim kept the
    // garbage to a few batches per shard (64 shards x 32 per batch).
    assert!(worst_pending <= 64 * 3 * 32, "pending {worst_pending}");
    assert!(worst_bytes < 2_000_000, "live bytes {worst_bytes}");
    store.reclaim();
    assert_eq!(store.pending_reclaim(), 0);
    assert!(live() - base <= 0);
}
