//! Libraries as modules: interposed `dlopen`, `dlclose` and `dlerror`.
//!
//! The livepatch core must hear of every shared object that arrives (the kernel's
//! "module coming": patches for it are applied before it runs) and of every one that
//! goes. After the C library's `dlopen` succeeds, [`dlopen`] re-indexes the loaded
//! objects ([`klp_user::Process::refresh_modules`]); if the core refuses the library it
//! opened (a patch for it cannot be applied), the library is closed again and `dlopen`
//! returns `NULL`, with the reason for [`dlerror`]. [`dlclose`] goes through
//! [`klp_user::Process::close_library`]: if the close unloads the library, the core
//! removes its patches while its code is still mapped (the kernel's order), and a
//! library that other handles keep loaded comes back at once.
//!
//! The C library's functions are found with `dlsym(RTLD_NEXT, …)`. One effect of any
//! `dlopen` interposer: the C library sees the call as made from this library, so a
//! bare file name is not searched in the *caller's* `DT_RPATH`/`DT_RUNPATH` (and
//! `$ORIGIN` in a `dlopen` argument is this library's directory); `LD_LIBRARY_PATH`,
//! the cache, the default directories and paths with a `/` are unaffected.

use std::cell::RefCell;
use std::ffi::{CStr, CString, c_char, c_int, c_void};
use std::sync::atomic::{AtomicUsize, Ordering};

use klp::{Host, Level, Record};

use crate::process;

/// The public part of the C library's `struct link_map` (`<link.h>`).
#[repr(C)]
struct LinkMap {
    l_addr: usize,
    l_name: *const c_char,
    l_ld: *mut c_void,
    l_next: *mut LinkMap,
    l_prev: *mut LinkMap,
}

/// Looks up the C library's `name` after this library (once; cached in `slot`).
fn next(slot: &AtomicUsize, name: &CStr, ours: usize) -> Option<usize> {
    let p = slot.load(Ordering::Acquire);
    if p != 0 {
        return Some(p);
    }
    // SAFETY: `dlsym` with `RTLD_NEXT` and a NUL-terminated name is always sound.
    let p = unsafe { libc::dlsym(libc::RTLD_NEXT, name.as_ptr()) } as usize;
    if p == 0 || p == ours {
        return None;
    }
    slot.store(p, Ordering::Release);
    Some(p)
}

type DlOpen = unsafe extern "C" fn(*const c_char, c_int) -> *mut c_void;
type DlClose = unsafe extern "C" fn(*mut c_void) -> c_int;
type DlError = unsafe extern "C" fn() -> *mut c_char;

static REAL_DLOPEN: AtomicUsize = AtomicUsize::new(0);
static REAL_DLCLOSE: AtomicUsize = AtomicUsize::new(0);
static REAL_DLERROR: AtomicUsize = AtomicUsize::new(0);

fn real_dlopen() -> Option<DlOpen> {
    let p = next(&REAL_DLOPEN, c"dlopen", dlopen as *const () as usize)?;
    // SAFETY: `p` is the C library's `dlopen`, of this type.
    Some(unsafe { std::mem::transmute::<usize, DlOpen>(p) })
}

fn real_dlclose() -> Option<DlClose> {
    let p = next(&REAL_DLCLOSE, c"dlclose", dlclose as *const () as usize)?;
    // SAFETY: `p` is the C library's `dlclose`, of this type.
    Some(unsafe { std::mem::transmute::<usize, DlClose>(p) })
}

fn real_dlerror() -> Option<DlError> {
    let p = next(&REAL_DLERROR, c"dlerror", dlerror as *const () as usize)?;
    // SAFETY: `p` is the C library's `dlerror`, of this type.
    Some(unsafe { std::mem::transmute::<usize, DlError>(p) })
}

thread_local! {
    /// This thread's error from an interposed call, not yet returned by `dlerror`.
    static PENDING: RefCell<Option<CString>> = const { RefCell::new(None) };
    /// The last error `dlerror` returned from here (valid until the next call, as the
    /// C library's).
    static RETURNED: RefCell<Option<CString>> = const { RefCell::new(None) };
}

fn set_error(msg: String) {
    let c = CString::new(msg.replace('\0', " ")).ok();
    let _ = PENDING.try_with(|p| *p.borrow_mut() = c);
}

fn clear_error() {
    let _ = PENDING.try_with(|p| p.borrow_mut().take());
}

/// The module name of the object behind a `dlopen` handle (`None` for the main
/// program and objects without a name).
fn module_of(handle: *mut c_void) -> Option<(String, String)> {
    let mut map: *mut LinkMap = std::ptr::null_mut();
    // SAFETY: `handle` is a live handle from the C library's `dlopen`;
    // `RTLD_DI_LINKMAP` writes a `struct link_map *` into `map`.
    let r = unsafe {
        libc::dlinfo(
            handle,
            libc::RTLD_DI_LINKMAP,
            (&mut map as *mut *mut LinkMap).cast(),
        )
    };
    if r != 0 || map.is_null() {
        return None;
    }
    // SAFETY: `map` is the object's link map, alive while the handle is open; its
    // `l_name` is null or a NUL-terminated string owned by the dynamic linker.
    let name = unsafe { (*map).l_name };
    if name.is_null() {
        return None;
    }
    // SAFETY: see above.
    let path = unsafe { CStr::from_ptr(name) }
        .to_string_lossy()
        .into_owned();
    if path.is_empty() {
        return None;
    }
    Some((klp_user::symbols::module_name(&path), path))
}

/// Re-indexes the loaded objects (the core hears of every module that arrived or went)
/// and logs what changed, one line per module, in the process's log (and on stderr
/// with `KLP_LOG=stderr`). Returns the modules the core refused.
fn refresh() -> Vec<(String, klp::Errno)> {
    let (changes, refused) = process().refresh_modules();
    announce(&changes);
    refused
}

/// Logs the modules that arrived and went.
fn announce(changes: &klp_user::symbols::Changes) {
    if changes.added.is_empty() && changes.removed.is_empty() {
        return;
    }
    process().with_core(|_, host| {
        let line = |host: &mut klp_user::ProcessHost, args: std::fmt::Arguments<'_>| {
            host.log(&Record {
                level: Level::Info,
                func: "dlopen",
                prefix: "libklp: ",
                args,
            })
        };
        for m in &changes.added {
            line(host, format_args!("module '{m}' loaded"));
        }
        for m in &changes.removed {
            line(host, format_args!("module '{m}' unloaded"));
        }
    });
}

/// After a successful `dlopen`: tells the core, and returns the refusal of the opened
/// library's module, if the core refused it.
fn arrived(handle: *mut c_void) -> Option<(String, String, i32)> {
    let refused = refresh();
    let (module, path) = module_of(handle)?;
    refused
        .into_iter()
        .find(|(m, _)| *m == module)
        .map(|(m, e)| (m, path, e.0))
}

/// Whether a core operation runs on this thread (a callback that opens a library):
/// the core is locked, so the library is announced later (at the next `dlopen` or
/// `dlclose`, or by whoever refreshes the modules).
fn in_core() -> bool {
    klp_user::thread::in_core_operation()
}

/// The interposed `dlopen`: the C library's, then the core hears of the library (see
/// the module documentation). A library the core refuses is closed again and `NULL`
/// returned; [`dlerror`] then says why.
///
/// # Safety
///
/// The C library's `dlopen`: `filename` is null or a NUL-terminated string; loading
/// runs the object's constructors.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn dlopen(filename: *const c_char, flags: c_int) -> *mut c_void {
    clear_error();
    let Some(real) = real_dlopen() else {
        set_error("libklp: the C library's dlopen cannot be found".into());
        return std::ptr::null_mut();
    };
    // SAFETY: the caller's arguments, passed on.
    let h = unsafe { real(filename, flags) };
    if h.is_null() || flags & libc::RTLD_NOLOAD != 0 || in_core() {
        return h;
    }
    let refused = std::panic::catch_unwind(|| arrived(h)).unwrap_or(None);
    let Some((module, path, errno)) = refused else {
        return h;
    };
    if let Some(close) = real_dlclose() {
        // SAFETY: `h` is the handle the C library just returned, closed once here.
        unsafe { close(h) };
        let _ = std::panic::catch_unwind(refresh);
    }
    let name = klp::Errno(errno)
        .name()
        .map_or_else(|| format!("-{errno}"), |n| format!("-{n}"));
    set_error(format!(
        "{path}: a livepatch for module '{module}' could not be applied ({name}); the library was not loaded"
    ));
    std::ptr::null_mut()
}

/// The interposed `dlclose`: the C library's, then the core lets go of the library if
/// it was unloaded.
///
/// # Safety
///
/// The C library's `dlclose`: `handle` came from `dlopen` and is closed once.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn dlclose(handle: *mut c_void) -> c_int {
    clear_error();
    let Some(real) = real_dlclose() else {
        set_error("libklp: the C library's dlclose cannot be found".into());
        return -1;
    };
    if in_core() {
        // SAFETY: the caller's handle, passed on.
        return unsafe { real(handle) };
    }
    // SAFETY: the caller's handle (condition 1 of `close_library`), closed by the C
    // library's `dlclose` (condition 2).
    let closed = std::panic::catch_unwind(|| unsafe { process().close_library(handle, real) });
    let Ok((r, changes)) = closed else {
        return -1;
    };
    let _ = std::panic::catch_unwind(|| announce(&changes));
    r
}

/// The interposed `dlerror`: the reason of this thread's last refused `dlopen` if it
/// was not returned yet, else the C library's answer.
///
/// # Safety
///
/// None beyond the C library's: the string is valid until the thread's next
/// `dlerror` call.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn dlerror() -> *mut c_char {
    let ours = PENDING.try_with(|p| p.borrow_mut().take()).ok().flatten();
    if let Some(msg) = ours {
        // The C library's own pending error (none after a successful call) is older.
        if let Some(real) = real_dlerror() {
            // SAFETY: the C library's `dlerror` has no preconditions.
            unsafe { real() };
        }
        let p = RETURNED
            .try_with(|r| {
                let mut r = r.borrow_mut();
                *r = Some(msg);
                r.as_ref()
                    .map_or(std::ptr::null_mut(), |c| c.as_ptr().cast_mut())
            })
            .unwrap_or(std::ptr::null_mut());
        return p;
    }
    match real_dlerror() {
        // SAFETY: the C library's `dlerror` has no preconditions.
        Some(real) => unsafe { real() },
        None => std::ptr::null_mut(),
    }
}
