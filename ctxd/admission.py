"""Admission limits outside the state model: request rates and connection budgets."""

import math
from typing import Any, Dict, List, Optional

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
        host = getattr(addr, "host", str(addr))
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
