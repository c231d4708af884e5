"""Datasets for fine-tuning: generators of tiny datasets in real formats (COCO instances, ADE20k layout), and the
checks that :mod:`densevision.apis.train` runs on every dataset before training or evaluation starts."""

from densevision.datasets.synthetic import PlantedObject, SyntheticDataset, make_ade_dataset, make_coco_dataset
from densevision.datasets.validate import (
    CocoSummary,
    SegSummary,
    check_coco,
    check_segmentation,
    read_class_file,
)

__all__ = [
    "CocoSummary",
    "PlantedObject",
    "SegSummary",
    "SyntheticDataset",
    "check_coco",
    "check_segmentation",
    "make_ade_dataset",
    "make_coco_dataset",
    "read_class_file",
]
