"""Watch mode at scale (issue 13): N all_identities watchers, then J more nodes join; delta views
against full views, in the same run.

    python bench/watch_bench.py [--nodes 1000] [--join 100] [--runs 3]

Each run makes two passes, each against a fresh real `twistd -n --pidfile= ctxd` over TLS on
loopback (bench/loadgen.py's broker and simulated agents: one keep-alive TLS connection per node,
verified with ctxagent's own TLS context, each node from an address of its own): `delta`, where
the watchers ask `view?since=R&wait=W&delta=1` and merge each delta into the view they hold
with ctxagent's own `merge_delta`, and `full`, where they ask `delta=0` and get whole views (the
O(N^2) per join that delta views remove).

A pass: one group `all` of N nodes with all_identities, providing and requiring the role `peer`.
The N watchers enroll, fetch their (complete) view, report ok (`"watch": true`) and then follow
their view as `ctxagent.py --watch` does: after each answer they ask again at once with the new
revision. Once they all hold their latest view and wait, the group is scaled to N + J
(`POST .../groups/all/scale`; the watchers take that change too), and once they hold that, J
simulated agents start at once, each making the agent's first run (enroll, full views until
complete, report ok). Measured from the first new enrollment (request sent) until every watcher
has applied a view listing all J joiners (in all_identities and among the role's providers):
the time, and the bytes of view responses the watchers received meanwhile, per watcher per joined
node: bodies, HTTP (status line, headers, bodies) and TLS (TCP payload received by the watchers'
sockets, from the kernel's TCP_INFO: TLS records, headers and bodies together). Printed: a row
per pass and run, then the medians of the runs per mode and the delta/full ratio of the medians.
"""

import argparse
import asyncio
import json
import os
import signal
import socket
import statistics
import struct
import sys
import time
from typing import Any, Dict, List, Optional, Set, Tuple

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import loadgen  # noqa: E402
from loadgen import REQUEST_TIMEOUT, BrokerProcess, SimAgent, Stats, print_table  # noqa: E402
import ctxagent  # noqa: E402  (the agent's merge_delta and view_progress)

# How long no watcher may receive anything before the watchers count as settled (holding their
# latest view and waiting) and before a pass's measurement ends.
QUIET = 1.0
# struct tcp_info: tcpi_bytes_received (u64), Linux 4.1+.
TCPI_BYTES_RECEIVED = 128


def tcp_bytes_received(writer: Optional[asyncio.StreamWriter]) -> int:
    """TCP payload bytes received so far by a connection's socket (-1 if the kernel cannot say)."""
    if writer is None:
        return 0
    sock = writer.transport.get_extra_info("socket")
    try:
        info = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 256)
    except (OSError, AttributeError):
        return -1
    if len(info) < TCPI_BYTES_RECEIVED + 8:
        return -1
    return struct.unpack_from("Q", info, TCPI_BYTES_RECEIVED)[0]


class Phase:
    """What the watchers received between the first new enrollment and the end of a pass."""

    def __init__(self) -> None:
        self.body = 0            # bytes of 200 view bodies
        self.answers = 0         # 200 view answers
        self.deltas = 0          # of which delta documents
        self.unchanged = 0       # 304 answers
        self.tls = 0             # TCP payload bytes received (TLS records)
        self.tls_known = True
        self.entry_bytes: Optional[int] = None   # one joined node's entry in a delta, as JSON


class Watcher(SimAgent):
    """A node in watch mode: enrolled, ok, then following its view (delta=1 or delta=0)."""

    def __init__(self, bench: "Pass", bootstrap: Dict[str, Any], tls: Any, stats: Stats, n: int) -> None:
        super().__init__(bootstrap, tls, stats, n, bench.poll_wait)
        self.bench = bench
        self.meter: Optional[Phase] = None
        self.tcp_base = 0
        self.held: Dict[str, Any] = {}
        self.answers = 0          # answers in the watch loop (the first follows the node's own ok)
        self.seen: Set[str] = set()   # node ids of joiners its held view lists
        self.applied_at: Optional[float] = None

    # -- the connection's wire bytes, also across a reconnect ---------------------------
    async def connect(self, timeout: float) -> Tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        connection = await super().connect(timeout)
        self.tcp_base = 0   # (a reconnect's handshake is wire cost too)
        return connection

    def close(self) -> None:
        if self.connection is not None and self.meter is not None:
            self.meter_tls()
        super().close()

    def meter_tls(self) -> None:
        """Add what the connection received since the last reading to the phase's TLS bytes."""
        assert self.meter is not None
        got = tcp_bytes_received(self.connection[1] if self.connection else None)
        if got < 0 or self.tcp_base < 0:
            self.meter.tls_known = False
        else:
            self.meter.tls += got - self.tcp_base
        self.tcp_base = got

    @property
    def token(self) -> str:
        """The node's credential (once enrolled)."""
        assert self.node is not None
        return self.node["node_token"]

    # -- the node's life ------------------------------------------------------------------
    async def life(self) -> None:
        b = self.bench
        await self.enroll()
        b.enrolled += 1
        if b.enrolled == b.n:
            b.all_enrolled.set()
        # The first views once all are enrolled: complete at once (setting up, not measured).
        await b.all_enrolled.wait()
        view = await self.first_view()
        self.held = b.share_entries(view) if b.delta else {"revision": view["revision"]}
        status, raw = await self.call("POST", self.node_path("report"), self.token,
                                      {"state": "ok", "watch": True, "log_tail": loadgen.LOG_TAIL})
        if status != 200:
            raise RuntimeError("report ok: HTTP %d %r" % (status, raw[:200]))
        await self.watch()

    async def first_view(self) -> Dict[str, Any]:
        """The agent's first run: full views until complete (SimAgent.poll_view without keeping
        the raw body: a thousand 2 MB views)."""
        since = -1
        while True:
            status, raw = await self.call("GET", self.node_path("view?since=%d&wait=%d" % (since, self.poll_wait)),
                                          self.token, timeout=self.poll_wait + REQUEST_TIMEOUT)
            if status == 304:
                continue
            if status != 200:
                raise RuntimeError("view: HTTP %d %r" % (status, raw[:200]))
            view = json.loads(raw)
            revision, complete, _ = ctxagent.view_progress(view)
            if complete:
                return view
            if revision <= since:
                await asyncio.sleep(1)
            since = revision

    async def watch(self) -> None:
        """ctxagent's watch loop: ask with the held revision, apply the answer, ask again at once."""
        b = self.bench
        while True:
            path = "view?since=%d&wait=%d&delta=%d" % (self.held["revision"], self.poll_wait, b.delta)
            status, raw = await self.call("GET", self.node_path(path), self.token,
                                          timeout=self.poll_wait + REQUEST_TIMEOUT)
            if status == 304:
                if self.meter is not None:
                    self.meter.unchanged += 1
                continue
            if status != 200:
                raise RuntimeError("view: HTTP %d %r" % (status, raw[:200]))
            self.apply(raw)
            self.answers += 1
            b.last_answer = time.monotonic()

    def apply(self, raw: bytes) -> None:
        """Merge a delta into the held view (ctxagent.merge_delta), or take a full view, as the
        agent does; note when the held view first lists every joiner."""
        b, meter = self.bench, self.meter
        doc = json.loads(raw)
        if doc.get("delta") is True:
            new = ctxagent.merge_delta(self.held, doc)
            seen = set(self.seen)
            for p in doc["peers"]:
                if p["all"] and "peer" in p["roles"] and p["hostname"] in b.joiner_names:
                    seen.add(p["node_id"])
                    if meter is not None and meter.entry_bytes is None:
                        meter.entry_bytes = len(json.dumps(p, separators=(",", ":")))
                else:
                    seen.discard(p["node_id"])
            seen.difference_update(doc["departed"])
        else:
            new = doc
            seen = {p["node_id"] for p in doc.get("all_identities") or [] if p["hostname"] in b.joiner_names}
            seen.intersection_update(p["node_id"] for p in doc["roles"]["peer"]["providers"])
            if b.delta:   # (a fallback: the broker could not say what changed)
                b.share_entries(new)
            else:         # what the full mode needs of it next: the revision (memory: 1,000 watchers)
                new = {"revision": doc["revision"], "all_identities": len(doc["all_identities"])}
        if meter is not None:
            meter.answers += 1
            meter.deltas += doc.get("delta") is True
            meter.body += len(raw)
        if ctxagent.view_progress(new if b.delta else doc)[0] > self.held["revision"]:   # (as the agent)
            self.held, self.seen = new, seen
        if self.applied_at is None and len(self.seen) == len(b.joiner_names):
            self.applied_at = time.monotonic()


class Pass:
    """One pass (one mode) on a fresh broker: set up the watchers, scale, join, measure."""

    def __init__(self, n: int, join: int, delta: bool, poll_wait: int, deadline: float) -> None:
        self.n, self.join, self.delta, self.poll_wait = n, join, int(delta), poll_wait
        self.deadline = deadline
        self.joiner_names = frozenset("node%d" % i for i in range(n + 1, n + join + 1))
        self.enrolled = 0
        self.all_enrolled = asyncio.Event()
        self.last_answer = time.monotonic()
        self.entries: Dict[str, Dict[str, Any]] = {}

    def share_entries(self, view: Dict[str, Any]) -> Dict[str, Any]:
        """VIEW with each identity entry replaced by an equal one shared by every watcher: a
        thousand parsed copies of a thousand identities would not fit in one process twice."""
        def one(entry: Dict[str, Any]) -> Dict[str, Any]:
            shared = self.entries.setdefault(entry["node_id"], entry)
            return shared if shared == entry else entry
        view["all_identities"] = [one(e) for e in view.get("all_identities") or []]
        for role in view["roles"].values():
            role["providers"] = [one(e) for e in role["providers"]]
        return view

    async def settled(self, tasks: List["asyncio.Task[None]"], watchers: List[Watcher], revision: int,
                      what: str) -> None:
        """Until every watcher holds a view of at least REVISION, has had an answer in its watch
        loop, and none has received anything for QUIET seconds."""
        started, said = time.monotonic(), time.monotonic()
        while True:
            await asyncio.sleep(0.1)
            dead = [t for t in tasks if t.done()]
            if dead:
                raise RuntimeError("%d watcher(s) stopped %s: %r" % (len(dead), what, dead[0].exception()))
            behind = sum(1 for w in watchers if not w.answers or w.held.get("revision", -1) < revision)
            now = time.monotonic()
            if not behind and now - self.last_answer >= QUIET:
                return
            if now - said >= 10:
                said = now
                print("  %s: %d of %d watchers not there yet after %.0f s"
                      % (what, behind, len(watchers), now - started), file=sys.stderr)

    async def main(self, broker: BrokerProcess, cid: str, bootstrap: Dict[str, Any]) -> Dict[str, Any]:
        tls = ctxagent.make_tls_context(broker.ca_pem)
        wstats, jstats = Stats(), Stats()
        watchers = [Watcher(self, bootstrap, tls, wstats, i + 1) for i in range(self.n)]
        tasks = [asyncio.create_task(w.life()) for w in watchers]
        try:
            t_setup = time.monotonic()
            await self.settled(tasks, watchers, 0, "setting up")
            print("  %s: %d watchers enrolled, ok and waiting after %.1f s"
                  % (self.mode, self.n, time.monotonic() - t_setup), file=sys.stderr)
            scale_http = wstats.response_bytes
            status, reply = await asyncio.to_thread(broker.admin, "POST", "/v1/contexts/%s/groups/all/scale" % cid,
                                                    {"quantity": self.n + self.join})
            if status != 200:
                raise RuntimeError("scale: HTTP %d %r" % (status, reply))
            await self.settled(tasks, watchers, reply["context"]["revision"], "taking the scale change")
            scale_http = wstats.response_bytes - scale_http

            phase = Phase()
            for w in watchers:
                w.meter, w.tcp_base = phase, tcp_bytes_received(w.connection[1] if w.connection else None)
            http0, requests0 = wstats.response_bytes, wstats.request_bytes
            cpu0 = broker.proc.cpu_seconds()
            joiners = [SimAgent(bootstrap, tls, jstats, self.n + 1 + i, self.poll_wait) for i in range(self.join)]
            joined = asyncio.gather(*(j.run() for j in joiners), return_exceptions=True)
            said, deadline = time.monotonic(), time.monotonic() + self.deadline
            while not (joined.done() and all(w.applied_at for w in watchers)
                       and time.monotonic() - self.last_answer >= QUIET):
                await asyncio.sleep(0.05)
                dead = [t for t in tasks if t.done()]
                if dead:
                    raise RuntimeError("%d watcher(s) stopped: %r" % (len(dead), dead[0].exception()))
                if time.monotonic() > deadline:
                    raise RuntimeError("%d of %d watchers did not apply all joiners in %.0f s"
                                       % (sum(1 for w in watchers if not w.applied_at), self.n, self.deadline))
                if time.monotonic() - said >= 10:
                    said = time.monotonic()
                    print("  %s: %d of %d watchers have applied all joiners after %.0f s"
                          % (self.mode, sum(1 for w in watchers if w.applied_at), self.n,
                             said - (jstats.first_enroll or said)), file=sys.stderr)
            cpu = broker.proc.cpu_seconds() - cpu0
            for w in watchers:
                w.meter_tls()
                w.meter = None
            failures = ["joiner %d: %s: %s" % (j.n, type(r).__name__, r)
                        for j, r in zip(joiners, joined.result()) if isinstance(r, BaseException)]
        finally:
            for t in tasks:
                t.cancel()
            _, pending = await asyncio.wait(tasks, timeout=15)
            if pending:
                print("  %d simulated watchers did not stop when cancelled (dropped)" % len(pending), file=sys.stderr)
            for w in watchers:
                w.close()
        t0 = jstats.first_enroll or float("nan")
        applied = sorted((w.applied_at or float("nan")) - t0 for w in watchers)
        return {"phase": phase, "applied": applied[-1], "applied_p50": applied[len(applied) // 2],
                "http": wstats.response_bytes - http0, "requests": wstats.request_bytes - requests0,
                "cpu": cpu, "joiners_ok": (jstats.last_ok or float("nan")) - t0,
                "joiner_http": jstats.response_bytes, "scale_http": scale_http, "reconnects": wstats.reconnects,
                "complete": sum(1 for w in watchers if self.lists_all(w)), "failures": failures}

    def lists_all(self, w: Watcher) -> bool:
        """Whether the watcher's held view lists every node (the joiners included), checked whole."""
        if not self.delta:
            return w.applied_at is not None and w.held.get("all_identities") == self.n + self.join
        everyone = {p["hostname"] for p in w.held["all_identities"]}
        providers = {p["hostname"] for p in w.held["roles"]["peer"]["providers"]}
        return len(everyone) == len(providers) == self.n + self.join and self.joiner_names <= everyone & providers

    @property
    def mode(self) -> str:
        return "delta" if self.delta else "full"


def run_pass(n: int, join: int, delta: bool, poll_wait: int, deadline: float) -> Dict[str, Any]:
    """One mode's pass against its own broker; its figures."""
    broker = BrokerProcess()
    try:
        cid, bootstraps = broker.create({"name": "watch", "groups": [
            {"name": "all", "quantity": n, "source_check": False, "provides": ["peer"],
             "requires": [{"role": "peer"}], "all_identities": True}]})
        bench = Pass(n, join, delta, poll_wait, deadline)
        loop = asyncio.new_event_loop()
        try:
            result = loop.run_until_complete(bench.main(broker, cid, bootstraps["all"]))
        finally:
            loop.set_exception_handler(lambda loop, context: None)   # no "destroyed but pending" noise
            loop.close()
        result["hwm_kib"] = broker.proc.status_kib("VmHWM")
    finally:
        broker.cleanup()
    return result


COLUMNS = ["all applied (s)", "views/watcher", "body B/watcher/joiner", "HTTP B/watcher/joiner",
           "TLS B/watcher/joiner", "body bytes", "HTTP bytes", "TLS bytes", "broker CPU (s)"]


def figures(r: Dict[str, Any], n: int, join: int) -> Dict[str, float]:
    phase: Phase = r["phase"]
    per = float(n * join)
    tls = phase.tls if phase.tls_known else float("nan")
    return dict(zip(COLUMNS, [r["applied"], phase.answers / float(n), phase.body / per, r["http"] / per,
                              tls / per, phase.body, r["http"], tls, r["cpu"]]))


def row(mode: str, run: str, n: int, join: int, f: Dict[str, float], complete: str, ratio: bool = False) -> list:
    fmt = {"all applied (s)": "%.2f", "views/watcher": "%.2f", "broker CPU (s)": "%.2f"}
    cols = [("mode", mode), ("run", run), ("N", str(n)), ("joined", str(join))]
    for name in COLUMNS:
        cols.append((name, "%.4f" % f[name] if ratio else (fmt.get(name, "%.0f") % f[name])))
    return cols + [("watchers with all joiners", complete)]


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--nodes", type=int, default=1000, help="watchers (the cluster before the join)")
    parser.add_argument("--join", type=int, default=100, help="nodes that join")
    parser.add_argument("--runs", type=int, default=3, help="runs (each: a delta pass and a full pass)")
    parser.add_argument("--poll-wait", type=int, default=ctxagent.POLL_WAIT, help="the watchers' wait= [ctxagent's]")
    parser.add_argument("--deadline", type=float, default=1800.0,
                        help="seconds the joins may take before a pass fails [%(default)g]")
    args = parser.parse_args(argv)
    loadgen.quiet_gc()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    n, join = args.nodes, args.join
    results: Dict[str, List[Dict[str, float]]] = {"delta": [], "full": []}
    ok, first = True, True
    for run in range(args.runs):
        for mode in ("delta", "full"):
            r = run_pass(n, join, mode == "delta", args.poll_wait, args.deadline)
            f = figures(r, n, join)
            results[mode].append(f)
            print_table(row(mode, str(run + 1), n, join, f, str(r["complete"])), header=first)
            first = False
            phase = r["phase"]
            t = os.times()
            entry = "" if phase.entry_bytes is None else "; one joined node's entry in a delta %d bytes" % phase.entry_bytes
            print("  %s: the median watcher applied all joiners at %.2f s; joiners all ok at %.2f s; answers %d "
                  "(%d deltas, %d full views), 304s %d%s; watchers' request bytes %d; the joiners' own view bytes %d; "
                  "the scale change cost the watchers %d HTTP bytes; broker peak RSS %.1f MiB; load generator "
                  "CPU so far %.1f s; watchers' reconnects %d"
                  % (mode, r["applied_p50"], r["joiners_ok"], phase.answers, phase.deltas,
                     phase.answers - phase.deltas, phase.unchanged, entry, r["requests"], r["joiner_http"],
                     r["scale_http"], r["hwm_kib"] / 1024.0, t.user + t.system, r["reconnects"]), file=sys.stderr)
            for line in r["failures"][:10]:
                print("  FAILED " + line, file=sys.stderr)
            ok = ok and not r["failures"] and r["complete"] == n
    medians = {mode: {c: statistics.median(f[c] for f in fs) for c in COLUMNS} for mode, fs in results.items()}
    for mode in ("delta", "full"):
        print_table(row(mode, "median", n, join, medians[mode], "-"), header=False)
    print_table(row("delta/full", "median", n, join,
                    {c: medians["delta"][c] / medians["full"][c] if medians["full"][c] else float("nan")
                     for c in COLUMNS}, "-", ratio=True), header=False)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
