"""The broker: the model, its journal and the long-poll waiters, behind one API.

Each mutating operation validates against the model (``prepare_*``), applies the
record, appends it to the journal and answers once the journal says it is durable.
Waiters are woken only after that, and only those whose view the record changed.

Records are applied to memory before they are durable, so that the next request is
validated against them (two enrollments racing for the last slot). No answer may
show such a state before it is durable: every read is rendered when asked and
sent after the journal's barrier, when all it shows is on disk. A view revision an
agent has seen therefore survives a crash with the same content.
"""

import hashlib
import heapq
from typing import Any, Callable, Dict, List, NamedTuple, Optional, Set, Tuple

from twisted.internet.defer import Deferred, succeed
from twisted.logger import Logger
from twisted.python.failure import Failure

from ctxd import credentials, rules, tokens, validate
from ctxd.audit import AuditLog
from ctxd.admission import RateLimiter
from ctxd.errors import (
    BadRequest,
    CertificateRefused,
    Conflict,
    Forbidden,
    InvalidCluster,
    NotFound,
    TooManyRequests,
    Unauthorized,
    Unavailable,
)
from ctxd.journal.errors import JournalClosed, JournalFailed
from ctxd.metrics import Metrics
from ctxd.model import SITE_ADMIN, Model, Node, Principal, Touched

log = Logger()


class Enrollment(NamedTuple):
    """What an enrollment answers: the node's credential, and whether the node is new."""

    body: Dict[str, Any]
    new: bool


class _EnrollmentLog:
    """A line per enrollment, up to :attr:`PER_SECOND` a second in each context; beyond that,
    one line per context counting the rest of that second, said by :meth:`flush` (the next
    enrollment in a new second, or the broker's one-second timer). In a join storm the log's
    formatting would otherwise cost the broker a tenth of its CPU, for 10,000 lines nobody
    reads one by one; the audit log and the journal keep every enrollment with its source.
    (Per context: a storm in one does not turn another's lines into a count.)"""

    PER_SECOND = 20

    def __init__(self, clock: Any) -> None:
        self.clock = clock
        self.window = float("-inf")   # when the current second began
        self.said: Dict[str, int] = {}     # context id -> lines said in it
        self.untold: Dict[str, int] = {}   # context id -> enrollments not said in it

    def say(self, cid: str, line: Callable[[], None]) -> None:
        now = self.clock.seconds()
        if now - self.window >= 1.0:
            self.flush()
            self.window = now
            self.said.clear()
        said = self.said.get(cid, 0)
        if said < self.PER_SECOND:
            self.said[cid] = said + 1
            line()
        else:
            self.untold[cid] = self.untold.get(cid, 0) + 1

    def flush(self) -> None:
        """Say how many enrollments went untold, per context, if any."""
        for cid, count in self.untold.items():
            log.info("{count} more enrollment(s) in context {cid} within a second, not logged one by one "
                     "(the audit log and the journal have each, with its source)", count=count, cid=cid)
        self.untold.clear()


class Unchanged:
    """What a long-poll watched (a node's view, a context's progress) did not change within its wait."""


UNCHANGED = Unchanged()


def loggable(text: str, limit: int = 500) -> str:
    """Text a node sent, fit for the broker's log: control characters (escape sequences for
    the operator's terminal, forged log lines) written as escapes, at most ``limit`` characters."""
    text = text if len(text) <= limit else text[:limit] + "..."
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode("ascii") for c in text)


def _deliver(result: Any, d: Deferred) -> None:
    """Fire ``d`` with ``result`` unless its caller went away meanwhile."""
    if d.called:
        return
    if isinstance(result, Failure):
        d.errback(result)
    else:
        d.callback(result)


class _Watch(NamedTuple):
    """What a kind of long-poll watches: its subject's revision, and the answer it renders
    (from the subject and the revision the caller holds)."""

    revision: Callable[[Any], int]
    render: Callable[[Any, int], Any]


#: The key of a context's progress waiters in Broker._waiters (a group's view waiters are
#: keyed by the group's name, never empty).
PROGRESS = ""


class _Waiter:
    """One long-poll: ``subject`` (a Node, or a Context) seen at revision ``since``.

    ``key`` (context id, group name or PROGRESS) is what wakes it; ``slot`` (the Node), if
    any, is the one wait a node may have.
    """

    __slots__ = ("broker", "key", "slot", "subject", "watch", "since", "deferred", "tick")

    def __init__(self, broker: "Broker", key: Tuple[str, str], slot: Optional[Node], subject: Any,
                 watch: _Watch, since: int) -> None:
        self.broker = broker
        self.key = key
        self.slot = slot
        self.subject = subject
        self.watch = watch
        self.since = since
        self.deferred: Deferred = None  # type: ignore[assignment]
        self.tick = 0   # when it times out (_Timeouts)

    def cancel(self, _: Deferred) -> None:
        """The caller went away (its Deferred's canceller): drop the wait and its timeout."""
        self.broker._drop(self)


class _Timeouts:
    """The long-poll waiters' timeouts on one reactor timer.

    A waiter is due in a tick of :data:`TICK` seconds (rounded down: a 304 may come up to a
    tick early, never late); the waiters due in a tick share one set, and the reactor holds
    one timer, for the earliest tick. 10,000 idle nodes cost 10,000 set entries, not
    10,000 DelayedCalls (about 600 bytes each, and a heap operation at every wait).
    """

    TICK = 0.125   # a power of two: tick * TICK is exact

    def __init__(self, clock: Any, expire: Callable[["_Waiter"], None]) -> None:
        self.clock = clock
        self.expire = expire
        self.due: Dict[int, Set["_Waiter"]] = {}
        self.ticks: List[int] = []   # a heap of the keys of ``due``
        self.count = 0
        self.call: Any = None
        self.call_tick = 0

    def add(self, waiter: "_Waiter", seconds: float) -> None:
        tick = int((self.clock.seconds() + seconds) / self.TICK)
        bucket = self.due.get(tick)
        if bucket is None:
            bucket = self.due[tick] = set()
            heapq.heappush(self.ticks, tick)
        bucket.add(waiter)
        waiter.tick = tick
        self.count += 1
        if self.call is None or tick < self.call_tick:
            self._schedule(tick)

    def remove(self, waiter: "_Waiter") -> None:
        bucket = self.due.get(waiter.tick)
        if bucket is None or waiter not in bucket:
            return
        bucket.discard(waiter)   # an empty bucket stays until its tick: a tick is pushed once
        self.count -= 1
        if self.count == 0:
            self._clear()

    def _clear(self) -> None:
        if self.call is not None:
            self.call.cancel()
            self.call = None
        self.due.clear()
        self.ticks.clear()

    def _schedule(self, tick: int) -> None:
        if self.call is not None:
            self.call.cancel()
        self.call_tick = tick
        self.call = self.clock.callLater(max(0.0, tick * self.TICK - self.clock.seconds()), self._run)

    def _run(self) -> None:
        self.call = None
        now = int(self.clock.seconds() / self.TICK)
        while self.ticks and self.ticks[0] <= now:
            bucket = self.due.pop(heapq.heappop(self.ticks), set())
            self.count -= len(bucket)
            for waiter in bucket:   # (out of ``due`` now: remove() leaves it alone)
                self.expire(waiter)
        if not self.count:
            self._clear()
        elif self.call is None or self.ticks[0] < self.call_tick:   # (an expiry's callback may have added one)
            self._schedule(self.ticks[0])


class Broker:
    """Everything the HTTP layer calls. ``clock`` is an IReactorTime."""

    def __init__(
        self,
        model: Model,
        journal: Any,
        clock: Any,
        admin_token_hash: str,
        public_url: str,
        ca_pem: str,
        on_fatal: Any = None,
        audit: Any = None,
        enroll_per_source: int = 120,
        enroll_per_token: int = 1200,
        metrics: Optional[Metrics] = None,
        authority: Optional[credentials.Authority] = None,
        agent: Optional[bytes] = None,
    ) -> None:
        self.model = model
        self.journal = journal
        self.clock = clock
        self.admin_token_hash = admin_token_hash
        self.public_url = public_url
        self.ca_pem = ca_pem
        self.audit = audit if audit is not None else AuditLog(None, clock.seconds)
        self.enroll_by_source = RateLimiter(clock, enroll_per_source)
        self.enroll_by_token = RateLimiter(clock, enroll_per_token)
        # Called once when the journal fails: nothing may be acknowledged after it.
        self.on_fatal = on_fatal
        self._fatal = False
        self._stopping = False
        self.metrics = metrics if metrics is not None else Metrics()
        # Signs host certificates (None: this broker signs none; contexts asking for them are refused).
        self.authority = authority
        # The agent the broker serves to VMs (GET /v1/agent), if it found it, and its SHA-256.
        self.agent = agent
        self.agent_sha256 = hashlib.sha256(agent).hexdigest() if agent is not None else ""
        # node -> when its last refused certificate request was audited (one line a minute per node).
        self._refusals_audited: Dict[Tuple[str, str], float] = {}
        # context id -> what of its CAs the credentials key does not make ("" : nothing), once checked.
        self._lost_cas: Dict[str, str] = {}
        # (context id, group name) -> waiters of that group's nodes' views;
        # (context id, PROGRESS) -> waiters of that context's progress
        self._waiters: Dict[Tuple[str, str], Set[_Waiter]] = {}
        # (context id, node id) -> that node's one waiter
        self._by_node: Dict[Node, _Waiter] = {}
        self._timeouts = _Timeouts(clock, lambda waiter: self._fire(waiter, UNCHANGED))
        self._view = _Watch(model.view_revision, lambda node, since: model.view_json(node))
        self._delta = _Watch(model.view_revision, lambda node, since: model.view_delta(node, since)
                             or model.view_json(node))
        self._progress = _Watch(model.progress_revision, lambda ctx, since: model.progress(ctx))
        self._enrollments = _EnrollmentLog(clock)

    # -- start-up ----------------------------------------------------------

    def replay(self) -> int:
        """Apply every journaled record; return how many there were."""
        count = 0
        for record in self.journal.load():
            self.model.apply(record)
            count += 1
        return count

    def now(self) -> float:
        return self.clock.seconds()

    # -- credentials -------------------------------------------------------

    def authenticate(self, token: Optional[str], client_name: Optional[str] = None) -> Principal:
        """The principal holding ``token``: the site admin or a model principal.

        Without a bearer token, a client certificate verified against the
        configured client CA (``client_name``, its common name) authenticates the
        active deployer of that name.
        """
        if token is None and client_name is not None:
            user = self.model.users.get(client_name)
            if user is not None and user.revoked_at is None:
                return Principal("deployer", "", user.name)
            raise Unauthorized("the client certificate names no active deployer")
        if token is None:
            raise Unauthorized("a bearer credential is required")
        if not tokens.well_formed(token):
            raise Unauthorized("malformed credential")
        hashed = tokens.token_hash(token)
        if tokens.same_hash(hashed, self.admin_token_hash):
            return SITE_ADMIN
        found = self.model.principal(hashed)
        if found is None:
            raise Unauthorized("unknown or revoked credential")
        return found

    @staticmethod
    def require_admin(principal: Principal) -> None:
        if not principal.is_admin:
            raise Forbidden("this operation needs the site admin credential")

    @staticmethod
    def require_deployer(principal: Principal) -> None:
        if not principal.manages_contexts:
            raise Forbidden("this operation needs a deployer or the site admin credential")

    def limit_enrollment(self, source: str, token: Optional[str]) -> None:
        """429 when this address, or this join token, enrolls too often.

        The address is counted first and a refused attempt does not count against
        the token: one flooding address cannot lock the token's legitimate VMs out.
        """
        retry = self.enroll_by_source.hit(source)
        if retry is None and token is not None and tokens.well_formed(token):
            retry = self.enroll_by_token.hit(tokens.token_hash(token))
        if retry is not None:
            raise TooManyRequests("too many enrollment attempts; retry later", retry_after=retry)

    # -- committing changes ------------------------------------------------

    def _commit(self, record: Dict[str, Any]) -> Deferred:
        """Apply and journal ``record``; fires once it is durable.

        Waiters are woken from the journal's own Deferred: a caller that goes away
        (cancelling what we return) cannot stop them from hearing of the change.
        """
        touched = self.model.apply(record)
        reply: Deferred = Deferred()
        appended = self.clock.seconds()

        def durable(_: Any) -> None:
            self.metrics.journal_append_seconds.observe(self.clock.seconds() - appended)
            self._wake(touched)
            if not reply.called:
                reply.callback(None)

        def failed(failure: Any) -> None:
            self._journal_failed(failure)
            if not reply.called:
                reply.errback(Unavailable("the change could not be made durable; it was not acknowledged"))

        self.journal.append(record).addCallbacks(durable, failed)
        return reply

    def _journal_failed(self, failure: Any) -> None:
        if failure.check(JournalClosed) or self._fatal:
            return
        self._fatal = True
        log.critical("the journal failed ({error}): no change will be acknowledged; stopping",
                     error=failure.value)
        if self.on_fatal is not None:
            self.on_fatal()

    def _durable(self, reply: Any) -> Deferred:
        """Answer ``reply`` (already rendered) once all it may show is durable."""
        d = self.journal.barrier()

        def failed(failure: Any) -> None:
            failure.trap(JournalFailed)
            raise Unavailable("the broker's journal failed")

        d.addCallbacks(lambda _: reply, failed)
        return d

    def _commit_then(self, record: Optional[Dict[str, Any]], reply: Any) -> Deferred:
        """Commit ``record`` (if any), then answer with ``reply()``."""
        if record is None:
            return succeed(reply())
        d = self._commit(record)
        d.addCallback(lambda _: reply())
        return d

    # -- admin operations ----------------------------------------------------

    def create_context(self, principal: Principal, body: Any) -> Deferred:
        owner = principal.subject if principal.kind == "deployer" else ""
        record, join_tokens = self.model.prepare_create(body, self.now(), owner)
        cid = record["ctx"]
        x509_ca, ssh_ca = self.model.wants_cas(record)
        sited = any(g.get("certificate", {}).get("issuer") == "site" for g in record["groups"])
        if x509_ca or ssh_ca or sited:
            if self.authority is None:
                raise InvalidCluster("this broker issues no host certificates (it has no credentials key)")
            if sited and self.authority.site is None:
                raise InvalidCluster('issuer = "site" needs a site CA: start ctxd with --site-ca-cert and '
                                     "--site-ca-key")
            # Only the public halves: the keys are derived when needed (ctxd.credentials).
            if x509_ca or ssh_ca:
                record["cas"] = self.authority.context_cas(cid, record["name"], record["at"], x509_ca, ssh_ca)

        def reply() -> Dict[str, Any]:
            ctx = self.model.contexts[cid]
            bootstraps = {group: self.bootstrap(cid, group, token) for group, token in join_tokens.items()}
            log.info("context {cid} ({name}) created", cid=cid, name=ctx.name)
            return {"context": self.model.summary(ctx), "bootstraps": bootstraps}

        return self._commit_then(record, reply)

    def bootstrap(self, cid: str, group: str, join_token: str) -> Dict[str, Any]:
        """What one VM of ``group`` needs, in its user-data."""
        return {
            "ctxd_bootstrap": 1,
            "url": self.public_url,
            "context_id": cid,
            "group": group,
            "join_token": join_token,
            "ca_pem": self.ca_pem,
        }

    def list_contexts(self, principal: Principal) -> Deferred:
        contexts = self.model.visible_contexts(principal, self.now())
        return self._durable({"contexts": [self.model.summary(c) for c in contexts]})

    def get_context(self, principal: Principal, cid: str) -> Deferred:
        return self._durable(self.model.status(self.model.owned_context(principal, cid, self.now())))

    def get_progress(self, principal: Principal, cid: str, since: Optional[int], wait: int) -> Deferred:
        """The context's progress (counts, lock, oldest error) now, or once its revision passes
        ``since``; :data:`UNCHANGED` if it does not within ``wait`` seconds. O(1) in the nodes."""
        _check_wait(wait)
        ctx = self.model.owned_context(principal, cid, self.now())
        return self._long_poll((cid, PROGRESS), None, ctx, self._progress, since, wait)

    def delete_context(self, principal: Principal, cid: str) -> Deferred:
        self.model.owned_context(principal, cid, self.now())
        record = self.model.prepare_delete(cid, self.now())
        log.info("context {cid} deleted", cid=cid)
        return self._commit_then(record, lambda: {"deleted": cid})

    def put_data(self, principal: Principal, cid: str, name: str, body: Any) -> Deferred:
        self.model.owned_context(principal, cid, self.now())
        record = self.model.prepare_data(cid, name, body, self.now())
        return self._commit_then(record, lambda: self.model.summary(self.model.contexts[cid]))

    def lock(self, principal: Principal, cid: str) -> Deferred:
        self.model.owned_context(principal, cid, self.now())
        record = self.model.prepare_lock(cid, self.now())
        return self._commit_then(record, lambda: self.model.summary(self.model.contexts[cid]))

    def revoke_node(self, principal: Principal, cid: str, nid: str) -> Deferred:
        """The node's credential stops working at once; its instance cannot re-enroll."""
        self.model.owned_context(principal, cid, self.now())
        record = self.model.prepare_node_revoke(cid, nid, self.now())
        log.info("node {nid} of context {cid}: credential revoked", nid=nid, cid=cid)
        return self._commit_then(record, lambda: {"revoked": nid})

    def rotate_join_token(self, principal: Principal, cid: str, group: str) -> Deferred:
        """A new join token for ``group``; the old one stops working at once."""
        self.model.owned_context(principal, cid, self.now())
        record, token = self.model.prepare_join_rotate(cid, group, self.now())
        log.info("context {cid}: join token of group {group} rotated", cid=cid, group=group)
        return self._commit_then(record, lambda: {"bootstrap": self.bootstrap(cid, group, token)})

    # -- deployers (site admin only) -------------------------------------------

    def add_user(self, body: Any) -> Deferred:
        record, token = self.model.prepare_user_add(body, self.now())
        log.info("deployer {name} added", name=record["name"])
        return self._commit_then(record, lambda: {"name": record["name"], "token": token})

    def list_users(self) -> Deferred:
        return self._durable({"users": self.model.user_list()})

    def revoke_user(self, name: str) -> Deferred:
        record = self.model.prepare_user_revoke(name, self.now())
        log.info("deployer {name} revoked", name=name)
        return self._commit_then(record, lambda: {"revoked": name})

    def sweep_expired(self) -> None:
        """Delete expired contexts (each deletion is journaled); forget old rate windows."""
        self.enroll_by_source.prune()
        self.enroll_by_token.prune()
        now = self.now()
        for cid in self.model.expired(now):
            log.info("context {cid} expired", cid=cid)
            self._commit(self.model.prepare_delete(cid, now, reason="expired")).addErrback(
                lambda f: log.failure("journaling an expiry failed", f)
            )

    # -- node operations -------------------------------------------------------

    def enroll(self, principal: Principal, cid: str, body: Any, source: str) -> Deferred:
        """Fires with an :class:`Enrollment`."""
        kind, pcid, group = principal
        if kind != "join" or pcid != cid:
            # A valid credential of another kind or context: the same 403 as
            # everywhere else a credential does not fit the route.
            raise Forbidden("enrollment needs this context's join token")
        record, node_token, new = self.model.prepare_enroll(cid, group, body, source, self.now())
        nid = record["node"]
        self._enrollments.say(cid, lambda: log.info(
            "node {nid} {how} group {group} of context {cid} from {source}",
            nid=nid,
            how="enrolled in" if new else "re-enrolled in",
            group=group,
            cid=cid,
            source=source,
        ))
        d = self._commit(record)
        # Where its view stands as of this record (durable when the reply goes out: a later
        # change, durable or not, has a higher revision and so ends the agent's first wait).
        progress = self.model.view_progress(self.model.contexts[cid].nodes[nid])
        return d.addCallback(lambda _: Enrollment(
            {"node_id": nid, "node_token": node_token, "group": group, "context_id": cid, "view_progress": progress},
            new))

    def _own_node(self, principal: Principal, cid: str, nid: str) -> Node:
        # Authorization first: another credential learns nothing of what exists.
        self.model.check_node_principal(principal, cid, nid)
        node = self.model.node(cid, nid, self.now())
        if node.group.lease:
            node.seen = self.now()
        return node

    def put_identity(self, principal: Principal, cid: str, nid: str, body: Any, source: str) -> Deferred:
        node = self._own_node(principal, cid, nid)
        record = self.model.prepare_identity(cid, nid, body, source, self.now())
        d = self._commit(record)
        progress = self.model.view_progress(node)   # as of this record (see enroll)
        return d.addCallback(lambda _: {"revision": progress["revision"], "view_progress": progress})

    def report(self, principal: Principal, cid: str, nid: str, body: Any) -> Deferred:
        node = self._own_node(principal, cid, nid)
        record = self.model.prepare_report(cid, nid, body, self.now())
        if record["state"] == "error":
            log.info("node {nid} of context {cid} reported an error: {message}", nid=nid, cid=cid,
                     message=loggable(record["message"]))
        elif record["state"] == "ok" and node.state != "ok":
            self.metrics.node_ok_seconds.observe(record["at"] - node.times["enrolled_at"])
        return self._commit_then(
            record, lambda: {"state": node.state, "revision": self.model.view_revision(node)}
        )

    def get_view(self, principal: Principal, cid: str, nid: str, since: Optional[int], wait: int,
                 delta: bool = False) -> Deferred:
        """The node's view (JSONChunks) now, or once its revision passes ``since``;
        :data:`UNCHANGED` if it does not within ``wait`` seconds. With ``delta``, what changed
        since ``since`` (Model.view_delta) when the broker can say, else the whole view."""
        _check_wait(wait)
        node = self._own_node(principal, cid, nid)
        # One wait per node (its slot): a newer request replaces the older one.
        watch = self._delta if delta and since is not None else self._view
        return self._long_poll(node.group.key, node, node, watch, since, wait)

    def get_scripts(self, principal: Principal, cid: str, nid: str) -> bytes:
        """The context's ctx-scripts tree (a gzip'd tar), for its node; its SHA-256 is in the view."""
        self._own_node(principal, cid, nid)
        scripts = self.model.contexts[cid].scripts
        if scripts is None:
            raise NotFound("this context has no ctx-scripts (the cluster file names no scripts directory)")
        return scripts

    def leave(self, principal: Principal, cid: str, nid: str) -> Deferred:
        """The node departs by itself (its agent's --leave): its credential stops working."""
        self._own_node(principal, cid, nid)
        record = self.model.prepare_depart(cid, nid, "left", self.now())
        log.info("node {nid} of context {cid} left", nid=nid, cid=cid)
        return self._commit_then(record, lambda: {"left": nid})

    # -- host credentials (docs/credentials.md) ---------------------------------------

    def get_cas(self, principal: Principal, cid: str) -> Deferred:
        """The context's CA bundle and SSH CA, for its deployer."""
        ctx = self.model.owned_context(principal, cid, self.now())
        reply: Dict[str, Any] = {"x509": None, "ssh": None}
        sited = [g for g in ctx.groups.values() if g.certificate is not None and g.certificate["issuer"] == "site"]
        if "x509" in ctx.cas or sited:
            bundle = ctx.cas.get("x509", "")
            if sited and self.authority is not None and self.authority.site is not None:
                bundle += self.authority.site.bundle
            reply["x509"] = {"bundle": bundle}
        if "ssh" in ctx.cas:
            pattern = rules.ssh_ca_pattern(ctx.domain)
            reply["ssh"] = {"public_key": ctx.cas["ssh"], "pattern": pattern,
                            "known_hosts": f"@cert-authority {pattern} {ctx.cas['ssh']} ctxd-{cid}"}
        return self._durable(reply)

    def credentials(self, principal: Principal, cid: str, nid: str, body: Any, source: str) -> Deferred:
        """Host credentials for the node: an X.509 certificate for its request's key, SSH host
        certificates for its recorded host keys, or both; only ever for its own vetted names.
        Fires with the reply once what it shows is journaled."""
        node = self._own_node(principal, cid, nid)
        body = validate.obj(body, "body", optional=("csr", "ssh"))
        want_ssh = validate.boolean(body.get("ssh", False), "ssh")
        if "csr" not in body and not want_ssh:
            raise BadRequest('body: ask for an X.509 certificate ("csr"), SSH certificates ("ssh": true) or both')
        g, ctx, now = node.group, self.model.contexts[cid], self.now()
        for kind, asked, spec in (("certificate", "csr" in body, g.certificate),
                                  ("ssh_certificate", want_ssh, g.ssh_certificate)):
            if asked and spec is None:
                raise Conflict(f"group {g.name!r} has no {kind.replace('_', ' ')}s: add [group.{kind}] to its "
                               "cluster file", code="not_enabled")
        if self.authority is None:
            raise Conflict("this broker issues no host certificates", code="not_enabled")
        self._check_cas(ctx)
        held = node.credentials or {}
        issued: Dict[str, Any] = {}
        reply: Dict[str, Any] = {}
        if "csr" in body:
            spec = g.certificate
            csr = credentials.parse_csr(body["csr"])
            names = self._vet_request(node, csr, spec["names"], source)
            last = held.get("x509")
            if last is not None and last["key"] == credentials.key_id(csr.public_key()) \
                    and last["names"] == names and _fresh(last, now):
                reply["x509"] = self._x509_reply(last, cid, ctx.cas.get("x509", ""), spec["issuer"])
            else:
                holder = ctx.cert_key_owner.get(credentials.key_id(csr.public_key()), nid)
                if holder != nid:
                    raise Conflict("this key was certified for another node of the context (a key baked into "
                                   "the image?): every VM needs its own", code="key_in_use")
                self._limit_issuing(last, now)
                issued["x509"] = self.authority.issue_x509(cid, ctx.cas.get("x509", ""), spec["issuer"], csr, names,
                                                           spec["validity"], now)
                reply["x509"] = _public(issued["x509"])
        ssh_keys = list(node.identity["ssh_host_keys"])
        if want_ssh:
            principals = self.model.vetted_names(node, rules.CERT_NAMES)
            last = held.get("ssh")
            if last is not None and last["key"] == credentials.ssh_keys_id(ssh_keys) \
                    and last["names"] == principals and _fresh(last, now):
                reply["ssh"] = _public(last)
                want_ssh = False
            else:
                self._limit_issuing(last, now)
        d = succeed(None)
        if want_ssh:
            d = self.authority.issue_ssh(cid, nid, ssh_keys, principals, g.ssh_certificate["validity"], now)

        def signed(ssh: Any) -> Any:
            if ssh is not None:
                issued["ssh"] = ssh
                reply["ssh"] = _public(ssh)
            if not issued:
                return self._durable(reply)
            self._own_node(principal, cid, nid)   # it may have departed while ssh-keygen ran
            record = self.model.prepare_credential(node, issued, self.now())
            log.info("node {nid} of context {cid}: issued {what}", nid=nid, cid=cid, what=", ".join(
                f"{kind} certificate serial {v['serial']} for {' '.join(v['names'])}" for kind, v in issued.items()))
            return self._commit_then(record, lambda: reply)

        return d.addCallback(signed)

    def _check_cas(self, ctx: Any) -> None:
        """Refuse to sign for a context whose CAs this broker's credentials key did not make."""
        lost = self._lost_cas.get(ctx.id)
        if lost is None:
            lost = self._lost_cas[ctx.id] = self.authority.lost(ctx.id, ctx.cas) or ""
            if lost:
                log.error("context {cid}: {what} was not made with this broker's credentials.key (a lost or "
                          "replaced key): restore STATE_DIR/credentials.key from a backup; nothing is signed "
                          "for this context until then", cid=ctx.id, what=lost)
        if lost:
            raise Conflict(f"this broker's credentials key did not make {lost} (restore credentials.key from a "
                           "backup of the state directory)", code="ca_key_lost")

    def _x509_reply(self, issued: Dict[str, Any], cid: str, ca_pem: str, issuer: str) -> Dict[str, Any]:
        """An issued certificate as a node receives it: with the chain above it and the bundle to trust."""
        if issuer == "site":
            chain, bundle = self.authority.site.chain, self.authority.site.bundle
        else:
            chain, bundle = "", ca_pem
        return dict(_public(issued), chain=chain, bundle=bundle)

    def _vet_request(self, node: Node, csr: Any, kinds: List[str], source: str) -> List[str]:
        """The names ``csr`` asks for, if the node may have them (else refused and audited)."""
        allowed = self.model.vetted_names(node, kinds)
        names, other = credentials.requested_names(csr)
        problem = None
        if not credentials.signature_valid(csr):
            problem = "the request is not signed by the key it carries"
        elif other:
            problem = f"the request asks for {other[0]}, which ctxd does not certify"
        elif not names:
            problem = "the request names nothing (no CommonName or subjectAltName)"
        else:
            foreign = [n for n in names if n not in allowed]
            if foreign:
                problem = (f"{foreign[0]!r} is not one of this node's names ({', '.join(allowed)}): a node is "
                           "certified only for its own")
        if problem is None:
            return names
        cid, nid = node.group.context_id, node.id
        log.warn("node {nid} of context {cid} from {source}: certificate refused: {problem}",
                 nid=nid, cid=cid, source=source, problem=loggable(problem, 300))
        now = self.now()
        if now - self._refusals_audited.get((cid, nid), -3600.0) >= 60:
            self._refusals_audited[(cid, nid)] = now
            try:
                self.audit.write(f"node:{cid}/{nid}", "certificate_refused", f"/v1/contexts/{cid}/nodes/{nid}",
                                 source, 403, problem=loggable(problem, 300))
            except OSError as e:
                log.error("cannot write the audit log: {error}", error=e)
        raise CertificateRefused(problem)

    def _limit_issuing(self, last: Optional[Dict[str, Any]], now: float) -> None:
        """At most one new certificate of a kind a minute per node (the journal keeps each)."""
        if last is not None and now - last["at"] < ISSUE_INTERVAL:
            wait = int(ISSUE_INTERVAL - (now - last["at"])) + 1
            raise TooManyRequests(f"this node was issued a certificate {int(now - last['at'])} s ago; ask again in "
                                  f"{wait} s", retry_after=wait)

    # -- elasticity (deployers) ---------------------------------------------------

    def scale(self, principal: Principal, cid: str, group: str, body: Any) -> Deferred:
        """A new quantity for ``group``."""
        ctx = self.model.owned_context(principal, cid, self.now())
        record = self.model.prepare_scale(cid, group, body, self.now())
        log.info("context {cid}: group {group} scaled from {old} to {new}", cid=cid, group=group,
                 old=ctx.groups[group].quantity, new=record["quantity"])

        def reply() -> Dict[str, Any]:
            status = self.model.status_group(ctx, ctx.groups[group])
            return {"context": self.model.summary(ctx), "group": status}

        return self._commit_then(record, reply)

    def remove_node(self, principal: Principal, cid: str, nid: str, body: Any) -> Deferred:
        """The node departs (its credential stops working, its slot is freed); with
        ``shrink`` its group's quantity drops by one."""
        ctx = self.model.owned_context(principal, cid, self.now())
        body = validate.obj({} if body is None else body, "body", optional=("shrink",))
        shrink = validate.boolean(body.get("shrink", False), "shrink")
        record = self.model.prepare_depart(cid, nid, "removed", self.now(), shrink)
        log.info("node {nid} of context {cid} removed{shrunk}", nid=nid, cid=cid,
                 shrunk=" (its group shrinks)" if shrink else "")

        def reply() -> Dict[str, Any]:
            g = ctx.nodes[nid].group
            return {"removed": nid, "group": g.name, "quantity": g.quantity}

        return self._commit_then(record, reply)

    def extend(self, principal: Principal, cid: str, body: Any) -> Deferred:
        """The context expires ``expires_in`` seconds from now."""
        self.model.owned_context(principal, cid, self.now())
        record = self.model.prepare_extend(cid, body, self.now())
        log.info("context {cid} now expires at {expires}", cid=cid, expires=record["expires"])
        return self._commit_then(record, lambda: self.model.summary(self.model.contexts[cid]))

    def flush_enrollment_log(self) -> None:
        """Say how many enrollments the log did not list one by one (every second)."""
        self._enrollments.flush()

    def sweep_leases(self) -> None:
        """Watching nodes of leased groups silent for longer than the lease depart ("lost").
        A node is heard from while its long-poll is open, and by each request it makes; after
        a restart every node's lease starts again."""
        now = self.now()
        for ctx in list(self.model.contexts.values()):
            if ctx.expires <= now:
                continue
            for g in ctx.groups.values():
                if not g.lease:
                    continue
                for node in [n for n in g.nodes if n.watching]:
                    if node in self._by_node or node.seen is None:
                        node.seen = now   # waiting for its view now, or not seen since start-up
                        continue
                    if now - node.seen > g.lease and not self._fatal:
                        log.info("node {nid} of context {cid} lost: silent for {silent:.0f} s (lease {lease} s)",
                                 nid=node.id, cid=ctx.id, silent=now - node.seen, lease=g.lease)
                        self._commit(self.model.prepare_depart(ctx.id, node.id, "lost", now)).addErrback(
                            lambda f: log.failure("journaling a lost node failed", f))

    def _long_poll(self, key: Tuple[str, str], slot: Optional[Node], subject: Any, watch: _Watch,
                   since: Optional[int], wait: int) -> Deferred:
        """``watch.render(subject)`` now if its revision passed ``since`` (or without ``since``);
        else once it does, woken by :meth:`_wake` through ``key``, or :data:`UNCHANGED` after
        ``wait`` seconds. A caller that goes away (cancels) takes its waiter and timer with it."""
        if since is None or watch.revision(subject) > since:
            return self._durable(watch.render(subject, -1 if since is None else since))
        if wait == 0:
            return succeed(UNCHANGED)
        if slot is not None:
            previous = self._by_node.get(slot)
            if previous is not None:
                self._fire(previous, UNCHANGED)

        waiter = _Waiter(self, key, slot, subject, watch, since)
        waiter.deferred = d = Deferred(waiter.cancel)
        self._timeouts.add(waiter, wait)
        self._waiters.setdefault(key, set()).add(waiter)
        if slot is not None:
            self._by_node[slot] = waiter
        return d

    def _drop(self, waiter: _Waiter) -> None:
        waiters = self._waiters.get(waiter.key)
        if waiters is not None:
            waiters.discard(waiter)
            if not waiters:
                del self._waiters[waiter.key]
        if waiter.slot is not None and self._by_node.get(waiter.slot) is waiter:
            del self._by_node[waiter.slot]
            if waiter.slot.group.lease:
                waiter.slot.seen = self.clock.seconds()   # heard from until now
        self._timeouts.remove(waiter)

    def _fire(self, waiter: _Waiter, result: Any) -> None:
        """Answer ``waiter`` with an exception, :data:`UNCHANGED` or its answer (once durable)."""
        self._drop(waiter)
        if waiter.deferred.called:
            return
        if isinstance(result, Exception):
            waiter.deferred.errback(result)
        elif result is UNCHANGED:
            waiter.deferred.callback(result)
        else:
            self._durable(result).addBoth(_deliver, waiter.deferred)

    def _wake(self, touched: Touched) -> None:
        cid = touched.context_id
        if not cid:
            return
        if touched.deleted:
            for key in [k for k in self._waiters if k[0] == cid]:
                for waiter in list(self._waiters.get(key, ())):
                    self._fire(waiter, NotFound("the context was deleted"))
            return
        ctx = self.model.contexts.get(cid)
        if ctx is None:
            return
        candidates: Set[_Waiter] = set()
        for group in touched.groups:
            candidates.update(self._waiters.get((cid, group), ()))
        for nid in touched.nodes:
            node = ctx.nodes.get(nid)
            waiter = self._by_node.get(node)
            if waiter is not None and node.revoked:
                # It departed: its credential no longer works, and its wait says so (its agent
                # must not re-run against a view without itself).
                self._fire(waiter, Unauthorized("unknown or revoked credential"))
            elif waiter is not None:
                candidates.add(waiter)
        if touched.progress:
            candidates.update(self._waiters.get((cid, PROGRESS), ()))
        for waiter in candidates:
            watch = waiter.watch
            if watch.revision(waiter.subject) > waiter.since:
                self._fire(waiter, watch.render(waiter.subject, waiter.since))

    def waiter_count(self) -> int:
        """Long-polls waiting: nodes' views and contexts' progress."""
        return sum(len(waiters) for waiters in self._waiters.values())

    def ready(self) -> bool:
        """Whether changes can be made (the journal works and the broker is not stopping)."""
        return not self._fatal and not self._stopping

    def shutdown(self) -> None:
        """Answer every waiter "unchanged" so agents re-poll the next broker."""
        self._stopping = True
        for key in list(self._waiters):
            for waiter in list(self._waiters.get(key, ())):
                self._fire(waiter, UNCHANGED)


#: A node gets a new certificate of a kind at most this often (seconds).
ISSUE_INTERVAL = 60


def _fresh(issued: Dict[str, Any], now: float) -> bool:
    """Whether an issued certificate has more than a third of its validity left (else it is renewed)."""
    return issued["not_after"] - now > (issued["not_after"] - issued["not_before"]) / 3


def _public(issued: Dict[str, Any]) -> Dict[str, Any]:
    """What a node is told of an issued credential (not the key id the journal keeps)."""
    return {k: v for k, v in issued.items() if k not in ("key", "at")}


def _check_wait(wait: int) -> None:
    if not 0 <= wait <= rules.MAX_WAIT:
        raise BadRequest(f"wait: must be from 0 to {rules.MAX_WAIT} seconds")
