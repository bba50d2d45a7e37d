"""End to end on loopback (issue 13): an elastic cluster with the real broker, ctxctl and agents.

A real ``twistd -n ctxd``; real ``ctxagent.py --watch`` processes (head and computes of the
torque cluster, compute with a 10 s lease); the real ``ctxctl scale``, ``node remove --shrink``
and ``status``. The cluster grows from 2 to 4 computes (the head re-runs once for both, thanks to
the settle window), survives a broker restart and a restart of the head's agent (no re-enrollment),
loses one compute to ``node remove``, one to its lease (killed, no goodbye) and one to
``ctxagent.py --leave``, and the head follows every change with 1-ipandhost, 6-departed and one
4-restarts per change.
"""

from __future__ import annotations

import json
import signal
import time

import pytest

from .helpers import EXIT_OK, EXIT_REFUSED, Ident, finish, make_vm, managed_block, wait_until

CLUSTER = """\
name = "elastic-demo"
[[group]]
name = "head"
quantity = 1
provides = ["torquemaster"]
requires = [{ role = "torqueslave" }]
data = ["gridmap"]
[[group]]
name = "compute"
quantity = 2
provides = ["torqueslave"]
requires = [{ role = "torquemaster", ready = true }]
all_identities = true
lease = "10s"
[data]
gridmap = { value = "alice alice" }
"""
WATCH = ["--watch", "--settle", "3", "--settle-max", "10"]


def changes(vm, script):
    """The argv of each run of SCRIPT by a re-run (CTX_EVENT=change)."""
    return [tuple(r["argv"]) for r in vm.records() if r["script"] == script and r["env"].get("CTX_EVENT") == "change"]


def hosts_names(vm, cid):
    inside, _ = managed_block(vm.hosts_file.read_text(), cid)
    return sorted(line.split()[2] for line in inside)


def node_ids(broker, cid):
    return {n["identity"]["hostname"]: n for n in broker.status(cid)["nodes"]}


def test_an_elastic_cluster_grows_and_shrinks_and_every_watcher_follows(broker, tmp_path, diag):
    base = tmp_path / "vms"
    vms = {}
    for i, label in enumerate(("head", "c1", "c2", "c3", "c4")):
        vms[label] = make_vm(base, label, Ident("127.0.0.%d" % (i + 2), "el-" + label, "el-%s.cluster.test" % label))
        diag.add_file("agent log of %s" % label, vms[label].log_path)
    (tmp_path / "cluster.toml").write_text(CLUSTER)
    ctx = broker.create(tmp_path / "cluster.toml", tmp_path / "out")
    cid = ctx.cid
    procs = {}

    def start(label, group):
        procs[label] = vms[label].start(ctx.bootstrap(group), timeout=60, extra=WATCH)

    try:
        for label in ("head", "c1", "c2"):
            start(label, "head" if label == "head" else "compute")
        rc, out, err = finish(broker.ctxctl_popen("wait", cid, "--timeout", 60), 75)
        assert rc == 0, (out, err)
        head = vms["head"]
        wait_until(lambda: len([r for r in head.records() if r["script"] == "4-restarts/torqueslave"]) == 1,
                   15, "the head's initial run")
        assert all(p.poll() is None for p in procs.values()), "watchers keep running after their first run"

        # The broker restarts: watchers wait for it (backing off) and go on.
        broker.stop()
        time.sleep(2)
        broker.start()

        # Grow: two more computes, one re-run on the head for both.
        assert broker.ctxctl("scale", cid, "compute", "4").returncode == 0
        start("c3", "compute")
        start("c4", "compute")
        rc, out, err = finish(broker.ctxctl_popen("wait", cid, "--timeout", 60), 75)
        assert rc == 0, (out, err)
        joined = sorted([vms["c3"].ident.argv, vms["c4"].ident.argv])
        wait_until(lambda: sorted(changes(head, "1-ipandhost/torqueslave")) == joined, 30,
                   "the head's 1-ipandhost for c3 and c4")
        wait_until(lambda: changes(head, "4-restarts/torqueslave"), 15, "the head's 4-restarts")
        assert changes(head, "4-restarts/torqueslave") == [()], "one re-run for both joins (settle window)"
        env = [r["env"] for r in head.records() if r["script"] == "4-restarts/torqueslave"][-1]
        assert sorted(env["CTX_JOINED"].split()) == sorted(",".join(a) for a in joined)
        assert env["CTX_DEPARTED"] == ""
        assert hosts_names(head, cid) == ["el-c1", "el-c2", "el-c3", "el-c4", "el-head"]
        # An old compute (all_identities) learns the new ones: hosts block and 0-etchosts.sh.
        wait_until(lambda: hosts_names(vms["c1"], cid) == ["el-c1", "el-c2", "el-c3", "el-c4", "el-head"], 30,
                   "c1's hosts block")
        wait_until(lambda: sorted(changes(vms["c1"], "0-etchosts.sh")) == joined, 15, "c1's 0-etchosts.sh")

        # The head's agent restarts (a reboot): it applies the view as it is, without enrolling again.
        procs["head"].send_signal(signal.SIGKILL)
        procs["head"].wait(10)
        before = len(head.records())
        start("head", "head")
        wait_until(lambda: len([r for r in head.records()[before:] if r["script"] == "4-restarts/torqueslave"]) == 1,
                   30, "the restarted head's initial run")
        assert "identity updated" in head.log() and head.log().count("enrolled as node") == 1
        assert [r["env"]["CTX_EVENT"] for r in head.records()[before:]][0] == "initial"

        # Shrink: c1 removed by the deployer (its slot with it), c2 killed (its lease runs out).
        nodes = node_ids(broker, cid)
        proc = broker.ctxctl("node", "remove", cid, nodes["el-c1"]["id"], "--shrink")
        assert proc.returncode == 0, proc.stderr
        assert procs["c1"].wait(30) == EXIT_REFUSED, "a removed node's watcher stops: refused"
        procs["c2"].send_signal(signal.SIGKILL)
        procs["c2"].wait(10)
        wait_until(lambda: node_ids(broker, cid)["el-c2"]["departed"] == "lost", 40, "c2 lost after its lease")
        gone = sorted([vms["c1"].ident.argv, vms["c2"].ident.argv])
        wait_until(lambda: sorted(changes(head, "6-departed/torqueslave")) == gone, 30, "the head's 6-departed")
        wait_until(lambda: hosts_names(head, cid) == ["el-c3", "el-c4", "el-head"], 15, "the head's hosts block")

        # c3 leaves by itself (as from a shutdown unit), while its watcher runs.
        c3 = vms["c3"]
        leave = c3.start(ctx.bootstrap("compute"), timeout=30, extra=["--leave"])
        assert leave.wait(45) == EXIT_OK, c3.log()
        assert procs["c3"].wait(30) == EXIT_REFUSED
        wait_until(lambda: vms["c3"].ident.argv in changes(head, "6-departed/torqueslave"), 30,
                   "the head's 6-departed for c3")
        status = broker.status(cid)
        assert {n["identity"]["hostname"]: n["departed"] for n in status["nodes"]} == {
            "el-head": None, "el-c1": "removed", "el-c2": "lost", "el-c3": "left", "el-c4": None}
        assert {g["name"]: (g["quantity"], g["enrolled"]) for g in status["groups"]} == {
            "head": (1, 1), "compute": (3, 1)}
        text = broker.ctxctl("status", cid).stdout
        assert "lost" in text and "removed" in text and "left" in text
        # The head and c4 still watch, and every re-run reported ok.
        assert procs["head"].poll() is None and procs["c4"].poll() is None
        assert {n["identity"]["hostname"]: n["state"] for n in status["nodes"] if not n["departed"]} == {
            "el-head": "ok", "el-c4": "ok"}
        assert json.loads((head.state_dir / "applied.json").read_text())["revision"] > 0
    finally:
        for vm in vms.values():
            vm.kill()


FLAKY = """#!/bin/sh
# 4-restarts/torqueslave that fails while FAIL exists (a service that cannot restart yet).
if [ -e "$(dirname "$0")/../FAIL" ]; then echo "e2e-marker: cannot restart yet" >&2; exit 3; fi
exec "$(dirname "$0")/recorded-torqueslave" "$@"
"""


SLOW = """#!/bin/sh
# 0-etchosts.sh that takes longer than the compute lease (10 s) on the first change run.
if [ "$CTX_EVENT" = change ] && mkdir "$(dirname "$0")/../slow-once" 2>/dev/null; then sleep 12; fi
exec "$(dirname "$0")/recorded-0-etchosts.sh" "$@"
"""


def replace_script(vm, name, text):
    """VM's recording script NAME, wrapped by TEXT (which runs it as recorded-NAME)."""
    path = vm.scripts_dir / name
    path.rename(path.parent / ("recorded-" + path.name))
    path.write_text(text)
    path.chmod(0o755)


# The agent's re-runs and heartbeat; the broker's side of it is the first test's.
@pytest.mark.once
def test_a_failing_rerun_reports_error_keeps_watching_and_the_next_change_retries(broker, tmp_path, diag):
    """A re-run that fails reports error, and the next change retries it. A re-run longer than the
    lease (c1's) keeps its node: the agent tells the broker it is alive while the scripts run."""
    base = tmp_path / "vms"
    vms = {}
    for i, label in enumerate(("head", "c1", "c2", "c3")):
        vms[label] = make_vm(base, label, Ident("127.0.1.%d" % (i + 2), "fl-" + label, "fl-%s.cluster.test" % label))
        diag.add_file("agent log of %s" % label, vms[label].log_path)
    head = vms["head"]
    replace_script(head, "4-restarts/torqueslave", FLAKY)
    replace_script(vms["c1"], "0-etchosts.sh", SLOW)
    (tmp_path / "cluster.toml").write_text(CLUSTER.replace("quantity = 2", "quantity = 1"))
    ctx = broker.create(tmp_path / "cluster.toml", tmp_path / "out")
    cid = ctx.cid
    procs = {}
    try:
        for label, group in (("head", "head"), ("c1", "compute")):
            procs[label] = vms[label].start(ctx.bootstrap(group), timeout=60, extra=WATCH)
        rc, out, err = finish(broker.ctxctl_popen("wait", cid, "--timeout", 60), 75)
        assert rc == 0, (out, err)

        # The head's re-run for c2 fails: it reports the error with its log tail, and keeps watching.
        (head.scripts_dir / "FAIL").write_text("")
        assert broker.ctxctl("scale", cid, "compute", "2").returncode == 0
        procs["c2"] = vms["c2"].start(ctx.bootstrap("compute"), timeout=60, extra=WATCH)

        def head_node():
            return node_ids(broker, cid)["fl-head"]

        wait_until(lambda: head_node()["state"] == "error", 40, "the head's error report")
        node = head_node()
        assert node["error"]["exit_code"] == 4 and "4-restarts/torqueslave exited 3" in node["error"]["message"]
        assert "e2e-marker: cannot restart yet" in node["log_tail"]
        assert procs["head"].poll() is None, "a failed re-run does not end the watch"
        rc, _, _ = finish(broker.ctxctl_popen("wait", cid, "--timeout", 5), 20)
        assert rc == 1, "ctxctl wait: a node reported an error"

        # The next change retries what failed too: c2 and c3 in one re-run, then ok.
        (head.scripts_dir / "FAIL").unlink()
        assert broker.ctxctl("scale", cid, "compute", "3").returncode == 0
        procs["c3"] = vms["c3"].start(ctx.bootstrap("compute"), timeout=60, extra=WATCH)
        wait_until(lambda: head_node()["state"] == "ok", 40, "the head ok again")
        retried = [r for r in head.records() if r["script"] == "4-restarts/torqueslave"]
        assert len(retried) == 2   # the initial run and the retry (the failed one never got there)
        assert sorted(retried[-1]["env"]["CTX_JOINED"].split()) == sorted(
            ",".join(vms[label].ident.argv) for label in ("c2", "c3"))
        assert sorted(changes(head, "1-ipandhost/torqueslave")) == sorted(
            [vms["c2"].ident.argv] * 2 + [vms["c3"].ident.argv])
        rc, out, err = finish(broker.ctxctl_popen("wait", cid, "--timeout", 30), 45)
        assert rc == 0, (out, err)
        # c1's slow re-run (12 s, lease 10 s) did not make it lost: it went on to the next one.
        wait_until(lambda: len(changes(vms["c1"], "0-etchosts.sh")) == 2, 60, "c1's two re-runs")
        assert node_ids(broker, cid)["fl-c1"]["departed"] is None and procs["c1"].poll() is None
        assert "lost" not in broker.log()
    finally:
        for vm in vms.values():
            vm.kill()
