"""How a run joins its processes: alone ("none"), or as one rank of a ``torchrun`` job ("pytorch").

mmengine's pytorch launcher assumes GPUs: it calls ``torch.cuda.set_device`` and wraps the model in DDP with
``device_ids``. On a machine without CUDA :func:`configure_launcher` joins the process group itself with gloo (as
:func:`densevision.engine.distributed.init_distributed` does for inference) and has the model wrapped without
device ids, so the same ``torchrun ... --launcher pytorch`` command trains on CPU-only machines and in the tests.
"""

from __future__ import annotations

import os
from typing import Any

from densevision.errors import ConfigError

LAUNCHERS = ("none", "pytorch")


def configure_launcher(cfg: Any, launcher: str) -> None:
    """Set ``cfg``'s launcher; under torchrun without CUDA, join the gloo group and wrap DDP for the CPU."""
    import torch

    if launcher not in LAUNCHERS:
        raise ConfigError(f"launcher must be one of {', '.join(map(repr, LAUNCHERS))}, got {launcher!r}")
    cfg.launcher = launcher
    if launcher == "none":
        return
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        raise ConfigError(
            "--launcher pytorch needs the environment torchrun sets (RANK, WORLD_SIZE); start with torchrun"
        )
    if torch.cuda.is_available():
        return
    from densevision.engine.distributed import init_distributed

    cfg.env_cfg.dist_cfg = dict(backend="gloo")
    init_distributed(torch.device("cpu"))
    cfg.model_wrapper_cfg = dict(
        type="MMDistributedDataParallel",
        device_ids=None,
        broadcast_buffers=False,
        find_unused_parameters=bool(cfg.get("find_unused_parameters", False)),
    )


def is_main_process() -> bool:
    """Rank 0 of the job (True outside one): the process that reports."""
    from mmengine.dist import get_rank

    return bool(get_rank() == 0)
