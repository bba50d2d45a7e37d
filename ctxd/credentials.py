"""Host credentials (docs/credentials.md): each context's certificate authorities and what they sign.

Keys. One master secret, ``credentials.key`` in the state directory (0600), is made at the
first start. Each context that opts in has its own X.509 issuing CA (ECDSA P-256) and SSH
CA (Ed25519), whose keys are derived from the master secret and the context id
(HKDF-SHA256): nothing per context is kept on disk, a restart or a restored state directory
finds them again, and no key is ever in the journal. The public halves (the CA certificate,
the SSH CA's public key) are in the context's create record. A site may instead give ctxd
its own intermediate CA (``--site-ca-cert``/``--site-ca-key``) for groups with
``issuer = "site"``.

What is signed: only names of the requesting node's vetted identity (ctxd.model), checked by
the broker before it calls :meth:`Authority.issue_x509` or :meth:`Authority.issue_ssh`.
"""

import datetime
import functools
import ipaddress
import os
import secrets
import shutil
import tempfile
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

from cryptography import x509
from cryptography.exceptions import InternalError, InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from twisted.internet import defer
from twisted.internet.utils import getProcessOutputAndValue

from ctxd import rules
from ctxd.errors import BadRequest
from ctxd.files import write_private
from ctxd.tls import ca_certificate, key_usage

MASTER_FILE = "credentials.key"
#: ssh-keygen's private working directories in the state directory (removed at start if left).
SIGN_DIR_PREFIX = "ssh-sign-"
MASTER_BYTES = 32
#: A context's CA certificate is valid this long (it only ever signs for that context).
CA_DAYS = 3650
#: Certificates are valid from this many seconds before they are issued: a fresh VM's clock
#: may be behind the head's.
SKEW = 300
#: Key sizes a request may carry.
MIN_RSA_BITS = 2048
CURVES = (ec.SECP256R1, ec.SECP384R1, ec.SECP521R1)

try:  # cryptography 40 and later sign SSH certificates themselves
    from cryptography.hazmat.primitives.serialization import SSHCertificateBuilder, SSHCertificateType
except ImportError:  # pragma: no cover - Debian 12's cryptography 38: OpenSSH's ssh-keygen signs
    SSHCertificateBuilder = SSHCertificateType = None


def load_master(state_dir: str) -> bytes:
    """The master secret in ``state_dir``, made (0600) if it is not there yet."""
    path = os.path.join(state_dir, MASTER_FILE)
    try:
        _check_private(path)
        with open(path, "rb") as f:
            master = f.read()
    except FileNotFoundError:
        master = secrets.token_bytes(MASTER_BYTES)
        write_private(path, master)
    if len(master) != MASTER_BYTES:
        raise ValueError(f"{path} is not a ctxd credentials key ({len(master)} bytes, not {MASTER_BYTES})")
    return master


def _check_private(path: str) -> None:
    """Refuse a key file others may read or write (as ssh does)."""
    mode = os.stat(path).st_mode
    if mode & 0o077:
        raise ValueError(f"{path} is accessible to others (mode {mode & 0o777:04o}): chmod 600 it")


def _utc(seconds: float) -> datetime.datetime:
    return datetime.datetime.fromtimestamp(int(seconds), datetime.timezone.utc)


def _derive(master: bytes, purpose: bytes, cid: str, length: int = 32) -> bytes:
    return HKDF(hashes.SHA256(), length, salt=b"ctxd credentials " + purpose, info=cid.encode("ascii")).derive(master)


def _expiry(cert: x509.Certificate) -> float:
    """When ``cert`` expires (cryptography 42 renamed the attribute)."""
    after = getattr(cert, "not_valid_after_utc", None) or cert.not_valid_after.replace(tzinfo=datetime.timezone.utc)
    return after.timestamp()


def _pem(cert: x509.Certificate) -> str:
    return cert.public_bytes(serialization.Encoding.PEM).decode("ascii")


def _ssh_public(key: Any) -> str:
    return key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH).decode()


def key_id(public_key: Any) -> str:
    """A public key's SHA-256 (of its SubjectPublicKeyInfo), hex: what the journal remembers of it."""
    der = public_key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    digest = hashes.Hash(hashes.SHA256())
    digest.update(der)
    return digest.finalize().hex()


class SiteCA:
    """A site's intermediate CA: its certificate, the chain above it and its key."""

    def __init__(self, cert_path: str, key_path: str) -> None:
        with open(cert_path, "rb") as f:
            chain = x509.load_pem_x509_certificates(f.read()) if hasattr(x509, "load_pem_x509_certificates") \
                else _load_pem_chain(f.read())
        _check_private(key_path)
        with open(key_path, "rb") as f:
            self.key = serialization.load_pem_private_key(f.read(), None)
        if not chain:
            raise ValueError(f"{cert_path} holds no certificate")
        self.cert = chain[0]
        try:
            is_ca = self.cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
        except x509.ExtensionNotFound:
            is_ca = False
        if not is_ca:
            raise ValueError(f"{cert_path}: the first certificate is not a CA (it needs basicConstraints CA:TRUE)")
        if key_id(self.key.public_key()) != key_id(self.cert.public_key()):
            raise ValueError(f"{key_path} is not the key of the first certificate in {cert_path}")
        # Nodes get the certificates above the intermediate, to trust; the intermediate itself
        # travels with each node's certificate.
        self.chain = _pem(self.cert)
        self.bundle = "".join(_pem(c) for c in chain[1:]) or self.chain


@functools.lru_cache(maxsize=64)
def _load_ca(pem: str) -> x509.Certificate:
    """A context's CA certificate, parsed once while it signs (a join storm signs for one context)."""
    return x509.load_pem_x509_certificate(pem.encode("ascii"))


def _load_pem_chain(data: bytes) -> List[x509.Certificate]:  # pragma: no cover - cryptography < 39
    marker = b"-----END CERTIFICATE-----"
    return [x509.load_pem_x509_certificate(part + marker) for part in data.split(marker) if b"-----BEGIN" in part]


def parse_csr(pem: Any) -> x509.CertificateSigningRequest:
    """A PEM certificate signing request with an acceptable key (400 otherwise)."""
    if not isinstance(pem, str) or len(pem) > rules.MAX_CSR or not pem.isascii():
        raise BadRequest(f"csr: must be a PEM certificate request of at most {rules.MAX_CSR} characters")
    try:
        csr = x509.load_pem_x509_csr(pem.encode("ascii"))
        key = csr.public_key()
        # Everything the broker reads of it later, read now: a duplicate extension, a name that is
        # not valid UTF-8 or IDNA, a signature OpenSSL cannot parse is a bad request, not a 500.
        requested_names(csr)
        csr.is_signature_valid
    except (ValueError, TypeError, UnicodeError, x509.DuplicateExtension, x509.UnsupportedGeneralNameType,
            UnsupportedAlgorithm, InternalError):
        raise BadRequest("csr: not a PEM certificate request ctxd can read") from None
    if isinstance(key, rsa.RSAPublicKey):
        ok = key.key_size >= MIN_RSA_BITS
    elif isinstance(key, ec.EllipticCurvePublicKey):
        ok = isinstance(key.curve, CURVES)
    else:
        ok = isinstance(key, ed25519.Ed25519PublicKey)
    if not ok:
        raise BadRequest(f"csr: the key must be EC P-256/384/521, Ed25519 or RSA of {MIN_RSA_BITS} bits or more")
    return csr


def signature_valid(csr: x509.CertificateSigningRequest) -> bool:
    """Whether the request is signed by the key it carries."""
    try:
        return csr.is_signature_valid
    except (InvalidSignature, ValueError):  # pragma: no cover - an unparsable signature
        return False


def requested_names(csr: x509.CertificateSigningRequest) -> Tuple[List[str], List[str]]:
    """The names a request asks for (its CommonName, then its subjectAltName's DNS and IP
    entries, lower case, each once), and anything else it asks for, described."""
    names: List[str] = []
    other: List[str] = []
    for attribute in csr.subject:
        if attribute.oid == NameOID.COMMON_NAME:
            names.append(str(attribute.value).lower())
        else:
            other.append(f"subject {attribute.oid._name}={str(attribute.value)[:60]}")
    try:
        sans = csr.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        sans = []
    for general in sans:
        if isinstance(general, x509.DNSName):
            names.append(general.value.lower())
        elif isinstance(general, x509.IPAddress):
            names.append(str(general.value))
        else:
            other.append(f"subjectAltName {type(general).__name__}")
    return list(dict.fromkeys(names)), other


def _general_name(name: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(name))
    except ValueError:
        return x509.DNSName(name)


class Authority:
    """Signs a context's host certificates. ``master``: :func:`load_master`'s secret;
    ``site``: the site's intermediate CA, if the site gave one; ``workdir``: a private
    directory for ssh-keygen's files where cryptography cannot sign SSH certificates;
    ``spawn``: runs it (:func:`twisted.internet.utils.getProcessOutputAndValue`'s signature)."""

    def __init__(self, master: bytes, site: Optional[SiteCA] = None, workdir: Optional[str] = None,
                 spawn: Callable[..., defer.Deferred] = getProcessOutputAndValue) -> None:
        self._master = master
        # Derived keys of the contexts signed for lately (a join storm signs for one context).
        self._x509_key = functools.lru_cache(maxsize=64)(self._derive_x509_key)
        self._ssh_key = functools.lru_cache(maxsize=64)(self._derive_ssh_key)
        self.site = site
        self.workdir = workdir
        self.ssh_keygen = shutil.which("ssh-keygen") or "/usr/bin/ssh-keygen"
        self._spawn = spawn
        # ssh-keygen runs at most this many at once (a join storm on Debian 12's cryptography 38).
        self._signers = defer.DeferredSemaphore(max(2, os.cpu_count() or 2))
        if workdir is not None:   # a CA key left behind by a broker killed while ssh-keygen ran
            for name in os.listdir(workdir):
                if name.startswith(SIGN_DIR_PREFIX):
                    shutil.rmtree(os.path.join(workdir, name), ignore_errors=True)

    # -- a context's CAs -----------------------------------------------------

    def _derive_x509_key(self, cid: str) -> ec.EllipticCurvePrivateKey:
        order = int("FFFFFFFF00000000FFFFFFFFFFFFFFFFBCE6FAADA7179E84F3B9CAC2FC632551", 16)
        scalar = int.from_bytes(_derive(self._master, b"x509 ca", cid, 48), "big") % (order - 1) + 1
        return ec.derive_private_key(scalar, ec.SECP256R1())

    def _derive_ssh_key(self, cid: str) -> ed25519.Ed25519PrivateKey:
        return ed25519.Ed25519PrivateKey.from_private_bytes(_derive(self._master, b"ssh ca", cid))

    def lost(self, cid: str, cas: Dict[str, str]) -> Optional[str]:
        """What of a context's CAs (its create record's public halves) this master secret no
        longer makes, described; None if it makes both (a restored state directory without its
        credentials.key would otherwise sign certificates no node trusts)."""
        if "x509" in cas:
            ca = _load_ca(cas["x509"])
            if key_id(ca.public_key()) != key_id(self._x509_key(cid).public_key()):
                return "its X.509 CA"
        if "ssh" in cas and cas["ssh"] != _ssh_public(self._ssh_key(cid)):
            return "its SSH CA"
        return None

    def context_cas(self, cid: str, name: str, now: float, x509_ca: bool, ssh_ca: bool) -> Dict[str, str]:
        """The public halves of a new context's CAs, for its create record."""
        cas = {}
        if x509_ca:
            subject = x509.Name([
                x509.NameAttribute(NameOID.ORGANIZATION_NAME, "ctxd"),
                x509.NameAttribute(NameOID.COMMON_NAME, f"ctxd context {cid}"),
            ])
            cert = ca_certificate(self._x509_key(cid), subject, _utc(now - SKEW),
                                  _utc(now) + datetime.timedelta(days=CA_DAYS))
            cas["x509"] = _pem(cert)
        if ssh_ca:
            cas["ssh"] = _ssh_public(self._ssh_key(cid))
        return cas

    # -- X.509 ---------------------------------------------------------------

    def _issuer(self, cid: str, ca_pem: str, issuer: str) -> Tuple[x509.Certificate, Any, str, str]:
        """(issuing certificate, its key, the chain a node presents above its own, the bundle it trusts)."""
        if issuer == "site":
            if self.site is None:
                raise BadRequest("this broker has no site CA (twistd ctxd --site-ca-cert/--site-ca-key)")
            return self.site.cert, self.site.key, self.site.chain, self.site.bundle
        return _load_ca(ca_pem), self._x509_key(cid), "", ca_pem

    def issue_x509(self, cid: str, ca_pem: str, issuer: str, csr: x509.CertificateSigningRequest,
                   names: Sequence[str], validity: int, now: float) -> Dict[str, Any]:
        """A host certificate for ``csr``'s key naming ``names`` (vetted by the caller)."""
        ca_cert, ca_key, chain, bundle = self._issuer(cid, ca_pem, issuer)
        public = csr.public_key()
        not_after = min(now + validity, _expiry(ca_cert))
        serial = x509.random_serial_number()
        # An RSA key may also be used for key transport (TLS 1.2's RSA key exchange).
        usage = key_usage(ca=False, key_encipherment=isinstance(public, rsa.RSAPublicKey))
        cert = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, names[0])]))
            .issuer_name(ca_cert.subject)
            .public_key(public)
            .serial_number(serial)
            .not_valid_before(_utc(now - SKEW))
            .not_valid_after(_utc(not_after))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(usage, critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]),
                           critical=False)
            .add_extension(x509.SubjectAlternativeName([_general_name(n) for n in names]), critical=False)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_cert.public_key()), critical=False)
            .sign(ca_key, hashes.SHA256())
        )
        return {
            "serial": format(serial, "x"),
            "names": list(names),
            "not_before": float(int(now - SKEW)),
            "not_after": float(int(not_after)),
            "key": key_id(public),
            "certificate": _pem(cert),
            "chain": chain,
            "bundle": bundle,
        }

    # -- SSH -----------------------------------------------------------------

    def issue_ssh(self, cid: str, nid: str, host_keys: Sequence[str], principals: Sequence[str],
                  validity: int, now: float) -> defer.Deferred:
        """Fires with host certificates of ``host_keys`` (``TYPE BASE64``) for ``principals``
        (vetted by the caller), signed by the context's SSH CA; keys of types OpenSSH cannot
        certify as host keys (security keys) are left out."""
        serial = secrets.randbits(63)
        before, after = int(now - SKEW), int(now + validity)
        keys = [k for k in host_keys if not k.startswith("sk-")]
        if SSHCertificateBuilder is not None:
            d = defer.succeed([self._sign_ssh(cid, nid, k, principals, serial, before, after) for k in keys])
        else:
            d = defer.gatherResults(
                [self._signers.run(self._sign_ssh_keygen, cid, nid, k, principals, serial, before, after)
                 for k in keys],
                consumeErrors=True,
            )
        d.addCallback(lambda certificates: {
            "serial": format(serial, "x"),
            "names": list(principals),
            "not_before": float(before),
            "not_after": float(after),
            "key": ssh_keys_id(host_keys),
            "certificates": [{"type": k.split()[0], "certificate": c} for k, c in zip(keys, certificates)],
        })
        return d

    def _sign_ssh(self, cid: str, nid: str, host_key: str, principals: Sequence[str], serial: int,
                  before: int, after: int) -> str:
        public = serialization.load_ssh_public_key(host_key.encode("ascii"))
        builder = (
            SSHCertificateBuilder()
            .public_key(public)
            .serial(serial)
            .type(SSHCertificateType.HOST)
            .key_id(f"ctxd:{cid}:{nid}".encode("ascii"))
            .valid_principals([p.encode("ascii") for p in principals])
            .valid_after(before)
            .valid_before(after)
        )
        return builder.sign(self._ssh_key(cid)).public_bytes().decode("ascii")

    @defer.inlineCallbacks
    def _sign_ssh_keygen(self, cid: str, nid: str, host_key: str, principals: Sequence[str], serial: int,
                         before: int, after: int) -> Any:
        """The same with OpenSSH's ssh-keygen -s, from argv (the CA key exists on disk only for
        this call, 0600 in a private directory of the state directory)."""
        with tempfile.TemporaryDirectory(dir=self.workdir, prefix=SIGN_DIR_PREFIX) as work:
            ca_path, key_path = os.path.join(work, "ca"), os.path.join(work, "host.pub")
            write_private(ca_path, self._ssh_key(cid).private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption()))
            write_private(key_path, host_key.encode("ascii") + b"\n")
            argv = ["-q", "-s", ca_path, "-h", "-I", f"ctxd:{cid}:{nid}", "-n", ",".join(principals),
                    "-V", f"0x{before:x}:0x{after:x}", "-z", str(serial), key_path]
            out, err, code = yield self._spawn(self.ssh_keygen, argv, env={})
            if code != 0:
                raise RuntimeError(f"ssh-keygen -s failed ({code}): {err.decode('utf-8', 'replace').strip()[:300]}")
            with open(os.path.join(work, "host-cert.pub"), "rb") as f:
                return " ".join(f.read().decode("ascii").split()[:2])


def ssh_keys_id(host_keys: Sequence[str]) -> str:
    """What the journal remembers of the host keys an SSH certificate was issued for."""
    digest = hashes.Hash(hashes.SHA256())
    digest.update("\n".join(host_keys).encode("ascii"))
    return digest.finalize().hex()
