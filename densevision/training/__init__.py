"""Fine-tuning and evaluating mmdet / mmseg configs on mmengine's Runner, with the data checked first.

The flow of a run, one module a step:

- :mod:`~densevision.training.config`: read the config, find the datasets of each split (wrappers opened);
- :mod:`~densevision.training.checks`: check COCO files and ADE20k-layout folders (no OpenMMLab needed);
- :mod:`~densevision.training.classes`: choose the classes (checkpoint, config or data) and set every
  ``num_classes``;
- :mod:`~densevision.training.data`: :func:`resolve_data`, the config pointed at the data, checked, classes set;
- :mod:`~densevision.training.schedule`: the schedule compressed to ``--max-iters``;
- :mod:`~densevision.training.launcher`: alone or under torchrun (gloo without CUDA);
- :mod:`~densevision.training.runner`: the run's settings, the Runner, training and evaluation.

:mod:`densevision.apis.train` puts them together as ``train(...)`` and ``test(...)``; the command line
(:mod:`densevision.cli.train`) calls those. Nothing here knows the command line.
"""

from densevision.configs import load_config
from densevision.training.classes import checkpoint_classes
from densevision.training.data import DataReport, resolve_data
from densevision.training.runner import TrainSettings, evaluate, fit

__all__ = ["DataReport", "TrainSettings", "checkpoint_classes", "evaluate", "fit", "load_config", "resolve_data"]
