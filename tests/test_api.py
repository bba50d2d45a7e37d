"""The HTTP resource over in-memory connections (treq StubTreq) with a fake clock."""

import json

import pytest
import treq
from support import (
    ADMIN_TOKEN,
    BASE,
    Client,
    torque,
    identity,
    instance_key,
    make_broker,
    not_fired,
    result_of,
    torque_cluster,
)
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport

from ctxd import api
from ctxd.api import make_site
from ctxd.journal import FileJournal


@pytest.fixture
def client():
    return Client()


def test_health_needs_no_credential(client):
    """GET /healthz answers 200 without a credential."""
    assert client.call("GET", "/healthz") == (200, {"status": "ok", "version": "0.1.0"})


def test_create_returns_bootstraps(client):
    """Creating a context returns one bootstrap per group with URL, join token and CA."""
    cid, created = client.create()
    assert set(created["bootstraps"]) == {"head", "compute"}
    boot = created["bootstraps"]["compute"]
    assert boot["url"] == "https://ctxd.test:8443" and boot["context_id"] == cid
    assert boot["join_token"].startswith("ctxd_join_") and "BEGIN CERTIFICATE" in boot["ca_pem"]


@pytest.mark.parametrize(
    "token, status, code",
    [
        (None, 401, "unauthorized"),
        ("garbage", 401, "unauthorized"),
        ("ctxd_adm_" + "A" * 43, 401, "unauthorized"),
    ],
)
def test_admin_routes_need_admin(client, token, status, code):
    """Admin routes refuse a missing, malformed or unknown credential with 401."""
    got_status, body = client.call("GET", "/v1/contexts", token)
    assert (got_status, body["error"]) == (status, code) and body["message"]


def test_node_and_join_credentials_cannot_admin(client):
    """A node or join credential on an admin route gets 403 and changes nothing."""
    cid, joins, nodes = torque(client)
    for token in (joins["head"], nodes[1][1]):
        assert client.call("GET", f"/v1/contexts/{cid}", token)[0] == 403
        assert client.call("DELETE", f"/v1/contexts/{cid}", token)[0] == 403
        assert client.call("POST", "/v1/contexts", token, torque_cluster())[0] == 403
    assert client.call("GET", "/v1/contexts", ADMIN_TOKEN)[1]["contexts"][0]["counts"]["enrolled"] == 4


def test_node_reaches_only_its_own_node(client):
    """A node credential cannot read another node's view or report for it."""
    cid, joins, nodes = torque(client)
    other = nodes[2][0]
    assert client.call("GET", f"/v1/contexts/{cid}/nodes/{other}/view", nodes[1][1])[0] == 403
    assert client.call("POST", f"/v1/contexts/{cid}/nodes/{other}/report", nodes[1][1], {"state": "ok"})[0] == 403
    assert client.call("GET", f"/v1/contexts/{cid}/nodes/{other}/view", nodes[2][1])[0] == 200


def test_join_token_only_enrolls(client):
    """A join token cannot read views; a node token cannot enroll."""
    cid, joins, nodes = torque(client)
    nid = nodes[1][0]
    assert client.call("GET", f"/v1/contexts/{cid}/nodes/{nid}/view", joins["head"])[0] == 403
    status, body = client.enroll(cid, nodes[1][1], 9)
    assert status == 403


def test_join_token_of_other_context_refused(client):
    """A join token of one context does not enroll into another."""
    cid1, created1 = client.create()
    cid2, _ = client.create()
    status, body = client.enroll(cid2, created1["bootstraps"]["head"]["join_token"], 1)
    assert (status, body["error"]) == (403, "forbidden")


def test_enrollment_full_and_idempotent(client):
    """A 4th compute is refused (409); the same instance re-enrolls as the same node (200)."""
    cid, joins, nodes = torque(client)
    status, body = client.enroll(cid, joins["compute"], 5)
    assert (status, body["error"]) == (409, "enrollment_full")
    status, body = client.enroll(cid, joins["compute"], 2)
    assert status == 200 and body["node_id"] == nodes[2][0]
    # The old node token stopped working.
    assert client.call("GET", f"/v1/contexts/{cid}/nodes/{nodes[2][0]}/view", nodes[2][1])[0] == 401


@pytest.mark.parametrize(
    "kwargs, status, code",
    [
        (dict(raw=b"{not json"), 400, "bad_request"),
        (dict(raw=b"[1, 2]"), 400, "bad_request"),
        (dict(raw=b'{"name": NaN}'), 400, "bad_request"),
        (dict(body=torque_cluster(), ctype="text/plain"), 415, "unsupported_media_type"),
        (dict(body=dict(torque_cluster(), surprise=True)), 400, "bad_request"),
    ],
)
def test_bad_bodies_change_nothing(client, kwargs, status, code):
    """Malformed bodies get a 4xx JSON error and create nothing."""
    got_status, body = client.call("POST", "/v1/contexts", ADMIN_TOKEN, **kwargs)
    assert (got_status, body["error"]) == (status, code)
    assert client.call("GET", "/v1/contexts", ADMIN_TOKEN)[1] == {"contexts": []}
    assert client.journal.records == []


def test_form_bodies_are_not_parsed():
    """The JSON API never runs twisted.web's form/multipart parsers on a POST body."""
    from twisted.web.test.requesthelper import DummyChannel

    site = make_site(make_broker())
    channel = DummyChannel()
    channel.site = site
    request = site.requestFactory(channel)
    request.process = lambda: None
    body = b"b=2"
    request.requestHeaders.setRawHeaders(b"content-type", [b"application/x-www-form-urlencoded"])
    request.requestHeaders.setRawHeaders(b"authorization", [b"Bearer " + ADMIN_TOKEN.encode()])
    request.gotLength(len(body))
    request.handleContentChunk(body)
    request.requestReceived(b"POST", b"/v1/x?a=1", b"HTTP/1.1")
    assert request.args == {b"a": [b"1"]}
    assert request.content.read() == body


def test_unknown_route_and_method(client):
    """Unknown paths answer 404 and wrong methods 405, both as JSON."""
    assert client.call("GET", "/v2/nothing", ADMIN_TOKEN)[0] == 404
    assert client.call("PATCH", "/v1/contexts", ADMIN_TOKEN, {})[0] == 405
    assert client.call("GET", "/v1/contexts/not-an-id", ADMIN_TOKEN)[0] == 404


def test_long_poll_waits_and_wakes(client):
    """A view request with since=REV waits, and returns when the view changes."""
    cid, created = client.create()
    joins = {g: b["join_token"] for g, b in created["bootstraps"].items()}
    _, c2 = client.enroll(cid, joins["compute"], 2)
    path = f"/v1/contexts/{cid}/nodes/{c2['node_id']}/view"
    status, view = client.call("GET", path, c2["node_token"])
    assert status == 200 and view["complete"] is False
    pending = client.call_deferred("GET", f"{path}?since={view['revision']}&wait=30", c2["node_token"])
    client.stub.flush()
    assert not_fired(pending)
    assert client.broker.waiter_count() == 1
    _, head = client.enroll(cid, joins["head"], 1)
    client.stub.flush()
    status, woken = result_of(pending)
    assert status == 200 and woken["revision"] > view["revision"]
    # torquemaster is required ready: the head counts as enrolled, and is listed once ok.
    assert woken["waiting_for"][0] == "role torquemaster: 0 of 1 providers ok"
    assert woken["roles"]["torquemaster"]["providers"] == []
    assert client.broker.waiter_count() == 0
    for n in (3, 4):   # the head's view is complete once every compute enrolled
        assert client.enroll(cid, joins["compute"], n)[0] == 201
    _, view = client.call("GET", path, c2["node_token"])
    pending = client.call_deferred("GET", f"{path}?since={view['revision']}&wait=30", c2["node_token"])
    client.stub.flush()
    assert not_fired(pending)
    status, _ = client.call("POST", f"/v1/contexts/{cid}/nodes/{head['node_id']}/report", head["node_token"],
                            {"state": "ok"})
    assert status == 200
    client.stub.flush()
    status, woken = result_of(pending)
    assert status == 200
    assert woken["roles"]["torquemaster"]["providers"][0]["hostname"] == "node1"
    assert client.broker.waiter_count() == 0


def long_poll(client, cid, node):
    """``node`` (id, token) asks for its view past the revision it has; the request, unanswered."""
    nid, token = node
    path = f"/v1/contexts/{cid}/nodes/{nid}/view"
    _, view = client.call("GET", path, token)
    pending = client.call_deferred("GET", f"{path}?since={view['revision']}&wait=30", token)
    client.stub.flush()
    return pending


def test_long_poll_times_out_with_304(client):
    """With no change, a waiting view request ends with 304 after `wait` seconds."""
    cid, joins, nodes = torque(client)
    pending = long_poll(client, cid, nodes[2])
    client.clock.advance(29)
    client.stub.flush()
    assert not_fired(pending)
    client.clock.advance(1)
    client.stub.flush()
    assert result_of(pending) == (304, None)


def test_unrelated_change_does_not_wake(client):
    """A compute reporting progress does not wake the other computes' waiters."""
    cid, joins, nodes = torque(client)
    waits = [long_poll(client, cid, nodes[n]) for n in (3, 4)]
    nid, token = nodes[2]
    assert client.call("POST", f"/v1/contexts/{cid}/nodes/{nid}/report", token, {"state": "contextualizing"})[0] == 200
    assert all(not_fired(d) for d in waits)
    # The head's ok changes their ready requirement: now they wake.
    hid, htoken = nodes[1]
    client.call("POST", f"/v1/contexts/{cid}/nodes/{hid}/report", htoken, {"state": "ok"})
    for d in waits:
        status, view = result_of(d)
        assert status == 200 and view["complete"] is True


def test_delete_ends_waits_with_404(client):
    """Deleting a context answers its waiting agents with 404."""
    cid, joins, nodes = torque(client)
    pending = long_poll(client, cid, nodes[2])
    assert client.call("DELETE", f"/v1/contexts/{cid}", ADMIN_TOKEN) == (200, {"deleted": cid})
    assert result_of(pending)[0] == 404


def test_bad_wait_rejected(client):
    """wait outside 0..300 or a non-integer since is a 400."""
    cid, joins, nodes = torque(client)
    nid, token = nodes[2]
    path = f"/v1/contexts/{cid}/nodes/{nid}/view"
    assert client.call("GET", f"{path}?since=1&wait=3600", token)[0] == 400
    assert client.call("GET", f"{path}?since=1&wait=301", token)[0] == 400
    pending = client.call_deferred("GET", f"{path}?since=99&wait=300", token)   # the longest wait
    client.stub.flush()
    assert not_fired(pending) and client.broker.waiter_count() == 1
    client.clock.advance(300)
    client.stub.flush()
    assert result_of(pending) == (304, None)
    assert client.call("GET", f"{path}?since=abc", token)[0] == 400


def test_journal_holds_no_token(client):
    """The journal keeps only hashes: no admin, join or node token appears in it."""
    cid, joins, nodes = torque(client)
    text = json.dumps(client.journal.records)
    for secret in [ADMIN_TOKEN, *joins.values(), *(t for _, t in nodes.values()), instance_key(1)]:
        assert secret not in text


def test_data_injection_and_lock(client):
    """An open context takes data, then the lock completes the views."""
    cid, created = client.create(torque_cluster(open_for_injection=True))
    head_join = created["bootstraps"]["head"]["join_token"]
    _, head = client.enroll(cid, head_join, 1)
    path = f"/v1/contexts/{cid}/nodes/{head['node_id']}/view"
    assert client.call("POST", f"/v1/contexts/{cid}/lock", ADMIN_TOKEN)[0] == 409
    status, _ = client.call("PUT", f"/v1/contexts/{cid}/data/gridmap", ADMIN_TOKEN, {"values": [{"b64": "aGk="}]})
    assert status == 200
    assert client.call("PUT", f"/v1/contexts/{cid}/data/other", ADMIN_TOKEN, {"values": [{"b64": "aGk="}]})[0] == 404
    assert client.call("POST", f"/v1/contexts/{cid}/lock", ADMIN_TOKEN)[1]["locked"] is True
    view = client.call("GET", path, head["node_token"])[1]
    assert view["data"] == {"gridmap": [{"b64": "aGk="}]} and view["locked"] is True


def test_status_reports_errors(client):
    """The admin status shows a node's error with exit code, message and log tail."""
    cid, joins, nodes = torque(client)
    nid, token = nodes[3]
    client.call(
        "POST",
        f"/v1/contexts/{cid}/nodes/{nid}/report",
        token,
        {"state": "error", "exit_code": 4, "message": "script 1-ipandhost/x exited 3", "log_tail": "boom"},
    )
    status = client.call("GET", f"/v1/contexts/{cid}", ADMIN_TOKEN)[1]
    assert status["error_present"] is True and status["counts"]["error"] == 1
    node = next(n for n in status["nodes"] if n["id"] == nid)
    assert node["error"] == {"exit_code": 4, "message": "script 1-ipandhost/x exited 3"}
    assert node["log_tail"] == "boom"
    assert node["identity"]["source_address"] is not None


def _channel(max_body):
    site = make_site(make_broker(), max_body=max_body)
    channel = site.buildProtocol(None)
    transport = StringTransport()
    channel.makeConnection(transport)
    return channel, transport


def test_oversize_declared_body_refused_before_reading():
    """A declared Content-Length above the cap gets 413 and the connection closes, unread."""
    channel, transport = _channel(max_body=2048)
    channel.dataReceived(
        b"POST /v1/contexts HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b"Content-Length: 1000000\r\n\r\n" + b"x" * 100
    )
    assert transport.value().startswith(b"HTTP/1.1 413 ")
    assert b'"body_too_large"' in transport.value()
    assert transport.disconnecting


def test_oversize_chunked_body_refused():
    """A chunked body is counted as it arrives and refused past the cap."""
    channel, transport = _channel(max_body=2048)
    channel.dataReceived(
        b"POST /v1/contexts HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b"Authorization: Bearer " + ADMIN_TOKEN.encode() + b"\r\nTransfer-Encoding: chunked\r\n\r\n"
    )
    for _ in range(3):
        channel.dataReceived(b"400\r\n" + b"x" * 1024 + b"\r\n")
    assert transport.value().startswith(b"HTTP/1.1 413 ")
    assert transport.disconnecting


@pytest.mark.parametrize("authorization", [None, b"Bearer ctxd_dep_" + b"x" * 43, b"Bearer \xff\xfe", b"Basic abc"])
def test_a_body_without_a_known_credential_is_refused_before_it_is_read(authorization):
    """A body from no one (no, an unknown, an undecodable or a foreign credential) is answered 401 as
    soon as the headers are in: nothing of it is buffered, the connection closes, the refusal is counted."""
    channel, transport = _channel(max_body=1024 * 1024)
    broker = channel.site.resource.broker
    header = b"Authorization: " + authorization + b"\r\n" if authorization else b""
    channel.dataReceived(b"POST /v1/contexts HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                         + header + b"Content-Length: 1000000\r\n\r\n" + b"x" * 5000)
    assert transport.value().startswith(b"HTTP/1.1 401 ") and b'"unauthorized"' in transport.value()
    assert transport.disconnecting
    assert channel.requests[0].content.getvalue() == b""
    assert [count for count, _, _ in broker.audit._refusals.values()] == [1]


def test_a_known_credential_may_send_its_body():
    """The admin's body is read and answered by the route (201 here)."""
    channel, transport = _channel(max_body=1024 * 1024)
    body = json.dumps(torque_cluster()).encode()
    channel.dataReceived(b"POST /v1/contexts HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                         b"Authorization: Bearer " + ADMIN_TOKEN.encode() + b"\r\n"
                         b"Content-Length: %d\r\n\r\n" % len(body) + body)
    assert transport.value().startswith(b"HTTP/1.1 201 ")


def test_an_undecodable_authorization_header_is_a_401(client):
    """Bytes that are not ASCII in the Authorization header are a bad credential (401), not a 500."""
    d = client.stub.request("GET", BASE + "/v1/contexts", headers={b"Authorization": [b"Bearer \xff\xfe\xe9"]})
    client.stub.flush()
    assert result_of(d).code == 401


def test_expired_context_is_swept_and_journaled(client):
    """After its expiry a context is deleted by the sweeper, and the deletion is journaled."""
    body = torque_cluster()
    body["expires_in"] = 3600
    cid, _ = client.create(body)
    client.clock.advance(3599)
    client.broker.sweep_expired()
    assert client.call("GET", f"/v1/contexts/{cid}", ADMIN_TOKEN)[0] == 200
    client.clock.advance(1)
    assert client.call("GET", f"/v1/contexts/{cid}", ADMIN_TOKEN)[0] == 404
    client.broker.sweep_expired()
    assert client.journal.records[-1]["op"] == "delete"
    assert client.journal.records[-1]["reason"] == "expired"
    assert cid not in client.broker.model.contexts


class ManualJournal(FileJournal):
    """A file journal whose write+sync completes only when the test says so."""

    def __init__(self, path):
        self.calls = []
        super().__init__(path, self._defer)

    def _defer(self, f, *args):
        d = Deferred()
        self.calls.append((f, args, d))
        return d

    def complete(self, error=None):
        f, args, d = self.calls.pop(0)
        if error is None:
            d.callback(f(*args))
        else:
            d.errback(error)


@pytest.fixture
def manual(tmp_path):
    client = Client()
    client.journal = ManualJournal(str(tmp_path / "journal.log"))
    client.journal.load()
    client.broker.journal = client.journal
    fatal = []
    client.broker.on_fatal = lambda: fatal.append(True)
    client.fatal = fatal
    return client


def settle(client):
    while client.journal.calls:
        client.journal.complete()
        client.stub.flush()


def test_reads_wait_until_what_they_show_is_durable(manual):
    """A view showing a change is not sent before that change is on disk."""
    d = manual.call_deferred("POST", "/v1/contexts", ADMIN_TOKEN, torque_cluster())
    settle(manual)
    created = result_of(d)[1]
    cid = created["context"]["id"]
    joins = {g: b["join_token"] for g, b in created["bootstraps"].items()}
    d = manual.call_deferred(
        "POST", f"/v1/contexts/{cid}/enroll", joins["compute"],
        {"instance_key": instance_key(2), "identity": identity(2)}, source="10.9.0.2",
    )
    settle(manual)
    node = result_of(d)[1]
    path = f"/v1/contexts/{cid}/nodes/{node['node_id']}/view"
    # The head enrolls: applied at once, but its fsync has not returned.
    head = manual.call_deferred(
        "POST", f"/v1/contexts/{cid}/enroll", joins["head"],
        {"instance_key": instance_key(1), "identity": identity(1)}, source="10.9.0.1",
    )
    manual.stub.flush()
    assert not_fired(head)
    view = manual.call_deferred("GET", path, node["node_token"])
    manual.stub.flush()
    assert not_fired(view), "a view showing the un-synced head must wait for the sync"
    settle(manual)
    assert [p["hostname"] for p in result_of(view)[1]["all_identities"]] == ["node2", "node1"]
    assert result_of(head)[0] == 201


def test_cancelled_commit_still_wakes_waiters(client):
    """When the client whose report woke others goes away, the others still wake."""
    cid, joins, nodes = torque(client)
    waiting = long_poll(client, cid, nodes[2])
    hid, htoken = nodes[1]
    record = client.broker.model.prepare_report(cid, hid, {"state": "ok"}, client.broker.now())
    commit = client.broker._commit(record)
    commit.cancel()
    client.stub.flush()
    status, woken = result_of(waiting)
    assert status == 200 and woken["complete"] is True


def test_journal_failure_is_fatal_and_unacknowledged(manual):
    """A failed fsync answers 503, acknowledges nothing after it, and stops the broker."""
    d = manual.call_deferred("POST", "/v1/contexts", ADMIN_TOKEN, torque_cluster())
    manual.stub.flush()
    manual.journal.complete(error=OSError(5, "Input/output error"))
    manual.stub.flush()
    assert result_of(d)[0] == 503
    assert manual.fatal == [True]
    later = manual.call_deferred("POST", "/v1/contexts", ADMIN_TOKEN, torque_cluster())
    manual.stub.flush()
    assert result_of(later)[0] == 503


def test_one_wait_per_node(client):
    """A node's second long-poll ends its first with 304: a node cannot pile up waits."""
    cid, joins, nodes = torque(client)
    first = long_poll(client, cid, nodes[2])
    second = long_poll(client, cid, nodes[2])
    assert result_of(first) == (304, None)
    assert not_fired(second)
    assert client.broker.waiter_count() == 1


def test_lone_surrogates_refused(client):
    """Strings no UTF-8 reader can print (lone surrogates) are refused with 400."""
    cid, joins, nodes = torque(client)
    nid, token = nodes[2]
    status, body = client.call(
        "POST", f"/v1/contexts/{cid}/nodes/{nid}/report", token,
        raw=b'{"state": "error", "message": "\\ud800"}',
    )
    assert (status, body["error"]) == (400, "bad_request")


def test_other_credentials_cannot_probe_node_ids(client):
    """A join or node credential gets 403 for any node but its own, existing or not."""
    cid, joins, nodes = torque(client)
    for token in (joins["compute"], nodes[3][1]):
        assert client.call("GET", f"/v1/contexts/{cid}/nodes/{nodes[2][0]}/view", token)[0] == 403
        assert client.call("GET", f"/v1/contexts/{cid}/nodes/{'A' * 22}/view", token)[0] == 403


def _fat_identities_cluster(n):
    return {"name": "fat", "groups": [{"name": "all", "quantity": n, "source_check": False, "provides": ["member"],
                                       "requires": [{"role": "member"}], "all_identities": True}]}


def test_large_view_is_streamed_whole_and_equal_to_the_model(monkeypatch):
    """A view above STREAM_ABOVE goes out slice by slice through a producer: the client
    gets exactly the model's view, with a Content-Length (no chunked framing)."""
    monkeypatch.setattr(api._BodyProducer, "SLICE", 4096)   # many slices from a small cluster
    client = Client()
    n = 12
    cid, created = client.create(_fat_identities_cluster(n))
    join = created["bootstraps"]["all"]["join_token"]
    def fat_keys(i):  # every node's own: SSH host keys are unique in a context
        return [f"ssh-rsa {i:04d}{k:04d}" + "A" * 3992 for k in range(3)]

    nodes = [client.enroll(cid, join, i, ssh_host_keys=fat_keys(i))[1] for i in range(1, n + 1)]
    first = nodes[0]
    path = f"/v1/contexts/{cid}/nodes/{first['node_id']}/view"
    d = client.stub.request("GET", BASE + path, headers={"Authorization": f"Bearer {first['node_token']}"})
    client.stub.flush()
    response = result_of(d)
    body = result_of(treq.content(response))
    assert len(body) > api.STREAM_ABOVE
    assert response.length == len(body)   # from Content-Length (chunked framing would leave it unknown)
    node = client.broker.model.contexts[cid].nodes[first["node_id"]]
    assert json.loads(body) == client.broker.model.view(node)
    assert len(json.loads(body)["all_identities"]) == n


def test_view_json_shares_the_group_part_between_nodes():
    client = Client()
    cid, created = client.create(_fat_identities_cluster(4))
    join = created["bootstraps"]["all"]["join_token"]
    for i in (1, 2, 3):
        client.enroll(cid, join, i)
    model = client.broker.model
    a, b = list(model.contexts[cid].nodes.values())[:2]
    va, vb = model.view_json(a), model.view_json(b)
    assert va.chunks[0] is vb.chunks[0]   # rendered once for the group
    assert json.loads(bytes(va)) == model.view(a) and json.loads(bytes(vb)) == model.view(b)
    assert model.view_json(a).chunks[0] is va.chunks[0]   # nothing changed: not rendered again
    client.enroll(cid, join, 4)
    after = model.view_json(a)
    assert after.chunks[0] is not va.chunks[0]
    assert len(json.loads(bytes(after))["all_identities"]) == 4


class _FakeStreamRequest:
    """What _BodyProducer uses of a request, recording everything."""

    def __init__(self):
        self.written, self.finished, self.producer = [], False, None
        self.channel = type("Channel", (), {})()
        self.channel.transport = StringTransport()
        self.aborted = []
        self.channel.transport.abortConnection = lambda: self.aborted.append(True)

    def registerProducer(self, producer, streaming):
        assert streaming
        self.producer = producer

    def unregisterProducer(self):
        self.producer = None

    def write(self, data):
        self.written.append(data)
        if len(self.written) == 2:
            self.producer.pauseProducing()   # the transport's buffer is full

    def finish(self):
        self.finished = True


def _stream(chunks, stall=120.0):
    clock, request = Clock(), _FakeStreamRequest()
    producer = api._BodyProducer(request, chunks, clock, stall)
    producer.SLICE = 10
    producer.start()
    return clock, request, producer


def test_streamed_body_is_written_in_slices_and_finished():
    clock, request, producer = _stream([b"a" * 25, b"b" * 5])
    assert request.written == [b"a" * 10, b"a" * 10] and not request.finished   # paused
    producer.resumeProducing()
    assert b"".join(request.written) == b"a" * 25 + b"b" * 5
    assert request.finished and request.producer is None
    assert clock.getDelayedCalls() == [] and request.aborted == []


def test_reader_that_stops_reading_is_cut_after_the_idle_timeout():
    """The channel's idle timer is off while a response is unfinished: the producer's own
    timer cuts a connection paused (nothing read) for the whole timeout."""
    clock, request, producer = _stream([b"x" * 100], stall=120.0)
    clock.advance(119)
    assert request.aborted == []
    clock.advance(1)
    assert request.aborted == [True]
    assert not request.finished


def test_a_reader_that_drains_keeps_its_connection():
    clock, request, producer = _stream([b"x" * 100], stall=120.0)
    clock.advance(100)
    producer.resumeProducing()   # the reader took the buffer: the timer restarts from zero
    clock.advance(100)
    assert request.aborted == [] and request.finished


def test_stop_producing_cancels_the_stall_timer():
    clock, request, producer = _stream([b"x" * 100])
    producer.stopProducing()   # the connection went away
    assert clock.getDelayedCalls() == []
    producer.resumeProducing()
    assert not request.finished and len(request.written) == 2


def test_every_domain_error_has_its_status():
    """api.STATUS answers every RequestError subclass with a 4xx or 5xx, and nothing else sets one."""
    from ctxd import errors

    classes = [c for c in vars(errors).values() if isinstance(c, type) and issubclass(c, errors.RequestError)]
    assert set(classes) == set(api.STATUS), "a domain error without its own status (or a status for nothing)"
    for cls in classes:
        error = cls("x", 1) if cls is errors.TooManyRequests else cls("x")
        assert 400 <= api.status_of(error) < 600 and not hasattr(error, "status")
    expected = {"RequestError": 400, "BadRequest": 400, "InvalidName": 400, "InvalidCluster": 400,
                "Unauthorized": 401, "Forbidden": 403, "NotFound": 404, "MethodNotAllowed": 405, "Conflict": 409,
                "QuotaExceeded": 409, "IdentityConflict": 409, "IdentityRefused": 403, "CertificateRefused": 403, "JoinTokenExpired": 410, "TooLarge": 413, "UnsupportedMediaType": 415,
                "TooManyRequests": 429, "InternalError": 500, "Unavailable": 503}
    assert {cls.__name__: status for cls, status in api.STATUS.items()} == expected
