//! Loom models of the user host's lock-free protocols, and the check that the models
//! still copy the source.
//!
//! Run the models with
//! `RUSTFLAGS="--cfg loom" CARGO_TARGET_DIR=target/loom cargo test -p klp-user --test loom --release`
//! (ci/test's loom step). Without `--cfg loom` only [`the_models_copy_the_source`] runs.
//!
//! The protocols are modelled standalone, with their orderings copied exactly: the
//! views live in a fixed `static` table of `std` atomics read by the x86_64 fast path's
//! assembly at fixed offsets, and the state byte sits at a fixed offset in the thread
//! record for the same assembly, so neither can be swapped for loom's atomics (which
//! are handles, not memory) without changing what is modelled. Instead,
//! [`the_models_copy_the_source`] — an ordinary test, run by every `cargo test` —
//! fails if one of the source lines a model copies changes; whoever changes an
//! ordering there must change the model with it.
//!
//! * **Views** (`user/src/redirect/mod.rs`, `publish` and `view`, the seqlock of one
//!   slot): while the core publishes the view that starts a transition, a thread
//!   deciding (`decide_entry`: the view, then its state byte) never sees the new top
//!   without its transition flag (the spec's HB-3), and a thread that sees the flag
//!   sees the state the core set before (`!target`, HB-1): it never runs the new
//!   function before it switched.
//! * **The stop/hold/release handshake** (`user/src/stack/handshake.rs`, `stop`, the
//!   handler's `on_signal` and `release`): a checker stops a thread, walks its stack while it
//!   is held and releases it, while the handler may give up the hold (its deadline):
//!   the registers read are the captured ones, a walk that `release` confirms read
//!   the interrupted stack, and the slot always ends free.
//! * **The state byte against a switch** (`user/src/thread.rs`, the `ThreadRecord`
//!   state byte; `klp/src/transition.rs`, the force and switch loops, which clear the
//!   pending flag *then* set the state): a thread passing safe points while the core
//!   switches it from outside switches once, to the target, and never back.
//!
//! Each model runs with the source's orderings and, as a `should_panic` test, with the
//! weakened orderings it must catch: a model that kept passing after the weakening
//! would check nothing.

/// The source lines each model copies, in order of appearance, per file.
const COPIED: &[(&str, &str, &[&str])] = &[
    (
        "user/src/redirect/mod.rs",
        include_str!("../src/redirect/mod.rs"),
        &[
            // publish
            "let seq = s.seq.load(Ordering::Relaxed);",
            "s.seq.store(seq.wrapping_add(1), Ordering::Relaxed);",
            "std::sync::atomic::fence(Ordering::Release);",
            "s.top.store(target_word(v.top), Ordering::Relaxed);",
            "s.below.store(target_word(v.below), Ordering::Relaxed);",
            "s.flags.store(f, Ordering::Relaxed);",
            "s.seq.store(seq.wrapping_add(2), Ordering::Release);",
            // view
            "let a = s.seq.load(Ordering::Acquire);",
            "let flags = s.flags.load(Ordering::Relaxed);",
            "let top = s.top.load(Ordering::Relaxed);",
            "let below = s.below.load(Ordering::Relaxed);",
            "std::sync::atomic::fence(Ordering::Acquire);",
            "if s.seq.load(Ordering::Relaxed) != a {",
            // decide_entry: the view, then the thread's state
            "let out = match view(site) {",
            "let state = rec.map_or_else(crate::thread::unregistered_state, |r| r.patch_state());",
        ],
    ),
    (
        "user/src/thread.rs",
        include_str!("../src/thread.rs"),
        &[
            // patch_state
            "decode(self.state.load(Ordering::Acquire))",
            // set_patch_state
            ".fetch_update(Ordering::AcqRel, Ordering::Acquire, |b| {",
            "Some((b & !ST_MASK) | v)",
            // set_pending
            "self.state.fetch_or(PENDING, Ordering::AcqRel);",
            "self.state.fetch_and(!PENDING, Ordering::AcqRel);",
            // update_patch_state
            ".fetch_update(Ordering::AcqRel, Ordering::Acquire, |b| {",
            "(b & PENDING != 0).then(|| encode(decode(b).inverted()))",
        ],
    ),
    (
        "user/src/stack/handshake.rs",
        include_str!("../src/stack/handshake.rs"),
        &[
            // on_signal: capture, then hold until released or the deadline
            "if rec.cap.load(Ordering::Acquire) != cap::REQUESTED {",
            "slot.store(v, Ordering::Relaxed);",
            "cap::REQUESTED,",
            "cap::CAPTURED,",
            "Ordering::AcqRel,",
            "match rec.cap.load(Ordering::Acquire) {",
            "cap::CAPTURED => {",
            "cap::CAPTURED,",
            "cap::ABANDONED,",
            "cap::RELEASED => {",
            "cap::RELEASED,",
            "cap::IDLE,",
            "_ => return,",
            // stop: request, wait, withdraw, free an abandoned hold
            "cap::IDLE,",
            "cap::REQUESTED,",
            "cap::CAPTURED => break,",
            "cap::REQUESTED,",
            "cap::IDLE,",
            "cap::ABANDONED,",
            "cap::IDLE,",
            // captured_regs
            "pc: rec.regs[0].load(Ordering::Relaxed),",
            // release
            "cap::CAPTURED,",
            "cap::RELEASED,",
            "if !released {",
            "rec.cap.store(cap::IDLE, Ordering::Release);",
        ],
    ),
    (
        "klp/src/transition.rs",
        include_str!("../../klp/src/transition.rs"),
        &[
            // klp_force_transition: the flag, then the state
            "if h.patch_pending(t) {",
            "h.set_patch_pending(t, false);",
            "h.set_patch_state(t, target);",
        ],
    ),
];

#[test]
fn the_models_copy_the_source() {
    for (path, text, lines) in COPIED {
        let mut rest = *text;
        for line in *lines {
            let Some(at) = rest.find(line) else {
                panic!(
                    "{path}: `{line}` is gone (or moved before the line the model copies \
                     before it): update user/tests/loom.rs's model with the source"
                );
            };
            rest = &rest[at + line.len()..];
        }
    }
}

/// Runs `f` under `loom::model` and prints how many executions loom explored
/// (ci/test's summary).
#[cfg(loom)]
fn explore(name: &str, f: impl Fn() + Sync + Send + 'static) {
    use std::sync::atomic::{AtomicUsize, Ordering};
    let runs = std::sync::Arc::new(AtomicUsize::new(0));
    let counted = runs.clone();
    loom::model(move || {
        counted.fetch_add(1, Ordering::Relaxed);
        f();
    });
    println!("loom: {name}: {} executions", runs.load(Ordering::Relaxed));
}

#[cfg(loom)]
mod models {
    use klp::{PatchState, RedirectView, Target};
    use loom::sync::Arc;
    use loom::sync::atomic::{AtomicU8, AtomicU64, Ordering, fence};

    // ------------------------------------------------------------------ views

    const F_PRESENT: u64 = 1;
    const F_TRANSITION: u64 = 2;

    /// The orderings of the seqlock; [`Seqlock::SOURCE`] is the source's.
    #[derive(Clone, Copy)]
    struct Seqlock {
        /// `publish`: the fence after the odd sequence (`None`: no fence).
        publish_fence: Option<Ordering>,
        /// `publish`: the store of the even sequence.
        publish_end: Ordering,
        /// `view`: the first load of the sequence.
        view_start: Ordering,
        /// `view`: the fence before the second load (`None`: no fence).
        view_fence: Option<Ordering>,
    }

    impl Seqlock {
        const SOURCE: Seqlock = Seqlock {
            publish_fence: Some(Ordering::Release),
            publish_end: Ordering::Release,
            view_start: Ordering::Acquire,
            view_fence: Some(Ordering::Acquire),
        };
    }

    /// One slot of the view table (the fast path's `by_state` words are written and
    /// read like `top`, under the same sequence, and left out).
    struct Slot {
        seq: AtomicU64,
        flags: AtomicU64,
        top: AtomicU64,
        below: AtomicU64,
    }

    fn word(t: Target) -> u64 {
        match t {
            Target::Original => 0,
            Target::Func(a) => a,
        }
    }

    fn target(w: u64) -> Target {
        if w == 0 {
            Target::Original
        } else {
            Target::Func(w)
        }
    }

    /// `redirect::publish` (the writers' lock is left out: there is one writer).
    fn publish(s: &Slot, v: RedirectView, o: Seqlock) {
        let seq = s.seq.load(Ordering::Relaxed);
        s.seq.store(seq.wrapping_add(1), Ordering::Relaxed);
        if let Some(f) = o.publish_fence {
            fence(f);
        }
        s.top.store(word(v.top), Ordering::Relaxed);
        s.below.store(word(v.below), Ordering::Relaxed);
        let f = F_PRESENT | if v.top_transition { F_TRANSITION } else { 0 };
        s.flags.store(f, Ordering::Relaxed);
        s.seq.store(seq.wrapping_add(2), o.publish_end);
    }

    /// `redirect::view`.
    fn view(s: &Slot, o: Seqlock) -> Option<RedirectView> {
        loop {
            let a = s.seq.load(o.view_start);
            if a & 1 != 0 {
                loom::thread::yield_now();
                continue;
            }
            let flags = s.flags.load(Ordering::Relaxed);
            let top = s.top.load(Ordering::Relaxed);
            let below = s.below.load(Ordering::Relaxed);
            if let Some(f) = o.view_fence {
                fence(f);
            }
            if s.seq.load(Ordering::Relaxed) != a {
                loom::thread::yield_now();
                continue;
            }
            return (flags & F_PRESENT != 0).then_some(RedirectView {
                top: target(top),
                top_transition: flags & F_TRANSITION != 0,
                below: target(below),
            });
        }
    }

    const OLD: u64 = 0x1000;
    const NEW: u64 = 0x2000;

    /// An enable: the steady view of a first patch (`OLD` live) is published; then the
    /// core sets the deciding thread's state to `!target` (`Unpatched`, through its
    /// state byte) and publishes the view that puts `NEW` on top in transition, while
    /// the thread decides twice (`decide_entry`: the view, then its state byte). It
    /// has not switched, so every decision must be `OLD` and none an anomaly.
    fn enable_while_deciding(name: &str, o: Seqlock) {
        super::explore(name, move || {
            let slot = Arc::new(Slot {
                seq: AtomicU64::new(0),
                flags: AtomicU64::new(0),
                top: AtomicU64::new(0),
                below: AtomicU64::new(0),
            });
            let state = Arc::new(AtomicU8::new(super::state::IDLE));
            publish(
                &slot,
                RedirectView {
                    top: Target::Func(OLD),
                    top_transition: false,
                    below: Target::Original,
                },
                o,
            );
            let core = {
                let (slot, state) = (slot.clone(), state.clone());
                loom::thread::spawn(move || {
                    super::state::set_patch_state(&state, PatchState::Unpatched);
                    publish(
                        &slot,
                        RedirectView {
                            top: Target::Func(NEW),
                            top_transition: true,
                            below: Target::Func(OLD),
                        },
                        o,
                    );
                })
            };
            for _ in 0..2 {
                let v = view(&slot, o).expect("a view is published");
                assert!(
                    v.top != Target::Func(NEW) || v.top_transition,
                    "HB-3: the new top without its transition flag: {v:?}"
                );
                let s = super::state::patch_state(&state);
                let (t, anomaly) = klp::decide(&v, s);
                assert_eq!(anomaly, klp::Anomaly::None, "HB-1: {v:?} with {s:?}");
                assert_eq!(t, Target::Func(OLD), "an unswitched thread ran {t:?}");
            }
            core.join().expect("core");
        });
    }

    #[test]
    fn loom_views_a_decider_never_sees_a_new_top_without_its_flag() {
        enable_while_deciding("views, enable while deciding", Seqlock::SOURCE);
    }

    /// Without the fence after the odd sequence, a reader can take the new fields with
    /// the old even sequence on both sides.
    #[test]
    #[should_panic(expected = "HB-3")]
    fn loom_views_catch_a_missing_publish_fence() {
        enable_while_deciding(
            "views, no publish fence",
            Seqlock {
                publish_fence: None,
                ..Seqlock::SOURCE
            },
        );
    }

    /// Without the reader's fence, its second sequence load may be served before its
    /// field loads.
    #[test]
    #[should_panic(expected = "HB-3")]
    fn loom_views_catch_a_missing_view_fence() {
        enable_while_deciding(
            "views, no view fence",
            Seqlock {
                view_fence: None,
                ..Seqlock::SOURCE
            },
        );
    }

    /// Relaxed on both ends of the even sequence: a reader that reads the new sequence
    /// first has no happens-before with the field stores, and may take old and new
    /// fields together.
    #[test]
    #[should_panic(expected = "HB-3")]
    fn loom_views_catch_a_relaxed_sequence() {
        enable_while_deciding(
            "views, relaxed sequence",
            Seqlock {
                publish_end: Ordering::Relaxed,
                view_start: Ordering::Relaxed,
                ..Seqlock::SOURCE
            },
        );
    }
}

/// The state byte's operations (`thread.rs`), on a loom byte.
#[cfg(loom)]
mod state {
    use klp::PatchState;
    use loom::sync::atomic::{AtomicU8, Ordering};

    pub const IDLE: u8 = 0;
    const UNPATCHED: u8 = 1;
    const PATCHED: u8 = 2;
    const MASK: u8 = 3;
    const PENDING: u8 = 4;

    fn encode(s: PatchState) -> u8 {
        match s {
            PatchState::Idle => IDLE,
            PatchState::Unpatched => UNPATCHED,
            PatchState::Patched => PATCHED,
        }
    }

    fn decode(b: u8) -> PatchState {
        match b & MASK {
            UNPATCHED => PatchState::Unpatched,
            PATCHED => PatchState::Patched,
            _ => PatchState::Idle,
        }
    }

    pub fn patch_state(b: &AtomicU8) -> PatchState {
        decode(b.load(Ordering::Acquire))
    }

    pub fn pending(b: &AtomicU8) -> bool {
        b.load(Ordering::Acquire) & PENDING != 0
    }

    pub fn set_patch_state(b: &AtomicU8, s: PatchState) {
        let v = encode(s);
        let _ = b.fetch_update(Ordering::AcqRel, Ordering::Acquire, |b| {
            Some((b & !MASK) | v)
        });
    }

    pub fn set_pending(b: &AtomicU8, p: bool) {
        if p {
            b.fetch_or(PENDING, Ordering::AcqRel);
        } else {
            b.fetch_and(!PENDING, Ordering::AcqRel);
        }
    }

    /// `update_patch_state`: the safe point.
    pub fn update_patch_state(b: &AtomicU8) -> bool {
        b.fetch_update(Ordering::AcqRel, Ordering::Acquire, |b| {
            (b & PENDING != 0).then(|| encode(decode(b).inverted()))
        })
        .is_ok()
    }

    pub fn encoded(s: PatchState, pending: bool) -> u8 {
        encode(s) | if pending { PENDING } else { 0 }
    }
}

#[cfg(loom)]
mod state_byte {
    use super::state;
    use klp::PatchState;
    use loom::sync::Arc;
    use loom::sync::atomic::AtomicU8;

    /// A thread pending towards `Patched` passes two safe points (each followed by a
    /// look at its state, as a decision would) while the core switches it from outside
    /// (`klp_force_transition`, or a switch of a thread the core holds: if pending,
    /// clear the flag, set the state). The thread must switch once, to `Patched`, and
    /// never see its state go back; at the end it is `Patched` and not pending.
    ///
    /// `flag_first` is the core's order (the source's: `true`). The other order lets a
    /// safe point between the two steps find the flag still set with the state already
    /// `Patched`, and invert it back to `Unpatched`.
    fn switch_against_safe_points(name: &str, flag_first: bool) {
        super::explore(name, move || {
            let b = Arc::new(AtomicU8::new(state::encoded(PatchState::Unpatched, true)));
            let thread = {
                let b = b.clone();
                loom::thread::spawn(move || {
                    let mut seen = Vec::new();
                    for _ in 0..2 {
                        state::update_patch_state(&b);
                        seen.push(state::patch_state(&b));
                    }
                    seen
                })
            };
            if state::pending(&b) {
                if flag_first {
                    state::set_pending(&b, false);
                    state::set_patch_state(&b, PatchState::Patched);
                } else {
                    state::set_patch_state(&b, PatchState::Patched);
                    state::set_pending(&b, false);
                }
            }
            let seen = thread.join().expect("thread");
            assert!(
                !seen
                    .windows(2)
                    .any(|w| w[0] == PatchState::Patched && w[1] != PatchState::Patched),
                "the thread went back: {seen:?}"
            );
            assert_eq!(
                (state::patch_state(&b), state::pending(&b)),
                (PatchState::Patched, false),
                "seen by the thread: {seen:?}"
            );
        });
    }

    #[test]
    fn loom_state_byte_a_switch_against_safe_points_switches_once() {
        switch_against_safe_points("state byte, switch against safe points", true);
    }

    #[test]
    #[should_panic(expected = "seen by the thread")]
    fn loom_state_byte_catches_the_state_set_before_the_flag_is_cleared() {
        switch_against_safe_points("state byte, state set before the flag", false);
    }
}

/// The stop/hold/release handshake of a stack check (`user/src/stack/handshake.rs`:
/// `stop`, the signal handler's `on_signal`, `release`) on a loom thread record.
#[cfg(loom)]
mod handshake {
    use loom::cell::UnsafeCell;
    use loom::sync::Arc;
    use loom::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};

    // `thread::cap`.
    const IDLE: u32 = 0;
    const REQUESTED: u32 = 1;
    const CAPTURED: u32 = 2;
    const RELEASED: u32 = 3;
    const ABANDONED: u32 = 4;

    /// What differs from the source in a weakened model.
    #[derive(Clone, Copy)]
    struct Protocol {
        /// The handler's `REQUESTED -> CAPTURED` (the source: `AcqRel`).
        capture: Ordering,
        /// `release` by compare-and-swap from `CAPTURED` (the source), or by a store.
        release_by_cas: bool,
        /// `stop` frees a hold the handler abandoned before the checker saw it (the
        /// source, since loom found the slot left `ABANDONED`: every later stop of the
        /// thread then waited for a free slot in vain and failed).
        stop_frees_abandoned: bool,
    }

    const SOURCE: Protocol = Protocol {
        capture: Ordering::AcqRel,
        release_by_cas: true,
        stop_frees_abandoned: true,
    };

    /// The parts of a `ThreadRecord` the handshake uses, and the thread's stack.
    struct Rec {
        cap: AtomicU32,
        /// The captured registers (one word stands for the four). The source keeps them
        /// in relaxed atomics published by the capture; the model makes them plain
        /// data, so that loom reports any read the capture does not order.
        reg: UnsafeCell<u64>,
        /// A word of the thread's stack: 1 while it is interrupted, 2 once it runs on.
        /// The checker's walk reads it (as `read_stack_word` does, without a lock).
        stack: AtomicU64,
        /// `tgkill` was called: the signal is delivered to the thread.
        signalled: AtomicBool,
    }

    /// `on_signal`, the hold part. `patience`: how many times the handler finds
    /// itself still held before its deadline passes (loom has no clock; with 0 the
    /// deadline passes at the first look, which loom orders before or after the
    /// release in turn).
    fn on_signal(rec: &Rec, p: Protocol, patience: usize) {
        if rec.cap.load(Ordering::Acquire) != REQUESTED {
            return;
        }
        let v = rec.stack.load(Ordering::Relaxed);
        // SAFETY: the slot is `REQUESTED`: the checker reads the registers only after
        // it sees `CAPTURED`, which this thread stores after this write.
        rec.reg.with_mut(|r| unsafe { *r = v });
        let failure = if p.capture == Ordering::Relaxed {
            Ordering::Relaxed
        } else {
            Ordering::Acquire
        };
        if rec
            .cap
            .compare_exchange(REQUESTED, CAPTURED, p.capture, failure)
            .is_err()
        {
            return;
        }
        let mut waited = 0;
        loop {
            match rec.cap.load(Ordering::Acquire) {
                CAPTURED => {
                    if waited >= patience {
                        if rec
                            .cap
                            .compare_exchange(
                                CAPTURED,
                                ABANDONED,
                                Ordering::AcqRel,
                                Ordering::Acquire,
                            )
                            .is_ok()
                        {
                            return;
                        }
                        continue;
                    }
                    waited += 1;
                    loom::thread::yield_now();
                }
                RELEASED => {
                    let _ = rec.cap.compare_exchange(
                        RELEASED,
                        IDLE,
                        Ordering::AcqRel,
                        Ordering::Acquire,
                    );
                    return;
                }
                _ => return,
            }
        }
    }

    /// `stop`: `Some(registers)` once the thread holds, `None` for no answer.
    /// `patience`: how many times it finds the request unanswered before it withdraws.
    fn stop(rec: &Rec, p: Protocol, patience: usize) -> Option<u64> {
        rec.cap
            .compare_exchange(IDLE, REQUESTED, Ordering::AcqRel, Ordering::Acquire)
            .expect("the slot is free at the first stop");
        rec.signalled.store(true, Ordering::Release);
        let mut waited = 0;
        loop {
            match rec.cap.load(Ordering::Acquire) {
                CAPTURED => break,
                REQUESTED if waited < patience => {
                    waited += 1;
                    loom::thread::yield_now();
                }
                REQUESTED => {
                    if rec
                        .cap
                        .compare_exchange(REQUESTED, IDLE, Ordering::AcqRel, Ordering::Acquire)
                        .is_ok()
                    {
                        return None;
                    }
                }
                _ => {
                    if p.stop_frees_abandoned {
                        let _ = rec.cap.compare_exchange(
                            ABANDONED,
                            IDLE,
                            Ordering::AcqRel,
                            Ordering::Acquire,
                        );
                    }
                    return None;
                }
            }
        }
        // SAFETY: the slot was seen `CAPTURED`: the handler wrote the registers before.
        Some(rec.reg.with(|r| unsafe { *r }))
    }

    /// `release`: whether the thread was still held.
    fn release(rec: &Rec, p: Protocol) -> bool {
        let released = if p.release_by_cas {
            rec.cap
                .compare_exchange(CAPTURED, RELEASED, Ordering::AcqRel, Ordering::Acquire)
                .is_ok()
        } else {
            rec.cap.store(RELEASED, Ordering::Release);
            true
        };
        if !released {
            rec.cap.store(IDLE, Ordering::Release);
        }
        released
    }

    /// A checker stops a thread, walks its stack while it is held, and releases it,
    /// while the thread's handler may give up the hold at any time (its deadline).
    /// Whatever the interleaving: the registers the checker reads are those the
    /// handler captured; when `release` says the thread was held, the walk read the
    /// stack of the interrupted thread (it had not run on); the handler always
    /// returns; and the slot ends free (`IDLE`), so that the thread can be stopped
    /// again.
    fn stop_walk_release(name: &str, p: Protocol) {
        super::explore(name, move || {
            let rec = Arc::new(Rec {
                cap: AtomicU32::new(IDLE),
                reg: UnsafeCell::new(0),
                stack: AtomicU64::new(1),
                signalled: AtomicBool::new(false),
            });
            let thread = {
                let rec = rec.clone();
                loom::thread::spawn(move || {
                    while !rec.signalled.load(Ordering::Acquire) {
                        loom::thread::yield_now();
                    }
                    on_signal(&rec, p, 0);
                    rec.stack.store(2, Ordering::Relaxed);
                })
            };
            if let Some(reg) = stop(&rec, p, 0) {
                assert_eq!(
                    reg, 1,
                    "the checker read registers the handler did not capture"
                );
                let walked = rec.stack.load(Ordering::Relaxed);
                if release(&rec, p) {
                    assert_eq!(
                        walked, 1,
                        "release said the thread was held, but it ran on during the walk"
                    );
                }
            }
            thread.join().expect("thread");
            assert_eq!(
                rec.cap.load(Ordering::Acquire),
                IDLE,
                "the handshake left the slot taken: the thread can never be stopped again"
            );
        });
    }

    #[test]
    fn loom_handshake_stop_walk_release() {
        stop_walk_release("handshake, stop/hold/release", SOURCE);
    }

    #[test]
    #[should_panic(expected = "Causality violation")]
    fn loom_handshake_catches_a_relaxed_capture() {
        stop_walk_release(
            "handshake, relaxed capture",
            Protocol {
                capture: Ordering::Relaxed,
                ..SOURCE
            },
        );
    }

    /// A release by store, racing with the handler giving up the hold, reports a
    /// thread as held that had resumed (its walk may have read a stack that moved)
    /// and overwrites the handler's last word: the slot ends taken.
    #[test]
    #[should_panic(expected = "left the slot taken")]
    fn loom_handshake_catches_a_release_by_store() {
        stop_walk_release(
            "handshake, release by store",
            Protocol {
                release_by_cas: false,
                ..SOURCE
            },
        );
    }

    #[test]
    #[should_panic(expected = "left the slot taken")]
    fn loom_handshake_catches_an_abandoned_hold_left_in_the_slot() {
        stop_walk_release(
            "handshake, abandoned hold not freed",
            Protocol {
                stop_frees_abandoned: false,
                ..SOURCE
            },
        );
    }
}
