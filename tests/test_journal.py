"""The journal: behaviour shared by both implementations, then the file's own rules."""

import json
import os
import stat

import pytest
from support import make_broker, not_fired, result_of, torque_cluster
from twisted.internet.defer import Deferred, succeed

from ctxd.journal import FileJournal, JournalCorrupt, JournalFailed, MemoryJournal


def sync_thread(f, *args):
    """Run the 'threaded' write immediately: the file journal without a reactor."""
    try:
        return succeed(f(*args))
    except Exception as e:  # pragma: no cover - exercised by the failure test
        d = Deferred()
        d.errback(e)
        return d


def memory(tmp_path):
    return MemoryJournal()


def file_journal(tmp_path):
    return FileJournal(str(tmp_path / "journal.jsonl"), sync_thread)


def reopen(journal, tmp_path):
    if isinstance(journal, MemoryJournal):
        return MemoryJournal(journal.records)
    journal.close()
    return file_journal(tmp_path)


@pytest.fixture(params=[memory, file_journal], ids=["memory", "file"])
def make(request):
    return request.param


def test_records_round_trip(make, tmp_path):
    """What is appended is loaded back, in order, by a new instance."""
    journal = make(tmp_path)
    assert list(journal.load()) == []
    for i in range(5):
        result_of(journal.append({"op": "x", "i": i}))
    again = reopen(journal, tmp_path)
    assert [r["i"] for r in again.load()] == [0, 1, 2, 3, 4]


def test_broker_state_survives_restart(make, tmp_path):
    """A broker replaying the journal of another sees the same contexts and nodes."""
    journal = make(tmp_path)
    journal.load()
    broker = make_broker(journal)
    status, created = result_of(broker.create_context(("admin", "", ""), torque_cluster()))
    cid = created["context"]["id"]
    join = created["bootstraps"]["head"]["join_token"]
    principal = broker.authenticate(join)
    from support import identity, instance_key

    result_of(broker.enroll(principal, cid, {"instance_key": instance_key(1), "identity": identity(1)}, "10.0.0.1"))
    restarted = make_broker(reopen(journal, tmp_path))
    assert restarted.replay() == 2
    admin = ("admin", "", "")
    assert result_of(restarted.get_context(admin, cid)) == result_of(broker.get_context(admin, cid))


def test_group_commit_batches_pending_records(tmp_path):
    """Records appended during a sync go into ONE next write+sync, acknowledged in order."""
    calls = []

    def manual_thread(f, *args):
        d = Deferred()
        calls.append((f, args, d))
        return d

    journal = FileJournal(str(tmp_path / "j"), manual_thread)
    journal.load()
    first = journal.append({"op": "a"})
    rest = [journal.append({"op": "b", "i": i}) for i in range(10)]
    assert len(calls) == 1, "only one sync may be in flight"
    assert not_fired(first)
    f, args, d = calls[0]
    d.callback(f(*args))
    result_of(first)
    assert all(not_fired(r) for r in rest)
    assert len(calls) == 2, "the ten pending records go out as one batch"
    drained = journal.drain()
    assert not_fired(drained), "drain waits for the sync in flight"
    f, args, d = calls[1]
    d.callback(f(*args))
    for r in rest:
        result_of(r)
    result_of(drained)
    assert journal.syncs == 2 and journal.records_synced == 11


def test_failed_sync_acknowledges_nothing_after(tmp_path):
    """A failed write+sync fails its records and every later append."""
    calls = []

    def manual_thread(f, *args):
        d = Deferred()
        calls.append(d)
        return d

    journal = FileJournal(str(tmp_path / "j"), manual_thread)
    journal.load()
    first = journal.append({"op": "a"})
    queued = journal.append({"op": "b"})
    calls[0].errback(OSError(5, "Input/output error"))
    for d in (first, queued, journal.append({"op": "c"})):
        with pytest.raises(JournalFailed):
            result_of(d)


def test_file_is_private(tmp_path):
    """The journal file is created 0600."""
    journal = file_journal(tmp_path)
    journal.load()
    result_of(journal.append({"op": "a"}))
    assert stat.S_IMODE(os.stat(tmp_path / "journal.jsonl").st_mode) == 0o600


@pytest.mark.parametrize("tail", [b'{"op": "tor', b"\x00\x00\x00\x00", b'{"op": "x"}'])
def test_torn_tail_is_cut_and_kept(tmp_path, tail):
    """A partial last record is cut off, kept aside 0600, and the good records load."""
    path = tmp_path / "journal.jsonl"
    path.write_bytes(b'{"op":"a"}\n{"op":"b"}\n' + tail)
    journal = file_journal(tmp_path)
    assert [r["op"] for r in journal.load()] == ["a", "b"]
    assert path.read_bytes() == b'{"op":"a"}\n{"op":"b"}\n'
    (aside,) = [p for p in tmp_path.iterdir() if ".broken." in p.name]
    assert aside.read_bytes() == tail
    assert stat.S_IMODE(os.stat(aside).st_mode) == 0o600


def test_damage_in_the_middle_refuses_to_start(tmp_path):
    """A bad record followed by good ones stops start-up, naming the offset, file unchanged."""
    path = tmp_path / "journal.jsonl"
    content = b'{"op":"a"}\n{"op": garbage}\n{"op":"c"}\n'
    path.write_bytes(content)
    with pytest.raises(JournalCorrupt) as info:
        file_journal(tmp_path).load()
    assert "offset 11" in str(info.value)
    assert path.read_bytes() == content


def test_journal_lines_are_json(tmp_path):
    """Each record is one JSON object per line (inspectable with standard tools)."""
    journal = file_journal(tmp_path)
    journal.load()
    result_of(journal.append({"op": "a", "text": "line\nbreak"}))
    lines = (tmp_path / "journal.jsonl").read_bytes().splitlines()
    assert [json.loads(line) for line in lines] == [{"op": "a", "text": "line\nbreak"}]
