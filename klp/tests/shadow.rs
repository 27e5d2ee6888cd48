//! Shadow variables: every API edge, both levels, and concurrency.

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicUsize, Ordering};
use std::sync::{Arc, Barrier, Mutex};
use std::thread;

use klp::shadow::{ShadowError, ShadowId, ShadowStore};

const OBJ_A: usize = 0xffff_8880_0000_1000;
const OBJ_B: usize = 0xffff_8880_0000_2000;
const ID1: u64 = 0x1234;
const ID2: u64 = 0x1235;

/// `normal`, or `miri` under Miri (an interpreter: the concurrent tests keep their
/// shape, with fewer rounds).
fn scaled(normal: u64, miri: u64) -> u64 {
    if cfg!(miri) { miri } else { normal }
}

fn read_u64(store: &ShadowStore, obj: usize, id: u64) -> Option<u64> {
    let g = store.pin();
    let r = g.get(obj, id)?;
    let b = r.bytes()?;
    Some(u64::from_ne_bytes(b[..8].try_into().unwrap()))
}

#[test]
fn get_of_missing_pair_is_none() {
    let s = ShadowStore::new();
    assert_eq!(s.get(OBJ_A, ID1), None);
    assert!(s.pin().get(OBJ_A, ID1).is_none());
    assert!(s.is_empty());
}

#[test]
fn alloc_is_zeroed_and_found_with_stable_address() {
    let s = ShadowStore::new();
    let a = s.alloc(OBJ_A, ID1, 24).unwrap();
    assert_eq!(a.len(), 24);
    assert_eq!(a.addr() % 16, 0, "untyped data is 16-aligned");
    let g = s.pin();
    let r = g.get(OBJ_A, ID1).unwrap();
    assert_eq!(r.addr(), a);
    assert_eq!(
        (r.obj(), r.id(), r.len(), r.is_typed()),
        (OBJ_A, ID1, 24, false)
    );
    assert_eq!(r.bytes().unwrap(), &[0u8; 24][..]);
    drop(g);
    assert_eq!(s.get(OBJ_A, ID1), Some(a));
    assert_eq!(s.len(), 1);
}

#[test]
fn ctor_writes_a_pointer_like_the_selftest() {
    let s = ShadowStore::new();
    let payload = 0xdead_beef_u64;
    let mut seen = None;
    let a = s
        .alloc_with(OBJ_A, ID1, 8, |obj, data| {
            seen = Some((obj, data.as_ptr() as usize, data.iter().all(|&b| b == 0)));
            data.copy_from_slice(&payload.to_ne_bytes());
            Ok(())
        })
        .unwrap();
    assert_eq!(
        seen,
        Some((OBJ_A, a.addr(), true)),
        "ctor saw obj, the data address, zeroes"
    );
    assert_eq!(read_u64(&s, OBJ_A, ID1), Some(payload));
    // SAFETY: nobody frees or writes the variable during this kernel-style raw read.
    let raw = unsafe { a.as_ptr().cast::<u64>().read() };
    assert_eq!(raw, payload);
}

#[test]
fn raw_write_through_address_is_seen_by_readers() {
    let s = ShadowStore::new();
    let a = s.alloc(OBJ_A, ID1, 8).unwrap();
    // SAFETY: the variable lives, is 16-aligned, and no reader borrows it during the write.
    unsafe { a.as_ptr().cast::<u64>().write(42) };
    assert_eq!(read_u64(&s, OBJ_A, ID1), Some(42));
}

#[test]
fn duplicate_alloc_fails_without_running_ctor() {
    let s = ShadowStore::new();
    let first = s
        .alloc_with(OBJ_A, ID1, 8, |_, d| {
            d.copy_from_slice(&7u64.to_ne_bytes());
            Ok(())
        })
        .unwrap();
    let mut ran = false;
    let err = s
        .alloc_with(OBJ_A, ID1, 8, |_, _| {
            ran = true;
            Ok(())
        })
        .unwrap_err();
    assert!(!ran, "ctor must not run for an existing pair");
    assert_eq!(
        err,
        ShadowError::Exists {
            obj: OBJ_A,
            id: ID1
        }
    );
    assert_eq!(
        err.to_string(),
        "Duplicate shadow variable <ffff888000001000, 1234>"
    );
    assert_eq!(err.errno(), -17);
    assert_eq!(s.alloc(OBJ_A, ID1, 8), Err(err));
    assert_eq!(s.get(OBJ_A, ID1), Some(first), "the original is untouched");
    assert_eq!(read_u64(&s, OBJ_A, ID1), Some(7));
    assert_eq!(s.len(), 1);
}

#[test]
fn ctor_failure_publishes_nothing_and_a_later_alloc_works() {
    let s = ShadowStore::new();
    let err = s.alloc_with(OBJ_A, ID1, 8, |_, _| Err(-22)).unwrap_err();
    assert_eq!(
        err,
        ShadowError::Ctor {
            obj: OBJ_A,
            id: ID1,
            err: -22
        }
    );
    assert_eq!(
        err.to_string(),
        "Failed to construct shadow variable <ffff888000001000, 1234> (-22)"
    );
    assert_eq!(err.errno(), -22);
    assert_eq!(s.get(OBJ_A, ID1), None);
    assert!(s.is_empty());
    let err = s
        .get_or_alloc_with(OBJ_A, ID1, 8, |_, _| Err(-12))
        .unwrap_err();
    assert_eq!(
        err,
        ShadowError::Ctor {
            obj: OBJ_A,
            id: ID1,
            err: -12
        }
    );
    assert_eq!(s.get(OBJ_A, ID1), None);
    assert!(s.alloc(OBJ_A, ID1, 8).is_ok());
    assert!(s.get(OBJ_A, ID1).is_some());
}

#[test]
fn get_or_alloc_returns_existing_without_ctor() {
    let s = ShadowStore::new();
    let mut calls = 0;
    let a = s
        .get_or_alloc_with(OBJ_A, ID1, 8, |_, d| {
            calls += 1;
            d.copy_from_slice(&1u64.to_ne_bytes());
            Ok(())
        })
        .unwrap();
    let b = s
        .get_or_alloc_with(OBJ_A, ID1, 8, |_, d| {
            calls += 1;
            d.copy_from_slice(&2u64.to_ne_bytes());
            Ok(())
        })
        .unwrap();
    assert_eq!(a, b);
    assert_eq!(calls, 1);
    assert_eq!(read_u64(&s, OBJ_A, ID1), Some(1));
    assert_eq!(s.get_or_alloc(OBJ_A, ID1, 8), Ok(a));
}

#[test]
fn several_ids_per_parent_and_one_id_on_many_parents() {
    let s = ShadowStore::new();
    let keys = [(OBJ_A, ID1), (OBJ_A, ID2), (OBJ_B, ID1), (OBJ_B, ID2)];
    let mut addrs = HashSet::new();
    for (n, &(o, i)) in keys.iter().enumerate() {
        let a = s
            .alloc_with(o, i, 8, |_, d| {
                d.copy_from_slice(&(n as u64).to_ne_bytes());
                Ok(())
            })
            .unwrap();
        assert!(addrs.insert(a.addr()));
    }
    for (n, &(o, i)) in keys.iter().enumerate() {
        assert_eq!(read_u64(&s, o, i), Some(n as u64));
    }
    assert_eq!(s.len(), 4);
}

#[test]
fn free_runs_dtor_once_with_obj_and_data_then_get_is_none() {
    let s = ShadowStore::new();
    let a = s
        .alloc_with(OBJ_A, ID1, 8, |_, d| {
            d[0] = 9;
            Ok(())
        })
        .unwrap();
    let mut calls = Vec::new();
    assert!(s.free_with(OBJ_A, ID1, |obj, data| {
        calls.push((obj, data.addr(), data.bytes().unwrap()[0]));
    }));
    assert_eq!(calls, vec![(OBJ_A, a, 9)]);
    assert_eq!(s.get(OBJ_A, ID1), None);
    assert!(s.pin().get(OBJ_A, ID1).is_none());
    // Freeing again (a missing pair) is a no-op and runs no dtor.
    assert!(!s.free_with(OBJ_A, ID1, |_, _| calls.push((0, a, 0))));
    assert!(!s.free(OBJ_B, ID2));
    assert_eq!(calls.len(), 1);
    assert!(s.is_empty());
}

#[test]
fn free_all_touches_only_its_id_and_runs_each_dtor_once() {
    let s = ShadowStore::new();
    let objs: Vec<usize> = (0..200).map(|i| 0x10_0000 + i * 64).collect();
    for &o in &objs {
        s.alloc(o, ID1, 8).unwrap();
        s.alloc(o, ID2, 8).unwrap();
    }
    let mut seen = Vec::new();
    let n = s.free_all_with(ID2, |obj, data| {
        assert_eq!(data.id(), ID2);
        assert_eq!(data.obj(), obj);
        seen.push(obj);
    });
    assert_eq!(n, objs.len());
    seen.sort_unstable();
    assert_eq!(seen, objs, "one dtor call per freed variable, with its obj");
    for &o in &objs {
        assert!(s.get(o, ID2).is_none());
        assert!(s.get(o, ID1).is_some(), "other ids are untouched");
    }
    assert_eq!(s.free_all(ID2), 0);
    assert_eq!(s.free_all(ID1), objs.len());
    assert!(s.is_empty());
}

#[test]
fn reader_keeps_data_alive_across_a_concurrent_free() {
    let s = ShadowStore::new();
    s.alloc_with(OBJ_A, ID1, 8, |_, d| {
        d.fill(0x5a);
        Ok(())
    })
    .unwrap();
    let g = s.pin();
    let r = g.get(OBJ_A, ID1).unwrap();
    // Free from another thread while `r` is alive, and push enough garbage through to
    // trigger the shards' batch reclaim as well as an explicit one.
    thread::scope(|sc| {
        sc.spawn(|| {
            assert!(s.free(OBJ_A, ID1));
            for i in 0..10_000 {
                s.alloc(0x1000 + i * 16, 7, 8).unwrap();
            }
            s.free_all(7);
            s.reclaim();
        });
    });
    assert!(
        s.pending_reclaim() > 0,
        "the pinned node must still be pending"
    );
    assert_eq!(
        r.bytes().unwrap(),
        &[0x5a; 8][..],
        "still readable under the guard"
    );
    assert!(g.get(OBJ_A, ID1).is_none(), "but no longer findable");
    drop(g);
    s.reclaim();
    assert_eq!(s.pending_reclaim(), 0);
}

#[test]
fn concurrent_get_or_alloc_creates_one_variable_and_one_ctor_call() {
    for round in 0..20 {
        let s = ShadowStore::new();
        let ctor_calls = AtomicUsize::new(0);
        let barrier = Barrier::new(8);
        let addrs = Mutex::new(Vec::new());
        let obj = 0x4000 + round * 8;
        thread::scope(|sc| {
            for t in 0..8u8 {
                let (s, ctor_calls, barrier, addrs) = (&s, &ctor_calls, &barrier, &addrs);
                sc.spawn(move || {
                    barrier.wait();
                    let a = s
                        .get_or_alloc_with(obj, ID1, 8, |_, d| {
                            ctor_calls.fetch_add(1, Ordering::SeqCst);
                            d[0] = t;
                            Ok(())
                        })
                        .unwrap();
                    addrs.lock().unwrap().push(a);
                });
            }
        });
        let addrs = addrs.into_inner().unwrap();
        assert_eq!(ctor_calls.load(Ordering::SeqCst), 1);
        assert_eq!(addrs.len(), 8);
        assert!(
            addrs.iter().all(|a| *a == addrs[0]),
            "all threads got the same variable"
        );
        assert_eq!(s.len(), 1);
    }
}

#[test]
fn concurrent_alloc_exactly_one_wins() {
    let s = ShadowStore::new();
    let wins = AtomicUsize::new(0);
    let exists = AtomicUsize::new(0);
    thread::scope(|sc| {
        for _ in 0..8 {
            sc.spawn(|| {
                for k in 0..500usize {
                    match s.alloc(k * 32, ID1, 8) {
                        Ok(_) => wins.fetch_add(1, Ordering::SeqCst),
                        Err(ShadowError::Exists { .. }) => exists.fetch_add(1, Ordering::SeqCst),
                        Err(e) => panic!("unexpected {e}"),
                    };
                }
            });
        }
    });
    assert_eq!(wins.load(Ordering::SeqCst), 500);
    assert_eq!(exists.load(Ordering::SeqCst), 7 * 500);
    assert_eq!(s.len(), 500);
}

#[test]
fn concurrent_readers_and_writers_stay_consistent() {
    // Writers churn keys (tables grow, shrink and are retired) while readers check that
    // whatever they find holds the bytes its writer put there.
    let s = ShadowStore::new();
    let done = AtomicUsize::new(0);
    let reads = AtomicUsize::new(0);
    thread::scope(|sc| {
        for w in 0..2u64 {
            let (s, done) = (&s, &done);
            sc.spawn(move || {
                for round in 0..scaled(40, 4) {
                    for k in 0..scaled(2_000, 48) {
                        let obj = (k * 2 + w) as usize * 64;
                        s.alloc_with(obj, round % 3, 8, |o, d| {
                            d.copy_from_slice(&(o as u64 ^ 0xabcd).to_ne_bytes());
                            Ok(())
                        })
                        .unwrap();
                    }
                    for k in 0..scaled(2_000, 48) {
                        assert!(s.free((k * 2 + w) as usize * 64, round % 3));
                    }
                }
                done.fetch_add(1, Ordering::SeqCst);
            });
        }
        for _ in 0..2 {
            let (s, done, reads) = (&s, &done, &reads);
            sc.spawn(move || {
                while done.load(Ordering::SeqCst) < 2 {
                    let g = s.pin();
                    for k in 0..scaled(4_000, 96) as usize {
                        for id in 0..3 {
                            if let Some(r) = g.get(k * 64, id) {
                                let b: [u8; 8] = r.bytes().unwrap().try_into().unwrap();
                                assert_eq!(u64::from_ne_bytes(b), (k * 64) as u64 ^ 0xabcd);
                                reads.fetch_add(1, Ordering::Relaxed);
                            }
                        }
                    }
                }
            });
        }
    });
    assert!(
        reads.load(Ordering::Relaxed) > 0,
        "readers saw live variables"
    );
    assert!(s.is_empty());
    s.reclaim();
    assert_eq!(s.pending_reclaim(), 0);
}

#[test]
fn reclaim_never_frees_what_a_pinned_reader_holds() {
    // Writers free, recreate and reclaim the same keys as fast as they can while readers
    // hold references across a yield. A premature free would show as a wrong pattern
    // (the memory reused for another key) or, under AddressSanitizer, as a
    // use-after-free.
    let s = ShadowStore::new();
    let done = AtomicBool::new(false);
    let checked = AtomicUsize::new(0);
    let pattern = |obj: usize| (obj as u64).rotate_left(17) ^ 0x5a5a_5a5a;
    thread::scope(|sc| {
        let writers: Vec<_> = (0..2usize)
            .map(|w| {
                let s = &s;
                sc.spawn(move || {
                    for round in 0..300 {
                        for k in 0..64usize {
                            let obj = 0x7000 + (k * 2 + w) * 16;
                            let _ = s.alloc_with(obj, 1, 8, |o, d| {
                                d.copy_from_slice(&pattern(o).to_ne_bytes());
                                Ok(())
                            });
                        }
                        for k in 0..64usize {
                            s.free(0x7000 + (k * 2 + w) * 16, 1);
                        }
                        if round % 4 == 0 {
                            s.reclaim();
                        }
                    }
                })
            })
            .collect();
        for r in 0..2usize {
            let (s, done, checked) = (&s, &done, &checked);
            sc.spawn(move || {
                let mut k = r;
                while !done.load(Ordering::SeqCst) {
                    let g = s.pin();
                    let obj = 0x7000 + (k % 128) * 16;
                    k += 1;
                    if let Some(v) = g.get(obj, 1) {
                        thread::yield_now();
                        let b: [u8; 8] = v.bytes().unwrap().try_into().unwrap();
                        assert_eq!(u64::from_ne_bytes(b), pattern(obj));
                        checked.fetch_add(1, Ordering::Relaxed);
                    }
                }
            });
        }
        for h in writers {
            h.join().unwrap();
        }
        done.store(true, Ordering::SeqCst);
    });
    assert!(checked.load(Ordering::Relaxed) > 0, "readers saw variables");
    assert!(s.is_empty());
    s.reclaim();
    assert_eq!(s.pending_reclaim(), 0);
}

#[test]
fn static_store_and_error_display() {
    static STORE: ShadowStore = ShadowStore::new();
    STORE.alloc(1, 2, 0).unwrap();
    assert!(STORE.get(1, 2).unwrap().is_empty());
    assert!(STORE.free(1, 2));
    assert_eq!(ShadowError::NoMem.errno(), -12);
    assert!(!ShadowError::NoMem.to_string().is_empty());
}

// ---- typed level ----

const COUNTER: ShadowId<AtomicU32> = ShadowId::new(0x1234);
const NAME: ShadowId<String> = ShadowId::new(0x99);

#[test]
fn typed_alloc_get_free() {
    let s = ShadowStore::new();
    let g = s.pin();
    assert!(COUNTER.get(&g, OBJ_A).is_none());
    let c = COUNTER.alloc(&g, OBJ_A, AtomicU32::new(5)).unwrap();
    c.fetch_add(1, Ordering::Relaxed);
    assert_eq!(COUNTER.get(&g, OBJ_A).unwrap().load(Ordering::Relaxed), 6);
    assert_eq!(
        COUNTER.alloc(&g, OBJ_A, AtomicU32::new(0)).unwrap_err(),
        ShadowError::Exists {
            obj: OBJ_A,
            id: 0x1234
        }
    );
    let mut ran = false;
    let again = COUNTER
        .get_or_alloc_with(&g, OBJ_A, |_| {
            ran = true;
            Ok(AtomicU32::new(0))
        })
        .unwrap();
    assert!(!ran);
    assert!(std::ptr::eq(c, again));
    drop(g);
    let mut seen = None;
    assert!(COUNTER.free_with(&s, OBJ_A, |obj, v| {
        seen = Some((obj, v.load(Ordering::Relaxed)))
    }));
    assert_eq!(seen, Some((OBJ_A, 6)));
    assert!(COUNTER.get(&s.pin(), OBJ_A).is_none());
    assert!(!COUNTER.free(&s, OBJ_A));
}

#[test]
fn typed_ctor_failure_and_drop_on_free() {
    struct Tracked(Arc<AtomicUsize>);
    impl Drop for Tracked {
        fn drop(&mut self) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }
    const T: ShadowId<Tracked> = ShadowId::new(3);
    let drops = Arc::new(AtomicUsize::new(0));
    let s = ShadowStore::new();
    {
        let g = s.pin();
        let e = T.alloc_with(&g, OBJ_A, |_| Err(-5)).err().unwrap();
        assert_eq!(
            e,
            ShadowError::Ctor {
                obj: OBJ_A,
                id: 3,
                err: -5
            }
        );
        assert!(T.get(&g, OBJ_A).is_none());
        for i in 0..10 {
            let d = drops.clone();
            assert!(
                T.alloc_with(&g, OBJ_A + i * 8, move |_| Ok(Tracked(d)))
                    .is_ok()
            );
        }
    }
    assert!(T.free(&s, OBJ_A));
    let mut dtors = 0;
    assert_eq!(T.free_all_with(&s, |_, _| dtors += 1), 9);
    assert_eq!(dtors, 9);
    assert_eq!(
        drops.load(Ordering::SeqCst),
        0,
        "values drop after the grace period"
    );
    s.reclaim();
    assert_eq!(
        drops.load(Ordering::SeqCst),
        10,
        "each value dropped exactly once"
    );
    // Values still in the store are dropped with it.
    let g = s.pin();
    assert!(T.alloc(&g, OBJ_B, Tracked(drops.clone())).is_ok());
    drop(g);
    drop(s);
    assert_eq!(drops.load(Ordering::SeqCst), 11);
}

#[test]
fn typed_and_untyped_do_not_mix() {
    const OTHER: ShadowId<u64> = ShadowId::new(0x99);
    let s = ShadowStore::new();
    let g = s.pin();
    NAME.alloc(&g, OBJ_A, String::from("x")).unwrap();
    // Another type under the same id sees nothing, and cannot create over it.
    assert!(OTHER.get(&g, OBJ_A).is_none());
    assert_eq!(
        OTHER.get_or_alloc_with(&g, OBJ_A, |_| Ok(1)).unwrap_err(),
        ShadowError::TypeMismatch {
            obj: OBJ_A,
            id: 0x99
        }
    );
    assert!(!OTHER.free(&s, OBJ_A));
    // The untyped level sees an address but no bytes, and cannot get_or_alloc it.
    let r = g.get(OBJ_A, 0x99).unwrap();
    assert!(r.is_typed() && r.bytes().is_none());
    assert_eq!(
        s.get_or_alloc(OBJ_A, 0x99, 8).unwrap_err(),
        ShadowError::TypeMismatch {
            obj: OBJ_A,
            id: 0x99
        }
    );
    assert_eq!(
        s.alloc(OBJ_A, 0x99, 8).unwrap_err(),
        ShadowError::Exists {
            obj: OBJ_A,
            id: 0x99
        }
    );
    // An untyped variable is invisible to typed lookups.
    s.alloc(OBJ_B, 0x99, 8).unwrap();
    assert!(NAME.get(&g, OBJ_B).is_none());
    assert_eq!(NAME.get(&g, OBJ_A).map(String::as_str), Some("x"));
    drop(g);
    // The untyped free frees typed variables too (the String is dropped later).
    assert!(s.free(OBJ_A, 0x99));
    assert_eq!(NAME.free_all(&s), 0);
    assert_eq!(s.free_all(0x99), 1);
    assert!(s.is_empty());
}

#[test]
fn typed_concurrent_get_or_alloc_one_value() {
    let s = ShadowStore::new();
    let ctor_calls = AtomicUsize::new(0);
    let barrier = Barrier::new(8);
    let started = AtomicBool::new(false);
    thread::scope(|sc| {
        for _ in 0..8 {
            sc.spawn(|| {
                barrier.wait();
                started.store(true, Ordering::SeqCst);
                let g = s.pin();
                let c = COUNTER
                    .get_or_alloc_with(&g, OBJ_B, |_| {
                        ctor_calls.fetch_add(1, Ordering::SeqCst);
                        Ok(AtomicU32::new(0))
                    })
                    .unwrap();
                c.fetch_add(1, Ordering::SeqCst);
            });
        }
    });
    assert!(started.load(Ordering::SeqCst));
    assert_eq!(ctor_calls.load(Ordering::SeqCst), 1);
    assert_eq!(
        COUNTER.get(&s.pin(), OBJ_B).unwrap().load(Ordering::SeqCst),
        8
    );
}

/// A calling context that records what the store asks of it: the allocation of each
/// new variable (with whether a shard lock was held then), and the lock hooks.
struct RecordingCx {
    in_lock: core::cell::Cell<u32>,
    enters: core::cell::Cell<u32>,
    allocs_in_lock: core::cell::Cell<u32>,
    allocs: core::cell::Cell<u32>,
    fail: bool,
    ctor_in_lock: core::cell::Cell<bool>,
}

impl RecordingCx {
    fn new(fail: bool) -> RecordingCx {
        RecordingCx {
            in_lock: Default::default(),
            enters: Default::default(),
            allocs_in_lock: Default::default(),
            allocs: Default::default(),
            fail,
            ctor_in_lock: Default::default(),
        }
    }
}

// SAFETY: (1) the global allocator's memory; (2) `lock_exit` undoes `lock_enter`'s count.
unsafe impl klp::shadow::ShadowCx for RecordingCx {
    fn alloc_zeroed(&self, layout: std::alloc::Layout) -> *mut u8 {
        self.allocs.set(self.allocs.get() + 1);
        if self.in_lock.get() > 0 {
            self.allocs_in_lock.set(self.allocs_in_lock.get() + 1);
        }
        if self.fail {
            return std::ptr::null_mut();
        }
        // SAFETY: node layouts are never zero-sized.
        unsafe { std::alloc::alloc_zeroed(layout) }
    }
    fn lock_enter(&self) -> usize {
        self.enters.set(self.enters.get() + 1);
        self.in_lock.set(self.in_lock.get() + 1);
        7
    }
    fn lock_exit(&self, token: usize) {
        assert_eq!(token, 7, "lock_exit gets lock_enter's token");
        self.in_lock.set(self.in_lock.get() - 1);
    }
}

#[test]
fn a_calling_context_allocates_outside_the_lock_and_brackets_every_lock() {
    let store = ShadowStore::new();
    let cx = RecordingCx::new(false);
    let s = store.in_cx(&cx);
    s.alloc_with(0x1000, 1, 8, |_, _| {
        cx.ctor_in_lock.set(cx.in_lock.get() > 0);
        Ok(())
    })
    .unwrap();
    assert!(
        cx.ctor_in_lock.get(),
        "the constructor runs under the shard lock"
    );
    s.get_or_alloc_with(0x1000, 1, 8, |_, _| panic!("exists: no constructor"))
        .unwrap();
    s.get_or_alloc_with(0x2000, 1, 8, |_, _| Ok(())).unwrap();
    assert_eq!(
        cx.allocs.get(),
        2,
        "one allocation per new variable, none for a found one"
    );
    assert_eq!(
        cx.allocs_in_lock.get(),
        0,
        "variables are allocated before the lock"
    );
    assert!(s.free_with(0x1000, 1, |_, _| assert_eq!(cx.in_lock.get(), 1)));
    assert_eq!(s.free_all_with(1, |_, _| {}), 1);
    assert_eq!(cx.in_lock.get(), 0, "every lock_enter has its lock_exit");
    assert!(
        cx.enters.get() >= 4,
        "alloc, the new get_or_alloc, free and free_all lock"
    );
    assert!(store.is_empty());
}

#[test]
fn a_calling_context_without_memory_fails_with_nomem_and_publishes_nothing() {
    let store = ShadowStore::new();
    let cx = RecordingCx::new(true);
    let s = store.in_cx(&cx);
    assert_eq!(
        s.alloc_with(0x1000, 1, 8, |_, _| Ok(())),
        Err(ShadowError::NoMem)
    );
    assert_eq!(
        s.get_or_alloc_with(0x1000, 1, 8, |_, _| Ok(())),
        Err(ShadowError::NoMem)
    );
    assert_eq!(store.get(0x1000, 1), None);
    assert_eq!(cx.in_lock.get(), 0);
}
