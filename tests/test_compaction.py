"""Compaction: snapshot records rebuild the live state; the snapshot protocol survives a crash at every step."""

import contextlib
import io
import os

import pytest
from support import (
    b64,
    identity,
    instance_key,
    model_state as state,
    Queued,
    replay_records as replayed,
    sync_thread,
    torque_cluster,
)

import ctxd.journal.filejournal as filejournal_module
from ctxd.journal import FileJournal
from ctxd.journal.__main__ import main as journal_tool
from ctxd.journal.format import scan
from ctxd.model import Model

NOW = 1_000_000.0




class Writer:
    """A model plus a journal: every change is applied, then appended (as the broker does)."""

    def __init__(self, journal=None):
        self.model = Model()
        self.journal = journal
        self.acked = []
        if journal is not None:
            journal.snapshot_source = self.model.snapshot_records

    def commit(self, record):
        self.model.apply(record)
        if self.journal is not None:
            d = self.journal.append(record)
            d.addCallbacks(lambda _: self.acked.append(record), lambda f: None)
        return record


def rich_state(w, now=NOW):
    """Users, three contexts (one deleted), every node state, revocation, rotation, re-enrollment, data."""
    m = w.model
    w.commit(m.prepare_user_add({"name": "alice"}, now)[0])
    w.commit(m.prepare_user_add({"name": "bob"}, now)[0])
    w.commit(m.prepare_user_revoke("bob", now + 1))
    record, _ = m.prepare_create(torque_cluster(), now, owner="alice")
    cid = w.commit(record)["ctx"]
    nodes = {}
    for n, group in ((1, "head"), (2, "compute"), (3, "compute"), (4, "compute")):
        body = {"instance_key": instance_key(n), "identity": identity(n)}
        nodes[n] = w.commit(m.prepare_enroll(cid, group, body, f"10.9.0.{n}", now + n)[0])["node"]
    w.commit(m.prepare_report(cid, nodes[1], {"state": "ok", "log_tail": "head done"}, now + 10))
    w.commit(m.prepare_report(cid, nodes[2], {"state": "contextualizing"}, now + 11))
    w.commit(m.prepare_report(cid, nodes[2], {"state": "ok"}, now + 12))
    w.commit(m.prepare_report(cid, nodes[3], {"state": "error", "exit_code": 3, "message": "boom",
                                              "log_tail": "trace"}, now + 13))
    w.commit(m.prepare_report(cid, nodes[4], {"state": "contextualizing"}, now + 14))
    w.commit(m.prepare_identity(cid, nodes[4], identity(4, "renamed4"), "10.9.0.4", now + 15))
    w.commit(m.prepare_node_revoke(cid, nodes[3], now + 16))
    # Re-enrollment of node 2 (same instance key): a new node token.
    body = {"instance_key": instance_key(2), "identity": identity(2)}
    w.commit(m.prepare_enroll(cid, "compute", body, "10.9.0.2", now + 17)[0])
    w.commit(m.prepare_join_rotate(cid, "compute", now + 18)[0])
    record, _ = m.prepare_create(torque_cluster(open_for_injection=True), now + 20)
    open_cid = w.commit(record)["ctx"]
    w.commit(m.prepare_enroll(open_cid, "head", {"instance_key": instance_key(9), "identity": identity(9)},
                              "10.9.0.9", now + 21)[0])
    w.commit(m.prepare_data(open_cid, "gridmap", {"values": [{"b64": b64(b"x y\n")}]}, now + 22))
    w.commit(m.prepare_lock(open_cid, now + 23))
    record, _ = m.prepare_create(torque_cluster(), now + 30)
    gone = w.commit(record)["ctx"]
    w.commit(m.prepare_delete(gone, now + 31))
    return cid, open_cid


def test_snapshot_records_rebuild_an_equal_state():
    """Applying snapshot_records() to an empty Model yields equal status, principals, users and views."""
    w = Writer()
    cid, _ = rich_state(w)
    copy = replayed(w.model.snapshot_records())
    assert state(copy) == state(w.model)
    assert copy.contexts[cid].revision == w.model.contexts[cid].revision > 1
    # And it keeps working the same afterwards: the next change gives the same revisions.
    nid = next(iter(w.model.contexts[cid].nodes))
    for m in (w.model, copy):
        m.apply({"op": "report", "ctx": cid, "node": nid, "at": NOW + 99, "state": "contextualizing",
                 "exit_code": None, "message": "", "log_tail": ""})
    assert state(copy) == state(w.model)


def test_snapshot_of_snapshot_is_stable():
    """A state rebuilt from a snapshot snapshots to the same records."""
    w = Writer()
    rich_state(w)
    records = w.model.snapshot_records()
    assert replayed(records).snapshot_records() == records


def new_journal(tmp_path, runner=sync_thread, **kw):
    return FileJournal(str(tmp_path / "journal.log"), runner, **kw)


def reload(tmp_path):
    """A fresh journal and model from the files: what a restart sees."""
    journal = new_journal(tmp_path)
    model = replayed(journal.load())
    journal.close()
    return model


def test_compaction_triggers_past_the_threshold_and_the_journal_shrinks(tmp_path):
    """Past both thresholds a sync compacts: a snapshot appears, the journal restarts small, replay is equal."""
    journal = new_journal(tmp_path, compact_bytes=20_000, compact_ratio=2.0)
    list(journal.load())
    w = Writer(journal)
    cid, _ = rich_state(w)
    nid = next(iter(w.model.contexts[cid].nodes))
    biggest = 0
    for i in range(200):
        w.commit(w.model.prepare_identity(cid, nid, identity(1, f"host{i}"), "10.9.0.1", NOW + 100 + i))
        biggest = max(biggest, os.path.getsize(tmp_path / "journal.log"))
    assert journal.compactions >= 1
    assert (tmp_path / "snapshot.log").exists() and not (tmp_path / "journal.log.next").exists()
    assert os.path.getsize(tmp_path / "journal.log") < biggest
    assert journal.last_compaction["journal_bytes"] > journal.last_compaction["snapshot_bytes"]
    assert sorted(os.listdir(tmp_path)) == ["journal.log", "snapshot.log"]
    journal.close()
    assert state(reload(tmp_path)) == state(w.model)


def test_no_compaction_below_the_threshold_or_without_a_source(tmp_path):
    """Small journals, or a journal without snapshot_source, are never compacted."""
    journal = new_journal(tmp_path)
    list(journal.load())
    w = Writer(journal)
    rich_state(w)
    assert journal.compactions == 0 and not journal.compaction_due()
    journal.snapshot_source = None
    journal.compact_bytes = 0
    assert not journal.compaction_due()
    journal.close()


def test_replay_after_compaction_then_more_records_and_a_second_compaction(tmp_path):
    """Snapshot then later records replay to the live state; sequence numbers continue across segments."""
    journal = new_journal(tmp_path)
    list(journal.load())
    w = Writer(journal)
    cid, _ = rich_state(w)
    seq = journal.last_seq
    journal.compact()
    assert journal.compactions == 1 and journal.last_compaction["last_seq"] == seq
    nid = next(iter(w.model.contexts[cid].nodes))
    w.commit(w.model.prepare_identity(cid, nid, identity(1, "after"), "10.9.0.1", NOW + 500))
    assert scan(str(tmp_path / "journal.log")).records[0][0] == seq + 1
    journal.compact()
    w.commit(w.model.prepare_identity(cid, nid, identity(1, "after2"), "10.9.0.1", NOW + 501))
    journal.close()
    assert state(reload(tmp_path)) == state(w.model)
    again = new_journal(tmp_path)
    list(again.load())
    assert again.last_seq == seq + 2
    again.close()


def test_records_appended_during_compaction_go_to_the_new_segment(tmp_path):
    """While the segment is being created, new records wait; they land in the new segment, not the old journal."""
    runner = Queued()
    journal = new_journal(tmp_path, runner)
    list(journal.load())
    w = Writer(journal)
    cid, _ = rich_state(w)
    runner.run_all()
    covered = journal.last_seq
    done = journal.compact()
    nid = next(iter(w.model.contexts[cid].nodes))
    w.commit(w.model.prepare_identity(cid, nid, identity(1, "during"), "10.9.0.1", NOW + 500))
    runner.run_all()
    assert done.called and journal.compactions == 1
    records = scan(str(tmp_path / "journal.log")).records
    assert [s for s, _, _ in records] == [covered + 1]
    journal.close()
    assert state(reload(tmp_path)) == state(w.model)


STEP_CALLS = ("fsync", "fdatasync", "rename", "unlink")


def count_steps(tmp_path, monkeypatch):
    """How many fsync/fdatasync/rename/unlink calls one compaction makes."""
    calls = []
    journal = new_journal(tmp_path / "count")
    os.mkdir(tmp_path / "count")
    list(journal.load())
    w = Writer(journal)
    rich_state(w)
    for name in STEP_CALLS:
        real = getattr(os, name)
        monkeypatch.setattr(os, name, lambda *a, _real=real, _name=name: calls.append(_name) or _real(*a))
    journal.compact()
    monkeypatch.undo()
    journal.close()
    return calls


@pytest.mark.parametrize("after", [False, True], ids=["crash", "crash-then-more-writes"])
def test_crash_at_each_step_of_compaction_recovers_exactly_the_acknowledged_state(tmp_path, monkeypatch, after):
    """A failure at step k of the protocol, then a restart: exactly the acknowledged records are there."""
    steps = count_steps(tmp_path, monkeypatch)
    assert steps.count("rename") >= 3 and "unlink" in steps
    # k == len(steps): no failure. (With later writes, a failure past the compaction hits their own
    # fdatasync: written but unacknowledged, such a record may legitimately survive.)
    for k in range(len(steps) + (0 if after else 1)):
        directory = tmp_path / f"k{k}"
        os.mkdir(directory)
        journal = new_journal(directory)
        list(journal.load())
        w = Writer(journal)
        cid, _ = rich_state(w)
        calls = [0]

        def crashing(real, *a, k=k, calls=calls):
            calls[0] += 1
            if calls[0] == k + 1:
                raise OSError(5, f"injected crash at step {k}")
            return real(*a)

        for name in STEP_CALLS:
            monkeypatch.setattr(os, name, lambda *a, _real=getattr(os, name): crashing(_real, *a))
        journal.compact().addErrback(lambda f: None)
        if after:
            nid = next(iter(w.model.contexts[cid].nodes))
            w.commit(w.model.prepare_identity(cid, nid, identity(1, "after"), "10.9.0.1", NOW + 500))
        monkeypatch.undo()
        journal.close()
        expected = replayed(w.acked)
        assert state(reload(directory)) == state(expected), f"crash at step {k} ({steps[k:k + 1]})"
        leftovers = {name for name in os.listdir(directory) if name.endswith((".tmp", ".new", ".next"))}
        assert not leftovers, leftovers
        # A second restart sees the same (recovery is idempotent).
        assert state(reload(directory)) == state(expected)


def test_crash_during_recovery_is_recovered_too(tmp_path, monkeypatch):
    """A restart that itself fails part-way through finishing a compaction is finished by the next one."""
    journal = new_journal(tmp_path)
    list(journal.load())
    w = Writer(journal)
    rich_state(w)
    real_rename = os.rename
    # Stop the compaction right after the new segment exists (before the snapshot).
    monkeypatch.setattr(filejournal_module, "write_snapshot",
                        lambda *a: (_ for _ in ()).throw(OSError(5, "injected")))
    journal.compact().addErrback(lambda f: None)
    monkeypatch.undo()
    journal.close()
    assert (tmp_path / "journal.log.next").exists()
    for k in range(4):
        count = [0]

        def flaky(*a, k=k, count=count):
            count[0] += 1
            if count[0] == k + 1:
                raise OSError(5, "injected during recovery")
            return real_rename(*a)

        monkeypatch.setattr(os, "rename", flaky)
        with contextlib.suppress(OSError):
            reload(tmp_path)
        monkeypatch.undo()
    assert state(reload(tmp_path)) == state(replayed(w.acked))


def run_cli(*args):
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = journal_tool(list(args))
    return code, out.getvalue(), err.getvalue()


def test_cli_check_reports_the_snapshot(tmp_path):
    """check describes the snapshot (records, sequence covered) beside the journal; a damaged snapshot fails."""
    journal = new_journal(tmp_path)
    list(journal.load())
    w = Writer(journal)
    rich_state(w)
    seq = journal.last_seq
    journal.compact()
    journal.close()
    code, out, _ = run_cli("check", str(tmp_path))
    assert code == 0, out
    assert f"covers journal sequence 1..{seq}" in out and "no damage" in out
    code, out, _ = run_cli("dump", str(tmp_path))
    assert code == 0 and '"op":"snapshot"' in out
    path = tmp_path / "snapshot.log"
    content = bytearray(path.read_bytes())
    content[-3] ^= 0x40
    path.write_bytes(bytes(content))
    code, out, _ = run_cli("check", str(tmp_path))
    assert code == 1 and "snapshot" in out


def test_compaction_due_after_a_sync_waits_for_the_sync_an_acknowledgement_started(tmp_path):
    """An append made while a sync is being acknowledged (a pipelined request) starts the next
    sync; a compaction that became due then waits behind it: one job in flight, never two, and
    every acknowledged record is there after a restart."""
    thread = Queued()
    journal = FileJournal(str(tmp_path / "journal.log"), thread, compact_bytes=1, compact_ratio=0.0)
    journal.load()
    model = Model()
    journal.snapshot_source = model.snapshot_records

    def change(name):  # as the broker does: apply, then append
        record = {"op": "user_add", "name": name, "token_hash": name * 32, "at": NOW}
        model.apply(record)
        return journal.append(record)

    acked = []
    change("u1").addCallback(lambda _: change("u2").addCallback(acked.append))
    thread.run_next()
    assert [f.__name__ for f, _, _ in thread.jobs] == ["_write_and_sync"], "a compaction ran beside a sync"
    thread.run_all()
    assert acked == [None] and journal.compactions >= 1
    journal.close()
    names = [r["name"] for r in FileJournal(str(tmp_path / "journal.log"), sync_thread).load()]
    assert names == ["u1", "u2"]
