//! Livepatch modules loaded from ELF files.
//!
//! Besides its built-in modules, the simulated kernel loads livepatch modules from
//! relocatable ELF objects (for example `klp-convert`'s output), in the order of the
//! kernel's `load_module`: the sections are laid out in module memory and the
//! object's functions defined; the `.klp.rela.vmlinux.*` sections are written (the
//! relocation phase, before anything runs); the module arrives
//! ([`klp::Klp::module_coming`]); its parameters are parsed; its init reads the patch
//! description (`.init.klp_objects`) and enables the patch. Module-specific sections
//! are written by the core's `klp_init_object_loaded` when their module is present,
//! through [`klp::Host::apply_object_relocs`], and undone when it goes.
//!
//! The simulator does not execute machine code: a function of an ELF module, when
//! called, shows `<module>: <function>`. Ordinary relocations (calls to exported
//! symbols) are not written; the livepatch relocation sections are, byte for byte, by
//! the patch's architecture.

use std::rc::Rc;
use std::sync::Arc;

use klp::elf::desc::Pointer;
use klp::elf::reloc::{PatchImage, clear_relocs, write_relocs};
use klp::elf::{ElfError, PatchObject};
use klp::{Addr, CallbackCx, Callbacks, Errno, FuncDesc, KResult, ObjectDesc, PatchDesc};

use crate::failalloc;
use crate::kernel::{Kernel, ModError};
use crate::stackmodel::ArchModel;
use crate::world::{LoadedModule, ModState, World};
use klp_arch::Arch;
use klp_backends::Visit;

/// The loaded sections of an ELF module.
#[derive(Clone, Debug)]
pub struct ElfImage {
    /// The file, as loaded.
    pub file: Rc<[u8]>,
    /// Per section index: where it is loaded and its bytes (`None`: not loaded).
    pub sections: Vec<Option<(Addr, Vec<u8>)>>,
}

impl ElfImage {
    /// A digest of every loaded section's bytes (for snapshots).
    pub fn digest(&self) -> u64 {
        let mut h: u64 = 0xcbf2_9ce4_8422_2325;
        for (a, b) in self.sections.iter().flatten() {
            for x in a.to_le_bytes().iter().chain(b) {
                h = (h ^ u64::from(*x)).wrapping_mul(0x100_0000_01b3);
            }
        }
        h
    }

    /// The loaded bytes of the first section named `name`.
    pub fn section_by_name(&self, name: &str) -> Option<&[u8]> {
        let obj = PatchObject::parse(&self.file).ok()?;
        let s = obj.section_by_name(name)?;
        self.section_bytes(s.index)
    }
}

impl PatchImage for ElfImage {
    fn section_addr(&self, index: usize) -> Option<Addr> {
        self.sections.get(index)?.as_ref().map(|s| s.0)
    }

    fn section_bytes(&self, index: usize) -> Option<&[u8]> {
        self.sections.get(index)?.as_ref().map(|s| s.1.as_slice())
    }

    fn write_section(&mut self, index: usize, bytes: &[u8]) -> KResult<()> {
        let s = self
            .sections
            .get_mut(index)
            .and_then(Option::as_mut)
            .ok_or(Errno::EINVAL)?;
        if s.1.len() != bytes.len() {
            return Err(Errno::EINVAL);
        }
        s.1.copy_from_slice(bytes);
        Ok(())
    }
}

/// Runs the core's relocation writer (or clearer) for the object's architecture.
fn by_machine(
    w: &mut World,
    module: &str,
    obj: &PatchObject<'_>,
    image: &mut ElfImage,
    target: Option<&str>,
    clear: bool,
) -> KResult<()> {
    struct Run<'a, 'o> {
        w: &'a mut World,
        module: &'a str,
        obj: &'a PatchObject<'o>,
        image: &'a mut ElfImage,
        target: Option<&'a str>,
        clear: bool,
    }
    impl Visit for Run<'_, '_> {
        type Out = KResult<()>;
        fn visit<A: Arch>(self) -> KResult<()> {
            let Run {
                w,
                module,
                obj,
                image,
                target,
                clear,
            } = self;
            failalloc::core(|| {
                if clear {
                    clear_relocs::<A, _>(w, module, obj, image, target.unwrap_or("vmlinux"));
                    Ok(())
                } else {
                    write_relocs::<A, _>(w, module, obj, image, target)
                }
            })
        }
    }
    let m = obj.machine();
    let run = Run {
        w,
        module,
        obj,
        image,
        target,
        clear,
    };
    klp_backends::by_machine(m, run).unwrap_or_else(|run| {
        run.w
            .printk(&format!("{module}: no relocation support for machine {m}"));
        Err(Errno::ENOEXEC)
    })
}

/// `apply_object_relocs` / `clear_object_relocs` of [`World`] for an ELF module.
pub(crate) fn object_relocs(w: &mut World, module: &str, obj: &str, clear: bool) -> KResult<()> {
    let Some(mut image) = w.elf_images.remove(module) else {
        return Ok(());
    };
    let file = image.file.clone();
    let r = match PatchObject::parse(&file) {
        Ok(parsed) => by_machine(w, module, &parsed, &mut image, Some(obj), clear),
        Err(_) => Err(Errno::ENOEXEC),
    };
    w.elf_images.insert(module.to_string(), image);
    r
}

/// The callbacks of an ELF module: each shows `<module>: <function> <object>`.
struct ElfCallbacks {
    module: String,
    names: [Option<String>; 4],
}

impl ElfCallbacks {
    fn show(&self, cx: &mut CallbackCx<'_, World>, k: usize) {
        let _h = failalloc::host();
        if let Some(Some(name)) = self.names.get(k) {
            let obj = cx.obj_name().unwrap_or("vmlinux").to_string();
            cx.host.pr_mod(&self.module, &format!("{name} {obj}"));
        }
    }
}

impl Callbacks<World> for ElfCallbacks {
    fn pre_patch(&self, cx: &mut CallbackCx<'_, World>) -> i32 {
        self.show(cx, 0);
        0
    }
    fn post_patch(&self, cx: &mut CallbackCx<'_, World>) {
        self.show(cx, 1);
    }
    fn pre_unpatch(&self, cx: &mut CallbackCx<'_, World>) {
        self.show(cx, 2);
    }
    fn post_unpatch(&self, cx: &mut CallbackCx<'_, World>) {
        self.show(cx, 3);
    }
}

fn malformed(k: &mut Kernel, name: &str, e: &ElfError<'_>) -> ModError {
    k.world.printk(&format!("{name}: {e}"));
    ModError::Errno(Errno::ENOEXEC)
}

/// The address a pointer of the description points to, in the loaded image.
fn address(image: &ElfImage, p: &Pointer<'_>) -> Option<Addr> {
    let base = image.section_addr(p.symbol.shndx as usize)?;
    base.checked_add(p.symbol.value)?
        .checked_add_signed(p.addend)
}

/// The patch the module's description describes.
fn description(k: &mut Kernel, name: &str, image: &ElfImage) -> Result<PatchDesc<World>, ModError> {
    let file = image.file.clone();
    let obj = PatchObject::parse(&file).map_err(|e| malformed(k, name, &e))?;
    let mut desc = PatchDesc::new(name).replace(obj.modinfo().any(|e| e == "klp_replace=Y"));
    let objects = obj.klp_objects().map_err(|e| malformed(k, name, &e))?;
    for o in objects {
        let o = o.map_err(|e| malformed(k, name, &e))?;
        let mut od = match o.name {
            None => ObjectDesc::vmlinux(),
            Some(m) => ObjectDesc::module(m),
        };
        for f in obj.klp_funcs(&o) {
            let f = f.map_err(|e| malformed(k, name, &e))?;
            let Some(new) = address(image, &f.new_func) else {
                k.world.printk(&format!(
                    "{name}: {} is not in the module",
                    f.new_func.symbol.name
                ));
                return Err(ModError::Errno(Errno::ENOEXEC));
            };
            od = od.func(FuncDesc::new(f.old_name, new).sympos(f.sympos));
        }
        if o.callbacks.iter().any(Option::is_some) {
            let names = o.callbacks.map(|c| c.map(|p| p.symbol.name.to_string()));
            od = od.callbacks(Arc::new(ElfCallbacks {
                module: name.to_string(),
                names,
            }));
        }
        desc = desc.object(od);
    }
    Ok(desc)
}

impl Kernel {
    /// Makes the ELF livepatch module `file` loadable as `name` (`insmod name`).
    pub fn add_elf_module(&mut self, name: &str, file: Vec<u8>) {
        self.elf_catalog.insert(name.to_string(), file.into());
    }

    /// `insmod` of an ELF module, in `load_module`'s order (see the module docs).
    pub(crate) fn insmod_elf(
        &mut self,
        name: &str,
        file: Rc<[u8]>,
        params: &[String],
    ) -> Result<(), ModError> {
        let obj = match PatchObject::parse(&file) {
            Ok(o) => o,
            Err(e) => return Err(malformed(self, name, &e)),
        };
        // `elf_validity_check`: a module for another machine is refused.
        // Without a model the simulated kernel is an x86_64 one (EM_X86_64).
        let machine = self.world.stack_model.map_or(62, ArchModel::machine);
        if obj.machine() != machine {
            self.world.printk(&format!(
                "Invalid architecture in ELF header: {}",
                obj.machine()
            ));
            return Err(ModError::Errno(Errno::ENOEXEC));
        }
        if !obj.is_livepatch() {
            self.world
                .printk(&format!("{name}: not a livepatch module (no livepatch=Y)"));
            return Err(ModError::Errno(Errno::ENOEXEC));
        }
        if !self.world.tainted {
            self.world.tainted = true;
            self.world
                .printk(&format!("{name}: tainting kernel with TAINT_LIVEPATCH"));
        }
        // Layout: every allocated section in module memory; its functions defined.
        let mut image = ElfImage {
            file: file.clone(),
            sections: Vec::new(),
        };
        let mut bases = Vec::new();
        for s in obj.sections() {
            let s = match s {
                Ok(s) => s,
                Err(e) => return Err(malformed(self, name, &e)),
            };
            if s.is_alloc() && !s.is_klp_rela() && s.sh_type != 4 {
                let data = match obj.section_data(s.index) {
                    Ok(d) if s.sh_type != 8 => d.to_vec(),
                    Ok(_) => vec![0; usize::try_from(s.size).unwrap_or(0)],
                    Err(e) => return Err(malformed(self, name, &e)),
                };
                let addr = self.world.reserve_text(s.size.max(1), s.align.max(1));
                bases.push((s.index, addr));
                image.sections.push(Some((addr, data)));
            } else {
                image.sections.push(None);
            }
        }
        for sym in obj.symbols().flatten() {
            let is_func = sym.info & 0xf == 2;
            if !is_func || !obj.is_section_index(sym.shndx) {
                continue;
            }
            let Some(base) = image.section_addr(sym.shndx as usize) else {
                continue;
            };
            let text = format!("{name}: {}\n", sym.name);
            self.world.define_at(
                Some(name),
                sym.name,
                base + sym.value,
                sym.size,
                true,
                Rc::new(move |_, _| text.clone()),
            );
        }
        // The relocation phase: vmlinux's livepatch sections (every livepatch section's
        // name is checked here).
        if let Err(e) = by_machine(&mut self.world, name, &obj, &mut image, None, false) {
            self.unlink_elf(name);
            return Err(ModError::Errno(e));
        }
        self.world.modules.insert(
            name.to_string(),
            LoadedModule {
                name: name.to_string(),
                state: ModState::Coming,
                refcnt: 0,
                params: Default::default(),
                livepatch: true,
                patch: None,
            },
        );
        self.world.elf_images.insert(name.to_string(), image);
        if let Err(e) = failalloc::core(|| self.klp.module_coming(&mut self.world, name)) {
            self.unlink_elf(name);
            return Err(ModError::Errno(e));
        }
        for kv in params {
            let k = kv.split_once('=').map_or(kv.as_str(), |(k, _)| k);
            self.world
                .printk(&format!("{name}: unknown parameter '{k}' ignored"));
        }
        let image = self.world.elf_images.get(name).cloned();
        let r = match image {
            Some(img) => description(self, name, &img)
                .and_then(|d| crate::modules::enable(self, name, d).map_err(ModError::Errno)),
            None => Err(ModError::Errno(Errno::ENOEXEC)),
        };
        if let Err(e) = r {
            if let Some(m) = self.world.modules.get_mut(name) {
                m.state = ModState::Going;
            }
            failalloc::core(|| self.klp.module_going(&mut self.world, name));
            self.unlink_elf(name);
            return Err(e);
        }
        if let Some(m) = self.world.modules.get_mut(name) {
            m.state = ModState::Live;
        }
        Ok(())
    }

    /// Removes everything of an ELF module.
    pub(crate) fn unlink_elf(&mut self, name: &str) {
        self.world.elf_images.remove(name);
        self.unlink_module(name);
    }
}
