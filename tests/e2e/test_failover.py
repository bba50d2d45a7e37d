"""Active/passive on shared state: two broker hosts in network namespaces, one state directory,
a floating address; the active host dies mid-contextualization and the standby carries on."""

from __future__ import annotations

import json
import time

import pytest

from .helpers import (
    EXIT_OK,
    BrokerProcess,
    Ident,
    finish,
    free_port,
    make_vm,
    wait_agent,
    wait_until,
)


# The standby's lock, a vanished host and the agents' keepalive: no library of the broker's is
# used here that the Debian run's other end-to-end tests do not use (and it takes a minute).
@pytest.mark.once
def test_standby_takes_over_when_the_active_host_dies(netlab, tmp_path, diag, timing, cluster):
    """The active broker's host is lost (ctxd killed with SIGKILL, its link down) after three of
    four agents enrolled; the standby, waiting on the state directory's lock, takes it and the
    floating address by itself; every agent finishes, nothing acknowledged is lost, nobody acts."""
    t_test = time.monotonic()
    a, b = netlab.add_host("ctxa"), netlab.add_host("ctxb")
    hosts = {label: netlab.add_host(label) for label in ("head", "compute1", "compute2", "compute3")}
    floating = a.ip.rsplit(".", 1)[0] + ".200"
    port = free_port()
    take_address = "ip addr add %s/24 dev eth0" % floating
    active = BrokerProcess(tmp_path / "a", host=floating, port=port, nshost=a,
                           extra_args=["--on-active", take_address])
    standby = BrokerProcess(tmp_path / "b", host=floating, port=port, nshost=b,
                            extra_args=["--standby", "--on-active", take_address])
    standby.state_dir = active.state_dir   # shared storage (here: one filesystem)
    for broker, label in ((active, "active"), (standby, "standby")):
        diag.add_file("%s broker log" % label, broker.log_path, lines=120)
    vms = {}
    try:
        active.start()
        standby.start(ready=False)
        wait_until(lambda: "standby: another ctxd holds" in standby.log(), 20, "the standby to wait for the lock")
        ctx = active.create(cluster.path, tmp_path / "out")
        diag.add("status (standby)", lambda: json.dumps(standby.status(ctx.cid), indent=1))
        for label, h in hosts.items():
            vms[label] = make_vm(tmp_path / "vms", label, Ident(h.ip, h.hostname, h.fqdn), ifaces=(h.iface,), nshost=h)
            diag.add_file("agent log of %s" % label, vms[label].log_path)
        first = {label: vms[label].start(ctx.bootstrap("head" if label == "head" else "compute"), timeout=150)
                 for label in ("head", "compute1", "compute2")}
        wait_until(lambda: len(active.status(ctx.cid)["nodes"]) == 3, 30, "three nodes to enroll")
        enrolled = {n["id"]: n["identity"]["hostname"] for n in active.status(ctx.cid)["nodes"]}

        t_fail = time.monotonic()
        active.kill()   # the active host is lost: its broker and its link
        assert a.run(["ip", "link", "set", "eth0", "down"], timeout=10).returncode == 0
        standby.wait_ready(timeout=30)
        takeover_s = time.monotonic() - t_fail
        last = vms["compute3"].start(ctx.bootstrap("compute"), timeout=150)
        rcs = {label: wait_agent(vms[label], proc, 170) for label, proc in first.items()}
        rcs["compute3"] = wait_agent(vms["compute3"], last, 170)
        done_s = time.monotonic() - t_fail
        assert rcs == {label: EXIT_OK for label in hosts}, rcs
        rc, out, err = finish(standby.ctxctl_popen("wait", ctx.cid, "--timeout", 30, "--reports",
                                                   tmp_path / "reports"), 60)
        assert rc == 0, err

        status = standby.status(ctx.cid)
        assert status["all_ok"] is True and status["counts"]["enrolled"] == 4
        # The nodes acknowledged by the lost broker are the same nodes: none enrolled twice.
        after = {n["id"]: n["identity"]["hostname"] for n in status["nodes"]}
        assert all(after.get(nid) == host for nid, host in enrolled.items()), (enrolled, after)
        assert "standby: " in standby.log() and "--on-active %s: done" % take_address in standby.log()
        timing("failover: standby serving %.1fs after the active host was lost; all agents done %.1fs "
               "after it; whole test %.1fs" % (takeover_s, done_s, time.monotonic() - t_test))
    finally:
        for vm in vms.values():
            vm.kill()
        active.kill()
        standby.kill()
