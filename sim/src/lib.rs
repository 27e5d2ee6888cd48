//! # klp-sim — a deterministic simulated kernel for klp
//!
//! A small model of a Linux kernel — tasks with kernel stacks, CPUs and their idle
//! tasks, vmlinux and loadable modules with named functions, an ftrace layer, work
//! items on a virtual clock, sysfs and procfs, the kernel log — on which the `klp` core
//! runs exactly as it would in the kernel. The kernel's own livepatch selftests run on
//! it as `.klpt` scenario files and must produce the kernel's log lines.

pub mod demo;
pub mod elfmod;
pub mod failalloc;
pub mod kernel;
pub mod modules;
pub mod scenario;
mod shadow_fixture;
pub mod stackmodel;
pub mod vfs;
pub mod world;

pub use kernel::Kernel;
pub use scenario::{Outcome, Runner, parse, run_text};
