//! Prints every x86_64 encoder's output for `ci/objdump-check`, one case a line:
//! `<vma> <hex bytes> <insn>[;<insn>…]`, where each `<insn>` is the instruction the
//! case *asked for* (mnemonic, then operands without spaces). The script disassembles
//! the bytes with binutils and compares, so the check does not trust the encoder.

use klp_arch::{Arch, FuncInfo, Redirect, Reloc, RelocCtx};
use klp_arch::{CallSite, CallSites};
use klp_arch_x86_64::{X86_64, callsite, insn, reloc};

fn main() {
    // `objdump_<arch> sync`: the cache-coherence sequence the live code must execute.
    if std::env::args().nth(1).as_deref() == Some("sync") {
        let steps: Vec<&str> = <X86_64 as Arch>::CACHE_SYNC
            .iter()
            .map(|s| s.mnemonic())
            .collect();
        println!("{}", steps.join(";"));
        return;
    }
    let f = 0xffff_ffff_4000_0000u64;
    let lim = insn::REL32_LIMIT;
    // Each site form, with what objdump shows for the original bytes.
    let sites: [(&[u8], &str); 4] = [
        (&insn::NOP5, "nopl 0x0(%rax,%rax,1)"),
        (
            &[0xf3, 0x0f, 0x1e, 0xfa, 0x0f, 0x1f, 0x44, 0x00, 0x00],
            "nopl 0x0(%rax,%rax,1)",
        ),
        (&[0xe8, 0, 0, 0, 0], "call"),
        (
            &[0x66, 0x0f, 0x1f, 0x44, 0x00, 0x00],
            "nopw 0x0(%rax,%rax,1)",
        ),
    ];
    for (code, original) in sites {
        let site = X86_64::find_site(code, FuncInfo::at(f)).expect("a site");
        let at = site.addr();
        let targets = [
            at + 0x1000,
            at - 0x40,
            at + 5 + (lim - 1),
            at + 5 - lim,
            at + 5,
        ];
        for t in targets {
            for (r, m) in [(Redirect::call(t), "call"), (Redirect::jump(t), "jmp")] {
                let b = X86_64::encode_redirect(&site, r).expect("in range");
                let fill = ";nop".repeat(site.len() - 5);
                println!("{at:#x} {} {m} {t:#x}{fill}", hex(b.as_slice()));
            }
        }
        let original = match original {
            "call" => format!("call {:#x}", at + 5),
            nop => nop.to_string(),
        };
        println!(
            "{at:#x} {} {original}",
            hex(X86_64::restore(&site).as_slice())
        );
    }
    // Relocations inside instructions: call rel32 (PLT32 and PC32).
    let base = 0xffff_ffff_c000_0000u64;
    for (t, sym) in [
        (reloc::R_X86_64_PLT32, base + 0x1234),
        (reloc::R_X86_64_PC32, base - 0x10),
    ] {
        let mut s = [0xe8, 0, 0, 0, 0];
        let r = Reloc {
            r_type: t,
            offset: 1,
            sym,
            addend: -4,
            external: false,
        };
        X86_64::apply_relocation(&mut s, base, &r, &RelocCtx::default()).expect("fits");
        println!("{base:#x} {} call {sym:#x}", hex(&s));
    }
    // Call sites retargeted in the steady state (`callsite`): each form pointed at a
    // target and back, including the relaxed forms of the GOT calls (`addr32 call`,
    // `jmp; nop`).
    let at = 0x5555_8000_1000u64;
    let func = at + 0x2000;
    let forms: [(u8, &[u8], &str); 4] = [
        (callsite::form::CALL, &[0xe8, 0xfb, 0x1f, 0, 0], "call"),
        (callsite::form::JMP, &[0xe9, 0xfb, 0x1f, 0, 0], "jmp"),
        (
            callsite::form::GOT_CALL,
            &[0xff, 0x15, 0xfa, 0x0f, 0, 0],
            "addr32 call",
        ),
        (
            callsite::form::GOT_JMP,
            &[0xff, 0x25, 0xfa, 0x0f, 0, 0],
            "jmp",
        ),
    ];
    for (form, original, m) in forms {
        let site = CallSite::new(at, form, original).expect("a site");
        let end = at + original.len() as u64;
        let fill = if form == callsite::form::GOT_JMP {
            ";nop"
        } else {
            ""
        };
        for t in [at + 0x1000, at - 0x40, end + (lim - 1), end - lim, func] {
            // The `e9` of `jmp; nop` ends one byte before the site.
            if fill == ";nop" && t == end + (lim - 1) {
                continue;
            }
            let Some(b) = X86_64::encode_call(&site, func, t) else {
                panic!("{t:#x} in reach of {at:#x}");
            };
            let shown = match (form, t == func) {
                (callsite::form::GOT_CALL, true) => "call *0xffa(%rip)".to_string(),
                (callsite::form::GOT_JMP, true) => "jmp *0xffa(%rip)".to_string(),
                _ => format!("{m} {t:#x}{fill}"),
            };
            println!("{at:#x} {} {shown}", hex(b.as_slice()));
        }
    }
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}
