//! The patch description: which functions of which objects the patch replaces, and
//! each object's callbacks, written from the manifest's `patch` in upstream
//! klp-build's layout (Linux v6.19+, spec §1.11), the form the patch module's init
//! code turns into `struct klp_patch` before `klp_enable_patch()`.
//!
//! LP64, every field in the object's byte order:
//!
//! ```c
//! struct klp_func_ext {            /* 24 bytes, align 8 */
//!     const char *old_name;        /* @0  */
//!     void *new_func;              /* @8  */
//!     unsigned long sympos;        /* @16 */
//! };
//! struct klp_callbacks {           /* 40 bytes, align 8 */
//!     int  (*pre_patch)(struct klp_object *);    /* @0  */
//!     void (*post_patch)(struct klp_object *);   /* @8  */
//!     void (*pre_unpatch)(struct klp_object *);  /* @16 */
//!     void (*post_unpatch)(struct klp_object *); /* @24 */
//!     bool post_unpatch_enabled;                 /* @32, then 7 bytes padding */
//! };
//! struct klp_object_ext {          /* 64 bytes, align 8 */
//!     const char *name;            /* @0: NULL for vmlinux, else the module name */
//!     struct klp_func_ext *funcs;  /* @8  */
//!     struct klp_callbacks callbacks; /* @16 .. @56 */
//!     unsigned int nr_funcs;       /* @56 (u32), then 4 bytes padding */
//! };
//! ```
//!
//! * `.init.klp_objects` (`SHT_PROGBITS`, `SHF_ALLOC`, align 8): one `klp_object_ext`
//!   per object, in manifest order; `.init.klp_funcs` (the same): every
//!   `klp_func_ext`, each object's run contiguous and in manifest order;
//!   `.init.klp_strings` (`SHF_ALLOC | SHF_MERGE | SHF_STRINGS`, entsize 1): the
//!   object names and old names, NUL-terminated (each distinct string once).
//! * Every pointer is 0 in the data, with a `Rela` entry of the architecture's
//!   64-bit absolute type in `.rela.init.klp_objects` / `.rela.init.klp_funcs`
//!   (`SHF_INFO_LINK`, `sh_link` = `.symtab`): strings through the section symbol
//!   of `.init.klp_strings` + the string's offset, `funcs` through the section
//!   symbol of `.init.klp_funcs` + the run's offset (also for an object without
//!   functions: the offset where its run would start), `new_func` and callbacks
//!   through the function's own symbol + 0. A NULL pointer (vmlinux's name, an
//!   absent callback) has no entry. `post_unpatch_enabled` is 0 (the core sets it).
//! * The two section symbols are new locals, inserted after the existing locals;
//!   the globals after them move up by two, and every reference to a symbol index
//!   (relocation sections, section groups, `SHT_SYMTAB_SHNDX`, `.llvm_addrsig`)
//!   is renumbered.

use std::collections::HashMap;

use object::elf;
use object::write::elf::{Rel, SectionHeader, Sym};

use crate::elf::{Arch, PatchObject, Section};
use crate::error::{Error, Kind};
use crate::manifest::{CALLBACK_KINDS, Manifest};
use crate::names::{MAIN_OBJECT, SHN_LIVEPATCH};
use crate::target::TargetObject;
use crate::write::KlpSection;

/// The section of the `klp_object_ext` records.
pub const OBJECTS_SECTION: &str = ".init.klp_objects";
/// The section of the `klp_func_ext` records.
pub const FUNCS_SECTION: &str = ".init.klp_funcs";
/// The section of the description's strings.
pub const STRINGS_SECTION: &str = ".init.klp_strings";
/// The relocation section of [`OBJECTS_SECTION`].
pub const OBJECTS_RELA_SECTION: &str = ".rela.init.klp_objects";
/// The relocation section of [`FUNCS_SECTION`].
pub const FUNCS_RELA_SECTION: &str = ".rela.init.klp_funcs";

/// `sizeof(struct klp_object_ext)`.
pub const OBJECT_EXT_SIZE: u64 = 64;
/// `sizeof(struct klp_func_ext)`.
pub const FUNC_EXT_SIZE: u64 = 24;
/// `offsetof(struct klp_object_ext, callbacks)`.
pub const OBJECT_EXT_CALLBACKS: u64 = 16;
/// `offsetof(struct klp_object_ext, nr_funcs)`.
pub const OBJECT_EXT_NR_FUNCS: u64 = 56;

/// The name prefixes that make a function of the patch an object's callback, in
/// `struct klp_callbacks` order; the object's name follows.
pub const CALLBACK_PREFIXES: [&str; 4] = [
    "__klp_pre_patch_callback_",
    "__klp_post_patch_callback_",
    "__klp_pre_unpatch_callback_",
    "__klp_post_unpatch_callback_",
];

/// `SHT_CREL`: LLVM's compact relocations (not decoded, so not renumbered).
const SHT_CREL: u32 = 0x4000_0014;
/// `SHT_LLVM_ADDRSIG`: ULEB128 symbol indices.
const SHT_LLVM_ADDRSIG: u32 = 0x6fff_4c03;
/// `SHT_LLVM_CALL_GRAPH_PROFILE`: with entsize 8, weights only (the symbols are in
/// its relocation section).
const SHT_LLVM_CALL_GRAPH_PROFILE: u32 = 0x6fff_4c09;

/// The architecture's 64-bit absolute relocation type: the psABIs' `R_X86_64_64`
/// (1), `R_AARCH64_ABS64` (257), `R_PPC64_ADDR64` (38), `R_390_64` (22).
pub fn abs64_type(arch: Arch) -> u32 {
    arch.abs64()
}

/// One function of a written description.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DescribedFunc {
    /// The function replaced.
    pub old: String,
    /// The replacement (a function of the patch).
    pub new: String,
    /// `sympos` as written.
    pub sympos: u64,
}

/// One object of a written description.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DescribedObject {
    /// `vmlinux` or the module name.
    pub name: String,
    /// Whether its functions were checked against a target.
    pub checked: bool,
    /// Its functions, in order.
    pub funcs: Vec<DescribedFunc>,
    /// Its callbacks' function names, in `struct klp_callbacks` order (see
    /// [`CALLBACK_KINDS`]).
    pub callbacks: [Option<String>; 4],
}

/// The patch description written.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Description {
    /// The objects, in order.
    pub objects: Vec<DescribedObject>,
    /// Atomic replace (`klp_replace=Y` in `.modinfo`).
    pub replace: bool,
}

/// The description with the patch's symbol indices.
#[derive(Clone, Debug)]
pub(crate) struct Planned {
    pub description: Description,
    /// Per object: the `new_func` symbol indices, and the callbacks' symbol indices.
    symbols: Vec<(Vec<usize>, [Option<usize>; 4])>,
}

/// The name of a description section the input has already, if any.
pub(crate) fn existing(p: &PatchObject) -> Option<String> {
    let names = [
        OBJECTS_SECTION,
        FUNCS_SECTION,
        STRINGS_SECTION,
        OBJECTS_RELA_SECTION,
        FUNCS_RELA_SECTION,
    ];
    p.sections
        .iter()
        .find(|s| names.iter().any(|n| s.name == n.as_bytes()))
        .map(Section::name_lossy)
}

fn is_defined(sym: &Sym) -> bool {
    let s = sym.st_shndx;
    s != elf::SHN_UNDEF
        && s != elf::SHN_ABS
        && s != elf::SHN_COMMON
        && s.0 != SHN_LIVEPATCH
        && (s.0 < elf::SHN_LORESERVE || s == elf::SHN_XINDEX)
}

fn type_name(t: elf::SymbolType) -> &'static str {
    match t {
        elf::STT_NOTYPE => "a symbol without type (STT_NOTYPE)",
        elf::STT_OBJECT => "a variable (STT_OBJECT)",
        elf::STT_TLS => "a thread-local variable (STT_TLS)",
        elf::STT_GNU_IFUNC => "an indirect function (STT_GNU_IFUNC)",
        _ => "not a function",
    }
}

/// The index of the function `name` the patch defines.
fn patch_function(p: &PatchObject, name: &str, role: &dyn Fn() -> String) -> Result<usize, Error> {
    let bad = |reason: String| Error::PatchFunction {
        role: role(),
        function: name.to_string(),
        reason,
    };
    let all: Vec<usize> = (1..p.symbols.len())
        .filter(|&i| {
            let s = &p.symbols[i];
            let t = s.sym.st_info.st_type();
            s.name == name.as_bytes() && t != elf::STT_SECTION && t != elf::STT_FILE
        })
        .collect();
    let defined: Vec<usize> = all
        .iter()
        .copied()
        .filter(|&i| is_defined(&p.symbols[i].sym))
        .collect();
    match defined.as_slice() {
        [] if all.is_empty() => Err(bad("the patch has no symbol of that name".to_string())),
        [] => Err(bad(
            "the patch only refers to it (it is not defined there): the replacement and the \
             callbacks are the patch's own code"
                .to_string(),
        )),
        [i] => {
            let t = p.symbols[*i].sym.st_info.st_type();
            if t == elf::STT_FUNC {
                Ok(*i)
            } else {
                Err(bad(format!("it is {}", type_name(t))))
            }
        }
        more => Err(bad(format!(
            "the patch defines {} symbols of that name (static functions of several \
             files?); give the function a name of its own",
            more.len()
        ))),
    }
}

/// Plans the description of `manifest.patch`, or `None` when there is none to write.
pub(crate) fn plan(
    p: &PatchObject,
    targets: &[TargetObject],
    manifest: &Manifest,
    warnings: &mut Vec<String>,
) -> Result<Option<Planned>, Error> {
    let existing = existing(p);
    let Some(patch) = &manifest.patch else {
        if existing.is_none() {
            let named: Vec<String> = (1..p.symbols.len())
                .map(|i| &p.symbols[i])
                .filter(|s| is_defined(&s.sym))
                .filter(|s| {
                    CALLBACK_PREFIXES
                        .iter()
                        .any(|x| s.name.starts_with(x.as_bytes()))
                })
                .map(|s| String::from_utf8_lossy(&s.name).into_owned())
                .collect();
            if !named.is_empty() {
                warnings.push(format!(
                    "the patch defines {} (named as callbacks), but the manifest has no \
                     \"patch\", so no patch description is written",
                    named.join(", ")
                ));
            }
        }
        return Ok(None);
    };
    if let Some(section) = existing {
        return Err(Error::DescriptionExists {
            file: p.file.clone(),
            section,
        });
    }

    // Callbacks: (symbol, how it was found) per object and kind.
    let mut found: Vec<[Vec<(usize, String)>; 4]> = vec![Default::default(); patch.objects.len()];
    for (k, prefix) in CALLBACK_PREFIXES.iter().enumerate() {
        for i in 1..p.symbols.len() {
            let s = &p.symbols[i];
            let Some(rest) = s.name.strip_prefix(prefix.as_bytes()) else {
                continue;
            };
            if !is_defined(&s.sym) {
                continue;
            }
            let object = String::from_utf8_lossy(rest).into_owned();
            let function = String::from_utf8_lossy(&s.name).into_owned();
            // gcc's parts and clones of a function (`.cold`, `.isra.0`) are no names
            // of an object.
            if object.contains('.') {
                continue;
            }
            let t = s.sym.st_info.st_type();
            let Some(o) = patch.objects.iter().position(|o| o.object == object) else {
                return Err(Error::CallbackObject {
                    function,
                    kind: CALLBACK_KINDS[k],
                    object,
                });
            };
            if t != elf::STT_FUNC {
                return Err(Error::PatchFunction {
                    role: format!(
                        "the {} callback of object {object} by its name",
                        CALLBACK_KINDS[k]
                    ),
                    function,
                    reason: format!(
                        "it is {}; klp-convert takes the callback function itself (name the \
                         function so, or name it in the manifest's \"callbacks\")",
                        type_name(t)
                    ),
                });
            }
            found[o][k].push((i, format!("'{function}' (by its name)")));
        }
    }
    for (o, entry) in patch.objects.iter().enumerate() {
        for (k, name) in entry.callbacks.by_kind().into_iter().enumerate() {
            let Some(name) = name else { continue };
            let role = || {
                format!(
                    "the {} callback of object {}",
                    CALLBACK_KINDS[k], entry.object
                )
            };
            let i = patch_function(p, name, &role)?;
            found[o][k].push((i, format!("'{name}' (named in the manifest)")));
        }
    }

    let mut objects = Vec::with_capacity(patch.objects.len());
    let mut symbols = Vec::with_capacity(patch.objects.len());
    for (o, entry) in patch.objects.iter().enumerate() {
        let mut callbacks: [Option<usize>; 4] = [None; 4];
        let mut callback_names: [Option<String>; 4] = Default::default();
        for k in 0..4 {
            // The manifest may name the function its name makes a callback anyway.
            let mut distinct: Vec<(usize, String)> = Vec::new();
            for (i, how) in std::mem::take(&mut found[o][k]) {
                if !distinct.iter().any(|(j, _)| *j == i) {
                    distinct.push((i, how));
                }
            }
            match distinct.as_slice() {
                [] => {}
                [(i, _)] => {
                    callbacks[k] = Some(*i);
                    callback_names[k] =
                        Some(String::from_utf8_lossy(&p.symbols[*i].name).into_owned());
                }
                [(_, a), (_, b), ..] => {
                    return Err(Error::DuplicateCallback {
                        object: entry.object.clone(),
                        kind: CALLBACK_KINDS[k],
                        first: a.clone(),
                        second: b.clone(),
                    });
                }
            }
        }
        if entry.funcs.is_empty() && callbacks.iter().all(Option::is_none) {
            return Err(Error::EmptyObject {
                object: entry.object.clone(),
            });
        }
        let target = targets.iter().find(|t| t.name == entry.object);
        if target.is_none() {
            warnings.push(format!(
                "object {} of the patch description is not a target (--target), so the \
                 functions it replaces were not checked; the kernel looks them up when {}",
                entry.object,
                if entry.object == MAIN_OBJECT {
                    "the patch is enabled"
                } else {
                    "the module is loaded"
                }
            ));
        }
        let mut new_syms = Vec::with_capacity(entry.funcs.len());
        let mut funcs = Vec::with_capacity(entry.funcs.len());
        for f in &entry.funcs {
            let role = || format!("the replacement of '{}' in {}", f.old, entry.object);
            new_syms.push(patch_function(p, &f.new, &role)?);
            if let Some(t) = target {
                check_old(t, targets, &f.old, f.sympos)?;
            }
            funcs.push(DescribedFunc {
                old: f.old.clone(),
                new: f.new.clone(),
                sympos: f.sympos,
            });
        }
        objects.push(DescribedObject {
            name: entry.object.clone(),
            checked: target.is_some(),
            funcs,
            callbacks: callback_names,
        });
        symbols.push((new_syms, callbacks));
    }
    Ok(Some(Planned {
        description: Description {
            objects,
            replace: patch.replace,
        },
        symbols,
    }))
}

/// Checks a function to be replaced against its object, with the kernel's sympos
/// rules (spec §1.3, §8.4): 0 = the name is unique, else the 1-based position.
fn check_old(
    target: &TargetObject,
    targets: &[TargetObject],
    name: &str,
    sympos: u64,
) -> Result<(), Error> {
    let defs = target.definitions(name);
    if defs.is_empty() {
        return Err(Error::UnknownOldFunction {
            object: target.name.clone(),
            function: name.to_string(),
            searched: format!("the {} of {}", target.table, target.file),
            elsewhere: targets
                .iter()
                .filter(|t| t.name != target.name)
                .flat_map(|t| t.candidates(name))
                .collect(),
        });
    }
    if sympos == 0 && defs.len() > 1 {
        return Err(Error::AmbiguousOldFunction {
            object: target.name.clone(),
            function: name.to_string(),
            candidates: target.candidates(name),
        });
    }
    let index = sympos.max(1) - 1;
    let Some(def) = usize::try_from(index).ok().and_then(|i| defs.get(i)) else {
        return Err(Error::BadOldSympos {
            object: target.name.clone(),
            function: name.to_string(),
            sympos,
            candidates: target.candidates(name),
        });
    };
    if def.kind == Kind::Data {
        return Err(Error::OldNotAFunction {
            function: name.to_string(),
            candidate: target.candidate(index as usize, def),
        });
    }
    Ok(())
}

fn put_u64(p: &PatchObject, buf: &mut [u8], at: u64, v: u64) {
    let bytes = match p.endian {
        object::Endianness::Little => v.to_le_bytes(),
        object::Endianness::Big => v.to_be_bytes(),
    };
    let at = at as usize;
    if let Some(slot) = buf.get_mut(at..at + 8) {
        slot.copy_from_slice(&bytes);
    }
}

fn put_u32(p: &PatchObject, buf: &mut [u8], at: u64, v: u32) {
    let bytes = match p.endian {
        object::Endianness::Little => v.to_le_bytes(),
        object::Endianness::Big => v.to_be_bytes(),
    };
    let at = at as usize;
    if let Some(slot) = buf.get_mut(at..at + 4) {
        slot.copy_from_slice(&bytes);
    }
}

/// The NUL-terminated strings of the description, each once.
#[derive(Default)]
struct Strings {
    data: Vec<u8>,
    offsets: HashMap<String, u64>,
}

impl Strings {
    fn add(&mut self, s: &str) -> u64 {
        if let Some(&o) = self.offsets.get(s) {
            return o;
        }
        let o = self.data.len() as u64;
        self.data.extend_from_slice(s.as_bytes());
        self.data.push(0);
        self.offsets.insert(s.to_string(), o);
        o
    }
}

/// Writes the planned description into `p`: the section symbols (renumbering the
/// globals, also in the `.klp.rela` report `moved`) and the five sections.
pub(crate) fn write(
    p: &mut PatchObject,
    planned: &Planned,
    moved: &mut [KlpSection],
) -> Result<(), Error> {
    let base = p.sections.len();
    // In order: .init.klp_objects, its .rela, .init.klp_funcs, its .rela, strings.
    let (objects_index, funcs_index, strings_index) = (base, base + 2, base + 4);
    if strings_index >= usize::from(elf::SHN_LORESERVE) {
        return Err(Error::Layout {
            reason: format!(
                "the patch has {base} sections, and section symbols of the description's \
                 sections would need extended section indices"
            ),
        });
    }

    // The two section symbols go after the locals.
    let first_global = p.sections[p.symtab].header.sh_info as usize;
    if first_global == 0 || first_global > p.symbols.len() {
        return Err(Error::Malformed {
            file: p.file.clone(),
            reason: format!(
                "its symbol table's sh_info ({first_global}, the first global) is not within \
                 its {} symbols",
                p.symbols.len()
            ),
        });
    }
    renumber(p, first_global, 2)?;
    for k in moved.iter_mut() {
        for r in &mut k.relocations {
            if r.symbol_index as usize >= first_global {
                r.symbol_index += 2;
            }
        }
    }
    let strings_sym = first_global;
    let funcs_sym = first_global + 1;
    let mut bytes = Vec::new();
    for (at, section) in [(strings_sym, strings_index), (funcs_sym, funcs_index)] {
        let sym = Sym {
            section: None,
            st_name: 0,
            st_info: elf::SymbolInfo::new(elf::STB_LOCAL, elf::STT_SECTION),
            st_other: elf::SymbolOther::default(),
            st_shndx: elf::SymbolSection(section as u16),
            st_value: 0,
            st_size: 0,
        };
        bytes.extend_from_slice(&p.encode_symbol(&sym));
        p.symbols.insert(
            at,
            crate::elf::Symbol {
                name: Vec::new(),
                sym,
            },
        );
    }
    let sym_size = p.encoder().sym_size() as usize;
    let symtab = &mut p.sections[p.symtab];
    let at = first_global * sym_size;
    if symtab.data.len() < at {
        return Err(Error::Malformed {
            file: p.file.clone(),
            reason: "its symbol table is shorter than its symbols".to_string(),
        });
    }
    symtab.data.splice(at..at, bytes);
    symtab.header.sh_info += 2;

    // The records.
    let d = &planned.description;
    let abs = elf::RelocationType(abs64_type(p.arch));
    let rela = |r_offset: u64, r_sym: usize, r_addend: i64| Rel {
        r_offset,
        r_sym: r_sym as u32,
        r_type: abs,
        r_addend,
    };
    let remap = |i: usize| if i >= first_global { i + 2 } else { i };
    let mut strings = Strings::default();
    let nr_all: usize = d.objects.iter().map(|o| o.funcs.len()).sum();
    let mut objects = vec![0u8; d.objects.len() * OBJECT_EXT_SIZE as usize];
    let mut funcs = vec![0u8; nr_all * FUNC_EXT_SIZE as usize];
    let mut objects_relas = Vec::new();
    let mut funcs_relas = Vec::new();
    let mut next = 0u64;
    for (o, (obj, (new_syms, callbacks))) in d.objects.iter().zip(&planned.symbols).enumerate() {
        let at = o as u64 * OBJECT_EXT_SIZE;
        if obj.name != MAIN_OBJECT {
            let s = strings.add(&obj.name);
            objects_relas.push(rela(at, strings_sym, s as i64));
        }
        objects_relas.push(rela(at + 8, funcs_sym, (next * FUNC_EXT_SIZE) as i64));
        for (k, cb) in callbacks.iter().enumerate() {
            if let Some(i) = cb {
                objects_relas.push(rela(at + OBJECT_EXT_CALLBACKS + 8 * k as u64, remap(*i), 0));
            }
        }
        put_u32(
            p,
            &mut objects,
            at + OBJECT_EXT_NR_FUNCS,
            obj.funcs.len() as u32,
        );
        for (f, &new) in obj.funcs.iter().zip(new_syms) {
            let fat = next * FUNC_EXT_SIZE;
            let s = strings.add(&f.old);
            funcs_relas.push(rela(fat, strings_sym, s as i64));
            funcs_relas.push(rela(fat + 8, remap(new), 0));
            put_u64(p, &mut funcs, fat + 16, f.sympos);
            next += 1;
        }
    }

    let symtab_index = p.symtab as u32;
    let data_header = |flags: u64| SectionHeader {
        sh_type: elf::SHT_PROGBITS,
        sh_flags: elf::SectionFlags(flags),
        sh_addralign: 8,
        ..SectionHeader::default()
    };
    let rela_header = |info: usize| SectionHeader {
        sh_type: elf::SHT_RELA,
        sh_flags: elf::SHF_INFO_LINK,
        sh_link: symtab_index,
        sh_info: info as u32,
        sh_addralign: 8,
        sh_entsize: p.rela_size(),
        ..SectionHeader::default()
    };
    let new = [
        (OBJECTS_SECTION, data_header(elf::SHF_ALLOC.0), objects),
        (
            OBJECTS_RELA_SECTION,
            rela_header(objects_index),
            p.encode_relas(&objects_relas),
        ),
        (FUNCS_SECTION, data_header(elf::SHF_ALLOC.0), funcs),
        (
            FUNCS_RELA_SECTION,
            rela_header(funcs_index),
            p.encode_relas(&funcs_relas),
        ),
        (
            STRINGS_SECTION,
            SectionHeader {
                sh_type: elf::SHT_PROGBITS,
                sh_flags: elf::SectionFlags(
                    elf::SHF_ALLOC.0 | elf::SHF_MERGE.0 | elf::SHF_STRINGS.0,
                ),
                sh_addralign: 1,
                sh_entsize: 1,
                ..SectionHeader::default()
            },
            strings.data,
        ),
    ];
    for (i, (name, header, data)) in new.into_iter().enumerate() {
        debug_assert_eq!(p.sections.len(), base + i);
        p.sections.push(Section {
            name: name.as_bytes().to_vec(),
            header,
            data,
        });
    }
    debug_assert_eq!(p.sections.len(), strings_index + 1);
    Ok(())
}

fn read_uleb(data: &[u8], pos: &mut usize) -> Option<u64> {
    let mut v = 0u64;
    let mut shift = 0u32;
    loop {
        let b = *data.get(*pos)?;
        *pos += 1;
        if shift >= 64 {
            return None;
        }
        v |= u64::from(b & 0x7f) << shift;
        if b & 0x80 == 0 {
            return Some(v);
        }
        shift += 7;
    }
}

fn write_uleb(out: &mut Vec<u8>, mut v: u64) {
    loop {
        let b = (v & 0x7f) as u8;
        v >>= 7;
        if v == 0 {
            out.push(b);
            return;
        }
        out.push(b | 0x80);
    }
}

/// Makes room for `count` new symbols at index `at`: every reference to a symbol
/// index `>= at` grows by `count` (relocation sections, section groups,
/// `SHT_SYMTAB_SHNDX`, `.llvm_addrsig`). The symbols themselves are inserted by
/// the caller.
fn renumber(p: &mut PatchObject, at: usize, count: usize) -> Result<(), Error> {
    let symtab_index = p.symtab;
    let symtab = p.symtab as u32;
    let nsyms = p.symbols.len();
    let remap = |i: u64| if i >= at as u64 { i + count as u64 } else { i };
    let e = p.endian;
    let is_64 = p.is_64;
    for i in 1..p.sections.len() {
        let s = &mut p.sections[i];
        if s.header.sh_link != symtab || i == symtab_index {
            continue;
        }
        let name = s.name_lossy();
        let bad = |reason: String| Error::Renumber {
            section: name.clone(),
            reason,
        };
        let t = s.header.sh_type;
        if t == elf::SHT_REL || t == elf::SHT_RELA {
            // r_info: 64-bit at byte 8 (symbol in the high 32 bits), 32-bit at byte
            // 4 (symbol in the high 24 bits); patched in place.
            let entsize: usize = match (is_64, t == elf::SHT_RELA) {
                (true, true) => 24,
                (true, false) => 16,
                (false, true) => 12,
                (false, false) => 8,
            };
            if s.header.sh_entsize != entsize as u64 || !s.data.len().is_multiple_of(entsize) {
                return Err(bad(format!(
                    "its entry size is {} and its size {}, which is no array of {entsize}-byte \
                     entries",
                    s.header.sh_entsize,
                    s.data.len()
                )));
            }
            for entry in s.data.chunks_exact_mut(entsize) {
                if is_64 {
                    let mut a = [0u8; 8];
                    a.copy_from_slice(&entry[8..16]);
                    let info = match e {
                        object::Endianness::Little => u64::from_le_bytes(a),
                        object::Endianness::Big => u64::from_be_bytes(a),
                    };
                    let sym = remap(info >> 32);
                    if sym > u64::from(u32::MAX) {
                        return Err(bad("a symbol index overflows".to_string()));
                    }
                    let info = (sym << 32) | (info & 0xffff_ffff);
                    entry[8..16].copy_from_slice(&match e {
                        object::Endianness::Little => info.to_le_bytes(),
                        object::Endianness::Big => info.to_be_bytes(),
                    });
                } else {
                    let mut a = [0u8; 4];
                    a.copy_from_slice(&entry[4..8]);
                    let info = match e {
                        object::Endianness::Little => u32::from_le_bytes(a),
                        object::Endianness::Big => u32::from_be_bytes(a),
                    };
                    let sym = remap(u64::from(info >> 8));
                    if sym >= 1 << 24 {
                        return Err(bad("a symbol index overflows".to_string()));
                    }
                    let info = ((sym as u32) << 8) | (info & 0xff);
                    entry[4..8].copy_from_slice(&match e {
                        object::Endianness::Little => info.to_le_bytes(),
                        object::Endianness::Big => info.to_be_bytes(),
                    });
                }
            }
        } else if t == elf::SHT_GROUP {
            s.header.sh_info = remap(u64::from(s.header.sh_info)) as u32;
        } else if t == elf::SHT_SYMTAB_SHNDX {
            let want = nsyms * 4;
            if s.data.len() != want {
                return Err(bad(format!(
                    "it has {} bytes for {nsyms} symbols ({want} expected)",
                    s.data.len()
                )));
            }
            let at = at * 4;
            s.data.splice(at..at, std::iter::repeat_n(0u8, count * 4));
        } else if t.0 == SHT_LLVM_ADDRSIG {
            let mut out = Vec::with_capacity(s.data.len() + 4);
            let mut pos = 0;
            while pos < s.data.len() {
                let Some(v) = read_uleb(&s.data, &mut pos) else {
                    return Err(bad("a ULEB128 symbol index is truncated".to_string()));
                };
                write_uleb(&mut out, remap(v));
            }
            s.data = out;
        } else if t.0 == SHT_CREL {
            return Err(bad(
                "it holds SHT_CREL compact relocations, which klp-convert does not decode; \
                 build the patch without --crel"
                    .to_string(),
            ));
        } else if t.0 == SHT_LLVM_CALL_GRAPH_PROFILE && s.header.sh_entsize == 8 {
            // Weights only.
        } else if t.0 >= elf::SHT_LOOS {
            return Err(bad(format!(
                "its type {:#x} refers to the symbol table in a way klp-convert does not know",
                t.0
            )));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uleb128_round_trips() {
        for v in [0u64, 1, 127, 128, 300, 16_383, 16_384, u64::from(u32::MAX)] {
            let mut out = Vec::new();
            write_uleb(&mut out, v);
            let mut pos = 0;
            assert_eq!(read_uleb(&out, &mut pos), Some(v));
            assert_eq!(pos, out.len());
        }
        // 300 = 0b10_0101100: 0xac 0x02 (DWARF 5 §7.6's example).
        let mut out = Vec::new();
        write_uleb(&mut out, 300);
        assert_eq!(out, [0xac, 0x02]);
        assert_eq!(read_uleb(&[0x80], &mut 0), None);
    }

    #[test]
    fn the_layout_constants_add_up() {
        // klp_callbacks: four pointers (32 bytes) and a bool padded to 8: 40 bytes,
        // at 16 in klp_object_ext after name and funcs; nr_funcs at 16 + 40 = 56;
        // 56 + 4 bytes, padded to the 8-byte alignment: 64.
        assert_eq!(OBJECT_EXT_CALLBACKS + 40, OBJECT_EXT_NR_FUNCS);
        assert_eq!(
            (OBJECT_EXT_NR_FUNCS + 4).next_multiple_of(8),
            OBJECT_EXT_SIZE
        );
        assert_eq!(FUNC_EXT_SIZE, 3 * 8);
        assert_eq!(abs64_type(Arch::X86_64), 1);
        assert_eq!(abs64_type(Arch::AARCH64), 257);
        assert_eq!(abs64_type(Arch::PPC64LE), 38);
        assert_eq!(abs64_type(Arch::S390X), 22);
    }
}
