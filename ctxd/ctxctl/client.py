"""ctxctl's connection to the broker: where it is, the credentials, and JSON calls to it.

- :func:`resolve_settings` / :func:`load_credentials` - where the broker, the token
  and the CA come from: flag > environment > ``--state-dir`` file.
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
from typing import Any, Dict, List, Mapping, Optional, Tuple

import treq
from treq.client import HTTPClient
from twisted.internet import defer
from twisted.internet import error as neterror
from twisted.internet.interfaces import IReactorTime

from ctxd import rules, tokens
from ctxd.ctxctl.errors import BrokerRefusal, BrokerUnavailable, CliError, reason
from ctxd.ctxctl.render import cell

REQUEST_TIMEOUT = 60.0
STATE_FILE = "ctxctl.json"

ENV_URL = "CTXCTL_URL"
ENV_TOKEN_FILE = "CTXCTL_TOKEN_FILE"
ENV_CA = "CTXCTL_CA"
ENV_STATE_DIR = "CTXCTL_STATE_DIR"


@dataclass(frozen=True)
class BrokerSettings:
    """Where the broker, the admin token and the CA certificate are (not yet read)."""

    url: str
    token_file: str
    ca_file: str


@dataclass(frozen=True)
class Credentials:
    """Everything needed to talk to the broker, read and checked."""

    url: str
    token: str
    ca_pem: bytes
    ca_file: str
    token_file: str


def resolve_settings(args: argparse.Namespace, environ: Mapping[str, str]) -> BrokerSettings:
    """Pick each setting from its flag, else its environment variable, else ``--state-dir``.

    The state directory's ``ctxctl.json`` is read only when something is still
    missing, so explicit flags work even with a stale ``CTXCTL_STATE_DIR``.
    """
    chosen = {
        "url": args.url or environ.get(ENV_URL) or None,
        "token_file": args.token_file or environ.get(ENV_TOKEN_FILE) or None,
        "ca": args.ca or environ.get(ENV_CA) or None,
    }
    state_dir = args.state_dir or environ.get(ENV_STATE_DIR) or None
    if state_dir and not all(chosen.values()):
        state = _read_state_file(state_dir)
        for key in chosen:
            if not chosen[key] and state.get(key):
                value = state[key]
                if key != "url":
                    value = os.path.join(state_dir, value)  # absolute paths stay as they are
                chosen[key] = value
    missing = [what for key, what in (("url", "broker URL"), ("token_file", "admin token file"),
                                      ("ca", "CA certificate")) if not chosen[key]]
    if missing:
        flags = "/".join(flag for key, flag in (("url", "--url"), ("token_file", "--token-file"),
                                                 ("ca", "--ca")) if not chosen[key])
        envs = "/".join(env for key, env in (("url", ENV_URL), ("token_file", ENV_TOKEN_FILE),
                                              ("ca", ENV_CA)) if not chosen[key])
        where = (f" ({os.path.join(state_dir, STATE_FILE)} does not name it)" if state_dir else
                 " or give --state-dir DIR (the broker's state directory)")
        raise CliError(f"no {_join_words(missing)}: give {flags} or set {envs}{where}")
    return BrokerSettings(url=chosen["url"], token_file=chosen["token_file"], ca_file=chosen["ca"])


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
    """Read and check the token and CA files and the URL; one-line errors."""
    url = _check_url(settings.url)
    token = read_small_file(settings.token_file, "admin token file").decode("utf-8", "replace").strip()
    if not token:
        raise CliError(f"admin token file {settings.token_file} is empty")
    if not tokens.well_formed(token):
        raise CliError(f"admin token file {settings.token_file} does not hold a ctxd token")
    ca_pem = read_small_file(settings.ca_file, "CA certificate")
    try:
        from twisted.internet.ssl import Certificate
        Certificate.loadPEM(ca_pem)
    except Exception:
        raise CliError(f"CA certificate {settings.ca_file} is not a PEM certificate") from None
    return Credentials(url=url, token=token, ca_pem=ca_pem, ca_file=settings.ca_file,
                       token_file=settings.token_file)


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
    disables the per-request timeout (tests with an in-memory client).
    """

    def __init__(self, client: Any, url: str, token: str, ca_file: str = "(CA)",
                 clock: Optional[IReactorTime] = None, timeout: Optional[float] = REQUEST_TIMEOUT,
                 ca_pem: Optional[bytes] = None) -> None:
        if clock is None:
            from twisted.internet import reactor as clock  # type: ignore[assignment]
        self.client = client
        self.url = url.rstrip("/")
        self.token = token
        self.ca_file = ca_file
        self.clock = clock
        self.timeout = timeout
        self.ca_pem = ca_pem

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
            data = json.dumps(body).encode("utf-8")
            if len(data) > rules.MAX_BODY:
                raise CliError(f"request is {len(data)} bytes; the broker accepts at most "
                               f"{rules.MAX_BODY} bytes (1 MiB) - put large data elsewhere")
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
            raise describe_failure(e, self.url, self.ca_file, limit) from None

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


def _raise_timeout(result: Any, seconds: float) -> None:
    raise defer.TimeoutError(f"no answer within {seconds} s")


def describe_failure(exc: BaseException, url: str, ca_file: str,
                     timeout: Optional[float] = None) -> CliError:
    """Turn a transport-level exception into a one-line :class:`CliError`."""
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
