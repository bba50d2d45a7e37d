"""ctxctl's connection to the broker: where it is, the credentials, and JSON calls to it.

- :func:`resolve_settings` / :func:`load_credentials` - where the broker, the token
  and the CA come from: command line > environment > configuration file (:mod:`.config`)
  > the broker's ``--state-dir`` file.
- :func:`make_client` - the one place that builds the real treq client; it always
  verifies the broker against the CA.
- :class:`BrokerClient` - one JSON call to the broker, mapping every failure to a
  one-line :class:`~ctxd.ctxctl.errors.CliError`. Takes any object with treq's client
  API, so tests pass a ``treq.testing.StubTreq``.
"""

import argparse
import hashlib
import json
import os
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Mapping, Optional, Tuple

import treq
from treq.client import HTTPClient
from twisted.internet import defer
from twisted.internet import error as neterror
from twisted.internet.interfaces import IReactorTime

from ctxd import rules, tokens
from ctxd.ctxctl import config as configfile
from ctxd.ctxctl.errors import BrokerRefusal, BrokerUnavailable, CliError, reason
from ctxd.ctxctl.render import cell

REQUEST_TIMEOUT = 60.0
#: How long the connection that only looks at a refused certificate may take.
PROBE_TIMEOUT = 5.0
STATE_FILE = "ctxctl.json"

ENV_URL = "CTXCTL_URL"
ENV_TOKEN_FILE = "CTXCTL_TOKEN_FILE"
ENV_CA = "CTXCTL_CA"
ENV_STATE_DIR = "CTXCTL_STATE_DIR"


@dataclass(frozen=True)
class BrokerSettings:
    """Where the broker, the token and the CA certificate are (not yet read): files, or
    (``token``, ``ca_pem``) the text itself from a profile of a configuration file, ``profile``."""

    url: str
    token_file: Optional[str]
    ca_file: Optional[str]
    token: Optional[str] = None
    ca_pem: Optional[str] = None
    profile: str = ""


@dataclass(frozen=True)
class Credentials:
    """Everything needed to talk to the broker, read and checked."""

    url: str
    token: str
    ca_pem: bytes
    ca_file: str
    token_file: str


#: What a source of settings says: {"url": URL, "token": ("file"|"text", VALUE),
#: "ca": ("file"|"text", VALUE)}, each key only when it says it.
_Said = Dict[str, Any]


def resolve_settings(args: argparse.Namespace, environ: Mapping[str, str]) -> BrokerSettings:
    """Pick each of the URL, the token and the CA from the first source that gives it:

    1. the command line: ``--url``, ``--token-file``, ``--ca``; then the configuration file's
       profile when ``--config`` or ``--profile`` is given; then ``--state-dir``;
    2. the environment, in the same order: ``CTXCTL_URL``, ``CTXCTL_TOKEN_FILE``,
       ``CTXCTL_CA``; ``CTXCTL_CONFIG``/``CTXCTL_PROFILE``; ``CTXCTL_STATE_DIR``;
    3. the configuration file at its default place (:func:`.config.default_path`), if there is one.

    A source is read only when the ones before it left something missing, so explicit flags
    work even with a stale ``CTXCTL_STATE_DIR`` or a broken default configuration file.

    A profile's token (and a state directory's admin token) goes only to the URL of the same
    source: with a URL from elsewhere that differs, this refuses rather than sending broker A's
    token to broker B. Only ``--token-file``/``CTXCTL_TOKEN_FILE`` pair a token with any URL.
    """
    config_flag = getattr(args, "config", None) or getattr(args, "profile", None)
    config_env = environ.get(configfile.ENV_CONFIG) or environ.get(configfile.ENV_PROFILE)
    config_path = (getattr(args, "config", None) or environ.get(configfile.ENV_CONFIG)
                   or configfile.default_path(environ))
    profile_name = getattr(args, "profile", None) or environ.get(configfile.ENV_PROFILE) or None
    state_dir = args.state_dir or environ.get(ENV_STATE_DIR) or None
    used: Dict[str, Any] = {"profile": None, "state_dir": None}

    def direct(url: Optional[str], token_file: Optional[str], ca: Optional[str]) -> _Said:
        said: _Said = {"url": url or None, "token": ("file", token_file) if token_file else None,
                       "ca": ("file", ca) if ca else None}
        return {k: v for k, v in said.items() if v is not None}

    def config(explicit: bool) -> _Said:
        path = os.path.expanduser(config_path)
        if not explicit and not os.path.lexists(path):
            return {}
        profile = configfile.choose_profile(configfile.read_config(path), path, profile_name)
        used["profile"] = profile
        said: _Said = {"url": profile.url, "token": ("text", profile.token) if profile.token else None,
                       "ca": ("text", profile.ca) if profile.ca else None}
        return {k: v for k, v in said.items() if v is not None}

    def state(directory: str) -> _Said:
        used["state_dir"] = directory
        found = _read_state_file(directory)
        return {k: v for k, v in (("url", found.get("url")),
                                  # relative paths are relative to it; absolute ones stay
                                  ("token", ("file", os.path.join(directory, found["token_file"]))
                                   if found.get("token_file") else None),
                                  ("ca", ("file", os.path.join(directory, found["ca"]))
                                   if found.get("ca") else None)) if v}

    def named_profile() -> str:
        return used["profile"].origin

    def named_state() -> str:
        return os.path.join(used["state_dir"], STATE_FILE)

    # Each source: how to name where its values came from, whether its token belongs to its own
    # URL only (a profile's, a state dir's), and how to read it.
    sources: List[Tuple[Callable[[], str], bool, Callable[[], _Said]]] = [
        (lambda: "--url", False, lambda: direct(args.url, args.token_file, args.ca))]
    if config_flag:
        sources.append((named_profile, True, lambda: config(True)))
    if args.state_dir:
        sources.append((named_state, True, lambda: state(args.state_dir)))
    sources.append((lambda: ENV_URL, False,
                    lambda: direct(environ.get(ENV_URL), environ.get(ENV_TOKEN_FILE), environ.get(ENV_CA))))
    if config_env and not config_flag:
        sources.append((named_profile, True, lambda: config(True)))
    if state_dir and not args.state_dir:
        sources.append((named_state, True, lambda: state(state_dir)))
    if not config_flag and not config_env:
        sources.append((named_profile, True, lambda: config(False)))

    chosen: _Said = {}
    url_from = ""
    token_bound: Optional[Tuple[str, Optional[str]]] = None  # (its source, that source's URL)
    for name, binds_token, source in sources:
        if len(chosen) == 3:
            break
        said = source()
        if "url" in said and "url" not in chosen:
            url_from = name()
        if "token" in said and "token" not in chosen and binds_token:
            token_bound = (name(), said.get("url"))
        for key, value in said.items():
            chosen.setdefault(key, value)
    if token_bound is not None and "url" in chosen:
        token_from, token_url = token_bound
        if token_url is None or token_url.rstrip("/") != chosen["url"].rstrip("/"):
            belongs = f"belongs to {token_url}" if token_url else "names no broker URL"
            raise CliError(f"the token of {token_from} {belongs}, not to {chosen['url']} (from {url_from}): "
                           f"give --token-file or set {ENV_TOKEN_FILE} to use another token with that URL")
    missing = [what for key, what in (("url", "broker URL"), ("token", "admin token file"),
                                      ("ca", "CA certificate")) if key not in chosen]
    if missing:
        flags = "/".join(flag for key, flag in (("url", "--url"), ("token", "--token-file"),
                                                 ("ca", "--ca")) if key not in chosen)
        envs = "/".join(env for key, env in (("url", ENV_URL), ("token", ENV_TOKEN_FILE),
                                              ("ca", ENV_CA)) if key not in chosen)
        profile, directory = used["profile"], used["state_dir"]
        names = ([profile.origin] if profile is not None else []) + \
            ([os.path.join(directory, STATE_FILE)] if directory is not None else [])
        if len(names) == 2:
            where = f" (neither {names[0]} nor {names[1]} names it)"
        elif names:
            where = f" ({names[0]} does not name it)"
        else:
            where = " or give --config FILE or --state-dir DIR (the broker's state directory)"
        raise CliError(f"no {_join_words(missing)}: give {flags} or set {envs}{where}")
    profile = used["profile"]
    token_kind, token = chosen["token"]
    ca_kind, ca = chosen["ca"]
    return BrokerSettings(url=chosen["url"],
                          token_file=token if token_kind == "file" else None,
                          ca_file=ca if ca_kind == "file" else None,
                          token=token if token_kind == "text" else None,
                          ca_pem=ca if ca_kind == "text" else None,
                          profile=profile.origin if profile is not None else "")


def _read_state_file(state_dir: str) -> Dict[str, str]:
    path = os.path.join(state_dir, STATE_FILE)
    try:
        with open(path, "rb") as f:
            state = json.loads(f.read().decode("utf-8"))
    except FileNotFoundError:
        raise CliError(f"{path} does not exist: is {state_dir} the state directory of a ctxd that has started?") from None
    except (OSError, ValueError) as e:
        raise CliError(f"cannot read {path}: {reason(e)}") from None
    if not isinstance(state, dict) or not all(isinstance(state.get(k, ""), str) for k in ("url", "ca", "token_file")):
        raise CliError(f"{path}: expected a JSON object with string fields url, ca, token_file")
    return state


def load_credentials(settings: BrokerSettings) -> Credentials:
    """Read and check the token and CA (files, or a profile's text) and the URL; one-line errors."""
    url = _check_url(settings.url)
    if settings.token is not None:
        token = settings.token.strip()
        if not tokens.well_formed(token):
            raise CliError(f"the token of {settings.profile} is not a ctxd token")
    else:
        token_file = settings.token_file or ""
        token = read_small_file(token_file, "admin token file").decode("utf-8", "replace").strip()
        if not token:
            raise CliError(f"admin token file {token_file} is empty")
        if not tokens.well_formed(token):
            raise CliError(f"admin token file {token_file} does not hold a ctxd token")
    if settings.ca_pem is not None:
        ca_pem = settings.ca_pem.encode("utf-8", "replace")
        ca_file, what = f"in {settings.profile}", f"the CA of {settings.profile}"
    else:
        ca_file = settings.ca_file or ""
        ca_pem, what = read_small_file(ca_file, "CA certificate"), f"CA certificate {ca_file}"
    try:
        from twisted.internet.ssl import Certificate
        Certificate.loadPEM(ca_pem)
    except Exception:
        raise CliError(f"{what} is not a PEM certificate") from None
    return Credentials(url=url, token=token, ca_pem=ca_pem, ca_file=ca_file,
                       token_file=settings.token_file or "")


def _check_url(url: str) -> str:
    from urllib.parse import urlsplit
    try:
        parts = urlsplit(url)
        parts.port  # raises ValueError for a bad port
    except ValueError as e:
        raise CliError(f"broker URL {url!r} is not a URL: {e}") from None
    if parts.scheme != "https":
        raise CliError(f"broker URL {url!r} must start with https:// (ctxctl always verifies the broker)")
    if not parts.hostname:
        raise CliError(f"broker URL {url!r} names no host")
    if ":" in parts.hostname:
        # hyperlink (under treq) fails to IDNA-encode IPv6 literals.
        raise CliError(f"broker URL {url!r}: IPv6 address literals are not supported; "
                       "use a host name that resolves to the address")
    if parts.query or parts.fragment:
        raise CliError(f"broker URL {url!r} must not have a query or fragment")
    return url.rstrip("/")


def read_small_file(path: str, what: str, limit: int = 1 << 20) -> bytes:
    try:
        with open(os.path.expanduser(path), "rb") as f:
            data = f.read(limit + 1)
    except (OSError, ValueError) as e:
        raise CliError(f"cannot read {what} {path}: {reason(e)}") from None
    if len(data) > limit:
        raise CliError(f"{what} {path} is larger than {limit} bytes")
    return data


def _join_words(words: List[str]) -> str:
    return words[0] if len(words) == 1 else ", ".join(words[:-1]) + " and " + words[-1]


def make_client(reactor: Any, ca_pem: bytes) -> HTTPClient:
    """A treq client that trusts only ``ca_pem`` and checks the broker's name or IP."""
    from twisted.internet.ssl import Certificate
    from twisted.web.client import Agent, BrowserLikePolicyForHTTPS

    policy = BrowserLikePolicyForHTTPS(trustRoot=Certificate.loadPEM(ca_pem))
    return HTTPClient(Agent(reactor, contextFactory=policy))


class BrokerClient:
    """JSON calls to one broker through a treq-like ``client``.

    ``clock`` drives request timeouts and ``wait``'s polling; ``timeout`` None
    disables the per-request timeout (tests with an in-memory client). ``probe(url)``
    fetches the certificates a broker presents when its certificate was refused, to say
    why (:func:`presented_certificates`).
    """

    def __init__(self, client: Any, url: str, token: str, ca_file: str = "(CA)",
                 clock: Optional[IReactorTime] = None, timeout: Optional[float] = REQUEST_TIMEOUT,
                 ca_pem: Optional[bytes] = None,
                 probe: Optional[Callable[[str], List[bytes]]] = None) -> None:
        if clock is None:
            from twisted.internet import reactor as clock  # type: ignore[assignment]
        self.client = client
        self.url = url.rstrip("/")
        self.token = token
        self.ca_file = ca_file
        self.clock = clock
        self.timeout = timeout
        self.ca_pem = ca_pem
        self.probe = probe if probe is not None else presented_certificates

    async def call(self, method: str, path: str, body: Any = None,
                   expect: Tuple[int, ...] = (200,), timeout: Optional[float] = None) -> Any:
        """Send ``body`` as JSON, return the decoded JSON answer; :class:`CliError` on any failure."""
        return (await self.call_status(method, path, body, expect, timeout))[1]

    async def call_status(self, method: str, path: str, body: Any = None,
                          expect: Tuple[int, ...] = (200,), timeout: Optional[float] = None) -> Tuple[int, Any]:
        """:meth:`call`, saying which of the ``expect`` statuses came: (status, decoded JSON or None)."""
        url = self.url + path
        headers = {b"Authorization": [b"Bearer " + self.token.encode("ascii")],
                   b"Accept": [b"application/json"]}
        data = None
        if body is not None:
            data = encode_body(body)
            headers[b"Content-Type"] = [b"application/json"]
        status, _, content = await self._send(method, url, headers, data, timeout)
        return status, self._decode(status, content, expect, url)

    async def get_agent(self) -> Optional[Tuple[bytes, str]]:
        """The broker's own ctxagent.py and its SHA-256 in hex (``GET /v1/agent``, public code:
        no token sent), or None from a broker older than that route (a 404).

        The hash is computed here over the bytes received (over TLS verified against the CA):
        what a VM's loader checks. An X-Ctxd-Agent-SHA256 header that says otherwise is an error."""
        url = self.url + "/v1/agent"
        status, headers, content = await self._send("GET", url, {b"Accept": [b"text/x-python"]}, None, None)
        if status == 404:
            return None
        if status != 200:
            self._decode(status, content, (), url)  # raises: the broker's error, in one line
        digest = hashlib.sha256(content).hexdigest()
        said = headers.getRawHeaders(b"x-ctxd-agent-sha256") or []
        if any(value.decode("ascii", "replace").strip().lower() != digest for value in said):
            raise CliError(f"broker: the agent from {url} does not have the SHA-256 its "
                           "X-Ctxd-Agent-SHA256 header says")
        try:
            compile(content, "ctxagent.py", "exec", dont_inherit=True)
        except (SyntaxError, ValueError):
            raise CliError(f"broker: the answer to {url} is not the agent (a Python program)") from None
        return content, digest

    async def _send(self, method: str, url: str, headers: Dict[bytes, List[bytes]], data: Optional[bytes],
                    timeout: Optional[float]) -> Tuple[int, Any, bytes]:
        """One request: (status, response headers, body); :class:`CliError` when no answer came."""
        d = defer.Deferred.fromCoroutine(self._exchange(method, url, headers, data))
        limit = timeout if timeout is not None else self.timeout
        if limit is not None:
            # Cancelling a treq request fails it with ResponseNeverReceived, not
            # CancelledError, so addTimeout alone would not say it timed out.
            d.addTimeout(limit, self.clock, onTimeoutCancel=_raise_timeout)
        try:
            return await d
        except CliError:
            raise
        except Exception as e:
            if not isinstance(e, defer.TimeoutError) and any(
                    isinstance(r, defer.CancelledError) for r in _flatten_reasons(e)):
                raise defer.CancelledError() from None  # interrupted (Ctrl-C)
            raise describe_failure(e, self.url, self.ca_file, limit, ca_pem=self.ca_pem, probe=self.probe) from None

    async def _exchange(self, method: str, url: str, headers: Dict[bytes, List[bytes]],
                        data: Optional[bytes]) -> Tuple[int, Any, bytes]:
        send = getattr(self.client, method.lower())
        response = await send(url, headers=headers, data=data, allow_redirects=False)
        content = await treq.content(response)
        return response.code, response.headers, content

    def _decode(self, status: int, content: bytes, expect: Tuple[int, ...], url: str) -> Any:
        try:
            value = json.loads(content.decode("utf-8")) if content else None
        except ValueError:
            value = None
            if status in expect:
                raise CliError(f"broker: the answer to {url} is not JSON (HTTP {status})") from None
        if status in expect:
            return value
        if isinstance(value, dict) and isinstance(value.get("error"), str):
            code = cell(value["error"], 40)
            message = cell(str(value.get("message") or code), 300)
            hint = ""
            if status == 401:
                hint = " - is the admin token in the token file the one this broker created?"
            if status >= 500:
                raise BrokerUnavailable(f"broker: {message} ({code}, HTTP {status})")
            raise BrokerRefusal(status, code, message, hint)
        what = f"broker: unexpected HTTP {status} answer from {url}"
        if status >= 500:
            raise BrokerUnavailable(what)
        raise CliError(what)


def encode_body(body: Any) -> bytes:
    """``body`` as the JSON a request carries; :class:`CliError` when the broker would refuse
    it for its size (checked before anything is created, by create)."""
    data = json.dumps(body).encode("utf-8")
    if len(data) > rules.MAX_BODY:
        scripts = body.get("scripts") if isinstance(body, dict) else None
        share = (f" ({len(scripts['b64'])} of them the scripts, in base64)"
                 if isinstance(scripts, dict) and isinstance(scripts.get("b64"), str) else "")
        raise CliError(f"request is {len(data)} bytes{share}; the broker accepts at most "
                       f"{rules.MAX_BODY} bytes (1 MiB) - put large data elsewhere")
    return data


def _raise_timeout(result: Any, seconds: float) -> None:
    raise defer.TimeoutError(f"no answer within {seconds} s")


def describe_failure(exc: BaseException, url: str, ca_file: str,
                     timeout: Optional[float] = None, ca_pem: Optional[bytes] = None,
                     probe: Optional[Callable[[str], List[bytes]]] = None) -> CliError:
    """Turn a transport-level exception into a one-line :class:`CliError`.

    A certificate that does not verify against ``ca_pem`` is looked at with ``probe(url)``
    (the certificates the broker presents): one that another CA issued is said to be so."""
    from OpenSSL import SSL
    from service_identity.exceptions import VerificationError

    reasons = _flatten_reasons(exc)
    for r in reasons:
        if isinstance(r, VerificationError):
            return CliError(f"cannot verify the broker's certificate against CA {ca_file}: "
                            f"the certificate is not valid for the host in {url}")
    for r in reasons:
        if isinstance(r, SSL.Error):
            detail = _ssl_detail(r)
            if "certificate" in detail or "verify" in detail:
                other = _another_ca(url, ca_file, ca_pem, probe)
                if other is not None:
                    return CliError(other)
                return CliError(f"cannot verify the broker's certificate against CA {ca_file} ({detail})")
            return CliError(f"TLS handshake with {url} failed ({detail or 'unknown TLS error'}): "
                            "is it a ctxd HTTPS listener?")
    for r in reasons:
        if isinstance(r, neterror.ConnectionRefusedError):
            return BrokerUnavailable(f"cannot connect to {url}: connection refused")
        if isinstance(r, neterror.DNSLookupError):
            return BrokerUnavailable(f"cannot connect to {url}: cannot resolve the host name")
        if isinstance(r, (neterror.TimeoutError, defer.TimeoutError)):
            within = f" within {timeout:g} s" if timeout else ""
            return BrokerUnavailable(f"no answer from {url}{within}")
        if isinstance(r, neterror.ConnectError):
            return BrokerUnavailable(f"cannot connect to {url}: {cell(str(r), 200)}")
        if isinstance(r, (neterror.ConnectionLost, neterror.ConnectionDone)):
            return BrokerUnavailable(f"connection to {url} closed before a complete answer")
    return CliError(f"request to {url} failed: {type(exc).__name__}: {cell(str(exc), 200)}")


def presented_certificates(url: str, timeout: float = PROBE_TIMEOUT) -> List[bytes]:
    """The certificates (DER, leaf first) the server at ``url`` presents, read over a TLS
    connection of its own that verifies nothing: only to describe a certificate ctxctl refused,
    nothing is sent over it. The leaf alone where Python cannot give the chain (before 3.13).
    Empty when the server cannot be reached.

    It blocks (up to ``timeout``): it runs once, on the way to exiting with that error."""
    import socket
    import ssl
    from urllib.parse import urlsplit

    try:
        parts = urlsplit(url)
        host, port = parts.hostname, parts.port or 443
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
        with socket.create_connection((host, port), timeout=timeout) as sock:
            with context.wrap_socket(sock, server_hostname=host) as tls:
                chain = getattr(tls, "get_unverified_chain", None)
                if chain is not None:
                    return [c if isinstance(c, bytes) else c.public_bytes(ssl.ENCODING_DER)  # type: ignore
                            for c in chain() or []]
                leaf = tls.getpeercert(binary_form=True)
                return [leaf] if leaf else []
    except (OSError, ValueError, AttributeError):
        return []


def _another_ca(url: str, ca_file: str, ca_pem: Optional[bytes],
                probe: Optional[Callable[[str], List[bytes]]]) -> Optional[str]:
    """Why the broker at ``url`` was refused when its certificate is not the CA's at all (both
    SHA-256 fingerprints), or None (it is the CA's but refused for another reason, or no
    certificate could be had)."""
    if ca_pem is None or probe is None:
        return None
    from cryptography import x509

    try:
        presented = probe(url)
        ca = x509.load_pem_x509_certificate(ca_pem)
        chain = [x509.load_der_x509_certificate(der) for der in presented]
    except Exception:  # noqa: BLE001 - only a better message is lost
        return None
    if not chain or _issued_by(chain[0], ca):
        return None
    leaf = chain[0]
    issuer = next((c for c in chain[1:] if c.subject == leaf.issuer), None)
    issued = f"issued by {_dn(leaf.issuer)}" + (f" (SHA-256 {_fingerprint(issuer)})" if issuer is not None else "")
    return (f"the broker at {url} presented a certificate from another CA: its certificate (SHA-256 "
            f"{_fingerprint(leaf)}) was {issued}, not by CA {ca_file} ({_dn(ca.subject)}, SHA-256 "
            f"{_fingerprint(ca)}); another broker may be answering there (another ctxd, or one whose state "
            "directory was made anew): check the URL, or use that broker's CA")


def _issued_by(cert: Any, ca: Any) -> bool:
    """Whether ``ca`` signed ``cert`` (its name, then its key; True when the key's type is not
    one checked here, as the name says)."""
    from cryptography.exceptions import InvalidSignature
    from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, padding, rsa

    if cert.issuer != ca.subject:
        return False
    key = ca.public_key()
    try:
        if isinstance(key, ec.EllipticCurvePublicKey):
            key.verify(cert.signature, cert.tbs_certificate_bytes, ec.ECDSA(cert.signature_hash_algorithm))
        elif isinstance(key, rsa.RSAPublicKey):
            key.verify(cert.signature, cert.tbs_certificate_bytes, padding.PKCS1v15(), cert.signature_hash_algorithm)
        elif isinstance(key, (ed25519.Ed25519PublicKey, ed448.Ed448PublicKey)):
            key.verify(cert.signature, cert.tbs_certificate_bytes)
    except InvalidSignature:
        return False
    except Exception:  # noqa: BLE001 - e.g. an RSA-PSS signature: the name decides
        return True
    return True


def _fingerprint(cert: Any) -> str:
    from cryptography.hazmat.primitives import hashes

    digest = cert.fingerprint(hashes.SHA256()).hex().upper()
    return ":".join(digest[i:i + 2] for i in range(0, len(digest), 2))


def _dn(name: Any) -> str:
    try:
        return cell(name.rfc4514_string(), 120)
    except Exception:  # noqa: BLE001 - a name cryptography cannot print
        return "an unreadable name"


def _flatten_reasons(exc: BaseException) -> List[BaseException]:
    """``exc`` and the exceptions inside twisted.web's wrapper exceptions (``.reasons``)."""
    out: List[BaseException] = []
    todo: List[Any] = [exc]
    while todo and len(out) < 50:
        item = todo.pop(0)
        value = getattr(item, "value", item)  # a Failure, or an exception
        if not isinstance(value, BaseException):
            continue
        out.append(value)
        todo.extend(getattr(value, "reasons", None) or [])
    return out


def _ssl_detail(e: BaseException) -> str:
    parts: List[str] = []
    for arg in e.args:
        if isinstance(arg, list):
            for item in arg:
                if isinstance(item, tuple) and item:
                    parts.append(str(item[-1]))
                else:
                    parts.append(str(item))
        elif arg:
            parts.append(str(arg))
    return cell(", ".join(p for p in parts if p), 200)
