#!/usr/bin/env python3
"""drive.py: the soak's driver, run by ci/soak once everything is built.

Starts the soak program (its command line after "--"), then until the time is up
chooses at random (seeded) what to do to it with klpctl: load a patch file without
waiting (stacked, or cumulative: "replace": true), disable an enabled patch, reverse a
running transition (disable a patch being enabled, enable one being disabled), force
one (rarely, and only during the warm-up), unload the files of disabled patches, try a
load while a transition runs (refused: -EBUSY), dlopen or dlclose the library, or let
the transitions run for a while. It samples the process's VmRSS, descriptors and
mappings after the warm-up and at the end, each time with no patch loaded and the
library closed, and ends with the summary line. See ci/soak for the judgement.
"""
import argparse
import json
import os
import random
import re
import signal
import subprocess
import sys
import time


class Failure(Exception):
    pass


def parse():
    p = argparse.ArgumentParser()
    p.add_argument("--arch", required=True)
    p.add_argument("--seconds", type=float, required=True)
    p.add_argument("--seed", type=int, required=True)
    p.add_argument("--work", required=True)
    p.add_argument("--klpctl", required=True)
    p.add_argument("--patches", required=True, help="NAME=FILE,... (name r*: cumulative)")
    p.add_argument("--slow", type=float, default=1.0, help="time factor (qemu-user)")
    p.add_argument("--emulated", action="store_true", help="the program runs under qemu-user")
    p.add_argument("--env", action="append", default=[])
    p.add_argument("cmd", nargs=argparse.REMAINDER)
    a = p.parse_args()
    if a.cmd and a.cmd[0] == "--":
        a.cmd = a.cmd[1:]
    return a


class Prog:
    """The soak program: its FIFO, output and process."""

    def __init__(self, args):
        self.work = args.work
        self.fifo = os.path.join(args.work, "cmd")
        self.out_path = os.path.join(args.work, "prog.out")
        self.err_path = os.path.join(args.work, "prog.err")
        if os.path.exists(self.fifo):
            os.unlink(self.fifo)
        os.mkfifo(self.fifo)
        env = dict(os.environ)
        for e in args.env:
            k, v = e.split("=", 1)
            env[k] = v
        self.out = open(self.out_path, "w")
        self.err = open(self.err_path, "w")
        self.proc = subprocess.Popen(args.cmd, cwd=args.work, env=env, stdout=self.out,
                                     stderr=self.err, stdin=subprocess.DEVNULL)
        # Opened after the program: its open(O_RDWR) does not wait; ours (write only)
        # waits until it has opened its end.
        self.cmd = None
        self.pid = self.proc.pid
        self.acks = 0

    def connect(self, timeout):
        deadline = time.time() + timeout
        while True:
            self.check_alive()
            try:
                fd = os.open(self.fifo, os.O_WRONLY | os.O_NONBLOCK)
                break
            except OSError:
                if time.time() > deadline:
                    raise Failure(f"the program did not open its command FIFO in {timeout} s")
                time.sleep(0.1)
        os.set_blocking(fd, True)
        self.cmd = os.fdopen(fd, "w", buffering=1)

    def lines(self):
        with open(self.out_path) as f:
            return f.read().splitlines()

    def check_alive(self):
        rc = self.proc.poll()
        if rc is not None:
            raise Failure(f"the program (pid {self.pid}) ended unexpectedly: {describe_status(rc)}")

    def send(self, word, timeout):
        """Sends a command and waits for its acknowledgement."""
        self.cmd.write(word + "\n")
        self.acks += 1
        deadline = time.time() + timeout
        while True:
            if sum(1 for l in self.lines() if l.startswith("ack ")) >= self.acks:
                return
            self.check_alive()
            if time.time() > deadline:
                raise Failure(f"the program did not acknowledge '{word}' in {timeout} s")
            time.sleep(0.05)

    def stats(self):
        last = None
        for l in self.lines():
            if l.startswith("stats ") or l.startswith("final "):
                last = l
        return parse_stats(last) if last else None

    def transitions(self):
        patching = unpatching = 0
        with open(self.err_path, errors="replace") as f:
            for l in f:
                if l.rstrip().endswith("': unpatching complete"):
                    unpatching += 1
                elif l.rstrip().endswith("': patching complete"):
                    patching += 1
        return patching, unpatching


def translation_buffer_rss(pid):
    """Under qemu-user: the resident KiB of the emulator's translation buffer, its one
    large anonymous rwx mapping (128 MiB in qemu 7.2). It fills with the code translated
    so far, new patch code and code rewritten by site writes included, up to its size,
    then is flushed and filled again: what it holds is the emulator's cache, not the
    guest's memory."""
    best = 0
    cur = None
    with open(f"/proc/{pid}/smaps") as f:
        for l in f:
            parts = l.split()
            if re.match(r"^[0-9a-f]+-[0-9a-f]+$", parts[0]):
                lo, hi = (int(x, 16) for x in parts[0].split("-"))
                anon_rwx = parts[1] == "rwxp" and len(parts) < 6
                cur = anon_rwx and hi - lo >= 32 << 20
            elif cur and parts[0] == "Rss:":
                best = max(best, int(parts[1]))
    return best


def cpu_seconds(pid):
    """The user and system time of the process so far."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def describe_status(rc):
    if rc < 0:
        try:
            return f"killed by {signal.Signals(-rc).name}"
        except ValueError:
            return f"killed by signal {-rc}"
    return f"exit status {rc}"


def parse_stats(line):
    m = re.match(r"(stats|final) (\d+): calls (\d+) violations (\d+) excused (\d+) lib (\d) "
                 r"lib_calls (\d+) opens (\d+) closes (\d+)", line)
    if not m:
        return None
    keys = ["calls", "violations", "excused", "lib", "lib_calls", "opens", "closes"]
    return dict(zip(keys, map(int, m.groups()[2:])))


class Soak:
    def __init__(self, args):
        self.a = args
        self.rng = random.Random(args.seed)
        self.patches = {}
        for item in args.patches.split(","):
            name, path = item.split("=", 1)
            self.patches[name] = path
        self.loaded = set()     # names whose file is loaded (listed or not)
        self.dead = set()       # forced: they stay loaded for the process's life
        self.lib_open = False
        self.counts = {k: 0 for k in [
            "load", "load_cumulative", "load_refused_busy", "disable", "reverse", "force",
            "unload", "lib_open", "lib_close", "timeouts", "waits"]}
        self.log = open(os.path.join(args.work, "drive.log"), "w", buffering=1)
        self.t0 = time.time()
        self.samples = {}
        self.trims = 0
        self.timeout = 60 * args.slow   # a transition that takes longer has timed out

    # --- klpctl
    def ctl(self, *args, check=True, quiet=False):
        cmd = [self.a.klpctl, "--pid", str(self.prog.pid), *args]
        try:
            r = subprocess.run(cmd, capture_output=True, text=True, timeout=120 * self.a.slow)
        except subprocess.TimeoutExpired:
            self.prog.check_alive()
            raise Failure(f"klpctl {' '.join(args)} got no answer in {120 * self.a.slow:.0f} s")
        if not quiet or r.returncode != 0:
            self.note(f"klpctl {' '.join(args)} -> {r.returncode} {r.stdout.strip()[:200]} "
                      f"{r.stderr.strip()[:300]}")
        if check and r.returncode != 0:
            self.prog.check_alive()
            raise Failure(f"klpctl {' '.join(args)} failed ({r.returncode}): "
                          f"{(r.stderr or r.stdout).strip()}")
        return r

    def listing(self):
        r = self.ctl("--json", "list", quiet=True)
        try:
            lst = json.loads(r.stdout)
        except json.JSONDecodeError as e:
            raise Failure(f"klpctl --json list: not JSON ({e}): {r.stdout[:200]}")
        flags = [p["name"] + ":" + "".join(c for c, k in (("e", "enabled"), ("t", "transition"),
                                                            ("f", "forced"), ("r", "replace"))
                                           if p[k]) for p in lst]
        self.note(f"list: {' '.join(flags) or '-'}")
        return lst

    def note(self, text):
        self.log.write(f"{time.time() - self.t0:8.2f} {text}\n")

    def elapsed(self):
        return time.time() - self.t0

    # --- state
    def state(self):
        lst = self.listing()
        listed = {p["name"]: p for p in lst}
        for name, p in listed.items():
            if p["forced"]:
                self.dead.add(name)
        trans = next((p for p in lst if p["transition"]), None)
        return listed, trans

    def wait_idle(self, limit):
        deadline = time.time() + limit
        while True:
            listed, trans = self.state()
            if trans is None:
                return listed
            if time.time() > deadline:
                return None
            self.prog.check_alive()
            time.sleep(0.25 * self.a.slow)

    # --- operations
    def load(self, name, expect_busy=False):
        r = self.ctl("load", "--no-wait", self.patches[name], check=False)
        if r.returncode == 0:
            self.loaded.add(name)
            self.counts["load_cumulative" if name.startswith("r") else "load"] += 1
            return True
        if "-EBUSY" in r.stderr and expect_busy:
            self.counts["load_refused_busy"] += 1
            return False
        self.prog.check_alive()
        raise Failure(f"klpctl load {name} failed: {r.stderr.strip()}")

    def unload_freed(self, listed):
        """Unloads the files of patches that are no longer listed (disabled, freed)."""
        for name in sorted(self.loaded - set(listed) - self.dead):
            r = self.ctl("unload", "--no-wait", name, check=False)
            if r.returncode == 0:
                self.loaded.discard(name)
                self.counts["unload"] += 1
            elif "-EBUSY" in r.stderr:
                # Not freed yet: retried later. The patch leaves the list before its
                # free work drops the file's reference, so klpctl may add meanwhile
                # that it "stays loaded until the process exits" although it was not
                # forced (which patches a force holds, force() knows).
                continue
            else:
                raise Failure(f"klpctl unload {name} failed: {r.stderr.strip()}")

    def lib(self, want_open):
        word = "open" if want_open else "close"
        self.prog.send(word, 30 * self.a.slow)
        self.lib_open = want_open
        self.counts["lib_" + word] += 1

    def force(self, trans, listed):
        """A forced transition, bracketed for the program (see soak.c's soak_enter)."""
        name = trans["name"]
        self.prog.send("force+", 30 * self.a.slow)
        r = self.ctl("force", name, check=False)
        time.sleep(0.2 * self.a.slow)
        self.prog.send("force-", 30 * self.a.slow)
        if r.returncode != 0 and "-EINVAL" not in r.stderr:
            raise Failure(f"klpctl force {name} failed: {r.stderr.strip()}")
        if r.returncode == 0:
            # What the core marks forced (the kernel's rule): the patch being disabled;
            # when a cumulative patch is being enabled, every other patch listed.
            if not trans["enabled"]:
                self.dead.add(name)
            elif trans["replace"]:
                self.dead.update(n for n in listed if n != name)
            self.counts["force"] += 1
            held = ", ".join(sorted(self.dead)) or "none"
            print(f"soak {self.a.arch}: forced the {'patching' if trans['enabled'] else 'unpatching'} "
                  f"transition of '{name}' at {self.elapsed():.0f} s (held for the process's "
                  f"life: {held})", flush=True)

    def step(self, warmup, force_budget):
        listed, trans = self.state()
        rng = self.rng
        if rng.random() < 0.5:
            self.unload_freed(listed)
        if rng.random() < 0.05:
            self.lib(not self.lib_open)
            return
        if trans is not None:
            name = trans["name"]
            patching = trans["enabled"]
            x = rng.random()
            # Rarely, and at least once when the warm-up allows (past its half).
            late = self.elapsed() > 0.1 * self.a.seconds and self.counts["force"] == 0
            if warmup and force_budget > 0 and (x < 0.04 or late):
                self.force(trans, listed)
            elif x < 0.20:
                # reverse: disable a patch being enabled, enable one being disabled
                r = self.ctl("disable" if patching else "enable", "--no-wait", name, check=False)
                if r.returncode == 0:
                    self.counts["reverse"] += 1
                elif "-EINVAL" not in r.stderr and "-ENOENT" not in r.stderr:
                    # (-EINVAL, -ENOENT: it completed meanwhile, and was freed)
                    raise Failure(f"reversing {name}: {r.stderr.strip()}")
            elif x < 0.25:
                free = [n for n in self.patches if n not in self.loaded and n not in self.dead]
                if free:
                    self.load(rng.choice(free), expect_busy=True)
            elif x < 0.45:
                # let it finish, or time out
                self.counts["waits"] += 1
                if self.wait_idle(self.timeout) is None:
                    self.counts["timeouts"] += 1
                    print(f"soak {self.a.arch}: a transition of '{name}' did not end in "
                          f"{self.timeout:.0f} s (at {self.elapsed():.0f} s)", flush=True)
            else:
                time.sleep(rng.uniform(0.1, 0.6) * self.a.slow)
            return
        enabled = [n for n, p in listed.items() if p["enabled"]]
        free = [n for n in self.patches if n not in self.loaded and n not in self.dead]
        x = rng.random()
        if free and (x < 0.5 or not enabled) and len(enabled) < 4:
            self.load(rng.choice(free))
        elif enabled and x < 0.85:
            name = rng.choice(enabled)
            r = self.ctl("disable", "--no-wait", name, check=False)
            if r.returncode == 0:
                self.counts["disable"] += 1
            elif "-EBUSY" not in r.stderr and "-EINVAL" not in r.stderr:
                raise Failure(f"klpctl disable {name}: {r.stderr.strip()}")
        else:
            listed, _ = self.state()
            self.unload_freed(listed)
            time.sleep(rng.uniform(0.1, 0.5) * self.a.slow)

    # --- samples
    def quiesce(self):
        """No patch loaded but the forced ones, the library closed."""
        deadline = time.time() + 4 * self.timeout
        while True:
            listed = self.wait_idle(max(1.0, deadline - time.time()))
            if listed is None:
                raise Failure("the transitions did not end (quiescing for a sample); "
                              f"klpctl status: {self.ctl('status', check=False).stdout.strip()}")
            enabled = [n for n, p in listed.items() if p["enabled"]]
            if not enabled:
                break
            self.ctl("disable", "--no-wait", enabled[-1], check=False)
            if time.time() > deadline:
                raise Failure("could not disable every patch for a sample")
        # A disabled patch is freed shortly after its transition ends: its file can be
        # unloaded from then on (-EBUSY until then).
        while True:
            listed, _ = self.state()
            self.unload_freed(listed)
            left = self.loaded - self.dead
            if not left:
                break
            if time.time() > deadline:
                raise Failure("patch files still loaded after disabling everything: "
                              f"{sorted(left)}")
            time.sleep(0.1 * self.a.slow)
        if self.lib_open:
            self.lib(False)

    def sample(self, what, judged=True):
        self.quiesce()
        time.sleep(1.0 * self.a.slow)
        self.prog.send("trim", 30 * self.a.slow)
        heap = [l for l in self.prog.lines() if l.startswith("heap ")][-1]
        heap = int(heap.split()[1]) // 1024
        # The "resident" line follows the "heap" line; wait for it.
        deadline = time.time() + 10 * self.a.slow
        while True:
            own = [l for l in self.prog.lines() if l.startswith("resident ")]
            if len(own) >= self.trims + 1 or time.time() > deadline:
                break
            time.sleep(0.05)
        self.trims += 1
        own = int(own[-1].split()[1]) if own else -1
        pid = self.prog.pid
        rss = maps = None
        fds = []
        for _ in range(5):
            fds.append(len(os.listdir(f"/proc/{pid}/fd")))
            time.sleep(0.2)
        with open(f"/proc/{pid}/status") as f:
            for l in f:
                if l.startswith("VmRSS:"):
                    rss = int(l.split()[1])
        raw = rss
        # For a failure's diagnosis: every mapping, its size and residence.
        tag = ("start" if "start" not in self.samples else "end") if judged else \
            f"{self.elapsed():.0f}s"
        with open(f"/proc/{pid}/smaps") as f, \
                open(os.path.join(self.a.work, f"smaps-{tag}.txt"), "w") as out:
            out.write(f.read())
        tb = translation_buffer_rss(pid) if self.a.emulated else 0
        if self.a.emulated:
            # The guest's memory as the guest sees it (the program's own count of its
            # resident pages, see soak.c's resident_kib): the emulator's translated
            # code and its own heaps are not the program's memory.
            if own < 0:
                raise Failure("the program could not count its resident pages")
            rss = own
        with open(f"/proc/{pid}/maps") as f:
            maps = sum(1 for _ in f)
        # A descriptor of a klpctl connection being closed may be counted: the least of
        # five readings.
        s = {"rss": rss, "fds": min(fds), "maps": maps, "at": self.elapsed(), "vmrss": raw,
             "heap": heap}
        s["cpu"] = cpu_seconds(pid)
        emu = (f" (the guest's own resident pages; the emulator's VmRSS {raw} KiB, "
               f"{tb} KiB of it translated code)") if self.a.emulated else ""
        print(f"soak {self.a.arch}: {what} at {s['at']:.0f} s: rss {rss} KiB{emu}, fds {s['fds']}, "
              f"maps {maps}, heap in use {heap} KiB; the program has used {s['cpu']:.0f} s "
              "of CPU", flush=True)
        if judged:
            self.samples["start" if "start" not in self.samples else "end"] = s
        self.note(f"sample {what}: {s}")
        return s

    # --- the run
    def run(self):
        self.prog = Prog(self.a)
        try:
            return self._run()
        finally:
            if self.prog.proc.poll() is None:
                self.prog.proc.kill()
                self.prog.proc.wait()

    def _run(self):
        a = self.a
        self.prog.connect(60 * a.slow)
        deadline = time.time() + 60 * a.slow
        while not any(l.startswith("soak ready") for l in self.prog.lines()):
            self.prog.check_alive()
            if time.time() > deadline:
                raise Failure("the program did not start")
            time.sleep(0.1)
        # The control socket answers.
        while self.ctl("list", check=False).returncode != 0:
            self.prog.check_alive()
            if time.time() > deadline:
                raise Failure("the program's control socket does not answer")
            time.sleep(0.2)
        self.t0 = time.time()
        end = self.t0 + a.seconds
        warm_end = self.t0 + a.seconds * 0.2
        start = None
        next_sample = self.t0 + a.seconds * 0.3
        force_budget = 2
        last_progress = time.time()
        while time.time() < end:
            self.prog.check_alive()
            warmup = start is None
            if warmup and time.time() >= warm_end:
                start = self.sample("after the warm-up")
                continue
            # Between the two samples judged, one every tenth of the run, for the trend.
            if not warmup and time.time() >= next_sample:
                self.sample("progress", judged=False)
                next_sample += a.seconds * 0.1
                continue
            before = self.counts["force"]
            self.step(warmup, force_budget)
            force_budget -= self.counts["force"] - before
            if time.time() - last_progress >= 30:
                last_progress = time.time()
                st = self.prog.stats() or {}
                p, u = self.prog.transitions()
                print(f"soak {a.arch}: {self.elapsed():.0f} s: {p + u} transitions, "
                      f"{st.get('calls', 0)} calls, {st.get('violations', 0)} violations",
                      flush=True)
        if start is None:
            start = self.sample("after the warm-up")
        end_s = self.sample("at the end")
        self.prog.send("quit", 30 * a.slow)
        try:
            rc = self.prog.proc.wait(timeout=30 * a.slow)
        except subprocess.TimeoutExpired:
            raise Failure("the program did not exit after 'quit'")
        if rc != 0:
            raise Failure(f"the program ended with {describe_status(rc)} after 'quit'")
        final = None
        for l in self.prog.lines():
            if l.startswith("final "):
                final = parse_stats(l)
        if final is None:
            raise Failure("the program printed no final line")
        p, u = self.prog.transitions()
        return {"start": start, "end": end_s, "final": final, "patching": p,
                "unpatching": u, "counts": self.counts}


# Growth allowed between the sample after the warm-up and the one at the end, both taken
# with no patch file loaded (but the forced ones, which stay for the process's life and
# are all forced during the warm-up) and the library closed. See ci/soak's header.
RSS_TOLERANCE_KIB = 8 * 1024   # or 10 % of the first sample, whichever is larger
FDS_TOLERANCE = 0
MAPS_TOLERANCE = 16


def judge(res):
    """The reasons the run fails, from its result."""
    why = []
    s, e, f = res["start"], res["end"], res["final"]
    if f["violations"]:
        why.append(f"{f['violations']} violations of the consistency model")
    rss_limit = max(RSS_TOLERANCE_KIB, s["rss"] // 10)
    if e["rss"] - s["rss"] > rss_limit:
        why.append(f"RSS grew by {e['rss'] - s['rss']} KiB after the warm-up "
                   f"(tolerance {rss_limit} KiB)")
    if e["fds"] - s["fds"] > FDS_TOLERANCE:
        why.append(f"{e['fds'] - s['fds']} more open descriptors after the warm-up "
                   f"(tolerance {FDS_TOLERANCE})")
    if e["maps"] - s["maps"] > MAPS_TOLERANCE:
        why.append(f"{e['maps'] - s['maps']} more mapped regions after the warm-up "
                   f"(tolerance {MAPS_TOLERANCE})")
    return why


def summary(arch, transitions, stats, start, end):
    def pair(key):
        a = start.get(key) if start else None
        b = end.get(key) if end else None
        return f"{'?' if a is None else a}\u2192{'?' if b is None else b}"

    return (f"soak {arch}: {transitions} transitions, {stats.get('calls', '?')} calls, "
            f"{stats.get('violations', '?')} violations, rss {pair('rss')} KiB, "
            f"fds {pair('fds')}, maps {pair('maps')}")


def main():
    a = parse()
    # Killed: the program goes too (run()'s finally).
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    print(f"soak {a.arch}: seed {a.seed}, {a.seconds:.0f} s, warm-up {a.seconds * 0.2:.0f} s "
          f"(work files in {a.work})", flush=True)
    soak = Soak(a)
    try:
        res = soak.run()
    except Failure as e:
        print(f"soak {a.arch}: FAILED: {e}", flush=True)
        for path in (os.path.join(a.work, "prog.out"), os.path.join(a.work, "prog.err"),
                     os.path.join(a.work, "drive.log")):
            try:
                with open(path, errors="replace") as f:
                    tail = f.read().splitlines()[-12:]
            except OSError:
                continue
            print(f"--- last lines of {path}:")
            print("\n".join(tail))
        try:
            st = soak.prog.stats() or {}
            p, u = soak.prog.transitions()
        except Exception:
            st, p, u = {}, 0, 0
        print(summary(a.arch, p + u, st, soak.samples.get("start"), soak.samples.get("end")))
        sys.exit(1)
    f = res["final"]
    c = res["counts"]
    print(f"soak {a.arch}: {res['patching']} patching and {res['unpatching']} unpatching "
          f"transitions; {c['load']} loads and {c['load_cumulative']} cumulative, "
          f"{c['load_refused_busy']} refused during a transition, {c['disable']} disables, "
          f"{c['reverse']} reversals, {c['force']} forced, {c['unload']} unloads, "
          f"{c['timeouts']} waits timed out; library opened {f['opens']} times, "
          f"{f['lib_calls']} calls into it; {f['excused']} mismatches excused by a force",
          flush=True)
    why = judge(res)
    if f["violations"]:
        shown = [l for l in soak.prog.lines() if l.startswith("violation: ")][:3]
        print("\n".join(f"soak {a.arch}: the program: {l}" for l in shown))
    for w in why:
        print(f"soak {a.arch}: FAILED: {w}", flush=True)
    print(summary(a.arch, res["patching"] + res["unpatching"], f, res["start"], res["end"]))
    sys.exit(1 if why else 0)


if __name__ == "__main__":
    main()
