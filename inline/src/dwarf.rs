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

/// A `DW_TAG_subprogram` entry's naming facts. The names are read when needed (most
/// entries' never are): a string attribute in a form that needs no unit to be read
/// (`DW_FORM_strx*` is turned into `DW_FORM_strp` when the entry is read).
#[derive(Clone, Copy, Debug, Default)]
struct DieNames<'d> {
    name: Option<AttributeValue<R<'d>>>,
    linkage: Option<AttributeValue<R<'d>>>,
    link: Option<u64>,
}

#[derive(Default)]
struct Builder<'d> {
    /// By offset in `.debug_info`: entries are read in that order (units one after the
    /// other, each unit's entries in order), so this is sorted.
    dies: Vec<(u64, DieNames<'d>)>,
    /// Per func: its entry's offset in `.debug_info` (sorted likewise).
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
    Ok(b.finish(&dwarf, symbols))
}

/// A reference attribute as an offset in `.debug_info`.
fn reference(unit: &gimli::Unit<R<'_>>, v: AttributeValue<R<'_>>) -> Option<u64> {
    match v {
        AttributeValue::UnitRef(o) => o.to_debug_info_offset(&unit.header).map(|o| o.0 as u64),
        AttributeValue::DebugInfoRef(o) => Some(o.0 as u64),
        _ => None,
    }
}

/// A string attribute in a form that can be read without its unit.
fn string_ref<'d>(
    dwarf: &gimli::Dwarf<R<'d>>,
    unit: &gimli::Unit<R<'d>>,
    v: AttributeValue<R<'d>>,
) -> Option<AttributeValue<R<'d>>> {
    match v {
        AttributeValue::String(_)
        | AttributeValue::DebugStrRef(_)
        | AttributeValue::DebugLineStrRef(_) => Some(v),
        AttributeValue::DebugStrOffsetsIndex(i) => dwarf
            .string_offset(unit, i)
            .ok()
            .map(AttributeValue::DebugStrRef),
        _ => None,
    }
}

/// Whether `addr` is where the link editor put a function it discarded (`0`, `1` in
/// range lists, lld's `-1`/`-2`), unless a symbol is there.
fn discarded(addr: u64, symbols: &Symbols) -> bool {
    (addr <= 1 || addr >= u64::MAX - 1) && symbols.at(addr).is_empty()
}

/// What a subprogram entry says.
#[derive(Default)]
struct Sub<'d> {
    names: DieNames<'d>,
    low: Option<u64>,
    high: Option<u64>,
    size: Option<u64>,
    ranges: Vec<(u64, u64)>,
    declaration: bool,
}

fn walk<'d>(
    dwarf: &gimli::Dwarf<R<'d>>,
    unit: &gimli::Unit<R<'d>>,
    symbols: &Symbols,
    b: &mut Builder<'d>,
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
    while !entries.is_empty() {
        let depth = entries.next_depth();
        let offset = base.saturating_add(entries.next_offset().0 as u64);
        let bad = |error| Error::Dwarf { offset, error };
        let Some(abbrev) = entries.read_abbreviation().map_err(bad)? else {
            continue;
        };
        let tag = abbrev.tag();
        match tag {
            constants::DW_TAG_subprogram => {
                let mut sub = Sub::default();
                for &spec in abbrev.attributes() {
                    let a = entries.read_attribute(spec).map_err(bad)?;
                    subprogram_attribute(dwarf, unit, &mut sub, a);
                }
                while stack.last().is_some_and(|&(d, _)| d >= depth) {
                    stack.pop();
                }
                let f = b.subprogram(symbols, offset, sub);
                if abbrev.has_children() {
                    stack.push((depth, f));
                }
            }
            constants::DW_TAG_inlined_subroutine
            | constants::DW_TAG_call_site
            | constants::DW_TAG_GNU_call_site => {
                // The origin of an inlined copy, the callee of a call site.
                let mut origin = None;
                for &spec in abbrev.attributes() {
                    let a = entries.read_attribute(spec).map_err(bad)?;
                    let name = a.name();
                    if name == constants::DW_AT_abstract_origin
                        || (name == constants::DW_AT_call_origin
                            && tag != constants::DW_TAG_inlined_subroutine)
                    {
                        origin = reference(unit, a.value()).or(origin);
                    }
                }
                while stack.last().is_some_and(|&(d, _)| d >= depth) {
                    stack.pop();
                }
                let enclosing = stack.last().and_then(|&(_, f)| f);
                if let (Some(o), Some(f)) = (origin, enclosing) {
                    if tag == constants::DW_TAG_inlined_subroutine {
                        b.inlined.push((o, f));
                    } else {
                        b.calls.push((o, f));
                    }
                }
            }
            _ => entries.skip_attributes(abbrev.attributes()).map_err(bad)?,
        }
    }
    Ok(())
}

/// Takes in one attribute of a subprogram entry.
fn subprogram_attribute<'d>(
    dwarf: &gimli::Dwarf<R<'d>>,
    unit: &gimli::Unit<R<'d>>,
    sub: &mut Sub<'d>,
    a: gimli::Attribute<R<'d>>,
) {
    match a.name() {
        constants::DW_AT_name => sub.names.name = string_ref(dwarf, unit, a.value()),
        constants::DW_AT_linkage_name | constants::DW_AT_MIPS_linkage_name => {
            sub.names.linkage = string_ref(dwarf, unit, a.value());
        }
        constants::DW_AT_specification | constants::DW_AT_abstract_origin => {
            sub.names.link = reference(unit, a.value()).or(sub.names.link);
        }
        constants::DW_AT_declaration => {
            sub.declaration = matches!(a.value(), AttributeValue::Flag(true));
        }
        constants::DW_AT_low_pc => sub.low = dwarf.attr_address(unit, a.value()).ok().flatten(),
        constants::DW_AT_high_pc => match a.value() {
            AttributeValue::Udata(n) => sub.size = Some(n),
            v => sub.high = dwarf.attr_address(unit, v).ok().flatten(),
        },
        constants::DW_AT_ranges => {
            if let Ok(Some(mut list)) = dwarf.attr_ranges(unit, a.value()) {
                while let Ok(Some(r)) = list.next() {
                    if r.begin < r.end {
                        sub.ranges.push((r.begin, r.end));
                    }
                    if sub.ranges.len() >= MAX_RANGES {
                        break;
                    }
                }
            }
        }
        _ => {}
    }
}

impl<'d> Builder<'d> {
    /// Records a subprogram entry; its func if it is concrete.
    fn subprogram(&mut self, symbols: &Symbols, offset: u64, mut sub: Sub<'d>) -> Option<usize> {
        self.dies.push((offset, sub.names));
        if sub.declaration {
            return None;
        }
        if let Some(low) = sub.low {
            let end = sub.size.and_then(|s| low.checked_add(s)).or(sub.high);
            sub.ranges.insert(0, (low, end.unwrap_or(low)));
        }
        sub.ranges.retain(|&(begin, _)| !discarded(begin, symbols));
        let &(entry, end) = sub
            .ranges
            .iter()
            .find(|r| !symbols.at(r.0).is_empty())
            .or_else(|| sub.ranges.first())?;
        let f = self.funcs.len();
        self.funcs.push(Func {
            entry,
            end: (end > entry).then_some(end),
            name: None,
        });
        self.func_dies.push(offset);
        Some(f)
    }

    /// The index in `dies` of the subprogram entry at `offset`.
    fn die(&self, offset: u64) -> Option<usize> {
        self.dies.binary_search_by_key(&offset, |d| d.0).ok()
    }

    /// The entry whose string names the subprogram entry `i`, and whether it is a
    /// linkage name: the first linkage name along its `DW_AT_specification` /
    /// `DW_AT_abstract_origin` chain, else the first name.
    fn name_source(&self, mut i: usize) -> Option<AttributeValue<R<'d>>> {
        let mut name = None;
        for _ in 0..MAX_CHAIN {
            let (_, d) = self.dies.get(i)?;
            if d.linkage.is_some() {
                return d.linkage;
            }
            name = name.or(d.name);
            match d.link.and_then(|o| self.die(o)) {
                Some(next) => i = next,
                None => break,
            }
        }
        name
    }

    fn finish(self, dwarf: &gimli::Dwarf<R<'d>>, symbols: &Symbols) -> Index {
        let mut ix = Index {
            units: self.units,
            ..Index::default()
        };
        // Each entry's name is read and interned once.
        let mut memo: Vec<Option<Option<usize>>> = vec![None; self.dies.len()];
        let mut resolve = |names: &mut Names, offset: u64| -> Option<usize> {
            let i = self.die(offset)?;
            if let Some(Some(known)) = memo.get(i) {
                return *known;
            }
            let id = self
                .name_source(i)
                .and_then(|v| dwarf.attr_line_string(v).ok())
                .map(|s| names.intern(s.slice()));
            if let Some(m) = memo.get_mut(i) {
                *m = Some(id);
            }
            id
        };
        let mut funcs = self.funcs.clone();
        for (f, &o) in funcs.iter_mut().zip(&self.func_dies) {
            f.name = resolve(&mut ix.names, o);
        }
        for (i, f) in funcs.iter().enumerate() {
            let Some(n) = f.name else {
                continue;
            };
            ix.described.insert(n);
            let dwarf_name = ix.names.get(n);
            if let Some(sym) = symbols.name_at(f.entry, Some(dwarf_name))
                && sym != dwarf_name
            {
                ix.renamed.entry(n).or_default().push(i);
            }
        }
        let renamed: HashSet<usize> = ix.renamed.values().flatten().copied().collect();
        for &(origin, f) in &self.inlined {
            if let Some(n) = resolve(&mut ix.names, origin) {
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
        ix.funcs = funcs;
        ix
    }
}

impl From<gimli::Error> for Error {
    fn from(error: gimli::Error) -> Self {
        Error::Dwarf { offset: 0, error }
    }
}
