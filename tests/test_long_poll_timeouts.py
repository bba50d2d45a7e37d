"""The long-poll waiters' timeouts (ctxd.broker._Timeouts) and what a waiter costs.

10,000 idle nodes each hold a long-poll; their timeouts share one reactor timer, and a
client that goes away takes its waiter with it through the request itself
(api.CappedRequest.connectionLost), not a notifyFinish Deferred per request.
"""

import random

import pytest
from support import Client, held_request, not_fired, result_of, torque
from twisted.internet.error import ConnectionDone
from twisted.python.failure import Failure

from ctxd.broker import UNCHANGED, _Timeouts
from ctxd.model import SITE_ADMIN

TICK = _Timeouts.TICK


@pytest.fixture
def client():
    return Client()


def wait_progress(client, cid, wait):
    """A progress long-poll (no per-node slot: any number may wait) and when it started."""
    ctx = client.broker.model.contexts[cid]
    return client.clock.seconds(), client.broker.get_progress(SITE_ADMIN, cid, ctx.progress_rev, wait)


def test_many_waiters_share_one_timer_and_each_times_out_within_a_tick_before_its_wait(client):
    """Waiters started at odd times with waits of 1..60 s: one DelayedCall at any moment, and each
    answers 304 no later than its wait and less than one tick before it."""
    cid, _, _ = torque(client)
    rnd = random.Random(7)
    waiters = []
    for _ in range(300):
        client.clock.advance(rnd.random() / 300)   # (all still waiting when the last starts)
        wait = rnd.randint(1, 60)
        start, d = wait_progress(client, cid, wait)
        answered = []
        d.addCallback(lambda result, answered=answered: answered.append((client.clock.seconds(), result)))
        waiters.append((start, wait, answered))
        assert len(client.clock.getDelayedCalls()) == 1
    assert client.broker.waiter_count() == 300
    while client.clock.getDelayedCalls():
        client.clock.advance(0.01)
    for start, wait, answered in waiters:
        assert len(answered) == 1 and answered[0][1] is UNCHANGED
        elapsed = answered[0][0] - start
        assert wait - TICK - 0.011 <= elapsed <= wait + 0.011, (start, wait, elapsed)
    assert client.broker.waiter_count() == 0


def test_the_timer_follows_the_earliest_waiter_and_goes_with_the_last(client):
    """A shorter wait added later moves the timer earlier; a waiter woken early leaves the
    others' timeouts alone; when no waiter is left no timer is either."""
    cid, joins, nodes = torque(client)
    _, long = wait_progress(client, cid, 50)
    (call,) = client.clock.getDelayedCalls()
    assert call.getTime() == 50
    _, short = wait_progress(client, cid, 5)
    (call,) = client.clock.getDelayedCalls()
    assert call.getTime() == 5
    short.cancel()   # (its client went away)
    client.clock.advance(5)
    assert not_fired(long) and client.broker.waiter_count() == 1
    (call,) = client.clock.getDelayedCalls()
    assert call.getTime() == 50
    client.clock.advance(45)
    assert result_of(long) is UNCHANGED
    assert client.clock.getDelayedCalls() == [] and client.broker.waiter_count() == 0
    _, woken = wait_progress(client, cid, 30)
    client.call("POST", f"/v1/contexts/{cid}/nodes/{nodes[1][0]}/report", nodes[1][1], {"state": "ok"})
    assert result_of(woken)["counts"]["ok"] == 1
    assert client.clock.getDelayedCalls() == [] and client.broker.waiter_count() == 0


def test_a_waiter_added_while_others_expire_keeps_its_timeout(client):
    """A client answered 304 that asks again at once (synchronously, inside the expiry) is
    timed out in its turn."""
    cid, _, _ = torque(client)
    again = []

    def repoll(result):
        again.append(wait_progress(client, cid, 10)[1])
        return result

    wait_progress(client, cid, 10)[1].addCallback(repoll)
    client.clock.advance(10)
    assert len(again) == 1 and not_fired(again[0])
    (call,) = client.clock.getDelayedCalls()
    assert call.getTime() == 20
    client.clock.advance(10)
    assert result_of(again[0]) is UNCHANGED and client.clock.getDelayedCalls() == []


def test_a_view_waiter_goes_with_its_connection(client):
    """Over the broker's own site (CappedRequest): a node's long-poll whose connection is lost
    leaves no waiter and no timer, and a later change writes nothing to it."""
    cid, joins, nodes = torque(client)
    nid, token = nodes[2]
    view_path = f"/v1/contexts/{cid}/nodes/{nid}/view"
    revision = client.call("GET", view_path, token)[1]["revision"]
    channel, transport = held_request(client, f"{view_path}?since={revision}&wait=30", token)
    assert client.broker.waiter_count() == 1 and transport.value() == b""
    request = channel.requests[0]
    assert request.ctxd_pending is not None
    channel.connectionLost(Failure(ConnectionDone()))
    assert request.ctxd_gone and request.ctxd_pending is None
    assert client.broker.waiter_count() == 0 and client.clock.getDelayedCalls() == []
    head, head_token = nodes[1]
    model = client.broker.model
    before = model.view_revision(model.node(cid, nid, client.clock.seconds()))
    status, _ = client.call("POST", f"/v1/contexts/{cid}/nodes/{head}/report", head_token, {"state": "ok"})
    assert status == 200   # the head is ready: the computes' views changed...
    assert model.view_revision(model.node(cid, nid, client.clock.seconds())) > before
    assert transport.value() == b""   # ...and nothing was written to the closed connection
