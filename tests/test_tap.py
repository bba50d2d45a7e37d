"""twistd wiring: options, config file, and what makeService listens on."""

import json
import os
import re
import stat
import zlib

import pytest
from twisted.internet.task import LoopingCall
from twisted.internet.defer import succeed
from twisted.internet.testing import MemoryReactorClock
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.python import usage
from twisted.web.test.requesthelper import DummyRequest

import ctxd
from ctxd import tap
from ctxd.journal import FileJournal
from ctxd.journal.format import HEADER, scan


def options(*argv):
    config = tap.Options()
    config.parseOptions(list(argv))
    return config


def test_defaults(tmp_path, monkeypatch):
    """With no arguments: one ssl:8443 listener and a default state directory."""
    monkeypatch.chdir(tmp_path)
    config = options()
    assert config["listen"] == ["ssl:8443"]
    assert config["state-dir"] in (tap.SYSTEM_STATE_DIR, str(tmp_path / "ctxd-state"))


def test_config_file_fills_unset_options(tmp_path):
    """INI settings apply where the command line said nothing; the command line wins."""
    conf = tmp_path / "ctxd.conf"
    conf.write_text("[ctxd]\nstate-dir = /srv/ctxd\nlisten = ssl:9443 ssl:9444\npublic-url = https://a.example:9443\n")
    config = options("--config", str(conf), "--public-url", "https://b.example:9443")
    assert config["state-dir"] == "/srv/ctxd"
    assert config["listen"] == ["ssl:9443", "ssl:9444"]
    assert config["public-url"] == "https://b.example:9443"


@pytest.mark.parametrize(
    "argv, text",
    [
        (["--public-url", "http://x"], "https://"),
        (["--tls-cert", "/nonexistent"], "go together"),
        (["--max-body", "ten"], "--max-body"),
        (["--listen", "nonsense"], "--listen"),
        (["--site-ca-cert", "/etc/hostname"], "--site-ca-cert and --site-ca-key go together"),
        (["--site-ca-cert", "/nonexistent", "--site-ca-key", "/etc/hostname"], "no such file: /nonexistent"),
    ],
)
def test_bad_options(argv, text):
    """Bad options raise UsageError with a message naming the option."""
    with pytest.raises(usage.UsageError) as info:
        options(*argv)
    assert text in str(info.value)


@pytest.mark.parametrize("argv, logged", [((), False), (("--access-log",), True)])
def test_access_log_only_when_asked(tmp_path, argv, logged):
    """The API writes no line per request unless --access-log: what it logs then is Twisted's
    combined log line, written by the Site behind the TLS wrapper."""
    config = options("--state-dir", str(tmp_path / "state"), "--listen", "ssl:0:interface=127.0.0.1",
                     "--metrics-listen", "none", *argv)
    reactor = MemoryReactorClock()
    svc = tap.makeService(config, reactor)
    svc.startService()
    try:
        site = reactor.tcpServers[0][1].wrappedFactory
    finally:
        svc.stopService()
    lines = []
    # Where Site.log writes once started: _logFile (str lines) in current Twisted, logFile
    # (UTF-8 bytes) on Debian 12's 22.4.
    site._logFile = site.logFile = type("Lines", (), {"write": lambda self, line: lines.append(line)})()
    request = DummyRequest([b"healthz"])
    request.method, request.uri, request.clientproto, request.code = b"GET", b"/healthz", b"HTTP/1.1", 200
    request.sentLength = 0
    site.log(request)
    assert bool(lines) is logged, lines


def test_config_file_flags(tmp_path):
    """Flags (standby, repair) can be set in the file as booleans; a non-boolean is an error."""
    conf = tmp_path / "ctxd.conf"
    conf.write_text("[ctxd]\nstandby = true\nrepair = no\n")
    config = options("--config", str(conf))
    assert config["standby"] and not config["repair"]
    conf.write_text("[ctxd]\nstandby = maybe\n")
    with pytest.raises(usage.UsageError) as info:
        options("--config", str(conf))
    assert "standby must be true or false" in str(info.value)


def test_sample_config_parses(tmp_path):
    """etc/ctxd.conf (the package's conffile) parses, and uncommenting its examples is valid too."""
    sample = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "etc", "ctxd.conf")
    assert options("--config", sample)["listen"] == ["ssl:8443"]
    uncommented, seen = [], set()
    with open(sample) as f:
        for line in f:
            match = re.match(r"# ([a-z-]+) = (.*)", line)
            if match and not match.group(1).startswith(("tls-", "client-ca", "site-ca")):   # files
                seen.add(match.group(1))
                line = line[2:]
            uncommented.append(line)
    assert {"listen", "max-connections", "metrics-listen", "standby"} <= seen
    everything = tmp_path / "ctxd.conf"
    everything.write_text("".join(uncommented))
    config = options("--config", str(everything))
    assert config["listen"] == ["ssl:8443:interface=\\:\\:"]
    assert config["max-connections"] == 16000 and config["standby"]


def test_unknown_config_setting(tmp_path):
    """An unknown setting in the config file is an error, not silently ignored."""
    conf = tmp_path / "ctxd.conf"
    conf.write_text("[ctxd]\nlisten_on = 1\n")
    with pytest.raises(usage.UsageError) as info:
        options("--config", str(conf))
    assert "listen_on" in str(info.value)


def test_make_service_listens_and_writes_state(tmp_path):
    """makeService binds each listener (TLS wrapped) and writes what ctxctl needs."""
    state = tmp_path / "state"
    config = options(
        "--state-dir", str(state), "--listen", "ssl:0:interface=127.0.0.1", "--listen", "ssl:0:interface=\\:\\:1",
        "--public-url", "https://127.0.0.1:8443",
    )
    reactor = MemoryReactorClock()
    svc = tap.makeService(config, reactor)
    svc.startService()
    try:
        # The API's listeners, then the monitoring one (plain HTTP, loopback only, by default).
        assert [(port[0], port[3]) for port in reactor.tcpServers] == [(0, "127.0.0.1"), (0, "::1"),
                                                                       (9464, "127.0.0.1")]
        # A join storm opens thousands of connections at once: a deep listen queue by default.
        assert [port[2] for port in reactor.tcpServers[:2]] == [4096, 4096]
        assert isinstance(reactor.tcpServers[0][1], TLSMemoryBIOFactory)
        assert not isinstance(reactor.tcpServers[2][1], TLSMemoryBIOFactory)
        assert stat.S_IMODE(os.stat(state).st_mode) == 0o700
        assert stat.S_IMODE(os.stat(state / "admin.token").st_mode) == 0o600
        assert (state / "admin.token").read_text().startswith("ctxd_adm_")
        # Every context's certificate authorities derive from it (ctxd.credentials).
        assert stat.S_IMODE(os.stat(state / "credentials.key").st_mode) == 0o600
        assert len((state / "credentials.key").read_bytes()) == 32
        ctl = json.loads((state / "ctxctl.json").read_text())
        assert ctl == {
            "url": "https://127.0.0.1:8443",
            "ca": str(state / "tls" / "ca.pem"),
            "token_file": str(state / "admin.token"),
        }
    finally:
        svc.stopService()


def test_started_service_writes_its_pid_and_runs_timers_on_the_given_reactor(tmp_path):
    """The lock file names the process that runs the service (written on start, after any fork of
    twistd's), and the periodic sweep is scheduled on the reactor makeService was given."""
    state = tmp_path / "state"
    config = options("--state-dir", str(state), "--listen", "ssl:0:interface=127.0.0.1",
                     "--public-url", "https://127.0.0.1:8443")
    reactor = MemoryReactorClock()
    svc = tap.makeService(config, reactor)
    assert (state / "lock").read_text() == ""
    svc.startService()
    try:
        assert (state / "lock").read_text() == f"{os.getpid()}\n"
        assert tap.SWEEP_INTERVAL in [call.getTime() for call in reactor.getDelayedCalls()]
        # The enrollment log's count of what it did not list is said every second.
        looping = [call.func for call in reactor.getDelayedCalls() if isinstance(call.func, LoopingCall)]
        assert [c.interval for c in looping
                if getattr(c.f, "__func__", None) is tap.Broker.flush_enrollment_log] == [1]
    finally:
        svc.stopService()


def test_listen_backlog_option_and_listener_override(tmp_path):
    """--listen-backlog sets every listener's queue unless its description names backlog= itself."""
    config = options(
        "--state-dir", str(tmp_path / "state"), "--listen-backlog", "300",
        "--listen", "ssl:0:interface=127.0.0.1", "--listen", "ssl:0:interface=127.0.0.1:backlog=7",
        "--public-url", "https://127.0.0.1:8443",
    )
    reactor = MemoryReactorClock()
    svc = tap.makeService(config, reactor)
    svc.startService()
    try:
        assert [port[2] for port in reactor.tcpServers[:2]] == [300, 7]
    finally:
        svc.stopService()
    assert tap.with_backlog("unix:/run/ctxd.sock", 5) == "unix:/run/ctxd.sock"


def test_a_backlog_the_kernel_caps_is_said_at_start(tmp_path):
    """Linux silently lowers a listen backlog above net.core.somaxconn: ctxd says so once, naming
    both figures, so that an admin who raised --listen-backlog for storms raises the sysctl too."""
    cap = tmp_path / "somaxconn"
    cap.write_text("4096\n")
    assert tap.backlog_capped("ssl:8443:backlog=16384", str(cap)) == (16384, 4096)
    assert tap.backlog_capped("ssl:8443:backlog=4096", str(cap)) is None
    assert tap.backlog_capped("unix:/run/ctxd.sock", str(cap)) is None
    assert tap.backlog_capped("ssl:8443:backlog=16384", str(tmp_path / "missing")) is None

    if not os.path.exists(tap.SOMAXCONN):
        pytest.skip("no " + tap.SOMAXCONN + " here")
    with open(tap.SOMAXCONN) as f:
        kernel = int(f.read())
    config = options("--state-dir", str(tmp_path / "state"), "--listen-backlog", str(kernel + 1),
                     "--listen", "ssl:0:interface=127.0.0.1", "--public-url", "https://127.0.0.1:8443")
    events = []
    from twisted.logger import globalLogPublisher
    globalLogPublisher.addObserver(events.append)
    try:
        tap.makeService(config, MemoryReactorClock())
    finally:
        globalLogPublisher.removeObserver(events.append)
    said = [e for e in events if e.get("asked") == kernel + 1]
    assert len(said) == 1 and said[0]["cap"] == kernel and "net.core.somaxconn" in said[0]["log_format"]


def test_admin_token_kept_across_starts(tmp_path):
    """The admin token is created once and reused on the next start."""
    path = str(tmp_path / "admin.token")
    first = tap.ensure_admin_token(path)
    assert tap.ensure_admin_token(path) == first


def test_default_public_url_uses_listener():
    """The default public URL takes the first listener's interface and port."""
    assert tap.default_public_url(["ssl:8443:interface=10.1.2.3"]) == "https://10.1.2.3:8443"
    assert tap.default_public_url(["ssl:9443:interface=\\:\\:1"]) == "https://[::1]:9443"


def test_issued_certificate_needs_its_ca(tmp_path):
    """--tls-cert issued by a CA (not self-signed) without --tls-ca is refused with a clear message."""
    from ctxd import tls

    files = tls.ensure_generated(str(tmp_path / "tls"), {"localhost"})
    config = options("--state-dir", str(tmp_path / "s"), "--tls-cert", files.cert, "--tls-key", files.key)
    with pytest.raises(usage.UsageError) as info:
        tap.makeService(config, MemoryReactorClock())
    assert "--tls-ca" in str(info.value)
    config = options(
        "--state-dir", str(tmp_path / "s"), "--tls-cert", files.cert, "--tls-key", files.key, "--tls-ca", files.ca,
        "--listen", "ssl:0:interface=127.0.0.1", "--public-url", "https://localhost:8443",
    )
    tap.makeService(config, MemoryReactorClock())
    assert json.loads((tmp_path / "s" / "ctxctl.json").read_text())["ca"] == files.ca


def test_corrupt_journal_stops_startup_with_one_line(tmp_path):
    """Damage in the middle of the journal stops start-up with one line naming the offset."""
    state = tmp_path / "state"
    state.mkdir()
    journal = FileJournal(str(state / "journal.log"), lambda f, *a: succeed(f(*a)))
    journal.load()
    for i in range(3):
        journal.append({"op": "x", "i": i})
    journal.close()
    offset = scan(str(state / "journal.log")).records[1][1]
    content = bytearray((state / "journal.log").read_bytes())
    content[offset + 20] ^= 1
    (state / "journal.log").write_bytes(bytes(content))
    config = options("--state-dir", str(state), "--listen", "ssl:0:interface=127.0.0.1")
    with pytest.raises(SystemExit) as info:
        tap.makeService(config, MemoryReactorClock())
    message = str(info.value)
    assert message.startswith("ctxd: ") and f"offset {offset} " in message and "\n" not in message
    assert (state / "journal.log").read_bytes() == bytes(content)
    assert options("--state-dir", str(state), "--repair")["repair"] and not config["repair"]


def test_journal_of_a_newer_format_is_refused_with_one_line(tmp_path):
    """A journal written by a newer ctxd (a later format version; e.g. after a package downgrade)
    stops start-up with one line naming both versions, and the file is left as it was."""
    state = tmp_path / "state"
    state.mkdir()
    journal = FileJournal(str(state / "journal.log"), lambda f, *a: succeed(f(*a)))
    journal.load()
    journal.append({"op": "x"})
    journal.close()
    content = bytearray((state / "journal.log").read_bytes())
    magic, version, file_id, _ = HEADER.unpack_from(content)
    head = HEADER.pack(magic, version + 1, file_id, 0)
    content[:HEADER.size] = HEADER.pack(magic, version + 1, file_id, zlib.crc32(head[:-4]))
    (state / "journal.log").write_bytes(bytes(content))
    config = options("--state-dir", str(state), "--listen", "ssl:0:interface=127.0.0.1")
    with pytest.raises(SystemExit) as info:
        tap.makeService(config, MemoryReactorClock())
    message = str(info.value)
    assert message.startswith("ctxd: ") and "\n" not in message
    assert f"format version {version + 1} " in message and f"reads version {version})" in message
    assert (state / "journal.log").read_bytes() == bytes(content)


def test_limits_from_config_and_command_line(tmp_path):
    """Limits take the config file's values unless the command line gives one; defaults otherwise."""
    conf = tmp_path / "ctxd.conf"
    conf.write_text("[ctxd]\nmax-connections = 50\nrequest-deadline = 5\n")
    config = options("--config", str(conf), "--max-connections", "70")
    assert config["max-connections"] == 70
    assert config["request-deadline"] == 5.0
    assert config["enroll-rate-per-source"] == 120
    with pytest.raises(usage.UsageError):
        options("--max-connections", "-1")


def test_second_broker_on_same_state_dir_refused(tmp_path):
    """An exclusive lock stops a second ctxd from opening the same state directory, with one clear line."""
    state = tmp_path / "state"
    argv = ("--state-dir", str(state), "--listen", "ssl:0:interface=127.0.0.1", "--public-url", "https://127.0.0.1:1")
    first = tap.makeService(options(*argv), MemoryReactorClock())
    with pytest.raises(SystemExit) as info:
        tap.makeService(options(*argv), MemoryReactorClock())
    assert "another ctxd" in str(info.value) and str(state) in str(info.value)
    assert stat.S_IMODE(os.stat(state / "lock").st_mode) == 0o600
    (holder,) = [s for s in first if hasattr(s, "state_lock")]
    os.close(holder.state_lock)
    tap.makeService(options(*argv), MemoryReactorClock())  # free once the first lets go


def test_start_up_errors_are_one_line_with_the_fix(tmp_path):
    """Under twistd, a bad setting, a state directory it may not use and a port in use each stop
    start-up with one line saying what to do; --version prints ctxd's version."""
    import socket
    import subprocess
    import sys

    twistd = [sys.executable, "-c", "import sys; from twisted.scripts.twistd import run; sys.exit(run())",
              "-n", "--pidfile=", "ctxd", "--metrics-listen", "none"]

    def start(*argv):
        return subprocess.run(twistd + list(argv), capture_output=True, text=True, timeout=60)

    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen()
    port = busy.getsockname()[1]
    unusable = tmp_path / "file-not-dir"
    unusable.write_text("")
    conf = tmp_path / "bad.conf"
    conf.write_text("[ctxd]\nlisten_on = 1\n")
    cases = [
        (["--state-dir", str(tmp_path / "s1"), "--listen", f"ssl:{port}:interface=127.0.0.1"],
         f"cannot listen on ssl:{port}:interface=127.0.0.1"),
        (["--state-dir", str(unusable / "x")], "cannot use the state directory"),
        (["--config", str(conf)], "unknown setting 'listen_on'"),
        (["--state-dir", str(tmp_path / "s2"), "--listen", "bogus:1"], "is not a listener description"),
        (["--state-dir", str(tmp_path / "s3"), "--site-ca-cert", str(conf), "--site-ca-key", str(conf)],
         "host credentials: "),
    ]
    try:
        for argv, message in cases:
            done = start(*argv)
            output = done.stdout + done.stderr   # (twistd -n logs its stderr into its log, on stdout)
            said = [line for line in output.splitlines() if "ctxd: " in line and message in line]
            assert done.returncode != 0 and len(said) == 1, (argv, output)
            assert "Traceback" not in output, (argv, output)
    finally:
        busy.close()
    version = start("--version")
    assert (version.returncode, version.stdout.strip()) == (0, f"ctxd {ctxd.__version__}")


@pytest.mark.parametrize("url, problem", [
    ("https://127.0.0.1:8443", "loopback"), ("https://[::1]:8443", "loopback"), ("https://localhost:8443", "loopback"),
    ("https://head.localdomain", "loopback"), ("https://nosuchhost-ctxd-test:8443", "does not resolve"),
    ("https://loopy.example:8443", "loopback addresses only"),
    ("https://10.0.0.5:8443", None), ("https://head.cluster.example:8443", None),
])
def test_public_url_that_cannot_work_for_vms_is_named(url, problem):
    """A public URL the VMs could not use (loopback, unresolvable) is recognised at start (a warning)."""
    def resolve(host, port):
        table = {"loopy.example": ["127.0.1.1"], "head.cluster.example": ["10.0.0.5"]}
        if host not in table:
            raise OSError("no such name")
        return [(None, None, None, None, (a, 0)) for a in table[host]]

    found = tap.public_url_problem(url, resolve)
    assert (found is None) if problem is None else (problem in found), found
