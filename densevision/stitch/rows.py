"""A large cell's rows split between the CPU stitcher's thread and helper threads.

With many classes the CPU stitcher is the whole host path: 150 classes are 157 MB of float32 logits per 512² tile,
read once by one thread, while the reader workers leave most of a second core idle. Its numba passes
(:mod:`densevision.stitch.fused`: the contributions into a cell's sums, the last one fused with the class map, the
softmax's sum and division) are per pixel and release the GIL, so a cell cut into bands of rows runs on several cores
with the same values in every bit. The softmax's ``exp`` (torch's) stays on the stitcher's thread.

Bands are claimed one at a time from a shared counter by this thread and by the helpers, and a helper that has not
started when this thread runs out of bands is cancelled: on busy cores (few classes, the readers at full speed) a
helper that is not scheduled costs nothing but the bands this thread did itself. Small cells stay on this thread (a
hand-off costs tens of microseconds).
"""

from __future__ import annotations

import functools
import itertools
import os
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

T = TypeVar("T")

# Elements (rows x elements per row) below which a cell stays on this thread, and about how many each band holds:
# 512k float32 are 0.4 to 1.3 ms of the passes on one core (wide cells alone to 64-wide strips in a run). Splitting
# from 512k instead (5-class cells too) changed nothing measurable (null model 150 classes, UperNet 5 classes).
SPLIT_ELEMENTS = 1 << 20
BAND_ELEMENTS = 1 << 19
MAX_HELPERS = 3

_pool: ThreadPoolExecutor | None = None
_pool_pid = -1
_pool_lock = threading.Lock()


def helpers() -> int:
    """Helper threads beside the caller: one per further core this process may run on, at most :data:`MAX_HELPERS`."""
    return max(0, min(MAX_HELPERS, _cores() - 1))


@functools.cache
def _cores() -> int:
    """The cores this process may run on, read once (a system call per cell cost 0.2 s of a 43 s run)."""
    return len(os.sched_getaffinity(0))


def _helper_pool() -> ThreadPoolExecutor | None:
    """The process's helper threads (made at first use; a forked child makes its own)."""
    global _pool, _pool_pid
    n = helpers()
    if n == 0:
        return None
    with _pool_lock:
        if _pool is None or _pool_pid != os.getpid():
            _pool = ThreadPoolExecutor(n, thread_name_prefix="densevision-rows")
            _pool_pid = os.getpid()
        return _pool


def by_rows(fn: Callable[[int, int], T], rows: int, row_elements: int) -> list[T]:
    """``fn(r0, r1)`` over bands ``[r0, r1)`` covering ``[0, rows)``, their results in band order.

    ``fn`` must release the GIL for most of its time and write only its own rows. A cell of fewer than
    :data:`SPLIT_ELEMENTS` (``rows * row_elements``) is one band, on this thread; a larger one is shared with the
    helper threads. The first exception raised is re-raised, after every started band has ended."""
    if rows * row_elements < SPLIT_ELEMENTS or (pool := _helper_pool()) is None:
        return [fn(0, rows)]
    step = max(1, BAND_ELEMENTS // max(1, row_elements))
    bands = [(r, min(r + step, rows)) for r in range(0, rows, step)]
    results: list[T | None] = [None] * len(bands)
    claim = itertools.count()  # next() of a count is atomic under the GIL

    def work() -> None:
        while (k := next(claim)) < len(bands):
            results[k] = fn(*bands[k])

    started = [pool.submit(work) for _ in range(min(helpers(), len(bands) - 1))]
    try:
        work()
    finally:
        for future in started:
            if not future.cancel():
                future.exception()  # wait: its band may still be running
    for future in started:
        if not future.cancelled() and (error := future.exception()) is not None:
            raise error
    return results  # type: ignore[return-value]
