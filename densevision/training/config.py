"""Reading an mmdet / mmseg config and finding the datasets it trains and evaluates on.

A config names its data in three loaders (``train_dataloader``, ``val_dataloader``, ``test_dataloader``), each
holding one dataset, possibly inside wrappers (``RepeatDataset``, ``ClassBalancedDataset``, ``ConcatDataset`` ...).
:func:`dataset_entries` walks to the real datasets of the splits asked for and keeps, for each, its registry class
and its kind (COCO or semantic segmentation): what :mod:`densevision.training.data` checks and
:mod:`densevision.training.classes` writes the classes into. Entries edit the config in place, so the resolved
config that the Runner saves is the one the run used.
"""

from __future__ import annotations

import inspect
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from densevision.errors import ConfigError, DatasetError

if TYPE_CHECKING:
    from densevision.training.checks import CocoSummary, SegSummary

SPLITS = {"train": "train_dataloader", "val": "val_dataloader", "test": "test_dataloader"}
EVALUATORS = {"val": "val_evaluator", "test": "test_evaluator"}
NO_VALIDATION = "--cfg-options val_cfg=None val_dataloader=None val_evaluator=None"


def scope_of(cfg: Any) -> str:
    """The config's ``default_scope`` ("mmdet" or "mmseg"), with that library's modules registered."""
    scope = cfg.get("default_scope")
    if scope not in ("mmdet", "mmseg"):
        raise ConfigError(f"{cfg.filename}: default_scope is {scope!r}; densevision trains mmdet or mmseg configs")
    if scope == "mmdet":
        from mmdet.utils import register_all_modules
    else:
        from mmseg.utils import register_all_modules
    register_all_modules(init_default_scope=False)
    return str(scope)


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


def _kind(scope: str, cls: type | None) -> str | None:
    if cls is None:
        return None
    if scope == "mmdet":
        from mmdet.datasets import CocoDataset

        return "coco" if issubclass(cls, CocoDataset) else None
    from mmseg.datasets import BaseSegDataset

    return "seg" if issubclass(cls, BaseSegDataset) else None


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


def split_datasets(cfg: Any, split: str) -> list[Any]:
    """The dataset configs (ConfigDicts, wrappers opened) of one split; empty when the config has no such loader."""
    loader = cfg.get(SPLITS[split])
    if not loader:
        return []
    return list(_leaf_datasets(loader.get("dataset")))


def join(root: Any, rel: Any) -> Path:
    """``data_root`` / a relative path of the config, either possibly unset."""
    return Path(os.path.join(root or "", rel or ""))


def _loads_masks(pipeline: Any) -> bool:
    return any(
        isinstance(t, dict) and str(t.get("type", "")).endswith("LoadAnnotations") and t.get("with_mask")
        for t in pipeline or []
    )


def _init_default(cls: type, name: str, fallback: Any) -> Any:
    p = inspect.signature(cls.__init__).parameters.get(name)  # type: ignore[misc]
    return fallback if p is None or p.default is inspect.Parameter.empty else p.default


@dataclass
class DatasetEntry:
    """One dataset config of one split, with what the checks need."""

    split: str
    cfg: Any  # the ConfigDict, edited in place
    cls: type
    kind: str  # "coco" or "seg"
    _summary: CocoSummary | SegSummary | None = None

    @property
    def explicit_classes(self) -> tuple[str, ...] | None:
        """The classes the config names itself (``metainfo.classes``), or None."""
        meta = self.cfg.get("metainfo") or {}
        return tuple(meta["classes"]) if meta.get("classes") else None

    @property
    def default_classes(self) -> tuple[str, ...]:
        """The dataset type's own classes (COCO's 80, ADE's 150; none for the base types)."""
        return tuple(getattr(self.cls, "METAINFO", {}).get("classes", ()))

    def seg_options(self) -> dict[str, Any]:
        """File conventions of a segmentation dataset: the config's, else its type's defaults."""
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
        from densevision.training.checks import check_coco, check_segmentation

        root, prefix = self.cfg.get("data_root"), self.cfg.get("data_prefix") or {}
        if self.kind == "coco":
            summary = check_coco(
                join(root, self.cfg.get("ann_file")),
                join(root, prefix.get("img", "")),
                need_masks=_loads_masks(self.cfg.get("pipeline")),
            )
            if self.split == "train" and not summary.num_annotations:
                raise DatasetError(f"{summary.ann_file}: no annotations to learn from; annotate some objects")
            return summary
        return check_segmentation(
            join(root, prefix.get("img_path", "")), join(root, prefix.get("seg_map_path", "")), **self.seg_options()
        )

    def check_classes(self, classes: Sequence[str]) -> None:
        """The data fits ``classes``: COCO categories among them in file order, label values within them."""
        from densevision.training.checks import CocoSummary, check_coco_classes, check_label_values

        summary = self.files()
        if isinstance(summary, CocoSummary):
            check_coco_classes(summary, classes)
        else:
            check_label_values(summary, len(classes))

    def data_classes(self) -> tuple[str, ...] | None:
        """Class names the data itself declares: COCO categories (file order), ADE objectInfo*.txt, or None."""
        from densevision.training.checks import CocoSummary, read_class_file

        summary = self.files()
        if isinstance(summary, CocoSummary):
            return summary.categories
        root = self.cfg.get("data_root")
        return read_class_file(root) if root else None


def dataset_entries(cfg: Any, scope: str, splits: Sequence[str]) -> list[DatasetEntry]:
    """The datasets of ``splits`` that densevision knows how to check (COCO and mmseg types), in split order."""
    out = []
    for split in splits:
        for d in split_datasets(cfg, split):
            cls = _dataset_class(scope, d.get("type"))
            kind = _kind(scope, cls)
            if cls is not None and kind is not None:
                out.append(DatasetEntry(split, d, cls, kind))
    return out
