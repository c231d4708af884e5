"""Peak memory and speed of windowed reading as the slide grows: is memory flat in the image size?

For each size, generates a synthetic pyramidal JPEG slide (``densevision.synthetic.slides.make_slide``; reused when
already present in ``--workdir`` with the same parameters), then reads all of level 0 in ``--window`` x
``--window`` windows, row-major, once through ``densevision.open_image(...).read_region`` and once through raw
``openslide.OpenSlide.read_region``. Every generation and every read runs in a fresh child process, whose peak
resident memory (``VmHWM``) is reported. Prints a markdown table; ``--append`` adds it to benchmarks/README.md with
the command, date, machine and versions.

    nice -n 10 python benchmarks/read_memory.py                      # 4096^2, 16384^2, 32768^2 (1.07 Gpx)
    python benchmarks/read_memory.py --sizes 2048 8192x4096 --append
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from _common import host, parse_size, peak_rss_mb

REPO = Path(__file__).resolve().parents[1]
README = REPO / "benchmarks" / "README.md"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument(
        "--sizes",
        nargs="+",
        default=["4096", "16384", "32768"],
        help="slide sizes, N (N x N) or WxH; default: 4096 16384 32768 (the last about 1.07 gigapixels)",
    )
    p.add_argument("--workdir", type=Path, default=Path("/tmp/densevision-bench"), help="where slides are generated")
    p.add_argument("--window", type=int, default=512, help="read window side in pixels (default 512)")
    p.add_argument("--tile-size", type=int, default=512, help="TIFF tile side of the generated slides (default 512)")
    p.add_argument("--quality", type=int, default=90, help="JPEG quality of the generated slides (default 90)")
    p.add_argument("--seed", type=int, default=0, help="content seed of the generated slides (default 0)")
    p.add_argument("--source", type=Path, default=None, help="real slide to crop tiles from (default: CMU-1-Small)")
    p.add_argument("--regenerate", action="store_true", help="generate the slides even when present")
    p.add_argument("--clean", action="store_true", help="delete the generated slides at the end")
    p.add_argument("--append", action="store_true", help=f"append the results to {README.relative_to(REPO)}")
    p.add_argument("--child", choices=["generate", "read"], help=argparse.SUPPRESS)
    p.add_argument("--backend", choices=["densevision", "openslide"], help=argparse.SUPPRESS)
    p.add_argument("--path", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--width", type=int, help=argparse.SUPPRESS)
    p.add_argument("--height", type=int, help=argparse.SUPPRESS)
    return p.parse_args(argv)


# --- children: one fresh process per measurement -----------------------------------------------------------------


def child_generate(args: argparse.Namespace) -> dict[str, Any]:
    from densevision.synthetic.slides import make_slide

    kw: dict[str, Any] = {"source": args.source} if args.source else {}
    t0 = time.perf_counter()
    make_slide(args.path, args.width, args.height, tile_size=args.tile_size, quality=args.quality, seed=args.seed, **kw)
    return {"seconds": time.perf_counter() - t0, "peak_rss_mb": peak_rss_mb()}


def child_read(args: argparse.Namespace) -> dict[str, Any]:
    import numpy as np

    w = args.window
    if args.backend == "densevision":
        import densevision

        handle: Any = densevision.open_image(args.path)
        width, height = handle.size

        def read(x: int, y: int) -> np.ndarray:
            return handle.read_region((x, y), 0, (w, w)).pixels

    else:
        import openslide

        handle = openslide.OpenSlide(args.path)
        width, height = handle.dimensions

        def read(x: int, y: int) -> np.ndarray:
            return np.asarray(handle.read_region((x, y), 0, (w, w)))[..., :3]

    baseline = peak_rss_mb()
    checksum = 0
    windows = 0
    t0 = time.perf_counter()
    for y in range(0, height, w):
        for x in range(0, width, w):
            checksum += int(read(x, y).sum(dtype=np.uint64))
            windows += 1
    seconds = time.perf_counter() - t0
    handle.close()
    return {
        "seconds": seconds,
        "windows": windows,
        "checksum": checksum,
        "baseline_rss_mb": baseline,
        "peak_rss_mb": peak_rss_mb(),
    }


def _run_child(args: argparse.Namespace, *extra: str) -> dict[str, Any]:
    cmd = [sys.executable, str(Path(__file__).resolve()), *extra]
    cmd += ["--window", str(args.window), "--tile-size", str(args.tile_size), "--quality", str(args.quality)]
    cmd += ["--seed", str(args.seed)] + (["--source", str(args.source)] if args.source else [])
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, env=env)
    result: dict[str, Any] = json.loads(out.stdout.strip().splitlines()[-1])
    return result


# --- parent ------------------------------------------------------------------------------------------------------


def measure(args: argparse.Namespace, width: int, height: int) -> dict[str, Any]:
    args.workdir.mkdir(parents=True, exist_ok=True)
    stem = f"synthetic-{width}x{height}-t{args.tile_size}-q{args.quality}-s{args.seed}"
    path = args.workdir / f"{stem}.tiff"
    record = args.workdir / f"{stem}.json"  # generation record: a slide is reused only beside its record
    if args.regenerate or not (path.is_file() and record.is_file()):
        gen = _run_child(
            args, "--child", "generate", "--path", str(path), "--width", str(width), "--height", str(height)
        )
        record.write_text(json.dumps(gen))
        gen["reused"] = False
    else:
        gen = json.loads(record.read_text()) | {"reused": True}
    row: dict[str, Any] = {"width": width, "height": height, "path": str(path), "generate": gen}
    row["file_mb"] = path.stat().st_size / 2**20
    for backend in ("densevision", "openslide"):
        row[backend] = _run_child(args, "--child", "read", "--backend", backend, "--path", str(path))
        print(f"  {width}x{height} {backend}: {row[backend]}", file=sys.stderr, flush=True)
    if row["densevision"]["checksum"] != row["openslide"]["checksum"]:
        raise SystemExit(f"{path}: densevision and OpenSlide read different pixels (checksums differ)")
    return row


def table(rows: list[dict[str, Any]], window: int) -> str:
    head = (
        "| size (px) | Mpx | generate s | gen peak RSS MiB | file MiB | windows | densevision read s | "
        "windows/s | peak RSS MiB (baseline) | OpenSlide read s | windows/s | peak RSS MiB (baseline) | "
        "read time ratio dv/OpenSlide |"
    )
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        dv, os_ = r["densevision"], r["openslide"]
        gen = r["generate"]
        lines.append(
            f"| {r['width']} x {r['height']} | {r['width'] * r['height'] / 1e6:.0f} | "
            f"{gen['seconds']:.1f}{' (reused)' if gen['reused'] else ''} | {gen['peak_rss_mb']:.0f} | "
            f"{r['file_mb']:.1f} | {dv['windows']} | {dv['seconds']:.1f} | {dv['windows'] / dv['seconds']:.0f} | "
            f"{dv['peak_rss_mb']:.0f} ({dv['baseline_rss_mb']:.0f}) | {os_['seconds']:.1f} | "
            f"{os_['windows'] / os_['seconds']:.0f} | {os_['peak_rss_mb']:.0f} ({os_['baseline_rss_mb']:.0f}) | "
            f"{dv['seconds'] / os_['seconds']:.2f} |"
        )
    small, big = rows[0], rows[-1]
    lines.append("")
    lines.append(
        f"Peak RSS, largest / smallest slide ({big['width']} x {big['height']} vs {small['width']} x "
        f"{small['height']}, {big['width'] * big['height'] / (small['width'] * small['height']):.0f}x the pixels): "
        f"densevision {big['densevision']['peak_rss_mb'] / small['densevision']['peak_rss_mb']:.3f}, "
        f"OpenSlide {big['openslide']['peak_rss_mb'] / small['openslide']['peak_rss_mb']:.3f}; "
        f"generation {big['generate']['peak_rss_mb'] / small['generate']['peak_rss_mb']:.2f}. "
        f"Reads: {window} x {window} windows over all of level 0, row-major, one fresh process per cell."
    )
    return "\n".join(lines)


def machine() -> str:
    import imagecodecs
    import numpy
    import openslide
    import tifffile

    import densevision

    return (
        f"{host()}, densevision {densevision.__version__}, numpy {numpy.__version__}, "
        f"openslide-python {openslide.__version__} (OpenSlide {openslide.__library_version__}), tifffile "
        f"{tifffile.__version__}, imagecodecs {imagecodecs.__version__}"
    )


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.child:
        result = child_generate(args) if args.child == "generate" else child_read(args)
        print(json.dumps(result))
        return 0
    sizes = sorted((parse_size(s) for s in args.sizes), key=lambda wh: wh[0] * wh[1])
    rows = []
    for width, height in sizes:
        print(f"{width} x {height} ...", file=sys.stderr, flush=True)
        rows.append(measure(args, width, height))
    text = table(rows, args.window)
    print(text)
    if args.append:
        command = shlex.join(["python", "benchmarks/read_memory.py", *(sys.argv[1:] if argv is None else argv)])
        when = datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z")
        with open(README, "a") as f:
            f.write(f"\n### {when}\n\n`{command}`\n\nMachine: {machine()}.\n\n{text}\n")
    if args.clean:
        for r in rows:
            Path(r["path"]).unlink(missing_ok=True)
            Path(r["path"]).with_suffix(".json").unlink(missing_ok=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
