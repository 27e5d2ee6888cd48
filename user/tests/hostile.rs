//! Hostile inputs and faults on the user host (issue 15, part 4). Each test documents
//! the behaviour it shows; RELIABILITY.md lists them with their outcome.
//!
//! The host is process-wide, so the tests take turns (`serial`).
//!
//! Under ThreadSanitizer (ci/test's TSan run) only the tests that need no stack check
//! of another thread run: it defers klp's stop signal to its own safe points and runs
//! the handler with the context saved when the signal arrived (see RELIABILITY.md), so
//! transitions held by a check never complete there.

#[path = "common/park.rs"]
mod park;
#[path = "common/scratch.rs"]
mod scratch;

#[path = "common/host.rs"]
mod host;

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, mpsc};
use std::time::{Duration, Instant};

use klp::{Errno, FuncDesc, ObjectDesc, PatchDesc, PatchState};
use klp_user::ctl::{ServeOptions, klpctl, request};
use klp_user::{BlockReason, Process, ProcessHost, thread};
use park::{Parker, maybe_park};
use serde_json::{Value, json};

/// Every bounded wait of these tests: generous, for loaded machines and QEMU.
const WAIT: Duration = Duration::from_secs(120);

/// The turn of one test; if the test fails, what it left enabled is forced away, so
/// that the next test starts from no patch.
struct Turn(#[allow(dead_code)] MutexGuard<'static, ()>);

impl Drop for Turn {
    fn drop(&mut self) {
        if std::thread::panicking() {
            let p = Process::global();
            for x in p.list() {
                let _ = p.disable(&x.name);
                let _ = p.force(&x.name);
                let _ = p.wait_transition(WAIT);
                p.run_due_work();
            }
            klp_user::redirect::fail_text_write(0, 0);
        }
    }
}

fn serial() -> Turn {
    static SERIAL: Mutex<()> = Mutex::new(());
    Turn(SERIAL.lock().unwrap_or_else(|e| e.into_inner()))
}

klp_user::patchable! {
    /// The function the tests patch (parks when the calling thread asked to).
    pub fn klp_hostile_f(x: u64) -> u64 {
        maybe_park();
        std::hint::black_box(x) + 1
    }
}

extern "C" fn f_v2(x: u64) -> u64 {
    maybe_park();
    std::hint::black_box(x) + 2
}

klp_user::patchable! {
    /// Reads one byte from the pipe `fd`: a thread blocked in `read` inside a
    /// patched function.
    pub fn klp_hostile_read(fd: i32) -> u64 {
        let mut b = [0u8; 1];
        // SAFETY: `b` is writable for one byte.
        let n = unsafe { libc::read(fd, b.as_mut_ptr().cast(), 1) };
        std::hint::black_box(n as u64) + 10
    }
}

extern "C" fn read_v2(fd: i32) -> u64 {
    let _ = fd;
    20
}

fn patch_f(name: &str) -> PatchDesc<ProcessHost> {
    PatchDesc::new(name).object(
        ObjectDesc::vmlinux().func(FuncDesc::new("klp_hostile_f", f_v2 as *const () as u64)),
    )
}

fn patch_read(name: &str) -> PatchDesc<ProcessHost> {
    PatchDesc::new(name).object(ObjectDesc::vmlinux().func(FuncDesc::new(
        "klp_hostile_read",
        read_v2 as *const () as u64,
    )))
}

/// Disables `name`, forcing it if a blocker stays, and waits until it is gone.
fn remove(p: &Process, name: &str) {
    if p.list().iter().any(|x| x.name == name && x.enabled) {
        p.disable(name).expect("disable");
    }
    if !p.wait_transition(Duration::from_secs(10)) {
        p.force(name).expect("force");
        assert!(p.wait_transition(WAIT), "{:?}", p.log().0);
    }
    let deadline = Instant::now() + WAIT;
    while p.list().iter().any(|x| x.name == name) && Instant::now() < deadline {
        p.run_due_work();
        std::thread::sleep(Duration::from_millis(10));
    }
    assert!(!p.list().iter().any(|x| x.name == name), "{name} is freed");
}

fn all_idle(p: &Process) -> bool {
    p.threads()
        .iter()
        .all(|t| t.state == PatchState::Idle && !t.pending)
}

/// The descriptors of this process that an `exec` keeps (no close-on-exec flag).
fn inherited_fds() -> Vec<i32> {
    std::fs::read_dir("/proc/self/fd")
        .expect("/proc/self/fd")
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
        .filter(|&fd| {
            // SAFETY: F_GETFD only reads the descriptor's flags (an error for a
            // descriptor closed meanwhile).
            let fl = unsafe { libc::fcntl(fd, libc::F_GETFD) };
            fl >= 0 && fl & libc::FD_CLOEXEC == 0
        })
        .collect()
}

fn pipe() -> (i32, i32) {
    let mut fds = [0; 2];
    // SAFETY: `fds` is a valid out-parameter for two descriptors.
    assert_eq!(unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) }, 0);
    (fds[0], fds[1])
}

fn close(fd: i32) {
    // SAFETY: `fd` is a descriptor this test opened and closes once.
    unsafe { libc::close(fd) };
}

/// Blocks klp's signal in the calling thread.
fn block_klp_signal() {
    // SAFETY: a zeroed sigset is initialised by sigemptyset; blocking one signal in this
    // thread has no other effect.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, klp_user::stack::signal_number());
        libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
    }
}

/// A thread that exits while it is being checked: a transition is held open by a
/// thread parked in the patched function, and threads are created and exit without
/// pause while the core stops every thread for its checks (its retries and `status`,
/// which check each unswitched thread). A thread may exit after it was signalled,
/// between its capture and its release, or before its stack is read. No check may
/// hang, crash or report an exited thread as a blocker for long; the transition then
/// completes when the parked thread leaves.
#[test]
#[cfg_attr(
    klp_tsan,
    ignore = "ThreadSanitizer defers signals: stack checks of other threads see stale contexts or no answer"
)]
fn a_thread_that_exits_while_being_checked() {
    let _s = serial();
    let p = host::init();
    let parker = Parker::start(|| klp_hostile_f(1), WAIT);
    p.enable_patch(patch_f("hostile_exit")).expect("enable");
    let stop = Arc::new(AtomicBool::new(false));
    let created = Arc::new(AtomicU64::new(0));
    let churn: Vec<_> = (0..2)
        .map(|_| {
            let (stop, created) = (stop.clone(), created.clone());
            std::thread::spawn(move || {
                while !stop.load(Ordering::Acquire) {
                    let h = std::thread::spawn(|| {
                        // A little work, then exit: some exit while held, some while
                        // being signalled.
                        let mut x = 0u64;
                        for i in 0..1000 {
                            x = x.wrapping_add(std::hint::black_box(i));
                        }
                        x
                    });
                    let _ = h.join();
                    created.fetch_add(1, Ordering::Relaxed);
                }
            })
        })
        .collect();
    let t0 = Instant::now();
    let mut checks = 0;
    while t0.elapsed() < Duration::from_secs(3) || checks < 10 {
        let t = Instant::now();
        p.retry_now();
        let st = p.status().expect("the transition runs");
        assert!(t.elapsed() < WAIT, "a check hung for {:?}", t.elapsed());
        assert!(
            st.blockers.iter().any(|b| b.thread.tid == parker.tid),
            "{st:?}"
        );
        checks += 1;
    }
    stop.store(true, Ordering::Release);
    for c in churn {
        c.join().expect("churn");
    }
    assert_eq!(parker.finish(), 2, "the parked call ran the old function");
    assert!(p.wait_transition(WAIT), "{:?}", p.log().0);
    assert_eq!(klp_hostile_f(1), 3);
    remove(p, "hostile_exit");
    assert_eq!(p.warnings(), 0, "{:?}", p.log().0);
    eprintln!(
        "exit while checked: {} threads created and exited during {checks} check rounds",
        created.load(Ordering::Relaxed)
    );
}

/// A thread blocked in a system call (`read` on a pipe nobody writes) for the whole
/// transition. Its stack can be checked (the signal interrupts the call, which is
/// restarted): if it holds no patched function, the transition completes without it
/// ever returning; if it is blocked inside the patched function, the transition waits,
/// `blockers` (klpctl status) names it as sleeping on that function, and the
/// transition completes once the call returns.
#[test]
#[cfg_attr(
    klp_tsan,
    ignore = "ThreadSanitizer defers signals: stack checks of other threads see stale contexts or no answer"
)]
fn a_thread_blocked_in_a_system_call_for_the_whole_transition() {
    let _s = serial();
    let p = host::init();
    // Blocked outside patched code.
    let (rd, wr) = pipe();
    let returned = Arc::new(AtomicBool::new(false));
    let r2 = returned.clone();
    let (tid_tx, tid_rx) = mpsc::channel();
    let h = std::thread::spawn(move || {
        tid_tx.send(thread::register_current().tid()).ok();
        let mut b = [0u8; 1];
        // SAFETY: `b` is writable for one byte.
        let n = unsafe { libc::read(rd, b.as_mut_ptr().cast(), 1) };
        r2.store(true, Ordering::Release);
        n
    });
    let tid = tid_rx.recv().expect("tid");
    std::thread::sleep(Duration::from_millis(50));
    p.enable_patch(patch_f("hostile_syscall")).expect("enable");
    assert!(p.wait_transition(WAIT), "{:?}", p.status());
    assert!(
        !returned.load(Ordering::Acquire),
        "the read is still blocked"
    );
    let t = p
        .threads()
        .into_iter()
        .find(|t| t.tid == tid)
        .expect("the reader");
    // Switched by its stack check (the transition is over: every thread is idle).
    assert_eq!((t.state, t.pending), (PatchState::Idle, false));
    assert_eq!(klp_hostile_f(1), 3);
    remove(p, "hostile_syscall");
    assert!(
        !returned.load(Ordering::Acquire),
        "the read is still blocked"
    );
    // SAFETY: one byte from a valid buffer.
    assert_eq!(unsafe { libc::write(wr, [7u8].as_ptr().cast(), 1) }, 1);
    assert_eq!(
        h.join().expect("reader"),
        1,
        "the restarted read got the byte"
    );
    close(rd);
    close(wr);

    // Blocked inside the patched function.
    let (rd, wr) = pipe();
    let (tid_tx, tid_rx) = mpsc::channel();
    let h = std::thread::spawn(move || {
        tid_tx.send(thread::register_current().tid()).ok();
        klp_hostile_read(rd)
    });
    let tid = tid_rx.recv().expect("tid");
    std::thread::sleep(Duration::from_millis(100));
    let dir = sock_dir("syscall");
    let path = dir.join("s.sock");
    let server = p
        .serve(ServeOptions {
            path: Some(path.clone()),
            ..ServeOptions::default()
        })
        .expect("serve");
    p.enable_patch(patch_read("hostile_read")).expect("enable");
    assert!(!p.wait_transition(Duration::from_secs(3)), "it must wait");
    let st = p.status().expect("the transition waits");
    let b = st
        .blockers
        .iter()
        .find(|b| b.thread.tid == tid)
        .expect("the reader blocks it");
    assert!(
        matches!(&b.reason, BlockReason::SleepingOn { func, .. } if func == "klp_hostile_read"),
        "{b:?}"
    );
    let mut out = String::new();
    let args: Vec<String> = ["--socket", &path.display().to_string(), "status"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    assert_eq!(klpctl(&args, &mut out), 0, "{out}");
    assert!(
        out.contains(&format!(":{tid} sleeping on function klp_hostile_read")),
        "{out}"
    );
    // SAFETY: one byte from a valid buffer.
    assert_eq!(unsafe { libc::write(wr, [7u8].as_ptr().cast(), 1) }, 1);
    assert_eq!(
        h.join().expect("reader"),
        11,
        "the old function's read returned"
    );
    assert!(p.wait_transition(WAIT), "{:?}", p.status());
    assert_eq!(klp_hostile_read(-1), 20);
    remove(p, "hostile_read");
    drop(server);
    close(rd);
    close(wr);
    assert_eq!(p.warnings(), 0, "{:?}", p.log().0);
}

/// What a forked child checks, as its exit status (0: all fine).
fn child_checks(p: &Process, before: (PatchState, bool)) -> i32 {
    let me = thread::current_record().expect("registered");
    // SAFETY: `gettid` has no preconditions.
    let tid = unsafe { libc::gettid() };
    let threads = p.threads();
    if threads.len() != 1 || threads[0].tid != tid || me.tid() != tid {
        return 10;
    }
    if (me.patch_state(), me.pending()) != before {
        return 11;
    }
    // The child runs what its state says, and switches at its safe point.
    let want = if me.patch_state() == PatchState::Patched {
        3
    } else {
        2
    };
    if klp_hostile_f(1) != want {
        return 12;
    }
    thread::safe_point();
    if me.patch_state() != PatchState::Patched || me.pending() || klp_hostile_f(1) != 3 {
        return 13;
    }
    // klp's locks are free: a core operation and a thread creation.
    if p.status().is_none_or(|s| s.total != 1) {
        return 14;
    }
    // Not under ThreadSanitizer (it does not support threads started after a
    // multi-threaded fork) nor under qemu-user (creating a thread in the child of a
    // multi-threaded guest aborts the emulator itself: "cpu_exec: assertion failed:
    // (cpu == current_cpu)").
    #[cfg(not(klp_tsan))]
    if !under_qemu_user() {
        let r = std::thread::spawn(|| {
            let r = thread::current_record().map(|r| r.patch_state());
            (r, klp_hostile_f(1))
        })
        .join();
        if !matches!(r, Ok((Some(PatchState::Patched), 3))) {
            return 15;
        }
    }
    0
}

/// Whether this runs under qemu-user, which does not implement `process_vm_readv`.
fn under_qemu_user() -> bool {
    let mut b = [0u8; 1];
    let src = [1u8; 1];
    let local = libc::iovec {
        iov_base: b.as_mut_ptr().cast(),
        iov_len: 1,
    };
    let remote = libc::iovec {
        iov_base: src.as_ptr() as *mut libc::c_void,
        iov_len: 1,
    };
    // SAFETY: both iovecs describe one valid byte of this process.
    let r = unsafe { libc::process_vm_readv(libc::getpid(), &local, 1, &remote, 1, 0) };
    r < 0 && std::io::Error::last_os_error().raw_os_error() == Some(libc::ENOSYS)
}

/// Waits for child `pid` at most `d`; kills it after. `Some(status)` if it exited.
fn wait_child(pid: libc::pid_t, d: Duration) -> Option<i32> {
    let t0 = Instant::now();
    loop {
        let mut st = 0;
        // SAFETY: `st` is a valid out-parameter.
        let r = unsafe { libc::waitpid(pid, &mut st, libc::WNOHANG) };
        if r == pid {
            return Some(if libc::WIFEXITED(st) {
                libc::WEXITSTATUS(st)
            } else {
                128 + libc::WTERMSIG(st)
            });
        }
        if t0.elapsed() > d {
            // SAFETY: `pid` is our child.
            unsafe {
                libc::kill(pid, libc::SIGKILL);
                libc::waitpid(pid, &mut st, 0);
            }
            return None;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// What the forking thread of [`fork_and_exec_during_a_transition`] found: per fork,
/// its state before and the child's status; the exec'd shell's status and output.
type ForkResults = (Vec<((PatchState, bool), Option<i32>)>, Option<i32>, String);

/// Forks [`FORKS`] children that run [`child_checks`], then one that execs a shell.
fn forks(me: &thread::ThreadRecord) -> ForkResults {
    let mut results = Vec::new();
    for _ in 0..FORKS {
        let before = (me.patch_state(), me.pending());
        // SAFETY: the child runs the checks and leaves with `_exit`, never returning
        // into the test harness.
        let pid = unsafe { libc::fork() };
        if pid == 0 {
            let code = child_checks(Process::global(), before);
            // SAFETY: ends the child without running the parent's exit handlers.
            unsafe { libc::_exit(code) };
        }
        assert!(pid > 0, "fork: {}", std::io::Error::last_os_error());
        results.push((before, wait_child(pid, WAIT)));
    }
    // exec: a child runs a shell that lists its descriptors.
    let (rd, wr) = pipe();
    // SAFETY: as above; the child only calls async-signal-safe functions.
    let pid = unsafe { libc::fork() };
    if pid == 0 {
        // SAFETY: `dup2` and `execl` with NUL-terminated strings; `_exit` if exec
        // fails.
        unsafe {
            libc::dup2(wr, 1);
            libc::execl(
                c"/bin/sh".as_ptr(),
                c"sh".as_ptr(),
                c"-c".as_ptr(),
                c"ls /proc/self/fd".as_ptr(),
                std::ptr::null::<libc::c_char>(),
            );
            libc::_exit(127);
        }
    }
    close(wr);
    let mut out = String::new();
    // SAFETY: `rd` is our pipe's read end, owned by the `File` from here on.
    let mut f = unsafe { <std::fs::File as std::os::fd::FromRawFd>::from_raw_fd(rd) };
    f.read_to_string(&mut out).ok();
    (results, wait_child(pid, WAIT), out)
}

const FORKS: usize = 20;

/// `fork` during a transition, from a thread that has not switched yet (it blocks
/// klp's signal, so its state stays put), while other threads keep taking klp's locks
/// (core operations, thread creation). klp's `pthread_atfork` handlers take its locks
/// around the fork: the child has one thread, its registry lists that thread alone with
/// the child's thread id and the parent thread's patch state and pending flag; it runs
/// the function its state selects, switches at its safe point, and can run core
/// operations and create threads (no lock is left held by a thread that does not
/// exist in it). Then `exec` during a transition: a child execs a shell that lists its
/// open descriptors; klp leaves none open across `exec` (its socket and pipes are
/// close-on-exec), and the parent's transition is not disturbed.
#[test]
#[cfg_attr(
    klp_tsan,
    ignore = "ThreadSanitizer defers signals: stack checks of other threads see stale contexts or no answer"
)]
fn fork_and_exec_during_a_transition() {
    let _s = serial();
    let p = host::init();
    let parker = Parker::start(|| klp_hostile_f(1), WAIT);
    let dir = sock_dir("fork");
    let server = p
        .serve(ServeOptions {
            path: Some(dir.join("s.sock")),
            ..ServeOptions::default()
        })
        .expect("serve");
    let (go_tx, go_rx) = mpsc::channel::<()>();
    let (ready_tx, ready_rx) = mpsc::channel::<()>();
    let forker = std::thread::spawn(move || {
        block_klp_signal();
        let me = thread::register_current();
        ready_tx.send(()).ok();
        let _ = go_rx.recv();
        forks(&me)
    });
    ready_rx.recv().expect("the forker is ready");
    p.enable_patch(patch_f("hostile_fork")).expect("enable");
    go_tx.send(()).ok();
    let stop = Arc::new(AtomicBool::new(false));
    let hammers: Vec<_> = (0..3)
        .map(|i| {
            let stop = stop.clone();
            std::thread::spawn(move || {
                while !stop.load(Ordering::Acquire) {
                    match i {
                        0 => {
                            let _ = Process::global().status();
                        }
                        1 => {
                            let _ = std::thread::spawn(|| klp_hostile_f(1)).join();
                        }
                        _ => {
                            let _ = (Process::global().threads(), Process::global().list());
                        }
                    }
                }
            })
        })
        .collect();
    let (results, exec_status, fds) = forker.join().expect("forker");
    stop.store(true, Ordering::Release);
    for h in hammers {
        h.join().expect("hammer");
    }
    for (i, (before, r)) in results.iter().enumerate() {
        assert_eq!(
            *r,
            Some(0),
            "fork {i} (state before {before:?}): child status (None: deadlocked, killed \
             after {WAIT:?}; 10: registry, 11: state, 12: old/new code, 13: safe point, \
             14: core, 15: thread creation)"
        );
    }
    assert!(
        results
            .iter()
            .all(|(b, _)| *b == (PatchState::Unpatched, true)),
        "the forker had not switched: {results:?}"
    );
    assert_eq!(exec_status, Some(0), "exec'd shell");
    // Beside 0, 1, 2 and the directory `ls` reads, only what this process inherited
    // without close-on-exec (from whoever started the tests) may be open.
    let inherited = inherited_fds();
    let extra: Vec<i32> = fds
        .split_whitespace()
        .filter_map(|f| f.parse().ok())
        .filter(|f| *f > 2 && !inherited.contains(f))
        .collect();
    assert_eq!(
        extra.len(),
        1,
        "only ls's directory: {fds:?} (inherited {inherited:?})"
    );
    // The parent's transition went on undisturbed.
    let st = p.status().expect("still in transition");
    assert!(st.blockers.iter().any(|b| b.thread.tid == parker.tid));
    assert_eq!(parker.finish(), 2);
    assert!(p.wait_transition(WAIT), "{:?}", p.status());
    remove(p, "hostile_fork");
    drop(server);
    assert_eq!(p.warnings(), 0, "{:?}", p.log().0);
}

static IN_HANDLER: AtomicBool = AtomicBool::new(false);
static LEAVE_HANDLER: AtomicBool = AtomicBool::new(false);

extern "C" fn slow_handler(_: libc::c_int) {
    IN_HANDLER.store(true, Ordering::Release);
    while !LEAVE_HANDLER.load(Ordering::Acquire) {
        let ts = libc::timespec {
            tv_sec: 0,
            tv_nsec: 1_000_000,
        };
        // SAFETY: `nanosleep` is async-signal-safe; `ts` is valid.
        unsafe { libc::nanosleep(&ts, std::ptr::null_mut()) };
    }
    IN_HANDLER.store(false, Ordering::Release);
}

/// A signal handler of the program whose `sa_mask` holds klp's signal, and which runs
/// for the whole transition: the thread cannot answer a stack check. klp does not
/// hang: enabling returns, the transition waits and `status` reports the thread (as
/// running — natively `/proc` shows the signal blocked; under qemu-user, which keeps
/// guest masks to itself, as not answering), `force` completes it, and once the
/// handler returns the thread runs the new function.
static PROBE_INSIDE: AtomicBool = AtomicBool::new(false);
static PROBE_SEEN_INSIDE: AtomicBool = AtomicBool::new(false);
static PROBE_SEEN: AtomicBool = AtomicBool::new(false);

extern "C" fn probe_outer(_sig: libc::c_int) {
    PROBE_INSIDE.store(true, Ordering::SeqCst);
    // SAFETY: `raise` is async-signal-safe; SIGWINCH has `probe_inner` as handler.
    unsafe { libc::raise(libc::SIGWINCH) };
    PROBE_INSIDE.store(false, Ordering::SeqCst);
}

extern "C" fn probe_inner(_sig: libc::c_int) {
    PROBE_SEEN.store(true, Ordering::SeqCst);
    if PROBE_INSIDE.load(Ordering::SeqCst) {
        PROBE_SEEN_INSIDE.store(true, Ordering::SeqCst);
    }
}

/// Whether a handler's `sa_mask` holds back the signals it names while it runs (the
/// kernel does; qemu-riscv64 7.2 does not): a handler of SIGURG that blocks SIGWINCH
/// raises SIGWINCH, which must arrive only once it has returned. The dispositions are
/// put back afterwards.
fn handlers_apply_their_mask() -> bool {
    // SAFETY: all-zero `sigaction`s are valid; the handlers only touch atomics and
    // call `raise`; SIGURG and SIGWINCH are ignored by default and unused by the tests.
    unsafe {
        let mut outer: libc::sigaction = std::mem::zeroed();
        let mut inner: libc::sigaction = std::mem::zeroed();
        let (mut old_outer, mut old_inner): (libc::sigaction, libc::sigaction) =
            (std::mem::zeroed(), std::mem::zeroed());
        outer.sa_sigaction = probe_outer as *const () as usize;
        libc::sigemptyset(&mut outer.sa_mask);
        libc::sigaddset(&mut outer.sa_mask, libc::SIGWINCH);
        inner.sa_sigaction = probe_inner as *const () as usize;
        libc::sigemptyset(&mut inner.sa_mask);
        libc::sigaction(libc::SIGWINCH, &inner, &mut old_inner);
        libc::sigaction(libc::SIGURG, &outer, &mut old_outer);
        PROBE_SEEN.store(false, Ordering::SeqCst);
        PROBE_SEEN_INSIDE.store(false, Ordering::SeqCst);
        libc::raise(libc::SIGURG);
        libc::sigaction(libc::SIGURG, &old_outer, std::ptr::null_mut());
        libc::sigaction(libc::SIGWINCH, &old_inner, std::ptr::null_mut());
    }
    PROBE_SEEN.load(Ordering::SeqCst) && !PROBE_SEEN_INSIDE.load(Ordering::SeqCst)
}

#[test]
fn a_signal_handler_that_blocks_klps_signal() {
    let _s = serial();
    if !handlers_apply_their_mask() {
        eprintln!(
            "skipped: this platform does not hold back the signals a handler's sa_mask \
             names (an emulator's limit: qemu-riscv64 7.2), which this test is about"
        );
        return;
    }
    let p = host::init();
    // SAFETY: an all-zero `sigaction` is valid; the handler only uses atomics and
    // `nanosleep`; SIGUSR2 is not used by the test harness.
    unsafe {
        let mut sa: libc::sigaction = std::mem::zeroed();
        sa.sa_sigaction = slow_handler as *const () as usize;
        libc::sigemptyset(&mut sa.sa_mask);
        libc::sigaddset(&mut sa.sa_mask, klp_user::stack::signal_number());
        assert_eq!(libc::sigaction(libc::SIGUSR2, &sa, std::ptr::null_mut()), 0);
    }
    IN_HANDLER.store(false, Ordering::Release);
    LEAVE_HANDLER.store(false, Ordering::Release);
    let (tid_tx, tid_rx) = mpsc::channel();
    let (go_tx, go_rx) = mpsc::channel::<()>();
    let h = std::thread::spawn(move || {
        tid_tx.send(thread::register_current().tid()).ok();
        let _ = go_rx.recv();
        klp_hostile_f(1)
    });
    let tid = tid_rx.recv().expect("tid");
    // SAFETY: `tgkill` of our own thread with a handled signal.
    unsafe { libc::syscall(libc::SYS_tgkill, libc::getpid(), tid, libc::SIGUSR2) };
    let t0 = Instant::now();
    while !IN_HANDLER.load(Ordering::Acquire) {
        assert!(t0.elapsed() < WAIT, "the handler runs");
        std::thread::sleep(Duration::from_millis(5));
    }
    let t = Instant::now();
    p.enable_patch(patch_f("hostile_sigmask")).expect("enable");
    assert!(!p.wait_transition(Duration::from_secs(3)), "it must wait");
    let st = p.status().expect("waiting");
    let b = st
        .blockers
        .iter()
        .find(|b| b.thread.tid == tid)
        .expect("the thread in the handler is reported");
    assert!(
        b.reason == BlockReason::Running || b.detail.as_deref() == Some("NoAnswer"),
        "{b:?}"
    );
    p.force("hostile_sigmask").expect("force");
    assert!(p.wait_transition(WAIT), "{:?}", p.status());
    eprintln!(
        "signal handler: enable, wait, status, force took {:?}",
        t.elapsed()
    );
    LEAVE_HANDLER.store(true, Ordering::Release);
    go_tx.send(()).ok();
    assert_eq!(h.join().expect("thread"), 3, "forced: the new function");
    remove(p, "hostile_sigmask");
    assert_eq!(p.warnings(), 0, "{:?}", p.log().0);
}

/// `mprotect(2)` refusing to make text writable (injected with
/// `redirect::fail_text_write`, which fails the call as the kernel would, with
/// `ENOMEM`; RLIMIT_DATA would do it for real but also fail the allocator, and
/// qemu-user ignores it). Enabling fails with `-ENOMEM`, the log says what failed with
/// the errno in brackets and a remedy, and everything is as it was: no patch listed,
/// every thread idle, the function's code unchanged. The same after a first text write
/// succeeded (the failure on a later one). Then a patch enables normally.
#[test]
#[cfg_attr(
    klp_tsan,
    ignore = "ThreadSanitizer defers signals: stack checks of other threads see stale contexts or no answer"
)]
fn mprotect_failing_leaves_everything_as_it_was() {
    let _s = serial();
    let p = host::init();
    let f = klp_hostile_f as *const () as u64;
    let code = || {
        // SAFETY: the function's first 16 bytes are mapped text.
        unsafe { std::slice::from_raw_parts(f as *const u8, 16) }.to_vec()
    };
    let before = code();
    for skip in [0, 1] {
        let since = p.log().1;
        klp_user::redirect::fail_text_write(skip, libc::ENOMEM);
        let r = p.enable_patch(patch_f("hostile_mprotect"));
        klp_user::redirect::fail_text_write(0, 0);
        let log = p.log_since(since).join("\n");
        if skip == 1 && r.is_ok() {
            // One text write sufficed on this architecture: the failure did not come.
            remove(p, "hostile_mprotect");
            continue;
        }
        assert_eq!(r, Err(Errno::ENOMEM), "{log}");
        assert!(
            log.contains("klp-user: cannot patch 'klp_hostile_f' at 0x")
                && log.contains(
                    "the kernel refused to make its text writable (mprotect) [ENOMEM]; free \
                     memory or raise the data size limit (ulimit -d); nothing was changed"
                )
                && log.contains(
                    "failed to register ftrace handler for function 'klp_hostile_f' (-12)"
                ),
            "{log}"
        );
        assert!(p.list().is_empty(), "{:?}", p.list());
        assert!(all_idle(p));
        assert!(p.site_state(f).is_none());
        assert_eq!(code(), before, "the text is unchanged");
        assert_eq!(klp_hostile_f(1), 2);
    }
    p.enable_patch(patch_f("hostile_mprotect")).expect("enable");
    assert!(p.wait_transition(WAIT));
    assert_eq!(klp_hostile_f(1), 3);
    remove(p, "hostile_mprotect");
    assert_eq!(klp_hostile_f(1), 2);
    assert_eq!(p.warnings(), 0, "{:?}", p.log().0);
}

fn sock_dir(tag: &str) -> PathBuf {
    scratch::scratch_dir(&format!("klp-hostile-{tag}"))
}

fn connect(path: &Path) -> UnixStream {
    let s = UnixStream::connect(path).expect("connect");
    s.set_read_timeout(Some(WAIT)).expect("timeout");
    s
}

/// Reads one answer line (`None` at the end of the stream), a byte at a time so that
/// nothing of the next answer is read ahead and lost.
fn answer(s: &UnixStream) -> Option<Value> {
    let mut line = Vec::new();
    let mut b = [0u8; 1];
    loop {
        match (&*s).read(&mut b) {
            Ok(0) => break,
            Ok(_) if b[0] == b'\n' => break,
            Ok(_) => line.push(b[0]),
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => break,
            Err(e) => panic!("read an answer: {e}"),
        }
    }
    (!line.is_empty()).then(|| serde_json::from_slice(&line).expect("an answer is JSON"))
}

/// Whether the server closed the connection: the end of the stream, or a reset when
/// it closed with bytes of ours unread.
fn closed(s: &UnixStream) -> bool {
    let mut b = [0u8; 1];
    match (&*s).read(&mut b) {
        Ok(n) => n == 0,
        Err(e) => e.kind() == std::io::ErrorKind::ConnectionReset,
    }
}

/// 100 control clients at once while a transition runs (held by a thread parked in
/// the patched function), with three clients that drip a request one byte a second
/// and never finish it (they would stall a server that reads connections one after
/// another with a per-read timeout). Every client gets a correct answer (`list`:
/// the patch in transition; `status`: the parked thread sleeping on the function;
/// `threads`: it pending), and no answer waits for the slow clients.
#[test]
#[cfg_attr(
    klp_tsan,
    ignore = "ThreadSanitizer defers signals: stack checks of other threads see stale contexts or no answer"
)]
fn a_hundred_control_clients_during_a_transition() {
    let _s = serial();
    let p = host::init();
    let dir = sock_dir("clients");
    let path = dir.join("s.sock");
    let server = p
        .serve(ServeOptions {
            path: Some(path.clone()),
            request_timeout: Some(WAIT),
            ..ServeOptions::default()
        })
        .expect("serve");
    let parker = Parker::start(|| klp_hostile_f(1), WAIT);
    p.enable_patch(patch_f("hostile_clients")).expect("enable");
    let stop = Arc::new(AtomicBool::new(false));
    let drips: Vec<_> = (0..3)
        .map(|_| {
            let (path, stop) = (path.clone(), stop.clone());
            std::thread::spawn(move || {
                let mut s = connect(&path);
                for b in br#"{"op":"list"  "#.iter().cycle() {
                    if stop.load(Ordering::Acquire) || s.write_all(&[*b]).is_err() {
                        break;
                    }
                    std::thread::sleep(Duration::from_millis(500));
                }
            })
        })
        .collect();
    std::thread::sleep(Duration::from_millis(200));
    let t0 = Instant::now();
    let clients: Vec<_> = (0..100)
        .map(|i| {
            let path = path.clone();
            let tid = parker.tid;
            std::thread::spawn(move || {
                let op = ["list", "status", "threads"][i % 3];
                let v = request(&path, &json!({"op": op})).expect("an answer");
                let ok = match op {
                    "list" => v[0]["name"] == "hostile_clients" && v[0]["transition"] == true,
                    "status" => {
                        v["patch"] == "hostile_clients"
                            && v["blockers"].as_array().is_some_and(|b| {
                                b.iter().any(|b| {
                                    b["tid"] == json!(tid)
                                        && b["reason"] == "sleeping_on"
                                        && b["function"] == "klp_hostile_f"
                                })
                            })
                    }
                    _ => v.as_array().is_some_and(|t| {
                        t.iter()
                            .any(|t| t["tid"] == json!(tid) && t["pending"] == true)
                    }),
                };
                if !ok {
                    eprintln!("wrong answer to {op}: {v}");
                }
                ok
            })
        })
        .collect();
    let correct = clients
        .into_iter()
        .map(|c| c.join().expect("client"))
        .filter(|&ok| ok)
        .count();
    let took = t0.elapsed();
    stop.store(true, Ordering::Release);
    for d in drips {
        d.join().expect("drip");
    }
    eprintln!("100 clients: {correct} correct answers in {took:?}");
    assert_eq!(correct, 100);
    assert!(took < WAIT, "{took:?}");
    assert_eq!(parker.finish(), 2);
    assert!(p.wait_transition(WAIT));
    remove(p, "hostile_clients");
    drop(server);
}

/// Control requests that are too large, malformed, or left half-sent. A line longer
/// than `MAX_REQUEST` (64 KiB) gets a `bad_request` error and the connection is closed
/// (whether or not its newline ever comes); malformed JSON and bytes that are not UTF-8
/// get a `bad_request` error and the connection stays usable; a client that stops
/// mid-request (and keeps its socket open), or connects and sends nothing, is dropped
/// once the request timeout passes — with an error line in the first case. Meanwhile
/// another client is answered at once.
#[test]
fn oversized_malformed_and_half_sent_requests() {
    let _s = serial();
    let p = host::init();
    let dir = sock_dir("requests");
    let path = dir.join("s.sock");
    let timeout = Duration::from_secs(2);
    let server = p
        .serve(ServeOptions {
            path: Some(path.clone()),
            request_timeout: Some(timeout),
            ..ServeOptions::default()
        })
        .expect("serve");
    let t0 = Instant::now();
    let mut half = connect(&path);
    half.write_all(br#"{"op":"li"#).expect("write");
    let silent = connect(&path);
    // Too large, without a newline.
    let mut big = connect(&path);
    let chunk = vec![b' '; 100 * 1024];
    let _ = big.write_all(&chunk);
    let e = answer(&big).expect("an error");
    assert_eq!(e["error"]["kind"], "bad_request", "{e}");
    assert!(
        e["error"]["message"]
            .as_str()
            .is_some_and(|m| m.contains("longer than 65536 bytes")),
        "{e}"
    );
    assert!(closed(&big));
    // Too large, with a newline (1 MiB, written while the server reads).
    let mut big = connect(&path);
    let w = {
        let mut b2 = big.try_clone().expect("clone");
        std::thread::spawn(move || {
            let mut line = vec![b'x'; 1 << 20];
            line.push(b'\n');
            let _ = b2.write_all(&line);
        })
    };
    let e = answer(&big).expect("an error");
    assert_eq!(e["error"]["kind"], "bad_request", "{e}");
    w.join().expect("writer");
    let _ = big.write_all(b"\n");
    assert!(closed(&big));
    // Malformed JSON, then not UTF-8, then a good request on the same connection.
    let mut m = connect(&path);
    m.write_all(b"{\"op\": \"list\",,}\n\xff\xfe\n{\"op\":\"list\"}\n")
        .expect("write");
    let e = answer(&m).expect("an error");
    assert_eq!(e["error"]["kind"], "bad_request", "{e}");
    assert!(
        e["error"]["message"]
            .as_str()
            .is_some_and(|m| m.starts_with("the request is not JSON (")),
        "{e}"
    );
    let e = answer(&m).expect("an error");
    assert_eq!(e["error"]["kind"], "bad_request", "{e}");
    assert!(
        e["error"]["message"]
            .as_str()
            .is_some_and(|m| m.contains("UTF-8")),
        "{e}"
    );
    let ok = answer(&m).expect("an answer");
    assert_eq!(ok["ok"], true, "{ok}");
    // Meanwhile, an ordinary client is answered before the stalled ones time out.
    let r = request(&path, &json!({"op": "list"}));
    assert!(r.is_ok(), "{r:?}");
    let quick = t0.elapsed();
    // The half-sent request: an error, then the end; the silent client: the end.
    let e = answer(&half).unwrap_or_else(|| panic!("an error line after {:?}", t0.elapsed()));
    assert_eq!(e["error"]["kind"], "bad_request", "{e}");
    assert!(
        e["error"]["message"]
            .as_str()
            .is_some_and(|m| m.contains("was not complete after 2 s")),
        "{e}"
    );
    assert!(closed(&half));
    assert!(closed(&silent));
    let dropped = t0.elapsed();
    eprintln!(
        "requests: answered beside stalled clients after {quick:?}, stalled ones dropped after {dropped:?}"
    );
    assert!(dropped >= timeout && dropped < WAIT, "{dropped:?}");
    // The server still serves.
    let r = request(&path, &json!({"op": "threads"}));
    assert!(r.is_ok(), "{r:?}");
    drop(server);
}
