"""The crash-safe work folder of a run: what is committed survives a kill, so ``--resume`` redoes only the rest and
still gives the same bytes.

Layout of ``<out>.partial.d/``: ``run.json`` (what the run was started with: a resume must match it) and one file per
finished row, ``<kind>-NNNNNN.npz`` (for a segmentation row with probabilities also ``probs-NNNNNN.npy``, renamed
first), written under a temporary name and renamed once complete: a row file that exists is complete. Rows are
committed in order within a process's share, so what a share has done is the count of its leading row files. Two
layouts: :class:`BlockFolder` (segmentation: a block row of the output per file, written block by block) and
:class:`RecordFolder` (detection: one record of arrays per tile row).
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
from typing import Any, BinaryIO, TypeVar

import numpy as np

from densevision.engine.finishing import Follow
from densevision.errors import ConfigError, InvalidRegionError, OutputError
from densevision.io.atomic import WRITE_ERRORS, disk_errors, remove_quietly, replacing, sibling, write_json

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
    """Finished blocks of one run's output, one file per block row (and one more for its probabilities).

    The output is cut into blocks by the edges ``rows`` and ``cols`` (from 0 to the height / width; e.g. the grid's,
    :func:`densevision.stitch.segmentation.block_edges`): block row ``k`` is rows ``[rows[k], rows[k + 1])``, block
    ``(k, c)`` its columns ``[cols[c], cols[c + 1])``. :meth:`put` adds a block to its row's files as it comes: the
    class indices deflated into ``blocks-NNNNNN.npz``; probabilities, which barely deflate (softmax: to 91 % at
    21 MB/s, level 1), as they are into ``probs-NNNNNN.npy``, one flat array of the row's blocks one after the other,
    each ``C x h x w`` (band-sequential, as the stitcher makes them and the GeoTIFF stores them): written with one
    system call a block, read back memory-mapped, never copied through a zip member. The row is committed (its
    ``.npy`` renamed into place, then its ``.npz``) when its last block is in: a row whose ``.npz`` exists is
    complete. Memory: the block being compressed, never a whole block row.
    """

    kind = "blocks"
    #: The files' layout, part of the fingerprint: a folder written in another layout is not resumed.
    layout = "npz class indices, npy band-sequential probabilities"

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
        super().__init__(root, {**fingerprint, "work_layout": self.layout}, resume=resume, rows=len(rows) - 1)
        self.row_edges, self.col_edges = list(rows), list(cols)
        self._open: dict[int, _OpenRow] = {}  # block row -> its temporary files and the blocks in them
        self._failed: str | None = None  # why a block could not be written

    def probs_path(self, k: int) -> Path:
        return self.root / f"probs-{k:06d}.npy"

    def put(self, y0: int, x0: int, classes: np.ndarray, probs: np.ndarray | None = None) -> None:
        """Add the block at ``(x0, y0)``: ``classes`` ``h x w``, ``probs`` ``C x h x w`` or None (the same for every
        block of a row). Commits its block row when this was the row's last block."""
        rows, cols = self.row_edges, self.col_edges
        k, c = bisect.bisect_right(rows, y0) - 1, bisect.bisect_right(cols, x0) - 1
        if not (0 <= k < self.rows and 0 <= c < len(cols) - 1) or (y0, x0) != (rows[k], cols[c]):
            raise InvalidRegionError(f"{self.root}: ({x0}, {y0}) is not the corner of a block of the work folder")
        shape = (rows[k + 1] - y0, cols[c + 1] - x0)
        if classes.shape != shape or (probs is not None and (probs.ndim != 3 or probs.shape[1:] != shape)):
            raise InvalidRegionError(
                f"{self.root}: block ({k}, {c}) is {shape[1]} x {shape[0]} pixels, got arrays of shape "
                f"{classes.shape}" + (f" and {probs.shape} (C x h x w)" if probs is not None else "")
            )
        if self._failed is not None:
            raise OutputError(
                f"{self.root}: an earlier block could not be written ({self._failed}); run again with --resume"
            )
        try:
            with disk_errors(self.partial(k)):
                self._put(k, c, classes, probs)
        except OutputError as e:
            # The row's files are broken: drop them (their blocks are redone on resume) and refuse further blocks.
            self._failed = " ".join(str(e).split()) or type(e).__name__
            row = self._open.pop(k, None)
            if row is not None:
                with contextlib.suppress(*WRITE_ERRORS):  # closing may fail the same way: the error is the first
                    row.close()
            remove_quietly(self.partial(k))
            remove_quietly(sibling(self.probs_path(k), ".partial"))
            raise

    def _put(self, k: int, c: int, classes: np.ndarray, probs: np.ndarray | None) -> None:
        cols = self.col_edges
        row = self._open.get(k)
        if row is None:
            if self.path(k).is_file():
                raise InvalidRegionError(
                    f"{self.root}: block ({k}, {c}) was put twice: block row {k} is committed already"
                )
            # Level 1: the work folder is read once and deleted; class maps compress well at any level.
            zf = zipfile.ZipFile(self.partial(k), "w", zipfile.ZIP_DEFLATED, compresslevel=1)
            row = self._open[k] = _OpenRow(zf)
            if probs is not None:
                height, width = self.row_edges[k + 1] - self.row_edges[k], cols[-1]
                row.start_probs(sibling(self.probs_path(k), ".partial"), probs.dtype, probs.shape[0] * height * width)
        if c in row.blocks:
            raise InvalidRegionError(f"{self.root}: block ({k}, {c}) was put twice")
        if (probs is None) != (row.probs is None):
            raise InvalidRegionError(f"{self.root}: block ({k}, {c}): give probabilities for every block or none")
        row.blocks.add(c)
        with row.zf.open(f"classes-{c:06d}.npy", "w", force_zip64=True) as f:
            np.lib.format.write_array(f, np.ascontiguousarray(classes), allow_pickle=False)
        if probs is not None:
            # Block c starts after the blocks to its left: C x h x cols[c] values.
            row.write_probs(np.ascontiguousarray(probs, dtype=row.dtype), probs.shape[0] * probs.shape[1] * cols[c])
        if len(row.blocks) == len(cols) - 1:
            del self._open[k]
            row.close()
            if probs is not None:  # before the row's .npz: a committed row has its probabilities
                os.replace(sibling(self.probs_path(k), ".partial"), self.probs_path(k))
            os.replace(self.partial(k), self.path(k))

    def close(self) -> None:
        for row in self._open.values():
            with contextlib.suppress(*WRITE_ERRORS):  # an unfinished row: redone on resume anyway
                row.close()
        self._open.clear()

    def blocks(
        self, columns: tuple[int, int] | None = None
    ) -> Iterator[tuple[int, int, np.ndarray, np.ndarray | None]]:
        """``(y0, x0, classes, probs)`` of the blocks of every finished block row, top to bottom, left to
        right, only those of block columns ``[a, b)`` with ``columns=(a, b)``; one block in memory at a time (the
        probabilities: read-only views of the memory-mapped file). Following: every block row, each once it is
        committed."""
        a, b = columns if columns is not None else (0, len(self.col_edges) - 1)
        cols = self.col_edges
        for k in range(self.rows if self.follow is not None else self.done()):
            h = self.row_edges[k + 1] - self.row_edges[k]
            with np.load(self._readable(k)) as f:
                flat = np.load(self.probs_path(k), mmap_mode="r") if self.probs_path(k).is_file() else None
                bands = None if flat is None else flat.size // (h * cols[-1])
                for c in range(a, b):
                    w, probs = cols[c + 1] - cols[c], None
                    if flat is not None and bands is not None:
                        start = bands * h * cols[c]
                        probs = flat[start : start + bands * h * w].reshape(bands, h, w)
                    yield self.row_edges[k], cols[c], f[f"classes-{c:06d}"], probs


class _OpenRow:
    """A block row being written: its ``.npz`` of class indices, its ``.npy`` of probabilities (a flat array of
    ``size`` values of ``dtype``, block after block) and the blocks in them."""

    def __init__(self, zf: zipfile.ZipFile) -> None:
        self.zf = zf
        self.blocks: set[int] = set()
        self.probs: BinaryIO | None = None
        self.dtype = np.dtype(np.float32)
        self._data = 0  # where the values start, after the .npy header

    def start_probs(self, path: Path, dtype: np.dtype, size: int) -> None:
        self.dtype = np.dtype(dtype)
        self.probs = open(path, "wb")  # noqa: SIM115 (closed by close)
        header = {"descr": np.lib.format.dtype_to_descr(self.dtype), "fortran_order": False, "shape": (size,)}
        np.lib.format.write_array_header_1_0(self.probs, header)
        self._data = self.probs.tell()  # the blocks go in wherever they fall; all of them before the row commits

    def write_probs(self, values: np.ndarray, at: int) -> None:
        """``values`` at the ``at``-th value of the flat array."""
        assert self.probs is not None
        data, offset = values.reshape(-1).view(np.uint8).data, self._data + at * self.dtype.itemsize
        while data:
            n = os.pwrite(self.probs.fileno(), data, offset)
            data, offset = data[n:], offset + n

    def close(self) -> None:
        try:
            if self.probs is not None:
                self.probs.close()
        finally:
            self.zf.close()
