//! ppc64le sites of this process on the real machine: the `patchable!` wrapper's
//! global and local entries, the back-end's plans run by the host (the words every
//! synchronisation round sees), a `-mprofile-kernel` site, and replacements with
//! another TOC. The plans themselves are tested on every host in `klp-arch-ppc64le`.
#![cfg(klp_arch = "ppc64le")]

use std::cell::RefCell;
use std::sync::atomic::{AtomicU64, Ordering};

use klp::Errno;
use klp::arch::SiteForm;
use klp_arch_ppc64le::patching::OTHER_TOC;
use klp_arch_ppc64le::{insn, site as psite};
use klp_user::redirect::testing::{SiteState, body_of, find, published_target, set};
use klp_user::symbols::SymbolIndex;

static SEEN: AtomicU64 = AtomicU64::new(0);

klp_user::patchable! {
    /// Reads a static (through the TOC), so a wrong r2 shows.
    pub fn klp_ppc64le_sites_probe(x: u64) -> u64 {
        SEEN.fetch_add(1, Ordering::Relaxed);
        x + 1
    }
}

klp_user::patchable! {
    /// Taken through every state.
    pub fn klp_ppc64le_sites_walk(x: u64) -> u64 {
        std::hint::black_box(x) + 1
    }
}

extern "C" fn walk_v2(x: u64) -> u64 {
    std::hint::black_box(x) + 101
}

extern "C" fn walk_v3(x: u64) -> u64 {
    std::hint::black_box(x) + 1001
}

fn addr(f: *const ()) -> u64 {
    f as u64
}

fn site_words(f: u64) -> [u32; 2] {
    // SAFETY: `f` is a function of this program with a site at +8: mapped text.
    unsafe {
        [
            u32::from_le(((f + 8) as *const u32).read_volatile()),
            u32::from_le(((f + 12) as *const u32).read_volatile()),
        ]
    }
}

/// Calls `f` at its global entry the way a caller in another object does: r12 = `f`,
/// r2 = that caller's TOC (here a junk value), restoring its own r2 afterwards.
#[unsafe(naked)]
extern "C" fn call_from_other_toc(_f: u64, _x: u64) -> u64 {
    core::arch::naked_asm!(
        "mflr 0",
        "std 0, 16(1)",
        "stdu 1, -32(1)",
        "std 2, 24(1)",
        "mtctr 3",
        "mr 12, 3",
        "mr 3, 4",
        "li 2, 0x1230",
        "bctrl",
        "ld 2, 24(1)",
        "addi 1, 1, 32",
        "ld 0, 16(1)",
        "mtlr 0",
        "blr",
    )
}

#[test]
fn the_wrapper_has_a_global_entry_a_site_and_a_branch_to_the_body() {
    let index = SymbolIndex::load();
    let f = addr(klp_ppc64le_sites_probe as *const ());
    let (_, sym) = index.lookup(f).expect("indexed");
    assert_eq!(sym.st_other >> 5, 3, ".localentry at +8");
    // SAFETY: the wrapper's first words are mapped text.
    let w = unsafe { [(f as *const u32).read(), ((f + 4) as *const u32).read()] };
    assert_eq!(w[0] & 0xffff_0000, insn::ADDIS_R2_R12);
    assert_eq!(w[1] & 0xffff_0000, insn::ADDI_R2_R2);
    assert_eq!(site_words(f), [insn::NOP, insn::NOP]);
    let site = find(&index, f).expect("a site");
    assert_eq!(
        (site.addr(), site.form),
        (f + 8, SiteForm::new(psite::form::NOPS))
    );
    let (start, end) = body_of(&index, &site).expect("the body");
    assert_eq!(start, addr(klp_ppc64le_sites_probe::body as *const ()));
    assert!(end > start);
    assert!(find(&index, f + 8).is_none(), "not a symbol start");
}

#[test]
fn both_entries_reach_the_body_with_this_objects_toc() {
    let before = SEEN.load(Ordering::Relaxed);
    assert_eq!(klp_ppc64le_sites_probe(1), 2, "a local call");
    let f = addr(klp_ppc64le_sites_probe as *const ());
    assert_eq!(call_from_other_toc(f, 41), 42, "global entry, foreign r2");
    assert!(SEEN.load(Ordering::Relaxed) >= before + 2);
}

#[test]
fn targets_in_another_object_are_tagged() {
    let index = SymbolIndex::load();
    let site = addr(klp_ppc64le_sites_walk as *const ()) + 8;
    let v2 = addr(walk_v2 as *const ());
    assert_eq!(published_target(&index, site, v2), v2);
    let getpid = libc::getpid as *const () as u64;
    assert_eq!(
        published_target(&index, site, getpid),
        getpid | OTHER_TOC,
        "libc has its own TOC"
    );
    assert_eq!(published_target(&index, site, 0), OTHER_TOC);
}

/// Original → trampoline → jump → another jump → trampoline → original, and the
/// shortcuts: the words every synchronisation round sees (the order of the stores),
/// and the function's result in every state (no view is published for this site: the
/// trampoline runs the original).
#[test]
fn every_state_and_transition() {
    use SiteState::{Jump, Original, Trampoline};
    std::thread::spawn(|| {
        klp_user::thread::register_current();
        let index = SymbolIndex::load();
        let f = addr(klp_ppc64le_sites_walk as *const ());
        let site = find(&index, f).expect("a site");
        let (v2, v3) = (addr(walk_v2 as *const ()), addr(walk_v3 as *const ()));
        let seen = RefCell::new(Vec::new());
        let mut sync = || seen.borrow_mut().push(site_words(f));
        let b = |t: u64| {
            let (_, sym) = index.lookup(t).expect("indexed");
            let local = t + psite::local_entry_offset(sym.st_other).expect("offset");
            insn::b(f + 8, local).expect("in reach")
        };
        let (nop, mflr) = (insn::NOP, insn::MFLR_R0);
        // The first write makes the site's stub (one round of its own).
        set(&index, &site, Trampoline, &mut sync).expect("set");
        let bl = site_words(f)[1];
        assert!(bl >> 26 == 18 && bl & 3 == 1, "bl: {bl:#x}");
        assert_eq!(*seen.borrow(), [[nop, nop], [mflr, nop], [mflr, bl]]);
        type Step = (SiteState, Vec<[u32; 2]>, u64);
        let steps: [Step; 7] = [
            (Jump(v2), vec![[b(v2), bl]], 102),
            (Jump(v3), vec![[b(v3), bl]], 1002),
            (Trampoline, vec![[mflr, bl]], 2),
            (Original, vec![[mflr, nop], [nop, nop]], 2),
            (Jump(v2), vec![[mflr, nop], [mflr, bl], [b(v2), bl]], 102),
            (Original, vec![[mflr, bl], [mflr, nop], [nop, nop]], 2),
            (Original, vec![], 2),
        ];
        for (to, rounds, result) in steps {
            seen.borrow_mut().clear();
            set(&index, &site, to, &mut sync).expect("set");
            assert_eq!(*seen.borrow(), rounds, "-> {to:?}");
            assert_eq!(klp_ppc64le_sites_walk(1), result, "{to:?}");
        }
        assert_eq!(site_words(f), [nop, nop]);
        // A replacement in another object (another TOC) is never jumped to.
        let getpid = libc::getpid as *const () as u64;
        assert_eq!(
            set(&index, &site, Jump(getpid), &mut sync),
            Err(Errno::ERANGE)
        );
        assert_eq!(site_words(f), [nop, nop], "nothing written");
    })
    .join()
    .expect("thread");
}

static MCOUNT: AtomicU64 = AtomicU64::new(0);

/// An `_mcount` of the `-mprofile-kernel` convention that counts its calls: back to
/// the function (LR) with LR = r0 (the caller's return address).
#[unsafe(naked)]
extern "C" fn unit_mcount() {
    core::arch::naked_asm!(
        "0:",
        "addis 11, 2, {n}@toc@ha",
        "addi 11, 11, {n}@toc@l",
        "1: ldarx 12, 0, 11",
        "addi 12, 12, 1",
        "stdcx. 12, 0, 11",
        "bne- 1b",
        "mflr 12",
        "mtctr 12",
        "mtlr 0",
        "bctr",
        n = sym MCOUNT,
    )
}

/// The shape gcc gives a C function with `-pg -mprofile-kernel`: TOC setup,
/// `mflr r0; bl _mcount` at the local entry, then the body (here a branch to it).
#[unsafe(naked)]
#[unsafe(no_mangle)]
extern "C" fn klp_ppc64le_sites_pk(_x: u64) -> u64 {
    core::arch::naked_asm!(
        "0:",
        "addis 2, 12, (.TOC.-0b)@ha",
        "addi 2, 2, (.TOC.-0b)@l",
        ".localentry klp_ppc64le_sites_pk, .-0b",
        "mflr 0",
        "bl {mcount}",
        "b {body}",
        mcount = sym unit_mcount,
        body = sym pk_body,
    )
}

extern "C" fn pk_body(x: u64) -> u64 {
    std::hint::black_box(x) + 1
}

extern "C" fn pk_v2(x: u64) -> u64 {
    std::hint::black_box(x) + 101
}

/// A `-mprofile-kernel` site: recognised (not in its trampoline state), its `mflr r0`
/// kept in every state but the jump, its `bl` switched between `_mcount` and the stub.
#[test]
fn a_profile_kernel_site() {
    use SiteState::{Jump, Original, Trampoline};
    std::thread::spawn(|| {
        klp_user::thread::register_current();
        let index = SymbolIndex::load();
        let f = addr(klp_ppc64le_sites_pk as *const ());
        let site = find(&index, f).expect("a site");
        let mcount = addr(unit_mcount as *const ());
        assert_eq!(site.addr(), f + 8);
        assert_eq!(
            site.form,
            SiteForm::new(psite::form::PROFILE_KERNEL).calling(mcount)
        );
        let orig = site_words(f);
        assert_eq!(orig[0], insn::MFLR_R0);
        let before = MCOUNT.load(Ordering::Relaxed);
        assert_eq!(klp_ppc64le_sites_pk(1), 2);
        assert_eq!(
            MCOUNT.load(Ordering::Relaxed),
            before + 1,
            "the original calls _mcount"
        );
        let seen = RefCell::new(Vec::new());
        let mut sync = || seen.borrow_mut().push(site_words(f));
        set(&index, &site, Trampoline, &mut sync).expect("set");
        let call = site_words(f);
        assert_eq!(call[0], insn::MFLR_R0);
        // The stub's round, then one store: the `bl`.
        assert_eq!(*seen.borrow(), [orig, call]);
        assert!(find(&index, f).is_none(), "a `bl` to a stub is not a site");
        assert_eq!(klp_ppc64le_sites_pk(1), 2, "no view: the original");
        set(&index, &site, Jump(addr(pk_v2 as *const ())), &mut sync).expect("set");
        assert_eq!(klp_ppc64le_sites_pk(1), 102);
        seen.borrow_mut().clear();
        set(&index, &site, Original, &mut sync).expect("set");
        assert_eq!(*seen.borrow(), [call, orig]);
        let before = MCOUNT.load(Ordering::Relaxed);
        assert_eq!(klp_ppc64le_sites_pk(1), 2);
        assert_eq!(MCOUNT.load(Ordering::Relaxed), before + 1);
    })
    .join()
    .expect("thread");
}
