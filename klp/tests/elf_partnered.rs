//! Partnered relocations in a livepatch relocation section: riscv64's `auipc` + `addi`
//! pair, `R_RISCV_PCREL_HI20` against a livepatch symbol at the `auipc` and
//! `R_RISCV_PCREL_LO12_I` against the `auipc`'s local label. The core writes the
//! section's other entries first, then the partnered ones from them
//! (`Arch::apply_partnered`); the label, defined in the section the relocation section
//! targets, is exempt from the livepatch-symbol rule, and nothing else is.
//!
//! The expected words are worked out by hand. `.text` is loaded at
//! `TEXT_ADDR` = 0x1000_0000; the `auipc a0, 0` (0x0000_0517) is at offset 4, so
//! P = 0x1000_0004; `some_var` is at S = 0x1123_4ac0, so S - P = 0x0123_4abc:
//! hi20 = (0x0123_4abc + 0x800) >> 12 = 0x1235, lo12 = 0xabc - 0x1000 = -0x544
//! (0x1235 << 12 - 0x544 = 0x0123_4abc).
//! * `auipc a0, 0x1235` = 0x1235 << 12 | rd 10 << 7 | 0x17 = 0x0123_5517;
//! * `addi a0, a0, -0x544` = 0xabc << 20 | rs1 10 << 15 | rd 10 << 7 | 0x13 =
//!   0xabc5_0513.

mod common;

use common::elfbuild::*;
use common::image::{Image, TEXT_ADDR};
use common::symhost::SymHost;
use klp::Errno;
use klp::elf::reloc::{clear_relocs, write_relocs};
use klp::elf::{PatchObject, SHF_RELA_LIVEPATCH, SHN_LIVEPATCH};
use klp_arch_riscv64::Riscv64;

const EM_RISCV: u16 = 243;
const PCREL_HI20: u32 = 23;
const PCREL_LO12_I: u32 = 24;

const NOP: u32 = 0x0000_0013;
const AUIPC_A0: u32 = 0x0000_0517;
const ADDI_A0: u32 = 0x0005_0513;

const VAR_SYM: &str = ".klp.sym.vmlinux.some_var,0";
const SOME_VAR: u64 = 0x1123_4ac0;
const WANT_AUIPC: u32 = 0x0123_5517;
const WANT_ADDI: u32 = 0xabc5_0513;

const RELA: &str = ".klp.rela.vmlinux..text";

fn text() -> Vec<u8> {
    [NOP, AUIPC_A0, ADDI_A0, NOP]
        .iter()
        .flat_map(|w| w.to_le_bytes())
        .collect()
}

fn words(b: &[u8]) -> Vec<u32> {
    b.chunks(4)
        .map(|c| u32::from_le_bytes(c.try_into().unwrap()))
        .collect()
}

/// Which section the `auipc`'s label is defined in.
#[derive(Clone, Copy, PartialEq)]
enum Label {
    /// `.text`, at the `auipc` (offset 4).
    AtAuipc,
    /// `.text`, at the first `nop` (offset 0), where no `PCREL_HI20` is.
    AtNop,
    /// `.data`, another section.
    Elsewhere,
}

/// The object: `.text` (index 1), `.data` (2), `.modinfo` (3), the livepatch
/// relocation section (4) with the `PCREL_HI20` and the `PCREL_LO12_I` in that order
/// (or the reverse, `lo_first`).
fn object(label: Label, lo_first: bool) -> Vec<u8> {
    let mut o = Obj::new(EM_RISCV, false);
    let text = o.section(Sec {
        name: ".text".into(),
        sh_type: SHT_PROGBITS,
        flags: SHF_ALLOC | SHF_EXECINSTR,
        data: text(),
        link: 0,
        info: 0,
        align: 4,
        entsize: 0,
    });
    let data = o.section(Sec {
        name: ".data".into(),
        sh_type: SHT_PROGBITS,
        flags: SHF_ALLOC | 1,
        data: vec![0; 16],
        link: 0,
        info: 0,
        align: 8,
        entsize: 0,
    });
    o.modinfo();
    o.symbol(SymDef {
        name: String::new(),
        info: STB_LOCAL_SECTION,
        shndx: text as u16,
        value: 0,
        size: 0,
    });
    let (shndx, value) = match label {
        Label::AtAuipc => (text, 4),
        Label::AtNop => (text, 0),
        Label::Elsewhere => (data, 4),
    };
    // A local label (STB_LOCAL, STT_NOTYPE), as the assembler makes for `auipc`.
    let l = o.symbol(SymDef {
        name: ".Lpcrel_hi0".into(),
        info: 0,
        shndx: shndx as u16,
        value,
        size: 0,
    });
    o.first_global = 3;
    let v = o.symbol(SymDef {
        name: VAR_SYM.into(),
        info: STB_GLOBAL_OBJECT,
        shndx: SHN_LIVEPATCH,
        value: 0,
        size: 0,
    });
    let hi = (4, v, PCREL_HI20, 0);
    let lo = (8, l, PCREL_LO12_I, 0);
    let entries = if lo_first { [lo, hi] } else { [hi, lo] };
    let relas = o.relas(&entries);
    let symtab = o.symtab_index() + 1;
    o.section(Sec {
        name: RELA.into(),
        sh_type: SHT_RELA,
        flags: SHF_ALLOC | SHF_INFO_LINK | SHF_RELA_LIVEPATCH,
        data: relas,
        link: symtab,
        info: text,
        align: 8,
        entsize: 24,
    });
    o.build()
}

fn host() -> SymHost {
    let mut h = SymHost::default();
    h.table
        .insert((None, "some_var".to_string()), vec![SOME_VAR]);
    h
}

#[test]
fn an_auipc_addi_pair_is_written() {
    for lo_first in [false, true] {
        let file = object(Label::AtAuipc, lo_first);
        let obj = PatchObject::parse(&file).expect("parses");
        let mut image = Image::load(&obj);
        assert_eq!(image.secs[1].as_ref().unwrap().0, TEXT_ADDR);
        let mut host = host();
        let r = write_relocs::<Riscv64, _>(&mut host, "lp", &obj, &mut image, None);
        assert_eq!(r, Ok(()), "lo_first {lo_first}: {:?}", host.log);
        assert_eq!(
            words(image.bytes(1)),
            [NOP, WANT_AUIPC, WANT_ADDI, NOP],
            "lo_first {lo_first}"
        );
        assert_eq!(image.writes, 1);
        assert_eq!(host.lookups.get(), 1, "the label is not looked up");
        assert!(host.log.is_empty(), "{:?}", host.log);
        // Undone without complaint (riscv64 overwrites its fields whole: nothing to
        // clear), and written again the same.
        clear_relocs::<Riscv64, _>(&mut host, "lp", &obj, &mut image, "vmlinux");
        assert!(host.log.is_empty(), "{:?}", host.log);
        let r = write_relocs::<Riscv64, _>(&mut host, "lp", &obj, &mut image, None);
        assert_eq!(r, Ok(()));
        assert_eq!(words(image.bytes(1)), [NOP, WANT_AUIPC, WANT_ADDI, NOP]);
    }
}

#[test]
fn a_label_in_another_section_is_not_exempt() {
    let file = object(Label::Elsewhere, false);
    let obj = PatchObject::parse(&file).expect("parses");
    let mut image = Image::load(&obj);
    let mut host = host();
    let r = write_relocs::<Riscv64, _>(&mut host, "lp", &obj, &mut image, None);
    assert_eq!(r, Err(Errno::EINVAL));
    assert_eq!(words(image.bytes(1)), [NOP, AUIPC_A0, ADDI_A0, NOP]);
    assert_eq!(image.writes, 0);
    assert_eq!(
        host.log,
        [format!(
            "livepatch: symbol .Lpcrel_hi0 at rela sec {} idx 1 is not marked as a livepatch symbol",
            obj.symtab_index()
        )]
    );
}

#[test]
fn a_label_without_its_partner_is_refused() {
    // The label is in .text, but at the nop: no PCREL_HI20 has that place.
    let file = object(Label::AtNop, false);
    let obj = PatchObject::parse(&file).expect("parses");
    let mut image = Image::load(&obj);
    let mut host = host();
    let r = write_relocs::<Riscv64, _>(&mut host, "lp", &obj, &mut image, None);
    assert_eq!(r, Err(Errno::ENOEXEC));
    assert_eq!(
        words(image.bytes(1)),
        [NOP, AUIPC_A0, ADDI_A0, NOP],
        "the HI20 written in the copy is not in the image"
    );
    assert_eq!(image.writes, 0);
    assert_eq!(host.log.len(), 1, "{:?}", host.log);
    assert!(
        host.log[0].starts_with("lp: ") && host.log[0].ends_with(&format!("(entry 1 of {RELA})")),
        "{:?}",
        host.log
    );
}
