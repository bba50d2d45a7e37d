"""The benchmark's simulated agents make the same requests as the real ctxagent.py.

A tiny recording HTTPS server fronts the in-memory broker of tests/support.py. The real
ctxagent.py (a subprocess) and one simulated agent of bench/loadgen.py each contextualize a
compute node of their own context against it; the ordered lists of (method, path template,
query keys, since=-1 or not, body keys, identity keys, header names) must be equal, and every
request must come on its own TLS connection, as ctxagent.py's BrokerConnection makes them.

The scenario exercises every branch of the poll loop: the first view (since=-1) is
incomplete, the long-poll that follows ends with 304 (the fake clock is advanced), the head
then enrolls and reports ok, and the next poll returns the complete view.
"""

import asyncio
import http.server
import json
import os
import ssl
import subprocess
import sys
import threading
from urllib.parse import parse_qsl, urlsplit

import pytest
import treq

from support import ADMIN_TOKEN, Client, identity, instance_key

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "bench"))
import loadgen  # noqa: E402

POLL_WAIT = 5
CLUSTER = {
    "name": "protocol",
    "groups": [
        {"name": "head", "quantity": 1, "source_check": False, "provides": ["m"], "requires": [{"role": "w"}]},
        {"name": "compute", "quantity": 1, "source_check": False, "provides": ["w"], "requires": [{"role": "m", "ready": True}]},
    ],
}


class InMemoryBroker:
    """The in-memory broker behind a lock, with a hook run when a long-poll times out."""

    def __init__(self):
        self.client = Client()
        self.lock = threading.Lock()
        status, created = self.client.call("POST", "/v1/contexts", ADMIN_TOKEN, CLUSTER)
        assert status == 201, created
        self.cid = created["context"]["id"]
        self.bootstraps = created["bootstraps"]
        self.head_done = False
        self.log = []   # (connection number, method, path, headers, body)

    def _request(self, method, path, headers, body):
        d = self.client.stub.request(method, "https://ctxd.test:8443" + path, headers=headers, data=body)
        out = []
        d.addCallback(lambda r: treq.content(r).addCallback(lambda c: out.append((r.code, c))))
        d.addErrback(out.append)
        self.client.stub.flush()
        if not out:   # a long-poll: let the fake time run out
            self.client.clock.advance(3600)
            self.client.stub.flush()
        assert out and isinstance(out[0], tuple), out
        return out[0]

    def _head_enrolls_and_is_ok(self):
        c, b = self.client, self.bootstraps["head"]
        status, node = c.call("POST", f"/v1/contexts/{self.cid}/enroll", b["join_token"],
                              {"instance_key": instance_key(900), "identity": identity(200, "head")})
        assert status == 201, node
        path = f"/v1/contexts/{self.cid}/nodes/{node['node_id']}/report"
        assert c.call("POST", path, node["node_token"], {"state": "ok"})[0] == 200
        self.head_done = True

    def handle(self, conn, method, path, headers, body):
        with self.lock:
            self.log.append((conn, method, path, headers, body))
            status, content = self._request(method, path, {k: v for k, v in headers.items()
                                                           if k in ("authorization", "content-type")}, body)
            if status == 304 and not self.head_done:
                self._head_enrolls_and_is_ok()
            return status, content


def serve(fake, tmp_path):
    from ctxd import tls

    ca_cert, ca_key = tls.make_ca("test CA")
    cert, key = tls.make_server_cert(ca_cert, ca_key, ["127.0.0.1"])
    (tmp_path / "server.pem").write_bytes(tls.cert_pem(cert))
    (tmp_path / "server.key").write_bytes(tls.key_pem(key))
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(str(tmp_path / "server.pem"), str(tmp_path / "server.key"))
    counter = iter(range(1, 1 << 30))

    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def setup(self):
            super().setup()
            self.conn_number = next(counter)

        def log_message(self, *args):
            pass

        def _any(self):
            length = int(self.headers.get("Content-Length") or 0)
            body = self.rfile.read(length) if length else None
            headers = {k.lower(): v for k, v in self.headers.items()}
            status, content = fake.handle(self.conn_number, self.command, self.path, headers, body)
            self.send_response(status)
            if status != 304:
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(content)))
            self.end_headers()
            if status != 304:
                self.wfile.write(content)

        do_GET = do_POST = do_PUT = _any

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    server.socket = context.wrap_socket(server.socket, server_side=True)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    ca_pem = tls.cert_pem(ca_cert).decode("ascii")
    return server, ca_pem


def shape(fake):
    """The comparable request sequence of a run, and how many requests each connection carried."""
    ids = {fake.cid: "{cid}"}
    steps, per_conn = [], {}
    for conn, method, path, headers, body in fake.log:
        per_conn[conn] = per_conn.get(conn, 0) + 1
        parts = urlsplit(path)
        segments = parts.path.split("/")
        if len(segments) > 5 and segments[3] == fake.cid and segments[4] == "nodes":
            ids.setdefault(segments[5], "{nid}")
        template = "/".join(ids.get(s, s) for s in segments)
        query = dict(parse_qsl(parts.query))
        obj = json.loads(body) if body else None
        steps.append((
            method, template, tuple(sorted(query)), query.get("since") == "-1" if query else None,
            tuple(sorted(obj)) if isinstance(obj, dict) else None,
            tuple(sorted(obj["identity"])) if isinstance(obj, dict) and "identity" in obj else None,
            obj.get("state") if isinstance(obj, dict) else None,
            tuple(sorted(h for h in headers if h not in ("connection",))),
        ))
    return steps, per_conn


def run_ctxagent(fake, port, ca_pem, tmp_path):
    bootstrap = dict(fake.bootstraps["compute"], url=f"https://127.0.0.1:{port}", ca_pem=ca_pem)
    (tmp_path / "bootstrap.json").write_text(json.dumps(bootstrap))
    (tmp_path / "scripts").mkdir()
    (tmp_path / "ssh").mkdir()
    (tmp_path / "ssh" / "ssh_host_ed25519_key.pub").write_text(
        loadgen.identity(7)["ssh_host_keys"][0] + " root@node\n")
    proc = subprocess.run(
        [sys.executable, os.path.join(ROOT, "ctxagent.py"), "--bootstrap", str(tmp_path / "bootstrap.json"),
         "--state-dir", str(tmp_path / "state"), "--scripts-dir", str(tmp_path / "scripts"),
         "--hosts-file", str(tmp_path / "hosts"), "--known-hosts-file", str(tmp_path / "known_hosts"),
         "--ssh-dir", str(tmp_path / "ssh"), "--address", "10.9.0.7", "--hostname", "node7",
         "--fqdn", "node7.cluster.test", "--poll-wait", str(POLL_WAIT), "--timeout", "60"],
        capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr


def run_simulated(fake, port, ca_pem):
    bootstrap = dict(fake.bootstraps["compute"], url=f"https://127.0.0.1:{port}", ca_pem=ca_pem)
    stats = loadgen.Stats()
    agent = loadgen.SimAgent(bootstrap, loadgen.ctxagent.make_tls_context(ca_pem), stats, 7, POLL_WAIT,
                             deadline=60)
    asyncio.run(agent.run())
    assert stats.last_ok is not None and stats.views_200 == 2
    return stats


@pytest.fixture
def recorded(tmp_path):
    """(real agent's shape, simulated agent's shape), each against its own fake broker."""
    shapes = []
    for name, runner in (("real", run_ctxagent), ("sim", None)):
        fake = InMemoryBroker()
        (tmp_path / name).mkdir()
        server, ca_pem = serve(fake, tmp_path / name)
        try:
            if runner is not None:
                runner(fake, server.server_address[1], ca_pem, tmp_path / name)
            else:
                run_simulated(fake, server.server_address[1], ca_pem)
        finally:
            server.shutdown()
            server.server_close()
        shapes.append(shape(fake))
    return shapes


def test_simulated_agent_makes_the_requests_ctxagent_makes(recorded):
    """Same methods, paths, query keys, body keys, identity fields, reported states and headers, in order."""
    (real, _), (sim, _) = recorded
    assert real == sim
    methods = [(m, t.split("/")[-1] or t, s) for m, t, _, s, *_ in real]
    assert methods == [
        ("GET", "healthz", None), ("POST", "enroll", None), ("POST", "report", None),
        ("GET", "view", True), ("GET", "view", False), ("GET", "view", False), ("POST", "report", None),
    ]
    states = [step[6] for step in real if step[1].endswith("/report")]
    assert states == ["contextualizing", "ok"]


def test_every_request_has_its_own_tls_connection(recorded):
    """ctxagent.py's BrokerConnection opens and closes a connection per request; so does the simulation."""
    (_, real_conns), (_, sim_conns) = recorded
    assert set(real_conns.values()) == {1} and set(sim_conns.values()) == {1}
    assert len(real_conns) == len(sim_conns) == 7
