"""Backups of a broker's state while it runs (python -m ctxd.journal backup), and restores."""

import fcntl
import os

import pytest
from support import identity, instance_key, model_state, replay_records, sync_thread, torque_cluster

from ctxd.journal import FileJournal
from ctxd.journal import backup as backup_module
from ctxd.journal.__main__ import main as journal_tool
from ctxd.journal.backup import BackupError, backup, read_state, restore
from ctxd.model import Model

NOW = 1_000_000.0


def busy_state(state_dir, compact=False):
    """A state directory a broker wrote: a context with three nodes, maybe compacted; (model, journal)."""
    os.makedirs(state_dir, exist_ok=True)
    journal = FileJournal(os.path.join(state_dir, "journal.log"), sync_thread)
    list(journal.load())
    model = Model()
    journal.snapshot_source = model.snapshot_records

    def commit(record):
        model.apply(record)
        journal.append(record)
        return record

    cid = commit(model.prepare_create(torque_cluster(), NOW)[0])["ctx"]
    for n, group in ((1, "head"), (2, "compute"), (3, "compute")):
        body = {"instance_key": instance_key(n), "identity": identity(n)}
        commit(model.prepare_enroll(cid, group, body, f"10.9.0.{n}", NOW + n)[0])
        if compact and n == 2:
            journal.compact()
    (open(os.path.join(state_dir, "admin.token"), "w")).write("ctxd_adm_x\n")
    (open(os.path.join(state_dir, "credentials.key"), "wb")).write(bytes(32))
    os.makedirs(os.path.join(state_dir, "tls"))
    open(os.path.join(state_dir, "tls", "ca.pem"), "w").write("CA\n")
    return model, journal


@pytest.mark.parametrize("compact", [False, True], ids=["journal only", "snapshot and journal"])
def test_backup_holds_the_state_and_what_a_broker_needs(tmp_path, compact):
    """A backup, replayed, is the same state; it carries the TLS files, admin token and credentials
    key (every context's CAs derive from it), 0600 in 0700."""
    model, journal = busy_state(str(tmp_path / "state"), compact)
    assert os.path.exists(tmp_path / "state" / "snapshot.log") is compact
    count, last = backup(str(tmp_path / "state"), str(tmp_path / "b"))
    assert last == journal.last_seq
    restored = FileJournal(str(tmp_path / "b" / "journal.log"), sync_thread)
    assert model_state(replay_records(list(restored.load()))) == model_state(model)
    assert (tmp_path / "b" / "tls" / "ca.pem").read_text() == "CA\n"
    assert oct(os.stat(tmp_path / "b").st_mode & 0o777) == "0o700"
    assert oct(os.stat(tmp_path / "b" / "admin.token").st_mode & 0o777) == "0o600"
    assert (tmp_path / "b" / "credentials.key").read_bytes() == bytes(32)
    assert oct(os.stat(tmp_path / "b" / "credentials.key").st_mode & 0o777) == "0o600"


def test_a_torn_tail_is_left_out(tmp_path):
    """A record being written when the backup reads the journal (a torn tail) is not in it."""
    model, journal = busy_state(str(tmp_path / "state"))
    journal.close()
    with open(tmp_path / "state" / "journal.log", "ab") as f:
        f.write(b"\x00\x00\x01\x00partial")
    last, records = read_state(str(tmp_path / "state"))
    assert last == journal.last_seq and model_state(replay_records(records)) == model_state(model)


def test_a_compaction_meanwhile_is_read_again(tmp_path, monkeypatch):
    """When the broker compacts between the backup's reads (the journal now starts after the
    snapshot it read), the backup reads everything again and loses nothing."""
    model, journal = busy_state(str(tmp_path / "state"))
    real_scan = backup_module.scan
    calls = []

    def scan_then_compact(path, *args):
        if not calls:
            calls.append(1)
            journal.compact()   # the broker, between our snapshot read and our journal read
            model.apply(model.prepare_user_add({"name": "late"}, NOW)[0])
            journal.append({"op": "user_add", "name": "late", "token_hash": "a" * 64, "at": NOW})
        return real_scan(path, *args)

    monkeypatch.setattr(backup_module, "scan", scan_then_compact)
    last, records = read_state(str(tmp_path / "state"))
    assert len(calls) == 1 and last == journal.last_seq
    assert [r["name"] for r in records if r["op"] == "user_add"] == ["late"]


def test_restore_moves_the_old_state_aside_and_refuses_a_running_broker(tmp_path, capsys):
    """restore puts the backup in place and keeps the replaced state; with the state directory's
    lock held (a running ctxd) it refuses and changes nothing."""
    busy_state(str(tmp_path / "state"))
    assert journal_tool(["backup", str(tmp_path / "state"), str(tmp_path / "b")]) == 0
    assert journal_tool(["backup", str(tmp_path / "state"), str(tmp_path / "b")]) == 1
    assert "exists" in capsys.readouterr().err
    target = tmp_path / "target"
    target.mkdir()
    (target / "journal.log").write_bytes(b"old")
    lock = os.open(target / "lock", os.O_RDWR | os.O_CREAT, 0o600)
    fcntl.flock(lock, fcntl.LOCK_EX)
    try:
        with pytest.raises(BackupError, match="running"):
            restore(str(tmp_path / "b"), str(target))
        assert (target / "journal.log").read_bytes() == b"old"
    finally:
        os.close(lock)
    assert journal_tool(["restore", str(tmp_path / "b"), str(target)]) == 0
    moved = [p for p in tmp_path.iterdir() if p.name.startswith("target.replaced-")]
    assert len(moved) == 1 and (moved[0] / "journal.log").read_bytes() == b"old"
    assert sorted(os.listdir(target)) == ["admin.token", "credentials.key", "snapshot.log", "tls"]
    assert journal_tool(["restore", str(tmp_path / "nothing"), str(tmp_path / "t2")]) == 1
    assert "not a ctxd backup" in capsys.readouterr().err
