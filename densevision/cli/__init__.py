"""The ``densevision`` command: :mod:`densevision.cli.commands` (parser, info / segment / detect / instances / demo) and
:mod:`densevision.cli.train` (train / test, shared with ``tools/train.py`` and ``tools/test.py``)."""

from densevision.cli.commands import main

__all__ = ["main"]
