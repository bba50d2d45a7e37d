"""Connection budget of a real broker: refused at accept, before any TLS handshake."""

from __future__ import annotations

import socket
import ssl

from .helpers import BrokerProcess


def _tls(broker: BrokerProcess) -> ssl.SSLSocket:
    context = ssl.create_default_context(cafile=str(broker.ca_path))
    raw = socket.create_connection(("127.0.0.1", broker.port), timeout=10)
    return context.wrap_socket(raw, server_hostname="127.0.0.1")


def _refused(broker: BrokerProcess) -> bool:
    """True if the broker closes a new connection without a TLS handshake."""
    try:
        conn = _tls(broker)
    except (ssl.SSLError, ConnectionError) as e:
        return "EOF" in str(e) or isinstance(e, ConnectionError)
    conn.close()
    return False


def test_per_address_budget_is_enforced_and_freed(tmp_path, diag):
    """With --max-connections-per-peer 2, a third connection from the address is closed at
    once; closing one of the two lets the next in. (Each is a full verified TLS session.)"""
    broker = BrokerProcess(tmp_path / "broker", extra_args=["--max-connections-per-peer", "2"])
    diag.add_file("broker log", broker.log_path, lines=100)
    try:
        broker.start()
        # The readiness probe's connection may still be closing: let it go first.
        first = _tls(broker)
        second = None
        for _ in range(50):
            try:
                second = _tls(broker)
                break
            except (ssl.SSLError, ConnectionError):
                continue
        assert second is not None
        for conn in (first, second):
            conn.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
            assert conn.recv(100).startswith(b"HTTP/1.1 200")
        assert _refused(broker)
        first.close()
        third = None
        for _ in range(50):  # the broker sees the close on its next reactor turn
            try:
                third = _tls(broker)
                break
            except (ssl.SSLError, ConnectionError):
                continue
        assert third is not None, "a freed slot was never reused"
        third.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        assert third.recv(100).startswith(b"HTTP/1.1 200")
        second.close()
        third.close()
    finally:
        broker.kill()
