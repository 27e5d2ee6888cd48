//! Prints every s390x encoder's output for `ci/objdump-check` (see the x86_64
//! example for the format): each line names the instruction the case asked for.

use klp_arch::{Arch, FuncInfo, Redirect, Reloc, RelocCtx};
use klp_arch_s390x::{S390x, insn, reloc};

fn main() {
    // `objdump_<arch> sync`: the cache-coherence sequence the live code must execute.
    if std::env::args().nth(1).as_deref() == Some("sync") {
        let steps: Vec<&str> = <S390x as Arch>::CACHE_SYNC
            .iter()
            .map(|s| s.mnemonic())
            .collect();
        println!("{}", steps.join(";"));
        return;
    }
    let f = 0x0000_0001_0012_3400u64;
    let lim = insn::RIL_LIMIT;
    let sites: [(&[u8], &str); 3] = [
        (&insn::BRCL_0_0, "jgnop"),
        (&[0x07, 0, 0x07, 0, 0x07, 0], "nopr"),
        (&[0x47, 0, 0, 0, 0x47, 0, 0, 0], "nop"),
    ];
    for (code, _) in sites {
        let site = S390x::find_site(code, FuncInfo::at(f)).expect("a site");
        let at = site.addr();
        let fill = ";nopr".repeat((site.len() - 6) / 2);
        for t in [at + 0x1000, at - 0x100, at + (lim - 2), at - lim] {
            let c = S390x::encode_redirect(&site, Redirect::call(t)).expect("in range");
            println!("{at:#x} {} brasl %r0,{t:#x}{fill}", hex(c.as_slice()));
            let j = S390x::encode_redirect(&site, Redirect::jump(t)).expect("in range");
            println!("{at:#x} {} jg {t:#x}{fill}", hex(j.as_slice()));
        }
    }
    // Relocated instructions: brasl %r14 (PLT32DBL), larl %r1 (PC32DBL), brc (PC16DBL).
    let base = 0x3ff_8000_0000u64;
    let cases: [(&[u8], u32, u64, String); 3] = [
        (
            &[0xc0, 0xe5, 0, 0, 0, 0],
            reloc::R_390_PLT32DBL,
            base + 0x1_0000_0000 - 2,
            format!("brasl %r14,{:#x}", base + 0x1_0000_0000 - 2),
        ),
        (
            &[0xc0, 0x10, 0, 0, 0, 0],
            reloc::R_390_PC32DBL,
            base - 0x1_0000_0000,
            format!("larl %r1,{:#x}", base - 0x1_0000_0000),
        ),
        (
            &[0xa7, 0xf4, 0, 0],
            reloc::R_390_PC16DBL,
            base + 0xfffe,
            format!("j {:#x}", base + 0xfffe),
        ),
    ];
    for (code, t, sym, expect) in cases {
        let mut s = code.to_vec();
        let r = Reloc {
            r_type: t,
            offset: 2,
            sym,
            addend: 2,
            external: false,
        };
        S390x::apply_relocation(&mut s, base, &r, &RelocCtx::default()).expect("fits");
        println!("{base:#x} {} {expect}", hex(&s));
    }
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}
