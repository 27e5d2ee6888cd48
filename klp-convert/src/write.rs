//! Rewriting the patch object into a livepatch object.
//!
//! Nothing is reordered and no section or symbol is removed, so every section index
//! and every symbol index of the input stays valid (section groups, `SHF_LINK_ORDER`
//! links, `.llvm_addrsig`, relocations). The changes are:
//!
//! * each converted symbol gets its `.klp.sym.…` name (appended to the symbol string
//!   table), `st_shndx = SHN_LIVEPATCH`, `st_value = st_size = 0`; its binding and
//!   type stay (an undefined symbol is `GLOBAL`/`WEAK`, so locals still come first
//!   and `.symtab`'s `sh_info` stays right);
//! * every `Rela` entry against a converted symbol leaves its `.rela<sec>` section,
//!   with type, offset, addend and symbol index unchanged, for a new section
//!   `.klp.rela.<object>.<sec>` (`SHT_RELA`, `SHF_ALLOC | SHF_INFO_LINK |
//!   SHF_RELA_LIVEPATCH` — `readelf` shows `AIo` as in the seed — `sh_link` = the
//!   symbol table, `sh_info` = the relocated section), one per object and relocated
//!   section, appended after the existing sections;
//! * `.modinfo` gains `livepatch=Y` if it has no such entry (a `.modinfo` section is
//!   added if there is none), and `klp_replace=Y` for a description with
//!   `replace`;
//! * with a patch description, its sections and two section symbols (see
//!   [`crate::describe`]): the only change that renumbers symbols;
//! * a GOT-relative relocation against a converted symbol is relaxed into a direct
//!   one, its instruction rewritten in the relocated section ([`crate::relax`]);
//! * a *partnered* entry (`klp_arch::Arch::is_partnered`: riscv64's `PCREL_LO12`,
//!   whose symbol is the label at its partner's place) follows its partner: when
//!   the partner moves to a `.klp.rela` section, it moves too, with its symbol (a
//!   local label, which stays in the symbol table);
//! * the targets' build ids, in a `.note.klp.build-id` section ([`crate::buildid`]).
//!
//! The file is then laid out afresh: the ELF header, each section's bytes in index
//! order at its alignment, the section header table last.

use std::collections::HashMap;

use object::elf;
use object::write::elf::{FileHeaderLayout, Rel, SectionHeader};

use crate::describe::{self, Planned};
use crate::elf::{PatchObject, Section};
use crate::error::Error;
use crate::names::{SHF_RELA_LIVEPATCH, SHN_LIVEPATCH, klp_rela_name};
use crate::plan::{Decision, SymbolDecision};
use crate::relax::{self, Relaxed};
use crate::{buildid, reloc};

/// `SHT_CREL`: LLVM's compact relocations, which this tool does not decode.
const SHT_CREL: u32 = 0x4000_0014;

/// The largest section alignment accepted (larger ones would make the output huge).
const MAX_ALIGN: u64 = 1 << 20;

/// One relocation moved into a livepatch relocation section.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MovedRela {
    /// `r_offset`.
    pub offset: u64,
    /// `r_type`.
    pub r_type: u32,
    /// `r_addend`.
    pub addend: i64,
    /// The symbol's index in the output's `.symtab` (the input's, unless a patch
    /// description's section symbols moved the globals up).
    pub symbol_index: u32,
    /// The symbol's (livepatch) name.
    pub symbol: String,
}

/// One `.klp.rela` section written.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KlpSection {
    /// Its name.
    pub name: String,
    /// Its section index in the output.
    pub index: usize,
    /// The object its symbols belong to.
    pub object: String,
    /// The section it relocates (its name).
    pub target: String,
    /// The section it relocates (its index, `sh_info`).
    pub target_index: usize,
    /// Its entries, in input order.
    pub relocations: Vec<MovedRela>,
}

/// What the rewrite did besides the symbols.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Rewritten {
    pub data: Vec<u8>,
    pub sections: Vec<KlpSection>,
    pub modinfo_added: bool,
    pub relaxed: Vec<Relaxed>,
}

fn append_string(section: &mut Section, s: &str) -> u32 {
    let off = section.data.len() as u32;
    section.data.extend_from_slice(s.as_bytes());
    section.data.push(0);
    off
}

fn decode_rels(p: &PatchObject, s: &Section) -> Result<Vec<u32>, Error> {
    let size: usize = if p.is_64 { 16 } else { 8 };
    if s.header.sh_entsize != size as u64 || !s.data.len().is_multiple_of(size) {
        return Err(Error::RelocationSection {
            section: s.name_lossy(),
            reason: format!(
                "its entry size is {} and its size {}, which is no array of {size}-byte Rel \
                 entries",
                s.header.sh_entsize,
                s.data.len()
            ),
        });
    }
    let mut syms = Vec::new();
    for c in s.data.chunks_exact(size) {
        let sym = if p.is_64 {
            let mut a = [0u8; 8];
            a.copy_from_slice(&c[8..16]);
            let info = match p.endian {
                object::Endianness::Little => u64::from_le_bytes(a),
                object::Endianness::Big => u64::from_be_bytes(a),
            };
            (info >> 32) as u32
        } else {
            let mut a = [0u8; 4];
            a.copy_from_slice(&c[4..8]);
            let info = match p.endian {
                object::Endianness::Little => u32::from_le_bytes(a),
                object::Endianness::Big => u32::from_be_bytes(a),
            };
            info >> 8
        };
        syms.push(sym);
    }
    Ok(syms)
}

/// For each entry of `relas` (a relocation section of `target`), the index of its
/// partner when it is partnered (`klp_arch::Arch::is_partnered`): the first entry of
/// the same section, not partnered itself and with a symbol, whose place is the value
/// of its symbol, a label of `target` (an entry without a symbol at the same place,
/// such as riscv64's `R_RISCV_RELAX` marker, is no partner). `None` for the others, and for a partnered entry whose symbol
/// is not defined in `target` or whose partner is not there (it stays where it is).
fn partners(p: &PatchObject, relas: &[Rel], target: usize) -> Vec<Option<usize>> {
    let partnered: Vec<bool> = relas
        .iter()
        .map(|r| reloc::partnered(p.arch, r.r_type.0))
        .collect();
    relas
        .iter()
        .zip(&partnered)
        .map(|(r, &is)| {
            if !is {
                return None;
            }
            let sym = p.symbols.get(r.r_sym as usize)?;
            if usize::from(sym.sym.st_shndx.0) != target || sym.sym.st_shndx == elf::SHN_XINDEX {
                return None;
            }
            relas
                .iter()
                .zip(&partnered)
                .position(|(q, &q_is)| !q_is && q.r_sym != 0 && q.r_offset == sym.sym.st_value)
        })
        .collect()
}

/// Applies `decisions` to `p`, records `build_ids` (object, GNU build id) and lays
/// out the result.
pub(crate) fn rewrite(
    mut p: PatchObject,
    decisions: &[SymbolDecision],
    description: Option<&Planned>,
    build_ids: &[(String, Vec<u8>)],
) -> Result<Rewritten, Error> {
    // Symbol index -> (object, livepatch name, original name, target address).
    let converted: HashMap<usize, (&str, &str, &str, u64)> = decisions
        .iter()
        .filter_map(|d| match &d.decision {
            Decision::Convert {
                object,
                klp_name,
                address,
                ..
            } => Some((
                d.index,
                (
                    object.as_str(),
                    klp_name.as_str(),
                    d.name.as_str(),
                    *address,
                ),
            )),
            Decision::Keep { .. } => None,
        })
        .collect();

    let original = p.sections.len();

    // Symbols: new names, SHN_LIVEPATCH.
    let sym_size = p.encoder().sym_size() as usize;
    let mut indices: Vec<usize> = converted.keys().copied().collect();
    indices.sort_unstable();
    for &i in &indices {
        let (_, klp_name, _, _) = converted[&i];
        let st_name = append_string(&mut p.sections[p.strtab], klp_name);
        let Some(sym) = p.symbols.get_mut(i) else {
            continue;
        };
        sym.sym.st_name = st_name;
        sym.sym.section = None;
        sym.sym.st_shndx = elf::SymbolSection(SHN_LIVEPATCH);
        sym.sym.st_value = 0;
        sym.sym.st_size = 0;
        sym.name = klp_name.as_bytes().to_vec();
        let bytes = p.encode_symbol(&p.symbols[i].sym);
        let symtab = &mut p.sections[p.symtab];
        let name = symtab.name_lossy();
        let Some(slot) = symtab
            .data
            .get_mut(i * sym_size..(i + 1) * sym_size)
            .filter(|s| s.len() == bytes.len())
        else {
            return Err(Error::Malformed {
                file: p.file.clone(),
                reason: format!("symbol {i} lies outside the symbol table {name}"),
            });
        };
        slot.copy_from_slice(&bytes);
    }

    // Relocations: move the entries against converted symbols.
    let symtab = p.symtab as u32;
    let mut relaxed = Vec::new();
    let mut groups: Vec<((String, usize), Vec<Rel>)> = Vec::new();
    if !converted.is_empty() {
        for i in 1..p.sections.len() {
            let s = &p.sections[i];
            if s.header.sh_link != symtab {
                continue;
            }
            let t = s.header.sh_type;
            if t == elf::SHT_REL {
                if let Some((_, _, name, _)) = decode_rels(&p, s)?
                    .into_iter()
                    .find_map(|r| converted.get(&(r as usize)))
                {
                    return Err(Error::RelocationSection {
                        section: s.name_lossy(),
                        reason: format!(
                            "it is a SHT_REL section (no addends) with an entry against symbol \
                             '{name}', and livepatch relocation sections are SHT_RELA"
                        ),
                    });
                }
                continue;
            }
            if t == elf::SectionType(SHT_CREL) {
                return Err(Error::RelocationSection {
                    section: s.name_lossy(),
                    reason: "it holds SHT_CREL compact relocations, which klp-convert does not \
                             decode; build the patch without --crel"
                        .to_string(),
                });
            }
            if t != elf::SHT_RELA {
                continue;
            }
            let relas = p.decode_relas(i)?;
            if !relas
                .iter()
                .any(|r| converted.contains_key(&(r.r_sym as usize)))
            {
                continue;
            }
            let target = s.header.sh_info as usize;
            let Some(ts) = p.sections.get(target).filter(|_| target != 0) else {
                return Err(Error::RelocationSection {
                    section: s.name_lossy(),
                    reason: format!(
                        "its sh_info {target} names no section, so it relocates nothing"
                    ),
                });
            };
            let target_name = ts.name_lossy();
            let target_alloc = ts.header.sh_flags.contains(elf::SHF_ALLOC);
            let partner_of = partners(&p, &relas, target);
            let mut relas = relas;
            // Where each entry goes: a `.klp.rela` group, or `None` (stays).
            let mut dest: Vec<Option<(String, usize)>> = vec![None; relas.len()];
            for j in 0..relas.len() {
                let r = &relas[j];
                let Some(&(object, _, name, address)) = converted.get(&(r.r_sym as usize)) else {
                    continue;
                };
                if !target_alloc {
                    return Err(Error::NotLoaded {
                        symbol: name.to_string(),
                        section: target_name,
                    });
                }
                // A library's symbol through the GOT: the process loader's slot (see
                // `reloc::got_slot`); the program's: relaxed into a direct reference.
                let slot =
                    object != crate::names::MAIN_OBJECT && reloc::got_slot(p.arch, r.r_type.0);
                if !slot && !reloc::writable(p.arch, r.r_type.0) {
                    let from = r.r_type.0;
                    // The entries partnered with this one: their instructions use what
                    // it computes, so the relaxation may rewrite them too.
                    let partner_offsets: Vec<u64> = partner_of
                        .iter()
                        .zip(&relas)
                        .filter(|(k, _)| **k == Some(j))
                        .map(|(_, q)| q.r_offset)
                        .collect();
                    let text = &mut p.sections[target].data;
                    let r = &mut relas[j];
                    match relax::relax(
                        p.arch,
                        text,
                        from,
                        r.r_offset,
                        r.r_addend,
                        Some(address),
                        &partner_offsets,
                    ) {
                        Ok(Some(done)) => {
                            relaxed.push(Relaxed {
                                section: target_name.clone(),
                                offset: done.offset,
                                from,
                                to: done.r_type,
                                symbol: name.to_string(),
                                rewrite: done.rewrite,
                            });
                            r.r_type = elf::RelocationType(done.r_type);
                            r.r_offset = done.offset;
                        }
                        Ok(None) => {
                            return Err(Error::UnsupportedRelocation {
                                arch: p.arch.name(),
                                r_type: from,
                                type_name: reloc::type_name(p.arch, from),
                                section: target_name,
                                offset: r.r_offset,
                                symbol: name.to_string(),
                            });
                        }
                        Err(refused) => {
                            return Err(Error::Relaxation {
                                arch: p.arch.name(),
                                r_type: from,
                                type_name: reloc::type_name(p.arch, from),
                                section: target_name,
                                offset: r.r_offset,
                                symbol: name.to_string(),
                                reason: format!("{}, and {}", refused.expected, refused.found),
                            });
                        }
                    }
                }
                dest[j] = Some((object.to_string(), target));
            }
            // A partnered entry goes where its partner went (its symbol, the label at
            // the partner's place, stays as it is).
            for j in 0..relas.len() {
                if dest[j].is_none()
                    && let Some(k) = partner_of[j]
                {
                    dest[j] = dest[k].clone();
                }
            }
            let mut kept = Vec::with_capacity(relas.len());
            for (r, d) in relas.into_iter().zip(dest) {
                let Some(key) = d else {
                    kept.push(r);
                    continue;
                };
                match groups.iter_mut().find(|(k, _)| *k == key) {
                    Some((_, v)) => v.push(r),
                    None => groups.push((key, vec![r])),
                }
            }
            let data = p.encode_relas(&kept);
            p.sections[i].data = data;
        }
    }

    // .modinfo: livepatch=Y, and klp_replace=Y for a description with replace.
    let replace = description.map(|d| d.description.replace);
    let modinfo_added = modinfo(&mut p, replace)?;

    // The .klp.rela sections.
    let enc = p.encoder();
    let mut sections = Vec::with_capacity(groups.len());
    for ((object, target), relas) in groups {
        let target_name = p.sections[target].name_lossy();
        let name = klp_rela_name(&object, &target_name);
        let index = p.sections.len();
        sections.push(KlpSection {
            name: name.clone(),
            index,
            object,
            target: target_name,
            target_index: target,
            relocations: relas
                .iter()
                .map(|r| MovedRela {
                    offset: r.r_offset,
                    r_type: r.r_type.0,
                    addend: r.r_addend,
                    symbol_index: r.r_sym,
                    symbol: String::from_utf8_lossy(&p.symbols[r.r_sym as usize].name).into_owned(),
                })
                .collect(),
        });
        let data = p.encode_relas(&relas);
        p.sections.push(Section {
            name: name.into_bytes(),
            header: SectionHeader {
                sh_type: elf::SHT_RELA,
                sh_flags: elf::SectionFlags(
                    elf::SHF_ALLOC.0 | elf::SHF_INFO_LINK.0 | SHF_RELA_LIVEPATCH,
                ),
                sh_link: symtab,
                sh_info: target as u32,
                sh_addralign: enc.address_size(),
                sh_entsize: enc.rel_size(true),
                ..SectionHeader::default()
            },
            data,
        });
    }

    // The patch description.
    if let Some(d) = description {
        describe::write(&mut p, d, &mut sections)?;
    }

    // The build ids of the targets: a note section the loaders do not load.
    if !build_ids.is_empty() {
        if p.sections
            .iter()
            .any(|s| s.name == buildid::SECTION.as_bytes())
        {
            return Err(Error::BuildIdExists {
                file: p.file.clone(),
            });
        }
        p.sections.push(Section {
            name: buildid::SECTION.as_bytes().to_vec(),
            header: SectionHeader {
                sh_type: elf::SHT_NOTE,
                sh_flags: elf::SectionFlags(0),
                sh_addralign: 4,
                ..SectionHeader::default()
            },
            data: buildid::encode(p.endian, build_ids),
        });
    }

    // New section names go to the end of the section name table.
    for i in original..p.sections.len() {
        let name = p.sections[i].name_lossy();
        let off = append_string(&mut p.sections[p.shstrndx], &name);
        p.sections[i].header.sh_name = off;
    }

    let data = emit(&p)?;
    Ok(Rewritten {
        data,
        sections,
        modinfo_added,
        relaxed,
    })
}

/// Adds `livepatch=Y` to `.modinfo` (adding the section when there is none) unless
/// it is there, and with `replace` = `Some(true)` `klp_replace=Y` likewise; returns
/// whether `livepatch=Y` was added.
fn modinfo(p: &mut PatchObject, replace: Option<bool>) -> Result<bool, Error> {
    let i = match p.sections.iter().position(|s| s.name == b".modinfo") {
        Some(i) => i,
        None => {
            p.sections.push(Section {
                name: b".modinfo".to_vec(),
                header: SectionHeader {
                    sh_type: elf::SHT_PROGBITS,
                    sh_flags: elf::SHF_ALLOC,
                    sh_addralign: 1,
                    ..SectionHeader::default()
                },
                data: Vec::new(),
            });
            p.sections.len() - 1
        }
    };
    let s = &mut p.sections[i];
    if s.header.sh_type == elf::SHT_NOBITS {
        return Err(Error::Layout {
            reason: "the .modinfo section has no contents (SHT_NOBITS)".to_string(),
        });
    }
    let mut livepatch = false;
    let mut klp_replace = false;
    for entry in s.data.split(|&b| b == 0) {
        if let Some(v) = entry.strip_prefix(b"livepatch=") {
            if v != b"Y" {
                return Err(Error::Modinfo {
                    entry: String::from_utf8_lossy(entry).into_owned(),
                });
            }
            livepatch = true;
        }
        if let (Some(v), Some(replace)) = (entry.strip_prefix(b"klp_replace="), replace) {
            if (v == b"Y") != replace {
                return Err(Error::ModinfoReplace {
                    entry: String::from_utf8_lossy(entry).into_owned(),
                    replace,
                });
            }
            klp_replace = true;
        }
    }
    let mut add = |entry: &[u8]| {
        if s.data.last().is_some_and(|&b| b != 0) {
            s.data.push(0);
        }
        s.data.extend_from_slice(entry);
    };
    if !livepatch {
        add(b"livepatch=Y\0");
    }
    if replace == Some(true) && !klp_replace {
        add(b"klp_replace=Y\0");
    }
    Ok(!livepatch)
}

fn align_up(v: u64, align: u64) -> Option<u64> {
    v.checked_next_multiple_of(align.max(1))
}

/// Lays out and encodes the whole file.
fn emit(p: &PatchObject) -> Result<Vec<u8>, Error> {
    let enc = p.encoder();
    let overflow = |what: &str| Error::Layout {
        reason: format!("{what} does not fit the file's ELF class"),
    };
    let mut offsets = vec![0u64; p.sections.len()];
    let mut pos = enc.file_header_size();
    for (i, s) in p.sections.iter().enumerate().skip(1) {
        if s.header.sh_addralign > MAX_ALIGN {
            return Err(Error::Layout {
                reason: format!(
                    "section {} asks for alignment {:#x}, more than klp-convert lays out",
                    s.name_lossy(),
                    s.header.sh_addralign
                ),
            });
        }
        let at = align_up(pos, s.header.sh_addralign).ok_or_else(|| overflow("an offset"))?;
        offsets[i] = at;
        if s.header.sh_type != elf::SHT_NOBITS {
            pos = at
                .checked_add(s.data.len() as u64)
                .ok_or_else(|| overflow("an offset"))?;
        }
    }
    let shoff = align_up(pos, enc.address_size()).ok_or_else(|| overflow("an offset"))?;
    let total = shoff
        .checked_add(enc.section_header_size() * p.sections.len() as u64)
        .ok_or_else(|| overflow("the file size"))?;
    if !p.is_64 && total > u64::from(u32::MAX) {
        return Err(overflow("the file size"));
    }
    let layout = FileHeaderLayout {
        e_phoff: 0,
        segment_num: 0,
        e_shoff: shoff,
        section_num: p.sections.len() as u32,
        shstrtab_index: p.shstrndx as u32,
    };
    let mut out = Vec::with_capacity(total as usize);
    enc.file_header(&mut out, &p.header, &layout)
        .map_err(|e| Error::Layout {
            reason: e.to_string(),
        })?;
    for (i, s) in p.sections.iter().enumerate().skip(1) {
        if s.header.sh_type == elf::SHT_NOBITS {
            continue;
        }
        out.resize(offsets[i] as usize, 0);
        out.extend_from_slice(&s.data);
    }
    out.resize(shoff as usize, 0);
    enc.null_section_header(&mut out, &layout);
    for (i, s) in p.sections.iter().enumerate().skip(1) {
        let header = SectionHeader {
            sh_offset: offsets[i],
            sh_size: if s.header.sh_type == elf::SHT_NOBITS {
                s.header.sh_size
            } else {
                s.data.len() as u64
            },
            ..s.header.clone()
        };
        enc.section_header(&mut out, &header);
    }
    Ok(out)
}
