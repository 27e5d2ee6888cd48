//! `klp-sim demo`: a narrated run of the simulated kernel. Tasks keep calling the
//! patched functions while patches are applied, a transition is held up by a task
//! sleeping in patched code (and the core says which task, function and frame), the
//! transition is reversed, and a cumulative patch replaces the stack.

use std::io::{self, Write};

use klp::Blocked;

use crate::kernel::Kernel;
use crate::world::NSEC_PER_SEC;

struct Demo<'a> {
    k: Kernel,
    out: &'a mut dyn Write,
    shown: usize,
}

impl Demo<'_> {
    fn say(&mut self, s: &str) -> io::Result<()> {
        self.flush_log()?;
        writeln!(self.out, "\n==> {s}")
    }

    fn flush_log(&mut self) -> io::Result<()> {
        let lines: Vec<(u64, String)> = self.k.world.dmesg[self.shown..].to_vec();
        self.shown = self.k.world.dmesg.len();
        for (t, l) in lines {
            writeln!(
                self.out,
                "    [{:5}.{:06}] {l}",
                t / NSEC_PER_SEC,
                (t % NSEC_PER_SEC) / 1000
            )?;
        }
        Ok(())
    }

    fn sh(&mut self, cmd: &str) -> io::Result<()> {
        self.flush_log()?;
        writeln!(self.out, "    $ {cmd}")
    }

    fn cat(&mut self, path: &str) -> io::Result<()> {
        self.sh(&format!("cat {path}"))?;
        let s = self
            .k
            .read_file(path)
            .unwrap_or_else(|e| format!("cat: error {e:?}\n"));
        for l in s.lines() {
            writeln!(self.out, "      {l}")?;
        }
        Ok(())
    }

    fn insmod(&mut self, m: &str, params: &[&str]) -> io::Result<()> {
        self.sh(&format!("insmod {m}.ko {}", params.join(" ")))?;
        let p: Vec<String> = params.iter().map(|s| s.to_string()).collect();
        let name = m.to_string();
        if let Err(e) = self.k.in_process("insmod", |k, _| k.insmod(&name, &p)) {
            writeln!(self.out, "      insmod failed: {e:?}")?;
        }
        Ok(())
    }

    fn echo(&mut self, v: &str, path: &str) -> io::Result<()> {
        self.sh(&format!("echo {v} > {path}"))?;
        if let Err(e) = self.k.write_file(path, v) {
            writeln!(self.out, "      write error: {e:?}")?;
        }
        Ok(())
    }

    fn wait(&mut self, secs: f64) -> io::Result<()> {
        self.k.sleep_secs(secs);
        self.flush_log()?;
        writeln!(
            self.out,
            "      ({secs} s of virtual time pass; the getpid callers keep running)"
        )
    }

    fn progress(&mut self) -> io::Result<()> {
        self.flush_log()?;
        let Some(p) = self.k.klp.transition_patch() else {
            return writeln!(self.out, "      no transition in progress");
        };
        let name = self.k.klp.name_of(p).unwrap_or("?").to_string();
        let target = self.k.klp.target();
        let total = self.k.world.tasks.len();
        let done = self
            .k
            .world
            .tasks
            .iter()
            .filter(|t| t.patch_state == target)
            .count();
        let width = 30;
        let fill = done * width / total.max(1);
        writeln!(
            self.out,
            "      '{name}' {}: [{}{}] {done}/{total} tasks switched",
            target.verb(),
            "#".repeat(fill),
            ".".repeat(width - fill)
        )?;
        let mut lines = Vec::new();
        self.k.klp.blockers(&mut self.k.world, &mut |world, t, why| {
            let task = world.task(t);
            let (comm, pid) = task.map_or(("?".into(), 0), |x| (x.comm.clone(), x.pid));
            let text = match why {
                Blocked::SleepingOn { func, addr, frame } => format!(
                    "sleeping in {func} (frame #{frame}, return address {addr:#x}); it switches once it leaves that function"
                ),
                Blocked::Running => "running on a CPU; it switches at its next safe point".into(),
                Blocked::Unreliable(e) => format!("its stack cannot be walked reliably ({e:?})"),
                Blocked::NoReliableStacks => "no reliable stack walker: safe points only".into(),
            };
            lines.push(format!("      blocked: {comm}:{pid} {text}"));
        });
        for l in lines {
            writeln!(self.out, "{l}")?;
        }
        Ok(())
    }
}

/// Runs the demo, writing its narration to `out`.
pub fn run(out: &mut dyn Write) -> io::Result<()> {
    let k = Kernel::boot(4);
    let mut d = Demo { k, out, shown: 0 };
    writeln!(
        d.out,
        "klp demo on the simulated kernel (4 CPUs, virtual clock); kernel log lines are indented."
    )?;
    d.say("Four user processes hammer getpid(); a kworker of test_klp_callbacks_busy sleeps inside busymod_work_func.")?;
    let n = 4;
    let shell = d.k.shell;
    for _ in 0..n {
        d.k.world.spawn(
            Some(shell),
            "test_klp-call_g",
            crate::world::Kind::User,
            Vec::new(),
            crate::world::Activity::GetpidLoop,
        );
    }
    d.insmod("test_klp_callbacks_busy", &["block_transition=Y"])?;
    d.cat("/proc/cmdline")?;

    d.say("Live-patch cmdline_proc_show: no task is inside it, so every task switches within a second (running ones at their next safe point).")?;
    d.insmod("test_klp_livepatch", &[])?;
    d.wait(1.0)?;
    d.cat("/proc/cmdline")?;

    d.say(
        "A patch for busymod_work_func: the sleeping kworker cannot switch; the transition waits.",
    )?;
    d.insmod("test_klp_callbacks_demo", &[])?;
    d.wait(2.0)?;
    d.cat("/sys/kernel/livepatch/test_klp_callbacks_demo/transition")?;
    d.progress()?;

    d.say("15 s later the core signals the remaining tasks (the kworker sleeps uninterruptibly: still blocked).")?;
    d.wait(14.0)?;
    d.progress()?;

    d.say("Give up: writing 0 to 'enabled' reverses the transition, which completes at the next retry.")?;
    d.echo("0", "/sys/kernel/livepatch/test_klp_callbacks_demo/enabled")?;
    d.wait(2.0)?;
    d.progress()?;

    d.say("A cumulative patch (replace=1) replaces test_klp_livepatch atomically: cmdline is original again, meminfo is patched.")?;
    d.insmod("test_klp_atomic_replace", &["replace=1"])?;
    d.wait(2.0)?;
    d.cat("/proc/cmdline")?;
    d.cat("/proc/meminfo")?;
    d.sh("ls /sys/kernel/livepatch")?;
    let names = d.k.list_dir("/sys/kernel/livepatch").unwrap_or_default();
    writeln!(d.out, "      {}", names.join("  "))?;

    d.say("Disable it: every task switches back, the patch is freed.")?;
    d.echo("0", "/sys/kernel/livepatch/test_klp_atomic_replace/enabled")?;
    d.wait(2.0)?;
    d.cat("/proc/meminfo")?;
    d.flush_log()?;
    writeln!(
        d.out,
        "\n==> Done. Every line above marked 'livepatch:' is the kernel's own text."
    )
}
