//! Why a binary could not be analysed.

use std::fmt;

/// Why [`crate::Analysis::new`] refused a binary. Nothing is known about it then.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Error {
    /// Not an ELF file (or an ELF class this crate does not read).
    NotElf,
    /// An ELF file whose headers, section table or symbol table are broken.
    Elf(object::read::Error),
    /// An ELF file that is not linked (a relocatable object or a core dump): the
    /// addresses and string offsets of its DWARF are not final. The value is `e_type`.
    NotLinked(u16),
    /// Its DWARF sections are compressed (`SHF_COMPRESSED`, `.zdebug_*`), which this
    /// crate does not decompress.
    CompressedDebugInfo,
    /// Its DWARF is broken: the offset in `.debug_info` of the unit (or entry) where
    /// reading stopped, and gimli's reason.
    Dwarf {
        /// Offset in `.debug_info`.
        offset: u64,
        /// What gimli found.
        error: gimli::Error,
    },
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::NotElf => f.write_str("not an ELF file"),
            Error::Elf(e) => write!(f, "malformed ELF file: {e}"),
            Error::NotLinked(t) => write!(
                f,
                "not a linked executable or shared object (ELF type {t}): its debug information is not final"
            ),
            Error::CompressedDebugInfo => f.write_str(
                "its debug information is compressed (build without -gz, or decompress it with objcopy --decompress-debug-sections)",
            ),
            Error::Dwarf { offset, error } => {
                write!(f, "malformed DWARF at .debug_info offset {offset:#x}: {error}")
            }
        }
    }
}

impl std::error::Error for Error {}

impl From<object::read::Error> for Error {
    fn from(e: object::read::Error) -> Self {
        Error::Elf(e)
    }
}
