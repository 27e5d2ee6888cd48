//! What only runs on x86_64: register capture and text writes.
//!
//! x86 instruction fetch is coherent with stores, so [`sync_icache`] has nothing to do
//! on the writing CPU ([`crate::X86_64`]'s `CACHE_SYNC` is empty). Another CPU that may
//! run the modified bytes must execute a serialising instruction first; the host does
//! that (the kernel's `text_poke_sync`).

use core::arch::asm;

pub mod fast;
pub mod trampoline;
pub use trampoline::{entry_trampoline, write_site};

use core::ffi::c_void;

use klp_arch::live::{EntryFn, EntryFrameFn};
use klp_arch::{Live, UcontextLayout, UnwindStart};

/// The caller's own registers: the address of this call, `rsp` and `rbp`.
#[inline(always)]
pub fn capture() -> UnwindStart {
    let (pc, sp, fp): (u64, u64, u64);
    // SAFETY: the asm only copies registers into outputs; it touches no memory and no
    // flags, and leaves the stack unchanged.
    unsafe {
        asm!(
            "lea {pc}, [rip]",
            "mov {sp}, rsp",
            "mov {fp}, rbp",
            pc = out(reg) pc,
            sp = out(reg) sp,
            fp = out(reg) fp,
            options(nomem, nostack, preserves_flags),
        );
    }
    UnwindStart { pc, sp, fp }
}

/// Makes `len` bytes at `addr` ready to execute after a write: nothing on x86_64
/// beyond a compiler fence.
pub fn sync_icache(_addr: *const u8, _len: usize) {
    core::sync::atomic::compiler_fence(core::sync::atomic::Ordering::SeqCst);
}

/// Writes `bytes` to text at `dst` and makes them ready to execute.
///
/// # Safety
///
/// 1. `dst..dst + bytes.len()` is valid for writes (the host made the text writable).
/// 2. No thread executes those bytes while they are written, or the write follows
///    the cross-modification protocol of the host (one aligned store of a whole
///    instruction, or a breakpoint first).
/// 3. Text writes are serialised by the caller (one writer at a time).
pub unsafe fn write_text(dst: *mut u8, bytes: &[u8]) {
    // SAFETY: conditions 1–3 of this function cover the destination; `bytes` is a
    // valid slice that cannot overlap text being written under condition 2.
    unsafe { core::ptr::copy_nonoverlapping(bytes.as_ptr(), dst, bytes.len()) };
    sync_icache(dst, bytes.len());
}

/// Calls `f(arg, frame)` from a frame built in assembly, where `frame` is the address
/// a reliable walk of this thread's stack ends at (the frame record its `rbp` points to).
///
/// # Safety
///
/// 1. `f` may be called with `arg` and the frame address.
/// 2. `f` does not unwind (it is `extern "C"`; a panic aborts).
#[unsafe(naked)]
pub unsafe extern "C" fn entry_frame(f: EntryFn, arg: *mut c_void) -> *mut c_void {
    core::arch::naked_asm!(
        "push rbp",
        "mov rbp, rsp",
        "mov rax, rdi",
        "mov rdi, rsi",
        "mov rsi, rbp",
        "call rax",
        "pop rbp",
        "ret",
    )
}

/// The wrapper of `klp_user::patchable!` on x86_64: the 5-byte nop site, then a tail
/// jump to the body.
#[doc(hidden)]
#[macro_export]
macro_rules! patchable_wrapper {
    ($(#[$m:meta])* $vis:vis fn $name:ident($($arg:ident : $ty:ty),*) $(-> $ret:ty)?) => {
        $(#[$m])*
        #[unsafe(no_mangle)]
        #[unsafe(naked)]
        $vis extern "C" fn $name($($arg: $ty),*) $(-> $ret)? {
            ::core::arch::naked_asm!(
                ".byte 0x0f, 0x1f, 0x44, 0x00, 0x00",
                "jmp {body}",
                body = sym $name::body,
            )
        }
    };
}

impl Live for crate::X86_64 {
    const UCONTEXT: Option<UcontextLayout> = Some(crate::sigframe::LAYOUT);
    const HAS_LINK_REGISTER: bool = false;
    const USER_STACK_WALKABLE: bool = true;
    const ENTRY_FRAME: EntryFrameFn = entry_frame;

    #[inline(always)]
    fn capture() -> UnwindStart {
        capture()
    }

    fn trampoline() -> u64 {
        trampoline::address()
    }

    unsafe fn write_text(dst: *mut u8, bytes: &[u8]) {
        // SAFETY: the trait's conditions are this function's.
        unsafe { write_text(dst, bytes) }
    }

    fn sync_icache(addr: *const u8, len: usize) {
        sync_icache(addr, len)
    }

    unsafe fn store_text(dst: *mut u8, bytes: &[u8]) -> bool {
        match bytes {
            [] => false,
            [b] => {
                // SAFETY: `dst` is mapped and writable (1); a one-byte store is
                // single-copy atomic; writes are serialised by the caller (3).
                let a = unsafe { &*(dst as *const core::sync::atomic::AtomicU8) };
                a.store(*b, core::sync::atomic::Ordering::SeqCst);
                sync_icache(dst, 1);
                true
            }
            // SAFETY: the word around the bytes is mapped and writable (the host makes
            // whole pages writable) and only this writer writes it (1, 3).
            _ if unsafe { write_site(dst, bytes) } => true,
            // The middle of a breakpoint-protocol write: no thread executes these
            // bytes (they are behind the `int3`, condition 2).
            _ => {
                // SAFETY: conditions 1–3 are `write_text`'s.
                unsafe { write_text(dst, bytes) };
                true
            }
        }
    }

    fn set_decision(f: extern "C" fn(u64) -> u64) {
        trampoline::set_decision(f);
    }

    fn fast_entry() -> Option<u64> {
        fast::enabled().then_some(fast::fast_entry as *const () as u64)
    }

    fn thread_pointer() -> Option<u64> {
        Some(fast::thread_pointer())
    }

    fn enable_fast_path(tls_offset: u64) -> bool {
        fast::enable(tls_offset);
        true
    }

    unsafe fn read_stack_word(addr: u64) -> u64 {
        let v: u64;
        // SAFETY: one 8-byte load of readable, aligned memory (condition 1); no stack
        // use, no flags changed.
        unsafe {
            asm!(
                "mov {v}, qword ptr [{a}]",
                a = in(reg) addr,
                v = lateout(reg) v,
                options(nostack, preserves_flags, readonly),
            );
        }
        v
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn capture_sees_this_stack() {
        let local = 0u64;
        let here = &local as *const u64 as u64;
        let r = capture();
        assert!(r.sp <= here && here - r.sp < 1 << 20, "{r:?} vs {here:#x}");
        let f = capture_sees_this_stack as *const () as u64;
        assert!(r.pc >= f && r.pc - f < 4096, "{r:?} vs fn at {f:#x}");
    }

    #[test]
    fn write_text_copies() {
        let mut buf = [0u8; 8];
        // SAFETY: `buf` is a writable local buffer no other thread sees (1, 2, 3).
        unsafe { write_text(buf.as_mut_ptr().wrapping_add(2), &[0xe9, 1, 2, 3, 4]) };
        assert_eq!(buf, [0, 0, 0xe9, 1, 2, 3, 4, 0]);
    }
}
