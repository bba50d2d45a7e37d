"""Persistent namespace hosts that run real daemons (root only).

A :class:`NetLab` host (netns.py) is only a network namespace: each process
started in it gets a fresh UTS and mount namespace of its own.  Daemons such
as munged, slurmctld and slurmd need more: one machine-like set of
namespaces that they, the agent and later ``srun`` all share.  A
:class:`PersistentHost` is that set.  One long-lived *host init* (a small
Python program, :data:`INIT_PROGRAM`) is started inside the host's netns
under ``unshare --uts --mount --propagation private``; it sets the hostname,
bind-mounts the host's own directories (its /etc/hosts, /etc/slurm,
/etc/munge, ...) from a per-host directory, says ``ready`` and sleeps until
killed.  Every other process of the host runs as
``nsenter --target INITPID --mount --uts --net -- ARGV`` (argv lists, no
shell), so it sees exactly what the init set up.

Cleanup finds a host's processes through /proc: whoever shares the init's
mount namespace or the host's network namespace (daemons double-fork, so
the Popen objects are not enough).  netns.kill_namespace_members does the
same for the leftovers of a killed run.

The Slurm-specific parts - the per-host directory layout, installing the
Debian packages, locating the daemons' logs - are at the end.
"""

from __future__ import annotations

import os
import pwd
import re
import select
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, Iterable, List, Optional, Sequence, Tuple

from . import netns
from .helpers import clean_env, die_with_parent, read_text, tail

# The host init: argv = HOSTNAME (SOURCE TARGET)...  It runs as root in a new
# UTS and a new private mount namespace (unshare), inside the host's netns.
INIT_PROGRAM = r"""
import os, signal, socket, subprocess, sys
hostname, pairs = sys.argv[1], sys.argv[2:]
for source, target in zip(pairs[0::2], pairs[1::2]):
    subprocess.run(["mount", "--bind", source, target], check=True)
socket.sethostname(hostname)
sys.stdout.write("ready %d\n" % os.getpid())
sys.stdout.flush()
os.close(1)
while True:
    signal.pause()
"""

# What a host's processes find on PATH (daemons live in the sbin directories).
HOST_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


def _proc_pids() -> List[int]:
    return [int(e) for e in os.listdir("/proc") if e.isdigit()]


def comm(pid: int) -> str:
    """/proc/PID/comm, or "?" once the process is gone."""
    try:
        return Path("/proc/%d/comm" % pid).read_text().strip()
    except OSError:
        return "?"


def _cmdline(pid: int) -> str:
    try:
        return Path("/proc/%d/cmdline" % pid).read_bytes().replace(b"\0", b" ").decode(
            errors="replace").strip()
    except OSError:
        return "?"


def processes_in(net_ids: Iterable[Tuple[int, int]],
                 mnt_ids: Iterable[Tuple[int, int]]) -> List[Tuple[int, str]]:
    """(pid, command line) of live processes in any of these namespaces (not us)."""
    net_ids, mnt_ids = set(net_ids), set(mnt_ids)
    found = []
    for pid in _proc_pids():
        if pid == os.getpid():
            continue
        if netns.ns_id(pid, "net") in net_ids or netns.ns_id(pid, "mnt") in mnt_ids:
            found.append((pid, _cmdline(pid)))
    return found


@dataclass
class Mount:
    """One bind mount of a host: TARGET (absolute, in the host) from SOURCE."""

    target: str
    source: Path


@dataclass
class PersistentHost:
    """A NetLab host plus one init holding its UTS and private mount namespace."""

    nshost: netns.NsHost
    root: Path                      # the per-host directory under the test's tmp dir
    mounts: List[Mount]
    init: Optional[subprocess.Popen] = None
    net_id: Optional[Tuple[int, int]] = None
    mnt_id: Optional[Tuple[int, int]] = None
    processes: List[subprocess.Popen] = field(default_factory=list)

    @property
    def label(self) -> str:
        return self.nshost.label

    @property
    def hostname(self) -> str:
        return self.nshost.hostname

    @property
    def fqdn(self) -> str:
        return self.nshost.fqdn

    @property
    def ip(self) -> str:
        return self.nshost.ip

    def path(self, target: str) -> Path:
        """Where the file or directory TARGET of this host lives outside it."""
        for m in sorted(self.mounts, key=lambda m: -len(m.target)):
            if target == m.target or target.startswith(m.target.rstrip("/") + "/"):
                return m.source / os.path.relpath(target, m.target)
        raise KeyError("%s is not one of %s's own paths" % (target, self.label))

    # -- life cycle ----------------------------------------------------------

    def start(self, timeout: float = 15.0) -> None:
        """Start the init and wait until its mounts and hostname are in place."""
        argv = [sys.executable, "-c", INIT_PROGRAM, self.hostname]
        for m in self.mounts:
            argv += [str(m.source), m.target]
        argv = ["nsenter", "--net=%s" % (netns.NETNS_DIR / self.nshost.netns),
                "unshare", "--uts", "--mount", "--propagation", "private", *argv]
        errlog = open(self.root / "init.err", "wb")
        try:
            # nsenter and unshare exec in place: the Popen pid is the init itself.
            self.init = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=errlog,
                                         stdin=subprocess.DEVNULL, env=clean_env(PATH=HOST_PATH),
                                         start_new_session=True, preexec_fn=die_with_parent)
        finally:
            errlog.close()
        line = b""
        deadline = time.monotonic() + timeout
        while not line.endswith(b"\n"):
            left = deadline - time.monotonic()
            ready, _, _ = select.select([self.init.stdout], [], [], max(0.0, left))
            chunk = os.read(self.init.stdout.fileno(), 256) if ready else b""
            if not chunk:
                self.init.stdout.close()
                why = ("exited %s" % self.init.poll()) if ready else "timed out"
                raise AssertionError("host init of %s %s before ready: %s"
                                     % (self.label, why, read_text(self.root / "init.err")))
            line += chunk
        self.init.stdout.close()
        assert line.split() == [b"ready", str(self.init.pid).encode()], line
        self.net_id = netns.ns_id(self.init.pid, "net")
        self.mnt_id = netns.ns_id(self.init.pid, "mnt")
        assert None not in (self.net_id, self.mnt_id), "host init of %s vanished" % self.label
        assert self.mnt_id != netns.ns_id("self", "mnt"), "no private mount namespace"

    def argv(self, argv: Sequence[str]) -> List[str]:
        """ARGV prefixed so it runs inside this host (all of its namespaces)."""
        assert self.init is not None and self.init.poll() is None, "%s is not running" % self.label
        return ["nsenter", "--target", str(self.init.pid), "--mount", "--uts", "--net",
                "--", *map(str, argv)]

    def popen(self, argv: Sequence[str], env: Optional[Dict[str, str]] = None,
              **kw) -> subprocess.Popen:
        """Start ARGV in this host (own session, killed with the test process)."""
        kw.setdefault("stdin", subprocess.DEVNULL)
        kw.setdefault("start_new_session", True)
        kw.setdefault("preexec_fn", die_with_parent)
        proc = subprocess.Popen(self.argv(argv), env=clean_env(PATH=HOST_PATH, **(env or {})),
                                **kw)
        self.processes.append(proc)
        return proc

    def run(self, argv: Sequence[str], timeout: float = 30.0,
            env: Optional[Dict[str, str]] = None) -> subprocess.CompletedProcess:
        """Run ARGV in this host to completion; a timeout gives returncode None."""
        try:
            return subprocess.run(self.argv(argv), capture_output=True, text=True,
                                  timeout=timeout, stdin=subprocess.DEVNULL,
                                  env=clean_env(PATH=HOST_PATH, **(env or {})))
        except subprocess.TimeoutExpired as e:
            def text(b):
                return b.decode(errors="replace") if isinstance(b, bytes) else (b or "")
            return subprocess.CompletedProcess(e.cmd, None, text(e.stdout),
                                               text(e.stderr) + "\n(timed out after %gs)" % timeout)

    def members(self) -> List[Tuple[int, str]]:
        """(pid, command line) of every live process in this host but its init."""
        ids = [i for i in (self.net_id,) if i], [i for i in (self.mnt_id,) if i]
        init = self.init.pid if self.init else None
        return [(pid, cmd) for pid, cmd in processes_in(*ids) if pid != init]

    def kill(self) -> None:
        """Kill every process of this host (daemons included), then its init."""
        ids = ([self.net_id] if self.net_id else [], [self.mnt_id] if self.mnt_id else [])
        init_alive = self.init is not None and self.init.poll() is None
        if init_alive:
            # The init last: while it lives its mount namespace can be found.
            init_pid = self.init.pid
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline:
                others = [pid for pid, _ in processes_in(*ids) if pid != init_pid]
                if not others:
                    break
                for pid in others:
                    try:
                        os.kill(pid, signal.SIGKILL)
                    except ProcessLookupError:
                        pass
                time.sleep(0.05)
        for proc in self.processes + ([self.init] if self.init else []):
            if proc.poll() is None:
                try:
                    os.kill(proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                pass
        netns.kill_namespace_members(*ids)


# --------------------------------------------------------------------------
# Slurm hosts

SLURM_PACKAGES = ("slurmctld", "slurmd", "slurm-client", "munge")
SLURM_PROGRAMS = ("slurmctld", "slurmd", "munged", "srun", "sinfo", "scontrol")
SLURM_DAEMONS = ("munged", "slurmctld", "slurmd", "slurmstepd")

# A Slurm host's own paths: (target, kind, owner, mode); their parents in
# the root namespace are created when missing (mount points), never changed.
SLURM_LAYOUT = (
    ("/etc/hosts", "file", "root", 0o644),
    ("/etc/slurm", "dir", "root", 0o755),
    ("/etc/munge", "dir", "munge", 0o700),
    ("/run/munge", "dir", "munge", 0o755),
    ("/var/lib/munge", "dir", "munge", 0o700),
    ("/var/log/munge", "dir", "munge", 0o700),
    ("/var/log/slurm", "dir", "slurm", 0o755),
    ("/var/spool/slurm", "dir", "slurm", 0o755),
)
# Inside the per-host spool directory: slurmd's and slurmctld's.
SLURM_SPOOL_SUBDIRS = ("d", "ctld")

SLURM_LOGS = (
    ("agent log", "STATE/ctxagent.log"),
    ("agent output", "agent.out"),
    ("last script output", "STATE/script.out"),
    ("slurmctld.log", "/var/log/slurm/slurmctld.log"),
    ("slurmd.log", "/var/log/slurm/slurmd.log"),
    ("munged.log", "/var/log/munge/munged.log"),
    ("slurm.conf", "/etc/slurm/slurm.conf"),
    ("host init stderr", "init.err"),
)


def _sbin_which(program: str) -> Optional[str]:
    return shutil.which(program, path=HOST_PATH)


def missing_slurm_programs() -> List[str]:
    """The Slurm/munge programs (and accounts) this machine lacks."""
    missing = [p for p in SLURM_PROGRAMS if _sbin_which(p) is None]
    for user in ("munge", "slurm"):
        try:
            pwd.getpwnam(user)
        except KeyError:
            missing.append("user %s" % user)
    return missing


def install_slurm(timeout: float = 900.0) -> Tuple[bool, str]:
    """apt-get install the Slurm packages when something is missing: (ok, what happened)."""
    return install_packages(SLURM_PACKAGES, missing_slurm_programs, timeout)


def require_packages(install: Callable[[], Tuple[bool, str]], packages: Sequence[str]) -> None:
    """For a module fixture: skip without network namespaces; ``install()`` what is missing,
    or fail (CI=true: the machine must have it) or skip saying why."""
    import pytest

    from . import netns

    reason = netns.unavailable_reason()
    if reason:
        pytest.skip(reason)
    ok, what = install()
    if not ok:
        message = "cannot install %s: %s" % (" ".join(packages), what)
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(message)
        pytest.skip(message)


def install_packages(packages: Sequence[str], missing_programs: Callable[[], List[str]],
                     timeout: float) -> Tuple[bool, str]:
    """apt-get install ``packages`` when ``missing_programs()`` names any: (ok, what happened).

    Tries the package lists already there first (apt-get update only if that fails).
    """
    missing = missing_programs()
    if not missing:
        return True, "already installed"
    if shutil.which("apt-get") is None:
        return False, "missing %s and no apt-get to install %s" % (missing, " ".join(packages))
    env = clean_env(DEBIAN_FRONTEND="noninteractive", PATH=HOST_PATH)
    install = ["apt-get", "install", "-y", "--no-install-recommends", *packages]
    log = []
    for attempt in ([install], [["apt-get", "update"], install]):
        for argv in attempt:
            try:
                proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout,
                                      stdin=subprocess.DEVNULL, env=env)
            except subprocess.TimeoutExpired:
                return False, "%s timed out after %.0fs" % (" ".join(argv), timeout)
            log.append("$ %s -> %d\n%s%s" % (" ".join(argv), proc.returncode,
                                             tail(proc.stdout, 15), tail(proc.stderr, 15)))
            if proc.returncode != 0:
                break
        else:
            break
    still = missing_programs()
    if still:
        return False, "installed %s but still missing %s\n%s" % (" ".join(packages), still, "\n".join(log))
    return True, "installed (was missing %s)" % ", ".join(missing)


def _ids(owner: str) -> Tuple[int, int]:
    pw = pwd.getpwnam(owner)
    return pw.pw_uid, pw.pw_gid


def make_slurm_host(lab: netns.NetLab, label: str, base: Path) -> PersistentHost:
    """A NetLab host with Slurm's directories private to it, its init not yet started."""
    nshost = lab.add_host(label)
    root = base / label
    root.mkdir(parents=True)
    mounts = []
    for target, kind, owner, mode in SLURM_LAYOUT:
        source = root / target.strip("/").replace("/", "-")
        uid, gid = _ids(owner)
        if kind == "file":
            # NetLab's hosts file (127.0.0.1 localhost + "IP FQDN SHORT"), so
            # socket.getfqdn() inside the host answers its FQDN.
            shutil.copyfile(nshost.etc_hosts, source)
        else:
            source.mkdir()
        os.chown(source, uid, gid)
        os.chmod(source, mode)
        mounts.append(Mount(target, source))
        # The mount point, in the root namespace: created if missing (e.g. /run/munge).
        if not os.path.lexists(target):
            if kind == "file":
                Path(target).touch(0o644)
            else:
                os.makedirs(target, 0o755, exist_ok=True)
    spool = root / "var-spool-slurm"
    for sub in SLURM_SPOOL_SUBDIRS:
        (spool / sub).mkdir()
        os.chown(spool / sub, *_ids("slurm"))
        os.chmod(spool / sub, 0o755)
    return PersistentHost(nshost, root, mounts)


def slurm_logs(host: PersistentHost, state_dir: Path) -> List[Tuple[str, Path]]:
    """(label, file outside the host) of the logs worth showing when a test fails."""
    out = []
    for what, where in SLURM_LOGS:
        if where.startswith("STATE/"):
            path = state_dir / where[len("STATE/"):]
        elif where.startswith("/"):
            path = host.path(where)
        else:
            path = host.root / where
        out.append(("%s: %s" % (host.label, what), path))
    return out


def daemons_in(hosts: Iterable[PersistentHost]) -> List[Tuple[int, str]]:
    """(pid, command line) of munged/slurm daemons still living in these hosts' namespaces."""
    hosts = list(hosts)
    found = processes_in([h.net_id for h in hosts if h.net_id],
                         [h.mnt_id for h in hosts if h.mnt_id])
    return [(pid, cmd) for pid, cmd in found if comm(pid) in SLURM_DAEMONS]


def set_group_quantity(toml_text: str, group: str, quantity: int) -> str:
    """TOML_TEXT with GROUP's ``quantity = N`` set to QUANTITY (only that line changes)."""
    from .helpers import tomllib

    # Split at the [[group]] headers; rewrite the quantity of the table named GROUP.
    parts = re.split(r"(?m)^(?=[ \t]*\[\[group\]\][ \t]*(?:#.*)?$)", toml_text)
    hits = 0
    for i, part in enumerate(parts):
        table = part.split("\n", 1)[1] if part.lstrip().startswith("[[group]]") else None
        if table is None:
            continue
        # Only up to the next table header of any kind.
        body = re.split(r"(?m)^[ \t]*\[", table, maxsplit=1)[0]
        try:
            name = tomllib.loads(body).get("name")
        except tomllib.TOMLDecodeError:
            name = None
        if name != group:
            continue
        new_body, n = re.subn(r"(?m)^([ \t]*quantity[ \t]*=[ \t]*)\d+", r"\g<1>%d" % quantity, body)
        assert n == 1, "group %s: %d quantity lines" % (group, n)
        parts[i] = part.replace(body, new_body, 1)
        hits += 1
    assert hits == 1, "group %r found %d times" % (group, hits)
    new = "".join(parts)
    # Checked as TOML: the one value changed, nothing else.
    old_doc, new_doc = tomllib.loads(toml_text), tomllib.loads(new)
    for g in old_doc["group"]:
        if g["name"] == group:
            g["quantity"] = quantity
    assert new_doc == old_doc, "rewriting %s's quantity changed more than that" % group
    return new


# --------------------------------------------------------------------------
# OpenSSH and OpenSSL (host credentials, test_credentials.py)

OPENSSH_PACKAGES = ("openssh-server", "openssh-client", "openssl")
OPENSSH_PROGRAMS = ("sshd", "ssh", "ssh-keygen", "openssl")


def missing_openssh_programs() -> List[str]:
    """The OpenSSH/OpenSSL programs this machine lacks."""
    return [p for p in OPENSSH_PROGRAMS if _sbin_which(p) is None]


def install_openssh(timeout: float = 600.0) -> Tuple[bool, str]:
    """apt-get install sshd, ssh and openssl when something is missing: (ok, what happened).

    Debian starts the ssh service after installing it unless policy-rc.d forbids it (as container
    images do); that sshd, if any, listens in the root namespace and is none of the tests'.
    """
    return install_packages(OPENSSH_PACKAGES, missing_openssh_programs, timeout)
