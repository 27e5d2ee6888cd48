//! # klp — the Linux livepatch core as a portable library
//!
//! `klp` makes every decision the kernel's livepatch subsystem makes: the patch model
//! (patch → objects → functions, callbacks, system states, atomic replace), the life
//! cycle (enable, disable, replace, module arrival and removal, freeing), the
//! consistency model (per-task state, reliable stack checks, safe points, retries,
//! signals, reversal, force), the redirect decision, and the sysfs attributes — with the
//! kernel's error codes and log lines.
//!
//! It acts on a world given by a [`Host`]: the simulated kernel in `klp-sim`, a process
//! (the user-space host) or, later, the kernel itself. It is `no_std` + `alloc` and is
//! written for the kernel's rules: every allocation can fail and is reported as
//! `-ENOMEM` with nothing changed (it builds with `no_global_oom_handling`), nothing
//! panics (indexing, overflowing arithmetic, `unwrap` and `panic!` are denied by lint),
//! and log lines are handed to the host unformatted ([`Record`]).
//!
//! The entry point is [`Klp`]: build a [`PatchDesc`] and call [`Klp::enable_patch`]; the
//! host forwards sysfs reads and writes ([`Klp::sysfs_read`], [`Klp::sysfs_write`]),
//! module events ([`Klp::module_coming`], [`Klp::module_going`]), safe points
//! ([`Klp::update_patch_state`]) and work items ([`Klp::retry_work`], [`Klp::free_work`]).
#![no_std]
// The kernel's rules for code that runs inside it: no panics (a panic is a crashed
// machine), no arithmetic that can overflow (CONFIG_RUST_OVERFLOW_CHECKS turns it into
// one). Tests may use all of these.
#![cfg_attr(
    not(test),
    deny(
        clippy::indexing_slicing,
        clippy::arithmetic_side_effects,
        clippy::unwrap_used,
        clippy::expect_used,
        clippy::panic,
        clippy::unreachable,
        clippy::todo,
        clippy::unimplemented
    )
)]
extern crate alloc;

pub mod arch;
mod core;
pub mod elf;
pub mod errno;
pub mod fallible;
pub mod host;
pub mod log;
pub mod model;
pub mod redirect;
pub mod shadow;
mod states;
pub mod sysfs;
mod transition;

pub use crate::core::{
    FuncDirName, KSYM_NAME_LEN, Klp, MAX_STACK_ENTRIES, MODULE_NAME_LEN, PatchedFunc, RecordInfo,
    SIGNALS_TIMEOUT, SymposError, SymposScan,
};
pub use errno::{Errno, KResult};
pub use host::{
    Addr, Comm, HookError, Host, IdleTask, PatchId, PatchState, TASK_COMM_LEN, TaskId, TraceError,
};
pub use log::{Level, Record};
pub use model::{
    CallbackCx, Callbacks, FuncDesc, ObjectDesc, PatchDesc, SharedCallbacks, State, StateData,
};
pub use redirect::{Anomaly, RedirectView, Target, decide};
pub use transition::Blocked;
