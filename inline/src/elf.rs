//! What the ELF side tells: the function symbols, the direct calls kept by
//! `--emit-relocs`, and the DWARF sections' bytes.

use std::collections::HashMap;

use object::elf;
use object::read::elf::{FileHeader, Rela, SectionHeader, Sym};
use object::{Endianness, FileKind, SectionIndex, SymbolIndex};

use crate::Error;

/// A function symbol of the binary.
#[derive(Clone, Debug)]
pub(crate) struct Symbol {
    pub(crate) name: String,
    pub(crate) addr: u64,
    pub(crate) size: u64,
    /// Global or weak binding (in the output: a hidden symbol of the input is local
    /// here, see [`Symbol::input_global`]).
    pub(crate) global: bool,
    /// Not of default visibility: a global symbol of its input object, which the
    /// link editor made local.
    pub(crate) input_global: bool,
}

/// The function symbols, by address and by name.
#[derive(Debug, Default)]
pub(crate) struct Symbols {
    /// Sorted by address, then name.
    pub(crate) list: Vec<Symbol>,
    by_name: HashMap<String, Vec<usize>>,
    /// Indexes into `list`, sorted by name.
    sorted: Vec<usize>,
}

impl Symbols {
    fn new(mut list: Vec<Symbol>) -> Self {
        list.sort_by(|a, b| a.addr.cmp(&b.addr).then_with(|| a.name.cmp(&b.name)));
        list.dedup_by(|a, b| a.addr == b.addr && a.name == b.name);
        let mut by_name: HashMap<String, Vec<usize>> = HashMap::new();
        for (i, s) in list.iter().enumerate() {
            by_name.entry(s.name.clone()).or_default().push(i);
        }
        let mut sorted: Vec<usize> = (0..list.len()).collect();
        sorted.sort_by(|&a, &b| {
            let name = |i: usize| list.get(i).map_or("", |s: &Symbol| s.name.as_str());
            name(a).cmp(name(b))
        });
        Symbols {
            list,
            by_name,
            sorted,
        }
    }

    /// The symbols whose name starts with `prefix`.
    pub(crate) fn with_prefix<'a>(
        &'a self,
        prefix: &'a str,
    ) -> impl Iterator<Item = &'a Symbol> + 'a {
        let name = |i: usize| self.list.get(i).map_or("", |s| s.name.as_str());
        let lo = self.sorted.partition_point(|&i| name(i) < prefix);
        self.sorted
            .get(lo..)
            .unwrap_or(&[])
            .iter()
            .filter_map(|&i| self.list.get(i))
            .take_while(move |s| s.name.starts_with(prefix))
    }

    /// The symbols named `name`.
    pub(crate) fn named<'a>(&'a self, name: &str) -> impl Iterator<Item = &'a Symbol> + 'a {
        self.by_name
            .get(name)
            .into_iter()
            .flatten()
            .filter_map(|&i| self.list.get(i))
    }

    /// The symbols at exactly `addr`.
    pub(crate) fn at(&self, addr: u64) -> &[Symbol] {
        let lo = self.list.partition_point(|s| s.addr < addr);
        let hi = self.list.partition_point(|s| s.addr <= addr);
        self.list.get(lo..hi).unwrap_or(&[])
    }

    /// The function whose `[addr, addr + size)` holds `pc` (the last one starting at or
    /// before it, sized symbols only).
    pub(crate) fn containing(&self, pc: u64) -> Option<&Symbol> {
        let hi = self.list.partition_point(|s| s.addr <= pc);
        self.list
            .get(..hi)?
            .iter()
            .rev()
            .take(16)
            .find(|s| s.size > 0 && pc - s.addr < s.size)
    }

    /// The name to show for a function starting at `addr`: `prefer` if a symbol there
    /// has that name, else a global one, else any.
    pub(crate) fn name_at(&self, addr: u64, prefer: Option<&str>) -> Option<&str> {
        let here = self.at(addr);
        here.iter()
            .find(|s| Some(s.name.as_str()) == prefer)
            .or_else(|| {
                here.iter()
                    .find(|s| s.global && !s.name.ends_with(".localalias"))
            })
            .or_else(|| here.iter().find(|s| !s.name.ends_with(".localalias")))
            .or_else(|| here.first())
            .map(|s| s.name.as_str())
    }
}

/// The direct calls and jumps the relocations kept by `--emit-relocs` describe.
#[derive(Debug, Default)]
pub(crate) struct Calls {
    /// Whether the file kept its relocations (a `SHT_RELA` section against the full
    /// symbol table).
    pub(crate) present: bool,
    /// `(target, site)`, sorted.
    pub(crate) sites: Vec<(u64, u64)>,
}

impl Calls {
    /// The call sites whose target is `addr`.
    pub(crate) fn to(&self, addr: u64) -> &[(u64, u64)] {
        let lo = self.sites.partition_point(|s| s.0 < addr);
        let hi = self.sites.partition_point(|s| s.0 <= addr);
        self.sites.get(lo..hi).unwrap_or(&[])
    }
}

/// What [`parse`] found.
#[derive(Debug)]
pub(crate) struct Parsed<'d> {
    pub(crate) big_endian: bool,
    pub(crate) machine: u16,
    pub(crate) symbols: Symbols,
    pub(crate) calls: Calls,
    /// The DWARF sections present, by name (`.debug_info`, …).
    pub(crate) debug: HashMap<&'d str, &'d [u8]>,
}

/// The DWARF sections gimli reads.
const DEBUG_SECTIONS: &[&str] = &[
    ".debug_abbrev",
    ".debug_addr",
    ".debug_info",
    ".debug_line",
    ".debug_line_str",
    ".debug_ranges",
    ".debug_rnglists",
    ".debug_str",
    ".debug_str_offsets",
];

/// Parses the ELF side of `data`.
pub(crate) fn parse(data: &[u8]) -> Result<Parsed<'_>, Error> {
    match FileKind::parse(data) {
        Ok(FileKind::Elf64) => parse_as::<elf::FileHeader64<Endianness>>(data),
        Ok(FileKind::Elf32) => parse_as::<elf::FileHeader32<Endianness>>(data),
        _ => Err(Error::NotElf),
    }
}

fn parse_as<Elf: FileHeader<Endian = Endianness>>(data: &[u8]) -> Result<Parsed<'_>, Error> {
    let header = Elf::parse(data)?;
    let endian = header.endian()?;
    let e_type = header.e_type(endian);
    if e_type != elf::ET_EXEC && e_type != elf::ET_DYN {
        return Err(Error::NotLinked(e_type.0));
    }
    let machine = header.e_machine(endian);
    let sections = header.sections(endian, data)?;

    let mut debug = HashMap::new();
    for sec in sections.iter() {
        let name = sections.section_name(endian, sec)?;
        if name.starts_with(b".zdebug_") {
            return Err(Error::CompressedDebugInfo);
        }
        let Some(&known) = DEBUG_SECTIONS.iter().find(|n| n.as_bytes() == name) else {
            continue;
        };
        if sec.sh_flags(endian).contains(elf::SHF_COMPRESSED) {
            return Err(Error::CompressedDebugInfo);
        }
        if sec.sh_type(endian) == elf::SHT_NOBITS {
            continue;
        }
        debug.insert(known, sec.data(endian, data)?);
    }

    // The full symbol table, else the dynamic one.
    let mut symtab = sections.symbols(endian, data, elf::SHT_SYMTAB)?;
    if symtab.is_empty() {
        symtab = sections.symbols(endian, data, elf::SHT_DYNSYM)?;
    }
    let mut list = Vec::new();
    for sym in symtab.iter() {
        let ty = sym.st_type();
        if !(ty == elf::STT_FUNC || ty == elf::STT_GNU_IFUNC) || sym.is_undefined(endian) {
            continue;
        }
        let Ok(name) = symtab.symbol_name(endian, sym) else {
            continue;
        };
        if name.is_empty() {
            continue;
        }
        let bind = sym.st_bind();
        list.push(Symbol {
            name: String::from_utf8_lossy(name).into_owned(),
            addr: sym.st_value(endian).into(),
            size: sym.st_size(endian).into(),
            global: bind == elf::STB_GLOBAL || bind == elf::STB_WEAK,
            input_global: sym.st_visibility() != elf::STV_DEFAULT,
        });
    }

    // The call relocations of the text (`--emit-relocs`): RELA sections whose
    // `sh_link` is the symbol table read above and whose `sh_info` is executable.
    let mut calls = Calls::default();
    let symtab_index = symtab.section();
    for sec in sections.iter() {
        if sec.sh_type(endian) != elf::SHT_RELA
            || symtab_index.0 == 0
            || sec.sh_link(endian) as usize != symtab_index.0
        {
            continue;
        }
        // `--emit-relocs` keeps every section's relocations (`.rela.debug_info`,
        // `.rela.eh_frame`, …) against the full symbol table; a text without any has
        // no call through a relocation.
        calls.present = true;
        let Ok(text) = sections.section(SectionIndex(sec.sh_info(endian) as usize)) else {
            continue;
        };
        if !text.sh_flags(endian).contains(elf::SHF_EXECINSTR)
            || text.sh_type(endian) == elf::SHT_NOBITS
        {
            continue;
        }
        let Ok(Some((relas, _))) = sec.rela(endian, data) else {
            continue;
        };
        let bytes = text.data(endian, data).unwrap_or(&[]);
        let base: u64 = text.sh_addr(endian).into();
        for r in relas {
            let site: u64 = r.r_offset(endian).into();
            let sym_index = r.r_sym(endian, false);
            if sym_index == 0 {
                continue;
            }
            let Ok(sym) = symtab.symbol(SymbolIndex(sym_index as usize)) else {
                continue;
            };
            let Some(shndx) = sym.st_shndx(endian).index() else {
                continue;
            };
            let s = if sym.st_type() == elf::STT_SECTION {
                match sections.section(SectionIndex(usize::from(shndx))) {
                    Ok(h) => h.sh_addr(endian).into(),
                    Err(_) => continue,
                }
            } else {
                sym.st_value(endian).into()
            };
            // The instruction's bytes before the field.
            let at = site.checked_sub(base).and_then(|o| usize::try_from(o).ok());
            let before = |n: usize| -> Option<u8> { bytes.get(at?.checked_sub(n)?).copied() };
            let ty = r.r_type(endian, false);
            if let Some(target) = call_target(machine, ty.0, s, r.r_addend(endian).into(), before) {
                calls.sites.push((target, site));
            }
        }
    }
    calls.sites.sort_unstable();

    Ok(Parsed {
        big_endian: endian == Endianness::Big,
        machine: machine.0,
        symbols: Symbols::new(list),
        calls,
        debug,
    })
}

/// The target of a relocation that is a direct call or jump, else `None`: `s` is the
/// symbol's address, `before(n)` the byte `n` bytes before the relocated field.
fn call_target(
    machine: elf::Machine,
    ty: u32,
    s: u64,
    addend: i64,
    before: impl Fn(usize) -> Option<u8>,
) -> Option<u64> {
    match machine {
        elf::EM_X86_64 => match ty {
            // `e8 rel32` (call), `e9 rel32` (jmp): the field is 4 bytes before the
            // next instruction.
            2 | 4 if matches!(before(1), Some(0xe8 | 0xe9)) => {
                s.checked_add_signed(addend)?.checked_add(4)
            }
            // `call *f@GOTPCREL(%rip)` / `jmp *…` (`ff 15`, `ff 25`), or the same relaxed
            // by the link editor (`67 e8`, `e9 … 90`): the function itself.
            9 | 41
                if matches!((before(2), before(1)), (Some(0xff), Some(0x15 | 0x25)))
                    || matches!((before(2), before(1)), (Some(0x67), Some(0xe8)))
                    || before(2) == Some(0xe9) =>
            {
                Some(s)
            }
            _ => None,
        },
        // `R_AARCH64_JUMP26` (b), `R_AARCH64_CALL26` (bl).
        elf::EM_AARCH64 => matches!(ty, 282 | 283).then(|| s.checked_add_signed(addend))?,
        // `R_PPC64_REL24` (b, bl), `R_PPC64_REL24_NOTOC`, `R_PPC64_REL24_P9NOTOC`: the
        // global entry (the link editor adds the local entry's offset).
        elf::EM_PPC64 => matches!(ty, 10 | 116 | 124).then(|| s.checked_add_signed(addend))?,
        // `R_390_PC32DBL`, `R_390_PLT32DBL` on `brasl` (`c0 x5`) or `brcl` (`c0 x4`): the
        // field is 2 bytes into the instruction, which the addend makes up for.
        elf::EM_S390
            if matches!(ty, 19 | 20)
                && before(2) == Some(0xc0)
                && matches!(before(1).map(|b| b & 0xf), Some(4 | 5)) =>
        {
            s.checked_add_signed(addend)?.checked_sub(2)
        }
        _ => None,
    }
}

/// Whether every direct call of a function named by `sym` left a relocation: gas
/// resolves a call to a local symbol in the same section itself (x86_64, aarch64,
/// ppc64le), and keeps one for a global symbol (any visibility) or on s390x.
pub(crate) fn calls_all_relocated(machine: u16, sym: &Symbol) -> bool {
    sym.global || sym.input_global || machine == elf::EM_S390.0
}
