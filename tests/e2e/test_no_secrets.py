"""No credential reaches a log, a report, the journal or the audit log (real processes)."""

import json
from pathlib import Path

import pytest

from .helpers import EXIT_OK, EXIT_SCRIPT, Context, finish, running_broker, start_all, wait_all


@pytest.fixture
def broker(tmp_path, diag):
    """A real broker writing its access log too (--access-log), so that it is searched as well."""
    yield from running_broker(tmp_path, diag, ["--access-log"])


def test_no_token_in_any_log_report_journal_or_audit(broker, vms, tmp_path, cluster, diag):
    """Every token used in a full run - admin, deployer, join, node, instance keys - appears in no output."""
    dep_token = broker.ctxctl_ok("user", "add", "alice").strip()
    assert dep_token.startswith("ctxd_dep_")
    token_file = tmp_path / "alice.token"
    token_file.write_text(dep_token + "\n")
    token_file.chmod(0o600)
    # The deployer creates the context with its own credential (--token-file wins over --state-dir's).
    out = tmp_path / "out"
    cid = broker.ctxctl_ok("--token-file", token_file, "create", cluster.path, "--out", out).strip()
    nodes = vms(behaviour={"compute3": {"1-ipandhost/torquemaster": {"exit": 3}}})
    results = wait_all(start_all(nodes, Context(cid, out)))
    assert results["compute3"] == EXIT_SCRIPT and results["head"] == EXIT_OK
    rc, _, _ = finish(broker.ctxctl_popen("--token-file", token_file, "wait", cid, "--timeout", 20,
                                          "--reports", tmp_path / "reports"), 40)
    assert rc == 1
    # Revoke a node and rotate a join token, so those paths are audited too.
    node = json.loads((nodes[1].state_dir / "node.json").read_text())["node_id"]
    broker.ctxctl_ok("--token-file", token_file, "node", "revoke", cid, node)
    broker.ctxctl_ok("--token-file", token_file, "join-token", "rotate", cid, "compute", "--out", tmp_path / "rot")

    secrets = {"admin": (broker.state_dir / "admin.token").read_text().strip(), "deployer": dep_token}
    for group in ("head", "compute"):
        secrets["join " + group] = json.loads((out / f"{group}.bootstrap.json").read_text())["join_token"]
    secrets["rotated join"] = json.loads((tmp_path / "rot" / "compute.bootstrap.json").read_text())["join_token"]
    for vm in nodes:
        secrets["node " + vm.label] = json.loads((vm.state_dir / "node.json").read_text())["node_token"]
        secrets["instance key " + vm.label] = (vm.state_dir / "instance_key").read_text().strip()
    assert all(len(s) >= 16 for s in secrets.values())

    outputs = {
        "journal": broker.state_dir / "journal.log",
        "audit log": broker.state_dir / "audit.log",
        "broker log": broker.log_path,
    }
    for vm in nodes:
        outputs["agent log " + vm.label] = vm.state_dir / "ctxagent.log"
        outputs["agent output " + vm.label] = vm.log_path
        if (vm.state_dir / "script.out").exists():
            outputs["script output " + vm.label] = vm.state_dir / "script.out"
    for report in sorted((tmp_path / "reports").rglob("*")):
        if report.is_file():
            outputs["report " + report.name] = report
    status = broker.ctxctl_ok("status", cid, "--json")
    assert '"POST /v1/contexts/%s/enroll HTTP/1.1" 201' % cid in broker.log()   # the access log is on
    audit = [json.loads(line) for line in (broker.state_dir / "audit.log").read_text().splitlines()]
    assert {"create_context", "enroll", "revoke_node", "rotate_join_token", "add_user"} <= {e["action"] for e in audit}
    assert any(e["principal"] == "deployer:alice" for e in audit)

    leaks = []
    for what, path in outputs.items():
        text = Path(path).read_text(errors="replace")
        leaks += [(name, what) for name, secret in secrets.items() if secret in text]
    leaks += [(name, "ctxctl status --json") for name, secret in secrets.items() if secret in status]
    assert not leaks, "secrets found: %s" % leaks
    print("no-secrets check: %d secrets x %d outputs" % (len(secrets), len(outputs) + 1))
