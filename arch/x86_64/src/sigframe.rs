//! Where a Linux signal frame keeps the registers on x86_64: the kernel's
//! `struct ucontext` (`uc_mcontext` is `struct sigcontext`,
//! `arch/x86/include/uapi/asm/sigcontext.h`), mirrored up to the registers klp reads.
//! ABI: the same on every kernel, and what the C library's `ucontext_t` and its
//! `REG_RBP` = 10, `REG_RSP` = 15, `REG_RIP` = 16 indices describe.

use core::mem::offset_of;

use klp_arch::UcontextLayout;
use klp_arch::live::SigStack;

/// `struct sigcontext` (64-bit), up to `rip`.
#[repr(C)]
struct Sigcontext {
    r8_r15: [u64; 8],
    rdi: u64,
    rsi: u64,
    rbp: u64,
    rbx: u64,
    rdx: u64,
    rax: u64,
    rcx: u64,
    rsp: u64,
    rip: u64,
}

/// `struct ucontext`, up to the registers.
#[repr(C)]
struct Ucontext {
    uc_flags: u64,
    uc_link: u64,
    uc_stack: SigStack,
    uc_mcontext: Sigcontext,
}

#[allow(clippy::arithmetic_side_effects)]
const MC: usize = offset_of!(Ucontext, uc_mcontext);

/// The registers' offsets in a signal handler's `ucontext_t`.
// Const arithmetic: an overflow would fail the build, not wrap at run time.
#[allow(clippy::arithmetic_side_effects)]
pub const LAYOUT: UcontextLayout = UcontextLayout {
    pc: MC + offset_of!(Sigcontext, rip),
    sp: MC + offset_of!(Sigcontext, rsp),
    fp: Some(MC + offset_of!(Sigcontext, rbp)),
    lr: None,
    trap_link: None,
};

// `uc_mcontext` follows three words and the 24-byte `stack_t`; the C library's
// greg indices times 8 from there.
const _: () = assert!(MC == 40);
const _: () = assert!(LAYOUT.fp.is_some() && LAYOUT.pc == MC + 16 * 8 && LAYOUT.sp == MC + 15 * 8);
const _: () = assert!(matches!(LAYOUT.fp, Some(o) if o == MC + 10 * 8));
