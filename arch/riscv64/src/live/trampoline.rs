//! The entry trampoline: what a redirected patch site enters.
//!
//! A patch site `S` (two words at a patchable entry, see [`crate::site`]) is rewritten
//! to `auipc t0, hi; jalr t0, lo(t0)` calling the site's stub, which jumps here
//! through `t1` ([`crate::patching::stub_bytes_to`]). The trampoline asks the host's
//! decision function (see [`set_decision`]) which implementation the calling thread
//! runs and continues there: at `S + 8` (the original body), or at a replacement
//! function entered as if the caller had called it directly.
//!
//! # Register contract
//!
//! **On entry** (just executed the site's `auipc t0; jalr t0` and the stub):
//! * `t0` = `S + 8` (the site's return point), `ra` = the caller's return address;
//! * `sp` as at the function's entry (16-byte aligned); `s0` = the caller's frame
//!   pointer;
//! * the argument registers hold the caller's arguments: `a0`–`a7` and `fa0`–`fa7`
//!   (all 64 bits), `t2` (the static chain of GCC's nested functions and LLVM's `nest`
//!   parameters); stack arguments are at `0(sp)` and up;
//! * `t1` holds the trampoline's address (the stub's scratch register).
//!
//! **Inside**: a 16-byte aligned [`SavedRegs`] below the entry `sp` holding the
//! registers above and two frame records in the layout of [`crate::unwind`] (a frame
//! pointer points just above its record `{previous frame pointer, return address}`):
//! the *callee* record `{caller's s0, caller's ra}`, which stands for the patched
//! function's own frame, and the trampoline's record `{just above the callee record,
//! S + 8}`; `s0` points just above the trampoline's record. A stack walk from inside
//! the decision therefore sees `S + 8` (the patched function), then the caller's return
//! address, then the caller's own records. `decide(S)` is called with `S = t0 - 8`
//! (psABI, `sp` 16-byte aligned).
//!
//! **On exit**, `a0`–`a7`, `fa0`–`fa7`, `t2`, `s0`, `sp` and `ra` hold their entry
//! values (`ra` the caller's return address), `t0` = `S + 8`, and:
//! * `decide` returned 0 (or no decision function is installed): `jr t0` to `S + 8`,
//!   which runs the original function body as if the site were two nops (`jr t0` pops
//!   the return-address stack the site's `jalr t0` pushed);
//! * `decide` returned an address `T`: `jr t1` to `T`, which runs with the caller's
//!   arguments, its stack arguments at `0(sp)` and its return address in `ra`:
//!   exactly a direct call (or tail call) of `T`.
//!
//! Clobbered, relative to what the caller passed: `t0` (dead at a function's entry,
//! set by the site) and `t1` (also the stub's and the PLT's scratch register).
//! Callee-saved registers are preserved (the decision is a psABI function); so is
//! `fcsr` (the decision does not change the rounding mode). Not preserved: the vector
//! registers (the decision is not built with V; a patched function must not take
//! vector arguments in registers).
//!
//! The decision function must not unwind, must be async-signal-safe if patched
//! functions are called from signal handlers, and must return 0 or the address of a
//! function with the patched function's signature.

use core::mem::{offset_of, size_of};
use core::sync::atomic::{AtomicUsize, Ordering};

/// A frame record as [`crate::unwind`] reads it: the word at `fp - 16` and `fp - 8`.
#[repr(C)]
#[derive(Debug, Default, Clone, Copy)]
pub struct FrameRecord {
    /// The caller's frame pointer.
    pub fp: u64,
    /// The return address of this frame.
    pub ra: u64,
}

/// The trampoline's frame: saved registers and its two frame records.
#[repr(C)]
#[derive(Debug, Default, Clone, Copy)]
pub struct SavedRegs {
    /// The integer argument registers `a0`–`a7`.
    pub a: [u64; 8],
    /// The floating-point argument registers `fa0`–`fa7` (as stored by `fsd`).
    pub fa: [u64; 8],
    /// The static chain (or a temporary).
    pub t2: u64,
    /// Keeps the records 16-byte aligned.
    pub pad: u64,
    /// The trampoline's record: `{&callee + 16, S + 8}` (`s0` points just above it).
    pub record: FrameRecord,
    /// The patched function's record: `{caller's s0, caller's return address}`.
    pub callee: FrameRecord,
}

const FRAME: usize = size_of::<SavedRegs>();
const A: usize = offset_of!(SavedRegs, a);
const FA: usize = offset_of!(SavedRegs, fa);
const T2: usize = offset_of!(SavedRegs, t2);
const RECORD: usize = offset_of!(SavedRegs, record);
const CALLEE: usize = offset_of!(SavedRegs, callee);
const FP: usize = offset_of!(FrameRecord, fp);
const RA: usize = offset_of!(FrameRecord, ra);
/// Bytes of a frame record: a frame pointer points this far above its record.
const RECORD_LEN: usize = size_of::<FrameRecord>();

// `sp` stays 16-byte aligned; every offset fits a 12-bit signed immediate.
const _: () = assert!(FRAME.is_multiple_of(16) && FRAME < 2048);
// `sd`/`fsd` want 8-byte aligned slots.
const _: () = assert!(A.is_multiple_of(8) && FA.is_multiple_of(8) && T2.is_multiple_of(8));
// The records lie where the unwinder looks for them (a frame pointer points just
// above its record; the walk needs 16-byte aligned frame pointers) and chain upwards.
const _: () = assert!(RECORD.is_multiple_of(16) && CALLEE == RECORD + RECORD_LEN);
const _: () = assert!(FP == 0 && RA == 8 && RECORD_LEN == crate::unwind::RECORD as usize);
const _: () = assert!(CALLEE + RECORD_LEN == FRAME);
const _: () = assert!(FRAME == 8 * 8 + 8 * 8 + 16 + 2 * 16);

/// Bytes from the site to the return point its `jalr t0` leaves: the decision gets
/// `t0 - CALL_RETURN`.
pub const CALL_RETURN: u64 = 8;
const _: () = assert!(CALL_RETURN as usize == crate::site::LEN);

/// The decision function: called with the site address, returns 0 (run the original)
/// or the address to continue at.
pub type Decision = extern "C" fn(site: u64) -> u64;

static DECISION: AtomicUsize = AtomicUsize::new(0);

/// Installs the decision function every trampoline call uses (process-wide).
pub fn set_decision(f: Decision) {
    DECISION.store(f as usize, Ordering::Release);
}

/// The address a redirected site's stub jumps to.
pub fn address() -> u64 {
    entry_trampoline as *const () as u64
}

/// The site's stub for this trampoline (see [`crate::patching::stub_bytes_to`]).
pub fn stub_bytes() -> [u8; crate::patching::STUB_LEN] {
    crate::patching::stub_bytes_to(address())
}

/// The trampoline itself. See the module documentation for its register contract.
///
/// # Safety
///
/// 1. Only to be reached through a site's stub, from the `auipc t0; jalr t0` written
///    at a patch site (the contract's entry state); never called from Rust.
#[unsafe(naked)]
pub unsafe extern "C" fn entry_trampoline() {
    core::arch::naked_asm!(
        // Module-level asm does not always inherit the target's features (an
        // optimised build assembles it without D); the trampoline needs `fsd`/`fld`.
        ".option push",
        ".option arch, +d",
        "addi sp, sp, -{frame}",
        "sd s0, ({callee} + {fp})(sp)",
        "sd ra, ({callee} + {ra})(sp)",
        "sd a0, ({a} + 0)(sp)",
        "sd a1, ({a} + 8)(sp)",
        "sd a2, ({a} + 16)(sp)",
        "sd a3, ({a} + 24)(sp)",
        "sd a4, ({a} + 32)(sp)",
        "sd a5, ({a} + 40)(sp)",
        "sd a6, ({a} + 48)(sp)",
        "sd a7, ({a} + 56)(sp)",
        "fsd fa0, ({fa} + 0)(sp)",
        "fsd fa1, ({fa} + 8)(sp)",
        "fsd fa2, ({fa} + 16)(sp)",
        "fsd fa3, ({fa} + 24)(sp)",
        "fsd fa4, ({fa} + 32)(sp)",
        "fsd fa5, ({fa} + 40)(sp)",
        "fsd fa6, ({fa} + 48)(sp)",
        "fsd fa7, ({fa} + 56)(sp)",
        "sd t2, {t2}(sp)",
        "addi t1, sp, ({callee} + {record_len})",
        "sd t1, ({record} + {fp})(sp)",
        "sd t0, ({record} + {ra})(sp)",
        "addi s0, sp, ({record} + {record_len})",
        "1:",
        "auipc t1, %pcrel_hi({decision})",
        "ld t1, %pcrel_lo(1b)(t1)",
        "beqz t1, 2f",
        "addi a0, t0, -{call_return}",
        "jalr ra, 0(t1)",
        "mv t1, a0",
        "2:",
        "ld a0, ({a} + 0)(sp)",
        "ld a1, ({a} + 8)(sp)",
        "ld a2, ({a} + 16)(sp)",
        "ld a3, ({a} + 24)(sp)",
        "ld a4, ({a} + 32)(sp)",
        "ld a5, ({a} + 40)(sp)",
        "ld a6, ({a} + 48)(sp)",
        "ld a7, ({a} + 56)(sp)",
        "fld fa0, ({fa} + 0)(sp)",
        "fld fa1, ({fa} + 8)(sp)",
        "fld fa2, ({fa} + 16)(sp)",
        "fld fa3, ({fa} + 24)(sp)",
        "fld fa4, ({fa} + 32)(sp)",
        "fld fa5, ({fa} + 40)(sp)",
        "fld fa6, ({fa} + 48)(sp)",
        "fld fa7, ({fa} + 56)(sp)",
        "ld t2, {t2}(sp)",
        "ld t0, ({record} + {ra})(sp)",
        "ld ra, ({callee} + {ra})(sp)",
        "ld s0, ({callee} + {fp})(sp)",
        "addi sp, sp, {frame}",
        "bnez t1, 3f",
        "jr t0",
        "3:",
        "jr t1",
        ".option pop",
        frame = const FRAME,
        a = const A,
        fa = const FA,
        t2 = const T2,
        record = const RECORD,
        callee = const CALLEE,
        fp = const FP,
        ra = const RA,
        record_len = const RECORD_LEN,
        call_return = const CALL_RETURN,
        decision = sym DECISION,
    )
}

#[cfg(test)]
mod tests;
