//! The binaries a patch applies to: their symbols, read once, keeping only the names
//! the patch asks for.
//!
//! A target is an ELF file (an executable, a shared object, `vmlinux`, a `.ko`) read
//! from `.symtab`, or `.dynsym` when there is no `.symtab`; or a `System.map`-style
//! text list (`ADDRESS TYPE NAME`, lowercase types local, uppercase global, `U`, `w`
//! and `v` undefined), which may carry `/proc/kallsyms`' `[module]` tags: those lines
//! form one more object per module.
//!
//! Definitions of a name are kept in table order, so a definition's 1-based index is
//! its `sympos` — except in a kernel's ELF `vmlinux` (the object `vmlinux` when its
//! table has `__ksymtab_*` symbols), whose definitions are kept in address order, the kallsyms order the
//! kernel counts in. Each local definition remembers the `STT_FILE` symbol before it.

use std::collections::{HashMap, HashSet};

use object::elf;
use object::read::ReadRef;
use object::read::elf::{FileHeader, Sym as _, SymbolTable};
use object::{Endianness, FileKind};

use crate::elf::Arch;
use crate::error::{Bind, Candidate, Error, Kind, Visibility};
use crate::names::{MAIN_OBJECT, check_object_name, infer_object_name};

/// One target file as given to the converter.
#[derive(Clone, Debug)]
pub struct TargetInput<'a> {
    /// The object name (`vmlinux`, a module name). For a symbol map with `[module]`
    /// tags, the name of its untagged lines.
    pub name: String,
    /// The path or label used in messages.
    pub file: String,
    /// The file's contents.
    pub data: &'a [u8],
}

/// One definition of a wanted name in a target.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TargetSymbol {
    /// `st_value`, or the symbol map's address.
    pub address: u64,
    /// Binding.
    pub bind: Bind,
    /// Visibility (always default in a symbol map).
    pub visibility: Visibility,
    /// What it names.
    pub kind: Kind,
    /// The source file of a local symbol.
    pub file: Option<String>,
}

/// What the loader of the main object can resolve by itself.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Exports {
    /// Nothing says: every global default-visibility symbol is taken as resolvable.
    Unknown,
    /// A kernel (its table has `__ksymtab_*` symbols): the module loader resolves
    /// only exported symbols, i.e. those with a `__ksymtab_<name>`. Holds the wanted
    /// exported names.
    Kernel(HashSet<String>),
    /// An executable or shared object with a `.dynsym`: the dynamic linker resolves
    /// only the symbols defined there. Holds the wanted names defined there.
    Dynamic(HashSet<String>),
}

/// One target object, reduced to the names the patch wants.
#[derive(Clone, Debug)]
pub struct TargetObject {
    /// The object name.
    pub name: String,
    /// The file it came from.
    pub file: String,
    /// Which table was read (`.symtab`, `.dynsym`, `symbol map`).
    pub table: &'static str,
    /// Its architecture, when it is an ELF file.
    pub arch: Option<Arch>,
    pub(crate) symbols: HashMap<String, Vec<TargetSymbol>>,
    pub(crate) exports: Exports,
}

impl TargetObject {
    /// The definitions of `name`, in table order.
    pub fn definitions(&self, name: &str) -> &[TargetSymbol] {
        self.symbols.get(name).map_or(&[], Vec::as_slice)
    }

    /// The definitions of `name` as candidates for messages.
    pub fn candidates(&self, name: &str) -> Vec<Candidate> {
        self.definitions(name)
            .iter()
            .enumerate()
            .map(|(i, s)| self.candidate(i, s))
            .collect()
    }

    pub(crate) fn candidate(&self, index: usize, s: &TargetSymbol) -> Candidate {
        Candidate {
            object: self.name.clone(),
            sympos: index as u64 + 1,
            address: s.address,
            bind: s.bind,
            visibility: s.visibility,
            kind: s.kind,
            file: s.file.clone(),
        }
    }

    /// Whether this object's own loader resolves an ordinary undefined reference to
    /// a global default-visibility `name` (see [`Exports`]).
    pub fn loader_resolves(&self, name: &str) -> bool {
        match &self.exports {
            Exports::Unknown => true,
            Exports::Kernel(set) | Exports::Dynamic(set) => set.contains(name),
        }
    }

    /// What the export information is, for reports.
    pub fn exports(&self) -> &Exports {
        &self.exports
    }
}

/// Splits a `--target` argument, `[NAME=]PATH`, into the object name and the path
/// (the name inferred from the file name when it is left out, see
/// [`infer_object_name`]).
pub fn parse_target_arg(arg: &str) -> Result<(String, String), Error> {
    if let Some((name, path)) = arg.split_once('=')
        && !name.contains('/')
    {
        if path.is_empty() {
            return Err(Error::TargetArgument {
                arg: arg.to_string(),
                reason: "the path after '=' is empty".to_string(),
            });
        }
        return Ok((name.to_string(), path.to_string()));
    }
    match infer_object_name(arg) {
        Some(name) => Ok((name, arg.to_string())),
        None => Err(Error::TargetArgument {
            arg: arg.to_string(),
            reason: "its object name cannot be told from the file name; write NAME=PATH \
                     (vmlinux=PATH for the kernel or the main executable)"
                .to_string(),
        }),
    }
}

/// Reads a target: an ELF file gives one object, a symbol map one per `[module]` tag
/// plus its untagged lines. `wanted` are the names the patch leaves undefined.
pub fn load_target(
    input: &TargetInput<'_>,
    wanted: &HashSet<String>,
    patch_arch: Arch,
) -> Result<Vec<TargetObject>, Error> {
    check_object_name(&input.name)?;
    if input.data.starts_with(&elf::ELFMAG) {
        let obj = match FileKind::parse(input.data) {
            Ok(FileKind::Elf64) => {
                load_elf::<elf::FileHeader64<Endianness>>(input, wanted, patch_arch)?
            }
            Ok(FileKind::Elf32) => {
                load_elf::<elf::FileHeader32<Endianness>>(input, wanted, patch_arch)?
            }
            Ok(_) => {
                return Err(Error::Malformed {
                    file: input.file.clone(),
                    reason: "an ELF magic number, but not an ELF file".to_string(),
                });
            }
            Err(e) => {
                return Err(Error::Malformed {
                    file: input.file.clone(),
                    reason: e.to_string(),
                });
            }
        };
        Ok(vec![obj])
    } else {
        load_map(input, wanted)
    }
}

fn bind_of(b: elf::SymbolBind) -> Bind {
    match b {
        elf::STB_LOCAL => Bind::Local,
        elf::STB_WEAK => Bind::Weak,
        _ => Bind::Global,
    }
}

fn visibility_of(other: elf::SymbolOther) -> Visibility {
    match other.0 & 3 {
        1 => Visibility::Internal,
        2 => Visibility::Hidden,
        3 => Visibility::Protected,
        _ => Visibility::Default,
    }
}

fn load_elf<Elf: FileHeader<Endian = Endianness>>(
    input: &TargetInput<'_>,
    wanted: &HashSet<String>,
    patch_arch: Arch,
) -> Result<TargetObject, Error> {
    let file = input.file.as_str();
    let data = input.data;
    let m = |e: object::read::Error| Error::Malformed {
        file: file.to_string(),
        reason: e.to_string(),
    };
    let header = Elf::parse(data).map_err(m)?;
    let endian = header.endian().map_err(m)?;
    let mismatch = |target: String| Error::ArchMismatch {
        object: input.name.clone(),
        file: file.to_string(),
        patch: patch_arch.name().to_string(),
        target,
    };
    let arch = match Arch::from_header(
        file,
        header.e_machine(endian),
        header.is_type_64(),
        endian,
        header.e_flags(endian).0,
    ) {
        Ok(a) => a,
        Err(Error::UnsupportedMachine { machine, .. }) => return Err(mismatch(machine)),
        Err(Error::ByteOrder { machine, found, .. }) => {
            return Err(mismatch(format!("{found} {machine}")));
        }
        Err(e) => return Err(e),
    };
    if arch != patch_arch {
        return Err(mismatch(arch.name().to_string()));
    }
    let sections = header.sections(endian, data).map_err(m)?;
    let symtab = sections.symbols(endian, data, elf::SHT_SYMTAB).map_err(m)?;
    let dynsym = sections.symbols(endian, data, elf::SHT_DYNSYM).map_err(m)?;
    let (table, table_name) = if symtab.len() > 1 {
        (&symtab, ".symtab")
    } else if dynsym.len() > 1 {
        (&dynsym, ".dynsym")
    } else {
        return Err(Error::NoSymbols {
            file: file.to_string(),
        });
    };
    let mut scan = scan_table(endian, table, wanted, true).map_err(m)?;
    if scan.kernel && input.name == MAIN_OBJECT {
        // The kernel counts a vmlinux sympos in kallsyms order, which
        // scripts/kallsyms.c sorts by address; a System.map is in that order already.
        // (A module's kallsyms keep its symbol table order.)
        for defs in scan.symbols.values_mut() {
            defs.sort_by_key(|d| d.address);
        }
    }
    let e_type = header.e_type(endian);
    let exports = if scan.kernel {
        Exports::Kernel(scan.ksymtab)
    } else if dynsym.len() > 1 && (e_type == elf::ET_EXEC || e_type == elf::ET_DYN) {
        let own;
        let dynamic = if table_name == ".dynsym" {
            &scan
        } else {
            own = scan_table(endian, &dynsym, wanted, false).map_err(m)?;
            &own
        };
        Exports::Dynamic(
            dynamic
                .symbols
                .iter()
                .filter(|(_, defs)| defs.iter().any(|d| d.bind != Bind::Local))
                .map(|(n, _)| n.clone())
                .collect(),
        )
    } else {
        Exports::Unknown
    };
    Ok(TargetObject {
        name: input.name.clone(),
        file: file.to_string(),
        table: table_name,
        arch: Some(arch),
        symbols: scan.symbols,
        exports,
    })
}

#[derive(Default)]
struct Scan {
    symbols: HashMap<String, Vec<TargetSymbol>>,
    kernel: bool,
    ksymtab: HashSet<String>,
}

fn scan_table<'data, Elf: FileHeader<Endian = Endianness>, R: ReadRef<'data>>(
    endian: Endianness,
    table: &SymbolTable<'data, Elf, R>,
    wanted: &HashSet<String>,
    track_files: bool,
) -> object::read::Result<Scan> {
    let mut scan = Scan::default();
    let mut current_file: Option<String> = None;
    for sym in table.symbols() {
        let st_type = sym.st_type();
        let name = table.symbol_name(endian, sym)?;
        let Ok(name) = std::str::from_utf8(name) else {
            continue;
        };
        if st_type == elf::STT_FILE {
            if track_files {
                current_file = (!name.is_empty()).then(|| name.to_string());
            }
            continue;
        }
        if sym.st_shndx(endian) == elf::SHN_UNDEF || st_type == elf::STT_SECTION {
            continue;
        }
        if let Some(exported) = name.strip_prefix("__ksymtab_") {
            scan.kernel = true;
            if wanted.contains(exported) {
                scan.ksymtab.insert(exported.to_string());
            }
        }
        if name.is_empty() || !wanted.contains(name) {
            continue;
        }
        let bind = bind_of(sym.st_bind());
        let kind = match st_type {
            elf::STT_FUNC | elf::STT_GNU_IFUNC => Kind::Function,
            elf::STT_OBJECT | elf::STT_COMMON | elf::STT_TLS => Kind::Data,
            _ => Kind::Other,
        };
        scan.symbols
            .entry(name.to_string())
            .or_default()
            .push(TargetSymbol {
                address: sym.st_value(endian).into(),
                bind,
                visibility: visibility_of(sym.st_other()),
                kind,
                file: if bind == Bind::Local {
                    current_file.clone()
                } else {
                    None
                },
            });
    }
    Ok(scan)
}

fn load_map(input: &TargetInput<'_>, wanted: &HashSet<String>) -> Result<Vec<TargetObject>, Error> {
    let bad = |line: usize, reason: String| Error::SymbolMap {
        file: input.file.clone(),
        line,
        reason,
    };
    let text = std::str::from_utf8(input.data).map_err(|e| {
        let line = input.data[..e.valid_up_to()]
            .iter()
            .filter(|&&b| b == b'\n')
            .count()
            + 1;
        bad(line, "the file is not text".to_string())
    })?;
    // Objects in order of first appearance; index 0 is the untagged one.
    let mut order: Vec<String> = vec![input.name.clone()];
    let mut scans: HashMap<String, Scan> = HashMap::new();
    scans.insert(input.name.clone(), Scan::default());
    for (i, line) in text.lines().enumerate() {
        let n = i + 1;
        let mut fields = line.split_whitespace();
        let Some(addr) = fields.next() else {
            continue;
        };
        // nm prints undefined symbols without an address: "         U name".
        if matches!(addr, "U" | "w" | "v") && line.split_whitespace().count() == 2 {
            continue;
        }
        let (Some(ty), Some(name)) = (fields.next(), fields.next()) else {
            return Err(bad(
                n,
                format!("expected \"ADDRESS TYPE NAME\", found \"{line}\""),
            ));
        };
        let module = fields.next();
        if let Some(extra) = fields.next() {
            return Err(bad(
                n,
                format!("unexpected \"{extra}\" after the module tag"),
            ));
        }
        let address = u64::from_str_radix(addr, 16)
            .map_err(|_| bad(n, format!("\"{addr}\" is not a hexadecimal address")))?;
        let mut chars = ty.chars();
        let (Some(t), None) = (chars.next(), chars.next()) else {
            return Err(bad(n, format!("\"{ty}\" is not a one-letter symbol type")));
        };
        let object = match module {
            None => input.name.clone(),
            Some(tag) => {
                let Some(m) = tag.strip_prefix('[').and_then(|t| t.strip_suffix(']')) else {
                    return Err(bad(n, format!("\"{tag}\" is not a [module] tag")));
                };
                check_object_name(m)?;
                m.to_string()
            }
        };
        let scan = match scans.get_mut(&object) {
            Some(s) => s,
            None => {
                order.push(object.clone());
                scans.entry(object).or_default()
            }
        };
        // U: undefined; w, v: weak undefined (nm's lowercase weak types).
        if matches!(t, 'U' | 'w' | 'v') {
            continue;
        }
        if let Some(exported) = name.strip_prefix("__ksymtab_") {
            scan.kernel = true;
            if wanted.contains(exported) {
                scan.ksymtab.insert(exported.to_string());
            }
        }
        if !wanted.contains(name) {
            continue;
        }
        // nm's types: lowercase is local, except u (unique global) and i (ifunc).
        let bind = match t {
            'W' | 'V' => Bind::Weak,
            'u' | 'i' => Bind::Global,
            c if c.is_ascii_lowercase() => Bind::Local,
            _ => Bind::Global,
        };
        let kind = match t.to_ascii_lowercase() {
            't' | 'i' | 'w' => Kind::Function,
            'd' | 'b' | 'r' | 'g' | 's' | 'c' | 'v' => Kind::Data,
            _ => Kind::Other,
        };
        scan.symbols
            .entry(name.to_string())
            .or_default()
            .push(TargetSymbol {
                address,
                bind,
                visibility: Visibility::Default,
                kind,
                file: None,
            });
    }
    let mut out = Vec::with_capacity(order.len());
    for name in order {
        let Some(scan) = scans.remove(&name) else {
            continue;
        };
        out.push(TargetObject {
            exports: if scan.kernel {
                Exports::Kernel(scan.ksymtab)
            } else {
                Exports::Unknown
            },
            name,
            file: input.file.clone(),
            table: "symbol map",
            arch: None,
            symbols: scan.symbols,
        });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn wanted(names: &[&str]) -> HashSet<String> {
        names.iter().map(|s| s.to_string()).collect()
    }

    fn map(text: &str, names: &[&str]) -> Result<Vec<TargetObject>, Error> {
        load_map(
            &TargetInput {
                name: "vmlinux".into(),
                file: "System.map".into(),
                data: text.as_bytes(),
            },
            &wanted(names),
        )
    }

    #[test]
    fn system_map_binding_order_and_exports() {
        let objs = map(
            "ffffffff81000000 T _text\n\
             ffffffff81001000 t helper\n\
             ffffffff81002000 T printk\n\
             ffffffff81003000 t helper\n\
             ffffffff81004000 d counter\n\
             ffffffff81005000 W weakfn\n\
             0000000000000000 U undef\n\
                              w weak_undef\n\
             ffffffff82000000 r __ksymtab_printk\n",
            &["helper", "printk", "counter", "weakfn", "undef"],
        )
        .unwrap();
        assert_eq!(objs.len(), 1);
        let o = &objs[0];
        let h = o.definitions("helper");
        assert_eq!(h.len(), 2);
        assert_eq!((h[0].address, h[0].bind), (0xffffffff81001000, Bind::Local));
        assert_eq!(h[1].address, 0xffffffff81003000);
        assert_eq!(o.definitions("counter")[0].kind, Kind::Data);
        assert_eq!(o.definitions("weakfn")[0].bind, Bind::Weak);
        assert!(o.definitions("undef").is_empty());
        assert!(o.loader_resolves("printk"));
        assert!(!o.loader_resolves("helper"));
        assert_eq!(o.candidates("helper")[1].sympos, 2);
    }

    #[test]
    fn kallsyms_module_tags_make_objects() {
        let objs = map(
            "ffffffff81000000 T foo\n\
             ffffffffc0000000 t foo\t[ext4]\n\
             ffffffffc0001000 t bar [ext4]\n",
            &["foo", "bar"],
        )
        .unwrap();
        let names: Vec<_> = objs.iter().map(|o| o.name.as_str()).collect();
        assert_eq!(names, ["vmlinux", "ext4"]);
        assert_eq!(objs[1].definitions("foo").len(), 1);
        assert_eq!(objs[1].definitions("bar")[0].address, 0xffffffffc0001000);
        assert_eq!(objs[0].exports, Exports::Unknown);
    }

    #[test]
    fn bad_symbol_maps_name_the_line() {
        let e = map("ffff T ok\nnot-hex T x\n", &[]).unwrap_err();
        assert!(matches!(e, Error::SymbolMap { line: 2, .. }), "{e}");
        let e = map("ffff TT x\n", &[]).unwrap_err();
        assert!(matches!(e, Error::SymbolMap { line: 1, .. }), "{e}");
        let e = map("ffff T\n", &[]).unwrap_err();
        assert!(matches!(e, Error::SymbolMap { line: 1, .. }), "{e}");
        let e = map("ffff T x [a.b]\n", &[]).unwrap_err();
        assert!(matches!(e, Error::ObjectName { .. }), "{e}");
        let e = load_map(
            &TargetInput {
                name: "vmlinux".into(),
                file: "junk".into(),
                data: b"ffff T x\n\xff\xfe",
            },
            &wanted(&[]),
        )
        .unwrap_err();
        assert!(matches!(e, Error::SymbolMap { line: 2, .. }), "{e}");
    }
}
