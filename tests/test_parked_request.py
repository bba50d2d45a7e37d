"""A request whose answer comes later (a long-poll) lets go of what answering it does not use.

Over the broker's own site (api.make_site: CappedRequest and its channel) on a StringTransport:
what a waiting request still holds, and that its answer, its metrics and the connection's next
request are what they would have been.
"""

import gc
import types

import pytest
from twisted.internet.defer import Deferred
from twisted.web.http_headers import Headers

from ctxd import api
from support import ADMIN_TOKEN, Client, held_request, torque


@pytest.fixture
def client():
    return Client()


def _waiting_view(client, access_log=False, headers=None):
    """A compute's long-poll waiting, on a site with the daemon's default (no access log)."""
    cid, joins, nodes = torque(client)
    nid, token = nodes[2]
    path = f"/v1/contexts/{cid}/nodes/{nid}/view"
    revision = client.call("GET", path, token)[1]["revision"]
    channel, transport = held_request(client, f"{path}?since={revision}&wait=30", token, access_log=access_log,
                                      headers=headers)
    assert client.broker.waiter_count() == 1 and transport.value() == b""
    return cid, nid, token, path, channel, transport


def _reachable_copies(token, *roots):
    """The strings holding ``token`` reachable from ``roots`` through instances and containers
    (not through modules, classes or functions: the whole program is behind those)."""
    needle, seen, found, todo = token.encode(), set(), [], list(roots)
    while todo:
        obj = todo.pop()
        if id(obj) in seen or isinstance(obj, (types.ModuleType, type, types.FunctionType, types.MethodType)):
            continue
        seen.add(id(obj))
        if isinstance(obj, (bytes, bytearray, str)):
            if needle in (obj.encode("utf-8", "replace") if isinstance(obj, str) else bytes(obj)):
                found.append(obj)
            continue
        todo.extend(gc.get_referents(obj))
    return found


def _response(transport):
    head, _, body = transport.value().partition(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    headers = {name.lower(): value for name, value in (line.split(b": ", 1) for line in lines[1:])}
    return lines[0], headers, body


def test_a_waiting_long_poll_keeps_neither_token_nor_parsed_request(client):
    _, _, token, _, channel, _ = _waiting_view(client)
    request = channel.requests[0]
    assert request.getHeader(b"authorization") is None
    assert list(request.requestHeaders.getAllRawHeaders()) == []
    assert request.args == {} and request.received_cookies == {}
    assert request.postpath is None and request.prepath is None and request.content is None
    assert request.host is None and request.getClientAddress() is not None
    assert not _reachable_copies(token, request, channel)
    # The shared empty headers cannot be written to by mistake.
    with pytest.raises(RuntimeError):
        request.requestHeaders.setRawHeaders(b"x", [b"y"])
    with pytest.raises(RuntimeError):
        request.responseHeaders.addRawHeader(b"x", b"y")


def test_its_answer_has_fresh_headers_and_the_connection_goes_on(client):
    _, _, token, path, channel, transport = _waiting_view(client)
    client.clock.advance(30)
    status, headers, body = _response(transport)
    assert status == b"HTTP/1.1 304 Not Modified" and body == b""
    assert headers[b"cache-control"] == b"no-store"
    assert headers[b"server"].startswith(b"TwistedWeb/") and headers[b"date"].endswith(b" GMT")
    assert b"connection" not in headers   # kept alive: the next request on it is answered
    transport.clear()
    channel.dataReceived(f"GET {path} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}\r\n\r\n".encode())
    status, headers, body = _response(transport)
    assert status == b"HTTP/1.1 200 OK" and headers[b"content-type"] == b"application/json"
    assert int(headers[b"content-length"]) == len(body) > 0


def test_a_node_revoked_while_it_waits_is_counted_by_its_credential_kind(client):
    cid, nid, token, _, channel, transport = _waiting_view(client)
    registry = client.broker.metrics.registry
    before = registry.get_sample_value("ctxd_auth_failures_total", {"kind": "ctxd_node_"}) or 0
    status, _ = client.call("POST", f"/v1/contexts/{cid}/nodes/{nid}/revoke", ADMIN_TOKEN)
    assert status == 200
    line, headers, body = _response(transport)
    assert line == b"HTTP/1.1 401 Unauthorized" and b'"unauthorized"' in body
    assert headers[b"date"].endswith(b" GMT")
    assert registry.get_sample_value("ctxd_auth_failures_total", {"kind": "ctxd_node_"}) == before + 1
    assert registry.get_sample_value("ctxd_auth_failures_total", {"kind": "none"}) is None


def test_with_the_access_log_a_waiting_request_keeps_its_headers(client):
    _, _, token, _, channel, transport = _waiting_view(client, access_log=True)
    request = channel.requests[0]
    assert request.getHeader(b"authorization") == f"Bearer {token}".encode()
    assert _reachable_copies(token, request)   # (what the walk above finds when it is there)
    assert request.args == {} and request.postpath is None   # (the rest is let go of all the same)
    client.clock.advance(30)
    assert _response(transport)[0] == b"HTTP/1.1 304 Not Modified"


def test_the_shared_empty_headers_are_headers():
    assert isinstance(api._NO_HEADERS, Headers) and api._NO_HEADERS.getRawHeaders(b"host") is None


def test_the_answer_date_is_the_current_second(monkeypatch):
    """The Date of answered long-polls, made once a second."""
    from twisted.web import http

    now = [1_800_000_000.25]
    monkeypatch.setattr(api.time, "time", lambda: now[0])
    assert api._http_date() == http.datetimeToString(1_800_000_000)
    now[0] += 0.5
    assert api._http_date() == http.datetimeToString(1_800_000_000)
    now[0] += 1
    assert api._http_date() == http.datetimeToString(1_800_000_001) != http.datetimeToString(1_800_000_000)


def test_a_request_that_asked_to_close_is_still_told_so(client):
    """An HTTP/1.1 long-poll with Connection: close gets it back in its answer, and the close."""
    *_, channel, transport = _waiting_view(client, headers={"Connection": "close"})
    assert channel.requests[0].requestHeaders is api._NO_HEADERS
    client.clock.advance(30)
    status, headers, _ = _response(transport)
    assert status == b"HTTP/1.1 304 Not Modified" and headers[b"connection"] == b"close"
    assert transport.disconnecting


def test_only_a_long_poll_is_parked(client, monkeypatch):
    """A change waiting for the journal (answered within milliseconds) keeps its request whole."""
    cid, joins, nodes = torque(client)
    nid, token = nodes[2]
    monkeypatch.setattr(api.BrokerResource, "_dispatch", lambda self, request: Deferred())
    body = b'{"state": "ok"}'
    channel, _ = held_request(client, f"/v1/contexts/{cid}/nodes/{nid}/report", token, access_log=False,
                              method="POST", headers={"Content-Type": "application/json"}, body=body)
    request = channel.requests[0]
    assert request.ctxd_pending is not None   # waiting...
    assert request.getHeader(b"authorization") == f"Bearer {token}".encode()   # ...and not parked
    assert request.content is not None and request.postpath is not None
