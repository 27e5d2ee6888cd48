//! Building the test programs of `tests/c` with a compiler of the machine.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::Command;

/// A directory of its own for `name` (removed when dropped).
#[derive(Debug)]
pub struct Dir(pub PathBuf);

impl Dir {
    pub fn new(name: &str) -> Dir {
        let d = std::env::temp_dir().join(format!("klp-inline-{}-{name}", std::process::id()));
        std::fs::create_dir_all(&d).expect("temporary directory");
        Dir(d)
    }
}

impl Drop for Dir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// The source file `tests/c/<name>`.
pub fn source(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/c")
        .join(name)
}

/// Whether `cc` can be run.
pub fn have(cc: &str) -> bool {
    Command::new(cc).arg("--version").output().is_ok()
}

/// Compiles `srcs` (files of tests/c) with `cc` and `flags` into `dir/out`, and
/// returns the file's bytes. Panics if the compiler fails.
pub fn build(cc: &str, srcs: &[&str], flags: &[&str], dir: &Dir, out: &str) -> Vec<u8> {
    let path = dir.0.join(out);
    let mut cmd = Command::new(cc);
    cmd.args(flags).arg("-o").arg(&path);
    for s in srcs {
        cmd.arg(source(s));
    }
    let o = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cc}: {e}"));
    assert!(
        o.status.success(),
        "{cmd:?} failed:\n{}",
        String::from_utf8_lossy(&o.stderr)
    );
    std::fs::read(&path).expect("compiler output")
}

/// The function symbols of `elf` named `name`: `(address, size)`.
pub fn symbol(elf: &[u8], name: &str) -> Vec<(u64, u64)> {
    use object::{Object, ObjectSymbol};
    let f = object::File::parse(elf).expect("ELF");
    f.symbols()
        .filter(|s| s.name() == Ok(name))
        .map(|s| (s.address(), s.size()))
        .collect()
}
