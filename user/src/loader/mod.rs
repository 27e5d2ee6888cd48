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

pub mod verify;

use std::path::{Path, PathBuf};

use klp::Errno;

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

impl crate::Process {
    /// Loads the patch file at `path` and enables its patch (see the module docs).
    /// On error nothing of it remains in the process.
    pub fn load_file(&'static self, path: &Path, opts: &LoadOptions) -> Result<Loaded, LoadError> {
        let bytes = read_file(path)?;
        let _ = (bytes, opts);
        Err(LoadError::new(
            Errno::ENOSYS,
            "loading patch files is being written (-ENOSYS)",
        ))
    }

    /// Removes the patch module `name` loaded by [`crate::Process::load_file`]
    /// (`rmmod`): refused with `-EBUSY` while its patch is enabled or in transition.
    pub fn unload(&self, name: &str) -> Result<(), LoadError> {
        Err(LoadError::new(
            Errno::ENOSYS,
            format!("unloading '{name}' is being written (-ENOSYS)"),
        ))
    }
}
