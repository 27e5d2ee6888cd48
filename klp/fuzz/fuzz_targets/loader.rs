//! The core's livepatch ELF loader on arbitrary bytes: reading the object (sections,
//! symbols, relocations, `.modinfo`, the patch description), then writing and clearing
//! its livepatch relocation sections for every object they name, through the back-end
//! of the object's machine. Nothing may panic, loop without bound or touch memory out
//! of bounds; a relocation that fails must leave the image as it was.

#![no_main]

#[path = "../../tests/common/image.rs"]
#[allow(dead_code)]
mod image;
#[path = "../../tests/common/symhost.rs"]
mod symhost;

use klp::elf::PatchObject;
use klp::elf::reloc::{clear_relocs, write_relocs};
use klp_arch::Arch;
use libfuzzer_sys::fuzz_target;

fn relocate<A: Arch>(obj: &PatchObject<'_>) {
    let mut img = image::Image::load_lenient(obj);
    let mut host = symhost::SymHost::default();
    let before = img.secs.clone();
    if write_relocs::<A, _>(&mut host, "fuzz", obj, &mut img, None).is_err() {
        assert!(img.secs == before, "a failed write changed the image");
    }
    for r in obj.klp_relas().flatten() {
        let before = img.secs.clone();
        if write_relocs::<A, _>(&mut host, "fuzz", obj, &mut img, Some(r.objname)).is_err() {
            assert!(img.secs == before, "a failed write changed the image");
        }
        clear_relocs::<A, _>(&mut host, "fuzz", obj, &mut img, r.objname);
    }
}

fuzz_target!(|data: &[u8]| {
    let Ok(obj) = PatchObject::parse(data) else {
        return;
    };
    let _ = obj.is_livepatch();
    for s in obj.sections().flatten() {
        let _ = obj.section_data(s.index);
        if let Ok(r) = obj.relas(s.index) {
            r.for_each(drop);
        }
    }
    obj.symbols().for_each(drop);
    if let Ok(objects) = obj.klp_objects() {
        for o in objects.flatten() {
            obj.klp_funcs(&o).for_each(drop);
        }
    }
    match obj.machine() {
        62 => relocate::<klp_arch_x86_64::X86_64>(&obj),
        183 => relocate::<klp_arch_aarch64::Aarch64>(&obj),
        21 => relocate::<klp_arch_ppc64le::Ppc64le>(&obj),
        22 => relocate::<klp_arch_s390x::S390x>(&obj),
        _ => {}
    }
});
