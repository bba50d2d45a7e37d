"""The agent's host credentials (issue 14): the key and request made with the real openssl command, the
broker's reply checked whole before anything is written, the installed files and ca_dir links, SSH
certificates and sshd's configuration, known_hosts with an @cert-authority line, the scripts'
environment, and renewal in watch mode. The broker's side is played here: `cryptography` signs the
request, `ssh-keygen -s` the host keys (the broker's own code is tested in its own tests)."""

import copy
import datetime
import glob
import json
import os
import shutil
import stat
import subprocess
import time
import types

import pytest
import test_agent
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from test_agent import CID, NID, agent_argv, identity, make_script, recorded, sample_view, scripts, snapshot

import ctxagent

site, broker, bootstrap, ca_pem = test_agent.site, test_agent.broker, test_agent.bootstrap, test_agent.ca_pem

SSH_KEYGEN, OPENSSL = shutil.which("ssh-keygen"), shutil.which("openssl")
# The agent uses no library of ctxd's: `make test-debian` leaves these tests to `test-pypi`.
pytestmark = [pytest.mark.agent,
              pytest.mark.skipif(not (SSH_KEYGEN and OPENSSL), reason="needs the openssl and ssh-keygen commands")]

ME = ("node-3.cluster.example.org", "node-3", "10.1.0.5")   # fqdn, hostname, primary_ip of sample_view's node


def _name(common_name):
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def issue(subject, public_key, signing_key, issuer=None, sans=None):
    """A certificate for PUBLIC_KEY signed by SIGNING_KEY (ISSUER's; self-signed without): a CA, or with
    SANS (GeneralNames) a host certificate."""
    now = datetime.datetime.now(datetime.timezone.utc)
    builder = (x509.CertificateBuilder().subject_name(_name(subject))
               .issuer_name(_name(subject) if issuer is None else issuer.subject)
               .public_key(public_key).serial_number(x509.random_serial_number())
               .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
               .add_extension(x509.BasicConstraints(ca=sans is None, path_length=None), critical=True)
               .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
               .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(signing_key.public_key()),
                              critical=False))
    if sans is not None:
        builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    return builder.sign(signing_key, hashes.SHA256())


def pem(cert):
    return cert.public_bytes(serialization.Encoding.PEM).decode("ascii")


def csr_names(csr_pem):
    """The CN, then the subjectAltName entries, of a certificate request."""
    csr = x509.load_pem_x509_csr(csr_pem.encode())
    assert csr.is_signature_valid
    san = csr.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    return [csr.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value] + [str(n.value) for n in san]


def csr_key(csr_pem):
    return x509.load_pem_x509_csr(csr_pem.encode()).public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)


def keygen(path, kind="ed25519"):
    subprocess.run([SSH_KEYGEN, "-q", "-t", kind, "-N", "", "-f", str(path)], check=True)
    return " ".join((path.parent / (path.name + ".pub")).read_text().split()[:2])


class Signer(object):
    """The broker's side of POST .../credentials: a root CA (the bundle) and an issuing CA (the chain) sign
    the request's names; an SSH CA signs the host keys in SSH_DIR for the node's names."""

    def __init__(self, work, ssh_dir, validity=86400.0):
        work.mkdir()
        self.work, self.ssh_dir, self.validity = work, ssh_dir, validity
        self.root_key, self.sub_key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
        self.root = issue("test root CA", self.root_key.public_key(), self.root_key)
        self.sub = issue("test issuing CA", self.sub_key.public_key(), self.root_key, self.root)
        self.ssh_ca = keygen(work / "ssh_ca")
        self.requests, self.times, self.last, self.same = [], [], None, False

    def answer(self, body):
        """The reply to BODY; with SAME, the last one again (as the broker while two thirds of the validity remain)."""
        self.requests.append(body)
        self.times.append(time.time())
        if not (self.same and self.last):
            self.last = self.sign(body)
        return copy.deepcopy(self.last)

    def ssh_certificate(self, public_key_file, host=True):
        shutil.copy(str(public_key_file), str(self.work / "key.pub"))
        subprocess.run([SSH_KEYGEN, "-q", "-s", str(self.work / "ssh_ca"), "-I", "test", "-n", ",".join(ME),
                        "-V", "-5m:+1d"] + (["-h"] if host else []) + [str(self.work / "key.pub")], check=True)
        return " ".join((self.work / "key-cert.pub").read_text().split()[:2])

    def sign(self, body):
        now, reply = time.time(), {}
        if "csr" in body:
            csr = x509.load_pem_x509_csr(body["csr"].encode())
            san = csr.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
            leaf = issue(csr_names(body["csr"])[0], csr.public_key(), self.sub_key, self.sub, list(san))
            reply["x509"] = {"certificate": pem(leaf), "chain": pem(self.sub), "bundle": pem(self.root),
                             "serial": "%x" % leaf.serial_number, "names": csr_names(body["csr"]),
                             "not_before": now, "not_after": now + self.validity}
        if body.get("ssh"):
            reply["ssh"] = {"certificates": [{"type": open(path).read().split()[0], "certificate": self.ssh_certificate(path)}
                                             for path in sorted(glob.glob(str(self.ssh_dir / "ssh_host_*_key.pub")))],
                            "principals": list(ME), "not_before": now, "not_after": now + self.validity}
        return reply


@pytest.fixture
def node(site, broker, bootstrap, monkeypatch):
    """A node with ed25519 and ecdsa host keys, a fake broker whose view (node.view) opts in to both kinds of
    certificate and whose credentials replies node.damage may change, a recording systemctl on the PATH."""
    tmp_path, paths = site
    ssh = tmp_path / "ssh"
    ssh.mkdir()
    keys = [keygen(ssh / ("ssh_host_%s_key" % kind), kind) for kind in ("ed25519", "ecdsa")]
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "systemctl").write_text('#!/bin/sh\necho "$@" >> %s\n' % (tmp_path / "systemctl.log"))
    (tmp_path / "bin" / "systemctl").chmod(0o755)
    monkeypatch.setenv("PATH", "%s:%s" % (tmp_path / "bin", os.environ["PATH"]))
    signer = Signer(tmp_path / "broker", ssh)
    tls = tmp_path / "tls"
    n = types.SimpleNamespace(
        tmp=tmp_path, paths=paths, ssh=ssh, signer=signer, tls=tls, ca_dir=tmp_path / "certificates",
        sshd_conf=tmp_path / "sshd_config.d" / "ctxd-host-certificates.conf", damage=lambda reply: reply,
        view=sample_view(self=identity(ssh_host_keys=keys), certificate={
            "names": ["fqdn", "hostname", "ip"], "validity": 86400, "key": str(tls / "host.key"),
            "certificate": str(tls / "host.crt"), "bundle": str(tls / "ca.pem"),
            "ca_dir": str(tmp_path / "certificates"), "issuer": "context"},
            ssh_certificate={"validity": 86400, "sshd": True},
            ssh_ca={"public_key": signer.ssh_ca, "pattern": "*.cluster.example.org", "groups": ["compute"]}))
    n.argv = lambda *extra: agent_argv(tmp_path, paths, bootstrap, "--ssh-dir", str(ssh), "--sshd-config-dir",
                                       str(n.sshd_conf.parent), *extra)
    plain = broker.request

    def request(self, method, path, token=None, body=None, timeout=None):
        if path.endswith("/credentials"):
            self.calls.append((method, path, body))
            assert token == test_agent.NODE_TOKEN
            return 200, json.dumps(n.damage(signer.answer(body))).encode()
        if "/view?" in path:
            return 200, json.dumps(n.view).encode()
        return plain(self, method, path, token, body, timeout)
    broker.request = request
    return n


def mode(path):
    return stat.S_IMODE(os.lstat(str(path)).st_mode)


def verify(*args):
    """`openssl verify ARGS`: its exit code and output."""
    done = subprocess.run([OPENSSL, "verify"] + [str(a) for a in args], stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, universal_newlines=True)
    return done.returncode, done.stdout


# ---------------------------------------------------------------------------
# The key and the request

def test_the_key_is_made_0600_and_reused(node, broker):
    """The first run makes an EC P-256 key (0600, its directory made 0755); the next run's request is
    for the same key."""
    assert ctxagent.main(node.argv()) == 0
    key = node.tls / "host.key"
    assert (mode(key), mode(node.tls)) == (0o600, 0o755)
    assert b"BEGIN PRIVATE KEY" in key.read_bytes()
    before = key.read_bytes()
    assert ctxagent.main(node.argv()) == 0
    assert key.read_bytes() == before
    first, second = node.signer.requests
    assert csr_key(first["csr"]) == csr_key(second["csr"])
    assert subprocess.run([OPENSSL, "pkey", "-in", str(key), "-noout", "-text"], stdout=subprocess.PIPE,
                          check=True).stdout.count(b"P-256") == 1


def test_a_key_not_made_for_this_node_is_replaced(node):
    """A key without its sidecar (an image snapshotted from a contextualized VM) or whose sidecar names
    another node is replaced by a new one (0600), and the sidecar (0600) then names this node."""
    assert ctxagent.main(node.argv()) == 0
    key, sidecar = node.tls / "host.key", node.tls / "host.key.ctxd-node"
    assert sidecar.read_text() == NID + "\n" and mode(sidecar) == 0o600
    for change in (sidecar.unlink, lambda: sidecar.write_text("A" * 22 + "\n")):
        before = key.read_bytes()
        change()
        assert ctxagent.main(node.argv()) == 0
        assert key.read_bytes() != before and mode(key) == 0o600
        assert sidecar.read_text() == NID + "\n"
    first, second, third = node.signer.requests
    assert len({csr_key(first["csr"]), csr_key(second["csr"]), csr_key(third["csr"])}) == 3


@pytest.mark.parametrize("kind", ["symlink", "directory", "group-readable", "another owner"])
def test_an_unsafe_key_path_is_refused(node, broker, monkeypatch, kind):
    """A key path that is a symlink or no regular file, readable by others or not the agent's own is
    refused: exit 3, reported, nothing asked for, the path left as it was."""
    node.tls.mkdir()
    key = node.tls / "host.key"
    if kind == "symlink":
        (node.tmp / "elsewhere.key").write_text("not ours\n")
        key.symlink_to(node.tmp / "elsewhere.key")
    elif kind == "directory":
        key.mkdir()
    else:
        subprocess.run([OPENSSL, "genpkey", "-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256", "-out",
                        str(key)], check=True)
        (node.tls / "host.key.ctxd-node").write_text(NID + "\n")
        key.chmod(0o640 if kind == "group-readable" else 0o600)
        if kind == "another owner":
            monkeypatch.setattr(os, "geteuid", lambda: os.lstat(str(key)).st_uid + 1)
    before = snapshot(node.tls)
    assert ctxagent.main(node.argv()) == 3
    error = broker.reports()[-1]
    assert (error["state"], error["exit_code"]) == ("error", 3)
    assert "refusing the key %s: it " % key in error["message"]
    assert node.signer.requests == [] and snapshot(node.tls) == before and recorded(node.tmp) == []


@pytest.mark.parametrize("names, expected", [
    (["fqdn", "hostname", "ip"], list(ME)),
    (["ip", "fqdn"], [ME[2], ME[0]]),
    (["hostname"], [ME[1]]),
])
def test_the_request_names_exactly_the_configured_names(node, names, expected):
    """The request's CN is the first configured name and its subjectAltName lists them all, in order (an
    address as IP:), with the request asking for SSH certificates too."""
    node.view["certificate"]["names"] = names
    assert ctxagent.main(node.argv()) == 0
    request, = node.signer.requests
    assert csr_names(request["csr"]) == [expected[0]] + expected
    assert request["ssh"] is True


def test_names_are_taken_once_each():
    """A name the identity has twice (no FQDN of its own: the short name twice) is asked for once."""
    view = ctxagent.validate_view(sample_view(self=identity(fqdn="node-3")), CID, NID)
    cert = ctxagent.Certificate(("fqdn", "hostname", "ip"), "/k", "/c", "/b", None)
    assert ctxagent.certificate_names(cert, view.identity) == ["node-3", "10.1.0.5"]


# ---------------------------------------------------------------------------
# What is installed

def test_certificates_are_installed_with_their_modes(node):
    """The certificate (leaf then chain), the bundle, ca_dir's files and hashed links, and an SSH host
    certificate beside each host key, all 0644; a TLS client trusting ca_dir verifies the certificate."""
    assert ctxagent.main(node.argv()) == 0
    leaf = node.signer.last["x509"]["certificate"]
    assert (node.tls / "host.crt").read_text() == leaf + pem(node.signer.sub)
    assert (node.tls / "ca.pem").read_text() == pem(node.signer.root)
    for path in (node.tls / "host.crt", node.tls / "ca.pem", node.ca_dir / ("ctxd-%s-0.pem" % CID)):
        assert mode(path) == 0o644
    links = [p for p in node.ca_dir.iterdir() if p.is_symlink()]
    assert [os.readlink(str(p)) for p in links] == ["ctxd-%s-0.pem" % CID]
    assert links[0].name.endswith(".0") and len(links[0].name) == 10
    chain = node.tls / "host.crt"
    assert verify("-CApath", node.ca_dir, "-untrusted", chain, chain) == (0, "%s: OK\n" % chain)
    assert verify("-CAfile", node.tls / "ca.pem", "-untrusted", chain, chain)[0] == 0
    for kind in ("ed25519", "ecdsa"):
        cert = node.ssh / ("ssh_host_%s_key-cert.pub" % kind)
        assert mode(cert) == 0o644
        shown = subprocess.run([SSH_KEYGEN, "-L", "-f", str(cert)], stdout=subprocess.PIPE, check=True,
                               universal_newlines=True).stdout
        assert "host certificate" in shown and "node-3.cluster.example.org" in shown


def test_ca_dir_links_of_others_are_kept_and_ctxd_ones_replaced(node):
    """In ca_dir, another CA's file and link (even one of the same subject hash) stay; this context's
    earlier files and links, and another context's (an image from it), are replaced by the new ones."""
    node.ca_dir.mkdir()
    subject_hash = subprocess.run([OPENSSL, "x509", "-noout", "-subject_hash"], input=pem(node.signer.root),
                                  stdout=subprocess.PIPE, universal_newlines=True, check=True).stdout.strip()
    (node.ca_dir / "site.pem").write_text("another CA\n")
    os.symlink("site.pem", str(node.ca_dir / (subject_hash + ".0")))
    (node.ca_dir / ("ctxd-%s-3.pem" % CID)).write_text("an old CA of ours\n")
    os.symlink("ctxd-%s-3.pem" % CID, str(node.ca_dir / "0badc0de.0"))
    (node.ca_dir / "ctxd-Other-context-00000000-0.pem").write_text("another context's\n")
    os.symlink("ctxd-Other-context-00000000-0.pem", str(node.ca_dir / "5ca1ab1e.0"))
    (node.ca_dir / "ctxd-site.pem").write_text("not a name this agent makes\n")
    assert ctxagent.main(node.argv()) == 0
    assert sorted(p.name for p in node.ca_dir.iterdir()) == sorted(
        ["site.pem", subject_hash + ".0", "ctxd-site.pem", "ctxd-%s-0.pem" % CID, subject_hash + ".1"])
    assert os.readlink(str(node.ca_dir / (subject_hash + ".0"))) == "site.pem"
    assert os.readlink(str(node.ca_dir / (subject_hash + ".1"))) == "ctxd-%s-0.pem" % CID
    made = {p.name: os.lstat(str(p)).st_mtime_ns for p in node.ca_dir.iterdir()}
    assert ctxagent.main(node.argv()) == 0   # again: the same CA, so nothing touched
    assert {p.name: os.lstat(str(p)).st_mtime_ns for p in node.ca_dir.iterdir()} == made


def test_sshd_is_configured_with_sshd_true_only(node):
    """With sshd = true the HostCertificate lines are written and sshd reloaded through systemctl; the same
    certificates again rewrite nothing and reload nothing; with sshd = false neither happens."""
    assert ctxagent.main(node.argv()) == 0
    certs = ["HostCertificate %s\n" % (node.ssh / ("ssh_host_%s_key-cert.pub" % kind)) for kind in ("ecdsa", "ed25519")]
    assert node.sshd_conf.read_text().splitlines(True)[1:] == certs
    assert mode(node.sshd_conf) == 0o644
    reloads = node.tmp / "systemctl.log"
    assert reloads.read_text() == "try-reload-or-restart ssh.service sshd.service\n"
    written = os.stat(str(node.sshd_conf)).st_ino
    node.signer.same = True
    assert ctxagent.main(node.argv()) == 0
    assert os.stat(str(node.sshd_conf)).st_ino == written
    assert reloads.read_text().count("\n") == 1
    node.sshd_conf.unlink()
    node.view["ssh_certificate"]["sshd"] = False
    node.signer.same = False
    assert ctxagent.main(node.argv()) == 0
    assert not node.sshd_conf.exists() and reloads.read_text().count("\n") == 1
    assert (node.ssh / "ssh_host_ed25519_key-cert.pub").exists()


def test_a_failing_reload_is_a_warning(node, capsys):
    """systemctl failing (or missing) leaves the run successful, with a warning."""
    (node.tmp / "bin" / "systemctl").write_text("#!/bin/sh\nexit 5\n")
    assert ctxagent.main(node.argv()) == 0
    assert "sshd not reloaded: systemctl try-reload-or-restart failed" in capsys.readouterr().err


def test_scripts_get_the_paths_in_their_environment(node):
    """Scripts run after the certificates are installed, with CTX_TLS_* and CTX_SSH_CERTS set."""
    make_script(node.tmp / "scripts" / "4-restarts" / "torquemaster",
                "with open(os.environ['RECORD'] + '.env', 'w') as f:\n"
                "    json.dump({k: v for k, v in os.environ.items() if k.startswith('CTX_')}, f)\n"
                "assert open(os.environ['CTX_TLS_CERT']).read().startswith('-----BEGIN CERTIFICATE-----')\n")
    assert ctxagent.main(node.argv()) == 0
    env = json.loads((node.tmp / "record.env").read_text())
    assert {k: v for k, v in env.items() if k.startswith(("CTX_TLS", "CTX_SSH"))} == {
        "CTX_TLS_KEY": str(node.tls / "host.key"), "CTX_TLS_CERT": str(node.tls / "host.crt"),
        "CTX_TLS_BUNDLE": str(node.tls / "ca.pem"), "CTX_TLS_CA_DIR": str(node.ca_dir),
        "CTX_SSH_CERTS": "%s:%s" % (node.ssh / "ssh_host_ecdsa_key-cert.pub", node.ssh / "ssh_host_ed25519_key-cert.pub")}


# ---------------------------------------------------------------------------
# Failures: nothing half done

def test_without_openssl_the_run_fails_with_exit_3_and_no_script(node, broker, monkeypatch):
    """No openssl command: exit 3, an error report saying so, no key, no script run (not even problem.sh);
    SSH certificates alone need no openssl."""
    monkeypatch.setenv("PATH", str(node.tmp / "bin"))
    assert ctxagent.main(node.argv()) == 3
    error = broker.reports()[-1]
    assert (error["state"], error["exit_code"]) == ("error", 3)
    assert "cannot run openssl (for the host certificates)" in error["message"]
    assert recorded(node.tmp) == [] and not node.tls.exists()
    del node.view["certificate"]
    assert ctxagent.main(node.argv()) == 0
    assert (node.ssh / "ssh_host_ed25519_key-cert.pub").exists() and node.signer.requests == [{"ssh": True}]


def _replace_leaf(reply, signer):
    """The certificate for another key, with the same names."""
    key = ec.generate_private_key(ec.SECP256R1())
    reply["x509"]["certificate"] = pem(issue(ME[0], key.public_key(), signer.sub_key, signer.sub,
                                             [x509.DNSName(ME[0])]))


def _resign(reply, signer, change):
    """The certificate for the request's key signed again with the names CHANGE makes of the requested
    subjectAltName entries (None: no subjectAltName); the reply's JSON names stay as they were."""
    csr = x509.load_pem_x509_csr(signer.requests[-1]["csr"].encode())
    names = change(list(csr.extensions.get_extension_for_class(x509.SubjectAlternativeName).value))
    reply["x509"]["certificate"] = pem(issue(ME[0], csr.public_key(), signer.sub_key, signer.sub, names))
    if names is None:
        assert "Alternative" not in subprocess.run([OPENSSL, "x509", "-noout", "-text"], check=True, input=reply[
            "x509"]["certificate"], stdout=subprocess.PIPE, universal_newlines=True).stdout


def _ed25519(reply):
    """The reply's SSH certificate of the ed25519 host key (the ecdsa one comes first)."""
    return reply["ssh"]["certificates"][1]


def _another_key_certified(reply, signer):
    keygen(signer.work / "other")
    _ed25519(reply)["certificate"] = signer.ssh_certificate(signer.work / "other.pub")


DAMAGES = {
    "leaf not PEM": lambda r, s: r["x509"].update(certificate="not a certificate"),
    "two leaves": lambda r, s: r["x509"].update(certificate=r["x509"]["certificate"] * 2),
    "text after the leaf": lambda r, s: r["x509"].update(certificate=r["x509"]["certificate"] + "rm -rf /\n"),
    "no bundle": lambda r, s: r["x509"].update(bundle=""),
    "garbage in PEM armour": lambda r, s: r["x509"].update(
        bundle="-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n"),
    "another name": lambda r, s: r["x509"]["names"].append("evil.example.org"),
    "a name missing": lambda r, s: r["x509"]["names"].pop(),
    "another key": _replace_leaf,
    "a certified name missing": lambda r, s: _resign(r, s, lambda names: names[:-1]),
    "another certified name": lambda r, s: _resign(r, s, lambda names: names + [x509.DNSName("evil.example.org")]),
    "an email certified too": lambda r, s: _resign(r, s, lambda names: names + [x509.RFC822Name("a@example.org")]),
    "no subjectAltName": lambda r, s: _resign(r, s, lambda names: None),
    "no x509 part": lambda r, s: r.pop("x509"),
    "not_after first": lambda r, s: r["x509"].update(not_after=r["x509"]["not_before"] - 1),
    "infinite validity": lambda r, s: r["ssh"].update(not_after=float("inf")),
    "validity a string": lambda r, s: r["ssh"].update(not_before="0"),
    "no ssh part": lambda r, s: r.pop("ssh"),
    "a foreign principal": lambda r, s: r["ssh"]["principals"].append("node-1"),
    "ssh type swapped": lambda r, s: _ed25519(r).update(type="ecdsa-sha2-nistp256"),
    "ssh comment": lambda r, s: _ed25519(r).update(certificate=_ed25519(r)["certificate"] + " root@x"),
    "ssh line break": lambda r, s: _ed25519(r).update(certificate=_ed25519(r)["certificate"] + "\nssh-rsa AAAA"),
    "ssh certificate of another key": _another_key_certified,
    "ssh user certificate": lambda r, s: _ed25519(r).update(
        certificate=s.ssh_certificate(s.ssh_dir / "ssh_host_ed25519_key.pub", host=False)),
    "ssh certificates not a list": lambda r, s: r["ssh"].update(certificates={}),
}


@pytest.mark.parametrize("damage", sorted(DAMAGES))
def test_a_malformed_reply_writes_nothing(node, broker, damage):
    """A reply with any part wrong is refused whole (exit 1, reported): no certificate, bundle, ca_dir,
    SSH certificate or sshd file is written and no script runs (only the key and its sidecar exist, made
    before asking)."""
    node.damage = lambda reply: DAMAGES[damage](reply, node.signer) or reply
    ssh_before = snapshot(node.ssh)
    assert ctxagent.main(node.argv()) == 1
    error = broker.reports()[-1]
    assert (error["state"], error["exit_code"]) == ("error", 1) and "credentials reply" in error["message"]
    assert sorted(os.listdir(str(node.tls))) == ["host.key", "host.key.ctxd-node"]
    assert snapshot(node.ssh) == ssh_before
    assert not node.ca_dir.exists() and not node.sshd_conf.parent.exists()
    assert recorded(node.tmp) == []


@pytest.mark.parametrize("status, error, reported", [
    (403, "certificate_refused", True), (409, "not_enabled", True), (409, "ca_key_lost", True),
    (401, "unauthorized", False), (410, "gone", False)])
def test_a_refusal_is_exit_6_reported_while_the_credential_works(node, broker, status, error, reported):
    """A credentials request the broker refuses ends the run with exit 6 and no script; with a node
    credential that still works (403, 409) an error report carries the broker's message, so that
    `ctxctl wait` ends; after 401, 404 or 410 none can go."""
    plain = broker.request

    def request(self, method, path, token=None, body=None, timeout=None):
        if path.endswith("/credentials"):
            return status, json.dumps({"error": error, "message": "no"}).encode()
        return plain(self, method, path, token, body, timeout)
    broker.request = request
    assert ctxagent.main(node.argv()) == 6
    assert recorded(node.tmp) == []
    if reported:
        report, = broker.reports()
        assert (report["state"], report["exit_code"]) == ("error", 6)
        assert report["message"] == "host credentials refused by the broker: HTTP %d '%s: no'" % (status, error)
    else:
        assert broker.reports() == []


@pytest.mark.parametrize("header, pause", [("7", 7), ("86400", 120), (None, 60), ("Wed, 21 Oct 2015 07:28:00 GMT", 60)])
def test_a_rate_limited_request_is_asked_again_after_retry_after(node, broker, monkeypatch, header, pause):
    """A 429 to the credentials request is asked again after its Retry-After (at most 120 s; 60 s
    without a number of seconds), and the run goes on."""
    plain, answers, pauses = broker.request, [], []

    def request(self, method, path, token=None, body=None, timeout=None):
        self.retry_after = None
        if path.endswith("/credentials") and not answers:
            answers.append(429)
            self.retry_after = header
            return 429, b'{"error": "rate_limited", "message": "ask again in 7 s"}'
        return plain(self, method, path, token, body, timeout)
    broker.request = request
    monkeypatch.setattr(ctxagent.time, "sleep", _recorded_pauses(pauses))
    assert ctxagent.main(node.argv()) == 0
    assert pauses == [pause] and len(node.signer.requests) == 1
    assert [r["state"] for r in broker.reports()] == ["ok"]


def test_a_request_rate_limited_again_and_again_ends_the_run(node, broker, monkeypatch):
    """After three waits a fourth 429 ends the run (exit 1, reported)."""
    plain, pauses = broker.request, []

    def request(self, method, path, token=None, body=None, timeout=None):
        if path.endswith("/credentials"):
            self.calls.append((method, path, body))
            self.retry_after = "1"
            return 429, b'{"error": "rate_limited", "message": "later"}'
        return plain(self, method, path, token, body, timeout)
    broker.request = request
    monkeypatch.setattr(ctxagent.time, "sleep", _recorded_pauses(pauses))
    assert ctxagent.main(node.argv()) == 1
    assert pauses == [1, 1, 1] and len([c for c in broker.calls if c[1].endswith("/credentials")]) == 4
    assert broker.reports()[-1]["exit_code"] == 1


def _recorded_pauses(pauses):
    """time.sleep, but pauses of a second or more only appended to PAUSES (a script's polling sleeps)."""
    sleep = time.sleep
    return lambda seconds: pauses.append(seconds) if seconds >= 1 else sleep(seconds)


def test_certified_names_reads_both_openssl_outputs():
    """The subjectAltName of `-ext subjectAltName` and of `-text` output (a critical one, IPv6 as OpenSSL
    prints it) reads the same; anything but DNS and IP entries is kept, so it never matches."""
    ext = ("X509v3 Subject Alternative Name: critical\n    DNS:Node-3.example.org, IP Address:FD00:0:0:0:0:0:0:1\n")
    text = "Certificate:\n    Data:\n        X509v3 extensions:\n            " + ext.replace("    ", "                ") \
        + "    Signature Algorithm: ecdsa-with-SHA256\n"
    expected = ctxagent.requested_names(["node-3.example.org", "fd00::1"])
    assert ctxagent.certified_names(ext) == ctxagent.certified_names(text) == expected
    assert ctxagent.certified_names(ext.replace("\n", ", email:a@b\n", 1)[:-1] + ", email:a@b\n") != expected
    assert ctxagent.certified_names("No extensions in certificate\n") == set()


@pytest.mark.parametrize("field, value", [
    ("certificate", {"names": [], "key": "/k", "certificate": "/c", "bundle": "/b"}),
    ("certificate", {"names": ["fqdn", "email"], "key": "/k", "certificate": "/c", "bundle": "/b"}),
    ("certificate", {"names": ["ip"], "key": "k", "certificate": "/c", "bundle": "/b"}),
    ("certificate", {"names": ["ip"], "key": "/etc/../k", "certificate": "/c", "bundle": "/b"}),
    ("certificate", {"names": ["ip"], "key": "/k", "certificate": "/c\n", "bundle": "/b"}),
    ("certificate", {"names": ["ip"], "key": "/k", "certificate": "/k", "bundle": "/b"}),
    ("certificate", {"names": ["ip"], "key": "/k", "certificate": "/c", "bundle": "/b", "ca_dir": "x"}),
    ("ssh_certificate", {"sshd": "yes"}),
    ("ssh_ca", {"public_key": "ssh-ed25519 AAAA\n@cert-authority * x", "pattern": "*", "groups": []}),
    ("ssh_ca", {"public_key": test_agent.KEY, "pattern": "* evil", "groups": []}),
    ("ssh_ca", {"public_key": test_agent.KEY, "pattern": "*.a b", "groups": []}),
    ("ssh_ca", {"public_key": test_agent.KEY, "pattern": "*", "groups": ["../x"]}),
])
def test_a_hostile_credentials_spec_is_refused(field, value):
    """Paths, names, patterns and keys of the view's credential parts are checked with the rest of it."""
    with pytest.raises(ctxagent.InputError) as info:
        ctxagent.validate_view(sample_view(**{field: value}), CID, NID)
    assert "view." + field in str(info.value)


# ---------------------------------------------------------------------------
# known_hosts

SSH_CA = {"public_key": test_agent.KEY[:-4] + "CA00", "pattern": "*.cluster.example.org", "groups": ["compute"]}


def known_hosts(view):
    plan = ctxagent.plan_actions(ctxagent.validate_view(view, CID, NID), "/state")
    return {a.target: a.args for a in plan if a.kind == ctxagent.BLOCK}["known_hosts"]


def test_known_hosts_trusts_the_ssh_ca_instead_of_certified_groups():
    """With an SSH CA, the block starts with its @cert-authority line and keeps per-host lines only for
    peers of groups without host certificates (the head, here)."""
    assert known_hosts(sample_view(ssh_ca=SSH_CA)) == (
        "@cert-authority *.cluster.example.org " + SSH_CA["public_key"],
        "node-1.cluster.example.org,node-1,10.1.0.1 " + test_agent.key_of(1))
    assert len(known_hosts(sample_view())) == 3   # without one: a line per host


def test_a_whole_run_writes_the_cert_authority_line(node):
    """The known_hosts file of a run with an SSH CA has its line and no line for a certified compute."""
    assert ctxagent.main(node.argv()) == 0
    text = (node.tmp / "known_hosts").read_text()
    assert "\n@cert-authority *.cluster.example.org %s\n" % node.signer.ssh_ca in text
    assert "node-1.cluster.example.org" in text and "node-2.cluster.example.org" not in text


def test_watch_mode_rewrites_the_block_when_only_the_ssh_ca_changed():
    """A change of the SSH CA alone rewrites the known_hosts block (no script); the same view again does nothing."""
    old, new = sample_view(), sample_view(ssh_ca=SSH_CA, revision=18)
    plan, joined, departed = ctxagent.plan_change(*(ctxagent.validate_view(v, CID, NID) for v in (old, new)))
    assert scripts(plan) == [] and joined == departed == []
    assert dict((a.target, a.args) for a in plan)["known_hosts"] == known_hosts(new)
    same = ctxagent.validate_view(new, CID, NID)
    assert ctxagent.plan_change(same, same) == ([], [], [])


def test_a_delta_keeps_the_ssh_ca_and_a_joined_compute_gets_no_line():
    """A delta merged into a view with an SSH CA keeps it; a compute joining adds no known_hosts line."""
    held = sample_view(ssh_ca=SSH_CA)
    joined = test_agent.peer("N" * 21 + "w", 7)
    delta = {k: held[k] for k in ("context_id", "node_id", "complete", "waiting_for", "state", "self", "locked")}
    delta.update(delta=True, revision=20, lease=None, peers=[dict(joined, roles=["torquemaster"], all=True)],
                 departed=[])
    merged = ctxagent.merge_delta(held, delta)
    assert merged["ssh_ca"] == SSH_CA
    plan = ctxagent.plan_change(*(ctxagent.validate_view(v, CID, NID) for v in (held, merged)))[0]
    assert dict((a.target, a.args) for a in plan)["known_hosts"] == known_hosts(held)
    assert ("0-etchosts.sh", "10.1.0.7", "node-7", "node-7.cluster.example.org") in scripts(plan)


# ---------------------------------------------------------------------------
# Renewal

def test_renewal_is_two_thirds_into_the_validity():
    """The renewal time is two thirds into the validity the reply states."""
    assert ctxagent._renewal({"not_before": 1000.0, "not_after": 4000}, "x") == 3000.0


def test_watch_mode_renews_in_time_without_running_a_script(node, broker, monkeypatch):
    """A watching node's long-poll ends in time for the renewal two thirds into the validity (3 s here): it
    asks again for the same key, installs the new certificate, reloads sshd and runs no script; a departed
    node (401) then ends the watch with exit 6."""
    monkeypatch.setattr(ctxagent, "RENEW_RETRY", 0)
    node.signer.validity = 3.0
    waits, plain = [], broker.request

    def request(self, method, path, token=None, body=None, timeout=None):
        if "delta=1" in path:
            if len(node.signer.requests) >= 3:
                return 401, b'{"error": "unauthorized", "message": "departed"}'
            waits.append(int(path.rsplit("wait=", 1)[1].split("&")[0]))
            time.sleep(min(waits[-1], 5))
            return 304, b""
        return plain(self, method, path, token, body, timeout)
    broker.request = request
    assert ctxagent.main(node.argv("--watch", "--poll-wait", "120")) == 6
    first, second, third = node.signer.requests
    assert csr_key(first["csr"]) == csr_key(second["csr"]) == csr_key(third["csr"])
    assert 1.9 <= node.signer.times[1] - node.signer.times[0] <= 4.5
    assert all(1 <= w <= 3 for w in waits), waits
    assert (node.tls / "host.crt").read_text().startswith(node.signer.last["x509"]["certificate"])
    assert (node.tmp / "systemctl.log").read_text().count("\n") == 3
    plan = ctxagent.plan_actions(ctxagent.validate_view(node.view, CID, NID), node.paths.state_dir)
    assert [tuple(r) for r in recorded(node.tmp)] == scripts(plan)   # the first run's, once
    assert [r["state"] for r in broker.reports()] == ["ok"]
