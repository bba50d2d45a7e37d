"""The file journal: framed records in ``STATE_DIR/journal.log``, group commit, compaction.

:class:`FileJournal` provides :class:`~ctxd.interfaces.IJournal`. Records appended while
a write+fdatasync is in flight go into the next single write+fdatasync, which runs off
the reactor thread (at most one in flight); nothing is acknowledged before it is
durable. Once the journal outgrows its thresholds it is compacted into a snapshot of
the live state. docs/reliability.md describes both protocols and every failure rule.
"""

import os
import time
from typing import Any, Callable, Dict, Iterator, List, Optional, Tuple

from twisted.internet.defer import Deferred, succeed
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from zope.interface import implementer  # type: ignore[import-untyped]

from ctxd.interfaces import IJournal
from ctxd.journal.errors import JournalClosed, JournalCorrupt, JournalFailed
from ctxd.journal.format import (
    HEADER,
    MAX_RECORD,
    NEXT_SUFFIX,
    OS,
    SNAPSHOT_FILE,
    Damage,
    OsFiles,
    Record,
    broken_name,
    encode,
    fsync_dir,
    make_frame,
    new_journal_file,
    read_snapshot,
    replaying,
    scan,
    write_all,
    write_snapshot,
)

log = Logger()

DEFAULT_COMPACT_BYTES = 64 * 1024 * 1024
DEFAULT_COMPACT_RATIO = 4.0


@implementer(IJournal)
class FileJournal:
    """Framed, checksummed journal file with group commit.

    ``run_in_thread(f, *args) -> Deferred`` runs the blocking write+sync; tests pass
    a synchronous stand-in. ``repair=True`` lets :meth:`load` quarantine damage in the
    middle instead of refusing; what it dropped is then in :attr:`repaired`. ``fs``
    (default :data:`OS`) makes every file operation: tests pass a simulated disk.
    """

    def __init__(self, path: str, run_in_thread: Callable[..., Deferred], repair: bool = False,
                 compact_bytes: int = DEFAULT_COMPACT_BYTES, compact_ratio: float = DEFAULT_COMPACT_RATIO,
                 fs: Optional[OsFiles] = None) -> None:
        self.path = path
        self.fs: OsFiles = fs if fs is not None else OS
        self._run_in_thread = run_in_thread
        self.repair = repair
        # After a repair: {"offset", "bytes", "records", "reason", "kept_in"}; else None.
        self.repaired: Optional[Dict[str, Any]] = None
        self.file_id: Optional[bytes] = None
        self._next_seq = 1
        self._fd: Optional[int] = None
        self._pending: List[Tuple[bytes, Deferred]] = []
        self._batch_start = 0  # sequence number of the first pending record (its write's batch)
        self._busy = False
        self._failure: Optional[BaseException] = None
        self._idle: List[Deferred] = []
        self._appended = 0
        # (number of records that must be durable, Deferred) for barrier()
        self._barriers: List[Tuple[int, Deferred]] = []
        self.syncs = 0
        self.records_synced = 0
        # Called (in the writing thread) with each write+fdatasync's seconds: the metrics.
        self.sync_observer: Optional[Callable[[float], None]] = None
        # Compaction (see the module docstring). snapshot_source() returns records that,
        # applied to an empty model, rebuild the state of every record appended so far.
        self.snapshot_source: Optional[Callable[[], List[Record]]] = None
        self.compact_bytes = compact_bytes
        self.compact_ratio = compact_ratio
        directory = os.path.dirname(os.path.abspath(path))
        self.snapshot_path = os.path.join(directory, SNAPSHOT_FILE)
        self.next_path = path + NEXT_SUFFIX
        self.compactions = 0
        self.last_compaction: Optional[Dict[str, int]] = None  # {"journal_bytes", "snapshot_bytes", "last_seq"}
        self._journal_bytes = 0  # size of the live journal file
        self._snapshot_bytes = 0
        self._compacting = False
        self._compaction_broken = False
        self._compact_requested = False
        self._compaction_waiters: List[Deferred] = []

    @classmethod
    def for_reactor(cls, path: str, reactor: Any, repair: bool = False, **kwargs: Any) -> "FileJournal":
        return cls(path, lambda f, *a: deferToThreadPool(reactor, reactor.getThreadPool(), f, *a), repair=repair,
                   **kwargs)

    @property
    def size(self) -> int:
        """Bytes in the live journal file (the snapshot apart)."""
        return self._journal_bytes

    @property
    def last_seq(self) -> int:
        """The sequence number of the last record loaded or appended (0: none)."""
        return self._next_seq - 1

    def load(self) -> Iterator[Record]:
        """Check and read every record; cut off a torn tail; then open for appending.

        Everything is checked before this returns. The records come from an iterator
        that pauses cyclic garbage collection until the last one has been taken (see
        :func:`replaying`): take them all, promptly (or drop it).
        """
        records: List[Record] = []
        covered, snapshot = self._recover()
        if not self.fs.exists(self.path) or self.fs.getsize(self.path) == 0:
            # Absent, or empty (nothing was ever acknowledged in it): start a new journal.
            self._create()
            self._next_seq = covered + 1
        else:
            result = scan(self.path, fs=self.fs)
            if result.damage is not None:
                self._cut_off(result.damage)
            self.file_id = result.file_id
            if result.records and result.records[0][0] > covered + 1:
                raise JournalCorrupt(
                    f"{self.path}: the journal starts at sequence {result.records[0][0]} but "
                    f"{'the snapshot covers up to ' + str(covered) if covered else 'there is no snapshot'}: "
                    f"records are missing; refusing to start")
            records = [record for seq, _, record in result.records if seq > covered]
            self._next_seq = max(result.records[-1][0] if result.records else 0, covered) + 1
        self._fd = self.fs.open(self.path, os.O_WRONLY | os.O_APPEND)
        self.fs.fchmod(self._fd, 0o600)
        self._journal_bytes = self.fs.fsize(self._fd)
        return replaying(snapshot + records)

    def _cut_off(self, damage: Damage) -> None:
        """Keep a torn tail (or, with ``repair``, damage in the middle) aside and cut the journal
        there; refuse damage in the middle otherwise."""
        if not damage.torn and not self.repair:
            raise JournalCorrupt(
                f"{self.path}: damaged record at byte offset {damage.offset} ({damage.reason}; "
                f"{damage.frames} valid-looking records after it); refusing to start, the file is "
                "unchanged (--repair quarantines everything from that offset)"
            )
        aside = self._quarantine(damage.offset, damage.size)
        if damage.torn:
            log.warn(
                "journal {path}: torn tail of {size} bytes at offset {offset} ({why}) cut off, kept in {aside}",
                path=self.path, size=damage.size, offset=damage.offset, why=damage.reason, aside=aside,
            )
            return
        self.repaired = {"offset": damage.offset, "bytes": damage.size, "records": damage.frames,
                         "reason": damage.reason, "kept_in": aside}
        log.critical(
            "journal {path}: REPAIRED: damage at offset {offset} ({why}); dropped {size} bytes holding "
            "{frames} valid-looking records, kept in {aside}",
            path=self.path, offset=damage.offset, why=damage.reason, size=damage.size,
            frames=damage.frames, aside=aside,
        )

    def _recover(self) -> Tuple[int, List[Record]]:
        """Finish or roll forward an interrupted compaction; return (seq covered, snapshot records).

        Leftover temporary files are removed. If ``journal.log.next`` exists, a
        compaction stopped before it renamed that segment into place: the old
        journal's records the snapshot does not cover are first written into a new
        snapshot (with the same protocol), then the old journal is deleted and the
        segment becomes ``journal.log``. Every step is idempotent, so a crash during
        recovery is recovered from the same way.
        """
        removed = False
        for leftover in (self.path + ".new", self.next_path + ".new", self.snapshot_path + ".tmp"):
            if self.fs.exists(leftover):
                self.fs.unlink(leftover)
                removed = True
        if removed:
            fsync_dir(self.path, self.fs)
        covered = 0
        snapshot: List[Record] = []
        if self.fs.exists(self.snapshot_path):
            covered, snapshot, self._snapshot_bytes = read_snapshot(self.snapshot_path, self.fs)
        if not self.fs.exists(self.next_path):
            return covered, snapshot
        if self.fs.getsize(self.next_path) > 0:
            damage = scan(self.next_path, fs=self.fs).damage
            if damage is not None and not damage.torn and not self.repair:
                raise JournalCorrupt(
                    f"{self.next_path}: damaged record at byte offset {damage.offset} ({damage.reason}); "
                    "refusing to start, the files are unchanged (--repair quarantines everything from that offset)")
        if self.fs.exists(self.path) and self.fs.getsize(self.path) > 0:
            old = scan(self.path, fs=self.fs)
            if old.damage is not None:
                # It was fdatasync'd in full before the segment was created.
                raise JournalCorrupt(
                    f"{self.path}: damaged record at byte offset {old.damage.offset} ({old.damage.reason}) in a "
                    f"journal that {self.next_path} follows; refusing to start, the files are unchanged")
            if old.records and old.records[0][0] > covered + 1:
                raise JournalCorrupt(f"{self.path}: starts at sequence {old.records[0][0]}, after a snapshot "
                                     f"covering up to {covered}: records are missing; refusing to start")
            newer = [(seq, record) for seq, _, record in old.records if seq > covered]
            if newer:
                snapshot = snapshot + [record for _, record in newer]
                covered = newer[-1][0]
                self._snapshot_bytes = write_snapshot(self.snapshot_path, [encode(r) for r in snapshot], covered,
                                                      fs=self.fs)
                log.warn("journal {path}: finished an interrupted compaction (snapshot up to sequence {seq})",
                         path=self.path, seq=covered)
        if self.fs.exists(self.path):
            self.fs.unlink(self.path)
            fsync_dir(self.path, self.fs)
        self.fs.rename(self.next_path, self.path)
        fsync_dir(self.path, self.fs)
        return covered, snapshot

    def _create(self) -> None:
        """Write a new header to a temporary file, fsync, rename into place, fsync the directory."""
        file_id = os.urandom(16)
        new_journal_file(self.path, file_id, self.fs)
        self.file_id = file_id
        self._next_seq = 1

    def _quarantine(self, offset: int, size: int) -> str:
        """Copy [offset, end) aside (0600, fsync'd), then truncate the journal there and fsync."""
        stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
        for attempt in range(1000):
            aside = broken_name(self.path, stamp) + (f".{attempt}" if attempt else "")
            try:
                fd = self.fs.open(aside, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
                break
            except FileExistsError:
                continue
        else:
            raise JournalCorrupt(f"{self.path}: cannot find a free name to keep damaged bytes aside")
        try:
            source = self.fs.open(self.path, os.O_RDONLY)
            try:
                position = offset
                while True:
                    chunk = self.fs.pread(source, 1 << 20, position)
                    if not chunk:
                        break
                    position += len(chunk)
                    write_all(fd, chunk, self.fs)
            finally:
                self.fs.close(source)
            self.fs.fsync(fd)
        finally:
            self.fs.close(fd)
        fsync_dir(aside, self.fs)
        fd = self.fs.open(self.path, os.O_RDWR)
        try:
            self.fs.ftruncate(fd, offset)
            self.fs.fsync(fd)
        finally:
            self.fs.close(fd)
        return aside

    def append(self, record: Record) -> Deferred:
        """Fires once the record is on disk (after fdatasync)."""
        if self._failure is not None:
            return _failed(JournalFailed(str(self._failure)))
        if self._fd is None or self.file_id is None:
            return _failed(JournalClosed("the journal is closed"))
        payload = encode(record)
        if len(payload) > MAX_RECORD:
            return _failed(ValueError(f"a journal record of {len(payload)} bytes is over the {MAX_RECORD}-byte cap"))
        seq = self._next_seq
        self._next_seq += 1
        # Everything pending goes out as one write: its first record names the batch.
        if not self._pending:
            self._batch_start = seq
        d: Deferred = Deferred()
        self._pending.append((make_frame(self.file_id, seq, payload, self._batch_start), d))
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
        d.addCallbacks(self._synced, self._sync_failed, callbackArgs=(batch, len(data)), errbackArgs=(batch,))

    def _synced(self, _: Any, batch: List[Tuple[bytes, Deferred]], size: int) -> None:
        self._busy = False
        self._journal_bytes += size
        self._acknowledge(batch)
        # An acknowledged request may have appended again (and started the next sync): a
        # compaction waits for that sync, since it takes a sync's place.
        if not self._busy and (self._compact_requested or self.compaction_due()):
            self._start_compaction()
        else:
            self._kick()

    def _acknowledge(self, batch: List[Tuple[bytes, Deferred]]) -> None:
        """``batch`` is durable: its appends and the barriers it completes fire."""
        self.syncs += 1
        self.records_synced += len(batch)
        for _, waiting in batch:
            waiting.callback(None)
        self._release_barriers()

    def _sync_failed(self, failure: Any, batch: List[Tuple[bytes, Deferred]]) -> None:
        """A write or sync failed: nothing may be acknowledged from now on. Everyone waiting
        on this journal learns of it, a compaction requested behind the failed sync included."""
        self._busy = False
        error = failure.value
        self._failure = error
        log.critical("journal write failed, no further change will be acknowledged: {error}", error=error)
        waiting_list = ([w for _, w in batch + self._pending] + [d for _, d in self._barriers]
                        + self._compaction_waiters)
        self._pending, self._barriers, self._compaction_waiters = [], [], []
        self._compact_requested = False
        for waiting in waiting_list:
            waiting.errback(JournalFailed(str(error)))
        self._kick()

    # -- compaction ------------------------------------------------------------

    def compaction_due(self) -> bool:
        """Whether the live journal is past both thresholds (bytes, and ratio to the last snapshot)."""
        return (self.snapshot_source is not None and not self._compacting and not self._compaction_broken
                and self._failure is None and self._fd is not None
                and self._journal_bytes >= self.compact_bytes
                and self._journal_bytes >= self.compact_ratio * self._snapshot_bytes)

    def compact(self) -> Deferred:
        """Compact now (or right after the sync in flight); fires when the snapshot is in place."""
        if self.snapshot_source is None:
            return _failed(ValueError("no snapshot_source: cannot compact"))
        if self._failure is not None or self._fd is None:
            return _failed(JournalFailed("the journal is failed or closed"))
        d: Deferred = Deferred()
        self._compaction_waiters.append(d)
        if not self._compacting:
            if self._busy:
                self._compact_requested = True
            else:
                self._start_compaction()
        return d

    def _start_compaction(self) -> None:
        """Step (a) off the reactor thread, serialized with the syncs; then step (b)+(c)."""
        assert self.snapshot_source is not None and self._fd is not None
        self._compact_requested = False
        self._compacting = True
        self._busy = True
        covered = self.last_seq
        # The model applies a record before it is appended: this is the state of 1..covered.
        records = list(self.snapshot_source())
        batch, self._pending = self._pending, []  # all <= covered: they go to the old journal
        data = b"".join(chunk for chunk, _ in batch)
        journal_bytes = self._journal_bytes + len(data)
        old_fd = self._fd
        new_id = os.urandom(16)
        self.file_id = new_id  # records appended from now on (> covered) go to the new segment
        d = self._run_in_thread(self._rotate, old_fd, data, new_id)
        d.addCallbacks(self._rotated, self._rotate_failed,
                       callbackArgs=(old_fd, batch, records, covered, journal_bytes), errbackArgs=(batch,))

    def _rotated(self, new_fd: int, old_fd: int, batch: List[Tuple[bytes, Deferred]], records: List[Record],
                 covered: int, journal_bytes: int) -> None:
        """Step (a) done: the old journal is durable and appends go to the new segment."""
        self.fs.close(old_fd)
        self._fd = new_fd
        self._journal_bytes = HEADER.size
        self._busy = False
        self._acknowledge(batch)
        self._kick()
        install = self._run_in_thread(self._install_snapshot, records, covered)
        install.addCallbacks(self._installed, self._install_failed, callbackArgs=(journal_bytes, covered))

    def _rotate_failed(self, failure: Any, batch: List[Tuple[bytes, Deferred]]) -> None:
        self._compacting = False
        self._sync_failed(failure, batch)

    def _installed(self, size: int, journal_bytes: int, covered: int) -> None:
        self._snapshot_bytes = size
        self._compacting = False
        self.compactions += 1
        self.last_compaction = {"journal_bytes": journal_bytes, "snapshot_bytes": size, "last_seq": covered}
        log.info("journal compacted: {before} journal bytes -> {size}-byte snapshot up to sequence {seq}",
                 before=journal_bytes, size=size, seq=covered)
        waiters, self._compaction_waiters = self._compaction_waiters, []
        for w in waiters:
            w.callback(self.last_compaction)

    def _install_failed(self, failure: Any) -> None:
        # Acknowledged records are safe (old journal + new segment); load() finishes the job.
        self._compacting = False
        self._compaction_broken = True
        log.critical("journal compaction failed (no data lost; it will be finished at the next start): {error}",
                     error=failure.value)
        waiters, self._compaction_waiters = self._compaction_waiters, []
        for w in waiters:
            w.errback(failure)

    def _rotate(self, old_fd: int, data: bytes, new_id: bytes) -> int:
        """(thread) Make the old journal's last records durable, then create the new segment."""
        if data:
            write_all(old_fd, data, self.fs)
            self.fs.fdatasync(old_fd)
        new_journal_file(self.next_path, new_id, self.fs)
        fd = self.fs.open(self.next_path, os.O_WRONLY | os.O_APPEND)
        return fd

    def _install_snapshot(self, records: List[Record], covered: int) -> int:
        """(thread) Snapshot in place, then drop the old journal, then the segment becomes journal.log."""
        size = write_snapshot(self.snapshot_path, [encode(r) for r in records], covered, fs=self.fs)
        self.fs.unlink(self.path)
        fsync_dir(self.path, self.fs)
        self.fs.rename(self.next_path, self.path)
        fsync_dir(self.path, self.fs)
        return size

    def _write_and_sync(self, data: bytes) -> None:
        assert self._fd is not None, "load() must be called before append()"
        started = time.monotonic()
        view = memoryview(data)
        while view:
            written = self.fs.write(self._fd, view)
            view = view[written:]
        self.fs.fdatasync(self._fd)
        if self.sync_observer is not None:  # (thread-safe: a metrics histogram)
            self.sync_observer(time.monotonic() - started)

    def close(self) -> None:
        if self._fd is not None:
            self.fs.close(self._fd)
            self._fd = None


def _failed(error: BaseException) -> Deferred:
    d: Deferred = Deferred()
    d.errback(error)
    return d
