//! Tests of the entry trampoline, the stub and the plans on real code (under
//! `qemu-riscv64`).

extern crate std;

use super::*;
use crate::Riscv64;
use core::sync::atomic::AtomicU64;
use klp_arch::patching::{PlanCtx, SitePlanner, SiteState};
use klp_arch::{Arch, FuncInfo, Live};
use std::sync::Mutex;
use std::vec::Vec;

/// The decision is process-wide: one test at a time sets it.
static SERIAL: Mutex<()> = Mutex::new(());

#[test]
fn frame_layout() {
    assert_eq!((A, FA, T2), (0, 64, 128));
    assert_eq!((RECORD, CALLEE), (144, 160));
    assert_eq!(FRAME, 176);
}

#[test]
fn stub_layout() {
    let b = stub_bytes();
    assert_eq!(&b[16..], &address().to_le_bytes());
    assert_eq!(&b[..4], &0x0000_0317u32.to_le_bytes(), "auipc t1, 0");
}

unsafe extern "C" {
    fn mmap(a: *mut u8, len: usize, prot: i32, flags: i32, fd: i32, off: i64) -> *mut u8;
    fn munmap(a: *mut u8, len: usize) -> i32;
}

/// A fresh read + write + execute page (QEMU and Linux allow it), unmapped on drop.
struct Page(*mut u8);

impl Page {
    fn new() -> Page {
        const RWX: i32 = 7;
        const PRIVATE_ANON: i32 = 0x22;
        // SAFETY: an anonymous private mapping has no preconditions.
        let p = unsafe { mmap(core::ptr::null_mut(), 4096, RWX, PRIVATE_ANON, -1, 0) };
        assert!(!p.is_null() && p as isize != -1);
        Page(p)
    }

    fn addr(&self, off: usize) -> u64 {
        self.0 as u64 + off as u64
    }

    /// Writes `bytes` at `off` (nobody runs them yet).
    fn put(&self, off: usize, bytes: &[u8]) {
        assert!(off + bytes.len() <= 4096);
        // SAFETY: inside our writable page, executed by nobody now (1–3).
        unsafe { crate::live::write_text(self.0.wrapping_add(off), bytes) };
    }

    fn read(&self, off: usize, len: usize) -> Vec<u8> {
        // SAFETY: inside our page.
        unsafe { std::slice::from_raw_parts(self.0.wrapping_add(off), len).to_vec() }
    }
}

impl Drop for Page {
    fn drop(&mut self) {
        // SAFETY: our page, no longer used.
        unsafe { munmap(self.0, 4096) };
    }
}

extern "C" fn stub_target(x: u64) -> u64 {
    x * 3 + 1
}

/// A stub written to a fresh page and called like a function reaches its target with
/// the argument and returns to the caller (`ra` kept).
#[test]
fn a_stub_runs() {
    let p = Page::new();
    p.put(
        8,
        &crate::patching::stub_bytes_to(stub_target as *const () as u64),
    );
    // SAFETY: the page holds a stub that jumps to `stub_target`, which has this
    // signature.
    let f = unsafe { core::mem::transmute::<u64, extern "C" fn(u64) -> u64>(p.addr(8)) };
    assert_eq!(f(core::hint::black_box(5)), 16);
}

// ------------------------------------------------------------ through the trampoline

/// What the decision saw: the site, `S + 8` from the trampoline's record, the callee
/// record's return address, and the trampoline's frame pointer.
static SEEN: [AtomicU64; 4] = [const { AtomicU64::new(0) }; 4];
/// What the decision returns.
static CHOICE: AtomicU64 = AtomicU64::new(0);
static CALLS: AtomicU64 = AtomicU64::new(0);

/// The decision: records what it sees through the trampoline's frame pointer.
extern "C" fn observe(site: u64, fp: u64) -> u64 {
    // SAFETY: `fp` is the trampoline's `s0`: just above its frame record, whose `fp`
    // field is just above the callee record; both live in the trampoline's frame,
    // which outlives this call.
    let (ra0, callee, ra1) = unsafe {
        let callee = *((fp - 16) as *const u64);
        (
            *((fp - 8) as *const u64),
            callee,
            *((callee - 8) as *const u64),
        )
    };
    assert_eq!(callee, fp + 16, "the callee record is just above");
    for (s, v) in SEEN.iter().zip([site, ra0, ra1, fp]) {
        s.store(v, Ordering::Relaxed);
    }
    CALLS.fetch_add(1, Ordering::Relaxed);
    CHOICE.load(Ordering::Relaxed)
}

/// The installed decision: passes its `s0` (the trampoline's frame pointer) to
/// [`observe`] after clobbering every caller-saved register the trampoline must
/// restore, so that a register it forgets to save shows.
#[unsafe(naked)]
extern "C" fn probe(_site: u64) -> u64 {
    core::arch::naked_asm!(
        ".option push",
        ".option arch, +d",
        "addi sp, sp, -16",
        "sd ra, 8(sp)",
        "sd s0, 0(sp)",
        "mv a1, s0",
        "addi s0, sp, 16",
        "li a2, 0x5a5a",
        "mv a3, a2",
        "mv a4, a2",
        "mv a5, a2",
        "mv a6, a2",
        "mv a7, a2",
        "mv t0, a2",
        "mv t1, a2",
        "mv t2, a2",
        "mv t3, a2",
        "mv t4, a2",
        "mv t5, a2",
        "mv t6, a2",
        "fmv.d.x fa0, a2",
        "fmv.d.x fa1, a2",
        "fmv.d.x fa2, a2",
        "fmv.d.x fa3, a2",
        "fmv.d.x fa4, a2",
        "fmv.d.x fa5, a2",
        "fmv.d.x fa6, a2",
        "fmv.d.x fa7, a2",
        "call {observe}",
        "ld ra, 8(sp)",
        "ld s0, 0(sp)",
        "addi sp, sp, 16",
        "ret",
        ".option pop",
        observe = sym observe,
    )
}

/// Returned through a hidden pointer (larger than 16 bytes).
#[repr(C)]
#[derive(Debug, PartialEq, Clone, Copy)]
struct Big {
    ints: u64,
    floats: f64,
    stack: u64,
    which: u64,
}

fn weigh(i: [u64; 8], f: [f64; 8], s: [u64; 2], which: u64) -> Big {
    let mut ints = 0u64;
    let mut floats = 0.0;
    for (k, (a, b)) in i.iter().zip(f).enumerate() {
        ints = ints.wrapping_add(a.wrapping_mul(k as u64 + 1));
        floats += b * (k as f64 + 10.0);
    }
    Big {
        ints,
        floats,
        stack: s[0] * 3 + s[1] * 7,
        which,
    }
}

type Many = extern "C" fn(
    u64,
    u64,
    u64,
    u64,
    u64,
    u64,
    u64,
    u64,
    f64,
    f64,
    f64,
    f64,
    f64,
    f64,
    f64,
    f64,
    u64,
    u64,
) -> Big;

macro_rules! many {
    ($name:ident, $which:expr) => {
        #[allow(clippy::too_many_arguments)]
        extern "C" fn $name(
            a: u64,
            b: u64,
            c: u64,
            d: u64,
            e: u64,
            f: u64,
            g: u64,
            h: u64,
            f0: f64,
            f1: f64,
            f2: f64,
            f3: f64,
            f4: f64,
            f5: f64,
            f6: f64,
            f7: f64,
            s0: u64,
            s1: u64,
        ) -> Big {
            weigh(
                [a, b, c, d, e, f, g, h],
                [f0, f1, f2, f3, f4, f5, f6, f7],
                [s0, s1],
                $which,
            )
        }
    };
}

many!(many_body, 1);
many!(many_v2, 2);

#[inline(never)]
fn call_many(f: Many) -> Big {
    f(
        1, 2, 3, 4, 5, 6, 7, 8, 0.5, 1.5, 2.5, 3.5, 4.5, 5.5, 6.5, 7.5, 100, 1000,
    )
}

fn want(which: u64) -> Big {
    weigh(
        [1, 2, 3, 4, 5, 6, 7, 8],
        [0.5, 1.5, 2.5, 3.5, 4.5, 5.5, 6.5, 7.5],
        [100, 1000],
        which,
    )
}

/// A site in its trampoline state written by the assembler, in front of `many_body`
/// (no stub: the `auipc` pair reaches the trampoline).
#[unsafe(naked)]
#[allow(clippy::too_many_arguments)]
extern "C" fn many_site(
    _a: u64,
    _b: u64,
    _c: u64,
    _d: u64,
    _e: u64,
    _f: u64,
    _g: u64,
    _h: u64,
    _f0: f64,
    _f1: f64,
    _f2: f64,
    _f3: f64,
    _f4: f64,
    _f5: f64,
    _f6: f64,
    _f7: f64,
    _s0: u64,
    _s1: u64,
) -> Big {
    core::arch::naked_asm!(
        ".option push",
        ".option norelax",
        "1:",
        "auipc t0, %pcrel_hi({tramp})",
        "jalr t0, %pcrel_lo(1b)(t0)",
        "2:",
        "auipc t1, %pcrel_hi({body})",
        "jalr zero, %pcrel_lo(2b)(t1)",
        ".option pop",
        tramp = sym entry_trampoline,
        body = sym many_body,
    )
}

/// Calls `t2_site` with `t2 = v`.
#[unsafe(naked)]
extern "C" fn call_with_t2(_v: u64) -> u64 {
    core::arch::naked_asm!(
        "addi sp, sp, -16",
        "sd ra, 8(sp)",
        "mv t2, a0",
        "call {site}",
        "ld ra, 8(sp)",
        "addi sp, sp, 16",
        "ret",
        site = sym t2_site,
    )
}

/// A site in its trampoline state, in front of `t2_body`.
#[unsafe(naked)]
extern "C" fn t2_site() -> u64 {
    core::arch::naked_asm!(
        ".option push",
        ".option norelax",
        "1:",
        "auipc t0, %pcrel_hi({tramp})",
        "jalr t0, %pcrel_lo(1b)(t0)",
        "2:",
        "auipc t1, %pcrel_hi({body})",
        "jalr zero, %pcrel_lo(2b)(t1)",
        ".option pop",
        tramp = sym entry_trampoline,
        body = sym t2_body,
    )
}

/// Returns the static chain it was given.
#[unsafe(naked)]
extern "C" fn t2_body() -> u64 {
    core::arch::naked_asm!("mv a0, t2", "ret")
}

#[unsafe(naked)]
extern "C" fn t2_v2() -> u64 {
    core::arch::naked_asm!("addi a0, t2, 1", "ret")
}

/// Every argument register (and stack arguments, and the hidden result pointer) live
/// through the trampoline, for both outcomes; the decision sees the site and the two
/// frame records.
#[test]
fn the_trampoline_runs_the_chosen_implementation() {
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    set_decision(probe);
    let site = many_site as *const () as u64;
    let caller = call_many as *const () as u64;
    for (choice, which) in [(0, 1), (many_v2 as *const () as u64, 2), (0, 1)] {
        CHOICE.store(choice, Ordering::Relaxed);
        let before = CALLS.load(Ordering::Relaxed);
        assert_eq!(call_many(many_site), want(which), "choice {choice:#x}");
        assert_eq!(CALLS.load(Ordering::Relaxed), before + 1);
        let seen: Vec<u64> = SEEN.iter().map(|s| s.load(Ordering::Relaxed)).collect();
        assert_eq!(seen[0], site, "the decision gets the site");
        assert_eq!(
            seen[1],
            site + 8,
            "the trampoline's record returns into the site"
        );
        assert!(
            seen[2] > caller && seen[2] - caller < 4096,
            "the callee record returns into the caller: {seen:x?} vs {caller:#x}"
        );
        assert_eq!(seen[3] % 16, 0, "{seen:x?}");
    }
    for (choice, want) in [(0, 0x1234), (t2_v2 as *const () as u64, 0x1235)] {
        CHOICE.store(choice, Ordering::Relaxed);
        assert_eq!(call_with_t2(0x1234), want, "the static chain");
    }
    assert_eq!(SEEN[0].load(Ordering::Relaxed), t2_site as *const () as u64);
    CHOICE.store(0, Ordering::Relaxed);
}

// ------------------------------------------------------------ plans on real code

/// A site on a fresh page, taken through every state by its plans with
/// `store_text`, called in each: `site` (8 bytes, `original`) at 0, then a far jump
/// to `many_body` (the site's continuation at `S + 8`), the site's stub to the
/// trampoline at 0x20, and a far jump to `many_v2` at 0x40 (the jump state's target,
/// within `jal`'s reach).
fn run_states(original: [u8; 8]) {
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    set_decision(probe);
    let p = Page::new();
    p.put(0, &original);
    p.put(
        8,
        &crate::patching::stub_bytes_to(many_body as *const () as u64),
    );
    p.put(0x20, &stub_bytes());
    p.put(
        0x40,
        &crate::patching::stub_bytes_to(many_v2 as *const () as u64),
    );
    let s = p.addr(0);
    let site = Riscv64::find_site(&original, FuncInfo::at(s)).expect("a site");
    assert!(Riscv64::live_site(&site));
    let ctx = PlanCtx {
        addr: s,
        stub: p.addr(0x20),
        trampoline: address(),
    };
    // SAFETY: the page holds a site and continuations of `many_body`'s signature.
    let f = unsafe { core::mem::transmute::<u64, Many>(s) };
    assert_eq!(call_many(f), want(1), "as found");
    let v2 = many_v2 as *const () as u64;
    let jump = SiteState::Jump(p.addr(0x40));
    let states = [
        (SiteState::Trampoline, 0, 1),
        (SiteState::Trampoline, v2, 2),
        (jump, 0, 2),
        (SiteState::Trampoline, 0, 1),
        (SiteState::Original, v2, 1),
        (jump, 0, 2),
        (SiteState::Original, 0, 1),
    ];
    for (to, choice, which) in states {
        CHOICE.store(choice, Ordering::Relaxed);
        let plan = Riscv64::plan(&site, &p.read(0, 8), to, &ctx).expect("a plan");
        for st in plan.steps() {
            let dst = p.0.wrapping_add(usize::from(st.offset));
            // SAFETY: our writable page (1); the plan's steps in order, with no other
            // thread to synchronise (2); this test is the only writer (3).
            assert!(unsafe { Riscv64::store_text(dst, st.bytes.as_slice()) });
        }
        let before = CALLS.load(Ordering::Relaxed);
        assert_eq!(call_many(f), want(which), "{to:?}, choice {choice:#x}");
        let entered = CALLS.load(Ordering::Relaxed) - before;
        assert_eq!(entered, u64::from(to == SiteState::Trampoline), "{to:?}");
        if to == SiteState::Trampoline {
            assert_eq!(SEEN[0].load(Ordering::Relaxed), s);
        }
        if to == SiteState::Original {
            assert_eq!(p.read(0, 8), original, "restored");
        }
        let again = Riscv64::plan(&site, &p.read(0, 8), to, &ctx).expect("a plan");
        assert!(again.is_empty());
    }
    CHOICE.store(0, Ordering::Relaxed);
}

#[test]
fn a_nop_site_runs_every_state() {
    run_states([0x13, 0, 0, 0, 0x13, 0, 0, 0]);
}

#[test]
fn a_c_nop_site_runs_every_state() {
    run_states([1, 0, 1, 0, 1, 0, 1, 0]);
}

crate::patchable_wrapper! {
    /// A wrapper as klp-user's `patchable!` makes it.
    fn klp_riscv64_wrapped(x: u64) -> u64
}

#[allow(non_snake_case)]
mod klp_riscv64_wrapped {
    #[inline(never)]
    pub(super) extern "C" fn body(x: u64) -> u64 {
        x + 7
    }
}

/// The wrapper: a 4-byte aligned `nop; nop` site the back-end rewrites live, whose
/// tail branch `wrapper_body` finds.
#[test]
fn the_wrapper_is_a_live_site_with_a_body() {
    assert_eq!(klp_riscv64_wrapped(1), 8);
    let w = klp_riscv64_wrapped as *const () as u64;
    assert_eq!(w % 4, 0);
    // SAFETY: the wrapper's 16 bytes are mapped text.
    let code = unsafe { std::slice::from_raw_parts(w as *const u8, 16) };
    let site = Riscv64::find_site(code, FuncInfo::at(w)).expect("a site");
    assert_eq!(site.form.code, crate::site::form::NOPS);
    assert!(Riscv64::live_site(&site));
    let body = klp_riscv64_wrapped::body as *const () as u64;
    assert_eq!(Riscv64::wrapper_body(w + 8, &code[8..]), Some(body));
}
