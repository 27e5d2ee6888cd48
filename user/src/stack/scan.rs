//! The stack memory reader of a held thread and the conservative scan's filter (which
//! words may be return addresses).

use std::sync::atomic::{AtomicU64, Ordering};

use klp::arch::{Arch, Native, StackBounds, StackMemory};
use klp_arch::Live;
use klp_arch::MAX_CALL_LEN;

use crate::symbols::SymbolIndex;

/// A thread's stack as the arch unwinder reads it: words in `[floor, high)` only (the
/// part of the stack that is live: at or above the interrupted sp).
#[derive(Debug)]
pub struct ThreadStack<'a> {
    pub(super) bounds: StackBounds,
    pub(super) floor: u64,
    pub(super) index: &'a SymbolIndex,
}

impl<'a> ThreadStack<'a> {
    /// The live stack `[sp, high)` of a thread whose stack is `[low, high)` and whose
    /// walks end at `end`.
    ///
    /// # Safety
    ///
    /// 1. `[sp & !7, high)` is mapped, readable memory of a thread that does not run
    ///    while this value is used (it is held in the handler, or it is the caller).
    pub unsafe fn new(low: u64, high: u64, end: u64, sp: u64, index: &'a SymbolIndex) -> Self {
        ThreadStack {
            bounds: StackBounds { low, high, end },
            floor: (sp & !7).max(low),
            index,
        }
    }
}

impl ThreadStack<'_> {
    /// Whether `w` may be a return address: text right after a call instruction (see
    /// the module documentation). No allocation. Bytes that cannot be read make the
    /// answer `true` (the word is kept: the check is only stricter).
    pub(super) fn returns_after_call(&self, code: &mut CodeReader, w: u64) -> bool {
        if !self.index.is_text(w) || is_site_end(w) {
            return false;
        }
        let memo = CALL_MEMO.get(memo_slot(w));
        if let Some(m) = memo {
            let e = m.load(Ordering::Relaxed);
            if e >> 2 == w && e & 3 != 0 {
                return e & 3 == MEMO_YES;
            }
        }
        // The bytes before `w` that are text (contiguously: the same segment).
        let mut n = 0;
        while n < MAX_CALL_LEN
            && w.checked_sub(n as u64 + 1)
                .is_some_and(|a| self.index.is_text(a))
        {
            n += 1;
        }
        let mut buf = [0u8; MAX_CALL_LEN];
        let Some(before) = buf.get_mut(..n) else {
            return true;
        };
        if !code.read(w - n as u64, before) {
            return true;
        }
        let yes = Native::follows_call(before);
        if let Some(m) = memo
            && w >> 62 == 0
        {
            m.store(
                w << 2 | if yes { MEMO_YES } else { MEMO_NO },
                Ordering::Relaxed,
            );
        }
        yes
    }

    /// The address that stands for the return address `w` in a trace. A return address
    /// that is exactly a function's entry follows a call at the very end of the
    /// function before it (a call that does not return, with no padding after it): the
    /// live frame is that function's, so the trace names the call's last byte. Keeping
    /// `w` would report the next function as running (forever, for a stale slot).
    pub(super) fn attribute(&self, w: u64) -> u64 {
        match self.index.lookup(w) {
            Some((_, s)) if s.addr == w => match w.checked_sub(1) {
                Some(p) if self.index.is_text(p) => p,
                _ => w,
            },
            _ => w,
        }
    }
}

/// Answers of [`ThreadStack::returns_after_call`] by address, so that a return
/// address seen in many stacks is read once: direct-mapped entries `w << 2 | answer`
/// (0: empty), lock-free. Code does not change under a return address while its object
/// stays loaded; [`forget_code`] empties the memo when objects come or go.
static CALL_MEMO: [AtomicU64; 4096] = [const { AtomicU64::new(0) }; 4096];
const MEMO_YES: u64 = 1;
const MEMO_NO: u64 = 2;

fn memo_slot(w: u64) -> usize {
    (w.wrapping_mul(0x9e37_79b9_7f4a_7c15) >> 52) as usize
}

/// Empties the memo of code answers (an object was loaded or unloaded).
pub fn forget_code() {
    for m in &CALL_MEMO {
        m.store(0, Ordering::Relaxed);
    }
}

/// Reads code bytes without trusting that the address is mapped (the index is only a
/// snapshot, and any caller may pass one): the kernel copies them, so an unmapped
/// address costs an error, not a fault. `process_vm_readv` on this process, or a
/// pipe where that call is missing (QEMU's user mode). No allocation, no lock.
#[derive(Debug)]
pub(super) struct CodeReader {
    /// `process_vm_readv` has not failed for a reason other than the address.
    pub(super) direct: bool,
    /// The pipe `(read end, write end)` of the fallback, once made.
    pipe: Option<(libc::c_int, libc::c_int)>,
}

impl CodeReader {
    pub(super) fn new() -> Self {
        CodeReader {
            direct: true,
            pipe: None,
        }
    }

    /// Fills `buf` from `addr`; `false` when the bytes are not all readable.
    pub(super) fn read(&mut self, addr: u64, buf: &mut [u8]) -> bool {
        if buf.is_empty() {
            return true;
        }
        let len = buf.len();
        if self.direct {
            let local = libc::iovec {
                iov_base: buf.as_mut_ptr().cast(),
                iov_len: len,
            };
            let remote = libc::iovec {
                iov_base: addr as *mut libc::c_void,
                iov_len: len,
            };
            // SAFETY: `local` describes `buf`, writable for `len` bytes; the remote range
            // is only accessed by the kernel, which checks it (`EFAULT`).
            let r = unsafe { libc::process_vm_readv(libc::getpid(), &local, 1, &remote, 1, 0) };
            if r == len as isize {
                return true;
            }
            // SAFETY: `__errno_location` returns this thread's errno slot.
            let errno = unsafe { *libc::__errno_location() };
            if r >= 0 || errno == libc::EFAULT || errno == libc::ESRCH {
                return false;
            }
            self.direct = false;
        }
        let (rd, wr) = match self.pipe {
            Some(p) => p,
            None => {
                let mut fds = [0 as libc::c_int; 2];
                // SAFETY: `fds` is a valid out-parameter for two descriptors.
                if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC | libc::O_NONBLOCK) } != 0
                {
                    return false;
                }
                self.pipe = Some((fds[0], fds[1]));
                (fds[0], fds[1])
            }
        };
        // SAFETY: the kernel reads `[addr, addr + len)` of this process with its own
        // checks (`EFAULT`); nothing is dereferenced here.
        let w = unsafe { libc::write(wr, addr as *const libc::c_void, len) };
        let mut got = 0isize;
        if w > 0 {
            // SAFETY: `buf` is writable for `len` bytes; at most `w <= len` are pending.
            got = unsafe { libc::read(rd, buf.as_mut_ptr().cast(), w as usize) };
        }
        if w != len as isize || got != w {
            // Something is off (a partial copy, a pipe left with bytes): start afresh.
            self.close();
            return false;
        }
        true
    }

    fn close(&mut self) {
        if let Some((rd, wr)) = self.pipe.take() {
            // SAFETY: both descriptors were made by `pipe2` above and are owned here.
            unsafe {
                libc::close(rd);
                libc::close(wr);
            }
        }
    }
}

impl Drop for CodeReader {
    fn drop(&mut self) {
        self.close();
    }
}

impl StackMemory for ThreadStack<'_> {
    fn bounds(&self) -> StackBounds {
        self.bounds
    }

    fn read_u64(&self, addr: u64) -> Option<u64> {
        let in_range = addr >= self.floor
            && addr.is_multiple_of(8)
            && addr.checked_add(8).is_some_and(|e| e <= self.bounds.high);
        if !in_range {
            return None;
        }
        // SAFETY: `[floor, high)` is readable and stable (condition 1 of `new`), the
        // address is inside it and 8-aligned.
        Some(unsafe { read_stack_word(addr) })
    }

    fn is_text(&self, addr: u64) -> bool {
        self.index.is_text(addr)
    }
}

/// Reads the stack word at `addr`.
///
/// A walk and the scan read every word of the live stack, most of which no Rust code
/// of this thread declared: saved registers, padding, other frames' locals — and, in a
/// program built with AddressSanitizer, the redzones it poisons around each frame's
/// locals, which it then reported as a `stack-buffer-underflow` on the first walk
/// (ci/test's ASan run). Like the kernel's unwinders (`READ_ONCE_NOCHECK`), the read is
/// the back-end's own load instruction ([`Live::read_stack_word`]), which the
/// sanitizers do not instrument; ThreadSanitizer would otherwise see a race with the
/// stopped thread's own stores to its stack, which the signal handshake orders but
/// through the kernel.
///
/// # Safety
///
/// 1. `addr` is 8-aligned and readable for 8 bytes.
#[inline]
unsafe fn read_stack_word(addr: u64) -> u64 {
    // SAFETY: condition 1 is the back-end's.
    unsafe { Native::read_stack_word(addr) }
}

/// The addresses just past every registered site (`site + len`): the return address
/// the site's branch-and-link leaves while it enters the trampoline. A thread inside
/// the trampoline is refused by the stack check anyway (`trace::Machinery`), so such a
/// word found on a stack is never the return address of a live frame — only a stale
/// copy of one, which the conservative scan must not count (it would hold every
/// transition a sleeping thread once called the function in). Kept here, below the
/// redirects that register the sites ([`crate::redirect::set_site_end`]).
static SITE_ENDS: std::sync::RwLock<std::collections::BTreeSet<u64>> =
    std::sync::RwLock::new(std::collections::BTreeSet::new());

/// Records (or, with `present` false, forgets) the end of a registered site.
pub(crate) fn set_site_end(end: u64, present: bool) {
    let mut g = SITE_ENDS.write().unwrap_or_else(|e| e.into_inner());
    if present {
        g.insert(end);
    } else {
        g.remove(&end);
    }
}

/// Whether `w` is just past a registered site (see [`set_site_end`]).
fn is_site_end(w: u64) -> bool {
    SITE_ENDS
        .read()
        .unwrap_or_else(|e| e.into_inner())
        .contains(&w)
}
