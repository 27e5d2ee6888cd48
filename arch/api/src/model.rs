//! A hand-built stack for tests of the walkers (here, in each back-end, and in the
//! core). Fixed size, no allocation.

use core::ops::Range;

use crate::{StackBounds, StackMemory};

/// A 4 KiB stack of 64-bit words with a text range and a trampoline range.
#[derive(Clone, Debug)]
pub struct HandStack {
    low: u64,
    words: [u64; HandStack::WORDS],
    end: u64,
    text: Range<u64>,
    trampoline: Range<u64>,
}

impl HandStack {
    /// Number of words.
    pub const WORDS: usize = 512;
    /// Size in bytes.
    pub const SIZE: u64 = (Self::WORDS * 8) as u64;

    /// An all-zero stack at `low`, whose code is `text`; `end` starts at the top.
    pub fn new(low: u64, text: Range<u64>) -> Self {
        HandStack {
            low,
            words: [0; Self::WORDS],
            end: low.wrapping_add(Self::SIZE),
            text,
            trampoline: 0..0,
        }
    }

    /// One past the highest address.
    pub fn high(&self) -> u64 {
        self.low.wrapping_add(Self::SIZE)
    }

    /// Sets where a complete walk ends ([`StackBounds::end`]).
    pub fn set_end(&mut self, end: u64) {
        self.end = end;
    }

    /// Marks `range` as trampoline code.
    pub fn set_trampoline(&mut self, range: Range<u64>) {
        self.trampoline = range;
    }

    /// Stores `value` at `addr` (8-byte aligned, on the stack); false otherwise.
    pub fn set(&mut self, addr: u64, value: u64) -> bool {
        match self.index(addr).and_then(|i| self.words.get_mut(i)) {
            Some(w) => {
                *w = value;
                true
            }
            None => false,
        }
    }

    fn index(&self, addr: u64) -> Option<usize> {
        let off = addr.checked_sub(self.low)?;
        if !off.is_multiple_of(8) {
            return None;
        }
        usize::try_from(off / 8).ok()
    }
}

impl StackMemory for HandStack {
    fn bounds(&self) -> StackBounds {
        StackBounds {
            low: self.low,
            high: self.high(),
            end: self.end,
        }
    }

    fn read_u64(&self, addr: u64) -> Option<u64> {
        self.index(addr).and_then(|i| self.words.get(i)).copied()
    }

    fn is_text(&self, addr: u64) -> bool {
        self.text.contains(&addr) || self.trampoline.contains(&addr)
    }

    fn is_trampoline(&self, addr: u64) -> bool {
        self.trampoline.contains(&addr)
    }
}
