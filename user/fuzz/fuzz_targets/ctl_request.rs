//! The control server's request handling on arbitrary bytes, as its event loop takes
//! them from a connection (`klp_user::ctl::Session`): split into lines, the length
//! limit, the UTF-8 and JSON checks, then `handle_request` on this process's
//! `Process`. Nothing may panic or hang; every answer is one line of the protocol's
//! JSON; an incomplete request held is bounded; and no request changes the process:
//! there are no patches to act on, and `load` reads only under an empty directory of
//! its own (the server's `load_dir` rule), so no file from disk is ever loaded.

#![no_main]

use std::path::PathBuf;
use std::sync::OnceLock;

use klp_user::ctl::{Answer, MAX_REQUEST, RequestContext, Session};
use klp_user::{Config, Process};
use libfuzzer_sys::fuzz_target;

struct Fixture {
    p: &'static Process,
    ctx: RequestContext,
}

fn fixture() -> &'static Fixture {
    static F: OnceLock<Fixture> = OnceLock::new();
    F.get_or_init(|| {
        let dir: PathBuf =
            std::env::temp_dir().join(format!("klp-ctl-fuzz-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("the load directory");
        let p = Process::init(Config {
            log_stderr: false,
            ..Config::default()
        });
        Fixture {
            p,
            ctx: RequestContext {
                // SAFETY: `geteuid` has no preconditions.
                peer_uid: unsafe { libc::geteuid() },
                load_dir: Some(dir),
            },
        }
    })
}

fuzz_target!(|data: &[u8]| {
    let f = fixture();
    // The first byte says how the bytes arrive (in reads of 1 to 128 bytes, as a
    // socket delivers them) and whether the peer may control the process.
    let (head, rest) = data.split_first().unwrap_or((&0, &[]));
    let chunk = usize::from(head & 0x7f) + 1;
    let mut s = if head & 0x80 != 0 {
        Session::refused(RequestContext {
            peer_uid: f.ctx.peer_uid.wrapping_add(1),
            load_dir: f.ctx.load_dir.clone(),
        })
    } else {
        Session::new(f.ctx.clone())
    };
    let mut out = Vec::new();
    for c in rest.chunks(chunk) {
        s.receive(f.p, c);
        assert!(
            s.pending_input() <= MAX_REQUEST + chunk,
            "an incomplete request of {} bytes is held",
            s.pending_input()
        );
        out.extend(s.take_output());
        if s.closing() {
            break;
        }
    }
    s.end(f.p);
    out.extend(s.take_output());
    let lines = rest.iter().filter(|b| **b == b'\n').count() + 1;
    let mut answers = 0;
    for line in out.split(|b| *b == b'\n').filter(|l| !l.is_empty()) {
        let a: Answer = serde_json::from_slice(line).unwrap_or_else(|e| {
            panic!(
                "an answer is not the protocol's JSON ({e}): {:?}",
                String::from_utf8_lossy(line)
            )
        });
        assert_eq!(a.ok, a.error.is_none(), "{a:?}");
        answers += 1;
    }
    // One answer per line at most, and one more for a request that is too long.
    assert!(answers <= lines + 1, "{answers} answers to {lines} lines");
    assert!(
        f.p.list().is_empty(),
        "a fuzzed request changed the patches"
    );
});
