//! `klp-demo`: a multi-threaded program that keeps serving requests while klp
//! live-patches it: a fix is applied, replaced by a cumulative patch while one request
//! is stuck inside the code being replaced (the transition waits for it, and `klpctl`
//! shows which thread and function hold it up), and reverted — without a restart.
//! It runs on x86_64, aarch64, ppc64le and s390x (`ci/demo --arch A` runs it under
//! QEMU).

mod demo {
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
    use std::sync::{Mutex, mpsc};
    use std::time::{Duration, Instant};

    use klp::{FuncDesc, ObjectDesc, PatchDesc};
    use klp_user::ctl::ServeOptions;
    use klp_user::{Config, Process, ProcessHost};

    klp_user::patchable! {
        /// The request handler: version 1 has a bug (it answers 1 for every request).
        pub fn klp_demo_handle(req: u64) -> u64 {
            maybe_stall();
            version(req, 1)
        }
    }

    /// The first fix: version 2.
    extern "C" fn handle_v2(req: u64) -> u64 {
        maybe_stall();
        version(req, 2)
    }

    /// The cumulative patch: version 3.
    extern "C" fn handle_v3(req: u64) -> u64 {
        version(req, 3)
    }

    /// The answer of version `v` to a request (the request only keeps the call honest).
    fn version(req: u64, v: u64) -> u64 {
        std::hint::black_box(req);
        v
    }

    static STALL: Mutex<Option<mpsc::Receiver<()>>> = Mutex::new(None);
    static STALLED: AtomicBool = AtomicBool::new(false);

    /// One request, if asked to, waits inside the handler until released.
    fn maybe_stall() {
        let rx = STALL.lock().map(|mut g| g.take()).ok().flatten();
        if let Some(rx) = rx {
            STALLED.store(true, Ordering::Release);
            let _ = rx.recv();
        }
    }

    static COUNTS: [AtomicU64; 4] = [const { AtomicU64::new(0) }; 4];
    static STOP: AtomicBool = AtomicBool::new(false);

    fn snapshot() -> [u64; 4] {
        core::array::from_fn(|i| COUNTS[i].swap(0, Ordering::Relaxed))
    }

    fn report(what: &str, period: Duration) {
        std::thread::sleep(period);
        let c = snapshot();
        println!(
            "    [{what}] answers in the last {} ms: v1 {:>6}  v2 {:>6}  v3 {:>6}",
            period.as_millis(),
            c[1],
            c[2],
            c[3]
        );
    }

    fn klpctl(args: &[&str]) {
        let mut full = vec!["--pid".to_string(), std::process::id().to_string()];
        full.extend(args.iter().map(|s| s.to_string()));
        println!("    $ klpctl {}", full.join(" "));
        let mut out = String::new();
        klp_user::ctl::klpctl(&full, &mut out);
        for l in out.lines() {
            println!("      {l}");
        }
    }

    fn patch(name: &str, new: u64, replace: bool) -> PatchDesc<ProcessHost> {
        PatchDesc::new(name)
            .object(ObjectDesc::vmlinux().func(FuncDesc::new("klp_demo_handle", new)))
            .replace(replace)
    }

    fn wait(p: &Process) {
        if !p.wait_transition(Duration::from_secs(30)) {
            println!("    (transition still running after 30 s)");
        }
    }

    fn say(s: &str) {
        println!("\n==> {s}");
    }

    fn show_log(p: &Process, since: u64) -> u64 {
        for l in p.log_since(since) {
            println!("    | {l}");
        }
        p.log().1
    }

    pub fn run() {
        let p = Process::init(Config::default());
        let _server = p.serve(ServeOptions::default()).ok();
        println!(
            "klp demo: process {} serves requests on 4 threads",
            std::process::id()
        );
        let workers: Vec<_> = (0..4u64)
            .map(|i| {
                std::thread::spawn(move || {
                    let mut req = i;
                    while !STOP.load(Ordering::Relaxed) {
                        let v = klp_demo_handle(req) as usize;
                        if let Some(c) = COUNTS.get(v) {
                            c.fetch_add(1, Ordering::Relaxed);
                        }
                        req += 4;
                        std::thread::sleep(Duration::from_micros(200));
                    }
                })
            })
            .collect();
        let period = Duration::from_millis(300);
        let mut since = p.log().1;

        say("Version 1 runs; every answer is wrong (v1).");
        report("before", period);

        say(
            "Apply the fix (a livepatch replacing klp_demo_handle) while the threads keep serving.",
        );
        let t0 = Instant::now();
        match p.enable_patch(patch("fix_v2", handle_v2 as *const () as u64, false)) {
            Ok(_) => {}
            Err(e) => {
                println!("    enabling failed: {e:?}");
                since = show_log(p, since);
            }
        }
        wait(p);
        println!("    transition done in {} ms", t0.elapsed().as_millis());
        since = show_log(p, since);
        report("after fix_v2", period);
        klpctl(&["list"]);

        say("One request gets stuck inside v2; a cumulative patch (replace) brings v3.");
        let (release, rx) = mpsc::channel();
        *STALL.lock().expect("stall") = Some(rx);
        while !STALLED.load(Ordering::Acquire) {
            std::thread::sleep(Duration::from_millis(1));
        }
        let _ = p.enable_patch(patch("fix_v3", handle_v3 as *const () as u64, true));
        std::thread::sleep(Duration::from_millis(1500));
        since = show_log(p, since);
        println!("    the transition waits: the stuck thread is inside the code being replaced");
        klpctl(&["status"]);
        report("during the transition", period);

        say("The stuck request finishes; its thread can switch, the transition completes.");
        let _ = release.send(());
        wait(p);
        since = show_log(p, since);
        report("after fix_v3", period);
        klpctl(&["list"]);

        say("Revert: disable fix_v3; every thread goes back to the original code.");
        let _ = p.disable("fix_v3");
        wait(p);
        let _ = show_log(p, since);
        report("after revert", period);

        STOP.store(true, Ordering::Relaxed);
        for w in workers {
            let _ = w.join();
        }
        say("Done: the process never restarted; the livepatch: lines are the kernel's texts.");
    }
}

fn main() {
    // The main thread is not created by `pthread_create`: make this its outermost
    // walkable frame, so that its stack checks are complete.
    klp_user::thread::run_as_task(demo::run);
}
