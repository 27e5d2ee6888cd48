//! Threads as tasks.
//!
//! Every thread of the process is a task of the core. Its livepatch state
//! (`patch_state` and the pending flag) is one atomic byte in its [`ThreadRecord`],
//! reachable from the thread itself through a thread-local pointer without any lock
//! (for [`safe_point`] and the redirect decision of [`crate::redirect`]).
//!
//! ## How threads register
//!
//! * **Threads created with `pthread_create`** (which includes `std::thread::spawn`) are
//!   registered by an interposed `pthread_create`: this crate defines the symbol, the
//!   link editor binds the program's (and std's) calls to it, and it forwards to the C
//!   library's through `dlsym(RTLD_NEXT, "pthread_create")` — or, in a program built
//!   with a sanitizer that intercepts `pthread_create` (AddressSanitizer,
//!   ThreadSanitizer…: `cfg(klp_sanitizer)`, set by the build script), to the
//!   sanitizer's interceptor, which the interposer replaces in the link (the
//!   sanitizer's definition is weak) and which must see every thread it will later be
//!   asked to join. The wrapper creates the
//!   child's record *in the creating thread*, copying the creator's state and pending
//!   flag under the fork gate (see below), before the child exists: the kernel's
//!   `copy_process` under `tasklist_lock`. The child then runs inside a small frame
//!   built by [`entry_frame`] (per-arch assembly) whose address becomes the end of its
//!   stack walks, fills in its tid and stack bounds, and calls the real start routine.
//!   Interposition was chosen over a `spawn` wrapper because it also catches threads
//!   created by code that does not know about klp (std, C libraries, thread pools).
//! * **Threads that existed before** (the main thread, threads of a library that calls
//!   `clone` directly) register on first use: when they call [`safe_point`],
//!   [`register_current`] or any [`crate::Process`] operation. Their stack end is
//!   unknown, so their stack checks are unreliable (they switch at safe points or by
//!   force) unless they run their work inside [`run_as_task`], which records it.
//!
//! ## The fork gate
//!
//! A core operation loops over the tasks and sets their state; a thread created during
//! the loop must either be seen by it or inherit the state it already set. Core
//! operations hold the gate exclusively ([`ForkGate::exclusive`]) for their whole
//! duration; `pthread_create` holds it shared while it copies the creator's state and
//! inserts the child's record. A thread that creates threads from inside a core
//! operation (a callback) already holds it and does not take it again.

use std::cell::Cell;
use std::ffi::c_void;
use std::sync::atomic::{
    AtomicBool, AtomicI32, AtomicU8, AtomicU32, AtomicU64, AtomicUsize, Ordering,
};
use std::sync::{Arc, Mutex, MutexGuard, RwLock, RwLockReadGuard, RwLockWriteGuard};

use klp::{PatchState, TaskId};

// ------------------------------------------------------------------ packed state

const ST_IDLE: u8 = 0;
const ST_UNPATCHED: u8 = 1;
const ST_PATCHED: u8 = 2;
const ST_MASK: u8 = 3;
const PENDING: u8 = 4;

// Where a back-end's fast entry path reads a record (`klp_arch::live::fast`): the
// state byte (`state & ST_MASK` is the index of [`encode`]'s value), the in-decision
// counter.
const _: () = {
    use klp_arch::live::fast;
    assert!(size_of::<AtomicU8>() == 1 && size_of::<AtomicU32>() == 4);
    assert!(std::mem::offset_of!(ThreadRecord, state) == fast::TASK_STATE);
    assert!(std::mem::offset_of!(ThreadRecord, in_decide) == fast::TASK_IN_DECIDE);
    assert!(ST_MASK == fast::STATE_MASK);
};

/// The index of `s` in the state byte (see [`STATE_MASK`]).
pub(crate) fn state_index(s: PatchState) -> usize {
    usize::from(encode(s))
}

/// The address of this thread's `CURRENT` cell (a host's fast entry path reads it at
/// a fixed offset from the thread pointer).
#[allow(
    dead_code,
    reason = "read by the fast entry path of the hosts that have one"
)]
pub(crate) fn current_cell() -> u64 {
    CURRENT.with(|c| c as *const Cell<*const ThreadRecord> as u64)
}

fn encode(s: PatchState) -> u8 {
    match s {
        PatchState::Idle => ST_IDLE,
        PatchState::Unpatched => ST_UNPATCHED,
        PatchState::Patched => ST_PATCHED,
    }
}

fn decode(b: u8) -> PatchState {
    match b & ST_MASK {
        ST_UNPATCHED => PatchState::Unpatched,
        ST_PATCHED => PatchState::Patched,
        _ => PatchState::Idle,
    }
}

// ------------------------------------------------------------------ records

/// The capture slot's states (see [`crate::stack`]).
pub(crate) mod cap {
    pub const IDLE: u32 = 0;
    pub const REQUESTED: u32 = 1;
    pub const CAPTURED: u32 = 2;
    pub const RELEASED: u32 = 3;
    pub const ABANDONED: u32 = 4;
}

/// One thread (task) of the process.
///
/// # Invariants
///
/// * `state` holds the patch state in bits 0–1 and the pending flag in bit 2; it is
///   only changed by atomic read-modify-write operations, so the safe point and the
///   core never lose each other's updates.
/// * A pending thread's state is the opposite of the transition's target (the core
///   sets every state to `!target` before it sets pending flags), which is what lets
///   [`safe_point`] switch without reading the target.
#[derive(Debug)]
#[repr(C)]
pub struct ThreadRecord {
    // First, where a fast entry path reads them (`klp_arch::live::fast`).
    state: AtomicU8,
    /// Non-zero while the thread runs the redirect decision ([`crate::redirect`]);
    /// `hook_unregister` waits for it to drop.
    pub(crate) in_decide: AtomicU32,
    /// The task id (never reused).
    pub id: TaskId,
    tid: AtomicI32,
    alive: AtomicBool,
    kthread: AtomicBool,
    stack_low: AtomicU64,
    stack_high: AtomicU64,
    /// The outermost frame a reliable walk must reach (0: unknown).
    entry_frame: AtomicU64,
    // --- signal handshake (async-signal-safe: atomics only) ---
    pub(crate) cap: AtomicU32,
    /// pc, sp, fp, lr of the last capture.
    pub(crate) regs: [AtomicU64; 4],
    pub(crate) sync_req: AtomicU64,
    pub(crate) sync_ack: AtomicU64,
    /// Signals this thread's handler has run (for tests and diagnostics).
    pub(crate) signals: AtomicU64,
    /// Non-zero while the thread runs klp's signal handler (which blocks klp's signal
    /// while it runs: `/proc` then shows it blocked, though the thread does not block
    /// it).
    pub(crate) in_handler: AtomicU32,
    /// Set by a fake signal; [`idle_wait`] sleeps on it.
    wake: AtomicU32,
}

impl ThreadRecord {
    fn new(id: u64, state: u8) -> ThreadRecord {
        ThreadRecord {
            id: TaskId(id),
            tid: AtomicI32::new(0),
            state: AtomicU8::new(state),
            alive: AtomicBool::new(true),
            kthread: AtomicBool::new(false),
            stack_low: AtomicU64::new(0),
            stack_high: AtomicU64::new(0),
            entry_frame: AtomicU64::new(0),
            cap: AtomicU32::new(cap::IDLE),
            regs: Default::default(),
            sync_req: AtomicU64::new(0),
            sync_ack: AtomicU64::new(0),
            signals: AtomicU64::new(0),
            in_handler: AtomicU32::new(0),
            wake: AtomicU32::new(0),
            in_decide: AtomicU32::new(0),
        }
    }

    /// A record that belongs to no thread, for tests.
    #[cfg(test)]
    pub(crate) fn for_test() -> ThreadRecord {
        ThreadRecord::new(u64::MAX, ST_IDLE)
    }

    /// The kernel thread id (0 while the thread has not started yet).
    pub fn tid(&self) -> i32 {
        self.tid.load(Ordering::Acquire)
    }

    /// `patch_state`.
    pub fn patch_state(&self) -> PatchState {
        decode(self.state.load(Ordering::Acquire))
    }

    /// The pending flag.
    pub fn pending(&self) -> bool {
        self.state.load(Ordering::Acquire) & PENDING != 0
    }

    /// Sets `patch_state`, keeping the pending flag.
    pub fn set_patch_state(&self, s: PatchState) {
        let v = encode(s);
        let _ = self
            .state
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |b| {
                Some((b & !ST_MASK) | v)
            });
    }

    /// Sets or clears the pending flag, keeping the state.
    pub fn set_pending(&self, p: bool) {
        if p {
            self.state.fetch_or(PENDING, Ordering::AcqRel);
        } else {
            self.state.fetch_and(!PENDING, Ordering::AcqRel);
        }
    }

    /// `klp_update_patch_state`: if pending, clear the flag and switch to the target
    /// (the opposite of the current state, see the invariants), in one atomic step.
    /// Returns whether the thread switched.
    pub fn update_patch_state(&self) -> bool {
        self.state
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |b| {
                (b & PENDING != 0).then(|| encode(decode(b).inverted()))
            })
            .is_ok()
    }

    /// Whether the thread still runs.
    pub fn alive(&self) -> bool {
        self.alive.load(Ordering::Acquire)
    }

    /// Whether this is one of klp's own service threads (the core's "kernel threads").
    pub fn is_kthread(&self) -> bool {
        self.kthread.load(Ordering::Relaxed)
    }

    /// The thread's stack `[low, high)` (zeros while unknown).
    pub fn stack(&self) -> (u64, u64) {
        (
            self.stack_low.load(Ordering::Acquire),
            self.stack_high.load(Ordering::Acquire),
        )
    }

    /// The outermost frame of reliable walks (0 when unknown).
    pub fn entry_frame(&self) -> u64 {
        self.entry_frame.load(Ordering::Acquire)
    }

    /// How many times the klp signal handler ran on this thread.
    pub fn signals_handled(&self) -> u64 {
        self.signals.load(Ordering::Relaxed)
    }

    /// The thread's command name (`/proc/self/task/<tid>/comm`).
    pub fn comm(&self) -> String {
        let tid = self.tid();
        if tid == 0 {
            return String::from("<starting>");
        }
        std::fs::read_to_string(format!("/proc/self/task/{tid}/comm"))
            .map(|s| s.trim_end().to_string())
            .unwrap_or_else(|_| String::from("<exited>"))
    }
}

// ------------------------------------------------------------------ registry

static REGISTRY: Mutex<Vec<Arc<ThreadRecord>>> = Mutex::new(Vec::new());
static NEXT_ID: AtomicU64 = AtomicU64::new(1);
static GATE: RwLock<()> = RwLock::new(());

thread_local! {
    /// This thread's record (owned by the registry while the thread is alive).
    static CURRENT: Cell<*const ThreadRecord> = const { Cell::new(std::ptr::null()) };
    /// Whether this thread holds the fork gate exclusively.
    static IN_CORE: Cell<bool> = const { Cell::new(false) };
    /// Unregisters the thread when it exits.
    static EXIT: ExitGuard = const { ExitGuard(Cell::new(std::ptr::null())) };
}

struct ExitGuard(Cell<*const ThreadRecord>);

impl Drop for ExitGuard {
    fn drop(&mut self) {
        let p = self.0.get();
        if p.is_null() {
            return;
        }
        CURRENT.with(|c| c.set(std::ptr::null()));
        let mut reg = lock_registry();
        if let Some(i) = reg.iter().position(|r| std::ptr::eq(Arc::as_ptr(r), p)) {
            let r = reg.remove(i);
            r.alive.store(false, Ordering::Release);
        }
    }
}

fn lock_registry() -> MutexGuard<'static, Vec<Arc<ThreadRecord>>> {
    REGISTRY.lock().unwrap_or_else(|e| e.into_inner())
}

/// A snapshot of the registered threads, in registration order.
pub fn threads() -> Vec<Arc<ThreadRecord>> {
    ensure_interposer();
    lock_registry().clone()
}

/// The record of task `t`, if it is registered.
pub fn find(t: TaskId) -> Option<Arc<ThreadRecord>> {
    lock_registry().iter().find(|r| r.id == t).cloned()
}

/// The record of the thread with kernel id `tid`.
pub fn find_tid(tid: i32) -> Option<Arc<ThreadRecord>> {
    lock_registry().iter().find(|r| r.tid() == tid).cloned()
}

/// The registered records, seen with the registry locked: a record in it cannot finish
/// unregistering (its thread cannot have exited and its tid cannot have been reused)
/// while this value lives. Only [`with_registry`] makes one, so functions that are only
/// sound under the registry lock take it as a witness.
#[derive(Debug)]
pub(crate) struct Registered<'a> {
    records: &'a [Arc<ThreadRecord>],
}

impl std::ops::Deref for Registered<'_> {
    type Target = [Arc<ThreadRecord>];

    fn deref(&self) -> &[Arc<ThreadRecord>] {
        self.records
    }
}

/// Runs `f` with the signal-safe view of the record registry locked (the registry is
/// never locked from a signal handler).
pub(crate) fn with_registry<R>(f: impl FnOnce(&Registered<'_>) -> R) -> R {
    let g = lock_registry();
    f(&Registered {
        records: g.as_slice(),
    })
}

fn gettid() -> i32 {
    // SAFETY: `gettid` has no preconditions.
    unsafe { libc::gettid() }
}

/// The stack `[low, high)` of the calling thread, from `pthread_getattr_np`.
fn own_stack() -> (u64, u64) {
    // SAFETY: an all-zero `pthread_attr_t` is a valid out-parameter; it is initialised
    // by `pthread_getattr_np` and destroyed only after a successful call.
    unsafe {
        let mut attr: libc::pthread_attr_t = std::mem::zeroed();
        if libc::pthread_getattr_np(libc::pthread_self(), &mut attr) != 0 {
            return (0, 0);
        }
        let mut addr: *mut c_void = std::ptr::null_mut();
        let mut size: libc::size_t = 0;
        let r = libc::pthread_attr_getstack(&attr, &mut addr, &mut size);
        libc::pthread_attr_destroy(&mut attr);
        if r != 0 {
            return (0, 0);
        }
        (addr as u64, addr as u64 + size as u64)
    }
}

/// Fills in the calling thread's identity and makes `rec` its record.
fn attach(rec: &Arc<ThreadRecord>, entry: u64) {
    let (low, high) = own_stack();
    rec.stack_low.store(low, Ordering::Release);
    rec.stack_high.store(high, Ordering::Release);
    rec.entry_frame.store(entry, Ordering::Release);
    rec.tid.store(gettid(), Ordering::Release);
    let p = Arc::as_ptr(rec);
    CURRENT.with(|c| c.set(p));
    EXIT.with(|g| g.0.set(p));
    crate::sys::install_signal_handler();
}

fn new_record(state: u8) -> Arc<ThreadRecord> {
    Arc::new(ThreadRecord::new(
        NEXT_ID.fetch_add(1, Ordering::Relaxed),
        state,
    ))
}

/// The target of the running transition, as the last core operation left it
/// (published by [`crate::Process`] while it holds the fork gate).
static TARGET: AtomicU8 = AtomicU8::new(ST_IDLE);

/// Publishes the core's target after a core operation, under the fork gate (`_gate`,
/// the witness: a thread being created sees the target before or after the operation,
/// never in between).
pub(crate) fn publish_target(_gate: &ForkGate, t: PatchState) {
    TARGET.store(encode(t), Ordering::Release);
}

/// The state of a thread that joins without a registered creator: idle outside a
/// transition, else not switched yet (`!target`, pending), like every task the
/// transition has not checked. Under the fork gate (`_gate`, the witness).
fn late_state(_gate: &ForkGate) -> u8 {
    let t = decode(TARGET.load(Ordering::Acquire));
    if t == PatchState::Idle {
        ST_IDLE
    } else {
        encode(t.inverted()) | PENDING
    }
}

/// The state a thread that is not registered runs in (the redirect decision of a thread
/// created behind klp's back): `!target` during a transition — the code every thread
/// ran before it began — and idle otherwise. Lock-free, no allocation.
pub(crate) fn unregistered_state() -> PatchState {
    decode(TARGET.load(Ordering::Acquire)).inverted()
}

/// The calling thread's record, registering the thread if it is not registered yet
/// (a thread that existed before: its stack end is unknown).
pub fn register_current() -> Arc<ThreadRecord> {
    ensure_interposer();
    if let Some(r) = current_record() {
        return r;
    }
    let rec = {
        let gate = ForkGate::shared();
        let rec = new_record(late_state(&gate));
        lock_registry().push(rec.clone());
        rec
    };
    attach(&rec, 0);
    rec
}

/// The calling thread's record, if it is registered.
pub fn current_record() -> Option<Arc<ThreadRecord>> {
    let p = CURRENT.with(Cell::get);
    if p.is_null() {
        return None;
    }
    lock_registry()
        .iter()
        .find(|r| std::ptr::eq(Arc::as_ptr(r), p))
        .cloned()
}

/// Marks the calling thread as one of klp's own service threads.
pub(crate) fn mark_kthread() {
    register_current().kthread.store(true, Ordering::Relaxed);
}

/// `klp_update_patch_state` for the calling thread: the analogue of the kernel's
/// return to user mode. Call it where the thread runs no patched function (a worker's
/// loop head, before an idle wait). Returns whether the thread switched. Lock-free
/// for a registered thread.
pub fn safe_point() -> bool {
    let p = CURRENT.with(Cell::get);
    if p.is_null() {
        return register_current().update_patch_state();
    }
    // SAFETY: `CURRENT` points to this thread's record, which the registry keeps alive
    // until this thread's exit guard removes it (and clears `CURRENT` first).
    unsafe { &*p }.update_patch_state()
}

/// An idle wait: passes a safe point, sleeps until `timeout` passes or a fake signal
/// wakes the thread, passes a safe point again. Returns whether it was woken. The
/// analogue of a kernel thread's interruptible sleep in a loop that checks
/// `klp_update_patch_state`.
pub fn idle_wait(timeout: std::time::Duration) -> bool {
    let rec = register_current();
    rec.update_patch_state();
    let deadline = std::time::Instant::now() + timeout;
    let woken = loop {
        if rec.wake.swap(0, Ordering::AcqRel) != 0 {
            break true;
        }
        let now = std::time::Instant::now();
        if now >= deadline {
            break false;
        }
        // Returns early on a wake-up, a signal, or spuriously: the loop decides.
        crate::sys::futex_wait_for(&rec.wake, 0, deadline - now);
    };
    rec.update_patch_state();
    woken
}

/// Wakes `rec` from [`idle_wait`].
pub fn wake(rec: &ThreadRecord) {
    rec.wake.store(1, Ordering::Release);
    crate::sys::futex_wake(&rec.wake);
}

/// The calling thread's record without registering and without locks, for the signal
/// handler.
pub(crate) fn current_raw() -> *const ThreadRecord {
    CURRENT.try_with(Cell::get).unwrap_or(std::ptr::null())
}

/// Runs `f` as this thread's outermost walkable frame: stack checks of this thread that
/// reach this frame are complete. For the main thread (`fn main() {
/// klp_user::thread::run_as_task(real_main) }`) and other threads not created through
/// `pthread_create`.
pub fn run_as_task<R, F: FnOnce() -> R>(f: F) -> R {
    let rec = register_current();
    struct Job<F, R> {
        f: Option<F>,
        out: Option<R>,
        rec: Arc<ThreadRecord>,
        prev: u64,
    }
    extern "C" fn body<F: FnOnce() -> R, R>(data: *mut c_void, frame: *mut c_void) -> *mut c_void {
        // SAFETY: `data` is the `&mut Job` passed to `entry_frame` below, alive and not
        // otherwise accessed during this call.
        let job = unsafe { &mut *(data as *mut Job<F, R>) };
        job.prev = job.rec.entry_frame.swap(frame as u64, Ordering::AcqRel);
        if let Some(f) = job.f.take() {
            // A panic must not unwind through the assembly frame.
            match std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)) {
                Ok(v) => job.out = Some(v),
                Err(_) => std::process::abort(),
            }
        }
        job.rec.entry_frame.store(job.prev, Ordering::Release);
        std::ptr::null_mut()
    }
    let mut job = Job {
        f: Some(f),
        out: None,
        rec,
        prev: 0,
    };
    // SAFETY: `body::<F, R>` has the signature `entry_frame` expects and `&mut job`
    // stays valid for the call (conditions 1 and 2 of `entry_frame`).
    unsafe { entry_frame(body::<F, R>, &mut job as *mut Job<F, R> as *mut c_void) };
    match job.out {
        Some(v) => v,
        None => std::process::abort(),
    }
}

/// Records `frame` (an address [`entry_frame`] passed to its callee) as the outermost
/// walkable frame of the calling thread, registering the thread if needed, and returns
/// the previous one (0: none). For code that cannot use [`run_as_task`] because its
/// body must run without Rust frames that catch unwinding around it: libklp.so's
/// C `main`, which may call `pthread_exit` (a forced unwind that `run_as_task`'s
/// `catch_unwind` would turn into an abort).
pub fn set_entry_frame(frame: u64) -> u64 {
    register_current().entry_frame.swap(frame, Ordering::AcqRel)
}

/// Whether the calling thread runs a core operation (it holds the fork gate
/// exclusively: a callback, or the host's own code under the core's lock). Code that
/// may be reached from there and would start a core operation of its own (an
/// interposed `dlopen` that announces the library) must not: the core's lock is not
/// reentrant.
pub fn in_core_operation() -> bool {
    IN_CORE.try_with(Cell::get).unwrap_or(false)
}

// ------------------------------------------------------------------ fork gate

/// Exclusion between core operations and thread creation (see the module docs).
#[derive(Debug)]
pub struct ForkGate {
    _shared: Option<RwLockReadGuard<'static, ()>>,
    _exclusive: Option<RwLockWriteGuard<'static, ()>>,
    was_in_core: bool,
}

impl ForkGate {
    /// Held by a core operation for its whole duration.
    pub fn exclusive() -> ForkGate {
        let was = IN_CORE.with(|c| c.replace(true));
        let g = if was {
            None
        } else {
            Some(GATE.write().unwrap_or_else(|e| e.into_inner()))
        };
        ForkGate {
            _shared: None,
            _exclusive: g,
            was_in_core: was,
        }
    }

    /// Held while a thread is created.
    pub fn shared() -> ForkGate {
        let in_core = IN_CORE.with(Cell::get);
        let g = if in_core {
            None
        } else {
            Some(GATE.read().unwrap_or_else(|e| e.into_inner()))
        };
        ForkGate {
            _shared: g,
            _exclusive: None,
            was_in_core: in_core,
        }
    }
}

impl Drop for ForkGate {
    fn drop(&mut self) {
        if self._exclusive.is_some() {
            IN_CORE.with(|c| c.set(self.was_in_core));
        }
    }
}

// ------------------------------------------------------------------ fork

/// What the forking thread holds across `fork(2)` (see [`install_atfork`]): taken by
/// the prepare handler, dropped by the parent and child handlers.
struct ForkHeld {
    _gate: ForkGate,
    _core: Option<Box<dyn std::any::Any>>,
    registry: MutexGuard<'static, Vec<Arc<ThreadRecord>>>,
}

/// Takes the core's locks for [`fork_prepare`] (`None`: there is no core), registered
/// by the process host, which sits above this module ([`set_core_lock`]).
pub(crate) type CoreLock = fn() -> Option<Box<dyn std::any::Any>>;

static CORE_LOCK: std::sync::OnceLock<CoreLock> = std::sync::OnceLock::new();

/// Registers how [`fork_prepare`] takes the core's locks (the first registration
/// stays).
pub(crate) fn set_core_lock(lock: CoreLock) {
    let _ = CORE_LOCK.set(lock);
}

thread_local! {
    /// The locks the forking thread holds between the prepare handler and the parent
    /// or child handler (a thread-local of the forking thread, which the child's only
    /// thread continues).
    static FORK_HELD: std::cell::RefCell<Option<ForkHeld>> = const { std::cell::RefCell::new(None) };
}

/// `pthread_atfork`'s prepare handler: takes klp's locks in their order (the fork
/// gate, the core and its log, the registry), so that no other thread holds one while
/// the process is copied. A core operation in progress finishes first (core operations
/// are bounded); a thread that forks from inside a core operation (a callback) holds
/// the gate and the core already.
extern "C" fn fork_prepare() {
    let in_core = IN_CORE.with(Cell::get);
    // Exclusively: a thread being created holds the gate shared while it copies its
    // creator's state and inserts its record, and a child that inherited that share
    // could never take the gate exclusively (its core operations would hang).
    let gate = ForkGate::exclusive();
    let core = if in_core {
        None
    } else {
        CORE_LOCK.get().and_then(|lock| lock())
    };
    let registry = lock_registry();
    let held = ForkHeld {
        _gate: gate,
        _core: core,
        registry,
    };
    let _ = FORK_HELD.try_with(|h| *h.borrow_mut() = Some(held));
}

/// The parent side: releases what [`fork_prepare`] took.
extern "C" fn fork_parent() {
    let _ = FORK_HELD.try_with(|h| h.borrow_mut().take());
}

/// The child side: the child has one thread, the one that forked. Its registry keeps
/// that thread's record alone, with the child's thread id; its patch state and pending
/// flag are the forking thread's (the kernel's `klp_copy_process`). Every other record
/// is marked gone. Then the locks are released.
extern "C" fn fork_child() {
    let _ = FORK_HELD.try_with(|h| {
        if let Some(mut held) = h.borrow_mut().take() {
            let me = CURRENT.with(Cell::get);
            for r in held.registry.iter() {
                if !std::ptr::eq(Arc::as_ptr(r), me) {
                    r.alive.store(false, Ordering::Release);
                }
            }
            held.registry.retain(|r| std::ptr::eq(Arc::as_ptr(r), me));
            if let Some(r) = held.registry.first() {
                r.tid.store(gettid(), Ordering::Release);
                r.cap.store(cap::IDLE, Ordering::Release);
            }
        }
    });
}

/// Installs klp's `fork(2)` handlers (once per process): a child never inherits one of
/// klp's locks held by a thread that does not exist in it, and its registry describes
/// its one thread.
pub(crate) fn install_atfork() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        // SAFETY: the three handlers are `extern "C" fn()` that stay valid for the
        // life of the process.
        unsafe {
            libc::pthread_atfork(Some(fork_prepare), Some(fork_parent), Some(fork_child));
        }
    });
}

// ------------------------------------------------------------------ pthread_create

type StartRoutine = extern "C" fn(*mut c_void) -> *mut c_void;
type PthreadCreate = unsafe extern "C" fn(
    *mut libc::pthread_t,
    *const libc::pthread_attr_t,
    StartRoutine,
    *mut c_void,
) -> libc::c_int;

static REAL_CREATE: AtomicUsize = AtomicUsize::new(0);
/// Threads created through the interposer (for tests and diagnostics).
pub(crate) static CREATED: AtomicU64 = AtomicU64::new(0);

// The sanitizer runtime's `pthread_create` (sanitizer_common's interception: the weak
// `pthread_create` it defines is an alias of this one). Forwarding past it to the C
// library made the runtime miss every thread klp creates: AddressSanitizer aborted on
// the first join ("Joining already joined thread") or detach (a CHECK in
// `ThreadArgRetval::DetachLocked`).
#[cfg(klp_sanitizer)]
unsafe extern "C" {
    fn __interceptor_pthread_create(
        thread: *mut libc::pthread_t,
        attr: *const libc::pthread_attr_t,
        start: StartRoutine,
        arg: *mut c_void,
    ) -> libc::c_int;
}

/// The `pthread_create` the interposer forwards to: the sanitizer's interceptor when
/// there is one, else the next definition after this one (the C library's).
fn real_create() -> Option<PthreadCreate> {
    #[cfg(klp_sanitizer)]
    return Some(__interceptor_pthread_create);
    #[allow(unreachable_code)]
    let mut p = REAL_CREATE.load(Ordering::Acquire);
    if p == 0 {
        // SAFETY: `dlsym` with `RTLD_NEXT` and a NUL-terminated name is always sound;
        // it returns null when no later object defines the symbol.
        p = unsafe { libc::dlsym(libc::RTLD_NEXT, c"pthread_create".as_ptr()) } as usize;
        if p == 0 || p == pthread_create as *const () as usize {
            return None;
        }
        REAL_CREATE.store(p, Ordering::Release);
    }
    // SAFETY: `p` is the address of the C library's `pthread_create`, whose type is
    // `PthreadCreate`.
    Some(unsafe { std::mem::transmute::<usize, PthreadCreate>(p) })
}

/// Makes sure the interposer is linked into every program that uses this crate (the
/// archive member that defines it is pulled in with the registry).
fn ensure_interposer() {
    std::hint::black_box(pthread_create as *const () as usize);
    install_atfork();
}

struct StartData {
    start: StartRoutine,
    arg: *mut c_void,
    rec: Arc<ThreadRecord>,
}

extern "C" fn thread_start(data: *mut c_void) -> *mut c_void {
    // SAFETY: `thread_main` has the signature `entry_frame` expects and `data` is the
    // boxed `StartData` handed to this thread (conditions 1 and 2).
    unsafe { entry_frame(thread_main, data) }
}

extern "C" fn thread_main(data: *mut c_void, frame: *mut c_void) -> *mut c_void {
    // SAFETY: `data` is the `Box<StartData>` leaked by `pthread_create` for this thread;
    // it is reclaimed exactly once, here.
    let data = unsafe { Box::from_raw(data as *mut StartData) };
    attach(&data.rec, frame as u64);
    let (start, arg) = (data.start, data.arg);
    drop(data);
    start(arg)
}

/// The interposed `pthread_create`: registers the child (see the module docs) and
/// forwards to the C library's.
///
/// # Safety
///
/// The same as the C library's `pthread_create`:
/// 1. `thread` is valid for writing a `pthread_t`;
/// 2. `attr` is null or points to an initialised attribute object;
/// 3. `start` may be called on a new thread with `arg`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn pthread_create(
    thread: *mut libc::pthread_t,
    attr: *const libc::pthread_attr_t,
    start: StartRoutine,
    arg: *mut c_void,
) -> libc::c_int {
    let Some(real) = real_create() else {
        return libc::EAGAIN;
    };
    let gate = ForkGate::shared();
    let parent = current_record();
    let state = parent
        .as_ref()
        .map_or_else(|| late_state(&gate), |p| p.state.load(Ordering::Acquire));
    let rec = new_record(state);
    lock_registry().push(rec.clone());
    drop(gate);
    let data = Box::into_raw(Box::new(StartData {
        start,
        arg,
        rec: rec.clone(),
    }));
    // SAFETY: conditions 1–3 are the caller's; `thread_start` takes ownership of
    // `data` on the new thread.
    let r = unsafe { real(thread, attr, thread_start, data as *mut c_void) };
    if r != 0 {
        // SAFETY: the thread was not created, so `data` is still ours.
        drop(unsafe { Box::from_raw(data) });
        let mut reg = lock_registry();
        reg.retain(|x| !Arc::ptr_eq(x, &rec));
        rec.alive.store(false, Ordering::Release);
    } else {
        CREATED.fetch_add(1, Ordering::Relaxed);
    }
    r
}

// ------------------------------------------------------------------ entry frame

/// Calls `f(arg, frame)` from a frame built in assembly, where `frame` is the address
/// a reliable walk of this thread's stack must end at (the back-end's
/// [`klp_arch::Live::ENTRY_FRAME`]: the frame record on frame-pointer arches, the
/// stack pointer of the frame the callee's back chain leads to on the others).
///
/// # Safety
///
/// 1. `f` may be called with `arg` and the frame address.
/// 2. `f` does not unwind (it is `extern "C"`; a panic aborts).
pub unsafe fn entry_frame(
    f: extern "C" fn(*mut c_void, *mut c_void) -> *mut c_void,
    arg: *mut c_void,
) -> *mut c_void {
    // SAFETY: conditions 1 and 2 are the back-end's.
    unsafe { <klp::arch::Native as klp_arch::Live>::ENTRY_FRAME(f, arg) }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The interposer forwards to the sanitizer's interceptor in a sanitizer build (the
    /// C library's function otherwise): forwarding past it aborted every thread join
    /// under AddressSanitizer (ci/test's sanitizer runs).
    #[test]
    fn the_interposer_forwards_to_the_sanitizers_pthread_create() {
        let real = real_create().expect("a pthread_create to forward to") as usize;
        #[cfg(klp_sanitizer)]
        assert_eq!(real, __interceptor_pthread_create as *const () as usize);
        #[cfg(not(klp_sanitizer))]
        {
            // SAFETY: as in `real_create`.
            let next = unsafe { libc::dlsym(libc::RTLD_NEXT, c"pthread_create".as_ptr()) };
            assert_eq!(real, next as usize);
        }
        assert_ne!(real, pthread_create as *const () as usize);
        // A thread created through the interposer is known to the sanitizer: joining
        // it is fine.
        let before = CREATED.load(Ordering::Relaxed);
        std::thread::spawn(|| ()).join().expect("join");
        assert!(
            CREATED.load(Ordering::Relaxed) > before,
            "created through klp"
        );
    }

    #[test]
    fn packed_state_round_trips() {
        let r = ThreadRecord::new(1, ST_IDLE);
        assert_eq!(r.patch_state(), PatchState::Idle);
        r.set_patch_state(PatchState::Unpatched);
        r.set_pending(true);
        assert_eq!(
            (r.patch_state(), r.pending()),
            (PatchState::Unpatched, true)
        );
        r.set_patch_state(PatchState::Unpatched);
        assert!(r.pending(), "setting the state keeps the flag");
        assert!(r.update_patch_state());
        assert_eq!((r.patch_state(), r.pending()), (PatchState::Patched, false));
        assert!(!r.update_patch_state(), "not pending: nothing to do");
        assert_eq!(r.patch_state(), PatchState::Patched);
    }

    #[test]
    fn entry_frame_passes_arguments() {
        extern "C" fn f(a: *mut c_void, frame: *mut c_void) -> *mut c_void {
            // The stack pointer itself, not the address of a local: AddressSanitizer
            // puts address-taken locals on a stack of its own (use-after-return
            // detection), far from the machine stack.
            let sp = <klp::arch::Native as klp_arch::Live>::capture().sp as usize;
            // The frame is above this function's frame, and close.
            assert!((frame as usize) > sp && (frame as usize) - sp < 1 << 16);
            (a as usize + 1) as *mut c_void
        }
        // SAFETY: `f` takes any argument and does not unwind (1, 2).
        let r = unsafe { entry_frame(f, 41 as *mut c_void) };
        assert_eq!(r as usize, 42);
    }

    #[test]
    fn spawned_threads_are_registered_with_their_stack() {
        let before = CREATED.load(Ordering::Relaxed);
        let h = std::thread::spawn(|| {
            let r = current_record().expect("registered by the interposed pthread_create");
            let (low, high) = r.stack();
            // (The stack pointer, not the address of a local: see above.)
            let here = <klp::arch::Native as klp_arch::Live>::capture().sp;
            assert!(low < here && here < high, "{low:#x} {here:#x} {high:#x}");
            assert!(r.entry_frame() > here && r.entry_frame() < high);
            assert_eq!(r.tid(), gettid());
            assert!(threads().iter().any(|x| x.id == r.id));
            r.id
        });
        let id = h.join().expect("thread");
        assert!(CREATED.load(Ordering::Relaxed) > before);
        // Gone from the registry once it exited.
        assert!(find(id).is_none());
    }

    #[test]
    fn a_fake_signal_ends_an_idle_wait() {
        let (tx, rx) = std::sync::mpsc::channel();
        let h = std::thread::spawn(move || {
            tx.send(register_current()).ok();
            let t0 = std::time::Instant::now();
            let woken = idle_wait(std::time::Duration::from_secs(60));
            (woken, t0.elapsed())
        });
        let rec = rx.recv().expect("record");
        std::thread::sleep(std::time::Duration::from_millis(50));
        wake(&rec);
        let (woken, took) = h.join().expect("waiter");
        assert!(woken);
        assert!(took < std::time::Duration::from_secs(30), "{took:?}");
        // Without a wake-up the wait times out.
        assert!(!idle_wait(std::time::Duration::from_millis(10)));
    }

    #[test]
    fn idle_wait_passes_a_safe_point() {
        std::thread::spawn(|| {
            let r = register_current();
            r.set_patch_state(PatchState::Unpatched);
            r.set_pending(true);
            idle_wait(std::time::Duration::from_millis(1));
            assert_eq!((r.patch_state(), r.pending()), (PatchState::Patched, false));
            r.set_patch_state(PatchState::Idle);
        })
        .join()
        .expect("thread");
    }

    #[test]
    fn late_threads_join_unswitched_during_a_transition() {
        let g = ForkGate::exclusive();
        publish_target(&g, PatchState::Patched);
        let s = late_state(&g);
        publish_target(&g, PatchState::Idle);
        assert_eq!(decode(s), PatchState::Unpatched);
        assert!(s & PENDING != 0);
        assert_eq!(late_state(&g), ST_IDLE);
    }

    #[test]
    fn run_as_task_records_the_end_frame() {
        std::thread::spawn(|| {
            let outer = register_current().entry_frame();
            let inner = run_as_task(|| register_current().entry_frame());
            assert_ne!(inner, outer);
            assert!(inner != 0 && inner < outer, "{inner:#x} {outer:#x}");
            assert_eq!(register_current().entry_frame(), outer, "restored");
        })
        .join()
        .expect("thread");
    }
}
