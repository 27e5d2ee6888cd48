//! Resolving livepatch symbols and writing livepatch relocation sections
//! (`klp_write_section_relocs`, `klp_resolve_symbols`, `apply_relocate_add`).
//!
//! Each livepatch symbol is resolved once per call through the host's symbol lookup
//! with the kernel's sympos rules ([`crate::Klp`]'s `klp_find_object_symbol`), never by
//! a scan per relocation entry. Every relocation is first written into a copy of its
//! section by the patch's architecture ([`Arch::apply_relocation`]); the patch's memory
//! is changed only when every entry of every section for the object succeeded, so a
//! failure leaves every byte as it was.
//!
//! A *partnered* entry ([`Arch::is_partnered`], riscv64's `PCREL_LO12_I`/`_S`) is
//! written after every other entry of its section, from those entries as written
//! ([`Arch::apply_partnered`]). Its symbol names the place of its partner: a label of
//! the section the relocation section targets, which is exempt from the rule that
//! every symbol of a livepatch relocation section is a livepatch symbol (its value is
//! that section's address plus `st_value`). A partnered entry against any other symbol
//! follows the kernel's rules.

use alloc::vec::Vec;

use klp_arch::{Arch, Endian, Reloc, RelocCtx};

use super::{ElfError, KlpRela, PatchObject, Rela, parse_sym_name};
use crate::Klp;
use crate::errno::{Errno, KResult};
use crate::fallible::{push_reserved, reserve_total, try_push};
use crate::host::{Addr, Host};
use crate::log::{Level, Record, klp_log};

/// The patch module's sections in memory, as the host loaded them.
pub trait PatchImage {
    /// The address section `index` is loaded at, if it is loaded.
    fn section_addr(&self, index: usize) -> Option<Addr>;
    /// The loaded bytes of section `index`.
    fn section_bytes(&self, index: usize) -> Option<&[u8]>;
    /// Replaces the loaded bytes of section `index` with `bytes` (of the same length).
    /// The host makes the memory writable for the write and keeps instruction caches
    /// coherent after it.
    fn write_section(&mut self, index: usize, bytes: &[u8]) -> KResult<()>;
    /// What some relocation types need besides the symbol (ppc64le: the module's TOC).
    fn reloc_ctx(&self) -> RelocCtx {
        RelocCtx::default()
    }
}

/// Logs a malformed-object error with the kernel's text where it has one.
fn report<H: Host>(host: &mut H, module: &str, e: &ElfError<'_>) -> Errno {
    match e {
        ElfError::SectionName(_) | ElfError::SymbolName(_) => {
            klp_log!(host, Level::Err, "klp_write_section_relocs", "{e}");
            Errno::EINVAL
        }
        _ => {
            host.log(&Record {
                level: Level::Err,
                func: "klp_write_section_relocs",
                prefix: "",
                args: format_args!("{module}: {e}"),
            });
            Errno::ENOEXEC
        }
    }
}

/// A section's new contents, staged until every relocation succeeded.
struct Staged {
    index: usize,
    old: Vec<u8>,
    new: Vec<u8>,
}

/// The sections a write or a clear changes, staged.
#[derive(Default)]
struct Stage(Vec<Staged>);

impl Stage {
    /// The staged copy of section `index` (made on first use).
    fn section(&mut self, image: &dyn PatchImage, index: usize) -> KResult<&mut Vec<u8>> {
        let slot = match self.0.iter().position(|s| s.index == index) {
            Some(i) => i,
            None => {
                let bytes = image.section_bytes(index).ok_or(Errno::ENOEXEC)?;
                let stage = Staged {
                    index,
                    old: copy_of(bytes)?,
                    new: copy_of(bytes)?,
                };
                try_push(&mut self.0, stage)?;
                self.0.len().saturating_sub(1)
            }
        };
        self.0
            .get_mut(slot)
            .map(|s| &mut s.new)
            .ok_or(Errno::EINVAL)
    }

    /// Writes every staged section to the image; if the image refuses one, puts back
    /// those already written.
    fn commit(self, image: &mut dyn PatchImage) -> KResult<()> {
        for (i, s) in self.0.iter().enumerate() {
            if let Err(e) = image.write_section(s.index, &s.new) {
                for done in self.0.iter().take(i) {
                    // The host reports a failure of these itself.
                    let _ = image.write_section(done.index, &done.old);
                }
                return Err(e);
            }
        }
        Ok(())
    }
}

fn copy_of(bytes: &[u8]) -> KResult<Vec<u8>> {
    let mut v = Vec::new();
    reserve_total(&mut v, bytes.len())?;
    for b in bytes {
        push_reserved(&mut v, *b).map_err(|_| Errno::ENOMEM)?;
    }
    Ok(v)
}

/// Resolves the livepatch symbol `index` of `obj` for a relocation section of
/// `sec_objname` (`klp_resolve_symbols` for one entry).
fn resolve<H: Host>(
    host: &mut H,
    obj: &PatchObject<'_>,
    index: u32,
    entry: usize,
    sec_objname: &str,
) -> KResult<Addr> {
    let sym = obj.symbol(index as usize).map_err(|_| Errno::ENOEXEC)?;
    if !sym.is_livepatch() {
        klp_log!(
            host,
            Level::Err,
            "klp_resolve_symbols",
            "symbol {} at rela sec {} idx {entry} is not marked as a livepatch symbol",
            sym.name,
            obj.symtab_index()
        );
        return Err(Errno::EINVAL);
    }
    resolve_livepatch_symbol(host, sym.name, sec_objname)
}

/// The address of the livepatch symbol named `name` (`.klp.sym.<obj>.<name>,<pos>`) for
/// a relocation section of `sec_objname` (`vmlinux` or a module): the part of
/// `klp_resolve_symbols` after the caller checked that the symbol is marked
/// `SHN_LIVEPATCH`. A host that writes the relocations with its own relocator (the
/// kernel's `apply_relocate_add`) stores the result in the symbol's `st_value`.
///
/// Errors: `-EINVAL` with the kernel's message for a malformed name, a vmlinux symbol
/// referenced from a module's section, and a symbol that cannot be resolved.
pub fn resolve_livepatch_symbol<H: Host>(
    host: &mut H,
    name: &str,
    sec_objname: &str,
) -> KResult<Addr> {
    let Some(parsed) = parse_sym_name(name) else {
        klp_log!(
            host,
            Level::Err,
            "klp_resolve_symbols",
            "symbol {name} has an incorrectly formatted name"
        );
        return Err(Errno::EINVAL);
    };
    let sym_vmlinux = parsed.objname == "vmlinux";
    if sec_objname != "vmlinux" && sym_vmlinux {
        klp_log!(
            host,
            Level::Err,
            "klp_resolve_symbols",
            "invalid access to vmlinux symbol '{}' from module-specific livepatch relocation section",
            parsed.name
        );
        return Err(Errno::EINVAL);
    }
    let objname = (!sym_vmlinux).then_some(parsed.objname);
    Klp::<H>::find_object_symbol(host, objname, parsed.name, parsed.sympos)
}

/// The value of the symbol of entry `entry` (`r`) of the livepatch relocation section
/// `sec`: a livepatch symbol, resolved once per call (`resolved`, per symbol index).
fn symbol_value<H: Host>(
    host: &mut H,
    module: &str,
    obj: &PatchObject<'_>,
    resolved: &mut [Option<Addr>],
    sec: &KlpRela<'_>,
    entry: usize,
    r: &Rela,
) -> KResult<Addr> {
    match resolved.get(r.sym as usize).copied() {
        Some(Some(v)) => Ok(v),
        Some(None) => {
            let v = resolve(host, obj, r.sym, entry, sec.objname)?;
            if let Some(c) = resolved.get_mut(r.sym as usize) {
                *c = Some(v);
            }
            Ok(v)
        }
        None => {
            let e = ElfError::SymbolIndex {
                section: sec.section.name,
                entry,
                index: u64::from(r.sym),
            };
            Err(report(host, module, &e))
        }
    }
}

/// Logs a relocation the architecture refused (as `apply_relocate_add` does) and
/// returns its errno.
fn apply_failed<H: Host>(
    host: &mut H,
    module: &str,
    e: &klp_arch::RelocError,
    entry: usize,
    sec: &KlpRela<'_>,
) -> Errno {
    host.log(&Record {
        level: Level::Err,
        func: "apply_relocate_add",
        prefix: "",
        args: format_args!("{module}: {} (entry {entry} of {})", e, sec.section.name),
    });
    Errno::from_ret(e.errno())
}

/// Writes every livepatch relocation section of `obj` that belongs to `target` (`None`:
/// vmlinux) into the patch module's memory (`klp_apply_section_relocs` over the
/// module's sections). `A` is the patch's architecture: the object must be built for it.
///
/// A section whose name does not parse fails the call even if it belongs to another
/// object (the kernel checks every livepatch section at this point). Errors: `-EINVAL`
/// with the kernel's message for malformed names, non-livepatch symbols, vmlinux
/// symbols from module sections and unresolvable symbols; `-ENOEXEC` for an object of
/// another architecture or a relocation the architecture cannot write; `-ENOMEM`. On
/// error no byte of the patch's memory has changed.
pub fn write_relocs<A: Arch, H: Host>(
    host: &mut H,
    module: &str,
    obj: &PatchObject<'_>,
    image: &mut dyn PatchImage,
    target: Option<&str>,
) -> KResult<()> {
    if let Err(e) = obj.check_machine(A::ELF_MACHINE, A::ENDIAN == Endian::Big) {
        return Err(report(host, module, &e));
    }
    let want = target.unwrap_or("vmlinux");
    let ctx = image.reloc_ctx();
    // One resolution per livepatch symbol: its value once found.
    let mut resolved: Vec<Option<Addr>> = Vec::new();
    let mut stage = Stage::default();
    // The entries of the current section written so far (when it has partnered ones).
    let mut written: Vec<Reloc> = Vec::new();
    for sec in obj.klp_relas() {
        let sec = match sec {
            Ok(s) => s,
            Err(e) => return Err(report(host, module, &e)),
        };
        if sec.objname != want {
            continue;
        }
        if resolved.is_empty() {
            reserve_total(&mut resolved, obj.symbol_count())?;
            for _ in 0..obj.symbol_count() {
                push_reserved(&mut resolved, None).map_err(|_| Errno::ENOMEM)?;
            }
        }
        let Some(addr) = image.section_addr(sec.target) else {
            return Err(Errno::ENOEXEC);
        };
        let relas = match obj.relas(sec.section.index) {
            Ok(r) => r,
            Err(e) => return Err(report(host, module, &e)),
        };
        let bytes = stage.section(image, sec.target)?;
        // The entries a partnered one may need, as written: kept only for a section
        // that has partnered entries (none on most architectures), in room reserved
        // once for all of them.
        let (mut others, mut partnered) = (0usize, false);
        match obj.relas(sec.section.index) {
            Ok(all) => {
                for r in all {
                    if A::is_partnered(r.r_type) {
                        partnered = true;
                    } else {
                        others = others.saturating_add(1);
                    }
                }
            }
            Err(e) => return Err(report(host, module, &e)),
        }
        written.clear();
        if partnered {
            reserve_total(&mut written, others)?;
        }
        for (entry, r) in relas.enumerate() {
            if A::is_partnered(r.r_type) {
                continue;
            }
            let value = symbol_value(host, module, obj, &mut resolved, &sec, entry, &r)?;
            let reloc = Reloc {
                r_type: r.r_type,
                offset: r.offset,
                sym: value,
                addend: r.addend,
                external: true,
            };
            if let Err(e) = A::apply_relocation(bytes, addr, &reloc, &ctx) {
                return Err(apply_failed(host, module, &e, entry, &sec));
            }
            if partnered {
                push_reserved(&mut written, reloc).map_err(|_| Errno::ENOMEM)?;
            }
        }
        if !partnered {
            continue;
        }
        let relas = match obj.relas(sec.section.index) {
            Ok(r) => r,
            Err(e) => return Err(report(host, module, &e)),
        };
        for (entry, r) in relas.enumerate() {
            if !A::is_partnered(r.r_type) {
                continue;
            }
            // The partner's place: a label of the target section, or (the kernel's
            // rules) a livepatch symbol.
            let label = obj
                .symbol(r.sym as usize)
                .ok()
                .filter(|s| s.is_label_in(sec.target));
            let value = match label {
                Some(s) => addr.wrapping_add(s.value),
                None => symbol_value(host, module, obj, &mut resolved, &sec, entry, &r)?,
            };
            let reloc = Reloc {
                r_type: r.r_type,
                offset: r.offset,
                sym: value,
                addend: r.addend,
                external: false,
            };
            if let Err(e) = A::apply_partnered(bytes, addr, &reloc, &written) {
                return Err(apply_failed(host, module, &e, entry, &sec));
            }
        }
    }
    // Everything resolved and written in the copies: now the patch's memory.
    stage.commit(image)
}

/// Undoes [`write_relocs`] for the livepatch relocation sections of `target`
/// (`klp_clear_object_relocs`), so that they can be written again when the object
/// comes back. Like the kernel's, it does not fail the caller: what cannot be undone
/// (a malformed object, no memory for the staging copy) is logged and left.
pub fn clear_relocs<A: Arch, H: Host>(
    host: &mut H,
    module: &str,
    obj: &PatchObject<'_>,
    image: &mut dyn PatchImage,
    target: &str,
) {
    if let Err(e) = clear_staged::<A, H>(host, module, obj, image, target) {
        host.log(&Record {
            level: Level::Warn,
            func: "klp_clear_object_relocs",
            prefix: "",
            args: format_args!(
                "{module}: the relocations for {target} could not be undone ({})",
                e.to_kernel()
            ),
        });
    }
}

fn clear_staged<A: Arch, H: Host>(
    host: &mut H,
    module: &str,
    obj: &PatchObject<'_>,
    image: &mut dyn PatchImage,
    target: &str,
) -> KResult<()> {
    let mut stage = Stage::default();
    for sec in obj.klp_relas() {
        let sec = match sec {
            Ok(s) => s,
            Err(e) => return Err(report(host, module, &e)),
        };
        if sec.objname != target {
            continue;
        }
        let relas = match obj.relas(sec.section.index) {
            Ok(r) => r,
            Err(e) => return Err(report(host, module, &e)),
        };
        let bytes = stage.section(image, sec.target)?;
        // A partnered entry is undone like any other: its own field, whatever its
        // partner (the symbol plays no part in undoing).
        for r in relas {
            let reloc = Reloc {
                r_type: r.r_type,
                offset: r.offset,
                sym: 0,
                addend: r.addend,
                external: true,
            };
            A::clear_relocation(bytes, &reloc).map_err(|e| Errno::from_ret(e.errno()))?;
        }
    }
    stage.commit(image)
}
