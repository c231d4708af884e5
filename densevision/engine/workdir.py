"""The crash-safe work directory of a run: finished bands of output are committed one file each, so a killed run
can be resumed where it stopped and still give the same bytes.

Layout of ``<out>.partial.d/``: ``run.json`` (what the run was started with: a resume must match it) and
``band-NNNNNN.npz`` per finished band of blocks (see :class:`BandStore`), written block by block to
``band-NNNNNN.npz.partial`` and renamed once its last block is in: a band file that exists is complete. Bands finish
in order, so the done record is the count of leading band files.
"""

from __future__ import annotations

import bisect
import itertools
import json
import os
import shutil
import zipfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from densevision.errors import ConfigError, InvalidRegionError


class BandStore:
    """Finished blocks of one run's output, on disk, one ``.npz`` per band.

    The output is cut into blocks by ``rows`` and ``cols`` (edges from 0 to the height / width; e.g. the grid's,
    :func:`densevision.stitch.segmentation.block_edges`): band ``k`` is rows ``[rows[k], rows[k + 1])``, block
    ``(k, c)`` its columns ``[cols[c], cols[c + 1])``. :meth:`put` appends a block to its band's file, compressed as
    it comes; the band is committed (renamed into place) when its last block is in. Memory: the block being
    compressed, never a whole band.

    ``fingerprint`` is what the run was started with: an existing folder is continued only with ``resume=True`` and
    the same fingerprint.
    """

    def __init__(
        self,
        root: Path,
        fingerprint: dict[str, Any],
        *,
        resume: bool,
        rows: Sequence[int],
        cols: Sequence[int],
    ) -> None:
        for edges, what in ((rows, "row"), (cols, "column")):
            if len(edges) < 2 or edges[0] != 0 or any(b <= a for a, b in itertools.pairwise(edges)):
                raise ConfigError(f"{what} edges of the work folder's blocks must increase from 0, got {edges[:8]}")
        self.root = root
        self.rows, self.cols = list(rows), list(cols)
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
        self._open: dict[int, tuple[zipfile.ZipFile, set[int]]] = {}  # band -> (its temporary file, blocks in)

    @property
    def bands(self) -> int:
        return len(self.rows) - 1

    def _path(self, k: int) -> Path:
        return self.root / f"band-{k:06d}.npz"

    def done(self, start: int = 0) -> int:
        """How many consecutive bands from band ``start`` on are finished."""
        k = start
        while k < self.bands and self._path(k).is_file():
            k += 1
        return k - start

    def put(self, y0: int, x0: int, classes: np.ndarray, probs: np.ndarray | None = None) -> None:
        """Add the block at ``(x0, y0)``: ``classes`` ``h x w``, ``probs`` ``h x w x C`` or None. Commits its band
        when this was the band's last block."""
        k, c = bisect.bisect_right(self.rows, y0) - 1, bisect.bisect_right(self.cols, x0) - 1
        if not (0 <= k < self.bands and 0 <= c < len(self.cols) - 1) or (y0, x0) != (self.rows[k], self.cols[c]):
            raise InvalidRegionError(f"{self.root}: ({x0}, {y0}) is not the corner of a block of the work folder")
        shape = (self.rows[k + 1] - y0, self.cols[c + 1] - x0)
        if classes.shape != shape or (probs is not None and probs.shape[:2] != shape):
            raise InvalidRegionError(
                f"{self.root}: block ({k}, {c}) is {shape[1]} x {shape[0]} pixels, got arrays of shape "
                f"{classes.shape}" + (f" and {probs.shape}" if probs is not None else "")
            )
        if k not in self._open:
            if self._path(k).is_file():
                raise InvalidRegionError(f"{self.root}: block ({k}, {c}) was put twice: band {k} is committed already")
            # Level 1: the work folder is read once and deleted; class maps compress well at any level.
            zf = zipfile.ZipFile(self._tmp(k), "w", zipfile.ZIP_DEFLATED, compresslevel=1)
            self._open[k] = (zf, set())
        zf, blocks = self._open[k]
        if c in blocks:
            raise InvalidRegionError(f"{self.root}: block ({k}, {c}) was put twice")
        blocks.add(c)
        arrays = {f"classes-{c:06d}": classes} | ({f"probs-{c:06d}": probs} if probs is not None else {})
        for name, a in arrays.items():
            with zf.open(name + ".npy", "w", force_zip64=True) as f:
                np.lib.format.write_array(f, np.ascontiguousarray(a), allow_pickle=False)
        if len(blocks) == len(self.cols) - 1:
            del self._open[k]
            zf.close()
            os.replace(self._tmp(k), self._path(k))

    def _tmp(self, k: int) -> Path:
        return self.root / f"band-{k:06d}.npz.partial"

    def close(self) -> None:
        """Close the files of bands not complete (an interrupted run: they are redone on resume)."""
        for zf, _ in self._open.values():
            zf.close()
        self._open.clear()

    def blocks(
        self, columns: tuple[int, int] | None = None
    ) -> Iterator[tuple[int, int, np.ndarray, np.ndarray | None]]:
        """``(y0, x0, classes, probs)`` of the blocks of every finished band, band by band top to bottom, left to
        right, only those of block columns ``[a, b)`` with ``columns=(a, b)``; one block in memory at a time."""
        a, b = columns if columns is not None else (0, len(self.cols) - 1)
        for k in range(self.done()):
            with np.load(self._path(k)) as f:
                for c in range(a, b):
                    probs = f.get(f"probs-{c:06d}")
                    yield self.rows[k], self.cols[c], f[f"classes-{c:06d}"], probs

    def remove(self) -> None:
        self.close()
        shutil.rmtree(self.root)
