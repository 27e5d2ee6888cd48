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
//! klp back-end for x86_64.
//!
//! * [`site`]: the entry forms compilers emit (`-mfentry` call or 5-byte nop,
//!   `-fpatchable-function-entry` nops, LLVM's byte-counted nops, optional `endbr64`).
//! * [`callsite`]: the call sites a host retargets in the steady state (direct and
//!   through the GOT), found from `--emit-relocs` relocations.
//! * [`insn`]: `call`/`jmp rel32` encoders and the recommended multi-byte nops.
//! * [`reloc`]: `apply_relocate_add` for the types a livepatch object uses.
//! * [`unwind`]: the frame-pointer reliable walker.
//! * `live` (x86_64 builds only): text writes and register capture.
//!
//! x86 keeps its instruction cache coherent with stores, so a text write needs no
//! flush on the writing CPU; other CPUs must execute a serialising instruction before
//! running the new bytes (the kernel's `text_poke_sync`), which the host provides.

pub mod callsite;
pub mod insn;
pub mod link;
pub mod patching;
pub mod relax;
pub mod reloc;
pub mod sigframe;
pub mod site;
pub mod unwind;

#[cfg(target_arch = "x86_64")]
pub mod live;

use klp_arch::model::HandStack;
use klp_arch::{
    Arch, CacheStep, EncodeError, Endian, FuncInfo, InsnBytes, Redirect, Reloc, RelocCtx,
    RelocError, SafePointHook, Site, SiteError, StackMemory, TraceSink, UnwindError, UnwindStart,
};

/// The x86_64 back-end (a marker type: it has no values).
#[derive(Debug)]
pub enum X86_64 {}

impl Arch for X86_64 {
    const NAME: &'static str = "x86_64";
    const ELF_MACHINE: u16 = 62;
    const ENDIAN: Endian = Endian::Little;
    const HAVE_RELIABLE_STACKTRACE: bool = true;
    const SYSCALL_PREFIX: &'static str = "__x64_";
    const MAX_SITE_LEN: usize = site::MAX_LEN;
    const CACHE_SYNC: &'static [CacheStep] = &[];
    const SAFE_POINT_HOOK: SafePointHook = SafePointHook::Generic;
    const SITE_FLAGS: &'static str = "-fpatchable-function-entry=5";
    /// `R_X86_64_64`.
    const ABS64_RELOC: u32 = 1;

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

    /// Zeroes the field: x86_64's `apply_relocate_add` refuses a field that is not zero.
    fn clear_relocation(section: &mut [u8], reloc: &Reloc) -> Result<(), RelocError> {
        reloc::clear(section, reloc)
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
            code: &[0xf3, 0x0f, 0x1e, 0xfa, 0x0f, 0x1f, 0x44, 0x00, 0x00, 0x55],
            func: FuncInfo::at(0xffff_ffff_8100_0000),
            near: 0xffff_ffff_8200_0000,
            far: 0xffff_ffff_0000_0000,
        };
        assert_eq!(check::<X86_64>(&sample), Ok(()));
    }
}
