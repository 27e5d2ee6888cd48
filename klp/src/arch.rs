//! The native architecture back-end, as `klp-backends` selects it.
//!
//! The core names no architecture: everything uses [`Native`] through the [`Arch`]
//! trait of `klp-arch`, and [`SUPPORTED`] says whether the build has a real back-end.
//! On any other architecture (including big-endian 64-bit powerpc, which has no
//! reliable stack walker in the kernel either) `Native` is [`Unsupported`]: every
//! operation returns an error, nothing panics.

pub use klp_arch::{
    Arch, CacheStep, EncodeError, Endian, FuncInfo, InsnBytes, LinkClass, MAX_CALL_STUB, Redirect,
    RedirectKind, Reloc, RelocCtx, RelocError, SafePointHook, Site, SiteError, SiteForm,
    StackBounds, StackMemory, Trace, TraceSink, UnwindError, UnwindStart,
};

pub use klp_backends::{Native, SUPPORTED, Unsupported};
