"""What an anonymous client costs a real broker: no buffered body, and one address cannot take
every file descriptor."""

from __future__ import annotations

import re
import socket
import ssl
import time
from pathlib import Path
from typing import List

from .helpers import BrokerProcess, wait_until


def _tls(broker: BrokerProcess, source: str = "127.0.0.1") -> ssl.SSLSocket:
    context = ssl.create_default_context(cafile=str(broker.ca_path))
    raw = socket.create_connection(("127.0.0.1", broker.port), timeout=10, source_address=(source, 0))
    return context.wrap_socket(raw, server_hostname="127.0.0.1")


def _read_all(conn: ssl.SSLSocket) -> bytes:
    data = b""
    while True:
        try:
            chunk = conn.recv(65536)
        except (ssl.SSLError, ConnectionError):
            break
        if not chunk:
            break
        data += chunk
    return data


def test_anonymous_body_is_refused_before_it_is_sent(broker):
    """A POST announcing a 1 MiB body without a known credential is answered 401 from its headers
    alone - the client has not sent a byte of the body - and the connection is closed."""
    for authorization in (b"", b"Authorization: Bearer ctxd_dep_" + b"z" * 43 + b"\r\n"):
        conn = _tls(broker)
        conn.sendall(b"POST /v1/contexts HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     + authorization + b"Content-Length: 1048576\r\n\r\n")
        answer = _read_all(conn)
        conn.close()
        assert answer.startswith(b"HTTP/1.1 401 ") and b'"unauthorized"' in answer, answer


class LimitedBroker(BrokerProcess):
    """A broker started with a low open-file limit (soft 200, hard 400), as under a unit without
    LimitNOFILE."""

    def argv(self) -> List[str]:
        return ["prlimit", "--nofile=200:400", "--"] + super().argv()


def _open_files_limit(pid: int) -> int:
    text = Path("/proc/%d/limits" % pid).read_text()
    return int(re.search(r"^Max open files\s+(\d+)", text, re.M).group(1))


def test_one_address_cannot_exhaust_file_descriptors(tmp_path, diag):
    """ctxd raises its soft open-file limit to the hard one and keeps one address to half of what
    fits under it: 300 idle connections from one address do not stop /healthz for another."""
    broker = LimitedBroker(tmp_path / "broker")
    diag.add_file("broker log", broker.log_path, lines=100)
    held: List[socket.socket] = []
    try:
        broker.start()
        assert _open_files_limit(broker.proc.pid) == 400
        assert re.search(r"open files: limit 200 -> 400 \(hard 400\); connections at most 336 .* "
                         r"168 per address", broker.log()), broker.log()
        for _ in range(300):  # plain TCP, no handshake: each holds a descriptor if accepted
            held.append(socket.create_connection(("127.0.0.1", broker.port), timeout=10))
        wait_until(lambda: "connections at most" in broker.log(), 5, "the limits in the log")
        time.sleep(0.5)  # let the broker accept (and refuse) them all
        conn = _tls(broker, source="127.0.0.2")
        conn.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        assert _read_all(conn).startswith(b"HTTP/1.1 200 ")
        conn.close()
        fds = len(list(Path("/proc/%d/fd" % broker.proc.pid).iterdir()))
        assert fds < 400 - 32, fds
    finally:
        for s in held:
            s.close()
        broker.kill()


def test_audit_log_is_reopened_on_sighup(broker):
    """logrotate moves audit.log away and sends SIGHUP: the broker writes a new audit.log, the
    moved file keeps what came before, and the broker keeps serving."""
    import signal

    broker.ctxctl_ok("user", "add", "before-rotation")
    audit = broker.state_dir / "audit.log"
    rotated = audit.with_name("audit.log.1")
    audit.rename(rotated)
    broker.proc.send_signal(signal.SIGHUP)
    wait_until(audit.exists, 10, "a new audit.log after SIGHUP")
    broker.ctxctl_ok("user", "add", "after-rotation")
    assert '"add_user"' in rotated.read_text() and rotated.read_text().count("\n") == 1
    wait_until(lambda: audit.read_text().count("\n") == 1, 10, "the action in the new audit.log")
    assert oct(audit.stat().st_mode & 0o777) == "0o600"
