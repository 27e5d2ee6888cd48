//! Build-time selection of the native architecture back-end.
//!
//! This is the only file of the core that names a target architecture. Everything
//! else uses [`Native`] through the [`Arch`] trait of `klp-arch`, and [`SUPPORTED`]
//! says whether the build has a real back-end. On any other architecture (including
//! big-endian 64-bit powerpc, which has no reliable stack walker in the kernel either)
//! `Native` is [`Unsupported`]: every operation returns an error, nothing panics.

pub use klp_arch::{
    Arch, CacheStep, EncodeError, Endian, FuncInfo, InsnBytes, LinkClass, MAX_CALL_STUB, Redirect,
    RedirectKind, Reloc, RelocCtx, RelocError, SafePointHook, Site, SiteError, SiteForm,
    StackBounds, StackMemory, Trace, TraceSink, UnwindError, UnwindStart,
};

use klp_arch::model::HandStack;

cfg_if::cfg_if! {
    if #[cfg(target_arch = "x86_64")] {
        /// The back-end of the architecture this build runs on.
        pub type Native = klp_arch_x86_64::X86_64;
        /// Whether [`Native`] is a real back-end.
        pub const SUPPORTED: bool = true;
    } else if #[cfg(target_arch = "aarch64")] {
        /// The back-end of the architecture this build runs on.
        pub type Native = klp_arch_aarch64::Aarch64;
        /// Whether [`Native`] is a real back-end.
        pub const SUPPORTED: bool = true;
    } else if #[cfg(all(target_arch = "powerpc64", target_endian = "little"))] {
        /// The back-end of the architecture this build runs on.
        pub type Native = klp_arch_ppc64le::Ppc64le;
        /// Whether [`Native`] is a real back-end.
        pub const SUPPORTED: bool = true;
    } else if #[cfg(target_arch = "s390x")] {
        /// The back-end of the architecture this build runs on.
        pub type Native = klp_arch_s390x::S390x;
        /// Whether [`Native`] is a real back-end.
        pub const SUPPORTED: bool = true;
    } else {
        /// The back-end of the architecture this build runs on.
        pub type Native = Unsupported;
        /// Whether [`Native`] is a real back-end.
        pub const SUPPORTED: bool = false;
    }
}

/// The back-end of a build without one: no sites, no relocations, no reliable stack
/// traces (so tasks switch only at safe points or by force). It has no values.
#[derive(Debug)]
pub enum Unsupported {}

impl Arch for Unsupported {
    const NAME: &'static str = "unsupported";
    const ELF_MACHINE: u16 = 0;
    const ENDIAN: Endian = if cfg!(target_endian = "big") {
        Endian::Big
    } else {
        Endian::Little
    };
    const HAVE_RELIABLE_STACKTRACE: bool = false;
    const SYSCALL_PREFIX: &'static str = "";
    const MAX_SITE_LEN: usize = 0;
    const CACHE_SYNC: &'static [CacheStep] = &[];
    const SAFE_POINT_HOOK: SafePointHook = SafePointHook::Generic;

    fn find_site(_code: &[u8], _func: FuncInfo) -> Result<Site, SiteError> {
        Err(SiteError::Unsupported)
    }

    fn encode_redirect(_site: &Site, _redirect: Redirect) -> Result<InsnBytes, EncodeError> {
        Err(EncodeError::Unsupported)
    }

    fn restore(_site: &Site) -> InsnBytes {
        InsnBytes::EMPTY
    }

    fn apply_relocation(
        _section: &mut [u8],
        _section_addr: u64,
        _reloc: &Reloc,
        _ctx: &RelocCtx,
    ) -> Result<(), RelocError> {
        Err(RelocError::Unsupported)
    }

    fn unwind_reliable(
        _mem: &dyn StackMemory,
        _start: &UnwindStart,
        _sink: &mut dyn TraceSink,
    ) -> Result<usize, UnwindError> {
        Err(UnwindError::Unsupported)
    }

    fn model_stack(_mem: &mut HandStack, _trace: &[u64]) -> Option<UnwindStart> {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unsupported_returns_errors() {
        let f = FuncInfo::at(0x1000);
        assert_eq!(
            Unsupported::find_site(&[0x90; 8], f),
            Err(SiteError::Unsupported)
        );
        let site = Site {
            func: f,
            offset: 0,
            form: SiteForm::new(1),
            original: InsnBytes::EMPTY,
        };
        assert_eq!(
            Unsupported::encode_redirect(&site, Redirect::jump(0x2000)),
            Err(EncodeError::Unsupported)
        );
        let r = Reloc {
            r_type: 1,
            offset: 0,
            sym: 0,
            addend: 0,
            external: false,
        };
        assert_eq!(
            Unsupported::apply_relocation(&mut [0; 8], 0, &r, &RelocCtx::default()),
            Err(RelocError::Unsupported)
        );
        let mem = HandStack::new(0x1000, 0..0);
        assert_eq!(
            klp_arch::trace_reliable::<Unsupported>(&mem, &UnwindStart::default()),
            Err(UnwindError::Unsupported)
        );
        const { assert!(!Unsupported::HAVE_RELIABLE_STACKTRACE) };
    }

    #[test]
    fn native_matches_the_build() {
        const { assert!(SUPPORTED, "every CI target has a back-end") };
        let name = Native::NAME;
        let expected = if cfg!(target_arch = "x86_64") {
            "x86_64"
        } else if cfg!(target_arch = "aarch64") {
            "aarch64"
        } else if cfg!(target_arch = "powerpc64") {
            "ppc64le"
        } else {
            "s390x"
        };
        assert_eq!(name, expected);
        assert_eq!(
            Native::ENDIAN == Endian::Big,
            cfg!(target_endian = "big"),
            "the back-end's byte order is the build's"
        );
        const { assert!(Native::HAVE_RELIABLE_STACKTRACE) };
        assert_eq!(klp_arch::conformance::check_robustness::<Native>(), Ok(()));
    }
}
