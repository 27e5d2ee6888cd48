//! Prints every aarch64 encoder's output for `ci/objdump-check` (see the x86_64
//! example for the format): each line names the instruction the case asked for.

use klp_arch::{Arch, FuncInfo, Redirect, Reloc, RelocCtx};
use klp_arch_aarch64::{Aarch64, insn, reloc};

fn main() {
    // `objdump_<arch> sync`: the cache-coherence sequence the live code must execute.
    if std::env::args().nth(1).as_deref() == Some("sync") {
        let steps: Vec<&str> = <Aarch64 as Arch>::CACHE_SYNC
            .iter()
            .map(|s| s.mnemonic())
            .collect();
        println!("{}", steps.join(";"));
        return;
    }
    let f = 0xffff_8000_8010_0000u64;
    let nop = insn::NOP.to_le_bytes();
    let bti = insn::BTI_C.to_le_bytes();
    let mov = insn::MOV_X9_X30.to_le_bytes();
    let lim = insn::BRANCH_LIMIT;
    for code in [
        [nop, nop].concat(),
        [bti, nop, nop].concat(),
        [mov, nop].concat(),
    ] {
        let site = Aarch64::find_site(&code, FuncInfo::at(f)).expect("a site");
        let at = site.addr();
        for t in [at + 0x1000, at - 0x100, at + 4 + (lim - 4), at + 4 - lim] {
            let c = Aarch64::encode_redirect(&site, Redirect::call(t)).expect("in range");
            println!("{at:#x} {} mov x9,x30;bl {t:#x}", hex(c.as_slice()));
        }
        // `nop; nop` jumps from the first word; `mov x9, x30; nop` from the second.
        let (b_at, shape) = if code[..4] == mov {
            (at + 4, "mov x9,x30;b")
        } else {
            (at, "b")
        };
        for t in [b_at + 0x1000, b_at + (lim - 4), b_at - lim] {
            let j = Aarch64::encode_redirect(&site, Redirect::jump(t)).expect("in range");
            let text = if b_at == at {
                format!("{shape} {t:#x};nop")
            } else {
                format!("{shape} {t:#x}")
            };
            println!("{at:#x} {} {text}", hex(j.as_slice()));
        }
    }
    // Relocated instructions.
    let base = 0xffff_8000_7800_0000u64;
    let target = base + (0x12345 << 12) + 0x678;
    let cases: [(u32, u32, u64, String); 12] = [
        (
            0x9400_0000,
            reloc::CALL26,
            base + 0x7ff_fffc,
            format!("bl {:#x}", base + 0x7ff_fffc),
        ),
        (
            0x1400_0000,
            reloc::JUMP26,
            base - 0x800_0000,
            format!("b {:#x}", base - 0x800_0000),
        ),
        (
            0x9000_0000,
            reloc::ADR_PREL_PG_HI21,
            target,
            format!("adrp x0,{:#x}", target & !0xfff),
        ),
        (
            0x9100_0000,
            reloc::ADD_ABS_LO12_NC,
            target,
            "add x0,x0,#0x678".into(),
        ),
        (
            0xf940_0001,
            reloc::LDST64_ABS_LO12_NC,
            target,
            "ldr x1,[x0,#1656]".into(),
        ),
        (
            0x5400_0000,
            reloc::CONDBR19,
            base + 0xf_fffc,
            format!("b.eq {:#x}", base + 0xf_fffc),
        ),
        (
            0x1000_0000,
            reloc::ADR_PREL_LO21,
            base + 0x1234,
            format!("adr x0,{:#x}", base + 0x1234),
        ),
        (
            0x3600_0000,
            reloc::TSTBR14,
            base - 0x8000,
            format!("tbz w0,#0,{:#x}", base - 0x8000),
        ),
        (
            0x3940_0001,
            reloc::LDST8_ABS_LO12_NC,
            target + 1,
            "ldrb w1,[x0,#1657]".into(),
        ),
        (
            0x7940_0001,
            reloc::LDST16_ABS_LO12_NC,
            target,
            "ldrh w1,[x0,#1656]".into(),
        ),
        (
            0xb940_0001,
            reloc::LDST32_ABS_LO12_NC,
            target,
            "ldr w1,[x0,#1656]".into(),
        ),
        (
            0x3dc0_0001,
            reloc::LDST128_ABS_LO12_NC,
            target - 8,
            "ldr q1,[x0,#1648]".into(),
        ),
    ];
    for (word, t, sym, expect) in cases {
        let mut s = word.to_le_bytes();
        let r = Reloc {
            r_type: t,
            offset: 0,
            sym,
            addend: 0,
            external: false,
        };
        Aarch64::apply_relocation(&mut s, base, &r, &RelocCtx::default()).expect("fits");
        println!("{base:#x} {} {expect}", hex(&s));
    }
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}
