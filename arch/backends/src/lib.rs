#![no_std]
//! Every klp back-end, listed once, and the build-time choice of the native one.
//!
//! The list at the bottom of this file is the only place a back-end is named: one
//! line per architecture, `"<name>" => <crate>::<marker type>`. From it come
//!
//! * [`Native`]: the back-end of the target this build runs on, selected by the
//!   `klp_arch` cfg that this crate's build script derives from the target (the
//!   target architecture as Rust spells it; `ppc64le` for little-endian powerpc64).
//!   On a target without a back-end, `Native` is [`Unsupported`], whose every
//!   operation is an error, and [`SUPPORTED`] is false;
//! * [`NAMES`], [`by_name`] and [`by_machine`]: every back-end's knowledge at run
//!   time, whatever the target (simulators and tools that read other architectures'
//!   ELF files use them). A caller says what to do with a back-end as a [`Visit`].
//!
//! A new architecture adds its crate to the workspace and one line to the list.

use core::ffi::c_void;

use klp_arch::live::{EntryFn, EntryFrameFn};
use klp_arch::model::HandStack;
pub use klp_arch::{
    Arch, CacheStep, EncodeError, Endian, FuncInfo, InsnBytes, Live, Redirect, Regs, Reloc,
    RelocCtx, RelocError, SafePointHook, Site, SiteError, StackMemory, TraceSink, UcontextLayout,
    UnwindError, UnwindStart,
};

/// The name of the back-end for a target (`CARGO_CFG_TARGET_ARCH`,
/// `CARGO_CFG_TARGET_ENDIAN`), as this crate's build script derives it: the
/// architecture as Rust spells it, `ppc64le` for little-endian powerpc64. For build
/// scripts that look their target's back-end up with [`by_name`].
pub fn target_name<'a>(arch: &'a str, endian: &str) -> &'a str {
    match (arch, endian) {
        ("powerpc64", "little") => "ppc64le",
        _ => arch,
    }
}

/// Something to do with one back-end chosen at run time: `visit` is called with its
/// marker type.
pub trait Visit {
    /// What the visit returns.
    type Out;
    /// Runs with back-end `A`.
    fn visit<A: Arch>(self) -> Self::Out;
}

macro_rules! backends {
    ($($name:tt => $krate:ident :: $ty:ident,)*) => {
        /// The names of every back-end ([`Arch::NAME`]), in the list's order.
        pub const NAMES: &[&str] = &[$($name),*];

        /// Runs `v` with the back-end called `name`; gives `v` back if there is none.
        pub fn by_name<V: Visit>(name: &str, v: V) -> Result<V::Out, V> {
            $(
                if name == <$krate::$ty as Arch>::NAME {
                    return Ok(v.visit::<$krate::$ty>());
                }
            )*
            Err(v)
        }

        /// Runs `v` with the back-end of ELF machine `machine` (`e_machine`); gives
        /// `v` back if there is none.
        pub fn by_machine<V: Visit>(machine: u16, v: V) -> Result<V::Out, V> {
            $(
                if machine == <$krate::$ty as Arch>::ELF_MACHINE {
                    return Ok(v.visit::<$krate::$ty>());
                }
            )*
            Err(v)
        }

        $(
            #[cfg(klp_arch = $name)]
            /// The back-end of the architecture this build runs on.
            pub type Native = $krate::$ty;
            #[cfg(klp_arch = $name)]
            #[doc(hidden)]
            pub use $krate::patchable_wrapper;
        )*

        #[cfg(not(any($(klp_arch = $name),*)))]
        /// The back-end of the architecture this build runs on: none.
        pub type Native = Unsupported;
        #[cfg(not(any($(klp_arch = $name),*)))]
        #[doc(hidden)]
        pub use unsupported_patchable_wrapper as patchable_wrapper;

        /// Whether [`Native`] is a real back-end.
        pub const SUPPORTED: bool = cfg!(any($(klp_arch = $name),*));

        #[cfg(test)]
        mod listed {
            use super::*;

            #[test]
            fn every_line_names_its_back_end() {
                $(assert_eq!(<$krate::$ty as Arch>::NAME, $name);)*
            }
        }
    };
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

/// The live half of no back-end: nothing can be captured, patched or walked. A host
/// finds no patch site on this build (every [`Arch::find_site`] fails), so it never
/// writes text; a stopped thread's registers read as zero, which no stack check
/// accepts.
impl Live for Unsupported {
    const UCONTEXT: Option<UcontextLayout> = None;
    const HAS_LINK_REGISTER: bool = false;
    const USER_STACK_WALKABLE: bool = false;
    const ENTRY_FRAME: EntryFrameFn = no_entry_frame;

    fn capture() -> UnwindStart {
        UnwindStart::default()
    }

    fn trampoline() -> u64 {
        0
    }

    unsafe fn write_text(_dst: *mut u8, _bytes: &[u8]) {}

    fn sync_icache(_addr: *const u8, _len: usize) {}

    unsafe fn store_text(_dst: *mut u8, _bytes: &[u8]) -> bool {
        false
    }

    fn set_decision(_f: extern "C" fn(u64) -> u64) {}
}

/// No site is rewritten live without a back-end (every item is the trait's refusal).
impl klp_arch::SitePlanner for Unsupported {}

/// No call site is retargeted without a back-end (every item is the trait's default).
impl klp_arch::CallSites for Unsupported {}

/// The wrapper of `klp_user::patchable!` without a back-end: a plain `extern "C"`
/// function that calls its body (it has no site, so no patch can replace it).
#[doc(hidden)]
#[macro_export]
macro_rules! unsupported_patchable_wrapper {
    ($(#[$m:meta])* $vis:vis fn $name:ident($($arg:ident : $ty:ty),*) $(-> $ret:ty)?) => {
        $(#[$m])*
        #[unsafe(no_mangle)]
        #[inline(never)]
        $vis extern "C" fn $name($($arg: $ty),*) $(-> $ret)? {
            $name::body($($arg),*)
        }
    };
}

/// Calls `f(arg, 0)`: without a back-end there is no frame a walk could end at.
///
/// # Safety
///
/// 1. `f` may be called with `arg` and a null frame.
unsafe extern "C" fn no_entry_frame(f: EntryFn, arg: *mut c_void) -> *mut c_void {
    f(arg, core::ptr::null_mut())
}

// The list: one line per back-end.
backends! {
    "x86_64" => klp_arch_x86_64::X86_64,
    "aarch64" => klp_arch_aarch64::Aarch64,
    "ppc64le" => klp_arch_ppc64le::Ppc64le,
    "s390x" => klp_arch_s390x::S390x,
    "riscv64" => klp_arch_riscv64::Riscv64,
}

#[cfg(test)]
mod tests {
    use super::*;
    use klp_arch::SiteForm;

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

    struct Name;
    impl Visit for Name {
        type Out = (&'static str, u16);
        fn visit<A: Arch>(self) -> Self::Out {
            (A::NAME, A::ELF_MACHINE)
        }
    }

    #[test]
    fn back_ends_are_found_by_name_and_machine() {
        for &n in NAMES {
            let (name, machine) = by_name(n, Name).ok().expect("listed");
            assert_eq!(name, n);
            assert_eq!(by_machine(machine, Name).ok().map(|o| o.0), Some(n));
        }
        assert!(by_name("vax", Name).is_err());
        assert!(by_machine(0, Name).is_err());
        // EM_X86_64 and EM_AARCH64 from the ELF specification.
        assert_eq!(by_machine(62, Name).ok().map(|o| o.0), Some("x86_64"));
        assert_eq!(by_machine(183, Name).ok().map(|o| o.0), Some("aarch64"));
    }

    #[test]
    fn native_matches_the_build() {
        const { assert!(SUPPORTED, "every CI target has a back-end") };
        // The target's name written independently of the build script.
        let expected = match core::env!("KLP_TARGET_ARCH") {
            "powerpc64" => "ppc64le",
            other => other,
        };
        assert_eq!(Native::NAME, expected);
        assert_eq!(
            Native::ENDIAN == Endian::Big,
            cfg!(target_endian = "big"),
            "the back-end's byte order is the build's"
        );
        const { assert!(Native::HAVE_RELIABLE_STACKTRACE) };
        assert_eq!(klp_arch::conformance::check_robustness::<Native>(), Ok(()));
    }
}
