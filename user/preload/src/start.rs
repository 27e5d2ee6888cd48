//! The main thread as a task: an interposed `__libc_start_main`.
//!
//! A thread's stack check is complete only when the walk reaches the thread's recorded
//! entry frame. Threads made by `pthread_create` get one from klp-user's interposer;
//! the main thread starts in the C library, before any code of the program. So the
//! program's `_start` calls this `__libc_start_main` (an `LD_PRELOAD`ed definition
//! comes first in the symbol search), which hands the C library's own (found with
//! `dlsym(RTLD_NEXT, …)`) a `main` of its own: [`klp_main`] calls the program's `main`
//! inside klp-user's [`entry_frame`], whose frame ends every walk of the main thread
//! ([`klp_user::thread::run_as_task`] does the same, but catches unwinding, which
//! `pthread_exit` in `main` needs to pass).
//!
//! The signatures are the C library's: the generic one (x86_64, aarch64, s390x) takes
//! `main` first; the powerpc one takes it inside a `struct startup_info` (the sixth
//! argument), and calls it with the auxiliary vector as a fourth argument.

use std::ffi::{c_char, c_int, c_void};
use std::sync::atomic::{AtomicUsize, Ordering};

use klp_user::thread::{entry_frame, set_entry_frame};

/// The program's `main` (its address; 0 until `__libc_start_main` ran).
static REAL_MAIN: AtomicUsize = AtomicUsize::new(0);

/// `main`'s type as the C library calls it (the fourth argument is the auxiliary
/// vector on powerpc, and absent elsewhere: passing it to a `main` that does not
/// take it is harmless in the C calling conventions).
pub type Main =
    unsafe extern "C" fn(c_int, *mut *mut c_char, *mut *mut c_char, *mut c_void) -> c_int;

/// Writes `msg` to stderr without allocating (the C library may not be able to print
/// yet) and aborts: the program cannot start without the C library's
/// `__libc_start_main`.
fn fatal(msg: &str) -> ! {
    // SAFETY: `msg` is valid for `msg.len()` bytes; `write` and `abort` have no other
    // preconditions.
    unsafe {
        libc::write(2, msg.as_ptr().cast(), msg.len());
        libc::abort()
    }
}

/// The C library's `__libc_start_main`, as an address.
fn real_start() -> usize {
    // SAFETY: `dlsym` with `RTLD_NEXT` and a NUL-terminated name is always sound.
    let p = unsafe { libc::dlsym(libc::RTLD_NEXT, c"__libc_start_main".as_ptr()) } as usize;
    if p == 0 || p == __libc_start_main as *const () as usize {
        fatal(
            "libklp: the C library's __libc_start_main cannot be found; the program cannot start.\n",
        );
    }
    p
}

/// The arguments of `main`, handed to [`main_body`] through [`entry_frame`].
#[repr(C)]
struct MainCall {
    main: Main,
    argc: c_int,
    argv: *mut *mut c_char,
    envp: *mut *mut c_char,
    auxv: *mut c_void,
}

/// Records the entry frame of the main thread. A function of its own, `extern "C"`
/// (so it cannot unwind into [`main_body`]), and gone from the stack before `main`
/// runs.
extern "C" fn record_entry(frame: *mut c_void) {
    let _ = std::panic::catch_unwind(|| {
        set_entry_frame(frame as u64);
        watch_main_exit();
    });
}

/// A `main` that calls `pthread_exit` ends the main thread only: the process ends
/// when its last thread does. klp's own service threads (the worker, the control
/// server) never end, so without help such a process would never exit. A key with a
/// destructor is set on the main thread: the C library runs the destructor when the
/// main thread exits as a thread (never on `exit`), and it waits there until every
/// other thread of the program (klp's own aside) has ended, then calls `exit(0)`, as
/// the C library does when the last thread ends.
fn watch_main_exit() {
    static KEY: std::sync::OnceLock<Option<libc::pthread_key_t>> = std::sync::OnceLock::new();
    let key = KEY.get_or_init(|| {
        let mut k: libc::pthread_key_t = 0;
        // SAFETY: `k` is a valid out-parameter; `main_exited` has the destructor's type
        // and stays valid for the life of the process.
        (unsafe { libc::pthread_key_create(&mut k, Some(main_exited)) } == 0).then_some(k)
    });
    if let Some(k) = *key {
        // SAFETY: `k` is a key created above; the value is only a non-null marker.
        unsafe { libc::pthread_setspecific(k, std::ptr::dangling::<u8>().cast()) };
    }
}

/// The main thread's key destructor (see [`watch_main_exit`]). The main thread runs no
/// program code any more: it passes a safe point on each round, so transitions do not
/// wait for it, and its old entry frame (now gone) is forgotten.
unsafe extern "C" fn main_exited(_: *mut c_void) {
    let _ = std::panic::catch_unwind(|| {
        set_entry_frame(0);
        // SAFETY: `gettid` has no preconditions.
        let me = unsafe { libc::gettid() };
        loop {
            klp_user::safe_point();
            let others = klp_user::thread::threads()
                .iter()
                .any(|r| r.alive() && !r.is_kthread() && r.tid() != me);
            if !others {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
    });
    // SAFETY: `exit` runs the process's exit handlers, as the C library does when the
    // last thread ends.
    unsafe { libc::exit(0) }
}

/// The body run inside the entry frame: records the frame, then calls the program's
/// `main`. It holds no Rust frame that could catch an unwinding: `main` may call
/// `pthread_exit`, whose forced unwind must pass through to the C library, which ends
/// it at the entry frame (that frame has no unwind information, the "end of stack" at
/// which glibc's unwinder jumps to `__libc_start_call_main`'s exit path). Every call
/// here is to an `extern "C"` function, which cannot unwind, so the function needs no
/// landing pad.
extern "C" fn main_body(data: *mut c_void, frame: *mut c_void) -> *mut c_void {
    record_entry(frame);
    // SAFETY: `data` is the `MainCall` of `klp_main`, alive during this call.
    let call = unsafe { &*(data as *const MainCall) };
    // SAFETY: the C library's own arguments for `main`, passed on unchanged.
    let r = unsafe { (call.main)(call.argc, call.argv, call.envp, call.auxv) };
    r as isize as *mut c_void
}

/// The `main` the C library calls: the program's, inside an entry frame (the same as
/// [`klp_user::thread::run_as_task`], without its `catch_unwind`, which would turn a
/// `pthread_exit` of the main thread into an abort).
///
/// # Safety
///
/// Called by the C library with `main`'s arguments, after [`REAL_MAIN`] was set.
unsafe extern "C" fn klp_main(
    argc: c_int,
    argv: *mut *mut c_char,
    envp: *mut *mut c_char,
    auxv: *mut c_void,
) -> c_int {
    let p = REAL_MAIN.load(Ordering::Acquire);
    if p == 0 {
        fatal("libklp: the program's main is not known; the program cannot start.\n");
    }
    // SAFETY: `p` is the non-null `main` the program's `_start` passed to
    // `__libc_start_main`, a function of type `Main` (see `Main` about the fourth
    // argument).
    let main = unsafe { std::mem::transmute::<usize, Main>(p) };
    let mut call = MainCall {
        main,
        argc,
        argv,
        envp,
        auxv,
    };
    // SAFETY: `main_body` has the signature `entry_frame` expects and does not unwind
    // (`extern "C"`); `call` outlives the call (conditions 1 and 2).
    let r = unsafe { entry_frame(main_body, (&mut call as *mut MainCall).cast()) };
    r as isize as c_int
}

/// The generic `__libc_start_main` (glibc's `csu/libc-start.c`).
///
/// # Safety
///
/// Called only by the program's `_start`, with the C library's arguments: `main` is
/// the program's `main`, the rest is passed on unchanged.
#[cfg(not(target_arch = "powerpc64"))]
#[unsafe(no_mangle)]
pub unsafe extern "C" fn __libc_start_main(
    main: Option<Main>,
    argc: c_int,
    argv: *mut *mut c_char,
    init: *mut c_void,
    fini: *mut c_void,
    rtld_fini: *mut c_void,
    stack_end: *mut c_void,
) -> c_int {
    type Start = unsafe extern "C" fn(
        Option<Main>,
        c_int,
        *mut *mut c_char,
        *mut c_void,
        *mut c_void,
        *mut c_void,
        *mut c_void,
    ) -> c_int;
    // SAFETY: `real_start` is the C library's `__libc_start_main`, of this type.
    let real = unsafe { std::mem::transmute::<usize, Start>(real_start()) };
    let main = match main {
        Some(m) => {
            REAL_MAIN.store(m as usize, Ordering::Release);
            Some(klp_main as Main)
        }
        None => None,
    };
    // SAFETY: the caller's arguments, with `main` replaced by a function of the same
    // type that calls it.
    unsafe { real(main, argc, argv, init, fini, rtld_fini, stack_end) }
}

/// powerpc's `struct startup_info` (glibc's `sysdeps/unix/sysv/linux/powerpc/libc-start.c`).
#[cfg(target_arch = "powerpc64")]
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct StartupInfo {
    /// The small-data area base (unused on ppc64).
    pub sda_base: *mut c_void,
    /// The program's `main`.
    pub main: Option<Main>,
    /// The program's `init` (unused since glibc 2.34).
    pub init: *mut c_void,
    /// The program's `fini` (unused since glibc 2.34).
    pub fini: *mut c_void,
}

/// powerpc's `__libc_start_main`: `main` is in `stinfo`.
///
/// # Safety
///
/// Called only by the program's `_start`, with the C library's arguments; `stinfo`
/// is null or points to the program's `startup_info`.
#[cfg(target_arch = "powerpc64")]
#[unsafe(no_mangle)]
pub unsafe extern "C" fn __libc_start_main(
    argc: c_int,
    argv: *mut *mut c_char,
    envp: *mut *mut c_char,
    auxv: *mut c_void,
    rtld_fini: *mut c_void,
    stinfo: *const StartupInfo,
    stack_on_entry: *mut *mut c_char,
) -> c_int {
    type Start = unsafe extern "C" fn(
        c_int,
        *mut *mut c_char,
        *mut *mut c_char,
        *mut c_void,
        *mut c_void,
        *const StartupInfo,
        *mut *mut c_char,
    ) -> c_int;
    // SAFETY: `real_start` is the C library's `__libc_start_main`, of this type.
    let real = unsafe { std::mem::transmute::<usize, Start>(real_start()) };
    let mut info = stinfo;
    if !stinfo.is_null() {
        // SAFETY: `stinfo` is non-null and points to the program's `startup_info`.
        let mut copy = unsafe { *stinfo };
        if let Some(m) = copy.main {
            REAL_MAIN.store(m as usize, Ordering::Release);
            copy.main = Some(klp_main as Main);
            // The C library reads it during this call; leaked so that it outlives it.
            info = Box::leak(Box::new(copy));
        }
    }
    // SAFETY: the caller's arguments, with `main` replaced (in a copy of its
    // `startup_info`) by a function of the same type that calls it.
    unsafe { real(argc, argv, envp, auxv, rtld_fini, info, stack_on_entry) }
}

/// Whether this process's `main` was started through [`__libc_start_main`].
pub fn main_is_wrapped() -> bool {
    REAL_MAIN.load(Ordering::Acquire) != 0
}

#[cfg(test)]
mod tests {
    use super::*;
    use klp::Host;

    /// The test harness is a program like any other: its `_start` calls this crate's
    /// `__libc_start_main` (linked into it), so its main thread, which waits for the
    /// tests' threads, is a task with an entry frame, and its stack check passes.
    #[test]
    fn the_main_thread_is_a_task_with_an_entry_frame() {
        assert!(
            main_is_wrapped(),
            "main was not started through the interposer"
        );
        let pid = std::process::id() as i32;
        let main = klp_user::thread::find_tid(pid).expect("the main thread is registered");
        assert_ne!(main.entry_frame(), 0, "no entry frame recorded");
        let (low, high) = main.stack();
        assert!(low < main.entry_frame() && main.entry_frame() < high);
        let mut buf = vec![0u64; 512];
        let r = crate::process().with_core(|_, h| h.stack_trace_reliable(main.id, &mut buf));
        let why = crate::process().with_core(|_, h| h.last_failure(main.id));
        assert!(matches!(r, Ok(n) if n > 0), "{r:?} {why:?}");
    }
}
