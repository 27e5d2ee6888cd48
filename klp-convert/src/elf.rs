//! Reading the patch object into a neutral model, and the pieces of ELF both the
//! reader and the writer share: the architecture check and the `Rela` codec.
//!
//! The model keeps every section's header and bytes as they are, so the writer can
//! emit them unchanged; only the symbol table, the string tables, the relocation
//! sections that lose entries and `.modinfo` are touched.

use object::elf;
use object::read::elf::{FileHeader, SectionHeader as _};
use object::write::elf::{Encoder, Rel, SectionHeader, Sym};
use object::{Endianness, FileKind};

use crate::error::Error;

/// An architecture klp has a back-end for (`klp-backends`), with what klp-convert
/// needs of it: its name, ELF machine, byte order and 64-bit absolute relocation type.
/// Files of any back-end's machine are accepted; the associated constants name the
/// architectures klp's own tests use.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Arch {
    name: &'static str,
    machine: u16,
    big: bool,
    abs64: u32,
}

struct Describe;

impl klp_backends::Visit for Describe {
    type Out = Arch;
    fn visit<A: klp_backends::Arch>(self) -> Arch {
        Arch {
            name: A::NAME,
            machine: A::ELF_MACHINE,
            big: A::ENDIAN == klp_backends::Endian::Big,
            abs64: A::ABS64_RELOC,
        }
    }
}

impl Arch {
    /// x86_64.
    pub const X86_64: Arch = Arch::new("x86_64", 62, false, 1);
    /// aarch64.
    pub const AARCH64: Arch = Arch::new("aarch64", 183, false, 257);
    /// 64-bit PowerPC, little-endian, ELFv2 ABI.
    pub const PPC64LE: Arch = Arch::new("ppc64le", 21, false, 38);
    /// s390x (64-bit z/Architecture), big-endian.
    pub const S390X: Arch = Arch::new("s390x", 22, true, 22);

    const fn new(name: &'static str, machine: u16, big: bool, abs64: u32) -> Arch {
        Arch {
            name,
            machine,
            big,
            abs64,
        }
    }

    /// The back-end of ELF machine `machine`.
    pub fn of_machine(machine: u16) -> Option<Arch> {
        klp_backends::by_machine(machine, Describe).ok()
    }

    /// The back-end called `name` (`x86_64`, `ppc64le`, …).
    pub fn named(name: &str) -> Option<Arch> {
        klp_backends::by_name(name, Describe).ok()
    }

    /// The name klp uses for it (`x86_64`, `aarch64`, `ppc64le`, `s390x`, …).
    pub fn name(self) -> &'static str {
        self.name
    }

    /// Its ELF machine (`e_machine`).
    pub fn machine(self) -> u16 {
        self.machine
    }

    /// Whether it is big-endian.
    pub fn big_endian(self) -> bool {
        self.big
    }

    /// The relocation type of a 64-bit absolute address.
    pub fn abs64(self) -> u32 {
        self.abs64
    }

    /// The architecture of an ELF header, or why it is not one klp has a back-end for.
    pub(crate) fn from_header(
        file: &str,
        machine: elf::Machine,
        is_64: bool,
        endian: Endianness,
        e_flags: u32,
    ) -> Result<Arch, Error> {
        let big = endian == Endianness::Big;
        let Some(arch) = Arch::of_machine(machine.0) else {
            return Err(Error::UnsupportedMachine {
                file: file.to_string(),
                machine: format!("ELF machine {}", machine.0),
            });
        };
        if !is_64 {
            return Err(Error::UnsupportedMachine {
                file: file.to_string(),
                machine: format!("32-bit {}", arch.family()),
            });
        }
        if big != arch.big {
            return Err(Error::ByteOrder {
                file: file.to_string(),
                machine: arch.family().to_string(),
                found: if big { "big-endian" } else { "little-endian" },
            });
        }
        // ELFv1 (`e_flags` ABI 1) has function descriptors; klp's ppc64le is ELFv2.
        // 0 means "unspecified", which a little-endian file treats as ELFv2.
        if machine == elf::EM_PPC64 && e_flags & elf::EF_PPC64_ABI == 1 {
            return Err(Error::UnsupportedMachine {
                file: file.to_string(),
                machine: "ppc64 with the ELFv1 ABI".to_string(),
            });
        }
        Ok(arch)
    }

    /// The family name, without a byte-order suffix (`ppc64` for ppc64le).
    fn family(self) -> &'static str {
        self.name.strip_suffix("le").unwrap_or(self.name)
    }
}

impl std::fmt::Display for Arch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// One section of the patch object, header and bytes.
#[derive(Clone, Debug)]
pub(crate) struct Section {
    /// The name, without its terminating NUL.
    pub name: Vec<u8>,
    /// The header as read; `sh_offset` and `sh_size` are recomputed on write.
    pub header: SectionHeader,
    /// The contents (empty for `SHT_NOBITS`, whose size stays in `header.sh_size`).
    pub data: Vec<u8>,
}

impl Section {
    pub fn name_lossy(&self) -> String {
        String::from_utf8_lossy(&self.name).into_owned()
    }
}

/// One symbol of the patch object's `.symtab`.
#[derive(Clone, Debug)]
pub(crate) struct Symbol {
    /// The name, without its terminating NUL.
    pub name: Vec<u8>,
    /// The entry as read.
    pub sym: Sym,
}

impl Symbol {
    pub fn is_undefined(&self) -> bool {
        self.sym.st_shndx == elf::SHN_UNDEF
    }
}

/// The patch object, parsed.
#[derive(Clone, Debug)]
pub(crate) struct PatchObject {
    pub file: String,
    pub arch: Arch,
    pub endian: Endianness,
    pub is_64: bool,
    pub header: object::write::elf::FileHeader,
    /// Every section, by index (index 0 is the null section).
    pub sections: Vec<Section>,
    pub shstrndx: usize,
    pub symtab: usize,
    pub strtab: usize,
    /// Every symbol of `.symtab`, by index (index 0 is the null symbol).
    pub symbols: Vec<Symbol>,
}

fn malformed(file: &str, e: impl std::fmt::Display) -> Error {
    Error::Malformed {
        file: file.to_string(),
        reason: e.to_string(),
    }
}

impl PatchObject {
    /// Parses an `ET_REL` file of an architecture klp has a back-end for.
    pub fn parse(file: &str, data: &[u8]) -> Result<PatchObject, Error> {
        match FileKind::parse(data) {
            Ok(FileKind::Elf64) => Self::parse_elf::<elf::FileHeader64<Endianness>>(file, data),
            Ok(FileKind::Elf32) => Self::parse_elf::<elf::FileHeader32<Endianness>>(file, data),
            Ok(_) => Err(malformed(file, "not an ELF file")),
            Err(e) => Err(malformed(file, e)),
        }
    }

    fn parse_elf<Elf: FileHeader<Endian = Endianness>>(
        file: &str,
        data: &[u8],
    ) -> Result<PatchObject, Error> {
        let m = |e| malformed(file, e);
        let header = Elf::parse(data).map_err(m)?;
        let endian = header.endian().map_err(m)?;
        let arch = Arch::from_header(
            file,
            header.e_machine(endian),
            header.is_type_64(),
            endian,
            header.e_flags(endian).0,
        )?;
        let e_type = header.e_type(endian);
        if e_type != elf::ET_REL {
            return Err(Error::NotRelocatable {
                file: file.to_string(),
                e_type: e_type.0,
            });
        }
        let table = header.sections(endian, data).map_err(m)?;
        let shstrndx = header.shstrndx(endian, data).map_err(m)? as usize;
        let mut sections = Vec::with_capacity(table.len());
        for (i, s) in table.enumerate() {
            if i.0 == 0 {
                sections.push(Section {
                    name: Vec::new(),
                    header: SectionHeader::default(),
                    data: Vec::new(),
                });
                continue;
            }
            let name = table.section_name(endian, s).map_err(m)?.to_vec();
            let bytes = if s.sh_type(endian) == elf::SHT_NOBITS {
                Vec::new()
            } else {
                s.data(endian, data).map_err(m)?.to_vec()
            };
            sections.push(Section {
                name,
                header: SectionHeader::from_raw(endian, s),
                data: bytes,
            });
        }
        let symtab = table.symbols(endian, data, elf::SHT_SYMTAB).map_err(m)?;
        if symtab.section().0 == 0 {
            return Err(Error::NoSymbols {
                file: file.to_string(),
            });
        }
        let strtab = symtab.string_section().0;
        for (index, what) in [(shstrndx, "section name"), (strtab, "symbol name")] {
            let ok = sections
                .get(index)
                .is_some_and(|s| index != 0 && s.header.sh_type == elf::SHT_STRTAB);
            if !ok {
                return Err(malformed(
                    file,
                    format!("its {what} table (section {index}) is not a string table"),
                ));
            }
        }
        let mut symbols = Vec::with_capacity(symtab.len());
        for s in symtab.symbols() {
            let name = symtab.symbol_name(endian, s).map_err(m)?.to_vec();
            symbols.push(Symbol {
                name,
                sym: Sym::from_raw(endian, s, None),
            });
        }
        Ok(PatchObject {
            file: file.to_string(),
            arch,
            endian,
            is_64: header.is_type_64(),
            header: object::write::elf::FileHeader::from_raw(endian, header),
            sections,
            shstrndx,
            symtab: symtab.section().0,
            strtab,
            symbols,
        })
    }

    pub fn encoder(&self) -> Encoder<Endianness> {
        Encoder::new(self.endian, self.is_64, self.header.e_machine)
    }

    /// The size of one `Rela` entry.
    pub fn rela_size(&self) -> u64 {
        self.encoder().rel_size(true)
    }

    /// Decodes the entries of a `SHT_RELA` section.
    pub fn decode_relas(&self, index: usize) -> Result<Vec<Rel>, Error> {
        let s = &self.sections[index];
        let size = self.rela_size();
        let bad = |reason: String| Error::RelocationSection {
            section: s.name_lossy(),
            reason,
        };
        if s.header.sh_entsize != size {
            return Err(bad(format!(
                "its entry size is {}, a {}-bit Rela entry has {size} bytes",
                s.header.sh_entsize,
                if self.is_64 { 64 } else { 32 }
            )));
        }
        if !(s.data.len() as u64).is_multiple_of(size) {
            return Err(bad(format!(
                "its size {} is not a multiple of the entry size {size}",
                s.data.len()
            )));
        }
        let e = self.endian;
        let mut out = Vec::with_capacity(s.data.len() / size as usize);
        for chunk in s.data.chunks_exact(size as usize) {
            let rel = if self.is_64 {
                let off = read_u64(e, &chunk[0..8]);
                let info = read_u64(e, &chunk[8..16]);
                let addend = read_u64(e, &chunk[16..24]) as i64;
                Rel {
                    r_offset: off,
                    r_sym: (info >> 32) as u32,
                    r_type: elf::RelocationType((info & 0xffff_ffff) as u32),
                    r_addend: addend,
                }
            } else {
                let off = read_u32(e, &chunk[0..4]);
                let info = read_u32(e, &chunk[4..8]);
                let addend = read_u32(e, &chunk[8..12]) as i32;
                Rel {
                    r_offset: u64::from(off),
                    r_sym: info >> 8,
                    r_type: elf::RelocationType(info & 0xff),
                    r_addend: i64::from(addend),
                }
            };
            if rel.r_sym as usize >= self.symbols.len() {
                return Err(bad(format!(
                    "an entry refers to symbol {}, and the symbol table has {} entries",
                    rel.r_sym,
                    self.symbols.len()
                )));
            }
            out.push(rel);
        }
        Ok(out)
    }

    /// Encodes `Rela` entries in this object's class and byte order.
    pub fn encode_relas(&self, relas: &[Rel]) -> Vec<u8> {
        let enc = self.encoder();
        let mut out = Vec::with_capacity(relas.len() * enc.rel_size(true) as usize);
        for r in relas {
            enc.relocation(&mut out, true, r);
        }
        out
    }

    /// Encodes one symbol table entry.
    pub fn encode_symbol(&self, sym: &Sym) -> Vec<u8> {
        let mut out = Vec::new();
        self.encoder().symbol(&mut out, sym);
        out
    }
}

fn read_u64(e: Endianness, b: &[u8]) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(b);
    match e {
        Endianness::Little => u64::from_le_bytes(a),
        Endianness::Big => u64::from_be_bytes(a),
    }
}

fn read_u32(e: Endianness, b: &[u8]) -> u32 {
    let mut a = [0u8; 4];
    a.copy_from_slice(b);
    match e {
        Endianness::Little => u32::from_le_bytes(a),
        Endianness::Big => u32::from_be_bytes(a),
    }
}

#[cfg(test)]
mod arch_tests {
    use super::Arch;

    #[test]
    fn the_named_constants_are_the_back_ends() {
        for a in [Arch::X86_64, Arch::AARCH64, Arch::PPC64LE, Arch::S390X] {
            assert_eq!(Arch::of_machine(a.machine()), Some(a));
            assert_eq!(Arch::named(a.name()), Some(a));
        }
        assert_eq!(Arch::of_machine(0), None);
        assert_eq!(Arch::PPC64LE.family(), "ppc64");
    }
}
