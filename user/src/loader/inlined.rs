//! Warnings about functions a patch file replaces that the compiler also copied
//! elsewhere ([`klp_inline`]): a caller that inlined a function, or calls one of its
//! clones (`f.constprop.0`, …), keeps the old code, since the patch takes effect at
//! the function's entry only.
//!
//! The objects are read from their files (the program's is `/proc/self/exe`), each
//! analysed once: the analyses are kept per file (path, device, inode, size and
//! modification time, so a file replaced on disk is read again), at most
//! [`CACHE_MAX`] of them, the least recently used going first. A file that cannot be
//! read or analysed gives no warning.

use std::collections::HashMap;
use std::os::unix::fs::MetadataExt;
use std::sync::{Arc, LazyLock, Mutex};

use klp::elf::PatchObject;
use klp_inline::{Analysis, Caller, Inlined};

use crate::symbols::SymbolIndex;

/// The most analyses kept.
pub(crate) const CACHE_MAX: usize = 16;
/// Larger files are not read (a debug build of a large program is well below).
const FILE_MAX: u64 = 2 << 30;

/// A file as it is on disk now.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub(crate) struct Key {
    path: String,
    dev: u64,
    ino: u64,
    size: u64,
    mtime: (i64, i64),
}

impl Key {
    fn of(path: &str) -> Option<Key> {
        let m = std::fs::metadata(path).ok()?;
        Some(Key {
            path: path.to_string(),
            dev: m.dev(),
            ino: m.ino(),
            size: m.size(),
            mtime: (m.mtime(), m.mtime_nsec()),
        })
    }
}

/// The analyses kept (`None`: the file could not be analysed).
#[derive(Debug, Default)]
pub(crate) struct Cache {
    map: HashMap<Key, (u64, Option<Arc<Analysis>>)>,
    tick: u64,
}

impl Cache {
    fn get(&mut self, key: &Key) -> Option<Option<Arc<Analysis>>> {
        self.tick += 1;
        let tick = self.tick;
        self.map.get_mut(key).map(|(used, a)| {
            *used = tick;
            a.clone()
        })
    }

    fn insert(&mut self, key: Key, a: Option<Arc<Analysis>>) {
        // Another version of the same path is stale.
        self.map.retain(|k, _| k.path != key.path);
        while self.map.len() >= CACHE_MAX {
            let Some(oldest) = self
                .map
                .iter()
                .min_by_key(|(_, (used, _))| *used)
                .map(|(k, _)| k.clone())
            else {
                break;
            };
            self.map.remove(&oldest);
        }
        self.tick += 1;
        self.map.insert(key, (self.tick, a));
    }

    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.map.len()
    }
}

static CACHE: LazyLock<Mutex<Cache>> = LazyLock::new(|| Mutex::new(Cache::default()));

/// The analysis of the file at `path`, read once per version of the file.
pub(crate) fn analysis(path: &str) -> Option<Arc<Analysis>> {
    let key = Key::of(path)?;
    let mut cache = CACHE.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(a) = cache.get(&key) {
        return a;
    }
    let a = (key.size <= FILE_MAX)
        .then(|| std::fs::read(path).ok())
        .flatten()
        .and_then(|data| Analysis::new(&data).ok())
        .map(Arc::new);
    cache.insert(key, a.clone());
    a
}

/// `inlined` with every name demangled, as messages show names.
fn demangled(mut inlined: Inlined) -> Inlined {
    let fix = |c: &mut Caller| c.name = super::demangle(&c.name);
    inlined.callers.iter_mut().for_each(fix);
    for k in &mut inlined.clones {
        k.name = super::demangle(&k.name);
        k.callers.iter_mut().for_each(fix);
    }
    inlined
}

/// The warnings about the functions `funcs` of the object `objname` (`vmlinux`: the
/// program) whose file is `path`.
pub(crate) fn warnings_for(path: &str, objname: &str, funcs: &[&str]) -> Vec<String> {
    if funcs.is_empty() || path.is_empty() {
        return Vec::new();
    }
    let Some(a) = analysis(path) else {
        return Vec::new();
    };
    let label = super::object_label(objname);
    let mut seen: Vec<&str> = Vec::new();
    let mut out = Vec::new();
    for &f in funcs {
        if seen.contains(&f) {
            continue;
        }
        seen.push(f);
        let i = demangled(a.inlined_into(f));
        out.extend(klp_inline::warning(&super::demangle(f), &label, &i));
    }
    out
}

/// The warnings about the functions `obj` replaces, in the objects loaded now.
pub(crate) fn warnings(idx: &SymbolIndex, obj: &PatchObject<'_>) -> Vec<String> {
    let mut out = Vec::new();
    for o in obj.klp_objects().into_iter().flatten().flatten() {
        let Some(loaded) = idx.objects().iter().find(|l| l.name.as_deref() == o.name) else {
            continue;
        };
        let funcs: Vec<&str> = obj.klp_funcs(&o).flatten().map(|f| f.old_name).collect();
        out.extend(warnings_for(
            &loaded.path,
            o.name.unwrap_or("vmlinux"),
            &funcs,
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Inlined into [`probe_caller`] even without optimisation (`inline(always)`); its
    /// address taken in the test keeps an out-of-line copy with a symbol.
    #[inline(always)]
    fn klp_inlined_probe(x: i32) -> i32 {
        x.wrapping_mul(3).wrapping_add(1)
    }

    #[inline(never)]
    fn probe_caller(x: i32) -> i32 {
        klp_inlined_probe(x).wrapping_add(2)
    }

    /// The probe's symbol name in this program (mangled, with its hash).
    fn probe_symbol() -> Option<String> {
        use object::{Object, ObjectSymbol};
        let data = std::fs::read("/proc/self/exe").ok()?;
        let file = object::File::parse(&*data).ok()?;
        file.symbols()
            .filter_map(|s| s.name().ok().map(str::to_string))
            .find(|n| n.contains("17klp_inlined_probe"))
    }

    #[test]
    fn an_inlined_function_of_this_program_is_reported() {
        let probe: fn(i32) -> i32 = klp_inlined_probe;
        assert_eq!(std::hint::black_box(probe)(1), 4);
        assert_eq!(std::hint::black_box(probe_caller)(1), 6);
        let Some(a) = analysis("/proc/self/exe") else {
            panic!("this test program cannot be analysed");
        };
        if !a.has_debug_info() {
            println!("note: this test program has no debug information: nothing to check");
            return;
        }
        let sym = probe_symbol().expect("the probe's symbol");
        let w = warnings_for("/proc/self/exe", "vmlinux", &[&sym, &sym]);
        assert_eq!(w.len(), 1, "{sym}: {w:?}");
        let w = &w[0];
        assert!(
            w.starts_with(
                "'klp_user::loader::inlined::tests::klp_inlined_probe' is inlined into 'klp_user::loader::inlined::tests::probe_caller'"
            ),
            "{w}"
        );
        assert!(
            w.contains(" of the program: those keep the old code"),
            "{w}"
        );
        // Not inlined anywhere: nothing to say.
        assert!(warnings_for("/proc/self/exe", "vmlinux", &["probe_caller_missing"]).is_empty());
        // A second look is the same analysis.
        let b = analysis("/proc/self/exe").expect("cached");
        assert!(Arc::ptr_eq(&a, &b));
    }

    #[test]
    fn unreadable_files_give_nothing() {
        assert!(analysis("/nonexistent/klp-inlined").is_none());
        assert!(warnings_for("/nonexistent/klp-inlined", "vmlinux", &["f"]).is_empty());
        assert!(warnings_for("", "vmlinux", &["f"]).is_empty());
        // Not ELF: analysed once, to no avail.
        assert!(analysis("/proc/self/cmdline").is_none());
    }

    #[test]
    fn the_cache_is_bounded_and_keeps_the_recent() {
        let key = |i: u64, v: i64| Key {
            path: format!("/f{i}"),
            dev: 1,
            ino: i,
            size: 1,
            mtime: (v, 0),
        };
        let mut c = Cache::default();
        for i in 0..(CACHE_MAX as u64 + 5) {
            c.insert(key(i, 0), None);
            // The first stays in use.
            assert!(c.get(&key(0, 0)).is_some(), "{i}");
        }
        assert_eq!(c.len(), CACHE_MAX);
        assert!(c.get(&key(1, 0)).is_none(), "the least recently used went");
        // A new version of a path replaces the old one.
        c.insert(key(0, 7), None);
        assert!(c.get(&key(0, 0)).is_none());
        assert!(c.get(&key(0, 7)).is_some());
        assert_eq!(c.len(), CACHE_MAX);
    }
}
