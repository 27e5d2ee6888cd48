//! # libklp.so — klp's user-space host for programs that do not know about klp
//!
//! `LD_PRELOAD=libklp.so ./program` makes an unmodified, dynamically linked program
//! live-patchable: its threads become the tasks of the livepatch core, its executable
//! is *vmlinux* and its shared objects are modules ([`klp_user`]), and `klpctl` controls
//! it over its control socket. See `user/preload/README.md` for how to build a program
//! for it and what each part does; in short:
//!
//! * **on load** ([`init`], an `.init_array` constructor): the process host is created
//!   ([`klp_user::Process::init`], configured from the environment: [`config`]) and the
//!   control socket is served for the life of the process;
//! * **the main thread is a task** ([`start`]): the C library's `__libc_start_main` is
//!   interposed, and the program's `main` runs inside an entry frame that ends its stack
//!   walks, so a main thread that waits in `pthread_join` does not hold transitions up;
//!   threads created with `pthread_create` are tasks through klp-user's interposer,
//!   which this library exports;
//! * **libraries are modules** ([`dl`]): `dlopen` and `dlclose` are interposed, and the
//!   core hears of every library that arrives or goes (patches for a library take
//!   effect when it loads; one the core refuses makes `dlopen` fail);
//! * **a C API** ([`api`], `include/klp.h`): `klp_safe_point`, `klp_load_patch`,
//!   `klp_enable`, `klp_disable`, `klp_version`.
//!
//! No function of this library unwinds into its C caller: each catches panics (and
//! none is expected), and checks its pointers.

pub mod api;
pub mod dl;
pub mod start;

use std::ffi::CString;
use std::path::PathBuf;
use std::sync::OnceLock;

use klp_user::ctl::{ServeOptions, Server};
use klp_user::stack::{CheckOptions, WalkPolicy};
use klp_user::{Config, Process};

/// The environment variables this library reads (once, when it is loaded).
pub mod env {
    /// `stderr`: every log line of the livepatch core and of the host is copied to
    /// stderr (the lines are always kept in the process's log ring).
    pub const LOG: &str = "KLP_LOG";
    /// `1`: the core's debug lines (`pr_debug`) are logged too (dynamic debug on).
    pub const DYNDBG: &str = "KLP_DYNDBG";
    /// The control socket's path (`%p` is replaced by the process id); `off`: no
    /// socket. Unset: `$XDG_RUNTIME_DIR/klp-<pid>.sock`, else
    /// `/tmp/klp-<uid>-<pid>.sock` (what `klpctl --pid` connects to).
    pub const SOCKET: &str = "KLP_SOCKET";
    /// `scan` (the default) or `unwinder`: how stack checks are accepted
    /// ([`klp_user::stack::WalkPolicy`]). An unmodified program's C library has no
    /// frame pointers, so the unwinder cannot walk through it (on x86_64 glibc's
    /// `pthread_join` keeps a thread id in `rbp`): the scan is the default here;
    /// `unwinder` suits programs whose every library keeps frame pointers.
    pub const WALK: &str = "KLP_WALK";
}

/// Where the control socket is served.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SocketChoice {
    /// klp-user's default path for this process.
    Default,
    /// This path.
    Path(PathBuf),
    /// No socket.
    Off,
}

/// The settings read from the environment, with the sentences to print about values
/// that were not understood (each is ignored).
#[derive(Clone, Debug)]
pub struct Settings {
    /// The process host's configuration.
    pub config: Config,
    /// The control socket.
    pub socket: SocketChoice,
    /// One sentence per ignored value.
    pub problems: Vec<String>,
}

/// Reads the settings from `get` (the environment, or a table in tests) for process
/// `pid`. See [`env`] for the variables.
pub fn settings_from(get: &dyn Fn(&str) -> Option<String>, pid: u32) -> Settings {
    let mut config = Config {
        checks: CheckOptions {
            policy: WalkPolicy::ScanOnly,
            ..CheckOptions::default()
        },
        ..Config::default()
    };
    let mut problems = Vec::new();
    match get(env::LOG).as_deref() {
        None | Some("") => {}
        Some("stderr") => config.log_stderr = true,
        Some(v) => problems.push(format!(
            "libklp: {}={v:?} is not understood (use \"stderr\"); the log stays in the process's log ring only.",
            env::LOG
        )),
    }
    match get(env::DYNDBG).as_deref() {
        None | Some("" | "0") => {}
        Some("1") => config.dyndbg = true,
        Some(v) => problems.push(format!(
            "libklp: {}={v:?} is not understood (use 1 or 0); dynamic debug stays off.",
            env::DYNDBG
        )),
    }
    match get(env::WALK).as_deref() {
        None | Some("") => {}
        Some("unwinder") => {
            config.checks = CheckOptions {
                policy: WalkPolicy::Unwinder,
                ..config.checks
            }
        }
        Some("scan") => {
            config.checks = CheckOptions {
                policy: WalkPolicy::ScanOnly,
                ..config.checks
            }
        }
        Some(v) => problems.push(format!(
            "libklp: {}={v:?} is not understood (use \"scan\" or \"unwinder\"); stack checks use the scan.",
            env::WALK
        )),
    }
    let socket = match get(env::SOCKET) {
        None => SocketChoice::Default,
        Some(v) if v.is_empty() => SocketChoice::Default,
        Some(v) if v == "off" => SocketChoice::Off,
        Some(v) => SocketChoice::Path(PathBuf::from(v.replace("%p", &pid.to_string()))),
    };
    Settings {
        config,
        socket,
        problems,
    }
}

/// The settings of this process, read from its environment once.
pub fn config() -> &'static Settings {
    static SETTINGS: OnceLock<Settings> = OnceLock::new();
    SETTINGS.get_or_init(|| {
        let get = |k: &str| std::env::var_os(k).map(|v| v.to_string_lossy().into_owned());
        settings_from(&get, std::process::id())
    })
}

/// The process host, created with [`config`] if it does not exist yet (another
/// preloaded library's constructor may call `dlopen` before this library's runs).
pub fn process() -> &'static Process {
    static HOST: OnceLock<&'static Process> = OnceLock::new();
    HOST.get_or_init(|| Process::init(config().config.clone()))
}

/// The control server, kept for the life of the process, and the socket path with the
/// process that bound it (a child that forks without `exec` must not remove it).
static SERVER: OnceLock<Served> = OnceLock::new();

#[derive(Debug)]
struct Served {
    _server: Server,
    path: CString,
    pid: u32,
}

/// Whether a process already answers on the socket at `path` (a parent that started
/// this process with the same `KLP_SOCKET`): its socket is not taken over.
fn served_by_another(path: &std::path::Path) -> bool {
    std::os::unix::net::UnixStream::connect(path).is_ok()
}

/// What the constructor does (outside the constructor, for tests): creates the host
/// and serves its socket. Returns the sentences it printed.
pub fn start_host() -> Vec<String> {
    let s = config();
    let mut said = s.problems.clone();
    let p = process();
    let path = match &s.socket {
        SocketChoice::Off => None,
        SocketChoice::Default => Some(klp_user::ctl::default_socket_path(std::process::id())),
        SocketChoice::Path(p) => Some(p.clone()),
    };
    if let Some(path) = path {
        if SERVER.get().is_some() {
            return said;
        }
        if served_by_another(&path) {
            said.push(format!(
                "libklp: another process serves the control socket {} ({} is inherited?); this process serves none.",
                path.display(),
                env::SOCKET
            ));
        } else {
            match p.serve(ServeOptions {
                path: Some(path.clone()),
                ..ServeOptions::default()
            }) {
                Ok(server) => {
                    let c = CString::new(path.as_os_str().as_encoded_bytes()).ok();
                    if let Some(c) = c {
                        let _ = SERVER.set(Served {
                            _server: server,
                            path: c,
                            pid: std::process::id(),
                        });
                    }
                    if s.config.log_stderr {
                        said.push(format!(
                            "libklp: process {} serves its control socket at {}.",
                            std::process::id(),
                            path.display()
                        ));
                    }
                }
                Err(e) => said.push(format!(
                    "libklp: cannot serve the control socket at {} ({e}); klpctl cannot reach this process.",
                    path.display()
                )),
            }
        }
    }
    for l in &said {
        eprintln!("{l}");
    }
    said
}

/// The constructor: creates the process host and serves the control socket. Runs
/// once, when the dynamic linker loads this library (before the program's own
/// constructors and `main`). Nothing unwinds out of it.
extern "C" fn init() {
    let _ = std::panic::catch_unwind(start_host);
}

/// The destructor: removes the control socket when the process that bound it exits
/// normally (the server thread is not stopped: other threads may still run).
extern "C" fn fini() {
    if let Some(s) = SERVER.get()
        && s.pid == std::process::id()
    {
        // SAFETY: `s.path` is a NUL-terminated path; `unlink` only reads it.
        unsafe { libc::unlink(s.path.as_ptr()) };
    }
}

#[used]
#[unsafe(link_section = ".init_array")]
static INIT: extern "C" fn() = init;

#[used]
#[unsafe(link_section = ".fini_array")]
static FINI: extern "C" fn() = fini;

#[cfg(test)]
mod tests {
    use super::*;

    fn with(vars: &[(&str, &str)]) -> Settings {
        let vars: Vec<(String, String)> = vars
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        settings_from(
            &|k| vars.iter().find(|(n, _)| n == k).map(|(_, v)| v.clone()),
            42,
        )
    }

    #[test]
    fn the_environment_configures_the_host() {
        let s = with(&[]);
        assert!(!s.config.log_stderr && !s.config.dyndbg);
        assert_eq!(s.config.checks.policy, WalkPolicy::ScanOnly);
        assert_eq!(s.socket, SocketChoice::Default);
        assert!(s.problems.is_empty());

        let s = with(&[
            ("KLP_LOG", "stderr"),
            ("KLP_DYNDBG", "1"),
            ("KLP_SOCKET", "/run/x-%p.sock"),
            ("KLP_WALK", "scan"),
        ]);
        assert!(s.config.log_stderr && s.config.dyndbg);
        assert_eq!(s.socket, SocketChoice::Path("/run/x-42.sock".into()));
        assert_eq!(s.config.checks.policy, WalkPolicy::ScanOnly);
        assert!(s.problems.is_empty());

        assert_eq!(with(&[("KLP_SOCKET", "off")]).socket, SocketChoice::Off);
        assert_eq!(
            with(&[("KLP_WALK", "unwinder")]).config.checks.policy,
            WalkPolicy::Unwinder
        );
    }

    #[test]
    fn values_not_understood_are_named_and_ignored() {
        let s = with(&[
            ("KLP_LOG", "loud"),
            ("KLP_DYNDBG", "yes"),
            ("KLP_WALK", "x"),
        ]);
        assert!(!s.config.log_stderr && !s.config.dyndbg);
        assert_eq!(s.problems.len(), 3, "{:?}", s.problems);
        assert!(
            s.problems[0].contains("KLP_LOG=\"loud\""),
            "{:?}",
            s.problems
        );
    }
}
