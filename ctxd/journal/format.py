"""The journal's on-disk format: frames, scanning and damage, snapshot files, file operations.

docs/reliability.md describes the format (version 2), what counts as a torn tail and
what as damage, and the snapshot and compaction protocol. Nothing here keeps state:
:class:`~ctxd.journal.filejournal.FileJournal` and the offline tool
(``python -m ctxd.journal``) build on these functions.
"""

import gc
import json
import mmap
import os
import re
import struct
import zlib
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterator, List, Optional, Tuple, Union

from ctxd.journal.errors import JournalCorrupt

Record = Dict[str, Any]

JOURNAL_FILE = "journal.log"  # in STATE_DIR
SNAPSHOT_FILE = "snapshot.log"  # in STATE_DIR, beside the journal
NEXT_SUFFIX = ".next"  # journal.log.next: the segment compaction starts
MAGIC = b"CTXDJRNL"
SNAP_MAGIC = b"CTXDSNAP"
VERSION = 2
HEADER = struct.Struct(">8sI16sI")  # magic, version, file id, crc32 of the first 28 bytes
FRAME = struct.Struct(">IIQQ")  # payload length, crc32(file id + seq + batch + payload), seq, batch
BATCH = struct.Struct(">QQ")
SEQ = struct.Struct(">Q")
MAX_RECORD = 16 * 1024 * 1024
MIN_PAYLOAD = 2  # "{}": a frame declaring less is never valid (and zero runs are skipped fast)
_NONZERO = re.compile(rb"[^\x00]")


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


def replaying(records: List[Record]) -> Iterator[Record]:
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


def fsync_dir(path: str, fs: OsFiles = OS) -> None:
    fs.fsync_dir(path)


def broken_name(path: str, stamp: str) -> str:
    """``journal.broken.<stamp>`` beside ``path`` (``journal.log`` -> ``journal``)."""
    return f"{os.path.splitext(path)[0]}.broken.{stamp}"


def write_all(fd: int, data: Union[bytes, memoryview], fs: OsFiles = OS) -> None:
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
                    write_all(fd, data, fs)
                    size += len(data)
                    chunk = []
            data = b"".join(chunk)
            write_all(fd, data, fs)
            size += len(data)
            fs.fsync(fd)
        finally:
            fs.close(fd)
    except BaseException:
        with_suppressed_unlink(temporary, fs)
        raise
    fs.rename(temporary, path)
    fsync_dir(path, fs)
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


def new_journal_file(path: str, file_id: bytes, fs: OsFiles = OS) -> None:
    """Write a header to ``path.new`` (O_EXCL, 0600), fsync, rename into place, fsync the directory."""
    temporary = path + ".new"
    fd = fs.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        write_all(fd, make_header(file_id), fs)
        fs.fsync(fd)
    finally:
        fs.close(fd)
    fs.rename(temporary, path)
    fsync_dir(path, fs)
