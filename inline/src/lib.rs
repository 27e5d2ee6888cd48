//! # klp-inline — where a function's code lives besides its own entry
//!
//! A live patch replaces a function `F` at its entry (its patch site). Where the
//! compiler *inlined* `F` into a caller `G`, `G` holds a copy of `F`'s old code and never
//! reaches the site: the fix silently does not apply there. This crate reads a linked
//! ELF file (an executable or a shared object; 64- or 32-bit, either byte order, so
//! x86_64, aarch64, ppc64le and s390x alike) and tells, for a function name:
//!
//! * [`Inlined::callers`]: every function holding an inlined copy of `F` — from DWARF:
//!   the concrete `DW_TAG_subprogram` enclosing a `DW_TAG_inlined_subroutine` whose
//!   `DW_AT_abstract_origin` (through `DW_AT_specification` / `DW_AT_abstract_origin`
//!   chains, and across units with `DW_FORM_ref_addr`) is a subprogram named `F` (its
//!   `DW_AT_linkage_name`, else its `DW_AT_name`). A copy inlined into a function that was
//!   itself inlined is reported under the function that finally holds the code. Callers
//!   are named as in the symbol table (the symbol at their entry), so a caller that is
//!   itself a clone shows as `worker.constprop.0`; `F` inlined into itself (recursion)
//!   is not reported, since its own copy is replaced;
//! * [`Inlined::clones`]: `F`'s specialised out-of-line copies — GCC's `F.constprop.N`
//!   (constant propagation), `F.isra.N` (scalar replacement of aggregates),
//!   `F.part.N` (the outlined rest of a partially inlined `F`), LLVM's
//!   `F.specialized.N` — found in the symbol table, with their callers from DWARF call
//!   sites (`DW_TAG_call_site` / `DW_TAG_GNU_call_site` naming the clone's own entry)
//!   and from the relocations `-Wl,--emit-relocs` keeps. A caller of a clone does not
//!   reach `F`'s site either: it is as stale as an inlined copy;
//! * [`Inlined::direct_calls`]: how many direct calls and tail jumps of this file
//!   reach `F`'s out-of-line copy (through the PLT included), counted from the
//!   relocations kept by `-Wl,--emit-relocs` (`SHT_RELA` sections of executable
//!   sections), when that count is complete: the assembler resolves a call to a
//!   *local* symbol in the same section without a relocation (x86_64, aarch64,
//!   ppc64le; s390x keeps one), so the count is given for global (or hidden)
//!   functions and for every function on s390x, and is `None` otherwise, or without
//!   such relocations;
//! * [`Inlined::debug_info`]: whether the DWARF describes `F` at all (as code or as the
//!   origin of an inlined copy). Without it `callers` is empty and means "unknown".
//!
//! [`warning`] turns that into one sentence for the user, e.g. `'compute' is inlined
//! into 'worker' and 'main_loop' of the program: those keep the old code; patch them
//! too (klp-convert --patch-callers) or build 'compute' with
//! __attribute__((noinline))`.
//!
//! [`Analysis::new`] reads every compilation unit once and indexes the inlined copies
//! by the name of their origin, so that each [`Analysis::inlined_into`] is a few look-ups
//! (microseconds). Malformed input never panics: it is an [`Error`]. The cost is the
//! reading of the DWARF: a 38 MB Rust test program (6.7 MB of `.debug_info`) takes
//! 0.1 s optimised, 0.6 s in a debug build; a 95 MB one (17 MB of `.debug_info`) 0.3 s
//! and 1.5 s (names are read only for the entries that need them, once each). `cargo run -p klp-inline --example inlined -- FILE FUNC…` shows what it finds
//! and the time it took.
//!
//! ## Limits
//!
//! * **Debug information is needed** for inlined copies: without `-g` only the clones
//!   (symbol names) and the direct-call count are known. Line-table-only DWARF
//!   (`-gmlt`, `-g1` in places) may lack the inlined subroutines. Split DWARF
//!   (`-gsplit-dwarf`: the code's units are in `.dwo` files), supplementary files
//!   (`dwz`, `DW_FORM_GNU_ref_alt`), separate debug files (`.gnu_debuglink`) and
//!   compressed sections (`-gz`: an [`Error::CompressedDebugInfo`]) are not read.
//! * **LTO**: inlining across units is recorded like any other, but LTO renames local
//!   functions (`F.lto_priv.0`) and may merge identical ones; a patch naming `F` does
//!   not find `F.lto_priv.0` (that is a matter of the patch's symbol, not of inlining),
//!   and such names (and ThinLTO's `F.llvm.NNNN`) are not reported as clones.
//! * **Partial inlining** (`F.part.0`): the callers hold `F`'s inlined head, so they are
//!   reported as [`Inlined::callers`], and `F.part.0` as a clone with the same callers.
//! * **Clones** are recognised by name (`F.constprop.N`, `F.isra.N`, `F.part.N`,
//!   `F.specialized.N`, and combinations such as `F.isra.0.constprop.0`); hot/cold
//!   splitting (`F.cold`) is part of `F` itself, `F.localalias` is `F`'s own entry, and
//!   neither is a clone. Callers of clones come from the call sites the DWARF of
//!   optimised code records (GCC and Clang at `-O1` and above with `-g`); without
//!   `-g`, only the calls that left a relocation are known (on s390x every call, with
//!   `--emit-relocs`).
//! * A function that was inlined everywhere and has no out-of-line copy at all has no
//!   patch site: patching it is refused before this matters.
//! * Names are compared as they are: two static functions named `F` in different units
//!   are both reported (the callers of either).

mod dwarf;
mod elf;
mod error;

pub use error::Error;

/// A function that does not reach the patched function's site.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Caller {
    /// Its name as in the symbol table (the DWARF name when no symbol is at its entry).
    pub name: String,
    /// Its address range `[start, end)` in the file (link-time addresses), when known.
    pub range: Option<(u64, u64)>,
}

/// A specialised out-of-line copy of a function (`F.constprop.0`, …).
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct FuncClone {
    /// The clone's symbol name.
    pub name: String,
    /// Its address (link-time).
    pub addr: u64,
    /// The functions that call it (found in DWARF call sites and kept relocations;
    /// empty when unknown).
    pub callers: Vec<Caller>,
}

/// What [`Analysis::inlined_into`] found for one function.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Inlined {
    /// The functions holding an inlined copy: deduplicated, sorted by name.
    pub callers: Vec<Caller>,
    /// The function's clones, sorted by name.
    pub clones: Vec<FuncClone>,
    /// Direct calls and tail jumps to the function's out-of-line copy in this file,
    /// when the file's relocations tell them all (see the crate docs).
    pub direct_calls: Option<usize>,
    /// Whether the DWARF describes the function (else `callers` means "unknown").
    pub debug_info: bool,
}

impl Inlined {
    /// The names of every function that keeps old code: the inlined callers and the
    /// clones' callers, each once, without `func` itself, in that order.
    pub fn stale_callers(&self, func: &str) -> Vec<&str> {
        let mut v: Vec<&str> = Vec::new();
        let all = self
            .callers
            .iter()
            .chain(self.clones.iter().flat_map(|c| c.callers.iter()));
        for c in all {
            if c.name != func && !v.contains(&c.name.as_str()) {
                v.push(&c.name);
            }
        }
        v
    }
}

/// One binary, analysed.
#[derive(Debug)]
pub struct Analysis {
    symbols: elf::Symbols,
    calls: elf::Calls,
    machine: u16,
    /// `None` without `.debug_info`.
    dwarf: Option<dwarf::Index>,
}

/// GCC's and LLVM's clone suffixes (the component after `F.`).
const CLONE_KINDS: &[&str] = &["constprop", "isra", "part", "specialized"];

/// Whether `name` is a clone of `func` (`func.constprop.0`, not `func.cold`).
fn is_clone_of(func: &str, name: &str) -> bool {
    let Some(rest) = name.strip_prefix(func).and_then(|r| r.strip_prefix('.')) else {
        return false;
    };
    let mut parts = rest.split('.');
    parts.next().is_some_and(|k| CLONE_KINDS.contains(&k)) && !rest.split('.').any(|p| p == "cold")
}

/// A symbol name without its cold-part suffix (`worker.cold`, `worker.cold.3`).
fn without_cold(name: &str) -> &str {
    match name.find(".cold") {
        Some(i)
            if name
                .get(i + 5..)
                .is_some_and(|r| r.is_empty() || r.starts_with('.')) =>
        {
            name.get(..i).unwrap_or(name)
        }
        _ => name,
    }
}

impl Analysis {
    /// Reads `elf`: its symbol table, its kept relocations and its DWARF (every unit,
    /// once).
    pub fn new(elf: &[u8]) -> Result<Analysis, Error> {
        let parsed = elf::parse(elf)?;
        let dwarf = if parsed
            .debug
            .get(".debug_info")
            .is_some_and(|d| !d.is_empty())
        {
            Some(dwarf::index(
                &parsed.debug,
                parsed.big_endian,
                &parsed.symbols,
            )?)
        } else {
            None
        };
        Ok(Analysis {
            symbols: parsed.symbols,
            calls: parsed.calls,
            machine: parsed.machine,
            dwarf,
        })
    }

    /// Whether the file has DWARF (`.debug_info`) at all.
    pub fn has_debug_info(&self) -> bool {
        self.dwarf.as_ref().is_some_and(|d| d.units > 0)
    }

    /// Whether the file kept the relocations of its text (`-Wl,--emit-relocs`).
    pub fn has_relocations(&self) -> bool {
        self.calls.present
    }

    /// The number of function symbols read.
    pub fn symbol_count(&self) -> usize {
        self.symbols.list.len()
    }

    /// Where `func`'s code was copied (see the crate docs).
    pub fn inlined_into(&self, func: &str) -> Inlined {
        let mut out = Inlined {
            direct_calls: self.direct_calls(func),
            ..Inlined::default()
        };
        let ix = self.dwarf.as_ref();
        let id = ix.and_then(|d| d.names.id(func));
        if let (Some(d), Some(id)) = (ix, id) {
            out.debug_info = d.described.contains(&id);
            for &f in d.inlined.get(&id).into_iter().flatten() {
                if let Some(c) = self.caller(d, f)
                    && c.name != func
                {
                    out.callers.push(c);
                }
            }
            out.callers.sort();
            out.callers.dedup();
        }

        let prefix = format!("{func}.");
        for sym in self.symbols.with_prefix(&prefix) {
            if !is_clone_of(func, &sym.name) || out.clones.iter().any(|c| c.addr == sym.addr) {
                continue;
            }
            let mut callers = Vec::new();
            // DWARF call sites naming the clone's entry.
            if let (Some(d), Some(id)) = (ix, id) {
                for &f in d.renamed.get(&id).into_iter().flatten() {
                    if d.funcs.get(f).is_some_and(|x| x.entry == sym.addr) {
                        for &c in d.called_by.get(&f).into_iter().flatten() {
                            callers.extend(self.caller(d, c));
                        }
                    }
                }
            }
            // Kept relocations.
            for &(_, site) in self.calls.to(sym.addr) {
                if let Some(s) = self.symbols.containing(site) {
                    callers.push(Caller {
                        name: without_cold(&s.name).to_string(),
                        range: Some((s.addr, s.addr.saturating_add(s.size))),
                    });
                }
            }
            callers.retain(|c| c.name != func && c.name != sym.name);
            callers.sort();
            // The same function found both ways: keep one (the one with its range).
            callers.dedup_by(|a, b| a.name == b.name && (a.range == b.range || a.range.is_none()));
            out.clones.push(FuncClone {
                name: sym.name.clone(),
                addr: sym.addr,
                callers,
            });
        }
        out.clones.sort();
        out
    }

    /// A concrete subprogram as a caller.
    fn caller(&self, d: &dwarf::Index, f: usize) -> Option<Caller> {
        let func = d.funcs.get(f)?;
        let dwarf_name = func.name.map(|n| d.names.get(n));
        let sym = self.symbols.name_at(func.entry, dwarf_name);
        let name = match (sym, dwarf_name) {
            (Some(s), _) => s.to_string(),
            (None, Some(n)) if !n.is_empty() => n.to_string(),
            _ => format!("0x{:x}", func.entry),
        };
        let range = match func.end {
            Some(end) => Some((func.entry, end)),
            None => self
                .symbols
                .at(func.entry)
                .iter()
                .find(|s| s.size > 0)
                .map(|s| (s.addr, s.addr.saturating_add(s.size))),
        };
        Some(Caller { name, range })
    }

    fn direct_calls(&self, func: &str) -> Option<usize> {
        if !self.calls.present {
            return None;
        }
        let mut addrs: Vec<u64> = Vec::new();
        for s in self.symbols.named(func) {
            if !elf::calls_all_relocated(self.machine, s) {
                return None;
            }
            addrs.push(s.addr);
        }
        if addrs.is_empty() {
            return None;
        }
        addrs.sort_unstable();
        addrs.dedup();
        Some(addrs.iter().map(|&a| self.calls.to(a).len()).sum())
    }
}

/// At most this many names in a list of a sentence.
const MAX_NAMES: usize = 6;

/// `'a'`, `'a' and 'b'`, `'a', 'b' and 'c'`, `'a', …, 'f' and 3 others`.
fn list(names: &[&str]) -> String {
    let quoted: Vec<String> = names.iter().map(|n| format!("'{n}'")).collect();
    let (shown, rest) = quoted.split_at(quoted.len().min(MAX_NAMES));
    let mut s = String::new();
    match (shown, rest.len()) {
        ([], _) => {}
        ([one], 0) => s.push_str(one),
        ([init @ .., last], 0) => {
            s.push_str(&init.join(", "));
            s.push_str(" and ");
            s.push_str(last);
        }
        (all, n) => {
            s.push_str(&all.join(", "));
            s.push_str(&format!(" and {n} other{}", if n == 1 { "" } else { "s" }));
        }
    }
    s
}

/// One sentence for the user about `func` of the object `object_label` ("the program",
/// "library 'libfoo'"), or `None` when there is nothing to say:
///
/// * inlined copies and clones: who keeps the old code, and the remedies;
/// * no debug information and no direct call at all
///   ([`Inlined::direct_calls`] `== Some(0)`): it may have been inlined everywhere.
pub fn warning(func: &str, object_label: &str, inlined: &Inlined) -> Option<String> {
    let mut callers: Vec<&str> = Vec::new();
    for c in &inlined.callers {
        if c.name != func && !callers.contains(&c.name.as_str()) {
            callers.push(&c.name);
        }
    }
    let mut parts: Vec<String> = Vec::new();
    if !callers.is_empty() {
        parts.push(format!(
            "'{func}' is inlined into {} of {object_label}",
            list(&callers)
        ));
    }
    let mut unknown = false;
    for c in &inlined.clones {
        let mut who: Vec<&str> = Vec::new();
        for k in &c.callers {
            if k.name != func && !who.contains(&k.name.as_str()) {
                who.push(&k.name);
            }
        }
        unknown |= who.is_empty();
        // Callers already named as holding an inlined copy (partial inlining: the
        // inlined head calls `F.part.0`) are not named twice.
        let new: Vec<&str> = who
            .iter()
            .copied()
            .filter(|n| !callers.contains(n))
            .collect();
        let calls = if who.is_empty() {
            "whose callers are not known".to_string()
        } else if new.is_empty() {
            "called from those copies".to_string()
        } else {
            format!("called by {}", list(&new))
        };
        parts.push(if parts.is_empty() {
            format!(
                "'{func}' has a clone '{}' in {object_label}, {calls}",
                c.name
            )
        } else {
            format!("its clone '{}' is {calls}", c.name)
        });
    }
    if parts.is_empty() {
        if !inlined.debug_info && inlined.direct_calls == Some(0) {
            return Some(format!(
                "no direct call reaches '{func}' in {object_label}: it may have been inlined everywhere, where the patch does not take effect; build with -g to see where"
            ));
        }
        return None;
    }
    let attr = if inlined.clones.is_empty() {
        "noinline"
    } else {
        "noipa"
    };
    let mut s = parts.join(", and ");
    s.push_str(&format!(
        ": those keep the old code; patch them too (klp-convert --patch-callers) or build '{func}' with __attribute__(({attr}))"
    ));
    if unknown && !inlined.debug_info {
        s.push_str(" (build with -g to see every caller)");
    }
    Some(s)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clone_names() {
        assert!(is_clone_of("compute", "compute.constprop.0"));
        assert!(is_clone_of("compute", "compute.isra.0"));
        assert!(is_clone_of("compute", "compute.part.0"));
        assert!(is_clone_of("compute", "compute.isra.0.constprop.0"));
        assert!(is_clone_of("compute", "compute.specialized.1"));
        assert!(!is_clone_of("compute", "compute.cold"));
        assert!(!is_clone_of("compute", "compute.part.0.cold"));
        assert!(!is_clone_of("compute", "compute.localalias"));
        assert!(!is_clone_of("compute", "compute.lto_priv.0"));
        assert!(!is_clone_of("compute", "computer.constprop.0"));
        assert!(!is_clone_of("compute", "compute"));
    }

    #[test]
    fn cold_parts() {
        assert_eq!(without_cold("worker.cold"), "worker");
        assert_eq!(without_cold("worker.cold.3"), "worker");
        assert_eq!(
            without_cold("worker.constprop.0.cold"),
            "worker.constprop.0"
        );
        assert_eq!(without_cold("worker.colder"), "worker.colder");
        assert_eq!(without_cold("worker"), "worker");
    }

    #[test]
    fn lists() {
        assert_eq!(list(&[]), "");
        assert_eq!(list(&["a"]), "'a'");
        assert_eq!(list(&["a", "b"]), "'a' and 'b'");
        assert_eq!(list(&["a", "b", "c"]), "'a', 'b' and 'c'");
        assert_eq!(
            list(&["a", "b", "c", "d", "e", "f", "g"]),
            "'a', 'b', 'c', 'd', 'e', 'f' and 1 other"
        );
    }
}
