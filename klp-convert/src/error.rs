//! The errors of a conversion: one variant per way an input can be refused.
//!
//! Every message is a sentence for a person: it names the file, the symbol or the
//! section, and where a choice is needed it lists the candidates and says how to choose.

use std::fmt;

/// The binding of a target symbol, as the candidate lists show it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Bind {
    /// `STB_LOCAL`: a static function or variable (lowercase type in a symbol map).
    Local,
    /// `STB_GLOBAL` (uppercase type in a symbol map).
    Global,
    /// `STB_WEAK` (`W`/`V` in a symbol map).
    Weak,
}

/// The visibility of a target symbol (`st_other & 3`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Visibility {
    /// `STV_DEFAULT`.
    Default,
    /// `STV_INTERNAL`.
    Internal,
    /// `STV_HIDDEN`.
    Hidden,
    /// `STV_PROTECTED`.
    Protected,
}

/// What a target symbol names.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// `STT_FUNC`, `STT_GNU_IFUNC`, or a text symbol (`t`/`T`) of a symbol map.
    Function,
    /// `STT_OBJECT`, `STT_COMMON`, `STT_TLS`, or a data symbol of a symbol map.
    Data,
    /// `STT_NOTYPE` or any other symbol-map type.
    Other,
}

/// One definition of a symbol in a target object, as shown in error messages.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Candidate {
    /// The object name (`vmlinux` or a module name).
    pub object: String,
    /// The 1-based position among the object's symbols of this name, in table order.
    pub sympos: u64,
    /// `st_value` (a link-time address, or a section offset in a relocatable target).
    pub address: u64,
    /// Binding.
    pub bind: Bind,
    /// Visibility.
    pub visibility: Visibility,
    /// What it names.
    pub kind: Kind,
    /// The source file of a local symbol, from the `STT_FILE` symbol before it.
    pub file: Option<String>,
}

impl fmt::Display for Candidate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let bind = match self.bind {
            Bind::Local => "local",
            Bind::Global => "global",
            Bind::Weak => "weak",
        };
        let vis = match self.visibility {
            Visibility::Default => "",
            Visibility::Internal => " internal",
            Visibility::Hidden => " hidden",
            Visibility::Protected => " protected",
        };
        let kind = match self.kind {
            Kind::Function => "function",
            Kind::Data => "variable",
            Kind::Other => "symbol",
        };
        write!(
            f,
            "object {}, sympos {}, address {:#x}, {bind}{vis} {kind}",
            self.object, self.sympos, self.address
        )?;
        match &self.file {
            Some(file) => write!(f, ", source file {file}"),
            None => write!(f, ", source file unknown"),
        }
    }
}

/// Why a conversion was refused.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Error {
    /// A file could not be read.
    Io {
        /// The path.
        path: String,
        /// The operating system's message.
        reason: String,
    },
    /// An ELF file is truncated or malformed.
    Malformed {
        /// The file (path or label).
        file: String,
        /// What is wrong, as the ELF reader found it.
        reason: String,
    },
    /// The patch object is not `ET_REL`.
    NotRelocatable {
        /// The file.
        file: String,
        /// Its `e_type`.
        e_type: u16,
    },
    /// An ELF file is for a machine (or class, or ABI) klp does not support.
    UnsupportedMachine {
        /// The file.
        file: String,
        /// A description of what it is for.
        machine: String,
    },
    /// The byte order does not match the machine (e.g. a big-endian aarch64 file).
    ByteOrder {
        /// The file.
        file: String,
        /// The machine.
        machine: String,
        /// The byte order the file has.
        found: &'static str,
    },
    /// A target is for another architecture than the patch.
    ArchMismatch {
        /// The target's object name.
        object: String,
        /// The target's file.
        file: String,
        /// The patch's architecture.
        patch: String,
        /// The target's architecture.
        target: String,
    },
    /// An ELF file has no symbol table.
    NoSymbols {
        /// The file.
        file: String,
    },
    /// A line of a symbol map does not parse.
    SymbolMap {
        /// The file.
        file: String,
        /// The 1-based line number.
        line: usize,
        /// What is wrong.
        reason: String,
    },
    /// A `--target` argument does not parse or names no object.
    TargetArgument {
        /// The argument.
        arg: String,
        /// What is wrong.
        reason: String,
    },
    /// An object name does not satisfy the livepatch format (1-55 characters, no `.`).
    ObjectName {
        /// The name.
        name: String,
        /// What is wrong.
        reason: &'static str,
    },
    /// `--patch-callers` could not complete the description (see [`crate::callers`]).
    Callers {
        /// The object whose callers were looked for.
        object: String,
        /// Why.
        reason: String,
    },
    /// Two targets give the same object name.
    DuplicateObject {
        /// The name.
        name: String,
    },
    /// The manifest does not parse or names something that does not exist.
    Manifest {
        /// What is wrong.
        reason: String,
    },
    /// An undefined symbol of the patch is defined by no target.
    NotFound {
        /// The symbol.
        symbol: String,
        /// The objects searched.
        searched: Vec<String>,
    },
    /// The manifest chose an object for a symbol, and the symbol is not there.
    NotInObject {
        /// The symbol.
        symbol: String,
        /// The object the manifest chose.
        object: String,
        /// Definitions in other objects.
        elsewhere: Vec<Candidate>,
    },
    /// A symbol is defined by several target objects.
    AmbiguousObjects {
        /// The symbol.
        symbol: String,
        /// Every definition.
        candidates: Vec<Candidate>,
    },
    /// A symbol name occurs several times in one object and nothing chooses one.
    AmbiguousInObject {
        /// The symbol.
        symbol: String,
        /// The object.
        object: String,
        /// The definitions that remain to choose from.
        candidates: Vec<Candidate>,
    },
    /// The manifest's source file matches none of the definitions.
    NoSuchFile {
        /// The symbol.
        symbol: String,
        /// The file the manifest named.
        file: String,
        /// Every definition in the object.
        candidates: Vec<Candidate>,
    },
    /// The manifest's sympos is beyond the definitions, or disagrees with its file.
    BadSympos {
        /// The symbol.
        symbol: String,
        /// The position the manifest gave.
        sympos: u64,
        /// What is wrong.
        reason: String,
        /// Every definition in the object.
        candidates: Vec<Candidate>,
    },
    /// A symbol to convert cannot be written as a livepatch symbol name.
    SymbolName {
        /// The symbol.
        symbol: String,
        /// What is wrong.
        reason: &'static str,
    },
    /// A relocation section that refers to a symbol to convert has a layout this
    /// tool cannot rewrite.
    RelocationSection {
        /// The section.
        section: String,
        /// What is wrong.
        reason: String,
    },
    /// A symbol to convert is relocated in a section that is not loaded (no
    /// `SHF_ALLOC`), where the livepatch core cannot write it.
    NotLoaded {
        /// The symbol.
        symbol: String,
        /// The relocated section.
        section: String,
    },
    /// A relocation against a symbol to convert has a type the livepatch core of
    /// the architecture cannot write.
    UnsupportedRelocation {
        /// The architecture.
        arch: &'static str,
        /// `r_type`.
        r_type: u32,
        /// Its psABI name, when known.
        type_name: Option<&'static str>,
        /// The relocated section.
        section: String,
        /// `r_offset`.
        offset: u64,
        /// The symbol.
        symbol: String,
    },
    /// The input's `.modinfo` says `livepatch=` something other than `Y`.
    Modinfo {
        /// The entry found.
        entry: String,
    },
    /// The output could not be laid out (offsets beyond the ELF class).
    Layout {
        /// What overflowed.
        reason: String,
    },
    /// The manifest asks for a patch description and the input has one already.
    DescriptionExists {
        /// The patch file.
        file: String,
        /// The section found.
        section: String,
    },
    /// A function the description names (a replacement or a callback) is not a
    /// function defined in the patch object.
    PatchFunction {
        /// What the function is for, e.g. "the replacement of 'foo' in vmlinux".
        role: String,
        /// The function's name.
        function: String,
        /// What is wrong.
        reason: String,
    },
    /// A function to be replaced is not defined in its object (a given target).
    UnknownOldFunction {
        /// The object.
        object: String,
        /// The function.
        function: String,
        /// The table searched ("`.symtab` of PATH").
        searched: String,
        /// Definitions of the name in other targets.
        elsewhere: Vec<Candidate>,
    },
    /// A function to be replaced occurs several times in its object and its sympos
    /// is 0 ("the unique one").
    AmbiguousOldFunction {
        /// The object.
        object: String,
        /// The function.
        function: String,
        /// Every definition in the object.
        candidates: Vec<Candidate>,
    },
    /// A function to be replaced has a sympos beyond its definitions.
    BadOldSympos {
        /// The object.
        object: String,
        /// The function.
        function: String,
        /// The sympos of the manifest.
        sympos: u64,
        /// Every definition in the object.
        candidates: Vec<Candidate>,
    },
    /// The definition a function to be replaced names is a variable.
    OldNotAFunction {
        /// The function.
        function: String,
        /// The definition.
        candidate: Candidate,
    },
    /// An object has two callbacks of one kind.
    DuplicateCallback {
        /// The object.
        object: String,
        /// The kind (`pre_patch`, …).
        kind: &'static str,
        /// The first function and where it was found.
        first: String,
        /// The second function and where it was found.
        second: String,
    },
    /// A function named like a callback is for an object the description does not
    /// list.
    CallbackObject {
        /// The function.
        function: String,
        /// The kind (`pre_patch`, …).
        kind: &'static str,
        /// The object its name gives.
        object: String,
    },
    /// An object of the description has neither functions nor callbacks.
    EmptyObject {
        /// The object.
        object: String,
    },
    /// Adding the description's section symbols renumbers the global symbols, and
    /// a section refers to symbols in a way klp-convert cannot renumber.
    Renumber {
        /// The section.
        section: String,
        /// What is wrong.
        reason: String,
    },
    /// The input's `.modinfo` says something else about atomic replace than the
    /// manifest.
    ModinfoReplace {
        /// The entry found.
        entry: String,
        /// The manifest's `replace`.
        replace: bool,
    },
    /// A GOT-relative relocation against a converted symbol, of a type klp-convert
    /// relaxes, on an instruction the relaxation rules do not cover (see
    /// [`crate::relax`]).
    Relaxation {
        /// The architecture.
        arch: &'static str,
        /// `r_type`.
        r_type: u32,
        /// Its psABI name, when known.
        type_name: Option<&'static str>,
        /// The relocated section.
        section: String,
        /// `r_offset`.
        offset: u64,
        /// The symbol.
        symbol: String,
        /// Which instructions the relaxation rewrites, and what was found instead.
        reason: String,
    },
    /// The input has a `.note.klp.build-id` section already, and klp-convert would
    /// write one.
    BuildIdExists {
        /// The patch file.
        file: String,
    },
    /// The output could not be signed (`--sign`); the message is the signer's.
    Signing {
        /// The sentence.
        message: String,
    },
}

fn list(f: &mut fmt::Formatter<'_>, candidates: &[Candidate]) -> fmt::Result {
    for c in candidates {
        write!(f, "\n  - {c}")?;
    }
    Ok(())
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::Io { path, reason } => write!(f, "cannot read {path}: {reason}."),
            Error::Malformed { file, reason } => write!(
                f,
                "{file} is not a well-formed ELF file (truncated or damaged?): {reason}."
            ),
            Error::NotRelocatable { file, e_type } => write!(
                f,
                "{file} is not a relocatable object (ELF type {e_type}, expected ET_REL = 1): \
                 give the patch as it comes out of the compiler (a .o or .ko)."
            ),
            Error::UnsupportedMachine { file, machine } => write!(
                f,
                "{file} is for {machine}; klp-convert handles 64-bit x86_64, aarch64 \
                 (little-endian), ppc64le (ELFv2) and s390x."
            ),
            Error::ByteOrder {
                file,
                machine,
                found,
            } => write!(
                f,
                "{file} is a {found} {machine} file; klp supports {machine} only in its \
                 {} byte order.",
                if *found == "big-endian" {
                    "little-endian"
                } else {
                    "big-endian"
                }
            ),
            Error::ArchMismatch {
                object,
                file,
                patch,
                target,
            } => write!(
                f,
                "target {object} ({file}) is built for {target}, but the patch is built for \
                 {patch}: give the binaries of the system the patch is for."
            ),
            Error::NoSymbols { file } => write!(
                f,
                "{file} has neither a .symtab nor a .dynsym symbol table, so its symbols \
                 cannot be found (was it stripped?)."
            ),
            Error::SymbolMap { file, line, reason } => write!(
                f,
                "{file} is neither an ELF file nor a System.map-style symbol list \
                 (\"ADDRESS TYPE NAME\" lines): line {line}: {reason}."
            ),
            Error::TargetArgument { arg, reason } => {
                write!(f, "cannot use the target \"{arg}\": {reason}.")
            }
            Error::ObjectName { name, reason } => write!(
                f,
                "\"{name}\" cannot be a livepatch object name: {reason} (an object name is \
                 1 to 55 characters without '.')."
            ),
            Error::Callers { object, reason } => {
                write!(f, "--patch-callers for {object}: {reason}.")
            }
            Error::DuplicateObject { name } => {
                write!(f, "two targets are named {name}: give each object once.")
            }
            Error::Manifest { reason } => write!(f, "the manifest is not usable: {reason}."),
            Error::NotFound { symbol, searched } => write!(
                f,
                "symbol '{symbol}' is used by the patch but defined by none of the targets \
                 ({}): add the object that defines it with --target, or list it under \
                 \"keep\" in the manifest if the loader provides it.",
                if searched.is_empty() {
                    "no target was given".to_string()
                } else {
                    format!("searched {}", searched.join(", "))
                }
            ),
            Error::NotInObject {
                symbol,
                object,
                elsewhere,
            } => {
                write!(
                    f,
                    "the manifest says symbol '{symbol}' is in {object}, but {object} does \
                     not define it."
                )?;
                if !elsewhere.is_empty() {
                    write!(f, " It is defined here:")?;
                    list(f, elsewhere)?;
                }
                Ok(())
            }
            Error::AmbiguousObjects { symbol, candidates } => {
                write!(
                    f,
                    "symbol '{symbol}' is defined in several objects; choose one in the \
                     manifest, e.g. {{\"symbols\": {{\"{symbol}\": {{\"object\": \"{}\"}}}}}}. \
                     Candidates:",
                    candidates.first().map_or("vmlinux", |c| c.object.as_str())
                )?;
                list(f, candidates)
            }
            Error::AmbiguousInObject {
                symbol,
                object,
                candidates,
            } => {
                write!(
                    f,
                    "symbol '{symbol}' occurs {} times in {object} and the patch does not say \
                     which one it means; choose one in the manifest by position, e.g. \
                     {{\"symbols\": {{\"{symbol}\": {{\"sympos\": {}}}}}}}, or by source file, \
                     e.g. {{\"symbols\": {{\"{symbol}\": {{\"file\": \"{}\"}}}}}}. Candidates:",
                    candidates.len(),
                    candidates.first().map_or(1, |c| c.sympos),
                    candidates
                        .iter()
                        .find_map(|c| c.file.as_deref())
                        .unwrap_or("name.c")
                )?;
                list(f, candidates)
            }
            Error::NoSuchFile {
                symbol,
                file,
                candidates,
            } => {
                write!(
                    f,
                    "the manifest chooses symbol '{symbol}' from source file {file}, but no \
                     definition comes from that file. Candidates:"
                )?;
                list(f, candidates)
            }
            Error::BadSympos {
                symbol,
                sympos,
                reason,
                candidates,
            } => {
                write!(
                    f,
                    "the manifest gives sympos {sympos} for symbol '{symbol}', but {reason}. \
                     Candidates:"
                )?;
                list(f, candidates)
            }
            Error::SymbolName { symbol, reason } => write!(
                f,
                "symbol '{symbol}' cannot become a livepatch symbol: {reason}."
            ),
            Error::RelocationSection { section, reason } => write!(
                f,
                "relocation section {section} cannot be rewritten: {reason}."
            ),
            Error::NotLoaded { symbol, section } => write!(
                f,
                "symbol '{symbol}' must become a livepatch symbol, but it is relocated in \
                 section {section}, which is not loaded (no SHF_ALLOC), so the livepatch \
                 core could never write it; build the patch without that section (e.g. \
                 without debug information) or keep the symbol."
            ),
            Error::UnsupportedRelocation {
                arch,
                r_type,
                type_name,
                section,
                offset,
                symbol,
            } => write!(
                f,
                "the relocation at {section}+{offset:#x} against symbol '{symbol}' has type \
                 {r_type}{}, which the livepatch core cannot write on {arch} (nor can the \
                 kernel's module loader); build the patch without position-independent code \
                 (gcc -fno-pic, rustc -C relocation-model=static) so that it uses direct \
                 relocations.",
                type_name.map(|n| format!(" ({n})")).unwrap_or_default()
            ),
            Error::Modinfo { entry } => write!(
                f,
                "the patch's .modinfo already has the entry \"{entry}\"; a livepatch module \
                 needs livepatch=Y."
            ),
            Error::Layout { reason } => write!(f, "the output cannot be laid out: {reason}."),
            Error::DescriptionExists { file, section } => write!(
                f,
                "{file} already has a patch description ({section}), and the manifest's \
                 \"patch\" asks for another; a patch has one description: leave \"patch\" out \
                 of the manifest to keep the one there, or convert the object built without it."
            ),
            Error::PatchFunction {
                role,
                function,
                reason,
            } => write!(
                f,
                "'{function}', {role}, must be a function defined in the patch object, but \
                 {reason}."
            ),
            Error::UnknownOldFunction {
                object,
                function,
                searched,
                elsewhere,
            } => {
                write!(
                    f,
                    "the manifest's \"patch\" replaces '{function}' in {object}, but {object} \
                     does not define it (searched {searched}); check the name and the object."
                )?;
                if !elsewhere.is_empty() {
                    write!(f, " It is defined here:")?;
                    list(f, elsewhere)?;
                }
                Ok(())
            }
            Error::AmbiguousOldFunction {
                object,
                function,
                candidates,
            } => {
                write!(
                    f,
                    "the manifest's \"patch\" replaces '{function}' in {object} with sympos 0 \
                     (\"the unique one\"), but {object} defines it {} times, and the kernel \
                     would refuse the patch; give the function's \"sympos\", e.g. {{\"old\": \
                     \"{function}\", \"sympos\": {}, ...}}. Candidates:",
                    candidates.len(),
                    candidates.first().map_or(1, |c| c.sympos)
                )?;
                list(f, candidates)
            }
            Error::BadOldSympos {
                object,
                function,
                sympos,
                candidates,
            } => {
                write!(
                    f,
                    "the manifest's \"patch\" replaces '{function}' in {object} with sympos \
                     {sympos}, but {object} defines it only {} time(s). Candidates:",
                    candidates.len()
                )?;
                list(f, candidates)
            }
            Error::OldNotAFunction {
                function,
                candidate,
            } => write!(
                f,
                "the manifest's \"patch\" replaces '{function}', but the definition it names \
                 is a variable, which a livepatch cannot replace: {candidate}."
            ),
            Error::DuplicateCallback {
                object,
                kind,
                first,
                second,
            } => write!(
                f,
                "object {object} has two {kind} callbacks, {first} and {second}; an object \
                 has at most one callback of each kind: remove one (or rename the function \
                 whose name makes it a callback)."
            ),
            Error::CallbackObject {
                function,
                kind,
                object,
            } => write!(
                f,
                "function '{function}' is named as the {kind} callback of object \"{object}\", \
                 which the manifest's \"patch\" does not list; add the object, or rename the \
                 function."
            ),
            Error::EmptyObject { object } => write!(
                f,
                "the manifest's \"patch\" lists object {object} with neither functions nor \
                 callbacks; give it its functions or leave it out."
            ),
            Error::Renumber { section, reason } => write!(
                f,
                "the patch description's section symbols need the global symbols renumbered, \
                 and section {section} cannot be rewritten for that: {reason}."
            ),
            Error::ModinfoReplace { entry, replace } => write!(
                f,
                "the patch's .modinfo has the entry \"{entry}\", and the manifest's \"patch\" \
                 says \"replace\": {replace}; make them agree."
            ),
            Error::Relaxation {
                arch,
                r_type,
                type_name,
                section,
                offset,
                symbol,
                reason,
            } => write!(
                f,
                "the relocation at {section}+{offset:#x} against symbol '{symbol}' has type \
                 {r_type}{}, a reference through the GOT, which the livepatch core cannot write \
                 on {arch}; klp-convert rewrites it into a direct reference, as a linker \
                 relaxes it, only {reason}; build the patch without position-independent code \
                 (gcc -fno-pic, rustc -C relocation-model=static).",
                type_name.map(|n| format!(" ({n})")).unwrap_or_default()
            ),
            Error::BuildIdExists { file } => write!(
                f,
                "{file} already has a .note.klp.build-id section (it was converted before?), \
                 and klp-convert would write the build ids of the targets; convert the object \
                 the compiler wrote, or keep the notes there with --no-build-id."
            ),
            Error::Signing { message } => write!(f, "cannot sign the output: {message}."),
        }
    }
}

impl std::error::Error for Error {}
