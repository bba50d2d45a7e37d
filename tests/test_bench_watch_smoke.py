"""bench/watch_bench.py's bounded version (issue 13): watchers following their view with delta
views against full views, against a real broker over TLS. Sizes, not speeds, are checked."""

import pytest

from test_bench_smoke import _bench, _rows

pytestmark = pytest.mark.once   # (as test_bench_smoke's: the bench runs from the test virtualenv)


def _figures(out: str, mode: str) -> dict:
    header = [c.strip() for c in _rows(out, "mode")[0]]
    row = [c.strip() for c in _rows(out, mode + " | 1 ")[0]]
    return dict(zip(header, row))


def test_watchers_get_every_joiner_in_deltas_far_smaller_than_full_views():
    """Every watcher applies every joiner in both modes, and the delta bytes per watcher per
    joined node are far below the full views' (and the wire carries at least the HTTP bytes)."""
    out = _bench("watch_bench.py", "--nodes", "50", "--join", "10", "--runs", "1", "--deadline", "60",
                 timeout=120)
    delta, full = _figures(out, "delta"), _figures(out, "full")
    for f in (delta, full):
        assert f["watchers with all joiners"] == "50"
        assert float(f["TLS B/watcher/joiner"]) >= float(f["HTTP B/watcher/joiner"]) >= float(f["body B/watcher/joiner"])
    # A full view lists all 60 identities twice (about 110 KB); a delta, each joiner once (about 1 KB).
    assert 4 * float(delta["body B/watcher/joiner"]) < float(full["body B/watcher/joiner"])
    assert float(delta["body B/watcher/joiner"]) < 3000
    assert _rows(out, "delta/full | median")
