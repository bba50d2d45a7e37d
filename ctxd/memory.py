"""Giving freed heap memory back to the operating system, and garbage collection tuned for a daemon.

A join storm allocates and frees the buffers of thousands of TLS handshakes and
requests between the long-lived objects of enrolled nodes. glibc's malloc returns
only the top of its heap on its own; the free pages in between would stay in the
broker's RSS. ``malloc_trim(0)`` hands every free page back. Elsewhere than glibc
this is a no-op.

Python's cyclic garbage collector, left at its defaults, costs a join storm more than
linearly in N, for two reasons: every full collection walks the whole heap, including
everything built at start-up (modules, and the state replayed from the journal); and
the objects of connections in flight live just long enough to be promoted to the
oldest generation, whose growth then triggers the next full collection.
:func:`settle_heap`, once the broker runs, moves the start-up heap out of the
collector's sight (``gc.freeze``) and raises the youngest generation's threshold so
that a request's objects die before their first collection. The model breaks its own
reference cycles when it drops state (see ``Model._apply_delete``), so what was
frozen is still freed by reference counting when it goes. docs/benchmarks.md has
the figures.
"""

import ctypes
import ctypes.util
import gc
from typing import Any, Callable, Optional

# Seconds between trims: a trim costs a few milliseconds per hundred MiB of heap. Ten
# seconds: a storm's freed buffers leave the RSS soon after it, not up to 30 s later.
TRIM_INTERVAL = 10.0

# gc thresholds once the broker runs (Python's defaults: 700, 10, 10).
GC_THRESHOLDS = (10000, 10, 10)


def _find_malloc_trim() -> Optional[Callable[[int], int]]:
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        trim: Any = libc.malloc_trim
    except (OSError, AttributeError):
        return None
    trim.argtypes = [ctypes.c_size_t]
    trim.restype = ctypes.c_int
    return trim


_malloc_trim = _find_malloc_trim()
CAN_RELEASE = _malloc_trim is not None


def release_free_memory() -> bool:
    """Return free heap pages to the OS; True if the C library can (glibc)."""
    if _malloc_trim is None:
        return False
    _malloc_trim(0)
    return True


def settle_heap() -> None:
    """Once start-up is done: collect the young generations, freeze everything (never
    traversed again) and raise the young generation's threshold to :data:`GC_THRESHOLDS`.

    No full collection: after a large replay it alone would stall the reactor for seconds,
    and a replay leaves no garbage cycles to find (it runs with collection paused and
    the model breaks its own cycles).
    """
    gc.collect(1)
    gc.freeze()
    gc.set_threshold(*GC_THRESHOLDS)
