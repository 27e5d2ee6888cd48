//! One shard of the store: an open-addressing table that readers probe without a lock,
//! and a spin lock that serialises the shard's writers.
//!
//! Slots go `EMPTY → FULL → TOMB` and are never reused within one table: a writer that
//! inserts writes the key first and publishes the node pointer last (release), so a
//! reader that sees the pointer (acquire) also sees the key, and the key of a slot never
//! changes afterwards. Tombstones are dropped when the table is rebuilt (to grow, to
//! shrink, or to clean up), which allocates a new table, copies the live entries,
//! publishes it and retires the old one through the epochs.

use core::alloc::Layout;
use core::any::TypeId;
use core::ptr::{self, NonNull};
use core::sync::atomic::{AtomicPtr, AtomicU64, AtomicUsize, Ordering};

use spin::mutex::{SpinMutex, SpinMutexGuard};

use super::ShadowCx;
use super::epoch::{Epochs, RetireList, Retired};

/// Smallest table (slots).
const MIN_CAP: usize = 8;

/// How many retired items a shard collects before it tries to free some.
const RECLAIM_BATCH: usize = 32;

/// The header of a shadow variable; the data follows at `data_offset`.
///
/// # Invariants
///
/// 1. The allocation is `layout` bytes, allocated with `layout`, zero-filled at creation;
///    the data is `size` bytes at `data_offset == data_offset(align)`, where `align` is
///    the data's alignment (16 for untyped data).
/// 2. `tag` is `TypeId::of::<T>()` iff the data is a valid `T` and `drop_data` drops a
///    `T` in place; `tag == TypeId::of::<Untyped>()` means untyped, initialised bytes.
/// 3. `obj`, `id`, `size`, `tag`, `data_offset` never change after publication.
#[repr(C)]
#[derive(Debug)]
pub(crate) struct Node {
    // What only writers and the reclaimer touch.
    retired: Retired,
    layout: Layout,
    drop_data: Option<unsafe fn(*mut u8)>,
    pub(crate) obj: usize,
    pub(crate) id: u64,
    data_offset: usize,
    // What a reader touches, right before the data so that they tend to share a cache
    // line with it.
    pub(crate) tag: TypeId,
    pub(crate) size: usize,
}

/// The tag of untyped (byte) data.
pub(crate) enum Untyped {}

/// Alignment of untyped data (like `kmalloc`'s minimum on most architectures).
pub(crate) const UNTYPED_ALIGN: usize = 16;

/// Where the data of alignment `align` (a power of two) starts in a node.
#[inline]
pub(crate) const fn data_offset(align: usize) -> usize {
    let header = core::mem::size_of::<Node>();
    header.next_multiple_of(align)
}

/// What a new variable looks like.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Spec {
    pub(crate) size: usize,
    pub(crate) align: usize,
    pub(crate) tag: TypeId,
    pub(crate) drop_data: Option<unsafe fn(*mut u8)>,
}

impl Node {
    /// Allocates a zero-filled, unpublished node. `None` when the layout overflows or the
    /// allocator fails.
    pub(crate) fn alloc(
        obj: usize,
        id: u64,
        spec: &Spec,
        cx: &dyn ShadowCx,
    ) -> Option<NonNull<Node>> {
        if !spec.align.is_power_of_two() {
            return None;
        }
        let offset = data_offset(spec.align);
        let align = spec.align.max(core::mem::align_of::<Node>());
        let layout = Layout::from_size_align(offset.checked_add(spec.size)?, align)
            .ok()?
            .pad_to_align();
        // `layout` has the non-zero size of at least one `Node`; `cx` returns zeroed
        // memory of it that the global allocator can free (its contract).
        let raw = cx.alloc_zeroed(layout).cast::<Node>();
        let node = NonNull::new(raw)?;
        // SAFETY: `raw` is a fresh allocation that fits and aligns a `Node`.
        unsafe {
            raw.write(Node {
                retired: Retired::new(free_node),
                layout,
                drop_data: spec.drop_data,
                obj,
                id,
                data_offset: offset,
                tag: spec.tag,
                size: spec.size,
            });
        }
        Some(node)
    }

    /// Whether the data is untyped bytes.
    #[inline]
    pub(crate) fn is_untyped(&self) -> bool {
        self.tag == TypeId::of::<Untyped>()
    }

    /// The data address of `node`, knowing the data's alignment (no header read).
    ///
    /// # Safety
    ///
    /// 1. `node` points to a live node whose data has alignment `align`.
    #[inline]
    pub(crate) unsafe fn data_aligned(node: NonNull<Node>, align: usize) -> NonNull<u8> {
        // SAFETY: the data starts at `data_offset(align)` inside the allocation
        // (invariant 1, condition 1), so the result is in bounds and non-null.
        unsafe { node.cast::<u8>().add(data_offset(align)) }
    }

    /// The data address of `node`.
    ///
    /// # Safety
    ///
    /// 1. `node` points to a live node.
    #[inline]
    pub(crate) unsafe fn data(node: NonNull<Node>) -> NonNull<u8> {
        // SAFETY: the node is live (condition 1); `data_offset` stays inside its
        // allocation (invariant 1), so the result is in bounds and non-null.
        unsafe { node.cast::<u8>().add((*node.as_ptr()).data_offset) }
    }

    /// Frees an unpublished node whose data was never initialised as a typed value.
    ///
    /// # Safety
    ///
    /// 1. `node` came from [`Node::alloc`], was never published, and is not used again.
    /// 2. If the node is typed, its data was not initialised (so nothing is dropped).
    pub(crate) unsafe fn discard(node: NonNull<Node>) {
        // SAFETY: the node is live and ours (condition 1).
        let layout = unsafe { (*node.as_ptr()).layout };
        // SAFETY: allocated by `Node::alloc` with this layout (invariant 1), not used again.
        unsafe { alloc::alloc::dealloc(node.as_ptr().cast(), layout) };
    }
}

/// The `free` function of retired nodes: drops typed data, then returns the memory.
///
/// # Safety
///
/// 1. `item` is the [`Retired`] header of a published-then-retired [`Node`] that no
///    reader can reach any more, freed once.
unsafe fn free_node(item: *mut Retired) {
    let node = item.cast::<Node>();
    // SAFETY: `Retired` is the first field of the `#[repr(C)]` node, which is live and
    // exclusively ours (condition 1); its data is initialised as its tag says (invariant 2).
    unsafe {
        let data = Node::data(NonNull::new_unchecked(node));
        if let Some(drop_data) = (*node).drop_data {
            drop_data(data.as_ptr());
        }
        alloc::alloc::dealloc(node.cast(), (*node).layout);
    }
}

/// Marks a removed slot (never a node address: nodes are at least 8-aligned).
const TOMB: *mut Node = ptr::without_provenance_mut(1);

/// One slot: a key and the node it maps to.
#[derive(Debug)]
struct Slot {
    node: AtomicPtr<Node>,
    obj: AtomicUsize,
    id: AtomicU64,
}

/// A table: this header, then `mask + 1` slots.
///
/// # Invariants
///
/// 1. Allocated zero-filled with [`Table::layout`]`(mask + 1)`; `mask + 1` is a power of
///    two; all-zero slots are empty.
/// 2. At most three quarters of the slots are non-empty, so every probe meets an empty
///    slot.
/// 3. A non-empty slot's key never changes; its node is a live [`Node`] with that key,
///    or [`TOMB`].
#[repr(C)]
#[derive(Debug)]
struct Table {
    retired: Retired,
    mask: usize,
    slots: [Slot; 0],
}

impl Table {
    fn layout(cap: usize) -> Option<Layout> {
        let (layout, _) = Layout::new::<Table>()
            .extend(Layout::array::<Slot>(cap).ok()?)
            .ok()?;
        Some(layout.pad_to_align())
    }

    /// A new empty table of `cap` (a power of two) slots, or `None` on OOM.
    fn alloc(cap: usize) -> Option<NonNull<Table>> {
        let layout = Table::layout(cap)?;
        // SAFETY: `layout` is at least one `Table` header, not zero-sized.
        let raw = unsafe { alloc::alloc::alloc_zeroed(layout) }.cast::<Table>();
        let table = NonNull::new(raw)?;
        // SAFETY: fresh allocation that fits and aligns the header; the zeroed slots are
        // valid empty atomics.
        unsafe {
            ptr::addr_of_mut!((*raw).retired).write(Retired::new(free_table));
            ptr::addr_of_mut!((*raw).mask).write(cap.saturating_sub(1));
        }
        Some(table)
    }

    /// Slot `i`.
    ///
    /// # Safety
    ///
    /// 1. `table` is live and `i <= mask`.
    #[inline]
    unsafe fn slot<'a>(table: NonNull<Table>, i: usize) -> &'a Slot {
        // SAFETY: the slots follow the header inside the allocation (invariant 1) and
        // `i` is in bounds (condition 1).
        unsafe { &*ptr::addr_of!((*table.as_ptr()).slots).cast::<Slot>().add(i) }
    }

    /// Probes for `<obj, id>`. Returns the slot index and node.
    ///
    /// # Safety
    ///
    /// 1. `table` is live for the duration of the call (the caller is pinned, or holds
    ///    the shard lock).
    #[inline]
    unsafe fn find(
        table: NonNull<Table>,
        hash: u64,
        obj: usize,
        id: u64,
    ) -> Option<(usize, NonNull<Node>)> {
        // SAFETY: live (condition 1).
        let mask = unsafe { (*table.as_ptr()).mask };
        let mut i = hash as usize & mask;
        for _ in 0..=mask {
            // SAFETY: `i <= mask`, table live.
            let slot = unsafe { Table::slot(table, i) };
            let node = slot.node.load(Ordering::Acquire);
            if node.is_null() {
                return None;
            }
            if node != TOMB
                && slot.obj.load(Ordering::Relaxed) == obj
                && slot.id.load(Ordering::Relaxed) == id
            {
                // SAFETY: checked non-null.
                return Some((i, unsafe { NonNull::new_unchecked(node) }));
            }
            i = i.wrapping_add(1) & mask;
        }
        None
    }

    /// Writes `<obj, id> → node` into the first slot of the probe sequence that is empty
    /// or a tombstone of the same key (reusing it keeps the slot's key unchanged, so
    /// readers stay consistent, and stops a key that is freed and recreated over and over
    /// from lengthening its probe sequence each time). Returns whether an empty slot was
    /// consumed.
    ///
    /// # Safety
    ///
    /// 1. `table` is live, the caller holds the shard lock (or the table is unpublished),
    ///    the table has an empty slot, and `<obj, id>` has no live entry in it.
    unsafe fn insert(
        table: NonNull<Table>,
        hash: u64,
        obj: usize,
        id: u64,
        node: *mut Node,
    ) -> bool {
        // SAFETY: live (condition 1).
        let mask = unsafe { (*table.as_ptr()).mask };
        let mut i = hash as usize & mask;
        for _ in 0..=mask {
            // SAFETY: `i <= mask`, table live.
            let slot = unsafe { Table::slot(table, i) };
            let current = slot.node.load(Ordering::Relaxed);
            if current.is_null() {
                slot.obj.store(obj, Ordering::Relaxed);
                slot.id.store(id, Ordering::Relaxed);
                slot.node.store(node, Ordering::Release);
                return true;
            }
            if current == TOMB
                && slot.obj.load(Ordering::Relaxed) == obj
                && slot.id.load(Ordering::Relaxed) == id
            {
                slot.node.store(node, Ordering::Release);
                return false;
            }
            i = i.wrapping_add(1) & mask;
        }
        false
    }

    /// Number of slots.
    ///
    /// # Safety
    ///
    /// 1. `table` is live.
    unsafe fn cap(table: NonNull<Table>) -> usize {
        // SAFETY: live (condition 1).
        unsafe { (*table.as_ptr()).mask.saturating_add(1) }
    }
}

/// The `free` function of retired tables (the nodes are not touched).
///
/// # Safety
///
/// 1. `item` is the header of a retired [`Table`] that no reader can reach, freed once.
unsafe fn free_table(item: *mut Retired) {
    let table = item.cast::<Table>();
    // SAFETY: `Retired` is the first field of the `#[repr(C)]` table, which is live and
    // ours (condition 1); it was allocated with `Table::layout(mask + 1)` (invariant 1).
    unsafe {
        let cap = (*table).mask.saturating_add(1);
        if let Some(layout) = Table::layout(cap) {
            alloc::alloc::dealloc(table.cast(), layout);
        }
    }
}

/// A shard's lock taken in a caller's context: [`ShadowCx::lock_enter`] before the
/// lock is taken, [`ShadowCx::lock_exit`] after it is released (a kernel disables
/// interrupts around it, as `spin_lock_irqsave` does).
struct CxGuard<'a> {
    guard: core::mem::ManuallyDrop<SpinMutexGuard<'a, Inner>>,
    cx: &'a dyn ShadowCx,
    token: usize,
}

impl<'a> CxGuard<'a> {
    fn lock(m: &'a SpinMutex<Inner>, cx: &'a dyn ShadowCx) -> CxGuard<'a> {
        let token = cx.lock_enter();
        CxGuard {
            guard: core::mem::ManuallyDrop::new(m.lock()),
            cx,
            token,
        }
    }
}

impl core::ops::Deref for CxGuard<'_> {
    type Target = Inner;
    fn deref(&self) -> &Inner {
        &self.guard
    }
}

impl core::ops::DerefMut for CxGuard<'_> {
    fn deref_mut(&mut self) -> &mut Inner {
        &mut self.guard
    }
}

impl Drop for CxGuard<'_> {
    fn drop(&mut self) {
        // SAFETY: the guard is dropped here once and never used again: the lock is
        // released before the caller's context is restored.
        unsafe { core::mem::ManuallyDrop::drop(&mut self.guard) };
        self.cx.lock_exit(self.token);
    }
}

/// Writer-side state of a shard, behind its lock.
#[derive(Debug)]
struct Inner {
    /// Live variables in the current table.
    live: usize,
    /// Non-empty slots (live + tombstones) in the current table.
    used: usize,
    retired: RetireList,
    /// Length of `retired` at which the next reclaim attempt happens.
    collect_at: usize,
}

/// What a search under the lock found.
pub(crate) enum Found {
    /// An existing variable.
    Existing(NonNull<Node>),
    /// The new node was published.
    Inserted,
}

/// One shard.
///
/// # Invariants
///
/// 1. `table` is null or a live [`Table`] whose live/used counts are in `inner`; it is
///    replaced only under the lock, and a replaced table is retired, never freed directly.
/// 2. Every node reachable from `table` is live; a node is unlinked (tombstoned in the
///    current table) under the lock before it is retired.
#[derive(Debug)]
pub(crate) struct Shard {
    table: AtomicPtr<Table>,
    inner: SpinMutex<Inner>,
}

impl Shard {
    pub(crate) const fn new() -> Self {
        Shard {
            table: AtomicPtr::new(ptr::null_mut()),
            inner: SpinMutex::new(Inner {
                live: 0,
                used: 0,
                retired: RetireList::new(),
                collect_at: RECLAIM_BATCH,
            }),
        }
    }

    /// Lock-free lookup.
    ///
    /// # Safety
    ///
    /// 1. The caller is pinned (through the store's [`Epochs`]) for as long as it uses the
    ///    result.
    #[inline]
    pub(crate) unsafe fn get(&self, hash: u64, obj: usize, id: u64) -> Option<NonNull<Node>> {
        let table = NonNull::new(self.table.load(Ordering::Acquire))?;
        // SAFETY: a published table is retired, not freed, when replaced (invariant 1),
        // and the caller is pinned (condition 1), so it stays live.
        unsafe { Table::find(table, hash, obj, id) }.map(|(_, n)| n)
    }

    /// Under the lock: returns the existing variable, or reserves room, runs `init` on the
    /// new node and publishes it. `init` errors are returned with nothing published.
    pub(crate) fn insert_with<E>(
        &self,
        epochs: &Epochs,
        hash: u64,
        node: NonNull<Node>,
        init: impl FnOnce(NonNull<Node>) -> Result<(), E>,
        oom: E,
        cx: &dyn ShadowCx,
    ) -> Result<Found, E> {
        // SAFETY: the caller hands over a fresh node from `Node::alloc`.
        let (obj, id) = unsafe { ((*node.as_ptr()).obj, (*node.as_ptr()).id) };
        let mut inner = CxGuard::lock(&self.inner, cx);
        if let Some(table) = NonNull::new(self.table.load(Ordering::Relaxed)) {
            // SAFETY: we hold the lock, so the current table stays live (invariant 1).
            if let Some((_, existing)) = unsafe { Table::find(table, hash, obj, id) } {
                return Ok(Found::Existing(existing));
            }
        }
        if !self.reserve_one(&mut inner, epochs) {
            return Err(oom);
        }
        init(node)?;
        let table = self.table.load(Ordering::Relaxed);
        // SAFETY: `reserve_one` left a live table with an empty slot, we hold the lock, and
        // `find` above saw no live entry for the key.
        let consumed =
            unsafe { Table::insert(NonNull::new_unchecked(table), hash, obj, id, node.as_ptr()) };
        inner.live = inner.live.saturating_add(1);
        inner.used = inner.used.saturating_add(usize::from(consumed));
        let garbage = self.collect(&mut inner, epochs);
        drop(inner);
        // SAFETY: `collect` only returns expired items.
        unsafe { garbage.free_all() };
        Ok(Found::Inserted)
    }

    /// Makes sure the table can take one more entry without breaking table invariant 2.
    fn reserve_one(&self, inner: &mut Inner, epochs: &Epochs) -> bool {
        let table = NonNull::new(self.table.load(Ordering::Relaxed));
        let cap = match table {
            // SAFETY: the current table is live under the lock (invariant 1).
            Some(t) => unsafe { Table::cap(t) },
            None => 0,
        };
        if inner.used.saturating_add(1).saturating_mul(4) <= cap.saturating_mul(3) {
            return true;
        }
        let Some(want) = inner
            .live
            .saturating_add(1)
            .saturating_mul(2)
            .checked_next_power_of_two()
        else {
            return false;
        };
        let want = want.max(MIN_CAP);
        self.rebuild(inner, epochs, want)
    }

    /// Replaces the table by one of `cap` slots holding the live entries (`cap == 0`:
    /// no table). Returns false, changing nothing, on OOM.
    fn rebuild(&self, inner: &mut Inner, epochs: &Epochs, cap: usize) -> bool {
        let old = NonNull::new(self.table.load(Ordering::Relaxed));
        let new = if cap == 0 {
            None
        } else {
            match Table::alloc(cap) {
                Some(t) => Some(t),
                None => return false,
            }
        };
        if let (Some(old), Some(new)) = (old, new) {
            // SAFETY: `old` is live under the lock; `new` is unpublished with `cap` slots,
            // more than twice the live entries, so each insert finds an empty slot, and
            // keys are unique among live entries.
            unsafe {
                for i in 0..Table::cap(old) {
                    let slot = Table::slot(old, i);
                    let node = slot.node.load(Ordering::Relaxed);
                    if !node.is_null() && node != TOMB {
                        let obj = slot.obj.load(Ordering::Relaxed);
                        let id = slot.id.load(Ordering::Relaxed);
                        Table::insert(new, hash(obj, id), obj, id, node);
                    }
                }
            }
        }
        self.table.store(
            new.map_or(ptr::null_mut(), NonNull::as_ptr),
            Ordering::Release,
        );
        inner.used = inner.live;
        if let Some(old) = old {
            let tag = epochs.retire_epoch();
            // SAFETY: `old` was unpublished just above, is owned by this shard alone, and
            // starts with its `Retired` header whose `free` is `free_table`.
            unsafe { inner.retired.push(old.as_ptr().cast(), tag) };
        }
        true
    }

    /// Under the lock: unlinks each variable `pick` selects (`pick` sees the node and
    /// returns whether to remove it; `on_removed` runs under the lock after the unlink),
    /// then retires it. `only` restricts the search to one key. Returns how many were
    /// removed.
    pub(crate) fn remove(
        &self,
        epochs: &Epochs,
        only: Option<(u64, usize, u64)>,
        id_filter: u64,
        mut pick: impl FnMut(&Node) -> bool,
        mut on_removed: impl FnMut(NonNull<Node>),
        cx: &dyn ShadowCx,
    ) -> usize {
        let mut inner = CxGuard::lock(&self.inner, cx);
        let Some(table) = NonNull::new(self.table.load(Ordering::Relaxed)) else {
            return 0;
        };
        let mut removed: usize = 0;
        let mut unlink = |inner: &mut Inner, slot: &Slot, node: NonNull<Node>| {
            slot.node.store(TOMB, Ordering::Release);
            inner.live = inner.live.saturating_sub(1);
            on_removed(node);
            let tag = epochs.retire_epoch();
            // SAFETY: the node was just unlinked from the only table that held it, under
            // the lock; it starts with its `Retired` header whose `free` is `free_node`.
            unsafe { inner.retired.push(node.as_ptr().cast(), tag) };
            removed = removed.saturating_add(1);
        };
        match only {
            Some((h, obj, id)) => {
                // SAFETY: the current table is live under the lock (invariant 1).
                if let Some((i, node)) = unsafe { Table::find(table, h, obj, id) } {
                    // SAFETY: reachable nodes are live (invariant 2).
                    if pick(unsafe { node.as_ref() }) {
                        // SAFETY: `i` came from `find` on this live table.
                        let slot = unsafe { Table::slot(table, i) };
                        unlink(&mut inner, slot, node);
                    }
                }
            }
            None => {
                // SAFETY: the current table is live under the lock (invariant 1).
                for i in 0..unsafe { Table::cap(table) } {
                    // SAFETY: `i` is in bounds; the table is live.
                    let slot = unsafe { Table::slot(table, i) };
                    let node = slot.node.load(Ordering::Relaxed);
                    if node.is_null()
                        || node == TOMB
                        || slot.id.load(Ordering::Relaxed) != id_filter
                    {
                        continue;
                    }
                    // SAFETY: non-null, non-tomb slot nodes are live (invariant 2).
                    let node = unsafe { NonNull::new_unchecked(node) };
                    // SAFETY: as above.
                    if pick(unsafe { node.as_ref() }) {
                        unlink(&mut inner, slot, node);
                    }
                }
            }
        }
        if removed > 0 {
            // SAFETY: the current table is live under the lock.
            let cap = unsafe { Table::cap(table) };
            if inner.live == 0 {
                self.rebuild(&mut inner, epochs, 0);
            } else if cap > MIN_CAP && inner.live.saturating_mul(8) < cap {
                let want = inner
                    .live
                    .saturating_mul(2)
                    .checked_next_power_of_two()
                    .unwrap_or(cap)
                    .max(MIN_CAP);
                // Failing to shrink only keeps the bigger table.
                self.rebuild(&mut inner, epochs, want);
            }
        }
        let garbage = self.collect(&mut inner, epochs);
        drop(inner);
        // SAFETY: `collect` only returns expired items.
        unsafe { garbage.free_all() };
        removed
    }

    /// When `RECLAIM_BATCH` more items were retired since the last attempt: tries to
    /// advance the epoch and detaches what expired. (Attempting on every write would scan
    /// the participant slots and write the global epoch far too often.)
    fn collect(&self, inner: &mut Inner, epochs: &Epochs) -> RetireList {
        if inner.retired.len() < inner.collect_at {
            return RetireList::new();
        }
        let global = epochs.try_advance();
        let expired = inner.retired.take_expired(global);
        inner.collect_at = inner.retired.len().saturating_add(RECLAIM_BATCH);
        expired
    }

    /// Detaches everything expired at `global` (for [`ShadowStore::reclaim`]).
    ///
    /// [`ShadowStore::reclaim`]: super::ShadowStore::reclaim
    pub(crate) fn take_expired(&self, global: usize) -> RetireList {
        let mut inner = self.inner.lock();
        let expired = inner.retired.take_expired(global);
        inner.collect_at = inner.retired.len().saturating_add(RECLAIM_BATCH);
        expired
    }

    /// Live variables and pending garbage.
    pub(crate) fn counts(&self) -> (usize, usize) {
        let inner = self.inner.lock();
        (inner.live, inner.retired.len())
    }

    /// Frees everything: the live nodes, the table and the garbage.
    ///
    /// # Safety
    ///
    /// 1. Nobody else uses the shard, now or later (the store is being dropped).
    pub(crate) unsafe fn destroy(&mut self) {
        let inner = self.inner.get_mut();
        if let Some(table) = NonNull::new(*self.table.get_mut()) {
            // SAFETY: the table is live (invariant 1) and, like its nodes, only ours now
            // (condition 1); each live node is in exactly one slot, so freed once.
            unsafe {
                for i in 0..Table::cap(table) {
                    let node = Table::slot(table, i).node.load(Ordering::Relaxed);
                    if !node.is_null() && node != TOMB {
                        free_node(node.cast());
                    }
                }
                free_table(table.as_ptr().cast());
            }
            *self.table.get_mut() = ptr::null_mut();
            inner.live = 0;
            inner.used = 0;
        }
        let garbage = core::mem::replace(&mut inner.retired, RetireList::new());
        // SAFETY: no reader exists any more (condition 1).
        unsafe { garbage.free_all() };
    }
}

/// Hash of a key: two rounds of a folded 64×64→128 multiply. Good avalanche for keys
/// that differ only in a few bits (aligned pointers, small ids).
#[inline]
pub(crate) fn hash(obj: usize, id: u64) -> u64 {
    #[inline(always)]
    fn fold(a: u64, b: u64) -> u64 {
        // A product of two u64 always fits in a u128.
        let p = u128::from(a).wrapping_mul(u128::from(b));
        (p as u64) ^ ((p >> 64) as u64)
    }
    const K0: u64 = 0x243F_6A88_85A3_08D3;
    const K1: u64 = 0x1319_8A2E_0370_7344;
    const K2: u64 = 0xA409_3822_299F_31D0;
    fold(fold(obj as u64 ^ K0, K1) ^ id, K2)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shadow_node_layout() {
        let spec = Spec {
            size: 8,
            align: UNTYPED_ALIGN,
            tag: TypeId::of::<Untyped>(),
            drop_data: None,
        };
        let node = Node::alloc(1, 2, &spec, &super::super::GlobalCx).unwrap();
        // SAFETY: fresh live node, discarded once below without having been published.
        unsafe {
            let n = node.as_ref();
            assert!(n.is_untyped());
            let data = Node::data(node).as_ptr() as usize;
            assert_eq!(
                data,
                Node::data_aligned(node, UNTYPED_ALIGN).as_ptr() as usize
            );
            assert_eq!(data % UNTYPED_ALIGN, 0);
            // The reader's fields sit right before the data.
            assert_eq!(core::ptr::addr_of!(n.size) as usize + 8, data);
            Node::discard(node);
        }
        assert_eq!(data_offset(4096) % 4096, 0);
        let odd = Spec { align: 3, ..spec };
        assert!(Node::alloc(1, 2, &odd, &super::super::GlobalCx).is_none());
    }

    #[test]
    fn shadow_hash_spreads_pointer_keys_over_shards_and_slots() {
        let mut shards = [0u32; 64];
        let mut low = [0u32; 256];
        for i in 0..64_000usize {
            let h = hash(0xffff_8880_0000_0000 + i * 64, 1);
            shards[(h >> 58) as usize] += 1;
            low[(h & 255) as usize] += 1;
        }
        assert!(
            shards.iter().all(|&c| (800..1200).contains(&c)),
            "{shards:?}"
        );
        assert!(low.iter().all(|&c| (150..350).contains(&c)), "{low:?}");
    }
}
