"""Load generator for ctxd: simulated agents at the protocol level, against a real `twistd ctxd`.

    python bench/loadgen.py storm  --nodes N      # scenario 1: join storm (1 head + N compute)
    python bench/loadgen.py allids --nodes N      # scenario 2: every node needs every identity
    python bench/loadgen.py idle   --nodes N      # scenario 3: idle waiters, then one head-only change

Each simulated node does exactly what ctxagent.py's Agent.run does (tests/test_bench_protocol.py
compares the two request sequences): POST enroll (join token, unique instance key, identity
with a unique 10.x address and hostname; the broker puts the node in state contextualizing),
then GET view?since=R&wait=W (R=-1 first; repeat on 304 or an incomplete view) until complete,
then POST report ok with a log tail. Like ctxagent.py's BrokerConnection, a node sends all of
them on ONE keep-alive HTTP/1.1 TLS connection verified against the broker's CA (STATE/tls/ca.pem,
with ctxagent's own make_tls_context); when the server closes it, the node reconnects and sends
the request again at once (the real agent resumes its TLS session there; asyncio cannot, so a
simulated node makes a full handshake: Stats counts them). 5xx and connection errors are
retried with ctxagent's backoff (0.25 s doubling to 30 s, jittered).

One asyncio process, one coroutine per node (each node holds at most one connection at a
time, so N nodes need about N file descriptors). Each subcommand starts its own broker
(free loopback port, temporary state dir, limits raised so they do not interfere), creates
the context with the admin token over HTTPS, and prints one table row (see bench/README.md).
"""

import argparse
import asyncio
import asyncio.sslproto
import base64
import http.client
import json
import os
import random
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import time
from typing import Any, Callable, Dict, List, Optional, Tuple

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import ctxagent  # noqa: E402  (the agent's own TLS context, view parsing and version)
from ctxd.memory import TRIM_INTERVAL, settle_heap  # noqa: E402

REQUEST_TIMEOUT = ctxagent.REQUEST_TIMEOUT
# asyncio's TLS transport gives every connection a 256 KiB receive buffer, zeroed when the
# connection is made, and asks OpenSSL for that much at each read: for 10,000 simulated
# nodes that is 2.5 GB and, in a storm, a tenth of the load generator's CPU spent clearing
# memory while the broker waits for it. 32 KiB holds two TLS records (the agent's http.client
# reads in 8 KiB); larger answers (a big view) take more reads.
asyncio.sslproto.SSLProtocol.max_size = 32 * 1024
# Seconds a connection attempt may take beyond the handshake's own timeout (SimAgent.connect).
HANDSHAKE_MARGIN = 10.0
# ctxagent's retry back-off (Agent.call, constants of the same names): pause uniform in
# [delay/2, delay], delay doubling from RETRY_FIRST up to RETRY_MAX. Every retry site here
# and in floor.py uses them.
RETRY_FIRST = 0.25
RETRY_MAX = 30.0
USER_AGENT = "ctxagent/" + ctxagent.__version__
CLK_TCK = os.sysconf("SC_CLK_TCK")

# A log tail of the size a successful ctxagent run sends with its ok report (~12 lines).
LOG_TAIL = "".join("2025-01-01T00:00:%02dZ INFO simulated ctxagent log line %d of a successful run\n" % (i, i)
                   for i in range(12))


# ---------------------------------------------------------------------------
# Measurements

class Stats:
    """Per-run counters; latencies of requests that do not wait (see README)."""

    def __init__(self) -> None:
        self.latencies: List[float] = []
        self.requests = 0
        self.response_bytes = 0
        self.request_bytes = 0
        self.retries = 0
        self.connections = 0            # TLS connections opened (= full handshakes)
        self.reconnects = 0             # of which a node's second and later ones (server closed, or retry)
        self.slow_connects = 0          # TCP + TLS set-up over 1 s (SYN retransmits, backlog)
        self.listen_overflows = 0       # kernel ListenOverflows during the run (SYNs dropped: full backlog)
        self.status: Dict[int, int] = {}
        self.views_200 = 0
        self.views_unchanged = 0        # a 200 view whose body equals the node's previous one
        self.told = 0                   # reports of why a node waits (contextualizing, with a message)
        self.first_enroll: Optional[float] = None
        self.last_ok: Optional[float] = None
        self.failures: List[str] = []

    def percentile(self, p: float) -> float:
        if not self.latencies:
            return float("nan")
        data = sorted(self.latencies)
        return data[min(len(data) - 1, int(round(p / 100.0 * (len(data) - 1))))]


def _is_waiting(method: str, path: str) -> bool:
    """A long-poll that may legitimately wait: a view request with since >= 0 and wait > 0."""
    if method != "GET" or "/view?" not in path:
        return False
    query = dict(p.split("=", 1) for p in path.split("?", 1)[1].split("&") if "=" in p)
    return int(query.get("since", "-1")) >= 0 and int(query.get("wait", "0")) > 0


def listen_overflows() -> int:
    """The kernel's TcpExt ListenOverflows counter (all sockets; on an otherwise idle loopback, ours)."""
    try:
        with open("/proc/net/netstat") as f:
            lines = [line.split() for line in f if line.startswith("TcpExt:")]
        return int(dict(zip(lines[0], lines[1]))["ListenOverflows"])
    except (OSError, KeyError, IndexError, ValueError):
        return -1


def terminate(popen: "subprocess.Popen[bytes]", timeout: float) -> None:
    """SIGTERM a server process (it cleans up), SIGKILL it if it is not gone in TIMEOUT s."""
    if popen.poll() is None:
        popen.send_signal(signal.SIGTERM)
        try:
            popen.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            popen.kill()
            popen.wait()


class Proc:
    """Figures of a server process from /proc."""

    def __init__(self, pid: int) -> None:
        self.pid = pid

    def cpu_seconds(self) -> float:
        with open("/proc/%d/stat" % self.pid) as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / CLK_TCK   # utime + stime

    def status_kib(self, key: str) -> int:
        with open("/proc/%d/status" % self.pid) as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
        return 0

    def io(self) -> Dict[str, int]:
        try:
            with open("/proc/%d/io" % self.pid) as f:
                return {k: int(v) for k, v in (line.split(":") for line in f)}
        except OSError:
            return {}


# ---------------------------------------------------------------------------
# One simulated agent

class Retry(Exception):
    pass


class NoResponse(ConnectionError):
    """A request's connection ended (EOF, reset, broken pipe) before any byte of a response."""


def backoff_pause(delay: float, remaining: float) -> float:
    """ctxagent's pause before a retry: jittered in [DELAY/2, DELAY], never past the deadline."""
    return max(0.0, min(remaining, random.uniform(delay / 2, delay)))


class SimAgent:
    """The requests of ctxagent.py's Agent.run, over asyncio, on one keep-alive TLS connection.

    The connection is opened by the first request and kept in the object for the next ones;
    :meth:`run` closes it when the node is done. ``record`` (a list) receives (method, path,
    token, body bytes, status, response body, whether the request opened a connection) for
    every exchange, in order: the floor replays it, the protocol test compares it.
    """

    def __init__(self, bootstrap: Dict[str, Any], tls: Optional[ssl.SSLContext], stats: Stats, n: int,
                 poll_wait: int = ctxagent.POLL_WAIT, record: Optional[list] = None, floor: bool = False,
                 deadline: float = 1800.0) -> None:
        url = bootstrap["url"]
        rest = url.split("://", 1)[1]
        hostport, _, prefix = rest.partition("/")
        self.host, _, port = hostport.rpartition(":")
        self.host = self.host.strip("[]")
        self.port = int(port) if port else 443
        self.hostport = hostport
        self.prefix = ("/" + prefix).rstrip("/") if prefix else ""
        self.bootstrap, self.tls, self.stats, self.n = bootstrap, tls, stats, n
        self.poll_wait, self.record, self.floor = poll_wait, record, floor
        self.deadline = time.monotonic() + deadline
        self.node: Optional[Dict[str, Any]] = None
        self.last_view: Optional[bytes] = None
        self.view: Optional[Dict[str, Any]] = None
        self.connection: Optional[Tuple[asyncio.StreamReader, asyncio.StreamWriter]] = None
        self.connections = 0       # TLS connections this node opened
        # Each simulated VM connects from an address of its own (127.1.x.y, all local on
        # Linux), as real VMs do: ctxd lets one address hold at most half its connections.
        self.source = ("127.1.%d.%d" % (n // 250 % 256, n % 250 + 1), 0) if self.host == "127.0.0.1" else None
        self.opened = False        # whether the last exchange opened a connection

    # -- the connection, as http.client's persistent HTTPSConnection keeps it ------------
    async def connect(self, timeout: float) -> Tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        """Open the node's connection (TCP + a full TLS handshake) and keep it."""
        self.close()
        start = time.monotonic()
        # The TLS handshake ends by its own timeout, never by cancellation: Python 3.11's
        # asyncio can leave a task cancelled in the middle of a handshake pending for good (a
        # 10,000-node storm had a few dozen nodes hang so). wait_for bounds the TCP connect.
        tls = {"ssl": self.tls, "server_hostname": self.host, "ssl_handshake_timeout": timeout} if self.tls else {}
        self.connection = await asyncio.wait_for(
            asyncio.open_connection(self.host, self.port, local_addr=self.source, **tls), timeout + HANDSHAKE_MARGIN)
        if time.monotonic() - start > 1.0:
            self.stats.slow_connects += 1
        self.stats.connections += 1
        if self.connections:
            self.stats.reconnects += 1
        self.connections += 1
        self.opened = True
        return self.connection

    def close(self) -> None:
        """Drop the connection, if any (http.client closes the socket without close_notify)."""
        if self.connection is not None:
            self.connection[1].transport.abort()
            self.connection = None

    def _usable(self) -> bool:
        """The kept connection, unless the server is already known to have closed it."""
        if self.connection is None:
            return False
        reader, writer = self.connection
        return not (reader.at_eof() or reader.exception() is not None or writer.transport.is_closing())

    # -- HTTP, as http.client sends it ---------------------------------------------------
    def request_bytes(self, method: str, path: str, token: Optional[str], data: Optional[bytes],
                      extra: Tuple[Tuple[str, str], ...] = ()) -> bytes:
        head = ["%s %s%s HTTP/1.1" % (method, self.prefix, path), "Host: " + self.hostport,
                "Accept-Encoding: identity"]
        if data is not None:
            head.append("Content-Length: %d" % len(data))
        head.append("User-Agent: " + USER_AGENT)
        if data is not None:
            head.append("Content-Type: application/json")
        if token is not None:
            head.append("Authorization: Bearer " + token)
        head.extend("%s: %s" % kv for kv in extra)
        return ("\r\n".join(head) + "\r\n\r\n").encode("latin-1") + (data or b"")

    async def exchange(self, method: str, path: str, token: Optional[str], data: Optional[bytes],
                       timeout: float, extra: Tuple[Tuple[str, str], ...] = ()) -> Tuple[int, bytes]:
        """One request and its response on the node's connection (opened if there is none).

        A kept connection that the server closed (seen before sending, or as EOF, reset or
        broken pipe before any response byte) is replaced and the request sent again, once
        and at once, as ctxagent does: that is a reconnect, not a retry. Any other failure
        drops the connection and propagates (the caller retries with backoff).
        """
        request = self.request_bytes(method, path, token, data, extra)
        start = time.monotonic()
        self.opened = False
        reused = self._usable()
        try:
            if not reused:
                await self.connect(timeout)
            try:
                status, raw, size, keep = await self._send(request, method, timeout)
            except NoResponse:
                if not reused:
                    raise
                await self.connect(timeout)
                status, raw, size, keep = await self._send(request, method, timeout)
        except BaseException:
            self.close()
            raise
        if not keep:
            self.close()
        elapsed = time.monotonic() - start
        st = self.stats
        st.requests += 1
        st.request_bytes += len(request)
        st.response_bytes += size
        st.status[status] = st.status.get(status, 0) + 1
        if not _is_waiting(method, path):
            st.latencies.append(elapsed)
        return status, raw

    async def _send(self, request: bytes, method: str, timeout: float) -> Tuple[int, bytes, int, bool]:
        assert self.connection is not None
        return await asyncio.wait_for(self._roundtrip(*self.connection, request, method), timeout)

    async def _roundtrip(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, request: bytes,
                         method: str) -> Tuple[int, bytes, int, bool]:
        try:
            writer.write(request)
            await writer.drain()
            first = await reader.readline()
        except ssl.SSLCertVerificationError:
            raise
        except (ConnectionError, ssl.SSLError) as exc:
            raise NoResponse("%s before a response: %s" % (type(exc).__name__, exc)) from exc
        if not first:
            raise NoResponse("connection closed before a response")
        return await self._response(reader, method, first)

    @staticmethod
    async def _field_lines(reader: asyncio.StreamReader) -> Tuple[List[bytes], int]:
        """Header (or trailer) lines up to the empty line that ends them, and their size in bytes."""
        lines, size = [], 0
        while True:
            line = await reader.readline()
            size += len(line)
            if line in (b"\r\n", b"\n"):
                return lines, size
            if not line:
                raise asyncio.IncompleteReadError(b"", None)
            lines.append(line)

    @staticmethod
    async def _response(reader: asyncio.StreamReader, method: str, line: bytes) -> Tuple[int, bytes, int, bool]:
        """(status, body, bytes received, whether the connection stays open), framed exactly:
        the next response on the connection starts right after this one."""
        size = len(line)
        version, status_text = line.split()[:2]
        status = int(status_text)
        fields, length = await SimAgent._field_lines(reader)
        size += length
        headers: Dict[str, str] = {}
        for field in fields:
            name, _, value = field.decode("latin-1").partition(":")
            headers[name.strip().lower()] = value.strip()
        tokens = {t.strip().lower() for t in headers.get("connection", "").split(",")}
        keep = "close" not in tokens and (version != b"HTTP/1.0" or "keep-alive" in tokens)
        if status in (204, 304) or 100 <= status < 200 or method == "HEAD":
            raw = b""
        elif "chunked" in headers.get("transfer-encoding", "").lower():
            parts = []
            while True:
                line = await reader.readline()
                size += len(line)
                length = int(line.split(b";")[0], 16)
                if length == 0:
                    size += (await SimAgent._field_lines(reader))[1]   # trailers
                    break
                chunk = await reader.readexactly(length + 2)
                size += len(chunk)
                parts.append(chunk[:-2])
            raw = b"".join(parts)
        elif "content-length" in headers:
            raw = await reader.readexactly(int(headers["content-length"]))
            size += len(raw)
        else:   # delimited by the end of the connection
            raw = await reader.read()
            size += len(raw)
            keep = False
        return status, raw, size, keep

    async def call(self, method: str, path: str, token: Optional[str] = None, body: Any = None,
                   timeout: float = REQUEST_TIMEOUT) -> Tuple[int, bytes]:
        """ctxagent's Agent.call: connection errors and 5xx retried with backoff until the deadline."""
        data = json.dumps(body).encode("utf-8") if body is not None else None
        delay = RETRY_FIRST
        while True:
            try:
                status, raw = await self.exchange(method, path, token, data, timeout)
                if self.record is not None:
                    self.record.append((method, path, token, data, status, raw, self.opened))
                if status < 500:
                    return status, raw
            except ssl.SSLCertVerificationError:
                raise
            except (OSError, asyncio.TimeoutError, asyncio.IncompleteReadError, ValueError, IndexError):
                pass
            self.stats.retries += 1
            remaining = self.deadline - time.monotonic()
            if remaining <= 0:
                raise Retry("%s %s: out of time" % (method, path.split("?")[0]))
            await asyncio.sleep(backoff_pause(delay, remaining))
            delay = min(delay * 2, RETRY_MAX)

    # -- the agent's run -----------------------------------------------------------------
    def node_path(self, tail: str) -> str:
        return "/v1/contexts/%(context_id)s/nodes/%(node_id)s/" % self.node + tail

    async def run(self) -> None:
        """Enroll, long-poll until the view is complete, report ok; then close the connection."""
        try:
            if self.stats.first_enroll is None:
                self.stats.first_enroll = time.monotonic()
            progress = await self.enroll()
            self.view = await self.poll_view(progress=progress)
            await self.report("ok")
            self.stats.last_ok = time.monotonic()
        finally:
            self.close()

    async def enroll(self) -> Optional[Tuple[int, bool, Tuple[str, ...]]]:
        """POST enroll with the join token: the broker answers with the node's credential and
        where its view stands (ctxagent.reply_progress), and puts the node in state contextualizing."""
        b = self.bootstrap
        body = {"instance_key": instance_key(self.n), "identity": identity(self.n)}
        status, raw = await self.call("POST", "/v1/contexts/%s/enroll" % b["context_id"], b["join_token"], body)
        if status not in (200, 201):
            raise RuntimeError("enrollment: HTTP %d %r" % (status, raw[:200]))
        reply = json.loads(raw)
        self.node = {"context_id": b["context_id"], "node_id": reply["node_id"], "node_token": reply["node_token"]}
        return ctxagent.reply_progress(reply, "enrollment reply")

    async def report(self, state: str, message: Optional[str] = None) -> None:
        body = {"state": state}
        if message is not None:
            body["message"] = message
        if state == "ok":
            body["log_tail"] = LOG_TAIL
        status, raw = await self.call("POST", self.node_path("report"), self.node["node_token"], body)
        if status != 200:
            raise RuntimeError("report %s: HTTP %d %r" % (state, status, raw[:200]))

    async def poll_view(self, until_complete: bool = True, progress: Optional[Tuple[int, bool, Tuple[str, ...]]] = None,
                        on_view: Optional[Callable[[Dict[str, Any]], None]] = None) -> Dict[str, Any]:
        """ctxagent's Agent.poll_view: from the enrollment's PROGRESS, long-poll until the view is
        complete (never, without UNTIL_COMPLETE; ON_VIEW sees each view), telling the broker why it
        waits as the agent does (a contextualizing report after WAIT_REPORT_AFTER seconds, then when
        the reason changes, at most every WAIT_REPORT_EVERY)."""
        since, waiting = -1, None
        if progress is not None and not progress[1]:
            since, waiting = progress[0], progress[2]
        told, due = None, time.monotonic() + ctxagent.WAIT_REPORT_AFTER
        while True:
            now = time.monotonic()
            reason = "; ".join(waiting or ()) or "(nothing named)"
            if waiting is not None and reason != told and now >= due:
                await self.report("contextualizing", "waiting: " + reason)
                told, due = reason, now + ctxagent.WAIT_REPORT_EVERY
                self.stats.told += 1
            remaining = self.deadline - now
            if remaining <= 0:
                raise Retry("no complete view in time")
            wait = max(0, min(self.poll_wait, int(remaining),
                              ctxagent.MAX_WAIT if waiting is None or reason == told else int(0.99 + due - now)))
            status, raw = await self.call("GET", self.node_path("view?since=%d&wait=%d" % (since, wait)),
                                          self.node["node_token"], timeout=wait + REQUEST_TIMEOUT)
            if status == 304:
                continue
            if status != 200:
                raise RuntimeError("view: HTTP %d %r" % (status, raw[:200]))
            self.stats.views_200 += 1
            if raw == self.last_view:
                self.stats.views_unchanged += 1
            self.last_view = raw
            view = json.loads(raw)
            if on_view is not None:
                on_view(view)
            revision, complete, waiting = ctxagent.view_progress(view)
            if complete and until_complete:
                return view
            if revision <= since:
                await asyncio.sleep(1)
            since = revision


def instance_key(n: int) -> str:
    return "bench-instance-%010d-%s" % (n, "k" * 16)


def _key(kind: str, blob_len: int, n: int) -> str:
    name = kind.encode("ascii")
    blob = len(name).to_bytes(4, "big") + name
    blob += random.Random(n * 7 + blob_len).getrandbits(8 * (blob_len - len(blob))).to_bytes(blob_len - len(blob), "big")
    return "%s %s" % (kind, base64.b64encode(blob).decode("ascii"))


def identity(n: int) -> Dict[str, Any]:
    """A unique, realistic identity: 10.x address, hostname, three SSH host keys of real sizes,
    and the interfaces ctxagent reports (discover_interfaces: no lo, no loopback or link-local
    address)."""
    ip = "10.%d.%d.%d" % (n >> 16 & 255, n >> 8 & 255, n & 255)
    return {"hostname": "node%d" % n, "fqdn": "node%d.cluster.bench" % n, "primary_ip": ip,
            "interfaces": [{"name": "eth0", "ipv4": [ip], "ipv6": []}],
            "ssh_host_keys": [_key("ssh-ed25519", 51, n), _key("ecdsa-sha2-nistp256", 104, n),
                              _key("ssh-rsa", 407, n)]}


# ---------------------------------------------------------------------------
# The broker process and the admin

def this_checkout() -> Dict[str, str]:
    """The environment for a broker process of this checkout's ctxd, not whichever one the
    virtualenv has installed: an editable install of another checkout would otherwise win
    (twistd does not look in its working directory), and a before/after comparison would
    run the same broker twice."""
    return dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [ROOT, os.environ.get("PYTHONPATH")])))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class BrokerProcess:
    """A real `twistd -n --pidfile= ctxd` on a free loopback port with a temporary state dir."""

    LIMITS = ["--enroll-rate-per-source", "100000000", "--enroll-rate-per-token", "100000000",
              "--max-connections-per-peer", "1000000", "--max-connections", "1000000",
              "--max-nodes-per-context", "1000000"]

    def __init__(self, extra: Optional[List[str]] = None, backlog: Optional[int] = None) -> None:
        self.state = tempfile.mkdtemp(prefix="ctxd-loadgen-")
        self.port = free_port()
        self.url = "https://127.0.0.1:%d" % self.port
        twistd = os.path.join(os.path.dirname(sys.executable), "twistd")
        self.log_path = self.state + ".log"
        log = open(self.log_path, "wb")
        self.popen = subprocess.Popen(
            [twistd, "-n", "--pidfile=", "ctxd", "--state-dir", self.state,
             "--listen", "ssl:%d:interface=127.0.0.1%s" % (self.port, ":backlog=%d" % backlog if backlog else ""),
             "--public-url", self.url, "--metrics-listen", "none"]
            + self.LIMITS + (extra or []),
            env=this_checkout(),
            stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
        log.close()
        self.proc = Proc(self.popen.pid)
        self.ca_path = os.path.join(self.state, "tls", "ca.pem")
        deadline = time.monotonic() + 30
        while True:
            try:
                if self.admin("GET", "/healthz", token=None)[0] == 200:
                    break
            except (OSError, ssl.SSLError, http.client.HTTPException):
                pass
            if time.monotonic() > deadline or self.popen.poll() is not None:
                self.stop()
                raise SystemExit("broker did not start; see " + self.log_path)
            time.sleep(0.1)
        with open(os.path.join(self.state, "admin.token")) as f:
            self.token = f.read().strip()
        with open(self.ca_path) as f:
            self.ca_pem = f.read()

    def admin(self, method: str, path: str, body: Any = None, token: Any = "") -> Tuple[int, Any]:
        context = ssl.create_default_context(cafile=self.ca_path)
        conn = http.client.HTTPSConnection("127.0.0.1", self.port, context=context, timeout=60)
        headers = {}
        if token is not None:
            headers["Authorization"] = "Bearer " + (token or self.token)
        data = None
        if body is not None:
            data = json.dumps(body).encode()
            headers["Content-Type"] = "application/json"
        try:
            conn.request(method, path, body=data, headers=headers)
            reply = conn.getresponse()
            raw = reply.read()
        finally:
            conn.close()
        return reply.status, (json.loads(raw) if raw else None)

    def create(self, body: Dict[str, Any]) -> Tuple[str, Dict[str, Dict[str, Any]]]:
        status, created = self.admin("POST", "/v1/contexts", body)
        if status != 201:
            raise SystemExit("create: HTTP %d %r" % (status, created))
        return created["context"]["id"], created["bootstraps"]

    def stop(self) -> None:
        terminate(self.popen, 60)

    def cleanup(self) -> None:
        self.stop()
        shutil.rmtree(self.state, ignore_errors=True)
        try:
            os.unlink(self.log_path)
        except OSError:
            pass


# ---------------------------------------------------------------------------
# Scenarios

def storm_cluster(n: int) -> Dict[str, Any]:
    return {"name": "storm", "groups": [
        {"name": "head", "quantity": 1, "source_check": False, "provides": ["head"], "requires": [{"role": "compute"}]},
        {"name": "compute", "quantity": n, "source_check": False, "provides": ["compute"], "requires": [{"role": "head", "ready": True}]},
    ]}


def node_plan(bootstraps: Dict[str, Dict[str, Any]], n_compute: int) -> List[Tuple[int, Dict[str, Any]]]:
    """(node number, bootstrap): the head is node 1, computes 2..N+1."""
    return [(1, bootstraps["head"])] + [(i + 2, bootstraps["compute"]) for i in range(n_compute)]


async def run_agents(agents: List[SimAgent]) -> List[str]:
    results = await asyncio.gather(*(a.run() for a in agents), return_exceptions=True)
    return ["node %d: %s: %s" % (a.n, type(r).__name__, r) for a, r in zip(agents, results) if isinstance(r, BaseException)]


def fmt_row(cols: List[Tuple[str, str]]) -> str:
    return " | ".join(v for _, v in cols)


def print_table(cols: List[Tuple[str, str]], header: bool = True) -> None:
    if header:
        print("| " + " | ".join(k for k, _ in cols) + " |")
        print("|" + "|".join("---" for _ in cols) + "|")
    print("| " + fmt_row(cols) + " |")
    sys.stdout.flush()


def storm_columns(label: str, n: int, stats: Stats, cpu: float, hwm_kib: int, wall: float) -> List[Tuple[str, str]]:
    return [("server", label), ("N", str(n)), ("all ok (s)", "%.2f" % wall),
            ("requests", str(stats.requests)),
            ("p50 (ms)", "%.1f" % (1000 * stats.percentile(50))), ("p99 (ms)", "%.1f" % (1000 * stats.percentile(99))),
            ("CPU (s)", "%.2f" % cpu), ("peak RSS (MiB)", "%.1f" % (hwm_kib / 1024.0)),
            ("bytes sent", str(stats.response_bytes)), ("TLS connections", str(stats.connections))]


def storm(n: int, poll_wait: int = ctxagent.POLL_WAIT, record: Optional[Dict[int, list]] = None, header: bool = True,
          deadline: float = 1800.0, backlog: Optional[int] = None) -> Dict[str, Any]:
    """Scenario 1 against a real broker: one row; returns the figures (and fills RECORD per node)."""
    broker = BrokerProcess(backlog=backlog)
    try:
        cid, bootstraps = broker.create(storm_cluster(n))
        tls = ctxagent.make_tls_context(broker.ca_pem)
        stats = Stats()
        agents = [SimAgent(b, tls, stats, i, poll_wait, record.setdefault(i, []) if record is not None else None,
                           deadline=deadline) for i, b in node_plan(bootstraps, n)]
        cpu0, overflows0 = broker.proc.cpu_seconds(), listen_overflows()
        rss0, io0 = broker.proc.status_kib("VmRSS"), broker.proc.io()
        failures = asyncio.run(run_agents(agents))
        cpu = broker.proc.cpu_seconds() - cpu0
        stats.listen_overflows = listen_overflows() - overflows0
        hwm = broker.proc.status_kib("VmHWM")
        io1 = broker.proc.io()
        print("  broker RSS before the storm %.1f MiB; /proc io wchar during it %d bytes"
              " (journal and log writes: socket send() is not counted there)"
              % (rss0 / 1024.0, io1.get("wchar", 0) - io0.get("wchar", 0)), file=sys.stderr)
        status, summary = broker.admin("GET", "/v1/contexts/" + cid)
        all_ok = status == 200 and summary["all_ok"]
    finally:
        broker.cleanup()
    wall = (stats.last_ok or float("nan")) - (stats.first_enroll or float("nan"))
    print_table(storm_columns("ctxd", n, stats, cpu, hwm, wall), header)
    _diagnostics(stats, failures, all_ok)
    return {"wall": wall, "cpu": cpu, "hwm_kib": hwm, "stats": stats, "failures": failures, "all_ok": all_ok}


def _diagnostics(stats: Stats, failures: List[str], all_ok: Optional[bool]) -> None:
    t = os.times()
    print("  statuses %s, retries %d, TLS connections %d (reconnects %d: full handshakes, where ctxagent"
          " resumes its session), slow connects %d, listen overflows %d, request bytes %d, "
          "load generator CPU so far %.2f s%s"
          % (dict(sorted(stats.status.items())), stats.retries, stats.connections, stats.reconnects,
             stats.slow_connects, stats.listen_overflows, stats.request_bytes,
             t.user + t.system,
             "" if all_ok is None else ", broker says all_ok=%s" % all_ok), file=sys.stderr)
    for line in failures[:10]:
        print("  FAILED " + line, file=sys.stderr)
    if failures:
        print("  %d nodes failed" % len(failures), file=sys.stderr)


def allids(n: int, poll_wait: int = ctxagent.POLL_WAIT, deadline: float = 1800.0, backlog: Optional[int] = None) -> Dict[str, Any]:
    """Scenario 2: N nodes of one group with all_identities, each needing the others (role of its own group).

    Every enrollment changes every node's view (O(N^2) bytes). Counts views sent with a body
    identical to the one that node already had (must be 0: conditional requests by revision),
    then asks every node once more with since=its revision&wait=0 (must be 304).
    """
    broker = BrokerProcess(backlog=backlog)
    try:
        cid, bootstraps = broker.create({"name": "allids", "groups": [
            {"name": "all", "quantity": n, "source_check": False, "provides": ["peer"], "requires": [{"role": "peer"}],
             "all_identities": True}]})
        tls = ctxagent.make_tls_context(broker.ca_pem)
        stats = Stats()
        agents = [SimAgent(bootstraps["all"], tls, stats, i + 1, poll_wait, deadline=deadline) for i in range(n)]
        cpu0 = broker.proc.cpu_seconds()
        failures = asyncio.run(run_agents(agents))
        cpu = broker.proc.cpu_seconds() - cpu0
        wall = (stats.last_ok or float("nan")) - (stats.first_enroll or float("nan"))
        connections = stats.connections   # the runs' (each re-check below opens one more)

        async def recheck() -> int:
            async def one(a: SimAgent) -> int:
                if a.node is None:
                    return 0
                a.connections = 0   # a new run of the node: its connection is a first one, not a reconnect
                try:
                    # the latest view (the ok report moved this node's state), then a conditional request
                    status, raw = await a.call("GET", a.node_path("view?since=-1&wait=0"), a.node["node_token"])
                    revision = json.loads(raw)["revision"]
                    status, _ = await a.call("GET", a.node_path("view?since=%d&wait=0" % revision),
                                             a.node["node_token"])
                finally:
                    a.close()
                return 1 if status == 200 else 0
            return sum(await asyncio.gather(*(one(a) for a in agents)))
        resent_after = asyncio.run(recheck())
        hwm = broker.proc.status_kib("VmHWM")
    finally:
        broker.cleanup()
    cols = [("N", str(n)), ("all ok (s)", "%.2f" % wall), ("views 200", str(stats.views_200)),
            ("views unchanged resent", str(stats.views_unchanged)), ("re-asked resent", str(resent_after)),
            ("p50 (ms)", "%.1f" % (1000 * stats.percentile(50))), ("p99 (ms)", "%.1f" % (1000 * stats.percentile(99))),
            ("CPU (s)", "%.2f" % cpu), ("peak RSS (MiB)", "%.1f" % (hwm / 1024.0)),
            ("bytes sent", str(stats.response_bytes)), ("TLS connections", str(connections))]
    print_table(cols)
    _diagnostics(stats, failures, None)
    return {"views_unchanged": stats.views_unchanged, "resent_after": resent_after, "failures": failures}


class _IdleRun:
    """The idle scenario's nodes and its measurement (see :func:`idle`)."""

    def __init__(self, broker: "BrokerProcess", cid: str, agents: List["SimAgent"], window: float,
                 settle: float) -> None:
        self.broker, self.cid, self.agents, self.window, self.settle = broker, cid, agents, window, settle
        self.woken: List[int] = []
        self.seen: set = set()
        self.changed: Optional[float] = None
        self.samples: List[Tuple[float, float, int]] = []

    async def node(self, a: "SimAgent") -> None:
        """One node as ctxagent runs (on one keep-alive connection), noting the views after the change."""
        def on_view(view: Dict[str, Any]) -> None:
            if self.changed is not None:
                self.woken.append(a.n)

        try:
            progress = await a.enroll()
            self.seen.add(a.n)   # it knows where its view stands: waiting
            await a.poll_view(until_complete=False, progress=progress, on_view=on_view)
        finally:
            a.close()

    async def main(self) -> int:
        """Start the nodes, measure the idle window, make the head-only change; the idle RSS."""
        tasks = [asyncio.create_task(self.node(a)) for a in self.agents]
        await self._all_waiting(tasks)
        # Each node says once why it waits, WAIT_REPORT_AFTER seconds after it enrolled (as the
        # agent does): the window starts after the last of these, when the nodes only re-poll.
        deadline = time.monotonic() + ctxagent.WAIT_REPORT_AFTER + 60
        while self.agents[0].stats.told < len(self.agents) and time.monotonic() < deadline:
            await asyncio.sleep(0.5)
        await asyncio.sleep(min(2.0, self.window / 4))
        rss_loaded = self.broker.proc.status_kib("VmRSS")
        proc = self.broker.proc
        t0, cpu0 = time.monotonic(), proc.cpu_seconds()
        end = t0 + self.window
        while time.monotonic() < end:
            await asyncio.sleep(min(10.0, max(0.0, end - time.monotonic())))
            self.samples.append((time.monotonic() - t0, proc.cpu_seconds() - cpu0, proc.status_kib("VmRSS")))
        self.changed = time.monotonic()
        status, _ = await asyncio.to_thread(self.broker.admin, "PUT", "/v1/contexts/%s/data/headonly" % self.cid,
                                            {"values": [{"b64": "aGVhZAo="}]})
        assert status == 200, status
        await asyncio.sleep(self.settle)
        for t in tasks:
            t.cancel()
        # Python 3.11's asyncio can leave a task cancelled in the middle of a TLS handshake
        # pending for good (seen at 10,000 nodes: the run never ended): wait a bounded time.
        _, pending = await asyncio.wait(tasks, timeout=15)
        if pending:
            print("  idle: %d simulated nodes did not stop when cancelled (dropped)" % len(pending),
                  file=sys.stderr)
        for a in self.agents:
            a.close()
        return rss_loaded

    async def _all_waiting(self, tasks: List["asyncio.Task[None]"]) -> None:
        """Until every node enrolled and received its first view (the broker's summary says so)."""
        total = len(self.agents)
        started, last_said = time.monotonic(), 0.0
        while True:
            await asyncio.sleep(0.5)
            dead = [t for t in tasks if t.done()]
            if dead:   # a node gave up (e.g. out of time): the idle figures would be wrong
                raise RuntimeError("%d simulated node(s) stopped: %r" % (len(dead), dead[0].exception()))
            if len(self.seen) < total:
                if time.monotonic() - last_said >= 10:
                    last_said = time.monotonic()
                    print("  idle: %d of %d nodes enrolled and waiting after %.0f s"
                          % (len(self.seen), total, last_said - started), file=sys.stderr)
                continue
            s = await asyncio.to_thread(self.broker.admin, "GET", "/v1/contexts/" + self.cid)
            if s[1]["counts"]["enrolled"] == total:   # (enrolled nodes are contextualizing)
                return


def idle(n: int, window: float = 60.0, poll_wait: int = ctxagent.POLL_WAIT, settle: float = 2.0,
         backlog: Optional[int] = None, header: bool = True, script: Optional[list] = None) -> Dict[str, Any]:
    """Scenario 3: 1 head + N compute enrolled and long-polling an incomplete context.

    The context is open for injection (unlocked, so nothing is complete) and the head's group
    requires a data item that has no value yet. Figures: broker RSS of the empty daemon, after
    all enrolled, and CPU used over an idle WINDOW; then one change that concerns only the head
    (PUT of the data item only the head requires): how many long-polls return a view within
    SETTLE seconds (must be 1, the head's). SCRIPT (a list) receives a compute node's exchanges
    before it waited (its enrollment and first view), for the floor to make the same.
    """
    broker = BrokerProcess(backlog=backlog)
    try:
        if window >= TRIM_INTERVAL:   # (a shorter window is a smoke run: its figures mean nothing)
            time.sleep(TRIM_INTERVAL + 1)   # the empty daemon as it stays: settled and trimmed once
        rss_empty = broker.proc.status_kib("VmRSS")
        cid, bootstraps = broker.create({
            "name": "idle", "open_for_injection": True, "data": {"headonly": []},
            "groups": [
                {"name": "head", "quantity": 1, "source_check": False, "provides": ["head"], "requires": [{"role": "compute"}],
                 "data": ["headonly"]},
                {"name": "compute", "quantity": n, "source_check": False, "provides": ["compute"],
                 "requires": [{"role": "head", "ready": True}]}]})
        tls = ctxagent.make_tls_context(broker.ca_pem)
        stats = Stats()
        recorded: list = []
        run = _IdleRun(broker, cid, [SimAgent(b, tls, stats, i, poll_wait, recorded if i == 2 else None)
                                     for i, b in node_plan(bootstraps, n)], window, settle)
        loop = asyncio.new_event_loop()
        try:
            rss_loaded = loop.run_until_complete(run.main())
        finally:
            loop.set_exception_handler(lambda loop, context: None)   # no "destroyed but pending" noise
            loop.close()
        hwm = broker.proc.status_kib("VmHWM")
    finally:
        broker.cleanup()
    if script is not None:
        # What node 2 did before it waited for good: its enrollment, then up to its report of
        # why it waits (if it made one); not a 503 retried.
        kept = [r for r in recorded if r[4] < 500]
        told = [i for i, r in enumerate(kept) if r[0] == "POST" and r[1].endswith("/report")]
        script.extend(kept[:told[0] + 1] if told else kept[:2])
    samples, woken = run.samples, run.woken
    span, cpu_idle, _ = samples[-1] if samples else (window, float("nan"), 0)
    if samples:   # the broker returns freed heap pages now and then: the window's median
        rss_loaded = sorted(rss for _, _, rss in samples)[len(samples) // 2]
    per_node = (rss_loaded - rss_empty) * 1024.0 / (n + 1)
    cols = [("N", str(n + 1)), ("RSS empty (MiB)", "%.1f" % (rss_empty / 1024.0)),
            ("RSS idle (MiB)", "%.1f" % (rss_loaded / 1024.0)), ("RSS/node (KiB)", "%.2f" % (per_node / 1024.0)),
            ("peak RSS (MiB)", "%.1f" % (hwm / 1024.0)),
            ("idle CPU (s/min)", "%.3f" % (cpu_idle * 60.0 / span if span else float("nan"))),
            ("window (s)", "%.0f" % span), ("woken by head change", str(len(woken))),
            ("expected", "1"), ("TLS connections", str(stats.connections))]
    print_table(cols, header)
    print("  samples (s, CPU s, RSS KiB): %s; woken nodes %s" % (samples, sorted(woken)[:20]), file=sys.stderr)
    _diagnostics(stats, [], None)
    return {"woken": woken, "rss_empty": rss_empty, "rss_loaded": rss_loaded, "samples": samples}


def quiet_gc() -> None:
    """The generator's garbage collection tuned as ctxd's (ctxd.memory.settle_heap).

    One process simulates thousands of machines; with Python's default thresholds its
    full collections, walking every simulated node's state again and again, grew faster
    than N and took wall time that the server being measured (sharing the two cores)
    then appeared to take.
    """
    settle_heap()


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="scenario", required=True)
    for name in ("storm", "allids", "idle"):
        p = sub.add_parser(name)
        p.add_argument("--nodes", type=int, default=100, help="compute nodes (storm, idle) or nodes (allids)")
        p.add_argument("--runs", type=int, default=1, help="repeat (one row each)")
        p.add_argument("--poll-wait", type=int, default=ctxagent.POLL_WAIT, help="the agents' wait= (ctxagent's default)")
        p.add_argument("--backlog", type=int, help="listen backlog of the broker's endpoint [ctxd's --listen-backlog default]")
        if name == "idle":
            p.add_argument("--window", type=float, help="idle seconds sampled [the poll wait, at least 60]")
    args = parser.parse_args(argv)
    quiet_gc()
    # SIGTERM (e.g. from timeout(1)) unwinds, so the broker is stopped and its state removed.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    for run in range(args.runs):
        if args.scenario == "storm":
            result = storm(args.nodes, args.poll_wait, header=run == 0, backlog=args.backlog)
            ok = not result["failures"] and result["all_ok"]
        elif args.scenario == "allids":
            result = allids(args.nodes, args.poll_wait, backlog=args.backlog)
            ok = not result["failures"]
        else:
            result = idle(args.nodes, args.window or max(60.0, args.poll_wait), args.poll_wait, backlog=args.backlog,
                          header=run == 0)
            ok = True
        if not ok:
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
