"""A config resolved against its data, before any model or Runner is built.

:func:`resolve_data`, in order:

1. ``data_root`` replaces every dataset's root (train, val, test; wrapped datasets too), and each COCO evaluator's
   ``ann_file`` follows its dataset's (the base config writes the path out once, for the default root).
2. The classes are chosen (:mod:`densevision.training.classes`).
3. Every dataset of the run's splits is checked (:mod:`densevision.training.checks`) and must fit those classes:
   a bad file stops the run with one line instead of a data-loader worker failing hours later.
4. The classes are written into every split's datasets and the model's ``num_classes``.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from densevision.errors import ConfigError, DatasetError
from densevision.training.classes import apply_classes, check_declared_classes, choose_classes
from densevision.training.config import EVALUATORS, SPLITS, dataset_entries, join, scope_of, split_datasets


@dataclass(frozen=True)
class DataReport:
    """What the checks found: the classes the run uses, where they came from, and per split the image count."""

    classes: tuple[str, ...]
    source: str  # "config", "data" or "checkpoint"
    images: dict[str, int]


def set_data_root(cfg: Any, data_root: str | os.PathLike[str]) -> None:
    """Point every dataset of every split at ``data_root``."""
    root = Path(data_root)
    if not root.is_dir():
        raise DatasetError(f"{root}: no such dataset folder; check --data-root")
    for split in SPLITS:
        for d in split_datasets(cfg, split):
            d["data_root"] = str(root)


def sync_evaluators(cfg: Any) -> None:
    """COCO evaluators read the ground truth of their own dataset (the base file writes the path out once)."""
    for split, key in EVALUATORS.items():
        datasets = split_datasets(cfg, split)
        evaluator = cfg.get(key)
        if not evaluator or len(datasets) != 1 or "ann_file" not in datasets[0]:
            continue
        ann = str(join(datasets[0].get("data_root"), datasets[0]["ann_file"]))
        for metric in evaluator if isinstance(evaluator, list) else [evaluator]:
            if isinstance(metric, dict) and "ann_file" in metric:
                metric["ann_file"] = ann


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
        classes: classes fixed by a checkpoint (evaluation); None: the config's, or the data's (see
            :mod:`densevision.training.classes`).

    Raises:
        DatasetError: missing or malformed data, or data that does not fit the classes.
        ConfigError: the config cannot take the classes.
    """
    scope = scope_of(cfg)
    if data_root is not None:
        set_data_root(cfg, data_root)
    sync_evaluators(cfg)
    datasets = dataset_entries(cfg, scope, splits)
    if not cfg.get(SPLITS[splits[0]]):
        raise ConfigError(f"{cfg.filename}: the config has no {SPLITS[splits[0]]}")
    if not datasets:  # dataset types densevision does not know: mmengine checks them itself
        return DataReport((), "config", {})

    first = [d for d in datasets if d.split == splits[0]] or datasets
    chosen, source = choose_classes(cfg, first, classes)
    check_declared_classes(datasets, chosen, source)
    images: dict[str, int] = {}
    for d in datasets:
        d.check_classes(chosen)
        images[d.split] = images.get(d.split, 0) + d.files().num_images
    # Every split takes the classes, the unchecked ones too: the saved config then builds any of them alike.
    apply_classes(cfg, dataset_entries(cfg, scope, list(SPLITS)), chosen)
    return DataReport(chosen, source, images)
