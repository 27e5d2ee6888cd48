//! x86_64 instructions the back-end writes or recognises.

use klp_arch::{EncodeError, displacement};

/// `nopl 0x0(%rax,%rax,1)`: the 5-byte nop of `-mfentry -mnop-mcount` and ftrace.
pub const NOP5: [u8; 5] = [0x0f, 0x1f, 0x44, 0x00, 0x00];
/// `endbr64`: the IBT landing pad that may precede the site.
pub const ENDBR64: [u8; 4] = [0xf3, 0x0f, 0x1e, 0xfa];
/// Opcode of `call rel32`.
pub const CALL_REL32: u8 = 0xe8;
/// Opcode of `jmp rel32`.
pub const JMP_REL32: u8 = 0xe9;
/// One-byte `nop`, used to fill a site longer than the branch.
pub const NOP1: u8 = 0x90;
/// Length of `call`/`jmp rel32`.
pub const BRANCH_LEN: usize = 5;
/// Reach of a rel32 displacement: `[-2 GiB, 2 GiB)` from the next instruction.
pub const REL32_LIMIT: u64 = 1 << 31;

/// The nops compilers and assemblers emit (Intel SDM's recommended forms, plus the
/// `cs`-prefixed ones LLVM uses for 10 and 11 bytes).
pub const NOPS: [&[u8]; 11] = [
    &[0x90],
    &[0x66, 0x90],
    &[0x0f, 0x1f, 0x00],
    &[0x0f, 0x1f, 0x40, 0x00],
    &[0x0f, 0x1f, 0x44, 0x00, 0x00],
    &[0x66, 0x0f, 0x1f, 0x44, 0x00, 0x00],
    &[0x0f, 0x1f, 0x80, 0x00, 0x00, 0x00, 0x00],
    &[0x0f, 0x1f, 0x84, 0x00, 0x00, 0x00, 0x00, 0x00],
    &[0x66, 0x0f, 0x1f, 0x84, 0x00, 0x00, 0x00, 0x00, 0x00],
    &[0x66, 0x2e, 0x0f, 0x1f, 0x84, 0x00, 0x00, 0x00, 0x00, 0x00],
    &[
        0x66, 0x66, 0x2e, 0x0f, 0x1f, 0x84, 0x00, 0x00, 0x00, 0x00, 0x00,
    ],
];

/// Length of the nop `code` starts with, if it starts with one of [`NOPS`].
pub fn nop_len(code: &[u8]) -> Option<usize> {
    // Longest first, so `66 90` is not mistaken for anything shorter.
    NOPS.iter()
        .rev()
        .find(|n| code.starts_with(n))
        .map(|n| n.len())
}

fn rel32(op: u8, from: u64, to: u64) -> Result<[u8; 5], EncodeError> {
    let next = from.wrapping_add(BRANCH_LEN as u64);
    let d = displacement(next, to, REL32_LIMIT, 1).map_err(|e| match e {
        EncodeError::OutOfRange { limit, .. } => EncodeError::OutOfRange { from, to, limit },
        other => other,
    })?;
    let r = (d as i32).to_le_bytes();
    Ok([op, r[0], r[1], r[2], r[3]])
}

/// `call to`, placed at `from`.
pub fn call(from: u64, to: u64) -> Result<[u8; 5], EncodeError> {
    rel32(CALL_REL32, from, to)
}

/// `jmp to`, placed at `from`.
pub fn jmp(from: u64, to: u64) -> Result<[u8; 5], EncodeError> {
    rel32(JMP_REL32, from, to)
}

/// The target of a `call`/`jmp rel32` at `from`, if `code` starts with `op`.
pub fn rel32_target(code: &[u8], from: u64, op: u8) -> Option<u64> {
    if *code.first()? != op {
        return None;
    }
    rel32_at(code, 1, from.wrapping_add(BRANCH_LEN as u64))
}

/// The address that the 32-bit displacement at `code[at..at + 4]` (little-endian)
/// gives relative to `next`, the address of the next instruction.
pub fn rel32_at(code: &[u8], at: usize, next: u64) -> Option<u64> {
    let r: [u8; 4] = code.get(at..at.checked_add(4)?)?.try_into().ok()?;
    Some(next.wrapping_add(i64::from(i32::from_le_bytes(r)) as u64))
}

#[cfg(test)]
mod tests {
    use super::*;

    // Golden bytes written from the SDM encoding rules (E8/E9 cd, rel32 relative to the
    // next instruction), and checked by `ci/objdump-check` against binutils.
    #[test]
    fn call_and_jmp_golden() {
        assert_eq!(call(0x1000, 0x2000), Ok([0xe8, 0xfb, 0x0f, 0x00, 0x00]));
        assert_eq!(jmp(0x1000, 0x1005), Ok([0xe9, 0, 0, 0, 0]));
        assert_eq!(jmp(0x1000, 0x1000), Ok([0xe9, 0xfb, 0xff, 0xff, 0xff]));
        // Kernel-style addresses near the top of the address space.
        assert_eq!(
            call(0xffff_ffff_8100_0000, 0xffff_ffff_a000_0000),
            Ok([0xe8, 0xfb, 0xff, 0xff, 0x1e])
        );
    }

    #[test]
    fn rel32_range_edges() {
        let from = 0x1_0000_0000u64;
        let next = from + 5;
        assert_eq!(
            call(from, next + 0x7fff_ffff),
            Ok([0xe8, 0xff, 0xff, 0xff, 0x7f])
        );
        assert_eq!(
            call(from, next + 0x8000_0000),
            Err(EncodeError::OutOfRange {
                from,
                to: next + 0x8000_0000,
                limit: 1 << 31
            })
        );
        assert_eq!(
            jmp(from, next - 0x8000_0000),
            Ok([0xe9, 0x00, 0x00, 0x00, 0x80])
        );
        assert!(jmp(from, next - 0x8000_0001).is_err());
    }

    #[test]
    fn nop_table() {
        for (i, n) in NOPS.iter().enumerate() {
            assert_eq!(n.len(), i + 1);
            assert_eq!(nop_len(n), Some(i + 1));
        }
        assert_eq!(nop_len(&[0x66, 0x90, 0x90]), Some(2));
        assert_eq!(nop_len(&[0x0f, 0x1f, 0x44, 0x00]), None, "cut short");
        assert_eq!(nop_len(&[0x55]), None);
        assert_eq!(
            rel32_target(&[0xe8, 0xfb, 0x0f, 0, 0], 0x1000, CALL_REL32),
            Some(0x2000)
        );
        assert_eq!(rel32_target(&[0xe8, 0xfb], 0x1000, CALL_REL32), None);
    }
}
