//! What a patch file would do, read without loading it (`klpctl inspect FILE`).
//!
//! [`describe`] reads a livepatch object with the core's reader ([`klp::elf`]) the way
//! the loader and the simulator read it: the patch's name ([`patch_name`]), whether it
//! replaces the patches enabled before it (`klp_replace=Y`), and for each object it
//! patches — the program itself or a library — the functions it replaces, its
//! callbacks, its livepatch relocation sections (`.klp.rela.<object>.<section>`) with
//! their entry counts, and the symbols of that object they need
//! (`.klp.sym.<object>.<name>,<sympos>`). Nothing is resolved against the running
//! process: the description is the file's alone.

use std::path::Path;

use klp::Errno;
use klp::elf::{ElfError, PatchObject, parse_sym_name};
use serde::Serialize;

use super::{LoadError, errno_text};

/// The object name the livepatch format uses for the program itself.
pub const PROGRAM_OBJECT: &str = "vmlinux";

/// Everything [`describe`] found in a patch file.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct PatchFileInfo {
    /// The file, as given.
    pub file: String,
    /// The patch (and patch module) name: see [`patch_name`].
    pub name: String,
    /// Where the name comes from: `modinfo` (`name=`) or `file name`.
    pub name_from: &'static str,
    /// `x86_64`, `aarch64`, `ppc64le`, `s390x`, or `machine N`.
    pub machine: String,
    /// Whether the file is big-endian.
    pub big_endian: bool,
    /// Whether `.modinfo` marks it as a livepatch (`livepatch=Y`).
    pub livepatch: bool,
    /// Whether it replaces every patch enabled before it (`klp_replace=Y`).
    pub replace: bool,
    /// The `.modinfo` entries.
    pub modinfo: Vec<String>,
    /// The objects it patches: those of the patch description first, in its order,
    /// then those only its relocation sections name.
    pub objects: Vec<ObjectInfo>,
    /// What looks wrong, one sentence each.
    pub warnings: Vec<String>,
}

/// One object a patch file patches.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct ObjectInfo {
    /// `None`: the program itself (`vmlinux` in the file); else a library's name.
    pub object: Option<String>,
    /// Whether the patch description lists it (else only relocation sections name it).
    pub described: bool,
    /// The functions it replaces.
    pub functions: Vec<FunctionInfo>,
    /// Its callbacks' symbols.
    pub callbacks: CallbackInfo,
    /// Its livepatch relocation sections.
    pub relocation_sections: Vec<RelaSectionInfo>,
    /// The symbols of the object those sections need, each once, in order of first use.
    pub symbols: Vec<NeededSymbol>,
}

/// One replaced function.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct FunctionInfo {
    /// The function replaced (its symbol name, raw).
    pub old_name: String,
    /// `old_name` demangled, when it is a Rust or C++ symbol.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub old_name_demangled: Option<String>,
    /// Which of the symbols of that name (0: the name is unique).
    pub sympos: u64,
    /// The patch's symbol that replaces it.
    pub new_symbol: String,
}

/// The callbacks of an object (their symbol names).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct CallbackInfo {
    /// Before the object is patched.
    pub pre_patch: Option<String>,
    /// After it is patched.
    pub post_patch: Option<String>,
    /// Before it is unpatched.
    pub pre_unpatch: Option<String>,
    /// After it is unpatched.
    pub post_unpatch: Option<String>,
}

impl CallbackInfo {
    /// The callbacks set, as (`pre_patch`…, symbol).
    pub fn set(&self) -> Vec<(&'static str, &str)> {
        [
            ("pre_patch", &self.pre_patch),
            ("post_patch", &self.post_patch),
            ("pre_unpatch", &self.pre_unpatch),
            ("post_unpatch", &self.post_unpatch),
        ]
        .into_iter()
        .filter_map(|(k, v)| v.as_deref().map(|v| (k, v)))
        .collect()
    }
}

/// One `.klp.rela.<object>.<section>` section.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct RelaSectionInfo {
    /// Its name.
    pub section: String,
    /// The section of the patch it writes (`sh_info`).
    pub target: String,
    /// How many relocations it holds.
    pub entries: usize,
}

/// A symbol of the patched object a relocation needs (`.klp.sym.<object>.<name>,<pos>`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct NeededSymbol {
    /// The object the symbol is looked up in (`vmlinux`: the program).
    pub object: String,
    /// Its name (raw).
    pub name: String,
    /// `name` demangled, when it is a Rust or C++ symbol.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub demangled: Option<String>,
    /// Which of the symbols of that name (0: the name is unique).
    pub sympos: u64,
}

/// The name of the patch a file holds: the `.modinfo` entry `name=` if there is one,
/// else the file name up to its first `.` (`fix.ko.klp` → `fix`).
pub fn patch_name(obj: &PatchObject<'_>, path: &Path) -> String {
    if let Some(n) = obj.modinfo().find_map(|e| e.strip_prefix("name=")) {
        return n.to_string();
    }
    let file = path
        .file_name()
        .map(|f| f.to_string_lossy().into_owned())
        .unwrap_or_default();
    match file.split_once('.') {
        Some((stem, _)) => stem.to_string(),
        None => file,
    }
}

/// The architecture of an ELF machine number, as klp names it.
pub fn machine_name(machine: u16, big_endian: bool) -> String {
    match (machine, big_endian) {
        (62, false) => "x86_64".into(),
        (183, false) => "aarch64".into(),
        (21, false) => "ppc64le".into(),
        (22, true) => "s390x".into(),
        (m, _) => format!("machine {m}"),
    }
}

/// A symbol name demangled (Rust, then C++), or `None` when it is not mangled.
pub fn demangle(name: &str) -> Option<String> {
    if let Ok(d) = rustc_demangle::try_demangle(name) {
        // `{:#}`: without the hash suffix of legacy Rust symbols.
        let s = format!("{d:#}");
        return (s != name).then_some(s);
    }
    if name.starts_with("_Z") {
        let sym = cpp_demangle::Symbol::new(name).ok()?;
        let s = sym.demangle().ok()?;
        return (s != name).then_some(s);
    }
    None
}

fn malformed(path: &Path, e: &ElfError<'_>) -> LoadError {
    LoadError::new(
        Errno::ENOEXEC,
        format!(
            "{} is not a livepatch object klp can read: {e} ({})",
            path.display(),
            errno_text(Errno::ENOEXEC)
        ),
    )
}

fn object_slot<'a>(
    objects: &'a mut Vec<ObjectInfo>,
    name: Option<&str>,
) -> Option<&'a mut ObjectInfo> {
    if !objects.iter().any(|o| o.object.as_deref() == name) {
        objects.push(ObjectInfo {
            object: name.map(str::to_string),
            described: false,
            functions: Vec::new(),
            callbacks: CallbackInfo::default(),
            relocation_sections: Vec::new(),
            symbols: Vec::new(),
        });
    }
    objects.iter_mut().find(|o| o.object.as_deref() == name)
}

/// Reads the patch file `bytes` (named `path`) and tells what it would do; see the
/// module documentation. A file the core's reader refuses is an `-ENOEXEC` error.
pub fn describe(bytes: &[u8], path: &Path) -> Result<PatchFileInfo, LoadError> {
    let obj = PatchObject::parse(bytes).map_err(|e| malformed(path, &e))?;
    let modinfo: Vec<String> = obj.modinfo().map(str::to_string).collect();
    let name_from = if modinfo.iter().any(|e| e.starts_with("name=")) {
        "modinfo"
    } else {
        "file name"
    };
    let mut info = PatchFileInfo {
        file: path.display().to_string(),
        name: patch_name(&obj, path),
        name_from,
        machine: machine_name(obj.machine(), obj.is_big_endian()),
        big_endian: obj.is_big_endian(),
        livepatch: obj.is_livepatch(),
        replace: modinfo.iter().any(|e| e == "klp_replace=Y"),
        modinfo,
        objects: Vec::new(),
        warnings: Vec::new(),
    };
    // The patch description.
    let objects = obj.klp_objects().map_err(|e| malformed(path, &e))?;
    for o in objects {
        let o = o.map_err(|e| malformed(path, &e))?;
        let name = o.name.filter(|n| *n != PROGRAM_OBJECT);
        if info
            .objects
            .iter()
            .any(|x| x.described && x.object.as_deref() == name)
        {
            info.warnings.push(format!(
                "the patch description lists {} twice: the patch would be refused",
                object_words(name)
            ));
        }
        let mut functions = Vec::new();
        for f in obj.klp_funcs(&o) {
            let f = f.map_err(|e| malformed(path, &e))?;
            functions.push(FunctionInfo {
                old_name: f.old_name.to_string(),
                old_name_demangled: demangle(f.old_name),
                sympos: f.sympos,
                new_symbol: f.new_func.symbol.name.to_string(),
            });
        }
        let cb = |k: usize| {
            o.callbacks
                .get(k)
                .copied()
                .flatten()
                .map(|p| p.symbol.name.to_string())
        };
        if let Some(slot) = object_slot(&mut info.objects, name) {
            slot.described = true;
            slot.functions.extend(functions);
            slot.callbacks = CallbackInfo {
                pre_patch: cb(0),
                post_patch: cb(1),
                pre_unpatch: cb(2),
                post_unpatch: cb(3),
            };
        }
    }
    // The livepatch relocation sections and the symbols they need.
    for r in obj.klp_relas() {
        let r = r.map_err(|e| malformed(path, &e))?;
        let target = obj
            .section(r.target)
            .map(|s| s.name.to_string())
            .map_err(|e| malformed(path, &e))?;
        let mut needed: Vec<NeededSymbol> = Vec::new();
        let mut entries = 0usize;
        for rela in obj
            .relas(r.section.index)
            .map_err(|e| malformed(path, &e))?
        {
            entries += 1;
            let sym = obj
                .symbol(rela.sym as usize)
                .map_err(|e| malformed(path, &e))?;
            if !sym.is_livepatch() {
                continue;
            }
            let Some(k) = parse_sym_name(sym.name) else {
                return Err(malformed(path, &ElfError::SymbolName(sym.name)));
            };
            if !needed
                .iter()
                .any(|n| n.object == k.objname && n.name == k.name && n.sympos == k.sympos)
            {
                needed.push(NeededSymbol {
                    object: k.objname.to_string(),
                    name: k.name.to_string(),
                    demangled: demangle(k.name),
                    sympos: k.sympos,
                });
            }
        }
        let name = Some(r.objname).filter(|n| *n != PROGRAM_OBJECT);
        if let Some(slot) = object_slot(&mut info.objects, name) {
            slot.relocation_sections.push(RelaSectionInfo {
                section: r.section.name.to_string(),
                target,
                entries,
            });
            for n in needed {
                if !slot.symbols.contains(&n) {
                    slot.symbols.push(n);
                }
            }
        }
    }
    if !info.livepatch {
        info.warnings.push(
            "the file is not marked as a livepatch (no livepatch=Y in .modinfo): \
             it would be refused"
                .to_string(),
        );
    }
    if !info.objects.iter().any(|o| o.described) {
        info.warnings.push(
            "the file has no patch description (.init.klp_objects): it replaces nothing"
                .to_string(),
        );
    }
    for o in &info.objects {
        if !o.described {
            info.warnings.push(format!(
                "relocation sections name {}, which the patch description does not list: \
                 they are written only if that object is patched",
                object_words(o.object.as_deref())
            ));
        }
    }
    Ok(info)
}

/// `the program` or `library NAME`.
pub fn object_words(object: Option<&str>) -> String {
    match object {
        None => "the program".to_string(),
        Some(n) => format!("library {n}"),
    }
}

fn ordinal(n: u64) -> String {
    let suffix = match (n % 10, n % 100) {
        (_, 11..=13) => "th",
        (1, _) => "st",
        (2, _) => "nd",
        (3, _) => "rd",
        _ => "th",
    };
    format!("{n}{suffix}")
}

/// A symbol for people: demangled, with its position when the name is not unique.
fn shown(name: &str, demangled: Option<&str>, sympos: u64) -> String {
    let n = demangled.unwrap_or(name);
    if sympos == 0 {
        n.to_string()
    } else {
        format!("{n} (the {} of that name)", ordinal(sympos))
    }
}

/// [`PatchFileInfo`] as people read it (`klpctl inspect`).
pub fn render(info: &PatchFileInfo) -> String {
    let mut o = String::new();
    o.push_str(&format!("{}\n", info.file));
    o.push_str(&format!(
        "  patch       {} (from the {})\n",
        info.name, info.name_from
    ));
    o.push_str(&format!(
        "  built for   {}{}\n",
        info.machine,
        if info.big_endian { ", big-endian" } else { "" }
    ));
    o.push_str(&format!(
        "  replace     {}\n",
        if info.replace {
            "yes: enabling it replaces every patch enabled before it"
        } else {
            "no: it is added on top of the patches already enabled"
        }
    ));
    for ob in &info.objects {
        o.push_str(&format!("  in {}:\n", object_words(ob.object.as_deref())));
        if ob.functions.is_empty() {
            o.push_str("    replaces no function\n");
        }
        for f in &ob.functions {
            o.push_str(&format!(
                "    replaces {} with {}\n",
                shown(&f.old_name, f.old_name_demangled.as_deref(), f.sympos),
                demangle(&f.new_symbol).unwrap_or_else(|| f.new_symbol.clone())
            ));
        }
        for (k, sym) in ob.callbacks.set() {
            o.push_str(&format!(
                "    callback {k}: {}\n",
                demangle(sym).unwrap_or_else(|| sym.to_string())
            ));
        }
        for r in &ob.relocation_sections {
            o.push_str(&format!(
                "    relocations {} ({} {}, written into {})\n",
                r.section,
                r.entries,
                if r.entries == 1 { "entry" } else { "entries" },
                r.target
            ));
        }
        if !ob.symbols.is_empty() {
            o.push_str("    needs symbols:\n");
        }
        for s in &ob.symbols {
            let from = if s.object == PROGRAM_OBJECT {
                None
            } else {
                Some(s.object.as_str())
            };
            let elsewhere = if from == ob.object.as_deref() {
                String::new()
            } else {
                format!(" in {}", object_words(from))
            };
            o.push_str(&format!(
                "      {}{elsewhere}\n",
                shown(&s.name, s.demangled.as_deref(), s.sympos)
            ));
        }
    }
    for w in &info.warnings {
        o.push_str(&format!("  warning: {w}\n"));
    }
    o
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn demangles_rust_and_cpp() {
        assert_eq!(
            demangle("_ZN4core3fmt5write17h0123456789abcdefE").as_deref(),
            Some("core::fmt::write")
        );
        assert_eq!(
            demangle("_RNvCs1234_7mycrate3foo").as_deref(),
            Some("mycrate::foo")
        );
        assert_eq!(demangle("_ZN3foo3barEi").as_deref(), Some("foo::bar(int)"));
        assert_eq!(demangle("cmdline_proc_show"), None);
        assert_eq!(demangle("_Zgarbage"), None);
    }

    #[test]
    fn ordinals() {
        assert_eq!(ordinal(1), "1st");
        assert_eq!(ordinal(2), "2nd");
        assert_eq!(ordinal(3), "3rd");
        assert_eq!(ordinal(11), "11th");
        assert_eq!(ordinal(22), "22nd");
    }

    #[test]
    fn not_elf() {
        let e = describe(&[b'x'; 64], Path::new("/x/fix.ko")).expect_err("not ELF");
        assert_eq!(e.errno, Errno::ENOEXEC);
        assert!(e.message.contains("(-ENOEXEC)"), "{}", e.message);
        assert!(e.message.contains("not an ELF file"), "{}", e.message);
    }
}
