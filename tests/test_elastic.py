"""Elastic clusters at the broker (issue 13): scale, remove, leave, extend, leases, delta views.

In memory (StubTreq, Clock): the real BrokerResource, Broker and Model. The end-to-end
proof with real processes is tests/e2e/test_elastic.py.
"""

import copy
import random

import pytest
from support import (
    ADMIN_TOKEN,
    Client,
    identity,
    model_state,
    not_fired,
    replay_records,
    result_of,
    torque,
    torque_cluster,
)

from ctxd import model


@pytest.fixture
def client():
    return Client()


def ctx_path(cid, tail=""):
    return f"/v1/contexts/{cid}{tail}"


def node_path(cid, nid, tail):
    return f"/v1/contexts/{cid}/nodes/{nid}/{tail}"


def report_ok(client, cid, node, watch=False):
    nid, token = node
    body = {"state": "ok", "watch": True} if watch else {"state": "ok"}
    return client.call("POST", node_path(cid, nid, "report"), token, body)


def view(client, cid, node, query=""):
    nid, token = node
    return client.call("GET", node_path(cid, nid, "view" + query), token)


def scale(client, cid, group, quantity, token=ADMIN_TOKEN):
    return client.call("POST", ctx_path(cid, f"/groups/{group}/scale"), token, {"quantity": quantity})


def status_of(client, cid):
    status, body = client.call("GET", ctx_path(cid), ADMIN_TOKEN)
    assert status == 200, body
    return body


def assembled(client):
    """The torque cluster (head, three computes), every node ok."""
    cid, joins, nodes = torque(client)
    for n in (1, 2, 3, 4):
        assert report_ok(client, cid, nodes[n])[0] == 200
    return cid, joins, nodes


# -- scale ---------------------------------------------------------------------------------


def test_scale_up_admits_late_joiners_and_gates_them_like_the_first(client):
    cid, joins, nodes = assembled(client)
    assert client.enroll(cid, joins["compute"], 5)[1]["error"] == "enrollment_full"
    status, body = scale(client, cid, "compute", 5)
    assert status == 200, body
    assert body["group"]["quantity"] == 5 and body["group"]["enrolled"] == 3
    assert body["context"]["counts"]["expected"] == 6 and body["context"]["all_ok"] is False
    status, late = client.enroll(cid, joins["compute"], 5)
    assert status == 201, late
    # The head's view counts the new target: it is waiting for one more compute.
    _, head_view = view(client, cid, nodes[1])
    assert head_view["complete"] is False
    assert head_view["waiting_for"] == ["role torqueslave: 4 of 5 providers enrolled"]
    # The late joiner's first run is gated like the first ones': torquemaster ok is required.
    _, late_view = view(client, cid, (late["node_id"], late["node_token"]))
    assert late_view["complete"] is True
    assert [p["hostname"] for p in late_view["roles"]["torquemaster"]["providers"]] == ["node1"]
    # The head was ok before: it may report ok again although the group is still growing.
    assert report_ok(client, cid, nodes[1], watch=True)[0] == 200
    # A node that never was ok may not claim ok on an incomplete view.
    _, other = client.enroll(cid, joins["compute"], 6)
    assert scale(client, cid, "head", 2)[0] == 200   # its view waits for a second head
    status, refused = report_ok(client, cid, (other["node_id"], other["node_token"]))
    assert status == 409 and refused["error"] == "state_conflict"


def test_scale_revives_an_expired_join_token(client):
    cid, joins, nodes = assembled(client)
    client.clock.advance(2 * 86400)
    assert client.enroll(cid, joins["compute"], 5)[0] == 410
    assert scale(client, cid, "compute", 4)[0] == 200
    assert client.enroll(cid, joins["compute"], 5)[0] == 201


def test_scale_below_members_is_refused_and_changes_nothing(client):
    cid, joins, nodes = assembled(client)
    before = model_state(client.broker.model)
    status, body = scale(client, cid, "compute", 2)
    assert status == 409 and body["error"] == "scale_below_members"
    assert "remove nodes first" in body["message"]
    for bad in (-1, "3", True, None, 100_001):
        status, body = scale(client, cid, "compute", bad)
        assert status == 400 and body["error"] == "bad_request", bad
    assert scale(client, cid, "nosuch", 3)[0] == 404
    assert model_state(client.broker.model) == before


def test_scale_within_the_context_quota(client):
    client.broker.model.quotas.nodes_per_context = 10
    cid, joins, nodes = assembled(client)
    status, body = scale(client, cid, "compute", 10)
    assert status == 409 and body["error"] == "quota_exceeded"
    assert scale(client, cid, "compute", 9)[0] == 200


# -- remove, leave, revoke: departures -------------------------------------------------------


def test_removed_node_departs_its_credential_dies_and_its_slot_is_free(client):
    cid, joins, nodes = assembled(client)
    gone = nodes[3]
    status, body = client.call("POST", node_path(cid, gone[0], "remove"), ADMIN_TOKEN)
    assert status == 200 and body == {"removed": gone[0], "group": "compute", "quantity": 3}
    assert view(client, cid, gone)[0] == 401
    _, head_view = view(client, cid, nodes[1])
    assert "node3" not in [p["hostname"] for p in head_view["roles"]["torqueslave"]["providers"]]
    # Its instance cannot come back; a new VM takes the slot.
    status, body = client.enroll(cid, joins["compute"], 3)
    assert status == 403 and "departed (removed)" in body["message"]
    assert client.enroll(cid, joins["compute"], 7)[0] == 201
    node = {n["id"]: n for n in status_of(client, cid)["nodes"]}[gone[0]]
    assert node["departed"] == "removed" and node["revoked"] is True and node["departed_at"] is not None
    again = client.call("POST", node_path(cid, gone[0], "remove"), ADMIN_TOKEN)
    assert again[0] == 409 and again[1]["error"] == "already_departed"


def test_remove_with_shrink_lowers_the_target(client):
    cid, joins, nodes = assembled(client)
    status, body = client.call("POST", node_path(cid, nodes[4][0], "remove"), ADMIN_TOKEN, {"shrink": True})
    assert status == 200 and body["quantity"] == 2
    summary = status_of(client, cid)
    assert summary["all_ok"] is True and summary["counts"]["expected"] == 3
    group = {g["name"]: g for g in summary["groups"]}["compute"]
    assert (group["quantity"], group["enrolled"], group["departed"]) == (2, 2, 1)
    for bad in ({"shrink": "yes"}, {"other": 1}, []):
        status, body = client.call("POST", node_path(cid, nodes[2][0], "remove"), ADMIN_TOKEN, bad)
        assert status == 400, bad


def test_a_node_leaves_by_itself_and_only_itself(client):
    cid, joins, nodes = assembled(client)
    nid, token = nodes[2]
    other = client.call("POST", node_path(cid, nodes[3][0], "leave"), token)
    assert other[0] == 403
    status, body = client.call("POST", node_path(cid, nid, "leave"), token)
    assert status == 200 and body == {"left": nid}
    assert client.call("POST", node_path(cid, nid, "leave"), token)[0] == 401
    node = {n["id"]: n for n in status_of(client, cid)["nodes"]}[nid]
    assert node["departed"] == "left"


def waiting(client, cid, node):
    """``node`` long-polls past the revision of its view: the request, unanswered."""
    nid, token = node
    _, held = view(client, cid, node)
    pending = client.call_deferred("GET", node_path(cid, nid, f"view?since={held['revision']}&wait=60"), token)
    client.stub.flush()
    assert not_fired(pending)
    return pending


def test_a_departure_wakes_the_watchers(client):
    cid, joins, nodes = assembled(client)
    pending = waiting(client, cid, nodes[1])
    client.call("POST", node_path(cid, nodes[4][0], "remove"), ADMIN_TOKEN)
    status, woken = result_of(pending)
    assert status == 200
    assert [p["hostname"] for p in woken["roles"]["torqueslave"]["providers"]] == ["node2", "node3"]


# -- extend --------------------------------------------------------------------------------


def test_extend_moves_the_expiry(client):
    cid, joins, nodes = assembled(client)
    client.clock.advance(1000)
    status, body = client.call("POST", ctx_path(cid, "/extend"), ADMIN_TOKEN, {"expires_in": 30 * 86400})
    assert status == 200 and body["expires"] == 1000 + 30 * 86400
    client.clock.advance(8 * 86400)   # past the 7 days it was created with
    assert status_of(client, cid)["expires"] == 1000 + 30 * 86400
    client.broker.sweep_expired()
    assert cid in client.broker.model.contexts
    for bad in ({}, {"expires_in": 10}, {"expires_in": "1d"}, {"expires_in": 400 * 86400}):
        assert client.call("POST", ctx_path(cid, "/extend"), ADMIN_TOKEN, bad)[0] == 400, bad


# -- leases --------------------------------------------------------------------------------


def leased_cluster(lease=30):
    body = torque_cluster()
    body["groups"][1]["lease"] = lease
    return body


def test_a_silent_watching_node_is_lost_after_its_lease(client):
    cid, joins, nodes = torque(client, leased_cluster(30))
    for n in (1, 2, 3):
        assert report_ok(client, cid, nodes[n], watch=n != 3)[0] == 200   # node3 does not watch
    assert report_ok(client, cid, nodes[4], watch=True)[0] == 200
    # node2 keeps a long-poll open; node4 goes silent; node3 never watched.
    nid2, token2 = nodes[2]
    _, held = view(client, cid, nodes[2])
    pending = client.call_deferred("GET", node_path(cid, nid2, f"view?since={held['revision']}&wait=25"), token2)
    client.stub.flush()
    woken = None
    for _ in range(6):
        client.clock.advance(10)
        client.broker.sweep_leases()
        client.stub.flush()
        if not not_fired(pending):
            code, answer = result_of(pending)
            if code == 200:
                woken = answer
            # node2's wait ended (a 304, or the news): it asks again at once, as a watcher does.
            pending = client.call_deferred("GET", node_path(cid, nid2, f"view?since={held['revision']}&wait=25"),
                                           token2)
            client.stub.flush()
    status = {n["id"]: n for n in status_of(client, cid)["nodes"]}
    assert status[nodes[4][0]]["departed"] == "lost"
    assert status[nodes[2][0]]["departed"] is None and status[nodes[3][0]]["departed"] is None
    assert status[nodes[2][0]]["watching"] is True and status[nodes[2][0]]["last_seen"] is not None
    # The lost node left every view (node2's open wait heard of it).
    assert woken is not None and "node4" not in [p["hostname"] for p in woken["all_identities"]]
    assert view(client, cid, nodes[4])[0] == 401


def test_lease_is_validated():
    client = Client()
    for bad in (5, "10m", 31 * 86400, True):
        status, body = client.call("POST", "/v1/contexts", ADMIN_TOKEN, leased_cluster(bad))
        assert status == 400 and "lease" in body["message"], bad
    cid, created = client.create(leased_cluster(600))
    assert {g["name"]: g["lease"] for g in status_of(client, cid)["groups"]} == {"head": None, "compute": 600}


# -- delta views ---------------------------------------------------------------------------


def apply_delta(held, delta):
    """The agent's rule: a held full view with a delta applied (providers and all_identities by node)."""
    out = copy.deepcopy(held)
    for key in ("revision", "complete", "waiting_for", "state", "self", "locked", "lease"):
        out[key] = delta[key]
    for role, counts in delta["roles"].items():
        out["roles"][role].update(counts)
    gone = set(delta["departed"]) | {p["node_id"] for p in delta["peers"]}
    for role in out["roles"].values():
        role["providers"] = [p for p in role["providers"] if p["node_id"] not in gone]
    if "all_identities" in out:
        out["all_identities"] = [p for p in out["all_identities"] if p["node_id"] not in gone]
    for peer in delta["peers"]:
        entry = {k: v for k, v in peer.items() if k not in ("roles", "all")}
        for role in peer["roles"]:
            out["roles"][role]["providers"].append(entry)
        if peer["all"]:
            out["all_identities"].append(entry)
    return out


def comparable(v):
    roles = {r: (sorted(p["node_id"] for p in body["providers"]), body["expected"], body["satisfied"])
             for r, body in v["roles"].items()}
    everyone = sorted(p["node_id"] for p in v.get("all_identities", []))
    return (v["revision"], v["complete"], v["waiting_for"], v["state"], v["self"], roles, everyone)


def test_delta_carries_only_the_change(client):
    cid, joins, nodes = assembled(client)
    _, held = view(client, cid, nodes[2])
    scale(client, cid, "compute", 4)
    _, late = client.enroll(cid, joins["compute"], 5)
    status, delta = view(client, cid, nodes[2], f"?since={held['revision']}&delta=1")
    assert status == 200 and delta["delta"] is True and delta["since"] == held["revision"]
    assert [(p["hostname"], p["roles"], p["all"]) for p in delta["peers"]] == [("node5", [], True)]
    assert delta["departed"] == []
    full = view(client, cid, nodes[2])[1]
    assert comparable(apply_delta(held, delta)) == comparable(full)
    # The head (requires torqueslave, not ready): the new compute as a provider.
    _, head_held = view(client, cid, nodes[1])
    client.call("POST", node_path(cid, nodes[3][0], "remove"), ADMIN_TOKEN)
    _, head_delta = view(client, cid, nodes[1], f"?since={head_held['revision']}&delta=1")
    assert head_delta["peers"] == [] and head_delta["departed"] == [nodes[3][0]]
    # Without since, or with delta=0: the full view.
    assert "delta" not in view(client, cid, nodes[1], "?delta=1")[1]
    assert "delta" not in view(client, cid, nodes[1], f"?since={head_held['revision']}")[1]
    assert view(client, cid, nodes[1], "?since=1&delta=2")[0] == 400


def test_delta_of_a_ready_role_lists_a_provider_at_its_first_ok(client):
    cid, joins, nodes = assembled(client)
    # compute requires torquemaster ready: a second head appears to computes once it is ok.
    scale(client, cid, "head", 2)
    _, held = view(client, cid, nodes[2])
    _, head2 = client.enroll(cid, joins["head"], 8)
    _, delta = view(client, cid, nodes[2], f"?since={held['revision']}&delta=1")
    assert [(p["hostname"], p["roles"]) for p in delta["peers"]] == [("node8", [])]   # in all_identities only
    report_ok(client, cid, (head2["node_id"], head2["node_token"]))
    _, delta = view(client, cid, nodes[2], f"?since={delta['revision']}&delta=1")
    assert [(p["hostname"], p["roles"]) for p in delta["peers"]] == [("node8", ["torquemaster"])]


def test_delta_falls_back_to_the_full_view_when_too_old(client, monkeypatch):
    monkeypatch.setattr(model, "CHANGE_LOG", 4)
    cid, joins, nodes = assembled(client)
    ctx = client.broker.model.contexts[cid]
    _, held = view(client, cid, nodes[2])
    scale(client, cid, "compute", 3 + 12)
    for n in range(10, 10 + 12):
        assert client.enroll(cid, joins["compute"], n)[0] == 201
    assert ctx.delta_floor > held["revision"] and len(ctx.change_revs) <= 2 * 4
    status, answer = view(client, cid, nodes[2], f"?since={held['revision']}&delta=1")
    assert status == 200 and "delta" not in answer and len(answer["all_identities"]) == 4 + 12
    # A data change or the lock is not in the log: older revisions get the full view.
    assert view(client, cid, nodes[2], f"?since={answer['revision'] - 1}&delta=1")[1]["delta"] is True
    ctx.no_deltas_before_now()
    assert "delta" not in view(client, cid, nodes[2], f"?since={answer['revision'] - 1}&delta=1")[1]


def test_random_deltas_rebuild_the_full_view(client):
    """Joins, first oks, removals and identity changes in random order: a watcher that applies each
    delta holds exactly the full view, for every group (long-polls answered as deltas too)."""
    rng = random.Random(13)
    cid, joins, nodes = assembled(client)
    scale(client, cid, "compute", 40)
    scale(client, cid, "head", 3)
    watchers = {n: view(client, cid, nodes[n])[1] for n in (1, 2)}
    live = {n: nodes[n] for n in (3, 4)}
    next_n = 20
    for step in range(120):
        action = rng.choice(("join", "join", "ok", "remove", "rename", "head", "scale"))
        if action == "join":
            status, body = client.enroll(cid, joins["compute"], next_n)
            if status == 201:
                live[next_n] = (body["node_id"], body["node_token"])
            next_n += 1
        elif action == "head":
            status, body = client.enroll(cid, joins["head"], next_n)
            if status == 201:
                live[next_n] = (body["node_id"], body["node_token"])
            next_n += 1
        elif action == "scale":   # the expected counts move; never below the members
            members = len(client.broker.model.contexts[cid].groups["compute"].nodes)
            scale(client, cid, "compute", rng.randrange(members, 45))
        elif action == "ok" and live:
            report_ok(client, cid, live[rng.choice(sorted(live))])
        elif action == "remove" and live:
            n = rng.choice(sorted(live))
            client.call("POST", node_path(cid, live.pop(n)[0], "remove"), ADMIN_TOKEN)
        elif action == "rename" and live:
            n = rng.choice(sorted(live))
            nid, token = live[n]
            client.call("PUT", node_path(cid, nid, "identity"), token, identity(n, f"r{step}-{n}"),
                        source=identity(n)["primary_ip"])
        if rng.random() < 0.4:
            for n, held in watchers.items():
                status, delta = view(client, cid, nodes[n], f"?since={held['revision']}&delta=1")
                if status == 304:   # nothing new for this watcher
                    continue
                assert status == 200 and delta.get("delta") is True
                watchers[n] = apply_delta(held, delta)
                assert comparable(watchers[n]) == comparable(view(client, cid, nodes[n])[1]), (step, n)


def test_elastic_changes_replay_to_the_same_state(client):
    """Scale, remove (with shrink), leave, lost, extend: the journal replays to the same views and
    revisions, and so does a snapshot of the state."""
    cid, joins, nodes = torque(client, leased_cluster(30))
    for n in (1, 2, 3, 4):
        assert report_ok(client, cid, nodes[n], watch=True)[0] == 200
    scale(client, cid, "compute", 5)
    client.enroll(cid, joins["compute"], 5)
    client.call("POST", node_path(cid, nodes[2][0], "remove"), ADMIN_TOKEN, {"shrink": True})
    client.call("POST", node_path(cid, nodes[3][0], "leave"), nodes[3][1])
    client.clock.advance(40)
    client.broker.sweep_leases()   # everyone's lease starts now (no earlier sighting)
    client.clock.advance(40)
    client.broker.sweep_leases()   # node1 (head) has no lease; node4 is lost
    client.call("POST", ctx_path(cid, "/extend"), ADMIN_TOKEN, {"expires_in": 9 * 86400})
    model = client.broker.model
    departed = {n["id"]: n["departed"] for n in model.status(model.contexts[cid])["nodes"]}
    assert departed[nodes[2][0]] == "removed" and departed[nodes[3][0]] == "left"
    assert departed[nodes[4][0]] == "lost"
    want = durable_state(model)
    assert durable_state(replay_records(client.journal.records)) == want
    assert durable_state(replay_records(model.snapshot_records())) == want


def durable_state(m):
    """model_state less when each node was last heard from (not journaled: after a restart every
    lease starts again)."""
    state = model_state(m)
    for status in state["status"].values():
        for node in status["nodes"]:
            node.pop("last_seen")
    return state


def test_scaling_the_join_tokens_lifetime_does_not_grow(client):
    """A scale (or rotation) makes the join token valid for the context's join TTL from then, not
    for the time since creation; lowering the target revives nothing."""
    cid, joins, nodes = assembled(client)
    g = client.broker.model.contexts[cid].groups["compute"]
    assert client.call("POST", ctx_path(cid, "/extend"), ADMIN_TOKEN, {"expires_in": 30 * 86400})[0] == 200
    for day in (6, 10, 14):
        client.clock.advance(day * 86400 - client.clock.seconds())
        assert scale(client, cid, "compute", g.quantity + 1)[0] == 200
        assert g.join_expires == day * 86400 + 86400   # one day (the join TTL) from the scale
    client.clock.advance(2 * 86400)
    scale(client, cid, "compute", g.quantity - 1)
    assert g.join_expires < client.clock.seconds()


def test_a_departed_nodes_wait_is_answered_401(client):
    """The departed node's open long-poll is told its credential is gone, not sent a view without itself."""
    cid, joins, nodes = assembled(client)
    pending = waiting(client, cid, nodes[3])
    client.call("POST", node_path(cid, nodes[3][0], "remove"), ADMIN_TOKEN)
    status, body = result_of(pending)
    assert status == 401 and body["error"] == "unauthorized"


def test_enroll_and_leave_in_a_loop_is_bounded(client):
    """Departed nodes are kept (status; their instances may not return), so churn is capped: at
    twice nodes_per_context nodes kept, a new enrollment is refused with a clear error."""
    client.broker.model.quotas.nodes_per_context = 5
    cid, joins, nodes = assembled(client)   # 4 members
    assert scale(client, cid, "compute", 4)[0] == 200   # one free slot, taken and freed in a loop
    n = 10
    while True:
        status, body = client.enroll(cid, joins["compute"], n)
        if status != 201:
            break
        assert client.call("POST", node_path(cid, body["node_id"], "leave"), body["node_token"])[0] == 200
        n += 1
    assert status == 409 and body["error"] == "quota_exceeded" and "departed" in body["message"]
    assert len(client.broker.model.contexts[cid].nodes) == 10
