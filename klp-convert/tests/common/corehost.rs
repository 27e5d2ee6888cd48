//! The livepatch core on the test's side: a host whose symbol lookup answers from
//! the `System.map`-style text the test gave `klp-convert` as its target, and the
//! patch's sections "loaded" at addresses the test chooses, so the core's
//! `klp::elf::reloc::write_relocs` can be run on converted objects of every arch.

use klp::elf::PatchObject;
use klp::elf::reloc::{PatchImage, clear_relocs, write_relocs};
use klp::{Addr, KResult};
use klp_arch::{Arch, RelocCtx};

use super::image::Image;
use super::symhost::SymHost;

/// A host that answers symbol lookups from a symbol map and records the log (klp's
/// own test host, its table filled from the map).
pub type MapHost = SymHost;

impl SymHost {
    /// The defined symbols of `ADDRESS TYPE NAME [\[module\]]` lines.
    pub fn from_map(text: &str) -> SymHost {
        let mut h = SymHost::default();
        for line in text.lines() {
            let f: Vec<&str> = line.split_whitespace().collect();
            if f.len() < 3 || matches!(f[1], "U" | "w" | "v") {
                continue;
            }
            let addr = u64::from_str_radix(f[0], 16).expect("hex address");
            let obj = f
                .get(3)
                .map(|m| m.trim_start_matches('[').trim_end_matches(']').to_string());
            h.table
                .entry((obj, f[2].to_string()))
                .or_default()
                .push(addr);
        }
        h
    }
}

/// The patch module's allocated sections, each at the address the test chose
/// (by section name), and the module's TOC pointer for ppc64le.
pub struct Loaded {
    /// The sections (klp's test image).
    pub image: Image,
    /// `.TOC.` (r2) of the patch module.
    pub toc: Option<u64>,
}

impl Loaded {
    /// Loads every allocated section of `obj`, then moves the named ones to the
    /// given addresses.
    pub fn load(obj: &PatchObject<'_>, at: &[(&str, u64)], toc: Option<u64>) -> Loaded {
        let mut image = Image::load(obj);
        for &(name, addr) in at {
            let s = obj
                .section_by_name(name)
                .unwrap_or_else(|| panic!("no section {name}"));
            image.secs[s.index].as_mut().expect("allocated").0 = addr;
        }
        Loaded { image, toc }
    }

    /// The bytes of the section named `name`.
    pub fn bytes(&self, obj: &PatchObject<'_>, name: &str) -> Vec<u8> {
        let s = obj.section_by_name(name).expect("section");
        self.image.bytes(s.index).to_vec()
    }
}

impl PatchImage for Loaded {
    fn section_addr(&self, index: usize) -> Option<Addr> {
        self.image.section_addr(index)
    }
    fn section_bytes(&self, index: usize) -> Option<&[u8]> {
        self.image.section_bytes(index)
    }
    fn write_section(&mut self, index: usize, bytes: &[u8]) -> KResult<()> {
        self.image.write_section(index, bytes)
    }
    fn reloc_ctx(&self) -> RelocCtx {
        RelocCtx { toc: self.toc }
    }
}

fn write_as<A: Arch>(
    host: &mut MapHost,
    obj: &PatchObject<'_>,
    image: &mut Loaded,
    target: Option<&str>,
) -> KResult<()> {
    write_relocs::<A, _>(host, "livepatch_test", obj, image, target)
}

fn clear_as<A: Arch>(host: &mut MapHost, obj: &PatchObject<'_>, image: &mut Loaded, target: &str) {
    clear_relocs::<A, _>(host, "livepatch_test", obj, image, target);
}

/// `write_relocs` with the back-end of `arch`.
pub fn write_for(
    arch: klp_convert::Arch,
    host: &mut MapHost,
    obj: &PatchObject<'_>,
    image: &mut Loaded,
    target: Option<&str>,
) -> KResult<()> {
    struct W<'a, 'o> {
        host: &'a mut MapHost,
        obj: &'a PatchObject<'o>,
        image: &'a mut Loaded,
        target: Option<&'a str>,
    }
    impl klp_backends::Visit for W<'_, '_> {
        type Out = KResult<()>;
        fn visit<A: Arch>(self) -> KResult<()> {
            write_as::<A>(self.host, self.obj, self.image, self.target)
        }
    }
    let w = W {
        host,
        obj,
        image,
        target,
    };
    klp_backends::by_name(arch.name(), w).unwrap_or(Err(klp::Errno::ENOEXEC))
}

/// `clear_relocs` with the back-end of `arch`.
pub fn clear_for(
    arch: klp_convert::Arch,
    host: &mut MapHost,
    obj: &PatchObject<'_>,
    image: &mut Loaded,
    target: &str,
) {
    struct C<'a, 'o> {
        host: &'a mut MapHost,
        obj: &'a PatchObject<'o>,
        image: &'a mut Loaded,
        target: &'a str,
    }
    impl klp_backends::Visit for C<'_, '_> {
        type Out = ();
        fn visit<A: Arch>(self) {
            clear_as::<A>(self.host, self.obj, self.image, self.target)
        }
    }
    let c = C {
        host,
        obj,
        image,
        target,
    };
    let _ = klp_backends::by_name(arch.name(), c);
}

/// The patch description as the core reads it: per object its name (`vmlinux` for
/// the record without one), its functions (old name, new function's symbol,
/// sympos) and its callbacks' symbol names.
pub type CoreDescription = Vec<(String, Vec<(String, String, u64)>, [Option<String>; 4])>;

pub fn core_description(obj: &PatchObject<'_>) -> CoreDescription {
    let mut out = Vec::new();
    for o in obj.klp_objects().expect("description") {
        let o = o.expect("object record");
        let funcs = obj
            .klp_funcs(&o)
            .map(|f| {
                let f = f.expect("function record");
                assert_eq!(f.new_func.addend, 0, "new_func points at its symbol");
                (
                    f.old_name.to_string(),
                    f.new_func.symbol.name.to_string(),
                    f.sympos,
                )
            })
            .collect::<Vec<_>>();
        assert_eq!(o.nr_funcs as usize, funcs.len());
        let callbacks = o.callbacks.map(|c| c.map(|p| p.symbol.name.to_string()));
        out.push((o.name.unwrap_or("vmlinux").to_string(), funcs, callbacks));
    }
    out
}

/// The description a manifest asks for, in [`CoreDescription`]'s form; `by_name`
/// adds the callbacks the patch gives by their function names (object, kind
/// index, function).
pub fn manifest_description(
    m: &klp_convert::Manifest,
    by_name: &[(&str, usize, &str)],
) -> CoreDescription {
    let p = m.patch.as_ref().expect("patch");
    p.objects
        .iter()
        .map(|o| {
            let mut callbacks = o.callbacks.by_kind().map(|c| c.map(str::to_string));
            for &(obj, kind, f) in by_name {
                if obj == o.object {
                    callbacks[kind] = Some(f.to_string());
                }
            }
            (
                o.object.clone(),
                o.funcs
                    .iter()
                    .map(|f| (f.old.clone(), f.new.clone(), f.sympos))
                    .collect(),
                callbacks,
            )
        })
        .collect()
}
