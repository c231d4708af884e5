"""Keep the C heap from growing with the number of tiles (glibc).

A run allocates and frees arrays of a few hundred KB to a few MB per tile (reads, logits, cells, blocks) from
several threads. glibc raises its mmap threshold each time such a block is freed (up to 32 MB), after which these
arrays come from the per-thread heaps, where fragmentation keeps freed memory resident: measured on a 16384^2 slide,
resident memory crept up by ~250 MB over the run and, on a 65536^2 slide, by ~900 MB. A fixed threshold sends every
block above it to its own mapping, returned to the system when freed; fewer arenas bound what small blocks keep.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools

# glibc <malloc.h>
_M_MMAP_THRESHOLD = -3
_M_ARENA_MAX = -8
MMAP_THRESHOLD = 256 * 1024
ARENA_MAX = 2


@functools.cache
def bound_heap_growth() -> bool:
    """Fix glibc's mmap threshold and arena count for this process (once); False where the C library is not glibc."""
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
        libc.gnu_get_libc_version  # noqa: B018  (only glibc has it: musl / macOS mallopt differ or are absent)
    except (OSError, AttributeError, TypeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    return bool(mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(mallopt(_M_ARENA_MAX, ARENA_MAX))
