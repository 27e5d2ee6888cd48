//! Prints every ppc64le encoder's output for `ci/objdump-check` (see the x86_64
//! example for the format): each line names the instruction the case asked for.

use klp_arch::{Arch, FuncInfo, Redirect, Reloc, RelocCtx};
use klp_arch_ppc64le::{Ppc64le, insn, reloc};

fn words(w: &[u32]) -> Vec<u8> {
    w.iter().flat_map(|x| x.to_le_bytes()).collect()
}

fn main() {
    // `objdump_<arch> sync`: the cache-coherence sequence the live code must execute.
    if std::env::args().nth(1).as_deref() == Some("sync") {
        let steps: Vec<&str> = <Ppc64le as Arch>::CACHE_SYNC
            .iter()
            .map(|s| s.mnemonic())
            .collect();
        println!("{}", steps.join(";"));
        return;
    }
    let f = 0xc000_0000_0010_0000u64;
    let toc = [0x3c4c_001b, 0x3842_8200];
    let mcount = insn::bl(f + 12, f - 0x100).expect("near");
    let lim = insn::BRANCH_LIMIT;
    let sites = [
        (
            words(&[toc[0], toc[1], insn::NOP, insn::NOP]),
            3u8 << 5,
            "nop;nop".to_string(),
        ),
        (
            words(&[toc[0], toc[1], insn::MFLR_R0, mcount]),
            3 << 5,
            format!("mflr r0;bl {:#x}", f - 0x100),
        ),
        (words(&[insn::NOP, insn::NOP]), 0, "nop;nop".to_string()),
    ];
    for (code, st_other, original) in sites {
        let site = Ppc64le::find_site(&code, FuncInfo { addr: f, st_other }).expect("a site");
        let at = site.addr();
        for t in [at + 0x1000, at - 0x100, at + 4 + (lim - 4), at + 4 - lim] {
            let c = Ppc64le::encode_redirect(&site, Redirect::call(t)).expect("in range");
            println!("{at:#x} {} mflr r0;bl {t:#x}", hex(c.as_slice()));
        }
        let second = original.split(';').nth(1).unwrap_or("nop").to_string();
        for t in [at + 0x1000, at + (lim - 4), at - lim] {
            let j = Ppc64le::encode_redirect(&site, Redirect::jump(t)).expect("in range");
            println!("{at:#x} {} b {t:#x};{second}", hex(j.as_slice()));
        }
        println!(
            "{at:#x} {} {original}",
            hex(Ppc64le::restore(&site).as_slice())
        );
    }
    // Relocated instructions.
    let base = 0xc008_0000_0001_0000u64;
    let tocp = 0xc008_0000_0002_8000u64;
    let ctx = RelocCtx { toc: Some(tocp) };
    let rel = |t, sym, external| Reloc {
        r_type: t,
        offset: 0,
        sym,
        addend: 0,
        external,
    };
    let cases = [
        (
            vec![0x4800_0001, insn::NOP],
            rel(reloc::REL24, base + 0x1ff_fffc, false),
            format!("bl {:#x};nop", base + 0x1ff_fffc),
        ),
        (
            vec![0x4800_0001, insn::NOP],
            rel(reloc::REL24, base - 0x200_0000, true),
            format!("bl {:#x};ld r2,24(r1)", base - 0x200_0000),
        ),
        (
            vec![0x3c62_0000],
            rel(reloc::TOC16_HA, tocp + 0x1_8000, false),
            "addis r3,r2,2".into(),
        ),
        (
            vec![0x3863_0000],
            rel(reloc::TOC16_LO, tocp + 0x1_7ff0, false),
            "addi r3,r3,32752".into(),
        ),
        (
            vec![0xe863_0000],
            rel(reloc::TOC16_LO_DS, tocp + 0x1238, false),
            "ld r3,4664(r3)".into(),
        ),
        (
            vec![0x3c4c_0000],
            rel(reloc::REL16_HA, base + 0x3_0000, false),
            "addis r2,r12,3".into(),
        ),
        (
            vec![0x3842_0000],
            rel(reloc::REL16_LO, base + 0x2_fff8, false),
            "addi r2,r2,-8".into(),
        ),
    ];
    for (w, r, expect) in cases {
        let mut s = words(&w);
        Ppc64le::apply_relocation(&mut s, base, &r, &ctx).expect("fits");
        println!("{base:#x} {} {expect}", hex(&s));
    }
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}
