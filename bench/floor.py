"""The floor: the same TLS handshakes and requests as a ctxd join storm, answered by a minimal
Twisted HTTPS server with static bodies - what this stack can reach on this machine.

    python bench/floor.py --nodes N [--runs 3]      # scenario 1 on ctxd, then on the floor; ratio
    python bench/floor.py serve --port P             # the floor server alone (used by the above)

The storm runs first against a real `twistd ctxd` (bench/loadgen.py), recording every node's
exchanges in order. Then a floor server process starts (same TLS policy: ctxd.tlsserver's
server context, a generated P-256 CA and server certificate, TLSMemoryBIOFactory, epoll
reactor) and the load generator replays each node's recorded requests - same count, same
request bytes, all nodes at once, each node's requests in order on one keep-alive TLS
connection per node, a new one exactly where the ctxd run opened one (so the same
handshakes) and whenever the floor closes it - with one extra header, `X-Floor: STATUS
LENGTH`, telling the server which status and how many bytes of a preallocated body to
answer (so response sizes match ctxd's too). The floor never waits: its time is pure
handshake + HTTP cost. Printed: one row per server and the ctxd / floor ratio of each
column (the last, TLS connections, is 1.00 unless the floor closed connections).
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
import ctxagent  # noqa: E402
from ctxd import memory  # noqa: E402
from ctxd.tap import LimitOptions  # noqa: E402

DEFAULT_BACKLOG = LimitOptions.LIMITS["listen-backlog"][0]

def serve(port: int, tls_dir: str, blob_size: int, backlog: int, plain: bool = False) -> None:
    """Run the floor server (blocking) with a fresh P-256 CA and server certificate in TLS_DIR
    (written even when PLAIN: HTTP without TLS, for the memory floor's TLS share)."""
    sys.path.insert(0, ROOT)
    from twisted.internet import reactor, task
    from twisted.web.resource import Resource
    from twisted.web.server import NOT_DONE_YET, Site

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

    held = []

    class Static(Resource):
        isLeaf = True

        def render(self, request):
            if request.getHeader("x-floor") == "HOLD":   # an idle long-poll: never answered
                held.append(request)
                return NOT_DONE_YET
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
    factory = site if plain else tlsserver.tls_factory(tlsserver.ServerTLS(paths["server.pem"], paths["server.key"]), site)
    reactor.listenTCP(port, factory, backlog=backlog, interface="127.0.0.1")
    # ctxd's heap hygiene (memory.settle_heap, the periodic trim): a floor, not a handicap.
    reactor.callWhenRunning(memory.settle_heap)
    if memory.CAN_RELEASE:
        task.LoopingCall(memory.release_free_memory).start(memory.TRIM_INTERVAL, now=False)
    reactor.run()


class FloorProcess:
    def __init__(self, blob_size: int, backlog: int, plain: bool = False) -> None:
        self.dir = tempfile.mkdtemp(prefix="ctxd-floor-")
        self.port = free_port()
        self.popen = subprocess.Popen([sys.executable, os.path.abspath(__file__), "serve", "--port", str(self.port),
                                       "--tls-dir", self.dir, "--blob-size", str(blob_size), "--backlog", str(backlog)]
                                      + (["--plain"] if plain else []), cwd=ROOT)
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
        loadgen.terminate(self.popen, 30)
        shutil.rmtree(self.dir, ignore_errors=True)


async def replay_node(agent: SimAgent, script: List[tuple]) -> None:
    """A node's recorded exchanges in order, on the agent's keep-alive connection.

    Where the ctxd run opened a new connection for a request (its server had closed the
    previous one, or a retry), the replay opens one too: the floor makes the same handshakes.
    """
    try:
        await _replay(agent, script)
        agent.stats.last_ok = time.monotonic()
    finally:
        agent.close()


async def _replay(agent: SimAgent, script: List[tuple]) -> None:
    for method, path, token, data, status, raw, opened in script:
        if path.endswith("/enroll") and agent.stats.first_enroll is None:
            agent.stats.first_enroll = time.monotonic()
        if opened:
            agent.close()
        delay = loadgen.RETRY_FIRST
        while True:   # connection errors and time-outs retried with the agent's backoff, as in ctxd's run
            try:
                got, body = await agent.exchange(method, path, token, data, loadgen.REQUEST_TIMEOUT,
                                                 (("X-Floor", "%d %d" % (status, len(raw))),))
                break
            except (OSError, asyncio.TimeoutError, asyncio.IncompleteReadError, ValueError, IndexError):
                agent.stats.retries += 1
                await asyncio.sleep(loadgen.backoff_pause(delay, float("inf")))
                delay = min(delay * 2, loadgen.RETRY_MAX)
        if got != status or len(body) != len(raw):
            raise RuntimeError("floor answered %d/%d bytes for %d/%d" % (got, len(body), status, len(raw)))


def floor_run(n: int, scripts: Dict[int, list], header: bool = False, backlog: Optional[int] = None) -> Dict[str, Any]:
    # The floor listens with ctxd's default backlog (--listen-backlog) unless told otherwise.
    server = FloorProcess(max(len(r[5]) for script in scripts.values() for r in script), backlog or DEFAULT_BACKLOG)
    try:
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
             ("bytes sent", "%.2f" % (s1.response_bytes / max(1, s2.response_bytes))),
             ("TLS connections", "%.2f" % (s1.connections / max(1, s2.connections)))]
    loadgen.print_table(ratio, header=False)
    return not (ctxd["failures"] or floor["failures"]) and ctxd["all_ok"]


async def _hold(agent: SimAgent, script: List[tuple], opened: List[SimAgent]) -> None:
    """One idle node's keep-alive connection as an agent keeps it: the exchanges a ctxd node
    made on it before it waited (recorded: its enrollment, and its long-polls and report of
    why it waits where it made them; same bytes both ways), then a long-poll with the agent's
    headers that the floor holds."""
    await _replay(agent, script)
    if agent.connection is None:   # the floor closed it after the answer: as the agent would, reconnect
        await agent.connect(loadgen.REQUEST_TIMEOUT)
    assert agent.connection is not None
    _, path, token = script[-1][:3]
    writer = agent.connection[1]
    writer.write(agent.request_bytes("GET", path.replace("since=-1", "since=1"), token, None, (("X-Floor", "HOLD"),)))
    await writer.drain()
    opened.append(agent)


def idle_floor(n: int, header: bool, script: List[tuple], plain: bool = False, window: float = 60.0) -> Dict[str, Any]:
    """The memory floor of scenario 3: n idle long-polls (a keep-alive TLS connection that carried
    SCRIPT, a ctxd node's exchanges before it waited, and a request held on it), all started
    at once as ctxd's nodes are, on the floor server; PLAIN: the same over plain TCP (what TLS
    adds is the difference). Figures: its RSS before and with them (after the server's
    periodic trim), per connection, and the connections opened. A WINDOW shorter than the
    trim interval is a smoke run: one sample, no waiting."""
    full = window >= memory.TRIM_INTERVAL
    server = FloorProcess(max([1024] + [len(r[5]) for r in script]), DEFAULT_BACKLOG, plain)
    opened: List[SimAgent] = []
    stats = Stats()
    try:
        tls = None if plain else ctxagent.make_tls_context(server.ca_pem)
        bootstrap = {"url": "https://127.0.0.1:%d" % server.port}
        if full:
            time.sleep(memory.TRIM_INTERVAL + 1)   # as ctxd's: the empty server settled and trimmed once
        rss_empty = server.proc.status_kib("VmRSS")

        async def main() -> int:
            await asyncio.gather(*(_hold(SimAgent(bootstrap, tls, stats, i), script, opened) for i in range(n)))
            samples = []   # as ctxd's figure: the median over a window that includes trims
            for _ in range(5 if full else 1):
                await asyncio.sleep(memory.TRIM_INTERVAL / 2 if full else 1.0)
                samples.append(server.proc.status_kib("VmRSS"))
            rss = sorted(samples)[len(samples) // 2]
            for agent in opened:
                agent.close()
            return rss
        rss_held = asyncio.run(main())
    finally:
        server.cleanup()
    per_node = (rss_held - rss_empty) / float(n)
    loadgen.print_table([("server", "floor, plain TCP" if plain else "floor"), ("N", str(n)), ("RSS empty (MiB)", "%.1f" % (rss_empty / 1024.0)),
                         ("RSS idle (MiB)", "%.1f" % (rss_held / 1024.0)), ("RSS/node (KiB)", "%.2f" % per_node),
                         ("connections", str(stats.connections))],
                        header)
    return {"rss_empty": rss_empty, "rss_loaded": rss_held, "per_node_kib": per_node}


def idle_compare(n: int, window: float, poll_wait: int, header: bool) -> None:
    script: List[tuple] = []
    ctxd = loadgen.idle(n, window, poll_wait, header=header, script=script)
    floor = idle_floor(n + 1, header, script, window=window)
    plain = idle_floor(n + 1, False, script, plain=True, window=window)
    ctxd_node = (ctxd["rss_loaded"] - ctxd["rss_empty"]) / float(n + 1)
    loadgen.print_table([("server", "ctxd/floor"), ("N", str(n + 1)),
                         ("RSS/node", "%.2f" % (ctxd_node / floor["per_node_kib"]))], header=False)
    print("  TLS's share of the floor: %.2f KiB per idle connection (floor %.2f - plain TCP %.2f)"
          % (floor["per_node_kib"] - plain["per_node_kib"], floor["per_node_kib"], plain["per_node_kib"]))


def main(argv=None) -> int:
    if argv is None:
        argv = sys.argv[1:]
    if argv[:1] == ["serve"]:
        p = argparse.ArgumentParser(prog="floor.py serve")
        p.add_argument("--port", type=int, required=True)
        p.add_argument("--tls-dir", required=True)
        p.add_argument("--blob-size", type=int, default=1 << 20, help="largest body answered")
        p.add_argument("--backlog", type=int, default=DEFAULT_BACKLOG)
        p.add_argument("--plain", action="store_true", help="HTTP without TLS (the memory floor's TLS share)")
        a = p.parse_args(argv[1:])
        serve(a.port, a.tls_dir, a.blob_size, a.backlog, a.plain)
        return 0
    if argv[:1] == ["idle"]:
        p = argparse.ArgumentParser(prog="floor.py idle", description="Scenario 3 on ctxd, then its memory floor.")
        p.add_argument("--nodes", type=int, default=100, help="compute nodes (plus one head)")
        p.add_argument("--window", type=float, help="idle seconds sampled [the poll wait, at least 60: every "
                       "node re-polls the same number of times in it]")
        p.add_argument("--runs", type=int, default=1)
        p.add_argument("--poll-wait", type=int, default=ctxagent.POLL_WAIT, help="the agents' wait= [ctxagent's]")
        a = p.parse_args(argv[1:])
        loadgen.quiet_gc()
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
        for run in range(a.runs):
            idle_compare(a.nodes, a.window or max(60.0, a.poll_wait), a.poll_wait, header=run == 0)
        return 0
    loadgen.quiet_gc()
    p = argparse.ArgumentParser(description="Scenario 1 on ctxd and on the floor server, with the ratio.")
    p.add_argument("--nodes", type=int, default=100, help="compute nodes (plus one head)")
    p.add_argument("--runs", type=int, default=1)
    p.add_argument("--poll-wait", type=int, default=ctxagent.POLL_WAIT, help="the agents' wait= [ctxagent's]")
    p.add_argument("--backlog", type=int, help="listen backlog of both servers [ctxd's default, %d]" % DEFAULT_BACKLOG)
    a = p.parse_args(argv)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    ok = True
    for run in range(a.runs):
        ok = compare(a.nodes, a.poll_wait, header=run == 0, backlog=a.backlog) and ok
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
