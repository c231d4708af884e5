"""Keep the C heap from growing with the number of tiles (glibc), without paying page faults on every array.

A run allocates and frees arrays of a few hundred KB to a few MB per tile (reads, logits, cells, blocks, a model's
temporaries) from several threads. Left alone, glibc keeps freed memory resident where small blocks pin it
(measured on a 16384^2 slide: resident memory crept up by ~250 MB over the run, on a 65536^2 slide by ~900 MB). An
earlier fix sent every block above 256 KB to its own mapping, returned when freed: bounded, but each new array then
costs its page faults (the ColourDetector's 512^2 float32 temporaries: 28 ms per tile against 14 ms). Now arrays up
to MMAP_THRESHOLD come from the heap, freed memory at its top stays for the next one (TRIM_THRESHOLD), and
:func:`release_freed_memory`, called every second or so by the loop, gives the freed pages back wherever they lie.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
from typing import Any

# glibc <malloc.h>
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_M_ARENA_MAX = -8
MMAP_THRESHOLD = 32 * 1024 * 1024  # glibc's own ceiling for its dynamic threshold
TRIM_THRESHOLD = 256 * 1024 * 1024
ARENA_MAX = 2


@functools.cache
def _glibc() -> Any:
    """The C library when it is glibc, else None (musl / macOS mallopt differ or are absent)."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c"))
        libc.gnu_get_libc_version  # noqa: B018  (only glibc has it)
        libc.mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
        libc.malloc_trim.argtypes = [ctypes.c_size_t]
    except (OSError, AttributeError, TypeError):
        return None
    return libc


@functools.cache
def bound_heap_growth() -> bool:
    """Fix glibc's thresholds and arena count for this process (once); False where the C library is not glibc."""
    libc = _glibc()
    if libc is None:
        return False
    return all(
        libc.mallopt(option, value)
        for option, value in (
            (_M_MMAP_THRESHOLD, MMAP_THRESHOLD), (_M_TRIM_THRESHOLD, TRIM_THRESHOLD), (_M_ARENA_MAX, ARENA_MAX)
        )
    )  # fmt: skip


def release_freed_memory() -> None:
    """Give the pages of freed heap blocks back to the system (glibc's ``malloc_trim``: whole free pages anywhere in
    every arena, not only at the top). A few ms on a heap of hundreds of MB; nothing elsewhere."""
    libc = _glibc()
    if libc is not None:
        libc.malloc_trim(0)
