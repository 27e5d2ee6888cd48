//! The live half of a back-end: what a host running *on* the machine needs from it.
//!
//! [`crate::Arch`] is knowledge, tested on every host. [`Live`] is implemented by a
//! back-end's marker type only in a build for its own architecture (in its `live`
//! module): register capture, the entry trampoline, the entry frame of a task, text
//! writes with the coherence sequence, and where a Linux signal frame keeps the
//! registers. A host (the user-space one, `klp-user`) reaches it through
//! `klp_backends::Native` and names no architecture itself.

use core::ffi::c_void;

use crate::{SitePlanner, UnwindStart};

/// The registers of a thread that a stack check needs.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Regs {
    /// Program counter.
    pub pc: u64,
    /// Stack pointer.
    pub sp: u64,
    /// Frame pointer (x86_64 `rbp`, aarch64 `x29`); 0 where the arch walks a back
    /// chain from the stack pointer.
    pub fp: u64,
    /// Link register (the innermost return address before the callee saves it); 0
    /// where the arch has none.
    pub lr: u64,
}

impl Regs {
    /// Where a reliable walk starts.
    pub const fn start(&self) -> UnwindStart {
        UnwindStart {
            pc: self.pc,
            sp: self.sp,
            fp: self.fp,
        }
    }
}

/// Where a Linux signal handler's `ucontext_t` (the third argument of an
/// `SA_SIGINFO` handler) keeps the registers of the interrupted thread: byte offsets
/// of 8-byte words from the start of the `ucontext_t`. The kernel's signal frame
/// layout is ABI, so a back-end derives them from `#[repr(C)]` mirrors of the
/// kernel's structures with `offset_of!`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct UcontextLayout {
    /// The program counter.
    pub pc: usize,
    /// The stack pointer.
    pub sp: usize,
    /// The frame pointer, where the arch has one.
    pub fp: Option<usize>,
    /// The link register, where the arch has one.
    pub lr: Option<usize>,
    /// The register a plan's trap entry sets ([`crate::patching::TrapEntry::link`];
    /// s390x: `r0`, which the site's `brasl %r0` would have set), where plans use it.
    pub trap_link: Option<usize>,
}

/// The kernel's `stack_t` on a 64-bit Linux (`include/uapi/asm-generic/signal.h`: the
/// same layout on every 64-bit architecture), for the back-ends' mirrors of
/// `struct ucontext`, whose `uc_stack` it is.
#[derive(Debug)]
#[repr(C)]
pub struct SigStack {
    /// `ss_sp`.
    pub ss_sp: u64,
    /// `ss_flags`.
    pub ss_flags: i32,
    /// `ss_size`.
    pub ss_size: u64,
}

const _: () = assert!(core::mem::size_of::<SigStack>() == 24);

/// A function called from a task's entry frame: `f(arg, frame)`.
pub type EntryFn = extern "C" fn(*mut c_void, *mut c_void) -> *mut c_void;

/// Calls `f(arg, frame)` from a frame built in assembly; `frame` is the address a
/// reliable walk of the thread's stack ends at ([`crate::StackBounds::end`]).
///
/// # Safety
///
/// 1. `f` may be called with `arg` and the frame address.
/// 2. `f` does not unwind (it is `extern "C"`; a panic aborts).
pub type EntryFrameFn = unsafe extern "C" fn(EntryFn, *mut c_void) -> *mut c_void;

/// The layout a host's records have for a back-end's fast entry path
/// ([`Live::fast_entry`]): a path that takes the redirect decision in a few
/// instructions, without saving registers or calling anything, from the calling
/// thread's record and the site's slot. A host that enables the fast path lays its
/// records out so (and checks it with `const` assertions).
pub mod fast {
    /// Offset of the thread's patch-state byte in its record; `state & STATE_MASK`
    /// indexes a slot's answers.
    pub const TASK_STATE: usize = 0;
    /// Offset of the thread's in-decision counter (a `u32`, raised while it decides).
    pub const TASK_IN_DECIDE: usize = 4;
    /// The bits of the state byte that index a slot's answers.
    pub const STATE_MASK: u8 = 3;
    /// Offset of the site's address in its slot.
    pub const SLOT_SITE: usize = 0;
    /// Offset of the slot's sequence (odd while it is written).
    pub const SLOT_SEQ: usize = 8;
    /// Offset of the slot's four answers (`u64` each: the implementation's address, 0
    /// for the original, [`SLOW`] for the full decision), indexed by the state.
    pub const SLOT_BY_STATE: usize = 16;
    /// An answer that sends the thread to the full decision.
    pub const SLOW: u64 = u64::MAX;
}

/// The live half of a back-end (see the module documentation).
pub trait Live: SitePlanner {
    /// Where a signal frame keeps the registers (`None`: a build without a back-end).
    const UCONTEXT: Option<UcontextLayout>;

    /// Whether the innermost return address may be in a link register (then a stack
    /// check looks at it as well as at the stack).
    const HAS_LINK_REGISTER: bool;

    /// Whether the reliable unwinder can walk a user-space stack from the interrupted
    /// registers to the entry frame. False where user-space code keeps no walkable
    /// chain (s390x: the back chain is optional in the ABI and absent from the C
    /// library); a host then relies on its conservative scan alone.
    const USER_STACK_WALKABLE: bool;

    /// Calls a function from a task's entry frame (see [`EntryFrameFn`]).
    const ENTRY_FRAME: EntryFrameFn;

    /// The caller's own registers: the address of the code that called, its stack
    /// and frame pointers. Implementations are `#[inline(always)]`, so the values are
    /// the caller's.
    fn capture() -> UnwindStart;

    /// The address of the entry trampoline that redirected sites branch to (for
    /// recognising a thread that is inside it).
    fn trampoline() -> u64;

    /// Writes `bytes` to text at `dst` and runs the coherence sequence
    /// ([`crate::Arch::CACHE_SYNC`]) on this CPU.
    ///
    /// # Safety
    ///
    /// 1. `dst..dst + bytes.len()` is valid for writes (the host made the text
    ///    writable).
    /// 2. No thread executes those bytes while they are written, or the write follows
    ///    the back-end's protocol for live sites.
    /// 3. Text writes are serialised by the caller (one writer at a time).
    unsafe fn write_text(dst: *mut u8, bytes: &[u8]);

    /// Makes `len` bytes at `addr`, just written, ready for this CPU to execute.
    fn sync_icache(addr: *const u8, len: usize);

    /// Performs one [`crate::patching::Step`] of a plan: stores `bytes` at `dst` with
    /// the store the back-end's plans rely on for that length (whole instructions
    /// single-copy atomic for instruction fetch), then the coherence sequence on this
    /// CPU. Returns false, storing nothing, when the length or alignment is not one
    /// the back-end's plans produce.
    ///
    /// # Safety
    ///
    /// 1. `dst..dst + bytes.len()` is valid for writes (the host made it writable).
    /// 2. The store is a step of a plan of [`SitePlanner::plan`] for the site at
    ///    hand, performed in order, with the plan's synchronisation after each step.
    /// 3. Text writes are serialised by the caller.
    unsafe fn store_text(dst: *mut u8, bytes: &[u8]) -> bool;

    /// Tells the entry trampoline which function decides (called with the site,
    /// returns 0 for the original or the address to continue at).
    fn set_decision(f: extern "C" fn(u64) -> u64);

    /// The back-end's fast entry path, once enabled ([`Self::enable_fast_path`]): a
    /// site's stub enters it with the site's slot ([`fast`]) instead of entering the
    /// trampoline with the site; its register contract is the back-end's. `None`
    /// without one (every stub enters the trampoline).
    fn fast_entry() -> Option<u64> {
        None
    }

    /// The calling thread's thread pointer, where the back-end's fast path finds the
    /// host's thread-local record pointer at a fixed offset; `None` without a fast
    /// path.
    fn thread_pointer() -> Option<u64> {
        None
    }

    /// Enables the fast path: every thread's record pointer is at `tls_offset` from its
    /// thread pointer (the host's thread-local lies in the executable's static TLS
    /// block). Returns whether the back-end has a fast path.
    fn enable_fast_path(tls_offset: u64) -> bool {
        let _ = tls_offset;
        false
    }

    /// Tells the back-end the process's hardware capabilities (`AT_HWCAP`), before its
    /// first site is written (s390x: whether the trampoline saves vector registers).
    fn set_hwcap(hwcap: u64) {
        let _ = hwcap;
    }

    /// Reads the stack word at `addr` with one load instruction of the back-end's
    /// own (`asm!`), which sanitizers do not instrument: a stack walk reads words no
    /// code of the walker declared (other frames' saved registers, AddressSanitizer's
    /// redzones), like the kernel's `READ_ONCE_NOCHECK`. The default is a volatile
    /// read.
    ///
    /// # Safety
    ///
    /// 1. `addr` is 8-aligned and readable for 8 bytes.
    unsafe fn read_stack_word(addr: u64) -> u64 {
        // SAFETY: condition 1.
        unsafe { (addr as *const u64).read_volatile() }
    }
}

/// The interrupted thread's registers, read from a signal handler's context.
///
/// # Safety
///
/// 1. `uc` is the `ucontext_t` the kernel passed to an `SA_SIGINFO` handler that is
///    still running (the frame is live and readable).
pub unsafe fn regs_from_ucontext<L: Live>(uc: *const c_void) -> Regs {
    let Some(l) = L::UCONTEXT else {
        return Regs::default();
    };
    let at = |off: usize| {
        // SAFETY: `off` is the offset of an 8-byte, 8-aligned register slot inside the
        // kernel's signal frame (the back-end's layout); the frame is live (1).
        unsafe {
            uc.cast::<u8>()
                .wrapping_add(off)
                .cast::<u64>()
                .read_volatile()
        }
    };
    Regs {
        pc: at(l.pc),
        sp: at(l.sp),
        fp: l.fp.map_or(0, at),
        lr: l.lr.map_or(0, at),
    }
}

/// Changes the program counter the interrupted thread resumes at.
///
/// # Safety
///
/// 1. `uc` is the `ucontext_t` of an `SA_SIGINFO` handler that is still running, on
///    the thread that was interrupted (the frame is live and writable).
/// 2. The thread may resume at `pc`.
pub unsafe fn set_pc_in_ucontext<L: Live>(uc: *mut c_void, pc: u64) {
    if let Some(l) = L::UCONTEXT {
        // SAFETY: the pc slot of the live frame (1); resuming there is allowed (2).
        unsafe {
            uc.cast::<u8>()
                .wrapping_add(l.pc)
                .cast::<u64>()
                .write_volatile(pc)
        }
    }
}

/// Sets the register a plan's trap entry sets ([`UcontextLayout::trap_link`]).
///
/// # Safety
///
/// 1. As [`set_pc_in_ucontext`].
pub unsafe fn set_trap_link_in_ucontext<L: Live>(uc: *mut c_void, value: u64) {
    if let Some(off) = L::UCONTEXT.and_then(|l| l.trap_link) {
        // SAFETY: a register slot of the live frame (1).
        unsafe {
            uc.cast::<u8>()
                .wrapping_add(off)
                .cast::<u64>()
                .write_volatile(value)
        }
    }
}

/// Changes the stack pointer the interrupted thread resumes with.
///
/// # Safety
///
/// 1. As [`set_pc_in_ucontext`].
/// 2. The thread may resume with `sp`.
pub unsafe fn set_sp_in_ucontext<L: Live>(uc: *mut c_void, sp: u64) {
    if let Some(l) = L::UCONTEXT {
        // SAFETY: the sp slot of the live frame (1); resuming with it is allowed (2).
        unsafe {
            uc.cast::<u8>()
                .wrapping_add(l.sp)
                .cast::<u64>()
                .write_volatile(sp)
        }
    }
}
