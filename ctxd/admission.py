"""Admission limits outside the state model: request rates and connection budgets."""

import math
import resource
from typing import Any, Dict, List, NamedTuple, Optional

from twisted.protocols.policies import WrappingFactory


class RateLimiter:
    """At most ``per_minute`` hits per key in each one-minute window."""

    WINDOW = 60.0

    def __init__(self, clock: Any, per_minute: int) -> None:
        self.clock = clock
        self.per_minute = per_minute
        self._windows: Dict[str, List[float]] = {}  # key -> [window start, hits]

    def hit(self, key: str) -> Optional[int]:
        """Count a hit; return None if allowed, else the seconds until it would be."""
        now = self.clock.seconds()
        window = self._windows.get(key)
        if window is None or now - window[0] >= self.WINDOW:
            window = self._windows[key] = [now, 0]
        if window[1] >= self.per_minute:
            return max(1, math.ceil(window[0] + self.WINDOW - now))
        window[1] += 1
        return None

    def prune(self) -> None:
        """Forget finished windows (bounded memory under floods of distinct keys)."""
        now = self.clock.seconds()
        for key in [k for k, w in self._windows.items() if now - w[0] >= self.WINDOW]:
            del self._windows[key]

    def __len__(self) -> int:
        """Keys with a window: what :meth:`prune` keeps bounded."""
        return len(self._windows)


class ConnectionBudget:
    """Open connections: at most ``max_total`` over all listeners, ``max_per_peer`` from one address."""

    def __init__(self, max_total: int, max_per_peer: int) -> None:
        self.max_total = max_total
        self.max_per_peer = max_per_peer
        self.total = 0
        self.per_peer: Dict[str, int] = {}
        self.refused = 0

    def acquire(self, host: str) -> bool:
        if self.total >= self.max_total or self.per_peer.get(host, 0) >= self.max_per_peer:
            self.refused += 1
            return False
        self.total += 1
        self.per_peer[host] = self.per_peer.get(host, 0) + 1
        return True

    def release(self, host: str) -> None:
        self.total -= 1
        self.per_peer[host] -= 1
        if not self.per_peer[host]:
            del self.per_peer[host]


class BudgetedFactory:
    """Mixin for a WrappingFactory (plain, or TLSMemoryBIOFactory): a connection over the
    ``budget`` is closed at accept, before its wrapper (e.g. a TLS handshake) costs anything.

    (twisted.protocols.policies.LimitConnectionsByPeer predates address objects:
    it indexes them like tuples; and as one more wrapper it would cost every
    connection another protocol layer.)
    """

    budget: ConnectionBudget

    def buildProtocol(self, addr: Any) -> Any:
        host = getattr(addr, "host", None)
        if host is None:   # (not getattr's default: that would format every address)
            host = str(addr)
        if not self.budget.acquire(host):
            return None
        protocol = super().buildProtocol(addr)  # type: ignore[misc]
        if protocol is None:
            self.budget.release(host)
        else:
            protocol._ctxd_peer = host
        return protocol

    def unregisterProtocol(self, protocol: Any) -> None:
        super().unregisterProtocol(protocol)  # type: ignore[misc]
        host = getattr(protocol, "_ctxd_peer", None)
        if host is not None:
            protocol._ctxd_peer = None
            self.budget.release(host)


class ConnectionLimiter(BudgetedFactory, WrappingFactory):
    """``wrapped`` (e.g. the Site on a plain tcp: listener) under a connection budget."""

    def __init__(self, wrapped: Any, budget: ConnectionBudget) -> None:
        super().__init__(wrapped)
        self.budget = budget


#: Open files the broker needs besides its connections: the journal and its snapshot,
#: the audit log, TLS files, the log, the thread pool's, a few more being opened.
RESERVED_FILES = 64


class OpenFileLimits(NamedTuple):
    soft_before: int  # the soft open-file limit ctxd started with
    soft: int         # ... after raising it to the hard limit
    hard: int
    total: int        # connections at most, over all listeners
    per_peer: int     # connections at most from one address


def fit_to_open_files(max_total: int, max_per_peer: int, reserve: int = RESERVED_FILES) -> OpenFileLimits:
    """Raise the soft open-file limit to the hard one, then fit the connection limits under it.

    At most ``soft - reserve`` connections in all, so the broker never runs out of file
    descriptors for its own files; and at most half of them from one address, so that one
    address cannot take what every other client (a health check) needs.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    before = soft
    target = hard if hard != resource.RLIM_INFINITY else _kernel_max_open()
    if soft == resource.RLIM_INFINITY or soft >= target:
        target = soft
    else:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError):
            pass
    usable = soft if soft != resource.RLIM_INFINITY else _kernel_max_open()
    total = max(1, min(max_total, usable - reserve))
    return OpenFileLimits(before, soft, hard, total, max(1, min(max_per_peer, total // 2)))


def _kernel_max_open() -> int:
    try:
        with open("/proc/sys/fs/nr_open") as f:
            return int(f.read())
    except (OSError, ValueError):
        return 1 << 20
