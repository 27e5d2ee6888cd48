//! Where a Linux signal frame keeps the registers on ppc64: the kernel's
//! `struct ucontext` (`arch/powerpc/include/uapi/asm/ucontext.h`, 64-bit: the mask
//! padded to 16 words, then `struct sigcontext`) whose `gp_regs` is the `pt_regs`
//! image (`arch/powerpc/include/uapi/asm/ptrace.h`: `gpr[32]`, `nip` = 32, `msr`,
//! `orig_gpr3`, `ctr`, `link` = 36), mirrored up to the registers. ABI.

use core::mem::offset_of;

use klp_arch::UcontextLayout;
use klp_arch::live::SigStack;

/// `struct sigcontext` (64-bit), up to `gp_regs`.
#[repr(C)]
struct Sigcontext {
    unused: [u64; 4],
    signal: i32,
    pad0: i32,
    handler: u64,
    oldmask: u64,
    regs: u64,
    gp_regs: [u64; 48],
}

/// `struct ucontext` (64-bit), up to the registers.
#[repr(C)]
struct Ucontext {
    uc_flags: u64,
    uc_link: u64,
    uc_stack: SigStack,
    uc_sigmask: u64,
    unused: [u64; 15],
    uc_mcontext: Sigcontext,
}

/// Index of the next-instruction address in `pt_regs`.
const PT_NIP: usize = 32;
/// Index of the link register in `pt_regs`.
const PT_LNK: usize = 36;

#[allow(clippy::arithmetic_side_effects)]
const GP: usize = offset_of!(Ucontext, uc_mcontext) + offset_of!(Sigcontext, gp_regs);

/// The registers' offsets in a signal handler's `ucontext_t` (`r1` is the stack
/// pointer; no frame pointer: the back chain is walked from `r1`).
// Const arithmetic: an overflow would fail the build, not wrap at run time.
#[allow(clippy::arithmetic_side_effects)]
pub const LAYOUT: UcontextLayout = UcontextLayout {
    pc: GP + PT_NIP * 8,
    sp: GP + 8,
    fp: None,
    lr: Some(GP + PT_LNK * 8),
    trap_link: None,
};

// 40 bytes of header and 16 words of mask: `uc_mcontext` at 168; `gp_regs` after
// four unused words and four more.
const _: () = assert!(offset_of!(Ucontext, uc_mcontext) == 168 && GP == 232);
