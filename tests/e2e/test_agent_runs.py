"""End to end on loopback: restarts, ready-gating, failures, wrong CA, re-runs.

The four agents report different identities through --address/--hostname/
--fqdn (127.0.0.2..5); the namespace test covers the agent's own discovery.
"""

from __future__ import annotations

import base64
import gzip
import json
import re
import signal
import time

import pytest

from .helpers import (
    BrokerProcess,
    EXIT_ENV,
    EXIT_OK,
    EXIT_SCRIPT,
    EXIT_USAGE,
    INITIAL_HOSTS,
    Ident,
    calls,
    expected_calls,
    expected_hosts,
    find_python,
    finish,
    foreign_ca_pem,
    group_of,
    make_vm,
    managed_block,
    start_all,
    wait_all,
    wait_until,
)


def role_calls(vm):
    """The (script, argv) calls of phases 0, 1 and 4 (host-independent ones)."""
    return calls(r for r in vm.records() if r["script"][0] in "014")


def expected_role_calls(vm, vms):
    head, computes = vms[0].ident, [v.ident for v in vms[1:]]
    return expected_calls(vm.ident, group_of(vm), head, computes, iface=None)


def test_broker_restart_midway(broker, vms, tmp_path, cluster, diag):
    """A broker stopped with SIGTERM and restarted mid-contextualization loses nothing: all 4 end ok, no duplicates."""
    nodes = vms({"head": {"1-ipandhost/torqueslave": {"sleep": 0.4}}})
    head, computes = nodes[0], nodes[1:]
    ctx = broker.create(cluster.path, tmp_path / "out")
    started = start_all(computes, ctx)
    broker.wait_for(ctx.cid, lambda s: s["counts"]["enrolled"] == 3, 30, "3 computes enrolled")
    started += start_all([head], ctx)
    head_proc = started[-1][1]
    # Mid-way: the head has begun its scripts (1-ipandhost sleeps 3 x 0.4 s), not reported ok,
    # and the computes are long-polling for the head to be ok.
    wait_until(lambda: head.records(), 30, "the head's first script")
    before = broker.status(ctx.cid)
    states = {n["identity"]["hostname"]: n["state"] for n in before["nodes"]}
    assert states[head.ident.short] in ("enrolled", "contextualizing"), states
    assert before["counts"]["ok"] == 0 and len(before["nodes"]) == 4

    # twistd (Twisted >= 22.8) re-raises the terminating signal after a clean shutdown.
    assert broker.stop(signal.SIGTERM) in (0, -signal.SIGTERM), broker.log()
    # The broker stays down until the head has run all its scripts: its ok report
    # meets a dead broker and must be retried, not given up.
    wait_until(lambda: any(r["script"].startswith("5-") for r in head.records()), 30,
               "the head's last scripts")
    time.sleep(0.5)
    assert head_proc.poll() is None, "the head agent gave up while the broker was down"
    assert all(proc.poll() is None for _, proc in started), "an agent gave up during the outage"
    broker.start()

    assert wait_all(started) == {vm.label: EXIT_OK for vm in nodes}
    proc = broker.ctxctl("wait", ctx.cid, "--timeout", 30, "--interval", 0.25,
                         "--reports", tmp_path / "reports", timeout=45)
    assert proc.returncode == 0, proc.stderr
    status = broker.status(ctx.cid)
    assert len(status["nodes"]) == 4
    assert status["counts"]["enrolled"] == 4 and status["counts"]["ok"] == 4
    assert len({n["identity"]["hostname"] for n in status["nodes"]}) == 4
    assert {n["id"] for n in status["nodes"]} == {n["id"] for n in before["nodes"]}
    for vm in nodes:
        assert role_calls(vm) == expected_role_calls(vm, nodes), vm.label


def test_ready_gating(broker, vms, tmp_path, cluster, diag):
    """Computes requiring torquemaster with ready=true run no script before the head reported ok."""
    nodes = vms({"head": {"4-restarts/torqueslave": {"sleep": 2.0}}})
    head, computes = nodes[0], nodes[1:]
    ctx = broker.create(cluster.path, tmp_path / "out")
    assert wait_all(start_all(nodes, ctx)) == {vm.label: EXIT_OK for vm in nodes}

    status = broker.status(ctx.cid)
    by_host = {n["identity"]["hostname"]: n for n in status["nodes"]}
    head_ok_at = by_host[head.ident.short]["ok_at"]
    head_last_end = max(r["end"] for r in head.records())
    assert head_ok_at >= head_last_end - 0.05  # the head reported ok after its scripts
    for vm in computes:
        records = vm.records()
        assert records, "%s ran no script" % vm.label
        first = min(r["start"] for r in records)
        # The compute was enrolled (waiting) long before the head was ok...
        assert by_host[vm.ident.short]["enrolled_at"] < head_ok_at - 1.0
        # ...and started its first script only after it.
        assert first > head_last_end, (vm.label, first, head_last_end)
        assert first >= head_ok_at, (vm.label, first, head_ok_at)
        assert role_calls(vm) == expected_role_calls(vm, nodes), vm.label


def test_failing_script(broker, vms, tmp_path, cluster, diag):
    """A compute script exiting 3 makes its agent exit 4 and ctxctl wait fail showing the error and log tail."""
    nodes = vms({"compute2": {"1-ipandhost/torquemaster": {"exit": 3}}})
    bad = nodes[2]
    ctx = broker.create(cluster.path, tmp_path / "out")
    reports = tmp_path / "reports"
    started = start_all(nodes, ctx)
    waiter = broker.ctxctl_popen("wait", ctx.cid, "--timeout", 60, "--interval", 0.25,
                                 "--reports", reports)
    rcs = wait_all(started)
    rc, out, err = finish(waiter, 30)
    diag.add("ctxctl wait", lambda: "rc=%s\nstdout:\n%s\nstderr:\n%s" % (rc, out, err))

    assert rcs == {vm.label: (EXIT_SCRIPT if vm is bad else EXIT_OK) for vm in nodes}
    assert rc == 1, "ctxctl wait should exit 1 on a node error"
    assert "1-ipandhost/torquemaster" in err          # the node's message names the script
    assert "e2e-marker: 1-ipandhost/torquemaster failing on purpose" in err  # its log tail

    status = broker.status(ctx.cid)
    assert status["error_present"] is True and status["all_ok"] is False
    node = {n["identity"]["hostname"]: n for n in status["nodes"]}[bad.ident.short]
    assert node["state"] == "error"
    assert node["error"]["exit_code"] == EXIT_SCRIPT
    assert "1-ipandhost/torquemaster" in node["error"]["message"]
    assert "failing on purpose" in node["log_tail"]  # docs/api.md: the log tail is per node
    # The run stopped at the failing script.
    assert [r["script"] for r in bad.records() if r["script"][0] in "2345"] == []

    files = [p for p in reports.rglob("*") if p.is_file()]
    assert files, "ctxctl wait wrote no report files"
    assert any("failing on purpose" in p.read_text(errors="replace") for p in files), files


def test_wrong_ca(broker, vms, tmp_path, cluster, diag):
    """An agent whose bootstrap carries another CA exits 3 at once, runs nothing and enrolls nothing."""
    vm = vms()[1]
    ctx = broker.create(cluster.path, tmp_path / "out")
    bootstrap = json.loads(ctx.bootstrap("compute").read_text())
    bootstrap["ca_pem"] = foreign_ca_pem()
    wrong = tmp_path / "wrong-ca.bootstrap.json"
    wrong.write_text(json.dumps(bootstrap))

    t0 = time.monotonic()
    rc = vm.run(wrong, timeout=60)
    elapsed = time.monotonic() - t0
    assert rc == EXIT_ENV
    assert elapsed < 10, "took %.1fs: a verification failure must not be retried" % elapsed
    assert vm.records() == []
    assert re.search(r"certif|verif|ssl|tls|\bCA\b", vm.log(), re.I), vm.log()
    status = broker.status(ctx.cid)
    assert status["counts"]["enrolled"] == 0 and status["nodes"] == []
    assert vm.hosts_file.read_text() == INITIAL_HOSTS


def test_rerun_idempotent(broker, vms, tmp_path, cluster, diag):
    """Re-running an ok agent with its state dir exits 0, re-applies its actions, adds no node and no second block."""
    nodes = vms()
    ctx = broker.create(cluster.path, tmp_path / "out")
    assert wait_all(start_all(nodes, ctx)) == {vm.label: EXIT_OK for vm in nodes}
    first = broker.status(ctx.cid)
    vm = nodes[1]
    hosts_before = vm.hosts_file.read_text()
    known_before = vm.known_hosts_file.read_text()
    calls_before = calls(vm.records())

    assert vm.run(ctx.bootstrap("compute"), timeout=60) == EXIT_OK

    again = broker.status(ctx.cid)
    assert len(again["nodes"]) == 4 and again["counts"]["enrolled"] == 4
    assert again["counts"]["ok"] == 4 and again["all_ok"] is True
    assert {n["id"] for n in again["nodes"]} == {n["id"] for n in first["nodes"]}
    assert vm.hosts_file.read_text() == hosts_before
    assert vm.known_hosts_file.read_text() == known_before
    inside, _ = managed_block(vm.hosts_file.read_text(), ctx.cid)
    assert sorted(inside) == expected_hosts(nodes[0].ident, [v.ident for v in nodes[1:]])
    # The same actions ran again, once more each.
    assert calls(vm.records()) == sorted(calls_before * 2)


def test_no_bootstrap(tmp_path, diag):
    """An instance whose user-data holds no bootstrap: the agent exits 0 quietly and runs nothing
    (an image may run it on every boot). A bootstrap FILE named on the command line that does not
    exist is a configuration error (exit 2), and runs nothing either."""
    vm = make_vm(tmp_path / "vms", "plain", Ident("127.0.0.9", "e2e-plain", "e2e-plain.test"))
    diag.add_file("agent log", vm.log_path)
    user_data = tmp_path / "user-data.txt"
    user_data.write_text("#cloud-config\nruncmd: []\n")
    rc = vm.run("cloud-init", timeout=30, extra=["--cloud-init-user-data", str(user_data)])
    assert rc == EXIT_OK
    rc = vm.run(tmp_path / "no-such-bootstrap.json", timeout=30)
    assert rc == EXIT_USAGE and "no-such-bootstrap.json" in vm.log()
    assert vm.records() == []
    assert vm.hosts_file.read_text() == INITIAL_HOSTS


def test_oldest_and_newest_pythons(broker, vms, tmp_path, cluster, diag):
    """The unmodified agent works under Python 3.6 and 3.13 (TLS verification included) in one cluster."""
    old, new = find_python("3.6"), find_python("3.13")
    if old is None or new is None:
        pytest.skip("needs python3.6 and python3.13 on this machine (pyenv)")
    nodes = vms()
    for vm, python in zip(nodes, (old, new, old, new)):
        vm.python = python
    ctx = broker.create(cluster.path, tmp_path / "out")
    assert wait_all(start_all(nodes, ctx)) == {vm.label: EXIT_OK for vm in nodes}
    for vm in nodes:
        assert role_calls(vm) == sorted(expected_role_calls(vm, nodes)), vm.label
    status = broker.status(ctx.cid)
    assert status["all_ok"] is True and status["counts"]["ok"] == 4


def test_agent_and_bootstrap_from_user_data(broker, vms, tmp_path, cluster, diag):
    """The agent ctxctl embeds in user-data, run on that user-data as cloud-init saved it, contextualizes."""
    yaml = pytest.importorskip("yaml")
    nodes = vms()
    ctx = broker.create(cluster.path, tmp_path / "out")
    started = []
    for vm in nodes:
        raw = ctx.user_data(group_of(vm)).read_bytes()
        assert len(raw) <= 16384, "EC2 takes at most 16384 bytes of user-data"
        document = yaml.safe_load(gzip.decompress(raw) if raw[:2] == b"\x1f\x8b" else raw)
        (entry,) = [f for f in document["write_files"] if f["path"] == "/usr/local/sbin/ctxagent-loader.py"]
        loader = gzip.decompress(base64.b64decode(entry["content"])).decode()
        vm.agent = vm.root / "ctxagent-loader.py"
        vm.agent.write_text(loader.replace('AGENT = "/usr/local/sbin/ctxagent.py"', 'AGENT = "%s"' % (vm.root / "ctxagent.py")))
        saved = vm.root / "user-data.txt"
        saved.write_bytes(raw)
        started.append((vm, vm.start("cloud-init", extra=["--cloud-init-user-data", str(saved)])))
    assert wait_all(started) == {vm.label: EXIT_OK for vm in nodes}
    for vm in nodes:
        assert role_calls(vm) == sorted(expected_role_calls(vm, nodes)), vm.label
    assert broker.status(ctx.cid)["all_ok"] is True


def test_one_connection_per_run_resumed_after_the_broker_cuts_it(tmp_path, vms, cluster, diag):
    """Each agent makes its run's requests on one kept-alive connection. The broker cuts a
    connection idle past its request deadline (here 1 s) while the head runs a slow script;
    the head's ok report reconnects by itself, resuming its TLS session, and every run ends ok."""
    broker = BrokerProcess(tmp_path / "broker", extra_args=["--request-deadline", "1"])
    diag.add_file("broker log", broker.log_path, lines=200)
    nodes = vms({"head": {"4-restarts/torqueslave": {"sleep": 2.0}}})
    try:
        broker.start()
        ctx = broker.create(cluster.path, tmp_path / "out")
        started = [(vm, vm.start(ctx.bootstrap(group_of(vm)), extra=["--verbose"])) for vm in nodes]
        assert wait_all(started) == {vm.label: EXIT_OK for vm in nodes}
        for vm in nodes:
            counts = re.findall(r"(\d+) connection\(s\) to the broker, (\d+) resumed", vm.log())
            assert len(counts) == 1, vm.log()
            opened, resumed = map(int, counts[0])
            # One full handshake per run, every reconnection resumed; the head's slow script
            # outlasts the deadline for sure (a compute's scripts may too, on a loaded machine).
            assert opened - resumed == 1, (vm.label, counts)
            assert opened >= 2 if vm.label == "head" else opened >= 1, (vm.label, counts)
        assert "request not received within 1.0 s: connection cut" in broker.log()
        assert broker.status(ctx.cid)["all_ok"] is True
    finally:
        broker.kill()
