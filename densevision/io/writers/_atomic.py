"""Crash-safe output files: work goes to ``<final>.partial`` beside the final path and is renamed on success."""

from __future__ import annotations

import abc
import contextlib
import os
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

from densevision.errors import OutputError


def sibling(path: Path, suffix: str) -> Path:
    """``path`` with ``suffix`` appended to its name (``out.tif`` -> ``out.tif.partial``): same directory, so
    a rename onto ``path`` is atomic."""
    return path.with_name(path.name + suffix)


def check_output_path(path: str | os.PathLike[str]) -> Path:
    """Return ``path`` as a Path after checking that a file can be created there.

    Raises:
        OutputError: the path is a directory, its directory does not exist, or that directory is not writable.
    """
    p = Path(path)
    if p.is_dir():
        raise OutputError(f"{p}: is a directory; pass the output file path (e.g. {p / 'result.tif'})")
    parent = p.parent
    if parent.exists() and not parent.is_dir():
        raise OutputError(f"{p}: {parent} is a file, not a directory; choose another -o")
    if not parent.is_dir():
        raise OutputError(f"{p}: the output directory {parent} does not exist; create it first or choose another -o")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise OutputError(f"{p}: the output directory {parent} is not writable; choose another -o or fix permissions")
    return p


def remove_quietly(path: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        path.unlink()


def jsonable(value: Any) -> Any:
    """``json.dumps`` fallback for numpy scalars and arrays found in properties and measurements."""
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    raise TypeError(f"{type(value).__name__} is not JSON serializable; pass numbers, strings, lists or dicts")


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

    def _open_error(self, e: OSError) -> OutputError:
        return OutputError(f"{self.path}: cannot create the output file {self.partial} ({e}); check the path")

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
