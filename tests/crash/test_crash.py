"""kill -9 crash test (issue 4): no acknowledged change is lost, nothing unsent appears.

CI runs a few trials (CTXD_CRASH_TRIALS, default 3, a few seconds);
``make crash-test TRIALS=1000`` runs a long campaign. See harness.py.
"""

from __future__ import annotations

import os
import time

import pytest

from . import harness
from e2e.helpers import tail  # harness put tests/ on sys.path

TRIALS = int(os.environ.get("CTXD_CRASH_TRIALS", "3"))
CLIENTS = int(os.environ.get("CTXD_CRASH_CLIENTS", "32"))


@pytest.fixture(autouse=True)
def _components_present():
    reason = harness.components_missing()
    if reason:
        pytest.skip(reason)


def test_kill_9_loses_no_acknowledged_change(tmp_path):
    seed = int(os.environ["CTXD_CRASH_SEED"]) if os.environ.get("CTXD_CRASH_SEED") else None
    t0 = time.monotonic()
    camp = harness.Campaign(tmp_path, clients=CLIENTS, seed=seed)
    try:
        for _ in range(TRIALS):
            camp.trial()
    except BaseException:
        if camp.broker is not None:
            print("\n----- broker log (seed %d) -----\n%s" % (camp.seed, tail(camp.broker.log(), 100)))
        raise
    finally:
        camp.close()  # every broker this test started is killed, also on failure
    elapsed = time.monotonic() - t0
    print("\n" + camp.summary())
    print("(%.1fs, %d clients, %d in-doubt requests, seed %d)"
          % (elapsed, CLIENTS, camp.in_doubt, camp.seed))
    for m in camp.unexpected[:20]:
        print("unexpected answer: " + m)
    problems = camp.lost + camp.phantom
    assert camp.trials == TRIALS
    assert camp.acked > 0, "no change was acknowledged: the harness tested nothing"
    assert not problems, "seed %d:\n%s" % (camp.seed, "\n".join(problems[:50]))
    assert len(camp.lost) == 0


def test_checker_flags_lost_and_phantom_changes(tmp_path):
    """The verifier itself: a recovered state missing acknowledged changes, or holding
    unsent ones, is reported (no broker needed)."""
    S = harness.Sent
    ident = harness.identity
    log = harness.ClientLog(0, changes=[
        S("enroll", "h0", ident("h0", "10.0.0.1"), True, "N0"),
        S("enroll", "h1", ident("h1", "10.0.0.2"), True, "N1"),
        S("report", "N0", ("error", "m1"), True),
        S("data", "d0", "djE=", True),
        S("data", "d0", "djI=", False),  # in doubt
    ])

    def node(nid, host, ip, state, msg=None):
        return {"id": nid, "state": state, "identity": dict(ident(host, ip), source_address="127.0.0.1"),
                "error": {"exit_code": 3, "message": msg} if msg else None}

    def check(nodes, data):
        camp = harness.Campaign(tmp_path)
        camp.observers["C"] = ("OBS", "tok")
        camp._state = lambda cid: ({"nodes": nodes}, data)
        return camp.verify("C", [log], "OBS")

    # Enrolling makes a node contextualizing; N1 sent no report.
    good = [node("N0", "h0", "10.0.0.1", "error", "m1"), node("N1", "h1", "10.0.0.2", "contextualizing")]
    out = check(good, {"d0": [{"b64": "djE="}]})
    assert (out.lost, out.phantom, out.acked, out.in_doubt) == ([], [], 4, 1)
    assert check(good, {"d0": [{"b64": "djI="}]}).lost == []  # superseded by the in-doubt put
    assert check(good, {"d0": [{"b64": "djM="}]}).lost  # a value never sent
    assert check(good, {}).lost  # the acknowledged put is gone
    assert check(good[:1], {"d0": [{"b64": "djE="}]}).lost  # enrollment lost
    stale = [node("N0", "h0", "10.0.0.1", "contextualizing"), good[1]]
    assert check(stale, {"d0": [{"b64": "djE="}]}).lost  # last acknowledged report lost
    extra = good + [node("NX", "hx", "10.0.0.9", "contextualizing")]
    assert check([good[0], node("N1", "h1", "10.0.0.2", "error", "m9")], {"d0": [{"b64": "djE="}]}).phantom
    assert check(extra, {"d0": [{"b64": "djE="}]}).phantom  # a node never sent


def test_checker_flags_lost_removals_and_scale_changes():
    """The elastic part of the verifier: an acknowledged removal or scale change missing after the
    crash is lost; a departure nobody sent is a phantom."""
    S = harness.Sent
    log = harness.ClientLog(0, changes=[
        S("enroll", "h0", {}, True, "N0"), S("enroll", "h1", {}, True, "N1"), S("enroll", "h2", {}, True, "N2"),
        S("remove", "N0", None, True), S("remove", "N1", None, False),
        S("scale", "s0", 5, True), S("scale", "s0", 7, False),
    ])

    def check(departed, quantity):
        out = harness.Outcome()
        nodes = {nid: {"id": nid, "departed": d} for nid, d in zip(("N0", "N1", "N2"), departed)}
        harness.Campaign._check_elastic(log, nodes, {"s0": {"name": "s0", "quantity": quantity}}, out)
        return out.lost, out.phantom

    assert check(("removed", None, None), 5) == ([], [])
    assert check(("removed", "removed", None), 7) == ([], [])   # the in-doubt ones may or may not be in
    lost, phantom = check((None, None, None), 1)
    assert len(lost) == 2 and phantom == []
    lost, phantom = check(("removed", None, "lost"), 5)
    assert lost == [] and phantom == ["node N2 departed (lost) but no removal was sent"]
