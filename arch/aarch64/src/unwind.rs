//! aarch64 reliable walk over frame records.
//!
//! A frame record at `x29` is `{ fp, lr }`. The kernel ends every task stack with a
//! *metadata* record inside its `pt_regs` (`{ 0, 0 }` followed by a type word): type
//! `FINAL` for the outermost record (entry from EL0, task start), type `PT_REGS` for
//! an exception boundary.
//!
//! The walk reports `start.pc`, then each record's `lr`, and
//! * **succeeds** when `fp` reaches [`StackBounds::end`](klp_arch::StackBounds) (the
//!   final record; for the kernel see [`kernel_stack_end`]);
//! * **fails** on a `PT_REGS` metadata record (an exception boundary: whether `lr` was
//!   live is unknown), any other metadata record not at the end, a record off the
//!   stack, misaligned or not strictly above the previous one, an unknown or
//!   trampoline return address, or a full buffer.

use core::mem::{offset_of, size_of};

use klp_arch::model::HandStack;
use klp_arch::{StackMemory, TraceSink, UnwindError, UnwindStart, check};

/// The kernel's `struct frame_record_meta`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct FrameRecordMeta {
    /// Always 0 in a metadata record.
    pub fp: u64,
    /// Always 0 in a metadata record.
    pub lr: u64,
    /// [`FRAME_META_TYPE_FINAL`] or [`FRAME_META_TYPE_PT_REGS`].
    pub kind: u64,
}

/// The kernel's `struct pt_regs` on arm64 (v6.13+ layout), as the walker sees it.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
#[allow(missing_docs)]
pub struct PtRegs {
    pub regs: [u64; 31],
    pub sp: u64,
    pub pc: u64,
    pub pstate: u64,
    pub orig_x0: u64,
    pub syscallno: i32,
    pub pmr: u32,
    pub sdei_ttbr1: u64,
    pub stackframe: FrameRecordMeta,
    pub lockdep_hardirqs: u64,
    pub exit_rcu: u64,
}

/// Offset of the metadata record in [`PtRegs`].
pub const PT_REGS_STACKFRAME: u64 = offset_of!(PtRegs, stackframe) as u64;
/// Size of [`PtRegs`].
pub const PT_REGS_SIZE: u64 = size_of::<PtRegs>() as u64;
/// Offset of the type word in a metadata record.
pub const META_KIND: u64 = offset_of!(FrameRecordMeta, kind) as u64;
const _: () = assert!(PT_REGS_STACKFRAME == 296 && PT_REGS_SIZE == 336 && META_KIND == 16);

/// Metadata type of the outermost record.
pub const FRAME_META_TYPE_FINAL: u64 = 1;
/// Metadata type of an exception boundary.
pub const FRAME_META_TYPE_PT_REGS: u64 = 2;

/// The kernel's final record of a task whose stack ends at `high`: the metadata record
/// of the `pt_regs` at the top of the stack.
pub const fn kernel_stack_end(high: u64) -> u64 {
    high.wrapping_sub(PT_REGS_SIZE)
        .wrapping_add(PT_REGS_STACKFRAME)
}

/// The reliable walk (see the module docs).
pub fn walk(
    mem: &dyn StackMemory,
    start: &UnwindStart,
    sink: &mut dyn TraceSink,
) -> Result<usize, UnwindError> {
    let end = mem.bounds().end;
    check::report(mem, sink, start.pc)?;
    let mut n = 1;
    let mut fp = start.fp;
    loop {
        if fp == end {
            return Ok(n);
        }
        check::frame(mem, fp, 16, 8)?;
        let next = check::word(mem, fp)?;
        let lr = check::word_at(mem, fp, 8)?;
        if next == 0 && lr == 0 {
            let kind = check::word_at(mem, fp, META_KIND)?;
            return Err(if kind == FRAME_META_TYPE_PT_REGS {
                UnwindError::ExceptionFrame { frame: fp }
            } else {
                UnwindError::UnexpectedEnd { frame: fp }
            });
        }
        check::report(mem, sink, lr)?;
        n = n.checked_add(1).ok_or(UnwindError::BufferFull)?;
        check::progress(fp, next)?;
        fp = next;
    }
}

/// Lays out a frame-record stack whose reliable trace is `trace` (see
/// `Arch::model_stack`): records 32 bytes apart below the final record.
pub fn model_stack(mem: &mut HandStack, trace: &[u64]) -> Option<UnwindStart> {
    let (&pc, rets) = trace.split_first()?;
    let end = kernel_stack_end(mem.high());
    mem.set_end(end);
    if !(mem.set(end, 0)
        && mem.set(end.checked_add(8)?, 0)
        && mem.set(end.checked_add(META_KIND)?, FRAME_META_TYPE_FINAL))
    {
        return None;
    }
    let k = u64::try_from(rets.len()).ok()?;
    let lowest = end.checked_sub(k.checked_mul(0x20)?)?;
    if lowest < mem.bounds().low.checked_add(0x20)? {
        return None;
    }
    // Record j (1 = innermost) at end - 0x20 * (k + 1 - j), returning to rets[j - 1].
    let mut fp = lowest;
    for &ret in rets {
        let up = fp.checked_add(0x20)?;
        if !(mem.set(fp, up) && mem.set(fp.checked_add(8)?, ret)) {
            return None;
        }
        fp = up;
    }
    Some(UnwindStart {
        pc,
        sp: lowest.checked_sub(0x10)?,
        fp: lowest,
    })
}

/// Whether the bytes `before` (ending at a candidate return address) end with a call
/// (see `Arch::follows_call`): the last aligned word is `bl` (`0x94000000`, mask
/// `0xfc000000`), `blr xN` (`0xd63f0000`, mask `0xfffffc1f`) or one of the
/// pointer-authentication calls `blraa`/`blrab`/`blraaz`/`blrabz` (`0xd63f0800` /
/// `0xd73f0800`, mask `0xfefff800`: the Z/M bits and both registers free).
///
/// Errs on the side of `true` (a false positive keeps a stale pointer, a false negative
/// could drop a return address): the pointer-auth forms are matched with their
/// register fields unchecked.
pub fn follows_call(before: &[u8]) -> bool {
    let Some(at) = before.len().checked_sub(4) else {
        return false;
    };
    let Some(w) = klp_arch::read_u32(before, at, klp_arch::Endian::Little) else {
        return false;
    };
    w & 0xfc00_0000 == 0x9400_0000
        || w & 0xffff_fc1f == 0xd63f_0000
        || w & 0xfeff_f800 == 0xd63f_0800
}

#[cfg(test)]
mod follows_call_tests {
    use super::follows_call;

    fn ends_with(w: u32) -> bool {
        let mut b = [0u8; 8];
        b[..4].copy_from_slice(&0xd503_201fu32.to_le_bytes());
        b[4..].copy_from_slice(&w.to_le_bytes());
        follows_call(&b) && follows_call(&b[4..])
    }

    #[test]
    fn calls() {
        for w in [
            0x9400_0000, // bl .
            0x97ff_fff0, // bl backwards
            0x9400_1234, // bl forwards
            0xd63f_0000, // blr x0
            0xd63f_0100, // blr x8
            0xd63f_0220, // blr x17
            0xd63f_081f, // blraaz x0
            0xd63f_0e1f, // blrabz x16
            0xd73f_0a30, // blraa x17, x16
            0xd73f_0d1f, // blrab x8, sp
        ] {
            assert!(ends_with(w), "{w:#010x}");
        }
    }

    #[test]
    fn other_code_is_no_call() {
        for w in [
            0xd65f_03c0, // ret
            0xd503_201f, // nop (padding)
            0xd503_233f, // paciasp
            0xd503_245f, // bti c
            0xa9bf_7bfd, // stp x29, x30, [sp, #-16]!
            0x1400_0010, // b (a tail call)
            0xd61f_0200, // br x16
            0xd71f_0a30, // braa x17, x16
            0xd65f_0bff, // retaa
            0x0000_0000, // udf
        ] {
            assert!(!ends_with(w), "{w:#010x}");
        }
        assert!(!follows_call(&[]));
        // Three bytes cannot hold a call; the last four bytes count, not the first.
        assert!(!follows_call(&0x9400_0000u32.to_le_bytes()[1..]));
        let mut b = [0u8; 8];
        b[..4].copy_from_slice(&0x9400_0000u32.to_le_bytes());
        b[4..].copy_from_slice(&0xd65f_03c0u32.to_le_bytes());
        assert!(!follows_call(&b));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Aarch64;
    use klp_arch::model::HandStack;
    use klp_arch::trace_reliable;

    const LOW: u64 = 0xffff_8000_8400_0000;
    const TEXT: u64 = 0xffff_8000_8010_0000;

    /// The final record at the top, `depth` records below it.
    fn stack(depth: u64) -> (HandStack, UnwindStart) {
        let mut s = HandStack::new(LOW, TEXT..TEXT + 0x10_0000);
        let end = kernel_stack_end(s.high());
        s.set_end(end);
        assert!(s.set(end + META_KIND, FRAME_META_TYPE_FINAL));
        let mut upper = end;
        for i in 1..=depth {
            let fp = end - 0x20 * i;
            assert!(s.set(fp, upper));
            assert!(s.set(fp + 8, TEXT + 0x100 * (depth - i + 1)));
            upper = fp;
        }
        let start = UnwindStart {
            pc: TEXT + 0x10,
            sp: upper - 0x10,
            fp: upper,
        };
        (s, start)
    }

    fn walk(s: &HandStack, st: &UnwindStart) -> Result<std::vec::Vec<u64>, UnwindError> {
        trace_reliable::<Aarch64>(s, st).map(|t| t.as_slice().to_vec())
    }

    #[test]
    fn final_record_is_success() {
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
    fn exception_boundary_is_unreliable() {
        let (mut s, st) = stack(3);
        let f2 = st.fp + 0x20;
        // The middle record becomes a pt_regs metadata record.
        s.set(f2, 0);
        s.set(f2 + 8, 0);
        s.set(f2 + META_KIND, FRAME_META_TYPE_PT_REGS);
        assert_eq!(
            walk(&s, &st),
            Err(UnwindError::ExceptionFrame { frame: f2 })
        );
        // A final record that is not at the end of the stack.
        s.set(f2 + META_KIND, FRAME_META_TYPE_FINAL);
        assert_eq!(walk(&s, &st), Err(UnwindError::UnexpectedEnd { frame: f2 }));
        s.set(f2 + META_KIND, 77);
        assert_eq!(walk(&s, &st), Err(UnwindError::UnexpectedEnd { frame: f2 }));
    }

    #[test]
    fn each_unreliable_reason() {
        let (s0, st0) = stack(3);
        let f1 = st0.fp;
        let mut s = s0.clone();
        s.set(f1 + 8, TEXT - 4);
        assert_eq!(
            walk(&s, &st0),
            Err(UnwindError::UnknownReturnAddress { addr: TEXT - 4 })
        );
        let mut s = s0.clone();
        s.set(f1, LOW - 0x100);
        assert_eq!(
            walk(&s, &st0),
            Err(UnwindError::NoProgress {
                frame: f1,
                next: LOW - 0x100
            })
        );
        let mut s = s0.clone();
        s.set(f1, LOW + HandStack::SIZE);
        assert_eq!(
            walk(&s, &st0),
            Err(UnwindError::FrameOutsideStack {
                frame: LOW + HandStack::SIZE
            })
        );
        let mut s = s0.clone();
        s.set(f1, f1 + 0x24);
        assert_eq!(
            walk(&s, &st0),
            Err(UnwindError::Misaligned { frame: f1 + 0x24 })
        );
        let mut s = s0.clone();
        s.set_trampoline(TEXT + 0x300..TEXT + 0x301);
        assert_eq!(
            walk(&s, &st0),
            Err(UnwindError::Trampoline { addr: TEXT + 0x300 })
        );
        let st = UnwindStart {
            fp: LOW - 0x10,
            ..st0
        };
        assert_eq!(
            walk(&s0, &st),
            Err(UnwindError::FrameOutsideStack { frame: LOW - 0x10 })
        );
    }

    #[test]
    fn hundred_frames_are_unreliable() {
        let (s, st) = stack(98);
        assert_eq!(walk(&s, &st).map(|t| t.len()), Ok(99));
        let (s, st) = stack(99);
        assert_eq!(walk(&s, &st), Err(UnwindError::BufferFull));
    }

    extern crate std;
}
