//! The fast entry path of a host (`Live::fast_entry`): the redirect decision taken in
//! a few instructions from the calling thread's record and the site's slot, laid out
//! as `klp_arch::live::fast` says, without saving an argument register or calling
//! anything; anything unusual goes on to the entry trampoline.

use core::sync::atomic::{AtomicU64, Ordering};

use klp_arch::live::fast;

/// The offset of the host's thread-local record pointer from the thread pointer, the
/// same in every thread; 0 while the fast path is off.
pub static TLS_OFF: AtomicU64 = AtomicU64::new(0);

const _: () = assert!(fast::SLOW == u64::MAX && fast::STATE_MASK == 3);

/// The thread pointer: the self-reference at `fs:0` (the TCB's first word, set by the
/// C library for every thread).
pub fn thread_pointer() -> u64 {
    let tp: u64;
    // SAFETY: reads `fs:0`, which the C library sets up for every thread before it
    // runs any code; no memory is written, no flags changed.
    unsafe {
        core::arch::asm!("mov {}, qword ptr fs:[0]", out(reg) tp, options(nostack, readonly, preserves_flags));
    }
    tp
}

/// Turns the fast path on (see [`TLS_OFF`]).
pub fn enable(tls_offset: u64) {
    TLS_OFF.store(tls_offset, Ordering::Release);
}

/// Whether the fast path is on.
pub fn enabled() -> bool {
    TLS_OFF.load(Ordering::Acquire) != 0
}

/// The fast entry path: a site's stub jumps here instead of to the trampoline, and
/// the decision is taken from the slot's precomputed answers without saving any
/// argument register or calling anything.
///
/// # Register contract
///
/// **On entry** (the site jumped to the stub, the stub set `r11` and jumped here):
/// `r11` = the site's slot (`klp_arch::live::fast`); everything else as at the function's entry
/// (`[rsp]` = the caller's return address, arguments in `rdi`, `rsi`, `rdx`, `rcx`,
/// `r8`, `r9`, `rax`, `r10`, `xmm0`–`xmm7` and on the stack).
///
/// **Inside**: `rax` and `r10` are pushed and used (the thread's record, its state,
/// the slot's sequence); the thread's `in_decide` counter is raised while the slot is
/// read (`wait_deciders` sees it), with a plain `inc`/`dec` of its own word (atomic
/// with respect to its own signal handlers).
///
/// **On exit**, `rax`, `r10` and `rsp` are back at their entry values and
/// * the chosen implementation is entered with `jmp r11` (`site + 5` for the
///   original), exactly as a direct call would have entered it; or
/// * when the fast path cannot decide (the thread has no record or klp-user's TLS is
///   not at a fixed offset, the slot is being written or changed meanwhile, or its
///   answer is `SLOW`), the entry trampoline is entered with `r11` = the
///   site, its own entry contract ([`super::trampoline`]), and takes the full decision.
///
/// Clobbered: `r11` and the flags, as by the trampoline.
///
/// # Safety
///
/// Only to be reached through a site's stub made for the fast path (the entry state
/// above, `r11` the address of a live slot of the host); never called from Rust.
#[unsafe(naked)]
pub unsafe extern "C" fn fast_entry() {
    core::arch::naked_asm!(
        "push rax",
        "push r10",
        "mov r10, qword ptr [rip + {tls_off}]",
        "test r10, r10",
        "jz 3f",
        "mov r10, qword ptr fs:[r10]",
        "test r10, r10",
        "jz 3f",
        "inc dword ptr [r10 + {in_decide}]",
        "movzx eax, byte ptr [r10 + {state}]",
        "and eax, {mask}",
        "mov r10, qword ptr [r11 + {seq}]",
        "test r10b, 1",
        "jnz 2f",
        "mov rax, qword ptr [r11 + {by_state} + rax * 8]",
        "cmp r10, qword ptr [r11 + {seq}]",
        "jne 2f",
        "cmp rax, -1",
        "je 2f",
        "test rax, rax",
        "jnz 1f",
        "mov rax, qword ptr [r11 + {site}]",
        "add rax, {site_len}",
        "1:",
        "mov r11, rax",
        "mov r10, qword ptr [rip + {tls_off}]",
        "mov r10, qword ptr fs:[r10]",
        "dec dword ptr [r10 + {in_decide}]",
        "pop r10",
        "pop rax",
        "jmp r11",
        // The full decision, with the mark to drop first.
        "2:",
        "mov r10, qword ptr [rip + {tls_off}]",
        "mov r10, qword ptr fs:[r10]",
        "dec dword ptr [r10 + {in_decide}]",
        "3:",
        "pop r10",
        "pop rax",
        "mov r11, qword ptr [r11 + {site}]",
        "jmp {trampoline}",
        tls_off = sym TLS_OFF,
        in_decide = const fast::TASK_IN_DECIDE,
        state = const fast::TASK_STATE,
        mask = const fast::STATE_MASK,
        seq = const fast::SLOT_SEQ,
        by_state = const fast::SLOT_BY_STATE,
        site = const fast::SLOT_SITE,
        site_len = const crate::patching::SITE_LEN,
        trampoline = sym super::trampoline::entry_trampoline,
    )
}
