//! Scratch directories of a test binary: in the system's temporary directory (control
//! sockets need a short path), one per name and process, removed when the binary
//! exits. `KLP_KEEP_TEST_DIRS=1` keeps them, to look at a failure's files.

use std::path::PathBuf;
use std::sync::{Mutex, Once};

static DIRS: Mutex<Vec<PathBuf>> = Mutex::new(Vec::new());
static AT_EXIT: Once = Once::new();

extern "C" fn remove_all() {
    if std::env::var_os("KLP_KEEP_TEST_DIRS").is_some_and(|v| v == "1") {
        return;
    }
    let dirs = std::mem::take(&mut *DIRS.lock().unwrap_or_else(|e| e.into_inner()));
    for d in dirs {
        let _ = std::fs::remove_dir_all(d);
    }
}

/// `<tmp>/<name>-<pid>`, created (empty if it was left by an earlier process with this
/// pid) and removed at exit.
pub fn scratch_dir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("{name}-{}", std::process::id()));
    let mut dirs = DIRS.lock().unwrap_or_else(|e| e.into_inner());
    if !dirs.contains(&d) {
        let _ = std::fs::remove_dir_all(&d);
        dirs.push(d.clone());
    }
    drop(dirs);
    std::fs::create_dir_all(&d).expect("scratch dir");
    AT_EXIT.call_once(|| {
        // SAFETY: `remove_all` is an `extern "C" fn()` that does not unwind (it ignores
        // every error and a poisoned lock), as `atexit` requires.
        let rc = unsafe { libc::atexit(remove_all) };
        assert_eq!(rc, 0, "atexit");
    });
    d
}
