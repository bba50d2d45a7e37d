"""ctxctl for the deployer's day (issue 16): why a node waits (status's MESSAGE column, wait's
line with the elapsed time, status --watch, wait --keep-going), scripts that travel (the
cluster file's ``scripts``, packed), and the sharp edges: a broker with another CA's
certificate, where wait writes its reports, and a cluster file checked whole before create
makes anything.

The commands run against the real broker through tests/test_cli_args.py's Deployment (the real
API over an in-memory journal, one Clock); the certificate probe also against a real TLS server
on loopback, with the real ctxctl in a process of its own.
"""

import base64
import gzip
import hashlib
import io
import json
import os
import socket
import ssl
import stat
import subprocess
import sys
import tarfile
import threading

import pytest
from support import ADMIN_TOKEN, result_of
from test_cli_args import CA_PEM, T0, TTY, URL, Deployment, OldBroker, Refusing
from twisted.internet import defer
from twisted.python.failure import Failure
from twisted.web.client import ResponseNeverReceived
from twisted.web.resource import Resource

from ctxd import rules, tls, validate
from ctxd.ctxctl import commands, render
from ctxd.ctxctl.client import BrokerClient, describe_failure, presented_certificates
from ctxd.ctxctl.cluster import ClusterFileError, load_cluster_file, parse_cluster_text
from ctxd.ctxctl.main import parse_args, run_command
from ctxd.ctxctl.scripts import ScriptsError, pack_tree

HERE = os.path.dirname(os.path.abspath(__file__))
WAITING = "waiting: role torquemaster: 0 of 1 providers ok"


@pytest.fixture
def broker():
    """A fresh real broker, its clock at T0."""
    return Deployment()


@pytest.fixture
def agent(monkeypatch):
    """A placeholder agent source for create --embed-agent (the real ctxagent.py may not fit)."""
    monkeypatch.setattr(commands, "load_agent_source", lambda: "print('agent')\n")


def waiting_compute(broker, message=WAITING):
    """The torque cluster with its head and one compute node enrolled; the compute node's agent
    says why it waits (a contextualizing report with its reason). (cid, joins, {n: node id})."""
    cid, joins = broker.create()
    nodes = {1: broker.enroll(cid, joins["head"], 1), 2: broker.enroll(cid, joins["compute"], 2)}
    broker.report(cid, nodes[2], "contextualizing")
    broker.report(cid, nodes[2], "contextualizing", message=message)
    return cid, joins, nodes


# ------------------------------------------------------------------ status: the MESSAGE column

def test_status_message_column_says_why_a_node_waits(broker):
    """status's MESSAGE column shows what a waiting node's agent last said, from the real broker."""
    cid, joins, nodes = waiting_compute(broker)
    code, out, err = broker.run(["status", cid])
    assert (code, err) == (0, "")
    [row] = [line for line in out.splitlines() if nodes[2] in line]
    assert row.split()[:5] == ["compute", nodes[2], "node2", "10.9.0.2", "contextualizing"]
    assert row.endswith("  " + WAITING)


@pytest.mark.parametrize("node, message", [
    ({"waiting": WAITING, "error": {"message": "old"}}, WAITING),
    ({"waiting": "data gridmap: no value yet"}, "waiting: data gridmap: no value yet"),
    ({"waiting": "", "error": {"message": "script x exited 3"}}, "script x exited 3"),
    ({"waiting": "\x1b]0;pwned\x07" + "w" * 200}, "waiting: ?]0;pwned?" + "w" * 58 + "..."),
    ({"watching": True, "last_seen": T0 - 65}, "watching, seen 1m 5s ago"),
    ({"waiting": 7}, ""),
])
def test_the_message_is_why_it_waits_else_its_error_else_when_heard(node, message):
    """The MESSAGE is the waiting text (made printable, cut to 80), else the error, else for a
    watcher when it was last heard of."""
    assert render._node_message(node, T0) == message


# ------------------------------------------------------------------ wait: elapsed time and the reason

def test_wait_line_shows_the_elapsed_time_and_why_the_longest_waiting_node_waits(broker, tmp_path):
    """wait's line (not a terminal: printed when something but the time changes) carries the elapsed
    time and the progress' waiting node and message; it ends 0 when all are ok."""
    cid, joins, nodes = waiting_compute(broker)

    def rest_ok():
        for n in (3, 4):
            nodes[n] = broker.enroll(cid, joins["compute"], n)
        broker.report(cid, nodes[1], "ok")
        for n in (2, 3, 4):
            broker.report(cid, nodes[n], "ok")

    broker.clock.callLater(75, rest_ok)
    code, out, err = broker.run(["wait", cid, "--reports", str(tmp_path)])
    assert code == 0
    assert err.splitlines() == [
        f"[..........] 0/4 ok, 0 error, 2/4 enrolled, 0s elapsed; node2: {WAITING}",
        f"[..........] 0/4 ok, 0 error, 3/4 enrolled, 1m 15s elapsed; node2: {WAITING}",  # the first change
        "[##########] 4/4 ok, 0 error, 4/4 enrolled, 1m 15s elapsed",
        f"all 4 nodes ok; reports in {tmp_path / cid}",
    ]


def test_wait_on_a_terminal_redraws_the_elapsed_time_every_second(broker, tmp_path):
    """On a terminal the line is redrawn in place every second, its time moving on, without a request
    more; cut to the terminal's width."""
    cid, joins, nodes = waiting_compute(broker, message="waiting: " + "x" * 300)
    err = TTY()
    code, _, _ = broker.run(["wait", cid, "--reports", str(tmp_path), "--timeout", "5"], err=err)
    assert code == 3
    drawn = [part.split("\x1b[K")[0] for part in err.getvalue().split("\r") if part.startswith("[")]
    assert [d.split("; node2: waiting: xxx")[0] for d in drawn[:6]] == [
        f"[..........] 0/4 ok, 0 error, 2/4 enrolled, {t}s elapsed" for t in (0, 1, 2, 3, 4, 5)]
    assert all(len(d) == 79 and d.endswith("xxx") for d in drawn)
    assert broker.requests_by_route(cid) == {"progress": 2, "status": 1}  # at once, then one long-poll


def test_follow_line_of_a_full_status_finds_a_waiting_member():
    """A full status (a broker without the progress route) has no "waiting": the line takes the first
    contextualizing member that says why it waits."""
    status = {"counts": {"expected": 2, "enrolled": 2}, "groups": [{"name": "g"}], "nodes": [
        {"id": "A" * 22, "group": "g", "state": "ok", "waiting": "", "identity": {"hostname": "a"}},
        {"id": "B" * 22, "group": "g", "state": "contextualizing", "waiting": WAITING,
         "identity": {"hostname": "b\x1b"}}]}
    assert render.follow_line(status, 3) == (
        f"[..........] 0/2 ok, 0 error, 2/2 enrolled, 3s elapsed; {'B' * 22}: {WAITING}")
    assert render.follow_line({"waiting": None, "counts": {}}) == "[##########] 0/0 ok, 0 error, 0/0 enrolled"


# ------------------------------------------------------------------ wait --keep-going

def test_keep_going_waits_through_an_error_that_is_retried(broker, tmp_path):
    """With --keep-going a node's error does not end the wait: the error is said once, the line counts
    the nodes in error; the node's next attempt succeeds and wait ends 0."""
    cid, joins, nodes = broker.head_ok()
    nodes[2] = broker.enroll(cid, joins["compute"], 2, hostname="c2")
    broker.report(cid, nodes[2], "error", exit_code=4, message="script x exited 3", log_tail="boom\n")

    def retried():
        broker.report(cid, nodes[2], "contextualizing")
        broker.report(cid, nodes[2], "ok")
        for n in (3, 4):
            broker.report(cid, broker.enroll(cid, joins["compute"], n), "ok")

    broker.clock.callLater(40, retried)
    code, out, err = broker.run(["wait", cid, "--reports", str(tmp_path), "--keep-going"])
    assert (code, out) == (0, "")
    assert err.splitlines() == [
        f"node compute/{nodes[2]} (c2) reported an error: script x exited 3; waiting on (--keep-going)",
        "[##........] 1/4 ok, 1 error, 2/4 enrolled, 0s elapsed; 1 node in error, waiting on (--keep-going)",
        "[##........] 1/4 ok, 0 error, 2/4 enrolled, 40s elapsed",  # its new attempt
        "[##########] 4/4 ok, 0 error, 4/4 enrolled, 40s elapsed",
        f"all 4 nodes ok; reports in {tmp_path / cid}",
    ]


def test_keep_going_ends_at_the_timeout_with_exit_3_naming_the_errors(broker, tmp_path):
    """With --keep-going and a node still in error when time runs out: its failure report, and exit 3
    (the timeout's) with one line counting the nodes in error and the silent ones."""
    cid, joins, nodes = broker.head_ok()
    nodes[2] = broker.enroll(cid, joins["compute"], 2, hostname="c2")
    broker.report(cid, nodes[2], "error", exit_code=4, message="script x exited 3", log_tail="boom\n")
    code, out, err = broker.run(["wait", cid, "--reports", str(tmp_path), "--keep-going", "--timeout", "60"])
    assert code == 3 and broker.clock.seconds() == T0 + 60
    assert f"node compute/{nodes[2]} (c2) failed: exit code 4: script x exited 3\n--- log tail ---\nboom\n" in err
    assert err.splitlines()[-1] == (
        f"ctxctl: error: timed out after 60 s: 1 node in error (the first: node compute/{nodes[2]} (c2) reported "
        "an error: script x exited 3); 2 of 4 nodes did not report (2 never enrolled, 0 enrolled but not finished)")
    assert (tmp_path / cid / f"compute-c2-{nodes[2]}.error").exists()


def test_without_keep_going_the_first_error_still_ends_the_wait(broker, tmp_path):
    """Without --keep-going an error ends wait at once, exit 1, as before."""
    cid, joins, nodes = broker.head_ok()
    broker.report(cid, broker.enroll(cid, joins["compute"], 2), "error", message="bad")
    code, out, err = broker.run(["wait", cid, "--reports", str(tmp_path)])
    assert code == 1 and broker.clock.seconds() == T0
    assert err.splitlines()[-1].endswith("reported an error: bad")


# ------------------------------------------------------------------ status --watch

def watch(broker, argv, seconds, client=None, out=None, during=()):
    """Run ``ctxctl status ... --watch`` for ``seconds`` of the clock (``during``: (time, function)
    to call then), then interrupt it as Ctrl-C does; (exit code, stdout, stderr). Fails if it ended
    by itself or left a timer of its own behind."""
    client = client if client is not None else broker.stub()
    cli = BrokerClient(client, URL, ADMIN_TOKEN, ca_file="ca.pem", clock=broker.clock, timeout=None,
                       ca_pem=CA_PEM.encode())
    out, err = out if out is not None else io.StringIO(), io.StringIO()
    for at, function in during:
        broker.clock.callLater(at, function)
    d = defer.Deferred.fromCoroutine(run_command(cli, parse_args(argv), out, err))
    for _ in range(int(seconds * 2)):
        client.flush()
        assert not d.called, err.getvalue()
        broker.clock.advance(0.5)
    client.flush()
    d.cancel()
    client.flush()
    code = result_of(d)
    broker.clock.advance(commands.LONG_POLL_WAIT + 1)  # the broker answers the long-poll left behind
    client.flush()
    assert broker.clock.getDelayedCalls() == [], "timers left pending"
    return code, out.getvalue(), err.getvalue()


def test_status_watch_prints_the_table_again_when_the_progress_moves(broker):
    """Not on a terminal, --watch prints the table, then again (a blank line between) only when the
    progress revision moved: one full status per change, long-polls in between; Ctrl-C ends it, exit 0."""
    cid, joins, nodes = waiting_compute(broker)
    code, out, err = watch(broker, ["status", cid, "--watch"], 10,
                           during=[(3, lambda: broker.enroll(cid, joins["compute"], 3))])
    assert (code, err) == (0, "")
    tables = out.split("\n\n")
    assert len(tables) == 2
    assert tables[0].splitlines()[0] == f"{render.when(T0)}: ctxctl status {cid} --watch (Ctrl-C to stop)"
    assert tables[1].splitlines()[0] == f"{render.when(T0 + 3)}: ctxctl status {cid} --watch (Ctrl-C to stop)"
    assert WAITING in tables[0] and tables[1].splitlines()[-1].startswith("4 expected, 3 enrolled")
    assert broker.requests_by_route(cid) == {"progress": 3, "status": 2}
    first, woken, pending = broker.progress_uris(cid)
    assert first.endswith("since=-1&wait=30") and "since=-1" not in woken and pending != woken


def test_status_watch_on_a_terminal_redraws_in_place_every_interval(broker):
    """On a terminal --watch clears the screen and redraws every --interval (the times move on) without
    fetching the status again while nothing changes."""
    cid, joins, nodes = waiting_compute(broker)
    out = TTY()
    code, text, err = watch(broker, ["status", cid, "--watch", "--interval", "2"], 10, out=out)
    assert code == 0
    frames = text.split(commands.CLEAR_SCREEN)
    assert frames[0] == "" and len(frames) - 1 == 1 + 10 // 2
    assert frames[-1].startswith(f"{render.when(T0 + 10)}: ctxctl status {cid} --watch")
    assert broker.requests_by_route(cid) == {"progress": 2, "status": 1}


def test_status_watch_polls_a_broker_without_the_progress_route(broker):
    """A broker too old for the progress route is polled for its status every --interval seconds."""
    cid, joins, nodes = waiting_compute(broker)
    old = OldBroker(broker.spy)
    code, out, err = watch(broker, ["status", cid, "--watch", "--interval", "5"], 12, client=broker.stub(old))
    assert code == 0 and old.refused == 1 and broker.polls(cid) == 3  # at 0, 5 and 10 s
    assert out.count("ctxctl status") == 3


def test_status_watch_rides_out_an_unreachable_broker(broker):
    """A broker that stops answering after the first table is retried every --interval, said once on
    stderr; back, the watch goes on."""
    cid, joins, nodes = waiting_compute(broker)
    refusing = Refusing(broker.stub(), after=2, failures=2)
    broker.clock.callLater(1, broker.api.broker.shutdown)  # answers the long-poll: then connections are refused
    code, out, err = watch(broker, ["status", cid, "--watch"], 12, client=refusing)
    assert code == 0
    assert err.splitlines() == [f"cannot connect to {URL}: connection refused; retrying every 2 s",
                                "broker reachable again"]


def test_status_watch_of_a_missing_context_is_one_line(broker):
    """--watch of a context that does not exist ends at once: the broker's 404, exit 1."""
    code, out, err = broker.run(["status", "Z" * 22, "--watch"])
    assert (code, out, err) == (1, "", "ctxctl: error: broker: no such context (not_found, HTTP 404)\n")


@pytest.mark.parametrize("argv, message", [
    (["status", "Z" * 22, "--interval", "2"], "status: --interval only makes sense with --watch"),
    (["status", "Z" * 22, "--watch", "--json"], "status: --watch and --json cannot be combined"),
    (["status", "Z" * 22, "--watch", "--interval", "0"], "must be a positive number of seconds"),
])
def test_status_watch_options_are_checked(argv, message, capsys):
    """--interval needs --watch, --watch is not --json, and an interval is positive: usage errors."""
    with pytest.raises(SystemExit) as info:
        parse_args(argv)
    assert info.value.code == 2 and message in capsys.readouterr().err


# ------------------------------------------------------------------ scripts: packing

def scripts_tree(root):
    """A ctx-scripts tree: an executable script, a data file, a nested directory."""
    (root / "1-ipandhost" / "torquemaster").mkdir(parents=True)
    script = root / "1-ipandhost" / "torquemaster" / "run"
    script.write_text("#!/bin/sh\necho hi\n")
    script.chmod(0o700)
    (root / "1-ipandhost" / "torquemaster" / "notes.txt").write_text("notes\n")
    (root / "problem.sh").write_text("#!/bin/sh\n")
    (root / "problem.sh").chmod(0o750)
    return root


def test_packing_is_deterministic_and_normalised(tmp_path):
    """The same tree packs to the same bytes whatever its times and modes (beyond the execute bit):
    sorted relative names, mtime 0, 0:0 without names, 0755/0644, a gzip header without time or name."""
    one = scripts_tree(tmp_path / "one")
    two = scripts_tree(tmp_path / "two")
    for path in two.rglob("*"):
        os.utime(path, (1e9, 1e9))
    (two / "1-ipandhost" / "torquemaster" / "notes.txt").chmod(0o600)
    (two / "problem.sh").chmod(0o100)
    packed = pack_tree(str(one))
    assert packed == pack_tree(str(two)) == pack_tree(str(one))
    assert packed[4:8] == b"\0\0\0\0" and not packed[3] & 0x08  # gzip: mtime 0, no file name
    with tarfile.open(fileobj=io.BytesIO(packed), mode="r:gz") as tar:
        members = [(m.name, m.type, oct(m.mode), m.uid, m.gid, m.uname, m.gname, m.mtime) for m in tar]
    assert members == [
        ("1-ipandhost", tarfile.DIRTYPE, "0o755", 0, 0, "", "", 0),
        ("1-ipandhost/torquemaster", tarfile.DIRTYPE, "0o755", 0, 0, "", "", 0),
        ("1-ipandhost/torquemaster/notes.txt", tarfile.REGTYPE, "0o644", 0, 0, "", "", 0),
        ("1-ipandhost/torquemaster/run", tarfile.REGTYPE, "0o755", 0, 0, "", "", 0),
        ("problem.sh", tarfile.REGTYPE, "0o755", 0, 0, "", "", 0),
    ]
    assert validate.scripts_problem(packed) is None  # what the broker checks


def special(kind):
    def make(root):
        if kind == "symlink":
            os.symlink("/etc/passwd", root / "sub" / "link")
        elif kind == "fifo":
            os.mkfifo(root / "sub" / "pipe")
        elif kind == "socket":
            s = socket.socket(socket.AF_UNIX)
            s.bind(str(root / "sub" / "sock"))
            s.close()
        elif kind == "dirlink":
            os.symlink(root, root / "sub" / "loop")
        elif kind == "control":
            (root / "sub" / "a\nb").write_text("x")
        elif kind == "not-utf8":
            open(os.path.join(os.fsencode(root / "sub"), b"\xff"), "w").close()
    return make


@pytest.mark.parametrize("kind, problem", [
    ("symlink", "/sub/link' is a symbolic link: scripts travel as regular files and directories only"),
    ("dirlink", "/sub/loop' is a symbolic link"),
    ("fifo", "/sub/pipe' is a FIFO: scripts travel as regular files and directories only"),
    ("socket", "/sub/sock' is a socket"),
    ("control", "/sub/a\\nb': the name has characters scripts cannot have"),
    ("not-utf8", ": the name is not UTF-8"),
])
def test_packing_refuses_what_must_not_travel_naming_the_file(tmp_path, kind, problem):
    """Symbolic links, FIFOs, sockets and names the broker refuses: one line naming the file."""
    (tmp_path / "sub").mkdir()
    (tmp_path / "ok").write_text("fine")
    special(kind)(tmp_path)
    with pytest.raises(ScriptsError) as info:
        pack_tree(str(tmp_path))
    assert problem in str(info.value) and "\n" not in str(info.value)


def test_packing_refuses_a_device(tmp_path, monkeypatch):
    """A device (made to look like one: creating a real one needs root) is refused by name."""
    (tmp_path / "dev").write_text("")
    real_lstat = os.lstat

    def lstat(path, *a, **k):
        result = real_lstat(path, *a, **k)
        if str(path).endswith("/dev"):
            return os.stat_result((stat.S_IFCHR | 0o600,) + tuple(result)[1:])
        return result
    monkeypatch.setattr(os, "lstat", lstat)
    with pytest.raises(ScriptsError, match=r"/dev' is a device: scripts travel as regular files"):
        pack_tree(str(tmp_path))


def test_packing_bounds(tmp_path, monkeypatch):
    """Not a directory, more than MAX_SCRIPTS packed, more entries than MAX_SCRIPT_FILES: one line each."""
    with pytest.raises(ScriptsError, match=r"cannot read '.*/missing': No such file or directory"):
        pack_tree(str(tmp_path / "missing"))
    (tmp_path / "file").write_text("x")
    with pytest.raises(ScriptsError, match=r"'.*/file' is not a directory"):
        pack_tree(str(tmp_path / "file"))
    big = tmp_path / "big"
    big.mkdir()
    (big / "blob").write_bytes(os.urandom(rules.MAX_SCRIPTS + 1000))
    with pytest.raises(ScriptsError, match=rf"packs to more than {rules.MAX_SCRIPTS} bytes gzip'd \(at 'blob'\)"):
        pack_tree(str(big))
    many = tmp_path / "many"
    many.mkdir()
    monkeypatch.setattr(rules, "MAX_SCRIPT_FILES", 5)
    for i in range(6):
        (many / str(i)).write_text("")
    with pytest.raises(ScriptsError, match=r"holds more than 5 files and directories"):
        pack_tree(str(many))


# ------------------------------------------------------------------ scripts: the cluster file and create

SCRIPTED = 'name = "s"\nscripts = "ctx-scripts"\n[[group]]\nname = "g"\nquantity = 1\n'


def test_cluster_file_scripts_are_packed_relative_to_the_file(tmp_path, monkeypatch):
    """``scripts = "DIR"`` is read relative to the cluster file (not the cwd) and sent as
    ``{"b64", "sha256"}`` of the packed tree; without it no key is sent."""
    scripts_tree(tmp_path / "ctx-scripts")
    (tmp_path / "c.toml").write_text(SCRIPTED)
    monkeypatch.chdir("/")
    body = load_cluster_file(str(tmp_path / "c.toml"))
    packed = pack_tree(str(tmp_path / "ctx-scripts"))
    assert body["scripts"] == {"b64": base64.b64encode(packed).decode(), "sha256": hashlib.sha256(packed).hexdigest()}
    assert "scripts" not in load_cluster_file(os.path.join(HERE, os.pardir, "examples", "torque", "cluster.toml"))


@pytest.mark.parametrize("value, problem", [
    ('""', "scripts: must be a non-empty path string: a directory of ctx-scripts"),
    ("3", "scripts: must be a non-empty path string"),
    ('"nowhere"', "scripts: cannot read '"),
])
def test_cluster_file_scripts_errors_are_one_line(tmp_path, value, problem):
    """A bad ``scripts`` value is one line naming the field."""
    (tmp_path / "c.toml").write_text(SCRIPTED.replace('"ctx-scripts"', value))
    with pytest.raises(ClusterFileError) as info:
        load_cluster_file(str(tmp_path / "c.toml"))
    assert str(info.value).startswith(f"{tmp_path / 'c.toml'}: {problem}")


def test_create_sends_the_scripts_and_the_broker_takes_them(broker, tmp_path, agent):
    """create sends the packed scripts; the real broker accepts them (its own checks) and says so."""
    scripts_tree(tmp_path / "ctx-scripts")
    (tmp_path / "c.toml").write_text(SCRIPTED)
    code, out, err = broker.run(["create", str(tmp_path / "c.toml"), "--out", str(tmp_path / "o"), "--embed-agent"])
    assert code == 0, err
    [posted] = [json.loads(r[2]) for r in broker.spy.requests if r[:2] == ("POST", "/v1/contexts")]
    packed = pack_tree(str(tmp_path / "ctx-scripts"))
    assert posted["scripts"]["sha256"] == hashlib.sha256(packed).hexdigest()
    assert f"scripts: {len(packed)} bytes gzip'd (SHA-256 {hashlib.sha256(packed).hexdigest()})" in err


class NoScripts(Resource):
    """A broker older than scripts: its create refuses the key, as ctxd.validate.obj does."""

    isLeaf = True

    def __init__(self, spy):
        super().__init__()
        self.spy = spy

    def render(self, request):
        if request.method == b"POST" and request.path == b"/v1/contexts":
            self.spy.requests.append(("POST", "/v1/contexts", request.content.read(), None))
            request.setResponseCode(400)
            request.setHeader(b"content-type", b"application/json")
            return json.dumps({"error": "bad_request", "message": "body: unknown field 'scripts'"}).encode()
        return self.spy.render(request)


def test_create_against_a_broker_without_scripts_says_so_and_leaves_no_directory(broker, tmp_path, agent):
    """A broker that refuses the key: one line saying it is older than scripts and what to do; the
    --out directory ctxctl had made (empty) is gone again."""
    scripts_tree(tmp_path / "ctx-scripts")
    (tmp_path / "c.toml").write_text(SCRIPTED)
    code, out, err = broker.run(["create", str(tmp_path / "c.toml"), "--out", str(tmp_path / "o"), "--embed-agent"],
                                client=broker.stub(NoScripts(broker.spy)))
    assert code == 1 and err.count("\n") == 1
    assert err.startswith("ctxctl: error: this broker does not take scripts (a ctxd older than them: broker: "
                          "body: unknown field 'scripts' (bad_request, HTTP 400)); remove `scripts` from ")
    assert not (tmp_path / "o").exists()


# ------------------------------------------------------------------ a cluster file checked whole, first

CYCLE = """name = "c"
[[group]]
name = "a"
quantity = 1
provides = ["ra"]
requires = [{ role = "rb", ready = true }]
[[group]]
name = "b"
quantity = 1
provides = ["rb"]
requires = [{ role = "ra", ready = true }]
"""


def test_a_ready_cycle_is_found_before_anything_is_sent_or_made(broker, tmp_path, agent):
    """A cycle of ready requirements is one line naming it, with nothing sent and no --out made."""
    (tmp_path / "c.toml").write_text(CYCLE)
    code, out, err = broker.run(["create", str(tmp_path / "c.toml"), "--out", str(tmp_path / "o")])
    assert code == 1 and broker.spy.requests == [] and not (tmp_path / "o").exists()
    assert err == (f"ctxctl: error: {tmp_path / 'c.toml'}: group: ready requirements form a cycle: a -> b -> a: each of "
                   "these groups waits for the next to be ok, so none ever is (make one of these requirements "
                   "ready = false)\n")


@pytest.mark.parametrize("refusal, message", [
    ("groups[0].certificate: some rule only the broker has",
     "cluster.toml: group[0].certificate: some rule only the broker has (the broker's rule)"),
    ("data.x[2]: no", "cluster.toml: data.x[2]: no (the broker's rule)"),
    ("body: unknown field 'x'", "cluster.toml: the broker would refuse it: body: unknown field 'x'"),
    ("something odd", "cluster.toml: the broker would refuse it: something odd"),
])
def test_the_brokers_other_rules_run_before_create_too(monkeypatch, refusal, message):
    """Whatever else the broker's validation refuses is refused while reading the file, in its words,
    naming the field as the file does where the broker's message names one."""
    from ctxd.errors import InvalidCluster

    def refuse(body):
        raise InvalidCluster(refusal)
    monkeypatch.setattr(validate, "cluster", refuse)
    with pytest.raises(ClusterFileError) as info:
        parse_cluster_text('name = "t"\n[[group]]\nname = "g"\nquantity = 1\n')
    assert str(info.value) == message


def test_a_join_token_ttl_over_the_default_lifetime_is_refused_by_the_file():
    """join_token_ttl over the default expires_in (not in the file) is refused, saying what the default is."""
    with pytest.raises(ClusterFileError, match=r"^cluster.toml: join_token_ttl: must not exceed expires_in, which is "
                                               r"not in the file: its default is 604800 \(7 days\)$"):
        parse_cluster_text('name = "t"\njoin_token_ttl = 604801\n[[group]]\nname = "g"\nquantity = 1\n')
    parse_cluster_text('name = "t"\njoin_token_ttl = 604800\n[[group]]\nname = "g"\nquantity = 1\n')


def test_a_request_too_large_is_refused_before_the_directory_is_made(broker, tmp_path, agent):
    """Data too large for one request is refused before any request and before --out is made."""
    for name in ("a", "b"):
        (tmp_path / name).write_bytes(b"x" * 500_000)
    (tmp_path / "c.toml").write_text('name = "t"\n[data]\nd = { files = ["a", "b"] }\n'
                                     '[[group]]\nname = "g"\nquantity = 1\ndata = ["d"]\n')
    code, out, err = broker.run(["create", str(tmp_path / "c.toml"), "--out", str(tmp_path / "o")])
    assert code == 1 and not (tmp_path / "o").exists()
    assert not [r for r in broker.spy.requests if r[0] == "POST"]
    assert err.startswith("ctxctl: error: request is ") and "the broker accepts at most 1048576 bytes" in err


def test_a_refused_create_leaves_an_existing_directory_alone(broker, tmp_path, agent):
    """A broker refusal removes only a directory ctxctl made: one that existed stays."""
    (tmp_path / "o").mkdir()
    code, out, err = broker.run(["create", os.path.join(HERE, os.pardir, "examples", "torque", "cluster.toml"),
                                 "--out", str(tmp_path / "o"), "--embed-agent"],
                                client=broker.stub(NoScripts(broker.spy)))
    assert code == 1 and (tmp_path / "o").is_dir()


# ------------------------------------------------------------------ wait's reports: where they go

def test_reports_home_follows_xdg_state_home():
    """Reports go under $XDG_STATE_HOME/ctxctl/reports, else ~/.local/state/ctxctl/reports (a relative
    XDG_STATE_HOME is ignored, as the XDG rule says)."""
    home = os.path.expanduser("~")
    assert commands.reports_home({"XDG_STATE_HOME": "/s"}) == "/s/ctxctl/reports"
    assert commands.reports_home({}) == os.path.join(home, ".local", "state", "ctxctl", "reports")
    assert commands.reports_home({"XDG_STATE_HOME": "rel"}) == os.path.join(home, ".local", "state", "ctxctl",
                                                                           "reports")


def test_wait_writes_reports_in_the_state_home_not_the_current_directory(broker, tmp_path, monkeypatch):
    """Without --reports, wait writes REPORTS/CTX/ under the state home, and nothing where it runs."""
    cid, nodes = broker.all_ok()
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "state"))
    (tmp_path / "cwd").mkdir()
    monkeypatch.chdir(tmp_path / "cwd")
    code, out, err = broker.run(["wait", cid])
    reports = tmp_path / "state" / "ctxctl" / "reports" / cid
    assert code == 0 and err.splitlines()[-1] == f"all 4 nodes ok; reports in {reports}"
    assert len(list(reports.iterdir())) == 4 and list((tmp_path / "cwd").iterdir()) == []


# ------------------------------------------------------------------ another broker's certificate

def other_ca_server_cert(names=("127.0.0.1",)):
    """A CA (named as ctxd names its CA) and a server certificate it issued: another broker's."""
    ca, ca_key = tls.make_ca()
    cert, key = tls.make_server_cert(ca, ca_key, names)
    return ca, cert, key


def der(cert):
    from cryptography.hazmat.primitives import serialization
    return cert.public_bytes(serialization.Encoding.DER)


def fingerprint(cert):
    from cryptography.hazmat.primitives import hashes
    digest = cert.fingerprint(hashes.SHA256()).hex().upper()
    return ":".join(digest[i:i + 2] for i in range(0, len(digest), 2))


VERIFY_FAILED = ResponseNeverReceived([Failure(__import__("OpenSSL").SSL.Error(
    [("SSL routines", "", "certificate verify failed")]))])


def test_a_certificate_from_another_ca_is_said_with_both_fingerprints():
    """A refused certificate that another CA issued (even one with the same name): both SHA-256
    fingerprints, the issuer's too when the chain has it, and that another broker may be answering."""
    from cryptography import x509

    mine = x509.load_pem_x509_certificate(CA_PEM.encode())
    ca, cert, _ = other_ca_server_cert()
    assert ca.subject == mine.subject  # both "ctxd CA": only the key tells them apart
    message = str(describe_failure(VERIFY_FAILED, URL, "/etc/ca.pem", ca_pem=CA_PEM.encode(),
                                   probe=lambda url: [der(cert), der(ca)]))
    assert message == (
        f"the broker at {URL} presented a certificate from another CA: its certificate (SHA-256 "
        f"{fingerprint(cert)}) was issued by CN=ctxd CA (SHA-256 {fingerprint(ca)}), not by CA /etc/ca.pem "
        f"(CN=ctxd CA, SHA-256 {fingerprint(mine)}); another broker may be answering there (another ctxd, or "
        "one whose state directory was made anew): check the URL, or use that broker's CA")
    leaf_only = str(describe_failure(VERIFY_FAILED, URL, "ca.pem", ca_pem=CA_PEM.encode(),
                                     probe=lambda url: [der(cert)]))
    assert f"was issued by CN=ctxd CA, not by CA ca.pem (CN=ctxd CA, SHA-256 {fingerprint(mine)})" in leaf_only


def test_a_refused_certificate_of_the_same_ca_keeps_the_verify_message():
    """A certificate the configured CA did issue (refused for another reason, e.g. expired), or none
    to be had: the usual 'cannot verify' line."""
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    ca, ca_key = tls.make_ca()
    cert, _ = tls.make_server_cert(ca, ca_key, ["127.0.0.1"])
    pem = ca.public_bytes(serialization.Encoding.PEM)
    usual = "cannot verify the broker's certificate against CA ca.pem (certificate verify failed)"
    assert str(describe_failure(VERIFY_FAILED, URL, "ca.pem", ca_pem=pem, probe=lambda url: [der(cert)])) == usual
    assert str(describe_failure(VERIFY_FAILED, URL, "ca.pem", ca_pem=pem, probe=lambda url: [])) == usual
    assert str(describe_failure(VERIFY_FAILED, URL, "ca.pem", ca_pem=pem, probe=lambda url: [b"junk"])) == usual
    assert x509.load_der_x509_certificate(der(cert)).issuer == ca.subject


@pytest.fixture
def other_broker(tmp_path):
    """A TLS server on loopback presenting another CA's certificate (the TLS handshake, nothing
    more): (URL, that CA, its server certificate)."""
    ca, cert, key = other_ca_server_cert()
    (tmp_path / "srv.pem").write_bytes(tls.cert_pem(cert))
    (tmp_path / "srv.key").write_bytes(tls.key_pem(key))
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(str(tmp_path / "srv.pem"), str(tmp_path / "srv.key"))
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(0.2)
    stop = threading.Event()

    def serve():
        while not stop.is_set():
            try:
                conn, _ = listener.accept()
            except socket.timeout:
                continue
            try:
                conn.settimeout(5)
                with context.wrap_socket(conn, server_side=True):
                    pass
            except (OSError, ssl.SSLError):
                pass
            finally:
                conn.close()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    yield f"https://127.0.0.1:{listener.getsockname()[1]}", ca, cert
    stop.set()
    thread.join(5)
    listener.close()


def test_the_probe_reads_the_presented_certificate(other_broker):
    """presented_certificates gets the certificate a server presents, verifying nothing; none from a
    port nobody listens on."""
    url, ca, cert = other_broker
    assert presented_certificates(url)[0] == der(cert)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        free = s.getsockname()[1]
    assert presented_certificates(f"https://127.0.0.1:{free}", timeout=2) == []


def test_ctxctl_says_another_broker_answers_there(other_broker, tmp_path):
    """The real ctxctl against a server with another CA's certificate: one line with both fingerprints
    and that another broker may be answering, exit 1, no traceback."""
    url, ca, cert = other_broker
    from cryptography import x509

    (tmp_path / "ca.pem").write_text(CA_PEM)
    (tmp_path / "token").write_text(ADMIN_TOKEN + "\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CTXCTL_", "XDG_"))}
    env["HOME"] = str(tmp_path)
    done = subprocess.run([sys.executable, "-m", "ctxd.ctxctl", "--url", url, "--ca", str(tmp_path / "ca.pem"),
                           "--token-file", str(tmp_path / "token"), "list"],
                          capture_output=True, text=True, timeout=60, env=env, cwd=str(tmp_path))
    mine = x509.load_pem_x509_certificate(CA_PEM.encode())
    assert (done.returncode, done.stdout) == (1, "")
    assert done.stderr == (
        f"ctxctl: error: the broker at {url} presented a certificate from another CA: its certificate (SHA-256 "
        f"{fingerprint(cert)}) was issued by CN=ctxd CA, not by CA {tmp_path / 'ca.pem'} (CN=ctxd CA, SHA-256 "
        f"{fingerprint(mine)}); another broker may be answering there (another ctxd, or one whose state "
        "directory was made anew): check the URL, or use that broker's CA\n")


def test_gzip_module_agrees_the_header_has_no_time(tmp_path):
    """The packed tree is a plain gzip stream (any gunzip reads it) whose header time is 0."""
    scripts_tree(tmp_path)
    packed = pack_tree(str(tmp_path))
    with gzip.GzipFile(fileobj=io.BytesIO(packed)) as f:
        f.read()
        assert f.mtime == 0
