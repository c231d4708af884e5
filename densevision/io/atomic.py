"""Crash-safe outputs: work goes to ``<final>.partial`` beside the final path and is renamed onto it on success.

One rename in one directory is atomic, so a reader finds either the previous complete output or the new complete
one, never a half-written file; a run that fails or is killed leaves at most a ``*.partial`` sibling, which the next
write to the same path replaces.

- :func:`check_output_path`: refuse a path that cannot be written before any slow work (creating missing folders).
- :func:`replacing`: ``with replacing(path) as partial:`` write to ``partial`` (a file, or a folder the block
  creates); renamed onto ``path`` when the block ends, removed when it raises.
- :func:`write_json`: a JSON document, written through :func:`replacing`.
- :class:`AtomicWriter`: the base of the streaming writers (``densevision.io.writers``), same protocol.
"""

from __future__ import annotations

import abc
import contextlib
import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

from densevision.errors import OutputError


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
    (which is removed just before the rename). A ``.partial`` left by an interrupted earlier write is removed first.
    The folder of ``path`` must exist: check the path with :func:`check_output_path` before the slow work.

    Example::

        with replacing(out) as partial:
            image.save(partial, format="PNG")
    """
    final = Path(path)
    partial = sibling(final, ".partial")
    remove_quietly(partial)
    try:
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
