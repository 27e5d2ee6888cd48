//! `klp-inspect`: a livepatch object shown the way a person wants to read it.
//!
//! The object is read with the livepatch core's own reader ([`klp::elf`]), the one the
//! kernel-side loader uses, so what is shown is what the core will see: the header
//! and `.modinfo`, the patch description (`.init.klp_objects` / `.init.klp_funcs`,
//! with callbacks found as the core finds them), and every `.klp.rela.<obj>.<sec>`
//! section entry by entry with its `.klp.sym` symbol parsed as the kernel parses it.
//! Given the patched objects' binaries or `System.map`s ([`TargetInput`], read as
//! `klp-convert` reads them), each symbol is also resolved with the kernel's sympos
//! rules (`klp_find_object_symbol`).
//!
//! Nothing in a damaged object stops the inspection: every problem the kernel would
//! refuse (with its message text where it has one) or that would misbehave becomes a
//! warning. Only a file the reader cannot open at all is an [`InspectError`].

use std::collections::HashSet;
use std::fmt;
use std::fmt::Write as _;

use klp::elf::{self as kelf, ElfError, PatchObject, Symbol, desc};
use serde::{Serialize, Serializer};

use crate::elf::Arch;
use crate::error::Error;
use crate::names::MAIN_OBJECT;
use crate::reloc;
use crate::target::{TargetInput, TargetObject, load_target};

/// Why an object could not be inspected at all.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum InspectError {
    /// The core's reader refuses the file (not ELF, truncated headers, no symbol
    /// table, …).
    Object {
        /// The file.
        file: String,
        /// The reader's message.
        reason: String,
    },
    /// A target could not be read.
    Target(Error),
}

impl fmt::Display for InspectError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            InspectError::Object { file, reason } => {
                write!(f, "{file} cannot be read as a livepatch object: {reason}")
            }
            InspectError::Target(e) => write!(f, "{e}"),
        }
    }
}

impl std::error::Error for InspectError {}

impl From<Error> for InspectError {
    fn from(e: Error) -> Self {
        InspectError::Target(e)
    }
}

/// A symbol name, with its demangled form when it is a Rust or C++ mangled name.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Name {
    /// The name as it is in the object.
    pub name: String,
    /// The demangled name (Rust without its hash), if the name is mangled.
    pub demangled: Option<String>,
}

impl Name {
    /// `name` and its demangled form.
    pub fn new(name: &str) -> Name {
        Name {
            name: name.to_string(),
            demangled: demangle(name),
        }
    }

    /// What a person reads: the demangled name if there is one.
    pub fn display(&self) -> &str {
        self.demangled.as_deref().unwrap_or(&self.name)
    }
}

/// The demangled form of a Rust (legacy or v0) or C++ (Itanium) mangled name, or
/// `None` for any other name.
pub fn demangle(name: &str) -> Option<String> {
    if let Ok(d) = rustc_demangle::try_demangle(name) {
        // `{:#}`: without the legacy scheme's hash.
        let s = format!("{d:#}");
        if s != name {
            return Some(s);
        }
    }
    if name.starts_with("_Z")
        && let Ok(sym) = cpp_demangle::Symbol::new(name)
        && let Ok(s) = sym.demangle()
        && s != name
    {
        return Some(s);
    }
    None
}

/// A symbol of the object plus an addend: what a pointer of the description points to.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct SymRef {
    /// The symbol.
    pub symbol: Name,
    /// The addend.
    pub addend: i64,
}

impl SymRef {
    fn of(p: &desc::Pointer<'_>) -> SymRef {
        SymRef {
            symbol: Name::new(p.symbol.name),
            addend: p.addend,
        }
    }

    /// `name`, `name+0x10` or `name-0x4`.
    pub fn display(&self) -> String {
        let n = self.symbol.display();
        match self.addend {
            0 => n.to_string(),
            a if a < 0 => format!("{n}-{:#x}", a.unsigned_abs()),
            a => format!("{n}+{a:#x}"),
        }
    }
}

/// How a symbol resolves in a target with the kernel's sympos rules.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(tag = "status", rename_all = "snake_case")]
pub enum Resolution {
    /// No target was given for the symbol's object.
    NotChecked,
    /// The address the symbol resolves to.
    Resolved {
        /// The address, as the target lists it.
        #[serde(serialize_with = "hex")]
        address: u64,
    },
    /// The object has no symbol of that name.
    NotFound,
    /// `sympos` 0 and several definitions.
    Ambiguous {
        /// How many definitions.
        candidates: usize,
    },
    /// `sympos` beyond the definitions.
    Beyond {
        /// The sympos asked for.
        position: u64,
        /// How many definitions there are.
        count: usize,
    },
    /// Nothing to resolve: the entry is partnered (riscv64's `PCREL_LO12`, see
    /// `klp_arch::Arch::is_partnered`), its symbol the label, in the relocated
    /// section, of the entry it takes its value from.
    Partner,
    /// The symbol cannot be resolved at all (not a livepatch symbol, a malformed
    /// name, an index past the symbol table, a vmlinux symbol in a module-specific
    /// section): see the warnings.
    Unusable,
}

impl fmt::Display for Resolution {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Resolution::NotChecked => f.write_str("not checked"),
            Resolution::Resolved { address } => write!(f, "{address:#x}"),
            Resolution::NotFound => f.write_str("not found"),
            Resolution::Ambiguous { candidates } => {
                write!(f, "ambiguous ({candidates} candidates)")
            }
            Resolution::Beyond { position, count } => {
                write!(f, "position {position} beyond {count}")
            }
            Resolution::Partner => f.write_str("the place of its partner entry"),
            Resolution::Unusable => f.write_str("unusable (see warnings)"),
        }
    }
}

fn hex<S: Serializer>(v: &u64, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&format!("{v:#x}"))
}

/// One target read.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct TargetView {
    /// Its object name.
    pub object: String,
    /// The file it came from.
    pub file: String,
    /// The table read (`.symtab`, `.dynsym`, `symbol map`).
    pub table: String,
}

/// One function of the patch description.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct FuncView {
    /// The function replaced.
    pub old_name: Name,
    /// `old_sympos`.
    pub sympos: u64,
    /// The replacement.
    pub new_func: SymRef,
    /// Where `old_name` resolves in the object's target.
    pub old: Resolution,
}

/// The four callbacks of an object.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Callbacks {
    /// `pre_patch`.
    pub pre_patch: Option<SymRef>,
    /// `post_patch`.
    pub post_patch: Option<SymRef>,
    /// `pre_unpatch`.
    pub pre_unpatch: Option<SymRef>,
    /// `post_unpatch`.
    pub post_unpatch: Option<SymRef>,
}

impl Callbacks {
    /// The callbacks with their kinds, in `struct klp_callbacks` order.
    pub fn by_kind(&self) -> [(&'static str, Option<&SymRef>); 4] {
        [
            ("pre_patch", self.pre_patch.as_ref()),
            ("post_patch", self.post_patch.as_ref()),
            ("pre_unpatch", self.pre_unpatch.as_ref()),
            ("post_unpatch", self.post_unpatch.as_ref()),
        ]
    }
}

/// One object of the patch description.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct ObjectView {
    /// `vmlinux` or the module's name.
    pub name: String,
    /// Whether it is a module (its record has a name).
    pub module: bool,
    /// `nr_funcs`.
    pub nr_funcs: u32,
    /// The functions it replaces.
    pub funcs: Vec<FuncView>,
    /// Its callbacks (from the record, else by name prefix, as the core finds them).
    pub callbacks: Callbacks,
}

/// The parts of a `.klp.sym` name.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct KlpSymView {
    /// `vmlinux` or the module's name.
    pub object: String,
    /// The symbol's name in that object.
    pub name: Name,
    /// Its position among same-named symbols (0: unique).
    pub sympos: u64,
}

/// One entry of a livepatch relocation section.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct EntryView {
    /// `r_offset`.
    pub offset: u64,
    /// The relocation type.
    #[serde(rename = "type")]
    pub r_type: u32,
    /// Its psABI name, when known.
    pub type_name: Option<&'static str>,
    /// `r_addend`.
    pub addend: i64,
    /// The symbol's index.
    pub symbol_index: u32,
    /// The symbol's whole name (`None`: the index is past the table).
    pub symbol: Option<String>,
    /// Whether the symbol is a livepatch symbol (`SHN_LIVEPATCH`).
    pub livepatch_symbol: bool,
    /// The name parsed as the kernel parses it.
    pub klp_sym: Option<KlpSymView>,
    /// Where it resolves.
    pub resolution: Resolution,
}

/// A section by index and name.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct SectionRef {
    /// Its index.
    pub index: usize,
    /// Its name.
    pub name: String,
}

/// One livepatch relocation section.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct SectionView {
    /// Its index.
    pub index: usize,
    /// Its name.
    pub name: String,
    /// The object parsed from its name (`None`: malformed).
    pub object: Option<String>,
    /// The section it relocates (`sh_info`), if that is a section.
    pub target: Option<SectionRef>,
    /// How many entries.
    pub entries: usize,
    /// The entries.
    pub relocations: Vec<EntryView>,
}

/// One build id the file records (`.note.klp.build-id`, see [`crate::buildid`]).
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct BuildIdView {
    /// The object.
    pub object: String,
    /// Its build id, hex.
    pub id: String,
    /// The build id of the target of that name, hex, when one was given and has one.
    pub target_id: Option<String>,
    /// Whether they are equal (`None`: nothing to compare with).
    pub matches: Option<bool>,
}

/// The signature appended to the file (see [`crate::sign`]); not verified here
/// (`klp-sign verify` does, against trusted keys).
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct SignatureView {
    /// The signer's name as the block has it.
    pub signer: String,
    /// The key's fingerprint.
    pub fingerprint: String,
    /// The size of the signed ELF part.
    pub signed_bytes: usize,
}

/// Everything shown about a livepatch object.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Inspection {
    /// The file, as given.
    pub file: String,
    /// `x86_64`, `aarch64`, `ppc64le`, `s390x`, or `machine N`.
    pub machine: String,
    /// `e_machine`.
    pub e_machine: u16,
    /// `little-endian` or `big-endian`.
    pub byte_order: &'static str,
    /// Whether `.modinfo` has `livepatch=Y`.
    pub livepatch: bool,
    /// Whether `.modinfo` has `klp_replace=Y` (atomic replace).
    pub replace: bool,
    /// The `.modinfo` entries.
    pub modinfo: Vec<String>,
    /// The targets read.
    pub targets: Vec<TargetView>,
    /// The build ids the file records.
    pub build_ids: Vec<BuildIdView>,
    /// The appended signature, if the file is signed.
    pub signature: Option<SignatureView>,
    /// The patch description's objects.
    pub objects: Vec<ObjectView>,
    /// The livepatch relocation sections.
    pub sections: Vec<SectionView>,
    /// The problems found.
    pub warnings: Vec<String>,
}

/// Warnings in order, each once.
#[derive(Default)]
struct Warnings {
    list: Vec<String>,
    seen: HashSet<String>,
}

impl Warnings {
    fn push(&mut self, w: String) {
        if self.seen.insert(w.clone()) {
            self.list.push(w);
        }
    }
}

fn arch_of(machine: u16, big: bool) -> Option<Arch> {
    Arch::of_machine(machine).filter(|a| a.big_endian() == big)
}

/// The kernel's `klp_find_object_symbol` over a target's definitions: how `name`,
/// `sympos` resolves in `object` (`None` when no target gives the object).
fn resolve(targets: &[TargetObject], object: &str, name: &str, sympos: u64) -> Resolution {
    let Some(t) = targets.iter().find(|t| t.name == object) else {
        return Resolution::NotChecked;
    };
    let defs = t.definitions(name);
    let count = defs.len();
    // The core's rule (klp_find_object_symbol's), offered the definitions in order.
    let mut scan = klp::SymposScan::new(sympos);
    for d in defs {
        if scan.offer(d.address).is_break() {
            break;
        }
    }
    match scan.finish() {
        Ok(address) => Resolution::Resolved { address },
        Err(klp::SymposError::NotFound) => Resolution::NotFound,
        Err(klp::SymposError::Ambiguous) => Resolution::Ambiguous { candidates: count },
        Err(klp::SymposError::Beyond { .. }) => Resolution::Beyond {
            position: sympos,
            count,
        },
    }
}

/// The kernel's message for a failed resolution (`klp_find_object_symbol`).
fn resolution_message(r: &Resolution, object: &str, name: &str) -> Option<String> {
    let vmlinux = object == MAIN_OBJECT;
    match r {
        Resolution::NotFound => Some(format!("symbol '{name}' not found in symbol table")),
        Resolution::Ambiguous { candidates } => Some(format!(
            "unresolvable ambiguity for symbol '{name}' in object '{}' ({})",
            if vmlinux { "(null)" } else { object },
            plural(*candidates, "candidate", "candidates")
        )),
        Resolution::Beyond { position, count } => Some(format!(
            "symbol position {position} for symbol '{name}' in object '{object}' not found ({})",
            plural(*count, "candidate", "candidates")
        )),
        _ => None,
    }
}

/// One entry as read, before resolution.
struct RawEntry {
    view: EntryView,
    /// (object, name, sympos) to resolve, when the symbol is usable.
    lookup: Option<(String, String, u64)>,
}

/// Inspects the livepatch object `data` (read from `file`), resolving its symbols in
/// `targets` (may be empty).
pub fn inspect(
    file: &str,
    data: &[u8],
    targets: &[TargetInput<'_>],
) -> Result<Inspection, InspectError> {
    let obj = PatchObject::parse(data).map_err(|e| InspectError::Object {
        file: file.to_string(),
        reason: e.to_string(),
    })?;
    let mut w = Warnings::default();
    let big = obj.is_big_endian();
    let arch = arch_of(obj.machine(), big);
    let machine = match arch {
        Some(a) => a.name().to_string(),
        None => {
            w.push(format!(
                "machine {} ({}-endian) is not one of klp's architectures (x86_64, aarch64, \
                 ppc64le little-endian; s390x big-endian)",
                obj.machine(),
                if big { "big" } else { "little" }
            ));
            format!("machine {}", obj.machine())
        }
    };
    let modinfo: Vec<String> = obj.modinfo().map(str::to_string).collect();
    let livepatch = obj.is_livepatch();
    let replace = modinfo.iter().any(|e| e == "klp_replace=Y");

    let mut raw_sections = read_sections(&obj, arch, &mut w);
    let mut objects = read_description(&obj, &mut w);
    check_ordinary_relocations(&obj, &mut w);
    if !livepatch && (!raw_sections.is_empty() || !objects.is_empty()) {
        w.push(
            "no livepatch=Y in .modinfo: the kernel refuses to enable a patch of this module \
             (\"module … is not marked as a livepatch module\")"
                .to_string(),
        );
    }

    // Targets: only the names the object asks for are kept.
    let mut wanted: HashSet<String> = HashSet::new();
    for s in &raw_sections {
        for e in &s.1 {
            if let Some((_, name, _)) = &e.lookup {
                wanted.insert(name.clone());
            }
        }
    }
    for o in &objects {
        wanted.extend(o.funcs.iter().map(|f| f.old_name.name.clone()));
    }
    let mut loaded: Vec<TargetObject> = Vec::new();
    match arch {
        Some(arch) => {
            for t in targets {
                for o in load_target(t, &wanted, arch)? {
                    if loaded.iter().any(|x| x.name == o.name) {
                        return Err(Error::DuplicateObject { name: o.name }.into());
                    }
                    loaded.push(o);
                }
            }
        }
        None if !targets.is_empty() => w.push(
            "the targets were not read: the object is not for one of klp's architectures"
                .to_string(),
        ),
        None => {}
    }

    // Resolution, with the kernel's message once per failing symbol.
    for o in &mut objects {
        for f in &mut o.funcs {
            f.old = resolve(&loaded, &o.name, &f.old_name.name, f.sympos);
            if let Some(m) = resolution_message(&f.old, &o.name, &f.old_name.name) {
                w.push(format!(
                    "{m}: {},{} replaced in {} by the patch description",
                    f.old_name.name, f.sympos, o.name
                ));
            }
        }
    }
    for (_, entries) in &mut raw_sections {
        for e in entries.iter_mut() {
            if let Some((object, name, sympos)) = &e.lookup {
                e.view.resolution = resolve(&loaded, object, name, *sympos);
                if let Some(m) = resolution_message(&e.view.resolution, object, name) {
                    w.push(format!(
                        "{m}: {}",
                        e.view.symbol.as_deref().unwrap_or_default()
                    ));
                }
            }
        }
    }

    let sections = raw_sections
        .into_iter()
        .map(|(mut s, entries)| {
            s.relocations = entries.into_iter().map(|e| e.view).collect();
            s
        })
        .collect();
    let build_ids = read_build_ids(data, targets, &mut w);
    let signature = match crate::sign::split(data) {
        Ok((elf, Some(b))) => Some(SignatureView {
            signer: b.signer.clone(),
            fingerprint: b.fingerprint(),
            signed_bytes: elf.len(),
        }),
        Ok((_, None)) => None,
        Err(e) => {
            w.push(e.message);
            None
        }
    };
    Ok(Inspection {
        file: file.to_string(),
        machine,
        e_machine: obj.machine(),
        byte_order: if big { "big-endian" } else { "little-endian" },
        livepatch,
        replace,
        modinfo,
        targets: loaded
            .iter()
            .map(|t| TargetView {
                object: t.name.clone(),
                file: t.file.clone(),
                table: t.table.to_string(),
            })
            .collect(),
        build_ids,
        signature,
        objects,
        sections,
        warnings: w.list,
    })
}

/// The file's `.note.klp.build-id` entries, each compared with the target of its
/// name; a damaged section and another build are warnings.
fn read_build_ids(data: &[u8], targets: &[TargetInput<'_>], w: &mut Warnings) -> Vec<BuildIdView> {
    use object::read::elf::{FileHeader as _, SectionHeader as _};
    type Header = object::elf::FileHeader64<object::Endianness>;
    let Ok(h) = Header::parse(data) else {
        return Vec::new();
    };
    let Ok(e) = h.endian() else {
        return Vec::new();
    };
    let Ok(table) = h.sections(e, data) else {
        return Vec::new();
    };
    let Some((_, s)) = table.section_by_name(e, crate::buildid::SECTION.as_bytes()) else {
        return Vec::new();
    };
    let entries = s
        .data(e, data)
        .map_err(|err| err.to_string())
        .and_then(|d| crate::buildid::decode::<Header>(e, s.sh_addralign(e), d));
    let entries = match entries {
        Ok(v) => v,
        Err(reason) => {
            w.push(format!(
                "{} is damaged ({reason}); the loader refuses the file",
                crate::buildid::SECTION
            ));
            return Vec::new();
        }
    };
    entries
        .into_iter()
        .map(|(object, id)| {
            let target_id = targets
                .iter()
                .find(|t| t.name == object && t.data.starts_with(&object::elf::ELFMAG))
                .and_then(|t| crate::buildid::gnu_build_id(t.data).ok().flatten());
            let matches = target_id.as_ref().map(|t| *t == id);
            if matches == Some(false) {
                w.push(format!(
                    "the patch was built for another build of {object} (build id {}, the target \
                     has {}); the loader refuses it for that build",
                    crate::buildid::hex(&id),
                    crate::buildid::hex(target_id.as_deref().unwrap_or_default())
                ));
            }
            BuildIdView {
                object,
                id: crate::buildid::hex(&id),
                target_id: target_id.map(|t| crate::buildid::hex(&t)),
                matches,
            }
        })
        .collect()
}

fn elf_warning(e: &ElfError<'_>) -> String {
    e.to_string()
}

/// Every livepatch relocation section with its entries (unresolved).
fn read_sections(
    obj: &PatchObject<'_>,
    arch: Option<Arch>,
    w: &mut Warnings,
) -> Vec<(SectionView, Vec<RawEntry>)> {
    // The core's checks of each SHF_RELA_LIVEPATCH section, in section order: the
    // same sections, one result each, as the walk below visits them.
    let mut checks = obj.klp_relas();
    let mut out = Vec::new();
    for i in 0..obj.section_count() {
        let s = match obj.section(i) {
            Ok(s) => s,
            Err(e) => {
                // klp_relas() reports the same error for this index.
                let _ = checks.next();
                w.push(format!("section {i}: {}", elf_warning(&e)));
                continue;
            }
        };
        if !s.is_klp_rela() {
            if s.name.starts_with(kelf::KLP_RELA_PREFIX) {
                w.push(format!(
                    "{} is named as a livepatch relocation section but lacks \
                     SHF_RELA_LIVEPATCH: the module loader applies it as an ordinary one",
                    s.name
                ));
            }
            continue;
        }
        let checked = checks.next();
        let object = match &checked {
            Some(Ok(k)) => Some(k.objname.to_string()),
            Some(Err(e)) => {
                w.push(elf_warning(e));
                kelf::parse_rela_objname(s.name).map(str::to_string)
            }
            None => None,
        };
        let target = obj.section(s.info as usize).ok().and_then(|t| {
            (t.index != 0).then(|| SectionRef {
                index: t.index,
                name: t.name.to_string(),
            })
        });
        let mut view = SectionView {
            index: i,
            name: s.name.to_string(),
            object: object.clone(),
            target,
            entries: 0,
            relocations: Vec::new(),
        };
        let relas: Vec<kelf::Rela> = match obj.relas(i) {
            Ok(r) => r.collect(),
            Err(e) => {
                w.push(format!("{}: {}", s.name, elf_warning(&e)));
                out.push((view, Vec::new()));
                continue;
            }
        };
        view.entries = relas.len();
        let entries = relas
            .iter()
            .enumerate()
            .map(|(n, r)| read_entry(obj, arch, &s, object.as_deref(), n, r, w))
            .collect();
        out.push((view, entries));
    }
    out
}

fn read_entry(
    obj: &PatchObject<'_>,
    arch: Option<Arch>,
    rela: &kelf::Section<'_>,
    sec_object: Option<&str>,
    n: usize,
    r: &kelf::Rela,
    w: &mut Warnings,
) -> RawEntry {
    let section = rela.name;
    let type_name = arch.and_then(|a| reloc::type_name(a, r.r_type));
    let library = sec_object.is_some_and(|o| o != crate::names::MAIN_OBJECT);
    if let Some(a) = arch
        && !reloc::writable(a, r.r_type)
        && !(library && reloc::got_slot(a, r.r_type))
    {
        w.push(format!(
            "entry {n} of {section}: relocation type {} is not one the livepatch core writes \
             on {a}",
            type_name.map_or_else(|| r.r_type.to_string(), |t| format!("{t} ({})", r.r_type))
        ));
    }
    let mut view = EntryView {
        offset: r.offset,
        r_type: r.r_type,
        type_name,
        addend: r.addend,
        symbol_index: r.sym,
        symbol: None,
        livepatch_symbol: false,
        klp_sym: None,
        resolution: Resolution::Unusable,
    };
    let sym: Symbol<'_> = match obj.symbol(r.sym as usize) {
        Ok(s) => s,
        Err(_) => {
            w.push(
                ElfError::SymbolIndex {
                    section,
                    entry: n,
                    index: u64::from(r.sym),
                }
                .to_string(),
            );
            return RawEntry { view, lookup: None };
        }
    };
    view.symbol = Some(sym.name.to_string());
    view.livepatch_symbol = sym.is_livepatch();
    let parsed = kelf::parse_sym_name(sym.name);
    if let Some(p) = &parsed {
        view.klp_sym = Some(KlpSymView {
            object: p.objname.to_string(),
            name: Name::new(p.name),
            sympos: p.sympos,
        });
    }
    // A partnered entry's label in the relocated section: the core takes the place of
    // its partner, no symbol to resolve.
    if arch.is_some_and(|a| reloc::partnered(a, r.r_type)) && sym.is_label_in(rela.info as usize) {
        view.resolution = Resolution::Partner;
        return RawEntry { view, lookup: None };
    }
    // The kernel's checks, in its order (klp_resolve_symbols), with its messages.
    if !sym.is_livepatch() {
        w.push(format!(
            "symbol {} at rela sec {} idx {n} is not marked as a livepatch symbol ({section})",
            sym.name,
            obj.symtab_index()
        ));
        return RawEntry { view, lookup: None };
    }
    let Some(p) = parsed else {
        w.push(ElfError::SymbolName(sym.name).to_string());
        return RawEntry { view, lookup: None };
    };
    match sec_object {
        Some(so) if so != MAIN_OBJECT && p.objname == MAIN_OBJECT => {
            w.push(format!(
                "invalid access to vmlinux symbol '{}' from module-specific livepatch \
                 relocation section ({section})",
                p.name
            ));
            return RawEntry { view, lookup: None };
        }
        Some(so) if so != p.objname => w.push(format!(
            "{section} is written when {so} arrives, but its symbol {} is resolved in {}, \
             which may not be loaded then",
            sym.name, p.objname
        )),
        _ => {}
    }
    view.resolution = Resolution::NotChecked;
    RawEntry {
        view,
        lookup: Some((p.objname.to_string(), p.name.to_string(), p.sympos)),
    }
}

/// The patch description, as the core reads it.
fn read_description(obj: &PatchObject<'_>, w: &mut Warnings) -> Vec<ObjectView> {
    let mut out = Vec::new();
    let records = match obj.klp_objects() {
        Ok(r) => r,
        Err(e) => {
            w.push(format!("patch description: {}", elf_warning(&e)));
            return out;
        }
    };
    for (i, rec) in records.enumerate() {
        let rec = match rec {
            Ok(r) => r,
            Err(e) => {
                w.push(format!(
                    "patch description, object {}: {}",
                    i + 1,
                    elf_warning(&e)
                ));
                continue;
            }
        };
        let name = rec.name.unwrap_or(MAIN_OBJECT).to_string();
        let mut funcs = Vec::new();
        for (j, f) in obj.klp_funcs(&rec).enumerate() {
            match f {
                Ok(f) => funcs.push(FuncView {
                    old_name: Name::new(f.old_name),
                    sympos: f.sympos,
                    new_func: SymRef::of(&f.new_func),
                    old: Resolution::NotChecked,
                }),
                Err(e) => w.push(format!(
                    "patch description, object {name}, function {}: {}",
                    j + 1,
                    elf_warning(&e)
                )),
            }
        }
        let [pre_patch, post_patch, pre_unpatch, post_unpatch] =
            rec.callbacks.map(|c| c.as_ref().map(SymRef::of));
        out.push(ObjectView {
            module: rec.name.is_some(),
            name,
            nr_funcs: rec.nr_funcs,
            funcs,
            callbacks: Callbacks {
                pre_patch,
                post_patch,
                pre_unpatch,
                post_unpatch,
            },
        });
    }
    out
}

/// Ordinary relocation sections must not reference livepatch symbols: the module
/// loader would write them with the symbol's value, 0.
fn check_ordinary_relocations(obj: &PatchObject<'_>, w: &mut Warnings) {
    for s in obj.sections().filter_map(Result::ok) {
        if s.sh_type != 4 || s.is_klp_rela() {
            continue;
        }
        let Ok(relas) = obj.relas(s.index) else {
            continue;
        };
        for (n, r) in relas.enumerate() {
            if let Ok(sym) = obj.symbol(r.sym as usize)
                && sym.is_livepatch()
            {
                w.push(format!(
                    "entry {n} of {} references the livepatch symbol {}: only .klp.rela \
                     sections may (the module loader would write it with the value 0)",
                    s.name, sym.name
                ));
            }
        }
    }
}

/// A table: columns padded to their widest cell, two spaces apart.
fn table(out: &mut String, indent: &str, rows: &[Vec<String>]) {
    let cols = rows.iter().map(Vec::len).max().unwrap_or(0);
    let widths: Vec<usize> = (0..cols)
        .map(|c| {
            rows.iter()
                .filter_map(|r| r.get(c))
                .map(|s| s.chars().count())
                .max()
                .unwrap_or(0)
        })
        .collect();
    for r in rows {
        let mut line = String::from(indent);
        for (c, cell) in r.iter().enumerate() {
            if c + 1 == r.len() {
                line.push_str(cell);
            } else {
                let pad = widths[c].saturating_sub(cell.chars().count());
                line.push_str(cell);
                line.extend(std::iter::repeat_n(' ', pad + 2));
            }
        }
        out.push_str(line.trim_end());
        out.push('\n');
    }
}

fn plural(n: usize, one: &str, many: &str) -> String {
    format!("{n} {}", if n == 1 { one } else { many })
}

/// The plain-text form.
pub fn render_text(i: &Inspection) -> String {
    let mut out = String::new();
    let yes = |b: bool, what: &str| {
        if b {
            format!("yes ({what})")
        } else {
            "no".to_string()
        }
    };
    let mut head = vec![
        vec!["file".to_string(), i.file.clone()],
        vec![
            "machine".to_string(),
            format!("{}, {}", i.machine, i.byte_order),
        ],
        vec!["livepatch".to_string(), yes(i.livepatch, "livepatch=Y")],
        vec!["replace".to_string(), yes(i.replace, "klp_replace=Y")],
    ];
    if i.modinfo.is_empty() {
        head.push(vec!["modinfo".to_string(), "(none)".to_string()]);
    }
    for (n, m) in i.modinfo.iter().enumerate() {
        let key = if n == 0 { "modinfo" } else { "" };
        head.push(vec![key.to_string(), m.clone()]);
    }
    for (n, t) in i.targets.iter().enumerate() {
        let key = if n == 0 { "targets" } else { "" };
        head.push(vec![
            key.to_string(),
            format!("{}: {} ({})", t.object, t.file, t.table),
        ]);
    }
    for (n, b) in i.build_ids.iter().enumerate() {
        let key = if n == 0 { "build ids" } else { "" };
        let how = match (b.matches, &b.target_id) {
            (Some(true), _) => " (the target's)".to_string(),
            (Some(false), Some(t)) => format!(" (the target has {t}: another build)"),
            _ => String::new(),
        };
        head.push(vec![
            key.to_string(),
            format!("{}: {}{how}", b.object, b.id),
        ]);
    }
    if let Some(sig) = &i.signature {
        head.push(vec![
            "signature".to_string(),
            format!(
                "key {} (fingerprint {}) over {} bytes, not verified here (klp-sign verify)",
                sig.signer, sig.fingerprint, sig.signed_bytes
            ),
        ]);
    }
    table(&mut out, "", &head);

    out.push('\n');
    if i.objects.is_empty() {
        out.push_str("Patch description: none\n");
    } else {
        let _ = writeln!(
            out,
            "Patch description: {}",
            plural(i.objects.len(), "object", "objects")
        );
    }
    for o in &i.objects {
        let _ = writeln!(
            out,
            "  {}{}",
            o.name,
            if o.module { " (module)" } else { "" }
        );
        let mut rows = Vec::new();
        for f in &o.funcs {
            let old = if f.sympos == 0 {
                f.old_name.display().to_string()
            } else {
                format!("{},{}", f.old_name.display(), f.sympos)
            };
            rows.push(vec![
                old,
                "->".to_string(),
                f.new_func.display(),
                format!("(old: {})", f.old),
            ]);
        }
        table(&mut out, "    ", &rows);
        let callbacks: Vec<Vec<String>> = o
            .callbacks
            .by_kind()
            .into_iter()
            .filter_map(|(kind, cb)| Some(vec![format!("{kind}:"), cb?.display()]))
            .collect();
        table(&mut out, "    ", &callbacks);
        if o.funcs.is_empty() && callbacks.is_empty() {
            out.push_str("    (no functions, no callbacks)\n");
        }
    }

    out.push('\n');
    let _ = writeln!(
        out,
        "Livepatch relocation sections: {}",
        if i.sections.is_empty() {
            "none".to_string()
        } else {
            i.sections.len().to_string()
        }
    );
    for s in &i.sections {
        let target = s.target.as_ref().map_or_else(
            || "no section".to_string(),
            |t| format!("{} (section {})", t.name, t.index),
        );
        let _ = writeln!(
            out,
            "  {}: {} for {}, object {}",
            s.name,
            plural(s.entries, "entry", "entries"),
            target,
            s.object.as_deref().unwrap_or("(malformed name)")
        );
        let mut rows = vec![
            [
                "OFFSET",
                "TYPE",
                "ADDEND",
                "OBJECT",
                "SYMBOL",
                "SYMPOS",
                "RESOLVES TO",
            ]
            .map(str::to_string)
            .to_vec(),
        ];
        for e in &s.relocations {
            let ty = e
                .type_name
                .map_or_else(|| e.r_type.to_string(), str::to_string);
            let addend = if e.addend < 0 {
                format!("-{:#x}", e.addend.unsigned_abs())
            } else {
                format!("{:#x}", e.addend)
            };
            let (object, name, sympos) = match &e.klp_sym {
                Some(k) => (
                    k.object.clone(),
                    k.name.display().to_string(),
                    k.sympos.to_string(),
                ),
                None => (
                    "?".to_string(),
                    e.symbol
                        .clone()
                        .unwrap_or_else(|| format!("symbol {}", e.symbol_index)),
                    "?".to_string(),
                ),
            };
            rows.push(vec![
                format!("{:#x}", e.offset),
                ty,
                addend,
                object,
                name,
                sympos,
                e.resolution.to_string(),
            ]);
        }
        table(&mut out, "    ", &rows);
    }

    out.push('\n');
    if i.warnings.is_empty() {
        out.push_str("Warnings: none\n");
    } else {
        let _ = writeln!(out, "Warnings: {}", i.warnings.len());
        for w in &i.warnings {
            let _ = writeln!(out, "  {w}");
        }
    }
    out
}

/// The JSON form: one document with the same content.
pub fn render_json(i: &Inspection) -> String {
    // Serialising plain data with string keys cannot fail.
    serde_json::to_string_pretty(i).unwrap_or_default()
}
