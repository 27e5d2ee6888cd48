//! Deciding, for every symbol the patch leaves undefined, whether it stays an
//! ordinary undefined symbol or becomes a livepatch symbol, and which definition it
//! means.
//!
//! Ordinary linking cannot resolve a reference when the definition is local (a
//! static function or variable), hidden or internal, in an object other than the
//! main one (that object may not be loaded), or, when the main object says what its
//! loader resolves (a kernel's `__ksymtab_*`, an executable's `.dynsym`), not among
//! those. Everything else — a global default-visibility symbol of `vmlinux` that its
//! loader resolves — stays ordinary.
//!
//! `sympos`: `0` when the object has one definition of the name (the seed: "The
//! symbol position of a unique symbol is 0"; the core then also refuses a target
//! that has gained a second definition since), otherwise the 1-based position of
//! the chosen definition among the object's definitions of that name, in table
//! order (address order for a kernel's ELF vmlinux, see [`crate::target`]). A
//! manifest `sympos` is written as given.

use crate::elf::PatchObject;
use crate::error::{Bind, Candidate, Error, Visibility};
use crate::manifest::Manifest;
use crate::names::{MAIN_OBJECT, check_symbol_name, klp_symbol_name};
use crate::target::TargetObject;

/// Symbols the linker or the module loader provides by name, never found in a
/// target's symbol table as a definition the patch could mean (ppc64's `.TOC.`,
/// which the kernel's module loader and `ld` resolve to the object's own TOC).
pub const LOADER_PROVIDED: &[&str] = &[".TOC.", "_GLOBAL_OFFSET_TABLE_", "_DYNAMIC"];

/// Options that change the decisions.
#[derive(Clone, Debug, Default)]
pub struct Options {
    /// Leave symbols that no target defines as ordinary undefined symbols (with a
    /// warning) instead of refusing.
    pub keep_unresolved: bool,
    /// Record no build ids (no `.note.klp.build-id`, see [`crate::buildid`]).
    pub no_build_id: bool,
    /// Also replace the functions of a target into which the compiler inlined a
    /// function the description replaces (found in the target's debug information,
    /// see [`crate::callers`]): each must be defined by the patch under its own name.
    pub patch_callers: bool,
}

/// Why a symbol stays an ordinary undefined symbol.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum KeepReason {
    /// The manifest's `keep`.
    Manifest,
    /// The linker or loader provides it ([`LOADER_PROVIDED`]).
    LoaderProvided,
    /// A global default-visibility symbol of the main object that its loader
    /// resolves.
    Resolvable,
    /// No target defines it and `keep_unresolved` is set.
    Unresolved,
}

/// Why a symbol becomes a livepatch symbol.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ConvertReason {
    /// The definition is local (static).
    Local,
    /// The definition is hidden or internal.
    Hidden,
    /// The definition is in an object other than `vmlinux`, which may not be loaded.
    OtherObject,
    /// The main object's loader does not resolve it (not exported).
    NotExported,
    /// The manifest's `force_klp`.
    Forced,
}

/// What happens to one undefined symbol.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Decision {
    /// It stays an ordinary undefined symbol.
    Keep {
        /// Why.
        reason: KeepReason,
        /// The object that defines it, when a target does.
        object: Option<String>,
    },
    /// It becomes `.klp.sym.<object>.<name>,<sympos>`.
    Convert {
        /// The object.
        object: String,
        /// The position written in the name.
        sympos: u64,
        /// The new name.
        klp_name: String,
        /// Why.
        reason: ConvertReason,
        /// The chosen definition's address in its target (`st_value`, or the symbol
        /// map's address).
        address: u64,
    },
}

/// The decision for one undefined symbol of the patch.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SymbolDecision {
    /// Its index in the patch's `.symtab`.
    pub index: usize,
    /// Its name.
    pub name: String,
    /// What happens to it.
    pub decision: Decision,
}

fn basename(p: &str) -> &str {
    p.rsplit('/').next().unwrap_or(p)
}

fn file_matches(have: Option<&str>, want: &str) -> bool {
    have.is_some_and(|h| h == want || basename(h) == basename(want))
}

/// The names of the symbols the patch leaves undefined.
pub(crate) fn undefined_names(patch: &PatchObject) -> Vec<(usize, String)> {
    patch
        .symbols
        .iter()
        .enumerate()
        .skip(1)
        .filter(|(_, s)| {
            let t = s.sym.st_info.st_type();
            s.is_undefined()
                && !s.name.is_empty()
                && t != object::elf::STT_SECTION
                && t != object::elf::STT_FILE
        })
        .map(|(i, s)| (i, String::from_utf8_lossy(&s.name).into_owned()))
        .collect()
}

/// Decides every undefined symbol of `patch`. Warnings for a person go to `warnings`.
pub(crate) fn plan(
    patch: &PatchObject,
    targets: &[TargetObject],
    manifest: &Manifest,
    options: &Options,
    warnings: &mut Vec<String>,
) -> Result<Vec<SymbolDecision>, Error> {
    let undefined = undefined_names(patch);
    for name in manifest
        .symbols
        .keys()
        .chain(&manifest.force_klp)
        .chain(&manifest.keep)
    {
        if !undefined.iter().any(|(_, n)| n == name) {
            warnings.push(format!(
                "the manifest names symbol '{name}', which the patch does not leave undefined; \
                 the entry has no effect"
            ));
        }
    }
    let mut out = Vec::with_capacity(undefined.len());
    for (index, name) in undefined {
        let decision = decide(&name, targets, manifest, options, warnings)?;
        out.push(SymbolDecision {
            index,
            name,
            decision,
        });
    }
    Ok(out)
}

fn decide(
    name: &str,
    targets: &[TargetObject],
    manifest: &Manifest,
    options: &Options,
    warnings: &mut Vec<String>,
) -> Result<Decision, Error> {
    if manifest.keep.iter().any(|k| k == name) {
        return Ok(Decision::Keep {
            reason: KeepReason::Manifest,
            object: None,
        });
    }
    if LOADER_PROVIDED.contains(&name) {
        return Ok(Decision::Keep {
            reason: KeepReason::LoaderProvided,
            object: None,
        });
    }
    let choice = manifest.choice(name).cloned().unwrap_or_default();
    let all: Vec<&TargetObject> = targets
        .iter()
        .filter(|t| !t.definitions(name).is_empty())
        .collect();
    let target = match &choice.object {
        Some(object) => {
            let Some(t) = targets.iter().find(|t| &t.name == object) else {
                return Err(Error::Manifest {
                    reason: format!(
                        "symbol '{name}' is chosen from object {object}, which is not a target \
                         (the targets are {})",
                        names(targets)
                    ),
                });
            };
            if t.definitions(name).is_empty() {
                return Err(Error::NotInObject {
                    symbol: name.to_string(),
                    object: object.clone(),
                    elsewhere: all.iter().flat_map(|t| t.candidates(name)).collect(),
                });
            }
            t
        }
        None => match all.as_slice() {
            [] => {
                if options.keep_unresolved {
                    warnings.push(format!(
                        "symbol '{name}' is defined by no target; it stays an ordinary \
                         undefined symbol, which the loader must resolve"
                    ));
                    return Ok(Decision::Keep {
                        reason: KeepReason::Unresolved,
                        object: None,
                    });
                }
                return Err(Error::NotFound {
                    symbol: name.to_string(),
                    searched: targets
                        .iter()
                        .map(|t| format!("{} ({} of {})", t.name, t.table, t.file))
                        .collect(),
                });
            }
            [one] => one,
            _ => {
                return Err(Error::AmbiguousObjects {
                    symbol: name.to_string(),
                    candidates: all.iter().flat_map(|t| t.candidates(name)).collect(),
                });
            }
        },
    };
    let defs = target.definitions(name);
    let candidates = || target.candidates(name);
    // The 1-based position of the chosen definition.
    let pos = if let Some(p) = choice.sympos {
        let pos = if p == 0 {
            if defs.len() != 1 {
                return Err(Error::BadSympos {
                    symbol: name.to_string(),
                    sympos: 0,
                    reason: format!(
                        "0 means the name is unique, and {} has {} definitions",
                        target.name,
                        defs.len()
                    ),
                    candidates: candidates(),
                });
            }
            1
        } else if p > defs.len() as u64 {
            return Err(Error::BadSympos {
                symbol: name.to_string(),
                sympos: p,
                reason: format!("{} has only {} definitions", target.name, defs.len()),
                candidates: candidates(),
            });
        } else {
            p as usize
        };
        if let Some(file) = &choice.file {
            let have = defs.get(pos - 1).and_then(|d| d.file.as_deref());
            if !file_matches(have, file) {
                return Err(Error::BadSympos {
                    symbol: name.to_string(),
                    sympos: p,
                    reason: format!("that definition does not come from {file}"),
                    candidates: candidates(),
                });
            }
        }
        pos
    } else if let Some(file) = &choice.file {
        let matching: Vec<usize> = (0..defs.len())
            .filter(|&i| file_matches(defs[i].file.as_deref(), file))
            .collect();
        match matching.as_slice() {
            [i] => i + 1,
            [] => {
                return Err(Error::NoSuchFile {
                    symbol: name.to_string(),
                    file: file.clone(),
                    candidates: candidates(),
                });
            }
            more => {
                let all = candidates();
                return Err(Error::AmbiguousInObject {
                    symbol: name.to_string(),
                    object: target.name.clone(),
                    candidates: more.iter().filter_map(|&i| all.get(i).cloned()).collect(),
                });
            }
        }
    } else if defs.len() == 1 {
        1
    } else {
        // An undefined reference to a name with exactly one global definition and
        // some statics means the global one: that is what the linker would bind.
        let globals: Vec<usize> = (0..defs.len())
            .filter(|&i| defs[i].bind != Bind::Local)
            .collect();
        match globals.as_slice() {
            [g] => {
                warnings.push(format!(
                    "symbol '{name}' means the global definition in {} (sympos {}); {} has \
                     {} static definitions of the same name too: if the patch means one of \
                     those, choose it in the manifest",
                    target.name,
                    g + 1,
                    target.name,
                    defs.len() - 1
                ));
                g + 1
            }
            _ => {
                return Err(Error::AmbiguousInObject {
                    symbol: name.to_string(),
                    object: target.name.clone(),
                    candidates: candidates(),
                });
            }
        }
    };
    let Some(def) = defs.get(pos - 1) else {
        return Err(Error::BadSympos {
            symbol: name.to_string(),
            sympos: pos as u64,
            reason: format!("{} has only {} definitions", target.name, defs.len()),
            candidates: candidates(),
        });
    };
    let reason = if manifest.force_klp.iter().any(|f| f == name) {
        Some(ConvertReason::Forced)
    } else if target.name != MAIN_OBJECT {
        Some(ConvertReason::OtherObject)
    } else if def.bind == Bind::Local {
        Some(ConvertReason::Local)
    } else if matches!(def.visibility, Visibility::Hidden | Visibility::Internal) {
        Some(ConvertReason::Hidden)
    } else if !target.loader_resolves(name) {
        Some(ConvertReason::NotExported)
    } else {
        None
    };
    let Some(reason) = reason else {
        return Ok(Decision::Keep {
            reason: KeepReason::Resolvable,
            object: Some(target.name.clone()),
        });
    };
    check_symbol_name(name)?;
    let sympos = match choice.sympos {
        Some(p) => p,
        None if defs.len() == 1 => 0,
        None => pos as u64,
    };
    Ok(Decision::Convert {
        object: target.name.clone(),
        sympos,
        klp_name: klp_symbol_name(&target.name, name, sympos),
        reason,
        address: def.address,
    })
}

fn names(targets: &[TargetObject]) -> String {
    if targets.is_empty() {
        return "none".to_string();
    }
    targets
        .iter()
        .map(|t| t.name.as_str())
        .collect::<Vec<_>>()
        .join(", ")
}

/// The candidates of a symbol across all targets (for reports and tests).
pub fn candidates(targets: &[TargetObject], name: &str) -> Vec<Candidate> {
    targets.iter().flat_map(|t| t.candidates(name)).collect()
}
