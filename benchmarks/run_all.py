"""Every comparison in one run, written to benchmarks/BENCHMARKS.md: where densevision stands against its peers.

The parts below run one after another in this process; each measurement runs in a fresh child process of the
script named (its docstring and benchmarks/README.md say what it measures and how):

    memory    segment_bench.py   peak RSS of segment_image on 4096^2, 16384^2 and 65536^2 generated slides
    overhead  segment_bench.py   a trivial model end to end against raw reads of the same grid (16384^2)
    mmseg     segment_bench.py   against mmsegmentation's slide inference, same model and weights (8192^2)
    sahi      detect_bench.py    against SAHI, same mmdet model and slices (8192^2): time, memory, agreement
    truth     detect_bench.py    both tools scored on planted objects (8192^2)
    seams     seam_bench.py      a trained UperNet + full Swin-T: tiled against whole-image argmax
    gpu       segment_bench.py   with CUDA only: tiles/s and how busy the GPU was (skipped without one)

BENCHMARKS.md gets the headline figures first, then every part's tables, with the machine, the library versions,
the code revision and this command; the hand-written record below its report (from the RECORD line on) is kept.
It is written beside itself and renamed when the last part is done, so an
interrupted run leaves the previous file as it was. Generated inputs and the trained seam model are reused from
``--workdir`` (default /tmp/densevision-bench).

    make bench                                              # everything; about 1.5 h on 2 CPU cores
    python benchmarks/run_all.py --parts mmseg sahi         # some parts (the report holds only those)
    python benchmarks/run_all.py --quick                    # small sizes, a few minutes: checks the driver
"""

from __future__ import annotations

import argparse
import datetime
import importlib.metadata
import os
import shlex
import sys
import time
from collections.abc import Callable
from pathlib import Path

import detect_bench
import seam_bench
import segment_bench
from _common import Part

REPO = Path(__file__).resolve().parents[1]
OUT = REPO / "benchmarks" / "BENCHMARKS.md"
# Below this line the report holds the record written by hand (measurements with their commands): a run keeps it.
RECORD = "<!-- The driver's report ends here. The record below is kept when it runs again. -->"
PARTS = ("memory", "overhead", "mmseg", "sahi", "truth", "seams", "gpu")
TITLES = {
    "memory": "Memory against image size",
    "overhead": "Engine overhead",
    "mmseg": "Segmentation against mmsegmentation's slide inference",
    "sahi": "Detection against SAHI",
    "truth": "Detection against SAHI, scored on planted objects",
    "seams": "Seams with a trained UperNet-Swin-T",
    "gpu": "On the GPU",
}
# Sizes of each part: the full run, and --quick (a check of the driver, not a result).
SIZES = {
    False: {"memory": ["4096", "16384", "65536"], "overhead": "16384", "mmseg": "8192", "detect": "8192"},
    True: {"memory": ["1024", "2048"], "overhead": "2048", "mmseg": "1024", "detect": "1024"},
}
# The seam model, trained once, then reused from the work folder: on 2 CPU cores 400 iterations (34 min); with a GPU
# (or where seam_train_gpu.py's model was copied into the work folder) its recipe, 1815 iterations in about 5 min.
SEAM_TRAINING = ["--iters", "400", "--head-channels", "256", "--batch-size", "4", "--train-images", "128"]
SEAM_GPU = [
    "--train-mosaic", "--label-edges", "--amp", "--head-channels", "128", "--lr", "2e-4", "--half",
    "--train-seconds", "250", "--train-images", "160", "--crop", "256", "--batch-size", "16",
]  # fmt: skip
SEAM_QUICK = ["--iters", "0", "--mosaic", "2x2", "--blends", "gaussian"]
PACKAGES = ("densevision", "torch", "mmcv", "mmengine", "mmsegmentation", "mmdet", "sahi", "numpy", "rasterio")


def seam_recipe(workdir: Path) -> list[str]:
    """The GPU recipe where there is a GPU or its model already is, else the CPU one."""
    import torch

    gpu = seam_bench.parse_args(["--workdir", str(workdir / "seams"), *SEAM_GPU])
    trained = (gpu.workdir / seam_bench.training_name(gpu) / "result.json").is_file()
    return SEAM_GPU if trained or torch.cuda.is_available() else SEAM_TRAINING


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--parts", nargs="+", choices=PARTS, default=list(PARTS), help="what to measure (default: all)")
    p.add_argument("--quick", action="store_true", help="small sizes and an untrained seam model (minutes)")
    p.add_argument("--workdir", type=Path, default=Path("/tmp/densevision-bench"), help="generated inputs, models")
    p.add_argument("--out", type=Path, help=f"the report (default {OUT.relative_to(REPO)}; with --quick, in workdir)")
    return p.parse_args(argv)


def plan(args: argparse.Namespace) -> dict[str, Callable[[], Part | None]]:
    """Each part as a call of its script's own code, with this run's sizes and work folder."""
    sizes, work = SIZES[args.quick], ["--workdir", str(args.workdir)]
    seg = segment_bench.parse_args(
        [*work, "--sizes", *sizes["memory"], "--overhead-size", sizes["overhead"], "--mmseg-size", sizes["mmseg"]]
        # --quick without CUDA: part 4's code on the CPU with a small slide, so that it is checked too
        + (["--gpu-size", "1024", "--gpu-device", "cpu", "--gpu-workers", "1"] if args.quick else [])
    )
    det = detect_bench.parse_args([*work, "--size", sizes["detect"]])
    seam = seam_bench.parse_args(
        ["--workdir", str(args.workdir / "seams"), *(SEAM_QUICK if args.quick else seam_recipe(args.workdir))]
    )
    return {
        "memory": lambda: segment_bench.part_memory(seg),
        "overhead": lambda: segment_bench.part_overhead(seg),
        "mmseg": lambda: segment_bench.part_mmseg(seg),
        "sahi": lambda: detect_bench.part_mmdet(det),
        "truth": lambda: detect_bench.part_truth(det),
        "seams": lambda: seam_bench.measure(seam),
        "gpu": lambda: segment_bench.part_gpu(seg),
    }


def versions() -> str:
    found = []
    for name in (*PACKAGES, "openslide-python"):
        try:
            found.append(f"{name} {importlib.metadata.version(name)}")
        except importlib.metadata.PackageNotFoundError:
            found.append(f"{name} (not installed)")
    return ", ".join(found)


def report(args: argparse.Namespace, done: dict[str, Part], command: str, started: float, load: float) -> str:
    when = datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z")
    headlines = [f"- {line}" for part in done.values() for line in part.headline]
    if "gpu" in args.parts and "gpu" not in done:  # the one part that can skip itself
        headlines.append("- On the GPU: not measured (no CUDA device on this machine).")
    lines = [
        "# Benchmarks: densevision against its peers",
        "",
        f"Written by `{command}` on {when}; the run took {(time.perf_counter() - started) / 60:.0f} min. "
        + ("**Quick run (small sizes, untrained seam model): a check of the driver, not a result.** " * args.quick),
        "",
        f"Machine: {segment_bench.machine()}.",
        "",
        f"Versions: {versions()}. Code: {segment_bench.revision()}. Load average (1 min) at the start: {load:.2f}.",
        "",
        "Every figure comes from fresh child processes of the scripts in benchmarks/ (see benchmarks/README.md for "
        "what each measures and how to read it). Ratios are densevision / the other tool, measured side by side in "
        "this run.",
        "",
        "## Headlines",
        "",
        *headlines,
    ]
    for name, part in done.items():
        lines += ["", f"## {TITLES[name]}", "", part.text.strip("\n")]
    return "\n".join(lines) + "\n"


def kept_record(out: Path) -> str:
    """The hand-written record of ``out`` (from the :data:`RECORD` line on), to follow a new report; empty when
    there is none."""
    text = out.read_text() if out.is_file() else ""
    at = text.find(RECORD)
    return "" if at < 0 else "\n" + text[at:]


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    out = args.out or (args.workdir / "BENCHMARKS-quick.md" if args.quick else OUT)
    if {"sahi", "truth"} & set(args.parts):
        try:
            import sahi  # noqa: F401
        except ImportError:
            print("sahi is not installed: pip install -e '.[bench]' (make bench does), or leave out sahi and truth")
            return 2
    command = shlex.join(["python", "benchmarks/run_all.py", *(sys.argv[1:] if argv is None else argv)])
    started = time.perf_counter()
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    calls = plan(args)
    done: dict[str, Part] = {}
    partial = out.with_name(out.name + ".partial")
    for name in PARTS:
        if name not in args.parts:
            continue
        print(f"=== {name} ===", file=sys.stderr, flush=True)
        part = calls[name]()
        if part is not None:
            done[name] = part
            partial.write_text(report(args, done, command, started, load))  # what is done so far, if it stops
    partial.write_text(report(args, done, command, started, load) + kept_record(out))
    partial.replace(out)
    print(f"wrote {out}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
