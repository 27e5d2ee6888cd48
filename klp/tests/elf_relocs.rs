//! Livepatch relocation sections resolved and written for each of the four
//! architectures, on any host.
//!
//! Each object is written by hand (`common/elfbuild.rs`) in its architecture's byte
//! order: a `.text` with a call and an 8-byte data slot, a `.klp.rela.vmlinux..text`
//! whose entries reference `.klp.sym.vmlinux.static_fn,2` (the second of two
//! same-named vmlinux functions) and `.klp.sym.vmlinux.static_var,0`. The expected
//! bytes are worked out by hand from each psABI's relocation formula and instruction
//! encoding, noted beside each case.

mod common;

use common::elfbuild::*;
use common::image::Image;
use common::symhost::{FN_SECOND, SymHost, VAR};
use klp::elf::reloc::write_relocs;
use klp::elf::{PatchObject, SHF_RELA_LIVEPATCH, SHN_LIVEPATCH};
use klp::{Errno, KResult};
use klp_arch::Arch;

struct Case {
    machine: u16,
    big: bool,
    /// `.text`: the call at 0, the data slot at 8.
    text: [u8; 16],
    /// The call's relocation: (offset, type, addend).
    call: (u64, u32, i64),
    /// The 64-bit absolute type.
    abs64: u32,
    /// `.text` once written.
    want: [u8; 16],
}

fn le64(v: u64) -> [u8; 8] {
    v.to_le_bytes()
}

fn with_var(head: [u8; 8], var: [u8; 8]) -> [u8; 16] {
    let mut t = [0u8; 16];
    t[..8].copy_from_slice(&head);
    t[8..].copy_from_slice(&var);
    t
}

fn cases() -> Vec<(&'static str, Case)> {
    vec![
        // x86_64: `call rel32` (e8) at 0, field at 1. R_X86_64_PLT32 = L + A - P with
        // L = S (no PLT), A = -4, P = 0x1000_0001: 0x1000_4000 - 4 - 0x1000_0001 =
        // 0x3ffb. R_X86_64_64 = S + A.
        (
            "x86_64",
            Case {
                machine: 62,
                big: false,
                text: with_var([0xe8, 0, 0, 0, 0, 0x90, 0x90, 0x90], [0; 8]),
                call: (1, 4, -4),
                abs64: 1,
                want: with_var([0xe8, 0xfb, 0x3f, 0, 0, 0x90, 0x90, 0x90], le64(VAR)),
            },
        ),
        // aarch64: `bl` (0x94000000) at 0, then `nop` (0xd503201f). R_AARCH64_CALL26:
        // imm26 = (S + A - P) >> 2 = 0x4000 >> 2 = 0x1000 → 0x94001000.
        // R_AARCH64_ABS64 = S + A.
        (
            "aarch64",
            Case {
                machine: 183,
                big: false,
                text: with_var([0, 0, 0, 0x94, 0x1f, 0x20, 0x03, 0xd5], [0; 8]),
                call: (0, 283, 0),
                abs64: 257,
                want: with_var([0x00, 0x10, 0x00, 0x94, 0x1f, 0x20, 0x03, 0xd5], le64(VAR)),
            },
        ),
        // ppc64le: `bl` (0x48000001) at 0, then `nop` (0x60000000). R_PPC64_REL24: bits
        // 6..29 = S + A - P = 0x4000 → 0x48004001. The callee is in another object (a
        // livepatch symbol), so the nop becomes the TOC restore `ld r2,24(r1)`
        // (0xe8410018: ELFv2 keeps the caller's TOC at 24(r1)). R_PPC64_ADDR64 = S + A.
        (
            "ppc64le",
            Case {
                machine: 21,
                big: false,
                text: with_var([0x01, 0, 0, 0x48, 0, 0, 0, 0x60], [0; 8]),
                call: (0, 10, 0),
                abs64: 38,
                want: with_var([0x01, 0x40, 0x00, 0x48, 0x18, 0x00, 0x41, 0xe8], le64(VAR)),
            },
        ),
        // s390x (big-endian): `brasl %r14,.` (c0 e5 + 32-bit halfword offset) at 0, then
        // `nopr` (07 07). R_390_PLT32DBL at the field, offset 2, A = 2:
        // (L + A - P) >> 1 = (0x1000_4000 + 2 - 0x1000_0002) >> 1 = 0x2000.
        // R_390_64 = S + A.
        (
            "s390x",
            Case {
                machine: 22,
                big: true,
                text: with_var([0xc0, 0xe5, 0, 0, 0, 0, 0x07, 0x07], [0; 8]),
                call: (2, 20, 2),
                abs64: 22,
                want: with_var(
                    [0xc0, 0xe5, 0x00, 0x00, 0x20, 0x00, 0x07, 0x07],
                    VAR.to_be_bytes(),
                ),
            },
        ),
    ]
}

/// The object of `c`, with the given livepatch symbol names and relocation section name.
fn object(c: &Case, fn_sym: &str, var_sym: &str, rela_name: &str, extra_call: bool) -> Vec<u8> {
    let mut o = Obj::new(c.machine, c.big);
    let text = o.section(Sec {
        name: ".text".into(),
        sh_type: SHT_PROGBITS,
        flags: SHF_ALLOC | SHF_EXECINSTR,
        data: if extra_call {
            [&c.text[..], &[0u8; 8]].concat()
        } else {
            c.text.to_vec()
        },
        link: 0,
        info: 0,
        align: 16,
        entsize: 0,
    });
    o.modinfo();
    // Symbol 1: the section symbol of .text (local); then the livepatch symbols.
    o.symbol(SymDef {
        name: String::new(),
        info: STB_LOCAL_SECTION,
        shndx: text as u16,
        value: 0,
        size: 0,
    });
    o.first_global = 2;
    let f = o.symbol(SymDef {
        name: fn_sym.into(),
        info: STB_GLOBAL_FUNC,
        shndx: SHN_LIVEPATCH,
        value: 0,
        size: 0,
    });
    let v = o.symbol(SymDef {
        name: var_sym.into(),
        info: STB_GLOBAL_OBJECT,
        shndx: SHN_LIVEPATCH,
        value: 0,
        size: 0,
    });
    let mut entries = vec![(c.call.0, f, c.call.1, c.call.2), (8, v, c.abs64, 0)];
    if extra_call {
        // The same symbol again, in a third slot: resolved once.
        entries.push((16, f, c.abs64, 0));
    }
    let data = o.relas(&entries);
    let symtab = o.symtab_index() + 1; // after the relocation section itself
    o.section(Sec {
        name: rela_name.into(),
        sh_type: SHT_RELA,
        flags: SHF_ALLOC | SHF_INFO_LINK | SHF_RELA_LIVEPATCH,
        data,
        link: symtab,
        info: text,
        align: 8,
        entsize: 24,
    });
    o.build()
}

fn apply<A: Arch>(file: &[u8], target: Option<&str>) -> (KResult<()>, Image, SymHost) {
    let obj = PatchObject::parse(file).expect("parses");
    let mut image = Image::load(&obj);
    let mut host = SymHost::default();
    let r = write_relocs::<A, _>(&mut host, "lp", &obj, &mut image, target);
    (r, image, host)
}

fn apply_for(arch: &str, file: &[u8], target: Option<&str>) -> (KResult<()>, Image, SymHost) {
    match arch {
        "x86_64" => apply::<klp_arch_x86_64::X86_64>(file, target),
        "aarch64" => apply::<klp_arch_aarch64::Aarch64>(file, target),
        "ppc64le" => apply::<klp_arch_ppc64le::Ppc64le>(file, target),
        "s390x" => apply::<klp_arch_s390x::S390x>(file, target),
        _ => unreachable!(),
    }
}

const FN: &str = ".klp.sym.vmlinux.static_fn,2";
const VARSYM: &str = ".klp.sym.vmlinux.static_var,0";
const RELA: &str = ".klp.rela.vmlinux..text";

#[test]
fn relocations_are_written_on_every_architecture() {
    for (arch, c) in cases() {
        let file = object(&c, FN, VARSYM, RELA, true);
        let obj = PatchObject::parse(&file).expect("parses");
        assert!(obj.is_livepatch(), "{arch}: livepatch=Y");
        let (r, image, host) = apply_for(arch, &file, None);
        assert_eq!(r, Ok(()), "{arch}: {:?}", host.log);
        let slot = if c.big {
            FN_SECOND.to_be_bytes()
        } else {
            FN_SECOND.to_le_bytes()
        };
        assert_eq!(image.bytes(1), [&c.want[..], &slot[..]].concat(), "{arch}");
        assert_eq!(
            host.lookups.get(),
            2,
            "{arch}: one lookup per livepatch symbol"
        );
        assert!(host.log.is_empty(), "{arch}: {:?}", host.log);
        // A module's sections are skipped when vmlinux is written, and the reverse.
        let (r, image, _) = apply_for(arch, &file, Some("mymod"));
        assert_eq!(r, Ok(()));
        assert_eq!(
            &image.bytes(1)[..16],
            &c.text,
            "{arch}: nothing for another object"
        );
        assert_eq!(image.writes, 0);
    }
}

#[test]
fn bad_symbols_get_the_kernels_messages_and_change_nothing() {
    for (arch, c) in cases() {
        let check = |file: Vec<u8>, want: Errno, line: &str| {
            let (r, image, host) = apply_for(arch, &file, None);
            assert_eq!(r, Err(want), "{arch}: {line}");
            assert_eq!(image.bytes(1), &c.text, "{arch}: {line}: bytes changed");
            assert_eq!(image.writes, 0);
            assert!(
                host.log.iter().any(|l| l == line),
                "{arch}: {:?}, want {line}",
                host.log
            );
        };
        check(
            object(&c, ".klp.sym.vmlinux.static_fn", VARSYM, RELA, false),
            Errno::EINVAL,
            "livepatch: symbol .klp.sym.vmlinux.static_fn has an incorrectly formatted name",
        );
        check(
            object(&c, ".klp.sym.vmlinux.no_such_fn,0", VARSYM, RELA, false),
            Errno::EINVAL,
            "livepatch: symbol 'no_such_fn' not found in symbol table",
        );
        check(
            object(&c, ".klp.sym.vmlinux.static_fn,0", VARSYM, RELA, false),
            Errno::EINVAL,
            "livepatch: unresolvable ambiguity for symbol 'static_fn' in object '(null)'",
        );
        check(
            object(&c, ".klp.sym.vmlinux.static_fn,3", VARSYM, RELA, false),
            Errno::EINVAL,
            "livepatch: symbol position 3 for symbol 'static_fn' in object 'vmlinux' not found",
        );
        check(
            object(&c, FN, VARSYM, ".klp.rela..text", false),
            Errno::EINVAL,
            "livepatch: section .klp.rela..text has an incorrectly formatted name",
        );
        // A module-specific section may not reach vmlinux symbols.
        let file = object(&c, FN, VARSYM, ".klp.rela.mymod..text", false);
        let (r, image, host) = apply_for(arch, &file, Some("mymod"));
        assert_eq!(r, Err(Errno::EINVAL));
        assert_eq!(image.bytes(1), &c.text);
        assert_eq!(
            host.log,
            [
                "livepatch: invalid access to vmlinux symbol 'static_fn' from module-specific livepatch relocation section"
            ]
        );
    }
}

#[test]
fn a_relocation_out_of_range_leaves_every_byte() {
    for (arch, c) in cases() {
        // Make the call's target far away: the second relocation (the data slot) is
        // fine, the call's field cannot hold the distance.
        let file = object(&c, FN, VARSYM, RELA, false);
        let obj = PatchObject::parse(&file).expect("parses");
        let mut image = Image::load(&obj);
        image.secs[1].as_mut().unwrap().0 = 0xffff_8000_0000_0000;
        let mut host = SymHost::default();
        let r = match arch {
            "x86_64" => {
                write_relocs::<klp_arch_x86_64::X86_64, _>(&mut host, "lp", &obj, &mut image, None)
            }
            "aarch64" => write_relocs::<klp_arch_aarch64::Aarch64, _>(
                &mut host, "lp", &obj, &mut image, None,
            ),
            "ppc64le" => write_relocs::<klp_arch_ppc64le::Ppc64le, _>(
                &mut host, "lp", &obj, &mut image, None,
            ),
            _ => write_relocs::<klp_arch_s390x::S390x, _>(&mut host, "lp", &obj, &mut image, None),
        };
        assert_eq!(r, Err(Errno::ENOEXEC), "{arch}");
        assert_eq!(image.bytes(1), &c.text, "{arch}");
        assert_eq!(image.writes, 0, "{arch}");
        assert!(
            host.log
                .iter()
                .any(|l| l.starts_with("lp: ") && l.contains("overflow")),
            "{arch}: {:?}",
            host.log
        );
    }
}

#[test]
fn an_object_of_another_architecture_is_refused() {
    let (_, c) = cases().remove(3); // s390x, big-endian
    let file = object(&c, FN, VARSYM, RELA, false);
    let (r, image, host) = apply_for("x86_64", &file, None);
    assert_eq!(r, Err(Errno::ENOEXEC));
    assert_eq!(image.bytes(1), &c.text);
    assert_eq!(
        host.log,
        ["lp: built for machine 22, the patch's architecture is machine 62"]
    );
}

#[test]
fn a_non_livepatch_symbol_in_a_livepatch_section() {
    let (arch, c) = cases().remove(0);
    let mut file = object(&c, FN, VARSYM, RELA, false);
    // Turn the function's livepatch symbol into an ordinary undefined one: find its
    // st_shndx (0xff20, little-endian) in the symbol table and clear it.
    let obj = PatchObject::parse(&file).expect("parses");
    let sym = obj.symbol(2).expect("sym");
    assert!(sym.is_livepatch());
    let pos = file
        .windows(2)
        .position(|w| w == [0x20, 0xff])
        .expect("shndx");
    file[pos] = 0;
    file[pos + 1] = 0;
    let (r, _, host) = apply_for(arch, &file, None);
    assert_eq!(r, Err(Errno::EINVAL));
    let symtab = PatchObject::parse(&file).unwrap().symtab_index();
    assert_eq!(
        host.log,
        [format!(
            "livepatch: symbol {FN} at rela sec {symtab} idx 0 is not marked as a livepatch symbol"
        )]
    );
}

/// Written for a module, cleared when it goes, written again when it comes back, on
/// every architecture (x86_64 refuses a field that is not zero, ppc64le a TOC restore
/// where its `nop` should be: both need the clear).
#[test]
fn module_relocations_are_cleared_and_written_again() {
    for (arch, c) in cases() {
        let file = object(
            &c,
            ".klp.sym.mymod.mod_fn,0",
            ".klp.sym.mymod.mod_fn,0",
            ".klp.rela.mymod..text",
            false,
        );
        let obj = PatchObject::parse(&file).expect("parses");
        let mut image = Image::load(&obj);
        let mut host = SymHost::default();
        macro_rules! each {
            ($f:ident) => {
                match arch {
                    "x86_64" => $f::<klp_arch_x86_64::X86_64>(&mut host, &obj, &mut image),
                    "aarch64" => $f::<klp_arch_aarch64::Aarch64>(&mut host, &obj, &mut image),
                    "ppc64le" => $f::<klp_arch_ppc64le::Ppc64le>(&mut host, &obj, &mut image),
                    _ => $f::<klp_arch_s390x::S390x>(&mut host, &obj, &mut image),
                }
            };
        }
        fn write<A: Arch>(h: &mut SymHost, o: &PatchObject<'_>, i: &mut Image) -> KResult<()> {
            write_relocs::<A, _>(h, "lp", o, i, Some("mymod"))
        }
        fn clear<A: Arch>(h: &mut SymHost, o: &PatchObject<'_>, i: &mut Image) -> KResult<()> {
            klp::elf::reloc::clear_relocs::<A, _>(h, "lp", o, i, "mymod");
            Ok(())
        }
        let r = each!(write);
        assert_eq!(r, Ok(()), "{arch}: first arrival: {:?}", host.log);
        let first = image.bytes(1).to_vec();
        assert_ne!(first, c.text, "{arch}: written");
        each!(clear).expect("going");
        // What the next write needs is back: the fields (x86_64), the nop (ppc64le).
        match arch {
            "x86_64" => assert_eq!(image.bytes(1), &c.text),
            "ppc64le" => assert_eq!(&image.bytes(1)[4..8], &c.text[4..8]),
            _ => {}
        }
        each!(write).expect("second arrival");
        assert_eq!(image.bytes(1), first, "{arch}: the same bytes again");
        assert!(host.log.is_empty(), "{arch}: {:?}", host.log);
    }
}

/// An unknown relocation type, a relocation section applying to a section that does
/// not exist, and the architecture's machine in the wrong byte order: typed errors,
/// nothing written.
#[test]
fn unknown_types_bad_indices_and_byte_order() {
    let (arch, c) = cases().remove(0);
    // Type 9999 instead of R_X86_64_PLT32.
    let odd = Case {
        call: (1, 9999, -4),
        ..c
    };
    let (r, image, host) = apply_for(arch, &object(&odd, FN, VARSYM, RELA, false), None);
    assert_eq!(r, Err(Errno::ENOEXEC));
    assert_eq!(image.bytes(1), &odd.text);
    assert!(
        host.log
            .iter()
            .any(|l| l.contains("unsupported relocation type 9999")),
        "{:?}",
        host.log
    );

    // sh_info of the livepatch section: past the last section.
    let mut file = object(&odd, FN, VARSYM, RELA, false);
    let obj = PatchObject::parse(&file).expect("parses");
    let klp = obj.klp_relas().next().expect("one").expect("ok").section;
    let shoff = u64::from_le_bytes(file[40..48].try_into().unwrap()) as usize;
    let info_at = shoff + 64 * klp.index + 44;
    file[info_at..info_at + 4].copy_from_slice(&999u32.to_le_bytes());
    let (r, _, host) = apply_for(arch, &file, None);
    assert_eq!(r, Err(Errno::ENOEXEC));
    assert_eq!(
        host.log,
        ["lp: sh_info of a livepatch relocation section 999 is not a section of the object"]
    );

    // x86_64's machine number in a big-endian object.
    let be = Case {
        big: true,
        ..cases().remove(0).1
    };
    let (r, _, host) = apply_for(arch, &object(&be, FN, VARSYM, RELA, false), None);
    assert_eq!(r, Err(Errno::ENOEXEC));
    assert_eq!(
        host.log,
        ["lp: big-endian object for a little-endian architecture"]
    );
}
