//! Builds the C patch targets of `tests/c_functions.rs` (`tests/c/cfuncs.c`) with the
//! target architecture's patchable function entries:
//!
//! * into an archive linked into the integration tests only (`klp_cexe_*`, part of
//!   the executable: the core's vmlinux);
//! * `tests/c/loadee.c` into an archive linked into the integration tests and the
//!   benches (`tests/loader.rs`, `benches/patchfile.rs`), and the patch object
//!   `tests/c/loadfix.c` (not linked: its path is `KLP_LOADFIX_O`);
//! * into the shared object `$OUT_DIR/libklpcfun.so` (`klp_cso_*`), whose path the
//!   tests get as `KLP_CFUN_SO` and load with `Process::dlopen` (a module named
//!   `libklpcfun`).
//!
//! The compiler is the C compiler of the target (`cc` picks the cross compiler, e.g.
//! `aarch64-linux-gnu-gcc`). On architectures without a klp back-end nothing is built.

use std::path::Path;

/// The gcc flags of the target's back-end: a patch site (`Arch::SITE_FLAGS`, the
/// sites `redirect::sites::find` recognises) and walkable stacks
/// (`Arch::WALK_CFLAGS`).
struct CFlags;

impl klp_backends::Visit for CFlags {
    type Out = (&'static str, &'static str);
    fn visit<A: klp_backends::Arch>(self) -> Self::Out {
        (A::SITE_FLAGS, A::WALK_CFLAGS)
    }
}

/// `(site flags, walk flags)` of the target's back-end; `None` without one.
fn target_flags(arch: &str, endian: &str) -> Option<(Vec<&'static str>, Vec<&'static str>)> {
    let name = klp_backends::target_name(arch, endian);
    let (site, walk) = klp_backends::by_name(name, CFlags).ok()?;
    Some((
        site.split_whitespace()
            .chain(walk.split_whitespace())
            .collect(),
        walk.split_whitespace().collect(),
    ))
}

fn build(src: &str, prefix: &str, flags: &[&str]) -> cc::Build {
    let mut b = cc::Build::new();
    b.file(src)
        .opt_level(2)
        .pic(true)
        .cargo_metadata(false)
        .define("KLP_CPFX", prefix)
        .flag("-fno-omit-frame-pointer");
    for f in flags {
        b.flag(f);
    }
    b
}

/// The flags a patch object is compiled with: position-independent code, so that its
/// references to another object's data go through the GOT (an address slot of the
/// loader's, reaching any distance; references to the program's own symbols
/// klp-convert relaxes into direct ones) — ppc64le reaches everything through its TOC
/// anyway, its default — and what the back-end's stack walk needs.
fn patch_flags(arch: &str, walk: &[&'static str]) -> Vec<&'static str> {
    let pic: &[&str] = if arch == "powerpc64" { &[] } else { &["-fPIC"] };
    pic.iter().chain(walk).copied().collect()
}

/// Builds `src` (names prefixed with `prefix`) into the shared object `so` with
/// `flags`, its path in `env`.
fn shared_object(src: &str, prefix: &str, so: &Path, flags: &[&str], sanitize: &str, env: &str) {
    let mut cmd = build(src, prefix, flags).get_compiler().to_command();
    // Under AddressSanitizer cc instruments the C code too (`-fsanitize=address`),
    // which suits the archives linked into the Rust tests (rustc links its runtime
    // there), but gcc would link a shared object against its own dynamic `libasan`,
    // which refuses to load beside the Rust program's static runtime ("ASan runtime
    // does not come first"): shared objects stay plain.
    if sanitize.split(',').any(|s| s == "address") {
        cmd.arg("-fno-sanitize=address");
    }
    let name = so
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    cmd.arg(format!("-DKLP_CPFX={prefix}"))
        .args(["-shared", &format!("-Wl,-soname,{name}"), "-o"])
        .arg(so)
        .arg(src);
    run_cc(&mut cmd, so, env);
}

/// Runs the C compiler command `cmd` that builds `out`, and hands `out`'s path to the
/// tests in `env`.
fn run_cc(cmd: &mut std::process::Command, out: &Path, env: &str) {
    let status = cmd
        .status()
        .unwrap_or_else(|e| panic!("cannot run the C compiler ({cmd:?}): {e}"));
    assert!(
        status.success(),
        "building {} failed: {cmd:?}",
        out.display()
    );
    println!("cargo:rustc-env={env}={}", out.display());
}

fn main() {
    let src = "tests/c/cfuncs.c";
    println!("cargo:rerun-if-changed={src}");
    println!("cargo:rerun-if-changed=tests/c/loadee.c");
    println!("cargo:rerun-if-changed=tests/c/loadfix.c");
    println!("cargo:rerun-if-changed=tests/c/loadlib.c");
    println!("cargo:rerun-if-changed=tests/c/mcount_ppc64le.h");
    println!("cargo:rerun-if-changed=build.rs");
    let var = |k: &str| std::env::var(k).unwrap_or_default();
    // A sanitizer that intercepts `pthread_create` (`-Zsanitizer=address|thread|…`,
    // ci/test's ASan and TSan runs): the interposer in `thread.rs` must forward to the
    // sanitizer's interceptor rather than to the C library's function.
    // (Cargo sets `CARGO_CFG_SANITIZE` from `-Zsanitizer`, with a nightly rustc only.)
    // ThreadSanitizer also has klp's text writes hidden from it (`klp_tsan`, see
    // `redirect/text.rs`).
    println!("cargo::rustc-check-cfg=cfg(klp_sanitizer)");
    println!("cargo::rustc-check-cfg=cfg(klp_tsan)");
    let sanitize = var("CARGO_CFG_SANITIZE");
    if sanitize
        .split(',')
        .any(|s| matches!(s, "address" | "thread" | "memory" | "leak"))
    {
        println!("cargo:rustc-cfg=klp_sanitizer");
    }
    if sanitize.split(',').any(|s| s == "thread") {
        println!("cargo:rustc-cfg=klp_tsan");
    }
    // The target's back-end as klp-backends names it, `cfg(klp_arch = "<name>")`: the
    // tests and benches select their per-back-end checks with it, never with
    // `target_arch` (KLP_ARCH, the same name, lets a test check the choice).
    let names: Vec<String> = klp_backends::NAMES
        .iter()
        .map(|n| format!("\"{n}\""))
        .collect();
    println!(
        "cargo::rustc-check-cfg=cfg(klp_arch, values({}))",
        names.join(", ")
    );
    let backend = klp_backends::target_name(
        &var("CARGO_CFG_TARGET_ARCH"),
        &var("CARGO_CFG_TARGET_ENDIAN"),
    )
    .to_owned();
    println!("cargo::rustc-cfg=klp_arch=\"{backend}\"");
    println!("cargo::rustc-env=KLP_ARCH={backend}");
    if var("CARGO_CFG_TARGET_ARCH") == "x86_64" && var("CARGO_CFG_TARGET_OS") == "linux" {
        // Keep the relocations in klp-user's own executables (tests, benches,
        // binaries): `redirect::callsites` finds the direct calls of a function in
        // them.
        println!("cargo:rustc-link-arg=-Wl,--emit-relocs");
    }
    let Some((flags, walk)) = target_flags(
        &var("CARGO_CFG_TARGET_ARCH"),
        &var("CARGO_CFG_TARGET_ENDIAN"),
    ) else {
        return;
    };
    let flags = &flags[..];
    if var("CARGO_CFG_TARGET_OS") != "linux" {
        return;
    }
    let out_dir = var("OUT_DIR");
    let out = Path::new(&out_dir);

    build(src, "klp_cexe_", flags).compile("klpcfun_static");
    let archive = out.join("libklpcfun_static.a");
    println!("cargo:rustc-link-arg-tests={}", archive.display());

    // tests/loader.rs: a target linked into the tests, and a patch object (not linked).
    build("tests/c/loadee.c", "klp_loadee_", flags).compile("klploadee");
    println!(
        "cargo:rustc-link-arg-tests={}",
        out.join("libklploadee.a").display()
    );
    // benches/patchfile.rs: the same target, patched from a file by `klpctl load`.
    println!(
        "cargo:rustc-link-arg-benches={}",
        out.join("libklploadee.a").display()
    );
    let fix = out.join("loadfix.o");
    let mut cmd = cc::Build::new()
        .opt_level(2)
        .cargo_metadata(false)
        .flag("-fno-omit-frame-pointer")
        .get_compiler()
        .to_command();
    if sanitize.split(',').any(|s| s == "address" || s == "thread") {
        cmd.arg("-fno-sanitize=all");
    }
    cmd.args(patch_flags(&var("CARGO_CFG_TARGET_ARCH"), &walk))
        .args(["-c", "tests/c/loadfix.c", "-o"])
        .arg(&fix);
    run_cc(&mut cmd, &fix, "KLP_LOADFIX_O");

    shared_object(
        "tests/c/loadlib.c",
        "klp_x_",
        &out.join("libklploadlib.so"),
        flags,
        &sanitize,
        "KLP_LOADLIB_SO",
    );
    shared_object(
        src,
        "klp_cso_",
        &out.join("libklpcfun.so"),
        flags,
        &sanitize,
        "KLP_CFUN_SO",
    );
}
