"""``python -m ctxd.journal check|dump STATE_DIR``: inspect a journal offline, read-only;
``backup STATE_DIR DEST`` and ``restore BACKUP STATE_DIR`` (ctxd.journal.backup)."""

import argparse
import json
import os
import signal
import sys
from typing import List, Optional

from ctxd.journal.backup import BackupError, backup, restore
from ctxd.journal.errors import JournalCorrupt
from ctxd.journal.format import JOURNAL_FILE, NEXT_SUFFIX, SNAPSHOT_FILE, Damage, read_snapshot, scan


def _journal_path(target: str) -> str:
    return os.path.join(target, JOURNAL_FILE) if os.path.isdir(target) else target


def _describe(damage: Damage) -> str:
    kind = "torn tail (start-up cuts it off)" if damage.torn else "damage in the middle (start-up refuses; --repair drops it)"
    return (f"damage at offset {damage.offset}: {damage.reason}; {kind}; {_count(damage.size, 'byte')} from there "
            f"to the end, {_count(damage.frames, 'valid-looking record')} among them")


def _count(n: int, noun: str) -> str:
    """``1 record``, ``2 records``, ``0 records``."""
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


def main(argv: Optional[List[str]] = None) -> int:
    """Inspect a journal offline (check, dump: exit 0 if clean, 1 if damaged), back up a running
    broker's state, or restore a backup (exit 0 if done, 1 if refused)."""
    parser = argparse.ArgumentParser(prog="python -m ctxd.journal", description=main.__doc__)
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, text in (("check", "header, record count, sequence range, damage"),
                       ("dump", "one 'SEQ OFFSET JSON' line per record")):
        p = commands.add_parser(name, help=text)
        p.add_argument("state_dir", metavar="STATE_DIR", help=f"ctxd state directory (or the {JOURNAL_FILE} file)")
    p = commands.add_parser("backup", help="copy the state of a broker, running or not, to a new directory")
    p.add_argument("state_dir", metavar="STATE_DIR")
    p.add_argument("dest", metavar="DEST", help="new directory: the backup (0700; it holds the CA key and data)")
    p = commands.add_parser("restore", help="make STATE_DIR a backup's state (the broker stopped)")
    p.add_argument("backup_dir", metavar="BACKUP")
    p.add_argument("state_dir", metavar="STATE_DIR", help="the state it holds now is moved aside, not deleted")
    args = parser.parse_args(argv)
    if args.command in ("backup", "restore"):
        return _backup_or_restore(args)
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
        print(f"format version {result.version}, file id {result.file_id.hex()}, {_count(result.size, 'byte')}")
        if result.records:
            print(f"{_count(len(result.records), 'record')}, sequence {result.records[0][0]}..{result.records[-1][0]}")
        else:
            print("0 records")
        print(_describe(result.damage) if result.damage is not None else "no damage")
    return max(0 if result.damage is None else 1, snapshot_code or 0)


def _backup_or_restore(args: argparse.Namespace) -> int:
    try:
        if args.command == "backup":
            count, last = backup(args.state_dir, args.dest)
            print(f"backed up {_count(count, 'record')} (up to sequence {last}), the TLS files and the admin token "
                  f"of {args.state_dir} to {args.dest}")
        else:
            moved = restore(args.backup_dir, args.state_dir)
            print(f"restored {args.backup_dir} into {args.state_dir}"
                  + (f"; the state it replaces is in {moved}" if moved else ""))
    except (BackupError, OSError) as e:
        print(f"python -m ctxd.journal {args.command}: {e}", file=sys.stderr)
        return 1
    return 0


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
        print(f"{_count(size, 'byte')}, {_count(len(records), 'record')}, covers journal sequence 1..{covered}")
    return 0


def run() -> int:
    """``main`` as a command: a reader that leaves early (``dump | head``) ends it quietly, as it
    ends cat: no traceback, and the status of a process that SIGPIPE stopped (128 + 13)."""
    try:
        code = main()
        sys.stdout.flush()   # (what is still buffered fails here, not in the exit's own flush)
    except BrokenPipeError:
        # Python ignores SIGPIPE, so the write raised instead. Point stdout at /dev/null so the
        # interpreter's last flush at exit does not fail again and print a second complaint.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
        return 128 + signal.SIGPIPE
    return code


if __name__ == "__main__":
    sys.exit(run())
