//! The control interface: a Unix socket served by the process, and the client side of
//! `klpctl`.
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
//! One JSON object per line in each direction. Requests:
//!
//! | request | result |
//! |---|---|
//! | `{"op":"list"}` | `[{"name","enabled","transition","forced","replace","stack_order","objects":[{"name","patched","functions":[…]}]}]` |
//! | `{"op":"threads"}` | `[{"task","tid","comm","patch_state","pending","kthread"}]` |
//! | `{"op":"status"}` | `null` or `{"patch","target","total","switched","blockers":[{"tid","comm","reason","function","frame","addr","symbol","detail"}]}` |
//! | `{"op":"enable"\|"disable"\|"force","patch":NAME}` | `null` (writes `enabled`/`force` as sysfs does) |
//!
//! Answers: `{"ok":true,"result":…}` or `{"ok":false,"error":{"kind","message","errno","name"}}`
//! with `kind` one of `bad_request`, `unknown_op`, `errno` (the core refused: `errno`
//! is the kernel's negative value, `name` its symbol), `permission` and `busy`.
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
//! `busy` error.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use klp::{Errno, PatchState, TraceError};

use crate::BlockReason;
use serde_json::{Value, json};

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

fn error(kind: &str, message: &str) -> Value {
    json!({"ok": false, "error": {"kind": kind, "message": message}})
}

fn errno_error(e: Errno) -> Value {
    json!({"ok": false, "error": {
        "kind": "errno",
        "message": format!("{e:?}"),
        "errno": e.to_kernel(),
        "name": e.name(),
    }})
}

fn state_json(s: PatchState) -> i32 {
    s.as_i32()
}

/// Answers one request line.
pub fn handle_request(p: &Process, line: &str) -> Value {
    let req = match serde_json::from_str::<Value>(line) {
        Ok(v) => v,
        Err(e) => {
            return error(
                "bad_request",
                &format!("the request is not JSON ({e}): send one JSON object per line"),
            );
        }
    };
    let Some(op) = req.get("op").and_then(Value::as_str) else {
        return error(
            "bad_request",
            "the request has no \"op\": send an object such as {\"op\":\"list\"}",
        );
    };
    let patch = req.get("patch").and_then(Value::as_str);
    let result = match op {
        "list" => json!(
            p.list()
                .into_iter()
                .map(|x| json!({
                    "name": x.name,
                    "enabled": x.enabled,
                    "transition": x.transition,
                    "forced": x.forced,
                    "replace": x.replace,
                    "stack_order": x.stack_order,
                    "objects": x.objects.into_iter().map(|(n, patched, f)| json!({
                        "name": n, "patched": patched, "functions": f,
                    })).collect::<Vec<_>>(),
                }))
                .collect::<Vec<_>>()
        ),
        "threads" => json!(
            p.threads()
                .into_iter()
                .map(|t| json!({
                    "task": t.task.0,
                    "tid": t.tid,
                    "comm": t.comm,
                    "patch_state": state_json(t.state),
                    "pending": t.pending,
                    "kthread": t.kthread,
                }))
                .collect::<Vec<_>>()
        ),
        "status" => match p.status() {
            None => Value::Null,
            Some(s) => json!({
                "patch": s.patch,
                "target": s.target.verb(),
                "total": s.total,
                "switched": s.switched,
                "blockers": s.blockers.into_iter().map(|b| {
                    let (reason, function, frame, addr) = match &b.reason {
                        BlockReason::NoReliableStacks => ("no_reliable_stacks", None, None, None),
                        BlockReason::Running => ("running", None, None, None),
                        BlockReason::Unreliable(TraceError::TooDeep) => ("too_deep", None, None, None),
                        BlockReason::Unreliable(_) => ("unreliable", None, None, None),
                        BlockReason::SleepingOn { func, addr, frame } => {
                            ("sleeping_on", Some(func.clone()), Some(*frame), Some(*addr))
                        }
                    };
                    json!({
                        "tid": b.thread.tid,
                        "comm": b.thread.comm,
                        "reason": reason,
                        "function": function,
                        "frame": frame,
                        "addr": addr.map(|a| format!("{a:#x}")),
                        "symbol": b.frame_symbol,
                        "detail": b.detail,
                    })
                }).collect::<Vec<_>>(),
            }),
        },
        "enable" | "disable" | "force" => {
            let Some(name) = patch else {
                return error("bad_request", "missing \"patch\"");
            };
            let r = match op {
                "enable" => p.enable(name),
                "disable" => p.disable(name),
                _ => p.force(name),
            };
            match r {
                Ok(()) => Value::Null,
                Err(e) => return errno_error(e),
            }
        }
        other => return error("unknown_op", &format!("unknown op \"{other}\"")),
    };
    json!({"ok": true, "result": result})
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

/// One client connection of the server's event loop.
struct Conn {
    s: UnixStream,
    /// Bytes of the request being received (no newline yet).
    inbuf: Vec<u8>,
    /// Answers not written yet.
    out: Vec<u8>,
    /// When the connection is dropped unless a request completes first.
    deadline: Instant,
    /// The server's request timeout.
    timeout: Duration,
    /// No more requests: close once `out` is written.
    closing: bool,
    /// The peer's uid, when it may not control the process (it gets one `permission`
    /// error).
    refused: Option<u32>,
}

impl Conn {
    fn answer(&mut self, v: &Value) {
        self.out.extend_from_slice(v.to_string().as_bytes());
        self.out.push(b'\n');
    }

    /// Answers every complete line received so far.
    fn answer_lines(&mut self, p: &Process) {
        while let Some(n) = self.inbuf.iter().position(|&b| b == b'\n') {
            let line: Vec<u8> = self.inbuf.drain(..=n).collect();
            let line = &line[..n];
            self.answer_line(p, line);
            if self.closing {
                self.inbuf.clear();
                return;
            }
        }
        if self.inbuf.len() > MAX_REQUEST {
            self.inbuf.clear();
            self.answer(&error(
                "bad_request",
                &format!(
                    "the request is longer than {MAX_REQUEST} bytes; the connection is closed"
                ),
            ));
            self.closing = true;
        }
    }

    fn answer_line(&mut self, p: &Process, line: &[u8]) {
        if let Some(uid) = self.refused {
            // Read the request first: closing a socket with unread data makes the
            // client's write or read fail, and it would never see the answer.
            self.answer(&error(
                "permission",
                &format!("uid {uid} may not control this process"),
            ));
            self.closing = true;
            return;
        }
        if line.len() > MAX_REQUEST {
            self.answer(&error(
                "bad_request",
                &format!(
                    "the request is longer than {MAX_REQUEST} bytes; the connection is closed"
                ),
            ));
            self.closing = true;
            return;
        }
        let Ok(text) = std::str::from_utf8(line) else {
            self.answer(&error(
                "bad_request",
                "the request is not UTF-8 text: send one JSON object per line",
            ));
            return;
        };
        if text.trim().is_empty() {
            return;
        }
        let v = handle_request(p, text);
        self.answer(&v);
        self.deadline = Instant::now() + self.timeout;
    }

    /// Reads what the client sent; `false` at the end of its stream or on an error.
    fn read_some(&mut self) -> bool {
        let mut buf = [0u8; 16 * 1024];
        loop {
            match (&self.s).read(&mut buf) {
                Ok(0) => return false,
                Ok(n) => {
                    self.inbuf
                        .extend_from_slice(buf.get(..n).unwrap_or_default());
                    if self.inbuf.len() > MAX_REQUEST || n < buf.len() {
                        return true;
                    }
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return true,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(_) => return false,
            }
        }
    }

    /// Writes what it can of the pending answers; `false` on an error.
    fn write_some(&mut self) -> bool {
        while !self.out.is_empty() {
            match (&self.s).write(&self.out) {
                Ok(0) => return false,
                Ok(n) => {
                    self.out.drain(..n);
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
    p: &Process,
    listener: &UnixListener,
    allowed: &[u32],
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
            if !c.closing && c.out.len() < MAX_PENDING_OUT {
                events |= libc::POLLIN;
            }
            if !c.out.is_empty() {
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
            if revents & (libc::POLLIN | libc::POLLHUP | libc::POLLERR) != 0 && !c.closing {
                if !c.read_some() {
                    // The end of the client's stream: a last request without its
                    // newline is answered all the same.
                    if !c.inbuf.is_empty() && c.inbuf.len() <= MAX_REQUEST {
                        c.inbuf.push(b'\n');
                    }
                    c.closing = true;
                }
                c.answer_lines(p);
            }
            if !c.out.is_empty() && !c.write_some() {
                alive = false;
            }
            if c.closing && c.out.is_empty() {
                alive = false;
            }
            if alive && now >= c.deadline && !c.closing {
                // The server may have been busy with other requests past this deadline:
                // what the client sent meanwhile is taken first (it is not the client
                // that was slow).
                if !c.read_some() {
                    c.closing = true;
                }
                c.answer_lines(p);
                if !c.write_some() {
                    alive = false;
                }
            }
            if alive && Instant::now() >= c.deadline {
                // Too slow: a request left half-sent, no request at all, or answers not
                // read. Tell it (if it can take it) and drop it.
                if c.out.is_empty() && !c.inbuf.is_empty() {
                    c.answer(&error(
                        "bad_request",
                        &format!(
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
            let mut c = Conn {
                s,
                inbuf: Vec::new(),
                out: Vec::new(),
                deadline: Instant::now() + timeout,
                timeout,
                closing: false,
                refused: None,
            };
            match peer_uid(&c.s) {
                Ok(uid) if allowed.contains(&uid) => {}
                Ok(uid) => c.refused = Some(uid),
                Err(_) => continue,
            }
            if conns.len() >= MAX_CLIENTS {
                c.answer(&error(
                    "busy",
                    &format!(
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
        let stop = Arc::new(AtomicBool::new(false));
        let stop2 = stop.clone();
        let handle = std::thread::Builder::new()
            .name("klp-ctl".into())
            .spawn(move || {
                thread::mark_kthread();
                serve_loop(self, &listener, &allowed, timeout, &stop2);
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
    /// `connect`, `io`, `protocol`, or the server's kind (`bad_request`, `unknown_op`,
    /// `errno`, `permission`, `busy`).
    pub kind: String,
    /// Human-readable text.
    pub message: String,
    /// The kernel's (negative) error number, for `errno`.
    pub errno: Option<i64>,
}

impl std::fmt::Display for CtlError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.errno {
            Some(e) => write!(f, "{} ({e})", self.message),
            None => write!(f, "{}: {}", self.kind, self.message),
        }
    }
}

fn cerr(kind: &str, message: impl Into<String>) -> CtlError {
    CtlError {
        kind: kind.into(),
        message: message.into(),
        errno: None,
    }
}

/// Sends one request and returns its result.
pub fn request(path: &Path, req: &Value) -> Result<Value, CtlError> {
    let s = UnixStream::connect(path)
        .map_err(|e| cerr("connect", format!("{}: {e}", path.display())))?;
    let _ = s.set_read_timeout(Some(Duration::from_secs(30)));
    let mut w = s.try_clone().map_err(|e| cerr("io", e.to_string()))?;
    // A server that refuses the peer may answer and close before reading: a failed
    // write still leaves its answer to read.
    let wrote = writeln!(w, "{req}");
    let mut line = String::new();
    let read = BufReader::new(s).read_line(&mut line);
    if line.trim().is_empty() {
        let e = match (wrote, read) {
            (Err(e), _) | (_, Err(e)) => e.to_string(),
            _ => "connection closed without an answer".to_string(),
        };
        return Err(cerr("io", e));
    }
    let v: Value = serde_json::from_str(&line)
        .map_err(|_| cerr("protocol", format!("bad answer {line:?}")))?;
    if v.get("ok") == Some(&Value::Bool(true)) {
        return Ok(v.get("result").cloned().unwrap_or(Value::Null));
    }
    let e = v.get("error").cloned().unwrap_or(Value::Null);
    Err(CtlError {
        kind: e
            .get("kind")
            .and_then(Value::as_str)
            .unwrap_or("protocol")
            .into(),
        message: e
            .get("message")
            .and_then(Value::as_str)
            .unwrap_or("")
            .into(),
        errno: e.get("errno").and_then(Value::as_i64),
    })
}

const USAGE: &str = "usage: klpctl (--pid PID | --socket PATH) [--json] \
                     (list | threads | status | enable PATCH | disable PATCH | force PATCH)";

fn b(v: &Value, k: &str) -> u8 {
    u8::from(v.get(k).and_then(Value::as_bool).unwrap_or(false))
}

fn s<'a>(v: &'a Value, k: &str) -> &'a str {
    v.get(k).and_then(Value::as_str).unwrap_or("")
}

fn render_list(v: &Value, out: &mut String) {
    let Some(patches) = v.as_array() else { return };
    if patches.is_empty() {
        out.push_str("no patches\n");
    }
    for p in patches {
        out.push_str(&format!(
            "{}  enabled={} transition={} forced={} replace={} stack_order={}\n",
            s(p, "name"),
            b(p, "enabled"),
            b(p, "transition"),
            b(p, "forced"),
            b(p, "replace"),
            p.get("stack_order").and_then(Value::as_u64).unwrap_or(0)
        ));
        for o in p
            .get("objects")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
        {
            out.push_str(&format!(
                "  {}  patched={}\n",
                s(o, "name"),
                b(o, "patched")
            ));
            for f in o
                .get("functions")
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
            {
                out.push_str(&format!("    {}\n", f.as_str().unwrap_or("")));
            }
        }
    }
}

fn render_threads(v: &Value, out: &mut String) {
    out.push_str("TID      STATE  PENDING  COMM\n");
    for t in v.as_array().into_iter().flatten() {
        out.push_str(&format!(
            "{:<8} {:>5}  {:<7}  {}{}\n",
            t.get("tid").and_then(Value::as_i64).unwrap_or(0),
            t.get("patch_state").and_then(Value::as_i64).unwrap_or(-1),
            b(t, "pending"),
            s(t, "comm"),
            if b(t, "kthread") == 1 { " [klp]" } else { "" }
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
    format!("[{}{}]", "#".repeat(filled), "-".repeat(width - filled))
}

fn render_status(v: &Value, out: &mut String) {
    if v.is_null() {
        out.push_str("no transition\n");
        return;
    }
    let total = v.get("total").and_then(Value::as_u64).unwrap_or(0);
    let done = v.get("switched").and_then(Value::as_u64).unwrap_or(0);
    out.push_str(&format!(
        "'{}': {} {} {done}/{total} threads\n",
        s(v, "patch"),
        s(v, "target"),
        progress_bar(done, total, 30)
    ));
    for bl in v
        .get("blockers")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
    {
        let who = format!(
            "{}:{}",
            s(bl, "comm"),
            bl.get("tid").and_then(Value::as_i64).unwrap_or(0)
        );
        let why = match s(bl, "reason") {
            "sleeping_on" => format!(
                "sleeping on function {} (frame {}: {})",
                s(bl, "function"),
                bl.get("frame").and_then(Value::as_u64).unwrap_or(0),
                bl.get("symbol")
                    .and_then(Value::as_str)
                    .unwrap_or_else(|| s(bl, "addr"))
            ),
            "running" => "is running (does not answer klp's signal)".to_string(),
            "too_deep" => "has a stack too deep to check".to_string(),
            "unreliable" => format!(
                "has an unreliable stack{}",
                bl.get("detail")
                    .and_then(Value::as_str)
                    .map(|d| format!(" ({d})"))
                    .unwrap_or_default()
            ),
            other => other.to_string(),
        };
        out.push_str(&format!("  {who} {why}\n"));
    }
}

/// `klpctl` without the process around it: parses `args` (without the program name),
/// talks to the socket, writes what it prints to `out` and returns the exit status.
pub fn klpctl(args: &[String], out: &mut String) -> i32 {
    let mut socket: Option<PathBuf> = None;
    let mut json_out = false;
    let mut rest: Vec<&str> = Vec::new();
    let mut it = args.iter();
    while let Some(a) = it.next() {
        match a.as_str() {
            "--json" => json_out = true,
            "--pid" => match it.next().and_then(|p| p.parse::<u32>().ok()) {
                Some(pid) => socket = Some(default_socket_path(pid)),
                None => {
                    out.push_str(&format!("klpctl: --pid needs a process id\n{USAGE}\n"));
                    return 2;
                }
            },
            "--socket" => match it.next() {
                Some(p) => socket = Some(PathBuf::from(p)),
                None => {
                    out.push_str(&format!("klpctl: --socket needs a path\n{USAGE}\n"));
                    return 2;
                }
            },
            "-h" | "--help" => {
                out.push_str(USAGE);
                out.push('\n');
                return 0;
            }
            other => rest.push(other),
        }
    }
    let Some(socket) = socket else {
        out.push_str(&format!("klpctl: which process? {USAGE}\n"));
        return 2;
    };
    let req = match rest.as_slice() {
        [op @ ("list" | "threads" | "status")] => json!({"op": op}),
        [op @ ("enable" | "disable" | "force"), patch] => json!({"op": op, "patch": patch}),
        _ => {
            out.push_str(&format!("{USAGE}\n"));
            return 2;
        }
    };
    let op = rest.first().copied().unwrap_or("");
    match request(&socket, &req) {
        Ok(v) => {
            if json_out {
                out.push_str(&format!("{v}\n"));
            } else {
                match op {
                    "list" => render_list(&v, out),
                    "threads" => render_threads(&v, out),
                    "status" => render_status(&v, out),
                    _ => {}
                }
            }
            0
        }
        Err(e) => {
            if json_out {
                out.push_str(&format!(
                    "{}\n",
                    json!({"ok": false, "error": {"kind": e.kind, "message": e.message, "errno": e.errno}})
                ));
            } else {
                let target = rest.get(1).map(|p| format!(" {p}")).unwrap_or_default();
                out.push_str(&format!("klpctl: {op}{target}: {e}\n"));
            }
            1
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn progress_bars() {
        assert_eq!(progress_bar(0, 4, 4), "[----]");
        assert_eq!(progress_bar(2, 4, 4), "[##--]");
        assert_eq!(progress_bar(9, 4, 4), "[####]");
        assert_eq!(progress_bar(0, 0, 2), "[##]");
    }

    #[test]
    fn usage_errors() {
        let mut o = String::new();
        assert_eq!(klpctl(&["list".into()], &mut o), 2);
        assert!(o.contains("which process"), "{o}");
        let mut o = String::new();
        assert_eq!(
            klpctl(&["--socket".into(), "/x".into(), "bogus".into()], &mut o),
            2
        );
        let mut o = String::new();
        assert_eq!(klpctl(&["--pid".into(), "nope".into()], &mut o), 2);
        let mut o = String::new();
        let r = klpctl(
            &[
                "--socket".into(),
                "/nonexistent/klp.sock".into(),
                "list".into(),
            ],
            &mut o,
        );
        assert_eq!(r, 1);
        assert!(o.contains("connect"), "{o}");
    }

    #[test]
    fn default_path_has_the_pid() {
        let p = default_socket_path(4242);
        assert!(p.to_string_lossy().ends_with("4242.sock"), "{p:?}");
    }
}
