"""Running one image on several processes (``torchrun``): each rank predicts a contiguous share of the tile rows.

Rows of the output are independent once their tile rows are known (see :mod:`densevision.engine.workdir`), so ranks
need no exchange of predictions: each commits its rows to the shared work folder, and rank 0 writes the outputs.
"""

from __future__ import annotations

import atexit
import os
from collections.abc import Callable
from datetime import timedelta
from typing import TypeVar

import numpy as np
import torch
import torch.distributed as dist

from densevision.errors import OtherRankError

T = TypeVar("T")


def init_distributed(device: torch.device) -> tuple[int, int]:
    """``(rank, world_size)``; joins the process group that ``torchrun`` describes in the environment
    (gloo on the CPU, nccl on GPUs), or ``(0, 1)`` outside torchrun."""
    if device.type == "cuda":
        # The rank's own GPU is the current one: nccl, pinned memory and CUDA events use it, not GPU 0.
        torch.cuda.set_device(device)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend, timeout=timedelta(hours=6))  # slow ranks wait at barriers, not fail
        # Shut the group down before the interpreter tears its modules down, as torch asks: otherwise it goes in
        # finalisation. A rank > 0 (done first: rank 0 writes the outputs) once aborted there or near it
        # ("terminate called without an active exception", one full test suite; not reproduced in 7 reruns).
        atexit.register(_destroy_process_group)
    return dist.get_rank(), dist.get_world_size()


def _destroy_process_group() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def on_every_rank(world: int, step: Callable[[], T]) -> T:
    """``step()`` on this rank, then a barrier that also tells every rank whether it succeeded everywhere: where it
    raised, that rank raises its error and the others :class:`OtherRankError`, instead of one rank stopping while
    the rest wait at the next barrier for as long as the process group's timeout."""
    error: BaseException | None = None
    result: T | None = None
    try:
        result = step()
    except Exception as e:
        error = e
    if world > 1:
        on = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
        ok = torch.tensor([0 if error else 1], device=on)
        dist.all_reduce(ok, op=dist.ReduceOp.MIN)
        if error is None and not ok.item():
            rank = int(os.environ.get("RANK", "0"))
            raise OtherRankError(f"another rank of this run failed (see its log beside the output); rank {rank} stops")
    if error is not None:
        raise error
    return result  # type: ignore[return-value]


def split_contiguous(weights: np.ndarray, parts: int) -> list[tuple[int, int]]:
    """Split ``range(len(weights))`` into ``parts`` contiguous ``[a, b)`` ranges of about equal total weight
    (each cut where the running total crosses ``i / parts`` of the sum)."""
    n = len(weights)
    total = np.cumsum(np.asarray(weights, dtype=np.float64) + 1e-9)  # +eps: empty rows still get spread
    cuts = [0] + [int(np.searchsorted(total, total[-1] * i / parts)) for i in range(1, parts)] + [n]
    return [(cuts[i], max(cuts[i], cuts[i + 1])) for i in range(parts)]
