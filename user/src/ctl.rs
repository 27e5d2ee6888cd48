//! The control interface: a Unix socket served by the process, and `klpctl`, its
//! client.
//!
//! ## Socket
//!
//! [`Process::serve`] binds a stream socket at the path the program chooses, or at
//! [`default_socket_path`] (`$XDG_RUNTIME_DIR/klp-<pid>.sock`, else
//! `/tmp/klp-<uid>-<pid>.sock`), makes it mode 0600 and serves it from a klp service
//! thread. Every connection's peer is identified with `SO_PEERCRED`; a uid not in
//! [`ServeOptions::allowed_uids`] (default: the process's effective uid) gets one
//! `permission` error and is disconnected.
//!
//! ## Protocol
//!
//! One JSON object per line in each direction; the messages are the serde types of
//! this module ([`Request`], [`Answer`] and the results). Requests:
//!
//! | request | result |
//! |---|---|
//! | `{"op":"list"}` | [`PatchEntry`]s: `[{"name","enabled","transition","forced","replace","stack_order","objects":[{"name","patched","functions":[…]}]}]` |
//! | `{"op":"threads"}` | [`ThreadEntry`]s: `[{"task","tid","comm","patch_state","pending","kthread"}]` |
//! | `{"op":"status"}` | `null` or a [`StatusEntry`]: `{"patch","target","total","switched","blockers":[{"tid","comm","reason","function","frame","addr","symbol","detail"}]}` |
//! | `{"op":"enable"\|"disable"\|"force","patch":NAME}` | `null` (writes `enabled`/`force` as sysfs does) |
//! | `{"op":"load","path":ABS_PATH,"require_signature":bool,"trusted_keys":DIR}` | a [`LoadedEntry`]: `{"name","warnings","signer"}` ([`Process::load_file`]; `require_signature` defaults to `false`, `trusted_keys` is optional) |
//! | `{"op":"unload","patch":NAME}` | `null` ([`Process::unload`]) |
//!
//! Names are raw symbol names (`vmlinux` is the program itself); `klpctl` demangles
//! them and says "the program". Fields a request does not define are ignored.
//!
//! Answers: `{"ok":true,"result":…}` or `{"ok":false,"error":{"kind","message","errno","name"}}`
//! ([`ErrorBody`]) with `kind` one of `bad_request`, `unknown_op`, `errno` (the core or
//! the loader refused: `errno` is the kernel's negative value, `name` its symbol),
//! `permission` and `busy`. Every `message` is a sentence for people, with the errno
//! in brackets when there is one and the remedy when there is one.
//!
//! `load` reads the file in the process (the client sends an absolute path, not the
//! bytes): only a peer with the process's own uid (or root) may ask for it, whatever
//! [`ServeOptions::allowed_uids`] allows, and with [`ServeOptions::load_dir`] only
//! files under that directory are read.
//!
//! ## Hostile clients
//!
//! The server is one event loop over non-blocking sockets: a client can hold up no
//! other. A request line longer than [`MAX_REQUEST`] bytes is answered with a
//! `bad_request` error and its connection closed; so is a line that is not UTF-8 or
//! not JSON (the connection stays open); a connection that has not completed a
//! request [`REQUEST_TIMEOUT`] after it connected or got its last answer (it stopped
//! mid-request, sends nothing, or does not read its answers) is dropped, with an error
//! line if it was mid-request; beyond [`MAX_CLIENTS`] connections a new one gets a
//! `busy` error; answers waiting for a client that does not read are bounded (the
//! server stops reading its requests until they drain). What the loop does with the
//! bytes of one connection is [`Session`], without the socket (the fuzz target
//! `user/fuzz`'s `ctl_request` drives it with arbitrary bytes).
//!
//! ## klpctl
//!
//! ```text
//! klpctl [--pid PID | --socket PATH] [--json] [--timeout SECONDS] <command>
//!   list | threads | status                 what the process has and does
//!   enable NAME | disable NAME [--no-wait]  start a transition, wait for its end
//!   force NAME                              end the running transition at once
//!   load FILE [--require-signature] [--trusted-keys DIR] [--no-wait]
//!   unload NAME [--no-wait]                 disable first if enabled, then remove
//!   inspect FILE                            what a patch file would do (no process)
//! ```
//!
//! After `load`, `enable`, `disable` and `unload` klpctl polls `status` every 100 ms
//! until the transition ends: on a terminal with a progress bar (threads switched of
//! all, and the threads holding it by name, tid, function and frame), elsewhere with
//! one line per change. After `--timeout` (default 60 s) it stops waiting, says the
//! transition goes on and how to see it (`klpctl status`) or force it, and exits
//! with 3. Other exit statuses: 0 done, 1 refused or failed, 2 a usage error.
//!
//! Connection failures are told apart: no such process (`kill(pid, 0)` says `ESRCH`),
//! a live process that does not run klp (no socket), a stale socket (the file exists,
//! nothing listens: its process is gone or it is not the process's) — removed, and
//! said so — and a socket of another user (who owns the process is named).
//! [`klpctl`] runs it all in-process, writing to a string, for tests and programs.

use std::io::{BufRead, BufReader, IsTerminal, Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Component, Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use klp::{Errno, TraceError};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::BlockReason;
use crate::loader::describe::{self, demangle};
use crate::loader::{LoadError, LoadOptions, Loaded, errno_text};
use crate::process::Process;
use crate::thread;

/// The default socket of process `pid` for the calling user.
pub fn default_socket_path(pid: u32) -> PathBuf {
    match std::env::var_os("XDG_RUNTIME_DIR") {
        Some(d) if Path::new(&d).is_dir() => Path::new(&d).join(format!("klp-{pid}.sock")),
        _ => {
            // SAFETY: `geteuid` has no preconditions.
            let uid = unsafe { libc::geteuid() };
            PathBuf::from(format!("/tmp/klp-{uid}-{pid}.sock"))
        }
    }
}

/// How the process serves its socket.
#[derive(Clone, Debug, Default)]
pub struct ServeOptions {
    /// The socket path (`None`: [`default_socket_path`] of this process).
    pub path: Option<PathBuf>,
    /// Uids allowed to connect (empty: the process's effective uid).
    pub allowed_uids: Vec<u32>,
    /// How long a connection may take to complete a request (`None`:
    /// [`REQUEST_TIMEOUT`]).
    pub request_timeout: Option<Duration>,
    /// Only patch files under this directory may be loaded (`None`: any file the
    /// process can read).
    pub load_dir: Option<PathBuf>,
}

/// A running control server; stops (and removes its socket) when dropped.
#[derive(Debug)]
pub struct Server {
    path: PathBuf,
    stop: Arc<AtomicBool>,
    handle: Option<std::thread::JoinHandle<()>>,
}

impl Server {
    /// The socket path.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
        let _ = std::fs::remove_file(&self.path);
    }
}

/// The peer's uid (`SO_PEERCRED`).
pub fn peer_uid(s: &UnixStream) -> std::io::Result<u32> {
    let mut cred = libc::ucred {
        pid: 0,
        uid: 0,
        gid: 0,
    };
    let mut len = std::mem::size_of::<libc::ucred>() as libc::socklen_t;
    // SAFETY: `cred` and `len` are valid out-parameters of the sizes given.
    let r = unsafe {
        libc::getsockopt(
            s.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_PEERCRED,
            &mut cred as *mut libc::ucred as *mut libc::c_void,
            &mut len,
        )
    };
    if r != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(cred.uid)
}

// ---------------------------------------------------------------- messages

/// A request (the `op` field names the variant).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Request {
    /// The patches.
    List,
    /// The registered threads.
    Threads,
    /// The running transition.
    Status,
    /// `echo 1 > enabled`.
    Enable {
        /// The patch.
        patch: String,
    },
    /// `echo 0 > enabled`.
    Disable {
        /// The patch.
        patch: String,
    },
    /// `echo 1 > force`.
    Force {
        /// The patch.
        patch: String,
    },
    /// Load a patch file and enable its patch.
    Load {
        /// The file, absolute (the process reads it).
        path: PathBuf,
        /// Refuse a file without a valid signature by a trusted key.
        #[serde(default)]
        require_signature: bool,
        /// The directory of trusted keys (default: the loader's).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        trusted_keys: Option<PathBuf>,
    },
    /// Remove a loaded patch module.
    Unload {
        /// The patch.
        patch: String,
    },
}

impl Request {
    /// Every `op`, as the wire names them.
    pub const OPS: [&'static str; 8] = [
        "list", "threads", "status", "enable", "disable", "force", "load", "unload",
    ];
}

/// What went wrong, in an error answer (`kind`) and on the client side.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorKind {
    /// The request is malformed.
    BadRequest,
    /// The request's `op` is not one of [`Request::OPS`].
    UnknownOp,
    /// The core or the loader refused, with an errno.
    Errno,
    /// The peer may not do this.
    Permission,
    /// The server serves [`MAX_CLIENTS`] connections already.
    Busy,
    /// Client side: cannot connect (and none of the cases below).
    Connect,
    /// Client side: the process is not there (`kill(pid, 0)` says `ESRCH`).
    NoSuchProcess,
    /// Client side: the process is alive and serves no control socket.
    NotKlp,
    /// Client side: the socket file exists and nothing listens on it (removed).
    StaleSocket,
    /// Client side: reading or writing the connection failed.
    Io,
    /// Client side: the answer is not one of the protocol's.
    Protocol,
    /// Client side: klpctl's own refusal (a file it cannot read, …).
    Local,
    /// A kind this client does not know.
    #[serde(other)]
    Other,
}

impl ErrorKind {
    /// The wire name (`bad_request`, …).
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorKind::BadRequest => "bad_request",
            ErrorKind::UnknownOp => "unknown_op",
            ErrorKind::Errno => "errno",
            ErrorKind::Permission => "permission",
            ErrorKind::Busy => "busy",
            ErrorKind::Connect => "connect",
            ErrorKind::NoSuchProcess => "no_such_process",
            ErrorKind::NotKlp => "not_klp",
            ErrorKind::StaleSocket => "stale_socket",
            ErrorKind::Io => "io",
            ErrorKind::Protocol => "protocol",
            ErrorKind::Local => "local",
            ErrorKind::Other => "other",
        }
    }
}

/// The error of an answer.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorBody {
    /// What kind of error.
    pub kind: ErrorKind,
    /// A sentence for people (the errno in brackets, a remedy when there is one).
    pub message: String,
    /// The kernel's (negative) error number, for `errno`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub errno: Option<i64>,
    /// The errno's symbol (`ENOENT`), for `errno`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
}

/// One answer line.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Answer {
    /// Whether the request was carried out.
    pub ok: bool,
    /// Its result (`null` for requests without one).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub result: Option<Value>,
    /// Why not.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<ErrorBody>,
}

impl Answer {
    /// A successful answer.
    pub fn ok(result: Value) -> Answer {
        Answer {
            ok: true,
            result: Some(result),
            error: None,
        }
    }

    /// An error answer.
    pub fn error(kind: ErrorKind, message: impl Into<String>) -> Answer {
        Answer {
            ok: false,
            result: None,
            error: Some(ErrorBody {
                kind,
                message: message.into(),
                errno: None,
                name: None,
            }),
        }
    }

    /// An `errno` error answer.
    pub fn errno(e: Errno, message: impl Into<String>) -> Answer {
        Answer {
            ok: false,
            result: None,
            error: Some(ErrorBody {
                kind: ErrorKind::Errno,
                message: message.into(),
                errno: Some(i64::from(e.to_kernel())),
                name: e.name().map(str::to_string),
            }),
        }
    }

    /// The answer as one line (without the newline).
    pub fn to_line(&self) -> String {
        serde_json::to_string(self).unwrap_or_else(|_| {
            r#"{"ok":false,"error":{"kind":"bad_request","message":"the answer could not be written"}}"#
                .to_string()
        })
    }
}

/// One patch of `list` (its `/sys/kernel/livepatch/<name>`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PatchEntry {
    /// The patch.
    pub name: String,
    /// `enabled`.
    pub enabled: bool,
    /// `transition`.
    pub transition: bool,
    /// Whether a forced transition involved it.
    pub forced: bool,
    /// `replace`.
    pub replace: bool,
    /// `stack_order`.
    pub stack_order: u64,
    /// Its objects.
    pub objects: Vec<ObjectEntry>,
}

/// One object of a [`PatchEntry`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ObjectEntry {
    /// `vmlinux` (the program) or a library's module name.
    pub name: String,
    /// `patched`.
    pub patched: bool,
    /// Its function directories (`name,sympos`).
    pub functions: Vec<String>,
}

/// One thread of `threads`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ThreadEntry {
    /// Task id.
    pub task: u64,
    /// Thread id.
    pub tid: i32,
    /// Thread name.
    pub comm: String,
    /// `patch_state`: -1 idle, 0 unpatched, 1 patched.
    pub patch_state: i32,
    /// Pending a switch.
    pub pending: bool,
    /// klp's own service thread.
    pub kthread: bool,
}

/// The running transition (`status`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct StatusEntry {
    /// The patch in transition.
    pub patch: String,
    /// `patching` or `unpatching`.
    pub target: String,
    /// Threads in all.
    pub total: u64,
    /// Threads switched.
    pub switched: u64,
    /// What holds the others.
    pub blockers: Vec<BlockerEntry>,
}

/// Why a thread cannot switch yet.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BlockerReason {
    /// No reliable stack traces on this architecture.
    NoReliableStacks,
    /// The thread runs (does not answer klp's signal).
    Running,
    /// Its stack is too deep to check.
    TooDeep,
    /// Its stack could not be walked reliably.
    Unreliable,
    /// Its stack holds code the transition affects.
    SleepingOn,
    /// A reason this client does not know.
    #[serde(other)]
    Other,
}

/// One thread holding the transition.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BlockerEntry {
    /// Thread id.
    pub tid: i32,
    /// Thread name.
    pub comm: String,
    /// Why.
    pub reason: BlockerReason,
    /// For `sleeping_on`: the function on its stack (raw name).
    pub function: Option<String>,
    /// For `sleeping_on`: the frame (0 = innermost).
    pub frame: Option<u64>,
    /// For `sleeping_on`: the return address (`0x…`).
    pub addr: Option<String>,
    /// For `sleeping_on`: the address as `symbol+off/size [object]`.
    pub symbol: Option<String>,
    /// Why the stack could not be checked, when known.
    pub detail: Option<String>,
}

/// The result of `load`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LoadedEntry {
    /// The patch (and patch module) name.
    pub name: String,
    /// Warnings, one sentence each.
    #[serde(default)]
    pub warnings: Vec<String>,
    /// The signer's key, when signed by a trusted key.
    #[serde(default)]
    pub signer: Option<String>,
}

impl From<Loaded> for LoadedEntry {
    fn from(l: Loaded) -> Self {
        LoadedEntry {
            name: l.name,
            warnings: l.warnings,
            signer: l.signer,
        }
    }
}

// ------------------------------------------------------------------ server

/// Who sent a request, and the server's rules for it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RequestContext {
    /// The peer's uid.
    pub peer_uid: u32,
    /// [`ServeOptions::load_dir`].
    pub load_dir: Option<PathBuf>,
}

impl RequestContext {
    /// A request of this process's own user, with no load directory.
    pub fn own() -> RequestContext {
        RequestContext {
            // SAFETY: `geteuid` has no preconditions.
            peer_uid: unsafe { libc::geteuid() },
            load_dir: None,
        }
    }
}

/// The answer to a refused enable/disable/force: the core's errno, in words.
fn core_error(op: &str, patch: &str, e: Errno) -> Answer {
    let en = errno_text(e);
    let msg = match (op, e) {
        (_, Errno::ENOENT) => format!(
            "there is no patch '{patch}' in this process ({en}): `klpctl list` shows its patches"
        ),
        ("enable", Errno::EINVAL) => format!("patch '{patch}' is already enabled ({en})"),
        ("disable", Errno::EINVAL) => format!("patch '{patch}' is already disabled ({en})"),
        ("force", Errno::EINVAL) => format!(
            "patch '{patch}' is not in transition, there is nothing to force ({en}): \
             `klpctl status` shows the transition"
        ),
        (_, Errno::EBUSY) => format!(
            "another patch is in transition ({en}): wait for it to end (`klpctl status` \
             shows it) or force it"
        ),
        (_, Errno::ENOMEM) => format!("cannot {op} patch '{patch}': out of memory ({en})"),
        _ => format!("cannot {op} patch '{patch}' ({en})"),
    };
    Answer::errno(e, msg)
}

fn load_error(e: LoadError) -> Answer {
    Answer::errno(e.errno, e.message)
}

fn json_of<T: Serialize>(v: &T) -> Answer {
    match serde_json::to_value(v) {
        Ok(v) => Answer::ok(v),
        Err(e) => Answer::error(
            ErrorKind::BadRequest,
            format!("the result could not be written ({e})"),
        ),
    }
}

fn patches(p: &Process) -> Vec<PatchEntry> {
    p.list()
        .into_iter()
        .map(|x| PatchEntry {
            name: x.name,
            enabled: x.enabled,
            transition: x.transition,
            forced: x.forced,
            replace: x.replace,
            stack_order: x.stack_order,
            objects: x
                .objects
                .into_iter()
                .map(|(name, patched, functions)| ObjectEntry {
                    name,
                    patched,
                    functions,
                })
                .collect(),
        })
        .collect()
}

fn threads(p: &Process) -> Vec<ThreadEntry> {
    p.threads()
        .into_iter()
        .map(|t| ThreadEntry {
            task: t.task.0,
            tid: t.tid,
            comm: t.comm,
            patch_state: t.state.as_i32(),
            pending: t.pending,
            kthread: t.kthread,
        })
        .collect()
}

fn status(p: &Process) -> Option<StatusEntry> {
    let s = p.status()?;
    Some(StatusEntry {
        patch: s.patch,
        target: s.target.verb().to_string(),
        total: s.total as u64,
        switched: s.switched as u64,
        blockers: s
            .blockers
            .into_iter()
            .map(|b| {
                let (reason, function, frame, addr) = match &b.reason {
                    BlockReason::NoReliableStacks => {
                        (BlockerReason::NoReliableStacks, None, None, None)
                    }
                    BlockReason::Running => (BlockerReason::Running, None, None, None),
                    BlockReason::Unreliable(TraceError::TooDeep) => {
                        (BlockerReason::TooDeep, None, None, None)
                    }
                    BlockReason::Unreliable(_) => (BlockerReason::Unreliable, None, None, None),
                    BlockReason::SleepingOn { func, addr, frame } => (
                        BlockerReason::SleepingOn,
                        Some(func.clone()),
                        Some(*frame as u64),
                        Some(format!("{addr:#x}")),
                    ),
                };
                BlockerEntry {
                    tid: b.thread.tid,
                    comm: b.thread.comm,
                    reason,
                    function,
                    frame,
                    addr,
                    symbol: b.frame_symbol,
                    detail: b.detail,
                }
            })
            .collect(),
    })
}

/// Whether `path` may be loaded under `ctx`'s rules; the refusal otherwise.
fn may_load(path: &Path, ctx: &RequestContext) -> Result<(), Answer> {
    if !path.is_absolute() {
        return Err(Answer::error(
            ErrorKind::BadRequest,
            format!(
                "the patch file's path {} is not absolute: the process reads the file, \
                 from its own working directory",
                path.display()
            ),
        ));
    }
    // SAFETY: `geteuid` has no preconditions.
    let me = unsafe { libc::geteuid() };
    if ctx.peer_uid != me && ctx.peer_uid != 0 {
        return Err(Answer::error(
            ErrorKind::Permission,
            format!(
                "uid {} may not load patch files into this process (-EACCES): the process \
                 reads the file itself, so only its own user (uid {me}) or root may ask",
                ctx.peer_uid
            ),
        ));
    }
    if let Some(dir) = &ctx.load_dir {
        let inside = path.starts_with(dir)
            && !path
                .components()
                .any(|c| matches!(c, Component::ParentDir | Component::CurDir));
        let resolved_inside = match (std::fs::canonicalize(path), std::fs::canonicalize(dir)) {
            (Ok(f), Ok(d)) => f.starts_with(d),
            // Not there: the loader says so.
            _ => true,
        };
        if !inside || !resolved_inside {
            return Err(Answer::error(
                ErrorKind::Permission,
                format!(
                    "this process loads patch files only from {} (-EACCES): {} is not there",
                    dir.display(),
                    path.display()
                ),
            ));
        }
    }
    Ok(())
}

/// Answers one request line (the text of one line, without its newline) from a peer
/// described by `ctx`.
pub fn handle_request(p: &'static Process, line: &str, ctx: &RequestContext) -> Answer {
    let v = match serde_json::from_str::<Value>(line) {
        Ok(v) => v,
        Err(e) => {
            return Answer::error(
                ErrorKind::BadRequest,
                format!("the request is not JSON ({e}): send one JSON object per line"),
            );
        }
    };
    let Some(obj) = v.as_object() else {
        return Answer::error(
            ErrorKind::BadRequest,
            "the request is not a JSON object: send an object such as {\"op\":\"list\"}",
        );
    };
    let Some(op) = obj.get("op").and_then(Value::as_str) else {
        return Answer::error(
            ErrorKind::BadRequest,
            "the request has no \"op\": send an object such as {\"op\":\"list\"}",
        );
    };
    if !Request::OPS.contains(&op) {
        return Answer::error(
            ErrorKind::UnknownOp,
            format!(
                "unknown op \"{op}\": the ops are {}",
                Request::OPS.join(", ")
            ),
        );
    }
    let req = match serde_json::from_value::<Request>(v.clone()) {
        Ok(r) => r,
        Err(e) => {
            return Answer::error(
                ErrorKind::BadRequest,
                format!("a malformed \"{op}\" request: {e}"),
            );
        }
    };
    match req {
        Request::List => json_of(&patches(p)),
        Request::Threads => json_of(&threads(p)),
        Request::Status => json_of(&status(p)),
        Request::Enable { patch } => match p.enable(&patch) {
            Ok(()) => Answer::ok(Value::Null),
            Err(e) => core_error("enable", &patch, e),
        },
        Request::Disable { patch } => match p.disable(&patch) {
            Ok(()) => Answer::ok(Value::Null),
            Err(e) => core_error("disable", &patch, e),
        },
        Request::Force { patch } => match p.force(&patch) {
            Ok(()) => Answer::ok(Value::Null),
            Err(e) => core_error("force", &patch, e),
        },
        Request::Load {
            path,
            require_signature,
            trusted_keys,
        } => {
            if let Err(a) = may_load(&path, ctx) {
                return a;
            }
            if let Some(k) = &trusted_keys
                && !k.is_absolute()
            {
                return Answer::error(
                    ErrorKind::BadRequest,
                    format!(
                        "the trusted keys directory {} is not absolute: the process reads it",
                        k.display()
                    ),
                );
            }
            let opts = LoadOptions {
                require_signature,
                trusted_keys,
            };
            match p.load_file(&path, &opts) {
                Ok(l) => json_of(&LoadedEntry::from(l)),
                Err(e) => load_error(e),
            }
        }
        Request::Unload { patch } => match p.unload(&patch) {
            Ok(()) => Answer::ok(Value::Null),
            Err(e) => load_error(e),
        },
    }
}

/// The longest request line the server reads (bytes, without the newline): a longer
/// one is answered with a `bad_request` error and its connection closed.
pub const MAX_REQUEST: usize = 64 * 1024;
/// How long a connection may take to send a complete request (from its connection or
/// its previous answer) and to read its answer: a client that stops mid-request, sends
/// nothing, or does not read is dropped after this.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// Connections served at once; one more is told so and closed.
pub const MAX_CLIENTS: usize = 256;
/// Answers waiting for a client that does not read, at most (the server stops reading
/// its requests until they drain).
const MAX_PENDING_OUT: usize = 1 << 20;

/// The request side of one connection without its socket: the bytes a client sent,
/// split into lines and answered as the event loop does (length limit, UTF-8 and JSON
/// checks, [`handle_request`]). The fuzz target drives it with arbitrary bytes.
#[derive(Debug)]
pub struct Session {
    /// Bytes of the request being received (no newline yet).
    inbuf: Vec<u8>,
    /// How many bytes of `inbuf` are known to hold no newline.
    scanned: usize,
    /// Answers not written yet.
    out: Vec<u8>,
    /// No more requests: close once `out` is written.
    closing: bool,
    /// The peer's uid, when it may not control the process (it gets one `permission`
    /// error).
    refused: Option<u32>,
    ctx: RequestContext,
}

impl Session {
    /// A session of a peer allowed to control the process.
    pub fn new(ctx: RequestContext) -> Session {
        Session {
            inbuf: Vec::new(),
            scanned: 0,
            out: Vec::new(),
            closing: false,
            refused: None,
            ctx,
        }
    }

    /// A session of a peer that may not control the process: its first line gets a
    /// `permission` error and the session closes.
    pub fn refused(ctx: RequestContext) -> Session {
        let uid = ctx.peer_uid;
        Session {
            refused: Some(uid),
            ..Session::new(ctx)
        }
    }

    /// Takes bytes the client sent and answers every complete line; returns how many
    /// lines were answered. Once closing, further bytes are ignored.
    pub fn receive(&mut self, p: &'static Process, bytes: &[u8]) -> usize {
        if self.closing {
            return 0;
        }
        self.inbuf.extend_from_slice(bytes);
        self.answer_lines(p)
    }

    /// The client's stream ended: a last request without its newline is answered all
    /// the same, and the session closes.
    pub fn end(&mut self, p: &'static Process) -> usize {
        if self.closing {
            return 0;
        }
        if !self.inbuf.is_empty() && self.inbuf.len() <= MAX_REQUEST {
            self.inbuf.push(b'\n');
        }
        self.closing = true;
        self.answer_lines(p)
    }

    /// Whether the session takes no more requests.
    pub fn closing(&self) -> bool {
        self.closing
    }

    /// The answers not taken yet (one JSON line each).
    pub fn output(&self) -> &[u8] {
        &self.out
    }

    /// Takes the answers written so far.
    pub fn take_output(&mut self) -> Vec<u8> {
        std::mem::take(&mut self.out)
    }

    /// Bytes of an incomplete request held.
    pub fn pending_input(&self) -> usize {
        self.inbuf.len()
    }

    fn answer(&mut self, a: &Answer) {
        self.out.extend_from_slice(a.to_line().as_bytes());
        self.out.push(b'\n');
    }

    fn too_long(&mut self) {
        self.answer(&Answer::error(
            ErrorKind::BadRequest,
            format!("the request is longer than {MAX_REQUEST} bytes; the connection is closed"),
        ));
        self.closing = true;
    }

    /// Answers every complete line received so far. Each byte is searched for a
    /// newline once (a request dripped a byte at a time costs no more than one sent
    /// at once), and the buffer is compacted once per call.
    fn answer_lines(&mut self, p: &'static Process) -> usize {
        let mut answered = 0;
        let buf = std::mem::take(&mut self.inbuf);
        let mut start = 0;
        let mut from = self.scanned.min(buf.len());
        while let Some(k) = buf
            .get(from..)
            .and_then(|r| r.iter().position(|&b| b == b'\n'))
        {
            let end = from + k;
            if self.answer_line(p, buf.get(start..end).unwrap_or_default()) {
                answered += 1;
            }
            start = end + 1;
            from = start;
            if self.closing {
                // What follows is not read (`inbuf` stays empty).
                self.scanned = 0;
                return answered;
            }
        }
        let mut rest = buf;
        rest.drain(..start.min(rest.len()));
        self.inbuf = rest;
        self.scanned = self.inbuf.len();
        if self.inbuf.len() > MAX_REQUEST {
            self.inbuf.clear();
            self.scanned = 0;
            self.too_long();
            answered += 1;
        }
        answered
    }

    /// Answers one line; `false` if it needed no answer (an empty line).
    fn answer_line(&mut self, p: &'static Process, line: &[u8]) -> bool {
        if let Some(uid) = self.refused {
            // Read the request first: closing a socket with unread data makes the
            // client's write or read fail, and it would never see the answer.
            self.answer(&Answer::error(
                ErrorKind::Permission,
                format!(
                    "uid {uid} may not control this process (-EACCES): run klpctl as the \
                     process's user, or have it serve more uids"
                ),
            ));
            self.closing = true;
            return true;
        }
        if line.len() > MAX_REQUEST {
            self.too_long();
            return true;
        }
        let Ok(text) = std::str::from_utf8(line) else {
            self.answer(&Answer::error(
                ErrorKind::BadRequest,
                "the request is not UTF-8 text: send one JSON object per line",
            ));
            return true;
        };
        if text.trim().is_empty() {
            return false;
        }
        let a = handle_request(p, text, &self.ctx);
        self.answer(&a);
        true
    }
}

/// One client connection of the server's event loop.
struct Conn {
    s: UnixStream,
    session: Session,
    /// When the connection is dropped unless a request completes first.
    deadline: Instant,
    /// The server's request timeout.
    timeout: Duration,
}

impl Conn {
    /// Reads what the client sent and answers its complete lines; `false` at the end
    /// of its stream or on an error.
    fn read_some(&mut self, p: &'static Process) -> bool {
        let mut buf = [0u8; 16 * 1024];
        loop {
            match (&self.s).read(&mut buf) {
                Ok(0) => return false,
                Ok(n) => {
                    if self.session.receive(p, buf.get(..n).unwrap_or_default()) > 0 {
                        self.deadline = Instant::now() + self.timeout;
                    }
                    if self.session.closing || n < buf.len() {
                        return true;
                    }
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return true,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(_) => return false,
            }
        }
    }

    /// The end of the client's stream.
    fn end(&mut self, p: &'static Process) {
        self.session.end(p);
    }

    /// Writes what it can of the pending answers; `false` on an error.
    fn write_some(&mut self) -> bool {
        while !self.session.out.is_empty() {
            match (&self.s).write(&self.session.out) {
                Ok(0) => return false,
                Ok(n) => {
                    self.session.out.drain(..n);
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return true,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(_) => return false,
            }
        }
        true
    }
}

/// The server's event loop: every connection is non-blocking and polled, so a client
/// that is slow, silent, stops mid-request or does not read its answers cannot hold up
/// the others; each is bounded in time ([`REQUEST_TIMEOUT`]) and memory
/// ([`MAX_REQUEST`]). Requests are answered one at a time, in the order they complete.
fn serve_loop(
    p: &'static Process,
    listener: &UnixListener,
    allowed: &[u32],
    load_dir: Option<&Path>,
    timeout: Duration,
    stop: &AtomicBool,
) {
    let mut conns: Vec<Conn> = Vec::new();
    let mut fds: Vec<libc::pollfd> = Vec::new();
    while !stop.load(Ordering::Acquire) {
        thread::safe_point();
        fds.clear();
        fds.push(libc::pollfd {
            fd: listener.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        });
        for c in &conns {
            let mut events = 0;
            if !c.session.closing && c.session.out.len() < MAX_PENDING_OUT {
                events |= libc::POLLIN;
            }
            if !c.session.out.is_empty() {
                events |= libc::POLLOUT;
            }
            fds.push(libc::pollfd {
                fd: c.s.as_raw_fd(),
                events,
                revents: 0,
            });
        }
        // SAFETY: `fds` holds `fds.len()` initialised `pollfd`s of open descriptors.
        let n = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, 20) };
        if n < 0 {
            // EINTR (klp's own signal, a stack check of this thread): poll again.
            continue;
        }
        let ready: Vec<libc::c_short> = fds.iter().skip(1).map(|f| f.revents).collect();
        let now = Instant::now();
        let mut keep = Vec::with_capacity(conns.len());
        for (mut c, revents) in conns.drain(..).zip(ready) {
            let mut alive = true;
            if revents & (libc::POLLIN | libc::POLLHUP | libc::POLLERR) != 0
                && !c.session.closing
                && !c.read_some(p)
            {
                // The end of the client's stream: a last request without its newline
                // is answered all the same.
                c.end(p);
            }
            if !c.session.out.is_empty() && !c.write_some() {
                alive = false;
            }
            if c.session.closing && c.session.out.is_empty() {
                alive = false;
            }
            if alive && now >= c.deadline && !c.session.closing {
                // The server may have been busy with other requests past this deadline:
                // what the client sent meanwhile is taken first (it is not the client
                // that was slow).
                if !c.read_some(p) {
                    c.end(p);
                }
                if !c.write_some() {
                    alive = false;
                }
            }
            if alive && Instant::now() >= c.deadline {
                // Too slow: a request left half-sent, no request at all, or answers not
                // read. Tell it (if it can take it) and drop it.
                if c.session.out.is_empty() && c.session.pending_input() > 0 {
                    c.session.answer(&Answer::error(
                        ErrorKind::BadRequest,
                        format!(
                            "the request was not complete after {} s; the connection is closed",
                            timeout.as_secs_f64()
                        ),
                    ));
                    let _ = c.write_some();
                }
                alive = false;
            }
            if alive {
                keep.push(c);
            }
        }
        conns = keep;
        // New connections.
        loop {
            let s = match listener.accept() {
                Ok((s, _)) => s,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(_) => break,
            };
            if s.set_nonblocking(true).is_err() {
                continue;
            }
            let Ok(uid) = peer_uid(&s) else { continue };
            let ctx = RequestContext {
                peer_uid: uid,
                load_dir: load_dir.map(Path::to_path_buf),
            };
            let session = if allowed.contains(&uid) {
                Session::new(ctx)
            } else {
                Session::refused(ctx)
            };
            let mut c = Conn {
                s,
                session,
                deadline: Instant::now() + timeout,
                timeout,
            };
            if conns.len() >= MAX_CLIENTS {
                c.session.answer(&Answer::error(
                    ErrorKind::Busy,
                    format!(
                        "the process serves {MAX_CLIENTS} connections already; try again later"
                    ),
                ));
                let _ = c.write_some();
                continue;
            }
            conns.push(c);
        }
    }
}

impl Process {
    /// Serves the control socket (see the module documentation).
    pub fn serve(&'static self, opts: ServeOptions) -> std::io::Result<Server> {
        let path = opts
            .path
            .unwrap_or_else(|| default_socket_path(std::process::id()));
        if let Ok(m) = std::fs::symlink_metadata(&path) {
            if !m.file_type().is_socket() {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::AlreadyExists,
                    "the socket path exists and is not a socket",
                ));
            }
            std::fs::remove_file(&path)?;
        }
        let listener = UnixListener::bind(&path)?;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))?;
        listener.set_nonblocking(true)?;
        let mut allowed = opts.allowed_uids;
        if allowed.is_empty() {
            // SAFETY: `geteuid` has no preconditions.
            allowed.push(unsafe { libc::geteuid() });
        }
        let timeout = opts.request_timeout.unwrap_or(REQUEST_TIMEOUT);
        let load_dir = opts.load_dir;
        let stop = Arc::new(AtomicBool::new(false));
        let stop2 = stop.clone();
        let handle = std::thread::Builder::new()
            .name("klp-ctl".into())
            .spawn(move || {
                thread::mark_kthread();
                serve_loop(
                    self,
                    &listener,
                    &allowed,
                    load_dir.as_deref(),
                    timeout,
                    &stop2,
                );
            })?;
        Ok(Server {
            path,
            stop,
            handle: Some(handle),
        })
    }
}

// ------------------------------------------------------------------ client

/// A failed request, as the client sees it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CtlError {
    /// What kind of failure: the server's kind, or a client-side one.
    pub kind: ErrorKind,
    /// A sentence for people, the errno in brackets when there is one.
    pub message: String,
    /// The (negative) error number, when there is one.
    pub errno: Option<i64>,
}

impl std::fmt::Display for CtlError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for CtlError {}

impl CtlError {
    fn new(kind: ErrorKind, message: impl Into<String>, errno: Option<i32>) -> CtlError {
        CtlError {
            kind,
            message: message.into(),
            errno: errno.map(|e| i64::from(e.saturating_neg())),
        }
    }
}

/// An OS error number as messages show it: `-ENOENT`, `-111` without a name known.
pub fn os_errno_text(e: i32) -> String {
    let name = match e {
        libc::EPERM => "EPERM",
        libc::ENOENT => "ENOENT",
        libc::ESRCH => "ESRCH",
        libc::EIO => "EIO",
        libc::EAGAIN => "EAGAIN",
        libc::EACCES => "EACCES",
        libc::ENOTDIR => "ENOTDIR",
        libc::EISDIR => "EISDIR",
        libc::EINVAL => "EINVAL",
        libc::EPIPE => "EPIPE",
        libc::ENAMETOOLONG => "ENAMETOOLONG",
        libc::ENOTSOCK => "ENOTSOCK",
        libc::ECONNRESET => "ECONNRESET",
        libc::ECONNREFUSED => "ECONNREFUSED",
        libc::ETIMEDOUT => "ETIMEDOUT",
        libc::ELOOP => "ELOOP",
        _ => return format!("-{e}"),
    };
    format!("-{name}")
}

/// The message of an I/O error without Rust's `(os error N)` suffix.
fn io_words(e: &std::io::Error) -> String {
    let s = e.to_string();
    match s.find(" (os error") {
        Some(i) => s.get(..i).unwrap_or(&s).to_string(),
        None => s,
    }
}

/// Which process a request goes to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Target {
    /// The control socket.
    pub socket: PathBuf,
    /// The process, when known (given, or read from a default socket name).
    pub pid: Option<u32>,
    /// How the user named it (`--pid 42`, `--socket PATH`), for remedies.
    pub named: String,
}

/// Whether a process is there (`kill(pid, 0)`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Alive {
    Yes,
    /// `EPERM`: there, another user's.
    OtherUser,
    /// `ESRCH`.
    Gone,
}

fn alive(pid: u32) -> Alive {
    let Ok(p) = libc::pid_t::try_from(pid) else {
        return Alive::Gone;
    };
    if p <= 0 {
        return Alive::Gone;
    }
    // SAFETY: signal 0 only checks that the process exists and may be signalled; `p`
    // is positive, so it names one process (not a group).
    let r = unsafe { libc::kill(p, 0) };
    if r == 0 {
        return Alive::Yes;
    }
    match std::io::Error::last_os_error().raw_os_error() {
        Some(libc::EPERM) => Alive::OtherUser,
        _ => Alive::Gone,
    }
}

/// The user name of `uid` (from `/etc/passwd`), else `uid N`.
fn user_words(uid: u32) -> String {
    let name = std::fs::read_to_string("/etc/passwd").ok().and_then(|t| {
        t.lines().find_map(|l| {
            let mut f = l.split(':');
            let name = f.next()?;
            let _ = f.next()?;
            (f.next()?.parse::<u32>().ok()? == uid).then(|| name.to_string())
        })
    });
    match name {
        Some(n) => format!("user {n} (uid {uid})"),
        None => format!("uid {uid}"),
    }
}

/// The pid in a default socket name (`klp-<pid>.sock`, `klp-<uid>-<pid>.sock`).
fn pid_of_socket_name(path: &Path) -> Option<u32> {
    let f = path.file_name()?.to_str()?;
    let mid = f.strip_prefix("klp-")?.strip_suffix(".sock")?;
    mid.rsplit('-').next()?.parse().ok().filter(|p| *p > 0)
}

impl Target {
    /// Process `pid` at its default socket.
    pub fn pid(pid: u32) -> Target {
        Target {
            socket: default_socket_path(pid),
            pid: Some(pid),
            named: format!("--pid {pid}"),
        }
    }

    /// The socket at `path` (its process known if the name is a default one).
    pub fn socket(path: &Path) -> Target {
        Target {
            socket: path.to_path_buf(),
            pid: pid_of_socket_name(path),
            named: format!("--socket {}", path.display()),
        }
    }

    fn process_words(&self) -> String {
        match self.pid {
            Some(p) => format!("process {p}"),
            None => "the process".to_string(),
        }
    }

    /// Connects, telling apart why it cannot (see the module docs); a stale socket is
    /// removed.
    pub fn connect(&self) -> Result<UnixStream, CtlError> {
        match UnixStream::connect(&self.socket) {
            Ok(s) => Ok(s),
            Err(e) => self.diagnose(e),
        }
    }

    fn diagnose(&self, e: std::io::Error) -> Result<UnixStream, CtlError> {
        let raw = e.raw_os_error().unwrap_or(libc::EIO);
        let path = self.socket.display();
        let pid_state = self.pid.map(|p| (p, alive(p)));
        match raw {
            libc::ENOENT => Err(match pid_state {
                Some((pid, Alive::Gone)) => CtlError::new(
                    ErrorKind::NoSuchProcess,
                    format!(
                        "there is no process {pid} ({}): `pgrep -a NAME` finds a \
                         program's process id",
                        os_errno_text(libc::ESRCH)
                    ),
                    Some(libc::ESRCH),
                ),
                Some((pid, Alive::OtherUser)) => {
                    let owner = std::fs::metadata(format!("/proc/{pid}"))
                        .map(|m| user_words(m.uid()))
                        .unwrap_or_else(|_| "another user".to_string());
                    CtlError::new(
                        ErrorKind::Permission,
                        format!(
                            "process {pid} belongs to {owner}, and has no control socket \
                             of yours at {path} ({}): run klpctl as that user, or give its \
                             socket with --socket",
                            os_errno_text(libc::EPERM)
                        ),
                        Some(libc::EPERM),
                    )
                }
                Some((pid, Alive::Yes)) => CtlError::new(
                    ErrorKind::NotKlp,
                    format!(
                        "process {pid} does not run klp: it has no control socket at \
                         {path} ({}); a program serves one by calling \
                         klp_user::Process::serve",
                        os_errno_text(libc::ENOENT)
                    ),
                    Some(libc::ENOENT),
                ),
                None => CtlError::new(
                    ErrorKind::Connect,
                    format!(
                        "there is no control socket at {path} ({}): check the path, or \
                         name the process with --pid",
                        os_errno_text(libc::ENOENT)
                    ),
                    Some(libc::ENOENT),
                ),
            }),
            libc::ECONNREFUSED => {
                let why = match pid_state {
                    Some((pid, Alive::Gone)) => format!("process {pid} is gone"),
                    _ => {
                        // Nothing listens — or the process is between bind and listen:
                        // look once more.
                        std::thread::sleep(Duration::from_millis(100));
                        if let Ok(s) = UnixStream::connect(&self.socket) {
                            return Ok(s);
                        }
                        match pid_state {
                            Some((pid, _)) => {
                                format!("nothing listens on it: process {pid} does not serve it")
                            }
                            None => "nothing listens on it".to_string(),
                        }
                    }
                };
                let is_socket = std::fs::symlink_metadata(&self.socket)
                    .is_ok_and(|m| m.file_type().is_socket());
                let removed = if is_socket {
                    match std::fs::remove_file(&self.socket) {
                        Ok(()) => "it has been removed".to_string(),
                        Err(e) => format!("it could not be removed: {}", io_words(&e)),
                    }
                } else {
                    "it is not a socket, and was left alone".to_string()
                };
                let (kind, errno, head) = match pid_state {
                    Some((pid, Alive::Gone)) => (
                        ErrorKind::NoSuchProcess,
                        libc::ESRCH,
                        format!("there is no process {pid}"),
                    ),
                    _ => (
                        ErrorKind::StaleSocket,
                        libc::ECONNREFUSED,
                        format!("{} does not answer", self.process_words()),
                    ),
                };
                Err(CtlError::new(
                    kind,
                    format!(
                        "{head} ({}): the control socket {path} was stale ({why}); {removed}",
                        os_errno_text(errno)
                    ),
                    Some(errno),
                ))
            }
            libc::EACCES | libc::EPERM => {
                let owner_uid = match self.pid {
                    Some(pid) => std::fs::metadata(format!("/proc/{pid}")).map(|m| m.uid()),
                    None => std::fs::metadata(&self.socket).map(|m| m.uid()),
                };
                let who = match owner_uid {
                    Ok(uid) => format!("{} runs as {}", self.process_words(), user_words(uid)),
                    Err(_) => format!("{} runs as another user", self.process_words()),
                };
                Err(CtlError::new(
                    ErrorKind::Permission,
                    format!(
                        "permission denied on the control socket {path} ({}): {who}; \
                         run klpctl as that user or as root",
                        os_errno_text(raw)
                    ),
                    Some(raw),
                ))
            }
            _ => Err(CtlError::new(
                ErrorKind::Connect,
                format!(
                    "cannot connect to the control socket {path}: {} ({})",
                    io_words(&e),
                    os_errno_text(raw)
                ),
                Some(raw),
            )),
        }
    }
}

/// How long the client waits for one answer.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(30);

/// Sends one request (any serialisable message: tests send malformed ones) and returns
/// its result.
pub fn request_to<R: Serialize + ?Sized>(target: &Target, req: &R) -> Result<Value, CtlError> {
    let line = serde_json::to_string(req).map_err(|e| {
        CtlError::new(
            ErrorKind::Local,
            format!("the request cannot be written as JSON: {e}"),
            None,
        )
    })?;
    let s = target.connect()?;
    let _ = s.set_read_timeout(Some(ANSWER_TIMEOUT));
    let mut w = s.try_clone().map_err(|e| {
        CtlError::new(
            ErrorKind::Io,
            format!("cannot use the connection: {}", io_words(&e)),
            e.raw_os_error(),
        )
    })?;
    // A server that refuses the peer may answer and close before reading: a failed
    // write still leaves its answer to read.
    let wrote = writeln!(w, "{line}");
    let mut answer = String::new();
    let read = BufReader::new(s).read_line(&mut answer);
    if answer.trim().is_empty() {
        let (msg, errno) = match (wrote, read) {
            (Err(e), _) | (_, Err(e)) if e.kind() == std::io::ErrorKind::WouldBlock => (
                format!(
                    "{} did not answer within {} s",
                    target.process_words(),
                    ANSWER_TIMEOUT.as_secs()
                ),
                Some(libc::ETIMEDOUT),
            ),
            (Err(e), _) | (_, Err(e)) => (
                format!("the connection failed: {}", io_words(&e)),
                e.raw_os_error(),
            ),
            _ => (
                format!(
                    "{} closed the connection without an answer",
                    target.process_words()
                ),
                None,
            ),
        };
        let msg = match errno {
            Some(e) => format!("{msg} ({})", os_errno_text(e)),
            None => msg,
        };
        return Err(CtlError::new(ErrorKind::Io, msg, errno));
    }
    let a: Answer = serde_json::from_str(&answer).map_err(|_| {
        CtlError::new(
            ErrorKind::Protocol,
            format!("the answer is not klp's protocol: {:?}", answer.trim_end()),
            None,
        )
    })?;
    if a.ok {
        return Ok(a.result.unwrap_or(Value::Null));
    }
    let e = a.error.unwrap_or(ErrorBody {
        kind: ErrorKind::Protocol,
        message: "the process refused without saying why".to_string(),
        errno: None,
        name: None,
    });
    Err(CtlError {
        kind: e.kind,
        message: e.message,
        errno: e.errno,
    })
}

/// Sends one request to the socket at `path` and returns its result.
pub fn request(path: &Path, req: &Value) -> Result<Value, CtlError> {
    request_to(&Target::socket(path), req)
}

/// Sends `req` and reads its result as `T`.
pub fn call<T: DeserializeOwned>(target: &Target, req: &Request) -> Result<T, CtlError> {
    let v = request_to(target, req)?;
    serde_json::from_value(v.clone()).map_err(|e| {
        CtlError::new(
            ErrorKind::Protocol,
            format!("the result is not what klpctl expects ({e}): {v}"),
            None,
        )
    })
}

// ------------------------------------------------------------------ klpctl

/// Where klpctl writes: its output, its errors, and whether a person watches (a
/// terminal: the wait shows a progress bar).
pub trait Console {
    /// Normal output.
    fn out(&mut self, s: &str);
    /// Errors.
    fn err(&mut self, s: &str);
    /// Whether progress can be drawn (stderr is a terminal).
    fn terminal(&self) -> bool {
        false
    }
}

/// Everything into one string (no terminal).
impl Console for String {
    fn out(&mut self, s: &str) {
        self.push_str(s);
    }
    fn err(&mut self, s: &str) {
        self.push_str(s);
    }
}

/// The process's stdout and stderr.
#[derive(Debug, Default)]
pub struct Stdio;

impl Console for Stdio {
    fn out(&mut self, s: &str) {
        // A closed pipe (`klpctl list | head -1`) is not an error of klpctl's.
        let mut o = std::io::stdout().lock();
        let _ = o.write_all(s.as_bytes());
        let _ = o.flush();
    }
    fn err(&mut self, s: &str) {
        let _ = std::io::stderr().lock().write_all(s.as_bytes());
    }
    fn terminal(&self) -> bool {
        std::io::stderr().is_terminal()
    }
}

fn parse_seconds(s: &str) -> Result<Duration, String> {
    let v: f64 = s
        .parse()
        .map_err(|_| format!("{s:?} is not a number of seconds"))?;
    if !v.is_finite() || !(0.0..=1e9).contains(&v) {
        return Err(format!("{s} is not a number of seconds klpctl can wait"));
    }
    Ok(Duration::from_secs_f64(v))
}

/// klpctl's command line.
#[derive(Debug, clap::Parser)]
#[command(
    name = "klpctl",
    version,
    about = "Live-patch a running program: list, enable, disable, force, load and unload \
             its patches (the program serves klp's control socket)",
    after_help = "Exit status: 0 done, 1 refused or failed, 2 usage error, 3 the transition \
                  still runs after --timeout."
)]
struct Cli {
    /// The process, by id (its socket is at the default path).
    #[arg(long, global = true, value_name = "PID", conflicts_with = "socket",
          value_parser = clap::value_parser!(u32).range(1..=i64::from(i32::MAX)))]
    pid: Option<u32>,
    /// The process's control socket.
    #[arg(long, global = true, value_name = "PATH")]
    socket: Option<PathBuf>,
    /// Print JSON (the protocol's results) instead of text.
    #[arg(long, global = true)]
    json: bool,
    /// How long to wait for a transition to end.
    #[arg(long, global = true, value_name = "SECONDS", default_value = "60",
          value_parser = parse_seconds)]
    timeout: Duration,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, clap::Subcommand)]
enum Command {
    /// The patches, their objects and functions.
    List,
    /// The threads and their patch states.
    Threads,
    /// The running transition and the threads holding it.
    Status,
    /// Enable a patch (reverses its disabling) and wait for the transition.
    Enable {
        /// The patch.
        name: String,
        /// Do not wait for the transition.
        #[arg(long)]
        no_wait: bool,
    },
    /// Disable a patch and wait for the transition.
    Disable {
        /// The patch.
        name: String,
        /// Do not wait for the transition.
        #[arg(long)]
        no_wait: bool,
    },
    /// End the patch's transition at once (every thread switches, checked or not).
    Force {
        /// The patch.
        name: String,
    },
    /// Load a patch file into the process, enable it and wait for the transition.
    Load {
        /// The patch file (klp-convert's output); the process reads it.
        file: PathBuf,
        /// Refuse a file that is not signed by a trusted key.
        #[arg(long)]
        require_signature: bool,
        /// The directory of trusted keys (default: the loader's).
        #[arg(long, value_name = "DIR")]
        trusted_keys: Option<PathBuf>,
        /// Do not wait for the transition.
        #[arg(long)]
        no_wait: bool,
    },
    /// Remove a loaded patch (disabled first, waiting for the transition, if enabled).
    Unload {
        /// The patch.
        name: String,
        /// Do not wait for a transition (fails if the patch is still enabled).
        #[arg(long)]
        no_wait: bool,
    },
    /// What a patch file would do (reads the file only; no process needed).
    Inspect {
        /// The patch file.
        file: PathBuf,
    },
}

/// How a command ended.
enum Outcome {
    /// Done.
    Done,
    /// The transition goes on past the timeout (its message printed).
    StillRunning,
}

/// The program's objects in words: `the program` for `vmlinux`.
fn object_name(name: &str) -> String {
    if name == describe::PROGRAM_OBJECT {
        "the program".to_string()
    } else {
        format!("library {name}")
    }
}

/// A symbol for people: demangled.
fn sym(name: &str) -> String {
    demangle(name).unwrap_or_else(|| name.to_string())
}

/// A frame description `name+0x1/0x2 [object]` for people: demangled, `the program`.
fn frame_words(s: &str) -> String {
    let (head, obj) = match s.rsplit_once(" [") {
        Some((h, o)) => (h, o.strip_suffix(']')),
        None => (s, None),
    };
    let (name, off) = match head.split_once('+') {
        Some((n, o)) => (n, Some(o)),
        None => (head, None),
    };
    let mut out = sym(name);
    if let Some(o) = off {
        out.push('+');
        out.push_str(o);
    }
    match obj {
        Some(o) if o == describe::PROGRAM_OBJECT => out.push_str(" in the program"),
        Some(o) => out.push_str(&format!(" in {o}")),
        None => {}
    }
    out
}

/// A function directory `name,sympos` for people.
fn function_words(dir: &str) -> String {
    match dir.rsplit_once(',') {
        Some((n, pos)) if pos != "1" && pos != "0" => {
            format!("{} (symbol position {pos})", sym(n))
        }
        Some((n, _)) => sym(n),
        None => sym(dir),
    }
}

fn render_list(patches: &[PatchEntry], out: &mut String) {
    if patches.is_empty() {
        out.push_str("no patches\n");
    }
    for p in patches {
        let mut state = vec![if p.enabled { "enabled" } else { "disabled" }.to_string()];
        if p.transition {
            state.push("in transition".into());
        }
        if p.forced {
            state.push("forced".into());
        }
        if p.replace {
            state.push("replaces the patches before it".into());
        }
        out.push_str(&format!(
            "{}: {} (stack order {})\n",
            p.name,
            state.join(", "),
            p.stack_order
        ));
        for o in &p.objects {
            out.push_str(&format!(
                "  {}: {}\n",
                object_name(&o.name),
                if o.patched {
                    "patched"
                } else {
                    "not patched (not loaded)"
                }
            ));
            for f in &o.functions {
                out.push_str(&format!("    {}\n", function_words(f)));
            }
        }
    }
}

fn state_words(s: i32) -> &'static str {
    match s {
        -1 => "idle",
        0 => "unpatched",
        1 => "patched",
        _ => "?",
    }
}

fn render_threads(threads: &[ThreadEntry], out: &mut String) {
    out.push_str("TID      STATE      PENDING  NAME\n");
    for t in threads {
        out.push_str(&format!(
            "{:<8} {:<10} {:<8} {}{}\n",
            t.tid,
            state_words(t.patch_state),
            if t.pending { "yes" } else { "no" },
            t.comm,
            if t.kthread { " [klp]" } else { "" }
        ));
    }
}

/// A progress bar of `width` cells.
pub fn progress_bar(done: u64, total: u64, width: usize) -> String {
    let filled = if total == 0 {
        width
    } else {
        ((done.min(total) as u128 * width as u128) / total as u128) as usize
    };
    format!(
        "[{}{}]",
        "#".repeat(filled),
        "-".repeat(width.saturating_sub(filled))
    )
}

/// Why one thread holds the transition, in words.
fn blocker_words(b: &BlockerEntry) -> String {
    let who = format!("{}:{}", b.comm, b.tid);
    let why = match b.reason {
        BlockerReason::SleepingOn => format!(
            "sleeping on function {} (frame {}: {})",
            b.function.as_deref().map(sym).unwrap_or_default(),
            b.frame.unwrap_or(0),
            b.symbol
                .as_deref()
                .map(frame_words)
                .or_else(|| b.addr.clone())
                .unwrap_or_default()
        ),
        BlockerReason::Running => "is running (does not answer klp's signal)".to_string(),
        BlockerReason::TooDeep => "has a stack too deep to check".to_string(),
        BlockerReason::NoReliableStacks => {
            "cannot be checked (no reliable stack traces here)".to_string()
        }
        BlockerReason::Unreliable => format!(
            "has an unreliable stack{}",
            b.detail
                .as_deref()
                .map(|d| format!(" ({d})"))
                .unwrap_or_default()
        ),
        BlockerReason::Other => "is waited for".to_string(),
    };
    format!("{who} {why}")
}

fn render_status(s: Option<&StatusEntry>, out: &mut String) {
    let Some(s) = s else {
        out.push_str("no transition\n");
        return;
    };
    out.push_str(&format!(
        "'{}': {} {} {}/{} threads\n",
        s.patch,
        s.target,
        progress_bar(s.switched, s.total, 30),
        s.switched,
        s.total
    ));
    for b in &s.blockers {
        out.push_str(&format!("  {}\n", blocker_words(b)));
    }
}

/// One session of klpctl: the target, the console, the options.
struct Ctl<'c> {
    target: Option<Target>,
    console: &'c mut dyn Console,
    json: bool,
    timeout: Duration,
}

/// How often the wait polls `status`.
const POLL: Duration = Duration::from_millis(100);

/// Waits one poll interval. A thread of a live-patched program (klpctl run
/// in-process) passes safe points meanwhile: it holds no patched function here, and
/// the transition it waits for must not wait for it.
fn pause() {
    if thread::current_record().is_some() {
        thread::idle_wait(POLL);
    } else {
        std::thread::sleep(POLL);
    }
}

impl Ctl<'_> {
    fn target(&self) -> Result<&Target, CtlError> {
        self.target.as_ref().ok_or_else(|| {
            CtlError::new(
                ErrorKind::Local,
                "which process? name it with --pid PID or --socket PATH",
                None,
            )
        })
    }

    fn call<T: DeserializeOwned>(&self, req: &Request) -> Result<T, CtlError> {
        call(self.target()?, req)
    }

    fn say(&mut self, s: &str) {
        if !self.json {
            self.console.out(s);
        }
    }

    fn named(&self) -> String {
        self.target
            .as_ref()
            .map(|t| t.named.clone())
            .unwrap_or_default()
    }

    /// Waits for the transition of `patch` to end (polling `status`): a progress bar on
    /// a terminal, else one line per change.
    fn wait(&mut self, patch: &str) -> Result<Outcome, CtlError> {
        let start = Instant::now();
        let bar = (!self.json && self.console.terminal()).then(|| {
            let b = indicatif::ProgressBar::new(0);
            let style = indicatif::ProgressStyle::with_template(
                "{prefix} [{bar:30}] {pos}/{len} threads switched ({elapsed})\n{msg}",
            )
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar())
            .progress_chars("#>-");
            b.set_style(style);
            b
        });
        let mut ticking = false;
        let mut last = String::new();
        // An in-process klpctl's own thread holds no patched function here.
        if thread::current_record().is_some() {
            thread::safe_point();
        }
        loop {
            let st: Option<StatusEntry> = match self.call(&Request::Status) {
                Ok(s) => s,
                Err(e) => {
                    if let Some(b) = &bar {
                        b.finish_and_clear();
                    }
                    return Err(e);
                }
            };
            let st = st.filter(|s| s.patch == patch);
            let Some(s) = st else {
                if let Some(b) = &bar {
                    b.finish_and_clear();
                }
                return Ok(Outcome::Done);
            };
            let blockers: Vec<String> = s.blockers.iter().map(blocker_words).collect();
            match &bar {
                Some(b) => {
                    b.set_prefix(format!("'{}': {}", s.patch, s.target));
                    b.set_length(s.total);
                    b.set_position(s.switched);
                    if !ticking {
                        // From the first status on (before it the bar has nothing to
                        // show): the elapsed time moves between polls.
                        b.enable_steady_tick(Duration::from_millis(200));
                        ticking = true;
                    }
                    b.set_message(if blockers.is_empty() {
                        "  waiting for the threads to switch".to_string()
                    } else {
                        blockers
                            .iter()
                            .map(|l| format!("  waiting for {l}"))
                            .collect::<Vec<_>>()
                            .join("\n")
                    });
                }
                None => {
                    let mut line = format!(
                        "'{}': {} {}/{} threads switched",
                        s.patch, s.target, s.switched, s.total
                    );
                    if !blockers.is_empty() {
                        line.push_str("; waiting for ");
                        line.push_str(&blockers.join(", "));
                    }
                    if line != last {
                        self.say(&format!("{line}\n"));
                        last = line;
                    }
                }
            }
            if start.elapsed() >= self.timeout {
                if let Some(b) = &bar {
                    b.finish_and_clear();
                }
                let named = self.named();
                let msg = format!(
                    "the {} transition of '{patch}' is still running after {} s ({}/{} \
                     threads switched): `klpctl {named} status` shows what holds it, \
                     `klpctl {named} force {patch}` ends it at once (safe only if the \
                     threads it waits for are not in the code being replaced)\n",
                    s.target,
                    self.timeout.as_secs_f64(),
                    s.switched,
                    s.total
                );
                if self.json {
                    let v = serde_json::json!({"patch": patch, "done": false, "status": s});
                    self.console.out(&format!("{v}\n"));
                } else {
                    self.console.err(&format!("klpctl: {msg}"));
                }
                return Ok(Outcome::StillRunning);
            }
            pause();
        }
    }

    /// The patch named `name`, if listed.
    fn find(&self, name: &str) -> Result<Option<PatchEntry>, CtlError> {
        let all: Vec<PatchEntry> = self.call(&Request::List)?;
        Ok(all.into_iter().find(|p| p.name == name))
    }

    /// What a finished transition left: one line.
    fn after(&mut self, name: &str, enabling: bool) -> Result<(), CtlError> {
        let p = self.find(name)?;
        let line = match (p.as_ref().map(|p| p.enabled), enabling) {
            (Some(true), true) => format!("'{name}' is enabled: every thread runs the new code"),
            (_, true) => {
                format!("'{name}' is not enabled: its transition was reversed or it was replaced")
            }
            (Some(true), false) => {
                format!("'{name}' is enabled again: its disabling was reversed")
            }
            (_, false) => {
                format!("'{name}' is disabled: every thread runs the code it replaced")
            }
        };
        if self.json {
            let v = serde_json::json!({"patch": name, "done": true, "enabled": p.is_some_and(|p| p.enabled)});
            self.console.out(&format!("{v}\n"));
        } else {
            self.console.out(&format!("{line}\n"));
        }
        Ok(())
    }

    fn wait_and_report(&mut self, name: &str, enabling: bool) -> Result<Outcome, CtlError> {
        match self.wait(name)? {
            Outcome::Done => {
                self.after(name, enabling)?;
                Ok(Outcome::Done)
            }
            Outcome::StillRunning => Ok(Outcome::StillRunning),
        }
    }

    fn no_wait_note(&mut self, name: &str, what: &str) {
        if self.json {
            let v = serde_json::json!({"patch": name, "done": false});
            self.console.out(&format!("{v}\n"));
        } else {
            let named = self.named();
            self.console.out(&format!(
                "'{name}' is being {what}: `klpctl {named} status` shows the transition\n"
            ));
        }
    }

    fn enable_or_disable(
        &mut self,
        name: &str,
        enable: bool,
        no_wait: bool,
    ) -> Result<Outcome, CtlError> {
        let req = if enable {
            Request::Enable {
                patch: name.to_string(),
            }
        } else {
            Request::Disable {
                patch: name.to_string(),
            }
        };
        let _: Value = self.call(&req)?;
        if no_wait {
            self.no_wait_note(name, if enable { "enabled" } else { "disabled" });
            return Ok(Outcome::Done);
        }
        self.wait_and_report(name, enable)
    }

    fn load(
        &mut self,
        file: &Path,
        require_signature: bool,
        trusted_keys: Option<PathBuf>,
        no_wait: bool,
    ) -> Result<Outcome, CtlError> {
        let local = |e: std::io::Error, what: &Path| {
            let raw = e.raw_os_error().unwrap_or(libc::EIO);
            CtlError::new(
                ErrorKind::Local,
                format!(
                    "cannot read the patch file {} ({}): {}",
                    what.display(),
                    os_errno_text(raw),
                    io_words(&e)
                ),
                Some(raw),
            )
        };
        // The process reads the file: it gets the absolute path, checked here first.
        let abs = std::fs::canonicalize(file).map_err(|e| local(e, file))?;
        let bytes = std::fs::read(&abs).map_err(|e| local(e, &abs))?;
        let described = describe::describe(&bytes, &abs).ok();
        let keys = match trusted_keys {
            Some(k) => Some(std::fs::canonicalize(&k).map_err(|e| {
                let raw = e.raw_os_error().unwrap_or(libc::EIO);
                CtlError::new(
                    ErrorKind::Local,
                    format!(
                        "cannot use the trusted keys directory {} ({}): {}",
                        k.display(),
                        os_errno_text(raw),
                        io_words(&e)
                    ),
                    Some(raw),
                )
            })?),
            None => None,
        };
        let req = Request::Load {
            path: abs.clone(),
            require_signature,
            trusted_keys: keys,
        };
        let start = Instant::now();
        let eexist = Some(i64::from(Errno::EEXIST.to_kernel()));
        let loaded: LoadedEntry = loop {
            match self.call(&req) {
                Ok(l) => break l,
                // A patch of that name is loaded. Disabled, it is freed shortly after
                // its transition ends, and the loader then replaces its file: wait for
                // that. Enabled, the loader's message says what to do.
                Err(e) if e.errno == eexist && !no_wait && start.elapsed() < self.timeout => {
                    let Some(name) = described.as_ref().map(|d| d.name.clone()) else {
                        return Err(e);
                    };
                    if self.find(&name)?.is_some_and(|p| p.enabled) {
                        return Err(e);
                    }
                    pause();
                }
                Err(e) => return Err(e),
            }
        };
        if self.json {
            self.console.out(&format!(
                "{}\n",
                serde_json::to_string(&loaded).unwrap_or_default()
            ));
        } else {
            let mut line = format!("loaded '{}' from {}", loaded.name, abs.display());
            if let Some(s) = &loaded.signer {
                line.push_str(&format!(", signed by {s}"));
            }
            if let Some(d) = &described {
                let n: usize = d.objects.iter().map(|o| o.functions.len()).sum();
                line.push_str(&format!(
                    " ({n} function{}{})",
                    if n == 1 { "" } else { "s" },
                    if d.replace {
                        ", replacing the patches before it"
                    } else {
                        ""
                    }
                ));
            }
            self.console.out(&format!("{line}\n"));
            for w in &loaded.warnings {
                self.console.out(&format!("warning: {w}\n"));
            }
        }
        if no_wait {
            self.no_wait_note(&loaded.name, "enabled");
            return Ok(Outcome::Done);
        }
        self.wait_and_report(&loaded.name, true)
    }

    fn unload(&mut self, name: &str, no_wait: bool) -> Result<Outcome, CtlError> {
        let start = Instant::now();
        let mut forced = false;
        if let Some(p) = self.find(name)? {
            forced = p.forced;
            if p.enabled {
                // Disable (a patching transition is reversed), then wait.
                let _: Value = self.call(&Request::Disable {
                    patch: name.to_string(),
                })?;
                self.say(&format!("disabling '{name}' before it is unloaded\n"));
            }
            if p.enabled || p.transition {
                if no_wait {
                    let named = self.named();
                    self.console.err(&format!(
                        "klpctl: '{name}' is being disabled and cannot be unloaded before \
                         its transition ends: `klpctl {named} status` shows it; run \
                         `klpctl {named} unload {name}` again then\n"
                    ));
                    return Ok(Outcome::StillRunning);
                }
                if let Outcome::StillRunning = self.wait(name)? {
                    return Ok(Outcome::StillRunning);
                }
            }
        }
        // The patch is freed shortly after its transition: `-EBUSY` until then. A
        // forced patch is never released (a thread may still run its code).
        let ebusy = Some(i64::from(Errno::EBUSY.to_kernel()));
        loop {
            match self.call::<Value>(&Request::Unload {
                patch: name.to_string(),
            }) {
                Ok(_) => break,
                Err(mut e) if e.errno == ebusy => {
                    let listed = self.find(name)?;
                    forced |= listed.as_ref().is_some_and(|p| p.forced);
                    if listed.is_none() {
                        // Freed, and still held: only a forced patch is.
                        e.message.push_str(&if forced {
                            format!(
                                "; '{name}' was forced, so a thread may still run its code: \
                                 it stays loaded until the process exits"
                            )
                        } else {
                            format!(
                                "; '{name}' is disabled and still held: a patch whose \
                                 transition was forced stays loaded until the process exits"
                            )
                        });
                        return Err(e);
                    }
                    if no_wait || start.elapsed() >= self.timeout {
                        return Err(e);
                    }
                    pause();
                }
                Err(e) => return Err(e),
            }
        }
        if self.json {
            let v = serde_json::json!({"patch": name, "unloaded": true});
            self.console.out(&format!("{v}\n"));
        } else {
            self.console.out(&format!("unloaded '{name}'\n"));
        }
        Ok(Outcome::Done)
    }

    fn inspect(&mut self, file: &Path) -> Result<Outcome, CtlError> {
        let bytes = crate::loader::read_file(file).map_err(|e| CtlError {
            kind: ErrorKind::Local,
            message: e.message,
            errno: Some(i64::from(e.errno.to_kernel())),
        })?;
        let info = describe::describe(&bytes, file).map_err(|e| CtlError {
            kind: ErrorKind::Local,
            message: e.message,
            errno: Some(i64::from(e.errno.to_kernel())),
        })?;
        if self.json {
            let s = serde_json::to_string(&info).unwrap_or_default();
            self.console.out(&format!("{s}\n"));
        } else {
            self.console.out(&describe::render(&info));
        }
        Ok(Outcome::Done)
    }

    fn show<T: Serialize>(&mut self, v: &T, render: impl FnOnce(&T, &mut String)) {
        if self.json {
            let s = serde_json::to_string(v).unwrap_or_default();
            self.console.out(&format!("{s}\n"));
        } else {
            let mut s = String::new();
            render(v, &mut s);
            self.console.out(&s);
        }
    }

    fn run(&mut self, cmd: Command) -> Result<Outcome, CtlError> {
        match cmd {
            Command::List => {
                let v: Vec<PatchEntry> = self.call(&Request::List)?;
                self.show(&v, |v, o| render_list(v, o));
            }
            Command::Threads => {
                let v: Vec<ThreadEntry> = self.call(&Request::Threads)?;
                self.show(&v, |v, o| render_threads(v, o));
            }
            Command::Status => {
                let v: Option<StatusEntry> = self.call(&Request::Status)?;
                self.show(&v, |v, o| render_status(v.as_ref(), o));
            }
            Command::Enable { name, no_wait } => {
                return self.enable_or_disable(&name, true, no_wait);
            }
            Command::Disable { name, no_wait } => {
                return self.enable_or_disable(&name, false, no_wait);
            }
            Command::Force { name } => {
                let _: Value = self.call(&Request::Force {
                    patch: name.clone(),
                })?;
                if self.json {
                    self.console.out("null\n");
                } else {
                    self.console.out(&format!(
                        "forced the transition of '{name}': every thread has switched\n"
                    ));
                }
            }
            Command::Load {
                file,
                require_signature,
                trusted_keys,
                no_wait,
            } => return self.load(&file, require_signature, trusted_keys, no_wait),
            Command::Unload { name, no_wait } => return self.unload(&name, no_wait),
            Command::Inspect { file } => return self.inspect(&file),
        }
        Ok(Outcome::Done)
    }
}

/// Runs klpctl with `args` (without the program name), writing to `console`; returns
/// the exit status (0 done, 1 refused or failed, 2 usage, 3 still in transition).
pub fn run(args: &[String], console: &mut dyn Console) -> i32 {
    use clap::Parser;
    let cli = match Cli::try_parse_from(
        std::iter::once("klpctl".to_string()).chain(args.iter().cloned()),
    ) {
        Ok(c) => c,
        Err(e) => {
            let text = e.render().to_string();
            return match e.kind() {
                clap::error::ErrorKind::DisplayHelp
                | clap::error::ErrorKind::DisplayVersion
                | clap::error::ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand
                    if e.exit_code() == 0 =>
                {
                    console.out(&text);
                    0
                }
                _ => {
                    console.err(&text);
                    2
                }
            };
        }
    };
    let target = match (&cli.pid, &cli.socket) {
        (Some(pid), _) => Some(Target::pid(*pid)),
        (None, Some(s)) => Some(Target::socket(s)),
        (None, None) => None,
    };
    if target.is_none() && !matches!(cli.command, Command::Inspect { .. }) {
        console.err(
            "klpctl: which process? name it with --pid PID or --socket PATH (see klpctl --help)\n",
        );
        return 2;
    }
    let json = cli.json;
    let mut ctl = Ctl {
        target,
        console,
        json,
        timeout: cli.timeout,
    };
    match ctl.run(cli.command) {
        Ok(Outcome::Done) => 0,
        Ok(Outcome::StillRunning) => 3,
        Err(e) => {
            if json {
                let v = serde_json::json!({"ok": false, "error": {
                    "kind": e.kind.as_str(), "message": e.message, "errno": e.errno,
                }});
                ctl.console.out(&format!("{v}\n"));
            } else {
                ctl.console.err(&format!("klpctl: {}\n", e.message));
            }
            1
        }
    }
}

/// `klpctl` without the process around it: parses `args` (without the program name),
/// talks to the socket, writes everything it prints (output and errors) to `out` and
/// returns the exit status.
pub fn klpctl(args: &[String], out: &mut String) -> i32 {
    run(args, out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ctl(args: &[&str]) -> (i32, String) {
        let v: Vec<String> = args.iter().map(|s| s.to_string()).collect();
        let mut o = String::new();
        (klpctl(&v, &mut o), o)
    }

    #[test]
    fn progress_bars() {
        assert_eq!(progress_bar(0, 4, 4), "[----]");
        assert_eq!(progress_bar(2, 4, 4), "[##--]");
        assert_eq!(progress_bar(9, 4, 4), "[####]");
        assert_eq!(progress_bar(0, 0, 2), "[##]");
    }

    #[test]
    fn usage_errors() {
        let (c, o) = ctl(&["list"]);
        assert_eq!(c, 2);
        assert!(o.contains("which process"), "{o}");
        let (c, _) = ctl(&["--socket", "/x", "bogus"]);
        assert_eq!(c, 2);
        let (c, _) = ctl(&["--pid", "nope", "list"]);
        assert_eq!(c, 2);
        let (c, o) = ctl(&["--pid", "0", "list"]);
        assert_eq!(c, 2, "{o}");
        let (c, o) = ctl(&["--pid", "1", "--socket", "/x", "list"]);
        assert_eq!(c, 2, "{o}");
        let (c, o) = ctl(&["--timeout", "soon", "--pid", "1", "status"]);
        assert_eq!(c, 2, "{o}");
        let (c, o) = ctl(&["--help"]);
        assert_eq!(c, 0);
        assert!(o.contains("inspect"), "{o}");
        let (c, o) = ctl(&["--socket", "/nonexistent/klp.sock", "list"]);
        assert_eq!(c, 1);
        assert_eq!(
            o,
            "klpctl: there is no control socket at /nonexistent/klp.sock (-ENOENT): check \
             the path, or name the process with --pid\n"
        );
    }

    #[test]
    fn default_path_has_the_pid() {
        let p = default_socket_path(4242);
        assert!(p.to_string_lossy().ends_with("4242.sock"), "{p:?}");
        assert_eq!(pid_of_socket_name(&p), Some(4242));
        assert_eq!(
            pid_of_socket_name(Path::new("/tmp/klp-0-17.sock")),
            Some(17)
        );
        assert_eq!(pid_of_socket_name(Path::new("/tmp/other.sock")), None);
    }

    #[test]
    fn requests_on_the_wire() {
        let r = serde_json::to_string(&Request::Enable { patch: "p".into() }).expect("json");
        assert_eq!(r, r#"{"op":"enable","patch":"p"}"#);
        let r = serde_json::to_string(&Request::List).expect("json");
        assert_eq!(r, r#"{"op":"list"}"#);
        let r = serde_json::to_string(&Request::Load {
            path: "/p.ko".into(),
            require_signature: true,
            trusted_keys: None,
        })
        .expect("json");
        assert_eq!(
            r,
            r#"{"op":"load","path":"/p.ko","require_signature":true}"#
        );
        let r: Request =
            serde_json::from_str(r#"{"op":"load","path":"/x","extra":1}"#).expect("load");
        assert_eq!(
            r,
            Request::Load {
                path: "/x".into(),
                require_signature: false,
                trusted_keys: None
            }
        );
        assert_eq!(
            Answer::ok(Value::Null).to_line(),
            r#"{"ok":true,"result":null}"#
        );
        assert_eq!(
            Answer::errno(Errno::ENOENT, "gone (-ENOENT)").to_line(),
            r#"{"ok":false,"error":{"kind":"errno","message":"gone (-ENOENT)","errno":-2,"name":"ENOENT"}}"#
        );
    }

    fn answers(out: &[u8]) -> Vec<Answer> {
        out.split(|b| *b == b'\n')
            .filter(|l| !l.is_empty())
            .map(|l| serde_json::from_slice(l).expect("an answer line"))
            .collect()
    }

    #[test]
    fn sessions_split_lines_and_bound_requests() {
        let p = Process::global();
        // Dripped a byte at a time, two requests, an empty line, half a third.
        let mut s = Session::new(RequestContext::own());
        for b in b"{\"op\":\"list\"}\n\n{\"op\":\"threads\"}\n{\"op\"" {
            s.receive(p, &[*b]);
        }
        let a = answers(&s.take_output());
        assert_eq!(a.len(), 2, "{a:?}");
        assert!(a.iter().all(|a| a.ok), "{a:?}");
        assert_eq!(s.pending_input(), 5);
        // The end of the stream: the half request is answered (not JSON).
        s.end(p);
        let a = answers(&s.take_output());
        assert_eq!(a.len(), 1);
        let e = a[0].error.as_ref().expect("an error");
        assert_eq!(e.kind, ErrorKind::BadRequest);
        assert!(e.message.starts_with("the request is not JSON ("), "{e:?}");
        assert!(s.closing());
        // Too long without a newline: one error, closed, nothing held.
        let mut s = Session::new(RequestContext::own());
        s.receive(p, &vec![b' '; MAX_REQUEST]);
        assert!(s.take_output().is_empty());
        s.receive(p, b"  ");
        let a = answers(&s.take_output());
        assert_eq!(a.len(), 1);
        assert!(s.closing() && s.pending_input() == 0);
        assert_eq!(s.receive(p, b"{\"op\":\"list\"}\n"), 0, "closed");
        // A refused peer: one permission error, whatever it sends.
        let mut s = Session::refused(RequestContext {
            peer_uid: 4242,
            load_dir: None,
        });
        s.receive(p, b"\n{\"op\":\"list\"}\n");
        let a = answers(&s.take_output());
        assert_eq!(a.len(), 1);
        let e = a[0].error.as_ref().expect("an error");
        assert_eq!(e.kind, ErrorKind::Permission);
        assert!(
            e.message
                .starts_with("uid 4242 may not control this process (-EACCES)")
        );
    }

    #[test]
    fn loads_need_the_process_user_and_the_load_dir() {
        let p = Process::global();
        // SAFETY: `geteuid` has no preconditions.
        let me = unsafe { libc::geteuid() };
        let other = RequestContext {
            peer_uid: me.wrapping_add(1),
            load_dir: None,
        };
        if me != 0 {
            let a = handle_request(p, r#"{"op":"load","path":"/x.ko"}"#, &other);
            let e = a.error.expect("refused");
            assert_eq!(e.kind, ErrorKind::Permission, "{e:?}");
        }
        let jail = RequestContext {
            peer_uid: me,
            load_dir: Some(PathBuf::from("/nonexistent/klp-jail")),
        };
        for path in [
            "/etc/passwd",
            "/nonexistent/klp-jail/../x",
            "/nonexistent/klp-jail2/x",
        ] {
            let a = handle_request(p, &format!(r#"{{"op":"load","path":"{path}"}}"#), &jail);
            let e = a.error.expect("refused");
            assert_eq!(e.kind, ErrorKind::Permission, "{path}: {e:?}");
        }
        let a = handle_request(
            p,
            r#"{"op":"load","path":"/nonexistent/klp-jail/x.ko"}"#,
            &jail,
        );
        let e = a.error.expect("no such file");
        assert_eq!((e.kind, e.errno), (ErrorKind::Errno, Some(-2)), "{e:?}");
    }

    #[test]
    fn names_for_people() {
        assert_eq!(
            frame_words("_ZN3app6handle17h0123456789abcdefE+0x12/0x40 [vmlinux]"),
            "app::handle+0x12/0x40 in the program"
        );
        assert_eq!(frame_words("f+0x1/0x2 [libfoo]"), "f+0x1/0x2 in libfoo");
        assert_eq!(frame_words("0x1234"), "0x1234");
        assert_eq!(function_words("f,1"), "f");
        assert_eq!(
            function_words("_ZN3foo3barEv,2"),
            "foo::bar() (symbol position 2)"
        );
        assert_eq!(object_name("vmlinux"), "the program");
    }

    #[test]
    fn os_errnos() {
        assert_eq!(os_errno_text(libc::ESRCH), "-ESRCH");
        assert_eq!(os_errno_text(libc::ECONNREFUSED), "-ECONNREFUSED");
        assert_eq!(os_errno_text(4000), "-4000");
    }
}
