"""Shared helpers of the end-to-end tests: real processes, nothing mocked.

- :class:`BrokerProcess` runs ``twistd -n ctxd`` (in the root namespace on loopback,
  or inside a namespace host) and drives the real ``ctxctl`` against it.
- :class:`VM` is one simulated machine: its own agent state dir, scripts dir
  of recording scripts, hosts and known_hosts files and SSH host keys; it
  runs the real ``python3 ctxagent.py``.
- Recording scripts append one JSON line per run (script, argv, CTX_* env,
  start/end times, the data file's content for 3-data) to a per-VM file.
- Managed-block parsing, cluster files, a foreign CA for the wrong-CA test.
"""

from __future__ import annotations

import atexit
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, Iterable, List, Optional, Sequence, Tuple

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
# The components under test; the environment may point at other builds.
TWISTD = Path(os.environ.get("CTXD_E2E_TWISTD", BIN / "twistd"))
CTXCTL = Path(os.environ.get("CTXD_E2E_CTXCTL", BIN / "ctxctl"))
AGENT = Path(os.environ.get("CTXD_E2E_AGENT", REPO / "ctxagent.py"))
# The agent is a stdlib-only script run by whatever python3 a VM has.
AGENT_PYTHON = os.environ.get("CTXD_E2E_AGENT_PYTHON", sys.executable)
EXAMPLE_CLUSTER = REPO / "examples" / "torque" / "cluster.toml"

ROLES = ("torquemaster", "torqueslave")
DATA_NAMES = ("gridmap",)

# Agent exit codes (issue 2 / the agent's documentation).
EXIT_OK, EXIT_INPUT, EXIT_USAGE, EXIT_ENV, EXIT_SCRIPT, EXIT_TIMEOUT, EXIT_REFUSED = range(7)

# The cluster file, exactly as written (the example ships it).
TORQUE_CLUSTER = (REPO / "examples" / "torque" / "cluster.toml").read_text()

GRIDMAP = (
    '"/DC=org/DC=example/OU=People/CN=Alice Example 1234" alice\n'
    '"/DC=org/DC=example/OU=People/CN=Bob Example 5678" bob\n'
)


def components_missing() -> Optional[str]:
    """Why the e2e tests cannot run yet (a component has not landed), or None."""
    needed = {
        "the broker package (ctxd/tap.py)": REPO / "ctxd" / "tap.py",
        "the twistd plugin": REPO / "twisted" / "plugins" / "ctxd_plugin.py",
        "twistd in the virtualenv (pip install -e .)": TWISTD,
        "ctxctl in the virtualenv (pip install -e .)": CTXCTL,
        "the agent (ctxagent.py)": AGENT,
        "the CLI (ctxd/ctxctl/)": REPO / "ctxd" / "ctxctl" / "main.py",
    }
    missing = [what for what, path in needed.items() if not path.exists()]
    return ("not landed yet: " + ", ".join(missing)) if missing else None


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free a moment ago, below the ephemeral range.

    Binding to port 0 would hand out an ephemeral port, which outgoing
    connections (of a parallel run, say) may take as their local port while a
    broker restarts, making the second bind fail.
    """
    try:
        low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        low = 32768
    rng = random.Random()
    for _ in range(200):
        port = rng.randrange(10000, max(low, 10001))
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            try:
                s.bind((host, port))
            except OSError:
                continue
            return port
    raise RuntimeError("no free port below %d" % low)


def die_with_parent() -> None:
    """preexec_fn: SIGKILL this child when the test process dies (Linux prctl)."""
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except Exception:
        pass


_SCRATCH = Path(tempfile.mkdtemp(prefix="ctxd-e2e-home-"))
atexit.register(shutil.rmtree, str(_SCRATCH), True)


def clean_env(**extra: str) -> Dict[str, str]:
    """The environment for child processes, minus anything that steers ctxctl."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CTXCTL_", "XDG_"))}
    # ctxctl keeps its reports and reads its configuration below these: never the user's own.
    env.update(XDG_STATE_HOME=str(_SCRATCH / "state"), XDG_CONFIG_HOME=str(_SCRATCH / "config"))
    env.update(extra)
    return env


def tail(text: str, lines: int = 80) -> str:
    return "\n".join(text.splitlines()[-lines:])


def read_text(path: Path) -> str:
    try:
        return Path(path).read_text(errors="replace")
    except FileNotFoundError:
        return "(%s does not exist)" % path


# --------------------------------------------------------------------------
# Diagnostics printed when a test fails (see conftest.py)


class Diagnostics:
    """Named files and texts to print if the test fails."""

    def __init__(self) -> None:
        self._sources: List[Tuple[str, Callable[[], str]]] = []

    def add_file(self, label: str, path: Path, lines: int = 150) -> None:
        self._sources.append((label, lambda: tail(read_text(path), lines)))

    def add(self, label: str, produce: Callable[[], str]) -> None:
        self._sources.append((label, produce))

    def dump(self) -> str:
        parts = []
        for label, produce in self._sources:
            try:
                body = produce()
            except Exception as e:  # diagnostics must never mask the failure
                body = "(could not produce: %r)" % (e,)
            parts.append("----- %s -----\n%s" % (label, body))
        return "\n".join(parts)


# --------------------------------------------------------------------------
# The broker and ctxctl

_HEALTHZ = textwrap.dedent(r"""
    import json, ssl, sys, urllib.request
    url, ca = sys.argv[1], sys.argv[2]
    ctx = ssl.create_default_context(cafile=ca)
    with urllib.request.urlopen(url + "/healthz", context=ctx, timeout=2) as r:
        body = json.load(r)
        if r.status != 200 or body.get("status") != "ok":
            sys.exit("healthz answered %s %r" % (r.status, body))
""")


class BrokerProcess:
    """A real ``twistd -n ctxd`` subprocess with its own state directory.

    ``host`` is the address it listens on and puts in its public URL; with
    ``nshost`` (a :class:`netns.NsHost`) the broker, its health probe and
    every ctxctl call run inside that namespace host.
    """

    def __init__(self, workdir: Path, host: str = "127.0.0.1", port: Optional[int] = None,
                 nshost=None, extra_args: Sequence[str] = ()):
        self.workdir = Path(workdir)
        self.extra_args = list(extra_args)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.state_dir = self.workdir / "state"
        self.log_path = self.workdir / "broker.log"
        self.host = host
        self.port = port or free_port("127.0.0.1")
        self.metrics_port = free_port("127.0.0.1")
        self.url = "https://%s:%d" % (host, self.port)
        self.nshost = nshost
        self.proc: Optional[subprocess.Popen] = None
        self.starts = 0

    @property
    def ca_path(self) -> Path:
        return self.state_dir / "tls" / "ca.pem"

    def _wrap(self, argv: Sequence[str]) -> List[str]:
        argv = [str(a) for a in argv]
        return self.nshost.argv(argv, with_hostname=False) if self.nshost else argv

    def argv(self) -> List[str]:
        return [
            str(TWISTD), "-n", "--pidfile=", "ctxd",
            "--state-dir", str(self.state_dir),
            "--listen", "ssl:%d:interface=%s" % (self.port, self.host),
            "--public-url", self.url,
            "--metrics-listen", "tcp:%d:interface=127.0.0.1" % self.metrics_port,
        ] + self.extra_args

    def start(self, timeout: float = 15.0, ready: bool = True) -> None:
        """Start the broker and (with ``ready``) wait until /healthz answers over verified TLS."""
        assert self.proc is None or self.proc.poll() is not None, "already running"
        self.starts += 1
        with open(self.log_path, "ab") as log:
            log.write(b"===== e2e: broker start #%d: %s\n"
                      % (self.starts, " ".join(self.argv()).encode()))
            log.flush()
            self.proc = subprocess.Popen(
                self._wrap(self.argv()), stdout=log, stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL, cwd=str(self.workdir), env=clean_env(),
                start_new_session=True, preexec_fn=die_with_parent)
        if ready:
            self.wait_ready(timeout)

    def wait_ready(self, timeout: float = 15.0, pause: float = 0.1) -> None:
        """Until /healthz answers ok over verified TLS; AssertionError (with the log) if it never does."""
        deadline = time.monotonic() + timeout
        last: Optional[str] = "no attempt yet"
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError("broker exited with %s before it was ready\n%s"
                                     % (self.proc.returncode, tail(self.log())))
            last = self.health_problem() if self.ca_path.exists() else "no CA at %s yet" % self.ca_path
            if last is None:
                return
            time.sleep(pause)
        raise AssertionError("broker not ready at %s/healthz after %.0fs (last: %s)\n%s"
                             % (self.url, timeout, last, tail(self.log())))

    def health_problem(self) -> Optional[str]:
        """None if /healthz answers ok (probed from the broker's namespace), else why not."""
        try:
            probe = subprocess.run(
                self._wrap([sys.executable, "-c", _HEALTHZ, self.url, str(self.ca_path)]),
                capture_output=True, text=True, timeout=5)
        except subprocess.TimeoutExpired:
            return "health probe timed out"
        return None if probe.returncode == 0 else tail(probe.stderr, 3)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 10.0) -> int:
        """Send SIG and wait for the broker to exit; returns its exit status."""
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.kill()
                raise AssertionError("broker did not exit %.0fs after signal %d\n%s"
                                     % (timeout, sig, tail(self.log())))
        return self.proc.returncode

    def kill(self) -> None:
        """Kill the broker (and anything in its session) if still running."""
        if self.proc is not None and self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                pass

    def log(self) -> str:
        return read_text(self.log_path)

    # -- ctxctl ------------------------------------------------------------

    def ctxctl_argv(self, *args: object) -> List[str]:
        return self._wrap([str(CTXCTL), "--state-dir", str(self.state_dir), *map(str, args)])

    def ctxctl(self, *args: object, timeout: float = 30.0) -> subprocess.CompletedProcess:
        """Run ``ctxctl --state-dir STATE ARGS`` to completion and capture it."""
        return subprocess.run(self.ctxctl_argv(*args), capture_output=True, text=True,
                              timeout=timeout, stdin=subprocess.DEVNULL, env=clean_env())

    def ctxctl_popen(self, *args: object) -> subprocess.Popen:
        """Start ctxctl in the background (e.g. ``wait`` while agents run)."""
        return subprocess.Popen(self.ctxctl_argv(*args), stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True, stdin=subprocess.DEVNULL,
                                env=clean_env(), start_new_session=True,
                                preexec_fn=die_with_parent)

    def ctxctl_ok(self, *args: object, timeout: float = 30.0) -> str:
        proc = self.ctxctl(*args, timeout=timeout)
        assert proc.returncode == 0, "ctxctl %s exited %s\nstdout: %s\nstderr: %s" % (
            " ".join(map(str, args)), proc.returncode, proc.stdout, proc.stderr)
        return proc.stdout

    def create(self, cluster: Path, out_dir: Path) -> "Context":
        """``ctxctl create CLUSTER --out OUT``: the context id and its bootstraps."""
        stdout = self.ctxctl_ok("create", cluster, "--out", out_dir)
        cid = stdout.strip()
        assert len(cid) == 22 and "\n" not in cid, "create printed %r, not an id" % stdout
        return Context(cid, Path(out_dir))

    def status(self, cid: str) -> dict:
        return json.loads(self.ctxctl_ok("status", cid, "--json"))

    def wait_for(self, cid: str, predicate: Callable[[dict], bool], timeout: float,
                 what: str) -> dict:
        """Poll ``ctxctl status --json`` until PREDICATE(status) holds."""
        deadline = time.monotonic() + timeout
        while True:
            status = self.status(cid)
            if predicate(status):
                return status
            if time.monotonic() > deadline:
                raise AssertionError("timed out after %.0fs waiting for %s; status: %s"
                                     % (timeout, what, json.dumps(status, indent=1)))
            time.sleep(0.2)


@dataclass
class Context:
    cid: str
    out_dir: Path

    def bootstrap(self, group: str) -> Path:
        return self.out_dir / ("%s.bootstrap.json" % group)

    def user_data(self, group: str) -> Path:
        return self.out_dir / ("%s.user-data" % group)


def finish(proc: subprocess.Popen, timeout: float) -> Tuple[int, str, str]:
    """Wait for a piped background process; kill it if it overruns."""
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        raise AssertionError("%s still running after %.0fs\nstdout: %s\nstderr: %s"
                             % (proc.args, timeout, out, err))
    return proc.returncode, out, err


# --------------------------------------------------------------------------
# Cluster files


@dataclass
class Cluster:
    path: Path
    gridmap: bytes


def torque_cluster(tmp: Path, prefer_example: bool = True) -> Cluster:
    """The issue's torque cluster file: the repository example when present."""
    if prefer_example and EXAMPLE_CLUSTER.exists():
        path = EXAMPLE_CLUSTER
    else:
        tmp.mkdir(parents=True, exist_ok=True)
        path = tmp / "cluster.toml"
        path.write_text(TORQUE_CLUSTER)
        (tmp / "grid-mapfile").write_text(GRIDMAP)
    spec = tomllib.loads(path.read_text())
    gridmap = (path.parent / spec["data"]["gridmap"]["file"]).read_bytes()
    return Cluster(path, gridmap)


# --------------------------------------------------------------------------
# Recording scripts

_RECORDER = '''\
#!{python}
# e2e recording script: appends one JSON line per run to the record file.
import json, os, sys, time
NAME = {name!r}
RECORD = {record!r}
SLEEP = {sleep!r}
EXIT = {exit!r}
entry = {{"script": NAME, "argv": sys.argv[1:], "start": time.time(), "pid": os.getpid(),
         "env": {{k: v for k, v in os.environ.items() if k.startswith("CTX_")}}}}
view = os.environ.get("CTX_VIEW")
try:
    with open(view) as f:
        entry["view_node_id"] = json.load(f).get("node_id")
except Exception as e:
    entry["view_error"] = repr(e)
if NAME.startswith("3-data/") and len(sys.argv) > 1:
    try:
        with open(sys.argv[-1], "rb") as f:
            entry["data_b64"] = __import__("base64").b64encode(f.read()).decode()
        entry["data_mode"] = os.stat(sys.argv[-1]).st_mode & 0o777
    except Exception as e:
        entry["data_error"] = repr(e)
if SLEEP:
    time.sleep(SLEEP)
entry["end"] = time.time()
entry["exit"] = EXIT
line = (json.dumps(entry) + "\\n").encode()
fd = os.open(RECORD, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
os.write(fd, line)
os.close(fd)
if EXIT:
    sys.stderr.write("e2e-marker: %s failing on purpose with exit %d\\n" % (NAME, EXIT))
sys.exit(EXIT)
'''


def script_names(ifaces: Iterable[str]) -> List[str]:
    """Every script of a full ctx-scripts directory for these interfaces."""
    ifaces = sorted(set(ifaces) | {"lo"})  # lo: catches a run for loopback
    return (["0-etchosts.sh"]
            + ["1-ipandhost/%s" % r for r in ROLES]
            + ["2-thishost/%s" % i for i in ifaces]
            + ["3-data/%s" % d for d in DATA_NAMES]
            + ["4-restarts/%s" % r for r in ROLES]
            + ["5-thishost-finalize/%s" % i for i in ifaces]
            + ["6-departed/%s" % r for r in ROLES])


def make_scripts(scripts_dir: Path, record: Path, ifaces: Iterable[str],
                 behaviour: Optional[Dict[str, dict]] = None) -> None:
    """Write recording scripts; BEHAVIOUR maps a script to {sleep: s, exit: n}."""
    behaviour = behaviour or {}
    for name in script_names(ifaces):
        path = scripts_dir / name
        path.parent.mkdir(parents=True, exist_ok=True)
        b = behaviour.get(name, {})
        path.write_text(_RECORDER.format(python=sys.executable, name=name, record=str(record),
                                         sleep=float(b.get("sleep", 0)), exit=int(b.get("exit", 0))))
        path.chmod(0o755)
    unknown = set(behaviour) - set(script_names(ifaces))
    assert not unknown, "behaviour for unknown scripts %s" % unknown


def read_records(record: Path) -> List[dict]:
    if not record.exists():
        return []
    return [json.loads(line) for line in record.read_text().splitlines() if line.strip()]


def calls(records: Iterable[dict]) -> List[Tuple[str, Tuple[str, ...]]]:
    """(script, argv) of each record, sorted: a multiset to compare exactly."""
    return sorted((r["script"], tuple(r["argv"])) for r in records)


def phase(script: str) -> int:
    return int(script.split("-", 1)[0])


# --------------------------------------------------------------------------
# SSH host keys, CA


def make_host_keys(ssh_dir: Path) -> List[str]:
    """Real ed25519 + ECDSA host keys (ssh-keygen, else the cryptography package)."""
    ssh_dir.mkdir(parents=True, exist_ok=True)
    keys = []
    keygen = shutil.which("ssh-keygen")
    for kind, bits in (("ed25519", None), ("ecdsa", "256")):
        path = ssh_dir / ("ssh_host_%s_key" % kind)
        pub = Path(str(path) + ".pub")
        if keygen:
            argv = [keygen, "-q", "-t", kind, *(["-b", bits] if bits else []),
                    "-N", "", "-C", "root@e2e", "-f", str(path)]
            subprocess.run(argv, check=True, timeout=30, capture_output=True)
        else:
            from cryptography.hazmat.primitives import serialization
            from cryptography.hazmat.primitives.asymmetric import ec, ed25519

            key = ed25519.Ed25519PrivateKey.generate() if kind == "ed25519" \
                else ec.generate_private_key(ec.SECP256R1())
            pub.write_bytes(key.public_key().public_bytes(
                serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH) + b" root@e2e\n")
        fields = pub.read_text().split()
        keys.append("%s %s" % (fields[0], fields[1]))
    return keys


def foreign_ca_pem() -> str:
    """A fresh self-signed CA certificate (PEM) that signed nothing of ours."""
    import datetime

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "e2e impostor CA")])
    now = datetime.datetime.now(datetime.timezone.utc)
    ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    cert = (x509.CertificateBuilder()
            .subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(ski, critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski),
                           critical=False)
            .sign(key, hashes.SHA256()))
    return cert.public_bytes(serialization.Encoding.PEM).decode()


# --------------------------------------------------------------------------
# Managed blocks and expectations


def managed_block(text: str, cid: str) -> Tuple[List[str], List[str]]:
    """(lines inside, lines outside) the file's one managed block of context CID.

    Blank and comment lines inside the block are dropped.
    """
    begin, end = "# BEGIN ctxd (context %s)" % cid, "# END ctxd (context %s)" % cid
    lines = text.splitlines()
    assert lines.count(begin) == 1, "expected exactly one %r in:\n%s" % (begin, text)
    assert lines.count(end) == 1, "expected exactly one %r in:\n%s" % (end, text)
    i, j = lines.index(begin), lines.index(end)
    assert i < j, "END before BEGIN in:\n%s" % text
    inside = [l for l in lines[i + 1:j] if l.strip() and not l.lstrip().startswith("#")]
    return inside, lines[:i] + lines[j + 1:]


@dataclass(frozen=True)
class Ident:
    """What a node should look like to its peers."""

    ip: str
    short: str
    fqdn: str
    keys: Tuple[str, ...] = ()

    @property
    def argv(self) -> Tuple[str, str, str]:
        return (self.ip, self.short, self.fqdn)

    def hosts_line(self) -> str:
        return "%s %s %s" % (self.ip, self.fqdn, self.short)

    def known_hosts_lines(self) -> List[str]:
        return ["%s,%s,%s %s" % (self.fqdn, self.short, self.ip, k) for k in self.keys]


# --------------------------------------------------------------------------
# Simulated VMs running the real agent

INITIAL_HOSTS = "127.0.0.1 localhost\n# e2e: a line the agent must leave alone\n"
INITIAL_KNOWN_HOSTS = "# e2e: a comment the agent must leave alone\n"


@dataclass
class VM:
    """One simulated machine's files, plus how to run the agent on it.

    ``ident`` gives its address and names; with ``nshost`` the agent runs in
    that namespace host and discovers them itself, otherwise they are passed
    as --address/--hostname/--fqdn overrides.
    """

    label: str
    root: Path
    ident: Ident
    ifaces: Tuple[str, ...]
    nshost: object = None
    runs: int = 0
    procs: List[subprocess.Popen] = field(default_factory=list)
    python: str = AGENT_PYTHON
    agent: Path = AGENT

    @property
    def scripts_dir(self) -> Path:
        return self.root / "scripts"

    @property
    def state_dir(self) -> Path:
        return self.root / "agent-state"

    @property
    def hosts_file(self) -> Path:
        return self.root / "hosts"

    @property
    def known_hosts_file(self) -> Path:
        return self.root / "ssh_known_hosts"

    @property
    def ssh_dir(self) -> Path:
        return self.root / "ssh"

    @property
    def record(self) -> Path:
        return self.root / "record.jsonl"

    @property
    def log_path(self) -> Path:
        return self.root / "agent.log"

    def records(self) -> List[dict]:
        return read_records(self.record)

    def log(self) -> str:
        return read_text(self.log_path)

    def argv(self, bootstrap: Path, timeout: float = 60, extra: Sequence[str] = ()) -> List[str]:
        argv = [self.python, str(self.agent), "--bootstrap", str(bootstrap),
                "--scripts-dir", str(self.scripts_dir), "--state-dir", str(self.state_dir),
                "--hosts-file", str(self.hosts_file),
                "--known-hosts-file", str(self.known_hosts_file),
                "--ssh-dir", str(self.ssh_dir), "--timeout", str(timeout), "--poll-wait", "10"]
        if self.nshost is None:
            argv += ["--address", self.ident.ip, "--hostname", self.ident.short,
                     "--fqdn", self.ident.fqdn]
        return argv + list(extra)

    def start(self, bootstrap: Path, timeout: float = 60, extra: Sequence[str] = ()) -> subprocess.Popen:
        """Start the agent in the background, its output appended to agent.log."""
        self.runs += 1
        argv = self.argv(bootstrap, timeout, extra)
        with open(self.log_path, "ab") as log:
            log.write(b"===== e2e: agent run #%d: %s\n" % (self.runs, " ".join(argv).encode()))
            log.flush()
            kw = dict(stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                      env=clean_env(), cwd=str(self.root), start_new_session=True,
                      preexec_fn=die_with_parent)
            if self.nshost is not None:
                proc = self.nshost.popen(argv, with_hostname=True, **kw)
            else:
                proc = subprocess.Popen(argv, **kw)
        proc.e2e_started = time.monotonic()
        self.procs.append(proc)
        return proc

    def run(self, bootstrap: Path, timeout: float = 60, extra: Sequence[str] = ()) -> int:
        return wait_agent(self, self.start(bootstrap, timeout, extra), timeout + 15)

    def kill(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                try:
                    os.killpg(proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                proc.wait(timeout=10)


def find_python(version: str) -> Optional[str]:
    """An interpreter of this minor version on this machine (pyenv or PATH) that runs, if any."""
    candidates = [str(p) for p in sorted(Path("/root/.pyenv/versions").glob(version + ".*/bin/python3"))]
    candidates += [p for p in [shutil.which("python" + version)] if p and "/shims/" not in p]
    for candidate in candidates:
        try:
            ok = subprocess.run([candidate, "-c", "import ssl"], env=clean_env(), timeout=30,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL).returncode == 0
        except (OSError, subprocess.TimeoutExpired):
            ok = False
        if ok:
            return candidate
    return None


def wait_agent(vm: VM, proc: subprocess.Popen, timeout: float) -> int:
    """The agent's exit status; kill it and fail if it overruns TIMEOUT."""
    try:
        return proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        vm.kill()
        raise AssertionError("agent %s still running after %.0fs; log:\n%s"
                             % (vm.label, timeout, tail(vm.log())))


def group_of(vm: VM) -> str:
    """The torque cluster group a VM label belongs to."""
    return "head" if vm.label == "head" else "compute"


def start_all(vms: Iterable[VM], ctx: Context) -> List[Tuple[VM, subprocess.Popen]]:
    """Start every VM's agent with its group's bootstrap, concurrently."""
    return [(vm, vm.start(ctx.bootstrap(group_of(vm)))) for vm in vms]


def wait_all(started: Iterable[Tuple[VM, subprocess.Popen]], timeout: float = 75) -> Dict[str, int]:
    """{label: exit status} of started agents."""
    return {vm.label: wait_agent(vm, proc, timeout) for vm, proc in started}


def wait_until(predicate: Callable[[], object], timeout: float, what: str) -> None:
    """Poll PREDICATE until true; fail naming WHAT after TIMEOUT seconds."""
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out after %.0fs waiting for %s" % (timeout, what)
        time.sleep(0.05)


def make_vm(base: Path, label: str, ident: Ident, ifaces: Iterable[str] = (), nshost=None,
            behaviour: Optional[Dict[str, dict]] = None) -> VM:
    """Create a VM's directories, host keys and recording scripts.

    IDENT's keys are filled in from the freshly generated host keys.
    """
    root = base / label
    root.mkdir(parents=True)
    ifaces = tuple(ifaces) or tuple(sorted(n for _, n in socket.if_nameindex()))
    keys = tuple(make_host_keys(root / "ssh"))
    vm = VM(label, root, Ident(ident.ip, ident.short, ident.fqdn, keys), ifaces, nshost)
    make_scripts(vm.scripts_dir, vm.record, ifaces, behaviour)
    vm.hosts_file.write_text(INITIAL_HOSTS)
    vm.known_hosts_file.write_text(INITIAL_KNOWN_HOSTS)
    return vm


def loopback_vms(base: Path, behaviour: Optional[Dict[str, Dict[str, dict]]] = None) -> List[VM]:
    """head + compute1..3 on 127.0.0.{2..5}, identities given by overrides."""
    behaviour = behaviour or {}
    vms = []
    for i, label in enumerate(("head", "compute1", "compute2", "compute3")):
        ident = Ident("127.0.0.%d" % (i + 2), "e2e-%s" % label, "e2e-%s.cluster.test" % label)
        vms.append(make_vm(base, label, ident, behaviour=behaviour.get(label)))
    return vms


def expected_calls(me: Ident, group: str, head: Ident, computes: Sequence[Ident],
                   iface: Optional[str], gridmap_path: bool = True) -> List[Tuple[str, tuple]]:
    """The exact (script, argv) multiset the torque cluster makes a node run.

    3-data's PATH is unknown in advance and left out (checked separately).
    """
    everyone = [head, *computes]
    out: List[Tuple[str, tuple]] = []
    # 0-etchosts.sh: every identity in the view: self, providers, all_identities.
    out += [("0-etchosts.sh", i.argv) for i in everyone]
    if group == "head":
        out += [("1-ipandhost/torqueslave", c.argv) for c in computes]
        out += [("4-restarts/torqueslave", ())]
    else:
        out += [("1-ipandhost/torquemaster", head.argv)]
        out += [("4-restarts/torquemaster", ())]
    if iface is not None:
        out += [("2-thishost/%s" % iface, me.argv), ("5-thishost-finalize/%s" % iface, me.argv)]
    return sorted(out)


def expected_known_hosts(group: str, head: Ident, computes: Sequence[Ident]) -> List[str]:
    """head: its torqueslave providers' keys; computes: every node's (all_identities)."""
    nodes = list(computes) if group == "head" else [head, *computes]
    return sorted(line for n in nodes for line in n.known_hosts_lines())


def expected_hosts(head: Ident, computes: Sequence[Ident]) -> List[str]:
    return sorted(i.hosts_line() for i in [head, *computes])


def running_broker(tmp_path, diag, extra_args=()):
    """A generator for fixtures: a started BrokerProcess, its log in the diagnostics, killed at the end."""
    b = BrokerProcess(tmp_path / "broker", extra_args=extra_args)
    diag.add_file("broker log", b.log_path, lines=200)
    try:
        b.start()
        yield b
    finally:
        b.kill()


def hub_broker(netlab, tmp_path, diag):
    """A BrokerProcess (not started) on a namespace host "hub" of ``netlab``, its log in the
    diagnostics; (broker, hub)."""
    hub = netlab.add_host("hub")
    broker = BrokerProcess(tmp_path / "broker", host=hub.ip, port=free_port(), nshost=hub)
    diag.add_file("broker log", broker.log_path, lines=200)
    return broker, hub
