"""Train the seam benchmark's UperNet-Swin-T on a GPU machine, in two variants side by side, and keep the one whose
mmseg slide inference agrees best with its whole-image inference.

Written for a machine whose Python has torch but neither GDAL nor the OpenMMLab stack: the wheels of mmcv (built
against that torch by tools/install.sh), mmengine, mmsegmentation and their pure-Python needs go on ``PYTHONPATH``
first. The variants differ only in their training crops (512 px x 8, 256 px x 16, or the whole mosaics x 4); all
see the same generated mosaics with labelled object edges, in bfloat16 AMP, for the same time. In OUT:
``variants.json`` (each variant's reference agreement, the kept run's ``result.json`` and config text),
``train.log`` and the kept float16 weights in 15 MiB pieces (``model_half.pth.part-*``). On the CPU machine, in the
same work folder (the same path on both), write back the config and ``result.json``, ``cat`` the pieces into
``model_half.pth`` and run ``seam_bench.py`` with the kept variant's arguments (``variants.json`` lists them).

    PYTHONPATH=$SITE:. python3 benchmarks/seam_train_gpu.py OUT --seconds 250 --limit 450
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import seam_bench

WORK = Path("/tmp/densevision-bench/seams")  # the same on both machines: result.json names files in it
COMMON = ["--train-mosaic", "--label-edges", "--amp", "--head-channels", "128",
          "--lr", "2e-4", "--half", "--device", "cuda", "--workdir", str(WORK)]  # fmt: skip
VARIANTS = {
    "crop512": ["--crop", "512", "--batch-size", "8"],
    "crop256": ["--crop", "256", "--batch-size", "16"],
    "whole": ["--batch-size", "4"],  # the mosaics uncropped: whole-image inference in the training distribution
}
PIECE = 15 << 20


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("out", type=Path)
    p.add_argument("--seconds", type=float, default=300, help="training time of each variant (they run together)")
    p.add_argument(
        "--limit", type=float, help="wall-clock limit of the training runs (default: --seconds + 150 for loading,\n"
        "the probe and the reference predictions)",
    )  # fmt: skip
    p.add_argument("--variants", nargs="+", choices=VARIANTS, default=["crop512", "crop256"], help="run side by side")
    p.add_argument("--train-images", default="160", help="generated training mosaics (default 160)")
    args = p.parse_args()
    variants = {name: VARIANTS[name] for name in args.variants}
    limit = args.limit or args.seconds + 150
    started = time.time()
    common = [*COMMON, "--train-seconds", f"{args.seconds:g}", "--train-images", args.train_images]
    settings = {name: seam_bench.parse_args([*common, *v]) for name, v in variants.items()}
    seam_bench.training_data(seam_bench.parse_args([*common, "--processes", "16"]))
    print(f"data ready after {time.time() - started:.0f} s", flush=True)
    logs, procs = {}, {}
    for name, v in variants.items():
        logs[name] = WORK / f"{name}.log"
        command = [sys.executable, "benchmarks/seam_bench.py", *common, *v, "--reference-only", "--processes", "6"]
        procs[name] = subprocess.Popen(command, stdout=logs[name].open("w"), stderr=subprocess.STDOUT)
    deadline = time.time() + limit
    for proc in procs.values():
        try:
            proc.wait(timeout=max(1.0, deadline - time.time()))
        except subprocess.TimeoutExpired:
            proc.kill()
    with (args.out / "train.log").open("w") as f:
        for name, log in logs.items():
            lines = [x for x in log.read_text(errors="replace").splitlines() if "warn" not in x.lower()]
            f.write(f"== {name}\n" + "\n".join(lines[-60:]) + "\n")
    report: dict[str, dict] = {}
    for name, s in settings.items():
        run = WORK / seam_bench.training_name(s)
        ref = run / "reference.json"
        report[name] = {"args": variants[name], "run": str(run), "exit": procs[name].returncode}
        if ref.is_file():
            report[name] |= json.loads(ref.read_text())
    done = [n for n in report if "agreement" in report[n]]
    best = max(done, key=lambda n: report[n]["agreement"]) if done else salvage(report)
    run = Path(report[best]["run"])
    kept = {"kept": best, "common": common, "result": json.loads((run / "result.json").read_text())}
    kept["config_text"] = Path(kept["result"]["config"]).read_text()
    (args.out / "variants.json").write_text(json.dumps({"variants": report} | kept, indent=1))
    data = (run / "model_half.pth").read_bytes()
    for i in range(0, len(data), PIECE):
        (args.out / f"model_half.pth.part-{i // PIECE}").write_bytes(data[i : i + PIECE])
    keys = ("agreement", "miou_whole", "miou_slide", "iterations", "exit")
    print(json.dumps({n: {k: r.get(k) for k in keys} for n, r in report.items()}), flush=True)
    print(f"kept {best}; {time.time() - started:.0f} s", flush=True)
    return 0


def salvage(report: dict[str, dict]) -> str:
    """No variant finished: the first one's last periodic checkpoint, saved as a finished run would be."""
    name = next(iter(report))
    run = Path(report[name]["run"])
    last = (run / "last_checkpoint").read_text().strip()
    seam_bench.save_half(last, run / "model_half.pth")
    result = {"config": str(next(run.glob("*.py"))), "checkpoint": last, "losses": [], "seconds": None,
              "iterations": int(Path(last).stem.split("_")[1]), "half": str(run / "model_half.pth")}  # fmt: skip
    (run / "result.json").write_text(json.dumps(result))
    print(f"no variant finished: kept {name} at {last}", flush=True)
    return name


if __name__ == "__main__":
    sys.exit(main())
