//! Reliable stack walking: the stack-memory abstraction, the trace consumer and the
//! reasons a trace is unreliable.

use core::fmt;

/// The kernel's `MAX_STACK_ENTRIES`: a trace that fills this many entries is
/// unreliable (the consumer asks the walk to stop, and a stop is a failure).
pub const MAX_STACK_ENTRIES: usize = 100;

/// How many bytes before a candidate return address [`Arch::follows_call`] looks at
/// at most: enough for the longest call instruction of every arch (x86_64's
/// `REX ff /2 modrm sib disp32`, 8 bytes with the REX prefix).
///
/// [`Arch::follows_call`]: crate::Arch::follows_call
pub const MAX_CALL_LEN: usize = 8;

/// The task stack a walk must stay on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StackBounds {
    /// Lowest address of the stack.
    pub low: u64,
    /// One past the highest address of the stack.
    pub high: u64,
    /// Where a complete walk ends: the address of the outermost frame (frame record,
    /// back-chain frame). Each arch's `unwind.rs` says what exactly, and offers a
    /// helper computing the kernel's value from `low`/`high`.
    pub end: u64,
}

impl StackBounds {
    /// True when `[addr, addr + size)` lies on the stack.
    pub fn contains(&self, addr: u64, size: u64) -> bool {
        match addr.checked_add(size) {
            Some(e) => addr >= self.low && e <= self.high,
            None => false,
        }
    }
}

/// What a walker may ask of the world: stack words and code knowledge.
///
/// Implemented by hosts (a task's real stack, a simulated one) and by tests (a
/// hand-built stack). Reads return `None` for memory the walker may not touch.
pub trait StackMemory {
    /// The stack of the task being walked.
    fn bounds(&self) -> StackBounds;
    /// The 64-bit word at `addr`, in the machine's byte order already decoded.
    fn read_u64(&self, addr: u64) -> Option<u64>;
    /// Whether `addr` is known code (kernel text, or a loaded object's text).
    fn is_text(&self, addr: u64) -> bool;
    /// Whether `addr` is inside the redirect trampoline (or a kretprobe-style
    /// trampoline): a return address there means the walk cannot be trusted.
    fn is_trampoline(&self, _addr: u64) -> bool {
        false
    }
}

/// Registers a walk starts from (a sleeping task's saved context, or the registers
/// of an interrupted thread).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct UnwindStart {
    /// Where the task stopped; reported as the first entry.
    pub pc: u64,
    /// Stack pointer (ppc64le r1, s390x r15, aarch64 sp, x86_64 rsp).
    pub sp: u64,
    /// Frame pointer (x86_64 rbp, aarch64 x29); unused by back-chain arches.
    pub fp: u64,
}

/// Receives return addresses; returns `false` to stop the walk (which makes the walk
/// fail with [`UnwindError::BufferFull`], as in the kernel).
pub trait TraceSink {
    /// Takes one entry.
    fn push(&mut self, addr: u64) -> bool;
}

/// A trace of at most [`MAX_STACK_ENTRIES`] entries, stored inline.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct Trace {
    entries: [u64; MAX_STACK_ENTRIES],
    len: usize,
}

impl Trace {
    /// An empty trace (also what a task without a stack reliably has).
    pub const fn new() -> Self {
        Trace {
            entries: [0; MAX_STACK_ENTRIES],
            len: 0,
        }
    }

    /// The entries, innermost first.
    pub fn as_slice(&self) -> &[u64] {
        self.entries.get(..self.len).unwrap_or(&[])
    }
}

impl Default for Trace {
    fn default() -> Self {
        Self::new()
    }
}

impl fmt::Debug for Trace {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_list()
            .entries(self.as_slice().iter().map(|a| Hex(*a)))
            .finish()
    }
}

struct Hex(u64);
impl fmt::Debug for Hex {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:#x}", self.0)
    }
}

impl TraceSink for Trace {
    /// Stores the entry; asks to stop once the buffer is full (the kernel's
    /// `stack_trace_consume_entry`).
    fn push(&mut self, addr: u64) -> bool {
        let (Some(slot), Some(len)) = (self.entries.get_mut(self.len), self.len.checked_add(1))
        else {
            return false;
        };
        *slot = addr;
        self.len = len;
        len < MAX_STACK_ENTRIES
    }
}

/// Every reason a trace is unreliable. Each is its own variant so the core (and a
/// person reading the transition's explanation) can tell them apart.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum UnwindError {
    /// A return address is zero or not known code.
    UnknownReturnAddress { addr: u64 },
    /// A frame (or the start) lies outside the task stack.
    FrameOutsideStack { frame: u64 },
    /// The next frame is not above the current one (no progress / non-monotonic).
    NoProgress { frame: u64, next: u64 },
    /// A frame or stack pointer lacks the ABI's alignment.
    Misaligned { frame: u64 },
    /// An interrupt/exception register frame in the middle of the stack.
    ExceptionFrame { frame: u64 },
    /// A return address inside the redirect (or kretprobe) trampoline.
    Trampoline { addr: u64 },
    /// The consumer's buffer filled ([`MAX_STACK_ENTRIES`] entries).
    BufferFull,
    /// The chain ended somewhere that is not the end of the stack.
    UnexpectedEnd { frame: u64 },
    /// A stack word could not be read.
    Unreadable { addr: u64 },
    /// The build has no reliable unwinder for this architecture.
    Unsupported,
}

impl UnwindError {
    /// The errno the kernel returns for an unreliable trace (`-EINVAL`).
    pub const fn errno(&self) -> i32 {
        match self {
            UnwindError::Unsupported => crate::errno::ENOSYS,
            _ => crate::errno::EINVAL,
        }
    }
}

impl fmt::Display for UnwindError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            UnwindError::UnknownReturnAddress { addr } => {
                write!(f, "unknown return address {addr:#x}")
            }
            UnwindError::FrameOutsideStack { frame } => {
                write!(f, "frame {frame:#x} outside the task stack")
            }
            UnwindError::NoProgress { frame, next } => {
                write!(f, "frame {frame:#x} links to {next:#x}: no progress")
            }
            UnwindError::Misaligned { frame } => write!(f, "frame {frame:#x} misaligned"),
            UnwindError::ExceptionFrame { frame } => {
                write!(f, "exception frame at {frame:#x} on the stack")
            }
            UnwindError::Trampoline { addr } => {
                write!(f, "trampoline return address {addr:#x} on the stack")
            }
            UnwindError::BufferFull => write!(f, "{MAX_STACK_ENTRIES} or more frames"),
            UnwindError::UnexpectedEnd { frame } => {
                write!(f, "stack chain ends early at {frame:#x}")
            }
            UnwindError::Unreadable { addr } => write!(f, "cannot read stack word {addr:#x}"),
            UnwindError::Unsupported => f.write_str("no reliable unwinder in this build"),
        }
    }
}

/// Checks shared by the walkers.
pub mod check {
    use super::{StackMemory, TraceSink, UnwindError};

    /// Reads a stack word, mapping a failed read to [`UnwindError::Unreadable`].
    pub fn word(mem: &dyn StackMemory, addr: u64) -> Result<u64, UnwindError> {
        mem.read_u64(addr).ok_or(UnwindError::Unreadable { addr })
    }

    /// Reads the stack word `off` bytes into the frame at `frame`; an address past the
    /// end of the address space is [`UnwindError::FrameOutsideStack`].
    pub fn word_at(mem: &dyn StackMemory, frame: u64, off: u64) -> Result<u64, UnwindError> {
        let addr = frame
            .checked_add(off)
            .ok_or(UnwindError::FrameOutsideStack { frame })?;
        word(mem, addr)
    }

    /// The frame `[frame, frame + size)` must be on the stack and `align`-aligned.
    pub fn frame(
        mem: &dyn StackMemory,
        frame: u64,
        size: u64,
        align: u64,
    ) -> Result<(), UnwindError> {
        if !mem.bounds().contains(frame, size) {
            return Err(UnwindError::FrameOutsideStack { frame });
        }
        if !frame.is_multiple_of(align) {
            return Err(UnwindError::Misaligned { frame });
        }
        Ok(())
    }

    /// The next frame must be strictly above the current one.
    pub fn progress(frame: u64, next: u64) -> Result<(), UnwindError> {
        if next <= frame {
            return Err(UnwindError::NoProgress { frame, next });
        }
        Ok(())
    }

    /// Validates a return address and hands it to the sink.
    pub fn report(
        mem: &dyn StackMemory,
        sink: &mut dyn TraceSink,
        addr: u64,
    ) -> Result<(), UnwindError> {
        if mem.is_trampoline(addr) {
            return Err(UnwindError::Trampoline { addr });
        }
        if addr == 0 || !mem.is_text(addr) {
            return Err(UnwindError::UnknownReturnAddress { addr });
        }
        if !sink.push(addr) {
            return Err(UnwindError::BufferFull);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn trace_stops_at_the_hundredth_entry() {
        let mut t = Trace::new();
        for i in 0..99 {
            assert!(t.push(i), "entry {i} fits");
        }
        assert!(!t.push(99), "the 100th entry asks to stop");
        assert_eq!(t.as_slice().len(), 100);
        assert!(!t.push(100));
        assert_eq!(t.as_slice().len(), 100);
    }

    #[test]
    fn bounds_contain() {
        let b = StackBounds {
            low: 0x1000,
            high: 0x2000,
            end: 0x1ff0,
        };
        assert!(b.contains(0x1ff0, 16));
        assert!(!b.contains(0x1ff8, 16));
        assert!(!b.contains(0xff8, 8));
        assert!(!b.contains(u64::MAX, 8));
    }
}
