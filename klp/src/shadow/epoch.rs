//! Epoch-based deferred reclamation: the store's stand-in for RCU.
//!
//! A reader *pins* the store before it reads the tables. Pinning writes the current
//! global epoch into a free participant slot; unpinning clears the slot. A writer that
//! unlinks a node or a table does not free it: it *retires* it, tagged with the global
//! epoch read after the unlink. The global epoch only moves from `e` to `e + 1` when no
//! slot is pinned at an epoch other than `e`, so once it has moved two steps past a
//! tag, every reader that could still see the retired item has unpinned: the item can be
//! freed. This is the classic protocol (the one `crossbeam-epoch` uses), with two
//! differences that suit the store: slots are claimed per guard rather than per thread
//! (no thread registration, works the same in `no_std`), and retired items are linked
//! through a header inside them, so retiring never allocates.

use super::sync::{AtomicPtr, AtomicUsize, Ordering, fence, loom_const_fn};
use core::alloc::Layout;
use core::ptr;

/// Participant slots per chunk.
#[cfg(not(all(test, loom)))]
const SLOTS_PER_CHUNK: usize = 64;
/// Participant slots per chunk: few under loom, whose cost grows with every atomic
/// access `try_advance` makes.
#[cfg(all(test, loom))]
const SLOTS_PER_CHUNK: usize = 2;

/// Value of a slot nobody holds.
const FREE: usize = 0;

/// Aligns its content on its own pair of cache lines (the x86 prefetcher pulls lines in
/// pairs), so that two slots written by different CPUs never share a line.
#[repr(align(128))]
#[derive(Debug)]
pub(crate) struct Padded<T>(pub(crate) T);

/// The slot value of a guard pinned at global epoch `epoch`: always odd, never [`FREE`].
#[inline]
fn pinned(epoch: usize) -> usize {
    (epoch << 1) | 1
}

/// A fixed block of participant slots, and the link to the next block.
///
/// # Invariants
///
/// 1. Once non-null, `next` never changes, and the chunk it points to lives (allocated
///    with [`Layout::new::<Chunk>()`]) until the owning [`Epochs`] is dropped.
/// 2. An all-zero `Chunk` is valid: every slot [`FREE`], `next` null.
#[derive(Debug)]
struct Chunk {
    slots: [Padded<AtomicUsize>; SLOTS_PER_CHUNK],
    next: AtomicPtr<Chunk>,
}

impl Chunk {
    #[cfg(not(all(test, loom)))]
    const fn new() -> Self {
        Chunk {
            slots: [const { Padded(AtomicUsize::new(FREE)) }; SLOTS_PER_CHUNK],
            next: AtomicPtr::new(ptr::null_mut()),
        }
    }

    #[cfg(all(test, loom))]
    fn new() -> Self {
        Chunk {
            slots: core::array::from_fn(|_| Padded(AtomicUsize::new(FREE))),
            next: AtomicPtr::new(ptr::null_mut()),
        }
    }
}

/// The global epoch and the participant slots of one store.
#[derive(Debug)]
pub(crate) struct Epochs {
    global: Padded<AtomicUsize>,
    first: Chunk,
}

impl Epochs {
    loom_const_fn! {
        pub(crate) fn new() -> Self {
            Epochs {
                global: Padded(AtomicUsize::new(0)),
                first: Chunk::new(),
            }
        }
    }

    /// Iterates over the chunks, first to last.
    fn chunks(&self) -> impl Iterator<Item = &Chunk> {
        let mut next: *const Chunk = &self.first;
        core::iter::from_fn(move || {
            // SAFETY: `next` is null, `&self.first`, or a chunk published in a `next`
            // field, which lives as long as `self` (Chunk invariant 1).
            let chunk = unsafe { next.as_ref() }?;
            next = chunk.next.load(Ordering::Acquire);
            Some(chunk)
        })
    }

    /// Claims a free slot and pins it at the current epoch. Never fails: when all slots
    /// are taken it appends a chunk, and if even that allocation fails it retries until
    /// some other guard unpins.
    pub(crate) fn pin(&self) -> &AtomicUsize {
        let start = start_hint();
        loop {
            let mut chunk: &Chunk = &self.first;
            loop {
                for i in 0..SLOTS_PER_CHUNK {
                    let Some(slot) = chunk.slots.get(start.wrapping_add(i) % SLOTS_PER_CHUNK)
                    else {
                        continue;
                    };
                    let slot = &slot.0;
                    if slot.load(Ordering::Relaxed) != FREE {
                        continue;
                    }
                    let value = pinned(self.global.0.load(Ordering::Relaxed));
                    if slot
                        .compare_exchange(FREE, value, Ordering::Relaxed, Ordering::Relaxed)
                        .is_ok()
                    {
                        // Orders the slot store before every load of the critical section,
                        // against the fence in `try_advance`.
                        fence(Ordering::SeqCst);
                        return slot;
                    }
                }
                let next = chunk.next.load(Ordering::Acquire);
                // SAFETY: a non-null `next` is a live chunk (Chunk invariant 1).
                match unsafe { next.as_ref() } {
                    Some(n) => chunk = n,
                    None => match self.append(chunk) {
                        Some(n) => chunk = n,
                        None => break,
                    },
                }
            }
            core::hint::spin_loop();
        }
    }

    /// Appends a chunk after `last` (or returns the one another thread appended).
    /// `None` when the allocation fails.
    fn append<'a>(&'a self, last: &'a Chunk) -> Option<&'a Chunk> {
        let layout = Layout::new::<Chunk>();
        // SAFETY: `Chunk` is not zero-sized.
        let new = unsafe { alloc::alloc::alloc_zeroed(layout) }.cast::<Chunk>();
        if new.is_null() {
            return None;
        }
        // Loom's atomics are handles into its model, not plain memory: build them.
        // SAFETY: `new` is a fresh allocation for a `Chunk`.
        #[cfg(all(test, loom))]
        unsafe {
            new.write(Chunk::new())
        };
        match last
            .next
            .compare_exchange(ptr::null_mut(), new, Ordering::AcqRel, Ordering::Acquire)
        {
            // SAFETY: an all-zero chunk is valid (Chunk invariant 2) and, now published,
            // lives as long as `self` (invariant 1).
            Ok(_) => Some(unsafe { &*new }),
            Err(other) => {
                // SAFETY: `new` came from `alloc_zeroed(layout)` and was never published.
                unsafe { alloc::alloc::dealloc(new.cast(), layout) };
                // SAFETY: `other` is a published, live chunk (invariant 1).
                Some(unsafe { &*other })
            }
        }
    }

    /// Releases a slot returned by [`Epochs::pin`].
    #[inline]
    pub(crate) fn unpin(slot: &AtomicUsize) {
        slot.store(FREE, Ordering::Release);
    }

    /// The epoch to tag an item with, read after the item was unlinked.
    #[inline]
    pub(crate) fn retire_epoch(&self) -> usize {
        fence(Ordering::SeqCst);
        self.global.0.load(Ordering::Relaxed)
    }

    /// Moves the global epoch one step if every pinned slot has seen the current one.
    /// Returns the global epoch after the attempt.
    pub(crate) fn try_advance(&self) -> usize {
        let global = self.global.0.load(Ordering::Relaxed);
        fence(Ordering::SeqCst);
        let current = pinned(global);
        for chunk in self.chunks() {
            for slot in &chunk.slots {
                let value = slot.0.load(Ordering::Relaxed);
                if value != FREE && value != current {
                    return global;
                }
            }
        }
        fence(Ordering::Acquire);
        let next = global.wrapping_add(1);
        match self
            .global
            .0
            .compare_exchange(global, next, Ordering::Release, Ordering::Relaxed)
        {
            Ok(_) => next,
            Err(now) => now,
        }
    }
}

impl Drop for Epochs {
    fn drop(&mut self) {
        // (A load rather than `get_mut`, which loom's atomics do not have.)
        let mut next = self.first.next.load(Ordering::Relaxed);
        while !next.is_null() {
            // SAFETY: `next` is a chunk allocated by `append` with `Layout::new::<Chunk>()`
            // (Chunk invariant 1); `&mut self` means nobody else uses it, and each chunk is
            // freed once since we read its link before freeing it.
            unsafe {
                let after = (*next).next.load(Ordering::Relaxed);
                alloc::alloc::dealloc(next.cast(), Layout::new::<Chunk>());
                next = after;
            }
        }
    }
}

/// A starting slot index that differs between threads without knowing about threads:
/// derived from the address of the caller's stack.
#[cfg(not(all(test, loom)))]
#[inline]
fn start_hint() -> usize {
    let marker = 0u8;
    let addr = ptr::addr_of!(marker) as usize;
    ((addr >> 12).wrapping_mul(0x9E37_79B9_7F4A_7C15_u64 as usize) >> 58) % SLOTS_PER_CHUNK
}

/// Under loom: the same start for every thread (loom replays each execution, which
/// must make the same accesses every time), the worst case for claiming slots.
#[cfg(all(test, loom))]
#[inline]
fn start_hint() -> usize {
    0
}

/// Whether an item retired at epoch `tag` can be freed when the global epoch is `global`.
///
/// `global` may be older than `tag`: a caller can read the epoch, lose the race to other
/// threads that advance it and retire more items, and only then look at the list. The
/// difference is therefore taken as signed (epochs wrap, but never by half their range
/// between two looks), so a tag from the caller's future is never expired.
#[inline]
fn expired(tag: usize, global: usize) -> bool {
    (global.wrapping_sub(tag) as isize) >= 2
}

/// The header every retirable allocation starts with (`#[repr(C)]`, first field).
///
/// `next` and `epoch` are written when the allocation is retired, while readers that
/// were pinned before may still hold a reference to the whole allocation (a shadow
/// node): they are atomics, so that those references do not claim these bytes
/// unchanging (found by Miri as a data race). Only the list owner touches them, with
/// `Relaxed` accesses: the list's own synchronisation (its lock) orders them.
#[repr(C)]
#[derive(Debug)]
pub(crate) struct Retired {
    next: AtomicPtr<Retired>,
    epoch: AtomicUsize,
    /// Frees the whole allocation this header starts.
    free: unsafe fn(*mut Retired),
}

impl Retired {
    loom_const_fn! {
        pub(crate) fn new(free: unsafe fn(*mut Retired)) -> Self {
            Retired {
                next: AtomicPtr::new(ptr::null_mut()),
                epoch: AtomicUsize::new(0),
                free,
            }
        }
    }
}

/// A FIFO of retired items, oldest first, so tags never decrease along the list.
///
/// # Invariants
///
/// 1. Every item in the list is a live allocation starting with a [`Retired`] header,
///    owned by the list alone (nothing reachable from the tables points to it any more),
///    whose `free` function may be called once on it.
/// 2. `head` is null iff `tail` is null iff `len == 0`; `tail.next` is null.
#[derive(Debug)]
pub(crate) struct RetireList {
    head: *mut Retired,
    tail: *mut Retired,
    len: usize,
}

// SAFETY: the list owns its items (invariant 1). The items are shadow nodes, whose data is
// `Send` (untyped bytes or a `T: Send`), and tables, which hold only atomics; freeing them
// from another thread is fine.
unsafe impl Send for RetireList {}

impl RetireList {
    pub(crate) const fn new() -> Self {
        RetireList {
            head: ptr::null_mut(),
            tail: ptr::null_mut(),
            len: 0,
        }
    }

    pub(crate) fn len(&self) -> usize {
        self.len
    }

    /// Appends `item`, tagged with `epoch`.
    ///
    /// # Safety
    ///
    /// 1. `item` points to a live allocation that starts with a [`Retired`] header whose
    ///    `free` function frees it.
    /// 2. `item` is unreachable from the tables (unlinked before `epoch` was read by
    ///    [`Epochs::retire_epoch`]), is in no list, and nobody else will free it.
    pub(crate) unsafe fn push(&mut self, item: *mut Retired, epoch: usize) {
        // SAFETY: `item` is live and exclusively ours (conditions 1, 2).
        unsafe {
            (*item).next.store(ptr::null_mut(), Ordering::Relaxed);
            (*item).epoch.store(epoch, Ordering::Relaxed);
        }
        if self.tail.is_null() {
            self.head = item;
        } else {
            // SAFETY: a non-null tail is a live item of this list (invariant 1).
            unsafe { (*self.tail).next.store(item, Ordering::Relaxed) };
        }
        self.tail = item;
        self.len = self.len.saturating_add(1);
    }

    /// Detaches the items that can be freed at global epoch `global`.
    pub(crate) fn take_expired(&mut self, global: usize) -> RetireList {
        let mut out = RetireList::new();
        while !self.head.is_null() {
            let item = self.head;
            // SAFETY: `item` is a live item of this list (invariant 1).
            let (tag, next) = unsafe {
                (
                    (*item).epoch.load(Ordering::Relaxed),
                    (*item).next.load(Ordering::Relaxed),
                )
            };
            if !expired(tag, global) {
                break;
            }
            self.head = next;
            if next.is_null() {
                self.tail = ptr::null_mut();
            }
            self.len = self.len.saturating_sub(1);
            // SAFETY: `item` left this list and goes to `out`, keeping its tag; it stays
            // exclusively owned and unreachable.
            unsafe { out.push(item, tag) };
        }
        out
    }

    /// Frees every item.
    ///
    /// # Safety
    ///
    /// 1. No reader can still hold a reference into any item: either the items came from
    ///    [`RetireList::take_expired`], or the store is being dropped.
    pub(crate) unsafe fn free_all(mut self) {
        let mut item = self.head;
        self.head = ptr::null_mut();
        self.tail = ptr::null_mut();
        self.len = 0;
        while !item.is_null() {
            // SAFETY: `item` is live and owned by the list (invariant 1); we read its link
            // before freeing it, and no reader uses it (condition 1).
            unsafe {
                let next = (*item).next.load(Ordering::Relaxed);
                ((*item).free)(item);
                item = next;
            }
        }
    }
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;

    #[test]
    fn shadow_epoch_advances_only_when_pins_caught_up() {
        let e = Epochs::new();
        assert_eq!(e.try_advance(), 1);
        let slot = e.pin();
        assert_eq!(
            e.try_advance(),
            2,
            "a pin at the current epoch does not block"
        );
        assert_eq!(e.try_advance(), 2, "a pin at an older epoch blocks");
        Epochs::unpin(slot);
        assert_eq!(e.try_advance(), 3);
        assert!(expired(1, 3));
        assert!(!expired(2, 3));
        // A tag newer than the caller's (stale) view of the epoch is not expired.
        assert!(!expired(5, 3));
        assert!(!expired(4, 3));
        assert!(expired(usize::MAX, 1), "epochs wrap");
    }

    #[test]
    fn shadow_epoch_grows_beyond_one_chunk() {
        let e = Epochs::new();
        let slots: alloc::vec::Vec<&AtomicUsize> =
            (0..SLOTS_PER_CHUNK * 2 + 3).map(|_| e.pin()).collect();
        assert_eq!(e.chunks().count(), 3);
        for s in slots {
            Epochs::unpin(s);
        }
    }
}

/// Loom models of the reclamation against concurrent readers: every interleaving (up to
/// loom's preemption bound) and every value the C++ memory model lets each atomic load
/// return. Run with `RUSTFLAGS="--cfg loom" cargo test -p klp --lib loom_` in a target
/// directory of their own (`ci/test` does).
///
/// A shadow table's slot is modelled by one atomic pointer with the store's orderings
/// (`table.rs`: a reader's `slot.node.load(Acquire)`, the writer's unlink
/// `slot.node.store(.., Release)` under the shard lock, then [`Epochs::retire_epoch`]),
/// a node by a [`Retired`] header and a value in a `loom::cell::UnsafeCell`. Freeing a
/// node writes its value first: loom reports a causality violation when a reader's
/// read of the value is not ordered before that write — a use after free.
///
/// Checked by weakening the source temporarily (loom then reports a causality
/// violation, a use after free): `fence(SeqCst)` in `pin` → `Acquire` (the slot store
/// may be ordered after the reader's load of the table, so `try_advance` misses the
/// pin: every model fails); `unpin`'s `Release` → `Relaxed` (the reader's read is not
/// ordered before the free: every model fails); `fence(SeqCst)` in `retire_epoch` →
/// `Release` (the node may be tagged with an epoch older than the one another shard's
/// writer already advanced to: `loom_a_reader_against_two_advancing_writers` fails —
/// with a single advancing writer the tag is that thread's own latest epoch, and the
/// other models pass). Not caught: the first fence of `try_advance` → `Acquire`; loom
/// approximates `SeqCst` fences more strongly than the memory model requires, so a
/// model cannot show what that fence alone prevents.
///
/// Figures (release build): 428 executions for the one-reader model (exhaustive),
/// 4291 for the advancing writers (at most 3 preemptions), 11854 for two readers and
/// two retires (at most 2 preemptions; exhaustive, it took about ten minutes).
#[cfg(all(test, loom))]
mod loom_models {
    use super::*;
    use alloc::boxed::Box;
    use loom::cell::UnsafeCell;
    use loom::sync::Arc;

    #[repr(C)]
    struct Node {
        retired: Retired,
        value: UnsafeCell<usize>,
    }

    /// What a freed node's value holds.
    const DEAD: usize = usize::MAX;

    fn node(value: usize) -> *mut Retired {
        Box::into_raw(Box::new(Node {
            retired: Retired::new(free_node),
            value: UnsafeCell::new(value),
        }))
        .cast()
    }

    /// Marks the node freed: writes [`DEAD`] (the write loom checks against every
    /// earlier read), and leaks the memory, so that a broken protocol is reported by
    /// loom rather than turned into a real use after free of the test process.
    ///
    /// # Safety
    ///
    /// 1. `p` came from [`node`] and is marked once.
    unsafe fn free_node(p: *mut Retired) {
        // SAFETY: `p` is a live `Node` (condition 1): its header is its first field.
        let n = unsafe { &*p.cast::<Node>() };
        // SAFETY: loom checks that no access to the value is concurrent with this one.
        n.value.with_mut(|v| unsafe { *v = DEAD });
    }

    struct Shared {
        epochs: Epochs,
        /// A table slot: the node readers find.
        slot: AtomicPtr<Retired>,
    }

    /// What a reader does: pin, find the node, read it, unpin.
    fn read(s: &Shared) -> usize {
        let pin = s.epochs.pin();
        let p = s.slot.load(Ordering::Acquire);
        // SAFETY: the node was reachable while pinned: it is not freed before `unpin`
        // (what the model checks; `free_node` never deallocates).
        let v = unsafe { (*p.cast::<Node>()).value.with(|v| *v) };
        Epochs::unpin(pin);
        v
    }

    /// The writer: replaces the node `rounds` times, each time retiring the old one and
    /// collecting (`try_advance`, then freeing what expired) `collects` times, as the
    /// store's writers do; frees the rest once the readers are gone. Prints the number
    /// of executions loom explored (ci/test's summary).
    fn model(
        name: &str,
        readers: usize,
        advancers: usize,
        rounds: usize,
        collects: usize,
        bound: Option<usize>,
    ) {
        extern crate std;
        let runs = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let counted = runs.clone();
        let mut builder = loom::model::Builder::new();
        if bound.is_some() {
            builder.preemption_bound = bound;
        }
        builder.check(move || {
            counted.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            let s = Arc::new(Shared {
                epochs: Epochs::new(),
                slot: AtomicPtr::new(node(1)),
            });
            let handles: alloc::vec::Vec<_> = (0..readers)
                .map(|_| {
                    let s = s.clone();
                    loom::thread::spawn(move || {
                        let v = read(&s);
                        assert!(v != DEAD, "a pinned reader read a freed node");
                    })
                })
                .chain((0..advancers).map(|_| {
                    // Another shard's writer: it collects its own list, which moves the
                    // global epoch under this writer's feet.
                    let s = s.clone();
                    loom::thread::spawn(move || {
                        s.epochs.try_advance();
                    })
                }))
                .collect();
            let mut list = RetireList::new();
            for r in 0..rounds {
                let old = s.slot.load(Ordering::Relaxed);
                s.slot.store(node(r + 2), Ordering::Release);
                let tag = s.epochs.retire_epoch();
                // SAFETY: `old` was unlinked before its tag was read, and only this
                // thread retires.
                unsafe { list.push(old, tag) };
                for _ in 0..collects {
                    let global = s.epochs.try_advance();
                    // SAFETY: expired items are unreachable by every pinned reader
                    // (the property under test).
                    unsafe { list.take_expired(global).free_all() };
                }
            }
            for h in handles {
                h.join().expect("reader");
            }
            // SAFETY: no reader is left.
            unsafe {
                list.free_all();
                free_node(s.slot.load(Ordering::Relaxed));
            }
        });
        std::println!(
            "loom: {name}: {} executions",
            runs.load(std::sync::atomic::Ordering::Relaxed)
        );
    }

    #[test]
    fn loom_a_pinned_reader_never_sees_its_node_freed() {
        model("shadow epochs, 1 reader, 1 retire", 1, 0, 1, 3, None);
    }

    /// Two readers (pinning one slot each of the two a chunk has under loom) and two
    /// retires: every interleaving with at most two preemptions (exhaustive takes
    /// about ten minutes).
    #[test]
    fn loom_two_readers_against_two_replacements() {
        model(
            "shadow epochs, 2 readers, 2 retires, 2 preemptions",
            2,
            0,
            2,
            2,
            Some(2),
        );
    }

    /// A reader, this writer and another shard's writer advancing the epoch.
    #[test]
    fn loom_a_reader_against_two_advancing_writers() {
        model(
            "shadow epochs, 1 reader, 1 retire, another advancer",
            1,
            1,
            1,
            2,
            Some(3),
        );
    }
}
