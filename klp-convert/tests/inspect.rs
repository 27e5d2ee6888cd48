//! `klp-inspect` on converted objects of every architecture (built in memory, so on
//! every host; the binary runs through `KLP_TEST_RUNNER` under QEMU): its JSON is
//! parsed back and checked against the values the test put in the object and its
//! target, its text is checked line by line, and damaged objects give warnings with
//! the kernel's messages, never a panic.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use common::cases::{self, Case, MAP, MOD_FN, MOD_OLD, SHOW, STATIC_FN_2, STATIC_VAR};
use klp_convert::inspect::{Resolution, inspect, render_text};
use klp_convert::{Arch, TargetInput};
use serde_json::Value;

/// The `klp-inspect` binary, through the emulator when the tests run under QEMU
/// (`ci/test` sets `KLP_TEST_RUNNER`, e.g. `qemu-s390x -L /usr/s390x-linux-gnu`).
fn klp_inspect(dir: &Path, args: &[&str]) -> Output {
    let bin = env!("CARGO_BIN_EXE_klp-inspect");
    let runner = std::env::var("KLP_TEST_RUNNER").unwrap_or_default();
    let mut words = runner.split_whitespace();
    let mut c = match words.next() {
        Some(emu) => {
            let mut c = Command::new(emu);
            c.args(words).arg(bin);
            c
        }
        None => Command::new(bin),
    };
    c.args(args)
        .current_dir(dir)
        .output()
        .expect("klp-inspect runs")
}

fn workdir(test: &str, arch: Arch) -> PathBuf {
    let d = Path::new(env!("CARGO_TARGET_TMPDIR"))
        .join("klp-inspect")
        .join(test)
        .join(arch.name());
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// Runs the binary, which must succeed and say nothing on stderr; returns stdout.
fn ok(dir: &Path, args: &[&str]) -> String {
    let out = klp_inspect(dir, args);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "klp-inspect {args:?}: {err}");
    assert!(err.is_empty(), "klp-inspect {args:?}: {err}");
    String::from_utf8(out.stdout).unwrap()
}

/// The psABI names of the relocation types the cases use (x86_64 psABI §4.4,
/// AAELF64 §5.7, ELFv2 ABI §3.5.3, s390x ELF ABI supplement).
fn type_name(arch: Arch, r_type: u32) -> &'static str {
    match (arch, r_type) {
        (Arch::X86_64, 1) => "R_X86_64_64",
        (Arch::X86_64, 2) => "R_X86_64_PC32",
        (Arch::X86_64, 4) => "R_X86_64_PLT32",
        (Arch::AARCH64, 257) => "R_AARCH64_ABS64",
        (Arch::AARCH64, 275) => "R_AARCH64_ADR_PREL_PG_HI21",
        (Arch::AARCH64, 283) => "R_AARCH64_CALL26",
        (Arch::AARCH64, 285) => "R_AARCH64_LDST32_ABS_LO12_NC",
        (Arch::PPC64LE, 10) => "R_PPC64_REL24",
        (Arch::PPC64LE, 38) => "R_PPC64_ADDR64",
        (Arch::PPC64LE, 48) => "R_PPC64_TOC16_LO",
        (Arch::PPC64LE, 50) => "R_PPC64_TOC16_HA",
        (Arch::S390X, 19) => "R_390_PC32DBL",
        (Arch::S390X, 20) => "R_390_PLT32DBL",
        (Arch::S390X, 22) => "R_390_64",
        _ => panic!("no name for {arch:?} {r_type}"),
    }
}

fn hex(v: u64) -> String {
    format!("{v:#x}")
}

/// Where each symbol of the cases resolves in [`MAP`], and its sympos.
fn expected_symbol(name: &str) -> (&'static str, u64, u64) {
    match name {
        "static_fn" => ("vmlinux", 2, STATIC_FN_2),
        "static_var" => ("vmlinux", 0, STATIC_VAR),
        "mod_fn" => ("mymod", 0, MOD_FN),
        _ => unreachable!(),
    }
}

/// The entries the case's object has: (section, offset, type, addend, symbol).
fn expected_entries(c: &Case) -> Vec<(String, u64, u32, i64, &'static str)> {
    let mut v: Vec<_> = c
        .relocs
        .iter()
        .map(|&(offset, t, a, s)| {
            let obj = expected_symbol(s).0;
            (format!(".klp.rela.{obj}.text"), offset, t, a, s)
        })
        .collect();
    v.push((
        ".klp.rela.vmlinux.data".to_string(),
        0,
        c.spec.abs64,
        8,
        "static_var",
    ));
    v
}

fn check_json(c: &Case, j: &Value, with_target: bool) {
    let arch = c.spec.arch;
    assert_eq!(j["machine"], arch.name());
    assert_eq!(
        j["byte_order"],
        if arch == Arch::S390X {
            "big-endian"
        } else {
            "little-endian"
        }
    );
    assert_eq!(j["livepatch"], true);
    assert_eq!(j["replace"], true);
    assert_eq!(
        j["modinfo"],
        serde_json::json!(["license=GPL", "livepatch=Y", "klp_replace=Y"])
    );
    assert_eq!(j["warnings"], serde_json::json!([]), "{arch:?}");
    let resolved = |addr: u64| {
        if with_target {
            serde_json::json!({"status": "resolved", "address": hex(addr)})
        } else {
            serde_json::json!({"status": "not_checked"})
        }
    };

    // The description: the manifest's, with the old functions where MAP has them.
    let objects = j["objects"].as_array().unwrap();
    assert_eq!(objects.len(), 2);
    let func = |f: &Value| {
        (
            f["old_name"]["name"].as_str().unwrap().to_string(),
            f["sympos"].as_u64().unwrap(),
            f["new_func"]["symbol"]["name"]
                .as_str()
                .unwrap()
                .to_string(),
            f["new_func"]["addend"].as_i64().unwrap(),
            f["old"].clone(),
        )
    };
    let s = |x: &str| x.to_string();
    let vm = &objects[0];
    assert_eq!(
        (&vm["name"], &vm["module"], &vm["nr_funcs"]),
        (
            &Value::from("vmlinux"),
            &Value::from(false),
            &Value::from(2)
        )
    );
    let funcs: Vec<_> = vm["funcs"].as_array().unwrap().iter().map(func).collect();
    assert_eq!(
        funcs,
        [
            (s("show"), 0, s("new_fn"), 0, resolved(SHOW)),
            (s("static_fn"), 2, s("new_fn2"), 0, resolved(STATIC_FN_2)),
        ],
        "{arch:?}"
    );
    let cb = |o: &Value, kind: &str| o["callbacks"][kind]["symbol"]["name"].as_str().map(s);
    assert_eq!(cb(vm, "pre_patch"), Some(s("pre_cb")));
    assert_eq!(
        cb(vm, "post_patch"),
        Some(s("__klp_post_patch_callback_vmlinux"))
    );
    assert!(vm["callbacks"]["pre_unpatch"].is_null());
    assert!(vm["callbacks"]["post_unpatch"].is_null());
    let md = &objects[1];
    assert_eq!(
        (&md["name"], &md["module"]),
        (&Value::from("mymod"), &Value::from(true))
    );
    let funcs: Vec<_> = md["funcs"].as_array().unwrap().iter().map(func).collect();
    assert_eq!(
        funcs,
        [(s("mod_old"), 0, s("new_mod"), 0, resolved(MOD_OLD))]
    );
    assert_eq!(cb(md, "post_unpatch"), Some(s("post_cb")));
    assert!(md["callbacks"]["pre_patch"].is_null());

    // Every .klp.rela entry the object was given, in its section, parsed and
    // resolved.
    let sections = j["sections"].as_array().unwrap();
    let mut names: Vec<&str> = sections
        .iter()
        .map(|s| s["name"].as_str().unwrap())
        .collect();
    names.sort();
    assert_eq!(
        names,
        [
            ".klp.rela.mymod.text",
            ".klp.rela.vmlinux.data",
            ".klp.rela.vmlinux.text"
        ]
    );
    let want = expected_entries(c);
    let mut total = 0;
    for sec in sections {
        let name = sec["name"].as_str().unwrap();
        let (obj, target) = name["".len() + 10..].split_once('.').unwrap();
        assert_eq!(sec["object"], obj);
        assert_eq!(sec["target"]["name"], format!(".{target}"));
        let entries = sec["relocations"].as_array().unwrap();
        assert_eq!(sec["entries"].as_u64().unwrap() as usize, entries.len());
        total += entries.len();
        for e in entries {
            let offset = e["offset"].as_u64().unwrap();
            let w = want
                .iter()
                .find(|w| w.0 == name && w.1 == offset)
                .unwrap_or_else(|| panic!("{arch:?}: unexpected entry {e}"));
            let (sobj, sympos, addr) = expected_symbol(w.4);
            assert_eq!(e["type"], w.2, "{arch:?}: {e}");
            assert_eq!(e["type_name"], type_name(arch, w.2), "{arch:?}");
            assert_eq!(e["addend"], w.3, "{arch:?}: {e}");
            assert_eq!(e["livepatch_symbol"], true);
            assert_eq!(e["symbol"], format!(".klp.sym.{sobj}.{},{sympos}", w.4));
            assert_eq!(
                e["klp_sym"],
                serde_json::json!({"object": sobj, "name": {"name": w.4, "demangled": null},
                                   "sympos": sympos})
            );
            assert_eq!(e["resolution"], resolved(addr), "{arch:?}: {e}");
        }
    }
    assert_eq!(total, want.len(), "{arch:?}");
}

/// The cells of the text line that starts with `first` (split on runs of spaces).
fn row<'a>(text: &'a str, first: &str) -> Vec<&'a str> {
    text.lines()
        .map(|l| l.split_whitespace().collect::<Vec<_>>())
        .find(|f| f.first() == Some(&first))
        .unwrap_or_else(|| panic!("no line starting with {first} in:\n{text}"))
}

fn rows_with<'a>(text: &'a str, cell: &str) -> Vec<Vec<&'a str>> {
    text.lines()
        .map(|l| l.split_whitespace().collect::<Vec<_>>())
        .filter(|f| f.contains(&cell))
        .collect()
}

fn check_text(c: &Case, text: &str, with_target: bool) {
    let arch = c.spec.arch;
    let endian = if arch == Arch::S390X {
        "big-endian"
    } else {
        "little-endian"
    };
    assert_eq!(
        row(text, "machine"),
        ["machine", &format!("{},", arch.name()), endian]
    );
    assert_eq!(
        row(text, "livepatch"),
        ["livepatch", "yes", "(livepatch=Y)"]
    );
    assert_eq!(row(text, "replace"), ["replace", "yes", "(klp_replace=Y)"]);
    assert_eq!(row(text, "modinfo"), ["modinfo", "license=GPL"]);
    let at = |a: u64| {
        if with_target {
            hex(a)
        } else {
            "not".to_string()
        }
    };
    let old = |a: u64| {
        if with_target {
            format!("(old: {})", hex(a))
        } else {
            "(old: not checked)".to_string()
        }
    };
    assert_eq!(
        row(text, "show").join(" "),
        format!("show -> new_fn {}", old(SHOW))
    );
    assert_eq!(
        row(text, "static_fn,2").join(" "),
        format!("static_fn,2 -> new_fn2 {}", old(STATIC_FN_2))
    );
    assert_eq!(
        row(text, "mod_old").join(" "),
        format!("mod_old -> new_mod {}", old(MOD_OLD))
    );
    assert_eq!(row(text, "pre_patch:"), ["pre_patch:", "pre_cb"]);
    assert_eq!(
        row(text, "post_patch:"),
        ["post_patch:", "__klp_post_patch_callback_vmlinux"]
    );
    assert_eq!(row(text, "post_unpatch:"), ["post_unpatch:", "post_cb"]);
    assert_eq!(row(text, "mymod"), ["mymod", "(module)"]);
    assert_eq!(
        row(text, ".klp.rela.vmlinux.text:")[1..3],
        [&(c.relocs.len() - 1).to_string()[..], "entries"]
    );
    assert_eq!(row(text, ".klp.rela.mymod.text:")[1..3], ["1", "entry"]);
    assert_eq!(row(text, "Warnings:"), ["Warnings:", "none"]);
    // Each entry's row: offset, type, addend, object, symbol, sympos, resolution.
    for (_, offset, t, addend, sym) in expected_entries(c) {
        let (obj, sympos, addr) = expected_symbol(sym);
        let a = if addend < 0 {
            format!("-{:#x}", addend.unsigned_abs())
        } else {
            hex(addend as u64)
        };
        let want = [
            hex(offset),
            type_name(arch, t).to_string(),
            a,
            obj.to_string(),
            sym.to_string(),
            sympos.to_string(),
            at(addr),
        ];
        assert!(
            rows_with(text, sym)
                .iter()
                .any(|r| r.len() >= 7 && r[..7] == want),
            "{arch:?}: no row {want:?} in:\n{text}"
        );
    }
}

#[test]
fn inspect_shows_converted_objects_of_every_arch() {
    for c in cases::cases() {
        let arch = c.spec.arch;
        let dir = workdir("every-arch", arch);
        std::fs::write(dir.join("livepatch.o"), cases::converted(&c).data).unwrap();
        std::fs::write(dir.join("System.map"), MAP).unwrap();

        let json = ok(&dir, &["--json", "-t", "System.map", "livepatch.o"]);
        let j: Value = serde_json::from_str(&json).unwrap();
        assert_eq!(j["file"], "livepatch.o");
        assert_eq!(
            j["targets"],
            serde_json::json!([
                {"object": "vmlinux", "file": "System.map", "table": "symbol map"},
                {"object": "mymod", "file": "System.map", "table": "symbol map"}
            ])
        );
        check_json(&c, &j, true);
        check_text(
            &c,
            &ok(&dir, &["-t", "vmlinux=System.map", "livepatch.o"]),
            true,
        );

        // Without targets nothing is checked.
        let j: Value = serde_json::from_str(&ok(&dir, &["livepatch.o", "--json"])).unwrap();
        assert_eq!(j["targets"], serde_json::json!([]));
        check_json(&c, &j, false);
        check_text(&c, &ok(&dir, &["livepatch.o"]), false);
    }
}

/// `data` with the NUL-terminated string `from` replaced by `to` (same length).
fn rename(data: &[u8], from: &str, to: &str) -> Vec<u8> {
    assert_eq!(from.len(), to.len());
    let needle = [from.as_bytes(), b"\0"].concat();
    let at = data
        .windows(needle.len())
        .position(|w| w == needle)
        .unwrap_or_else(|| panic!("no {from}"));
    let mut d = data.to_vec();
    d[at..at + from.len()].copy_from_slice(to.as_bytes());
    d
}

/// `data` with symbol `name`'s `st_shndx` set to 0 (an ordinary undefined symbol).
fn unmark(data: &[u8], name: &str) -> Vec<u8> {
    use object::read::elf::{FileHeader, SectionHeader, Sym};
    let h = object::elf::FileHeader64::<object::Endianness>::parse(data).unwrap();
    let e = h.endian().unwrap();
    let sections = h.sections(e, data).unwrap();
    let symtab = sections.symbols(e, data, object::elf::SHT_SYMTAB).unwrap();
    let index = symtab
        .symbols()
        .iter()
        .position(|s| symtab.symbol_name(e, s).unwrap() == name.as_bytes())
        .unwrap();
    assert_eq!(
        symtab
            .symbol(object::SymbolIndex(index))
            .unwrap()
            .st_shndx(e)
            .0,
        0xff20
    );
    let off = sections.section(symtab.section()).unwrap().sh_offset(e) as usize;
    // Elf64_Sym: st_name @0 (4), st_info @4, st_other @5, st_shndx @6 (2).
    let mut d = data.to_vec();
    d[off + 24 * index + 6..off + 24 * index + 8].fill(0);
    d
}

fn targets(map: &str) -> Vec<TargetInput<'_>> {
    vec![TargetInput {
        name: "vmlinux".into(),
        file: "System.map".into(),
        data: map.as_bytes(),
    }]
}

#[test]
fn problems_are_warnings_with_the_kernels_messages() {
    for c in cases::cases() {
        let arch = c.spec.arch;
        let good = cases::converted(&c).data;
        let symtab = klp::elf::PatchObject::parse(&good).unwrap().symtab_index();
        let warnings = |data: &[u8], map: &str| {
            let i = inspect("lp.o", data, &targets(map)).unwrap();
            // The text shows every warning too.
            let text = render_text(&i);
            for w in &i.warnings {
                assert!(text.contains(w), "{arch:?}: {w} not in:\n{text}");
            }
            (i.warnings.clone(), i)
        };

        let bad = rename(
            &good,
            ".klp.sym.vmlinux.static_var,0",
            ".klp.sym.vmlinux.static_var;0",
        );
        let (w, i) = warnings(&bad, MAP);
        assert_eq!(
            w,
            ["symbol .klp.sym.vmlinux.static_var;0 has an incorrectly formatted name"],
            "{arch:?}"
        );
        let e = i
            .sections
            .iter()
            .flat_map(|s| &s.relocations)
            .find(|e| e.symbol.as_deref() == Some(".klp.sym.vmlinux.static_var;0"));
        assert_eq!(e.unwrap().resolution, Resolution::Unusable);

        let bad = rename(&good, ".klp.rela.vmlinux.data", ".klp.rela..mlinux.data");
        let (w, _) = warnings(&bad, MAP);
        assert_eq!(
            w,
            ["section .klp.rela..mlinux.data has an incorrectly formatted name"],
            "{arch:?}"
        );

        let bad = rename(&good, ".klp.rela.vmlinux.text", ".klp.rela.vmlinuy.text");
        let (w, _) = warnings(&bad, MAP);
        assert_eq!(
            w,
            [
                "invalid access to vmlinux symbol 'static_fn' from module-specific livepatch \
                 relocation section (.klp.rela.vmlinuy.text)",
                "invalid access to vmlinux symbol 'static_var' from module-specific livepatch \
                 relocation section (.klp.rela.vmlinuy.text)",
            ],
            "{arch:?}"
        );

        let bad = unmark(&good, ".klp.sym.mymod.mod_fn,0");
        let (w, _) = warnings(&bad, MAP);
        assert_eq!(
            w,
            [format!(
                "symbol .klp.sym.mymod.mod_fn,0 at rela sec {symtab} idx 0 is not marked as a \
                 livepatch symbol (.klp.rela.mymod.text)"
            )],
            "{arch:?}"
        );

        // Targets that do not match: the kernel's sympos rules and messages.
        let no_var = MAP.replace("0000000010801238 d static_var\n", "");
        let one_fn = MAP.replace("0000000010400000 t static_fn\n", "");
        let two_vars = format!("{MAP}0000000010900000 d static_var\n");
        let (w, i) = warnings(&good, &no_var);
        assert_eq!(
            w,
            ["symbol 'static_var' not found in symbol table: .klp.sym.vmlinux.static_var,0"],
            "{arch:?}"
        );
        assert!(
            i.sections
                .iter()
                .flat_map(|s| &s.relocations)
                .any(|e| e.resolution == Resolution::NotFound)
        );
        let (w, i) = warnings(&good, &one_fn);
        assert_eq!(
            w,
            [
                "symbol position 2 for symbol 'static_fn' in object 'vmlinux' not found (1 \
                 candidate): static_fn,2 replaced in vmlinux by the patch description",
                "symbol position 2 for symbol 'static_fn' in object 'vmlinux' not found (1 \
                 candidate): .klp.sym.vmlinux.static_fn,2",
            ],
            "{arch:?}"
        );
        assert!(
            i.sections
                .iter()
                .flat_map(|s| &s.relocations)
                .any(|e| e.resolution
                    == Resolution::Beyond {
                        position: 2,
                        count: 1
                    })
        );
        let (w, i) = warnings(&good, &two_vars);
        assert_eq!(
            w,
            [
                "unresolvable ambiguity for symbol 'static_var' in object '(null)' (2 \
                 candidates): .klp.sym.vmlinux.static_var,0"
            ],
            "{arch:?}"
        );
        let text = render_text(&i);
        assert!(text.contains("ambiguous (2 candidates)"), "{text}");
        assert!(text.contains("position 2 beyond 1") || !text.contains("beyond"));
    }
}

#[test]
fn damaged_objects_never_panic_and_unreadable_ones_exit_1() {
    let c = &cases::cases()[3]; // s390x: big-endian
    let good = cases::converted(c).data;
    // Every truncation and a walk of byte damage: Ok with warnings or Err, never a
    // panic.
    for n in (0..good.len()).step_by(7) {
        let _ = inspect("lp.o", &good[..n], &targets(MAP)).map(|i| render_text(&i));
    }
    let mut seed = 0x2545_f491_4f6c_dd1du64;
    for _ in 0..3000 {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        let mut d = good.clone();
        let at = (seed % d.len() as u64) as usize;
        d[at] ^= (seed >> 32) as u8 | 1;
        if let Ok(i) = inspect("lp.o", &d, &targets(MAP)) {
            let _ = render_text(&i);
            let _ = klp_convert::inspect::render_json(&i);
        }
    }

    let dir = workdir("unreadable", c.spec.arch);
    std::fs::write(dir.join("short.o"), &good[..100]).unwrap();
    std::fs::write(dir.join("text.o"), "this is not an ELF object, only text\n").unwrap();
    std::fs::write(dir.join("lp.o"), &good).unwrap();
    for (args, want) in [
        (
            &["short.o"][..],
            "klp-inspect: short.o cannot be read as a livepatch object: the file ends inside the section headers",
        ),
        (
            &["--json", "text.o"][..],
            "klp-inspect: text.o cannot be read as a livepatch object: not an ELF file",
        ),
        (
            &["-t", "System.map", "lp.o"][..],
            "klp-inspect: cannot read System.map: ",
        ),
        (&["-t", "nameless", "lp.o"][..], "klp-inspect: "),
    ] {
        let out = klp_inspect(&dir, args);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{args:?}: {err}");
        assert!(out.stdout.is_empty(), "{args:?}");
        assert_eq!(err.lines().count(), 1, "{args:?}: {err}");
        assert!(err.starts_with(want), "{args:?}: {err}");
    }
}

#[test]
fn mangled_names_are_demangled() {
    // Rust legacy and v0 mangling and C++ (Itanium) in the roles of static_fn,
    // static_var and mod_fn; a Rust-mangled replacement.
    let rust = "_ZN6kernel6helper17h0123456789abcdefE";
    let v0 = "_RNvNtCs1234_6kernel4data10static_var";
    let cpp = "_ZN2ns6mod_fnEi";
    let new_fn = "_ZN5patch6new_fn17hfedcba9876543210E";
    for c in cases::cases() {
        let arch = c.spec.arch;
        let mut funcs = cases::FUNCS;
        funcs[0] = new_fn;
        let patch = cases::build_named(&c, &[rust, v0, cpp], &funcs);
        let map = MAP
            .replace(" static_fn\n", &format!(" {rust}\n"))
            .replace(" static_var\n", &format!(" {v0}\n"))
            .replace(" mod_fn ", &format!(" {cpp} "));
        let manifest = cases::MANIFEST
            .replace(
                "\"static_fn\": {\"sympos\"",
                &format!("\"{rust}\": {{\"sympos\""),
            )
            .replace("\"old\": \"static_fn\"", &format!("\"old\": \"{rust}\""))
            .replace("\"new_fn\"", &format!("\"{new_fn}\""));
        let m = klp_convert::Manifest::from_json(&manifest).unwrap();
        let out = klp_convert::convert("patch.o", &patch, &targets(&map), &m, &Default::default())
            .unwrap_or_else(|e| panic!("{arch:?}: {e}"));

        let i = inspect("lp.o", &out.data, &targets(&map)).unwrap();
        assert!(i.warnings.is_empty(), "{arch:?}: {:?}", i.warnings);
        let j: Value = serde_json::from_str(&klp_convert::inspect::render_json(&i)).unwrap();
        let mut seen = Vec::new();
        for e in j["sections"]
            .as_array()
            .unwrap()
            .iter()
            .flat_map(|s| s["relocations"].as_array().unwrap())
        {
            let n = &e["klp_sym"]["name"];
            seen.push((
                n["name"].as_str().unwrap().to_string(),
                n["demangled"].as_str().unwrap().to_string(),
            ));
        }
        seen.sort();
        seen.dedup();
        let s = |x: &str| x.to_string();
        assert_eq!(
            seen,
            [
                (s(v0), s("kernel::data::static_var")),
                (s(cpp), s("ns::mod_fn(int)")),
                (s(rust), s("kernel::helper")),
            ],
            "{arch:?}"
        );
        let f = &j["objects"][0]["funcs"][0]["new_func"]["symbol"];
        assert_eq!(f["name"], new_fn);
        assert_eq!(f["demangled"], "patch::new_fn");
        let text = render_text(&i);
        assert_eq!(
            row(&text, "show")[..3],
            ["show", "->", "patch::new_fn"],
            "{text}"
        );
        assert!(
            rows_with(&text, "kernel::helper")
                .iter()
                .any(|r| r.contains(&"2")),
            "{text}"
        );
        // A data reference and the .data pointer (aarch64 and ppc64le: two instructions).
        assert!(
            rows_with(&text, "kernel::data::static_var").len() >= 2,
            "{text}"
        );
        assert_eq!(rows_with(&text, "ns::mod_fn(int)").len(), 1, "{text}");
        assert!(!text.contains(rust), "{text}");
    }
}
