//! Patch files loaded into the running process: the user-space counterpart of the
//! kernel's module loader for livepatch modules.
//!
//! A patch file is a relocatable ELF object in the livepatch format (`klp-convert`'s
//! output, see `klp::elf`). [`Process::load_file`] does what `insmod` of a livepatch
//! module does:
//!
//! 1. reads and checks the file: signature policy ([`verify`]), machine, the build id of
//!    every object it patches;
//! 2. lays its allocated sections out in memory within reach of the object it patches
//!    (each architecture's branch and PC-relative ranges);
//! 3. links the ordinary relocations (symbols of the patch itself, and symbols of the
//!    process in the dynamic linker's order), with a call stub or an address slot
//!    where a target is out of reach;
//! 4. writes the `.klp.rela` sections of the objects present, with the symbols the core
//!    resolves (`.klp.sym.<object>.<name>,<sympos>`);
//! 5. maps the text read-only and executable;
//! 6. enables the patch its `.init.klp_objects` describes.
//!
//! The sections of an object that is not loaded yet are written when it arrives
//! (`dlopen`) and cleared when it goes.

pub mod describe;
mod image;
mod inlined;
mod link;
pub mod verify;

use std::collections::HashMap;
use std::ffi::{CString, c_char, c_int};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use klp::arch::{Arch, Endian, Native};
use klp::elf::PatchObject;
use klp::elf::desc::Pointer;
use klp::{CallbackCx, Callbacks, Errno, FuncDesc, ObjectDesc, PatchDesc};

use crate::process::ProcessHost;
use crate::symbols::{LoadedObject, Symbol};

pub(crate) use image::Image;

/// How a patch file is accepted.
#[derive(Clone, Debug, Default)]
pub struct LoadOptions {
    /// Refuse a file without a valid signature by a trusted key.
    pub require_signature: bool,
    /// The directory of trusted public keys (`None`: [`verify::default_keys_dir`]).
    pub trusted_keys: Option<PathBuf>,
}

/// A patch file that was loaded and enabled.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Loaded {
    /// The patch (and patch module) name.
    pub name: String,
    /// Warnings for the user (inlined callers, …), one sentence each.
    pub warnings: Vec<String>,
    /// The signer's key name, when the file is signed by a trusted key.
    pub signer: Option<String>,
}

/// Why a patch file was refused. Nothing of it remains in the process.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LoadError {
    /// The kernel-style error number.
    pub errno: Errno,
    /// One sentence for the user, the errno in brackets, and a remedy when there is one.
    pub message: String,
}

impl std::fmt::Display for LoadError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for LoadError {}

impl LoadError {
    /// An error with its message; `message` already names the errno.
    pub fn new(errno: Errno, message: impl Into<String>) -> Self {
        LoadError {
            errno,
            message: message.into(),
        }
    }
}

/// The errno as messages show it in brackets: `-EINVAL`, or `-22` without a name.
pub fn errno_text(e: Errno) -> String {
    match e.name() {
        Some(n) => format!("-{n}"),
        None => e.to_kernel().to_string(),
    }
}

/// Reads `path` for [`crate::Process::load_file`].
pub fn read_file(path: &Path) -> Result<Vec<u8>, LoadError> {
    std::fs::read(path).map_err(|e| {
        let errno = Errno::from_ret(-e.raw_os_error().unwrap_or(libc::EIO));
        LoadError::new(
            errno,
            format!(
                "cannot read the patch file {} ({}): {e}",
                path.display(),
                errno_text(errno)
            ),
        )
    })
}

/// A symbol name for people: Rust and C++ names demangled, others as they are.
pub fn demangle(name: &str) -> String {
    if let Ok(d) = rustc_demangle::try_demangle(name) {
        return format!("{d:#}");
    }
    if name.starts_with("_Z")
        && let Ok(sym) = cpp_demangle::Symbol::new(name)
        && let Ok(d) = sym.demangle()
    {
        return d;
    }
    name.to_string()
}

/// An object as messages name it: "the program" for the executable (`vmlinux` in the
/// livepatch format), the library's name otherwise.
pub fn object_label(objname: &str) -> String {
    if objname == "vmlinux" {
        "the program".to_string()
    } else {
        format!("library '{objname}'")
    }
}

/// A patch file the process holds: its memory, its bytes, and its index entry.
#[derive(Debug)]
pub(crate) struct PatchFile {
    pub(crate) image: Image,
    /// The ELF part of the file (a signature stripped).
    pub(crate) elf: Arc<[u8]>,
}

/// The C view of an object that a patch file's callback gets (klp.h's
/// `struct klp_object`).
#[repr(C)]
#[derive(Debug)]
pub struct KlpObject {
    /// The object's name: NULL for the program itself, else the library's name.
    pub name: *const c_char,
    /// Whether the object is patched now.
    pub patched: c_int,
}

/// The callback signatures of klp.h: `int pre_patch(struct klp_object *)` and
/// `void post_patch(struct klp_object *)` (and the two unpatch ones).
type PreFn = unsafe extern "C" fn(*mut KlpObject) -> c_int;
type PostFn = unsafe extern "C" fn(*mut KlpObject);

/// The callbacks of one object of a patch file: addresses in its text.
#[derive(Debug)]
struct FileCallbacks {
    fns: [Option<u64>; 4],
}

impl FileCallbacks {
    fn call(&self, cx: &mut CallbackCx<'_, ProcessHost>, k: usize) -> c_int {
        let Some(Some(f)) = self.fns.get(k).copied() else {
            return 0;
        };
        let name = cx.obj_name().and_then(|n| CString::new(n).ok());
        let mut o = KlpObject {
            name: name.as_ref().map_or(std::ptr::null(), |n| n.as_ptr()),
            patched: c_int::from(k == 1 || k == 2),
        };
        if k == 0 {
            // SAFETY: `f` is the address of a callback of a patch file that was
            // accepted (signature policy, build ids) and linked into text that stays
            // mapped while its patch exists; klp.h declares pre-patch callbacks as
            // `int (*)(struct klp_object *)`, which `KlpObject` mirrors; `o` lives
            // across the call.
            unsafe { std::mem::transmute::<u64, PreFn>(f)(&mut o) }
        } else {
            // SAFETY: as above, for the `void (*)(struct klp_object *)` callbacks.
            unsafe { std::mem::transmute::<u64, PostFn>(f)(&mut o) };
            0
        }
    }
}

impl Callbacks<ProcessHost> for FileCallbacks {
    fn pre_patch(&self, cx: &mut CallbackCx<'_, ProcessHost>) -> i32 {
        self.call(cx, 0)
    }
    fn post_patch(&self, cx: &mut CallbackCx<'_, ProcessHost>) {
        self.call(cx, 1);
    }
    fn pre_unpatch(&self, cx: &mut CallbackCx<'_, ProcessHost>) {
        self.call(cx, 2);
    }
    fn post_unpatch(&self, cx: &mut CallbackCx<'_, ProcessHost>) {
        self.call(cx, 3);
    }
}

/// Where a description's pointer points in the loaded image.
fn address(img: &Image, p: &Pointer<'_>) -> Option<u64> {
    img.section_addr(p.symbol.shndx as usize)?
        .checked_add(p.symbol.value)?
        .checked_add_signed(p.addend)
}

/// The patch the file describes (`.init.klp_objects`), its pointers in the image.
fn description(
    name: &str,
    obj: &PatchObject<'_>,
    img: &Image,
) -> Result<PatchDesc<ProcessHost>, LoadError> {
    let bad = |e: &klp::elf::ElfError<'_>| image::malformed(e);
    let mut desc = PatchDesc::new(name).replace(obj.modinfo().any(|e| e == "klp_replace=Y"));
    let mut any = false;
    for o in obj.klp_objects().map_err(|e| bad(&e))? {
        let o = o.map_err(|e| bad(&e))?;
        any = true;
        let mut od = match o.name {
            None => ObjectDesc::vmlinux(),
            Some(m) => ObjectDesc::module(m),
        };
        for f in obj.klp_funcs(&o) {
            let f = f.map_err(|e| bad(&e))?;
            let Some(new) = address(img, &f.new_func) else {
                return Err(LoadError::new(
                    Errno::ENOEXEC,
                    format!(
                        "the replacement '{}' of '{}' is not in the patch's loaded sections ({})",
                        demangle(f.new_func.symbol.name),
                        demangle(f.old_name),
                        errno_text(Errno::ENOEXEC)
                    ),
                ));
            };
            od = od.func(FuncDesc::new(f.old_name, new).sympos(f.sympos));
        }
        if o.callbacks.iter().any(Option::is_some) {
            let fns = o.callbacks.map(|c| c.and_then(|p| address(img, &p)));
            od = od.callbacks(Arc::new(FileCallbacks { fns }));
        }
        desc = desc.object(od);
    }
    if !any {
        return Err(LoadError::new(
            Errno::EINVAL,
            format!(
                "the patch file describes no patch ({}): give klp-convert a manifest with a \"patch\" (-m)",
                errno_text(Errno::EINVAL)
            ),
        ));
    }
    Ok(desc)
}

/// The patch's own symbols (functions and data of its loaded sections), for the index:
/// frames in patch code are named, and its text counts as code.
fn patch_object(name: &str, obj: &PatchObject<'_>, img: &Image) -> LoadedObject {
    let mut symbols = Vec::new();
    for s in obj.symbols().flatten() {
        let kind = s.info & 0xf;
        if s.name.is_empty() || !(kind == 1 || kind == 2) || !obj.is_section_index(s.shndx) {
            continue;
        }
        let Some(base) = img.section_addr(s.shndx as usize) else {
            continue;
        };
        symbols.push(Symbol {
            name: s.name.to_string(),
            addr: base.wrapping_add(s.value),
            size: s.size,
            func: kind == 2,
            st_other: s.other,
        });
    }
    LoadedObject {
        name: Some(format!("[patch {name}]")),
        path: String::new(),
        bias: img.range().0,
        text: vec![img.text],
        symbols,
        table: ".symtab",
    }
}

/// Refuses a function to replace that has no patch site, with the flags that give it
/// one (the core would refuse it too, with the kernel's message in the log).
fn check_sites(host: &ProcessHost, obj: &PatchObject<'_>) -> Result<(), LoadError> {
    let idx = host.symbols().clone();
    for o in obj.klp_objects().into_iter().flatten().flatten() {
        if o.name.is_some_and(|m| !idx.has_module(m)) {
            continue;
        }
        for f in obj.klp_funcs(&o).flatten() {
            let c = idx.candidates(o.name, f.old_name);
            let addr = match f.sympos {
                0 if c.len() == 1 => c.first(),
                0 => None,
                n => usize::try_from(n - 1).ok().and_then(|i| c.get(i)),
            };
            // A function patched already has its site rewritten: it is not looked at.
            if let Some(&a) = addr
                && host.site_state(a).is_none()
                && redirect::sites::find(&idx, a).is_none()
            {
                return Err(LoadError::new(
                    Errno::EINVAL,
                    format!(
                        "no patch site at the entry of '{}' ({}): build with {}",
                        demangle(f.old_name),
                        errno_text(Errno::EINVAL),
                        <Native as Arch>::SITE_FLAGS
                    ),
                ));
            }
        }
    }
    Ok(())
}

/// The objects a patch file names (its description and its `.klp.rela` sections).
fn named_objects(obj: &PatchObject<'_>) -> Vec<String> {
    let mut v: Vec<String> = Vec::new();
    for o in obj.klp_objects().into_iter().flatten().flatten() {
        let n = o.name.unwrap_or("vmlinux").to_string();
        if !v.contains(&n) {
            v.push(n);
        }
    }
    for r in obj.klp_relas().flatten() {
        if !v.iter().any(|n| n == r.objname) {
            v.push(r.objname.to_string());
        }
    }
    v
}

/// The address range of the object a patch is placed near: the program's if the patch
/// names it, else the first named library that is loaded, else the program's.
fn anchor(host: &ProcessHost, names: &[String]) -> (u64, u64) {
    let idx = host.symbols();
    let range = |o: &LoadedObject| {
        let lo = o.text.iter().map(|t| t.0).min().unwrap_or(0);
        let hi = o.text.iter().map(|t| t.1).max().unwrap_or(0);
        (lo, hi)
    };
    let find = |n: &str| {
        idx.objects()
            .iter()
            .find(|o| o.name.as_deref() == (n != "vmlinux").then_some(n))
            .map(|o| range(o))
    };
    if names.iter().any(|n| n == "vmlinux") {
        return find("vmlinux").unwrap_or((0, 0));
    }
    names
        .iter()
        .find_map(|n| find(n))
        .or_else(|| find("vmlinux"))
        .unwrap_or((0, 0))
}

impl crate::Process {
    /// Loads the patch file at `path` and enables its patch (see the module docs).
    /// On error nothing of it remains in the process.
    pub fn load_file(&'static self, path: &Path, opts: &LoadOptions) -> Result<Loaded, LoadError> {
        let bytes = read_file(path)?;
        self.load_bytes(path, bytes, opts)
    }

    /// [`crate::Process::load_file`] of a file already read (`path` names it in
    /// messages and gives the patch name when the file has none).
    pub fn load_bytes(
        &'static self,
        path: &Path,
        bytes: Vec<u8>,
        opts: &LoadOptions,
    ) -> Result<Loaded, LoadError> {
        if !klp::arch::SUPPORTED {
            return Err(LoadError::new(
                Errno::ENOSYS,
                format!(
                    "klp cannot load patch files on this architecture ({})",
                    errno_text(Errno::ENOSYS)
                ),
            ));
        }
        let keys = opts
            .trusted_keys
            .clone()
            .unwrap_or_else(verify::default_keys_dir);
        let (elf, signer) = verify::check(&bytes, opts.require_signature, &keys)?;
        let elf: Arc<[u8]> = elf.into();
        drop(bytes);
        let obj = PatchObject::parse(&elf).map_err(|e| image::malformed(&e))?;
        if obj.machine() != Native::ELF_MACHINE
            || obj.is_big_endian() != (Native::ENDIAN == Endian::Big)
        {
            return Err(LoadError::new(
                Errno::ENOEXEC,
                format!(
                    "the patch file was built for another architecture (ELF machine {}, this process is {}) ({}): build it with the compiler for {}",
                    obj.machine(),
                    Native::NAME,
                    errno_text(Errno::ENOEXEC),
                    Native::NAME
                ),
            ));
        }
        if !obj.is_livepatch() {
            return Err(LoadError::new(
                Errno::ENOEXEC,
                format!(
                    "{} is not a livepatch object ({}): convert it with klp-convert",
                    path.display(),
                    errno_text(Errno::ENOEXEC)
                ),
            ));
        }
        let name = describe::patch_name(&obj, path);
        if name.is_empty() || name.len() > klp::elf::OBJNAME_MAX {
            return Err(LoadError::new(
                Errno::EINVAL,
                format!(
                    "the patch name '{name}' is empty or longer than {} characters ({})",
                    klp::elf::OBJNAME_MAX,
                    errno_text(Errno::EINVAL)
                ),
            ));
        }
        // The program and every loaded library the patch names must be the builds it
        // was made for; a library that arrives later is checked on arrival.
        verify::check_build_ids(&elf)?;
        let names = named_objects(&obj);
        // Reading the objects' debug information may take a while: outside the core lock.
        let warnings = inlined::warnings(&self.symbols(), &obj);
        let r = self.with_core(|klp, host| {
            if host.patch_module_loaded(&name) {
                return Err(LoadError::new(
                    Errno::EEXIST,
                    format!(
                        "a patch named '{name}' is loaded already ({}): disable it first (klpctl disable {name}), or give the new one another name",
                        errno_text(Errno::EEXIST)
                    ),
                ));
            }
            check_sites(host, &obj)?;
            // A disabled patch of that name: its file goes now.
            host.drop_patch_file(&name);
            let (lo, hi) = anchor(host, &names);
            let mut img = Image::map(&obj, lo, hi)?;
            link::link_ordinary(&mut img, &obj)?;
            if names.iter().any(|n| n == "vmlinux") {
                link::link_klp(host, &mut img, &obj, "vmlinux")?;
            }
            img.seal()?;
            let desc = description(&name, &obj, &img)?;
            let indexed = Arc::new(patch_object(&name, &obj, &img));
            let file = PatchFile {
                image: img,
                elf: elf.clone(),
            };
            host.add_patch_file(&name, file, indexed);
            let r = klp.enable_patch(host, desc);
            if let Err(e) = r {
                host.patch_module_put_back(&name);
                host.drop_patch_file(&name);
                return Err(LoadError::new(
                    e,
                    format!(
                        "the patch '{name}' was refused ({}): the process's log says why (klpctl log)",
                        errno_text(e)
                    ),
                ));
            }
            Ok(())
        });
        r.map(|()| Loaded {
            name,
            warnings,
            signer,
        })
    }

    /// Removes the patch file `name` loaded by [`crate::Process::load_file`]
    /// (`rmmod`): refused with `-EBUSY` while its patch is enabled or in transition.
    pub fn unload(&self, name: &str) -> Result<(), LoadError> {
        self.with_core(|_, host| {
            if host.patch_module_loaded(name) {
                return Err(LoadError::new(
                    Errno::EBUSY,
                    format!(
                        "the patch '{name}' is still enabled or in transition ({}): disable it first (klpctl disable {name}) and wait for the transition to end",
                        errno_text(Errno::EBUSY)
                    ),
                ));
            }
            if !host.drop_patch_file(name) {
                return Err(LoadError::new(
                    Errno::ENOENT,
                    format!(
                        "no patch file named '{name}' is loaded ({}): klpctl list shows the patches",
                        errno_text(Errno::ENOENT)
                    ),
                ));
            }
            Ok(())
        })
    }
}

/// The relocations of `objname` of the patch file of `patch_module`, written when that
/// object arrives (`Host::apply_object_relocs`).
pub(crate) fn object_arrived(
    host: &mut ProcessHost,
    file: &mut PatchFile,
    objname: &str,
) -> Result<(), LoadError> {
    let elf = file.elf.clone();
    for (o, id) in verify::patch_build_ids(&elf)? {
        if o == objname {
            verify::check_build_id(&o, &id)?;
        }
    }
    let obj = PatchObject::parse(&elf).map_err(|e| image::malformed(&e))?;
    link::link_klp(host, &mut file.image, &obj, objname)
}

/// Undoes [`object_arrived`] (`Host::clear_object_relocs`).
pub(crate) fn object_left(file: &mut PatchFile, objname: &str) -> Result<(), LoadError> {
    let elf = file.elf.clone();
    let obj = PatchObject::parse(&elf).map_err(|e| image::malformed(&e))?;
    link::unlink_klp(&mut file.image, &obj, objname)
}

/// Patch files by patch name (the process host's table).
pub(crate) type PatchFiles = HashMap<String, (PatchFile, Arc<LoadedObject>)>;

use crate::redirect;
