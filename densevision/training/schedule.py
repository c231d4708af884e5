"""A config's schedule compressed to a run of ``--max-iters`` iterations, keeping its shape.

A config trains for ``T`` units (``max_iters``, or ``max_epochs`` for an epoch-based loop). A run of ``N``
iterations scales every position of a learning-rate scheduler counted in the loop's units by ``f = N / T``::

    begin' = min(N, round(begin * f))      end' = min(N, round(end * f))   (an open end becomes N)
    milestones' = [min(N, round(m * f))]   T_max', step_size' = max(1, min(N, round(x * f)))

and counts it in iterations. A scheduler counted in the other unit (an iteration-based warmup of an epoch-based
config) keeps its length (``f = 1``), clipped to the run. A scheduler left with no whole iteration
(``end' <= begin'``), or a warmup shorter than :data:`MIN_WARMUP` iterations, is dropped: mmengine's warmups stop
one step short of their end factor, so a warmup compressed to an iteration or two would leave the whole run at
its start factor (1e-6) or at half the learning rate. Example: UperNet's 1500-iteration warmup of 160k iterations
becomes 19 iterations of a 2000-iteration run (1500 * 2000 / 160000 = 18.75) and is dropped in a 200-iteration one.

The loop becomes an ``IterBasedTrainLoop`` of ``N`` iterations that validates and saves a checkpoint at its end.
"""

from __future__ import annotations

import math
from typing import Any

from densevision.errors import ConfigError

# Learning-rate warmups (mmengine schedulers that ramp a factor up to 1), and the shortest one worth keeping.
WARMUPS = ("LinearLR", "ConstantLR")
MIN_WARMUP = 10


def _scaled(value: float, factor: float, cap: int) -> int:
    return min(cap, round(value * factor))


def compress_schedule(cfg: Any, max_iters: int) -> None:
    """Make ``cfg`` (edited in place) train ``max_iters`` iterations on its compressed schedule (module doc)."""
    if max_iters < 1:
        raise ConfigError(f"max_iters must be >= 1, got {max_iters}")
    loop = cfg.train_cfg
    by_epoch = "max_epochs" in loop or loop.get("type") == "EpochBasedTrainLoop"
    total = loop["max_epochs"] if by_epoch else loop["max_iters"]
    factor = max_iters / total
    schedulers = cfg.get("param_scheduler") or []
    kept = []
    for s in schedulers if isinstance(schedulers, list) else [schedulers]:
        f = factor if bool(s.get("by_epoch", True)) == by_epoch else 1.0  # mmengine's by_epoch default is True
        begin = _scaled(s.get("begin", 0), f, max_iters)
        end = s.get("end", math.inf)
        end = _scaled(end, f, max_iters) if math.isfinite(end) else max_iters
        if end <= begin:
            continue  # e.g. a 1500-iteration warmup of a 160k schedule in a 50-iteration run: no iteration left
        if s.get("type") in WARMUPS and end - begin < MIN_WARMUP:
            continue
        s["begin"], s["end"] = begin, end
        if "milestones" in s:
            s["milestones"] = [_scaled(m, f, max_iters) for m in s["milestones"]]
        for key in ("T_max", "step_size"):
            if key in s:
                s[key] = max(1, _scaled(s[key], f, max_iters))
        s["by_epoch"] = False
        s.pop("convert_to_iter_based", None)
        kept.append(s)
    cfg.param_scheduler = kept
    cfg.train_cfg = dict(type="IterBasedTrainLoop", max_iters=max_iters, val_interval=max_iters)
    cfg.log_processor = dict(cfg.get("log_processor") or {}, by_epoch=False)
    hooks = cfg.default_hooks
    hooks.checkpoint = dict(hooks.get("checkpoint") or {"type": "CheckpointHook"}, by_epoch=False, interval=max_iters)
    if "logger" in hooks:
        hooks.logger["log_metric_by_epoch"] = False


def set_intervals(
    cfg: Any, *, val_interval: int | None, checkpoint_interval: int | None, log_interval: int | None
) -> None:
    """Override how often the run validates, saves and logs (in the loop's units); None keeps the config's."""
    if val_interval is not None:
        cfg.train_cfg["val_interval"] = val_interval
    if checkpoint_interval is not None:
        cfg.default_hooks.checkpoint["interval"] = checkpoint_interval
    if log_interval is not None:
        cfg.default_hooks.logger["interval"] = log_interval
