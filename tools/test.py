"""Evaluate a checkpoint (OpenMMLab's tools/test.py): COCO bbox / segm mAP or mIoU on the config's test split.

    python tools/test.py work_dirs/dino/dino_swin-t_fpn_coco.py work_dirs/dino/iter_1000.pth --out metrics.json

Same code as ``densevision test``: see densevision.cli.train.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from densevision.cli.train import run_tool, tool_parser


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    return tool_parser("test").parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    return run_tool(parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
