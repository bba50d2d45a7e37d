"""Large views from a real broker: streamed slice by slice (ctxd.api._BodyProducer) over
verified TLS, whole for a slow reader, and harmless when the reader goes away mid-body."""

from __future__ import annotations

import json
import socket
import ssl
import time

from .helpers import BrokerProcess

NODES = 30
def fat_keys(i):
    """Node I's own four large host keys: each view lists ~0.5 MB of identities."""
    return ["ssh-rsa %04d%d" % (i, k) + "A" * 3995 for k in range(4)]


def _connect(broker: BrokerProcess, rcvbuf: int = 0) -> ssl.SSLSocket:
    raw = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    if rcvbuf:
        raw.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)   # before connect: a small window
    raw.settimeout(30)
    raw.connect(("127.0.0.1", broker.port))
    context = ssl.create_default_context(cafile=str(broker.ca_path))
    return context.wrap_socket(raw, server_hostname="127.0.0.1")


def _send(conn: ssl.SSLSocket, method: str, path: str, token: str, body=None) -> None:
    data = json.dumps(body).encode() if body is not None else b""
    head = "%s %s HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer %s\r\nConnection: close\r\n" % (method, path, token)
    if body is not None:
        head += "Content-Type: application/json\r\nContent-Length: %d\r\n" % len(data)
    conn.sendall(head.encode() + b"\r\n" + data)


def _read_response(conn: ssl.SSLSocket, pause: float = 0.0, piece: int = 65536):
    raw = b""
    while b"\r\n\r\n" not in raw:
        more = conn.recv(piece)
        assert more, "connection closed before the end of the response head: %r" % raw[:200]
        raw += more
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = dict((k.strip().lower(), v.strip()) for k, _, v in (line.partition(":") for line in lines[1:]))
    length = int(headers["content-length"])
    while len(body) < length:
        more = conn.recv(piece)
        assert more, "connection closed %d bytes into a %d-byte body" % (len(body), length)
        body += more
        if pause:
            time.sleep(pause)
    return int(lines[0].split()[1]), headers, body


def _call(broker, method, path, token, body=None):
    conn = _connect(broker)
    try:
        _send(conn, method, path, token, body)
        status, _, raw = _read_response(conn)
    finally:
        conn.close()
    return status, json.loads(raw) if raw else None


def test_large_views_stream_whole_to_slow_readers_and_survive_early_close(tmp_path, diag):
    broker = BrokerProcess(tmp_path / "broker")
    diag.add_file("broker log", broker.log_path, lines=80)
    try:
        broker.start()
        admin = (broker.state_dir / "admin.token").read_text().strip()
        status, created = _call(broker, "POST", "/v1/contexts", admin, {
            "name": "fat", "groups": [{"name": "all", "quantity": NODES, "source_check": False, "provides": ["member"],
                                       "requires": [{"role": "member"}], "all_identities": True}]})
        assert status == 201, created
        cid = created["context"]["id"]
        join = created["bootstraps"]["all"]["join_token"]
        nodes = []
        for i in range(NODES):
            status, enrolled = _call(broker, "POST", "/v1/contexts/%s/enroll" % cid, join, {
                "instance_key": "large-view-instance-%04d" % i,
                "identity": {"hostname": "n%d" % i, "fqdn": "n%d.fat.test" % i, "primary_ip": "10.1.0.%d" % (i + 1),
                             "ssh_host_keys": fat_keys(i)}})
            assert status == 201, enrolled
            nodes.append(enrolled)

        def view_path(node):
            return "/v1/contexts/%s/nodes/%s/view" % (cid, node["node_id"])

        # A slow reader with a small receive window: the broker writes as it drains.
        slow = _connect(broker, rcvbuf=4096)
        try:
            _send(slow, "GET", view_path(nodes[0]), nodes[0]["node_token"])
            status, headers, body = _read_response(slow, pause=0.002, piece=4096)
        finally:
            slow.close()
        assert status == 200
        assert "transfer-encoding" not in headers
        assert len(body) > 512 * 1024
        view = json.loads(body)
        assert view["node_id"] == nodes[0]["node_id"] and view["complete"]
        assert sorted(ident["hostname"] for ident in view["all_identities"]) == sorted("n%d" % i for i in range(NODES))

        # A reader that goes away after the first bytes: nothing breaks, the next reads are whole.
        gone = _connect(broker, rcvbuf=4096)
        _send(gone, "GET", view_path(nodes[1]), nodes[1]["node_token"])
        assert gone.recv(4096).startswith(b"HTTP/1.1 200")
        gone.close()
        status, again = _call(broker, "GET", view_path(nodes[1]), nodes[1]["node_token"])
        assert status == 200 and len(again["all_identities"]) == NODES
        assert _call(broker, "GET", "/healthz", admin)[0] == 200
    finally:
        broker.stop()
    log = broker.log()
    assert "Traceback" not in log and "Unhandled" not in log, log[-3000:]
