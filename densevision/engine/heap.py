"""Keep the C heap from growing with the number of tiles (glibc), without paying page faults on every array.

A run allocates and frees arrays of a few hundred KB to a few MB per tile (reads, logits, cells, blocks, a model's
temporaries) from several threads. Left alone, glibc keeps freed memory resident where small blocks pin it
(measured on a 16384^2 slide: resident memory crept up by ~250 MB over the run, on a 65536^2 slide by ~900 MB). An
earlier fix sent every block above 256 KB to its own mapping, returned when freed: bounded, but each new array then
costs its page faults (the ColourDetector's 512^2 float32 temporaries: 28 ms per tile against 14 ms). Now every
array comes from the heap, whatever its size (a model's temporaries above 32 MB, glibc's largest mmap threshold,
were mapped and faulted afresh on every call: 23k faults a batch of 4 with the shrunk UperNet-Swin of the mmseg
benchmark, 4 % of its time), freed memory at the top stays for the next one (TRIM_THRESHOLD), and
:func:`release_freed_memory` gives the freed pages back wherever they lie: the loop calls it (:class:`HeapWatch`)
when resident memory has grown by RELEASE_GROWTH since its last call, not on a clock (every second, the pages the
model takes again on its next call cost 8 to 13 % of that model's time).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import os
from typing import Any

# glibc <malloc.h>
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_M_ARENA_MAX = -8
MMAP_MAX = 0  # no mappings of their own (where the heap cannot grow, glibc still maps more heap)
TRIM_THRESHOLD = 256 * 1024 * 1024
ARENA_MAX = 2
RELEASE_GROWTH = 64 * 1024 * 1024


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
            (_M_MMAP_MAX, MMAP_MAX), (_M_TRIM_THRESHOLD, TRIM_THRESHOLD), (_M_ARENA_MAX, ARENA_MAX)
        )
    )  # fmt: skip


def release_freed_memory() -> None:
    """Give the pages of freed heap blocks back to the system (glibc's ``malloc_trim``: whole free pages anywhere in
    every arena, not only at the top). A few ms on a heap of hundreds of MB; nothing elsewhere."""
    libc = _glibc()
    if libc is not None:
        libc.malloc_trim(0)


def resident_bytes() -> int | None:
    """This process's resident memory (Linux), else None."""
    try:
        with open("/proc/self/statm", "rb") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


class HeapWatch:
    """Releases freed heap pages (:func:`release_freed_memory`) when :meth:`check` finds resident memory
    RELEASE_GROWTH above what it was at the last release (at first: when the watch began). Memory that a run takes
    again and again (a model's temporaries) is then not given back and faulted in anew each time, while memory that
    freed blocks pin is given back before it amounts to more than RELEASE_GROWTH. Where resident memory cannot be
    read, every check releases."""

    def __init__(self) -> None:
        self._level = resident_bytes()

    def check(self) -> None:
        now = resident_bytes()
        if now is None or self._level is None or now > self._level + RELEASE_GROWTH:
            release_freed_memory()
            self._level = now
