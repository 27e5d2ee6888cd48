//! End-to-end tests with the real toolchains: patch and target objects compiled by
//! each architecture's gcc (and rustc), converted by the `klp-convert` binary, and
//! read back by that architecture's binutils `readelf` and `ld`.
//!
//! The cross compilers and binutils are x86_64 programs (`ci/install` installs
//! them), so these tests only exist where the tests themselves are built for
//! x86_64: under `qemu-aarch64`/`qemu-ppc64le`/`qemu-s390x` (CI's foreign-target
//! runs) there is no compiler for the test to call. A missing tool is a failure
//! that says to run `ci/install`, never a silent skip.

#![cfg(target_arch = "x86_64")]

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use common::{Parsed, check_fields, parse};

/// One architecture's tools.
struct Tools {
    name: &'static str,
    gcc: &'static str,
    readelf: &'static str,
    ld: &'static str,
    rust_target: &'static str,
    /// The relocation type gcc uses for a direct call (readelf's name).
    call: &'static str,
    /// The 64-bit absolute relocation type, number and readelf's name, from the
    /// psABIs' relocation tables (all `S + A` on a 64-bit field): x86_64 psABI §4.4
    /// R_X86_64_64 = 1; AAELF64 §5.7 (static data relocations) R_AARCH64_ABS64 =
    /// 257; ELFv2 ABI §3.5.3 R_PPC64_ADDR64 = 38; s390x ELF ABI supplement R_390_64
    /// = 22.
    abs64: (u32, &'static str),
}

const TOOLS: [Tools; 4] = [
    Tools {
        name: "x86_64",
        gcc: "gcc",
        readelf: "readelf",
        ld: "ld",
        rust_target: "x86_64-unknown-linux-gnu",
        call: "R_X86_64_PLT32",
        abs64: (1, "R_X86_64_64"),
    },
    Tools {
        name: "aarch64",
        gcc: "aarch64-linux-gnu-gcc",
        readelf: "aarch64-linux-gnu-readelf",
        ld: "aarch64-linux-gnu-ld",
        rust_target: "aarch64-unknown-linux-gnu",
        call: "R_AARCH64_CALL26",
        abs64: (257, "R_AARCH64_ABS64"),
    },
    Tools {
        name: "ppc64le",
        gcc: "powerpc64le-linux-gnu-gcc",
        readelf: "powerpc64le-linux-gnu-readelf",
        ld: "powerpc64le-linux-gnu-ld",
        rust_target: "powerpc64le-unknown-linux-gnu",
        call: "R_PPC64_REL24",
        abs64: (38, "R_PPC64_ADDR64"),
    },
    Tools {
        name: "s390x",
        gcc: "s390x-linux-gnu-gcc",
        readelf: "s390x-linux-gnu-readelf",
        ld: "s390x-linux-gnu-ld",
        rust_target: "s390x-unknown-linux-gnu",
        call: "R_390_PLT32DBL",
        abs64: (22, "R_390_64"),
    },
];

/// A fresh directory under cargo's per-test temporary directory in `target/`.
fn workdir(test: &str, arch: &str) -> PathBuf {
    let d = Path::new(env!("CARGO_TARGET_TMPDIR"))
        .join("klp-convert")
        .join(test)
        .join(arch);
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// Runs a command in `dir`; a command that cannot start fails the test with what
/// to install.
fn run_in(dir: &Path, program: &str, args: &[&str]) -> Output {
    match Command::new(program).args(args).current_dir(dir).output() {
        Ok(o) => o,
        Err(e) => panic!(
            "cannot run {program} ({e}): the cross toolchains and binutils are missing; \
             run ci/install"
        ),
    }
}

/// Runs a command that must succeed and say nothing on stderr; returns stdout.
fn ok(dir: &Path, program: &str, args: &[&str]) -> String {
    let o = run_in(dir, program, args);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        o.status.success(),
        "{program} {args:?} failed ({}):\n{err}",
        o.status
    );
    assert!(err.trim().is_empty(), "{program} {args:?} warned:\n{err}");
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn write(dir: &Path, name: &str, text: &str) {
    std::fs::write(dir.join(name), text).unwrap();
}

fn klp_convert(dir: &Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_klp-convert"))
        .args(args)
        .current_dir(dir)
        .output()
        .unwrap()
}

/// The fields after `]` of readelf's section header line for `name`.
fn section_line(readelf: &str, name: &str) -> Vec<String> {
    readelf
        .lines()
        .filter_map(|l| l.split_once(']').map(|(_, rest)| rest))
        .map(|rest| {
            rest.split_whitespace()
                .map(str::to_string)
                .collect::<Vec<_>>()
        })
        .find(|f| f.first().map(String::as_str) == Some(name))
        .unwrap_or_else(|| panic!("no section {name} in:\n{readelf}"))
}

/// The fields of readelf's symbol line for `name`.
fn symbol_line(readelf: &str, name: &str) -> Vec<String> {
    readelf
        .lines()
        .map(|l| l.split_whitespace().map(str::to_string).collect::<Vec<_>>())
        .find(|f| f.len() >= 8 && f[0].ends_with(':') && f.last().map(String::as_str) == Some(name))
        .unwrap_or_else(|| panic!("no symbol {name} in:\n{readelf}"))
}

/// The entry lines of readelf's listing of relocation section `name`.
fn reloc_lines(readelf: &str, name: &str) -> Vec<String> {
    let head = format!("Relocation section '{name}'");
    let mut lines = readelf.lines().skip_while(|l| !l.starts_with(&head));
    assert!(
        lines.next().is_some(),
        "no relocation section {name} in:\n{readelf}"
    );
    lines
        .skip(1)
        .take_while(|l| !l.trim().is_empty())
        .map(str::to_string)
        .collect()
}

const TARGET_A: &str = r#"
#include <stdio.h>
__attribute__((noinline, used)) static int static_fn(int x) { return x * 3 + 1; }
__attribute__((used)) static int static_var = 42;
__attribute__((noinline, used)) static int dup(void) { return 1; }
int a_dup(void) { return dup(); }
__attribute__((noinline)) int global_fn(int x) { return static_fn(x) + static_var; }
int b_dup(void);
int main(int argc, char **argv) { printf("%d\n", global_fn(argc) + a_dup() + b_dup()); return 0; }
"#;

const TARGET_B: &str = r#"
__attribute__((noinline, used)) static int dup(void) { return 2; }
int b_dup(void) { return dup(); }
"#;

const MODULE: &str = r#"
__attribute__((noinline, used)) static int mod_static(int x) { return x - 1; }
int mod_fn(int x) { return mod_static(x) + 7; }
"#;

const PATCH: &str = r#"
extern int static_fn(int);
extern int static_var;
extern int global_fn(int);
extern int dup(void);
extern int mod_fn(int);
extern int mod_static(int);
int new_fn(int x)
{
    return static_fn(x) + global_fn(x) + static_var + dup() + mod_fn(x) + mod_static(x);
}
"#;

/// Builds the C target (an executable: "vmlinux"), a module object ("mymod") and the
/// patch, in `dir`.
fn build_c(dir: &Path, t: &Tools) {
    write(dir, "a.c", TARGET_A);
    write(dir, "b.c", TARGET_B);
    write(dir, "mod.c", MODULE);
    write(dir, "patch.c", PATCH);
    write(
        dir,
        "manifest.json",
        r#"{"symbols": {"dup": {"file": "b.c"}}}"#,
    );
    // -rdynamic: the executable's globals are in .dynsym, so its dynamic linker
    // resolves them and global_fn stays an ordinary undefined symbol.
    ok(
        dir,
        t.gcc,
        &["-O2", "-rdynamic", "a.c", "b.c", "-o", "vmlinux"],
    );
    ok(dir, t.gcc, &["-c", "-O2", "mod.c", "-o", "mymod.o"]);
    ok(
        dir,
        t.gcc,
        &["-c", "-O2", "-fno-pic", "patch.c", "-o", "patch.o"],
    );
}

#[test]
fn c_patches_convert_and_readelf_shows_the_seed_format() {
    for t in &TOOLS {
        let dir = workdir("c", t.name);
        build_c(&dir, t);
        let out = klp_convert(
            &dir,
            &[
                "-t",
                "vmlinux=vmlinux",
                "-t",
                "mymod=mymod.o",
                "-m",
                "manifest.json",
                "patch.o",
                "-o",
                "livepatch.o",
            ],
        );
        assert!(
            out.status.success(),
            "{}: {}",
            t.name,
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(
            out.stderr.is_empty(),
            "{}: {}",
            t.name,
            String::from_utf8_lossy(&out.stderr)
        );

        let re = ok(&dir, t.readelf, &["-W", "-S", "-s", "-r", "livepatch.o"]);
        assert!(!re.to_lowercase().contains("warning"), "{}:\n{re}", t.name);

        // Sections: SHT_RELA, flags "AIo" as in the seed, linked to .symtab, applying
        // to .text.
        let symtab = section_line(&re, ".symtab");
        let text_index = re
            .lines()
            .find(|l| l.split_whitespace().nth(2) == Some(".text") || l.contains("] .text "))
            .and_then(|l| l.split(']').next())
            .and_then(|s| {
                s.trim_start()
                    .trim_start_matches('[')
                    .trim()
                    .parse::<u32>()
                    .ok()
            })
            .unwrap();
        let symtab_index = re
            .lines()
            .find(|l| l.contains("] .symtab "))
            .and_then(|l| l.split(']').next())
            .and_then(|s| {
                s.trim_start()
                    .trim_start_matches('[')
                    .trim()
                    .parse::<u32>()
                    .ok()
            })
            .unwrap();
        assert_eq!(symtab[1], "SYMTAB");
        for name in [".klp.rela.vmlinux.text", ".klp.rela.mymod.text"] {
            let f = section_line(&re, name);
            assert_eq!(f[1], "RELA", "{}: {name}", t.name);
            assert_eq!(f[6], "AIo", "{}: {name} flags", t.name);
            assert_eq!(f[7], symtab_index.to_string(), "{}: {name} sh_link", t.name);
            assert_eq!(f[8], text_index.to_string(), "{}: {name} sh_info", t.name);
            assert_eq!(f[5], "18", "{}: {name} entsize", t.name);
        }

        // Symbols: "NOTYPE GLOBAL DEFAULT OS [0xff20] .klp.sym.<obj>.<name>,<pos>".
        for name in [
            ".klp.sym.vmlinux.static_fn,0",
            ".klp.sym.vmlinux.static_var,0",
            ".klp.sym.vmlinux.dup,2",
            ".klp.sym.mymod.mod_fn,0",
            ".klp.sym.mymod.mod_static,0",
        ] {
            let f = symbol_line(&re, name);
            assert_eq!(
                &f[3..8],
                ["NOTYPE", "GLOBAL", "DEFAULT", "OS", "[0xff20]"],
                "{}: {name}",
                t.name
            );
        }
        assert_eq!(symbol_line(&re, "global_fn")[6], "UND", "{}", t.name);
        if t.name == "ppc64le" {
            assert_eq!(symbol_line(&re, ".TOC.")[6], "UND");
        }

        // Relocations: calls in .klp.rela.<obj>.text with gcc's call type.
        let vm = reloc_lines(&re, ".klp.rela.vmlinux.text");
        for s in [".klp.sym.vmlinux.static_fn,0", ".klp.sym.vmlinux.dup,2"] {
            assert!(
                vm.iter().any(|l| l.contains(t.call) && l.contains(s)),
                "{}: no {} against {s} in {vm:#?}",
                t.name,
                t.call
            );
        }
        let md = reloc_lines(&re, ".klp.rela.mymod.text");
        assert_eq!(md.len(), 2, "{}: {md:#?}", t.name);
        assert!(
            md.iter()
                .all(|l| l.contains(t.call) && l.contains(".klp.sym.mymod.mod_"))
        );
        // ppc64le reaches a variable through a .toc entry (R_PPC64_ADDR64).
        let var = if t.name == "ppc64le" {
            reloc_lines(&re, ".klp.rela.vmlinux.toc")
        } else {
            vm.clone()
        };
        assert!(
            var.iter()
                .any(|l| l.contains(".klp.sym.vmlinux.static_var,0")),
            "{}",
            t.name
        );
        let rest = reloc_lines(&re, ".rela.text");
        assert!(
            rest.iter().any(|l| l.contains("global_fn")),
            "{}: {rest:#?}",
            t.name
        );
        assert!(
            !rest.iter().any(|l| l.contains(".klp.sym")),
            "{}: {rest:#?}",
            t.name
        );

        let modinfo = ok(&dir, t.readelf, &["-p", ".modinfo", "livepatch.o"]);
        assert!(modinfo.contains("livepatch=Y"), "{}:\n{modinfo}", t.name);

        // The same checks through object's reader.
        let bytes = std::fs::read(dir.join("livepatch.o")).unwrap();
        common::check_invariants(&parse(&bytes));

        // The linker takes it as an ordinary relocatable object.
        ok(&dir, t.ld, &["-r", "livepatch.o", "-o", "relinked.o"]);
    }
}

/// A known instruction sequence per architecture, assembled by gcc, and the
/// relocations it must carry after conversion, derived by hand from the documents
/// (never from the tool's output): (offset, type, addend, symbol).
struct Golden {
    arch: &'static str,
    asm: &'static str,
    expected: &'static [(u64, u32, i64, &'static str)],
    /// readelf's names for the types above, in order (checks the numbers against
    /// binutils' own table).
    names: &'static [&'static str],
}

const GOLDEN: [Golden; 4] = [
    // x86_64. Encodings from the Intel SDM vol. 2: `nop` = 90 (1 byte); `call rel32`
    // = E8 cd (opcode + 4-byte displacement); `mov r32, r/m32` = 8B /r, ModRM 05 =
    // RIP + disp32 in 64-bit mode (SDM vol. 2 §2.2.1.6), so the disp32 follows two
    // bytes of opcode and ModRM. Layout: nop @0, call @1 (field @2), mov @6 (field @8).
    // Types from the System V AMD64 psABI §4.4 (Relocation Types): R_X86_64_PC32 = 2
    // (S + A - P), R_X86_64_PLT32 = 4 (L + A - P), the type the psABI asks for
    // 32-bit PC-relative branch targets. Addend: both displacements are the last 4
    // bytes of their instruction and count from the next instruction, i.e. from
    // P + 4, so A = -4.
    Golden {
        arch: "x86_64",
        asm: "\t.text\n\t.globl new_fn\n\t.type new_fn, @function\nnew_fn:\n\
              \tnop\n\tcall static_fn\n\tmovl static_var(%rip), %eax\n\tret\n",
        expected: &[(2, 4, -4, "static_fn"), (8, 2, -4, "static_var")],
        names: &["R_X86_64_PLT32", "R_X86_64_PC32"],
    },
    // aarch64. Every A64 instruction is 4 bytes (Arm ARM): bl @0, adrp @4, ldr @8.
    // Types from "ELF for the Arm 64-bit Architecture (AAELF64)", §5.7 Relocation
    // types: "Relocations for control-flow instructions": 283 R_AARCH64_CALL26
    // (bl); "Relocations to generate 19, 21 and 33 bit PC-relative addresses": 275
    // R_AARCH64_ADR_PREL_PG_HI21 (adrp) and 285 R_AARCH64_LDST32_ABS_LO12_NC (a
    // 32-bit ldr's :lo12:). RELA addends are explicit; no offset is written, so 0.
    Golden {
        arch: "aarch64",
        asm: "\t.text\n\t.globl new_fn\n\t.type new_fn, %function\nnew_fn:\n\
              \tbl static_fn\n\tadrp x0, static_var\n\tldr w0, [x0, #:lo12:static_var]\n\tret\n",
        expected: &[
            (0, 283, 0, "static_fn"),
            (4, 275, 0, "static_var"),
            (8, 285, 0, "static_var"),
        ],
        names: &[
            "R_AARCH64_CALL26",
            "R_AARCH64_ADR_PREL_PG_HI21",
            "R_AARCH64_LDST32_ABS_LO12_NC",
        ],
    },
    // ppc64le. Power ISA: every (non-prefixed) instruction is 4 bytes: bl @0, nop
    // @4, addis @8, lwz @12. Types from the 64-bit ELF V2 ABI Specification §3.5.3
    // (Relocation Types): R_PPC64_REL24 = 10 (low24*, (S + A - P) >> 2; the LI field
    // of the I-form word at P), R_PPC64_TOC16_HA = 50 and R_PPC64_TOC16_LO = 48
    // (half16 of S + A - .TOC.; lwz is D-form, so not the _DS variant). A half16
    // field is the low-order halfword of the instruction word, which in
    // little-endian byte order is at the word's own address: offsets 8 and 12,
    // not 10 and 14. Addends 0.
    Golden {
        arch: "ppc64le",
        asm: "\t.abiversion 2\n\t.text\n\t.globl new_fn\n\t.type new_fn, @function\nnew_fn:\n\
              \tbl static_fn\n\tnop\n\taddis 9,2,static_var@toc@ha\n\tlwz 3,static_var@toc@l(9)\n\tblr\n",
        expected: &[
            (0, 10, 0, "static_fn"),
            (8, 50, 0, "static_var"),
            (12, 48, 0, "static_var"),
        ],
        names: &["R_PPC64_REL24", "R_PPC64_TOC16_HA", "R_PPC64_TOC16_LO"],
    },
    // s390x. z/Architecture Principles of Operation: brasl and larl are RIL-b
    // format, 6 bytes: 8-bit opcode, R1, 4-bit opcode extension, then the 32-bit I2
    // at byte 2, a signed halfword count from the instruction's own address. Layout:
    // brasl @0 (I2 @2), larl @6 (I2 @8). Types from the s390x ELF ABI supplement
    // (Relocation Types): R_390_PLT32DBL = 20 ((L + A - P) >> 1) for `@PLT`,
    // R_390_PC32DBL = 19 ((S + A - P) >> 1). P is the I2 field, 2 bytes after the
    // instruction address the CPU counts from, so A = +2.
    Golden {
        arch: "s390x",
        asm: "\t.text\n\t.globl new_fn\n\t.type new_fn, @function\nnew_fn:\n\
              \tbrasl %r14,static_fn@PLT\n\tlarl %r1,static_var\n\tl %r2,0(%r1)\n\tbr %r14\n",
        expected: &[(2, 20, 2, "static_fn"), (8, 19, 2, "static_var")],
        names: &["R_390_PLT32DBL", "R_390_PC32DBL"],
    },
];

#[test]
fn golden_relocations_match_the_psabi_documents() {
    for (t, g) in TOOLS.iter().zip(&GOLDEN) {
        assert_eq!(t.name, g.arch);
        let dir = workdir("golden", t.name);
        write(&dir, "patch.s", g.asm);
        // The kernel's own symbol list form: both are static (lowercase types).
        write(
            &dir,
            "System.map",
            "0000000000001000 t static_fn\n0000000000002000 d static_var\n",
        );
        ok(&dir, t.gcc, &["-c", "patch.s", "-o", "patch.o"]);
        let out = klp_convert(&dir, &["-t", "System.map", "patch.o", "-o", "livepatch.o"]);
        assert!(
            out.status.success(),
            "{}: {}",
            t.name,
            String::from_utf8_lossy(&out.stderr)
        );

        let p = parse(&std::fs::read(dir.join("livepatch.o")).unwrap());
        common::check_invariants(&p);
        let want: Vec<(u64, u32, i64, String)> = g
            .expected
            .iter()
            .map(|&(o, ty, a, s)| (o, ty, a, format!(".klp.sym.vmlinux.{s},0")))
            .collect();
        assert_eq!(p.relas(".klp.rela.vmlinux.text"), want, "{}", t.name);
        assert!(p.relas(".rela.text").is_empty(), "{}", t.name);

        let re = ok(&dir, t.readelf, &["-W", "-r", "livepatch.o"]);
        let lines = reloc_lines(&re, ".klp.rela.vmlinux.text");
        let got: Vec<&str> = lines
            .iter()
            .map(|l| l.split_whitespace().nth(2).unwrap())
            .collect();
        assert_eq!(got, g.names, "{}", t.name);
    }
}

#[test]
fn rustc_patches_convert() {
    for t in &TOOLS {
        let dir = workdir("rustc", t.name);
        write(
            &dir,
            "patch.rs",
            "#![no_std]\n\
             extern \"C\" {\n    fn static_fn(x: i32) -> i32;\n    static static_var: i32;\n    \
             fn global_fn(x: i32) -> i32;\n}\n\
             #[no_mangle]\npub extern \"C\" fn new_fn(x: i32) -> i32 {\n    \
             unsafe { static_fn(x) + static_var + global_fn(x) }\n}\n",
        );
        write(
            &dir,
            "System.map",
            "0000000000001000 t static_fn\n0000000000002000 d static_var\n\
             0000000000003000 T global_fn\n",
        );
        let rustc = |model: &str, out: &str| {
            let o = run_in(
                &dir,
                "rustc",
                &[
                    "--edition",
                    "2021",
                    "--crate-type",
                    "lib",
                    "--emit",
                    "obj",
                    "-C",
                    "opt-level=2",
                    "-C",
                    "panic=abort",
                    "-C",
                    model,
                    "--target",
                    t.rust_target,
                    "patch.rs",
                    "-o",
                    out,
                ],
            );
            assert!(
                o.status.success(),
                "{}: rustc failed (is the target installed? run ci/install):\n{}",
                t.name,
                String::from_utf8_lossy(&o.stderr)
            );
        };
        // rustc's default is position-independent code, whose GOT relocations no
        // livepatch loader writes. rustc's x86_64 code uses R_X86_64_GOTPCREL, which
        // does not mark the instruction as one a linker may rewrite: refused with the
        // fix. aarch64's R_AARCH64_ADR_GOT_PAGE + R_AARCH64_LD64_GOT_LO12_NC and
        // s390x's R_390_GOTENT against converted symbols are relaxed into direct
        // references, as a linker does (checked instruction by instruction in
        // `got_references_of_pie_patches_are_relaxed_as_a_linker_does`). (ppc64le
        // code reaches data through the TOC either way.)
        if t.name != "ppc64le" {
            rustc("relocation-model=pic", "pic.o");
            let out = klp_convert(&dir, &["-t", "System.map", "pic.o", "-o", "pic-lp.o"]);
            let err = String::from_utf8_lossy(&out.stderr);
            if t.name == "x86_64" {
                assert_eq!(out.status.code(), Some(1), "{}: {err}", t.name);
                assert!(
                    err.contains("R_X86_64_GOTPCREL") && err.contains("-C relocation-model=static"),
                    "{}: {err}",
                    t.name
                );
            } else {
                assert!(out.status.success(), "{}: {err}", t.name);
                let re = ok(&dir, t.readelf, &["-W", "-r", "pic-lp.o"]);
                // rustc puts each function in its own section.
                let klp = reloc_lines(&re, ".klp.rela.vmlinux.text.new_fn");
                assert!(
                    klp.iter()
                        .any(|l| l.contains(".klp.sym.vmlinux.static_var,0")),
                    "{}: {klp:#?}",
                    t.name
                );
                assert!(
                    !re.contains("GOT_PAGE") && !re.contains("GOTENT"),
                    "{}:\n{re}",
                    t.name
                );
            }
        }
        rustc("relocation-model=static", "patch.o");
        let out = klp_convert(&dir, &["-t", "System.map", "patch.o", "-o", "livepatch.o"]);
        assert!(
            out.status.success(),
            "{}: {}",
            t.name,
            String::from_utf8_lossy(&out.stderr)
        );
        let p = parse(&std::fs::read(dir.join("livepatch.o")).unwrap());
        common::check_invariants(&p);
        assert_eq!(p.symbol(".klp.sym.vmlinux.static_fn,0").shndx, 0xff20);
        assert_eq!(p.symbol(".klp.sym.vmlinux.static_var,0").shndx, 0xff20);
        assert_eq!(p.symbol("global_fn").shndx, 0);
        let re = ok(&dir, t.readelf, &["-W", "-S", "-s", "-r", "livepatch.o"]);
        assert!(!re.to_lowercase().contains("warning"), "{}:\n{re}", t.name);
        assert!(re.contains(&format!(" {} ", t.call)), "{}:\n{re}", t.name);
    }
}

#[test]
fn the_command_refuses_with_sentences_and_a_non_zero_exit() {
    let t = &TOOLS[0];
    let dir = workdir("cli", t.name);
    build_c(&dir, t);

    let refuse = |args: &[&str]| -> String {
        let out = klp_convert(&dir, args);
        assert_eq!(out.status.code(), Some(1), "{args:?}");
        assert!(!dir.join("bad.o").exists(), "{args:?} wrote an output");
        let err = String::from_utf8_lossy(&out.stderr).into_owned();
        assert!(err.starts_with("klp-convert: "), "{err}");
        err
    };

    // dup is ambiguous without the manifest: both candidates, with their files.
    let err = refuse(&[
        "-t",
        "vmlinux=vmlinux",
        "-t",
        "mymod=mymod.o",
        "patch.o",
        "-o",
        "bad.o",
    ]);
    assert!(
        err.contains("symbol 'dup' occurs 2 times in vmlinux"),
        "{err}"
    );
    assert!(
        err.contains("sympos 1") && err.contains("source file a.c"),
        "{err}"
    );
    assert!(
        err.contains("sympos 2") && err.contains("source file b.c"),
        "{err}"
    );

    // mod_fn is defined nowhere without the module.
    let err = refuse(&[
        "-t",
        "vmlinux=vmlinux",
        "-m",
        "manifest.json",
        "patch.o",
        "-o",
        "bad.o",
    ]);
    assert!(
        err.contains("symbol 'mod_fn' is used by the patch but defined by none"),
        "{err}"
    );

    // An executable's object name cannot be guessed.
    let err = refuse(&["-t", "./myprog", "patch.o", "-o", "bad.o"]);
    assert!(err.contains("NAME=PATH"), "{err}");

    // A missing file, a bad manifest, a wrong-arch target.
    let err = refuse(&["-t", "vmlinux=nope", "patch.o", "-o", "bad.o"]);
    assert!(err.contains("cannot read nope"), "{err}");
    write(
        &dir,
        "bad.json",
        r#"{"symbols": {"dup": {"fille": "b.c"}}}"#,
    );
    let err = refuse(&[
        "-t",
        "vmlinux=vmlinux",
        "-m",
        "bad.json",
        "patch.o",
        "-o",
        "bad.o",
    ]);
    assert!(err.contains("unknown field `fille`"), "{err}");
    let other = workdir("cli-other", "aarch64");
    build_c(&other, &TOOLS[1]);
    let target = format!("vmlinux={}", other.join("vmlinux").display());
    let err = refuse(&["-t", &target, "patch.o", "-o", "bad.o"]);
    assert!(
        err.contains("is built for aarch64, but the patch is built for x86_64"),
        "{err}"
    );

    // --keep and --force-klp on the command line, a module named after its .ko
    // file, and -v's report.
    std::fs::copy(dir.join("mymod.o"), dir.join("mymod.ko")).unwrap();
    let out = klp_convert(
        &dir,
        &[
            "-v",
            "-t",
            "vmlinux=vmlinux",
            "-t",
            "mymod.ko",
            "-m",
            "manifest.json",
            "--force-klp",
            "global_fn",
            "patch.o",
            "-o",
            "good.o",
        ],
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert!(
        err.contains("global_fn -> .klp.sym.vmlinux.global_fn,0 (forced by the manifest)"),
        "{err}"
    );
    assert!(err.contains("mod_fn -> .klp.sym.mymod.mod_fn,0"), "{err}");
    let out = klp_convert(
        &dir,
        &[
            "-t",
            "vmlinux=vmlinux",
            "-m",
            "manifest.json",
            "--keep",
            "mod_fn",
            "--keep",
            "mod_static",
            "patch.o",
            "-o",
            "good.o",
        ],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

const DESCRIBED_PATCH: &str = r#"
extern int static_helper(int);
int calls;
int livepatch_cmdline_proc_show(void *m, void *v) { return static_helper(1); }
int livepatch_other(void) { return 2; }
int livepatch_mod_fn(int x) { return x + 3; }
int my_pre(void *obj) { calls += 4; return 0; }
void __klp_post_patch_callback_vmlinux(void *obj) { calls += 5; }
void my_post_unpatch(void *obj) { calls += 6; }
"#;

/// vmlinux: cmdline_proc_show once, two statics named other.
const DESCRIBED_MAP: &str = "0000000000001000 t static_helper\n\
                             0000000000002000 T cmdline_proc_show\n\
                             0000000000003000 t other\n\
                             0000000000004000 t other\n";

const DESCRIBED_MANIFEST: &str = r#"{"patch": {"objects": [
    {"object": "vmlinux",
     "funcs": [{"old": "cmdline_proc_show", "new": "livepatch_cmdline_proc_show"},
               {"old": "other", "new": "livepatch_other", "sympos": 2}],
     "callbacks": {"pre_patch": "my_pre"}},
    {"object": "mymod", "funcs": [{"old": "mod_fn", "new": "livepatch_mod_fn"}],
     "callbacks": {"post_unpatch": "my_post_unpatch"}}],
  "replace": true}}"#;

/// What the module's init code makes of the description, read from a linked file
/// in which the linker has applied the description's relocations: per object its
/// name, its functions (old name, new function, sympos) and its callbacks.
type Walked = Vec<(String, Vec<(String, String, u64)>, [Option<String>; 4])>;

fn walk_linked(p: &Parsed) -> Walked {
    let read_str = |addr: u64| -> String {
        let s = p
            .sections
            .iter()
            .find(|s| s.sh_addr <= addr && addr < s.sh_addr + s.data.len() as u64)
            .unwrap_or_else(|| panic!("no section holds {addr:#x}"));
        let from = &s.data[(addr - s.sh_addr) as usize..];
        String::from_utf8(from[..from.iter().position(|&b| b == 0).unwrap()].to_vec()).unwrap()
    };
    let function = |addr: u64| -> Option<String> {
        (addr != 0).then(|| {
            p.symbols
                .iter()
                .find(|s| s.st_type == 2 && s.value == addr)
                .unwrap_or_else(|| panic!("no function at {addr:#x}"))
                .name
                .clone()
        })
    };
    let objects = p.section(".init.klp_objects");
    let funcs = p.section(".init.klp_funcs");
    let mut out = Vec::new();
    for o in objects.data.chunks_exact(64) {
        let f = |at: usize, w: usize| common::field(p, o, at, w);
        let name = match f(0, 8) {
            0 => "vmlinux".to_string(),
            a => read_str(a),
        };
        let nr = f(56, 4);
        let start = f(8, 8) - funcs.sh_addr;
        let mut list = Vec::new();
        for j in 0..nr {
            let r = &funcs.data[(start + 24 * j) as usize..][..24];
            let g = |at: usize| common::field(p, r, at, 8);
            list.push((read_str(g(0)), function(g(8)).unwrap(), g(16)));
        }
        let callbacks = [
            function(f(16, 8)),
            function(f(24, 8)),
            function(f(32, 8)),
            function(f(40, 8)),
        ];
        out.push((name, list, callbacks));
    }
    out
}

#[test]
fn c_patches_get_the_patch_description_in_upstream_layout() {
    for t in &TOOLS {
        let dir = workdir("description", t.name);
        write(&dir, "patch.c", DESCRIBED_PATCH);
        write(&dir, "System.map", DESCRIBED_MAP);
        write(&dir, "manifest.json", DESCRIBED_MANIFEST);
        ok(
            &dir,
            t.gcc,
            &["-c", "-O2", "-fno-pic", "patch.c", "-o", "patch.o"],
        );
        let out = klp_convert(
            &dir,
            &[
                "-t",
                "System.map",
                "-m",
                "manifest.json",
                "patch.o",
                "-o",
                "livepatch.o",
            ],
        );
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "{}: {err}", t.name);
        // mymod is not a target: one note, nothing else.
        assert_eq!(err.lines().count(), 1, "{}: {err}", t.name);
        assert!(
            err.contains("warning: object mymod of the patch description is not a target"),
            "{}: {err}",
            t.name
        );

        let p = parse(&std::fs::read(dir.join("livepatch.o")).unwrap());
        common::check_invariants(&p);
        let (abs, abs_name) = t.abs64;

        // Sections. SHT_PROGBITS = 1, SHT_RELA = 4; SHF_ALLOC = 2, SHF_MERGE = 0x10,
        // SHF_STRINGS = 0x20, SHF_INFO_LINK = 0x40. Two klp_object_ext of 64 bytes,
        // three klp_func_ext of 24.
        let objects = p.section(".init.klp_objects");
        let funcs = p.section(".init.klp_funcs");
        let strings = p.section(".init.klp_strings");
        assert_eq!(
            (
                objects.sh_type,
                objects.sh_flags,
                objects.sh_addralign,
                objects.data.len()
            ),
            (1, 2, 8, 128),
            "{}",
            t.name
        );
        assert_eq!(
            (
                funcs.sh_type,
                funcs.sh_flags,
                funcs.sh_addralign,
                funcs.data.len()
            ),
            (1, 2, 8, 72),
            "{}",
            t.name
        );
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
                    r.sh_info as usize,
                    r.sh_entsize
                ),
                (4, 0x40, p.symtab, target, 24),
                "{}: {rela}",
                t.name
            );
        }

        // Strings in order of use: "cmdline_proc_show" @0 (17 + NUL), "other" @18
        // (0x12; 5 + NUL), "mymod" @24 (0x18), "mod_fn" @30 (0x1e); 37 bytes.
        assert_eq!(strings.data, b"cmdline_proc_show\0other\0mymod\0mod_fn\0");

        // klp_object_ext[0], vmlinux, @0: name NULL (no relocation); funcs @8 ->
        // .init.klp_funcs + 0; pre_patch @16 -> my_pre (manifest); post_patch @24
        // -> __klp_post_patch_callback_vmlinux (its name); pre_unpatch @32,
        // post_unpatch @40 NULL; post_unpatch_enabled @48 = 0; nr_funcs @56 = 2.
        // klp_object_ext[1], mymod, @64: name -> .init.klp_strings + 24; funcs @72
        // -> .init.klp_funcs + 2 * 24 = 48; post_unpatch @64 + 16 + 24 = 104 ->
        // my_post_unpatch; nr_funcs @64 + 56 = 120 = 1.
        check_fields(&p, "klp_objects", &objects.data, &[(56, 4, 2), (120, 4, 1)]);
        let mut got = p.labelled_relas(".rela.init.klp_objects");
        got.sort();
        let want: Vec<(u64, u32, i64, String)> = vec![
            (8, abs, 0, "[.init.klp_funcs]".into()),
            (16, abs, 0, "my_pre".into()),
            (24, abs, 0, "__klp_post_patch_callback_vmlinux".into()),
            (64, abs, 24, "[.init.klp_strings]".into()),
            (72, abs, 48, "[.init.klp_funcs]".into()),
            (104, abs, 0, "my_post_unpatch".into()),
        ];
        assert_eq!(got, want, "{}", t.name);

        // klp_func_ext[0] @0: old_name -> strings + 0, new_func @8 ->
        // livepatch_cmdline_proc_show, sympos @16 = 0. [1] @24: -> strings + 18,
        // @32 -> livepatch_other, sympos @40 = 2. [2] @48: -> strings + 30, @56 ->
        // livepatch_mod_fn, sympos @64 = 0.
        check_fields(&p, "klp_funcs", &funcs.data, &[(40, 8, 2)]);
        let mut got = p.labelled_relas(".rela.init.klp_funcs");
        got.sort();
        let want: Vec<(u64, u32, i64, String)> = vec![
            (0, abs, 0, "[.init.klp_strings]".into()),
            (8, abs, 0, "livepatch_cmdline_proc_show".into()),
            (24, abs, 18, "[.init.klp_strings]".into()),
            (32, abs, 0, "livepatch_other".into()),
            (48, abs, 30, "[.init.klp_strings]".into()),
            (56, abs, 0, "livepatch_mod_fn".into()),
        ];
        assert_eq!(got, want, "{}", t.name);
        // The functions the relocations name are the patch's own (defined, STT_FUNC).
        for name in ["livepatch_cmdline_proc_show", "my_pre", "my_post_unpatch"] {
            let s = p.symbol(name);
            assert_eq!(s.st_type, 2, "{}: {name}", t.name);
            assert_eq!(
                s.shndx as usize,
                p.section(".text").index,
                "{}: {name}",
                t.name
            );
        }
        assert!(
            common::modinfo(&p).contains(&"klp_replace=Y".to_string()),
            "{}",
            t.name
        );

        // binutils' view: the type names, and the section symbols by name.
        let re = ok(&dir, t.readelf, &["-W", "-S", "-s", "-r", "livepatch.o"]);
        assert!(!re.to_lowercase().contains("warning"), "{}:\n{re}", t.name);
        for (rela, n) in [(".rela.init.klp_funcs", 6), (".rela.init.klp_objects", 6)] {
            let lines = reloc_lines(&re, rela);
            assert_eq!(lines.len(), n, "{}: {lines:#?}", t.name);
            for l in &lines {
                assert_eq!(
                    l.split_whitespace().nth(2),
                    Some(abs_name),
                    "{}: {l}",
                    t.name
                );
            }
        }
        let lines = reloc_lines(&re, ".rela.init.klp_funcs");
        assert!(
            lines[0].ends_with(".init.klp_strings + 0"),
            "{}: {}",
            t.name,
            lines[0]
        );
        assert!(
            lines[2].ends_with(".init.klp_strings + 12"),
            "{}: {}",
            t.name,
            lines[2]
        );
        assert!(
            lines[1].ends_with("livepatch_cmdline_proc_show + 0"),
            "{}",
            lines[1]
        );
        assert_eq!(
            section_line(&re, ".init.klp_strings")[6],
            "AMS",
            "{}",
            t.name
        );
        assert_eq!(section_line(&re, ".init.klp_objects")[6], "A", "{}", t.name);
        assert_eq!(
            section_line(&re, ".rela.init.klp_funcs")[6],
            "I",
            "{}",
            t.name
        );

        // The linker applies the description's relocations like any others: in the
        // linked file, the records lead to the right strings and functions, as the
        // module's init code would follow them.
        ok(
            &dir,
            t.ld,
            &[
                "-static",
                "-e",
                "livepatch_cmdline_proc_show",
                "-o",
                "linked",
                "livepatch.o",
            ],
        );
        let linked = parse(&std::fs::read(dir.join("linked")).unwrap());
        let s = |x: &str| x.to_string();
        let want: Walked = vec![
            (
                s("vmlinux"),
                vec![
                    (s("cmdline_proc_show"), s("livepatch_cmdline_proc_show"), 0),
                    (s("other"), s("livepatch_other"), 2),
                ],
                [
                    Some(s("my_pre")),
                    Some(s("__klp_post_patch_callback_vmlinux")),
                    None,
                    None,
                ],
            ),
            (
                s("mymod"),
                vec![(s("mod_fn"), s("livepatch_mod_fn"), 0)],
                [None, None, None, Some(s("my_post_unpatch"))],
            ),
        ];
        assert_eq!(walk_linked(&linked), want, "{}", t.name);
    }
}

#[test]
fn the_command_refuses_a_second_description_and_keeps_the_first() {
    let t = &TOOLS[0];
    let dir = workdir("description-cli", t.name);
    write(&dir, "patch.c", DESCRIBED_PATCH);
    write(&dir, "System.map", DESCRIBED_MAP);
    write(&dir, "manifest.json", DESCRIBED_MANIFEST);
    ok(
        &dir,
        t.gcc,
        &["-c", "-O2", "-fno-pic", "patch.c", "-o", "patch.o"],
    );
    let args = [
        "-v",
        "-t",
        "System.map",
        "-m",
        "manifest.json",
        "patch.o",
        "-o",
        "once.o",
    ];
    let out = klp_convert(&dir, &args);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    for line in [
        "patch description: 2 object(s), atomic replace (.modinfo klp_replace=Y)",
        "    other,2 -> livepatch_other",
        "    post_patch: __klp_post_patch_callback_vmlinux",
        "  mymod (not checked: no target)",
    ] {
        assert!(err.lines().any(|l| l == line), "{line:?} in:\n{err}");
    }

    let out = klp_convert(
        &dir,
        &[
            "-t",
            "System.map",
            "-m",
            "manifest.json",
            "once.o",
            "-o",
            "bad.o",
        ],
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(!dir.join("bad.o").exists());
    assert!(
        err.starts_with("klp-convert: once.o already has a patch description (.init.klp_objects)"),
        "{err}"
    );

    // Without a manifest the object passes through with its description.
    let out = klp_convert(&dir, &["-t", "System.map", "once.o", "-o", "twice.o"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.stderr.is_empty(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let (a, b) = (
        parse(&std::fs::read(dir.join("once.o")).unwrap()),
        parse(&std::fs::read(dir.join("twice.o")).unwrap()),
    );
    assert_eq!(
        a.labelled_relas(".rela.init.klp_funcs"),
        b.labelled_relas(".rela.init.klp_funcs")
    );

    // The replacement must be the patch's own function.
    write(
        &dir,
        "undefined.json",
        &DESCRIBED_MANIFEST.replace("\"livepatch_other\"", "\"static_helper\""),
    );
    let out = klp_convert(
        &dir,
        &[
            "-t",
            "System.map",
            "-m",
            "undefined.json",
            "patch.o",
            "-o",
            "bad.o",
        ],
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains(
            "'static_helper', the replacement of 'other' in vmlinux, must be a function \
                      defined in the patch object, but the patch only refers to it"
        ),
        "{err}"
    );
}

/// A C patch whose replacement calls a static function of vmlinux, reads a static
/// variable of vmlinux and calls a static function of module `mymod`.
const CORE_PATCH: &str = r#"
extern int static_helper(int);
extern int static_var;
extern int mod_fn(int);
int calls;
int livepatch_cmdline_proc_show(void *m, void *v) { return static_helper(1) + static_var + mod_fn(2); }
int livepatch_other(void) { return 2; }
int livepatch_mod_fn(int x) { return x + 3; }
int my_pre(void *obj) { calls += 4; return 0; }
void __klp_post_patch_callback_vmlinux(void *obj) { calls += 5; }
void my_post_unpatch(void *obj) { calls += 6; }
"#;

/// Addresses chosen so that every branch of every arch reaches from `.text` at
/// [`CORE_TEXT`] (ppc64le's `bl` reaches ±32 MiB); `static_var` is 4-aligned for
/// aarch64's scaled `ldr` and even for s390x's `larl`.
const CORE_TEXT: u64 = 0x1000_0000;
const CORE_TOC_SECTION: u64 = 0x1000_8000;
const CORE_HELPER: u64 = 0x1040_0000;
const CORE_VAR: u64 = 0x1080_1238;
const CORE_MOD_FN: u64 = 0x10c0_0000;
const CORE_MAP: &str = "0000000010400000 t static_helper\n\
                        0000000010600000 T cmdline_proc_show\n\
                        0000000010700000 t other\n\
                        0000000010780000 t other\n\
                        0000000010801238 d static_var\n\
                        0000000010c00000 t mod_fn [mymod]\n";
const CORE_MANIFEST: &str = r#"{"patch": {"objects": [
    {"object": "vmlinux",
     "funcs": [{"old": "cmdline_proc_show", "new": "livepatch_cmdline_proc_show"},
               {"old": "other", "new": "livepatch_other", "sympos": 2}],
     "callbacks": {"pre_patch": "my_pre"}},
    {"object": "mymod", "funcs": [{"old": "mod_fn", "new": "livepatch_mod_fn"}],
     "callbacks": {"post_unpatch": "my_post_unpatch"}}]}}"#;

/// Builds and converts [`CORE_PATCH`] for `t` in `dir`; returns the converted bytes.
fn core_patch(dir: &Path, t: &Tools) -> Vec<u8> {
    write(dir, "patch.c", CORE_PATCH);
    write(dir, "System.map", CORE_MAP);
    write(dir, "manifest.json", CORE_MANIFEST);
    ok(
        dir,
        t.gcc,
        &["-c", "-O2", "-fno-pic", "patch.c", "-o", "patch.o"],
    );
    let out = klp_convert(
        dir,
        &[
            "-t",
            "System.map",
            "-m",
            "manifest.json",
            "patch.o",
            "-o",
            "livepatch.o",
        ],
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{}: {err}", t.name);
    assert!(err.is_empty(), "{}: {err}", t.name);
    std::fs::read(dir.join("livepatch.o")).unwrap()
}

fn arch_of(t: &Tools) -> klp_convert::Arch {
    match t.name {
        "x86_64" => klp_convert::Arch::X86_64,
        "aarch64" => klp_convert::Arch::AARCH64,
        "ppc64le" => klp_convert::Arch::PPC64LE,
        _ => klp_convert::Arch::S390X,
    }
}

/// The `.klp.rela` entries of a converted file, read with `object`'s reader
/// (independently of the core): (section, relocated section, offset, type, addend,
/// symbol name).
fn klp_entries(p: &Parsed) -> Vec<(String, String, u64, u32, i64, String)> {
    p.sections
        .iter()
        .filter(|s| s.name.starts_with(".klp.rela."))
        .flat_map(|s| {
            let target = p.sections[s.sh_info as usize].name.clone();
            s.relas.iter().map(move |&(o, ty, a, sym)| {
                (
                    s.name.clone(),
                    target.clone(),
                    o,
                    ty,
                    a,
                    p.symbols[sym as usize].name.clone(),
                )
            })
        })
        .collect()
}

fn word_at(bytes: &[u8], at: usize, n: usize, big: bool) -> u64 {
    let b = &bytes[at..at + n];
    let mut v = 0u64;
    for i in 0..n {
        v = (v << 8) | u64::from(if big { b[i] } else { b[n - 1 - i] });
    }
    v
}

/// The core reads what klp-convert made of gcc's objects for every arch: the
/// description is the manifest's, and the `.klp.rela` sections are written by the
/// arch's back-end (resolved through a host that answers from the System.map the
/// object was converted against), a call and a data reference checked against the
/// psABI formula; mymod's section is written only for mymod and cleared again.
#[test]
fn the_core_loads_resolves_and_relocates_gcc_built_patches() {
    use common::corehost::{
        Loaded, MapHost, clear_for, core_description, manifest_description, write_for,
    };
    use klp::elf::PatchObject;
    for t in &TOOLS {
        let arch = arch_of(t);
        let dir = workdir("core", t.name);
        let data = core_patch(&dir, t);
        let obj = PatchObject::parse(&data).unwrap_or_else(|e| panic!("{}: {e}", t.name));
        assert!(obj.is_livepatch(), "{}", t.name);
        let m = klp_convert::Manifest::from_json(CORE_MANIFEST).unwrap();
        assert_eq!(
            core_description(&obj),
            manifest_description(&m, &[("vmlinux", 1, "__klp_post_patch_callback_vmlinux")]),
            "{}",
            t.name
        );

        let p = parse(&data);
        let big = p.big_endian;
        let entries = klp_entries(&p);
        let entry = |sym: &str, ty: &str| {
            entries
                .iter()
                .find(|e| e.5 == sym && e.3 == name_type(ty))
                .unwrap_or_else(|| panic!("{}: no {ty} against {sym} in {entries:#?}", t.name))
                .clone()
        };
        let helper = entry(".klp.sym.vmlinux.static_helper,0", t.call);
        let (var_type, var_section) = match t.name {
            "x86_64" => ("R_X86_64_PC32", ".text"),
            "aarch64" => ("R_AARCH64_ADR_PREL_PG_HI21", ".text"),
            // ppc64le reaches data through a .toc entry.
            "ppc64le" => ("R_PPC64_ADDR64", ".toc"),
            _ => ("R_390_PC32DBL", ".text"),
        };
        let var = entry(".klp.sym.vmlinux.static_var,0", var_type);
        assert_eq!(var.1, var_section, "{}", t.name);
        let modfn = entry(".klp.sym.mymod.mod_fn,0", t.call);
        assert_eq!(modfn.0, ".klp.rela.mymod.text");

        let toc_addr = if p.has_section(".toc") {
            vec![(".text", CORE_TEXT), (".toc", CORE_TOC_SECTION)]
        } else {
            vec![(".text", CORE_TEXT)]
        };
        let toc = (arch == klp_convert::Arch::PPC64LE).then_some(CORE_TOC_SECTION + 0x8000);
        let mut image = Loaded::load(&obj, &toc_addr, toc);
        let text0 = image.bytes(&obj, ".text");
        let mut host = MapHost::from_map(CORE_MAP);
        assert_eq!(
            write_for(arch, &mut host, &obj, &mut image, None),
            Ok(()),
            "{}: {:?}",
            t.name,
            host.log
        );
        let text1 = image.bytes(&obj, ".text");

        // The call: S = 0x1040_0000, P = .text + r_offset.
        let (off, a) = (helper.2 as usize, helper.4);
        let s_a_p = CORE_HELPER
            .wrapping_add(a as u64)
            .wrapping_sub(CORE_TEXT + off as u64);
        let call = match t.name {
            // R_X86_64_PLT32: L + A - P in the 32-bit field (L = S: no PLT).
            "x86_64" => (off, 4, s_a_p & 0xffff_ffff),
            // R_AARCH64_CALL26: bits 0-25 of bl = (S + A - P) >> 2.
            "aarch64" => (
                off,
                4,
                (word_at(&text0, off, 4, big) & 0xfc00_0000) | ((s_a_p >> 2) & 0x03ff_ffff),
            ),
            // R_PPC64_REL24: LI (bits 2-25) = S + A - P, AA and LK kept.
            "ppc64le" => (
                off,
                4,
                (word_at(&text0, off, 4, big) & 0xfc00_0003) | (s_a_p & 0x03ff_fffc),
            ),
            // R_390_PLT32DBL: (L + A - P) >> 1 in the 32-bit I2 field.
            _ => (off, 4, (s_a_p >> 1) & 0xffff_ffff),
        };
        assert_eq!(
            word_at(&text1, call.0, call.1, big),
            call.2,
            "{}: the call to static_helper",
            t.name
        );
        if t.name == "ppc64le" {
            // The callee is in another object: the nop after the bl restores r2.
            assert_eq!(word_at(&text0, off + 4, 4, big), 0x6000_0000);
            assert_eq!(word_at(&text1, off + 4, 4, big), 0xe841_0018);
        }

        // The data reference: S = 0x1080_1238.
        let (off, a) = (var.2 as usize, var.4);
        let s_a = CORE_VAR.wrapping_add(a as u64);
        let got = match t.name {
            // R_X86_64_PC32: S + A - P.
            "x86_64" => {
                let want = s_a.wrapping_sub(CORE_TEXT + off as u64) & 0xffff_ffff;
                (word_at(&text1, off, 4, big), want)
            }
            // R_AARCH64_ADR_PREL_PG_HI21: Page(S + A) - Page(P), >> 12, as immlo
            // (bits 29-30) and immhi (bits 5-23) of adrp.
            "aarch64" => {
                let pages = ((s_a & !0xfff).wrapping_sub((CORE_TEXT + off as u64) & !0xfff)) >> 12;
                let want = (word_at(&text0, off, 4, big) & 0x9f00_001f)
                    | ((pages & 3) << 29)
                    | (((pages >> 2) & 0x7ffff) << 5);
                (word_at(&text1, off, 4, big), want)
            }
            // R_PPC64_ADDR64 (in .toc): S + A.
            "ppc64le" => (word_at(&image.bytes(&obj, ".toc"), off, 8, big), s_a),
            // R_390_PC32DBL: (S + A - P) >> 1.
            _ => {
                let want = (s_a.wrapping_sub(CORE_TEXT + off as u64) >> 1) & 0xffff_ffff;
                (word_at(&text1, off, 4, big), want)
            }
        };
        assert_eq!(got.0, got.1, "{}: the reference to static_var", t.name);

        // mymod's call is untouched until mymod comes, written then, cleared when
        // it goes (x86_64: the field is zero again; ppc64le: the nop is back) and
        // written to the same bytes when it comes again.
        let m_off = modfn.2 as usize;
        assert_eq!(
            text1[m_off..m_off + 8],
            text0[m_off..m_off + 8],
            "{}",
            t.name
        );
        assert_eq!(
            write_for(arch, &mut host, &obj, &mut image, Some("mymod")),
            Ok(()),
            "{}: {:?}",
            t.name,
            host.log
        );
        let text2 = image.bytes(&obj, ".text");
        assert_ne!(
            text2[m_off..m_off + 8],
            text1[m_off..m_off + 8],
            "{}",
            t.name
        );
        let changed: Vec<usize> = (0..text2.len()).filter(|&i| text2[i] != text1[i]).collect();
        assert!(
            changed.iter().all(|&i| (m_off..m_off + 8).contains(&i)),
            "{}: mymod's write changed {changed:?}",
            t.name
        );
        clear_for(arch, &mut host, &obj, &mut image, "mymod");
        let text3 = image.bytes(&obj, ".text");
        match t.name {
            "x86_64" => assert_eq!(text3, text1, "x86_64: cleared"),
            "ppc64le" => assert_eq!(text3[m_off + 4..m_off + 8], text0[m_off + 4..m_off + 8]),
            _ => {}
        }
        assert_eq!(
            write_for(arch, &mut host, &obj, &mut image, Some("mymod")),
            Ok(())
        );
        assert_eq!(
            image.bytes(&obj, ".text"),
            text2,
            "{}: written again",
            t.name
        );
        assert!(host.log.is_empty(), "{}: {:?}", t.name, host.log);
    }
}

/// readelf's name of a relocation type → its number, for the types these tests
/// meet (x86_64 psABI §4.4, AAELF64 §5.7, ELFv2 ABI §3.5.3, s390x ELF ABI
/// supplement).
fn name_type(name: &str) -> u32 {
    match name {
        "R_X86_64_64" => 1,
        "R_X86_64_PC32" => 2,
        "R_X86_64_PLT32" => 4,
        "R_AARCH64_ABS64" => 257,
        "R_AARCH64_ADR_PREL_PG_HI21" => 275,
        "R_AARCH64_CALL26" => 283,
        "R_AARCH64_LDST32_ABS_LO12_NC" => 285,
        "R_PPC64_REL24" => 10,
        "R_PPC64_ADDR64" => 38,
        "R_390_PC32DBL" => 19,
        "R_390_PLT32DBL" => 20,
        _ => panic!("unknown type {name}"),
    }
}

/// klp-inspect on gcc's converted objects: the JSON holds what the test put in the
/// object (the manifest, the relocations as `object`'s reader sees them, the
/// addresses of the System.map), the text shows the same.
#[test]
fn klp_inspect_shows_gcc_built_patches() {
    for t in &TOOLS {
        let dir = workdir("inspect", t.name);
        let data = core_patch(&dir, t);
        let inspect = |args: &[&str]| {
            let o = Command::new(env!("CARGO_BIN_EXE_klp-inspect"))
                .args(args)
                .current_dir(&dir)
                .output()
                .unwrap();
            let err = String::from_utf8_lossy(&o.stderr);
            assert!(o.status.success() && err.is_empty(), "{}: {err}", t.name);
            String::from_utf8(o.stdout).unwrap()
        };
        let j: serde_json::Value =
            serde_json::from_str(&inspect(&["--json", "-t", "System.map", "livepatch.o"])).unwrap();
        assert_eq!(j["machine"], t.name);
        assert_eq!(j["livepatch"], true);
        assert_eq!(j["replace"], false);
        assert_eq!(j["warnings"], serde_json::json!([]), "{}", t.name);
        let hex = |v: u64| format!("{v:#x}");
        let resolved = |v: u64| serde_json::json!({"status": "resolved", "address": hex(v)});

        // The description.
        let funcs = |o: &serde_json::Value| -> Vec<(String, u64, String, serde_json::Value)> {
            o["funcs"]
                .as_array()
                .unwrap()
                .iter()
                .map(|f| {
                    (
                        f["old_name"]["name"].as_str().unwrap().to_string(),
                        f["sympos"].as_u64().unwrap(),
                        f["new_func"]["symbol"]["name"]
                            .as_str()
                            .unwrap()
                            .to_string(),
                        f["old"].clone(),
                    )
                })
                .collect()
        };
        let s = |x: &str| x.to_string();
        assert_eq!(j["objects"][0]["name"], "vmlinux");
        assert_eq!(
            funcs(&j["objects"][0]),
            [
                (
                    s("cmdline_proc_show"),
                    0,
                    s("livepatch_cmdline_proc_show"),
                    resolved(0x1060_0000)
                ),
                (s("other"), 2, s("livepatch_other"), resolved(0x1078_0000)),
            ],
            "{}",
            t.name
        );
        let cb = |o: usize, k: &str| j["objects"][o]["callbacks"][k]["symbol"]["name"].clone();
        assert_eq!(cb(0, "pre_patch"), "my_pre");
        assert_eq!(cb(0, "post_patch"), "__klp_post_patch_callback_vmlinux");
        assert!(cb(0, "pre_unpatch").is_null());
        assert_eq!(j["objects"][1]["name"], "mymod");
        assert_eq!(
            funcs(&j["objects"][1]),
            [(s("mod_fn"), 0, s("livepatch_mod_fn"), resolved(CORE_MOD_FN))]
        );
        assert_eq!(cb(1, "post_unpatch"), "my_post_unpatch");

        // Every .klp.rela entry, as object's reader sees it, with its symbol
        // parsed and resolved where the System.map puts it.
        let p = parse(&data);
        let mut want: Vec<_> = klp_entries(&p)
            .into_iter()
            .map(|(sec, _, off, ty, addend, sym)| {
                let (addr, name) = match sym.as_str() {
                    ".klp.sym.vmlinux.static_helper,0" => (CORE_HELPER, "static_helper"),
                    ".klp.sym.vmlinux.static_var,0" => (CORE_VAR, "static_var"),
                    ".klp.sym.mymod.mod_fn,0" => (CORE_MOD_FN, "mod_fn"),
                    other => panic!("{}: unexpected {other}", t.name),
                };
                (sec, off, ty, addend, sym, s(name), resolved(addr))
            })
            .collect();
        let mut got = Vec::new();
        for sec in j["sections"].as_array().unwrap() {
            for e in sec["relocations"].as_array().unwrap() {
                let ty = e["type"].as_u64().unwrap() as u32;
                assert_eq!(
                    name_type(e["type_name"].as_str().unwrap()),
                    ty,
                    "{}",
                    t.name
                );
                got.push((
                    s(sec["name"].as_str().unwrap()),
                    e["offset"].as_u64().unwrap(),
                    ty,
                    e["addend"].as_i64().unwrap(),
                    s(e["symbol"].as_str().unwrap()),
                    s(e["klp_sym"]["name"]["name"].as_str().unwrap()),
                    e["resolution"].clone(),
                ));
            }
        }
        want.sort_by(|a, b| (&a.0, a.1).cmp(&(&b.0, b.1)));
        got.sort_by(|a, b| (&a.0, a.1).cmp(&(&b.0, b.1)));
        assert_eq!(got, want, "{}", t.name);
        assert!(
            got.iter().any(|g| g.5 == "static_helper"
                && g.2 == name_type(t.call)
                && g.0 == ".klp.rela.vmlinux.text"),
            "{}",
            t.name
        );

        // The text: the description's lines and the call's row.
        let text = inspect(&["-t", "vmlinux=System.map", "livepatch.o"]);
        let line = |first: &str| -> String {
            text.lines()
                .map(|l| l.split_whitespace().collect::<Vec<_>>().join(" "))
                .find(|l| l.starts_with(first))
                .unwrap_or_else(|| panic!("{}: no {first} in:\n{text}", t.name))
        };
        assert_eq!(
            line("machine"),
            format!(
                "machine {}, {}-endian",
                t.name,
                if t.name == "s390x" { "big" } else { "little" }
            )
        );
        assert_eq!(
            line("other,2"),
            "other,2 -> livepatch_other (old: 0x10780000)"
        );
        assert_eq!(line("post_unpatch:"), "post_unpatch: my_post_unpatch");
        let call = got.iter().find(|g| g.5 == "static_helper").unwrap();
        assert!(
            text.lines().any(|l| {
                let f: Vec<&str> = l.split_whitespace().collect();
                f.len() == 7
                    && f[0] == format!("{:#x}", call.1)
                    && f[1] == t.call
                    && f[3..] == ["vmlinux", "static_helper", "0", "0x10400000"]
            }),
            "{}:\n{text}",
            t.name
        );
        assert_eq!(line("Warnings:"), "Warnings: none");
    }
}
