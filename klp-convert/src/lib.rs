//! `klp-convert`: turns an ordinarily compiled patch object into a livepatch object.
//!
//! A patch's new functions call static functions and read static variables of the
//! code they patch, and use symbols of objects that may not be loaded yet. Ordinary
//! linking cannot resolve those references. This crate rewrites them into the
//! kernel's livepatch ELF format (`Documentation/livepatch/module-elf-format.rst`,
//! spec §8): each such symbol becomes `.klp.sym.<object>.<name>,<sympos>` with
//! `st_shndx = SHN_LIVEPATCH`, and each relocation against it moves into a
//! `.klp.rela.<object>.<section>` section flagged `SHF_RELA_LIVEPATCH`, which the
//! livepatch core writes when the object is there.
//!
//! ```no_run
//! # fn main() -> Result<(), klp_convert::Error> {
//! use klp_convert::{Manifest, Options, TargetInput, convert};
//! let patch = std::fs::read("patch.o").unwrap();
//! let vmlinux = std::fs::read("System.map").unwrap();
//! let targets = [TargetInput { name: "vmlinux".into(), file: "System.map".into(), data: &vmlinux }];
//! let out = convert("patch.o", &patch, &targets, &Manifest::default(), &Options::default())?;
//! std::fs::write("patch-klp.o", &out.data).unwrap();
//! # Ok(()) }
//! ```
//!
//! With the manifest's `patch`, the same output also carries the patch description
//! in upstream klp-build's layout (`.init.klp_objects` / `.init.klp_funcs`, see
//! [`describe`]).
//!
//! The steps are separate modules: [`elf`] reads the patch, [`target`] reads the
//! targets' symbols, [`plan`] decides each undefined symbol, [`describe`] checks and
//! lays out the description, [`relax`] rewrites GOT references to converted symbols
//! into direct ones, [`buildid`] reads the targets' build ids and lays out
//! `.note.klp.build-id`, `write` rewrites the file. [`sign`] signs and checks patch
//! files (the `klp-sign` command and `--sign`). [`inspect`] is the library side of the
//! `klp-inspect` command, which shows a livepatch object as the livepatch core reads
//! it. Library code returns [`Error`] for every bad input and never panics on one.

pub mod buildid;
pub mod callers;
pub mod describe;
pub mod elf;
pub mod error;
pub mod inspect;
pub mod manifest;
pub mod names;
pub mod plan;
pub mod relax;
pub mod reloc;
pub mod sign;
pub mod target;
mod write;

use std::collections::HashSet;

pub use crate::describe::{DescribedFunc, DescribedObject, Description};
pub use crate::elf::Arch;
pub use crate::error::{Bind, Candidate, Error, Kind, Visibility};
pub use crate::manifest::{
    CallbackEntry, FuncEntry, Manifest, ObjectEntry, PatchEntry, SymbolChoice,
};
pub use crate::plan::{ConvertReason, Decision, KeepReason, Options, SymbolDecision};
pub use crate::relax::Relaxed;
pub use crate::target::{Exports, TargetInput, TargetObject, load_target, parse_target_arg};
pub use crate::write::{KlpSection, MovedRela};

/// What a conversion did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Report {
    /// The architecture of the patch.
    pub arch: Arch,
    /// The target objects read, by name, with the table used.
    pub objects: Vec<(String, &'static str)>,
    /// The decision for each undefined symbol of the patch, in symbol-table order.
    pub symbols: Vec<SymbolDecision>,
    /// The `.klp.rela` sections written.
    pub sections: Vec<KlpSection>,
    /// Whether `livepatch=Y` was added to `.modinfo`.
    pub modinfo_added: bool,
    /// The patch description written from the manifest's `patch`, if any.
    pub description: Option<Description>,
    /// The GOT-relative relocations relaxed into direct ones, in file order.
    pub relaxed: Vec<Relaxed>,
    /// Each ELF target's build id, in target order (`None`: the file has none, or
    /// the target is a symbol map), as recorded in `.note.klp.build-id` unless
    /// `no_build_id`.
    pub build_ids: Vec<TargetBuildId>,
    /// Notes for a person (nothing was refused).
    pub warnings: Vec<String>,
}

impl Report {
    /// The symbols converted: (original name, livepatch name).
    pub fn converted(&self) -> impl Iterator<Item = (&str, &str)> {
        self.symbols.iter().filter_map(|s| match &s.decision {
            Decision::Convert { klp_name, .. } => Some((s.name.as_str(), klp_name.as_str())),
            Decision::Keep { .. } => None,
        })
    }
}

/// The build id of one target.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TargetBuildId {
    /// The object name.
    pub object: String,
    /// The file it came from.
    pub file: String,
    /// Its GNU build id; `None` for a file without one and for a symbol map.
    pub id: Option<Vec<u8>>,
    /// Whether it was written into the output.
    pub recorded: bool,
}

/// The livepatch object and what was done to make it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Converted {
    /// The output file's bytes.
    pub data: Vec<u8>,
    /// What was done.
    pub report: Report,
}

/// Converts the patch object `patch` (read from `patch_file`, used in messages)
/// against `targets`.
pub fn convert(
    patch_file: &str,
    patch: &[u8],
    targets: &[TargetInput<'_>],
    manifest: &Manifest,
    options: &Options,
) -> Result<Converted, Error> {
    manifest.check()?;
    let object = elf::PatchObject::parse(patch_file, patch)?;
    let mut warnings = Vec::new();
    let with_callers;
    let manifest = if options.patch_callers {
        with_callers = callers::add_callers(&object, targets, manifest, &mut warnings)?;
        &with_callers
    } else {
        manifest
    };
    let mut wanted: HashSet<String> = plan::undefined_names(&object)
        .into_iter()
        .map(|(_, n)| n)
        .collect();
    // The functions the description replaces are looked up in their targets too.
    if let Some(patch) = &manifest.patch {
        for o in &patch.objects {
            wanted.extend(o.funcs.iter().map(|f| f.old.clone()));
        }
    }
    let mut objects: Vec<TargetObject> = Vec::new();
    for t in targets {
        for o in load_target(t, &wanted, object.arch)? {
            if objects.iter().any(|x| x.name == o.name) {
                return Err(Error::DuplicateObject { name: o.name });
            }
            objects.push(o);
        }
    }
    let symbols = plan::plan(&object, &objects, manifest, options, &mut warnings)?;
    let description = describe::plan(&object, &objects, manifest, &mut warnings)?;
    let arch = object.arch;
    let mut build_ids = Vec::new();
    for t in targets {
        let id = if t.data.starts_with(&object::elf::ELFMAG) {
            buildid::gnu_build_id(t.data).map_err(|reason| Error::Malformed {
                file: t.file.clone(),
                reason: format!("its notes cannot be read for its build id: {reason}"),
            })?
        } else {
            None
        };
        build_ids.push(TargetBuildId {
            object: t.name.clone(),
            file: t.file.clone(),
            recorded: id.is_some() && !options.no_build_id,
            id,
        });
    }
    let recorded: Vec<(String, Vec<u8>)> = build_ids
        .iter()
        .filter(|b| b.recorded)
        .filter_map(|b| Some((b.object.clone(), b.id.clone()?)))
        .collect();
    let rewritten = write::rewrite(object, &symbols, description.as_ref(), &recorded)?;
    Ok(Converted {
        data: rewritten.data,
        report: Report {
            arch,
            objects: objects.iter().map(|o| (o.name.clone(), o.table)).collect(),
            symbols,
            sections: rewritten.sections,
            modinfo_added: rewritten.modinfo_added,
            description: description.map(|d| d.description),
            relaxed: rewritten.relaxed,
            build_ids,
            warnings,
        },
    })
}
