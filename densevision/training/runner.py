"""mmengine's Runner on a resolved config: the run's settings written in, training and evaluation, and what they
report back.

The config arrives resolved against its data (:func:`densevision.training.data.resolve_data`). Here it takes the
run's settings (:class:`TrainSettings`: work dir, resume, schedule, loaders, seed, mixed precision, launcher), then
the Runner is built (with a name of its own per run: mmengine keeps loggers and message hubs globally by name) and
trains or tests. Training reports the loss and time per iteration from the Runner's message hub, the last
validation metrics and the last checkpoint; evaluation loads the weights strictly first, so a checkpoint of
another model stops with the keys that differ instead of mmengine's warning.
"""

from __future__ import annotations

import itertools
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from densevision.errors import CheckpointError, ConfigError, OutputError
from densevision.training.config import SPLITS
from densevision.training.launcher import configure_launcher
from densevision.training.schedule import compress_schedule, set_intervals


@dataclass(frozen=True)
class TrainSettings:
    """How a training run goes besides its config and data; None keeps the config's value.

    ``resume``: True continues from the work dir's last checkpoint, a path from that checkpoint. ``max_iters``:
    that many iterations on the compressed schedule (:mod:`densevision.training.schedule`). Intervals count in the
    loop's units (iterations, or epochs of an epoch-based config); ``batch_size`` is per process.
    """

    work_dir: Path
    resume: bool | Path = False
    amp: bool = False
    launcher: str = "none"
    max_iters: int | None = None
    val_interval: int | None = None
    checkpoint_interval: int | None = None
    log_interval: int | None = None
    num_workers: int | None = None
    batch_size: int | None = None
    seed: int | None = None


def training_splits(cfg: Any) -> list[str]:
    """The splits a training run reads: train, and val when the config validates."""
    return ["train", "val"] if cfg.get("val_cfg") else ["train"]


def default_work_dir(config: str | os.PathLike[str]) -> Path:
    """``work_dirs/<config name>``, as OpenMMLab's tools choose it."""
    return Path("work_dirs") / Path(config).stem


def _set_workers(loader: Any, num_workers: int) -> None:
    loader["num_workers"] = num_workers
    loader["persistent_workers"] = num_workers > 0


def _configure_resume(cfg: Any, work: Path, resume: Path | None) -> None:
    """Continue from ``resume``, or (None) from the work dir's last checkpoint."""
    if resume is None:
        from mmengine.runner import find_latest_checkpoint

        if find_latest_checkpoint(str(work)) is None:
            raise CheckpointError(f"{work}: no checkpoint to resume from (no last_checkpoint); drop --resume")
    elif not resume.is_file():
        raise CheckpointError(f"{resume}: no such checkpoint to resume from; check the --resume path")
    cfg.load_from = None if resume is None else str(resume)
    cfg.resume = True


def _configure_training(cfg: Any, settings: TrainSettings) -> None:
    """Write ``settings`` into ``cfg`` (in place); refuses what cannot run here before anything is built."""
    import torch

    cfg.work_dir = str(settings.work_dir)
    if settings.max_iters is not None:
        compress_schedule(cfg, settings.max_iters)
    set_intervals(
        cfg,
        val_interval=settings.val_interval,
        checkpoint_interval=settings.checkpoint_interval,
        log_interval=settings.log_interval,
    )
    for key in SPLITS.values():
        loader = cfg.get(key)
        if not loader:
            continue
        if settings.num_workers is not None:
            _set_workers(loader, settings.num_workers)
        if settings.batch_size is not None and key == "train_dataloader":
            loader["batch_size"] = settings.batch_size
    if settings.seed is not None:
        cfg.randomness = dict(seed=settings.seed, deterministic=False)
    if settings.amp:
        if not torch.cuda.is_available():
            raise ConfigError("--amp needs a CUDA GPU: mmengine's AmpOptimWrapper does not run on the CPU")
        cfg.optim_wrapper["type"] = "AmpOptimWrapper"
        cfg.optim_wrapper.setdefault("loss_scale", "dynamic")
    configure_launcher(cfg, settings.launcher)
    if settings.resume:
        _configure_resume(cfg, settings.work_dir, settings.resume if isinstance(settings.resume, Path) else None)


_RUNS = itertools.count(1)


def build_runner(cfg: Any) -> Any:
    """mmengine's Runner (or the config's ``runner_type``) for ``cfg``; a type missing from a registry is a
    :class:`ConfigError`."""
    from mmengine.registry import RUNNERS
    from mmengine.runner import Runner

    from densevision.compat import patch_mmengine

    patch_mmengine()
    if cfg.get("experiment_name") is None and cfg.get("launcher", "none") == "none":
        # mmengine names it <config>_<second>; a second run of the config in the same second would reuse the first
        # run's logger (and log into its file), message hub and visualizer, which are global by that name.
        cfg.experiment_name = f"{Path(cfg.filename).stem}_{time.strftime('%Y%m%d_%H%M%S')}_{next(_RUNS)}"
    try:
        return Runner.from_cfg(cfg) if "runner_type" not in cfg else RUNNERS.build(cfg)
    except KeyError as e:  # "X is not in the model registry" and friends
        raise ConfigError(f"{cfg.filename}: {e.args[0] if e.args else e}") from e


def _history(runner: Any, key: str) -> list[float]:
    hub = runner.message_hub
    if key not in hub.log_scalars:
        return []
    values, _counts = hub.get_scalar(key).data
    return [float(v) for v in values]


def fit(cfg: Any, settings: TrainSettings) -> dict[str, Any]:
    """Train ``cfg`` (resolved against its data) as ``settings`` say; what cannot run here (``--amp`` without a GPU,
    ``--launcher pytorch`` outside torchrun, nothing to resume from) is refused before the work dir is made.

    Returns:
        ``work_dir``, ``config`` (the resolved config the Runner saved there), ``checkpoint`` (the last one),
        ``iterations`` done, ``losses`` and ``iteration_seconds`` per iteration (resumed runs included), and
        ``metrics`` of the last validation (empty without one).
    """
    _configure_training(cfg, settings)
    work = settings.work_dir
    try:
        work.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise OutputError(f"{work}: cannot create the work dir ({e.strerror}); choose another --work-dir") from e
    runner = build_runner(cfg)
    runner.train()
    last = work / "last_checkpoint"
    hub = runner.message_hub
    return {
        "work_dir": str(work),
        "config": str(work / Path(cfg.filename).name),
        "checkpoint": last.read_text().strip() if last.is_file() else None,
        "iterations": int(runner.iter),
        "losses": _history(runner, "train/loss"),
        "iteration_seconds": _history(runner, "train/time"),
        "metrics": {
            k[len("val/") :]: float(hub.get_scalar(k).current())
            for k in hub.log_scalars
            if k.startswith("val/") and k not in ("val/time", "val/data_time")
        },
    }


def evaluate(
    cfg: Any,
    checkpoint: str | os.PathLike[str],
    *,
    work_dir: str | os.PathLike[str],
    num_workers: int | None = None,
    launcher: str = "none",
) -> dict[str, float]:
    """Run ``cfg``'s test loop (resolved for its test split) on ``checkpoint``'s weights, loaded strictly."""
    cfg.work_dir = str(work_dir)
    if num_workers is not None:
        _set_workers(cfg.test_dataloader, num_workers)
    configure_launcher(cfg, launcher)
    cfg.load_from = None
    runner = build_runner(cfg)
    try:
        runner.load_checkpoint(str(checkpoint), map_location="cpu", strict=True)
    except RuntimeError as e:  # mmengine lists the missing / unexpected / mis-shaped keys
        raise CheckpointError(
            f"{checkpoint}: does not fit the model of {cfg.filename} ({' '.join(str(e).split())[:400]}); "
            "use the config saved beside the checkpoint in its work dir"
        ) from e
    return {k: float(v) for k, v in runner.test().items()}
