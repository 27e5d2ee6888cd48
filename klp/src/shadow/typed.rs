//! The typed level: an id bound to a data type.

use core::any::TypeId;
use core::fmt;
use core::marker::PhantomData;
use core::ptr::NonNull;

use super::table::{Node, Spec};
use super::{GlobalCx, Guard, Mode, ShadowError, ShadowStore};

/// A shadow-variable id whose data is a `T`.
///
/// Declare it once, as a `const`, and use it everywhere the variable is touched; the
/// data type then cannot be mistaken:
///
/// ```
/// use klp::shadow::{ShadowId, ShadowStore};
/// use core::sync::atomic::{AtomicU32, Ordering};
///
/// const PS_LOCK_COUNT: ShadowId<AtomicU32> = ShadowId::new(1);
/// static SHADOWS: ShadowStore = ShadowStore::new();
///
/// let parent = 0x1000_usize;
/// let guard = SHADOWS.pin();
/// let count = PS_LOCK_COUNT
///     .get_or_alloc_with(&guard, parent, |_| Ok(AtomicU32::new(0)))
///     .unwrap();
/// count.fetch_add(1, Ordering::Relaxed);
/// drop(guard);
/// assert!(PS_LOCK_COUNT.free(&SHADOWS, parent));
/// ```
///
/// The data is shared between threads, so `T: Send + Sync`; mutate it through interior
/// mutability (atomics, a lock). References borrow from a [`Guard`], so they cannot
/// outlive the pinned section, and a concurrent free only returns the memory, and runs
/// `T`'s `Drop`, after the guard is gone. A typed variable is only seen by lookups of the
/// same `T`; lookups through another type see nothing (or
/// [`ShadowError::TypeMismatch`]).
///
/// Using an id with another type does not compile:
///
/// ```compile_fail
/// use klp::shadow::{ShadowId, ShadowStore};
/// const FLAG: ShadowId<u32> = ShadowId::new(2);
/// let store = ShadowStore::new();
/// let guard = store.pin();
/// let wrong: Option<&u64> = FLAG.get(&guard, 0x1000);
/// ```
///
/// Nor can a reference outlive its guard:
///
/// ```compile_fail
/// use klp::shadow::{ShadowId, ShadowStore};
/// const FLAG: ShadowId<u32> = ShadowId::new(2);
/// let store = ShadowStore::new();
/// let guard = store.pin();
/// let value = FLAG.get(&guard, 0x1000);
/// drop(guard);
/// let _ = value;
/// ```
pub struct ShadowId<T> {
    id: u64,
    _data: PhantomData<fn() -> T>,
}

impl<T> Clone for ShadowId<T> {
    fn clone(&self) -> Self {
        *self
    }
}

impl<T> Copy for ShadowId<T> {}

impl<T> fmt::Debug for ShadowId<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "ShadowId<{}>({:#x})",
            core::any::type_name::<T>(),
            self.id
        )
    }
}

impl<T> ShadowId<T> {
    /// Binds `id` to `T`.
    pub const fn new(id: u64) -> Self {
        ShadowId {
            id,
            _data: PhantomData,
        }
    }

    /// The numeric id.
    pub const fn id(&self) -> u64 {
        self.id
    }
}

/// Drops the `T` at `data`.
///
/// # Safety
///
/// 1. `data` points to a valid, exclusively owned `T` that is not used afterwards.
unsafe fn drop_erased<T>(data: *mut u8) {
    // SAFETY: condition 1.
    unsafe { core::ptr::drop_in_place(data.cast::<T>()) }
}

impl<T: Send + Sync + 'static> ShadowId<T> {
    fn spec() -> Spec {
        Spec {
            size: core::mem::size_of::<T>(),
            align: core::mem::align_of::<T>(),
            tag: TypeId::of::<T>(),
            drop_data: Some(drop_erased::<T>),
        }
    }

    fn is_mine(node: &Node) -> bool {
        node.tag == TypeId::of::<T>()
    }

    /// The data of a node typed `T`.
    ///
    /// # Safety
    ///
    /// 1. `node` is live for `'g` and its tag is `TypeId::of::<T>()`.
    unsafe fn data<'g>(node: NonNull<Node>) -> &'g T {
        // SAFETY: a node tagged `T` holds a valid, aligned `T` at its data offset (Node
        // invariants 1, 2) that lives for 'g (condition 1) and is only shared from now on.
        unsafe {
            Node::data_aligned(node, core::mem::align_of::<T>())
                .cast::<T>()
                .as_ref()
        }
    }

    fn create<'g>(
        &self,
        guard: &'g Guard<'_>,
        obj: usize,
        get_existing: bool,
        ctor: impl FnOnce(usize) -> Result<T, i32>,
    ) -> Result<&'g T, ShadowError> {
        let mode = if get_existing {
            Mode::GetOrAlloc(guard)
        } else {
            Mode::Alloc(Some(guard))
        };
        let node = guard.store.create(
            obj,
            self.id,
            &Self::spec(),
            mode,
            |data| {
                let value = ctor(obj)?;
                // SAFETY: the fresh node's data is sized and aligned for `T` (Spec) and
                // unshared; the value is written only on success, as `create` assumes.
                unsafe { data.cast::<T>().write(value) };
                Ok(())
            },
            &GlobalCx,
        )?;
        // SAFETY: `create` returns a node that is live while `guard` is pinned (it was
        // found or published while pinned), tagged `T` (a new node has our spec; an
        // existing one passed the tag check).
        Ok(unsafe { Self::data(node) })
    }

    /// The `T` attached to `obj`, if any.
    pub fn get<'g>(&self, guard: &'g Guard<'_>, obj: usize) -> Option<&'g T> {
        let node = guard.store.lookup(guard, obj, self.id)?;
        // SAFETY: found while `guard` is pinned, so live for 'g.
        if !Self::is_mine(unsafe { node.as_ref() }) {
            return None;
        }
        // SAFETY: live for 'g, tag checked.
        Some(unsafe { Self::data(node) })
    }

    /// Attaches `value` to `obj`.
    ///
    /// # Errors
    ///
    /// [`ShadowError::Exists`] (the value is dropped), [`ShadowError::NoMem`].
    pub fn alloc<'g>(
        &self,
        guard: &'g Guard<'_>,
        obj: usize,
        value: T,
    ) -> Result<&'g T, ShadowError> {
        self.create(guard, obj, false, |_| Ok(value))
    }

    /// Attaches the value `ctor(obj)` builds, under the shard lock (it must not block or
    /// call into the store); an `Err(errno)` publishes nothing.
    ///
    /// # Errors
    ///
    /// [`ShadowError::Exists`] (`ctor` not run), [`ShadowError::Ctor`],
    /// [`ShadowError::NoMem`].
    pub fn alloc_with<'g>(
        &self,
        guard: &'g Guard<'_>,
        obj: usize,
        ctor: impl FnOnce(usize) -> Result<T, i32>,
    ) -> Result<&'g T, ShadowError> {
        self.create(guard, obj, false, ctor)
    }

    /// The existing `T` of `obj`, or a new one built by `ctor(obj)` (which runs only if
    /// this call creates the variable). One variable per pair even when threads race.
    ///
    /// # Errors
    ///
    /// [`ShadowError::Ctor`], [`ShadowError::TypeMismatch`] if the pair holds another
    /// type, [`ShadowError::NoMem`].
    pub fn get_or_alloc_with<'g>(
        &self,
        guard: &'g Guard<'_>,
        obj: usize,
        ctor: impl FnOnce(usize) -> Result<T, i32>,
    ) -> Result<&'g T, ShadowError> {
        self.create(guard, obj, true, ctor)
    }

    /// Frees the `T` of `obj` (dropped after a grace period). Returns whether one was
    /// freed; a variable of another type under this id is left alone.
    pub fn free(&self, store: &ShadowStore, obj: usize) -> bool {
        self.free_with(store, obj, |_, _| {})
    }

    /// Like [`ShadowId::free`], calling `dtor(obj, &value)` under the shard lock first.
    pub fn free_with(&self, store: &ShadowStore, obj: usize, dtor: impl FnOnce(usize, &T)) -> bool {
        let h = super::hash(obj, self.id);
        let mut dtor = Some(dtor);
        store.shard(h).remove(
            &store.epochs,
            Some((h, obj, self.id)),
            self.id,
            Self::is_mine,
            |node| {
                if let Some(d) = dtor.take() {
                    // SAFETY: just unlinked, not yet retired: live; tag checked by `pick`.
                    d(obj, unsafe { Self::data(node) });
                }
            },
            &GlobalCx,
        ) > 0
    }

    /// Frees every `T` with this id, whatever its parent. Returns how many.
    pub fn free_all(&self, store: &ShadowStore) -> usize {
        self.free_all_with(store, |_, _| {})
    }

    /// Like [`ShadowId::free_all`], calling `dtor(obj, &value)` for each under its shard's
    /// lock.
    pub fn free_all_with(&self, store: &ShadowStore, mut dtor: impl FnMut(usize, &T)) -> usize {
        store
            .shards
            .iter()
            .map(|shard| {
                shard.0.remove(
                    &store.epochs,
                    None,
                    self.id,
                    Self::is_mine,
                    |node| {
                        // SAFETY: just unlinked, not yet retired: live; tag checked by `pick`.
                        let (obj, value) = unsafe { (node.as_ref().obj, Self::data(node)) };
                        dtor(obj, value);
                    },
                    &GlobalCx,
                )
            })
            .sum()
    }
}
