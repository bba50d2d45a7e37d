"""The journal: every state change, durable before it is acknowledged.

Two implementations of one small interface (``load``, ``append``, ``barrier``,
``drain``, ``close``):

- :class:`MemoryJournal` for unit tests;
- :class:`FileJournal`, framed checksummed records in ``STATE_DIR/journal.log``, with
  group commit: records appended while a write+fdatasync is in flight go into the next
  single write+fdatasync, which runs off the reactor thread (at most one in flight).

On-disk format (all integers big-endian)::

    header  = "CTXDJRNL" | version u32 (1) | file id (16 random bytes) | crc32(previous 28 bytes) u32
    record  = length u32 | crc32(file id + seq u64 + payload) u32 | seq u64 | payload

The payload is compact UTF-8 JSON of one record (an object with "op"); ``seq`` starts
at 1 and increases by one per record, continuing after a replay. The file id in every
checksum means a record from another (old or reused) journal never validates. A record
is at most :data:`MAX_RECORD` bytes; a larger declared length, or one past the end of
the file, is damage, found before anything is allocated.

Replay: a torn tail (a partial last record, zeros, or a bad checksum with no valid frame
anywhere after it) is copied to ``journal.broken.<UTC time>`` (0600), cut off and
logged, and start-up continues. Damage in the middle (a valid frame after a bad one, a
sequence gap or repeat, or a valid checksum whose payload is not a record) raises
:class:`JournalCorrupt` naming the offset and changes nothing, unless the journal is
opened with ``repair=True``: then everything from that offset is quarantined the same
way and :attr:`FileJournal.repaired` says what was dropped.

Compaction: once the live journal is past ``compact_bytes`` (default 64 MiB) AND
``compact_ratio`` (default 4) times the last snapshot's size, the sync that crossed the
line is followed by a compaction, using :attr:`FileJournal.snapshot_source` (records
that rebuild the live state: ``Model.snapshot_records``; the model applies a record in
the same reactor turn as it is appended, so they are the state of records 1..S, S =
:attr:`FileJournal.last_seq` at that moment):

(a) off the reactor thread, serialized with the syncs (it takes the sync's place): the
    records still pending (seq <= S) are written to and fdatasync'd in the old journal,
    then a new segment ``journal.log.next`` (header only, a new file id) is written to
    ``journal.log.next.new`` (O_EXCL), fsync'd, renamed, the directory fsync'd. From here
    on, appends (seq > S) go to the new segment, with the normal group commit.
(b) in another thread job, concurrently with syncs of the new segment (never of the
    same file): the snapshot goes to ``snapshot.log.tmp`` (O_EXCL, 0600): a header with
    the magic ``CTXDSNAP``, a first record ``{"op": "snapshot", "last_seq": S, "records":
    N}``, then the N records (seq 1..N+1 of its own file id); fsync, rename to
    ``snapshot.log``, fsync the directory;
(c) only then the old ``journal.log`` is deleted (fsync dir) and ``journal.log.next`` is
    renamed to ``journal.log`` (fsync dir). There is thus one journal name; its first
    record's seq is S+1 (a journal's first record may carry any seq; the rest follow it).

At most one compaction runs at a time. If (a) fails, it is a failed sync (nothing after it
is acknowledged). If (b) or (c) fails, every acknowledged record is still on disk (old
journal + new segment): it is logged, compaction is not retried in this run, and the
next start finishes it.

Replay (:meth:`FileJournal.load`): remove leftover ``*.new``/``*.tmp`` files; read the
snapshot (any damage in it is corruption: it was fsync'd before its rename). If
``journal.log.next`` exists, a compaction was interrupted: the old journal's records the
snapshot does not cover are written into a new snapshot (same protocol), then the old
journal is deleted and the segment renamed into place (every step idempotent, so a crash
during recovery is recovered the same way). Then the snapshot's records are returned,
followed by the journal's records with seq > the snapshot's ``last_seq`` (a gap between
them is :class:`JournalCorrupt`).

Offline inspection: ``python -m ctxd.journal check|dump STATE_DIR`` (read-only; it also
checks ``snapshot.log`` and notes an interrupted compaction).
"""

import argparse
import gc
import json
import mmap
import os
import re
import struct
import sys
import time
import zlib
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterator, List, Optional, Tuple, Union

from twisted.internet.defer import Deferred, succeed
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger

log = Logger()

Record = Dict[str, Any]

JOURNAL_FILE = "journal.log"  # in STATE_DIR
SNAPSHOT_FILE = "snapshot.log"  # in STATE_DIR, beside the journal
NEXT_SUFFIX = ".next"  # journal.log.next: the segment compaction starts
MAGIC = b"CTXDJRNL"
SNAP_MAGIC = b"CTXDSNAP"
DEFAULT_COMPACT_BYTES = 64 * 1024 * 1024
DEFAULT_COMPACT_RATIO = 4.0
VERSION = 2
HEADER = struct.Struct(">8sI16sI")  # magic, version, file id, crc32 of the first 28 bytes
FRAME = struct.Struct(">IIQQ")  # payload length, crc32(file id + seq + batch + payload), seq, batch
BATCH = struct.Struct(">QQ")
SEQ = struct.Struct(">Q")
MAX_RECORD = 16 * 1024 * 1024
MIN_PAYLOAD = 2  # "{}": a frame declaring less is never valid (and zero runs are skipped fast)
_NONZERO = re.compile(rb"[^\x00]")


class JournalCorrupt(Exception):
    """The journal is damaged somewhere other than its tail (or is not a journal)."""


class JournalFailed(Exception):
    """A write or sync failed: nothing after it may be acknowledged."""


class JournalClosed(JournalFailed):
    """The journal was closed (shutdown): not a disk failure."""


def encode(record: Record) -> bytes:
    """Compact JSON of one record (the payload of a frame)."""
    return json.dumps(record, separators=(",", ":"), sort_keys=True).encode("utf-8")


def _crc(file_id: bytes, seq: int, payload: Union[bytes, memoryview], batch: int) -> int:
    return zlib.crc32(payload, zlib.crc32(BATCH.pack(seq, batch), zlib.crc32(file_id)))


def make_header(file_id: bytes, magic: bytes = MAGIC) -> bytes:
    head = magic + struct.pack(">I", VERSION) + file_id
    return head + struct.pack(">I", zlib.crc32(head))


def make_frame(file_id: bytes, seq: int, payload: bytes, batch: Optional[int] = None) -> bytes:
    """One record. ``batch`` is the sequence number of the first record of the write it
    belongs to (default: its own): what lets replay tell a write torn by a crash from
    damage to records that were already synced."""
    batch = seq if batch is None else batch
    return FRAME.pack(len(payload), _crc(file_id, seq, payload, batch), seq, batch) + payload


class OsFiles:
    """Every file operation the journal makes, as a thin layer over :mod:`os`.

    :class:`FileJournal` (and the module's helpers) take one as ``fs``; tests pass a
    simulated disk that records writes and syncs (tests/test_powerloss.py). Each method
    looks ``os.<name>`` up when called, so monkeypatching :mod:`os` still reaches it.
    """

    def open(self, path: str, flags: int, mode: int = 0o777) -> int:
        return os.open(path, flags, mode)

    def write(self, fd: int, data: Union[bytes, memoryview]) -> int:
        return os.write(fd, data)

    def pread(self, fd: int, size: int, offset: int) -> bytes:
        return os.pread(fd, size, offset)

    def close(self, fd: int) -> None:
        os.close(fd)

    def fsync(self, fd: int) -> None:
        os.fsync(fd)

    def fdatasync(self, fd: int) -> None:
        os.fdatasync(fd)

    def ftruncate(self, fd: int, length: int) -> None:
        os.ftruncate(fd, length)

    def fchmod(self, fd: int, mode: int) -> None:
        os.fchmod(fd, mode)

    def fsize(self, fd: int) -> int:
        return os.fstat(fd).st_size

    def rename(self, source: str, target: str) -> None:
        os.rename(source, target)

    def unlink(self, path: str) -> None:
        os.unlink(path)

    def exists(self, path: str) -> bool:
        return os.path.exists(path)

    def getsize(self, path: str) -> int:
        return os.path.getsize(path)

    def fsync_dir(self, path: str) -> None:
        """fsync the directory that holds ``path``."""
        fd = os.open(os.path.dirname(os.path.abspath(path)), os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    @contextmanager
    def mapped(self, path: str) -> Iterator[Any]:
        """The whole file, read-only, as a buffer (an mmap; ``b""`` if empty)."""
        with open(path, "rb") as f:
            if os.fstat(f.fileno()).st_size == 0:
                yield b""
                return
            with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
                yield mm


OS = OsFiles()


@dataclass
class Damage:
    """Where a journal stops being valid, and what lies beyond."""

    offset: int
    size: int  # bytes from offset to the end of the file
    reason: str
    torn: bool  # True: a torn tail that may be cut off; False: damage in the middle
    frames: int  # valid-looking frames from offset to the end (records a repair drops)


@dataclass
class Scan:
    """A read-only pass over a journal file."""

    path: str
    version: int
    file_id: bytes
    size: int
    records: List[Tuple[int, int, Record]] = field(default_factory=list)  # (seq, offset, record)
    damage: Optional[Damage] = None


def _frame_at(mm: Any, offset: int, size: int, file_id: bytes) -> Union[str, Tuple[int, int, memoryview, int]]:
    """(length, seq, payload, batch) of a valid frame at ``offset``, else why not (a string)."""
    if size - offset < FRAME.size:
        return f"partial frame header ({size - offset} bytes)"
    length, crc, seq, batch = FRAME.unpack_from(mm, offset)
    if length < MIN_PAYLOAD:
        return f"declared length {length} too small"
    if length > MAX_RECORD:
        return f"declared length {length} over the {MAX_RECORD}-byte record cap"
    if length > size - offset - FRAME.size:
        return f"declared length {length} past the end of the file"
    payload = memoryview(mm)[offset + FRAME.size:offset + FRAME.size + length]
    if _crc(file_id, seq, payload, batch) != crc:
        payload.release()
        return "checksum mismatch"
    return length, seq, payload, batch


def _valid_frames(mm: Any, start: int, size: int, file_id: bytes, batches: Optional[set] = None) -> int:
    """How many valid-looking frames lie in [start, size), searching byte by byte.

    With ``batches``, the (batch, seq) of those frames are added to it.
    """
    count, offset = 0, start
    while offset <= size - FRAME.size:
        if mm[offset:offset + 4] == b"\x00\x00\x00\x00":
            # A valid frame has a non-zero length, so it starts at most 3 bytes before a non-zero byte.
            found = _NONZERO.search(mm, offset)
            if found is None:
                break
            offset = max(offset + 1, found.start() - 3)
            continue
        frame = _frame_at(mm, offset, size, file_id)
        if isinstance(frame, str):
            offset += 1
            continue
        frame[2].release()
        if batches is not None:
            batches.add((frame[3], frame[1]))
        count += 1
        offset += FRAME.size + frame[0]
    return count


def _inside_last_write(frames: set, expected: int) -> bool:
    """Whether the valid frames after a damaged one all belong to the write it was part of.

    Each write (one group-commit batch) starts only after the previous one was
    synced. A frame of a LATER write after the damage proves the damaged frame was
    synced: real damage. Frames of the same, last write (batch at or before the
    damaged frame's sequence number) mean that write was torn by the crash and was
    never acknowledged: a torn tail.
    """
    if not frames:
        return True
    batches = {batch for batch, _ in frames}
    if len(batches) > 1:
        return False
    (batch,) = batches
    if expected:
        return batch <= expected
    # The damaged frame was the file's first: the write began before the first
    # surviving frame only if that frame is not itself the start of its write.
    return batch < min(seq for _, seq in frames)


def scan(path: str, magic: bytes = MAGIC, fs: OsFiles = OS) -> Scan:
    """Read and check a whole journal (or, with ``magic=SNAP_MAGIC``, snapshot) file without changing it.

    The first record may have any sequence number (a segment started by compaction
    continues the sequence); every later one must follow it by one. Raises
    :class:`JournalCorrupt` if the file is not a journal of this format.
    """
    with fs.mapped(path) as mm:
        size = len(mm)
        head = bytes(mm[:HEADER.size])
        if len(head) < HEADER.size or head[:len(magic)] != magic:
            raise JournalCorrupt(f"{path}: not a ctxd {'journal' if magic == MAGIC else 'snapshot'} "
                                 f"(no {magic.decode()} header at offset 0); "
                                 "refusing to start, the file is unchanged")
        _, version, file_id, crc = HEADER.unpack(head)
        if version != VERSION:
            raise JournalCorrupt(f"{path}: journal format version {version} at offset 8 is not supported "
                                 f"(this ctxd reads version {VERSION}); the file is unchanged")
        if zlib.crc32(head[:-4]) != crc:
            raise JournalCorrupt(f"{path}: damaged journal header (checksum mismatch at offset 0); "
                                 "refusing to start, the file is unchanged")
        result = Scan(path, version, file_id, size)
        if size == HEADER.size:
            return result
        _scan_frames(mm, size, file_id, result)
    return result


@contextmanager
def _gc_paused() -> Iterator[None]:
    """Cyclic garbage collection paused; after, what was allocated meanwhile is in the oldest generation.

    Replay allocates millions of container objects (the decoded records, then the
    model built from them) and next to no garbage cycles (only a deleted context's).
    With collection on, each young collection and each full one traverses them again
    as they accumulate: most of a large replay's time went there. Whatever survives a
    replay is long-lived state, so it is moved straight to the oldest generation
    (``gc.freeze`` then ``gc.unfreeze``: documented, and nothing is traversed), where
    the next full collection looks at it, and frees any cycle, as it would have at
    some point anyway. Objects the process keeps frozen of its own are left alone.
    """
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            if gc.get_freeze_count() == 0:
                gc.freeze()
                gc.unfreeze()
            gc.enable()


def _replaying(records: List[Record]) -> Iterator[Record]:
    """``records``, with collection paused until the last one has been taken (see :func:`_gc_paused`).

    The caller applies each record between two of them: that is the part of replay
    that builds the long-lived state.
    """
    records.reverse()
    with _gc_paused():
        while records:
            # Popped, not iterated: each record is freed once applied, while its memory
            # is still in the cache, instead of all of them in one cold sweep at the end.
            yield records.pop()


# The default decoder's scanner (the C one), called directly: json.loads minus its
# per-call Python overhead (encoding detection, whitespace matching). scan_once is
# an attribute every JSONDecoder sets, undeclared in the stubs.
_scan_json: Callable[[str, int], Tuple[Any, int]] = json.JSONDecoder().scan_once  # type: ignore[attr-defined]


def _scan_frames(mm: Any, size: int, file_id: bytes, result: Scan) -> None:
    """Check and decode every frame after the header into ``result`` (its records, or its damage).

    This is the replay hot loop, so the checks of :func:`_frame_at` are made inline
    here, in the same order: a declared length is checked against the cap and the
    file size before the payload is read, and every checksum is verified. A frame
    that fails them goes to :func:`_frame_at`, which names the reason.
    """
    records = result.records
    unpack = FRAME.unpack_from
    head_size = FRAME.size
    cap = MAX_RECORD
    offset, expected = HEADER.size, 0
    with _gc_paused():
        while offset < size:
            valid = False
            if size - offset >= head_size:
                length, crc, seq, batch = unpack(mm, offset)
                start = offset + head_size
                end = start + length
                if MIN_PAYLOAD <= length <= cap and end <= size:
                    payload = mm[start:end]
                    valid = _crc(file_id, seq, payload, batch) == crc
            if not valid:
                reason = _frame_at(mm, offset, size, file_id)
                if not isinstance(reason, str):  # the two sets of checks must agree
                    raise AssertionError(f"{result.path}: frame at offset {offset} is both valid and not")
                batches: set = set()
                later = _valid_frames(mm, offset + 1, size, file_id, batches)
                result.damage = Damage(offset, size - offset, reason, _inside_last_write(batches, expected), later)
                return
            problem = None
            if expected == 0:
                expected = max(seq, 1)
            if seq != expected:
                problem = f"sequence number {seq}, expected {expected}"
            else:
                try:
                    try:
                        text = payload.decode()
                        record, stop = _scan_json(text, 0)
                        if stop != len(text):
                            raise ValueError("not one JSON value")
                    except (ValueError, StopIteration):
                        # Surrounding whitespace, another encoding, or not JSON at all:
                        # json.loads itself decides (and words the error).
                        record = json.loads(payload)
                    if not isinstance(record, dict) or "op" not in record:
                        problem = "valid checksum but the payload is not a record"
                except ValueError as e:
                    problem = f"valid checksum but the payload is not JSON ({e})"
            if problem is not None:
                result.damage = Damage(offset, size - offset, problem, False, _valid_frames(mm, offset, size, file_id))
                return
            records.append((seq, offset, record))
            offset = end
            expected += 1


def _fsync_dir(path: str, fs: OsFiles = OS) -> None:
    fs.fsync_dir(path)


def broken_name(path: str, stamp: str) -> str:
    """``journal.broken.<stamp>`` beside ``path`` (``journal.log`` -> ``journal``)."""
    return f"{os.path.splitext(path)[0]}.broken.{stamp}"


def _write_all(fd: int, data: Union[bytes, memoryview], fs: OsFiles = OS) -> None:
    view = memoryview(data)
    while view:
        view = view[fs.write(fd, view):]


def write_snapshot(path: str, payloads: List[bytes], last_seq: int, fs: OsFiles = OS) -> int:
    """Write a snapshot crash-safely; return its size in bytes.

    A temporary file (O_EXCL, 0600) gets the header, a first record
    ``{"op": "snapshot", "last_seq": S, "records": N}`` and the N records; it is
    fsync'd, renamed over ``path`` and the directory is fsync'd.
    """
    temporary = path + ".tmp"
    file_id = os.urandom(16)
    fd = fs.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    size = 0
    try:
        try:
            chunk = [make_header(file_id, SNAP_MAGIC),
                     make_frame(file_id, 1, encode({"op": "snapshot", "last_seq": last_seq, "records": len(payloads)}))]
            for seq, payload in enumerate(payloads, 2):
                chunk.append(make_frame(file_id, seq, payload))
                if len(chunk) >= 4096:
                    data = b"".join(chunk)
                    _write_all(fd, data, fs)
                    size += len(data)
                    chunk = []
            data = b"".join(chunk)
            _write_all(fd, data, fs)
            size += len(data)
            fs.fsync(fd)
        finally:
            fs.close(fd)
    except BaseException:
        with_suppressed_unlink(temporary, fs)
        raise
    fs.rename(temporary, path)
    _fsync_dir(path, fs)
    return size


def with_suppressed_unlink(path: str, fs: OsFiles = OS) -> None:
    try:
        fs.unlink(path)
    except OSError:
        pass


def read_snapshot(path: str, fs: OsFiles = OS) -> Tuple[int, List[Record], int]:
    """(last journal seq it covers, its records, its size) of a snapshot file.

    A snapshot is fsync'd before it is renamed into place, so any damage in it is
    corruption (never a torn tail): :class:`JournalCorrupt`.
    """
    result = scan(path, SNAP_MAGIC, fs)
    if result.damage is not None:
        raise JournalCorrupt(f"{path}: damaged snapshot at byte offset {result.damage.offset} "
                             f"({result.damage.reason}); refusing to start, the file is unchanged")
    if not result.records or result.records[0][2].get("op") != "snapshot" or result.records[0][0] != 1:
        raise JournalCorrupt(f"{path}: snapshot has no snapshot record at offset {HEADER.size}; refusing to start")
    head = result.records[0][2]
    records = [record for _, _, record in result.records[1:]]
    if head.get("records") != len(records) or not isinstance(head.get("last_seq"), int):
        raise JournalCorrupt(f"{path}: snapshot declares {head.get('records')} records but holds {len(records)}; "
                             "refusing to start")
    return head["last_seq"], records, result.size


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
    def last_seq(self) -> int:
        """The sequence number of the last record loaded or appended (0: none)."""
        return self._next_seq - 1

    def load(self) -> Iterator[Record]:
        """Check and read every record; cut off a torn tail; then open for appending.

        Everything is checked before this returns. The records come from an iterator
        that pauses cyclic garbage collection until the last one has been taken (see
        :func:`_replaying`): take them all, promptly (or drop it).
        """
        records: List[Record] = []
        covered, snapshot = self._recover()
        if not self.fs.exists(self.path) or self.fs.getsize(self.path) == 0:
            # Absent, or empty (nothing was ever acknowledged in it): start a new journal.
            self._create()
            self._next_seq = covered + 1
        else:
            result = scan(self.path, fs=self.fs)
            damage = result.damage
            if damage is not None:
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
                else:
                    self.repaired = {"offset": damage.offset, "bytes": damage.size, "records": damage.frames,
                                     "reason": damage.reason, "kept_in": aside}
                    log.critical(
                        "journal {path}: REPAIRED: damage at offset {offset} ({why}); dropped {size} bytes holding "
                        "{frames} valid-looking records, kept in {aside}",
                        path=self.path, offset=damage.offset, why=damage.reason, size=damage.size,
                        frames=damage.frames, aside=aside,
                    )
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
        return _replaying(snapshot + records)

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
            _fsync_dir(self.path, self.fs)
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
            _fsync_dir(self.path, self.fs)
        self.fs.rename(self.next_path, self.path)
        _fsync_dir(self.path, self.fs)
        return covered, snapshot

    def _create(self) -> None:
        """Write a new header to a temporary file, fsync, rename into place, fsync the directory."""
        file_id = os.urandom(16)
        _new_journal_file(self.path, file_id, self.fs)
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
                    _write_all(fd, chunk, self.fs)
            finally:
                self.fs.close(source)
            self.fs.fsync(fd)
        finally:
            self.fs.close(fd)
        _fsync_dir(aside, self.fs)
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

        def done(result: Any) -> Any:
            self._busy = False
            if isinstance(result, BaseException) or hasattr(result, "value"):
                error = getattr(result, "value", result)
                self._failure = error
                log.critical("journal write failed, no further change will be acknowledged: {error}", error=error)
                # Everyone waiting on this journal learns of the failure, a compaction
                # requested behind the failed sync included.
                waiting_list = ([w for _, w in batch + self._pending] + [d for _, d in self._barriers]
                                + self._compaction_waiters)
                self._pending, self._barriers, self._compaction_waiters = [], [], []
                self._compact_requested = False
                for waiting in waiting_list:
                    waiting.errback(JournalFailed(str(error)))
                self._kick()
                return None
            self.syncs += 1
            self.records_synced += len(batch)
            self._journal_bytes += len(data)
            for _, waiting in batch:
                waiting.callback(None)
            self._release_barriers()
            if not self._busy and (self._compact_requested or self.compaction_due()):
                self._start_compaction()
            else:
                self._kick()
            return None

        d.addBoth(done)

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

        def rotated(new_fd: int) -> None:
            self.fs.close(old_fd)
            self._fd = new_fd
            self._journal_bytes = HEADER.size
            self._busy = False
            self.syncs += 1
            self.records_synced += len(batch)
            for _, waiting in batch:
                waiting.callback(None)
            self._release_barriers()
            self._kick()
            install = self._run_in_thread(self._install_snapshot, records, covered)
            install.addCallbacks(installed, install_failed)

        def installed(size: int) -> None:
            self._snapshot_bytes = size
            self._compacting = False
            self.compactions += 1
            self.last_compaction = {"journal_bytes": journal_bytes, "snapshot_bytes": size, "last_seq": covered}
            log.info("journal compacted: {before} journal bytes -> {size}-byte snapshot up to sequence {seq}",
                     before=journal_bytes, size=size, seq=covered)
            waiters, self._compaction_waiters = self._compaction_waiters, []
            for w in waiters:
                w.callback(self.last_compaction)

        def install_failed(failure: Any) -> None:
            # Acknowledged records are safe (old journal + new segment); load() finishes the job.
            self._compacting = False
            self._compaction_broken = True
            log.critical("journal compaction failed (no data lost; it will be finished at the next start): {error}",
                         error=failure.value)
            waiters, self._compaction_waiters = self._compaction_waiters, []
            for w in waiters:
                w.errback(failure)

        def rotate_failed(failure: Any) -> None:
            self._busy = False
            self._compacting = False
            self._failure = failure.value
            log.critical("journal write failed, no further change will be acknowledged: {error}", error=failure.value)
            waiting_list = ([w for _, w in batch + self._pending] + [w for _, w in self._barriers]
                            + self._compaction_waiters)
            self._pending, self._barriers, self._compaction_waiters = [], [], []
            for waiting in waiting_list:
                waiting.errback(JournalFailed(str(failure.value)))
            self._kick()

        d.addCallbacks(rotated, rotate_failed)

    def _rotate(self, old_fd: int, data: bytes, new_id: bytes) -> int:
        """(thread) Make the old journal's last records durable, then create the new segment."""
        if data:
            _write_all(old_fd, data, self.fs)
            self.fs.fdatasync(old_fd)
        _new_journal_file(self.next_path, new_id, self.fs)
        fd = self.fs.open(self.next_path, os.O_WRONLY | os.O_APPEND)
        return fd

    def _install_snapshot(self, records: List[Record], covered: int) -> int:
        """(thread) Snapshot in place, then drop the old journal, then the segment becomes journal.log."""
        size = write_snapshot(self.snapshot_path, [encode(r) for r in records], covered, fs=self.fs)
        self.fs.unlink(self.path)
        _fsync_dir(self.path, self.fs)
        self.fs.rename(self.next_path, self.path)
        _fsync_dir(self.path, self.fs)
        return size

    def _write_and_sync(self, data: bytes) -> None:
        assert self._fd is not None, "load() must be called before append()"
        view = memoryview(data)
        while view:
            written = self.fs.write(self._fd, view)
            view = view[written:]
        self.fs.fdatasync(self._fd)

    def close(self) -> None:
        if self._fd is not None:
            self.fs.close(self._fd)
            self._fd = None


def _new_journal_file(path: str, file_id: bytes, fs: OsFiles = OS) -> None:
    """Write a header to ``path.new`` (O_EXCL, 0600), fsync, rename into place, fsync the directory."""
    temporary = path + ".new"
    fd = fs.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        _write_all(fd, make_header(file_id), fs)
        fs.fsync(fd)
    finally:
        fs.close(fd)
    fs.rename(temporary, path)
    _fsync_dir(path, fs)


def _failed(error: BaseException) -> Deferred:
    d: Deferred = Deferred()
    d.errback(error)
    return d


def _journal_path(target: str) -> str:
    return os.path.join(target, JOURNAL_FILE) if os.path.isdir(target) else target


def _describe(damage: Damage) -> str:
    kind = "torn tail (start-up cuts it off)" if damage.torn else "damage in the middle (start-up refuses; --repair drops it)"
    return (f"damage at offset {damage.offset}: {damage.reason}; {kind}; {damage.size} bytes from there to the end, "
            f"{damage.frames} valid-looking records among them")


def main(argv: Optional[List[str]] = None) -> int:
    """``check``/``dump`` a journal offline, without changing it. Exit 0 if clean, 1 if damaged."""
    parser = argparse.ArgumentParser(prog="python -m ctxd.journal", description=main.__doc__)
    parser.add_argument("command", choices=["check", "dump"],
                        help="check: header, record count, sequence range, damage; dump: one 'SEQ OFFSET JSON' line per record")
    parser.add_argument("state_dir", metavar="STATE_DIR", help=f"ctxd state directory (or the {JOURNAL_FILE} file itself)")
    args = parser.parse_args(argv)
    path = _journal_path(args.state_dir)
    snapshot_code = _snapshot_report(os.path.join(os.path.dirname(os.path.abspath(path)), SNAPSHOT_FILE),
                                     args.command)
    if snapshot_code == 0 and os.path.exists(path + NEXT_SUFFIX):
        print(f"{path + NEXT_SUFFIX}: a compaction was interrupted; the next start finishes it",
              file=sys.stderr if args.command == "dump" else sys.stdout)
    try:
        result = scan(path)
    except FileNotFoundError:
        if snapshot_code is not None and os.path.exists(path + NEXT_SUFFIX):
            return snapshot_code
        print(f"{path}: no journal", file=sys.stderr)
        return 2
    except JournalCorrupt as e:
        print(str(e), file=sys.stderr if args.command == "dump" else sys.stdout)
        return 1
    if args.command == "dump":
        out = sys.stdout
        for seq, offset, record in result.records:
            out.write(f"{seq} {offset} {json.dumps(record, separators=(',', ':'), sort_keys=True)}\n")
        if result.damage is not None:
            print(_describe(result.damage), file=sys.stderr)
    else:
        print(f"journal {path}")
        print(f"format version {result.version}, file id {result.file_id.hex()}, {result.size} bytes")
        if result.records:
            print(f"{len(result.records)} records, sequence {result.records[0][0]}..{result.records[-1][0]}")
        else:
            print("0 records")
        print(_describe(result.damage) if result.damage is not None else "no damage")
    return max(0 if result.damage is None else 1, snapshot_code or 0)


def _snapshot_report(path: str, command: str) -> Optional[int]:
    """check: describe the snapshot; dump: its records as 'SNAPSHOT INDEX JSON' lines. None if there is none."""
    if not os.path.exists(path):
        return None
    out = sys.stderr if command == "dump" else sys.stdout
    try:
        covered, records, size = read_snapshot(path)
    except JournalCorrupt as e:
        print(str(e), file=out)
        return 1
    if command == "dump":
        head = {"last_seq": covered, "op": "snapshot", "records": len(records)}
        sys.stdout.write(f"snapshot 0 {json.dumps(head, separators=(',', ':'), sort_keys=True)}\n")
        for i, record in enumerate(records, 1):
            sys.stdout.write(f"snapshot {i} {json.dumps(record, separators=(',', ':'), sort_keys=True)}\n")
    else:
        print(f"snapshot {path}")
        print(f"{size} bytes, {len(records)} records, covers journal sequence 1..{covered}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
