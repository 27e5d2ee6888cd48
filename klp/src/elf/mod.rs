//! The livepatch module ELF format: reading a patch object.
//!
//! A livepatch module reaches code it cannot link against (static functions and data of
//! the patched object, symbols of modules that may not be loaded yet) through two
//! kinds of ELF entries (spec §8, the seed `module-elf-format`):
//!
//! * **livepatch symbols** `.klp.sym.<objname>.<symbol>,<sympos>`, whose section index
//!   is `SHN_LIVEPATCH` (0xff20): the symbol `<symbol>` of object `<objname>`
//!   (`vmlinux` or a module), the `<sympos>`-th of that name (0: unique);
//! * **livepatch relocation sections** `.klp.rela.<objname>.<section>`: `SHT_RELA`,
//!   flagged `SHF_ALLOC | SHF_RELA_LIVEPATCH` (0x00100000), whose entries reference
//!   livepatch symbols of `<objname>` and are written only when that object is present.
//!
//! [`PatchObject`] is a bounds-checked, allocation-free view of such an object (a
//! relocatable file, `ET_REL`, of any of the four architectures, in either byte order).
//! It uses the `object` crate's ELF definitions and byte-order types, not its `read`
//! module, which allocates infallibly and cannot be built for the kernel. Every
//! malformed field is an [`ElfError`] naming the field and the value. [`reloc`] resolves
//! livepatch symbols through the host and writes relocation sections through the
//! patch's architecture.

pub mod desc;
pub mod reloc;

use core::fmt;

use object::elf::{FileHeader64, Rela64, SectionHeader64, Sym64};
use object::endian::{Endian, Endianness};
use object::pod;

/// `SHF_RELA_LIVEPATCH`: a relocation section that livepatch writes.
pub const SHF_RELA_LIVEPATCH: u64 = 0x0010_0000;
/// `SHN_LIVEPATCH`: the section index of a livepatch symbol.
pub const SHN_LIVEPATCH: u16 = 0xff20;
/// The prefix of a livepatch relocation section's name.
pub const KLP_RELA_PREFIX: &str = ".klp.rela.";
/// The prefix of a livepatch symbol's name.
pub const KLP_SYM_PREFIX: &str = ".klp.sym.";
/// Most characters of an object name in a section or symbol name (`MODULE_NAME_LEN - 1`).
pub const OBJNAME_MAX: usize = 55;
/// Most characters of a symbol name in a livepatch symbol (`KSYM_NAME_LEN - 1`).
pub const SYMNAME_MAX: usize = 511;

const SHT_SYMTAB: u32 = 2;
const SHT_STRTAB: u32 = 3;
const SHT_RELA: u32 = 4;
const SHT_NOBITS: u32 = 8;
const SHT_SYMTAB_SHNDX: u32 = 18;
const SHF_ALLOC: u64 = 0x2;
const ET_REL: u16 = 1;
const ELFCLASS64: u8 = 2;
const ELFDATA2LSB: u8 = 1;
const ELFDATA2MSB: u8 = 2;
const SHN_XINDEX: u16 = 0xffff;
const SHN_LORESERVE: u16 = 0xff00;

/// Why a patch object could not be read. Names and values are those found in the file.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum ElfError<'d> {
    /// The file ends before `what` (at `offset`, `size` bytes).
    Truncated {
        /// What was being read.
        what: &'static str,
        /// Where it starts.
        offset: u64,
        /// How many bytes it needs.
        size: u64,
    },
    /// Not an ELF file (`e_ident` magic).
    NotElf,
    /// Not a 64-bit object (`EI_CLASS`).
    Class(u8),
    /// Unknown byte order (`EI_DATA`).
    Encoding(u8),
    /// Not a relocatable object (`e_type`).
    NotRelocatable(u16),
    /// Built for another machine (`e_machine`).
    Machine {
        /// `e_machine` of the file.
        found: u16,
        /// What the patch's architecture expects.
        expected: u16,
    },
    /// Another byte order than the architecture's.
    ByteOrder {
        /// Whether the file is big-endian.
        big: bool,
    },
    /// A header field has a size the format does not allow (`e_shentsize`,
    /// `sh_entsize` of a symbol or relocation table).
    EntrySize {
        /// The field.
        what: &'static str,
        /// Its value.
        value: u64,
    },
    /// A section index out of range.
    SectionIndex {
        /// The field holding it.
        what: &'static str,
        /// Its value.
        index: u64,
    },
    /// A name offset outside its string table, or a name without terminator.
    Name {
        /// The field holding it.
        what: &'static str,
        /// Its value.
        offset: u64,
    },
    /// A symbol index outside the symbol table.
    SymbolIndex {
        /// The relocation section.
        section: &'d str,
        /// The entry.
        entry: usize,
        /// The index found.
        index: u64,
    },
    /// The object has no symbol table.
    NoSymbolTable,
    /// `section %s has an incorrectly formatted name` (the kernel's message).
    SectionName(&'d str),
    /// `symbol %s has an incorrectly formatted name` (the kernel's message).
    SymbolName(&'d str),
    /// A `.klp.rela` section that is not `SHT_RELA` or lacks `SHF_RELA_LIVEPATCH`.
    NotLivepatchSection {
        /// Its name.
        section: &'d str,
        /// `sh_type`.
        sh_type: u32,
        /// `sh_flags`.
        sh_flags: u64,
    },
}

impl fmt::Display for ElfError<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ElfError::Truncated { what, offset, size } => write!(
                f,
                "the file ends inside {what} ({size} bytes at offset {offset:#x})"
            ),
            ElfError::NotElf => f.write_str("not an ELF file"),
            ElfError::Class(c) => write!(f, "not a 64-bit ELF object (class {c})"),
            ElfError::Encoding(d) => write!(f, "unknown ELF byte order {d}"),
            ElfError::NotRelocatable(t) => {
                write!(
                    f,
                    "not a relocatable object (e_type {t}; a patch is ET_REL)"
                )
            }
            ElfError::Machine { found, expected } => write!(
                f,
                "built for machine {found}, the patch's architecture is machine {expected}"
            ),
            ElfError::ByteOrder { big } => write!(
                f,
                "{}-endian object for a {}-endian architecture",
                if *big { "big" } else { "little" },
                if *big { "little" } else { "big" }
            ),
            ElfError::EntrySize { what, value } => write!(f, "{what} is {value}"),
            ElfError::SectionIndex { what, index } => {
                write!(f, "{what} {index} is not a section of the object")
            }
            ElfError::Name { what, offset } => {
                write!(f, "{what} {offset:#x} is not a name in its string table")
            }
            ElfError::SymbolIndex {
                section,
                entry,
                index,
            } => write!(
                f,
                "relocation {entry} of {section} references symbol {index}, past the symbol table"
            ),
            ElfError::NoSymbolTable => f.write_str("the object has no symbol table"),
            ElfError::SectionName(n) => write!(f, "section {n} has an incorrectly formatted name"),
            ElfError::SymbolName(n) => write!(f, "symbol {n} has an incorrectly formatted name"),
            ElfError::NotLivepatchSection {
                section,
                sh_type,
                sh_flags,
            } => write!(
                f,
                "{section} is not a livepatch relocation section (type {sh_type}, flags {sh_flags:#x})"
            ),
        }
    }
}

/// The object name of a livepatch relocation section's name (`sscanf(".klp.rela.%55[^.]")`):
/// 1 to 55 characters that are not `.`; a longer run is cut at 55. `None` if the name
/// does not have the form.
pub fn parse_rela_objname(name: &str) -> Option<&str> {
    let rest = name.strip_prefix(KLP_RELA_PREFIX)?;
    let run = rest.find('.').unwrap_or(rest.len()).min(OBJNAME_MAX);
    let obj = rest.get(..run)?;
    (!obj.is_empty()).then_some(obj)
}

/// The parts of a livepatch symbol's name.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct KlpSymName<'a> {
    /// `vmlinux` or a module's name.
    pub objname: &'a str,
    /// The symbol's name in that object.
    pub name: &'a str,
    /// Its position among same-named symbols (0: the name is unique).
    pub sympos: u64,
}

/// Parses `.klp.sym.<objname>.<symbol>,<sympos>` as the kernel does
/// (`sscanf(".klp.sym.%55[^.].%511[^,],%lu")`): an object name of 1 to 55 characters
/// without `.`, a `.`, a symbol name of 1 to 511 characters without `,` (dots allowed), a
/// `,` and an unsigned decimal number; what follows the number is ignored.
pub fn parse_sym_name(full: &str) -> Option<KlpSymName<'_>> {
    let rest = full.strip_prefix(KLP_SYM_PREFIX)?;
    let run = rest.find('.').unwrap_or(rest.len());
    if run == 0 || run > OBJNAME_MAX {
        return None;
    }
    let (objname, rest) = rest.split_at_checked(run)?;
    let rest = rest.strip_prefix('.')?;
    let run = rest.find(',').unwrap_or(rest.len());
    if run == 0 || run > SYMNAME_MAX {
        return None;
    }
    let (name, rest) = rest.split_at_checked(run)?;
    let rest = rest.strip_prefix(',')?;
    Some(KlpSymName {
        objname,
        name,
        sympos: scan_ulong(rest)?,
    })
}

/// `%lu`: optional leading white space, an optional sign, decimal digits (at least
/// one); the value wraps as `strtoul` does, and a minus sign negates it.
fn scan_ulong(s: &str) -> Option<u64> {
    let s = s.trim_start_matches([' ', '\t', '\n', '\r', '\x0b', '\x0c']);
    let (neg, s) = match s.as_bytes().first() {
        Some(b'-') => (true, s.get(1..)?),
        Some(b'+') => (false, s.get(1..)?),
        _ => (false, s),
    };
    let digits = s.bytes().take_while(u8::is_ascii_digit);
    let mut v: u64 = 0;
    let mut any = false;
    for d in digits {
        any = true;
        v = v
            .wrapping_mul(10)
            .wrapping_add(u64::from(d.wrapping_sub(b'0')));
    }
    any.then_some(if neg { v.wrapping_neg() } else { v })
}

/// One symbol of the patch object.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Symbol<'d> {
    /// Its index in the symbol table.
    pub index: usize,
    /// Its name.
    pub name: &'d str,
    /// `st_shndx` (extended indices resolved).
    pub shndx: u32,
    /// `st_value`.
    pub value: u64,
    /// `st_size`.
    pub size: u64,
    /// `st_info`.
    pub info: u8,
    /// `st_other` (visibility; ppc64le keeps the local entry offset in its top bits).
    pub other: u8,
}

impl Symbol<'_> {
    /// Whether it is a livepatch symbol (`st_shndx == SHN_LIVEPATCH`).
    pub fn is_livepatch(&self) -> bool {
        self.shndx == u32::from(SHN_LIVEPATCH)
    }

    /// Whether it is a label of section `section`: defined there, not a livepatch
    /// symbol. The symbol of a partnered relocation entry (`klp_arch::Arch::is_partnered`)
    /// must be one, in the section the entry relocates: the place of its partner.
    pub fn is_label_in(&self, section: usize) -> bool {
        !self.is_livepatch() && usize::try_from(self.shndx) == Ok(section)
    }
}

/// One section header, as read.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Section<'d> {
    /// Its index.
    pub index: usize,
    /// Its name.
    pub name: &'d str,
    /// `sh_type`.
    pub sh_type: u32,
    /// `sh_flags`.
    pub sh_flags: u64,
    /// `sh_size`.
    pub size: u64,
    /// `sh_link`.
    pub link: u32,
    /// `sh_info`.
    pub info: u32,
    /// `sh_addralign`.
    pub align: u64,
}

impl Section<'_> {
    /// Whether the section is a livepatch relocation section (by its flag, as the
    /// kernel's loaders select them).
    pub fn is_klp_rela(&self) -> bool {
        self.sh_flags & SHF_RELA_LIVEPATCH != 0
    }

    /// Whether it occupies memory at run time.
    pub fn is_alloc(&self) -> bool {
        self.sh_flags & SHF_ALLOC != 0
    }
}

/// One relocation entry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Rela {
    /// `r_offset`.
    pub offset: u64,
    /// `ELF64_R_SYM(r_info)`.
    pub sym: u32,
    /// `ELF64_R_TYPE(r_info)`.
    pub r_type: u32,
    /// `r_addend`.
    pub addend: i64,
}

/// A patch object: a bounds-checked view of a relocatable ELF file. See the module
/// documentation.
#[derive(Clone, Copy, Debug)]
pub struct PatchObject<'d> {
    data: &'d [u8],
    endian: Endianness,
    machine: u16,
    shdrs: &'d [SectionHeader64<Endianness>],
    shstrtab: &'d [u8],
    symtab: usize,
    syms: &'d [Sym64<Endianness>],
    strtab: &'d [u8],
    /// `SHT_SYMTAB_SHNDX` contents, if the object has more than 0xff00 sections.
    shndx: &'d [u8],
}

/// `len` bytes at `offset` of `data`.
fn bytes<'d>(
    data: &'d [u8],
    what: &'static str,
    offset: u64,
    len: u64,
) -> Result<&'d [u8], ElfError<'d>> {
    let err = ElfError::Truncated {
        what,
        offset,
        size: len,
    };
    let start = usize::try_from(offset).map_err(|_| err)?;
    let n = usize::try_from(len).map_err(|_| err)?;
    let end = start.checked_add(n).ok_or(err)?;
    data.get(start..end).ok_or(err)
}

/// The NUL-terminated name at `offset` of string table `tab`.
fn name_at<'d>(tab: &'d [u8], what: &'static str, offset: u32) -> Result<&'d str, ElfError<'d>> {
    let err = ElfError::Name {
        what,
        offset: u64::from(offset),
    };
    let start = usize::try_from(offset).map_err(|_| err)?;
    let rest = tab.get(start..).ok_or(err)?;
    let len = rest.iter().position(|b| *b == 0).ok_or(err)?;
    let s = rest.get(..len).ok_or(err)?;
    core::str::from_utf8(s).map_err(|_| err)
}

impl<'d> PatchObject<'d> {
    /// Reads the headers, the section names and the symbol table of `data`.
    pub fn parse(data: &'d [u8]) -> Result<Self, ElfError<'d>> {
        let ident = data.get(..16).ok_or(ElfError::Truncated {
            what: "the ELF identification",
            offset: 0,
            size: 16,
        })?;
        if ident.get(..4) != Some(&[0x7f, b'E', b'L', b'F'][..]) {
            return Err(ElfError::NotElf);
        }
        let class = ident.get(4).copied().unwrap_or(0);
        if class != ELFCLASS64 {
            return Err(ElfError::Class(class));
        }
        let endian = match ident.get(5).copied().unwrap_or(0) {
            ELFDATA2LSB => Endianness::Little,
            ELFDATA2MSB => Endianness::Big,
            d => return Err(ElfError::Encoding(d)),
        };
        let (hdr, _) = pod::from_bytes::<FileHeader64<Endianness>>(data).map_err(|()| {
            ElfError::Truncated {
                what: "the ELF header",
                offset: 0,
                size: 64,
            }
        })?;
        let e_type = hdr.e_type.get(endian).0;
        if e_type != ET_REL {
            return Err(ElfError::NotRelocatable(e_type));
        }
        let machine = hdr.e_machine.get(endian).0;
        let shentsize = hdr.e_shentsize.get(endian);
        if usize::from(shentsize) != core::mem::size_of::<SectionHeader64<Endianness>>() {
            return Err(ElfError::EntrySize {
                what: "e_shentsize",
                value: u64::from(shentsize),
            });
        }
        let shoff = hdr.e_shoff.get(endian);
        // Section 0 holds the real count and string-table index when they do not fit
        // the header (extended numbering).
        let first = bytes(data, "the section headers", shoff, 64)?;
        let (sh0, _) = pod::from_bytes::<SectionHeader64<Endianness>>(first).map_err(|()| {
            ElfError::Truncated {
                what: "the section headers",
                offset: shoff,
                size: 64,
            }
        })?;
        let shnum = match hdr.e_shnum.get(endian) {
            0 => sh0.sh_size.get(endian),
            n => u64::from(n),
        };
        let table_len = shnum.checked_mul(64).ok_or(ElfError::Truncated {
            what: "the section headers",
            offset: shoff,
            size: u64::MAX,
        })?;
        let table = bytes(data, "the section headers", shoff, table_len)?;
        let count = usize::try_from(shnum).map_err(|_| ElfError::SectionIndex {
            what: "e_shnum",
            index: shnum,
        })?;
        let (shdrs, _) = pod::slice_from_bytes::<SectionHeader64<Endianness>>(table, count)
            .map_err(|()| ElfError::Truncated {
                what: "the section headers",
                offset: shoff,
                size: table_len,
            })?;
        let shstrndx = match hdr.e_shstrndx.get(endian).0 {
            SHN_XINDEX => sh0.sh_link.get(endian),
            n => u32::from(n),
        };
        let mut obj = PatchObject {
            data,
            endian,
            machine,
            shdrs,
            shstrtab: &[],
            symtab: 0,
            syms: &[],
            strtab: &[],
            shndx: &[],
        };
        obj.shstrtab = obj.section_data_raw(shstrndx as usize, "e_shstrndx")?;
        let mut symtab = None;
        for (i, s) in shdrs.iter().enumerate() {
            match s.sh_type.get(endian).0 {
                SHT_SYMTAB if symtab.is_none() => symtab = Some(i),
                SHT_SYMTAB_SHNDX => obj.shndx = obj.section_data_raw(i, "SHT_SYMTAB_SHNDX")?,
                _ => {}
            }
        }
        let symtab = symtab.ok_or(ElfError::NoSymbolTable)?;
        let sh = obj.header(symtab, "the symbol table")?;
        let entsize = sh.sh_entsize.get(endian);
        if entsize != 24 {
            return Err(ElfError::EntrySize {
                what: "sh_entsize of the symbol table",
                value: entsize,
            });
        }
        let raw = obj.section_data_raw(symtab, "the symbol table")?;
        let n = raw.len() / 24;
        let (syms, _) = pod::slice_from_bytes::<Sym64<Endianness>>(raw, n).map_err(|()| {
            ElfError::Truncated {
                what: "the symbol table",
                offset: sh.sh_offset.get(endian),
                size: sh.sh_size.get(endian),
            }
        })?;
        let link = sh.sh_link.get(endian);
        let strhdr = obj.header(link as usize, "sh_link of the symbol table")?;
        if strhdr.sh_type.get(endian).0 != SHT_STRTAB {
            return Err(ElfError::SectionIndex {
                what: "sh_link of the symbol table",
                index: u64::from(link),
            });
        }
        obj.strtab = obj.section_data_raw(link as usize, "the symbol string table")?;
        obj.symtab = symtab;
        obj.syms = syms;
        Ok(obj)
    }

    /// Fails unless the object is for `machine` in the given byte order.
    pub fn check_machine(&self, machine: u16, big_endian: bool) -> Result<(), ElfError<'d>> {
        if self.machine != machine {
            return Err(ElfError::Machine {
                found: self.machine,
                expected: machine,
            });
        }
        let big = self.endian == Endianness::Big;
        if big != big_endian {
            return Err(ElfError::ByteOrder { big });
        }
        Ok(())
    }

    /// `e_machine`.
    pub fn machine(&self) -> u16 {
        self.machine
    }

    /// Whether the object is big-endian.
    pub fn is_big_endian(&self) -> bool {
        self.endian == Endianness::Big
    }

    /// The number of sections (entry 0 included).
    pub fn section_count(&self) -> usize {
        self.shdrs.len()
    }

    /// The index of the symbol table section.
    pub fn symtab_index(&self) -> usize {
        self.symtab
    }

    /// The number of symbols (entry 0 included).
    pub fn symbol_count(&self) -> usize {
        self.syms.len()
    }

    fn header(
        &self,
        index: usize,
        what: &'static str,
    ) -> Result<&'d SectionHeader64<Endianness>, ElfError<'d>> {
        self.shdrs.get(index).ok_or(ElfError::SectionIndex {
            what,
            index: index as u64,
        })
    }

    fn section_data_raw(&self, index: usize, what: &'static str) -> Result<&'d [u8], ElfError<'d>> {
        let sh = self.header(index, what)?;
        if sh.sh_type.get(self.endian).0 == SHT_NOBITS {
            return Ok(&[]);
        }
        bytes(
            self.data,
            what,
            sh.sh_offset.get(self.endian),
            sh.sh_size.get(self.endian),
        )
    }

    /// Section `index`.
    pub fn section(&self, index: usize) -> Result<Section<'d>, ElfError<'d>> {
        let sh = self.header(index, "a section index")?;
        let e = self.endian;
        Ok(Section {
            index,
            name: name_at(self.shstrtab, "sh_name", sh.sh_name.get(e))?,
            sh_type: sh.sh_type.get(e).0,
            sh_flags: sh.sh_flags.get(e).0,
            size: sh.sh_size.get(e),
            link: sh.sh_link.get(e),
            info: sh.sh_info.get(e),
            align: sh.sh_addralign.get(e),
        })
    }

    /// Every section, in index order (entry 0 included).
    pub fn sections(&self) -> impl Iterator<Item = Result<Section<'d>, ElfError<'d>>> + '_ {
        (0..self.shdrs.len()).map(|i| self.section(i))
    }

    /// The file contents of section `index` (empty for `SHT_NOBITS`).
    pub fn section_data(&self, index: usize) -> Result<&'d [u8], ElfError<'d>> {
        self.section_data_raw(index, "a section's contents")
    }

    /// The first section named `name`.
    pub fn section_by_name(&self, name: &str) -> Option<Section<'d>> {
        self.sections()
            .filter_map(Result::ok)
            .find(|s| s.name == name)
    }

    /// Symbol `index`.
    pub fn symbol(&self, index: usize) -> Result<Symbol<'d>, ElfError<'d>> {
        let s = self.syms.get(index).ok_or(ElfError::SectionIndex {
            what: "a symbol index",
            index: index as u64,
        })?;
        let e = self.endian;
        let raw = s.st_shndx.get(e).0;
        let shndx = if raw == SHN_XINDEX {
            let at = index.checked_mul(4).ok_or(ElfError::SectionIndex {
                what: "SHT_SYMTAB_SHNDX",
                index: index as u64,
            })?;
            let b = bytes(self.shndx, "SHT_SYMTAB_SHNDX", at as u64, 4)?;
            let w = [
                b.first().copied().unwrap_or(0),
                b.get(1).copied().unwrap_or(0),
                b.get(2).copied().unwrap_or(0),
                b.get(3).copied().unwrap_or(0),
            ];
            e.read_u32(w)
        } else {
            u32::from(raw)
        };
        Ok(Symbol {
            index,
            name: name_at(self.strtab, "st_name", s.st_name.get(e))?,
            shndx,
            value: s.st_value.get(e),
            size: s.st_size.get(e),
            info: s.st_info.0,
            other: s.st_other.0,
        })
    }

    /// Every symbol, in table order (entry 0 included).
    pub fn symbols(&self) -> impl Iterator<Item = Result<Symbol<'d>, ElfError<'d>>> + '_ {
        (0..self.syms.len()).map(|i| self.symbol(i))
    }

    /// Whether a symbol's section index is an ordinary section of this object.
    pub fn is_section_index(&self, shndx: u32) -> bool {
        shndx != 0
            && (shndx < u32::from(SHN_LORESERVE) || shndx > u32::from(SHN_XINDEX))
            && (shndx as usize) < self.shdrs.len()
    }

    /// The entries of relocation section `index`.
    pub fn relas(&self, index: usize) -> Result<impl Iterator<Item = Rela> + 'd, ElfError<'d>> {
        let sec = self.section(index)?;
        let sh = self.header(index, "a relocation section")?;
        let entsize = sh.sh_entsize.get(self.endian);
        if sec.sh_type != SHT_RELA || entsize != 24 {
            return Err(ElfError::EntrySize {
                what: "sh_entsize of a relocation section",
                value: entsize,
            });
        }
        let raw = self.section_data(index)?;
        let (entries, _) = pod::slice_from_bytes::<Rela64<Endianness>>(raw, raw.len() / 24)
            .map_err(|()| ElfError::Truncated {
                what: "a relocation section",
                offset: sh.sh_offset.get(self.endian),
                size: sh.sh_size.get(self.endian),
            })?;
        let e = self.endian;
        Ok(entries.iter().map(move |r| Rela {
            offset: r.r_offset.get(e),
            sym: r.r_sym(e, false),
            r_type: r.r_type(e, false).0,
            addend: r.r_addend.get(e),
        }))
    }

    /// The `key=value` entries of `.modinfo`.
    pub fn modinfo(&self) -> impl Iterator<Item = &'d str> + 'd {
        let data = self
            .section_by_name(".modinfo")
            .and_then(|s| self.section_data(s.index).ok())
            .unwrap_or(&[]);
        data.split(|b| *b == 0)
            .filter(|e| !e.is_empty())
            .filter_map(|e| core::str::from_utf8(e).ok())
    }

    /// Whether `.modinfo` marks the object as a livepatch module (`livepatch=Y`).
    pub fn is_livepatch(&self) -> bool {
        self.modinfo().any(|e| e == "livepatch=Y")
    }

    /// Every livepatch relocation section (`SHF_RELA_LIVEPATCH`), checked: its name
    /// has the form (else [`ElfError::SectionName`], the kernel's message), it is
    /// `SHT_RELA` and it applies to a section of the object.
    pub fn klp_relas(&self) -> impl Iterator<Item = Result<KlpRela<'d>, ElfError<'d>>> + '_ {
        self.sections().filter_map(move |s| match s {
            Err(e) => Some(Err(e)),
            Ok(s) if !s.is_klp_rela() => None,
            Ok(s) => Some(self.klp_rela(s)),
        })
    }

    fn klp_rela(&self, s: Section<'d>) -> Result<KlpRela<'d>, ElfError<'d>> {
        let objname = parse_rela_objname(s.name).ok_or(ElfError::SectionName(s.name))?;
        if s.sh_type != SHT_RELA {
            return Err(ElfError::NotLivepatchSection {
                section: s.name,
                sh_type: s.sh_type,
                sh_flags: s.sh_flags,
            });
        }
        let target = s.info as usize;
        if target == 0 || target >= self.shdrs.len() {
            return Err(ElfError::SectionIndex {
                what: "sh_info of a livepatch relocation section",
                index: u64::from(s.info),
            });
        }
        if s.link as usize != self.symtab {
            return Err(ElfError::SectionIndex {
                what: "sh_link of a livepatch relocation section",
                index: u64::from(s.link),
            });
        }
        Ok(KlpRela {
            section: s,
            objname,
            target,
        })
    }
}

/// A livepatch relocation section.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct KlpRela<'d> {
    /// The section itself.
    pub section: Section<'d>,
    /// The object its symbols belong to (`vmlinux` or a module).
    pub objname: &'d str,
    /// The index of the section it relocates (`sh_info`).
    pub target: usize,
}

#[cfg(test)]
mod tests;
