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
//! klp back-end for aarch64.
//!
//! * [`site`]: two nops from `-fpatchable-function-entry=2`, optionally after `bti c`
//!   (and the kernel's boot-time form `mov x9, x30; nop`).
//! * [`insn`]: `b`/`bl`, `mov x9, x30`, and the immediate fields relocations patch.
//! * [`reloc`]: `apply_relocate_add` for the types a livepatch object uses.
//! * [`unwind`]: the frame-record reliable walker (final record = success).
//! * `live` (aarch64 builds only): text writes with `dc cvau; dsb ish; ic ivau;
//!   dsb ish; isb`, register capture.

pub mod insn;
pub mod link;
pub mod patching;
pub mod relax;
pub mod reloc;
pub mod sigframe;
pub mod site;
pub mod unwind;

#[cfg(target_arch = "aarch64")]
pub mod live;

use klp_arch::model::HandStack;
use klp_arch::{
    Arch, CacheStep, EncodeError, Endian, FuncInfo, InsnBytes, Redirect, Reloc, RelocCtx,
    RelocError, SafePointHook, Site, SiteError, StackMemory, TraceSink, UnwindError, UnwindStart,
};

/// The aarch64 back-end (a marker type: it has no values).
#[derive(Debug)]
pub enum Aarch64 {}

/// The kernel's sequence after writing text (`caches_clean_inval_pou`): clean each
/// data-cache line to the point of unification, wait, invalidate each
/// instruction-cache line, wait, and resynchronise the fetch.
pub const CACHE_SYNC: &[CacheStep] = &[
    CacheStep::DcCvauEachLine,
    CacheStep::DsbIsh,
    CacheStep::IcIvauEachLine,
    CacheStep::DsbIsh,
    CacheStep::Isb,
];

impl Arch for Aarch64 {
    const NAME: &'static str = "aarch64";
    const ELF_MACHINE: u16 = 183;
    const ENDIAN: Endian = Endian::Little;
    const HAVE_RELIABLE_STACKTRACE: bool = true;
    const SYSCALL_PREFIX: &'static str = "__arm64_";
    const MAX_SITE_LEN: usize = site::LEN;
    const CACHE_SYNC: &'static [CacheStep] = CACHE_SYNC;
    const SAFE_POINT_HOOK: SafePointHook = SafePointHook::Generic;
    const SITE_FLAGS: &'static str = "-fpatchable-function-entry=2";
    /// `R_AARCH64_ABS64`.
    const ABS64_RELOC: u32 = 257;

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
            code: &[
                0x5f, 0x24, 0x03, 0xd5, 0x1f, 0x20, 0x03, 0xd5, 0x1f, 0x20, 0x03, 0xd5,
            ],
            func: FuncInfo::at(0xffff_8000_8010_0000),
            near: 0xffff_8000_8110_0000,
            far: 0xffff_8000_9010_0000,
        };
        assert_eq!(check::<Aarch64>(&sample), Ok(()));
    }
}
