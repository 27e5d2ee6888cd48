//! What only runs on powerpc64: register capture, text writes with the cache
//! maintenance of [`crate::CACHE_SYNC`] (`dcbst; sync; icbi; sync; isync`), and the
//! entry trampoline of redirected sites ([`trampoline`]).

pub mod trampoline;

use core::arch::asm;

use klp_arch::UnwindStart;

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
