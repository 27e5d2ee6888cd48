//! The `.klpt` scenario format (the kernel's livepatch selftests as files) and its
//! runner. See `tests/scenarios/README.md` of the spec for the format and verbs.

use std::fmt::Write as _;

use klp::Errno;

use crate::kernel::{Kernel, ModError};

/// Number of CPUs of the simulated machine the scenarios run on.
pub const NCPUS: u32 = 4;
/// `loop_until` gives up after this many failed tries.
const MAX_RETRIES: u32 = 600;
/// Seconds between two tries.
const RETRY_INTERVAL: f64 = 0.1;

/// A parsed scenario.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Scenario {
    /// The title (`#! ...`).
    pub title: String,
    /// Commands: (line number, words), in order. `check_result` carries its expected
    /// lines in [`Scenario::expected`].
    pub commands: Vec<(usize, Vec<String>)>,
    /// Expected lines of each `check_result`, by command index.
    pub expected: Vec<(usize, Vec<String>)>,
}

/// Why a scenario file could not be parsed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ParseError {
    /// 1-based line number.
    pub line: usize,
    /// What is wrong.
    pub msg: String,
}

impl std::fmt::Display for ParseError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "line {}: {}", self.line, self.msg)
    }
}

/// Splits a command line into words like a POSIX shell (quotes, backslashes), without
/// expansions.
pub fn shell_words(s: &str) -> Result<Vec<String>, String> {
    let mut out = Vec::new();
    let mut cur = String::new();
    let mut in_word = false;
    let mut it = s.chars().peekable();
    while let Some(c) = it.next() {
        match c {
            ' ' | '\t' => {
                if in_word {
                    out.push(std::mem::take(&mut cur));
                    in_word = false;
                }
            }
            '"' => {
                in_word = true;
                loop {
                    match it.next() {
                        None => return Err("unterminated double quote".into()),
                        Some('"') => break,
                        Some('\\') => match it.peek() {
                            Some('"' | '\\' | '$' | '`') => {
                                if let Some(n) = it.next() {
                                    cur.push(n);
                                }
                            }
                            _ => cur.push('\\'),
                        },
                        Some(x) => cur.push(x),
                    }
                }
            }
            '\'' => {
                in_word = true;
                loop {
                    match it.next() {
                        None => return Err("unterminated single quote".into()),
                        Some('\'') => break,
                        Some(x) => cur.push(x),
                    }
                }
            }
            '\\' => {
                in_word = true;
                if let Some(n) = it.next() {
                    cur.push(n);
                }
            }
            x => {
                in_word = true;
                cur.push(x);
            }
        }
    }
    if in_word {
        out.push(cur);
    }
    Ok(out)
}

/// Parses a `.klpt` file.
pub fn parse(text: &str) -> Result<Scenario, ParseError> {
    let mut sc = Scenario::default();
    let mut saw_title = false;
    let mut pending_check: Option<usize> = None;
    for (i, raw) in text.lines().enumerate() {
        let line = i + 1;
        let err = |msg: &str| ParseError {
            line,
            msg: msg.to_string(),
        };
        if let Some(t) = raw.strip_prefix("#!") {
            if saw_title {
                return Err(err("second title line"));
            }
            sc.title = t.trim().to_string();
            saw_title = true;
            continue;
        }
        if !saw_title {
            if raw.trim().is_empty() {
                continue;
            }
            return Err(err("the first line must be '#! <title>'"));
        }
        if raw.starts_with('#') || raw.trim().is_empty() {
            continue;
        }
        if let Some(exp) = raw.strip_prefix('>') {
            let Some(ci) = pending_check else {
                return Err(err("expected-log line without a preceding check_result"));
            };
            let exp = exp.strip_prefix(' ').unwrap_or(exp);
            if let Some((_, v)) = sc.expected.iter_mut().find(|(c, _)| *c == ci) {
                v.push(exp.to_string());
            }
            continue;
        }
        if let Some(cmd) = raw.strip_prefix('$') {
            let words = shell_words(cmd.trim()).map_err(|m| err(&m))?;
            if words.is_empty() {
                return Err(err("empty command"));
            }
            let idx = sc.commands.len();
            pending_check = None;
            if words[0] == "check_result" {
                pending_check = Some(idx);
                sc.expected.push((idx, Vec::new()));
            }
            sc.commands.push((line, words));
            continue;
        }
        return Err(err("a line must start with '#', '$' or '>'"));
    }
    if !saw_title {
        return Err(ParseError {
            line: 1,
            msg: "missing '#! <title>' line".into(),
        });
    }
    Ok(sc)
}

/// How a scenario ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// Every command passed its checks and every log matched.
    Pass,
    /// A command failed (`die`) or a log did not match; the text explains.
    Fail(String),
    /// The scenario skipped itself (`skip`).
    Skip(String),
}

enum Stop {
    Die(String),
    Skip(String),
    Mismatch(String),
}

/// The error text insmod (kmod) prints for an init_module failure.
pub fn kmod_strerror(e: Errno) -> String {
    match e {
        Errno::EINVAL => "Invalid parameters".into(),
        Errno::ENOENT => "Unknown symbol in module".into(),
        Errno::ENOEXEC => "Invalid module format".into(),
        Errno::ENODEV => "No such device".into(),
        Errno::EBUSY => "Device or resource busy".into(),
        Errno::EEXIST => "File exists".into(),
        Errno::ENOMEM => "Cannot allocate memory".into(),
        Errno::EAGAIN => "Resource temporarily unavailable".into(),
        Errno::EPERM => "Operation not permitted".into(),
        Errno::EACCES => "Permission denied".into(),
        Errno::EADDRINUSE => "Address already in use".into(),
        Errno::ENOSYS => "Function not implemented".into(),
        other => format!("Unknown error {}", other.0),
    }
}

/// `strerror` for messages of the shell and sysctl.
pub fn strerror(e: Errno) -> String {
    match e {
        Errno::EINVAL => "Invalid argument".into(),
        Errno::ENOENT => "No such file or directory".into(),
        Errno::EISDIR => "Is a directory".into(),
        other => kmod_strerror(other),
    }
}

/// `mods=($SYSFS_KLP_DIR/*); nmods=${#mods[@]}`: without nullglob an empty directory
/// leaves the pattern itself, so bash counts 1.
fn livepatch_count(k: &Kernel) -> usize {
    k.list_dir("/sys/kernel/livepatch")
        .map_or(0, |v| v.len())
        .max(1)
}

/// Runs one scenario on a fresh simulated kernel.
pub struct Runner {
    /// The kernel.
    pub k: Kernel,
    capture: usize,
    pid_list: String,
    getpid_callers: Vec<klp::TaskId>,
    /// Every log line the scenario captured so far (after the canary).
    pub verbose: bool,
    /// Where `elf_module` finds relative paths (the scenario file's directory).
    pub base: std::path::PathBuf,
}

impl std::fmt::Debug for Runner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Runner")
            .field("capture", &self.capture)
            .finish_non_exhaustive()
    }
}

impl Default for Runner {
    fn default() -> Self {
        Self::new()
    }
}

impl Runner {
    /// A runner on a freshly booted kernel, with the selftest preamble applied.
    pub fn new() -> Runner {
        Runner::with_arch(None)
    }

    /// A runner whose kernel walks stacks with `model`'s reliable unwinder.
    pub fn with_arch(model: Option<crate::stackmodel::ArchModel>) -> Runner {
        let mut k = Kernel::boot_with(NCPUS, model);
        // setup_config: set_ftrace_enabled 1 logs its line before any capture.
        k.world.printk("livepatch: kernel.ftrace_enabled = 1");
        Runner {
            k,
            capture: 0,
            pid_list: String::new(),
            getpid_callers: Vec::new(),
            verbose: false,
            base: std::path::PathBuf::from("."),
        }
    }

    fn log(&mut self, msg: &str) {
        self.k.world.printk(msg);
    }

    fn die(&mut self, msg: &str) -> Stop {
        self.log(&format!("ERROR: {msg}"));
        Stop::Die(msg.to_string())
    }

    fn sleep(&mut self, secs: f64) {
        self.k.sleep_secs(secs);
    }

    /// `loop_until`: evaluates `cond` up to 601 times, 0.1 s apart.
    fn loop_until(&mut self, mut cond: impl FnMut(&mut Kernel) -> bool) -> bool {
        self.k.run_due_works();
        for i in 0..=MAX_RETRIES {
            if cond(&mut self.k) {
                return true;
            }
            if i < MAX_RETRIES {
                self.sleep(RETRY_INTERVAL);
            }
        }
        false
    }

    fn cat(&mut self, path: &str) -> String {
        let s = self.k.read_file(path).unwrap_or_default();
        s.trim_end_matches('\n').to_string()
    }

    fn expand(&self, s: &str) -> String {
        s.replace("${PID_LIST}", &self.pid_list)
    }

    /// The captured log, filtered like `check_result`.
    pub fn filtered_log(&self) -> Vec<String> {
        self.k
            .world
            .dmesg
            .iter()
            .skip(self.capture)
            .map(|(_, l)| l.clone())
            .filter(|l| l.contains("livepatch:") || l.contains("test_klp"))
            .filter(|l| !l.contains("tainting kernel") && !l.contains("taints kernel"))
            .collect()
    }

    fn is_livepatch(&mut self, m: &str) -> Result<bool, Stop> {
        if self.k.elf_catalog.contains_key(m) {
            return Ok(true);
        }
        match self.k.catalog.get(m) {
            None => Err(self.die(&format!("Can't find \"test_modules/{m}.ko\", try \"make\""))),
            Some(d) => Ok(d.livepatch),
        }
    }

    fn insmod_line(m: &str, params: &[String]) -> String {
        let msg = format!("% insmod test_modules/{m}.ko {}", params.join(" "));
        msg.strip_suffix(' ').map(str::to_string).unwrap_or(msg)
    }

    /// Runs insmod; returns the text insmod printed (empty on success).
    fn insmod(&mut self, m: &str, params: &[String]) -> String {
        let params = params.to_vec();
        let name = m.to_string();
        let r = self.k.in_process("insmod", |k, _| k.insmod(&name, &params));
        match r {
            Ok(()) => String::new(),
            Err(ModError::NotFound) => format!(
                "insmod: ERROR: could not load module test_modules/{m}.ko: No such file or directory"
            ),
            Err(ModError::Errno(e)) => format!(
                "insmod: ERROR: could not insert module test_modules/{m}.ko: {}",
                kmod_strerror(e)
            ),
            Err(ModError::NotLoaded | ModError::InUse) => String::new(),
        }
    }

    fn load_mod_common(&mut self, m: &str, params: &[String]) -> Result<(), Stop> {
        let line = Self::insmod_line(m, params);
        self.log(&line);
        let out = self.insmod(m, params);
        if !out.is_empty() {
            return Err(self.die(&out));
        }
        let p = format!("/sys/module/{m}");
        if !self.loop_until(|k| k.exists(&p)) {
            return Err(self.die(&format!("failed to load module {m}")));
        }
        Ok(())
    }

    fn unload(&mut self, m: &str) -> Result<(), Stop> {
        let p = format!("/sys/module/{m}/refcnt");
        if !self.loop_until(|k| k.read_file(&p).is_ok_and(|s| s.trim_end() == "0")) {
            return Err(self.die(&format!("failed to unload module {m} (refcnt)")));
        }
        self.log(&format!("% rmmod {m}"));
        let name = m.to_string();
        let r = self.k.in_process("rmmod", |k, _| k.rmmod(&name));
        match r {
            Ok(()) => {}
            Err(ModError::NotLoaded) => {
                return Err(self.die(&format!("rmmod: ERROR: Module {m} is not currently loaded")));
            }
            Err(ModError::InUse) => {
                return Err(self.die(&format!("rmmod: ERROR: Module {m} is in use")));
            }
            Err(e) => return Err(self.die(&format!("rmmod: ERROR: {e:?}"))),
        }
        let p = format!("/sys/module/{m}");
        if !self.loop_until(|k| !k.exists(&p)) {
            return Err(self.die(&format!("failed to unload module {m}")));
        }
        Ok(())
    }

    fn write(&mut self, path: &str, value: &str) -> Result<(), Errno> {
        self.k.write_file(path, value)
    }

    fn run_command(&mut self, words: &[String], expected: Option<&[String]>) -> Result<(), Stop> {
        let w: Vec<String> = words.iter().map(|x| self.expand(x)).collect();
        let verb = w[0].as_str();
        let args = &w[1..];
        let need = |n: usize| -> Result<(), Stop> {
            if args.len() < n {
                Err(Stop::Die(format!("{verb}: expected {n} argument(s)")))
            } else {
                Ok(())
            }
        };
        match verb {
            // klp's own: makes the livepatch ELF object at PATH (relative to the
            // scenario file) loadable as module NAME (`load_lp NAME`).
            "elf_module" => {
                need(2)?;
                // `{arch}` in the path: the architecture this kernel runs as.
                let arch = self.k.world.stack_model.map_or("x86_64", |m| m.name());
                let path = self.base.join(args[1].replace("{arch}", arch));
                match std::fs::read(&path) {
                    Ok(bytes) => {
                        self.k.add_elf_module(&args[0], bytes);
                        Ok(())
                    }
                    Err(e) => Err(self.die(&format!("cannot read {}: {e}", path.display()))),
                }
            }
            "load_mod" => {
                need(1)?;
                let m = &args[0];
                if self.is_livepatch(m)? {
                    return Err(
                        self.die(&format!("use load_lp() to load the livepatch module {m}"))
                    );
                }
                self.load_mod_common(m, &args[1..])
            }
            "load_lp" | "load_lp_nowait" => {
                need(1)?;
                let m = &args[0];
                if !self.is_livepatch(m)? {
                    return Err(self.die(&format!("module {m} is not a livepatch")));
                }
                self.load_mod_common(m, &args[1..])?;
                let p = format!("/sys/kernel/livepatch/{m}");
                if !self.loop_until(|k| k.exists(&p)) {
                    return Err(self.die(&format!("failed to load module {m} (sysfs)")));
                }
                if verb == "load_lp" {
                    let t = format!("/sys/kernel/livepatch/{m}/transition");
                    if !self.loop_until(|k| k.read_file(&t).is_ok_and(|s| s == "0\n")) {
                        return Err(self.die("failed to complete transition"));
                    }
                }
                Ok(())
            }
            "load_failing_mod" => {
                need(1)?;
                let m = &args[0];
                let line = Self::insmod_line(m, &args[1..]);
                self.log(&line);
                let out = self.insmod(m, &args[1..]);
                if out.is_empty() {
                    return Err(self.die(&format!("{m} unexpectedly loaded")));
                }
                self.log(&out);
                Ok(())
            }
            "unload_mod" | "unload_lp" => {
                need(1)?;
                self.unload(&args[0])
            }
            "disable_lp" => {
                need(1)?;
                let m = &args[0];
                self.log(&format!("% echo 0 > /sys/kernel/livepatch/{m}/enabled"));
                let _ = self.write(&format!("/sys/kernel/livepatch/{m}/enabled"), "0");
                let p = format!("/sys/kernel/livepatch/{m}");
                if !self.loop_until(|k| !k.exists(&p)) {
                    return Err(self.die(&format!("failed to disable livepatch {m}")));
                }
                Ok(())
            }
            "set_pre_patch_ret" => {
                need(2)?;
                let (m, v) = (&args[0], &args[1]);
                let p = format!("/sys/module/{m}/parameters/pre_patch_ret");
                self.log(&format!("% echo {v} > {p}"));
                let _ = self.write(&p, v);
                let want = format!("{v}\n");
                if !self.loop_until(|k| k.read_file(&p).is_ok_and(|s| s == want)) {
                    return Err(self.die(&format!(
                        "failed to set pre_patch_ret parameter for {m} module"
                    )));
                }
                Ok(())
            }
            "set_ftrace_enabled" => {
                let (fail, v) = match args {
                    [f, v] if f == "--fail" => (true, v.clone()),
                    [v] => (false, v.clone()),
                    _ => return Err(Stop::Die("set_ftrace_enabled: bad arguments".into())),
                };
                let err = match self.write("/proc/sys/kernel/ftrace_enabled", &v) {
                    Ok(()) => String::new(),
                    Err(e) => format!(
                        "sysctl: setting key \"kernel.ftrace_enabled\": {}",
                        strerror(e)
                    ),
                };
                let result = self.cat("/proc/sys/kernel/ftrace_enabled");
                if result != v {
                    if fail {
                        self.log(&format!("livepatch: {err}"));
                        return Ok(());
                    }
                    let msg = format!("failed to set kernel.ftrace_enabled = {v}");
                    self.log(&format!("SKIP: {msg}"));
                    return Err(Stop::Skip(msg));
                }
                self.log(&format!("livepatch: kernel.ftrace_enabled = {result}"));
                Ok(())
            }
            "check_sysfs_rights" => {
                need(3)?;
                let path = format!("/sys/kernel/livepatch/{}/{}", args[0], args[1]);
                let actual = self
                    .k
                    .stat(&path)
                    .map(|s| s.access_string())
                    .unwrap_or_default();
                if actual != args[2] {
                    return Err(self.die(&format!(
                        "Unexpected access rights of {path}: {} vs. {actual}",
                        args[2]
                    )));
                }
                Ok(())
            }
            "check_sysfs_value" => {
                need(3)?;
                let path = format!("/sys/kernel/livepatch/{}/{}", args[0], args[1]);
                let v = self.cat(&path);
                if v != args[2] {
                    return Err(
                        self.die(&format!("Unexpected value in {path}: {} vs. {v}", args[2]))
                    );
                }
                Ok(())
            }
            "trace_function" => {
                need(1)?;
                self.cleanup_tracing();
                let t = "/sys/kernel/tracing";
                let _ = self.write(&format!("{t}/current_tracer"), "function");
                let _ = self.write(&format!("{t}/set_ftrace_filter"), &args[0]);
                let _ = self.write(&format!("{t}/tracing_on"), "1");
                Ok(())
            }
            "check_traced_functions" => {
                let trace = self.cat("/sys/kernel/tracing/trace");
                for f in args {
                    let found = trace
                        .split(|c: char| !(c.is_alphanumeric() || c == '_'))
                        .any(|w| w == f);
                    if !found {
                        return Err(
                            self.die(&format!("Function ({f}) did not appear in the trace"))
                        );
                    }
                }
                self.cleanup_tracing();
                Ok(())
            }
            "expect_file_equals" | "expect_file_not_equals" => {
                need(2)?;
                let v = self.cat(&args[0]);
                let eq = v == args[1];
                if eq != (verb == "expect_file_equals") {
                    return Err(self.die(&format!(
                        "livepatch kselftest(s) failed ({} reads \"{v}\")",
                        args[0]
                    )));
                }
                Ok(())
            }
            "kmsg_grep" => {
                need(2)?;
                let re =
                    bre_to_regex(&args[0]).map_err(|e| Stop::Die(format!("kmsg_grep: {e}")))?;
                let text = self.k.read_file(&args[1]).unwrap_or_default();
                for l in text.lines() {
                    if re.is_match(l) {
                        self.log(l);
                    }
                }
                Ok(())
            }
            "log_if_file_equals" => {
                need(3)?;
                if self.cat(&args[0]) == args[1] {
                    let m = args[2].clone();
                    self.log(&m);
                }
                Ok(())
            }
            "log_with_file_value" => {
                need(2)?;
                let v = self.cat(&args[1]);
                let m = format!("{}{v}", args[0]);
                self.log(&m);
                Ok(())
            }
            "wait_file_value" => {
                need(2)?;
                let (p, v) = (args[0].clone(), format!("{}\n", args[1]));
                let ok = self.loop_until(|k| k.read_file(&p).is_ok_and(|s| s == v));
                if !ok && p.ends_with("/transition") {
                    return Err(self.die("failed to stall transition"));
                }
                Ok(())
            }
            "expect_livepatch_count" => {
                need(1)?;
                let n = livepatch_count(&self.k);
                if args[0].parse::<usize>().ok() != Some(n) {
                    return Err(self.die(&format!("Expecting three modules listed, found {n}")));
                }
                Ok(())
            }
            "wait_livepatch_count" => {
                need(1)?;
                let want = args[0].parse::<usize>().ok();
                let mut n = 0;
                let ok = self.loop_until(|k| {
                    n = livepatch_count(k);
                    Some(n) == want
                });
                if !ok {
                    return Err(self.die(&format!("Expecting only one moduled listed, found {n}")));
                }
                Ok(())
            }
            "set_kprobes_enabled" => {
                need(1)?;
                let _ = self.write("/sys/kernel/debug/kprobes/enabled", &args[0]);
                Ok(())
            }
            "require_kallsyms" => {
                need(1)?;
                let syms = self.k.read_file("/proc/kallsyms").unwrap_or_default();
                if !syms.contains(args[0].as_str()) {
                    let msg = "test-kprobe requires CONFIG_KPROBES_ON_FTRACE".to_string();
                    self.log(&format!("SKIP: {msg}"));
                    return Err(Stop::Skip(msg));
                }
                Ok(())
            }
            "spawn_getpid_callers" => {
                let n = self.k.world.online.iter().filter(|x| **x).count().min(128);
                let mut pids = Vec::new();
                for _ in 0..n {
                    let shell = self.k.shell;
                    let st = Vec::new();
                    let t = self.k.world.spawn(
                        Some(shell),
                        "test_klp-call_g",
                        crate::world::Kind::User,
                        st,
                        crate::world::Activity::GetpidLoop,
                    );
                    self.getpid_callers.push(t);
                    pids.push(self.k.world.task(t).map_or(0, |x| x.pid).to_string());
                }
                self.pid_list = pids.join(",");
                Ok(())
            }
            "kill_getpid_callers" => {
                for t in std::mem::take(&mut self.getpid_callers) {
                    self.k.world.reap(t);
                }
                Ok(())
            }
            "write" | "log_echo" => {
                let (fail, rest) = match args.first().map(String::as_str) {
                    Some("--fail") => (true, &args[1..]),
                    _ => (false, args),
                };
                if rest.len() < 2 {
                    return Err(Stop::Die(format!("{verb}: expected PATH VALUE")));
                }
                if verb == "log_echo" {
                    self.log(&format!("% echo {} > {}", rest[1], rest[0]));
                }
                match (self.write(&rest[0], &rest[1]), fail) {
                    (Ok(()), false) | (Err(_), true) => Ok(()),
                    (Ok(()), true) => Err(self.die(&format!(
                        "write of '{}' to {} unexpectedly succeeded",
                        rest[1], rest[0]
                    ))),
                    (Err(e), false) => {
                        Err(self.die(&format!("echo: write error: {} ({})", strerror(e), rest[0])))
                    }
                }
            }
            "sleep" => {
                need(1)?;
                let s: f64 = args[0].parse().map_err(|_| {
                    Stop::Die(format!("sleep: invalid time interval '{}'", args[0]))
                })?;
                self.sleep(s);
                Ok(())
            }
            "log" => {
                let m = args.join(" ");
                self.log(&m);
                Ok(())
            }
            "check_result" => {
                let exp: Vec<String> = expected
                    .unwrap_or(&[])
                    .iter()
                    .map(|l| self.expand(l))
                    .collect();
                let act = self.filtered_log();
                // `$(...)` strips trailing newlines: trailing empty lines never count.
                let trim = |v: &[String]| {
                    let mut v = v.to_vec();
                    while v.last().is_some_and(|l| l.is_empty()) {
                        v.pop();
                    }
                    v
                };
                let (exp, act) = (trim(&exp), trim(&act));
                if exp != act {
                    return Err(Stop::Mismatch(diff(&exp, &act)));
                }
                Ok(())
            }
            other => Err(Stop::Die(format!("unknown verb '{other}'"))),
        }
    }

    fn cleanup_tracing(&mut self) {
        let t = "/sys/kernel/tracing";
        let _ = self.write(&format!("{t}/tracing_on"), "0");
        let _ = self.write(&format!("{t}/set_ftrace_filter"), "");
        let _ = self.write(&format!("{t}/current_tracer"), "nop");
        let _ = self.write(&format!("{t}/trace"), "");
    }

    /// Runs a whole scenario.
    pub fn run(&mut self, sc: &Scenario) -> Outcome {
        // start_test: the canary and the banner (both filtered out), then capture.
        self.log("livepatch kselftest timestamp: 2026-11-23 00:00:00.000000000+00:00");
        self.capture = self.k.world.dmesg.len();
        self.log(&format!("===== TEST: {} =====", sc.title));
        for (ci, (line, words)) in sc.commands.iter().enumerate() {
            let exp = sc
                .expected
                .iter()
                .find(|(c, _)| *c == ci)
                .map(|(_, v)| v.as_slice());
            match self.run_command(words, exp) {
                Ok(()) => {}
                Err(Stop::Skip(m)) => return Outcome::Skip(m),
                Err(Stop::Die(m)) => {
                    return Outcome::Fail(format!("line {line}: {}: {m}", words.join(" ")));
                }
                Err(Stop::Mismatch(d)) => {
                    return Outcome::Fail(format!(
                        "line {line}: log mismatch (- expected, + actual):\n{d}"
                    ));
                }
            }
        }
        if !self.k.world.warnings.is_empty() {
            return Outcome::Fail(format!(
                "kernel warnings: {}",
                self.k.world.warnings.join("; ")
            ));
        }
        Outcome::Pass
    }
}

/// Runs the scenario text on a fresh kernel.
pub fn run_text(text: &str) -> Result<Outcome, ParseError> {
    run_text_on(text, None)
}

/// Runs the scenario text on a fresh kernel that walks stacks as on `model`.
pub fn run_text_on(
    text: &str,
    model: Option<crate::stackmodel::ArchModel>,
) -> Result<Outcome, ParseError> {
    let sc = parse(text)?;
    let mut r = Runner::with_arch(model);
    Ok(r.run(&sc))
}

/// Runs the scenario file at `path` on a fresh kernel that walks stacks as on `model`;
/// `elf_module` paths are relative to the file's directory.
pub fn run_file_on(
    path: &std::path::Path,
    model: Option<crate::stackmodel::ArchModel>,
) -> Result<Outcome, String> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("cannot read: {e}"))?;
    let sc = parse(&text).map_err(|e| format!("malformed scenario: {e}"))?;
    let mut r = Runner::with_arch(model);
    r.base = path
        .parent()
        .map_or_else(|| ".".into(), std::path::Path::to_path_buf);
    Ok(r.run(&sc))
}

/// [`run_file_on`] with `elf_module` paths relative to `base` instead.
pub fn run_file_in(
    path: &std::path::Path,
    model: Option<crate::stackmodel::ArchModel>,
    base: &std::path::Path,
) -> Result<Outcome, String> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("cannot read: {e}"))?;
    let sc = parse(&text).map_err(|e| format!("malformed scenario: {e}"))?;
    let mut r = Runner::with_arch(model);
    r.base = base.to_path_buf();
    Ok(r.run(&sc))
}

/// Converts a `grep` basic regular expression into the `regex` crate's syntax.
pub fn bre_to_regex(p: &str) -> Result<regex::Regex, regex::Error> {
    let mut out = String::new();
    let mut it = p.chars().peekable();
    while let Some(c) = it.next() {
        match c {
            '\\' => match it.next() {
                Some(n @ ('(' | ')' | '{' | '}' | '|' | '+' | '?')) => out.push(n),
                Some(n @ ('<' | '>')) => {
                    let _ = n;
                    out.push_str("\\b");
                }
                Some(n) => {
                    out.push('\\');
                    out.push(n);
                }
                None => out.push_str("\\\\"),
            },
            '(' | ')' | '{' | '}' | '|' | '+' | '?' => {
                out.push('\\');
                out.push(c);
            }
            _ => out.push(c),
        }
    }
    regex::Regex::new(&out)
}

/// A line diff of `exp` and `act` (longest common subsequence).
pub fn diff(exp: &[String], act: &[String]) -> String {
    let (n, m) = (exp.len(), act.len());
    let mut l = vec![vec![0usize; m + 1]; n + 1];
    for i in (0..n).rev() {
        for j in (0..m).rev() {
            l[i][j] = if exp[i] == act[j] {
                l[i + 1][j + 1] + 1
            } else {
                l[i + 1][j].max(l[i][j + 1])
            };
        }
    }
    let (mut i, mut j) = (0, 0);
    let mut s = String::new();
    while i < n || j < m {
        if i < n && j < m && exp[i] == act[j] {
            let _ = writeln!(s, "  {}", exp[i]);
            i += 1;
            j += 1;
        } else if j < m && (i == n || l[i][j + 1] >= l[i + 1][j]) {
            let _ = writeln!(s, "+ {}", act[j]);
            j += 1;
        } else {
            let _ = writeln!(s, "- {}", exp[i]);
            i += 1;
        }
    }
    s
}
