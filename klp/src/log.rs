//! Log records emitted by the core.
//!
//! The core prints exactly the kernel's `livepatch: …` lines. A record is the kernel's
//! `pr_*(fmt, …)` call: a level, the printing function (for dynamic-debug filtering:
//! the selftests switch on every livepatch debug line except those of
//! `klp_try_switch_task`), a fixed prefix and the unformatted arguments. Nothing is
//! formatted on the way: the host formats a record once, where it prints it (its
//! [`core::fmt::Display`] gives the whole line), and only if it prints it at all.

use core::fmt;

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

/// One line for the kernel log, not formatted yet.
#[derive(Clone, Copy)]
pub struct Record<'a> {
    /// Severity.
    pub level: Level,
    /// Name of the kernel function that prints this line (for dynamic-debug filtering).
    pub func: &'static str,
    /// The fixed start of the line ([`PREFIX`] for livepatch's own lines; empty for the
    /// lines of other kernel layers, such as sysfs's duplicate-name warning).
    pub prefix: &'static str,
    /// The message, without prefix or trailing newline.
    pub args: fmt::Arguments<'a>,
}

impl fmt::Display for Record<'_> {
    /// The complete line, prefix included, without trailing newline.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.prefix)?;
        f.write_fmt(self.args)
    }
}

impl fmt::Debug for Record<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Record")
            .field("level", &self.level)
            .field("func", &self.func)
            .field("line", &format_args!("{self}"))
            .finish()
    }
}

/// Prefix of every line the livepatch core prints.
pub const PREFIX: &str = "livepatch: ";

/// `pr_<level>` from function `$func`: `klp_log!(host, Level::Err, "klp_x", "fmt {}", a)`.
macro_rules! klp_log {
    ($host:expr, $level:expr, $func:expr, $($fmt:tt)+) => {
        $crate::host::Host::log(
            $host,
            &$crate::log::Record {
                level: $level,
                func: $func,
                prefix: $crate::log::PREFIX,
                args: format_args!($($fmt)+),
            },
        )
    };
}
pub(crate) use klp_log;
