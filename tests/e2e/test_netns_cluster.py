"""End to end in network namespaces: four agents that discover who they are."""

from __future__ import annotations

import base64
import json
import time

from .helpers import (
    INITIAL_HOSTS,
    INITIAL_KNOWN_HOSTS,
    Ident,
    calls,
    expected_calls,
    expected_hosts,
    expected_known_hosts,
    finish,
    group_of,
    hub_broker,
    make_vm,
    managed_block,
    phase,
    wait_agent,
)

LABELS = ("head", "compute1", "compute2", "compute3")


def test_four_nodes_in_namespaces(netlab, tmp_path, diag, timing, cluster):
    """Four real agents, each on its own namespace host, contextualize the torque cluster exactly."""
    t_test = time.monotonic()
    hosts = {label: netlab.add_host(label) for label in LABELS}
    broker, hub = hub_broker(netlab, tmp_path, diag)
    vms = {}
    try:
        broker.start()
        ctx = broker.create(cluster.path, tmp_path / "out")
        cid = ctx.cid
        for label, h in hosts.items():
            vms[label] = make_vm(tmp_path / "vms", label, Ident(h.ip, h.hostname, h.fqdn),
                                 ifaces=(h.iface,), nshost=h)
            diag.add_file("agent log of %s" % label, vms[label].log_path)
            diag.add_file("records of %s" % label, vms[label].record, lines=40)
        diag.add(
            "status", lambda: json.dumps(broker.status(cid), indent=1))

        t_agents = time.monotonic()
        procs = {label: vm.start(ctx.bootstrap(group_of(vm)))
                 for label, vm in vms.items()}
        waiter = broker.ctxctl_popen("wait", cid, "--timeout", 60, "--interval", 0.25,
                                     "--reports", tmp_path / "reports")
        rcs = {label: wait_agent(vms[label], proc, 75) for label, proc in procs.items()}
        agents_s = time.monotonic() - t_agents
        wait_rc, wait_out, wait_err = finish(waiter, 30)
        wait_s = time.monotonic() - t_agents
        diag.add("ctxctl wait", lambda: "rc=%s\nstdout:\n%s\nstderr:\n%s"
                 % (wait_rc, wait_out, wait_err))
        assert rcs == {label: 0 for label in LABELS}
        assert wait_rc == 0, wait_err

        head = vms["head"].ident
        computes = [vms[label].ident for label in LABELS[1:]]

        # The broker saw four distinct nodes with the identities the agents discovered.
        status = broker.status(cid)
        assert status["counts"]["expected"] == 4
        assert status["counts"]["enrolled"] == 4
        assert status["counts"]["ok"] == 4
        assert status["counts"]["error"] == 0
        assert status["all_ok"] is True
        assert len(status["nodes"]) == 4
        by_host = {n["identity"]["hostname"]: n for n in status["nodes"]}
        assert sorted(by_host) == sorted(vm.ident.short for vm in vms.values())
        assert len({n["identity"]["primary_ip"] for n in status["nodes"]}) == 4
        assert len({n["id"] for n in status["nodes"]}) == 4
        for label, vm in vms.items():
            node = by_host[vm.ident.short]
            assert node["state"] == "ok"
            assert node["group"] == group_of(vm)
            identity = node["identity"]
            assert identity["fqdn"] == vm.ident.fqdn
            assert identity["primary_ip"] == vm.ident.ip
            assert identity["source_address"] == vm.ident.ip
            assert sorted(identity["ssh_host_keys"]) == sorted(vm.ident.keys)
            assert [(i["name"], i["ipv4"]) for i in identity["interfaces"]] == [("eth0", [vm.ident.ip])]

        for label, vm in vms.items():
            group = group_of(vm)
            node_id = by_host[vm.ident.short]["id"]
            records = vm.records()
            # Exactly the expected scripts with exactly the expected argv.
            data = [r for r in records if r["script"].startswith("3-data/")]
            assert calls(r for r in records if not r["script"].startswith("3-data/")) \
                == expected_calls(vm.ident, group, head, computes, iface="eth0"), label
            if group == "head":
                assert [(r["script"], len(r["argv"])) for r in data] == [("3-data/gridmap", 1)]
                assert base64.b64decode(data[0]["data_b64"]) == cluster.gridmap
                assert data[0]["data_mode"] == 0o600
            else:
                assert data == [], "%s does not require gridmap" % label
            # In phase order, with the context's environment.
            phases = [phase(r["script"]) for r in sorted(records, key=lambda r: r["start"])]
            assert phases == sorted(phases), (label, phases)
            for r in records:
                assert r["env"].get("CTX_CONTEXT_ID") == cid, r
                assert r["env"].get("CTX_NODE_ID") == node_id, r
                assert r.get("view_node_id") == node_id, r

            # Managed blocks: exactly the right lines, the rest untouched.
            inside, outside = managed_block(vm.hosts_file.read_text(), cid)
            assert sorted(inside) == expected_hosts(head, computes), label
            assert outside == INITIAL_HOSTS.splitlines()
            inside, outside = managed_block(vm.known_hosts_file.read_text(), cid)
            assert sorted(inside) == expected_known_hosts(group, head, computes), label
            assert outside == INITIAL_KNOWN_HOSTS.splitlines()

        # The deployer can trust every node's host keys.
        known = broker.ctxctl_ok("known-hosts", cid).splitlines()
        entries = {(line.split()[0], " ".join(line.split()[1:3])) for line in known
                   if line.strip() and not line.startswith("#")}
        for vm in vms.values():
            for key in vm.ident.keys:
                assert any(vm.ident.ip in names.split(",") and vm.ident.fqdn in names.split(",")
                           and k == key for names, k in entries), (vm.label, key, known)

        timing("4 namespace agents: all exited ok %.2fs after start, ctxctl wait done at %.2fs; "
               "whole test %.2fs" % (agents_s, wait_s, time.monotonic() - t_test))
    finally:
        for vm in vms.values():
            vm.kill()
        broker.kill()
