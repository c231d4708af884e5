"""Where the OpenMMLab stack breaks on current torch, fixed in one place.

Checkpoints: torch >= 2.6 unpickles with ``weights_only=True``, and mmengine 0.10.7 calls ``torch.load`` without
an allow-list, so real mmdet / mmseg checkpoints (numpy arrays and mmengine objects in ``meta`` and
``message_hub``) fail to load. :func:`load_checkpoint` loads them with ``weights_only=True`` and an explicit
allow-list; anything else needs an explicit, per-call ``trust=True`` (``--trust-checkpoint`` on the CLI).
:func:`patch_mmengine` routes mmengine's local-file loading (``load_checkpoint``, ``Runner.resume``,
``init_model``) through it.

Weights: :func:`load_state_dict_strictly` is the one strict load (mmdet / mmseg models, SAM, SAM's decoder in the
heads): the state dict must hold exactly the module's keys with its shapes, and the error names the missing,
unexpected and mis-shaped keys instead of torch's traceback, or mmengine's warning with ``strict=False``.
"""

from __future__ import annotations

import contextlib
import contextvars
import os
import pickle
import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from densevision.errors import CheckpointError, UnsafeCheckpointError

_SHOWN_KEYS = 6  # keys named in an error message before "and N more"

_trusted: contextvars.ContextVar[bool] = contextvars.ContextVar("densevision_trust_checkpoints", default=False)


def _numpy_globals() -> list[Any]:
    """numpy objects that plain arrays and scalars pickle through, under their numpy 1.x and 2.x names."""
    from numpy._core import multiarray  # numpy >= 2

    dtypes = [
        getattr(np.dtypes, name)
        for name in dir(np.dtypes)
        if name.endswith("DType") and name not in ("ObjectDType", "VoidDType")
    ]
    return [
        np.ndarray,
        np.dtype,
        *dtypes,
        multiarray._reconstruct,
        multiarray.scalar,
        # Checkpoints written under numpy 1.x name the same functions by their old module path.
        (multiarray._reconstruct, "numpy.core.multiarray._reconstruct"),
        (multiarray.scalar, "numpy.core.multiarray.scalar"),
    ]


def _history_buffer_getattr(obj: Any, name: str) -> Any:
    """Stands in for ``builtins.getattr``, which HistoryBuffer pickles its statistics methods through
    (``getattr(HistoryBuffer, 'min')``); any other use of getattr in a checkpoint is refused."""
    from mmengine.logging import HistoryBuffer

    if obj is HistoryBuffer and name in {"min", "max", "current", "mean", *HistoryBuffer._statistics_methods}:
        return getattr(obj, name)
    raise pickle.UnpicklingError(f"getattr({obj!r}, {name!r}) is not on densevision's allow-list")


def _mmengine_globals() -> list[Any]:
    """mmengine objects that mmengine's Runner writes into ``meta`` / ``message_hub``."""
    from mmengine.config import ConfigDict
    from mmengine.logging import HistoryBuffer

    return [HistoryBuffer, ConfigDict, (_history_buffer_getattr, "builtins.getattr")]


def allowed_globals() -> list[Any]:
    """The allow-list: everything beyond torch's own tensors and containers that a checkpoint may hold."""
    return _numpy_globals() + _mmengine_globals()


def _qualified_name(entry: Any) -> str:
    return entry[1] if isinstance(entry, tuple) else f"{entry.__module__}.{entry.__qualname__}"


def _refused_names(path: Path) -> list[str]:
    """The globals in ``path`` that are neither torch's defaults nor on the allow-list."""
    try:
        names = torch.serialization.get_unsafe_globals_in_checkpoint(path)
    except Exception:  # legacy (non-zip) format: the UnpicklingError text names the first one
        return []
    allowed = {_qualified_name(e) for e in allowed_globals()}
    return [n for n in names if n not in allowed]


def load_checkpoint(path: str | os.PathLike[str], map_location: Any = "cpu", *, trust: bool | None = None) -> Any:
    """Load a torch / mmengine checkpoint safely.

    Args:
        path: checkpoint file (``.pth``).
        map_location: as for ``torch.load``.
        trust: unpickle arbitrary objects (runs code from the file!). ``None`` takes the value set by
            :func:`trusted_checkpoints`, False by default.

    Raises:
        CheckpointError: the file is missing or is not a checkpoint.
        UnsafeCheckpointError: the file needs objects outside the allow-list; they are named in the message.
    """
    p = Path(path)
    if not p.is_file():
        raise CheckpointError(f"{p}: no such checkpoint file; check the -w/--checkpoint path")
    if trust if trust is not None else _trusted.get():
        return torch.load(p, map_location=map_location, weights_only=False)
    try:
        with torch.serialization.safe_globals(allowed_globals()):
            return torch.load(p, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        names = _refused_names(p) or re.findall(r"GLOBAL ([\w.]+)", str(e))[:1]
        raise UnsafeCheckpointError(
            f"{p}: refusing to unpickle {', '.join(names) or 'objects'} outside densevision's allow-list "
            "(a pickle can run code); pass --trust-checkpoint (trust=True) only if you trust the file's origin"
        ) from e
    except Exception as e:  # torch raises RuntimeError, EOFError, IndexError ... for non-checkpoints
        raise CheckpointError(f"{p}: not a readable torch checkpoint ({e}); re-download or re-save it") from e


def name_keys(keys: Sequence[str], limit: int = _SHOWN_KEYS) -> str:
    """The first ``limit`` of ``keys`` joined for an error message, then ``and N more``."""
    more = f" and {len(keys) - limit} more" if len(keys) > limit else ""
    return ", ".join(keys[:limit]) + more


def load_state_dict_strictly(module: torch.nn.Module, state: Mapping[str, Any], *, what: str, fix: str) -> None:
    """Load ``state`` into ``module`` when it holds exactly ``module.state_dict()``'s keys, each a tensor of the
    same shape; else raise, loading nothing.

    Raises:
        CheckpointError: ``"{what}: 2 missing keys: a, b; 1 unexpected keys: c; 1 mis-shaped: d (3,) (model (4,));
            {fix}"``, each list sorted and cut after a few keys.
    """
    expected = module.state_dict()
    missing = sorted(expected.keys() - state.keys())
    unexpected = sorted(state.keys() - expected.keys())
    shapes = [
        f"{k} {tuple(v.shape) if isinstance(v, torch.Tensor) else type(v).__name__} (model {tuple(expected[k].shape)})"
        for k, v in sorted(state.items())
        if k in expected and not (isinstance(v, torch.Tensor) and v.shape == expected[k].shape)
    ]
    problems = [
        f"{len(keys)} {label}: {name_keys(keys)}"
        for label, keys in (("missing keys", missing), ("unexpected keys", unexpected), ("mis-shaped", shapes))
        if keys
    ]
    if problems:
        raise CheckpointError(f"{what}: {'; '.join(problems)}; {fix}")
    module.load_state_dict(dict(state), strict=True)


@contextlib.contextmanager
def trusted_checkpoints(trust: bool = True) -> Iterator[None]:
    """Within this block, checkpoints load without the allow-list (what ``--trust-checkpoint`` sets)."""
    token = _trusted.set(trust)
    try:
        yield
    finally:
        _trusted.reset(token)


def _mmengine_local_loader(filename: str, map_location: Any = None) -> Any:
    return load_checkpoint(filename, map_location=map_location)


_patched = False


def patch_mmengine() -> None:
    """Make mmengine load local checkpoints through :func:`load_checkpoint`. Idempotent."""
    global _patched
    if _patched:
        return
    from mmengine.runner.checkpoint import CheckpointLoader

    register: Callable[..., Any] = CheckpointLoader.register_scheme(prefixes="", force=True)
    register(_mmengine_local_loader)
    _patched = True
