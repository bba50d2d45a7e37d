"""Free heap pages go back to the OS (glibc's malloc_trim), on a timer in the daemon."""

import ctypes
import gc
import platform

import pytest
from twisted.application.internet import TimerService
from twisted.internet.testing import MemoryReactorClock

from ctxd import memory, tap

glibc = platform.libc_ver()[0] == "glibc"


def _rss_kib() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))


@pytest.mark.skipif(not glibc, reason="malloc_trim is glibc's")
def test_release_returns_fragmented_free_pages():
    """Blocks freed between live ones stay resident until the trim returns them."""
    blocks = [ctypes.create_string_buffer(4000) for _ in range(40000)]  # ~160 MB, below mmap size
    for i in range(40000):
        ctypes.memset(blocks[i], 1, 4000)
    keep = blocks[::64]  # one live block in every 64: the heap top cannot shrink
    del blocks
    before = _rss_kib()
    assert memory.release_free_memory() is True
    after = _rss_kib()
    assert before - after > 100 * 1024, (before, after)
    del keep


def _daemon(tmp_path, reactor):
    config = tap.Options()
    config.parseOptions(["--state-dir", str(tmp_path / "s"), "--listen", "ssl:0:interface=127.0.0.1",
                         "--public-url", "https://127.0.0.1:8443"])
    return tap.makeService(config, reactor)


def test_daemon_trims_on_a_timer(tmp_path):
    svc = _daemon(tmp_path, MemoryReactorClock())
    calls = [(s.step, s.call[0]) for s in svc if isinstance(s, TimerService)]
    if glibc:
        assert (memory.TRIM_INTERVAL, memory.release_free_memory) in calls
    else:
        assert all(call is not memory.release_free_memory for _, call in calls)


def test_settle_heap_freezes_start_up_and_raises_the_young_threshold():
    before = gc.get_threshold()
    try:
        memory.settle_heap()
        assert gc.get_threshold() == memory.GC_THRESHOLDS
        assert gc.get_freeze_count() > 0
    finally:
        gc.unfreeze()
        gc.set_threshold(*before)


def test_daemon_settles_its_heap_once_running(tmp_path):
    reactor = MemoryReactorClock()
    _daemon(tmp_path, reactor)
    assert (memory.settle_heap, (), {}) in reactor.whenRunningHooks
