//! Shadow variables against a `BTreeMap` model over random operation sequences.

use std::collections::BTreeMap;

use klp::shadow::{ShadowError, ShadowStore};
use proptest::prelude::*;

#[derive(Debug, Clone)]
enum Op {
    /// `alloc_with`, the ctor writing `val` or failing with `-val` when `fail`.
    Alloc {
        obj: usize,
        id: u64,
        val: u64,
        fail: bool,
    },
    GetOrAlloc {
        obj: usize,
        id: u64,
        val: u64,
        fail: bool,
    },
    Get {
        obj: usize,
        id: u64,
    },
    Free {
        obj: usize,
        id: u64,
    },
    FreeAll {
        id: u64,
    },
    Reclaim,
}

fn key() -> impl Strategy<Value = (usize, u64)> {
    // A small key space so that operations collide; objects look like pointers.
    (0usize..24, 0u64..4).prop_map(|(o, i)| (0xffff_0000 + o * 64, i))
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => (key(), any::<u64>(), prop::bool::weighted(0.15))
            .prop_map(|((obj, id), val, fail)| Op::Alloc { obj, id, val, fail }),
        3 => (key(), any::<u64>(), prop::bool::weighted(0.15))
            .prop_map(|((obj, id), val, fail)| Op::GetOrAlloc { obj, id, val, fail }),
        4 => key().prop_map(|(obj, id)| Op::Get { obj, id }),
        3 => key().prop_map(|(obj, id)| Op::Free { obj, id }),
        1 => (0u64..4).prop_map(|id| Op::FreeAll { id }),
        1 => Just(Op::Reclaim),
    ]
}

fn value(store: &ShadowStore, obj: usize, id: u64) -> Option<u64> {
    let g = store.pin();
    let r = g.get(obj, id)?;
    Some(u64::from_ne_bytes(r.bytes()?.try_into().ok()?))
}

fn ctor(val: u64, fail: bool, calls: &mut u32) -> impl FnOnce(usize, &mut [u8]) -> Result<(), i32> {
    move |_, data| {
        *calls += 1;
        if fail {
            return Err(-5);
        }
        data.copy_from_slice(&val.to_ne_bytes());
        Ok(())
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn store_matches_btreemap(ops in prop::collection::vec(op(), 1..200)) {
        let store = ShadowStore::new();
        let mut model: BTreeMap<(usize, u64), u64> = BTreeMap::new();
        for op in ops {
            match op {
                Op::Alloc { obj, id, val, fail } => {
                    let mut calls = 0;
                    let got = store.alloc_with(obj, id, 8, ctor(val, fail, &mut calls));
                    let existed = model.contains_key(&(obj, id));
                    if existed {
                        prop_assert_eq!(got, Err(ShadowError::Exists { obj, id }));
                        prop_assert_eq!(calls, 0);
                    } else if fail {
                        prop_assert_eq!(got, Err(ShadowError::Ctor { obj, id, err: -5 }));
                        prop_assert_eq!(calls, 1);
                    } else {
                        prop_assert!(got.is_ok());
                        prop_assert_eq!(calls, 1);
                        model.insert((obj, id), val);
                    }
                }
                Op::GetOrAlloc { obj, id, val, fail } => {
                    let mut calls = 0;
                    let got = store.get_or_alloc_with(obj, id, 8, ctor(val, fail, &mut calls));
                    let existed = model.contains_key(&(obj, id));
                    if existed {
                        prop_assert!(got.is_ok());
                        prop_assert_eq!(calls, 0);
                    } else if fail {
                        prop_assert_eq!(got, Err(ShadowError::Ctor { obj, id, err: -5 }));
                    } else {
                        prop_assert!(got.is_ok());
                        prop_assert_eq!(calls, 1);
                        model.insert((obj, id), val);
                    }
                }
                Op::Get { obj, id } => {
                    prop_assert_eq!(value(&store, obj, id), model.get(&(obj, id)).copied());
                    prop_assert_eq!(store.get(obj, id).is_some(), model.contains_key(&(obj, id)));
                }
                Op::Free { obj, id } => {
                    let mut dtor = Vec::new();
                    let freed = store.free_with(obj, id, |o, d| {
                        dtor.push((o, u64::from_ne_bytes(d.bytes().unwrap().try_into().unwrap())));
                    });
                    let expected = model.remove(&(obj, id));
                    prop_assert_eq!(freed, expected.is_some());
                    prop_assert_eq!(dtor, expected.map(|v| (obj, v)).into_iter().collect::<Vec<_>>());
                }
                Op::FreeAll { id } => {
                    let mut dtor = Vec::new();
                    let n = store.free_all_with(id, |o, d| {
                        dtor.push((o, u64::from_ne_bytes(d.bytes().unwrap().try_into().unwrap())));
                    });
                    let mut expected: Vec<(usize, u64)> = model
                        .iter()
                        .filter(|((_, i), _)| *i == id)
                        .map(|((o, _), v)| (*o, *v))
                        .collect();
                    model.retain(|(_, i), _| *i != id);
                    dtor.sort_unstable();
                    expected.sort_unstable();
                    prop_assert_eq!(n, expected.len());
                    prop_assert_eq!(dtor, expected);
                }
                Op::Reclaim => {
                    store.reclaim();
                    prop_assert_eq!(store.pending_reclaim(), 0);
                }
            }
            prop_assert_eq!(store.len(), model.len());
        }
        for (&(obj, id), &v) in &model {
            prop_assert_eq!(value(&store, obj, id), Some(v));
        }
    }
}
