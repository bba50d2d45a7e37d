"""``twistd ctxd``: command-line options and service wiring, in one place.

``twistd -n ctxd`` with no arguments serves HTTPS on 0.0.0.0:8443 with a generated
CA and server certificate, keeping its state in /var/lib/ctxd (when writable) or
./ctxd-state.
"""

import configparser
import fcntl
import importlib.util
import shlex
import subprocess
import ipaddress
import json
import os
import re
import socket
from typing import Any, Callable, Dict, List, Optional, Tuple
from urllib.parse import urlsplit

from cryptography.exceptions import UnsupportedAlgorithm
from twisted.application import service, strports
from twisted.application.internet import TimerService
from twisted.internet.error import CannotListenError
from twisted.internet import endpoints
from twisted.logger import Logger
from twisted.python import usage

import ctxd
from ctxd import credentials, memory, rules, tls, tlsserver, tokens
from ctxd.api import make_site
from ctxd.broker import Broker
from ctxd.files import make_private_dir, write_private, write_public
from ctxd.journal import JOURNAL_FILE, FileJournal, JournalCorrupt
from ctxd.metrics import monitoring_site
from ctxd.audit import AuditLog
from ctxd.admission import ConnectionBudget, ConnectionLimiter, fit_to_open_files
from ctxd.model import Model, Quotas

log = Logger()

DEFAULT_LISTEN = "ssl:8443"
DEFAULT_METRICS_LISTEN = "tcp:9464:interface=127.0.0.1"
SYSTEM_STATE_DIR = "/var/lib/ctxd"
LOCAL_STATE_DIR = "ctxd-state"
CONFIG_SECTION = "ctxd"
SWEEP_INTERVAL = 60
# How often watching nodes' leases are checked (a lease is at least 10 s): O(leased watchers).
LEASE_INTERVAL = 1
AUDIT_INTERVAL = 60  # seconds between the audit log's lines of counted refusals
ADMIN_TOKEN_FILE = "admin.token"


def default_state_dir() -> str:
    """/var/lib/ctxd when this user may write there, else ./ctxd-state."""
    candidate = SYSTEM_STATE_DIR
    parent = os.path.dirname(candidate)
    if os.access(candidate, os.W_OK) or (not os.path.exists(candidate) and os.access(parent, os.W_OK)):
        return candidate
    return os.path.abspath(LOCAL_STATE_DIR)


def _needs_our_certificate(description: str) -> bool:
    kind = description.split(":", 1)[0].lower()
    return kind == "ssl" and "privatekey=" not in description.lower()


class LimitOptions(usage.Options):
    """Resource limits (OWASP API4): every one configurable, each with a safe default."""

    # name: (default, type, help). Defaults are applied after the config file is
    # read, so that a setting there counts unless the command line gives one.
    LIMITS = {
        "max-connections": (16000, int, "Open connections at most (over all peers)."),
        "max-connections-per-peer": (1024, int, "Open connections at most from one address."),
        "request-deadline": (30.0, float, "Seconds a client has to send a whole request (headers and body)."),
        "enroll-rate-per-source": (120, int, "Enrollment attempts per minute from one address."),
        "enroll-rate-per-token": (1200, int, "Enrollment attempts per minute with one join token."),
        "max-contexts-per-deployer": (100, int, "Live contexts one deployer may have."),
        "max-nodes-per-context": (20000, int, "Nodes one context may expect (sum of quantities)."),
        "max-data-bytes": (4 * 1024 * 1024, int, "Bytes of data one context may hold."),
        "listen-backlog": (4096, int, "Pending TCP connections the kernel queues per listener (capped by "
                           "net.core.somaxconn); a full queue drops new nodes' SYNs, which cost them a 1 s retry. "
                           "A listener's own backlog= option wins."),
    }
    optParameters = [[name, None, None, f"{text} Default {default}."] for name, (default, _, text) in LIMITS.items()]

    def apply_limit_defaults(self) -> None:
        for name, (default, kind, _) in self.LIMITS.items():
            value = default if self[name] is None else self[name]
            try:
                value = kind(value)
                if value <= 0:
                    raise ValueError
            except (TypeError, ValueError):
                raise usage.UsageError(f"--{name}: must be a positive number") from None
            self[name] = value


class Options(LimitOptions):
    synopsis = "[options]"
    longdesc = (
        "Run the ctxd contextualization broker. Every option can also be set in the "
        f"[{CONFIG_SECTION}] section of an INI file given with --config (see etc/ctxd.conf); "
        "the command line wins."
    )
    optFlags = [
        ["repair", None, "Start even if the journal is damaged in the middle: keep everything from the damage "
         "aside in STATE_DIR/journal.broken.<time> and drop it (logged: offset, bytes, records)."],
        ["standby", None, "If another ctxd holds the state directory, wait until it lets go (it stopped or "
         "died), then start: the passive side of an active/passive pair on shared storage."],
        ["access-log", None, "Log one line per API request (off: a 10,000-node cluster makes 30,000 as it "
         "boots and 333 a second while it waits; the metrics count them, the audit log keeps what matters)."],
    ]
    optParameters = [
        ["config", "c", None, "INI configuration file."],
        ["state-dir", "d", None, f"State directory (default {SYSTEM_STATE_DIR} if writable, else ./{LOCAL_STATE_DIR})."],
        ["public-url", "u", None, "URL agents use to reach this broker (default: derived from the host and the first listener)."],
        ["tls-cert", None, None, "Server certificate PEM (with any intermediates); default: generated under STATE_DIR/tls."],
        ["tls-key", None, None, "Server private key PEM."],
        ["tls-ca", None, None, "CA certificate PEM given to agents to verify the broker (default: the --tls-cert file)."],
        ["client-ca", None, None, "CA certificate PEM: ask TLS clients for a certificate it issued (mutual TLS "
         "for deployers; clients without one still connect). Certificates and keys are re-read on SIGHUP."],
        ["max-body", None, None, f"Largest accepted request body in bytes (default {rules.MAX_BODY})."],
        ["site-ca-cert", None, None, "A site intermediate CA certificate PEM (then the certificates above it, to "
         "the root) that signs the host certificates of groups with issuer = \"site\" (docs/credentials.md)."],
        ["site-ca-key", None, None, "The site intermediate CA's private key PEM (unencrypted; keep it 0600)."],
        ["on-active", None, None, "A command run (as argv, no shell) once this ctxd holds the state directory "
         "and before it listens, e.g. one that takes a floating address; start-up stops if it fails."],
        ["metrics-listen", None, None, f"Where to serve /metrics (Prometheus), /livez and /readyz over plain "
         f"HTTP: a Twisted endpoint description, or 'none' (default {DEFAULT_METRICS_LISTEN})."],
    ]

    def __init__(self) -> None:
        super().__init__()
        self["listen"] = []

    def opt_listen(self, description: str) -> None:
        """Listen on a Twisted server endpoint (repeatable; default ssl:8443). An ssl:
        endpoint naming no certificate uses ctxd's configured or generated one."""
        self["listen"].append(description)

    opt_l = opt_listen

    def opt_version(self) -> None:
        """Print ctxd's version and exit."""
        print(f"ctxd {ctxd.__version__}")
        raise SystemExit(0)

    def parseOptions(self, options: Optional[List[str]] = None) -> None:
        """As usage.Options, but under twistd a bad option or setting is one line (twistd would
        print the whole usage text with it), naming where the help is."""
        try:
            super().parseOptions(options)
        except usage.UsageError as e:
            if getattr(self, "parent", None) is None:
                raise
            raise SystemExit(f"ctxd: {e} (twistd ctxd --help lists the options)") from None

    def postOptions(self) -> None:
        if self["config"]:
            self._merge_config(self["config"])
        self.apply_limit_defaults()
        if not self["listen"]:
            self["listen"] = [DEFAULT_LISTEN]
        if not self["state-dir"]:
            self["state-dir"] = default_state_dir()
        self["state-dir"] = os.path.abspath(self["state-dir"])
        if bool(self["tls-cert"]) != bool(self["tls-key"]):
            raise usage.UsageError("--tls-cert and --tls-key go together")
        if self["tls-ca"] and not self["tls-cert"]:
            raise usage.UsageError("--tls-ca needs --tls-cert and --tls-key")
        if bool(self["site-ca-cert"]) != bool(self["site-ca-key"]):
            raise usage.UsageError("--site-ca-cert and --site-ca-key go together")
        for path in ("tls-cert", "tls-key", "tls-ca", "client-ca", "site-ca-cert", "site-ca-key"):
            if self[path] and not os.path.isfile(self[path]):
                raise usage.UsageError(f"--{path}: no such file: {self[path]}")
        if self["metrics-listen"] is None:
            self["metrics-listen"] = DEFAULT_METRICS_LISTEN
        if self["max-body"] is None:
            self["max-body"] = rules.MAX_BODY
        try:
            self["max-body"] = int(self["max-body"])
            if self["max-body"] < 1024:
                raise ValueError
        except ValueError:
            raise usage.UsageError("--max-body: must be an integer of at least 1024") from None
        for description in self["listen"]:
            if ":" not in description and not description.isdigit():
                raise usage.UsageError(f"--listen: {description!r} is not an endpoint description (e.g. ssl:8443)")
        if self["public-url"]:
            parts = urlsplit(self["public-url"])
            if parts.scheme != "https" or not parts.hostname:
                raise usage.UsageError("--public-url: must be an https:// URL with a host")

    def _merge_config(self, path: str) -> None:
        parser = configparser.ConfigParser(inline_comment_prefixes=(";",))
        try:
            with open(path) as f:
                parser.read_file(f)
        except (OSError, configparser.Error) as e:
            raise usage.UsageError(f"--config {path}: {e}") from None
        if not parser.has_section(CONFIG_SECTION):
            raise usage.UsageError(f"--config {path}: no [{CONFIG_SECTION}] section")
        known = set(self.opts) - {"config", "listen"}
        flags = {name for name, _, _ in self.optFlags}
        for key, value in parser.items(CONFIG_SECTION):
            if key == "listen":
                if not self["listen"]:
                    self["listen"] = value.split()
            elif key in flags:
                try:
                    on = parser.getboolean(CONFIG_SECTION, key)
                except ValueError:
                    raise usage.UsageError(f"--config {path}: {key} must be true or false, not {value!r}") from None
                self[key] = self[key] or on
            elif key in known:
                if self[key] is None:
                    self[key] = value
            else:
                raise usage.UsageError(f"--config {path}: unknown setting {key!r}")


def _listener_host_port(description: str):
    """(interface, port) of a tcp/ssl endpoint description, best effort."""
    parts = re.split(r"(?<!\\):", description)
    port, interface = None, ""
    for part in parts[1:]:
        if part.isdigit() and port is None:
            port = int(part)
        elif part.startswith("port="):
            port = int(part[5:])
        elif part.startswith("interface="):
            interface = part[len("interface="):].replace("\\:", ":")
    if description.isdigit():
        port = int(description)
    return interface, port


def with_backlog(description: str, backlog: int) -> str:
    """The tcp/ssl endpoint description with backlog= added unless it has one."""
    kind = description.split(":", 1)[0].lower()
    if kind not in ("tcp", "ssl", "tcp6", "ssl6") or re.search(r"(^|:)backlog=", description, re.I):
        return description
    return f"{description}:backlog={backlog}"


SOMAXCONN = "/proc/sys/net/core/somaxconn"


def backlog_capped(description: str, somaxconn_path: str = SOMAXCONN) -> Optional[Tuple[int, int]]:
    """(asked, kernel cap) when the description's backlog= is above the kernel's cap on listen
    queues (Linux silently lowers it), else None (also where the cap cannot be read)."""
    match = re.search(r"(?:^|:)backlog=(\d+)", description, re.I)
    if match is None:
        return None
    try:
        with open(somaxconn_path) as f:
            cap = int(f.read().strip())
    except (OSError, ValueError):
        return None
    asked = int(match.group(1))
    return (asked, cap) if asked > cap else None


def default_public_url(listen: List[str]) -> str:
    interface, port = _listener_host_port(listen[0])
    host = interface
    if not host or host in ("0.0.0.0", "::"):
        host = socket.getfqdn()
        if not host or host.startswith("localhost"):
            host = socket.gethostname()
    try:
        if ipaddress.ip_address(host).version == 6:
            host = f"[{host}]"
    except ValueError:
        pass
    return f"https://{host}" + (f":{port}" if port and port != 443 else "")


def public_url_problem(url: str, resolve: Callable[..., Any] = socket.getaddrinfo) -> Optional[str]:
    """Why VMs could not use ``url`` to reach this broker, if it is plain from here: a loopback
    address or name, or a name that resolves to nothing (or to loopback only) on this host."""
    host = urlsplit(url).hostname or ""
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        address = None
    if address is not None:
        return f"{host} is this host's own loopback address" if address.is_loopback or address.is_unspecified \
            else None
    if host == "localhost" or host.endswith((".localhost", ".localdomain")):
        return f"{host} names this host's loopback"
    try:
        found = {info[4][0] for info in resolve(host, None)}
    except (OSError, UnicodeError):
        return f"{host} does not resolve on this host (a short name the VMs' resolvers may not know either)"
    if all(ipaddress.ip_address(a.split("%")[0]).is_loopback for a in found):
        return f"{host} resolves to loopback addresses only ({', '.join(sorted(found))})"
    return None


def lock_state_dir(state_dir: str, wait: bool = False) -> int:
    """Hold an exclusive lock on STATE_DIR/lock for the life of the process.

    Two brokers appending to one journal would corrupt it; the second stops here, or with
    ``wait`` (a standby) waits until the first lets go - the kernel (or the NFS server) frees
    the lock when its holder dies.
    """
    path = os.path.join(state_dir, "lock")
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        if not wait:
            os.close(fd)
            raise SystemExit(f"ctxd: another ctxd is using the state directory {state_dir} (it holds {path}; "
                             "--standby waits for it)") from None
        print(f"ctxd: standby: another ctxd holds {path}; waiting for it to let go", flush=True)
        fcntl.flock(fd, fcntl.LOCK_EX)
        print(f"ctxd: standby: {path} is ours; starting", flush=True)
    return fd


def run_on_active(command: str) -> None:
    """Run the --on-active command (an argv, split like a shell would, run without one)."""
    argv = shlex.split(command)
    try:
        done = subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise SystemExit(f"ctxd: --on-active {command!r} could not run: {e}") from None
    if done.returncode != 0:
        raise SystemExit(f"ctxd: --on-active {command!r} failed (exit {done.returncode}): "
                         f"{' '.join((done.stderr or done.stdout).split())[:300]}")
    log.info("--on-active {command}: done", command=command)


def ensure_admin_token(path: str) -> str:
    """The admin token's hash; the token is created (0600) on first start."""
    if not os.path.exists(path):
        write_private(path, (tokens.new_token(tokens.ADMIN) + "\n").encode("ascii"))
    with open(path) as f:
        token = f.read().strip()
    if not tokens.well_formed(token) or not token.startswith(tokens.ADMIN):
        raise usage.UsageError(f"{path}: not a ctxd admin token; delete it to have a new one made")
    return tokens.token_hash(token)


def server_tls_options(files: tls.TLSFiles, client_ca: Optional[str] = None) -> tlsserver.ServerTLS:
    """The listeners' TLS settings (policy in ctxd.tlsserver), re-readable on SIGHUP."""
    try:
        return tlsserver.ServerTLS(files.cert, files.key, client_ca)
    except tlsserver.TLSConfigError as e:
        raise usage.UsageError(str(e)) from None


class _BrokerLifecycle(service.Service):
    """Says where everything is on start; drains waiters and the journal on stop.

    It holds the state directory's lock (an open descriptor) for as long as it exists.
    """

    def __init__(self, broker: Broker, banner: List[str], state_lock: int) -> None:
        self.broker = broker
        self.banner = banner
        self.state_lock = state_lock

    def startService(self) -> None:
        super().startService()
        # Now, not when the lock was taken: twistd may have forked into the background since.
        os.ftruncate(self.state_lock, 0)
        os.pwrite(self.state_lock, f"{os.getpid()}\n".encode("ascii"), 0)
        for line in self.banner:
            log.info("{line}", line=line)

    def stopService(self) -> Any:
        super().stopService()
        self.broker.shutdown()
        self.broker.audit.close()
        # Let an fdatasync in flight finish (and its replies go out) before closing.
        journal = self.broker.journal
        d = journal.drain()

        def close(_: Any) -> None:
            syncs, records = journal.syncs, journal.records_synced
            log.info(
                "journal: {records} records in {syncs} fdatasyncs this run ({per:.1f} records per sync)",
                records=records,
                syncs=syncs,
                per=records / syncs if syncs else 0.0,
            )
            journal.close()

        d.addBoth(close)
        return d


class OpenedState:
    """The state directory, opened: its lock held, the admin token, TLS files, and a
    broker whose model was replayed from the journal."""

    def __init__(self, state_dir: str, lock: int, broker: Broker, files: tls.TLSFiles, replayed: int,
                 admin_token_path: str) -> None:
        self.state_dir = state_dir
        self.lock = lock
        self.broker = broker
        self.files = files
        self.replayed = replayed
        self.admin_token_path = admin_token_path


def makeService(config: Dict[str, Any], reactor: Optional[Any] = None) -> service.MultiService:
    """The broker, its listeners, timers and lifecycle, as one service.

    Everything that can fail on bad state or configuration (the lock, the journal's
    replay, the certificates, the listeners' descriptions) fails here, before twistd
    daemonizes, so that the error reaches the terminal that started ctxd.
    """
    if reactor is None:
        from twisted.internet import reactor  # type: ignore[no-redef]
    os.umask(0o077)
    state_dir = config["state-dir"]
    try:
        make_private_dir(state_dir)
        lock = lock_state_dir(state_dir, wait=bool(config.get("standby")))
    except OSError as e:
        raise SystemExit(f"ctxd: cannot use the state directory {state_dir}: {e.strerror or e} (run ctxd as "
                         "the user that owns it, e.g. ctxd, or give --state-dir)") from None
    try:
        if config.get("on-active"):
            run_on_active(config["on-active"])
        opened = open_state(config, reactor, lock)
        return _assemble(config, opened, reactor)
    except BaseException:
        os.close(lock)  # start-up failed: let the next attempt have the state directory
        raise


def open_state(config: Dict[str, Any], reactor: Any, lock: int) -> OpenedState:
    """Read (or create) the admin token and the TLS files, replay the journal into a broker
    and write STATE_DIR/ctxctl.json."""
    state_dir = config["state-dir"]
    admin_token_path = os.path.join(state_dir, ADMIN_TOKEN_FILE)
    admin_hash = ensure_admin_token(admin_token_path)
    public_url = config["public-url"] or default_public_url(config["listen"])
    problem = public_url_problem(public_url)
    if problem is not None:
        log.warn("the public URL {url} may not work for VMs: {problem}. Bootstraps carry it: set --public-url "
                 "(public-url in the config file) to https://NAME-OR-ADDRESS:PORT that the VMs reach this "
                 "host at", url=public_url, problem=problem)
    files = _tls_files(config, public_url)

    def fatal() -> None:
        # PostgreSQL's lesson: after a failed fsync nothing is trusted; exit non-zero.
        reactor.addSystemEventTrigger("after", "shutdown", os._exit, 1)
        reactor.stop()

    journal = FileJournal.for_reactor(
        os.path.join(state_dir, JOURNAL_FILE), reactor, repair=bool(config.get("repair"))
    )
    quotas = Quotas(
        contexts_per_deployer=config["max-contexts-per-deployer"],
        nodes_per_context=config["max-nodes-per-context"],
        data_bytes_per_context=config["max-data-bytes"],
    )
    broker = Broker(
        Model(quotas),
        journal,
        reactor,
        admin_hash,
        public_url,
        files.ca_pem(),
        on_fatal=fatal,
        audit=AuditLog(os.path.join(state_dir, "audit.log"), reactor.seconds),
        enroll_per_source=config["enroll-rate-per-source"],
        enroll_per_token=config["enroll-rate-per-token"],
        authority=_authority(config),
        agent=_agent_source(),
    )
    try:
        replayed = broker.replay()
    except JournalCorrupt as e:
        raise SystemExit(f"ctxd: {e}") from None
    # Compaction (after a sync, past the journal's thresholds) snapshots the live model.
    journal.snapshot_source = broker.model.snapshot_records
    write_public(
        os.path.join(state_dir, "ctxctl.json"),
        json.dumps(
            {"url": public_url, "ca": os.path.abspath(files.ca), "token_file": admin_token_path}, indent=2
        ).encode("ascii"),
    )
    return OpenedState(state_dir, lock, broker, files, replayed, admin_token_path)


def _authority(config: Dict[str, Any]) -> credentials.Authority:
    """What signs host certificates: the state directory's credentials key, and the site's CA if given."""
    state_dir = config["state-dir"]
    try:
        master = credentials.load_master(state_dir)
        site = None
        if config.get("site-ca-cert"):
            site = credentials.SiteCA(config["site-ca-cert"], config["site-ca-key"])
    except (OSError, ValueError, TypeError, UnsupportedAlgorithm) as e:
        raise SystemExit(f"ctxd: host credentials: {e}") from None
    return credentials.Authority(master, site, workdir=state_dir)


def _agent_source() -> Optional[bytes]:
    """ctxagent.py as installed beside ctxd, which the broker serves to VMs (GET /v1/agent)."""
    try:
        spec = importlib.util.find_spec("ctxagent")
        with open(spec.origin, "rb") as f:   # type: ignore[union-attr,arg-type]
            return f.read()
    except (ImportError, ValueError, AttributeError, TypeError, OSError) as e:
        log.warn("cannot serve the agent to VMs (GET /v1/agent): {error}", error=e)
        return None


def _tls_files(config: Dict[str, Any], public_url: str) -> tls.TLSFiles:
    """The configured certificate, key and CA, or ctxd's generated ones for every name it answers to."""
    if config["tls-cert"]:
        if not config["tls-ca"] and not tls.is_self_signed(config["tls-cert"]):
            raise usage.UsageError(
                "--tls-cert is not self-signed: give --tls-ca, the CA certificate agents must trust"
            )
        return tls.TLSFiles(config["tls-cert"], config["tls-key"], config["tls-ca"] or config["tls-cert"])
    names = tls.host_names()
    names.add(urlsplit(public_url).hostname)
    for description in config["listen"]:
        interface, _ = _listener_host_port(description)
        if interface and interface not in ("0.0.0.0", "::"):
            names.add(interface)
    return tls.ensure_generated(os.path.join(config["state-dir"], "tls"), names)


def _assemble(config: Dict[str, Any], opened: OpenedState, reactor: Any) -> service.MultiService:
    """The listeners, the timers and the lifecycle around an opened broker."""
    broker = opened.broker
    top = service.MultiService()
    site = make_site(broker, max_body=config["max-body"], request_deadline=config["request-deadline"],
                     access_log=bool(config.get("access-log")))
    reloads: List[Callable[[], Any]] = [broker.audit.reopen]
    budget = _budget(config)
    for listener in _listeners(config, opened.files, site, reactor, reloads, budget):
        listener.setServiceParent(top)
    broker.metrics.watch(broker, lambda: budget.total)
    broker.journal.sync_observer = broker.metrics.journal_sync_seconds.observe
    if config["metrics-listen"] != "none":
        _monitoring_listener(config["metrics-listen"], broker, reactor).setServiceParent(top)
    # SIGHUP: the audit log is reopened (logrotate) and certificates re-read.
    tlsserver.ReloadOnSIGHUP(lambda: [reload() for reload in reloads], reactor).setServiceParent(top)
    timers = [TimerService(SWEEP_INTERVAL, broker.sweep_expired), TimerService(AUDIT_INTERVAL, broker.audit.flush),
              TimerService(LEASE_INTERVAL, broker.sweep_leases), TimerService(1, broker.flush_enrollment_log)]
    if memory.CAN_RELEASE:
        timers.append(TimerService(memory.TRIM_INTERVAL, memory.release_free_memory))
    for timer in timers:
        timer.clock = reactor
        timer.setServiceParent(top)
    reactor.callWhenRunning(memory.settle_heap)
    state_dir = opened.state_dir
    banner = [
        f"ctxd {ctxd.__version__}: state directory {state_dir} ({opened.replayed} journal records replayed, "
        f"{len(broker.model.contexts)} contexts)",
        f"public URL (goes into bootstraps): {broker.public_url}; listening on {', '.join(config['listen'])}",
        f"metrics: {config['metrics-listen']} (/metrics, /livez, /readyz)",
        f"CA certificate {opened.files.ca}, SHA-256 fingerprint {opened.files.ca_fingerprint()}",
        f"admin token: {opened.admin_token_path} (ctxctl --state-dir {state_dir} ...)",
    ]
    _BrokerLifecycle(broker, banner, opened.lock).setServiceParent(top)
    return top


def _budget(config: Dict[str, Any]) -> ConnectionBudget:
    """The connection budget of every listener, fitted to the process's open-file limit
    (:func:`ctxd.admission.fit_to_open_files`)."""
    limits = fit_to_open_files(config["max-connections"], config["max-connections-per-peer"])
    log.info("open files: limit {before} -> {soft} (hard {hard}); connections at most {total} "
             "(configured {want_total}), {per_peer} per address (configured {want_peer})",
             before=limits.soft_before, soft=limits.soft, hard=limits.hard, total=limits.total,
             want_total=config["max-connections"], per_peer=limits.per_peer,
             want_peer=config["max-connections-per-peer"])
    return ConnectionBudget(limits.total, limits.per_peer)


def _listeners(config: Dict[str, Any], files: tls.TLSFiles, site: Any, reactor: Any,
               reloads: List[Callable[[], Any]], budget: ConnectionBudget) -> List[service.Service]:
    """One service per --listen description, all under ``budget``.

    Our TLS listeners count connections in their TLS factory (no extra protocol layer);
    any other listener (plain tcp:, or ssl: with its own key) sits behind a counting wrapper.
    The TLS settings' reload is added to ``reloads`` (run on SIGHUP); a timer rotating their
    session-ticket keys comes with the listeners.
    """
    tls_options = None
    services: List[service.Service] = []
    for given in config["listen"]:
        description = with_backlog(given, config["listen-backlog"])
        capped = backlog_capped(description)
        if capped is not None:
            log.warn("{given}: the kernel caps the listen backlog of {asked} at {cap} (net.core.somaxconn): a "
                     "join storm of more than about {cap} nodes at once costs the others SYN retries of 1 s and "
                     "more; raise net.core.somaxconn (docs/operations.md)", given=given, asked=capped[0],
                     cap=capped[1])
        factory: Any
        if _needs_our_certificate(description):
            if tls_options is None:
                tls_options = server_tls_options(files, config.get("client-ca"))
                reloads.append(tls_options.reload)
                rotation = TimerService(tlsserver.TICKET_LIFETIME, tls_options.rotate)
                rotation.clock = reactor
                services.append(rotation)
            description = "tcp:" + description.split(":", 1)[1]
            factory = tlsserver.tls_factory(tls_options, site, budget)
        else:
            factory = ConnectionLimiter(site, budget)
            if description.split(":", 1)[0].lower() == "tcp":
                log.warn("listening on {description} WITHOUT TLS: put a TLS proxy in front", description=description)
        services.append(_listening(description, factory, reactor, given))
    return services


def _monitoring_listener(description: str, broker: Broker, reactor: Any) -> service.Service:
    """/metrics, /livez and /readyz in plain HTTP, for the site's monitoring on this host."""
    interface, _ = _listener_host_port(description)
    if interface not in ("127.0.0.1", "::1", "localhost"):
        log.warn("metrics on {description}: reachable beyond this host, without TLS or credentials",
                 description=description)
    return _listening(description, monitoring_site(broker.metrics, broker.ready), reactor)


class _Listening(service.MultiService):
    """A listener (strports.service: a failed bind stops start-up) whose failure to bind is
    one line that says what to do."""

    def __init__(self, description: str, listener: service.Service) -> None:
        super().__init__()
        self.description = description
        listener.setServiceParent(self)

    def privilegedStartService(self) -> None:
        try:
            super().privilegedStartService()
        except CannotListenError as e:
            reason = getattr(e.socketError, "strerror", None) or str(e.socketError)
            raise SystemExit(f"ctxd: cannot listen on {self.description}: {reason} (another service on "
                             "that port? choose another with --listen, or stop the other one)") from None


def _listening(description: str, factory: Any, reactor: Any, given: Optional[str] = None) -> service.Service:
    """A service listening on ``description`` (checked now: a bad one stops start-up); errors
    name the description as ``given``."""
    given = given or description
    try:
        endpoints.serverFromString(reactor, description)
    except (ValueError, TypeError, KeyError) as e:
        raise SystemExit(f"ctxd: {given!r} is not a listener description ({e}); e.g. ssl:8443 or "
                         "tcp:9464:interface=127.0.0.1") from None
    return _Listening(given, strports.service(description, factory, reactor=reactor))
