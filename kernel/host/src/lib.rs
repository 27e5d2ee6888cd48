//! # klp-kernel — klp's core as the livepatch of a Linux kernel
//!
//! This crate is the [`klp::Host`] of a real kernel. It is built for
//! `x86_64-unknown-none` with the kernel's code generation flags into one static
//! library, linked into vmlinux beside a thin C shim (`kernel/shim/klp_shim.c`, placed
//! in `kernel/livepatch/` of the tree) that replaces the kernel's
//! `kernel/livepatch/{core,patch,transition,shadow,state}.c`.
//!
//! Who does what:
//! * **klp's core** makes every decision: the patch model and its checks, enabling,
//!   disabling, replacing, module arrival and removal, the consistency model (which
//!   task may switch, when to signal, reverse, force), the redirect decision, the sysfs
//!   values and errors, symbol resolution with `sympos`, the `.klp.rela` section and
//!   symbol names, shadow variables, system states — with the kernel's log lines.
//! * **this crate** ([`host::KHost`]) maps the core's questions onto the kernel through
//!   the shim's `klp_c_*` functions ([`ffi`]), and exports the `klp_rs_*` entry points
//!   the shim calls ([`api`]).
//! * **the C shim** only adapts: ftrace ops and their handler, kobjects, the task
//!   walk, `task_call_func`, stack traces, work items, `apply_relocate_add`, printk,
//!   and the hooks the entry code, the idle loop, fork and `cond_resched` call.
//!
//! # Locking
//!
//! The core lives in one global ([`api`]), reachable only through `unsafe` functions
//! whose callers hold the shim's `klp_mutex`, as the kernel's livepatch code runs under
//! its `klp_mutex`. The redirect decision ([`api::klp_rs_decide`]) and the shadow
//! variable calls take no lock of the core: the first is pure, the second use the
//! lock-free shadow store.
#![no_std]
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
#![feature(allocator_api)]

extern crate alloc;

pub mod api;
pub mod ffi;
pub mod host;
mod line;
pub(crate) mod rt;
