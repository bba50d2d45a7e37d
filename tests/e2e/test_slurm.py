"""End to end with real software: a Slurm + munge cluster assembled by ctxd (issue 6).

N+1 persistent namespace hosts (hosts.py), each with its own hostname,
address, /etc/hosts, /etc/slurm, /etc/munge, /run/munge, ... run the
UNMODIFIED ctxagent.py with examples/slurm/ctx-scripts against a real
``twistd -n ctxd`` on a hub host; then ``sinfo`` on the head shows the N
computes idle and ``srun -N N hostname`` runs on every one of them.

Root only; installs slurmctld slurmd slurm-client munge with apt-get when
they are missing (a failed install fails the test when CI=true, else skips).
Select with ``-m slurm``, deselect with ``-m 'not slurm'``; CTXD_SLURM_N sets
the number of computes (default 3).
"""

from __future__ import annotations

import os
import pwd
import stat
import subprocess
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import pytest

from . import hosts, netns
from .helpers import (
    AGENT,
    AGENT_PYTHON,
    REPO,
    BrokerProcess,
    finish,
    free_port,
    make_host_keys,
)

pytestmark = pytest.mark.slurm

N = int(os.environ.get("CTXD_SLURM_N", "3"))
EXAMPLE = REPO / "examples" / "slurm"
SCRIPTS = Path(os.environ.get("CTXD_SLURM_SCRIPTS", EXAMPLE / "ctx-scripts"))
CLUSTER = Path(os.environ.get("CTXD_SLURM_CLUSTER", EXAMPLE / "cluster.toml"))
AGENT_TIMEOUT = 60 + 2 * N          # --timeout of each agent, seconds
SINFO_TIMEOUT = 60                  # for the computes to show up idle
SRUN_TIMEOUT = 30


@pytest.fixture(scope="module")
def slurm_installed():
    """The Slurm and munge packages are present (installed with apt-get if need be)."""
    hosts.require_packages(hosts.install_slurm, hosts.SLURM_PACKAGES)
    for path in (SCRIPTS, CLUSTER):
        if not path.exists():
            pytest.skip("the slurm example has not landed: no %s" % path)


class SlurmLab:
    """The hub (broker) and the Slurm hosts of one test; cleaned up by the fixture."""

    def __init__(self, netlab: netns.NetLab, base: Path, diag):
        self.netlab = netlab
        self.base = base
        self.diag = diag
        self.hub = netlab.add_host("hub")
        self.broker = BrokerProcess(base / "broker", host=self.hub.ip, port=free_port(), nshost=self.hub)
        diag.add_file("broker log", self.broker.log_path, lines=100)
        self.hosts: List[hosts.PersistentHost] = []
        self.cid: Optional[str] = None

    def add_host(self, label: str) -> hosts.PersistentHost:
        host = hosts.make_slurm_host(self.netlab, label, self.base / "hosts")
        self.hosts.append(host)
        host.start()
        return host

    @property
    def head(self) -> Optional[hosts.PersistentHost]:
        return next((h for h in self.hosts if h.label == "head"), None)

    def live_diagnostics(self) -> None:
        """Ask the running cluster what it thinks (before it is torn down)."""
        if self.cid and self.broker.proc is not None and self.broker.proc.poll() is None:
            proc = self.broker.ctxctl("status", self.cid, timeout=15)
            text = "rc=%s\n%s%s" % (proc.returncode, proc.stdout, proc.stderr)
            self.diag.add("ctxctl status", lambda text=text: text)
        head = self.head
        if head is not None and head.init is not None and head.init.poll() is None:
            for argv in (["scontrol", "ping"], ["sinfo", "-N", "-l"],
                         ["scontrol", "show", "nodes"]):
                proc = head.run(argv, timeout=10)
                text = "rc=%s\n%s%s" % (proc.returncode, proc.stdout, proc.stderr)
                self.diag.add("head: %s" % " ".join(argv), lambda text=text: text)
        for host in self.hosts:
            procs = "\n".join("%d %s" % p for p in host.members()) or "(none)"
            self.diag.add("%s: processes" % host.label, lambda procs=procs: procs)


class Agent:
    """The unmodified ctxagent.py run inside one Slurm host."""

    def __init__(self, host: hosts.PersistentHost, group: str):
        self.host, self.group = host, group
        self.state_dir = host.root / "agent-state"
        self.ssh_dir = host.root / "ssh"
        self.known_hosts = host.root / "ssh_known_hosts"
        make_host_keys(self.ssh_dir)
        self.known_hosts.write_text("")
        self.proc = None
        self.seconds: Optional[float] = None

    def start(self, bootstrap: Path, extra: Sequence[str] = ()) -> None:
        argv = [AGENT_PYTHON, AGENT, "--bootstrap", bootstrap, "--scripts-dir", SCRIPTS,
                "--state-dir", self.state_dir, "--hosts-file", "/etc/hosts",
                "--known-hosts-file", self.known_hosts, "--ssh-dir", self.ssh_dir,
                "--timeout", AGENT_TIMEOUT, *extra]
        with open(self.host.root / "agent.out", "ab") as out:
            self.proc = self.host.popen(argv, env={"CTX_SLURM_INIT": "direct"},
                                        stdout=out, stderr=out)
        self.started = time.monotonic()

    def wait(self, deadline: float) -> object:
        """The agent's exit status, or "still running" at DEADLINE."""
        try:
            rc = self.proc.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            return "still running"
        self.seconds = time.monotonic() - self.started
        return rc


def deploy(where: Path, computes: int, example: Path = CLUSTER) -> Path:
    """The deployer's side: the example's cluster file for COMPUTES nodes, a fresh munge key."""
    where.mkdir(parents=True)
    cluster = where / "cluster.toml"
    cluster.write_text(hosts.set_group_quantity(example.read_text(), "compute", computes))
    # As the example's documentation says: 1024 random bytes next to the cluster file.
    fd = os.open(where / "munge.key", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(os.urandom(1024))
    return cluster


@pytest.fixture
def slurm_lab(slurm_installed, netlab, tmp_path, diag, request):
    """A hub and Slurm hosts; every process, namespace and link removed afterwards."""
    lab = SlurmLab(netlab, tmp_path, diag)
    try:
        yield lab
    finally:
        failed = any(getattr(getattr(request.node, "e2e_rep_" + when, None), "failed", False)
                     for when in ("setup", "call"))
        try:
            if failed:
                lab.live_diagnostics()
        finally:
            for host in lab.hosts:
                host.kill()
            lab.broker.kill()
            netlab.close()
            left = hosts.processes_in([h.net_id for h in lab.hosts if h.net_id],
                                      [h.mnt_id for h in lab.hosts if h.mnt_id])
            daemons = hosts.daemons_in(lab.hosts)
            assert not left and not daemons, "left behind: %s" % (left or daemons)


def sinfo_states(head: hosts.PersistentHost) -> Dict[str, str]:
    """{node: state} as sinfo on the head reports it ({} when it cannot)."""
    proc = head.run(["sinfo", "-h", "-N", "-o", "%N %T"], timeout=10)
    if proc.returncode != 0:
        return {}
    return dict(line.split(None, 1) for line in proc.stdout.splitlines() if line.strip())


def test_slurm_cluster(slurm_lab, tmp_path, diag, timing):
    """ctxd turns N+1 blank namespace hosts into a working Slurm cluster: N computes idle, srun -N N runs on each."""
    t_test = time.monotonic()
    lab = slurm_lab
    lab.broker.start()
    head = lab.add_host("head")
    computes = [lab.add_host("c%d" % i) for i in range(1, N + 1)]
    agents = {head.label: Agent(head, "head")}
    agents.update({c.label: Agent(c, "compute") for c in computes})
    for agent in agents.values():
        for label, path in hosts.slurm_logs(agent.host, agent.state_dir):
            diag.add_file(label, path, lines=60)
    hosts_s = time.monotonic() - t_test

    cluster = deploy(tmp_path / "deploy", N)
    ctx = lab.broker.create(cluster, tmp_path / "out")
    lab.cid = ctx.cid

    # All N+1 agents at once, each discovering its own address and names.
    t_agents = time.monotonic()
    for agent in agents.values():
        agent.start(ctx.bootstrap(agent.group))
    deadline = t_agents + AGENT_TIMEOUT + 30
    rcs = {label: agent.wait(deadline) for label, agent in agents.items()}
    agents_s = time.monotonic() - t_agents
    assert rcs == {label: 0 for label in agents}, rcs

    rc, out, err = finish(lab.broker.ctxctl_popen("wait", ctx.cid, "--timeout", 30,
                                                  "--interval", 0.25), 45)
    assert rc == 0, "ctxctl wait exited %s\n%s\n%s" % (rc, out, err)

    # The controller sees every compute, idle.
    names = sorted(c.hostname for c in computes)
    states: Dict[str, str] = {}
    poll_deadline = time.monotonic() + SINFO_TIMEOUT
    while time.monotonic() < poll_deadline:
        states = sinfo_states(head)
        if sorted(states) == names and set(states.values()) == {"idle"}:
            break
        time.sleep(0.5)
    assert states == {name: "idle" for name in names}, "sinfo on the head: %s" % states
    idle_s = time.monotonic() - t_agents

    # A job step on every compute, each printing the hostname it ran on.
    srun = head.run(["srun", "-N", str(N), "hostname"], timeout=SRUN_TIMEOUT)
    assert srun.returncode == 0, "srun: rc=%s\n%s\n%s" % (srun.returncode, srun.stdout, srun.stderr)
    printed = srun.stdout.split()
    assert sorted(printed) == names, printed
    srun_s = time.monotonic() - t_agents

    # What made it work, host by host: the context's munge key installed for
    # munged, one slurm.conf for all (Slurm insists), each daemon in its host.
    key = (tmp_path / "deploy" / "munge.key").read_bytes()
    confs = set()
    for host in [head, *computes]:
        key_path = host.path("/etc/munge/munge.key")
        st = key_path.stat()
        assert key_path.read_bytes() == key, host.label
        assert (stat.S_IMODE(st.st_mode), st.st_uid) == (0o400, pwd.getpwnam("munge").pw_uid), host.label
        confs.add(host.path("/etc/slurm/slurm.conf").read_text())
        expected = ["munged", "slurmctld"] if host is head else ["munged", "slurmd"]
        # The step's slurmstepd may still be finishing its clean-up when srun
        # returns; it has a few seconds to go, the daemons must stay.
        settle = time.monotonic() + 10
        while True:
            daemons = sorted(hosts.comm(pid) for pid, _ in host.members()
                             if hosts.comm(pid) in hosts.SLURM_DAEMONS)
            if daemons == expected or time.monotonic() > settle:
                break
            time.sleep(0.2)
        assert daemons == expected, (host.label, daemons)
    assert len(confs) == 1, "the hosts' slurm.conf files differ"
    # Everything deployment-specific in it came from the context.
    (conf,) = confs
    lines = conf.splitlines()
    assert "SlurmctldHost=%s(%s)" % (head.hostname, head.ip) in lines
    assert sorted(line for line in lines if line.startswith("NodeName=")) == sorted(
        "NodeName=%s NodeAddr=%s NodeHostname=%s CPUs=1" % (c.hostname, c.ip, c.hostname) for c in computes
    )

    slowest = max(agents.values(), key=lambda a: a.seconds)
    timing("slurm N=%d: agents start -> srun success %.2fs (all agents exited 0 %.2fs, slowest %s; "
           "computes idle %.2fs); hosts set up %.2fs; whole test %.2fs"
           % (N, srun_s, agents_s, slowest.host.label, idle_s, hosts_s,
              time.monotonic() - t_test))


ELASTIC = Path(os.environ.get("CTXD_SLURM_ELASTIC", EXAMPLE / "elastic.toml"))
WATCH = ["--watch", "--settle", "2", "--settle-max", "10"]
LEASE = 10   # seconds: the elastic example's compute lease, shortened for the test (the shortest allowed)


def wait_for_sinfo(head: hosts.PersistentHost, names: List[str], timeout: float) -> Dict[str, str]:
    """sinfo on the head until it lists exactly NAMES, all idle; what it showed last."""
    states: Dict[str, str] = {}
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        states = sinfo_states(head)
        if sorted(states) == sorted(names) and set(states.values()) == {"idle"}:
            return states
        time.sleep(0.5)
    raise AssertionError("sinfo on the head: %s, wanted %s idle" % (states, sorted(names)))


def srun_everywhere(head: hosts.PersistentHost, names: List[str]) -> None:
    srun = head.run(["srun", "-N", str(len(names)), "hostname"], timeout=SRUN_TIMEOUT)
    assert srun.returncode == 0, "srun: rc=%s\n%s\n%s" % (srun.returncode, srun.stdout, srun.stderr)
    assert sorted(srun.stdout.split()) == sorted(names), srun.stdout


def test_slurm_cluster_grows_and_shrinks_with_no_manual_step(slurm_lab, tmp_path, diag, timing):
    """The elastic example (issue 13): 2 computes, scaled to 4 (the new ones join, the controller
    learns them, srun -N 4 runs), then one removed and one killed without a word (its lease):
    sinfo offers neither, and jobs run on the rest. Every agent runs in watch mode."""
    if not ELASTIC.exists():
        pytest.skip("no %s" % ELASTIC)
    t0 = time.monotonic()
    lab = slurm_lab
    lab.broker.start()
    head = lab.add_host("head")
    computes = [lab.add_host("c%d" % i) for i in range(1, 5)]
    agents = {head.label: Agent(head, "head")}
    agents.update({c.label: Agent(c, "compute") for c in computes})
    for agent in agents.values():
        diag.add_file("%s: agent log" % agent.host.label, agent.state_dir / "ctxagent.log", lines=80)
        for label, path in hosts.slurm_logs(agent.host, agent.state_dir):
            diag.add_file(label, path, lines=60)
    cluster = deploy(tmp_path / "deploy", 2, ELASTIC)
    cluster.write_text(cluster.read_text().replace('lease = "2m"', 'lease = "%ds"' % LEASE))
    ctx = lab.broker.create(cluster, tmp_path / "out")
    lab.cid = ctx.cid

    def ctxctl(*args):
        proc = lab.broker.ctxctl(*args, timeout=90)
        assert proc.returncode == 0, "ctxctl %s: %s%s" % (" ".join(map(str, args)), proc.stdout, proc.stderr)
        return proc.stdout

    for label in ("head", "c1", "c2"):
        agents[label].start(ctx.bootstrap(agents[label].group), WATCH)
    ctxctl("wait", ctx.cid, "--timeout", 90, "--interval", 0.25)
    wait_for_sinfo(head, [c.hostname for c in computes[:2]], SINFO_TIMEOUT)
    first_s = time.monotonic() - t0

    # Grow: two more computes boot with the same user-data; nobody touches the controller.
    ctxctl("scale", ctx.cid, "compute", 4)
    t_grow = time.monotonic()
    for c in computes[2:]:
        agents[c.label].start(ctx.bootstrap("compute"), WATCH)
    ctxctl("wait", ctx.cid, "--timeout", 90, "--interval", 0.25)
    names = sorted(c.hostname for c in computes)
    wait_for_sinfo(head, names, SINFO_TIMEOUT)
    srun_everywhere(head, names)
    grow_s = time.monotonic() - t_grow
    assert all(a.proc.poll() is None for a in agents.values()), "every agent keeps watching"

    # Shrink: c1 removed by the deployer; c2's VM dies (every process of its host killed).
    nodes = {n["identity"]["hostname"]: n["id"] for n in lab.broker.status(ctx.cid)["nodes"]}
    c1, c2 = computes[0], computes[1]
    t_shrink = time.monotonic()
    ctxctl("node", "remove", ctx.cid, nodes[c1.hostname], "--shrink")
    c2.kill()
    rest = sorted(c.hostname for c in computes[2:])
    wait_for_sinfo(head, rest, SINFO_TIMEOUT + LEASE + 30)
    srun_everywhere(head, rest)
    shrink_s = time.monotonic() - t_shrink
    departed = {n["identity"]["hostname"]: n["departed"] for n in lab.broker.status(ctx.cid)["nodes"]}
    assert (departed[c1.hostname], departed[c2.hostname]) == ("removed", "lost"), departed
    assert agents["c1"].proc.wait(30) == 6, "the removed node's watcher stops: refused"
    assert agents["head"].proc.poll() is None
    timing("slurm elastic: first 2 computes idle %.2fs; +2 computes to srun -N 4 %.2fs; "
           "-2 (removed, lost after a %d s lease) to srun -N 2 %.2fs" % (first_s, grow_s, LEASE, shrink_s))
