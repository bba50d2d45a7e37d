"""A malicious VM of the same context, with real processes in network namespaces: it cannot
claim a peer's names, address or host key; the victims assemble and trust only the real keys
(every VM also has a container bridge with the same address, which breaks nothing); a revoked
node leaves the views and a replacement takes its slot."""

from __future__ import annotations

import json
import shutil
import time

from .helpers import (
    EXIT_REFUSED,
    Ident,
    expected_hosts,
    expected_known_hosts,
    hub_broker,
    make_vm,
    managed_block,
    wait_agent,
    wait_until,
)


def test_impostor_is_refused_and_victims_trust_only_real_keys(netlab, tmp_path, diag, timing, cluster):
    """A compute VM with a valid join token tries to be the head (its names, its address, its key):
    each attempt exits 6 and is audited; the honest cluster assembles with only the head's real
    key for the head's names; revoking a compute removes it from the views and frees its slot."""
    t_test = time.monotonic()
    hosts = {label: netlab.add_host(label) for label in ("head", "compute1", "compute2", "compute3",
                                                         "compute4", "mallory")}
    broker, hub = hub_broker(netlab, tmp_path, diag)
    vms = {}
    try:
        broker.start()
        ctx = broker.create(cluster.path, tmp_path / "out")
        cid = ctx.cid
        diag.add("status", lambda: json.dumps(broker.status(cid), indent=1))
        for label, h in hosts.items():
            # Every VM has a container bridge with the same address: it must not be anyone's.
            for argv in (["ip", "link", "add", "docker0", "type", "bridge"],
                         ["ip", "addr", "add", "172.17.0.1/16", "dev", "docker0"],
                         ["ip", "link", "set", "docker0", "up"]):
                assert h.run(argv, timeout=10).returncode == 0, argv
            if label != "mallory":
                vms[label] = make_vm(tmp_path / "vms", label, Ident(h.ip, h.hostname, h.fqdn),
                                     ifaces=(h.iface,), nshost=h)
                diag.add_file("agent log of %s" % label, vms[label].log_path)
        head = vms["head"]
        head_proc = head.start(ctx.bootstrap("head"))
        wait_until(lambda: len(broker.status(cid)["nodes"]) == 1, 20, "the head to enroll")

        m = hosts["mallory"]
        attacks = {
            "names": ["--hostname", head.ident.short, "--fqdn", head.ident.fqdn],
            "address": ["--address", head.ident.ip],
            "key": [],
        }
        for attack, extra in attacks.items():
            vm = make_vm(tmp_path / "mallory", attack, Ident(m.ip, m.hostname, m.fqdn), ifaces=(m.iface,), nshost=m)
            if attack == "key":  # the head's public host keys in place of its own
                shutil.rmtree(vm.ssh_dir)
                shutil.copytree(head.ssh_dir, vm.ssh_dir, ignore=shutil.ignore_patterns("*_key"))
            diag.add_file("mallory's log (%s)" % attack, vm.log_path)
            rc = wait_agent(vm, vm.start(ctx.bootstrap("compute"), timeout=20, extra=extra), 40)
            refusal = {"names": "identity_conflict", "address": "identity_refused", "key": "identity_conflict"}
            assert rc == EXIT_REFUSED and refusal[attack] in vm.log(), (attack, vm.log())
            assert vm.records() == [], "the impostor's scripts must not run"
        assert [n["identity"]["hostname"] for n in broker.status(cid)["nodes"]] == [head.ident.short]

        computes = [vms["compute%d" % i] for i in (1, 2, 3)]
        procs = {vm.label: vm.start(ctx.bootstrap("compute")) for vm in computes}
        rcs = {label: wait_agent(vms[label], proc, 75) for label, proc in procs.items()}
        assert rcs == {vm.label: 0 for vm in computes}
        assert wait_agent(head, head_proc, 75) == 0
        for vm in [head] + computes:
            group = "head" if vm is head else "compute"
            inside, _ = managed_block(vm.known_hosts_file.read_text(), cid)
            assert sorted(inside) == expected_known_hosts(group, head.ident, [c.ident for c in computes]), vm.label
            inside, _ = managed_block(vm.hosts_file.read_text(), cid)
            assert sorted(inside) == expected_hosts(head.ident, [c.ident for c in computes]), vm.label
            assert m.ip not in vm.hosts_file.read_text()

        # The deployer revokes compute3: it leaves every view; compute4 takes its slot.
        victim = next(n for n in broker.status(cid)["nodes"] if n["identity"]["hostname"] == vms["compute3"].ident.short)
        broker.ctxctl_ok("node", "revoke", cid, victim["id"])
        assert wait_agent(vms["compute3"], vms["compute3"].start(ctx.bootstrap("compute"), timeout=20), 40) \
            == EXIT_REFUSED
        replacement = vms["compute4"]
        assert replacement.run(ctx.bootstrap("compute")) == 0
        assert head.run(ctx.bootstrap("head")) == 0  # a re-run sees the new membership
        live = [vms[label].ident for label in ("compute1", "compute2", "compute4")]
        inside, _ = managed_block(head.hosts_file.read_text(), cid)
        assert sorted(inside) == expected_hosts(head.ident, live)
        inside, _ = managed_block(head.known_hosts_file.read_text(), cid)
        assert sorted(inside) == expected_known_hosts("head", head.ident, live)
        known = broker.ctxctl_ok("known-hosts", cid)
        assert vms["compute3"].ident.fqdn not in known and replacement.ident.fqdn in known
        status = broker.status(cid)
        assert status["counts"]["ok"] == 4 and status["all_ok"] is True
        for node in status["nodes"]:
            assert {"name": "docker0", "ipv4": ["172.17.0.1"], "ipv6": []} in node["identity"]["interfaces"]

        # Every refusal is in the audit log, counted, with mallory's address and no secret.
        assert broker.stop() in (0, -15), broker.log()
        audit = [json.loads(line) for line in (broker.state_dir / "audit.log").read_text().splitlines()]
        refused = {(e["outcome"], e.get("count")) for e in audit if e["source"] == m.ip and e["action"] == "enroll"}
        assert refused == {(409, 2), (403, 1)}, audit
        assert any(e["action"] == "revoke_node" and e["outcome"] == 200 for e in audit)
        timing("impostor in namespaces: 3 attacks refused, cluster assembled, revocation and replacement; "
               "whole test %.2fs" % (time.monotonic() - t_test))
    finally:
        for vm in vms.values():
            vm.kill()
        broker.kill()
