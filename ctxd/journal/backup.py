"""Backing up a broker's state while it runs, and restoring it.

A backup is a state directory of its own: ``snapshot.log`` holding every record the
journal had made durable when the backup was taken (the live snapshot plus the journal's
records after it, a torn tail left out), the broker's TLS files (its CA signs what every
bootstrap trusts), its admin token and its credentials key (every context's certificate
authorities derive from it: ctxd.credentials). A broker started on it has the state of that moment.

The running broker is not stopped or asked anything: the files are read as they are. A
compaction that happens meanwhile (it renames files) is seen - the snapshot changed, or
the journal no longer starts where the snapshot ends - and the reading starts again.
"""

import os
import shutil
import time
from typing import List, Optional, Tuple

from ctxd.journal.errors import JournalCorrupt
from ctxd.journal.format import (
    JOURNAL_FILE,
    NEXT_SUFFIX,
    SNAPSHOT_FILE,
    Record,
    encode,
    read_snapshot,
    scan,
    write_snapshot,
)

#: Besides the journal, what a broker needs to start as the same broker.
KEPT = ("tls", "admin.token", "credentials.key")


class BackupError(Exception):
    """A backup or restore that cannot be made; the message says why and changes nothing."""


def _identity(path: str) -> Optional[Tuple[int, int, int]]:
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return None
    return st.st_ino, st.st_size, st.st_mtime_ns


def read_state(state_dir: str, attempts: int = 50, pause: float = 0.1) -> Tuple[int, List[Record]]:
    """(last sequence number, every durable record in order) of a state directory, read
    consistently while a broker may be writing (and compacting) it."""
    journal = os.path.join(state_dir, JOURNAL_FILE)
    snapshot = os.path.join(state_dir, SNAPSHOT_FILE)
    for _ in range(attempts):
        if os.path.exists(journal + NEXT_SUFFIX):  # a compaction is between its steps
            time.sleep(pause)
            continue
        before = _identity(snapshot)
        covered, records = read_snapshot(snapshot)[:2] if before is not None else (0, [])
        try:
            result = scan(journal)
        except FileNotFoundError:
            result = None
        if _identity(snapshot) != before or os.path.exists(journal + NEXT_SUFFIX):
            continue  # compacted meanwhile: read again
        if result is None:
            if before is None:
                raise BackupError(f"{state_dir}: no journal and no snapshot: not a ctxd state directory")
            return covered, records
        if result.damage is not None and not result.damage.torn:
            raise BackupError(f"{journal}: damaged at offset {result.damage.offset} ({result.damage.reason}); "
                              "check it with python -m ctxd.journal check")
        if result.records and result.records[0][0] > covered + 1:
            continue  # a new journal after a snapshot we read before it was replaced
        newer = [(seq, record) for seq, _, record in result.records if seq > covered]
        last = newer[-1][0] if newer else covered
        return last, records + [record for _, record in newer]
    raise BackupError(f"{state_dir}: the journal kept changing under a compaction; try again")


def backup(state_dir: str, dest: str) -> Tuple[int, int]:
    """Write a backup of ``state_dir`` to ``dest`` (a new directory, made 0700); return
    (records, last sequence number)."""
    if os.path.exists(dest):
        raise BackupError(f"{dest} exists: a backup goes to a new directory")
    last, records = read_state(state_dir)
    os.makedirs(dest, mode=0o700)
    os.chmod(dest, 0o700)
    try:
        write_snapshot(os.path.join(dest, SNAPSHOT_FILE), [encode(r) for r in records], last)
        _copy_kept(state_dir, dest)
    except BaseException:
        shutil.rmtree(dest, ignore_errors=True)
        raise
    return len(records), last


def _copy_kept(source: str, dest: str) -> None:
    for name in KEPT:
        path = os.path.join(source, name)
        if os.path.isdir(path):
            shutil.copytree(path, os.path.join(dest, name), symlinks=False)
            os.chmod(os.path.join(dest, name), 0o700)
        elif os.path.isfile(path):
            shutil.copy2(path, os.path.join(dest, name))
            os.chmod(os.path.join(dest, name), 0o600)


def restore(backup_dir: str, state_dir: str) -> str:
    """Make ``state_dir`` the state of ``backup_dir``; return where the state it replaces was
    moved ("" if there was none). Refused while a broker holds ``state_dir``."""
    import fcntl

    try:
        covered, records, _ = read_snapshot(os.path.join(backup_dir, SNAPSHOT_FILE))
    except (FileNotFoundError, JournalCorrupt) as e:
        raise BackupError(f"{backup_dir} is not a ctxd backup: {e}") from None
    lock_path = os.path.join(state_dir, "lock")
    if os.path.exists(lock_path):
        fd = os.open(lock_path, os.O_RDWR)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            raise BackupError(f"a ctxd is running on {state_dir}: stop it first") from None
        finally:
            os.close(fd)
    moved = ""
    if os.path.exists(state_dir):
        moved = f"{state_dir.rstrip('/')}.replaced-{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}"
        os.rename(state_dir, moved)
    staging = state_dir.rstrip("/") + ".restoring"
    shutil.rmtree(staging, ignore_errors=True)
    shutil.copytree(backup_dir, staging, symlinks=False)
    os.chmod(staging, 0o700)
    os.rename(staging, state_dir)
    return moved
