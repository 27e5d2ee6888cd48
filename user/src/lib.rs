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
//! * [`redirect`]: [`patchable!`] functions, the published views, the entry
//!   trampolines' decision and the site states (trampoline during transitions, a
//!   direct branch in the steady state), on every architecture with a back-end in
//!   `arch/backends`.
//!
//! ## Building a program that can be live-patched
//!
//! * Rust: declare the functions that may be replaced with [`patchable!`] (stable Rust;
//!   the wrapper holds the patch site on every architecture, s390x included).
//! * C: build with the architecture's patchable entry (x86_64
//!   `-fpatchable-function-entry=5`, aarch64 `-fpatchable-function-entry=2`, ppc64le
//!   `-pg -mprofile-kernel`, s390x `-pg -mfentry -mnop-mcount`; every back-end names
//!   its own in `Arch::SITE_FLAGS`); see the README.
//! * Replacements are ordinary `extern "C"` functions with the same signature, linked
//!   into the program or in a shared object, described with `klp`'s patch model and
//!   enabled with [`Process::enable_patch`].
//!
//! ## Building a program whose threads can be checked
//!
//! A stack check is accepted only when the architecture's unwinder walks from the
//! interrupted registers to the thread's entry frame. Build with frame pointers
//! (`RUSTFLAGS="-C force-frame-pointers=yes"`; C: `-fno-omit-frame-pointer`) and, on
//! s390x, with the back chain (`-C target-feature=+backchain`, `-mbackchain`). The
//! trace itself is a superset of the return addresses (see [`stack`]), so code without
//! frame pointers never makes a check pass wrongly. Where the C library keeps no frame
//! chain (the back-end's `Live::USER_STACK_WALKABLE` is false), checks rely on the scan
//! alone.

// The layering: each module uses only those on the lines below its own (the process
// host ties them together; what a lower module needs from a higher one is registered
// from above, never called upward).
//
//   ctl                     the control socket            → process, loader, thread
//   process, loader         Host adapter, Process; patch  → everything below (one layer:
//                           files                           the loader adds
//                                                           `Process::load_file`, the host
//                                                           calls it when objects arrive)
//   redirect                views, decisions, sites       → stack, thread, symbols, sys
//   stack                   stack checks, sync rounds     → thread, symbols, sys
//                           (redirect registers its decision function, its resume rule
//                           and its site ends: `stack::register_redirect`, `set_site_end`)
//   thread                  records, registry, fork gate  → sys
//                           (process registers the core's locks for fork: `set_core_lock`;
//                           klp's signal handler is installed here, what it runs is
//                           stack's: `sys::set_signal_fn`)
//   symbols                 the symbol index
//   sys                     POSIX primitives: futex, clock, klp's signal — nothing of klp-user

pub mod ctl;
pub mod loader;
pub mod process;
pub mod redirect;
pub mod stack;
pub mod symbols;
mod sys;
pub mod thread;

pub use process::{
    BlockReason, Blocker, Config, Library, PatchInfo, Process, ProcessHost, SiteKind, ThreadInfo,
    TransitionStatus,
};
pub use thread::safe_point;

/// The native back-end's wrapper of [`patchable!`] (its patch site, then a tail branch
/// to the body).
#[doc(hidden)]
pub use klp_backends::patchable_wrapper as __patchable_wrapper;
