"""The crash-safe work folder of a run: what is committed survives a kill, so ``--resume`` redoes only the rest and
still gives the same bytes.

Layout of ``<out>.partial.d/``: ``run.json`` (what the run was started with: a resume must match it) and one file per
finished row, ``<kind>-NNNNNN.npz``, written under a temporary name and renamed once complete: a row file that
exists is complete. Rows are committed in order within a process's share, so what a share has done is the count of
its leading row files. Two layouts: :class:`BlockFolder` (segmentation: a block row of the output per file, written
block by block) and :class:`RecordFolder` (detection: one record of arrays per tile row).
"""

from __future__ import annotations

import bisect
import contextlib
import copy
import itertools
import json
import os
import shutil
import zipfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

from densevision.engine.finishing import Follow
from densevision.errors import ConfigError, InvalidRegionError, OutputError
from densevision.io.atomic import WRITE_ERRORS, disk_errors, remove_quietly, replacing, write_json

_Folder = TypeVar("_Folder", bound="WorkFolder")


class WorkFolder:
    """``rows`` numbered row files of one run in ``root``, with the run's ``fingerprint``: an existing folder is
    continued only with ``resume=True`` and the same fingerprint."""

    kind = "row"

    def __init__(self, root: Path, fingerprint: dict[str, Any], *, resume: bool, rows: int) -> None:
        self.root, self.rows = root, rows
        self.follow: Follow | None = None  # set in a finishing process that reads rows as they are committed
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
            with disk_errors(root):
                root.mkdir()
                write_json(meta, expected)

    def path(self, k: int) -> Path:
        return self.root / f"{self.kind}-{k:06d}.npz"

    def partial(self, k: int) -> Path:
        return self.root / f"{self.kind}-{k:06d}.npz.partial"

    def done(self, start: int = 0) -> int:
        """How many consecutive rows from row ``start`` on are finished."""
        k = start
        while k < self.rows and self.path(k).is_file():
            k += 1
        return k - start

    def following(self: _Folder, follow: Follow) -> _Folder:
        """This folder as a finishing process beside the prediction reads it (see
        :mod:`densevision.engine.finishing`): reading a row waits until it is committed."""
        view = copy.copy(self)
        view.follow = follow
        return view

    def _readable(self, k: int) -> Path:
        """Row ``k``'s file, once it is committed (at once unless following)."""
        path = self.path(k)
        if self.follow is not None:
            self.follow.wait_for(path)
        return path

    def wait_until_complete(self) -> None:
        """Return once every row is committed and the outputs built from them may go into place (following: once
        the predicting process says so)."""
        if self.follow is not None:
            self.follow.wait_for_commit()
        elif self.done() != self.rows:
            raise ConfigError(
                f"{self.root}: only {self.done()} of {self.rows} rows are finished; run again with --resume"
            )

    def close(self) -> None:
        """Let go of rows not complete (an interrupted run: they are redone on resume)."""

    def remove(self) -> None:
        self.close()
        shutil.rmtree(self.root)


class RecordFolder(WorkFolder):
    """One record of arrays per tile row (e.g. the row's raw detections)."""

    def put(self, k: int, arrays: dict[str, np.ndarray]) -> None:
        """Commit row ``k``'s record."""
        with disk_errors(self.partial(k)), replacing(self.path(k)) as tmp, tmp.open("wb") as f:
            np.savez_compressed(f, **arrays)  # type: ignore[arg-type]

    def get(self, k: int) -> dict[str, np.ndarray]:
        """Row ``k``'s arrays, read into memory."""
        with np.load(self._readable(k)) as f:
            return {name: f[name] for name in f.files}


class BlockFolder(WorkFolder):
    """Finished blocks of one run's output, one file per block row.

    The output is cut into blocks by the edges ``rows`` and ``cols`` (from 0 to the height / width; e.g. the grid's,
    :func:`densevision.stitch.segmentation.block_edges`): block row ``k`` is rows ``[rows[k], rows[k + 1])``, block
    ``(k, c)`` its columns ``[cols[c], cols[c + 1])``. :meth:`put` appends a block to its row's file, compressed as
    it comes; the row is committed (renamed into place) when its last block is in. Memory: the block being
    compressed, never a whole block row.
    """

    kind = "blocks"

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
        super().__init__(root, fingerprint, resume=resume, rows=len(rows) - 1)
        self.row_edges, self.col_edges = list(rows), list(cols)
        self._open: dict[int, tuple[zipfile.ZipFile, set[int]]] = {}  # block row -> (its temporary file, blocks in)
        self._failed: str | None = None  # why a block could not be written

    def put(self, y0: int, x0: int, classes: np.ndarray, probs: np.ndarray | None = None) -> None:
        """Add the block at ``(x0, y0)``: ``classes`` ``h x w``, ``probs`` ``h x w x C`` or None. Commits its block
        row when this was the row's last block."""
        rows, cols = self.row_edges, self.col_edges
        k, c = bisect.bisect_right(rows, y0) - 1, bisect.bisect_right(cols, x0) - 1
        if not (0 <= k < self.rows and 0 <= c < len(cols) - 1) or (y0, x0) != (rows[k], cols[c]):
            raise InvalidRegionError(f"{self.root}: ({x0}, {y0}) is not the corner of a block of the work folder")
        shape = (rows[k + 1] - y0, cols[c + 1] - x0)
        if classes.shape != shape or (probs is not None and probs.shape[:2] != shape):
            raise InvalidRegionError(
                f"{self.root}: block ({k}, {c}) is {shape[1]} x {shape[0]} pixels, got arrays of shape "
                f"{classes.shape}" + (f" and {probs.shape}" if probs is not None else "")
            )
        if self._failed is not None:
            raise OutputError(
                f"{self.root}: an earlier block could not be written ({self._failed}); run again with --resume"
            )
        try:
            with disk_errors(self.partial(k)):
                self._put(k, c, classes, probs)
        except OutputError as e:
            # The row's file is broken: drop it (its blocks are redone on resume) and refuse further blocks.
            self._failed = " ".join(str(e).split()) or type(e).__name__
            entry = self._open.pop(k, None)
            if entry is not None:
                with contextlib.suppress(*WRITE_ERRORS):
                    entry[0].close()
            remove_quietly(self.partial(k))
            raise

    def _put(self, k: int, c: int, classes: np.ndarray, probs: np.ndarray | None) -> None:
        cols = self.col_edges
        if k not in self._open:
            if self.path(k).is_file():
                raise InvalidRegionError(
                    f"{self.root}: block ({k}, {c}) was put twice: block row {k} is committed already"
                )
            # Level 1: the work folder is read once and deleted; class maps compress well at any level.
            zf = zipfile.ZipFile(self.partial(k), "w", zipfile.ZIP_DEFLATED, compresslevel=1)
            self._open[k] = (zf, set())
        zf, blocks = self._open[k]
        if c in blocks:
            raise InvalidRegionError(f"{self.root}: block ({k}, {c}) was put twice")
        blocks.add(c)
        arrays = {f"classes-{c:06d}": classes} | ({f"probs-{c:06d}": probs} if probs is not None else {})
        for name, a in arrays.items():
            entry: str | zipfile.ZipInfo = name + ".npy"
            # Float probabilities barely deflate (softmax: to 91 % at 21 MB/s, level 1): stored as they are.
            if a.dtype.kind == "f":
                entry = zipfile.ZipInfo(name + ".npy")
                entry.compress_type = zipfile.ZIP_STORED
            with zf.open(entry, "w", force_zip64=True) as f:
                np.lib.format.write_array(f, np.ascontiguousarray(a), allow_pickle=False)
        if len(blocks) == len(cols) - 1:
            del self._open[k]
            zf.close()
            os.replace(self.partial(k), self.path(k))

    def close(self) -> None:
        for zf, _ in self._open.values():
            with contextlib.suppress(*WRITE_ERRORS):  # an unfinished row: redone on resume anyway
                zf.close()
        self._open.clear()

    def blocks(
        self, columns: tuple[int, int] | None = None
    ) -> Iterator[tuple[int, int, np.ndarray, np.ndarray | None]]:
        """``(y0, x0, classes, probs)`` of the blocks of every finished block row, top to bottom, left to
        right, only those of block columns ``[a, b)`` with ``columns=(a, b)``; one block in memory at a time.
        Following: every block row, each once it is committed."""
        a, b = columns if columns is not None else (0, len(self.col_edges) - 1)
        for k in range(self.rows if self.follow is not None else self.done()):
            with np.load(self._readable(k)) as f:
                for c in range(a, b):
                    probs = f.get(f"probs-{c:06d}")
                    yield self.row_edges[k], self.col_edges[c], f[f"classes-{c:06d}"], probs
