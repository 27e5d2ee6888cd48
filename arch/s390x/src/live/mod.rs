//! What only runs on s390x: register capture, the entry trampoline and text writes
//! followed by the serialisation of [`crate::CACHE_SYNC`].
//!
//! # Instruction fetch after a text write
//!
//! z/Architecture has no instruction cache to flush: instruction fetch is coherent
//! with stores. What remains is prefetching: a CPU may run instructions it fetched
//! before a store became visible, until it *serialises*. So after a write:
//! * the writing CPU executes [`klp_s390x_sync_icache`], `bcr 15,0`, a serialising
//!   no-op branch (`bcr 14,0` is the cheaper form only with the fast-BCR-serialisation
//!   facility of z196, which is not in the z10 baseline Rust builds for; without it
//!   `bcr 14,0` is a plain no-op);
//! * every other CPU that may run the bytes serialises before the write counts as
//!   done: the host's synchronisation round interrupts each thread with a signal, and
//!   an interruption serialises the CPU it lands on (the kernel's `text_poke_sync`).

use core::arch::asm;

pub mod trampoline;
pub use trampoline::{entry_trampoline, store_halfwords};

use core::ffi::c_void;

use klp_arch::live::{EntryFn, EntryFrameFn};
use klp_arch::{Live, UcontextLayout, UnwindStart};

/// The caller's own registers: the address of this code (`larl`) and r15.
#[inline(always)]
pub fn capture() -> UnwindStart {
    let (pc, sp): (u64, u64);
    // SAFETY: `larl` computes an address and `lgr` copies r15; no memory, no stack
    // change, condition code untouched.
    unsafe {
        asm!(
            "larl {pc}, .",
            "lgr {sp}, %r15",
            pc = out(reg_addr) pc,
            sp = out(reg) sp,
            options(nomem, nostack, preserves_flags),
        );
    }
    UnwindStart { pc, sp, fp: sp }
}

/// Serialises this CPU (`bcr 15,0`), so its later instruction fetches see earlier
/// stores (see the module documentation). Kept out of line under a fixed name so CI
/// can disassemble it.
#[inline(never)]
#[unsafe(no_mangle)]
pub extern "C" fn klp_s390x_sync_icache(_addr: usize, _len: usize) {
    // SAFETY: `bcr 15,0` is a serialising no-op branch; no operands, no memory.
    unsafe { asm!("bcr 15, 0", options(nostack, preserves_flags)) };
}

/// Writes `bytes` to text at `dst` and serialises.
///
/// # Safety
///
/// 1. `dst..dst + bytes.len()` is valid for writes (the host made the text writable).
/// 2. No thread executes those bytes while they are written. (A live site is changed
///    with [`store_halfwords`] under the host's protocol instead: the copy here has no
///    defined store granularity.)
/// 3. Text writes are serialised by the caller (one writer at a time).
pub unsafe fn write_text(dst: *mut u8, bytes: &[u8]) {
    // SAFETY: conditions 1–3 of this function cover the destination.
    unsafe { core::ptr::copy_nonoverlapping(bytes.as_ptr(), dst, bytes.len()) };
    klp_s390x_sync_icache(dst as usize, bytes.len());
}

/// Calls `f(arg, frame)` from a frame built in assembly, where `frame` is the address
/// a reliable walk of this thread's stack ends at (the stack pointer of the frame the callee's back chain leads to. A
/// 160-byte frame with its back chain stored; r14/r15 are saved in the caller's
/// register save area).
///
/// # Safety
///
/// 1. `f` may be called with `arg` and the frame address.
/// 2. `f` does not unwind (it is `extern "C"`; a panic aborts).
#[unsafe(naked)]
pub unsafe extern "C" fn entry_frame(f: EntryFn, arg: *mut c_void) -> *mut c_void {
    core::arch::naked_asm!(
        "stmg %r14, %r15, 112(%r15)",
        "lgr %r1, %r15",
        "aghi %r15, -160",
        "stg %r1, 0(%r15)",
        "lgr %r1, %r2",
        "lgr %r2, %r3",
        "lgr %r3, %r15",
        "basr %r14, %r1",
        "lmg %r14, %r15, 272(%r15)",
        "br %r14",
    )
}

/// The wrapper of `klp_user::patchable!` on s390x: the `brcl 0,0` site, then a tail
/// jump to the body.
#[doc(hidden)]
#[macro_export]
macro_rules! patchable_wrapper {
    ($(#[$m:meta])* $vis:vis fn $name:ident($($arg:ident : $ty:ty),*) $(-> $ret:ty)?) => {
        $(#[$m])*
        #[unsafe(no_mangle)]
        #[unsafe(naked)]
        $vis extern "C" fn $name($($arg: $ty),*) $(-> $ret)? {
            ::core::arch::naked_asm!(
                ".byte 0xc0, 0x04, 0x00, 0x00, 0x00, 0x00",
                "jg {body}",
                body = sym $name::body,
            )
        }
    };
}

impl Live for crate::S390x {
    const UCONTEXT: Option<UcontextLayout> = Some(crate::sigframe::LAYOUT);
    const HAS_LINK_REGISTER: bool = true;
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
        klp_s390x_sync_icache(addr as usize, len)
    }

    unsafe fn store_text(dst: *mut u8, bytes: &[u8]) -> bool {
        // SAFETY: mapped and writable (1), in a plan's order (2), by the only writer
        // (3); `store_halfwords` refuses a misaligned or odd-length store.
        unsafe { store_halfwords(dst, bytes) }
    }

    fn set_decision(f: extern "C" fn(u64) -> u64) {
        trampoline::set_decision(f);
    }

    /// `HWCAP_S390_VXRS` (bit 11): the vector facility, usable by this process, so
    /// the trampoline saves the vector argument registers.
    fn set_hwcap(hwcap: u64) {
        trampoline::set_vector_facility(hwcap & (1 << 11) != 0);
    }

    unsafe fn read_stack_word(addr: u64) -> u64 {
        let v: u64;
        // SAFETY: one 8-byte load of readable, aligned memory (condition 1); no stack
        // use, no flags changed.
        unsafe {
            asm!(
                "lg {v}, 0({a})",
                a = in(reg_addr) addr,
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
        assert_eq!(r.pc % 2, 0);
    }

    #[test]
    fn write_text_copies() {
        let mut buf = [0u8; 16];
        // SAFETY: `buf` is a writable local buffer that no thread executes (1, 2, 3).
        unsafe { write_text(buf.as_mut_ptr().wrapping_add(2), &[0xc0, 0x04, 0, 0, 0, 0]) };
        assert_eq!(&buf[2..8], &[0xc0, 0x04, 0, 0, 0, 0]);
    }

    #[test]
    fn sync_icache_serialises() {
        // `bcr 15,0` (07 f0) before the return (`br %r14`, 07 fe), within the function.
        let f = klp_s390x_sync_icache as *const () as *const [u8; 2];
        let mut seen = [false; 2];
        for i in 0..64 {
            // SAFETY: the function's text is mapped and readable; it is at least as
            // long as the halfwords read before its `br %r14`, where the loop stops.
            let h = unsafe { core::ptr::read_volatile(f.wrapping_add(i)) };
            if h == [0x07, 0xf0] {
                seen[0] = true;
            }
            if h == [0x07, 0xfe] {
                seen[1] = seen[0];
                break;
            }
        }
        assert_eq!(seen, [true, true], "bcr 15,0 then br %r14");
    }
}
