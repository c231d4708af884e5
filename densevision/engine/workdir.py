"""The crash-safe work directory of a run: finished bands of output are committed one file each, so a killed run
can be resumed where it stopped and still give the same bytes.

Layout of ``<out>.partial.d/``: ``run.json`` (what the run was started with: a resume must match it) and
``band-NNNNNN.npz`` per finished band (written to a temporary name, then renamed: a band file that exists is
complete). Bands finish in order, so the done record is the count of leading band files.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from densevision.errors import ConfigError


class BandStore:
    """Finished bands of one run, on disk."""

    def __init__(self, root: Path, fingerprint: dict[str, Any], *, resume: bool) -> None:
        self.root = root
        meta = root / "run.json"
        expected = json.loads(json.dumps(fingerprint))  # normalise tuples etc. as the file holds them
        if root.exists():
            if not resume:
                raise ConfigError(
                    f"{root}: an interrupted run's work is here; pass --resume to continue it, or delete the folder "
                    "to start over"
                )
            if not meta.is_file():
                raise ConfigError(f"{root}: not a densevision work folder (no run.json); delete it to start over")
            found = json.loads(meta.read_text())
            changed = sorted(k for k in expected.keys() | found.keys() if expected.get(k) != found.get(k))
            if changed:
                raise ConfigError(
                    f"{root}: cannot resume: the run was started with other {', '.join(changed)}; use the same "
                    "input and settings, or delete the folder to start over"
                )
        else:
            root.mkdir()
            tmp = meta.with_name("run.json.tmp")
            tmp.write_text(json.dumps(expected, indent=2))
            os.replace(tmp, meta)

    def _path(self, k: int) -> Path:
        return self.root / f"band-{k:06d}.npz"

    def done(self, start: int = 0) -> int:
        """How many consecutive bands from band ``start`` on are finished."""
        k = start
        while self._path(k).is_file():
            k += 1
        return k - start

    def put(self, k: int, y0: int, classes: np.ndarray, probs: np.ndarray | None) -> None:
        """Commit band ``k`` (rows from ``y0``): ``classes`` ``h x W``, ``probs`` ``h x W x C`` or None."""
        arrays: dict[str, np.ndarray] = {"y0": np.asarray(y0), "classes": classes}
        if probs is not None:
            arrays["probs"] = probs
        tmp = self.root / f"band-{k:06d}.tmp.npz"
        np.savez_compressed(tmp, **arrays)  # type: ignore[arg-type]
        os.replace(tmp, self._path(k))

    def bands(self) -> Iterator[tuple[int, np.ndarray, np.ndarray | None]]:
        """``(y0, classes, probs)`` of every finished band, top to bottom, one in memory at a time."""
        for k in range(self.done()):
            with np.load(self._path(k)) as f:
                yield int(f["y0"]), f["classes"], f.get("probs")

    def remove(self) -> None:
        shutil.rmtree(self.root)
