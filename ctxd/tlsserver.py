"""The broker's server-side TLS policy, in one place, reloadable while serving.

- :func:`server_context` builds the OpenSSL context every listener uses: TLS 1.2
  minimum (set explicitly: older Twisted releases, e.g. Debian 12's 22.4, default
  lower), TLS 1.2 suites limited to ECDHE key exchange with AEAD ciphers, the
  server's cipher order, no compression, no client-initiated renegotiation,
  resumption by stateless session tickets only (no server-side session cache) and,
  with a client CA, a *requested* (never required) client certificate verified
  against that CA only.
- :class:`ServerTLS` holds the current context; listeners ask it for each new
  connection, so :meth:`ServerTLS.reload` (re-reading the files) affects new
  connections only and never drops an established one. Every context has its own
  random ticket keys: :meth:`ServerTLS.rotate` (hourly) replaces the context with a
  new one from the same certificates, so a ticket is honoured for at most
  :data:`TICKET_LIFETIME` and a stolen ticket key opens at most an hour of tickets.
- :class:`ReloadOnSIGHUP` calls a reload function on SIGHUP, chained to any
  handler installed before it.
- :func:`client_certificate_name` gives a request's verified client certificate
  CommonName, for mapping to a deployer.
"""

import re
import signal
from typing import Any, Callable, List, NamedTuple, Optional

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import NameOID
from OpenSSL import SSL, crypto
from twisted.application import service
from twisted.internet.interfaces import IOpenSSLServerConnectionCreator
from twisted.logger import Logger
from twisted.protocols.tls import TLSMemoryBIOFactory
from zope.interface import implementer  # type: ignore[import-untyped]

from ctxd.admission import BudgetedFactory, ConnectionBudget

log = Logger()

MINIMUM_TLS_VERSION = SSL.TLS1_2_VERSION

# TLS 1.2 suites, the server's order (Mozilla "intermediate" minus finite-field DHE):
# forward secrecy through ECDHE only, AEAD ciphers only. ECDSA and RSA certificates
# both work. TLS 1.3 suites are OpenSSL's (all ephemeral (EC)DHE with AEAD).
TLS12_CIPHERS = ":".join(
    [
        "ECDHE-ECDSA-AES128-GCM-SHA256",
        "ECDHE-RSA-AES128-GCM-SHA256",
        "ECDHE-ECDSA-AES256-GCM-SHA384",
        "ECDHE-RSA-AES256-GCM-SHA384",
        "ECDHE-ECDSA-CHACHA20-POLY1305",
        "ECDHE-RSA-CHACHA20-POLY1305",
    ]
).encode("ascii")

_OPTIONS = (
    SSL.OP_NO_COMPRESSION  # CRIME
    | SSL.OP_CIPHER_SERVER_PREFERENCE
    # Client-initiated renegotiation is a CPU DoS lever. (OpenSSL's value where an
    # older pyOpenSSL lacks the name.)
    | getattr(SSL, "OP_NO_RENEGOTIATION", 0x40000000)
)

# Resumption (an agent reconnecting to the broker that closed its idle connection) skips
# the certificate exchange. Tickets are stateless (nothing held per session) and their keys
# are the context's own, random when it is made: rotating the context rotates them.
TICKET_LIFETIME = 3600
_PEM_CERTIFICATE = re.compile(rb"-----BEGIN CERTIFICATE-----.+?-----END CERTIFICATE-----", re.S)


class TLSConfigError(ValueError):
    """A certificate, key or CA file could not be used; the message names it."""


def _describe(e: Exception) -> str:
    if isinstance(e, SSL.Error) and e.args and isinstance(e.args[0], list):
        reasons = [r[2] for r in e.args[0] if len(r) == 3 and r[2]]
        if reasons:
            return "; ".join(reasons)
    return str(e) or type(e).__name__


class _Material(NamedTuple):
    """What a context is made of, read from the files once: a context can be made again (to
    rotate its ticket keys) without re-reading files an admin may be in the middle of changing."""

    chain: List[x509.Certificate]
    key: Any
    client_cas: List[x509.Certificate]
    cert_path: str
    key_path: str
    client_ca_path: Optional[str]


def _certificates(path: str, what: str) -> List[x509.Certificate]:
    try:
        with open(path, "rb") as f:
            blocks = _PEM_CERTIFICATE.findall(f.read())
        certificates = [x509.load_pem_x509_certificate(block) for block in blocks]
    except (OSError, ValueError) as e:
        raise TLSConfigError(f"{what} {path}: {_describe(e)}") from None
    if not certificates:
        raise TLSConfigError(f"{what} {path}: no PEM certificate in it")
    return certificates


def read_material(cert_path: str, key_path: str, client_ca_path: Optional[str] = None) -> _Material:
    """The certificate chain (leaf first), key and client CAs in these files. Raises
    :class:`TLSConfigError` naming the file."""
    chain = _certificates(cert_path, "TLS certificate")
    try:
        with open(key_path, "rb") as f:
            key = serialization.load_pem_private_key(f.read(), password=None)
    except (OSError, ValueError, TypeError) as e:
        raise TLSConfigError(f"TLS private key {key_path}: {_describe(e)}") from None
    client_cas = _certificates(client_ca_path, "client CA") if client_ca_path else []
    return _Material(chain, key, client_cas, cert_path, key_path, client_ca_path)


def _give(method: Callable[[Any], Any], value: Any, legacy: Callable[[Any], Any]) -> None:
    """Hand a cryptography object to a pyOpenSSL method: as is (pyOpenSSL >= 24.3 wants it so),
    or converted by ``legacy`` where the method takes only pyOpenSSL's own types (Debian 12's 23.0)."""
    try:
        method(value)
    except TypeError:
        method(legacy(value))


def context_from(material: _Material) -> SSL.Context:
    """A server context with ctxd's TLS policy serving ``material``; with client CAs, clients
    are asked for a certificate one of them issued. Raises :class:`TLSConfigError`."""
    ctx = SSL.Context(SSL.TLS_SERVER_METHOD)
    ctx.set_min_proto_version(MINIMUM_TLS_VERSION)
    ctx.set_options(_OPTIONS)
    ctx.set_cipher_list(TLS12_CIPHERS)
    # Stateless tickets only: no per-session memory in the broker.
    ctx.set_session_cache_mode(SSL.SESS_CACHE_OFF)
    ctx.set_timeout(TICKET_LIFETIME)
    # Needed by OpenSSL whenever peers are verified (a resumption attempt fails without it).
    ctx.set_session_id(b"ctxd")
    ctx.set_mode(SSL.MODE_RELEASE_BUFFERS)
    try:
        _give(ctx.use_certificate, material.chain[0], crypto.X509.from_cryptography)
        for extra in material.chain[1:]:
            _give(ctx.add_extra_chain_cert, extra, crypto.X509.from_cryptography)
        _give(ctx.use_privatekey, material.key, crypto.PKey.from_cryptography_key)
        ctx.check_privatekey()
    except (SSL.Error, ValueError, TypeError) as e:
        raise TLSConfigError(f"TLS private key {material.key_path} for certificate {material.cert_path}: "
                             f"{_describe(e)}") from None
    if material.client_cas:
        store = ctx.get_cert_store()
        try:
            for ca in material.client_cas:
                # Trust this CA only (no system store): it alone vouches for client names.
                _give(store.add_cert, ca, crypto.X509.from_cryptography)
                _give(ctx.add_client_ca, ca, crypto.X509.from_cryptography)
        except (SSL.Error, crypto.Error, ValueError, TypeError) as e:
            raise TLSConfigError(f"client CA {material.client_ca_path}: {_describe(e)}") from None
        # VERIFY_PEER without FAIL_IF_NO_PEER_CERT: a certificate is asked for; a client
        # without one still connects (and is then just not named by it), a client with a
        # certificate that does not verify is refused in the handshake.
        ctx.set_verify(SSL.VERIFY_PEER)
    else:
        ctx.set_verify(SSL.VERIFY_NONE)
    return ctx


def server_context(cert_path: str, key_path: str, client_ca_path: Optional[str] = None) -> SSL.Context:
    """A server context with ctxd's TLS policy, serving ``cert_path`` (PEM, leaf first, then
    any intermediates) with ``key_path``; with ``client_ca_path`` clients are asked for a
    certificate issued by that CA. Raises :class:`TLSConfigError`."""
    return context_from(read_material(cert_path, key_path, client_ca_path))


def certificate_summary(cert_path: str) -> str:
    """'subject, serial, expiry' of the first certificate in ``cert_path``, for the log."""
    try:
        with open(cert_path, "rb") as f:
            cert = x509.load_pem_x509_certificate(f.read())
    except (OSError, ValueError) as e:
        return f"(unreadable: {e})"
    expires = getattr(cert, "not_valid_after_utc", None) or cert.not_valid_after  # cryptography < 42
    return f"{cert.subject.rfc4514_string()}, serial {cert.serial_number:x}, expires {expires:%Y-%m-%d}"


@implementer(IOpenSSLServerConnectionCreator)
class ServerTLS:
    """The broker's current server TLS settings; listeners consult it per new connection.

    Built from file paths (the configured --tls-cert/--tls-key or the generated ones,
    and the optional --client-ca); :meth:`reload` re-reads the same paths.
    """

    def __init__(self, cert_path: str, key_path: str, client_ca_path: Optional[str] = None) -> None:
        self.cert_path = cert_path
        self.key_path = key_path
        self.client_ca_path = client_ca_path
        self._material = read_material(cert_path, key_path, client_ca_path)
        self._context = context_from(self._material)

    def reload(self) -> bool:
        """Re-read the certificate, key and client CA; new connections use them.

        On any failure the error is logged and the settings in use are kept.
        Established connections are never touched.
        """
        try:
            material = read_material(self.cert_path, self.key_path, self.client_ca_path)
            context = context_from(material)
        except TLSConfigError as e:
            log.error("TLS reload failed, still serving the previous certificate: {error}", error=str(e))
            return False
        self._material, self._context = material, context
        log.info(
            "TLS reloaded: now serving {summary}", summary=certificate_summary(self.cert_path)
        )
        return True

    def rotate(self) -> None:
        """New session-ticket keys: the same certificates in a new context. Tickets issued
        before no longer resume (those clients make a full handshake)."""
        self._context = context_from(self._material)

    def serverConnectionForTLS(self, tlsProtocol: Any) -> SSL.Connection:
        """IOpenSSLServerConnectionCreator: a connection with the current context."""
        return SSL.Connection(self._context, None)


class _BudgetedTLSFactory(BudgetedFactory, TLSMemoryBIOFactory):
    pass


def tls_factory(tls: ServerTLS, wrapped: Any, budget: Optional[ConnectionBudget] = None) -> TLSMemoryBIOFactory:
    """``wrapped`` (an IProtocolFactory, e.g. the Site) served over TLS with ``tls``'s current
    settings; connections over ``budget`` (if any) are closed before their handshake."""
    # mypy cannot see zope's @implementer (no mypy-zope plugin here).
    if budget is None:
        return TLSMemoryBIOFactory(tls, False, wrapped)  # type: ignore[arg-type]
    factory = _BudgetedTLSFactory(tls, False, wrapped)  # type: ignore[arg-type]
    factory.budget = budget
    return factory


class ReloadOnSIGHUP(service.Service):
    """While running, SIGHUP calls ``reload`` in the reactor thread.

    Any handler installed earlier is still called (chained) and is restored on stop.
    twistd (26) itself uses SIGUSR1, not SIGHUP, to rotate its log file.
    """

    def __init__(self, reload: Callable[[], Any], reactor: Any) -> None:
        self._reload = reload
        self._reactor = reactor
        self._previous: Any = None
        self._installed = False

    def startService(self) -> None:
        super().startService()
        try:
            self._previous = signal.signal(signal.SIGHUP, self._on_signal)
        except ValueError:  # not the main thread: an embedding application owns signals
            log.warn("not in the main thread: SIGHUP will not reload TLS certificates")
            return
        self._installed = True

    def _on_signal(self, signum: int, frame: Any) -> None:
        # A signal handler may interrupt the reactor anywhere: only hand the work over.
        self._reactor.callFromThread(self._reload)
        if callable(self._previous):
            self._previous(signum, frame)

    def stopService(self) -> None:
        super().stopService()
        if self._installed:
            signal.signal(signal.SIGHUP, self._previous if self._previous is not None else signal.SIG_DFL)
            self._installed = False


def _peer_certificate(connection: SSL.Connection) -> Optional[x509.Certificate]:
    """The client's certificate. With VERIFY_PEER a connection has one only if it was verified:
    in this handshake, or (a resumed session) in the full handshake whose ticket this context
    issued - a ticket from before a reload or rotation (another context) does not resume."""
    try:
        return connection.get_peer_certificate(as_cryptography=True)
    except TypeError:  # pyOpenSSL < 24.3 (e.g. Debian 12's 23.0)
        peer = connection.get_peer_certificate()
        return peer.to_cryptography() if peer is not None else None


def client_certificate_name(request: Any) -> Optional[str]:
    """The subject CommonName of the client certificate verified on ``request``'s
    connection, or None (no TLS, no client CA configured, no certificate sent, or a
    name that is not exactly one non-empty CN)."""
    transport = getattr(request, "transport", None)
    if transport is None:
        channel = getattr(request, "channel", None)
        transport = getattr(channel, "transport", None)
    get_handle = getattr(transport, "getHandle", None)
    if get_handle is None:
        return None
    connection = get_handle()
    if not isinstance(connection, SSL.Connection):
        return None
    # Only a connection whose policy verified peers has a chain we may believe.
    if not connection.get_verify_mode() & SSL.VERIFY_PEER:
        return None
    peer = _peer_certificate(connection)
    if peer is None:
        return None
    names = peer.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    if len(names) != 1:
        return None
    name = names[0].value
    if not isinstance(name, str) or not name:
        return None
    return name
