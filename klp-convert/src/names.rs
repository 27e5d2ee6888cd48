//! The livepatch name forms (spec §8.3) and the rules for object names.

use crate::error::Error;

/// The object name of the main target: the kernel's vmlinux, or the executable of a
/// process (klp-user calls it `vmlinux` too).
pub const MAIN_OBJECT: &str = "vmlinux";

/// `MODULE_NAME_LEN - 1`: the longest object name the kernel parses out of a
/// livepatch section or symbol name.
pub const OBJECT_NAME_MAX: usize = 55;

/// `KSYM_NAME_LEN - 1`: the longest symbol name in a livepatch symbol name.
pub const SYMBOL_NAME_MAX: usize = 511;

/// `SHN_LIVEPATCH`: the section index of a livepatch symbol.
pub const SHN_LIVEPATCH: u16 = 0xff20;

/// `SHF_RELA_LIVEPATCH`: the flag of a livepatch relocation section.
pub const SHF_RELA_LIVEPATCH: u64 = 0x0010_0000;

/// Checks an object name: 1 to 55 characters, none of them `.` (or NUL, or white
/// space, which no loader could match).
pub fn check_object_name(name: &str) -> Result<(), Error> {
    let bad = |reason| {
        Err(Error::ObjectName {
            name: name.to_string(),
            reason,
        })
    };
    if name.is_empty() {
        return bad("it is empty");
    }
    if name.len() > OBJECT_NAME_MAX {
        return bad("it is longer than 55 characters");
    }
    if name.contains('.') {
        return bad("it contains '.'");
    }
    if name.chars().any(|c| c == '\0' || c.is_whitespace()) {
        return bad("it contains NUL or white space");
    }
    Ok(())
}

/// Checks that a symbol name fits the `<symbol_name>` field of a livepatch symbol.
pub fn check_symbol_name(name: &str) -> Result<(), Error> {
    let bad = |reason| {
        Err(Error::SymbolName {
            symbol: name.to_string(),
            reason,
        })
    };
    if name.is_empty() {
        return bad("its name is empty");
    }
    if name.len() > SYMBOL_NAME_MAX {
        return bad("its name is longer than 511 characters (KSYM_NAME_LEN)");
    }
    if name.contains(',') {
        return bad("its name contains ',', which ends the name in a livepatch symbol");
    }
    Ok(())
}

/// `.klp.sym.<objname>.<symbol>,<sympos>`.
pub fn klp_symbol_name(object: &str, symbol: &str, sympos: u64) -> String {
    format!(".klp.sym.{object}.{symbol},{sympos}")
}

/// `.klp.rela.<objname>.<section>`: the section's own name follows the object name
/// after one `.` (its leading `.` is not doubled), as the seed's examples show
/// (`.klp.rela.vmlinux.text.cmdline_proc_show` for `.text.cmdline_proc_show`).
pub fn klp_rela_name(object: &str, section: &str) -> String {
    let s = section.strip_prefix('.').unwrap_or(section);
    format!(".klp.rela.{object}.{s}")
}

/// The object name a target file has when `--target` gives only a path: `vmlinux`
/// for `vmlinux*` and `System.map*`, the module name for `NAME.ko`, and for a shared
/// object the basename up to its `.so` (klp-user's rule: `libfoo.so.1` → `libfoo`).
/// Anything else needs an explicit `NAME=PATH`.
pub fn infer_object_name(path: &str) -> Option<String> {
    let base = path.rsplit('/').next().unwrap_or(path);
    if base.starts_with("vmlinux") || base.starts_with("System.map") {
        return Some(MAIN_OBJECT.to_string());
    }
    if let Some(m) = base.strip_suffix(".ko") {
        return Some(m.to_string());
    }
    let mut from = 0;
    while let Some(i) = base.get(from..).and_then(|s| s.find(".so")) {
        let at = from + i;
        let rest = base.get(at + 3..).unwrap_or("");
        if rest.is_empty() || rest.starts_with('.') {
            return base.get(..at).map(str::to_string);
        }
        from = at + 3;
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn object_names() {
        assert!(check_object_name("vmlinux").is_ok());
        assert!(check_object_name("libfoo-1").is_ok());
        assert!(check_object_name(&"a".repeat(55)).is_ok());
        assert!(check_object_name(&"a".repeat(56)).is_err());
        assert!(check_object_name("").is_err());
        assert!(check_object_name("foo.ko").is_err());
        assert!(check_object_name("a b").is_err());
    }

    #[test]
    fn symbol_names() {
        assert!(check_symbol_name("can_modify_feature.isra.3").is_ok());
        assert!(check_symbol_name(&"s".repeat(511)).is_ok());
        assert!(check_symbol_name(&"s".repeat(512)).is_err());
        assert!(check_symbol_name("a,b").is_err());
    }

    #[test]
    fn name_forms_follow_the_seed() {
        // module-elf-format.rst §3 and §4.2 examples.
        assert_eq!(
            klp_symbol_name("vmlinux", "snprintf", 0),
            ".klp.sym.vmlinux.snprintf,0"
        );
        assert_eq!(
            klp_symbol_name("btrfs", "btrfs_ktype", 0),
            ".klp.sym.btrfs.btrfs_ktype,0"
        );
        assert_eq!(
            klp_rela_name("ext4", ".text.ext4_attr_store"),
            ".klp.rela.ext4.text.ext4_attr_store"
        );
        assert_eq!(
            klp_rela_name("vmlinux", ".text.cmdline_proc_show"),
            ".klp.rela.vmlinux.text.cmdline_proc_show"
        );
        assert_eq!(
            klp_rela_name("vmlinux", "__jump_table"),
            ".klp.rela.vmlinux.__jump_table"
        );
    }

    #[test]
    fn inferred_object_names() {
        assert_eq!(
            infer_object_name("/boot/vmlinux-6.1").as_deref(),
            Some("vmlinux")
        );
        assert_eq!(
            infer_object_name("System.map-6.1.0-18-amd64").as_deref(),
            Some("vmlinux")
        );
        assert_eq!(
            infer_object_name("fs/ext4/ext4.ko").as_deref(),
            Some("ext4")
        );
        assert_eq!(
            infer_object_name("/usr/lib/libz.so.1.2").as_deref(),
            Some("libz")
        );
        assert_eq!(
            infer_object_name("libfoo-1.so").as_deref(),
            Some("libfoo-1")
        );
        assert_eq!(infer_object_name("./myprog"), None);
    }
}
