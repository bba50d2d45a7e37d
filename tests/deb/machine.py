"""A fresh Debian 12 machine for the package tests: debootstrap, then boot with systemd.

:class:`Machine` makes a minimal bookworm root file system (``debootstrap --variant=minbase``
plus systemd), boots it with ``systemd-nspawn --boot --private-network`` - systemd is its
init, as on a head host - and runs commands inside it through ``nsenter`` into the container's
namespaces and root. Its only network is its own loopback: everything apt needs is downloaded
into its archive cache before it boots (:meth:`Machine.download`), so the packages' maintainer
scripts run exactly as on a host, with nothing reaching out.

The root file system after debootstrap is cached as a tar file (``build/deb-test/``), so a
second run skips the download; the machine itself is always fresh.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import tarfile
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence

from tests.e2e.helpers import REPO, die_with_parent, tail

MIRROR = os.environ.get("CTXD_DEBIAN_MIRROR", "http://deb.debian.org/debian")
SUITE = "bookworm"
ROOTFS_CACHE = Path(os.environ.get("CTXD_DEB_ROOTFS_CACHE", REPO / "build" / "deb-test" / "bookworm-rootfs.tar"))
# Inside the machine: a root shell's environment, nothing from the test process.
ENV = {"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
       "LANG": "C.UTF-8", "HOME": "/root", "DEBIAN_FRONTEND": "noninteractive"}


def unavailable_reason() -> Optional[str]:
    """Why a machine cannot be booted here, or None."""
    if os.geteuid() != 0:
        return "booting a Debian system container needs root"
    for tool in ("debootstrap", "systemd-nspawn", "nsenter", "dpkg-buildpackage"):
        if shutil.which(tool) is None:
            return "%s is not installed (tests/deb/tools.sh installs it)" % tool
    return None


def _children() -> Dict[int, List[int]]:
    tree: Dict[int, List[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path("/proc", entry, "stat").read_text()
            except OSError:
                continue
            ppid = int(stat.rsplit(")", 1)[1].split()[1])
            tree.setdefault(ppid, []).append(int(entry))
    return tree


def _container_init(pid: int) -> Optional[int]:
    """The host pid of PID's descendant that is pid 1 of its own namespace (the container's init)."""
    tree, todo = _children(), [pid]
    while todo:
        for child in tree.get(todo.pop(), []):
            try:
                status = Path("/proc", str(child), "status").read_text()
            except OSError:
                continue
            nspid = [line.split()[1:] for line in status.splitlines() if line.startswith("NSpid:")]
            if nspid and nspid[0][-1] == "1" and len(nspid[0]) > 1:
                return child
            todo.append(child)
    return None


class Machine:
    """One booted Debian 12 system container; ``root`` is its file system as the host sees it."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = Path(workdir)
        self.root = self.workdir / "root"
        self.console = self.workdir / "console.log"
        self.name = "ctxd-pkg-%d" % os.getpid()
        self.proc: Optional[subprocess.Popen] = None
        self.init_pid: Optional[int] = None

    # -- before boot ---------------------------------------------------------

    def make_root(self) -> None:
        """The root file system: the cached debootstrap, or a new one (cached for next time)."""
        self.workdir.mkdir(parents=True, exist_ok=True)
        if ROOTFS_CACHE.exists():
            with tarfile.open(ROOTFS_CACHE) as tar:
                tar.extractall(self.root, numeric_owner=True)
        else:
            done = subprocess.run(
                ["debootstrap", "--variant=minbase", "--include=systemd,systemd-sysv,dbus",
                 SUITE, str(self.root), MIRROR], capture_output=True, text=True, timeout=900)
            assert done.returncode == 0, "debootstrap failed:\n%s" % tail(done.stdout + done.stderr)
            ROOTFS_CACHE.parent.mkdir(parents=True, exist_ok=True)
            partial = ROOTFS_CACHE.with_suffix(".partial")
            with tarfile.open(partial, "w") as tar:
                tar.add(self.root, arcname=".")
            partial.rename(ROOTFS_CACHE)
        # No login prompt on the console the test does not read.
        getty = self.root / "etc/systemd/system/console-getty.service"
        getty.unlink(missing_ok=True)
        getty.symlink_to("/dev/null")
        # As the Debian installer leaves a host: its name resolves to itself.
        (self.root / "etc/hostname").write_text("head\n")
        (self.root / "etc/hosts").write_text("127.0.0.1 localhost\n127.0.1.1 head\n::1 localhost ip6-localhost\n")

    def chroot(self, *argv: str, timeout: float = 600) -> subprocess.CompletedProcess:
        """Run ARGV chrooted into the (not yet booted) root, with the host's network."""
        done = subprocess.run(["chroot", str(self.root), *argv], capture_output=True, text=True,
                              env=ENV, timeout=timeout, stdin=subprocess.DEVNULL)
        assert done.returncode == 0, "chroot %s failed (%s):\n%s" % (
            " ".join(argv), done.returncode, tail(done.stdout + done.stderr))
        return done

    def copy_in(self, source: Path, inside: str) -> str:
        """Copy a host file into the machine at INSIDE (a path there); return INSIDE."""
        target = self.root / inside.lstrip("/")
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source, target)
        return inside

    def download(self, *debs: str) -> None:
        """Put everything installing DEBS (paths inside) needs into the machine's apt cache."""
        self.chroot("apt-get", "install", "-y", "-q", "--download-only", *debs)

    # -- booted --------------------------------------------------------------

    def boot(self, timeout: float = 120) -> None:
        """Boot it (systemd as pid 1, only a loopback network) and wait until systemd is up."""
        with open(self.console, "ab") as console:
            self.proc = subprocess.Popen(
                ["systemd-nspawn", "--quiet", "--boot", "--directory", str(self.root),
                 "--machine", self.name, "--private-network", "--register=no", "--keep-unit",
                 "--console=pipe"],
                stdin=subprocess.DEVNULL, stdout=console, stderr=subprocess.STDOUT,
                start_new_session=True, preexec_fn=die_with_parent)
        deadline = time.monotonic() + timeout
        while self.init_pid is None:
            assert self.proc.poll() is None, "the machine stopped while booting:\n%s" % self.console_log()
            assert time.monotonic() < deadline, "no init in the machine after %.0fs" % timeout
            time.sleep(0.2)
            self.init_pid = _container_init(self.proc.pid)
        while True:
            state = self.run("systemctl", "is-system-running", check=False).stdout.strip()
            if state in ("running", "degraded"):
                return
            assert time.monotonic() < deadline, "systemd still %r after %.0fs:\n%s" % (
                state, timeout, self.console_log())
            time.sleep(0.5)

    def enter(self, argv: Sequence[str], net_only: bool = False) -> List[str]:
        """ARGV run in the machine (its namespaces and root), or with NET_ONLY only in its
        network (a host program on the host's files talking to the machine's loopback)."""
        assert self.init_pid is not None, "not booted"
        if net_only:
            return ["nsenter", "--target", str(self.init_pid), "--net", "--", *argv]
        return ["nsenter", "--target", str(self.init_pid), "--mount", "--uts", "--ipc", "--net",
                "--pid", "--root", "--wd", "--", "/usr/bin/env", "-i",
                *("%s=%s" % kv for kv in ENV.items()), *argv]

    def run(self, *argv: str, check: bool = True, input: Optional[str] = None,
            timeout: float = 300) -> subprocess.CompletedProcess:
        """Run ARGV as root inside the machine; with CHECK, fail the test unless it exits 0."""
        done = subprocess.run(self.enter(argv), capture_output=True, text=True, input=input,
                              timeout=timeout, stdin=None if input is not None else subprocess.DEVNULL)
        if check:
            assert done.returncode == 0, "in the machine, %s exited %s:\nstdout: %s\nstderr: %s" % (
                " ".join(argv), done.returncode, tail(done.stdout), tail(done.stderr))
        return done

    def ok(self, *argv: str, **kw) -> str:
        return self.run(*argv, **kw).stdout

    def console_log(self) -> str:
        try:
            return tail(self.console.read_text(errors="replace"), 60)
        except OSError:
            return "(no console log)"

    def stop(self, timeout: float = 60) -> None:
        """Power it off (SIGTERM to nspawn halts the container's systemd), killed if it hangs."""
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)
