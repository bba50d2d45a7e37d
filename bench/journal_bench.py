"""Journal figures: acknowledged changes per second with fsync on, and replay time.

    python bench/journal_bench.py throughput [--clients 100] [--seconds 10] [--runs 3]
    python bench/journal_bench.py replay [--records 1000000] [--runs 3]

throughput: a real `twistd -n ctxd` on loopback; CLIENTS threads, each with its own
verified TLS connection, POST node reports (one journal record each) as fast as the
broker acknowledges them. Prints acknowledged changes/s and records per fdatasync
(from the broker's shutdown log line), median of RUNS.

replay: writes a journal of RECORDS records (one context, enrollments and reports),
then times a fresh broker (ctxd.broker.Broker) replaying it (scan + decode + apply), median of RUNS.
"""

import argparse
import http.client
import json
import os
import re
import shutil
import signal
import socket
import ssl
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from typing import Tuple

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tests"))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from loadgen import this_checkout  # noqa: E402  (the broker of this checkout, not an installed one)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_broker(state: str, port: int) -> subprocess.Popen:
    twistd = os.path.join(os.path.dirname(sys.executable), "twistd")
    log = open(os.path.join(state + ".log"), "wb")
    proc = subprocess.Popen(
        [twistd, "-n", "--pidfile=", "ctxd", "--state-dir", state, "--listen", f"ssl:{port}:interface=127.0.0.1",
         "--public-url", f"https://127.0.0.1:{port}", "--enroll-rate-per-source", "1000000",
         "--enroll-rate-per-token", "1000000", "--max-connections-per-peer", "100000", "--metrics-listen", "none"],
        stdout=log, stderr=subprocess.STDOUT,
        env=this_checkout(),
    )
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        try:
            ctx = ssl.create_default_context(cafile=os.path.join(state, "tls", "ca.pem"))
            conn = http.client.HTTPSConnection("127.0.0.1", port, context=ctx, timeout=2)
            conn.request("GET", "/healthz")
            if conn.getresponse().status == 200:
                return proc
        except (OSError, ssl.SSLError, http.client.HTTPException):
            time.sleep(0.1)
    proc.kill()
    raise SystemExit("broker did not start")


class Api:
    def __init__(self, state: str, port: int, token: str) -> None:
        self.ctx = ssl.create_default_context(cafile=os.path.join(state, "tls", "ca.pem"))
        self.conn = http.client.HTTPSConnection("127.0.0.1", port, context=self.ctx, timeout=30)
        self.token = token

    def call(self, method: str, path: str, body=None):
        headers = {"Authorization": f"Bearer {self.token}"}
        data = None
        if body is not None:
            headers["Content-Type"] = "application/json"
            data = json.dumps(body).encode()
        self.conn.request(method, path, body=data, headers=headers)
        response = self.conn.getresponse()
        raw = response.read()
        return response.status, (json.loads(raw) if raw else None)


def identity(n: int):
    ip = f"10.{n >> 16 & 255}.{n >> 8 & 255}.{n & 255}"
    return {"hostname": f"n{n}", "fqdn": f"n{n}.bench", "primary_ip": ip,
            "interfaces": [{"name": "eth0", "ipv4": [ip], "ipv6": []}], "ssh_host_keys": []}


def throughput_run(clients: int, seconds: float) -> tuple:
    state = tempfile.mkdtemp(prefix="ctxd-bench-")
    port = free_port()
    proc = start_broker(state, port)
    try:
        admin = open(os.path.join(state, "admin.token")).read().strip()
        api = Api(state, port, admin)
        cluster = {"name": "bench", "groups": [{"name": "c", "quantity": clients, "source_check": False, "provides": ["w"]}]}
        status, created = api.call("POST", "/v1/contexts", cluster)
        cid, join = created["context"]["id"], created["bootstraps"]["c"]["join_token"]
        nodes = []
        for n in range(clients):
            api.token = join
            status, node = api.call("POST", f"/v1/contexts/{cid}/enroll",
                                    {"instance_key": f"bench-instance-{n:08d}", "identity": identity(n)})
            nodes.append((node["node_id"], node["node_token"]))
        counts = [0] * clients
        stop = time.monotonic() + seconds
        barrier = threading.Barrier(clients + 1)

        def client(i: int) -> None:
            nid, token = nodes[i]
            c = Api(state, port, token)
            path = f"/v1/contexts/{cid}/nodes/{nid}/report"
            barrier.wait()
            while time.monotonic() < stop:
                status, _ = c.call("POST", path, {"state": "contextualizing"})
                if status == 200:
                    counts[i] += 1

        threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
        for t in threads:
            t.start()
        barrier.wait()
        start = time.monotonic()
        for t in threads:
            t.join()
        elapsed = time.monotonic() - start
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)
        text = open(state + ".log").read()
        m = re.search(r"journal: (\d+) records in (\d+) fdatasyncs", text)
        per_sync = int(m.group(1)) / max(1, int(m.group(2))) if m else float("nan")
        return sum(counts) / elapsed, per_sync
    finally:
        if proc.poll() is None:
            proc.kill()
        shutil.rmtree(state, ignore_errors=True)
        try:
            os.unlink(state + ".log")
        except OSError:
            pass


def write_replay_journal(path: str, records: int) -> None:
    """A journal of RECORDS records (one context, enrollments and reports), framed as the broker frames them."""
    from ctxd.journal.format import encode, make_frame, make_header
    from ctxd.model import Model

    groups = records // 200_000 + 1  # at most 100,000 nodes per group; two records per node
    model = Model()
    model.quotas.nodes_per_context = groups * 100_000  # what the groups declare (not RECORDS: it may be less)
    body = {"name": "replay", "groups": [
        {"name": f"c{g}", "quantity": 100_000, "source_check": False, "provides": ["w"]} for g in range(groups)]}
    record, _ = model.prepare_create(body, 1.0)
    batch = [record]
    model.apply(record)
    cid = record["ctx"]
    n = 0
    while len(batch) < records:
        rec, _, _ = model.prepare_enroll(
            cid, f"c{n % groups}", {"instance_key": f"replay-instance-{n:09d}", "identity": identity(n)}, "10.0.0.1", 2.0)
        model.apply(rec)
        batch.append(rec)
        if len(batch) < records:
            rep = model.prepare_report(cid, rec["node"], {"state": "contextualizing"}, 3.0)
            model.apply(rep)
            batch.append(rep)
        n += 1
    file_id = os.urandom(16)
    with open(path, "wb") as f:
        f.write(make_header(file_id))
        for seq, rec in enumerate(batch, 1):
            f.write(make_frame(file_id, seq, encode(rec)))


def replay_run(records: int) -> Tuple[float, float, float, float]:
    import gc

    from twisted.internet.defer import succeed

    from ctxd.journal import FileJournal
    from support import make_broker

    directory = tempfile.mkdtemp(prefix="ctxd-replay-")
    path = os.path.join(directory, "journal.log")
    try:
        write_replay_journal(path, records)
        # The model that wrote the journal is gone (its node/group cycles collected):
        # the replay is timed in a heap like a starting broker's, not beside a second
        # copy of the state it rebuilds.
        gc.collect()
        size = os.path.getsize(path)
        start = time.perf_counter()
        broker = make_broker(FileJournal(path, lambda f, *a: succeed(f(*a))))
        replayed = broker.replay()
        elapsed = time.perf_counter() - start
        assert replayed == records, (replayed, records)
        # What the running broker then pays: its start-up settling (ctxd.memory.settle_heap),
        # and any later full collection, which no longer walks the frozen replayed state.
        from ctxd import memory

        before = gc.get_threshold()
        start = time.perf_counter()
        gc.collect()   # what every full collection cost before (it walked the replayed state)
        unfrozen = time.perf_counter() - start
        start = time.perf_counter()
        memory.settle_heap()
        settle = time.perf_counter() - start
        start = time.perf_counter()
        gc.collect()
        full = time.perf_counter() - start
        gc.unfreeze()
        gc.set_threshold(*before)
        print(f"  replayed {replayed} records ({size / 1e6:.0f} MB) in {elapsed:.2f} s; a full collection "
              f"{unfrozen:.3f} s; settling the heap {settle:.3f} s, then a full collection {full:.3f} s",
              file=sys.stderr)
        del broker
        return elapsed, settle, full, unfrozen
    finally:
        shutil.rmtree(directory, ignore_errors=True)


def compaction_run(nodes: int) -> tuple:
    """Journal bytes of a NODES-node contextualization, then after compaction."""
    from twisted.internet.defer import succeed

    from ctxd.journal import FileJournal
    from ctxd.model import Model

    directory = tempfile.mkdtemp(prefix="ctxd-compact-")
    try:
        journal = FileJournal(os.path.join(directory, "journal.log"), lambda f, *a: succeed(f(*a)),
                              compact_bytes=1 << 40)
        journal.load()
        model = Model()
        journal.snapshot_source = model.snapshot_records

        def commit(record):
            model.apply(record)
            journal.append(record)

        body = {"name": "compact", "groups": [{"name": "c", "quantity": nodes, "source_check": False, "provides": ["w"],
                                               "requires": [{"role": "w"}]}]}
        record, _ = model.prepare_create(body, 1.0)
        commit(record)
        cid = record["ctx"]
        ids = []
        for n in range(nodes):
            rec, _, _ = model.prepare_enroll(
                cid, "c", {"instance_key": f"compact-instance-{n:09d}", "identity": identity(n)}, "10.0.0.1", 2.0)
            commit(rec)
            ids.append(rec["node"])
        for nid in ids:  # every agent: contextualizing, ok, then a cron re-run's two reports
            for state in ("contextualizing", "ok", "contextualizing", "ok"):
                commit(model.prepare_report(cid, nid, {"state": state, "log_tail": "x" * 200}, 3.0))
        before = os.path.getsize(os.path.join(directory, "journal.log"))
        journal.compact()
        after = sum(os.path.getsize(os.path.join(directory, f)) for f in os.listdir(directory))
        journal.close()
        return before, after, journal.records_synced
    finally:
        shutil.rmtree(directory, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="what", required=True)
    t = sub.add_parser("throughput")
    t.add_argument("--clients", type=int, default=100)
    t.add_argument("--seconds", type=float, default=10)
    t.add_argument("--runs", type=int, default=3)
    c = sub.add_parser("compaction")
    c.add_argument("--nodes", type=int, default=10_000)
    r = sub.add_parser("replay")
    r.add_argument("--records", type=int, default=1_000_000)
    r.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    if args.what == "throughput":
        results = [throughput_run(args.clients, args.seconds) for _ in range(args.runs)]
        for rate, per in results:
            print(f"  run: {rate:.0f} acknowledged changes/s, {per:.1f} records per fdatasync", file=sys.stderr)
        print(f"| journal throughput, {args.clients} clients, fsync on | "
              f"{statistics.median(r for r, _ in results):.0f} acks/s | "
              f"{statistics.median(p for _, p in results):.1f} records/fdatasync | median of {args.runs} |")
    elif args.what == "compaction":
        before, after, records = compaction_run(args.nodes)
        print(f"| journal size, {args.nodes}-node context ({records} records) | {before / 1e6:.1f} MB before "
              f"compaction | {after / 1e6:.1f} MB after (snapshot + journal) |")
    else:
        results = [replay_run(args.records) for _ in range(args.runs)]
        print(f"| journal replay, {args.records} records | {statistics.median(r[0] for r in results):.2f} s | "
              f"full collection {statistics.median(r[3] for r in results):.3f} s; settling the heap "
              f"{statistics.median(r[1] for r in results):.3f} s, then a full collection "
              f"{statistics.median(r[2] for r in results):.3f} s | median of {args.runs} |")


if __name__ == "__main__":
    main()
