"""Running one image on several processes (``torchrun``): each rank predicts a contiguous share of the tile rows.

Rows of the output are independent once their tile rows are known (see :mod:`densevision.engine.workdir`), so ranks
need no exchange of predictions: each commits its rows to the shared work folder, and rank 0 writes the outputs.
"""

from __future__ import annotations

import os
from datetime import timedelta

import numpy as np
import torch
import torch.distributed as dist


def init_distributed(device: torch.device) -> tuple[int, int]:
    """``(rank, world_size)``; joins the process group that ``torchrun`` describes in the environment
    (gloo on the CPU, nccl on GPUs), or ``(0, 1)`` outside torchrun."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend, timeout=timedelta(hours=6))  # slow ranks wait at barriers, not fail
    return dist.get_rank(), dist.get_world_size()


def barrier(world: int) -> None:
    if world > 1:
        dist.barrier()


def split_contiguous(weights: np.ndarray, parts: int) -> list[tuple[int, int]]:
    """Split ``range(len(weights))`` into ``parts`` contiguous ``[a, b)`` ranges of about equal total weight
    (each cut where the running total crosses ``i / parts`` of the sum)."""
    n = len(weights)
    total = np.cumsum(np.asarray(weights, dtype=np.float64) + 1e-9)  # +eps: empty rows still get spread
    cuts = [0] + [int(np.searchsorted(total, total[-1] * i / parts)) for i in range(1, parts)] + [n]
    return [(cuts[i], max(cuts[i], cuts[i + 1])) for i in range(parts)]
