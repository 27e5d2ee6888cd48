//! What several simulator tests share: livepatch ELF objects written by hand.

#![allow(dead_code)]

#[path = "../../../klp/tests/common/elfbuild.rs"]
#[allow(clippy::all)]
pub mod elfbuild;

/// The ELF patch module's name.
pub const LP: &str = "elf_lp";
/// The late module it patches.
pub const BUSY: &str = "test_klp_callbacks_busy";

/// The ELF machine number, byte order and 64-bit absolute relocation type of each arch.
pub const ARCHES: [(&str, u16, bool, u32); 4] = [
    ("x86_64", 62, false, 1),
    ("aarch64", 183, false, 257),
    ("ppc64le", 21, false, 38),
    ("s390x", 22, true, 22),
];

/// [`elf_patch`] for any of the [`ARCHES`].
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
