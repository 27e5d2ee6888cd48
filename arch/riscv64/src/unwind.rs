//! riscv64 reliable walk over frame records (code built with
//! `-fno-omit-frame-pointer`).
//!
//! gcc's prologue with a frame pointer is `addi sp, sp, -N; sd ra, N-8(sp);
//! sd s0, N-16(sp); addi s0, sp, N` (checked with gcc 12 at `-O2`): `s0` (the frame
//! pointer, `fp`) is the stack pointer the function was entered with, and its *frame
//! record* `{ fp, ra }` is the two words just below it: the return address at `fp - 8`,
//! the caller's frame pointer at `fp - 16`. This is the kernel's `struct stackframe`
//! at `(struct stackframe *)fp - 1` (`arch/riscv/kernel/stacktrace.c`).
//!
//! The kernel's entry code saves a `struct pt_regs` at the top of a task's stack and
//! calls the first C function with `sp` pointing at it, so that function's frame
//! pointer is the address of the `pt_regs`: [`kernel_stack_end`]. Its record holds the
//! user's `s0` and a return into the exception entry (`ret_from_exception`), and is
//! not read.
//!
//! Upstream riscv has no reliable walker (`HAVE_RELIABLE_STACKTRACE`); these criteria
//! carry the arm64 ones over to the riscv frame format. The walk reports `start.pc`,
//! then each record's `ra`, and
//! * **succeeds** when `fp` reaches [`StackBounds::end`](klp_arch::StackBounds);
//! * **fails** on a record off the stack or below the stack pointer (the kernel's
//!   `fp_is_valid`), a frame pointer that is not 16-byte aligned (the psABI keeps `sp`
//!   16-aligned and `fp` is an entry `sp`; the kernel only asks for 8), a record not
//!   strictly above the previous one, a saved `fp` of 0 before the end, an unknown or
//!   trampoline return address, a full buffer, and (with [`walk_with`]) a return into
//!   the exception entry code, where the interrupted function's pc is in the `pt_regs`
//!   and not in any record ([`UnwindError::ExceptionFrame`]).
//!
//! [`klp_arch::StackMemory`] cannot say which code is the exception entry, so the
//! walker of the [`Arch`](klp_arch::Arch) trait ([`walk`]) relies on the host: its
//! `is_text` must not count the exception entry (in the kernel `handle_exception` up
//! to `ret_from_exception_end`; in a process, the signal return trampoline of the
//! vDSO), or its `is_trampoline` must, so that such a frame fails as
//! [`UnwindError::UnknownReturnAddress`] or [`UnwindError::Trampoline`]. A walk that
//! starts in a function's site or prologue, before the record is written, misses the
//! caller (its return address is still in `ra`): a host that interrupts a thread there
//! adds `ra` itself.

use core::mem::{offset_of, size_of};
use core::ops::Range;

use klp_arch::model::HandStack;
use klp_arch::{StackMemory, TraceSink, UnwindError, UnwindStart, check};

/// The kernel's `struct pt_regs` on riscv64 (v6.12), as the walker sees it.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
#[allow(missing_docs)]
pub struct PtRegs {
    pub epc: u64,
    pub ra: u64,
    pub sp: u64,
    pub gp: u64,
    pub tp: u64,
    pub t0: u64,
    pub t1: u64,
    pub t2: u64,
    pub s0: u64,
    pub s1: u64,
    pub a: [u64; 8],
    pub s2_s11: [u64; 10],
    pub t3_t6: [u64; 4],
    pub status: u64,
    pub badaddr: u64,
    pub cause: u64,
    pub orig_a0: u64,
}

/// The stack's alignment (`STACK_ALIGN`).
pub const STACK_ALIGN: u64 = 16;
/// `PT_SIZE_ON_STACK`: [`PtRegs`] rounded up to the stack alignment.
pub const PT_SIZE_ON_STACK: u64 = (size_of::<PtRegs>() as u64).next_multiple_of(STACK_ALIGN);
/// Offset of the saved `s0` in [`PtRegs`].
pub const PT_S0: u64 = offset_of!(PtRegs, s0) as u64;
const _: () = assert!(size_of::<PtRegs>() == 288 && PT_SIZE_ON_STACK == 288 && PT_S0 == 64);

/// Size of a frame record.
pub const RECORD: u64 = 16;
/// Offset of the saved return address from the frame pointer: `fp - 8`.
pub const RA_BELOW_FP: u64 = 8;
/// Offset of the caller's frame pointer from the frame pointer: `fp - 16`.
pub const FP_BELOW_FP: u64 = 16;

/// The frame pointer of the outermost kernel frame of a task whose stack ends at
/// `high`: the address of the `pt_regs` at the top of the stack.
pub const fn kernel_stack_end(high: u64) -> u64 {
    high.wrapping_sub(PT_SIZE_ON_STACK)
}

/// The reliable walk (see the module docs), without exception-entry knowledge.
pub fn walk(
    mem: &dyn StackMemory,
    start: &UnwindStart,
    sink: &mut dyn TraceSink,
) -> Result<usize, UnwindError> {
    walk_with(mem, start, sink, 0..0)
}

/// The address of the record of the frame at `fp`, which must lie on the stack, at or
/// above `sp`, with `fp` 16-aligned.
fn record(mem: &dyn StackMemory, fp: u64, sp: u64) -> Result<u64, UnwindError> {
    let outside = UnwindError::FrameOutsideStack { frame: fp };
    let rec = fp.checked_sub(RECORD).ok_or(outside)?;
    check::frame(mem, rec, RECORD, STACK_ALIGN).map_err(|e| match e {
        UnwindError::FrameOutsideStack { .. } => outside,
        UnwindError::Misaligned { .. } => UnwindError::Misaligned { frame: fp },
        e => e,
    })?;
    if rec < sp {
        return Err(outside);
    }
    Ok(rec)
}

/// The reliable walk; a return address in `exception_entry` is an exception boundary.
pub fn walk_with(
    mem: &dyn StackMemory,
    start: &UnwindStart,
    sink: &mut dyn TraceSink,
    exception_entry: Range<u64>,
) -> Result<usize, UnwindError> {
    let end = mem.bounds().end;
    check::report(mem, sink, start.pc)?;
    let mut n = 1usize;
    let (mut fp, mut sp) = (start.fp, start.sp);
    loop {
        if fp == end {
            return Ok(n);
        }
        let rec = record(mem, fp, sp)?;
        let next = check::word_at(mem, rec, RECORD - FP_BELOW_FP)?;
        let ra = check::word_at(mem, rec, RECORD - RA_BELOW_FP)?;
        if exception_entry.contains(&ra) {
            return Err(UnwindError::ExceptionFrame { frame: fp });
        }
        check::report(mem, sink, ra)?;
        n = n.checked_add(1).ok_or(UnwindError::BufferFull)?;
        if next == 0 {
            return Err(UnwindError::UnexpectedEnd { frame: fp });
        }
        check::progress(fp, next)?;
        sp = fp;
        fp = next;
    }
}

/// Lays out a frame-record stack whose reliable trace is `trace` (see
/// `Arch::model_stack`): frames 32 bytes apart below [`kernel_stack_end`].
pub fn model_stack(mem: &mut HandStack, trace: &[u64]) -> Option<UnwindStart> {
    let (&pc, rets) = trace.split_first()?;
    let end = kernel_stack_end(mem.high());
    mem.set_end(end);
    let k = u64::try_from(rets.len()).ok()?;
    let lowest = end.checked_sub(k.checked_mul(0x20)?)?;
    let sp = lowest.checked_sub(0x20)?;
    if sp < mem.bounds().low {
        return None;
    }
    // Frame j (0 = innermost) at lowest + 0x20 * j, returning to rets[j].
    let mut fp = lowest;
    for &ret in rets {
        let up = fp.checked_add(0x20)?;
        if !(mem.set(fp.checked_sub(FP_BELOW_FP)?, up)
            && mem.set(fp.checked_sub(RA_BELOW_FP)?, ret))
        {
            return None;
        }
        fp = up;
    }
    Some(UnwindStart { pc, sp, fp: lowest })
}

/// Whether the bytes `before` (ending at a candidate return address) end with a call
/// (see `Arch::follows_call`): the last word is `jal rd, …` or `jalr rd, …` with a link
/// register `rd` other than `zero` (the psABI uses `ra`, and `t0` for millicode and the
/// patch site; any other is accepted too), or the last halfword is `c.jalr rs1`
/// (`1001 rs1 00000 10`, `rs1` ≠ 0; `c.jal` is RV32 only).
///
/// Errs on the side of `true`: the decoder cannot know whether the last four bytes
/// start an instruction.
pub fn follows_call(before: &[u8]) -> bool {
    let le = klp_arch::Endian::Little;
    let half = before
        .len()
        .checked_sub(2)
        .and_then(|at| klp_arch::read_u16(before, at, le));
    if let Some(h) = half
        && h & 0xf07f == 0x9002
        && (h >> 7) & 0x1f != 0
    {
        return true;
    }
    let word = before
        .len()
        .checked_sub(4)
        .and_then(|at| klp_arch::read_u32(before, at, le));
    let Some(w) = word else {
        return false;
    };
    let linked = crate::insn::rd(w) != 0;
    match crate::insn::opcode(w) {
        crate::insn::op::JAL => linked,
        crate::insn::op::JALR => linked && (w >> 12) & 7 == 0,
        _ => false,
    }
}

#[cfg(test)]
mod follows_call_tests {
    use super::follows_call;

    fn after_word(w: u32) -> bool {
        let mut b = [0u8; 8];
        b[..4].copy_from_slice(&0x0000_0013u32.to_le_bytes());
        b[4..].copy_from_slice(&w.to_le_bytes());
        follows_call(&b) && follows_call(&b[4..])
    }

    fn after_half(h: u16) -> bool {
        let mut b = [0u8; 6];
        b[..4].copy_from_slice(&0x0000_0013u32.to_le_bytes());
        b[4..].copy_from_slice(&h.to_le_bytes());
        follows_call(&b) && follows_call(&b[4..])
    }

    #[test]
    fn calls() {
        for w in [
            0x0000_80e7, // jalr ra, 0(ra) (the second half of `call`)
            0x0000_00ef, // jal ra, .
            0x7fff_f0ef, // jal ra, forwards
            0x0002_82e7, // jalr t0, 0(t0) (a site's call)
            0x0007_80e7, // jalr ra, 0(a5) (an indirect call)
            0x0000_02ef, // jal t0, . (millicode -msave-restore)
        ] {
            assert!(after_word(w), "{w:#010x}");
        }
        for h in [
            0x9782, // c.jalr a5
            0x9082, // c.jalr ra
        ] {
            assert!(after_half(h), "{h:#06x}");
        }
    }

    #[test]
    fn other_code_is_no_call() {
        for w in [
            0x0000_8067, // ret (jalr zero, 0(ra))
            0x0000_006f, // j . (a tail call)
            0x0003_0067, // jr t1 (tail through the PLT or a stub)
            0x0000_0013, // nop
            0x0000_0297, // auipc t0, 0
            0x0000_90e7, // funct3 001: not a jalr
        ] {
            assert!(!after_word(w), "{w:#010x}");
        }
        for h in [
            0x8082u16, // c.jr ra (ret)
            0x9002,    // c.ebreak
            0x0001,    // c.nop
        ] {
            assert!(!follows_call(&h.to_le_bytes()), "{h:#06x}");
        }
        assert!(!follows_call(&[]));
        assert!(!follows_call(&[0xe7]));
        // Three bytes of a jalr are no call.
        assert!(!follows_call(&0x0000_80e7u32.to_le_bytes()[1..]));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Riscv64;
    use klp_arch::model::HandStack;
    use klp_arch::trace_reliable;

    extern crate std;
    use std::vec::Vec;

    const LOW: u64 = 0xffff_ffc6_0000_0000;
    const TEXT: u64 = 0xffff_ffff_8000_0000;

    /// `depth` frames below the end of the stack, the innermost first.
    fn stack(depth: u64) -> (HandStack, UnwindStart) {
        let mut s = HandStack::new(LOW, TEXT..TEXT + 0x10_0000);
        let end = kernel_stack_end(s.high());
        s.set_end(end);
        let mut upper = end;
        for i in 1..=depth {
            let fp = end - 0x20 * i;
            assert!(s.set(fp - 16, upper));
            assert!(s.set(fp - 8, TEXT + 0x100 * (depth - i + 1)));
            upper = fp;
        }
        let start = UnwindStart {
            pc: TEXT + 0x10,
            sp: upper - 0x20,
            fp: upper,
        };
        (s, start)
    }

    fn walk(s: &HandStack, st: &UnwindStart) -> Result<Vec<u64>, UnwindError> {
        trace_reliable::<Riscv64>(s, st).map(|t| t.as_slice().to_vec())
    }

    #[test]
    fn the_end_of_the_stack() {
        let high = LOW + HandStack::SIZE;
        assert_eq!(kernel_stack_end(high), high - 288);
    }

    #[test]
    fn clean_walk() {
        let (s, st) = stack(3);
        assert_eq!(
            walk(&s, &st),
            Ok(std::vec![
                TEXT + 0x10,
                TEXT + 0x100,
                TEXT + 0x200,
                TEXT + 0x300
            ])
        );
        let (s, st) = stack(0);
        assert_eq!(walk(&s, &st), Ok(std::vec![TEXT + 0x10]));
    }

    #[test]
    fn each_unreliable_reason() {
        let (s0, st0) = stack(3);
        let f1 = st0.fp;
        let f2 = f1 + 0x20;
        let mut s = s0.clone();
        s.set(f1 - 8, TEXT - 4);
        assert_eq!(
            walk(&s, &st0),
            Err(UnwindError::UnknownReturnAddress { addr: TEXT - 4 })
        );
        let mut s = s0.clone();
        s.set(f1 - 8, 0);
        assert_eq!(
            walk(&s, &st0),
            Err(UnwindError::UnknownReturnAddress { addr: 0 })
        );
        let mut s = s0.clone();
        s.set(f1 - 16, f1 - 0x20);
        assert_eq!(
            walk(&s, &st0),
            Err(UnwindError::NoProgress {
                frame: f1,
                next: f1 - 0x20
            })
        );
        let mut s = s0.clone();
        s.set(f1 - 16, f1);
        assert_eq!(
            walk(&s, &st0),
            Err(UnwindError::NoProgress {
                frame: f1,
                next: f1
            })
        );
        let mut s = s0.clone();
        s.set(f1 - 16, LOW + HandStack::SIZE + 0x20);
        assert_eq!(
            walk(&s, &st0),
            Err(UnwindError::FrameOutsideStack {
                frame: LOW + HandStack::SIZE + 0x20
            })
        );
        let mut s = s0.clone();
        s.set(f1 - 16, f2 + 8);
        assert_eq!(
            walk(&s, &st0),
            Err(UnwindError::Misaligned { frame: f2 + 8 })
        );
        let mut s = s0.clone();
        s.set(f1 - 16, 0);
        assert_eq!(
            walk(&s, &st0),
            Err(UnwindError::UnexpectedEnd { frame: f1 })
        );
        let mut s = s0.clone();
        s.set_trampoline(TEXT + 0x300..TEXT + 0x301);
        assert_eq!(
            walk(&s, &st0),
            Err(UnwindError::Trampoline { addr: TEXT + 0x300 })
        );
        // The start: off the stack, below its stack pointer, at an unknown pc.
        let st = UnwindStart { fp: LOW, ..st0 };
        assert_eq!(
            walk(&s0, &st),
            Err(UnwindError::FrameOutsideStack { frame: LOW })
        );
        let st = UnwindStart { sp: f1, ..st0 };
        assert_eq!(
            walk(&s0, &st),
            Err(UnwindError::FrameOutsideStack { frame: f1 })
        );
        let st = UnwindStart {
            fp: u64::MAX,
            ..st0
        };
        assert!(matches!(
            walk(&s0, &st),
            Err(UnwindError::FrameOutsideStack { .. })
        ));
        let st = UnwindStart { fp: 8, ..st0 };
        assert_eq!(
            walk(&s0, &st),
            Err(UnwindError::FrameOutsideStack { frame: 8 })
        );
        let st = UnwindStart { pc: 0, ..st0 };
        assert_eq!(
            walk(&s0, &st),
            Err(UnwindError::UnknownReturnAddress { addr: 0 })
        );
    }

    #[test]
    fn exception_boundary() {
        let (s, st) = stack(3);
        let entry = TEXT + 0x200..TEXT + 0x240;
        let mut t = klp_arch::Trace::new();
        assert_eq!(
            walk_with(&s, &st, &mut t, entry),
            Err(UnwindError::ExceptionFrame {
                frame: st.fp + 0x20
            })
        );
        assert_eq!(t.as_slice(), &[TEXT + 0x10, TEXT + 0x100]);
        let mut t = klp_arch::Trace::new();
        assert_eq!(
            walk_with(&s, &st, &mut t, TEXT + 0x400..TEXT + 0x500),
            Ok(4)
        );
    }

    #[test]
    fn hundred_frames_are_unreliable() {
        let (s, st) = stack(98);
        assert_eq!(walk(&s, &st).map(|t| t.len()), Ok(99));
        let (s, st) = stack(99);
        assert_eq!(walk(&s, &st), Err(UnwindError::BufferFull));
    }

    #[test]
    fn model_stacks() {
        let mut s = HandStack::new(LOW, TEXT..TEXT + 0x10_0000);
        let trace = [TEXT + 4, TEXT + 0x44, TEXT + 0x84];
        let st = model_stack(&mut s, &trace).unwrap();
        assert_eq!(walk(&s, &st), Ok(trace.to_vec()));
        assert_eq!(s.bounds().end, kernel_stack_end(s.high()));
        assert!(model_stack(&mut s, &[]).is_none());
        // 119 frames of 32 bytes (and the innermost one's sp) do not fit below the
        // pt_regs of a 4 KiB stack.
        let long = [TEXT + 4; 120];
        assert!(model_stack(&mut s, &long).is_none());
    }
}
