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
//! klp back-end for ppc64le (ELFv2).
//!
//! * [`site`]: the local entry point (from the symbol's `st_other`) after the global
//!   entry's TOC setup, holding `mflr r0; bl _mcount` (`-pg -mprofile-kernel`) or two
//!   nops.
//! * [`insn`]: `b`/`bl`, the TOC-setup and TOC-restore instructions, the 16-bit
//!   immediate helpers (`@l`, `@h`, `@ha`).
//! * [`toc`]: the kernel's per-thread livepatch stack and the handler that keeps the
//!   caller's TOC (r2) and return address across a call into another module.
//! * [`reloc`]: `apply_relocate_add`, including the `bl` + nop → `ld r2,24(r1)` rule.
//! * [`unwind`]: the back-chain reliable walker.
//! * `live` (powerpc64 builds only): text writes with `dcbst; sync; icbi; sync; isync`.

pub mod insn;
pub mod link;
pub mod patching;
pub mod reloc;
pub mod sigframe;
pub mod site;
pub mod toc;
pub mod unwind;

#[cfg(target_arch = "powerpc64")]
pub mod live;

use klp_arch::model::HandStack;
use klp_arch::{
    Arch, CacheStep, EncodeError, Endian, FuncInfo, InsnBytes, Redirect, Reloc, RelocCtx,
    RelocError, SafePointHook, Site, SiteError, StackMemory, TraceSink, UnwindError, UnwindStart,
};

/// The ppc64le back-end (a marker type: it has no values).
#[derive(Debug)]
pub enum Ppc64le {}

/// The kernel's `flush_icache_range` on 64-bit Book3S: write back each data-cache
/// block, `sync`, invalidate each instruction-cache block, `sync`, `isync`.
/// (gcc's `__builtin___clear_cache` does nothing here, so this must be explicit.)
pub const CACHE_SYNC: &[CacheStep] = &[
    CacheStep::DcbstEachLine,
    CacheStep::Sync,
    CacheStep::IcbiEachLine,
    CacheStep::Sync,
    CacheStep::Isync,
];

impl Arch for Ppc64le {
    const NAME: &'static str = "ppc64le";
    const ELF_MACHINE: u16 = 21;
    const ENDIAN: Endian = Endian::Little;
    const HAVE_RELIABLE_STACKTRACE: bool = true;
    const SYSCALL_PREFIX: &'static str = "";
    const MAX_SITE_LEN: usize = site::LEN;
    const CACHE_SYNC: &'static [CacheStep] = CACHE_SYNC;
    const SAFE_POINT_HOOK: SafePointHook = SafePointHook::LivepatchStackCheck;
    const SITE_FLAGS: &'static str = "-pg -mprofile-kernel";
    /// `R_PPC64_ADDR64`.
    const ABS64_RELOC: u32 = 38;

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
        ctx: &RelocCtx,
    ) -> Result<(), RelocError> {
        reloc::apply(section, section_addr, reloc, ctx)
    }

    /// Turns the TOC restore after an external `bl` back into the `nop` that
    /// `apply_relocation` expects there.
    fn clear_relocation(section: &mut [u8], reloc: &Reloc) -> Result<(), RelocError> {
        reloc::clear(section, reloc)
    }

    const CALLS_LEAVING_OBJECT_NEED_STUB: bool = true;

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

    fn local_entry(addr: u64, st_other: u8) -> u64 {
        addr.wrapping_add(site::local_entry_offset(st_other).unwrap_or(0))
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
                0x1b, 0x00, 0x4c, 0x3c, 0x00, 0x82, 0x42, 0x38, 0xa6, 0x02, 0x08, 0x7c, 0x01, 0x00,
                0x00, 0x48,
            ],
            func: FuncInfo {
                addr: 0xc000_0000_0010_0000,
                st_other: 3 << 5,
            },
            near: 0xc000_0000_0110_0000,
            far: 0xc000_0000_0410_0000,
        };
        assert_eq!(check::<Ppc64le>(&sample), Ok(()));
    }
}
