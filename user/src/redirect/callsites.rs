//! Call-site retargeting for the steady state, driven by the back-end's
//! [`CallSites`] knowledge (x86_64 has it; on a back-end without it every function
//! here does nothing and reads no file).
//!
//! In the jump state a call of a patched function runs the caller's call of `func`,
//! then the site's branch to the replacement. Retargeting rewrites the calls and tail
//! jumps whose target is `func` so that they reach the replacement directly, and
//! restores them later. What a call site is, what its bytes encode, what bytes reach
//! a target and what a thread that hits a site being rewritten does are the
//! back-end's (`klp_arch::callsite`, implemented in `klp_arch_<arch>::callsite`); this
//! module reads the files and the memory, and writes.
//!
//! ## Finding the sites
//!
//! Exactly, from the relocations the link editor keeps with `-Wl,--emit-relocs` (the
//! build script passes it to klp-user's own executables): each `SHT_RELA` section
//! whose `sh_info` names an executable section lists the relocated fields of that
//! section, and the back-end says which relocations are call sites
//! ([`CallSites::classify_call`]) and how their target derives from the symbol's
//! value. In a linked file (`ET_EXEC`, `ET_DYN`) `r_offset` is the field's virtual
//! address and a section symbol's value is its section's address (checked against
//! `readelf`/`objdump` on a PIE), so the field is at `r_offset + bias`. The text is
//! never scanned. A site whose original bytes read their target from a slot (x86_64's
//! calls through a GOT entry, [`CallTarget::Slot`]) counts as calling `func` only while
//! the slot holds `func` (an interposed symbol is left alone); the bytes in memory are
//! checked again before every write.
//!
//! Only the object that contains `func` is read: a call from another object goes
//! through its PLT or GOT, never straight to `func`'s address in a relocation of its
//! own. Each object file is parsed once (per path and load bias) and its sites indexed
//! by target.
//!
//! ## Writing
//!
//! When the bytes that change lie in one aligned 8-byte word, one atomic
//! compare-and-exchange of that word replaces them (a thread sees the old or the new
//! instruction). Otherwise the breakpoint protocol (the kernel's `text_poke_bp`): the
//! back-end's trap ([`CallSites::CALL_TRAP_BYTES`], x86_64's `int3`) on the first byte,
//! a synchronisation round, the other bytes, a round, the first byte, a round
//! (batched, up to [`BATCH`] sites per batch). A thread that reaches the trap
//! meanwhile is sent on by the trap handler of [`super::sites`] as the back-end's
//! [`CallSites::call_trap`] says: a call pushes its return address and continues at
//! `func`, a jump continues at `func` — always right, because `func`'s entry leads to
//! the current implementation in every state of its site.
//!
//! Every rewritten site is remembered (site → `func`, target, original bytes): a
//! restore only touches sites klp rewrote whose bytes still encode that target, so
//! text reused by another object after a `dlclose` is never corrupted. A site whose
//! bytes are not what klp expects is left alone and forgotten; a site that cannot
//! reach the replacement (x86_64: ±2 GiB) keeps (or gets back) `func`.
//!
//! While a trap is in place, the bytes before a return address of the site do not
//! look like a call: retargeting must not overlap a transition's stack checks (it runs
//! in the steady state), and the memo of such answers is emptied after every trap
//! batch.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU8, AtomicU64, Ordering};
use std::sync::{Arc, LazyLock, Mutex};

use object::elf;
use object::read::elf::{FileHeader, Rela, SectionHeader, Sym};

use klp::arch::{Arch, InsnBytes, Native};
use klp_arch::Live;
use klp_arch::callsite::{CallSite, CallSites, CallTarget};

use super::sites;
use crate::symbols::SymbolIndex;

/// Threads that reached the trap of a call site and were sent on.
static TRAPPED: AtomicU64 = AtomicU64::new(0);
/// Call sites written with the breakpoint protocol at once (each arms a trap).
const BATCH: usize = sites::TRAP_SLOTS / 2;

/// One call site: its address, the back-end's form and its bytes in the file.
type Site = CallSite;

/// Whether the back-end retargets call sites (nothing here does anything otherwise).
fn retargets() -> bool {
    <Native as CallSites>::RETARGETS_CALLS
}

/// One object file's sites, by target.
type Sites = HashMap<u64, Vec<Site>>;

/// The parsed sites per (path, load bias).
type Files = HashMap<(String, u64), Arc<Sites>>;
static FILES: LazyLock<Mutex<Files>> = LazyLock::new(|| Mutex::new(HashMap::new()));

/// A site klp rewrote: the function it called and the target it encodes now.
#[derive(Clone, Copy, Debug)]
struct Rewritten {
    func: u64,
    to: u64,
    site: Site,
}

/// Sites klp rewrote, by address. Changed with `TEXT` held.
static REWRITTEN: LazyLock<Mutex<HashMap<u64, Rewritten>>> =
    LazyLock::new(|| Mutex::new(HashMap::new()));

/// Tests: never use the single-store path, so every write takes the breakpoint.
#[cfg(test)]
pub(crate) static FORCE_BREAKPOINT: std::sync::atomic::AtomicBool =
    std::sync::atomic::AtomicBool::new(false);

fn force_breakpoint() -> bool {
    #[cfg(test)]
    {
        FORCE_BREAKPOINT.load(Ordering::Relaxed)
    }
    #[cfg(not(test))]
    {
        false
    }
}

/// The call and jump sites of an ELF image of the back-end's machine loaded at
/// `bias`, by target.
fn parse_sites(data: &[u8], bias: u64) -> Option<Sites> {
    let header = elf::FileHeader64::<object::Endianness>::parse(data).ok()?;
    let endian = header.endian().ok()?;
    if header.e_machine(endian) != elf::Machine(<Native as Arch>::ELF_MACHINE) {
        return None;
    }
    let sections = header.sections(endian, data).ok()?;
    let mut out: Sites = HashMap::new();
    for sec in sections.iter() {
        let Ok(Some((relas, link))) = sec.rela(endian, data) else {
            continue;
        };
        let Ok(text) = sections.section(object::SectionIndex(sec.sh_info(endian) as usize)) else {
            continue;
        };
        if !text.sh_flags(endian).contains(elf::SHF_EXECINSTR)
            || text.sh_type(endian) == elf::SHT_NOBITS
        {
            continue;
        }
        let Ok(bytes) = text.data(endian, data) else {
            continue;
        };
        let base = text.sh_addr(endian);
        let Ok(symbols) = sections.symbol_table_by_index(endian, data, link) else {
            continue;
        };
        for r in relas {
            let Some(call) = <Native as CallSites>::classify_call(
                r.r_type(endian, false).0,
                r.r_addend(endian),
                r.r_offset(endian),
                bytes,
                base,
            ) else {
                continue;
            };
            let Some(si) = r.symbol(endian, false) else {
                continue;
            };
            let Ok(sym) = symbols.symbol(si) else {
                continue;
            };
            let Some(shndx) = sym.st_shndx(endian).index() else {
                continue; // undefined (through the PLT) or absolute
            };
            let s = if sym.st_type() == elf::STT_SECTION {
                match sections.section(object::SectionIndex(usize::from(shndx))) {
                    Ok(h) => h.sh_addr(endian),
                    Err(_) => continue,
                }
            } else {
                sym.st_value(endian)
            };
            out.entry(call.target_of(s).wrapping_add(bias))
                .or_default()
                .push(call.site.at(call.site.addr.wrapping_add(bias)));
        }
    }
    for v in out.values_mut() {
        v.sort_unstable_by_key(|s| s.addr);
        v.dedup_by_key(|s| s.addr);
    }
    Some(out)
}

/// The sites of the object that contains `func` (parsed once per path and bias).
fn sites_of(index: &SymbolIndex, func: u64) -> Option<Arc<Sites>> {
    if !retargets() {
        return None;
    }
    let obj = index
        .objects()
        .iter()
        .find(|o| o.text.iter().any(|&(s, e)| func >= s && func < e))?;
    let key = (obj.path.clone(), obj.bias);
    let mut files = FILES.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(s) = files.get(&key) {
        return Some(s.clone());
    }
    let sites = std::fs::read(&obj.path)
        .ok()
        .and_then(|d| parse_sites(&d, obj.bias))
        .unwrap_or_default();
    let sites = Arc::new(sites);
    files.insert(key, sites.clone());
    Some(sites)
}

fn sites_calling(index: &SymbolIndex, func: u64) -> Vec<Site> {
    sites_of(index, func)
        .and_then(|s| s.get(&func).cloned())
        .unwrap_or_default()
}

/// The call/jmp sites of `func` known from relocations (for tests and klpctl; empty
/// where the back-end retargets no call site).
pub(crate) fn callers_of(index: &SymbolIndex, func: u64) -> Vec<u64> {
    sites_calling(index, func).iter().map(|s| s.addr).collect()
}

/// The bytes at `site` now, if they are loaded text.
fn read(index: &SymbolIndex, site: &Site) -> Option<InsnBytes> {
    let len = site.len();
    let last = site.addr.checked_add(len as u64 - 1)?;
    if !index.is_text(site.addr) || !index.is_text(last) {
        return None;
    }
    let mut b = [0; klp_arch::callsite::MAX_CALL_SITE];
    for (i, d) in b.iter_mut().take(len).enumerate() {
        // SAFETY: `site.addr..=last` lies in executable (hence mapped and readable: klp
        // never maps text execute-only) segments of loaded objects; volatile, since
        // other threads may execute (not write: `TEXT` is held) these bytes.
        *d = unsafe { std::ptr::read_volatile((site.addr + i as u64) as *const u8) };
    }
    InsnBytes::from_slice(b.get(..len)?)
}

/// The target the bytes `now` at `site` encode, if they are one of its forms (the
/// word in the slot the site reads, for its original bytes of that kind).
fn target_of(site: &Site, now: &[u8]) -> Option<u64> {
    match <Native as CallSites>::call_target(site, now)? {
        CallTarget::Direct(t) => Some(t),
        CallTarget::Slot(slot) => {
            // SAFETY: the back-end gives a slot for the site's original bytes only, as
            // the file has them: `slot` is the object's own GOT entry for the symbol,
            // mapped (and no longer written) while the object is loaded, which it is
            // (its text holds `site`).
            Some(unsafe { std::ptr::read_unaligned(slot as *const u64) })
        }
    }
}

/// One planned rewrite.
#[derive(Clone, Copy, Debug)]
struct Plan {
    site: Site,
    old: InsnBytes,
    new: InsnBytes,
    /// The target after the write.
    target: u64,
}

/// Writes `p` with one atomic compare-and-exchange of the aligned word that holds
/// every byte that changes; `false` if they are not in one word (or the word is not
/// as expected). `TEXT` is held by the caller (`_text`, the witness).
fn write_single(p: &Plan, _text: &sites::TextGuard<'_>) -> bool {
    let (old, new) = (p.old.as_slice(), p.new.as_slice());
    let len = p.site.len();
    if old.len() != len || new.len() != len {
        return false;
    }
    let differ = |i: &usize| old.get(*i) != new.get(*i);
    let (Some(first), Some(last)) = ((0..len).find(differ), (0..len).rev().find(differ)) else {
        return true;
    };
    let lo = p.site.addr + first as u64;
    let word = lo & !7;
    if p.site.addr + last as u64 >= word + 8 || force_breakpoint() {
        return false;
    }
    // SAFETY: the word holds bytes of the site, which `read` found in text (1): its
    // page is text.
    let Ok(_w) = (unsafe { super::text::Writable::new(word, 8) }) else {
        return false;
    };
    // SAFETY: `word` is 8-aligned and lies in the pages made writable above (they
    // hold text bytes of the site, checked by `read`); text writes are serialised by
    // `TEXT`, so viewing the word as an atomic is sound. Threads may execute these
    // bytes: one atomic store changes them.
    let w = unsafe { &*(word as *const AtomicU64) };
    let cur = w.load(Ordering::Acquire);
    // The word's bytes in memory order.
    let mut b = cur.to_ne_bytes();
    for i in first..=last {
        let Some(d) = b.get_mut((p.site.addr + i as u64 - word) as usize) else {
            return false;
        };
        if Some(&*d) != old.get(i) {
            return false;
        }
        *d = new.get(i).copied().unwrap_or(*d);
    }
    w.compare_exchange(
        cur,
        u64::from_ne_bytes(b),
        Ordering::SeqCst,
        Ordering::SeqCst,
    )
    .is_ok()
}

/// Stores `bytes` (the trap, or the first bytes of the new ones) over the first bytes
/// of `site`: one atomic store for one byte, else the back-end's text write.
///
/// # Safety
///
/// 1. The bytes are mapped and writable (the site's `Writable` is alive) and `TEXT`
///    is held.
/// 2. A thread may execute the bytes only if it sees the store whole (one byte), or
///    none does (the bytes stored behind a trap that every thread has seen).
unsafe fn store_head(site: &Site, bytes: &[u8]) {
    match bytes {
        [b] => {
            // SAFETY: condition 1: a one-byte atomic view of writable text that `TEXT`
            // serialises is sound.
            let a = unsafe { &*(site.addr as *const AtomicU8) };
            a.store(*b, Ordering::SeqCst);
        }
        // SAFETY: conditions 1 and 2 are `write_text`'s.
        _ => unsafe { <Native as Live>::write_text(site.addr as *mut u8, bytes) },
    }
    <Native as Live>::sync_icache(site.addr as *const u8, bytes.len());
}

/// Writes `plans` (at most [`BATCH`]) with the breakpoint protocol (module
/// documentation), sending a thread that traps to `func` (a call pushes its return
/// address first, as the back-end's [`CallSites::call_trap`] says). Returns the plans
/// written. `TEXT` is held by the caller (`text`, the witness).
fn write_breakpoint(
    plans: &[Plan],
    func: u64,
    sync: &mut dyn FnMut(),
    text: &sites::TextGuard<'_>,
) -> Vec<Plan> {
    let trap = <Native as CallSites>::CALL_TRAP_BYTES;
    if plans.is_empty() || trap.is_empty() || !sites::install_trap_handler() {
        return Vec::new();
    }
    let head = trap.len();
    let mut live: Vec<(sites::ArmedTrap, Plan, super::text::Writable)> = Vec::new();
    for p in plans.iter().take(BATCH) {
        if p.new.len() != p.site.len() || head >= p.site.len() {
            continue;
        }
        let Some(entry) = <Native as CallSites>::call_trap(&p.site, func) else {
            continue;
        };
        // SAFETY: the site's bytes are text (`read` checked them) (1).
        let Ok(w) = (unsafe { super::text::Writable::new(p.site.addr, p.site.len() as u64) })
        else {
            continue;
        };
        let Some(armed) = sites::arm(entry, text) else {
            break;
        };
        live.push((armed, *p, w));
    }
    for (_, p, _) in &live {
        // SAFETY: the site's page is writable (its `Writable` is alive) and `TEXT` is
        // held (1); the trap replaces the first instruction byte(s), which a thread
        // sees whole (one byte) (2).
        unsafe { store_head(&p.site, trap) };
    }
    sync();
    for (_, p, _) in &live {
        if let Some(rest) = p.new.as_slice().get(head..) {
            // SAFETY: the bytes after the trap are mapped and writable (1); a thread
            // reaching the site stops at the trap and is sent on, and the round above
            // made every thread see the trap (a site is one instruction, so no thread
            // is inside it), so no one executes these bytes while they are written
            // (2); `TEXT` serialises text writes (3).
            unsafe { <Native as Live>::write_text((p.site.addr + head as u64) as *mut u8, rest) };
        }
    }
    sync();
    for (_, p, _) in &live {
        if let Some(first) = p.new.as_slice().get(..head) {
            // SAFETY: as for the trap (1, 2); the rest of the site holds the new bytes
            // that every thread has seen (the round above).
            unsafe { store_head(&p.site, first) };
        }
    }
    sync();
    let mut done = Vec::new();
    for (armed, p, w) in live {
        TRAPPED.fetch_add(armed.hits(), Ordering::Relaxed);
        drop(armed);
        drop(w);
        done.push(p);
    }
    // A stack check that read a site while its trap was in place may have memoised
    // that a return address there does not follow a call.
    crate::stack::forget_code();
    done
}

/// Points every call and tail jump of `func` the back-end retargets (found in the
/// `.rela.text`-style sections kept by `--emit-relocs` in the loaded objects' ELF
/// files) at `to` (`Some`) or back at `func` (`None`). Returns how many sites now
/// point where asked: 0, without reading any file, where the back-end retargets no
/// call site. Sites whose current bytes are not what klp expects are left alone (and
/// forgotten); a site that cannot reach `to` is pointed at `func`. `sync` runs a
/// synchronisation round (a full barrier plus a core-serialising event on every thread
/// that runs klp's code).
pub(crate) fn retarget_callers(
    index: &SymbolIndex,
    func: u64,
    to: Option<u64>,
    sync: &mut dyn FnMut(),
) -> usize {
    if !retargets() {
        return 0;
    }
    let want = to.unwrap_or(func);
    let text = sites::TEXT.lock().unwrap_or_else(|e| e.into_inner());
    let mut rewritten = REWRITTEN.lock().unwrap_or_else(|e| e.into_inner());
    let mut sites: BTreeMap<u64, Site> = sites_calling(index, func)
        .into_iter()
        .map(|s| (s.addr, s))
        .collect();
    for r in rewritten.values().filter(|r| r.func == func) {
        sites.entry(r.site.addr).or_insert(r.site);
    }
    let mut count = 0;
    let mut plans = Vec::new();
    for site in sites.into_values() {
        let expected = match rewritten.get(&site.addr) {
            Some(r) if r.func == func && r.site == site => r.to,
            _ => func,
        };
        let Some(old) =
            read(index, &site).filter(|b| target_of(&site, b.as_slice()) == Some(expected))
        else {
            // Not what klp left there: leave it alone.
            rewritten.remove(&site.addr);
            continue;
        };
        let encode = |to| <Native as CallSites>::encode_call(&site, func, to);
        let (target, new) = match encode(want) {
            Some(b) => (want, b),
            None => match encode(func) {
                Some(b) => (func, b),
                None => continue,
            },
        };
        if old == new {
            count += usize::from(target == want);
            continue;
        }
        plans.push(Plan {
            site,
            old,
            new,
            target,
        });
    }
    let mut done = Vec::new();
    let mut slow = Vec::new();
    for p in plans {
        if write_single(&p, &text) {
            done.push(p);
        } else {
            slow.push(p);
        }
    }
    if !done.is_empty() {
        sync();
    }
    for chunk in slow.chunks(BATCH) {
        done.extend(write_breakpoint(chunk, func, sync, &text));
    }
    for p in done {
        if p.target == func {
            rewritten.remove(&p.site.addr);
        } else {
            rewritten.insert(
                p.site.addr,
                Rewritten {
                    func,
                    to: p.target,
                    site: p.site,
                },
            );
        }
        count += usize::from(p.target == want);
    }
    count
}

/// The sites of `func` that klp points at a replacement now, in address order (empty
/// where the back-end retargets no call site).
pub(crate) fn retargeted(func: u64) -> Vec<u64> {
    if !retargets() {
        return Vec::new();
    }
    let map = REWRITTEN.lock().unwrap_or_else(|e| e.into_inner());
    let mut v: Vec<u64> = map
        .iter()
        .filter(|(_, r)| r.func == func)
        .map(|(a, _)| *a)
        .collect();
    v.sort_unstable();
    v
}

/// How many threads the trap of a call site sent on so far.
#[cfg(test)]
pub(crate) fn trapped() -> u64 {
    TRAPPED.load(Ordering::Relaxed)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicBool;
    use std::time::Duration;

    crate::patchable! {
        /// The function whose call sites the tests retarget.
        fn klp_cs_probe(x: u64) -> u64 {
            x.wrapping_mul(3)
        }
    }

    #[inline(never)]
    extern "C" fn klp_cs_repl(x: u64) -> u64 {
        std::hint::black_box(x).wrapping_mul(5)
    }

    #[inline(never)]
    extern "C" fn klp_cs_other(x: u64) -> u64 {
        std::hint::black_box(x).wrapping_mul(7)
    }

    /// A call from Rust: through the GOT (`ff 15`), `klp_cs_probe` being exported.
    #[inline(never)]
    fn call_probe(x: u64) -> u64 {
        klp_cs_probe(std::hint::black_box(x))
    }

    type Caller = fn(u64) -> u64;

    /// The hand-written x86_64 call sites: assembly, compiled where the back-end is
    /// x86_64's only (the tests themselves run wherever the back-end retargets call
    /// sites).
    #[cfg(klp_arch = "x86_64")]
    mod x86_64 {
        use super::{Caller, klp_cs_probe};
        use klp_arch_x86_64::callsite::{ADDR32, form};
        use klp_arch_x86_64::insn::CALL_REL32;

        /// A direct `call` (`e8`).
        #[unsafe(naked)]
        pub(super) extern "C" fn call_direct(x: u64) -> u64 {
            core::arch::naked_asm!("push rax", "call {f}", "pop rcx", "ret", f = sym klp_cs_probe)
        }

        /// A direct tail `jmp` (`e9`).
        #[unsafe(naked)]
        extern "C" fn jmp_direct(x: u64) -> u64 {
            core::arch::naked_asm!("jmp {f}", f = sym klp_cs_probe)
        }

        /// A tail jump through the GOT (`ff 25`).
        #[unsafe(naked)]
        extern "C" fn jmp_got(x: u64) -> u64 {
            core::arch::naked_asm!("jmp qword ptr [rip + {f}@GOTPCREL]", f = sym klp_cs_probe)
        }

        /// The callers after `call_probe`, with their entries.
        pub(super) fn callers() -> [(Caller, u64); 3] {
            [
                (|x| call_direct(x), call_direct as *const () as u64),
                (|x| jmp_direct(x), jmp_direct as *const () as u64),
                (|x| jmp_got(x), jmp_got as *const () as u64),
            ]
        }

        /// The forms of `call_probe` (through the GOT: `ff 15`, `klp_cs_probe` being
        /// exported) and [`callers`].
        pub(super) const FORMS: [u8; 4] = [form::GOT_CALL, form::CALL, form::JMP, form::GOT_JMP];

        /// The first bytes of a retargeted GOT call: `addr32 call`.
        pub(super) const GOT_CALL_RETARGETED: [u8; 2] = [ADDR32, CALL_REL32];
    }

    /// Every caller, with its entry: a call from Rust, and on x86_64 the hand-written
    /// forms.
    fn callers() -> Vec<(Caller, u64)> {
        #[allow(unused_mut)]
        let mut v: Vec<(Caller, u64)> = vec![(call_probe, call_probe as *const () as u64)];
        #[cfg(klp_arch = "x86_64")]
        v.extend(x86_64::callers());
        v
    }

    /// A caller whose site `unexpected_bytes_are_left_alone` rewrites by hand (x86_64:
    /// the direct `call`).
    fn by_hand_caller() -> (Caller, u64) {
        #[cfg(klp_arch = "x86_64")]
        return (
            |x| x86_64::call_direct(x),
            x86_64::call_direct as *const () as u64,
        );
        #[allow(unreachable_code)]
        (call_probe, call_probe as *const () as u64)
    }

    /// Whether the tests run: on a back-end that retargets no call site there is none
    /// to test (every function of the module returns early, tested in
    /// `nothing_without_a_back_end_that_retargets`).
    fn skip() -> bool {
        !retargets()
    }

    /// Calls the probe through a pointer (not a call site).
    fn probe_indirect(x: u64) -> u64 {
        let f: extern "C" fn(u64) -> u64 = std::hint::black_box(klp_cs_probe);
        f(x)
    }

    /// Serialises the tests (they retarget the same sites).
    static SERIAL: Mutex<()> = Mutex::new(());

    fn probe() -> u64 {
        klp_cs_probe as *const () as u64
    }
    fn repl() -> u64 {
        klp_cs_repl as *const () as u64
    }
    fn sync() {
        crate::stack::sync_round(Duration::from_millis(500));
    }

    /// The site in the function at `f`.
    fn site_in(index: &SymbolIndex, f: u64) -> Site {
        let size = index.size_of(f).expect("indexed");
        let all = sites_calling(index, probe());
        let mine: Vec<_> = all
            .iter()
            .copied()
            .filter(|s| s.addr >= f && s.addr < f + size)
            .collect();
        assert_eq!(mine.len(), 1, "{all:x?} in {f:#x}+{size:#x}");
        mine[0]
    }

    fn now(index: &SymbolIndex, s: &Site) -> Option<u64> {
        read(index, s).and_then(|b| target_of(s, b.as_slice()))
    }

    #[test]
    fn nothing_without_a_back_end_that_retargets() {
        if !skip() {
            return; // the other tests cover this back-end
        }
        let index = SymbolIndex::load();
        assert_eq!(
            retarget_callers(&index, probe(), Some(repl()), &mut sync),
            0
        );
        assert!(callers_of(&index, probe()).is_empty());
        assert!(retargeted(probe()).is_empty());
        assert!(
            FILES.lock().unwrap_or_else(|e| e.into_inner()).is_empty(),
            "no file read"
        );
    }

    #[test]
    fn relocations_give_the_call_sites() {
        if skip() {
            return;
        }
        let _s = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
        let index = SymbolIndex::load();
        let forms: Vec<u8> = callers()
            .iter()
            .map(|&(_, f)| site_in(&index, f).form)
            .collect();
        #[cfg(klp_arch = "x86_64")]
        assert_eq!(forms, x86_64::FORMS, "the forms of the callers");
        assert_eq!(forms.len(), callers().len());
        for &(_, f) in &callers() {
            assert_eq!(now(&index, &site_in(&index, f)), Some(probe()));
        }
        assert_eq!(
            callers_of(&index, probe()).len(),
            sites_calling(&index, probe()).len()
        );
        // Relocations against section symbols (local functions) resolve too: every
        // listed site decodes to its target in memory, and there are many.
        let sites = sites_of(&index, probe()).expect("parsed");
        let (mut n, mut ok, mut bad) = (0, 0, Vec::new());
        for (&t, v) in sites.iter() {
            for s in v {
                n += 1;
                if now(&index, s) == Some(t) {
                    ok += 1;
                } else if bad.len() < 5 {
                    bad.push((index.describe(s.addr), s.form, index.describe(t)));
                }
            }
        }
        assert!(
            n > 1000 && ok == n,
            "{ok} of {n} sites decode to their target: {bad:?}"
        );
    }

    #[test]
    fn retarget_and_restore() {
        if skip() {
            return;
        }
        let _s = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
        let index = SymbolIndex::load();
        let sites: Vec<Site> = callers().iter().map(|&(_, f)| site_in(&index, f)).collect();
        let before: Vec<_> = sites.iter().map(|s| read(&index, s)).collect();
        for (c, _) in callers() {
            assert_eq!(c(2), 6);
        }
        for force in [false, true] {
            FORCE_BREAKPOINT.store(force, Ordering::Relaxed);
            let n = retarget_callers(&index, probe(), Some(repl()), &mut sync);
            assert!(n >= sites.len(), "{n}");
            for (c, _) in callers() {
                assert_eq!(c(2), 10, "the call runs the replacement");
            }
            for s in &sites {
                assert_eq!(now(&index, s), Some(repl()), "{s:x?}");
            }
            #[cfg(klp_arch = "x86_64")]
            {
                let got_call = read(&index, &sites[0]).expect("text");
                assert_eq!(got_call.as_slice()[..2], x86_64::GOT_CALL_RETARGETED);
            }
            assert_eq!(probe_indirect(2), 6, "the function itself is untouched");
            assert_eq!(
                retarget_callers(&index, probe(), Some(repl()), &mut sync),
                n,
                "already there"
            );
            assert_eq!(retarget_callers(&index, probe(), None, &mut sync), n);
            let after: Vec<_> = sites.iter().map(|s| read(&index, s)).collect();
            assert_eq!(after, before, "restored exactly");
            for (c, _) in callers() {
                assert_eq!(c(2), 6);
            }
        }
        FORCE_BREAKPOINT.store(false, Ordering::Relaxed);
    }

    #[test]
    fn unexpected_bytes_are_left_alone() {
        if skip() {
            return;
        }
        let _s = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
        let index = SymbolIndex::load();
        let (caller, entry) = by_hand_caller();
        let site = site_in(&index, entry);
        retarget_callers(&index, probe(), Some(repl()), &mut sync);
        // Someone else points the site elsewhere: klp forgets it and neither a restore
        // nor a retarget touches it.
        let other = klp_cs_other as *const () as u64;
        let by_hand = |from: u64, to: u64| {
            let text = sites::TEXT.lock().unwrap_or_else(|e| e.into_inner());
            let p = Plan {
                site,
                old: <Native as CallSites>::encode_call(&site, probe(), from).expect("reach"),
                new: <Native as CallSites>::encode_call(&site, probe(), to).expect("reach"),
                target: to,
            };
            assert!(
                write_single(&p, &text)
                    || write_breakpoint(&[p], probe(), &mut sync, &text).len() == 1
            );
        };
        by_hand(repl(), other);
        assert_eq!(caller(2), 14);
        retarget_callers(&index, probe(), None, &mut sync);
        assert_eq!(now(&index, &site), Some(other), "left alone");
        retarget_callers(&index, probe(), Some(repl()), &mut sync);
        assert_eq!(now(&index, &site), Some(other), "left alone");
        assert!(
            !REWRITTEN
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .contains_key(&site.addr)
        );
        by_hand(other, probe());
        assert_eq!(caller(2), 6);
        retarget_callers(&index, probe(), None, &mut sync);
        assert_eq!(call_probe(2), 6);
    }

    #[test]
    // ThreadSanitizer defers klp's signal until the thread reaches one of its own safe
    // points, which the workers' loop through the uninstrumented call stubs may not do
    // for a long time: each synchronisation round then waits for its timeout, and the
    // 200 rounds take many minutes (ci/test's TSan run).
    #[cfg_attr(
        klp_tsan,
        ignore = "ThreadSanitizer defers signals: synchronisation rounds time out"
    )]
    fn retarget_under_concurrent_calls() {
        if skip() {
            return;
        }
        let _s = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
        let index = SymbolIndex::load();
        let sites: Vec<Site> = callers().iter().map(|&(_, f)| site_in(&index, f)).collect();
        let before: Vec<_> = sites.iter().map(|s| read(&index, s)).collect();
        let stop = Arc::new(AtomicBool::new(false));
        let seen = Arc::new([AtomicU64::new(0), AtomicU64::new(0)]);
        let workers: Vec<_> = (0..3)
            .map(|_| {
                let (stop, seen) = (stop.clone(), seen.clone());
                std::thread::spawn(move || {
                    let mut x = 1u64;
                    while !stop.load(Ordering::Relaxed) {
                        for (c, _) in callers() {
                            let r = c(x);
                            if r == x.wrapping_mul(3) {
                                seen[0].fetch_add(1, Ordering::Relaxed);
                            } else if r == x.wrapping_mul(5) {
                                seen[1].fetch_add(1, Ordering::Relaxed);
                            } else {
                                panic!("{x} -> {r}");
                            }
                        }
                        x = x.wrapping_add(1);
                    }
                })
            })
            .collect();
        let traps = trapped();
        for i in 0..200 {
            // Every other pair of rounds takes the breakpoint.
            FORCE_BREAKPOINT.store(i % 4 >= 2, Ordering::Relaxed);
            let to = (i % 2 == 0).then(repl);
            assert!(retarget_callers(&index, probe(), to, &mut sync) >= sites.len());
        }
        FORCE_BREAKPOINT.store(false, Ordering::Relaxed);
        stop.store(true, Ordering::Relaxed);
        for w in workers {
            w.join().expect("worker");
        }
        let after: Vec<_> = sites.iter().map(|s| read(&index, s)).collect();
        assert_eq!(after, before, "restored exactly");
        let (old, new) = (
            seen[0].load(Ordering::Relaxed),
            seen[1].load(Ordering::Relaxed),
        );
        let emulated = trapped() - traps;
        eprintln!("calls: {old} old, {new} new; {emulated} emulated at a breakpoint");
        assert!(old > 0 && new > 0, "{old} {new}");
        assert!(emulated > 0, "the breakpoint was never hit");
    }
}
