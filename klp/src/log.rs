//! Log records emitted by the core.
//!
//! The core prints exactly the kernel's `livepatch: …` lines. Each record carries its
//! level and the kernel function that prints it, so a host can reproduce the kernel's
//! dynamic-debug filtering (the selftests switch on every livepatch debug line except
//! those of `klp_try_switch_task`).

/// Printk level of a record.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Level {
    /// `pr_err`
    Err,
    /// `pr_warn`
    Warn,
    /// `pr_notice`
    Notice,
    /// `pr_info`
    Info,
    /// `pr_debug`: shown only when the host's dynamic debug enables `func`.
    Debug,
}

/// One line for the kernel log.
#[derive(Clone, Copy, Debug)]
pub struct Record<'a> {
    /// Severity.
    pub level: Level,
    /// Name of the kernel function that prints this line (for dynamic-debug filtering).
    pub func: &'static str,
    /// The complete line, prefix included, without trailing newline.
    pub text: &'a str,
}

/// Prefix of every line the livepatch core prints.
pub const PREFIX: &str = "livepatch: ";
