"""Cohorts: many images in one run, each exactly once.

- :func:`collect_images`: the inputs (files, folders searched recursively, manifests) as a list of
  :class:`CohortImage`, each with its output name under the output folder and its own reading settings.
- :class:`Claims`: which image a process takes next. Under ``torchrun`` the ranks draw from one counter in
  torch.distributed's own store (the rendezvous's TCPStore, whose ``add`` is atomic), so a fast rank takes more and
  no image goes to two ranks; ``--shard I/N`` keeps every N-th image for independent processes (job arrays).
- :class:`ClaimFile`: a marker beside an image's outputs while a process works on it, refreshed by a heartbeat, so
  that a second command on the same output folder leaves the image alone; a marker whose process is gone (or
  whose heartbeat is older than :data:`CLAIM_TIMEOUT`) is taken over.
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
import json
import os
import socket
import threading
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path, PurePosixPath
from typing import Any

from densevision.errors import ConfigError

# What a folder search picks up by default: the formats densevision reads (OpenSlide, GDAL, Pillow).
IMAGE_SUFFIXES = (
    ".svs", ".tif", ".tiff", ".ndpi", ".mrxs", ".scn", ".vms", ".vmu", ".bif", ".svslide", ".jp2", ".img", ".vrt",
    ".png", ".jpg", ".jpeg",
)  # fmt: skip
MANIFEST_SUFFIXES = (".csv", ".txt", ".lst")
# Manifest columns with per-image reading settings (besides ``path`` and the optional output ``name``).
PER_IMAGE = ("mpp", "level", "bands")
HEARTBEAT = 30.0  # seconds between refreshes of a claim marker
CLAIM_TIMEOUT = 300.0  # a marker not refreshed for this long belongs to a process that is gone


@dataclass(frozen=True)
class CohortImage:
    """One image of a cohort: its ``path``, its output ``name`` (a relative POSIX path without suffix, inside the
    output folder), its own reading settings (``mpp`` / ``level`` / ``bands``, from a manifest) and where it was
    given."""

    path: Path
    name: str
    reading: dict[str, Any] = field(default_factory=dict)
    given: str = ""


def _safe_name(parts: Sequence[str]) -> str:
    """A relative output name from path parts: no root, no ``.`` / ``..``, nothing hidden, no empty parts."""
    kept = [p.lstrip(".") for p in parts if p not in ("", ".", "..", "/", "\\")]
    kept = [p for p in kept if p and ":" not in p]
    return "/".join(kept) or "image"


def _name_below(path: Path, base: Path) -> str:
    """``path``'s name relative to ``base`` without its suffix (``base/a/s.svs`` -> ``a/s``); outside ``base``, its
    file name only."""
    try:
        rel = path.relative_to(base)
    except ValueError:
        rel = Path(path.name)
    return _safe_name([*rel.parent.parts, rel.stem])


def _checked_name(name: str, where: str) -> str:
    """A manifest's explicit output name: relative, inside the output folder."""
    p = PurePosixPath(name.replace("\\", "/"))
    if p.is_absolute() or ".." in p.parts or not p.parts or (len(p.parts) > 0 and ":" in p.parts[0]):
        raise ConfigError(f"{where}: output name {name!r} must be a relative path inside the output folder")
    return _safe_name(p.with_suffix("").parts if p.suffix.lower() in IMAGE_SUFFIXES else p.parts)


def _parse_reading(row: dict[str, str], where: str) -> dict[str, Any]:
    reading: dict[str, Any] = {}
    try:
        if (row.get("mpp") or "").strip():
            reading["mpp"] = float(row["mpp"])
        if (row.get("level") or "").strip():
            reading["level"] = int(row["level"])
        if (row.get("bands") or "").strip():
            reading["bands"] = tuple(int(b) for b in row["bands"].replace(";", " ").replace(",", " ").split())
    except ValueError as e:
        raise ConfigError(f"{where}: {e}; mpp is a number, level a whole number, bands whole numbers") from None
    if "mpp" in reading and "level" in reading:
        raise ConfigError(f"{where}: give mpp or level, not both")
    return reading


def _manifest(path: Path) -> Iterator[tuple[Path, str | None, dict[str, Any], str]]:
    """``(image, explicit name, reading, where)`` per entry of a CSV (a ``path`` column) or a list (a path a line);
    relative paths are relative to the manifest's folder."""
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: cannot read the manifest ({e}); give a CSV with a path column or a list") from None
    if path.suffix.lower() == ".csv":
        rows = list(csv.DictReader(text.splitlines()))
        if rows and "path" not in rows[0]:
            raise ConfigError(f"{path}: a manifest CSV needs a 'path' column (found: {', '.join(rows[0])})")
        for i, row in enumerate(rows, start=2):
            where = f"{path}:{i}"
            if not (row.get("path") or "").strip():
                raise ConfigError(f"{where}: the path is empty")
            name = (row.get("name") or "").strip() or None
            yield path.parent / row["path"].strip(), name, _parse_reading(row, where), where
    else:
        for i, line in enumerate(text.splitlines(), start=1):
            if line.strip() and not line.lstrip().startswith("#"):
                yield path.parent / line.strip(), None, {}, f"{path}:{i}"


def collect_images(
    inputs: Iterable[str | os.PathLike[str]], out_dir: Path, *, pattern: str | None = None
) -> list[CohortImage]:
    """The images that ``inputs`` name, in order, each once (by its resolved path).

    An input is an image file; a folder, searched recursively for ``pattern`` (default: every file with a
    suffix in :data:`IMAGE_SUFFIXES`), skipping hidden files and anything inside ``out_dir``; or a manifest
    (``.csv`` with a ``path`` column and optional ``name``, ``mpp``, ``level``, ``bands`` columns; ``.txt`` /
    ``.lst`` with a path a line). Output names keep the path below the folder (or manifest) given, so two
    ``slide.svs`` in different folders do not clash; names that still clash get a short hash of their path.

    Raises:
        ConfigError: an input does not exist, a folder holds no image, a manifest is malformed, one image is given
            twice with different settings, or an output name would leave ``out_dir``.
    """
    out_root = out_dir.resolve()
    found: list[tuple[Path, str, dict[str, Any], str]] = []
    for given in inputs:
        p = Path(given)
        if p.is_dir():
            hits = sorted(p.rglob(pattern)) if pattern else sorted(p.rglob("*"))
            picked = [
                h for h in hits
                if h.is_file() and not any(part.startswith(".") for part in h.relative_to(p).parts)
                and (pattern or h.suffix.lower() in IMAGE_SUFFIXES) and not h.resolve().is_relative_to(out_root)
            ]  # fmt: skip
            if not picked:
                what = f"matching {pattern!r}" if pattern else f"with a suffix of {', '.join(IMAGE_SUFFIXES)}"
                raise ConfigError(f"{p}: no image files {what} in this folder; check the folder or give --pattern")
            found += [(h, _name_below(h, p), {}, str(p)) for h in picked]
        elif p.is_file() and p.suffix.lower() in MANIFEST_SUFFIXES:
            for listed, name, reading, where in _manifest(p):
                found.append(
                    (listed, _checked_name(name, where) if name else _name_below(listed, p.parent), reading, where)
                )
        elif p.exists() or p.is_symlink():
            found.append((p, _safe_name([p.stem]), {}, str(p)))
        else:
            raise ConfigError(f"{p}: no such file or folder; check the path")
    unique: dict[Path, CohortImage] = {}
    for path, name, reading, where in found:
        key = path.resolve()
        if key in unique:
            if unique[key].reading != reading:
                raise ConfigError(f"{where}: {path} is also given by {unique[key].given} with other settings; keep one")
            continue
        unique[key] = CohortImage(path, name, reading, where)
    clashes: dict[str, int] = {}
    for image in unique.values():
        clashes[image.name.lower()] = clashes.get(image.name.lower(), 0) + 1
    out = []
    for key, image in unique.items():
        name = image.name
        if clashes[name.lower()] > 1:  # case-insensitive: some file systems are
            name = f"{name}-{hashlib.sha1(str(key).encode()).hexdigest()[:8]}"
        if not (out_root / name).resolve().is_relative_to(out_root):  # e.g. a symlinked folder inside out_dir
            raise ConfigError(f"{image.given}: the output name {name!r} leads outside {out_dir}; rename it")
        out.append(CohortImage(image.path, name, image.reading, image.given))
    return out


def parse_shard(text: str) -> tuple[int, int]:
    """``"I/N"`` (1-based, as ``split -n l/I/N``) -> ``(I - 1, N)``."""
    try:
        i, n = (int(v) for v in text.split("/"))
    except ValueError:
        raise ConfigError(f"--shard {text}: write it as I/N, e.g. 2/8 for the second of eight parts") from None
    if not 1 <= i <= n:
        raise ConfigError(f"--shard {text}: I must be within 1..N")
    return i - 1, n


class Claims:
    """Indexes ``0 .. n - 1`` of a cohort handed out one at a time: each exactly once over the ranks of a
    ``torchrun`` (one atomic counter in its store, under ``key``), or in order in a single process."""

    def __init__(self, n: int, key: str, world: int) -> None:
        self.n, self.key, self.next = n, key, 0
        self.store = rendezvous_store() if world > 1 else None

    def __iter__(self) -> Iterator[int]:
        while True:
            if self.store is not None:
                i = int(self.store.add(self.key, 1)) - 1
            else:
                i, self.next = self.next, self.next + 1
            if i >= self.n:
                return
            yield i


def rendezvous_store() -> Any:
    """A client of the store that ``torchrun`` (or a rank-0 process group) serves at MASTER_ADDR:MASTER_PORT."""
    import torch.distributed as dist

    host, port = os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"])
    return dist.TCPStore(host, port, is_master=False, timeout=timedelta(hours=6))


def shared_value(world: int, rank: int, key: str, make: Any) -> Any:
    """``make()`` computed on rank 0 and seen by every rank (through the store), as JSON: rank 0's view of the
    file system is the cohort's. A :class:`ConfigError` raised on rank 0 is raised on every rank."""
    if world <= 1:
        return make()
    store = rendezvous_store()
    if rank == 0:
        try:
            value = {"value": make()}
        except ConfigError as e:
            value = {"error": str(e)}
        store.set(key, json.dumps(value))
    else:
        value = json.loads(store.get(key))
    if "error" in value:
        raise ConfigError(value["error"])
    return value["value"]


class ClaimFile:
    """``<output>.claim``: this process works on the image. Taken with an exclusive create; held with a heartbeat
    thread that refreshes its time; removed on release. :meth:`take` returns False when a live process holds it."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._stop = threading.Event()
        self._beat: threading.Thread | None = None

    def _stale(self) -> bool:
        try:
            held = json.loads(self.path.read_text())
            age = time.time() - self.path.stat().st_mtime
        except (OSError, ValueError):
            return True  # gone or half-written by a process that died
        if held.get("host") == socket.gethostname():
            try:
                os.kill(int(held["pid"]), 0)
            except ProcessLookupError:
                return True
            except (PermissionError, KeyError, ValueError):
                pass
        return age > CLAIM_TIMEOUT

    def held(self) -> bool:
        """A live process (maybe this one) holds the marker."""
        return self.path.exists() and not self._stale()

    def take(self) -> bool:
        mine = json.dumps({"host": socket.gethostname(), "pid": os.getpid(), "since": time.time()})
        self.path.parent.mkdir(parents=True, exist_ok=True)
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                if not self._stale():
                    return False
                with contextlib.suppress(FileNotFoundError):
                    self.path.unlink()
                continue
            with os.fdopen(fd, "w") as f:
                f.write(mine)
            self._stop.clear()
            self._beat = threading.Thread(target=self._heartbeat, daemon=True)
            self._beat.start()
            return True
        return False

    def _heartbeat(self) -> None:
        while not self._stop.wait(HEARTBEAT):
            with contextlib.suppress(OSError):
                os.utime(self.path)

    def release(self) -> None:
        self._stop.set()
        if self._beat is not None:
            self._beat.join()
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()
