//! System states beyond the shipped scenarios: a reversed cumulative transition hands
//! the state back, a failed enable frees what pre_patch allocated, and the state API's
//! edges.

use klp::{Host, PatchState};
use klp_sim::Kernel;
use klp_sim::kernel::ModError;

fn insmod(k: &mut Kernel, m: &str) -> Result<(), ModError> {
    k.insmod_cmd(m, &[])
}

fn lines_since(k: &Kernel, n: usize) -> Vec<String> {
    k.world.dmesg[n..]
        .iter()
        .map(|(_, l)| l.clone())
        .filter(|l| l.starts_with("test_klp_state"))
        .collect()
}

/// test_klp_state2 replaces test_klp_state, but a task with an unreliable stack holds
/// the transition; writing 0 reverses it. state2 gives the change back (it finds the
/// previous state) and test_klp_state keeps its data and its console_loglevel change.
#[test]
fn reversed_cumulative_transition_gives_the_state_back() {
    let mut k = Kernel::boot(2);
    insmod(&mut k, "test_klp_state").expect("state");
    k.sleep_secs(2.0);
    assert_eq!(k.world.console_loglevel, 15, "state fixed console_loglevel");
    let p1 = k.klp.find_patch("test_klp_state").expect("p1");
    let data1 = k
        .klp
        .get_state(p1, 1)
        .and_then(|s| s.data.clone())
        .expect("data");

    // A task whose stack cannot be walked blocks every transition.
    let t = k.world.spawn(
        None,
        "stuck",
        klp_sim::world::Kind::User,
        vec![],
        klp_sim::world::Activity::Sleep,
    );
    let sched = k.world.ret_in("schedule");
    if let Some(x) = k.world.task_mut(t) {
        x.unreliable = true;
        x.stack = vec![sched];
    }
    k.set_sleep(t, klp_sim::world::Sleep::Uninterruptible);
    let n = k.world.dmesg.len();
    insmod(&mut k, "test_klp_state2").expect("state2");
    k.sleep_secs(3.0);
    assert!(k.klp.transition_patch().is_some());
    assert_eq!(k.world.patch_state(t), PatchState::Unpatched);
    k.write_file("/sys/kernel/livepatch/test_klp_state2/enabled", "0")
        .expect("reverse");
    k.sleep_secs(3.0);
    assert!(k.klp.transition_patch().is_none());
    assert_eq!(
        lines_since(&k, n),
        vec![
            "test_klp_state2: pre_patch_callback: vmlinux",
            "test_klp_state2: allocate_loglevel_state: space to store console_loglevel already allocated",
            "test_klp_state2: post_unpatch_callback: vmlinux",
            "test_klp_state2: free_loglevel_state: keeping space to store console_loglevel",
        ]
    );
    // test_klp_state is still enabled, with its data and its change.
    assert!(k.klp.is_enabled(p1));
    let still = k
        .klp
        .get_state(p1, 1)
        .and_then(|s| s.data.clone())
        .expect("data kept");
    assert!(std::sync::Arc::ptr_eq(&data1, &still));
    assert_eq!(k.world.console_loglevel, 15);
    assert!(k.world.warnings.is_empty(), "{:?}", k.world.warnings);
}

/// Disabling the only state patch restores console_loglevel and frees the data.
#[test]
fn disable_restores_the_original_state() {
    let mut k = Kernel::boot(2);
    let before = k.world.console_loglevel;
    insmod(&mut k, "test_klp_state").expect("state");
    k.sleep_secs(2.0);
    assert_ne!(k.world.console_loglevel, before);
    k.write_file("/sys/kernel/livepatch/test_klp_state/enabled", "0")
        .expect("disable");
    k.sleep_secs(2.0);
    assert_eq!(k.world.console_loglevel, before);
}

/// `klp_get_prev_state` outside a transition WARNs and returns nothing.
#[test]
fn prev_state_outside_a_transition_warns() {
    let mut k = Kernel::boot(2);
    insmod(&mut k, "test_klp_state").expect("state");
    k.sleep_secs(2.0);
    assert!(k.klp.get_prev_state(&mut k.world, 1).is_none());
    assert_eq!(k.world.warnings.len(), 1);
}
