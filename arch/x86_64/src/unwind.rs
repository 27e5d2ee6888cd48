//! x86_64 reliable walk over frame pointers.
//!
//! Frame record at `rbp`: `[rbp]` = caller's `rbp`, `[rbp + 8]` = return address.
//! The kernel's entry code marks a register frame by storing its address with bit 0
//! set in `rbp` (`ENCODE_FRAME_POINTER`).
//!
//! The walk reports `start.pc`, then each frame's return address, and
//! * **succeeds** when `rbp` reaches [`StackBounds::end`](klp_arch::StackBounds) (the
//!   task's last frame: for the kernel, two words below the `pt_regs` at the top of
//!   the stack, see [`kernel_stack_end`]), or reaches a *user-mode* register frame;
//! * **fails** on a kernel-mode register frame (an interrupt or exception: the frame
//!   pointer unwinder cannot know whether the interrupted code had set up its frame),
//!   a frame off the stack or misaligned, a chain that does not go up, a return
//!   address that is zero, unknown or the trampoline, or a full buffer.

use core::mem::{offset_of, size_of};

use klp_arch::model::HandStack;
use klp_arch::{StackMemory, TraceSink, UnwindError, UnwindStart, check};

/// The kernel's `struct pt_regs` on x86_64, as the walker reads it.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
#[allow(missing_docs)]
pub struct PtRegs {
    pub r15: u64,
    pub r14: u64,
    pub r13: u64,
    pub r12: u64,
    pub bp: u64,
    pub bx: u64,
    pub r11: u64,
    pub r10: u64,
    pub r9: u64,
    pub r8: u64,
    pub ax: u64,
    pub cx: u64,
    pub dx: u64,
    pub si: u64,
    pub di: u64,
    pub orig_ax: u64,
    pub ip: u64,
    pub cs: u64,
    pub flags: u64,
    pub sp: u64,
    pub ss: u64,
}

/// Size of [`PtRegs`].
pub const PT_REGS_SIZE: u64 = size_of::<PtRegs>() as u64;
/// Offset of `cs` in [`PtRegs`] (its low two bits are the privilege level).
pub const PT_REGS_CS: u64 = offset_of!(PtRegs, cs) as u64;
/// Offset of `ip` in [`PtRegs`].
pub const PT_REGS_IP: u64 = offset_of!(PtRegs, ip) as u64;
const _: () = assert!(PT_REGS_SIZE == 21 * 8 && PT_REGS_CS == 17 * 8 && PT_REGS_IP == 16 * 8);

/// Size and alignment of a frame record.
pub const FRAME_SIZE: u64 = 16;

/// The kernel's last frame of a task whose stack is `[_, high)`: the `pt_regs` sits at
/// the top and the entry code's frame record two words below it.
pub const fn kernel_stack_end(high: u64) -> u64 {
    high.wrapping_sub(PT_REGS_SIZE).wrapping_sub(FRAME_SIZE)
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
    let mut bp = start.fp;
    loop {
        if bp == end {
            return Ok(n);
        }
        if bp & 1 == 1 {
            let regs = bp & !1;
            check::frame(mem, regs, PT_REGS_SIZE, 8)?;
            let cs = check::word_at(mem, regs, PT_REGS_CS)?;
            if cs & 3 == 3 {
                return Ok(n);
            }
            return Err(UnwindError::ExceptionFrame { frame: regs });
        }
        if bp == 0 {
            return Err(UnwindError::UnexpectedEnd { frame: bp });
        }
        check::frame(mem, bp, FRAME_SIZE, 8)?;
        let next = check::word(mem, bp)?;
        let ret = check::word_at(mem, bp, 8)?;
        check::report(mem, sink, ret)?;
        n = n.checked_add(1).ok_or(UnwindError::BufferFull)?;
        if next == 0 {
            return Err(UnwindError::UnexpectedEnd { frame: bp });
        }
        check::progress(bp, next & !1)?;
        bp = next;
    }
}

/// Lays out a frame-pointer stack whose reliable trace is `trace` (see
/// `Arch::model_stack`): frame records 32 bytes apart below the last frame.
pub fn model_stack(mem: &mut HandStack, trace: &[u64]) -> Option<UnwindStart> {
    let (&pc, rets) = trace.split_first()?;
    let end = kernel_stack_end(mem.high());
    mem.set_end(end);
    let k = u64::try_from(rets.len()).ok()?;
    let lowest = end.checked_sub(k.checked_mul(0x20)?)?;
    if lowest < mem.bounds().low.checked_add(0x20)? {
        return None;
    }
    // Frame j (1 = innermost) at end - 0x20 * (k + 1 - j), returning to rets[j - 1].
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
        sp: lowest.checked_sub(8)?,
        fp: lowest,
    })
}

/// Whether the bytes `before` (ending at a candidate return address) end with a call
/// (see `Arch::follows_call`):
/// * `call rel32`: `e8` and four displacement bytes;
/// * `call r/m64` (`ff /2`) and `call m16:64` (`ff /3`) in every ModRM/SIB/displacement
///   form, 2 to 7 bytes from the `ff` (`ff d0+r`, `ff 14 24`, `ff 50+r d8`,
///   `ff 15 rel32`, `ff 90+r d32`, `ff 94 sib d32`, …), whatever prefixes (REX,
///   `notrack`, segment) stand before the `ff`: they do not change where the
///   instruction ends.
///
/// x86 code cannot be decoded backwards: these bytes may as well be the tail of a
/// longer instruction. A false positive only keeps a stale code pointer in a trace
/// (the check is stricter than it needs to be); a missed call form would drop a real
/// return address (the check could pass wrongly), so every form that can end at the
/// address is accepted.
pub fn follows_call(before: &[u8]) -> bool {
    let n = before.len();
    if n.checked_sub(5).and_then(|p| before.get(p)) == Some(&0xe8) {
        return true;
    }
    // `ff` followed by a ModRM (with SIB and displacement) of exactly `len - 1` bytes.
    (2..=7).any(|len| {
        let Some(p) = n.checked_sub(len) else {
            return false;
        };
        let Some([0xff, operand @ ..]) = before.get(p..) else {
            return false;
        };
        let Some(&modrm) = operand.first() else {
            return false;
        };
        let reg = (modrm >> 3) & 7;
        let md = modrm >> 6;
        // `/2` in every form; `/3` (far call) only has memory forms.
        if !(reg == 2 || (reg == 3 && md != 3)) {
            return false;
        }
        modrm_len(modrm, operand.get(1).copied()) == Some(operand.len())
    })
}

/// Length of a ModRM operand (ModRM, SIB, displacement) in 64-bit mode; `None` when
/// a SIB byte is needed but absent.
fn modrm_len(modrm: u8, sib: Option<u8>) -> Option<usize> {
    let md = modrm >> 6;
    let rm = modrm & 7;
    Some(match (md, rm) {
        (3, _) => 1,
        (0, 5) => 5,
        (0, 4) => {
            if sib? & 7 == 5 {
                6
            } else {
                2
            }
        }
        (0, _) => 1,
        (1, 4) => 3,
        (1, _) => 2,
        (2, 4) => 6,
        _ => 5,
    })
}

#[cfg(test)]
mod follows_call_tests {
    use super::follows_call;

    /// `bytes` as the code before an address, with unrelated bytes ahead of it.
    fn after(bytes: &[u8]) -> bool {
        let mut v = [0x90u8; 8].to_vec();
        v.extend_from_slice(bytes);
        let tail = &v[v.len() - 8..];
        follows_call(tail) && follows_call(bytes)
    }

    #[test]
    fn direct_and_indirect_calls() {
        let calls: &[&[u8]] = &[
            &[0xe8, 0x10, 0x20, 0x30, 0x40],                   // call rel32
            &[0xe8, 0xf0, 0xff, 0xff, 0xff],                   // call rel32, backwards
            &[0xff, 0xd0],                                     // call *%rax
            &[0xff, 0xd7],                                     // call *%rdi
            &[0x41, 0xff, 0xd3],                               // call *%r11
            &[0xff, 0x10],                                     // call *(%rax)
            &[0x41, 0xff, 0x12],                               // call *(%r10)
            &[0xff, 0x14, 0x24],                               // call *(%rsp)
            &[0xff, 0x14, 0xc5, 0x00, 0x10, 0x00, 0x00],       // call *0x1000(,%rax,8)
            &[0xff, 0x50, 0x18],                               // call *0x18(%rax)
            &[0x41, 0xff, 0x54, 0x24, 0x08],                   // call *0x8(%r12)
            &[0xff, 0x15, 0x00, 0x10, 0x20, 0x00],             // call *rel32(%rip)
            &[0x3e, 0xff, 0x15, 0x00, 0x10, 0x20, 0x00],       // notrack call *rel32(%rip)
            &[0xff, 0x90, 0x00, 0x01, 0x00, 0x00],             // call *0x100(%rax)
            &[0x41, 0xff, 0x94, 0x24, 0x00, 0x01, 0x00, 0x00], // call *0x100(%r12)
            &[0xff, 0x18],                                     // lcall *(%rax)
        ];
        for c in calls {
            assert!(after(c), "{c:02x?}");
        }
    }

    #[test]
    fn other_code_is_no_call() {
        let others: &[&[u8]] = &[
            &[],
            &[0xe8],                                           // too short for a call
            &[0x10, 0x20, 0xe8, 0x30, 0x40],                   // e8 not 5 from the end
            &[0x5d, 0xc3],                                     // pop %rbp; ret
            &[0xc3, 0xcc, 0xcc, 0xcc],                         // ret; int3 padding
            &[0xc3, 0x66, 0x0f, 0x1f, 0x44, 0x00, 0x00],       // ret; nopw
            &[0x0f, 0x1f, 0x80, 0x00, 0x00, 0x00, 0x00],       // nopl 0x0(%rax)
            &[0x66, 0x0f, 0x1f, 0x84, 0x00, 0x00, 0x00, 0x00], // nopw 0x0(%rax,%rax,1)
            &[0xe9, 0x10, 0x20, 0x30, 0x40],                   // jmp rel32 (a tail call)
            &[0xff, 0xe0],                                     // jmp *%rax
            &[0xff, 0x25, 0x00, 0x10, 0x20, 0x00],             // jmp *rel32(%rip) (PLT)
            &[0xff, 0xc0],                                     // inc %eax
            &[0xff, 0xd8],                                     // ff /3 register form: invalid
            &[0xff, 0x14],                                     // SIB missing
            &[0xff, 0x15, 0x00, 0x10],                         // disp32 cut short
            &[0x48, 0x89, 0xe5],                               // mov %rsp,%rbp
            &[0xf3, 0x0f, 0x1e, 0xfa],                         // endbr64
        ];
        for c in others {
            assert!(!follows_call(c), "{c:02x?}");
        }
        // The ModRM/SIB length must match exactly: `ff 50` wants one more byte.
        assert!(!follows_call(&[0x00, 0xff, 0x50]));
        assert!(follows_call(&[0x00, 0xff, 0x50, 0x08]));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::X86_64;
    use klp_arch::model::HandStack;
    use klp_arch::{UnwindStart, trace_reliable};

    const LOW: u64 = 0xffff_c900_0000_0000;
    const TEXT: u64 = 0xffff_ffff_8100_0000;

    /// A task stack: pt_regs at the top, the entry frame below it, and `depth`
    /// frames below that, each returning into `TEXT + 0x100 * i`.
    fn stack(depth: u64) -> (HandStack, UnwindStart) {
        let mut s = HandStack::new(LOW, TEXT..TEXT + 0x10_0000);
        let end = kernel_stack_end(s.high());
        s.set_end(end);
        let mut upper = end;
        for i in 1..=depth {
            let fp = end - 0x20 * i;
            assert!(s.set(fp, upper));
            assert!(s.set(fp + 8, TEXT + 0x100 * (depth - i + 1)));
            upper = fp;
        }
        let start = UnwindStart {
            pc: TEXT + 0x10,
            sp: upper - 8,
            fp: upper,
        };
        (s, start)
    }

    fn walk(s: &HandStack, st: &UnwindStart) -> Result<std::vec::Vec<u64>, UnwindError> {
        trace_reliable::<X86_64>(s, st).map(|t| t.as_slice().to_vec())
    }

    #[test]
    fn clean_walk_reaches_the_last_frame() {
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
    }

    #[test]
    fn user_mode_register_frame_ends_the_walk() {
        let (mut s, mut st) = stack(1);
        let regs = LOW + 0x800;
        s.set(regs + PT_REGS_CS, 0x33);
        let fp = regs - 0x20;
        s.set(fp, regs | 1);
        s.set(fp + 8, TEXT + 0x500);
        st.fp = fp;
        assert_eq!(walk(&s, &st), Ok(std::vec![TEXT + 0x10, TEXT + 0x500]));
    }

    #[test]
    fn kernel_mode_register_frame_is_unreliable() {
        let (mut s, mut st) = stack(2);
        let regs = LOW + 0x800;
        s.set(regs + PT_REGS_CS, 0x10);
        let fp = regs - 0x20;
        s.set(fp, regs | 1);
        s.set(fp + 8, TEXT + 0x500);
        st.fp = fp;
        assert_eq!(
            walk(&s, &st),
            Err(UnwindError::ExceptionFrame { frame: regs })
        );
    }

    #[test]
    fn each_unreliable_reason() {
        let (s0, st0) = stack(3);
        let f1 = st0.fp;
        // Unknown return address.
        let mut s = s0.clone();
        s.set(f1 + 8, 0x1234);
        assert_eq!(
            walk(&s, &st0),
            Err(UnwindError::UnknownReturnAddress { addr: 0x1234 })
        );
        s.set(f1 + 8, 0);
        assert_eq!(
            walk(&s, &st0),
            Err(UnwindError::UnknownReturnAddress { addr: 0 })
        );
        // The start pc itself.
        let st = UnwindStart { pc: 7, ..st0 };
        assert_eq!(
            walk(&s0, &st),
            Err(UnwindError::UnknownReturnAddress { addr: 7 })
        );
        // Frame outside the stack.
        let mut s = s0.clone();
        s.set(f1, LOW + HandStack::SIZE + 0x100);
        assert_eq!(
            walk(&s, &st0),
            Err(UnwindError::FrameOutsideStack {
                frame: LOW + HandStack::SIZE + 0x100
            })
        );
        // No progress: a frame pointing at itself, and one pointing down.
        let mut s = s0.clone();
        s.set(f1, f1);
        assert_eq!(
            walk(&s, &st0),
            Err(UnwindError::NoProgress {
                frame: f1,
                next: f1
            })
        );
        s.set(f1, f1 - 0x20);
        assert!(matches!(
            walk(&s, &st0),
            Err(UnwindError::NoProgress { .. })
        ));
        // Misaligned.
        let mut s = s0.clone();
        s.set(f1, f1 + 0x44);
        assert_eq!(
            walk(&s, &st0),
            Err(UnwindError::Misaligned { frame: f1 + 0x44 })
        );
        // Chain ends (zero) before the last frame.
        let mut s = s0.clone();
        s.set(f1, 0);
        assert_eq!(
            walk(&s, &st0),
            Err(UnwindError::UnexpectedEnd { frame: f1 })
        );
        // The trampoline on the stack.
        let mut s = s0.clone();
        s.set_trampoline(TEXT + 0x200..TEXT + 0x280);
        assert_eq!(
            walk(&s, &st0),
            Err(UnwindError::Trampoline { addr: TEXT + 0x200 })
        );
    }

    #[test]
    fn hundred_frames_are_unreliable() {
        // start.pc + 98 frames = 99 entries: reliable; one more frame: buffer full.
        let (s, st) = stack(98);
        assert_eq!(walk(&s, &st).map(|t| t.len()), Ok(99));
        let (s, st) = stack(99);
        assert_eq!(walk(&s, &st), Err(UnwindError::BufferFull));
    }

    extern crate std;
}
