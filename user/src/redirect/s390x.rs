//! s390x: patchable wrappers, site recognition and text writes.
//!
//! LLVM cannot give Rust functions patchable entries on s390x, so the site is the
//! first instruction of the `patchable!` wrapper: `brcl 0,0` (`c0 04 00 00 00 00`, a
//! 6-byte nop), then `jg body`. C functions built with `-pg -mfentry -mnop-mcount` have
//! the same site (`-mrecord-mcount` is not needed: sites are found by symbol). Runs of
//! `nopr` (`-fpatchable-function-entry`, `-mhotpatch`) are several instructions and
//! are not used. A site is one instruction in every state:
//!
//! | state | bytes |
//! |---|---|
//! | original | `brcl 0,d` as found (`c0 04`, a nop whatever `d`) |
//! | trampoline | `brasl %r0,stub` (`c0 05`); the site's stub ([`super::stubs`]) jumps to `entry_trampoline` ([`klp_arch_s390x::live::trampoline`]) through r1 |
//! | jump | `jg new_function` (`c0 f4`, only when it is within ±4 GiB) |
//!
//! Displacements count halfwords from the site (±4 GiB), hence the stub within that
//! reach, wherever the trampoline is; a site's stub is made (with a round of its own)
//! before the site branches to it.
//!
//! ## Writes
//!
//! The first halfword (opcode and mask/register) and the 4-byte displacement are
//! written with aligned halfword stores; each is block-concurrent, the instruction as a
//! whole is not, so the displacement is only rewritten while the first halfword makes
//! it irrelevant:
//! * `c0 04`, `brcl 0`: a nop whatever the displacement;
//! * `00 00`, the trap: operation code 00 is never assigned, so the instruction raises
//!   an operation exception (`SIGILL`) whatever follows. (0x0001 and 0x0002 are avoided:
//!   the kernel gives them to ptrace and uprobes.)
//!
//! With a synchronisation round after each step:
//! 1. if the displacement changes while the site branches: the first halfword becomes
//!    the nop when the new state is the original, the trap otherwise;
//! 2. the displacement;
//! 3. the new first halfword.
//!
//! A CPU runs the instructions it fetched until it serialises, and the round after each
//! step serialises every thread (a signal interrupts it). So after step 1's round no
//! thread can still combine the old branching halfword with a displacement being
//! written, and after step 2's round every thread that sees the new first halfword
//! sees the whole new displacement with it: a torn displacement is only ever seen under
//! the nop or the trap. A site that is already the nop (installing the trampoline)
//! skips step 1: the first halfword flips once, from `c0 04` to `c0 05`, the
//! kernel's enabling of an ftrace site.
//!
//! The nop is not a safe intermediate everywhere: whoever calls the function while the
//! site is the nop runs the original body. That is right while a site is being
//! installed or removed (every thread runs the original then), but not between the
//! trampoline and a jump, where threads run a replacement. There the trap stands in:
//! a thread that reaches it is sent into the entry trampoline as if the site had called
//! it through its stub (the `SIGILL` handler sets r0 = site + 6 and the pc to the
//! trampoline itself, which a handler reaches from anywhere), and the
//! trampoline's decision is right in every state of the site, because a site only ever
//! jumps straight to the implementation the decision would choose. The handler blocks
//! klp's synchronisation signal while it runs, so a round cannot complete (and the
//! write move on) while a thread is between the trap and its redirection. Other
//! `SIGILL`s go to the previous disposition.
//!
//! [`on_sync`] has nothing to do: a site is one instruction, so an interrupted thread
//! is before it or past it, never inside it.
//!
//! Instruction fetch is coherent with stores on s390x: the writer serialises after
//! each store (`bcr 15,0`, [`klp_arch_s390x::live::klp_s390x_sync_icache`]) and the
//! rounds serialise everyone else.

use std::sync::atomic::{AtomicU64, Ordering};

use klp::Errno;
use klp::arch::{Arch, FuncInfo, Redirect, Site, SiteForm};
use klp_arch_s390x::S390x;
use klp_arch_s390x::live::trampoline;

use super::SiteState;
use crate::symbols::SymbolIndex;

/// The wrapper of [`crate::patchable!`] on s390x: the `brcl 0,0` site, then a tail
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
                ".byte 0xc0, 0x04, 0x00, 0x00, 0x00, 0x00",
                "jg {body}",
                body = sym $name::body,
            )
        }
    };
}

/// Length of a site.
const LEN: usize = trampoline::CALL_LEN as usize;
/// First halfword of the nop (`brcl 0,…`).
const NOP: [u8; 2] = klp_arch_s390x::insn::BRCL_0;
/// First halfword of the trap.
const TRAP: [u8; 2] = [0x00, 0x00];
/// `HWCAP_S390_VXRS`: the vector facility, usable by this process.
const HWCAP_S390_VXRS: u64 = 1 << 11;

static TEXT: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// Writes new text and makes it visible to instruction fetch (for the patch loader).
pub(crate) const WRITE_TEXT: Option<unsafe fn(*mut u8, &[u8])> =
    Some(klp_arch_s390x::live::write_text);

/// The site at the entry of the function that starts at `addr` (a function symbol of
/// the index, whose first instruction is an unpatched `brcl 0,…`).
pub(crate) fn find(index: &SymbolIndex, addr: u64) -> Option<Site> {
    let (_, sym) = index.lookup(addr)?;
    if sym.addr != addr || !sym.func || (sym.size != 0 && sym.size < LEN as u64) {
        return None;
    }
    let len = (sym.size as usize).clamp(LEN, S390x::MAX_SITE_LEN);
    if !index.is_text(addr) || !index.is_text(addr + len as u64 - 1) {
        return None;
    }
    // SAFETY: `addr..addr + len` lies in an executable (hence mapped and readable)
    // segment of a loaded object, inside the function's symbol.
    let code = unsafe { std::slice::from_raw_parts(addr as *const u8, len) };
    let site = S390x::find_site(code, FuncInfo::at(addr)).ok()?;
    (site.form == SiteForm::new(klp_arch_s390x::site::form::BRCL) && site.len() == LEN)
        .then_some(site)
}

/// The target of the `jg` (`brcl 15,…`) whose 6 bytes are `b`, placed at `at`.
fn jg_target(b: &[u8], at: u64) -> Option<u64> {
    let (op, d) = b.split_first_chunk::<2>()?;
    if *op != klp_arch_s390x::insn::JG {
        return None;
    }
    let d = i32::from_be_bytes(*d.first_chunk::<4>()?);
    Some(at.wrapping_add((i64::from(d) * 2) as u64))
}

/// The body a `patchable!` wrapper jumps to: the `jg` right after the site.
pub(crate) fn body_of(index: &SymbolIndex, site: &Site) -> Option<(u64, u64)> {
    let at = site.addr() + LEN as u64;
    let size = index.size_of(site.func.addr)?;
    if size < (at - site.func.addr) + LEN as u64 || !index.is_text(at + LEN as u64 - 1) {
        return None;
    }
    // SAFETY: `at..at + 6` is in an executable segment, inside the wrapper's symbol
    // (its size covers it, checked above).
    let b = unsafe { std::slice::from_raw_parts(at as *const u8, LEN) };
    let target = jg_target(b, at)?;
    let (_, s) = index.lookup(target)?;
    (s.addr == target).then_some((target, target + s.size.max(1)))
}

/// The site whose first halfword is the trap now (0: none).
static PATCHING: AtomicU64 = AtomicU64::new(0);
/// klp's `SIGILL` handler and the disposition it found.
static ILL: super::TrapHandler = super::TrapHandler::new();

/// A thread that reaches the trap of a site being rewritten is sent into the entry
/// trampoline as if the site's `brasl %r0` had run: r0 = site + 6, pc = the
/// trampoline; r14 and r15 are still the caller's (the trap is the function's first
/// instruction). The faulting address is `si_addr`; the PSW points past the 2-byte
/// trap (or at it). Any other `SIGILL` goes to the previous disposition.
extern "C" fn on_ill(sig: libc::c_int, info: *mut libc::siginfo_t, uc: *mut libc::c_void) {
    let site = PATCHING.load(Ordering::Acquire);
    // SAFETY: with `SA_SIGINFO` the kernel passes the signal's information and the
    // interrupted context, valid for the duration of the handler.
    let (addr, ctx) = unsafe {
        (
            (*info).si_addr() as u64,
            &mut *(uc as *mut libc::ucontext_t),
        )
    };
    let m = &mut ctx.uc_mcontext;
    let pc = m.psw.addr;
    if site != 0 && (addr == site || pc == site + TRAP.len() as u64 || pc == site) {
        m.gregs[0] = site + LEN as u64;
        m.psw.addr = trampoline::address();
        return;
    }
    ILL.forward(sig, info, uc);
}

/// Installs [`on_ill`] once; returns whether it is installed.
/// Nothing to fix up: a site is one instruction (see the module documentation).
///
/// # Safety
///
/// 1. `uc` is the `ucontext_t` of an `SA_SIGINFO` handler (unused).
pub(crate) unsafe fn on_sync(_uc: *mut libc::c_void) {}

/// The stub of `site` ([`super::stubs`]; `TEXT` held by the caller).
fn stub_for(site: &Site, sync: &mut dyn FnMut()) -> Result<u64, Errno> {
    let at = site.addr();
    // SAFETY: `TEXT` is held by the caller (1); `write_text` copies and serialises (2).
    unsafe {
        super::stubs::stub_for(
            at,
            &trampoline::stub_bytes(),
            &|a| klp_arch_s390x::insn::brasl_r0(at, a).is_ok(),
            klp_arch_s390x::live::write_text,
            sync,
        )
    }
}

/// The bytes of `state` at `site`; for the trampoline state, the site's stub is made
/// if it does not exist yet (`TEXT` held by the caller).
fn bytes_of(site: &Site, state: SiteState, sync: &mut dyn FnMut()) -> Result<[u8; LEN], Errno> {
    let b = match state {
        SiteState::Original => S390x::restore(site),
        SiteState::Trampoline => {
            S390x::encode_redirect(site, Redirect::call(stub_for(site, sync)?))
                .map_err(|_| Errno::ERANGE)?
        }
        SiteState::Jump(to) => {
            S390x::encode_redirect(site, Redirect::jump(to)).map_err(|_| Errno::ERANGE)?
        }
    };
    b.as_slice().try_into().map_err(|_| Errno::EINVAL)
}

/// Whether this process may use the vector registers (so the trampoline saves the
/// vector argument registers).
fn vector_facility() -> bool {
    // SAFETY: `getauxval` has no preconditions.
    let hwcap = unsafe { libc::getauxval(libc::AT_HWCAP) };
    hwcap & HWCAP_S390_VXRS != 0
}

/// Rewrites `site` from state `from` to state `to` (see the module documentation).
/// `sync` runs a synchronisation round. Fails, with nothing written to the site, with
/// `ERANGE` when `to` cannot be encoded at this site (a jump out of reach, no stub page
/// within reach), `EINVAL` when the site is not a 6-byte `brcl` site or does not hold
/// `from`'s bytes, `EPERM` when its page cannot be made writable or the `SIGILL`
/// handler installed.
pub(crate) fn set(
    site: &Site,
    from: SiteState,
    to: SiteState,
    sync: &mut dyn FnMut(),
) -> Result<(), Errno> {
    if site.form != SiteForm::new(klp_arch_s390x::site::form::BRCL) || site.len() != LEN {
        return Err(Errno::EINVAL);
    }
    let _g = TEXT.lock().unwrap_or_else(|e| e.into_inner());
    let new = bytes_of(site, to, sync)?;
    let old = bytes_of(site, from, sync)?;
    trampoline::set_vector_facility(vector_facility());
    trampoline::set_decision(super::decide_entry);
    write(site.addr(), &old, &new, sync)
}

/// Stores `bytes` at `at` (halfword stores, then the serialisation).
///
/// # Safety
///
/// 1. `at..at + bytes.len()` lies in the site, whose page is writable now.
/// 2. The caller holds `TEXT`.
unsafe fn store(at: u64, bytes: &[u8]) {
    // SAFETY: conditions 1 and 2 are the function's; sites are 2-aligned (checked by
    // `find_site`), so the halfword stores cannot be refused.
    let _ = unsafe { klp_arch_s390x::live::store_halfwords(at as *mut u8, bytes) };
}

/// Changes the site at `addr` from `old` to `new` while other threads may run it
/// (module documentation). `TEXT` is held by the caller.
fn write(addr: u64, old: &[u8; LEN], new: &[u8; LEN], sync: &mut dyn FnMut()) -> Result<(), Errno> {
    let (op_new, d_new) = new.split_at(2);
    let (op_old, d_old) = old.split_at(2);
    let hold = if op_new == NOP { NOP } else { TRAP };
    let trap = d_old != d_new && op_old != NOP && hold == TRAP;
    if trap && !ILL.install(libc::SIGILL, on_ill) {
        return Err(Errno::EPERM);
    }
    // SAFETY: `addr..addr + 6` is the site, mapped text (`find`).
    let now = unsafe { std::ptr::read_volatile(addr as *const [u8; LEN]) };
    if now != *old {
        return Err(Errno::EINVAL);
    }
    // SAFETY: the site is text of a loaded object (`find`) (1).
    let _w = unsafe { super::text::Writable::new(addr, LEN as u64) }?;
    let mut op = op_old;
    if d_old != d_new {
        if op != NOP {
            if trap {
                PATCHING.store(addr, Ordering::SeqCst);
            }
            // SAFETY: the first halfword of the site, writable now (1); `TEXT` (2).
            unsafe { store(addr, &hold) };
            op = &hold;
            sync();
        }
        // SAFETY: the displacement of the site (1); `TEXT` (2). The first halfword is
        // the nop or the trap, and every thread has serialised since it became so.
        unsafe { store(addr + 2, d_new) };
        sync();
    }
    if op != op_new {
        // SAFETY: the first halfword of the site (1); `TEXT` (2). Every thread has
        // serialised since the new displacement was stored.
        unsafe { store(addr, op_new) };
        sync();
    }
    PATCHING.store(0, Ordering::SeqCst);
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

    #[test]
    fn jg_targets() {
        assert_eq!(jg_target(&[0xc0, 0xf4, 0, 0, 0, 8], 0x1000), Some(0x1010));
        assert_eq!(
            jg_target(&[0xc0, 0xf4, 0xff, 0xff, 0xff, 0xff], 0x1000),
            Some(0x0ffe)
        );
        assert_eq!(jg_target(&[0xc0, 0x04, 0, 0, 0, 8], 0x1000), None);
        assert_eq!(jg_target(&[0xc0, 0xf4, 0], 0x1000), None);
    }

    crate::patchable! {
        fn klp_s390x_unit_site(x: u64) -> u64 {
            x * 3
        }
    }

    #[test]
    fn the_wrapper_starts_with_the_site_and_jumps_to_the_body() {
        let f = klp_s390x_unit_site as *const () as u64;
        // SAFETY: the wrapper's 12 bytes are mapped text of this program.
        let b = unsafe { std::ptr::read_volatile(f as *const [u8; 12]) };
        assert_eq!(b[..6], klp_arch_s390x::insn::BRCL_0_0);
        assert_eq!(
            jg_target(&b[6..], f + 6),
            Some(klp_s390x_unit_site::body as *const () as u64)
        );
        assert_eq!(klp_s390x_unit_site(5), 15);
    }
}

/// No fast entry path on this architecture: every stub enters the trampoline.
pub(crate) const FAST_ENTRY: Option<unsafe extern "C" fn()> = None;
