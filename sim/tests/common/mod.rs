//! What several simulator tests share: livepatch ELF objects written by hand.

#![allow(dead_code)]

#[path = "../../../klp/tests/common/elfbuild.rs"]
#[allow(clippy::all)]
pub mod elfbuild;

/// The ELF patch module's name.
pub const LP: &str = "elf_lp";
/// The late module it patches.
pub const BUSY: &str = "test_klp_callbacks_busy";

struct Elf;

impl klp_backends::Visit for Elf {
    type Out = (&'static str, u16, bool, u32);
    fn visit<A: klp_backends::Arch>(self) -> Self::Out {
        (
            A::NAME,
            A::ELF_MACHINE,
            A::ENDIAN == klp_backends::Endian::Big,
            A::ABS64_RELOC,
        )
    }
}

/// The name, ELF machine number, byte order (big-endian?) and 64-bit absolute
/// relocation type of every back-end.
pub fn arches() -> Vec<(&'static str, u16, bool, u32)> {
    klp_backends::NAMES
        .iter()
        .filter_map(|n| klp_backends::by_name(n, Elf).ok())
        .collect()
}

/// Writes [`elf_patch_for`] of every back-end to `dir/elf/elf_lp-<arch>.ko` (what
/// `scenarios/extra/elf-*.klpt` load).
pub fn write_elf_fixtures(dir: &std::path::Path) {
    let d = dir.join("elf");
    std::fs::create_dir_all(&d).expect("fixture dir");
    for (arch, machine, big, abs64) in arches() {
        let f = d.join(format!("elf_lp-{arch}.ko"));
        std::fs::write(&f, elf_patch_for(machine, big, abs64)).expect("write fixture");
    }
}

/// [`elf_patch`] for any of the [`arches`].
pub fn elf_patch_for(machine: u16, big: bool, abs64: u32) -> Vec<u8> {
    elfbuild::patch(
        machine,
        big,
        abs64,
        &[
            (
                None,
                &[("cmdline_proc_show", 0, "livepatch_cmdline_proc_show")],
            ),
            (
                Some(BUSY),
                &[("busymod_work_func", 0, "livepatch_busymod_work_func")],
            ),
        ],
        &["__klp_post_patch_callback_test_klp_callbacks_busy"],
        &[
            ("vmlinux", "vmlinux", "cmdline_proc_show", 0),
            (BUSY, BUSY, "busymod_work_func", 0),
        ],
    )
}

/// An x86_64 livepatch object: replaces cmdline_proc_show and the busy module's
/// busymod_work_func, with a post-patch callback for the module, and keeps the
/// addresses of vmlinux's cmdline_proc_show (slot 0) and the module's busymod_work_func
/// (slot 1) in `.data.klp` through livepatch relocations.
pub fn elf_patch() -> Vec<u8> {
    elf_patch_for(62, false, 1)
}
