//! The relocations of a patch file: the ordinary ones (the patch's own symbols and
//! the process's exported symbols) and the `.klp.rela` ones (symbols the core resolves
//! with the kernel's rules), written by one linker with the architecture's stubs and
//! slots (see `klp_arch::LinkClass`).
//!
//! Every entry of a call is written into a copy of its section first; the image changes
//! only when every entry succeeded, so a refused file or object leaves the sections as
//! they were (stubs and slots already made stay unused).
//!
//! A *partnered* entry (`Arch::is_partnered`, riscv64's `PCREL_LO12_I`/`_S`, whose
//! symbol is the label of its partner's place) is written after every other entry of
//! its relocation section, from those entries as written (after the stub and slot
//! decisions: `Arch::apply_partnered`). In a `.klp.rela` section its label, defined in
//! the section relocated, is exempt from the livepatch-symbol rule.

use std::collections::BTreeMap;
use std::ffi::CString;

use klp::arch::{Arch, LinkClass, Native, Reloc, RelocError};
use klp::elf::{PatchObject, Section, Symbol};
use klp::{Errno, Host};

use super::image::{Image, malformed};
use super::{LoadError, errno_text};

const SHT_RELA: u32 = 4;
const SHN_UNDEF: u32 = 0;
const SHN_ABS: u32 = 0xfff1;
const SHN_COMMON: u32 = 0xfff2;
const STB_WEAK: u8 = 2;

/// A symbol's value for a relocation.
#[derive(Clone, Copy, Debug)]
struct Value {
    /// Which symbol: its index, tagged for livepatch relocations (the key of its stub
    /// or slot).
    key: u64,
    addr: u64,
    /// Defined by the patch itself (a call to it stays inside the object).
    local: bool,
    other: u8,
}

fn link_error(errno: Errno, what: String) -> LoadError {
    LoadError::new(errno, format!("{what} ({})", errno_text(errno)))
}

/// `name` of the patch's section `index`, for messages.
fn section_name<'d>(obj: &PatchObject<'d>, index: usize) -> &'d str {
    obj.section(index).map_or("?", |s| s.name)
}

/// The value of an ordinary (not livepatch) symbol.
fn ordinary(img: &Image, sym: &Symbol<'_>) -> Result<Value, LoadError> {
    let key = (sym.index as u64) << 1;
    let value = |addr| Value {
        key,
        addr,
        local: false,
        other: sym.other,
    };
    match sym.shndx {
        // STN_UNDEF, "no symbol" (riscv64's R_RISCV_RELAX, x86_64's R_X86_64_NONE, …).
        _ if sym.index == 0 => Ok(value(0)),
        SHN_UNDEF => {
            if sym.name == ".TOC." {
                return img.toc.map(value).ok_or_else(|| {
                    link_error(Errno::ENOEXEC, "the patch uses a TOC but has none".into())
                });
            }
            let Ok(c) = CString::new(sym.name) else {
                return Err(link_error(
                    Errno::ENOEXEC,
                    format!(
                        "the patch needs a symbol with a NUL in its name ({:?})",
                        sym.name
                    ),
                ));
            };
            // SAFETY: `c` is a NUL-terminated name; RTLD_DEFAULT searches the global
            // scope in the dynamic linker's order.
            let p = unsafe { libc::dlsym(libc::RTLD_DEFAULT, c.as_ptr()) };
            if !p.is_null() {
                return Ok(value(p as u64));
            }
            if sym.info >> 4 == STB_WEAK {
                return Ok(value(0));
            }
            Err(link_error(
                Errno::ENOENT,
                format!(
                    "the patch needs '{}', which no loaded object of the program exports: if it is a static symbol of the program or a library, run klp-convert with that binary as a target",
                    super::demangle(sym.name)
                ),
            ))
        }
        SHN_ABS => Ok(value(sym.value)),
        SHN_COMMON => Err(link_error(
            Errno::ENOEXEC,
            format!(
                "'{}' is a common symbol: build the patch with -fno-common",
                sym.name
            ),
        )),
        s if s == u32::from(klp::elf::SHN_LIVEPATCH) => Err(link_error(
            Errno::ENOEXEC,
            format!(
                "the ordinary relocations of the patch reference the livepatch symbol '{}'",
                sym.name
            ),
        )),
        s => match img.section_addr(s as usize) {
            Some(base) => Ok(Value {
                key,
                addr: base.wrapping_add(sym.value),
                local: true,
                other: sym.other,
            }),
            None => Err(link_error(
                Errno::ENOEXEC,
                format!(
                    "'{}' is defined in section {s}, which is not loaded",
                    sym.name
                ),
            )),
        },
    }
}

/// Writes one entry into `bytes` (section loaded at `addr`) with the architecture's
/// linking rules: a call out of reach, or leaving the object where the arch says so,
/// goes through a stub; a GOT reference through a slot. Returns the relocation written
/// (its type and symbol those of the slot or stub used, if one was).
fn link_one(
    img: &mut Image,
    bytes: &mut [u8],
    addr: u64,
    r: &klp::elf::Rela,
    v: Value,
) -> Result<Reloc, RelocError> {
    let ctx = klp::arch::RelocCtx { toc: img.toc };
    let mut reloc = Reloc {
        r_type: r.r_type,
        offset: r.offset,
        sym: v.addr,
        addend: r.addend,
        external: false,
    };
    match Native::link_class(r.r_type) {
        LinkClass::Plain => Native::apply_relocation(bytes, addr, &reloc, &ctx).map(|()| reloc),
        LinkClass::GotSlot { as_type } => {
            reloc.r_type = as_type;
            reloc.sym = img
                .slot_for(v.key, v.addr)
                .map_err(|_| RelocError::Unsupported)?;
            Native::apply_relocation(bytes, addr, &reloc, &ctx).map(|()| reloc)
        }
        LinkClass::Call => {
            let direct = v.local || !Native::CALLS_LEAVING_OBJECT_NEED_STUB;
            if direct {
                if v.local {
                    reloc.sym = Native::local_entry(v.addr, v.other);
                }
                match Native::apply_relocation(bytes, addr, &reloc, &ctx) {
                    Err(RelocError::Overflow { .. }) if !v.local => {}
                    r => return r.map(|()| reloc),
                }
            }
            reloc.sym = img
                .stub_for(v.key, v.addr)
                .map_err(|_| RelocError::Unsupported)?;
            reloc.external = true;
            Native::apply_relocation(bytes, addr, &reloc, &ctx).map(|()| reloc)
        }
    }
}

/// The staged copies of the sections a linking step changes.
#[derive(Default)]
struct Stage(BTreeMap<usize, Vec<u8>>);

impl Stage {
    fn section(&mut self, img: &Image, index: usize) -> Result<&mut Vec<u8>, LoadError> {
        match self.0.entry(index) {
            std::collections::btree_map::Entry::Occupied(e) => Ok(e.into_mut()),
            std::collections::btree_map::Entry::Vacant(e) => {
                let bytes = img.bytes(index).ok_or_else(|| {
                    link_error(
                        Errno::ENOEXEC,
                        format!("relocations for section {index}, which is not loaded"),
                    )
                })?;
                Ok(e.insert(bytes.to_vec()))
            }
        }
    }

    fn commit(self, img: &mut Image) -> Result<(), LoadError> {
        for (index, bytes) in self.0 {
            img.write_section(index, &bytes)
                .map_err(|e| link_error(e, format!("cannot write the patch's section {index}")))?;
        }
        Ok(())
    }
}

fn reloc_failed(
    obj: &PatchObject<'_>,
    rel: &Section<'_>,
    entry: usize,
    sym: &str,
    e: RelocError,
) -> LoadError {
    let errno = Errno::from_ret(e.errno());
    let remedy = match e {
        RelocError::Overflow { .. } => {
            ": the symbol is out of the instruction's reach from the patch; build the patch with -fPIC, so that it reaches other objects' data through an address slot"
        }
        _ => "",
    };
    LoadError::new(
        errno,
        format!(
            "cannot link the patch's {}: entry {entry} of {} (against '{}'): {e} ({}){remedy}",
            section_name(obj, rel.info as usize),
            rel.name,
            super::demangle(sym),
            errno_text(errno)
        ),
    )
}

/// Writes the relocation section `rel` into the staged copy of section `target`
/// (loaded at `addr`): every entry but the partnered ones with [`link_one`], then the
/// partnered ones from those as written. `value` gives the symbol value of an entry
/// (by its index in the section).
fn link_section(
    img: &mut Image,
    stage: &mut Stage,
    obj: &PatchObject<'_>,
    rel: &Section<'_>,
    target: usize,
    addr: u64,
    mut value: impl FnMut(&Image, usize, &klp::elf::Rela, &Symbol<'_>) -> Result<Value, LoadError>,
) -> Result<(), LoadError> {
    let relas = obj.relas(rel.index).map_err(|e| malformed(&e))?;
    // On error the stage is dropped: the copy need not go back.
    let mut copy = std::mem::take(stage.section(img, target)?);
    let mut written = Vec::new();
    let mut partnered = false;
    for (entry, r) in relas.enumerate() {
        if Native::is_partnered(r.r_type) {
            partnered = true;
            continue;
        }
        let sym = obj.symbol(r.sym as usize).map_err(|e| malformed(&e))?;
        let v = value(img, entry, &r, &sym)?;
        let w = link_one(img, &mut copy, addr, &r, v)
            .map_err(|e| reloc_failed(obj, rel, entry, sym.name, e))?;
        written.push(w);
    }
    if partnered {
        let relas = obj.relas(rel.index).map_err(|e| malformed(&e))?;
        for (entry, r) in relas.enumerate() {
            if !Native::is_partnered(r.r_type) {
                continue;
            }
            let sym = obj.symbol(r.sym as usize).map_err(|e| malformed(&e))?;
            let v = value(img, entry, &r, &sym)?;
            let reloc = Reloc {
                r_type: r.r_type,
                offset: r.offset,
                sym: v.addr,
                addend: r.addend,
                external: false,
            };
            Native::apply_partnered(&mut copy, addr, &reloc, &written)
                .map_err(|e| reloc_failed(obj, rel, entry, sym.name, e))?;
        }
    }
    *stage.section(img, target)? = copy;
    Ok(())
}

/// Links every ordinary relocation section whose target section is loaded.
pub(crate) fn link_ordinary(img: &mut Image, obj: &PatchObject<'_>) -> Result<(), LoadError> {
    let mut stage = Stage::default();
    for rel in obj.sections() {
        let rel = rel.map_err(|e| malformed(&e))?;
        if rel.sh_type != SHT_RELA || rel.is_klp_rela() {
            continue;
        }
        let target = rel.info as usize;
        let Some(addr) = img.section_addr(target) else {
            continue;
        };
        link_section(
            img,
            &mut stage,
            obj,
            &rel,
            target,
            addr,
            |img, _, _, sym| ordinary(img, sym),
        )?;
    }
    stage.commit(img)
}

/// Writes the `.klp.rela.<objname>.*` sections, each livepatch symbol resolved once by
/// the core (`klp_resolve_symbols`, with its messages in the process's log).
pub(crate) fn link_klp<H: Host>(
    host: &mut H,
    img: &mut Image,
    obj: &PatchObject<'_>,
    objname: &str,
) -> Result<(), LoadError> {
    let mut stage = Stage::default();
    let mut resolved: BTreeMap<u32, u64> = BTreeMap::new();
    for sec in obj.klp_relas() {
        let sec = sec.map_err(|e| malformed(&e))?;
        if sec.objname != objname {
            continue;
        }
        let Some(addr) = img.section_addr(sec.target) else {
            return Err(link_error(
                Errno::ENOEXEC,
                format!(
                    "{} relocates a section that is not loaded",
                    sec.section.name
                ),
            ));
        };
        let target = sec.target;
        let section = sec.section;
        link_section(
            img,
            &mut stage,
            obj,
            &section,
            target,
            addr,
            |_, entry, r, sym| {
                if Native::is_partnered(r.r_type) && sym.is_label_in(target) {
                    // The label of its partner's place, in the section relocated.
                    return Ok(Value {
                        key: u64::from(r.sym) << 1,
                        addr: addr.wrapping_add(sym.value),
                        local: true,
                        other: sym.other,
                    });
                }
                if !sym.is_livepatch() {
                    return Err(link_error(
                        Errno::EINVAL,
                        format!(
                            "symbol {} at rela sec {} idx {entry} is not marked as a livepatch symbol",
                            sym.name, section.index
                        ),
                    ));
                }
                let value = match resolved.get(&r.sym) {
                    Some(v) => *v,
                    None => {
                        let v = klp::elf::reloc::resolve_livepatch_symbol(host, sym.name, objname)
                        .map_err(|e| {
                            link_error(
                                e,
                                format!(
                                    "the patch needs '{}' of {}, which cannot be found (the process's log says why)",
                                    klp::elf::parse_sym_name(sym.name)
                                        .map_or(sym.name, |p| p.name),
                                    super::object_label(objname)
                                ),
                            )
                        })?;
                        resolved.insert(r.sym, v);
                        v
                    }
                };
                Ok(Value {
                    key: (u64::from(r.sym) << 1) | 1,
                    addr: value,
                    local: false,
                    other: 0,
                })
            },
        )?;
    }
    stage.commit(img)
}

/// Undoes [`link_klp`] for `objname` (the object went away), so that its relocations
/// can be written again when it comes back.
pub(crate) fn unlink_klp(
    img: &mut Image,
    obj: &PatchObject<'_>,
    objname: &str,
) -> Result<(), LoadError> {
    let mut stage = Stage::default();
    for sec in obj.klp_relas() {
        let sec = sec.map_err(|e| malformed(&e))?;
        if sec.objname != objname {
            continue;
        }
        let relas = obj.relas(sec.section.index).map_err(|e| malformed(&e))?;
        let bytes = stage.section(img, sec.target)?;
        for r in relas {
            // As it was written: a GOT reference as the slot's type, a call leaving
            // the object through a stub; a partnered entry as it is (its own field,
            // whatever its partner).
            let class = if Native::is_partnered(r.r_type) {
                LinkClass::Plain
            } else {
                Native::link_class(r.r_type)
            };
            let reloc = Reloc {
                r_type: match class {
                    LinkClass::GotSlot { as_type } => as_type,
                    _ => r.r_type,
                },
                offset: r.offset,
                sym: 0,
                addend: r.addend,
                external: Native::CALLS_LEAVING_OBJECT_NEED_STUB && class == LinkClass::Call,
            };
            Native::clear_relocation(bytes, &reloc).map_err(|e| {
                link_error(
                    Errno::from_ret(e.errno()),
                    format!("cannot undo {}: {e}", sec.section.name),
                )
            })?;
        }
    }
    stage.commit(img)
}

#[cfg(test)]
mod tests {
    use super::*;
    use object::write::{Object, Relocation};
    use object::{Architecture, BinaryFormat, Endianness, RelocationFlags, SectionKind};

    /// A relocatable object with an 8-byte `.data` and one `Native::ABS64_RELOC` entry
    /// at its start against symbol 0 (STN_UNDEF) with addend 0x1234.
    fn no_symbol_object() -> Vec<u8> {
        let mut o = Object::new(
            BinaryFormat::Elf,
            Architecture::X86_64,
            Endianness::default(),
        );
        let data = o.add_section(Vec::new(), b".data".to_vec(), SectionKind::Data);
        o.append_section_data(data, &[0; 8], 8);
        let sym = o.section_symbol(data);
        o.add_relocation(
            data,
            Relocation {
                offset: 0,
                symbol: sym,
                addend: 0x1234,
                flags: RelocationFlags::Elf {
                    r_type: object::elf::RelocationType(Native::ABS64_RELOC),
                },
            },
        )
        .expect("relocation");
        let mut file = o.write().expect("object");
        // The entry's r_sym (the high half of r_info, 8 bytes in) becomes 0.
        let obj = PatchObject::parse(&file).expect("parses");
        let rela = obj.section_by_name(".rela.data").expect(".rela.data");
        let bytes = obj.section_data(rela.index).expect("contents");
        let at = bytes.as_ptr() as usize - file.as_ptr() as usize + 8;
        let info = u64::from(Native::ABS64_RELOC);
        file[at..at + 8].copy_from_slice(&if cfg!(target_endian = "big") {
            info.to_be_bytes()
        } else {
            info.to_le_bytes()
        });
        file
    }

    #[test]
    fn symbol_zero_is_the_value_zero() {
        let file = no_symbol_object();
        let obj = PatchObject::parse(&file).expect("parses");
        let rela = obj.section_by_name(".rela.data").expect(".rela.data");
        let r = obj
            .relas(rela.index)
            .expect("relas")
            .next()
            .expect("an entry");
        assert_eq!((r.sym, r.r_type), (0, Native::ABS64_RELOC));
        let here = symbol_zero_is_the_value_zero as *const () as u64;
        let mut img = Image::map(&obj, here, here + 1).expect("mapped");
        link_ordinary(&mut img, &obj).expect("linked");
        let data = obj.section_by_name(".data").expect(".data");
        assert_eq!(
            img.bytes(data.index).expect("loaded"),
            0x1234u64.to_ne_bytes(),
            "S = 0 for no symbol, plus the addend"
        );
    }
}
