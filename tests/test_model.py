"""The pure state model: validation, enrollment, completion, views and wake-ups."""

import copy
import gc

import pytest
from support import identity, instance_key, torque_cluster

from ctxd import tokens
from ctxd.errors import (
    BadRequest,
    Conflict,
    JoinTokenExpired,
    InvalidCluster,
    InvalidName,
    NotFound,
)
from ctxd.model import Model
from ctxd import validate

NOW = 1_000_000.0


def create(model, body=None, now=NOW):
    record, join_tokens = model.prepare_create(body or torque_cluster(), now)
    model.apply(record)
    return record["ctx"], join_tokens


def enroll(model, cid, group, n, now=NOW, ident=None):
    ident = ident or identity(n)
    record, node_token, new = model.prepare_enroll(
        cid, group, {"instance_key": instance_key(n), "identity": ident}, ident["primary_ip"], now
    )
    touched = model.apply(record)
    return record["node"], node_token, new, touched


def report(model, cid, nid, state, now=NOW, **extra):
    return model.apply(model.prepare_report(cid, nid, dict(state=state, **extra), now))


def test_issue_example_parses():
    """The issue's torque cluster is accepted with defaults filled in."""
    spec = validate.cluster(torque_cluster())
    assert [g["name"] for g in spec["groups"]] == ["head", "compute"]
    assert spec["groups"][0]["requires"] == [{"role": "torqueslave", "ready": False}]
    assert spec["groups"][1]["all_identities"] is True
    assert spec["expires_in"] == 7 * 86400 and spec["join_token_ttl"] == 86400


@pytest.mark.parametrize(
    "mutate, error, text",
    [
        (lambda b: b["groups"][0].update(name="../etc"), InvalidName, "groups[0].name"),
        (lambda b: b["groups"][1]["provides"].append("a b"), InvalidName, "groups[1].provides[1]"),
        (lambda b: b["groups"][0].update(quantity=0), BadRequest, "groups[0].quantity"),
        (lambda b: b["groups"][0].update(quantity="1"), BadRequest, "groups[0].quantity"),
        (lambda b: b["groups"][0].update(colour="red"), BadRequest, "unknown field 'colour'"),
        (lambda b: b.update(extra=1), BadRequest, "unknown field 'extra'"),
        (lambda b: b["groups"][0]["requires"].append({"role": "nobody"}), InvalidCluster, "no group provides"),
        (lambda b: b["groups"][0]["data"].append("missing"), InvalidCluster, "not declared"),
        (lambda b: b["data"].update(gridmap=[{"b64": "***"}]), BadRequest, "not valid base64"),
        (lambda b: b["data"].update(gridmap=[]), InvalidCluster, "not open for injection"),
        (lambda b: b["groups"][1].update(name="head"), InvalidCluster, "duplicate group"),
        (lambda b: b.update(groups=[]), InvalidCluster, "at least one group"),
    ],
)
def test_bad_cluster_rejected(mutate, error, text):
    """Each malformed create request is refused with an error naming the field."""
    body = torque_cluster()
    mutate(body)
    with pytest.raises(error) as info:
        validate.cluster(body)
    assert text in info.value.message


def test_ready_cycle_named():
    """Ready-requirements forming a cycle are refused, naming the cycle."""
    body = torque_cluster()
    body["groups"][0]["requires"] = [{"role": "torqueslave", "ready": True}]
    with pytest.raises(InvalidCluster) as info:
        validate.cluster(body)
    assert info.value.code == "ready_cycle"
    assert "head -> compute -> head" in info.value.message or "compute -> head -> compute" in info.value.message


def test_plain_requirements_may_be_mutual():
    """A mutual requirement without ready is not a cycle (it cannot deadlock)."""
    validate.cluster(torque_cluster())


def test_prepare_changes_nothing():
    """prepare_* validates and builds a record but does not change the state."""
    model = Model()
    cid, _ = create(model)
    before = copy.deepcopy(model.status(model.contexts[cid]))
    model.prepare_enroll(cid, "compute", {"instance_key": instance_key(1), "identity": identity(1)}, "10.9.0.1", NOW)
    assert model.status(model.contexts[cid]) == before


def test_enrollment_is_idempotent_per_instance_key():
    """The same instance key gets the same node back, a new token, and no second slot."""
    model = Model()
    cid, _ = create(model)
    nid1, token1, new1, _ = enroll(model, cid, "head", 1)
    nid2, token2, new2, _ = enroll(model, cid, "head", 1)
    assert (nid1, new1, new2) == (nid2, True, False)
    assert token1 != token2
    assert model.principal(tokens.token_hash(token1)) is None, "the old credential must stop working"
    assert model.principal(tokens.token_hash(token2)) == ("node", cid, nid1)
    assert len(model.contexts[cid].nodes) == 1


def test_quantity_caps_enrollment():
    """A group's join token enrolls at most `quantity` distinct nodes."""
    model = Model()
    cid, _ = create(model)
    enroll(model, cid, "head", 1)
    with pytest.raises(Conflict) as info:
        enroll(model, cid, "head", 2)
    assert info.value.code == "enrollment_full"


def test_join_token_expires():
    """After its TTL a join token enrolls nobody (410)."""
    model = Model()
    body = torque_cluster()
    body["join_token_ttl"] = 3600
    cid, _ = create(model, body)
    with pytest.raises(JoinTokenExpired):
        enroll(model, cid, "head", 1, now=NOW + 3601)


def test_context_expiry():
    """An expired context is invisible and listed for deletion."""
    model = Model()
    cid, _ = create(model)
    assert model.expired(NOW + 7 * 86400 - 1) == []
    assert model.expired(NOW + 7 * 86400) == [cid]
    with pytest.raises(NotFound):
        model.context(cid, NOW + 7 * 86400)


def full_torque(model):
    cid, _ = create(model)
    head, _, _, _ = enroll(model, cid, "head", 1)
    computes = [enroll(model, cid, "compute", n)[0] for n in (2, 3, 4)]
    return cid, head, computes


def test_completion_and_ready_gating():
    """Computes wait for the head to be ok (ready); the head only for computes to enroll."""
    model = Model()
    cid, head, computes = full_torque(model)
    ctx = model.contexts[cid]
    head_view = model.view(ctx.nodes[head])
    assert head_view["complete"] is True
    assert [p["hostname"] for p in head_view["roles"]["torqueslave"]["providers"]] == ["node2", "node3", "node4"]
    compute_view = model.view(ctx.nodes[computes[0]])
    assert compute_view["complete"] is False
    assert compute_view["waiting_for"] == ["role torquemaster: 0 of 1 providers ok"]
    report(model, cid, head, "ok")
    compute_view = model.view(ctx.nodes[computes[0]])
    assert compute_view["complete"] is True
    assert compute_view["roles"]["torquemaster"]["providers"][0]["ip"] == "10.9.0.1"


def test_view_shows_only_what_was_required():
    """A node sees its required roles and data only; all identities only if asked."""
    model = Model()
    cid, head, computes = full_torque(model)
    ctx = model.contexts[cid]
    head_view = model.view(ctx.nodes[head])
    assert set(head_view["roles"]) == {"torqueslave"}
    assert set(head_view["data"]) == {"gridmap"}
    assert "all_identities" not in head_view
    compute_view = model.view(ctx.nodes[computes[0]])
    assert compute_view["data"] == {}
    assert len(compute_view["all_identities"]) == 4
    assert compute_view["self"]["hostname"] == "node2"


def test_status_counts_all_expected():
    """all_ok means every EXPECTED node is ok, not only the enrolled ones."""
    model = Model()
    body = torque_cluster()
    body["groups"][0]["requires"] = []  # the head needs nobody: it can be ok alone
    cid, _ = create(model, body)
    head, _, _, _ = enroll(model, cid, "head", 1)
    report(model, cid, head, "ok")
    summary = model.summary(model.contexts[cid])
    assert summary["counts"] == {"expected": 4, "enrolled": 1, "contextualizing": 0, "ok": 1, "error": 0}
    assert summary["all_ok"] is False and summary["complete"] is False


def test_report_transitions():
    """An ok after an error needs a new attempt; an ok node re-running stays ok."""
    model = Model()
    cid, head, computes = full_torque(model)
    report(model, cid, head, "error", exit_code=4, message="script failed", log_tail="x" * 70000)
    node = model.contexts[cid].nodes[head]
    assert node.error == {"exit_code": 4, "message": "script failed"} and len(node.log_tail) == 65536
    with pytest.raises(Conflict):
        model.prepare_report(cid, head, {"state": "ok"}, NOW)
    report(model, cid, head, "contextualizing")
    report(model, cid, head, "ok")
    report(model, cid, head, "contextualizing")
    assert node.state == "ok"
    assert model.summary(model.contexts[cid])["error_present"] is False


def test_wakeups_touch_only_changed_views():
    """A change touches only the groups whose view it changes."""
    model = Model()
    cid, _ = create(model)
    _, _, _, touched = enroll(model, cid, "head", 1)
    # The head provides torquemaster (required by compute) and compute wants all identities.
    assert touched.groups == {"compute"}
    _, _, _, touched = enroll(model, cid, "compute", 2)
    assert touched.groups == {"head", "compute"}
    enroll(model, cid, "compute", 3)
    enroll(model, cid, "compute", 4)
    head = model.contexts[cid].groups["head"].nodes[0].id
    compute_rev = model.contexts[cid].groups["compute"].view_rev
    head_rev = model.contexts[cid].groups["head"].view_rev
    # Enrolling made the node contextualizing: reporting so again changes nothing; a compute's
    # error changes nobody's view but its own.
    compute = model.contexts[cid].groups["compute"].nodes[0].id
    assert model.contexts[cid].nodes[compute].state == "contextualizing"
    touched = report(model, cid, compute, "contextualizing")
    assert touched.groups == set() and touched.nodes == set()
    touched = report(model, cid, compute, "error")
    assert touched.groups == set() and touched.nodes == {compute}
    # The head reporting ok flips the computes' ready requirement.
    touched = report(model, cid, head, "ok")
    assert touched.groups == {"compute"}
    assert model.contexts[cid].groups["compute"].view_rev > compute_rev
    assert model.contexts[cid].groups["head"].view_rev == head_rev


def test_enrolling_or_reporting_an_identity_starts_an_attempt():
    """The agent no longer reports contextualizing: enrolling, or a saved credential's
    identity update, makes the node contextualizing (an error's new attempt, with the error
    cleared); a node already ok stays ok; a journal record from before the rule (no
    "attempt") leaves the node enrolled, as it was."""
    model = Model()
    cid, head, computes = full_torque(model)
    ctx = model.contexts[cid]
    node = ctx.nodes[computes[0]]
    assert node.state == "contextualizing" and node.times["contextualizing_at"] == NOW
    assert ctx.counts["contextualizing"] == 4 and ctx.counts["enrolled"] == 0
    report(model, cid, node.id, "error", exit_code=4, message="script failed")
    assert node.state == "error" and node.error
    model.apply(model.prepare_identity(cid, node.id, node.identity, node.identity["primary_ip"], NOW + 5))
    assert node.state == "contextualizing" and node.error is None
    report(model, cid, head, "ok")
    again = ctx.nodes[head].identity
    model.apply(model.prepare_identity(cid, head, again, again["primary_ip"], NOW + 6))
    assert ctx.nodes[head].state == "ok"

    old = Model()
    cid, _ = create(old)
    record, _, _ = old.prepare_enroll(cid, "compute", {"instance_key": instance_key(3), "identity": identity(3)},
                                      identity(3)["primary_ip"], NOW)
    del record["attempt"]
    old.apply(record)
    assert old.contexts[cid].nodes[record["node"]].state == "enrolled"


def test_unchanged_identity_touches_nothing():
    """Re-reporting the same identity wakes nobody."""
    model = Model()
    cid, _ = create(model)
    enroll(model, cid, "head", 1)
    _, _, _, touched = enroll(model, cid, "head", 1)
    assert touched.groups == set() and touched.nodes == set()


def test_ok_refused_while_view_incomplete():
    """A node cannot report ok before its view was complete (that would fake ready-gating)."""
    model = Model()
    cid, head, computes = full_torque(model)
    with pytest.raises(Conflict):
        model.prepare_report(cid, computes[0], {"state": "ok"}, NOW)
    report(model, cid, head, "ok")
    report(model, cid, computes[0], "ok")


def test_known_instance_reenrolls_after_join_expiry():
    """A VM that enrolled before may get its node back after the join token expired; a new one may not."""
    model = Model()
    cid, _ = create(model)
    nid, _, _, _ = enroll(model, cid, "compute", 2)
    later = NOW + 86400 + 1
    again, _, new, _ = enroll(model, cid, "compute", 2, now=later)
    assert (again, new) == (nid, False)
    with pytest.raises(JoinTokenExpired):
        enroll(model, cid, "compute", 3, now=later)


def test_ids_never_look_like_options():
    """Generated ids never start with '-' or '_' (ctxctl wait $CTX must not parse it as an option)."""
    assert all(tokens.new_id()[0].isalnum() for _ in range(2000))


def test_open_context_incomplete_until_locked():
    """An open-for-injection context completes only after data and the lock."""
    model = Model()
    cid, _ = create(model, torque_cluster(open_for_injection=True))
    head, _, _, _ = enroll(model, cid, "head", 1)
    for n in (2, 3, 4):
        enroll(model, cid, "compute", n)
    view = model.view(model.contexts[cid].nodes[head])
    assert not view["complete"]
    assert "data gridmap: no value yet" in view["waiting_for"]
    with pytest.raises(Conflict):
        model.prepare_lock(cid, NOW)
    model.apply(model.prepare_data(cid, "gridmap", {"values": [{"b64": "aGk="}]}, NOW))
    model.apply(model.prepare_lock(cid, NOW))
    assert model.view(model.contexts[cid].nodes[head])["complete"]
    with pytest.raises(Conflict):
        model.prepare_data(cid, "gridmap", {"values": [{"b64": "aGk="}]}, NOW)


@pytest.mark.parametrize(
    "field, value",
    [
        ("hostname", "bad_host"),
        ("hostname", "-x"),
        ("fqdn", "a..b"),
        ("primary_ip", "fe80::1%eth0"),
        ("primary_ip", "999.1.1.1"),
        ("ssh_host_keys", ["ssh-ed25519 not;base64"]),
        ("ssh_host_keys", ["evil-type AAAA"]),
        ("interfaces", [{"name": "eth0;rm", "ipv4": []}]),
        ("interfaces", [{"name": "eth0", "ipv4": ["fd00::1"]}]),
    ],
)
def test_hostile_identity_rejected(field, value):
    """Identities with invalid names, addresses or keys are refused at enrollment."""
    model = Model()
    cid, _ = create(model)
    ident = identity(1)
    ident[field] = value
    with pytest.raises(BadRequest):
        model.prepare_enroll(cid, "head", {"instance_key": instance_key(1), "identity": ident}, "", NOW)


def test_replay_rebuilds_identical_state():
    """Applying the journaled records to a fresh model rebuilds the same state."""
    model = Model()
    records = []
    original_apply = model.apply

    def recording_apply(record):
        records.append(copy.deepcopy(record))
        return original_apply(record)

    model.apply = recording_apply
    cid, head, computes = full_torque(model)
    report(model, cid, head, "ok")
    report(model, cid, computes[0], "error", exit_code=4, message="m")
    replayed = Model()
    for record in records:
        replayed.apply(record)
    assert replayed.status(replayed.contexts[cid]) == model.status(model.contexts[cid])
    assert replayed.principals == model.principals


def test_deleted_context_is_freed_without_the_cycle_collector():
    """Its nodes and groups form no reference cycle: reference counting frees them, which is
    what frees the state of a context replayed at start-up (and then frozen) when it goes."""
    model = Model()
    gc.collect()
    gc.disable()
    try:
        cid, _, _ = full_torque(model)
        model.view(next(iter(model.contexts[cid].nodes.values())))   # fills the group view caches
        model.apply(model.prepare_delete(cid, NOW))
        assert gc.collect() == 0
    finally:
        gc.enable()


def test_delete_revokes_everything():
    """Deleting a context removes its join and node credentials."""
    model = Model()
    cid, head, _ = full_torque(model)
    model.apply(model.prepare_delete(cid, NOW))
    assert model.principals == {}
    with pytest.raises(NotFound):
        model.context(cid, NOW)
