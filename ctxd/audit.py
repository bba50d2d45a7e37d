"""The audit log: one JSON line per security-relevant action, never a secret.

Each line: time, principal, action, object, source address, outcome (HTTP status),
and for a refused credential what kind of credential was presented ("none",
"malformed" or its public prefix such as "ctxd_node_") - never the credential.
"""

import json
import os
import time
from typing import Any, Callable, Dict, Optional


class AuditLog:
    """Append-only JSON-lines file (0600). ``clock`` returns the current time."""

    def __init__(self, path: Optional[str], clock: Callable[[], float] = time.time) -> None:
        self.path = path
        self.clock = clock
        self._fd: Optional[int] = None
        if path is not None:
            self._fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW, 0o600)

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
        if self._fd is not None:
            os.write(self._fd, json.dumps(entry, sort_keys=True).encode("utf-8") + b"\n")
        return entry

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
