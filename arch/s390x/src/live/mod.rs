//! What only runs on s390x: register capture and text writes followed by the
//! serialisation of [`crate::CACHE_SYNC`].

use core::arch::asm;

use klp_arch::UnwindStart;

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
/// stores. Kept out of line under a fixed name so CI can disassemble it.
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
/// 2. No thread executes those bytes while they are written, or the write is one
///    aligned store of a whole instruction (the 6-byte site is changed as the kernel
///    does, with other CPUs held off by the host).
/// 3. Text writes are serialised by the caller (one writer at a time).
pub unsafe fn write_text(dst: *mut u8, bytes: &[u8]) {
    // SAFETY: conditions 1–3 of this function cover the destination.
    unsafe { core::ptr::copy_nonoverlapping(bytes.as_ptr(), dst, bytes.len()) };
    klp_s390x_sync_icache(dst as usize, bytes.len());
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
}
