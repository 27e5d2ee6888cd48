//! x86_64: the host's fast entry path.
//!
//! A site's stub ([`klp_arch::patching::SitePlanner::stub`]) loads `r11` and jumps
//! on. Here it enters [`fast_entry`] with the site's slot in `r11` when the fast path
//! can run in this process, else the entry trampoline with the site
//! ([`klp_arch_x86_64::live::trampoline`]). The site writes themselves are the
//! back-end's plans, run by [`super::sites`].

use std::sync::atomic::{AtomicU64, Ordering};

use klp_arch_x86_64::live::trampoline;

pub(crate) use super::callsites::{callers_of, retarget_callers, retargeted};

/// The address of `site`'s slot, if it has one (slots are never reused: the address
/// stays `site`'s for the life of the process).
fn slot_addr(site: u64) -> Option<u64> {
    super::slot(site, false).map(|s| s as *const super::Slot as u64)
}

/// Where the sites' stubs enter when the fast path runs in this process.
pub(crate) fn fast_entry_address() -> Option<u64> {
    fast_path_ready().then_some(fast_entry as *const () as u64)
}

/// What a site's stub hands over in `r11` and where it enters: the site's slot and
/// the fast path when it can run here, else the site and the trampoline.
pub(crate) fn stub_entry(site: u64) -> (u64, u64) {
    match slot_addr(site) {
        Some(slot) if fast_path_ready() => (slot, fast_entry as *const () as u64),
        _ => (site, trampoline::address()),
    }
}

// ------------------------------------------------------------------ the fast path

/// The offset of the `CURRENT` cell ([`crate::thread`]) from the thread pointer, the
/// same in every thread; 0 while (or where) the fast path is off.
static TLS_OFF: AtomicU64 = AtomicU64::new(0);

/// Turns the fast path on if it can run here (once): klp-user is part of the main
/// executable, so its thread-local `CURRENT` lies in the executable's static TLS
/// block, at one fixed offset from every thread's pointer (`fs:0` holds the pointer
/// itself on x86_64). Elsewhere (klp-user inside a shared object, whose TLS may be
/// allocated per thread) every site enters the trampoline directly.
pub(super) fn fast_path_ready() -> bool {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        if !in_main_executable(fast_entry as *const () as u64) {
            return;
        }
        let tp: u64;
        // SAFETY: reads the thread pointer's self-reference at `fs:0` (the TCB's first
        // word, set by the C library for every thread); no memory is written.
        unsafe {
            core::arch::asm!("mov {}, qword ptr fs:[0]", out(reg) tp, options(nostack, readonly, preserves_flags));
        }
        TLS_OFF.store(crate::thread::current_cell().wrapping_sub(tp), Ordering::Release);
    });
    TLS_OFF.load(Ordering::Acquire) != 0
}

/// Whether `addr` lies in the main executable (the object whose program headers the
/// kernel passed as `AT_PHDR`).
fn in_main_executable(addr: u64) -> bool {
    // SAFETY: `getauxval` has no preconditions.
    let phdr = unsafe { libc::getauxval(libc::AT_PHDR) };
    let base_of = |a: u64| {
        // SAFETY: an all-zero `Dl_info` (null pointers, zeros) is a valid value.
        let mut info: libc::Dl_info = unsafe { std::mem::zeroed() };
        // SAFETY: `dladdr` only reads the loader's tables and writes `info`.
        let ok = unsafe { libc::dladdr(a as *const libc::c_void, &mut info) } != 0;
        (ok && !info.dli_fbase.is_null()).then_some(info.dli_fbase as u64)
    };
    phdr != 0 && base_of(phdr).is_some_and(|b| Some(b) == base_of(addr))
}

const SLOT_SITE: usize = std::mem::offset_of!(super::Slot, site);
const SLOT_SEQ: usize = std::mem::offset_of!(super::Slot, seq);
const SLOT_BY_STATE: usize = std::mem::offset_of!(super::Slot, by_state);
const _: () = assert!(SLOT_SITE == 0 && SLOT_SEQ == 8 && SLOT_BY_STATE == 40);
const _: () = assert!(crate::thread::STATE_MASK == 3);
const _: () = assert!(super::SLOW == u64::MAX);

/// The fast entry path, for recognising a thread inside it.
pub(crate) const FAST_ENTRY: Option<unsafe extern "C" fn()> = Some(fast_entry);

/// The fast entry path: a site's stub jumps here instead of to the trampoline, and
/// the decision is taken from the slot's precomputed answers without saving any
/// argument register or calling anything.
///
/// # Register contract
///
/// **On entry** (the site jumped to the stub, the stub set `r11` and jumped here):
/// `r11` = the site's [`super::Slot`]; everything else as at the function's entry
/// (`[rsp]` = the caller's return address, arguments in `rdi`, `rsi`, `rdx`, `rcx`,
/// `r8`, `r9`, `rax`, `r10`, `xmm0`–`xmm7` and on the stack).
///
/// **Inside**: `rax` and `r10` are pushed and used (the thread's record, its state,
/// the slot's sequence); the thread's `in_decide` counter is raised while the slot is
/// read (`wait_deciders` sees it), with a plain `inc`/`dec` of its own word (atomic
/// with respect to its own signal handlers).
///
/// **On exit**, `rax`, `r10` and `rsp` are back at their entry values and
/// * the chosen implementation is entered with `jmp r11` (`site + 5` for the
///   original), exactly as a direct call would have entered it; or
/// * when the fast path cannot decide (the thread has no record or klp-user's TLS is
///   not at a fixed offset, the slot is being written or changed meanwhile, or its
///   answer is [`super::SLOW`]), the entry trampoline is entered with `r11` = the
///   site, its own entry contract ([`trampoline`]), and takes the full decision.
///
/// Clobbered: `r11` and the flags, as by the trampoline.
///
/// # Safety
///
/// Only to be reached through a stub made by `stub_for` (the entry state above, `r11`
/// the address of a live slot); never called from Rust.
#[unsafe(naked)]
pub(crate) unsafe extern "C" fn fast_entry() {
    core::arch::naked_asm!(
        "push rax",
        "push r10",
        "mov r10, qword ptr [rip + {tls_off}]",
        "test r10, r10",
        "jz 3f",
        "mov r10, qword ptr fs:[r10]",
        "test r10, r10",
        "jz 3f",
        "inc dword ptr [r10 + {in_decide}]",
        "movzx eax, byte ptr [r10 + {state}]",
        "and eax, {mask}",
        "mov r10, qword ptr [r11 + {seq}]",
        "test r10b, 1",
        "jnz 2f",
        "mov rax, qword ptr [r11 + {by_state} + rax * 8]",
        "cmp r10, qword ptr [r11 + {seq}]",
        "jne 2f",
        "cmp rax, -1",
        "je 2f",
        "test rax, rax",
        "jnz 1f",
        "mov rax, qword ptr [r11 + {site}]",
        "add rax, {site_len}",
        "1:",
        "mov r11, rax",
        "mov r10, qword ptr [rip + {tls_off}]",
        "mov r10, qword ptr fs:[r10]",
        "dec dword ptr [r10 + {in_decide}]",
        "pop r10",
        "pop rax",
        "jmp r11",
        // The full decision, with the mark to drop first.
        "2:",
        "mov r10, qword ptr [rip + {tls_off}]",
        "mov r10, qword ptr fs:[r10]",
        "dec dword ptr [r10 + {in_decide}]",
        "3:",
        "pop r10",
        "pop rax",
        "mov r11, qword ptr [r11 + {site}]",
        "jmp {trampoline}",
        tls_off = sym TLS_OFF,
        in_decide = const crate::thread::IN_DECIDE_OFFSET,
        state = const crate::thread::STATE_OFFSET,
        mask = const crate::thread::STATE_MASK,
        seq = const SLOT_SEQ,
        by_state = const SLOT_BY_STATE,
        site = const SLOT_SITE,
        site_len = const trampoline::SITE_LEN,
        trampoline = sym trampoline::entry_trampoline,
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    /// The record the fast path finds through `fs:[TLS_OFF]`.
    fn record_seen_by_fast_path() -> u64 {
        let off = TLS_OFF.load(Ordering::Acquire);
        let p: u64;
        // SAFETY: `off` is the fixed offset of this thread's `CURRENT` cell from its
        // thread pointer (the test checks `fast_path_ready` first); a read only.
        unsafe {
            core::arch::asm!("mov {p}, qword ptr fs:[{off}]", off = in(reg) off, p = out(reg) p, options(nostack, readonly, preserves_flags));
        }
        p
    }

    #[test]
    fn the_fast_path_finds_each_threads_record() {
        assert!(fast_path_ready(), "klp-user is part of the test executable");
        let here = std::thread::spawn(|| {
            let before = record_seen_by_fast_path();
            let rec = crate::thread::register_current();
            (before, record_seen_by_fast_path(), Arc::as_ptr(&rec) as u64)
        });
        let (before, after, rec) = here.join().expect("thread");
        assert_eq!(after, rec);
        assert!(before == 0 || before == rec, "{before:#x}");
        assert_eq!(
            record_seen_by_fast_path(),
            crate::thread::current_raw() as u64
        );
    }

    #[test]
    fn the_fast_path_decides_like_the_trampoline() {
        // A stub-entered call of a real site is covered by the redirect and
        // consistency tests; here the slot's answers are checked against `decide`.
        let site = 0x7777_0000_5000;
        let v = klp::RedirectView {
            top: klp::Target::Func(0x2000),
            top_transition: true,
            below: klp::Target::Func(0x1000),
        };
        assert!(super::super::publish(site, Some(v)));
        let slot = super::slot_addr(site).expect("slot");
        // SAFETY: `slot` is the address of a slot of the static table.
        let s = unsafe { &*(slot as *const super::super::Slot) };
        let at = |st: klp::PatchState| {
            s.by_state[crate::thread::state_index(st)].load(Ordering::Relaxed)
        };
        assert_eq!(at(klp::PatchState::Unpatched), 0x1000);
        assert_eq!(at(klp::PatchState::Patched), 0x2000);
        assert_eq!(
            at(klp::PatchState::Idle),
            super::super::SLOW,
            "an anomaly: slow path"
        );
        super::super::publish(
            site,
            Some(klp::RedirectView {
                top_transition: false,
                below: klp::Target::Original,
                ..v
            }),
        );
        for st in [
            klp::PatchState::Idle,
            klp::PatchState::Unpatched,
            klp::PatchState::Patched,
        ] {
            assert_eq!(at(st), 0x2000, "steady: the top for {st:?}");
        }
        super::super::publish(site, None);
        assert_eq!(at(klp::PatchState::Patched), 0, "no record: the original");
    }
}
