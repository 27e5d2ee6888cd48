//! The DWARF side: one pass over every compilation unit, which records
//!
//! * every `DW_TAG_subprogram` entry's name, linkage name and the entry it refers to
//!   (`DW_AT_specification` / `DW_AT_abstract_origin`), to name the origin of what
//!   refers to it;
//! * every concrete subprogram (one with code: `DW_AT_low_pc` or `DW_AT_ranges`);
//! * every `DW_TAG_inlined_subroutine` with its origin and the concrete subprogram that
//!   holds it (the nearest enclosing one: nested inlining is attributed to the
//!   function that holds the code);
//! * every call site (`DW_TAG_call_site`, `DW_TAG_GNU_call_site`) whose callee is a
//!   concrete subprogram (calls of clones such as `f.constprop.0` name the clone's
//!   own entry).
//!
//! The references are resolved once every unit is read (`DW_FORM_ref_addr` may point
//! into a later unit), into indexes by name.

use std::collections::{HashMap, HashSet};

use gimli::{AttributeValue, EndianSlice, RunTimeEndian, UnitType, constants};

use crate::Error;
use crate::elf::Symbols;

type R<'d> = EndianSlice<'d, RunTimeEndian>;

/// The longest `DW_AT_specification` / `DW_AT_abstract_origin` chain followed.
const MAX_CHAIN: usize = 16;
/// The most range-list entries read for one subprogram.
const MAX_RANGES: usize = 1024;

/// Interned names.
#[derive(Debug, Default)]
pub(crate) struct Names {
    ids: HashMap<Box<str>, usize>,
    list: Vec<Box<str>>,
}

impl Names {
    fn intern(&mut self, s: &[u8]) -> usize {
        let s = String::from_utf8_lossy(s);
        if let Some(&id) = self.ids.get(s.as_ref()) {
            return id;
        }
        let id = self.list.len();
        let b: Box<str> = s.into();
        self.list.push(b.clone());
        self.ids.insert(b, id);
        id
    }

    pub(crate) fn id(&self, s: &str) -> Option<usize> {
        self.ids.get(s).copied()
    }

    pub(crate) fn get(&self, id: usize) -> &str {
        self.list.get(id).map_or("", |s| s)
    }
}

/// A concrete subprogram: code of one function.
#[derive(Clone, Debug)]
pub(crate) struct Func {
    /// Its entry: the start of its first range that a function symbol names, else of
    /// its first range.
    pub(crate) entry: u64,
    /// The range that starts at `entry`, when its end is known.
    pub(crate) end: Option<u64>,
    /// Its name in DWARF (linkage name, else name, through its origins).
    pub(crate) name: Option<usize>,
}

/// What the DWARF says, indexed.
#[derive(Debug, Default)]
pub(crate) struct Index {
    pub(crate) names: Names,
    pub(crate) funcs: Vec<Func>,
    /// Origin name → the concrete subprograms holding an inlined copy (repeated once
    /// per copy).
    pub(crate) inlined: HashMap<usize, Vec<usize>>,
    /// DWARF name → its concrete subprograms whose symbol has another name (the clones
    /// `f.constprop.0`, `f.isra.0`, `f.part.0`, …).
    pub(crate) renamed: HashMap<usize, Vec<usize>>,
    /// Concrete subprogram of `renamed` → the concrete subprograms whose call sites
    /// name it.
    pub(crate) called_by: HashMap<usize, Vec<usize>>,
    /// The names of functions the DWARF describes with code: concrete subprograms and
    /// origins of inlined copies.
    pub(crate) described: HashSet<usize>,
    /// Compilation units read.
    pub(crate) units: usize,
}

/// A `DW_TAG_subprogram` entry's naming facts.
#[derive(Clone, Copy, Debug, Default)]
struct DieNames {
    name: Option<usize>,
    linkage: Option<usize>,
    link: Option<u64>,
}

#[derive(Default)]
struct Builder {
    names: Names,
    /// By offset in `.debug_info` (entries are read in that order).
    dies: Vec<(u64, DieNames)>,
    /// Per func: its entry's offset in `.debug_info` (in that order).
    func_dies: Vec<u64>,
    funcs: Vec<Func>,
    /// (origin entry, func)
    inlined: Vec<(u64, usize)>,
    /// (callee entry, func)
    calls: Vec<(u64, usize)>,
    units: usize,
}

/// Reads every unit of `sections` (by name; missing ones are empty).
pub(crate) fn index(
    sections: &HashMap<&str, &[u8]>,
    big_endian: bool,
    symbols: &Symbols,
) -> Result<Index, Error> {
    let endian = if big_endian {
        RunTimeEndian::Big
    } else {
        RunTimeEndian::Little
    };
    let load = |id: gimli::SectionId| -> Result<R<'_>, Error> {
        let data = sections.get(id.name()).copied().unwrap_or(&[]);
        Ok(EndianSlice::new(data, endian))
    };
    let dwarf = gimli::Dwarf::load(load)?;
    let mut b = Builder::default();
    let mut headers = dwarf.units();
    let mut at = 0u64;
    loop {
        let header = match headers.next() {
            Ok(Some(h)) => h,
            Ok(None) => break,
            Err(error) => return Err(Error::Dwarf { offset: at, error }),
        };
        at = header.offset().0 as u64;
        // Type units hold no code; split units' code is described in .dwo files.
        if !matches!(header.type_(), UnitType::Compilation | UnitType::Partial) {
            continue;
        }
        let unit = dwarf
            .unit(header)
            .map_err(|error| Error::Dwarf { offset: at, error })?;
        b.units += 1;
        walk(&dwarf, &unit, symbols, &mut b)?;
    }
    Ok(b.finish(symbols))
}

/// A reference attribute as an offset in `.debug_info`.
fn reference(unit: &gimli::Unit<R<'_>>, v: AttributeValue<R<'_>>) -> Option<u64> {
    match v {
        AttributeValue::UnitRef(o) => o.to_debug_info_offset(&unit.header).map(|o| o.0 as u64),
        AttributeValue::DebugInfoRef(o) => Some(o.0 as u64),
        _ => None,
    }
}

/// Whether `addr` is where the link editor put a function it discarded (`0`, `1` in
/// range lists, lld's `-1`/`-2`), unless a symbol is there.
fn discarded(addr: u64, symbols: &Symbols) -> bool {
    (addr <= 1 || addr >= u64::MAX - 1) && symbols.at(addr).is_empty()
}

fn walk(
    dwarf: &gimli::Dwarf<R<'_>>,
    unit: &gimli::Unit<R<'_>>,
    symbols: &Symbols,
    b: &mut Builder,
) -> Result<(), Error> {
    let base = unit.header.offset().0 as u64;
    let mut entries = unit
        .header
        .entries_raw(&unit.abbreviations, None)
        .map_err(|error| Error::Dwarf {
            offset: base,
            error,
        })?;
    // (depth, the concrete subprogram of that depth or None for an abstract one)
    let mut stack: Vec<(isize, Option<usize>)> = Vec::new();
    let mut attrs = Vec::new();
    while !entries.is_empty() {
        let depth = entries.next_depth();
        let offset = base.saturating_add(entries.next_offset().0 as u64);
        let bad = |error| Error::Dwarf { offset, error };
        let Some(abbrev) = entries.read_abbreviation().map_err(bad)? else {
            continue;
        };
        let tag = abbrev.tag();
        let wanted = matches!(
            tag,
            constants::DW_TAG_subprogram
                | constants::DW_TAG_inlined_subroutine
                | constants::DW_TAG_call_site
                | constants::DW_TAG_GNU_call_site
        );
        if !wanted {
            entries.skip_attributes(abbrev.attributes()).map_err(bad)?;
            continue;
        }
        entries
            .read_attributes(abbrev.attributes(), &mut attrs)
            .map_err(bad)?;
        while stack.last().is_some_and(|&(d, _)| d >= depth) {
            stack.pop();
        }
        let enclosing = stack.last().and_then(|&(_, f)| f);
        match tag {
            constants::DW_TAG_subprogram => {
                let f = subprogram(dwarf, unit, symbols, b, offset, &attrs);
                if abbrev.has_children() {
                    stack.push((depth, f));
                }
            }
            constants::DW_TAG_inlined_subroutine => {
                let origin = attrs
                    .iter()
                    .find(|a| a.name() == constants::DW_AT_abstract_origin)
                    .and_then(|a| reference(unit, a.value()));
                if let (Some(o), Some(f)) = (origin, enclosing) {
                    b.inlined.push((o, f));
                }
            }
            _ => {
                let callee = attrs
                    .iter()
                    .find(|a| {
                        a.name() == constants::DW_AT_call_origin
                            || a.name() == constants::DW_AT_abstract_origin
                    })
                    .and_then(|a| reference(unit, a.value()));
                if let (Some(c), Some(f)) = (callee, enclosing) {
                    b.calls.push((c, f));
                }
            }
        }
    }
    Ok(())
}

/// Records a subprogram entry; its func if it is concrete.
fn subprogram(
    dwarf: &gimli::Dwarf<R<'_>>,
    unit: &gimli::Unit<R<'_>>,
    symbols: &Symbols,
    b: &mut Builder,
    offset: u64,
    attrs: &[gimli::Attribute<R<'_>>],
) -> Option<usize> {
    let mut names = DieNames::default();
    let (mut low, mut high, mut size) = (None, None, None);
    let mut ranges: Vec<(u64, u64)> = Vec::new();
    let mut declaration = false;
    let string = |b: &mut Builder, v| {
        let s = dwarf.attr_string(unit, v).ok()?;
        Some(b.names.intern(s.slice()))
    };
    for a in attrs {
        match a.name() {
            constants::DW_AT_name => names.name = string(b, a.value()),
            constants::DW_AT_linkage_name | constants::DW_AT_MIPS_linkage_name => {
                names.linkage = string(b, a.value());
            }
            constants::DW_AT_specification | constants::DW_AT_abstract_origin => {
                names.link = reference(unit, a.value()).or(names.link);
            }
            constants::DW_AT_declaration => {
                declaration = matches!(a.value(), AttributeValue::Flag(true));
            }
            constants::DW_AT_low_pc => low = dwarf.attr_address(unit, a.value()).ok().flatten(),
            constants::DW_AT_high_pc => match a.value() {
                AttributeValue::Udata(n) => size = Some(n),
                v => high = dwarf.attr_address(unit, v).ok().flatten(),
            },
            constants::DW_AT_ranges => {
                if let Ok(Some(mut list)) = dwarf.attr_ranges(unit, a.value()) {
                    while let Ok(Some(r)) = list.next() {
                        if r.begin < r.end {
                            ranges.push((r.begin, r.end));
                        }
                        if ranges.len() >= MAX_RANGES {
                            break;
                        }
                    }
                }
            }
            _ => {}
        }
    }
    b.dies.push((offset, names));
    if declaration {
        return None;
    }
    if let Some(low) = low {
        let end = size.and_then(|s| low.checked_add(s)).or(high);
        ranges.insert(0, (low, end.unwrap_or(low)));
    }
    ranges.retain(|&(begin, _)| !discarded(begin, symbols));
    let &(entry, end) = ranges
        .iter()
        .find(|r| !symbols.at(r.0).is_empty())
        .or_else(|| ranges.first())?;
    let f = b.funcs.len();
    b.funcs.push(Func {
        entry,
        end: (end > entry).then_some(end),
        name: None,
    });
    b.func_dies.push(offset);
    Some(f)
}

impl Builder {
    /// The name of the subprogram entry at `offset`: the first linkage name along its
    /// `DW_AT_specification` / `DW_AT_abstract_origin` chain, else the first name.
    fn resolve(&self, mut offset: u64) -> Option<usize> {
        let mut name = None;
        for _ in 0..MAX_CHAIN {
            let Ok(i) = self.dies.binary_search_by_key(&offset, |d| d.0) else {
                break;
            };
            let Some((_, d)) = self.dies.get(i) else {
                break;
            };
            if d.linkage.is_some() {
                return d.linkage;
            }
            name = name.or(d.name);
            match d.link {
                Some(next) => offset = next,
                None => break,
            }
        }
        name
    }

    fn finish(mut self, symbols: &Symbols) -> Index {
        // `dies` and `func_dies` are sorted: entries are read in the order of their
        // offsets (units one after the other, each unit's entries in order).
        let mut ix = Index {
            units: self.units,
            ..Index::default()
        };
        let names: Vec<Option<usize>> = self.func_dies.iter().map(|&o| self.resolve(o)).collect();
        for (f, name) in self.funcs.iter_mut().zip(names) {
            f.name = name;
        }
        for (i, f) in self.funcs.iter().enumerate() {
            let Some(n) = f.name else {
                continue;
            };
            ix.described.insert(n);
            let dwarf_name = self.names.get(n);
            if let Some(sym) = symbols.name_at(f.entry, Some(dwarf_name))
                && sym != dwarf_name
            {
                ix.renamed.entry(n).or_default().push(i);
            }
        }
        let renamed: HashSet<usize> = ix.renamed.values().flatten().copied().collect();
        for &(origin, f) in &self.inlined {
            if let Some(n) = self.resolve(origin) {
                ix.inlined.entry(n).or_default().push(f);
                ix.described.insert(n);
            }
        }
        for &(callee, f) in &self.calls {
            if let Ok(c) = self.func_dies.binary_search(&callee)
                && renamed.contains(&c)
            {
                ix.called_by.entry(c).or_default().push(f);
            }
        }
        ix.names = std::mem::take(&mut self.names);
        ix.funcs = std::mem::take(&mut self.funcs);
        ix
    }
}

impl From<gimli::Error> for Error {
    fn from(error: gimli::Error) -> Self {
        Error::Dwarf { offset: 0, error }
    }
}
