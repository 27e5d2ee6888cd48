//! s390x reliable walk over the back chain.
//!
//! A frame (160 bytes, `STACK_FRAME_OVERHEAD`) starts with the back chain (the
//! caller's r15) and holds the register save area where a *callee* stores r6–r15; its
//! r14 slot ([`FRAME_R14`]) is the return address into the frame's owner. A zero back
//! chain means a register frame (`pt_regs`) follows the frame.
//!
//! The walk, following the kernel's unwinder and `arch_stack_walk_reliable`, reports
//! `start.pc`, then for each back-chain step the r14 slot of the *next* frame, and
//! * **succeeds** when the frame is [`StackBounds::end`](klp_arch::StackBounds) (the
//!   task's last frame, see [`kernel_stack_end`]) or when a zero back chain is followed
//!   by a *user-mode* register frame (the normal bottom of a user task's stack);
//! * **fails** when a zero back chain is followed by a kernel-mode register frame
//!   (interrupt or exception), a frame is off the stack, not 8-byte aligned or not
//!   above the previous one, a return address is zero, unknown or the trampoline, or
//!   the buffer is full.

use core::mem::{offset_of, size_of};

use klp_arch::model::HandStack;
use klp_arch::{StackMemory, TraceSink, UnwindError, UnwindStart, check};

/// `STACK_FRAME_OVERHEAD`: the size of a standard frame.
pub const STACK_FRAME_OVERHEAD: u64 = 160;
/// Offset of the saved r14 in a frame (`gprs[8]`, r6 being `gprs[0]` at 48).
pub const FRAME_R14: u64 = 48 + 8 * 8;

/// The s390x PSW.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct Psw {
    /// PSW mask; [`PSW_MASK_PSTATE`] set means problem state (user mode).
    pub mask: u64,
    /// Instruction address.
    pub addr: u64,
}

/// The head of the kernel's `struct pt_regs` on s390x.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct PtRegs {
    /// `args[0]`.
    pub args: [u64; 1],
    /// The interrupted PSW.
    pub psw: Psw,
    /// r0–r15.
    pub gprs: [u64; 16],
}

/// Offset of the PSW mask in [`PtRegs`].
pub const PT_REGS_PSW_MASK: u64 = (offset_of!(PtRegs, psw) + offset_of!(Psw, mask)) as u64;
/// Size of the part of [`PtRegs`] the walker reads.
pub const PT_REGS_HEAD: u64 = size_of::<PtRegs>() as u64;
const _: () = assert!(PT_REGS_PSW_MASK == 8 && PT_REGS_HEAD == 152);

/// Problem-state bit of the PSW mask.
pub const PSW_MASK_PSTATE: u64 = 0x0001_0000_0000_0000;

/// Size of the full kernel `pt_regs` (with the fields the walker does not read).
pub const PT_REGS_SIZE: u64 = 200;

/// The kernel's last frame of a task whose stack ends at `high`: the frame just below
/// the user entry's `pt_regs` at the top.
pub const fn kernel_stack_end(high: u64) -> u64 {
    high.wrapping_sub(PT_REGS_SIZE)
        .wrapping_sub(STACK_FRAME_OVERHEAD)
}

/// The reliable walk (see the module docs).
pub fn walk(
    mem: &dyn StackMemory,
    start: &UnwindStart,
    sink: &mut dyn TraceSink,
) -> Result<usize, UnwindError> {
    let end = mem.bounds().end;
    let mut sp = start.sp;
    check::frame(mem, sp, STACK_FRAME_OVERHEAD, 8)?;
    check::report(mem, sink, start.pc)?;
    let mut n = 1;
    loop {
        if sp == end {
            return Ok(n);
        }
        let chain = check::word(mem, sp)?;
        if chain == 0 {
            let regs = sp
                .checked_add(STACK_FRAME_OVERHEAD)
                .ok_or(UnwindError::FrameOutsideStack { frame: sp })?;
            check::frame(mem, regs, PT_REGS_HEAD, 8)?;
            let mask = check::word_at(mem, regs, PT_REGS_PSW_MASK)?;
            if mask & PSW_MASK_PSTATE != 0 {
                return Ok(n);
            }
            return Err(UnwindError::ExceptionFrame { frame: regs });
        }
        check::progress(sp, chain)?;
        check::frame(mem, chain, STACK_FRAME_OVERHEAD, 8)?;
        let ip = check::word_at(mem, chain, FRAME_R14)?;
        check::report(mem, sink, ip)?;
        n = n.checked_add(1).ok_or(UnwindError::BufferFull)?;
        sp = chain;
    }
}

/// Lays out a back-chain stack whose reliable trace is `trace` (see
/// `Arch::model_stack`): frames 32 bytes apart below the last frame (real frames are
/// at least 160 bytes; the walker reads only the back chain and the r14 slot).
pub fn model_stack(mem: &mut HandStack, trace: &[u64]) -> Option<UnwindStart> {
    let (&pc, rets) = trace.split_first()?;
    let end = kernel_stack_end(mem.high());
    mem.set_end(end);
    let k = u64::try_from(rets.len()).ok()?;
    // Frames 0 (innermost) ..= k, frame k being `end`; frame i's r14 slot holds
    // rets[i - 1], the return into its owner (frame 0's holds a stale value).
    let lowest = end.checked_sub(k.checked_mul(0x20)?)?;
    if lowest < mem.bounds().low {
        return None;
    }
    let mut sp = lowest;
    if !mem.set(sp.checked_add(FRAME_R14)?, 0x57a1e) {
        return None;
    }
    for &r14 in rets {
        let up = sp.checked_add(0x20)?;
        if !(mem.set(sp, up) && mem.set(up.checked_add(FRAME_R14)?, r14)) {
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
/// (see `Arch::follows_call`), big-endian, with any registers:
/// * `brasl r1,ri4`: 6 bytes, `c0 r5 ii ii ii ii` (also the redirect's
///   `brasl %r0,entry_trampoline`);
/// * `bras r1,ri2`: 4 bytes, `a7 r5 ii ii`; `bas r1,d2(x2,b2)`: 4 bytes, `4d …`;
///   `bal`: 4 bytes, `45 …`;
/// * `basr r1,r2`: 2 bytes, `0d r1r2`; `balr`: `05 r1r2`; `bassm`: `0c r1r2`.
///
/// s390x code cannot be decoded backwards either: the bytes may be the tail of a
/// longer instruction. A false positive only keeps a stale pointer in a trace, a false
/// negative could drop a return address, so every form that can end at the address
/// is accepted (`basr r1,0`, which only loads the address, too).
pub fn follows_call(before: &[u8]) -> bool {
    let n = before.len();
    let at = |back: usize| n.checked_sub(back).and_then(|i| before.get(i).copied());
    let brasl = at(6) == Some(0xc0) && at(5).is_some_and(|b| b & 0x0f == 0x05);
    let four = match at(4) {
        Some(0xa7) => at(3).is_some_and(|b| b & 0x0f == 0x05),
        Some(0x4d | 0x45) => true,
        _ => false,
    };
    let two = matches!(at(2), Some(0x0d | 0x05 | 0x0c));
    brasl || four || two
}

#[cfg(test)]
mod follows_call_tests {
    use super::follows_call;

    fn after(bytes: &[u8]) -> bool {
        let mut v = [0x07u8; 8].to_vec();
        v.extend_from_slice(bytes);
        follows_call(&v[v.len() - 8..]) && follows_call(bytes)
    }

    #[test]
    fn calls() {
        let calls: &[&[u8]] = &[
            &[0xc0, 0xe5, 0x00, 0x00, 0x01, 0x00], // brasl %r14,…
            &[0xc0, 0x05, 0xff, 0xff, 0xff, 0xf0], // brasl %r0,… (a redirected site)
            &[0xa7, 0xe5, 0x00, 0x10],             // bras %r14,…
            &[0x4d, 0xe0, 0xf0, 0x10],             // bas %r14,16(%r15)
            &[0x45, 0xe0, 0x10, 0x00],             // bal %r14,0(%r1)
            &[0x0d, 0xe1],                         // basr %r14,%r1
            &[0x05, 0xef],                         // balr %r14,%r15
            &[0x0c, 0xe1],                         // bassm %r14,%r1
        ];
        for c in calls {
            assert!(after(c), "{c:02x?}");
        }
    }

    #[test]
    fn other_code_is_no_call() {
        let others: &[&[u8]] = &[
            &[],
            &[0x0d],                                           // half an instruction
            &[0x07, 0xfe],                                     // br %r14
            &[0x07, 0xfe, 0x07, 0x07],                         // br %r14; nopr padding
            &[0xeb, 0x6f, 0xf0, 0xa0, 0x00, 0x04, 0x07, 0xfe], // lmg; br %r14
            &[0xc0, 0xf4, 0x00, 0x00, 0x01, 0x00],             // jg (a tail call)
            &[0xc0, 0x04, 0x00, 0x00, 0x00, 0x00],             // brcl 0 (an unpatched site)
            &[0xa7, 0xf4, 0x00, 0x10],                         // j
            &[0x47, 0x00, 0x00, 0x00],                         // nop
            &[0xb9, 0x04, 0x00, 0xef],                         // lgr %r14,%r15
            &[0xe3, 0xf0, 0xff, 0x60, 0xff, 0x71],             // lay %r15,-160(%r15)
        ];
        for c in others {
            assert!(!follows_call(c), "{c:02x?}");
        }
        // A call further back than the last instruction does not count.
        assert!(!follows_call(&[0x0d, 0xe1, 0x07, 0xfe]));
        assert!(!follows_call(&[0xa7, 0xe5, 0x00, 0x10, 0x07, 0xfe]));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::S390x;
    use klp_arch::model::HandStack;
    use klp_arch::trace_reliable;

    const LOW: u64 = 0x3ff_c000_0000;
    const TEXT: u64 = 0x10_0000;

    /// `depth` frames `gap` bytes apart below the last frame. Real frames are at least
    /// 160 bytes; the walker reads only the back chain and the r14 slot, so smaller
    /// gaps let 99 frames fit in the 4 KiB model stack.
    fn stack(depth: u64, gap: u64) -> (HandStack, UnwindStart) {
        let mut s = HandStack::new(LOW, TEXT..TEXT + 0x10_0000);
        let end = kernel_stack_end(s.high());
        s.set_end(end);
        let mut upper = end;
        for i in 1..=depth {
            let sp = end - gap * i;
            assert!(s.set(sp, upper));
            upper = sp;
        }
        // The r14 slot of frame k (k = 1 at the top) returns into its owner; the walk
        // reads it when stepping into frame k, so the innermost frame's is never read.
        for i in 0..depth {
            let frame = end - gap * i;
            s.set(frame + FRAME_R14, TEXT + 0x100 * (depth - i));
        }
        s.set(upper + FRAME_R14, 0xbad);
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
        trace_reliable::<S390x>(s, st).map(|t| t.as_slice().to_vec())
    }

    #[test]
    fn clean_walk() {
        let (s, st) = stack(3, 0xa0);
        assert_eq!(
            walk(&s, &st),
            Ok(std::vec![
                TEXT + 0x10,
                TEXT + 0x100,
                TEXT + 0x200,
                TEXT + 0x300
            ])
        );
    }

    #[test]
    fn user_regs_end_the_walk_and_kernel_regs_fail_it() {
        let (mut s, st) = stack(3, 0xa0);
        let f2 = st.sp + 0xa0;
        // Make frame 2 the bottom: zero back chain, user-mode pt_regs after it.
        s.set(f2, 0);
        s.set(
            f2 + STACK_FRAME_OVERHEAD + PT_REGS_PSW_MASK,
            0x0705_0001_8000_0000,
        );
        assert_eq!(walk(&s, &st), Ok(std::vec![TEXT + 0x10, TEXT + 0x100]));
        s.set(
            f2 + STACK_FRAME_OVERHEAD + PT_REGS_PSW_MASK,
            0x0404_c001_8000_0000,
        );
        assert_eq!(
            walk(&s, &st),
            Err(UnwindError::ExceptionFrame {
                frame: f2 + STACK_FRAME_OVERHEAD
            })
        );
    }

    #[test]
    fn each_unreliable_reason() {
        let (s0, st0) = stack(3, 0xa0);
        let f1 = st0.sp;
        let f2 = f1 + 0xa0;
        let mut s = s0.clone();
        s.set(f2 + FRAME_R14, 0);
        assert_eq!(
            walk(&s, &st0),
            Err(UnwindError::UnknownReturnAddress { addr: 0 })
        );
        let mut s = s0.clone();
        s.set_trampoline(TEXT + 0x200..TEXT + 0x208);
        assert_eq!(
            walk(&s, &st0),
            Err(UnwindError::Trampoline { addr: TEXT + 0x200 })
        );
        let mut s = s0.clone();
        s.set(f1, f1 - 0xa0);
        assert!(matches!(
            walk(&s, &st0),
            Err(UnwindError::NoProgress { .. })
        ));
        let mut s = s0.clone();
        s.set(f1, f1 + 0xa4);
        assert_eq!(
            walk(&s, &st0),
            Err(UnwindError::Misaligned { frame: f1 + 0xa4 })
        );
        let mut s = s0.clone();
        let high = s.high();
        s.set(f1, high - 8);
        assert_eq!(
            walk(&s, &st0),
            Err(UnwindError::FrameOutsideStack { frame: high - 8 })
        );
        let st = UnwindStart {
            sp: LOW - 0xa0,
            ..st0
        };
        assert!(matches!(
            walk(&s0, &st),
            Err(UnwindError::FrameOutsideStack { .. })
        ));
    }

    #[test]
    fn hundred_frames_are_unreliable() {
        let (s, st) = stack(98, 0x20);
        assert_eq!(walk(&s, &st).map(|t| t.len()), Ok(99));
        let (s, st) = stack(99, 0x20);
        assert_eq!(walk(&s, &st), Err(UnwindError::BufferFull));
    }

    extern crate std;
}
