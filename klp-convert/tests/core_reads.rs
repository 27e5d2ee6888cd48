//! The livepatch core reads what klp-convert writes, on every architecture and
//! every host (no compiler needed): patch objects with real instructions
//! (`common/cases.rs`) are converted against a `System.map` with a manifest, then
//! parsed by `klp::elf::PatchObject`, their patch description read with
//! `klp_objects`/`klp_funcs` and compared with the manifest, and their `.klp.rela`
//! sections written by `klp::elf::reloc::write_relocs` with the arch's back-end
//! through a host whose symbol lookup answers from that same `System.map`, with the
//! patch's sections at addresses the test chose. The expected bytes are worked out
//! by hand in `common/cases.rs`.

mod common;

use common::cases::{self, DATA, TEXT, TOC};
use common::corehost::{Loaded, MapHost, clear_for, core_description, manifest_description};
use klp::elf::PatchObject;

#[test]
fn the_core_reads_the_description_and_writes_the_relocations_on_every_arch() {
    for c in cases::cases() {
        let arch = c.spec.arch;
        let out = cases::converted(&c);
        assert!(out.report.warnings.is_empty(), "{:?}", out.report.warnings);
        let obj = PatchObject::parse(&out.data).unwrap_or_else(|e| panic!("{arch:?}: {e}"));
        assert!(obj.is_livepatch(), "{arch:?}");
        assert_eq!(
            obj.modinfo().collect::<Vec<_>>(),
            ["license=GPL", "livepatch=Y", "klp_replace=Y"],
            "{arch:?}"
        );

        // The description, as the core reads it, is the manifest's; post_patch of
        // vmlinux comes from its function's name.
        let m = klp_convert::Manifest::from_json(cases::MANIFEST).unwrap();
        assert_eq!(
            core_description(&obj),
            manifest_description(&m, &[("vmlinux", 1, "__klp_post_patch_callback_vmlinux")]),
            "{arch:?}"
        );
        // Each new function is the patch's own: its symbol's value is its offset.
        for o in obj.klp_objects().unwrap() {
            let o = o.unwrap();
            for f in obj.klp_funcs(&o) {
                let f = f.unwrap();
                let at = cases::FUNCS
                    .iter()
                    .position(|n| *n == f.new_func.symbol.name)
                    .unwrap();
                assert_eq!(f.new_func.symbol.value, 32 * at as u64, "{arch:?}");
            }
        }

        // The sections the core finds: one per object and relocated section.
        let mut klp: Vec<(String, String, usize)> = obj
            .klp_relas()
            .map(|k| {
                let k = k.unwrap();
                let target = obj.section(k.target).unwrap().name.to_string();
                let n = obj.relas(k.section.index).unwrap().count();
                (k.objname.to_string(), target, n)
            })
            .collect();
        klp.sort();
        let calls_and_refs = c.relocs.len() - 1; // all but mod_fn's
        assert_eq!(
            klp,
            [
                ("mymod".to_string(), ".text".to_string(), 1),
                ("vmlinux".to_string(), ".data".to_string(), 1),
                ("vmlinux".to_string(), ".text".to_string(), calls_and_refs),
            ],
            "{arch:?}"
        );

        let at = [(".text", TEXT), (".data", DATA)];
        let toc = (arch == klp_convert::Arch::PPC64LE).then_some(TOC);
        let mut image = Loaded::load(&obj, &at, toc);
        let mut host = MapHost::from_map(cases::MAP);
        let text = |image: &Loaded| image.bytes(&obj, ".text")[..c.code.len()].to_vec();
        assert_eq!(text(&image), c.code);

        // vmlinux (present when the patch module is loaded): its sections only, one
        // lookup per livepatch symbol (static_fn,2 and static_var,0).
        let r = common::corehost::write_for(arch, &mut host, &obj, &mut image, None);
        assert_eq!(r, Ok(()), "{arch:?}: {:?}", host.log);
        assert_eq!(text(&image), c.vmlinux, "{arch:?}: vmlinux written");
        assert_eq!(image.bytes(&obj, ".data"), c.data, "{arch:?}: .data");
        assert_eq!(host.lookups.get(), 2, "{arch:?}");

        // A module the patch has no section for: nothing is written.
        let writes = image.image.writes;
        let r = common::corehost::write_for(arch, &mut host, &obj, &mut image, Some("othermod"));
        assert_eq!(r, Ok(()));
        assert_eq!(image.image.writes, writes, "{arch:?}: othermod");

        // mymod arrives: its section only.
        let r = common::corehost::write_for(arch, &mut host, &obj, &mut image, Some("mymod"));
        assert_eq!(r, Ok(()), "{arch:?}: {:?}", host.log);
        assert_eq!(text(&image), c.mymod, "{arch:?}: mymod written");
        assert_eq!(image.bytes(&obj, ".data"), c.data, "{arch:?}");
        assert_eq!(host.lookups.get(), 3, "{arch:?}");

        // mymod goes: clear_relocs undoes what the next write needs undone (x86_64
        // zeroes the field, which it refuses to write twice; ppc64le puts the nop
        // back; aarch64 and s390x overwrite the field anyway and leave it) and
        // nothing of vmlinux's.
        clear_for(arch, &mut host, &obj, &mut image, "mymod");
        let cleared = text(&image);
        match arch {
            klp_convert::Arch::X86_64 => assert_eq!(cleared, c.vmlinux),
            klp_convert::Arch::PPC64LE => {
                assert_eq!(cleared[20..24], c.code[20..24], "the nop is back");
                assert_eq!(cleared[..16], c.vmlinux[..16]);
            }
            _ => assert_eq!(cleared, c.mymod),
        }
        // ... and when it comes back, the same bytes again.
        let r = common::corehost::write_for(arch, &mut host, &obj, &mut image, Some("mymod"));
        assert_eq!(r, Ok(()), "{arch:?}: {:?}", host.log);
        assert_eq!(text(&image), c.mymod, "{arch:?}: mymod written again");
        assert!(host.log.is_empty(), "{arch:?}: {:?}", host.log);
    }
}

#[test]
fn the_core_refuses_a_converted_object_whose_target_changed() {
    // The same objects against a vmlinux that has gained a third static_fn before
    // the second: sympos 2 is now another function; one that lost its second
    // static_fn fails with the kernel's message and writes nothing.
    for c in cases::cases() {
        let arch = c.spec.arch;
        let out = cases::converted(&c);
        let obj = PatchObject::parse(&out.data).unwrap();
        let toc = (arch == klp_convert::Arch::PPC64LE).then_some(TOC);
        let mut image = Loaded::load(&obj, &[(".text", TEXT), (".data", DATA)], toc);
        let shrunk = cases::MAP.replace("0000000010400000 t static_fn\n", "");
        let mut host = MapHost::from_map(&shrunk);
        let r = common::corehost::write_for(arch, &mut host, &obj, &mut image, None);
        assert_eq!(r, Err(klp::Errno::EINVAL), "{arch:?}");
        assert_eq!(
            host.log,
            ["livepatch: symbol position 2 for symbol 'static_fn' in object 'vmlinux' not found"],
            "{arch:?}"
        );
        assert_eq!(image.image.writes, 0);
        assert_eq!(image.bytes(&obj, ".text")[..c.code.len()], c.code[..]);
    }
}
