//! What only runs on aarch64: register capture, text writes with the cache
//! maintenance the architecture requires ([`crate::CACHE_SYNC`]) and the entry
//! trampoline of redirected sites ([`trampoline`]).

use core::arch::asm;

pub mod trampoline;
pub use trampoline::{entry_trampoline, klp_aarch64_write_word};

use core::ffi::c_void;

use klp_arch::live::{EntryFn, EntryFrameFn};
use klp_arch::{Live, UcontextLayout, UnwindStart};

/// The caller's own registers: the address of this code, `sp` and `x29`.
#[inline(always)]
pub fn capture() -> UnwindStart {
    let (pc, sp, fp): (u64, u64, u64);
    // SAFETY: the asm only copies registers into outputs; no memory, no flags, no
    // stack change.
    unsafe {
        asm!(
            "adr {pc}, .",
            "mov {sp}, sp",
            "mov {fp}, x29",
            pc = out(reg) pc,
            sp = out(reg) sp,
            fp = out(reg) fp,
            options(nomem, nostack, preserves_flags),
        );
    }
    UnwindStart { pc, sp, fp }
}

/// Data- and instruction-cache line sizes from `CTR_EL0` (readable at EL0 on Linux).
pub fn cache_lines() -> (usize, usize) {
    let ctr: u64;
    // SAFETY: reading CTR_EL0 has no side effect; Linux allows (or emulates) it at EL0.
    unsafe { asm!("mrs {}, ctr_el0", out(reg) ctr, options(nomem, nostack, preserves_flags)) };
    let dline = 4usize << ((ctr >> 16) & 0xf);
    let iline = 4usize << (ctr & 0xf);
    (dline, iline)
}

/// The coherence sequence of [`crate::CACHE_SYNC`] over `addr..addr + len`:
/// `dc cvau` per data line, `dsb ish`, `ic ivau` per instruction line, `dsb ish`,
/// `isb`. One `asm!` block, so the instructions stay in program order; kept out of
/// line under a fixed name so CI can disassemble it and check that order.
#[inline(never)]
#[unsafe(no_mangle)]
pub extern "C" fn klp_aarch64_sync_icache(addr: usize, len: usize) {
    let (dline, iline) = cache_lines();
    let end = addr.saturating_add(len.max(1));
    // SAFETY: `dc cvau` and `ic ivau` maintain caches by address without changing
    // memory contents; they need mapped addresses, which the range is (the caller just
    // wrote it; the loops start at the line containing `addr` and stop before `end`).
    // The barriers have no operands. Only the declared scratch registers and the
    // condition flags (no `preserves_flags`) are changed.
    unsafe {
        asm!(
            "2:",
            "dc cvau, {d}",
            "add {d}, {d}, {dline}",
            "cmp {d}, {end}",
            "b.lo 2b",
            "dsb ish",
            "3:",
            "ic ivau, {i}",
            "add {i}, {i}, {iline}",
            "cmp {i}, {end}",
            "b.lo 3b",
            "dsb ish",
            "isb",
            d = inout(reg) line_start(addr, dline) => _,
            i = inout(reg) line_start(addr, iline) => _,
            dline = in(reg) dline,
            iline = in(reg) iline,
            end = in(reg) end,
            options(nostack),
        );
    }
}

/// The start of the cache line of `line` bytes (a power of two) holding `addr`: the
/// two's-complement negation of a power of two is the mask of its multiples.
fn line_start(addr: usize, line: usize) -> usize {
    addr & line.wrapping_neg()
}

/// Writes `bytes` to text at `dst` and makes them visible to instruction fetch.
///
/// # Safety
///
/// 1. `dst..dst + bytes.len()` is valid for writes (the host made the text writable).
/// 2. No thread executes those bytes while they are written, or each written word is
///    one aligned 4-byte store of an instruction that is safe to execute in either
///    state (the architecture's concurrent-modification rule for `b`/`bl`/`nop`).
/// 3. Text writes are serialised by the caller (one writer at a time).
pub unsafe fn write_text(dst: *mut u8, bytes: &[u8]) {
    // SAFETY: conditions 1–3 of this function cover the destination.
    unsafe { core::ptr::copy_nonoverlapping(bytes.as_ptr(), dst, bytes.len()) };
    klp_aarch64_sync_icache(dst as usize, bytes.len());
}

/// Calls `f(arg, frame)` from a frame built in assembly, where `frame` is the address
/// a reliable walk of this thread's stack ends at (the frame record its `x29` points to).
///
/// # Safety
///
/// 1. `f` may be called with `arg` and the frame address.
/// 2. `f` does not unwind (it is `extern "C"`; a panic aborts).
#[unsafe(naked)]
pub unsafe extern "C" fn entry_frame(f: EntryFn, arg: *mut c_void) -> *mut c_void {
    core::arch::naked_asm!(
        "stp x29, x30, [sp, #-16]!",
        "mov x29, sp",
        "mov x2, x0",
        "mov x0, x1",
        "mov x1, x29",
        "blr x2",
        "ldp x29, x30, [sp], #16",
        "ret",
    )
}

/// The wrapper of `klp_user::patchable!` on aarch64: the `mov x9, x30; nop` site, then
/// a tail branch to the body.
#[doc(hidden)]
#[macro_export]
macro_rules! patchable_wrapper {
    ($(#[$m:meta])* $vis:vis fn $name:ident($($arg:ident : $ty:ty),*) $(-> $ret:ty)?) => {
        $(#[$m])*
        #[unsafe(no_mangle)]
        #[unsafe(naked)]
        $vis extern "C" fn $name($($arg: $ty),*) $(-> $ret)? {
            ::core::arch::naked_asm!(
                "mov x9, x30",
                "nop",
                "b {body}",
                body = sym $name::body,
            )
        }
    };
}

impl Live for crate::Aarch64 {
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
        klp_aarch64_sync_icache(addr as usize, len)
    }

    unsafe fn store_text(dst: *mut u8, bytes: &[u8]) -> bool {
        let Ok(w) = <[u8; 4]>::try_from(bytes) else {
            return false;
        };
        if !(dst as usize).is_multiple_of(4) {
            return false;
        }
        // SAFETY: an aligned, mapped, writable word (1), changed in a plan's order
        // (2), by the only writer (3).
        unsafe { klp_aarch64_write_word(dst.cast::<u32>(), u32::from_le_bytes(w)) };
        true
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
                "ldr {v}, [{a}]",
                a = in(reg) addr,
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
    }

    #[test]
    fn cache_lines_are_sane() {
        let (d, i) = cache_lines();
        assert!(d.is_power_of_two() && (4..=2048).contains(&d), "{d}");
        assert!(i.is_power_of_two() && (4..=2048).contains(&i), "{i}");
    }

    #[test]
    fn write_text_copies_and_syncs() {
        let mut buf = [0u8; 64];
        // SAFETY: `buf` is a writable local buffer that no thread executes (1, 2, 3).
        unsafe { write_text(buf.as_mut_ptr().wrapping_add(4), &[0x1f, 0x20, 0x03, 0xd5]) };
        assert_eq!(&buf[4..8], &[0x1f, 0x20, 0x03, 0xd5]);
    }
}
