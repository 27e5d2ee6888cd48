use alloc::format;

use super::*;

#[test]
fn section_names() {
    assert_eq!(
        parse_rela_objname(".klp.rela.vmlinux..text"),
        Some("vmlinux")
    );
    assert_eq!(
        parse_rela_objname(".klp.rela.mymod.text.unlikely"),
        Some("mymod")
    );
    assert_eq!(parse_rela_objname(".klp.rela.vmlinux"), Some("vmlinux"));
    assert_eq!(parse_rela_objname(".klp.rela..text"), None);
    assert_eq!(parse_rela_objname(".klp.rela."), None);
    assert_eq!(parse_rela_objname(".rela.text"), None);
    // A longer object name is cut at 55 characters, and the parse still succeeds.
    let long = format!(".klp.rela.{}.text", "m".repeat(60));
    assert_eq!(parse_rela_objname(&long).map(str::len), Some(55));
}

#[test]
fn symbol_names() {
    assert_eq!(
        parse_sym_name(".klp.sym.vmlinux.saved_command_line,1"),
        Some(KlpSymName {
            objname: "vmlinux",
            name: "saved_command_line",
            sympos: 1
        })
    );
    // Dots in the symbol name, white space and a sign before the number, junk after.
    assert_eq!(
        parse_sym_name(".klp.sym.mymod.foo.cold.2, +3xyz"),
        Some(KlpSymName {
            objname: "mymod",
            name: "foo.cold.2",
            sympos: 3
        })
    );
    assert_eq!(
        parse_sym_name(".klp.sym.vmlinux.foo,0").map(|s| s.sympos),
        Some(0)
    );
    for bad in [
        ".klp.sym.vmlinux.foo",    // no sympos
        ".klp.sym.vmlinux.foo,",   // empty sympos
        ".klp.sym.vmlinux.foo,x",  // not a number
        ".klp.sym..foo,1",         // empty object
        ".klp.sym.vmlinux.,1",     // empty symbol
        ".klp.sym.vmlinux",        // nothing after the object
        ".klp.rela.vmlinux.foo,1", // not a symbol name
    ] {
        assert_eq!(parse_sym_name(bad), None, "{bad}");
    }
    let obj56 = format!(".klp.sym.{}.foo,1", "m".repeat(56));
    assert_eq!(parse_sym_name(&obj56), None, "56-character object");
    let obj55 = format!(".klp.sym.{}.foo,1", "m".repeat(55));
    assert!(parse_sym_name(&obj55).is_some());
    let sym512 = format!(".klp.sym.vmlinux.{},1", "f".repeat(512));
    assert_eq!(parse_sym_name(&sym512), None, "512-character symbol");
    let sym511 = format!(".klp.sym.vmlinux.{},1", "f".repeat(511));
    assert!(parse_sym_name(&sym511).is_some());
    // strtoul wraps; a minus sign negates.
    assert_eq!(
        parse_sym_name(".klp.sym.a.b,-1").map(|s| s.sympos),
        Some(u64::MAX)
    );
}

#[test]
fn malformed_headers_are_typed_errors() {
    assert_eq!(
        PatchObject::parse(b"").unwrap_err(),
        ElfError::Truncated {
            what: "the ELF identification",
            offset: 0,
            size: 16
        }
    );
    assert_eq!(
        PatchObject::parse(&[0u8; 64]).unwrap_err(),
        ElfError::NotElf
    );
    let mut h = [0u8; 64];
    h[..4].copy_from_slice(b"\x7fELF");
    h[4] = 1;
    assert_eq!(PatchObject::parse(&h).unwrap_err(), ElfError::Class(1));
    h[4] = 2;
    h[5] = 3;
    assert_eq!(PatchObject::parse(&h).unwrap_err(), ElfError::Encoding(3));
    h[5] = 1;
    h[16] = 2; // ET_EXEC
    assert_eq!(
        PatchObject::parse(&h).unwrap_err(),
        ElfError::NotRelocatable(2)
    );
    h[16] = 1;
    h[58] = 64; // e_shentsize
    h[40] = 0xff; // e_shoff far away
    assert!(matches!(
        PatchObject::parse(&h).unwrap_err(),
        ElfError::Truncated {
            what: "the section headers",
            ..
        }
    ));
}
