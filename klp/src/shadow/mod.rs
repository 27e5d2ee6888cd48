//! Shadow variables: data attached to an existing object without changing its layout.
//!
//! A livepatch that needs a new field in a structure it cannot change attaches a *shadow
//! variable* to each instance instead. A variable is keyed by `<obj, id>`: `obj` is the
//! parent object's address (any pointer-sized key) and `id` tells variables of one
//! parent apart. At most one variable exists per pair; one parent may carry many ids and
//! one id may sit on many parents. Variables belong to no patch: they live until freed
//! explicitly, so cumulative patches can hand them over to each other.
//!
//! # Two levels
//!
//! * The kernel-like, untyped level on [`ShadowStore`]: [`get`](ShadowStore::get),
//!   [`alloc`](ShadowStore::alloc), [`get_or_alloc`](ShadowStore::get_or_alloc),
//!   [`free`](ShadowStore::free), [`free_all`](ShadowStore::free_all) and their `_with`
//!   forms taking a constructor or destructor. Data is `size` zero-filled bytes with a
//!   stable address until the variable is freed; these calls return that address as a
//!   [`ShadowAddr`]. Reading or writing through it is `unsafe`, with the kernel's
//!   contract: the caller makes sure nobody frees the variable meanwhile.
//! * The typed level, [`ShadowId<T>`]: an id bound to a data type, so that using the
//!   wrong type with an id does not compile. Its lookups go through a [`Guard`] and return
//!   `&T` borrowed from the guard, so safe code cannot use a variable after it was freed,
//!   even if another thread frees it: the memory is returned only once every guard that
//!   could see it is gone (this is the kernel's RCU grace period).
//!
//! Both levels share one store and one key space. A typed variable is invisible to the
//! other type's lookups ([`ShadowError::TypeMismatch`] where an error is due) and its
//! bytes are not exposed untyped.
//!
//! # Semantics shared with the kernel
//!
//! * Creation allocates zero-filled data outside the lock, then, under the shard's lock,
//!   looks the pair up again, runs the constructor (once, only for the variable actually
//!   created) and publishes the variable. A constructor error publishes nothing.
//!   Constructors (and destructors) run under a spin lock: they must not block or call
//!   back into the store. `get_or_alloc` and the typed calls first look the pair up
//!   without the lock, as the kernel does; the untyped `alloc`, which expects a new pair,
//!   goes straight to the lock.
//! * [`ShadowStore::alloc`] on an existing pair fails with [`ShadowError::Exists`] (the
//!   kernel's WARN `Duplicate shadow variable <%p, %lx>`) without running the constructor;
//!   [`ShadowStore::get_or_alloc`] returns the existing variable.
//! * Freeing unlinks the variable, runs the destructor (if given) under the lock with
//!   `(obj, data)`, and returns the memory after a grace period. Freeing a missing pair
//!   does nothing.
//! * Nothing aborts on out-of-memory: allocations are fallible and report
//!   [`ShadowError::NoMem`].
//!
//! # The store
//!
//! 64 shards selected by a hash of `<obj, id>`; each is an open-addressing table that
//! grows and shrinks with its content (amortised O(1) at any size, unlike the kernel's
//! fixed 4096 buckets), readers probe it without any lock, and one spin lock per shard
//! serialises its writers. Unlinked nodes and replaced tables are reclaimed through
//! epochs (see [`Guard`]): a freed variable waits on its shard's list until every guard
//! that could see it is gone. A shard tries to reclaim after every 32 retirements, so a
//! few dozen freed variables per shard may wait for the next write to that shard;
//! [`ShadowStore::reclaim`] returns everything that no guard still sees. Dropping the
//! store frees what it still holds (dropping typed values) without calling destructor
//! callbacks. [`ShadowStore::new`] is `const` and allocates nothing, so a store can be a
//! `static`.
//!
//! Keys are hashed with a fixed function (no per-store seed: there is no entropy source
//! in `no_std`), which is fine for kernel addresses but would let a caller who chooses
//! keys adversarially make one shard's probes long.
//!
//! # Example (the kernel-like level)
//!
//! ```
//! use klp::shadow::{ShadowError, ShadowStore};
//!
//! static SHADOWS: ShadowStore = ShadowStore::new();
//! const PS_LOCK: u64 = 1;
//! let sta = 0xffff_8880_1234_5000_usize; // the parent object's address
//!
//! let data = SHADOWS
//!     .alloc_with(sta, PS_LOCK, 8, |_obj, data| {
//!         data.copy_from_slice(&42u64.to_ne_bytes());
//!         Ok(())
//!     })
//!     .unwrap();
//! assert_eq!(SHADOWS.get(sta, PS_LOCK), Some(data));
//! let dup = SHADOWS.alloc(sta, PS_LOCK, 8).unwrap_err();
//! assert_eq!(dup, ShadowError::Exists { obj: sta, id: PS_LOCK });
//! assert_eq!(dup.to_string(), "Duplicate shadow variable <ffff888012345000, 1>");
//! {
//!     let guard = SHADOWS.pin();
//!     let var = guard.get(sta, PS_LOCK).unwrap();
//!     assert_eq!(var.bytes(), Some(&42u64.to_ne_bytes()[..]));
//! }
//! assert!(SHADOWS.free_with(sta, PS_LOCK, |obj, data| assert_eq!(obj, data.obj())));
//! assert_eq!(SHADOWS.get(sta, PS_LOCK), None);
//! ```

mod epoch;
mod sync;
mod table;
mod typed;

use core::any::TypeId;
use core::fmt;
use core::marker::PhantomData;
use core::ptr::NonNull;
use epoch::{Epochs, Padded};
use sync::{AtomicUsize, loom_const_fn};
pub(crate) use table::hash;
use table::{Found, Node, Shard, Spec, UNTYPED_ALIGN, Untyped};

pub use typed::ShadowId;

/// Shards per store (a power of two).
const SHARD_BITS: u32 = 6;
const SHARDS: usize = 1 << SHARD_BITS;

/// `-EEXIST`.
const EEXIST: i32 = 17;
/// `-ENOMEM`.
const ENOMEM: i32 = 12;
/// `-EINVAL`.
const EINVAL: i32 = 22;

/// The calling context of a store operation, as a kernel knows it: where the memory
/// of a new variable comes from (the caller's `gfp_t`) and what must hold while a
/// shard's spin lock is held (`spin_lock_irqsave`: interrupts off on this CPU, so that
/// an interrupt handler using the store cannot spin on a lock its CPU holds).
/// [`GlobalCx`] is the default: the global allocator, nothing around the lock.
/// [`ShadowStore::in_cx`] runs the kernel-like calls in another context.
///
/// Memory the store needs while it holds a lock (its tables grow and shrink there)
/// always comes from the global allocator: a kernel's allocator must then not sleep
/// (it sees interrupts off).
///
/// # Safety
///
/// Implementations guarantee:
/// 1. [`ShadowCx::alloc_zeroed`] returns null or a block of `layout`'s size and alignment,
///    zero-filled, that the global allocator's `dealloc` can free with that layout
///    (the store frees every variable that way, possibly from another context).
/// 2. [`ShadowCx::lock_exit`] undoes what the [`ShadowCx::lock_enter`] that returned
///    `token` did; pairs nest.
pub unsafe trait ShadowCx {
    /// Zeroed memory for a new variable, taken before any lock (null on failure).
    fn alloc_zeroed(&self, layout: core::alloc::Layout) -> *mut u8;
    /// Called just before a shard's lock is taken; the result goes to `lock_exit`.
    fn lock_enter(&self) -> usize {
        0
    }
    /// Called just after the shard's lock is released.
    fn lock_exit(&self, token: usize) {
        let _ = token;
    }
}

/// The default context: the global allocator, nothing done around the locks.
#[derive(Debug, Clone, Copy, Default)]
pub struct GlobalCx;

// SAFETY: (1) `alloc_zeroed` is the global allocator's own; (2) the lock hooks do
// nothing.
unsafe impl ShadowCx for GlobalCx {
    fn alloc_zeroed(&self, layout: core::alloc::Layout) -> *mut u8 {
        if layout.size() == 0 {
            return core::ptr::null_mut();
        }
        // SAFETY: the layout is not zero-sized (checked above).
        unsafe { alloc::alloc::alloc_zeroed(layout) }
    }
}

/// A store seen from one calling context ([`ShadowStore::in_cx`]): the kernel-like calls
/// that allocate or take a lock, with the context's allocation and lock hooks.
#[derive(Clone, Copy)]
pub struct InCx<'s> {
    store: &'s ShadowStore,
    cx: &'s dyn ShadowCx,
}

impl fmt::Debug for InCx<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("InCx")
            .field("store", self.store)
            .finish_non_exhaustive()
    }
}

impl InCx<'_> {
    /// [`ShadowStore::alloc_with`] in this context.
    ///
    /// # Errors
    ///
    /// As [`ShadowStore::alloc_with`].
    pub fn alloc_with(
        &self,
        obj: usize,
        id: u64,
        size: usize,
        ctor: impl FnOnce(usize, &mut [u8]) -> Result<(), i32>,
    ) -> Result<ShadowAddr, ShadowError> {
        self.store
            .create_untyped(obj, id, size, false, ctor, self.cx)
    }

    /// [`ShadowStore::get_or_alloc_with`] in this context.
    ///
    /// # Errors
    ///
    /// As [`ShadowStore::get_or_alloc_with`].
    pub fn get_or_alloc_with(
        &self,
        obj: usize,
        id: u64,
        size: usize,
        ctor: impl FnOnce(usize, &mut [u8]) -> Result<(), i32>,
    ) -> Result<ShadowAddr, ShadowError> {
        self.store
            .create_untyped(obj, id, size, true, ctor, self.cx)
    }

    /// [`ShadowStore::free_with`] in this context.
    pub fn free_with(&self, obj: usize, id: u64, dtor: impl FnOnce(usize, ShadowRef<'_>)) -> bool {
        self.store.free_in(obj, id, dtor, self.cx)
    }

    /// [`ShadowStore::free_all_with`] in this context.
    pub fn free_all_with(&self, id: u64, dtor: impl FnMut(usize, ShadowRef<'_>)) -> usize {
        self.store.free_all_in(id, dtor, self.cx)
    }
}

/// Why a shadow-variable operation failed.
///
/// `Display` gives the kernel's message text, without the `livepatch: ` prefix and
/// without a trailing newline. `%p` is rendered as 16 hex digits of the raw key (the
/// kernel hashes pointers; a host that wants that can format the fields itself).
#[non_exhaustive]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ShadowError {
    /// `alloc` of a pair that already exists (kernel WARN `Duplicate shadow variable`).
    /// The constructor did not run.
    Exists {
        /// Parent key.
        obj: usize,
        /// Variable id.
        id: u64,
    },
    /// The constructor returned an error; nothing was published.
    Ctor {
        /// Parent key.
        obj: usize,
        /// Variable id.
        id: u64,
        /// The constructor's error (a negative errno by convention).
        err: i32,
    },
    /// Memory could not be allocated (the kernel returns NULL silently).
    NoMem,
    /// The pair exists with a different data type (typed or untyped) than asked for.
    TypeMismatch {
        /// Parent key.
        obj: usize,
        /// Variable id.
        id: u64,
    },
}

impl ShadowError {
    /// The error as a negative errno: `-EEXIST`, the constructor's error, `-ENOMEM`, or
    /// `-EINVAL` for a type mismatch.
    pub fn errno(&self) -> i32 {
        match *self {
            ShadowError::Exists { .. } => -EEXIST,
            ShadowError::Ctor { err, .. } => err,
            ShadowError::NoMem => -ENOMEM,
            ShadowError::TypeMismatch { .. } => -EINVAL,
        }
    }
}

impl fmt::Display for ShadowError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            ShadowError::Exists { obj, id } => {
                write!(f, "Duplicate shadow variable <{obj:016x}, {id:x}>")
            }
            ShadowError::Ctor { obj, id, err } => {
                write!(
                    f,
                    "Failed to construct shadow variable <{obj:016x}, {id:x}> ({err})"
                )
            }
            ShadowError::NoMem => f.write_str("Out of memory for a shadow variable"),
            ShadowError::TypeMismatch { obj, id } => {
                write!(
                    f,
                    "Shadow variable <{obj:016x}, {id:x}> has another data type"
                )
            }
        }
    }
}

impl core::error::Error for ShadowError {}

/// The address and size of a variable's data: what the kernel API returns.
///
/// Holding a `ShadowAddr` does not keep the variable alive. The pointer stays valid until
/// the variable is freed (and, for a reader pinned before the free, until its [`Guard`]
/// drops); reading or writing through it is `unsafe`, and the caller must provide mutual
/// exclusion for the data, as in the kernel. Writing is only allowed while no
/// [`ShadowRef::bytes`] borrow of the same variable is alive.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ShadowAddr {
    ptr: NonNull<u8>,
    len: usize,
}

// SAFETY: a `ShadowAddr` is an address and a length; it gives no access by itself (every
// dereference is the caller's `unsafe`), so sending or sharing it is harmless.
unsafe impl Send for ShadowAddr {}
// SAFETY: as above.
unsafe impl Sync for ShadowAddr {}

impl ShadowAddr {
    /// Pointer to the data (aligned to 16 bytes for untyped variables).
    pub fn as_ptr(&self) -> *mut u8 {
        self.ptr.as_ptr()
    }

    /// The data address as an integer (the identity the kernel prints).
    pub fn addr(&self) -> usize {
        self.ptr.as_ptr() as usize
    }

    /// Size of the data in bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the data is zero bytes long.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

/// A variable seen through a [`Guard`]: valid for as long as the guard lives, even if
/// another thread frees the variable meanwhile.
#[derive(Clone, Copy)]
pub struct ShadowRef<'g> {
    node: NonNull<Node>,
    _guard: PhantomData<&'g Node>,
}

// SAFETY: a `ShadowRef` only gives shared access: the header fields, which never change
// (Node invariant 3), and untyped bytes as `&[u8]`. `&[u8]` is `Send + Sync`.
unsafe impl Send for ShadowRef<'_> {}
// SAFETY: as above.
unsafe impl Sync for ShadowRef<'_> {}

impl fmt::Debug for ShadowRef<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ShadowRef")
            .field("obj", &self.obj())
            .field("id", &self.id())
            .field("addr", &self.addr().as_ptr())
            .field("len", &self.len())
            .finish()
    }
}

impl<'g> ShadowRef<'g> {
    fn node(&self) -> &'g Node {
        // SAFETY: the node stays live for 'g: it was reachable while the guard was pinned
        // and is only freed after the guard unpins (or, in a destructor, it is not yet
        // retired).
        unsafe { &*self.node.as_ptr() }
    }

    /// The parent key.
    pub fn obj(&self) -> usize {
        self.node().obj
    }

    /// The id.
    pub fn id(&self) -> u64 {
        self.node().id
    }

    /// Size of the data in bytes.
    pub fn len(&self) -> usize {
        self.node().size
    }

    /// Whether the data is zero bytes long.
    pub fn is_empty(&self) -> bool {
        self.node().size == 0
    }

    /// Whether this variable was created through a [`ShadowId`] (typed data).
    pub fn is_typed(&self) -> bool {
        !self.node().is_untyped()
    }

    /// The data address.
    pub fn addr(&self) -> ShadowAddr {
        ShadowAddr {
            // SAFETY: the node is live for 'g.
            ptr: unsafe { Node::data(self.node) },
            len: self.len(),
        }
    }

    /// The data bytes of an untyped variable; `None` for a typed one (whose bytes may
    /// include padding).
    pub fn bytes(&self) -> Option<&'g [u8]> {
        let node = self.node();
        if !node.is_untyped() {
            return None;
        }
        // SAFETY: untyped data is `size` initialised bytes at the untyped offset (Node
        // invariants 1, 2), live for 'g; writers through `ShadowAddr::as_ptr` must not
        // write while this borrow lives (their documented contract).
        Some(unsafe {
            let data = Node::data_aligned(self.node, UNTYPED_ALIGN);
            core::slice::from_raw_parts(data.as_ptr(), node.size)
        })
    }
}

/// A pinned read-side critical section (the kernel's `rcu_read_lock()`).
///
/// Variables found while a guard is alive stay allocated until it drops, whoever frees
/// them; references returned through it borrow from it. A guard is cheap to hold across
/// many lookups, but a long-lived guard holds back all reclamation in its store. Guards
/// nest freely and may be used from any thread.
pub struct Guard<'s> {
    store: &'s ShadowStore,
    slot: &'s AtomicUsize,
}

impl fmt::Debug for Guard<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Guard").finish_non_exhaustive()
    }
}

impl Drop for Guard<'_> {
    fn drop(&mut self) {
        Epochs::unpin(self.slot);
    }
}

impl<'s> Guard<'s> {
    /// The store this guard pins.
    pub fn store(&self) -> &'s ShadowStore {
        self.store
    }

    /// Looks `<obj, id>` up (any data type).
    #[inline]
    pub fn get(&self, obj: usize, id: u64) -> Option<ShadowRef<'_>> {
        self.store.lookup(self, obj, id).map(|node| ShadowRef {
            node,
            _guard: PhantomData,
        })
    }
}

/// Whether a create call fails on an existing pair (optionally checking first without
/// the lock, under the caller's guard) or returns it (which needs a guard).
#[derive(Clone, Copy)]
enum Mode<'g, 's> {
    Alloc(Option<&'g Guard<'s>>),
    GetOrAlloc(&'g Guard<'s>),
}

/// The untyped data layout: zeroed bytes aligned like the kernel's `kzalloc`.
fn untyped(size: usize) -> Spec {
    Spec {
        size,
        align: UNTYPED_ALIGN,
        tag: TypeId::of::<Untyped>(),
        drop_data: None,
    }
}

/// A concurrent store of shadow variables. See the [module documentation](self).
pub struct ShadowStore {
    shards: [Padded<Shard>; SHARDS],
    epochs: Epochs,
}

impl fmt::Debug for ShadowStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ShadowStore")
            .field("len", &self.len())
            .finish_non_exhaustive()
    }
}

impl Default for ShadowStore {
    fn default() -> Self {
        ShadowStore::new()
    }
}

impl Drop for ShadowStore {
    fn drop(&mut self) {
        for shard in &mut self.shards {
            // SAFETY: `&mut self`: no guard (they borrow the store) and no other user.
            unsafe { shard.0.destroy() };
        }
    }
}

impl ShadowStore {
    loom_const_fn! {
        /// An empty store. Allocates nothing; usable in a `static`.
        pub fn new() -> Self {
            ShadowStore {
                shards: [const { Padded(Shard::new()) }; SHARDS],
                epochs: Epochs::new(),
            }
        }
    }

    #[inline]
    // reason: the top SHARD_BITS bits of a u64 are always below the shard count.
    #[allow(clippy::indexing_slicing)]
    fn shard(&self, h: u64) -> &Shard {
        &self.shards[(h >> (64 - SHARD_BITS)) as usize].0
    }

    /// The store's allocating and locking calls in the calling context `cx` (see
    /// [`ShadowCx`]).
    pub fn in_cx<'s>(&'s self, cx: &'s dyn ShadowCx) -> InCx<'s> {
        InCx { store: self, cx }
    }

    /// Pins the store for lock-free reads.
    #[inline]
    pub fn pin(&self) -> Guard<'_> {
        Guard {
            store: self,
            slot: self.epochs.pin(),
        }
    }

    #[inline]
    fn lookup(&self, guard: &Guard<'_>, obj: usize, id: u64) -> Option<NonNull<Node>> {
        let _ = guard;
        let h = hash(obj, id);
        // SAFETY: `guard` pins this store (guards are only made by `ShadowStore::pin`),
        // and the caller keeps the result no longer than the guard.
        unsafe { self.shard(h).get(h, obj, id) }
    }

    /// The shared creation path. Returns the new or (for `GetOrAlloc`) existing node.
    fn create(
        &self,
        obj: usize,
        id: u64,
        spec: &Spec,
        mode: Mode<'_, '_>,
        init: impl FnOnce(NonNull<u8>) -> Result<(), i32>,
        cx: &dyn ShadowCx,
    ) -> Result<NonNull<Node>, ShadowError> {
        let existing = |node: NonNull<Node>| match mode {
            Mode::Alloc(_) => Err(ShadowError::Exists { obj, id }),
            Mode::GetOrAlloc(_) => {
                // SAFETY: found while the `GetOrAlloc` guard is pinned, so live for as
                // long as that guard.
                if unsafe { node.as_ref() }.tag != spec.tag {
                    return Err(ShadowError::TypeMismatch { obj, id });
                }
                Ok(node)
            }
        };
        let pinned = match mode {
            Mode::Alloc(guard) => guard,
            Mode::GetOrAlloc(guard) => Some(guard),
        };
        // The kernel's lock-free look-up first, when the caller is pinned anyway: no
        // allocation and no lock for a pair that exists.
        if let Some(node) = pinned.and_then(|guard| self.lookup(guard, obj, id)) {
            return existing(node);
        }
        let node = Node::alloc(obj, id, spec, cx).ok_or(ShadowError::NoMem)?;
        let h = hash(obj, id);
        let result = self.shard(h).insert_with(
            &self.epochs,
            h,
            node,
            |n| {
                // SAFETY: `n` is our fresh node; its data is zero-filled and unshared.
                let data = unsafe { Node::data(n) };
                init(data).map_err(|err| ShadowError::Ctor { obj, id, err })
            },
            ShadowError::NoMem,
            cx,
        );
        match result {
            Ok(Found::Inserted) => Ok(node),
            Ok(Found::Existing(other)) => {
                // SAFETY: never published; `init` did not run, so nothing to drop.
                unsafe { Node::discard(node) };
                existing(other)
            }
            Err(e) => {
                // SAFETY: never published; `init` failed (typed inits write the value only
                // on success), so nothing to drop.
                unsafe { Node::discard(node) };
                Err(e)
            }
        }
    }

    fn create_untyped(
        &self,
        obj: usize,
        id: u64,
        size: usize,
        get_existing: bool,
        ctor: impl FnOnce(usize, &mut [u8]) -> Result<(), i32>,
        cx: &dyn ShadowCx,
    ) -> Result<ShadowAddr, ShadowError> {
        let mut created = None;
        let init = |data: NonNull<u8>| {
            // SAFETY: the fresh node's `size` zeroed bytes, not yet visible to anyone.
            let bytes = unsafe { core::slice::from_raw_parts_mut(data.as_ptr(), size) };
            ctor(obj, bytes)?;
            created = Some(ShadowAddr {
                ptr: data,
                len: size,
            });
            Ok(())
        };
        if get_existing {
            let guard = self.pin();
            let node = self.create(obj, id, &untyped(size), Mode::GetOrAlloc(&guard), init, cx)?;
            // `guard` is still pinned, so the node is live while we read its address.
            return Ok(ShadowRef {
                node,
                _guard: PhantomData,
            }
            .addr());
        }
        // No pin: the look-up under the lock decides, and the address is taken there
        // (another thread may free the variable as soon as the lock drops).
        self.create(obj, id, &untyped(size), Mode::Alloc(None), init, cx)?;
        created.ok_or(ShadowError::NoMem)
    }

    /// `klp_shadow_get`: the data address of `<obj, id>`, or `None`.
    ///
    /// Typed variables are found too (their address is returned; their bytes are not
    /// exposed). Use [`Guard::get`] for safe access to the data.
    pub fn get(&self, obj: usize, id: u64) -> Option<ShadowAddr> {
        self.pin().get(obj, id).map(|r| r.addr())
    }

    /// `klp_shadow_alloc` without constructor: `size` zero bytes for `<obj, id>`.
    ///
    /// # Errors
    ///
    /// [`ShadowError::Exists`] if the pair exists, [`ShadowError::NoMem`].
    pub fn alloc(&self, obj: usize, id: u64, size: usize) -> Result<ShadowAddr, ShadowError> {
        self.create_untyped(obj, id, size, false, |_, _| Ok(()), &GlobalCx)
    }

    /// `klp_shadow_alloc` with a constructor: `ctor(obj, data)` runs on the zeroed data
    /// under the shard lock before the variable is published. It must not block or call
    /// into this store.
    ///
    /// # Errors
    ///
    /// [`ShadowError::Exists`] (constructor not run), [`ShadowError::Ctor`] (nothing
    /// published), [`ShadowError::NoMem`].
    pub fn alloc_with(
        &self,
        obj: usize,
        id: u64,
        size: usize,
        ctor: impl FnOnce(usize, &mut [u8]) -> Result<(), i32>,
    ) -> Result<ShadowAddr, ShadowError> {
        self.create_untyped(obj, id, size, false, ctor, &GlobalCx)
    }

    /// `klp_shadow_get_or_alloc` without constructor: the existing variable, or a new one
    /// of `size` zero bytes. One variable per pair even when threads race.
    ///
    /// # Errors
    ///
    /// [`ShadowError::TypeMismatch`] if the existing variable is typed,
    /// [`ShadowError::NoMem`].
    pub fn get_or_alloc(
        &self,
        obj: usize,
        id: u64,
        size: usize,
    ) -> Result<ShadowAddr, ShadowError> {
        self.create_untyped(obj, id, size, true, |_, _| Ok(()), &GlobalCx)
    }

    /// `klp_shadow_get_or_alloc` with a constructor, which runs only if this call creates
    /// the variable (see [`ShadowStore::alloc_with`] for its rules). The existing
    /// variable's size is kept even if `size` differs.
    ///
    /// # Errors
    ///
    /// [`ShadowError::Ctor`], [`ShadowError::TypeMismatch`], [`ShadowError::NoMem`].
    pub fn get_or_alloc_with(
        &self,
        obj: usize,
        id: u64,
        size: usize,
        ctor: impl FnOnce(usize, &mut [u8]) -> Result<(), i32>,
    ) -> Result<ShadowAddr, ShadowError> {
        self.create_untyped(obj, id, size, true, ctor, &GlobalCx)
    }

    /// `klp_shadow_free` without destructor. Returns whether a variable was freed.
    pub fn free(&self, obj: usize, id: u64) -> bool {
        self.free_with(obj, id, |_, _| {})
    }

    /// `klp_shadow_free`: unlinks `<obj, id>`, calls `dtor(obj, data)` under the shard
    /// lock, and returns the memory after a grace period (a typed value is dropped
    /// then). Nothing happens if the pair does not exist. Returns whether a variable was
    /// freed.
    pub fn free_with(&self, obj: usize, id: u64, dtor: impl FnOnce(usize, ShadowRef<'_>)) -> bool {
        self.free_in(obj, id, dtor, &GlobalCx)
    }

    fn free_in(
        &self,
        obj: usize,
        id: u64,
        dtor: impl FnOnce(usize, ShadowRef<'_>),
        cx: &dyn ShadowCx,
    ) -> bool {
        let h = hash(obj, id);
        let mut dtor = Some(dtor);
        self.shard(h).remove(
            &self.epochs,
            Some((h, obj, id)),
            id,
            |_| true,
            |node| {
                if let Some(d) = dtor.take() {
                    d(
                        obj,
                        ShadowRef {
                            node,
                            _guard: PhantomData,
                        },
                    );
                }
            },
            cx,
        ) > 0
    }

    /// `klp_shadow_free_all` without destructor. Returns how many variables were freed.
    pub fn free_all(&self, id: u64) -> usize {
        self.free_all_with(id, |_, _| {})
    }

    /// `klp_shadow_free_all`: frees every variable with `id`, whatever its parent,
    /// calling `dtor(obj, data)` for each under its shard's lock. Returns how many were
    /// freed.
    pub fn free_all_with(&self, id: u64, dtor: impl FnMut(usize, ShadowRef<'_>)) -> usize {
        self.free_all_in(id, dtor, &GlobalCx)
    }

    fn free_all_in(
        &self,
        id: u64,
        mut dtor: impl FnMut(usize, ShadowRef<'_>),
        cx: &dyn ShadowCx,
    ) -> usize {
        self.shards
            .iter()
            .map(|shard| {
                shard.0.remove(
                    &self.epochs,
                    None,
                    id,
                    |_| true,
                    |node| {
                        // SAFETY: the node is live (just unlinked, not yet retired).
                        let obj = unsafe { node.as_ref() }.obj;
                        dtor(
                            obj,
                            ShadowRef {
                                node,
                                _guard: PhantomData,
                            },
                        );
                    },
                    cx,
                )
            })
            .sum()
    }

    /// Frees the memory of freed variables that no guard can see any more (the shards
    /// also do this by themselves, in batches). Call it from a thread that holds no
    /// guard to return everything. Returns how many items (variables and old tables) were
    /// released.
    pub fn reclaim(&self) -> usize {
        let mut released: usize = 0;
        for _ in 0..3 {
            let global = self.epochs.try_advance();
            for shard in &self.shards {
                let garbage = shard.0.take_expired(global);
                released = released.saturating_add(garbage.len());
                // SAFETY: `take_expired` only returns expired items.
                unsafe { garbage.free_all() };
            }
        }
        released
    }

    /// Number of live variables (takes each shard's lock in turn; a snapshot only under
    /// concurrent writers).
    pub fn len(&self) -> usize {
        self.shards.iter().map(|s| s.0.counts().0).sum()
    }

    /// Whether the store holds no variable.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Freed variables and old tables whose memory is not returned yet.
    pub fn pending_reclaim(&self) -> usize {
        self.shards.iter().map(|s| s.0.counts().1).sum()
    }
}

// The store is `Send + Sync` through its parts: atomics, spin-locked shard state (whose
// retired lists are `Send`), and nodes that are only created with untyped bytes or a
// `T: Send + Sync` (`ShadowId`). Checked at compile time:
const _: () = {
    const fn send_sync<T: Send + Sync>() {}
    send_sync::<ShadowStore>();
    send_sync::<ShadowAddr>();
    send_sync::<ShadowRef<'static>>();
    send_sync::<Guard<'static>>();
};
