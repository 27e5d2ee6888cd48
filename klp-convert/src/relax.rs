//! GOT-relative references to converted symbols, relaxed into direct ones as a linker
//! does.
//!
//! Position-independent code (`gcc -fPIE`/`-fPIC`, the default of most distributions'
//! compilers) reaches a symbol it cannot assume local through a GOT entry that the
//! linker fills with its address. A livepatch object has no GOT: the kernel's module
//! loader and the livepatch core's relocation writer (`apply_relocate_add`) write
//! direct references only. A symbol that becomes `.klp.sym` is, however, always
//! resolved to an address in the running image — exactly the case in which a static
//! linker *relaxes* a GOT load into a direct address computation. klp-convert does the
//! same rewrite, following each psABI's relaxation rules, for relocations against
//! converted symbols only (ordinary ones stay for the loader, which may provide GOT
//! slots):
//!
//! The rules are each psABI's and live in the architecture back-ends
//! (`klp_arch::Arch::relax_got`: x86_64's `GOTPCRELX` `mov`/`call`/`jmp`, aarch64's
//! `ADR_GOT_PAGE`/`LD64_GOT_LO12_NC`, s390x's `GOTENT` `lgrl`, riscv64's `GOT_HI20`
//! with its `PCREL_LO12_I` `ld`s); this module asks the back-end of the patch's
//! machine and reports what it did.
//!
//! Every other GOT-relative type (`R_X86_64_GOTPCREL` — no marker that the
//! instruction may be rewritten —, `R_AARCH64_LD64_GOTPAGE_LO15`, `R_390_GOT12`, …) is
//! left alone, and the relocation is refused as one the core cannot write. A
//! relaxable type on an instruction the rules do not cover is refused with the
//! instruction found.

use klp_arch::GotRef;
use klp_backends::Visit;

use crate::elf::Arch;

/// One relaxed relocation.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Relaxed {
    /// The relocated section.
    pub section: String,
    /// `r_offset` after the rewrite (x86_64's `jmp` moves it one byte back).
    pub offset: u64,
    /// The GOT-relative type found.
    pub from: u32,
    /// The direct type written.
    pub to: u32,
    /// The symbol (its name in the input).
    pub symbol: String,
    /// The instruction rewrite, e.g. `mov → lea`.
    pub rewrite: &'static str,
}

/// A relaxation done to one relocation: its new type and offset, and what changed.
pub(crate) type Done = klp_arch::Relaxed;

/// Why a relaxable relocation could not be relaxed: what the rule needs, and what
/// was found.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Refused {
    pub expected: &'static str,
    pub found: String,
}

impl From<klp_arch::RelaxRefused> for Refused {
    fn from(r: klp_arch::RelaxRefused) -> Refused {
        Refused {
            expected: r.expected,
            found: r.found.to_string(),
        }
    }
}

/// Whether `r_type` is one of the GOT-relative types the back-end of `arch` relaxes
/// (`klp_arch::Arch::is_got_relaxable`); an architecture without rules has none, and
/// its GOT references are refused as ones the core cannot write.
pub fn relaxable(arch: Arch, r_type: u32) -> bool {
    struct Ask(u32);
    impl Visit for Ask {
        type Out = bool;
        fn visit<A: klp_arch::Arch>(self) -> bool {
            A::is_got_relaxable(self.0)
        }
    }
    klp_backends::by_name(arch.name(), Ask(r_type)).unwrap_or(false)
}

/// Rewrites the instruction that the relocation (`r_type`, `offset`, `addend`)
/// relocates in `text` (the relocated section's bytes), and those its `partners`
/// (the offsets of the entries partnered with it, `klp_arch::Arch::is_partnered`)
/// relocate, and returns the direct relocation to write instead; `address` is the
/// symbol's address in its target, when known. `Ok(None)`: not a type the back-end
/// relaxes (nothing changed). `Err`: a relaxable type on an instruction the rules do
/// not cover (nothing changed).
pub(crate) fn relax(
    arch: Arch,
    text: &mut [u8],
    r_type: u32,
    offset: u64,
    addend: i64,
    address: Option<u64>,
    partners: &[u64],
) -> Result<Option<Done>, Refused> {
    struct Relax<'a> {
        text: &'a mut [u8],
        got: GotRef,
        partners: &'a [u64],
    }
    impl Visit for Relax<'_> {
        type Out = Result<Option<Done>, Refused>;
        fn visit<A: klp_arch::Arch>(self) -> Self::Out {
            A::relax_got(self.text, &self.got, self.partners).map_err(Refused::from)
        }
    }
    let v = Relax {
        text,
        got: GotRef {
            r_type,
            offset,
            addend,
            address,
        },
        partners,
    };
    klp_backends::by_name(arch.name(), v).unwrap_or(Ok(None))
}

#[cfg(test)]
mod tests {
    use super::*;

    // The rules themselves are tested in each back-end (`klp_arch_<arch>::relax`);
    // here: that the back-end of the patch's machine is asked, and what a refusal
    // reads like.

    #[test]
    fn the_back_end_of_the_machine_relaxes() {
        // x86_64: mov 0(%rip), %rax (REX.W 8b 05), R_X86_64_REX_GOTPCRELX (42).
        let mut t = vec![0x48, 0x8b, 0x05, 0, 0, 0, 0, 0xc3];
        let d = relax(Arch::X86_64, &mut t, 42, 3, -4, None, &[])
            .unwrap()
            .unwrap();
        assert_eq!((d.r_type, d.offset, d.rewrite), (2, 3, "mov → lea"));
        assert_eq!(t, [0x48, 0x8d, 0x05, 0, 0, 0, 0, 0xc3]);
        // aarch64: ldr x1, [x1] (R_AARCH64_LD64_GOT_LO12_NC, 312) -> add x1, x1, #0.
        let mut t = 0xf940_0021u32.to_le_bytes().to_vec();
        let d = relax(Arch::AARCH64, &mut t, 312, 0, 0, None, &[])
            .unwrap()
            .unwrap();
        assert_eq!(d.r_type, 277);
        assert_eq!(t, 0x9100_0021u32.to_le_bytes());
        // s390x: lgrl %r2 (R_390_GOTENT, 26) -> larl %r2.
        let mut t = vec![0xc4, 0x28, 0, 0, 0, 0];
        let d = relax(Arch::S390X, &mut t, 26, 2, 2, Some(0x1000), &[])
            .unwrap()
            .unwrap();
        assert_eq!(d.r_type, 19);
        assert_eq!(t[..2], [0xc0, 0x20]);
        // ppc64le relaxes nothing: the type is left to the writability check.
        assert_eq!(
            relax(Arch::PPC64LE, &mut [0u8; 8], 26, 2, 2, None, &[]),
            Ok(None)
        );
        assert!(relaxable(Arch::X86_64, 41) && relaxable(Arch::X86_64, 42));
        assert!(!relaxable(Arch::X86_64, 9) && !relaxable(Arch::PPC64LE, 26));
        assert!(relaxable(Arch::AARCH64, 311) && relaxable(Arch::S390X, 26));
    }

    #[test]
    fn refusals_name_the_rule_and_what_was_found() {
        // add foo@GOTPCREL(%rip), %rax: 48 03 05.
        let bytes = vec![0x48, 0x03, 0x05, 0, 0, 0, 0];
        let mut t = bytes.clone();
        let e = relax(Arch::X86_64, &mut t, 42, 3, -4, None, &[]).unwrap_err();
        assert!(e.expected.contains("mov foo@GOTPCREL"), "{e:?}");
        assert_eq!(e.found, "the instruction there is `48 03 05 00 00 00 00`");
        assert_eq!(t, bytes);
        let e = relax(Arch::AARCH64, &mut [0u8; 4], 311, 0, 8, None, &[]).unwrap_err();
        assert_eq!(
            e.found,
            "the instruction there is 0x00000000, with addend 8"
        );
        let e = relax(
            Arch::S390X,
            &mut [0xc4, 0x28, 0, 0, 0, 0],
            26,
            2,
            2,
            Some(3),
            &[],
        )
        .unwrap_err();
        assert_eq!(
            e.found,
            "the symbol is at the odd address 0x3 in its target"
        );
    }
}
