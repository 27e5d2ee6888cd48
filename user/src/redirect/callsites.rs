//! x86_64: call-site retargeting for the steady state.
//!
//! In the jump state a call of a patched function runs the caller's call of `func`,
//! then the site's `jmp replacement`. Retargeting rewrites the calls and tail jumps
//! whose target is `func` so that they reach the replacement directly, and restores
//! them later.
//!
//! ## Finding the sites
//!
//! Exactly, from the relocations the link editor keeps with `-Wl,--emit-relocs` (the
//! build script passes it to klp-user's own executables): each `SHT_RELA` section
//! whose `sh_info` names an executable section lists the relocated fields of that
//! section. In a linked file (`ET_EXEC`, `ET_DYN`) `r_offset` is the field's virtual
//! address and a section symbol's value is its section's address (checked against
//! `readelf`/`objdump` on a PIE), so the field is at `r_offset + bias`. The text is
//! never scanned. Two families of sites:
//!
//! | relocation | bytes in the file | site | retargeted |
//! |---|---|---|---|
//! | `R_X86_64_PLT32`, `R_X86_64_PC32` | `e8 rel32` (`call`), `e9 rel32` (`jmp`) | `r_offset - 1`, target `S + A + 4` | the `rel32` only |
//! | `R_X86_64_GOTPCREL`, `R_X86_64_GOTPCRELX` | `ff 15 disp32` (`call *GOT(%rip)`), `ff 25 disp32` (`jmp *GOT(%rip)`), `A = -4` | `r_offset - 2`, target `S` | `67 e8 rel32` (`addr32 call`), `e9 rel32 90` |
//!
//! The second family is how Rust code calls a `#[no_mangle]` function (every
//! [`patchable!`](crate::patchable) function) in a position-independent executable:
//! through its GOT entry. It is rewritten the way the link editor relaxes such a call
//! (same length, and the same return address `site + 6`, so a thread that is inside
//! the callee returns to the next instruction whichever form it finds there). A GOT
//! site counts as calling `func` only while its GOT entry holds `func` (an
//! interposed symbol is left alone). The byte before any other PC-relative field is a
//! ModRM byte with `mod = 00`, so the opcode bytes in the file pick the sites exactly;
//! the bytes in memory are checked again before every write.
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
//! instruction). Otherwise the kernel's `text_poke_bp`: `int3` on the first byte, a
//! synchronisation round, the other bytes, a round, the first byte, a round (batched,
//! up to [`BATCH`] sites per batch). A thread that reaches the
//! breakpoint meanwhile is emulated by the trap handler of [`super::sites`]:
//! a call pushes its return address and continues at `func`, a jump continues at
//! `func` — always right, because `func`'s entry leads to the current implementation
//! in every state of its site.
//!
//! Every rewritten site is remembered (site → `func`, target, original bytes): a
//! restore only touches sites klp rewrote whose bytes still encode that target, so
//! text reused by another object after a `dlclose` is never corrupted. A site whose
//! bytes are not what klp expects is left alone and forgotten; a site that cannot
//! reach the replacement (±2 GiB) keeps (or gets back) `func`.
//!
//! While a breakpoint is in place, the bytes before a return address of the site do
//! not look like a call: retargeting must not overlap a transition's stack checks (it
//! runs in the steady state), and the memo of such answers is emptied after every
//! breakpoint batch.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU8, AtomicU64, Ordering};
use std::sync::{Arc, LazyLock, Mutex};

use object::elf;
use object::read::elf::{FileHeader, Rela, SectionHeader, Sym};

use klp_arch::patching::TrapEntry;

use super::sites;
use crate::symbols::SymbolIndex;

const CALL: u8 = 0xe8;
const JMP: u8 = 0xe9;
const INT3: u8 = klp_arch_x86_64::patching::INT3;
/// Threads that reached the breakpoint of a call site and were emulated.
static TRAPPED: AtomicU64 = AtomicU64::new(0);
/// Call sites written with the breakpoint protocol at once (each arms a trap).
const BATCH: usize = sites::TRAP_SLOTS / 2;
const NOP: u8 = 0x90;
const ADDR32: u8 = 0x67;
/// The longest site (`ff 15 disp32`).
const MAX_LEN: usize = 6;

/// What a site is in the file (see the module documentation).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Form {
    /// `e8 rel32`.
    Call,
    /// `e9 rel32`.
    Jmp,
    /// `ff 15 disp32`, retargeted as `67 e8 rel32`.
    GotCall,
    /// `ff 25 disp32`, retargeted as `e9 rel32 90`.
    GotJmp,
}

impl Form {
    fn len(self) -> usize {
        match self {
            Form::Call | Form::Jmp => 5,
            Form::GotCall | Form::GotJmp => 6,
        }
    }

    /// The trap handler's kind: the length of a call, 0 for a jump.
    fn trap_kind(self) -> u8 {
        match self {
            Form::Call => 5,
            Form::GotCall => 6,
            Form::Jmp | Form::GotJmp => 0,
        }
    }
}

/// One call site: its address, form and bytes in the file.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Site {
    addr: u64,
    form: Form,
    orig: [u8; MAX_LEN],
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

/// The call and jump sites of an ELF image loaded at `bias`, by target.
fn parse_sites(data: &[u8], bias: u64) -> Option<Sites> {
    let header = elf::FileHeader64::<object::Endianness>::parse(data).ok()?;
    let endian = header.endian().ok()?;
    if header.e_machine(endian) != elf::EM_X86_64 {
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
            let ty = r.r_type(endian, false);
            let addend = r.r_addend(endian);
            let (back, got) = match ty {
                elf::R_X86_64_PLT32 | elf::R_X86_64_PC32 => (1, false),
                elf::R_X86_64_GOTPCREL | elf::R_X86_64_GOTPCRELX if addend == -4 => (2, true),
                _ => continue,
            };
            let Some(at) = r.r_offset(endian).checked_sub(back) else {
                continue;
            };
            let Some(code) = at
                .checked_sub(base)
                .and_then(|o| usize::try_from(o).ok())
                .and_then(|o| bytes.get(o..))
            else {
                continue;
            };
            let form = match (got, code) {
                (false, [CALL, ..]) => Form::Call,
                (false, [JMP, ..]) => Form::Jmp,
                (true, [0xff, 0x15, ..]) => Form::GotCall,
                (true, [0xff, 0x25, ..]) => Form::GotJmp,
                _ => continue,
            };
            let mut orig = [0; MAX_LEN];
            let (Some(o), Some(b)) = (orig.get_mut(..form.len()), code.get(..form.len())) else {
                continue;
            };
            o.copy_from_slice(b);
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
            let target = if got {
                s
            } else {
                s.wrapping_add(addend as u64).wrapping_add(4)
            };
            out.entry(target.wrapping_add(bias))
                .or_default()
                .push(Site {
                    addr: at.wrapping_add(bias),
                    form,
                    orig,
                });
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

/// The call/jmp sites of `func` known from relocations (for tests and klpctl).
pub(crate) fn callers_of(index: &SymbolIndex, func: u64) -> Vec<u64> {
    sites_calling(index, func).iter().map(|s| s.addr).collect()
}

/// The `rel32` at `b[at..at + 4]`, relative to `next`.
fn rel32(b: &[u8; MAX_LEN], at: usize, next: u64) -> Option<u64> {
    let r: [u8; 4] = b.get(at..at + 4)?.try_into().ok()?;
    Some(next.wrapping_add(i64::from(i32::from_le_bytes(r)) as u64))
}

/// The bytes at `site` now, if they are loaded text.
fn read(index: &SymbolIndex, site: &Site) -> Option<[u8; MAX_LEN]> {
    let len = site.form.len();
    let last = site.addr.checked_add(len as u64 - 1)?;
    if !index.is_text(site.addr) || !index.is_text(last) {
        return None;
    }
    let mut b = [0; MAX_LEN];
    for (i, d) in b.iter_mut().take(len).enumerate() {
        // SAFETY: `site.addr..=last` lies in executable (hence mapped and readable: klp
        // never maps text execute-only) segments of loaded objects; volatile, since
        // other threads may execute (not write: `TEXT` is held) these bytes.
        *d = unsafe { std::ptr::read_volatile((site.addr + i as u64) as *const u8) };
    }
    Some(b)
}

/// The target the bytes `b` at `site` encode, if they are one of its forms.
fn target_of(site: &Site, b: &[u8; MAX_LEN]) -> Option<u64> {
    let a = site.addr;
    match site.form {
        Form::Call | Form::Jmp => (b.first() == site.orig.first()).then(|| rel32(b, 1, a + 5))?,
        Form::GotCall | Form::GotJmp if *b == site.orig => {
            let slot = rel32(b, 2, a + 6)?;
            // SAFETY: the bytes are the file's, so `slot` is the object's own GOT entry
            // for the symbol, mapped (and no longer written) while the object is
            // loaded, which it is (its text holds `site`).
            Some(unsafe { std::ptr::read_unaligned(slot as *const u64) })
        }
        Form::GotCall => matches!(b, [ADDR32, CALL, ..]).then(|| rel32(b, 2, a + 6))?,
        Form::GotJmp => matches!(b, [JMP, _, _, _, _, NOP]).then(|| rel32(b, 1, a + 5))?,
    }
}

/// The bytes of `site` reaching `to` (`func`: the original form), if in range.
fn encode(site: &Site, func: u64, to: u64) -> Option<[u8; MAX_LEN]> {
    let a = site.addr;
    let (at, insn, extra) = match site.form {
        Form::GotCall | Form::GotJmp if to == func => return Some(site.orig),
        Form::Call => (0, klp_arch_x86_64::insn::call(a, to).ok()?, None),
        Form::Jmp => (0, klp_arch_x86_64::insn::jmp(a, to).ok()?, None),
        Form::GotCall => (
            1,
            klp_arch_x86_64::insn::call(a + 1, to).ok()?,
            Some((0, ADDR32)),
        ),
        Form::GotJmp => (0, klp_arch_x86_64::insn::jmp(a, to).ok()?, Some((5, NOP))),
    };
    let mut b = site.orig;
    b.get_mut(at..at + insn.len())?.copy_from_slice(&insn);
    if let Some((i, v)) = extra {
        *b.get_mut(i)? = v;
    }
    Some(b)
}

/// One planned rewrite.
#[derive(Clone, Copy, Debug)]
struct Plan {
    site: Site,
    old: [u8; MAX_LEN],
    new: [u8; MAX_LEN],
    /// The target after the write.
    target: u64,
}

/// Writes `p` with one atomic compare-and-exchange of the aligned word that holds
/// every byte that changes; `false` if they are not in one word (or the word is not
/// as expected). `TEXT` is held by the caller (`_text`, the witness).
fn write_single(p: &Plan, _text: &sites::TextGuard<'_>) -> bool {
    let len = p.site.form.len();
    let differ = |i: &usize| p.old.get(*i) != p.new.get(*i);
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
    let mut b = cur.to_le_bytes();
    for i in first..=last {
        let Some(d) = b.get_mut((p.site.addr + i as u64 - word) as usize) else {
            return false;
        };
        if Some(&*d) != p.old.get(i) {
            return false;
        }
        *d = p.new.get(i).copied().unwrap_or(*d);
    }
    w.compare_exchange(
        cur,
        u64::from_le_bytes(b),
        Ordering::SeqCst,
        Ordering::SeqCst,
    )
    .is_ok()
}

/// Writes `plans` (at most [`BATCH`]) with the breakpoint protocol (module
/// documentation), sending a thread that traps to `func` (a call pushes its return
/// address first). Returns the plans written. `TEXT` is held by the caller (`text`, the
/// witness).
fn write_breakpoint(
    plans: &[Plan],
    func: u64,
    sync: &mut dyn FnMut(),
    text: &sites::TextGuard<'_>,
) -> Vec<Plan> {
    if plans.is_empty() || !sites::install_trap_handler() {
        return Vec::new();
    }
    let mut live: Vec<(sites::ArmedTrap, Plan, super::text::Writable)> = Vec::new();
    for p in plans.iter().take(BATCH) {
        // SAFETY: the site's bytes are text (`read` checked them) (1).
        let Ok(w) = (unsafe { super::text::Writable::new(p.site.addr, p.site.form.len() as u64) })
        else {
            continue;
        };
        let kind = p.site.form.trap_kind();
        let Some(armed) = sites::arm(
            TrapEntry {
                at: p.site.addr,
                pc: func,
                link: None,
                push: (kind != 0).then(|| p.site.addr + u64::from(kind)),
            },
            text,
        ) else {
            break;
        };
        live.push((armed, *p, w));
    }
    let first_byte = |p: &Plan| {
        // SAFETY: the site's page is writable (its `Writable` is alive); a one-byte
        // atomic view of text that `TEXT` serialises is sound.
        unsafe { &*(p.site.addr as *const AtomicU8) }
    };
    for (_, p, _) in &live {
        first_byte(p).store(INT3, Ordering::SeqCst);
    }
    sync();
    for (_, p, _) in &live {
        if let Some(rest) = p.new.get(1..p.site.form.len()) {
            // SAFETY: the bytes after the first are mapped and writable (1); a thread
            // reaching the site stops at the breakpoint and is emulated, and the round
            // above made every thread see the breakpoint (a site is one instruction,
            // so no thread is inside it), so no one executes these bytes while they
            // are written (2); `TEXT` serialises text writes (3).
            unsafe { klp_arch_x86_64::live::write_text((p.site.addr + 1) as *mut u8, rest) };
        }
    }
    sync();
    for (_, p, _) in &live {
        first_byte(p).store(p.new[0], Ordering::SeqCst);
        klp_arch_x86_64::live::sync_icache(p.site.addr as *const u8, 1);
    }
    sync();
    let mut done = Vec::new();
    for (armed, p, w) in live {
        TRAPPED.fetch_add(armed.hits(), Ordering::Relaxed);
        drop(armed);
        drop(w);
        done.push(p);
    }
    // A stack check that read a site while its breakpoint was in place may have
    // memoised that a return address there does not follow a call.
    crate::stack::forget_code();
    done
}

/// Points every direct call/jmp of `func` (found in the `.rela.text`-style sections
/// kept by `--emit-relocs` in the loaded objects' ELF files) at `to` (`Some`) or back
/// at `func` (`None`). Returns how many sites now point where asked. Sites whose
/// current bytes are not what klp expects are left alone (and forgotten); a site that
/// cannot reach `to` is pointed at `func`. `sync` runs a synchronisation round (a full
/// barrier plus a core-serialising event on every thread that runs klp's code).
pub(crate) fn retarget_callers(
    index: &SymbolIndex,
    func: u64,
    to: Option<u64>,
    sync: &mut dyn FnMut(),
) -> usize {
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
        let Some(old) = read(index, &site).filter(|b| target_of(&site, b) == Some(expected)) else {
            // Not what klp left there: leave it alone.
            rewritten.remove(&site.addr);
            continue;
        };
        let (target, new) = match encode(&site, func, want) {
            Some(b) => (want, b),
            None => match encode(&site, func, func) {
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

/// The sites of `func` that klp points at a replacement now, in address order.
pub(crate) fn retargeted(func: u64) -> Vec<u64> {
    let map = REWRITTEN.lock().unwrap_or_else(|e| e.into_inner());
    let mut v: Vec<u64> = map
        .iter()
        .filter(|(_, r)| r.func == func)
        .map(|(a, _)| *a)
        .collect();
    v.sort_unstable();
    v
}

/// How many threads the breakpoint of a call site sent on so far.
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

    /// A direct `call` (`e8`).
    #[unsafe(naked)]
    extern "C" fn call_direct(x: u64) -> u64 {
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

    type Caller = fn(u64) -> u64;

    /// Every caller, with its entry.
    fn callers() -> [(Caller, u64); 4] {
        [
            (call_probe, call_probe as *const () as u64),
            (|x| call_direct(x), call_direct as *const () as u64),
            (|x| jmp_direct(x), jmp_direct as *const () as u64),
            (|x| jmp_got(x), jmp_got as *const () as u64),
        ]
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
        read(index, s).and_then(|b| target_of(s, &b))
    }

    #[test]
    fn relocations_give_the_call_sites() {
        let _s = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
        let index = SymbolIndex::load();
        let forms: Vec<Form> = callers()
            .iter()
            .map(|&(_, f)| site_in(&index, f).form)
            .collect();
        assert_eq!(
            forms,
            [Form::GotCall, Form::Call, Form::Jmp, Form::GotJmp],
            "the forms of the callers"
        );
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
            let got_call = read(&index, &sites[0]).expect("text");
            assert_eq!(got_call[..2], [ADDR32, CALL]);
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
        let _s = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
        let index = SymbolIndex::load();
        let site = site_in(&index, call_direct as *const () as u64);
        retarget_callers(&index, probe(), Some(repl()), &mut sync);
        // Someone else points the site elsewhere: klp forgets it and neither a restore
        // nor a retarget touches it.
        let other = klp_cs_other as *const () as u64;
        let by_hand = |from: u64, to: u64| {
            let text = sites::TEXT.lock().unwrap_or_else(|e| e.into_inner());
            let p = Plan {
                site,
                old: encode(&site, probe(), from).expect("reach"),
                new: encode(&site, probe(), to).expect("reach"),
                target: to,
            };
            assert!(
                write_single(&p, &text)
                    || write_breakpoint(&[p], probe(), &mut sync, &text).len() == 1
            );
        };
        by_hand(repl(), other);
        assert_eq!(call_direct(2), 14);
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
        assert_eq!(call_direct(2), 6);
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
