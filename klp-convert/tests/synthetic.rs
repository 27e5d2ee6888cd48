//! Conversions of patch and target objects built in memory for each of the four
//! architectures: the decisions, the output format, and every refusal. These need
//! no compiler, so they run on every host (natively and under QEMU).

mod common;

use common::{AARCH64, ALL, Def, PatchExtras, S390X, X86_64, build_patch, build_target, parse};
use klp_convert::{
    ConvertReason, Decision, Error, KeepReason, Manifest, Options, SymbolChoice, TargetInput,
    convert,
};

fn input<'a>(name: &str, data: &'a [u8]) -> TargetInput<'a> {
    TargetInput {
        name: name.to_string(),
        file: format!("{name}.bin"),
        data,
    }
}

fn manifest(json: &str) -> Manifest {
    Manifest::from_json(json).unwrap()
}

fn run(
    patch: &[u8],
    targets: &[TargetInput<'_>],
    m: &Manifest,
) -> Result<klp_convert::Converted, Error> {
    convert("patch.o", patch, targets, m, &Options::default())
}

fn decision<'a>(out: &'a klp_convert::Converted, name: &str) -> &'a Decision {
    &out.report
        .symbols
        .iter()
        .find(|s| s.name == name)
        .unwrap_or_else(|| panic!("no decision for {name}"))
        .decision
}

#[test]
fn converts_static_hidden_and_module_symbols_on_every_arch() {
    for a in ALL {
        let refs = [
            "static_fn",
            "static_var",
            "global_fn",
            "mod_fn",
            "hidden_fn",
        ];
        let (patch, written) = build_patch(&a, &refs, &PatchExtras::default());
        let vmlinux = build_target(
            &a,
            &[
                Def::local("static_fn", "a.c"),
                Def::local("static_var", "a.c").data(),
                Def::global("global_fn"),
                Def::global("hidden_fn").hidden(),
            ],
        );
        let mymod = build_target(&a, &[Def::global("mod_fn")]);
        let out = run(
            &patch,
            &[input("vmlinux", &vmlinux), input("mymod", &mymod)],
            &Manifest::default(),
        )
        .unwrap();
        let before = parse(&patch);
        let p = parse(&out.data);
        common::check_invariants(&p);
        let arch = a.arch;

        // Symbols: renamed in place, SHN_LIVEPATCH, binding and type kept.
        for (name, klp) in [
            ("static_fn", ".klp.sym.vmlinux.static_fn,0"),
            ("static_var", ".klp.sym.vmlinux.static_var,0"),
            ("mod_fn", ".klp.sym.mymod.mod_fn,0"),
            ("hidden_fn", ".klp.sym.vmlinux.hidden_fn,0"),
        ] {
            let i = before.symbols.iter().position(|s| s.name == name).unwrap();
            let s = &p.symbols[i];
            assert_eq!(s.name, klp, "{arch}");
            assert_eq!(s.shndx, 0xff20, "{arch} {name}");
            assert_eq!(
                (s.bind, s.st_type),
                (before.symbols[i].bind, before.symbols[i].st_type)
            );
            assert_eq!((s.value, s.size), (0, 0));
        }
        assert_eq!(
            p.symbol("global_fn").shndx,
            0,
            "{arch}: global_fn stays undefined"
        );
        assert_eq!(p.symbols.len(), before.symbols.len());
        assert_eq!(p.symtab_info, before.symtab_info);
        assert_eq!(
            decision(&out, "static_fn"),
            &Decision::Convert {
                object: "vmlinux".into(),
                sympos: 0,
                klp_name: ".klp.sym.vmlinux.static_fn,0".into(),
                reason: ConvertReason::Local,
                // The first definition of the target: st_value 0.
                address: 0,
            }
        );
        assert!(matches!(
            decision(&out, "hidden_fn"),
            Decision::Convert {
                reason: ConvertReason::Hidden,
                ..
            }
        ));
        assert!(matches!(
            decision(&out, "mod_fn"),
            Decision::Convert {
                reason: ConvertReason::OtherObject,
                ..
            }
        ));
        assert!(matches!(
            decision(&out, "global_fn"),
            Decision::Keep {
                reason: KeepReason::Resolvable,
                ..
            }
        ));

        // Relocations: moved unchanged, one section per (object, relocated section).
        let klp_name = |n: &str| match n {
            "global_fn" => n.to_string(),
            "mod_fn" => format!(".klp.sym.mymod.{n},0"),
            _ => format!(".klp.sym.vmlinux.{n},0"),
        };
        let expect = |sec: &str, objects: &[&str]| -> Vec<(u64, u32, i64, String)> {
            written
                .iter()
                .filter(|w| w.section == sec && objects.contains(&w.symbol.as_str()))
                .map(|w| (w.offset, w.r_type, w.addend, klp_name(&w.symbol)))
                .collect()
        };
        let vmlinux_syms = ["static_fn", "static_var", "hidden_fn"];
        assert_eq!(
            p.relas(".klp.rela.vmlinux.text"),
            expect(".text", &vmlinux_syms),
            "{arch}"
        );
        assert_eq!(
            p.relas(".klp.rela.vmlinux.data"),
            expect(".data", &vmlinux_syms),
            "{arch}"
        );
        assert_eq!(
            p.relas(".klp.rela.mymod.text"),
            expect(".text", &["mod_fn"]),
            "{arch}"
        );
        assert_eq!(
            p.relas(".rela.text"),
            expect(".text", &["global_fn"]),
            "{arch}"
        );
        let text = p.section(".text").index as u32;
        let data = p.section(".data").index as u32;
        assert_eq!(p.section(".klp.rela.vmlinux.text").sh_info, text);
        assert_eq!(p.section(".klp.rela.mymod.text").sh_info, text);
        assert_eq!(p.section(".klp.rela.vmlinux.data").sh_info, data);
        // The pointer to .text + 8 (against the section symbol) stays in .rela.data.
        assert_eq!(p.relas(".rela.data"), vec![(8, a.abs64, 8, String::new())]);
        assert_eq!(out.report.sections.len(), 3);

        // Everything else is as it was, at the same index.
        for s in &before.sections {
            let o = &p.sections[s.index];
            assert_eq!(
                (&o.name, o.sh_type, o.sh_flags),
                (&s.name, s.sh_type, s.sh_flags)
            );
            assert_eq!(
                (o.sh_link, o.sh_info, o.sh_addralign),
                (s.sh_link, s.sh_info, s.sh_addralign)
            );
            // The symbol and string tables and the relocations are what changes.
            if !s.name.starts_with(".rela") && !s.name.ends_with("tab") {
                assert_eq!(o.data, s.data, "{arch}: {}", s.name);
            }
        }
        assert_eq!(common::modinfo(&p), ["livepatch=Y"]);
        assert!(out.report.modinfo_added);

        // Converting the output again changes nothing that matters.
        let again = run(
            &out.data,
            &[input("vmlinux", &vmlinux), input("mymod", &mymod)],
            &Manifest::default(),
        )
        .unwrap();
        let q = parse(&again.data);
        assert_eq!(q.sections.len(), p.sections.len());
        assert_eq!(common::modinfo(&q), ["livepatch=Y"]);
        assert!(again.report.sections.is_empty());
        assert_eq!(again.report.converted().count(), 0);
    }
}

#[test]
fn sympos_is_the_position_in_table_order_and_the_manifest_chooses() {
    for a in ALL {
        let (patch, _) = build_patch(&a, &["helper"], &PatchExtras::default());
        let vmlinux = build_target(
            &a,
            &[
                Def::local("helper", "a.c"),
                Def::global("other"),
                Def::local("helper", "dir/b.c"),
            ],
        );
        let t = [input("vmlinux", &vmlinux)];

        // Nothing chooses: refused, with both candidates listed.
        let e = run(&patch, &t, &Manifest::default()).unwrap_err();
        let Error::AmbiguousInObject {
            symbol,
            object,
            candidates,
        } = &e
        else {
            panic!("{e}");
        };
        assert_eq!((symbol.as_str(), object.as_str()), ("helper", "vmlinux"));
        let got: Vec<_> = candidates
            .iter()
            .map(|c| (c.sympos, c.address, c.file.clone()))
            .collect();
        assert_eq!(
            got,
            [
                (1, 0, Some("a.c".to_string())),
                (2, 32, Some("dir/b.c".to_string()))
            ]
        );
        let msg = e.to_string();
        for part in [
            "'helper'",
            "2 times in vmlinux",
            "sympos 1",
            "sympos 2",
            "a.c",
            "dir/b.c",
            "0x20",
        ] {
            assert!(msg.contains(part), "{part} missing from: {msg}");
        }

        // By file (basename or path), by position, or both when they agree.
        for m in [
            r#"{"symbols": {"helper": {"file": "b.c"}}}"#,
            r#"{"symbols": {"helper": {"file": "dir/b.c"}}}"#,
            r#"{"symbols": {"helper": {"sympos": 2}}}"#,
            r#"{"symbols": {"helper": {"sympos": 2, "file": "b.c", "object": "vmlinux"}}}"#,
        ] {
            let out = run(&patch, &t, &manifest(m)).unwrap();
            let p = parse(&out.data);
            assert_eq!(
                p.relas(".klp.rela.vmlinux.text")[0].3,
                ".klp.sym.vmlinux.helper,2",
                "{m}"
            );
        }
        let out = run(
            &patch,
            &t,
            &manifest(r#"{"symbols": {"helper": {"file": "a.c"}}}"#),
        )
        .unwrap();
        assert_eq!(
            out.report.converted().next().unwrap().1,
            ".klp.sym.vmlinux.helper,1"
        );

        // Choices that do not fit are refused with the candidates.
        let bad = |m: &str| run(&patch, &t, &manifest(m)).unwrap_err();
        assert!(matches!(
            bad(r#"{"symbols": {"helper": {"sympos": 3}}}"#),
            Error::BadSympos { sympos: 3, .. }
        ));
        assert!(matches!(
            bad(r#"{"symbols": {"helper": {"sympos": 0}}}"#),
            Error::BadSympos { sympos: 0, .. }
        ));
        assert!(matches!(
            bad(r#"{"symbols": {"helper": {"sympos": 1, "file": "b.c"}}}"#),
            Error::BadSympos { sympos: 1, .. }
        ));
        let e = bad(r#"{"symbols": {"helper": {"file": "c.c"}}}"#);
        assert!(
            matches!(&e, Error::NoSuchFile { candidates, .. } if candidates.len() == 2),
            "{e}"
        );
        let e = bad(r#"{"symbols": {"helper": {"object": "mymod"}}}"#);
        assert!(matches!(&e, Error::Manifest { .. }), "{e}");
    }
}

#[test]
fn a_unique_global_among_statics_is_what_the_reference_means() {
    let a = X86_64;
    let (patch, _) = build_patch(&a, &["helper"], &PatchExtras::default());
    let defs = [Def::local("helper", "a.c"), Def::global("helper")];
    let vmlinux = build_target(&a, &defs);
    let out = run(&patch, &[input("vmlinux", &vmlinux)], &Manifest::default()).unwrap();
    assert!(matches!(
        decision(&out, "helper"),
        Decision::Keep {
            reason: KeepReason::Resolvable,
            ..
        }
    ));
    assert!(
        out.report
            .warnings
            .iter()
            .any(|w| w.contains("static definitions")),
        "{:?}",
        out.report.warnings
    );
    // In a module, the same choice is converted, with its position.
    let out = run(&patch, &[input("mymod", &vmlinux)], &Manifest::default()).unwrap();
    assert_eq!(
        out.report.converted().next().unwrap().1,
        ".klp.sym.mymod.helper,2"
    );
}

#[test]
fn a_symbol_of_several_objects_is_refused_until_the_manifest_picks_one() {
    for a in ALL {
        let (patch, _) = build_patch(&a, &["shared"], &PatchExtras::default());
        let vmlinux = build_target(&a, &[Def::local("shared", "core.c")]);
        let mymod = build_target(&a, &[Def::global("shared").data()]);
        let t = [input("vmlinux", &vmlinux), input("mymod", &mymod)];
        let e = run(&patch, &t, &Manifest::default()).unwrap_err();
        let Error::AmbiguousObjects { candidates, .. } = &e else {
            panic!("{e}")
        };
        let objects: Vec<_> = candidates.iter().map(|c| c.object.as_str()).collect();
        assert_eq!(objects, ["vmlinux", "mymod"]);
        let msg = e.to_string();
        assert!(
            msg.contains("several objects") && msg.contains("core.c") && msg.contains("\"object\""),
            "{msg}"
        );

        let out = run(
            &patch,
            &t,
            &manifest(r#"{"symbols": {"shared": {"object": "mymod"}}}"#),
        )
        .unwrap();
        assert_eq!(
            out.report.converted().next().unwrap().1,
            ".klp.sym.mymod.shared,0"
        );
        let out = run(
            &patch,
            &t,
            &manifest(r#"{"symbols": {"shared": {"object": "vmlinux"}}}"#),
        )
        .unwrap();
        assert_eq!(
            out.report.converted().next().unwrap().1,
            ".klp.sym.vmlinux.shared,0"
        );
    }
}

#[test]
fn unknown_symbols_are_refused_or_kept_on_request() {
    let a = AARCH64;
    let (patch, _) = build_patch(&a, &["nowhere", "global_fn"], &PatchExtras::default());
    let vmlinux = build_target(&a, &[Def::global("global_fn")]);
    let t = [input("vmlinux", &vmlinux)];
    let e = run(&patch, &t, &Manifest::default()).unwrap_err();
    assert!(
        matches!(&e, Error::NotFound { symbol, .. } if symbol == "nowhere"),
        "{e}"
    );
    let msg = e.to_string();
    assert!(
        msg.contains("'nowhere'") && msg.contains("vmlinux (.symtab of vmlinux.bin)"),
        "{msg}"
    );
    let e = run(&patch, &[], &Manifest::default()).unwrap_err();
    assert!(e.to_string().contains("no target was given"), "{e}");

    let out = run(&patch, &t, &manifest(r#"{"keep": ["nowhere"]}"#)).unwrap();
    assert!(matches!(
        decision(&out, "nowhere"),
        Decision::Keep {
            reason: KeepReason::Manifest,
            ..
        }
    ));
    let out = convert(
        "patch.o",
        &patch,
        &t,
        &Manifest::default(),
        &Options {
            keep_unresolved: true,
            ..Options::default()
        },
    )
    .unwrap();
    assert!(matches!(
        decision(&out, "nowhere"),
        Decision::Keep {
            reason: KeepReason::Unresolved,
            ..
        }
    ));
    assert!(out.report.warnings.iter().any(|w| w.contains("'nowhere'")));
    let e = run(
        &patch,
        &t,
        &manifest(r#"{"symbols": {"nowhere": {"object": "vmlinux"}}}"#),
    )
    .unwrap_err();
    assert!(matches!(e, Error::NotInObject { .. }), "{e}");
}

#[test]
fn force_klp_converts_a_resolvable_global() {
    let a = S390X;
    let (patch, _) = build_patch(&a, &["global_fn"], &PatchExtras::default());
    let vmlinux = build_target(&a, &[Def::global("global_fn")]);
    let m = manifest(r#"{"force_klp": ["global_fn"], "symbols": {"unused": {"sympos": 1}}}"#);
    let out = run(&patch, &[input("vmlinux", &vmlinux)], &m).unwrap();
    assert!(matches!(
        decision(&out, "global_fn"),
        Decision::Convert {
            reason: ConvertReason::Forced,
            sympos: 0,
            ..
        }
    ));
    assert!(out.report.warnings.iter().any(|w| w.contains("'unused'")));
    let p = parse(&out.data);
    common::check_invariants(&p);
    assert_eq!(
        p.relas(".klp.rela.vmlinux.text")[0].3,
        ".klp.sym.vmlinux.global_fn,0"
    );
}

#[test]
fn a_kernel_symbol_map_keeps_exported_symbols_only() {
    let a = X86_64;
    let refs = ["printk", "vfs_helper", "cmdline_show", "ext4_fn", ".TOC."];
    let (patch, _) = build_patch(&a, &refs, &PatchExtras::default());
    let map = "ffffffff81000000 T _text\n\
               ffffffff81001000 T printk\n\
               ffffffff81002000 T vfs_helper\n\
               ffffffff81003000 t cmdline_show\n\
               ffffffff82000000 r __ksymtab_printk\n\
               ffffffffc0001000 t ext4_fn\t[ext4]\n";
    let out = run(
        &patch,
        &[input("vmlinux", map.as_bytes())],
        &Manifest::default(),
    )
    .unwrap();
    assert!(matches!(
        decision(&out, "printk"),
        Decision::Keep {
            reason: KeepReason::Resolvable,
            ..
        }
    ));
    assert!(matches!(
        decision(&out, "vfs_helper"),
        Decision::Convert {
            reason: ConvertReason::NotExported,
            ..
        }
    ));
    assert!(matches!(
        decision(&out, "cmdline_show"),
        Decision::Convert {
            reason: ConvertReason::Local,
            ..
        }
    ));
    assert!(matches!(
        decision(&out, ".TOC."),
        Decision::Keep {
            reason: KeepReason::LoaderProvided,
            ..
        }
    ));
    let p = parse(&out.data);
    common::check_invariants(&p);
    assert_eq!(p.symbol(".klp.sym.vmlinux.vfs_helper,0").shndx, 0xff20);
    assert_eq!(p.symbol(".klp.sym.vmlinux.cmdline_show,0").shndx, 0xff20);
    assert_eq!(p.symbol(".klp.sym.ext4.ext4_fn,0").shndx, 0xff20);
    assert_eq!(p.symbol("printk").shndx, 0);
    assert!(p.has_section(".klp.rela.ext4.text"));
}

#[test]
fn modinfo_gets_livepatch_once() {
    let a = X86_64;
    let vmlinux = build_target(&a, &[Def::local("s", "a.c")]);
    let t = [input("vmlinux", &vmlinux)];
    for (modinfo, want) in [
        (&b"license=GPL\0"[..], vec!["license=GPL", "livepatch=Y"]),
        (&b"license=GPL"[..], vec!["license=GPL", "livepatch=Y"]),
        (
            &b"livepatch=Y\0license=GPL\0"[..],
            vec!["livepatch=Y", "license=GPL"],
        ),
    ] {
        let extras = PatchExtras {
            modinfo: Some(modinfo),
            ..Default::default()
        };
        let (patch, _) = build_patch(&a, &["s"], &extras);
        let out = run(&patch, &t, &Manifest::default()).unwrap();
        assert_eq!(common::modinfo(&parse(&out.data)), want);
        assert_eq!(
            out.report.modinfo_added,
            want.last() == Some(&"livepatch=Y")
        );
    }
    let extras = PatchExtras {
        modinfo: Some(b"livepatch=N\0"),
        ..Default::default()
    };
    let (patch, _) = build_patch(&a, &["s"], &extras);
    let e = run(&patch, &t, &Manifest::default()).unwrap_err();
    assert!(
        matches!(&e, Error::Modinfo { entry } if entry == "livepatch=N"),
        "{e}"
    );
}

#[test]
fn a_relocation_in_a_section_that_is_not_loaded_is_refused() {
    let a = X86_64;
    let extras = PatchExtras {
        debug_ref: Some("s"),
        ..Default::default()
    };
    let (patch, _) = build_patch(&a, &["s"], &extras);
    let vmlinux = build_target(&a, &[Def::local("s", "a.c")]);
    let e = run(&patch, &[input("vmlinux", &vmlinux)], &Manifest::default()).unwrap_err();
    assert!(
        matches!(&e, Error::NotLoaded { symbol, section } if symbol == "s" && section == ".debug_info"),
        "{e}"
    );
}

#[test]
fn a_truncated_or_damaged_patch_is_refused_without_panic() {
    for a in ALL {
        let (patch, _) = build_patch(&a, &["s", "g"], &PatchExtras::default());
        let vmlinux = build_target(&a, &[Def::local("s", "a.c"), Def::global("g")]);
        let t = [input("vmlinux", &vmlinux)];
        for len in 0..patch.len() {
            let e = run(&patch[..len], &t, &Manifest::default()).unwrap_err();
            assert!(matches!(e, Error::Malformed { .. }), "{} bytes: {e}", len);
            assert!(
                e.to_string()
                    .starts_with("patch.o is not a well-formed ELF file"),
                "{e}"
            );
        }
        // A truncated target names the target.
        let e = run(
            &patch,
            &[input("vmlinux", &vmlinux[..vmlinux.len() - 3])],
            &Manifest::default(),
        )
        .unwrap_err();
        assert!(
            matches!(&e, Error::Malformed { file, .. } if file == "vmlinux.bin"),
            "{e}"
        );
        // Damaged bytes anywhere: an error or a conversion, never a panic.
        let mut seed = 0x9e37_79b9_7f4a_7c15u64;
        for _ in 0..500 {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            let mut bad = patch.clone();
            let at = (seed % bad.len() as u64) as usize;
            bad[at] ^= (seed >> 32) as u8 | 1;
            let _ = run(&bad, &t, &Manifest::default());
            let mut badt = vmlinux.clone();
            let at = (seed % badt.len() as u64) as usize;
            badt[at] ^= (seed >> 40) as u8 | 1;
            let _ = run(&patch, &[input("vmlinux", &badt)], &Manifest::default());
        }
    }
}

#[test]
fn wrong_machines_byte_orders_and_file_types_are_refused() {
    use object::{Architecture, Endianness};
    let make = |arch, endian| {
        let spec = common::ArchSpec {
            object: arch,
            endian,
            ..X86_64
        };
        build_patch(&spec, &["s"], &PatchExtras::default()).0
    };
    let vmlinux = build_target(&X86_64, &[Def::local("s", "a.c")]);
    let t = [input("vmlinux", &vmlinux)];

    // MIPS (EM_MIPS = 8): an architecture klp has no back-end for.
    let e = run(
        &make(Architecture::Mips64, Endianness::Little),
        &t,
        &Manifest::default(),
    )
    .unwrap_err();
    assert!(matches!(e, Error::UnsupportedMachine { .. }), "{e}");
    assert!(e.to_string().contains("ELF machine 8"), "{e}");
    let e = run(
        &make(Architecture::I386, Endianness::Little),
        &t,
        &Manifest::default(),
    )
    .unwrap_err();
    assert!(matches!(e, Error::UnsupportedMachine { .. }), "{e}");
    let e = run(
        &make(Architecture::Aarch64, Endianness::Big),
        &t,
        &Manifest::default(),
    )
    .unwrap_err();
    assert!(
        matches!(
            &e,
            Error::ByteOrder {
                found: "big-endian",
                ..
            }
        ),
        "{e}"
    );
    let e = run(
        &make(Architecture::S390x, Endianness::Little),
        &t,
        &Manifest::default(),
    )
    .unwrap_err();
    assert!(
        matches!(
            &e,
            Error::ByteOrder {
                found: "little-endian",
                ..
            }
        ),
        "{e}"
    );
    let e = run(
        &make(Architecture::PowerPc64, Endianness::Big),
        &t,
        &Manifest::default(),
    )
    .unwrap_err();
    assert!(matches!(&e, Error::ByteOrder { .. }), "{e}");

    // A target of another architecture, or of the right one in the wrong byte order.
    for (patch_arch, target_arch) in [(X86_64, S390X), (S390X, X86_64), (AARCH64, X86_64)] {
        let (patch, _) = build_patch(&patch_arch, &["s"], &PatchExtras::default());
        let other = build_target(&target_arch, &[Def::local("s", "a.c")]);
        let e = run(&patch, &[input("vmlinux", &other)], &Manifest::default()).unwrap_err();
        let Error::ArchMismatch { patch, target, .. } = &e else {
            panic!("{e}")
        };
        assert_eq!(
            (patch.as_str(), target.as_str()),
            (patch_arch.arch.name(), target_arch.arch.name())
        );
    }
    let (patch, _) = build_patch(&AARCH64, &["s"], &PatchExtras::default());
    let be = build_target(
        &common::ArchSpec {
            endian: Endianness::Big,
            ..AARCH64
        },
        &[Def::local("s", "a.c")],
    );
    let e = run(&patch, &[input("vmlinux", &be)], &Manifest::default()).unwrap_err();
    assert!(
        matches!(&e, Error::ArchMismatch { target, .. } if target == "big-endian aarch64"),
        "{e}"
    );

    // Not ET_REL: the same file marked ET_EXEC.
    let (mut patch, _) = build_patch(&X86_64, &["s"], &PatchExtras::default());
    patch[16] = 2;
    let e = run(&patch, &t, &Manifest::default()).unwrap_err();
    assert!(matches!(e, Error::NotRelocatable { e_type: 2, .. }), "{e}");

    // Neither ELF nor text.
    let (patch, _) = build_patch(&X86_64, &["s"], &PatchExtras::default());
    let e = run(
        &patch,
        &[input("vmlinux", b"\x00\x01\x02garbage")],
        &Manifest::default(),
    )
    .unwrap_err();
    assert!(matches!(e, Error::SymbolMap { line: 1, .. }), "{e}");
}

#[test]
fn object_names_are_checked() {
    let (patch, _) = build_patch(&X86_64, &["s"], &PatchExtras::default());
    let vmlinux = build_target(&X86_64, &[Def::local("s", "a.c")]);
    let e = run(&patch, &[input("my.mod", &vmlinux)], &Manifest::default()).unwrap_err();
    assert!(matches!(e, Error::ObjectName { .. }), "{e}");
    let long = "m".repeat(56);
    let e = run(&patch, &[input(&long, &vmlinux)], &Manifest::default()).unwrap_err();
    assert!(matches!(e, Error::ObjectName { .. }), "{e}");
    let e = run(
        &patch,
        &[input("vmlinux", &vmlinux), input("vmlinux", &vmlinux)],
        &Manifest::default(),
    )
    .unwrap_err();
    assert!(matches!(e, Error::DuplicateObject { .. }), "{e}");
    let m = Manifest {
        symbols: [(
            "s".to_string(),
            SymbolChoice {
                object: Some("a.b".into()),
                ..Default::default()
            },
        )]
        .into_iter()
        .collect(),
        ..Default::default()
    };
    let e = run(&patch, &[input("vmlinux", &vmlinux)], &m).unwrap_err();
    assert!(matches!(e, Error::Manifest { .. }), "{e}");
}

#[test]
fn a_symbol_name_that_cannot_be_a_livepatch_name_is_refused() {
    let long = "x".repeat(512);
    let (patch, _) = build_patch(&X86_64, &[&long], &PatchExtras::default());
    let vmlinux = build_target(&X86_64, &[Def::local(&long, "a.c")]);
    let e = run(&patch, &[input("vmlinux", &vmlinux)], &Manifest::default()).unwrap_err();
    assert!(matches!(e, Error::SymbolName { .. }), "{e}");
}

#[test]
fn relocation_sections_of_an_unknown_layout_are_refused() {
    let a = X86_64;
    let (patch, _) = build_patch(&a, &["s"], &PatchExtras::default());
    let vmlinux = build_target(&a, &[Def::local("s", "a.c")]);
    let t = [input("vmlinux", &vmlinux)];
    let index = parse(&patch).section(".rela.text").index;
    // Elf64_Ehdr.e_shoff is at byte 40; an Elf64_Shdr is 64 bytes, with sh_type at
    // +4, sh_info at +44 and sh_entsize at +56 (little-endian here).
    let shoff = u64::from_le_bytes(patch[40..48].try_into().unwrap()) as usize;
    let field = |at: usize| shoff + 64 * index + at;
    let patched = |at: usize, bytes: &[u8]| {
        let mut p = patch.clone();
        p[field(at)..field(at) + bytes.len()].copy_from_slice(bytes);
        p
    };
    for (what, bad) in [
        ("entry size is 16", patched(56, &16u64.to_le_bytes())),
        ("names no section", patched(44, &0u32.to_le_bytes())),
        ("SHT_CREL", patched(4, &0x4000_0014u32.to_le_bytes())),
        (
            "no array of 16-byte Rel entries",
            patched(4, &9u32.to_le_bytes()),
        ),
    ] {
        let e = run(&bad, &t, &Manifest::default()).unwrap_err();
        assert!(matches!(e, Error::RelocationSection { .. }), "{what}: {e}");
        assert!(e.to_string().contains(what), "{what}: {e}");
    }
}

#[test]
fn a_kernel_vmlinux_counts_sympos_in_address_order() {
    // scripts/kallsyms.c sorts by address, so for a kernel (a table with
    // __ksymtab_* symbols) the second definition in the table, at the lower
    // address, is sympos 1.
    let a = X86_64;
    let (patch, _) = build_patch(&a, &["helper"], &PatchExtras::default());
    let defs = [
        Def::local("helper", "a.c").at(0x200),
        Def::local("helper", "b.c").at(0x100),
        Def::global("__ksymtab_printk").data(),
    ];
    let kernel = build_target(&a, &defs);
    let m = manifest(r#"{"symbols": {"helper": {"file": "a.c"}}}"#);
    let out = run(&patch, &[input("vmlinux", &kernel)], &m).unwrap();
    assert_eq!(
        out.report.converted().next().unwrap().1,
        ".klp.sym.vmlinux.helper,2"
    );
    // Without __ksymtab_*, table order.
    let plain = build_target(&a, &defs[..2]);
    let out = run(&patch, &[input("vmlinux", &plain)], &m).unwrap();
    assert_eq!(
        out.report.converted().next().unwrap().1,
        ".klp.sym.vmlinux.helper,1"
    );
}
