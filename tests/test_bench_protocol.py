"""The benchmark's simulated agents make the same requests as the real ctxagent.py.

A tiny recording HTTPS server fronts the in-memory broker of tests/support.py. The real
ctxagent.py (a subprocess) and one simulated agent of bench/loadgen.py each contextualize a
compute node of their own context against it; the ordered lists of (method, path template,
query keys, since=-1 or not, body keys, identity keys, header names) must be equal, and the
server counts the TLS connections each opens: one keep-alive connection for the whole run,
as ctxagent.py's BrokerConnection keeps it, and exactly one more when the server closes it.

The scenario exercises every branch of the poll loop: enroll, whose reply says the view is
incomplete (so no view is fetched before it changes), the long-poll from the enrollment's
revision ends with 304 (the fake clock is advanced), the head then enrolls and reports ok, and
the next poll returns the complete view; report ok. In the
reconnect scenarios the server ends the connection after the first view's response: saying
so (`Connection: close`), silently (closed after the response), or by reading the next
request and closing without an answer (end of stream before any response byte: the client
must send that request again on a new connection).
"""

import asyncio
import http.server
import json
import os
import ssl
import subprocess
import sys
import threading
import time
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
# The requests of one run, (method, last path segment, since=-1 or not), in order.
RUN = [("POST", "enroll", None), ("GET", "view", False), ("GET", "view", False), ("POST", "report", None)]
CLOSES = ["header", "silently", "unanswered"]   # how the server ends the connection after the first view


class InMemoryBroker:
    """The in-memory broker behind a lock, with a hook run when a long-poll times out."""

    def __init__(self, slow=False):
        # SLOW: the head comes only after the agent said why it waits (a contextualizing
        # report, sent once it has waited WAIT_REPORT_AFTER seconds of real time).
        self.slow = slow
        self.advised = False
        self.client = Client()
        self.lock = threading.Lock()
        status, created = self.client.call("POST", "/v1/contexts", ADMIN_TOKEN, CLUSTER)
        assert status == 201, created
        self.cid = created["context"]["id"]
        self.bootstraps = created["bootstraps"]
        self.head_done = False
        self.viewed = False     # the first view was answered
        self.log = []           # (connection number, method, path, headers, body)
        self.connections = []   # per TLS connection accepted, in order: whether its session was resumed
        self.unanswered = 0     # requests read and dropped with their connection (not in the log)

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
            if path.endswith("/report") and json.loads(body).get("state") == "contextualizing":
                self.advised = True
            status, content = self._request(method, path, {k: v for k, v in headers.items()
                                                           if k in ("authorization", "content-type")}, body)
            if status == 304 and not self.head_done:
                if self.slow and not self.advised:
                    time.sleep(0.2)   # real time passes for the agent's clock
                else:
                    self._head_enrolls_and_is_ok()
            return status, content


def serve(fake, tmp_path, close=None):
    """The recording server; CLOSE (one of CLOSES, or None: never): how it ends the connection
    after answering the first view."""
    from ctxd import tls

    ca_cert, ca_key = tls.make_ca("test CA")
    cert, key = tls.make_server_cert(ca_cert, ca_key, ["127.0.0.1"])
    (tmp_path / "server.pem").write_bytes(tls.cert_pem(cert))
    (tmp_path / "server.key").write_bytes(tls.key_pem(key))
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(str(tmp_path / "server.pem"), str(tmp_path / "server.key"))

    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def setup(self):
            super().setup()
            with fake.lock:
                fake.connections.append(self.request.session_reused)
                self.conn_number = len(fake.connections)

        def log_message(self, *args):
            pass

        answered_first_view = False

        def _any(self):
            length = int(self.headers.get("Content-Length") or 0)
            body = self.rfile.read(length) if length else None
            headers = {k.lower(): v for k, v in self.headers.items()}
            if close == "unanswered" and self.answered_first_view:
                with fake.lock:
                    fake.unanswered += 1
                self.close_connection = True
                return
            status, content = fake.handle(self.conn_number, self.command, self.path, headers, body)
            self.send_response(status)
            if status != 304:
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(content)))
            with fake.lock:   # the run's first view (a long-poll), whichever connection carries it
                first_view = "/view?" in self.path and not fake.viewed
                fake.viewed = fake.viewed or first_view
            if close == "header" and first_view:
                self.send_header("Connection", "close")   # (and http.server closes it)
            self.end_headers()
            if status != 304:
                self.wfile.write(content)
            if close == "silently" and first_view:
                self.close_connection = True
            self.answered_first_view = self.answered_first_view or first_view

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
    steps, per_conn = [], [0] * len(fake.connections)
    for conn, method, path, headers, body in fake.log:
        per_conn[conn - 1] += 1
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
            tuple(sorted(headers)),
        ))
    return steps, per_conn


def run_ctxagent(fake, port, ca_pem, tmp_path, wait_report_after=None):
    bootstrap = dict(fake.bootstraps["compute"], url=f"https://127.0.0.1:{port}", ca_pem=ca_pem)
    (tmp_path / "bootstrap.json").write_text(json.dumps(bootstrap))
    (tmp_path / "scripts").mkdir()
    (tmp_path / "ssh").mkdir()
    (tmp_path / "ssh" / "ssh_host_ed25519_key.pub").write_text(
        loadgen.identity(7)["ssh_host_keys"][0] + " root@node\n")
    # WAIT_REPORT_AFTER: the agent's own constant, changed for a test that cannot wait 10 s.
    agent = [sys.executable, os.path.join(ROOT, "ctxagent.py")] if wait_report_after is None else [
        sys.executable, "-c", "import sys; sys.path.insert(0, %r); import ctxagent; "
        "ctxagent.WAIT_REPORT_AFTER = %r; sys.argv[0] = 'ctxagent.py'; ctxagent.console_main()"
        % (ROOT, wait_report_after)]
    proc = subprocess.run(
        agent + ["--bootstrap", str(tmp_path / "bootstrap.json"),
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
    assert stats.last_ok is not None and stats.views_200 == 1
    assert agent.connection is None   # closed at the end of the run
    return stats


def record_both(tmp_path, close):
    """{"real": run, "sim": run}, each against its own fake broker and recording server, where a
    run is {"steps", "per_conn" (requests carried by each connection, in order), "resumed"
    (whether each connection resumed a TLS session), "stats" (the simulated agent's),
    "unanswered" (requests the server dropped with their connection)}."""
    runs = {}
    for name in ("real", "sim"):
        fake = InMemoryBroker()
        (tmp_path / name).mkdir()
        server, ca_pem = serve(fake, tmp_path / name, close)
        stats = None
        try:
            if name == "real":
                run_ctxagent(fake, server.server_address[1], ca_pem, tmp_path / name)
            else:
                stats = run_simulated(fake, server.server_address[1], ca_pem)
        finally:
            server.shutdown()
            server.server_close()
        steps, per_conn = shape(fake)
        runs[name] = {"steps": steps, "per_conn": per_conn, "resumed": list(fake.connections), "stats": stats,
                      "unanswered": fake.unanswered}
    return runs


@pytest.fixture(scope="module")
def recorded(tmp_path_factory):
    """recorded(close) -> record_both's runs for that way of closing (None: never), run once per module."""
    cache = {}

    def get(close):
        if close not in cache:
            cache[close] = record_both(tmp_path_factory.mktemp(close or "keepalive"), close)
        return cache[close]
    return get


@pytest.mark.parametrize("close", [None] + CLOSES)
def test_simulated_agent_makes_the_requests_ctxagent_makes(recorded, close):
    """Same methods, paths, query keys, body keys, identity fields, reported states and headers, in order."""
    runs = recorded(close)
    real, sim = runs["real"]["steps"], runs["sim"]["steps"]
    assert real == sim
    assert [(m, t.split("/")[-1], s) for m, t, _, s, *_ in real] == RUN
    assert [step[6] for step in real if step[1].endswith("/report")] == ["ok"]
    assert all("connection" not in step[7] for step in real)   # http.client's persistent connection: no Connection header


def test_one_tls_connection_for_the_whole_run(recorded):
    """Both open one TLS connection and send every request of the run on it."""
    runs = recorded(None)
    assert runs["real"]["per_conn"] == runs["sim"]["per_conn"] == [len(RUN)]
    stats = runs["sim"]["stats"]
    assert (stats.connections, stats.reconnects, stats.retries) == (1, 0, 0)


@pytest.mark.parametrize("close", CLOSES)
def test_both_reconnect_when_the_server_closes_the_connection(recorded, close):
    """Closed after the first view, both open exactly one new connection and carry on there,
    resending the long-poll at once rather than as a retry."""
    runs = recorded(close)
    # enroll and the first view on the first connection, the rest on the second
    assert runs["real"]["per_conn"] == runs["sim"]["per_conn"] == [2, len(RUN) - 2]
    assert runs["real"]["unanswered"] == runs["sim"]["unanswered"] == (1 if close == "unanswered" else 0)
    stats = runs["sim"]["stats"]
    assert (stats.connections, stats.reconnects, stats.retries) == (2, 1, 0)


@pytest.mark.parametrize("close", CLOSES)
def test_real_agent_resumes_its_session_and_the_simulation_cannot(recorded, close):
    """ctxagent's reconnect resumes its TLS session; asyncio's makes a full handshake (bench/README.md)."""
    runs = recorded(close)
    assert runs["real"]["resumed"] == [False, True]
    assert runs["sim"]["resumed"] == [False, False]


def test_simulated_backoff_is_the_agents():
    """The simulation retries with ctxagent's back-off constants (first delay, cap)."""
    assert (loadgen.RETRY_FIRST, loadgen.RETRY_MAX) == (loadgen.ctxagent.RETRY_FIRST, loadgen.ctxagent.RETRY_MAX)


def _collapsed(steps):
    """The steps with repeats in a row folded into one (how many 304s a wait takes is timing)."""
    return [step for i, step in enumerate(steps) if i == 0 or step != steps[i - 1]]


def test_both_say_why_they_wait_once_they_waited_long(tmp_path, monkeypatch):
    """A node that waits longer than WAIT_REPORT_AFTER tells the broker why (a contextualizing
    report), the simulated agent as the real one: same requests in the same order."""
    after = 1.0
    monkeypatch.setattr(loadgen.ctxagent, "WAIT_REPORT_AFTER", after)
    runs = {}
    for name in ("real", "sim"):
        fake = InMemoryBroker(slow=True)
        (tmp_path / name).mkdir()
        server, ca_pem = serve(fake, tmp_path / name)
        try:
            if name == "real":
                run_ctxagent(fake, server.server_address[1], ca_pem, tmp_path / name, wait_report_after=after)
            else:
                run_simulated(fake, server.server_address[1], ca_pem)
        finally:
            server.shutdown()
            server.server_close()
        assert fake.advised and fake.head_done
        runs[name] = _collapsed(shape(fake)[0])
    assert runs["real"] == runs["sim"]
    assert [(m, t.split("/")[-1], state) for m, t, _, _, _, _, state, _ in runs["real"]] == [
        ("POST", "enroll", None), ("GET", "view", None), ("POST", "report", "contextualizing"),
        ("GET", "view", None), ("POST", "report", "ok")]
