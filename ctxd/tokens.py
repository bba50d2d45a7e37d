"""Credentials: random ids and bearer tokens, stored only as hashes."""

import hashlib
import hmac
import secrets

from ctxd.rules import MAX_TOKEN

ADMIN = "ctxd_adm_"
DEPLOYER = "ctxd_dep_"
JOIN = "ctxd_join_"
NODE = "ctxd_node_"
PREFIXES = (ADMIN, DEPLOYER, JOIN, NODE)

# 32 random bytes: 256 bits, far above the 128 bits a guess would need to beat.
_TOKEN_BYTES = 32


def new_id() -> str:
    """A random, unguessable, URL-safe id of 22 characters (128 bits).

    It never starts with "-" or "_", so it is never mistaken for an option on a
    command line (``ctxctl wait $CTX``).
    """
    while True:
        candidate = secrets.token_urlsafe(16)
        if candidate[0].isalnum():
            return candidate


def new_token(prefix: str) -> str:
    """A new bearer token with a recognisable prefix naming its kind."""
    assert prefix in PREFIXES
    return prefix + secrets.token_urlsafe(_TOKEN_BYTES)


def token_hash(token: str) -> str:
    """The hex SHA-256 of a token: what the broker keeps instead of the token.

    Tokens carry 256 random bits, so a fast unsalted hash is enough: there is
    nothing to brute-force from the hash.
    """
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


def same_hash(a: str, b: str) -> bool:
    """Constant-time comparison of two token hashes."""
    return hmac.compare_digest(a.encode("ascii"), b.encode("ascii"))


def well_formed(token: str) -> bool:
    """Whether a presented credential could be one of ours at all."""
    return (
        isinstance(token, str)
        and 0 < len(token) <= MAX_TOKEN
        and token.startswith(PREFIXES)
        and token.isascii()
        and token.replace("_", "").replace("-", "").isalnum()
    )
