//! Functions of this process redirected through the architecture's entry trampoline:
//! every scenario runs in sequence in one test, because the host is process-wide.

#[path = "common/host.rs"]
mod host;
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, mpsc};
use std::time::Duration;

use klp::{FuncDesc, ObjectDesc, PatchDesc, PatchState};
use klp_user::{Process, ProcessHost, SiteKind};

const WAIT: Duration = Duration::from_secs(60);

klp_user::patchable! {
    /// The function most scenarios patch.
    pub fn klp_redirect_target(x: u64) -> u64 {
        std::hint::black_box(x) + 1
    }
}

klp_user::patchable! {
    /// Every integer argument register, two stack arguments and the eight vector
    /// argument registers.
    #[allow(clippy::too_many_arguments)]
    pub fn klp_redirect_many(
        a: u64, b: u64, c: u64, d: u64, e: u64, f: u64, g: u64, h: u64,
        x0: f64, x1: f64, x2: f64, x3: f64, x4: f64, x5: f64, x6: f64, x7: f64,
    ) -> f64 {
        weigh([a, b, c, d, e, f, g, h], [x0, x1, x2, x3, x4, x5, x6, x7])
    }
}

/// Each argument with its own weight, so that a swapped or clobbered one shows.
fn weigh(i: [u64; 8], x: [f64; 8]) -> f64 {
    let mut r = 0.0;
    for (k, (a, b)) in i.iter().zip(x).enumerate() {
        r += (*a * (k as u64 + 1)) as f64 + b * (k as f64 + 10.0);
    }
    r
}

klp_user::patchable! {
    /// Blocks on the parking channel (a thread sleeping inside the function).
    pub fn klp_redirect_parked(x: u64) -> u64 {
        park();
        x + 1
    }
}

klp_user::patchable! {
    /// Like `klp_redirect_parked`, for the force scenario.
    pub fn klp_redirect_forced(x: u64) -> u64 {
        park();
        x + 1
    }
}

extern "C" fn target_v2(x: u64) -> u64 {
    std::hint::black_box(x) + 101
}

extern "C" fn target_v3(x: u64) -> u64 {
    std::hint::black_box(x) + 1001
}

#[allow(clippy::too_many_arguments)]
extern "C" fn many_v2(
    a: u64,
    b: u64,
    c: u64,
    d: u64,
    e: u64,
    f: u64,
    g: u64,
    h: u64,
    x0: f64,
    x1: f64,
    x2: f64,
    x3: f64,
    x4: f64,
    x5: f64,
    x6: f64,
    x7: f64,
) -> f64 {
    -weigh([a, b, c, d, e, f, g, h], [x0, x1, x2, x3, x4, x5, x6, x7])
}

extern "C" fn parked_v2(x: u64) -> u64 {
    x + 101
}

static PARK: Mutex<Option<mpsc::Receiver<()>>> = Mutex::new(None);
static PARKED: AtomicBool = AtomicBool::new(false);

/// Waits on the parking channel installed by [`Parked::start`] (none: returns).
fn park() {
    let rx = PARK.lock().map(|mut g| g.take()).ok().flatten();
    if let Some(rx) = rx {
        PARKED.store(true, Ordering::Release);
        let _ = rx.recv();
    }
}

/// A thread parked inside `f` until released.
struct Parked {
    release: mpsc::Sender<()>,
    handle: std::thread::JoinHandle<u64>,
    tid: i32,
}

impl Parked {
    fn start(f: extern "C" fn(u64) -> u64) -> Parked {
        let (release, rx) = mpsc::channel();
        *PARK.lock().expect("park") = Some(rx);
        PARKED.store(false, Ordering::Release);
        let (tid_tx, tid_rx) = mpsc::channel();
        let handle = std::thread::spawn(move || {
            let me = klp_user::thread::current_record().expect("registered");
            tid_tx.send(me.tid()).ok();
            f(1)
        });
        let tid = tid_rx.recv().expect("tid");
        while !PARKED.load(Ordering::Acquire) {
            std::thread::sleep(Duration::from_millis(1));
        }
        // Let it reach the wait.
        std::thread::sleep(Duration::from_millis(20));
        Parked {
            release,
            handle,
            tid,
        }
    }

    fn finish(self) -> u64 {
        self.release.send(()).expect("release");
        self.handle.join().expect("parked thread")
    }
}

fn addr(f: *const ()) -> u64 {
    f as u64
}

fn patch(name: &str, funcs: &[(&str, u64)]) -> PatchDesc<ProcessHost> {
    let mut o = ObjectDesc::vmlinux();
    for (n, a) in funcs {
        o = o.func(FuncDesc::new(n, *a));
    }
    PatchDesc::new(name).object(o)
}

fn log_after(p: &Process, since: u64) -> String {
    p.log_since(since).join("\n")
}

/// The per-back-end checks of these tests select with `cfg(klp_arch)`, which the build
/// script derives from the target: it must name the back-end this build runs on.
#[test]
fn the_tests_cfg_names_the_native_back_end() {
    use klp::arch::{Arch, Native};
    if klp::arch::SUPPORTED {
        assert_eq!(env!("KLP_ARCH"), Native::NAME);
    }
}

/// The first bytes of a `patchable!` wrapper (every arch's wrapper is longer).
fn site_bytes(f: u64) -> [u8; 8] {
    // SAFETY: `f` is a wrapper of this program: its first 8 bytes are mapped text.
    unsafe { std::ptr::read_volatile(f as *const [u8; 8]) }
}

#[cfg(klp_arch = "x86_64")]
const NOP5: [u8; 5] = [0x0f, 0x1f, 0x44, 0x00, 0x00];
#[cfg(klp_arch = "aarch64")]
const A64_NOPS: [u8; 8] = [0xe9, 0x03, 0x1e, 0xaa, 0x1f, 0x20, 0x03, 0xd5];

/// The two words of an aarch64 site.
#[cfg(klp_arch = "aarch64")]
fn site_words(f: u64) -> [u32; 2] {
    let b = site_bytes(f);
    [
        u32::from_le_bytes([b[0], b[1], b[2], b[3]]),
        u32::from_le_bytes([b[4], b[5], b[6], b[7]]),
    ]
}

/// The two words of a ppc64le site: at the local entry, 8 bytes past the global
/// entry's TOC setup.
#[cfg(klp_arch = "ppc64le")]
fn ppc_site_words(f: u64) -> [u32; 2] {
    // SAFETY: `f` is a wrapper of this program: its first 16 bytes are mapped text.
    let b = unsafe { std::ptr::read_volatile((f + 8) as *const [u8; 8]) };
    [
        u32::from_le_bytes([b[0], b[1], b[2], b[3]]),
        u32::from_le_bytes([b[4], b[5], b[6], b[7]]),
    ]
}

fn many() -> f64 {
    klp_redirect_many(
        1, 2, 3, 4, 5, 6, 7, 8, 0.5, 1.5, 2.5, 3.5, 4.5, 5.5, 6.5, 7.5,
    )
}

fn many_expected() -> f64 {
    weigh(
        [1, 2, 3, 4, 5, 6, 7, 8],
        [0.5, 1.5, 2.5, 3.5, 4.5, 5.5, 6.5, 7.5],
    )
}

fn wait_gone(p: &Process, name: &str) {
    let deadline = std::time::Instant::now() + WAIT;
    while p.list().iter().any(|x| x.name == name) && std::time::Instant::now() < deadline {
        p.run_due_work();
        std::thread::sleep(Duration::from_millis(5));
    }
    assert!(!p.list().iter().any(|x| x.name == name), "{name} freed");
}

fn redirect_and_revert(p: &Process) {
    let t = addr(klp_redirect_target as *const ());
    assert_eq!(p.symbols().candidates(None, "klp_redirect_target"), &[t]);
    assert!(p.symbols().size_of(t).is_some_and(|s| s >= 10), "sized");
    let before = site_bytes(t);
    #[cfg(klp_arch = "x86_64")]
    assert_eq!(before[..5], NOP5, "the wrapper starts with the site");
    #[cfg(klp_arch = "aarch64")]
    assert_eq!(before, A64_NOPS, "the wrapper starts with the site");
    #[cfg(klp_arch = "ppc64le")]
    {
        let toc = u32::from_le_bytes([before[0], before[1], before[2], before[3]]);
        assert_eq!(
            toc & 0xffff_0000,
            0x3c4c_0000,
            "addis r2,r12: the global entry"
        );
        assert_eq!(
            ppc_site_words(t),
            [0x6000_0000; 2],
            "nops at the local entry"
        );
    }
    #[cfg(klp_arch = "s390x")]
    assert_eq!(before[..6], [0xc0, 0x04, 0, 0, 0, 0], "brcl 0,0: the site");
    assert_eq!(klp_redirect_target(1), 2);
    assert_eq!(many(), many_expected());
    // The direct calls of the function, known from the relocations `--emit-relocs`
    // keeps (x86_64: they are retargeted in the steady state).
    let mut callers = p.with_core(|_, h| h.callers_of(t));
    callers.sort_unstable();
    let callers_before: Vec<[u8; 6]> = callers.iter().map(|c| code_bytes(*c)).collect();
    #[cfg(klp_arch = "x86_64")]
    assert!(
        !callers.is_empty(),
        "this test calls klp_redirect_target directly"
    );

    let since = p.log().1;
    p.enable_patch(patch(
        "lp_r1",
        &[
            ("klp_redirect_target", addr(target_v2 as *const ())),
            ("klp_redirect_many", addr(many_v2 as *const ())),
        ],
    ))
    .expect("enable");
    assert!(p.wait_transition(WAIT), "{}", log_after(p, since));
    let v2 = addr(target_v2 as *const ());
    assert_eq!(
        p.site_state(t),
        Some(SiteKind::Jump(v2)),
        "steady state: a direct jump"
    );
    #[cfg(klp_arch = "x86_64")]
    {
        assert_eq!(site_bytes(t)[0], 0xe9, "jmp rel32");
        let rel = i32::from_le_bytes(site_bytes(t)[1..5].try_into().expect("4 bytes"));
        assert_eq!((t + 5).wrapping_add(rel as u64), v2);
        // Every direct caller calls the replacement itself now.
        assert_eq!(p.with_core(|_, h| h.retargeted_callers(t)), callers);
        for c in &callers {
            let b = code_bytes(*c);
            // `call`/`jmp rel32`, or `addr32 call rel32` (a retargeted GOT call).
            let (at, next) = if b[0] == 0x67 { (2, 6) } else { (1, 5) };
            assert!(matches!(b[at - 1], 0xe8 | 0xe9), "caller {c:#x}: {b:x?}");
            let rel = i32::from_le_bytes(b[at..at + 4].try_into().expect("4 bytes"));
            assert_eq!(
                (c + next).wrapping_add(rel as u64),
                v2,
                "caller {c:#x}: {b:x?}"
            );
        }
    }
    #[cfg(klp_arch = "aarch64")]
    {
        let [w0, w1] = site_words(t);
        assert_eq!(w0, 0xaa1e_03e9, "mov x9, x30 stays");
        assert_eq!(w1 >> 26, 0b00_0101, "b imm26: {w1:#x}");
        let off = (((w1 & 0x03ff_ffff) << 6) as i32 >> 4) as i64;
        assert_eq!((t + 4).wrapping_add(off as u64), v2);
    }
    #[cfg(klp_arch = "ppc64le")]
    {
        let [w0, _] = ppc_site_words(t);
        assert_eq!(w0 & 0xfc00_0003, 0x4800_0000, "b: {w0:#x}");
        let off = (((w0 & 0x03ff_fffc) << 6) as i32 >> 6) as i64;
        let local = p.symbols().lookup(v2).map(|(_, s)| s.st_other >> 5);
        let local = match local {
            Some(3) => v2 + 8,
            _ => v2,
        };
        assert_eq!((t + 8).wrapping_add(off as u64), local, "v2's local entry");
    }
    #[cfg(klp_arch = "s390x")]
    {
        let b = site_bytes(t);
        assert_eq!(b[..2], [0xc0, 0xf4], "jg");
        let d = i32::from_be_bytes([b[2], b[3], b[4], b[5]]);
        assert_eq!(t.wrapping_add((i64::from(d) * 2) as u64), v2);
    }
    assert_eq!(klp_redirect_target(1), 102);
    assert_eq!(
        many(),
        -many_expected(),
        "arguments reach the replacement untouched"
    );
    let log = log_after(p, since);
    assert!(
        log.contains("livepatch: 'lp_r1': patching complete"),
        "{log}"
    );

    p.disable("lp_r1").expect("disable");
    assert!(p.wait_transition(WAIT), "{}", log_after(p, since));
    assert_eq!(klp_redirect_target(1), 2);
    assert_eq!(many(), many_expected());
    assert_eq!(site_bytes(t), before, "the site is restored");
    assert_eq!(p.site_state(t), None);
    assert!(p.with_core(|_, h| h.retargeted_callers(t)).is_empty());
    let callers_after: Vec<[u8; 6]> = callers.iter().map(|c| code_bytes(*c)).collect();
    assert_eq!(callers_after, callers_before, "the callers are restored");
    wait_gone(p, "lp_r1");
}

/// Six bytes of code at `a`.
fn code_bytes(a: u64) -> [u8; 6] {
    // SAFETY: `a` is a call site in this executable's text, 6 bytes long at most and
    // followed by more text.
    unsafe { std::ptr::read_volatile(a as *const [u8; 6]) }
}

fn cumulative_replace(p: &Process) {
    let before = site_bytes(addr(klp_redirect_target as *const ()));
    p.enable_patch(patch(
        "lp_r2",
        &[("klp_redirect_target", addr(target_v2 as *const ()))],
    ))
    .expect("enable");
    assert!(p.wait_transition(WAIT));
    assert_eq!(klp_redirect_target(1), 102);
    let mut d = patch(
        "lp_r3",
        &[("klp_redirect_target", addr(target_v3 as *const ()))],
    );
    d.replace = true;
    p.enable_patch(d).expect("replace");
    assert!(p.wait_transition(WAIT));
    assert_eq!(klp_redirect_target(1), 1002);
    wait_gone(p, "lp_r2");
    assert_eq!(p.listed(), vec!["lp_r3".to_string()]);
    p.disable("lp_r3").expect("disable");
    assert!(p.wait_transition(WAIT));
    assert_eq!(klp_redirect_target(1), 2);
    wait_gone(p, "lp_r3");
    assert_eq!(site_bytes(addr(klp_redirect_target as *const ())), before);
}

/// Threads call the function in a loop (passing a safe point after each call) while a
/// patch is enabled and disabled: each sees only the old or the new result, switches
/// at most once per transition, and everyone sees the new (old) result once the
/// enabling (disabling) transition is complete.
fn many_threads_during_transitions(p: &Process) {
    // 0: either; 1: must be new; 2: must be old.
    let phase = Arc::new(AtomicU8::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let calls = Arc::new(AtomicU64::new(0));
    let workers: Vec<_> = (0..8u64)
        .map(|i| {
            let (phase, stop, calls) = (phase.clone(), stop.clone(), calls.clone());
            std::thread::spawn(move || {
                let mut last = None;
                let mut flips = 0;
                let mut x = i * 1_000_000;
                while !stop.load(Ordering::Acquire) {
                    let before = phase.load(Ordering::Acquire);
                    x += 1;
                    let r = klp_redirect_target(x);
                    // A phase held over the whole call (a stack check may switch the
                    // thread between reading it and calling).
                    let after = phase.load(Ordering::Acquire);
                    let ph = if before == after { before } else { 0 };
                    let new = match r - x {
                        1 => false,
                        101 => true,
                        d => panic!("unexpected result {d}"),
                    };
                    assert!(ph != 1 || new, "old code after the patch completed");
                    assert!(ph != 2 || !new, "new code after the revert completed");
                    if last.is_some_and(|l| l != new) {
                        flips += 1;
                    }
                    last = Some(new);
                    calls.fetch_add(1, Ordering::Relaxed);
                    klp_user::safe_point();
                }
                flips
            })
        })
        .collect();
    std::thread::sleep(Duration::from_millis(20));
    p.enable_patch(patch(
        "lp_r4",
        &[("klp_redirect_target", addr(target_v2 as *const ()))],
    ))
    .expect("enable");
    assert!(p.wait_transition(WAIT));
    phase.store(1, Ordering::Release);
    std::thread::sleep(Duration::from_millis(20));
    phase.store(0, Ordering::Release);
    p.disable("lp_r4").expect("disable");
    assert!(p.wait_transition(WAIT));
    phase.store(2, Ordering::Release);
    std::thread::sleep(Duration::from_millis(20));
    stop.store(true, Ordering::Release);
    for w in workers {
        let flips = w.join().expect("worker");
        assert!(flips <= 2, "{flips} switches");
    }
    assert!(calls.load(Ordering::Relaxed) > 100);
    wait_gone(p, "lp_r4");
    assert_eq!(
        klp_redirect_robust_check(),
        0,
        "decisions for unregistered threads: {}, idle threads in a transition: {}",
        klp_user::redirect::unregistered_calls(),
        klp_user::redirect::anomalies()
    );
}

/// No decision was taken for a thread klp does not know, and none found an idle
/// thread in a transition.
fn klp_redirect_robust_check() -> u64 {
    klp_user::redirect::unregistered_calls() + klp_user::redirect::anomalies()
}

fn a_parked_thread_blocks_the_transition(p: &Process) {
    let since = p.log().1;
    let parked = Parked::start(klp_redirect_parked);
    p.enable_patch(patch(
        "lp_park",
        &[("klp_redirect_parked", addr(parked_v2 as *const ()))],
    ))
    .expect("enable");
    assert!(!p.wait_transition(Duration::from_millis(300)));
    let st = p.status().expect("in transition");
    let b = st
        .blockers
        .iter()
        .find(|b| b.thread.tid == parked.tid)
        .unwrap_or_else(|| panic!("the parked thread blocks: {st:?}"));
    match &b.reason {
        klp_user::BlockReason::SleepingOn { func, .. } => assert_eq!(func, "klp_redirect_parked"),
        other => panic!("{other:?}"),
    }
    assert!(
        b.frame_symbol
            .as_deref()
            .is_some_and(|s| s.starts_with("klp_redirect_parked+")),
        "{b:?}"
    );
    assert_eq!(b.thread.state, PatchState::Unpatched);
    let f = addr(klp_redirect_parked as *const ());
    assert_eq!(p.site_state(f), Some(SiteKind::Trampoline), "in transition");
    #[cfg(klp_arch = "x86_64")]
    assert_eq!(site_bytes(f)[0], 0xe9, "the site jumps to its stub");
    #[cfg(klp_arch = "aarch64")]
    {
        let [w0, w1] = site_words(f);
        assert_eq!(w0, 0xaa1e_03e9, "mov x9, x30");
        assert_eq!(w1 >> 26, 0b10_0101, "bl imm26 (the trampoline): {w1:#x}");
    }
    #[cfg(klp_arch = "ppc64le")]
    {
        let [w0, w1] = ppc_site_words(f);
        assert_eq!(w0, 0x7c08_02a6, "mflr r0");
        assert_eq!(
            w1 & 0xfc00_0003,
            0x4800_0001,
            "bl (the trampoline): {w1:#x}"
        );
    }
    #[cfg(klp_arch = "s390x")]
    assert_eq!(
        site_bytes(f)[..2],
        [0xc0, 0x05],
        "brasl %r0 (the trampoline)"
    );
    // The others are switched: new calls from this thread run the new code.
    assert_eq!(klp_redirect_parked(1), 102);
    // It leaves the old body with the old result; the transition completes.
    assert_eq!(parked.finish(), 2);
    assert!(p.wait_transition(WAIT), "{}", log_after(p, since));
    assert_eq!(klp_redirect_parked(1), 102);
    p.disable("lp_park").expect("disable");
    assert!(p.wait_transition(WAIT));
    assert_eq!(klp_redirect_parked(1), 2);
    wait_gone(p, "lp_park");
}

fn force_completes_a_blocked_transition(p: &Process) {
    let since = p.log().1;
    let parked = Parked::start(klp_redirect_forced);
    p.enable_patch(patch(
        "lp_force",
        &[("klp_redirect_forced", addr(parked_v2 as *const ()))],
    ))
    .expect("enable");
    assert!(!p.wait_transition(Duration::from_millis(300)));
    p.force("lp_force").expect("force");
    assert!(p.wait_transition(WAIT));
    assert!(
        log_after(p, since).contains("livepatch: forcing remaining tasks to the patched state"),
        "{}",
        log_after(p, since)
    );
    assert_eq!(parked.finish(), 2, "it was inside the old body");
    assert_eq!(klp_redirect_forced(1), 102);
    p.disable("lp_force").expect("disable");
    assert!(p.wait_transition(WAIT));
    assert_eq!(klp_redirect_forced(1), 2);
}

#[test]
// Not under ThreadSanitizer (ci/test's TSan run): it defers klp's stop signal to its
// own safe points and runs the handler with the context saved when the signal arrived,
// so the stack checks this test waits for find stale registers or no answer (threads
// in a blocking call): they stay unreliable and the transition never completes.
#[cfg_attr(
    klp_tsan,
    ignore = "ThreadSanitizer defers signals: stack checks see stale contexts"
)]
fn functions_of_the_process_are_redirected() {
    let p = host::init();
    redirect_and_revert(p);
    cumulative_replace(p);
    many_threads_during_transitions(p);
    a_parked_thread_blocks_the_transition(p);
    force_completes_a_blocked_transition(p);
    assert_eq!(p.warnings(), 0, "{:?}", p.log().0);
}
