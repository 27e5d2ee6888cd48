//! x86_64: patchable wrappers, site recognition and text writes.
//!
//! A site is 5 bytes: the wrapper's `nopl 0x0(%rax,%rax,1)` or, in C built with
//! `-fpatchable-function-entry=5`, five one-byte nops. Its states:
//!
//! | state | bytes |
//! |---|---|
//! | original | as found |
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
use klp::arch::{Arch, FuncInfo, Redirect, Site, SiteForm};
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

static TEXT: std::sync::Mutex<()> = std::sync::Mutex::new(());

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
    (matches!(site.form, SiteForm::X86Nops { .. }) && site.len() as u64 == trampoline::SITE_LEN)
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
/// klp's `SIGTRAP` handler and the disposition it found.
static TRAP: super::TrapHandler = super::TrapHandler::new();

/// A thread that reaches the breakpoint of a site being rewritten is sent to the
/// site's stub, as if the site's `jmp` had run (the stub exists before any write that
/// needs the breakpoint begins). A thread that trapped on a breakpoint already
/// replaced re-runs the instruction now there. Any other `SIGTRAP` goes to the previous
/// disposition.
extern "C" fn on_trap(sig: libc::c_int, info: *mut libc::siginfo_t, uc: *mut libc::c_void) {
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
        SiteState::Original => return Ok(X86_64::restore(site)),
        SiteState::Trampoline => stub,
        SiteState::Jump(to) => to,
    };
    X86_64::encode_redirect(site, Redirect::jump(to)).map_err(|_| Errno::ERANGE)
}

fn page_size() -> u64 {
    // SAFETY: `sysconf` has no preconditions.
    (unsafe { libc::sysconf(libc::_SC_PAGESIZE) }).max(4096) as u64
}

/// Whether a `jmp rel32` at `site` reaches `to`.
fn reaches(site: &Site, to: u64) -> bool {
    X86_64::encode_redirect(site, Redirect::jump(to)).is_ok()
}

/// The stub of `site` ([`super::stubs`]; `TEXT` held by the caller).
fn stub_for(site: &Site, sync: &mut dyn FnMut()) -> Result<u64, Errno> {
    let addr = site.addr();
    // SAFETY: `TEXT` is held by the caller (1); `write_text` copies and syncs (2).
    unsafe {
        super::stubs::stub_for(
            addr,
            &trampoline::stub_bytes(addr),
            &|a| reaches(site, a),
            klp_arch_x86_64::live::write_text,
            sync,
        )
    }
}

/// Whether `site`'s original bytes are one instruction (the 5-byte nop).
fn single_nop(site: &Site) -> bool {
    site.original.as_slice() == [0x0f, 0x1f, 0x44, 0x00, 0x00]
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
    let whole = from != SiteState::Original || single_nop(site);
    PATCHING_STUB.store(stub, Ordering::Release);
    write(site, bytes.as_slice(), whole, sync)
}

/// Writes `bytes` over `site` while other threads may run it (module documentation).
/// `whole`: the current bytes are one instruction, so one atomic store may replace
/// them.
/// `TEXT` is held by the caller.
fn write(site: &Site, bytes: &[u8], whole: bool, sync: &mut dyn FnMut()) -> Result<(), Errno> {
    let page = page_size();
    let addr = site.addr();
    let start = addr & !(page - 1);
    let end = (addr + bytes.len() as u64 + page - 1) & !(page - 1);
    let rwx = libc::PROT_READ | libc::PROT_WRITE | libc::PROT_EXEC;
    // SAFETY: the range covers whole pages of a loaded object's text; it stays
    // executable while writable, so threads running it are not disturbed.
    if unsafe { libc::mprotect(start as *mut libc::c_void, (end - start) as usize, rwx) } != 0 {
        return Err(Errno::EPERM);
    }
    // SAFETY: the site's word is mapped and writable now (1) and text writes are
    // serialised by `TEXT` (2).
    let atomic = whole && unsafe { trampoline::write_site(addr as *mut u8, bytes) };
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
    // SAFETY: as for the first `mprotect`; text is read + execute again.
    unsafe {
        libc::mprotect(
            start as *mut libc::c_void,
            (end - start) as usize,
            libc::PROT_READ | libc::PROT_EXEC,
        )
    };
    Ok(())
}

/// The word the trampoline's decision returns for `target` at `site`: the address
/// itself (this architecture needs no tag).
pub(crate) fn published_target(_index: &SymbolIndex, _site: u64, target: u64) -> u64 {
    target
}
