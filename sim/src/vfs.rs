//! The files a scenario can read and write: `/proc`, `/sys/kernel/livepatch`,
//! `/sys/module`, tracing, kprobes, dynamic debug and sysctl.

use klp::Errno;

use crate::kernel::Kernel;
use crate::world::ParamValue;

/// What `stat` says about a path.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Stat {
    /// Directory.
    pub dir: bool,
    /// Permission bits.
    pub mode: u32,
}

impl Stat {
    /// `stat --format %A`.
    pub fn access_string(&self) -> String {
        let mut s = String::with_capacity(10);
        s.push(if self.dir { 'd' } else { '-' });
        for shift in [6, 3, 0] {
            let b = (self.mode >> shift) & 7;
            s.push(if b & 4 != 0 { 'r' } else { '-' });
            s.push(if b & 2 != 0 { 'w' } else { '-' });
            s.push(if b & 1 != 0 { 'x' } else { '-' });
        }
        s
    }
}

fn split(path: &str) -> Vec<&str> {
    path.split('/').filter(|c| !c.is_empty()).collect()
}

const TRACING: [&str; 2] = ["/sys/kernel/tracing", "/sys/kernel/debug/tracing"];

fn tracing_file(path: &str) -> Option<&str> {
    TRACING
        .iter()
        .find_map(|base| path.strip_prefix(base)?.strip_prefix('/'))
}

impl Kernel {
    /// `stat PATH`.
    pub fn stat(&self, path: &str) -> Option<Stat> {
        let c = split(path);
        let dir = |mode| Some(Stat { dir: true, mode });
        let file = |mode| Some(Stat { dir: false, mode });
        match c.as_slice() {
            [] | ["proc"] | ["sys"] | ["sys", "kernel"] | ["sys", "module"] => dir(0o755),
            ["sys", "kernel", "livepatch", rest @ ..] => self.klp.sysfs_node(rest).map(|n| Stat {
                dir: matches!(n, klp::sysfs::Node::Dir),
                mode: klp::sysfs::mode_of(n),
            }),
            ["sys", "module", m] => self.world.modules.get(*m).and_then(|_| dir(0o755)),
            ["sys", "module", m, "refcnt"] => self.world.modules.get(*m).and_then(|_| file(0o444)),
            ["sys", "module", m, "parameters"] => {
                self.world.modules.get(*m).and_then(|_| dir(0o755))
            }
            ["sys", "module", m, "parameters", p] => {
                let (_, perm) = self.world.modules.get(*m)?.params.get(*p)?;
                (*perm != 0).then_some(Stat {
                    dir: false,
                    mode: *perm,
                })
            }
            ["proc", "cmdline"] | ["proc", "meminfo"] | ["proc", "kallsyms"] => file(0o444),
            ["proc", pid, "patch_state"] | ["proc", pid, "task", _, "patch_state"] => {
                let pid: i64 = pid.parse().ok()?;
                self.world.task_by_pid(pid).and_then(|_| file(0o400))
            }
            ["proc", "sys", "kernel", "ftrace_enabled"] => file(0o644),
            ["sys", "kernel", "debug", "kprobes", "enabled"] => file(0o600),
            ["sys", "kernel", "debug", "dynamic_debug", "control"] => file(0o644),
            _ => {
                if self.world.files.contains_key(path) {
                    return file(0o444);
                }
                if let Some(f) = tracing_file(path) {
                    return match f {
                        "trace" | "tracing_on" | "current_tracer" | "set_ftrace_filter" => {
                            file(0o644)
                        }
                        _ => None,
                    };
                }
                // Directories that hold module-created files.
                let prefix = format!("{}/", path.trim_end_matches('/'));
                if self.world.files.keys().any(|k| k.starts_with(&prefix)) {
                    return dir(0o755);
                }
                None
            }
        }
    }

    /// Whether `path` exists.
    pub fn exists(&self, path: &str) -> bool {
        self.stat(path).is_some()
    }

    /// The entries of a directory.
    pub fn list_dir(&self, path: &str) -> Option<Vec<String>> {
        let c = split(path);
        match c.as_slice() {
            ["sys", "kernel", "livepatch", rest @ ..] => self.klp.sysfs_entries(rest).ok(),
            _ => None,
        }
    }

    /// `cat PATH`, run as a process of the shell.
    pub fn read_file(&mut self, path: &str) -> Result<String, Errno> {
        let st = self.stat(path).ok_or(Errno::ENOENT)?;
        if st.dir {
            return Err(Errno::EISDIR);
        }
        if st.mode & 0o444 == 0 {
            return Err(Errno::EACCES);
        }
        let c: Vec<String> = split(path).into_iter().map(str::to_string).collect();
        let c: Vec<&str> = c.iter().map(String::as_str).collect();
        match c.as_slice() {
            ["sys", "kernel", "livepatch", rest @ ..] => self.klp.sysfs_read_string(rest),
            ["sys", "module", m, "refcnt"] => Ok(format!(
                "{}\n",
                self.world.modules.get(*m).map_or(0, |x| x.refcnt)
            )),
            ["sys", "module", m, "parameters", p] => Ok(format!(
                "{}\n",
                self.world
                    .param(m, p)
                    .map(ParamValue::show)
                    .unwrap_or_default()
            )),
            ["proc", "cmdline"] => {
                Ok(self.in_process("cat", |k, t| k.world.call_name(t, "cmdline_proc_show")))
            }
            ["proc", "meminfo"] => {
                Ok(self.in_process("cat", |k, t| k.world.call_name(t, "meminfo_proc_show")))
            }
            ["proc", "kallsyms"] => Ok(self.kallsyms()),
            ["proc", pid, "patch_state"] | ["proc", pid, "task", _, "patch_state"] => {
                let pid: i64 = pid.parse().map_err(|_| Errno::ENOENT)?;
                let s = self.patch_state_of(pid).ok_or(Errno::ENOENT)?;
                Ok(format!("{}\n", s.as_i32()))
            }
            ["proc", "sys", "kernel", "ftrace_enabled"] => {
                Ok(format!("{}\n", self.world.ftrace_enabled as i32))
            }
            ["sys", "kernel", "debug", "kprobes", "enabled"] => {
                Ok(format!("{}\n", self.world.kprobes_enabled as i32))
            }
            ["sys", "kernel", "debug", "dynamic_debug", "control"] => Ok(String::new()),
            _ => {
                if let Some((_, body)) = self.world.files.get(path).cloned() {
                    return Ok(self.in_process("cat", |k, t| body(&mut k.world, t)));
                }
                match tracing_file(path) {
                    Some("trace") => {
                        let mut s = String::from("# tracer: ");
                        s.push_str(if self.world.tracer.function {
                            "function"
                        } else {
                            "nop"
                        });
                        s.push('\n');
                        for f in &self.world.tracer.trace {
                            s.push_str(&format!("             cat-1     [000] .....  0.000000: {f} <-seq_read_iter\n"));
                        }
                        Ok(s)
                    }
                    Some("tracing_on") => Ok(format!("{}\n", self.world.tracer.on as i32)),
                    Some("current_tracer") => Ok(format!(
                        "{}\n",
                        if self.world.tracer.function {
                            "function"
                        } else {
                            "nop"
                        }
                    )),
                    Some("set_ftrace_filter") => {
                        let mut s = String::new();
                        for f in &self.world.tracer.filter {
                            s.push_str(f);
                            s.push('\n');
                        }
                        Ok(s)
                    }
                    _ => Err(Errno::ENOENT),
                }
            }
        }
    }

    fn kallsyms(&self) -> String {
        let mut s = String::new();
        for f in self.world.funcs.values() {
            match &f.obj {
                None => s.push_str(&format!("{:016x} T {}\n", f.addr, f.name)),
                Some(m) => s.push_str(&format!("{:016x} t {}\t[{m}]\n", f.addr, f.name)),
            }
        }
        s
    }

    /// `echo DATA > PATH` from the shell (a builtin: the shell itself writes).
    pub fn write_file(&mut self, path: &str, data: &str) -> Result<(), Errno> {
        let st = self.stat(path).ok_or(Errno::ENOENT)?;
        if st.dir {
            return Err(Errno::EISDIR);
        }
        if st.mode & 0o222 == 0 {
            return Err(Errno::EACCES);
        }
        let c: Vec<String> = split(path).into_iter().map(str::to_string).collect();
        let c: Vec<&str> = c.iter().map(String::as_str).collect();
        let data_nl = format!("{data}\n");
        match c.as_slice() {
            ["sys", "kernel", "livepatch", rest @ ..] => {
                let prev = self.world.current;
                self.world.current = self.shell;
                let r = crate::failalloc::core(|| {
                    self.klp.sysfs_write(&mut self.world, rest, &data_nl)
                });
                self.world.current = prev;
                r.map(|_| ())
            }
            ["sys", "module", m, "parameters", p] => {
                let def = self
                    .catalog
                    .get(*m)
                    .and_then(|d| d.params.iter().find(|x| x.name == *p).cloned())
                    .ok_or(Errno::ENOENT)?;
                let v = crate::kernel::parse_param(def.kind, data).ok_or(Errno::EINVAL)?;
                if let Some(mm) = self.world.modules.get_mut(*m)
                    && let Some(slot) = mm.params.get_mut(*p)
                {
                    slot.0 = v;
                }
                Ok(())
            }
            ["proc", "sys", "kernel", "ftrace_enabled"] => {
                let v: i64 = data.trim().parse().map_err(|_| Errno::EINVAL)?;
                self.world.set_ftrace_enabled(v != 0)
            }
            ["sys", "kernel", "debug", "kprobes", "enabled"] => {
                let v = klp::sysfs::parse_bool(data)?;
                if v != self.world.kprobes_enabled {
                    self.world.kprobes_enabled = v;
                    self.world.rearm_kprobes();
                }
                Ok(())
            }
            ["sys", "kernel", "debug", "dynamic_debug", "control"] => self.dyndbg(data),
            _ => match tracing_file(path) {
                Some("trace") => {
                    self.world.tracer.trace.clear();
                    Ok(())
                }
                Some("tracing_on") => {
                    self.world.tracer.on = data.trim() != "0";
                    Ok(())
                }
                Some("current_tracer") => match data.trim() {
                    "function" => {
                        self.world.tracer.function = true;
                        Ok(())
                    }
                    "nop" => {
                        self.world.tracer.function = false;
                        Ok(())
                    }
                    _ => Err(Errno::EINVAL),
                },
                Some("set_ftrace_filter") => {
                    let names: Vec<String> = data.split_whitespace().map(str::to_string).collect();
                    for n in &names {
                        if self.world.lookup_any(n).is_none() {
                            return Err(Errno::EINVAL);
                        }
                    }
                    self.world.tracer.filter = names;
                    Ok(())
                }
                _ => Err(Errno::EACCES),
            },
        }
    }

    /// A `dynamic_debug/control` command: `file kernel/livepatch/* +p|-p` or
    /// `func NAME +p|-p`.
    fn dyndbg(&mut self, cmd: &str) -> Result<(), Errno> {
        let w: Vec<&str> = cmd.split_whitespace().collect();
        match w.as_slice() {
            ["file", f, flag] if f.starts_with("kernel/livepatch") => {
                self.world.dyndbg_livepatch = match *flag {
                    "+p" => true,
                    "-p" => false,
                    _ => return Err(Errno::EINVAL),
                };
                Ok(())
            }
            ["func", f, flag] => {
                self.world.dyndbg_off.retain(|x| x != f);
                match *flag {
                    "-p" => {
                        self.world.dyndbg_off.push((*f).to_string());
                        Ok(())
                    }
                    "+p" => Ok(()),
                    _ => Err(Errno::EINVAL),
                }
            }
            _ => Err(Errno::EINVAL),
        }
    }
}
