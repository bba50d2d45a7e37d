"""The Debian packages on a fresh Debian 12 machine booted with systemd: what a site admin does.

``apt-get install ./ctxd_*.deb ./ctxd-agent_*.deb`` on a machine that never saw ctxd, its
systemd unit started confined as the ctxd user on Debian's own Twisted 22.4 and friends; the
admin sets the public URL and restarts it; ctxctl (the packaged one, inside the machine)
creates a context and four agents (the packaged agent) assemble the cluster against it; an
upgrade to a newer version keeps the state, the admin's configuration and the cluster, and
restarts the broker; the init script (hosts without systemd) starts, reloads and stops it;
removing keeps the state and purging removes everything ctxd made.

The tests run in order on one machine (a package's life is a sequence); each says what it
needs from the ones before.
"""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

import pytest

from tests.e2e.helpers import (EXAMPLE_CLUSTER, EXIT_OK, Context, expected_hosts, loopback_vms,
                               managed_block, start_all, wait_all)

from .conftest import UPGRADE, VERSION

pytestmark = pytest.mark.package

STATE = "/var/lib/ctxd"
CONF = "/etc/ctxd/ctxd.conf"
URL = "https://127.0.0.1:8443"
_READY = """
import sys, urllib.request
try:
    with urllib.request.urlopen("http://127.0.0.1:9464/" + sys.argv[1], timeout=5) as r:
        sys.stdout.write(r.read().decode())
except Exception as e:
    sys.exit("%s" % e)
"""


def http_get(machine, path: str, check: bool = True):
    """GET the metrics listener's PATH from inside the machine."""
    return machine.run("python3", "-c", _READY, path, check=check)


def wait_ready(machine, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while True:
        done = http_get(machine, "readyz", check=False)
        if done.returncode == 0:
            return
        assert time.monotonic() < deadline, "ctxd not ready after %.0fs: %s" % (timeout, done.stderr)
        time.sleep(0.3)


def main_pid(machine) -> int:
    return int(machine.ok("systemctl", "show", "--property=MainPID", "--value", "ctxd"))


def process_status(machine, pid: int) -> dict:
    text = machine.ok("cat", "/proc/%d/status" % pid)
    return dict(line.split(":\t", 1) for line in text.splitlines() if ":\t" in line)


def ctxctl(machine, *args: str, check: bool = True):
    return machine.run("ctxctl", "--state-dir", STATE, *args, check=check)


def uid_of(machine, user: str) -> str:
    return machine.ok("getent", "passwd", user).split(":")[2]


def test_packages_are_lintian_clean(debs):
    """lintian (Debian's policy checker) finds no error or warning in the built packages."""
    changes = sorted(debs[VERSION][0].parent.glob("ctxd_%s_*.changes" % VERSION))
    assert changes, "no .changes beside %s" % debs[VERSION][0]
    done = subprocess.run(["lintian", "--tag-display-limit", "0", str(changes[0])], capture_output=True,
                          text=True, timeout=600)
    found = [line for line in done.stdout.splitlines() if line[:2] in ("E:", "W:")]
    assert done.returncode == 0 and not found, "\n".join(found) or done.stderr


def test_install_starts_a_confined_broker(machine):
    """Installing on a machine that never saw ctxd makes its user and private state directory,
    enables and starts the unit as that user with no capabilities, serves readiness and
    metrics, regenerates the twistd plugin cache and logs no secret."""
    machine.ok("apt-get", "install", "-y", "-q",
               "/root/debs/ctxd_%s_all.deb" % VERSION, "/root/debs/ctxd-agent_%s_all.deb" % VERSION)
    assert machine.ok("systemctl", "is-enabled", "ctxd").strip() == "enabled"
    assert machine.ok("systemctl", "is-active", "ctxd").strip() == "active"
    # The agent's unit is there for images to enable; a head host does not run it.
    assert machine.run("systemctl", "is-enabled", "ctxagent", check=False).stdout.strip() == "disabled"
    wait_ready(machine)
    assert machine.run("systemctl", "is-enabled", "ctxagent-watch", check=False).stdout.strip() == "disabled"
    verified = machine.run("systemd-analyze", "verify", "ctxd.service", "ctxagent.service", "ctxagent-watch.service")
    assert not verified.stderr.strip(), verified.stderr
    for unit in ("ctxd.service", "ctxagent.service", "ctxagent-watch.service"):   # what Documentation= points at is there
        docs = machine.ok("systemctl", "show", "--property=Documentation", "--value", unit).split()
        assert docs and all((machine.root / d[len("file:///"):]).is_file() for d in docs), (unit, docs)

    status = process_status(machine, main_pid(machine))
    assert status["Uid"].split()[0] == uid_of(machine, "ctxd")
    assert int(status["CapEff"], 16) == 0 and status["NoNewPrivs"].strip() == "1"
    assert machine.ok("stat", "-c", "%U %a", STATE).split() == ["ctxd", "700"]
    assert machine.ok("stat", "-c", "%U %a", STATE + "/admin.token").split() == ["ctxd", "600"]
    assert CONF in machine.ok("dpkg-query", "-W", "-f=${Conffiles}", "ctxd")

    # No plugin cache shipped; python3-twisted's trigger rebuilt it with ctxd's plugin in it.
    assert "dropin.cache" not in machine.ok("dpkg", "-L", "ctxd")
    cache = "/usr/lib/python3/dist-packages/twisted/plugins/dropin.cache"
    assert "ctxd_plugin" in machine.ok("python3", "-c", "import pickle,sys; print(list(pickle.load(open(sys.argv[1], 'rb'))))", cache)
    assert "ctxd" in machine.ok("twistd3", "--help")

    assert "ctxd_nodes" in http_get(machine, "metrics").stdout
    journal = machine.ok("journalctl", "--no-pager", "-u", "ctxd")
    assert "SHA-256 fingerprint" in journal
    assert "GET /readyz" not in journal and "GET /metrics" not in journal   # scrapes are not logged
    token = (machine.root / STATE.lstrip("/") / "admin.token").read_text().strip()
    assert len(token) >= 20 and token not in journal

    # ctxctl as root finds everything in the state directory; anyone else gets one line.
    assert ctxctl(machine, "list").returncode == 0
    refused = machine.run("runuser", "-u", "nobody", "--", "ctxctl", "--state-dir", STATE, "list", check=False)
    assert refused.returncode != 0 and "Traceback" not in refused.stderr
    assert len(refused.stderr.strip().splitlines()) == 1, refused.stderr


def test_a_cluster_assembles_against_the_packaged_broker(machine, tmp_path):
    """The admin sets the public URL in the conffile and restarts; the packaged ctxctl creates
    the torque example's context; four packaged agents (on the machine's loopback addresses,
    sources checked) finish with every peer in their hosts files."""
    with open(machine.root / CONF.lstrip("/"), "a") as conf:
        conf.write("\n# the package test's site\npublic-url = %s\n" % URL)
    before = main_pid(machine)
    machine.ok("systemctl", "reload", "ctxd")        # SIGHUP: same process, still serving
    wait_ready(machine)
    assert main_pid(machine) == before
    machine.ok("systemctl", "restart", "ctxd")
    wait_ready(machine)
    assert main_pid(machine) != before

    for name in ("cluster.toml", "grid-mapfile"):
        machine.copy_in(EXAMPLE_CLUSTER.parent / name, "/root/cluster/" + name)
    cid = ctxctl(machine, "create", "/root/cluster/cluster.toml", "--out", "/root/out").stdout.strip()
    assert len(cid) == 22, cid
    context = Context(cid, machine.root / "root" / "out")
    assert json.loads(context.bootstrap("head").read_text())["url"].startswith(URL)

    nodes = loopback_vms(tmp_path / "vms")
    python = tmp_path / "machine-python"   # the host's python3 in the machine's network
    python.write_text("#!/bin/sh\nexec %s \"$@\"\n" % " ".join(machine.enter(["/usr/bin/python3"], net_only=True)))
    python.chmod(0o755)
    for vm in nodes:
        vm.python, vm.agent = str(python), machine.root / "usr" / "sbin" / "ctxagent"
    try:
        assert wait_all(start_all(nodes, context)) == {vm.label: EXIT_OK for vm in nodes}, \
            "\n".join(vm.log() for vm in nodes)
    finally:
        for vm in nodes:
            vm.kill()
    status = json.loads(ctxctl(machine, "status", cid, "--json").stdout)
    assert status["all_ok"] and status["counts"]["ok"] == 4, status
    head, computes = nodes[0].ident, [vm.ident for vm in nodes[1:]]
    for vm in nodes:
        inside, _ = managed_block(vm.hosts_file.read_text(), cid)
        assert sorted(inside) == sorted(expected_hosts(head, computes)), vm.label
    (machine.workdir / "cluster.json").write_text(json.dumps(
        {"cid": cid, "status": status, "head": str(nodes[0].root)}))


def test_upgrade_keeps_state_and_configuration_and_restarts(machine):
    """Upgrading to a newer version restarts the broker on the same state: same CA and admin
    token, the context unchanged, the admin's conffile change kept without a prompt."""
    cluster = json.loads((machine.workdir / "cluster.json").read_text())
    state = machine.root / STATE.lstrip("/")
    ca, token = (state / "tls" / "ca.pem").read_bytes(), (state / "admin.token").read_bytes()
    before = main_pid(machine)

    machine.ok("apt-get", "install", "-y", "-q",
               "/root/debs/ctxd_%s_all.deb" % UPGRADE, "/root/debs/ctxd-agent_%s_all.deb" % UPGRADE)
    assert machine.ok("dpkg-query", "-W", "-f=${Version}", "ctxd") == UPGRADE
    assert machine.ok("systemctl", "is-active", "ctxd").strip() == "active"
    wait_ready(machine)
    assert main_pid(machine) not in (0, before)
    assert "public-url = %s" % URL in (machine.root / CONF.lstrip("/")).read_text()
    assert (state / "tls" / "ca.pem").read_bytes() == ca and (state / "admin.token").read_bytes() == token
    status = json.loads(ctxctl(machine, "status", cluster["cid"], "--json").stdout)
    for key in ("counts", "nodes", "groups", "all_ok", "revision"):
        assert status[key] == cluster["status"][key], key


def test_init_script_starts_reloads_and_stops(machine):
    """On a host without systemd, /etc/init.d/ctxd runs twistd daemonized as the ctxd user:
    start, status, reload (SIGHUP: same process) and stop."""
    machine.ok("systemctl", "stop", "ctxd")
    init = ["env", "SYSTEMCTL_SKIP_REDIRECT=1", "/etc/init.d/ctxd"]   # bypass systemd's redirect
    machine.ok(*init, "start")
    try:
        wait_ready(machine)
        pid = int(machine.ok("cat", "/run/ctxd/ctxd.pid"))
        assert process_status(machine, pid)["Uid"].split()[0] == uid_of(machine, "ctxd")
        assert machine.run(*init, "status", check=False).returncode == 0
        machine.ok(*init, "reload")
        wait_ready(machine)
        assert int(machine.ok("cat", "/run/ctxd/ctxd.pid")) == pid
    finally:
        stopped = machine.run(*init, "stop", check=False)
    assert stopped.returncode == 0 and not stopped.stderr, stopped
    assert machine.run("test", "-e", "/proc/%d" % pid, check=False).returncode == 1, "still running"
    assert machine.run(*init, "status", check=False).returncode == 3
    assert http_get(machine, "readyz", check=False).returncode != 0
    machine.ok("systemctl", "start", "ctxd")
    wait_ready(machine)


def test_remove_keeps_state_and_purge_removes_everything(machine):
    """Removing stops the broker and keeps its state, configuration and user; purging
    removes the state directory, /etc/ctxd and the ctxd user."""
    state = machine.root / STATE.lstrip("/")
    machine.ok("apt-get", "remove", "-y", "-q", "ctxd")
    assert machine.run("systemctl", "is-active", "ctxd", check=False).stdout.strip() != "active"
    assert http_get(machine, "readyz", check=False).returncode != 0
    assert (state / "journal.log").exists() and (machine.root / CONF.lstrip("/")).exists()
    assert uid_of(machine, "ctxd")

    machine.ok("apt-get", "purge", "-y", "-q", "ctxd", "ctxd-agent")
    assert not state.exists() and not (machine.root / "etc" / "ctxd").exists()
    assert machine.run("getent", "passwd", "ctxd", check=False).returncode == 2
    assert not (machine.root / "usr" / "sbin" / "ctxagent").exists()
    assert not Path(machine.root / "lib" / "systemd" / "system" / "ctxd.service").exists()
