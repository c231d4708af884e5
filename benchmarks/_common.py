"""Helpers shared by the benchmark drivers: sizes on the command line, peak memory, and the machine's facts."""

from __future__ import annotations

import contextlib
import os
import platform
import resource
import sys
from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class Part:
    """One measured comparison: its markdown (tables and the notes that read them) and its headline figures, one
    sentence each, for the summary at the top of BENCHMARKS.md."""

    text: str
    headline: list[str] = field(default_factory=list)


def parse_size(text: str) -> tuple[int, int]:
    """``"4096"`` -> (4096, 4096); ``"8192x4096"`` -> (8192, 4096)."""
    w, _, h = text.lower().partition("x")
    return int(w), int(h or w)


def peak_rss_mb() -> float:
    """This process's peak resident set size in MiB (VmHWM on Linux; ru_maxrss elsewhere)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 2**20 if sys.platform == "darwin" else rss / 1024


def host() -> str:
    """CPUs, CPU model, RAM, OS and Python: the part of a result's provenance that is not a library version."""
    mem = "?"
    with contextlib.suppress(OSError, StopIteration):
        kb = next(int(x.split()[1]) for x in Path("/proc/meminfo").read_text().splitlines() if x.startswith("MemTotal"))
        mem = f"{kb / 2**20:.1f} GiB"
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError, StopIteration):
        cpu = next(
            x.split(":", 1)[1].strip()
            for x in Path("/proc/cpuinfo").read_text().splitlines()
            if x.startswith("model name")
        )
    return (
        f"{os.cpu_count()} CPUs ({cpu}), {mem} RAM, {platform.system()} {platform.release()}; "
        f"Python {platform.python_version()}"
    )
