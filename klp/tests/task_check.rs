//! `Host::task_check_done`: the core tells the host once it has acted on a task's stack
//! check — switched the task or not — so that a host that keeps a checked task stopped
//! (the process host) releases it then, and not as a side effect of another call.

mod common;

use klp::{Addr, FuncDesc, Klp, ObjectDesc, PatchDesc, PatchState, TraceError};

use common::taskhost::{Event, Stack, TaskHost};

const OLD: Addr = 0x40_1000;
const NEW: Addr = 0x40_8000;
const CALLER: Addr = 0x40_3000;
const PATCH: &str = "task_check_patch";

/// A host whose tasks' traces are the stacks given.
fn host(tasks: &[(u64, Stack)]) -> TaskHost {
    TaskHost::new(tasks, PATCH, ("old", OLD), NEW, true, |t| Ok(t.to_vec()))
}

/// Checks the protocol on the events so far: every stack check of a task is followed
/// by exactly one `Done` of the same task before anything else is checked or logged,
/// and after the task's switch when there is one. Returns how many checks gave a trace
/// and how many `Done`s came.
fn verify(host: &TaskHost) -> (usize, usize) {
    let mut open: Option<u64> = None;
    let (mut traced, mut done) = (0, 0);
    for (i, e) in host.events.iter().enumerate() {
        match *e {
            Event::Traced(t) | Event::Failed(t) => {
                assert_eq!(open, None, "event {i}: a check before the last one's end");
                open = Some(t);
                if matches!(e, Event::Traced(_)) {
                    traced += 1;
                }
            }
            Event::Switched(t, _) => {
                if let Some(o) = open {
                    assert_eq!(o, t, "event {i}: a switch of another task");
                }
            }
            Event::Done(t) => {
                assert_eq!(open, Some(t), "event {i}: done without its check");
                open = None;
                done += 1;
            }
            Event::Logged => assert_eq!(open, None, "event {i}: a log line mid-check"),
        }
    }
    assert_eq!(open, None, "the last check was never done");
    (traced, done)
}

fn patch() -> PatchDesc<TaskHost> {
    PatchDesc::new(PATCH).object(ObjectDesc::vmlinux().func(FuncDesc::new("old", NEW)))
}

#[test]
fn task_check_done_follows_every_check_switched_or_not() {
    let mut host = host(&[
        (1, Stack::Trace(vec![CALLER + 4])),             // switches
        (2, Stack::Trace(vec![OLD + 0x10, CALLER + 8])), // sleeps in the old function
        (3, Stack::Fails(TraceError::Unreliable)),
        (4, Stack::Trace(vec![CALLER + 0x10])), // switches
    ]);
    let mut klp = Klp::new();
    klp.enable_patch(&mut host, patch()).expect("enable");
    assert!(
        klp.transition_patch().is_some(),
        "tasks 2 and 3 keep it open"
    );
    for t in [1, 4] {
        assert_eq!(host.state(t), PatchState::Patched, "task {t}");
    }
    for t in [2, 3] {
        assert_eq!(host.state(t), PatchState::Unpatched, "task {t}");
    }
    let (traced, done) = verify(&host);
    assert_eq!(traced, 3, "tasks 1, 2 and 4 were traced: {:?}", host.events);
    assert_eq!(
        done, 4,
        "one per check, failed ones included: {:?}",
        host.events
    );
    // A switched task hears it after its switch.
    let switched = host
        .events
        .iter()
        .position(|e| *e == Event::Switched(4, PatchState::Patched))
        .expect("task 4 switched");
    assert_eq!(host.events.get(switched + 1), Some(&Event::Done(4)));
    // Not switched: done right after its check.
    let checked = host
        .events
        .iter()
        .position(|e| *e == Event::Traced(2))
        .expect("task 2 checked");
    assert_eq!(host.events.get(checked + 1), Some(&Event::Done(2)));

    // What blocks the transition: the same protocol, nothing switched.
    host.events.clear();
    let mut blocked = Vec::new();
    klp.blockers(&mut host, &mut |_, t, _| blocked.push(t.0));
    assert_eq!(blocked, [2, 3]);
    assert_eq!(verify(&host), (1, 2), "{:?}", host.events);
    assert!(
        !host.events.iter().any(|e| matches!(e, Event::Switched(..))),
        "{:?}",
        host.events
    );

    // The tasks leave: the next attempt switches them, each check done once.
    host.events.clear();
    for t in [2, 3] {
        host.set_stack(t, Stack::Trace(vec![CALLER + 8]));
    }
    assert!(klp.try_complete_transition(&mut host), "completes");
    let (traced, done) = verify(&host);
    assert_eq!((traced, done), (2, 2), "{:?}", host.events);
}
