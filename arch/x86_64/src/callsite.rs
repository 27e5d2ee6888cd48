//! x86_64 call sites a host retargets in the steady state
//! ([`klp_arch::CallSites`]).
//!
//! Two families of sites, found from the relocations a link editor keeps with
//! `--emit-relocs`:
//!
//! | relocation | bytes in the file | site | target | retargeted |
//! |---|---|---|---|---|
//! | `R_X86_64_PLT32`, `R_X86_64_PC32` | `e8 rel32` (`call`), `e9 rel32` (`jmp`) | `r_offset - 1` | `S + A + 4` | the `rel32` only |
//! | `R_X86_64_GOTPCREL`, `R_X86_64_GOTPCRELX` with `A = -4` | `ff 15 disp32` (`call *GOT(%rip)`), `ff 25 disp32` (`jmp *GOT(%rip)`) | `r_offset - 2` | `S` | `67 e8 rel32` (`addr32 call`), `e9 rel32 90` |
//!
//! The second family is how Rust code calls a `#[no_mangle]` function in a
//! position-independent executable: through its GOT entry. It is rewritten the way
//! the link editor relaxes such a call (see [`crate::relax`]): same length, and the
//! same return address `site + 6`, so a thread that is inside the callee returns to
//! the next instruction whichever form it finds there. Its original bytes read the
//! target from the GOT entry ([`CallTarget::Slot`]), so a host counts it as calling a
//! function only while the entry holds that function (an interposed symbol is left
//! alone). The byte before any other PC-relative field is a ModRM byte with
//! `mod = 00`, so the opcode bytes pick the sites exactly.
//!
//! A site is written with `int3` on its first byte while the rest changes; a thread
//! that hits it resumes at the original function, a call with its return address
//! pushed.

use klp_arch::patching::TrapEntry;
use klp_arch::{CallSite, CallSites, CallTarget, InsnBytes, RelocatedCall};

use crate::X86_64;
use crate::insn::{self, CALL_REL32, JMP_REL32, NOP1};
use crate::patching::INT3;

/// `R_X86_64_PC32`.
pub const R_X86_64_PC32: u32 = 2;
/// `R_X86_64_PLT32`.
pub const R_X86_64_PLT32: u32 = 4;
/// `R_X86_64_GOTPCREL`.
pub const R_X86_64_GOTPCREL: u32 = 9;
/// `R_X86_64_GOTPCRELX`.
pub const R_X86_64_GOTPCRELX: u32 = 41;

/// The `addr32` prefix that keeps a relaxed `call *GOT(%rip)` six bytes long.
pub const ADDR32: u8 = 0x67;
/// Opcode of `call`/`jmp r/m64`.
const GROUP5: u8 = 0xff;
/// ModRM of `call *disp32(%rip)` (`/2`, `mod = 00`, `rm = 101`).
const MODRM_CALL_RIP: u8 = 0x15;
/// ModRM of `jmp *disp32(%rip)` (`/4`, `mod = 00`, `rm = 101`).
const MODRM_JMP_RIP: u8 = 0x25;
/// Length of `ff 15 disp32` and `ff 25 disp32`.
const GOT_LEN: usize = 6;

/// The forms of a site ([`CallSite::form`]).
pub mod form {
    /// `e8 rel32`.
    pub const CALL: u8 = 0;
    /// `e9 rel32`.
    pub const JMP: u8 = 1;
    /// `ff 15 disp32`, retargeted as `67 e8 rel32`.
    pub const GOT_CALL: u8 = 2;
    /// `ff 25 disp32`, retargeted as `e9 rel32 90`.
    pub const GOT_JMP: u8 = 3;
}

impl CallSites for X86_64 {
    const RETARGETS_CALLS: bool = true;
    const CALL_TRAP_BYTES: &'static [u8] = &[INT3];

    /// The two families of the module documentation.
    fn classify_call(
        r_type: u32,
        r_addend: i64,
        r_offset: u64,
        text: &[u8],
        text_addr: u64,
    ) -> Option<RelocatedCall> {
        let (back, got) = match r_type {
            R_X86_64_PLT32 | R_X86_64_PC32 => (1, false),
            R_X86_64_GOTPCREL | R_X86_64_GOTPCRELX if r_addend == -4 => (2, true),
            _ => return None,
        };
        let at = r_offset.checked_sub(back)?;
        let code = at
            .checked_sub(text_addr)
            .and_then(|o| usize::try_from(o).ok())
            .and_then(|o| text.get(o..))?;
        let (form, len) = match (got, code) {
            (false, [CALL_REL32, ..]) => (form::CALL, insn::BRANCH_LEN),
            (false, [JMP_REL32, ..]) => (form::JMP, insn::BRANCH_LEN),
            (true, [GROUP5, MODRM_CALL_RIP, ..]) => (form::GOT_CALL, GOT_LEN),
            (true, [GROUP5, MODRM_JMP_RIP, ..]) => (form::GOT_JMP, GOT_LEN),
            _ => return None,
        };
        let site = CallSite::new(at, form, code.get(..len)?)?;
        let target = if got { 0 } else { r_addend.wrapping_add(4) };
        Some(RelocatedCall { site, target })
    }

    fn call_target(site: &CallSite, now: &[u8]) -> Option<CallTarget> {
        if now.len() != site.len() {
            return None;
        }
        let a = site.addr;
        let direct = |op: u8, from: u64, code: &[u8]| {
            insn::rel32_target(code, from, op).map(CallTarget::Direct)
        };
        match site.form {
            form::CALL => direct(CALL_REL32, a, now),
            form::JMP => direct(JMP_REL32, a, now),
            form::GOT_CALL | form::GOT_JMP if now == site.original() => {
                insn::rel32_at(now, 2, a.wrapping_add(GOT_LEN as u64)).map(CallTarget::Slot)
            }
            form::GOT_CALL => match now {
                [ADDR32, rest @ ..] => direct(CALL_REL32, a.wrapping_add(1), rest),
                _ => None,
            },
            form::GOT_JMP => match now {
                [JMP_REL32, _, _, _, _, NOP1] => direct(JMP_REL32, a, now),
                _ => None,
            },
            _ => None,
        }
    }

    fn encode_call(site: &CallSite, func: u64, to: u64) -> Option<InsnBytes> {
        let a = site.addr;
        let (before, branch, after): (&[u8], [u8; 5], &[u8]) = match site.form {
            form::GOT_CALL | form::GOT_JMP if to == func => {
                return InsnBytes::from_slice(site.original());
            }
            form::CALL => (&[], insn::call(a, to).ok()?, &[]),
            form::JMP => (&[], insn::jmp(a, to).ok()?, &[]),
            form::GOT_CALL => (&[ADDR32], insn::call(a.wrapping_add(1), to).ok()?, &[]),
            form::GOT_JMP => (&[], insn::jmp(a, to).ok()?, &[NOP1]),
            _ => return None,
        };
        let mut out = InsnBytes::from_slice(before)?;
        out.extend(&branch)?;
        out.extend(after)?;
        (out.len() == site.len()).then_some(out)
    }

    /// A thread resumes at `func`, a call with its return address (the end of the
    /// site) pushed.
    fn call_trap(site: &CallSite, func: u64) -> Option<TrapEntry> {
        let push = match site.form {
            form::CALL | form::GOT_CALL => Some(site.addr.wrapping_add(site.len() as u64)),
            form::JMP | form::GOT_JMP => None,
            _ => return None,
        };
        Some(TrapEntry {
            at: site.addr,
            pc: func,
            link: None,
            push,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A section at 0x1000 holding, at 0x1010, `bytes` (the rest `int3`).
    fn text_with(bytes: &[u8]) -> [u8; 0x40] {
        let mut t = [0xcc; 0x40];
        t[0x10..0x10 + bytes.len()].copy_from_slice(bytes);
        t
    }

    fn site(form: u8, addr: u64, bytes: &[u8]) -> CallSite {
        CallSite::new(addr, form, bytes).expect("site")
    }

    // Hand-encoded sites at 0x1010 (`rel32`/`disp32` relative to the next
    // instruction, little-endian, SDM: E8 cd, E9 cd, FF /2, FF /4 with ModRM
    // 00 xxx 101 = RIP + disp32).
    /// `call 0x1010` (itself): next 0x1015, rel32 -5.
    const CALL_SELF: [u8; 5] = [0xe8, 0xfb, 0xff, 0xff, 0xff];
    /// `jmp 0x2015`: next 0x1015, rel32 +0x1000.
    const JMP_2015: [u8; 5] = [0xe9, 0x00, 0x10, 0x00, 0x00];
    /// `call *0x3016(%rip)`: next 0x1016, disp32 +0x2000.
    const GOT_CALL_3016: [u8; 6] = [0xff, 0x15, 0x00, 0x20, 0x00, 0x00];
    /// `jmp *0x1006(%rip)`: next 0x1016, disp32 -0x10.
    const GOT_JMP_1006: [u8; 6] = [0xff, 0x25, 0xf0, 0xff, 0xff, 0xff];

    #[test]
    fn relocations_classify_the_sites() {
        for (ty, bytes, form, len) in [
            (R_X86_64_PLT32, &CALL_SELF[..], form::CALL, 5),
            (R_X86_64_PC32, &CALL_SELF[..], form::CALL, 5),
            (R_X86_64_PLT32, &JMP_2015[..], form::JMP, 5),
            (R_X86_64_PC32, &JMP_2015[..], form::JMP, 5),
        ] {
            let t = text_with(bytes);
            // The field is one byte past the opcode; the target is S + A + 4.
            let r = X86_64::classify_call(ty, 0x20, 0x1011, &t, 0x1000).expect("a direct site");
            assert_eq!(r.site, site(form, 0x1010, &bytes[..len]));
            assert_eq!(r.target, 0x24);
            assert_eq!(r.target_of(0x5000), 0x5024);
            let r = X86_64::classify_call(ty, -4, 0x1011, &t, 0x1000).expect("a direct site");
            assert_eq!(r.target_of(0x5000), 0x5000, "S - 4 + 4");
        }
        for (ty, bytes, form) in [
            (R_X86_64_GOTPCREL, GOT_CALL_3016, form::GOT_CALL),
            (R_X86_64_GOTPCRELX, GOT_CALL_3016, form::GOT_CALL),
            (R_X86_64_GOTPCREL, GOT_JMP_1006, form::GOT_JMP),
            (R_X86_64_GOTPCRELX, GOT_JMP_1006, form::GOT_JMP),
        ] {
            let t = text_with(&bytes);
            // The field is two bytes past the opcode; the target is the symbol.
            let r = X86_64::classify_call(ty, -4, 0x1012, &t, 0x1000).expect("a GOT site");
            assert_eq!(r.site, site(form, 0x1010, &bytes));
            assert_eq!(r.target, 0);
            assert_eq!(r.target_of(0x5000), 0x5000);
        }
    }

    #[test]
    fn classification_refuses_what_is_no_call_site() {
        // Wrong opcode for the relocation: `mov 0x0(%rip), %eax` (8b 05) under PC32,
        // `lea` (8d 05) under GOTPCREL, a direct call under GOTPCREL, a GOT call
        // under PLT32.
        let mov = text_with(&[0x8b, 0x05, 0, 0, 0, 0]);
        assert_eq!(
            X86_64::classify_call(R_X86_64_PC32, -4, 0x1012, &mov, 0x1000),
            None
        );
        assert_eq!(
            X86_64::classify_call(R_X86_64_PC32, -4, 0x1011, &mov, 0x1000),
            None
        );
        let lea = text_with(&[0x8d, 0x05, 0, 0, 0, 0]);
        assert_eq!(
            X86_64::classify_call(R_X86_64_GOTPCREL, -4, 0x1012, &lea, 0x1000),
            None
        );
        let call = text_with(&CALL_SELF);
        assert_eq!(
            X86_64::classify_call(R_X86_64_GOTPCRELX, -4, 0x1011, &call, 0x1000),
            None
        );
        let got = text_with(&GOT_CALL_3016);
        assert_eq!(
            X86_64::classify_call(R_X86_64_PLT32, -4, 0x1012, &got, 0x1000),
            None
        );
        // A GOT reference with an addend other than -4.
        for a in [0, -8, 4] {
            assert_eq!(
                X86_64::classify_call(R_X86_64_GOTPCRELX, a, 0x1012, &got, 0x1000),
                None
            );
        }
        // Other relocation types: R_X86_64_64 (1), R_X86_64_32 (10),
        // R_X86_64_REX_GOTPCRELX (42).
        for ty in [1, 10, 42] {
            assert_eq!(X86_64::classify_call(ty, -4, 0x1011, &call, 0x1000), None);
            assert_eq!(X86_64::classify_call(ty, -4, 0x1012, &got, 0x1000), None);
        }
        // Fields outside the section, and a site cut short by its end.
        assert_eq!(
            X86_64::classify_call(R_X86_64_PLT32, -4, 0x1000, &call, 0x1000),
            None
        );
        assert_eq!(
            X86_64::classify_call(R_X86_64_PLT32, -4, 0x0, &call, 0x1000),
            None
        );
        assert_eq!(
            X86_64::classify_call(R_X86_64_PLT32, -4, 0x1041, &call, 0x1000),
            None
        );
        let mut end = [0u8; 0x40];
        end[0x3e..].copy_from_slice(&[0xe8, 0]);
        assert_eq!(
            X86_64::classify_call(R_X86_64_PLT32, -4, 0x103f, &end, 0x1000),
            None
        );
    }

    #[test]
    fn original_and_retargeted_bytes_decode() {
        let call = site(form::CALL, 0x1010, &CALL_SELF);
        assert_eq!(
            X86_64::call_target(&call, &CALL_SELF),
            Some(CallTarget::Direct(0x1010))
        );
        // Retargeted: `call 0x2015`.
        let c2 = [0xe8, 0x00, 0x10, 0x00, 0x00];
        assert_eq!(
            X86_64::call_target(&call, &c2),
            Some(CallTarget::Direct(0x2015))
        );
        assert_eq!(
            X86_64::call_target(&call, &JMP_2015),
            None,
            "a jmp is not the call's form"
        );
        assert_eq!(
            X86_64::call_target(&call, &CALL_SELF[..4]),
            None,
            "cut short"
        );

        let jmp = site(form::JMP, 0x1010, &JMP_2015);
        assert_eq!(
            X86_64::call_target(&jmp, &JMP_2015),
            Some(CallTarget::Direct(0x2015))
        );
        // `jmp 0x1010`.
        let j2 = [0xe9, 0xfb, 0xff, 0xff, 0xff];
        assert_eq!(
            X86_64::call_target(&jmp, &j2),
            Some(CallTarget::Direct(0x1010))
        );
        assert_eq!(X86_64::call_target(&jmp, &CALL_SELF), None);

        let gc = site(form::GOT_CALL, 0x1010, &GOT_CALL_3016);
        assert_eq!(
            X86_64::call_target(&gc, &GOT_CALL_3016),
            Some(CallTarget::Slot(0x3016))
        );
        // `addr32 call 0x1010`: the call at 0x1011, next 0x1016, rel32 -6.
        let gc2 = [0x67, 0xe8, 0xfa, 0xff, 0xff, 0xff];
        assert_eq!(
            X86_64::call_target(&gc, &gc2),
            Some(CallTarget::Direct(0x1010))
        );
        // Another GOT entry is not this site's form; nor is a plain call.
        let other = [0xff, 0x15, 0x00, 0x30, 0x00, 0x00];
        assert_eq!(X86_64::call_target(&gc, &other), None);
        assert_eq!(
            X86_64::call_target(&gc, &[0x90, 0xe8, 0xfa, 0xff, 0xff, 0xff]),
            None
        );

        let gj = site(form::GOT_JMP, 0x1010, &GOT_JMP_1006);
        assert_eq!(
            X86_64::call_target(&gj, &GOT_JMP_1006),
            Some(CallTarget::Slot(0x1006))
        );
        // `jmp 0x2015; nop`.
        let gj2 = [0xe9, 0x00, 0x10, 0x00, 0x00, 0x90];
        assert_eq!(
            X86_64::call_target(&gj, &gj2),
            Some(CallTarget::Direct(0x2015))
        );
        assert_eq!(
            X86_64::call_target(&gj, &[0xe9, 0x00, 0x10, 0x00, 0x00, 0xcc]),
            None
        );
        assert_eq!(X86_64::call_target(&gj, &gc2), None);

        assert_eq!(
            X86_64::call_target(&site(9, 0x1010, &CALL_SELF), &CALL_SELF),
            None
        );
    }

    #[test]
    fn encodings_round_trip_and_refuse_what_is_out_of_reach() {
        let func = 0x1010;
        let sites = [
            site(form::CALL, 0x1010, &CALL_SELF),
            site(form::JMP, 0x1010, &JMP_2015),
            site(form::GOT_CALL, 0x1010, &GOT_CALL_3016),
            site(form::GOT_JMP, 0x1010, &GOT_JMP_1006),
        ];
        // Hand-encoded `call/jmp 0x2015` for each form.
        let expected: [&[u8]; 4] = [
            &[0xe8, 0x00, 0x10, 0x00, 0x00],
            &[0xe9, 0x00, 0x10, 0x00, 0x00],
            // The call at 0x1011: next 0x1016, rel32 0xfff.
            &[0x67, 0xe8, 0xff, 0x0f, 0x00, 0x00],
            &[0xe9, 0x00, 0x10, 0x00, 0x00, 0x90],
        ];
        for (s, e) in sites.iter().zip(expected) {
            let b = X86_64::encode_call(s, func, 0x2015).expect("in reach");
            assert_eq!(b.as_slice(), e, "{s:x?}");
            assert_eq!(
                X86_64::call_target(s, b.as_slice()),
                Some(CallTarget::Direct(0x2015))
            );
            // Every reachable target round-trips, to both ends of the reach.
            // The rel32 is relative to the end of the branch: the site's end, but for
            // `e9 rel32 90` one byte before it.
            let next = s.addr
                + if s.form == form::GOT_JMP {
                    5
                } else {
                    s.len() as u64
                };
            // (`func` itself is the original bytes of a GOT form, below.)
            for to in [0, 0x1011, 0x7fff_0000, next + 0x7fff_ffff] {
                let b =
                    X86_64::encode_call(s, func, to).unwrap_or_else(|| panic!("{s:x?} {to:#x}"));
                assert_eq!(b.len(), s.len());
                assert_eq!(
                    X86_64::call_target(s, b.as_slice()),
                    Some(CallTarget::Direct(to)),
                    "{s:x?} {to:#x}"
                );
            }
            // 2 GiB forward is out of reach (the `call` of `addr32 call` starts one byte
            // in, so it ends where the site ends).
            assert_eq!(
                X86_64::encode_call(s, func, next + 0x8000_0000),
                None,
                "{s:x?}"
            );
            assert_eq!(X86_64::encode_call(s, func, 0x1_0000_2000), None, "{s:x?}");
        }
        // Back at `func`: the GOT forms get their original bytes back.
        assert_eq!(
            X86_64::encode_call(&sites[2], func, func).map(|b| b.as_slice().to_vec()),
            Some(GOT_CALL_3016.to_vec())
        );
        assert_eq!(
            X86_64::encode_call(&sites[3], func, func).map(|b| b.as_slice().to_vec()),
            Some(GOT_JMP_1006.to_vec())
        );
        assert_eq!(
            X86_64::encode_call(&sites[0], func, func).map(|b| b.as_slice().to_vec()),
            Some(CALL_SELF.to_vec())
        );
        // Backwards, to the end of the reach: a call at 0x8000_1000 (next 0x8000_1005)
        // reaches 0x1005 (rel32 -2^31) and no lower.
        let far = site(form::CALL, 0x8000_1000, &CALL_SELF);
        let b = X86_64::encode_call(&far, func, 0x1005).expect("in reach");
        assert_eq!(b.as_slice(), [0xe8, 0x00, 0x00, 0x00, 0x80]);
        assert_eq!(
            X86_64::call_target(&far, b.as_slice()),
            Some(CallTarget::Direct(0x1005))
        );
        assert_eq!(X86_64::encode_call(&far, func, 0x1004), None);
        // No wrap around the address space.
        let top = site(form::CALL, 0xffff_ffff_ffff_fff0, &CALL_SELF);
        assert_eq!(X86_64::encode_call(&top, func, 0x10), None);
        assert_eq!(
            X86_64::encode_call(&site(9, 0x1010, &CALL_SELF), func, 0x2015),
            None
        );
    }

    #[test]
    fn a_trapped_thread_resumes_at_the_function() {
        let f = 0x5000;
        let e = |form, bytes: &[u8]| X86_64::call_trap(&site(form, 0x1010, bytes), f);
        let call = |push| TrapEntry {
            at: 0x1010,
            pc: f,
            link: None,
            push,
        };
        assert_eq!(e(form::CALL, &CALL_SELF), Some(call(Some(0x1015))));
        assert_eq!(e(form::GOT_CALL, &GOT_CALL_3016), Some(call(Some(0x1016))));
        assert_eq!(e(form::JMP, &JMP_2015), Some(call(None)));
        assert_eq!(e(form::GOT_JMP, &GOT_JMP_1006), Some(call(None)));
        assert_eq!(e(9, &CALL_SELF), None);
        assert_eq!(<X86_64 as CallSites>::CALL_TRAP_BYTES, [0xcc]);
        const { assert!(<X86_64 as CallSites>::RETARGETS_CALLS) };
    }
}
