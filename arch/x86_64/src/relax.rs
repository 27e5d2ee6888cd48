//! GOT-relative references relaxed into direct ones (psABI §B.2 "Optimize GOTPCRELX
//! Relocations"), for a converter ([`Arch::relax_got`](klp_arch::Arch::relax_got)).
//!
//! `R_X86_64_GOTPCRELX` / `R_X86_64_REX_GOTPCRELX` with addend -4 on
//!
//! * `mov foo@GOTPCREL(%rip), %reg` (`[REX] 8b /r`, ModRM `00 reg 101`) →
//!   `lea foo(%rip), %reg` (`[REX] 8d /r`) with `R_X86_64_PC32`;
//! * `call *foo@GOTPCREL(%rip)` (`ff 15`) → `addr32 call foo` (`67 e8`) with
//!   `R_X86_64_PLT32` at the same offset;
//! * `jmp *foo@GOTPCREL(%rip)` (`ff 25`) → `jmp foo; nop` (`e9 rel32 90`) with
//!   `R_X86_64_PLT32` one byte earlier (the field the `e9` reads), same addend.
//!
//! These are GNU ld's rewrites (`-z call-nop=prefix-addr`, its default); the
//! relocation types are the ones the assembler writes for the direct instruction
//! (`R_X86_64_PC32` for `lea`, `R_X86_64_PLT32` for a branch, psABI §4.4).
//! `R_X86_64_GOTPCREL` carries no marker that the instruction may be rewritten and is
//! not relaxable.

use klp_arch::relax::bytes_at;
use klp_arch::{GotRef, InsnBytes, RelaxFound, RelaxRefused, Relaxed};

/// `R_X86_64_PC32`.
const PC32: u32 = 2;
/// `R_X86_64_PLT32`.
const PLT32: u32 = 4;
/// `R_X86_64_GOTPCRELX`.
pub const GOTPCRELX: u32 = 41;
/// `R_X86_64_REX_GOTPCRELX`.
pub const REX_GOTPCRELX: u32 = 42;

const EXPECTED: &str = "on `mov foo@GOTPCREL(%rip), %reg`, `call *foo@GOTPCREL(%rip)` \
                        and `jmp *foo@GOTPCREL(%rip)` with addend -4";

/// Whether `r_type` is relaxed here.
pub fn relaxable(r_type: u32) -> bool {
    matches!(r_type, GOTPCRELX | REX_GOTPCRELX)
}

/// See the module docs; `partners` are not used (x86_64 has no partnered types).
pub fn relax(text: &mut [u8], got: &GotRef) -> Result<Option<Relaxed>, RelaxRefused> {
    if !relaxable(got.r_type) {
        return Ok(None);
    }
    let refuse = |found: RelaxFound| RelaxRefused {
        expected: EXPECTED,
        found,
    };
    let offset = got.offset;
    // The opcode and ModRM bytes before the 4-byte displacement, and for the REX form
    // the prefix before them.
    let (before, len): (u64, u64) = if got.r_type == REX_GOTPCRELX {
        (3, 7)
    } else {
        (2, 6)
    };
    let Some(start) = offset.checked_sub(before) else {
        return Err(refuse(RelaxFound::NoRoom { offset }));
    };
    let Some(insn) = bytes_at(text, start, len) else {
        return Err(refuse(RelaxFound::PastEnd));
    };
    let found = |addend: Option<i64>| {
        refuse(RelaxFound::Bytes {
            bytes: InsnBytes::prefix_of(insn),
            addend,
        })
    };
    if got.addend != -4 {
        return Err(found(Some(got.addend)));
    }
    // `insn` has `len` bytes: the prefix (REX form), opcode, ModRM, field.
    let (prefix, op, modrm) = match *insn {
        [p, o, m, ..] if before == 3 => (Some(p), o, m),
        [o, m, ..] => (None, o, m),
        _ => return Err(found(None)),
    };
    let rex_ok = prefix.is_none_or(|p| p & 0xf0 == 0x40);
    // Where the opcode is, and what is written from there.
    let op_at = start.wrapping_add(u64::from(prefix.is_some()));
    let (new, bytes): (Relaxed, &[u8]) = if op == 0x8b && modrm & 0xc7 == 0x05 && rex_ok {
        // mov r, [rip + disp32] -> lea r, [rip + disp32]: same prefix and ModRM.
        let new = Relaxed {
            r_type: PC32,
            offset,
            rewrite: "mov → lea",
        };
        (new, &[0x8d])
    } else if got.r_type == GOTPCRELX && op == 0xff && modrm == 0x15 {
        // call *[rip + disp32] -> addr32 call rel32 (the prefix keeps the length).
        let new = Relaxed {
            r_type: PLT32,
            offset,
            rewrite: "call * → addr32 call",
        };
        (new, &[0x67, 0xe8])
    } else if got.r_type == GOTPCRELX && op == 0xff && modrm == 0x25 {
        // jmp *[rip + disp32] -> jmp rel32; nop: rel32 starts one byte earlier and
        // still ends where the instruction ended before the nop, so A stays -4
        // relative to the new P. The field is zeroed (the kernel's writer refuses a
        // non-zero field).
        let new = Relaxed {
            r_type: PLT32,
            offset: op_at.wrapping_add(1),
            rewrite: "jmp * → jmp; nop",
        };
        (new, &[0xe9, 0, 0, 0, 0, 0x90])
    } else {
        return Err(found(None));
    };
    // In the section: `insn` (opcode, ModRM and field from `op_at`) was read there.
    let dst = usize::try_from(op_at)
        .ok()
        .and_then(|at| text.get_mut(at..at.checked_add(bytes.len())?));
    let Some(dst) = dst else {
        return Err(refuse(RelaxFound::PastEnd));
    };
    dst.copy_from_slice(bytes);
    Ok(Some(new))
}

#[cfg(test)]
mod tests {
    extern crate std;
    use super::*;
    use std::vec;

    fn relax_at(
        t: &mut [u8],
        r_type: u32,
        offset: u64,
        addend: i64,
    ) -> Result<Option<Relaxed>, RelaxRefused> {
        relax(
            t,
            &GotRef {
                r_type,
                offset,
                addend,
                address: None,
            },
        )
    }

    #[test]
    fn mov_call_and_jmp() {
        // mov 0(%rip), %rax (REX.W 8b 05): field at 3.
        let mut t = vec![0x48, 0x8b, 0x05, 0, 0, 0, 0, 0xc3];
        let d = relax_at(&mut t, 42, 3, -4).unwrap().unwrap();
        assert_eq!((d.r_type, d.offset), (2, 3));
        assert_eq!(t, [0x48, 0x8d, 0x05, 0, 0, 0, 0, 0xc3]);
        // mov 0(%rip), %r12d (REX.R 44 8b 25).
        let mut t = vec![0x44, 0x8b, 0x25, 0, 0, 0, 0];
        relax_at(&mut t, 42, 3, -4).unwrap().unwrap();
        assert_eq!(t[..3], [0x44, 0x8d, 0x25]);
        // call *0(%rip): ff 15 -> 67 e8, same field.
        let mut t = vec![0xff, 0x15, 0, 0, 0, 0];
        let d = relax_at(&mut t, 41, 2, -4).unwrap().unwrap();
        assert_eq!((d.r_type, d.offset), (4, 2));
        assert_eq!(t, [0x67, 0xe8, 0, 0, 0, 0]);
        // jmp *0(%rip): ff 25 -> e9 rel32 90, field one byte earlier.
        let mut t = vec![0xff, 0x25, 0, 0, 0, 0];
        let d = relax_at(&mut t, 41, 2, -4).unwrap().unwrap();
        assert_eq!((d.r_type, d.offset), (4, 1));
        assert_eq!(t, [0xe9, 0, 0, 0, 0, 0x90]);
    }

    #[test]
    fn refusals_change_nothing() {
        for (bytes, ty, off, addend) in [
            // add foo@GOTPCREL(%rip), %rax: 48 03 05.
            (vec![0x48, 0x03, 0x05, 0, 0, 0, 0], 42, 3, -4),
            // mov with an addend other than -4.
            (vec![0x48, 0x8b, 0x05, 0, 0, 0, 0], 42, 3, 0),
            // mov through a base register (ModRM 00 000 000): not RIP-relative.
            (vec![0x48, 0x8b, 0x00, 0, 0, 0, 0], 42, 3, -4),
            // REX_GOTPCRELX without a REX prefix.
            (vec![0x90, 0x8b, 0x05, 0, 0, 0, 0], 42, 3, -4),
            // A field too close to the start, and one past the end.
            (vec![0x8b, 0x05, 0, 0, 0, 0], 41, 1, -4),
            (vec![0x8b, 0x05, 0, 0, 0], 41, 2, -4),
        ] {
            let mut t = bytes.clone();
            let e = relax_at(&mut t, ty, off, addend).unwrap_err();
            assert!(e.expected.contains("mov foo@GOTPCREL"), "{e:?}");
            assert_eq!(t, bytes);
        }
        // What was found, as values.
        let mut t = vec![0x48, 0x03, 0x05, 0, 0, 0, 0];
        let e = relax_at(&mut t, 42, 3, -4).unwrap_err();
        assert_eq!(
            e.found,
            RelaxFound::Bytes {
                bytes: InsnBytes::prefix_of(&[0x48, 0x03, 0x05, 0, 0, 0, 0]),
                addend: None
            }
        );
        assert_eq!(
            relax_at(&mut t, 41, 1, -4).unwrap_err().found,
            RelaxFound::NoRoom { offset: 1 }
        );
        // Not relaxable at all: GOTPCREL (9), PLT32 (4).
        let mut t = vec![0x48, 0x8b, 0x05, 0, 0, 0, 0];
        assert_eq!(relax_at(&mut t, 9, 3, -4), Ok(None));
        assert_eq!(relax_at(&mut t, 4, 3, -4), Ok(None));
    }
}
