"""ctxctl: the deployer's command-line client for the ctxd broker.

Layout:

- :func:`build_parser` - argparse (global options before the subcommand).
- :func:`resolve_settings` / :func:`load_credentials` - where the broker, the
  admin token and the CA come from: flag > environment > ``--state-dir`` file.
- :func:`make_client` - the one place that builds the real treq client; it
  always verifies the broker against the CA.
- :class:`Broker` - one JSON call to the broker, mapping every failure to a
  one-line :class:`CliError`. Takes any object with treq's client API, so tests
  pass a ``treq.testing.StubTreq``.
- ``cmd_*`` coroutines - one per subcommand, ``(broker, args, out, err) -> exit code``.
- :func:`run_command` / :func:`main` - the top level: whatever happens, one
  ``ctxctl: error: ...`` line and an exit code, never a traceback.
"""

from __future__ import annotations

import argparse
import base64
import ipaddress
import json
import os
import re
import sys
import time
from dataclasses import dataclass
from typing import (
    IO,
    Any,
    Awaitable,
    Callable,
    Dict,
    List,
    Mapping,
    Optional,
    Sequence,
    Tuple,
)

import treq
from treq.client import HTTPClient
from twisted.internet import defer, task
from twisted.internet import error as neterror
from twisted.internet.interfaces import IReactorTime

from ctxd.cluster import NAME_RE, ClusterFileError, load_cluster_file
from ctxd.files import write_atomic
from ctxd.userdata import (
    USER_DATA_LIMIT,
    UserDataError,
    compact_source,
    is_gzip,
    load_agent_source,
    render_user_data,
)

EXIT_OK = 0
EXIT_ERROR = 1
EXIT_USAGE = 2
EXIT_TIMEOUT = 3
EXIT_INTERRUPTED = 130

CONTEXT_ID_RE = re.compile(r"[A-Za-z0-9_-]{22}\Z")
TOKEN_RE = re.compile(r"[A-Za-z0-9_-]{1,512}\Z")
MAX_REQUEST_BODY = 1 << 20  # the broker's limit (docs/api.md)
REQUEST_TIMEOUT = 60.0
STATE_FILE = "ctxctl.json"

ENV_URL = "CTXCTL_URL"
ENV_TOKEN_FILE = "CTXCTL_TOKEN_FILE"
ENV_CA = "CTXCTL_CA"
ENV_STATE_DIR = "CTXCTL_STATE_DIR"

_HOST_KEY_TYPES = frozenset({
    "ssh-ed25519", "ssh-rsa", "ecdsa-sha2-nistp256", "ecdsa-sha2-nistp384",
    "ecdsa-sha2-nistp521", "sk-ssh-ed25519@openssh.com", "sk-ecdsa-sha2-nistp256@openssh.com",
})
_LABEL_RE = re.compile(r"[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?\Z")
_KEY_B64_RE = re.compile(r"[A-Za-z0-9+/]+={0,2}\Z")
_REPORT_SUFFIXES = (".ok", ".error", ".pending", ".did-not-report")
_LOG_TAIL_LINES = 40


# --------------------------------------------------------------------------- errors

class CliError(Exception):
    """A failure reported as one ``ctxctl: error: ...`` line with ``exit_code``."""

    def __init__(self, message: str, exit_code: int = EXIT_ERROR) -> None:
        super().__init__(message)
        self.exit_code = exit_code


class BrokerError(CliError):
    """The broker answered with an error object (``{"error": code, "message": ...}``)."""

    def __init__(self, status: int, code: str, message: str, hint: str = "") -> None:
        super().__init__(f"broker: {message} ({code}, HTTP {status}){hint}")
        self.status = status
        self.code = code


class BrokerUnavailable(CliError):
    """No usable answer (connection refused, timeout, 5xx): ``wait`` retries these."""


# --------------------------------------------------------------------------- settings

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
        raise CliError(f"cannot read {path}: {_reason(e)}") from None
    if not isinstance(state, dict) or not all(isinstance(state.get(k, ""), str) for k in ("url", "ca", "token_file")):
        raise CliError(f"{path}: expected a JSON object with string fields url, ca, token_file")
    return state


def load_credentials(settings: BrokerSettings) -> Credentials:
    """Read and check the token and CA files and the URL; one-line errors."""
    url = _check_url(settings.url)
    token = _read_small_file(settings.token_file, "admin token file").decode("utf-8", "replace").strip()
    if not token:
        raise CliError(f"admin token file {settings.token_file} is empty")
    if not TOKEN_RE.match(token):
        raise CliError(f"admin token file {settings.token_file} does not hold a ctxd token")
    ca_pem = _read_small_file(settings.ca_file, "CA certificate")
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


def _read_small_file(path: str, what: str, limit: int = 1 << 20) -> bytes:
    try:
        with open(os.path.expanduser(path), "rb") as f:
            data = f.read(limit + 1)
    except (OSError, ValueError) as e:
        raise CliError(f"cannot read {what} {path}: {_reason(e)}") from None
    if len(data) > limit:
        raise CliError(f"{what} {path} is larger than {limit} bytes")
    return data


# --------------------------------------------------------------------------- HTTP

def make_client(reactor: Any, ca_pem: bytes) -> HTTPClient:
    """A treq client that trusts only ``ca_pem`` and checks the broker's name or IP."""
    from twisted.internet.ssl import Certificate
    from twisted.web.client import Agent, BrowserLikePolicyForHTTPS

    policy = BrowserLikePolicyForHTTPS(trustRoot=Certificate.loadPEM(ca_pem))
    return HTTPClient(Agent(reactor, contextFactory=policy))


class Broker:
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
        url = self.url + path
        headers = {b"Authorization": [b"Bearer " + self.token.encode("ascii")],
                   b"Accept": [b"application/json"]}
        data = None
        if body is not None:
            data = json.dumps(body).encode("utf-8")
            if len(data) > MAX_REQUEST_BODY:
                raise CliError(f"request is {len(data)} bytes; the broker accepts at most "
                               f"{MAX_REQUEST_BODY} bytes (1 MiB) - put large data elsewhere")
            headers[b"Content-Type"] = [b"application/json"]
        d = defer.Deferred.fromCoroutine(self._exchange(method, url, headers, data))
        limit = timeout if timeout is not None else self.timeout
        if limit is not None:
            # Cancelling a treq request fails it with ResponseNeverReceived, not
            # CancelledError, so addTimeout alone would not say it timed out.
            d.addTimeout(limit, self.clock, onTimeoutCancel=_raise_timeout)
        try:
            status, content = await d
        except CliError:
            raise
        except Exception as e:
            if not isinstance(e, defer.TimeoutError) and any(
                    isinstance(r, defer.CancelledError) for r in _flatten_reasons(e)):
                raise defer.CancelledError() from None  # interrupted (Ctrl-C)
            raise describe_failure(e, self.url, self.ca_file, limit) from None
        return self._decode(status, content, expect, url)

    async def _exchange(self, method: str, url: str, headers: Dict[bytes, List[bytes]],
                        data: Optional[bytes]) -> Tuple[int, bytes]:
        send = getattr(self.client, method.lower())
        response = await send(url, headers=headers, data=data, allow_redirects=False)
        content = await treq.content(response)
        return response.code, content

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
            code = _cell(value["error"], 40)
            message = _cell(str(value.get("message") or code), 300)
            hint = ""
            if status == 401:
                hint = " - is the admin token in the token file the one this broker created?"
            if status >= 500:
                raise BrokerUnavailable(f"broker: {message} ({code}, HTTP {status})")
            raise BrokerError(status, code, message, hint)
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
            return BrokerUnavailable(f"cannot connect to {url}: {_cell(str(r), 200)}")
        if isinstance(r, (neterror.ConnectionLost, neterror.ConnectionDone)):
            return BrokerUnavailable(f"connection to {url} closed before a complete answer")
    return CliError(f"request to {url} failed: {type(exc).__name__}: {_cell(str(exc), 200)}")


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
    return _cell(", ".join(p for p in parts if p), 200)


# --------------------------------------------------------------------------- commands

async def cmd_create(broker: Broker, args: argparse.Namespace, out: IO[str], err: IO[str],
                     agent_source: Optional[str] = None) -> int:
    """``create CLUSTER.toml --out DIR``: create the context, write bootstraps and user-data."""
    try:
        body = load_cluster_file(args.cluster)
    except ClusterFileError as e:
        raise CliError(str(e)) from None
    if agent_source is None:
        agent_source = compact_source(_call_user_data(load_agent_source))
    # Check what can fail locally before the context exists on the broker.
    sample = {"ctxd_bootstrap": 1, "url": broker.url, "context_id": "x" * 22,
              "group": max((g["name"] for g in body["groups"]), key=len),
              "join_token": "ctxd_join_" + "x" * 43,
              "ca_pem": (broker.ca_pem or b"x" * 1200).decode("ascii", "replace")}
    limit = getattr(args, "user_data_limit", USER_DATA_LIMIT)
    _call_user_data(render_user_data, sample, agent_source, limit)
    out_dir = _prepare_private_dir(args.out)

    answer = await broker.call("POST", "/v1/contexts", body, expect=(201,))
    context = answer.get("context") if isinstance(answer, dict) else None
    cid = context.get("id") if isinstance(context, dict) else None
    if not isinstance(cid, str) or not CONTEXT_ID_RE.match(cid):
        raise CliError("broker: the create answer has no valid context id")
    bootstraps = answer.get("bootstraps")
    files: List[Tuple[str, bytes]] = []
    try:
        for group in body["groups"]:
            name = group["name"]
            bootstrap = bootstraps.get(name) if isinstance(bootstraps, dict) else None
            if not isinstance(bootstrap, dict):
                raise CliError(f"broker: the create answer has no bootstrap for group {name}")
            files += _group_files(name, bootstrap, agent_source, limit)
        for filename, content in files:
            _write_private_file(os.path.join(out_dir, filename), content)
    except CliError as e:
        raise CliError(f"context {cid} was created but {e} (delete it with: ctxctl delete {cid})") from None

    expected = sum(g["quantity"] for g in body["groups"])
    _print_written(out_dir, files, err)
    state = ("open for injection: add data with `ctxctl data put`, then `ctxctl lock`"
             if body["open_for_injection"] else "locked")
    print(f"created context {body['name']} ({cid}): {len(body['groups'])} groups, "
          f"{expected} nodes expected; {state}", file=err)
    print(cid, file=out)
    return EXIT_OK


def _group_files(group: str, bootstrap: Dict[str, Any], agent_source: str, limit: int) -> List[Tuple[str, bytes]]:
    """GROUP.bootstrap.json and GROUP.user-data for one group's bootstrap."""
    return [
        (f"{group}.bootstrap.json", (json.dumps(bootstrap, indent=2, sort_keys=True) + "\n").encode("utf-8")),
        (f"{group}.user-data", _call_user_data(render_user_data, bootstrap, agent_source, limit)),
    ]


def _print_written(out_dir: str, files: List[Tuple[str, bytes]], err: IO[str]) -> None:
    for filename, content in files:
        if filename.endswith(".user-data"):
            kind = "gzip" if is_gzip(content) else "cloud-config"
            print(f"wrote {os.path.join(out_dir, filename)} ({len(content)} bytes, {kind})", file=err)
        else:
            print(f"wrote {os.path.join(out_dir, filename)}", file=err)


async def cmd_join_token_rotate(broker: Broker, args: argparse.Namespace, out: IO[str], err: IO[str],
                                agent_source: Optional[str] = None) -> int:
    """``join-token rotate CTX GROUP --out DIR``: new join token; the old one stops working."""
    if not NAME_RE.match(args.group):
        raise CliError(f"group name {args.group!r} is not valid", EXIT_USAGE)
    if agent_source is None:
        agent_source = compact_source(_call_user_data(load_agent_source))
    out_dir = _prepare_private_dir(args.out)
    answer = await broker.call("POST", f"/v1/contexts/{args.context}/groups/{args.group}/join-token", {})
    bootstrap = answer.get("bootstrap") if isinstance(answer, dict) else None
    if not isinstance(bootstrap, dict):
        raise CliError("broker: the rotation answer has no bootstrap")
    files = _group_files(args.group, bootstrap, agent_source, args.user_data_limit)
    for filename, content in files:
        _write_private_file(os.path.join(out_dir, filename), content)
    _print_written(out_dir, files, err)
    print(f"join token of group {args.group} rotated: the old one no longer enrolls; "
          "VMs launched from now on need the new user-data", file=err)
    return EXIT_OK


async def cmd_node_revoke(broker: Broker, args: argparse.Namespace, out: IO[str], err: IO[str]) -> int:
    """``node revoke CTX NODE``: a compromised VM's credential stops working at once."""
    node = _context_id(args.node)
    await broker.call("POST", f"/v1/contexts/{args.context}/nodes/{node}/revoke", {})
    print(f"node {node} of context {args.context}: credential revoked", file=err)
    return EXIT_OK


async def cmd_user_add(broker: Broker, args: argparse.Namespace, out: IO[str], err: IO[str]) -> int:
    """``user add NAME``: mint a deployer credential; its token is printed once, on stdout."""
    if not NAME_RE.match(args.name):
        raise CliError(f"deployer name {args.name!r} is not valid", EXIT_USAGE)
    answer = await broker.call("POST", "/v1/users", {"name": args.name}, expect=(201,))
    token = answer.get("token") if isinstance(answer, dict) else None
    if not isinstance(token, str):
        raise CliError("broker: the answer has no token")
    print(token, file=out)
    print(f"deployer {args.name} added; the token above is shown only once: give it to them "
          "(they use it with --token-file)", file=err)
    return EXIT_OK


async def cmd_user_list(broker: Broker, args: argparse.Namespace, out: IO[str], err: IO[str]) -> int:
    """``user list [--json]``: deployers, with when they were added and revoked."""
    answer = await broker.call("GET", "/v1/users")
    users = answer.get("users") if isinstance(answer, dict) else None
    if not isinstance(users, list):
        raise CliError("broker: the answer has no users array")
    if args.json:
        print(json.dumps(answer, indent=2, sort_keys=True), file=out)
        return EXIT_OK
    rows = [[_cell(u.get("name")), _when(u.get("created")) or "-", _when(u.get("revoked")) or "-"]
            for u in users if isinstance(u, dict)]
    for line in _table(["NAME", "ADDED", "REVOKED"], rows):
        print(line, file=out)
    return EXIT_OK


async def cmd_user_revoke(broker: Broker, args: argparse.Namespace, out: IO[str], err: IO[str]) -> int:
    """``user revoke NAME``: the deployer's credential stops working at once."""
    if not NAME_RE.match(args.name):
        raise CliError(f"deployer name {args.name!r} is not valid", EXIT_USAGE)
    await broker.call("DELETE", f"/v1/users/{args.name}")
    print(f"deployer {args.name} revoked", file=err)
    return EXIT_OK


async def cmd_status(broker: Broker, args: argparse.Namespace, out: IO[str], err: IO[str]) -> int:
    """``status CTX [--json]``: one row per node (and per slot not enrolled), then the counts."""
    status = await _get_status(broker, args.context)
    if args.json:
        print(json.dumps(status, indent=2, sort_keys=True), file=out)
        return EXIT_OK
    for line in render_status(status):
        print(line, file=out)
    return EXIT_OK


def render_status(status: Mapping[str, Any]) -> List[str]:
    """The ``status`` table as lines (pure, for tests)."""
    lines = [_context_header(status)]
    rows = []
    for node in _nodes_in_group_order(status):
        identity = node.get("identity") or {}
        problem = node.get("error") or {}
        rows.append([_cell(node.get("group")), _cell(node.get("id")), _cell(identity.get("hostname")),
                     _cell(identity.get("primary_ip")), _cell(node.get("state")),
                     _cell(problem.get("message"), 80) if isinstance(problem, dict) and problem.get("message")
                     else ""])
    for group, missing in _missing_slots(status):
        rows += [[_cell(group), "-", "-", "-", "not enrolled", ""]] * missing
    lines += _table(["GROUP", "NODE", "HOSTNAME", "IP", "STATE", "MESSAGE"], rows)
    lines.append(_counts_line(status))
    return lines


async def cmd_wait(broker: Broker, args: argparse.Namespace, out: IO[str], err: IO[str]) -> int:
    """``wait CTX``: poll until every expected node is ok (0), one fails (1) or time runs out (3)."""
    clock = broker.clock
    deadline = clock.seconds() + args.timeout
    tty = _isatty(err)
    last_line = None
    unavailable = None
    warned_unlocked = False
    status: Optional[Mapping[str, Any]] = None
    failed: Optional[Mapping[str, Any]] = None
    try:
        while True:
            remaining = deadline - clock.seconds()
            try:
                status = await _get_status(broker, args.context,
                                           timeout=max(1.0, min(remaining, broker.timeout or remaining)))
                if unavailable:
                    print("\nbroker reachable again" if tty else "broker reachable again", file=err)
                unavailable = None
            except BrokerUnavailable as e:
                if status is None:
                    raise  # never reached it: more likely a wrong --url than a restart
                # A broker restart must not end the wait: keep trying until the deadline.
                if str(e) != unavailable:
                    print(("\n" if tty else "") + f"{e}; retrying", file=err)
                unavailable = str(e)
            if status is not None:
                if status.get("locked") is False and not warned_unlocked:
                    print(f"context {args.context} is not locked: nodes wait for `ctxctl lock {args.context}`",
                          file=err)
                    warned_unlocked = True
                line = progress_line(status)
                if tty:
                    print("\r" + line + "\x1b[K", end="", file=err, flush=True)
                elif line != last_line:
                    print(line, file=err)
                last_line = line
                failed = _first_failed_node(status)
                if failed is not None or status.get("all_ok") is True:
                    break
            if clock.seconds() >= deadline:
                break
            await task.deferLater(clock, min(args.interval, max(0.0, deadline - clock.seconds())))
    finally:
        if tty and last_line is not None:
            print("", file=err)

    if status is None:
        raise CliError(f"timed out after {args.timeout:g} s: {unavailable or 'no answer from the broker'}",
                       EXIT_TIMEOUT)
    report_dir = write_reports(status, os.path.join(args.reports, args.context))
    if failed is not None:
        identity = failed.get("identity") or {}
        problem = failed.get("error") if isinstance(failed.get("error"), dict) else {}
        tail = _log_tail(failed)
        print(f"node {_cell(failed.get('group'))}/{_cell(failed.get('id'))} "
              f"({_cell(identity.get('hostname'))}) failed: exit code {_cell(problem.get('exit_code'))}: "
              f"{_cell(problem.get('message'), 500)}", file=err)
        if tail:
            lines = tail.splitlines()
            shown = lines[-_LOG_TAIL_LINES:]
            print(f"--- log tail ({len(shown)} of {len(lines)} lines; the report file has all of it) ---"
                  if len(shown) < len(lines) else "--- log tail ---", file=err)
            for line in shown:
                print(_printable(line), file=err)
            print("--- end of log tail ---", file=err)
        print(f"reports in {report_dir}", file=err)
        raise CliError(f"node {_cell(failed.get('group'))}/{_cell(failed.get('id'))} "
                       f"({_cell(identity.get('hostname'))}) reported an error: "
                       f"{_cell(problem.get('message'), 200)}")
    if status.get("all_ok") is True:
        print(f"all {_count(status, 'expected')} nodes ok; reports in {report_dir}", file=err)
        return EXIT_OK
    expected = _count(status, "expected")
    silent = max(0, expected - _count(status, "ok") - _count(status, "error"))
    never = sum(n for _, n in _missing_slots(status))
    print(f"reports in {report_dir}", file=err)
    raise CliError(f"timed out after {args.timeout:g} s: {silent} of {expected} nodes did not report "
                   f"({never} never enrolled, {silent - never} enrolled but not finished)"
                   + (f"; last poll: {unavailable}" if unavailable else ""), EXIT_TIMEOUT)


def progress_line(status: Mapping[str, Any], width: int = 10) -> str:
    """``[#####.....] 3/4 ok, 0 error, 4/4 enrolled``."""
    expected = _count(status, "expected")
    ok = _count(status, "ok")
    filled = min(width, (ok * width) // expected) if expected else width
    return (f"[{'#' * filled}{'.' * (width - filled)}] {ok}/{expected} ok, "
            f"{_count(status, 'error')} error, {_count(status, 'enrolled')}/{expected} enrolled")


def write_reports(status: Mapping[str, Any], directory: str) -> str:
    """Write one report file per node and per slot that never enrolled; return ``directory``.

    ``GROUP-HOSTNAME-NODEID.ok`` / ``.error`` / ``.pending`` and
    ``GROUP-missing-N.did-not-report``. Earlier report files in ``directory`` are
    removed first, so it always shows the last outcome.
    """
    try:
        os.makedirs(directory, mode=0o700, exist_ok=True)
        for name in os.listdir(directory):
            if name.endswith(_REPORT_SUFFIXES):
                os.unlink(os.path.join(directory, name))
        for node in _nodes_in_group_order(status):
            state = node.get("state")
            suffix = {"ok": ".ok", "error": ".error"}.get(state, ".pending")
            identity = node.get("identity") or {}
            hostname = identity.get("hostname")
            parts = [_safe_name(node.get("group"), NAME_RE), _safe_name(hostname, _LABEL_RE),
                     _safe_name(node.get("id"), CONTEXT_ID_RE)]
            _write_private_file(os.path.join(directory, "-".join(parts) + suffix),
                                _node_report(status, node).encode("utf-8", "replace"))
        for group, missing in _missing_slots(status):
            for n in range(1, missing + 1):
                text = (f"context: {status.get('id')} ({status.get('name')})\ngroup: {group}\n"
                        f"state: did not report (slot {n} of {missing} never enrolled)\n")
                _write_private_file(
                    os.path.join(directory, f"{_safe_name(group, NAME_RE)}-missing-{n}.did-not-report"),
                    text.encode("utf-8"))
    except OSError as e:
        raise CliError(f"cannot write reports in {directory}: {_reason(e)}") from None
    return directory


def _node_report(status: Mapping[str, Any], node: Mapping[str, Any]) -> str:
    identity = node.get("identity") or {}
    problem = node.get("error") if isinstance(node.get("error"), dict) else {}
    fields = [
        ("context", f"{status.get('id')} ({status.get('name')})"),
        ("group", node.get("group")), ("node", node.get("id")), ("state", node.get("state")),
        ("hostname", identity.get("hostname")), ("fqdn", identity.get("fqdn")),
        ("primary_ip", identity.get("primary_ip")), ("source_address", identity.get("source_address")),
        ("exit_code", problem.get("exit_code")), ("message", problem.get("message")),
        ("enrolled_at", _when(node.get("enrolled_at"))),
        ("contextualizing_at", _when(node.get("contextualizing_at"))),
        ("ok_at", _when(node.get("ok_at"))), ("error_at", _when(node.get("error_at"))),
    ]
    text = "".join(f"{k}: {v}\n" for k, v in fields if v not in (None, ""))
    tail = _log_tail(node)
    text += "--- log tail ---\n" + tail + ("" if not tail or tail.endswith("\n") else "\n")
    return text


async def cmd_known_hosts(broker: Broker, args: argparse.Namespace, out: IO[str], err: IO[str]) -> int:
    """``known-hosts CTX [--write [--file PATH]]``: ``FQDN,SHORT,IP TYPE KEY`` for every node."""
    status = await _get_status(broker, args.context)
    lines, problems = known_hosts_lines(status)
    for problem in problems:
        print(f"ctxctl: warning: {problem}", file=err)
    if not args.write:
        for line in lines:
            print(line, file=out)
        return EXIT_OK
    path = os.path.expanduser(args.file)
    try:
        with open(path, "r", encoding="utf-8", newline="") as f:
            current = f.read()
    except FileNotFoundError:
        current = ""
    except (OSError, UnicodeDecodeError) as e:
        raise CliError(f"cannot read {path}: {_reason(e)}") from None
    merged = merge_managed_block(current, args.context, lines, path)
    try:
        write_atomic(path, merged.encode("utf-8"), 0o600, create_dir=True)
    except OSError as e:
        raise CliError(f"cannot write {path}: {_reason(e)}") from None
    print(f"wrote {len(lines)} host keys of context {args.context} to {path}", file=err)
    return EXIT_OK


def known_hosts_lines(status: Mapping[str, Any]) -> Tuple[List[str], List[str]]:
    """known_hosts lines for every node's keys, and warnings for what was skipped."""
    lines: List[str] = []
    problems: List[str] = []
    for node in status.get("nodes") or []:
        identity = node.get("identity") if isinstance(node, dict) else None
        if not isinstance(identity, dict):
            continue
        names = _host_names(identity)
        if names is None:
            problems.append(f"node {_cell(node.get('id'))}: skipped, its hostname/fqdn/ip are not valid")
            continue
        for key in identity.get("ssh_host_keys") or []:
            fields = key.split() if isinstance(key, str) else []
            if len(fields) < 2 or fields[0] not in _HOST_KEY_TYPES or not _KEY_B64_RE.match(fields[1]):
                problems.append(f"node {_cell(node.get('id'))}: skipped an invalid host key")
                continue
            lines.append(f"{names} {fields[0]} {fields[1]}")
    return lines, problems


def _host_names(identity: Mapping[str, Any]) -> Optional[str]:
    short, fqdn, ip = identity.get("hostname"), identity.get("fqdn"), identity.get("primary_ip")
    if not isinstance(short, str) or not _LABEL_RE.match(short):
        return None
    if not isinstance(fqdn, str) or len(fqdn) > 253 or not all(_LABEL_RE.match(p) for p in fqdn.split(".")):
        return None
    try:
        address = str(ipaddress.ip_address(ip)) if isinstance(ip, str) and "%" not in ip else None
    except ValueError:
        address = None
    if address is None:
        return None
    names: List[str] = []
    for name in (fqdn, short, address):
        if name not in names:
            names.append(name)
    return ",".join(names)


def block_markers(cid: str) -> Tuple[str, str]:
    """The first and last line of a context's managed block in a known_hosts file."""
    return f"# BEGIN ctxd (context {cid})", f"# END ctxd (context {cid})"


def merge_managed_block(current: str, cid: str, lines: Sequence[str], path: str = "known_hosts") -> str:
    """``current`` with the context's block replaced (in place) or appended; the rest untouched."""
    begin, end = block_markers(cid)
    block = "\n".join([begin, *lines, end]) + "\n"
    existing = current.splitlines(keepends=True)
    starts = [i for i, line in enumerate(existing) if line.rstrip("\r\n") == begin]
    ends = [i for i, line in enumerate(existing) if line.rstrip("\r\n") == end]
    if not starts and not ends:
        if current and not current.endswith("\n"):
            current += "\n"
        return current + block
    if len(starts) != 1 or len(ends) != 1 or ends[0] < starts[0]:
        raise CliError(f"{path}: the '{begin}' ... '{end}' lines are damaged "
                       "(missing, repeated or out of order); fix the file by hand")
    return "".join(existing[:starts[0]]) + block + "".join(existing[ends[0] + 1:])


async def cmd_data_put(broker: Broker, args: argparse.Namespace, out: IO[str], err: IO[str]) -> int:
    """``data put CTX NAME FILE...``: replace a data item's values (before the context is locked)."""
    if not NAME_RE.match(args.name):
        raise CliError(f"data name {args.name!r} is not valid: 1-64 of A-Z a-z 0-9 _ . - "
                       "starting with a letter or digit", EXIT_USAGE)
    values = []
    total = 0
    for path in args.files:
        content = _read_small_file(path, "data file", MAX_REQUEST_BODY)
        total += len(content)
        values.append({"b64": base64.b64encode(content).decode("ascii")})
    summary = await broker.call("PUT", f"/v1/contexts/{args.context}/data/{args.name}", {"values": values})
    revision = summary.get("revision") if isinstance(summary, dict) else None
    print(f"data {args.name} of context {args.context}: {len(values)} value(s), {total} bytes stored"
          + (f" (revision {revision})" if revision is not None else ""), file=err)
    return EXIT_OK


async def cmd_lock(broker: Broker, args: argparse.Namespace, out: IO[str], err: IO[str]) -> int:
    """``lock CTX``: no more data changes; nodes can now get a complete view."""
    await broker.call("POST", f"/v1/contexts/{args.context}/lock", {})
    print(f"context {args.context} locked", file=err)
    return EXIT_OK


async def cmd_list(broker: Broker, args: argparse.Namespace, out: IO[str], err: IO[str]) -> int:
    """``list [--json]``: every context the broker holds."""
    answer = await broker.call("GET", "/v1/contexts")
    contexts = answer.get("contexts") if isinstance(answer, dict) else None
    if not isinstance(contexts, list):
        raise CliError("broker: the list answer has no contexts array")
    if args.json:
        print(json.dumps(answer, indent=2, sort_keys=True), file=out)
        return EXIT_OK
    rows = []
    for c in contexts:
        if not isinstance(c, dict):
            continue
        state = "error" if c.get("error_present") else "all ok" if c.get("all_ok") else "pending"
        rows.append([_cell(c.get("id")), _cell(c.get("name"), 40),
                     f"{_count(c, 'ok')}/{_count(c, 'expected')}", str(_count(c, "error")),
                     state, "locked" if c.get("locked") else "open", _when(c.get("expires")) or "-"])
    for line in _table(["ID", "NAME", "OK", "ERRORS", "STATE", "DATA", "EXPIRES"], rows):
        print(line, file=out)
    return EXIT_OK


async def cmd_delete(broker: Broker, args: argparse.Namespace, out: IO[str], err: IO[str]) -> int:
    """``delete CTX``: remove the context; its agents get 404 from then on."""
    await broker.call("DELETE", f"/v1/contexts/{args.context}")
    print(f"deleted context {args.context}", file=err)
    return EXIT_OK


Command = Callable[[Broker, argparse.Namespace, IO[str], IO[str]], Awaitable[int]]
COMMANDS: Dict[str, Command] = {
    "create": cmd_create,
    "status": cmd_status,
    "wait": cmd_wait,
    "known-hosts": cmd_known_hosts,
    "data put": cmd_data_put,
    "lock": cmd_lock,
    "list": cmd_list,
    "delete": cmd_delete,
    "user add": cmd_user_add,
    "user list": cmd_user_list,
    "user revoke": cmd_user_revoke,
    "node revoke": cmd_node_revoke,
    "join-token rotate": cmd_join_token_rotate,
}


# --------------------------------------------------------------------------- command helpers

async def _get_status(broker: Broker, cid: str, timeout: Optional[float] = None) -> Dict[str, Any]:
    status = await broker.call("GET", f"/v1/contexts/{cid}", timeout=timeout)
    if not isinstance(status, dict) or not isinstance(status.get("nodes", []), list):
        raise CliError(f"broker: the status of {cid} is not a status object")
    return status


def _nodes_in_group_order(status: Mapping[str, Any]) -> List[Mapping[str, Any]]:
    order = {g.get("name"): i for i, g in enumerate(status.get("groups") or []) if isinstance(g, dict)}
    nodes = [n for n in status.get("nodes") or [] if isinstance(n, dict)]
    # sorted() is stable: within a group the broker's (enrollment) order stays.
    return sorted(nodes, key=lambda n: order.get(n.get("group"), len(order)))


def _missing_slots(status: Mapping[str, Any]) -> List[Tuple[str, int]]:
    """(group, slots never enrolled) for every group with some."""
    enrolled: Dict[Any, int] = {}
    for n in status.get("nodes") or []:
        if isinstance(n, dict):
            enrolled[n.get("group")] = enrolled.get(n.get("group"), 0) + 1
    out = []
    for g in status.get("groups") or []:
        if isinstance(g, dict) and isinstance(g.get("quantity"), int):
            missing = g["quantity"] - enrolled.get(g.get("name"), 0)
            if missing > 0:
                out.append((str(g.get("name")), missing))
    return out


def _first_failed_node(status: Mapping[str, Any]) -> Optional[Mapping[str, Any]]:
    failed = [n for n in status.get("nodes") or [] if isinstance(n, dict) and n.get("state") == "error"]
    if not failed:
        return None
    return min(failed, key=lambda n: n.get("error_at") if isinstance(n.get("error_at"), (int, float)) else float("inf"))


def _log_tail(node: Mapping[str, Any]) -> str:
    problem = node.get("error")
    tail = problem.get("log_tail") if isinstance(problem, dict) else None
    if not isinstance(tail, str):
        tail = node.get("log_tail")
    return tail if isinstance(tail, str) else ""


def _context_header(status: Mapping[str, Any]) -> str:
    parts = [f"context {_cell(status.get('name'))} ({_cell(status.get('id'))})"]
    if status.get("revision") is not None:
        parts.append(f"revision {_cell(status.get('revision'))}")
    parts.append("locked" if status.get("locked") else "open for injection (not locked)")
    if status.get("expires") is not None:
        parts.append(f"expires {_when(status.get('expires'))}")
    return ", ".join(parts)


def _counts_line(status: Mapping[str, Any]) -> str:
    return (f"{_count(status, 'expected')} expected, {_count(status, 'enrolled')} enrolled, "
            f"{_count(status, 'contextualizing')} contextualizing, {_count(status, 'ok')} ok, "
            f"{_count(status, 'error')} error; complete: {_yes(status.get('complete'))}, "
            f"all_ok: {_yes(status.get('all_ok'))}")


def _count(status: Mapping[str, Any], key: str) -> int:
    counts = status.get("counts")
    value = counts.get(key) if isinstance(counts, dict) else None
    return value if isinstance(value, int) and not isinstance(value, bool) else 0


def _yes(value: Any) -> str:
    return "yes" if value is True else "no"


def _table(headers: List[str], rows: List[List[str]]) -> List[str]:
    widths = [max([len(h)] + [len(r[i]) for r in rows]) for i, h in enumerate(headers)]
    return ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in [headers] + rows]


def _when(value: Any) -> str:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        try:
            return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(value))
        except (OverflowError, OSError, ValueError):
            return str(value)
    return ""


def _printable(text: str) -> str:
    """``text`` with terminal control characters (escape sequences...) made harmless."""
    return "".join(c if c.isprintable() or c == "\t" else "?" for c in text)


def _cell(value: Any, limit: int = 64) -> str:
    """One line, printable, at most ``limit`` characters; ``-`` for nothing."""
    if value is None or value == "":
        return "-"
    text = _printable(" ".join(str(value).split()))
    return text if len(text) <= limit else text[:limit - 3] + "..."


def _safe_name(value: Any, pattern: "re.Pattern[str]") -> str:
    return value if isinstance(value, str) and pattern.match(value) else "unknown"


def _isatty(stream: IO[str]) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):
        return False


def _call_user_data(function: Callable[..., Any], *args: Any) -> Any:
    try:
        return function(*args)
    except UserDataError as e:
        raise CliError(str(e)) from None


def _prepare_private_dir(path: str) -> str:
    path = os.path.expanduser(path)
    try:
        if not os.path.isdir(path):
            os.makedirs(path, mode=0o700)
            os.chmod(path, 0o700)  # makedirs' mode goes through the umask
        if not os.access(path, os.W_OK | os.X_OK):
            raise PermissionError(13, "Permission denied")
    except OSError as e:
        raise CliError(f"cannot use output directory {path}: {_reason(e)}") from None
    return path


def _write_private_file(path: str, content: bytes) -> None:
    """Write ``content`` to ``path`` (mode 0600) atomically; :class:`CliError` on failure."""
    try:
        write_atomic(path, content, 0o600)
    except OSError as e:
        raise CliError(f"cannot write {path}: {_reason(e)}") from None


def _reason(e: BaseException) -> str:
    if isinstance(e, OSError) and e.strerror:
        return e.strerror
    return " ".join(str(e).split()) or type(e).__name__


def _join_words(words: List[str]) -> str:
    return words[0] if len(words) == 1 else ", ".join(words[:-1]) + " and " + words[-1]


# --------------------------------------------------------------------------- argparse

EPILOG = """\
The broker is found from --url/--token-file/--ca, else CTXCTL_URL/CTXCTL_TOKEN_FILE/CTXCTL_CA,
else from --state-dir DIR (or CTXCTL_STATE_DIR): the ctxctl.json that ctxd writes there.
The broker's certificate is always verified against the CA.

Results go to stdout, messages and progress to stderr.

exit codes:
  0  success (wait: every expected node reported ok)
  1  error (one 'ctxctl: error: ...' line on stderr; wait: a node reported an error)
  2  usage error (bad options or arguments, e.g. a malformed context id)
  3  wait timed out before every expected node reported
"""


def _context_id(value: str) -> str:
    if not CONTEXT_ID_RE.match(value):
        raise argparse.ArgumentTypeError(
            f"{value!r} is not a context id (22 characters of A-Z a-z 0-9 _ -)")
    return value


def _user_data_limit(value: str) -> int:
    try:
        limit = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is not a number of bytes") from None
    if limit < 4096:
        raise argparse.ArgumentTypeError(f"{value!r}: the user-data limit must be at least 4096 bytes")
    return limit


def _positive_seconds(value: str) -> float:
    try:
        seconds = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is not a number of seconds") from None
    if not seconds > 0 or seconds != seconds or seconds == float("inf"):
        raise argparse.ArgumentTypeError(f"{value!r} must be a positive number of seconds")
    return seconds


def build_parser() -> argparse.ArgumentParser:
    """The ctxctl argument parser (global options first, then a subcommand)."""
    parser = argparse.ArgumentParser(
        prog="ctxctl", description="Deployer's client for the ctxd contextualization broker.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", help=f"broker URL, https://HOST:PORT (env {ENV_URL})")
    parser.add_argument("--token-file", metavar="FILE",
                        help=f"file holding your token: the site admin's or a deployer's (env {ENV_TOKEN_FILE})")
    parser.add_argument("--ca", metavar="FILE", help=f"PEM CA certificate the broker must chain to (env {ENV_CA})")
    parser.add_argument("--state-dir", metavar="DIR",
                        help=f"ctxd's state directory; supplies whatever the three above do not (env {ENV_STATE_DIR})")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    def ctx_arg(p: argparse.ArgumentParser) -> None:
        p.add_argument("context", metavar="CTX", type=_context_id, help="context id")

    p = sub.add_parser("create", help="create a context from a cluster file; print its id",
                       description="Create a context; write DIR/GROUP.bootstrap.json and DIR/GROUP.user-data "
                                   "for every group; print the context id alone on stdout.")
    p.add_argument("cluster", metavar="CLUSTER.toml", help="cluster file")
    p.add_argument("--out", metavar="DIR", required=True, help="where to write bootstraps and user-data")
    p.add_argument("--user-data-limit", metavar="BYTES", type=_user_data_limit, default=USER_DATA_LIMIT,
                   help=f"largest user-data the cloud accepts (default {USER_DATA_LIMIT}, EC2's limit; "
                        "give your cloud's if it is larger); a larger document is gzip-compressed")

    p = sub.add_parser("status", help="per-node state table and counts")
    ctx_arg(p)
    p.add_argument("--json", action="store_true", help="print the broker's JSON")

    p = sub.add_parser("wait", help="wait until every node is ok (exit 0), one fails (1) or timeout (3)",
                       description="Poll the context until every expected node reported ok (exit 0), a node "
                                   "reported an error (exit 1) or the timeout passed (exit 3). Writes one "
                                   "report file per node under REPORTS/CTX/.",
                       epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    ctx_arg(p)
    p.add_argument("--timeout", type=_positive_seconds, default=1800.0, metavar="S",
                   help="give up after S seconds (default 1800)")
    p.add_argument("--reports", default="ctx-reports", metavar="DIR",
                   help="report directory (default ./ctx-reports)")
    p.add_argument("--interval", type=_positive_seconds, default=1.0, metavar="S",
                   help="seconds between polls (default 1)")

    p = sub.add_parser("known-hosts", help="known_hosts lines for every node")
    ctx_arg(p)
    p.add_argument("--write", action="store_true", help="merge them into FILE as a managed block")
    p.add_argument("--file", metavar="PATH", help="known_hosts file for --write (default ~/.ssh/known_hosts)")

    p = sub.add_parser("data", help="data items (data put)")
    data_sub = p.add_subparsers(dest="data_command", metavar="ACTION", required=True)
    p = data_sub.add_parser("put", help="replace a data item's values with the given files")
    ctx_arg(p)
    p.add_argument("name", metavar="NAME", help="data item name")
    p.add_argument("files", metavar="FILE", nargs="+", help="one value per file")

    p = sub.add_parser("lock", help="lock a context that was open for injection")
    ctx_arg(p)
    p = sub.add_parser("list", help="table of contexts")
    p.add_argument("--json", action="store_true", help="print the broker's JSON")
    p = sub.add_parser("delete", help="delete a context")
    ctx_arg(p)

    p = sub.add_parser("user", help="deployer credentials (site admin): user add|list|revoke")
    user_sub = p.add_subparsers(dest="user_command", metavar="ACTION", required=True)
    p = user_sub.add_parser("add", help="mint a deployer credential; print its token once")
    p.add_argument("name", metavar="NAME", help="deployer name")
    p = user_sub.add_parser("list", help="table of deployers")
    p.add_argument("--json", action="store_true", help="print the broker's JSON")
    p = user_sub.add_parser("revoke", help="revoke a deployer's credential")
    p.add_argument("name", metavar="NAME", help="deployer name")

    p = sub.add_parser("node", help="node credentials: node revoke")
    node_sub = p.add_subparsers(dest="node_command", metavar="ACTION", required=True)
    p = node_sub.add_parser("revoke", help="revoke one node's credential (a compromised VM)")
    ctx_arg(p)
    p.add_argument("node", metavar="NODE", help="node id")

    p = sub.add_parser("join-token", help="join tokens: join-token rotate")
    join_sub = p.add_subparsers(dest="join_command", metavar="ACTION", required=True)
    p = join_sub.add_parser("rotate", help="new join token for a group; write its bootstrap and user-data")
    ctx_arg(p)
    p.add_argument("group", metavar="GROUP", help="group name")
    p.add_argument("--out", metavar="DIR", required=True, help="where to write GROUP.bootstrap.json and .user-data")
    p.add_argument("--user-data-limit", metavar="BYTES", type=_user_data_limit, default=USER_DATA_LIMIT,
                   help=f"largest user-data the cloud accepts (default {USER_DATA_LIMIT})")
    return parser


def parse_args(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    """Parse ``argv``; exits 2 with argparse's usage message on a usage error."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "known-hosts":
        if args.file and not args.write:
            parser.error("known-hosts: --file only makes sense with --write")
        args.file = args.file or os.path.join("~", ".ssh", "known_hosts")
    action = {"data": "data_command", "user": "user_command", "node": "node_command",
              "join-token": "join_command"}.get(args.command)
    args.command_key = f"{args.command} {getattr(args, action)}" if action else args.command
    return args


# --------------------------------------------------------------------------- top level

async def run_command(broker: Broker, args: argparse.Namespace, out: IO[str], err: IO[str]) -> int:
    """Run the chosen command; print ONE ``ctxctl: error:`` line for any failure; return the exit code."""
    try:
        return await COMMANDS[args.command_key](broker, args, out, err)
    except CliError as e:
        _print_error(err, str(e))
        return e.exit_code
    except defer.CancelledError:
        _print_error(err, "interrupted")
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        # stdout closed early (`ctxctl status --json | head`): stop quietly, as
        # other command-line tools do, and keep Python from complaining at exit.
        if out is sys.stdout:
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_ERROR
    except Exception as e:
        # No log.failure here: before logging starts, Twisted copies critical
        # events to stderr, and a traceback is exactly what must not appear.
        _print_error(err, f"internal error: {type(e).__name__}: {e}")
        return EXIT_ERROR


def _print_error(err: IO[str], message: str) -> None:
    print(f"ctxctl: error: {_printable(' '.join(message.split()))}", file=err, flush=True)


async def _react_main(reactor: Any, args: argparse.Namespace, creds: Credentials) -> None:
    broker = Broker(make_client(reactor, creds.ca_pem), creds.url, creds.token,
                    ca_file=creds.ca_file, clock=reactor, ca_pem=creds.ca_pem)
    running = defer.Deferred.fromCoroutine(run_command(broker, args, sys.stdout, sys.stderr))
    # Ctrl-C stops the reactor; cancel the command so the exit code says so.
    trigger = reactor.addSystemEventTrigger("before", "shutdown", running.cancel)
    try:
        code = await running
    finally:
        reactor.removeSystemEventTrigger(trigger)
    try:
        sys.stdout.flush()
    except BrokenPipeError:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        code = code or EXIT_ERROR
    if code:
        raise SystemExit(code)


def main(argv: Optional[Sequence[str]] = None) -> None:
    """Console entry point (``ctxctl = ctxd.cli:main``)."""
    args = parse_args(argv)
    try:
        creds = load_credentials(resolve_settings(args, os.environ))
    except CliError as e:
        _print_error(sys.stderr, str(e))
        sys.exit(e.exit_code)
    task.react(_react_main, (args, creds))


if __name__ == "__main__":  # pragma: no cover
    main()
