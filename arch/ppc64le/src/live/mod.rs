//! What only runs on powerpc64: register capture, text writes with the cache
//! maintenance of [`crate::CACHE_SYNC`] (`dcbst; sync; icbi; sync; isync`), and the
//! entry trampoline of redirected sites ([`trampoline`]).

pub mod trampoline;

use core::arch::asm;

use core::ffi::c_void;

use klp_arch::live::{EntryFn, EntryFrameFn};
use klp_arch::{Live, UcontextLayout, UnwindStart};

/// The smallest cache block of 64-bit Book3S implementations. Using a block size no
/// larger than the real one only costs extra instructions, never correctness.
pub const CACHE_BLOCK: usize = 32;

/// The caller's own registers: the address of this code (from a `bcl 20,31`), r1,
/// and r1 again as the "frame pointer" (the back chain starts there).
#[inline(always)]
pub fn capture() -> UnwindStart {
    let (pc, sp): (u64, u64);
    // SAFETY: `bcl 20,31,1f` is the ISA's "get the address of the next instruction"
    // idiom: it clobbers only LR (declared), touches no memory; r1 is only read.
    unsafe {
        asm!(
            "bcl 20, 31, 1f",
            "1: mflr {pc}",
            "mr {sp}, 1",
            pc = out(reg) pc,
            sp = out(reg) sp,
            out("lr") _,
            options(nomem, nostack),
        );
    }
    UnwindStart { pc, sp, fp: sp }
}

/// The coherence sequence over `addr..addr + len`: `dcbst` per block, `sync`, `icbi`
/// per block, `sync`, `isync`. One `asm!` block, so the instructions stay in program
/// order; kept out of line under a fixed name so CI can disassemble it and check it.
#[inline(never)]
#[unsafe(no_mangle)]
pub extern "C" fn klp_ppc64le_sync_icache(addr: usize, len: usize) {
    let end = addr.saturating_add(len.max(1));
    let start = addr & !(CACHE_BLOCK - 1);
    // SAFETY: `dcbst` and `icbi` maintain caches by address without changing memory
    // contents; the loops visit the blocks of the range the caller just wrote, which
    // is mapped. The barriers have no operands. Only the declared registers and cr0
    // (no `preserves_flags`) are changed.
    unsafe {
        asm!(
            "2:",
            "dcbst 0, {d}",
            "add {d}, {d}, {blk}",
            "cmpld {d}, {end}",
            "blt 2b",
            "sync",
            "3:",
            "icbi 0, {i}",
            "add {i}, {i}, {blk}",
            "cmpld {i}, {end}",
            "blt 3b",
            "sync",
            "isync",
            d = inout(reg_nonzero) start => _,
            i = inout(reg_nonzero) start => _,
            blk = in(reg) CACHE_BLOCK,
            end = in(reg) end,
            options(nostack),
        );
    }
}

/// Writes `bytes` to text at `dst` and makes them visible to instruction fetch.
///
/// # Safety
///
/// 1. `dst..dst + bytes.len()` is valid for writes (the host made the text writable).
/// 2. No thread executes those bytes while they are written, or each written word is
///    one aligned 4-byte store of an instruction that is safe to execute in either
///    state.
/// 3. Text writes are serialised by the caller (one writer at a time).
pub unsafe fn write_text(dst: *mut u8, bytes: &[u8]) {
    // SAFETY: conditions 1–3 of this function cover the destination.
    unsafe { core::ptr::copy_nonoverlapping(bytes.as_ptr(), dst, bytes.len()) };
    klp_ppc64le_sync_icache(dst as usize, bytes.len());
}

/// Calls `f(arg, frame)` from a frame built in assembly, where `frame` is the address
/// a reliable walk of this thread's stack ends at (the stack pointer of the frame the callee's back chain leads to. A 32-byte ELFv2
/// frame (back chain, CR, LR, TOC save); the TOC pointer is saved around the indirect
/// call, which goes through r12 as the ABI requires).
///
/// # Safety
///
/// 1. `f` may be called with `arg` and the frame address.
/// 2. `f` does not unwind (it is `extern "C"`; a panic aborts).
#[unsafe(naked)]
pub unsafe extern "C" fn entry_frame(f: EntryFn, arg: *mut c_void) -> *mut c_void {
    core::arch::naked_asm!(
        "mflr 0",
        "std 0, 16(1)",
        "stdu 1, -32(1)",
        "std 2, 24(1)",
        "mr 12, 3",
        "mtctr 12",
        "mr 3, 4",
        "mr 4, 1",
        "bctrl",
        "ld 2, 24(1)",
        "addi 1, 1, 32",
        "ld 0, 16(1)",
        "mtlr 0",
        "blr",
    )
}

/// The wrapper of `klp_user::patchable!` on ppc64le: a global entry that sets up the
/// TOC from r12, the site (`nop; nop`) at the local entry, then a tail branch to the
/// body.
#[doc(hidden)]
#[macro_export]
macro_rules! patchable_wrapper {
    ($(#[$m:meta])* $vis:vis fn $name:ident($($arg:ident : $ty:ty),*) $(-> $ret:ty)?) => {
        $(#[$m])*
        #[unsafe(no_mangle)]
        #[unsafe(naked)]
        $vis extern "C" fn $name($($arg: $ty),*) $(-> $ret)? {
            ::core::arch::naked_asm!(
                "0:",
                "addis 2, 12, (.TOC.-0b)@ha",
                "addi 2, 2, (.TOC.-0b)@l",
                ::core::concat!(".localentry ", ::core::stringify!($name), ", .-0b"),
                "nop",
                "nop",
                "b {body}",
                body = sym $name::body,
            )
        }
    };
}

impl Live for crate::Ppc64le {
    const UCONTEXT: Option<UcontextLayout> = Some(crate::sigframe::LAYOUT);
    const HAS_LINK_REGISTER: bool = true;
    const USER_STACK_WALKABLE: bool = true;
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
        klp_ppc64le_sync_icache(addr as usize, len)
    }

    unsafe fn store_text(dst: *mut u8, bytes: &[u8]) -> bool {
        let Ok(w) = <[u8; 4]>::try_from(bytes) else {
            return false;
        };
        // SAFETY: a mapped, writable word (1), changed in a plan's order (2), by the
        // only writer (3); `write_word` refuses a misaligned one.
        unsafe { trampoline::write_word(dst, u32::from_le_bytes(w)) }
    }

    fn set_decision(f: extern "C" fn(u64) -> u64) {
        trampoline::set_decision(f);
    }

    unsafe fn read_stack_word(addr: u64) -> u64 {
        let v: u64;
        // SAFETY: one 8-byte load of readable, aligned memory (condition 1); no stack
        // use, no flags changed.
        unsafe {
            asm!(
                "ld {v}, 0({a})",
                a = in(reg_nonzero) addr,
                v = lateout(reg) v,
                options(nostack, preserves_flags, readonly),
            );
        }
        v
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn capture_sees_this_stack() {
        let local = 0u64;
        let here = &local as *const u64 as u64;
        let r = capture();
        assert!(r.sp <= here && here - r.sp < 1 << 20, "{r:?} vs {here:#x}");
        assert_eq!(r.pc % 4, 0);
    }

    #[test]
    fn write_text_copies_and_syncs() {
        let mut buf = [0u8; 80];
        // SAFETY: `buf` is a writable local buffer that no thread executes (1, 2, 3).
        unsafe {
            write_text(
                buf.as_mut_ptr().wrapping_add(30),
                &[0, 0, 0, 0x60, 1, 2, 3, 4],
            )
        };
        assert_eq!(&buf[30..38], &[0, 0, 0, 0x60, 1, 2, 3, 4]);
    }
}
