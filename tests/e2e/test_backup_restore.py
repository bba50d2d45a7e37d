"""Back up a real running broker, restore the backup, and carry on as the same broker."""

from __future__ import annotations

import subprocess
import sys

from .helpers import EXIT_OK, BrokerProcess, clean_env, start_all, wait_all


def _journal_tool(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ctxd.journal", *map(str, args)], capture_output=True,
                          text=True, timeout=60, env=clean_env())


def test_backup_of_a_running_broker_restores_its_state(broker, vms, tmp_path, cluster, diag):
    """Taken while the broker serves, a backup restored on another state directory starts a
    broker with every change made before it (and none after), the same CA, admin token and node
    credentials: an agent re-runs against it with its old bootstrap."""
    nodes = vms()
    ctx = broker.create(cluster.path, tmp_path / "out")
    assert wait_all(start_all(nodes, ctx)) == {vm.label: EXIT_OK for vm in nodes}
    broker.ctxctl_ok("user", "add", "before")
    before = broker.status(ctx.cid)
    done = _journal_tool("backup", broker.state_dir, tmp_path / "backup")
    assert done.returncode == 0, done.stderr
    broker.ctxctl_ok("user", "add", "after")   # not in the backup
    broker.stop()

    again = BrokerProcess(tmp_path / "restored", port=broker.port)
    diag.add_file("restored broker log", again.log_path, lines=100)
    done = _journal_tool("restore", tmp_path / "backup", again.state_dir)
    assert done.returncode == 0, done.stderr
    try:
        again.start()
        after = again.status(ctx.cid)
        for key in ("counts", "nodes", "groups", "all_ok", "revision"):
            assert after[key] == before[key], key
        users = again.ctxctl_ok("user", "list")
        assert "before" in users and "after" not in users
        assert (again.state_dir / "tls" / "ca.pem").read_bytes() == (broker.state_dir / "tls" / "ca.pem").read_bytes()
        head = nodes[0]
        assert head.run(ctx.bootstrap("head")) == EXIT_OK   # same URL, CA and node credential
    finally:
        again.kill()
