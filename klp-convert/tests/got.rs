//! GOT-relative references of position-independent patches, relaxed into direct ones:
//! real `gcc -O2 -fPIE` output of x86_64, aarch64 and s390x, converted by the binary.
//!
//! What is checked, per architecture and for `-fPIE` and `-fPIE -fno-plt`:
//!
//! * gcc's object has GOT relocations against the converted symbols (`&static_func`
//!   everywhere, `counter` where the ABI reaches data through the GOT), and the
//!   livepatch object has none: each became the direct relocation in
//!   `.klp.rela.vmlinux.text`;
//! * **the assembler's word for it**: every rewritten instruction is compared,
//!   byte for byte and relocation for relocation (type, offset in the instruction,
//!   addend), with what the architecture's own assembler (`gcc -c` on a `.s`) makes of
//!   the direct instruction written from the original's disassembly — `mov
//!   0x0(%rip),%rax` → `lea static_func(%rip),%rax`, `call *0x0(%rip)` → `addr32 call
//!   static_func`, `jmp *0x0(%rip)` → `jmp static_func; nop`, `adrp x0, …` → `adrp
//!   x0, static_func`, `ldr x0, [x0]` → `add x0, x0, :lo12:static_func`, `lgrl
//!   %r2,…` → `larl %r2,static_func` — registers included;
//! * nothing else changed: every other byte of `.text` is gcc's, and relocations
//!   against symbols that are not converted (`exported_var`, which the program's
//!   dynamic linker resolves) stay in `.rela.text` as they were, GOT or not;
//! * x86_64, **the linker's word for it**: GNU ld relaxes the same object linked
//!   into a PIE (`ld -pie`), and its `.text` equals ours outside the relocated
//!   fields. (GNU ld 2.40 does not relax aarch64's and s390x's GOT loads in a PIE,
//!   so there the assembler's encodings are the reference.)
//!
//! The cross toolchains are x86_64 programs (see `tests/toolchain.rs`): this test
//! exists on x86_64 hosts only; a missing tool fails with "run ci/install".

#![cfg(target_arch = "x86_64")]

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use common::{Parsed, parse};

struct Arch {
    name: &'static str,
    gcc: &'static str,
    objdump: &'static str,
    ld: &'static str,
    /// The GOT-relative relocation types gcc uses (psABI numbers): x86_64
    /// R_X86_64_GOTPCREL 9, GOTPCRELX 41, REX_GOTPCRELX 42; aarch64
    /// R_AARCH64_ADR_GOT_PAGE 311, LD64_GOT_LO12_NC 312; s390x R_390_GOTENT 26.
    got: &'static [u32],
}

const ARCHES: [Arch; 3] = [
    Arch {
        name: "x86_64",
        gcc: "gcc",
        objdump: "objdump",
        ld: "ld",
        got: &[9, 41, 42],
    },
    Arch {
        name: "aarch64",
        gcc: "aarch64-linux-gnu-gcc",
        objdump: "aarch64-linux-gnu-objdump",
        ld: "aarch64-linux-gnu-ld",
        got: &[311, 312],
    },
    Arch {
        name: "s390x",
        gcc: "s390x-linux-gnu-gcc",
        objdump: "s390x-linux-gnu-objdump",
        ld: "s390x-linux-gnu-ld",
        got: &[26],
    },
];

/// The program: `counter` and `static_func` are static (converted: local), and
/// `exported_var` is a global its dynamic linker resolves (`-rdynamic`: it stays
/// an ordinary undefined symbol).
const TARGET: &str = r#"
#include <stdio.h>
__attribute__((used)) static int counter = 1;
__attribute__((noinline, used)) static int static_func(int x) { return x + counter; }
int exported_var = 3;
int main(void) { printf("%d\n", static_func(exported_var)); return 0; }
"#;

const PATCH: &str = r#"
extern int counter;
extern int exported_var;
extern int static_func(int);
int (*take(void))(int) { return &static_func; }
int bump(int x) { counter += x; return counter + exported_var; }
int call_it(int x) { return static_func(x) + 1; }
int tail_it(int x) { return static_func(x + 2); }
"#;

/// Definitions for the x86_64 linker comparison.
const DEFS: &str = "int counter; int exported_var; int static_func(int x) { return x; }\n";

fn workdir(test: &str, arch: &str) -> PathBuf {
    let d = Path::new(env!("CARGO_TARGET_TMPDIR"))
        .join("klp-convert")
        .join(test)
        .join(arch);
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn run_in(dir: &Path, program: &str, args: &[&str]) -> Output {
    match Command::new(program).args(args).current_dir(dir).output() {
        Ok(o) => o,
        Err(e) => panic!(
            "cannot run {program} ({e}): the cross toolchains and binutils are missing; \
             run ci/install"
        ),
    }
}

fn ok(dir: &Path, program: &str, args: &[&str]) -> String {
    let o = run_in(dir, program, args);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        o.status.success(),
        "{program} {args:?} failed ({}):\n{err}",
        o.status
    );
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// One instruction of `objdump -d`: its offset and text (mnemonic, then the
/// operands without spaces, without objdump's `<…>` and `# …` annotations).
fn disassemble(dir: &Path, objdump: &str, file: &str) -> BTreeMap<u64, (String, String)> {
    let text = ok(dir, objdump, &["-d", "-j", ".text", file]);
    let mut out = BTreeMap::new();
    for line in text.lines() {
        let f: Vec<&str> = line.split('\t').collect();
        if f.len() < 3 {
            continue;
        }
        let Some(off) = f[0]
            .trim()
            .strip_suffix(':')
            .and_then(|o| u64::from_str_radix(o, 16).ok())
        else {
            continue;
        };
        let insn = f[2..].join(" ");
        let insn = insn.split('#').next().unwrap();
        let insn = match insn.find('<') {
            Some(i) => &insn[..i],
            None => insn,
        };
        let mut words = insn.split_whitespace();
        let Some(mnemonic) = words.next() else {
            continue;
        };
        out.insert(off, (mnemonic.to_string(), words.collect::<String>()));
    }
    out
}

/// The instruction containing `offset`: (start, mnemonic, operands).
fn insn_at(d: &BTreeMap<u64, (String, String)>, offset: u64) -> (u64, String, String) {
    let (start, (m, o)) = d.range(..=offset).next_back().unwrap();
    (*start, m.clone(), o.clone())
}

/// The direct instruction(s) that replace a GOT access, as assembler source, from
/// the original's disassembly, and the mnemonic objdump shows for them.
fn direct_form(arch: &str, mnemonic: &str, operands: &str, sym: &str) -> (String, &'static str) {
    match (arch, mnemonic) {
        ("x86_64", "mov") => {
            let reg = operands
                .strip_prefix("0x0(%rip),")
                .unwrap_or_else(|| panic!("x86_64: mov {operands}"));
            (format!("lea {sym}(%rip),{reg}"), "lea")
        }
        // `addr32 call`: the 0x67 prefix keeps the 6-byte length (gas drops a
        // written `addr32` on a rel32 call, so it is spelled as a byte here).
        ("x86_64", "call") if operands == "*0x0(%rip)" => {
            (format!(".byte 0x67\n\tcall {sym}"), "addr32")
        }
        ("x86_64", "jmp") if operands == "*0x0(%rip)" => (format!("jmp {sym}\n\tnop"), "jmp"),
        ("aarch64", "adrp") => {
            let reg = operands.split(',').next().unwrap();
            (format!("adrp {reg}, {sym}"), "adrp")
        }
        ("aarch64", "ldr") => {
            // ldr xT,[xN]
            let (rt, rest) = operands.split_once(',').unwrap();
            let rn = rest.trim_start_matches('[').trim_end_matches(']');
            assert!(!rn.contains(','), "aarch64: ldr {operands}");
            (format!("add {rt}, {rn}, :lo12:{sym}"), "add")
        }
        ("s390x", "lgrl") => {
            let reg = operands.split(',').next().unwrap();
            (format!("larl {reg},{sym}"), "larl")
        }
        _ => panic!("{arch}: no direct form for a GOT access by `{mnemonic} {operands}`"),
    }
}

/// Relocations of a section as (offset, type, addend, symbol).
fn relas(p: &Parsed, name: &str) -> Vec<(u64, u32, i64, String)> {
    if p.has_section(name) {
        p.relas(name)
    } else {
        Vec::new()
    }
}

fn base_symbol(name: &str) -> &str {
    name.strip_prefix(".klp.sym.vmlinux.")
        .and_then(|s| s.rsplit_once(','))
        .map_or(name, |(s, _)| s)
}

#[test]
fn got_references_of_pie_patches_are_relaxed_as_a_linker_does() {
    for a in &ARCHES {
        for (variant, flags) in [
            ("pie", &["-fPIE"][..]),
            ("noplt", &["-fPIE", "-fno-plt"][..]),
        ] {
            let what = format!("{} {variant}", a.name);
            let dir = workdir("got", &format!("{}-{variant}", a.name));
            std::fs::write(dir.join("t.c"), TARGET).unwrap();
            std::fs::write(dir.join("patch.c"), PATCH).unwrap();
            ok(&dir, a.gcc, &["-O2", "-rdynamic", "t.c", "-o", "vmlinux"]);
            let mut args = vec!["-c", "-O2"];
            args.extend_from_slice(flags);
            args.extend_from_slice(&["patch.c", "-o", "patch.o"]);
            ok(&dir, a.gcc, &args);

            let out = Command::new(env!("CARGO_BIN_EXE_klp-convert"))
                .args([
                    "-v",
                    "-t",
                    "vmlinux=vmlinux",
                    "patch.o",
                    "-o",
                    "livepatch.o",
                ])
                .current_dir(&dir)
                .output()
                .unwrap();
            let log = String::from_utf8_lossy(&out.stderr);
            assert!(out.status.success(), "{what}: {log}");
            assert!(!log.contains("warning"), "{what}: {log}");

            let input = parse(&std::fs::read(dir.join("patch.o")).unwrap());
            let output = parse(&std::fs::read(dir.join("livepatch.o")).unwrap());
            common::check_invariants(&output);
            let before = disassemble(&dir, a.objdump, "patch.o");
            let after = disassemble(&dir, a.objdump, "livepatch.o");
            let in_relas = relas(&input, ".rela.text");
            let klp = relas(&output, ".klp.rela.vmlinux.text");
            let kept = relas(&output, ".rela.text");
            let converted = ["static_func", "counter"];

            // gcc reached &static_func through the GOT; the output has no GOT
            // relocation against a converted symbol.
            let got_sites: Vec<_> = in_relas
                .iter()
                .filter(|r| a.got.contains(&r.1) && converted.contains(&r.3.as_str()))
                .cloned()
                .collect();
            assert!(
                got_sites.iter().any(|r| r.3 == "static_func"),
                "{what}: no GOT reference to static_func in gcc's object: {in_relas:#?}"
            );
            if variant == "noplt" && a.name == "x86_64" {
                // call *static_func@GOTPCREL(%rip) and the tail call's jmp.
                assert!(got_sites.len() >= 3, "{what}: {got_sites:#?}");
            }
            assert!(
                klp.iter().all(|r| !a.got.contains(&r.1)),
                "{what}: {klp:#?}"
            );
            assert!(log.contains("relaxed"), "{what}: {log}");

            // Ordinary relocations stay as they were (exported_var's included).
            let kept_in: Vec<_> = in_relas
                .iter()
                .filter(|r| !converted.contains(&r.3.as_str()))
                .cloned()
                .collect();
            assert_eq!(kept, kept_in, "{what}");

            // Each GOT access against a converted symbol, against the assembler's
            // encoding of its direct form.
            let text_in = &input.section(".text").data;
            let text_out = &output.section(".text").data;
            let mut changed = BTreeSet::new();
            let mut expected_klp = Vec::new();
            let mut asm_sites = BTreeSet::new();
            for r in &in_relas {
                if !converted.contains(&r.3.as_str()) {
                    continue;
                }
                if !a.got.contains(&r.1) {
                    expected_klp.push(r.clone());
                    continue;
                }
                let (start, mnemonic, operands) = insn_at(&before, r.0);
                asm_sites.insert(start);
                let (source, shown) = direct_form(a.name, &mnemonic, &operands, &r.3);
                let n = asm_sites.len();
                // `direct_end` marks the end (the section may be padded).
                std::fs::write(
                    dir.join(format!("direct{n}.s")),
                    format!("\t.text\n\t{source}\ndirect_end:\n"),
                )
                .unwrap();
                let obj = format!("direct{n}.o");
                ok(&dir, a.gcc, &["-c", &format!("direct{n}.s"), "-o", &obj]);
                let d = parse(&std::fs::read(dir.join(&obj)).unwrap());
                let len = d.symbol("direct_end").value as usize;
                let bytes = &d.section(".text").data[..len];
                let s = start as usize;
                assert_eq!(
                    &text_out[s..s + bytes.len()],
                    bytes,
                    "{what}: the rewrite of `{mnemonic} {operands}` at {start:#x} is not the \
                     assembler's `{source}`"
                );
                let dr = d.relas(".rela.text");
                assert_eq!(dr.len(), 1, "{what}: {source}: {dr:#?}");
                expected_klp.push((start + dr[0].0, dr[0].1, dr[0].2, r.3.clone()));
                changed.extend(s..s + bytes.len());
                // objdump reads the rewritten instruction as the direct one.
                let (_, m_after, _) = insn_at(&after, start);
                assert_eq!(
                    m_after, shown,
                    "{what}: objdump reads {m_after} at {start:#x}, expected {source}"
                );
            }
            assert!(!asm_sites.is_empty(), "{what}");
            let mut got_klp: Vec<_> = klp
                .iter()
                .map(|(o, t, ad, s)| (*o, *t, *ad, base_symbol(s).to_string()))
                .collect();
            got_klp.sort();
            expected_klp.sort();
            assert_eq!(got_klp, expected_klp, "{what}");

            // Every other byte of .text is gcc's.
            assert_eq!(text_in.len(), text_out.len(), "{what}");
            for (i, (x, y)) in text_in.iter().zip(text_out).enumerate() {
                if !changed.contains(&i) {
                    assert_eq!(x, y, "{what}: .text+{i:#x} changed");
                }
            }

            // x86_64: GNU ld's relaxation of the same object in a PIE.
            if a.name == "x86_64" {
                std::fs::write(dir.join("defs.c"), DEFS).unwrap();
                ok(
                    &dir,
                    a.gcc,
                    &["-c", "-O2", "-fPIE", "defs.c", "-o", "defs.o"],
                );
                ok(
                    &dir,
                    a.ld,
                    &[
                        "-pie",
                        "--no-dynamic-linker",
                        "-e",
                        "take",
                        "patch.o",
                        "defs.o",
                        "-o",
                        "linked",
                    ],
                );
                let linked = parse(&std::fs::read(dir.join("linked")).unwrap());
                let text_ld = &linked.section(".text").data[..text_out.len()];
                let fields: BTreeSet<usize> = klp
                    .iter()
                    .chain(&kept)
                    .flat_map(|r| r.0 as usize..r.0 as usize + 4)
                    .collect();
                for (i, (x, y)) in text_ld.iter().zip(text_out).enumerate() {
                    if !fields.contains(&i) {
                        assert_eq!(x, y, "{what}: .text+{i:#x} differs from ld's relaxation");
                    }
                }
            }
        }
    }
}

/// A GOT access the rules do not cover is refused with the instruction and the fix;
/// a GOT relocation against a symbol that is not converted stays for the loader.
#[test]
fn unrelaxable_got_accesses_are_refused_with_the_instruction() {
    let a = &ARCHES[0];
    let dir = workdir("got-refused", a.name);
    std::fs::write(dir.join("t.c"), TARGET).unwrap();
    ok(&dir, a.gcc, &["-O2", "-rdynamic", "t.c", "-o", "vmlinux"]);
    // `add static_func@GOTPCREL(%rip), %rax` (48 03 05): a GOTPCRELX that is neither
    // mov, call nor jmp; and a plain R_X86_64_GOTPCREL, which no linker may rewrite.
    std::fs::write(
        dir.join("add.s"),
        "\t.text\n\t.globl f\nf:\n\taddq static_func@GOTPCREL(%rip), %rax\n\tret\n",
    )
    .unwrap();
    std::fs::write(
        dir.join("plain.s"),
        "\t.text\n\t.globl f\nf:\n\tmovq static_func@GOTPCREL(%rip), %rax\n\tret\n",
    )
    .unwrap();
    ok(&dir, a.gcc, &["-c", "add.s", "-o", "add.o"]);
    ok(
        &dir,
        a.gcc,
        &[
            "-c",
            "-Wa,-mrelax-relocations=no",
            "plain.s",
            "-o",
            "plain.o",
        ],
    );
    let run = |input: &str| {
        let o = Command::new(env!("CARGO_BIN_EXE_klp-convert"))
            .args(["-t", "vmlinux=vmlinux", input, "-o", "out.o"])
            .current_dir(&dir)
            .output()
            .unwrap();
        (
            o.status.code(),
            String::from_utf8_lossy(&o.stderr).into_owned(),
        )
    };
    let (code, err) = run("add.o");
    assert_eq!(code, Some(1), "{err}");
    assert!(
        err.contains("R_X86_64_REX_GOTPCRELX")
            && err.contains("`48 03 05 00 00 00 00`")
            && err.contains("mov foo@GOTPCREL(%rip), %reg")
            && err.contains("-fno-pic"),
        "{err}"
    );
    assert_eq!(err.trim_end().lines().count(), 1, "{err}");
    let (code, err) = run("plain.o");
    assert_eq!(code, Some(1), "{err}");
    assert!(
        err.contains("R_X86_64_GOTPCREL)") && err.contains("-fno-pic"),
        "{err}"
    );
}
