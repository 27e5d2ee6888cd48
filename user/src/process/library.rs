//! Shared objects opened and closed as modules, in the kernel's module order.

use std::ffi::CString;
use std::sync::Arc;

use klp::Errno;

use super::{Process, lock};
use crate::stack;
use crate::symbols::Changes;

/// A loaded shared object, opened through [`Process::dlopen`].
#[derive(Debug)]
pub struct Library {
    handle: usize,
    /// Its module name.
    pub name: String,
}

impl Library {
    /// `dlclose`s the library, telling the core first that the module goes (the
    /// kernel's order: a module's patches are removed before its memory is freed). If
    /// the object stays loaded for other users, it comes back at once.
    pub fn close(self, p: &Process) -> Changes {
        // SAFETY: `handle` came from a successful `dlopen` and is closed once (`self` is
        // consumed); `libc::dlclose` is the C library's.
        unsafe { p.close_library(self.handle as *mut libc::c_void, libc::dlclose) }.1
    }
}

impl Process {
    /// Closes a library handle with `close` (the C library's `dlclose`, or the one an
    /// interposer found), in the kernel's module-removal order: if this close unloads
    /// the object, its patches are removed and its livepatch relocations cleared while
    /// its code is still mapped; then it is closed; if it is in fact still loaded (other
    /// handles hold it), it arrives again. Returns what `close` returned and the modules
    /// that went (or arrived).
    ///
    /// # Safety
    ///
    /// 1. `handle` is a handle `dlopen` returned that has not been closed.
    /// 2. `close` is `dlclose` (or behaves like it on `handle`).
    pub unsafe fn close_library(
        &self,
        handle: *mut libc::c_void,
        close: unsafe extern "C" fn(*mut libc::c_void) -> libc::c_int,
    ) -> (libc::c_int, Changes) {
        let path = library_path(handle);
        let name = path.as_deref().map(crate::symbols::module_name);
        let tracked = name
            .as_deref()
            .is_some_and(|n| lock(&self.core).host.index.has_module(n));
        if let (true, Some(n)) = (tracked, name.as_deref()) {
            self.with_core(|klp, host| klp.module_going(host, n));
        }
        // SAFETY: conditions 1 and 2.
        let r = unsafe { close(handle) };
        let mut changes = Changes::default();
        if let (true, Some(n), Some(path)) = (tracked, name.as_deref(), path.as_deref()) {
            let still = still_loaded(path);
            if !still {
                changes.removed.push(n.to_string());
            }
            self.with_core(|klp, host| {
                let (idx, _) = host.index.refresh();
                host.index = Arc::new(idx);
                stack::forget_code();
                if still && let Err(e) = klp.module_coming(host, n) {
                    host.line(format!(
                        "klp-user: {n} stays loaded but its patches could not be applied again ({})",
                        e.to_kernel()
                    ));
                }
            });
        } else {
            changes = self.refresh_modules().0;
        }
        (r, changes)
    }
}

/// The path of the object a `dlopen` handle refers to (`dlinfo`'s link map).
fn library_path(handle: *mut libc::c_void) -> Option<String> {
    let mut map: *mut libc::c_void = std::ptr::null_mut();
    // SAFETY: `handle` is an open handle (the caller's condition); RTLD_DI_LINKMAP
    // stores a `struct link_map *` into `map`.
    let r = unsafe {
        libc::dlinfo(
            handle,
            libc::RTLD_DI_LINKMAP,
            (&mut map as *mut *mut libc::c_void).cast(),
        )
    };
    if r != 0 || map.is_null() {
        return None;
    }
    // SAFETY: glibc's `struct link_map` starts with `l_addr` then `l_name`, a
    // NUL-terminated string owned by the dynamic linker while the object is loaded.
    let name = unsafe { *(map as *const *const libc::c_char).add(1) };
    if name.is_null() {
        return None;
    }
    // SAFETY: as above.
    let s = unsafe { std::ffi::CStr::from_ptr(name) }
        .to_string_lossy()
        .into_owned();
    (!s.is_empty()).then_some(s)
}

/// Whether the object at `path` is still loaded (`dlopen` with `RTLD_NOLOAD`).
fn still_loaded(path: &str) -> bool {
    let Ok(c) = CString::new(path) else {
        return false;
    };
    // SAFETY: `c` is NUL-terminated; RTLD_NOLOAD loads nothing, it only finds.
    let h = unsafe { libc::dlopen(c.as_ptr(), libc::RTLD_NOW | libc::RTLD_NOLOAD) };
    if h.is_null() {
        return false;
    }
    // SAFETY: `h` balances the reference RTLD_NOLOAD took.
    unsafe { libc::dlclose(h) };
    true
}

impl Process {
    /// `dlopen`s a shared object and announces it to the core (patches for it apply
    /// now). If the core refuses it, the library is closed again and the error
    /// returned, like a module whose load fails.
    pub fn dlopen(&self, path: &str) -> Result<Library, Errno> {
        let c = CString::new(path).map_err(|_| Errno::EINVAL)?;
        // SAFETY: `c` is a NUL-terminated path; loading runs the object's constructors,
        // which is what the caller asks for.
        let h = unsafe { libc::dlopen(c.as_ptr(), libc::RTLD_NOW | libc::RTLD_LOCAL) };
        if h.is_null() {
            lock(&self.log).push(format!("klp-user: dlopen '{path}' failed"));
            return Err(Errno::ENOENT);
        }
        let name = crate::symbols::module_name(path);
        let (_, refused) = self.refresh_modules();
        if let Some((_, e)) = refused.into_iter().find(|(m, _)| *m == name) {
            // SAFETY: `h` came from the successful `dlopen` above and is closed once.
            unsafe { libc::dlclose(h) };
            self.refresh_modules();
            return Err(e);
        }
        Ok(Library {
            handle: h as usize,
            name,
        })
    }
}
