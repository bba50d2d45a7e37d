"""A kill -9 harness for ctxd (issue 4, "Proof (tests)").

A real ``twistd -n ctxd`` subprocess (tests/e2e/helpers.py ``BrokerProcess``) takes
acknowledged changes from many concurrent clients - enrollments, node reports
and data puts - and is killed with SIGKILL at a random moment. It is restarted
on the same state directory and port, and the state it recovered is checked
against what the clients saw acknowledged:

- every acknowledged enrollment's node is present (same id, same identity);
- every node's state is the one of its last acknowledged report, or of the one
  in-doubt report sent after it (a request whose reply never fully arrived);
- every data item holds the value of its last acknowledged put, or of the one
  in-doubt put sent after it;
- nothing appears that was never sent: no node whose hostname no client sent,
  no data value no client sent.

Each client is sequential and owns its own nodes and its own data item, so the
order of its changes is known; it stops at its first failed request (that
request is "in doubt": it may or may not have been applied).

A change counts as acknowledged only when its whole 2xx response was read.
"""

from __future__ import annotations

import base64
import http.client
import json
import os
import random
import ssl
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Tuple

_TESTS = Path(__file__).resolve().parents[1]
if str(_TESTS) not in sys.path:  # so that `e2e.helpers` imports when run directly
    sys.path.insert(0, str(_TESTS))

from e2e.helpers import BrokerProcess, components_missing

GROUP = "compute"
QUANTITY = 5000
REPORT_STATES = ("error", "contextualizing")


class CrashBroker(BrokerProcess):
    """The e2e BrokerProcess with the enrollment rate limits out of the way."""

    def argv(self) -> List[str]:
        return super().argv() + [
            "--enroll-rate-per-source", "100000",
            "--enroll-rate-per-token", "100000",
        ]

    def wait_ready(self, timeout: float = 20.0, pause: float = 0.05) -> None:
        super().wait_ready(timeout, pause)

    def health_problem(self) -> Optional[str]:
        """Probe /healthz in-process (verified TLS) rather than via a subprocess."""
        try:
            conn = http.client.HTTPSConnection(
                self.host, self.port, timeout=2, context=ssl.create_default_context(cafile=str(self.ca_path)))
            try:
                conn.request("GET", "/healthz")
                resp = conn.getresponse()
                body = resp.read()
                if resp.status == 200 and json.loads(body).get("status") == "ok":
                    return None
                return "healthz answered %s" % resp.status
            finally:
                conn.close()
        except (OSError, ssl.SSLError, http.client.HTTPException, ValueError) as e:
            return repr(e)


class RequestFailed(Exception):
    """No complete 2xx response: the change is in doubt."""


class HTTP:
    """One keep-alive HTTPS connection verifying the broker's CA."""

    def __init__(self, broker: BrokerProcess, timeout: float = 15.0):
        self.host, self.port = broker.host, broker.port
        self.ctx = ssl.create_default_context(cafile=str(broker.ca_path))
        self.timeout = timeout
        self.conn: Optional[http.client.HTTPSConnection] = None

    def close(self) -> None:
        if self.conn is not None:
            self.conn.close()
            self.conn = None

    def call(self, method: str, path: str, token: str, body=None) -> Tuple[int, dict]:
        """(status, parsed body); raises RequestFailed if no whole response arrived."""
        if self.conn is None:
            self.conn = http.client.HTTPSConnection(self.host, self.port, timeout=self.timeout,
                                                    context=self.ctx)
        headers = {"Authorization": "Bearer " + token}
        data = None
        if body is not None:
            data = json.dumps(body).encode()
            headers["Content-Type"] = "application/json"
        try:
            self.conn.request(method, path, body=data, headers=headers)
            resp = self.conn.getresponse()
            raw = resp.read()  # the whole body, or an exception
            if resp.getheader("Connection", "").lower() == "close":
                self.close()
        except (OSError, ssl.SSLError, http.client.HTTPException) as e:
            self.close()
            raise RequestFailed(repr(e)) from e
        try:
            parsed = json.loads(raw) if raw else {}
        except ValueError as e:
            raise RequestFailed("unparsable body %r" % raw[:200]) from e
        return resp.status, parsed


def identity(hostname: str, ip: str) -> dict:
    return {"hostname": hostname, "fqdn": hostname + ".crash.test", "primary_ip": ip,
            "interfaces": [{"name": "eth0", "ipv4": [ip], "ipv6": []}], "ssh_host_keys": []}


@dataclass
class Sent:
    """One change a client sent: acknowledged (2xx read) or in doubt."""

    kind: str  # enroll | report | data | scale | remove
    key: str  # hostname (enroll), node id (report, remove), data name (data), group (scale)
    value: object  # identity | (state, message) | b64 value | quantity | None
    acked: bool
    node_id: Optional[str] = None  # an acknowledged enrollment's node id


@dataclass
class ClientLog:
    index: int
    changes: List[Sent] = field(default_factory=list)
    unexpected: List[str] = field(default_factory=list)  # non-2xx answers


class Client(threading.Thread):
    """A sequential client: enrolls its nodes, reports for them, puts its data item."""

    def __init__(self, broker: BrokerProcess, trial: int, index: int, cid: str, join_token: str,
                 admin_token: str, data_name: str, stop: threading.Event, seed: int):
        super().__init__(name="crash-client-%d" % index, daemon=True)
        self.http = HTTP(broker)
        self.trial, self.index, self.cid = trial, index, cid
        self.join_token, self.admin_token, self.data_name = join_token, admin_token, data_name
        self.stop = stop
        self.rng = random.Random(seed)
        self.log = ClientLog(index)
        self.nodes: List[Tuple[str, str, int]] = []  # (node id, node token, reports sent)
        self.seq = 0

    def run(self) -> None:
        try:
            while not self.stop.is_set():
                self.seq += 1
                r = self.rng.random()
                if not self.nodes or r < 0.30:
                    ok = self.enroll()
                elif r < 0.62:
                    ok = self.report()
                elif r < 0.80:
                    ok = self.put()
                elif r < 0.92:
                    ok = self.scale()
                else:
                    ok = self.remove()
                if not ok:
                    return
        finally:
            self.http.close()

    def _send(self, sent: Sent, method: str, path: str, token: str, body) -> Optional[dict]:
        """Send one change; record it acknowledged or in doubt; the body on success."""
        try:
            status, reply = self.http.call(method, path, token, body)
        except RequestFailed:
            self.log.changes.append(sent)  # in doubt
            return None
        if 200 <= status < 300:
            sent.acked = True
            self.log.changes.append(sent)
            return reply
        # A refusal: not applied, if the broker keeps its word; kept as in doubt
        # anyway (the harness checks durability, not the API), and the client stops.
        self.log.unexpected.append("%s %s -> %s %s" % (method, path, status, reply))
        self.log.changes.append(sent)
        return None

    def enroll(self) -> bool:
        k = len([c for c in self.log.changes if c.kind == "enroll"])
        hostname = "t%d-c%d-n%d" % (self.trial, self.index, k)
        ip = "10.%d.%d.%d" % (self.index % 250, k // 250 % 250, k % 250 + 1)
        ident = identity(hostname, ip)
        sent = Sent("enroll", hostname, ident, acked=False)
        key = "crash-%d-%d-%d-%s" % (self.trial, self.index, k, os.urandom(6).hex())
        reply = self._send(sent, "POST", "/v1/contexts/%s/enroll" % self.cid, self.join_token,
                           {"instance_key": key, "identity": ident})
        if reply is None:
            return False
        sent.node_id = reply["node_id"]
        self.nodes.append((reply["node_id"], reply["node_token"], 0))
        return True

    def report(self) -> bool:
        i = self.rng.randrange(len(self.nodes))
        nid, token, n = self.nodes[i]
        state = REPORT_STATES[n % 2]  # (enrolling made it contextualizing) -> error -> contextualizing ...
        message = "t%d-c%d-s%d" % (self.trial, self.index, self.seq) if state == "error" else ""
        body = {"state": state}
        if state == "error":
            body.update(exit_code=3, message=message)
        sent = Sent("report", nid, (state, message), acked=False)
        reply = self._send(sent, "POST", "/v1/contexts/%s/nodes/%s/report" % (self.cid, nid),
                           token, body)
        self.nodes[i] = (nid, token, n + 1)
        return reply is not None

    def scale(self) -> bool:
        """This client's own empty group (scale-only) to a new size."""
        group = "s%d" % self.index
        quantity = self.seq % 97 + 1
        sent = Sent("scale", group, quantity, acked=False)
        return self._send(sent, "POST", "/v1/contexts/%s/groups/%s/scale" % (self.cid, group),
                          self.admin_token, {"quantity": quantity}) is not None

    def remove(self) -> bool:
        """One of this client's nodes departs (the deployer removes it); no report follows."""
        nid, _, _ = self.nodes.pop(self.rng.randrange(len(self.nodes)))
        sent = Sent("remove", nid, None, acked=False)
        return self._send(sent, "POST", "/v1/contexts/%s/nodes/%s/remove" % (self.cid, nid),
                          self.admin_token, {}) is not None

    def put(self) -> bool:
        value = base64.b64encode(("t%d-c%d-s%d" % (self.trial, self.index, self.seq)).encode()
                                 ).decode()
        sent = Sent("data", self.data_name, value, acked=False)
        reply = self._send(sent, "PUT", "/v1/contexts/%s/data/%s" % (self.cid, self.data_name),
                           self.admin_token, {"values": [{"b64": value}]})
        return reply is not None


@dataclass
class Outcome:
    acked: int = 0  # acknowledged changes checked
    in_doubt: int = 0
    lost: List[str] = field(default_factory=list)  # acknowledged changes missing
    phantom: List[str] = field(default_factory=list)  # things never sent
    unexpected: List[str] = field(default_factory=list)


def _admin(broker: BrokerProcess, admin_token: str, method: str, path: str, body=None) -> dict:
    http = HTTP(broker)
    try:
        status, reply = http.call(method, path, admin_token, body)
    finally:
        http.close()
    assert 200 <= status < 300, "%s %s -> %s %s" % (method, path, status, reply)
    return reply


class Campaign:
    """Trials against one broker (a fresh state directory every ROTATE trials)."""

    ROTATE = 20

    def __init__(self, workdir: Path, clients: int = 32, seed: Optional[int] = None,
                 load_min: float = 0.2, load_max: float = 1.5):
        self.workdir = Path(workdir)
        self.nclients = clients
        self.seed = seed if seed is not None else random.randrange(1 << 30)
        self.rng = random.Random(self.seed)
        self.load_min, self.load_max = load_min, load_max
        self.broker: Optional[CrashBroker] = None
        self.trials = 0
        self.acked = 0
        self.in_doubt = 0
        self.lost: List[str] = []
        self.phantom: List[str] = []
        self.unexpected: List[str] = []
        # what earlier trials of this state dir recovered: cid -> fingerprint
        self.settled: Dict[str, dict] = {}
        self.observers: Dict[str, Tuple[str, str]] = {}  # cid -> (node id, token)

    # -- broker lifecycle --------------------------------------------------

    def _fresh_broker(self) -> None:
        self.close()
        self.broker = CrashBroker(self.workdir / ("broker-%d" % (self.trials // self.ROTATE)))
        self.broker.start(timeout=30)
        self.settled.clear()
        self.observers.clear()

    def close(self) -> None:
        if self.broker is not None:
            self.broker.kill()
            self.broker = None

    @property
    def admin_token(self) -> str:
        return (self.broker.state_dir / "admin.token").read_text().strip()

    # -- one trial ---------------------------------------------------------

    def trial(self) -> Outcome:
        if self.broker is None or self.trials % self.ROTATE == 0:
            self._fresh_broker()
        b = self.broker
        trial = self.trials
        admin = self.admin_token
        names = ["d%d" % i for i in range(self.nclients)]
        created = _admin(b, admin, "POST", "/v1/contexts", {
            "name": "crash-%d" % trial, "open_for_injection": True,
            "data": {n: [] for n in names},
            "groups": [{"name": GROUP, "quantity": QUANTITY, "data": names, "source_check": False}]
            + [{"name": "s%d" % i, "quantity": 1} for i in range(self.nclients)],
        })
        cid = created["context"]["id"]
        join = created["bootstraps"][GROUP]["join_token"]
        # An observer node, enrolled before the load, reads the data values back.
        obs = _admin(b, join, "POST", "/v1/contexts/%s/enroll" % cid, {
            "instance_key": "observer-%d-%s" % (trial, os.urandom(8).hex()),
            "identity": identity("t%d-observer" % trial, "10.255.0.1")})
        self.observers[cid] = (obs["node_id"], obs["node_token"])

        stop = threading.Event()
        clients = [Client(b, trial, i, cid, join, admin, names[i], stop, self.rng.randrange(1 << 30))
                   for i in range(self.nclients)]
        for c in clients:
            c.start()
        try:
            time.sleep(self.rng.uniform(self.load_min, self.load_max))
            b.kill()  # SIGKILL to the broker's process group
            for c in clients:
                c.join(timeout=30)
            assert not any(c.is_alive() for c in clients), "a client did not notice the kill"
        finally:
            stop.set()
        b.start(timeout=30)  # same state dir, same port

        out = self.verify(cid, [c.log for c in clients], obs["node_id"])
        self.recheck_settled(out)
        self.trials += 1
        self.acked += out.acked
        self.in_doubt += out.in_doubt
        self.lost += ["trial %d: %s" % (trial, m) for m in out.lost]
        self.phantom += ["trial %d: %s" % (trial, m) for m in out.phantom]
        self.unexpected += ["trial %d: %s" % (trial, m) for m in out.unexpected]
        return out

    # -- checks ------------------------------------------------------------

    @staticmethod
    def _check_elastic(log: ClientLog, nodes: Dict[str, dict], groups: Dict[str, dict], out: Outcome) -> None:
        """A client's removals and scale changes: each acknowledged one is there; nothing unsent is."""
        removed = [s for s in log.changes if s.kind == "remove"]
        for s in removed:
            node = nodes.get(s.key)
            if s.acked and (node is None or node.get("departed") != "removed"):
                out.lost.append("acknowledged removal of node %s: it is %r"
                                % (s.key, node and node.get("departed")))
        sent_removals = {s.key for s in removed}
        for s in log.changes:
            if s.kind == "enroll" and s.node_id and s.node_id not in sent_removals:
                node = nodes.get(s.node_id)
                if node is not None and node.get("departed"):
                    out.phantom.append("node %s departed (%s) but no removal was sent"
                                       % (s.node_id, node["departed"]))
        scales = [s for s in log.changes if s.kind == "scale"]
        if scales:
            last_acked = max((i for i, s in enumerate(scales) if s.acked), default=-1)
            allowed = ([scales[last_acked].value] if last_acked >= 0 else [1]) + \
                [s.value for s in scales[last_acked + 1:]]
            got = groups[scales[0].key]["quantity"]
            if got not in allowed:
                (out.lost if last_acked >= 0 else out.phantom).append(
                    "group %s has quantity %r; allowed %r" % (scales[0].key, got, allowed))

    def _state(self, cid: str) -> Tuple[dict, dict]:
        """(admin status, the observer node's view data) as the broker has them now."""
        admin = self.admin_token
        status = _admin(self.broker, admin, "GET", "/v1/contexts/%s" % cid)
        nid, token = self.observers[cid]
        view = _admin(self.broker, token, "GET", "/v1/contexts/%s/nodes/%s/view" % (cid, nid))
        return status, view.get("data", {})

    def verify(self, cid: str, logs: List[ClientLog], observer: str) -> Outcome:
        out = Outcome()
        status, data = self._state(cid)
        nodes = {n["id"]: n for n in status["nodes"]}
        by_host = {n["identity"]["hostname"]: n for n in status["nodes"]}
        sent_hosts = {}
        for log in logs:
            out.unexpected += ["client %d: %s" % (log.index, u) for u in log.unexpected]
            self._check_elastic(log, nodes, {g["name"]: g for g in status.get("groups", [])}, out)
            reports: Dict[str, List[Sent]] = {}
            reported = {s.key for s in log.changes if s.kind == "report"}
            puts: List[Sent] = []
            for s in log.changes:
                if s.acked:
                    out.acked += 1
                else:
                    out.in_doubt += 1
                if s.kind == "enroll":
                    sent_hosts[s.key] = s
                    node = by_host.get(s.key)
                    if s.acked:
                        if node is None or node["id"] != s.node_id:
                            out.lost.append("acknowledged enrollment %s (node %s) missing"
                                            % (s.key, s.node_id))
                            continue
                    if node is not None:
                        if node["id"] not in reported and node["state"] != "contextualizing":
                            out.phantom.append("node %s is %r but no report was sent for it"
                                               % (node["id"], node["state"]))
                        got = {k: v for k, v in node["identity"].items() if k != "source_address"}
                        if got != s.value:
                            out.phantom.append("node %s identity %r, sent %r"
                                               % (node["id"], got, s.value))
                elif s.kind == "report":
                    reports.setdefault(s.key, []).append(s)
                elif s.kind == "data":
                    puts.append(s)
            # reports: the last acknowledged one, or an in-doubt one after it
            for nid, seq in reports.items():
                last_acked = max((i for i, s in enumerate(seq) if s.acked), default=-1)
                if last_acked >= 0:  # the last acknowledged state, or an in-doubt later one
                    allowed = [s.value for s in seq[last_acked:]]
                else:  # nothing acknowledged: as enrolled (contextualizing), or any report sent
                    allowed = [("contextualizing", "")] + [s.value for s in seq]
                node = nodes.get(nid)
                if node is None:
                    continue  # reported as lost above
                got_state = node["state"]
                got_msg = (node.get("error") or {}).get("message", "") if got_state == "error" else ""
                ok = any(got_state == st and (st != "error" or got_msg == msg) for st, msg in allowed)
                if not ok:
                    what = ("acknowledged report %r of node %s" % (seq[last_acked].value, nid)
                            if last_acked >= 0 else "node %s" % nid)
                    (out.lost if last_acked >= 0 else out.phantom).append(
                        "%s: broker has state %r message %r; allowed %r"
                        % (what, got_state, got_msg, allowed))
            # data: this client's own item
            if puts:
                name = puts[0].key
                last_acked = max((i for i, s in enumerate(puts) if s.acked), default=-1)
                allowed = ([puts[last_acked].value] if last_acked >= 0 else [None]) + \
                    [s.value for s in puts[last_acked + 1:]]
                got = data.get(name)
                got_value = got[0]["b64"] if got else None
                if got and len(got) != 1:
                    out.phantom.append("data %s holds %r" % (name, got))
                elif got_value not in allowed:
                    (out.lost if last_acked >= 0 else out.phantom).append(
                        "data %s is %r; allowed %r" % (name, got_value, allowed))
        # nothing that was never sent
        for n in status["nodes"]:
            host = n["identity"]["hostname"]
            if n["id"] == observer:
                continue
            if host not in sent_hosts:
                out.phantom.append("node %s (hostname %r) was never sent" % (n["id"], host))
        names = {"d%d" % log.index for log in logs}
        for name, values in data.items():
            if name not in names:
                out.phantom.append("data item %s was never declared" % name)
        self.settled[cid] = self.fingerprint(status, data)
        return out

    @staticmethod
    def fingerprint(status: dict, data: dict) -> dict:
        return {"nodes": sorted((n["id"], n["state"], (n.get("error") or {}).get("message", ""), n.get("departed"))
                                for n in status["nodes"]),
                "groups": sorted((g["name"], g["quantity"]) for g in status.get("groups", [])),
                "data": {k: [v["b64"] for v in vs] for k, vs in data.items()}}

    def recheck_settled(self, out: Outcome) -> None:
        """Contexts of earlier trials on this state dir must have survived this crash unchanged."""
        for cid, before in list(self.settled.items()):
            status, data = self._state(cid)
            now = self.fingerprint(status, data)
            if now != before:
                out.lost.append("context %s of an earlier trial changed across a crash" % cid)
                self.settled[cid] = now

    def summary(self) -> str:
        return ("crash test: %d trials, %d acknowledged changes verified, %d lost"
                % (self.trials, self.acked, len(self.lost)))


def run(workdir: Path, trials: int, clients: int = 32, seed: Optional[int] = None,
        deadline: Optional[float] = None) -> Campaign:
    """Run TRIALS trials (fewer if DEADLINE, a monotonic time, passes); the campaign."""
    camp = Campaign(workdir, clients=clients, seed=seed)
    try:
        for _ in range(trials):
            if deadline is not None and time.monotonic() > deadline:
                break
            camp.trial()
    finally:
        camp.close()
    return camp


if __name__ == "__main__":  # python tests/crash/harness.py [TRIALS]
    import tempfile

    reason = components_missing()
    if reason:
        sys.exit(reason)
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 3
    with tempfile.TemporaryDirectory(prefix="ctxd-crash-") as tmp:
        t0 = time.monotonic()
        c = run(Path(tmp), n)
        print(c.summary(), "(%.1fs, %d in doubt, %d phantom)"
              % (time.monotonic() - t0, c.in_doubt, len(c.phantom)))
        for m in c.lost + c.phantom + c.unexpected:
            print("  " + m)
        sys.exit(1 if c.lost or c.phantom else 0)
