"""Training and evaluation of mmdet / mmseg configs, with the data checked first: ``train(...)`` and ``test(...)``.

What ``tools/train.py``, ``tools/test.py`` and ``densevision train|test`` run (:mod:`densevision.cli.train`). Each
reads the config, resolves it against the data (:func:`densevision.training.resolve_data`: ``data_root`` for every
split, every dataset checked, the classes from the config, the data or the checkpoint, every ``num_classes``
following them) and runs mmengine's Runner (:mod:`densevision.training.runner`). Checkpoints carry the classes in
``meta.dataset_meta``, so the resolved config that the Runner saves in the work dir builds the model that the
checkpoints fit.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from densevision.errors import OutputError
from densevision.training import (
    DataReport,
    TrainSettings,
    checkpoint_classes,
    evaluate,
    fit,
    load_config,
    resolve_data,
)
from densevision.training.runner import default_work_dir, training_splits

__all__ = ["DataReport", "checkpoint_classes", "load_config", "resolve_data", "test", "train"]


def train(
    config: str | os.PathLike[str],
    *,
    work_dir: str | os.PathLike[str],
    data_root: str | os.PathLike[str] | None = None,
    cfg_options: dict[str, Any] | None = None,
    resume: bool | str | os.PathLike[str] = False,
    amp: bool = False,
    launcher: str = "none",
    max_iters: int | None = None,
    val_interval: int | None = None,
    checkpoint_interval: int | None = None,
    log_interval: int | None = None,
    num_workers: int | None = None,
    batch_size: int | None = None,
    seed: int | None = None,
) -> dict[str, Any]:
    """Train an mmdet / mmseg config with mmengine's Runner, after checking the data.

    Args:
        config: the config file.
        work_dir: logs, the resolved config and checkpoints go here.
        data_root: dataset root replacing the config's (every split).
        cfg_options: overrides merged into the config first (as ``--cfg-options``).
        resume: True: continue from the work dir's last checkpoint; a path: from that checkpoint.
        amp: mixed precision (AmpOptimWrapper; needs a GPU).
        launcher: "none" or "pytorch" (under torchrun; gloo when there is no GPU).
        max_iters: train this many iterations, the learning-rate schedule compressed to them; validation and a
            checkpoint at the end unless ``val_interval`` / ``checkpoint_interval`` say otherwise.
        val_interval, checkpoint_interval, log_interval: override the config's (iterations or epochs, as its loop).
        num_workers, batch_size: data-loader overrides (batch size per process).
        seed: random seed of the run.

    Returns:
        ``work_dir``, ``config`` (the resolved config saved there), ``checkpoint`` (the last one), ``iterations``
        done, ``losses`` (total loss per iteration, resumed runs included), ``iteration_seconds`` (per iteration, as
        mmengine times them), ``classes`` and their ``class_source``, ``images`` per split, ``metrics`` (last
        validation, if any).

    Raises:
        ConfigError, DatasetError, CheckpointError: before anything is trained.
    """
    cfg = load_config(config, cfg_options)
    report = resolve_data(cfg, training_splits(cfg), data_root=data_root)
    settings = TrainSettings(
        Path(work_dir),
        resume=resume if isinstance(resume, bool) else Path(resume),
        amp=amp,
        launcher=launcher,
        max_iters=max_iters,
        val_interval=val_interval,
        checkpoint_interval=checkpoint_interval,
        log_interval=log_interval,
        num_workers=num_workers,
        batch_size=batch_size,
        seed=seed,
    )
    result = fit(cfg, settings)
    return {**result, "classes": list(report.classes), "class_source": report.source, "images": report.images}


def test(
    config: str | os.PathLike[str],
    checkpoint: str | os.PathLike[str],
    *,
    data_root: str | os.PathLike[str] | None = None,
    cfg_options: dict[str, Any] | None = None,
    work_dir: str | os.PathLike[str] | None = None,
    out: str | os.PathLike[str] | None = None,
    launcher: str = "none",
    num_workers: int | None = None,
    trust_checkpoint: bool = False,
) -> dict[str, float]:
    """Evaluate a checkpoint on the config's test split: COCO bbox (/ segm) mAP for mmdet configs, mIoU (percent)
    for mmseg ones. The classes are the checkpoint's; the weights load strictly.

    Args:
        out: also write the metrics (with config, checkpoint and classes) to this JSON file.
        trust_checkpoint: unpickle arbitrary objects in the checkpoint (runs its code!).

    Returns:
        The metrics, e.g. ``{"coco/bbox_mAP": 0.41, ...}`` or ``{"mIoU": 63.2, "aAcc": ..., "mAcc": ...}``.
    """
    from densevision.compat import trusted_checkpoints

    cfg = load_config(config, cfg_options)
    with trusted_checkpoints(trust_checkpoint):
        report = resolve_data(cfg, ["test"], data_root=data_root, classes=checkpoint_classes(checkpoint))
        if out is not None and not Path(out).parent.is_dir():
            raise OutputError(f"{out}: the directory {Path(out).parent} does not exist; create it or choose another")
        metrics = evaluate(
            cfg, checkpoint, work_dir=work_dir or default_work_dir(config), num_workers=num_workers, launcher=launcher
        )
    if out is not None:
        from densevision.io.atomic import write_json  # densevision.io loads OpenSlide and GDAL: only when writing

        record = {
            "config": str(config),
            "checkpoint": str(checkpoint),
            "classes": list(report.classes),
            "images": report.images.get("test", 0),
            "metrics": metrics,
        }
        write_json(Path(out), record)
    return metrics


test.__test__ = False  # type: ignore[attr-defined]  # not a pytest test where a test module imports it
