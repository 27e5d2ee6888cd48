//! The `/sys/kernel/livepatch` tree: attributes, modes, read formats and write errors.
//!
//! Paths are relative to `/sys/kernel/livepatch` and split into components. Hosts route
//! their own file systems (a simulated VFS, a control socket) to these calls.

use core::fmt::{self, Write};

use crate::core::Klp;
use crate::errno::{Errno, KResult};
use crate::host::Host;

/// One node of the tree.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Node {
    /// A directory, with its mode bits (always `0o755`).
    Dir,
    /// An attribute file with its mode bits.
    Attr(u32),
}

/// Mode bits of a node, as `stat` shows them.
pub fn mode_of(node: Node) -> u32 {
    match node {
        Node::Dir => 0o755,
        Node::Attr(m) => m,
    }
}

/// `kstrtobool`: only the first one or two characters count. `y`, `t`, `e` (yes, true,
/// enabled) and `1` are true; `n`, `f`, `d` and `0` are false; `on`/`off` by their
/// second letter. The kernel has accepted `t`/`e`/`f`/`d` since v6.2 (the selftests
/// pass `has_post_handler=true`).
pub fn parse_bool(s: &str) -> KResult<bool> {
    let b = s.as_bytes();
    match b.first() {
        Some(b'y' | b'Y' | b't' | b'T' | b'e' | b'E' | b'1') => Ok(true),
        Some(b'n' | b'N' | b'f' | b'F' | b'd' | b'D' | b'0') => Ok(false),
        Some(b'o' | b'O') => match b.get(1) {
            Some(b'n' | b'N') => Ok(true),
            Some(b'f' | b'F') => Ok(false),
            _ => Err(Errno::EINVAL),
        },
        _ => Err(Errno::EINVAL),
    }
}

/// The size of the buffer an attribute is read into (`PAGE_SIZE` of the kernel's
/// `show` methods).
pub const SYSFS_PAGE: usize = 4096;

/// A `fmt::Write` into a caller's byte buffer (`sysfs_emit`).
struct BufWriter<'a> {
    buf: &'a mut [u8],
    len: usize,
}

impl Write for BufWriter<'_> {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        let end = self.len.checked_add(s.len()).ok_or(fmt::Error)?;
        let dst = self.buf.get_mut(self.len..end).ok_or(fmt::Error)?;
        dst.copy_from_slice(s.as_bytes());
        self.len = end;
        Ok(())
    }
}

const PATCH_ATTRS: [(&str, u32); 5] = [
    ("enabled", 0o644),
    ("transition", 0o444),
    ("force", 0o200),
    ("replace", 0o444),
    ("stack_order", 0o444),
];

impl<H: Host> Klp<H> {
    /// What is at `path`, if anything.
    pub fn sysfs_node(&self, path: &[&str]) -> Option<Node> {
        match path {
            [] => Some(Node::Dir),
            [p] => self.find_patch(p).map(|_| Node::Dir),
            [p, a] => {
                let id = self.find_patch(p)?;
                if let Some((_, m)) = PATCH_ATTRS.iter().find(|(n, _)| n == a) {
                    return Some(Node::Attr(*m));
                }
                let patch = self.patch(id)?;
                patch
                    .objs
                    .iter()
                    .any(|o| o.display_name() == *a)
                    .then_some(Node::Dir)
            }
            [p, o, x] => {
                let obj = self.sysfs_obj(p, o)?;
                if *x == "patched" {
                    return Some(Node::Attr(0o444));
                }
                obj.funcs
                    .iter()
                    .any(|f| f.dir_name().is(x))
                    .then_some(Node::Dir)
            }
            _ => None,
        }
    }

    fn sysfs_obj(&self, p: &str, o: &str) -> Option<&crate::core::Object<H>> {
        let id = self.find_patch(p)?;
        self.patch(id)?.objs.iter().find(|x| x.display_name() == o)
    }

    /// Calls `f` with each entry of the directory at `path`, in creation order.
    /// `-ENOENT` if nothing is there, `-ENOTDIR` for an attribute.
    pub fn sysfs_list(&self, path: &[&str], f: &mut dyn FnMut(&dyn fmt::Display)) -> KResult<()> {
        match self.sysfs_node(path).ok_or(Errno::ENOENT)? {
            Node::Attr(_) => return Err(Errno::ENOTDIR),
            Node::Dir => {}
        }
        match path {
            [] => {
                for p in self.patches.iter().filter(|p| p.dir) {
                    f(&p.name);
                }
            }
            [p] => {
                let id = self.find_patch(p).ok_or(Errno::ENOENT)?;
                for (n, _) in PATCH_ATTRS {
                    f(&n);
                }
                for o in &self.patch(id).ok_or(Errno::ENOENT)?.objs {
                    f(&o.display_name());
                }
            }
            [p, o] => {
                let obj = self.sysfs_obj(p, o).ok_or(Errno::ENOENT)?;
                f(&"patched");
                for func in &obj.funcs {
                    f(&func.dir_name());
                }
            }
            _ => {}
        }
        Ok(())
    }

    /// Reads an attribute (`"%d\n"`) into `buf` (a page, [`SYSFS_PAGE`], always holds
    /// it); returns the number of bytes written.
    pub fn sysfs_read(&self, path: &[&str], buf: &mut [u8]) -> KResult<usize> {
        let node = self.sysfs_node(path).ok_or(Errno::ENOENT)?;
        let Node::Attr(mode) = node else {
            return Err(Errno::EISDIR);
        };
        if mode & 0o444 == 0 {
            return Err(Errno::EACCES);
        }
        let v: usize = match path {
            [p, a] => {
                let id = self.find_patch(p).ok_or(Errno::ENOENT)?;
                let patch = self.patch(id).ok_or(Errno::ENOENT)?;
                match *a {
                    "enabled" => usize::from(patch.enabled),
                    "transition" => usize::from(self.transition == Some(id)),
                    "replace" => usize::from(patch.replace),
                    "stack_order" => match self.list.iter().position(|x| *x == id) {
                        Some(i) => i.saturating_add(1),
                        None => self.list.len(),
                    },
                    _ => return Err(Errno::EACCES),
                }
            }
            [p, o, _] => usize::from(self.sysfs_obj(p, o).ok_or(Errno::ENOENT)?.patched),
            _ => return Err(Errno::ENOENT),
        };
        let mut w = BufWriter { buf, len: 0 };
        writeln!(w, "{v}").map_err(|_| Errno::ENOSPC)?;
        Ok(w.len)
    }

    /// [`Klp::sysfs_list`] collected, for hosts that may allocate infallibly.
    #[cfg(not(no_global_oom_handling))]
    pub fn sysfs_entries(&self, path: &[&str]) -> KResult<alloc::vec::Vec<alloc::string::String>> {
        use alloc::string::ToString;
        let mut v = alloc::vec::Vec::new();
        self.sysfs_list(path, &mut |e| v.push(e.to_string()))?;
        Ok(v)
    }

    /// [`Klp::sysfs_read`] as a string, for hosts that may allocate infallibly.
    #[cfg(not(no_global_oom_handling))]
    pub fn sysfs_read_string(&self, path: &[&str]) -> KResult<alloc::string::String> {
        let mut buf = [0u8; SYSFS_PAGE];
        let n = self.sysfs_read(path, &mut buf)?;
        let text = buf.get(..n).unwrap_or_default();
        Ok(alloc::string::String::from_utf8_lossy(text).into_owned())
    }

    /// Writes an attribute; returns the byte count on success.
    pub fn sysfs_write(&mut self, host: &mut H, path: &[&str], data: &str) -> KResult<usize> {
        let node = self.sysfs_node(path).ok_or(Errno::ENOENT)?;
        let Node::Attr(mode) = node else {
            return Err(Errno::EISDIR);
        };
        if mode & 0o222 == 0 {
            return Err(Errno::EACCES);
        }
        let [p, a] = path else {
            return Err(Errno::EACCES);
        };
        let id = self.find_patch(p).ok_or(Errno::ENOENT)?;
        let val = parse_bool(data)?;
        match *a {
            "enabled" => {
                if self.patch(id).is_some_and(|x| x.enabled) == val {
                    return Err(Errno::EINVAL);
                }
                if self.transition == Some(id) {
                    self.reverse_transition(host);
                } else if !val {
                    self.disable_patch(host, id)?;
                } else {
                    return Err(Errno::EINVAL);
                }
            }
            "force" => {
                if val {
                    if self.transition != Some(id) {
                        return Err(Errno::EINVAL);
                    }
                    self.force_transition(host);
                }
            }
            _ => return Err(Errno::EACCES),
        }
        Ok(data.len())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buffer_writes() {
        let mut b = [0u8; 4];
        let mut w = BufWriter {
            buf: &mut b,
            len: 0,
        };
        assert!(write!(w, "12").is_ok());
        assert!(write!(w, "345").is_err());
        assert_eq!(w.len, 2);
        assert_eq!(&b[..2], b"12");
    }

    #[test]
    fn kstrtobool() {
        for t in ["1", "y", "Y", "yes", "t", "true", "e", "on", "On", "1\n"] {
            assert_eq!(parse_bool(t), Ok(true), "{t}");
        }
        for f in ["0", "n", "N", "no", "f", "false", "d", "off", "OFF", "0\n"] {
            assert_eq!(parse_bool(f), Ok(false), "{f}");
        }
        for bad in ["", "\n", "2", "x", "o", "ox", " 1"] {
            assert_eq!(parse_bool(bad), Err(Errno::EINVAL), "{bad:?}");
        }
    }
}
