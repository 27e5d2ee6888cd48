//! libklp.so gets a SONAME, so that a program linked with `-lklp` records
//! `libklp.so` (not the path it was linked against) and finds the installed library.

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    if std::env::var("CARGO_CFG_TARGET_OS").as_deref() == Ok("linux") {
        println!("cargo:rustc-cdylib-link-arg=-Wl,-soname,libklp.so");
    }
}
