//! Livepatch modules loaded from ELF files: a patch for vmlinux and for a module that
//! arrives late, whose livepatch relocation section is written when the module arrives
//! and undone when it goes — twice in a row.

mod common;

use common::{BUSY, LP, elf_patch, elfbuild};
use klp::Errno;
use klp_sim::Kernel;
use klp_sim::kernel::ModError;

fn slots(k: &Kernel) -> (u64, u64) {
    let img = &k.world.elf_images[LP];
    let d = img.section_by_name(".data.klp").expect("loaded");
    let w = |i: usize| u64::from_le_bytes(d[8 * i..8 * i + 8].try_into().unwrap());
    (w(0), w(1))
}

fn tail(k: &Kernel, from: usize) -> Vec<String> {
    k.world.dmesg[from..]
        .iter()
        .map(|(_, l)| l.clone())
        .collect()
}

#[test]
fn a_late_module_gets_its_relocations_on_arrival_and_loses_them_on_removal_twice() {
    let mut k = Kernel::boot(2);
    k.add_elf_module(LP, elf_patch());
    k.insmod_cmd(LP, &[]).expect("the ELF patch loads");
    k.sleep_secs(2.0);
    assert!(k.klp.transition_patch().is_none(), "patching completed");
    let cmdline = k
        .world
        .addr_of(None, "cmdline_proc_show")
        .expect("vmlinux function");
    assert_eq!(
        slots(&k),
        (cmdline, 0),
        "vmlinux's section is written at load, the module's is not"
    );
    assert_eq!(
        k.read_file("/proc/cmdline").expect("cat"),
        "elf_lp: livepatch_cmdline_proc_show\n"
    );
    for round in 0..2 {
        let n = k.world.dmesg.len();
        k.insmod_cmd(BUSY, &[]).expect("the late module loads");
        let busy = k
            .world
            .addr_of(Some(BUSY), "busymod_work_func")
            .expect("module function");
        assert_eq!(
            slots(&k),
            (cmdline, busy),
            "round {round}: written on arrival"
        );
        let log = tail(&k, n);
        assert!(
            log.contains(&format!(
                "livepatch: applying patch '{LP}' to loading module '{BUSY}'"
            )),
            "{log:#?}"
        );
        assert!(
            log.contains(&format!(
                "{LP}: __klp_post_patch_callback_test_klp_callbacks_busy {BUSY}"
            )),
            "{log:#?}"
        );
        let n = k.world.dmesg.len();
        k.rmmod_cmd(BUSY).expect("the module goes");
        assert_eq!(slots(&k), (cmdline, 0), "round {round}: undone on removal");
        assert!(
            tail(&k, n).contains(&format!(
                "livepatch: reverting patch '{LP}' on unloading module '{BUSY}'"
            )),
            "{:#?}",
            tail(&k, n)
        );
        k.check_invariants().expect("invariants");
    }
    k.write_file(&format!("/sys/kernel/livepatch/{LP}/enabled"), "0")
        .expect("disable");
    k.sleep_secs(2.0);
    assert!(k.klp.transition_patch().is_none());
    k.rmmod_cmd(LP).expect("the patch module goes");
    assert!(!k.world.elf_images.contains_key(LP));
    assert_ne!(
        k.read_file("/proc/cmdline").expect("cat"),
        "elf_lp: livepatch_cmdline_proc_show\n"
    );
}

#[test]
fn a_malformed_or_unresolvable_elf_patch_is_refused_and_leaves_nothing() {
    let cases: Vec<(Vec<u8>, Errno, &str)> = vec![
        (
            elf_patch()[..100].to_vec(),
            Errno::ENOEXEC,
            "elf_lp: the file ends inside the section headers",
        ),
        (
            elfbuild::patch(
                62,
                false,
                1,
                &[(None, &[("cmdline_proc_show", 0, "n")])],
                &[],
                &[("vmlinux", "vmlinux", "no_such_symbol", 0)],
            ),
            Errno::EINVAL,
            "livepatch: symbol 'no_such_symbol' not found in symbol table",
        ),
        (
            // A module-specific section reaching a vmlinux symbol is refused at load.
            elfbuild::patch(
                62,
                false,
                1,
                &[(None, &[("cmdline_proc_show", 0, "n")])],
                &[],
                &[
                    ("vmlinux", "vmlinux", "cmdline_proc_show", 0),
                    ("mymod", "vmlinux", "cmdline_proc_show", 0),
                ],
            ),
            Errno::EINVAL,
            "",
        ),
        (
            elfbuild::patch(
                22,
                true,
                22,
                &[(None, &[("cmdline_proc_show", 0, "n")])],
                &[],
                &[],
            ),
            Errno::ENOEXEC,
            "Invalid architecture in ELF header: 22",
        ),
    ];
    for (i, (file, want, line)) in cases.into_iter().enumerate() {
        let mut k = Kernel::boot(2);
        let before = k.snapshot();
        k.add_elf_module(LP, file);
        let n = k.world.dmesg.len();
        let r = k.insmod_cmd(LP, &[]);
        let log = tail(&k, n);
        match (i, r) {
            // The third: the vmlinux slot is written at load; the module-specific one
            // only when "mymod" arrives — and then it is refused.
            (2, Ok(())) => {
                k.sleep_secs(2.0);
                continue;
            }
            (_, Err(ModError::Errno(e))) => assert_eq!(e, want, "case {i}: {log:#?}"),
            (_, other) => panic!("case {i}: {other:?} {log:#?}"),
        }
        k.run_due_works();
        let after = k.snapshot();
        assert_eq!(after, before, "case {i}: state changed");
        assert!(
            log.iter().any(|l| l.starts_with(line)),
            "case {i}: want {line:?} in {log:#?}"
        );
    }
}

/// `load_module`'s order, as measured on a real kernel: parameters are parsed after
/// the livepatch arrival step, so their warnings follow its lines; a rejected
/// parameter finds the module already patched, and it leaves through the going path
/// before insmod reports the error.
#[test]
fn parameters_are_parsed_after_the_livepatch_arrival() {
    let mut k = Kernel::boot(2);
    k.insmod_cmd("test_klp_callbacks_demo", &[]).expect("patch");
    k.sleep_secs(2.0);
    let n = k.world.dmesg.len();
    k.insmod_cmd(BUSY, &["nosuch=1"])
        .expect("an unknown parameter is ignored");
    let log = tail(&k, n);
    let applying = log
        .iter()
        .position(|l| {
            l == &format!(
                "livepatch: applying patch 'test_klp_callbacks_demo' to loading module '{BUSY}'"
            )
        })
        .unwrap_or_else(|| panic!("{log:#?}"));
    let unknown = log
        .iter()
        .position(|l| l == &format!("{BUSY}: unknown parameter 'nosuch' ignored"))
        .unwrap_or_else(|| panic!("{log:#?}"));
    assert!(applying < unknown, "{log:#?}");
    k.rmmod_cmd(BUSY).expect("rmmod");

    let before = k.snapshot();
    let n = k.world.dmesg.len();
    assert_eq!(
        k.insmod_cmd(BUSY, &["block_transition=maybe"]),
        Err(ModError::Errno(Errno::EINVAL))
    );
    let log = tail(&k, n);
    let want = [
        format!("livepatch: applying patch 'test_klp_callbacks_demo' to loading module '{BUSY}'"),
        format!("{BUSY}: 'maybe' invalid for parameter 'block_transition'"),
        format!(
            "livepatch: reverting patch 'test_klp_callbacks_demo' on unloading module '{BUSY}'"
        ),
    ];
    let mut at = 0;
    for w in &want {
        at += log[at..]
            .iter()
            .position(|l| l == w)
            .unwrap_or_else(|| panic!("{w} in {log:#?}"));
    }
    assert!(!k.world.modules.contains_key(BUSY));
    assert_eq!(k.snapshot(), before, "the refused module left nothing");
}

/// Every back-end's patch object reads back as a livepatch object for its machine.
#[test]
fn every_back_end_has_a_patch_object() {
    let all = common::arches();
    assert_eq!(all.len(), klp_backends::NAMES.len());
    for (arch, machine, _, abs64) in all {
        assert_ne!(abs64, 0, "{arch}: no 64-bit absolute relocation type");
        let o = common::elf_patch_for(machine, false, abs64);
        assert!(o.len() > 64, "{arch}");
    }
}
