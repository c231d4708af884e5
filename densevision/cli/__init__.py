"""The ``densevision`` command: :mod:`densevision.cli.main` (parser, info / segment / detect / instances / demo) and
:mod:`densevision.cli.train` (train / test, shared with ``tools/train.py`` and ``tools/test.py``)."""

from densevision.cli.main import main

__all__ = ["main"]
