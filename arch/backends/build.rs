//! Names the target's back-end once: `cfg(klp_arch = "<name>")`, where the name is
//! the target architecture as Rust spells it, except little-endian 64-bit powerpc,
//! which klp calls `ppc64le` (its big-endian sibling has no back-end). Crates select
//! with this cfg, never with `target_arch` (the rustix way of naming cfgs in one place).

fn main() {
    println!("cargo::rerun-if-changed=build.rs");
    println!("cargo::rustc-check-cfg=cfg(klp_arch, values(any()))");
    let arch = std::env::var("CARGO_CFG_TARGET_ARCH").unwrap_or_default();
    let endian = std::env::var("CARGO_CFG_TARGET_ENDIAN").unwrap_or_default();
    // For this crate's test that the choice matches the target.
    println!("cargo::rustc-env=KLP_TARGET_ARCH={arch}");
    let name = match (arch.as_str(), endian.as_str()) {
        ("powerpc64", "little") => "ppc64le".to_owned(),
        ("powerpc64", _) => "ppc64".to_owned(),
        _ => arch,
    };
    println!("cargo::rustc-cfg=klp_arch=\"{name}\"");
}
