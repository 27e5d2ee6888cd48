//! Where a Linux signal frame keeps the registers on riscv64: the kernel's
//! `struct ucontext` (`arch/riscv/include/uapi/asm/ucontext.h`): the signal mask
//! padded to 1024 bits, then `struct sigcontext`
//! (`arch/riscv/include/uapi/asm/sigcontext.h`), whose first member is
//! `struct user_regs_struct` (`arch/riscv/include/uapi/asm/ptrace.h`: `pc`, then the
//! integer registers `x1`–`x31` by number), followed by the floating-point state,
//! whose `__riscv_q_ext_state` is 16-byte aligned (so is `sigcontext`). ABI.
//! glibc's `ucontext_t` has the same layout (its `mcontext_t` mirrors `sigcontext`).

use core::mem::offset_of;

use klp_arch::UcontextLayout;
use klp_arch::live::SigStack;

/// `struct user_regs_struct`: `pc`, then `x1`–`x31` in register-number order.
#[repr(C)]
#[allow(dead_code)]
struct UserRegs {
    pc: u64,
    ra: u64,
    sp: u64,
    gp: u64,
    tp: u64,
    t0: u64,
    t1: u64,
    t2: u64,
    s0: u64,
    s1: u64,
    a: [u64; 8],
    s2_s11: [u64; 10],
    t3_t6: [u64; 4],
}

/// `struct sigcontext`: the registers, then the floating-point state (`union
/// __riscv_fp_state`, whose largest member is the Q state: 32 × 16 bytes of `f`
/// aligned to 16, `fcsr`, 3 reserved words), which only sets the alignment here.
#[repr(C, align(16))]
struct Sigcontext {
    sc_regs: UserRegs,
    sc_fpregs: [u64; 64],
    fcsr: u32,
    reserved: [u32; 3],
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

const MC: usize = offset_of!(Ucontext, uc_mcontext);
const REGS: usize = MC + offset_of!(Sigcontext, sc_regs);

/// The registers' offsets in a signal handler's `ucontext_t`.
// Evaluated at compile time, where an overflow is an error.
#[allow(clippy::arithmetic_side_effects)]
pub const LAYOUT: UcontextLayout = UcontextLayout {
    pc: REGS + offset_of!(UserRegs, pc),
    sp: REGS + offset_of!(UserRegs, sp),
    fp: Some(REGS + offset_of!(UserRegs, s0)),
    lr: Some(REGS + offset_of!(UserRegs, ra)),
    trap_link: None,
};

// 40 bytes of header (flags, link, the 24-byte stack_t), the 128-byte mask area: 168,
// aligned up to 16: 176. `pc` is word 0 of the registers, `ra` (x1) word 1, `sp` (x2)
// word 2, `s0` (x8) word 8.
const _: () = assert!(offset_of!(Ucontext, uc_stack) == 16 && offset_of!(Ucontext, unused) == 48);
const _: () = assert!(MC == 176 && REGS == 176);
const _: () = assert!(LAYOUT.pc == 176 && LAYOUT.sp == 176 + 2 * 8);
const _: () = assert!(matches!(LAYOUT.lr, Some(184)) && matches!(LAYOUT.fp, Some(240)));
const _: () = assert!(core::mem::size_of::<UserRegs>() == 32 * 8);
