"""A journal write that fails (disk full) is never acknowledged and stops ctxd (real process)."""

import json
import os
import shutil
import subprocess

import pytest

from tests.e2e.helpers import BrokerProcess


def _mount_tmpfs(path, size):
    os.makedirs(path, exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=0700", "tmpfs", str(path)], check=True)


@pytest.mark.skipif(os.geteuid() != 0 or shutil.which("mount") is None, reason="needs root to mount a small tmpfs")
def test_failed_journal_write_is_unacknowledged_and_fatal(tmp_path):
    """With the state directory's disk full, a change gets 503, ctxd exits 1, and after a restart it is absent."""
    state = tmp_path / "broker" / "state"
    _mount_tmpfs(state, "4m")
    broker = BrokerProcess(tmp_path / "broker")
    try:
        broker.start()
        first = broker.ctxctl("create", _cluster(tmp_path), "--out", tmp_path / "out1")
        assert first.returncode == 0, first.stderr
        kept = first.stdout.strip()
        # Fill the state directory's filesystem to the last byte.
        with open(state / "filler", "wb") as f:
            try:
                while True:
                    f.write(b"\0" * 65536)
                    f.flush()
            except OSError:
                pass
        # A record larger than a page, so it cannot fit in the journal's last page.
        second = broker.ctxctl("create", _cluster(tmp_path, data=64 * 1024), "--out", tmp_path / "out2",
                               "--allow-duplicate-name")
        assert second.returncode != 0
        assert "503" in second.stderr or "unavailable" in second.stderr or "cannot connect" in second.stderr, second.stderr
        assert broker.proc.wait(timeout=20) == 1, "ctxd must exit 1 after a failed journal write"
        assert "journal failed" in broker.log() or "journal write failed" in broker.log()
        # Free the space and restart: the acknowledged context is there, the refused one is not.
        os.unlink(state / "filler")
        broker.proc = None
        broker.start()
        listed = broker.ctxctl("list", "--json")
        assert listed.returncode == 0, listed.stderr
        ids = [c["id"] for c in json.loads(listed.stdout)["contexts"]]
        assert ids == [kept]
    finally:
        broker.kill()
        subprocess.run(["umount", "-l", str(state)], check=False)


def _cluster(tmp_path, data=0):
    path = tmp_path / f"cluster{data}.toml"
    text = 'name = "full"\n[[group]]\nname = "g"\nquantity = 1\n'
    if data:
        (tmp_path / "blob").write_bytes(os.urandom(data))
        text += 'data = ["blob"]\n[data]\nblob = { file = "blob" }\n'
    path.write_text(text)
    return path
