"""Shared helpers for unit tests: an in-memory broker and sample requests."""

import base64
import json
from typing import Any, Dict, Optional, Sequence, Tuple

import treq
from treq.testing import StubTreq
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.defer import Deferred, succeed
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from twisted.web.resource import Resource

from ctxd import tokens
from ctxd.api import BrokerResource, make_site
from ctxd.broker import Broker
from ctxd.credentials import Authority
from ctxd.testing import MemoryJournal
from ctxd.model import Model

ADMIN_TOKEN = tokens.new_token(tokens.ADMIN)
PUBLIC_URL = "https://ctxd.test:8443"
CA_PEM = "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n"


def ca_pem() -> str:
    """A real CA certificate (PEM) as ctxd generates it."""
    from cryptography.hazmat.primitives import serialization

    from ctxd.tls import make_ca

    cert, _ = make_ca()
    return cert.public_bytes(serialization.Encoding.PEM).decode("ascii")


def torque_cluster(open_for_injection: bool = False, source_check: bool = True) -> Dict[str, Any]:
    """The create request the issue's example cluster file turns into."""
    return {
        "name": "torque-demo",
        "open_for_injection": open_for_injection,
        "groups": [
            {
                "name": "head",
                "quantity": 1,
                "provides": ["torquemaster"],
                "requires": [{"role": "torqueslave"}],
                "data": ["gridmap"],
                "source_check": source_check,
            },
            {
                "name": "compute",
                "quantity": 3,
                "provides": ["torqueslave"],
                "requires": [{"role": "torquemaster", "ready": True}],
                "all_identities": True,
                "source_check": source_check,
            },
        ],
        "data": {"gridmap": [] if open_for_injection else [{"b64": b64(b"/CN=alice alice\n")}]},
    }


def b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode("ascii")


def identity(n: int, hostname: Optional[str] = None) -> Dict[str, Any]:
    host = hostname or f"node{n}"
    return {
        "hostname": host,
        "fqdn": f"{host}.cluster.test",
        "primary_ip": f"10.9.0.{n}",
        "interfaces": [{"name": "eth0", "ipv4": [f"10.9.0.{n}"], "ipv6": [f"fd00::{n}"]}],
        "ssh_host_keys": [f"ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAI{n:04d}key"],
    }


def instance_key(n: int) -> str:
    return f"instance-key-{n:06d}-abcdef"


def run_now(executable: str, args: Sequence[str], env: Dict[str, str]) -> Deferred:
    """getProcessOutputAndValue, but run to completion at once: where cryptography cannot sign
    SSH certificates (Debian 12's 38), the real ssh-keygen signs them inside a StubTreq test."""
    import subprocess

    done = subprocess.run([executable, *args], capture_output=True, env=env, timeout=30)
    return succeed((done.stdout, done.stderr, done.returncode))


#: Signs the test brokers' host certificates (a fixed master secret: tests/test_credentials.py).
AUTHORITY = Authority(bytes(range(32)), spawn=run_now)
#: What the test brokers serve as the agent (GET /v1/agent).
AGENT = b"#!/usr/bin/env python3\nprint('a stand-in for ctxagent.py')\n"


def make_broker(journal: Optional[Any] = None, clock: Optional[Clock] = None,
                authority: Optional[Authority] = AUTHORITY) -> Broker:
    return Broker(
        Model(),
        journal if journal is not None else MemoryJournal(),
        clock or Clock(),
        tokens.token_hash(ADMIN_TOKEN),
        PUBLIC_URL,
        CA_PEM,
        authority=authority,
        agent=AGENT,
    )


def scripts_tree(files: Dict[str, bytes], extra: Any = None) -> Dict[str, str]:
    """A create body's ``scripts``: ``files`` (name -> content; executable) as a gzip'd tar, and its
    SHA-256; ``extra(tar)`` may add members of its own."""
    import hashlib
    import io
    import tarfile

    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        for name, content in sorted(files.items()):
            info = tarfile.TarInfo(name)
            info.size, info.mode = len(content), 0o755
            tar.addfile(info, io.BytesIO(content))
        if extra is not None:
            extra(tar)
    packed = buffer.getvalue()
    return {"b64": base64.b64encode(packed).decode("ascii"), "sha256": hashlib.sha256(packed).hexdigest()}


def csr_for(names: Sequence[str], key: Any = None, common_name: Optional[str] = None) -> Tuple[str, Any]:
    """A PEM certificate request for ``names`` (CN: ``common_name``, else the first), and its key."""
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = key or ec.generate_private_key(ec.SECP256R1())
    sans = []
    for name in names:
        try:
            sans.append(x509.IPAddress(ipaddress.ip_address(name)))
        except ValueError:
            sans.append(x509.DNSName(name))
    builder = x509.CertificateSigningRequestBuilder().subject_name(
        x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name or names[0])]))
    if sans:
        builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    csr = builder.sign(key, hashes.SHA256())
    return csr.public_bytes(serialization.Encoding.PEM).decode("ascii"), key


def result_of(d: Deferred) -> Any:
    """The result of a Deferred that must already have fired (raises its failure)."""
    results = []
    d.addBoth(results.append)
    assert results, "the Deferred has not fired"
    if isinstance(results[0], Failure):
        results[0].raiseException()
    return results[0]


def not_fired(d: Deferred) -> bool:
    fired = []
    d.addBoth(lambda r: fired.append(r) or r)
    return not fired


def json_body(data: Any) -> bytes:
    return json.dumps(data).encode("utf-8")


BASE = "https://ctxd.test:8443"


class FromAddress(Resource):
    """The broker's resource behind a network the test chooses: a request's X-Test-Source header
    is the address it comes from (StubTreq's requests all come from 127.0.0.1)."""

    isLeaf = True

    def __init__(self, resource):
        super().__init__()
        self.resource = resource

    def render(self, request):
        source = request.getHeader("x-test-source")
        if source is not None:
            request.client = (IPv6Address if ":" in source else IPv4Address)("TCP", source, 40000)
        return self.resource.render(request)


class Client:
    """A StubTreq client with JSON helpers; every call returns (status, json-or-None).

    ``source`` is the address a request comes from (default 127.0.0.1); an enrollment
    comes from the address its identity claims.
    """

    def __init__(self):
        self.clock = Clock()
        self.journal = MemoryJournal()
        self.broker = make_broker(self.journal, self.clock)
        self.stub = StubTreq(FromAddress(BrokerResource(self.broker)))

    def call_deferred(self, method, path, token=None, body=None, ctype="application/json", raw=None, source=None):
        headers = {}
        if source is not None:
            headers["X-Test-Source"] = source
        if token is not None:
            headers["Authorization"] = f"Bearer {token}"
        data = raw if raw is not None else (json_body(body) if body is not None else None)
        if data is not None and ctype:
            headers["Content-Type"] = ctype
        d = self.stub.request(method, BASE + path, headers=headers, data=data)

        def read(response):
            return treq.content(response).addCallback(
                lambda content: (response.code, json.loads(content) if content else None)
            )

        return d.addCallback(read)

    def call(self, *args, **kwargs):
        d = self.call_deferred(*args, **kwargs)
        self.stub.flush()
        return result_of(d)

    def create(self, body=None):
        status, created = self.call("POST", "/v1/contexts", ADMIN_TOKEN, body or torque_cluster())
        assert status == 201, created
        return created["context"]["id"], created

    def enroll(self, cid, join_token, n, source=None, **ident):
        claimed = dict(identity(n), **ident)
        return self.call(
            "POST",
            f"/v1/contexts/{cid}/enroll",
            join_token,
            {"instance_key": instance_key(n), "identity": claimed},
            source=source or claimed["primary_ip"],
        )


def torque(client, body=None):
    """The torque cluster (or ``body``, with its groups) created, its head and three computes enrolled:
    (context id, join tokens by group, {n: (node id, node token)})."""
    cid, created = client.create(body)
    joins = {g: b["join_token"] for g, b in created["bootstraps"].items()}
    nodes = {}
    for n, group in ((1, "head"), (2, "compute"), (3, "compute"), (4, "compute")):
        status, enrolled = client.enroll(cid, joins[group], n)
        assert status == 201, enrolled
        nodes[n] = (enrolled["node_id"], enrolled["node_token"])
    return cid, joins, nodes


def sync_thread(f, *args):
    """A stand-in for running journal work in a thread: run it now (errors become failed Deferreds)."""
    try:
        return succeed(f(*args))
    except Exception as e:
        d = Deferred()
        d.errback(e)
        return d


class Queued:
    """A thread stand-in: jobs run when the test says, in order (so records group into batches)."""

    def __init__(self):
        self.jobs = []

    def __call__(self, f, *args):
        d = Deferred()
        self.jobs.append((f, args, d))
        return d

    def run_next(self):
        """Run the oldest job (whatever it queues meanwhile waits)."""
        f, args, d = self.jobs.pop(0)
        try:
            result = f(*args)
        except Exception as e:
            d.errback(e)
        else:
            d.callback(result)

    def run_all(self):
        """Run jobs, those they queue included, until none is left."""
        while self.jobs:
            self.run_next()


def model_state(model):
    """Everything observable about a model, for equality."""
    return {
        "status": {cid: model.status(ctx) for cid, ctx in model.contexts.items()},
        "progress": {cid: model.progress(ctx) for cid, ctx in model.contexts.items()},
        "order": list(model.contexts),
        "principals": dict(model.principals),
        "users": [(u.name, u.token_hash, u.created, u.revoked_at) for u in model.users.values()],
        "views": {(cid, nid): model.view(node) for cid, ctx in model.contexts.items()
                  for nid, node in ctx.nodes.items()},
    }


def replay_records(records):
    """A fresh Model with ``records`` applied."""
    model = Model()
    for record in records:
        model.apply(record)
    return model


def held_request(client, path, token, method="GET", headers=None, body=b"", **site):
    """``METHOD path`` with ``token`` (and ``headers``, ``body``) over the broker's own site
    (api.make_site(**site): its CappedRequest and channel, on the client's clock), sent on a
    StringTransport; (channel, transport)."""
    channel = make_site(client.broker, **site).buildProtocol(None)
    channel.callLater = client.clock.callLater
    transport = StringTransport()
    channel.makeConnection(transport)
    head = [f"{method} {path} HTTP/1.1", "Host: x", f"Authorization: Bearer {token}"]
    head += [f"{name}: {value}" for name, value in (headers or {}).items()]
    if body:
        head.append(f"Content-Length: {len(body)}")
    channel.dataReceived(("\r\n".join(head) + "\r\n\r\n").encode() + body)
    return channel, transport
