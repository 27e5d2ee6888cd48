//! `tests/c/loadfix.o` made into a patch file against this very executable, as
//! `klp-convert` would: shared by the loader tests, the heap test and the patch-file
//! benchmark (each includes this file with `#[path]`).

use std::path::{Path, PathBuf};

/// Converts loadfix.o with `manifest` and `options` against this executable (its
/// `vmlinux`) and libklploadlib.so (the object also holds a fix for that library, whose
/// symbols only the library defines: read here, loaded or not by the caller), and
/// writes the patch file to `dir/NAME.klp.o`.
pub fn convert_loadfix(
    manifest: &str,
    options: &klp_convert::Options,
    dir: &Path,
    name: &str,
) -> PathBuf {
    let fix = std::fs::read(env!("KLP_LOADFIX_O")).expect("loadfix.o");
    let exe = std::fs::read("/proc/self/exe").expect("own executable");
    let lib = std::fs::read(env!("KLP_LOADLIB_SO")).expect("libklploadlib.so");
    let targets = [
        klp_convert::TargetInput {
            name: "vmlinux".into(),
            file: "/proc/self/exe".into(),
            data: &exe,
        },
        klp_convert::TargetInput {
            name: "libklploadlib".into(),
            file: env!("KLP_LOADLIB_SO").into(),
            data: &lib,
        },
    ];
    let m = klp_convert::Manifest::from_json(manifest).expect("manifest");
    let out = klp_convert::convert("loadfix.o", &fix, &targets, &m, options).expect("klp-convert");
    let path = dir.join(format!("{name}.klp.o"));
    std::fs::write(&path, out.data).expect("write patch file");
    path
}
