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

/// riscv64's pairs: `auipc` with `R_RISCV_GOT_HI20` (or `PCREL_HI20`) against the
/// symbol, then `ld` (or `addi`) with `R_RISCV_PCREL_LO12_I` against the label at the
/// `auipc`, a *partnered* entry. Real `riscv64-linux-gnu-gcc -O2` output of `bump`
/// (`counter` is the program's static: converted):
///
/// * `-fPIC`: the `GOT_HI20` is relaxed into `PCREL_HI20` in `.klp.rela.vmlinux.text`,
///   its `PCREL_LO12_I` moves with it (same symbol: the label, which stays a local of
///   the symbol table at its index), and the `ld` becomes `addi` with the same
///   operands (from the `ld`'s disassembly);
/// * **gcc's word for it**: the same function built `-fno-pic -mcmodel=medany`
///   addresses `counter` with `auipc` + `addi` itself; its `.text` equals the relaxed
///   one, and its converted `.klp.rela` entries equal the relaxed ones;
/// * `-fno-pic`: the `PCREL_HI20` moves, its `PCREL_LO12_I` with it, nothing is
///   relaxed.
///
/// The riscv64 back-end is not selected in `klp-backends` yet: without it the test
/// says so and passes.
#[test]
fn riscv64_got_hi20_and_its_ld_move_and_relax_together() {
    if klp_convert::Arch::named("riscv64").is_none() {
        eprintln!(
            "skipped: klp-backends does not select the riscv64 back-end in this build, so \
             klp-convert refuses riscv64 objects"
        );
        return;
    }
    let (gcc, objdump) = ("riscv64-linux-gnu-gcc", "riscv64-linux-gnu-objdump");
    const PROGRAM: &str = "#include <stdio.h>\n\
        __attribute__((used)) static int counter = 1;\n\
        __attribute__((noinline, used)) static int get(void) { return counter; }\n\
        int main(void) { printf(\"%d\\n\", get()); return 0; }\n";
    const BUMP: &str = "extern int counter;\nint bump(int x) { counter += x; return counter; }\n";
    const GOT_HI20: u32 = 20;
    const PCREL_HI20: u32 = 23;
    const PCREL_LO12_I: u32 = 24;
    const RELAX: u32 = 51;

    let dir = workdir("got-riscv64", "riscv64");
    std::fs::write(dir.join("t.c"), PROGRAM).unwrap();
    std::fs::write(dir.join("patch.c"), BUMP).unwrap();
    ok(&dir, gcc, &["-O2", "-rdynamic", "t.c", "-o", "vmlinux"]);
    let convert = |flags: &[&str], name: &str| {
        let (obj, out) = (format!("{name}.o"), format!("{name}-livepatch.o"));
        let mut args = vec!["-c", "-O2"];
        args.extend_from_slice(flags);
        args.extend_from_slice(&["patch.c", "-o", &obj]);
        ok(&dir, gcc, &args);
        let o = Command::new(env!("CARGO_BIN_EXE_klp-convert"))
            .args(["-v", "-t", "vmlinux=vmlinux", &obj, "-o", &out])
            .current_dir(&dir)
            .output()
            .unwrap();
        let log = String::from_utf8_lossy(&o.stderr).into_owned();
        assert!(o.status.success(), "{name}: {log}");
        assert!(!log.contains("warning"), "{name}: {log}");
        let input = parse(&std::fs::read(dir.join(&obj)).unwrap());
        let output = parse(&std::fs::read(dir.join(&out)).unwrap());
        (input, output, log, obj, out)
    };
    // The label a partnered entry names: a local of .text at the partner's offset.
    let check_pairs = |what: &str, input: &Parsed, output: &Parsed, hi: u32| {
        common::check_invariants(output);
        let in_relas = &input.section(".rela.text").relas;
        let klp = &output.section(".klp.rela.vmlinux.text").relas;
        let his: Vec<_> = in_relas.iter().filter(|r| r.1 == hi).collect();
        assert_eq!(his.len(), 1, "{what}: {in_relas:?}");
        let lo = in_relas
            .iter()
            .find(|r| r.1 == PCREL_LO12_I)
            .unwrap_or_else(|| panic!("{what}: no PCREL_LO12_I: {in_relas:?}"));
        let label = &input.symbols[lo.3 as usize];
        assert_eq!(
            (label.bind, label.value),
            (0, his[0].0),
            "{what}: {label:?}"
        );
        // Both moved, the LO12 with its symbol index (the label, still a local of
        // .text at the auipc in the output) and addend; HI20 against counter.
        assert_eq!(klp.len(), 2, "{what}: {klp:?}");
        let (h, l) = (klp[0], klp[1]);
        assert_eq!((h.0, h.1, h.2), (his[0].0, PCREL_HI20, his[0].2), "{what}");
        assert_eq!(
            output.symbols[h.3 as usize].name, ".klp.sym.vmlinux.counter,0",
            "{what}"
        );
        assert_eq!(l, *lo, "{what}: the LO12 entry moved unchanged");
        let out_label = &output.symbols[l.3 as usize];
        assert_eq!(out_label.name, label.name, "{what}");
        assert_eq!(
            (out_label.bind, out_label.shndx, out_label.value),
            (0, label.shndx, label.value),
            "{what}"
        );
        // What stays in .rela.text: the RELAX markers only.
        let kept = &output.section(".rela.text").relas;
        assert!(
            kept.iter().all(|r| r.1 == RELAX && r.3 == 0),
            "{what}: {kept:?}"
        );
        (his[0].0, lo.0)
    };

    // -fPIC: GOT_HI20 + ld, relaxed.
    let (input, output, log, obj, out) = convert(&["-fPIC"], "pic");
    assert!(
        input
            .section(".rela.text")
            .relas
            .iter()
            .any(|r| r.1 == GOT_HI20),
        "gcc -fPIC reached counter without the GOT: {:?}",
        input.section(".rela.text").relas
    );
    assert!(
        log.contains("R_RISCV_GOT_HI20 -> R_RISCV_PCREL_HI20"),
        "{log}"
    );
    let (_, ld_at) = check_pairs("pic", &input, &output, GOT_HI20);
    let no_aliases = |file: &str| {
        let text = ok(
            &dir,
            objdump,
            &["-d", "-M", "no-aliases", "-j", ".text", file],
        );
        text.lines()
            .find_map(|l| {
                let f: Vec<&str> = l.split('\t').collect();
                let off = f.first()?.trim().strip_suffix(':')?;
                if u64::from_str_radix(off, 16).ok()? != ld_at {
                    return None;
                }
                let ops = f.get(3)?.split('#').next()?.trim().to_string();
                Some((f.get(2)?.trim().to_string(), ops))
            })
            .unwrap_or_else(|| panic!("{file}: no instruction at {ld_at:#x}:\n{text}"))
    };
    let (m, ops) = no_aliases(&obj);
    assert_eq!(m, "ld", "{ops}");
    // ld rd,imm(rs) -> addi rd,rs,imm
    let (rd, mem) = ops.split_once(',').unwrap();
    let (imm, rs) = mem.trim_end_matches(')').split_once('(').unwrap();
    assert_eq!(
        no_aliases(&out),
        ("addi".to_string(), format!("{rd},{rs},{imm}"))
    );
    let (text_in, text_out) = (&input.section(".text").data, &output.section(".text").data);
    assert_eq!(text_in.len(), text_out.len());
    for (i, (x, y)) in text_in.iter().zip(text_out).enumerate() {
        if (ld_at..ld_at + 4).contains(&(i as u64)) {
            continue;
        }
        assert_eq!(x, y, ".text+{i:#x} changed");
    }

    // -fno-pic: PCREL_HI20 + addi, moved, not relaxed; gcc's own direct form equals
    // the relaxed one.
    let (np_in, np_out, np_log, _, _) = convert(&["-fno-pic", "-mcmodel=medany"], "nopic");
    assert!(!np_log.contains("relaxed"), "{np_log}");
    check_pairs("nopic", &np_in, &np_out, PCREL_HI20);
    assert_eq!(
        np_out.section(".text").data,
        *text_out,
        "gcc's -fno-pic .text differs from the relaxed -fPIC one"
    );
    let names = |p: &Parsed| p.relas(".klp.rela.vmlinux.text");
    assert_eq!(names(&np_out), names(&output));
}
