"""Agent-side figures: ctxagent.py start-up time, full-run wall time and peak RSS for a 3-role view.

    python bench/agent_bench.py [--runs 5] [--python /usr/bin/python3 [--python ...]]

A real `twistd -n --pidfile= ctxd` (bench/loadgen.py's BrokerProcess: free loopback port,
temporary state dir) and `ctxctl create` of a cluster file with four groups: `app` requires
the roles `db`, `web` and `cache`, which the groups of the same names provide (one node
each). The three providers are enrolled once by real ctxagent.py runs; after that every
`app` node's view is complete on its first poll and has 3 roles, so a measured run is the
agent's own work plus the broker's replies, never a wait for another node.

For each interpreter (the system /usr/bin/python3, which is what a VM has, and this
virtualenv's python unless it is the same one) and each of RUNS rounds, interleaved:

- `python3 -c pass`: the floor (interpreter start-up and exit);
- `python3 ctxagent.py --help`: the agent's start-up (imports, argparse);
- a full run of the real agent for one new `app` node with a file bootstrap and its own
  state dir, hosts and known_hosts files, ssh dir and ctx-scripts (1-ipandhost/ROLE and
  4-restarts/ROLE for each role: /bin/sh scripts appending a line to a file): enroll to
  exit 0, checked (exit 0, the six script calls recorded, the managed hosts block written).

Each measured command runs under a small wrapper process of its own (`python3 -I -S`) that
forks, execs it and reaps it with os.wait4, which returns its rusage: wall time is
perf_counter around fork..reap, CPU is ru_utime + ru_stime and peak RSS is ru_maxrss (the
largest of the process and its waited-for children: for the full run the agent itself; its
scripts and `ip` are far smaller). One untimed warm-up round per interpreter comes first. Prints one row per quantity (median, all runs, the floor's median
of the same metric and interpreter from the same rounds, and the ratio of the medians);
diagnostics (the largest imports from `-X importtime`, the cost of compiling ctxagent.py and
of the agent's TLS context, the wrapper's own RSS) go to stderr.
"""

import argparse
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
from typing import Dict, List, Optional, Sequence, Tuple

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import loadgen  # noqa: E402  (the broker process helper and the table printer)
from loadgen import ROOT, print_table  # noqa: E402

AGENT = os.path.join(ROOT, "ctxagent.py")
CTXCTL = os.path.join(os.path.dirname(sys.executable), "ctxctl")
SYSTEM_PYTHON = "/usr/bin/python3"
ROLES = ("db", "web", "cache")
SCRIPT_CALLS = len(ROLES) * 2          # 1-ipandhost/ROLE (one provider each) + 4-restarts/ROLE
MEASURED = "app"
INITIAL_HOSTS = "127.0.0.1 localhost\n"

CLUSTER = """\
name = "agent-bench"

[[group]]
name = "app"
quantity = {quantity}
provides = ["app"]
requires = [{{ role = "db" }}, {{ role = "web" }}, {{ role = "cache" }}]
""" + "".join("""
[[group]]
name = "{r}"
quantity = 1
provides = ["{r}"]
""".format(r=r) for r in ROLES)

# One line per call, next to CTX_VIEW (the run's state dir); no fork beyond /bin/sh itself.
SCRIPT = """#!/bin/sh
printf '%s %s\\n' {name} "$*" >> "${{CTX_VIEW%/*}}/calls"
"""

_IMPORTS_PROBE = """
import sys, time
t0 = time.perf_counter()
import ctxagent
t1 = time.perf_counter()
pem = open(sys.argv[1]).read()
times = []
for _ in range(20):
    s = time.perf_counter()
    ctxagent.make_tls_context(pem)
    times.append(time.perf_counter() - s)
with open(ctxagent.__file__) as f:
    source = f.read()
compiles = []
for _ in range(5):
    s = time.perf_counter()
    compile(source, "ctxagent.py", "exec")
    compiles.append(time.perf_counter() - s)
print("%.2f %.2f %.2f %.2f" % ((t1 - t0) * 1e3, times[0] * 1e3, sorted(times)[10] * 1e3, sorted(compiles)[2] * 1e3))
"""


def child_env() -> Dict[str, str]:
    """Our environment minus what steers Python or ctxctl (the agent must not see the bench's settings)."""
    return {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "CTXCTL_"))}


class AgentBenchBroker(loadgen.BrokerProcess):
    """loadgen's broker, whose state dir is also removed when it fails to start."""

    def __init__(self) -> None:
        try:
            super().__init__()
        except BaseException:
            if hasattr(self, "popen"):
                self.cleanup()
            elif hasattr(self, "state"):
                shutil.rmtree(self.state, ignore_errors=True)
            raise


# Runs in a small interpreter of its own (-I -S): forks, execs the command, reaps it with
# os.wait4 and prints "EXIT WALL_S CPU_S MAXRSS_KIB". Not posix_spawn from the bench itself:
# a vfork'd child's ru_maxrss starts at its parent's peak (the kernel keeps the old mm's
# high-water mark across exec), so every figure would read as the bench's own RSS. A fork
# copies only the wrapper's anonymous pages (about 5 MiB, printed on stderr as the
# wrapper's own bias), well below `python3 -c pass`.
_WRAPPER = """
import os, sys, time
output, argv = sys.argv[1], sys.argv[2:]
start = time.perf_counter()
pid = os.fork()
if pid == 0:
    try:
        fd = os.open(output, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        os.dup2(fd, 1)
        os.dup2(fd, 2)
        os.execv(argv[0], argv)
    finally:
        os._exit(127)
_, status, usage = os.wait4(pid, 0)
wall = time.perf_counter() - start
print(os.waitstatus_to_exitcode(status), wall, usage.ru_utime + usage.ru_stime, usage.ru_maxrss)
"""


class Spawner:
    """Runs one measured child at a time through _WRAPPER, in its own session."""

    def __init__(self) -> None:
        self.python = SYSTEM_PYTHON if os.path.exists(SYSTEM_PYTHON) else sys.executable
        self.proc: Optional[subprocess.Popen] = None

    def run(self, argv: Sequence[str], output: str, timeout: float, cwd: str) -> Tuple[int, float, float, int]:
        """(exit status, wall s, CPU s, peak RSS KiB) of ARGV, its stdout and stderr appended to OUTPUT."""
        self.proc = subprocess.Popen([self.python, "-I", "-S", "-c", _WRAPPER, output, *argv], cwd=cwd,
                                     stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, env=child_env(),
                                     start_new_session=True)
        try:
            out, _ = self.proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise SystemExit("%s still running after %.0f s" % (" ".join(argv), timeout))
        finally:
            self.proc = None
        try:
            code, wall, cpu, rss = out.split()
        except ValueError:
            raise SystemExit("the measuring wrapper failed for %s: %r" % (" ".join(argv), out))
        return int(code), float(wall), float(cpu), int(rss)

    def kill(self) -> None:
        proc = self.proc
        if proc is not None and proc.poll() is None:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            proc.wait()


class Bench:
    """The broker, the context, the providers, and the measured runs in one temp dir."""

    def __init__(self, work: str, broker: AgentBenchBroker, spawner: Spawner, quantity: int) -> None:
        self.work, self.broker, self.spawner = work, broker, spawner
        self.nodes = 0
        cluster = os.path.join(work, "cluster.toml")
        with open(cluster, "w") as f:
            f.write(CLUSTER.format(quantity=quantity))
        self.boot = os.path.join(work, "boot")
        created = subprocess.run([CTXCTL, "--state-dir", broker.state, "create", cluster, "--out", self.boot],
                                 capture_output=True, text=True, timeout=60, env=child_env())
        if created.returncode != 0:
            raise SystemExit("ctxctl create exited %d: %s" % (created.returncode, created.stderr.strip()))
        self.cid = created.stdout.strip()
        self.scripts = os.path.join(work, "ctx-scripts")
        for phase in ("1-ipandhost", "4-restarts"):
            os.makedirs(os.path.join(self.scripts, phase))
            for role in ROLES:
                path = os.path.join(self.scripts, phase, role)
                with open(path, "w") as f:
                    f.write(SCRIPT.format(name="%s/%s" % (phase, role)))
                os.chmod(path, 0o755)
        self.no_scripts = os.path.join(work, "no-scripts")
        os.mkdir(self.no_scripts)

    def node_dir(self, label: str) -> str:
        """A fresh machine: state dir (not yet created), hosts files, its own SSH host keys."""
        self.nodes += 1
        root = os.path.join(self.work, "nodes", "%03d-%s" % (self.nodes, label))
        ssh = os.path.join(root, "ssh")
        os.makedirs(ssh)
        for kind, bits in (("ed25519", []), ("ecdsa", ["-b", "256"])):
            subprocess.run(["ssh-keygen", "-q", "-t", kind, *bits, "-N", "", "-C", "root@bench",
                            "-f", os.path.join(ssh, "ssh_host_%s_key" % kind)],
                           check=True, timeout=30, capture_output=True)
        for name, text in (("hosts", INITIAL_HOSTS), ("ssh_known_hosts", "")):
            with open(os.path.join(root, name), "w") as f:
                f.write(text)
        return root

    def agent_argv(self, python: str, group: str, root: str, n: int) -> List[str]:
        return [python, AGENT, "--bootstrap", os.path.join(self.boot, group + ".bootstrap.json"),
                "--scripts-dir", self.scripts if group == MEASURED else self.no_scripts,
                "--state-dir", os.path.join(root, "state"),
                "--hosts-file", os.path.join(root, "hosts"),
                "--known-hosts-file", os.path.join(root, "ssh_known_hosts"),
                "--ssh-dir", os.path.join(root, "ssh"), "--timeout", "60",
                "--address", "127.0.%d.%d" % divmod(n, 250), "--hostname", "bench%d" % n,
                "--fqdn", "bench%d.cluster.bench" % n]

    def enroll_providers(self, python: str) -> None:
        """Real agents for db, web and cache, concurrently; each view is complete at once."""
        procs = []
        for i, role in enumerate(ROLES):
            root = self.node_dir(role)
            log = open(os.path.join(root, "agent.out"), "wb")
            procs.append((role, root, subprocess.Popen(
                self.agent_argv(python, role, root, 2 + i), stdout=log, stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL, env=child_env(), cwd=root)))
            log.close()
        for role, root, proc in procs:
            try:
                code = proc.wait(timeout=90)
            except subprocess.TimeoutExpired:
                for _, _, p in procs:
                    p.kill()
                raise SystemExit("provider %s still running after 90 s" % role)
            if code != 0:
                raise SystemExit("provider %s exited %d:\n%s" % (role, code, tail(os.path.join(root, "agent.out"))))

    def full_run(self, python: str) -> Tuple[float, float, int]:
        """(wall s, CPU s, peak RSS KiB) of one checked agent run for a new app node."""
        root = self.node_dir(MEASURED)
        out = os.path.join(root, "agent.out")
        code, wall, cpu, rss = self.spawner.run(self.agent_argv(python, MEASURED, root, 10 + self.nodes),
                                                out, 120, root)
        if code != 0:
            raise SystemExit("the agent exited %d:\n%s" % (code, tail(out)))
        with open(os.path.join(root, "state", "calls")) as f:
            calls = f.read().splitlines()
        with open(os.path.join(root, "hosts")) as f:
            hosts = f.read()
        if len(calls) != SCRIPT_CALLS or "# BEGIN ctxd (context %s)" % self.cid not in hosts:
            raise SystemExit("the agent exited 0 but its scripts ran %r and its hosts file is\n%s" % (calls, hosts))
        return wall, cpu, rss

    def command(self, argv: Sequence[str]) -> Tuple[float, float, int]:
        code, wall, cpu, rss = self.spawner.run(argv, os.devnull, 30, self.work)
        if code != 0:
            raise SystemExit("%s exited %d" % (" ".join(argv), code))
        return wall, cpu, rss


def tail(path: str, lines: int = 30) -> str:
    try:
        with open(path, errors="replace") as f:
            return "".join(f.readlines()[-lines:])
    except OSError as exc:
        return "(%s)" % exc


def python_label(python: str) -> str:
    version = subprocess.run([python, "-c", "import sys; print('%d.%d.%d' % sys.version_info[:3])"],
                             capture_output=True, text=True, timeout=30, env=child_env()).stdout.strip()
    return "%s %s" % (version, python)


def pythons_to_measure(given: Optional[List[str]]) -> List[str]:
    """The interpreters asked for, else the system python3 and ours unless they are one and the same."""
    if given:
        return given
    pythons = [p for p in (SYSTEM_PYTHON, sys.executable) if os.path.exists(p)]
    if len(pythons) == 2 and python_label(pythons[0]).split()[0] == python_label(pythons[1]).split()[0] \
            and os.path.realpath(pythons[0]) == os.path.realpath(pythons[1]):
        pythons.pop()
    return pythons


def diagnostics(python: str, ca_path: str) -> None:
    """stderr: the largest top-level imports of `ctxagent.py --help`, the cost of compiling the
    script and of the agent's TLS context."""
    probe = subprocess.run([python, "-X", "importtime", AGENT, "--help"], capture_output=True, text=True,
                           timeout=60, env=child_env())
    top = []
    for line in probe.stderr.splitlines():
        if not line.startswith("import time:") or "cumulative" in line:
            continue
        _, cumulative, name = line[len("import time:"):].split("|")
        if name.startswith("  "):     # nested: counted in its top-level import's cumulative time
            continue
        top.append((int(cumulative), name.strip()))
    total = sum(us for us, _ in top)
    top.sort(reverse=True)
    print("  %s: -X importtime of ctxagent.py --help: %.1f ms in top-level imports (site's included); largest: %s"
          % (python, total / 1e3, ", ".join("%s %.1f" % (name, us / 1e3) for us, name in top[:8])), file=sys.stderr)
    env = child_env()
    env["PYTHONPATH"] = ROOT
    probe = subprocess.run([python, "-c", _IMPORTS_PROBE, ca_path], capture_output=True, text=True, timeout=60,
                           env=env)
    if probe.returncode == 0:
        imports, first, later, compiled = probe.stdout.split()
        print("  %s: import ctxagent %s ms (its imports, from its cached .pyc); compiling ctxagent.py %s ms"
              " (paid by every `python3 ctxagent.py`: a script run as __main__ is never cached);"
              " make_tls_context %s ms the first time, %s ms later"
              % (python, imports, compiled, first, later), file=sys.stderr)
    else:
        print("  %s: import probe failed: %s" % (python, probe.stderr.strip()[-300:]), file=sys.stderr)


def rows(label: str, figures: Dict[str, Dict[str, List[float]]]) -> List[List[Tuple[str, str]]]:
    """One table row per (metric, command); the floor is `-c pass` of the same metric."""
    out = []
    for metric, unit, scale, fmt in (("wall", "ms", 1e3, "%.1f"), ("CPU", "ms", 1e3, "%.1f"),
                                     ("peak RSS", "MiB", 1 / 1024.0, "%.1f")):
        floor = statistics.median(figures["-c pass"][metric])
        for command in ("-c pass", "ctxagent.py --help", "full run, 3 roles"):
            values = figures[command][metric]
            median = statistics.median(values)
            out.append([("python", label), ("quantity", "%s (%s): %s" % (metric, unit, command)),
                        ("median", fmt % (median * scale)), ("runs", " ".join(fmt % (v * scale) for v in values)),
                        ("floor", fmt % (floor * scale)), ("ratio", "%.2f" % (median / floor) if floor else "-")])
    return out


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=5, help="measured rounds per interpreter [5]")
    parser.add_argument("--python", action="append", metavar="PATH",
                        help="interpreter to run the agent with (repeatable) [%s and this one]" % SYSTEM_PYTHON)
    args = parser.parse_args(argv)
    if args.runs < 1:
        parser.error("--runs must be at least 1")
    # SIGTERM (e.g. from timeout(1)) unwinds, so the agent, the broker and the temp dirs go.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    pythons = pythons_to_measure(args.python)
    labels = {p: python_label(p) for p in pythons}
    work = tempfile.mkdtemp(prefix="ctxd-agent-bench-")
    spawner = Spawner()
    broker = None
    try:
        broker = AgentBenchBroker()
        bench = Bench(work, broker, spawner, quantity=(args.runs + 1) * len(pythons))
        bench.enroll_providers(pythons[0])
        results = {}
        for python in pythons:
            figures: Dict[str, Dict[str, List[float]]] = {}
            for round_ in range(args.runs + 1):      # round 0: warm-up, not counted
                measured = [("-c pass", bench.command([python, "-c", "pass"])),
                            ("ctxagent.py --help", bench.command([python, AGENT, "--help"])),
                            ("full run, 3 roles", bench.full_run(python))]
                if round_ == 0:
                    continue
                for command, (wall, cpu, rss) in measured:
                    f = figures.setdefault(command, {"wall": [], "CPU": [], "peak RSS": []})
                    f["wall"].append(wall)
                    f["CPU"].append(cpu)
                    f["peak RSS"].append(rss)
            results[python] = figures
        first = True
        for python in pythons:
            for cols in rows(labels[python], results[python]):
                print_table(cols, header=first)
                first = False
        bias = statistics.median(bench.command(["/bin/true"])[2] for _ in range(3))
        print("  the wrapper's own bias: ru_maxrss of /bin/true through it %.1f MiB (a lower bound on every"
              " peak RSS figure)" % (bias / 1024.0), file=sys.stderr)
        for python in pythons:
            diagnostics(python, broker.ca_path)
    finally:
        spawner.kill()
        if broker is not None:
            broker.cleanup()
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
