"""The benchmarks' bounded versions: each `make bench` script runs end to end at a tiny
scale against real processes and prints its table (figures are not checked here: they
are measured by `make bench`, never in the test suite)."""

import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# The bench is run from the test virtualenv (`make bench`): its scripts are smoke-tested there;
# the broker they drive runs on Debian 12's libraries in the other end-to-end tests.
pytestmark = pytest.mark.once


def _bench(*argv: str, timeout: float = 240) -> str:
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "bench", argv[0])] + list(argv[1:]),
                          capture_output=True, text=True, timeout=timeout, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return proc.stdout


def _rows(out: str, first: str):
    return [line.split("|")[1:-1] for line in out.splitlines() if line.startswith("| " + first)]


def test_storm_and_floor_small():
    out = _bench("floor.py", "--nodes", "20")
    ctxd, floor, ratio = _rows(out, "ctxd")[0], _rows(out, "floor")[0], _rows(out, "ctxd/floor")[0]
    assert ctxd[1].strip() == floor[1].strip() == "20"
    # every node made its 3 or more requests (the head may find its view complete at once),
    # and the floor replayed them one for one
    assert int(ctxd[3]) >= 3 * 21 and int(floor[3]) == int(ctxd[3])
    # on one keep-alive TLS connection per node (more if the broker closed some), and the
    # floor opened a connection exactly where the ctxd run did
    assert int(ctxd[9]) >= 21 and int(floor[9]) == int(ctxd[9])
    assert float(ratio[2]) > 0


def test_all_identities_small_resends_nothing_unchanged():
    out = _bench("loadgen.py", "allids", "--nodes", "20")
    row = _rows(out, "20")[0]
    views, unchanged, reasked = (int(c.strip()) for c in row[2:5])
    # Every node got its complete view (one more for a node that asked before the last enrolled:
    # a matter of timing, 24 of 20 once on a loaded machine), and no view was sent twice.
    assert views >= 20 and (unchanged, reasked) == (0, 0)


def test_idle_small_wakes_only_the_head():
    out = _bench("floor.py", "idle", "--nodes", "20", "--window", "1")
    row = _rows(out, "21")[0]
    assert row[7].strip() == "1"   # woken by the head-only change
    assert _rows(out, "floor") and _rows(out, "ctxd/floor")


@pytest.mark.parametrize("argv", [("journal_bench.py", "replay", "--records", "2000"),
                                  ("journal_bench.py", "throughput", "--clients", "4", "--seconds", "1"),
                                  ("agent_bench.py", "--runs", "1")])
def test_other_benchmarks_run(argv):
    assert "|" in _bench(*argv)
