//! klp-inline on real compiler output: the programs of tests/c built with gcc (the
//! machine's, which must be there) and with the cross compilers for aarch64, ppc64le
//! and s390x (big-endian) when they are installed (a note otherwise).

mod common;

use common::{Dir, build, have, symbol};
use klp_inline::{Analysis, Caller, Inlined, warning};

/// The names of `callers`.
fn names(callers: &[Caller]) -> Vec<&str> {
    callers.iter().map(|c| c.name.as_str()).collect()
}

fn show(what: &str, a: &Analysis, funcs: &[&str]) {
    for f in funcs {
        let i = a.inlined_into(f);
        println!("{what}: {f}: {i:x?}");
        if let Some(w) = warning(f, "the program", &i) {
            println!("{what}: warning: {w}");
        }
    }
}

/// Checks what inlined.c compiled with -g must show on any architecture.
fn check_inlined_c(what: &str, elf: &[u8]) -> Analysis {
    let a = Analysis::new(elf).unwrap_or_else(|e| panic!("{what}: {e}"));
    show(what, &a, &["compute", "leaf", "mid", "gcalled", "worker"]);
    assert!(a.has_debug_info(), "{what}");

    let c = a.inlined_into("compute");
    assert!(c.debug_info, "{what}");
    assert_eq!(names(&c.callers), ["worker"], "{what}: compute's callers");
    assert!(c.clones.is_empty(), "{what}: {c:?}");
    // The caller's range is its symbol's.
    let worker = symbol(elf, "worker");
    assert_eq!(worker.len(), 1, "{what}");
    let (addr, size) = worker[0];
    assert_eq!(
        c.callers[0].range,
        Some((addr, addr + size)),
        "{what}: worker's range"
    );
    assert_eq!(
        warning("compute", "the program", &c).as_deref(),
        Some(
            "'compute' is inlined into 'worker' of the program: those keep the old code; patch them too (klp-convert --patch-callers) or build 'compute' with __attribute__((noinline))"
        ),
        "{what}"
    );

    // Nested inlining: both copies are in top's code.
    assert_eq!(
        names(&a.inlined_into("leaf").callers),
        ["top"],
        "{what}: leaf"
    );
    assert_eq!(
        names(&a.inlined_into("mid").callers),
        ["top"],
        "{what}: mid"
    );

    // Called, never inlined.
    for f in ["gcalled", "worker", "other"] {
        let i = a.inlined_into(f);
        assert!(i.debug_info, "{what}: {f}");
        assert!(i.callers.is_empty(), "{what}: {f}: {i:?}");
        assert_eq!(warning(f, "the program", &i), None, "{what}: {f}");
    }

    // Unknown to the binary.
    let none = a.inlined_into("no_such_function");
    assert_eq!(none, Inlined::default(), "{what}");
    assert_eq!(warning("no_such_function", "the program", &none), None);
    a
}

#[test]
fn gcc_program_with_debug_info() {
    let dir = Dir::new("prog-g");
    let elf = build(
        "gcc",
        &["inlined.c"],
        &["-O2", "-g", "-DWITH_MAIN", "-Wl,--emit-relocs"],
        &dir,
        "prog",
    );
    let a = check_inlined_c("gcc -O2 -g", &elf);
    assert!(a.has_relocations());

    // A global function inlined into its only caller: its copy stays, uncalled.
    let g = a.inlined_into("gsmall");
    println!("gsmall: {g:?}");
    assert_eq!(names(&g.callers), ["guser"]);
    assert_eq!(g.direct_calls, Some(0));
    // A global function called once, by gcaller.
    assert_eq!(a.inlined_into("gcalled").direct_calls, Some(1));
    assert_eq!(a.inlined_into("worker").direct_calls, Some(1));
}

#[test]
fn gcc_program_without_debug_info() {
    let dir = Dir::new("prog");
    let elf = build(
        "gcc",
        &["inlined.c"],
        &["-O2", "-DWITH_MAIN", "-Wl,--emit-relocs"],
        &dir,
        "prog",
    );
    let a = Analysis::new(&elf).expect("analysis");
    show("gcc -O2", &a, &["compute", "gsmall", "gcalled"]);
    assert!(!a.has_debug_info());
    assert!(a.has_relocations());

    let c = a.inlined_into("compute");
    assert!(!c.debug_info);
    assert!(c.callers.is_empty());
    // A local function's calls in its own section leave no relocation (x86_64).
    assert_eq!(c.direct_calls, None);
    assert_eq!(warning("compute", "the program", &c), None);

    let g = a.inlined_into("gsmall");
    assert!(!g.debug_info);
    assert_eq!(g.direct_calls, Some(0));
    assert_eq!(
        warning("gsmall", "the program", &g).as_deref(),
        Some(
            "no direct call reaches 'gsmall' in the program: it may have been inlined everywhere, where the patch does not take effect; build with -g to see where"
        )
    );
    let k = a.inlined_into("gcalled");
    assert_eq!(k.direct_calls, Some(1));
    assert_eq!(warning("gcalled", "the program", &k), None);
}

#[test]
fn gcc_program_without_kept_relocations() {
    let dir = Dir::new("prog-norel");
    let elf = build(
        "gcc",
        &["inlined.c"],
        &["-O2", "-g", "-DWITH_MAIN"],
        &dir,
        "prog",
    );
    let a = Analysis::new(&elf).expect("analysis");
    assert!(!a.has_relocations());
    let g = a.inlined_into("gsmall");
    assert_eq!(g.direct_calls, None);
    assert_eq!(names(&g.callers), ["guser"]);
}

#[test]
fn gcc_dwarf4_shared_object() {
    let dir = Dir::new("so-dwarf4");
    let elf = build(
        "gcc",
        &["inlined.c"],
        &["-O2", "-gdwarf-4", "-shared", "-fPIC", "-nostdlib"],
        &dir,
        "lib.so",
    );
    check_inlined_c("gcc -O2 -gdwarf-4 -shared", &elf);
}

/// clones.c: `compute.constprop.0` called by a and b; `part` partially inlined into
/// p1 and p2, which call `part.part.0`.
fn check_clones(what: &str, a: &Analysis) {
    show(what, a, &["compute", "part"]);
    let c = a.inlined_into("compute");
    assert!(c.callers.is_empty(), "{what}: {c:?}");
    assert_eq!(c.clones.len(), 1, "{what}: {c:?}");
    assert_eq!(c.clones[0].name, "compute.constprop.0", "{what}");
    assert_eq!(names(&c.clones[0].callers), ["a", "b"], "{what}");
    assert_eq!(
        warning("compute", "the program", &c).as_deref(),
        Some(
            "'compute' has a clone 'compute.constprop.0' in the program, called by 'a' and 'b': those keep the old code; patch them too (klp-convert --patch-callers) or build 'compute' with __attribute__((noipa))"
        ),
        "{what}"
    );
}

#[test]
fn gcc_clones() {
    for debug in ["-g", "-gdwarf-4"] {
        let dir = Dir::new(&format!("clones{debug}"));
        let elf = build(
            "gcc",
            &["clones.c"],
            &["-O3", debug, "-shared", "-fPIC", "-nostdlib"],
            &dir,
            "clones.so",
        );
        let what = format!("gcc -O3 {debug}");
        let a = Analysis::new(&elf).expect("analysis");
        check_clones(&what, &a);
        let p = a.inlined_into("part");
        assert_eq!(names(&p.callers), ["p1", "p2"], "{what}");
        assert_eq!(p.clones.len(), 1, "{what}: {p:?}");
        assert_eq!(p.clones[0].name, "part.part.0", "{what}");
        assert_eq!(names(&p.clones[0].callers), ["p1", "p2"], "{what}");
        assert_eq!(
            warning("part", "library 'libclones'", &p).as_deref(),
            Some(
                "'part' is inlined into 'p1' and 'p2' of library 'libclones', and its clone 'part.part.0' is called from those copies: those keep the old code; patch them too (klp-convert --patch-callers) or build 'part' with __attribute__((noipa))"
            ),
            "{what}"
        );
    }
}

#[test]
fn gcc_clones_without_debug_info() {
    let dir = Dir::new("clones-nog");
    let elf = build(
        "gcc",
        &["clones.c"],
        &["-O3", "-shared", "-fPIC", "-nostdlib", "-Wl,--emit-relocs"],
        &dir,
        "clones.so",
    );
    let a = Analysis::new(&elf).expect("analysis");
    show("gcc -O3", &a, &["compute"]);
    let c = a.inlined_into("compute");
    assert!(!c.debug_info);
    assert_eq!(c.clones.len(), 1);
    assert_eq!(c.clones[0].name, "compute.constprop.0");
    // x86_64: the local calls left no relocation.
    assert!(c.clones[0].callers.is_empty(), "{c:?}");
    assert_eq!(
        warning("compute", "the program", &c).as_deref(),
        Some(
            "'compute' has a clone 'compute.constprop.0' in the program, whose callers are not known: those keep the old code; patch them too (klp-convert --patch-callers) or build 'compute' with __attribute__((noipa)) (build with -g to see every caller)"
        )
    );
}

#[test]
fn gcc_lto_across_units() {
    let dir = Dir::new("lto");
    let elf = build(
        "gcc",
        &["lto_a.c", "lto_b.c"],
        &["-O2", "-g", "-flto"],
        &dir,
        "lto",
    );
    let a = Analysis::new(&elf).expect("analysis");
    show("gcc -O2 -g -flto", &a, &["helper"]);
    let h = a.inlined_into("helper");
    assert!(h.debug_info);
    assert_eq!(names(&h.callers), ["user"]);
}

#[test]
fn gxx_method_by_linkage_name() {
    if !have("g++") {
        println!("note: g++ is missing: the C++ case is not run");
        return;
    }
    let dir = Dir::new("cxx");
    let elf = build(
        "g++",
        &["method.cc"],
        &["-O2", "-g", "-shared", "-fPIC", "-nostdlib"],
        &dir,
        "method.so",
    );
    let a = Analysis::new(&elf).expect("analysis");
    show("g++ -O2 -g", &a, &["_ZN1S1fEi"]);
    let m = a.inlined_into("_ZN1S1fEi");
    assert!(m.debug_info);
    assert_eq!(names(&m.callers), ["_Z3useP1Si"]);
    // The short name is not the symbol's.
    assert!(a.inlined_into("f").callers.is_empty());
}

/// inlined.c and clones.c with a cross compiler, as shared objects (no C library
/// needed); `None` when the compiler is missing.
fn cross(arch: &str) -> Option<(Vec<u8>, Vec<u8>, Dir)> {
    let cc = format!("{arch}-linux-gnu-gcc");
    if !have(&cc) {
        println!("note: {cc} is missing: {arch} is not checked");
        return None;
    }
    let dir = Dir::new(arch);
    let so = build(
        &cc,
        &["inlined.c"],
        &[
            "-O2",
            "-g",
            "-shared",
            "-fPIC",
            "-nostdlib",
            "-Wl,--emit-relocs",
        ],
        &dir,
        "lib.so",
    );
    let clones = build(
        &cc,
        &["clones.c"],
        &["-O3", "-shared", "-fPIC", "-nostdlib", "-Wl,--emit-relocs"],
        &dir,
        "clones.so",
    );
    Some((so, clones, dir))
}

#[test]
fn aarch64_cross() {
    let Some((so, _, _dir)) = cross("aarch64") else {
        return;
    };
    let a = check_inlined_c("aarch64-linux-gnu-gcc -O2 -g", &so);
    // Called through its PLT entry: the relocation names it.
    assert_eq!(a.inlined_into("gcalled").direct_calls, Some(1));
}

#[test]
fn ppc64le_cross() {
    let Some((so, _, _dir)) = cross("powerpc64le") else {
        return;
    };
    let a = check_inlined_c("powerpc64le-linux-gnu-gcc -O2 -g", &so);
    assert_eq!(a.inlined_into("gcalled").direct_calls, Some(1));
}

#[test]
fn s390x_cross_big_endian() {
    let Some((so, clones, _dir)) = cross("s390x") else {
        return;
    };
    let a = check_inlined_c("s390x-linux-gnu-gcc -O2 -g", &so);
    assert_eq!(a.inlined_into("gcalled").direct_calls, Some(1));
    // s390x's assembler keeps the relocation of a local call: other's call counts.
    assert_eq!(a.inlined_into("compute").direct_calls, Some(1));
    // So the callers of a clone are known without -g.
    let c = Analysis::new(&clones).expect("analysis");
    assert!(!c.has_debug_info());
    check_clones("s390x-linux-gnu-gcc -O3", &c);
}
