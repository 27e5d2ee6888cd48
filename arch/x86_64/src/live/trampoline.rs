//! The entry trampoline: where a redirected patch site goes.
//!
//! A patch site `S` (5 bytes: the nop of a patchable entry) is rewritten to
//! `jmp stub`, where the stub is a small per-site piece of code ([`stub_bytes`],
//! [`STUB_LEN`] bytes, placed within ±2 GiB of the site by the host) that loads `S` into
//! `r11` and jumps to [`entry_trampoline`]. The trampoline asks the host's decision
//! function (see [`set_decision`]) which implementation the calling thread runs and
//! continues there: at `S + 5` (the original body) or at a replacement function.
//!
//! Nothing on the way is a `call` that is not matched by its `ret`: the site and the
//! stub jump, the trampoline calls the decision (which returns) and then jumps. The
//! processor's return-address predictor therefore stays in step, and the function that
//! finally runs returns to the caller as predicted. (A site that `call`ed the trampoline
//! and a trampoline that dropped that return address would cost a mispredicted return
//! on every redirected call.)
//!
//! # Register contract
//!
//! **On entry** (the site jumped to the stub, the stub set `r11` and jumped here):
//! * `r11` = `S`; `[rsp]` = the caller's return address; `rsp` ≡ 8 (mod 16), as at
//!   any function's entry;
//! * the argument registers hold the caller's arguments: `rdi`, `rsi`, `rdx`, `rcx`,
//!   `r8`, `r9`, `rax` (`al` = number of vector registers of a varargs call), `r10`
//!   (static chain of GNU C nested functions) and `xmm0`–`xmm7`; stack arguments are
//!   above the caller's return address.
//!
//! **Inside**: `S + 5` is pushed as if the function had called the trampoline, then a
//! frame record (`push rbp; mov rbp, rsp`), so a stack walk from inside the decision
//! sees the patched function (and a stack check does not switch a thread that is about
//! to act on a decision it took in its old state); the registers above saved in a
//! [`SavedRegs`] on a 16-byte aligned stack; then `decide(S)` is called (System V ABI,
//! `rsp` ≡ 0 mod 16 at the `call`).
//!
//! **On exit**, every register listed above is restored to its entry value, `rsp` is
//! back at its entry value, and the trampoline jumps:
//! * to `S + 5` if `decide` returned 0 (or no decision function is installed): the
//!   original body runs exactly as if entered directly;
//! * to `T` if `decide` returned an address `T`: `T` runs with `[rsp]` = the caller's
//!   return address and the caller's arguments, exactly a direct call of `T`.
//!
//! Clobbered: `r11` (carries the site, then the target; caller-saved and never an
//! argument) and the flags (not preserved across calls by the ABI). Not preserved: the
//! upper halves of `ymm`/`zmm` registers if the decision function uses AVX (it does
//! not; a patched function must not take `__m256`/`__m512` arguments), the x87 stack
//! (not used to pass arguments in the System V ABI).
//!
//! The decision function must not unwind, must be async-signal-safe if patched
//! functions are called from signal handlers, and must return 0 or the address of a
//! function with the patched function's signature.

use core::mem::{offset_of, size_of};
use core::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

use crate::live::sync_icache;

/// The registers the trampoline saves around the decision.
#[repr(C)]
#[derive(Debug, Default, Clone, Copy)]
pub struct SavedRegs {
    /// First integer argument.
    pub rdi: u64,
    /// Second integer argument.
    pub rsi: u64,
    /// Third integer argument.
    pub rdx: u64,
    /// Fourth integer argument.
    pub rcx: u64,
    /// Fifth integer argument.
    pub r8: u64,
    /// Sixth integer argument.
    pub r9: u64,
    /// Vector-register count of a varargs call.
    pub rax: u64,
    /// Static chain.
    pub r10: u64,
    /// `xmm0`–`xmm7`, 16 bytes each.
    pub xmm: [[u64; 2]; 8],
    /// Keeps the frame an odd multiple of 8 bytes (see the alignment assertions).
    pub pad: u64,
}

const FRAME: usize = size_of::<SavedRegs>();
const XMM: usize = offset_of!(SavedRegs, xmm);
// Entry rsp ≡ 8 (mod 16); after pushing `S + 5` and rbp it is ≡ 8 again; the frame
// must bring it to 0 for the call.
const _: () = assert!(FRAME % 16 == 8);
// The vector save area is 16-byte aligned in the frame (rsp ≡ 0 after the `sub`).
const _: () = assert!(XMM.is_multiple_of(16));
const _: () = assert!(FRAME == 8 * 8 + 16 * 8 + 8);

/// Length of a site (the `jmp rel32` written there): the original body starts at
/// `S + SITE_LEN`, the address the trampoline pushes as the function's return address.
pub const SITE_LEN: u64 = 5;
const _: () = assert!(SITE_LEN as usize == crate::insn::BRANCH_LEN);

pub use crate::patching::{STUB_LEN, stub_bytes_to};

/// The per-site stub that a site at `site` jumps to:
///
/// ```text
/// 49 bb <site: 8 bytes>      movabs r11, site
/// ff 25 00 00 00 00          jmp    qword ptr [rip + 0]
/// <entry_trampoline: 8 bytes>
/// ```
///
/// Position-independent and reach-independent: the stub may be anywhere within
/// ±2 GiB of its site (the site's `jmp rel32`), and reaches the trampoline wherever it
/// is.
pub fn stub_bytes(site: u64) -> [u8; STUB_LEN] {
    stub_bytes_to(site, address())
}

/// The decision function: called with the site address, returns 0 (run the original)
/// or the address to continue at.
pub type Decision = extern "C" fn(site: u64) -> u64;

static DECISION: AtomicUsize = AtomicUsize::new(0);

/// Installs the decision function every trampoline call uses (process-wide).
pub fn set_decision(f: Decision) {
    DECISION.store(f as usize, Ordering::Release);
}

/// The address a redirected site calls.
pub fn address() -> u64 {
    entry_trampoline as *const () as u64
}

/// The trampoline itself. See the module documentation for its register contract.
///
/// # Safety
///
/// Only to be reached through a site's stub (the contract's entry state, `r11` = the
/// site); never called from Rust.
#[unsafe(naked)]
pub unsafe extern "C" fn entry_trampoline() {
    core::arch::naked_asm!(
        "lea r11, [r11 + {site_len}]",
        "push r11",
        "push rbp",
        "mov rbp, rsp",
        "sub rsp, {frame}",
        "mov [rsp + {rdi}], rdi",
        "mov [rsp + {rsi}], rsi",
        "mov [rsp + {rdx}], rdx",
        "mov [rsp + {rcx}], rcx",
        "mov [rsp + {r8}], r8",
        "mov [rsp + {r9}], r9",
        "mov [rsp + {rax}], rax",
        "mov [rsp + {r10}], r10",
        "movaps [rsp + {xmm} + 0], xmm0",
        "movaps [rsp + {xmm} + 16], xmm1",
        "movaps [rsp + {xmm} + 32], xmm2",
        "movaps [rsp + {xmm} + 48], xmm3",
        "movaps [rsp + {xmm} + 64], xmm4",
        "movaps [rsp + {xmm} + 80], xmm5",
        "movaps [rsp + {xmm} + 96], xmm6",
        "movaps [rsp + {xmm} + 112], xmm7",
        "mov r11, [rbp + 8]",
        "mov rax, qword ptr [rip + {decision}]",
        "test rax, rax",
        "jz 2f",
        "lea rdi, [r11 - {site_len}]",
        "call rax",
        "test rax, rax",
        "mov r11, [rbp + 8]",
        "cmovnz r11, rax",
        "2:",
        "mov rdi, [rsp + {rdi}]",
        "mov rsi, [rsp + {rsi}]",
        "mov rdx, [rsp + {rdx}]",
        "mov rcx, [rsp + {rcx}]",
        "mov r8, [rsp + {r8}]",
        "mov r9, [rsp + {r9}]",
        "mov rax, [rsp + {rax}]",
        "mov r10, [rsp + {r10}]",
        "movaps xmm0, [rsp + {xmm} + 0]",
        "movaps xmm1, [rsp + {xmm} + 16]",
        "movaps xmm2, [rsp + {xmm} + 32]",
        "movaps xmm3, [rsp + {xmm} + 48]",
        "movaps xmm4, [rsp + {xmm} + 64]",
        "movaps xmm5, [rsp + {xmm} + 80]",
        "movaps xmm6, [rsp + {xmm} + 96]",
        "movaps xmm7, [rsp + {xmm} + 112]",
        "mov rsp, rbp",
        "pop rbp",
        "lea rsp, [rsp + 8]",
        "jmp r11",
        frame = const FRAME,
        rdi = const offset_of!(SavedRegs, rdi),
        rsi = const offset_of!(SavedRegs, rsi),
        rdx = const offset_of!(SavedRegs, rdx),
        rcx = const offset_of!(SavedRegs, rcx),
        r8 = const offset_of!(SavedRegs, r8),
        r9 = const offset_of!(SavedRegs, r9),
        rax = const offset_of!(SavedRegs, rax),
        r10 = const offset_of!(SavedRegs, r10),
        xmm = const XMM,
        site_len = const SITE_LEN,
        decision = sym DECISION,
    )
}

/// Writes the `bytes` of a site at `dst` with one aligned 8-byte atomic store, so a
/// thread executing them sees either the old or the new instruction, never a mix; then
/// the cache sync of [`crate::live`]. Returns `false` (and writes nothing) when the
/// bytes do not lie within one aligned 8-byte word.
///
/// # Safety
///
/// 1. The aligned word containing `dst..dst + bytes.len()` is mapped and writable.
/// 2. The bytes outside `dst..dst + bytes.len()` in that word are not written
///    concurrently (text writes are serialised by the caller).
pub unsafe fn write_site(dst: *mut u8, bytes: &[u8]) -> bool {
    let a = dst as usize;
    let base = a & !7;
    let off = a & 7;
    if bytes.is_empty() {
        return false;
    }
    let Some(end) = off.checked_add(bytes.len()).filter(|&e| e <= 8) else {
        return false;
    };
    // SAFETY: `base` is 8-aligned, mapped and writable (1); nobody else writes the word
    // (2), so viewing it as an atomic for the duration of this call is sound.
    let word = unsafe { &*(base as *const AtomicU64) };
    let mut b = word.load(Ordering::Acquire).to_le_bytes();
    if let Some(d) = b.get_mut(off..end) {
        d.copy_from_slice(bytes);
    }
    word.store(u64::from_le_bytes(b), Ordering::SeqCst);
    sync_icache(dst, bytes.len());
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frame_layout() {
        assert_eq!(offset_of!(SavedRegs, rdi), 0);
        assert_eq!(offset_of!(SavedRegs, r10), 56);
        assert_eq!(XMM, 64);
        assert_eq!(FRAME, 200);
    }

    #[test]
    fn stub_layout() {
        let b = stub_bytes(0x1122_3344_5566_7788);
        assert_eq!(&b[..2], &[0x49, 0xbb], "movabs r11, imm64");
        assert_eq!(&b[2..10], &0x1122_3344_5566_7788u64.to_le_bytes());
        assert_eq!(&b[10..16], &[0xff, 0x25, 0, 0, 0, 0], "jmp [rip + 0]");
        assert_eq!(&b[16..], &address().to_le_bytes());
    }

    #[test]
    fn write_site_stays_in_one_word() {
        #[repr(align(8))]
        struct W([u8; 16]);
        let mut w = W([0; 16]);
        let p = w.0.as_mut_ptr();
        // SAFETY: `w` is a local, writable, 8-aligned buffer (1, 2).
        unsafe {
            assert!(write_site(p.wrapping_add(3), &[1, 2, 3, 4, 5]));
            assert!(!write_site(p.wrapping_add(4), &[1, 2, 3, 4, 5]));
            assert!(!write_site(p, &[]));
        }
        assert_eq!(&w.0[..8], &[0, 0, 0, 1, 2, 3, 4, 5]);
        assert_eq!(&w.0[8..], &[0; 8]);
    }
}
