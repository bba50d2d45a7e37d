"""The floor: the same TLS handshakes and requests as a ctxd join storm, answered by a minimal
Twisted HTTPS server with static bodies - what this stack can reach on this machine.

    python bench/floor.py --nodes N [--runs 3]      # scenario 1 on ctxd, then on the floor; ratio
    python bench/floor.py serve --port P             # the floor server alone (used by the above)

The storm runs first against a real `twistd ctxd` (bench/loadgen.py), recording every node's
exchanges in order. Then a floor server process starts (same TLS policy: ctxd.tlsserver's
server context, a generated P-256 CA and server certificate, TLSMemoryBIOFactory, epoll
reactor) and the load generator replays each node's recorded requests - same count, same
request bytes, one TLS connection per request, all nodes at once, each node's requests in
order - with one extra header, `X-Floor: STATUS LENGTH`, telling the server which status and
how many bytes of a preallocated body to answer (so response sizes match ctxd's too). The
floor never waits: its time is pure handshake + HTTP cost. Printed: one row per server and
the ctxd / floor ratio of each column.
"""

import argparse
import asyncio
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from typing import Any, Dict, List, Optional

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import loadgen  # noqa: E402
from loadgen import ROOT, Proc, SimAgent, Stats, free_port  # noqa: E402

def serve(port: int, tls_dir: str, blob_size: int, backlog: int) -> None:
    """Run the floor server (blocking) with a fresh P-256 CA and server certificate in TLS_DIR."""
    sys.path.insert(0, ROOT)
    from twisted.internet import reactor
    from twisted.web.resource import Resource
    from twisted.web.server import Site

    from ctxd import tls, tlsserver

    blob = b"{" + b" " * max(0, blob_size - 2) + b"}"   # answers are its prefixes (static bytes)

    ca_cert, ca_key = tls.make_ca("floor CA")
    cert, key = tls.make_server_cert(ca_cert, ca_key, ["127.0.0.1"])
    paths = {name: os.path.join(tls_dir, name) for name in ("ca.pem", "server.pem", "server.key")}
    for name, data in (("ca.pem", tls.cert_pem(ca_cert)), ("server.pem", tls.cert_pem(cert) + tls.cert_pem(ca_cert)),
                       ("server.key", tls.key_pem(key))):
        with open(paths[name] + ".tmp", "wb") as f:
            f.write(data)
        os.rename(paths[name] + ".tmp", paths[name])

    class Static(Resource):
        isLeaf = True

        def render(self, request):
            status, length = (int(v) for v in (request.getHeader("x-floor") or "200 2").split())
            request.setResponseCode(status)
            request.setHeader("cache-control", "no-store")
            if status == 304:
                return b""
            request.setHeader("content-type", "application/json")
            return blob[:length]

    site = Site(Static())
    site.displayTracebacks = False
    site.noisy = False
    factory = tlsserver.tls_factory(tlsserver.ServerTLS(paths["server.pem"], paths["server.key"]), site)
    reactor.listenTCP(port, factory, backlog=backlog, interface="127.0.0.1")
    reactor.run()


class FloorProcess:
    def __init__(self, blob_size: int, backlog: int) -> None:
        self.dir = tempfile.mkdtemp(prefix="ctxd-floor-")
        self.port = free_port()
        self.popen = subprocess.Popen([sys.executable, os.path.abspath(__file__), "serve", "--port", str(self.port),
                                       "--tls-dir", self.dir, "--blob-size", str(blob_size), "--backlog", str(backlog)], cwd=ROOT)
        self.proc = Proc(self.popen.pid)
        ca = os.path.join(self.dir, "ca.pem")
        deadline = time.monotonic() + 30
        while not os.path.exists(ca):
            if time.monotonic() > deadline or self.popen.poll() is not None:
                self.cleanup()
                raise SystemExit("floor server did not start")
            time.sleep(0.05)
        with open(ca) as f:
            self.ca_pem = f.read()
        time.sleep(0.3)   # listening right after the certificate is written

    def cleanup(self) -> None:
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait()
        shutil.rmtree(self.dir, ignore_errors=True)


async def replay_node(agent: SimAgent, script: List[tuple]) -> None:
    for method, path, token, data, status, raw in script:
        if path.endswith("/enroll") and agent.stats.first_enroll is None:
            agent.stats.first_enroll = time.monotonic()
        got, body = await agent.exchange(method, path, token, data, loadgen.REQUEST_TIMEOUT,
                                         (("X-Floor", "%d %d" % (status, len(raw))),))
        if got != status or len(body) != len(raw):
            raise RuntimeError("floor answered %d/%d bytes for %d/%d" % (got, len(body), status, len(raw)))
    agent.stats.last_ok = time.monotonic()


def floor_run(n: int, scripts: Dict[int, list], header: bool = False, backlog: Optional[int] = None) -> Dict[str, Any]:
    # Twisted's listenTCP and ctxd's ssl: endpoint have the same default backlog (50).
    server = FloorProcess(max(len(r[5]) for script in scripts.values() for r in script), backlog or 50)
    try:
        import ctxagent
        tls = ctxagent.make_tls_context(server.ca_pem)
        stats = Stats()
        bootstrap = {"url": "https://127.0.0.1:%d" % server.port}
        agents = [(SimAgent(bootstrap, tls, stats, i), script) for i, script in sorted(scripts.items())]
        cpu0, overflows0 = server.proc.cpu_seconds(), loadgen.listen_overflows()

        async def main() -> List[BaseException]:
            results = await asyncio.gather(*(replay_node(a, s) for a, s in agents), return_exceptions=True)
            return [r for r in results if isinstance(r, BaseException)]
        failures = asyncio.run(main())
        cpu = server.proc.cpu_seconds() - cpu0
        stats.listen_overflows = loadgen.listen_overflows() - overflows0
        hwm = server.proc.status_kib("VmHWM")
    finally:
        server.cleanup()
    wall = stats.last_ok - stats.first_enroll
    loadgen.print_table(loadgen.storm_columns("floor", n, stats, cpu, hwm, wall), header)
    loadgen._diagnostics(stats, [repr(f) for f in failures], None)
    return {"wall": wall, "cpu": cpu, "hwm_kib": hwm, "stats": stats, "failures": failures}


def compare(n: int, poll_wait: int, header: bool, backlog: Optional[int] = None) -> bool:
    scripts: Dict[int, list] = {}
    ctxd = loadgen.storm(n, poll_wait, record=scripts, header=header, backlog=backlog)
    floor = floor_run(n, scripts, backlog=backlog)
    s1, s2 = ctxd["stats"], floor["stats"]
    ratio = [("server", "ctxd/floor"), ("N", str(n)), ("all ok (s)", "%.2f" % (ctxd["wall"] / floor["wall"])),
             ("requests", "%.2f" % (s1.requests / max(1, s2.requests))),
             ("p50 (ms)", "%.2f" % (s1.percentile(50) / s2.percentile(50))),
             ("p99 (ms)", "%.2f" % (s1.percentile(99) / s2.percentile(99))),
             ("CPU (s)", "%.2f" % (ctxd["cpu"] / floor["cpu"] if floor["cpu"] else float("nan"))),
             ("peak RSS (MiB)", "%.2f" % (ctxd["hwm_kib"] / floor["hwm_kib"])),
             ("bytes sent", "%.2f" % (s1.response_bytes / max(1, s2.response_bytes)))]
    loadgen.print_table(ratio, header=False)
    return not (ctxd["failures"] or floor["failures"]) and ctxd["all_ok"]


def main(argv=None) -> int:
    if argv is None:
        argv = sys.argv[1:]
    if argv[:1] == ["serve"]:
        p = argparse.ArgumentParser(prog="floor.py serve")
        p.add_argument("--port", type=int, required=True)
        p.add_argument("--tls-dir", required=True)
        p.add_argument("--blob-size", type=int, default=1 << 20, help="largest body answered")
        p.add_argument("--backlog", type=int, default=50)
        a = p.parse_args(argv[1:])
        serve(a.port, a.tls_dir, a.blob_size, a.backlog)
        return 0
    p = argparse.ArgumentParser(description="Scenario 1 on ctxd and on the floor server, with the ratio.")
    p.add_argument("--nodes", type=int, default=100, help="compute nodes (plus one head)")
    p.add_argument("--runs", type=int, default=1)
    p.add_argument("--poll-wait", type=int, default=30)
    p.add_argument("--backlog", type=int, help="listen backlog of both servers [Twisted's default, 50]")
    a = p.parse_args(argv)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    ok = True
    for run in range(a.runs):
        ok = compare(a.nodes, a.poll_wait, header=run == 0, backlog=a.backlog) and ok
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
