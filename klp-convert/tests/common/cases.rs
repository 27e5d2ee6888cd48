//! Patch objects with real instructions for each of the four architectures, the
//! target they patch (a `System.map` with `[mymod]` lines, addresses chosen here)
//! and a manifest describing the patch: converted by klp-convert, then loaded,
//! resolved and relocated by the livepatch core (`tests/core_reads.rs`) and shown by
//! klp-inspect (`tests/inspect.rs`).
//!
//! `.text` holds six functions of 32 bytes: `new_fn` @0 (the code below), `new_fn2`
//! @32, `new_mod` @64, `pre_cb` @96, `__klp_post_patch_callback_vmlinux` @128 (a
//! callback by its name) and `post_cb` @160. `new_fn` calls `static_fn` (a static
//! function of vmlinux, the second of two: the manifest picks sympos 2), reads
//! `static_var` (a static variable of vmlinux) and calls `mod_fn` (a static function
//! of module `mymod`). `.data` holds a pointer to `static_var + 8`.

use object::elf;
use object::write::{Object, Relocation, Symbol, SymbolSection};
use object::{FileFlags, RelocationFlags, SectionKind, SymbolFlags, SymbolKind, SymbolScope};

use super::{AARCH64, ArchSpec, PPC64LE, S390X, X86_64};

/// Where the test loads the patch module's `.text`.
pub const TEXT: u64 = 0x1000_0000;
/// Where it loads `.data` (and ppc64le's `.toc`, which this patch has none of).
pub const DATA: u64 = 0x1000_1000;
/// ppc64le: the patch module's TOC pointer (r2).
pub const TOC: u64 = 0x1001_8000;
/// vmlinux's two `static_fn`, in System.map order: sympos 1 and 2.
pub const STATIC_FN_1: u64 = 0x1020_0000;
pub const STATIC_FN_2: u64 = 0x1040_0000;
/// vmlinux's `show` (replaced by `new_fn`).
pub const SHOW: u64 = 0x1060_0000;
/// vmlinux's `static_var` (8-aligned: aarch64's scaled `ldr` field, s390x's `larl`).
pub const STATIC_VAR: u64 = 0x1080_1238;
/// mymod's `mod_fn` and `mod_old`.
pub const MOD_FN: u64 = 0x10c0_0000;
pub const MOD_OLD: u64 = 0x10d0_0000;

/// The target: vmlinux's lines, then mymod's (kallsyms' `[module]` tags).
pub const MAP: &str = "0000000010200000 t static_fn\n\
                       0000000010400000 t static_fn\n\
                       0000000010600000 T show\n\
                       0000000010801238 d static_var\n\
                       0000000010c00000 t mod_fn [mymod]\n\
                       0000000010d00000 T mod_old [mymod]\n";

/// The manifest: the second `static_fn`; vmlinux's `show` and second `static_fn`
/// replaced, a pre-patch callback; mymod's `mod_old` replaced, a post-unpatch
/// callback; atomic replace.
pub const MANIFEST: &str = r#"{"symbols": {"static_fn": {"sympos": 2}},
 "patch": {"objects": [
   {"object": "vmlinux",
    "funcs": [{"old": "show", "new": "new_fn"},
              {"old": "static_fn", "new": "new_fn2", "sympos": 2}],
    "callbacks": {"pre_patch": "pre_cb"}},
   {"object": "mymod", "funcs": [{"old": "mod_old", "new": "new_mod"}],
    "callbacks": {"post_unpatch": "post_cb"}}],
  "replace": true}}"#;

/// The patch's defined functions, in `.text` order, 32 bytes each.
pub const FUNCS: [&str; 6] = [
    "new_fn",
    "new_fn2",
    "new_mod",
    "pre_cb",
    "__klp_post_patch_callback_vmlinux",
    "post_cb",
];

/// One architecture's `new_fn` and what the core must make of it.
pub struct Case {
    pub spec: ArchSpec,
    /// `new_fn`'s code as compiled (relocated fields zero).
    pub code: Vec<u8>,
    /// Its relocations: (offset, type, addend, symbol).
    pub relocs: Vec<(u64, u32, i64, &'static str)>,
    /// The code once vmlinux's relocations are written.
    pub vmlinux: Vec<u8>,
    /// The code once mymod's are written too.
    pub mymod: Vec<u8>,
    /// `.data` once written: `static_var + 8` = 0x1080_1240 in the arch's byte order
    /// (every arch's 64-bit absolute type is S + A).
    pub data: [u8; 8],
}

fn le32(words: &[u32]) -> Vec<u8> {
    words.iter().flat_map(|w| w.to_le_bytes()).collect()
}

/// The four cases. The instruction encodings are those of the golden test in
/// `tests/toolchain.rs` (Intel SDM, Arm ARM, Power ISA, z/Architecture PoO); each
/// expected field is worked out by hand below with the psABI's formula, with
/// P = TEXT + offset.
pub fn cases() -> Vec<Case> {
    vec![
        // x86_64: call rel32 (e8) @0, field @1; mov 0x0(%rip),%eax (8b 05) @5, field
        // @7; call @11, field @12; ret @16. R_X86_64_PLT32 (4) and R_X86_64_PC32 (2)
        // are both L/S + A - P with A = -4 (the displacement counts from the next
        // instruction):
        //   static_fn: 0x1040_0000 - 4 - 0x1000_0001 = 0x003f_fffb
        //   static_var: 0x1080_1238 - 4 - 0x1000_0007 = 0x0080_122d
        //   mod_fn: 0x10c0_0000 - 4 - 0x1000_000c = 0x00bf_fff0
        Case {
            spec: X86_64,
            code: vec![
                0xe8, 0, 0, 0, 0, 0x8b, 0x05, 0, 0, 0, 0, 0xe8, 0, 0, 0, 0, 0xc3,
            ],
            relocs: vec![
                (1, 4, -4, "static_fn"),
                (7, 2, -4, "static_var"),
                (12, 4, -4, "mod_fn"),
            ],
            vmlinux: vec![
                0xe8, 0xfb, 0xff, 0x3f, 0x00, 0x8b, 0x05, 0x2d, 0x12, 0x80, 0x00, 0xe8, 0, 0, 0, 0,
                0xc3,
            ],
            mymod: vec![
                0xe8, 0xfb, 0xff, 0x3f, 0x00, 0x8b, 0x05, 0x2d, 0x12, 0x80, 0x00, 0xe8, 0xf0, 0xff,
                0xbf, 0x00, 0xc3,
            ],
            data: 0x1080_1240u64.to_le_bytes(),
        },
        // aarch64: bl (0x94000000) @0, adrp x0 (0x90000000) @4, ldr w0,[x0] (0xb9400000)
        // @8, bl @12, ret (0xd65f03c0) @16.
        //   R_AARCH64_CALL26 (283): imm26 = (S + A - P) >> 2:
        //     static_fn: (0x1040_0000 - 0x1000_0000) >> 2 = 0x10_0000 -> 0x94100000
        //     mod_fn: (0x10c0_0000 - 0x1000_000c) >> 2 = 0x2f_fffd -> 0x942ffffd
        //   R_AARCH64_ADR_PREL_PG_HI21 (275): Page(S + A) - Page(P) = 0x1080_1000 -
        //     0x1000_0000 = 0x80_1000, >> 12 = 0x801: immlo (bits 29-30) = 0x801 & 3 =
        //     1, immhi (bits 5-23) = 0x801 >> 2 = 0x200 -> 0x90000000 | 1 << 29 |
        //     0x200 << 5 = 0xb0004000
        //   R_AARCH64_LDST32_ABS_LO12_NC (285): imm12 (bits 10-21) = ((S + A) & 0xfff)
        //     >> 2 = 0x238 >> 2 = 0x8e -> 0xb9400000 | 0x8e << 10 = 0xb9423800
        Case {
            spec: AARCH64,
            code: le32(&[
                0x9400_0000,
                0x9000_0000,
                0xb940_0000,
                0x9400_0000,
                0xd65f_03c0,
            ]),
            relocs: vec![
                (0, 283, 0, "static_fn"),
                (4, 275, 0, "static_var"),
                (8, 285, 0, "static_var"),
                (12, 283, 0, "mod_fn"),
            ],
            vmlinux: le32(&[
                0x9410_0000,
                0xb000_4000,
                0xb942_3800,
                0x9400_0000,
                0xd65f_03c0,
            ]),
            mymod: le32(&[
                0x9410_0000,
                0xb000_4000,
                0xb942_3800,
                0x942f_fffd,
                0xd65f_03c0,
            ]),
            data: 0x1080_1240u64.to_le_bytes(),
        },
        // ppc64le: bl (0x48000001) @0, nop (0x60000000) @4, addis r9,r2,0
        // (0x3d220000) @8, lwz r3,0(r9) (0x80690000) @12, bl @16, nop @20, blr
        // (0x4e800020) @24. Half16 fields are the word's low halfword, at the word's
        // own offset in little-endian.
        //   R_PPC64_REL24 (10): LI (bits 2-25) = S + A - P:
        //     static_fn: 0x1040_0000 - 0x1000_0000 = 0x40_0000 -> 0x48400001
        //     mod_fn: 0x10c0_0000 - 0x1000_0010 = 0xbf_fff0 -> 0x48bffff1
        //   and, the callee being in another object, the nop after each bl becomes
        //   the TOC restore ld r2,24(r1) = 0xe8410018 (ELFv2 ABI §2.2.1.1).
        //   R_PPC64_TOC16_HA (50) / _LO (48) of S + A - .TOC. = 0x1080_1238 -
        //   0x1001_8000 = 0x7e_9238: #ha = (0x7e_9238 + 0x8000) >> 16 = 0x7f ->
        //   0x3d22007f; #lo = 0x9238 -> 0x80699238.
        Case {
            spec: PPC64LE,
            code: le32(&[
                0x4800_0001,
                0x6000_0000,
                0x3d22_0000,
                0x8069_0000,
                0x4800_0001,
                0x6000_0000,
                0x4e80_0020,
            ]),
            relocs: vec![
                (0, 10, 0, "static_fn"),
                (8, 50, 0, "static_var"),
                (12, 48, 0, "static_var"),
                (16, 10, 0, "mod_fn"),
            ],
            vmlinux: le32(&[
                0x4840_0001,
                0xe841_0018,
                0x3d22_007f,
                0x8069_9238,
                0x4800_0001,
                0x6000_0000,
                0x4e80_0020,
            ]),
            mymod: le32(&[
                0x4840_0001,
                0xe841_0018,
                0x3d22_007f,
                0x8069_9238,
                0x48bf_fff1,
                0xe841_0018,
                0x4e80_0020,
            ]),
            data: 0x1080_1240u64.to_le_bytes(),
        },
        // s390x (big-endian): brasl %r14 (c0 e5) @0, I2 @2; larl %r1 (c0 10) @6, I2
        // @8; l %r2,0(%r1) (58 20 10 00) @12; brasl @16, I2 @18; br %r14 (07 fe) @22.
        // R_390_PLT32DBL (20) and R_390_PC32DBL (19) are (L/S + A - P) >> 1 with A =
        // +2 (the halfword count starts at the instruction, 2 bytes before P):
        //   static_fn: (0x1040_0000 + 2 - 0x1000_0002) >> 1 = 0x20_0000
        //   static_var: (0x1080_1238 + 2 - 0x1000_0008) >> 1 = 0x40_0919
        //   mod_fn: (0x10c0_0000 + 2 - 0x1000_0012) >> 1 = 0x5f_fff8
        Case {
            spec: S390X,
            code: vec![
                0xc0, 0xe5, 0, 0, 0, 0, 0xc0, 0x10, 0, 0, 0, 0, 0x58, 0x20, 0x10, 0x00, 0xc0, 0xe5,
                0, 0, 0, 0, 0x07, 0xfe,
            ],
            relocs: vec![
                (2, 20, 2, "static_fn"),
                (8, 19, 2, "static_var"),
                (18, 20, 2, "mod_fn"),
            ],
            vmlinux: vec![
                0xc0, 0xe5, 0x00, 0x20, 0x00, 0x00, 0xc0, 0x10, 0x00, 0x40, 0x09, 0x19, 0x58, 0x20,
                0x10, 0x00, 0xc0, 0xe5, 0, 0, 0, 0, 0x07, 0xfe,
            ],
            mymod: vec![
                0xc0, 0xe5, 0x00, 0x20, 0x00, 0x00, 0xc0, 0x10, 0x00, 0x40, 0x09, 0x19, 0x58, 0x20,
                0x10, 0x00, 0xc0, 0xe5, 0x00, 0x5f, 0xff, 0xf8, 0x07, 0xfe,
            ],
            data: 0x1080_1240u64.to_be_bytes(),
        },
    ]
}

/// The patch object of `c` (ET_REL, as a compiler would write it).
pub fn build(c: &Case) -> Vec<u8> {
    build_named(c, &["static_fn", "static_var", "mod_fn"], &FUNCS)
}

/// [`build`] with other names for the three undefined symbols (in the order
/// static_fn, static_var, mod_fn) and the six functions.
pub fn build_named(c: &Case, undefined: &[&str; 3], funcs: &[&str; 6]) -> Vec<u8> {
    let a = &c.spec;
    let mut o = Object::new(object::BinaryFormat::Elf, a.object, a.endian);
    o.flags = FileFlags::Elf {
        os_abi: elf::ELFOSABI_NONE,
        abi_version: 0,
        e_flags: elf::FileFlags(a.e_flags),
    };
    let text = o.add_section(Vec::new(), b".text".to_vec(), SectionKind::Text);
    let mut bytes = vec![0u8; 32 * funcs.len()];
    bytes[..c.code.len()].copy_from_slice(&c.code);
    o.append_section_data(text, &bytes, 16);
    let data = o.add_section(Vec::new(), b".data".to_vec(), SectionKind::Data);
    o.append_section_data(data, &[0; 8], 8);
    let modinfo = o.add_section(Vec::new(), b".modinfo".to_vec(), SectionKind::ReadOnlyData);
    o.append_section_data(modinfo, b"license=GPL\0", 1);
    o.add_file_symbol(b"patch.c".to_vec());
    for (i, name) in funcs.iter().enumerate() {
        o.add_symbol(Symbol {
            name: name.as_bytes().to_vec(),
            value: 32 * i as u64,
            size: 32,
            kind: SymbolKind::Text,
            scope: SymbolScope::Linkage,
            weak: false,
            section: SymbolSection::Section(text),
            flags: SymbolFlags::None,
        });
    }
    let undef: Vec<_> = undefined
        .iter()
        .map(|n| {
            o.add_symbol(Symbol {
                name: n.as_bytes().to_vec(),
                value: 0,
                size: 0,
                kind: SymbolKind::Unknown,
                scope: SymbolScope::Unknown,
                weak: false,
                section: SymbolSection::Undefined,
                flags: SymbolFlags::None,
            })
        })
        .collect();
    let id = |sym: &str| match sym {
        "static_fn" => undef[0],
        "static_var" => undef[1],
        _ => undef[2],
    };
    for &(offset, r_type, addend, sym) in &c.relocs {
        o.add_relocation(
            text,
            Relocation {
                offset,
                symbol: id(sym),
                addend,
                flags: RelocationFlags::Elf {
                    r_type: elf::RelocationType(r_type),
                },
            },
        )
        .unwrap();
    }
    o.add_relocation(
        data,
        Relocation {
            offset: 0,
            symbol: undef[1],
            addend: 8,
            flags: RelocationFlags::Elf {
                r_type: elf::RelocationType(a.abs64),
            },
        },
    )
    .unwrap();
    o.write().unwrap()
}

/// The patch of `c` converted against [`MAP`] (as `vmlinux`) with [`MANIFEST`].
pub fn converted(c: &Case) -> klp_convert::Converted {
    let patch = build(c);
    let m = klp_convert::Manifest::from_json(MANIFEST).unwrap();
    let t = [klp_convert::TargetInput {
        name: "vmlinux".into(),
        file: "System.map".into(),
        data: MAP.as_bytes(),
    }];
    klp_convert::convert("patch.o", &patch, &t, &m, &klp_convert::Options::default())
        .unwrap_or_else(|e| panic!("{:?}: {e}", c.spec.arch))
}
