//! Where a Linux signal frame keeps the registers on aarch64: the kernel's
//! `struct ucontext` (`arch/arm64/include/uapi/asm/ucontext.h`): the signal mask
//! padded to 1024 bits, then `struct sigcontext` 16-byte aligned
//! (`arch/arm64/include/uapi/asm/sigcontext.h`), mirrored up to `pc`. ABI.

use core::mem::offset_of;

use klp_arch::UcontextLayout;
use klp_arch::live::SigStack;

/// `struct sigcontext`, up to `pc`.
#[repr(C, align(16))]
struct Sigcontext {
    fault_address: u64,
    regs: [u64; 31],
    sp: u64,
    pc: u64,
}

/// `struct ucontext`, up to the registers.
#[repr(C)]
struct Ucontext {
    uc_flags: u64,
    uc_link: u64,
    uc_stack: SigStack,
    uc_sigmask: u64,
    unused: [u8; 1024 / 8 - 8],
    uc_mcontext: Sigcontext,
}

#[allow(clippy::arithmetic_side_effects)]
const MC: usize = offset_of!(Ucontext, uc_mcontext);
#[allow(clippy::arithmetic_side_effects)]
const REGS: usize = MC + offset_of!(Sigcontext, regs);

/// The registers' offsets in a signal handler's `ucontext_t`.
// Const arithmetic: an overflow would fail the build, not wrap at run time.
#[allow(clippy::arithmetic_side_effects)]
pub const LAYOUT: UcontextLayout = UcontextLayout {
    pc: MC + offset_of!(Sigcontext, pc),
    sp: MC + offset_of!(Sigcontext, sp),
    fp: Some(REGS + 29 * 8),
    lr: Some(REGS + 30 * 8),
    trap_link: None,
};

// 40 bytes of header, the 128-byte mask area, aligned up to 16: 176; `regs` after the
// fault address; `sp` and `pc` after the 31 registers.
const _: () = assert!(MC == 176 && REGS == 184);
const _: () = assert!(LAYOUT.sp == 184 + 31 * 8 && LAYOUT.pc == LAYOUT.sp + 8);
