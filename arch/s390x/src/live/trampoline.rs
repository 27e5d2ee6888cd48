//! The entry trampoline: what a redirected s390x patch site calls.
//!
//! A patch site `S` is one 6-byte `brcl 0,…` at a function's entry: the first
//! instruction of a `patchable!` wrapper (LLVM cannot emit patchable function entries
//! for s390x, so for Rust the naked wrapper is the means), or gcc's
//! `-pg -mfentry -mnop-mcount` site in C. It is rewritten to
//! `brasl %r0,entry_trampoline`, the kernel's ftrace call: the return address goes to
//! r0, so r14 keeps the caller's. The trampoline asks the host's decision function (see
//! [`set_decision`]) which implementation the calling thread runs and continues there:
//! at `S + 6` (the original body), or at a replacement function entered as if the
//! caller had called it.
//!
//! A site whose `brasl` cannot reach the trampoline (±4 GiB: a shared object mapped
//! far from the executable) calls a *far stub* within its reach instead
//! ([`stub_bytes`]), which loads the trampoline's address into r1 and branches there;
//! the host decides where stubs go.
//!
//! # Register contract
//!
//! **On entry** (just executed `brasl %r0,entry_trampoline` at the site `S`, or
//! `brasl %r0,stub` and the stub, which leaves r1 = the trampoline):
//! * r0 = `S + 6`; r14 = the caller's return address; r15 = the caller's stack
//!   pointer. The patched function has made no frame, so the 160-byte register save
//!   area at `0(%r15)` is still the patched function's (the callee's) to use;
//! * the arguments: r2–r6 (r2 also carries the address of a returned aggregate),
//!   f0, f2, f4, f6 and, in the vector ABI, v24–v31; stack arguments at `160(%r15)`
//!   and above.
//!
//! **Inside**: r2–r14 go to their slots of that save area (r14 at `112(%r15)`, where
//! the patched function's prologue would put it) and f0/f2/f4/f6 to theirs (128–152).
//! One allocation of [`FRAME`] bytes below it holds a [`Frame`]: a 160-byte frame
//! standing for the patched function (back chain → the caller's r15, r14 slot =
//! `S + 6`), v24–v31 (only if [`set_vector_facility`] said the machine has them),
//! and the trampoline's own frame, whose back chain points to the patched function's.
//! A back-chain walk from inside the decision thus sees trampoline → patched function
//! (`S + 6`) → caller, and a conservative stack scan finds `S + 6`. `decide(S)` is
//! called with r15 = the trampoline's own frame.
//!
//! **On exit**, r2–r14, f0/f2/f4/f6 and (if saved) v24–v31 hold their entry values,
//! r15 is the caller's again, and:
//! * `decide` returned 0 (or no decision function is installed): `br %r1` with
//!   r1 = `S + 6` (r0 cannot be a branch address register: `br %r0` does not branch),
//!   which runs the original function body as if the site were the nop;
//! * `decide` returned `T`: `br %r1` with r1 = `T`, so `T` runs with r14 = the caller's
//!   return address, r15 = the caller's stack pointer and the caller's arguments:
//!   exactly a direct call of `T`.
//!
//! Clobbered: r0 and r1 (volatile and never arguments) and the condition code. r0 is
//! GNU C's static chain on s390x, but the site's `brasl %r0` has overwritten it before
//! the trampoline runs (gcc refuses `-mfentry` for nested functions for that reason):
//! functions that take a static chain cannot be patched. Not preserved: v24–v31 when
//! [`set_vector_facility`] was not told about the facility (code built for the z10
//! baseline, as Rust's s390x target is, never passes vector arguments), the low halves
//! of v0–v15 (not arguments), the FPC.
//!
//! The decision function must not unwind, must be async-signal-safe if patched
//! functions are called from signal handlers, and must return 0 or the (even) address
//! of a function with the patched function's signature.

use core::mem::{offset_of, size_of};
use core::sync::atomic::{AtomicU16, AtomicU64, AtomicUsize, Ordering};

use super::klp_s390x_sync_icache;
use crate::unwind::{FRAME_R14, STACK_FRAME_OVERHEAD};

/// The standard 160-byte frame of the s390x ELF ABI: a back chain and the register
/// save area a *callee* fills.
#[repr(C)]
#[derive(Debug, Default, Clone, Copy)]
pub struct SaveArea {
    /// The caller's r15 (0 at the bottom of a stack).
    pub back_chain: u64,
    /// Reserved by the ABI.
    pub reserved: u64,
    /// r2–r15.
    pub gprs: [u64; 14],
    /// f0, f2, f4, f6.
    pub fprs: [u64; 4],
}

/// What the trampoline allocates below the caller's r15 (lowest address first).
#[repr(C)]
#[derive(Debug, Default, Clone, Copy)]
pub struct Frame {
    /// The trampoline's own frame: its save area is the decision function's; its back
    /// chain points to [`Frame::patched`].
    pub own: SaveArea,
    /// v24–v31, 16 bytes each (written only with the vector facility).
    pub vrs: [[u64; 2]; 8],
    /// Whether `vrs` was saved (so a concurrent [`set_vector_facility`] cannot make
    /// the exit restore what the entry did not save).
    pub vrs_saved: u64,
    /// The patched function's stand-in: back chain → the caller's r15; the r14 slot
    /// holds `S + 6`.
    pub patched: SaveArea,
}

/// Bytes the trampoline allocates.
pub const FRAME: usize = size_of::<Frame>();

/// Offset of rN's slot in a [`SaveArea`] (N in 2..=15).
#[allow(clippy::arithmetic_side_effects)] // reason: evaluated only in const contexts
const fn gpr(n: usize) -> usize {
    offset_of!(SaveArea, gprs) + 8 * (n - 2)
}
/// Offset of f(2k)'s slot in a [`SaveArea`].
#[allow(clippy::arithmetic_side_effects)] // reason: evaluated only in const contexts
const fn fpr(k: usize) -> usize {
    offset_of!(SaveArea, fprs) + 8 * k
}

const SAVE: usize = size_of::<SaveArea>();
const _: () = assert!(SAVE as u64 == STACK_FRAME_OVERHEAD);
const _: () = assert!(gpr(14) as u64 == FRAME_R14);
const _: () = assert!(gpr(2) == 16 && fpr(0) == 128 && fpr(3) == 152);
const _: () = assert!(offset_of!(SaveArea, back_chain) == 0);
// r15 stays 8-byte aligned, and `la %r15,FRAME(%r15)` takes a 12-bit displacement.
const _: () = assert!(FRAME.is_multiple_of(8) && FRAME < 4096);
const _: () = assert!(offset_of!(Frame, own) == 0);
const OWN_BACK: usize = offset_of!(Frame, own) + offset_of!(SaveArea, back_chain);
const VRS: usize = offset_of!(Frame, vrs);
const VRS_SAVED: usize = offset_of!(Frame, vrs_saved);
const PATCHED: usize = offset_of!(Frame, patched);
const PATCHED_BACK: usize = PATCHED + offset_of!(SaveArea, back_chain);
const PATCHED_R14: usize = PATCHED + gpr(14);
// `vstm`/`vlm` take a 12-bit displacement too.
const _: () = assert!(VRS + 8 * 16 < 4096 && PATCHED_R14 < 4096);

/// Length of the `brasl %r0` written at a site: the decision gets `r0 - 6`.
pub const CALL_LEN: u64 = 6;
const _: () = assert!(CALL_LEN as usize == crate::insn::RIL_LEN);

/// The decision function: called with the site address, returns 0 (run the original)
/// or the address to continue at.
pub type Decision = extern "C" fn(site: u64) -> u64;

static DECISION: AtomicUsize = AtomicUsize::new(0);
/// 1: save and restore v24–v31. A doubleword: `larl` needs an even address.
static VECTOR: AtomicU64 = AtomicU64::new(0);

/// Installs the decision function every trampoline call uses (process-wide).
pub fn set_decision(f: Decision) {
    DECISION.store(f as usize, Ordering::Release);
}

/// Tells the trampoline whether this machine and kernel have the vector facility
/// (`HWCAP_S390_VXRS` in `AT_HWCAP`). With it, v24–v31 (the vector ABI's argument
/// registers) are saved around the decision; without it the trampoline must not touch
/// them (a vector instruction would raise `SIGILL`), and no code can pass vector
/// arguments. Calls already inside the trampoline keep what they started with.
pub fn set_vector_facility(present: bool) {
    VECTOR.store(u64::from(present), Ordering::Release);
}

/// The address a redirected site calls.
pub fn address() -> u64 {
    entry_trampoline as *const () as u64
}

pub use crate::patching::{STUB_LEN, stub_bytes_to};

/// The far stub of [`entry_trampoline`] (see [`stub_bytes_to`]).
pub fn stub_bytes() -> [u8; STUB_LEN] {
    stub_bytes_to(address())
}

/// The trampoline itself. See the module documentation for its register contract.
///
/// # Safety
///
/// Only to be reached by the `brasl %r0` written at a patch site (directly or through
/// a far stub of [`stub_bytes`]), or in the very state
/// it leaves (r0 = `S + 6`, r14 and r15 the caller's) by the host's handler of a site's
/// trap (the contract's entry state); never called from Rust.
#[unsafe(naked)]
pub unsafe extern "C" fn entry_trampoline() {
    core::arch::naked_asm!(
        // The arguments and r14 into the patched function's save area.
        "stmg %r2, %r14, {g2}(%r15)",
        "std %f0, {f0}(%r15)",
        "std %f2, {f2}(%r15)",
        "std %f4, {f4}(%r15)",
        "std %f6, {f6}(%r15)",
        // The patched function's stand-in frame, then the trampoline's own.
        "lgr %r1, %r15",
        "aghi %r15, -{frame}",
        "stg %r1, {p_back}(%r15)",
        "stg %r0, {p_r14}(%r15)",
        "la %r1, {patched}(%r15)",
        "stg %r1, {own_back}(%r15)",
        // v24–v31, if the machine has them.
        "larl %r1, {vector}",
        "lg %r1, 0(%r1)",
        "stg %r1, {vrs_saved}(%r15)",
        "ltgr %r1, %r1",
        "je 1f",
        ".machine push",
        ".machine z13",
        "vstm %v24, %v31, {vrs}(%r15)",
        ".machine pop",
        "1:",
        // r1 = decide(S) if a decision is installed, else 0.
        "larl %r1, {decision}",
        "lg %r1, 0(%r1)",
        "ltgr %r1, %r1",
        "je 2f",
        "lg %r2, {p_r14}(%r15)",
        "aghi %r2, -{call_len}",
        "basr %r14, %r1",
        "lgr %r1, %r2",
        "ltgr %r1, %r1",
        "jne 3f",
        "2:",
        // The original body: S + 6.
        "lg %r1, {p_r14}(%r15)",
        "3:",
        "lg %r0, {vrs_saved}(%r15)",
        "ltgr %r0, %r0",
        "je 4f",
        ".machine push",
        ".machine z13",
        "vlm %v24, %v31, {vrs}(%r15)",
        ".machine pop",
        "4:",
        "la %r15, {frame}(%r15)",
        "ld %f0, {f0}(%r15)",
        "ld %f2, {f2}(%r15)",
        "ld %f4, {f4}(%r15)",
        "ld %f6, {f6}(%r15)",
        "lmg %r2, %r14, {g2}(%r15)",
        "br %r1",
        g2 = const gpr(2),
        f0 = const fpr(0),
        f2 = const fpr(1),
        f4 = const fpr(2),
        f6 = const fpr(3),
        frame = const FRAME,
        p_back = const PATCHED_BACK,
        p_r14 = const PATCHED_R14,
        patched = const PATCHED,
        own_back = const OWN_BACK,
        vector = sym VECTOR,
        vrs_saved = const VRS_SAVED,
        vrs = const VRS,
        decision = sym DECISION,
        call_len = const CALL_LEN,
    )
}

/// Writes `bytes` at `dst` as aligned halfword stores, in order, then serialises
/// ([`klp_s390x_sync_icache`]). Each halfword is block-concurrent (another CPU sees
/// either its old or its new value, in instruction fetch too); the halfwords are not
/// one unit: the caller's protocol must make every mix of old and new halfwords
/// harmless. Returns `false` (and writes nothing) when `dst` is odd or `bytes` has an
/// odd length.
///
/// # Safety
///
/// 1. `dst..dst + bytes.len()` is mapped and writable.
/// 2. Text writes are serialised by the caller (one writer at a time).
pub unsafe fn store_halfwords(dst: *mut u8, bytes: &[u8]) -> bool {
    if !(dst as usize).is_multiple_of(2) || !bytes.len().is_multiple_of(2) {
        return false;
    }
    // Every byte is in a halfword: the length is even (checked).
    let (halfwords, _) = bytes.as_chunks::<2>();
    let slots = dst.cast::<AtomicU16>();
    for (i, h) in halfwords.iter().enumerate() {
        let v = u16::from_ne_bytes(*h);
        // SAFETY: the halfword is 2-aligned (checked), mapped and writable (1); only
        // this writer stores to it (2), so an atomic view of it is sound.
        let w = unsafe { &*slots.wrapping_add(i) };
        w.store(v, Ordering::SeqCst);
    }
    klp_s390x_sync_icache(dst as usize, bytes.len());
    true
}

#[cfg(test)]
mod tests {
    extern crate std;

    use super::*;
    use core::cell::UnsafeCell;
    use std::sync::Mutex;

    #[test]
    fn frame_layout() {
        assert_eq!(SAVE, 160);
        assert_eq!(VRS, 160);
        assert_eq!(VRS_SAVED, 288);
        assert_eq!(PATCHED, 296);
        assert_eq!(FRAME, 456);
        assert_eq!(PATCHED_R14, 296 + 112);
    }

    #[test]
    fn stub_layout() {
        let b = stub_bytes_to(0x1122_3344_5566_7788);
        // larl %r1 with a displacement of 8 halfwords (the literal at +16).
        assert_eq!(b[..2], [0xc0, 0x10]);
        assert_eq!(i32::from_be_bytes([b[2], b[3], b[4], b[5]]) * 2, 16);
        // lg %r1,0(%r1): RXY, r1 from base r1, no index, displacement 0.
        assert_eq!(b[6..12], [0xe3, 0x10, 0x10, 0x00, 0x00, 0x04]);
        assert_eq!(b[12..14], [0x07, 0xf1], "br %r1 (bcr 15,%r1)");
        assert_eq!(b[16..], 0x1122_3344_5566_7788u64.to_be_bytes());
        assert_eq!(stub_bytes()[16..], address().to_be_bytes());
    }

    extern "C" fn stub_target(x: u64) -> u64 {
        x * 3 + 1
    }

    unsafe extern "C" {
        fn mmap(a: *mut u8, len: usize, prot: i32, flags: i32, fd: i32, off: i64) -> *mut u8;
        fn mprotect(a: *mut u8, len: usize, prot: i32) -> i32;
        fn munmap(a: *mut u8, len: usize) -> i32;
    }

    /// A stub written to a fresh page and called like a function reaches its target
    /// with the argument and returns to the caller (r14 kept).
    #[test]
    fn a_stub_runs() {
        const RW: i32 = 3;
        const RX: i32 = 5;
        const PRIVATE_ANON: i32 = 0x22;
        // SAFETY: an anonymous private mapping has no preconditions.
        let p = unsafe { mmap(core::ptr::null_mut(), 4096, RW, PRIVATE_ANON, -1, 0) };
        assert!(!p.is_null() && p as isize != -1);
        let b = stub_bytes_to(stub_target as *const () as u64);
        // SAFETY: `p` is our page, writable; nobody executes it yet.
        unsafe { core::ptr::copy_nonoverlapping(b.as_ptr(), p, b.len()) };
        klp_s390x_sync_icache(p as usize, b.len());
        // SAFETY: `p` is our page.
        assert_eq!(unsafe { mprotect(p, 4096, RX) }, 0);
        // SAFETY: the page holds a stub that jumps to `stub_target`, which has this
        // signature.
        let f = unsafe { core::mem::transmute::<*mut u8, extern "C" fn(u64) -> u64>(p) };
        assert_eq!(f(core::hint::black_box(5)), 16);
        // SAFETY: our page, no longer used.
        unsafe { munmap(p, 4096) };
    }

    #[test]
    fn store_halfwords_is_aligned() {
        let mut buf = [0u16; 4];
        let p = buf.as_mut_ptr() as *mut u8;
        // SAFETY: `buf` is a writable local no other thread sees (1, 2).
        unsafe {
            assert!(store_halfwords(p.wrapping_add(2), &[0xc0, 0x05, 1, 2]));
            assert!(!store_halfwords(p.wrapping_add(1), &[1, 2]));
            assert!(!store_halfwords(p, &[1, 2, 3]));
        }
        let b: std::vec::Vec<u8> = buf.iter().flat_map(|h| h.to_ne_bytes()).collect();
        assert_eq!(b, [0, 0, 0xc0, 0x05, 1, 2, 0, 0]);
    }

    // ---- the trampoline through a hand-made site, driven from assembly

    /// What the harness passes and gets back.
    #[repr(C)]
    #[derive(Debug, Default, Clone, Copy, PartialEq)]
    struct Io {
        /// r2–r6.
        gpr: [u64; 5],
        /// f0, f2, f4, f6 (bits).
        fpr: [u64; 4],
        /// v24–v31.
        vr: [[u64; 2]; 8],
        /// r6–r13 before the call (r6 again: callee-saved too).
        keep: [u64; 8],
        /// r6–r13 after the call.
        kept: [u64; 8],
        /// r15 at the call and after it.
        sp_at_call: u64,
        sp_after: u64,
        /// The harness's return point (after its `basr`).
        ret_addr: u64,
        /// r2 after the call.
        ret: u64,
    }

    /// What a recorder (the original body or the target) received.
    #[repr(C)]
    #[derive(Debug, Default, Clone, Copy, PartialEq)]
    struct Seen {
        gpr: [u64; 5],
        fpr: [u64; 4],
        vr: [[u64; 2]; 8],
        r14: u64,
        r15: u64,
    }

    struct Rec(UnsafeCell<Seen>);
    // SAFETY: written only by the recorders while `SERIAL` is held by the test that
    // called them, read by that test afterwards.
    unsafe impl Sync for Rec {}
    impl Rec {
        const fn new() -> Rec {
            Rec(UnsafeCell::new(Seen {
                gpr: [0; 5],
                fpr: [0; 4],
                vr: [[0; 2]; 8],
                r14: 0,
                r15: 0,
            }))
        }
        fn take(&self) -> Seen {
            // SAFETY: no recorder runs now (the calling test holds `SERIAL`).
            unsafe { core::ptr::replace(self.0.get(), Seen::default()) }
        }
    }

    static REC_BODY: Rec = Rec::new();
    static REC_TARGET: Rec = Rec::new();

    /// Serialises the tests that go through the trampoline: the decision is global.
    static SERIAL: Mutex<()> = Mutex::new(());
    /// What the test decision returns.
    static ANSWER: AtomicU64 = AtomicU64::new(0);
    /// What it saw: the site, the trampoline's r15, and frame words above it.
    static SEEN_SITE: AtomicU64 = AtomicU64::new(0);
    static TRAMP_SP: AtomicU64 = AtomicU64::new(0);
    static SEEN_FRAMES: Mutex<[u64; 4]> = Mutex::new([0; 4]);

    fn has_vector() -> bool {
        unsafe extern "C" {
            safe fn getauxval(t: core::ffi::c_ulong) -> core::ffi::c_ulong;
        }
        const AT_HWCAP: core::ffi::c_ulong = 16;
        const HWCAP_S390_VXRS: core::ffi::c_ulong = 1 << 11;
        getauxval(AT_HWCAP) & HWCAP_S390_VXRS != 0
    }

    fn setup() -> std::sync::MutexGuard<'static, ()> {
        let g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
        set_vector_facility(has_vector());
        set_decision(klp_s390x_t_decide);
        g
    }

    /// The decision's second half: records the site and the frames above the
    /// trampoline's, answers.
    extern "C" fn test_decide(site: u64) -> u64 {
        SEEN_SITE.store(site, Ordering::SeqCst);
        let sp = TRAMP_SP.load(Ordering::SeqCst);
        let word = |a: u64| {
            // SAFETY: `a` lies in the frames of the trampoline, the patched function's
            // stand-in and the harness, all live above this call on this stack.
            unsafe { core::ptr::read_volatile(a as *const u64) }
        };
        let patched = word(sp);
        let caller = word(patched);
        *SEEN_FRAMES.lock().unwrap_or_else(|e| e.into_inner()) = [
            patched - sp,
            word(patched + FRAME_R14),
            caller,
            word(caller + FRAME_R14),
        ];
        ANSWER.load(Ordering::SeqCst)
    }

    /// The decision as the trampoline calls it: records r15 (the trampoline's frame),
    /// overwrites every volatile register that carries an argument, then tail-calls
    /// `test_decide` with r2 = the site.
    #[unsafe(naked)]
    extern "C" fn klp_s390x_t_decide(_site: u64) -> u64 {
        core::arch::naked_asm!(
            "larl %r1, {sp}",
            "stg %r15, 0(%r1)",
            "lghi %r0, -1",
            "lghi %r1, -1",
            "lghi %r3, -1",
            "lghi %r4, -1",
            "lghi %r5, -1",
            "ldgr %f0, %r1",
            "ldgr %f1, %r1",
            "ldgr %f2, %r1",
            "ldgr %f3, %r1",
            "ldgr %f4, %r1",
            "ldgr %f5, %r1",
            "ldgr %f6, %r1",
            "ldgr %f7, %r1",
            "larl %r1, {vector}",
            "lg %r1, 0(%r1)",
            "ltgr %r1, %r1",
            "je 1f",
            ".machine push",
            ".machine z13",
            "vgbm %v24, 0xffff",
            "vgbm %v25, 0xffff",
            "vgbm %v26, 0xffff",
            "vgbm %v27, 0xffff",
            "vgbm %v28, 0xffff",
            "vgbm %v29, 0xffff",
            "vgbm %v30, 0xffff",
            "vgbm %v31, 0xffff",
            ".machine pop",
            "1:",
            "jg {decide}",
            sp = sym TRAMP_SP,
            vector = sym VECTOR,
            decide = sym test_decide,
        )
    }

    /// Stores what a recorder received into the `Seen` at r1; returns r2 = r1.
    #[unsafe(naked)]
    extern "C" fn record() {
        core::arch::naked_asm!(
            "stmg %r2, %r6, {gpr}(%r1)",
            "std %f0, {fpr}+0(%r1)",
            "std %f2, {fpr}+8(%r1)",
            "std %f4, {fpr}+16(%r1)",
            "std %f6, {fpr}+24(%r1)",
            "stg %r14, {r14}(%r1)",
            "stg %r15, {r15}(%r1)",
            "larl %r2, {vector}",
            "lg %r2, 0(%r2)",
            "ltgr %r2, %r2",
            "je 1f",
            ".machine push",
            ".machine z13",
            "vstm %v24, %v31, {vr}(%r1)",
            ".machine pop",
            "1:",
            "lgr %r2, %r1",
            "br %r14",
            gpr = const offset_of!(Seen, gpr),
            fpr = const offset_of!(Seen, fpr),
            vr = const offset_of!(Seen, vr),
            r14 = const offset_of!(Seen, r14),
            r15 = const offset_of!(Seen, r15),
            vector = sym VECTOR,
        )
    }

    /// The original body of the test site.
    #[unsafe(naked)]
    extern "C" fn klp_s390x_t_body() -> u64 {
        core::arch::naked_asm!("larl %r1, {rec}", "jg {record}", rec = sym REC_BODY, record = sym record)
    }

    /// A replacement the decision can choose.
    #[unsafe(naked)]
    extern "C" fn klp_s390x_t_target() -> u64 {
        core::arch::naked_asm!("larl %r1, {rec}", "jg {record}", rec = sym REC_TARGET, record = sym record)
    }

    /// A redirected site, as the host writes it: `brasl %r0,trampoline`, then the
    /// wrapper's tail jump to the body.
    #[unsafe(naked)]
    extern "C" fn klp_s390x_t_site() -> u64 {
        core::arch::naked_asm!(
            "brasl %r0, {tramp}",
            "jg {body}",
            tramp = sym entry_trampoline,
            body = sym klp_s390x_t_body,
        )
    }

    /// `harness(f, io)`: loads r2–r6, f0/f2/f4/f6, v24–v31 (with the facility) and
    /// r6–r13 from `io`, calls `f`, stores r6–r13, r15 and r2 after it.
    #[unsafe(naked)]
    extern "C" fn harness(_f: u64, _io: *mut Io) {
        core::arch::naked_asm!(
            "stmg %r6, %r15, 48(%r15)",
            "lgr %r1, %r15",
            "aghi %r15, -176",
            "stg %r1, 0(%r15)",
            "stg %r2, 160(%r15)",
            "stg %r3, 168(%r15)",
            "lgr %r1, %r3",
            "stg %r15, {sp_at_call}(%r1)",
            "larl %r0, 5f",
            "stg %r0, {ret_addr}(%r1)",
            "larl %r2, {vector}",
            "lg %r2, 0(%r2)",
            "ltgr %r2, %r2",
            "je 1f",
            ".machine push",
            ".machine z13",
            "vlm %v24, %v31, {vr}(%r1)",
            ".machine pop",
            "1:",
            "ld %f0, {fpr}+0(%r1)",
            "ld %f2, {fpr}+8(%r1)",
            "ld %f4, {fpr}+16(%r1)",
            "ld %f6, {fpr}+24(%r1)",
            "lmg %r6, %r13, {keep}(%r1)",
            "lmg %r2, %r6, {gpr}(%r1)",
            "lg %r1, 160(%r15)",
            "basr %r14, %r1",
            "5:",
            "lg %r1, 168(%r15)",
            "stmg %r6, %r13, {kept}(%r1)",
            "stg %r15, {sp_after}(%r1)",
            "stg %r2, {ret}(%r1)",
            "la %r15, 176(%r15)",
            "lmg %r6, %r15, 48(%r15)",
            "br %r14",
            sp_at_call = const offset_of!(Io, sp_at_call),
            ret_addr = const offset_of!(Io, ret_addr),
            vector = sym VECTOR,
            vr = const offset_of!(Io, vr),
            fpr = const offset_of!(Io, fpr),
            keep = const offset_of!(Io, keep),
            gpr = const offset_of!(Io, gpr),
            kept = const offset_of!(Io, kept),
            sp_after = const offset_of!(Io, sp_after),
            ret = const offset_of!(Io, ret),
        )
    }

    fn addr(f: *const ()) -> u64 {
        f as u64
    }

    fn input() -> Io {
        let mut io = Io::default();
        for (i, g) in io.gpr.iter_mut().enumerate() {
            *g = 0x0102_0304_0506_0700 + i as u64;
        }
        for (i, f) in io.fpr.iter_mut().enumerate() {
            *f = (1.5 + i as f64).to_bits();
        }
        for (i, v) in io.vr.iter_mut().enumerate() {
            *v = [0xa0a0_0000 + i as u64, 0xb0b0_0000_0000 + i as u64];
        }
        for (i, k) in io.keep.iter_mut().enumerate() {
            *k = 0x6600_0000_0000_0000 + i as u64;
        }
        // r6 is both the fifth argument and callee-saved: one value for both.
        io.keep[0] = io.gpr[4];
        io
    }

    /// Calls the test site with `answer` as the decision; returns the harness's record.
    fn run(answer: u64) -> Io {
        ANSWER.store(answer, Ordering::SeqCst);
        let mut io = input();
        harness(addr(klp_s390x_t_site as *const ()), &mut io);
        io
    }

    fn check(io: &Io, seen: &Seen, rec: &Rec) {
        let site = addr(klp_s390x_t_site as *const ());
        assert_eq!(SEEN_SITE.load(Ordering::SeqCst), site, "decide(S)");
        assert_eq!(seen.gpr, io.gpr, "r2–r6 arrive intact");
        assert_eq!(seen.fpr, io.fpr, "f0/f2/f4/f6 arrive intact");
        if has_vector() {
            assert_eq!(seen.vr, io.vr, "v24–v31 arrive intact");
        }
        assert_eq!(seen.r14, io.ret_addr, "r14: the caller's return address");
        assert_eq!(seen.r15, io.sp_at_call, "r15: the caller's stack pointer");
        assert_eq!(io.ret, rec.0.get() as u64, "the return value comes back");
        assert_eq!(io.kept, io.keep, "r6–r13 preserved");
        assert_eq!(io.sp_after, io.sp_at_call);
        let frames = *SEEN_FRAMES.lock().unwrap_or_else(|e| e.into_inner());
        let tramp = TRAMP_SP.load(Ordering::SeqCst);
        assert_eq!(
            frames,
            [PATCHED as u64, site + CALL_LEN, io.sp_at_call, io.ret_addr],
            "back chain: trampoline → patched function → caller"
        );
        assert_eq!(tramp + FRAME as u64, io.sp_at_call);
    }

    #[test]
    fn decision_zero_runs_the_original_body() {
        let _g = setup();
        let io = run(0);
        check(&io, &REC_BODY.take(), &REC_BODY);
        assert_eq!(REC_TARGET.take(), Seen::default(), "the target did not run");
    }

    #[test]
    fn decision_target_enters_it_like_a_direct_call() {
        let _g = setup();
        let io = run(addr(klp_s390x_t_target as *const ()));
        check(&io, &REC_TARGET.take(), &REC_TARGET);
        assert_eq!(REC_BODY.take(), Seen::default(), "the body did not run");
    }

    // ---- many arguments from Rust: registers and the stack

    fn weigh(i: [u64; 8], x: [f64; 8]) -> f64 {
        let mut r = 0.0;
        for (k, (a, b)) in i.iter().zip(x).enumerate() {
            r += (*a * (k as u64 + 1)) as f64 + b * (k as f64 + 10.0);
        }
        r
    }

    #[allow(clippy::too_many_arguments)]
    extern "C" fn many_body(
        a: u64,
        b: u64,
        c: u64,
        d: u64,
        e: u64,
        f: u64,
        g: u64,
        h: u64,
        x0: f64,
        x1: f64,
        x2: f64,
        x3: f64,
        x4: f64,
        x5: f64,
        x6: f64,
        x7: f64,
    ) -> f64 {
        weigh([a, b, c, d, e, f, g, h], [x0, x1, x2, x3, x4, x5, x6, x7])
    }

    #[allow(clippy::too_many_arguments)]
    extern "C" fn many_target(
        a: u64,
        b: u64,
        c: u64,
        d: u64,
        e: u64,
        f: u64,
        g: u64,
        h: u64,
        x0: f64,
        x1: f64,
        x2: f64,
        x3: f64,
        x4: f64,
        x5: f64,
        x6: f64,
        x7: f64,
    ) -> f64 {
        -weigh([a, b, c, d, e, f, g, h], [x0, x1, x2, x3, x4, x5, x6, x7])
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
    ) -> f64;

    /// A redirected site in front of `many_body`.
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
        _x0: f64,
        _x1: f64,
        _x2: f64,
        _x3: f64,
        _x4: f64,
        _x5: f64,
        _x6: f64,
        _x7: f64,
    ) -> f64 {
        core::arch::naked_asm!(
            "brasl %r0, {tramp}",
            "jg {body}",
            tramp = sym entry_trampoline,
            body = sym many_body,
        )
    }

    #[test]
    fn many_arguments_from_rust_in_both_outcomes() {
        let _g = setup();
        let f = core::hint::black_box(many_site as Many);
        let call = || {
            f(
                1, 2, 3, 4, 5, 6, 7, 8, 0.5, 1.5, 2.5, 3.5, 4.5, 5.5, 6.5, 7.5,
            )
        };
        let expected = weigh(
            [1, 2, 3, 4, 5, 6, 7, 8],
            [0.5, 1.5, 2.5, 3.5, 4.5, 5.5, 6.5, 7.5],
        );
        ANSWER.store(0, Ordering::SeqCst);
        assert_eq!(call(), expected);
        assert_eq!(
            SEEN_SITE.load(Ordering::SeqCst),
            addr(many_site as *const ())
        );
        ANSWER.store(addr(many_target as *const ()), Ordering::SeqCst);
        assert_eq!(call(), -expected);
        ANSWER.store(0, Ordering::SeqCst);
        assert_eq!(call(), expected);
    }
}
