"""Deployers and ownership, revocation, rotation, quotas, rate limits, audit, deadlines."""

import json

import pytest
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport

from ctxd.api import make_site
from ctxd.audit import AuditLog
from ctxd.admission import ConnectionBudget, ConnectionLimiter, RateLimiter
from ctxd.model import SITE_ADMIN, Model, Quotas

from support import ADMIN_TOKEN, Client, identity, instance_key, make_broker, torque, torque_cluster


@pytest.fixture
def client(tmp_path):
    c = Client()
    c.broker.audit = AuditLog(str(tmp_path / "audit.log"), c.clock.seconds)
    c.audit_path = tmp_path / "audit.log"
    return c


def add_user(client, name):
    status, body = client.call("POST", "/v1/users", ADMIN_TOKEN, {"name": name})
    assert status == 201, body
    assert body["token"].startswith("ctxd_dep_") and len(body["token"]) >= len("ctxd_dep_") + 22
    return body["token"]


def create_as(client, token, body=None):
    status, created = client.call("POST", "/v1/contexts", token, body or torque_cluster())
    assert status == 201, created
    return created["context"]["id"], created


def test_deployer_sees_only_own_contexts(client):
    """A deployer lists and manages only its own contexts; the admin sees all."""
    alice, bob = add_user(client, "alice"), add_user(client, "bob")
    a, _ = create_as(client, alice)
    b, _ = create_as(client, bob)
    assert [c["id"] for c in client.call("GET", "/v1/contexts", alice)[1]["contexts"]] == [a]
    assert [c["id"] for c in client.call("GET", "/v1/contexts", bob)[1]["contexts"]] == [b]
    assert {c["id"] for c in client.call("GET", "/v1/contexts", ADMIN_TOKEN)[1]["contexts"]} == {a, b}
    assert client.call("GET", f"/v1/contexts/{a}", alice)[1]["owner"] == "alice"


def test_other_deployers_context_looks_missing(client):
    """Another deployer's context answers exactly like one that does not exist (404, same body)."""
    alice, bob = add_user(client, "alice"), add_user(client, "bob")
    a, _ = create_as(client, alice)
    missing = client.call("GET", f"/v1/contexts/{'Z' * 22}", bob)
    for method, path in (("GET", f"/v1/contexts/{a}"), ("DELETE", f"/v1/contexts/{a}"), ("POST", f"/v1/contexts/{a}/lock")):
        assert client.call(method, path, bob) == missing
    assert client.call("GET", f"/v1/contexts/{a}", alice)[0] == 200


def test_deployers_cannot_manage_users(client):
    """Only the site admin mints, lists and revokes deployer credentials."""
    alice = add_user(client, "alice")
    assert client.call("POST", "/v1/users", alice, {"name": "mallory"})[0] == 403
    assert client.call("GET", "/v1/users", alice)[0] == 403
    assert client.call("DELETE", "/v1/users/alice", alice)[0] == 403


def test_revoked_deployer_stops_at_once(client):
    """A revoked deployer credential is refused immediately; its contexts stay for the admin."""
    alice = add_user(client, "alice")
    a, _ = create_as(client, alice)
    assert client.call("DELETE", "/v1/users/alice", ADMIN_TOKEN) == (200, {"revoked": "alice"})
    assert client.call("GET", "/v1/contexts", alice)[0] == 401
    assert client.call("GET", f"/v1/contexts/{a}", ADMIN_TOKEN)[0] == 200
    users = client.call("GET", "/v1/users", ADMIN_TOKEN)[1]["users"]
    assert users[0]["name"] == "alice" and users[0]["revoked"] is not None
    again = add_user(client, "alice")
    assert client.call("GET", "/v1/contexts", again)[0] == 200


def test_node_revocation(client):
    """A revoked node credential stops working at once and its instance cannot re-enroll."""
    cid, joins, nodes = torque(client)
    nid, token = nodes[2]
    assert client.call("POST", f"/v1/contexts/{cid}/nodes/{nid}/revoke", ADMIN_TOKEN) == (200, {"revoked": nid})
    assert client.call("GET", f"/v1/contexts/{cid}/nodes/{nid}/view", token)[0] == 401
    status, body = client.enroll(cid, joins["compute"], 2)
    assert status == 403
    status = client.call("GET", f"/v1/contexts/{cid}", ADMIN_TOKEN)[1]
    assert next(n for n in status["nodes"] if n["id"] == nid)["revoked"] is True


def test_join_token_rotation(client):
    """After rotation the old join token enrolls nobody and the new one works."""
    cid, created = client.create()
    old = created["bootstraps"]["compute"]["join_token"]
    status, body = client.call("POST", f"/v1/contexts/{cid}/groups/compute/join-token", ADMIN_TOKEN)
    assert status == 200
    new = body["bootstrap"]["join_token"]
    assert new != old and body["bootstrap"]["context_id"] == cid and body["bootstrap"]["group"] == "compute"
    assert client.enroll(cid, old, 2)[0] == 401
    assert client.enroll(cid, new, 2)[0] == 201
    assert client.call("POST", f"/v1/contexts/{cid}/groups/nogroup/join-token", ADMIN_TOKEN)[0] == 404


def test_quotas():
    """Contexts per deployer, nodes per context and data bytes per context are capped (409)."""
    client = Client()
    client.broker.model.quotas = Quotas(contexts_per_deployer=1, nodes_per_context=4, data_bytes_per_context=64)
    alice = add_user(client, "alice")
    create_as(client, alice)
    status, body = client.call("POST", "/v1/contexts", alice, torque_cluster())
    assert (status, body["error"]) == (409, "quota_exceeded")
    big = torque_cluster()
    big["groups"][1]["quantity"] = 4
    assert client.call("POST", "/v1/contexts", ADMIN_TOKEN, big)[1]["error"] == "quota_exceeded"
    heavy = torque_cluster()
    heavy["data"]["gridmap"] = [{"b64": "A" * 100}]
    assert client.call("POST", "/v1/contexts", ADMIN_TOKEN, heavy)[1]["error"] == "quota_exceeded"
    opened, _ = create_as(client, ADMIN_TOKEN, torque_cluster(open_for_injection=True))
    status, body = client.call("PUT", f"/v1/contexts/{opened}/data/gridmap", ADMIN_TOKEN, {"values": [{"b64": "A" * 100}]})
    assert (status, body["error"]) == (409, "quota_exceeded")


def test_enrollment_rate_limit_per_source():
    """Past the per-address rate, enrollment answers 429 with Retry-After; nothing is enrolled."""
    client = Client()
    client.broker.enroll_by_source.per_minute = 3
    cid, created = client.create(torque_cluster(source_check=False))  # all from one NAT address
    join = created["bootstraps"]["compute"]["join_token"]
    statuses = [client.enroll(cid, join, n, source="192.0.2.1")[0] for n in (2, 3, 4)]
    assert statuses == [201, 201, 201]
    response = []
    d = client.stub.request(
        "POST", f"https://ctxd.test/v1/contexts/{cid}/enroll",
        headers={"Authorization": f"Bearer {join}", "Content-Type": "application/json", "X-Test-Source": "192.0.2.1"},
        data=json.dumps({"instance_key": instance_key(9), "identity": identity(9)}).encode(),
    )
    d.addCallback(response.append)
    client.stub.flush()
    assert response[0].code == 429
    assert int(response[0].headers.getRawHeaders("retry-after")[0]) > 0
    client.clock.advance(60)
    assert client.enroll(cid, join, 2, source="192.0.2.1")[0] == 200


def test_flood_from_one_address_does_not_block_others():
    """Bad enrollment attempts flooding from one address do not stop other addresses."""
    broker = make_broker()
    broker.enroll_by_source.per_minute = 10
    broker.enroll_by_token.per_minute = 20
    from support import result_of

    created = result_of(broker.create_context(SITE_ADMIN, torque_cluster()))
    join = created["bootstraps"]["compute"]["join_token"]
    refused = 0
    for _ in range(1000):
        try:
            broker.limit_enrollment("203.0.113.66", join)
        except Exception as e:
            assert type(e).__name__ == "TooManyRequests"
            refused += 1
    assert refused == 990
    # The flood used only 10 of the token's 20 per minute: other VMs still get in.
    for n in range(10):
        broker.limit_enrollment(f"198.51.100.{n}", join)


def test_audit_log_records_actions_and_failures_without_secrets(client):
    """Admin/deployer actions, enrollments, revocations and failed authentication are audited, with no secret."""
    alice = add_user(client, "alice")
    cid, created = create_as(client, alice)
    join = created["bootstraps"]["compute"]["join_token"]
    status, enrolled = client.enroll(cid, join, 2)
    client.call("POST", f"/v1/contexts/{cid}/nodes/{enrolled['node_id']}/revoke", alice)
    client.call("GET", "/v1/contexts", "ctxd_node_" + "x" * 43)
    client.call("GET", "/v1/contexts", "not a token")
    client.call("GET", "/v1/contexts")
    client.broker.audit.flush()   # refusals are counted, then written
    text = client.audit_path.read_text()
    entries = [json.loads(line) for line in text.splitlines()]
    actions = [(e["principal"], e["action"], e["outcome"]) for e in entries]
    assert ("admin", "add_user", 201) in actions
    assert ("deployer:alice", "create_context", 201) in actions
    assert (f"join:{cid}/compute", "enroll", 201) in actions
    assert ("deployer:alice", "revoke_node", 200) in actions
    failures = [e for e in entries if e["outcome"] == 401]
    assert [(e["credential"], e["count"]) for e in failures] == [("ctxd_node_", 1), ("malformed", 1), ("none", 1)]
    assert all(set(e) >= {"time", "principal", "action", "object", "source", "outcome"} for e in entries)
    for secret in (ADMIN_TOKEN, alice, join, enrolled["node_token"], instance_key(2)):
        assert secret not in text


def test_routine_agent_traffic_not_audited(client):
    """Node views and reports are not audit events (only failures are)."""
    cid, joins, nodes = torque(client)
    before = client.audit_path.read_text().count("\n")
    nid, token = nodes[2]
    client.call("GET", f"/v1/contexts/{cid}/nodes/{nid}/view", token)
    assert client.audit_path.read_text().count("\n") == before
    client.call("GET", f"/v1/contexts/{cid}/nodes/{nid}/view", nodes[3][1])
    client.broker.audit.flush()
    assert json.loads(client.audit_path.read_text().splitlines()[-1])["outcome"] == 403


def test_refusals_are_counted_not_written_one_by_one(client):
    """A thousand refused requests from one address add one line per kind per interval, with the
    count; an anonymous client cannot grow the audit log without bound."""
    before = client.audit_path.read_text().count("\n")
    for _ in range(1000):
        client.call("GET", "/v1/contexts", "ctxd_dep_" + "y" * 43)
    for _ in range(500):
        client.call("GET", "/v1/contexts")
    assert client.audit_path.read_text().count("\n") == before
    assert client.broker.audit.flush() == 2
    lines = [json.loads(line) for line in client.audit_path.read_text().splitlines()[before:]]
    assert [(e["credential"], e["outcome"], e["count"]) for e in lines] == [("ctxd_dep_", 401, 1000),
                                                                          ("none", 401, 500)]
    assert client.broker.audit.flush() == 0


def test_audit_log_is_reopened_for_logrotate(client):
    """After the file is moved away (logrotate without copytruncate), reopen() writes a new one."""
    add_user(client, "bob")
    rotated = client.audit_path.with_name("audit.log.1")
    client.audit_path.rename(rotated)
    client.broker.audit.reopen()
    add_user(client, "carol")
    assert [json.loads(line)["action"] for line in rotated.read_text().splitlines()] == ["add_user"]
    assert [json.loads(line)["action"] for line in client.audit_path.read_text().splitlines()] == ["add_user"]
    assert oct(client.audit_path.stat().st_mode & 0o777) == "0o600"


def test_node_text_reaches_the_log_without_control_characters():
    """An error message with escape sequences and newlines is logged with them escaped."""
    from ctxd.broker import loggable

    text = "boom\x1b[2J\x1b]0;pwned\x07\nFORGED LINE\r\t\u202e"
    shown = loggable(text)
    assert shown.isprintable() and "\\x1b" in shown and "\\n" in shown and "FORGED LINE" in shown
    assert len(loggable("x" * 10_000)) == 503


def channel(deadline):
    clock = Clock()
    site = make_site(make_broker(clock=clock), request_deadline=deadline)
    site.reactor = clock
    protocol = site.buildProtocol(None)
    transport = StringTransport()
    protocol.makeConnection(transport)
    return protocol, transport, clock


def test_slowloris_cut_off_by_absolute_deadline():
    """A client trickling a byte a second is cut off at the deadline, though it never goes idle."""
    protocol, transport, clock = channel(deadline=10)
    request = b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Pad: " + b"a" * 100
    for i in range(9):
        protocol.dataReceived(request[i:i + 1])
        clock.advance(1)
    assert not transport.disconnecting and not getattr(transport, "aborted", False)
    protocol.dataReceived(request[9:10])
    clock.advance(1)
    assert transport.disconnecting, "the deadline must cut the connection"


def test_prompt_requests_keep_the_connection():
    """A request received in time is answered, and the connection may carry the next one."""
    protocol, transport, clock = channel(deadline=10)
    protocol.dataReceived(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
    assert b"200 OK" in transport.value()
    clock.advance(9)
    assert not transport.disconnecting


def test_rate_limiter_windows():
    """A window allows per_minute hits, then reports the wait, then resets."""
    clock = Clock()
    limiter = RateLimiter(clock, 2)
    assert [limiter.hit("a"), limiter.hit("a")] == [None, None]
    clock.advance(15)
    assert limiter.hit("a") == 45
    assert limiter.hit("b") is None
    clock.advance(45)
    assert limiter.hit("a") is None
    limiter.prune()
    assert len(limiter) == 2
    clock.advance(60)
    limiter.prune()
    assert len(limiter) == 0


class _Address:
    def __init__(self, host):
        self.host = host


def test_connection_limiter_total_and_per_peer():
    """Connections past the total or per-address cap are refused; closing frees the slot."""
    from twisted.internet.protocol import Factory, Protocol

    budget = ConnectionBudget(max_total=3, max_per_peer=2)
    limiter = ConnectionLimiter(Factory.forProtocol(Protocol), budget)
    a1 = limiter.buildProtocol(_Address("10.0.0.1"))
    a2 = limiter.buildProtocol(_Address("10.0.0.1"))
    assert limiter.buildProtocol(_Address("10.0.0.1")) is None
    b1 = limiter.buildProtocol(_Address("10.0.0.2"))
    assert limiter.buildProtocol(_Address("10.0.0.3")) is None
    for p in (a1, a2, b1):
        p.makeConnection(StringTransport())
    a1.connectionLost(None)
    assert limiter.buildProtocol(_Address("10.0.0.3")) is not None
    assert budget.refused == 2


def test_connection_limiter_names_a_peer_by_its_host_else_its_text():
    """A listener's address without a host (a UNIX socket's) is one peer, named by its text."""
    from twisted.internet.address import UNIXAddress
    from twisted.internet.protocol import Factory, Protocol

    budget = ConnectionBudget(max_total=3, max_per_peer=1)
    limiter = ConnectionLimiter(Factory.forProtocol(Protocol), budget)
    first = limiter.buildProtocol(UNIXAddress(b"/run/ctxd.sock"))
    assert first is not None and first._ctxd_peer == str(UNIXAddress(b"/run/ctxd.sock"))
    assert limiter.buildProtocol(UNIXAddress(b"/run/ctxd.sock")) is None

    class Unformattable(_Address):   # an address with a host is never formatted (once per connection)
        def __str__(self):
            raise AssertionError("formatted")

    assert limiter.buildProtocol(Unformattable("10.0.0.9"))._ctxd_peer == "10.0.0.9"


def test_model_quotas_default_generous():
    """The default quotas fit a 10,000-node cluster."""
    assert Model().quotas.nodes_per_context >= 10_000


def test_client_certificate_names_a_deployer(client, monkeypatch):
    """With mutual TLS, a verified client certificate's name authenticates that active deployer only."""
    from ctxd.api import BrokerResource

    add_user(client, "alice")
    name = {"value": "alice"}
    monkeypatch.setattr(BrokerResource, "client_name", lambda self, request: name["value"])
    cid, _ = create_as(client, None)
    assert client.call("GET", f"/v1/contexts/{cid}", ADMIN_TOKEN)[1]["owner"] == "alice"
    name["value"] = "mallory"  # a certificate from the client CA, but no such deployer
    assert client.call("GET", "/v1/contexts")[0] == 401
    client.call("DELETE", "/v1/users/alice", ADMIN_TOKEN)
    name["value"] = "alice"
    assert client.call("GET", "/v1/contexts")[0] == 401


def test_connection_limits_fit_under_the_open_file_limit(monkeypatch):
    """The soft open-file limit is raised to the hard one; connections stay below it (room for the
    broker's own files) and one address gets at most half of them."""
    from ctxd import admission

    limit = {"now": (1024, 4096)}
    monkeypatch.setattr(admission.resource, "getrlimit", lambda which: limit["now"])
    monkeypatch.setattr(admission.resource, "setrlimit", lambda which, value: limit.update(now=value))
    fit = admission.fit_to_open_files(16000, 1024)
    assert (fit.soft_before, fit.soft, fit.hard, fit.total, fit.per_peer) == (1024, 4096, 4096, 4032, 1024)
    assert limit["now"] == (4096, 4096)
    limit["now"] = (1024, 1024)   # the shipped unit of old: one address could exhaust it
    fit = admission.fit_to_open_files(16000, 1024)
    assert (fit.total, fit.per_peer) == (1024 - admission.RESERVED_FILES, (1024 - admission.RESERVED_FILES) // 2)
