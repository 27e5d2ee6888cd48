//! Linking a user-space patch object (see `klp_arch::LinkClass`): calls get a stub
//! beyond the reach of their instruction (the kernel's module PLT), `GOT_HI20` a slot.

use klp_arch::{EncodeError, LinkClass, MAX_CALL_STUB};

use crate::insn::{self, reg};
use crate::reloc::{CALL, CALL_PLT, GOT_HI20, JAL, PCREL_HI20};

/// Length of the call stub: four instructions and the 8-byte target.
pub const STUB_LEN: usize = 24;

/// The class of `r_type`.
pub fn class(r_type: u32) -> LinkClass {
    match r_type {
        // `call`/`tail` (auipc + jalr, ±2 GiB) and a direct `jal` (±1 MiB): a target
        // beyond their reach goes through a stub within it.
        CALL | CALL_PLT | JAL => LinkClass::Call,
        // `auipc rd, %got_pcrel_hi(sym); ld rd, %pcrel_lo(label)(rd)` loads what the GOT
        // entry held: the same pair against the loader's slot is `PCREL_HI20` (and the
        // `PCREL_LO12_I` that names the auipc stays as it is).
        GOT_HI20 => LinkClass::GotSlot {
            as_type: PCREL_HI20,
        },
        _ => LinkClass::Plain,
    }
}

/// `auipc t1, 0; ld t1, 16(t1); jr t1; nop; .8byte target`: 24 bytes, clobbers only
/// `t1`, a temporary that is dead at a call (the psABI's PLT entries clobber `t1` and
/// `t3` the same way), so `t0` (the return point of a site's call) and every argument
/// register pass through. The literal sits at `at + 16`, 8-byte aligned when `at` is.
pub fn call_stub(
    at: u64,
    target: u64,
    out: &mut [u8; MAX_CALL_STUB],
) -> Result<usize, EncodeError> {
    if !at.is_multiple_of(8) {
        return Err(EncodeError::Misaligned {
            from: at,
            to: target,
            align: 8,
        });
    }
    if !target.is_multiple_of(insn::INSN_ALIGN) {
        return Err(EncodeError::Misaligned {
            from: at,
            to: target,
            align: insn::INSN_ALIGN,
        });
    }
    let words = [
        insn::auipc(reg::T1, 0),
        insn::ld(reg::T1, reg::T1, 16),
        insn::jalr(reg::ZERO, reg::T1, 0),
        insn::NOP,
    ];
    let mut code = [0u8; STUB_LEN];
    for (dst, w) in code.chunks_exact_mut(4).zip(words) {
        dst.copy_from_slice(&w.to_le_bytes());
    }
    if let Some(lit) = code.get_mut(16..) {
        lit.copy_from_slice(&target.to_le_bytes());
    }
    out.get_mut(..STUB_LEN)
        .ok_or(EncodeError::Unsupported)?
        .copy_from_slice(&code);
    Ok(STUB_LEN)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Riscv64;
    use klp_arch::Arch;

    #[test]
    fn classes() {
        assert_eq!(Riscv64::link_class(CALL), LinkClass::Call);
        assert_eq!(Riscv64::link_class(CALL_PLT), LinkClass::Call);
        assert_eq!(Riscv64::link_class(JAL), LinkClass::Call);
        assert_eq!(
            Riscv64::link_class(GOT_HI20),
            LinkClass::GotSlot { as_type: 23 }
        );
        for t in [PCREL_HI20, 24, 16, 2, 44, 45] {
            assert_eq!(Riscv64::link_class(t), LinkClass::Plain, "type {t}");
        }
    }

    #[test]
    fn stub() {
        let mut out = [0; MAX_CALL_STUB];
        let n = Riscv64::call_stub(0x4000, 0x0123_4567_89ab_cdee, &mut out).unwrap();
        assert_eq!(n, 24);
        // By hand from the ISA tables (and riscv64-linux-gnu-objdump):
        // auipc t1, 0     = rd 6 << 7 | 0x17                         = 0x00000317
        // ld t1, 16(t1)   = 16 << 20 | 6 << 15 | 3 << 12 | 6 << 7 | 3  = 0x01033303
        // jr t1           = 6 << 15 | 0x67                           = 0x00030067
        // nop             = 0x00000013
        assert_eq!(
            &out[..16],
            &[
                0x17, 0x03, 0, 0, 0x03, 0x33, 0x03, 0x01, 0x67, 0x00, 0x03, 0x00, 0x13, 0, 0, 0
            ]
        );
        assert_eq!(&out[16..24], &0x0123_4567_89ab_cdeeu64.to_le_bytes());
        assert_eq!(&out[24..], &[0; MAX_CALL_STUB - 24]);
        assert_eq!(
            Riscv64::call_stub(0x4004, 0x1000, &mut out),
            Err(EncodeError::Misaligned {
                from: 0x4004,
                to: 0x1000,
                align: 8
            })
        );
        assert_eq!(
            Riscv64::call_stub(0x4000, 0x1001, &mut out),
            Err(EncodeError::Misaligned {
                from: 0x4000,
                to: 0x1001,
                align: 2
            })
        );
    }
}
