"""The engine's reader alone: every tile of a grid over an image through ``tile_loader``, with no model. Reports the
wall time, the CPU of the loading process and of its reader workers (per tile), and a bare ``read_region`` loop in
the same process for scale. Run it with another checkout first on ``PYTHONPATH`` to compare two versions in one
sitting (it takes the old loader's tuples as well as ``TileBatch``).

    python benchmarks/reader_bench.py IMAGE --workers 0 1 2 --rounds 2
    PYTHONPATH=/tmp/base python benchmarks/reader_bench.py IMAGE          # another checkout's reader
"""

from __future__ import annotations

import argparse
import os
import resource
import time
from pathlib import Path

from densevision import open_image
from densevision.engine import TileDataset, read_geometry, tile_loader
from densevision.tiling import TileGrid


def _children_cpu() -> float:
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return ru.ru_utime + ru.ru_stime


def run(args: argparse.Namespace, workers: int) -> str:
    with open_image(args.image) as src:
        grid = TileGrid(*src.size, args.tile, args.overlap)
        geometry = read_geometry(src)
    dataset = TileDataset(args.image, list(grid), geometry)
    wall, cpu, children = time.perf_counter(), time.process_time(), _children_cpu()
    tiles = 0
    if workers < 0:  # the bare loop: read_region in this process
        with open_image(args.image) as src:
            for t in grid:
                src.read_region((t.x, t.y), 0, (t.width, t.height))
                tiles += 1
    else:
        for batch in tile_loader(dataset, batch_size=args.batch_size, workers=workers):
            tiles += len(batch) if hasattr(batch, "pieces") else len(batch[0])  # TileBatch, or the old tuples
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    children = _children_cpu() - children
    what = "bare read_region, 1 process" if workers < 0 else f"tile_loader, {workers} workers"
    return (
        f"| {what} | {tiles} | {wall:.2f} | {tiles / wall:.0f} | {cpu / tiles * 1e3:.2f} | "
        f"{children / tiles * 1e3:.2f} | {os.getloadavg()[0]:.1f} |"
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("image", type=Path)
    p.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2], help="reader workers to try (-1: bare loop)")
    p.add_argument("--tile", type=int, default=512)
    p.add_argument("--overlap", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=2)
    p.add_argument("--rounds", type=int, default=2)
    args = p.parse_args()
    print("| how | tiles | wall s | tiles/s | loading process CPU ms per tile | workers' CPU ms per tile | load |")
    print("|---|---|---|---|---|---|---|")
    for _ in range(args.rounds):
        for workers in args.workers:
            print(run(args, workers), flush=True)


if __name__ == "__main__":
    main()
