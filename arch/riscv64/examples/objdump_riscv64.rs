//! Prints every riscv64 encoder's output for `ci/objdump-check` (see the x86_64
//! example for the format): each line names the instructions the case asked for, as
//! `riscv64-linux-gnu-objdump -M no-aliases` prints them (so that `c.nop`, `c.j` and
//! `nop`, `jal zero` stay apart). The `auipc` pair's parts are computed here from the
//! target with the ISA's rounding (`hi = (d + 0x800) >> 12`), not by the encoder.

use klp_arch::patching::{MAX_STUB, PlanCtx, SitePlanner, SiteState};
use klp_arch::{Arch, FuncInfo, MAX_CALL_STUB, Redirect, Reloc, RelocCtx};
use klp_arch_riscv64::{Riscv64, insn, patching, reloc, site};

/// The `auipc` immediate (as objdump prints it, 20 bits unsigned) and the signed low
/// part reaching `to` from `from`.
fn parts(from: u64, to: u64) -> (u64, i64) {
    let d = to.wrapping_sub(from) as i64;
    let hi = (d + 0x800) >> 12;
    (hi as u64 & 0xf_ffff, d - (hi << 12))
}

fn main() {
    // `objdump_<arch> sync`: the cache-coherence sequence the live code must execute.
    if std::env::args().nth(1).as_deref() == Some("sync") {
        let steps: Vec<&str> = <Riscv64 as Arch>::CACHE_SYNC
            .iter()
            .map(|s| klp_arch_riscv64::sync_mnemonic(*s))
            .collect();
        println!("{}", steps.join(";"));
        return;
    }
    let f = 0x3f_8010_0000u64;
    let nop = insn::NOP.to_le_bytes();
    let cnop = insn::C_NOP.to_le_bytes();
    let nop_text = "addi zero,zero,0";
    let cnop_text = "c.addi zero,0";
    let tramp = f + 0x3000;
    let armed_code = {
        let s = Riscv64::find_site(&[nop, nop].concat(), FuncInfo::at(f)).expect("a site");
        site::armed(&s, tramp).expect("in range")
    };
    let forms: [(Vec<u8>, String); 3] = [
        ([nop, nop].concat(), format!("{nop_text};{nop_text}")),
        ([cnop, cnop, cnop, cnop].concat(), [cnop_text; 4].join(";")),
        (
            armed_code.as_slice().to_vec(),
            format!("auipc t0,{:#x};{nop_text}", parts(f, tramp).0),
        ),
    ];
    for (code, original) in forms {
        let site = Riscv64::find_site(&code, FuncInfo::at(f)).expect("a site");
        let at = site.addr();
        let fwd = insn::PAIR_FORWARD - 2;
        for t in [
            at + 0x1000,
            at - 0x100,
            at + 0x1234_5678,
            at + fwd,
            at - insn::PAIR_BACKWARD,
        ] {
            let c = Riscv64::encode_redirect(&site, Redirect::call(t)).expect("in range");
            let (hi, lo) = parts(at, t);
            println!(
                "{at:#x} {} auipc t0,{hi:#x};jalr t0,{lo}(t0)",
                hex(c.as_slice())
            );
        }
        for t in [
            at + 0x800,
            at - 0x100,
            at + insn::JAL_LIMIT - 2,
            at - insn::JAL_LIMIT,
        ] {
            let j = Riscv64::encode_redirect(&site, Redirect::jump(t)).expect("in range");
            println!("{at:#x} {} jal zero,{t:#x};{nop_text}", hex(j.as_slice()));
        }
        println!(
            "{at:#x} {} {original}",
            hex(Riscv64::restore(&site).as_slice())
        );
        let settled = site::settled(&site);
        let settled_text = if site.form.code == site::form::ARMED {
            original.clone()
        } else {
            format!("{nop_text};{nop_text}")
        };
        println!("{at:#x} {} {settled_text}", hex(settled.as_slice()));
        for t in [tramp, at - insn::PAIR_BACKWARD] {
            let a = site::armed(&site, t).expect("in range");
            println!(
                "{at:#x} {} auipc t0,{:#x};{nop_text}",
                hex(a.as_slice()),
                parts(at, t).0
            );
        }
    }

    plans(f);

    // The call stub's instructions (its last 8 bytes are the target, not code).
    let mut stub = [0u8; MAX_CALL_STUB];
    let n = Riscv64::call_stub(f, 0x0123_4567_89ab_cdee, &mut stub).expect("aligned");
    let code = &stub[..n - 8];
    println!(
        "{f:#x} {} auipc t1,0x0;ld t1,16(t1);jalr zero,0(t1);{nop_text}",
        hex(code)
    );

    // Relocated instructions: (instruction words before, type, symbol, expected text).
    let base = 0xffff_ffff_0100_0000u64;
    let abs = 0xffff_ffff_8000_1234u64;
    let far = base + 0x1234_5678;
    let call_fwd = base + insn::PAIR_FORWARD - 2;
    let call_back = base - insn::PAIR_BACKWARD;
    let cases: Vec<(Vec<u8>, u32, u64, String)> = vec![
        (
            w(&[0x00b5_0063]),
            reloc::BRANCH,
            base + 0xffe,
            format!("beq a0,a1,{:#x}", base + 0xffe),
        ),
        (
            w(&[0x00b5_0063]),
            reloc::BRANCH,
            base - 0x1000,
            format!("beq a0,a1,{:#x}", base - 0x1000),
        ),
        (
            w(&[0x0000_00ef]),
            reloc::JAL,
            base + 0xf_fffe,
            format!("jal ra,{:#x}", base + 0xf_fffe),
        ),
        (
            w(&[0x0000_00ef]),
            reloc::JAL,
            base - 0x10_0000,
            format!("jal ra,{:#x}", base - 0x10_0000),
        ),
        (
            h(0xc101),
            reloc::RVC_BRANCH,
            base + 0xfe,
            format!("c.beqz a0,{:#x}", base + 0xfe),
        ),
        (
            h(0xe101),
            reloc::RVC_BRANCH,
            base - 0x100,
            format!("c.bnez a0,{:#x}", base - 0x100),
        ),
        (
            h(0xa001),
            reloc::RVC_JUMP,
            base + 0x7fe,
            format!("c.j {:#x}", base + 0x7fe),
        ),
        (
            h(0xa001),
            reloc::RVC_JUMP,
            base - 0x800,
            format!("c.j {:#x}", base - 0x800),
        ),
        (
            w(&[0x0000_0097, 0x0000_80e7]),
            reloc::CALL,
            far,
            call_text(base, far),
        ),
        (
            w(&[0x0000_0097, 0x0000_80e7]),
            reloc::CALL_PLT,
            call_fwd,
            call_text(base, call_fwd),
        ),
        (
            w(&[0x0000_0097, 0x0000_80e7]),
            reloc::CALL,
            call_back,
            call_text(base, call_back),
        ),
        (
            w(&[0x0000_0517]),
            reloc::PCREL_HI20,
            far,
            format!("auipc a0,{:#x}", parts(base, far).0),
        ),
        (
            w(&[0x0000_0537]),
            reloc::HI20,
            abs,
            format!("lui a0,{:#x}", parts(0, abs).0),
        ),
        (
            w(&[0x0005_0513]),
            reloc::LO12_I,
            abs,
            format!("addi a0,a0,{}", parts(0, abs).1),
        ),
        (
            w(&[0x0005_3503]),
            reloc::LO12_I,
            base + 0xfff,
            "ld a0,-1(a0)".into(),
        ),
        (
            w(&[0x00b5_3023]),
            reloc::LO12_S,
            abs,
            format!("sd a1,{}(a0)", parts(0, abs).1),
        ),
    ];
    for (mut s, t, sym, expect) in cases {
        let r = Reloc {
            r_type: t,
            offset: 0,
            sym,
            addend: 0,
            external: false,
        };
        Riscv64::apply_relocation(&mut s, base, &r, &RelocCtx::default()).expect("fits");
        println!("{base:#x} {} {expect}", hex(&s));
    }
    // A PCREL_HI20 with its two PCREL_LO12s, through the section-wide search.
    let mut s = w(&[0x0000_0517, 0x0005_0513, 0x00b5_3023]);
    let target = base - 0x7654_3210;
    let rel = |r_type, offset, sym| Reloc {
        r_type,
        offset,
        sym,
        addend: 0,
        external: false,
    };
    let relocs = [
        rel(reloc::PCREL_HI20, 0, target),
        rel(reloc::PCREL_LO12_I, 4, base),
        rel(reloc::PCREL_LO12_S, 8, base),
    ];
    reloc::apply_all(&mut s, base, &relocs).expect("fits");
    let (hi, lo) = parts(base, target);
    println!(
        "{base:#x} {} auipc a0,{hi:#x};addi a0,a0,{lo};sd a1,{lo}(a0)",
        hex(&s)
    );
}

/// The live plans' words (`patching`): every step of every transition of both gcc
/// forms, as the word it stores at its address, named by what the step is for; then
/// the site's stub.
fn plans(f: u64) {
    let stub = f + 0x2345_6000;
    let jump = f - 0xf_f000;
    let (hi, lo) = parts(f, stub);
    let ctx = PlanCtx {
        addr: f,
        stub,
        trampoline: 0,
    };
    // What each word a plan may store is meant to be, with its encoding asked of the
    // encoders (a word matching none of them fails the example).
    let call = insn::call_t0(f, stub).expect("in range");
    let jal = insn::jal(insn::reg::ZERO, f, jump).expect("in range");
    let meant = |w: u32, at: u64| -> String {
        if w == insn::NOP {
            "addi zero,zero,0".into()
        } else if w == patching::NOP_C {
            "addi zero,sp,0".into()
        } else if w == patching::C_NOPS {
            "c.addi zero,0;c.addi zero,0".into()
        } else if w == call[0] && at == f {
            format!("auipc t0,{hi:#x}")
        } else if w == call[1] && at == f + 4 {
            format!("jalr t0,{lo}(t0)")
        } else if w == jal && at == f {
            format!("jal zero,{jump:#x}")
        } else {
            panic!("a plan stores {w:#010x} at {at:#x}")
        }
    };
    let nop = insn::NOP.to_le_bytes();
    let cnop = insn::C_NOP.to_le_bytes();
    for code in [[nop, nop].concat(), [cnop, cnop, cnop, cnop].concat()] {
        let site = Riscv64::find_site(&code, FuncInfo::at(f)).expect("a site");
        let mut now = code.clone();
        for to in [
            SiteState::Trampoline,
            SiteState::Jump(jump),
            SiteState::Trampoline,
            SiteState::Original,
            SiteState::Jump(jump),
            SiteState::Original,
        ] {
            let plan = Riscv64::plan(&site, &now, to, &ctx).expect("a plan");
            for st in plan.steps() {
                let b = st.bytes.as_slice();
                let at = f + u64::from(st.offset);
                let w = u32::from_le_bytes(b.try_into().expect("a word"));
                println!("{at:#x} {} {}", hex(b), meant(w, at));
                let o = usize::from(st.offset);
                now[o..o + 4].copy_from_slice(b);
            }
            if to == SiteState::Trampoline {
                println!("{f:#x} {} auipc t0,{hi:#x};jalr t0,{lo}(t0)", hex(&now));
            }
        }
        assert_eq!(now, code, "restored");
    }
    let mut out = [0u8; MAX_STUB];
    let n = Riscv64::stub(0, 0x0123_4567_89ab_cdee, &mut out);
    println!(
        "{stub:#x} {} auipc t1,0x0;ld t1,16(t1);jalr zero,0(t1);addi zero,zero,0",
        hex(&out[..n - 8])
    );
}

fn call_text(at: u64, to: u64) -> String {
    let (hi, lo) = parts(at, to);
    format!("auipc ra,{hi:#x};jalr ra,{lo}(ra)")
}

fn w(words: &[u32]) -> Vec<u8> {
    words.iter().flat_map(|x| x.to_le_bytes()).collect()
}

fn h(half: u16) -> Vec<u8> {
    half.to_le_bytes().to_vec()
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}
