"""What an enrollment (and an identity update) answers besides the credential: where the
node's view stands, so that an agent never fetches a view it would only wait on; and what
the broker logs of enrollments in a storm.

The real resource over StubTreq with a fake clock (tests/support.py).
"""

import pytest
from support import Client, identity, instance_key, torque_cluster
from twisted.logger import globalLogPublisher

import ctxagent


@pytest.fixture
def client():
    return Client()


def enroll(client, bootstrap, n, hostname=None):
    status, body = client.call("POST", f"/v1/contexts/{bootstrap['context_id']}/enroll", bootstrap["join_token"],
                               {"instance_key": instance_key(n), "identity": identity(n, hostname)})
    assert status in (200, 201), body
    return body


def view(client, cid, node):
    status, body = client.call("GET", f"/v1/contexts/{cid}/nodes/{node['node_id']}/view", node["node_token"])
    assert status == 200, body
    return body


def test_the_enrollment_reply_says_what_the_view_would(client):
    """revision, complete and waiting_for are the view's own, at every step of assembly; the
    agent's parser takes them as it takes a view's."""
    cid, created = client.create(torque_cluster(source_check=False))
    bootstraps = created["bootstraps"]
    compute = enroll(client, bootstraps["compute"], 1)
    progress = compute["view_progress"]
    seen = view(client, cid, compute)
    assert (progress["revision"], progress["complete"], progress["waiting_for"]) == (
        seen["revision"], seen["complete"], seen["waiting_for"])
    assert progress["complete"] is False and progress["waiting_for"]
    assert ctxagent.reply_progress(compute, "enrollment reply") == ctxagent.view_progress(seen)

    head = enroll(client, bootstraps["head"], 9, "head")
    assert head["view_progress"]["complete"] is False   # the head waits for its computes
    assert head["view_progress"]["waiting_for"] == ["role torqueslave: 1 of 3 providers enrolled"]
    for n in (2, 3):
        enroll(client, bootstraps["compute"], n)
    status, _ = client.call("POST", f"/v1/contexts/{cid}/nodes/{head['node_id']}/report", head["node_token"],
                            {"state": "ok"})
    assert status == 200
    # Once complete, the reply says so (the agent then fetches the view at once).
    again = enroll(client, bootstraps["compute"], 1)   # a re-enrollment of the same instance
    seen = view(client, cid, again)
    assert seen["complete"] is True
    assert again["view_progress"] == {"revision": seen["revision"], "complete": True, "waiting_for": []}


def test_the_identity_update_reply_says_it_too(client):
    cid, created = client.create(torque_cluster(source_check=False))
    bootstraps = created["bootstraps"]
    node = enroll(client, bootstraps["compute"], 1)
    status, body = client.call("PUT", f"/v1/contexts/{cid}/nodes/{node['node_id']}/identity", node["node_token"],
                               identity(1))
    assert status == 200, body
    seen = view(client, cid, node)
    assert body["revision"] == seen["revision"]
    assert body["view_progress"] == {"revision": seen["revision"], "complete": seen["complete"],
                                     "waiting_for": seen["waiting_for"]}


def test_a_broken_view_progress_is_refused_by_the_agent():
    """What the broker accepts every agent accepts, and nothing else: a malformed view_progress
    is an input error (EXIT_INPUT), an absent one means an older broker."""
    assert ctxagent.reply_progress({}, "enrollment reply") is None
    for bad in ("x", {"revision": True, "complete": False}, {"revision": 3, "complete": "no"},
                {"revision": 3, "complete": False, "waiting_for": "role"}):
        with pytest.raises(ctxagent.InputError):
            ctxagent.reply_progress({"view_progress": bad}, "enrollment reply")


def test_a_storm_is_logged_per_second_not_per_node(client):
    """Up to 20 enrollments a second get a line each; the rest of that second, one line per
    context that counts them, said when the second is over."""
    from ctxd.broker import _EnrollmentLog

    events = []
    globalLogPublisher.addObserver(events.append)
    try:
        cid, created = client.create({"name": "storm", "groups": [
            {"name": "compute", "quantity": 30, "source_check": False, "provides": ["w"]}]})
        bootstraps = created["bootstraps"]
        for n in range(1, 26):
            enroll(client, bootstraps["compute"], n)
        lines = [e for e in events if e.get("log_namespace") == "ctxd.broker" and e.get("cid") == cid]
        assert len([e for e in lines if "nid" in e]) == _EnrollmentLog.PER_SECOND == 20
        assert not [e for e in lines if "count" in e]   # said when the second is over
        client.broker.flush_enrollment_log()   # (the broker's one-second timer)
        summaries = [e for e in events if e.get("cid") == cid and "count" in e]
        assert [e["count"] for e in summaries] == [5]
        client.broker.flush_enrollment_log()   # nothing more to say
        assert len([e for e in events if e.get("cid") == cid and "count" in e]) == 1
        # The next second: lines again, each node by name.
        client.clock.advance(1.0)
        enroll(client, bootstraps["compute"], 26)
        said = [e for e in events if e.get("cid") == cid and "nid" in e]
        assert len(said) == 21 and said[-1]["how"] == "enrolled in"
    finally:
        globalLogPublisher.removeObserver(events.append)


def test_each_context_has_its_own_lines_and_a_new_second_says_the_last_ones_count(client):
    """A storm in one context does not turn another's lines into a count; the first enrollment
    of a new second says how many the last one left untold (without waiting for the timer)."""
    from ctxd.broker import _EnrollmentLog

    events = []
    globalLogPublisher.addObserver(events.append)
    try:
        contexts = []
        for name in ("a", "b"):
            cid, created = client.create({"name": name, "groups": [
                {"name": "compute", "quantity": 30, "source_check": False, "provides": ["w"]}]})
            contexts.append((cid, created["bootstraps"]["compute"]))
        (a, storm), (b, quiet) = contexts
        for n in range(1, 24):
            enroll(client, storm, n)
        enroll(client, quiet, 100)
        assert len([e for e in events if e.get("cid") == a and "nid" in e]) == _EnrollmentLog.PER_SECOND
        assert len([e for e in events if e.get("cid") == b and "nid" in e]) == 1   # b's node still named
        client.clock.advance(1.0)
        enroll(client, storm, 30)
        assert [e["count"] for e in events if e.get("cid") == a and "count" in e] == [3]
        assert [e for e in events if e.get("cid") == a and "nid" in e][-1]["source"]
    finally:
        globalLogPublisher.removeObserver(events.append)
