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
//! The architecture interface of klp.
//!
//! The generic core owns every livepatch *decision*; an architecture back-end owns the
//! *mechanism*: how a function entry is recognised and redirected, how relocations of
//! a livepatch object are written, how a stack is walked reliably, how the instruction
//! cache is kept coherent. This crate is the contract between the two.
//!
//! A back-end is one crate (`klp-arch-<arch>`) with one uninhabited marker type
//! (`pub enum X86_64 {}`, …) that implements [`Arch`]. Everything in the trait is pure
//! *knowledge*: it compiles and is tested on every host, whatever the build target.
//! Code that only works on the real machine (text writes with the cache-coherence
//! sequence, register capture) lives in each back-end's `live` module, compiled only
//! for that target.
//!
//! Nothing here panics on bad input: every problem is a small `#[non_exhaustive]` error
//! enum that carries the values involved and maps to the errno the kernel would use.

mod bytes;
pub mod callsite;
pub mod conformance;
mod link;
pub mod live;
pub mod model;
pub mod patching;
pub mod relax;
mod reloc;
mod site;
mod unwind;

pub use bytes::{InsnBytes, read_u16, read_u32};
pub use callsite::{CallSite, CallSites, CallTarget, RelocatedCall};
pub use link::{LinkClass, MAX_CALL_STUB};
pub use live::{Live, Regs, UcontextLayout};
pub use patching::{Plan, PlanCtx, PlanError, SitePlanner, SiteState, TargetInfo};
pub use relax::{GotRef, RelaxFound, RelaxRefused, Relaxed};
pub use reloc::{Reloc, RelocCtx, RelocError, field};
pub use site::{
    EncodeError, FuncInfo, Redirect, RedirectKind, Site, SiteError, SiteForm, displacement,
};
pub use unwind::{
    MAX_CALL_LEN, MAX_STACK_ENTRIES, StackBounds, StackMemory, Trace, TraceSink, UnwindError,
    UnwindStart, check,
};

/// The errno values the errors map to (positive; the kernel returns them negated).
pub mod errno {
    /// Invalid argument.
    pub const EINVAL: i32 = 22;
    /// Result out of range.
    pub const ERANGE: i32 = 34;
    /// Exec format error (what `apply_relocate_add` returns).
    pub const ENOEXEC: i32 = 8;
    /// Function not implemented (no back-end for this architecture).
    pub const ENOSYS: i32 = 38;
}

/// Byte order of the architecture's memory.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Endian {
    /// Least significant byte first.
    Little,
    /// Most significant byte first (s390x).
    Big,
}

/// One step of an instruction-cache coherence sequence, as the back-end's live code
/// performs it after writing text. QEMU cannot catch a missing step, so the sequence
/// is data that tests assert, and the live code is checked against it in CI.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum CacheStep {
    /// aarch64 `dc cvau` on every data-cache line of the range.
    DcCvauEachLine,
    /// aarch64 `ic ivau` on every instruction-cache line of the range.
    IcIvauEachLine,
    /// aarch64 `dsb ish`.
    DsbIsh,
    /// aarch64 `isb`.
    Isb,
    /// ppc64le `dcbst` on every data-cache block of the range.
    DcbstEachLine,
    /// ppc64le `icbi` on every instruction-cache block of the range.
    IcbiEachLine,
    /// ppc64le `sync`.
    Sync,
    /// ppc64le `isync`.
    Isync,
    /// s390x `bcr 15,0`: a serialising instruction.
    Serialize,
}

impl CacheStep {
    /// The instruction as binutils' `objdump` names it (mnemonic and first operand),
    /// which `ci/objdump-check` looks for in the live code.
    pub const fn mnemonic(self) -> &'static str {
        match self {
            CacheStep::DcCvauEachLine => "dc cvau",
            CacheStep::IcIvauEachLine => "ic ivau",
            CacheStep::DsbIsh => "dsb ish",
            CacheStep::Isb => "isb",
            CacheStep::DcbstEachLine => "dcbst",
            CacheStep::IcbiEachLine => "icbi",
            CacheStep::Sync => "sync",
            CacheStep::Isync => "isync",
            CacheStep::Serialize => "bcr 15",
        }
    }
}

/// Where an architecture adds something to the core's safe-point update
/// (`klp_update_patch_state`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum SafePointHook {
    /// Nothing beyond the generic hooks (exit to user mode, idle loop).
    Generic,
    /// ppc64le: the thread's livepatch stack must be consistent (every frame carries
    /// its marker); a thread at a safe point reached from user mode has it empty.
    LivepatchStackCheck,
}

/// What every architecture back-end provides. Implemented by an uninhabited marker
/// type, so all items are associated functions and constants.
pub trait Arch: 'static {
    /// Short name (`"x86_64"`, `"aarch64"`, `"ppc64le"`, `"s390x"`).
    const NAME: &'static str;
    /// ELF `e_machine` (`EM_X86_64` = 62, `EM_AARCH64` = 183, `EM_PPC64` = 21,
    /// `EM_S390` = 22).
    const ELF_MACHINE: u16;
    /// Byte order.
    const ENDIAN: Endian;
    /// Whether the arch has a reliable stack walker (`HAVE_RELIABLE_STACKTRACE`).
    /// When false, tasks switch only at safe points or by force.
    const HAVE_RELIABLE_STACKTRACE: bool;
    /// The kernel's syscall symbol prefix (`__x64_`, `__arm64_`, `""`, `__s390x_`).
    const SYSCALL_PREFIX: &'static str;
    /// Bytes a redirect rewrites at most.
    const MAX_SITE_LEN: usize;
    /// The instruction-cache coherence sequence after a text write.
    const CACHE_SYNC: &'static [CacheStep];
    /// What the arch adds to the safe-point update.
    const SAFE_POINT_HOOK: SafePointHook;
    /// The gcc flags that give a C function a patch site this back-end recognises
    /// (for messages that tell a user how to rebuild).
    const SITE_FLAGS: &'static str = "";
    /// The relocation type of a 64-bit absolute address (`R_X86_64_64`,
    /// `R_AARCH64_ABS64`, …): what a livepatch object's data refers to another
    /// object with (0: none).
    const ABS64_RELOC: u32 = 0;
    /// The gcc flags, beyond `-fno-omit-frame-pointer`, that make a C program's stacks
    /// walkable by this back-end's unwinder (s390x: `-mbackchain`).
    const WALK_CFLAGS: &'static str = "";

    /// Recognises the unpatched patch site of the function `func` whose first bytes are
    /// `code` (from the symbol address on). Anything that is not one of the arch's
    /// unpatched entry forms is refused with the bytes found.
    fn find_site(code: &[u8], func: FuncInfo) -> Result<Site, SiteError>;

    /// The bytes that replace `site.original` to perform `redirect`. Always exactly
    /// `site.len()` bytes; a target out of reach is an error, never truncated.
    fn encode_redirect(site: &Site, redirect: Redirect) -> Result<InsnBytes, EncodeError>;

    /// The bytes that undo a redirect: the site as it was found.
    fn restore(site: &Site) -> InsnBytes {
        site.original
    }

    /// Writes one relocation into `section`, which is loaded at `section_addr`
    /// (`apply_relocate_add` for one entry). On error the section is unchanged.
    fn apply_relocation(
        section: &mut [u8],
        section_addr: u64,
        reloc: &Reloc,
        ctx: &RelocCtx,
    ) -> Result<(), RelocError>;

    /// Undoes what [`Arch::apply_relocation`] wrote for `reloc`, so that the relocation
    /// can be written again later (the kernel's `clear_relocate_add`, used when the
    /// object a livepatch relocation section targets goes away). On error the section
    /// is unchanged. Default: nothing to undo (the arch's relocations overwrite their
    /// fields whole).
    fn clear_relocation(section: &mut [u8], reloc: &Reloc) -> Result<(), RelocError> {
        let _ = (section, reloc);
        Ok(())
    }

    /// Whether an entry of type `r_type` is *partnered*: instead of a symbol to
    /// resolve, its symbol names the place of another entry of the same relocation
    /// section, whose value it shares (riscv64's `R_RISCV_PCREL_LO12_I`/`_S`: the
    /// symbol is the label of the `auipc` that a `PCREL_HI20` or `GOT_HI20` entry
    /// relocates, and the low part written is that entry's). A host resolves such a
    /// symbol to the partner's place (a label of the patch's own section, never a
    /// livepatch symbol), writes every other entry of the section first, and then the
    /// partnered ones with [`Arch::apply_partnered`]; a converter keeps a partnered
    /// entry in the relocation section of its partner. Default: no such types.
    fn is_partnered(r_type: u32) -> bool {
        let _ = r_type;
        false
    }

    /// Writes `reloc`, a partnered entry (see [`Arch::is_partnered`]) whose `sym` is
    /// its partner's place, into `section` (loaded at `section_addr`). `written` holds
    /// the other entries of its relocation section as the host wrote them (resolved;
    /// a GOT reference with the type and slot the host used, see [`LinkClass`]). On
    /// error the section is unchanged. Default: the type is not supported.
    fn apply_partnered(
        section: &mut [u8],
        section_addr: u64,
        reloc: &Reloc,
        written: &[Reloc],
    ) -> Result<(), RelocError> {
        let _ = (section, section_addr, written);
        Err(RelocError::UnsupportedType {
            r_type: reloc.r_type,
        })
    }

    /// Whether `r_type` is a GOT-relative type that [`Arch::relax_got`] may rewrite into
    /// a direct reference (x86_64's `R_X86_64_GOTPCRELX`, aarch64's
    /// `R_AARCH64_ADR_GOT_PAGE`, …). Default: none.
    fn is_got_relaxable(r_type: u32) -> bool {
        let _ = r_type;
        false
    }

    /// Relaxes `got`, a GOT-relative reference to a symbol that resolves into the
    /// running image, into a direct one as the psABI lets a static linker do: rewrites
    /// the instruction(s) in `text` (the relocated section's bytes) and returns the
    /// direct relocation to write instead. `partners` are the offsets of the entries
    /// of the same relocation section that are partnered with it (see
    /// [`Arch::is_partnered`]: their symbol is `got`'s place), whose instructions the
    /// rule may rewrite too; they keep their type and symbol.
    ///
    /// `Ok(None)` exactly when `got.r_type` is not [`Arch::is_got_relaxable`] (nothing
    /// changed); `Err` when it is, on instructions the rule does not cover (nothing
    /// changed). Default: the arch relaxes nothing.
    fn relax_got(
        text: &mut [u8],
        got: &GotRef,
        partners: &[u64],
    ) -> Result<Option<Relaxed>, RelaxRefused> {
        let _ = (text, got, partners);
        Ok(None)
    }

    /// Whether a call from a loaded patch object to any function outside it goes
    /// through a call stub whatever the distance (ppc64le: the callee has another TOC,
    /// which the stub switches to after saving the caller's, see the arch's `reloc`).
    const CALLS_LEAVING_OBJECT_NEED_STUB: bool = false;

    /// How a user-space loader links an ordinary relocation of type `r_type` (see
    /// [`LinkClass`]). Default: every type is written as it is.
    fn link_class(r_type: u32) -> LinkClass {
        let _ = r_type;
        LinkClass::Plain
    }

    /// Writes into `out` a call stub placed at `at` that jumps to `target`, clobbering
    /// only registers the calling convention lets a linker's stub clobber, and returns
    /// its length (at most [`MAX_CALL_STUB`]; `at` must be 8-aligned). Default: no
    /// stubs on this arch.
    fn call_stub(
        at: u64,
        target: u64,
        out: &mut [u8; MAX_CALL_STUB],
    ) -> Result<usize, EncodeError> {
        let _ = (at, target, out);
        Err(EncodeError::Unsupported)
    }

    /// The address a direct call from the same object enters the function at `addr`
    /// whose symbol has `st_other` (ppc64le: the local entry, past the TOC setup).
    fn local_entry(addr: u64, st_other: u8) -> u64 {
        let _ = st_other;
        addr
    }

    /// Walks the stack reliably from `start`, handing every return address (innermost
    /// first, starting with `start.pc`) to `sink`. Returns the number of entries, or
    /// why the trace cannot be trusted.
    fn unwind_reliable(
        mem: &dyn StackMemory,
        start: &UnwindStart,
        sink: &mut dyn TraceSink,
    ) -> Result<usize, UnwindError>;

    /// Whether an address could be a *return address*: `before` holds the bytes of
    /// code that end right at the candidate address (at most [`MAX_CALL_LEN`] bytes,
    /// the last byte of `before` is the one just below the address; fewer when less
    /// code is readable there), and the answer is whether they end with one of the
    /// arch's call instructions (direct or indirect, with link).
    ///
    /// A host's conservative stack scan uses this to tell return addresses from other
    /// code pointers that a stack slot may hold (a function pointer in a local, a stale
    /// slot): a word that does not follow a call cannot be the return address of a live
    /// frame. The answer must err on the side of `true`: a false positive only keeps a
    /// stale pointer in a trace (a stricter check), while a false negative could drop a
    /// real return address and let a stack check pass wrongly. So every call form the
    /// arch has is accepted, including forms that compilers rarely emit, and the
    /// decoder does not try to prove that the bytes really are one instruction (it
    /// cannot know where the previous instruction starts). Never panics; `before` may
    /// be empty (then no call fits).
    ///
    /// Every real back-end implements it. The provided answer, `true` whatever the
    /// bytes, is for a back-end without a decoder (the core's `Unsupported`): it keeps
    /// every code pointer, the safe direction.
    fn follows_call(before: &[u8]) -> bool {
        let _ = before;
        true
    }

    /// Lays out on `mem` a task stack in this arch's format (the kernel's, ending at
    /// the arch's `kernel_stack_end`) whose reliable trace is exactly `trace`
    /// (innermost first; `trace[0]` is where the task stopped), and returns where a
    /// walk starts. `None` when `trace` is empty or does not fit. For tests and
    /// simulators: the core's stack check can then be fed real traces of every arch.
    fn model_stack(mem: &mut model::HandStack, trace: &[u64]) -> Option<UnwindStart>;
}

/// Convenience: a reliable trace into a fresh [`Trace`].
pub fn trace_reliable<A: Arch>(
    mem: &dyn StackMemory,
    start: &UnwindStart,
) -> Result<Trace, UnwindError> {
    let mut t = Trace::new();
    A::unwind_reliable(mem, start, &mut t)?;
    Ok(t)
}
