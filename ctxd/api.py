"""The HTTP face of the broker: one route table, thin handlers, JSON in and out.

:data:`ROUTES` is the single list of endpoints; docs/openapi.yaml is checked against
it by a test. Parsing (content type and size before JSON decoding) and rendering
(domain errors to status codes; anything unexpected to a bare 500) each live in one
helper.
"""

import json
import re
import time
from io import BytesIO
from types import MappingProxyType
from typing import Any, Callable, Dict, List, NamedTuple, Optional, Sequence, Tuple

from twisted.internet.defer import CancelledError, Deferred, maybeDeferred
from twisted.internet.interfaces import IPushProducer
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web import http, resource, server
from twisted.web.http_headers import Headers
from zope.interface import implementer  # type: ignore[import-untyped]

import ctxd
from ctxd import rules, tokens, validate
from ctxd.broker import UNCHANGED, Broker, Enrollment
from ctxd.errors import (
    BadRequest,
    Conflict,
    Forbidden,
    IdentityConflict,
    IdentityRefused,
    CertificateRefused,
    InternalError,
    InvalidCluster,
    InvalidName,
    JoinTokenExpired,
    MethodNotAllowed,
    NotFound,
    QuotaExceeded,
    RequestError,
    TooLarge,
    TooManyRequests,
    Unauthorized,
    Unavailable,
    UnsupportedMediaType,
)
from ctxd.metrics import QuietSite
from ctxd.model import JSONChunks, Principal, json_bytes
from ctxd.tlsserver import client_certificate_name

log = Logger()

#: The HTTP status answering each domain error (the most specific class listed wins).
STATUS: Dict[type, int] = {
    RequestError: 400,
    BadRequest: 400,
    InvalidName: 400,
    InvalidCluster: 400,
    Unauthorized: 401,
    Forbidden: 403,
    NotFound: 404,
    MethodNotAllowed: 405,
    Conflict: 409,
    QuotaExceeded: 409,
    IdentityConflict: 409,
    IdentityRefused: 403,
    CertificateRefused: 403,
    JoinTokenExpired: 410,
    TooLarge: 413,
    UnsupportedMediaType: 415,
    TooManyRequests: 429,
    InternalError: 500,
    Unavailable: 503,
}


def status_of(error: RequestError) -> int:
    """The HTTP status for ``error``: that of its nearest class in :data:`STATUS`."""
    for cls in type(error).__mro__:
        if cls in STATUS:
            return STATUS[cls]
    raise AssertionError(f"{type(error).__name__} is not a RequestError")

# Who may call a route:
#   none        anybody
#   site-admin  the site admin token only
#   deployer    the site admin or any deployer
#   owner       the site admin or the deployer who created the context {cid}
#   join        a join token of the context {cid}
#   node        the node credential of the node {nid}
NONE, SITE_ADMIN, DEPLOYER, OWNER, JOIN, NODE = "none", "site-admin", "deployer", "owner", "join", "node"
# Refusals of a request from no one, or from a VM (a join or node credential): counted in the
# audit log rather than written one by one (ctxd.audit).
REFUSALS = (401, 403, 409, 429)
AUTH_KINDS = (NONE, SITE_ADMIN, DEPLOYER, OWNER, JOIN, NODE)


class Raw(NamedTuple):
    """A reply that is not JSON: its content type, its bytes and any further headers."""

    content_type: bytes
    data: bytes
    headers: Tuple[Tuple[bytes, bytes], ...] = ()


class Route(NamedTuple):
    method: str
    template: str
    handler: str
    auth: str
    body: str  # "none" | "required" | "optional"
    status: int = 200  # on success (an enrollment says 201 or 200 itself; an unchanged long-poll is 304)


ROUTES: Tuple[Route, ...] = (
    Route("GET", "/healthz", "health", NONE, "none"),
    Route("GET", "/v1/agent", "get_agent", NONE, "none"),
    Route("GET", "/v1/users", "list_users", SITE_ADMIN, "none"),
    Route("POST", "/v1/users", "add_user", SITE_ADMIN, "required", 201),
    Route("DELETE", "/v1/users/{user}", "revoke_user", SITE_ADMIN, "none"),
    Route("GET", "/v1/contexts", "list_contexts", DEPLOYER, "none"),
    Route("POST", "/v1/contexts", "create_context", DEPLOYER, "required", 201),
    Route("GET", "/v1/contexts/{cid}", "get_context", OWNER, "none"),
    Route("GET", "/v1/contexts/{cid}/progress", "get_progress", OWNER, "none"),
    Route("DELETE", "/v1/contexts/{cid}", "delete_context", OWNER, "none"),
    Route("PUT", "/v1/contexts/{cid}/data/{name}", "put_data", OWNER, "required"),
    Route("POST", "/v1/contexts/{cid}/lock", "lock", OWNER, "optional"),
    Route("POST", "/v1/contexts/{cid}/groups/{group}/join-token", "rotate_join_token", OWNER, "optional"),
    Route("POST", "/v1/contexts/{cid}/nodes/{nid}/revoke", "revoke_node", OWNER, "optional"),
    Route("POST", "/v1/contexts/{cid}/groups/{group}/scale", "scale", OWNER, "required"),
    Route("POST", "/v1/contexts/{cid}/nodes/{nid}/remove", "remove_node", OWNER, "optional"),
    Route("POST", "/v1/contexts/{cid}/extend", "extend", OWNER, "required"),
    Route("GET", "/v1/contexts/{cid}/ca", "get_cas", OWNER, "none"),
    Route("POST", "/v1/contexts/{cid}/enroll", "enroll", JOIN, "required"),
    Route("PUT", "/v1/contexts/{cid}/nodes/{nid}/identity", "put_identity", NODE, "required"),
    Route("GET", "/v1/contexts/{cid}/nodes/{nid}/view", "get_view", NODE, "none"),
    Route("GET", "/v1/contexts/{cid}/nodes/{nid}/scripts", "get_scripts", NODE, "none"),
    Route("POST", "/v1/contexts/{cid}/nodes/{nid}/report", "report", NODE, "required"),
    Route("POST", "/v1/contexts/{cid}/nodes/{nid}/leave", "leave", NODE, "optional"),
    Route("POST", "/v1/contexts/{cid}/nodes/{nid}/credentials", "credentials", NODE, "required"),
)

_PARAM_CHECKS: Dict[str, Callable[[str], Any]] = {
    # An id of the wrong shape can name nothing: answer as for an unknown one.
    "cid": lambda v: _must(rules.is_id(v), "no such context"),
    "nid": lambda v: _must(rules.is_id(v), "no such node"),
    "name": lambda v: validate.name(v, "data name"),
    "group": lambda v: validate.name(v, "group name"),
    "user": lambda v: validate.name(v, "deployer name"),
}


def _must(ok: Any, message: str) -> None:
    if not ok:
        raise NotFound(message)


def _compile(template: str) -> "re.Pattern[str]":
    return re.compile("^" + re.sub(r"\{(\w+)\}", r"(?P<\1>[^/]+)", template) + "$")


_COMPILED = [(route, _compile(route.template)) for route in ROUTES]


def match(method: str, path: str) -> Tuple[Route, Dict[str, str]]:
    """The route for ``method path`` and its parameters, or NotFound/MethodNotAllowed."""
    allowed = []
    for route, pattern in _COMPILED:
        m = pattern.match(path)
        if m:
            if route.method == method:
                return route, m.groupdict()
            allowed.append(route.method)
    if allowed:
        raise MethodNotAllowed(f"{method} is not allowed here (allowed: {', '.join(allowed)})")
    raise NotFound("no such resource")


def _bearer(request: server.Request) -> Optional[str]:
    """The bearer token of the Authorization header: None without one, "" for one that cannot
    be ours (another scheme, or bytes that are not ASCII)."""
    header = request.getHeader(b"authorization")
    if header is None:
        return None
    try:
        text = header.decode("ascii")
    except UnicodeDecodeError:
        return ""
    scheme, _, value = text.partition(" ")
    if scheme.lower() != "bearer":
        return ""
    return value.strip()


def _reject_constant(name: str) -> None:
    raise ValueError(f"{name} is not allowed")


def read_json(request: server.Request, max_body: int) -> Any:
    """Decode the request body as a JSON document, checking type and size first."""
    ctype = (request.getHeader("content-type") or "").split(";")[0].strip().lower()
    if ctype != "application/json":
        raise UnsupportedMediaType("the body must be application/json")
    raw = request.content.read(max_body + 1)
    if len(raw) > max_body:
        raise TooLarge(f"the body is larger than {max_body} bytes")
    try:
        document = json.loads(raw.decode("utf-8"), parse_constant=_reject_constant)
        # "\ud800" escapes decode to lone surrogates, which no UTF-8 reader downstream
        # (logs, terminals, ctxctl) can print: refuse them here. (Valid UTF-8 holds no
        # surrogate: only a \u escape can make one, and most bodies have none.)
        if b"\\u" in raw:
            json.dumps(document, ensure_ascii=False).encode("utf-8")
        return document
    except (ValueError, UnicodeError, RecursionError) as e:
        raise BadRequest(f"the body is not valid JSON: {str(e)[:120]}") from None


def _query_int(request: server.Request, name: str, default: Optional[int]) -> Optional[int]:
    values = request.args.get(name.encode())
    if not values:
        return default
    try:
        return int(values[0].decode("ascii"))
    except (ValueError, UnicodeDecodeError):
        raise BadRequest(f"{name}: must be an integer") from None


def _long_poll_args(request: server.Request) -> Tuple[Optional[int], int]:
    """A long-poll's ``since`` (None without one) and ``wait`` (0 without one; its range is the broker's)."""
    return _query_int(request, "since", None), _query_int(request, "wait", 0) or 0


# Bodies larger than this are written as the connection drains (_BodyProducer), not at once.
STREAM_ABOVE = 64 * 1024


@implementer(IPushProducer)
class _BodyProducer:
    """Writes a response body a slice at a time, pausing whenever the connection's buffer
    is full (the transport pauses it) and going on when it drains.

    Written at once, a body is encrypted into the connection's buffer whole: when the
    last node of a large all_identities cluster reports, every node's view would be held
    at the same time. Streamed, each connection holds what is in flight, and the chunks
    themselves - the group's shared part above all - exist once.
    """

    SLICE = STREAM_ABOVE

    def __init__(self, request: server.Request, chunks: Sequence[bytes], clock: Any, stall_timeout: float) -> None:
        self.request: Optional[server.Request] = request
        self.chunks = list(chunks)
        self.offset = 0
        self.paused = False
        # The channel's idle timeout is off until the request finishes: a reader that stops
        # reading (a zero window) would hold the connection, its budget slot and these
        # chunks for good. Paused longer than this, the connection is cut.
        self.clock = clock
        self.stall_timeout = stall_timeout
        self.stalled: Any = None

    def start(self) -> None:
        assert self.request is not None
        self.request.registerProducer(self, True)
        self.resumeProducing()

    def resumeProducing(self) -> None:
        self.paused = False
        self._stop_stall_timer()
        # Each write may pause us (synchronously) when the transport's buffer fills up.
        while self.request is not None and not self.paused:
            if not self.chunks:
                request, self.request = self.request, None
                request.unregisterProducer()
                request.finish()
                return
            chunk = self.chunks[0]
            piece = chunk if self.offset == 0 and len(chunk) <= self.SLICE else chunk[self.offset:self.offset + self.SLICE]
            self.offset += len(piece)
            if self.offset >= len(chunk):
                self.chunks.pop(0)
                self.offset = 0
            self.request.write(piece)

    def pauseProducing(self) -> None:
        self.paused = True
        if self.stalled is None and self.request is not None:
            self.stalled = self.clock.callLater(self.stall_timeout, self._stalled)

    def stopProducing(self) -> None:
        # The connection went away: CappedRequest.connectionLost does the rest.
        self._stop_stall_timer()
        self.request = None
        self.chunks = []

    def _stop_stall_timer(self) -> None:
        if self.stalled is not None:
            if self.stalled.active():
                self.stalled.cancel()
            self.stalled = None

    def _stalled(self) -> None:
        self.stalled = None
        request = self.request
        if request is None or request.channel is None:
            return
        log.info("cutting a connection that read nothing of a response for {seconds} s",
                 seconds=self.stall_timeout)
        transport = request.channel.transport
        getattr(transport, "abortConnection", transport.loseConnection)()


class BrokerResource(resource.Resource):
    """The whole API as one leaf resource dispatching on :data:`ROUTES`."""

    isLeaf = True

    def __init__(self, broker: Broker, max_body: int = rules.MAX_BODY, stall_timeout: float = 120.0) -> None:
        super().__init__()
        self.broker = broker
        self.max_body = max_body
        self.stall_timeout = stall_timeout

    def render(self, request: server.Request) -> Any:
        request.ctxd_started = self.broker.clock.seconds()
        d = maybeDeferred(self._dispatch, request)
        if not d.called:
            # A long-poll (or a write waiting for the journal): cancelled if the client goes
            # away. CappedRequest.connectionLost does it without a notifyFinish Deferred and
            # callback per request (10,000 idle nodes hold 10,000 of these); a plain Request
            # (a test's StubTreq) through notifyFinish.
            if isinstance(request, CappedRequest):
                request.ctxd_pending = d
                if request.method == b"GET":
                    # A long-poll, which may wait minutes. (A change waiting for the journal
                    # is answered within milliseconds: parking would cost more than it saves.)
                    request.park()
            else:
                request.notifyFinish().addErrback(_went_away, request, d)
        # Module functions and one shared arguments tuple: of what a waiting request holds, the
        # fewest objects (bound methods and tuples, times 10,000 idle nodes).
        args = (self, request)
        d.addCallbacks(_answer, _failed, callbackArgs=args, errbackArgs=args)
        return server.NOT_DONE_YET


    def _dispatch(self, request: server.Request) -> Any:
        try:
            path = request.path.decode("ascii")
            method = request.method.decode("ascii")
        except UnicodeDecodeError:
            raise NotFound("no such resource") from None
        route, params = match(method, path)
        request.ctxd_route = route
        principal = None
        if route.auth != NONE:
            token = _bearer(request)
            if route.auth == JOIN:
                self.broker.limit_enrollment(_source(request), token)
            principal = self.broker.authenticate(token, self.client_name(request) if token is None else None)
            request.ctxd_principal = principal
            if route.auth == SITE_ADMIN:
                self.broker.require_admin(principal)
            elif route.auth in (DEPLOYER, OWNER):
                self.broker.require_deployer(principal)
        for key, value in params.items():
            _PARAM_CHECKS[key](value)
        body = None
        if route.body == "required" or (route.body == "optional" and request.getHeader("content-type")):
            body = read_json(request, self.max_body)
        return getattr(self, "_" + route.handler)(request, principal, body, **params)

    # -- handlers: unpack, call the broker ---------------------------------------

    def _health(self, request, principal, body):
        return {"status": "ok", "version": ctxd.__version__}

    def _get_agent(self, request, principal, body):
        """The agent VMs may fetch (public code; ctxctl's user-data pins its SHA-256)."""
        if self.broker.agent is None:
            raise NotFound("this broker has no ctxagent.py to serve")
        return Raw(b"text/x-python; charset=utf-8", self.broker.agent,
                   ((b"x-ctxd-agent-sha256", self.broker.agent_sha256.encode("ascii")),))

    def _list_users(self, request, principal, body):
        return self.broker.list_users()

    def _add_user(self, request, principal, body):
        return self.broker.add_user(body)

    def _revoke_user(self, request, principal, body, user):
        return self.broker.revoke_user(user)

    def _list_contexts(self, request, principal, body):
        return self.broker.list_contexts(principal)

    def _create_context(self, request, principal, body):
        return self.broker.create_context(principal, body)

    def _get_context(self, request, principal, body, cid):
        return self.broker.get_context(principal, cid)

    def _get_progress(self, request, principal, body, cid):
        since, wait = _long_poll_args(request)
        return self.broker.get_progress(principal, cid, since, wait)

    def _delete_context(self, request, principal, body, cid):
        return self.broker.delete_context(principal, cid)

    def _put_data(self, request, principal, body, cid, name):
        return self.broker.put_data(principal, cid, name, body)

    def _lock(self, request, principal, body, cid):
        _empty_body(body, "lock")
        return self.broker.lock(principal, cid)

    def _rotate_join_token(self, request, principal, body, cid, group):
        _empty_body(body, "join-token rotation")
        return self.broker.rotate_join_token(principal, cid, group)

    def _revoke_node(self, request, principal, body, cid, nid):
        _empty_body(body, "revoke")
        return self.broker.revoke_node(principal, cid, nid)

    def _enroll(self, request, principal, body, cid):
        return self.broker.enroll(principal, cid, body, _source(request))

    def _put_identity(self, request, principal, body, cid, nid):
        return self.broker.put_identity(principal, cid, nid, body, _source(request))

    def _get_view(self, request, principal, body, cid, nid):
        since, wait = _long_poll_args(request)
        delta = _query_int(request, "delta", 0)
        if delta not in (0, 1):
            raise BadRequest("delta: must be 0 or 1")
        return self.broker.get_view(principal, cid, nid, since, wait, delta == 1)

    def _get_scripts(self, request, principal, body, cid, nid):
        scripts = self.broker.get_scripts(principal, cid, nid)
        digest = self.broker.model.contexts[cid].scripts_sha256
        return Raw(b"application/gzip", scripts, ((b"x-ctxd-scripts-sha256", digest.encode("ascii")),))

    def _leave(self, request, principal, body, cid, nid):
        _empty_body(body, "leave")
        return self.broker.leave(principal, cid, nid)

    def _scale(self, request, principal, body, cid, group):
        return self.broker.scale(principal, cid, group, body)

    def _remove_node(self, request, principal, body, cid, nid):
        return self.broker.remove_node(principal, cid, nid, body)

    def _extend(self, request, principal, body, cid):
        return self.broker.extend(principal, cid, body)

    def _get_cas(self, request, principal, body, cid):
        return self.broker.get_cas(principal, cid)

    def _credentials(self, request, principal, body, cid, nid):
        return self.broker.credentials(principal, cid, nid, body, _source(request))

    def _report(self, request, principal, body, cid, nid):
        return self.broker.report(principal, cid, nid, body)

    # -- rendering ---------------------------------------------------------

    def client_name(self, request: server.Request) -> Optional[str]:
        """The verified client certificate's name (mutual TLS), if any."""
        return client_certificate_name(request)

    def _audit(self, request: server.Request, status: int) -> None:
        route = getattr(request, "ctxd_route", None)
        principal = getattr(request, "ctxd_principal", None)
        if route is None:
            return
        refused = status in REFUSALS and (principal is None or principal.kind in ("join", "node"))
        if route.auth in (NONE, NODE) and not refused:
            return  # routine agent traffic: not an action worth an audit line
        try:
            if refused:
                # Counted, not written one by one: refusals are what a flood is made of.
                credential = _credential_of(request) if principal is None else ""
                self.broker.audit.refused(_source(request), _principal_name(principal), credential,
                                          route.handler, status)
            else:
                self.broker.audit.write(_principal_name(principal), route.handler,
                                        request.path.decode("ascii", "replace"), _source(request), status)
        except OSError as e:
            log.error("cannot write the audit log: {error}", error=e)

    def _count(self, request: server.Request, status: int) -> None:
        """The request in the metrics: by route and status, its time, and why it was refused."""
        metrics = self.broker.metrics
        route = getattr(request, "ctxd_route", None)
        name = route.handler if route is not None else "unrouted"
        metrics.requests.labels(name, str(status)).inc()
        metrics.request_seconds.labels(name).observe(self.broker.clock.seconds() - request.ctxd_started)
        code = getattr(request, "ctxd_error", None)
        if code is not None:
            metrics.refusals.labels(code).inc()
            if status == 401:
                metrics.auth_failures.labels(_credential_of(request)).inc()
        if name == "enroll":
            metrics.enrollments.labels({201: "new", 200: "again"}.get(status, code or str(status))).inc()

    def credential_known(self, request: server.Request) -> bool:
        """Whether the request's credential (bearer token, or a verified client certificate)
        belongs to someone; checked when the headers are in, before any body is read."""
        token = _bearer(request)
        try:
            self.broker.authenticate(token, self.client_name(request) if token is None else None)
        except RequestError:
            return False
        return True

    def refused_early(self, request: server.Request, status: int) -> None:
        """Count and audit a request answered before it was routed (no credential, a body too large)."""
        metrics = self.broker.metrics
        metrics.requests.labels("before_body", str(status)).inc()
        metrics.refusals.labels(Unauthorized.code if status == 401 else TooLarge.code).inc()
        token = _bearer(request) if status == 401 else None
        if status == 401:
            metrics.auth_failures.labels(_credential_kind(token)).inc()
        try:
            self.broker.audit.refused(_source(request), "anonymous", _credential_kind(token) if status == 401
                                      else "", "before_body", status)
        except OSError as e:
            log.error("cannot write the audit log: {error}", error=e)

    def _respond(self, result: Tuple[int, Any], request: server.Request) -> None:
        request.ctxd_pending = None
        if getattr(request, "ctxd_gone", False):
            return
        if isinstance(request, CappedRequest):
            request.unpark()
        status, body = result
        self._audit(request, status)
        self._count(request, status)
        request.setResponseCode(status)
        request.setHeader("cache-control", "no-store")
        if body is not None:
            content_type = b"application/json"
            if isinstance(body, Raw):
                content_type, chunks = body.content_type, (body.data,)
                for name, value in body.headers:
                    request.setHeader(name, value)
            else:
                chunks = body.chunks if isinstance(body, JSONChunks) else (json_bytes(body),)
            request.setHeader("content-type", content_type)
            size = sum(len(c) for c in chunks)
            request.setHeader("content-length", str(size))
            if size > STREAM_ABOVE:
                _BodyProducer(request, chunks, self.broker.clock, self.stall_timeout).start()
                return
            for chunk in chunks:
                request.write(chunk)
        request.finish()

    def _fail(self, failure: Failure, request: server.Request) -> None:
        request.ctxd_pending = None
        gone = getattr(request, "ctxd_gone", False)
        if failure.check(CancelledError) and gone:
            return
        if failure.check(RequestError):
            error = failure.value
        else:
            log.failure("unexpected error answering {method} {path}", failure,
                        method=request.method, path=request.path)
            error = InternalError("internal error")
        if gone:
            return
        if isinstance(request, CappedRequest):
            request.unpark()
        if isinstance(error, TooManyRequests):
            request.setHeader("retry-after", str(error.retry_after))
        if isinstance(error, MethodNotAllowed):
            route_methods = [r.method for r, p in _COMPILED if p.match(request.path.decode("ascii", "replace"))]
            request.setHeader("allow", ", ".join(route_methods))
        request.ctxd_error = error.code
        self._respond((status_of(error), {"error": error.code, "message": error.message}), request)


def _answer(result: Any, resource: BrokerResource, request: server.Request) -> None:
    """A handler's domain result, answered with the status its route maps it to."""
    resource._respond(_reply(result, request.ctxd_route), request)


def _failed(failure: Failure, resource: BrokerResource, request: server.Request) -> None:
    resource._fail(failure, request)


def _went_away(_: Failure, request: server.Request, pending: Deferred) -> None:
    request.ctxd_gone = True
    pending.cancel()


def _reply(result: Any, route: Route) -> Tuple[int, Any]:
    """The HTTP status and body answering a handler's domain result."""
    if result is UNCHANGED:
        return 304, None
    if isinstance(result, Enrollment):
        return (201 if result.new else 200), result.body
    return route.status, result


def _empty_body(body: Any, what: str) -> None:
    if body not in (None, {}):
        raise BadRequest(f"{what} takes an empty body")


def _principal_name(principal: Optional[Principal]) -> str:
    if principal is None:
        return "anonymous"
    kind, cid, subject = principal
    if kind == "admin":
        return "admin"
    if kind == "deployer":
        return f"deployer:{subject}"
    return f"{kind}:{cid}/{subject}"


def _credential_kind(token: Optional[str]) -> str:
    """What kind of credential was presented, without any of its secret part."""
    if token is None:
        return "none"
    for prefix in tokens.PREFIXES:
        if token.startswith(prefix) and tokens.well_formed(token):
            return prefix
    return "malformed"


def _credential_of(request: server.Request) -> str:
    """The kind of credential the request presented (a parked request noted it when it let
    go of its headers)."""
    noted = getattr(request, "ctxd_credential", None)
    return noted if noted is not None else _credential_kind(_bearer(request))


def _source(request: server.Request) -> str:
    address = request.getClientAddress()
    return getattr(address, "host", "") or ""


_EARLY_REPLY = (
    b"HTTP/1.1 %d %s\r\n"
    b"Content-Type: application/json\r\n"
    b"Connection: close\r\n"
    b"Content-Length: %d\r\n\r\n%s"
)


class CappedRequest(server.Request):
    """A request whose body may not exceed ``max_body`` bytes, and is read only for a
    credential the broker knows.

    twisted.web has no body limit and spools large bodies to temporary files; here
    an over-long declared length is refused before any of the body is read, and a
    chunked body is counted as it arrives. Either way nothing goes to disk. A body
    sent without a known credential is refused (401) as soon as the headers are in,
    so anonymous clients cannot make the broker hold their bodies.
    """

    max_body = rules.MAX_BODY
    # The site's BrokerResource (make_site): credential_known and refused_early.
    broker_resource: Any = None

    # Slots, not instance-dict entries: an attribute that twisted.web's own requests do not
    # have would turn each request's compact (key-sharing) __dict__ into a full table of
    # about 1.3 KiB, held by every idle long-poll (docs/benchmarks.md, idle memory).
    __slots__ = (
        "ctxd_started",     # when render began (the request time metric)
        "ctxd_route",       # the Route matched, if any
        "ctxd_principal",   # who authenticated, if anyone
        "ctxd_error",       # the error code answered, if any
        "ctxd_pending",     # the answer still being computed (BrokerResource.render)
        "ctxd_gone",        # whether the client went away before it
        "ctxd_credential",  # the kind of credential presented, once parked (else read from the headers)
        "_refused",
        "_received",
        "_hidden",
    )

    # Whether a parked request keeps its headers: the access log's line names the client's
    # User-Agent and Referer (make_site).
    keep_headers = False

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.ctxd_pending: Optional[Deferred] = None
        self.ctxd_gone = False
        self.ctxd_credential: Optional[str] = None
        self._refused = False
        self._received = 0
        self._hidden: Optional[List[bytes]] = None

    def park(self) -> None:
        """Its answer comes later (a long-poll): let go of what parsing it built and answering
        it does not use - the query's arguments, the path's segments, the body already read
        and, unless the access log needs them, the headers.

        About 2 KiB a request, held by every idle node's long-poll (docs/benchmarks.md, idle
        memory); and the idle nodes' bearer tokens are not kept in memory while they wait.
        """
        self.args = _NOTHING
        self.received_cookies = _NOTHING
        self.prepath = self.postpath = self.sitepath = None
        self.host = None   # (the server's own address: the peer's, in ``client``, stays)
        if self.content is not None:
            self.content.close()
            self.content = None
        # The response's headers so far (Server and Date) are made again when it is answered,
        # with the Date of the answer.
        self.responseHeaders = _NO_HEADERS
        if not self.keep_headers:
            self.ctxd_credential = _credential_kind(_bearer(self))
            self.requestHeaders = _NO_HEADERS

    def unpark(self) -> None:
        """About to be answered: a parked request's response headers again - those twisted.web
        had set: Server, Date and, for an HTTP/1.1 request that asked to close the connection
        (the channel decided so before it was rendered), Connection: close."""
        if self.responseHeaders is _NO_HEADERS:
            self.responseHeaders = Headers()
            self.setHeader(b"server", server.version)
            self.setHeader(b"date", _http_date())
            channel = self.channel
            if channel is not None and not channel.persistent and self.clientproto == b"HTTP/1.1":
                self.setHeader(b"connection", b"close")

    def connectionLost(self, reason: Any) -> None:
        """The connection closed before the answer: stop computing it (a long-poll leaves
        its waiter and timer)."""
        super().connectionLost(reason)
        self.ctxd_gone = True
        pending, self.ctxd_pending = self.ctxd_pending, None
        if pending is not None:
            pending.cancel()

    def gotLength(self, length: Optional[int]) -> None:
        self.content = BytesIO()
        if length is not None and length > self.max_body:
            self._refuse(413, b"Payload Too Large", TooLarge.code, f"the body is larger than {self.max_body} bytes")
        elif length != 0 and self.broker_resource is not None and not self.broker_resource.credential_known(self):
            self._refuse(401, b"Unauthorized", Unauthorized.code,
                         "a known credential is required to send a body (none, or an unknown one, was given)")

    def handleContentChunk(self, data: bytes) -> None:
        if self._refused:
            return
        self._received += len(data)
        if self._received > self.max_body:
            self._refuse(413, b"Payload Too Large", TooLarge.code, f"the body is larger than {self.max_body} bytes")
            return
        self.content.write(data)

    def _refuse(self, status: int, phrase: bytes, code: str, message: str) -> None:
        """Answer at once, before (the rest of) the body, and close the connection."""
        self._refused = True
        self.content = BytesIO()
        if self.broker_resource is not None:
            self.broker_resource.refused_early(self, status)
        body = json_bytes({"error": code, "message": message})
        transport = self.channel.transport
        transport.write(_EARLY_REPLY % (status, phrase, len(body), body))
        transport.loseConnection()
        # A TLS close waits for the peer's close_notify; a client still sending
        # its body may never send it. Cut the connection if it lingers.
        if hasattr(transport, "abortConnection"):
            self.channel.callLater(5, _abort_if_open, self.channel)

    # Twisted < 25.5 (Debian 12 has 22.4) has no Site(parsePOSTFormSubmission=False): there the
    # request hides its content type from twisted.web's form parsers and shows it again for us.
    hide_content_type = False

    def requestReceived(self, command: bytes, path: bytes, version: bytes) -> None:
        if self._refused:
            return
        # The method and version as shared constants, not two more objects per waiting request.
        command, version = _INTERNED.get(command, command), _INTERNED.get(version, version)
        if self.hide_content_type:
            self._hidden = self.requestHeaders.getRawHeaders(b"content-type")
            self.requestHeaders.removeHeader(b"content-type")
        super().requestReceived(command, path, version)

    def process(self) -> None:
        if self._hidden is not None:
            self.requestHeaders.setRawHeaders(b"content-type", self._hidden)
            self._hidden = None
        super().process()


class _ReadOnlyHeaders(Headers):
    """No headers, shared by every parked request: reading finds nothing, writing is a bug."""

    def _refuse(self, *args: Any, **kwargs: Any) -> None:
        raise RuntimeError("a parked request's headers were let go of")

    addRawHeader = setRawHeaders = removeHeader = _refuse


_NO_HEADERS = _ReadOnlyHeaders()
_date = [0, b""]   # (second, its HTTP date): 10,000 long-polls timing out together share one


def _http_date() -> bytes:
    now = int(time.time())
    if now != _date[0]:
        _date[:] = [now, http.datetimeToString(now)]
    return _date[1]


_INTERNED = {v: v for v in (b"GET", b"POST", b"PUT", b"DELETE", b"HEAD", b"HTTP/1.1", b"HTTP/1.0")}
_NOTHING: Any = MappingProxyType({})


def _abort_if_open(channel: Any) -> None:
    """Cut ``channel``'s connection unless it is closed: a TLS transport's own flags may still
    say connected once it is gone (and aborting it then fails), so the channel's word counts."""
    transport = channel.transport
    if getattr(channel, "closed", False) or transport is None:
        return
    if getattr(transport, "connected", False) or getattr(transport, "disconnecting", False):
        transport.abortConnection()


class DeadlineChannel(http.HTTPChannel):
    """An HTTP channel that must receive each whole request within a deadline.

    twisted.web's idle timeout restarts with every byte, so a client trickling a
    byte a second would hold the connection forever. Here the clock starts when
    the connection opens (TLS handshake included) and again when a response is
    done, and stops only when a request's headers and body are all in.
    """

    request_deadline = 30.0
    __slots__ = ("_deadline", "closed")   # (as CappedRequest's)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._deadline: Any = None
        self.closed = False   # whether the connection is lost

    def connectionMade(self) -> None:
        super().connectionMade()
        self._arm()

    def _arm(self) -> None:
        self._disarm()
        self._deadline = self.callLater(self.request_deadline, self._expired)

    def _disarm(self) -> None:
        if self._deadline is not None and self._deadline.active():
            self._deadline.cancel()
        self._deadline = None

    def _expired(self) -> None:
        self._deadline = None
        log.info("request not received within {deadline} s: connection cut", deadline=self.request_deadline)
        self.transport.abortConnection()

    def allContentReceived(self) -> None:
        self._disarm()
        super().allContentReceived()

    def requestDone(self, request: Any) -> None:
        super().requestDone(request)
        if self.persistent:
            self._arm()

    def connectionLost(self, reason: Any) -> None:
        self.closed = True
        self._disarm()
        super().connectionLost(reason)


def make_site(
    broker: Broker, max_body: int = rules.MAX_BODY, timeout: int = 120, request_deadline: float = 30.0,
    access_log: bool = True,
) -> server.Site:
    """The twisted.web Site serving the API; ``access_log`` False: no line per request (the
    metrics count requests; the audit log has what matters for security)."""
    resource = BrokerResource(broker, max_body, stall_timeout=timeout)
    request_class = type("Request", (CappedRequest,), {"max_body": max_body, "broker_resource": resource,
                                                       "keep_headers": access_log})
    site_class = server.Site if access_log else QuietSite
    # A JSON API: no parsing of form or multipart bodies into request.args. Twisted's
    # email-module parsers cost CPU on every POST, and are an attack surface.
    try:
        site = site_class(resource, requestFactory=request_class, timeout=timeout, parsePOSTFormSubmission=False)
    except TypeError:  # Twisted < 25.5
        request_class.hide_content_type = True
        site = site_class(resource, requestFactory=request_class, timeout=timeout)
    site.protocol = type("Channel", (DeadlineChannel,), {"request_deadline": request_deadline})
    site.displayTracebacks = False
    return site
