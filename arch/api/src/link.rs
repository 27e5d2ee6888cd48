//! Linking a user-space patch object: what a loader needs to know about a relocation
//! type beyond how to write it ([`crate::Arch::apply_relocation`]).
//!
//! A kernel module is linked by the kernel's module loader, whose architecture code
//! builds call stubs (arm64 module PLTs, ppc64 TOC stubs) for branches that do not
//! reach. A patch file loaded into a process needs the same, and also the global
//! offset table that position-independent code reads addresses from: the loader keeps
//! one 8-byte *slot* per symbol and rewrites each GOT-relative reference as the
//! PC-relative reference to that slot it is equivalent to.

/// How a loader treats an ordinary relocation type of the arch.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LinkClass {
    /// Written as it is: a target out of reach is an error.
    Plain,
    /// A direct call or tail call: when the target is out of the branch's reach (or,
    /// where [`crate::Arch::CALLS_LEAVING_OBJECT_NEED_STUB`], outside the object), the
    /// branch goes to a call stub ([`crate::Arch::call_stub`]) that jumps to it.
    Call,
    /// A reference to the GOT entry of the symbol: the loader makes an 8-byte slot that
    /// holds the symbol's address, and writes relocation type `as_type` against the
    /// slot instead (same instruction, same field).
    GotSlot {
        /// The equivalent relocation type relative to the slot.
        as_type: u32,
    },
}

/// The longest call stub of any arch ([`crate::Arch::call_stub`]).
pub const MAX_CALL_STUB: usize = 32;
