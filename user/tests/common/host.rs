//! The process host as the redirect tests run it: dynamic debug on (the core's
//! `pr_debug` lines are checked), except the per-task switch lines, which would flood
//! the log; stack checks by the conservative scan, because the tests are built without
//! frame pointers.

use klp_user::stack::{CheckOptions, WalkPolicy};
use klp_user::{Config, Process};

/// Initialises the process-wide host with the tests' configuration.
pub fn init() -> &'static Process {
    Process::init(Config {
        dyndbg: true,
        dyndbg_off: vec!["klp_try_switch_task"],
        checks: CheckOptions {
            policy: WalkPolicy::ScanOnly,
            ..CheckOptions::default()
        },
        ..Config::default()
    })
}
