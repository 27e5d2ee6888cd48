//! The `klp_try_switch_task` debug lines (off in the selftests' dynamic-debug setup)
//! appear when dynamic debug enables them, with the kernel's texts.

use klp_sim::Kernel;

#[test]
fn switch_task_debug_lines() {
    let mut k = Kernel::boot(2);
    k.write_file(
        "/sys/kernel/debug/dynamic_debug/control",
        "func klp_try_switch_task +p",
    )
    .expect("dyndbg");
    k.insmod_cmd("test_klp_callbacks_busy", &["block_transition=Y"])
        .expect("busy");
    let worker = k
        .world
        .tasks
        .iter()
        .find(|t| t.comm == "kworker/1:1")
        .map(|t| t.pid)
        .expect("worker");
    let n = k.world.dmesg.len();
    k.insmod_cmd("test_klp_callbacks_demo", &[]).expect("demo");
    k.sleep_secs(1.5);
    let log: Vec<&str> = k.world.dmesg[n..].iter().map(|(_, l)| l.as_str()).collect();
    let sleeping = format!(
        "livepatch: klp_try_switch_task: kworker/1:1:{worker} is sleeping on function busymod_work_func"
    );
    assert!(log.contains(&sleeping.as_str()), "{log:#?}");
    assert!(
        log.iter().any(
            |l| l.starts_with("livepatch: klp_try_switch_task: swapper/")
                && l.ends_with(" is running")
        ),
        "{log:#?}"
    );
    // With the selftests' setting the same transition prints none of them.
    let mut k = Kernel::boot(2);
    k.insmod_cmd("test_klp_callbacks_busy", &["block_transition=Y"])
        .expect("busy");
    k.insmod_cmd("test_klp_callbacks_demo", &[]).expect("demo");
    k.sleep_secs(1.5);
    assert!(
        !k.world
            .dmesg
            .iter()
            .any(|(_, l)| l.contains("klp_try_switch_task"))
    );
}
