//! # klp-user — the livepatch core hosted inside a running process
//!
//! The process is the core's world ([`klp::Host`]): its threads are the tasks, its
//! executable is *vmlinux*, its loaded shared objects are *modules*.
//!
//! * [`symbols`]: the indexed ELF symbol tables of the loaded objects (with `sympos`),
//!   re-indexed when a library is loaded;
//! * [`thread`]: threads as tasks — registration (an interposed `pthread_create`, or on
//!   first use), per-thread patch state in lock-free atomics, [`safe_point`];
//! * [`stack`]: stack checks of other threads — stop by signal, interrupted registers,
//!   the architecture's reliable unwinder and a conservative scan, bounded waits;
//! * [`process`]: [`Process`], the host and the core together (log, retries, module
//!   arrival, sysfs);
//! * [`ctl`]: the control socket and the client side of `klpctl`.
//!
//! * [`redirect`]: [`patchable!`] functions, the published views and the entry
//!   trampoline's decision (x86_64).
//!
//! What is not here yet: the trampolines of aarch64, ppc64le and s390x, and the
//! steady-state direct branch. On x86_64 a [`patchable!`] function (or any function
//! whose entry is an unpatched nop site) is redirected through the trampoline of
//! `klp_arch_x86_64::live::trampoline`. On the other arches no function has a
//! patchable site yet ([`klp::Host::hook_site`] finds none), so enabling a patch that
//! touches a *loaded* function fails exactly like the kernel without an ftrace
//! location: `failed to find location for function '…'` and `-EINVAL`; patches whose
//! objects are not loaded, atomic replace of such patches, transitions, sysfs and
//! module arrival all work there.
//!
//! ## Building a program whose threads can be checked
//!
//! A stack check is accepted only when the architecture's unwinder walks from the
//! interrupted registers to the thread's entry frame. Build with frame pointers
//! (`RUSTFLAGS="-C force-frame-pointers=yes"`; C: `-fno-omit-frame-pointer`) and, on
//! s390x, with the back chain (`-C target-feature=+backchain`, `-mbackchain`). The
//! trace itself is a superset of the return addresses (see [`stack`]), so code without
//! frame pointers never makes a check pass wrongly.

pub mod ctl;
pub mod process;
pub mod redirect;
pub mod stack;
pub mod symbols;
pub mod thread;

pub use process::{
    Blocker, Config, Library, PatchInfo, Process, ProcessHost, SiteKind, ThreadInfo,
    TransitionStatus,
};
pub use thread::safe_point;
