"""GET /v1/contexts/{cid}/progress: a context's counts, lock and oldest error, long-polled.

The real resource over StubTreq with a fake clock (tests/support.py), as the view's long-poll
tests in test_api.py; and the model, for what the progress costs and how it is replayed.
"""

import pytest
from support import (
    ADMIN_TOKEN,
    Client,
    held_request,
    identity,
    model_state,
    not_fired,
    replay_records,
    result_of,
    torque,
    torque_cluster,
)
from twisted.internet.error import ConnectionDone
from twisted.python.failure import Failure

from ctxd.model import FIRST_ERROR_MESSAGE, SITE_ADMIN


@pytest.fixture
def client():
    return Client()


def path(cid, query=""):
    return f"/v1/contexts/{cid}/progress" + (f"?{query}" if query else "")


def progress(client, cid, token=ADMIN_TOKEN):
    status, body = client.call("GET", path(cid), token)
    assert status == 200, body
    return body


def pending_progress(client, cid, since, token=ADMIN_TOKEN, wait=30):
    """A progress long-poll past ``since``, unanswered."""
    d = client.call_deferred("GET", path(cid, f"since={since}&wait={wait}"), token)
    client.stub.flush()
    assert not_fired(d)
    return d


def report(client, cid, node, state, **fields):
    nid, token = node
    status, body = client.call("POST", f"/v1/contexts/{cid}/nodes/{nid}/report", token, dict(fields, state=state))
    assert status == 200, body


def test_progress_answers_at_once_without_since_or_with_since_minus_1(client):
    """Without since, or with since=-1, the progress comes at once: the status's counts and flags, the lock, no error."""
    cid, joins, nodes = torque(client)
    status = client.call("GET", f"/v1/contexts/{cid}", ADMIN_TOKEN)[1]
    first = progress(client, cid)
    assert first == {
        "id": cid, "revision": first["revision"], "locked": True, "counts": status["counts"],
        "complete": True, "all_ok": False, "error_present": False, "first_error": None, "waiting": None,
    }
    assert isinstance(first["revision"], int)
    assert client.call("GET", path(cid, "since=-1&wait=30"), ADMIN_TOKEN) == (200, first)
    assert client.broker.waiter_count() == 0
    assert b'ctxd_requests_total{route="get_progress",status="200"} 2.0' in client.broker.metrics.exposition()


def test_progress_waits_and_answers_304_when_nothing_changes(client):
    """With since equal to the current revision the request waits `wait` seconds, then answers 304 and
    leaves no waiter and no timer behind."""
    cid, joins, nodes = torque(client)
    revision = progress(client, cid)["revision"]
    pending = pending_progress(client, cid, revision)
    assert client.broker.waiter_count() == 1
    client.clock.advance(29)
    client.stub.flush()
    assert not_fired(pending)
    client.clock.advance(1)
    client.stub.flush()
    assert result_of(pending) == (304, None)
    assert client.broker.waiter_count() == 0 and client.clock.getDelayedCalls() == []
    assert client.call("GET", path(cid, f"since={revision}&wait=0"), ADMIN_TOKEN) == (304, None)


def test_progress_wakes_on_a_node_report(client):
    """A node's error report answers the waiting request at once with the new counts and the error."""
    cid, joins, nodes = torque(client)
    before = progress(client, cid)
    pending = pending_progress(client, cid, before["revision"])
    report(client, cid, nodes[3], "error", exit_code=4, message="script 1-ipandhost/x exited 3", log_tail="boom")
    status, woken = result_of(pending)
    assert status == 200 and woken["revision"] > before["revision"]
    assert woken["counts"]["error"] == 1 and woken["error_present"] is True
    assert woken["first_error"] == {
        "node_id": nodes[3][0], "group": "compute", "hostname": "node3", "exit_code": 4,
        "message": "script 1-ipandhost/x exited 3", "error_at": client.clock.seconds(),
    }
    assert client.broker.waiter_count() == 0


def test_progress_is_not_woken_by_changes_it_does_not_show(client):
    """An identity update, a data item and another context's report leave the progress (and its
    revision) unchanged: its waiter sleeps on; the lock changes it and wakes it."""
    cid, created = client.create(torque_cluster(open_for_injection=True))
    node = client.enroll(cid, created["bootstraps"]["compute"]["join_token"], 2)[1]
    node = (node["node_id"], node["node_token"])
    report(client, cid, node, "contextualizing")
    other, _, other_nodes = torque(client)
    before = progress(client, cid)
    pending = pending_progress(client, cid, before["revision"])

    status, _ = client.call("PUT", f"/v1/contexts/{cid}/nodes/{node[0]}/identity", node[1],
                            dict(identity(2), hostname="renamed"), source="10.9.0.2")
    assert status == 200
    assert client.call("PUT", f"/v1/contexts/{cid}/data/gridmap", ADMIN_TOKEN, {"values": [{"b64": "aGk="}]})[0] == 200
    report(client, other, other_nodes[2], "error", message="elsewhere")
    client.stub.flush()
    assert not_fired(pending) and progress(client, cid) == before

    assert client.call("POST", f"/v1/contexts/{cid}/lock", ADMIN_TOKEN)[0] == 200
    status, woken = result_of(pending)
    assert status == 200 and woken["locked"] is True and woken["revision"] > before["revision"]


def test_progress_is_for_the_owner_and_the_site_admin(client):
    """The owner and the site admin read it; another deployer gets the 404 of a missing context;
    node and join tokens 403; no credential 401."""
    alice = client.call("POST", "/v1/users", ADMIN_TOKEN, {"name": "alice"})[1]["token"]
    bob = client.call("POST", "/v1/users", ADMIN_TOKEN, {"name": "bob"})[1]["token"]
    status, created = client.call("POST", "/v1/contexts", alice, torque_cluster())
    cid = created["context"]["id"]
    join = created["bootstraps"]["compute"]["join_token"]
    node_token = client.enroll(cid, join, 2)[1]["node_token"]
    assert progress(client, cid, alice) == progress(client, cid, ADMIN_TOKEN)
    missing = client.call("GET", path("Z" * 22), bob)
    assert missing[0] == 404 and client.call("GET", path(cid), bob) == missing
    assert client.call("GET", path(cid, "since=1&wait=30"), bob) == missing
    for token in (node_token, join):
        status, body = client.call("GET", path(cid), token)
        assert (status, body["error"]) == (403, "forbidden")
    assert client.call("GET", path(cid))[0] == 401
    assert client.broker.waiter_count() == 0


@pytest.mark.parametrize("query", ["since=abc", "since=1.5", "since=", "wait=x", "since=1&wait=301",
                                   "since=1&wait=-1", "wait=3600"])
def test_progress_refuses_bad_parameters(client, query):
    """since and wait must be integers, wait from 0 to 300: else 400 bad_request, and nothing waits."""
    cid, joins, nodes = torque(client)
    status, body = client.call("GET", path(cid, query), ADMIN_TOKEN)
    assert (status, body["error"]) == (400, "bad_request") and body["message"]
    assert client.broker.waiter_count() == 0


def test_progress_waiter_goes_with_its_client(client):
    """A client that disconnects while waiting takes its waiter and its timer with it."""
    cid, joins, nodes = torque(client)
    revision = progress(client, cid)["revision"]
    channel, transport = held_request(client, path(cid, f"since={revision}&wait=30"), ADMIN_TOKEN)
    assert client.broker.waiter_count() == 1 and transport.value() == b""
    channel.connectionLost(Failure(ConnectionDone()))
    assert client.broker.waiter_count() == 0 and client.clock.getDelayedCalls() == []
    report(client, cid, nodes[2], "error")  # nothing left to wake
    assert transport.value() == b""


def test_cancelled_progress_long_poll_leaves_nothing(client):
    """Cancelling the broker's Deferred (what the resource does when the client goes away) drops the waiter."""
    cid, joins, nodes = torque(client)
    ctx = client.broker.model.contexts[cid]
    d = client.broker.get_progress(SITE_ADMIN, cid, ctx.progress_rev, 30)
    assert not_fired(d) and client.broker.waiter_count() == 1
    d.cancel()
    assert client.broker.waiter_count() == 0 and client.clock.getDelayedCalls() == []


def test_progress_waits_end_with_404_on_delete_and_304_on_shutdown(client):
    """Deleting the context answers its progress waiters 404; a broker shutting down answers them 304."""
    cid, joins, nodes = torque(client)
    other, _, _ = torque(client)
    deleted = pending_progress(client, cid, progress(client, cid)["revision"])
    stopping = pending_progress(client, other, progress(client, other)["revision"])
    assert client.call("DELETE", f"/v1/contexts/{cid}", ADMIN_TOKEN)[0] == 200
    assert result_of(deleted)[0] == 404 and not_fired(stopping)
    client.broker.shutdown()
    client.stub.flush()
    assert result_of(stopping) == (304, None)
    assert client.broker.waiter_count() == 0 and client.clock.getDelayedCalls() == []


def test_first_error_is_the_oldest_error_of_a_member(client):
    """first_error names the member that has been in error longest; a new attempt or a revocation
    passes it to the next; its message is cut to FIRST_ERROR_MESSAGE characters."""
    cid, joins, nodes = torque(client)
    report(client, cid, nodes[4], "error", exit_code=2, message="x" * 4096)
    client.clock.advance(1)
    report(client, cid, nodes[2], "error", exit_code=3, message="second")
    first = progress(client, cid)["first_error"]
    assert (first["node_id"], first["exit_code"]) == (nodes[4][0], 2)
    assert first["message"] == "x" * FIRST_ERROR_MESSAGE
    report(client, cid, nodes[4], "contextualizing")  # a new attempt
    assert progress(client, cid)["first_error"]["node_id"] == nodes[2][0]
    report(client, cid, nodes[4], "error", message="again")
    assert progress(client, cid)["first_error"]["node_id"] == nodes[2][0]
    assert client.call("POST", f"/v1/contexts/{cid}/nodes/{nodes[2][0]}/revoke", ADMIN_TOKEN)[0] == 200
    after = progress(client, cid)
    assert after["first_error"]["node_id"] == nodes[4][0] and after["counts"]["error"] == 1
    report(client, cid, nodes[4], "contextualizing")
    assert progress(client, cid)["first_error"] is None


def test_a_new_message_of_the_first_error_moves_the_revision(client):
    """The oldest error reporting again with another message changes the progress (and wakes it)."""
    cid, joins, nodes = torque(client)
    report(client, cid, nodes[2], "error", message="one")
    before = progress(client, cid)
    pending = pending_progress(client, cid, before["revision"])
    report(client, cid, nodes[2], "error", message="two")
    status, woken = result_of(pending)
    assert status == 200 and woken["first_error"]["message"] == "two" and woken["counts"] == before["counts"]


class _NoWalking(dict):
    """A context's node table that may be looked up but not walked."""

    def __iter__(self):
        raise AssertionError("walked the nodes")

    values = items = keys = __iter__


class _NoWalkingList(list):
    """A group's member list that may be counted but not walked."""

    def __iter__(self):
        raise AssertionError("walked a group's nodes")


def test_progress_costs_no_per_node_work():
    """Reading the progress, and keeping it through reports, revocations and wake-ups, never
    walks the context's nodes: its cost does not grow with them."""
    client = Client()
    n = 200
    cid, created = client.create({"name": "wide", "groups": [{"name": "all", "quantity": n, "source_check": False}]})
    join = created["bootstraps"]["all"]["join_token"]
    nodes = []
    for i in range(1, n + 1):
        enrolled = client.enroll(cid, join, i)[1]
        nodes.append((enrolled["node_id"], enrolled["node_token"]))
    ctx = client.broker.model.contexts[cid]
    ctx.nodes = _NoWalking(ctx.nodes)
    group = ctx.groups["all"]
    group.nodes = _NoWalkingList(group.nodes)
    revision = progress(client, cid)["revision"]
    pending = pending_progress(client, cid, revision)
    report(client, cid, nodes[5], "error", message="bad")
    assert result_of(pending)[1]["first_error"]["node_id"] == nodes[5][0]
    report(client, cid, nodes[7], "error", message="worse")
    report(client, cid, nodes[5], "contextualizing")
    assert progress(client, cid)["first_error"]["node_id"] == nodes[7][0]
    assert progress(client, cid)["counts"]["enrolled"] == n


def test_progress_survives_replay_and_compaction(client):
    """A replayed journal, and a snapshot of the model (compaction), give the same progress - its
    revision and the order of the errors included - and a snapshot from before the progress was
    kept still gives the oldest error first."""
    cid, joins, nodes = torque(client)
    report(client, cid, nodes[2], "error", message="node 2")
    client.clock.advance(1)
    report(client, cid, nodes[2], "contextualizing")
    # Errors in another order than the nodes enrolled, two of them at the same time.
    report(client, cid, nodes[4], "error", message="node 4")
    report(client, cid, nodes[2], "error", message="node 2 again")
    client.clock.advance(1)
    report(client, cid, nodes[3], "error", message="node 3")
    model = client.broker.model
    assert list(model.contexts[cid].failed) == [nodes[4][0], nodes[2][0], nodes[3][0]]
    replayed = replay_records(client.journal.records)
    snapshot = model.snapshot_records()
    restored = replay_records(snapshot)
    assert model_state(replayed) == model_state(model) == model_state(restored)
    assert restored.progress(restored.contexts[cid]) == model.progress(model.contexts[cid])

    for record in snapshot:
        if record["op"] == "restore_context":
            del record["failed"], record["progress_rev"]
    older = replay_records(snapshot)
    ctx = older.contexts[cid]
    assert list(ctx.failed) == [nodes[2][0], nodes[4][0], nodes[3][0]]  # a tie: in enrollment order
    assert older.progress(ctx)["revision"] == ctx.revision >= model.contexts[cid].progress_rev


def node_status(client, cid, nid):
    return next(n for n in client.call("GET", f"/v1/contexts/{cid}", ADMIN_TOKEN)[1]["nodes"] if n["id"] == nid)


def test_why_a_node_waits_shows_in_its_status_and_the_longest_wait_in_the_progress(client):
    """A contextualizing report's message is why its agent waits: in the node's status, and, for
    the member that has said so longest, in the progress (moving its revision, waking it); an ok,
    an error or a departure ends it, and the next waiting node takes its place."""
    cid, joins, nodes = torque(client)
    assert progress(client, cid)["waiting"] is None
    before = progress(client, cid)
    pending = pending_progress(client, cid, before["revision"])
    report(client, cid, nodes[2], "contextualizing", message="waiting: role torquemaster: 0 of 1 providers ok")
    status, woken = result_of(pending)
    assert status == 200 and woken["revision"] > before["revision"]
    assert woken["waiting"] == {"node_id": nodes[2][0], "group": "compute", "hostname": identity(2)["hostname"],
                                "message": "waiting: role torquemaster: 0 of 1 providers ok"}
    assert node_status(client, cid, nodes[2][0])["waiting"] == "waiting: role torquemaster: 0 of 1 providers ok"
    client.clock.advance(1)
    report(client, cid, nodes[3], "contextualizing", message="waiting: data gridmap: no value yet")
    report(client, cid, nodes[2], "contextualizing", message="waiting: context is not locked yet")
    # Still the longest waiting: node 2, with what it says now.
    assert progress(client, cid)["waiting"]["message"] == "waiting: context is not locked yet"
    report(client, cid, nodes[2], "error", exit_code=1, message="failed")
    assert node_status(client, cid, nodes[2][0])["waiting"] == ""
    assert progress(client, cid)["waiting"]["node_id"] == nodes[3][0]
    assert client.call("POST", f"/v1/contexts/{cid}/nodes/{nodes[3][0]}/revoke", ADMIN_TOKEN)[0] == 200
    assert progress(client, cid)["waiting"] is None


def test_waiting_nodes_survive_a_compaction_in_their_order(client):
    cid, joins, nodes = torque(client)
    for n in (4, 2, 3):
        report(client, cid, nodes[n], "contextualizing", message=f"waiting: node {n}")
        client.clock.advance(1)
    model = client.broker.model
    again = replay_records(model.snapshot_records())
    assert model_state(again) == model_state(model)
    assert list(again.contexts[cid].waiting) == [nodes[4][0], nodes[2][0], nodes[3][0]]
