//! The patch description (`.init.klp_objects` / `.init.klp_funcs`, upstream
//! klp-build's layout) read from relocatable objects in both byte orders.

mod common;

use common::elfbuild::*;
use klp::elf::PatchObject;
use klp::elf::desc::{FUNCS_SECTION, OBJECTS_SECTION};

/// An object describing: vmlinux (two functions, a pre-patch callback in the record),
/// `mymod` (one function, a post-unpatch callback found by its name).
fn described(machine: u16, big: bool, abs64: u32) -> Vec<u8> {
    let mut o = Obj::new(machine, big);
    let text = o.section(Sec {
        name: ".text".into(),
        sh_type: SHT_PROGBITS,
        flags: SHF_ALLOC | SHF_EXECINSTR,
        data: vec![0; 64],
        link: 0,
        info: 0,
        align: 16,
        entsize: 0,
    });
    let strings = b"cmdline_proc_show\0meminfo_proc_show\0mymod\0mod_fn\0".to_vec();
    let strs = o.section(Sec {
        name: ".init.klp_strings".into(),
        sh_type: SHT_PROGBITS,
        flags: SHF_ALLOC | 0x30,
        data: strings,
        link: 0,
        info: 0,
        align: 1,
        entsize: 1,
    });
    // Records: objects (2 × 64 bytes), funcs (3 × 24 bytes): pointers zero, sympos and
    // nr_funcs written in the object's byte order.
    let mut objects = vec![0u8; 128];
    let put32 = |v: &mut [u8], at: usize, x: u32| {
        v[at..at + 4].copy_from_slice(&if big {
            x.to_be_bytes()
        } else {
            x.to_le_bytes()
        })
    };
    put32(&mut objects, 56, 2);
    put32(&mut objects, 64 + 56, 1);
    let mut funcs = vec![0u8; 72];
    let put64 = |v: &mut [u8], at: usize, x: u64| {
        v[at..at + 8].copy_from_slice(&if big {
            x.to_be_bytes()
        } else {
            x.to_le_bytes()
        })
    };
    put64(&mut funcs, 16, 0);
    put64(&mut funcs, 24 + 16, 2);
    put64(&mut funcs, 48 + 16, 0);
    let objs = o.section(Sec {
        name: OBJECTS_SECTION.into(),
        sh_type: SHT_PROGBITS,
        flags: SHF_ALLOC,
        data: objects,
        link: 0,
        info: 0,
        align: 8,
        entsize: 0,
    });
    let fns = o.section(Sec {
        name: FUNCS_SECTION.into(),
        sh_type: SHT_PROGBITS,
        flags: SHF_ALLOC,
        data: funcs,
        link: 0,
        info: 0,
        align: 8,
        entsize: 0,
    });
    // Symbols: section symbols (local), then the functions (global).
    let s_strs = o.symbol(SymDef {
        name: String::new(),
        info: STB_LOCAL_SECTION,
        shndx: strs as u16,
        value: 0,
        size: 0,
    });
    let s_fns = o.symbol(SymDef {
        name: String::new(),
        info: STB_LOCAL_SECTION,
        shndx: fns as u16,
        value: 0,
        size: 0,
    });
    o.first_global = 3;
    let new_cmdline = o.symbol(SymDef {
        name: "livepatch_cmdline_proc_show".into(),
        info: STB_GLOBAL_FUNC,
        shndx: text as u16,
        value: 0,
        size: 16,
    });
    let new_meminfo = o.symbol(SymDef {
        name: "livepatch_meminfo_proc_show".into(),
        info: STB_GLOBAL_FUNC,
        shndx: text as u16,
        value: 16,
        size: 16,
    });
    let new_mod = o.symbol(SymDef {
        name: "livepatch_mod_fn".into(),
        info: STB_GLOBAL_FUNC,
        shndx: text as u16,
        value: 32,
        size: 8,
    });
    let pre = o.symbol(SymDef {
        name: "my_pre_patch".into(),
        info: STB_GLOBAL_FUNC,
        shndx: text as u16,
        value: 40,
        size: 8,
    });
    o.symbol(SymDef {
        name: "__klp_post_unpatch_callback_mymod".into(),
        info: STB_GLOBAL_FUNC,
        shndx: text as u16,
        value: 48,
        size: 8,
    });
    let obj_relas = o.relas(&[
        // vmlinux: name NULL, funcs → funcs+0, pre_patch → my_pre_patch.
        (8, s_fns, abs64, 0),
        (16, pre, abs64, 0),
        // mymod: name → "mymod" (offset 36), funcs → funcs+48.
        (64, s_strs, abs64, 36),
        (64 + 8, s_fns, abs64, 48),
    ]);
    let fn_relas = o.relas(&[
        (0, s_strs, abs64, 0),
        (8, new_cmdline, abs64, 0),
        (24, s_strs, abs64, 18),
        (32, new_meminfo, abs64, 0),
        (48, s_strs, abs64, 42),
        (56, new_mod, abs64, 0),
    ]);
    let symtab = o.symtab_index() + 2;
    o.section(Sec {
        name: ".rela.init.klp_objects".into(),
        sh_type: SHT_RELA,
        flags: SHF_INFO_LINK,
        data: obj_relas,
        link: symtab,
        info: objs,
        align: 8,
        entsize: 24,
    });
    o.section(Sec {
        name: ".rela.init.klp_funcs".into(),
        sh_type: SHT_RELA,
        flags: SHF_INFO_LINK,
        data: fn_relas,
        link: symtab,
        info: fns,
        align: 8,
        entsize: 24,
    });
    o.build()
}

#[test]
fn the_description_is_read_in_both_byte_orders() {
    for (arch, machine, big, abs64) in [
        ("x86_64", 62, false, 1),
        ("aarch64", 183, false, 257),
        ("ppc64le", 21, false, 38),
        ("s390x", 22, true, 22),
    ] {
        let file = described(machine, big, abs64);
        let obj = PatchObject::parse(&file).expect("parses");
        let objects: Vec<_> = obj
            .klp_objects()
            .expect("objects")
            .collect::<Result<_, _>>()
            .expect("records");
        assert_eq!(objects.len(), 2, "{arch}");
        let (v, m) = (&objects[0], &objects[1]);
        assert_eq!(v.name, None, "{arch}: vmlinux");
        assert_eq!(v.nr_funcs, 2);
        assert_eq!(
            v.callbacks[0].map(|p| p.symbol.name),
            Some("my_pre_patch"),
            "{arch}"
        );
        assert!(v.callbacks[1..].iter().all(Option::is_none), "{arch}");
        let vf: Vec<_> = obj.klp_funcs(v).collect::<Result<_, _>>().expect("funcs");
        assert_eq!(
            vf.iter()
                .map(|f| (f.old_name, f.new_func.symbol.name, f.sympos))
                .collect::<Vec<_>>(),
            [
                ("cmdline_proc_show", "livepatch_cmdline_proc_show", 0),
                ("meminfo_proc_show", "livepatch_meminfo_proc_show", 2)
            ],
            "{arch}"
        );
        assert_eq!(m.name, Some("mymod"), "{arch}");
        assert_eq!(
            m.callbacks[3].map(|p| p.symbol.name),
            Some("__klp_post_unpatch_callback_mymod"),
            "{arch}: by name"
        );
        let mf: Vec<_> = obj.klp_funcs(m).collect::<Result<_, _>>().expect("funcs");
        assert_eq!(mf.len(), 1);
        assert_eq!(
            (
                mf[0].old_name,
                mf[0].new_func.symbol.name,
                mf[0].new_func.symbol.value
            ),
            ("mod_fn", "livepatch_mod_fn", 32)
        );
    }
}

#[test]
fn malformed_descriptions_are_errors_not_panics() {
    let file = described(62, false, 1);
    // Every truncation and every single-byte damage: parsing and reading the whole
    // description may fail, never panic.
    for len in 0..file.len() {
        if let Ok(obj) = PatchObject::parse(&file[..len])
            && let Ok(objs) = obj.klp_objects()
        {
            for o in objs.flatten() {
                obj.klp_funcs(&o).for_each(drop);
            }
        }
    }
    let mut seed = 0x2545_f491_4f6c_dd1du64;
    for _ in 0..3000 {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        let mut f = file.clone();
        let at = (seed % f.len() as u64) as usize;
        f[at] = (seed >> 32) as u8;
        if let Ok(obj) = PatchObject::parse(&f)
            && let Ok(objs) = obj.klp_objects()
        {
            for o in objs.flatten() {
                obj.klp_funcs(&o).for_each(drop);
            }
        }
    }
}

/// Writes the fuzz target's seed objects (`klp/fuzz/seeds/loader/`): the description
/// object above and a two-object patch with livepatch relocations, for each arch.
/// `ci/fuzz` runs it before fuzzing.
#[test]
#[ignore = "writes files; run by ci/fuzz"]
fn write_fuzz_seeds() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/seeds/loader");
    std::fs::create_dir_all(&dir).expect("seed dir");
    for (arch, machine, big, abs64) in [
        ("x86_64", 62, false, 1),
        ("aarch64", 183, false, 257),
        ("ppc64le", 21, false, 38),
        ("s390x", 22, true, 22),
    ] {
        std::fs::write(
            dir.join(format!("desc-{arch}")),
            described(machine, big, abs64),
        )
        .expect("write");
        let p = common::elfbuild::patch(
            machine,
            big,
            abs64,
            &[
                (None, &[("static_fn", 2, "new_fn")]),
                (Some("mymod"), &[("mod_fn", 0, "new_mod_fn")]),
            ],
            &["__klp_pre_patch_callback_mymod"],
            &[
                ("vmlinux", "vmlinux", "static_fn", 2),
                ("vmlinux", "vmlinux", "static_var", 0),
                ("mymod", "mymod", "mod_fn", 0),
            ],
        );
        std::fs::write(dir.join(format!("patch-{arch}")), p).expect("write");
    }
}
