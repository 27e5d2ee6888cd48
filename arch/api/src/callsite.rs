//! Call-site retargeting: what a back-end knows about the call and tail-jump
//! instructions of a linked file, so that a host can point them straight at a
//! replacement in the steady state and back at the original function later.
//!
//! In the steady state a call of a patched function runs the caller's call of the
//! function, then the site's direct branch to the replacement. A back-end that
//! retargets call sites ([`CallSites::RETARGETS_CALLS`]) lets a host remove that
//! branch: the host walks the relocations a link editor kept (`--emit-relocs`) against
//! the executable sections of a loaded file, asks the back-end which of them are call
//! sites ([`CallSites::classify_call`]) and what target each derives from the
//! relocation's symbol, and then rewrites the sites of one function. Everything here
//! is knowledge: pure functions of the relocation, the bytes and the addresses, tested
//! on every host. The host does every memory access: it reads the file, the bytes in
//! memory and the slot a site reads its target from ([`CallTarget::Slot`]), and it
//! writes the new bytes, either with one atomic store of the aligned 8-byte word that
//! holds every byte that changes, or with the breakpoint protocol:
//!
//! 1. [`CallSites::CALL_TRAP_BYTES`] over the first bytes of the site, a
//!    synchronisation round;
//! 2. the rest of the new bytes, a round;
//! 3. the first bytes of the new bytes, a round.
//!
//! A thread that reaches the trap meanwhile resumes as the back-end's
//! [`CallSites::call_trap`] says (as if the original call or jump had run: at the
//! original function, whose entry leads to the current implementation in every state
//! of its site).
//!
//! The defaults describe a back-end that retargets nothing: the entry's branch serves
//! every caller.

use crate::InsnBytes;
use crate::patching::{SitePlanner, TrapEntry};

/// The most bytes a call site has (it must fit an aligned 8-byte word for a host's
/// single-store write).
pub const MAX_CALL_SITE: usize = 8;

/// One call site of a linked file: its address, its form (a value the back-end
/// defines and only it interprets) and its bytes as the file has them.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct CallSite {
    /// The address of the site's first byte (the file's virtual address, or the
    /// loaded one once a host has added the load bias).
    pub addr: u64,
    /// The back-end's form of the site.
    pub form: u8,
    original: InsnBytes,
}

impl CallSite {
    /// A site at `addr` of form `form` whose bytes in the file are `original`; `None`
    /// when they are empty or more than [`MAX_CALL_SITE`].
    pub fn new(addr: u64, form: u8, original: &[u8]) -> Option<CallSite> {
        if original.is_empty() || original.len() > MAX_CALL_SITE {
            return None;
        }
        Some(CallSite {
            addr,
            form,
            original: InsnBytes::from_slice(original)?,
        })
    }

    /// The site's bytes in the file.
    pub fn original(&self) -> &[u8] {
        self.original.as_slice()
    }

    /// The site's length (1 to [`MAX_CALL_SITE`]).
    pub fn len(&self) -> usize {
        self.original.len()
    }

    /// Whether the site has no bytes (never, for a site made by [`CallSite::new`]).
    pub fn is_empty(&self) -> bool {
        self.original.is_empty()
    }

    /// The same site moved to `addr` (a host adds the load bias).
    pub const fn at(self, addr: u64) -> CallSite {
        CallSite { addr, ..self }
    }
}

/// A call site found in a relocation, and its target: the relocation's symbol value
/// `S` plus [`RelocatedCall::target`] (wrapping), in the file's addresses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RelocatedCall {
    /// The site.
    pub site: CallSite,
    /// What the site's target adds to `S` (x86_64: `A + 4` for a direct call, 0 for a
    /// call through the symbol's GOT entry, whose target is the symbol itself).
    pub target: i64,
}

impl RelocatedCall {
    /// The site's target for the symbol value `s`.
    pub const fn target_of(&self, s: u64) -> u64 {
        s.wrapping_add(self.target as u64)
    }
}

/// What target the bytes of a call site encode now.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CallTarget {
    /// The site branches to this address.
    Direct(u64),
    /// The site branches to the address in the 8-byte slot at this address (the
    /// original bytes of a call through a GOT entry: the slot is the file's own GOT
    /// entry for the symbol, which a host reads while the file is loaded).
    Slot(u64),
}

/// How a back-end's call sites are found and retargeted (see the module
/// documentation). Knowledge: every item is pure and tested on every host. The
/// defaults describe a back-end that retargets no call site.
pub trait CallSites: SitePlanner {
    /// Whether the back-end retargets call sites at all. A host asks nothing else, and
    /// reads no file, when it does not.
    const RETARGETS_CALLS: bool = false;

    /// The bytes stored over the first bytes of a site while the breakpoint protocol
    /// rewrites it (one byte: the host stores it atomically); they raise
    /// [`SitePlanner::TRAP_SIGNAL`]. Empty: no breakpoint protocol, a host only writes
    /// sites whose changing bytes lie in one aligned 8-byte word.
    const CALL_TRAP_BYTES: &'static [u8] = &[];

    /// The call site that a relocation of type `r_type` with addend `r_addend`, whose
    /// field is at `r_offset`, relocates in an executable section of a linked file
    /// (`ET_EXEC`, `ET_DYN`, where `r_offset` is an address), and how its target
    /// derives from the relocation's symbol value. `text` holds the section's bytes,
    /// the first at `text_addr`. `None` when the relocation is not one of a call site
    /// the back-end retargets, or the bytes there are not one of its forms.
    fn classify_call(
        r_type: u32,
        r_addend: i64,
        r_offset: u64,
        text: &[u8],
        text_addr: u64,
    ) -> Option<RelocatedCall> {
        let _ = (r_type, r_addend, r_offset, text, text_addr);
        None
    }

    /// The target that `now`, the bytes at `site` (`site.len()` of them), encode;
    /// `None` when they are not one of the forms the site takes (its original bytes,
    /// or what [`Self::encode_call`] writes).
    fn call_target(site: &CallSite, now: &[u8]) -> Option<CallTarget> {
        let _ = (site, now);
        None
    }

    /// The bytes of `site` (`site.len()` of them) reaching `to`, for a site whose
    /// original target is `func`; `None` when `to` is out of the site's reach.
    /// With `to == func` these are bytes that reach `func` (the original bytes for a
    /// site whose original form reads a slot).
    fn encode_call(site: &CallSite, func: u64, to: u64) -> Option<InsnBytes> {
        let _ = (site, func, to);
        None
    }

    /// What a thread that hits [`Self::CALL_TRAP_BYTES`] at `site`, whose original
    /// target is `func`, does while the site is rewritten: resume as if the site had
    /// run, at `func`. `None`: the site is never written with the breakpoint protocol.
    fn call_trap(site: &CallSite, func: u64) -> Option<TrapEntry> {
        let _ = (site, func);
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sites_hold_one_to_eight_bytes() {
        assert_eq!(CallSite::new(0x1000, 0, &[]), None);
        assert_eq!(CallSite::new(0x1000, 0, &[0; 9]), None);
        let s = CallSite::new(0x1000, 3, &[1, 2, 3, 4, 5, 6, 7, 8]).expect("eight bytes");
        assert_eq!(
            (s.len(), s.original()),
            (8, &[1u8, 2, 3, 4, 5, 6, 7, 8][..])
        );
        assert!(!s.is_empty());
        assert_eq!(s.at(0x2000).addr, 0x2000);
        assert_eq!(s.at(0x2000).original(), s.original());
        let r = RelocatedCall {
            site: s,
            target: -4,
        };
        assert_eq!(r.target_of(0x1000), 0xffc);
        assert_eq!(r.target_of(2), u64::MAX - 1, "wrapping");
    }
}
