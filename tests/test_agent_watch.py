"""The agent's watch mode, in pieces (issue 13): the change plan, merging a delta view, and a
change applied with its scripts and environment. The whole loop against a real broker is in
tests/e2e/test_elastic.py."""

import copy
import json
import os

import pytest
import test_agent
from test_agent import CID, COMPUTE_ID, HEAD_ID, NID, make_script, peer, recorded, sample_view, scripts

import ctxagent

# The agent uses no library of ctxd's: `make test-debian` leaves these tests to `test-pypi`.
pytestmark = pytest.mark.agent

site = test_agent.site   # the fixture: a scripts dir recording every run, a state dir, system files

NEW_ID = "N" * 21 + "w"
H1 = ("10.1.0.1", "node-1", "node-1.cluster.example.org")
C2 = ("10.1.0.2", "node-2", "node-2.cluster.example.org")
C7 = ("10.1.0.7", "node-7", "node-7.cluster.example.org")


def grown(view=None):
    """sample_view with compute node-7 joined: provider of torquemaster, and in all_identities."""
    view = copy.deepcopy(view or sample_view())
    view["revision"] += 3
    view["roles"]["torquemaster"]["providers"].append(peer(NEW_ID, 7))
    view["all_identities"].append(peer(NEW_ID, 7))
    return view


def shrunk():
    """sample_view without compute node-2."""
    view = copy.deepcopy(sample_view())
    view["revision"] += 5
    view["roles"]["torquemaster"]["providers"] = [p for p in view["roles"]["torquemaster"]["providers"]
                                                  if p["node_id"] != COMPUTE_ID]
    view["all_identities"] = [p for p in view["all_identities"] if p["node_id"] != COMPUTE_ID]
    return view


def plan(old, new):
    return ctxagent.plan_change(ctxagent.validate_view(old, CID, NID), ctxagent.validate_view(new, CID, NID))


def test_a_join_runs_etchosts_ipandhost_and_the_role_restart():
    actions, joined, departed = plan(sample_view(), grown())
    assert scripts(actions) == [("0-etchosts.sh",) + C7, ("1-ipandhost/torquemaster",) + C7,
                                ("4-restarts/torquemaster",)]
    assert [(a.kind, a.target) for a in actions[:2]] == [("block", "hosts"), ("block", "known_hosts")]
    assert "10.1.0.7 node-7.cluster.example.org node-7" in actions[0].args
    assert [p.hostname for p in joined] == ["node-7"] and departed == []


def test_a_departure_runs_departed_and_the_role_restart():
    actions, joined, departed = plan(sample_view(), shrunk())
    assert scripts(actions) == [("6-departed/torquemaster",) + C2, ("4-restarts/torquemaster",)]
    assert not any("node-2" in line for line in actions[0].args)
    assert joined == [] and [p.hostname for p in departed] == ["node-2"]


def test_a_changed_peer_departs_with_its_old_values_and_joins_with_its_new_ones():
    new = copy.deepcopy(sample_view())
    new["revision"] += 1
    for where in (new["roles"]["zmaster"]["providers"], new["roles"]["torquemaster"]["providers"],
                  new["all_identities"]):
        for p in where:
            if p["node_id"] == HEAD_ID:
                p["ip"] = "10.1.0.99"
    actions, joined, departed = plan(sample_view(), new)
    moved = ("10.1.0.99",) + H1[1:]
    assert scripts(actions) == [
        ("6-departed/torquemaster",) + H1, ("6-departed/zmaster",) + H1, ("0-etchosts.sh",) + moved,
        ("1-ipandhost/torquemaster",) + moved, ("1-ipandhost/zmaster",) + moved,
        ("4-restarts/torquemaster",), ("4-restarts/zmaster",)]


def test_nothing_changed_nothing_to_do():
    same = dict(sample_view(), revision=99, waiting_for=["x"])
    assert plan(sample_view(), same) == ([], [], [])


def delta_of(new, since, peers=(), departed=()):
    doc = {k: new[k] for k in ("context_id", "node_id", "revision", "complete", "waiting_for", "state", "self",
                                "locked")}
    doc.update(delta=True, since=since, lease=None, group="compute", peers=list(peers), departed=list(departed))
    return doc


def test_merge_delta_rebuilds_the_full_view():
    old, new = sample_view(), grown()
    delta = delta_of(new, old["revision"], [dict(peer(NEW_ID, 7), roles=["torquemaster"], all=True)])
    merged = ctxagent.merge_delta(old, delta)
    assert ctxagent.validate_view(merged, CID, NID) == ctxagent.validate_view(dict(new, lease=None), CID, NID)
    gone = ctxagent.merge_delta(old, delta_of(shrunk(), old["revision"], departed=[COMPUTE_ID]))
    assert ctxagent.validate_view(gone, CID, NID) == ctxagent.validate_view(dict(shrunk(), lease=None), CID, NID)


@pytest.mark.parametrize("damage", [
    lambda d: d.update(context_id="X" * 22),
    lambda d: d.update(node_id=HEAD_ID),
    lambda d: d.update(peers="all"),
    lambda d: d.update(departed=[{"node_id": COMPUTE_ID}]),
    lambda d: d.update(departed=["../etc"]),
    lambda d: d["peers"].append(dict(peer(NEW_ID, 8), roles=["nosuchrole"], all=False)),
    lambda d: d["peers"].append(dict(peer(NEW_ID, 8), roles="torquemaster", all=False)),
    lambda d: d["peers"].append(dict(peer(NEW_ID, 8, hostname="-x; rm -rf /"), roles=["torquemaster"], all=True)),
    lambda d: d["peers"].append(dict(peer(NEW_ID, 8, hostname="node-1"), roles=["torquemaster"], all=True)),
    lambda d: d["peers"].append(dict(peer(NEW_ID, 8), roles=[["torquemaster"]], all=False)),
    lambda d: d.update(roles={"torquemaster": "many"}),
    lambda d: d.update(lease=-5),
    lambda d: d.update(lease="10m"),
    lambda d: d.update(lease=True),
])
def test_a_hostile_delta_is_refused(damage):
    """What a delta carries is checked like a full view: merged, then validated whole, before anything runs."""
    old = sample_view()
    delta = delta_of(grown(), old["revision"])
    damage(delta)
    with pytest.raises(ctxagent.InputError):
        ctxagent.validate_view(ctxagent.merge_delta(old, delta), CID, NID)


def test_merge_delta_takes_the_roles_counts():
    """A scale moves what a role expects: the delta says so, and the merged view (CTX_VIEW) shows it."""
    old = sample_view()
    delta = delta_of(old, old["revision"])
    delta.update(revision=old["revision"] + 1, complete=False, waiting_for=["role torquemaster: 2 of 3 providers ok"],
                 roles={"torquemaster": {"ready": True, "satisfied": False, "expected": 3}}, lease=600)
    merged = ctxagent.merge_delta(old, delta)
    assert merged["roles"]["torquemaster"] == dict(old["roles"]["torquemaster"], satisfied=False, expected=3)
    assert merged["roles"]["zmaster"] == old["roles"]["zmaster"]
    assert (merged["complete"], merged["lease"]) == (False, 600)
    assert ctxagent.view_progress(merged)[1] is False


def test_a_change_runs_with_its_event_and_peers_in_the_environment(site):
    tmp_path, paths = site
    for name in ("1-ipandhost/torquemaster", "6-departed/torquemaster", "4-restarts/torquemaster"):
        make_script(tmp_path / "scripts" / name,
                    "with open(os.environ['RECORD'] + '.env', 'a') as f:\n"
                    "    f.write(json.dumps({k: v for k, v in os.environ.items() if k.startswith('CTX_')}) + '\\n')\n")
    new = grown(shrunk())
    assert ctxagent.apply_view(new, CID, NID, paths, 10, previous=sample_view()) is True
    assert [tuple(r) for r in recorded(tmp_path)] == [
        ("6-departed/torquemaster",) + C2, ("0-etchosts.sh",) + C7, ("1-ipandhost/torquemaster",) + C7,
        ("4-restarts/torquemaster",)]
    envs = [json.loads(line) for line in (tmp_path / "record.env").read_text().splitlines()]
    assert {e["CTX_EVENT"] for e in envs} == {"change"}
    assert {e["CTX_JOINED"] for e in envs} == {",".join(C7)}
    assert {e["CTX_DEPARTED"] for e in envs} == {",".join(C2)}
    hosts = (tmp_path / "hosts").read_text()
    assert "node-7" in hosts and "node-2" not in hosts and hosts.startswith("127.0.0.1 localhost\n")
    assert json.loads(open(os.path.join(paths.state_dir, "view.json")).read()) == new
    # clean.sh and the data scripts are for the initial run only.
    assert not any(r[0] in ("clean.sh",) or r[0].startswith("3-data") for r in recorded(tmp_path))


def test_an_incomplete_view_applies_only_when_resuming(site):
    tmp_path, paths = site
    incomplete = dict(sample_view(), complete=False, waiting_for=["role x: 1 of 2 providers ok"])
    with pytest.raises(ctxagent.InputError):
        ctxagent.apply_view(incomplete, CID, NID, paths, 10)
    assert recorded(tmp_path) == []
    assert ctxagent.apply_view(incomplete, CID, NID, paths, 10, resume=True) is True
    assert recorded(tmp_path)[0] == ["clean.sh"]


def test_watch_options():
    o = ctxagent.parse_args(["--bootstrap", "x", "--watch", "--settle", "0.5", "--settle-max", "9"])
    assert (o.watch, o.settle, o.settle_max, o.leave) == (True, 0.5, 9.0, False)
    o = ctxagent.parse_args(["--bootstrap", "x"])
    assert (o.watch, o.settle, o.settle_max) == (False, 2.0, 30.0)
    assert ctxagent.main(["--bootstrap", "x", "--settle", "0"]) == ctxagent.EXIT_CONFIG
