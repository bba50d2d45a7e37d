"""Throw-away test hosts built from Linux network namespaces (root only).

A :class:`NetLab` is one test run's private network: a bridge with NO address
in the root namespace and one network namespace per host, each joined to the
bridge by a veth pair and holding one IPv4 address of a private /24.  Nothing
is routed to or from the root namespace, so the lab cannot touch the
machine's real network.

Names carry a per-run id (``cxe`` + 4 hex digits) so parallel runs do not
collide; ``/run/ctxd-e2e/RID.pid`` records which process owns a run so that
:func:`sweep_leftovers` removes only what a dead (killed) run left behind.

Processes enter a host with ``nsenter --net=/run/netns/NAME`` (``ip netns
exec`` would remount /sys).  A host's processes get its own hostname through
``unshare --uts --mount`` and ``hostexec.py``, which also bind-mounts a
per-host /etc/hosts so that ``socket.getfqdn()`` answers the host's FQDN.
"""

from __future__ import annotations

import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, List, Optional, Sequence, Tuple

PREFIX = "cxe"
MARKER_DIR = Path("/run/ctxd-e2e")
NETNS_DIR = Path("/run/netns")
HOSTEXEC = Path(__file__).with_name("hostexec.py")
_RID_RE = re.compile(r"^%s([0-9a-f]{4})" % PREFIX)


def unavailable_reason() -> Optional[str]:
    """Why namespace hosts cannot be built here, or None when they can."""
    if os.geteuid() != 0:
        return "network-namespace hosts need root"
    for tool in ("ip", "nsenter", "unshare", "mount"):
        if shutil.which(tool) is None:
            return "%s is not installed" % tool
    probe = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True)
    if probe.returncode != 0:
        return "`ip netns` is unavailable: %s" % probe.stderr.strip()
    return None


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=20)
    if check and proc.returncode != 0:
        raise RuntimeError("ip %s failed: %s" % (" ".join(args), proc.stderr.strip()))
    return proc


def _in_ns(ns: str, *argv: str) -> List[str]:
    return ["nsenter", "--net=%s" % (NETNS_DIR / ns), *argv]


def _netns_names() -> List[str]:
    out = _ip("netns", "list", check=False).stdout
    return [line.split()[0] for line in out.splitlines() if line.strip()]


def _link_names() -> List[str]:
    out = _ip("-o", "link", "show", check=False).stdout
    names = []
    for line in out.splitlines():
        # "12: cxe1a2bp1@if11: <...>"
        parts = line.split(":", 2)
        if len(parts) >= 2:
            names.append(parts[1].strip().split("@")[0])
    return names


def ns_id(pid: object, kind: str) -> Optional[Tuple[int, int]]:
    """(st_dev, st_ino) of /proc/PID/ns/KIND; None once the process is gone (or a zombie)."""
    try:
        st = os.stat("/proc/%s/ns/%s" % (pid, kind))
    except OSError:
        return None
    return (st.st_dev, st.st_ino)


def kill_namespace_members(net_ids: Iterable[Tuple[int, int]] = (),
                           mnt_ids: Iterable[Tuple[int, int]] = (),
                           timeout: float = 5.0) -> List[int]:
    """SIGKILL every process in one of these network or mount namespaces until none is left.

    The mount namespaces of the processes found in NET_IDS count too (a
    namespace host's daemons share its private mount namespace), except ours
    and pid 1's.  Scans repeat until a scan finds nobody (a forking daemon
    cannot slip through) or TIMEOUT passes.  Returns the pids killed.
    """
    net_ids = set(net_ids)
    mnt_ids = set(mnt_ids)
    shared = {ns_id("self", "mnt"), ns_id(1, "mnt")}
    killed: List[int] = []
    deadline = time.monotonic() + timeout
    while True:
        procs = []
        for entry in os.listdir("/proc"):
            if entry.isdigit() and int(entry) != os.getpid():
                procs.append((int(entry), ns_id(entry, "net"), ns_id(entry, "mnt")))
        mnt_ids |= {mnt for _, net, mnt in procs if net in net_ids and mnt is not None} - shared
        found = [pid for pid, net, mnt in procs if net in net_ids or mnt in mnt_ids]
        if not found or time.monotonic() > deadline:
            return killed
        for pid in found:
            try:
                os.kill(pid, signal.SIGKILL)
                killed.append(pid)
            except ProcessLookupError:
                pass
        time.sleep(0.05)


def _kill_processes_in_netns(ns: str) -> List[int]:
    """Kill every process in /run/netns/NS and in the mount namespaces they hold."""
    try:
        st = os.stat(NETNS_DIR / ns)
    except OSError:
        return []
    return kill_namespace_members([(st.st_dev, st.st_ino)])


def _pid_alive(pid: int) -> bool:
    try:
        with open("/proc/%d/stat" % pid) as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state not in ("Z", "X")  # a zombie owns nothing any more


def _destroy(rid: str) -> None:
    """Remove every process, namespace and link of run RID (best effort)."""
    mine = [n for n in _netns_names() if n.startswith(PREFIX + rid)]
    for ns in mine:
        # Also whatever lives in the hosts' mount namespaces (hosts.py): the
        # daemons a killed run's Slurm hosts left behind.
        _kill_processes_in_netns(ns)
    for ns in mine:
        _ip("netns", "delete", ns, check=False)
    for link in _link_names():
        if link.startswith(PREFIX + rid):
            _ip("link", "delete", link, check=False)
    try:
        (MARKER_DIR / ("%s.pid" % rid)).unlink()
    except FileNotFoundError:
        pass


def sweep_leftovers() -> List[str]:
    """Remove what earlier runs that died without cleaning up left behind.

    A run is left alone while the process recorded in its marker is alive,
    so concurrent runs are safe.  Returns the run ids swept.
    """
    rids = set()
    for name in _netns_names() + _link_names():
        m = _RID_RE.match(name)
        if m:
            rids.add(m.group(1))
    if MARKER_DIR.is_dir():
        for marker in MARKER_DIR.glob("*.pid"):
            rids.add(marker.stem)
    swept = []
    for rid in sorted(rids):
        marker = MARKER_DIR / ("%s.pid" % rid)
        try:
            owner = int(marker.read_text().strip())
        except (OSError, ValueError):
            owner = None
        if owner is not None and owner != os.getpid() and _pid_alive(owner):
            continue
        _destroy(rid)
        swept.append(rid)
    return swept


@dataclass
class NsHost:
    """One namespace host: its netns, interface, address and names."""

    lab: "NetLab"
    label: str
    netns: str
    iface: str
    ip: str
    hostname: str
    fqdn: str
    etc_hosts: Path
    processes: List[subprocess.Popen] = field(default_factory=list)

    def argv(self, argv: Sequence[str], with_hostname: bool = True) -> List[str]:
        """ARGV prefixed so it runs inside this host (net ns; hostname too)."""
        if not with_hostname:
            return _in_ns(self.netns, *argv)
        return _in_ns(
            self.netns,
            "unshare", "--uts", "--mount", "--propagation", "private",
            sys.executable, str(HOSTEXEC),
            "--hostname", self.hostname, "--etc-hosts", str(self.etc_hosts),
            "--", *argv,
        )

    def popen(self, argv: Sequence[str], with_hostname: bool = True, **kw) -> subprocess.Popen:
        """Start ARGV inside this host; the lab kills it at teardown."""
        kw.setdefault("start_new_session", True)
        proc = subprocess.Popen(self.argv(argv, with_hostname), **kw)
        self.processes.append(proc)
        return proc

    def run(self, argv: Sequence[str], timeout: float, with_hostname: bool = False,
            **kw) -> subprocess.CompletedProcess:
        """Run ARGV inside this host to completion (bounded by TIMEOUT)."""
        kw.setdefault("capture_output", True)
        kw.setdefault("text", True)
        return subprocess.run(self.argv(argv, with_hostname), timeout=timeout, **kw)


class NetLab:
    """A private bridge plus namespace hosts, all removed by :meth:`close`."""

    def __init__(self, workdir: Path):
        self.workdir = Path(workdir)
        self.hosts: List[NsHost] = []
        self.rid = ""
        self.octet = 0
        self.bridge = ""
        self._closed = False

    def setup(self) -> "NetLab":
        sweep_leftovers()
        MARKER_DIR.mkdir(parents=True, exist_ok=True)
        for _ in range(100):
            rid = "%04x" % random.randrange(0x10000)
            marker = MARKER_DIR / ("%s.pid" % rid)
            try:
                fd = os.open(marker, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            except FileExistsError:
                continue
            with os.fdopen(fd, "w") as f:
                f.write("%d\n" % os.getpid())
            self.rid = rid
            break
        else:
            raise RuntimeError("no free run id under %s" % MARKER_DIR)
        self.octet = random.randrange(1, 255)
        self.bridge = "%s%sbr" % (PREFIX, self.rid)
        _ip("link", "add", self.bridge, "type", "bridge")
        _ip("link", "set", self.bridge, "up")
        return self

    def add_host(self, label: str, domain: Optional[str] = None) -> NsHost:
        """Create host LABEL: own netns, eth0 on the bridge, lo up, an address."""
        assert re.match(r"^[a-z][a-z0-9]{0,7}$", label), label
        index = len(self.hosts) + 1
        netns = "%s%s-%s" % (PREFIX, self.rid, label)
        peer = "%s%sp%d" % (PREFIX, self.rid, index)
        inner = "%s%sv%d" % (PREFIX, self.rid, index)
        ip = "10.213.%d.%d" % (self.octet, index + 1)
        hostname = "%s-%s" % (label, self.rid)
        fqdn = "%s.%s" % (hostname, domain or "e2e%s.test" % self.rid)
        _ip("netns", "add", netns)
        _ip("link", "add", inner, "type", "veth", "peer", "name", peer)
        _ip("link", "set", peer, "master", self.bridge)
        _ip("link", "set", peer, "up")
        _ip("link", "set", inner, "netns", netns)
        inside = [
            ["link", "set", inner, "name", "eth0"],
            # No IPv6 link-local address: the hosts are IPv4-only, so what the
            # agent discovers is exactly one address per host.
            ["link", "set", "eth0", "addrgenmode", "none"],
            ["addr", "add", "%s/24" % ip, "dev", "eth0"],
            ["link", "set", "eth0", "up"],
            ["link", "set", "lo", "up"],
        ]
        for args in inside:
            proc = subprocess.run(_in_ns(netns, "ip", *args), capture_output=True,
                                  text=True, timeout=20)
            if proc.returncode != 0:
                raise RuntimeError("in %s: ip %s: %s" % (netns, " ".join(args), proc.stderr))
        etc_hosts = self.workdir / ("etc-hosts-%s" % label)
        etc_hosts.write_text("127.0.0.1 localhost\n%s %s %s\n" % (ip, fqdn, hostname))
        host = NsHost(self, label, netns, "eth0", ip, hostname, fqdn, etc_hosts)
        self.hosts.append(host)
        return host

    def close(self) -> None:
        """Kill every process started in the lab, then delete its net devices."""
        if self._closed or not self.rid:
            return
        self._closed = True
        procs = [p for h in self.hosts for p in h.processes]
        for proc in procs:
            if proc.poll() is None:
                try:
                    os.killpg(proc.pid, signal.SIGKILL)
                except (ProcessLookupError, PermissionError):
                    pass
        for proc in procs:
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                pass
        _destroy(self.rid)
        # Deleting a namespace with no process left destroys its veth end and
        # so the peer; wait briefly so a following run starts from a clean slate.
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            if not any(n.startswith(PREFIX + self.rid) for n in _link_names() + _netns_names()):
                break
            time.sleep(0.1)
