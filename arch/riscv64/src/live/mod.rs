//! What only runs on riscv64: register capture, text writes with the coherence
//! sequence ([`crate::CACHE_SYNC`] on this hart, `riscv_flush_icache` for the others),
//! the entry frame of a thread, the entry trampoline of redirected sites
//! ([`trampoline`]) and the wrapper of klp-user's `patchable!`.
//!
//! # Making every hart see a text write
//!
//! On RISC-V, instruction fetch is not coherent with stores: a hart is only guaranteed
//! to fetch what was stored (by itself or by another hart, once that store is visible
//! to it) after it executes `fence.i` itself (Zifencei). Nothing else synchronises
//! instruction fetch: unlike arm64, where an exception entry and return are context
//! synchronisation events, a trap into the kernel and the `sret` back are not defined
//! to discard fetched instructions, and Linux's return to user space runs no `fence.i`
//! unless it was asked to. So the host's synchronisation round (every thread enters
//! the signal handler and comes back) does not make the other harts fetch the new
//! word by itself, as it does on arm64.
//!
//! The writer therefore asks the kernel: `riscv_flush_icache(start, end, 0)` (system
//! call 259, Linux ≥ 4.15) executes `fence.i` on this hart, makes every other hart
//! that runs a thread of this process execute one (an IPI or an SBI remote fence,
//! waited for) and marks the process's instruction cache stale on every other hart,
//! which then executes `fence.i` before it next runs one of its threads. When the call
//! returns, no hart of the process fetches the old word any more; the plan's round
//! that follows only moves threads caught inside the site ([`crate::patching`]).
//! [`klp_riscv64_sync_icache`] does both, in one `asm!` block: the local `fence.i` of
//! [`crate::CACHE_SYNC`], then the system call.
//!
//! `membarrier(MEMBARRIER_CMD_PRIVATE_EXPEDITED_SYNC_CORE)`, which the host uses for
//! [`klp_arch::patching::Sync::Core`] steps, would do the same on kernels that
//! implement it for riscv (Linux ≥ 6.9: every thread of the process executes
//! `fence.i` before it returns to user space), but it needs the process to have
//! registered for it first, older kernels refuse it (`EINVAL`), and the host runs it
//! only for `Sync::Core` steps, which these plans do not use. The system call needs
//! neither. Under QEMU's user mode, which retranslates code when its page is written,
//! both are no-ops.

use core::arch::asm;
use core::ffi::c_void;
use core::sync::atomic::{AtomicU32, Ordering};

pub mod trampoline;
pub use trampoline::entry_trampoline;

use klp_arch::live::{EntryFn, EntryFrameFn};
use klp_arch::{Live, UcontextLayout, UnwindStart};

/// `__NR_riscv_flush_icache` (`__NR_arch_specific_syscall` 244 + 15).
pub const SYS_RISCV_FLUSH_ICACHE: usize = 259;

/// The caller's own registers: the address of this code, `sp` and `s0`.
#[inline(always)]
pub fn capture() -> UnwindStart {
    let (pc, sp, fp): (u64, u64, u64);
    // SAFETY: the asm only copies registers into outputs; no memory, no stack change.
    unsafe {
        asm!(
            "auipc {pc}, 0",
            "mv {sp}, sp",
            "mv {fp}, s0",
            pc = out(reg) pc,
            sp = out(reg) sp,
            fp = out(reg) fp,
            options(nomem, nostack, preserves_flags),
        );
    }
    UnwindStart { pc, sp, fp }
}

/// Makes `addr..addr + len`, just written, visible to instruction fetch on every hart
/// that runs this process (see the module docs): `fence.i` on this hart, then
/// `riscv_flush_icache(addr, addr + len, 0)`. Returns the system call's result (0, or
/// a negative errno where the kernel lacks it: then only this hart is synchronised).
/// One `asm!` block keeps the order; out of line under a fixed name so that CI can
/// disassemble it and check it.
#[inline(never)]
#[unsafe(no_mangle)]
pub extern "C" fn klp_riscv64_sync_icache(addr: usize, len: usize) -> isize {
    let end = addr.saturating_add(len);
    let ret: isize;
    // SAFETY: `fence.i` has no operands and changes no memory; the system call reads
    // its three arguments (the kernel ignores the range, and flags 0 asks for every
    // hart) and writes only `a0`, which is declared. No memory is written (no
    // `readonly`/`nomem`, so the compiler keeps the caller's stores before it).
    unsafe {
        asm!(
            "fence.i",
            "ecall",
            inlateout("a0") addr => ret,
            in("a1") end,
            in("a2") 0usize,
            in("a7") SYS_RISCV_FLUSH_ICACHE,
            options(nostack, preserves_flags),
        );
    }
    ret
}

/// Writes `bytes` to text at `dst` and makes them visible to instruction fetch on
/// every hart ([`klp_riscv64_sync_icache`]).
///
/// # Safety
///
/// 1. `dst..dst + bytes.len()` is valid for writes (the host made the text writable).
/// 2. No thread executes those bytes while they are written, or each written word is
///    one aligned 4-byte store of a plan's step ([`crate::patching`]).
/// 3. Text writes are serialised by the caller (one writer at a time).
pub unsafe fn write_text(dst: *mut u8, bytes: &[u8]) {
    // SAFETY: conditions 1–3 of this function cover the destination; `bytes` is a
    // slice of the caller's and does not overlap text being written.
    unsafe { core::ptr::copy_nonoverlapping(bytes.as_ptr(), dst, bytes.len()) };
    klp_riscv64_sync_icache(dst as usize, bytes.len());
}

/// Stores the instruction `word` at `dst` with one aligned 4-byte store (a thread
/// fetching it sees the old or the new instruction), then makes it visible to every
/// hart ([`klp_riscv64_sync_icache`]).
///
/// # Safety
///
/// 1. `dst` is 4-byte aligned, mapped and writable (the host made the text writable).
/// 2. A thread may execute the word while it is written only under the plans of
///    [`crate::patching`] (the old and the new instruction each safe to run in that
///    state of the site).
/// 3. Text writes are serialised by the caller (one writer at a time), and no code
///    reads or writes the word with non-atomic accesses meanwhile.
pub unsafe fn write_word(dst: *mut u32, word: u32) {
    // SAFETY: `dst` is aligned, mapped and writable (1), and every other access to
    // it while the reference lives is atomic or an instruction fetch (3).
    let a = unsafe { AtomicU32::from_ptr(dst) };
    a.store(word, Ordering::Release);
    klp_riscv64_sync_icache(dst as usize, 4);
}

/// Calls `f(arg, frame)` from a frame built in assembly, where `frame` is the address
/// a reliable walk of this thread's stack ends at: this function's frame pointer
/// (`s0` = its entry `sp`), below which its frame record `{caller's s0, return
/// address}` lies, the convention of [`crate::unwind`]. A walk from `f` reads `f`'s
/// record, reports the return into this function, and reaches `s0 == frame`.
///
/// # Safety
///
/// 1. `f` may be called with `arg` and the frame address.
/// 2. `f` does not unwind (it is `extern "C"`; a panic aborts).
#[unsafe(naked)]
pub unsafe extern "C" fn entry_frame(f: EntryFn, arg: *mut c_void) -> *mut c_void {
    core::arch::naked_asm!(
        "addi sp, sp, -16",
        "sd ra, 8(sp)",
        "sd s0, 0(sp)",
        "addi s0, sp, 16",
        "mv t1, a0",
        "mv a0, a1",
        "mv a1, s0",
        "jalr ra, 0(t1)",
        "ld ra, 8(sp)",
        "ld s0, 0(sp)",
        "addi sp, sp, 16",
        "ret",
    )
}

/// The wrapper of `klp_user::patchable!` on riscv64: the `nop; nop` site (4-byte
/// `nop`s even with the C extension; rustc aligns a naked function to 4 bytes, as a
/// site needs), then a tail branch to the body, `auipc t1; jalr zero, (t1)` (±2 GiB;
/// `t1` is free at a call), kept as written (no compression, no linker relaxation)
/// so that [`SitePlanner::wrapper_body`](klp_arch::SitePlanner::wrapper_body) decodes
/// it.
#[doc(hidden)]
#[macro_export]
macro_rules! patchable_wrapper {
    ($(#[$m:meta])* $vis:vis fn $name:ident($($arg:ident : $ty:ty),*) $(-> $ret:ty)?) => {
        $(#[$m])*
        #[unsafe(no_mangle)]
        #[unsafe(naked)]
        $vis extern "C" fn $name($($arg: $ty),*) $(-> $ret)? {
            ::core::arch::naked_asm!(
                ".option push",
                ".option norvc",
                ".option norelax",
                "nop",
                "nop",
                "1:",
                "auipc t1, %pcrel_hi({body})",
                "jalr zero, %pcrel_lo(1b)(t1)",
                ".option pop",
                body = sym $name::body,
            )
        }
    };
}

impl Live for crate::Riscv64 {
    const UCONTEXT: Option<UcontextLayout> = Some(crate::sigframe::LAYOUT);
    const HAS_LINK_REGISTER: bool = true;
    // The psABI makes the frame pointer optional and Debian's C library is built
    // without it: there `s0` is an ordinary callee-saved register, so a walk that
    // starts in a thread blocked in the C library (the common case for a stopped
    // thread) reads whatever `s0` holds. A host relies on its conservative scan.
    const USER_STACK_WALKABLE: bool = false;
    const ENTRY_FRAME: EntryFrameFn = entry_frame;

    #[inline(always)]
    fn capture() -> UnwindStart {
        capture()
    }

    fn trampoline() -> u64 {
        trampoline::address()
    }

    unsafe fn write_text(dst: *mut u8, bytes: &[u8]) {
        // SAFETY: the trait's conditions are this function's.
        unsafe { write_text(dst, bytes) }
    }

    fn sync_icache(addr: *const u8, len: usize) {
        klp_riscv64_sync_icache(addr as usize, len);
    }

    unsafe fn store_text(dst: *mut u8, bytes: &[u8]) -> bool {
        let Ok(w) = <[u8; 4]>::try_from(bytes) else {
            return false;
        };
        if !(dst as usize).is_multiple_of(4) {
            return false;
        }
        // SAFETY: an aligned (checked), mapped, writable word (1), changed in a plan's
        // order (2), by the only writer (3; the host reads the site only under the
        // same lock).
        unsafe { write_word(dst.cast::<u32>(), u32::from_le_bytes(w)) };
        true
    }

    fn set_decision(f: extern "C" fn(u64) -> u64) {
        trampoline::set_decision(f);
    }

    unsafe fn read_stack_word(addr: u64) -> u64 {
        let v: u64;
        // SAFETY: one 8-byte load of readable, aligned memory (condition 1); no stack
        // use.
        unsafe {
            asm!(
                "ld {v}, 0({a})",
                a = in(reg) addr,
                v = lateout(reg) v,
                options(nostack, preserves_flags, readonly),
            );
        }
        v
    }
}

#[cfg(test)]
mod tests;
