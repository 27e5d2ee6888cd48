//! Tests of the live part (run under `qemu-riscv64`).

extern crate std;

use super::*;
use crate::Riscv64;
use core::cell::Cell;
use klp_arch::{Live, StackBounds, StackMemory, UnwindError, trace_reliable};
use std::vec::Vec;

#[test]
fn capture_sees_this_stack() {
    let local = 0u64;
    let here = &local as *const u64 as u64;
    let r = capture();
    assert!(r.sp <= here && here - r.sp < 1 << 20, "{r:?} vs {here:#x}");
    let f = capture_sees_this_stack as *const () as u64;
    assert!(r.pc > f && r.pc - f < 4096, "{r:?} vs {f:#x}");
}

#[test]
fn the_coherence_call_is_accepted() {
    let buf = [0u32; 4];
    assert_eq!(klp_riscv64_sync_icache(buf.as_ptr() as usize, 16), 0);
}

#[test]
fn write_text_copies_and_syncs() {
    let mut buf = [0u8; 64];
    // SAFETY: `buf` is a writable local buffer that no thread executes (1, 2, 3).
    unsafe { write_text(buf.as_mut_ptr().wrapping_add(4), &[0x13, 0, 0, 0]) };
    assert_eq!(&buf[..9], &[0, 0, 0, 0, 0x13, 0, 0, 0, 0]);
}

#[test]
fn store_text_takes_aligned_words_only() {
    let mut buf = [0u32; 4];
    let p = buf.as_mut_ptr().cast::<u8>();
    // SAFETY: `buf` is a writable, aligned local that no thread executes (1–3).
    unsafe {
        assert!(Riscv64::store_text(p.wrapping_add(4), &[0x13, 0, 1, 0]));
        assert!(!Riscv64::store_text(p.wrapping_add(2), &[1, 2, 3, 4]));
        assert!(!Riscv64::store_text(p.wrapping_add(8), &[1, 2]));
        assert!(!Riscv64::store_text(
            p.wrapping_add(8),
            &[1, 2, 3, 4, 5, 6, 7, 8]
        ));
    }
    assert_eq!(buf, [0, 0x0001_0013, 0, 0]);
}

#[test]
fn read_stack_word_reads_one_word() {
    let w = [0x1122_3344_5566_7788u64, 9];
    // SAFETY: an aligned, readable local.
    let v = unsafe { Riscv64::read_stack_word(w.as_ptr() as u64) };
    assert_eq!(v, 0x1122_3344_5566_7788);
}

/// The halfwords of `f`, up to its first return (`ret` or `c.jr ra`), at most 128.
fn halves_of(f: u64) -> Vec<u16> {
    let mut out = Vec::new();
    for i in 0..128 {
        // SAFETY: `f` is a function of this program; its halfwords up to its return
        // are mapped text.
        let h = unsafe { core::ptr::read_volatile((f as *const u16).wrapping_add(i)) };
        out.push(h);
        let n = out.len();
        if h == 0x8082 || (n >= 2 && out[n - 2] == 0x8067 && h == 0) {
            break;
        }
    }
    out
}

/// Where the 32-bit instruction `w` starts in `code`, in halfwords.
fn find_word(code: &[u16], w: u32) -> Option<usize> {
    code.windows(2)
        .position(|p| p[0] == w as u16 && p[1] == (w >> 16) as u16)
}

/// The sync function executes `fence.i` (0x0000100f: MISC-MEM, funct3 001), then
/// `ecall` (0x00000073) with `a7` = 259 loaded before it.
#[test]
fn the_sync_function_fences_then_calls_the_kernel() {
    let code = halves_of(klp_riscv64_sync_icache as *const () as u64);
    let fence = find_word(&code, 0x0000_100f).expect("fence.i");
    let ecall = find_word(&code, 0x0000_0073).expect("ecall");
    assert!(fence < ecall, "{code:x?}");
    // li a7, 259 = addi a7, zero, 259: imm 0x103 << 20, rd 17 << 7 (0x880), 0x13.
    let li = find_word(&code, 0x1030_0893).expect("li a7, 259");
    assert!(li < ecall, "{code:x?}");
}

/// A stack as the live memory between `low` and `high`, walks ending at `end`.
struct LiveStack {
    bounds: StackBounds,
    text: (u64, u64),
}

impl StackMemory for LiveStack {
    fn bounds(&self) -> StackBounds {
        self.bounds
    }

    fn read_u64(&self, addr: u64) -> Option<u64> {
        if !self.bounds.contains(addr, 8) || !addr.is_multiple_of(8) {
            return None;
        }
        // SAFETY: inside the live stack range of this thread, which outlives the walk.
        Some(unsafe { Riscv64::read_stack_word(addr) })
    }

    fn is_text(&self, addr: u64) -> bool {
        addr >= self.text.0 && addr < self.text.1
    }
}

std::thread_local! {
    /// What [`walk_from`] found: the frame, the trace's entries and its result.
    static WALK: Cell<(u64, [u64; 4], Result<usize, UnwindError>)> =
        const { Cell::new((0, [0; 4], Ok(0))) };
}

/// Walks this thread's stack with the crate's unwinder from `(pc, sp, fp)`, up to
/// `frame` ([`entry_frame`]'s argument).
extern "C" fn walk_from(frame: u64, pc: u64, sp: u64, fp: u64) {
    let anchor = walk_from as *const () as u64;
    let mem = LiveStack {
        bounds: StackBounds {
            low: sp,
            high: frame + 64,
            end: frame,
        },
        text: (anchor.saturating_sub(64 << 20), anchor + (64 << 20)),
    };
    let start = UnwindStart { pc, sp, fp };
    let r = trace_reliable::<Riscv64>(&mem, &start);
    let mut got = [0u64; 4];
    let r = r.map(|t| {
        for (g, e) in got.iter_mut().zip(t.as_slice()) {
            *g = *e;
        }
        t.as_slice().len()
    });
    WALK.with(|w| w.set((frame, got, r)));
}

/// The function `entry_frame` calls: builds a frame record the way gcc's prologue
/// does, then walks from there.
#[unsafe(naked)]
extern "C" fn walked(_arg: *mut c_void, _frame: *mut c_void) -> *mut c_void {
    core::arch::naked_asm!(
        "addi sp, sp, -32",
        "sd ra, 24(sp)",
        "sd s0, 16(sp)",
        "addi s0, sp, 32",
        "sd a1, 8(sp)",
        "mv a0, a1",
        "auipc a1, 0",
        "mv a2, sp",
        "mv a3, s0",
        "call {walk}",
        "ld a0, 8(sp)",
        "ld ra, 24(sp)",
        "ld s0, 16(sp)",
        "addi sp, sp, 32",
        "ret",
        walk = sym walk_from,
    )
}

/// The frame `entry_frame` passes is where a reliable walk from its callee ends: the
/// walk reports the callee's pc and the return into `entry_frame`, then stops.
#[test]
fn the_entry_frame_ends_a_reliable_walk() {
    let arg = 0x55usize as *mut c_void;
    // SAFETY: `walked` takes any argument and the frame, and does not unwind.
    let r = unsafe { entry_frame(walked, arg) };
    let (frame, got, res) = WALK.with(Cell::get);
    assert_eq!(r as u64, frame, "the frame is returned");
    assert_eq!(frame % 16, 0);
    assert_eq!(res, Ok(2), "{got:x?}");
    let w = walked as *const () as u64;
    assert!(got[0] > w && got[0] < w + 64, "{got:x?}");
    let e = entry_frame as *const () as u64;
    assert!(got[1] > e && got[1] < e + 64, "{got:x?} vs {e:#x}");
    let here = capture();
    assert!(
        frame >= here.sp && frame - here.sp < 4096,
        "{frame:#x} vs {here:?}"
    );
}

// ------------------------------------------------------------ the signal frame

/// glibc's `struct sigaction` on riscv64 (the generic layout: handler, the 1024-bit
/// mask, flags, restorer).
#[repr(C)]
struct SigAction {
    handler: usize,
    mask: [u64; 16],
    flags: i32,
    restorer: usize,
}

unsafe extern "C" {
    fn sigaction(sig: i32, act: *const SigAction, old: *mut SigAction) -> i32;
}

const SIGTRAP: i32 = 5;
const SA_SIGINFO: i32 = 4;

/// The registers the handler read from the kernel's frame: pc, sp, fp, lr.
static TRAPPED: [core::sync::atomic::AtomicU64; 4] =
    [const { core::sync::atomic::AtomicU64::new(0) }; 4];

/// Reads the interrupted registers through [`crate::sigframe::LAYOUT`] and resumes
/// past the `ebreak`.
extern "C" fn on_trap(_sig: i32, _info: *mut c_void, uc: *mut c_void) {
    // SAFETY: the kernel's `ucontext_t` of this running `SA_SIGINFO` handler.
    let r = unsafe { klp_arch::live::regs_from_ucontext::<Riscv64>(uc) };
    for (s, v) in TRAPPED.iter().zip([r.pc, r.sp, r.fp, r.lr]) {
        s.store(v, core::sync::atomic::Ordering::Relaxed);
    }
    // SAFETY: the live frame of this handler; the 4-byte `ebreak` is followed by the
    // rest of `trap_here`.
    unsafe { klp_arch::live::set_pc_in_ucontext::<Riscv64>(uc, r.pc + 4) };
}

/// Executes an `ebreak` with `ra` = `ra`, `s0` = `fp`; returns its `sp` there.
#[unsafe(naked)]
extern "C" fn trap_here(_ra: u64, _fp: u64) -> u64 {
    core::arch::naked_asm!(
        "addi sp, sp, -32",
        "sd ra, 24(sp)",
        "sd s0, 16(sp)",
        "mv ra, a0",
        "mv s0, a1",
        "mv a0, sp",
        ".option push",
        ".option norvc",
        "ebreak",
        ".option pop",
        "ld ra, 24(sp)",
        "ld s0, 16(sp)",
        "addi sp, sp, 32",
        "ret",
    )
}

/// The kernel's signal frame (here QEMU's, which builds the kernel's layout) has pc,
/// sp, `s0` and `ra` where [`crate::sigframe::LAYOUT`] says, and a pc written there is
/// where the thread resumes.
#[test]
fn the_signal_frame_has_the_registers_where_the_layout_says() {
    let act = SigAction {
        handler: on_trap as *const () as usize,
        mask: [0; 16],
        flags: SA_SIGINFO,
        restorer: 0,
    };
    let mut old = SigAction {
        handler: 0,
        mask: [0; 16],
        flags: 0,
        restorer: 0,
    };
    // SAFETY: a valid action with an `SA_SIGINFO` handler of the right signature.
    assert_eq!(unsafe { sigaction(SIGTRAP, &act, &mut old) }, 0);
    let sp = trap_here(0x7070_7070, 0x5050_5050);
    // SAFETY: restores the previous action.
    let back = unsafe { sigaction(SIGTRAP, &old, core::ptr::null_mut()) };
    assert_eq!(back, 0);
    let got: Vec<u64> = TRAPPED
        .iter()
        .map(|s| s.load(core::sync::atomic::Ordering::Relaxed))
        .collect();
    let f = trap_here as *const () as u64;
    assert!(got[0] > f && got[0] < f + 32, "{got:x?} vs {f:#x}");
    // SAFETY: the trapping instruction is text of this program.
    let insn = unsafe { core::ptr::read_unaligned(got[0] as *const u32) };
    assert_eq!(insn, 0x0010_0073, "ebreak at the pc");
    assert_eq!(got[1..], [sp, 0x5050_5050, 0x7070_7070], "sp, fp, lr");
}
