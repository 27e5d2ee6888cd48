//! `--patch-callers`: where the compiler inlined a function that the patch replaces,
//! its callers hold a copy of the old code, which a redirect at the function's entry
//! never reaches. With the option, klp-convert reads each target's debug information
//! (`klp_inline`) and adds to the description every function holding such a copy (or
//! calling a clone of the function, `F.constprop.N` and the like), replaced by the
//! patch's function of the same name — the author recompiles those callers with the
//! fix into the patch. A caller the patch does not define is refused, naming it.

use crate::elf::PatchObject;
use crate::error::Error;
use crate::manifest::{FuncEntry, Manifest};
use crate::target::TargetInput;

/// Whether the patch defines a function named `name`.
fn defines(object: &PatchObject, name: &str) -> bool {
    object.symbols.iter().any(|s| {
        s.name == name.as_bytes()
            && s.sym.st_info.st_type() == object::elf::STT_FUNC
            && !s.is_undefined()
    })
}

/// The manifest with each described object's inlining callers added (see the module
/// documentation), and a note for each one added.
pub(crate) fn add_callers(
    object: &PatchObject,
    targets: &[TargetInput<'_>],
    manifest: &Manifest,
    notes: &mut Vec<String>,
) -> Result<Manifest, Error> {
    let mut out = manifest.clone();
    let Some(patch) = out.patch.as_mut() else {
        return Ok(out);
    };
    for o in &mut patch.objects {
        let Some(t) = targets.iter().find(|t| t.name == o.object) else {
            continue;
        };
        let analysis = klp_inline::Analysis::new(t.data).map_err(|e| Error::Callers {
            object: o.object.clone(),
            reason: format!("{} cannot be read for inlined copies: {e}", t.file),
        })?;
        let replaced: Vec<String> = o.funcs.iter().map(|f| f.old.clone()).collect();
        for f in &replaced {
            let inlined = analysis.inlined_into(f);
            if !inlined.debug_info {
                return Err(Error::Callers {
                    object: o.object.clone(),
                    reason: format!(
                        "{} has no debug information about '{f}', so its callers that inlined \
                         it cannot be found; build it with -g",
                        t.file
                    ),
                });
            }
            let mut callers: Vec<String> = inlined.callers.iter().map(|c| c.name.clone()).collect();
            for c in &inlined.clones {
                callers.extend(c.callers.iter().map(|c| c.name.clone()));
            }
            callers.sort();
            callers.dedup();
            let missing: Vec<&String> = callers.iter().filter(|c| !defines(object, c)).collect();
            if !missing.is_empty() {
                let quoted: Vec<String> = missing.iter().map(|c| format!("'{c}'")).collect();
                let list = match quoted.split_last() {
                    Some((last, rest)) if !rest.is_empty() => {
                        format!("{} and {last}", rest.join(", "))
                    }
                    _ => quoted.join(""),
                };
                return Err(Error::Callers {
                    object: o.object.clone(),
                    reason: format!(
                        "'{f}' is inlined into {list}, which the patch does not define: put \
                         fixed copies of them (same names) into the patch"
                    ),
                });
            }
            for c in callers {
                if o.funcs.iter().any(|e| e.old == c) {
                    continue;
                }
                notes.push(format!(
                    "'{c}' of {} inlines '{f}': replaced by the patch's '{c}' too",
                    o.object
                ));
                o.funcs.push(FuncEntry {
                    old: c.clone(),
                    new: c,
                    sympos: 0,
                });
            }
        }
    }
    Ok(out)
}
