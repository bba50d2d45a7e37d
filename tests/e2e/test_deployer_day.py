"""End to end, real processes: why a node waits reaches `ctxctl status` and `ctxctl wait`, and
a ctx-scripts tree named in the cluster file travels to VMs that have no scripts of their own.

A real ``twistd -n ctxd``, the real ``ctxctl`` and real ``python3 ctxagent.py`` agents on
loopback. The computes start before the head: after WAIT_REPORT_AFTER (10 s) of waiting, each
agent says why in a contextualizing report; the status's MESSAGE column and the progress
(what ``wait`` follows, in O(1)) show it. Compute c1 has no scripts directory: it runs the
tree the broker delivered (checked against the view's SHA-256); c2 has its own (baked)
scripts, which win.
"""

from __future__ import annotations

import re
import shutil
import time

import pytest

from .helpers import EXIT_OK, Ident, finish, make_vm, wait_agent, wait_until

CLUSTER = """\
name = "deployer-day"
scripts = "tree"
[[group]]
name = "head"
quantity = 1
provides = ["torquemaster"]
[[group]]
name = "compute"
quantity = 2
provides = ["torqueslave"]
requires = [{ role = "torquemaster", ready = true }]
"""

# The delivered tree: one script every node runs once per identity in its view. It appends
# its arguments beside the node's view (the agent's state directory).
ETCHOSTS = """#!/bin/sh
echo "$CTX_NODE_ID $*" >> "$(dirname "$CTX_VIEW")/delivered.log"
"""
WAITING = "waiting: role torquemaster: 0 of 1 providers ok"


@pytest.mark.once
def test_why_a_node_waits_is_shown_and_scripts_travel(broker, tmp_path, diag):
    tree = tmp_path / "tree"
    tree.mkdir()
    (tree / "0-etchosts.sh").write_text(ETCHOSTS)
    (tree / "0-etchosts.sh").chmod(0o755)
    (tmp_path / "cluster.toml").write_text(CLUSTER)
    base = tmp_path / "vms"
    vms = {label: make_vm(base, label, Ident("127.0.0.%d" % (i + 2), "dd-" + label, "dd-%s.cluster.test" % label))
           for i, label in enumerate(("head", "c1", "c2"))}
    for label, vm in vms.items():
        diag.add_file("agent log of %s" % label, vm.log_path)
    shutil.rmtree(vms["c1"].scripts_dir)   # a stock image: no scripts of its own
    ctx = broker.create(tmp_path / "cluster.toml", tmp_path / "out")
    cid = ctx.cid
    procs = {}
    try:
        t0 = time.monotonic()
        for label in ("c1", "c2"):
            procs[label] = vms[label].start(ctx.bootstrap("compute"), timeout=90)

        def status_lines():
            return broker.ctxctl_ok("status", cid).splitlines()

        wait_until(lambda: sum(WAITING in line for line in status_lines()) == 2, 40,
                   "both computes' status lines to say why they wait")
        said_after = time.monotonic() - t0
        assert said_after >= 10, "an agent waits 10 s before it says why (%.1f s)" % said_after
        # The wait line (not a terminal: one line per change) shows the longest wait and the time.
        rc, out, err = finish(broker.ctxctl_popen("wait", cid, "--timeout", "2"), 30)
        assert rc != 0 and WAITING in out + err and "elapsed" in out + err, (rc, out, err)

        procs["head"] = vms["head"].start(ctx.bootstrap("head"), timeout=60)
        rc, out, err = finish(broker.ctxctl_popen("wait", cid, "--timeout", 60), 75)
        assert rc == 0, (out, err)
        assert {label: wait_agent(vms[label], proc, 30) for label, proc in procs.items()} == {
            label: EXIT_OK for label in procs}
        status = broker.status(cid)
        assert all(n["waiting"] == "" for n in status["nodes"]), "an ok node no longer waits"

        # c1 ran the delivered tree, once per identity in its view (the head and itself) ...
        delivered = (vms["c1"].state_dir / "delivered.log").read_text().split("\n")[:-1]
        assert sorted(line.split()[2] for line in delivered) == ["dd-c1", "dd-head"], delivered
        # kept under STATE/scripts/<the tree's SHA-256>, as the view named it
        kept = [p.name for p in (vms["c1"].state_dir / "scripts").iterdir()]
        assert len(kept) == 1 and re.fullmatch(r"[0-9a-f]{64}", kept[0]), kept
        # ... c2 its own scripts, which win over the tree.
        assert not (vms["c2"].state_dir / "delivered.log").exists()
        assert sorted(r["argv"][1] for r in vms["c2"].records() if r["script"] == "0-etchosts.sh") == [
            "dd-c2", "dd-head"]
    finally:
        for vm in vms.values():
            vm.kill()
