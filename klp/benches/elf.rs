//! Resolving and writing a large livepatch object against a large target, as a ratio
//! to one parse of that target's symbol table (what any host pays to index it).
//!
//! * **baseline** — parse a 100 000-symbol relocatable object with the core's reader
//!   and build a name → addresses index of its symbol table (a `HashMap`);
//! * **contender** — `klp::elf::reloc::write_relocs` for a patch of 1000 livepatch
//!   symbols and 5000 `.klp.rela` entries (x86_64, 64-bit absolute), resolving every
//!   symbol through a host whose lookup is that index.
//!
//! `cargo bench -p klp --bench elf`

#[path = "../tests/common/elfbuild.rs"]
#[allow(dead_code, clippy::all)]
mod elfbuild;
#[path = "../tests/common/image.rs"]
#[allow(dead_code)]
mod image;
#[path = "../tests/common/symhost.rs"]
#[allow(dead_code)]
mod symhost;

use std::collections::HashMap;
use std::hint::black_box;

use criterion::{BatchSize, Criterion, criterion_group, criterion_main};
use elfbuild::*;
use klp::elf::PatchObject;
use klp::elf::reloc::write_relocs;

const TARGET_SYMS: usize = 100_000;
const PATCH_SYMS: usize = 1000;
const RELAS: usize = 5000;

fn target() -> Vec<u8> {
    let mut o = Obj::new(62, false);
    let text = o.section(Sec {
        name: ".text".into(),
        sh_type: SHT_PROGBITS,
        flags: SHF_ALLOC | SHF_EXECINSTR,
        data: vec![0; 16],
        link: 0,
        info: 0,
        align: 16,
        entsize: 0,
    });
    for i in 0..TARGET_SYMS {
        o.symbol(SymDef {
            name: format!("kernel_function_number_{i}"),
            info: 0x02, // local function: statics are what livepatch symbols reach
            shndx: text as u16,
            value: 0xffff_ffff_8100_0000 + 16 * i as u64,
            size: 16,
        });
    }
    o.first_global = TARGET_SYMS as u32 + 1;
    o.build()
}

fn patch() -> Vec<u8> {
    let mut o = Obj::new(62, false);
    let data = o.section(Sec {
        name: ".data.klp".into(),
        sh_type: SHT_PROGBITS,
        flags: SHF_ALLOC | 1,
        data: vec![0; 8 * RELAS],
        link: 0,
        info: 0,
        align: 8,
        entsize: 0,
    });
    let first = o.symbols_len() + 1;
    for i in 0..PATCH_SYMS {
        o.symbol(SymDef {
            name: format!(".klp.sym.vmlinux.kernel_function_number_{},0", i * 97),
            info: STB_GLOBAL_FUNC,
            shndx: 0xff20,
            value: 0,
            size: 0,
        });
    }
    let entries: Vec<_> = (0..RELAS)
        .map(|j| (8 * j as u64, first + (j % PATCH_SYMS) as u32, 1, 0))
        .collect();
    let relas = o.relas(&entries);
    let symtab = o.symtab_index() + 1;
    o.section(Sec {
        name: ".klp.rela.vmlinux..data.klp".into(),
        sh_type: SHT_RELA,
        flags: SHF_ALLOC | SHF_INFO_LINK | 0x0010_0000,
        data: relas,
        link: symtab,
        info: data,
        align: 8,
        entsize: 24,
    });
    o.build()
}

/// One parse of the target's symbol table into a name index.
fn index(file: &[u8]) -> HashMap<(Option<String>, String), Vec<u64>> {
    let obj = PatchObject::parse(file).expect("target");
    let mut m: HashMap<(Option<String>, String), Vec<u64>> =
        HashMap::with_capacity(obj.symbol_count());
    for s in obj.symbols().flatten() {
        if !s.name.is_empty() {
            m.entry((None, s.name.to_string()))
                .or_default()
                .push(s.value);
        }
    }
    m
}

fn bench(c: &mut Criterion) {
    let target = target();
    let patch = patch();
    let mut g = c.benchmark_group("elf");
    g.bench_function("baseline: parse and index 100k symbols", |b| {
        b.iter(|| black_box(index(black_box(&target))))
    });
    let mut host = symhost::SymHost {
        table: index(&target),
        ..Default::default()
    };
    let obj = PatchObject::parse(&patch).expect("patch");
    g.bench_function(
        "contender: resolve 1000 symbols, write 5000 relocations",
        |b| {
            b.iter_batched(
                || image::Image::load(&obj),
                |mut img| {
                    write_relocs::<klp_arch_x86_64::X86_64, _>(
                        &mut host, "bench", &obj, &mut img, None,
                    )
                    .expect("written");
                    img
                },
                BatchSize::SmallInput,
            )
        },
    );
    g.finish();
    assert!(host.log.is_empty(), "{:?}", host.log);
}

criterion_group!(benches, bench);
criterion_main!(benches);
