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
//! * x86_64 (psABI §B.2 "Optimize GOTPCRELX Relocations"): `R_X86_64_GOTPCRELX` /
//!   `R_X86_64_REX_GOTPCRELX` with addend -4 on
//!   * `mov foo@GOTPCREL(%rip), %reg` (`[REX] 8b /r`, ModRM `00 reg 101`) →
//!     `lea foo(%rip), %reg` (`[REX] 8d /r`) with `R_X86_64_PC32`;
//!   * `call *foo@GOTPCREL(%rip)` (`ff 15`) → `addr32 call foo` (`67 e8`) with
//!     `R_X86_64_PLT32` at the same offset;
//!   * `jmp *foo@GOTPCREL(%rip)` (`ff 25`) → `jmp foo; nop` (`e9 rel32 90`) with
//!     `R_X86_64_PLT32` one byte earlier (the field the `e9` reads), same addend.
//!
//!   These are GNU ld's rewrites (`-z call-nop=prefix-addr`, its default); the
//!   relocation types are the ones the assembler writes for the direct instruction
//!   (`R_X86_64_PC32` for `lea`, `R_X86_64_PLT32` for a branch, psABI §4.4).
//! * aarch64 (AAELF64 §5.7.7 and GNU ld's / lld's GOT relaxation):
//!   `R_AARCH64_ADR_GOT_PAGE` on `adrp xN, :got:foo` → the same `adrp` with
//!   `R_AARCH64_ADR_PREL_PG_HI21`; `R_AARCH64_LD64_GOT_LO12_NC` on `ldr xT, [xN,
//!   :got_lo12:foo]` (`f9400000 | imm12 << 10 | N << 5 | T`) → `add xT, xN,
//!   :lo12:foo` (`91000000 | N << 5 | T`) with `R_AARCH64_ADD_ABS_LO12_NC`. Addend 0.
//! * s390x (GNU ld's `elf_s390_relocate_section`): `R_390_GOTENT` on `lgrl %rN,
//!   foo@GOTENT` (`c4 N8`) → `larl %rN, foo` (`c0 N0`) with `R_390_PC32DBL`, addend
//!   2; refused when the symbol's address is odd (`larl` reaches even addresses only).
//!
//! Every other GOT-relative type (`R_X86_64_GOTPCREL` — no marker that the
//! instruction may be rewritten —, `R_AARCH64_LD64_GOTPAGE_LO15`, `R_390_GOT12`, …) is
//! left alone, and the relocation is refused as one the core cannot write. A
//! relaxable type on an instruction the rules do not cover is refused with the
//! instruction found.

use crate::elf::Arch;

/// `R_X86_64_PC32`.
const X86_PC32: u32 = 2;
/// `R_X86_64_PLT32`.
const X86_PLT32: u32 = 4;
/// `R_X86_64_GOTPCRELX`.
pub const X86_GOTPCRELX: u32 = 41;
/// `R_X86_64_REX_GOTPCRELX`.
pub const X86_REX_GOTPCRELX: u32 = 42;
/// `R_AARCH64_ADR_PREL_PG_HI21`.
const A64_ADR_PREL_PG_HI21: u32 = 275;
/// `R_AARCH64_ADD_ABS_LO12_NC`.
const A64_ADD_ABS_LO12_NC: u32 = 277;
/// `R_AARCH64_ADR_GOT_PAGE`.
pub const A64_ADR_GOT_PAGE: u32 = 311;
/// `R_AARCH64_LD64_GOT_LO12_NC`.
pub const A64_LD64_GOT_LO12_NC: u32 = 312;
/// `R_390_PC32DBL`.
const S390_PC32DBL: u32 = 19;
/// `R_390_GOTENT`.
pub const S390_GOTENT: u32 = 26;

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
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Done {
    pub r_type: u32,
    pub offset: u64,
    pub rewrite: &'static str,
}

/// Why a relaxable relocation could not be relaxed: what the rule needs, and what
/// was found.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Refused {
    pub expected: &'static str,
    pub found: String,
}

/// Whether `r_type` is one of the GOT-relative types this module relaxes on `arch`.
/// (Keyed by ELF machine: the psABIs' rules; another architecture has none here, and
/// its GOT references are refused as ones the core cannot write.)
pub fn relaxable(arch: Arch, r_type: u32) -> bool {
    match object::elf::Machine(arch.machine()) {
        object::elf::EM_X86_64 => matches!(r_type, X86_GOTPCRELX | X86_REX_GOTPCRELX),
        object::elf::EM_AARCH64 => matches!(r_type, A64_ADR_GOT_PAGE | A64_LD64_GOT_LO12_NC),
        object::elf::EM_S390 => r_type == S390_GOTENT,
        _ => false,
    }
}

fn bytes(text: &[u8], from: u64, len: u64) -> Option<&[u8]> {
    let start = usize::try_from(from).ok()?;
    let end = start.checked_add(usize::try_from(len).ok()?)?;
    text.get(start..end)
}

fn hex_bytes(b: &[u8]) -> String {
    b.iter()
        .map(|x| format!("{x:02x}"))
        .collect::<Vec<_>>()
        .join(" ")
}

/// Rewrites the instruction that the relocation (`r_type`, `offset`, `addend`)
/// relocates in `text` (the relocated section's bytes) and returns the direct
/// relocation to write instead; `address` is the symbol's address in its target,
/// when known. `Ok(None)`: not a type this module relaxes (nothing changed).
/// `Err`: a relaxable type on an instruction the rules do not cover (nothing
/// changed).
pub(crate) fn relax(
    arch: Arch,
    text: &mut [u8],
    r_type: u32,
    offset: u64,
    addend: i64,
    address: Option<u64>,
) -> Result<Option<Done>, Refused> {
    if !relaxable(arch, r_type) {
        return Ok(None);
    }
    match object::elf::Machine(arch.machine()) {
        object::elf::EM_X86_64 => x86_64(text, r_type, offset, addend).map(Some),
        object::elf::EM_AARCH64 => aarch64(text, r_type, offset, addend).map(Some),
        object::elf::EM_S390 => s390x(text, offset, addend, address).map(Some),
        _ => Ok(None),
    }
}

fn x86_64(text: &mut [u8], r_type: u32, offset: u64, addend: i64) -> Result<Done, Refused> {
    const EXPECTED: &str = "on `mov foo@GOTPCREL(%rip), %reg`, `call *foo@GOTPCREL(%rip)` \
                            and `jmp *foo@GOTPCREL(%rip)` with addend -4";
    let refuse = |found: String| Refused {
        expected: EXPECTED,
        found,
    };
    // The opcode and ModRM bytes before the 4-byte displacement, and for the REX form
    // the prefix before them.
    let before: u64 = if r_type == X86_REX_GOTPCRELX { 3 } else { 2 };
    let Some(start) = offset.checked_sub(before) else {
        return Err(refuse(format!(
            "the field at {offset:#x} leaves no room for the instruction's opcode before it"
        )));
    };
    let Some(insn) = bytes(text, start, before + 4) else {
        return Err(refuse(
            "the instruction runs past the end of the section".to_string(),
        ));
    };
    let found = || format!("the instruction there is `{}`", hex_bytes(insn));
    if addend != -4 {
        return Err(refuse(format!("{}, with addend {addend}", found())));
    }
    let at = start as usize;
    let (op, modrm) = (insn[before as usize - 2], insn[before as usize - 1]);
    let rex_ok = r_type != X86_REX_GOTPCRELX || insn[0] & 0xf0 == 0x40;
    if op == 0x8b && modrm & 0xc7 == 0x05 && rex_ok {
        // mov r, [rip + disp32] -> lea r, [rip + disp32]: same prefix and ModRM.
        text[at + before as usize - 2] = 0x8d;
        return Ok(Done {
            r_type: X86_PC32,
            offset,
            rewrite: "mov → lea",
        });
    }
    if r_type == X86_GOTPCRELX && op == 0xff && modrm == 0x15 {
        // call *[rip + disp32] -> addr32 call rel32 (the prefix keeps the length).
        text[at] = 0x67;
        text[at + 1] = 0xe8;
        return Ok(Done {
            r_type: X86_PLT32,
            offset,
            rewrite: "call * → addr32 call",
        });
    }
    if r_type == X86_GOTPCRELX && op == 0xff && modrm == 0x25 {
        // jmp *[rip + disp32] -> jmp rel32; nop: rel32 starts one byte earlier and
        // still ends where the instruction ended before the nop, so A stays -4
        // relative to the new P. The field is zeroed (the kernel's writer refuses a
        // non-zero field).
        text[at] = 0xe9;
        text[at + 1..at + 5].fill(0);
        text[at + 5] = 0x90;
        return Ok(Done {
            r_type: X86_PLT32,
            offset: offset - 1,
            rewrite: "jmp * → jmp; nop",
        });
    }
    Err(refuse(found()))
}

fn read_u32_le(b: &[u8]) -> u32 {
    u32::from_le_bytes([b[0], b[1], b[2], b[3]])
}

fn aarch64(text: &mut [u8], r_type: u32, offset: u64, addend: i64) -> Result<Done, Refused> {
    let expected = if r_type == A64_ADR_GOT_PAGE {
        "on `adrp xN, :got:foo` with addend 0"
    } else {
        "on `ldr xT, [xN, :got_lo12:foo]` (64-bit, unsigned offset, T not xzr) with addend 0"
    };
    let refuse = |found: String| Refused { expected, found };
    if !offset.is_multiple_of(4) {
        return Err(refuse(format!(
            "the field at {offset:#x} is not a 4-byte aligned instruction"
        )));
    }
    let Some(b) = bytes(text, offset, 4) else {
        return Err(refuse(
            "the instruction runs past the end of the section".to_string(),
        ));
    };
    let insn = read_u32_le(b);
    let found = || format!("the instruction there is {insn:#010x}");
    if addend != 0 {
        return Err(refuse(format!("{}, with addend {addend}", found())));
    }
    let at = offset as usize;
    if r_type == A64_ADR_GOT_PAGE {
        // ADRP: op = 1, bits 28..24 = 10000.
        if insn & 0x9f00_0000 != 0x9000_0000 {
            return Err(refuse(found()));
        }
        return Ok(Done {
            r_type: A64_ADR_PREL_PG_HI21,
            offset,
            rewrite: "adrp :got: → adrp",
        });
    }
    // LDR (immediate, unsigned offset), 64-bit: size = 11, opc = 01.
    let rt = insn & 0x1f;
    if insn & 0xffc0_0000 != 0xf940_0000 || rt == 31 {
        return Err(refuse(found()));
    }
    // ADD (immediate), 64-bit, no shift, imm12 = 0 (the relocation writes it):
    // Rn and Rd = the ldr's Rn and Rt.
    let add = 0x9100_0000 | (insn & 0x3ff);
    text[at..at + 4].copy_from_slice(&add.to_le_bytes());
    Ok(Done {
        r_type: A64_ADD_ABS_LO12_NC,
        offset,
        rewrite: "ldr :got_lo12: → add :lo12:",
    })
}

fn s390x(text: &mut [u8], offset: u64, addend: i64, address: Option<u64>) -> Result<Done, Refused> {
    let refuse = |found: String| Refused {
        expected: "on `lgrl %rN, foo@GOTENT` with addend 2 and an even address of foo",
        found,
    };
    let Some(start) = offset.checked_sub(2) else {
        return Err(refuse(format!(
            "the field at {offset:#x} leaves no room for the instruction's opcode before it"
        )));
    };
    let Some(insn) = bytes(text, start, 6) else {
        return Err(refuse(
            "the instruction runs past the end of the section".to_string(),
        ));
    };
    let found = || format!("the instruction there is `{}`", hex_bytes(insn));
    // LGRL: RIL-b, opcode c4 / 8.
    if insn[0] != 0xc4 || insn[1] & 0x0f != 0x08 {
        return Err(refuse(found()));
    }
    if addend != 2 {
        return Err(refuse(format!("{}, with addend {addend}", found())));
    }
    if let Some(a) = address.filter(|a| a & 1 == 1) {
        return Err(refuse(format!(
            "the symbol is at the odd address {a:#x} in its target"
        )));
    }
    // LARL: RIL-b, opcode c0 / 0, same register.
    let at = start as usize;
    text[at] = 0xc0;
    text[at + 1] &= 0xf0;
    Ok(Done {
        r_type: S390_PC32DBL,
        offset,
        rewrite: "lgrl → larl",
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn x86_64_mov_call_and_jmp() {
        // mov 0(%rip), %rax (REX.W 8b 05): field at 3.
        let mut t = vec![0x48, 0x8b, 0x05, 0, 0, 0, 0, 0xc3];
        let d = relax(Arch::X86_64, &mut t, 42, 3, -4, None)
            .unwrap()
            .unwrap();
        assert_eq!((d.r_type, d.offset), (2, 3));
        assert_eq!(t, [0x48, 0x8d, 0x05, 0, 0, 0, 0, 0xc3]);
        // mov 0(%rip), %r12d (REX.R 44 8b 25).
        let mut t = vec![0x44, 0x8b, 0x25, 0, 0, 0, 0];
        relax(Arch::X86_64, &mut t, 42, 3, -4, None)
            .unwrap()
            .unwrap();
        assert_eq!(t[..3], [0x44, 0x8d, 0x25]);
        // call *0(%rip): ff 15 -> 67 e8, same field.
        let mut t = vec![0xff, 0x15, 0, 0, 0, 0];
        let d = relax(Arch::X86_64, &mut t, 41, 2, -4, None)
            .unwrap()
            .unwrap();
        assert_eq!((d.r_type, d.offset), (4, 2));
        assert_eq!(t, [0x67, 0xe8, 0, 0, 0, 0]);
        // jmp *0(%rip): ff 25 -> e9 rel32 90, field one byte earlier.
        let mut t = vec![0xff, 0x25, 0, 0, 0, 0];
        let d = relax(Arch::X86_64, &mut t, 41, 2, -4, None)
            .unwrap()
            .unwrap();
        assert_eq!((d.r_type, d.offset), (4, 1));
        assert_eq!(t, [0xe9, 0, 0, 0, 0, 0x90]);
    }

    #[test]
    fn x86_64_refusals_change_nothing() {
        for (bytes, ty, off, addend) in [
            // add foo@GOTPCREL(%rip), %rax: 48 03 05.
            (vec![0x48, 0x03, 0x05, 0, 0, 0, 0], 42, 3, -4),
            // mov with an addend other than -4.
            (vec![0x48, 0x8b, 0x05, 0, 0, 0, 0], 42, 3, 0),
            // mov through a base register (ModRM 00 000 000): not RIP-relative.
            (vec![0x48, 0x8b, 0x00, 0, 0, 0, 0], 42, 3, -4),
            // REX_GOTPCRELX without a REX prefix.
            (vec![0x90, 0x8b, 0x05, 0, 0, 0, 0], 42, 3, -4),
            // A field too close to the start, and one past the end.
            (vec![0x8b, 0x05, 0, 0, 0, 0], 41, 1, -4),
            (vec![0x8b, 0x05, 0, 0, 0], 41, 2, -4),
        ] {
            let mut t = bytes.clone();
            let e = relax(Arch::X86_64, &mut t, ty, off, addend, None).unwrap_err();
            assert!(e.expected.contains("mov foo@GOTPCREL"), "{e:?}");
            assert_eq!(t, bytes);
        }
        // Not relaxable at all: GOTPCREL (9), PLT32 (4).
        let mut t = vec![0x48, 0x8b, 0x05, 0, 0, 0, 0];
        assert_eq!(relax(Arch::X86_64, &mut t, 9, 3, -4, None), Ok(None));
        assert_eq!(relax(Arch::X86_64, &mut t, 4, 3, -4, None), Ok(None));
    }

    #[test]
    fn aarch64_adrp_and_ldr() {
        // adrp x1, 0; ldr x1, [x1] (gcc -fPIE).
        let mut t = [0x9000_0001u32, 0xf940_0021]
            .iter()
            .flat_map(|w| w.to_le_bytes())
            .collect::<Vec<_>>();
        let d = relax(Arch::AARCH64, &mut t, 311, 0, 0, None)
            .unwrap()
            .unwrap();
        assert_eq!((d.r_type, d.offset), (275, 0));
        let d = relax(Arch::AARCH64, &mut t, 312, 4, 0, None)
            .unwrap()
            .unwrap();
        assert_eq!((d.r_type, d.offset), (277, 4));
        // add x1, x1, #0 = 0x91000021; the adrp is unchanged.
        assert_eq!(read_u32_le(&t[0..4]), 0x9000_0001);
        assert_eq!(read_u32_le(&t[4..8]), 0x9100_0021);
        // ldr x3, [x2]: Rn 2, Rt 3 -> add x3, x2, #0.
        let mut t = 0xf940_0043u32.to_le_bytes().to_vec();
        relax(Arch::AARCH64, &mut t, 312, 0, 0, None)
            .unwrap()
            .unwrap();
        assert_eq!(read_u32_le(&t), 0x9100_0043);
        // Refused: ldr w1 (32-bit), ldr xzr, an adr in place of adrp, an addend.
        for (insn, ty, addend) in [
            (0xb940_0021u32, 312, 0),
            (0xf940_003fu32, 312, 0),
            (0x1000_0001u32, 311, 0),
            (0x9000_0001u32, 311, 8),
        ] {
            let mut t = insn.to_le_bytes().to_vec();
            assert!(relax(Arch::AARCH64, &mut t, ty, 0, addend, None).is_err());
            assert_eq!(read_u32_le(&t), insn);
        }
    }

    #[test]
    fn s390x_lgrl_to_larl() {
        // lgrl %r2, 0 (c4 28 …): field at 2.
        let mut t = vec![0xc4, 0x28, 0, 0, 0, 0, 0x07, 0xfe];
        let d = relax(Arch::S390X, &mut t, 26, 2, 2, Some(0x1000))
            .unwrap()
            .unwrap();
        assert_eq!((d.r_type, d.offset), (19, 2));
        assert_eq!(t[..2], [0xc0, 0x20]);
        // An odd address, a wrong addend, and lg in place of lgrl are refused.
        for (bytes, addend, address) in [
            (vec![0xc4, 0x28, 0, 0, 0, 0], 2, Some(0x1001)),
            (vec![0xc4, 0x28, 0, 0, 0, 0], 0, None),
            (vec![0xe3, 0x10, 0, 0, 0, 0x04], 2, None),
        ] {
            let mut t = bytes.clone();
            assert!(relax(Arch::S390X, &mut t, 26, 2, addend, address).is_err());
            assert_eq!(t, bytes);
        }
        assert_eq!(
            relax(Arch::PPC64LE, &mut [0u8; 8], 26, 2, 2, None),
            Ok(None)
        );
    }
}
