//! The symbol index of the loaded objects.
//!
//! The process's objects are enumerated with `dl_iterate_phdr`. The main executable is
//! the core's *vmlinux* (object `None`); every other loaded object is a *module* named
//! by [`module_name`]: the file's basename up to its first `.so` (`/usr/lib/libz.so.1.2`
//! → `libz`, `libfoo-1.so` → `libfoo-1`, a name without `.so` stays whole). The vDSO
//! and objects whose file cannot be read contribute their text ranges (for stack
//! checks) but no symbols.
//!
//! Each object's ELF file is parsed with the `object` crate: `.symtab` when present
//! (it has local symbols, which `sympos` counts), else `.dynsym`. Defined function and
//! object symbols are relocated by the object's load bias and indexed twice: by name
//! (addresses in symbol-table order, for `sympos`) and by address (sorted, for
//! `symbol_size` and for naming return addresses). A lookup never scans.
//!
//! The index is an immutable snapshot; [`SymbolIndex::refresh`] builds a new one that
//! reuses the parsed objects that are still loaded and reports which objects appeared
//! and which went away (a `dlopen` or `dlclose` since the last snapshot).

use std::collections::HashMap;
use std::ffi::CStr;
use std::sync::{Arc, Mutex};

use klp::Addr;
use object::{Object, ObjectSymbol, SymbolKind};

/// The module name of a shared object: the basename of its path, cut before the first
/// `.so` that is followed by nothing or by `.` (`libc.so.6` → `libc`,
/// `/x/libklp-demo.so` → `libklp-demo`). A path without such a suffix keeps its whole
/// basename.
pub fn module_name(path: &str) -> String {
    let base = path.rsplit('/').next().unwrap_or(path);
    let mut from = 0;
    while let Some(i) = base.get(from..).and_then(|s| s.find(".so")) {
        let at = from + i;
        let rest = base.get(at + 3..).unwrap_or("");
        if rest.is_empty() || rest.starts_with('.') {
            return base.get(..at).unwrap_or(base).to_string();
        }
        from = at + 3;
    }
    base.to_string()
}

/// One symbol of one object, already relocated.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Symbol {
    /// Symbol name.
    pub name: String,
    /// Run-time address.
    pub addr: Addr,
    /// `st_size`.
    pub size: u64,
    /// Whether it is a function (`STT_FUNC`).
    pub func: bool,
    /// `st_other` (ppc64le keeps the local-entry offset in its top three bits).
    pub st_other: u8,
}

/// One loaded object.
#[derive(Debug)]
pub struct LoadedObject {
    /// `None` for the main executable (vmlinux), else the module name.
    pub name: Option<String>,
    /// The path `dl_iterate_phdr` reported (the executable's is `/proc/self/exe`).
    pub path: String,
    /// The load bias (`dlpi_addr`).
    pub bias: u64,
    /// Executable segments, `[start, end)`.
    pub text: Vec<(Addr, Addr)>,
    /// Symbols, in symbol-table order.
    pub symbols: Vec<Symbol>,
    /// Which table the symbols came from (`".symtab"`, `".dynsym"` or `""`).
    pub table: &'static str,
}

/// What changed between two snapshots.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Changes {
    /// Modules loaded since the previous snapshot, in load order.
    pub added: Vec<String>,
    /// Modules gone since the previous snapshot.
    pub removed: Vec<String>,
}

/// The patch objects loaded from patch files ([`crate::loader`]): indexed with the
/// loaded objects (their text is code a stack may hold, their symbols name frames), but
/// not modules a patch can target.
static PATCH_OBJECTS: Mutex<Vec<Arc<LoadedObject>>> = Mutex::new(Vec::new());

fn patch_objects() -> Vec<Arc<LoadedObject>> {
    PATCH_OBJECTS
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .clone()
}

/// Adds a loaded patch object to every index built from now on.
pub fn add_patch_object(o: Arc<LoadedObject>) {
    PATCH_OBJECTS
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .push(o);
}

/// Removes the patch object at load bias `bias` from the indexes built from now on.
pub fn remove_patch_object(bias: u64) {
    PATCH_OBJECTS
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .retain(|o| o.bias != bias);
}

/// The index: see the module documentation. Two parts: the loaded objects, shared
/// between snapshots while they stay loaded (indexing a program and its libraries
/// takes milliseconds), and the patch objects, few and small, indexed again whenever a
/// patch file comes or goes.
#[derive(Debug, Default)]
pub struct SymbolIndex {
    base: Arc<Part>,
    patches: Part,
}

/// One part of the index.
#[derive(Debug, Default)]
struct Part {
    objects: Vec<Arc<LoadedObject>>,
    /// (object, name) → addresses in table order.
    by_name: HashMap<(Option<String>, String), Vec<Addr>>,
    /// (address, size, object index, symbol index), sorted by address.
    by_addr: Vec<(Addr, u64, u32, u32)>,
    /// Executable ranges, sorted.
    text: Vec<(Addr, Addr)>,
    /// The executable ranges of no object (the vDSO's on some systems), sorted.
    anon_text: Vec<(Addr, Addr)>,
}

impl Part {
    fn build(objects: Vec<Arc<LoadedObject>>, mut anon_text: Vec<(Addr, Addr)>) -> Part {
        anon_text.sort_unstable();
        let mut by_name: HashMap<(Option<String>, String), Vec<Addr>> = HashMap::new();
        let mut by_addr = Vec::new();
        let mut text = anon_text.clone();
        for (oi, o) in objects.iter().enumerate() {
            text.extend(o.text.iter().copied());
            for (si, s) in o.symbols.iter().enumerate() {
                by_name
                    .entry((o.name.clone(), s.name.clone()))
                    .or_default()
                    .push(s.addr);
                by_addr.push((s.addr, s.size, oi as u32, si as u32));
            }
        }
        // Sort by address; among symbols at the same address, the larger first (an
        // alias with a size beats a zero-sized label).
        by_addr.sort_by(|a, b| a.0.cmp(&b.0).then(b.1.cmp(&a.1)));
        text.sort_unstable();
        Part {
            objects,
            by_name,
            by_addr,
            text,
            anon_text,
        }
    }

    fn lookup(&self, addr: Addr) -> Option<(&LoadedObject, &Symbol)> {
        let idx = self.by_addr.partition_point(|e| e.0 <= addr);
        // Walk back over the symbols starting at or before `addr` (bounded: symbols
        // nest rarely; stop at the first one that contains it or after a few).
        for e in self.by_addr.get(..idx)?.iter().rev().take(8) {
            let (start, size, oi, si) = *e;
            if addr >= start && addr < start.saturating_add(size.max(1)) {
                let o = self.objects.get(oi as usize)?;
                let s = o.symbols.get(si as usize)?;
                return Some((o, s));
            }
        }
        None
    }

    fn is_text(&self, addr: Addr) -> bool {
        let i = self.text.partition_point(|r| r.0 <= addr);
        i > 0 && self.text.get(i - 1).is_some_and(|r| addr < r.1)
    }
}

/// One `dl_iterate_phdr` entry.
struct PhdrEntry {
    path: String,
    bias: u64,
    text: Vec<(Addr, Addr)>,
    main: bool,
}

fn iterate_phdr() -> Vec<PhdrEntry> {
    unsafe extern "C" fn cb(
        info: *mut libc::dl_phdr_info,
        _size: libc::size_t,
        data: *mut libc::c_void,
    ) -> libc::c_int {
        // SAFETY: `data` is the `&mut Vec<PhdrEntry>` passed below, alive for the whole
        // `dl_iterate_phdr` call; `info` points to a valid entry for this callback.
        let (out, info) = unsafe { (&mut *(data as *mut Vec<PhdrEntry>), &*info) };
        let name = if info.dlpi_name.is_null() {
            String::new()
        } else {
            // SAFETY: a non-null `dlpi_name` is a NUL-terminated string owned by the
            // dynamic linker, valid during the callback.
            unsafe { CStr::from_ptr(info.dlpi_name) }
                .to_string_lossy()
                .into_owned()
        };
        let mut text = Vec::new();
        let n = usize::from(info.dlpi_phnum);
        if !info.dlpi_phdr.is_null() {
            // SAFETY: `dlpi_phdr` points to `dlpi_phnum` program headers.
            let phdrs = unsafe { std::slice::from_raw_parts(info.dlpi_phdr, n) };
            for ph in phdrs {
                if ph.p_type == libc::PT_LOAD && ph.p_flags & libc::PF_X != 0 {
                    let start = info.dlpi_addr.wrapping_add(ph.p_vaddr);
                    text.push((start, start.wrapping_add(ph.p_memsz)));
                }
            }
        }
        let main = out.is_empty();
        out.push(PhdrEntry {
            path: name,
            bias: info.dlpi_addr,
            text,
            main,
        });
        0
    }
    let mut v: Vec<PhdrEntry> = Vec::new();
    // SAFETY: `cb` matches the callback type and only uses `data` as the vector passed
    // here, which outlives the call.
    unsafe { libc::dl_iterate_phdr(Some(cb), &mut v as *mut Vec<PhdrEntry> as *mut libc::c_void) };
    v
}

/// Parses the symbols of an ELF image. Returns the symbols in table order and the
/// table they came from.
pub fn parse_symbols(data: &[u8], bias: u64) -> Result<(Vec<Symbol>, &'static str), String> {
    let file = object::read::elf::ElfFile64::<object::Endianness>::parse(data)
        .map_err(|e| e.to_string())?;
    let (iter, table): (Vec<_>, &'static str) = {
        let st: Vec<_> = file.symbols().collect();
        if st.is_empty() {
            (file.dynamic_symbols().collect(), ".dynsym")
        } else {
            (st, ".symtab")
        }
    };
    let mut out = Vec::new();
    for s in iter {
        if !s.is_definition() {
            continue;
        }
        let func = match s.kind() {
            SymbolKind::Text => true,
            SymbolKind::Data => false,
            _ => continue,
        };
        let Ok(name) = s.name() else { continue };
        if name.is_empty() {
            continue;
        }
        let st_other = match s.flags() {
            object::SymbolFlags::Elf { st_other, .. } => st_other.0,
            _ => 0,
        };
        out.push(Symbol {
            name: name.to_string(),
            addr: s.address().wrapping_add(bias),
            size: s.size(),
            func,
            st_other,
        });
    }
    Ok((out, table))
}

impl SymbolIndex {
    /// Indexes every object loaded now.
    pub fn load() -> SymbolIndex {
        Self::refresh(&SymbolIndex::default()).0
    }

    /// A new snapshot of the loaded objects, reusing the parsed objects of `self` that
    /// are still loaded at the same address, and what changed since `self`.
    pub fn refresh(&self) -> (SymbolIndex, Changes) {
        let mut objects = Vec::new();
        let mut anon_text = Vec::new();
        for e in iterate_phdr() {
            let name = if e.main {
                None
            } else if e.path.is_empty() {
                // An anonymous entry (the vDSO on some systems): text, but no module.
                anon_text.extend(e.text);
                continue;
            } else {
                Some(module_name(&e.path))
            };
            if let Some(old) = self
                .objects()
                .iter()
                .find(|o| o.name == name && o.bias == e.bias && (e.main || o.path == e.path))
            {
                objects.push(old.clone());
                continue;
            }
            let path = if e.main {
                "/proc/self/exe".to_string()
            } else {
                e.path.clone()
            };
            let (symbols, table) = match std::fs::read(&path) {
                Ok(data) => parse_symbols(&data, e.bias).unwrap_or_default(),
                Err(_) => (Vec::new(), ""),
            };
            objects.push(Arc::new(LoadedObject {
                name,
                path,
                bias: e.bias,
                text: e.text,
                symbols,
                table,
            }));
        }
        let changes = Changes {
            added: objects
                .iter()
                .filter_map(|o| o.name.clone())
                .filter(|n| !self.objects().iter().any(|o| o.name.as_ref() == Some(n)))
                .collect(),
            removed: self
                .objects()
                .iter()
                .filter_map(|o| o.name.clone())
                .filter(|n| !objects.iter().any(|o| o.name.as_ref() == Some(n)))
                .collect(),
        };
        // Nothing came or went: the loaded objects' part is shared as it is.
        anon_text.sort_unstable();
        let same = objects.len() == self.base.objects.len()
            && objects
                .iter()
                .zip(&self.base.objects)
                .all(|(a, b)| Arc::ptr_eq(a, b))
            && anon_text == self.base.anon_text;
        if same {
            return (self.with_current_patches(), changes);
        }
        (Self::build_with(objects, anon_text), changes)
    }

    /// Builds the index over the given objects.
    pub fn build(objects: Vec<Arc<LoadedObject>>) -> SymbolIndex {
        Self::build_with(objects, Vec::new())
    }

    /// The same loaded objects with the patch objects of now (after a patch file was
    /// loaded or removed): the loaded objects' part is shared, only the patch objects
    /// are indexed again.
    pub fn with_current_patches(&self) -> SymbolIndex {
        SymbolIndex {
            base: self.base.clone(),
            patches: Part::build(patch_objects(), Vec::new()),
        }
    }

    fn build_with(objects: Vec<Arc<LoadedObject>>, anon_text: Vec<(Addr, Addr)>) -> SymbolIndex {
        SymbolIndex {
            base: Arc::new(Part::build(objects, anon_text)),
            patches: Part::build(patch_objects(), Vec::new()),
        }
    }

    /// The loaded objects, the executable first.
    pub fn objects(&self) -> &[Arc<LoadedObject>] {
        &self.base.objects
    }

    /// Whether module `name` is loaded.
    pub fn has_module(&self, name: &str) -> bool {
        self.objects()
            .iter()
            .any(|o| o.name.as_deref() == Some(name))
    }

    /// Every symbol named `name` in `obj` (`None` = the executable), in table order.
    pub fn candidates(&self, obj: Option<&str>, name: &str) -> &[Addr] {
        let key = (obj.map(str::to_string), name.to_string());
        self.base
            .by_name
            .get(&key)
            .or_else(|| self.patches.by_name.get(&key))
            .map_or(&[], Vec::as_slice)
    }

    /// The symbol that contains `addr` (`addr` in `[start, start + size)`), with its
    /// object.
    pub fn lookup(&self, addr: Addr) -> Option<(&LoadedObject, &Symbol)> {
        // A patch object's text is its own mapping, apart from every loaded object.
        self.patches.lookup(addr).or_else(|| self.base.lookup(addr))
    }

    /// `kallsyms_lookup_size_offset`: the size of the symbol containing `addr`.
    pub fn size_of(&self, addr: Addr) -> Option<u64> {
        self.lookup(addr).map(|(_, s)| s.size)
    }

    /// `name+0xoff/0xsize [object]` for messages, or the bare address.
    pub fn describe(&self, addr: Addr) -> String {
        match self.lookup(addr) {
            Some((o, s)) => format!(
                "{}+{:#x}/{:#x} [{}]",
                s.name,
                addr - s.addr,
                s.size,
                o.name.as_deref().unwrap_or("vmlinux")
            ),
            None => format!("{addr:#x}"),
        }
    }

    /// Whether `addr` is in an executable segment of a loaded object.
    pub fn is_text(&self, addr: Addr) -> bool {
        self.base.is_text(addr) || self.patches.is_text(addr)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn module_names() {
        assert_eq!(module_name("/lib/x86_64-linux-gnu/libc.so.6"), "libc");
        assert_eq!(module_name("libz.so.1.2.13"), "libz");
        assert_eq!(module_name("/x/libklp-demo.so"), "libklp-demo");
        assert_eq!(module_name("libfoo.sox.so.2"), "libfoo.sox");
        assert_eq!(module_name("plugin"), "plugin");
        assert_eq!(module_name("/a/b/ld-linux-x86-64.so.2"), "ld-linux-x86-64");
    }

    fn obj(name: Option<&str>, syms: &[(&str, u64, u64)]) -> Arc<LoadedObject> {
        Arc::new(LoadedObject {
            name: name.map(str::to_string),
            path: String::new(),
            bias: 0,
            text: vec![(0x1000, 0x9000)],
            symbols: syms
                .iter()
                .map(|(n, a, s)| Symbol {
                    name: n.to_string(),
                    addr: *a,
                    size: *s,
                    func: true,
                    st_other: 0,
                })
                .collect(),
            table: ".symtab",
        })
    }

    #[test]
    fn sympos_order_and_sizes() {
        let idx = SymbolIndex::build(vec![
            obj(
                None,
                &[
                    ("dup", 0x3000, 0x10),
                    ("a", 0x1000, 0x20),
                    ("dup", 0x2000, 8),
                ],
            ),
            obj(Some("libm"), &[("dup", 0x5000, 4)]),
        ]);
        // Table order, not address order.
        assert_eq!(idx.candidates(None, "dup"), &[0x3000, 0x2000]);
        assert_eq!(idx.candidates(Some("libm"), "dup"), &[0x5000]);
        assert_eq!(idx.candidates(Some("libx"), "dup"), &[] as &[u64]);
        assert_eq!(idx.size_of(0x1000), Some(0x20));
        assert_eq!(idx.size_of(0x101f), Some(0x20));
        assert_eq!(idx.size_of(0x1020), None);
        assert_eq!(idx.size_of(0x2007), Some(8));
        assert_eq!(idx.size_of(0x5003), Some(4));
        assert!(idx.describe(0x2004).starts_with("dup+0x4/0x8 [vmlinux]"));
        assert!(idx.is_text(0x1000) && idx.is_text(0x8fff) && !idx.is_text(0x9000));
    }

    #[inline(never)]
    #[unsafe(no_mangle)]
    extern "C" fn klp_user_symbols_probe(x: u64) -> u64 {
        std::hint::black_box(x).wrapping_mul(7)
    }

    #[test]
    fn indexes_the_running_executable() {
        let idx = SymbolIndex::load();
        let exe = idx.objects().first().expect("the executable");
        assert!(exe.name.is_none());
        let f = klp_user_symbols_probe as *const () as u64;
        assert_eq!(idx.candidates(None, "klp_user_symbols_probe"), &[f]);
        let size = idx.size_of(f).expect("sized");
        assert!(size > 0 && size < 4096, "{size}");
        assert_eq!(idx.size_of(f + size - 1), Some(size));
        assert!(idx.is_text(f));
        assert!(
            !idx.is_text(&idx as *const _ as u64),
            "the stack is not text"
        );
        // libc is loaded as a module named "libc".
        assert!(idx.has_module("libc"), "{:?}", idx.objects());
        let getpid = libc::getpid as *const () as u64;
        assert!(idx.is_text(getpid));
        assert_eq!(klp_user_symbols_probe(1), 7);
    }
}
