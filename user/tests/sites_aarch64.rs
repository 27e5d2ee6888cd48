//! aarch64 sites of this process on the real machine: the `nop; nop` site of C built
//! with `-fpatchable-function-entry=2` gets its `mov x9, x30` once, with the
//! second-word rule armed during the rounds, and keeps it. The plans themselves are
//! tested on every host in `klp-arch-aarch64`.
#![cfg(klp_arch = "aarch64")]

use std::cell::RefCell;

use klp::arch::SiteForm;
use klp_arch_aarch64::insn;
use klp_arch_aarch64::site::form;
use klp_user::redirect::testing::{SiteState, find, set};
use klp_user::symbols::SymbolIndex;

extern "C" fn unit_body(x: u64) -> u64 {
    std::hint::black_box(x) + 1
}

/// The site C built with `-fpatchable-function-entry=2` has.
#[unsafe(naked)]
#[unsafe(no_mangle)]
extern "C" fn klp_a64_sites_c(_x: u64) -> u64 {
    core::arch::naked_asm!("nop", "nop", "b {body}", body = sym unit_body)
}

fn words_at(a: u64) -> [u32; 2] {
    // SAFETY: `a` is the site of a function of this program: two mapped words.
    unsafe { std::ptr::read_volatile(a as *const [u32; 2]) }
}

#[test]
fn a_c_site_gets_its_mov_once() {
    std::thread::spawn(|| {
        klp_user::thread::register_current();
        let f = klp_a64_sites_c as *const () as u64;
        let index = SymbolIndex::load();
        let site = find(&index, f).expect("the site");
        assert_eq!(site.form, SiteForm::new(form::NOPS));
        assert_eq!(words_at(f), [insn::NOP, insn::NOP]);
        let seen = RefCell::new(Vec::new());
        let mut sync = || seen.borrow_mut().push(words_at(f));
        set(&index, &site, SiteState::Trampoline, &mut sync).expect("set");
        let [w0, w1] = words_at(f);
        assert_eq!(w0, insn::MOV_X9_X30);
        assert_eq!(w1 & !insn::IMM26, insn::BL);
        // The stub's round, the `w0` round, the `w1` round.
        assert_eq!(
            *seen.borrow(),
            [
                [insn::NOP, insn::NOP],
                [insn::MOV_X9_X30, insn::NOP],
                [w0, w1]
            ]
        );
        assert_eq!(klp_a64_sites_c(1), 2);
        seen.borrow_mut().clear();
        set(&index, &site, SiteState::Original, &mut sync).expect("set");
        assert_eq!(*seen.borrow(), [[insn::MOV_X9_X30, insn::NOP]]);
        assert_eq!(klp_a64_sites_c(1), 2);
        // Found again, it is the kernel's form.
        let again = find(&index, f).expect("the site");
        assert_eq!(again.form, SiteForm::new(form::MOV_X9_NOP));
    })
    .join()
    .expect("thread");
}
