"""The audit log: one JSON line per security-relevant action, never a secret.

Each line: time, principal, action, object, source address, outcome (HTTP status),
and for a refused credential what kind of credential was presented ("none",
"malformed" or its public prefix such as "ctxd_node_") - never the credential.

Refusals (bad or missing credentials, forbidden routes, conflicting identities, rate
limits) are counted, not written one by one: :meth:`AuditLog.flush` writes one line per
(source, principal or credential kind, action, outcome) with its ``count``, so a client
that is refused a million times adds a line per interval, not a million. The file is
reopened on SIGHUP (:meth:`AuditLog.reopen`), for logrotate without copytruncate.
"""

import json
import os
import time
from typing import Any, Callable, Dict, Optional, Tuple

#: Distinct refusal keys counted per interval; past it they are counted under source "*".
MAX_REFUSAL_KEYS = 10_000

RefusalKey = Tuple[str, str, str, str, int]  # source, principal, credential kind, action, outcome


class AuditLog:
    """Append-only JSON-lines file (0600). ``clock`` returns the current time."""

    def __init__(self, path: Optional[str], clock: Callable[[], float] = time.time) -> None:
        self.path = path
        self.clock = clock
        self._fd: Optional[int] = None
        # key -> [count, first time, last time]
        self._refusals: Dict[RefusalKey, list] = {}
        if path is not None:
            self._fd = self._open(path)

    @staticmethod
    def _open(path: str) -> int:
        return os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)

    def write(self, principal: str, action: str, obj: str, source: str, outcome: int, **extra: Any) -> Dict[str, Any]:
        entry = {
            "time": round(self.clock(), 3),
            "principal": principal,
            "action": action,
            "object": obj,
            "source": source,
            "outcome": outcome,
        }
        entry.update(extra)
        self._append(entry)
        return entry

    def refused(self, source: str, principal: str, credential: str, action: str, outcome: int) -> None:
        """Count one refusal; :meth:`flush` writes the counts."""
        key = (source, principal, credential, action, outcome)
        counted = self._refusals.get(key)
        if counted is None:
            if len(self._refusals) >= MAX_REFUSAL_KEYS:
                key = ("*", "*", "*", action, outcome)
                counted = self._refusals.get(key)
            if counted is None:
                now = self.clock()
                counted = self._refusals[key] = [0, now, now]
        counted[0] += 1
        counted[2] = self.clock()

    def flush(self) -> int:
        """Write one line per refusal key counted since the last flush; return how many."""
        refusals, self._refusals = self._refusals, {}
        for (source, principal, credential, action, outcome), (count, first, last) in refusals.items():
            entry = {"time": round(self.clock(), 3), "principal": principal, "action": action, "object": "",
                     "source": source, "outcome": outcome, "count": count, "first": round(first, 3),
                     "last": round(last, 3)}
            if credential:
                entry["credential"] = credential
            self._append(entry)
        return len(refusals)

    def _append(self, entry: Dict[str, Any]) -> None:
        if self._fd is not None:
            os.write(self._fd, json.dumps(entry, sort_keys=True).encode("utf-8") + b"\n")

    def reopen(self) -> None:
        """Open the path anew (after logrotate moved the file away)."""
        if self.path is None:
            return
        fd = self._open(self.path)
        old, self._fd = self._fd, fd
        if old is not None:
            os.close(old)

    def close(self) -> None:
        self.flush()
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
