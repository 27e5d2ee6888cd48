#![no_std]
#![cfg_attr(
    not(test),
    deny(
        clippy::indexing_slicing,
        clippy::arithmetic_side_effects,
        clippy::unwrap_used,
        clippy::expect_used,
        clippy::panic,
        clippy::unreachable,
        clippy::todo,
        clippy::unimplemented
    )
)]
//! klp back-end for s390x (big-endian).
//!
//! * [`site`]: `brcl 0,0` (`-pg -mfentry -mnop-mcount`, the kernel's site) and
//!   hotpatch nop runs (`-mhotpatch`, `-fpatchable-function-entry`).
//! * [`insn`]: `brasl`/`brcl` with 32-bit halfword offsets, the nops.
//! * [`reloc`]: `apply_relocate_add`, big-endian.
//! * [`unwind`]: the back-chain reliable walker (needs `-mbackchain` code, and
//!   `-C target-feature=+backchain` for Rust).
//! * `live` (s390x builds only): text writes followed by a serialising `bcr 15,0`;
//!   z/Architecture keeps instruction fetch coherent with stores, so no cache flush.

pub mod insn;
pub mod link;
pub mod patching;
pub mod relax;
pub mod reloc;
pub mod sigframe;
pub mod site;
pub mod unwind;

#[cfg(target_arch = "s390x")]
pub mod live;

use klp_arch::model::HandStack;
use klp_arch::{
    Arch, CacheStep, EncodeError, Endian, FuncInfo, InsnBytes, Redirect, Reloc, RelocCtx,
    RelocError, SafePointHook, Site, SiteError, StackMemory, TraceSink, UnwindError, UnwindStart,
};

/// The s390x back-end (a marker type: it has no values).
#[derive(Debug)]
pub enum S390x {}

/// After a text write: serialise (`bcr 15,0`) so that this CPU's later instruction
/// fetches see the store; other CPUs are serialised by the host (the kernel's
/// `text_poke_sync`).
pub const CACHE_SYNC: &[CacheStep] = &[CacheStep::Serialize];

impl Arch for S390x {
    const NAME: &'static str = "s390x";
    const ELF_MACHINE: u16 = 22;
    const ENDIAN: Endian = Endian::Big;
    const HAVE_RELIABLE_STACKTRACE: bool = true;
    const SYSCALL_PREFIX: &'static str = "__s390x_";
    const MAX_SITE_LEN: usize = site::MAX_LEN;
    const CACHE_SYNC: &'static [CacheStep] = CACHE_SYNC;
    const SAFE_POINT_HOOK: SafePointHook = SafePointHook::Generic;
    const SITE_FLAGS: &'static str = "-pg -mfentry -mnop-mcount";
    /// `R_390_64`.
    const ABS64_RELOC: u32 = 22;
    const WALK_CFLAGS: &'static str = "-mbackchain";

    fn find_site(code: &[u8], func: FuncInfo) -> Result<Site, SiteError> {
        site::find(code, func)
    }

    fn encode_redirect(site: &Site, redirect: Redirect) -> Result<InsnBytes, EncodeError> {
        site::encode(site, redirect)
    }

    fn apply_relocation(
        section: &mut [u8],
        section_addr: u64,
        reloc: &Reloc,
        _ctx: &RelocCtx,
    ) -> Result<(), RelocError> {
        reloc::apply(section, section_addr, reloc)
    }

    fn is_got_relaxable(r_type: u32) -> bool {
        relax::relaxable(r_type)
    }

    fn relax_got(
        text: &mut [u8],
        got: &klp_arch::GotRef,
        _partners: &[u64],
    ) -> Result<Option<klp_arch::Relaxed>, klp_arch::RelaxRefused> {
        relax::relax(text, got)
    }

    fn link_class(r_type: u32) -> klp_arch::LinkClass {
        link::class(r_type)
    }

    fn call_stub(
        at: u64,
        target: u64,
        out: &mut [u8; klp_arch::MAX_CALL_STUB],
    ) -> Result<usize, EncodeError> {
        link::call_stub(at, target, out)
    }

    fn unwind_reliable(
        mem: &dyn StackMemory,
        start: &UnwindStart,
        sink: &mut dyn TraceSink,
    ) -> Result<usize, UnwindError> {
        unwind::walk(mem, start, sink)
    }

    fn follows_call(before: &[u8]) -> bool {
        unwind::follows_call(before)
    }

    fn model_stack(mem: &mut HandStack, trace: &[u64]) -> Option<UnwindStart> {
        unwind::model_stack(mem, trace)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use klp_arch::conformance::{Sample, check};

    #[test]
    fn conformance() {
        let sample = Sample {
            code: &[0xc0, 0x04, 0, 0, 0, 0, 0xeb, 0xbf],
            func: FuncInfo::at(0x10_0000),
            near: 0x20_0000,
            far: 0x2_0000_0000,
        };
        assert_eq!(check::<S390x>(&sample), Ok(()));
    }
}
