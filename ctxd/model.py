"""The broker's state: contexts, groups, nodes and data, in plain Python.

Nothing here imports Twisted or reads the clock: callers pass ``now``.

Every change is a *record*, a JSON-able dict. Handling a request takes two steps:
``prepare_*`` checks the request against the current state and returns the record
(carrying any generated ids and the hashes of generated tokens) without changing
anything; :meth:`Model.apply` then changes the state from that record. Replaying the
journal calls ``apply`` alone, so the live and the replayed state cannot differ.

``apply`` returns a :class:`Touched` naming the groups and nodes whose *views*
changed, so the caller wakes only the long-poll waiters concerned. The rules:

- a node's identity appearing or changing touches the groups requiring a role
  its group provides, and the groups that asked for all identities;
- a change in how many of a group's nodes are ok touches the groups that require
  one of its roles with ``ready``;
- a data item touches the groups requiring it; locking touches every group;
- a node's own state or identity touches that node.

``apply`` also keeps each context's *progress* (:meth:`Model.progress`: the counts by state,
the lock and the oldest error) and its revision, which moves only when the progress does;
``Touched.progress`` says so. That costs O(1) per record: nothing here walks the nodes.
"""

import base64
import bisect
import ipaddress
import json
from collections import OrderedDict
from typing import Any, Dict, Iterable, List, NamedTuple, Optional, Sequence, Tuple

from ctxd import rules, tokens, validate
from ctxd.errors import (
    BadRequest,
    QuotaExceeded,
    Conflict,
    Forbidden,
    IdentityConflict,
    IdentityRefused,
    JoinTokenExpired,
    NotFound,
)

class Principal(NamedTuple):
    """Who holds a credential.

    ``kind`` is "admin" (the site admin), "deployer", "join" (a group's join token) or
    "node"; ``context_id`` is the context of a join token or node credential;
    ``subject`` is the deployer's name, the join token's group or the node's id.
    """

    kind: str
    context_id: str = ""
    subject: str = ""

    @property
    def is_admin(self) -> bool:
        return self.kind == "admin"

    @property
    def manages_contexts(self) -> bool:
        """The site admin and deployers create and manage contexts."""
        return self.kind in ("admin", "deployer")

    def may_see(self, ctx: "Context") -> bool:
        """The site admin sees every context; a deployer its own; nobody else any."""
        return self.is_admin or (self.kind == "deployer" and ctx.owner == self.subject)


SITE_ADMIN = Principal("admin")


class Quotas:
    """Quotas enforced by the model (configurable; see ctxd --help)."""

    def __init__(
        self,
        contexts_per_deployer: int = 100,
        nodes_per_context: int = 20_000,
        data_bytes_per_context: int = 4 * 1024 * 1024,
    ) -> None:
        self.contexts_per_deployer = contexts_per_deployer
        self.nodes_per_context = nodes_per_context
        self.data_bytes_per_context = data_bytes_per_context


def _data_bytes(values: Iterable[str]) -> int:
    """Decoded size of base64 values."""
    return sum(len(v) * 3 // 4 - v.count("=") for v in values)


ENROLLED = "enrolled"
CONTEXTUALIZING = "contextualizing"
OK = "ok"
ERROR = "error"
STATES = (ENROLLED, CONTEXTUALIZING, OK, ERROR)
# A new node's times, copied (not rebuilt) per node: a hot path of replay.
_NO_TIMES: Dict[str, Optional[float]] = {f"{s}_at": None for s in STATES}


class Touched:
    """What one applied record changed, for waking long-poll waiters."""

    __slots__ = ("context_id", "groups", "nodes", "deleted", "progress")

    def __init__(self, context_id: str) -> None:
        self.context_id = context_id
        self.groups: set = set()
        self.nodes: set = set()
        self.deleted = False
        # Whether the context's progress (Model.progress) changed.
        self.progress = False


class Node:
    __slots__ = (
        "id",
        "group",
        "identity",
        "public",
        "source",
        "state",
        "times",
        "error",
        "log_tail",
        "token_hash",
        "instance_hash",
        "self_rev",
        "revoked",
        "watching",
        "seen",
        "credentials",
        "waiting",
    )

    def __init__(self, node_id: str, group: "Group") -> None:
        self.id = node_id
        self.group = group
        self.identity: Dict[str, Any] = {}
        self.public: Dict[str, Any] = {}
        self.source = ""
        self.state = ENROLLED
        self.times = dict(_NO_TIMES)
        self.error: Optional[Dict[str, Any]] = None
        self.log_tail = ""
        self.token_hash = ""
        self.instance_hash = ""
        self.self_rev = 0
        # Departed (removed, left, lost or revoked): ctx.departures says why and when.
        self.revoked = False
        # Whether its agent runs in watch mode (a group's lease applies to it), and when
        # it was last heard from (kept for leased groups only; None: not since start-up).
        self.watching = False
        self.seen: Optional[float] = None
        # What was issued to it last, by kind ("x509", "ssh"): a credential record without its
        # op, ctx, node and at (None: nothing yet; most nodes).
        self.credentials: Optional[Dict[str, Dict[str, Any]]] = None
        # Why its agent waits ("waiting: role ...", from its last contextualizing report); "" when
        # it does not, or once it is ok or in error.
        self.waiting = ""

    def set_identity(self, identity: Dict[str, Any]) -> bool:
        """Replace the identity; return whether it changed."""
        if identity == self.identity:
            return False
        self.identity = identity
        # What peers see of this node, built once per change and shared by
        # every view that lists it.
        self.public = {
            "node_id": self.id,
            "group": self.group.name,
            "hostname": identity["hostname"],
            "fqdn": identity["fqdn"],
            "ip": identity["primary_ip"],
            "ssh_host_keys": identity["ssh_host_keys"],
        }
        return True


def json_bytes(value: Any) -> bytes:
    """``value`` as compact JSON (ASCII)."""
    return json.dumps(value, separators=(",", ":")).encode("ascii")


class JSONChunks:
    """A JSON document already rendered: the byte strings that, concatenated, are it.

    A view is two: its group's shared part, one bytes object for every node of the
    group (with all_identities, almost all of the view), and the node's own fields.
    """

    __slots__ = ("chunks",)

    def __init__(self, chunks: Sequence[bytes]) -> None:
        self.chunks = chunks

    def __bytes__(self) -> bytes:
        return b"".join(self.chunks)


class Group:
    __slots__ = (
        "context_id",
        "name",
        "quantity",
        "provides",
        "requires",
        "data",
        "all_identities",
        "source_check",
        "lease",
        "watch",
        "certificate",
        "ssh_certificate",
        "join_hash",
        "join_expires",
        "nodes",
        "by_instance",
        "ok",
        "view_rev",
        "cache",
        "rendered",
        "delta",
        "key",
    )

    def __init__(self, context_id: str, spec: Dict[str, Any], join_hash: str, join_expires: float) -> None:
        self.context_id = context_id
        self.name: str = spec["name"]
        self.quantity: int = spec["quantity"]
        self.provides: List[str] = spec["provides"]
        self.requires: List[Tuple[str, bool]] = [(r["role"], r["ready"]) for r in spec["requires"]]
        self.data: List[str] = spec["data"]
        self.all_identities: bool = spec["all_identities"]
        # Contexts created before the check existed keep working as they did.
        self.source_check: bool = spec.get("source_check", False)
        # Seconds a watching node may stay silent before it departs (None: no lease).
        self.lease: Optional[int] = spec.get("lease")
        # Whether its agents run in watch mode (what ctxctl's user-data starts).
        self.watch: bool = spec.get("watch", False)
        # Its host credentials (docs/credentials.md), when it opted in.
        self.certificate: Optional[Dict[str, Any]] = spec.get("certificate")
        self.ssh_certificate: Optional[Dict[str, Any]] = spec.get("ssh_certificate")
        self.join_hash = join_hash
        self.join_expires = join_expires
        self.nodes: List[Node] = []
        self.by_instance: Dict[str, Node] = {}
        self.ok = 0
        self.view_rev = 0
        # (view_rev, part): the view shared by all of this group's nodes.
        self.cache: Optional[Tuple[int, Dict[str, Any]]] = None
        # (view_rev, that part as JSON without its closing brace): rendered once, sent to all.
        self.rendered: Optional[Tuple[int, bytes]] = None
        # (view_rev, {since: the delta's shared part}): deltas rendered at this revision of the
        # group's view, for its other watchers.
        self.delta: Optional[Tuple[int, Dict[int, bytes]]] = None
        # (context id, group name): what the broker's view waiters of this group are kept under.
        self.key = (context_id, self.name)

    def spec(self) -> Dict[str, Any]:
        spec = {
            "name": self.name,
            "quantity": self.quantity,
            "provides": list(self.provides),
            "requires": [{"role": r, "ready": ready} for r, ready in self.requires],
            "data": list(self.data),
            "all_identities": self.all_identities,
            "source_check": self.source_check,
            "lease": self.lease,
            "watch": self.watch,
        }
        for kind in ("certificate", "ssh_certificate"):
            if getattr(self, kind) is not None:
                spec[kind] = dict(getattr(self, kind))
        return spec


class Context:
    def __init__(self, record: Dict[str, Any]) -> None:
        self.id: str = record["ctx"]
        self.name: str = record["name"]
        self.open_for_injection: bool = record["open_for_injection"]
        # The deployer who created it ("" for the site admin).
        self.owner: str = record.get("owner", "")
        self.locked = not self.open_for_injection
        self.created: float = record["at"]
        # The join tokens' lifetime as created: a rotation or a scale makes a token valid this
        # long from then (a snapshot's create record carries it; older ones: from their times).
        self.join_ttl: float = record.get("join_ttl", record["join_expires"] - record["at"])
        self.expires: float = record["expires"]
        # Every fqdn must lie in it ("": any).
        self.domain: str = record.get("domain", "")
        # The public halves of its certificate authorities, when a group opted in (ctxd.credentials):
        # "x509" (the CA certificate, PEM) and "ssh" (the SSH CA's public key).
        self.cas: Dict[str, str] = record.get("cas", {})
        # Its ctx-scripts tree (a gzip'd tar) and that tree's SHA-256 (None: the cluster file named none).
        scripts = record.get("scripts")
        self.scripts: Optional[bytes] = base64.b64decode(scripts["b64"]) if scripts else None
        self.scripts_sha256: str = scripts["sha256"] if scripts else ""
        self.revision = 1
        self.groups: Dict[str, Group] = {}
        for spec in record["groups"]:
            self.groups[spec["name"]] = Group(
                self.id,
                spec, record["join_hashes"][spec["name"]], record["join_expires"]
            )
        self.data: Dict[str, List[str]] = {k: list(v) for k, v in record["data"].items()}
        # Every node ever enrolled, revoked ones included (for status); a group's
        # ``nodes`` are its members.
        self.nodes: Dict[str, Node] = {}
        self.counts = {s: 0 for s in STATES}
        # Who holds what: a node speaks only for itself (docs/security.md). Names (short
        # and fully qualified, lower case), primary addresses and SSH host keys belong
        # to one node each; interface addresses may repeat (a container bridge on every
        # VM) but never be another node's primary address.
        self.name_owner: Dict[str, str] = {}
        self.ip_owner: Dict[str, str] = {}
        self.key_owner: Dict[str, str] = {}
        # The SHA-256 of each TLS key a certificate was issued for -> its node: one key, one node
        # (a key baked into an image would otherwise be every VM's).
        self.cert_key_owner: Dict[str, str] = {}
        self.iface_owners: Dict[str, Any] = {}  # address -> a node id, or a set of them
        # node id -> (reason, when) of every departed node: removed, left, lost or revoked.
        self.departures: Dict[str, Tuple[str, float]] = {}
        # The membership log behind delta views (Model.view_delta): the revision at which a
        # node's entry in the views changed (its identity, its first ok, its departure), in
        # order; below ``delta_floor`` a watcher gets the full view.
        self.change_revs: List[int] = []
        self.change_nodes: List[Node] = []
        self.change_ready: List[bool] = []   # whether it was a first ok (matters to ready roles only)
        self.delta_floor = self.revision
        # Dependency indexes, fixed at creation.
        self.providers_of: Dict[str, List[Group]] = {}
        for g in self.groups.values():
            for role in g.provides:
                self.providers_of.setdefault(role, []).append(g)
        self.dependents: Dict[str, set] = {name: set() for name in self.groups}
        self.ready_dependents: Dict[str, set] = {name: set() for name in self.groups}
        for g in self.groups.values():
            for role, ready in g.requires:
                for p in self.providers_of[role]:
                    self.dependents[p.name].add(g.name)
                    if ready:
                        self.ready_dependents[p.name].add(g.name)
        self.all_identity_groups = {g.name for g in self.groups.values() if g.all_identities}
        for g in self.groups.values():
            g.view_rev = self.revision
        # The members in state error, oldest error first (an OrderedDict: its first entry is
        # O(1) however many came and went), and what Model.progress shows, as last seen.
        self.failed: "OrderedDict[str, Node]" = OrderedDict()
        # The contextualizing members that said why they wait, longest waiting first (the progress
        # shows the first: O(1)).
        self.waiting: "OrderedDict[str, Node]" = OrderedDict()
        # The last reason a node gave: the next node that gives the same one shares the string
        # (a cluster's nodes mostly wait for the same thing).
        self.last_waiting = ""
        self.progress_rev = self.revision
        self.progress_key = _progress_key(self)

    @property
    def expected(self) -> int:
        return sum(g.quantity for g in self.groups.values())

    @property
    def members(self) -> int:
        """Nodes enrolled and not revoked."""
        return sum(len(g.nodes) for g in self.groups.values())

    def conflict(self, node_id: str, identity: Dict[str, Any]) -> Optional[str]:
        """What of ``identity`` another node than ``node_id`` holds, described; None if nothing."""
        return self.conflicting(node_id, _claims(identity))

    def conflicting(self, node_id: str, claims: "Claims") -> Optional[str]:
        names, primary, addresses, keys = claims
        owner = self.name_owner.get
        for name in names:
            if owner(name, node_id) != node_id:
                return f"name {name!r} (hostname or fqdn)"
        if self.ip_owner.get(primary, node_id) != node_id or self._listed_by_another(primary, node_id):
            return f"primary_ip {primary}"
        owner = self.ip_owner.get
        for address in addresses:
            if owner(address, node_id) != node_id:
                return f"interface address {address} (another node's primary_ip)"
        owner = self.key_owner.get
        for key in keys:
            if owner(key, node_id) != node_id:
                return f"ssh host key {key.split()[0]} ...{key[-12:]}"
        return None

    def _listed_by_another(self, address: str, node_id: str) -> bool:
        listed = self.iface_owners.get(address)
        if listed is None:
            return False
        if isinstance(listed, str):
            return listed != node_id
        return len(listed) > 1 or node_id not in listed

    def take(self, node: Node, identity: Dict[str, Any]) -> bool:
        """Give ``node`` what ``identity`` claims, in place of what it held, unless another
        node holds part of it; whether it did. (Replay's hot path: one pass over the claims.)"""
        claims = _claims(identity)
        if self.conflicting(node.id, claims) is not None:
            return False
        if node.identity:
            self.release(node)
        self.claim(node.id, claims)
        return True

    def claim(self, nid: str, claims: "Claims") -> None:
        names, primary, addresses, keys = claims
        for name in names:
            self.name_owner[name] = nid
        self.ip_owner[primary] = nid
        for key in keys:
            self.key_owner[key] = nid
        listed = self.iface_owners
        for address in addresses:
            # One owner is kept as its id, several as a set: a set per address would cost
            # every node a few hundred bytes.
            current = listed.get(address)
            if current is None:
                listed[address] = nid
            elif isinstance(current, str):
                if current != nid:
                    listed[address] = {current, nid}
            else:
                current.add(nid)

    def release(self, node: Node) -> None:
        if not node.identity:
            return
        names, primary, addresses, keys = _claims(node.identity)
        nid = node.id
        for table, values in ((self.name_owner, names), (self.ip_owner, (primary,)), (self.key_owner, keys)):
            for value in values:
                if table.get(value) == nid:
                    del table[value]
        listed = self.iface_owners
        for address in addresses:
            current = listed.get(address)
            if current == nid:
                del listed[address]
            elif isinstance(current, set):
                current.discard(nid)
                if len(current) == 1:
                    listed[address] = next(iter(current))

    def touch_groups(self, names: Iterable[str], touched: Touched) -> None:
        for name in names:
            self.groups[name].view_rev = self.revision
            touched.groups.add(name)

    def touch_node(self, node: Node, touched: Touched) -> None:
        node.self_rev = self.revision
        touched.nodes.add(node.id)

    def membership_changed(self, node: Node, first_ok: bool = False) -> None:
        """``node``'s entry in the views changed at this revision (the delta log): its identity
        or its departure, or (``first_ok``) its first ok, which lists it under ready roles."""
        self.change_revs.append(self.revision)
        self.change_nodes.append(node)
        self.change_ready.append(first_ok)
        if len(self.change_revs) > 2 * CHANGE_LOG:
            # Amortized O(1): drop the older half; a watcher behind it gets the full view.
            cut = len(self.change_revs) - CHANGE_LOG
            self.delta_floor = self.change_revs[cut - 1]
            del self.change_revs[:cut]
            del self.change_nodes[:cut]
            del self.change_ready[:cut]

    def no_deltas_before_now(self) -> None:
        """What a view shows changed in a way the delta log does not describe (data, the lock,
        a restored snapshot): watchers holding an older revision get the full view."""
        self.delta_floor = self.revision
        self.change_revs.clear()
        self.change_nodes.clear()
        self.change_ready.clear()


def _provided(providers: List[Group], ready: bool) -> int:
    """How many of a role's expected providers count: those ok (a ``ready`` role), else enrolled."""
    return sum(p.ok for p in providers) if ready else sum(len(p.nodes) for p in providers)


def _waiting_for(ctx: Context, g: Group) -> List[str]:
    """What ``g``'s view still waits for (none: complete): O(roles and data it requires)."""
    waiting = []
    for role, ready in g.requires:
        providers = ctx.providers_of[role]
        expected = sum(p.quantity for p in providers)
        have = _provided(providers, ready)
        if have != expected:
            waiting.append(f"role {role}: {have} of {expected} providers {'ok' if ready else 'enrolled'}")
    waiting.extend(f"data {name}: no value yet" for name in g.data if not ctx.data.get(name))
    if not ctx.locked:
        waiting.append("context is not locked yet (open for injection)")
    return waiting


def _listed(providers: List[Group], ready: bool) -> List[Dict[str, Any]]:
    """What a view lists of a role's providers: those with an identity; of a ``ready`` role,
    those that reported ok at least once (a node's later error does not unlist it)."""
    if ready:
        return [n.public for p in providers for n in p.nodes if n.public and n.times["ok_at"] is not None]
    return [n.public for p in providers for n in p.nodes if n.public]


def _plain_address(source: str) -> str:
    """A client address as identities spell it: canonical, an IPv4-mapped IPv6 address as IPv4."""
    try:
        address = ipaddress.ip_address(source)
    except ValueError:
        return source
    mapped = getattr(address, "ipv4_mapped", None)
    return str(mapped or address)


Claims = Tuple[Tuple[str, ...], str, List[str], List[str]]


def _lower(name: str) -> str:
    # The name itself when it is lower case already (most are): no copy kept per node.
    return name if name.islower() else name.lower()


def _claims(identity: Dict[str, Any]) -> Claims:
    """What an identity claims: its names (short and full, lower case: how hosts files
    compare them), its primary address, its interface addresses, its SSH host keys."""
    short, full = _lower(identity["hostname"]), _lower(identity["fqdn"])
    addresses: List[str] = []
    for iface in identity["interfaces"]:
        addresses += iface["ipv4"]
        addresses += iface["ipv6"]
    return (short,) if short == full else (short, full), identity["primary_ip"], addresses, identity["ssh_host_keys"]


#: How much of the oldest error's message the progress shows (the status has all of it).
FIRST_ERROR_MESSAGE = 500
#: Membership changes kept per context for delta views (between this and twice as many).
CHANGE_LOG = 2048


def _set_waiting(ctx: Context, node: Node, message: str) -> None:
    """Record why ``node`` waits ("": it does not), keeping ``ctx.waiting`` in order."""
    if message == ctx.last_waiting:
        message = ctx.last_waiting
    elif message:
        ctx.last_waiting = message
    node.waiting = message
    if not message:
        ctx.waiting.pop(node.id, None)
    elif node.id not in ctx.waiting:
        ctx.waiting[node.id] = node


def _tally(ctx: Context) -> Dict[str, Any]:
    """The counts and what follows from them, shared by the summary and the progress."""
    expected = ctx.expected
    members = ctx.members
    counts = {"expected": expected, "enrolled": members}
    counts.update({s: ctx.counts[s] for s in (CONTEXTUALIZING, OK, ERROR)})
    return {
        "counts": counts,
        "complete": members == expected,
        "all_ok": ctx.counts[OK] == expected,
        "error_present": ctx.counts[ERROR] > 0,
    }


def _progress_key(ctx: Context) -> Tuple[Any, ...]:
    """What :meth:`Model.progress` shows that can change, in O(groups): computed after every
    record, replay included, so kept to a flat tuple."""
    c = ctx.counts
    key: Tuple[Any, ...] = (c[ENROLLED], c[CONTEXTUALIZING], c[OK], c[ERROR], ctx.locked, ctx.expected)
    failed = ctx.failed
    if failed:
        first = failed[next(iter(failed))]
        key += (first.id, first.identity.get("hostname"), first.error)
    if ctx.waiting:
        longest = ctx.waiting[next(iter(ctx.waiting))]
        key += (longest.id, longest.waiting)
    return key


def _context_records(ctx: Context) -> List[Dict[str, Any]]:
    """The records that rebuild one context (see :meth:`Model.snapshot_records`)."""
    first = next(iter(ctx.groups.values()))
    out: List[Dict[str, Any]] = [{
        "op": "create",
        "ctx": ctx.id,
        "at": ctx.created,
        "name": ctx.name,
        "open_for_injection": ctx.open_for_injection,
        "expires": ctx.expires,
        "join_expires": first.join_expires,
        "join_ttl": ctx.join_ttl,
        "groups": [g.spec() for g in ctx.groups.values()],
        "data": {k: list(v) for k, v in ctx.data.items()},
        "join_hashes": {g.name: g.join_hash for g in ctx.groups.values()},
        "owner": ctx.owner,
        "domain": ctx.domain,
    }]
    if ctx.cas:
        out[0]["cas"] = dict(ctx.cas)
    if ctx.scripts is not None:
        out[0]["scripts"] = {"b64": base64.b64encode(ctx.scripts).decode("ascii"), "sha256": ctx.scripts_sha256,
                             "size": len(ctx.scripts)}
    for node in ctx.nodes.values():
        out.append({
            "op": "enroll",
            "ctx": ctx.id,
            "node": node.id,
            "group": node.group.name,
            "at": node.times["enrolled_at"],
            "instance_hash": node.instance_hash,
            "token_hash": node.token_hash,
            "identity": dict(node.identity),
            "source": node.source,
        })
        out.append({
            "op": "restore_node",
            "ctx": ctx.id,
            "node": node.id,
            "state": node.state,
            "times": dict(node.times),
            "error": dict(node.error) if node.error is not None else None,
            "log_tail": node.log_tail,
            "revoked": node.revoked,
            "departed": ctx.departures.get(node.id),
            "watching": node.watching,
            "self_rev": node.self_rev,
            **({"waiting": node.waiting} if node.waiting else {}),
        })
        for kind, issued in (node.credentials or {}).items():
            out.append({"op": "credential", "ctx": ctx.id, "node": node.id, "at": issued["at"],
                        "issued": {kind: {k: v for k, v in issued.items() if k != "at"}}})
    out.append({
        "op": "restore_context",
        "ctx": ctx.id,
        "revision": ctx.revision,
        "locked": ctx.locked,
        "groups": {g.name: {"view_rev": g.view_rev, "join_expires": g.join_expires} for g in ctx.groups.values()},
        "progress_rev": ctx.progress_rev,
        "failed": list(ctx.failed),
        **({"waiting": list(ctx.waiting)} if ctx.waiting else {}),
    })
    return out


class User:
    """A deployer credential minted by the site admin."""

    __slots__ = ("name", "token_hash", "created", "revoked_at")

    def __init__(self, name: str, token_hash: str, created: float) -> None:
        self.name = name
        self.token_hash = token_hash
        self.created = created
        self.revoked_at: Optional[float] = None


GLOBAL_OPS = ("create", "user_add", "user_revoke")


class Model:
    """All contexts and deployers, plus the index from token hashes to principals."""

    def __init__(self, quotas: Optional[Quotas] = None) -> None:
        self.quotas = quotas or Quotas()
        self.contexts: Dict[str, Context] = {}
        self.users: Dict[str, User] = {}
        # token hash -> the Principal holding that token (never the site admin's)
        self.principals: Dict[str, Principal] = {}

    # -- authentication ----------------------------------------------------

    def principal(self, token_hash: str) -> Optional[Principal]:
        """Who holds the token with this hash, if anyone."""
        found = self.principals.get(token_hash)
        if found is None:
            return None
        # The dict lookup already matched; compare again in constant time so
        # the decision never rests on a short-circuiting comparison.
        kind, cid, oid = found
        if kind == "deployer":
            stored = self.users[oid].token_hash
        else:
            ctx = self.contexts[cid]
            stored = ctx.groups[oid].join_hash if kind == "join" else ctx.nodes[oid].token_hash
        return found if tokens.same_hash(stored, token_hash) else None

    def owned_context(self, principal: Principal, cid: str, now: float) -> Context:
        """The context, if this admin or deployer may manage it; else NotFound.

        Another deployer's context answers exactly like one that does not exist.
        """
        ctx = self.context(cid, now)
        if not principal.may_see(ctx):
            raise NotFound("no such context")
        return ctx

    def visible_contexts(self, principal: Principal, now: float) -> List[Context]:
        return [c for c in self.contexts.values() if c.expires > now and principal.may_see(c)]

    # -- lookups -------------------------------------------------------------

    def context(self, cid: str, now: float) -> Context:
        ctx = self.contexts.get(cid)
        if ctx is None or ctx.expires <= now:
            raise NotFound("no such context")
        return ctx

    def node(self, cid: str, nid: str, now: float) -> Node:
        node = self.context(cid, now).nodes.get(nid)
        if node is None:
            raise NotFound("no such node")
        return node

    def expired(self, now: float) -> List[str]:
        return [cid for cid, ctx in self.contexts.items() if ctx.expires <= now]

    # -- prepare: validate a request, return the record ----------------------

    def prepare_create(
        self, body: Any, now: float, owner: str = ""
    ) -> Tuple[Dict[str, Any], Dict[str, str]]:
        spec = validate.cluster(body)
        quotas = self.quotas
        if owner:
            owned = sum(1 for c in self.contexts.values() if c.owner == owner and c.expires > now)
            if owned >= quotas.contexts_per_deployer:
                raise QuotaExceeded(f"deployer {owner!r} already has {owned} contexts (limit {quotas.contexts_per_deployer})")
        expected = sum(g["quantity"] for g in spec["groups"])
        if expected > quotas.nodes_per_context:
            raise QuotaExceeded(f"the context expects {expected} nodes (limit {quotas.nodes_per_context})")
        size = sum(_data_bytes(v) for v in spec["data"].values()) + spec.get("scripts", {}).get("size", 0)
        if size > quotas.data_bytes_per_context:
            raise QuotaExceeded(f"the context's data and scripts are {size} bytes (limit "
                                f"{quotas.data_bytes_per_context})")
        cid = tokens.new_id()
        while cid in self.contexts:  # pragma: no cover - 128 random bits
            cid = tokens.new_id()
        join_tokens = {g["name"]: tokens.new_token(tokens.JOIN) for g in spec["groups"]}
        record = {
            "op": "create",
            "ctx": cid,
            "at": now,
            "name": spec["name"],
            "open_for_injection": spec["open_for_injection"],
            "expires": now + spec["expires_in"],
            "join_expires": now + spec["join_token_ttl"],
            "groups": spec["groups"],
            "data": spec["data"],
            "join_hashes": {g: tokens.token_hash(t) for g, t in join_tokens.items()},
            "owner": owner,
            "domain": spec["domain"],
        }
        if "scripts" in spec:
            record["scripts"] = spec["scripts"]
        return record, join_tokens

    @staticmethod
    def wants_cas(record: Dict[str, Any]) -> Tuple[bool, bool]:
        """Whether a create record's context needs its own X.509 CA, and an SSH CA."""
        groups = record["groups"]
        x509 = any(g.get("certificate", {}).get("issuer") == "context" for g in groups)
        return x509, any("ssh_certificate" in g for g in groups)

    def prepare_enroll(
        self, cid: str, group: str, body: Any, source: str, now: float
    ) -> Tuple[Dict[str, Any], str, bool]:
        """Returns the record, the new node token and whether the node is new."""
        ctx = self.context(cid, now)
        g = ctx.groups[group]
        body = validate.obj(body, "body", required=("instance_key", "identity"))
        key = body["instance_key"]
        if not isinstance(key, str) or not rules.INSTANCE_KEY_RE.fullmatch(key):
            raise BadRequest("instance_key: must be 16 to 128 characters of [A-Za-z0-9_-]")
        instance_hash = tokens.token_hash(key)
        existing = g.by_instance.get(instance_hash)
        if existing is not None:
            if existing.revoked:
                reason = ctx.departures.get(existing.id, ("revoked",))[0]
                raise Forbidden(f"this node departed ({reason}); its instance cannot enroll again")
            # The instance key proves this VM enrolled before: it may get its node
            # back after the join token expired (a late reboot, a lost credential).
            nid, new = existing.id, False
        else:
            if g.join_expires <= now:
                raise JoinTokenExpired(f"the join token of group {group!r} has expired")
            if len(g.nodes) >= g.quantity:
                raise Conflict(
                    f"group {group!r} already has its {g.quantity} node(s) enrolled", code="enrollment_full"
                )
            if len(ctx.nodes) >= 2 * self.quotas.nodes_per_context:
                # Departed nodes are kept (status, and their instances may not come back): a VM
                # that enrolls and leaves in a loop must not grow the broker without end.
                raise QuotaExceeded(
                    f"the context has kept {len(ctx.departures)} departed nodes and {ctx.members} members "
                    f"(limit {2 * self.quotas.nodes_per_context} in all): create a new context, or rotate "
                    "the join token if a VM is enrolling and leaving in a loop"
                )
            nid, new = tokens.new_id(), True
            while nid in ctx.nodes:  # pragma: no cover
                nid = tokens.new_id()
        # Only now, with a slot for it, the identity (the costly part) is read.
        identity = self._own_identity(ctx, g, nid, body["identity"], source)
        node_token = tokens.new_token(tokens.NODE)
        record = {
            "op": "enroll",
            "ctx": cid,
            "node": nid,
            "group": group,
            "at": now,
            "instance_hash": instance_hash,
            "token_hash": tokens.token_hash(node_token),
            "identity": identity,
            "source": source,
            "attempt": True,
        }
        return record, node_token, new

    def prepare_identity(self, cid: str, nid: str, body: Any, source: str, now: float) -> Dict[str, Any]:
        node = self.node(cid, nid, now)
        return {
            "op": "identity",
            "ctx": cid,
            "node": nid,
            "at": now,
            "identity": self._own_identity(self.contexts[cid], node.group, nid, body, source),
            "source": source,
            "attempt": True,
        }

    @staticmethod
    def _own_identity(ctx: Context, g: Group, nid: str, value: Any, source: str) -> Dict[str, Any]:
        """``value`` as an identity node ``nid`` may claim: valid, its own address (unless the
        group turned the source check off), in the context's domain, and nothing another node
        of the context holds."""
        identity = validate.identity(value)
        primary = identity["primary_ip"]
        if g.source_check and primary != _plain_address(source):
            raise IdentityRefused(
                f"primary_ip {primary} is not the address this request came from ({source or 'unknown'}); "
                f"if group {g.name!r} reaches the broker through NAT, set source_check = false for it "
                "in the cluster file"
            )
        if ctx.domain and not rules.in_domain(identity["fqdn"], ctx.domain):
            raise IdentityRefused(f"fqdn {identity['fqdn']!r} is not in this context's domain {ctx.domain!r}")
        taken = ctx.conflict(nid, identity)
        if taken is not None:
            raise IdentityConflict(f"{taken} is already claimed by another node of this context")
        return identity

    @staticmethod
    def vetted_names(node: Node, kinds: Sequence[str]) -> List[str]:
        """The names of ``node``'s accepted identity that a certificate may carry, of
        ``kinds`` (:data:`ctxd.rules.CERT_NAMES`), lower case, each once. Only names no other
        node of the context holds: its fqdn, short name and primary address (interface
        addresses may repeat across nodes)."""
        identity = node.identity
        field = {"fqdn": "fqdn", "hostname": "hostname", "ip": "primary_ip"}
        return list(dict.fromkeys(identity[field[k]].lower() for k in kinds))

    def prepare_credential(self, node: Node, issued: Dict[str, Dict[str, Any]], now: float) -> Dict[str, Any]:
        """The record of credentials issued to ``node`` (by kind: what a restart must remember;
        the chain and bundle are the issuer's, not the node's)."""
        return {
            "op": "credential",
            "ctx": node.group.context_id,
            "node": node.id,
            "at": now,
            "issued": {kind: {k: v for k, v in value.items() if k not in ("chain", "bundle")}
                       for kind, value in issued.items()},
        }

    def prepare_report(self, cid: str, nid: str, body: Any, now: float) -> Dict[str, Any]:
        node = self.node(cid, nid, now)
        body = validate.obj(body, "body", required=("state",),
                            optional=("exit_code", "message", "log_tail", "watch"))
        state = body["state"]
        if state not in (CONTEXTUALIZING, OK, ERROR):
            raise BadRequest("state: must be one of contextualizing, ok, error")
        exit_code = body.get("exit_code")
        if exit_code is not None:
            exit_code = validate.integer(exit_code, "exit_code", -255, 255)
        message = validate.string(body.get("message", ""), "message", rules.MAX_MESSAGE)
        log_tail = body.get("log_tail", "")
        if not isinstance(log_tail, str):
            raise BadRequest("log_tail: must be a string")
        watch = validate.boolean(body.get("watch", False), "watch")
        # A node that was ok before re-runs on every change of its view (watch mode), complete
        # or not: a group may be growing. Only a first success needs a complete view.
        if state == OK and node.times["ok_at"] is None and not self._group_part(
                self.contexts[cid], node.group)["complete"]:
            raise Conflict(
                "this node's view is not complete: it cannot have been contextualized", code="state_conflict"
            )
        if node.state == ERROR and state == OK:
            raise Conflict(
                "this node reported an error; it must start a new attempt (report contextualizing) "
                "before it can report ok",
                code="state_conflict",
            )
        return {
            "op": "report",
            "ctx": cid,
            "node": nid,
            "at": now,
            "state": state,
            "exit_code": exit_code,
            "message": message,
            "log_tail": log_tail[-rules.MAX_LOG_TAIL:],
            **({"watch": True} if watch else {}),
        }

    def prepare_data(self, cid: str, name: str, body: Any, now: float) -> Dict[str, Any]:
        ctx = self.context(cid, now)
        if name not in ctx.data:
            raise NotFound(f"data item {name!r} is not declared in this context")
        body = validate.obj(body, "body", required=("values",))
        values = validate.data_values(body["values"], "values")
        if not values:
            raise BadRequest("values: at least one value is needed")
        if ctx.locked:
            raise Conflict("the context is locked; data can no longer be injected", code="context_locked")
        size = _data_bytes(values) + sum(_data_bytes(v) for k, v in ctx.data.items() if k != name) \
            + (len(ctx.scripts) if ctx.scripts is not None else 0)
        if size > self.quotas.data_bytes_per_context:
            raise QuotaExceeded(
                f"the context's data would be {size} bytes (limit {self.quotas.data_bytes_per_context})"
            )
        return {"op": "data", "ctx": cid, "at": now, "name": name, "values": values}

    def prepare_lock(self, cid: str, now: float) -> Optional[Dict[str, Any]]:
        ctx = self.context(cid, now)
        if ctx.locked:
            return None
        missing = [name for name, values in ctx.data.items() if not values]
        if missing:
            raise Conflict(
                f"data item {missing[0]!r} has no value yet; put one before locking", code="missing_data"
            )
        return {"op": "lock", "ctx": cid, "at": now}

    def prepare_user_add(self, body: Any, now: float) -> Tuple[Dict[str, Any], str]:
        body = validate.obj(body, "body", required=("name",))
        name = validate.name(body["name"], "name")
        existing = self.users.get(name)
        if existing is not None and existing.revoked_at is None:
            raise Conflict(f"deployer {name!r} exists; revoke it first to mint a new credential",
                           code="user_exists")
        token = tokens.new_token(tokens.DEPLOYER)
        return {"op": "user_add", "name": name, "token_hash": tokens.token_hash(token), "at": now}, token

    def prepare_user_revoke(self, name: str, now: float) -> Dict[str, Any]:
        user = self.users.get(name)
        if user is None or user.revoked_at is not None:
            raise NotFound(f"no active deployer {name!r}")
        return {"op": "user_revoke", "name": name, "at": now}

    def prepare_node_revoke(self, cid: str, nid: str, now: float) -> Dict[str, Any]:
        node = self.node(cid, nid, now)
        if node.revoked:
            raise Conflict("this node's credential is already revoked", code="already_revoked")
        return {"op": "node_revoke", "ctx": cid, "node": nid, "at": now}

    def prepare_depart(self, cid: str, nid: str, reason: str, now: float, shrink: bool = False) -> Dict[str, Any]:
        """The node leaves the cluster: ``reason`` is "removed" (by the deployer), "left" (by
        itself) or "lost" (its lease ran out); ``shrink`` lowers its group's quantity by one."""
        node = self.node(cid, nid, now)
        if node.revoked:
            reason_then = self.contexts[cid].departures.get(nid, ("revoked",))[0]
            raise Conflict(f"this node has already departed ({reason_then})", code="already_departed")
        record = {"op": "depart", "ctx": cid, "node": nid, "reason": reason, "at": now}
        if shrink:
            record["shrink"] = True
        return record

    def prepare_scale(self, cid: str, group: str, body: Any, now: float) -> Dict[str, Any]:
        """A new quantity for ``group``: raised, its join token admits VMs up to it (made valid
        again if it expired); never below the group's members."""
        ctx = self.context(cid, now)
        g = ctx.groups.get(group)
        if g is None:
            raise NotFound(f"no group {group!r} in this context")
        body = validate.obj(body, "body", required=("quantity",))
        quantity = validate.integer(body["quantity"], "quantity", 0, rules.MAX_QUANTITY)
        if quantity < len(g.nodes):
            raise Conflict(
                f"group {group!r} has {len(g.nodes)} member(s): remove nodes first "
                f"(ctxctl node remove CTX NODE... --shrink), then scale to {quantity}",
                code="scale_below_members",
            )
        expected = ctx.expected - g.quantity + quantity
        if expected > self.quotas.nodes_per_context:
            raise QuotaExceeded(f"the context would expect {expected} nodes (limit {self.quotas.nodes_per_context})")
        join_expires = g.join_expires
        if quantity > g.quantity:   # raised: new VMs will come with the group's join token
            join_expires = min(max(join_expires, now + max(ctx.join_ttl, rules.MIN_SECONDS)), ctx.expires)
        return {"op": "scale", "ctx": cid, "group": group, "quantity": quantity, "at": now,
                "join_expires": join_expires}

    def prepare_extend(self, cid: str, body: Any, now: float) -> Dict[str, Any]:
        """A new expiry: ``expires_in`` seconds from now."""
        self.context(cid, now)
        body = validate.obj(body, "body", required=("expires_in",))
        expires_in = validate.integer(body["expires_in"], "expires_in", rules.MIN_SECONDS, rules.MAX_EXPIRES_IN)
        return {"op": "extend", "ctx": cid, "expires": now + expires_in, "at": now}

    def prepare_join_rotate(self, cid: str, group: str, now: float) -> Tuple[Dict[str, Any], str]:
        ctx = self.context(cid, now)
        if group not in ctx.groups:
            raise NotFound(f"no group {group!r} in this context")
        token = tokens.new_token(tokens.JOIN)
        ttl = max(ctx.join_ttl, 60)
        record = {
            "op": "join_rotate",
            "ctx": cid,
            "group": group,
            "at": now,
            "token_hash": tokens.token_hash(token),
            "join_expires": min(now + ttl, ctx.expires),
        }
        return record, token

    def prepare_delete(self, cid: str, now: float, reason: str = "deleted") -> Dict[str, Any]:
        if cid not in self.contexts:
            raise NotFound("no such context")
        return {"op": "delete", "ctx": cid, "at": now, "reason": reason}

    # -- apply: change the state from a record -------------------------------

    def apply(self, record: Dict[str, Any]) -> Touched:
        op = record["op"]
        handler = getattr(self, f"_apply_{op}", None)
        if handler is None:
            raise ValueError(f"unknown record op {op!r}")
        if op in GLOBAL_OPS:
            return handler(record)
        ctx = self.contexts.get(record["ctx"])
        if ctx is None:
            raise ValueError(f"record for unknown context {record['ctx']!r}")
        ctx.revision += 1
        touched = handler(ctx, record)
        if not touched.deleted:
            self._track_progress(ctx, touched)
        return touched

    @staticmethod
    def _track_progress(ctx: Context, touched: Touched) -> None:
        """After a record: keep ``ctx.failed`` (by the nodes it touched: a node's state change or
        revocation always touches the node) and move the progress revision if the progress changed."""
        failed = ctx.failed
        for nid in touched.nodes:
            node = ctx.nodes[nid]
            if node.state == ERROR and not node.revoked:
                if nid not in failed:
                    failed[nid] = node
            else:
                failed.pop(nid, None)
        key = _progress_key(ctx)
        if key != ctx.progress_key:
            ctx.progress_key = key
            ctx.progress_rev = ctx.revision
            touched.progress = True

    def _apply_create(self, record: Dict[str, Any]) -> Touched:
        ctx = Context(record)
        self.contexts[ctx.id] = ctx
        for g in ctx.groups.values():
            self.principals[g.join_hash] = Principal("join", ctx.id, g.name)
        return Touched(ctx.id)

    def _apply_user_add(self, record: Dict[str, Any]) -> Touched:
        old = self.users.get(record["name"])
        if old is not None:
            self.principals.pop(old.token_hash, None)
        user = User(record["name"], record["token_hash"], record["at"])
        self.users[user.name] = user
        self.principals[user.token_hash] = Principal("deployer", "", user.name)
        return Touched("")

    def _apply_user_revoke(self, record: Dict[str, Any]) -> Touched:
        user = self.users[record["name"]]
        user.revoked_at = record["at"]
        self.principals.pop(user.token_hash, None)
        return Touched("")

    def _apply_node_revoke(self, ctx: Context, record: Dict[str, Any]) -> Touched:
        touched = Touched(ctx.id)
        self._revoke(ctx, ctx.nodes[record["node"]], touched)
        ctx.departures[record["node"]] = ("revoked", record["at"])
        return touched

    def _apply_depart(self, ctx: Context, record: Dict[str, Any]) -> Touched:
        touched = Touched(ctx.id)
        node = ctx.nodes[record["node"]]
        self._revoke(ctx, node, touched)
        ctx.departures[node.id] = (record["reason"], record["at"])
        if record.get("shrink"):
            self._set_quantity(ctx, node.group, max(node.group.quantity - 1, 0), touched)
        return touched

    def _apply_scale(self, ctx: Context, record: Dict[str, Any]) -> Touched:
        touched = Touched(ctx.id)
        g = ctx.groups[record["group"]]
        g.join_expires = record["join_expires"]
        self._set_quantity(ctx, g, record["quantity"], touched)
        return touched

    @staticmethod
    def _set_quantity(ctx: Context, g: Group, quantity: int, touched: Touched) -> None:
        """How many nodes ``g`` expects; the views counting its providers change."""
        if quantity != g.quantity:
            g.quantity = quantity
            ctx.touch_groups(ctx.dependents[g.name], touched)

    def _apply_extend(self, ctx: Context, record: Dict[str, Any]) -> Touched:
        ctx.expires = record["expires"]
        return Touched(ctx.id)

    def _revoke(self, ctx: Context, node: Node, touched: Touched) -> None:
        """The node's credential stops working, it leaves every view and frees its slot; it
        stays in the status (revoked) and its instance cannot enroll again."""
        node.revoked = True
        _set_waiting(ctx, node, "")
        self.principals.pop(node.token_hash, None)
        g = node.group
        g.nodes.remove(node)
        ctx.counts[node.state] -= 1
        if node.state == OK:
            g.ok -= 1
            ctx.touch_groups(ctx.ready_dependents[g.name], touched)
        ctx.release(node)
        if node.public:
            node.public = {}
            ctx.touch_groups(ctx.dependents[g.name] | ctx.all_identity_groups, touched)
            ctx.membership_changed(node)
        ctx.touch_node(node, touched)

    def _apply_join_rotate(self, ctx: Context, record: Dict[str, Any]) -> Touched:
        g = ctx.groups[record["group"]]
        self.principals.pop(g.join_hash, None)
        g.join_hash = record["token_hash"]
        g.join_expires = record["join_expires"]
        self.principals[g.join_hash] = Principal("join", ctx.id, g.name)
        return Touched(ctx.id)

    def _apply_enroll(self, ctx: Context, record: Dict[str, Any]) -> Touched:
        touched = Touched(ctx.id)
        g = ctx.groups[record["group"]]
        node = ctx.nodes.get(record["node"])
        if node is None:
            node = Node(record["node"], g)
            node.instance_hash = record["instance_hash"]
            node.times["enrolled_at"] = record["at"]
            g.nodes.append(node)
            g.by_instance[node.instance_hash] = node
            ctx.nodes[node.id] = node
            ctx.counts[ENROLLED] += 1
        else:
            # Re-enrollment: the old credential stops working.
            self.principals.pop(node.token_hash, None)
        node.token_hash = record["token_hash"]
        self.principals[node.token_hash] = Principal("node", ctx.id, node.id)
        self._set_identity(ctx, node, record, touched)
        self._start_attempt(ctx, node, record, touched)
        return touched

    def _apply_identity(self, ctx: Context, record: Dict[str, Any]) -> Touched:
        touched = Touched(ctx.id)
        node = ctx.nodes[record["node"]]
        self._set_identity(ctx, node, record, touched)
        self._start_attempt(ctx, node, record, touched)
        return touched

    def _start_attempt(self, ctx: Context, node: Node, record: Dict[str, Any], touched: Touched) -> None:
        """An agent that enrolls or reports its identity is starting a contextualization: the
        node is contextualizing, as if it had also reported so (a node already ok stays ok).
        Records written before this rule (no ``attempt``) leave the state to the reports."""
        if record.get("attempt"):
            self._set_state(ctx, node, CONTEXTUALIZING, record["at"], touched)

    def _set_identity(self, ctx: Context, node: Node, record: Dict[str, Any], touched: Touched) -> None:
        """The identity (and source address) of an enroll or identity record.

        A record written before identities were checked may claim what another node
        holds: replayed, it changes nothing but the source address, as the request
        would be refused today.
        """
        node.source = record["source"]
        identity = record["identity"]
        if identity == node.identity or not ctx.take(node, identity):
            return
        node.set_identity(identity)
        ctx.touch_groups(ctx.dependents[node.group.name] | ctx.all_identity_groups, touched)
        ctx.touch_node(node, touched)
        ctx.membership_changed(node)

    def _apply_report(self, ctx: Context, record: Dict[str, Any]) -> Touched:
        touched = Touched(ctx.id)
        node = ctx.nodes[record["node"]]
        new = record["state"]
        if new == OK:
            node.error = None
            node.log_tail = record["log_tail"]
        elif new == ERROR:
            node.error = {"exit_code": record["exit_code"], "message": record["message"]}
            node.log_tail = record["log_tail"]
        # Each report says whether its agent watches (none: it does not; so do old records).
        node.watching = bool(record.get("watch"))
        self._set_state(ctx, node, new, record["at"], touched)
        # A contextualizing report's message says why the agent waits (ctxctl status shows it).
        _set_waiting(ctx, node, record["message"] if node.state == CONTEXTUALIZING else "")
        return touched

    @staticmethod
    def _set_state(ctx: Context, node: Node, new: str, at: float, touched: Touched) -> None:
        old = node.state
        if old == OK and new == CONTEXTUALIZING:
            # A re-run of an agent that already succeeded: it stays ok.
            return
        if old == ERROR and new == CONTEXTUALIZING:
            node.error = None  # a new attempt
        if new != old:
            if new == OK and node.times["ok_at"] is None and node.public:
                # A first ok: the node joins the providers of its ready roles.
                ctx.membership_changed(node, first_ok=True)
            node.state = new
            ctx.counts[old] -= 1
            ctx.counts[new] += 1
            node.times[f"{new}_at"] = at
            if (old == OK) != (new == OK):
                node.group.ok += 1 if new == OK else -1
                ctx.touch_groups(ctx.ready_dependents[node.group.name], touched)
            ctx.touch_node(node, touched)

    def _apply_credential(self, ctx: Context, record: Dict[str, Any]) -> Touched:
        node = ctx.nodes[record["node"]]
        if node.credentials is None:
            node.credentials = {}
        for kind, issued in record["issued"].items():
            node.credentials[kind] = dict(issued, at=record["at"])
            if kind == "x509":
                ctx.cert_key_owner[issued["key"]] = node.id
        return Touched(ctx.id)

    def _apply_data(self, ctx: Context, record: Dict[str, Any]) -> Touched:
        touched = Touched(ctx.id)
        ctx.data[record["name"]] = list(record["values"])
        ctx.no_deltas_before_now()
        ctx.touch_groups((g.name for g in ctx.groups.values() if record["name"] in g.data), touched)
        return touched

    def _apply_lock(self, ctx: Context, record: Dict[str, Any]) -> Touched:
        touched = Touched(ctx.id)
        ctx.locked = True
        ctx.touch_groups(ctx.groups, touched)
        ctx.no_deltas_before_now()
        return touched

    def _apply_delete(self, ctx: Context, record: Dict[str, Any]) -> Touched:
        touched = Touched(ctx.id)
        touched.deleted = True
        for g in ctx.groups.values():
            self.principals.pop(g.join_hash, None)
        for node in ctx.nodes.values():
            self.principals.pop(node.token_hash, None)
        for g in ctx.groups.values():
            # Node.group and Group.nodes refer to each other: without the cycle, reference
            # counting frees the context at once (a frozen start-up heap is never collected).
            g.nodes.clear()
            g.by_instance.clear()
        del self.contexts[ctx.id]
        return touched

    # -- snapshot: the live state as records ---------------------------------

    def snapshot_records(self) -> List[Dict[str, Any]]:
        """Records that, applied in order to an empty Model, rebuild this state.

        Per deployer a ``user_add`` (and ``user_revoke``); per context a ``create``
        with its current join hashes and data, per node (in enrollment order) an
        ``enroll`` and a ``restore_node`` (state, times, error, log tail, revocation,
        revision), and last a ``restore_context`` (lock, revision counters, join token
        expiry, the progress revision and the order of the failed nodes): long-poll
        revisions never go backwards across a compaction. The records are fresh objects
        (safe to encode in another thread).
        """
        out: List[Dict[str, Any]] = []
        for user in self.users.values():
            out.append({"op": "user_add", "name": user.name, "token_hash": user.token_hash, "at": user.created})
            if user.revoked_at is not None:
                out.append({"op": "user_revoke", "name": user.name, "at": user.revoked_at})
        for ctx in self.contexts.values():
            out += _context_records(ctx)
        return out

    def _apply_restore_node(self, ctx: Context, record: Dict[str, Any]) -> Touched:
        node = ctx.nodes[record["node"]]
        old, new = node.state, record["state"]
        if new != old:
            ctx.counts[old] -= 1
            ctx.counts[new] += 1
            if (old == OK) != (new == OK):
                node.group.ok += 1 if new == OK else -1
            node.state = new
        node.times = dict(record["times"])
        node.error = record["error"]
        node.log_tail = record["log_tail"]
        if record["revoked"] and not node.revoked:
            self._revoke(ctx, node, Touched(ctx.id))
        departed = record.get("departed")
        if departed:
            ctx.departures[node.id] = (departed[0], departed[1])
        elif node.revoked:   # a snapshot from before departures had reasons
            ctx.departures[node.id] = ("revoked", record["times"].get("enrolled_at") or 0.0)
        node.watching = record.get("watching", False)
        _set_waiting(ctx, node, record.get("waiting", ""))
        node.self_rev = record["self_rev"]
        return Touched(ctx.id)

    def _apply_restore_context(self, ctx: Context, record: Dict[str, Any]) -> Touched:
        ctx.revision = record["revision"]
        ctx.locked = record["locked"]
        for name, saved in record["groups"].items():
            g = ctx.groups[name]
            g.view_rev = saved["view_rev"]
            g.join_expires = saved["join_expires"]
            g.cache = None
            g.rendered = None
        order = record.get("failed")
        if order is None:  # a snapshot from before progress was kept: the oldest errors first
            nodes = sorted((n for n in ctx.nodes.values() if n.state == ERROR and not n.revoked),
                           key=lambda n: n.times["error_at"] or 0.0)
        else:
            nodes = [ctx.nodes[nid] for nid in order]
        ctx.failed = OrderedDict((n.id, n) for n in nodes)
        if "waiting" in record:   # in the order they started waiting
            ctx.waiting = OrderedDict((nid, ctx.nodes[nid]) for nid in record["waiting"])
        ctx.progress_key = _progress_key(ctx)
        ctx.progress_rev = record.get("progress_rev", ctx.revision)
        ctx.no_deltas_before_now()
        return Touched(ctx.id)

    # -- reads -------------------------------------------------------------

    def view_revision(self, node: Node) -> int:
        return max(node.group.view_rev, node.self_rev)

    def _group_part(self, ctx: Context, g: Group) -> Dict[str, Any]:
        if g.cache is not None and g.cache[0] == g.view_rev:
            return g.cache[1]
        roles = {}
        for role, ready in g.requires:
            providers = ctx.providers_of[role]
            expected = sum(p.quantity for p in providers)
            roles[role] = {
                "ready": ready,
                "satisfied": _provided(providers, ready) == expected,
                "expected": expected,
                "providers": _listed(providers, ready),
            }
        data = {}
        for name in g.data:
            values = ctx.data.get(name)
            if values:
                data[name] = [{"b64": v} for v in values]
        waiting = _waiting_for(ctx, g)
        part = {
            "context_id": ctx.id,
            "context_name": ctx.name,
            "group": g.name,
            "locked": ctx.locked,
            "complete": not waiting,
            "waiting_for": waiting,
            "roles": roles,
            "data": data,
            "lease": g.lease,
        }
        # Host credentials (docs/credentials.md): only where opted in, so other views stay as they were.
        if g.certificate is not None:
            part["certificate"] = g.certificate
        if g.ssh_certificate is not None:
            part["ssh_certificate"] = g.ssh_certificate
        if ctx.scripts is not None:
            part["scripts"] = {"sha256": ctx.scripts_sha256, "size": len(ctx.scripts)}
        if "ssh" in ctx.cas:
            part["ssh_ca"] = {
                "public_key": ctx.cas["ssh"],
                # Inside the cluster, hosts are reached by short name and address too (MPI, Slurm):
                # any host, which trusts no more than the per-host lines would (docs/credentials.md).
                "pattern": "*",
                # Whose sshd presents its certificates: their peers need no per-host line (with
                # sshd = false the certificates are installed, but sshd shows plain host keys).
                "groups": [name for name, other in ctx.groups.items()
                           if other.ssh_certificate is not None and other.ssh_certificate["sshd"]],
            }
        if g.all_identities:
            part["all_identities"] = [n.public for n in ctx.nodes.values() if n.public]
        g.cache = (g.view_rev, part)
        return part

    def view_progress(self, node: Node) -> Dict[str, Any]:
        """Where ``node``'s view stands - its revision, whether it is complete, and why not - without
        rendering it (the same figures as the view): an enrollment's or identity update's reply
        carries it, so an agent whose view is incomplete goes straight to its long-poll."""
        ctx = self.contexts[node.group.context_id]
        waiting = _waiting_for(ctx, node.group)
        return {"revision": self.view_revision(node), "complete": not waiting, "waiting_for": waiting}

    def view(self, node: Node) -> Dict[str, Any]:
        """What one node receives: only what its group requires, and itself."""
        ctx = self.contexts[node.group.context_id]
        view = dict(self._group_part(ctx, node.group))
        view["node_id"] = node.id
        view["revision"] = self.view_revision(node)
        view["state"] = node.state
        view["self"] = node.identity
        return view

    def view_json(self, node: Node) -> JSONChunks:
        """:meth:`view` rendered: the group's part as JSON, rendered once per revision of the
        group's view and shared, then this node's own fields."""
        g = node.group
        if g.rendered is not None and g.rendered[0] == g.view_rev:
            shared = g.rendered[1]
        else:
            shared = json_bytes(self._group_part(self.contexts[g.context_id], g))[:-1]
            # Kept only where it is shared: a group of one (a head) would just hold a copy.
            g.rendered = (g.view_rev, shared) if len(g.nodes) > 1 else None
        return self._with_own_fields(shared, node)

    def _with_own_fields(self, shared: bytes, node: Node) -> JSONChunks:
        """``shared`` (an object's JSON without its closing brace) and this node's own fields."""
        own = json_bytes(
            {"node_id": node.id, "revision": self.view_revision(node), "state": node.state, "self": node.identity}
        )
        return JSONChunks((shared, b"," + own[1:]))

    def view_delta(self, node: Node, since: int) -> Optional[JSONChunks]:
        """What changed in ``node``'s view since revision ``since``, or None when the log cannot
        say (``since`` before :attr:`Context.delta_floor`): the view's own fields, then each node
        whose entry changed, as it is listed now ("peers", with the roles and whether
        all_identities lists it) or gone ("departed"). O(changes), not O(nodes); the part shared
        by the group's watchers is rendered once per (view revision, since)."""
        ctx = self.contexts[node.group.context_id]
        g = node.group
        if since < ctx.delta_floor or since > ctx.revision:
            return None
        if g.delta is None or g.delta[0] != g.view_rev:
            g.delta = (g.view_rev, {})
        shared = g.delta[1].get(since)
        if shared is None:
            part = self._group_part(ctx, g)
            changed: Dict[str, Node] = {}
            wanted = [(role, ready, {p.name for p in ctx.providers_of[role]}) for role, ready in g.requires]
            relevant = set().union(*(groups for _, _, groups in wanted))
            ready_relevant = set().union(*(groups for _, ready, groups in wanted if ready))
            start = bisect.bisect_right(ctx.change_revs, since)
            for n, first_ok in zip(ctx.change_nodes[start:], ctx.change_ready[start:]):
                # A first ok changes only the lists of ready roles; the rest, every list of the node.
                if n.group.name in ready_relevant if first_ok else (g.all_identities or n.group.name in relevant):
                    changed[n.id] = n
            peers, departed = [], []
            for n in changed.values():
                listed = n.public and [role for role, ready, groups in wanted if n.group.name in groups
                                       and (not ready or n.times["ok_at"] is not None)]
                everyone = bool(n.public) and g.all_identities
                if listed or everyone:
                    peers.append(dict(n.public, roles=listed, all=everyone))
                else:
                    departed.append(n.id)
            shared = json_bytes({
                "delta": True,
                "since": since,
                "context_id": ctx.id,
                "group": g.name,
                "locked": ctx.locked,
                "complete": part["complete"],
                "waiting_for": part["waiting_for"],
                "lease": g.lease,
                # What the roles count (a scale changes it), without their providers.
                "roles": {role: {k: v for k, v in r.items() if k != "providers"} for role, r in part["roles"].items()},
                "peers": peers,
                "departed": departed,
            })[:-1]
            if len(g.nodes) > 1:   # shared by the group's watchers, whatever revision each holds
                cached = g.delta[1]
                if len(cached) >= 8:
                    cached.clear()
                cached[since] = shared
        return self._with_own_fields(shared, node)

    def summary(self, ctx: Context) -> Dict[str, Any]:
        out = {
            "id": ctx.id,
            "name": ctx.name,
            "revision": ctx.revision,
            "created": ctx.created,
            "expires": ctx.expires,
            "locked": ctx.locked,
            "open_for_injection": ctx.open_for_injection,
            "owner": ctx.owner or None,
            "domain": ctx.domain or None,
        }
        out.update(_tally(ctx))
        return out

    def progress(self, ctx: Context) -> Dict[str, Any]:
        """What ``ctxctl wait`` follows, in O(1) however many nodes the context has: the counts
        (as in the summary), the lock and the oldest error of a member. Its ``revision`` moves only
        when one of these changes (:meth:`progress_revision`)."""
        out: Dict[str, Any] = {"id": ctx.id, "revision": ctx.progress_rev, "locked": ctx.locked}
        out.update(_tally(ctx))
        first = next(iter(ctx.failed.values()), None)
        if first is None:
            out["first_error"] = None
        else:
            problem = first.error or {}
            out["first_error"] = {
                "node_id": first.id,
                "group": first.group.name,
                "hostname": first.identity.get("hostname"),
                "exit_code": problem.get("exit_code"),
                "message": problem.get("message", "")[:FIRST_ERROR_MESSAGE],
                "error_at": first.times["error_at"],
            }
        longest = next(iter(ctx.waiting.values()), None)
        out["waiting"] = None if longest is None else {
            "node_id": longest.id,
            "group": longest.group.name,
            "hostname": longest.identity.get("hostname"),
            "message": longest.waiting[:FIRST_ERROR_MESSAGE],
        }
        return out

    @staticmethod
    def progress_revision(ctx: Context) -> int:
        return ctx.progress_rev

    def status(self, ctx: Context) -> Dict[str, Any]:
        out = self.summary(ctx)
        out["groups"] = [self.status_group(ctx, g) for g in ctx.groups.values()]
        out["data"] = {
            name: {"values": len(values), "bytes": sum(len(v) * 3 // 4 - v.count("=") for v in values)}
            for name, values in ctx.data.items()
        }
        out["nodes"] = [
            dict(
                {
                    "id": n.id,
                    "group": n.group.name,
                    "state": n.state,
                    "revoked": n.revoked,
                    "identity": dict(n.identity, source_address=n.source),
                    "error": n.error,
                    "log_tail": n.log_tail,
                    "departed": ctx.departures.get(n.id, (None,))[0],
                    "departed_at": ctx.departures.get(n.id, (None, None))[1],
                    "watching": n.watching,
                    "last_seen": n.seen if n.group.lease else None,
                    "waiting": n.waiting,
                },
                **n.times,
            )
            for n in ctx.nodes.values()
        ]
        return out

    @staticmethod
    def status_group(ctx: Context, g: Group) -> Dict[str, Any]:
        """A group in the status: its spec ("quantity" is its target size), its members
        ("enrolled"), how many departed, and when its join token expires."""
        departed = sum(1 for nid in ctx.departures if ctx.nodes[nid].group is g)
        return dict(g.spec(), enrolled=len(g.nodes), departed=departed, join_token_expires=g.join_expires)

    def user_list(self) -> List[Dict[str, Any]]:
        return [
            {"name": u.name, "created": u.created, "revoked": u.revoked_at}
            for u in sorted(self.users.values(), key=lambda u: u.name)
        ]

    def check_node_principal(self, principal: Principal, cid: str, nid: str) -> None:
        """A node credential reaches only its own node."""
        if principal != ("node", cid, nid):
            raise Forbidden("this credential may not act for this node")
