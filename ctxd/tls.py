"""The broker's certificates: a generated CA and server certificate, or configured ones.

The generated CA and server keys are ECDSA P-256. Both certificates carry Subject and
Authority Key Identifiers and a critical basicConstraints, so that strict verifiers
(Python 3.13's VERIFY_X509_STRICT) accept them.
"""

import datetime
import ipaddress
import os
import socket
from typing import Iterable, List, Optional, Set

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from ctxd.files import write_private, write_public

CA_DAYS = 3650
SERVER_DAYS = 825


class TLSFiles:
    """Paths of the PEM files the broker serves with and gives to agents."""

    def __init__(self, cert: str, key: str, ca: str) -> None:
        self.cert = cert
        self.key = key
        self.ca = ca

    def ca_pem(self) -> str:
        with open(self.ca) as f:
            return f.read()

    def ca_fingerprint(self) -> str:
        cert = x509.load_pem_x509_certificate(self.ca_pem().encode("ascii"))
        digest = cert.fingerprint(hashes.SHA256()).hex().upper()
        return ":".join(digest[i:i + 2] for i in range(0, len(digest), 2))


def is_self_signed(cert_path: str) -> bool:
    """Whether the first certificate in ``cert_path`` is its own issuer."""
    with open(cert_path, "rb") as f:
        cert = x509.load_pem_x509_certificate(f.read())
    return cert.issuer == cert.subject


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.timezone.utc)


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def key_usage(ca: bool, key_encipherment: bool = False) -> x509.KeyUsage:
    """A CA signs certificates and CRLs; an end entity signs (its TLS handshakes) only,
    and with ``key_encipherment`` (an RSA key) may also receive a key."""
    return x509.KeyUsage(
        digital_signature=not ca,
        content_commitment=False,
        key_encipherment=key_encipherment,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=ca,
        crl_sign=ca,
        encipher_only=False,
        decipher_only=False,
    )


def make_ca(common_name: str = "ctxd CA"):
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    cert = ca_certificate(key, name, _now() - datetime.timedelta(hours=1), _now() + datetime.timedelta(days=CA_DAYS))
    return cert, key


def ca_certificate(key, name: x509.Name, not_before: datetime.datetime, not_after: datetime.datetime):
    """A self-signed CA certificate for ``key``: critical basicConstraints (path length 0) and
    keyUsage, subject and authority key identifiers."""
    ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    return (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(key_usage(ca=True), critical=True)
        .add_extension(ski, critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski), critical=False)
        .sign(key, hashes.SHA256())
    )


def _leaf_cert(ca_cert, ca_key, common_name: str, usage, sans: Optional[List[x509.GeneralName]], days: int):
    """An ECDSA P-256 end-entity certificate issued by ``ca_cert`` for one extended key usage."""
    key = ec.generate_private_key(ec.SECP256R1())
    ca_ski = ca_cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(_now() - datetime.timedelta(hours=1))
        .not_valid_after(_now() + datetime.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(key_usage(ca=False), critical=True)
        .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski), critical=False)
    )
    if sans is not None:
        builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    return builder.sign(ca_key, hashes.SHA256()), key


def make_server_cert(ca_cert, ca_key, names: Iterable[str]):
    """A server certificate whose SANs are ``names`` (host names and IP addresses)."""
    names = list(names)
    sans: List[x509.GeneralName] = []
    for n in names:
        try:
            sans.append(x509.IPAddress(ipaddress.ip_address(n)))
        except ValueError:
            sans.append(x509.DNSName(n))
    first_dns = next((n for n in names if not _is_ip(n)), "localhost")
    return _leaf_cert(ca_cert, ca_key, first_dns, ExtendedKeyUsageOID.SERVER_AUTH, sans, SERVER_DAYS)


def make_client_cert(ca_cert, ca_key, common_name: str, days: int = SERVER_DAYS):
    """An ECDSA P-256 client certificate (clientAuth) for mutual TLS, issued by ``ca_cert``.

    The broker takes the subject CommonName as the client's name (see
    ``ctxd.tlsserver.client_certificate_name``).
    """
    return _leaf_cert(ca_cert, ca_key, common_name, ExtendedKeyUsageOID.CLIENT_AUTH, None, days)


def cert_pem(cert) -> bytes:
    """PEM of a ``cryptography`` certificate."""
    return cert.public_bytes(serialization.Encoding.PEM)


def key_pem(key) -> bytes:
    """Unencrypted PKCS#8 PEM of a private key (write it with ``files.write_private``)."""
    return _key_pem(key)


def _is_ip(name: str) -> bool:
    try:
        ipaddress.ip_address(name)
        return True
    except ValueError:
        return False


def host_names() -> Set[str]:
    """Names and addresses this host is known by (best effort, no network)."""
    names = {"localhost", "127.0.0.1", "::1"}
    for n in (socket.gethostname(), socket.getfqdn()):
        if n:
            names.add(n)
    try:
        for info in socket.getaddrinfo(socket.gethostname(), None):
            names.add(info[4][0].split("%")[0])
    except OSError:
        pass
    try:
        # Local interface addresses without any traffic: read the kernel's tables.
        with open("/proc/net/fib_trie") as f:
            lines = f.read().splitlines()
        for i, line in enumerate(lines):
            if "/32 host LOCAL" in line and i > 0:
                names.add(lines[i - 1].split()[-1])
    except OSError:
        pass
    try:
        with open("/proc/net/if_inet6") as f:
            for line in f:
                raw = line.split()[0]
                addr = ipaddress.ip_address(int(raw, 16))
                if not addr.is_link_local:
                    names.add(str(addr))
    except (OSError, ValueError, IndexError):
        pass
    return {n for n in names if n and n.isascii()}


def _sans(cert) -> Set[str]:
    try:
        ext = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return set()
    return {str(v) for v in ext.get_values_for_type(x509.IPAddress)} | set(ext.get_values_for_type(x509.DNSName))


def ensure_generated(tls_dir: str, required_names: Iterable[str]) -> TLSFiles:
    """Create (once) a CA and a server certificate covering ``required_names``.

    The CA is kept for the life of the state directory: agents booted with its
    certificate in their bootstrap must keep trusting the broker. The server
    certificate is re-issued when a required name is missing from it.
    """
    os.makedirs(tls_dir, mode=0o700, exist_ok=True)
    os.chmod(tls_dir, 0o700)
    files = TLSFiles(
        os.path.join(tls_dir, "server.pem"), os.path.join(tls_dir, "server.key"), os.path.join(tls_dir, "ca.pem")
    )
    ca_key_path = os.path.join(tls_dir, "ca.key")
    if os.path.exists(files.ca) and os.path.exists(ca_key_path):
        with open(files.ca, "rb") as f:
            ca_cert = x509.load_pem_x509_certificate(f.read())
        with open(ca_key_path, "rb") as f:
            ca_key = serialization.load_pem_private_key(f.read(), password=None)
    else:
        ca_cert, ca_key = make_ca()
        write_private(ca_key_path, _key_pem(ca_key))
        write_public(files.ca, ca_cert.public_bytes(serialization.Encoding.PEM))
    wanted = {str(ipaddress.ip_address(n)) if _is_ip(n) else n for n in required_names}
    current: Optional[x509.Certificate] = None
    if os.path.exists(files.cert) and os.path.exists(files.key):
        with open(files.cert, "rb") as f:
            current = x509.load_pem_x509_certificate(f.read())
    if current is None or not wanted <= _sans(current) or current.issuer != ca_cert.subject:
        names = sorted(wanted | (_sans(current) if current is not None else set()), key=lambda n: (_is_ip(n), n))
        cert, key = make_server_cert(ca_cert, ca_key, names)
        write_private(files.key, _key_pem(key))
        write_public(files.cert, cert.public_bytes(serialization.Encoding.PEM))
    return files
