"""The authorization matrix: every route of ctxd.api.ROUTES x every kind of credential.

The rows are generated from the server's own route table, so a new route cannot
escape: a route whose auth kind, path parameter, body or success status this file
does not know fails the test. Each cell calls the real BrokerResource (StubTreq, in
memory) with valid path parameters and a valid body, in a freshly rebuilt world, so
that only authorization decides the answer.

The world (built once through the API, then rebuilt per cell by replaying its
journal into a new broker, the same code path as a broker restart):

- the site admin; deployers alice and bob (POST /v1/users); carol, revoked
  (DELETE /v1/users/carol); dave, the target of DELETE /v1/users/{user};
- alice's context A, open for injection, join_token_ttl 60 s, groups head (1 slot),
  compute (3 slots) and spare (2 slots); nodes n1 (head), n2 and n3 (compute);
  n3's credential revoked (POST .../nodes/n3/revoke);
- bob's context B, one group, node b1;
- then the clock passes A's join-token expiry; alice rotates head's join token
  (valid but exhausted: its one slot is used) and spare's (valid, free slots).
  compute's join token is expired with a free slot.

Targets: cid = A, nid = n2, group = compute, name = gridmap, user = dave.

Credentials (columns):

=================  =====================================================
none               no Authorization header
malformed-bearer   ``Bearer ctxd_node_!!!``
malformed-scheme   ``Basic ...`` (not a bearer credential)
unknown            well-formed ``ctxd_dep_`` token never issued
revoked-deployer   carol's token
revoked-node       n3's token
expired-join       compute's join token (expired, group has a free slot)
exhausted-join     head's rotated join token (valid, no free slot)
join               spare's rotated join token (valid, free slots)
other-ctx-join     B's join token
other-ctx-node     b1's node token (another context)
other-node         n1's node token (same context, another node)
node               n2's node token (the target node)
other-deployer     bob (A is alice's)
deployer           alice (A's owner)
admin              the site admin
=================  =====================================================

Expected answers, by the route's auth kind (from ctxd/api.py _dispatch,
ctxd/broker.py and ctxd/model.py):

============  ==============================================================
auth kind     rule
============  ==============================================================
(all but      none, malformed, unknown and revoked credentials: 401
 none)        unauthorized (authentication runs before anything else)
none          success for every column (credentials are not looked at)
site-admin    admin: success; any other valid credential: 403 forbidden
deployer      admin, alice, bob: success; join and node tokens: 403
owner         admin, alice: success; bob: 404 not_found - exactly the answer
              for a context that does not exist; join and node tokens: 403
              (the credential kind is checked before the context is looked up)
join          join: 201; expired-join: 410 join_token_expired; exhausted-join:
(enroll)      409 enrollment_full; any other valid credential - another
              context's join token, node tokens, deployers, admin: 403 (a
              credential that does not fit the route, decided before the
              context is looked up)
node          node: success; every other valid credential (another node of the
              same or another context, join tokens, deployers, admin): 403 -
              decided before the context or node is looked up
============  ==============================================================

No leak of existence: for every refused cell (401/403/404) of a route with path
parameters, the same call with each parameter replaced by a well-formed name of
nothing that exists must get the identical answer (status and body). So another
deployer's context, another context's node and another context's join token
reveal nothing about what exists.
"""

import json
import string
import time
from typing import Any, Dict, List, Optional, Tuple

import treq
from support import ADMIN_TOKEN, csr_for, identity, instance_key, make_broker, scripts_tree
from treq.testing import StubTreq
from twisted.internet.task import Clock
from twisted.python.failure import Failure

from ctxd import tokens
from ctxd.api import AUTH_KINDS, DEPLOYER, JOIN, NODE, NONE, OWNER, ROUTES, SITE_ADMIN, BrokerResource
from ctxd.testing import MemoryJournal

BASE = "https://ctxd.test:8443"
GHOST_ID = "Z" * 22

INVALID = ("none", "malformed-bearer", "malformed-scheme", "unknown", "revoked-deployer", "revoked-node")
JOINS = ("expired-join", "exhausted-join", "join", "other-ctx-join")
NODES = ("other-ctx-node", "other-node", "node")
CREDENTIALS = INVALID + JOINS + NODES + ("other-deployer", "deployer", "admin")

# Valid bodies, success statuses, path parameters: keyed by what the route table names.
BODIES: Dict[str, Any] = {
    "add_user": {"name": "erin"},
    "create_context": {"name": "matrix-new", "groups": [{"name": "solo", "quantity": 1, "source_check": False}]},
    "put_data": {"values": [{"b64": "bmV3IHZhbHVlCg=="}]},
    "enroll": {"instance_key": instance_key(90), "identity": identity(90)},
    "put_identity": identity(2, "n2-renamed"),
    "report": {"state": "contextualizing"},
    "scale": {"quantity": 3},
    "extend": {"expires_in": 3600},
    # Node 2's own names (support.identity), for the compute group's certificates.
    "credentials": {"csr": csr_for(["node2.cluster.test"])[0]},
}
SUCCESS = {
    "health": 200, "list_users": 200, "add_user": 201, "revoke_user": 200, "list_contexts": 200,
    "create_context": 201, "get_context": 200, "get_progress": 200, "delete_context": 200, "put_data": 200, "lock": 200,
    "rotate_join_token": 200, "revoke_node": 200, "enroll": 201, "put_identity": 200, "get_view": 200,
    "report": 200, "scale": 200, "remove_node": 200, "extend": 200, "leave": 200,
    "get_agent": 200, "get_cas": 200, "credentials": 200, "get_scripts": 200,
}
ERROR_CODES = {401: "unauthorized", 403: "forbidden", 404: "not_found", 410: "join_token_expired",
               409: "enrollment_full"}


def _deny(status: int) -> Tuple[int, str]:
    return status, ERROR_CODES[status]


def rule(route, credential: str) -> Tuple[int, Optional[str]]:
    """The expected (status, error code) of one cell; error code None for a success."""
    ok = (SUCCESS[route.handler], None)
    if route.auth == NONE:
        return ok
    if credential in INVALID:
        return _deny(401)
    if route.auth == SITE_ADMIN:
        return ok if credential == "admin" else _deny(403)
    if route.auth == DEPLOYER:
        return ok if credential in ("admin", "deployer", "other-deployer") else _deny(403)
    if route.auth == OWNER:
        if credential in ("admin", "deployer"):
            return ok
        return _deny(404) if credential == "other-deployer" else _deny(403)
    if route.auth == JOIN:
        return {
            "join": ok,
            "expired-join": _deny(410),
            "exhausted-join": _deny(409),
        }.get(credential, _deny(403))
    if route.auth == NODE:
        return ok if credential == "node" else _deny(403)
    raise KeyError(f"auth kind {route.auth!r} is unknown to the authorization matrix")


def test_rules_know_every_auth_kind():
    """The matrix has a rule for every auth kind ctxd.api defines."""
    for kind in AUTH_KINDS:
        route = ROUTES[0]._replace(auth=kind)
        for credential in CREDENTIALS:
            rule(route, credential)


# -- the world ----------------------------------------------------------------------------


class Client:
    """One broker (replayed from ``records`` at time ``now``) behind StubTreq."""

    def __init__(self, records: List[Dict[str, Any]] = (), now: float = 0.0) -> None:
        self.clock = Clock()
        self.clock.advance(now)
        self.broker = make_broker(MemoryJournal(records), self.clock)
        self.broker.replay()
        self.stub = StubTreq(BrokerResource(self.broker))

    def call(self, method: str, path: str, authorization: Optional[str] = None, body: Any = None,
             expect: Optional[int] = None) -> Tuple[int, Any]:
        headers = {}
        if authorization is not None:
            headers["Authorization"] = authorization
        data = None
        if body is not None:
            headers["Content-Type"] = "application/json"
            data = json.dumps(body).encode()
        d = self.stub.request(method, BASE + path, headers=headers, data=data)
        d.addCallback(lambda r: treq.content(r).addCallback(lambda content: (r.code, content)))
        self.stub.flush()
        results: List[Any] = []
        d.addBoth(results.append)
        assert results, f"{method} {path}: no answer"
        if isinstance(results[0], Failure):
            results[0].raiseException()
        status, content = results[0]
        # Every answer is JSON but the agent's source (GET /v1/agent) and the scripts (a gzip'd tar).
        value = json.loads(content) if content and content[:1] in (b"{", b"[") else content or None
        assert expect is None or status == expect, (method, path, status, value)
        return status, value


def bearer(token: str) -> str:
    return f"Bearer {token}"


class World:
    """Built once through the API; :meth:`client` rebuilds it from its journal."""

    def __init__(self) -> None:
        api = Client()
        admin = bearer(ADMIN_TOKEN)
        users = {}
        for name in ("alice", "bob", "carol", "dave"):
            users[name] = api.call("POST", "/v1/users", admin, {"name": name}, expect=201)[1]["token"]
        api.call("DELETE", "/v1/users/carol", admin, expect=200)
        alice, bob = bearer(users["alice"]), bearer(users["bob"])

        a = api.call("POST", "/v1/contexts", alice, {
            "name": "alice-a",
            "open_for_injection": True,
            "expires_in": 3600,
            "join_token_ttl": 60,
            "groups": [
                {"name": "head", "quantity": 1, "source_check": False, "provides": ["master"], "requires": [{"role": "worker"}],
                 "data": ["gridmap"]},
                {"name": "compute", "quantity": 3, "source_check": False, "provides": ["worker"],
                 "requires": [{"role": "master", "ready": True}], "certificate": {"names": ["fqdn"]}},
                {"name": "spare", "quantity": 2, "source_check": False},
            ],
            "data": {"gridmap": [{"b64": "aGVsbG8K"}]},
            "scripts": scripts_tree({"1-config/worker": b"#!/bin/sh\n"}),
        }, expect=201)[1]
        self.cid = a["context"]["id"]
        joins = {g: b["join_token"] for g, b in a["bootstraps"].items()}
        enroll = f"/v1/contexts/{self.cid}/enroll"

        def enrolled(join: str, n: int) -> Dict[str, str]:
            return api.call("POST", enroll, bearer(join), {"instance_key": instance_key(n), "identity": identity(n)},
                            expect=201)[1]

        n1, n2, n3 = enrolled(joins["head"], 1), enrolled(joins["compute"], 2), enrolled(joins["compute"], 3)
        self.nid = n2["node_id"]

        b = api.call("POST", "/v1/contexts", bob, {"name": "bob-b", "groups": [{"name": "all", "quantity": 2, "source_check": False}]},
                     expect=201)[1]
        self.other_cid = b["context"]["id"]
        b_join = b["bootstraps"]["all"]["join_token"]
        b1 = api.call("POST", f"/v1/contexts/{self.other_cid}/enroll", bearer(b_join),
                      {"instance_key": instance_key(50), "identity": identity(50)}, expect=201)[1]

        api.call("POST", f"/v1/contexts/{self.cid}/nodes/{n3['node_id']}/revoke", alice, expect=200)
        api.clock.advance(61)  # A's join tokens (60 s) have expired
        rotate = f"/v1/contexts/{self.cid}/groups/%s/join-token"
        exhausted = api.call("POST", rotate % "head", alice, expect=200)[1]["bootstrap"]["join_token"]
        fresh = api.call("POST", rotate % "spare", alice, expect=200)[1]["bootstrap"]["join_token"]

        self.now = api.clock.seconds()
        self.records = list(api.broker.journal.records)
        self.credentials: Dict[str, Optional[str]] = {
            "none": None,
            "malformed-bearer": "Bearer ctxd_node_!!!",
            "malformed-scheme": "Basic YWxpY2U6c2VjcmV0",
            "unknown": bearer(tokens.new_token(tokens.DEPLOYER)),
            "revoked-deployer": bearer(users["carol"]),
            "revoked-node": bearer(n3["node_token"]),
            "expired-join": bearer(joins["compute"]),
            "exhausted-join": bearer(exhausted),
            "join": bearer(fresh),
            "other-ctx-join": bearer(b_join),
            "other-ctx-node": bearer(b1["node_token"]),
            "other-node": bearer(n1["node_token"]),
            "node": bearer(n2["node_token"]),
            "other-deployer": bob,
            "deployer": alice,
            "admin": admin,
        }
        assert set(self.credentials) == set(CREDENTIALS)
        # Valid path parameters, and for each a well-formed value naming nothing.
        self.params = {"cid": self.cid, "nid": self.nid, "group": "compute", "name": "gridmap", "user": "dave"}
        self.ghosts = {"cid": GHOST_ID, "nid": GHOST_ID, "group": "nosuchgroup", "name": "nosuchdata",
                       "user": "nosuchuser"}

    def client(self) -> Client:
        return Client(self.records, self.now)

    def path(self, route, **override: str) -> str:
        values = dict(self.params, **override)
        return route.template.format(**{p: values[p] for p in route_params(route)})


def route_params(route) -> List[str]:
    return [name for _, name, _, _ in string.Formatter().parse(route.template) if name]


def body_of(route) -> Any:
    if route.body == "required":
        return BODIES[route.handler]
    return None


def test_authorization_matrix():
    started = time.monotonic()
    world = World()
    mismatches: List[str] = []
    cells = ghost_cells = 0
    grid: List[str] = []
    for route in ROUTES:
        where = f"{route.method} {route.template}"
        try:
            unknown = [p for p in route_params(route) if p not in world.params]
            assert not unknown, f"path parameters {unknown} are unknown to the matrix"
            assert route.handler in SUCCESS, f"handler {route.handler!r} has no success status in the matrix"
            assert route.body != "required" or route.handler in BODIES, f"no valid body for {route.handler!r}"
            rule(route, "admin")
        except (AssertionError, KeyError) as e:
            mismatches.append(f"{where}: the matrix cannot test this route: {e}")
            continue
        body = body_of(route)
        row: List[str] = []
        grid.append("")
        for credential in CREDENTIALS:
            expected = rule(route, credential)
            status, value = world.client().call(route.method, world.path(route), world.credentials[credential], body)
            cells += 1
            got = (status, value.get("error") if status >= 400 and isinstance(value, dict) else None)
            row.append(f"{status}{'' if got == expected else '!'}")
            grid[-1] = f"{route.auth:10} {where:52} " + " ".join(f"{c:>4}" for c in row)
            if got != expected:
                mismatches.append(f"{where:52} {credential:17} expected {expected[0]} {expected[1] or ''}"
                                  f"{'':3}got {got[0]} {got[1] or ''}  {(value or {}).get('message', '')}")
                continue
            if status not in (401, 403, 404):
                continue
            for param in route_params(route):
                ghost_status, ghost_value = world.client().call(
                    route.method, world.path(route, **{param: world.ghosts[param]}),
                    world.credentials[credential], body)
                ghost_cells += 1
                if (ghost_status, ghost_value) != (status, value):
                    mismatches.append(
                        f"{where:52} {credential:17} leaks: {param} of something that exists -> {status} "
                        f"{value}, of nothing -> {ghost_status} {ghost_value}")
    elapsed = time.monotonic() - started
    header = " ".join(f"{i:>4}" for i in range(1, len(CREDENTIALS) + 1))
    print("\n" + " " * 64 + header + "\n" + "\n".join(grid))
    print("columns: " + ", ".join(f"{i} {c}" for i, c in enumerate(CREDENTIALS, 1)) + " (! = differs from the rules)")
    print(f"authorization matrix: {cells} cells ({len(ROUTES)} routes x {len(CREDENTIALS)} credentials), "
          f"{ghost_cells} no-leak comparisons, {elapsed:.2f} s")
    assert not mismatches, (
        f"{len(mismatches)} of {cells} authorization cells differ from the rules:\n" + "\n".join(mismatches)
    )
