//! ppc64le TOC and link register across a redirect: the kernel's livepatch stack.
//!
//! Under ELFv2, a call inside one object goes to the callee's local entry and assumes
//! r2 (the TOC pointer) is preserved, so the caller has no TOC-restore slot after its
//! `bl`. A redirect to a replacement `C` in another object (another TOC) must therefore
//! 1. enter `C` at its **global** entry with r12 = `C`, so `C` computes its own r2;
//! 2. make `C` return into a handler rather than to the caller `A`, so that the handler
//!    can put back `A`'s r2 and return address;
//! 3. leave r1 exactly as `A` set it (C finds A's parameter save area and stack
//!    arguments at fixed offsets from r1), so the saved state cannot go on the normal
//!    stack: it goes on a separate, per-thread **livepatch stack**.
//!
//! The livepatch stack grows upward from the low end of the thread's stack area, just
//! past the stack-end marker word. Each frame is 24 bytes; with `sp` the value of the
//! livepatch stack pointer *after* the push:
//!
//! | at | holds |
//! |---|---|
//! | `sp - 8` | [`STACK_END_MAGIC`], checked when `C` returns (a mismatch traps) |
//! | `sp - 16` | `A`'s return address (the LR at entry) |
//! | `sp - 24` | `A`'s r2 |
//!
//! [`LivepatchStack`] models the push/pop/marker check over a word memory, and
//! [`call_via_handler`] models the handler's whole protocol on a register file, so the
//! tests can show that `A`'s r1, r2 and LR come back exactly, also for nested and
//! recursive patched calls. The user-space host's trampoline implements the same
//! protocol in assembly and is tested against this model.

use core::mem::{offset_of, size_of};

/// Marker stored in every livepatch-stack frame (the kernel's `STACK_END_MAGIC`).
pub const STACK_END_MAGIC: u64 = 0x57AC_6E9D;

/// One livepatch-stack frame, lowest address first.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LivepatchFrame {
    /// The caller's r2.
    pub toc: u64,
    /// The caller's return address.
    pub lr: u64,
    /// [`STACK_END_MAGIC`].
    pub magic: u64,
}

/// `LIVEPATCH_STACK_FRAME_SIZE`.
pub const FRAME_SIZE: u64 = size_of::<LivepatchFrame>() as u64;
/// `LIVEPATCH_STACK_MAGIC_OFFSET`: the marker is at `sp - 8`.
pub const MAGIC_OFFSET: u64 = FRAME_SIZE - offset_of!(LivepatchFrame, magic) as u64;
/// `LIVEPATCH_STACK_LR_OFFSET`: the return address is at `sp - 16`.
pub const LR_OFFSET: u64 = FRAME_SIZE - offset_of!(LivepatchFrame, lr) as u64;
/// `LIVEPATCH_STACK_TOC_OFFSET`: the TOC is at `sp - 24`.
pub const TOC_OFFSET: u64 = FRAME_SIZE - offset_of!(LivepatchFrame, toc) as u64;
const _: () = assert!(FRAME_SIZE == 24 && MAGIC_OFFSET == 8 && LR_OFFSET == 16 && TOC_OFFSET == 24);

/// Word-addressed memory the model runs on.
pub trait Words {
    /// The word at `addr`, if readable.
    fn read(&self, addr: u64) -> Option<u64>;
    /// Stores `value` at `addr`; false if not writable.
    fn write(&mut self, addr: u64, value: u64) -> bool;
}

/// What can go wrong on the livepatch stack.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum TocError {
    /// A push would run into the normal stack (`limit`).
    Overflow { sp: u64, limit: u64 },
    /// A pop with no frame on the livepatch stack.
    Underflow { sp: u64 },
    /// The marker of the top frame is not [`STACK_END_MAGIC`] (the kernel traps).
    BadMagic { at: u64, found: u64 },
    /// The memory refused a read or write.
    Memory { addr: u64 },
}

/// A thread's livepatch stack.
///
/// # Invariants
///
/// `base + 8 <= sp`, `(sp - base - 8)` is a multiple of [`FRAME_SIZE`], and every
/// frame between `base + 8` and `sp` was written by [`LivepatchStack::push`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LivepatchStack {
    base: u64,
    sp: u64,
}

impl LivepatchStack {
    /// Thread creation: writes the stack-end marker at `base` and points the livepatch
    /// stack one word past it (the kernel's `klp_init_thread_info`).
    pub fn init(mem: &mut dyn Words, base: u64) -> Result<Self, TocError> {
        let sp = base.checked_add(8).ok_or(TocError::Memory { addr: base })?;
        if !mem.write(base, STACK_END_MAGIC) {
            return Err(TocError::Memory { addr: base });
        }
        Ok(LivepatchStack { base, sp })
    }

    /// The livepatch stack pointer.
    pub fn sp(&self) -> u64 {
        self.sp
    }

    /// Number of frames on the stack.
    pub fn depth(&self) -> u64 {
        self.sp.saturating_sub(self.base.saturating_add(8)) / FRAME_SIZE
    }

    /// Pushes the caller's return address and TOC. `limit` is the lowest address of
    /// the normal stack in use (its r1): the two stacks must not meet.
    pub fn push(
        &mut self,
        mem: &mut dyn Words,
        lr: u64,
        toc: u64,
        limit: u64,
    ) -> Result<(), TocError> {
        let sp = self.sp;
        let new = match sp.checked_add(FRAME_SIZE) {
            Some(n) if n <= limit => n,
            _ => return Err(TocError::Overflow { sp, limit }),
        };
        for (off, v) in [
            (MAGIC_OFFSET, STACK_END_MAGIC),
            (LR_OFFSET, lr),
            (TOC_OFFSET, toc),
        ] {
            let addr = new
                .checked_sub(off)
                .ok_or(TocError::Overflow { sp, limit })?;
            if !mem.write(addr, v) {
                return Err(TocError::Memory { addr });
            }
        }
        self.sp = new;
        Ok(())
    }

    /// Checks the marker of the top frame, then pops it: returns `(lr, toc)`.
    pub fn pop(&mut self, mem: &dyn Words) -> Result<(u64, u64), TocError> {
        let sp = self.sp;
        if sp < self.base.saturating_add(8 + FRAME_SIZE) {
            return Err(TocError::Underflow { sp });
        }
        let at = |off: u64| sp.checked_sub(off).ok_or(TocError::Underflow { sp });
        let read = |off: u64| {
            let addr = at(off)?;
            mem.read(addr).ok_or(TocError::Memory { addr })
        };
        let magic = read(MAGIC_OFFSET)?;
        if magic != STACK_END_MAGIC {
            return Err(TocError::BadMagic {
                at: at(MAGIC_OFFSET)?,
                found: magic,
            });
        }
        let lr = read(LR_OFFSET)?;
        let toc = read(TOC_OFFSET)?;
        self.sp = at(FRAME_SIZE)?;
        Ok((lr, toc))
    }

    /// The safe-point check: the stack-end marker and every frame's marker intact.
    pub fn check(&self, mem: &dyn Words) -> Result<(), TocError> {
        let mut top = self.sp;
        while top > self.base.saturating_add(8) {
            let underflow = TocError::Underflow { sp: top };
            let at = top.checked_sub(MAGIC_OFFSET).ok_or(underflow)?;
            let found = mem.read(at).ok_or(TocError::Memory { addr: at })?;
            if found != STACK_END_MAGIC {
                return Err(TocError::BadMagic { at, found });
            }
            top = top.checked_sub(FRAME_SIZE).ok_or(underflow)?;
        }
        let found = mem
            .read(self.base)
            .ok_or(TocError::Memory { addr: self.base })?;
        if found != STACK_END_MAGIC {
            return Err(TocError::BadMagic {
                at: self.base,
                found,
            });
        }
        Ok(())
    }
}

/// The registers the handler protocol touches.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Regs {
    /// r0 (scratch for the handler).
    pub r0: u64,
    /// r1, the stack pointer: never changed by the handler.
    pub r1: u64,
    /// r2, the TOC pointer.
    pub r2: u64,
    /// r11 (scratch for the handler).
    pub r11: u64,
    /// r12: the global-entry address register.
    pub r12: u64,
    /// Link register.
    pub lr: u64,
    /// Count register: holds `C`'s address on entry to the handler.
    pub ctr: u64,
}

/// The replacement function as the model sees it: it runs with the registers it was
/// entered with (r12 = its global entry) and may do anything an ELFv2 function may,
/// including patched calls of its own through `stack`.
pub trait Callee {
    /// Runs the function body. It must return with r1 as it found it and return to the
    /// LR it was entered with (the model checks that by returning to `regs.lr`).
    fn run(
        &mut self,
        regs: &mut Regs,
        stack: &mut LivepatchStack,
        mem: &mut dyn Words,
    ) -> Result<(), TocError>;
}

/// The livepatch handler's protocol, entered from the trampoline with LR = the return
/// address into `A`, CTR = `C`, r1/r2 = `A`'s; only r0, r11, r12 may be clobbered.
///
/// 1. push `{magic, LR, r2}` on the livepatch stack;
/// 2. r12 = CTR (global-entry convention), LR = the handler's own return point,
///    branch to `C` (`C` computes and uses its own r2);
/// 3. when `C` returns: check the marker (a mismatch is [`TocError::BadMagic`]);
/// 4. LR and r2 back from the frame, pop, return to `A`.
pub fn call_via_handler(
    regs: &mut Regs,
    stack: &mut LivepatchStack,
    mem: &mut dyn Words,
    callee: &mut dyn Callee,
    handler_return: u64,
) -> Result<(), TocError> {
    stack.push(mem, regs.lr, regs.r2, regs.r1)?;
    regs.r12 = regs.ctr;
    regs.lr = handler_return;
    callee.run(regs, stack, mem)?;
    let (lr, toc) = stack.pop(mem)?;
    regs.lr = lr;
    regs.r2 = toc;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// 64 words of memory at 0x1000.
    struct Mem([u64; 64]);
    impl Words for Mem {
        fn read(&self, addr: u64) -> Option<u64> {
            let i = usize::try_from(addr.checked_sub(0x1000)? / 8).ok()?;
            addr.is_multiple_of(8).then_some(())?;
            self.0.get(i).copied()
        }
        fn write(&mut self, addr: u64, value: u64) -> bool {
            let Some(i) = addr.checked_sub(0x1000).map(|o| (o / 8) as usize) else {
                return false;
            };
            match self.0.get_mut(i) {
                Some(w) if addr.is_multiple_of(8) => {
                    *w = value;
                    true
                }
                _ => false,
            }
        }
    }

    const BASE: u64 = 0x1000;
    const A_TOC: u64 = 0xc000_0000_0200_8000;
    const C_TOC: u64 = 0xc008_0000_0001_8000;
    const C: u64 = 0xc008_0000_0000_1000;
    const RET_A: u64 = 0xc000_0000_0010_0040;
    const HANDLER_RET: u64 = 0xc000_0000_0000_0500;

    /// A replacement that sets its own TOC from r12, clobbers volatile registers, and
    /// optionally makes a nested patched call through the handler.
    struct Replacement {
        nested: u32,
        seen_r2: u64,
    }

    impl Callee for Replacement {
        fn run(
            &mut self,
            regs: &mut Regs,
            stack: &mut LivepatchStack,
            mem: &mut dyn Words,
        ) -> Result<(), TocError> {
            assert_eq!(regs.r12, C, "entered at the global entry with r12 = C");
            regs.r2 = regs.r12 - C + C_TOC; // addis/addi r2 from r12
            self.seen_r2 = regs.r2;
            regs.r0 = 0xdead;
            regs.r11 = 0xbeef;
            let my_lr = regs.lr;
            if self.nested > 0 {
                self.nested -= 1;
                // C calls another patched function (same module) through the handler.
                regs.lr = C + 0x44;
                regs.ctr = C;
                let depth = stack.depth();
                call_via_handler(regs, stack, mem, self, HANDLER_RET)?;
                assert_eq!(stack.depth(), depth);
                assert_eq!(regs.r2, C_TOC, "the nested call restored C's TOC");
                regs.lr = my_lr;
            }
            assert_eq!(regs.lr, my_lr);
            Ok(())
        }
    }

    fn setup() -> (Mem, LivepatchStack, Regs) {
        let mut mem = Mem([0; 64]);
        let st = LivepatchStack::init(&mut mem, BASE).unwrap();
        let regs = Regs {
            r1: 0x1000 + 64 * 8,
            r2: A_TOC,
            lr: RET_A,
            ctr: C,
            ..Regs::default()
        };
        (mem, st, regs)
    }

    #[test]
    fn init_marks_the_stack_end() {
        let (mem, st, _) = setup();
        assert_eq!(mem.read(BASE), Some(STACK_END_MAGIC));
        assert_eq!((st.sp(), st.depth()), (BASE + 8, 0));
        assert_eq!(st.check(&mem), Ok(()));
    }

    #[test]
    fn push_layout_and_pop() {
        let (mut mem, mut st, _) = setup();
        st.push(&mut mem, RET_A, A_TOC, u64::MAX).unwrap();
        let sp = st.sp();
        assert_eq!(sp, BASE + 8 + 24);
        assert_eq!(mem.read(sp - 8), Some(0x57AC_6E9D));
        assert_eq!(mem.read(sp - 16), Some(RET_A));
        assert_eq!(mem.read(sp - 24), Some(A_TOC));
        assert_eq!(st.pop(&mem), Ok((RET_A, A_TOC)));
        assert_eq!(st.sp(), BASE + 8);
        assert_eq!(st.pop(&mem), Err(TocError::Underflow { sp: BASE + 8 }));
    }

    #[test]
    fn call_into_another_toc_returns_correctly() {
        let (mut mem, mut st, mut regs) = setup();
        let before = regs;
        let mut c = Replacement {
            nested: 0,
            seen_r2: 0,
        };
        call_via_handler(&mut regs, &mut st, &mut mem, &mut c, HANDLER_RET).unwrap();
        assert_eq!(c.seen_r2, C_TOC, "C ran with its own TOC");
        assert_eq!(regs.r2, before.r2, "A's TOC is back");
        assert_eq!(regs.lr, before.lr, "return goes to A");
        assert_eq!(regs.r1, before.r1, "r1 untouched");
        assert_eq!(st.sp(), BASE + 8, "livepatch stack back where it was");
    }

    #[test]
    fn nested_patched_calls() {
        let (mut mem, mut st, mut regs) = setup();
        let before = regs;
        let mut c = Replacement {
            nested: 3,
            seen_r2: 0,
        };
        call_via_handler(&mut regs, &mut st, &mut mem, &mut c, HANDLER_RET).unwrap();
        assert_eq!(
            (regs.r1, regs.r2, regs.lr),
            (before.r1, before.r2, before.lr)
        );
        assert_eq!(st.depth(), 0);
    }

    #[test]
    fn corrupted_marker_is_caught() {
        struct Smash;
        impl Callee for Smash {
            fn run(
                &mut self,
                _: &mut Regs,
                st: &mut LivepatchStack,
                mem: &mut dyn Words,
            ) -> Result<(), TocError> {
                mem.write(st.sp() - 8, 0);
                assert!(st.check(mem).is_err());
                Ok(())
            }
        }
        let (mut mem, mut st, mut regs) = setup();
        assert_eq!(
            call_via_handler(&mut regs, &mut st, &mut mem, &mut Smash, HANDLER_RET),
            Err(TocError::BadMagic {
                at: BASE + 8 + 24 - 8,
                found: 0
            })
        );
    }

    #[test]
    fn overflow_into_the_normal_stack() {
        let (mut mem, mut st, _) = setup();
        let limit = BASE + 8 + 2 * FRAME_SIZE;
        st.push(&mut mem, 1, 2, limit).unwrap();
        st.push(&mut mem, 3, 4, limit).unwrap();
        assert_eq!(
            st.push(&mut mem, 5, 6, limit),
            Err(TocError::Overflow { sp: limit, limit })
        );
        assert_eq!(st.depth(), 2);
        assert_eq!(st.check(&mem), Ok(()));
        assert_eq!(st.pop(&mem), Ok((3, 4)));
        assert_eq!(st.pop(&mem), Ok((1, 2)));
    }
}
