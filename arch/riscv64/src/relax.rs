//! GOT-relative references relaxed into direct ones, as a static linker does (the
//! psABI's "GOT load relaxation"; GNU ld's `_bfd_riscv_relax_got_hi`), for a converter
//! ([`Arch::relax_got`](klp_arch::Arch::relax_got)).
//!
//! `auipc rd, %got_pcrel_hi(foo)` (`R_RISCV_GOT_HI20`, addend 0) and each of its
//! partnered entries `ld rd', %pcrel_lo(label)(rs)` (`R_RISCV_PCREL_LO12_I`, symbol
//! the `auipc`'s label) → the same `auipc` with `R_RISCV_PCREL_HI20`, each `ld`
//! rewritten to `addi rd', rs, lo` (same `rd'`, `rs` and immediate: I-type, `funct3`
//! 000, opcode `0010011`); the partnered entries keep their type and symbol, and
//! now take the low part of `foo - label` instead of `slot - label`.
//!
//! Refused, nothing changed: the instruction at the `GOT_HI20` is not an `auipc`, a
//! partner is not an `ld` (64-bit load: `funct3` 011, opcode `0000011`), there is no
//! partner (the load would be left reading through a slot that no longer exists), or
//! the addend is not 0 (it would offset the slot, not the symbol).

use klp_arch::relax::bytes_at;
use klp_arch::{GotRef, RelaxFound, RelaxRefused, Relaxed};

use crate::insn::{self, op};
use crate::reloc::{GOT_HI20, PCREL_HI20};

/// `funct3` of `ld`.
const FUNCT3_LD: u32 = 0b011;
/// The `funct3` and opcode bits of an I-type instruction.
const FUNCT3_OPCODE: u32 = 0x0000_707f;

const EXPECTED: &str = "on `auipc rd, %got_pcrel_hi(foo)` with addend 0, with at least one \
                        partnered R_RISCV_PCREL_LO12_I entry and each on `ld rd', \
                        %pcrel_lo(label)(rs)`";

/// Whether `r_type` is relaxed here.
pub fn relaxable(r_type: u32) -> bool {
    r_type == GOT_HI20
}

fn word_at(text: &[u8], offset: u64) -> Option<u32> {
    let &[b0, b1, b2, b3] = bytes_at(text, offset, 4)? else {
        return None;
    };
    Some(u32::from_le_bytes([b0, b1, b2, b3]))
}

fn put_word(text: &mut [u8], offset: u64, w: u32) -> Option<()> {
    let at = usize::try_from(offset).ok()?;
    text.get_mut(at..at.checked_add(4)?)?
        .copy_from_slice(&w.to_le_bytes());
    Some(())
}

/// `ld rd, imm(rs1)`?
fn is_ld(w: u32) -> bool {
    insn::opcode(w) == op::LOAD && (w >> 12) & 7 == FUNCT3_LD
}

/// `ld rd, imm(rs1)` → `addi rd, rs1, imm`.
fn ld_to_addi(w: u32) -> u32 {
    (w & !FUNCT3_OPCODE) | op::OP_IMM
}

/// See the module docs.
pub fn relax(
    text: &mut [u8],
    got: &GotRef,
    partners: &[u64],
) -> Result<Option<Relaxed>, RelaxRefused> {
    if !relaxable(got.r_type) {
        return Ok(None);
    }
    let refuse = |found: RelaxFound| RelaxRefused {
        expected: EXPECTED,
        found,
    };
    let Some(hi) = word_at(text, got.offset) else {
        return Err(refuse(RelaxFound::PastEnd));
    };
    if insn::opcode(hi) != op::AUIPC {
        return Err(refuse(RelaxFound::Word {
            word: hi,
            addend: None,
        }));
    }
    if got.addend != 0 {
        return Err(refuse(RelaxFound::Word {
            word: hi,
            addend: Some(got.addend),
        }));
    }
    if partners.is_empty() {
        return Err(refuse(RelaxFound::NoPartner));
    }
    // Every partner is checked before anything is written.
    for &offset in partners {
        let Some(w) = word_at(text, offset) else {
            return Err(refuse(RelaxFound::PartnerPastEnd { offset }));
        };
        if !is_ld(w) {
            return Err(refuse(RelaxFound::PartnerWord { offset, word: w }));
        }
    }
    for &offset in partners {
        // Both were just read: the word is there.
        let written = word_at(text, offset).and_then(|w| put_word(text, offset, ld_to_addi(w)));
        if written.is_none() {
            return Err(refuse(RelaxFound::PartnerPastEnd { offset }));
        }
    }
    Ok(Some(Relaxed {
        r_type: PCREL_HI20,
        offset: got.offset,
        rewrite: "auipc %got_pcrel_hi; ld → auipc %pcrel_hi; addi",
    }))
}

#[cfg(test)]
mod tests {
    extern crate std;
    use super::*;
    use crate::insn::reg;
    use std::vec::Vec;

    fn text(words: &[u32]) -> Vec<u8> {
        words.iter().flat_map(|w| w.to_le_bytes()).collect()
    }

    fn got(offset: u64, addend: i64) -> GotRef {
        GotRef {
            r_type: GOT_HI20,
            offset,
            addend,
            address: None,
        }
    }

    // Encodings by hand (RV64I, I-type: imm[11:0] 31:20, rs1 19:15, funct3 14:12,
    // rd 11:7, opcode 6:0; a0 = x10, a1 = x11, a5 = x15):
    //   auipc a0, 0        = 10 << 7 | 0x17                              = 0x00000517
    //   ld a0, 0(a0)       = 10 << 15 | 3 << 12 | 10 << 7 | 0x03          = 0x00053503
    //   addi a0, a0, 0     = 10 << 15 | 0 << 12 | 10 << 7 | 0x13          = 0x00050513
    //   ld a1, 8(a0)       = 8 << 20 | 10 << 15 | 3 << 12 | 11 << 7 | 0x03 = 0x00853583
    //   addi a1, a0, 8     = 8 << 20 | 10 << 15 | 11 << 7 | 0x13          = 0x00850593
    //   ld a5, 0(a5)       = 15 << 15 | 3 << 12 | 15 << 7 | 0x03          = 0x0007b783
    //   addi a5, a5, 0     = 15 << 15 | 15 << 7 | 0x13                    = 0x00078793
    //   lw a0, 0(a0)       = 10 << 15 | 2 << 12 | 10 << 7 | 0x03          = 0x00052503
    //   lui a0, 0          = 10 << 7 | 0x37                               = 0x00000537
    //   sd a0, 0(a0)       = 10 << 20 | 10 << 15 | 3 << 12 | 0x23         = 0x00a53023

    #[test]
    fn the_hand_encodings_are_the_encoders() {
        // The inputs below are written by hand; the crate's encoders agree.
        assert_eq!(insn::auipc(10, 0), 0x0000_0517);
        assert_eq!(insn::ld(10, 10, 0), 0x0005_3503);
        assert_eq!(insn::ld(11, 10, 8), 0x0085_3583);
        assert_eq!(insn::ld(15, 15, 0), 0x0007_b783);
        assert_eq!(insn::auipc(reg::T0, 0), insn::AUIPC_T0);
    }

    #[test]
    fn auipc_got_and_ld_become_auipc_pcrel_and_addi() {
        // auipc a0, %got_pcrel_hi(foo); ld a0, %pcrel_lo(.L0)(a0); ret (c.jr ra 0x8082).
        let mut t = text(&[0x0000_0517, 0x0005_3503, 0x0000_8082]);
        let d = relax(&mut t, &got(0, 0), &[4]).unwrap().unwrap();
        assert_eq!((d.r_type, d.offset), (23, 0));
        assert_eq!(t, text(&[0x0000_0517, 0x0005_0513, 0x0000_8082]));
        // Two loads of one auipc, one with an immediate already there.
        let mut t = text(&[0x0000_0517, 0x0085_3583, 0x0005_3503]);
        relax(&mut t, &got(0, 0), &[4, 8]).unwrap().unwrap();
        assert_eq!(t, text(&[0x0000_0517, 0x0085_0593, 0x0005_0513]));
        // A field further into the section (auipc a5 = 15 << 7 | 0x17 = 0x797).
        let mut t = text(&[0x0000_0013, 0x0000_0797, 0x0007_b783]);
        let d = relax(&mut t, &got(4, 0), &[8]).unwrap().unwrap();
        assert_eq!((d.r_type, d.offset), (23, 4));
        assert_eq!(t, text(&[0x0000_0013, 0x0000_0797, 0x0007_8793]));
    }

    #[test]
    fn refusals_change_nothing() {
        for (words, g, partners, found) in [
            // lui in place of auipc.
            (
                &[0x0000_0537u32, 0x0005_3503][..],
                got(0, 0),
                &[4u64][..],
                RelaxFound::Word {
                    word: 0x0000_0537,
                    addend: None,
                },
            ),
            // lw (32-bit) in place of ld.
            (
                &[0x0000_0517, 0x0005_2503],
                got(0, 0),
                &[4],
                RelaxFound::PartnerWord {
                    offset: 4,
                    word: 0x0005_2503,
                },
            ),
            // A store: the second of two partners, so the first must stay too.
            (
                &[0x0000_0517, 0x0005_3503, 0x00a5_3023],
                got(0, 0),
                &[4, 8],
                RelaxFound::PartnerWord {
                    offset: 8,
                    word: 0x00a5_3023,
                },
            ),
            // No partner.
            (
                &[0x0000_0517, 0x0005_3503],
                got(0, 0),
                &[],
                RelaxFound::NoPartner,
            ),
            // A partner past the end.
            (
                &[0x0000_0517, 0x0005_3503],
                got(0, 0),
                &[6],
                RelaxFound::PartnerPastEnd { offset: 6 },
            ),
            // An addend.
            (
                &[0x0000_0517, 0x0005_3503],
                got(0, 8),
                &[4],
                RelaxFound::Word {
                    word: 0x0000_0517,
                    addend: Some(8),
                },
            ),
            // The auipc past the end.
            (&[0x0000_0517], got(2, 0), &[], RelaxFound::PastEnd),
        ] {
            let before = text(words);
            let mut t = before.clone();
            let e = relax(&mut t, &g, partners).unwrap_err();
            assert_eq!(e.found, found);
            assert!(e.expected.contains("%got_pcrel_hi"), "{e:?}");
            assert_eq!(t, before);
        }
        // Not relaxable: PCREL_HI20 itself, CALL_PLT.
        let mut t = text(&[0x0000_0517, 0x0005_3503]);
        for r_type in [PCREL_HI20, crate::reloc::CALL_PLT] {
            let g = GotRef {
                r_type,
                ..got(0, 0)
            };
            assert_eq!(relax(&mut t, &g, &[4]), Ok(None));
        }
        assert_eq!(t, text(&[0x0000_0517, 0x0005_3503]));
    }
}
