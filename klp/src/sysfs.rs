//! The `/sys/kernel/livepatch` tree: attributes, modes, read formats and write errors.
//!
//! Paths are relative to `/sys/kernel/livepatch` and split into components. Hosts route
//! their own file systems (a simulated VFS, a control socket) to these calls.

use alloc::format;
use alloc::string::{String, ToString};
use alloc::vec::Vec;

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
                    .any(|f| f.dir_name() == *x)
                    .then_some(Node::Dir)
            }
            _ => None,
        }
    }

    fn sysfs_obj(&self, p: &str, o: &str) -> Option<&crate::core::Object<H>> {
        let id = self.find_patch(p)?;
        self.patch(id)?.objs.iter().find(|x| x.display_name() == o)
    }

    /// The entries of the directory at `path`, in creation order.
    pub fn sysfs_list(&self, path: &[&str]) -> Option<Vec<String>> {
        match path {
            [] => Some(
                self.patches
                    .iter()
                    .filter(|p| p.dir)
                    .map(|p| p.name.clone())
                    .collect(),
            ),
            [p] => {
                let id = self.find_patch(p)?;
                let mut v: Vec<String> = PATCH_ATTRS.iter().map(|(n, _)| n.to_string()).collect();
                v.extend(
                    self.patch(id)?
                        .objs
                        .iter()
                        .map(|o| o.display_name().to_string()),
                );
                Some(v)
            }
            [p, o] => {
                let obj = self.sysfs_obj(p, o)?;
                let mut v = alloc::vec!["patched".to_string()];
                v.extend(obj.funcs.iter().map(|f| f.dir_name()));
                Some(v)
            }
            [_, _, _] => match self.sysfs_node(path)? {
                Node::Dir => Some(Vec::new()),
                Node::Attr(_) => None,
            },
            _ => None,
        }
    }

    /// Reads an attribute (`"%d\n"`).
    pub fn sysfs_read(&self, path: &[&str]) -> KResult<String> {
        let node = self.sysfs_node(path).ok_or(Errno::ENOENT)?;
        let Node::Attr(mode) = node else {
            return Err(Errno::EISDIR);
        };
        if mode & 0o444 == 0 {
            return Err(Errno::EACCES);
        }
        let v: i64 = match path {
            [p, a] => {
                let id = self.find_patch(p).ok_or(Errno::ENOENT)?;
                let patch = self.patch(id).ok_or(Errno::ENOENT)?;
                match *a {
                    "enabled" => patch.enabled as i64,
                    "transition" => (self.transition == Some(id)) as i64,
                    "replace" => patch.replace as i64,
                    "stack_order" => match self.list.iter().position(|x| *x == id) {
                        Some(i) => i as i64 + 1,
                        None => self.list.len() as i64,
                    },
                    _ => return Err(Errno::EACCES),
                }
            }
            [p, o, _] => self.sysfs_obj(p, o).ok_or(Errno::ENOENT)?.patched as i64,
            _ => return Err(Errno::ENOENT),
        };
        Ok(format!("{v}\n"))
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
