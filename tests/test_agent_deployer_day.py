"""The agent's part of issue 16 ("The deployer's day"): why a first run waits reaches the broker
(rate-bounded), the ctx-scripts tree a view delivers (fetched, checked, unpacked safely, baked
scripts first), another context's managed blocks replaced, a named bootstrap file that is missing,
and an unsupported SSH host key type. The broker's side is tests/test_scripts_delivery.py and
tests/test_progress.py."""

import gzip
import hashlib
import io
import json
import logging
import os
import stat
import tarfile
import time
import types

import pytest
import test_agent
from test_agent import CID, NID, agent_argv, recorded, sample_view

import ctxagent

# The agent uses no library of ctxd's: `make test-debian` leaves these tests to `test-pypi`.
pytestmark = pytest.mark.agent

site, bootstrap, ca_pem, broker = test_agent.site, test_agent.bootstrap, test_agent.ca_pem, test_agent.broker
OTHER = "T3RoZXItY29udGV4dC0xMj"


# ---------------------------------------------------------------------------
# Why a first run waits

class Timeline(object):
    """The agent's clock (time.monotonic and time.sleep) and a broker whose view changes at set times:
    a view request long-polls (the clock runs on) until the next change or its wait is up (304)."""

    def __init__(self, monkeypatch, broker, changes):
        self.now, self.changes, self.reports = 1000.0, [(1000.0 + at, view) for at, view in changes], []
        self.polls = []   # (time, wait) of each view request
        self.since = []   # the since= of each view request
        fake_time = types.SimpleNamespace(**{name: getattr(time, name) for name in ("time", "strftime", "gmtime")})
        fake_time.monotonic, fake_time.sleep = (lambda: self.now), self.sleep
        monkeypatch.setattr(ctxagent, "time", fake_time)
        timeline, plain = self, broker.request

        def request(fake, method, path, token=None, body=None, timeout=None):
            if "/view?" in path:
                fake.calls.append((method, path.split("?")[0], body))
                timeline.since.append(int(path.split("since=")[1].split("&")[0]))
                return timeline.view(timeline.since[-1], int(path.rsplit("wait=", 1)[1]))
            if path.endswith("/report"):
                timeline.reports.append((self.now - 1000.0, body))
            return plain(fake, method, path, token, body, timeout)
        broker.request = request

    def sleep(self, seconds):
        self.now += seconds

    def current(self):
        return [view for at, view in self.changes if at <= self.now][-1]

    def view(self, since, wait):
        self.polls.append((self.now - 1000.0, wait))
        assert len(self.polls) < 50, "the agent polls in a loop: %s" % self.polls[-5:]
        if self.current()["revision"] <= since:
            upcoming = [at for at, _ in self.changes if at > self.now]
            if not upcoming or upcoming[0] > self.now + wait:
                self.now += wait
                return 304, b""
            self.now = upcoming[0]
        return 200, json.dumps(self.current()).encode()


def waiting(revision, *reasons):
    return sample_view(revision=revision, complete=False, waiting_for=list(reasons))


def contextualizing(timeline):
    return [(at, body["message"]) for at, body in timeline.reports if body["state"] == "contextualizing"]


R1, R2, R3 = "role torquemaster: 0 of 1 providers ok", "context is not locked yet", "data gridmap: no value yet"


def test_a_long_wait_is_reported_after_10_s_then_on_change_at_most_every_30_s(site, bootstrap, broker, monkeypatch):
    """First at 10 s (the long-poll ends then for it), a reason changing twice within 30 s of that is
    reported once, at 40 s (the latest reason), and one not changed is not repeated; then ok."""
    tmp_path, paths = site
    timeline = Timeline(monkeypatch, broker, [(0, waiting(1, R1)), (25, waiting(2, R1, R2)), (30, waiting(3, R3)),
                                              (31, waiting(4, R3)), (100, sample_view(revision=5))])
    assert ctxagent.main(agent_argv(tmp_path, paths, bootstrap, "--poll-wait", "120")) == 0
    assert contextualizing(timeline) == [(10, "waiting: " + R1), (40, "waiting: " + R3)]
    assert [body["state"] for _, body in timeline.reports] == ["contextualizing", "contextualizing", "ok"]
    assert timeline.polls == [(0, 120), (0, 10), (10, 120), (25, 15), (30, 10), (31, 9), (40, 120)]
    assert "watch" not in timeline.reports[0][1]


def test_a_fast_cluster_sends_no_extra_request(site, bootstrap, broker, monkeypatch):
    """A view complete within 10 s: enroll, the views, the ok report - nothing else."""
    tmp_path, paths = site
    timeline = Timeline(monkeypatch, broker, [(0, waiting(1, R1)), (9.5, sample_view(revision=2))])
    assert ctxagent.main(agent_argv(tmp_path, paths, bootstrap, "--poll-wait", "120")) == 0
    assert [(m, p.rsplit("/", 1)[1]) for m, p, _ in broker.calls] == [
        ("POST", "enroll"), ("GET", "view"), ("GET", "view"), ("POST", "report")]
    assert [body["state"] for _, body in timeline.reports] == ["ok"]
    assert timeline.since == [-1, 1]   # a broker whose enrollment reply has no view_progress (older)


def with_progress(broker, progress):
    """The fake broker's enrollment reply, carrying PROGRESS as its view_progress."""
    plain = broker.request

    def request(fake, method, path, token=None, body=None, timeout=None):
        status, raw = plain(fake, method, path, token, body, timeout)
        if path.endswith("/enroll"):
            raw = json.dumps(dict(json.loads(raw), view_progress=progress)).encode()
        return status, raw
    broker.request = request


def test_an_incomplete_view_is_not_fetched_before_it_changes(site, bootstrap, broker, monkeypatch):
    """The enrollment's reply says the view is incomplete: the first request for it is already the
    long-poll from that revision, so a cluster complete within 10 s costs 3 requests in all."""
    tmp_path, paths = site
    timeline = Timeline(monkeypatch, broker, [(0, waiting(1, R1)), (9.5, sample_view(revision=2))])
    with_progress(broker, {"revision": 1, "complete": False, "waiting_for": [R1]})
    assert ctxagent.main(agent_argv(tmp_path, paths, bootstrap, "--poll-wait", "120")) == 0
    assert [(m, p.rsplit("/", 1)[1]) for m, p, _ in broker.calls] == [
        ("POST", "enroll"), ("GET", "view"), ("POST", "report")]
    assert timeline.since == [1]
    assert timeline.polls == [(0, 10)]   # (ended in time for the report of why it waits, were it needed)


def test_a_view_complete_at_enrollment_is_fetched_at_once(site, bootstrap, broker, monkeypatch):
    tmp_path, paths = site
    timeline = Timeline(monkeypatch, broker, [(0, sample_view(revision=2))])
    with_progress(broker, {"revision": 2, "complete": True, "waiting_for": []})
    assert ctxagent.main(agent_argv(tmp_path, paths, bootstrap, "--poll-wait", "120")) == 0
    assert timeline.since == [-1]


def test_a_broken_view_progress_ends_the_run_before_any_script(site, bootstrap, broker, monkeypatch):
    """What the broker would never send is an input error (EXIT_INPUT), and nothing runs."""
    tmp_path, paths = site
    Timeline(monkeypatch, broker, [(0, sample_view(revision=2))])
    with_progress(broker, {"revision": "2", "complete": False})
    assert ctxagent.main(agent_argv(tmp_path, paths, bootstrap, "--poll-wait", "120")) == ctxagent.EXIT_INPUT
    assert not [p for _, p, _ in broker.calls if "/view" in p]


def test_the_waiting_report_is_advisory_redacted_and_says_watch(site, bootstrap, broker, monkeypatch, capsys):
    """A refused or failing waiting report is logged and the run goes on; its message is redacted and
    bounded; a watching agent says so in it too."""
    tmp_path, paths = site
    secret = "group head (%s)" % bootstrap["join_token"]
    timeline = Timeline(monkeypatch, broker, [(0, waiting(1, secret, "x" * 300)), (20, waiting(2, R1)),
                                              (100, sample_view(revision=3))])
    answers = iter([(409, b'{"error": "state_conflict", "message": "no"}'), OSError("connection reset")])
    plain = broker.request

    def request(fake, method, path, token=None, body=None, timeout=None):
        if path.endswith("/report") and body["state"] == "contextualizing":
            answer = next(answers)
            plain(fake, method, path, token, body, timeout)   # recorded
            if isinstance(answer, Exception):
                raise answer
            return answer
        if "delta=1" in path:   # the watch's first long-poll: this node departed, the watch ends
            return 410, b'{"error": "gone", "message": "departed"}'
        return plain(fake, method, path, token, body, timeout)
    broker.request = request
    argv = agent_argv(tmp_path, paths, bootstrap, "--poll-wait", "120", "--watch")
    assert ctxagent.main(argv) == ctxagent.EXIT_REFUSED   # after the ok, the watch ends: departed
    told = contextualizing(timeline)
    assert [at for at, _ in told] == [10, 40]
    first = told[0][1]
    assert first.startswith("waiting: group head (<redacted>); '" + "x" * 80)
    assert bootstrap["join_token"] not in first and len(first) <= ctxagent.MAX_MESSAGE
    assert all(body.get("watch") is True for _, body in timeline.reports)
    assert [body["state"] for _, body in timeline.reports][-1] == "ok"
    err = capsys.readouterr().err
    assert "WARNING could not report contextualizing: HTTP 409 'state_conflict: no'" in err
    assert "WARNING could not report contextualizing: connection reset" in err


# ---------------------------------------------------------------------------
# Scripts that travel

def packed_tree(files=None, extra=None):
    """A gzip'd tar: FILES (name -> content, or (content, mode)), then EXTRA(tar) members."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        for name, content in sorted((files or {}).items()):
            content, mode = content if isinstance(content, tuple) else (content, 0o755)
            info = tarfile.TarInfo(name)
            info.size, info.mode = len(content), mode
            tar.addfile(info, io.BytesIO(content))
        if extra:
            extra(tar)
    return gzip.compress(buffer.getvalue())


def member(name, kind=tarfile.REGTYPE, **fields):
    def add(tar):
        info = tarfile.TarInfo(name)
        info.type = kind
        for key, value in fields.items():
            setattr(info, key, value)
        tar.addfile(info, io.BytesIO(b"x" * info.size) if kind == tarfile.REGTYPE else None)
    return add


def sh(text):
    return b"#!/bin/sh\nprintf '%s\\n' \"" + text.encode() + b" $*\" >> \"$RECORD.delivered\"\n"


def delivered_runs(tmp_path):
    record = tmp_path / "record.delivered"
    return record.read_text().splitlines() if record.exists() else []


def test_a_tree_unpacks_whole_with_normalised_modes(tmp_path):
    """Files (0755 when executable, else 0644) and directories, './' names included, land below the target."""
    packed = packed_tree({"./clean.sh": sh("clean"), "1-ipandhost/torquemaster": sh("ip"),
                          "README": (b"text\n", 0o600)},
                         lambda tar: [member(name, tarfile.DIRTYPE, mode=0o700)(tar) for name in ("3-data", ".", "empty-dir/")])
    target = tmp_path / "abc"
    ctxagent.unpack_scripts(packed, str(target))
    assert sorted(os.listdir(str(target))) == ["1-ipandhost", "3-data", "README", "clean.sh", "empty-dir"]
    assert stat.S_IMODE((target / "clean.sh").stat().st_mode) == 0o755
    assert stat.S_IMODE((target / "README").stat().st_mode) == 0o644
    assert (target / "1-ipandhost" / "torquemaster").read_bytes() == sh("ip")
    assert os.listdir(str(tmp_path)) == ["abc"]   # no temporary directory left


HOSTILE_TREES = [
    ("absolute name", packed_tree({"/etc/cron.d/x": b"x"})),
    ("dot-dot", packed_tree({"../x": b"x"})),
    ("dot-dot inside", packed_tree({"a/../../x": b"x"})),
    ("symlink", packed_tree({}, member("clean.sh", tarfile.SYMTYPE, linkname="/etc/shadow"))),
    ("hard link", packed_tree({"a": b"x"}, member("clean.sh", tarfile.LNKTYPE, linkname="a"))),
    ("device", packed_tree({}, member("dev", tarfile.CHRTYPE, devmajor=1, devminor=3))),
    ("fifo", packed_tree({}, member("fifo", tarfile.FIFOTYPE))),
    ("control character", packed_tree({"a\nb": b"x"})),
    ("below a file", packed_tree({"a": b"x", "a/b": b"y"})),
    ("a file and a directory", packed_tree({"a": b"x"}, member("a", tarfile.DIRTYPE))),
    ("not gzip", b"plain bytes"),
    ("gzip, not tar", gzip.compress(b"x" * 1000)),
    ("truncated", packed_tree({"a": b"x" * 5000})[:-40]),
]


@pytest.mark.parametrize("label, packed", HOSTILE_TREES, ids=[label for label, _ in HOSTILE_TREES])
def test_a_hostile_tree_is_refused_and_nothing_is_left(tmp_path, label, packed):
    """Anything but regular files and directories with relative names is an InputError; nothing is written."""
    with pytest.raises(ctxagent.InputError, match="^scripts: "):
        ctxagent.unpack_scripts(packed, str(tmp_path / "tree"))
    assert os.listdir(str(tmp_path)) == []


def test_a_tree_over_the_limits_is_refused(tmp_path, monkeypatch):
    """More entries, or more unpacked bytes, than the broker allows: refused."""
    monkeypatch.setattr(ctxagent, "MAX_SCRIPT_FILES", 3)
    ctxagent.read_scripts(packed_tree({"a": b"", "b": b"", "c": b""}))
    with pytest.raises(ctxagent.InputError, match="more than 3 entries"):
        ctxagent.read_scripts(packed_tree({"a": b"", "b": b"", "c": b"", "d": b""}))
    monkeypatch.setattr(ctxagent, "MAX_SCRIPTS_UNPACKED", 6000)
    ctxagent.read_scripts(packed_tree({"a": b"x" * 6000}))
    with pytest.raises(ctxagent.InputError, match="6000 bytes"):
        ctxagent.read_scripts(packed_tree({"a": b"x" * 3000, "b": b"x" * 3001}))


@pytest.mark.parametrize("spec", [
    {"sha256": "A" * 64, "size": 10}, {"sha256": "a" * 63, "size": 10}, {"sha256": "a" * 64, "size": 0},
    {"sha256": "a" * 64, "size": True}, {"sha256": "a" * 64, "size": ctxagent.MAX_SCRIPTS + 1},
    {"sha256": "a" * 64}, "a" * 64, {"sha256": "../../etc", "size": 10}])
def test_a_hostile_scripts_announcement_is_refused(spec):
    """The view's scripts entry is checked with the rest of the view: a SHA-256 in hex, a size in bounds."""
    with pytest.raises(ctxagent.InputError, match="view.scripts"):
        ctxagent.validate_view(sample_view(scripts=spec), CID, NID)
    assert ctxagent.validate_view(sample_view(scripts={"sha256": "a" * 64, "size": 9}), CID, NID).scripts == ("a" * 64, 9)


@pytest.fixture
def delivering(broker):
    """The fake broker's views announce BROKER.tree (set it), which GET .../scripts serves."""
    plain = broker.request
    broker.tree = broker.served = None

    def request(fake, method, path, token=None, body=None, timeout=None):
        if "/view?" in path:
            fake.calls.append((method, path.split("?")[0], body))
            spec = {"sha256": hashlib.sha256(broker.tree).hexdigest(), "size": len(broker.tree)}
            return 200, json.dumps(sample_view(scripts=spec)).encode()
        if path.endswith("/scripts"):
            fake.calls.append((method, path, body))
            return 200, broker.served if broker.served is not None else broker.tree
        return plain(fake, method, path, token, body, timeout)
    broker.request = request
    return broker


def fetches(broker):
    return [c for c in broker.calls if c[1].endswith("/scripts")]


def test_delivered_scripts_run_where_none_are_baked_and_baked_ones_win(site, bootstrap, delivering):
    """Each script from --scripts-dir where it is there, else from the delivered tree (STATE/scripts/SHA256,
    0700); a second run uses the unpacked tree without fetching it again."""
    tmp_path, paths = site
    for name in ("4-restarts/torquemaster", "4-restarts/zmaster", "clean.sh"):
        os.unlink(os.path.join(paths.scripts_dir, name))
    delivering.tree = packed_tree({"clean.sh": sh("clean"), "4-restarts/zmaster": sh("zmaster"),
                                   "0-etchosts.sh": sh("etchosts (not run: baked)")})
    assert ctxagent.main(agent_argv(tmp_path, paths, bootstrap)) == 0
    assert delivered_runs(tmp_path) == ["clean ", "zmaster "]
    baked = [r[0] for r in recorded(tmp_path)]
    assert "0-etchosts.sh" in baked and "4-restarts/torquemaster" not in baked
    tree = os.path.join(paths.state_dir, "scripts", hashlib.sha256(delivering.tree).hexdigest())
    assert os.listdir(os.path.dirname(tree)) == [os.path.basename(tree)]
    assert stat.S_IMODE(os.stat(os.path.dirname(tree)).st_mode) == 0o700
    assert stat.S_IMODE(os.stat(tree).st_mode) == 0o700
    assert len(fetches(delivering)) == 1
    assert ctxagent.main(agent_argv(tmp_path, paths, bootstrap)) == 0
    assert len(fetches(delivering)) == 1 and delivered_runs(tmp_path) == ["clean ", "zmaster "] * 2


def test_a_missing_scripts_dir_is_fine_when_the_view_delivers_scripts(site, bootstrap, delivering):
    """--scripts-dir naming no directory: the delivered tree is used; and a failing delivered script
    runs the delivered problem.sh."""
    tmp_path, paths = site
    paths = paths._replace(scripts_dir=str(tmp_path / "no-such-dir"))
    delivering.tree = packed_tree({"clean.sh": sh("clean") + b"exit 3\n", "problem.sh": sh("problem")})
    assert ctxagent.main(agent_argv(tmp_path, paths, bootstrap)) == ctxagent.EXIT_ACTION
    assert delivered_runs(tmp_path) == ["clean ", "problem "]
    assert "script clean.sh exited 3" in delivering.reports()[-1]["message"]


def test_a_missing_scripts_dir_is_an_error_when_nothing_is_delivered(site, bootstrap, broker):
    """--scripts-dir naming no directory and a view without scripts: exit 2, reported, nothing run."""
    tmp_path, paths = site
    paths = paths._replace(scripts_dir=str(tmp_path / "no-such-dir"))
    assert ctxagent.main(agent_argv(tmp_path, paths, bootstrap)) == ctxagent.EXIT_CONFIG
    error = broker.reports()[-1]
    assert error["state"] == "error" and "is missing and the view delivers none" in error["message"]
    assert "ctxd" not in (tmp_path / "hosts").read_text()


@pytest.mark.parametrize("served", [
    lambda tree: tree[:-1],                                              # shorter
    lambda tree: tree + b"\0",                                           # longer
    lambda tree: packed_tree({"clean.sh": sh("other")})[:len(tree)].ljust(len(tree), b"\0"),   # same size, other bytes
])
def test_a_tree_that_is_not_the_announced_one_runs_nothing(site, bootstrap, delivering, served):
    """Size and SHA-256 are checked against the view before anything is unpacked: exit 1, no script,
    no block, nothing under STATE/scripts."""
    tmp_path, paths = site
    delivering.tree = packed_tree({"clean.sh": sh("clean")})
    delivering.served = served(delivering.tree)
    assert ctxagent.main(agent_argv(tmp_path, paths, bootstrap)) == ctxagent.EXIT_INPUT
    assert "not the view's %d bytes" % len(delivering.tree) in delivering.reports()[-1]["message"]
    assert recorded(tmp_path) == [] and delivered_runs(tmp_path) == []
    assert not os.path.exists(os.path.join(paths.state_dir, "scripts"))
    assert "ctxd" not in (tmp_path / "hosts").read_text()


def test_a_hostile_delivered_tree_runs_nothing(site, bootstrap, delivering):
    """A tree the view announces (and the broker serves) with a symlink in it: exit 1, no script, nothing kept."""
    tmp_path, paths = site
    delivering.tree = packed_tree({"clean.sh": sh("clean")}, member("4-restarts/x", tarfile.SYMTYPE, linkname="/bin/sh"))
    assert ctxagent.main(agent_argv(tmp_path, paths, bootstrap)) == ctxagent.EXIT_INPUT
    assert "is not a regular file or directory" in delivering.reports()[-1]["message"]
    assert recorded(tmp_path) == [] and delivered_runs(tmp_path) == []
    assert os.listdir(os.path.join(paths.state_dir, "scripts")) == []


def test_another_contexts_tree_and_a_cut_short_unpacking_are_removed(site, bootstrap, delivering):
    """Unpacking a new tree removes what else STATE/scripts holds."""
    tmp_path, paths = site
    old = os.path.join(paths.state_dir, "scripts")
    for name in ("f" * 64, ".unpacking.x"):
        os.makedirs(os.path.join(old, name, "sub"))
    delivering.tree = packed_tree({"clean.sh": sh("clean")})
    assert ctxagent.main(agent_argv(tmp_path, paths, bootstrap)) == 0
    assert os.listdir(old) == [hashlib.sha256(delivering.tree).hexdigest()]


# ---------------------------------------------------------------------------
# Sharp edges

def block(cid, *lines):
    return "".join(["# BEGIN ctxd (context %s)\n" % cid] + [line + "\n" for line in lines]
                   + ["# END ctxd (context %s)\n" % cid])


def test_another_contexts_blocks_are_replaced(tmp_path):
    """A VM that was in another context (an image made from a contextualized VM) keeps none of its
    blocks: the old addresses would win in /etc/hosts. Everything else stays as it was."""
    hosts = tmp_path / "hosts"
    hosts.write_text("127.0.0.1 localhost\n" + block(OTHER, "10.9.0.1 head.old head") + "# mine\n"
                     + block(OTHER, "10.9.0.2 again") + block("X" * 22, "10.8.0.1 older"))
    ctxagent.update_managed_file(str(hosts), CID, ["10.1.0.1 head.new head"])
    assert hosts.read_text() == "127.0.0.1 localhost\n# mine\n" + block(CID, "10.1.0.1 head.new head")


def test_a_whole_run_replaces_another_contexts_blocks(site, bootstrap, broker):
    """Both managed files of a VM re-run in a new context hold only the new context's block."""
    tmp_path, paths = site
    (tmp_path / "hosts").write_text("127.0.0.1 localhost\n" + block(OTHER, "10.9.0.1 head.old head"))
    (tmp_path / "known_hosts").write_text(block(OTHER, "head.old,head,10.9.0.1 ssh-ed25519 AAAA"))
    assert ctxagent.main(agent_argv(tmp_path, paths, bootstrap)) == 0
    for name in ("hosts", "known_hosts"):
        text = (tmp_path / name).read_text()
        assert OTHER not in text and "10.9.0.1" not in text and "# BEGIN ctxd (context %s)" % CID in text


def test_a_named_bootstrap_file_that_is_missing_is_exit_2(tmp_path, capsys):
    """--bootstrap FILE naming no file: exit 2, one error line, no state directory; cloud-init's
    user-data missing (an instance without user-data) stays exit 0."""
    state = tmp_path / "state"
    assert ctxagent.main(["--bootstrap", str(tmp_path / "absent.json"), "--state-dir", str(state)]) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and err[0].endswith("failed (exit 2): the bootstrap file %s does not exist"
                                             % (tmp_path / "absent.json")), err
    assert ctxagent.main(["--bootstrap", "cloud-init", "--cloud-init-user-data", str(tmp_path / "absent"),
                          "--state-dir", str(state)]) == 0
    assert not state.exists()


def test_an_unsupported_host_key_type_is_an_info_line_without_the_key(tmp_path, caplog):
    """A DSA host key (Debian 12's cloud-init makes one) is not reported: one INFO line naming the
    file and the type, not the key; a malformed file is still a warning."""
    dsa = "AAAAB3NzaC1kc3MAAACBAP" + "q" * 400
    (tmp_path / "ssh_host_dsa_key.pub").write_text("ssh-dss %s root@node\n" % dsa)
    (tmp_path / "ssh_host_ed25519_key.pub").write_text(test_agent.KEY + " root@node\n")
    (tmp_path / "ssh_host_rsa_key.pub").write_text("garbage\n")
    with caplog.at_level(logging.INFO, logger="ctxagent"):
        assert ctxagent.read_ssh_host_keys(str(tmp_path)) == [test_agent.KEY]
    lines = [(r.levelname, r.getMessage()) for r in caplog.records]
    assert ("INFO", "not reporting %s: SSH host key type ssh-dss is not supported"
            % (tmp_path / "ssh_host_dsa_key.pub")) in lines
    assert not any(dsa[:20] in message for _, message in lines)
    assert [level for level, message in lines if "ssh_host_rsa_key.pub" in message] == ["WARNING"]


def test_what_ctxctl_packs_the_agent_unpacks_as_it_was(tmp_path):
    """ctxctl's packer (ctxd/ctxctl/scripts.py) and the agent agree: a tree with nested directories, an
    empty one, a non-ASCII name and both modes comes out as it went in."""
    scripts = pytest.importorskip("ctxd.ctxctl.scripts")
    source = tmp_path / "ctx-scripts"
    for name, content, mode in (("clean.sh", b"#!/bin/sh\n", 0o755), ("1-ipandhost/torquemaster", b"a", 0o700),
                                ("3-data/gridmap", b"b", 0o600), ("lib/caf\xe9.txt", b"c", 0o644)):
        path = source / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content)
        path.chmod(mode)
    (source / "empty").mkdir()
    ctxagent.unpack_scripts(scripts.pack_tree(str(source)), str(tmp_path / "out"))

    def tree(top):
        return sorted((os.path.relpath(os.path.join(d, n), str(top)), None if n in ds else
                       (stat.S_IMODE(os.stat(os.path.join(d, n)).st_mode) & 0o111 != 0,
                        open(os.path.join(d, n), "rb").read()))
                      for d, ds, fs in os.walk(str(top)) for n in ds + fs)
    assert tree(tmp_path / "out") == tree(source) and len(tree(source)) == 8
