"""The broker: the model, its journal and the long-poll waiters, behind one API.

Each mutating operation validates against the model (``prepare_*``), applies the
record, appends it to the journal and answers once the journal says it is durable.
Waiters are woken only after that, and only those whose view the record changed.
"""

from typing import Any, Dict, Optional, Set, Tuple

from twisted.internet.defer import Deferred, succeed
from twisted.logger import Logger

from ctxd import tokens, validate
from ctxd.errors import BadRequest, Forbidden, NotFound, Unauthorized, Unavailable
from ctxd.journal import JournalFailed
from ctxd.model import Model, Node, Touched

log = Logger()

MAX_WAIT = 60

Reply = Tuple[int, Optional[Dict[str, Any]]]


def _unavailable(failure: Any) -> None:
    failure.trap(JournalFailed)
    raise Unavailable("the change could not be made durable; it was not acknowledged")


class _Waiter:
    __slots__ = ("context_id", "node", "since", "deferred", "timer")

    def __init__(self, context_id: str, node: Node, since: int, deferred: Deferred) -> None:
        self.context_id = context_id
        self.node = node
        self.since = since
        self.deferred = deferred
        self.timer: Any = None


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
    ) -> None:
        self.model = model
        self.journal = journal
        self.clock = clock
        self.admin_token_hash = admin_token_hash
        self.public_url = public_url
        self.ca_pem = ca_pem
        # (context id, group name) -> waiters of that group's nodes
        self._waiters: Dict[Tuple[str, str], Set[_Waiter]] = {}

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

    def authenticate(self, token: Optional[str]) -> Tuple[str, str, str]:
        """The principal holding ``token``: ("admin", "", "") or a model principal."""
        if token is None:
            raise Unauthorized("a bearer credential is required")
        if not tokens.well_formed(token):
            raise Unauthorized("malformed credential")
        hashed = tokens.token_hash(token)
        if tokens.same_hash(hashed, self.admin_token_hash):
            return ("admin", "", "")
        found = self.model.principal(hashed)
        if found is None:
            raise Unauthorized("unknown or revoked credential")
        return found

    @staticmethod
    def require_admin(principal: Tuple[str, str, str]) -> None:
        if principal[0] != "admin":
            raise Forbidden("this operation needs the admin credential")

    # -- committing changes ------------------------------------------------

    def _commit(self, record: Dict[str, Any]) -> Deferred:
        touched = self.model.apply(record)
        d = self.journal.append(record)
        d.addCallback(lambda _: self._wake(touched))
        d.addErrback(_unavailable)
        return d

    def _commit_then(self, record: Optional[Dict[str, Any]], reply: Any) -> Deferred:
        """Commit ``record`` (if any), then answer with ``reply()``."""
        if record is None:
            return succeed(reply())
        d = self._commit(record)
        d.addCallback(lambda _: reply())
        return d

    # -- admin operations ----------------------------------------------------

    def create_context(self, body: Any) -> Deferred:
        record, join_tokens = self.model.prepare_create(body, self.now())
        cid = record["ctx"]

        def reply() -> Reply:
            ctx = self.model.contexts[cid]
            bootstraps = {
                group: {
                    "ctxd_bootstrap": 1,
                    "url": self.public_url,
                    "context_id": cid,
                    "group": group,
                    "join_token": token,
                    "ca_pem": self.ca_pem,
                }
                for group, token in join_tokens.items()
            }
            log.info("context {cid} ({name}) created", cid=cid, name=ctx.name)
            return 201, {"context": self.model.summary(ctx), "bootstraps": bootstraps}

        return self._commit_then(record, reply)

    def list_contexts(self) -> Reply:
        now = self.now()
        return 200, {
            "contexts": [self.model.summary(c) for c in self.model.contexts.values() if c.expires > now]
        }

    def get_context(self, cid: str) -> Reply:
        return 200, self.model.status(self.model.context(cid, self.now()))

    def delete_context(self, cid: str) -> Deferred:
        self.model.context(cid, self.now())
        record = self.model.prepare_delete(cid, self.now())
        log.info("context {cid} deleted", cid=cid)
        return self._commit_then(record, lambda: (200, {"deleted": cid}))

    def put_data(self, cid: str, name: str, body: Any) -> Deferred:
        validate.name(name, "data name")
        record = self.model.prepare_data(cid, name, body, self.now())
        return self._commit_then(record, lambda: (200, self.model.summary(self.model.contexts[cid])))

    def lock(self, cid: str) -> Deferred:
        record = self.model.prepare_lock(cid, self.now())
        return self._commit_then(record, lambda: (200, self.model.summary(self.model.contexts[cid])))

    def sweep_expired(self) -> None:
        """Delete expired contexts; each deletion is journaled."""
        now = self.now()
        for cid in self.model.expired(now):
            log.info("context {cid} expired", cid=cid)
            self._commit(self.model.prepare_delete(cid, now, reason="expired")).addErrback(
                lambda f: log.failure("journaling an expiry failed", f)
            )

    # -- node operations -------------------------------------------------------

    def enroll(self, principal: Tuple[str, str, str], cid: str, body: Any, source: str) -> Deferred:
        kind, pcid, group = principal
        if kind != "join" or pcid != cid:
            if kind == "admin" or kind == "node":
                raise Forbidden("enrollment needs this context's join token")
            raise Unauthorized("unknown join token")
        record, node_token, new = self.model.prepare_enroll(cid, group, body, source, self.now())
        nid = record["node"]
        log.info(
            "node {nid} {how} group {group} of context {cid} from {source}",
            nid=nid,
            how="enrolled in" if new else "re-enrolled in",
            group=group,
            cid=cid,
            source=source,
        )
        return self._commit_then(
            record,
            lambda: (201 if new else 200, {"node_id": nid, "node_token": node_token, "group": group, "context_id": cid}),
        )

    def _own_node(self, principal: Tuple[str, str, str], cid: str, nid: str) -> Node:
        node = self.model.node(cid, nid, self.now())
        self.model.check_node_principal(principal, cid, nid)
        return node

    def put_identity(self, principal: Tuple[str, str, str], cid: str, nid: str, body: Any, source: str) -> Deferred:
        node = self._own_node(principal, cid, nid)
        record = self.model.prepare_identity(cid, nid, body, source, self.now())
        return self._commit_then(record, lambda: (200, {"revision": self.model.view_revision(node)}))

    def report(self, principal: Tuple[str, str, str], cid: str, nid: str, body: Any) -> Deferred:
        node = self._own_node(principal, cid, nid)
        record = self.model.prepare_report(cid, nid, body, self.now())
        if record["state"] == "error":
            log.info("node {nid} of context {cid} reported an error: {message}", nid=nid, cid=cid, message=record["message"])
        return self._commit_then(
            record, lambda: (200, {"state": node.state, "revision": self.model.view_revision(node)})
        )

    def get_view(
        self, principal: Tuple[str, str, str], cid: str, nid: str, since: Optional[int], wait: int
    ) -> Deferred:
        """The node's view now, or once its revision passes ``since`` (304 after ``wait`` s)."""
        if not 0 <= wait <= MAX_WAIT:
            raise BadRequest(f"wait: must be from 0 to {MAX_WAIT} seconds")
        node = self._own_node(principal, cid, nid)
        if since is None or self.model.view_revision(node) > since:
            return succeed((200, self.model.view(node)))
        if wait == 0:
            return succeed((304, None))

        def cancel(d: Deferred) -> None:
            self._drop(waiter)

        d: Deferred = Deferred(cancel)
        waiter = _Waiter(cid, node, since, d)
        waiter.timer = self.clock.callLater(wait, self._fire, waiter, (304, None))
        self._waiters.setdefault((cid, node.group.name), set()).add(waiter)
        return d

    def _drop(self, waiter: _Waiter) -> None:
        key = (waiter.context_id, waiter.node.group.name)
        group = self._waiters.get(key)
        if group is not None:
            group.discard(waiter)
            if not group:
                del self._waiters[key]
        if waiter.timer is not None and waiter.timer.active():
            waiter.timer.cancel()

    def _fire(self, waiter: _Waiter, result: Any) -> None:
        self._drop(waiter)
        if isinstance(result, Exception):
            waiter.deferred.errback(result)
        else:
            waiter.deferred.callback(result)

    def _wake(self, touched: Touched) -> None:
        cid = touched.context_id
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
        if touched.nodes:
            for group in {ctx.nodes[n].group.name for n in touched.nodes}:
                candidates.update(w for w in self._waiters.get((cid, group), ()) if w.node.id in touched.nodes)
        for waiter in candidates:
            if self.model.view_revision(waiter.node) > waiter.since:
                self._fire(waiter, (200, self.model.view(waiter.node)))

    def waiter_count(self) -> int:
        return sum(len(s) for s in self._waiters.values())

    def shutdown(self) -> None:
        """Answer every waiter with 304 so agents re-poll the next broker."""
        for key in list(self._waiters):
            for waiter in list(self._waiters.get(key, ())):
                self._fire(waiter, (304, None))
