"""docs/openapi.yaml against the code: the route table, credentials and real responses."""

import ipaddress
import hashlib
import json
import os
import re
from urllib.parse import urlsplit

import pytest
import treq
import yaml
from cryptography.hazmat.primitives.asymmetric import ed25519
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from treq.testing import StubTreq
from twisted.internet.task import Clock
from twisted.python.failure import Failure

from ctxd import rules, tokens
from ctxd.api import AUTH_KINDS, ROUTES, BrokerResource, match
from ctxd.rules import MAX_BODY
from ctxd.broker import Broker
from ctxd.testing import MemoryJournal
from ctxd.model import Model, Quotas
from support import AGENT, AUTHORITY, csr_for, scripts_tree

SPEC_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir, "docs", "openapi.yaml")
HTTP_METHODS = ("get", "put", "post", "delete", "patch", "head", "options", "trace")
BEARER = [{"bearerAuth": []}]
ADMIN = tokens.new_token(tokens.ADMIN)
BASE = "https://ctxd.test:8443"
CA_PEM = "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n"


@pytest.fixture(scope="module")
def spec():
    with open(SPEC_PATH, encoding="utf-8") as f:
        return yaml.load(f, Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))


def operations(spec):
    """{(METHOD, path template): operation} for every operation in the spec."""
    return {
        (method.upper(), path): op
        for path, item in spec["paths"].items()
        for method, op in item.items()
        if method in HTTP_METHODS
    }


def operation(ops, route):
    """The spec's operation for ``route`` (its absence is reported by test_spec_operations_equal_routes)."""
    key = (route.method, route.template)
    assert key in ops, f"{key} is not in the spec"
    return ops[key]


# -- a minimal validator for the OpenAPI 3.0 schema subset the spec uses -------------

_TYPES = {"object": dict, "array": list, "string": str, "boolean": bool, "integer": int, "number": (int, float)}
_LIMITS = {"minimum": (lambda v: v, 1), "maximum": (lambda v: v, -1), "minLength": (len, 1),
           "maxLength": (len, -1), "minItems": (len, 1), "maxItems": (len, -1), "maxProperties": (len, -1)}

def _ip(version):
    def check(value):
        try:
            return "%" not in value and ipaddress.ip_address(value).version == version
        except ValueError:
            return False
    return check


# Formats this validator checks; any other format must be purely documentary.
FORMATS = {"ipv4": _ip(4), "ipv6": _ip(6)}
DOCUMENTARY_FORMATS = {"uri"}
ENFORCED = set(_LIMITS) | {"$ref", "type", "nullable", "properties", "required", "additionalProperties",
                           "items", "enum", "pattern", "anyOf"}
DOCUMENTARY = {"description", "default", "format"}


def deref(spec, node):
    """``node`` with its local ``$ref`` (if any) followed."""
    while "$ref" in node:
        target = spec
        for part in node["$ref"].lstrip("#/").split("/"):
            target = target[part]
        node = target
    return node


def problems(spec, schema, value, at="$"):
    """What is wrong with ``value`` under ``schema`` (an empty list when it is valid)."""
    schema = deref(spec, schema)
    if value is None:
        return [] if schema.get("nullable") else [f"{at}: null is not allowed"]
    if "anyOf" in schema:
        alternatives = [problems(spec, alternative, value, at) for alternative in schema["anyOf"]]
        if all(alternatives):
            return [f"{at}: {value!r:.60} matches no alternative of anyOf ({'; '.join(a[0] for a in alternatives)})"]
    kind = schema.get("type")
    if kind and (not isinstance(value, _TYPES[kind]) or (isinstance(value, bool) and kind != "boolean")):
        return [f"{at}: {value!r:.60} is not of type {kind}"]
    found = []
    if "enum" in schema and value not in schema["enum"]:
        found.append(f"{at}: {value!r:.60} is not one of {schema['enum']}")
    if "pattern" in schema and not re.search(schema["pattern"], value):
        found.append(f"{at}: {value!r:.60} does not match {schema['pattern']}")
    if schema.get("format") in FORMATS and not FORMATS[schema["format"]](value):
        found.append(f"{at}: {value!r:.60} is not of format {schema['format']}")
    for key, (measure, sign) in _LIMITS.items():
        if key in schema and sign * (measure(value) - schema[key]) < 0:
            found.append(f"{at}: {key} {schema[key]} is not met")
    if isinstance(value, dict):
        found += [f"{at}: missing {k!r}" for k in schema.get("required", ()) if k not in value]
        props, extra = schema.get("properties", {}), schema.get("additionalProperties", True)
        for k, v in value.items():
            if k in props:
                found += problems(spec, props[k], v, f"{at}.{k}")
            elif extra is False:
                found.append(f"{at}: unexpected field {k!r}")
            elif isinstance(extra, dict):
                found += problems(spec, extra, v, f"{at}.{k}")
    if isinstance(value, list) and "items" in schema:
        for i, item in enumerate(value):
            found += problems(spec, schema["items"], item, f"{at}[{i}]")
    return found


def schemas_in(spec):
    """Every schema in the spec: components, parameters, bodies, and their sub-schemas."""
    roots = list(spec["components"]["schemas"].values())

    def collect(node):
        if isinstance(node, dict):
            for key, value in node.items():
                if key == "schema":
                    roots.append(value)
                collect(value)
        elif isinstance(node, list):
            for value in node:
                collect(value)

    collect(spec["paths"])
    collect({k: v for k, v in spec["components"].items() if k != "schemas"})
    while roots:
        schema = roots.pop()
        yield schema
        subs = list(schema.get("properties", {}).values()) + [schema.get("items"), schema.get("additionalProperties")]
        subs += schema.get("anyOf", [])
        roots.extend(s for s in subs if isinstance(s, dict))


# -- the route table ------------------------------------------------------------------


def test_spec_operations_equal_routes(spec):
    """The spec has exactly the (method, path template) pairs of ctxd.api.ROUTES."""
    in_code = {(r.method, r.template) for r in ROUTES}
    in_spec = set(operations(spec))
    assert in_code == in_spec, (
        f"in ROUTES but not in the spec: {sorted(in_code - in_spec)}; "
        f"in the spec but not in ROUTES: {sorted(in_spec - in_code)}"
    )


def test_operation_ids_and_security_follow_routes(spec):
    """operationId is the route's handler; auth "none" has `security: []`, others need bearer.

    `x-ctxd-token` is exactly the route's auth kind (Route.auth), and every auth kind
    ctxd.api knows is explained in the bearerAuth scheme's table of `x-ctxd-token` values.
    """
    scheme = spec["components"]["securitySchemes"]["bearerAuth"]
    assert (scheme["type"], scheme["scheme"]) == ("http", "bearer")
    table = scheme["description"].split("| `x-ctxd-token` |", 1)[1]
    documented = set(re.findall(r"^\| `([a-z-]+)` +\|", table, re.M))
    assert documented == set(AUTH_KINDS), (sorted(documented), AUTH_KINDS)
    for prefix in tokens.PREFIXES:
        assert f"`{prefix}`" in scheme["description"], prefix
    ops = operations(spec)
    for route in ROUTES:
        op = operation(ops, route)
        assert op["operationId"] == route.handler, route
        security = op.get("security", spec.get("security"))
        assert security == ([] if route.auth == "none" else BEARER), route
        assert op["x-ctxd-token"] == route.auth, route
        assert op["x-ctxd-token"] in AUTH_KINDS, route


# The 403 response each auth kind documents (who gets it differs by kind).
FORBIDDEN_RESPONSE = {
    "site-admin": "#/components/responses/SiteAdminOnly",
    "deployer": "#/components/responses/DeployerOnly",
    "owner": "#/components/responses/DeployerOnly",
    "node": "#/components/responses/OtherNode",
}


# Node routes that may also refuse what they are asked (the identity, a certificate request).
NODE_REFUSALS = {
    "put_identity": "#/components/responses/OtherNodeOrIdentityRefused",
    "credentials": "#/components/responses/OtherNodeOrCertificateRefused",
}
# Rate-limited routes beside enroll: a node's new certificates (one of a kind a minute).
RATE_LIMITED = {"credentials"}


def test_statuses_follow_auth_kinds(spec):
    """Each auth kind's refusals are declared: 403 per kind, 404 for owner routes, 429 on enroll and issuing."""
    ops = operations(spec)
    for route in ROUTES:
        op = operation(ops, route)
        responses = op["responses"]
        if route.handler in NODE_REFUSALS:
            assert responses["403"] == {"$ref": NODE_REFUSALS[route.handler]}, route
            assert "forbidden" in deref(spec, responses["403"])["x-error-codes"], route
        elif route.auth in FORBIDDEN_RESPONSE:
            assert responses["403"] == {"$ref": FORBIDDEN_RESPONSE[route.auth]}, route
        if route.auth == "owner":
            # Another deployer's context is answered like a missing one.
            assert "not_found" in deref(spec, responses["404"])["x-error-codes"], route
        if route.auth == "join":
            assert "forbidden" in deref(spec, responses["403"])["x-error-codes"], route
        if route.auth == "join" or route.handler in RATE_LIMITED:
            limited = deref(spec, responses["429"])
            assert limited["x-error-codes"] == ["rate_limited"], route
            assert limited["headers"]["Retry-After"]["required"] is True, route
        else:
            assert "429" not in responses, route
    for handler in ("create_context", "put_data"):
        op = next(o for o in ops.values() if o["operationId"] == handler)
        assert "quota_exceeded" in op["responses"]["409"]["x-error-codes"], handler


def test_bodies_parameters_and_common_statuses_follow_routes(spec):
    """Request bodies match Route.body; path parameters are declared; shared error statuses are listed."""
    ops = operations(spec)
    for route in ROUTES:
        op = operation(ops, route)
        statuses = set(op["responses"])
        body = op.get("requestBody")
        if route.body == "none":
            assert body is None, route
        else:
            assert body["required"] is (route.body == "required"), route
            assert list(body["content"]) == ["application/json"], route
            assert {"400", "413", "415"} <= statuses, route
        assert "500" in statuses, route
        if route.auth != "none":
            assert {"401", "403"} <= statuses, route
        params = spec["paths"][route.template].get("parameters", []) + op.get("parameters", [])
        in_path = {deref(spec, p)["name"] for p in params if deref(spec, p)["in"] == "path"}
        assert in_path == set(re.findall(r"\{(\w+)\}", route.template)), route


def test_parameter_patterns_are_the_validators(spec):
    """The cid/nid and data-name patterns are ctxd.rules' ID_RE and NAME_RE; wait is 0..MAX_WAIT."""
    def pattern(name):
        return deref(spec, deref(spec, spec["components"]["parameters"][name])["schema"])["pattern"]

    as_spec = lambda rx: "^" + rx.pattern + "$"  # noqa: E731
    assert pattern("cid") == pattern("nid") == as_spec(rules.ID_RE) == "^[A-Za-z0-9_-]{22}$"
    assert pattern("name") == as_spec(rules.NAME_RE) == "^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$"
    for long_poll in ("/v1/contexts/{cid}/nodes/{nid}/view", "/v1/contexts/{cid}/progress"):
        op = operations(spec)[("GET", long_poll)]
        query = {p["name"]: p["schema"] for p in op["parameters"] if p["in"] == "query"}
        assert query["since"]["type"] == "integer", long_poll
        assert (query["wait"]["type"], query["wait"]["minimum"], query["wait"]["maximum"]) == (
            "integer", 0, rules.MAX_WAIT), long_poll


def test_validator_understands_every_schema_keyword(spec):
    """Every keyword in the spec's schemas is enforced by this file's validator or purely documentary."""
    used, formats = set(), set()
    for schema in schemas_in(spec):
        used.update(schema)
        formats.update([schema["format"]] if "format" in schema else [])
    assert used <= ENFORCED | DOCUMENTARY, sorted(used - ENFORCED - DOCUMENTARY)
    assert formats <= set(FORMATS) | DOCUMENTARY_FORMATS, sorted(formats - set(FORMATS) - DOCUMENTARY_FORMATS)


def test_validator_checks_addresses(spec):
    """IpAddress is an IPv4 or an IPv6 address as Python's ipaddress reads it, without a scope id."""
    ip = {"$ref": "#/components/schemas/IpAddress"}
    v4, v6 = {"$ref": "#/components/schemas/Ipv4Address"}, {"$ref": "#/components/schemas/Ipv6Address"}
    for good in ("10.0.0.1", "fd00::1", "::ffff:1.2.3.4"):
        assert not problems(spec, ip, good), good
    for bad in ("00", "10.0.0.256", "010.0.0.1", "fe80::1%eth0", "::g", ""):
        assert problems(spec, ip, bad), bad
    assert not problems(spec, v4, "10.0.0.1") and problems(spec, v4, "fd00::1")
    assert not problems(spec, v6, "fd00::1") and problems(spec, v6, "10.0.0.1")


# -- real responses ---------------------------------------------------------------------


class Api:
    """The real resource over StubTreq; every answer is checked against the spec."""

    def __init__(self, spec, seen=None, quotas=None, **broker_options):
        self.spec = spec
        self.ops = operations(spec)
        self.clock = Clock()
        # A broker that signs host certificates and serves an agent, as twistd ctxd's does.
        broker_options = dict({"authority": AUTHORITY, "agent": AGENT}, **broker_options)
        self.broker = Broker(Model(quotas), MemoryJournal(), self.clock, tokens.token_hash(ADMIN), BASE, CA_PEM,
                             **broker_options)
        self.stub = StubTreq(BrokerResource(self.broker))
        self.seen = set() if seen is None else seen  # (handler, status)
        self.last_headers = None

    def call(self, method, path, token=None, body=None, expect=None, raw=None, ctype="application/json"):
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        data = raw if raw is not None else None if body is None else json.dumps(body).encode()
        if data is not None and ctype:
            headers["Content-Type"] = ctype
        d = self.stub.request(method, BASE + path, headers=headers, data=data)
        d.addCallback(lambda r: treq.content(r).addCallback(lambda content: (r.code, r.headers, content)))
        self.stub.flush()
        results = []
        d.addBoth(results.append)
        assert results, f"{method} {path}: no answer"
        if isinstance(results[0], Failure):
            results[0].raiseException()
        status, response_headers, content = results[0]
        assert expect is None or status == expect, (method, path, status, content[:300])
        self.last_headers = response_headers
        return self.check(method, path, body if raw is None else None, status, content, response_headers)

    def check(self, method, path, sent, status, content, response_headers=None):
        route, _ = match(method, urlsplit(path).path)
        op = operation(self.ops, route)
        self.seen.add((route.handler, status))
        where = f"{method} {route.template} -> {status}"
        assert str(status) in op["responses"], f"{where}: status not declared in the spec"
        response = deref(self.spec, op["responses"][str(status)])
        for name, header in response.get("headers", {}).items():
            values = response_headers.getRawHeaders(name) if response_headers is not None else None
            if not values:
                assert not header.get("required"), f"{where}: required header {name} is missing"
                continue
            value = values[0]
            if header["schema"].get("type") == "integer":
                assert re.fullmatch(r"-?[0-9]+", value), (where, name, value)
                value = int(value)
            assert not problems(self.spec, header["schema"], value), (where, name, value)
        if "content" not in response:
            assert content == b"", f"{where}: the spec declares no body"
            return None
        declared = list(response["content"])
        sent_type = response_headers.getRawHeaders("content-type")[0].split(";")[0].strip()
        assert sent_type in declared, (where, sent_type, declared)
        if sent_type != "application/json":  # the agent's source, a gzip'd tar: bytes, not JSON
            text = content.decode("utf-8") if sent_type.startswith("text/") else content.decode("latin-1")
            assert not problems(self.spec, response["content"][sent_type]["schema"], text), where
            return content
        value = json.loads(content)
        schema = response["content"]["application/json"]["schema"]
        assert not problems(self.spec, schema, value), (where, problems(self.spec, schema, value), value)
        if "x-error-codes" in response:
            assert value["error"] in response["x-error-codes"], (where, value)
        if sent is not None and status < 300:
            body_schema = op["requestBody"]["content"]["application/json"]["schema"]
            assert not problems(self.spec, body_schema, sent), (where, "accepted body fails its schema", sent)
        return value


def identity(n):
    return {
        "hostname": f"node{n}",
        "fqdn": f"node{n}.cluster.test.",
        "primary_ip": f"10.9.0.{n}",
        "interfaces": [{"name": "eth0", "ipv4": [f"10.9.0.{n}"], "ipv6": [f"fd00:0::{n}"]}],
        "ssh_host_keys": [f"ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAI{n:04d}key root@node{n}"],
    }


def enrollment(n):
    return {"instance_key": f"instance-key-{n:06d}-abcdef", "identity": identity(n)}


def cluster(**extra):
    return dict(
        {
            "name": "openapi-demo",
            "open_for_injection": True,
            "expires_in": 3600,
            "groups": [
                {"name": "head", "quantity": 1, "source_check": False, "provides": ["master"], "requires": [{"role": "worker"}],
                 "data": ["gridmap"]},
                {"name": "compute", "quantity": 2, "source_check": False, "provides": ["worker"],
                 "requires": [{"role": "master", "ready": True}], "all_identities": True},
            ],
            "data": {"gridmap": []},
        },
        **extra,
    )


def test_broker_responses_match_declared_schemas(spec):
    """Each status a real broker returns is declared for its route and its body validates."""
    api = Api(spec)
    ctx = "/v1/contexts"
    api.call("GET", "/healthz", expect=200)
    created = api.call("POST", ctx, ADMIN, cluster(), expect=201)
    cid, boots = created["context"]["id"], created["bootstraps"]
    c = f"{ctx}/{cid}"
    api.call("POST", f"{c}/lock", ADMIN, expect=409)  # missing_data
    api.call("PUT", f"{c}/data/gridmap", ADMIN, {"values": [{"b64": "aGVsbG8K"}]}, expect=200)
    api.call("POST", f"{c}/lock", ADMIN, {}, expect=200)
    api.call("POST", f"{c}/lock", ADMIN, expect=200)
    api.call("PUT", f"{c}/data/gridmap", ADMIN, {"values": [{"b64": "aGk="}]}, expect=409)
    api.call("PUT", f"{c}/data/nodata", ADMIN, {"values": [{"b64": "aGk="}]}, expect=404)
    api.call("PUT", f"{c}/data/-bad", ADMIN, {"values": [{"b64": "aGk="}]}, expect=400)

    head_join, compute_join = boots["head"]["join_token"], boots["compute"]["join_token"]
    head = api.call("POST", f"{c}/enroll", head_join, enrollment(1), expect=201)
    head = api.call("POST", f"{c}/enroll", head_join, enrollment(1), expect=200)
    workers = [api.call("POST", f"{c}/enroll", compute_join, enrollment(n), expect=201) for n in (2, 3)]
    api.call("POST", f"{c}/enroll", compute_join, enrollment(4), expect=409)
    api.call("POST", f"{c}/enroll", ADMIN, enrollment(4), expect=403)
    api.call("POST", f"{c}/enroll", compute_join, {"identity": identity(4)}, expect=400)
    h = f"{c}/nodes/{head['node_id']}"
    w = f"{c}/nodes/{workers[0]['node_id']}"
    head_token, worker_token = head["node_token"], workers[0]["node_token"]
    api.call("PUT", f"{h}/identity", head_token, identity(5), expect=200)
    api.call("PUT", f"{h}/identity", head_token, {"hostname": "x"}, expect=400)

    view = api.call("GET", f"{w}/view", worker_token, expect=200)
    # A ready role lists its providers once they reported ok: the head has not yet.
    assert view["all_identities"] and view["roles"]["master"]["providers"] == []
    head_view = api.call("GET", f"{h}/view", head_token, expect=200)
    assert head_view["data"] == {"gridmap": [{"b64": "aGVsbG8K"}]}
    api.call("GET", f"{w}/view?since={view['revision']}&wait=0", worker_token, expect=304)
    api.call("GET", f"{w}/view?wait=301", worker_token, expect=400)
    progress = api.call("GET", f"{c}/progress", ADMIN, expect=200)
    assert progress["first_error"] is None and progress["counts"]["enrolled"] == 3
    api.call("GET", f"{c}/progress?since={progress['revision']}&wait=0", ADMIN, expect=304)
    api.call("GET", f"{c}/progress?since=-1&wait=301", ADMIN, expect=400)
    api.call("GET", f"{c}/progress", worker_token, expect=403)
    api.call("GET", f"{c}/progress", expect=401)
    api.call("GET", f"{ctx}/{'B' * 22}/progress", ADMIN, expect=404)
    api.call("GET", f"{w}/view", head_token, expect=403)
    # Authorization comes first: a node credential learns nothing of other node ids.
    api.call("GET", f"{c}/nodes/{'A' * 22}/view", worker_token, expect=403)

    api.call("POST", f"{w}/report", worker_token, {"state": "error", "message": "boom", "log_tail": "x"}, expect=200)
    api.call("POST", f"{w}/report", worker_token, {"state": "ok"}, expect=409)
    api.call("POST", f"{w}/report", worker_token, {"state": "done"}, expect=400)
    status = api.call("GET", c, ADMIN, expect=200)
    assert [n["error"] is not None for n in status["nodes"]] == [False, True, False]
    assert api.call("GET", f"{c}/progress", ADMIN, expect=200)["first_error"]["message"] == "boom"
    api.call("POST", f"{h}/report", head_token, {"state": "contextualizing"}, expect=200)
    api.call("POST", f"{h}/report", head_token, {"state": "ok", "exit_code": 0}, expect=200)
    api.call("POST", f"{w}/report", worker_token, {"state": "error", "exit_code": None}, expect=200)
    status = api.call("GET", c, ADMIN, expect=200)
    assert status["nodes"][1]["error"]["exit_code"] is None
    api.call("GET", ctx, ADMIN, expect=200)

    api.call("GET", ctx, expect=401)
    api.call("GET", ctx, worker_token, expect=403)
    api.call("GET", f"{ctx}/{'B' * 22}", ADMIN, expect=404)
    api.call("GET", f"{ctx}/short", ADMIN, expect=404)
    api.call("POST", ctx, ADMIN, raw=b"{not json", expect=400)
    cycle = cluster(groups=[
        {"name": "a", "quantity": 1, "source_check": False, "provides": ["x"], "requires": [{"role": "y", "ready": True}]},
        {"name": "b", "quantity": 1, "source_check": False, "provides": ["y"], "requires": [{"role": "x", "ready": True}]},
    ], data={})
    api.call("POST", ctx, ADMIN, cycle, expect=400)
    api.call("POST", ctx, ADMIN, raw=b"{}", ctype="text/plain", expect=415)
    api.call("POST", ctx, ADMIN, raw=b" " * (MAX_BODY + 1), expect=413)

    short = api.call("POST", ctx, ADMIN, cluster(join_token_ttl=60), expect=201)
    api.clock.advance(61)
    api.call("POST", f"{ctx}/{short['context']['id']}/enroll", short["bootstraps"]["head"]["join_token"],
             enrollment(9), expect=410)

    users_and_ownership(api)
    elastic(api)
    host_credentials(Api(spec, seen=api.seen))
    scripts_travel(Api(spec, seen=api.seen))
    assert api.call("GET", "/v1/agent", expect=200) == AGENT
    Api(spec, seen=api.seen, agent=None).call("GET", "/v1/agent", expect=404)
    api.call("DELETE", c, ADMIN, expect=200)
    api.call("DELETE", c, ADMIN, expect=404)
    api.call("GET", f"{w}/view", worker_token, expect=401)
    quotas_and_rate_limits(Api(
        spec, seen=api.seen, quotas=Quotas(contexts_per_deployer=1, nodes_per_context=4, data_bytes_per_context=16),
        enroll_per_source=2,
    ))

    assert {h for h, _ in api.seen} == {r.handler for r in ROUTES}
    assert {s for _, s in api.seen} >= {200, 201, 304, 400, 401, 403, 404, 409, 410, 413, 415, 429}


def error(api, *args, **kwargs):
    """The error code of a call that must fail."""
    return api.call(*args, **kwargs)["error"]


def users_and_ownership(api):
    """Deployers (site admin), ownership of contexts, join-token rotation and node revocation."""
    ctx, users = "/v1/contexts", "/v1/users"
    alice = api.call("POST", users, ADMIN, {"name": "alice"}, expect=201)["token"]
    bob = api.call("POST", users, ADMIN, {"name": "bob"}, expect=201)["token"]
    assert error(api, "POST", users, ADMIN, {"name": "alice"}, expect=409) == "user_exists"
    assert error(api, "POST", users, ADMIN, {"name": "-alice"}, expect=400) == "invalid_name"
    assert error(api, "POST", users, ADMIN, {"name": "carol", "colour": "red"}, expect=400) == "bad_request"
    assert error(api, "POST", users, alice, {"name": "mallory"}, expect=403) == "forbidden"
    api.call("GET", users, alice, expect=403)
    api.call("GET", users, expect=401)
    listed = api.call("GET", users, ADMIN, expect=200)["users"]
    assert [(u["name"], u["revoked"]) for u in listed] == [("alice", None), ("bob", None)]

    created = api.call("POST", ctx, alice, cluster(), expect=201)
    assert created["context"]["owner"] == "alice"
    cid = created["context"]["id"]
    m = f"{ctx}/{cid}"
    assert [s["id"] for s in api.call("GET", ctx, alice, expect=200)["contexts"]] == [cid]
    assert api.call("GET", ctx, bob, expect=200)["contexts"] == []
    assert cid in [s["id"] for s in api.call("GET", ctx, ADMIN, expect=200)["contexts"]]
    # Another deployer's context is answered exactly like a missing one.
    missing = api.call("GET", f"{ctx}/{'C' * 22}", bob, expect=404)
    assert api.call("GET", m, bob, expect=404) == missing
    api.call("PUT", f"{m}/data/gridmap", bob, {"values": [{"b64": "aGk="}]}, expect=404)
    assert api.call("GET", m, alice, expect=200)["owner"] == "alice"

    old_join = created["bootstraps"]["compute"]["join_token"]
    rotated = api.call("POST", f"{m}/groups/compute/join-token", alice, expect=200)["bootstrap"]
    assert (rotated["context_id"], rotated["group"]) == (cid, "compute") and rotated["join_token"] != old_join
    api.call("POST", f"{m}/enroll", old_join, enrollment(21), expect=401)
    rotated = api.call("POST", f"{m}/groups/compute/join-token", ADMIN, {}, expect=200)["bootstrap"]
    api.call("POST", f"{m}/groups/nosuch/join-token", alice, expect=404)
    assert error(api, "POST", f"{m}/groups/-bad/join-token", alice, expect=400) == "invalid_name"
    api.call("POST", f"{m}/groups/compute/join-token", alice, {"colour": "red"}, expect=400)
    api.call("POST", f"{m}/groups/compute/join-token", bob, expect=404)
    node = api.call("POST", f"{m}/enroll", rotated["join_token"], enrollment(22), expect=201)
    n = f"{m}/nodes/{node['node_id']}"
    api.call("GET", f"{n}/view", node["node_token"], expect=200)

    api.call("POST", f"{n}/revoke", bob, expect=404)
    api.call("POST", f"{n}/revoke", node["node_token"], expect=403)
    assert api.call("POST", f"{n}/revoke", alice, expect=200) == {"revoked": node["node_id"]}
    assert error(api, "POST", f"{n}/revoke", alice, {}, expect=409) == "already_revoked"
    api.call("POST", f"{m}/nodes/{'D' * 22}/revoke", alice, expect=404)
    api.call("GET", f"{n}/view", node["node_token"], expect=401)
    # The revoked VM cannot get a new credential with its instance key.
    assert error(api, "POST", f"{m}/enroll", rotated["join_token"], enrollment(22), expect=403) == "forbidden"
    status = api.call("GET", m, alice, expect=200)
    assert [x["revoked"] for x in status["nodes"]] == [True]

    assert api.call("DELETE", f"{users}/bob", ADMIN, expect=200) == {"revoked": "bob"}
    api.call("DELETE", f"{users}/bob", ADMIN, expect=404)
    api.call("DELETE", f"{users}/nobody", ADMIN, expect=404)
    assert error(api, "DELETE", f"{users}/-bob", ADMIN, expect=400) == "invalid_name"
    api.call("DELETE", f"{users}/alice", alice, expect=403)
    api.call("GET", ctx, bob, expect=401)
    listed = api.call("GET", users, ADMIN, expect=200)["users"]
    assert [u["revoked"] is None for u in listed] == [True, False]
    api.call("DELETE", m, alice, expect=200)


def elastic(api):
    """Scale, remove (with shrink), leave, extend, a delta view and the status fields they change."""
    ctx = "/v1/contexts"
    body = cluster()
    body["groups"][1]["lease"] = 600
    created = api.call("POST", ctx, ADMIN, body, expect=201)
    cid, boots = created["context"]["id"], created["bootstraps"]
    c = f"{ctx}/{cid}"
    api.call("PUT", f"{c}/data/gridmap", ADMIN, {"values": [{"b64": "aGk="}]}, expect=200)
    api.call("POST", f"{c}/lock", ADMIN, {}, expect=200)
    join = boots["compute"]["join_token"]
    workers = [api.call("POST", f"{c}/enroll", join, enrollment(n), expect=201) for n in (41, 42)]
    assert api.call("POST", f"{c}/groups/compute/scale", ADMIN, {"quantity": 3}, expect=200)["group"]["quantity"] == 3
    assert error(api, "POST", f"{c}/groups/compute/scale", ADMIN, {"quantity": 1}, expect=409) == "scale_below_members"
    api.call("POST", f"{c}/groups/compute/scale", ADMIN, {"quantity": -1}, expect=400)
    api.call("POST", f"{c}/groups/nosuch/scale", ADMIN, {"quantity": 1}, expect=404)
    w, token = f"{c}/nodes/{workers[0]['node_id']}", workers[0]["node_token"]
    view = api.call("GET", f"{w}/view", token, expect=200)
    api.call("POST", f"{w}/report", token, {"state": "contextualizing", "watch": True}, expect=200)
    api.call("POST", f"{c}/enroll", join, enrollment(43), expect=201)
    api.call("POST", f"{c}/nodes/{workers[1]['node_id']}/remove", ADMIN, {"shrink": True}, expect=200)
    delta = api.call("GET", f"{w}/view?since={view['revision']}&wait=0&delta=1", token, expect=200)
    assert delta["delta"] is True and delta["departed"] == [workers[1]["node_id"]] and len(delta["peers"]) == 1
    api.call("GET", f"{w}/view?delta=2", token, expect=400)
    assert error(api, "POST", f"{c}/nodes/{workers[1]['node_id']}/remove", ADMIN, expect=409) == "already_departed"
    api.call("POST", f"{c}/nodes/{workers[1]['node_id']}/remove", ADMIN, {"shrink": 1}, expect=400)
    api.call("POST", f"{w}/leave", workers[1]["node_token"], expect=401)
    api.call("POST", f"{w}/leave", token, {}, expect=200)
    api.call("POST", f"{c}/extend", ADMIN, {"expires_in": 7200}, expect=200)
    api.call("POST", f"{c}/extend", ADMIN, {"expires_in": 59}, expect=400)
    api.call("POST", f"{ctx}/{'B' * 22}/extend", ADMIN, {"expires_in": 600}, expect=404)
    status = api.call("GET", c, ADMIN, expect=200)
    assert [n["departed"] for n in status["nodes"]] == ["left", "removed", None]
    api.call("DELETE", c, ADMIN, expect=200)


def ssh_host_key():
    """A real Ed25519 host public key, ``ssh-ed25519 BASE64`` (the broker signs what it is given)."""
    public = ed25519.Ed25519PrivateKey.generate().public_key()
    return public.public_bytes(Encoding.OpenSSH, PublicFormat.OpenSSH).decode("ascii")


def scripts_travel(api):
    """A context's ctx-scripts tree: announced in the view, served to its nodes; 404 without one."""
    ctx = "/v1/contexts"
    body = dict(cluster(), scripts=scripts_tree({"1-config/head": b"#!/bin/sh\n"}))
    created = api.call("POST", ctx, ADMIN, body, expect=201)
    cid, boots = created["context"]["id"], created["bootstraps"]
    node = api.call("POST", f"{ctx}/{cid}/enroll", boots["head"]["join_token"], enrollment(71), expect=201)
    n = f"{ctx}/{cid}/nodes/{node['node_id']}"
    view = api.call("GET", f"{n}/view", node["node_token"], expect=200)
    packed = api.call("GET", f"{n}/scripts", node["node_token"], expect=200)
    assert view["scripts"]["sha256"] == hashlib.sha256(packed).hexdigest()
    api.call("GET", f"{n}/scripts", expect=401)
    plain = api.call("POST", ctx, ADMIN, cluster(), expect=201)
    other = api.call("POST", f"{ctx}/{plain['context']['id']}/enroll", plain["bootstraps"]["head"]["join_token"],
                     enrollment(72), expect=201)
    api.call("GET", f"{n}/scripts", other["node_token"], expect=403)
    api.call("GET", f"{ctx}/{plain['context']['id']}/nodes/{other['node_id']}/scripts", other["node_token"],
             expect=404)


def host_credentials(api):
    """The context's CAs, a node's X.509 and SSH certificates (again while fresh), and every refusal."""
    api.clock.advance(1764085000)  # certificates are dated: a clock at the epoch would back-date them before it
    ctx = "/v1/contexts"
    plain = api.call("POST", ctx, ADMIN, cluster(), expect=201)["context"]["id"]
    assert api.call("GET", f"{ctx}/{plain}/ca", ADMIN, expect=200) == {"x509": None, "ssh": None}
    body = cluster(domain="cluster.test")
    body["groups"][0]["certificate"] = {}
    body["groups"][0]["ssh_certificate"] = {"validity": 86400, "sshd": True}
    created = api.call("POST", ctx, ADMIN, body, expect=201)
    cid, boots = created["context"]["id"], created["bootstraps"]
    c = f"{ctx}/{cid}"
    cas = api.call("GET", f"{c}/ca", ADMIN, expect=200)
    assert cas["ssh"]["pattern"] == "*.cluster.test" and "BEGIN CERTIFICATE" in cas["x509"]["bundle"]
    api.call("GET", f"{c}/ca", expect=401)
    api.call("GET", f"{ctx}/{'B' * 22}/ca", ADMIN, expect=404)

    def enroll(group, n):
        body = dict(enrollment(n), identity=dict(identity(n), ssh_host_keys=[ssh_host_key()]))
        return api.call("POST", f"{c}/enroll", boots[group]["join_token"], body, expect=201)

    head, worker = enroll("head", 61), enroll("compute", 62)
    h, w = f"{c}/nodes/{head['node_id']}", f"{c}/nodes/{worker['node_id']}"
    head_token, worker_token = head["node_token"], worker["node_token"]
    api.call("GET", f"{c}/ca", head_token, expect=403)
    assert {"certificate", "ssh_certificate"} <= set(api.call("GET", c, ADMIN, expect=200)["groups"][0])
    head_view = api.call("GET", f"{h}/view", head_token, expect=200)
    assert head_view["certificate"]["names"] == ["fqdn", "hostname", "ip"] and head_view["ssh_certificate"]["sshd"]
    assert api.call("GET", f"{w}/view", worker_token, expect=200)["ssh_ca"]["groups"] == ["head"]

    names = ["node61.cluster.test", "node61", "10.9.0.61"]
    csr, key = csr_for(names)
    issued = api.call("POST", f"{h}/credentials", head_token, {"csr": csr, "ssh": True}, expect=200)
    assert issued["x509"]["names"] == names and len(issued["ssh"]["certificates"]) == 1
    again = api.call("POST", f"{h}/credentials", head_token, {"csr": csr_for(names, key)[0]}, expect=200)
    assert again == {"x509": issued["x509"]}
    api.call("POST", f"{h}/credentials", head_token, {"csr": csr_for(names)[0]}, expect=429)
    assert error(api, "POST", f"{h}/credentials", head_token, {"csr": csr_for(["node62.cluster.test"])[0]},
                 expect=403) == "certificate_refused"
    api.call("POST", f"{h}/credentials", head_token, {"csr": "-----BEGIN CERTIFICATE REQUEST-----"}, expect=400)
    api.call("POST", f"{h}/credentials", head_token, {}, expect=400)
    assert error(api, "POST", f"{h}/credentials", worker_token, {"ssh": True}, expect=403) == "forbidden"
    assert error(api, "POST", f"{w}/credentials", worker_token, {"ssh": True}, expect=409) == "not_enabled"
    api.call("POST", f"{h}/leave", head_token, expect=200)
    api.call("POST", f"{h}/credentials", head_token, {"ssh": True}, expect=401)
    api.call("DELETE", c, ADMIN, expect=200)
    api.call("DELETE", f"{ctx}/{plain}", ADMIN, expect=200)


def quotas_and_rate_limits(api):
    """409 quota_exceeded on create and data put; 429 with Retry-After on enroll."""
    ctx = "/v1/contexts"
    dave = api.call("POST", "/v1/users", ADMIN, {"name": "dave"}, expect=201)["token"]
    created = api.call("POST", ctx, dave, cluster(), expect=201)
    assert error(api, "POST", ctx, dave, cluster(), expect=409) == "quota_exceeded"  # contexts per deployer
    big = cluster()
    big["groups"][1]["quantity"] = 4
    assert error(api, "POST", ctx, ADMIN, big, expect=409) == "quota_exceeded"  # nodes per context
    too_much = cluster(data={"gridmap": [{"b64": "A" * 24}]})
    assert error(api, "POST", ctx, ADMIN, too_much, expect=409) == "quota_exceeded"  # data bytes
    c = f"{ctx}/{created['context']['id']}"
    assert error(api, "PUT", f"{c}/data/gridmap", dave, {"values": [{"b64": "A" * 24}]}, expect=409) == "quota_exceeded"
    api.call("PUT", f"{c}/data/gridmap", dave, {"values": [{"b64": "aGk="}]}, expect=200)
    join = created["bootstraps"]["compute"]["join_token"]
    api.call("POST", f"{c}/enroll", join, enrollment(31), expect=201)
    api.call("POST", f"{c}/enroll", join, enrollment(32), expect=201)
    assert error(api, "POST", f"{c}/enroll", join, enrollment(33), expect=429) == "rate_limited"
    assert 1 <= int(api.last_headers.getRawHeaders("retry-after")[0]) <= 60
    api.clock.advance(61)
    api.call("POST", f"{c}/enroll", join, enrollment(31), expect=200)


def test_unknown_fields_rejected_by_spec_and_server(spec):
    """Where a body schema says additionalProperties: false, the server answers 400 to an unknown field too."""
    api = Api(spec)
    created = api.call("POST", "/v1/contexts", ADMIN, cluster(), expect=201)
    c = f"/v1/contexts/{created['context']['id']}"
    node = api.call("POST", f"{c}/enroll", created["bootstraps"]["head"]["join_token"], enrollment(1), expect=201)
    n, token = f"{c}/nodes/{node['node_id']}", node["node_token"]
    nested_group = cluster()
    nested_group["groups"][0]["colour"] = "red"
    nested_role = cluster()
    nested_role["groups"][1]["requires"][0]["colour"] = "red"
    nested_iface = identity(1)
    nested_iface["interfaces"][0]["colour"] = "red"
    nested_certificate = cluster()
    nested_certificate["groups"][0]["certificate"] = {"colour": "red"}
    nested_ssh_certificate = cluster()
    nested_ssh_certificate["groups"][0]["ssh_certificate"] = {"colour": "red"}
    cases = [
        ("POST", "/v1/contexts", ADMIN, dict(cluster(), colour="red")),
        ("POST", "/v1/contexts", ADMIN, nested_group),
        ("POST", "/v1/contexts", ADMIN, nested_role),
        ("PUT", f"{c}/data/gridmap", ADMIN, {"values": [{"b64": "aGk=", "colour": "red"}]}),
        ("PUT", f"{c}/data/gridmap", ADMIN, {"values": [{"b64": "aGk="}], "colour": "red"}),
        ("POST", f"{c}/lock", ADMIN, {"colour": "red"}),
        ("POST", f"{c}/enroll", created["bootstraps"]["head"]["join_token"], dict(enrollment(1), colour="red")),
        ("PUT", f"{n}/identity", token, dict(identity(1), colour="red")),
        ("PUT", f"{n}/identity", token, nested_iface),
        ("POST", f"{n}/report", token, {"state": "ok", "colour": "red"}),
        ("POST", "/v1/contexts", ADMIN, nested_certificate),
        ("POST", "/v1/contexts", ADMIN, nested_ssh_certificate),
        ("POST", f"{n}/credentials", token, {"ssh": True, "colour": "red"}),
    ]
    for method, path, credential, body in cases:
        op = operation(api.ops, match(method, path)[0])
        schema = op["requestBody"]["content"]["application/json"]["schema"]
        assert any("unexpected field 'colour'" in p for p in problems(spec, schema, body)), (method, path)
        assert api.call(method, path, credential, body, expect=400)["error"] == "bad_request"
