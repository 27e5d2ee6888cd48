//! Shared test helpers: in-memory ELF builders (with the `object` crate's writer,
//! so these tests run on every host, under QEMU too) and an independent reader of
//! the converter's output.

#![allow(dead_code)]

pub mod cases;
pub mod corehost;
/// klp's own test image (a patch module's sections at made-up addresses).
#[path = "../../../klp/tests/common/image.rs"]
pub mod image;
/// klp's own test host (symbol lookups and the log), filled from a symbol map here.
#[path = "../../../klp/tests/common/symhost.rs"]
pub mod symhost;

use object::elf;
use object::read::elf::{FileHeader, SectionHeader as _, Sym as _};
use object::write::{Object, Relocation, Symbol, SymbolSection};
use object::{
    Architecture, BinaryFormat, Endianness, FileFlags, RelocationFlags, SectionKind, SymbolFlags,
    SymbolKind, SymbolScope,
};

/// One of the four architectures, with a relocation type of each kind this test
/// uses. The numbers are the psABI's (see the golden tests for their sources).
#[derive(Clone, Copy, Debug)]
pub struct ArchSpec {
    pub arch: klp_convert::Arch,
    pub object: Architecture,
    pub endian: Endianness,
    pub e_flags: u32,
    /// A call relocation.
    pub call: u32,
    /// A data-reference relocation.
    pub data: u32,
    /// A 64-bit absolute relocation.
    pub abs64: u32,
}

pub const X86_64: ArchSpec = ArchSpec {
    arch: klp_convert::Arch::X86_64,
    object: Architecture::X86_64,
    endian: Endianness::Little,
    e_flags: 0,
    call: 4,  // R_X86_64_PLT32
    data: 2,  // R_X86_64_PC32
    abs64: 1, // R_X86_64_64
};
pub const AARCH64: ArchSpec = ArchSpec {
    arch: klp_convert::Arch::AARCH64,
    object: Architecture::Aarch64,
    endian: Endianness::Little,
    e_flags: 0,
    call: 283,  // R_AARCH64_CALL26
    data: 275,  // R_AARCH64_ADR_PREL_PG_HI21
    abs64: 257, // R_AARCH64_ABS64
};
pub const PPC64LE: ArchSpec = ArchSpec {
    arch: klp_convert::Arch::PPC64LE,
    object: Architecture::PowerPc64,
    endian: Endianness::Little,
    e_flags: 2, // EF_PPC64_ABI = 2: ELFv2
    call: 10,   // R_PPC64_REL24
    data: 50,   // R_PPC64_TOC16_HA
    abs64: 38,  // R_PPC64_ADDR64
};
pub const S390X: ArchSpec = ArchSpec {
    arch: klp_convert::Arch::S390X,
    object: Architecture::S390x,
    endian: Endianness::Big,
    e_flags: 0,
    call: 20,  // R_390_PLT32DBL
    data: 19,  // R_390_PC32DBL
    abs64: 22, // R_390_64
};
pub const ALL: [ArchSpec; 4] = [X86_64, AARCH64, PPC64LE, S390X];

/// A relocation the patch builder wrote.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Written {
    pub section: &'static str,
    pub offset: u64,
    pub r_type: u32,
    pub addend: i64,
    pub symbol: String,
}

fn new_object(a: &ArchSpec) -> Object<'static> {
    let mut o = Object::new(BinaryFormat::Elf, a.object, a.endian);
    o.flags = FileFlags::Elf {
        os_abi: elf::ELFOSABI_NONE,
        abi_version: 0,
        e_flags: elf::FileFlags(a.e_flags),
    };
    o
}

/// What else a patch holds.
#[derive(Clone, Debug, Default)]
pub struct PatchExtras<'a> {
    /// `.modinfo` contents.
    pub modinfo: Option<&'a [u8]>,
    /// A non-allocated `.debug_info` with a 64-bit relocation against this symbol
    /// (one of the refs).
    pub debug_ref: Option<&'a str>,
    /// More symbols defined in `.text` after `new_fn`, 16 bytes each: (name, local,
    /// function). `.data.defs` holds a 64-bit pointer to each (in `Written`).
    pub defined: &'a [(&'a str, bool, bool)],
    /// A function in its own section `.text.<name>`, the signature of a COMDAT
    /// group of that section.
    pub comdat: Option<&'a str>,
    /// A `.llvm_addrsig` section (`SHT_LLVM_ADDRSIG`, `sh_link` = `.symtab`) listing
    /// these symbols (each index below 128: one ULEB128 byte).
    pub addrsig: &'a [&'a str],
}

/// A patch object: `new_fn` in `.text` refers to each of `refs` (alternately with the
/// call and the data relocation type), `.data` holds a pointer to `refs[0]` and one
/// to `.text + 8`.
pub fn build_patch(
    a: &ArchSpec,
    refs: &[&str],
    extras: &PatchExtras<'_>,
) -> (Vec<u8>, Vec<Written>) {
    let mut o = new_object(a);
    let text = o.add_section(Vec::new(), b".text".to_vec(), SectionKind::Text);
    o.append_section_data(text, &[0x11; 64], 16);
    let data = o.add_section(Vec::new(), b".data".to_vec(), SectionKind::Data);
    o.append_section_data(data, &[0x22; 16], 8);
    o.add_file_symbol(b"patch.c".to_vec());
    o.add_symbol(Symbol {
        name: b"new_fn".to_vec(),
        value: 0,
        size: 64,
        kind: SymbolKind::Text,
        scope: SymbolScope::Linkage,
        weak: false,
        section: SymbolSection::Section(text),
        flags: SymbolFlags::None,
    });
    let mut written = Vec::new();
    let mut ids = Vec::new();
    for name in refs {
        ids.push(o.add_symbol(Symbol {
            name: name.as_bytes().to_vec(),
            value: 0,
            size: 0,
            kind: SymbolKind::Unknown,
            scope: SymbolScope::Unknown,
            weak: false,
            section: SymbolSection::Undefined,
            flags: SymbolFlags::None,
        }));
    }
    for (i, (name, &id)) in refs.iter().zip(&ids).enumerate() {
        let r_type = if i % 2 == 0 { a.call } else { a.data };
        let offset = 2 + 8 * i as u64;
        let addend = -(i as i64) - 4;
        o.add_relocation(
            text,
            Relocation {
                offset,
                symbol: id,
                addend,
                flags: RelocationFlags::Elf {
                    r_type: elf::RelocationType(r_type),
                },
            },
        )
        .unwrap();
        written.push(Written {
            section: ".text",
            offset,
            r_type,
            addend,
            symbol: name.to_string(),
        });
    }
    if let (Some(name), Some(&id)) = (refs.first(), ids.first()) {
        o.add_relocation(
            data,
            Relocation {
                offset: 0,
                symbol: id,
                addend: 0x10,
                flags: RelocationFlags::Elf {
                    r_type: elf::RelocationType(a.abs64),
                },
            },
        )
        .unwrap();
        written.push(Written {
            section: ".data",
            offset: 0,
            r_type: a.abs64,
            addend: 0x10,
            symbol: name.to_string(),
        });
    }
    let text_sym = o.section_symbol(text);
    o.add_relocation(
        data,
        Relocation {
            offset: 8,
            symbol: text_sym,
            addend: 8,
            flags: RelocationFlags::Elf {
                r_type: elf::RelocationType(a.abs64),
            },
        },
    )
    .unwrap();
    if !extras.defined.is_empty() {
        let defs = o.add_section(Vec::new(), b".data.defs".to_vec(), SectionKind::Data);
        for (i, &(name, local, func)) in extras.defined.iter().enumerate() {
            let at = o.append_section_data(text, &[0x33; 16], 16);
            let id = o.add_symbol(Symbol {
                name: name.as_bytes().to_vec(),
                value: at,
                size: 16,
                kind: if func {
                    SymbolKind::Text
                } else {
                    SymbolKind::Data
                },
                scope: if local {
                    SymbolScope::Compilation
                } else {
                    SymbolScope::Linkage
                },
                weak: false,
                section: SymbolSection::Section(text),
                flags: SymbolFlags::None,
            });
            let offset = o.append_section_data(defs, &[0; 8], 8);
            assert_eq!(offset, 8 * i as u64);
            o.add_relocation(
                defs,
                Relocation {
                    offset,
                    symbol: id,
                    addend: 0,
                    flags: RelocationFlags::Elf {
                        r_type: elf::RelocationType(a.abs64),
                    },
                },
            )
            .unwrap();
            written.push(Written {
                section: ".data.defs",
                offset,
                r_type: a.abs64,
                addend: 0,
                symbol: name.to_string(),
            });
        }
    }
    if let Some(name) = extras.comdat {
        let section_name = format!(".text.{name}");
        let sec = o.add_section(Vec::new(), section_name.into_bytes(), SectionKind::Text);
        o.append_section_data(sec, &[0x44; 16], 16);
        let id = o.add_symbol(Symbol {
            name: name.as_bytes().to_vec(),
            value: 0,
            size: 16,
            kind: SymbolKind::Text,
            scope: SymbolScope::Linkage,
            weak: false,
            section: SymbolSection::Section(sec),
            flags: SymbolFlags::None,
        });
        o.add_comdat(object::write::Comdat {
            kind: object::ComdatKind::Any,
            symbol: id,
            sections: vec![sec],
        });
    }
    if let Some(m) = extras.modinfo {
        let s = o.add_section(Vec::new(), b".modinfo".to_vec(), SectionKind::ReadOnlyData);
        o.append_section_data(s, m, 1);
    }
    if let Some(name) = extras.debug_ref {
        let s = o.add_section(Vec::new(), b".debug_info".to_vec(), SectionKind::Debug);
        o.append_section_data(s, &[0; 8], 1);
        let at = refs
            .iter()
            .position(|r| r == &name)
            .expect("debug_ref is one of refs");
        let id = ids[at];
        o.add_relocation(
            s,
            Relocation {
                offset: 0,
                symbol: id,
                addend: 0,
                flags: RelocationFlags::Elf {
                    r_type: elf::RelocationType(a.abs64),
                },
            },
        )
        .unwrap();
    }
    if !extras.addrsig.is_empty() {
        let s = o.add_section(Vec::new(), b".llvm_addrsig".to_vec(), SectionKind::Other);
        o.append_section_data(s, &vec![0xff; extras.addrsig.len()], 1);
    }
    let mut bytes = o.write().unwrap();
    if !extras.addrsig.is_empty() {
        // object's writer has no SHT_LLVM_ADDRSIG: write its type, link and indices.
        let p = parse(&bytes);
        let sec = p.section(".llvm_addrsig").index;
        let indices: Vec<u8> = extras
            .addrsig
            .iter()
            .map(|n| {
                let i = p.symbols.iter().position(|s| s.name == *n).unwrap();
                u8::try_from(i).ok().filter(|&i| i < 0x80).unwrap()
            })
            .collect();
        let put32 = |b: &mut Vec<u8>, at: usize, v: u32| {
            let v = if p.big_endian {
                v.to_be_bytes()
            } else {
                v.to_le_bytes()
            };
            b[at..at + 4].copy_from_slice(&v);
        };
        let get64 = |b: &[u8], at: usize| {
            let mut a = [0u8; 8];
            a.copy_from_slice(&b[at..at + 8]);
            if p.big_endian {
                u64::from_be_bytes(a)
            } else {
                u64::from_le_bytes(a)
            }
        };
        // Elf64_Ehdr.e_shoff @0x28; Elf64_Shdr (64 bytes): sh_type @4, sh_offset
        // @24, sh_link @40.
        let header = get64(&bytes, 0x28) as usize + 64 * sec;
        put32(&mut bytes, header + 4, 0x6fff_4c03);
        put32(&mut bytes, header + 40, p.symtab as u32);
        let at = get64(&bytes, header + 24) as usize;
        bytes[at..at + indices.len()].copy_from_slice(&indices);
    }
    (bytes, written)
}

/// The symbol names a `.llvm_addrsig` section lists (its ULEB128 indices).
pub fn addrsig(p: &Parsed) -> Vec<String> {
    let data = &p.section(".llvm_addrsig").data;
    let mut out = Vec::new();
    let (mut v, mut shift) = (0u64, 0);
    for &b in data {
        v |= u64::from(b & 0x7f) << shift;
        shift += 7;
        if b & 0x80 == 0 {
            out.push(p.symbols[v as usize].name.clone());
            (v, shift) = (0, 0);
        }
    }
    out
}

/// Reads an unsigned field of `width` bytes at `at` in the file's byte order.
pub fn field(p: &Parsed, data: &[u8], at: usize, width: usize) -> u64 {
    let b = &data[at..at + width];
    let mut v = 0u64;
    for i in 0..width {
        let byte = if p.big_endian { b[i] } else { b[width - 1 - i] };
        v = (v << 8) | u64::from(byte);
    }
    v
}

/// Checks that `data` holds the `nonzero` fields (offset, width, value) and zero
/// bytes everywhere else.
pub fn check_fields(p: &Parsed, what: &str, data: &[u8], nonzero: &[(usize, usize, u64)]) {
    for &(at, width, want) in nonzero {
        assert_eq!(field(p, data, at, width), want, "{what} @{at}");
    }
    for (i, &b) in data.iter().enumerate() {
        if !nonzero.iter().any(|&(at, w, _)| (at..at + w).contains(&i)) {
            assert_eq!(b, 0, "{what}: byte {i} is not zero");
        }
    }
}

/// A definition in a target.
#[derive(Clone, Copy, Debug)]
pub struct Def<'a> {
    pub name: &'a str,
    pub local: bool,
    pub file: Option<&'a str>,
    pub hidden: bool,
    pub func: bool,
    /// `st_value` (default: 16 bytes per definition, in order).
    pub at: Option<u64>,
}

impl<'a> Def<'a> {
    pub fn global(name: &'a str) -> Def<'a> {
        Def {
            name,
            local: false,
            file: None,
            hidden: false,
            func: true,
            at: None,
        }
    }
    pub fn local(name: &'a str, file: &'a str) -> Def<'a> {
        Def {
            name,
            local: true,
            file: Some(file),
            hidden: false,
            func: true,
            at: None,
        }
    }
    pub fn at(self, value: u64) -> Def<'a> {
        Def {
            at: Some(value),
            ..self
        }
    }
    pub fn data(self) -> Def<'a> {
        Def {
            func: false,
            ..self
        }
    }
    pub fn hidden(self) -> Def<'a> {
        Def {
            hidden: true,
            ..self
        }
    }
}

/// A relocatable target (like a `.ko`) defining `defs` in order, 16 bytes apart.
pub fn build_target(a: &ArchSpec, defs: &[Def<'_>]) -> Vec<u8> {
    build_target_with_build_id(a, defs, None)
}

/// [`build_target`], with a `.note.gnu.build-id` section (`SHT_NOTE`, an
/// `NT_GNU_BUILD_ID` note of owner "GNU", as `ld --build-id` writes it) when
/// `build_id` is given.
pub fn build_target_with_build_id(
    a: &ArchSpec,
    defs: &[Def<'_>],
    build_id: Option<&[u8]>,
) -> Vec<u8> {
    let mut o = new_object(a);
    if let Some(id) = build_id {
        let word = |v: u32| match a.endian {
            Endianness::Little => v.to_le_bytes(),
            Endianness::Big => v.to_be_bytes(),
        };
        let mut note = Vec::new();
        note.extend_from_slice(&word(4));
        note.extend_from_slice(&word(id.len() as u32));
        note.extend_from_slice(&word(3)); // NT_GNU_BUILD_ID
        note.extend_from_slice(b"GNU\0");
        note.extend_from_slice(id);
        while note.len() % 4 != 0 {
            note.push(0);
        }
        let s = o.add_section(
            Vec::new(),
            b".note.gnu.build-id".to_vec(),
            SectionKind::Note,
        );
        o.append_section_data(s, &note, 4);
    }
    let text = o.add_section(Vec::new(), b".text".to_vec(), SectionKind::Text);
    o.append_section_data(text, &vec![0; 16 * defs.len().max(1)], 16);
    for (i, d) in defs.iter().enumerate() {
        if let Some(f) = d.file {
            o.add_file_symbol(f.as_bytes().to_vec());
        }
        let bind = if d.local {
            elf::STB_LOCAL
        } else {
            elf::STB_GLOBAL
        };
        let st_type = if d.func {
            elf::STT_FUNC
        } else {
            elf::STT_OBJECT
        };
        let vis = if d.hidden {
            elf::STV_HIDDEN
        } else {
            elf::STV_DEFAULT
        };
        o.add_symbol(Symbol {
            name: d.name.as_bytes().to_vec(),
            value: d.at.unwrap_or(16 * i as u64),
            size: 16,
            kind: if d.func {
                SymbolKind::Text
            } else {
                SymbolKind::Data
            },
            scope: if d.local {
                SymbolScope::Compilation
            } else {
                SymbolScope::Linkage
            },
            weak: false,
            section: SymbolSection::Section(text),
            flags: SymbolFlags::Elf {
                st_info: elf::SymbolInfo::new(bind, st_type),
                st_other: elf::SymbolOther::from(vis),
            },
        });
    }
    o.write().unwrap()
}

/// A section of a parsed output.
#[derive(Clone, Debug)]
pub struct Sec {
    pub index: usize,
    pub name: String,
    pub sh_type: u32,
    pub sh_flags: u64,
    pub sh_addr: u64,
    pub sh_link: u32,
    pub sh_info: u32,
    pub sh_entsize: u64,
    pub sh_addralign: u64,
    pub data: Vec<u8>,
    /// (offset, type, addend, symbol index) of a `SHT_RELA` section.
    pub relas: Vec<(u64, u32, i64, u32)>,
}

/// A symbol of a parsed output.
#[derive(Clone, Debug)]
pub struct SymInfo {
    pub name: String,
    pub bind: u8,
    pub st_type: u8,
    pub shndx: u16,
    pub value: u64,
    pub size: u64,
}

/// An ELF file read back with `object`'s reader, independently of the converter.
#[derive(Clone, Debug)]
pub struct Parsed {
    pub big_endian: bool,
    pub e_type: u16,
    pub e_machine: u16,
    pub sections: Vec<Sec>,
    pub symbols: Vec<SymInfo>,
    pub symtab: usize,
    pub symtab_info: u32,
}

impl Parsed {
    pub fn section(&self, name: &str) -> &Sec {
        self.sections
            .iter()
            .find(|s| s.name == name)
            .unwrap_or_else(|| panic!("no section {name}"))
    }
    pub fn has_section(&self, name: &str) -> bool {
        self.sections.iter().any(|s| s.name == name)
    }
    pub fn symbol(&self, name: &str) -> &SymInfo {
        self.symbols
            .iter()
            .find(|s| s.name == name)
            .unwrap_or_else(|| panic!("no symbol {name}"))
    }
    /// A symbol's name, or for a section symbol (`STT_SECTION`, which has none)
    /// the name of its section in brackets: `[.init.klp_strings]`.
    pub fn label(&self, index: u32) -> String {
        let s = &self.symbols[index as usize];
        if s.st_type == elf::STT_SECTION.0 {
            format!("[{}]", self.sections[s.shndx as usize].name)
        } else {
            s.name.clone()
        }
    }
    /// The relocations of a section as (offset, type, addend, symbol label).
    pub fn labelled_relas(&self, name: &str) -> Vec<(u64, u32, i64, String)> {
        self.section(name)
            .relas
            .iter()
            .map(|&(o, t, a, s)| (o, t, a, self.label(s)))
            .collect()
    }
    /// The relocations of a section as (offset, type, addend, symbol name).
    pub fn relas(&self, name: &str) -> Vec<(u64, u32, i64, String)> {
        self.section(name)
            .relas
            .iter()
            .map(|&(o, t, a, s)| (o, t, a, self.symbols[s as usize].name.clone()))
            .collect()
    }
}

pub fn parse(data: &[u8]) -> Parsed {
    let h = elf::FileHeader64::<Endianness>::parse(data).unwrap();
    let e = h.endian().unwrap();
    let table = h.sections(e, data).unwrap();
    let symtab = table.symbols(e, data, elf::SHT_SYMTAB).unwrap();
    let mut sections = Vec::new();
    for (i, s) in table.enumerate() {
        let relas = match s.rela(e, data).unwrap() {
            Some((r, _)) => r
                .iter()
                .map(|r| {
                    (
                        r.r_offset.get(e),
                        r.r_type(e, false).0,
                        r.r_addend.get(e),
                        r.r_sym(e, false),
                    )
                })
                .collect(),
            None => Vec::new(),
        };
        sections.push(Sec {
            index: i.0,
            name: String::from_utf8(table.section_name(e, s).unwrap().to_vec()).unwrap(),
            sh_type: s.sh_type(e).0,
            sh_flags: s.sh_flags(e).0,
            sh_addr: s.sh_addr(e),
            sh_link: s.sh_link(e),
            sh_info: s.sh_info(e),
            sh_entsize: s.sh_entsize(e),
            sh_addralign: s.sh_addralign(e),
            data: if s.sh_type(e) == elf::SHT_NOBITS {
                Vec::new()
            } else {
                s.data(e, data).unwrap().to_vec()
            },
            relas,
        });
    }
    let symbols = symtab
        .symbols()
        .iter()
        .map(|s| SymInfo {
            name: String::from_utf8(symtab.symbol_name(e, s).unwrap().to_vec()).unwrap(),
            bind: s.st_bind().0,
            st_type: s.st_type().0,
            shndx: s.st_shndx(e).0,
            value: s.st_value(e),
            size: s.st_size(e),
        })
        .collect();
    Parsed {
        big_endian: e == Endianness::Big,
        e_type: h.e_type(e).0,
        e_machine: h.e_machine(e).0,
        sections,
        symbols,
        symtab: symtab.section().0,
        symtab_info: table.section(symtab.section()).unwrap().sh_info(e),
    }
}

/// The `.modinfo` entries.
pub fn modinfo(p: &Parsed) -> Vec<String> {
    p.section(".modinfo")
        .data
        .split(|&b| b == 0)
        .filter(|e| !e.is_empty())
        .map(|e| String::from_utf8_lossy(e).into_owned())
        .collect()
}

/// Whether the back-end of ELF machine `machine` writes `r_type` as a partnered entry.
pub fn partnered(machine: u16, r_type: u32) -> bool {
    struct Ask(u32);
    impl klp_backends::Visit for Ask {
        type Out = bool;
        fn visit<A: klp_arch::Arch>(self) -> bool {
            A::is_partnered(self.0)
        }
    }
    klp_backends::by_machine(machine, Ask(r_type)).unwrap_or(false)
}

/// Checks the structural invariants every output must satisfy: locals first and
/// `.symtab`'s `sh_info` the first global; every `.klp.rela` section is
/// `SHT_RELA`, `SHF_ALLOC | SHF_INFO_LINK | SHF_RELA_LIVEPATCH`, linked to the
/// symbol table and relocating an allocated section, and refers only to
/// `SHN_LIVEPATCH` symbols of its own object (or, for a partnered entry, to its
/// partner's label); every `.klp.sym` symbol is
/// `SHN_LIVEPATCH` with a well-formed name; no other relocation refers to one.
pub fn check_invariants(p: &Parsed) {
    assert_eq!(p.e_type, 1, "ET_REL");
    let first_global = p
        .symbols
        .iter()
        .position(|s| s.bind != 0)
        .unwrap_or(p.symbols.len());
    assert_eq!(p.symtab_info as usize, first_global, ".symtab sh_info");
    assert!(
        p.symbols[first_global..].iter().all(|s| s.bind != 0),
        "locals first"
    );
    for s in &p.symbols {
        if s.name.starts_with(".klp.sym.") {
            assert_eq!(s.shndx, 0xff20, "{}", s.name);
            let rest = &s.name[".klp.sym.".len()..];
            let (obj, rest) = rest.split_once('.').unwrap();
            assert!((1..=55).contains(&obj.len()));
            let (sym, pos) = rest.rsplit_once(',').unwrap();
            assert!(!sym.is_empty() && !sym.contains(','));
            pos.parse::<u64>().unwrap();
        } else {
            assert_ne!(s.shndx, 0xff20, "{}", s.name);
        }
    }
    for sec in &p.sections {
        if let Some(rest) = sec.name.strip_prefix(".klp.rela.") {
            let obj = rest.split('.').next().unwrap();
            assert_eq!(sec.sh_type, elf::SHT_RELA.0, "{}", sec.name);
            assert_eq!(sec.sh_flags, 0x2 | 0x40 | 0x0010_0000, "{}", sec.name);
            assert_eq!(sec.sh_link as usize, p.symtab, "{}", sec.name);
            assert_eq!(sec.sh_entsize, 24);
            let target = &p.sections[sec.sh_info as usize];
            assert!(
                target.sh_flags & 2 != 0,
                "{} relocates {}",
                sec.name,
                target.name
            );
            assert!(!sec.relas.is_empty());
            for &(_, r_type, _, sym) in &sec.relas {
                let s = &p.symbols[sym as usize];
                // A partnered entry (riscv64's PCREL_LO12) names the label of its
                // partner's place: a local of the relocated section.
                if partnered(p.e_machine, r_type)
                    && s.bind == 0
                    && u32::from(s.shndx) == sec.sh_info
                {
                    continue;
                }
                assert_eq!(s.shndx, 0xff20, "{}: {}", sec.name, s.name);
                assert!(
                    s.name.starts_with(&format!(".klp.sym.{obj}.")),
                    "{}",
                    s.name
                );
            }
        } else {
            for &(_, _, _, sym) in &sec.relas {
                let s = &p.symbols[sym as usize];
                assert_ne!(s.shndx, 0xff20, "{}: {}", sec.name, s.name);
            }
        }
    }
}
