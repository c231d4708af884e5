"""Train an mmdet / mmseg config (OpenMMLab's tools/train.py, on densevision's checks and resolution).

    python tools/train.py configs/detection/dino_swin-t_fpn_coco.py --data-root data/mine --work-dir work_dirs/dino
    torchrun --nproc_per_node 2 tools/train.py CONFIG --launcher pytorch ...

Same code as ``densevision train``: see densevision.cli.train.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from densevision.cli.train import run_tool, tool_parser


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    return tool_parser("train").parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    return run_tool(parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
