"""The detection merge alone, one version of ``densevision/stitch/detection.py`` against another, on the same input.

Cases:

- ``20k``: the input of tests/test_stitch_detection.py ``test_twenty_thousand_boxes_over_a_60_by_60_grid_run_fast``
  (a 60 x 60 grid of 128-px tiles, overlap 32, 9216 planted boxes of 8-28 px, about 20k detections).
- ``27k``: the raw detections of detect_bench.py's mmdet part (mmdet's RTMDet-tiny with generated weights over the
  8192 x 8192 generated GeoTIFF, tile 512, overlap 64, score >= 0.3; about 27k detections). The scene and the
  checkpoint are detect_bench.py's own (made, or reused, in ``--workdir``); the detections are predicted once per
  tile with ``MMDetPredictor`` and kept in ``--workdir`` (about 4 minutes on 2 CPU cores), then reused.

Each repeat times ``merge_detections`` (nmm, IoS > 0.5, class-aware: as ``detect_objects`` runs it) with the old
and the new module, alternating which goes first, so a busy machine slows both alike; the medians and their ratio
are printed. So is the pair search alone (``intersecting_pairs`` of all the case's detections with each other at
once, as in a merge of one whole-image tile), which within the merge mostly sees a tile's few boxes and takes the
all-pairs path. Every method / criterion pair is also run once with each module and the outputs compared array by
array (they must be identical), and so are the pair sets. The old module is a file outside the repository, e.g.::

    git show HEAD:densevision/stitch/detection.py > /tmp/detection_old.py
    nice -n 10 .venv/bin/python benchmarks/merge_bench.py --old /tmp/detection_old.py
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
CASES = ("20k", "27k")
Items = list[tuple[Any, np.ndarray, np.ndarray, np.ndarray]]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--old", type=Path, required=True, help="the other detection.py (e.g. from git show HEAD:...)")
    p.add_argument("--cases", nargs="+", choices=CASES, default=list(CASES), help="what to measure (default: all)")
    p.add_argument("--repeats", type=int, default=7, help="timed merges per module and case (default 7)")
    p.add_argument("--workdir", type=Path, default=Path("/tmp/densevision-bench"), help="detect_bench's inputs")
    return p.parse_args(argv)


def load_module(path: Path, name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise SystemExit(f"{path}: not a Python module")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def case_20k() -> tuple[Any, Items]:
    """The 20k-box test's grid and per-tile detections (built by the test module itself)."""
    sys.path.insert(0, str(REPO / "tests"))
    from test_stitch_detection import twenty_thousand_boxes

    grid, _, items = twenty_thousand_boxes()
    return grid, items


def case_27k(workdir: Path) -> tuple[Any, Items]:
    """detect_bench.py's mmdet scene and model; the per-tile detections predicted once and cached."""
    sys.path.insert(0, str(REPO / "benchmarks"))
    import detect_bench

    from densevision.tiling.grid import TileGrid

    bench = detect_bench.parse_args(["--workdir", str(workdir)])
    image, _ = detect_bench.scene(bench)
    config, checkpoint, _ = detect_bench.model_files(bench, image)
    width, height = detect_bench.parse_size(bench.size)
    grid = TileGrid(width, height, bench.tile, bench.overlap)
    cache = workdir / f"merge_bench-{image.stem}-{checkpoint.stem}-t{bench.tile}-o{bench.overlap}.npz"
    if not cache.is_file():
        _predict(image, config, checkpoint, grid, bench, cache)
    raw = np.load(cache)
    tiles = list(grid)
    items = []
    for tile in tiles:
        k = raw["tile"] == tile.index
        items.append((tile, raw["boxes"][k], raw["scores"][k], raw["labels"][k]))
    return grid, items


def _predict(image: Path, config: Path, checkpoint: Path, grid: Any, bench: argparse.Namespace, out: Path) -> None:
    import torch

    import densevision
    from densevision.predictors.mmdet import MMDetPredictor

    print(f"predicting {len(grid)} tiles of {image.name} once (cached in {out}) ...", file=sys.stderr, flush=True)
    model = MMDetPredictor.from_config(config, checkpoint, score_threshold=bench.score_threshold)
    parts: dict[str, list[np.ndarray]] = {"boxes": [], "scores": [], "labels": [], "tile": []}
    tiles = list(grid)
    with densevision.open_image(image) as src:
        for start in range(0, len(tiles), bench.batch_size):
            batch = tiles[start : start + bench.batch_size]
            pixels = [src.read_region((t.x, t.y), 0, (grid.tile, grid.tile)).pixels for t in batch]
            x = torch.from_numpy(np.stack(pixels).transpose(0, 3, 1, 2).astype(np.float32))
            for t, d in zip(batch, model(x), strict=True):
                parts["boxes"].append(d.boxes + np.array([t.x, t.y, t.x, t.y], dtype=np.float64))
                parts["scores"].append(d.scores)
                parts["labels"].append(d.labels)
                parts["tile"].append(np.full(len(d), t.index, dtype=np.int64))
    np.savez(out, **{k: np.concatenate(v) for k, v in parts.items()})


def same(a: Any, b: Any) -> bool:
    fields = ("boxes", "scores", "labels", "best", "partial", "offsets", "members")
    return all(np.array_equal(getattr(a, f), getattr(b, f)) for f in fields)


def alternating(repeats: int, old: ModuleType, new: ModuleType, call: Callable[[ModuleType], Any]) -> dict[str, Any]:
    """Median and least seconds of ``call(module)`` for each module, alternating which runs first."""
    seconds: dict[str, list[float]] = {"old": [], "new": []}
    for r in range(repeats):
        for label in ("old", "new") if r % 2 == 0 else ("new", "old"):
            t0 = time.perf_counter()
            call(old if label == "old" else new)
            seconds[label].append(time.perf_counter() - t0)
    return {k: (statistics.median(v), min(v)) for k, v in seconds.items()}


def measure(name: str, grid: Any, items: Items, old: ModuleType, new: ModuleType, repeats: int) -> dict[str, Any]:
    objects = {}
    for method in ("nmm", "greedy_nmm", "nms"):
        for match in ("ios", "iou"):
            a = old.merge_detections(grid, items, method=method, match=match)
            b = new.merge_detections(grid, items, method=method, match=match)
            if not same(a, b):
                raise SystemExit(f"{name}: {method} / {match}: the two modules' outputs differ")
            objects[method, match] = len(b)
    # The pair search alone on all the detections at once (as a merge of one whole-image tile runs it).
    boxes = np.concatenate([it[1] for it in items])
    pairs = [_pair_set(m.intersecting_pairs(boxes, boxes)) for m in (old, new)]
    if pairs[0] != pairs[1]:
        raise SystemExit(f"{name}: the two modules' intersecting_pairs differ")
    return {
        "case": name,
        "detections": len(boxes),
        "tiles": len(grid),
        "objects": objects["nmm", "ios"],
        "pairs": len(pairs[1]),
        "merge": alternating(repeats, old, new, lambda m: m.merge_detections(grid, items, method="nmm", match="ios")),
        "pair_search": alternating(repeats, old, new, lambda m: m.intersecting_pairs(boxes, boxes)),
    }


def _pair_set(ij: tuple[np.ndarray, np.ndarray]) -> set[tuple[int, int]]:
    return set(zip(ij[0].tolist(), ij[1].tolist(), strict=True))


def _cells(t: dict[str, Any]) -> str:
    (old, old_min), (new, new_min) = t["old"], t["new"]
    return f"{old:.3f}, {old_min:.3f} | {new:.3f}, {new_min:.3f} | {new / old:.2f}"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    sys.path.insert(0, str(REPO))
    import densevision.stitch.detection as new

    old = load_module(args.old.resolve(), "densevision_old_detection")
    print(
        "| case | detections | tiles | merged objects | merge s, old (median, min) | merge s, new | new / old | "
        "box pairs | pair search s, old | pair search s, new | new / old |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for case in args.cases:
        grid, items = case_20k() if case == "20k" else case_27k(args.workdir)
        m = measure(case, grid, items, old, new, args.repeats)
        print(
            f"| {m['case']} | {m['detections']} | {m['tiles']} | {m['objects']} | {_cells(m['merge'])} | {m['pairs']} "
            f"| {_cells(m['pair_search'])} |",
            flush=True,
        )
    print(
        f"\n{args.repeats} runs per module and case, alternating which goes first. Merge: merge_detections, nmm / "
        "IoS > 0.5, class-aware; outputs identical for nmm / greedy_nmm / nms x ios / iou. Pair search: "
        "intersecting_pairs of all the case's detections with themselves at once; the same pairs."
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
