//! A thread parked inside a patched function until released: it holds a transition
//! open. The function's versions call [`maybe_park`] where the thread should wait.

use std::cell::RefCell;
use std::sync::mpsc;
use std::time::Duration;

thread_local! {
    /// Set on a parking thread: (tell the test it is parked, wait for the release).
    static PARK: RefCell<Option<(mpsc::Sender<()>, mpsc::Receiver<()>)>> =
        const { RefCell::new(None) };
}

/// Parks the calling thread here if it asked to (once).
pub fn maybe_park() {
    if let Some((parked, release)) = PARK.with(|p| p.borrow_mut().take()) {
        parked.send(()).ok();
        let _ = release.recv();
    }
}

/// A thread parked in [`maybe_park`] inside the call `call` makes.
pub struct Parker {
    release: mpsc::Sender<()>,
    handle: std::thread::JoinHandle<u64>,
    /// The parked thread's tid.
    pub tid: i32,
}

impl Parker {
    /// Starts a thread that runs `call` and returns once
    /// the thread waits in [`maybe_park`] (at most `wait`).
    pub fn start(call: fn() -> u64, wait: Duration) -> Parker {
        let (release, release_rx) = mpsc::channel();
        let (parked_tx, parked_rx) = mpsc::channel();
        let (tid_tx, tid_rx) = mpsc::channel();
        let handle = std::thread::spawn(move || {
            let me = klp_user::thread::current_record().expect("registered");
            tid_tx.send(me.tid()).ok();
            PARK.with(|p| *p.borrow_mut() = Some((parked_tx, release_rx)));
            call()
        });
        let tid = tid_rx.recv().expect("tid");
        parked_rx
            .recv_timeout(wait)
            .expect("the parker reaches its wait");
        // Let it reach the wait.
        std::thread::sleep(Duration::from_millis(20));
        Parker {
            release,
            handle,
            tid,
        }
    }

    /// Releases the thread; returns what its call returned.
    pub fn finish(self) -> u64 {
        self.release.send(()).expect("release");
        self.handle.join().expect("parker")
    }
}
