"""The journal: every state change, durable before it is acknowledged.

Two implementations of one small interface (``load``, ``append``, ``close``):

- :class:`MemoryJournal` for unit tests;
- :class:`FileJournal`, JSON lines in ``STATE_DIR/journal.jsonl``, with group commit:
  records appended while a write+fdatasync is in flight go into the next single
  write+fdatasync, which runs off the reactor thread (at most one in flight).

A torn last line (a crash during a write) is cut off at start-up and kept aside;
damage anywhere else stops start-up. Checksummed framing and compaction come later;
callers depend only on this interface.
"""

import json
import os
import time
from typing import Any, Callable, Dict, Iterator, List, Optional, Tuple

from twisted.internet.defer import Deferred, succeed
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger

log = Logger()

Record = Dict[str, Any]


class JournalCorrupt(Exception):
    """The journal is damaged somewhere other than its tail."""


class JournalFailed(Exception):
    """A write or sync failed: nothing after it may be acknowledged."""


class JournalClosed(JournalFailed):
    """The journal was closed (shutdown): not a disk failure."""


def encode(record: Record) -> bytes:
    return json.dumps(record, separators=(",", ":"), sort_keys=True).encode("utf-8") + b"\n"


class MemoryJournal:
    """A journal that keeps records in a list: for tests of everything above it."""

    def __init__(self, records: Optional[List[Record]] = None) -> None:
        self.records: List[Record] = list(records or [])

    def load(self) -> Iterator[Record]:
        return iter(list(self.records))

    def append(self, record: Record) -> Deferred:
        self.records.append(json.loads(encode(record)))
        return succeed(None)

    def drain(self) -> Deferred:
        return succeed(None)

    barrier = drain

    def close(self) -> None:
        pass


class FileJournal:
    """JSON-lines journal file with group commit.

    ``run_in_thread(f, *args) -> Deferred`` runs the blocking write+sync; tests pass
    a synchronous stand-in.
    """

    def __init__(self, path: str, run_in_thread: Callable[..., Deferred]) -> None:
        self.path = path
        self._run_in_thread = run_in_thread
        self._fd: Optional[int] = None
        self._pending: List[Tuple[bytes, Deferred]] = []
        self._busy = False
        self._failure: Optional[BaseException] = None
        self._idle: List[Deferred] = []
        self._appended = 0
        # (number of records that must be durable, Deferred) for barrier()
        self._barriers: List[Tuple[int, Deferred]] = []
        self.syncs = 0
        self.records_synced = 0

    @classmethod
    def for_reactor(cls, path: str, reactor: Any) -> "FileJournal":
        return cls(path, lambda f, *a: deferToThreadPool(reactor, reactor.getThreadPool(), f, *a))

    def load(self) -> Iterator[Record]:
        """Read every record; cut off a torn tail; then open for appending."""
        records = []
        if os.path.exists(self.path):
            with open(self.path, "rb") as f:
                raw = f.read()
            good_end = 0
            lines = raw.split(b"\n")
            # The last element is b"" when the file ends with a newline.
            for index, line in enumerate(lines):
                last = index == len(lines) - 1
                if last and line == b"":
                    break
                try:
                    if last:
                        raise ValueError("no newline after the last record")
                    record = json.loads(line)
                    if not isinstance(record, dict) or "op" not in record:
                        raise ValueError("not a record")
                except ValueError as e:
                    if last or all(not rest.strip() for rest in lines[index + 1:]):
                        self._quarantine_tail(raw, good_end, str(e))
                        break
                    raise JournalCorrupt(
                        f"{self.path}: damaged record at byte offset {good_end} ({e}); "
                        "refusing to start, the file is unchanged"
                    ) from None
                records.append(record)
                good_end += len(line) + 1
        self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        return iter(records)

    def _quarantine_tail(self, raw: bytes, offset: int, why: str) -> None:
        stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
        for attempt in range(1000):
            aside = f"{self.path}.broken.{stamp}" + (f".{attempt}" if attempt else "")
            try:
                fd = os.open(aside, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
                break
            except FileExistsError:
                continue
        else:
            raise JournalCorrupt(f"{self.path}: cannot find a free name to keep a torn tail aside")
        try:
            os.write(fd, raw[offset:])
            os.fsync(fd)
        finally:
            os.close(fd)
        with open(self.path, "r+b") as f:
            f.truncate(offset)
            f.flush()
            os.fsync(f.fileno())
        log.warn(
            "journal {path}: torn tail of {size} bytes at offset {offset} ({why}) cut off, kept in {aside}",
            path=self.path,
            size=len(raw) - offset,
            offset=offset,
            why=why,
            aside=aside,
        )

    def append(self, record: Record) -> Deferred:
        """Fires once the record is on disk (after fdatasync)."""
        if self._failure is not None:
            return _failed(JournalFailed(str(self._failure)))
        if self._fd is None:
            return _failed(JournalClosed("the journal is closed"))
        d: Deferred = Deferred()
        self._pending.append((encode(record), d))
        self._appended += 1
        self._kick()
        return d

    def barrier(self) -> Deferred:
        """Fires once every record appended so far is durable."""
        if self._failure is not None:
            return _failed(JournalFailed(str(self._failure)))
        if self.records_synced >= self._appended:
            return succeed(None)
        d: Deferred = Deferred()
        self._barriers.append((self._appended, d))
        return d

    def _release_barriers(self) -> None:
        ready = [d for target, d in self._barriers if target <= self.records_synced]
        self._barriers = [(t, d) for t, d in self._barriers if t > self.records_synced]
        for d in ready:
            d.callback(None)

    def drain(self) -> Deferred:
        """Fires once nothing is pending or in flight (for a clean shutdown)."""
        if not self._busy and not self._pending:
            return succeed(None)
        d: Deferred = Deferred()
        self._idle.append(d)
        return d

    def _kick(self) -> None:
        if not self._busy and not self._pending:
            idle, self._idle = self._idle, []
            for d in idle:
                d.callback(None)
        if self._busy or not self._pending:
            return
        batch, self._pending = self._pending, []
        self._busy = True
        data = b"".join(chunk for chunk, _ in batch)
        d = self._run_in_thread(self._write_and_sync, data)

        def done(result: Any) -> Any:
            self._busy = False
            if isinstance(result, BaseException) or hasattr(result, "value"):
                error = getattr(result, "value", result)
                self._failure = error
                log.critical("journal write failed, no further change will be acknowledged: {error}", error=error)
                waiting_list = [w for _, w in batch + self._pending] + [d for _, d in self._barriers]
                self._pending, self._barriers = [], []
                for waiting in waiting_list:
                    waiting.errback(JournalFailed(str(error)))
                self._kick()
                return None
            self.syncs += 1
            self.records_synced += len(batch)
            for _, waiting in batch:
                waiting.callback(None)
            self._release_barriers()
            self._kick()
            return None

        d.addBoth(done)

    def _write_and_sync(self, data: bytes) -> None:
        assert self._fd is not None, "load() must be called before append()"
        view = memoryview(data)
        while view:
            written = os.write(self._fd, view)
            view = view[written:]
        os.fdatasync(self._fd)

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def _failed(error: BaseException) -> Deferred:
    d: Deferred = Deferred()
    d.errback(error)
    return d
