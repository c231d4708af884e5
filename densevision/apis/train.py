"""Training and evaluation of mmdet / mmseg configs on mmengine's Runner, with the data checked first.

:func:`train` and :func:`test` are what ``tools/train.py``, ``tools/test.py`` and ``densevision train|test`` run
(:func:`add_train_arguments` / :func:`run_train`, :func:`add_test_arguments` / :func:`run_test`). Before the Runner
is built, the config is resolved against the data:

- ``data_root`` replaces every dataset's root (train, val, test; wrapped datasets too) and the COCO evaluators'
  annotation files follow their dataset's.
- Every dataset is checked (:mod:`densevision.datasets.validate`): a bad file stops the run with one line.
- Classes: when the config names no classes itself (``metainfo``), they come from the data (COCO categories, ADE's
  ``objectInfo*.txt``) if those differ from the dataset type's defaults; every ``num_classes`` in ``cfg.model``
  and every dataset's ``metainfo`` follow. Checkpoints carry them in ``meta.dataset_meta``, so the resolved config
  that the Runner saves in the work dir builds the model that the checkpoints fit.
"""

from __future__ import annotations

import argparse
import inspect
import itertools
import json
import math
import os
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from densevision.errors import CheckpointError, ConfigError, DatasetError, DenseVisionError, OutputError

if TYPE_CHECKING:
    from densevision.datasets.validate import CocoSummary, SegSummary

SPLITS = {"train": "train_dataloader", "val": "val_dataloader", "test": "test_dataloader"}
EVALUATORS = {"val": "val_evaluator", "test": "test_evaluator"}
NO_VALIDATION = "--cfg-options val_cfg=None val_dataloader=None val_evaluator=None"


@dataclass(frozen=True)
class DataReport:
    """What the checks found: the classes the run uses, where they came from, and per split the image count."""

    classes: tuple[str, ...]
    source: str  # "config", "data" or "checkpoint"
    images: dict[str, int]


# ----------------------------------------------------------------------------------------------------------------
# Config resolution


def load_config(config: str | os.PathLike[str], cfg_options: dict[str, Any] | None = None) -> Any:
    """Read an mmengine config (and merge ``--cfg-options``); any failure is a :class:`ConfigError`."""
    from mmengine.config import Config

    path = Path(config)
    if not path.is_file():
        raise ConfigError(f"{path}: no such config file; pass an mmdet / mmseg config (.py)")
    try:
        cfg = Config.fromfile(str(path))
    except Exception as e:  # syntax errors, bad _base_, failed custom_imports ...
        raise ConfigError(f"{path}: cannot read the config ({type(e).__name__}: {e})") from e
    if cfg_options:
        try:
            cfg.merge_from_dict(cfg_options)
        except (TypeError, KeyError) as e:
            raise ConfigError(f"{path}: --cfg-options do not fit the config ({e})") from e
    return cfg


def _scope(cfg: Any) -> str:
    scope = cfg.get("default_scope")
    if scope not in ("mmdet", "mmseg"):
        raise ConfigError(f"{cfg.filename}: default_scope is {scope!r}; densevision trains mmdet or mmseg configs")
    return str(scope)


def _register(scope: str) -> None:
    if scope == "mmdet":
        from mmdet.utils import register_all_modules
    else:
        from mmseg.utils import register_all_modules
    register_all_modules(init_default_scope=False)


def _dataset_class(scope: str, type_: Any) -> type | None:
    if not isinstance(type_, str):
        return type_ if isinstance(type_, type) else None
    if scope == "mmdet":
        from mmdet.registry import DATASETS
    else:
        from mmseg.registry import DATASETS
    cls = DATASETS.get(type_)
    if cls is None:
        raise ConfigError(f"dataset type {type_!r} is not in the {scope} dataset registry; check the config's type")
    return cls


def _leaf_datasets(dataset: Any) -> Iterator[Any]:
    """The real datasets inside wrappers (RepeatDataset, ClassBalancedDataset, ConcatDataset ...)."""
    if dataset is None:
        return
    if "datasets" in dataset:
        for d in dataset["datasets"]:
            yield from _leaf_datasets(d)
    elif "dataset" in dataset:
        yield from _leaf_datasets(dataset["dataset"])
    else:
        yield dataset


def _split_datasets(cfg: Any, split: str) -> list[Any]:
    loader = cfg.get(SPLITS[split])
    if not loader:
        return []
    return list(_leaf_datasets(loader.get("dataset")))


def _join(root: Any, rel: Any) -> Path:
    return Path(os.path.join(root or "", rel or ""))


def _loads_masks(pipeline: Any) -> bool:
    return any(
        isinstance(t, dict) and str(t.get("type", "")).endswith("LoadAnnotations") and t.get("with_mask")
        for t in pipeline or []
    )


def _init_default(cls: type, name: str, fallback: Any) -> Any:
    p = inspect.signature(cls.__init__).parameters.get(name)  # type: ignore[misc]
    return fallback if p is None or p.default is inspect.Parameter.empty else p.default


def _kind(scope: str, cls: type | None) -> str | None:
    if cls is None:
        return None
    if scope == "mmdet":
        from mmdet.datasets import CocoDataset

        return "coco" if issubclass(cls, CocoDataset) else None
    from mmseg.datasets import BaseSegDataset

    return "seg" if issubclass(cls, BaseSegDataset) else None


@dataclass
class _Dataset:
    """One dataset config of one split, with what the checks need."""

    split: str
    cfg: Any  # the ConfigDict, edited in place
    cls: type
    kind: str  # "coco" or "seg"
    _summary: CocoSummary | SegSummary | None = None

    @property
    def explicit_classes(self) -> tuple[str, ...] | None:
        meta = self.cfg.get("metainfo") or {}
        return tuple(meta["classes"]) if meta.get("classes") else None

    @property
    def default_classes(self) -> tuple[str, ...]:
        return tuple(getattr(self.cls, "METAINFO", {}).get("classes", ()))

    def seg_options(self) -> dict[str, Any]:
        return {
            "img_suffix": self.cfg.get("img_suffix", _init_default(self.cls, "img_suffix", ".jpg")),
            "seg_map_suffix": self.cfg.get("seg_map_suffix", _init_default(self.cls, "seg_map_suffix", ".png")),
            "reduce_zero_label": bool(
                self.cfg.get("reduce_zero_label", _init_default(self.cls, "reduce_zero_label", False))
            ),
        }

    def files(self) -> CocoSummary | SegSummary:
        """Check the files (once; the summary is kept). Missing validation data gets a hint to go without."""
        if self._summary is None:
            try:
                self._summary = self._check_files()
            except DatasetError as e:
                if self.split != "val" or "no such" not in str(e):
                    raise
                raise DatasetError(f"{e} (validation data; to train without it: {NO_VALIDATION})") from e
        return self._summary

    def _check_files(self) -> CocoSummary | SegSummary:
        from densevision.datasets.validate import check_coco, check_segmentation

        root, prefix = self.cfg.get("data_root"), self.cfg.get("data_prefix") or {}
        if self.kind == "coco":
            summary = check_coco(
                _join(root, self.cfg.get("ann_file")),
                _join(root, prefix.get("img", "")),
                need_masks=_loads_masks(self.cfg.get("pipeline")),
            )
            if self.split == "train" and not summary.num_annotations:
                raise DatasetError(f"{summary.ann_file}: no annotations to learn from; annotate some objects")
            return summary
        return check_segmentation(
            _join(root, prefix.get("img_path", "")), _join(root, prefix.get("seg_map_path", "")), **self.seg_options()
        )

    def check_classes(self, classes: Sequence[str]) -> None:
        from densevision.datasets.validate import CocoSummary, check_coco_classes, check_label_values

        summary = self.files()
        if isinstance(summary, CocoSummary):
            check_coco_classes(summary, classes)
        else:
            check_label_values(summary, len(classes))

    def data_classes(self) -> tuple[str, ...] | None:
        """Class names the data itself declares: COCO categories (file order), ADE objectInfo*.txt, or None."""
        from densevision.datasets.validate import CocoSummary, read_class_file

        summary = self.files()
        if isinstance(summary, CocoSummary):
            return summary.categories
        root = self.cfg.get("data_root")
        return read_class_file(root) if root else None


def _datasets(cfg: Any, scope: str, splits: Sequence[str]) -> list[_Dataset]:
    out = []
    for split in splits:
        for d in _split_datasets(cfg, split):
            cls = _dataset_class(scope, d.get("type"))
            kind = _kind(scope, cls)
            if cls is not None and kind is not None:
                out.append(_Dataset(split, d, cls, kind))
    return out


def _set_data_root(cfg: Any, data_root: str | os.PathLike[str]) -> None:
    root = Path(data_root)
    if not root.is_dir():
        raise DatasetError(f"{root}: no such dataset folder; check --data-root")
    for split in SPLITS:
        for d in _split_datasets(cfg, split):
            d["data_root"] = str(root)


def _sync_evaluators(cfg: Any) -> None:
    """COCO evaluators read the ground truth of their own dataset (the base file writes the path out once)."""
    for split, key in EVALUATORS.items():
        datasets = _split_datasets(cfg, split)
        evaluator = cfg.get(key)
        if not evaluator or len(datasets) != 1 or "ann_file" not in datasets[0]:
            continue
        ann = str(_join(datasets[0].get("data_root"), datasets[0]["ann_file"]))
        for metric in evaluator if isinstance(evaluator, list) else [evaluator]:
            if isinstance(metric, dict) and "ann_file" in metric:
                metric["ann_file"] = ann


def _palette(classes: Sequence[str]) -> list[list[int]]:
    rng = np.random.default_rng(len(classes))
    return [[int(v) for v in rng.integers(0, 256, 3)] for _ in classes]


def _set_num_classes(node: Any, k: int) -> int:
    """Set every ``num_classes`` under ``node`` (dicts and lists) to ``k``; returns how many were set."""
    n = 0
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "num_classes" and isinstance(value, int):
                node[key] = k
                n += 1
            else:
                n += _set_num_classes(value, k)
    elif isinstance(node, list | tuple):
        n += sum(_set_num_classes(v, k) for v in node)
    return n


def _apply_classes(cfg: Any, datasets: list[_Dataset], classes: tuple[str, ...]) -> None:
    for d in datasets:
        if d.default_classes == classes and not d.explicit_classes:
            continue  # the dataset type's own classes: leave the config as it is
        if d.kind == "seg" and d.default_classes and d.default_classes != classes:
            # mmseg remaps labels by name to a typed dataset's own classes (and refuses new names): custom classes
            # go through BaseSegDataset with the same file conventions.
            opts = d.seg_options()
            d.cfg["type"] = "BaseSegDataset"
            d.cfg.update(opts)
        d.cfg["metainfo"] = {"classes": classes, "palette": _palette(classes)}
    if not _set_num_classes(cfg.model, len(classes)):
        raise ConfigError(f"{cfg.filename}: the model has no num_classes to set for {len(classes)} classes")
    if isinstance(cfg.get("num_classes"), int):
        cfg["num_classes"] = len(classes)


def resolve_data(
    cfg: Any,
    splits: Sequence[str],
    *,
    data_root: str | os.PathLike[str] | None = None,
    classes: Sequence[str] | None = None,
) -> DataReport:
    """Point ``cfg``'s datasets at ``data_root``, check them, settle the classes and write them into ``cfg``.

    Args:
        cfg: an mmengine Config, edited in place.
        splits: the splits the run reads, among "train", "val", "test"; the first decides the classes.
        data_root: replaces every dataset's ``data_root``.
        classes: classes fixed by a checkpoint (evaluation); None: the config's, or the data's (see module doc).

    Raises:
        DatasetError: missing or malformed data, or data that does not fit the classes.
        ConfigError: the config cannot take the classes.
    """
    scope = _scope(cfg)
    _register(scope)
    if data_root is not None:
        _set_data_root(cfg, data_root)
    _sync_evaluators(cfg)
    datasets = _datasets(cfg, scope, splits)
    for split in splits:
        loader = cfg.get(SPLITS[split])
        if split == splits[0] and not loader:
            raise ConfigError(f"{cfg.filename}: the config has no {SPLITS[split]}")
    if not datasets:  # dataset types densevision does not know: mmengine checks them itself
        return DataReport((), "config", {})

    first = [d for d in datasets if d.split == splits[0]] or datasets
    explicit = next((d.explicit_classes for d in first if d.explicit_classes), None)
    if classes is not None:
        chosen, source = tuple(classes), "checkpoint"
    elif explicit is not None:
        chosen, source = explicit, "config"
    else:
        from_data = first[0].data_classes()
        default = first[0].default_classes
        chosen, source = (from_data, "data") if from_data and from_data != default else (default, "config")
    if not chosen:
        raise ConfigError(f"{cfg.filename}: no classes: name them in the dataset's metainfo.classes")
    for d in datasets:
        if d.kind == "seg" and source != "data":
            declared = d.data_classes()
            if declared is not None and declared != chosen:
                raise DatasetError(
                    f"{d.cfg.get('data_root')}: objectInfo names classes {declared} but the run uses {chosen} "
                    f"(from the {source}); label values must mean the same classes"
                )
    images: dict[str, int] = {}
    for d in datasets:
        d.check_classes(chosen)
        images[d.split] = images.get(d.split, 0) + d.files().num_images
    # Every split takes the classes, the unchecked ones too: the saved config then builds any of them alike.
    _apply_classes(cfg, _datasets(cfg, scope, list(SPLITS)), chosen)
    return DataReport(chosen, source, images)


# ----------------------------------------------------------------------------------------------------------------
# Schedule and runtime


# Learning-rate warmups (mmengine schedulers that ramp a factor up to 1), and the shortest one worth keeping.
WARMUPS = ("LinearLR", "ConstantLR")
MIN_WARMUP = 10


def _scaled(value: float, factor: float, cap: int) -> int:
    return min(cap, round(value * factor))


def _scale_schedule(cfg: Any, max_iters: int) -> None:
    """Run ``max_iters`` iterations: an iteration loop of that length, and the config's learning-rate schedule
    compressed to it (milestones, begin and end scaled by max_iters / the config's length), so warmup and decay
    keep their shape in a short run; a scheduler left with no whole iteration, or a warmup left shorter than
    MIN_WARMUP iterations, is dropped. Iteration-based warmups of an epoch-based config keep their length (clipped to
    the run)."""
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
            # mmengine's warmups stop one step short of their end factor: compressed to an iteration or two they
            # would leave the whole run at start_factor (1e-6) or half the learning rate.
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


def _configure_runtime(
    cfg: Any,
    *,
    work_dir: str | os.PathLike[str],
    amp: bool,
    launcher: str,
    max_iters: int | None,
    val_interval: int | None,
    checkpoint_interval: int | None,
    log_interval: int | None,
    num_workers: int | None,
    batch_size: int | None,
    seed: int | None,
) -> None:
    import torch

    cfg.work_dir = str(work_dir)
    if max_iters is not None:
        if max_iters < 1:
            raise ConfigError(f"max_iters must be >= 1, got {max_iters}")
        _scale_schedule(cfg, max_iters)
    if val_interval is not None:
        cfg.train_cfg["val_interval"] = val_interval
    if checkpoint_interval is not None:
        cfg.default_hooks.checkpoint["interval"] = checkpoint_interval
    if log_interval is not None:
        cfg.default_hooks.logger["interval"] = log_interval
    for key in SPLITS.values():
        loader = cfg.get(key)
        if not loader:
            continue
        if num_workers is not None:
            loader["num_workers"] = num_workers
            loader["persistent_workers"] = num_workers > 0
        if batch_size is not None and key == "train_dataloader":
            loader["batch_size"] = batch_size
    if seed is not None:
        cfg.randomness = dict(seed=seed, deterministic=False)
    if amp:
        if not torch.cuda.is_available():
            raise ConfigError("--amp needs a CUDA GPU: mmengine's AmpOptimWrapper does not run on the CPU")
        cfg.optim_wrapper["type"] = "AmpOptimWrapper"
        cfg.optim_wrapper.setdefault("loss_scale", "dynamic")
    _configure_launcher(cfg, launcher)


def _configure_launcher(cfg: Any, launcher: str) -> None:
    import torch

    if launcher not in ("none", "pytorch"):
        raise ConfigError(f"launcher must be 'none' or 'pytorch', got {launcher!r}")
    cfg.launcher = launcher
    if launcher == "none":
        return
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        raise ConfigError(
            "--launcher pytorch needs the environment torchrun sets (RANK, WORLD_SIZE); start with torchrun"
        )
    if torch.cuda.is_available():
        return
    # mmengine's pytorch launcher calls torch.cuda.set_device and DDP gets device_ids: join the gloo group here
    # and wrap without device ids, so the same command trains on CPU-only machines.
    from densevision.engine.distributed import init_distributed

    cfg.env_cfg.dist_cfg = dict(backend="gloo")
    init_distributed(torch.device("cpu"))
    cfg.model_wrapper_cfg = dict(
        type="MMDistributedDataParallel",
        device_ids=None,
        broadcast_buffers=False,
        find_unused_parameters=bool(cfg.get("find_unused_parameters", False)),
    )


_RUNS = itertools.count(1)


def _build_runner(cfg: Any) -> Any:
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


def _saved_config(work_dir: Path, cfg: Any) -> Path:
    return work_dir / Path(cfg.filename).name


def _history(runner: Any, key: str) -> list[float]:
    hub = runner.message_hub
    if key not in hub.log_scalars:
        return []
    values, _counts = hub.get_scalar(key).data
    return [float(v) for v in values]


# ----------------------------------------------------------------------------------------------------------------
# Public API


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
    report = resolve_data(cfg, ["train", "val"] if cfg.get("val_cfg") else ["train"], data_root=data_root)
    work = Path(work_dir)
    _configure_runtime(
        cfg,
        work_dir=work,
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
    if resume:
        if resume is True:
            from mmengine.runner import find_latest_checkpoint

            if find_latest_checkpoint(str(work)) is None:
                raise CheckpointError(f"{work}: no checkpoint to resume from (no last_checkpoint); drop --resume")
            cfg.load_from = None
        else:
            if not Path(resume).is_file():
                raise CheckpointError(f"{resume}: no such checkpoint to resume from; check the --resume path")
            cfg.load_from = str(resume)
        cfg.resume = True
    try:
        work.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise OutputError(f"{work}: cannot create the work dir ({e.strerror}); choose another --work-dir") from e
    runner = _build_runner(cfg)
    runner.train()
    last = work / "last_checkpoint"
    return {
        "work_dir": str(work),
        "config": str(_saved_config(work, cfg)),
        "checkpoint": last.read_text().strip() if last.is_file() else None,
        "iterations": int(runner.iter),
        "losses": _history(runner, "train/loss"),
        "iteration_seconds": _history(runner, "train/time"),
        "classes": list(report.classes),
        "class_source": report.source,
        "images": report.images,
        "metrics": {
            k[len("val/") :]: float(runner.message_hub.get_scalar(k).current())
            for k in runner.message_hub.log_scalars
            if k.startswith("val/") and k not in ("val/time", "val/data_time")
        },
    }


def checkpoint_classes(checkpoint: str | os.PathLike[str]) -> tuple[str, ...] | None:
    """The class names a checkpoint was trained with (``meta.dataset_meta.classes``), read through the safe loader."""
    from densevision.compat import load_checkpoint

    ckpt = load_checkpoint(checkpoint)
    meta = ckpt.get("meta", {}) if isinstance(ckpt, dict) else {}
    classes = (meta.get("dataset_meta") or {}).get("classes")
    return tuple(str(c) for c in classes) if classes else None


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
        classes = checkpoint_classes(checkpoint)
        report = resolve_data(cfg, ["test"], data_root=data_root, classes=classes)
        if out is not None and not Path(out).parent.is_dir():
            raise OutputError(f"{out}: the directory {Path(out).parent} does not exist; create it or choose another")
        cfg.work_dir = str(work_dir or Path("work_dirs") / Path(config).stem)
        if num_workers is not None:
            cfg.test_dataloader["num_workers"] = num_workers
            cfg.test_dataloader["persistent_workers"] = num_workers > 0
        _configure_launcher(cfg, launcher)
        cfg.load_from = None
        runner = _build_runner(cfg)
        try:
            runner.load_checkpoint(str(checkpoint), map_location="cpu", strict=True)
        except RuntimeError as e:  # mmengine lists the missing / unexpected / mis-shaped keys
            raise CheckpointError(
                f"{checkpoint}: does not fit the model of {config} ({' '.join(str(e).split())[:400]}); "
                "use the config saved beside the checkpoint in its work dir"
            ) from e
        metrics = {k: float(v) for k, v in runner.test().items()}
    if out is not None:
        record = {
            "config": str(config),
            "checkpoint": str(checkpoint),
            "classes": list(report.classes),
            "images": report.images.get("test", 0),
            "metrics": metrics,
        }
        tmp = Path(str(out) + ".partial")
        tmp.write_text(json.dumps(record, indent=2))
        tmp.replace(out)
    return metrics


# ----------------------------------------------------------------------------------------------------------------
# Command line (tools/train.py, tools/test.py, densevision train|test)


def _model_file(parser: argparse.ArgumentParser, name: str, short: str, text: str, flags: bool) -> None:
    if flags:
        parser.add_argument(short, f"--{name}", required=True, help=text)
    else:
        parser.add_argument(name, help=text)


class CfgOptions(argparse.Action):
    """mmengine's ``DictAction`` (``key=value`` pairs, lists as ``key='[a,b]'``), imported when the flag is used."""

    def __call__(
        self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: Any, option: Any = None
    ) -> None:
        from mmengine.config import DictAction

        DictAction(self.option_strings, self.dest)(parser, namespace, values, option)


def _common_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--work-dir", help="folder for logs, the resolved config and checkpoints")
    parser.add_argument("--data-root", help="dataset root replacing the config's, for every split")
    parser.add_argument(
        "--cfg-options",
        nargs="+",
        action=CfgOptions,
        metavar="KEY=VALUE",
        help="override config entries, e.g. model.backbone.init_cfg.checkpoint=x.pth (lists: key='[a,b]')",
    )
    parser.add_argument(
        "--launcher", choices=["none", "pytorch"], default="none", help="job launcher: pytorch under torchrun"
    )
    parser.add_argument("--num-workers", type=int, help="data-loader worker processes (default: the config's)")
    # torch.distributed.launch passes --local-rank; torchrun sets LOCAL_RANK instead.
    parser.add_argument("--local_rank", "--local-rank", type=int, default=0, help=argparse.SUPPRESS)


def add_train_arguments(parser: argparse.ArgumentParser, *, flags: bool = False) -> argparse.ArgumentParser:
    """The training flags (OpenMMLab's tools/train.py and some more), shared by tools/train.py and the CLI.

    ``flags``: the config as ``-c/--config`` (densevision's commands) instead of a positional (OpenMMLab's tools).
    """
    _model_file(parser, "config", "-c", "mmdet / mmseg config file", flags)
    _common_arguments(parser)
    parser.add_argument(
        "--resume",
        nargs="?",
        const="auto",
        metavar="CHECKPOINT",
        help="continue training: from the work dir's last checkpoint, or from CHECKPOINT",
    )
    parser.add_argument("--amp", action="store_true", help="automatic mixed precision (needs a GPU)")
    parser.add_argument("--max-iters", type=int, help="train this many iterations (schedule compressed to them)")
    parser.add_argument("--batch-size", type=int, help="images per process and iteration (default: the config's)")
    parser.add_argument("--seed", type=int, help="random seed")
    return parser


def add_test_arguments(parser: argparse.ArgumentParser, *, flags: bool = False) -> argparse.ArgumentParser:
    """The evaluation flags (OpenMMLab's tools/test.py), shared by tools/test.py and the CLI.

    ``flags``: config and checkpoint as ``-c/--config`` and ``-w/--checkpoint`` (densevision's commands) instead
    of positionals (OpenMMLab's tools), and ``-o`` for ``--out``.
    """
    _model_file(parser, "config", "-c", "mmdet / mmseg config file (the one saved in the training work dir)", flags)
    _model_file(parser, "checkpoint", "-w", "checkpoint file (.pth)", flags)
    _common_arguments(parser)
    parser.add_argument(*(["-o"] if flags else []), "--out", help="write the metrics to this JSON file")
    parser.add_argument(
        "--trust-checkpoint", action="store_true", help="unpickle arbitrary objects in the checkpoint (runs its code!)"
    )
    return parser


def _default_work_dir(config: str) -> str:
    return str(Path("work_dirs") / Path(config).stem)


def _set_local_rank(args: argparse.Namespace) -> None:
    if "LOCAL_RANK" not in os.environ:
        os.environ["LOCAL_RANK"] = str(args.local_rank)


def run_train(args: argparse.Namespace) -> int:
    """Train from parsed :func:`add_train_arguments` flags; prints where the results are."""
    _set_local_rank(args)
    resume: bool | str = False if args.resume is None else (True if args.resume == "auto" else args.resume)
    result = train(
        args.config,
        work_dir=args.work_dir or _default_work_dir(args.config),
        data_root=args.data_root,
        cfg_options=args.cfg_options,
        resume=resume,
        amp=args.amp,
        launcher=args.launcher,
        max_iters=args.max_iters,
        num_workers=args.num_workers,
        batch_size=args.batch_size,
        seed=args.seed,
    )
    if _is_main_process():
        losses = result["losses"]
        print(f"classes: {', '.join(result['classes'])} (from the {result['class_source']})")
        print(f"iterations: {result['iterations']}, last loss: {losses[-1]:.4f}" if losses else "iterations: 0")
        for k, v in result["metrics"].items():
            print(f"val {k}: {v:.4f}")
        print(f"config: {result['config']}")
        print(f"checkpoint: {result['checkpoint']}")
    return 0


def run_test(args: argparse.Namespace) -> int:
    """Evaluate from parsed :func:`add_test_arguments` flags; prints the metrics."""
    _set_local_rank(args)
    metrics = test(
        args.config,
        args.checkpoint,
        data_root=args.data_root,
        cfg_options=args.cfg_options,
        work_dir=args.work_dir,
        out=args.out,
        launcher=args.launcher,
        num_workers=args.num_workers,
        trust_checkpoint=args.trust_checkpoint,
    )
    if _is_main_process():
        for k, v in metrics.items():
            print(f"{k}: {v:.4f}")
        if args.out:
            print(f"metrics: {args.out}")
    return 0


def _is_main_process() -> bool:
    from mmengine.dist import get_rank

    return bool(get_rank() == 0)


def run_tool(run: Callable[[argparse.Namespace], int], args: argparse.Namespace, prog: str) -> int:
    """What tools/train.py and tools/test.py ``main()`` run: bad input prints one line and exits 2, as the CLI."""
    try:
        return int(run(args))
    except DenseVisionError as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 2


test.__test__ = False  # type: ignore[attr-defined]  # not a pytest test where a test module imports it
