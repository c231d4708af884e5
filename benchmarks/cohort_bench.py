"""A cohort in one command against a shell loop of single-image commands, and on 2 ranks against 1 (issue 16).

N generated 4096^2 slides (default 16) are segmented with the same model and settings three ways, one after the
other in this run: (1) a shell loop, one ``densevision segment SLIDE -o loop/NAME.tif`` per slide, each paying the
imports and the model build; (2) one ``densevision segment FOLDER -o cohort/`` (the model built once); (3) the same
under ``torchrun --nproc_per_node 2`` (ranks claim whole slides). The outputs of (2) and (3) are compared byte for
byte with (1)'s. The model is the demo's small UperNet-Swin (random weights saved as a checkpoint, loaded by every
run) at 2 um/px (1024^2 working pixels per slide), so per-image costs are a visible part of the time, as they are for
cohorts of small biopsies or of thumbnails-level screening.

    python benchmarks/cohort_bench.py                 # 16 slides; about 10 min on 2 CPU cores
    python benchmarks/cohort_bench.py --slides 4      # a quick check
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path


def _model(root: Path) -> tuple[Path, Path]:
    import torch
    from mmengine.config import Config

    from densevision.configs import find_config
    from densevision.predictors.mmseg import MMSegPredictor

    config, checkpoint = root / "seg.py", root / "seg.pth"
    if not checkpoint.exists():
        classes = ("background", "tumour", "stroma")
        cfg = Config.fromfile(find_config("demo/upernet_swin-tiny_demo-256")).model
        for head in ("decode_head", "auxiliary_head"):
            cfg[head]["num_classes"] = len(classes)
        Config({"model": cfg.to_dict(), "metainfo": {"classes": classes}}).dump(config)
        weights = MMSegPredictor.from_config(config).model.state_dict()
        torch.save({"state_dict": weights, "meta": {"dataset_meta": {"classes": classes}}}, checkpoint)
    return config, checkpoint


def _timed(cmd: list[str]) -> float:
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"failed ({proc.returncode}): {' '.join(cmd)}\n{proc.stderr[-2000:]}")
    return time.perf_counter() - t0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--slides", type=int, default=16)
    parser.add_argument("--size", type=int, default=4096)
    parser.add_argument("--workdir", default="/tmp/densevision-bench/cohort")
    args = parser.parse_args()
    from densevision.synthetic.slides import make_slide

    root = Path(args.workdir)
    inputs = root / f"slides-{args.size}"
    inputs.mkdir(parents=True, exist_ok=True)
    slides = []
    for i in range(args.slides):
        path = inputs / f"slide-{i:03d}.tiff"
        if not path.exists():
            make_slide(path, args.size, args.size, seed=i)
        slides.append(path)
    config, checkpoint = _model(root)
    flags = ["-c", str(config), "-w", str(checkpoint), "--mpp", "2.0", "--tile", "256", "--overlap", "32", "-q"]
    cli = [sys.executable, "-m", "densevision.cli", "segment"]
    runs = {name: root / name for name in ("loop", "cohort", "ranks2")}
    for folder in runs.values():
        shutil.rmtree(folder, ignore_errors=True)

    loop = sum(_timed([*cli, str(s), "-o", str(runs["loop"] / f"{s.stem}.tif"), *flags]) for s in slides)
    one = _timed([*cli, str(inputs), "-o", str(runs["cohort"]), *flags])
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    two = _timed([*torchrun, "-m", "densevision.cli", "segment", str(inputs), "-o", str(runs["ranks2"]), *flags])
    same = all(
        (runs[k] / f"{s.stem}.tif").read_bytes() == (runs["loop"] / f"{s.stem}.tif").read_bytes()
        for k in ("cohort", "ranks2")
        for s in slides
    )
    print(f"{args.slides} slides of {args.size}^2 at 2 um/px, tile 256, cpu cores: {os.cpu_count()}")
    print("| run | wall s | per slide s | ratio |")
    print("|---|---|---|---|")
    print(f"| shell loop of single-image commands | {loop:.1f} | {loop / args.slides:.2f} | 1.00 |")
    print(f"| one cohort command, 1 process | {one:.1f} | {one / args.slides:.2f} | {one / loop:.2f} (vs loop) |")
    print(f"| one cohort command, torchrun 2 ranks | {two:.1f} | {two / args.slides:.2f} | {two / one:.2f} (vs 1) |")
    print(f"outputs byte-identical to the loop's: {same}")


if __name__ == "__main__":
    main()
