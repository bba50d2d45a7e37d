"""TLS policy, proven by real handshakes over loopback.

A real ``twistd -n ctxd`` (configured certificate A, --client-ca) shows: TLS 1.0/1.1
refused by the server, TLS 1.2/1.3 accepted with ECDHE and the server's cipher
order, certificates reloaded on SIGHUP without dropping the process or an open
connection, client certificates requested but not required. A small server built
from the same pieces (``ServerTLS`` + ``tls_factory`` + a real ``Site``) shows what
``client_certificate_name`` gives a request.
"""

import http.client
import json
import os
import select
import signal
import socket
import ssl
import subprocess
import sys
import textwrap
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Tuple

import pytest
from cryptography import x509
from OpenSSL import SSL
from twisted.internet.testing import MemoryReactorClock
from twisted.python import usage

from ctxd import tap, tls, tlsserver
from ctxd.files import write_private, write_public
from e2e import helpers
from test_tls import handshake

TIMEOUT = 5.0
UNKNOWN_CA = "TLSV1_ALERT_UNKNOWN_CA"  # the server's alert for a client certificate it cannot verify
LOOPBACK = "127.0.0.1"


# --------------------------------------------------------------------------
# Certificates: broker CA with server certificates A and B, a client CA with
# "alice", and an unrelated CA with "mallory".


@dataclass
class Pair:
    cert: str
    key: str
    serial: int


@dataclass
class Certs:
    ca: str
    a: Pair
    b: Pair
    client_ca: str
    alice: Pair
    other_ca: str
    mallory: Pair


def _save(directory: Path, name: str, cert, key) -> Pair:
    pair = Pair(str(directory / f"{name}.pem"), str(directory / f"{name}.key"), cert.serial_number)
    write_public(pair.cert, tls.cert_pem(cert))
    write_private(pair.key, tls.key_pem(key))
    return pair


@pytest.fixture(scope="module")
def certs(tmp_path_factory) -> Certs:
    d = tmp_path_factory.mktemp("certs")
    ca_cert, ca_key = tls.make_ca("broker CA")
    write_public(str(d / "ca.pem"), tls.cert_pem(ca_cert))
    names = ["localhost", LOOPBACK]
    a = _save(d, "server-a", *tls.make_server_cert(ca_cert, ca_key, names))
    b = _save(d, "server-b", *tls.make_server_cert(ca_cert, ca_key, names))
    client_ca, client_ca_key = tls.make_ca("deployer CA")
    write_public(str(d / "client-ca.pem"), tls.cert_pem(client_ca))
    alice = _save(d, "alice", *tls.make_client_cert(client_ca, client_ca_key, "alice"))
    other_ca, other_ca_key = tls.make_ca("deployer CA")  # same name, different key
    write_public(str(d / "other-ca.pem"), tls.cert_pem(other_ca))
    mallory = _save(d, "mallory", *tls.make_client_cert(other_ca, other_ca_key, "alice"))
    return Certs(str(d / "ca.pem"), a, b, str(d / "client-ca.pem"), alice, str(d / "other-ca.pem"), mallory)


# --------------------------------------------------------------------------
# Clients


def verifying_client(certs: Certs, version: Optional[ssl.TLSVersion] = None, client: Optional[Pair] = None,
                     ciphers: Optional[str] = None) -> ssl.SSLContext:
    """A client that verifies the broker against its CA, optionally pinned to one version."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.load_verify_locations(certs.ca)
    if version is not None:
        ctx.minimum_version = ctx.maximum_version = version
    if client is not None:
        ctx.load_cert_chain(client.cert, client.key)
    if ciphers is not None:
        ctx.set_ciphers(ciphers)
    return ctx


def legacy_client(version: ssl.TLSVersion) -> ssl.SSLContext:
    """A client that really offers only TLS 1.0 or 1.1: OpenSSL 3 refuses to at
    security level 1+, so this one is at @SECLEVEL=0."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    ctx.set_ciphers("ALL:@SECLEVEL=0")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        ctx.minimum_version = ctx.maximum_version = version
    return ctx


def connect(port: int, ctx: ssl.SSLContext) -> ssl.SSLSocket:
    """A completed TLS handshake with LOOPBACK:port (raises ssl.SSLError if refused)."""
    raw = socket.create_connection((LOOPBACK, port), timeout=TIMEOUT)
    try:
        return ctx.wrap_socket(raw, server_hostname=LOOPBACK if ctx.check_hostname else None)
    except BaseException:
        raw.close()
        raise


def served_serial(port: int, ctx: ssl.SSLContext) -> int:
    with connect(port, ctx) as s:
        return x509.load_der_x509_certificate(s.getpeercert(binary_form=True)).serial_number


def get(port: int, ctx: ssl.SSLContext, path: str) -> Tuple[int, bytes]:
    """One HTTPS GET on a fresh connection: (status, body)."""
    conn = http.client.HTTPSConnection(LOOPBACK, port, context=ctx, timeout=TIMEOUT)
    try:
        conn.request("GET", path)
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


def refusal(port: int, ctx: ssl.SSLContext) -> Optional[str]:
    """The TLS alert with which the server refuses this client (None if it answers): in
    the handshake (TLS 1.2) or, since a TLS 1.3 client finishes its side first, at the
    first request."""
    try:
        get(port, ctx, "/healthz")
    except ssl.SSLError as e:
        return e.reason
    return None


def wait_for(predicate, what: str, timeout: float = TIMEOUT) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(0.05)


# --------------------------------------------------------------------------
# A real twistd -n ctxd serving certificate A (live copies, replaced by the tests)


# OpenSSL 3+ already refuses TLS < 1.2 at its default security level; the broker runs with
# OpenSSL's defaults lowered (as on older builds) so that the refusal proven is ctxd's own.
PERMISSIVE_OPENSSL_CONF = """\
openssl_conf = default_conf
[default_conf]
ssl_conf = ssl_sect
[ssl_sect]
system_default = system_default_sect
[system_default_sect]
CipherString = DEFAULT@SECLEVEL=0
MinProtocol = TLSv1
"""


class TLSBroker(helpers.BrokerProcess):
    """The e2e broker with configured certificate files, a client CA and permissive OpenSSL defaults."""

    def __init__(self, workdir: Path, certs: Certs) -> None:
        super().__init__(workdir)
        self.cert = str(self.workdir / "live.pem")
        self.key = str(self.workdir / "live.key")
        self.install(certs.a)
        self.certs = certs
        self.openssl_conf = self.workdir / "openssl.cnf"
        self.openssl_conf.write_text(PERMISSIVE_OPENSSL_CONF)

    @property
    def ca_path(self) -> Path:
        return Path(self.certs.ca)

    def install(self, pair: Pair) -> None:
        """Replace the live certificate and key files (atomically, key first)."""
        write_private(self.key, Path(pair.key).read_bytes())
        write_public(self.cert, Path(pair.cert).read_bytes())

    def argv(self):
        return ["env", f"OPENSSL_CONF={self.openssl_conf}"] + super().argv() + [
            "--tls-cert", self.cert, "--tls-key", self.key, "--tls-ca", self.certs.ca,
            "--client-ca", self.certs.client_ca,
        ]


@pytest.fixture(scope="module")
def broker(certs, tmp_path_factory):
    if helpers.components_missing():
        pytest.skip(helpers.components_missing())
    b = TLSBroker(tmp_path_factory.mktemp("broker"), certs)
    try:
        b.start(timeout=15)
        yield b
    finally:
        b.kill()


@pytest.mark.parametrize("version", [ssl.TLSVersion.TLSv1, ssl.TLSVersion.TLSv1_1], ids=["TLSv1.0", "TLSv1.1"])
def test_old_versions_refused_by_server(broker, version):
    """The broker answers a TLS 1.0 / 1.1 ClientHello with a protocol_version alert, even where
    OpenSSL's own defaults would allow those versions."""
    with pytest.raises(ssl.SSLError) as info:
        connect(broker.port, legacy_client(version))
    # The alert is the server's verdict (a client unable to offer fails with NO_PROTOCOLS_AVAILABLE).
    assert info.value.reason == "TLSV1_ALERT_PROTOCOL_VERSION", info.value


@pytest.mark.parametrize("version", [ssl.TLSVersion.TLSv1, ssl.TLSVersion.TLSv1_1], ids=["TLSv1.0", "TLSv1.1"])
def test_legacy_client_really_offers_old_version(certs, version):
    """Control: the same legacy client completes a TLS 1.0 / 1.1 handshake with a permissive server."""
    server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server.load_cert_chain(certs.a.cert, certs.a.key)
    server.set_ciphers("ALL:@SECLEVEL=0")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        server.minimum_version = version
    client = legacy_client(version)
    handshake(server, client, None)


@pytest.mark.parametrize(
    "version, name", [(ssl.TLSVersion.TLSv1_2, "TLSv1.2"), (ssl.TLSVersion.TLSv1_3, "TLSv1.3")], ids=["TLSv1.2", "TLSv1.3"]
)
def test_modern_versions_accepted(broker, certs, version, name):
    """TLS 1.2 and 1.3 clients verifying the CA get a handshake (1.2 with ECDHE + AEAD) and an answer."""
    with connect(broker.port, verifying_client(certs, version)) as s:
        assert s.version() == name
        cipher = s.cipher()[0]
        if name == "TLSv1.2":
            assert cipher.startswith("ECDHE-ECDSA-") and ("GCM" in cipher or "CHACHA20" in cipher), cipher
    assert get(broker.port, verifying_client(certs, version), "/healthz")[0] == 200


def test_server_chooses_tls12_cipher(broker, certs):
    """With TLS 1.2 the server's cipher order wins over the client's."""
    ctx = verifying_client(
        certs, ssl.TLSVersion.TLSv1_2,
        ciphers="ECDHE-ECDSA-CHACHA20-POLY1305:ECDHE-ECDSA-AES256-GCM-SHA384:ECDHE-ECDSA-AES128-GCM-SHA256",
    )
    with connect(broker.port, ctx) as s:
        assert s.cipher()[0] == "ECDHE-ECDSA-AES128-GCM-SHA256"


def test_policy_suites_and_options(certs):
    """Every TLS 1.2 suite the policy allows is ECDHE + AEAD; compression and renegotiation are
    off; sessions resume by stateless tickets (no server cache) honoured for an hour at most."""
    ctx = tlsserver.server_context(certs.a.cert, certs.a.key)
    options = ctx.set_options(0)  # returns the options in force
    for flag in (SSL.OP_NO_COMPRESSION, SSL.OP_CIPHER_SERVER_PREFERENCE, SSL.OP_NO_RENEGOTIATION):
        assert options & flag == flag
    assert not options & SSL.OP_NO_TICKET
    assert ctx.get_session_cache_mode() == SSL.SESS_CACHE_OFF and ctx.get_timeout() == tlsserver.TICKET_LIFETIME
    suites = SSL.Connection(ctx, None).get_cipher_list()
    tls12 = [s for s in suites if not s.startswith("TLS_")]
    assert tls12 and all(s.startswith("ECDHE-") and ("GCM" in s or "CHACHA20" in s) for s in tls12), suites


def test_sighup_reloads_certificate_without_dropping(broker, certs):
    """After the files are replaced and SIGHUP sent, new connections get the new certificate while an
    open keep-alive connection keeps working, in the same process."""
    ctx = verifying_client(certs)
    before = served_serial(broker.port, ctx)
    new = certs.b if before == certs.a.serial else certs.a
    pid = broker.proc.pid
    conn = http.client.HTTPSConnection(LOOPBACK, broker.port, context=ctx, timeout=TIMEOUT)
    try:
        conn.connect()
        conn.auto_open = 0  # a dropped connection must fail, not be silently reopened
        conn.request("GET", "/healthz")
        response = conn.getresponse()
        assert response.status == 200 and not response.will_close
        response.read()
        sock = conn.sock

        broker.install(new)
        os.kill(pid, signal.SIGHUP)
        wait_for(lambda: served_serial(broker.port, ctx) == new.serial, "the new certificate to be served")

        conn.request("GET", "/healthz")
        response = conn.getresponse()
        assert response.status == 200
        response.read()
        assert conn.sock is sock
        assert x509.load_der_x509_certificate(sock.getpeercert(binary_form=True)).serial_number == before
    finally:
        conn.close()
    assert broker.proc.poll() is None and broker.proc.pid == pid
    assert "TLS reloaded: now serving" in broker.log()


def test_failed_reload_keeps_serving(broker, certs):
    """SIGHUP with a broken certificate file logs the error and keeps serving the previous certificate."""
    ctx = verifying_client(certs)
    before = served_serial(broker.port, ctx)
    good = Path(broker.cert).read_bytes()
    failures = broker.log().count("TLS reload failed")
    try:
        write_public(broker.cert, b"-----BEGIN CERTIFICATE-----\nnot a certificate\n-----END CERTIFICATE-----\n")
        os.kill(broker.proc.pid, signal.SIGHUP)
        wait_for(lambda: broker.log().count("TLS reload failed") > failures, "the failure to be logged")
        assert served_serial(broker.port, ctx) == before
        assert broker.proc.poll() is None
    finally:
        write_public(broker.cert, good)


def test_client_certificates_requested_not_required(broker, certs):
    """With --client-ca: a client with a certificate from that CA and a client without one are
    served; a client with a certificate from another CA is refused."""
    assert get(broker.port, verifying_client(certs, client=certs.alice), "/healthz")[0] == 200
    assert get(broker.port, verifying_client(certs), "/healthz")[0] == 200
    for version in (ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3):
        assert refusal(broker.port, verifying_client(certs, version, client=certs.mallory)) == UNKNOWN_CA


# --------------------------------------------------------------------------
# client_certificate_name on a real Site over the real TLS wrapper, in a subprocess

_NAME_SERVER = textwrap.dedent(
    """
    import json, sys
    from twisted.internet import endpoints, reactor
    from twisted.protocols.policies import WrappingFactory
    from twisted.web.resource import Resource
    from twisted.web.server import Site
    from ctxd import tlsserver

    class Name(Resource):
        isLeaf = True
        def __init__(self, tls):
            Resource.__init__(self)
            self.tls = tls
        def render_GET(self, request):
            if request.path == b"/rotate":
                self.tls.rotate()
            return json.dumps({"name": tlsserver.client_certificate_name(request)}).encode()

    cert, key, client_ca = sys.argv[1:4]
    ports = []
    # With the client CA: the bare Site, and the Site in a WrappingFactory (as the broker's
    # connection limits wrap it); without a client CA. GET /rotate rotates the ticket keys.
    for ca, wrap in ((client_ca, False), (client_ca, True), (None, False)):
        tls = tlsserver.ServerTLS(cert, key, ca)
        site = Site(Name(tls))
        factory = tlsserver.tls_factory(tls, WrappingFactory(site) if wrap else site)
        ports.append(endpoints.TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(factory))
    def ready(listening):
        print(" ".join(str(p.getHost().port) for p in listening), flush=True)
    from twisted.internet.defer import gatherResults
    gatherResults(ports).addCallback(ready)
    reactor.run()
    """
)


@pytest.fixture(scope="module")
def name_server(certs):
    """Ports of Sites answering client_certificate_name: {"client-ca": .., "client-ca, wrapped": .., "none": ..}."""
    proc = subprocess.Popen(
        [sys.executable, "-c", _NAME_SERVER, certs.a.cert, certs.a.key, certs.client_ca],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL,
        cwd=str(helpers.REPO), start_new_session=True, preexec_fn=helpers.die_with_parent,
    )
    try:
        ready, _, _ = select.select([proc.stdout], [], [], 10)
        line = proc.stdout.readline().decode() if ready else ""
        if not line.strip():
            proc.kill()
            raise AssertionError("name server did not start: " + proc.stderr.read().decode()[-2000:])
        yield dict(zip(("client-ca", "client-ca, wrapped", "none"), map(int, line.split())))
    finally:
        proc.kill()
        proc.wait(timeout=10)
        proc.stdout.close()
        proc.stderr.close()


def name_seen(port: int, ctx: ssl.SSLContext) -> Optional[str]:
    status, body = get(port, ctx, "/")
    assert status == 200
    return json.loads(body)["name"]


@pytest.mark.parametrize("server", ["client-ca", "client-ca, wrapped"])
@pytest.mark.parametrize("version", [ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3], ids=["TLSv1.2", "TLSv1.3"])
def test_client_certificate_name(name_server, certs, version, server):
    """A request gets the CN of a client certificate from the client CA, None without a
    certificate; a certificate from another CA (same CN) never gets through."""
    with_ca = name_server[server]
    assert name_seen(with_ca, verifying_client(certs, version, client=certs.alice)) == "alice"
    assert name_seen(with_ca, verifying_client(certs, version)) is None
    assert refusal(with_ca, verifying_client(certs, version, client=certs.mallory)) == UNKNOWN_CA


def get_resuming(port: int, ctx: ssl.SSLContext, path: str, session=None):
    """One HTTPS GET on a fresh connection offering SESSION: (status, body, resumed, session)."""
    conn = http.client.HTTPSConnection(LOOPBACK, port, context=ctx, timeout=TIMEOUT)
    raw = socket.create_connection((LOOPBACK, port), timeout=TIMEOUT)
    try:
        conn.sock = ctx.wrap_socket(raw, server_hostname=LOOPBACK, session=session)
        conn.request("GET", path)
        response = conn.getresponse()
        body = response.read()   # TLS 1.3 tickets arrive after the handshake
        return response.status, body, conn.sock.session_reused, conn.sock.session
    finally:
        conn.close()
        raw.close()


@pytest.mark.parametrize("version", [ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3], ids=["TLSv1.2", "TLSv1.3"])
def test_sessions_resume_until_the_ticket_keys_rotate(name_server, certs, version):
    """A reconnecting client resumes its session (no certificate exchange) with the ticket the
    server gave it, and keeps its client-certificate name when it does; after a rotation the
    old ticket no longer resumes (a full handshake, name verified again), a new one does."""
    port, alice = name_server["client-ca"], verifying_client(certs, version, client=certs.alice)
    status, body, resumed, session = get_resuming(port, alice, "/")
    assert (status, json.loads(body)["name"], resumed) == (200, "alice", False)
    status, body, resumed, _ = get_resuming(port, alice, "/", session)
    assert (status, json.loads(body)["name"], resumed) == (200, "alice", True)
    anonymous = verifying_client(certs, version)
    _, body, _, anonymous_session = get_resuming(port, anonymous, "/")
    _, body, resumed, _ = get_resuming(port, anonymous, "/", anonymous_session)
    assert resumed and json.loads(body)["name"] is None   # resuming grants no name

    assert get_resuming(port, alice, "/rotate", session)[2] is True   # answered by the old keys
    status, body, resumed, fresh = get_resuming(port, alice, "/", session)
    assert (status, json.loads(body)["name"], resumed) == (200, "alice", False)
    assert get_resuming(port, alice, "/", fresh)[2] is True


def test_no_client_ca_no_name(name_server, certs):
    """Without a client CA no certificate is asked for, so even a valid one yields no name."""
    without_ca = name_server["none"]
    assert name_seen(without_ca, verifying_client(certs, client=certs.alice)) is None
    assert name_seen(without_ca, verifying_client(certs, client=certs.mallory)) is None


def test_client_certificate_name_without_tls():
    """A request on a plain TCP transport has no client certificate name."""
    from twisted.web.test.requesthelper import DummyRequest

    assert tlsserver.client_certificate_name(DummyRequest([b""])) is None


# --------------------------------------------------------------------------
# Pieces: SIGHUP chaining, start-up errors, the option


class _CallsFromThread:
    def __init__(self):
        self.calls = []

    def callFromThread(self, f, *args):
        self.calls.append(f)


def test_sighup_handler_chains_and_restores():
    """SIGHUP hands the reload to the reactor thread, still calls the earlier handler, which is
    restored on stop."""
    seen = []

    def previous(signum, frame):
        seen.append(signum)

    reload = object()
    reactor = _CallsFromThread()
    old = signal.signal(signal.SIGHUP, previous)
    try:
        svc = tlsserver.ReloadOnSIGHUP(reload, reactor)
        svc.startService()
        os.kill(os.getpid(), signal.SIGHUP)
        wait_for(lambda: seen, "the earlier handler")
        assert reactor.calls == [reload] and seen == [signal.SIGHUP]
        svc.stopService()
        assert signal.getsignal(signal.SIGHUP) is previous
    finally:
        signal.signal(signal.SIGHUP, old)


def options(*argv):
    config = tap.Options()
    config.parseOptions(list(argv))
    return config


def test_mismatched_key_stops_startup(tmp_path, certs):
    """A --tls-key that does not belong to --tls-cert stops start-up with a message naming both files."""
    config = options(
        "--state-dir", str(tmp_path / "s"), "--tls-cert", certs.a.cert, "--tls-key", certs.b.key,
        "--tls-ca", certs.ca, "--listen", "ssl:0:interface=127.0.0.1", "--public-url", "https://localhost:8443",
    )
    with pytest.raises(usage.UsageError) as info:
        tap.makeService(config, MemoryReactorClock())
    assert certs.a.cert in str(info.value) and certs.b.key in str(info.value)


def test_client_ca_option_and_config(tmp_path, certs):
    """--client-ca must name a file; it may also be set as client-ca in the INI file."""
    with pytest.raises(usage.UsageError) as info:
        options("--client-ca", str(tmp_path / "missing.pem"))
    assert "--client-ca" in str(info.value)
    conf = tmp_path / "ctxd.conf"
    conf.write_text(f"[ctxd]\nclient-ca = {certs.client_ca}\n")
    assert options("--config", str(conf))["client-ca"] == certs.client_ca
