"""Crash-safe outputs: work goes to ``<final>.partial`` beside the final path and is renamed onto it on success.

One rename in one directory is atomic, so a reader finds either the previous complete output or the new complete
one, never a half-written file; a run that fails or is killed leaves at most a ``*.partial`` sibling, which the next
write to the same path replaces.

- :func:`check_output_path`: refuse a path that cannot be written before any slow work (creating missing folders).
- :func:`replacing`: ``with replacing(path) as partial:`` write to ``partial`` (a file, or a folder the block
  creates); renamed onto ``path`` when the block ends, removed when it raises.
- :func:`write_json`: a JSON document, written through :func:`replacing`.
- :class:`AtomicWriter`: the base of the streaming writers (``densevision.io.writers``), same protocol.
- :func:`disk_errors`: ``with disk_errors(path):`` around writing turns the failure of a write (``OSError``, GDAL's
  ``RasterioError`` / ``CPLE_*``) into :class:`OutputError`, and a full file system (``ENOSPC``, ``EDQUOT``, or GDAL's
  words for it, or no free space left in the folder) into :class:`DiskFullError` naming the mount point and the
  file: "no space left on device on /data (writing /data/out.tif.partial.d/blocks-000003.npz.partial): free space
  and run again with --resume".
"""

from __future__ import annotations

import abc
import contextlib
import errno
import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
from rasterio._err import CPLE_BaseError
from rasterio.errors import RasterioError

from densevision.errors import DenseVisionError, DiskFullError, OutputError

#: What a failed write raises: ``OSError`` (Python's files, tifffile, zipfile; rasterio's ``RasterioIOError`` is
#: one) and GDAL's errors that are not (``RasterioError``, ``CPLE_*``).
WRITE_ERRORS: tuple[type[BaseException], ...] = (OSError, RasterioError, CPLE_BaseError)

_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)
_FULL_WORDS = ("no space left", "disk space", "disk full", "quota exceeded", "disk quota")
#: Less free space than this in the folder written to, after a write failed: the file system is full (GDAL often
#: reports a full disk only as "Write error" or "Failed to read directory", without the errno).
NEARLY_FULL_BYTES = 1 << 20


def sibling(path: Path, suffix: str) -> Path:
    """``path`` with ``suffix`` appended to its name (``out.tif`` -> ``out.tif.partial``): same directory, so
    a rename onto ``path`` is atomic."""
    return path.with_name(path.name + suffix)


def check_output_path(path: str | os.PathLike[str]) -> Path:
    """Return ``path`` as a Path after checking that a file can be created there, creating its missing folders.

    Raises:
        OutputError: the path is a directory, a folder on the way is a file, a missing folder cannot be created,
            or the folder is not writable.
    """
    p = Path(path)
    if p.is_dir():
        raise OutputError(f"{p}: is a directory; pass the output file path (e.g. {p / 'result.tif'})")
    parent = p.parent
    existing = next(a for a in (parent, *parent.parents) if a.exists())
    if not existing.is_dir():
        raise OutputError(f"{p}: {existing} is a file, not a directory; choose another -o")
    if existing != parent:
        try:
            parent.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise OutputError(
                f"{p}: cannot create the output directory {parent} ({e.strerror or e}); choose another -o or fix "
                "permissions"
            ) from None
    if not os.access(parent, os.W_OK | os.X_OK):
        raise OutputError(f"{p}: the output directory {parent} is not writable; choose another -o or fix permissions")
    return p


def mount_point(path: str | os.PathLike[str]) -> Path:
    """The mount point of the file system holding ``path`` (or its nearest existing folder)."""
    p = Path(os.path.abspath(path))
    while not p.exists() and p != p.parent:
        p = p.parent
    while not os.path.ismount(p) and p != p.parent:
        p = p.parent
    return p


def _free_bytes(path: Path) -> int | None:
    p = Path(os.path.abspath(path))
    while not p.is_dir() and p != p.parent:
        p = p.parent
    try:
        st = os.statvfs(p)
    except OSError:
        return None
    return st.f_bavail * st.f_frsize


def disk_is_full(e: BaseException | None, path: str | os.PathLike[str]) -> bool:
    """Whether a write to ``path`` failed (with ``e``, if known) because its file system has no space left."""
    cur, seen = e, 0
    while cur is not None and seen < 5:
        if isinstance(cur, OSError) and cur.errno in _FULL_ERRNOS:
            return True
        if any(w in str(cur).lower() for w in _FULL_WORDS):
            return True
        cur, seen = cur.__cause__ or cur.__context__, seen + 1
    free = _free_bytes(Path(path))
    return free is not None and free < NEARLY_FULL_BYTES


def as_output_error(e: BaseException | None, path: str | os.PathLike[str], what: str | None = None) -> OutputError:
    """The one-line error for a failed write of ``path``: :class:`DiskFullError` when its file system is full,
    else :class:`OutputError` with the backend's words (``what`` stands in for them when ``e`` is None)."""
    if disk_is_full(e, path):
        return DiskFullError(
            f"no space left on device on {mount_point(path)} (writing {path}): free space and run again with --resume"
        )
    said = " ".join(str(e).split()) if e is not None else ""
    return OutputError(
        f"{path}: cannot write it ({said or what or 'unknown error'}); check the folder, its permissions and its "
        "free space, then run again with --resume"
    )


@contextlib.contextmanager
def disk_errors(path: str | os.PathLike[str], *, only_full: bool = False) -> Iterator[None]:
    """Turn a failed write inside the block into :func:`as_output_error`'s error for ``path``: a
    :class:`DiskFullError` when the disk is full, else an :class:`OutputError`. With ``only_full``, errors other
    than a full disk pass unchanged (for blocks that also read). A :class:`DenseVisionError` passes unchanged.

    Example::

        with disk_errors(self.partial):
            self._ds.write(block, window=window)
    """
    try:
        yield
    except DenseVisionError:
        raise
    except WRITE_ERRORS as e:
        if only_full and not disk_is_full(e, path):
            raise
        raise as_output_error(e, path) from e


def remove_quietly(path: Path) -> None:
    """Remove the file or folder at ``path``, if there is one."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


@contextlib.contextmanager
def replacing(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield ``<path>.partial`` to write the output to; when the block ends it is renamed onto ``path``, when the
    block raises (or the rename fails) it is removed and ``path`` is left as it was.

    The output may be a file or a folder (the block creates it); a folder replaces an existing folder at ``path``
    (which is removed just before the rename). A full disk inside the block is a :class:`DiskFullError`. A
    ``.partial`` left by an interrupted earlier write is removed first.
    The folder of ``path`` must exist: check the path with :func:`check_output_path` before the slow work.

    Example::

        with replacing(out) as partial:
            image.save(partial, format="PNG")
    """
    final = Path(path)
    partial = sibling(final, ".partial")
    remove_quietly(partial)
    try:
        with disk_errors(partial, only_full=True):
            yield partial
            if partial.is_dir() and final.is_dir() and not final.is_symlink():
                shutil.rmtree(final)
            os.replace(partial, final)
    except BaseException:
        remove_quietly(partial)
        raise


def jsonable(value: Any) -> Any:
    """``json.dumps`` fallback for numpy scalars and arrays found in properties and measurements."""
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    raise TypeError(f"{type(value).__name__} is not JSON serializable; pass numbers, strings, lists or dicts")


def write_json(path: str | os.PathLike[str], data: Any) -> Path:
    """Write ``data`` as indented JSON (numpy scalars and arrays as numbers and lists) that appears at ``path`` only
    when complete; returns ``path``."""
    text = json.dumps(data, indent=2, default=jsonable)  # before the file is opened: a bad value leaves nothing
    with replacing(path) as partial:
        partial.write_text(text)
    return Path(path)


_W = TypeVar("_W", bound="AtomicWriter")


class AtomicWriter(abc.ABC):
    """Base of every writer: the output is built at ``self.partial`` and renamed onto ``self.path`` by
    :meth:`close`. Leaving a ``with`` block by an exception (or calling :meth:`abort`) removes the partial file and
    leaves the final path untouched; an existing file there is replaced only by a complete new one."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = check_output_path(path)
        self.partial = sibling(self.path, ".partial")
        self._done = False

    @property
    def closed(self) -> bool:
        return self._done

    def _check_open(self) -> None:
        if self._done:
            raise OutputError(f"{self.path}: the writer is already closed; open a new writer to write again")

    def _open_error(self, e: BaseException) -> OutputError:
        return as_output_error(e, self.partial)

    @abc.abstractmethod
    def _finish(self) -> None:
        """Complete ``self.partial`` (flush, close handles); called once by :meth:`close`."""

    @abc.abstractmethod
    def _discard(self) -> None:
        """Close handles without completing; called once by :meth:`abort`. Temporary files other than
        ``self.partial`` are the subclass's to remove."""

    def close(self) -> Path:
        """Complete the output and move it to the final path; returns that path. Idempotent."""
        if self._done:
            return self.path
        try:
            with disk_errors(self.partial):
                self._finish()
                os.replace(self.partial, self.path)
        except BaseException:
            self.abort()
            raise
        self._done = True
        return self.path

    def abort(self) -> None:
        """Drop the output: close handles and remove the partial file(s). Idempotent."""
        if self._done:
            return
        self._done = True
        try:
            # Dropping the output: a failure to flush what is dropped (the disk is full) is not news.
            with contextlib.suppress(*WRITE_ERRORS):
                self._discard()
        finally:
            remove_quietly(self.partial)

    def __enter__(self: _W) -> _W:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, *exc: object) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()

    def __repr__(self) -> str:
        state = "closed" if self._done else "open"
        return f"{type(self).__name__}({str(self.path)!r}, {state})"
