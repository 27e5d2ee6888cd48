//! Kernel error numbers, as the livepatch core returns them.
//!
//! Every fallible operation of the core fails with an [`Errno`]: the same value the
//! kernel's livepatch returns for the same situation (`-EINVAL`, `-EBUSY`, …), so hosts
//! can hand it to user space unchanged.

use core::fmt;

/// A (positive) kernel error number. The kernel returns its negation.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Errno(pub i32);

impl Errno {
    /// Operation not permitted.
    pub const EPERM: Errno = Errno(1);
    /// No such file or directory.
    pub const ENOENT: Errno = Errno(2);
    /// Exec format error.
    pub const ENOEXEC: Errno = Errno(8);
    /// Try again.
    pub const EAGAIN: Errno = Errno(11);
    /// Out of memory.
    pub const ENOMEM: Errno = Errno(12);
    /// Permission denied.
    pub const EACCES: Errno = Errno(13);
    /// Device or resource busy.
    pub const EBUSY: Errno = Errno(16);
    /// File exists.
    pub const EEXIST: Errno = Errno(17);
    /// No such device.
    pub const ENODEV: Errno = Errno(19);
    /// Not a directory (listing an attribute).
    pub const ENOTDIR: Errno = Errno(20);
    /// Is a directory (reading or writing a directory as a file).
    pub const EISDIR: Errno = Errno(21);
    /// Invalid argument.
    pub const EINVAL: Errno = Errno(22);
    /// No space left (a caller's buffer too small for the value, no patch ids left).
    pub const ENOSPC: Errno = Errno(28);
    /// Result out of range (a branch that cannot reach its target).
    pub const ERANGE: Errno = Errno(34);
    /// Function not implemented.
    pub const ENOSYS: Errno = Errno(38);
    /// Address already in use (a task sleeps on patched code).
    pub const EADDRINUSE: Errno = Errno(98);

    /// The value the kernel would return (negative).
    pub const fn to_kernel(self) -> i32 {
        self.0.saturating_neg()
    }

    /// Builds an error from a kernel-style return value (`-22` or `22`).
    pub const fn from_ret(ret: i32) -> Errno {
        if ret < 0 {
            Errno(ret.saturating_neg())
        } else {
            Errno(ret)
        }
    }

    /// The symbolic name, when known (`"EINVAL"`).
    pub const fn name(self) -> Option<&'static str> {
        Some(match self.0 {
            1 => "EPERM",
            2 => "ENOENT",
            8 => "ENOEXEC",
            11 => "EAGAIN",
            12 => "ENOMEM",
            13 => "EACCES",
            16 => "EBUSY",
            17 => "EEXIST",
            19 => "ENODEV",
            20 => "ENOTDIR",
            21 => "EISDIR",
            22 => "EINVAL",
            28 => "ENOSPC",
            34 => "ERANGE",
            38 => "ENOSYS",
            65 => "ENOPKG",
            74 => "EBADMSG",
            126 => "ENOKEY",
            129 => "EKEYREJECTED",
            98 => "EADDRINUSE",
            _ => return None,
        })
    }
}

impl fmt::Debug for Errno {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.name() {
            Some(n) => write!(f, "-{n}"),
            None => write!(f, "-{}", self.0),
        }
    }
}

impl fmt::Display for Errno {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.to_kernel())
    }
}

/// Result type of the core.
pub type KResult<T> = Result<T, Errno>;
