//! The entry trampoline: what a redirected patch site branches to.
//!
//! A patch site `S` (two words at a patchable entry, see [`crate::site`]) is rewritten
//! to `mov x9, x30; bl entry_trampoline`. The trampoline asks the host's decision
//! function (see [`set_decision`]) which implementation the calling thread runs and
//! continues there: at `S + 8` (the original body), or at a replacement function
//! entered as if the caller had called it directly.
//!
//! A site whose `bl` cannot reach the trampoline (±128 MiB: a shared object mapped far
//! from the executable) calls a *far stub* within its reach instead ([`stub_bytes`]),
//! which jumps here through `x16`; the host decides where stubs go.
//!
//! # Register contract
//!
//! **On entry** (just executed `mov x9, x30; bl entry_trampoline` at `S`, or
//! `mov x9, x30; bl stub` and the stub):
//! * `x30` = `S + 8`, `x9` = the caller's return address;
//! * `sp` as at the function's entry (16-byte aligned); `x29` = the caller's frame
//!   pointer;
//! * the argument registers hold the caller's arguments: `x0`–`x7`, `x8` (address of
//!   an indirect result), `x18` (GCC's static chain of nested functions; Linux does
//!   not reserve it, so the decision may use it) and `q0`–`q7` (all 128 bits); stack
//!   arguments are at `[sp]` and up.
//!
//! **Inside**: a 16-byte aligned [`SavedRegs`] below the entry `sp` holding the
//! registers above and two frame records (the kernel's ftrace layout): the *callee*
//! record `{caller's x29, x9}`, which stands for the patched function's own frame, and
//! the trampoline's record `{&callee record, S + 8}` that `x29` points to. A stack walk
//! from inside the decision therefore sees `S + 8` (the patched function), then the
//! caller's return address, then the caller's own records. `decide(S)` is called with
//! `S = x30 - 8` (AAPCS64, `sp` 16-byte aligned).
//!
//! **On exit**, `x0`–`x9`, `x18`, `q0`–`q7`, `x29` and `sp` hold their entry values,
//! `x30` holds the caller's return address (the entry `x9`), and:
//! * `decide` returned 0 (or no decision function is installed): `ret x17` to `S + 8`,
//!   which runs the original function body as if the site were two nops (the `ret`
//!   matches the `bl`'s return prediction, and is not subject to BTI);
//! * `decide` returned an address `T`: `br x16` to `T`, which runs with the caller's
//!   arguments, its stack arguments at `[sp]` and its return address in `x30`: exactly
//!   a direct call of `T` (`br x16` may land on a `bti c`).
//!
//! Clobbered, relative to what the caller passed: `x16`, `x17` (IP0/IP1, which a
//! linker veneer may clobber on any call anyway), `x9` (a temporary, overwritten by
//! the site's `mov`) and the flags. Callee-saved registers are preserved (the decision is an AAPCS64 function).
//! Not preserved: bits above 128 of SVE `z0`–`z7` and the SVE predicates (the decision
//! function does not use SVE; a patched function must not take SVE arguments).
//!
//! The decision function must not unwind, must be async-signal-safe if patched
//! functions are called from signal handlers, and must return 0 or the address of a
//! function with the patched function's signature.

use core::arch::asm;
use core::mem::{offset_of, size_of};
use core::sync::atomic::{AtomicUsize, Ordering};

/// A frame record as AAPCS64 lays it out: the previous record, the return address.
#[repr(C)]
#[derive(Debug, Default, Clone, Copy)]
pub struct FrameRecord {
    /// The next (older) frame record.
    pub fp: u64,
    /// The return address of this frame.
    pub lr: u64,
}

/// The trampoline's frame: saved registers and its two frame records.
#[repr(C)]
#[derive(Debug, Default, Clone, Copy)]
pub struct SavedRegs {
    /// The integer argument registers `x0`–`x7`.
    pub x: [u64; 8],
    /// Address of an indirect result.
    pub x8: u64,
    /// The caller's return address (the site's `mov x9, x30`).
    pub x9: u64,
    /// The static chain (GCC) or a temporary.
    pub x18: u64,
    /// Keeps `q` 16-byte aligned.
    pub pad: u64,
    /// `q0`–`q7`, 16 bytes each.
    pub q: [[u64; 2]; 8],
    /// The trampoline's record: `{&callee, S + 8}` (`x29` points here).
    pub record: FrameRecord,
    /// The patched function's record: `{caller's x29, caller's return address}`.
    pub callee: FrameRecord,
}

const FRAME: usize = size_of::<SavedRegs>();
const X: usize = offset_of!(SavedRegs, x);
const X8: usize = offset_of!(SavedRegs, x8);
const X18: usize = offset_of!(SavedRegs, x18);
const Q: usize = offset_of!(SavedRegs, q);
const RECORD: usize = offset_of!(SavedRegs, record);
const CALLEE: usize = offset_of!(SavedRegs, callee);
const LR: usize = offset_of!(FrameRecord, lr);
// `sp` stays 16-byte aligned.
const _: () = assert!(FRAME.is_multiple_of(16));
// `stp q` takes offsets that are multiples of 16 up to 1008.
const _: () = assert!(Q.is_multiple_of(16) && Q + 7 * 16 <= 1008);
// `stp x` takes offsets that are multiples of 8 up to 504; `x9` follows `x8`.
const _: () = assert!(X.is_multiple_of(8) && X8 == X + 64 && offset_of!(SavedRegs, x9) == X8 + 8);
const _: () = assert!(X18.is_multiple_of(8) && X18 <= 32760);
const _: () = assert!(RECORD.is_multiple_of(8) && CALLEE.is_multiple_of(8) && CALLEE <= 504);
// The records chain upwards (older frames at higher addresses).
const _: () = assert!(RECORD < CALLEE && offset_of!(FrameRecord, fp) == 0 && LR == 8);
const _: () = assert!(FRAME == 8 * 12 + 16 * 8 + 2 * 16);

/// Bytes from the site to the return address of its `bl`: the decision gets
/// `x30 - CALL_RETURN`.
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

/// The address a redirected site branches to.
pub fn address() -> u64 {
    entry_trampoline as *const () as u64
}

pub use crate::patching::{STUB_LEN, stub_bytes_to};

/// The far stub of [`entry_trampoline`] (see [`stub_bytes_to`]).
pub fn stub_bytes() -> [u8; STUB_LEN] {
    stub_bytes_to(address())
}

/// The trampoline itself. See the module documentation for its register contract.
/// Its first instruction is `bti c`, the landing pad a far stub's `br x16` needs where
/// branch target identification is enforced (a `nop` elsewhere).
///
/// # Safety
///
/// 1. Only to be reached by the `mov x9, x30; bl entry_trampoline` written at a patch
///    site, or by that `bl` to a far stub of [`stub_bytes`] (the contract's entry
///    state); never called from Rust.
#[unsafe(naked)]
pub unsafe extern "C" fn entry_trampoline() {
    core::arch::naked_asm!(
        "hint #34",
        "sub sp, sp, #{frame}",
        "stp x29, x9, [sp, #{callee}]",
        "stp x0, x1, [sp, #({x} + 0)]",
        "stp x2, x3, [sp, #({x} + 16)]",
        "stp x4, x5, [sp, #({x} + 32)]",
        "stp x6, x7, [sp, #({x} + 48)]",
        "stp x8, x9, [sp, #{x8}]",
        "str x18, [sp, #{x18}]",
        "stp q0, q1, [sp, #({q} + 0)]",
        "stp q2, q3, [sp, #({q} + 32)]",
        "stp q4, q5, [sp, #({q} + 64)]",
        "stp q6, q7, [sp, #({q} + 96)]",
        "add x16, sp, #{callee}",
        "stp x16, x30, [sp, #{record}]",
        "add x29, sp, #{record}",
        "mov x16, xzr",
        "adrp x17, {decision}",
        "ldr x17, [x17, :lo12:{decision}]",
        "cbz x17, 2f",
        "sub x0, x30, #{call_return}",
        "blr x17",
        "mov x16, x0",
        "2:",
        "ldp x0, x1, [sp, #({x} + 0)]",
        "ldp x2, x3, [sp, #({x} + 16)]",
        "ldp x4, x5, [sp, #({x} + 32)]",
        "ldp x6, x7, [sp, #({x} + 48)]",
        "ldp x8, x9, [sp, #{x8}]",
        "ldr x18, [sp, #{x18}]",
        "ldp q0, q1, [sp, #({q} + 0)]",
        "ldp q2, q3, [sp, #({q} + 32)]",
        "ldp q4, q5, [sp, #({q} + 64)]",
        "ldp q6, q7, [sp, #({q} + 96)]",
        "ldr x17, [sp, #({record} + {lr})]",
        "ldp x29, x30, [sp, #{callee}]",
        "add sp, sp, #{frame}",
        "cbnz x16, 3f",
        "ret x17",
        "3:",
        "br x16",
        frame = const FRAME,
        x = const X,
        x8 = const X8,
        x18 = const X18,
        q = const Q,
        record = const RECORD,
        callee = const CALLEE,
        lr = const LR,
        call_return = const CALL_RETURN,
        decision = sym DECISION,
    )
}

/// Stores the instruction `word` at `dst` with one aligned 4-byte store (single-copy
/// atomic, so a thread fetching it sees the old or the new instruction), then makes it
/// visible to instruction fetch: `dc cvau`, `dsb ish`, `ic ivau`, `dsb ish`, `isb` on
/// the line holding it (an aligned word never straddles a cache line). Other threads
/// see it once they pass a context synchronisation event (the host's signal round).
/// One `asm!` block keeps the store and the sequence in program order; the function is
/// out of line under a fixed name so that its code can be checked.
///
/// # Safety
///
/// 1. `dst` is 4-byte aligned, mapped and writable (the host made the text writable).
/// 2. A thread may execute the word while it is written only under the host's
///    cross-modification protocol (the old and the new instruction each safe to run
///    in that state of the site).
/// 3. Text writes are serialised by the caller (one writer at a time).
#[inline(never)]
#[unsafe(no_mangle)]
pub unsafe extern "C" fn klp_aarch64_write_word(dst: *mut u32, word: u32) {
    // SAFETY: `dst` is aligned, mapped and writable (1); the store is the only memory
    // write; the cache maintenance works on the mapped line holding `dst` and changes
    // no memory contents; concurrent execution is covered by (2) and (3). No stack use
    // and no register besides the operands.
    unsafe {
        asm!(
            "str {w:w}, [{p}]",
            "dc cvau, {p}",
            "dsb ish",
            "ic ivau, {p}",
            "dsb ish",
            "isb",
            w = in(reg) word,
            p = in(reg) dst,
            options(nostack, preserves_flags),
        );
    }
}

#[cfg(test)]
mod tests {
    extern crate std;

    use super::*;
    use core::arch::aarch64::uint64x2_t;
    use core::sync::atomic::AtomicU64;
    use std::vec::Vec;

    #[test]
    fn frame_layout() {
        assert_eq!(X, 0);
        assert_eq!(X8, 64);
        assert_eq!(X18, 80);
        assert_eq!(Q, 96);
        assert_eq!((RECORD, CALLEE), (224, 240));
        assert_eq!(FRAME, 256);
    }

    #[test]
    fn stub_layout() {
        let b = stub_bytes_to(0x1122_3344_5566_7788);
        let w = |i: usize| u32::from_le_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]]);
        // ldr x16, literal: opcode 0x58, imm19 = 2 words, Rt = 16.
        assert_eq!(
            (w(0) >> 24, (w(0) >> 5) & 0x7_ffff, w(0) & 0x1f),
            (0x58, 2, 16)
        );
        // br x16: Rn = 16, no other register written.
        assert_eq!((w(4) & !(0x1f << 5), (w(4) >> 5) & 0x1f), (0xd61f_0000, 16));
        assert_eq!(&b[8..], &0x1122_3344_5566_7788u64.to_le_bytes());
        assert_eq!(&stub_bytes()[8..], &address().to_le_bytes());
        assert_eq!(code_of(address())[0], 0xd503_245f, "bti c first");
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
    /// with the argument and returns to the caller (x30 kept).
    #[test]
    fn a_stub_runs() {
        const RW: i32 = 3;
        const RX: i32 = 5;
        const PRIVATE_ANON: i32 = 0x22;
        // SAFETY: an anonymous private mapping has no preconditions.
        let p = unsafe { mmap(core::ptr::null_mut(), 4096, RW, PRIVATE_ANON, -1, 0) };
        assert!(!p.is_null() && p as isize != -1);
        let b = stub_bytes_to(stub_target as *const () as u64);
        // SAFETY: `p` is our page, writable, 4096 bytes; nobody executes it yet.
        unsafe { core::ptr::copy_nonoverlapping(b.as_ptr(), p, b.len()) };
        crate::live::klp_aarch64_sync_icache(p as usize, b.len());
        // SAFETY: `p` is our page.
        assert_eq!(unsafe { mprotect(p, 4096, RX) }, 0);
        // SAFETY: the page holds a stub that jumps to `stub_target`, which has this
        // signature.
        let f = unsafe { core::mem::transmute::<*mut u8, extern "C" fn(u64) -> u64>(p) };
        assert_eq!(f(core::hint::black_box(5)), 16);
        // SAFETY: our page, no longer used.
        unsafe { munmap(p, 4096) };
    }

    #[test]
    fn write_word_stores_the_word() {
        let mut buf = [0u32; 4];
        // SAFETY: `buf` is a writable, aligned local that no thread executes (1–3).
        unsafe { klp_aarch64_write_word(buf.as_mut_ptr().wrapping_add(1), 0xd503_201f) };
        assert_eq!(buf, [0, 0xd503_201f, 0, 0]);
    }

    /// The instructions of `f`, up to its first `ret` (at most 64).
    fn code_of(f: u64) -> Vec<u32> {
        let mut out = Vec::new();
        for i in 0..64 {
            // SAFETY: `f` is a function of this program; its words up to its `ret`
            // are mapped text.
            let w = unsafe { core::ptr::read_volatile((f as *const u32).wrapping_add(i)) };
            out.push(w);
            if w == 0xd65f_03c0 {
                break;
            }
        }
        out
    }

    #[test]
    fn write_word_runs_the_coherence_sequence_in_order() {
        let code = code_of(klp_aarch64_write_word as *const () as u64);
        // str wT, [xN] (unsigned offset 0); dc cvau, xN; dsb ish; ic ivau, xN;
        // dsb ish; isb.
        let pos = code
            .iter()
            .position(|w| w & 0xffff_fc00 == 0xb900_0000)
            .expect("a 32-bit store");
        let rn = (code[pos] >> 5) & 0x1f;
        let want = [
            0xd50b_7b20 | rn,
            0xd503_3b9f,
            0xd50b_7520 | rn,
            0xd503_3b9f,
            0xd503_3fdf,
        ];
        assert_eq!(code.get(pos + 1..pos + 6), Some(&want[..]), "{code:x?}");
    }

    // ------------------------------------------------------------ through the trampoline

    /// What the decision saw: the site, `S + 8` from the trampoline's record, the
    /// callee record's return address, and the callee record's address.
    static SEEN: [AtomicU64; 4] = [const { AtomicU64::new(0) }; 4];
    /// What the decision returns.
    static CHOICE: AtomicU64 = AtomicU64::new(0);
    static CALLS: AtomicU64 = AtomicU64::new(0);

    /// The decision: records what it sees through its frame pointer argument.
    extern "C" fn observe(site: u64, fp: u64) -> u64 {
        // SAFETY: `fp` is the trampoline's `x29`: its frame record, whose `fp` field
        // points to the callee record; both live in the trampoline's frame, which
        // outlives this call.
        let (callee, lr0, lr1) = unsafe {
            let callee = *(fp as *const u64);
            (
                callee,
                *((fp + 8) as *const u64),
                *((callee + 8) as *const u64),
            )
        };
        for (s, v) in SEEN.iter().zip([site, lr0, lr1, callee]) {
            s.store(v, Ordering::Relaxed);
        }
        CALLS.fetch_add(1, Ordering::Relaxed);
        CHOICE.load(Ordering::Relaxed)
    }

    /// The installed decision: passes its `x29` (the trampoline's record) to
    /// [`observe`] after clobbering every caller-saved register the trampoline must
    /// restore, so that a register it forgets to save shows.
    #[unsafe(naked)]
    extern "C" fn probe(_site: u64) -> u64 {
        core::arch::naked_asm!(
            "stp x29, x30, [sp, #-16]!",
            "mov x1, x29",
            "mov x29, sp",
            "mov x2, #0x5a5a",
            "mov x3, x2",
            "mov x4, x2",
            "mov x5, x2",
            "mov x6, x2",
            "mov x7, x2",
            "mov x8, x2",
            "mov x9, x2",
            "mov x18, x2",
            "mov x16, x2",
            "mov x17, x2",
            "movi v0.2d, #0xffffffffffffffff",
            "movi v1.2d, #0xffffffffffffffff",
            "movi v2.2d, #0xffffffffffffffff",
            "movi v3.2d, #0xffffffffffffffff",
            "movi v4.2d, #0xffffffffffffffff",
            "movi v5.2d, #0xffffffffffffffff",
            "movi v6.2d, #0xffffffffffffffff",
            "movi v7.2d, #0xffffffffffffffff",
            "bl {observe}",
            "ldp x29, x30, [sp], #16",
            "ret",
            observe = sym observe,
        )
    }

    /// Returned through `x8` (larger than 16 bytes).
    #[repr(C)]
    #[derive(Debug, PartialEq, Clone, Copy)]
    struct Big {
        ints: u64,
        floats: f64,
        stack: u64,
        which: u64,
    }

    fn weigh(i: [u64; 8], f: [f64; 8], s: [u64; 2], which: u64) -> Big {
        let mut ints = 0u64;
        let mut floats = 0.0;
        for (k, (a, b)) in i.iter().zip(f).enumerate() {
            ints = ints.wrapping_add(a.wrapping_mul(k as u64 + 1));
            floats += b * (k as f64 + 10.0);
        }
        Big {
            ints,
            floats,
            stack: s[0] * 3 + s[1] * 7,
            which,
        }
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
        f0: f64,
        f1: f64,
        f2: f64,
        f3: f64,
        f4: f64,
        f5: f64,
        f6: f64,
        f7: f64,
        s0: u64,
        s1: u64,
    ) -> Big {
        weigh(
            [a, b, c, d, e, f, g, h],
            [f0, f1, f2, f3, f4, f5, f6, f7],
            [s0, s1],
            1,
        )
    }

    #[allow(clippy::too_many_arguments)]
    extern "C" fn many_v2(
        a: u64,
        b: u64,
        c: u64,
        d: u64,
        e: u64,
        f: u64,
        g: u64,
        h: u64,
        f0: f64,
        f1: f64,
        f2: f64,
        f3: f64,
        f4: f64,
        f5: f64,
        f6: f64,
        f7: f64,
        s0: u64,
        s1: u64,
    ) -> Big {
        weigh(
            [a, b, c, d, e, f, g, h],
            [f0, f1, f2, f3, f4, f5, f6, f7],
            [s0, s1],
            2,
        )
    }

    /// A site in its trampoline state, in front of `many_body`.
    #[unsafe(naked)]
    #[allow(clippy::too_many_arguments)]
    extern "C" fn many_site(
        _a: u64,
        _b: u64,
        _c: u64,
        _d: u64,
        _e: u64,
        _f: u64,
        _g: u64,
        _h: u64,
        _f0: f64,
        _f1: f64,
        _f2: f64,
        _f3: f64,
        _f4: f64,
        _f5: f64,
        _f6: f64,
        _f7: f64,
        _s0: u64,
        _s1: u64,
    ) -> Big {
        core::arch::naked_asm!(
            "mov x9, x30",
            "bl {tramp}",
            "b {body}",
            tramp = sym entry_trampoline,
            body = sym many_body,
        )
    }

    #[inline(never)]
    fn call_many() -> Big {
        many_site(
            1, 2, 3, 4, 5, 6, 7, 8, 0.5, 1.5, 2.5, 3.5, 4.5, 5.5, 6.5, 7.5, 100, 1000,
        )
    }

    /// The lanes of `v`.
    fn lanes(v: uint64x2_t) -> [u64; 2] {
        // SAFETY: both types are 16 plain bytes; every bit pattern is valid for each.
        unsafe { core::mem::transmute::<uint64x2_t, [u64; 2]>(v) }
    }

    /// The vector of `l`.
    fn vector(l: [u64; 2]) -> uint64x2_t {
        // SAFETY: as in `lanes`.
        unsafe { core::mem::transmute::<[u64; 2], uint64x2_t>(l) }
    }

    /// `v * (k + 1)` summed per lane, plus a tag in the high lane.
    fn mix(v: [uint64x2_t; 8], which: u64) -> uint64x2_t {
        let mut acc = [0u64, which];
        for (k, x) in v.iter().enumerate() {
            for (a, l) in acc.iter_mut().zip(lanes(*x)) {
                *a = a.wrapping_add(l.wrapping_mul(k as u64 + 1));
            }
        }
        vector(acc)
    }

    #[allow(clippy::too_many_arguments, improper_ctypes_definitions)]
    extern "C" fn vec_body(
        v0: uint64x2_t,
        v1: uint64x2_t,
        v2: uint64x2_t,
        v3: uint64x2_t,
        v4: uint64x2_t,
        v5: uint64x2_t,
        v6: uint64x2_t,
        v7: uint64x2_t,
    ) -> uint64x2_t {
        mix([v0, v1, v2, v3, v4, v5, v6, v7], 1)
    }

    #[allow(clippy::too_many_arguments, improper_ctypes_definitions)]
    extern "C" fn vec_v2(
        v0: uint64x2_t,
        v1: uint64x2_t,
        v2: uint64x2_t,
        v3: uint64x2_t,
        v4: uint64x2_t,
        v5: uint64x2_t,
        v6: uint64x2_t,
        v7: uint64x2_t,
    ) -> uint64x2_t {
        mix([v0, v1, v2, v3, v4, v5, v6, v7], 2)
    }

    #[unsafe(naked)]
    #[allow(clippy::too_many_arguments, improper_ctypes_definitions)]
    extern "C" fn vec_site(
        _v0: uint64x2_t,
        _v1: uint64x2_t,
        _v2: uint64x2_t,
        _v3: uint64x2_t,
        _v4: uint64x2_t,
        _v5: uint64x2_t,
        _v6: uint64x2_t,
        _v7: uint64x2_t,
    ) -> uint64x2_t {
        core::arch::naked_asm!(
            "mov x9, x30",
            "bl {tramp}",
            "b {body}",
            tramp = sym entry_trampoline,
            body = sym vec_body,
        )
    }

    fn vecs() -> [uint64x2_t; 8] {
        core::array::from_fn(|k| vector([k as u64 + 1, (k as u64 + 1) << 32]))
    }

    #[inline(never)]
    fn call_vec() -> [u64; 2] {
        let v = vecs();
        lanes(vec_site(v[0], v[1], v[2], v[3], v[4], v[5], v[6], v[7]))
    }

    /// Calls `x18_site` with `x18 = v` (restoring the caller's `x18`).
    #[unsafe(naked)]
    extern "C" fn call_with_x18(_v: u64) -> u64 {
        core::arch::naked_asm!(
            "stp x29, x30, [sp, #-32]!",
            "mov x29, sp",
            "str x18, [sp, #16]",
            "mov x18, x0",
            "bl {site}",
            "ldr x18, [sp, #16]",
            "ldp x29, x30, [sp], #32",
            "ret",
            site = sym x18_site,
        )
    }

    /// A site in its trampoline state, in front of `x18_body`.
    #[unsafe(naked)]
    extern "C" fn x18_site() -> u64 {
        core::arch::naked_asm!(
            "mov x9, x30",
            "bl {tramp}",
            "b {body}",
            tramp = sym entry_trampoline,
            body = sym x18_body,
        )
    }

    /// Returns the static chain it was given.
    #[unsafe(naked)]
    extern "C" fn x18_body() -> u64 {
        core::arch::naked_asm!("mov x0, x18", "ret")
    }

    #[unsafe(naked)]
    extern "C" fn x18_v2() -> u64 {
        core::arch::naked_asm!("add x0, x18, #1", "ret")
    }

    #[test]
    fn the_trampoline_runs_the_chosen_implementation() {
        set_decision(probe);
        let ints = [1, 2, 3, 4, 5, 6, 7, 8];
        let floats = [0.5, 1.5, 2.5, 3.5, 4.5, 5.5, 6.5, 7.5];
        let site = many_site as *const () as u64;
        let caller = call_many as *const () as u64;
        for (choice, which) in [(0, 1), (many_v2 as *const () as u64, 2), (0, 1)] {
            CHOICE.store(choice, Ordering::Relaxed);
            let before = CALLS.load(Ordering::Relaxed);
            let got = call_many();
            assert_eq!(
                got,
                weigh(ints, floats, [100, 1000], which),
                "choice {choice:#x}"
            );
            assert_eq!(CALLS.load(Ordering::Relaxed), before + 1);
            let seen: Vec<u64> = SEEN.iter().map(|s| s.load(Ordering::Relaxed)).collect();
            assert_eq!(seen[0], site, "the decision gets the site");
            assert_eq!(
                seen[1],
                site + 8,
                "the trampoline's record returns into the site"
            );
            assert!(
                seen[2] > caller && seen[2] - caller < 4096,
                "the callee record returns into the caller: {seen:x?} vs {caller:#x}"
            );
            assert_eq!(seen[3] % 16, 0, "{seen:x?}");
        }

        let v = vecs();
        let want = |which| lanes(mix(v, which));
        for (choice, which) in [(0, 1), (vec_v2 as *const () as u64, 2)] {
            CHOICE.store(choice, Ordering::Relaxed);
            assert_eq!(call_vec(), want(which), "choice {choice:#x}");
        }
        assert_eq!(
            SEEN[0].load(Ordering::Relaxed),
            vec_site as *const () as u64
        );

        for (choice, want) in [(0, 0x1234), (x18_v2 as *const () as u64, 0x1235)] {
            CHOICE.store(choice, Ordering::Relaxed);
            assert_eq!(call_with_x18(0x1234), want, "the static chain");
        }
        assert_eq!(
            SEEN[0].load(Ordering::Relaxed),
            x18_site as *const () as u64
        );
        CHOICE.store(0, Ordering::Relaxed);
    }
}
