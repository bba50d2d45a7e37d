"""ctxctl (ctxd/ctxctl/): settings precedence, one-line errors, and every command against the real broker.

The commands run through treq.testing.StubTreq against the real API: ctxd.api.BrokerResource over
a ctxd.broker.Broker with an in-memory journal (tests/support.py's Client), one task.Clock for the
broker and ctxctl. Tests reach the states they need as agents do: enroll with a group's join
token, report with the node token. Canned resources remain only for what the real resource cannot
produce: an answer that is not JSON, a broker that never answers, 503s and refused connections
while it restarts, and an answer tampered with on its way (the real broker refuses to store it).
"""

import base64
import collections
import gzip
import hashlib
import io
import json
import os
import stat
import time

import pytest
import yaml
from OpenSSL import SSL
from support import ADMIN_TOKEN, PUBLIC_URL, Client, ca_pem, result_of, torque_cluster
from support import AGENT as SUPPORT_AGENT
from support import CA_PEM as BROKER_CA_PEM
from treq.testing import StubTreq
from twisted.internet import defer
from twisted.internet import error as neterror
from twisted.internet.task import Clock
from twisted.python.failure import Failure
from twisted.web.client import ResponseNeverReceived
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET

from ctxd import tokens
from ctxd.api import BrokerResource
from ctxd.ctxctl import commands, errors
from ctxd.ctxctl import main as cli
from ctxd.ctxctl.client import BrokerClient, BrokerSettings, describe_failure, load_credentials, resolve_settings
from ctxd.ctxctl.cluster import load_cluster_file
from ctxd.ctxctl.errors import CliError
from ctxd.ctxctl.main import parse_args, run_command
from ctxd.ctxctl.userdata import LOADER_PATH, UNIT_PATH, read_bootstrap

CID = "Q2x1c3Rlci1pZC0xMjM0NT"  # a well-formed context id, for tests that never reach a broker
TOKEN = "ctxd_adm_" + "a" * 43
URL = "https://ctxd.test:8443"
EXAMPLE = os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir, "examples", "torque",
                       "cluster.toml")
T0 = 1764085000.0  # the broker's clock starts here (2025-11-25 15:36:40 UTC), so times look real


CA_PEM = ca_pem()


# ------------------------------------------------------------------ the real broker

def utc(seconds):
    """A broker time as ctxctl prints it."""
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(seconds))


def head_first_cluster():
    """The torque cluster with a head that requires nothing: it can be ok while compute slots are
    still empty (in the torque cluster the head waits until every compute node enrolled)."""
    body = torque_cluster()
    body["groups"][0]["requires"] = []
    return body


class Spy(Resource):
    """The real API, recording what ctxctl sends: (method, path, body, content type), and the
    URIs (with their queries) in ``uris``."""

    isLeaf = True

    def __init__(self, real):
        super().__init__()
        self.real = real
        self.requests = []
        self.uris = []

    def render(self, request):
        body = request.content.read()
        request.content.seek(0)
        self.requests.append((request.method.decode(), request.path.decode(), body,
                              request.getHeader("content-type")))
        self.uris.append(request.uri.decode())
        return self.real.render(request)


class Deployment:
    """A real broker for ctxctl to talk to, and the agents' side of the API to change its state.

    ``api`` is tests/support.py's Client (its own StubTreq over the broker); ctxctl's requests go
    through ``spy``, a second resource over the same Broker, so ``spy.requests`` are ctxctl's alone.
    """

    def __init__(self):
        self.api = Client()
        self.clock = self.api.clock
        self.clock.advance(T0)
        self.resource = BrokerResource(self.api.broker)
        self.spy = Spy(self.resource)
        self.node_tokens = {}

    def call(self, method, path, body=None, token=ADMIN_TOKEN, expect=200):
        status, answer = self.api.call(method, path, token, body)
        assert status == expect, answer
        return answer

    def status(self, cid):
        """GET /v1/contexts/CID as the site admin."""
        return self.call("GET", f"/v1/contexts/{cid}")

    def create(self, body=None):
        """Create a context as the site admin; (context id, {group: join token})."""
        cid, created = self.api.create(body or torque_cluster())
        return cid, {group: b["join_token"] for group, b in created["bootstraps"].items()}

    def enroll(self, cid, join_token, n, **identity):
        """Enroll VM ``n`` (support.identity(n), changed by ``identity``); its node id."""
        status, enrolled = self.api.enroll(cid, join_token, n, **identity)
        assert status == 201, enrolled
        self.node_tokens[enrolled["node_id"]] = enrolled["node_token"]
        return enrolled["node_id"]

    def report(self, cid, nid, state, **fields):
        """The node reports ``state`` (with exit_code, message, log_tail) with its own token."""
        self.call("POST", f"/v1/contexts/{cid}/nodes/{nid}/report", dict(fields, state=state),
                  token=self.node_tokens[nid])

    def head_ok(self, body=None):
        """A context (head_first_cluster by default) whose head (VM 1) enrolled and is ok:
        (context id, join tokens, {1: head's node id})."""
        cid, joins = self.create(body or head_first_cluster())
        nodes = {1: self.enroll(cid, joins["head"], 1)}
        self.report(cid, nodes[1], "ok")
        return cid, joins, nodes

    def computes_ok(self, cid, joins, nodes):
        """VMs 2-4 enroll in compute and report ok (VM 4 with a log tail), into ``nodes``."""
        for n in (2, 3, 4):
            nodes[n] = self.enroll(cid, joins["compute"], n)
            self.report(cid, nodes[n], "ok", log_tail="fine\n" if n == 4 else "")

    def all_ok(self):
        """The torque cluster with every node ok, in the order its agents get there: the head
        once every compute node enrolled, the compute nodes once the head is ok.
        (context id, {VM number: node id})."""
        cid, joins = self.create()
        nodes = {n: self.enroll(cid, joins[group], n)
                 for n, group in ((1, "head"), (2, "compute"), (3, "compute"), (4, "compute"))}
        self.report(cid, nodes[1], "ok")
        for n in (2, 3, 4):
            self.report(cid, nodes[n], "ok", log_tail="fine\n" if n == 4 else "")
        assert self.status(cid)["all_ok"] is True
        return cid, nodes

    def stub(self, resource=None):
        """A StubTreq for ctxctl: over ``resource``, by default the real API behind ``spy``."""
        return StubTreq(resource if resource is not None else self.spy)

    def run(self, argv, client=None, token=ADMIN_TOKEN, err=None):
        """Run a ctxctl command against this broker (through ``client``, default ``stub()``)."""
        return run(client if client is not None else self.stub(), argv, self.clock, token=token, err=err)

    def polls(self, cid):
        """How many times ctxctl asked for the context's (full) status."""
        return sum(1 for r in self.spy.requests if r[:2] == ("GET", f"/v1/contexts/{cid}"))

    def requests_by_route(self, cid):
        """ctxctl's requests about the context: {"status": N, "progress": M} (and "other")."""
        routes = {f"/v1/contexts/{cid}": "status", f"/v1/contexts/{cid}/progress": "progress"}
        return collections.Counter(routes.get(r[1], "other") for r in self.spy.requests)

    def progress_uris(self, cid):
        """The progress requests ctxctl sent, with their queries."""
        return [uri for uri in self.spy.uris if uri.startswith(f"/v1/contexts/{cid}/progress?")]


@pytest.fixture
def broker():
    """A fresh real broker, its clock at T0."""
    return Deployment()


class TTY(io.StringIO):
    def isatty(self):
        return True


def run(client, argv, clock, token=ADMIN_TOKEN, err=None):
    """Run one ctxctl command through ``client`` (a StubTreq, or a wrapper with its get/post/put/
    delete and flush) while ``clock`` runs in 0.5 s steps (wait's polling); return (exit code,
    stdout, stderr). Fails if the command does not finish or raises, and if it leaves a timer
    behind (a request timeout not cancelled, or a state change the test scheduled that never came)."""
    broker = BrokerClient(client, URL, token, ca_file="ca.pem", clock=clock, timeout=None, ca_pem=CA_PEM.encode())
    out, err = io.StringIO(), err or io.StringIO()
    d = defer.Deferred.fromCoroutine(run_command(broker, parse_args(argv), out, err))
    for _ in range(10000):
        client.flush()
        if d.called:
            break
        clock.advance(0.5)
    code = result_of(d)
    assert clock.getDelayedCalls() == [], "timers left pending"
    return code, out.getvalue(), err.getvalue()


def loader_of(user_data):
    """The loader a user-data has cloud-init write (gz+b64), as bytes."""
    [entry] = [f for f in yaml.safe_load(user_data)["write_files"] if f["path"] == LOADER_PATH]
    assert (entry["encoding"], entry["permissions"]) == ("gz+b64", "0700")
    return gzip.decompress(base64.b64decode(entry["content"]))


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
    """Each setting: flag beats environment beats the state-dir file; the state dir's admin token
    goes only to the state dir's own URL (never to another broker's)."""
    env = {"CTXCTL_URL": "https://env:1", "CTXCTL_CA": "/env/ca.pem", "CTXCTL_STATE_DIR": str(state_dir)}
    with pytest.raises(CliError, match="belongs to https://state:8443, not to https://env:1"):
        resolve_settings(namespace(), env)
    env["CTXCTL_TOKEN_FILE"] = "/env/token"
    settings = resolve_settings(namespace(), env)
    assert settings == BrokerSettings("https://env:1", "/env/token", "/env/ca.pem")
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
             "--config FILE or --state-dir DIR (the broker's state directory)"),
    (["--token-file", "t", "--ca", "c"], {}, "ctxctl: error: no broker URL: give --url or set "
                                             "CTXCTL_URL or give --config FILE or --state-dir DIR (the "
                                             "broker's state directory)"),
    (["--url", "https://x"], {"CTXCTL_CA": "c"}, "ctxctl: error: no admin token file: give "
                                                 "--token-file or set CTXCTL_TOKEN_FILE or give --config "
                                                 "FILE or --state-dir DIR (the broker's state directory)"),
    (["--url", "https://x", "--token-file", "t"], {}, "ctxctl: error: no CA certificate: give --ca or "
                                                      "set CTXCTL_CA or give --config FILE or --state-dir "
                                                      "DIR (the broker's state directory)"),
])
def test_missing_settings_are_one_line_errors(argv, env, expected, monkeypatch, capsys, tmp_path):
    """main() with something missing exits 1 with one line naming what is missing and how to give it."""
    for name in ("CTXCTL_URL", "CTXCTL_TOKEN_FILE", "CTXCTL_CA", "CTXCTL_STATE_DIR", "CTXCTL_CONFIG",
                 "CTXCTL_PROFILE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path))  # no configuration file at its default place
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
    ["status", "sh/ort"], ["wait", "Q2x1c3Rlci1pZC0xMjM0NT!"], ["delete", "../../v1/contexts"],
    ["known-hosts", "x" * 65], ["data", "put", "a b", "gridmap", "f"],
])
def test_bad_context_id_rejected_before_anything_is_sent(argv, capsys, monkeypatch):
    """A CTX that is neither an id nor a name is a usage error (exit 2) found by argparse, before
    settings or network."""
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



def test_broker_error_is_one_line_with_code_and_status(broker):
    """A JSON error answer becomes 'ctxctl: error: broker: MESSAGE (CODE, HTTP STATUS)', exit 1."""
    code, out, err = broker.run(["status", "A" * 22])
    assert (code, out) == (1, "")
    assert err == "ctxctl: error: broker: no such context (not_found, HTTP 404)\n"


def test_wrong_token_hint(broker):
    """A 401 answer adds a hint about the admin token, still on one line."""
    code, out, err = broker.run(["list"], token=tokens.new_token(tokens.ADMIN))
    assert (code, out) == (1, "")
    assert err == ("ctxctl: error: broker: unknown or revoked credential (unauthorized, HTTP 401) - "
                   "is the admin token in the token file the one this broker created?\n")


class NotJSON(Resource):
    """Canned: a proxy's HTML page where the broker should be (the real API always answers JSON)."""

    isLeaf = True

    def render(self, request):
        return b"<html>proxy</html>"


def test_non_json_answer_is_one_line():
    """A 200 answer that is not JSON is an error line, not a traceback."""
    code, out, err = run(StubTreq(NotJSON()), ["list"], Clock())
    assert (code, out) == (1, "")
    assert err == f"ctxctl: error: broker: the answer to {URL}/v1/contexts is not JSON (HTTP 200)\n"


class Hang(Resource):
    """Canned: a broker that accepts the request and never answers."""

    isLeaf = True

    def render(self, request):
        return NOT_DONE_YET


def test_request_timeout_is_one_line():
    """A broker that never answers gives 'no answer from URL within N s' when the clock runs out."""
    clock = Clock()
    broker = BrokerClient(StubTreq(Hang()), URL, TOKEN, clock=clock, timeout=30)
    err = io.StringIO()
    d = defer.Deferred.fromCoroutine(run_command(broker, parse_args(["list"]), io.StringIO(), err))
    clock.advance(29.9)
    assert not d.called
    clock.advance(0.1)
    assert result_of(d) == 1 and clock.getDelayedCalls() == []
    assert err.getvalue() == f"ctxctl: error: no answer from {URL} within 30 s\n"


class Outage(Resource):
    """Canned around the real API: requests number after+1 to after+failures are answered 503,
    as by a broker that is restarting; the others go to ``real``."""

    isLeaf = True

    def __init__(self, real, after, failures):
        super().__init__()
        self.real, self.after, self.failures = real, after, failures
        self.requests = 0

    def render(self, request):
        self.requests += 1
        if self.after < self.requests <= self.after + self.failures:
            request.setResponseCode(503)
            request.setHeader(b"content-type", b"application/json")
            return json.dumps({"error": "internal_error", "message": "starting"}).encode("utf-8")
        return self.real.render(request)


class Refusing:
    """Canned around a StubTreq: GETs number after+1 to after+failures fail to connect (the broker's
    process is down); the others go to ``stub``."""

    def __init__(self, stub, after, failures):
        self.stub, self.after, self.failures = stub, after, failures
        self.requests = 0

    def get(self, *args, **kwargs):
        self.requests += 1
        if self.after < self.requests <= self.after + self.failures:
            return defer.fail(neterror.ConnectionRefusedError("Connection refused"))
        return self.stub.get(*args, **kwargs)

    def flush(self):
        self.stub.flush()


class Tampered(Resource):
    """The real API's answers changed by ``edit`` on their way to ctxctl: what a compromised
    broker could send (the real one validates what it stores and never answers such values)."""

    isLeaf = True

    def __init__(self, deployment, edit):
        super().__init__()
        self.deployment, self.edit = deployment, edit

    def render(self, request):
        token = (request.getHeader("authorization") or "").partition(" ")[2]
        status, answer = self.deployment.api.call(request.method.decode(), request.path.decode(), token)
        request.setResponseCode(status)
        request.setHeader(b"content-type", b"application/json")
        return json.dumps(self.edit(answer)).encode("utf-8")


# ------------------------------------------------------------------ commands

def test_create_writes_bootstraps_and_user_data(broker, tmp_path, agent):
    """create asks the broker for its agent's hash and whether the name is taken, posts the cluster
    body, writes 0600 files in a 0700 dir, prints only the id on stdout; the bootstraps are the
    broker's: their join tokens enroll VMs in their groups; the user-data's loader runs only the
    agent that broker serves."""
    out_dir = tmp_path / "out"
    code, out, err = broker.run(["create", EXAMPLE, "--out", str(out_dir)])
    [context] = broker.call("GET", "/v1/contexts")["contexts"]
    cid = context["id"]
    assert (code, out) == (0, cid + "\n")
    assert [r[:2] for r in broker.spy.requests] == [("GET", "/v1/agent"), ("GET", "/v1/contexts"),
                                                    ("POST", "/v1/contexts")]
    assert json.loads(broker.spy.requests[2][2]) == load_cluster_file(EXAMPLE)
    assert broker.spy.requests[2][3] == "application/json"
    assert (context["name"], context["counts"]["expected"], context["locked"]) == ("torque-demo", 4, True)
    assert stat.S_IMODE(out_dir.stat().st_mode) == 0o700
    assert sorted(p.name for p in out_dir.iterdir()) == [
        "compute.bootstrap.json", "compute.user-data", "head.bootstrap.json", "head.user-data"]
    for p in out_dir.iterdir():
        assert stat.S_IMODE(p.stat().st_mode) == 0o600
    for n, group in ((1, "head"), (2, "compute")):
        bootstrap = json.loads((out_dir / f"{group}.bootstrap.json").read_text())
        assert bootstrap == {"ctxd_bootstrap": 1, "url": PUBLIC_URL, "context_id": cid, "group": group,
                             "join_token": bootstrap["join_token"], "ca_pem": BROKER_CA_PEM}
        user_data = (out_dir / f"{group}.user-data").read_bytes()
        assert read_bootstrap(user_data) == bootstrap
        assert [f["path"] for f in yaml.safe_load(user_data)["write_files"]] == [LOADER_PATH, UNIT_PATH]
        assert f'SHA256 = "{hashlib.sha256(SUPPORT_AGENT).hexdigest()}"'.encode() in loader_of(user_data)
        status, enrolled = broker.api.enroll(cid, bootstrap["join_token"], n)
        assert (status, enrolled["group"]) == (201, group)
    assert err.splitlines()[-1] == f"created context torque-demo ({cid}): 2 groups, 4 nodes expected; locked"


def test_create_bad_cluster_file_sends_nothing(broker, tmp_path, agent):
    """A bad cluster file is one line naming the field, and no request reaches the broker."""
    bad = tmp_path / "cluster.toml"
    bad.write_text('name = "t"\n[[group]]\nname = "a"\nquantity = 0\n')
    code, out, err = broker.run(["create", str(bad), "--out", str(tmp_path / "o")])
    assert code == 1 and broker.spy.requests == [] and broker.api.journal.records == []
    assert err == f"ctxctl: error: {bad}: group[0].quantity: must be an integer >= 1\n"


def test_create_refuses_oversized_user_data_before_creating(broker, tmp_path, monkeypatch):
    """An agent too large to embed (--embed-agent) fails before the context is created, in one
    line that names the way out."""
    agent = "BLOB = '" + base64.b64encode(os.urandom(30000)).decode() + "'\n"
    monkeypatch.setattr(commands, "load_agent_source", lambda: agent)
    code, out, err = broker.run(["create", EXAMPLE, "--out", str(tmp_path / "o"), "--embed-agent"])
    assert code == 1 and broker.spy.requests == [] and broker.api.journal.records == []
    assert broker.call("GET", "/v1/contexts") == {"contexts": []}
    assert err.startswith("ctxctl: error: user-data is ") and err.count("\n") == 1
    assert err.endswith("; without --embed-agent the VMs fetch the agent from the broker instead\n")


class AgentRoute(Resource):
    """The real API behind ``spy``, but ``GET /v1/agent`` answered here: ``status`` with ``agent``
    and an X-Ctxd-Agent-SHA256 of ``header`` (default: the agent's own); records the
    Authorization header each such request carried."""

    isLeaf = True

    def __init__(self, spy, agent=b"#!/usr/bin/env python3\nprint('served')\n", header=None, status=200):
        super().__init__()
        self.spy, self.agent, self.status = spy, agent, status
        self.header = header if header is not None else hashlib.sha256(agent).hexdigest()
        self.authorization = []

    def render(self, request):
        if request.path != b"/v1/agent":
            return self.spy.render(request)
        self.authorization.append(request.getHeader("authorization"))
        request.setResponseCode(self.status)
        if self.status == 404:
            request.setHeader(b"content-type", b"application/json")
            return json.dumps({"error": "not_found", "message": "no such resource"}).encode("utf-8")
        request.setHeader(b"content-type", b"text/x-python")
        request.setHeader(b"x-ctxd-agent-sha256", self.header.encode("ascii"))
        return self.agent


def test_create_pins_the_agent_the_broker_serves_without_sending_the_token(broker, tmp_path, agent):
    """The loader in create's user-data names the SHA-256 of the agent this broker serves (not
    ctxctl's own); GET /v1/agent is public: no token goes with it."""
    route = AgentRoute(broker.spy)
    code, out, err = broker.run(["create", EXAMPLE, "--out", str(tmp_path)], client=broker.stub(route))
    assert code == 0, err
    assert route.authorization == [None]
    for group in ("head", "compute"):
        loader = loader_of((tmp_path / f"{group}.user-data").read_bytes())
        assert f'SHA256 = "{hashlib.sha256(route.agent).hexdigest()}"'.encode() in loader
    assert "ctxctl: note" not in err


def test_create_embed_agent_puts_this_ctxctls_agent_in_the_user_data(broker, tmp_path, agent):
    """--embed-agent: the user-data carries the agent itself (as before the loader), and ctxctl
    does not ask the broker for its agent."""
    code, out, err = broker.run(["create", EXAMPLE, "--out", str(tmp_path), "--embed-agent"])
    assert code == 0, err
    assert [r[:2] for r in broker.spy.requests] == [("GET", "/v1/contexts"), ("POST", "/v1/contexts")]
    document = yaml.safe_load((tmp_path / "head.user-data").read_bytes())
    assert [(f["path"], f["permissions"]) for f in document["write_files"]] == [
        ("/usr/local/sbin/ctxagent.py", "0755"), (UNIT_PATH, "0644")]
    assert document["write_files"][0]["content"] == "print('agent')\n"
    assert document["runcmd"][-1] == ["python3", "/usr/local/sbin/ctxagent.py", "--bootstrap", "cloud-init"]


def test_create_on_a_broker_that_does_not_serve_its_agent_embeds_it(broker, tmp_path, agent):
    """A broker older than GET /v1/agent (404): a note, and the user-data embeds the agent."""
    code, out, err = broker.run(["create", EXAMPLE, "--out", str(tmp_path)],
                                client=broker.stub(AgentRoute(broker.spy, status=404)))
    assert code == 0, err
    assert err.splitlines()[0] == ("ctxctl: note: this broker does not serve its agent (GET /v1/agent answered "
                                   "404: an older ctxd); the user-data embeds the agent instead")
    paths = [f["path"] for f in yaml.safe_load((tmp_path / "compute.user-data").read_bytes())["write_files"]]
    assert paths == ["/usr/local/sbin/ctxagent.py", UNIT_PATH]


@pytest.mark.parametrize("route, message", [
    (dict(header="0" * 64), "broker: the agent from https://ctxd.test:8443/v1/agent does not have the SHA-256 "
                            "its X-Ctxd-Agent-SHA256 header says"),
    (dict(agent=b"<html>a proxy's page</html>"), "broker: the answer to https://ctxd.test:8443/v1/agent is not "
                                                 "the agent (a Python program)"),
    (dict(status=502), "broker: unexpected HTTP 502 answer from https://ctxd.test:8443/v1/agent"),
])
def test_create_refuses_an_agent_it_cannot_pin(broker, tmp_path, agent, route, message):
    """An agent whose header contradicts its bytes, something that is not an agent, or a failure:
    one line, and no context is created."""
    code, out, err = broker.run(["create", EXAMPLE, "--out", str(tmp_path / "o")],
                                client=broker.stub(AgentRoute(broker.spy, **route)))
    assert (code, out, err) == (1, "", f"ctxctl: error: {message}\n")
    assert broker.call("GET", "/v1/contexts") == {"contexts": []} and not (tmp_path / "o").exists()


def test_join_token_rotate_writes_the_same_kind_of_user_data(broker, tmp_path, agent):
    """join-token rotate: a loader of the broker's agent by default, the agent itself with --embed-agent."""
    cid, _ = broker.create()
    code, _, err = broker.run(["join-token", "rotate", cid, "compute", "--out", str(tmp_path / "a")])
    assert code == 0, err
    assert b'SHA256 = "' in loader_of((tmp_path / "a" / "compute.user-data").read_bytes())
    code, _, err = broker.run(["join-token", "rotate", cid, "compute", "--out", str(tmp_path / "b"), "--embed-agent"])
    assert code == 0, err
    document = yaml.safe_load((tmp_path / "b" / "compute.user-data").read_bytes())
    assert document["write_files"][0]["path"] == "/usr/local/sbin/ctxagent.py"


def test_status_table(broker):
    """status prints a header with the expiry, one row per group, one per node and per missing slot
    (with error messages), and counts."""
    cid, joins, nodes = broker.head_ok()
    nodes[2] = broker.enroll(cid, joins["compute"], 2)
    broker.report(cid, nodes[2], "error", exit_code=4, message="script 1-ipandhost/x exited 3", log_tail="boom\n")
    nodes[3] = broker.enroll(cid, joins["compute"], 3)
    broker.report(cid, nodes[3], "contextualizing")
    code, out, err = broker.run(["status", cid])
    assert (code, err) == (0, "")
    state = broker.status(cid)
    lines = out.splitlines()
    assert lines[0] == (f"context torque-demo ({cid}), revision {state['revision']}, locked, "
                        f"expires {utc(state['expires'])} (in 7d)")
    assert lines[0].endswith("expires 2025-12-02 15:36:40 UTC (in 7d)")
    assert [line.split() for line in lines[1:4]] == [
        ["GROUP", "TARGET", "MEMBERS", "DEPARTED", "LEASE"], ["head", "1", "1", "0", "-"],
        ["compute", "3", "2", "0", "-"]]
    assert lines[4].split() == ["GROUP", "NODE", "HOSTNAME", "IP", "STATE", "MESSAGE"]
    assert lines[5].split() == ["head", nodes[1], "node1", "10.9.0.1", "ok"]
    assert lines[6].split()[:5] == ["compute", nodes[2], "node2", "10.9.0.2", "error"]
    assert lines[6].endswith("script 1-ipandhost/x exited 3")
    assert lines[7].split() == ["compute", nodes[3], "node3", "10.9.0.3", "contextualizing"]
    assert lines[8].split() == ["compute", "-", "-", "-", "not", "enrolled"]
    assert lines[9] == ("4 expected, 3 enrolled, 1 contextualizing, 1 ok, 1 error; "
                        "complete: no, all_ok: no")
    assert len(lines) == 10


def test_status_shows_nat_sources_and_revoked_nodes_and_known_hosts_skips_them(broker):
    """A node whose requests came from another address than it claims shows both; a revoked node
    is listed among the departed nodes, frees its slot in the counts, and its keys leave known-hosts."""
    body = torque_cluster(source_check=False)
    cid, joins = broker.create(body)
    head = broker.enroll(cid, joins["head"], 1)
    nat = broker.api.enroll(cid, joins["compute"], 2, source="198.51.100.7")[1]["node_id"]
    broker.call("POST", f"/v1/contexts/{cid}/nodes/{head}/revoke", {})
    code, out, _ = broker.run(["status", cid])
    lines = out.splitlines()
    rows = {line.split()[1]: line.split() for line in lines[4:-1] if line.split()[1] != "-"}
    assert rows[nat][2:5] == ["node2", "10.9.0.2", "(from"] and rows[nat][5] == "198.51.100.7)"
    departed = lines.index(next(line for line in lines if line.split()[4:5] == ["DEPARTED"]))
    assert lines[departed + 1].split()[:5] == ["head", head, "node1", "10.9.0.1", "revoked"]
    assert lines[-1].startswith("4 expected, 1 enrolled,")
    assert sum(1 for line in lines if line.split()[-2:] == ["not", "enrolled"]) == 3
    code, out, _ = broker.run(["known-hosts", cid])
    assert code == 0 and "node1" not in out and "node2.cluster.test,node2,10.9.0.2 ssh-ed25519" in out


def test_status_json_is_the_brokers_json(broker):
    """status --json prints exactly the broker's object."""
    cid, nodes = broker.all_ok()
    code, out, err = broker.run(["status", cid, "--json"])
    assert code == 0 and json.loads(out) == broker.status(cid)


def test_status_escapes_terminal_control_characters(broker):
    """A hostile error message cannot send escape sequences to the terminal."""
    cid, joins = broker.create()
    nid = broker.enroll(cid, joins["head"], 1)
    broker.report(cid, nid, "error", exit_code=1, message="\x1b]0;pwned\x07oops\nx")
    code, out, err = broker.run(["status", cid])
    assert code == 0
    assert "\x1b" not in out and "\x07" not in out and "?]0;pwned?oops x" in out


def test_wait_all_ok_exits_0_with_ok_reports(broker, tmp_path):
    """wait long-polls the progress until all_ok (no request on a timer meanwhile), prints a line
    when the counts change, fetches the full status once and writes .ok reports from it."""
    cid, joins, nodes = broker.head_ok()
    broker.clock.callLater(2.5, broker.computes_ok, cid, joins, nodes)
    code, out, err = broker.run(["wait", cid, "--reports", str(tmp_path), "--interval", "1"])
    assert (code, out) == (0, "")
    progress = [line for line in err.splitlines() if line.startswith("[")]
    # The long-poll answers at the first change (compute 2 enrolled), the next one at once.
    assert progress == ["[##........] 1/4 ok, 0 error, 1/4 enrolled, 0s elapsed",
                        "[##........] 1/4 ok, 0 error, 2/4 enrolled, 2s elapsed",
                        "[##########] 4/4 ok, 0 error, 4/4 enrolled, 2s elapsed"]
    assert err.splitlines()[-1] == f"all 4 nodes ok; reports in {tmp_path / cid}"
    assert broker.requests_by_route(cid) == {"progress": 3, "status": 1}
    first, woken, last = broker.progress_uris(cid)
    assert first == f"/v1/contexts/{cid}/progress?since=-1&wait=30"
    assert woken.endswith("&wait=30") and woken != first and last != woken
    assert broker.spy.requests[-1][1] == f"/v1/contexts/{cid}"  # the status comes last
    reports = sorted(p.name for p in (tmp_path / cid).iterdir())
    assert reports == sorted([f"compute-node{n}-{nodes[n]}.ok" for n in (2, 3, 4)] + [
        f"head-node1-{nodes[1]}.ok"])
    text = (tmp_path / cid / f"compute-node4-{nodes[4]}.ok").read_text()
    assert f"node: {nodes[4]}\nstate: ok\n" in text and text.endswith("--- log tail ---\nfine\n")


def test_wait_progress_redraws_on_a_tty(broker, tmp_path):
    """On a TTY the progress bar is redrawn in place with carriage returns."""
    cid, joins, nodes = broker.head_ok()
    broker.clock.callLater(0.5, broker.computes_ok, cid, joins, nodes)
    err = TTY()
    code, _, _ = broker.run(["wait", cid, "--reports", str(tmp_path)], err=err)
    assert code == 0
    assert err.getvalue().startswith("\r[##........] 1/4 ok") and "\r[##########] 4/4 ok" in err.getvalue()


def test_wait_first_error_exits_1_with_log_tail_and_reports(broker, tmp_path):
    """On a node error wait exits 1, shows its group/id/hostname, message and log tail; writes every report."""
    cid, joins, nodes = broker.head_ok()
    nodes[2] = broker.enroll(cid, joins["compute"], 2, hostname="c2")
    broker.report(cid, nodes[2], "error", exit_code=4, message="script 1-ipandhost/torquemaster exited 3",
                  log_tail="line one\nline two\n")
    nodes[3] = broker.enroll(cid, joins["compute"], 3)
    broker.report(cid, nodes[3], "contextualizing")
    code, out, err = broker.run(["wait", cid, "--reports", str(tmp_path)])
    assert (code, out) == (1, "")
    assert f"node compute/{nodes[2]} (c2) failed: exit code 4: script 1-ipandhost/torquemaster exited 3" in err
    assert "line one\nline two\n" in err
    assert err.splitlines()[-1] == (f"ctxctl: error: node compute/{nodes[2]} (c2) reported an error: "
                                    "script 1-ipandhost/torquemaster exited 3")
    reports = sorted(p.name for p in (tmp_path / cid).iterdir())
    assert reports == sorted([f"compute-c2-{nodes[2]}.error", "compute-missing-1.did-not-report",
                              f"compute-node3-{nodes[3]}.pending", f"head-node1-{nodes[1]}.ok"])
    text = (tmp_path / cid / f"compute-c2-{nodes[2]}.error").read_text()
    assert "state: error\nhostname: c2\n" in text and "exit_code: 4\n" in text
    assert "message: script 1-ipandhost/torquemaster exited 3\n" in text
    assert text.endswith("--- log tail ---\nline one\nline two\n")


def test_wait_timeout_exits_3_naming_the_silent_nodes(broker, tmp_path):
    """When time runs out wait exits 3, says how many did not report, and writes did-not-report files."""
    cid, joins, nodes = broker.head_ok()
    nodes[2] = broker.enroll(cid, joins["compute"], 2)
    (tmp_path / cid).mkdir()
    (tmp_path / cid / "stale.ok").write_text("from an earlier run")
    code, out, err = broker.run(["wait", cid, "--reports", str(tmp_path), "--timeout", "5"])
    assert code == 3
    assert broker.clock.seconds() == T0 + 5
    assert err.splitlines()[-1] == ("ctxctl: error: timed out after 5 s: 3 of 4 nodes did not report "
                                    "(2 never enrolled, 1 enrolled but not finished)")
    reports = sorted(p.name for p in (tmp_path / cid).iterdir())
    assert reports == sorted(["compute-missing-1.did-not-report", "compute-missing-2.did-not-report",
                              f"compute-node2-{nodes[2]}.pending", f"head-node1-{nodes[1]}.ok"])


def test_wait_rides_out_a_broker_restart(broker, tmp_path):
    """After a first good poll, 503 answers (a broker restarting) are retried; wait still ends 0."""
    cid, joins, nodes = broker.head_ok()
    broker.clock.callLater(1.5, broker.computes_ok, cid, joins, nodes)  # while the broker is away
    outage = Outage(broker.resource, after=1, failures=3)
    code, out, err = broker.run(["wait", cid, "--reports", str(tmp_path)], client=broker.stub(outage))
    # The progress, a long-poll and two retries answered 503, the progress again, the status.
    assert code == 0 and outage.requests == 6
    assert err.splitlines() == [
        "[##........] 1/4 ok, 0 error, 1/4 enrolled, 0s elapsed",
        "broker: starting (internal_error, HTTP 503); retrying",
        "broker reachable again",
        "[##########] 4/4 ok, 0 error, 4/4 enrolled, 4s elapsed",
        f"all 4 nodes ok; reports in {tmp_path / cid}",
    ]


def recovered_wait_lines(reports, elapsed):
    """What `ctxctl wait` prints when the broker was unreachable once, between two polls (and
    all were ok ``elapsed`` after it started)."""
    return [
        "[##........] 1/4 ok, 0 error, 1/4 enrolled, 0s elapsed",
        f"cannot connect to {URL}: connection refused; retrying",
        "broker reachable again",
        f"[##########] 4/4 ok, 0 error, 4/4 enrolled, {elapsed} elapsed",
        f"all 4 nodes ok; reports in {reports}",
    ]


def test_wait_rides_out_refused_connections(broker, tmp_path):
    """After a first good poll, refused connections (the broker's process is down) are retried."""
    cid, joins, nodes = broker.head_ok()
    broker.clock.callLater(1.5, broker.computes_ok, cid, joins, nodes)
    refusing = Refusing(broker.stub(), after=1, failures=2)
    code, out, err = broker.run(["wait", cid, "--reports", str(tmp_path)], client=refusing)
    assert code == 0 and refusing.requests == 5 and broker.requests_by_route(cid) == {"progress": 2, "status": 1}
    assert err.splitlines() == recovered_wait_lines(tmp_path / cid, "3s")


def test_wait_fails_at_once_if_the_broker_was_never_reached(broker, tmp_path):
    """A broker unreachable at the first poll (likely a wrong URL) is an error, not a 30-minute wait."""
    cid, joins, nodes = broker.head_ok()
    outage = Outage(broker.resource, after=0, failures=1000)
    code, out, err = broker.run(["wait", cid, "--reports", str(tmp_path)], client=broker.stub(outage))
    assert code == 1 and err == "ctxctl: error: broker: starting (internal_error, HTTP 503)\n"
    assert outage.requests == 1 and broker.clock.seconds() == T0


def test_wait_warns_when_the_context_is_not_locked(broker, tmp_path):
    """An open context makes wait say (once, over several polls) that nodes wait for `ctxctl lock`."""
    cid, joins = broker.create(torque_cluster(open_for_injection=True))
    nodes = {n: broker.enroll(cid, joins[group], n)
             for n, group in ((1, "head"), (2, "compute"), (3, "compute"), (4, "compute"))}

    def deployer_locks_and_nodes_finish():
        gridmap = base64.b64encode(b"/CN=alice alice\n").decode()
        broker.call("PUT", f"/v1/contexts/{cid}/data/gridmap", {"values": [{"b64": gridmap}]})
        broker.call("POST", f"/v1/contexts/{cid}/lock")
        for n in (1, 2, 3, 4):
            broker.report(cid, nodes[n], "ok")

    broker.clock.callLater(2.5, deployer_locks_and_nodes_finish)
    code, out, err = broker.run(["wait", cid, "--reports", str(tmp_path)])
    assert code == 0 and broker.polls(cid) == 1
    assert err.count(f"nodes wait for `ctxctl lock {cid}`") == 1


def test_wait_gives_up_on_a_4xx(broker, tmp_path):
    """A 404 during wait (context deleted: its long-poll is answered 404, and so is its status) ends it
    at once with exit 1."""
    cid, joins = broker.create()
    broker.clock.callLater(1.5, broker.call, "DELETE", f"/v1/contexts/{cid}")  # during the long-poll
    code, out, err = broker.run(["wait", cid, "--reports", str(tmp_path)])
    assert code == 1 and broker.requests_by_route(cid) == {"progress": 2, "status": 1}
    assert broker.clock.seconds() == T0 + 1.5
    assert err == ("[..........] 0/4 ok, 0 error, 0/4 enrolled, 0s elapsed\n"
                   "ctxctl: error: broker: no such context (not_found, HTTP 404)\n")


def test_wait_rides_out_a_broker_restart_during_a_long_poll(broker, tmp_path):
    """A broker stopping answers the waiting long-poll 304; while it is down (refused connections) wait
    retries every --interval; back, it asks for the progress afresh and ends 0, with one status request."""
    cid, joins, nodes = broker.head_ok()
    broker.clock.callLater(2.0, broker.api.broker.shutdown)  # the long-poll has waited since 1 s
    broker.clock.callLater(2.5, broker.computes_ok, cid, joins, nodes)
    refusing = Refusing(broker.stub(), after=2, failures=2)
    code, out, err = broker.run(["wait", cid, "--reports", str(tmp_path)], client=refusing)
    assert code == 0 and refusing.requests == 6
    assert broker.requests_by_route(cid) == {"progress": 3, "status": 1}
    assert broker.progress_uris(cid)[-1] == f"/v1/contexts/{cid}/progress?since=-1&wait=30"
    assert err.splitlines() == recovered_wait_lines(tmp_path / cid, "4s")
    assert broker.api.broker.waiter_count() == 0


class OldBroker(Resource):
    """The real API behind ``spy`` without the progress route: what a broker from before it answers
    there (ctxd.api.match: 404 "no such resource", before any credential is looked at)."""

    isLeaf = True

    def __init__(self, spy):
        super().__init__()
        self.spy = spy
        self.refused = 0

    def render(self, request):
        if request.path.endswith(b"/progress"):
            self.refused += 1
            request.setResponseCode(404)
            request.setHeader(b"content-type", b"application/json")
            return json.dumps({"error": "not_found", "message": "no such resource"}).encode("utf-8")
        return self.spy.render(request)


def test_wait_polls_the_status_of_a_broker_without_the_progress_route(broker, tmp_path):
    """A broker too old for the progress route (404 for it, its status answers) is polled for its status
    every --interval seconds, as wait always did; the output is the same."""
    cid, joins, nodes = broker.head_ok()
    broker.clock.callLater(2.5, broker.computes_ok, cid, joins, nodes)
    old = OldBroker(broker.spy)
    code, out, err = broker.run(["wait", cid, "--reports", str(tmp_path), "--interval", "1"],
                                client=broker.stub(old))
    assert (code, out) == (0, "")
    assert old.refused == 1 and broker.polls(cid) == 4  # at 0, 1, 2 and 3 s
    assert err.splitlines() == ["[##........] 1/4 ok, 0 error, 1/4 enrolled, 0s elapsed",
                                "[##########] 4/4 ok, 0 error, 4/4 enrolled, 3s elapsed",
                                f"all 4 nodes ok; reports in {tmp_path / cid}"]


def test_wait_on_a_broker_without_the_progress_route_still_reports_a_missing_context(broker, tmp_path):
    """With an old broker a context that does not exist is still the status's 404, exit 1."""
    code, out, err = broker.run(["wait", "Z" * 22, "--reports", str(tmp_path)],
                                client=broker.stub(OldBroker(broker.spy)))
    assert (code, err) == (1, "ctxctl: error: broker: no such context (not_found, HTTP 404)\n")


def _wide_cluster(deployment, n, batches):
    """One group of ``n`` nodes that enroll and report ok in ``batches`` batches, 20 s apart."""
    cid, joins = deployment.create({"name": "wide", "groups": [{"name": "all", "quantity": n, "source_check": False}]})
    per = n // batches

    def batch(k):
        for i in range(k * per + 1, (k + 1) * per + 1):
            deployment.report(cid, deployment.enroll(cid, joins["all"], i), "ok")

    for k in range(batches):
        deployment.clock.callLater(20.0 * (k + 1), batch, k)
    return cid


def test_wait_fetches_the_full_status_once_however_many_nodes(tmp_path):
    """Nodes reporting over 80 s: wait makes the same requests for 200 nodes as for 8 - one full status,
    and a progress long-poll or two per change (none on a timer: not one per --interval)."""
    batches = 4
    seen = {}
    for n in (8, 200):
        deployment = Deployment()
        cid = _wide_cluster(deployment, n, batches)
        code, out, err = deployment.run(["wait", cid, "--reports", str(tmp_path / str(n))])
        assert code == 0 and err.splitlines()[-1].startswith(f"all {n} nodes ok"), err
        assert deployment.clock.seconds() == T0 + 20.0 * batches
        assert len(list((tmp_path / str(n) / cid).iterdir())) == n
        seen[n] = deployment.requests_by_route(cid)
    assert seen[8] == seen[200]
    assert seen[200]["status"] == 1 and seen[200]["progress"] <= 2 * batches + 1


def test_wait_asks_no_more_often_than_interval_while_nodes_keep_changing(tmp_path):
    """200 nodes reporting two at a time every half second for 50 s (a change at every step): wait
    asks for the progress about once per --interval, not once per change."""
    deployment = Deployment()
    cid, joins = deployment.create({"name": "storm", "groups": [{"name": "all", "quantity": 200,
                                                                  "source_check": False}]})

    def two(k):
        for i in (2 * k + 1, 2 * k + 2):
            deployment.report(cid, deployment.enroll(cid, joins["all"], i), "ok")

    for k in range(100):
        deployment.clock.callLater(0.5 * (k + 1), two, k)
    code, out, err = deployment.run(["wait", cid, "--reports", str(tmp_path), "--interval", "5"])
    assert code == 0 and deployment.clock.seconds() <= T0 + 50 + 5
    requests = deployment.requests_by_route(cid)
    assert requests["status"] == 1 and 10 <= requests["progress"] <= 50 / 5 + 3, requests


def test_known_hosts_prints_lines(broker):
    """known-hosts prints 'FQDN,SHORT,IP TYPE KEY' for every key of every node, nothing invalid."""
    cid, joins = broker.create()
    keys = ["ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAI0001", "ecdsa-sha2-nistp256 AAAAE2VjZHNh0001"]
    head = broker.enroll(cid, joins["head"], 1, ssh_host_keys=keys)
    evil = broker.enroll(cid, joins["compute"], 5, hostname="evil")

    def hostile(status):
        if "nodes" not in status:
            return status   # (the context's CAs: it has none)
        for node in status["nodes"]:
            if node["id"] == evil:
                node["identity"]["fqdn"] = "evil.test,*"
            else:
                node["identity"]["ssh_host_keys"].append("ssh-rsa AAAA\n* ssh-rsa AAAAinjected")
        return status

    code, out, err = broker.run(["known-hosts", cid], client=broker.stub(Tampered(broker, hostile)))
    assert code == 0
    assert out.splitlines() == [
        "node1.cluster.test,node1,10.9.0.1 ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAI0001",
        "node1.cluster.test,node1,10.9.0.1 ecdsa-sha2-nistp256 AAAAE2VjZHNh0001",
    ]
    assert err.splitlines() == [f"ctxctl: warning: node {head}: skipped an invalid host key",
                                f"ctxctl: warning: node {evil}: skipped, its hostname/fqdn/ip are not valid"]


def test_known_hosts_write_replaces_the_contexts_block(broker, tmp_path):
    """--write replaces this context's earlier block in place, keeps everything else, file 0600, dir 0700."""
    cid, joins = broker.create()
    broker.enroll(cid, joins["head"], 1, ssh_host_keys=["ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAI0001",
                                                        "ecdsa-sha2-nistp256 AAAAE2VjZHNh0001"])
    path = tmp_path / "new-dir" / "known_hosts"
    before = "\n".join([
        "github.com ssh-ed25519 AAAAgithub",
        f"# BEGIN ctxd (context {cid})",
        "old.example,old,10.0.0.9 ssh-ed25519 AAAAold",
        f"# END ctxd (context {cid})",
        "# BEGIN ctxd (context OtherContextxxxxxxxxxx)",
        "other ssh-rsa AAAAother",
        "# END ctxd (context OtherContextxxxxxxxxxx)",
        "last.example ssh-rsa AAAAlast",
    ]) + "\n"
    code, _, _ = broker.run(["known-hosts", cid, "--write", "--file", str(path)])
    assert code == 0
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    path.write_text(before)
    code, out, err = broker.run(["known-hosts", cid, "--write", "--file", str(path)])
    assert (code, out) == (0, "")
    assert path.read_text() == "\n".join([
        "github.com ssh-ed25519 AAAAgithub",
        f"# BEGIN ctxd (context {cid})",
        "node1.cluster.test,node1,10.9.0.1 ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAI0001",
        "node1.cluster.test,node1,10.9.0.1 ecdsa-sha2-nistp256 AAAAE2VjZHNh0001",
        f"# END ctxd (context {cid})",
        "# BEGIN ctxd (context OtherContextxxxxxxxxxx)",
        "other ssh-rsa AAAAother",
        "# END ctxd (context OtherContextxxxxxxxxxx)",
        "last.example ssh-rsa AAAAlast",
    ]) + "\n"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert [p.name for p in path.parent.iterdir()] == ["known_hosts"]  # no temp file left


def test_data_put_lock_delete_list(broker, tmp_path):
    """data put sends base64 values; lock, delete and list hit their routes; list prints a table."""
    done, _ = broker.all_ok()
    cid, _ = broker.create(torque_cluster(open_for_injection=True))
    value = tmp_path / "grid"
    value.write_bytes(b"\x00gridmap\n")
    code, out, err = broker.run(["data", "put", cid, "gridmap", str(value), str(value)])
    assert code == 0
    method, path, body, ctype = broker.spy.requests[-1]
    assert (method, path, ctype) == ("PUT", f"/v1/contexts/{cid}/data/gridmap", "application/json")
    assert json.loads(body) == {"values": [{"b64": base64.b64encode(b"\x00gridmap\n").decode()}] * 2}
    state = broker.status(cid)
    assert state["data"] == {"gridmap": {"values": 2, "bytes": 18}}
    assert err == f"data gridmap of context {cid}: 2 value(s), 18 bytes stored (revision {state['revision']})\n"
    code, out, err = broker.run(["lock", cid])
    assert (code, err) == (0, f"context {cid} locked\n")
    assert broker.spy.requests[-1][:3] == ("POST", f"/v1/contexts/{cid}/lock", b"{}")
    assert broker.status(cid)["locked"] is True
    code, out, err = broker.run(["data", "put", cid, "gridmap", str(value)])
    assert (code, err) == (1, "ctxctl: error: broker: the context is locked; data can no longer be "
                              "injected (context_locked, HTTP 409)\n")
    code, out, err = broker.run(["list"])
    expires = {c: utc(broker.status(c)["expires"]).split() for c in (done, cid)}
    assert code == 0 and [line.split() for line in out.splitlines()] == [
        ["ID", "NAME", "OK", "ERRORS", "STATE", "DATA", "EXPIRES"],
        [done, "torque-demo", "4/4", "0", "all", "ok", "locked", *expires[done]],
        [cid, "torque-demo", "0/4", "0", "pending", "locked", *expires[cid]],
    ]
    code, out, err = broker.run(["delete", cid])
    assert (code, out, err) == (0, "", f"deleted context {cid}\n")
    assert broker.spy.requests[-1][:2] == ("DELETE", f"/v1/contexts/{cid}")
    broker.call("GET", f"/v1/contexts/{cid}", expect=404)
    code, out, err = broker.run(["list"])
    assert code == 0 and [line.split()[0] for line in out.splitlines()] == ["ID", done]


def test_data_put_unknown_name(broker):
    """A broker 404 for an undeclared item is one line."""
    cid, _ = broker.create(torque_cluster(open_for_injection=True))
    code, _, err = broker.run(["data", "put", cid, "nope", os.devnull])
    assert (code, err) == (1, "ctxctl: error: broker: data item 'nope' is not declared in this context "
                              "(not_found, HTTP 404)\n")


def test_empty_lists_say_so(broker):
    """An empty list is a line saying so, not a header alone (which reads like a failure)."""
    assert broker.run(["list"])[:2] == (0, "no contexts yet\n")
    assert broker.run(["user", "list"])[:2] == (0, "no deployers yet\n")
    assert broker.run(["list", "--json"])[1] == '{\n  "contexts": []\n}\n'


def test_counts_agree_with_their_nouns():
    from ctxd.ctxctl.render import plural

    assert (plural(1, "group"), plural(2, "group"), plural(0, "node")) == ("1 group", "2 groups", "0 nodes")


def test_user_add_list_revoke(broker):
    """user add prints a deployer token that ctxctl can use (it sees only the deployer's own
    contexts); user list shows the deployer; after user revoke the token is refused."""
    theirs, _ = broker.create()  # the site admin's context
    code, out, err = broker.run(["user", "add", "alice"])
    token = out.strip()
    assert (code, out) == (0, token + "\n") and token.startswith(tokens.DEPLOYER)
    assert err.startswith("deployer alice added; the token above is shown only once")
    status, created = broker.api.call("POST", "/v1/contexts", token, torque_cluster())
    assert status == 201, created
    mine = created["context"]["id"]
    code, out, err = broker.run(["list"], token=token)
    assert code == 0 and [line.split()[0] for line in out.splitlines()] == ["ID", mine]
    code, out, err = broker.run(["status", theirs], token=token)
    assert (code, err) == (1, "ctxctl: error: broker: no such context (not_found, HTTP 404)\n")
    code, out, err = broker.run(["user", "list"])
    assert code == 0 and [line.split() for line in out.splitlines()] == [
        ["NAME", "ADDED", "REVOKED"], ["alice", *utc(T0).split(), "-"]]
    broker.clock.advance(60)
    code, out, err = broker.run(["user", "revoke", "alice"])
    assert (code, out, err) == (0, "", "deployer alice revoked\n")
    code, out, err = broker.run(["list"], token=token)
    assert code == 1 and err.startswith(
        "ctxctl: error: broker: unknown or revoked credential (unauthorized, HTTP 401)")
    code, out, err = broker.run(["user", "list"])
    assert out.splitlines()[1].split() == ["alice", *utc(T0).split(), *utc(T0 + 60).split()]


def test_user_commands_need_the_site_admin(broker):
    """A deployer's token cannot add deployers: one line with the broker's 403."""
    token = broker.call("POST", "/v1/users", {"name": "bob"}, expect=201)["token"]
    code, out, err = broker.run(["user", "add", "mallory"], token=token)
    assert (code, out) == (1, "")
    assert err == ("ctxctl: error: broker: this operation needs the site admin credential "
                   "(forbidden, HTTP 403)\n")
    assert [u["name"] for u in broker.call("GET", "/v1/users")["users"]] == ["bob"]


def test_watching_groups_get_watch_mode_user_data(broker, tmp_path, agent):
    """A group with a lease (its agents must watch) gets user-data that starts the agent in watch
    mode as a service; the others run it once at boot; a rotation keeps each group's mode."""
    cluster = tmp_path / "elastic.toml"
    cluster.write_text(open(EXAMPLE).read().replace("all_identities = true", 'all_identities = true\nlease = "10m"')
                       .replace("grid-mapfile", os.path.join(os.path.dirname(EXAMPLE), "grid-mapfile")))
    code, out, err = broker.run(["create", str(cluster), "--out", str(tmp_path / "out")])
    assert code == 0, err
    cid = out.strip()
    assert [(g["name"], g["lease"], g["watch"]) for g in broker.status(cid)["groups"]] == [
        ("head", None, False), ("compute", 600, True)]

    def unit_and_runcmd(path):
        document = yaml.safe_load(path.read_bytes())
        return document["write_files"][1]["content"], document["runcmd"]

    unit, runcmd = unit_and_runcmd(tmp_path / "out" / "compute.user-data")
    assert "--bootstrap cloud-init --watch" in unit and ["systemctl", "enable", "--now", "--no-block",
                                                          "ctxagent.service"] in runcmd
    unit, runcmd = unit_and_runcmd(tmp_path / "out" / "head.user-data")
    assert "--watch" not in unit and "Type=oneshot" in unit
    for group, watching in (("compute", True), ("head", False)):
        code, _, err = broker.run(["join-token", "rotate", cid, group, "--out", str(tmp_path / group)])
        assert code == 0, err
        assert ("--watch" in unit_and_runcmd(tmp_path / group / f"{group}.user-data")[0]) is watching


def test_join_token_rotate_writes_new_bootstrap(broker, tmp_path, agent):
    """join-token rotate writes the group's new bootstrap and user-data; the old join token no
    longer enrolls, the new one does."""
    cid, joins = broker.create()
    out_dir = tmp_path / "rotated"
    code, out, err = broker.run(["join-token", "rotate", cid, "compute", "--out", str(out_dir)])
    assert (code, out) == (0, "")
    assert err.splitlines()[-1].startswith("join token of group compute rotated: the old one no longer enrolls")
    assert sorted(p.name for p in out_dir.iterdir()) == ["compute.bootstrap.json", "compute.user-data"]
    bootstrap = json.loads((out_dir / "compute.bootstrap.json").read_text())
    assert read_bootstrap((out_dir / "compute.user-data").read_bytes()) == bootstrap
    assert (bootstrap["context_id"], bootstrap["group"]) == (cid, "compute")
    assert bootstrap["join_token"] != joins["compute"]
    assert broker.api.enroll(cid, joins["compute"], 2)[0] == 401
    assert broker.api.enroll(cid, bootstrap["join_token"], 2)[0] == 201


def test_node_revoke_stops_the_node(broker):
    """node revoke: the node's credential is refused from then on and status shows it revoked."""
    cid, joins = broker.create()
    nid = broker.enroll(cid, joins["compute"], 2)
    code, out, err = broker.run(["node", "revoke", cid, nid])
    assert (code, out, err) == (0, "", f"node {nid} of context {cid}: credential revoked\n")
    status, answer = broker.api.call("POST", f"/v1/contexts/{cid}/nodes/{nid}/report",
                                     broker.node_tokens[nid], {"state": "contextualizing"})
    assert status == 401, answer
    assert [n["revoked"] for n in broker.status(cid)["nodes"]] == [True]
    code, out, err = broker.run(["node", "revoke", cid, nid])
    assert (code, err) == (1, "ctxctl: error: broker: this node's credential is already revoked "
                              "(already_revoked, HTTP 409)\n")
