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
//! klp back-end for riscv64 (RV64GC, little endian, LP64D).
//!
//! * [`site`]: 8-byte sites from `-fpatchable-function-entry` (`nop; nop`, or four
//!   `c.nop`s with the C extension), the armed form `auipc t0; nop`, and the order in
//!   which a host writes a site's two words.
//! * [`insn`]: `auipc`, `jalr`, `jal`, `ld`, `nop`, `c.nop`, and the immediate fields
//!   relocations patch.
//! * [`relax`]: `GOT_HI20` + `ld` relaxed into `PCREL_HI20` + `addi` for a converter.
//! * [`reloc`]: `apply_relocate_add`, with the `PCREL_HI20`/`PCREL_LO12` pair search
//!   over a whole section ([`reloc::apply_all`]).
//! * [`link`]: link classes and the call stub of a process loader.
//! * [`unwind`]: the frame-pointer reliable walker.
//! * [`patching`]: how a host rewrites a site other threads are running (the plans of
//!   `klp_arch::patching`), and the site's stub.
//! * [`sigframe`]: where a signal frame keeps the registers.
//! * `live` (riscv64 builds only): register capture, text writes with the coherence
//!   sequence on every hart, the entry trampoline and entry frame, `impl Live`, and
//!   the `patchable_wrapper!` of klp-user's `patchable!`.
//!
//! # Instruction-cache coherence
//!
//! RISC-V keeps instruction fetch coherent with stores only after `fence.i`, and only
//! on the hart that executes it. After a text write the writing hart executes
//! `fence.i`; every other hart that may run the code must execute one too before it
//! fetches the new words: in the kernel `flush_icache_all()` (an SBI remote `fence.i`
//! or IPIs), in a process the `riscv_flush_icache(start, end, 0)` system call (which
//! covers all threads of the process) or `membarrier(MEMBARRIER_CMD_PRIVATE_EXPEDITED_
//! SYNC_CORE)`. After each store of a live site transition (see [`patching`]) the whole
//! sequence runs once; the user-space host's is `live::klp_riscv64_sync_icache` (`fence.i`,
//! then `riscv_flush_icache`), whose module docs say why a signal round alone does not
//! make the other harts fetch the new word on riscv.
//!
//! `klp_arch::CacheStep` has no riscv step, and this crate may not add one: [`CACHE_SYNC`]
//! names the local `fence.i` with the one arch-neutral step, [`CacheStep::Serialize`]
//! ("a serialising instruction"), whose `mnemonic()` is s390x's, so
//! [`sync_mnemonic`] gives the riscv one (`fence.i`) for the objdump check. The
//! cross-hart step (a system call or SBI call, not an instruction) has no `CacheStep`
//! at all; the live code performs it.

pub mod insn;
pub mod link;
#[cfg(target_arch = "riscv64")]
pub mod live;
pub mod patching;
pub mod relax;
pub mod reloc;
pub mod sigframe;
pub mod site;
pub mod unwind;

use klp_arch::model::HandStack;
use klp_arch::{
    Arch, CacheStep, EncodeError, Endian, FuncInfo, InsnBytes, Redirect, Reloc, RelocCtx,
    RelocError, SafePointHook, Site, SiteError, StackMemory, TraceSink, UnwindError, UnwindStart,
};

/// The riscv64 back-end (a marker type: it has no values).
#[derive(Debug)]
pub enum Riscv64 {}

/// The sequence after writing text, on the writing hart: `fence.i` (see the crate
/// docs for why this is [`CacheStep::Serialize`], and for the other harts).
pub const CACHE_SYNC: &[CacheStep] = &[CacheStep::Serialize];

/// The riscv instruction a [`CACHE_SYNC`] step stands for, as objdump names it.
pub const fn sync_mnemonic(step: CacheStep) -> &'static str {
    match step {
        CacheStep::Serialize => "fence.i",
        other => other.mnemonic(),
    }
}

impl Arch for Riscv64 {
    const NAME: &'static str = "riscv64";
    const ELF_MACHINE: u16 = 243;
    const ENDIAN: Endian = Endian::Little;
    const HAVE_RELIABLE_STACKTRACE: bool = true;
    const SYSCALL_PREFIX: &'static str = "__riscv_";
    const MAX_SITE_LEN: usize = site::LEN;
    const CACHE_SYNC: &'static [CacheStep] = CACHE_SYNC;
    const SAFE_POINT_HOOK: SafePointHook = SafePointHook::Generic;
    const SITE_FLAGS: &'static str = "-fpatchable-function-entry=4 -falign-functions=4";
    /// `R_RISCV_64`.
    const ABS64_RELOC: u32 = 2;

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

    fn is_partnered(r_type: u32) -> bool {
        matches!(r_type, reloc::PCREL_LO12_I | reloc::PCREL_LO12_S)
    }

    fn apply_partnered(
        section: &mut [u8],
        section_addr: u64,
        reloc: &Reloc,
        written: &[Reloc],
    ) -> Result<(), RelocError> {
        reloc::apply_partnered(section, section_addr, reloc, written)
    }

    fn is_got_relaxable(r_type: u32) -> bool {
        relax::relaxable(r_type)
    }

    fn relax_got(
        text: &mut [u8],
        got: &klp_arch::GotRef,
        partners: &[u64],
    ) -> Result<Option<klp_arch::Relaxed>, klp_arch::RelaxRefused> {
        relax::relax(text, got, partners)
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
        // gcc -march=rv64gc -fpatchable-function-entry=4: four c.nops, then
        // `c.addi sp, -16; c.sdsp s0, 0(sp)`.
        let sample = Sample {
            code: &[
                0x01, 0x00, 0x01, 0x00, 0x01, 0x00, 0x01, 0x00, 0x41, 0x11, 0x22, 0xe0,
            ],
            func: FuncInfo::at(0xffff_ffff_8010_0000),
            near: 0xffff_ffff_8018_0000,
            far: 0xffff_ffff_8010_0000 - (1 << 32),
        };
        assert_eq!(check::<Riscv64>(&sample), Ok(()));
        // And the form without C: `nop; nop; addi sp, sp, -16`.
        let sample = Sample {
            code: &[
                0x13, 0x00, 0x00, 0x00, 0x13, 0x00, 0x00, 0x00, 0x13, 0x01, 0x01, 0xff,
            ],
            func: FuncInfo::at(0x1_0000),
            near: 0x1_0000 + 0xf_fffe,
            far: 0x1_0000 + (1 << 31),
        };
        assert_eq!(check::<Riscv64>(&sample), Ok(()));
    }

    #[test]
    fn constants() {
        assert_eq!(Riscv64::NAME, "riscv64");
        assert_eq!(Riscv64::ELF_MACHINE, 243);
        assert_eq!(Riscv64::MAX_SITE_LEN, 8);
        let seq: [&str; 1] = [sync_mnemonic(CACHE_SYNC[0])];
        assert_eq!(seq, ["fence.i"]);
        assert_eq!(sync_mnemonic(CacheStep::Isb), "isb");
    }
}
