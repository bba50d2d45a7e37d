"""The Slurm example's scripts with real daemons, run directly (issue 13).

No broker and no agent: each test builds a few persistent namespace hosts
(hosts.py) and runs examples/slurm/ctx-scripts in them as the agent would -
argv only, with CTX_VIEW (a view file holding ``self``), CTX_CONTEXT_ID,
CTX_NODE_ID and CTX_EVENT in the environment, in the agent's order - so each
case is exact and fast:

- a reboot: a compute whose slurmd cannot start (its port taken) while pid
  files from before the reboot lie around and the controller still lists the
  node idle makes 4-restarts/slurmd fail; the same for slurmctld on the head;
- systemd: with a stand-in ``systemctl`` first on PATH, the head disables
  slurmd and runs slurmctld, a compute the reverse;
- watch-mode changes: a compute joins (before the head knows it) and departs;
  the running slurmctld and slurmd learn each new node set without a manual
  step; a compute given a new controller restarts its slurmd for it.

Root only, marker ``slurm``; skips or fails like test_slurm.py when the
packages are missing (fails under CI=true when the install fails).
"""

from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import pytest

from . import hosts, test_slurm
from .test_slurm import SCRIPTS, sinfo_states

# test_slurm.py's fixture: skips without root, namespaces or the packages (fails
# under CI=true when installing them fails).
slurm_installed = test_slurm.slurm_installed

pytestmark = pytest.mark.slurm

SCRIPT_TIMEOUT = 120

# Holds a TCP port the way another program would, so a daemon cannot bind it.
PORT_HOLDER = r"""
import socket, sys, time
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("0.0.0.0", int(sys.argv[1])))
s.listen()
print("listening", flush=True)
time.sleep(3600)
"""

# A stand-in for systemctl: records its argv, and starts, stops and reloads
# the three daemons as Debian's units would (slurmctld and slurmd run with -D
# under the "unit"; munged forks), keeping their pids in $FAKE_SYSTEMCTL_DIR.
FAKE_SYSTEMCTL = r"""#!/bin/sh
set -eu
dir=$FAKE_SYSTEMCTL_DIR
printf '%s\n' "$*" >> "$dir/argv"
running() {
    [ -s "$dir/$1.pid" ] && kill -0 "$(cat "$dir/$1.pid")" 2>/dev/null
}
stop() {
    if running "$1"; then
        pid=$(cat "$dir/$1.pid")
        kill "$pid"
        while kill -0 "$pid" 2>/dev/null; do sleep 0.1; done
    fi
    rm -f "$dir/$1.pid"
}
start() {
    case "$1" in
        munge)
            rm -f /run/munge/munged.pid
            runuser -u munge -- /usr/sbin/munged
            n=0
            until [ -s /run/munge/munged.pid ] || [ $n -ge 50 ]; do sleep 0.1; n=$((n + 1)); done
            cp /run/munge/munged.pid "$dir/munge.pid" ;;
        slurmctld|slurmd)
            setsid "/usr/sbin/$1" -D </dev/null >/dev/null 2>&1 &
            echo $! > "$dir/$1.pid" ;;
        *) echo "fake systemctl: no unit $1" >&2; exit 5 ;;
    esac
}
case "$1" in
    enable) ;;
    disable) [ "$2" != --now ] || stop "$3" ;;
    reset-failed) ;;
    restart) stop "$2"; start "$2" ;;
    reload) running "$2" || exit 1; kill -HUP "$(cat "$dir/$2.pid")" ;;
    is-active) [ "$2" != --quiet ] || shift; running "$2" ;;
    *) echo "fake systemctl: unexpected $*" >&2; exit 1 ;;
esac
"""


class ScriptLab:
    """Slurm hosts plus the deployer's data; runs the example's scripts in them."""

    def __init__(self, netlab, base: Path, diag):
        self.netlab, self.base, self.diag = netlab, base, diag
        self.hosts: List[hosts.PersistentHost] = []
        self.key = base / "munge.key"
        fd = os.open(self.key, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(os.urandom(1024))
        self.nodeparams = base / "nodeparams"
        self.nodeparams.write_text("CPUs=1\n")
        self.fakebin = base / "fakebin"
        self.fakebin.mkdir()
        (self.fakebin / "systemctl").write_text(FAKE_SYSTEMCTL)
        (self.fakebin / "systemctl").chmod(0o755)

    def add(self, label: str) -> hosts.PersistentHost:
        host = hosts.make_slurm_host(self.netlab, label, self.base / "hosts")
        self.hosts.append(host)
        host.start()
        (host.root / "systemctl").mkdir()
        for what in ("/var/log/slurm/slurmctld.log", "/var/log/slurm/slurmd.log",
                     "/var/log/munge/munged.log", "/etc/slurm/slurm.conf"):
            self.diag.add_file("%s: %s" % (label, what), host.path(what), lines=40)
        self.diag.add_file("%s: scripts" % label, host.root / "scripts.log", lines=80)
        self.diag.add_file("%s: systemctl argv" % label, host.root / "systemctl" / "argv")
        return host

    def run_script(self, host: hosts.PersistentHost, script: str, *args: str,
                   event: str = "initial", init: str = "direct",
                   fake_systemctl: bool = False) -> subprocess.CompletedProcess:
        """SCRIPT ARGS in HOST with the environment the agent gives it."""
        view = host.root / "view.json"
        view.write_text(json.dumps({
            "context_id": "ctxscripts", "node_id": "n-" + host.label,
            "self": {"hostname": host.hostname, "fqdn": host.fqdn, "primary_ip": host.ip},
        }))
        env = {"CTX_VIEW": str(view), "CTX_CONTEXT_ID": "ctxscripts",
               "CTX_NODE_ID": "n-" + host.label, "CTX_EVENT": event, "CTX_SLURM_INIT": init,
               "FAKE_SYSTEMCTL_DIR": str(host.root / "systemctl")}
        argv = [str(SCRIPTS / script), *args]
        if fake_systemctl:
            # hosts.run sets PATH itself: env(1) puts the stand-in first.
            argv = ["env", "PATH=%s:%s" % (self.fakebin, hosts.HOST_PATH), *argv]
        proc = host.run(argv, timeout=SCRIPT_TIMEOUT, env=env)
        with open(host.root / "scripts.log", "a") as log:
            log.write("$ %s [%s] -> %s\n%s%s" % (" ".join([script, *args]), event,
                                                proc.returncode, proc.stdout, proc.stderr))
        return proc

    def initial_run(self, host: hosts.PersistentHost, head: Tuple[str, str, str],
                    computes: Sequence[Tuple[str, str, str]], **kw) -> subprocess.CompletedProcess:
        """The agent's initial run in HOST; every script but the last must succeed; the last's result."""
        is_head = head[0] == host.ip
        steps: List[Tuple[str, ...]] = [("clean.sh",)]
        if not is_head:
            steps.append(("1-ipandhost/slurmctld", *head))
        steps += [("1-ipandhost/slurmd", *c) for c in computes]
        steps += [("3-data/mungekey", str(self.key)), ("3-data/nodeparams", str(self.nodeparams))]
        if not is_head:
            steps.append(("4-restarts/slurmctld",))
        for step in steps:
            if not (SCRIPTS / step[0]).exists():
                continue  # as the agent does
            proc = self.run_script(host, *step, **kw)
            assert proc.returncode == 0, (host.label, step, proc.stdout, proc.stderr)
        return self.run_script(host, "4-restarts/slurmd", **kw)

    def change_run(self, host: hosts.PersistentHost, joined=(), departed=(),
                   **kw) -> subprocess.CompletedProcess:
        """A watch-mode change run in HOST (departed first); the result of 4-restarts/slurmd."""
        steps = [("6-departed/slurmd", *p) for p in departed]
        steps += [("1-ipandhost/slurmd", *p) for p in joined]
        for step in steps:
            proc = self.run_script(host, *step, event="change", **kw)
            assert proc.returncode == 0, (host.label, step, proc.stdout, proc.stderr)
        return self.run_script(host, "4-restarts/slurmd", event="change", **kw)


def ident(host: hosts.PersistentHost) -> Tuple[str, str, str]:
    return (host.ip, host.hostname, host.fqdn)


def ok(proc: subprocess.CompletedProcess) -> bool:
    return proc.returncode == 0


def pid_file(host: hosts.PersistentHost, name: str) -> Optional[int]:
    try:
        return int(host.path("/var/spool/slurm/%s.pid" % name).read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def daemons(host: hosts.PersistentHost) -> Dict[str, int]:
    """{comm: pid} of the host's munged/slurmctld/slurmd."""
    return {hosts.comm(pid): pid for pid, _ in host.members()
            if hosts.comm(pid) in ("munged", "slurmctld", "slurmd")}


def reboot(host: hosts.PersistentHost) -> None:
    """What a reboot does to the daemons: killed, their pid files left where they were."""
    pids = [pid for pid, _ in host.members() if hosts.comm(pid) in hosts.SLURM_DAEMONS]
    for pid in pids:
        os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while any(hosts.comm(pid) != "?" for pid in pids) and time.monotonic() < deadline:
        time.sleep(0.05)


def hold_port(host: hosts.PersistentHost, port: int) -> subprocess.Popen:
    """Another program listening on PORT in HOST (killed with the host)."""
    proc = host.popen([sys.executable, "-c", PORT_HOLDER, str(port)], stdout=subprocess.PIPE)
    ready, _, _ = select.select([proc.stdout], [], [], 15)
    line = proc.stdout.readline() if ready else b""
    assert line == b"listening\n", "could not hold port %d in %s: %r" % (port, host.label, line)
    return proc


def wait_states(head: hosts.PersistentHost, expected: Dict[str, str], timeout: float = 30) -> Dict[str, str]:
    """sinfo's {node: state} on HEAD once it equals EXPECTED (else the last seen)."""
    deadline = time.monotonic() + timeout
    while True:
        states = sinfo_states(head)
        if states == expected or time.monotonic() > deadline:
            return states
        time.sleep(0.2)


def node_lines(host: hosts.PersistentHost) -> List[str]:
    text = host.path("/etc/slurm/slurm.conf").read_text()
    return sorted(line for line in text.splitlines() if line.startswith("NodeName="))


def srun(head: hosts.PersistentHost, n: int) -> List[str]:
    proc = head.run(["srun", "-N", str(n), "hostname"], timeout=30)
    assert proc.returncode == 0, "srun -N %d: rc=%s\n%s%s" % (n, proc.returncode, proc.stdout, proc.stderr)
    return sorted(proc.stdout.split())


@pytest.fixture
def lab(slurm_installed, netlab, tmp_path, diag):
    """A ScriptLab; every process, namespace and link removed afterwards."""
    made = ScriptLab(netlab, tmp_path, diag)
    try:
        yield made
    finally:
        for host in made.hosts:
            host.kill()
        netlab.close()
        left = hosts.processes_in([h.net_id for h in made.hosts if h.net_id],
                                  [h.mnt_id for h in made.hosts if h.mnt_id])
        assert not left, "left behind: %s" % left


def test_compute_reboot_with_slurmd_port_taken_fails(lab):
    """After a reboot a compute whose slurmd cannot start fails 4-restarts, though stale pid files and the controller say fine."""
    head, c1 = lab.add("head"), lab.add("c1")
    for host in (head, c1):
        proc = lab.initial_run(host, ident(head), [ident(c1)])
        assert ok(proc), (host.label, proc.stdout, proc.stderr)
    assert wait_states(head, {c1.hostname: "idle"}) == {c1.hostname: "idle"}

    reboot(c1)
    assert pid_file(c1, "slurmd") is not None, "the reboot should leave slurmd's pid file"
    holder = hold_port(c1, 6818)
    proc = lab.initial_run(c1, ident(head), [ident(c1)])
    assert proc.returncode != 0, "4-restarts/slurmd reported ok without a slurmd:\n%s%s" % (
        proc.stdout, proc.stderr)
    assert "slurmd (pid" in proc.stderr and "exited" in proc.stderr, proc.stderr
    assert "Unable to bind listen port (6818)" in proc.stderr, "the log tail should say why"
    # What fooled the old check: the controller has not noticed yet (SlurmdTimeout).
    assert sinfo_states(head) == {c1.hostname: "idle"}
    assert "slurmd" not in daemons(c1)

    # With the port free again, the same run succeeds and the node runs jobs.
    holder.kill()
    holder.wait()
    proc = lab.run_script(c1, "4-restarts/slurmd")
    assert ok(proc), (proc.stdout, proc.stderr)
    assert pid_file(c1, "slurmd") == daemons(c1)["slurmd"]
    assert srun(head, 1) == [c1.hostname]


def test_head_reboot_with_slurmctld_port_taken_fails(lab):
    """After a reboot the head fails 4-restarts when its slurmctld cannot bind its port, and succeeds once it can."""
    head = lab.add("head")
    # One compute in slurm.conf that never comes up: the controller does not need it.
    absent = ("10.213.0.250", "absent", "absent.example")
    proc = lab.initial_run(head, ident(head), [absent])
    assert ok(proc), (proc.stdout, proc.stderr)
    first = pid_file(head, "slurmctld")
    assert first == daemons(head)["slurmctld"]

    reboot(head)
    holder = hold_port(head, 6817)
    t0 = time.monotonic()
    proc = lab.initial_run(head, ident(head), [absent])
    assert proc.returncode != 0, "4-restarts/slurmd reported ok without a slurmctld:\n%s%s" % (
        proc.stdout, proc.stderr)
    assert "slurmctld (pid" in proc.stderr and "exited" in proc.stderr, proc.stderr
    assert time.monotonic() - t0 < 30, "a dead slurmctld should be noticed at once"
    assert "slurmctld" not in daemons(head)

    holder.kill()
    holder.wait()
    proc = lab.run_script(head, "4-restarts/slurmd")
    assert ok(proc), (proc.stdout, proc.stderr)
    assert pid_file(head, "slurmctld") == daemons(head)["slurmctld"] != first


def test_systemd_role_decides_enabled_daemons(lab):
    """With systemd the head enables slurmctld and disables slurmd, a compute the reverse; the cluster runs jobs."""
    head, c1 = lab.add("head"), lab.add("c1")
    for host in (head, c1):
        proc = lab.initial_run(host, ident(head), [ident(c1)], init="systemd", fake_systemctl=True)
        assert ok(proc), (host.label, proc.stdout, proc.stderr)

    def argv(host):
        return (host.root / "systemctl" / "argv").read_text().splitlines()

    assert argv(head) == ["disable --now slurmd", "reset-failed slurmd", "enable munge slurmctld",
                          "restart munge", "restart slurmctld"]
    assert argv(c1) == ["disable --now slurmctld", "reset-failed slurmctld", "enable munge slurmd",
                        "restart munge", "restart slurmd"]
    assert sorted(daemons(head)) == ["munged", "slurmctld"]
    assert sorted(daemons(c1)) == ["munged", "slurmd"]
    assert srun(head, 1) == [c1.hostname]

    # A change run that changes nothing restarts nothing.
    proc = lab.change_run(c1, init="systemd", fake_systemctl=True)
    assert ok(proc), (proc.stdout, proc.stderr)
    assert argv(c1)[5:] == ["is-active --quiet slurmd"]


def test_join_and_departure_reach_running_daemons(lab):
    """A compute joins (before the head knows it) and departs: slurmctld restarts, slurmd reloads, sinfo and srun follow."""
    head, c1, c2 = lab.add("head"), lab.add("c1"), lab.add("c2")
    for host in (head, c1):
        proc = lab.initial_run(host, ident(head), [ident(c1)], fake_systemctl=True)
        assert ok(proc), (host.label, proc.stdout, proc.stderr)
    ctld, c1_slurmd = daemons(head)["slurmctld"], daemons(c1)["slurmd"]

    # c2 joins. Its own run may start first: its slurmd waits for the controller to learn it.
    joined: Dict[str, object] = {}

    def join_c2():
        try:
            joined["run"] = lab.initial_run(c2, ident(head), [ident(c1), ident(c2)],
                                            fake_systemctl=True)
        except BaseException as e:  # reported by the test's thread below
            joined["error"] = e

    thread = threading.Thread(target=join_c2)
    thread.start()
    try:
        time.sleep(1)
        for host in (head, c1):
            proc = lab.change_run(host, joined=[ident(c2)], fake_systemctl=True)
            assert ok(proc), (host.label, proc.stdout, proc.stderr)
    finally:
        thread.join(SCRIPT_TIMEOUT * 2)
    assert "error" not in joined, joined
    assert ok(joined["run"]), (joined["run"].stdout, joined["run"].stderr)
    names = sorted([c1.hostname, c2.hostname])
    assert wait_states(head, dict.fromkeys(names, "idle")) == dict.fromkeys(names, "idle")
    assert srun(head, 2) == names
    # What Slurm 22.05 needed: a new slurmctld; the running slurmd only re-read slurm.conf.
    assert daemons(head)["slurmctld"] != ctld
    assert daemons(c1)["slurmd"] == c1_slurmd
    assert node_lines(head) == node_lines(c1) == node_lines(c2)
    assert len(node_lines(head)) == 2

    # c2 departs. A name that is not a host name label is refused before it reaches a path.
    bad = lab.run_script(head, "6-departed/slurmd", c2.ip, "../nodes/" + c2.hostname, c2.fqdn,
                         event="change")
    assert bad.returncode != 0 and "not a host name label" in bad.stderr
    # Another address under the same name is another node: its line stays.
    other = lab.run_script(head, "6-departed/slurmd", "10.213.0.250", c2.hostname, c2.fqdn,
                           event="change")
    assert ok(other) and len(node_lines(head)) == 2
    for host in (head, c1):
        proc = lab.change_run(host, departed=[ident(c2)], fake_systemctl=True)
        assert ok(proc), (host.label, proc.stdout, proc.stderr)
        assert node_lines(host) == ["NodeName=%s NodeAddr=%s NodeHostname=%s CPUs=1"
                                    % (c1.hostname, c1.ip, c1.hostname)], host.label
    assert wait_states(head, {c1.hostname: "idle"}) == {c1.hostname: "idle"}
    assert srun(head, 1) == [c1.hostname]
    assert daemons(c1)["slurmd"] == c1_slurmd
    # Direct mode (CTX_SLURM_INIT=direct) never calls systemctl.
    assert not any((h.root / "systemctl" / "argv").exists() for h in (head, c1, c2))


def test_new_controller_restarts_slurmd(lab):
    """A compute whose controller is replaced (watch mode) restarts slurmd for the new SlurmctldHost and serves it."""
    head, c1, head2 = lab.add("head"), lab.add("c1"), lab.add("head2")
    for host in (head, c1):
        proc = lab.initial_run(host, ident(head), [ident(c1)])
        assert ok(proc), (host.label, proc.stdout, proc.stderr)
    proc = lab.initial_run(head2, ident(head2), [ident(c1)])
    assert ok(proc), (proc.stdout, proc.stderr)
    before = daemons(c1)["slurmd"]

    for step in (("6-departed/slurmctld", *ident(head)), ("1-ipandhost/slurmctld", *ident(head2)),
                 ("4-restarts/slurmctld",), ("4-restarts/slurmd",)):
        if (SCRIPTS / step[0]).exists():
            proc = lab.run_script(c1, *step, event="change")
            assert ok(proc), (step, proc.stdout, proc.stderr)
    assert "SlurmctldHost=%s(%s)" % (head2.hostname, head2.ip) in (
        c1.path("/etc/slurm/slurm.conf").read_text().splitlines())
    assert daemons(c1)["slurmd"] != before
    assert wait_states(head2, {c1.hostname: "idle"}) == {c1.hostname: "idle"}
    assert srun(head2, 1) == [c1.hostname]
