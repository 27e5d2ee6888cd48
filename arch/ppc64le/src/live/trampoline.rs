//! The entry trampoline: what a redirected ppc64le patch site calls.
//!
//! A patch site `S` (two words at the function's local entry, see [`crate::site`]) is
//! rewritten to `mflr r0; bl entry_trampoline`, the kernel's `-mprofile-kernel` call.
//! The trampoline asks the host's decision function (see [`set_decision`]) which
//! implementation the calling thread runs and continues there: at `S + 8` (the
//! original body), or at a replacement function `T` entered at its global entry, as if
//! the caller had called it.
//!
//! A site whose `bl` cannot reach the trampoline (±32 MiB: a shared object mapped far
//! from the executable) calls a *far stub* within its reach instead ([`stub_bytes`]),
//! which builds the trampoline's address in r12 and branches there through CTR; the
//! host decides where stubs go.
//!
//! # The word the decision returns
//!
//! * `0`: the original body.
//! * `T` (4-aligned): a function that uses the patched function's TOC (same object).
//!   The trampoline branches to `T`'s global entry with r12 = `T`; `T` returns straight
//!   to the caller. This is exactly a direct call of `T`.
//! * `T | 1` ([`OTHER_TOC`]): a function with another TOC (another object, or one that
//!   treats r2 as caller-saved). After `T` returns the caller would see `T`'s r2, and
//!   the caller of a local call has no `ld r2,24(r1)` after its `bl`. The trampoline
//!   therefore calls `T` from a *detour frame* that holds the caller's return address
//!   and r2, and puts both back when `T` returns.
//!
//! **Limit of the detour frame**: `T` runs with r1 one frame ([`DETOUR`] bytes) below
//! the caller's r1, so it does not find the caller's parameter save area where the ABI
//! puts it. Functions that take arguments on the stack (more than 8 doublewords of
//! integer arguments, more than 13 floating-point or 12 vector arguments, large
//! aggregates by value) or variable arguments cannot be redirected to another TOC;
//! the detour frame reserves a parameter save area of its own, so a callee that merely
//! spills its register arguments there is fine. The kernel avoids this limit with a
//! separate per-thread livepatch stack ([`crate::toc`]); a user-space version of it is
//! later work. Calls through a same-TOC target have no such limit.
//!
//! # Register contract
//!
//! **On entry** (just executed `mflr r0; bl entry_trampoline` at the site `S`, or
//! `mflr r0; bl stub` and the stub, which leaves r12 = CTR = the trampoline):
//! * LR = `S + 8`; r0 = the caller's return address (the LR at the function's entry);
//! * r1 = the caller's stack pointer (the patched function has not made a frame);
//! * r2 = the patched function's TOC (the site is past the global entry's TOC setup);
//! * the arguments: r3–r10, f1–f13, v2–v13, r11 (static chain); stack arguments in the
//!   caller's parameter save area at `r1 + 32`.
//!
//! **Inside**: r0 goes into the caller's LR save slot (`16(r1)`, as the patched
//! function's prologue would put it); a minimal 32-byte frame stands for the patched
//! function, its LR save slot holding `S + 8` and its TOC save slot r2; then the
//! trampoline's own frame holds a [`SavedRegs`]. A back-chain walk from inside the
//! decision thus sees trampoline → patched function (`S + 8`) → caller. The trampoline
//! computes its own TOC (`bcl 20,31` + `.TOC.`), loads the decision function and calls
//! it at its global entry (r12) with r3 = `S`.
//!
//! **On exit**, r3–r11, f1–f13, v2–v13 and r2 are restored to their entry values, r1 is
//! the caller's again, the patched function's frame slot no longer holds `S + 8`, and:
//! * decision 0 (or none installed): LR = r0 = the caller's return address, a `bctr` to
//!   `S + 8`: the original body runs as if the site were nops;
//! * decision `T`: LR = the caller's return address, r12 = `T`, a `bctr` to `T`;
//! * decision `T | 1`: a [`DETOUR`]-byte frame below the caller's r1 saves the caller's
//!   return address and r2; `bctrl` to `T` with r12 = `T`; on `T`'s return r2 and LR are
//!   put back, the frame is popped and `blr` returns to the caller with `T`'s return
//!   registers untouched.
//!
//! On every path r0 = the caller's return address. Clobbered: r12 (`S + 8` or `T`),
//! CTR, cr0 (all volatile, none an argument). Not preserved across the decision: the
//! second doublewords of vs1–vs13 (an `f` argument is only the first), FPSCR and XER
//! status bits.
//!
//! The decision function must not unwind, must be async-signal-safe if patched
//! functions are called from signal handlers, and must return 0 or one of the words
//! above for a function with the patched function's signature.

use core::mem::{offset_of, size_of};
use core::sync::atomic::{AtomicU32, AtomicUsize, Ordering};

use super::klp_ppc64le_sync_icache;

/// The registers the trampoline saves around the decision (above the 32-byte ELFv2
/// frame header of its own frame).
#[repr(C, align(16))]
#[derive(Debug, Default, Clone, Copy)]
pub struct SavedRegs {
    /// r3–r10: the integer arguments.
    pub gpr: [u64; 8],
    /// r11: the static chain.
    pub r11: u64,
    /// r2 at entry: the patched function's TOC.
    pub toc: u64,
    /// The decision's word (or `S + 8` for the original body).
    pub target: u64,
    /// Keeps `fpr` and `vr` in place (see the assertions).
    pub pad: u64,
    /// f1–f13: the floating-point arguments (their first doublewords).
    pub fpr: [u64; 13],
    /// Keeps `vr` 16-byte aligned.
    pub pad2: u64,
    /// v2–v13: the vector arguments, 16 bytes each.
    pub vr: [[u64; 2]; 12],
}

/// The ELFv2 frame header: back chain, CR save, LR save, TOC save.
pub const HEADER: usize = 32;
/// Offset of the LR save slot in a frame.
pub const LR_SAVE: usize = 16;
/// Offset of the TOC save slot in a frame.
pub const TOC_SAVE: usize = 24;
/// The trampoline's own frame: header, then [`SavedRegs`].
pub const FRAME: usize = HEADER + size_of::<SavedRegs>();
/// The minimal frame that stands for the patched function.
pub const FUNC_FRAME: usize = HEADER;
/// The detour frame of an other-TOC target: header, a parameter save area for the 8
/// register doublewords, the caller's return address and r2 (at its top).
pub const DETOUR: usize = HEADER + 64 + 16;
pub use crate::patching::OTHER_TOC;

const GPR: usize = HEADER + offset_of!(SavedRegs, gpr);
const R11: usize = HEADER + offset_of!(SavedRegs, r11);
const TOC: usize = HEADER + offset_of!(SavedRegs, toc);
const TARGET: usize = HEADER + offset_of!(SavedRegs, target);
const FPR: usize = HEADER + offset_of!(SavedRegs, fpr);
const VR: usize = HEADER + offset_of!(SavedRegs, vr);
/// From the trampoline's r1: the patched function's LR save slot (`S + 8`).
const FUNC_LR: usize = FRAME + LR_SAVE;
/// From the trampoline's r1: the caller's LR save slot (its return address).
const CALLER_LR: usize = FRAME + FUNC_FRAME + LR_SAVE;

// Every frame keeps r1 16-byte aligned.
const _: () = assert!(FRAME.is_multiple_of(16) && FUNC_FRAME.is_multiple_of(16));
const _: () = assert!(DETOUR.is_multiple_of(16));
// `stvx`/`lvx` need 16-byte aligned slots.
const _: () = assert!(VR.is_multiple_of(16));
// `ld`/`std` are DS-form: displacements multiple of 4, within 16 signed bits.
const _: () = assert!(GPR.is_multiple_of(8) && FPR.is_multiple_of(8) && TARGET.is_multiple_of(8));
const _: () = assert!(CALLER_LR + 8 < 0x8000);
const _: () = assert!(size_of::<SavedRegs>() == 8 * 8 + 4 * 8 + 13 * 8 + 8 + 12 * 16);
const _: () = assert!(GPR == 32 && R11 == 96 && TOC == 104 && TARGET == 112);
const _: () = assert!(FPR == 128 && VR == 240 && FRAME == 432);

/// Length of the site (`mflr r0; bl`): the decision gets `return address - 8`.
pub const CALL_LEN: u64 = 8;
const _: () = assert!(CALL_LEN as usize == crate::site::LEN);

/// The decision function: called with the site address, returns 0 (run the original)
/// or the word described in the module documentation.
pub type Decision = extern "C" fn(site: u64) -> u64;

static DECISION: AtomicUsize = AtomicUsize::new(0);

/// Installs the decision function every trampoline call uses (process-wide). The
/// trampoline reads it with a plain load: it is code of the program, never freed.
pub fn set_decision(f: Decision) {
    DECISION.store(f as usize, Ordering::Release);
}

/// The address a redirected site calls.
pub fn address() -> u64 {
    entry_trampoline as *const () as u64
}

pub use crate::patching::{STUB_LEN, stub_bytes_to};

/// The far stub of [`entry_trampoline`] (see [`stub_bytes_to`]).
pub fn stub_bytes() -> [u8; STUB_LEN] {
    stub_bytes_to(address())
}

/// The trampoline itself. See the module documentation for its register contract.
///
/// # Safety
///
/// Only to be reached by the `mflr r0; bl` written at a patch site, directly or
/// through a far stub of [`stub_bytes`] (the contract's entry state); never called
/// from Rust.
#[unsafe(naked)]
pub unsafe extern "C" fn entry_trampoline() {
    core::arch::naked_asm!(
        // The frames: the caller's LR slot, the patched function's, ours.
        "std 0, {lr_save}(1)",
        "stdu 1, -{func_frame}(1)",
        "mflr 0",
        "std 0, {lr_save}(1)",
        "std 2, {toc_save}(1)",
        "stdu 1, -{frame}(1)",
        "std 3, {gpr}+0(1)",
        "std 4, {gpr}+8(1)",
        "std 5, {gpr}+16(1)",
        "std 6, {gpr}+24(1)",
        "std 7, {gpr}+32(1)",
        "std 8, {gpr}+40(1)",
        "std 9, {gpr}+48(1)",
        "std 10, {gpr}+56(1)",
        "std 11, {r11}(1)",
        "std 2, {toc}(1)",
        "stfd 1, {fpr}+0(1)",
        "stfd 2, {fpr}+8(1)",
        "stfd 3, {fpr}+16(1)",
        "stfd 4, {fpr}+24(1)",
        "stfd 5, {fpr}+32(1)",
        "stfd 6, {fpr}+40(1)",
        "stfd 7, {fpr}+48(1)",
        "stfd 8, {fpr}+56(1)",
        "stfd 9, {fpr}+64(1)",
        "stfd 10, {fpr}+72(1)",
        "stfd 11, {fpr}+80(1)",
        "stfd 12, {fpr}+88(1)",
        "stfd 13, {fpr}+96(1)",
        "li 12, {vr}+0",
        "stvx 2, 1, 12",
        "li 12, {vr}+16",
        "stvx 3, 1, 12",
        "li 12, {vr}+32",
        "stvx 4, 1, 12",
        "li 12, {vr}+48",
        "stvx 5, 1, 12",
        "li 12, {vr}+64",
        "stvx 6, 1, 12",
        "li 12, {vr}+80",
        "stvx 7, 1, 12",
        "li 12, {vr}+96",
        "stvx 8, 1, 12",
        "li 12, {vr}+112",
        "stvx 9, 1, 12",
        "li 12, {vr}+128",
        "stvx 10, 1, 12",
        "li 12, {vr}+144",
        "stvx 11, 1, 12",
        "li 12, {vr}+160",
        "stvx 12, 1, 12",
        "li 12, {vr}+176",
        "stvx 13, 1, 12",
        // Our own TOC, then decision(S).
        "bcl 20, 31, 1f",
        "1:",
        "mflr 12",
        "addis 2, 12, (.TOC.-1b)@ha",
        "addi 2, 2, (.TOC.-1b)@l",
        "addis 12, 2, {decision}@toc@ha",
        "ld 12, {decision}@toc@l(12)",
        "li 3, 0",
        "cmpdi 12, 0",
        "beq 2f",
        "ld 3, {func_lr}(1)",
        "addi 3, 3, -{call_len}",
        "mtctr 12",
        "bctrl",
        "2:",
        // 0: continue at S + 8. cr0 says whether the word carries the other-TOC tag.
        "cmpdi 3, 0",
        "bne 3f",
        "ld 3, {func_lr}(1)",
        "3:",
        "std 3, {target}(1)",
        "andi. 0, 3, {other_toc}",
        "ld 3, {gpr}+0(1)",
        "ld 4, {gpr}+8(1)",
        "ld 5, {gpr}+16(1)",
        "ld 6, {gpr}+24(1)",
        "ld 7, {gpr}+32(1)",
        "ld 8, {gpr}+40(1)",
        "ld 9, {gpr}+48(1)",
        "ld 10, {gpr}+56(1)",
        "ld 11, {r11}(1)",
        "lfd 1, {fpr}+0(1)",
        "lfd 2, {fpr}+8(1)",
        "lfd 3, {fpr}+16(1)",
        "lfd 4, {fpr}+24(1)",
        "lfd 5, {fpr}+32(1)",
        "lfd 6, {fpr}+40(1)",
        "lfd 7, {fpr}+48(1)",
        "lfd 8, {fpr}+56(1)",
        "lfd 9, {fpr}+64(1)",
        "lfd 10, {fpr}+72(1)",
        "lfd 11, {fpr}+80(1)",
        "lfd 12, {fpr}+88(1)",
        "lfd 13, {fpr}+96(1)",
        "li 12, {vr}+0",
        "lvx 2, 1, 12",
        "li 12, {vr}+16",
        "lvx 3, 1, 12",
        "li 12, {vr}+32",
        "lvx 4, 1, 12",
        "li 12, {vr}+48",
        "lvx 5, 1, 12",
        "li 12, {vr}+64",
        "lvx 6, 1, 12",
        "li 12, {vr}+80",
        "lvx 7, 1, 12",
        "li 12, {vr}+96",
        "lvx 8, 1, 12",
        "li 12, {vr}+112",
        "lvx 9, 1, 12",
        "li 12, {vr}+128",
        "lvx 10, 1, 12",
        "li 12, {vr}+144",
        "lvx 11, 1, 12",
        "li 12, {vr}+160",
        "lvx 12, 1, 12",
        "li 12, {vr}+176",
        "lvx 13, 1, 12",
        "ld 2, {toc}(1)",
        "ld 12, {target}(1)",
        // The caller's return address; it also replaces S + 8 in the patched
        // function's slot, which is dead from here on.
        "ld 0, {caller_lr}(1)",
        "std 0, {func_lr}(1)",
        "addi 1, 1, {frame}+{func_frame}",
        "mtlr 0",
        "bne 4f",
        "mtctr 12",
        "bctr",
        // Another TOC: call T from a detour frame, then restore r2 and LR.
        "4:",
        "clrrdi 12, 12, 1",
        "stdu 1, -{detour}(1)",
        "std 0, {detour}-16(1)",
        "std 2, {detour}-8(1)",
        "mtctr 12",
        "bctrl",
        "ld 2, {detour}-8(1)",
        "ld 0, {detour}-16(1)",
        "mtlr 0",
        "addi 1, 1, {detour}",
        "blr",
        lr_save = const LR_SAVE,
        toc_save = const TOC_SAVE,
        func_frame = const FUNC_FRAME,
        frame = const FRAME,
        gpr = const GPR,
        r11 = const R11,
        toc = const TOC,
        target = const TARGET,
        fpr = const FPR,
        vr = const VR,
        func_lr = const FUNC_LR,
        caller_lr = const CALLER_LR,
        call_len = const CALL_LEN,
        other_toc = const OTHER_TOC,
        detour = const DETOUR,
        decision = sym DECISION,
    )
}

/// Writes one instruction word at `dst` with an aligned 4-byte atomic store, so a
/// thread fetching it sees the old or the new instruction, never a mix; then the
/// cache sequence of [`crate::live`] (`dcbst; sync; icbi; sync; isync`) over the word.
/// Returns `false` (and writes nothing) when `dst` is not 4-byte aligned.
///
/// # Safety
///
/// 1. The word at `dst` is mapped and writable.
/// 2. Both the old and the new instruction are safe to execute for any thread that
///    reaches them (the caller's write protocol), and text writes are serialised by
///    the caller.
pub unsafe fn write_word(dst: *mut u8, insn: u32) -> bool {
    if !(dst as usize).is_multiple_of(4) {
        return false;
    }
    // SAFETY: `dst` is 4-aligned, mapped and writable (1); the only other accesses are
    // instruction fetches and this writer's own (2), so viewing the word as an atomic
    // for the duration of this call is sound.
    let word = unsafe { &*(dst as *const AtomicU32) };
    word.store(insn.to_le(), Ordering::SeqCst);
    klp_ppc64le_sync_icache(dst as usize, 4);
    true
}

#[cfg(test)]
mod tests {
    //! The trampoline run through hand-made sites: naked functions whose local entry is
    //! already `mflr r0; bl entry_trampoline`. A naked harness loads every argument
    //! register from an [`Io`] block and calls the site; naked recorders (the original
    //! body and the targets) store what they received.

    extern crate std;

    use super::*;
    use core::cell::UnsafeCell;
    use std::sync::Mutex;

    /// Argument registers in, what a recorder saw, and what came back.
    #[repr(C, align(16))]
    #[derive(Clone, Copy, Debug, Default, PartialEq)]
    struct Io {
        /// r3–r11.
        gpr: [u64; 9],
        /// r0, LR, r1, r2, r12 (what a recorder saw at its entry).
        r0: u64,
        lr: u64,
        r1: u64,
        r2: u64,
        r12: u64,
        /// The harness: its r1 at the call, r2 after the call, r3 returned.
        sp_at_call: u64,
        r2_after: u64,
        ret: u64,
        /// f1–f13.
        fpr: [u64; 13],
        /// v2–v13.
        vr: [[u64; 2]; 12],
    }

    const IO_GPR: usize = offset_of!(Io, gpr);
    const IO_R0: usize = offset_of!(Io, r0);
    const IO_LR: usize = offset_of!(Io, lr);
    const IO_R1: usize = offset_of!(Io, r1);
    const IO_R2: usize = offset_of!(Io, r2);
    const IO_R12: usize = offset_of!(Io, r12);
    const IO_SP: usize = offset_of!(Io, sp_at_call);
    const IO_R2_AFTER: usize = offset_of!(Io, r2_after);
    const IO_RET: usize = offset_of!(Io, ret);
    const IO_FPR: usize = offset_of!(Io, fpr);
    const IO_VR: usize = offset_of!(Io, vr);
    const _: () = assert!(IO_VR.is_multiple_of(16));

    struct Rec(UnsafeCell<Io>);
    // SAFETY: written only by the recorders while `SERIAL` is held by the test that
    // called them, read by that test afterwards.
    unsafe impl Sync for Rec {}
    impl Rec {
        const fn new() -> Rec {
            Rec(UnsafeCell::new(Io {
                gpr: [0; 9],
                r0: 0,
                lr: 0,
                r1: 0,
                r2: 0,
                r12: 0,
                sp_at_call: 0,
                r2_after: 0,
                ret: 0,
                fpr: [0; 13],
                vr: [[0; 2]; 12],
            }))
        }
        fn take(&self) -> Io {
            // SAFETY: no recorder runs now (the test that called it holds `SERIAL`).
            unsafe { core::ptr::replace(self.0.get(), Io::default()) }
        }
    }

    static REC_BODY: Rec = Rec::new();
    static REC_SAME: Rec = Rec::new();
    static REC_OTHER: Rec = Rec::new();

    /// Serialises the tests of this module: the decision is process-wide.
    static SERIAL: Mutex<()> = Mutex::new(());
    /// What the test decision returns.
    static ANSWER: AtomicUsize = AtomicUsize::new(0);
    /// What it saw: the site, and words of the frames above it.
    static SEEN_SITE: AtomicUsize = AtomicUsize::new(0);
    static TRAMP_SP: AtomicUsize = AtomicUsize::new(0);
    static SEEN_FRAMES: Mutex<[u64; 5]> = Mutex::new([0; 5]);

    /// The decision's second half: records, reads the frames, answers.
    extern "C" fn test_decide(site: u64) -> u64 {
        SEEN_SITE.store(site as usize, Ordering::SeqCst);
        let sp = TRAMP_SP.load(Ordering::SeqCst) as u64;
        let word = |a: u64| {
            // SAFETY: `a` lies in the frames of the trampoline, the patched function
            // and the harness, all live above this call on this thread's stack.
            unsafe { core::ptr::read_volatile(a as *const u64) }
        };
        let func = word(sp);
        let caller = word(func);
        *SEEN_FRAMES.lock().unwrap_or_else(|e| e.into_inner()) = [
            func - sp,
            word(func + LR_SAVE as u64),
            word(func + TOC_SAVE as u64),
            caller,
            word(caller + LR_SAVE as u64),
        ];
        ANSWER.load(Ordering::SeqCst) as u64
    }

    /// The decision as the trampoline calls it (global entry, r12): records r1 (the
    /// trampoline's frame), fills every volatile register with ones, then tail-calls
    /// `test_decide` with r3 = the site.
    #[unsafe(naked)]
    #[unsafe(no_mangle)]
    extern "C" fn klp_ppc64le_t_decide(_site: u64) -> u64 {
        core::arch::naked_asm!(
            "0:",
            "addis 2, 12, (.TOC.-0b)@ha",
            "addi 2, 2, (.TOC.-0b)@l",
            ".localentry klp_ppc64le_t_decide, .-0b",
            "addis 12, 2, {sp}@toc@ha",
            "addi 12, 12, {sp}@toc@l",
            "std 1, 0(12)",
            "li 0, -1",
            "li 4, -1",
            "li 5, -1",
            "li 6, -1",
            "li 7, -1",
            "li 8, -1",
            "li 9, -1",
            "li 10, -1",
            "li 11, -1",
            "li 12, -1",
            "std 0, -8(1)",
            "lfd 0, -8(1)",
            "fmr 1, 0",
            "fmr 2, 0",
            "fmr 3, 0",
            "fmr 4, 0",
            "fmr 5, 0",
            "fmr 6, 0",
            "fmr 7, 0",
            "fmr 8, 0",
            "fmr 9, 0",
            "fmr 10, 0",
            "fmr 11, 0",
            "fmr 12, 0",
            "fmr 13, 0",
            "vspltisw 0, -1",
            "vspltisw 1, -1",
            "vspltisw 2, -1",
            "vspltisw 3, -1",
            "vspltisw 4, -1",
            "vspltisw 5, -1",
            "vspltisw 6, -1",
            "vspltisw 7, -1",
            "vspltisw 8, -1",
            "vspltisw 9, -1",
            "vspltisw 10, -1",
            "vspltisw 11, -1",
            "vspltisw 12, -1",
            "vspltisw 13, -1",
            "b {decide}",
            sp = sym TRAMP_SP,
            decide = sym test_decide,
        )
    }

    /// `harness(f, io)`: loads r3–r11, f1–f13, v2–v13 from `io`, calls `f` with
    /// r12 = `f` (a global-entry call), stores r1 at the call, r2 after it and r3.
    #[unsafe(naked)]
    extern "C" fn harness(_f: u64, _io: *mut Io) -> u64 {
        core::arch::naked_asm!(
            "mflr 0",
            "std 0, 16(1)",
            "stdu 1, -48(1)",
            "std 2, 24(1)",
            "std 4, 32(1)",
            "mtctr 3",
            "mr 12, 4",
            "std 1, {sp}(12)",
            "li 0, {vr}+0",
            "lvx 2, 12, 0",
            "li 0, {vr}+16",
            "lvx 3, 12, 0",
            "li 0, {vr}+32",
            "lvx 4, 12, 0",
            "li 0, {vr}+48",
            "lvx 5, 12, 0",
            "li 0, {vr}+64",
            "lvx 6, 12, 0",
            "li 0, {vr}+80",
            "lvx 7, 12, 0",
            "li 0, {vr}+96",
            "lvx 8, 12, 0",
            "li 0, {vr}+112",
            "lvx 9, 12, 0",
            "li 0, {vr}+128",
            "lvx 10, 12, 0",
            "li 0, {vr}+144",
            "lvx 11, 12, 0",
            "li 0, {vr}+160",
            "lvx 12, 12, 0",
            "li 0, {vr}+176",
            "lvx 13, 12, 0",
            "lfd 1, {fpr}+0(12)",
            "lfd 2, {fpr}+8(12)",
            "lfd 3, {fpr}+16(12)",
            "lfd 4, {fpr}+24(12)",
            "lfd 5, {fpr}+32(12)",
            "lfd 6, {fpr}+40(12)",
            "lfd 7, {fpr}+48(12)",
            "lfd 8, {fpr}+56(12)",
            "lfd 9, {fpr}+64(12)",
            "lfd 10, {fpr}+72(12)",
            "lfd 11, {fpr}+80(12)",
            "lfd 12, {fpr}+88(12)",
            "lfd 13, {fpr}+96(12)",
            "ld 3, {gpr}+0(12)",
            "ld 4, {gpr}+8(12)",
            "ld 5, {gpr}+16(12)",
            "ld 6, {gpr}+24(12)",
            "ld 7, {gpr}+32(12)",
            "ld 8, {gpr}+40(12)",
            "ld 9, {gpr}+48(12)",
            "ld 10, {gpr}+56(12)",
            "ld 11, {gpr}+64(12)",
            "mfctr 12",
            "li 0, 0",
            "bctrl",
            "ld 12, 32(1)",
            "std 2, {r2_after}(12)",
            "std 3, {ret}(12)",
            "ld 2, 24(1)",
            "addi 1, 1, 48",
            "ld 0, 16(1)",
            "mtlr 0",
            "blr",
            sp = const IO_SP,
            vr = const IO_VR,
            fpr = const IO_FPR,
            gpr = const IO_GPR,
            r2_after = const IO_R2_AFTER,
            ret = const IO_RET,
        )
    }

    /// A recorder's body: r12 was saved at `-8(r1)` and now points to its `Io`; stores
    /// what it received and returns r3 + r10 + r11.
    macro_rules! record {
        () => {
            concat!(
                "std 0, {r0}(12)\n",
                "mflr 0\n",
                "std 0, {lr}(12)\n",
                "std 1, {r1}(12)\n",
                "std 2, {r2}(12)\n",
                "ld 0, -8(1)\n",
                "std 0, {r12}(12)\n",
                "std 3, {gpr}+0(12)\n",
                "std 4, {gpr}+8(12)\n",
                "std 5, {gpr}+16(12)\n",
                "std 6, {gpr}+24(12)\n",
                "std 7, {gpr}+32(12)\n",
                "std 8, {gpr}+40(12)\n",
                "std 9, {gpr}+48(12)\n",
                "std 10, {gpr}+56(12)\n",
                "std 11, {gpr}+64(12)\n",
                "stfd 1, {fpr}+0(12)\n",
                "stfd 2, {fpr}+8(12)\n",
                "stfd 3, {fpr}+16(12)\n",
                "stfd 4, {fpr}+24(12)\n",
                "stfd 5, {fpr}+32(12)\n",
                "stfd 6, {fpr}+40(12)\n",
                "stfd 7, {fpr}+48(12)\n",
                "stfd 8, {fpr}+56(12)\n",
                "stfd 9, {fpr}+64(12)\n",
                "stfd 10, {fpr}+72(12)\n",
                "stfd 11, {fpr}+80(12)\n",
                "stfd 12, {fpr}+88(12)\n",
                "stfd 13, {fpr}+96(12)\n",
                "li 0, {vr}+0\n",
                "stvx 2, 12, 0\n",
                "li 0, {vr}+16\n",
                "stvx 3, 12, 0\n",
                "li 0, {vr}+32\n",
                "stvx 4, 12, 0\n",
                "li 0, {vr}+48\n",
                "stvx 5, 12, 0\n",
                "li 0, {vr}+64\n",
                "stvx 6, 12, 0\n",
                "li 0, {vr}+80\n",
                "stvx 7, 12, 0\n",
                "li 0, {vr}+96\n",
                "stvx 8, 12, 0\n",
                "li 0, {vr}+112\n",
                "stvx 9, 12, 0\n",
                "li 0, {vr}+128\n",
                "stvx 10, 12, 0\n",
                "li 0, {vr}+144\n",
                "stvx 11, 12, 0\n",
                "li 0, {vr}+160\n",
                "stvx 12, 12, 0\n",
                "li 0, {vr}+176\n",
                "stvx 13, 12, 0\n",
                "add 3, 3, 10\n",
                "add 3, 3, 11\n",
            )
        };
    }

    /// The original body of the test site (reached by `b` at its local entry).
    #[unsafe(naked)]
    #[unsafe(no_mangle)]
    extern "C" fn klp_ppc64le_t_body() -> u64 {
        core::arch::naked_asm!(
            "0:",
            "addis 2, 12, (.TOC.-0b)@ha",
            "addi 2, 2, (.TOC.-0b)@l",
            ".localentry klp_ppc64le_t_body, .-0b",
            "std 12, -8(1)",
            "addis 12, 2, {rec}@toc@ha",
            "addi 12, 12, {rec}@toc@l",
            record!(),
            "blr",
            rec = sym REC_BODY,
            r0 = const IO_R0, lr = const IO_LR, r1 = const IO_R1, r2 = const IO_R2,
            r12 = const IO_R12, gpr = const IO_GPR, fpr = const IO_FPR, vr = const IO_VR,
        )
    }

    /// A same-TOC target: records at its global entry (r12 as received).
    #[unsafe(naked)]
    #[unsafe(no_mangle)]
    extern "C" fn klp_ppc64le_t_same() -> u64 {
        core::arch::naked_asm!(
            "0:",
            "addis 2, 12, (.TOC.-0b)@ha",
            "addi 2, 2, (.TOC.-0b)@l",
            ".localentry klp_ppc64le_t_same, .-0b",
            "std 12, -8(1)",
            "addis 12, 2, {rec}@toc@ha",
            "addi 12, 12, {rec}@toc@l",
            record!(),
            "blr",
            rec = sym REC_SAME,
            r0 = const IO_R0, lr = const IO_LR, r1 = const IO_R1, r2 = const IO_R2,
            r12 = const IO_R12, gpr = const IO_GPR, fpr = const IO_FPR, vr = const IO_VR,
        )
    }

    /// An other-TOC target: records, then returns with r2 clobbered, as a function of
    /// another object would leave it.
    #[unsafe(naked)]
    #[unsafe(no_mangle)]
    extern "C" fn klp_ppc64le_t_other() -> u64 {
        core::arch::naked_asm!(
            "0:",
            "addis 2, 12, (.TOC.-0b)@ha",
            "addi 2, 2, (.TOC.-0b)@l",
            ".localentry klp_ppc64le_t_other, .-0b",
            "std 12, -8(1)",
            "addis 12, 2, {rec}@toc@ha",
            "addi 12, 12, {rec}@toc@l",
            record!(),
            "li 2, 0x7e57",
            "blr",
            rec = sym REC_OTHER,
            r0 = const IO_R0, lr = const IO_LR, r1 = const IO_R1, r2 = const IO_R2,
            r12 = const IO_R12, gpr = const IO_GPR, fpr = const IO_FPR, vr = const IO_VR,
        )
    }

    /// A hand-made patched function: the wrapper shape of `klp-user`'s `patchable!`
    /// with its site already in the trampoline state.
    #[unsafe(naked)]
    #[unsafe(no_mangle)]
    extern "C" fn klp_ppc64le_t_site() -> u64 {
        core::arch::naked_asm!(
            "0:",
            "addis 2, 12, (.TOC.-0b)@ha",
            "addi 2, 2, (.TOC.-0b)@l",
            ".localentry klp_ppc64le_t_site, .-0b",
            "mflr 0",
            "bl {tramp}",
            "b {body}",
            tramp = sym entry_trampoline,
            body = sym klp_ppc64le_t_body,
        )
    }

    fn addr(f: *const ()) -> u64 {
        f as u64
    }

    fn toc() -> u64 {
        let r2: u64;
        // SAFETY: copies r2; no memory, no other register.
        unsafe { core::arch::asm!("mr {0}, 2", out(reg) r2, options(nomem, nostack)) };
        r2
    }

    fn input() -> Io {
        let mut io = Io::default();
        for (i, g) in io.gpr.iter_mut().enumerate() {
            *g = 0x1111_0000_0000_0000 * (i as u64 + 1) + i as u64;
        }
        for (i, f) in io.fpr.iter_mut().enumerate() {
            *f = (1.5 + i as f64 * 2.25).to_bits();
        }
        for (i, v) in io.vr.iter_mut().enumerate() {
            *v = [0xa000 + i as u64, 0xb000_0000_0000_0000 | i as u64];
        }
        io
    }

    /// Calls the test site through the harness with `answer` as the decision.
    fn run(answer: u64) -> Io {
        set_decision(klp_ppc64le_t_decide);
        ANSWER.store(answer as usize, Ordering::SeqCst);
        SEEN_SITE.store(0, Ordering::SeqCst);
        let mut io = input();
        harness(addr(klp_ppc64le_t_site as *const ()), &mut io);
        io
    }

    /// Checks what a recorder received against what the harness passed.
    fn check_args(seen: &Io, io: &Io) {
        let want = input();
        assert_eq!(seen.gpr, want.gpr, "r3-r11");
        assert_eq!(seen.fpr, want.fpr, "f1-f13");
        assert_eq!(seen.vr, want.vr, "v2-v13");
        assert_eq!(seen.r1, io.sp_at_call, "r1 as at the call");
        let g = &want.gpr;
        assert_eq!(
            io.ret,
            g[0].wrapping_add(g[7]).wrapping_add(g[8]),
            "r3 back"
        );
    }

    /// The frames the decision saw: the patched function's minimal frame right above
    /// the trampoline's, its LR slot at S + 8 and TOC slot at r2, its back chain the
    /// caller's r1, and the caller's LR slot its return address.
    fn check_frames(site: u64, io: &Io, ret_addr: u64) {
        let f = *SEEN_FRAMES.lock().unwrap_or_else(|e| e.into_inner());
        assert_eq!(f, [FRAME as u64, site + 8, toc(), io.sp_at_call, ret_addr]);
    }

    fn in_harness(a: u64) -> bool {
        let h = addr(harness as *const ());
        a > h && a < h + 0x400
    }

    #[test]
    fn frame_layout() {
        assert_eq!(
            (GPR, R11, TOC, TARGET, FPR, VR),
            (32, 96, 104, 112, 128, 240)
        );
        assert_eq!((FRAME, FUNC_LR, CALLER_LR, DETOUR), (432, 448, 480, 112));
    }

    #[test]
    fn decision_zero_runs_the_original_body() {
        let _s = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
        let io = run(0);
        let site = addr(klp_ppc64le_t_site as *const ()) + 8;
        assert_eq!(SEEN_SITE.load(Ordering::SeqCst) as u64, site);
        let seen = REC_BODY.take();
        check_args(&seen, &io);
        assert!(
            in_harness(seen.lr),
            "LR = the caller's return: {:#x}",
            seen.lr
        );
        assert_eq!(seen.r0, seen.lr, "r0 = LR, as after the site's mflr");
        assert_eq!(seen.r2, toc(), "r2 of the patched function");
        assert_eq!(seen.r12, site + 8, "continued at S + 8");
        assert_eq!(io.r2_after, toc());
        check_frames(site, &io, seen.lr);
        assert_eq!(REC_SAME.take(), Io::default(), "no target ran");
    }

    #[test]
    fn decision_same_toc_enters_the_target_like_a_direct_call() {
        let _s = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
        let t = addr(klp_ppc64le_t_same as *const ());
        let io = run(t);
        let site = addr(klp_ppc64le_t_site as *const ()) + 8;
        let seen = REC_SAME.take();
        check_args(&seen, &io);
        assert!(in_harness(seen.lr), "returns to the caller: {:#x}", seen.lr);
        assert_eq!(seen.r12, t, "global entry with r12 = T");
        assert_eq!(seen.r2, toc());
        assert_eq!(io.r2_after, toc());
        check_frames(site, &io, seen.lr);
        assert_eq!(REC_BODY.take(), Io::default(), "the original did not run");
    }

    #[test]
    fn decision_other_toc_keeps_the_callers_r2_and_return() {
        let _s = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
        let t = addr(klp_ppc64le_t_other as *const ());
        let mut io = run(t | OTHER_TOC);
        let seen = REC_OTHER.take();
        // T runs one detour frame below the caller's r1.
        io.sp_at_call -= DETOUR as u64;
        check_args(&seen, &io);
        io.sp_at_call += DETOUR as u64;
        assert_eq!(seen.r12, t, "untagged global entry");
        let tr = address();
        assert!(
            seen.lr > tr && seen.lr < tr + 0x800,
            "returns into the detour"
        );
        assert_eq!(io.r2_after, toc(), "the caller's r2 survives T's");
        assert_eq!(REC_BODY.take(), Io::default());
    }

    /// The same site called from Rust with every integer and floating-point argument
    /// register in use.
    #[unsafe(naked)]
    #[unsafe(no_mangle)]
    extern "C" fn klp_ppc64le_t_many() -> f64 {
        core::arch::naked_asm!(
            "0:",
            "addis 2, 12, (.TOC.-0b)@ha",
            "addi 2, 2, (.TOC.-0b)@l",
            ".localentry klp_ppc64le_t_many, .-0b",
            "mflr 0",
            "bl {tramp}",
            "b {body}",
            tramp = sym entry_trampoline,
            body = sym many_body,
        )
    }

    type Many = extern "C" fn(
        u64,
        u64,
        u64,
        u64,
        u64,
        u64,
        u64,
        u64,
        f64,
        f64,
        f64,
        f64,
        f64,
        f64,
        f64,
        f64,
        f64,
        f64,
        f64,
        f64,
        f64,
    ) -> f64;

    fn weigh(i: [u64; 8], x: [f64; 13]) -> f64 {
        let a: f64 = i
            .iter()
            .enumerate()
            .map(|(k, v)| (*v * (k as u64 + 1)) as f64)
            .sum();
        let b: f64 = x
            .iter()
            .enumerate()
            .map(|(k, v)| v * (k as f64 + 10.0))
            .sum();
        a + b
    }

    #[allow(clippy::too_many_arguments)]
    extern "C" fn many_body(
        a: u64,
        b: u64,
        c: u64,
        d: u64,
        e: u64,
        f: u64,
        g: u64,
        h: u64,
        x0: f64,
        x1: f64,
        x2: f64,
        x3: f64,
        x4: f64,
        x5: f64,
        x6: f64,
        x7: f64,
        x8: f64,
        x9: f64,
        x10: f64,
        x11: f64,
        x12: f64,
    ) -> f64 {
        weigh(
            [a, b, c, d, e, f, g, h],
            [x0, x1, x2, x3, x4, x5, x6, x7, x8, x9, x10, x11, x12],
        )
    }

    #[allow(clippy::too_many_arguments)]
    extern "C" fn many_target(
        a: u64,
        b: u64,
        c: u64,
        d: u64,
        e: u64,
        f: u64,
        g: u64,
        h: u64,
        x0: f64,
        x1: f64,
        x2: f64,
        x3: f64,
        x4: f64,
        x5: f64,
        x6: f64,
        x7: f64,
        x8: f64,
        x9: f64,
        x10: f64,
        x11: f64,
        x12: f64,
    ) -> f64 {
        -many_body(
            a, b, c, d, e, f, g, h, x0, x1, x2, x3, x4, x5, x6, x7, x8, x9, x10, x11, x12,
        )
    }

    #[test]
    fn many_arguments_from_rust_in_both_outcomes() {
        let _s = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
        set_decision(klp_ppc64le_t_decide);
        // SAFETY: the site continues in `many_body` (or a target) with this signature.
        let f: Many = unsafe { core::mem::transmute(klp_ppc64le_t_many as *const ()) };
        let f = core::hint::black_box(f);
        let x: [f64; 13] = core::array::from_fn(|k| 0.5 + k as f64);
        let call = || {
            f(
                1, 2, 3, 4, 5, 6, 7, 8, x[0], x[1], x[2], x[3], x[4], x[5], x[6], x[7], x[8], x[9],
                x[10], x[11], x[12],
            )
        };
        let want = weigh([1, 2, 3, 4, 5, 6, 7, 8], x);
        for (answer, sign) in [
            (0, 1.0),
            (addr(many_target as *const ()), -1.0),
            (addr(many_target as *const ()) | OTHER_TOC, -1.0),
        ] {
            ANSWER.store(answer as usize, Ordering::SeqCst);
            assert_eq!(call(), sign * want, "answer {answer:#x}");
        }
    }

    #[test]
    fn stub_layout() {
        let b = stub_bytes_to(0x1122_3344_5566_7788);
        let w: std::vec::Vec<u32> = b
            .chunks_exact(4)
            .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect();
        // As binutils assembles the sequence of the documentation.
        assert_eq!(
            w,
            [
                0x3d80_1122,
                0x618c_3344,
                0x798c_07c6,
                0x658c_5566,
                0x618c_7788,
                0x7d89_03a6,
                0x4e80_0420,
                0x7fe0_0008
            ]
        );
        let a = address();
        let s = stub_bytes();
        let imm = |i: usize| u64::from(u16::from_le_bytes([s[4 * i], s[4 * i + 1]]));
        assert_eq!(imm(0) << 48 | imm(1) << 32 | imm(3) << 16 | imm(4), a);
    }

    extern "C" fn stub_target(x: u64) -> u64 {
        x * 3 + 1
    }

    unsafe extern "C" {
        fn mmap(a: *mut u8, len: usize, prot: i32, flags: i32, fd: i32, off: i64) -> *mut u8;
        fn mprotect(a: *mut u8, len: usize, prot: i32) -> i32;
        fn munmap(a: *mut u8, len: usize) -> i32;
    }

    /// A stub written to a fresh page and called like a function reaches its target
    /// (at its global entry: r12 = the target) and returns to the caller (LR kept).
    #[test]
    fn a_stub_runs() {
        const RW: i32 = 3;
        const RX: i32 = 5;
        const PRIVATE_ANON: i32 = 0x22;
        const LEN: usize = 1 << 16;
        // SAFETY: an anonymous private mapping has no preconditions.
        let p = unsafe { mmap(core::ptr::null_mut(), LEN, RW, PRIVATE_ANON, -1, 0) };
        assert!(!p.is_null() && p as isize != -1);
        let b = stub_bytes_to(stub_target as *const () as u64);
        // SAFETY: `p` is our mapping, writable; nobody executes it yet.
        unsafe { core::ptr::copy_nonoverlapping(b.as_ptr(), p, b.len()) };
        klp_ppc64le_sync_icache(p as usize, b.len());
        // SAFETY: `p` is our mapping.
        assert_eq!(unsafe { mprotect(p, LEN, RX) }, 0);
        // SAFETY: the mapping holds a stub that jumps to `stub_target`, which has this
        // signature.
        let f = unsafe { core::mem::transmute::<*mut u8, extern "C" fn(u64) -> u64>(p) };
        assert_eq!(f(core::hint::black_box(5)), 16);
        // SAFETY: our mapping, no longer used.
        unsafe { munmap(p, LEN) };
    }

    #[test]
    fn write_word_is_one_aligned_store() {
        #[repr(align(8))]
        struct W([u8; 12]);
        let mut w = W([0; 12]);
        let p = w.0.as_mut_ptr();
        // SAFETY: `w` is a local, writable buffer that no thread executes (1, 2).
        unsafe {
            assert!(write_word(p.wrapping_add(4), 0x7c08_02a6));
            assert!(!write_word(p.wrapping_add(2), 0x6000_0000));
        }
        assert_eq!(w.0, [0, 0, 0, 0, 0xa6, 0x02, 0x08, 0x7c, 0, 0, 0, 0]);
    }
}
