//! x86_64: patchable wrappers, site recognition and text writes.
//!
//! A site is 5 bytes: the wrapper's `nopl 0x0(%rax,%rax,1)` or, in C built with
//! `-fpatchable-function-entry=5`, five one-byte nops. Its states:
//!
//! | state | bytes |
//! |---|---|
//! | original | as found; once klp has restored a site, one instruction: five one-byte nops come back as the 5-byte nop (as ftrace settles its sites at boot), so only a site's first write pays the breakpoint protocol's rounds |
//! | trampoline | `jmp stub`; the site's stub sets `r11` = site and jumps to `entry_trampoline` ([`klp_arch_x86_64::live::trampoline`]) |
//! | jump | `jmp new_function` (only when it is within ±2 GiB) |
//!
//! Stubs are 24 bytes, one per site, from the pool of [`super::stubs`] (within ±2 GiB
//! of the site, kept for the life of the process), so a function of a shared library
//! mapped far from the executable reaches the trampoline as easily as one of the
//! executable. Every site uses its stub: a `jmp` in and a `jmp` out keep the return
//! stack in step (see the trampoline's documentation), and the stub carries the site's
//! address.
//!
//! A write that lies in one aligned 8-byte word and replaces one whole instruction by
//! another is one atomic store. Any other write follows the kernel's `text_poke_bp`:
//! `int3` on the first byte, the other bytes, the first byte, with a synchronisation
//! round after each step. A thread that reaches the breakpoint meanwhile is sent into
//! the site's stub, as if the site had jumped there (`SIGTRAP` handler): the
//! trampoline's decision is right in every state of the site, because a site only ever
//! jumps straight to the implementation the decision would choose. A thread interrupted
//! in the middle of a run of one-byte nops is moved past the run by the first round
//! after the breakpoint is in place ([`on_sync`]): it had begun the original function.

use std::sync::atomic::{AtomicU8, AtomicU64, Ordering};

use klp::Errno;
use klp::arch::{Arch, FuncInfo, Redirect, Site};
use klp_arch_x86_64::X86_64;
use klp_arch_x86_64::live::trampoline;

use super::SiteState;
use crate::symbols::SymbolIndex;

/// The wrapper of [`crate::patchable!`] on x86_64: the 5-byte nop site, then a tail
/// jump to the body.
#[doc(hidden)]
#[macro_export]
macro_rules! __patchable_wrapper {
    ($(#[$m:meta])* $vis:vis fn $name:ident($($arg:ident : $ty:ty),*) $(-> $ret:ty)?) => {
        $(#[$m])*
        #[unsafe(no_mangle)]
        #[unsafe(naked)]
        $vis extern "C" fn $name($($arg: $ty),*) $(-> $ret)? {
            ::core::arch::naked_asm!(
                ".byte 0x0f, 0x1f, 0x44, 0x00, 0x00",
                "jmp {body}",
                body = sym $name::body,
            )
        }
    };
}

/// How long a synchronisation round waits for the threads' answers.
const SYNC_TIMEOUT: std::time::Duration = std::time::Duration::from_millis(500);

pub(super) static TEXT: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// Writes new text and makes it visible to instruction fetch (for the patch loader).
pub(crate) const WRITE_TEXT: Option<unsafe fn(*mut u8, &[u8])> =
    Some(klp_arch_x86_64::live::write_text);

/// The site at the entry of the function that starts at `addr` (a function symbol of
/// the index, whose bytes are an unpatched x86 nop site).
pub(crate) fn find(index: &SymbolIndex, addr: u64) -> Option<Site> {
    let (_, sym) = index.lookup(addr)?;
    if sym.addr != addr || !sym.func {
        return None;
    }
    let len = (sym.size as usize).clamp(1, X86_64::MAX_SITE_LEN);
    if !index.is_text(addr) || !index.is_text(addr + len as u64 - 1) {
        return None;
    }
    // SAFETY: `addr..addr + len` lies in an executable (hence mapped and readable)
    // segment of a loaded object, inside the function's symbol.
    let code = unsafe { std::slice::from_raw_parts(addr as *const u8, len) };
    let site = X86_64::find_site(code, FuncInfo::at(addr)).ok()?;
    (site.form.code == klp_arch_x86_64::site::form::NOPS
        && site.len() as u64 == trampoline::SITE_LEN)
        .then_some(site)
}

/// The body a `patchable!` wrapper jumps to: the `jmp` right after the site.
pub(crate) fn body_of(index: &SymbolIndex, site: &Site) -> Option<(u64, u64)> {
    let at = site.addr() + site.len() as u64;
    if !index.is_text(at) {
        return None;
    }
    let size = index.size_of(site.func.addr)?;
    if size < (at - site.func.addr) + 2 {
        return None;
    }
    // SAFETY: `at` is in an executable segment, inside the wrapper's symbol (its size
    // covers at least 2 bytes past the site, checked above).
    let op = unsafe { *(at as *const u8) };
    let target = match op {
        0xe9 if size >= (at - site.func.addr) + 5 => {
            // SAFETY: the symbol holds the 5 bytes of the jmp (checked).
            let b = unsafe { std::slice::from_raw_parts(at as *const u8, 5) };
            klp_arch_x86_64::insn::rel32_target(b, at, 0xe9)?
        }
        0xeb => {
            // SAFETY: the symbol holds the 2 bytes of the short jmp (checked).
            let d = unsafe { *((at + 1) as *const i8) };
            (at + 2).wrapping_add(d as i64 as u64)
        }
        _ => return None,
    };
    let (_, s) = index.lookup(target)?;
    (s.addr == target).then_some((target, target + s.size.max(1)))
}

/// The site being rewritten with the breakpoint protocol (0: none), and its length.
static PATCHING: AtomicU64 = AtomicU64::new(0);
static PATCHING_LEN: AtomicU64 = AtomicU64::new(0);
/// `si_code` of a `SIGTRAP` raised by `int3` (the kernel's `SI_KERNEL`).
const SI_KERNEL: libc::c_int = 0x80;
/// The stub of the site being rewritten.
static PATCHING_STUB: AtomicU64 = AtomicU64::new(0);
/// Call sites being retargeted with the breakpoint protocol ([`super::callsites`]),
/// one per slot: the site (0: a free slot), its kind (0: a jump; `n > 0`: a call of
/// `n` bytes, whose return address is `site + n`) and the function it calls (where a
/// thread that traps there is sent). The writer stores the kind and the function
/// before the site and clears the site last.
pub(super) const PATCHING_CALL_SLOTS: usize = 16;
pub(super) static PATCHING_CALL: [AtomicU64; PATCHING_CALL_SLOTS] =
    [const { AtomicU64::new(0) }; PATCHING_CALL_SLOTS];
pub(super) static PATCHING_CALL_KIND: [AtomicU8; PATCHING_CALL_SLOTS] =
    [const { AtomicU8::new(0) }; PATCHING_CALL_SLOTS];
pub(super) static PATCHING_CALL_TARGET: [AtomicU64; PATCHING_CALL_SLOTS] =
    [const { AtomicU64::new(0) }; PATCHING_CALL_SLOTS];
/// How many threads reached the breakpoint of a call site and were emulated.
pub(super) static PATCHING_CALL_TRAPS: AtomicU64 = AtomicU64::new(0);
/// klp's `SIGTRAP` handler and the disposition it found.
pub(super) static TRAP: super::TrapHandler = super::TrapHandler::new();

/// A thread that reaches the breakpoint of a site being rewritten is sent to the
/// site's stub, as if the site's `jmp` had run (the stub exists before any write that
/// needs the breakpoint begins). A thread that reaches the breakpoint of a call site
/// being retargeted ([`super::callsites`]) is emulated as calling (or, for a `jmp`,
/// jumping to) the function the site calls: that function's entry leads to the right
/// implementation in every state. A thread that trapped on a breakpoint already
/// replaced re-runs the instruction now there. Any other `SIGTRAP` goes to the previous
/// disposition.
pub(super) extern "C" fn on_trap(
    sig: libc::c_int,
    info: *mut libc::siginfo_t,
    uc: *mut libc::c_void,
) {
    let site = PATCHING.load(Ordering::Acquire);
    let stub = PATCHING_STUB.load(Ordering::Acquire);
    // SAFETY: with `SA_SIGINFO` the kernel passes the interrupted context as the third
    // argument, valid for the duration of the handler.
    let ctx = unsafe { &mut *(uc as *mut libc::ucontext_t) };
    if let Some(r) = ctx.uc_mcontext.gregs.get_mut(libc::REG_RIP as usize)
        && site != 0
        && stub != 0
        && *r as u64 == site + 1
    {
        *r = stub as i64;
        return;
    }
    // SAFETY: `info` is the handler's valid `siginfo_t` (or null).
    let int3 = !info.is_null() && unsafe { (*info).si_code } == SI_KERNEL;
    if int3 && let Some(&rip) = ctx.uc_mcontext.gregs.get(libc::REG_RIP as usize) {
        let at = (rip as u64).wrapping_sub(1);
        for i in 0..PATCHING_CALL_SLOTS {
            let (Some(s), Some(k), Some(t)) = (
                PATCHING_CALL.get(i),
                PATCHING_CALL_KIND.get(i),
                PATCHING_CALL_TARGET.get(i),
            ) else {
                break;
            };
            let call = s.load(Ordering::Acquire);
            if call == 0 || call != at {
                continue;
            }
            let kind = k.load(Ordering::Acquire);
            let func = t.load(Ordering::Acquire);
            std::sync::atomic::fence(Ordering::Acquire);
            if s.load(Ordering::Relaxed) != call || func == 0 {
                continue;
            }
            let g = &mut ctx.uc_mcontext.gregs;
            if kind != 0 {
                let Some(sp) = g.get_mut(libc::REG_RSP as usize) else {
                    break;
                };
                let new_sp = (*sp as u64).wrapping_sub(8);
                // SAFETY: the interrupted thread was about to execute this `call`,
                // which stores its return address at exactly `rsp - 8` of its own
                // stack: that word is the thread's writable stack and holds nothing
                // live (below the stack pointer of a thread about to push); the kernel
                // put this handler's frame below the 128-byte red zone (or on the
                // alternate stack), so the store does not touch it. If the stack were
                // not writable, the `call` would have faulted the same way.
                unsafe { std::ptr::write_volatile(new_sp as *mut u64, call + u64::from(kind)) };
                *sp = new_sp as i64;
            }
            if let Some(r) = g.get_mut(libc::REG_RIP as usize) {
                *r = func as i64;
                PATCHING_CALL_TRAPS.fetch_add(1, Ordering::Relaxed);
                return;
            }
        }
    }
    // A breakpoint of ours that is gone by now: a thread that trapped on it was not
    // scheduled before the writer's round gave up waiting, and the site was finished
    // meanwhile. The instruction there is whole again: run it.
    // SAFETY: `info` is the handler's valid `siginfo_t`.
    let from_int3 = !info.is_null() && unsafe { (*info).si_code } == SI_KERNEL;
    if from_int3 && let Some(r) = ctx.uc_mcontext.gregs.get_mut(libc::REG_RIP as usize) {
        let at = (*r as u64).wrapping_sub(1);
        // SAFETY: the trapping `int3` was fetched from `at`, so that byte is mapped
        // text (readable: klp never maps text execute-only).
        let now = unsafe { std::ptr::read_volatile(at as *const u8) };
        if now != 0xcc {
            *r = at as i64;
            return;
        }
    }
    TRAP.forward(sig, info, uc);
}

/// A thread interrupted inside a site being rewritten (only possible in a run of
/// one-byte nops: every other state is one instruction) is moved past the site: it
/// had begun the original function, and the run's remaining bytes are nops.
///
/// # Safety
///
/// 1. `uc` is the `ucontext_t` of an `SA_SIGINFO` handler on the interrupted thread.
pub(crate) unsafe fn on_sync(uc: *mut libc::c_void) {
    let site = PATCHING.load(Ordering::Acquire);
    if site == 0 {
        return;
    }
    let end = site + PATCHING_LEN.load(Ordering::Acquire);
    // SAFETY: condition 1.
    let ctx = unsafe { &mut *(uc as *mut libc::ucontext_t) };
    if let Some(r) = ctx.uc_mcontext.gregs.get_mut(libc::REG_RIP as usize) {
        let pc = *r as u64;
        if pc > site && pc < end {
            *r = end as i64;
        }
    }
}

/// The bytes of `state` at `site` (`stub`: the site's stub).
fn bytes_of(site: &Site, state: SiteState, stub: u64) -> Result<klp::arch::InsnBytes, Errno> {
    let to = match state {
        // One instruction, whatever the compiler left (a run of one-byte nops): the
        // next write from here is then one store (`klp_arch_x86_64::site::settled`).
        SiteState::Original => return Ok(klp_arch_x86_64::site::settled(site)),
        SiteState::Trampoline => stub,
        SiteState::Jump(to) => to,
    };
    X86_64::encode_redirect(site, Redirect::jump(to)).map_err(|_| Errno::ERANGE)
}

/// Whether a `jmp rel32` at `site` reaches `to`.
fn reaches(site: &Site, to: u64) -> bool {
    X86_64::encode_redirect(site, Redirect::jump(to)).is_ok()
}

/// The stub of `site` ([`super::stubs`]; `TEXT` held by the caller): it enters the
/// fast path with the site's slot when the fast path can run in this process, else
/// the trampoline with the site.
fn stub_for(site: &Site, sync: &mut dyn FnMut()) -> Result<u64, Errno> {
    let addr = site.addr();
    let bytes = match super::slot_addr(addr) {
        Some(slot) if fast_path_ready() => {
            trampoline::stub_bytes_to(slot, fast_entry as *const () as u64)
        }
        _ => trampoline::stub_bytes(addr),
    };
    // SAFETY: `TEXT` is held by the caller (1); `write_text` copies and syncs (2).
    unsafe {
        super::stubs::stub_for(
            addr,
            &bytes,
            &|a| reaches(site, a),
            klp_arch_x86_64::live::write_text,
            sync,
        )
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

/// Whether the bytes at `site` now are one instruction covering it (the compiler's
/// 5-byte nop, or a site klp settled when it restored it).
/// `TEXT` is held by the caller (no write can be under way).
fn one_instruction_now(site: &Site) -> bool {
    let mut now = [0u8; klp_arch_x86_64::site::MAX_LEN];
    let Some(buf) = now.get_mut(..site.len()) else {
        return false;
    };
    // SAFETY: the site is text of a loaded object (`find`), mapped and readable (klp
    // never maps text execute-only); `buf` holds `site.len()` bytes and does not
    // overlap the site.
    unsafe { std::ptr::copy_nonoverlapping(site.addr() as *const u8, buf.as_mut_ptr(), buf.len()) };
    klp_arch_x86_64::site::is_one_instruction(site, buf)
}

/// Rewrites `site` from state `from` to state `to` (see the module documentation).
/// `sync` runs a synchronisation round. Fails with `ERANGE` (nothing written) when
/// `to` cannot be encoded at this site (a jump or the trampoline out of reach).
pub(crate) fn set(
    site: &Site,
    from: SiteState,
    to: SiteState,
    sync: &mut dyn FnMut(),
) -> Result<(), Errno> {
    let _g = TEXT.lock().unwrap_or_else(|e| e.into_inner());
    trampoline::set_decision(super::decide_entry);
    let stub = stub_for(site, sync)?;
    let bytes = bytes_of(site, to, stub)?;
    let whole = from != SiteState::Original || one_instruction_now(site);
    PATCHING_STUB.store(stub, Ordering::Release);
    write(site, bytes.as_slice(), whole, sync)
}

/// Writes `bytes` over `site` while other threads may run it (module documentation).
/// `whole`: the current bytes are one instruction, so one atomic store may replace
/// them.
/// `TEXT` is held by the caller.
fn write(site: &Site, bytes: &[u8], whole: bool, sync: &mut dyn FnMut()) -> Result<(), Errno> {
    let addr = site.addr();
    // SAFETY: the site is text of a loaded object (`find`) (1).
    let _w = unsafe { super::text::Writable::new(addr, bytes.len() as u64) }?;
    // SAFETY: the site's word is mapped and writable now (1) and text writes are
    // serialised by `TEXT` (2).
    let atomic = whole && unsafe { trampoline::write_site(addr as *mut u8, bytes) };
    // When the site is one instruction now, no thread can be inside it: the rounds
    // only need to serialise every core (`membarrier`), not to move anyone.
    let mut core_sync = || crate::stack::sync_core(SYNC_TIMEOUT);
    let sync: &mut dyn FnMut() = if whole { &mut core_sync } else { sync };
    if !atomic && let Some((first, rest)) = bytes.split_first() {
        // A synchronisation round must not be acknowledged while a thread is between
        // the breakpoint and its redirect: the writer could clear `PATCHING` in
        // between and the trap would reach the old disposition (klp's signal is
        // blocked in the handler).
        TRAP.install(libc::SIGTRAP, on_trap);
        PATCHING_LEN.store(bytes.len() as u64, Ordering::Release);
        PATCHING.store(addr, Ordering::Release);
        // SAFETY: `addr` is mapped and writable; a one-byte store is atomic.
        let b0 = unsafe { &*(addr as *const AtomicU8) };
        b0.store(0xcc, Ordering::SeqCst);
        sync();
        // SAFETY: the rest of the site is mapped and writable (1); a thread that
        // reaches the site stops at the breakpoint and is sent to the stub, and
        // the round above moved every thread out of the site's middle, so no one
        // executes these bytes while they are written (2); `TEXT` (3).
        unsafe { klp_arch_x86_64::live::write_text((addr + 1) as *mut u8, rest) };
        sync();
        b0.store(*first, Ordering::SeqCst);
        klp_arch_x86_64::live::sync_icache(addr as *const u8, 1);
        sync();
        PATCHING.store(0, Ordering::Release);
    }
    Ok(())
}

/// The word the trampoline's decision returns for `target` at `site`: the address
/// itself (this architecture needs no tag).
pub(crate) fn published_target(_index: &SymbolIndex, _site: u64, target: u64) -> u64 {
    target
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
        let slot = super::super::slot_addr(site).expect("slot");
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
