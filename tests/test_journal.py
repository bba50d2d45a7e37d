"""The journal: behaviour shared by both implementations (IJournal), then the file's own rules."""

import contextlib
import gc
import io
import json
import os
import signal
import stat
import subprocess
import sys
import zlib

import pytest
from support import Queued, identity, instance_key, make_broker, not_fired, result_of, sync_thread, torque_cluster
from zope.interface.verify import verifyObject

import ctxd.journal.filejournal as filejournal_module
import ctxd.journal.format as format_module
from ctxd.interfaces import IJournal
from ctxd.journal import FileJournal, JournalClosed, JournalCorrupt, JournalFailed
from ctxd.journal.__main__ import main as journal_tool
from ctxd.journal.format import FRAME, HEADER, MAGIC, MAX_RECORD, VERSION, make_frame, make_header, scan
from ctxd.model import SITE_ADMIN
from ctxd.testing import MemoryJournal


def file_journal(tmp_path):
    return FileJournal(str(tmp_path / "journal.log"), sync_thread)


class JournalBehaviour:
    """What every IJournal does, whatever keeps the records: one test set, subclassed per
    implementation (as txacme's store tests are). ``make`` opens a journal,
    ``reopen`` closes it and opens what a restart would find, ``break_disk`` makes its
    storage fail from now on."""

    def make(self, tmp_path):
        raise NotImplementedError

    def reopen(self, journal, tmp_path):
        raise NotImplementedError

    def break_disk(self, journal):
        raise NotImplementedError

    def test_provides_the_interface(self, tmp_path):
        """It provides IJournal, with every method and attribute the broker may use."""
        journal = self.make(tmp_path)
        assert verifyObject(IJournal, journal)
        assert journal.snapshot_source is None and journal.syncs == journal.records_synced == 0

    def test_records_round_trip(self, tmp_path):
        """What is appended is loaded back, in order, by a new instance."""
        journal = self.make(tmp_path)
        assert list(journal.load()) == []
        for i in range(5):
            result_of(journal.append({"op": "x", "i": i}))
        again = self.reopen(journal, tmp_path)
        assert [r["i"] for r in again.load()] == [0, 1, 2, 3, 4]

    def test_a_record_is_stored_as_it_was_appended(self, tmp_path):
        """The journal keeps what the record was when appended (its JSON), not a live reference."""
        journal = self.make(tmp_path)
        journal.load()
        record = {"op": "x", "values": [1, 2], "t": (3, 4)}
        result_of(journal.append(record))
        record["values"].append(5)
        assert list(self.reopen(journal, tmp_path).load()) == [{"op": "x", "values": [1, 2], "t": [3, 4]}]

    def test_durability_is_counted_and_barriers_pass(self, tmp_path):
        """Once appends fired, a barrier and a drain fire at once; the counters say what was synced."""
        journal = self.make(tmp_path)
        journal.load()
        for i in range(3):
            result_of(journal.append({"op": "x", "i": i}))
        result_of(journal.barrier())
        result_of(journal.drain())
        assert journal.records_synced == 3 and 1 <= journal.syncs <= 3

    def test_closed_journal_refuses_appends(self, tmp_path):
        """After close (a shutdown), an append fails with JournalClosed: nothing is acknowledged."""
        journal = self.make(tmp_path)
        journal.load()
        journal.close()
        with pytest.raises(JournalClosed):
            result_of(journal.append({"op": "x"}))

    def test_failed_storage_acknowledges_nothing_after(self, tmp_path):
        """Once a write fails, every append and every barrier fails with JournalFailed."""
        journal = self.make(tmp_path)
        journal.load()
        result_of(journal.append({"op": "before"}))
        self.break_disk(journal)
        with pytest.raises(JournalFailed):
            result_of(journal.append({"op": "lost"}))
        for d in (journal.append({"op": "after"}), journal.barrier()):
            with pytest.raises(JournalFailed):
                result_of(d)

    def test_broker_state_survives_restart(self, tmp_path):
        """A broker replaying the journal of another sees the same contexts and nodes."""
        journal = self.make(tmp_path)
        journal.load()
        broker = make_broker(journal)
        created = result_of(broker.create_context(SITE_ADMIN, torque_cluster()))
        cid = created["context"]["id"]
        principal = broker.authenticate(created["bootstraps"]["head"]["join_token"])
        body = {"instance_key": instance_key(1), "identity": identity(1)}
        result_of(broker.enroll(principal, cid, body, "10.9.0.1"))
        restarted = make_broker(self.reopen(journal, tmp_path))
        assert restarted.replay() == 2
        assert result_of(restarted.get_context(SITE_ADMIN, cid)) == result_of(broker.get_context(SITE_ADMIN, cid))


class TestMemoryJournal(JournalBehaviour):
    def make(self, tmp_path):
        return MemoryJournal()

    def reopen(self, journal, tmp_path):
        return MemoryJournal(journal.records)

    def break_disk(self, journal):
        journal.fail(OSError(5, "Input/output error"))


class _BreakableThread:
    """A synchronous stand-in for the journal's thread whose disk can fail."""

    def __init__(self):
        self.broken = False

    def __call__(self, f, *args):
        if self.broken:
            return sync_thread(_raise_eio)
        return sync_thread(f, *args)


def _raise_eio():
    raise OSError(5, "Input/output error")


class TestFileJournal(JournalBehaviour):
    def make(self, tmp_path):
        self.thread = _BreakableThread()
        return FileJournal(str(tmp_path / "journal.log"), self.thread)

    def reopen(self, journal, tmp_path):
        journal.close()
        return self.make(tmp_path)

    def break_disk(self, journal):
        self.thread.broken = True


def test_group_commit_batches_pending_records(tmp_path):
    """Records appended during a sync go into ONE next write+sync, acknowledged in order."""
    thread = Queued()
    journal = FileJournal(str(tmp_path / "j"), thread)
    journal.load()
    first = journal.append({"op": "a"})
    rest = [journal.append({"op": "b", "i": i}) for i in range(10)]
    assert len(thread.jobs) == 1, "only one sync may be in flight"
    assert not_fired(first)
    thread.run_next()
    result_of(first)
    assert all(not_fired(r) for r in rest)
    assert len(thread.jobs) == 1, "the ten pending records go out as one batch"
    drained = journal.drain()
    assert not_fired(drained), "drain waits for the sync in flight"
    thread.run_next()
    for r in rest:
        result_of(r)
    result_of(drained)
    assert journal.syncs == 2 and journal.records_synced == 11


def test_failed_sync_acknowledges_nothing_after(tmp_path):
    """A failed write+sync fails its records and every later append."""
    thread = Queued()
    journal = FileJournal(str(tmp_path / "j"), thread)
    journal.load()
    first = journal.append({"op": "a"})
    queued = journal.append({"op": "b"})
    thread.jobs[0][2].errback(OSError(5, "Input/output error"))
    for d in (first, queued, journal.append({"op": "c"})):
        with pytest.raises(JournalFailed):
            result_of(d)


def test_file_is_private(tmp_path):
    """The journal file is created 0600."""
    journal = file_journal(tmp_path)
    journal.load()
    result_of(journal.append({"op": "a"}))
    assert stat.S_IMODE(os.stat(tmp_path / "journal.log").st_mode) == 0o600


def write_journal(tmp_path, n):
    """Append ``n`` records {"op": "r", "i": i} through a FileJournal; return (path, bytes, record offsets)."""
    journal = file_journal(tmp_path)
    journal.load()
    for i in range(n):
        result_of(journal.append({"op": "r", "i": i}))
    journal.close()
    path = tmp_path / "journal.log"
    return path, path.read_bytes(), [offset for _, offset, _ in scan(str(path)).records]


def broken_files(tmp_path):
    return sorted(p for p in tmp_path.iterdir() if ".broken." in p.name)


def clear_broken(tmp_path):
    for p in broken_files(tmp_path):
        p.unlink()


def assert_tail_cut(tmp_path, path, content, cut, kept):
    """Load keeps the first ``kept`` records, cuts the file at ``cut`` and keeps the tail aside 0600."""
    journal = file_journal(tmp_path)
    assert [r["i"] for r in journal.load()] == list(range(kept))
    journal.close()
    assert path.read_bytes() == content[:cut]
    aside = broken_files(tmp_path)
    if cut < len(content):
        (one,) = aside
        assert one.name.startswith("journal.broken.")
        assert one.read_bytes() == content[cut:]
        assert stat.S_IMODE(os.stat(one).st_mode) == 0o600
    else:
        assert aside == []
    clear_broken(tmp_path)


def test_sequence_continues_after_reopen(tmp_path):
    """Sequence numbers run 1..n and continue after a reopen."""
    path, _, _ = write_journal(tmp_path, 3)
    journal = file_journal(tmp_path)
    assert len(list(journal.load())) == 3 and journal.last_seq == 3
    result_of(journal.append({"op": "r", "i": 3}))
    journal.close()
    assert [seq for seq, _, _ in scan(str(path)).records] == [1, 2, 3, 4]


def test_header_is_written_on_creation(tmp_path):
    """A new journal holds only the magic, version, file id and header checksum, fsync'd before any record."""
    journal = file_journal(tmp_path)
    journal.load()
    content = (tmp_path / "journal.log").read_bytes()
    assert len(content) == HEADER.size and content.startswith(MAGIC)
    assert scan(str(tmp_path / "journal.log")).file_id == journal.file_id


def test_every_truncation_of_the_last_records_is_a_torn_tail(tmp_path):
    """Cut anywhere within the last 3 records: the whole records before the cut load, the rest is kept aside."""
    path, content, offsets = write_journal(tmp_path, 6)
    for cut in range(offsets[-3], len(content)):
        path.write_bytes(content[:cut])
        kept = sum(1 for o in offsets[1:] + [len(content)] if o <= cut)
        good = ([HEADER.size] + [o for o in offsets[1:] + [len(content)] if o <= cut])[-1]
        assert_tail_cut(tmp_path, path, content[:cut], good, kept)


@pytest.mark.parametrize("zeros", [1, 15, 16, 17, 100, 5000])
def test_zero_filled_tail_is_cut(tmp_path, zeros):
    """Zeros after the last record (a file extended but never written) are cut off and kept aside."""
    path, content, _ = write_journal(tmp_path, 3)
    path.write_bytes(content + b"\x00" * zeros)
    assert_tail_cut(tmp_path, path, content + b"\x00" * zeros, len(content), 3)


def test_every_bit_flip_in_the_last_record_is_a_torn_tail(tmp_path):
    """Any single-bit flip in the last record: it is cut off and kept aside, the others load."""
    path, content, offsets = write_journal(tmp_path, 4)
    for bit in range(offsets[-1] * 8, len(content) * 8):
        damaged = bytearray(content)
        damaged[bit // 8] ^= 1 << (bit % 8)
        path.write_bytes(bytes(damaged))
        assert_tail_cut(tmp_path, path, bytes(damaged), offsets[-1], 3)


def test_bit_flip_in_the_middle_refuses_and_changes_nothing(tmp_path):
    """A flip in an earlier record with valid ones after it: JournalCorrupt naming the offset, file unchanged."""
    path, content, offsets = write_journal(tmp_path, 4)
    for bit in range(offsets[1] * 8, offsets[2] * 8):
        damaged = bytearray(content)
        damaged[bit // 8] ^= 1 << (bit % 8)
        path.write_bytes(bytes(damaged))
        with pytest.raises(JournalCorrupt) as info:
            file_journal(tmp_path).load()
        assert f"offset {offsets[1]} " in str(info.value)
        assert path.read_bytes() == bytes(damaged)
        assert broken_files(tmp_path) == []


def test_repair_quarantines_the_middle_and_reports(tmp_path):
    """With repair=True, everything from the damage is kept aside and what was dropped is reported."""
    path, content, offsets = write_journal(tmp_path, 5)
    damaged = bytearray(content)
    damaged[offsets[2] + FRAME.size] ^= 0x01
    path.write_bytes(bytes(damaged))
    journal = FileJournal(str(path), sync_thread, repair=True)
    assert [r["i"] for r in journal.load()] == [0, 1]
    assert journal.repaired["offset"] == offsets[2]
    assert journal.repaired["bytes"] == len(content) - offsets[2]
    assert journal.repaired["records"] == 2, "records 3 and 4 were valid but dropped; the damaged one is not counted"
    (aside,) = broken_files(tmp_path)
    assert aside.read_bytes() == bytes(damaged[offsets[2]:])
    assert stat.S_IMODE(os.stat(aside).st_mode) == 0o600
    result_of(journal.append({"op": "r", "i": 2}))
    journal.close()
    assert [seq for seq, _, _ in scan(str(path)).records] == [1, 2, 3]


def test_valid_checksum_bad_payload_is_middle_damage(tmp_path):
    """A frame whose checksum is valid but whose payload is not a record refuses to start, even last."""
    path, content, _ = write_journal(tmp_path, 2)
    file_id = scan(str(path)).file_id
    path.write_bytes(content + make_frame(file_id, 3, b'["no op"]'))
    with pytest.raises(JournalCorrupt) as info:
        file_journal(tmp_path).load()
    assert f"offset {len(content)} " in str(info.value)


@pytest.mark.parametrize("payload", [
    b' {"op":"x","i":2}\n',
    '{"op":"x","i":2}'.encode("utf-16"),
    '{"op":"\u00e9\u4e2d","i":2}'.encode(),
], ids=["whitespace", "utf-16", "non-ascii"])
def test_payload_loads_exactly_as_json_loads_reads_it(tmp_path, payload):
    """A checksummed payload json.loads reads as a record is that record, however it is spelled."""
    path, content, _ = write_journal(tmp_path, 2)
    path.write_bytes(content + make_frame(scan(str(path)).file_id, 3, payload))
    journal = file_journal(tmp_path)
    assert list(journal.load())[2] == json.loads(payload)
    journal.close()


@pytest.mark.parametrize("payload", [
    b'{"op":"x"}{"op":"y"}', b'{"op":"x"} x', b'{"op":"x"', b'{"op":"x"}\x00', b'\xff{"op":"x"}', b'{"op":"\xff"}',
])
def test_payload_json_loads_refuses_is_middle_damage(tmp_path, payload):
    """Two values, trailing bytes, a cut value or bad UTF-8 in a checksummed payload: refused at its offset."""
    path, content, _ = write_journal(tmp_path, 2)
    path.write_bytes(content + make_frame(scan(str(path)).file_id, 3, payload))
    with pytest.raises(JournalCorrupt, match=rf"offset {len(content)} \(valid checksum but the payload is not JSON"):
        file_journal(tmp_path).load()
    assert broken_files(tmp_path) == []


def test_replay_leaves_garbage_collection_as_it_was(tmp_path):
    """Collection is paused while records are taken from load(), and restored after, also when replay stops early."""
    write_journal(tmp_path, 3)
    assert gc.isenabled()
    for taken in (3, 1, 0):
        journal = file_journal(tmp_path)
        records = journal.load()
        assert [r["i"] for _, r in zip(range(taken), records)] == list(range(taken))
        assert gc.isenabled() is (taken == 0)
        assert [r["i"] for r in records] == list(range(taken, 3))
        assert gc.isenabled()
        journal.close()
    abandoned = file_journal(tmp_path)
    records = abandoned.load()
    next(records)
    del records
    assert gc.isenabled()
    abandoned.close()
    gc.disable()
    try:
        journal = file_journal(tmp_path)
        assert len(list(journal.load())) == 3
        journal.close()
        assert not gc.isenabled()
    finally:
        gc.enable()


def test_sequence_gap_is_middle_damage(tmp_path):
    """A valid frame whose sequence number skips one is damage, not a torn tail."""
    path, content, _ = write_journal(tmp_path, 2)
    file_id = scan(str(path)).file_id
    path.write_bytes(content + make_frame(file_id, 4, b'{"op":"x"}'))
    with pytest.raises(JournalCorrupt, match="sequence number 4, expected 3"):
        file_journal(tmp_path).load()


def test_record_from_another_journal_never_validates(tmp_path):
    """A frame checksummed with another file id is not a valid record."""
    path, content, _ = write_journal(tmp_path, 2)
    path.write_bytes(content + make_frame(b"\x01" * 16, 3, b'{"op":"x"}'))
    assert_tail_cut(tmp_path, path, path.read_bytes(), len(content), 2)


@pytest.mark.parametrize("content", [b'{"op":"a"}\n', b"CTXDJRNX" + bytes(24), b"CTXD", None])
def test_wrong_magic_or_version_refused(tmp_path, content):
    """A file that is not a journal of this format is refused and never overwritten."""
    path = tmp_path / "journal.log"
    if content is None:  # a version this ctxd does not read
        head = MAGIC + (VERSION + 1).to_bytes(4, "big") + bytes(16)
        content = head + zlib.crc32(head).to_bytes(4, "big")
        assert len(content) == len(make_header(bytes(16)))
    path.write_bytes(content)
    with pytest.raises(JournalCorrupt, match="offset"):
        file_journal(tmp_path).load()
    assert path.read_bytes() == content


def test_huge_declared_length_is_refused_before_allocating(tmp_path, monkeypatch):
    """A length over the cap or past the end is damage, found without reading or checksumming it."""
    path, content, _ = write_journal(tmp_path, 3)
    checksummed = []
    real_crc = format_module._crc
    monkeypatch.setattr(format_module, "_crc", lambda *a: checksummed.append(len(a[2])) or real_crc(*a))
    for length in (0xFFFFFFFF, MAX_RECORD + 1, 1000):
        path.write_bytes(content + FRAME.pack(length, 0, 4, 4) + b'{"op":"x"}')
        assert_tail_cut(tmp_path, path, path.read_bytes(), len(content), 3)
    assert max(checksummed) < 1000
    # The same frame before valid records is damage in the middle.
    (tmp_path / "x").mkdir()
    _, one, offsets = write_journal(tmp_path / "x", 2)
    damaged = bytearray(one)
    damaged[offsets[0]:offsets[0] + 4] = (0xFFFFFFFF).to_bytes(4, "big")
    (tmp_path / "x" / "journal.log").write_bytes(bytes(damaged))
    with pytest.raises(JournalCorrupt, match="over the"):
        file_journal(tmp_path / "x").load()


def test_record_over_the_cap_is_not_appended(tmp_path, monkeypatch):
    """append refuses a record over the cap without poisoning the journal."""
    monkeypatch.setattr(filejournal_module, "MAX_RECORD", 100)
    journal = file_journal(tmp_path)
    journal.load()
    with pytest.raises(ValueError):
        result_of(journal.append({"op": "x", "big": "y" * 200}))
    result_of(journal.append({"op": "x"}))
    journal.close()
    assert [seq for seq, _, _ in scan(str(tmp_path / "journal.log")).records] == [1]


def test_empty_file_becomes_a_new_journal(tmp_path):
    """A zero-byte file (nothing ever acknowledged in it) gets a header."""
    (tmp_path / "journal.log").write_bytes(b"")
    journal = file_journal(tmp_path)
    assert list(journal.load()) == []
    assert (tmp_path / "journal.log").read_bytes().startswith(MAGIC)


def run_cli(*args):
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = journal_tool(list(args))
    return code, out.getvalue(), err.getvalue()


def test_cli_check_and_dump_clean(tmp_path):
    """check prints the header, the count and the sequence range; dump prints SEQ OFFSET JSON."""
    path, content, offsets = write_journal(tmp_path, 3)
    code, out, _ = run_cli("check", str(tmp_path))
    assert code == 0
    assert f"format version {VERSION}, file id " + scan(str(path)).file_id.hex() in out
    assert "3 records, sequence 1..3" in out and "no damage" in out
    code, out, _ = run_cli("dump", str(tmp_path))
    assert code == 0
    assert out.splitlines() == [f'{i + 1} {offsets[i]} {{"i":{i},"op":"r"}}' for i in range(3)]


def test_cli_check_and_dump_damaged(tmp_path):
    """check and dump report damage with its offset, exit 1, and change nothing."""
    path, content, offsets = write_journal(tmp_path, 3)
    damaged = bytearray(content)
    damaged[offsets[1] + FRAME.size] ^= 0x40
    path.write_bytes(bytes(damaged))
    code, out, _ = run_cli("check", str(tmp_path))
    assert code == 1 and f"damage at offset {offsets[1]}" in out and "in the middle" in out
    assert "1 record, sequence 1..1" in out
    code, out, err = run_cli("dump", str(path))
    assert code == 1 and len(out.splitlines()) == 1 and f"offset {offsets[1]}" in err
    assert path.read_bytes() == bytes(damaged)
    (tmp_path / "y").mkdir()
    (tmp_path / "y" / "journal.log").write_bytes(b"not a journal")
    code, out, _ = run_cli("check", str(tmp_path / "y"))
    assert code == 1 and "not a ctxd journal" in out


def test_cli_runs_as_a_module(tmp_path):
    """python -m ctxd.journal check works from the command line."""
    write_journal(tmp_path, 1)
    done = subprocess.run([sys.executable, "-m", "ctxd.journal", "check", str(tmp_path)],
                          capture_output=True, text=True, cwd=os.path.dirname(os.path.dirname(__file__)))
    assert done.returncode == 0 and "1 record, sequence 1..1" in done.stdout, done.stderr


def test_cli_counts_agree_with_their_nouns(tmp_path):
    """check says "1 record", "1 valid-looking record", "1 byte" for one, and the plural otherwise."""
    path, content, offsets = write_journal(tmp_path, 3)
    damaged = bytearray(content)
    damaged[offsets[1] + FRAME.size] ^= 0x40   # record 2 damaged: record 1 loads, record 3 looks valid
    path.write_bytes(bytes(damaged))
    code, out, _ = run_cli("check", str(tmp_path))
    assert code == 1
    assert "\n1 record, sequence 1..1\n" in out and "1 valid-looking record among them" in out
    assert f"{len(content) - offsets[1]} bytes from there" in out
    path.write_bytes(content[:-1])   # a torn last record, no valid-looking one after it
    code, out, _ = run_cli("check", str(tmp_path))
    assert code == 1 and "2 records, sequence 1..2" in out and "0 valid-looking records among them" in out
    path.write_bytes(content[:offsets[2] + 1])   # one byte of the last record's frame
    code, out, _ = run_cli("check", str(tmp_path))
    assert code == 1 and "1 byte from there to the end" in out
    assert " 1 bytes" not in out and " 1 records" not in out


def test_cli_dump_into_a_reader_that_leaves_stops_quietly(tmp_path):
    """dump | head -1: the first line, no traceback, and the status of a process SIGPIPE stopped."""
    journal = file_journal(tmp_path)
    journal.load()
    for i in range(200):   # 2 MB of dump: far more than a pipe holds, so dump is still writing when head leaves
        result_of(journal.append({"op": "r", "i": i, "pad": "x" * 10_000}))
    journal.close()
    dump = subprocess.Popen([sys.executable, "-m", "ctxd.journal", "dump", str(tmp_path)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            cwd=os.path.dirname(os.path.dirname(__file__)))
    head = subprocess.run(["head", "-1"], stdin=dump.stdout, stdout=subprocess.PIPE, timeout=60)
    dump.stdout.close()   # head's end alone: its leaving is what breaks the pipe
    err = dump.stderr.read().decode()
    dump.stderr.close()
    assert dump.wait(timeout=60) == 128 + signal.SIGPIPE, err
    assert head.stdout.startswith(b'1 32 {"i":0,"op":"r","pad":"xxx') and head.stdout.count(b"\n") == 1
    assert err == ""
