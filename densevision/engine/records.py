"""A run's crash-safe work folder of numbered records: what is committed survives a kill, so ``--resume`` redoes
only the rest.

Layout of ``<out>.partial.d/``: ``run.json`` (what the run was started with: a resume must match it) and
``<kind>-NNNNNN.npz`` per finished record (written under a temporary name, then renamed: a record file that
exists is complete). Records finish in order within a process's share, so the done record of a share is the count
of its leading record files.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import numpy as np

from densevision.errors import ConfigError


class RecordFolder:
    """Numbered records of arrays for one run, on disk."""

    def __init__(self, root: Path, fingerprint: dict[str, Any], *, resume: bool, kind: str = "record") -> None:
        self.root, self.kind = root, kind
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

    def path(self, k: int) -> Path:
        return self.root / f"{self.kind}-{k:06d}.npz"

    def done(self, start: int = 0) -> int:
        """How many consecutive records from record ``start`` on are finished."""
        k = start
        while self.path(k).is_file():
            k += 1
        return k - start

    def put(self, k: int, arrays: dict[str, np.ndarray], *, compress: bool = True) -> None:
        """Commit record ``k``."""
        tmp = self.root / f"{self.kind}-{k:06d}.tmp.npz"
        save = np.savez_compressed if compress else np.savez
        save(tmp, **arrays)  # type: ignore[arg-type]
        os.replace(tmp, self.path(k))

    def get(self, k: int) -> dict[str, np.ndarray]:
        """Record ``k``'s arrays, read into memory."""
        with np.load(self.path(k)) as f:
            return {name: f[name] for name in f.files}

    def remove(self) -> None:
        shutil.rmtree(self.root)
