"""ctxctl (ctxd/ctxctl/): settings precedence, one-line errors, and commands against a fake broker.

The commands run against treq.testing.StubTreq wrapping FakeBroker, a tiny
twisted.web resource that answers canned JSON per route; time is a Clock.
"""

import base64
import io
import json
import os
import stat

import pytest
from OpenSSL import SSL
from support import ca_pem
from treq.testing import StubTreq
from twisted.internet import defer
from twisted.internet import error as neterror
from twisted.internet.task import Clock
from twisted.python.failure import Failure
from twisted.web.client import ResponseNeverReceived
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET

from ctxd.ctxctl import commands, errors
from ctxd.ctxctl import main as cli
from ctxd.ctxctl.client import BrokerClient, BrokerSettings, describe_failure, load_credentials, resolve_settings
from ctxd.ctxctl.cluster import load_cluster_file
from ctxd.ctxctl.errors import CliError
from ctxd.ctxctl.main import parse_args, run_command
from ctxd.ctxctl.userdata import read_bootstrap

CID = "Q2x1c3Rlci1pZC0xMjM0NT"
TOKEN = "ctxd_adm_" + "a" * 43
URL = "https://ctxd.test:8443"
EXAMPLE = os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir, "examples", "torque",
                       "cluster.toml")


CA_PEM = ca_pem()


# ------------------------------------------------------------------ fake broker

def node(n, group, state, error=None, log_tail="", hostname=None):
    host = hostname or f"node{n}"
    return {
        "id": f"node{n:02d}" + "N" * 16, "group": group, "state": state,
        "identity": {"hostname": host, "fqdn": f"{host}.cluster.test", "primary_ip": f"10.9.0.{n}",
                     "interfaces": [], "source_address": f"192.0.2.{n}",
                     "ssh_host_keys": [f"ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAI{n:04d}",
                                       f"ecdsa-sha2-nistp256 AAAAE2VjZHNh{n:04d}"]},
        "enrolled_at": 1764085010.0 + n, "contextualizing_at": None,
        "ok_at": 1764085020.0 + n if state == "ok" else None,
        "error_at": 1764085030.0 + n if state == "error" else None,
        "error": error, "log_tail": log_tail,
    }


def status(nodes, quantities=(("head", 1), ("compute", 3))):
    """A GET /v1/contexts/CID answer with counts computed from ``nodes``."""
    expected = sum(q for _, q in quantities)
    ok = sum(1 for n in nodes if n["state"] == "ok")
    errors = sum(1 for n in nodes if n["state"] == "error")
    return {
        "id": CID, "name": "torque-demo", "revision": 7, "created": 1764085000.0,
        "expires": 1764689800.0, "locked": True, "open_for_injection": False,
        "counts": {"expected": expected, "enrolled": len(nodes),
                   "contextualizing": sum(1 for n in nodes if n["state"] == "contextualizing"),
                   "ok": ok, "error": errors},
        "complete": len(nodes) == expected, "all_ok": ok == expected, "error_present": errors > 0,
        "groups": [{"name": g, "quantity": q, "provides": [], "requires": [], "data": [],
                    "all_identities": False, "enrolled": sum(1 for n in nodes if n["group"] == g)}
                   for g, q in quantities],
        "data": {},
        "nodes": nodes,
    }


ALL_OK = status([node(1, "head", "ok"), node(2, "compute", "ok"), node(3, "compute", "ok"),
                 node(4, "compute", "ok", log_tail="fine\n")])


class FakeBroker(Resource):
    """Canned JSON per route; records requests. ``statuses`` are served in turn (the last repeats)."""

    isLeaf = True

    def __init__(self, statuses=(ALL_OK,)):
        super().__init__()
        self.statuses = list(statuses)  # a (code, body) item is answered as an error
        self.requests = []
        self.created = None

    def render(self, request):
        body = request.content.read()
        self.requests.append((request.method.decode(), request.path.decode(), body,
                              request.getHeader("content-type")))
        request.setHeader(b"content-type", b"application/json")
        if request.getHeader("authorization") != "Bearer " + TOKEN:
            return self.answer(request, 401, {"error": "unauthorized", "message": "unknown credential"})
        method, path = request.method, request.path.decode()
        if method == b"GET" and path == "/v1/contexts":
            return self.answer(request, 200, {"contexts": [
                {k: v for k, v in ALL_OK.items() if k not in ("groups", "data", "nodes")}]})
        if method == b"POST" and path == "/v1/contexts":
            self.created = json.loads(body)
            return self.answer(request, 201, {
                "context": {"id": CID, "name": self.created["name"]},
                "bootstraps": {g["name"]: {"ctxd_bootstrap": 1, "url": URL, "context_id": CID,
                                           "group": g["name"], "join_token": "ctxd_join_" + g["name"],
                                           "ca_pem": CA_PEM}
                               for g in self.created["groups"]}})
        if path == f"/v1/contexts/{CID}":
            if method == b"DELETE":
                return self.answer(request, 200, {"deleted": CID})
            current = self.statuses.pop(0) if len(self.statuses) > 1 else self.statuses[0]
            if isinstance(current, tuple):
                return self.answer(request, *current)
            return self.answer(request, 200, current)
        if method == b"POST" and path == f"/v1/contexts/{CID}/lock":
            return self.answer(request, 200, {"id": CID, "locked": True, "revision": 8})
        if method == b"PUT" and path == f"/v1/contexts/{CID}/data/gridmap":
            return self.answer(request, 200, {"id": CID, "revision": 9})
        if method == b"PUT" and path.startswith(f"/v1/contexts/{CID}/data/"):
            return self.answer(request, 404, {"error": "not_found", "message": "no such data item"})
        return self.answer(request, 404, {"error": "not_found", "message": "no such context"})

    def answer(self, request, code, value):
        request.setResponseCode(code)
        return json.dumps(value).encode("utf-8")


class TTY(io.StringIO):
    def isatty(self):
        return True


def run(fake, argv, clock=None, err=None):
    """Run one ctxctl command against ``fake``; return (exit code, stdout, stderr)."""
    clock = clock or Clock()
    stub = StubTreq(fake)
    broker = BrokerClient(stub, URL, TOKEN, ca_file="ca.pem", clock=clock, timeout=None, ca_pem=CA_PEM.encode())
    out, err = io.StringIO(), err or io.StringIO()
    d = defer.Deferred.fromCoroutine(run_command(broker, parse_args(argv), out, err))
    for _ in range(10000):  # wait's polling: let the fake clock run
        if d.called:
            break
        stub.flush()
        clock.advance(0.5)
    results = []
    d.addBoth(results.append)
    assert results, "the command did not finish"
    return results[0], out.getvalue(), err.getvalue()


@pytest.fixture
def agent(monkeypatch):
    """A placeholder agent source for create (the real ctxagent.py may not fit or exist)."""
    monkeypatch.setattr(commands, "load_agent_source", lambda: "print('agent')\n")


# ------------------------------------------------------------------ settings

def namespace(*argv):
    return parse_args([*argv, "list"])


@pytest.fixture
def state_dir(tmp_path):
    """A ctxd state directory with ctxctl.json naming relative and absolute paths."""
    d = tmp_path / "state"
    d.mkdir()
    (d / "ctxctl.json").write_text(json.dumps(
        {"url": "https://state:8443", "ca": "tls/ca.pem", "token_file": str(d / "admin.token")}))
    return d


def test_state_dir_supplies_everything(state_dir):
    """With only --state-dir, URL, CA and token file come from STATE_DIR/ctxctl.json (relative to it)."""
    settings = resolve_settings(namespace("--state-dir", str(state_dir)), {})
    assert settings == BrokerSettings("https://state:8443", str(state_dir / "admin.token"),
                                      str(state_dir / "tls" / "ca.pem"))


def test_env_overrides_state_dir_and_flags_override_env(state_dir):
    """Each setting: flag beats environment beats the state-dir file."""
    env = {"CTXCTL_URL": "https://env:1", "CTXCTL_CA": "/env/ca.pem", "CTXCTL_STATE_DIR": str(state_dir)}
    settings = resolve_settings(namespace(), env)
    assert settings == BrokerSettings("https://env:1", str(state_dir / "admin.token"), "/env/ca.pem")
    settings = resolve_settings(namespace("--url", "https://flag:2", "--token-file", "/flag/token"), env)
    assert settings == BrokerSettings("https://flag:2", "/flag/token", "/env/ca.pem")


def test_state_dir_not_read_when_flags_say_everything(tmp_path):
    """A stale CTXCTL_STATE_DIR does not matter when all three are given explicitly."""
    args = namespace("--url", "https://a:1", "--token-file", "t", "--ca", "c")
    assert resolve_settings(args, {"CTXCTL_STATE_DIR": str(tmp_path / "gone")}).url == "https://a:1"


def test_missing_state_file_is_one_line(tmp_path):
    """A --state-dir without ctxctl.json says which file is missing."""
    with pytest.raises(CliError, match=r"ctxctl\.json does not exist: is .* the state directory"):
        resolve_settings(namespace("--state-dir", str(tmp_path)), {})


@pytest.mark.parametrize("argv, env, expected", [
    ([], {}, "ctxctl: error: no broker URL, admin token file and CA certificate: give "
             "--url/--token-file/--ca or set CTXCTL_URL/CTXCTL_TOKEN_FILE/CTXCTL_CA or give "
             "--state-dir DIR (the broker's state directory)"),
    (["--token-file", "t", "--ca", "c"], {}, "ctxctl: error: no broker URL: give --url or set "
                                             "CTXCTL_URL or give --state-dir DIR (the broker's state directory)"),
    (["--url", "https://x"], {"CTXCTL_CA": "c"}, "ctxctl: error: no admin token file: give "
                                                 "--token-file or set CTXCTL_TOKEN_FILE or give --state-dir "
                                                 "DIR (the broker's state directory)"),
    (["--url", "https://x", "--token-file", "t"], {}, "ctxctl: error: no CA certificate: give --ca or "
                                                      "set CTXCTL_CA or give --state-dir DIR (the broker's "
                                                      "state directory)"),
])
def test_missing_settings_are_one_line_errors(argv, env, expected, monkeypatch, capsys):
    """main() with something missing exits 1 with one line naming what is missing and how to give it."""
    for name in ("CTXCTL_URL", "CTXCTL_TOKEN_FILE", "CTXCTL_CA", "CTXCTL_STATE_DIR"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(SystemExit) as info:
        cli.main([*argv, "list"])
    assert info.value.code == 1
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err == expected + "\n"


@pytest.fixture
def files(tmp_path):
    token = tmp_path / "admin.token"
    token.write_text(TOKEN + "\n")
    ca = tmp_path / "ca.pem"
    ca.write_text(CA_PEM)
    return token, ca


def test_load_credentials_reads_token_and_ca(files):
    """The token is stripped and the CA loaded; the URL loses a trailing slash."""
    token, ca = files
    creds = load_credentials(BrokerSettings(URL + "/", str(token), str(ca)))
    assert (creds.url, creds.token, creds.ca_pem) == (URL, TOKEN, CA_PEM.encode())


@pytest.mark.parametrize("url, token, ca, message", [
    ("http://ctxd.test:8443", None, None, "must start with https://"),
    ("https://[::1]:8443", None, None, "IPv6 address literals are not supported"),
    (URL, "missing", None, "cannot read admin token file"),
    (URL, "garbage", None, "does not hold a ctxd token"),
    (URL, None, "missing", "cannot read CA certificate"),
    (URL, None, "garbage", "is not a PEM certificate"),
])
def test_bad_credentials_are_one_line(files, tmp_path, url, token, ca, message):
    """A plain-http URL, unreadable or malformed token/CA files each give a one-line error."""
    good_token, good_ca = files
    (tmp_path / "garbage").write_text("not a token\n-----BEGIN CERTIFICATE-----\nxx\n")
    token = str(tmp_path / token) if token else str(good_token)
    ca = str(tmp_path / ca) if ca else str(good_ca)
    with pytest.raises(CliError) as info:
        load_credentials(BrokerSettings(url, token, ca))
    assert message in str(info.value) and "\n" not in str(info.value)


@pytest.mark.parametrize("argv", [
    ["status", "short"], ["wait", "Q2x1c3Rlci1pZC0xMjM0NT!"], ["delete", "../../v1/contexts"],
    ["known-hosts", "Q2x1c3Rlci1pZC0xMjM0NTXX"], ["data", "put", "a b", "gridmap", "f"],
])
def test_bad_context_id_rejected_before_anything_is_sent(argv, capsys, monkeypatch):
    """A malformed CTX is a usage error (exit 2) found by argparse, before settings or network."""
    monkeypatch.setattr(cli, "resolve_settings", lambda *a: pytest.fail("settings were resolved"))
    with pytest.raises(SystemExit) as info:
        cli.main(argv)
    assert info.value.code == 2
    assert "is not a context id" in capsys.readouterr().err


@pytest.mark.parametrize("argv, message", [
    (["data", "put", CID, "../x", "f"], "'../x' is not a valid data name"),
    (["user", "add", "bad name"], "'bad name' is not a valid deployer name"),
    (["user", "revoke", "x@y"], "'x@y' is not a valid deployer name"),
    (["join-token", "rotate", CID, "a/b", "--out", "d"], "'a/b' is not a valid group name"),
    (["node", "revoke", CID, "bad node!"], "'bad node!' is not a node id"),
])
def test_bad_names_and_ids_rejected_before_anything_is_sent(argv, message, capsys, monkeypatch):
    """A malformed name or node id is a usage error (exit 2) naming what it should be, found by
    argparse before settings or network (node revoke once crashed with an internal error here)."""
    monkeypatch.setattr(cli, "resolve_settings", lambda *a: pytest.fail("settings were resolved"))
    with pytest.raises(SystemExit) as info:
        cli.main(argv)
    err = capsys.readouterr().err
    assert info.value.code == 2 and message in err and "internal error" not in err


def test_help_documents_exit_codes(capsys):
    """--help lists the exit codes 0, 1, 2 and 3."""
    with pytest.raises(SystemExit):
        cli.main(["--help"])
    text = capsys.readouterr().out
    assert "exit codes:" in text and "3  wait timed out" in text and "2  usage error" in text


def test_known_hosts_file_needs_write():
    """--file without --write is a usage error."""
    with pytest.raises(SystemExit) as info:
        parse_args(["known-hosts", CID, "--file", "x"])
    assert info.value.code == 2


# ------------------------------------------------------------------ error mapping

def test_tls_verification_failure_names_the_ca():
    """An OpenSSL verify failure inside twisted.web's wrapper becomes 'cannot verify ... against CA'."""
    exc = ResponseNeverReceived([Failure(SSL.Error([("SSL routines", "", "certificate verify failed")]))])
    assert str(describe_failure(exc, URL, "/etc/ca.pem")) == (
        "cannot verify the broker's certificate against CA /etc/ca.pem (certificate verify failed)")


def test_connection_refused_names_the_url():
    """A refused connection says 'cannot connect to URL' and is retryable."""
    e = describe_failure(neterror.ConnectionRefusedError("nope"), URL, "ca.pem")
    assert str(e) == f"cannot connect to {URL}: connection refused"
    assert isinstance(e, errors.BrokerUnavailable)


def test_broker_error_is_one_line_with_code_and_status():
    """A JSON error answer becomes 'ctxctl: error: broker: MESSAGE (CODE, HTTP STATUS)', exit 1."""
    code, out, err = run(FakeBroker(), ["status", "A" * 22])
    assert (code, out) == (1, "")
    assert err == "ctxctl: error: broker: no such context (not_found, HTTP 404)\n"


def test_wrong_token_hint():
    """A 401 answer adds a hint about the admin token, still on one line."""
    fake = FakeBroker()
    stub = StubTreq(fake)
    broker = BrokerClient(stub, URL, "ctxd_adm_wrong", clock=Clock(), timeout=None)
    err = io.StringIO()
    d = defer.Deferred.fromCoroutine(run_command(broker, parse_args(["list"]), io.StringIO(), err))
    assert d.called
    assert err.getvalue().startswith("ctxctl: error: broker: unknown credential (unauthorized, HTTP 401) - ")
    assert err.getvalue().count("\n") == 1


class NotJSON(Resource):
    isLeaf = True

    def render(self, request):
        return b"<html>proxy</html>"


def test_non_json_answer_is_one_line():
    """A 200 answer that is not JSON is an error line, not a traceback."""
    stub = StubTreq(NotJSON())
    broker = BrokerClient(stub, URL, TOKEN, clock=Clock(), timeout=None)
    err = io.StringIO()
    d = defer.Deferred.fromCoroutine(run_command(broker, parse_args(["list"]), io.StringIO(), err))
    assert d.called
    assert err.getvalue() == f"ctxctl: error: broker: the answer to {URL}/v1/contexts is not JSON (HTTP 200)\n"


class Hang(Resource):
    isLeaf = True

    def render(self, request):
        return NOT_DONE_YET


def test_request_timeout_is_one_line():
    """A broker that never answers gives 'no answer from URL within N s' when the clock runs out."""
    clock = Clock()
    broker = BrokerClient(StubTreq(Hang()), URL, TOKEN, clock=clock, timeout=30)
    err = io.StringIO()
    d = defer.Deferred.fromCoroutine(run_command(broker, parse_args(["list"]), io.StringIO(), err))
    assert not d.called
    clock.advance(30)
    assert d.called
    assert err.getvalue() == f"ctxctl: error: no answer from {URL} within 30 s\n"


# ------------------------------------------------------------------ commands

def test_create_writes_bootstraps_and_user_data(tmp_path, agent):
    """create posts the cluster body, writes 0600 files in a 0700 dir, prints only the id on stdout."""
    fake = FakeBroker()
    out_dir = tmp_path / "out"
    code, out, err = run(fake, ["create", EXAMPLE, "--out", str(out_dir)])
    assert (code, out) == (0, CID + "\n")
    assert fake.created == load_cluster_file(EXAMPLE)
    assert fake.requests[0][3] == "application/json"
    assert stat.S_IMODE(out_dir.stat().st_mode) == 0o700
    assert sorted(p.name for p in out_dir.iterdir()) == [
        "compute.bootstrap.json", "compute.user-data", "head.bootstrap.json", "head.user-data"]
    for p in out_dir.iterdir():
        assert stat.S_IMODE(p.stat().st_mode) == 0o600
    head = json.loads((out_dir / "head.bootstrap.json").read_text())
    assert head["group"] == "head" and head["join_token"] == "ctxd_join_head"
    assert read_bootstrap((out_dir / "head.user-data").read_bytes()) == head
    assert "created context torque-demo" in err and "4 nodes expected" in err


def test_create_bad_cluster_file_sends_nothing(tmp_path, agent):
    """A bad cluster file is one line naming the field, and no request reaches the broker."""
    bad = tmp_path / "cluster.toml"
    bad.write_text('name = "t"\n[[group]]\nname = "a"\nquantity = 0\n')
    fake = FakeBroker()
    code, out, err = run(fake, ["create", str(bad), "--out", str(tmp_path / "o")])
    assert code == 1 and fake.requests == []
    assert err == f"ctxctl: error: {bad}: group[0].quantity: must be an integer >= 1\n"


def test_create_refuses_oversized_user_data_before_creating(tmp_path, monkeypatch):
    """An agent too large for the user-data limit fails before the context is created."""
    fake = FakeBroker()
    agent = "BLOB = '" + base64.b64encode(os.urandom(30000)).decode() + "'\n"
    monkeypatch.setattr(commands, "load_agent_source", lambda: agent)
    code, out, err = run(fake, ["create", EXAMPLE, "--out", str(tmp_path / "o")])
    assert code == 1 and fake.requests == []
    assert err.startswith("ctxctl: error: user-data is ") and err.count("\n") == 1


def test_status_table():
    """status prints a header, one row per node and per missing slot (with error messages), and counts."""
    doc = status([node(1, "head", "ok"), node(2, "compute", "error",
                                              error={"exit_code": 4, "message": "script 1-ipandhost/x exited 3",
                                                     "log_tail": "boom\n"}),
                  node(3, "compute", "contextualizing")])
    code, out, err = run(FakeBroker([doc]), ["status", CID])
    assert code == 0
    lines = out.splitlines()
    assert lines[0].startswith(f"context torque-demo ({CID}), revision 7, locked, expires 2025-")
    assert lines[1].split() == ["GROUP", "NODE", "HOSTNAME", "IP", "STATE", "MESSAGE"]
    assert lines[2].split() == ["head", "node01" + "N" * 16, "node1", "10.9.0.1", "ok"]
    assert lines[3].split()[:5] == ["compute", "node02" + "N" * 16, "node2", "10.9.0.2", "error"]
    assert lines[3].endswith("script 1-ipandhost/x exited 3")
    assert lines[4].split() == ["compute", "node03" + "N" * 16, "node3", "10.9.0.3", "contextualizing"]
    assert lines[5].split() == ["compute", "-", "-", "-", "not", "enrolled"]
    assert lines[6] == ("4 expected, 3 enrolled, 1 contextualizing, 1 ok, 1 error; "
                        "complete: no, all_ok: no")
    assert len(lines) == 7


def test_status_json_is_the_brokers_json():
    """status --json prints exactly the broker's object."""
    code, out, err = run(FakeBroker(), ["status", CID, "--json"])
    assert code == 0 and json.loads(out) == ALL_OK


def test_status_escapes_terminal_control_characters():
    """A hostile error message cannot send escape sequences to the terminal."""
    doc = status([node(1, "head", "error", error={"exit_code": 1, "message": "\x1b]0;pwned\x07oops\nx"})])
    code, out, err = run(FakeBroker([doc]), ["status", CID])
    assert "\x1b" not in out and "\x07" not in out and "?]0;pwned?oops x" in out


def test_wait_all_ok_exits_0_with_ok_reports(tmp_path):
    """wait polls until all_ok, prints progress lines only when counts change, writes .ok reports."""
    first = status([node(1, "head", "ok")])
    fake = FakeBroker([first, first, first, ALL_OK])
    code, out, err = run(fake, ["wait", CID, "--reports", str(tmp_path), "--interval", "1"])
    assert (code, out) == (0, "")
    progress = [line for line in err.splitlines() if line.startswith("[")]
    assert progress == ["[##........] 1/4 ok, 0 error, 1/4 enrolled",
                        "[##########] 4/4 ok, 0 error, 4/4 enrolled"]
    assert len([r for r in fake.requests if r[0] == "GET"]) == 4
    reports = sorted(p.name for p in (tmp_path / CID).iterdir())
    assert reports == [f"compute-node{n}-node0{n}{'N' * 16}.ok" for n in (2, 3, 4)] + [
        f"head-node1-node01{'N' * 16}.ok"]
    text = (tmp_path / CID / f"compute-node4-node04{'N' * 16}.ok").read_text()
    assert "state: ok\n" in text and text.endswith("--- log tail ---\nfine\n")


def test_wait_progress_redraws_on_a_tty(tmp_path):
    """On a TTY the progress bar is redrawn in place with carriage returns."""
    err = TTY()
    code, _, _ = run(FakeBroker([status([node(1, "head", "ok")]), ALL_OK]),
                     ["wait", CID, "--reports", str(tmp_path)], err=err)
    assert code == 0
    assert err.getvalue().startswith("\r[##........] 1/4 ok") and "\r[##########] 4/4 ok" in err.getvalue()


def test_wait_first_error_exits_1_with_log_tail_and_reports(tmp_path):
    """On a node error wait exits 1, shows its group/id/hostname, message and log tail; writes every report."""
    failed = node(2, "compute", "error", hostname="c2",
                  error={"exit_code": 4, "message": "script 1-ipandhost/torquemaster exited 3",
                         "log_tail": "line one\nline two\n"})
    doc = status([node(1, "head", "ok"), failed, node(3, "compute", "contextualizing")])
    code, out, err = run(FakeBroker([doc]), ["wait", CID, "--reports", str(tmp_path)])
    assert (code, out) == (1, "")
    assert f"node compute/node02{'N' * 16} (c2) failed: exit code 4: script 1-ipandhost/torquemaster exited 3" in err
    assert "line one\nline two\n" in err
    assert err.splitlines()[-1] == (f"ctxctl: error: node compute/node02{'N' * 16} (c2) reported an error: "
                                    "script 1-ipandhost/torquemaster exited 3")
    reports = sorted(p.name for p in (tmp_path / CID).iterdir())
    assert reports == [f"compute-c2-node02{'N' * 16}.error", "compute-missing-1.did-not-report",
                       f"compute-node3-node03{'N' * 16}.pending", f"head-node1-node01{'N' * 16}.ok"]
    text = (tmp_path / CID / f"compute-c2-node02{'N' * 16}.error").read_text()
    assert "state: error\nhostname: c2\n" in text and "exit_code: 4\n" in text
    assert "message: script 1-ipandhost/torquemaster exited 3\n" in text
    assert text.endswith("--- log tail ---\nline one\nline two\n")


def test_wait_timeout_exits_3_naming_the_silent_nodes(tmp_path):
    """When time runs out wait exits 3, says how many did not report, and writes did-not-report files."""
    doc = status([node(1, "head", "ok"), node(2, "compute", "enrolled")])
    (tmp_path / CID).mkdir()
    (tmp_path / CID / "stale.ok").write_text("from an earlier run")
    code, out, err = run(FakeBroker([doc]), ["wait", CID, "--reports", str(tmp_path), "--timeout", "5"])
    assert code == 3
    assert err.splitlines()[-1] == ("ctxctl: error: timed out after 5 s: 3 of 4 nodes did not report "
                                    "(2 never enrolled, 1 enrolled but not finished)")
    reports = sorted(p.name for p in (tmp_path / CID).iterdir())
    assert reports == ["compute-missing-1.did-not-report", "compute-missing-2.did-not-report",
                       f"compute-node2-node02{'N' * 16}.pending", f"head-node1-node01{'N' * 16}.ok"]


def test_wait_rides_out_a_broker_restart(tmp_path):
    """After a first good poll, 503 answers (a broker restarting) are retried; wait still ends 0."""
    unavailable = (503, {"error": "internal_error", "message": "starting"})
    fake = FakeBroker([status([node(1, "head", "ok")])] + [unavailable] * 3 + [ALL_OK])
    code, out, err = run(fake, ["wait", CID, "--reports", str(tmp_path)])
    assert code == 0
    assert err.count("broker: starting (internal_error, HTTP 503); retrying") == 1
    assert "broker reachable again" in err


def test_wait_fails_at_once_if_the_broker_was_never_reached(tmp_path):
    """A broker unreachable at the first poll (likely a wrong URL) is an error, not a 30-minute wait."""
    fake = FakeBroker([(503, {"error": "internal_error", "message": "starting"})])
    code, out, err = run(fake, ["wait", CID, "--reports", str(tmp_path)])
    assert code == 1 and err == "ctxctl: error: broker: starting (internal_error, HTTP 503)\n"
    assert len(fake.requests) == 1


def test_wait_warns_when_the_context_is_not_locked(tmp_path):
    """An open context makes wait say that nodes wait for `ctxctl lock`."""
    doc = dict(ALL_OK, locked=False, all_ok=False)
    code, out, err = run(FakeBroker([doc, ALL_OK]), ["wait", CID, "--reports", str(tmp_path)])
    assert code == 0 and err.count(f"nodes wait for `ctxctl lock {CID}`") == 1


def test_wait_gives_up_on_a_4xx(tmp_path):
    """A 404 during wait (context deleted) ends it at once with exit 1."""
    code, out, err = run(FakeBroker(), ["wait", "B" * 22, "--reports", str(tmp_path)])
    assert code == 1 and err == "ctxctl: error: broker: no such context (not_found, HTTP 404)\n"


def test_known_hosts_prints_lines():
    """known-hosts prints 'FQDN,SHORT,IP TYPE KEY' for every key of every node, nothing invalid."""
    hostile = node(5, "compute", "ok", hostname="evil")
    hostile["identity"]["fqdn"] = "evil.test,*"
    code, out, err = run(FakeBroker([status([node(1, "head", "ok"), hostile])]), ["known-hosts", CID])
    assert code == 0
    assert out.splitlines() == [
        "node1.cluster.test,node1,10.9.0.1 ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAI0001",
        "node1.cluster.test,node1,10.9.0.1 ecdsa-sha2-nistp256 AAAAE2VjZHNh0001",
    ]
    assert "warning: node node05" in err


def test_known_hosts_write_replaces_the_contexts_block(tmp_path):
    """--write replaces this context's earlier block in place, keeps everything else, file 0600, dir 0700."""
    path = tmp_path / "new-dir" / "known_hosts"
    before = "\n".join([
        "github.com ssh-ed25519 AAAAgithub",
        f"# BEGIN ctxd (context {CID})",
        "old.example,old,10.0.0.9 ssh-ed25519 AAAAold",
        f"# END ctxd (context {CID})",
        "# BEGIN ctxd (context OtherContextxxxxxxxxxx)",
        "other ssh-rsa AAAAother",
        "# END ctxd (context OtherContextxxxxxxxxxx)",
        "last.example ssh-rsa AAAAlast",
    ]) + "\n"
    code, _, _ = run(FakeBroker([status([node(1, "head", "ok")])]),
                     ["known-hosts", CID, "--write", "--file", str(path)])
    assert code == 0
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    path.write_text(before)
    code, out, err = run(FakeBroker([status([node(1, "head", "ok")])]),
                         ["known-hosts", CID, "--write", "--file", str(path)])
    assert (code, out) == (0, "")
    assert path.read_text() == "\n".join([
        "github.com ssh-ed25519 AAAAgithub",
        f"# BEGIN ctxd (context {CID})",
        "node1.cluster.test,node1,10.9.0.1 ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAI0001",
        "node1.cluster.test,node1,10.9.0.1 ecdsa-sha2-nistp256 AAAAE2VjZHNh0001",
        f"# END ctxd (context {CID})",
        "# BEGIN ctxd (context OtherContextxxxxxxxxxx)",
        "other ssh-rsa AAAAother",
        "# END ctxd (context OtherContextxxxxxxxxxx)",
        "last.example ssh-rsa AAAAlast",
    ]) + "\n"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert [p.name for p in path.parent.iterdir()] == ["known_hosts"]  # no temp file left


def test_data_put_lock_delete_list(tmp_path):
    """data put sends base64 values; lock, delete and list hit their routes; list prints a table."""
    value = tmp_path / "grid"
    value.write_bytes(b"\x00gridmap\n")
    fake = FakeBroker()
    assert run(fake, ["data", "put", CID, "gridmap", str(value), str(value)])[0] == 0
    method, path, body, ctype = fake.requests[-1]
    assert (method, path, ctype) == ("PUT", f"/v1/contexts/{CID}/data/gridmap", "application/json")
    assert json.loads(body) == {"values": [{"b64": base64.b64encode(b"\x00gridmap\n").decode()}] * 2}
    assert run(fake, ["lock", CID])[0] == 0 and fake.requests[-1][:3] == ("POST", f"/v1/contexts/{CID}/lock", b"{}")
    code, out, err = run(fake, ["delete", CID])
    assert (code, out, err) == (0, "", f"deleted context {CID}\n")
    code, out, err = run(fake, ["list"])
    assert code == 0 and out.splitlines()[0].split() == ["ID", "NAME", "OK", "ERRORS", "STATE", "DATA", "EXPIRES"]
    assert out.splitlines()[1].split()[:6] == [CID, "torque-demo", "4/4", "0", "all", "ok"]


def test_data_put_unknown_name():
    """A broker 404 for an undeclared item is one line."""
    fake = FakeBroker()
    code, _, err = run(fake, ["data", "put", CID, "nope", os.devnull])
    assert (code, err) == (1, "ctxctl: error: broker: no such data item (not_found, HTTP 404)\n")
