//! Which relocation types the livepatch core can write, asked of klp's own
//! architecture back-ends (`Arch::apply_relocation`, which implements the kernel's
//! `apply_relocate_add` for each architecture), so a `.klp.rela` entry that could
//! never be written is refused here rather than when the patch is loaded.

use klp_arch::{Reloc, RelocCtx, RelocError};
use klp_backends::Visit;

use crate::elf::Arch;

/// Whether the livepatch core of `arch` writes relocations of type `r_type`. A
/// partnered type (`klp_arch::Arch::is_partnered`) is written, with
/// `Arch::apply_partnered` rather than one entry at a time.
///
/// The type is tried on a scratch section; only "unsupported type" counts as no
/// (a scratch value out of range, or a scratch instruction the type does not
/// expect, still shows the back-end knows the type).
pub fn writable(arch: Arch, r_type: u32) -> bool {
    struct Try(u32);
    impl Visit for Try {
        type Out = bool;
        fn visit<A: klp_arch::Arch>(self) -> bool {
            if A::is_partnered(self.0) {
                return true;
            }
            let mut scratch = [0u8; 32];
            let reloc = Reloc {
                r_type: self.0,
                offset: 8,
                sym: 0x1000,
                addend: 0,
                external: true,
            };
            let ctx = RelocCtx { toc: Some(0x8000) };
            let result = A::apply_relocation(&mut scratch, 0x1000, &reloc, &ctx);
            !matches!(result, Err(RelocError::UnsupportedType { .. }))
        }
    }
    klp_backends::by_name(arch.name(), Try(r_type)).unwrap_or(false)
}

/// Whether `r_type` is a GOT-relative reference that a process's loader serves with an
/// address slot of its own (`klp_arch::LinkClass::GotSlot`): such a reference to a
/// symbol of a library stays as it is in `.klp.rela.<library>` — the library may be
/// mapped anywhere, beyond the reach of a direct reference from the patch — while
/// one to the program's own symbol is relaxed (the loader places the patch near the
/// program). The kernel has no such loader, but kernel code is not built with `-fPIC`.
pub fn got_slot(arch: Arch, r_type: u32) -> bool {
    struct Class(u32);
    impl Visit for Class {
        type Out = bool;
        fn visit<A: klp_arch::Arch>(self) -> bool {
            matches!(A::link_class(self.0), klp_arch::LinkClass::GotSlot { .. })
        }
    }
    klp_backends::by_name(arch.name(), Class(r_type)).unwrap_or(false)
}

/// Whether entries of type `r_type` are partnered on `arch`
/// (`klp_arch::Arch::is_partnered`): their symbol names the place of another entry of
/// the same relocation section (riscv64's `PCREL_LO12_I`/`_S`), and they belong in
/// that entry's relocation section.
pub fn partnered(arch: Arch, r_type: u32) -> bool {
    struct Ask(u32);
    impl Visit for Ask {
        type Out = bool;
        fn visit<A: klp_arch::Arch>(self) -> bool {
            A::is_partnered(self.0)
        }
    }
    klp_backends::by_name(arch.name(), Ask(r_type)).unwrap_or(false)
}

/// The psABI name of a relocation type, when known.
pub fn type_name(arch: Arch, r_type: u32) -> Option<&'static str> {
    object::elf::machine_names(object::elf::Machine(arch.machine()))
        .r
        .name(object::elf::RelocationType(r_type))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_usual_types_are_writable_and_got_types_are_not() {
        // x86_64: R_X86_64_PLT32 (4), R_X86_64_PC32 (2) yes; R_X86_64_GOTPCREL (9) no.
        assert!(writable(Arch::X86_64, 4) && writable(Arch::X86_64, 2));
        assert!(!writable(Arch::X86_64, 9));
        // aarch64: CALL26 (283), ADR_PREL_PG_HI21 (275); ADR_GOT_PAGE (311) no.
        assert!(writable(Arch::AARCH64, 283) && writable(Arch::AARCH64, 275));
        assert!(!writable(Arch::AARCH64, 311));
        // ppc64le: REL24 (10), TOC16_HA (50), ADDR64 (38).
        assert!(writable(Arch::PPC64LE, 10) && writable(Arch::PPC64LE, 50));
        assert!(writable(Arch::PPC64LE, 38));
        // s390x: PLT32DBL (20), PC32DBL (19); GOTENT (26) no.
        assert!(writable(Arch::S390X, 20) && writable(Arch::S390X, 19));
        assert!(!writable(Arch::S390X, 26));
        assert_eq!(type_name(Arch::X86_64, 9), Some("R_X86_64_GOTPCREL"));
        // GOT references a process loader serves with slots.
        assert!(got_slot(Arch::X86_64, 42) && got_slot(Arch::AARCH64, 311));
        assert!(got_slot(Arch::S390X, 26) && !got_slot(Arch::X86_64, 2));
        assert_eq!(type_name(Arch::S390X, 20), Some("R_390_PLT32DBL"));
    }
}
