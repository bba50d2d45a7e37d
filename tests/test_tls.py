"""Generated certificates: ECDSA P-256, private keys 0600, accepted by strict verifiers."""

import os
import ssl
import stat

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from ctxd import tls


def handshake(server_ctx, client_ctx, server_hostname):
    """Run a TLS handshake between two SSLContexts over memory BIOs."""
    c_in, c_out, s_in, s_out = (ssl.MemoryBIO() for _ in range(4))
    client = client_ctx.wrap_bio(c_in, c_out, server_hostname=server_hostname)
    server = server_ctx.wrap_bio(s_in, s_out, server_side=True)
    done = {"c": False, "s": False}
    for _ in range(20):
        for name, side, out_bio, peer_in in (("c", client, c_out, s_in), ("s", server, s_out, c_in)):
            if not done[name]:
                try:
                    side.do_handshake()
                    done[name] = True
                except ssl.SSLWantReadError:
                    pass
            data = out_bio.read()
            if data:
                peer_in.write(data)
        if all(done.values()):
            return
    raise AssertionError("handshake did not finish")


@pytest.fixture
def generated(tmp_path):
    return tls.ensure_generated(str(tmp_path / "tls"), {"ctxd.example.org", "127.0.0.1", "localhost"})


def strict_client(ca_pem):
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.load_verify_locations(cadata=ca_pem)
    ctx.verify_flags |= ssl.VERIFY_X509_STRICT
    return ctx


def server_ctx(files):
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(files.cert, files.key)
    return ctx


@pytest.mark.parametrize("name", ["ctxd.example.org", "127.0.0.1", "localhost"])
def test_strict_verifier_accepts(generated, name):
    """A client with VERIFY_X509_STRICT (Python 3.13's default) verifies every SAN."""
    handshake(server_ctx(generated), strict_client(generated.ca_pem()), name)


def test_wrong_name_refused(generated):
    """A name not in the SANs fails verification."""
    with pytest.raises(ssl.SSLCertVerificationError):
        handshake(server_ctx(generated), strict_client(generated.ca_pem()), "other.example.org")


def test_keys_are_p256_and_private(generated, tmp_path):
    """CA and server keys are ECDSA P-256 and 0600; the CA is a critical-basicConstraints CA."""
    for path in (generated.key, str(tmp_path / "tls" / "ca.key")):
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
        with open(path, "rb") as f:
            key = serialization.load_pem_private_key(f.read(), password=None)
        assert isinstance(key, ec.EllipticCurvePrivateKey) and isinstance(key.curve, ec.SECP256R1)
    with open(generated.ca, "rb") as f:
        ca = x509.load_pem_x509_certificate(f.read())
    assert isinstance(ca.public_key().curve, ec.SECP256R1)
    bc = ca.extensions.get_extension_for_class(x509.BasicConstraints)
    assert bc.critical and bc.value.ca
    ca.extensions.get_extension_for_class(x509.SubjectKeyIdentifier)
    ca.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier)


def test_ca_kept_server_cert_reissued_for_new_name(tmp_path):
    """A new required name re-issues the server certificate under the SAME CA."""
    first = tls.ensure_generated(str(tmp_path / "tls"), {"localhost"})
    ca_before = first.ca_pem()
    second = tls.ensure_generated(str(tmp_path / "tls"), {"localhost", "10.1.2.3"})
    assert second.ca_pem() == ca_before
    handshake(server_ctx(second), strict_client(ca_before), "10.1.2.3")
    handshake(server_ctx(second), strict_client(ca_before), "localhost")


def test_other_ca_refused(generated, tmp_path):
    """A client trusting a different CA refuses the broker."""
    other = tls.ensure_generated(str(tmp_path / "other"), {"localhost"})
    with pytest.raises(ssl.SSLCertVerificationError):
        handshake(server_ctx(generated), strict_client(other.ca_pem()), "localhost")
