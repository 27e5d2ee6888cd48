//! Where a Linux signal frame keeps the registers on s390x: the kernel's
//! `struct ucontext` (`arch/s390/include/uapi/asm/ucontext.h`: the machine context
//! `_sigregs` comes before the mask) and `_sigregs`
//! (`arch/s390/include/uapi/asm/sigcontext.h`: the PSW, then `gprs[16]`), mirrored
//! up to the registers. ABI.

use core::mem::offset_of;

use klp_arch::UcontextLayout;
use klp_arch::live::SigStack;

/// `_psw_t`.
#[repr(C)]
struct Psw {
    mask: u64,
    addr: u64,
}

/// `_sigregs`, up to the general registers.
#[repr(C)]
struct Sigregs {
    psw: Psw,
    gprs: [u64; 16],
}

/// `struct ucontext`, up to the registers.
#[repr(C)]
struct Ucontext {
    uc_flags: u64,
    uc_link: u64,
    uc_stack: SigStack,
    uc_mcontext: Sigregs,
}

#[allow(clippy::arithmetic_side_effects)]
const MC: usize = offset_of!(Ucontext, uc_mcontext);
#[allow(clippy::arithmetic_side_effects)]
const GPRS: usize = MC + offset_of!(Sigregs, gprs);

/// The registers' offsets in a signal handler's `ucontext_t`: the PSW address, `r15`
/// (stack pointer), `r14` (return address of a call); no frame pointer.
// Const arithmetic: an overflow would fail the build, not wrap at run time.
#[allow(clippy::arithmetic_side_effects)]
pub const LAYOUT: UcontextLayout = UcontextLayout {
    pc: MC + offset_of!(Sigregs, psw) + offset_of!(Psw, addr),
    sp: GPRS + 15 * 8,
    fp: None,
    lr: Some(GPRS + 14 * 8),
    trap_link: Some(GPRS),
};

const _: () = assert!(MC == 40 && LAYOUT.pc == 48 && GPRS == 56);
