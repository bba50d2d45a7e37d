"""End to end in namespace hosts: the host certificates ctxd signs work with real TLS and SSH (issue 14).

A head and a compute, each a network-namespace host running the real ``python3 ctxagent.py``
against a real ``twistd -n ctxd`` on a hub host, in a context whose cluster file gives both
groups an X.509 host certificate (``[group.certificate]``, with a hashed ``ca_dir``) and the
compute an SSH host certificate presented by sshd (``[group.ssh_certificate] sshd = true``).
Then, with nothing but what the agents installed:

- ``openssl s_server`` on the head presents its certificate; ``openssl s_client`` on the
  compute verifies it against the compute's own bundle (``-CAfile``) and hashed directory
  (``-CApath``) with hostname checking on, and refuses it for another name or another CA;
- a running ``sshd`` on the compute, reloaded by the agent (a recording ``systemctl`` that
  sends it SIGHUP), presents its host certificate; ``ssh`` on the head connects with
  ``StrictHostKeyChecking=yes`` and only the ``@cert-authority`` line in its known_hosts
  (the one its agent wrote, and the one ``ctxctl known-hosts`` prints), and refuses the host
  with another CA's line or for a name the certificate does not carry.

Each client resolves its peer's fqdn through the hosts file its agent wrote. The VMs' host
keys are real (make_vm uses ssh-keygen, which the fixture guarantees) so that sshd can load
them. Root only; installs openssh-server (and openssh-client, openssl) with apt-get when
missing (a failed install fails the test when CI=true, else skips); creates /run/sshd, the
directory Debian's sshd needs, when missing.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import os
import shutil
import stat
import subprocess
import time
from pathlib import Path
from typing import List

import pytest
from cryptography import x509

from . import hosts, netns
from .helpers import (
    INITIAL_KNOWN_HOSTS,
    Ident,
    clean_env,
    die_with_parent,
    foreign_ca_pem,
    hub_broker,
    make_vm,
    managed_block,
    read_text,
    wait_agent,
    wait_until,
)

DOMAIN = "creds.e2e.test"
TLS_PORT = 4433        # the namespaces are private: fixed ports cannot collide
SSH_PORT = 2222
AGENT_TIMEOUT = 30
PRIVSEP_DIR = Path("/run/sshd")   # Debian's sshd insists on it (the ssh service creates it)


@pytest.fixture(scope="module")
def openssh_installed():
    """sshd, ssh, ssh-keygen and openssl are present (installed with apt-get if need be)."""
    hosts.require_packages(hosts.install_openssh, hosts.OPENSSH_PACKAGES)


def cluster_file(path: Path, head_tls: Path, compute_tls: Path) -> Path:
    """Head and compute with X.509 certificates (files under each VM's TLS_DIR), the compute's
    sshd presenting SSH host certificates; the torque roles the recording scripts know."""

    def certificate(tls: Path) -> str:
        return ('names = ["fqdn", "hostname", "ip"]\nvalidity = "2d"\n'
                'key = "%s"\ncertificate = "%s"\nbundle = "%s"\nca_dir = "%s"\n'
                % (tls / "host.key", tls / "host.crt", tls / "ca.pem", tls / "certificates"))

    path.write_text(
        'name = "credentials-e2e"\ndomain = "%s"\n'
        '[[group]]\nname = "head"\nquantity = 1\nprovides = ["torquemaster"]\n'
        'requires = [{ role = "torqueslave" }]\n'
        '[group.certificate]\n%s'
        '[[group]]\nname = "compute"\nquantity = 1\nprovides = ["torqueslave"]\n'
        'requires = [{ role = "torquemaster", ready = true }]\nall_identities = true\n'
        '[group.certificate]\n%s'
        '[group.ssh_certificate]\nvalidity = "2d"\nsshd = true\n'
        % (DOMAIN, certificate(head_tls), certificate(compute_tls)))
    return path


# A systemctl that records how it was called and, for a reload, sends sshd (if any) SIGHUP:
# what `systemctl try-reload-or-restart ssh.service` does on a real machine, without touching
# this machine's services.
FAKE_SYSTEMCTL = """#!/bin/sh
echo "$*" >> '{record}'
case "$1" in
  try-reload-or-restart|reload|reload-or-restart) [ -s '{pidfile}' ] && kill -HUP "$(cat '{pidfile}')" ;;
esac
exit 0
"""

SSHD_CONFIG = """\
Include {include}/*.conf
Port {port}
ListenAddress 0.0.0.0
HostKey {ssh_dir}/ssh_host_ed25519_key
HostKey {ssh_dir}/ssh_host_ecdsa_key
AuthorizedKeysFile {authorized_keys}
PidFile {pidfile}
PermitRootLogin prohibit-password
PasswordAuthentication no
KbdInteractiveAuthentication no
UsePAM no
StrictModes no
LogLevel VERBOSE
"""


def keygen(path: Path) -> str:
    """A fresh ed25519 key pair at PATH; its public key ``TYPE BASE64``."""
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "e2e", "-f", str(path)],
                   check=True, capture_output=True, timeout=30)
    return " ".join(Path(str(path) + ".pub").read_text().split()[:2])


def on(host: netns.NsHost, hosts_file: Path, argv: List[str], timeout: float = 20,
       stdin: str = "") -> subprocess.CompletedProcess:
    """ARGV run to completion in HOST, resolving names through HOSTS_FILE (what its agent wrote)."""
    return dataclasses.replace(host, etc_hosts=hosts_file).run(
        argv, timeout=timeout, with_hostname=True, input=stdin, env=clean_env())


def pem_blocks(text: str) -> List[str]:
    """The PEM certificates in TEXT, normalised (so two files' certificates compare)."""
    marker = "-----END CERTIFICATE-----"
    return [part.strip() + "\n" + marker for part in text.split(marker) if "BEGIN CERTIFICATE" in part]


def uncommented(line: str) -> str:
    """A known_hosts line without its key's comment (``[@marker] NAMES TYPE KEY``)."""
    fields = line.split()
    return " ".join(fields[:4] if fields[0].startswith("@") else fields[:3])


def mode(path: Path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_host_certificates_work_for_tls_and_ssh(openssh_installed, netlab, tmp_path, diag, timing):
    """The agents' X.509 certificate verifies in a real TLS handshake with hostname checking, and
    sshd's SSH host certificate satisfies ssh with only the @cert-authority line; wrong names
    and wrong CAs are refused."""
    t_test = time.monotonic()
    nshosts = {label: netlab.add_host(label, domain=DOMAIN) for label in ("head", "c1")}
    broker, _hub = hub_broker(netlab, tmp_path, diag)
    vms = {label: make_vm(tmp_path / "vms", label, Ident(h.ip, h.hostname, h.fqdn), (h.iface,), h)
           for label, h in nshosts.items()}
    head, c1 = vms["head"], vms["c1"]
    groups = {"head": "head", "c1": "compute"}
    tls = {label: vm.root / "tls" for label, vm in vms.items()}
    for label, vm in vms.items():
        diag.add_file("agent log of %s" % label, vm.log_path)
        diag.add_file("records of %s" % label, vm.record, lines=3)
        (vm.root / "bin").mkdir()
        fake = vm.root / "bin" / "systemctl"
        fake.write_text(FAKE_SYSTEMCTL.format(record=vm.root / "systemctl.calls",
                                              pidfile=vm.root / "sshd.pid"))
        fake.chmod(0o755)
        (vm.root / "sshd_config.d").mkdir()
    servers: List[subprocess.Popen] = []
    try:
        broker.start()
        ctx = broker.create(cluster_file(tmp_path / "cluster.toml", tls["head"], tls["c1"]),
                            tmp_path / "out")

        # sshd runs on the compute before its agent: the agent's reload makes it present the certificate.
        user_key = tmp_path / "user_key"
        (tmp_path / "authorized_keys").write_text(keygen(user_key) + "\n")
        sshd_config = c1.root / "sshd_config"
        sshd_config.write_text(SSHD_CONFIG.format(
            include=c1.root / "sshd_config.d", port=SSH_PORT, ssh_dir=c1.ssh_dir,
            authorized_keys=tmp_path / "authorized_keys", pidfile=c1.root / "sshd.pid"))
        PRIVSEP_DIR.mkdir(mode=0o755, exist_ok=True)
        sshd_log = c1.root / "sshd.log"
        diag.add_file("sshd log (c1)", sshd_log, lines=60)
        with open(sshd_log, "ab") as log:
            servers.append(c1.nshost.popen(
                [shutil.which("sshd", path=hosts.HOST_PATH), "-D", "-e", "-f", sshd_config],
                with_hostname=True, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                env=clean_env(), preexec_fn=die_with_parent))
        wait_until(lambda: "Server listening on" in read_text(sshd_log) or servers[0].poll() is not None,
                   10, "sshd to listen")
        assert servers[0].poll() is None, read_text(sshd_log)

        t_agents = time.monotonic()
        setup_s = t_agents - t_test
        procs = {}
        for label, vm in vms.items():
            argv = vm.argv(ctx.bootstrap(groups[label]), AGENT_TIMEOUT,
                           ["--sshd-config-dir", vm.root / "sshd_config.d"])
            argv = [str(a) for a in argv]
            with open(vm.log_path, "ab") as log:
                procs[label] = vm.nshost.popen(
                    argv, with_hostname=True, stdout=log, stderr=subprocess.STDOUT,
                    stdin=subprocess.DEVNULL, cwd=str(vm.root), preexec_fn=die_with_parent,
                    env=clean_env(PATH="%s:%s" % (vm.root / "bin", os.environ.get("PATH", hosts.HOST_PATH))))
            vm.procs.append(procs[label])
        rcs = {label: wait_agent(vms[label], proc, AGENT_TIMEOUT + 15) for label, proc in procs.items()}
        agents_s = time.monotonic() - t_agents
        assert rcs == {"head": 0, "c1": 0}, rcs

        # -- what the agents installed ---------------------------------------------------
        ca_pem = broker.ctxctl_ok("ca", ctx.cid)
        (ca_line,) = [l for l in broker.ctxctl_ok("known-hosts", ctx.cid).splitlines()
                      if l.startswith("@cert-authority ")]
        assert ca_line.split()[1] == "*." + DOMAIN, ca_line
        for label, vm in vms.items():
            t = tls[label]
            assert mode(t / "host.key") == 0o600, label
            assert (mode(t / "host.crt"), mode(t / "ca.pem")) == (0o644, 0o644), label
            (leaf,) = pem_blocks((t / "host.crt").read_text())   # the context's CA signs directly
            cert = x509.load_pem_x509_certificate(leaf.encode())
            names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
            assert (sorted(names.get_values_for_type(x509.DNSName)), names.get_values_for_type(x509.IPAddress)) \
                == (sorted([vm.ident.fqdn, vm.ident.short]), [ipaddress.ip_address(vm.ident.ip)]), label
            assert cert.subject.rfc4514_string() == "CN=" + vm.ident.fqdn, label
            assert pem_blocks((t / "ca.pem").read_text()) == pem_blocks(ca_pem), label
            subject_hash = subprocess.run(["openssl", "x509", "-noout", "-subject_hash", "-in", t / "ca.pem"],
                                          capture_output=True, text=True, check=True).stdout.strip()
            listing = {p.name: (os.readlink(p) if p.is_symlink() else None) for p in (t / "certificates").iterdir()}
            assert listing == {"ctxd-%s-0.pem" % ctx.cid: None,
                               "%s.0" % subject_hash: "ctxd-%s-0.pem" % ctx.cid}, listing
            env = {"CTX_TLS_KEY": str(t / "host.key"), "CTX_TLS_CERT": str(t / "host.crt"),
                   "CTX_TLS_BUNDLE": str(t / "ca.pem"), "CTX_TLS_CA_DIR": str(t / "certificates")}
            if vm is c1:
                env["CTX_SSH_CERTS"] = ":".join(sorted(str(vm.ssh_dir / ("ssh_host_%s_key-cert.pub" % k))
                                                       for k in ("ecdsa", "ed25519")))
            records = vm.records()
            assert len(records) >= 5, "scripts that ran on %s: %s" % (label, [r["script"] for r in records])
            for r in records:
                seen = {k: v for k, v in r["env"].items() if k.startswith(("CTX_TLS_", "CTX_SSH_"))}
                if "CTX_SSH_CERTS" in seen:   # in no particular order
                    seen["CTX_SSH_CERTS"] = ":".join(sorted(seen["CTX_SSH_CERTS"].split(":")))
                assert seen == env, (label, r["script"], seen)

        # The head's known_hosts: only the CA line (its one peer presents a certificate); the
        # compute's: the CA line and the head's keys (the head has no SSH certificate).
        # Inside the cluster the line is for any host (short names and addresses too); the
        # deployer's (ctxctl known-hosts) for the domain's names.
        node_ca_line = uncommented(ca_line).replace(" *.%s " % DOMAIN, " * ")
        inside, outside = managed_block(head.known_hosts_file.read_text(), ctx.cid)
        assert [uncommented(l) for l in inside] == [node_ca_line], inside
        assert outside == INITIAL_KNOWN_HOSTS.splitlines()
        inside, _ = managed_block(c1.known_hosts_file.read_text(), ctx.cid)
        assert sorted(map(uncommented, inside)) == sorted([node_ca_line] + head.ident.known_hosts_lines()), inside
        ssh_certs = sorted(c1.ssh_dir / ("ssh_host_%s_key-cert.pub" % k) for k in ("ecdsa", "ed25519"))
        assert [mode(p) for p in ssh_certs] == [0o644, 0o644]
        conf = c1.root / "sshd_config.d" / "ctxd-host-certificates.conf"
        assert sorted(l for l in conf.read_text().splitlines() if not l.startswith("#")) == [
            "HostCertificate %s" % p for p in ssh_certs]
        assert not (head.root / "sshd_config.d" / "ctxd-host-certificates.conf").exists()
        (reload,) = read_text(c1.root / "systemctl.calls").splitlines()
        assert reload.split()[0] == "try-reload-or-restart" and "ssh" in reload.split()[1], reload
        assert not (head.root / "systemctl.calls").exists()

        # -- TLS: s_server on the head, s_client on the compute ----------------------------
        t_checks = time.monotonic()
        s_server_log = head.root / "s_server.log"
        diag.add_file("s_server log (head)", s_server_log, lines=40)
        with open(s_server_log, "ab") as log:
            servers.append(head.nshost.popen(
                ["openssl", "s_server", "-cert", tls["head"] / "host.crt", "-key", tls["head"] / "host.key",
                 "-accept", str(TLS_PORT), "-www"],
                with_hostname=True, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                env=clean_env(), preexec_fn=die_with_parent))
        wait_until(lambda: "ACCEPT" in read_text(s_server_log) or servers[-1].poll() is not None,
                   10, "s_server to accept")
        assert servers[-1].poll() is None, read_text(s_server_log)
        foreign = tmp_path / "foreign-ca.pem"
        foreign.write_text(foreign_ca_pem())

        def s_client(*trust: object, name: str = head.ident.fqdn) -> subprocess.CompletedProcess:
            return on(c1.nshost, c1.hosts_file,
                      ["openssl", "s_client", "-connect", "%s:%d" % (head.ident.fqdn, TLS_PORT),
                       "-servername", head.ident.fqdn, *map(str, trust), "-verify_hostname", name,
                       "-verify_return_error", "-ign_eof"], stdin="GET / HTTP/1.0\r\n\r\n")

        for trust in (["-CAfile", tls["c1"] / "ca.pem"], ["-CApath", tls["c1"] / "certificates"]):
            proc = s_client(*trust)
            assert proc.returncode == 0 and "Verify return code: 0 (ok)" in proc.stdout \
                and "HTTP/1.0 200 ok" in proc.stdout, (trust, proc.stdout[-2000:], proc.stderr)
        for trust, name, why in ((["-CAfile", tls["c1"] / "ca.pem"], c1.ident.fqdn, "hostname mismatch"),
                                 (["-CApath", tls["c1"] / "certificates"], "intruder." + DOMAIN,
                                  "hostname mismatch"),
                                 (["-CAfile", foreign], head.ident.fqdn, "unable to get local issuer certificate")):
            proc = s_client(*trust, name=name)
            assert proc.returncode != 0 and why in proc.stdout + proc.stderr, (
                trust, name, proc.returncode, proc.stdout[-2000:], proc.stderr)
            assert "HTTP/1.0 200 ok" not in proc.stdout

        # -- SSH: the compute's sshd (reloaded by its agent), ssh from the head ------------
        wait_until(lambda: read_text(sshd_log).count("Server listening on") >= 2
                   or servers[0].poll() is not None, 10, "sshd to listen again after the agent's reload")
        assert "Received SIGHUP; restarting." in read_text(sshd_log)
        assert servers[0].poll() is None, read_text(sshd_log)
        only_ca = tmp_path / "known_hosts.ca"
        only_ca.write_text(ca_line + "\n")
        other_ca = tmp_path / "known_hosts.other-ca"
        other_ca.write_text("@cert-authority *.%s %s\n" % (DOMAIN, keygen(tmp_path / "other_ca")))

        def ssh(known_hosts: Path, *options: str, name: str = c1.ident.fqdn) -> subprocess.CompletedProcess:
            return on(head.nshost, head.hosts_file,
                      ["ssh", "-F", "/dev/null", "-v", "-o", "BatchMode=yes", "-o", "StrictHostKeyChecking=yes",
                       "-o", "UserKnownHostsFile=%s" % known_hosts, "-o", "GlobalKnownHostsFile=/dev/null",
                       "-o", "UpdateHostKeys=no", "-o", "IdentitiesOnly=yes", "-o", "ConnectTimeout=10",
                       "-i", str(user_key), "-p", str(SSH_PORT), *options,
                       "root@%s" % name, "echo", "hello from", "$(hostname)"])

        # The agent's known_hosts by fqdn, short name and address; the deployer's line by fqdn.
        for known_hosts, name in ((head.known_hosts_file, c1.ident.fqdn), (head.known_hosts_file, c1.ident.short),
                                  (head.known_hosts_file, c1.ident.ip), (only_ca, c1.ident.fqdn)):
            proc = ssh(known_hosts, name=name)
            assert proc.returncode == 0 and proc.stdout.split() == ["hello", "from", c1.ident.short], (
                known_hosts, name, proc.returncode, proc.stdout, proc.stderr[-3000:])
            assert "matches the ED25519-CERT host certificate" in proc.stderr \
                or "matches the ECDSA-CERT host certificate" in proc.stderr, proc.stderr[-3000:]
        # Another CA's line, then the right one but for a name the certificate does not carry.
        for known_hosts, options, why in (
                (other_ca, (), "host key is known for"),
                (only_ca, ("-o", "HostKeyAlias=intruder." + DOMAIN), "name is not a listed principal")):
            proc = ssh(known_hosts, *options)
            assert proc.returncode == 255 and why in proc.stderr \
                and "Host key verification failed." in proc.stderr, (
                    known_hosts, options, proc.returncode, proc.stdout, proc.stderr[-3000:])
            assert "hello" not in proc.stdout
        checks_s = time.monotonic() - t_checks

        # Nothing left running in the two hosts once the servers are stopped.
        for proc in servers:
            proc.terminate()
            proc.wait(timeout=10)
        ids = [(st.st_dev, st.st_ino) for st in (os.stat(netns.NETNS_DIR / h.netns) for h in nshosts.values())]
        assert hosts.processes_in(ids, []) == [], "left running in head or c1"
        timing("credentials: broker, hosts, sshd up %.2fs; agents exited ok %.2fs after start; "
               "TLS and SSH checks %.2fs; whole test %.2fs"
               % (setup_s, agents_s, checks_s, time.monotonic() - t_test))
    finally:
        for proc in servers:
            if proc.poll() is None:
                proc.kill()
                proc.wait(timeout=10)
        for vm in vms.values():
            vm.kill()
        broker.kill()
