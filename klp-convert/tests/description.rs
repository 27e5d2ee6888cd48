//! The patch description (`.init.klp_objects` / `.init.klp_funcs`, upstream
//! klp-build's layout) written from the manifest's `patch`: patch and target
//! objects built in memory for each of the four architectures, the output read back
//! independently and compared with values worked out by hand from the layout; and
//! every refusal. No compiler is needed, so these run on every host.

mod common;

use common::{
    ALL, Def, Parsed, PatchExtras, Written, X86_64, build_patch, build_target, check_fields, parse,
};
use klp_convert::{Error, Manifest, Options, TargetInput, convert};

fn input<'a>(name: &str, data: &'a [u8]) -> TargetInput<'a> {
    TargetInput {
        name: name.to_string(),
        file: format!("{name}.bin"),
        data,
    }
}

fn run(
    patch: &[u8],
    targets: &[TargetInput<'_>],
    json: &str,
) -> Result<klp_convert::Converted, Error> {
    let m = Manifest::from_json(json)?;
    convert("patch.o", patch, targets, &m, &Options::default())
}

/// The functions the patch defines besides `new_fn`: (name, local, function).
const DEFINED: &[(&str, bool, bool)] = &[
    ("new_show", false, true),
    ("new_other", true, true),
    ("__klp_post_patch_callback_vmlinux", false, true),
    ("pre_cb", false, true),
    ("a_variable", false, false),
    ("new_mod", false, true),
    ("__klp_pre_unpatch_callback_mymod", true, true),
];

fn patch_for(a: &common::ArchSpec) -> (Vec<u8>, Vec<Written>) {
    build_patch(
        a,
        &["static_fn", "mod_fn"],
        &PatchExtras {
            defined: DEFINED,
            comdat: Some("grouped_fn"),
            addrsig: &["new_show", "grouped_fn", "new_fn", "new_other"],
            ..Default::default()
        },
    )
}

fn vmlinux_for(a: &common::ArchSpec) -> Vec<u8> {
    build_target(
        a,
        &[
            Def::local("static_fn", "a.c"),
            Def::global("show"),
            Def::local("other", "a.c"),
            Def::local("other", "b.c"),
            Def::local("counter", "a.c").data(),
        ],
    )
}

fn mymod_for(a: &common::ArchSpec) -> Vec<u8> {
    build_target(a, &[Def::global("mod_fn"), Def::global("mod_old")])
}

const MANIFEST: &str = r#"{"patch": {"objects": [
    {"object": "vmlinux",
     "funcs": [{"old": "show", "new": "new_show"},
               {"old": "other", "new": "new_other", "sympos": 2}],
     "callbacks": {"pre_patch": "pre_cb"}},
    {"object": "mymod", "funcs": [{"old": "mod_old", "new": "new_mod"}]}]}}"#;

/// Every relocation the builder wrote is still there, at its offset with its type
/// and addend, against the same symbol (or its `.klp.sym` form) — the symbol
/// indices were renumbered around the two new section symbols.
fn check_written(p: &Parsed, written: &[Written]) {
    for w in written {
        let target = p.section(w.section).index as u32;
        let found: Vec<(u32, i64, String)> = p
            .sections
            .iter()
            .filter(|s| s.sh_type == 4 && s.sh_info == target)
            .flat_map(|s| s.relas.iter())
            .filter(|r| r.0 == w.offset)
            .map(|&(_, t, a, s)| (t, a, p.label(s)))
            .collect();
        assert_eq!(found.len(), 1, "{w:?}: {found:?}");
        let (t, a, name) = &found[0];
        assert_eq!((*t, *a), (w.r_type, w.addend), "{w:?}");
        let klp = name.starts_with(".klp.sym.") && name.contains(&format!(".{},", w.symbol));
        assert!(name == &w.symbol || klp, "{w:?}: against {name}");
    }
}

#[test]
fn the_description_has_the_layout_on_every_arch() {
    for a in ALL {
        let (patch, written) = patch_for(&a);
        let vmlinux = vmlinux_for(&a);
        let mymod = mymod_for(&a);
        let out = run(
            &patch,
            &[input("vmlinux", &vmlinux), input("mymod", &mymod)],
            MANIFEST,
        )
        .unwrap_or_else(|e| panic!("{:?}: {e}", a.arch));
        assert!(out.report.warnings.is_empty(), "{:?}", out.report.warnings);
        let p = parse(&out.data);
        common::check_invariants(&p);
        check_written(&p, &written);
        let abs = a.abs64;

        // Sections: type, flags, alignment, sizes. SHT_PROGBITS = 1, SHT_RELA = 4;
        // SHF_ALLOC = 2, SHF_MERGE = 0x10, SHF_STRINGS = 0x20, SHF_INFO_LINK = 0x40.
        // Two objects of 64 bytes; three functions of 24 bytes.
        let objects = p.section(".init.klp_objects");
        let funcs = p.section(".init.klp_funcs");
        let strings = p.section(".init.klp_strings");
        for (s, size) in [(objects, 128), (funcs, 72)] {
            assert_eq!(
                (s.sh_type, s.sh_flags, s.sh_addralign, s.data.len()),
                (1, 2, 8, size),
                "{}",
                s.name
            );
        }
        assert_eq!(
            (strings.sh_type, strings.sh_flags, strings.sh_entsize),
            (1, 0x32, 1)
        );
        for (rela, target) in [
            (".rela.init.klp_objects", objects.index),
            (".rela.init.klp_funcs", funcs.index),
        ] {
            let r = p.section(rela);
            assert_eq!(
                (
                    r.sh_type,
                    r.sh_flags,
                    r.sh_link as usize,
                    r.sh_info as usize
                ),
                (4, 0x40, p.symtab, target),
                "{rela}"
            );
            assert_eq!((r.sh_entsize, r.sh_addralign), (24, 8), "{rela}");
        }

        // Strings, in order of use, each once: vmlinux has no name; "show" @0
        // (4 + NUL), "other" @5 (5 + NUL), "mymod" @11, "mod_old" @17; 25 bytes.
        assert_eq!(strings.data, b"show\0other\0mymod\0mod_old\0");

        // klp_object_ext[0] (vmlinux) @0: name NULL; funcs @8 -> funcs + 0;
        // callbacks @16: pre_patch @16 (manifest: pre_cb), post_patch @24 (by its
        // name), pre_unpatch @32 and post_unpatch @40 NULL, post_unpatch_enabled @48
        // = 0; nr_funcs @56 = 2.
        // klp_object_ext[1] (mymod) @64: name @64 -> strings + 11; funcs @72 ->
        // funcs + 2 * 24 = 48; pre_unpatch @64 + 16 + 16 = 96 (by its name);
        // nr_funcs @64 + 56 = 120 = 1.
        check_fields(&p, "klp_objects", &objects.data, &[(56, 4, 2), (120, 4, 1)]);
        let want: Vec<(u64, u32, i64, String)> = vec![
            (8, abs, 0, "[.init.klp_funcs]".into()),
            (16, abs, 0, "pre_cb".into()),
            (24, abs, 0, "__klp_post_patch_callback_vmlinux".into()),
            (64, abs, 11, "[.init.klp_strings]".into()),
            (72, abs, 48, "[.init.klp_funcs]".into()),
            (96, abs, 0, "__klp_pre_unpatch_callback_mymod".into()),
        ];
        let mut got = p.labelled_relas(".rela.init.klp_objects");
        got.sort();
        assert_eq!(got, want, "{:?}", a.arch);

        // klp_func_ext[0] @0: old_name -> strings + 0 ("show"), new_func @8 ->
        // new_show, sympos @16 = 0. [1] @24: -> strings + 5 ("other"), @32 ->
        // new_other (a static function: its own local symbol), @40 = 2. [2] @48: ->
        // strings + 17 ("mod_old"), @56 -> new_mod, @64 = 0.
        check_fields(&p, "klp_funcs", &funcs.data, &[(40, 8, 2)]);
        let want: Vec<(u64, u32, i64, String)> = vec![
            (0, abs, 0, "[.init.klp_strings]".into()),
            (8, abs, 0, "new_show".into()),
            (24, abs, 5, "[.init.klp_strings]".into()),
            (32, abs, 0, "new_other".into()),
            (48, abs, 17, "[.init.klp_strings]".into()),
            (56, abs, 0, "new_mod".into()),
        ];
        let mut got = p.labelled_relas(".rela.init.klp_funcs");
        got.sort();
        assert_eq!(got, want, "{:?}", a.arch);

        // The section symbols: local STT_SECTION (3), value 0, right after the
        // input's locals (check_invariants: locals first, sh_info right).
        for name in ["[.init.klp_strings]", "[.init.klp_funcs]"] {
            let i = (0..p.symbols.len() as u32)
                .find(|&i| p.label(i) == name)
                .unwrap();
            let s = &p.symbols[i as usize];
            assert_eq!((s.bind, s.st_type, s.value), (0, 3, 0), "{name}");
            assert_eq!(i + 1, p.symtab_info - u32::from(name.contains("strings")));
        }
        // The COMDAT group's signature (a global, renumbered) is still grouped_fn;
        // .llvm_addrsig lists the same symbols; the report's .klp.rela entries
        // name the output's indices.
        let group = p.sections.iter().find(|s| s.sh_type == 17).unwrap();
        assert_eq!(p.label(group.sh_info), "grouped_fn");
        assert_eq!(
            common::addrsig(&p),
            ["new_show", "grouped_fn", "new_fn", "new_other"]
        );
        for k in &out.report.sections {
            for r in &k.relocations {
                assert_eq!(p.symbols[r.symbol_index as usize].name, r.symbol);
            }
        }
        assert!(
            !common::modinfo(&p)
                .iter()
                .any(|e| e.starts_with("klp_replace"))
        );

        let d = out.report.description.as_ref().unwrap();
        assert_eq!(d.objects.len(), 2);
        assert!(d.objects.iter().all(|o| o.checked));
        assert_eq!(
            d.objects[0].callbacks,
            [
                Some("pre_cb".to_string()),
                Some("__klp_post_patch_callback_vmlinux".to_string()),
                None,
                None
            ]
        );
    }
}

#[test]
fn an_object_that_is_not_a_target_is_written_with_a_note() {
    let a = X86_64;
    let (patch, _) = patch_for(&a);
    let vmlinux = vmlinux_for(&a);
    // mymod is not given: mod_fn stays unresolved unless kept, and mod_old is not
    // checked.
    let m =
        Manifest::from_json(&MANIFEST.replace(r#"{"patch""#, r#"{"keep": ["mod_fn"], "patch""#))
            .unwrap();
    let out = convert(
        "patch.o",
        &patch,
        &[input("vmlinux", &vmlinux)],
        &m,
        &Options::default(),
    )
    .unwrap();
    assert_eq!(out.report.warnings.len(), 1, "{:?}", out.report.warnings);
    assert!(
        out.report.warnings[0].contains("object mymod of the patch description is not a target"),
        "{:?}",
        out.report.warnings
    );
    let d = out.report.description.unwrap();
    assert!(d.objects[0].checked && !d.objects[1].checked);
}

#[test]
fn replace_is_recorded_in_modinfo() {
    let a = X86_64;
    let (patch, _) = patch_for(&a);
    let vmlinux = vmlinux_for(&a);
    let mymod = mymod_for(&a);
    let t = [input("vmlinux", &vmlinux), input("mymod", &mymod)];
    let json = MANIFEST.replace("]}}", r#"], "replace": true}}"#);
    let out = run(&patch, &t, &json).unwrap();
    assert_eq!(
        common::modinfo(&parse(&out.data)),
        ["livepatch=Y", "klp_replace=Y"]
    );
    assert!(out.report.description.unwrap().replace);

    for (modinfo, json, ok) in [
        (&b"klp_replace=Y\0"[..], json.as_str(), true),
        (&b"klp_replace=N\0"[..], json.as_str(), false),
        (&b"klp_replace=Y\0"[..], MANIFEST, false),
        (&b"klp_replace=N\0"[..], MANIFEST, true),
    ] {
        let (patch, _) = build_patch(
            &a,
            &["static_fn", "mod_fn"],
            &PatchExtras {
                defined: DEFINED,
                modinfo: Some(modinfo),
                ..Default::default()
            },
        );
        match run(&patch, &t, json) {
            Ok(out) => {
                assert!(ok);
                let entries = common::modinfo(&parse(&out.data));
                let want = String::from_utf8_lossy(&modinfo[..modinfo.len() - 1]).into_owned();
                assert_eq!(entries, [want, "livepatch=Y".to_string()]);
            }
            Err(e) => {
                assert!(!ok, "{e}");
                assert!(matches!(e, Error::ModinfoReplace { .. }), "{e}");
                assert!(e.to_string().contains("make them agree"), "{e}");
            }
        }
    }
}

fn refuse(json: &str) -> Error {
    let a = X86_64;
    let (patch, _) = build_patch(
        &a,
        &["static_fn", "mod_fn"],
        &PatchExtras {
            defined: DEFINED,
            ..Default::default()
        },
    );
    let vmlinux = vmlinux_for(&a);
    let mymod = mymod_for(&a);
    run(
        &patch,
        &[input("vmlinux", &vmlinux), input("mymod", &mymod)],
        json,
    )
    .map(|_| ())
    .unwrap_err()
}

/// A description of vmlinux with `funcs`, and mymod with only its callback (the
/// patch's `__klp_pre_unpatch_callback_mymod`).
fn vmlinux_funcs(funcs: &str) -> String {
    format!(
        r#"{{"patch": {{"objects": [{{"object": "vmlinux", "funcs": [{funcs}]}},
                                   {{"object": "mymod"}}]}}}}"#
    )
}

#[test]
fn new_must_be_a_function_the_patch_defines() {
    for (new, reason) in [
        ("static_fn", "the patch only refers to it"),
        ("nope", "the patch has no symbol of that name"),
        ("a_variable", "it is a variable (STT_OBJECT)"),
    ] {
        let e = refuse(&vmlinux_funcs(&format!(
            r#"{{"old": "show", "new": "{new}"}}"#
        )));
        let text = e.to_string();
        assert!(
            matches!(&e, Error::PatchFunction { function, .. } if function == new),
            "{text}"
        );
        assert!(text.contains(reason), "{text}");
        assert!(
            text.contains("the replacement of 'show' in vmlinux"),
            "{text}"
        );
    }
    let e = refuse(
        r#"{"patch": {"objects": [{"object": "vmlinux",
            "funcs": [{"old": "show", "new": "new_show"}],
            "callbacks": {"post_unpatch": "static_fn"}}, {"object": "mymod"}]}}"#,
    );
    assert!(
        e.to_string()
            .contains("the post_unpatch callback of object vmlinux"),
        "{e}"
    );
}

#[test]
fn old_must_be_in_its_target_with_the_sympos_rules() {
    // Unknown: the other targets' definitions are listed.
    let e = refuse(&vmlinux_funcs(r#"{"old": "mod_old", "new": "new_show"}"#));
    let text = e.to_string();
    assert!(
        matches!(&e, Error::UnknownOldFunction { object, function, elsewhere, .. }
            if object == "vmlinux" && function == "mod_old" && elsewhere.len() == 1),
        "{text}"
    );
    assert!(text.contains("vmlinux does not define it"), "{text}");
    assert!(text.contains("object mymod, sympos 1"), "{text}");
    let e = refuse(&vmlinux_funcs(r#"{"old": "nope", "new": "new_show"}"#));
    assert!(
        matches!(&e, Error::UnknownOldFunction { elsewhere, .. } if elsewhere.is_empty()),
        "{e}"
    );

    // Ambiguous: sympos 0 means the unique one; both candidates with their files.
    let e = refuse(&vmlinux_funcs(r#"{"old": "other", "new": "new_show"}"#));
    let text = e.to_string();
    assert!(
        matches!(&e, Error::AmbiguousOldFunction { candidates, .. } if candidates.len() == 2),
        "{text}"
    );
    assert!(
        text.contains("sympos 1") && text.contains("source file a.c"),
        "{text}"
    );
    assert!(
        text.contains("sympos 2") && text.contains("source file b.c"),
        "{text}"
    );
    assert!(text.contains(r#""sympos": 1"#), "{text}");

    // Beyond the definitions.
    let e = refuse(&vmlinux_funcs(
        r#"{"old": "other", "new": "new_show", "sympos": 3}"#,
    ));
    assert!(
        matches!(&e, Error::BadOldSympos { sympos: 3, candidates, .. } if candidates.len() == 2),
        "{e}"
    );
    // sympos 1 of a unique name is what the kernel accepts too.
    assert!(
        run_ok(&vmlinux_funcs(
            r#"{"old": "show", "new": "new_show", "sympos": 1}"#
        ))
        .is_ok()
    );

    // A variable cannot be replaced.
    let e = refuse(&vmlinux_funcs(r#"{"old": "counter", "new": "new_show"}"#));
    assert!(matches!(&e, Error::OldNotAFunction { .. }), "{e}");
}

fn run_ok(json: &str) -> Result<klp_convert::Converted, Error> {
    let a = X86_64;
    let (patch, _) = build_patch(
        &a,
        &["static_fn", "mod_fn"],
        &PatchExtras {
            defined: DEFINED,
            ..Default::default()
        },
    );
    let vmlinux = vmlinux_for(&a);
    let mymod = mymod_for(&a);
    run(
        &patch,
        &[input("vmlinux", &vmlinux), input("mymod", &mymod)],
        json,
    )
}

#[test]
fn two_callbacks_of_one_kind_are_refused_naming_both() {
    // post_patch named in the manifest, and a function named as vmlinux's.
    let e = refuse(
        r#"{"patch": {"objects": [{"object": "vmlinux",
            "funcs": [{"old": "show", "new": "new_show"}],
            "callbacks": {"post_patch": "pre_cb"}}, {"object": "mymod"}]}}"#,
    );
    let text = e.to_string();
    assert!(
        matches!(&e, Error::DuplicateCallback { object, kind: "post_patch", .. } if object == "vmlinux"),
        "{text}"
    );
    assert!(
        text.contains("'__klp_post_patch_callback_vmlinux' (by its name)"),
        "{text}"
    );
    assert!(text.contains("'pre_cb' (named in the manifest)"), "{text}");

    // Naming the function its name makes the callback anyway is one callback.
    let out = run_ok(
        r#"{"patch": {"objects": [{"object": "vmlinux",
            "funcs": [{"old": "show", "new": "new_show"}],
            "callbacks": {"post_patch": "__klp_post_patch_callback_vmlinux"}},
            {"object": "mymod"}]}}"#,
    )
    .unwrap();
    let d = out.report.description.unwrap();
    assert_eq!(
        d.objects[0].callbacks[1].as_deref(),
        Some("__klp_post_patch_callback_vmlinux")
    );
    // mymod has only its callback, no functions: nr_funcs 0, and its funcs pointer
    // is where its run would start (after vmlinux's one function: 24).
    assert!(d.objects[1].funcs.is_empty());
    let p = parse(&out.data);
    let objects = p.labelled_relas(".rela.init.klp_objects");
    assert!(
        objects.contains(&(72, 1, 24, "[.init.klp_funcs]".to_string())),
        "{objects:?}"
    );
    check_fields(
        &p,
        "klp_objects",
        &p.section(".init.klp_objects").data,
        &[(56, 4, 1)],
    );
}

#[test]
fn a_callback_function_for_an_object_not_described_is_refused() {
    let e = refuse(&MANIFEST.replace(
        r#"{"object": "mymod", "funcs": [{"old": "mod_old", "new": "new_mod"}]}"#,
        r#"{"object": "mymod2", "funcs": [{"old": "mod_old", "new": "new_mod"}]}"#,
    ));
    assert!(
        matches!(&e, Error::CallbackObject { function, kind: "pre_unpatch", object }
            if function == "__klp_pre_unpatch_callback_mymod" && object == "mymod"),
        "{e}"
    );
    assert!(e.to_string().contains("does not list"), "{e}");
}

#[test]
fn a_second_description_is_refused_and_an_existing_one_kept() {
    let a = X86_64;
    let (patch, _) = patch_for(&a);
    let vmlinux = vmlinux_for(&a);
    let mymod = mymod_for(&a);
    let t = [input("vmlinux", &vmlinux), input("mymod", &mymod)];
    let once = run(&patch, &t, MANIFEST).unwrap();
    let e = run(&once.data, &t, MANIFEST).map(|_| ()).unwrap_err();
    assert!(
        matches!(&e, Error::DescriptionExists { section, .. } if section == ".init.klp_objects"),
        "{e}"
    );
    assert!(e.to_string().contains("leave \"patch\" out"), "{e}");

    // Without "patch", the description there is kept as it is.
    let again = run(&once.data, &t, "{}").unwrap();
    assert!(again.report.description.is_none());
    assert!(
        again.report.warnings.is_empty(),
        "{:?}",
        again.report.warnings
    );
    let (p1, p2) = (parse(&once.data), parse(&again.data));
    for name in [
        ".init.klp_objects",
        ".init.klp_funcs",
        ".init.klp_strings",
        ".rela.init.klp_objects",
        ".rela.init.klp_funcs",
    ] {
        assert_eq!(p1.section(name).data, p2.section(name).data, "{name}");
    }
    assert_eq!(p1.symbols.len(), p2.symbols.len());
}

#[test]
fn callback_functions_without_a_description_give_a_warning() {
    let a = X86_64;
    let (patch, _) = patch_for(&a);
    let vmlinux = vmlinux_for(&a);
    let mymod = mymod_for(&a);
    let out = run(
        &patch,
        &[input("vmlinux", &vmlinux), input("mymod", &mymod)],
        "{}",
    )
    .unwrap();
    assert!(out.report.description.is_none());
    assert!(!parse(&out.data).has_section(".init.klp_objects"));
    assert_eq!(out.report.warnings.len(), 1);
    assert!(
        out.report.warnings[0].contains("no patch description is written"),
        "{:?}",
        out.report.warnings
    );
}

#[test]
fn the_manifest_patch_is_checked() {
    for (json, part) in [
        (r#"{"patch": {"objects": []}}"#, "has no objects"),
        (
            r#"{"patch": {"objects": [{"object": "a.b", "funcs": []}]}}"#,
            "'.'",
        ),
        (
            r#"{"patch": {"objects": [{"object": "m", "funcs": [{"old": "f", "new": "g"}]},
                                      {"object": "m", "funcs": [{"old": "h", "new": "g"}]}]}}"#,
            "lists object m twice",
        ),
        (
            r#"{"patch": {"objects": [{"object": "m", "funcs": [
                {"old": "f", "new": "g"}, {"old": "f", "new": "h", "sympos": 1}]}]}}"#,
            "replaces 'f' twice (sympos 0 and 1",
        ),
        (
            r#"{"patch": {"objects": [{"object": "m", "funcs": [{"old": "f", "new": "a,b"}]}]}}"#,
            "','",
        ),
        (
            r#"{"patch": {"objects": [{"object": "m", "calbacks": {}}]}}"#,
            "unknown field `calbacks`",
        ),
        (
            r#"{"patch": {"objects": [{"object": "m", "funcs": [{"old": "f"}]}]}}"#,
            "missing field `new`",
        ),
    ] {
        let e = Manifest::from_json(json).unwrap_err();
        assert!(matches!(e, Error::Manifest { .. }), "{json}: {e}");
        assert!(e.to_string().contains(part), "{json}: {e}");
    }
    let e = refuse(
        r#"{"patch": {"objects": [{"object": "vmlinux",
            "funcs": [{"old": "show", "new": "new_show"}]}, {"object": "othermod"}]}}"#,
    );
    assert!(
        matches!(&e, Error::CallbackObject { object, .. } if object == "mymod"),
        "{e}"
    );
    let e = refuse(
        r#"{"patch": {"objects": [{"object": "vmlinux",
            "funcs": [{"old": "show", "new": "new_show"}]},
            {"object": "mymod"}, {"object": "othermod"}]}}"#,
    );
    assert!(
        matches!(&e, Error::EmptyObject { object } if object == "othermod"),
        "{e}"
    );
}
