"""The segmentation stitcher alone: milliseconds per tile to blend, reduce (class map) and hand on every tile of a
grid, from one in-memory logits tensor, with no reading and no writing; and the page faults it costs. The stitcher
reduces its cells itself, as in ``segment_image`` (``Reduction``; a checkout from before that: reduced in the sink).
Run it with another checkout first on ``PYTHONPATH`` to compare two versions in one sitting.

    python benchmarks/stitch_bench.py --classes 2 19 150 --logits random
    PYTHONPATH=/tmp/base python benchmarks/stitch_bench.py --classes 150      # another checkout's stitcher
"""

from __future__ import annotations

import argparse
import resource
import time
from typing import Any

import numpy as np
import torch

from densevision.engine.heap import bound_heap_growth
from densevision.stitch.segmentation import SegmentationStitcher, reduce_cell, stitch_order
from densevision.tiling.grid import TileGrid

try:
    from densevision.stitch.segmentation import Reduction
except ImportError:  # a checkout from before the stitcher reduced its cells itself
    Reduction = None  # type: ignore[assignment,misc]


def run(classes: int, args: argparse.Namespace) -> str:
    grid = TileGrid(width=args.width, height=args.height, tile=args.tile, overlap=args.overlap)
    seconds_reducing = 0.0

    def sink(y0: int, x0: int, logits: torch.Tensor, valid: torch.Tensor) -> None:
        nonlocal seconds_reducing
        t0 = time.perf_counter()
        reduce_cell(y0, x0, logits, valid, probs=args.probs).result()
        seconds_reducing += time.perf_counter() - t0
        stitcher.reuse(logits)

    def reduced(cell: Any) -> None:
        cell.result()

    if Reduction is not None:
        stitcher = SegmentationStitcher(grid, classes, args.blend, reduced, reduction=Reduction(probs=args.probs))
    else:
        stitcher = SegmentationStitcher(grid, classes, args.blend, sink)
    torch.manual_seed(0)
    shape = (classes, args.tile, args.tile)
    logits = torch.randn(shape) if args.logits == "random" else torch.zeros(shape)
    valid = np.ones((args.tile, args.tile), dtype=bool)
    order = stitch_order(grid)
    before = resource.getrusage(resource.RUSAGE_SELF)
    t0 = time.perf_counter()
    for tile in order:
        stitcher.add(tile, logits, valid)
    seconds = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_SELF)
    stitcher.finish()
    n = len(order)
    return (
        f"K = {classes}, {args.logits} logits, {args.blend}, {args.width} x {args.height} ({n} tiles of "
        f"{args.tile}/{args.overlap}){', probabilities' if args.probs else ''}: {seconds / n * 1e3:.1f} ms per tile"
        + (f", of which reducing {seconds_reducing / n * 1e3:.1f}" if Reduction is None else "")
        + f"; {(after.ru_minflt - before.ru_minflt) / n:.0f} page faults and "
        f"{(after.ru_stime - before.ru_stime) / n * 1e3:.1f} ms of system time per tile"
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--classes", type=int, nargs="+", default=[2, 150])
    p.add_argument("--logits", choices=["random", "zeros"], default="random")
    p.add_argument("--blend", default="gaussian")
    p.add_argument("--probs", action="store_true", help="reduce to probabilities too")
    p.add_argument("--width", type=int, default=4096)
    p.add_argument("--height", type=int, default=6144)
    p.add_argument("--tile", type=int, default=512)
    p.add_argument("--overlap", type=int, default=64)
    args = p.parse_args()
    bound_heap_growth()  # the heap settings of a run (densevision.engine.heap)
    torch.set_num_threads(1)  # as the stitcher runs in segment_image on the CPU
    for k in args.classes:
        print(run(k, args), flush=True)


if __name__ == "__main__":
    main()
