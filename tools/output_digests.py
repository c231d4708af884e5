"""SHA-256 of what ``densevision segment`` / ``detect`` write for the demo's inputs, to show that a change leaves the
outputs byte-identical: run it on the old code, then on the new one with the old run's inputs and models, and
compare.

    PYTHONPATH=/tmp/old-checkout python tools/output_digests.py /tmp/digests/old
    python tools/output_digests.py /tmp/digests/new --inputs-from /tmp/digests/old --compare /tmp/digests/old

The first run builds the demo's inputs and trains its models (``densevision demo --size tiny``); every run then
segments and detects those inputs through the command line with several settings (blends, probabilities, COCO
results, the overview, slide and raster coordinates) and writes ``digests.json``. Summaries and logs hold timings
and paths, so they are left out.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import subprocess
import sys
from pathlib import Path

HASHED = (".tif", ".tiff", ".geojson", ".json", ".png")


def _cli(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "densevision.cli", *args, "-q"], check=True)


def _runs(inputs: Path, out: Path) -> None:
    demo = json.loads((inputs / "demo" / "demo_summary.json").read_text())
    seg, det = demo["segmentation"]["model"], demo["detection"]["model"]
    slide, scene = demo["segmentation"]["input"], demo["detection"]["input"]
    seg_model = ["-c", seg["config"], "-w", seg["checkpoint"]]
    det_model = ["-c", det["config"], "-w", det["checkpoint"]]
    for blend in ("gaussian", "crop"):
        _cli("segment", slide, *seg_model, "-o", str(out / f"slide.{blend}.tif"), "--blend", blend, "--probabilities")
    _cli("segment", scene, *seg_model, "-o", str(out / "scene.classes.tif"), "--tile", "256", "--overlap", "32")
    _cli("detect", scene, *det_model, "-o", str(out / "scene.objects.geojson"), "--tile", "256", "--overlap", "64",
         "--coco", str(out / "scene.objects.coco.json"))  # fmt: skip
    _cli("detect", scene, *det_model, "-o", str(out / "scene.overview.geojson"), "--tile", "256", "--overlap", "64",
         "--overview", "--native-crs")  # fmt: skip
    _cli("detect", slide, *det_model, "-o", str(out / "slide.objects.geojson"), "--tile", "256", "--overlap", "64",
         "--score-threshold", "0.05", "--merge", "greedy_nmm", "--match", "iou")  # fmt: skip


def _digests(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file() and p.suffix in HASHED and not p.name.endswith((".summary.json", "demo_summary.json"))
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", type=Path, help="folder for this run's outputs and digests.json")
    parser.add_argument("--inputs-from", type=Path, help="an earlier run's folder: reuse its demo inputs and models")
    parser.add_argument("--compare", type=Path, help="an earlier run's folder: report files whose bytes differ")
    parser.add_argument("--data", type=Path, help="the demo's sample data (default: the demo's own default)")
    args = parser.parse_args()
    inputs = args.inputs_from or args.out
    if args.inputs_from is None:
        data = ["--data", str(args.data)] if args.data else []
        _cli("demo", "--size", "tiny", "--out", str(args.out / "demo"), "--cache-dir", str(args.out / "cache"), *data)
    runs = args.out / "runs"
    runs.mkdir(parents=True, exist_ok=True)
    _runs(inputs, runs)
    digests = _digests(runs)
    (args.out / "digests.json").write_text(json.dumps(digests, indent=2))
    print(f"{len(digests)} outputs hashed: {args.out / 'digests.json'}")
    if args.compare is None:
        return 0
    before = json.loads((args.compare / "digests.json").read_text())
    differ = sorted(k for k in before.keys() | digests.keys() if before.get(k) != digests.get(k))
    for k in differ:
        print(f"differs: {k}")
    print("byte-identical" if not differ else f"{len(differ)} of {len(before)} outputs differ")
    return 1 if differ else 0


if __name__ == "__main__":
    sys.exit(main())
