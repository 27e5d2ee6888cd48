//! ppc64le reliable walk over the back chain.
//!
//! Every ELFv2 frame starts with the back chain (the caller's r1) at offset 0 and
//! has the LR save slot at offset 16, where the *callee* stores the return address
//! into the frame's owner. A register frame (interrupt, exception) is marked with
//! [`STACK_FRAME_REGS_MARKER`] at offset [`STACK_INT_FRAME_MARKER`].
//!
//! The walk, following the kernel's `arch_stack_walk_reliable`, reports `start.pc`,
//! then the saved LR of every frame but the first (the first frame's slot belongs to a
//! call that may be over), and
//! * **succeeds** when a back chain equals [`StackBounds::end`](klp_arch::StackBounds)
//!   exactly (the kernel's `stack_end`, see [`kernel_stack_end`]);
//! * **fails** when the start is outside `[low, end - STACK_FRAME_MIN_SIZE]`, a frame
//!   is not 16-byte aligned, the back chain does not strictly increase or goes past the
//!   end, a frame below the top carries the register-frame marker, a saved LR is not
//!   known code or is the trampoline, or the buffer is full.

use klp_arch::model::HandStack;
use klp_arch::{StackMemory, TraceSink, UnwindError, UnwindStart, check};

/// `STACK_FRAME_MIN_SIZE` (ELFv2): back chain, CR save, LR save, TOC save.
pub const STACK_FRAME_MIN_SIZE: u64 = 32;
/// Offset of the LR save slot.
pub const STACK_FRAME_LR_SAVE: u64 = 16;
/// Offset of the register-frame marker (`STACK_INT_FRAME_MARKER`).
pub const STACK_INT_FRAME_MARKER: u64 = STACK_FRAME_MIN_SIZE;
/// `STACK_FRAME_REGS_MARKER`: "regshere".
pub const STACK_FRAME_REGS_MARKER: u64 = 0x7265_6773_6865_7265;
/// `sizeof(struct pt_regs)` on ppc64 as modelled here.
pub const PT_REGS_SIZE: u64 = 384;
/// `STACK_INT_FRAME_SIZE`: a frame holding a register frame.
pub const STACK_INT_FRAME_SIZE: u64 = STACK_FRAME_MIN_SIZE + 16 + PT_REGS_SIZE;
const _: () = assert!(STACK_INT_FRAME_SIZE.is_multiple_of(16));

/// The kernel's `stack_end` of a (non-idle) task whose stack ends at `high`: the user
/// entry's register frame sits at the top.
pub const fn kernel_stack_end(high: u64) -> u64 {
    high.wrapping_sub(STACK_INT_FRAME_SIZE)
}

/// The reliable walk (see the module docs).
pub fn walk(
    mem: &dyn StackMemory,
    start: &UnwindStart,
    sink: &mut dyn TraceSink,
) -> Result<usize, UnwindError> {
    let b = mem.bounds();
    let end = b.end;
    let mut sp = start.sp;
    if sp < b.low || sp > end.saturating_sub(STACK_FRAME_MIN_SIZE) || !b.contains(end, 0) {
        return Err(UnwindError::FrameOutsideStack { frame: sp });
    }
    check::report(mem, sink, start.pc)?;
    let mut n: usize = 1;
    let mut first = true;
    loop {
        if !sp.is_multiple_of(16) {
            return Err(UnwindError::Misaligned { frame: sp });
        }
        let next = check::word(mem, sp)?;
        check::progress(sp, next)?;
        if next != end && next > end.saturating_sub(STACK_FRAME_MIN_SIZE) {
            return Err(UnwindError::FrameOutsideStack { frame: next });
        }
        if sp <= end.saturating_sub(STACK_INT_FRAME_SIZE)
            && check::word_at(mem, sp, STACK_INT_FRAME_MARKER)? == STACK_FRAME_REGS_MARKER
        {
            return Err(UnwindError::ExceptionFrame { frame: sp });
        }
        if !first {
            let ip = check::word_at(mem, sp, STACK_FRAME_LR_SAVE)?;
            check::report(mem, sink, ip)?;
            n = n.checked_add(1).ok_or(UnwindError::BufferFull)?;
        }
        first = false;
        if next == end {
            return Ok(n);
        }
        sp = next;
    }
}

/// Lays out a back-chain stack whose reliable trace is `trace` (see
/// `Arch::model_stack`): 32-byte frames below the kernel's `stack_end`; the innermost
/// frame's LR slot holds a stale value, as on a real stack.
pub fn model_stack(mem: &mut HandStack, trace: &[u64]) -> Option<UnwindStart> {
    let (&pc, rets) = trace.split_first()?;
    let end = kernel_stack_end(mem.high());
    mem.set_end(end);
    let k = u64::try_from(rets.len()).ok()?;
    // Frames 0 (innermost) ..= k; frame i's LR slot holds rets[i - 1].
    let lowest = end.checked_sub(k.checked_add(1)?.checked_mul(0x20)?)?;
    if lowest < mem.bounds().low {
        return None;
    }
    let mut sp = lowest;
    for lr in core::iter::once(0x57a1e).chain(rets.iter().copied()) {
        let up = sp.checked_add(0x20)?;
        if !(mem.set(sp, up) && mem.set(sp.checked_add(STACK_FRAME_LR_SAVE)?, lr)) {
            return None;
        }
        sp = up;
    }
    Some(UnwindStart {
        pc,
        sp: lowest,
        fp: lowest,
    })
}

/// Whether the bytes `before` (ending at a candidate return address) end with a call
/// (see `Arch::follows_call`): the last aligned word is a branch that sets the link
/// register: `bl`/`bla` (opcode 18 with LK = 1: `(w & 0xfc000001) == 0x48000001`),
/// `bcl` (opcode 16 with LK = 1), `bclrl`/`bcctrl`/`bctarl` (opcode 19, extended
/// opcode 16/528/560, LK = 1; `blrl` = `0x4e800021`, `bctrl` = `0x4e800421`).
///
/// A call through the PLT or to another TOC returns to the `nop`/`ld r2,24(r1)`
/// after its `bl`: the return address is right after the `bl` all the same. The
/// conditional and absolute forms are accepted although compilers rarely emit them
/// as calls (and `bcl 20,31,$+4` reads the pc without calling): a false positive only
/// keeps a stale pointer, a false negative could drop a return address.
pub fn follows_call(before: &[u8]) -> bool {
    let Some(at) = before.len().checked_sub(4) else {
        return false;
    };
    let Some(w) = klp_arch::read_u32(before, at, klp_arch::Endian::Little) else {
        return false;
    };
    if w & 1 == 0 {
        return false;
    }
    match w >> 26 {
        16 | 18 => true,
        19 => matches!((w >> 1) & 0x3ff, 16 | 528 | 560),
        _ => false,
    }
}

#[cfg(test)]
mod follows_call_tests {
    use super::follows_call;

    fn ends_with(w: u32) -> bool {
        let mut b = [0u8; 8];
        b[..4].copy_from_slice(&0x6000_0000u32.to_le_bytes());
        b[4..].copy_from_slice(&w.to_le_bytes());
        follows_call(&b) && follows_call(&b[4..])
    }

    #[test]
    fn calls() {
        for w in [
            0x4800_0001, // bl .
            0x4bff_ffe1, // bl backwards
            0x4800_1235, // bl forwards
            0x4800_0003, // bla
            0x4e80_0421, // bctrl
            0x4e80_0021, // blrl
            0x4e80_0461, // bctarl
            0x4182_0011, // beql (bcl, conditional)
            0x429f_0005, // bcl 20,31,$+4
            0x4d82_0421, // beqctrl
        ] {
            assert!(ends_with(w), "{w:#010x}");
        }
    }

    #[test]
    fn other_code_is_no_call() {
        for w in [
            0x4e80_0020, // blr (return)
            0x4e80_0420, // bctr (tail call through ctr)
            0x4800_0010, // b (a tail call)
            0x4182_0010, // beq
            0x6000_0000, // nop (padding, TOC-restore slot)
            0xe841_0018, // ld r2,24(r1)
            0x7c08_02a6, // mflr r0
            0xf821_ffe1, // stdu r1,-32(r1): odd, but not a branch
            0x3c4c_0002, // addis r2,r12,2 (global entry)
            0x4c00_012d, // isync with the low bit set (opcode 19, not a branch)
            0x0000_0000,
        ] {
            assert!(!ends_with(w), "{w:#010x}");
        }
        assert!(!follows_call(&[]));
        assert!(!follows_call(&0x4800_0001u32.to_le_bytes()[1..]));
        // The word right before counts, not one further back.
        let mut b = [0u8; 8];
        b[..4].copy_from_slice(&0x4800_0001u32.to_le_bytes());
        b[4..].copy_from_slice(&0x6000_0000u32.to_le_bytes());
        assert!(!follows_call(&b));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Ppc64le;
    use klp_arch::model::HandStack;
    use klp_arch::trace_reliable;

    const LOW: u64 = 0xc000_0000_0400_0000;
    const TEXT: u64 = 0xc000_0000_0010_0000;

    /// `depth` frames of 32 bytes below `end`, innermost at the returned sp. The LR
    /// slot of frame i (from the top) returns into the function owning it.
    fn stack(depth: u64) -> (HandStack, UnwindStart) {
        stack_spaced(depth, 0x20)
    }

    fn stack_spaced(depth: u64, gap: u64) -> (HandStack, UnwindStart) {
        let mut s = HandStack::new(LOW, TEXT..TEXT + 0x10_0000);
        let end = kernel_stack_end(s.high());
        s.set_end(end);
        let mut upper = end;
        for i in 1..=depth {
            let sp = end - gap * i;
            assert!(s.set(sp, upper));
            // Frame i's owner was called from the function of frame i-1, so its LR
            // slot holds the return address for entry number (depth - i).
            assert!(s.set(sp + STACK_FRAME_LR_SAVE, TEXT + 0x100 * (depth - i)));
            upper = sp;
        }
        // The innermost frame's slot is stale garbage: it must be ignored.
        s.set(upper + STACK_FRAME_LR_SAVE, 0xbad);
        (
            s,
            UnwindStart {
                pc: TEXT + 0x10,
                sp: upper,
                fp: 0,
            },
        )
    }

    fn walk(s: &HandStack, st: &UnwindStart) -> Result<std::vec::Vec<u64>, UnwindError> {
        trace_reliable::<Ppc64le>(s, st).map(|t| t.as_slice().to_vec())
    }

    #[test]
    fn clean_walk_ignores_the_first_lr() {
        let (s, st) = stack(4);
        assert_eq!(
            walk(&s, &st),
            Ok(std::vec![
                TEXT + 0x10,
                TEXT + 0x100,
                TEXT + 0x200,
                TEXT + 0x300
            ])
        );
        let (s, st) = stack(1);
        assert_eq!(walk(&s, &st), Ok(std::vec![TEXT + 0x10]));
    }

    #[test]
    fn each_unreliable_reason() {
        let (s0, st0) = stack(4);
        let f1 = st0.sp;
        let f2 = f1 + 0x20;
        // Saved LR not code.
        let mut s = s0.clone();
        s.set(f2 + STACK_FRAME_LR_SAVE, 0x42);
        assert_eq!(
            walk(&s, &st0),
            Err(UnwindError::UnknownReturnAddress { addr: 0x42 })
        );
        // Trampoline.
        let mut s = s0.clone();
        s.set_trampoline(TEXT + 0x100..TEXT + 0x180);
        assert_eq!(
            walk(&s, &st0),
            Err(UnwindError::Trampoline { addr: TEXT + 0x100 })
        );
        // Back chain not increasing.
        let mut s = s0.clone();
        s.set(f2, f2);
        assert_eq!(
            walk(&s, &st0),
            Err(UnwindError::NoProgress {
                frame: f2,
                next: f2
            })
        );
        s.set(f2, f1);
        assert_eq!(
            walk(&s, &st0),
            Err(UnwindError::NoProgress {
                frame: f2,
                next: f1
            })
        );
        // Back chain past the end (but not exactly the end).
        let end = s0.bounds().end;
        let mut s = s0.clone();
        s.set(f2, end + 0x10);
        assert_eq!(
            walk(&s, &st0),
            Err(UnwindError::FrameOutsideStack { frame: end + 0x10 })
        );
        // Misaligned frame.
        let mut s = s0.clone();
        s.set(f1, f2 + 8);
        assert_eq!(
            walk(&s, &st0),
            Err(UnwindError::Misaligned { frame: f2 + 8 })
        );
        // Exception frame in the middle (frames large enough to hold one).
        let (mut s, st) = stack_spaced(4, 0x200);
        let f2 = st.sp + 0x200;
        assert!(walk(&s, &st).is_ok());
        s.set(f2 + STACK_INT_FRAME_MARKER, STACK_FRAME_REGS_MARKER);
        assert_eq!(
            walk(&s, &st),
            Err(UnwindError::ExceptionFrame { frame: f2 })
        );
        // Start outside the allowed range.
        let st = UnwindStart {
            sp: LOW - 0x10,
            ..st0
        };
        assert_eq!(
            walk(&s0, &st),
            Err(UnwindError::FrameOutsideStack { frame: LOW - 0x10 })
        );
        let st = UnwindStart {
            sp: end - 0x10,
            ..st0
        };
        assert!(matches!(
            walk(&s0, &st),
            Err(UnwindError::FrameOutsideStack { .. })
        ));
    }

    #[test]
    fn register_frame_at_the_top_is_fine() {
        // The marker is only checked in frames with room for a register frame below the
        // end: the user-entry frame itself is not walked into.
        let (mut s, st) = stack(2);
        let end = s.bounds().end;
        s.set(end + STACK_INT_FRAME_MARKER, STACK_FRAME_REGS_MARKER);
        assert!(walk(&s, &st).is_ok());
    }

    #[test]
    fn hundred_frames_are_unreliable() {
        // start.pc + (depth - 1) saved LRs.
        let (s, st) = stack(99);
        assert_eq!(walk(&s, &st).map(|t| t.len()), Ok(99));
        let (s, st) = stack(100);
        assert_eq!(walk(&s, &st), Err(UnwindError::BufferFull));
    }

    extern crate std;
}
