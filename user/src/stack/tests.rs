use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use klp::arch::{Arch, Native, StackMemory, UnwindError, UnwindStart};
use klp_arch::{Live, MAX_CALL_LEN};

use super::handshake::{HOLD_NS, LOOK_LATE_US};
use super::scan::CodeReader;
use super::trace::{Machinery, trampoline_address};
use super::*;
use crate::symbols::SymbolIndex;
use crate::thread::{self, ThreadRecord, cap};

#[inline(never)]
fn spin_here(stop: &AtomicBool, ready: &AtomicBool) -> u64 {
    let mut n = 0u64;
    ready.store(true, Ordering::Release);
    while !stop.load(Ordering::Acquire) {
        n = std::hint::black_box(n.wrapping_add(1));
    }
    n
}

#[inline(never)]
fn spin_outer(stop: &AtomicBool, ready: &AtomicBool) -> u64 {
    let n = spin_here(stop, ready);
    std::hint::black_box(n)
}

fn contains_fn(idx: &SymbolIndex, trace: &[u64], f: u64) -> bool {
    let size = idx.size_of(f).expect("sized");
    trace.iter().any(|&a| a >= f && a < f + size)
}

struct Spinner {
    stop: Arc<AtomicBool>,
    rec: Arc<ThreadRecord>,
    handle: Option<std::thread::JoinHandle<u64>>,
}

impl Spinner {
    fn start(block_signal: bool) -> Spinner {
        Self::start_with(block_signal, spin_outer)
    }

    /// A registered thread that runs `body` (which must spin in [`spin_here`]).
    fn start_with(block_signal: bool, body: fn(&AtomicBool, &AtomicBool) -> u64) -> Spinner {
        let stop = Arc::new(AtomicBool::new(false));
        let ready = Arc::new(AtomicBool::new(false));
        let (s2, r2) = (stop.clone(), ready.clone());
        let (tx, rx) = std::sync::mpsc::channel();
        let handle = std::thread::spawn(move || {
            let _ = tx.send(thread::current_record());
            if block_signal {
                // SAFETY: a zeroed sigset is valid input to sigemptyset, which
                // initialises it; blocking a signal in this thread is harmless.
                unsafe {
                    let mut set: libc::sigset_t = std::mem::zeroed();
                    libc::sigemptyset(&mut set);
                    libc::sigaddset(&mut set, signal_number());
                    libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
                }
            }
            body(&s2, &r2)
        });
        let rec = rx.recv().ok().flatten().expect("registered");
        while !ready.load(Ordering::Acquire) {
            std::thread::yield_now();
        }
        Spinner {
            stop,
            rec,
            handle: Some(handle),
        }
    }
}

impl Drop for Spinner {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}

static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

// Functions whose addresses a thread keeps in a stack slot: plain function
// pointers, not return addresses.
#[inline(never)]
fn held_a(x: u64) -> u64 {
    std::hint::black_box(x) ^ 0x5a5a
}
#[inline(never)]
fn held_b(x: u64) -> u64 {
    std::hint::black_box(x).wrapping_mul(3)
}
#[inline(never)]
fn held_c(x: u64) -> u64 {
    std::hint::black_box(x).rotate_left(7)
}
#[inline(never)]
fn held_d(x: u64) -> u64 {
    std::hint::black_box(x).wrapping_sub(11)
}

/// The function pointer [`hold_pointer`] keeps on its stack.
static HELD: AtomicU64 = AtomicU64::new(0);

#[inline(never)]
fn hold_mid(stop: &AtomicBool, ready: &AtomicBool) -> u64 {
    let n = spin_here(stop, ready);
    std::hint::black_box(n)
}

/// Keeps [`HELD`] in a stack slot (its address escapes before the call, so the slot
/// is in memory while the callee spins) and spins two calls deeper.
#[inline(never)]
fn hold_pointer(stop: &AtomicBool, ready: &AtomicBool) -> u64 {
    let p = HELD.load(Ordering::Acquire);
    let slot = [p, p];
    std::hint::black_box(&slot);
    let n = hold_mid(stop, ready);
    std::hint::black_box(&slot);
    std::hint::black_box(n)
}

/// The code bytes right before `w`, as the scan reads them.
fn code_before(idx: &SymbolIndex, w: u64) -> Vec<u8> {
    let n = (1..=MAX_CALL_LEN as u64)
        .take_while(|k| idx.is_text(w - k))
        .count();
    let mut b = vec![0u8; n];
    assert!(CodeReader::new().read(w - n as u64, &mut b));
    b
}

#[test]
// ThreadSanitizer defers an asynchronous signal until the thread reaches one of its
// own safe points (an instrumented atomic, an interceptor), then runs the handler
// with the context saved when the signal arrived: the registers no longer match the
// stack the thread has moved on to, so the walk of a spinning thread fails
// (`UnexpectedEnd`, `FrameOutsideStack`). Not a klp defect; ci/test's TSan run
// skips the tests that walk a thread interrupted in a spin loop.
#[cfg_attr(
    klp_tsan,
    ignore = "ThreadSanitizer defers signals: the handler's context is stale"
)]
fn stops_a_thread_and_walks_its_stack() {
    let _s = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    install_handler();
    let sp = Spinner::start(false);
    let idx = SymbolIndex::load();
    let (low, high) = sp.rec.stack();
    let regs = with_stopped(&sp.rec, CheckOptions::default(), |r| r).expect("answers");
    assert!(idx.is_text(regs.pc), "{regs:x?}");
    assert!(
        regs.sp >= low && regs.sp < high,
        "{regs:x?} {low:#x} {high:#x}"
    );
    assert!(sp.rec.signals_handled() >= 1);
    let t = trace_of(
        &sp.rec,
        &idx,
        CheckOptions::default(),
        klp::MAX_STACK_ENTRIES,
    );
    let f = spin_here as *const () as u64;
    match t {
        Ok(tr) => {
            assert!(contains_fn(&idx, &tr, f), "spin_here missing: {tr:x?}");
            assert!(tr.len() < klp::MAX_STACK_ENTRIES);
            eprintln!("trace of {} entries", tr.len());
        }
        Err(e) => panic!("trace failed: {e:?}"),
    }
    // Both policies see the spinning function, except the unwinder on s390x, which
    // needs a back chain the prebuilt std does not keep.
    for policy in [WalkPolicy::Unwinder, WalkPolicy::ScanOnly] {
        let o = CheckOptions {
            policy,
            ..CheckOptions::default()
        };
        match trace_of(&sp.rec, &idx, o, klp::MAX_STACK_ENTRIES) {
            Ok(tr) => {
                // The spinning function and its caller: no frame is missed.
                assert!(contains_fn(&idx, &tr, f), "{policy:?}: {tr:x?}");
                let outer = spin_outer as *const () as u64;
                assert!(contains_fn(&idx, &tr, outer), "{policy:?}: {tr:x?}");
            }
            Err(TraceFailure::Walk(e))
                if !Native::USER_STACK_WALKABLE && policy == WalkPolicy::Unwinder =>
            {
                eprintln!("the unwinder refused the stack, as documented: {e}");
            }
            Err(e) => panic!("{policy:?}: {e:?}"),
        }
    }
    // The thread keeps running after the check.
    let before = sp.rec.signals_handled();
    assert!(with_stopped(&sp.rec, CheckOptions::default(), |_| ()).is_ok());
    assert_eq!(sp.rec.signals_handled(), before + 1);
}

#[test]
fn a_thread_that_blocks_the_signal_does_not_answer() {
    let _s = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    install_handler();
    let sp = Spinner::start(true);
    let t = CheckOptions {
        answer: Duration::from_millis(100),
        hold: Duration::from_secs(1),
        policy: WalkPolicy::NATIVE,
    };
    let start = Instant::now();
    assert_eq!(with_stopped(&sp.rec, t, |r| r), Err(TraceFailure::NoAnswer));
    assert!(start.elapsed() < Duration::from_secs(5));
    assert_eq!(sp.rec.cap.load(Ordering::Acquire), cap::IDLE);
}

#[test]
fn a_hold_that_outlasts_its_timeout_is_abandoned() {
    let _s = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    install_handler();
    let sp = Spinner::start(false);
    let t = CheckOptions {
        hold: Duration::from_millis(5),
        ..CheckOptions::default()
    };
    let r = with_stopped(&sp.rec, t, |_| {
        std::thread::sleep(Duration::from_millis(300))
    });
    assert_eq!(r, Err(TraceFailure::Resumed));
    // The slot is free again and the thread answers the next request.
    assert!(with_stopped(&sp.rec, CheckOptions::default(), |r| r.pc).is_ok());
    HOLD_NS.store(2_000_000_000, Ordering::Relaxed);
}

#[test]
fn an_exited_thread_is_gone() {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        tx.send(thread::current_record()).ok();
    })
    .join()
    .expect("thread");
    let rec = rx.recv().ok().flatten().expect("registered");
    assert!(!rec.alive());
    let idx = SymbolIndex::default();
    assert_eq!(
        trace_of(&rec, &idx, CheckOptions::default(), 100),
        Err(TraceFailure::Gone)
    );
    assert_eq!(
        with_stopped(&rec, CheckOptions::default(), |_| ()),
        Err(TraceFailure::Gone)
    );
}

#[test]
fn own_trace_sees_the_caller() {
    let idx = SymbolIndex::load();
    let rec = thread::register_current();
    #[inline(never)]
    fn probe(rec: &ThreadRecord, idx: &SymbolIndex) -> Result<Vec<u64>, TraceFailure> {
        let r = own_trace(rec, idx, WalkPolicy::NATIVE, klp::MAX_STACK_ENTRIES);
        std::hint::black_box(r)
    }
    match probe(&rec, &idx) {
        Ok(tr) => assert!(contains_fn(&idx, &tr, probe as *const () as u64), "{tr:x?}"),
        Err(e) => panic!("{e:?}"),
    }
}

/// A walk reads the words around a frame's locals: under AddressSanitizer, the
/// redzones it poisons around `buf` (reported as a `stack-buffer-underflow` before
/// `read_stack_word`).
#[test]
fn a_walk_reads_across_instrumented_locals() {
    let idx = SymbolIndex::load();
    let rec = thread::register_current();
    #[inline(never)]
    fn with_locals(rec: &ThreadRecord, idx: &SymbolIndex) -> Result<Vec<u64>, TraceFailure> {
        let buf = std::hint::black_box([7u8; 40]);
        let r = own_trace(rec, idx, WalkPolicy::NATIVE, klp::MAX_STACK_ENTRIES);
        std::hint::black_box(&buf);
        std::hint::black_box(r)
    }
    let tr = with_locals(&rec, &idx).expect("trace");
    assert!(
        contains_fn(&idx, &tr, with_locals as *const () as u64),
        "{tr:x?}"
    );
}

#[test]
fn late_registered_threads_have_no_entry_frame() {
    let rec = Arc::new(ThreadRecord::for_test());
    let idx = SymbolIndex::default();
    // SAFETY: nothing is read: the walk stops before touching memory.
    let mem = unsafe { ThreadStack::new(0x1000, 0x2000, rec.entry_frame(), 0x1800, &idx) };
    for p in [WalkPolicy::Unwinder, WalkPolicy::ScanOnly] {
        assert_eq!(
            trace(&mem, Regs::default(), p, 100),
            Err(TraceFailure::NoEntryFrame)
        );
    }
}

#[test]
fn thread_stack_reads_only_the_live_stack() {
    let words = [1u64, 2, 3, 4];
    let base = words.as_ptr() as u64;
    let idx = SymbolIndex::default();
    // SAFETY: `words` is readable for its whole length and unchanged meanwhile.
    let mem = unsafe { ThreadStack::new(base, base + 32, base + 24, base + 8, &idx) };
    assert_eq!(mem.read_u64(base), None, "below sp");
    assert_eq!(mem.read_u64(base + 8), Some(2));
    assert_eq!(mem.read_u64(base + 24), Some(4));
    assert_eq!(mem.read_u64(base + 28), None, "unaligned");
    assert_eq!(mem.read_u64(base + 32), None, "above the stack");
    assert_eq!(mem.bounds().end, base + 24);
}

#[test]
fn sync_round_is_acknowledged_by_every_thread() {
    let _s = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let a = Spinner::start(false);
    let b = Spinner::start(false);
    let (acked, asked) = sync_round(Duration::from_secs(5));
    assert!(asked >= 2);
    assert_eq!(acked, asked);
    assert!(a.rec.sync_ack.load(Ordering::Acquire) > 0);
    assert!(b.rec.sync_ack.load(Ordering::Acquire) > 0);
}
#[test]
// Regression (found by the loom model of the handshake, user/tests/loom.rs): a
// handler that gave up its hold before the checker saw the capture left the slot
// `ABANDONED`, and every later stop of that thread waited for a free slot in vain.
// A zero hold makes the handler give up at once, and the checker looks 5 ms late.
fn a_hold_given_up_before_the_checker_looks_leaves_the_thread_stoppable() {
    let _s = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    install_handler();
    let sp = Spinner::start(false);
    let hasty = CheckOptions {
        hold: Duration::ZERO,
        ..CheckOptions::default()
    };
    struct Prompt;
    impl Drop for Prompt {
        fn drop(&mut self) {
            LOOK_LATE_US.store(0, Ordering::Relaxed);
        }
    }
    let _prompt = Prompt;
    LOOK_LATE_US.store(5000, Ordering::Relaxed);
    let mut abandoned = 0;
    for _ in 0..20 {
        match with_stopped(&sp.rec, hasty, |r| r) {
            Err(TraceFailure::NoAnswer) => abandoned += 1,
            Ok(_) | Err(TraceFailure::Resumed) => {}
            Err(e) => panic!("unexpected failure: {e:?}"),
        }
        assert_ne!(
            sp.rec.cap.load(Ordering::Acquire),
            cap::ABANDONED,
            "a stop left the slot abandoned"
        );
    }
    eprintln!("{abandoned} of 20 holds were given up before the checker looked");
    assert!(
        abandoned > 0,
        "no hold was given up: the test checks nothing"
    );
    LOOK_LATE_US.store(0, Ordering::Relaxed);
    with_stopped(&sp.rec, CheckOptions::default(), |r| r).expect("the thread can still be stopped");
}

#[test]
fn a_batch_holds_the_threads_that_answer_until_each_is_taken() {
    let _s = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let idx = SymbolIndex::load();
    let a = Spinner::start(false);
    let b = Spinner::start(false);
    let blocked = Spinner::start(true);
    let recs = [a.rec.clone(), b.rec.clone(), blocked.rec.clone()];
    let t = CheckOptions {
        answer: Duration::from_secs(5),
        hold: Duration::from_secs(30),
        policy: WalkPolicy::ScanOnly,
    };
    let mut batch = Batch::stop(&recs, t, Duration::from_millis(200));
    assert_eq!(
        batch.len(),
        2,
        "the thread blocking klp's signal is left out"
    );
    assert!(batch.holds(a.rec.id) && batch.holds(b.rec.id));
    assert!(!batch.holds(blocked.rec.id));
    assert_eq!(
        blocked.rec.cap.load(Ordering::Acquire),
        cap::IDLE,
        "withdrawn"
    );
    // A held thread runs nothing: its handler's count stays where it is.
    let before = a.rec.signals.load(Ordering::Acquire);
    assert_eq!(a.rec.cap.load(Ordering::Acquire), cap::CAPTURED);
    let (trace, hold) = batch
        .trace_held(a.rec.id, &idx, t, 64)
        .expect("held by the batch")
        .expect("a reliable trace");
    assert!(
        contains_fn(&idx, &trace, spin_here as *const () as u64),
        "{trace:x?}"
    );
    assert!(!batch.holds(a.rec.id), "taken out of the batch");
    assert!(batch.trace_held(a.rec.id, &idx, t, 64).is_none());
    assert_eq!(
        a.rec.cap.load(Ordering::Acquire),
        cap::CAPTURED,
        "still held"
    );
    // Checked while it is held, not after the release: the synchronisation rounds
    // of the tests running beside this one signal every registered thread, and a
    // round that arrived during the hold (klp's signal is blocked in the handler)
    // runs the handler again right after it (seen under the sanitizer runs).
    std::thread::sleep(Duration::from_millis(50));
    assert_eq!(
        a.rec.signals.load(Ordering::Acquire),
        before,
        "ran while held"
    );
    drop(hold);
    drop(batch);
    for r in [&a.rec, &b.rec] {
        let start = Instant::now();
        while r.cap.load(Ordering::Acquire) != cap::IDLE {
            assert!(start.elapsed() < Duration::from_secs(5), "released");
            std::thread::yield_now();
        }
    }
    // Once released, a thread can be stopped one by one again.
    assert!(trace_of(&b.rec, &idx, t, 64).is_ok());
}

#[test]
// ThreadSanitizer defers an asynchronous signal until the thread reaches one of its
// own safe points (an instrumented atomic, an interceptor), then runs the handler
// with the context saved when the signal arrived: the registers no longer match the
// stack the thread has moved on to, so the walk of a spinning thread fails
// (`UnexpectedEnd`, `FrameOutsideStack`). Not a klp defect; ci/test's TSan run
// skips the tests that walk a thread interrupted in a spin loop.
#[cfg_attr(
    klp_tsan,
    ignore = "ThreadSanitizer defers signals: the handler's context is stale"
)]
fn a_function_pointer_on_the_stack_is_not_a_return_address() {
    let _s = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    install_handler();
    let idx = SymbolIndex::load();
    // A function whose entry does not follow a call (the entry of a function
    // usually follows a `ret` or padding; one right after a call to a function that
    // does not return would be kept, which is the safe side).
    let candidates = [held_a, held_b, held_c, held_d];
    let p = candidates
        .iter()
        .map(|f| *f as *const () as u64)
        .find(|&f| !Native::follows_call(&code_before(&idx, f)))
        .expect("a function entry that follows no call");
    HELD.store(p, Ordering::Release);
    let sp = Spinner::start_with(false, hold_pointer);
    let (low, high) = sp.rec.stack();
    let end = sp.rec.entry_frame();
    for policy in [WalkPolicy::Unwinder, WalkPolicy::ScanOnly] {
        let (held, tr) = with_stopped(&sp.rec, CheckOptions::default(), |regs| {
            // SAFETY: the thread is held in the handler; its stack above the
            // interrupted sp is mapped and does not change until it is released.
            let mem = unsafe { ThreadStack::new(low, high, end, regs.sp, &idx) };
            let held = (mem.floor..mem.bounds.end)
                .step_by(8)
                .any(|a| mem.read_u64(a) == Some(p));
            // Every return address the reliable unwinder finds passes the filter
            // (not on s390x, whose unwinder needs a back chain std does not keep).
            if policy == WalkPolicy::Unwinder && Native::USER_STACK_WALKABLE {
                let start = UnwindStart {
                    pc: regs.pc,
                    sp: regs.sp,
                    fp: regs.fp,
                };
                let walked = klp_arch::trace_reliable::<Native>(&mem, &start)
                    .expect("the unwinder walks a spinning thread");
                let mut code = CodeReader::new();
                for &ra in walked.as_slice().iter().skip(1) {
                    assert!(
                        mem.returns_after_call(&mut code, ra),
                        "{ra:#x}: {walked:x?}"
                    );
                }
            }
            (held, trace(&mem, regs, policy, klp::MAX_STACK_ENTRIES))
        })
        .expect("answers");
        // The pointer is in the live stack, where the scan used to pick it up.
        assert!(held, "{policy:?}: {p:#x} not on the stack");
        match tr {
            Ok(tr) => {
                assert!(!tr.contains(&p), "{policy:?}: {p:#x} in {tr:x?}");
                // Real return addresses stay: into `hold_pointer` (two calls up,
                // so on LR arches with `ScanOnly` only the scan can show it) and
                // into `hold_mid`.
                for f in [
                    hold_pointer as *const () as u64,
                    hold_mid as *const () as u64,
                ] {
                    assert!(
                        contains_fn(&idx, &tr, f),
                        "{policy:?}: {f:#x} missing: {tr:x?}"
                    );
                }
                assert!(contains_fn(&idx, &tr, spin_here as *const () as u64));
            }
            Err(TraceFailure::Walk(e))
                if !Native::USER_STACK_WALKABLE && policy == WalkPolicy::Unwinder =>
            {
                eprintln!("the unwinder refused the stack, as documented: {e}");
            }
            Err(e) => panic!("{policy:?}: {e:?}"),
        }
    }
}

#[test]
fn code_reader_reads_text_and_refuses_unmapped_memory() {
    let f = spin_here as *const () as u64;
    // SAFETY: `f` is the entry of a function of this executable: mapped, readable
    // text, never written while this test runs.
    let want: [u8; 8] = unsafe { std::ptr::read_volatile(f as *const [u8; 8]) };
    for direct in [true, false] {
        let mut r = CodeReader::new();
        r.direct = direct;
        let mut got = [0u8; 8];
        assert!(r.read(f, &mut got), "direct: {direct}");
        assert_eq!(got, want, "direct: {direct}");
        // Page 0 is never mapped: an error, not a fault, and the reader goes on.
        assert!(!r.read(0x10, &mut got), "direct: {direct}");
        let mut again = [0u8; 4];
        assert!(r.read(f + 4, &mut again), "direct: {direct}");
        assert_eq!(again[..], want[4..], "direct: {direct}");
        assert!(r.read(f, &mut []));
    }
}

#[test]
fn the_filter_drops_data_and_entries() {
    let idx = SymbolIndex::load();
    let stack = [0u64; 4];
    let base = stack.as_ptr() as u64;
    // SAFETY: `stack` is readable for its whole length and unchanged meanwhile.
    let mem = unsafe { ThreadStack::new(base, base + 32, base + 24, base, &idx) };
    let mut code = CodeReader::new();
    // Null, data and stack addresses are never kept.
    assert!(!mem.returns_after_call(&mut code, 0));
    assert!(!mem.returns_after_call(&mut code, base));
    assert!(!mem.returns_after_call(&mut code, &HELD as *const AtomicU64 as u64));
    // A function's entry is kept only if the code before it is a call.
    for f in [held_a, held_b, held_c, held_d] {
        let entry = f as *const () as u64;
        assert_eq!(
            mem.returns_after_call(&mut code, entry),
            Native::follows_call(&code_before(&idx, entry))
        );
    }
    // A function's entry that follows a call stands for the function before it (the
    // caller of a call that does not return); other addresses stand for themselves.
    let entry = held_c as *const () as u64;
    assert_eq!(mem.attribute(entry), entry - 1);
    assert_ne!(idx.lookup(entry - 1).map(|(_, s)| s.addr), Some(entry));
    assert_eq!(mem.attribute(entry + 1), entry + 1);
}
#[test]
fn the_redirect_machinery_is_recognised() {
    let idx = SymbolIndex::load();
    crate::redirect::register_with_stack();
    let m = Machinery::of(&idx);
    let tramp = trampoline_address();
    let decide = crate::redirect::decide_entry as *const () as u64;
    assert!(m.trampoline.is_some() && m.decide.is_some(), "{m:x?}");
    // A pc in either refuses the trace; a return address only into the decision.
    assert!(m.holds_pc(tramp) && m.holds_pc(decide) && m.holds_pc(decide + 1));
    assert!(m.holds_return(decide + 1) && !m.holds_return(tramp + 4));
    let other = spin_here as *const () as u64;
    assert!(!m.holds_pc(other) && !m.holds_return(other));
    // A thread stopped with its pc there gets no trace.
    let stack = [0u64; 4];
    let base = stack.as_ptr() as u64;
    // SAFETY: `stack` is readable for its whole length and unchanged meanwhile.
    let mem = unsafe { ThreadStack::new(base, base + 32, base + 24, base, &idx) };
    let regs = Regs {
        pc: decide,
        sp: base,
        fp: 0,
        lr: 0,
    };
    assert_eq!(
        trace(&mem, regs, WalkPolicy::ScanOnly, 100),
        Err(TraceFailure::Walk(UnwindError::Trampoline { addr: decide }))
    );
}
