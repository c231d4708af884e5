"""segment_image end to end: memory against image size, engine overhead, and mmsegmentation's slide inference.

Three parts, each printed as a markdown table; every measurement runs in a fresh child process whose peak resident
memory (``VmHWM``; reader workers' largest peak from ``RUSAGE_CHILDREN``) is reported.

1. ``memory``: ``segment_image`` with a cheap fixed model (:class:`SaturationConv`: a 3 x 3 box filter and
   saturation logits, 2 classes, ``size_divisor=32``) on generated pyramidal JPEG slides of growing size
   (``make_slide``, shared with ``read_memory.py``; reused when present in ``--workdir``): tile 512, overlap 64,
   gaussian blend, 2 workers, glass skipped. Is peak RSS flat in the image size?
2. ``overhead``: on one slide (default 16384^2), tiles/s of raw ``read_region`` over the same grid (1 and 2
   processes), of the engine's reader alone (``TileDataset`` + DataLoader, no model), of the model alone (batches
   in memory), and of ``segment_image`` end to end (all tiles, ``skip_empty=False``), with 0 and 2 workers; then with
   :class:`NullModel` (zero logits, the host path's ceiling) for each class count of ``--classes`` (default 2 150).
3. ``mmseg``: a small real mmseg model (the project's UperNet + Swin-T config shrunk with cfg_options, random
   weights saved as an mmengine checkpoint) on a generated 8192^2 GeoTIFF: mmseg's ``slide_inference`` on the
   whole image as one tensor (crop 512, stride 448) against ``segment_image(..., tile=512, overlap=64,
   blend="constant", probability_output=True)``: time, peak RSS, and the largest difference of the softmax
   probabilities (compared band by band in row windows).

``--append`` adds the tables to benchmarks/README.md with the command, date, machine and versions.

    nice -n 10 python benchmarks/segment_bench.py                       # all parts, slides 4096^2 16384^2 32768^2
    python benchmarks/segment_bench.py --parts memory --sizes 4096 65536 # the 4.3-gigapixel slide (about 15 min)
    python benchmarks/segment_bench.py --parts mmseg --mmseg-size 4096 --append
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import resource
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch
from _common import Part, host, parse_size, peak_rss_mb

REPO = Path(__file__).resolve().parents[1]
README = REPO / "benchmarks" / "README.md"
MMSEG_CONFIG = REPO / "configs" / "segmentation" / "upernet_swin-t_ade20k-512.py"
MMSEG_CLASSES = ("background", "tumor", "stroma", "necrosis", "fat")
PARTS = ("memory", "overhead", "mmseg", "gpu")
KEEP_SLIDE_PIXELS = 16384 * 16384  # --clean keeps slides up to this size (read_memory.py uses them too)
LOAD_NOTE = f' "load": the 1-minute load average as the measurement ended ({os.cpu_count()} CPUs).'


def mmseg_options(tile: int, stride: int, *, full: bool = False) -> dict[str, Any]:
    """The project's UperNet + Swin-T shrunk to finish in minutes on a CPU (same architecture, fewer channels), or
    with ``full`` the config's own sizes (for the GPU part); both with this script's classes and mmseg's slide mode."""
    common = {
        "model.decode_head.num_classes": len(MMSEG_CLASSES),
        "model.auxiliary_head.num_classes": len(MMSEG_CLASSES),
        "model.data_preprocessor.size": None,
        "model.test_cfg.mode": "slide",
        "model.test_cfg.crop_size": (tile, tile),
        "model.test_cfg.stride": (stride, stride),
    }
    if full:
        return common
    return common | {
        "model.backbone.embed_dims": 32,
        "model.backbone.depths": [1, 1, 1, 1],
        "model.backbone.num_heads": [1, 2, 4, 8],
        "model.decode_head.in_channels": [32, 64, 128, 256],
        "model.decode_head.channels": 64,
        "model.auxiliary_head.in_channels": 128,
        "model.auxiliary_head.channels": 64,
    }


class NullModel:
    """A model that costs nothing: zero logits for ``num_classes`` classes at the input's size, on its device, the
    same tensor every call (as a model with a static output buffer, e.g. a CUDA graph's: 4 x 150 x 512² float32 is
    629 MB, whose allocation alone took 0.23 s a batch). What ``segment_image`` sustains with it is the host path's
    ceiling (reading, blending, reducing, writing)."""

    size_divisor = 32
    device = torch.device("cpu")

    def __init__(self, num_classes: int) -> None:
        self.num_classes = num_classes
        self._out: torch.Tensor | None = None
        self.class_names = tuple(f"class_{i}" for i in range(num_classes))
        self.palette = tuple(((37 * i) % 256, (91 * i) % 256, (151 * i) % 256) for i in range(num_classes))

    def __call__(self, batch: torch.Tensor) -> torch.Tensor:
        shape = (len(batch), self.num_classes, *batch.shape[-2:])
        if self._out is None or self._out.shape != shape or self._out.device != batch.device:
            self._out = torch.zeros(shape, device=batch.device)
        return self._out


class SaturationConv(torch.nn.Module):
    """A cheap fixed model: 3 x 3 box filter per channel, then 'glass' / 'stained' logits from the saturation."""

    num_classes = 2
    class_names = ("glass", "stained")
    palette = ((200, 200, 200), (180, 0, 180))
    size_divisor = 32
    device = torch.device("cpu")

    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 3, 3, padding=1, bias=False)
        with torch.no_grad():
            self.conv.weight.zero_()
            for c in range(3):
                self.conv.weight[c, c] = 1 / 9

    @torch.no_grad()
    def forward(self, batch: torch.Tensor) -> torch.Tensor:
        x = self.conv(batch)
        hi, lo = x.max(dim=1).values, x.min(dim=1).values
        sat = (hi - lo) / hi.clamp(min=1)
        return torch.stack([0.1 - sat, sat - 0.1], dim=1)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--parts", nargs="+", choices=PARTS, default=list(PARTS), help="what to measure (default: all)")
    p.add_argument(
        "--sizes",
        nargs="+",
        default=["4096", "16384", "32768"],
        help="part 1 slide sizes, N (N x N) or WxH; default 4096 16384 32768 (65536, 4.3 Gpx, takes about 15 min\n"
        "of segmentation on 2 cores, so it is not a default)",
    )
    p.add_argument("--overhead-size", default="16384", help="part 2 slide size (default 16384)")
    p.add_argument("--mmseg-size", default="8192", help="part 3 GeoTIFF size (default 8192)")
    p.add_argument("--gpu-size", default="16384", help="part 4 slide size (default 16384; part 4 needs CUDA)")
    p.add_argument("--gpu-batch-size", type=int, default=16, help="part 4 tiles per batch (default 16)")
    p.add_argument(
        "--gpu-workers", type=int, default=min(8, os.cpu_count() or 1), help="part 4 reader workers (default 8)"
    )
    p.add_argument("--workdir", type=Path, default=Path("/tmp/densevision-bench"), help="inputs and outputs")
    p.add_argument("--tile", type=int, default=512, help="segmentation tile side (default 512)")
    p.add_argument("--overlap", type=int, default=64, help="tile overlap (default 64)")
    p.add_argument("--batch-size", type=int, default=4, help="tiles per batch (default 4)")
    p.add_argument("--workers", type=int, default=2, help="reader workers in parts 1 and 3 (default 2)")
    p.add_argument("--model-only-tiles", type=int, default=256, help="tiles timed in part 2's model-only row")
    p.add_argument(
        "--classes",
        type=int,
        nargs="*",
        default=[2, 150],
        help="part 2: class counts of the null model's end-to-end rows (zero logits; default 2 150, 150 being\n"
        "ADE20k's); none: no null-model rows",
    )
    p.add_argument("--tile-size", type=int, default=512, help="TIFF tile side of the generated slides (default 512)")
    p.add_argument("--quality", type=int, default=90, help="JPEG quality of the generated slides (default 90)")
    p.add_argument("--seed", type=int, default=0, help="content seed of the generated images and weights")
    p.add_argument("--regenerate", action="store_true", help="generate inputs even when present")
    p.add_argument("--keep-outputs", action="store_true", help="keep segmentation outputs (default: deleted)")
    p.add_argument(
        "--clean", action="store_true", help="at the end delete generated slides over 16384^2 and part 3's files"
    )
    p.add_argument("--append", action="store_true", help=f"append the results to {README.relative_to(REPO)}")
    p.add_argument("--note", default="", help="a sentence to record with --append (e.g. what else ran)")
    p.add_argument(
        "--child",
        choices=["slide", "geotiff", "checkpoint", "segment", "read", "reader", "model", "mmseg", "compare"],
        help=argparse.SUPPRESS,
    )
    p.add_argument("--path", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--width", type=int, help=argparse.SUPPRESS)
    p.add_argument("--height", type=int, help=argparse.SUPPRESS)
    p.add_argument(
        "--model", choices=["saturation", "null", "mmseg", "mmseg-full"], default="saturation", help=argparse.SUPPRESS
    )
    p.add_argument("--device", default="cpu", help=argparse.SUPPRESS)
    p.add_argument("--amp", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--gpu-device", default="cuda", help=argparse.SUPPRESS)  # cpu: part 4's code on the CPU
    p.add_argument("--checkpoint", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--blend", default="gaussian", help=argparse.SUPPRESS)
    p.add_argument("--probs", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--no-skip", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--processes", type=int, default=1, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def _childrenpeak_rss_mb() -> float:
    """The largest peak RSS of any finished child (reader workers), MiB; shared copy-on-write pages included."""
    rss = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return rss / 2**20 if sys.platform == "darwin" else rss / 1024


def _grid(width: int, height: int, args: argparse.Namespace) -> Any:
    from densevision.tiling import TileGrid

    return TileGrid(width, height, args.tile, args.overlap, divisor=SaturationConv.size_divisor)


# --- children: one fresh process per measurement -----------------------------------------------------------------


def child_slide(args: argparse.Namespace) -> dict[str, Any]:
    from densevision.synthetic.slides import make_slide

    t0 = time.perf_counter()
    make_slide(args.path, args.width, args.height, tile_size=args.tile_size, quality=args.quality, seed=args.seed)
    return {"seconds": time.perf_counter() - t0, "peak_rss_mb": peak_rss_mb()}


def child_geotiff(args: argparse.Namespace) -> dict[str, Any]:
    from densevision.synthetic.rasters import make_geotiff

    t0 = time.perf_counter()
    make_geotiff(args.path, args.width, args.height, nodata=None, seed=args.seed)
    return {"seconds": time.perf_counter() - t0, "peak_rss_mb": peak_rss_mb()}


def child_checkpoint(args: argparse.Namespace) -> dict[str, Any]:
    """Random weights of the shrunk model, saved as mmengine's Runner saves them (state_dict + dataset_meta)."""
    from mmengine.config import Config
    from mmengine.runner.checkpoint import save_checkpoint
    from mmseg.registry import MODELS
    from mmseg.utils import register_all_modules

    register_all_modules()
    cfg = Config.fromfile(str(MMSEG_CONFIG))
    cfg.merge_from_dict(mmseg_options(args.tile, args.tile - args.overlap, full=args.model == "mmseg-full"))
    torch.manual_seed(args.seed)
    model = MODELS.build(cfg.model)
    model.init_weights()
    palette = [[0, 0, 0], [255, 0, 0], [0, 255, 0], [0, 0, 255], [255, 255, 0]]
    meta = {"dataset_meta": {"classes": MMSEG_CLASSES, "palette": palette}, "seed": args.seed}
    save_checkpoint({"state_dict": model.state_dict(), "meta": meta}, str(args.path))
    return {"parameters": sum(p.numel() for p in model.parameters()), "peak_rss_mb": peak_rss_mb()}


def child_segment(args: argparse.Namespace) -> dict[str, Any]:
    from densevision import segment_image

    config = checkpoint = predictor = None
    options = None
    if args.model == "null":
        predictor = NullModel(args.classes[0])
    elif args.model != "saturation":
        config, checkpoint = MMSEG_CONFIG, args.checkpoint
        options = mmseg_options(args.tile, args.tile - args.overlap, full=args.model == "mmseg-full")
        import mmseg.apis  # noqa: F401  (imported before timing, as in the mmseg child)
    else:
        predictor = SaturationConv()
    baseline = peak_rss_mb()
    with GpuSampler(args.device) as gpu:
        t0 = time.perf_counter()
        summary = segment_image(
            args.path, config, checkpoint, out=args.out, predictor=predictor, tile=args.tile, overlap=args.overlap,
            batch_size=args.batch_size, blend=args.blend, workers=args.workers, probability_output=args.probs,
            skip_empty=not args.no_skip, cfg_options=options, progress=False, device=args.device, amp=args.amp,
        )  # fmt: skip
        seconds = time.perf_counter() - t0
    return gpu.result() | {
        "seconds": seconds,
        "tiles": summary["tiles"],
        "timings": summary["timings"],
        "output_size": summary["output_size"],
        "num_classes": len(summary["model"]["classes"]),
        "baseline_rss_mb": baseline,
        "peak_rss_mb": peak_rss_mb(),
        "workers_peak_rss_mb": _childrenpeak_rss_mb(),
    }


class GpuSampler:
    """How busy the GPU is while a run lasts: ``nvidia-smi`` sampled every 100 ms (utilisation: the share of time a
    kernel was running), and torch's peak allocated memory. Does nothing on the CPU."""

    def __init__(self, device: str) -> None:
        self.on = device.startswith("cuda")
        self.proc: subprocess.Popen[str] | None = None
        self.samples = ""

    def __enter__(self) -> GpuSampler:
        if self.on:
            torch.cuda.reset_peak_memory_stats()
            query = ["nvidia-smi", "--query-gpu=utilization.gpu,memory.used", "--format=csv,noheader,nounits"]
            with contextlib.suppress(OSError):
                self.proc = subprocess.Popen([*query, "-lms", "100"], stdout=subprocess.PIPE, text=True)
        return self

    def __exit__(self, *exc: object) -> None:
        if self.proc is not None:
            self.proc.terminate()
            self.samples = self.proc.communicate()[0]

    def result(self) -> dict[str, Any]:
        if not self.on:
            return {}
        busy = [float(line.split(",")[0]) for line in self.samples.splitlines() if "," in line]
        return {
            "gpu_name": torch.cuda.get_device_name(),
            "gpu_busy_mean": sum(busy) / len(busy) if busy else float("nan"),
            "gpu_busy_samples": len(busy),
            "gpu_peak_allocated_mb": torch.cuda.max_memory_allocated() / 2**20,
        }


def _read_tiles(path: str, boxes: list[tuple[int, int, int]]) -> int:
    """Read ``(x, y, size)`` windows of level 0 with ``densevision.open_image(...).read_region``; pixel sum."""
    import numpy as np

    import densevision

    total = 0
    with densevision.open_image(path) as src:
        for x, y, s in boxes:
            total += int(src.read_region((x, y), 0, (s, s)).pixels.sum(dtype=np.uint64))
    return total


def child_read(args: argparse.Namespace) -> dict[str, Any]:
    """Raw reading: every tile of the grid through ``read_region``, in 1 process or split over ``--processes``."""
    import multiprocessing

    import densevision

    with densevision.open_image(args.path) as src:
        width, height = src.size
    boxes = [(t.x, t.y, t.width) for t in _grid(width, height, args)]
    baseline = peak_rss_mb()
    t0 = time.perf_counter()
    if args.processes <= 1:
        checksum = _read_tiles(str(args.path), boxes)
    else:
        n = args.processes
        chunks = [boxes[i * len(boxes) // n : (i + 1) * len(boxes) // n] for i in range(n)]
        with multiprocessing.get_context("fork").Pool(n) as pool:
            checksum = sum(pool.starmap(_read_tiles, [(str(args.path), c) for c in chunks]))
    seconds = time.perf_counter() - t0
    return {
        "seconds": seconds,
        "tiles": len(boxes),
        "checksum": checksum,
        "baseline_rss_mb": baseline,
        "peak_rss_mb": peak_rss_mb(),
        "workers_peak_rss_mb": _childrenpeak_rss_mb(),
    }


def child_reader(args: argparse.Namespace) -> dict[str, Any]:
    """The engine's reader alone: TileDataset + DataLoader batches over every tile of the grid, no model."""
    import densevision
    from densevision.engine.reader import TileDataset, read_geometry, tile_loader

    with densevision.open_image(args.path) as src:
        width, height = src.size
        geometry = read_geometry(src)
    tiles = list(_grid(width, height, args))
    dataset = TileDataset(args.path, tiles, geometry, {"bands": None})
    baseline = peak_rss_mb()
    t0 = time.perf_counter()
    n = 0
    for batch in tile_loader(dataset, batch_size=args.batch_size, workers=min(args.workers, len(dataset))):
        n += len(batch)
    seconds = time.perf_counter() - t0
    return {
        "seconds": seconds,
        "tiles": n,
        "baseline_rss_mb": baseline,
        "peak_rss_mb": peak_rss_mb(),
        "workers_peak_rss_mb": _childrenpeak_rss_mb(),
    }


def child_model(args: argparse.Namespace) -> dict[str, Any]:
    """The model alone on in-memory batches of real tiles (read before timing): its share of segment_image."""
    import numpy as np

    import densevision

    model = SaturationConv()
    t = args.tile
    with densevision.open_image(args.path) as src:
        w, h = src.size
        tiles = [src.read_region(((w - t) // 2 + i * t, (h - t) // 2), 0, (t, t)).pixels for i in range(-2, 2)]
    batch = torch.from_numpy(np.stack(tiles).transpose(0, 3, 1, 2).astype(np.float32))[: args.batch_size]
    baseline = peak_rss_mb()
    n = 0
    t0 = time.perf_counter()
    while n < args.model_only_tiles:
        model(batch).float().cpu().numpy()
        n += len(batch)
    seconds = time.perf_counter() - t0
    return {"seconds": seconds, "tiles": n, "baseline_rss_mb": baseline, "peak_rss_mb": peak_rss_mb()}


def child_mmseg(args: argparse.Namespace) -> dict[str, Any]:
    """mmsegmentation's own slide inference: the whole image as one tensor, softmax saved as ``.npy``."""
    import numpy as np
    import rasterio
    from mmseg.apis import init_model

    from densevision.compat import patch_mmengine

    t0 = time.perf_counter()
    patch_mmengine()
    options = mmseg_options(args.tile, args.tile - args.overlap)
    model = init_model(str(MMSEG_CONFIG), str(args.checkpoint), device="cpu", cfg_options=options)
    t1 = time.perf_counter()
    with rasterio.open(args.path) as src:
        data = src.read()  # 3 x H x W uint8, RGB
    h, w = data.shape[1:]
    bgr = torch.from_numpy(np.ascontiguousarray(data[::-1])).float()  # what mmseg's cv2 loader would give
    del data
    t2 = time.perf_counter()
    meta = {"img_shape": (h, w), "ori_shape": (h, w), "pad_shape": (h, w)}
    with torch.no_grad():
        inputs = model.data_preprocessor({"inputs": [bgr]}, False)["inputs"]
        del bgr
        logits = model.slide_inference(inputs, [meta])[0]
        del inputs
        t3 = time.perf_counter()
        probs = torch.softmax(logits, dim=0)
        del logits
    t4 = time.perf_counter()
    np.save(args.out, probs.numpy())
    t5 = time.perf_counter()
    return {
        "seconds": t4 - t0,
        "seconds_model": t1 - t0,
        "seconds_read": t2 - t1,
        "seconds_inference": t3 - t2,
        "seconds_softmax": t4 - t3,
        "seconds_save": t5 - t4,
        "size": [w, h],
        "peak_rss_mb": peak_rss_mb(),
    }


def child_compare(args: argparse.Namespace) -> dict[str, Any]:
    """Largest |densevision - mmseg| of the probabilities, band by band in row windows, and the share of pixels
    whose class differs. Low memory: the ``.npy`` is read window by window with plain file reads (a memory map
    would count the whole file in RSS once touched), and GDAL's block cache is capped at 64 MB."""
    import numpy as np
    import rasterio
    from rasterio.windows import Window

    with open(args.checkpoint, "rb") as f:  # K x H x W float32 (mmseg)
        version = np.lib.format.read_magic(f)
        header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        (k, h, w), fortran, dtype = header(f)
        assert not fortran, "the mmseg child saves C-order arrays"
        start = f.tell()

        def ref(b: int, y: int, n: int) -> np.ndarray:
            f.seek(start + (b * h + y) * w * dtype.itemsize)
            return np.fromfile(f, dtype=dtype, count=n * w).reshape(n, w)

        rows = 512
        diff = [0.0] * k
        differ = 0
        with rasterio.Env(GDAL_CACHEMAX=64), rasterio.open(args.path) as probs, rasterio.open(args.out) as seg:
            assert (probs.count, probs.height, probs.width) == (k, h, w), (probs.shape, (k, h, w))
            for y in range(0, h, rows):
                n = min(rows, h - y)
                best = np.full((n, w), -np.inf, dtype=np.float32)
                label = np.zeros((n, w), dtype=np.uint8)
                for b in range(k):
                    theirs = ref(b, y, n)
                    ours = probs.read(b + 1, window=Window(0, y, w, n))
                    diff[b] = max(diff[b], float(np.abs(ours - theirs).max()))
                    label[theirs > best] = b  # argmax, first maximum wins as in numpy
                    np.maximum(best, theirs, out=best)
                differ += int((seg.read(1, window=Window(0, y, w, n)) != label).sum())
    return {"max_abs_diff": diff, "class_differs": differ / (h * w), "peak_rss_mb": peak_rss_mb()}


def _run_child(args: argparse.Namespace, *extra: str, workers: int | None = None) -> dict[str, Any]:
    cmd = [sys.executable, str(Path(__file__).resolve()), *extra]
    cmd += ["--tile", str(args.tile), "--overlap", str(args.overlap), "--batch-size", str(args.batch_size)]
    cmd += ["--workers", str(args.workers if workers is None else workers), "--seed", str(args.seed)]
    cmd += ["--tile-size", str(args.tile_size), "--quality", str(args.quality)]
    cmd += ["--model-only-tiles", str(args.model_only_tiles), "--device", args.device]
    if "--classes" not in extra:
        cmd += ["--classes", *map(str, args.classes)]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
    out = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if out.returncode:
        raise SystemExit(f"child {' '.join(extra[:2])} failed ({out.returncode}):\n{out.stderr[-3000:]}")
    result: dict[str, Any] = json.loads(out.stdout.strip().splitlines()[-1])
    result["load"] = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")  # how busy the machine was
    print(f"  {' '.join(extra[:2])}: {result}", file=sys.stderr, flush=True)
    return result


def _generated(args: argparse.Namespace, path: Path, *extra: str) -> dict[str, Any]:
    """Generate ``path`` in a child unless it is present beside its generation record (``.json``)."""
    record = path.with_suffix(".json")
    if args.regenerate or not (path.is_file() and record.is_file()):
        result = _run_child(args, *extra, "--path", str(path))
        record.write_text(json.dumps(result))
        return result | {"reused": False}
    return dict(json.loads(record.read_text())) | {"reused": True}


def slide(args: argparse.Namespace, width: int, height: int) -> tuple[Path, dict[str, Any]]:
    args.workdir.mkdir(parents=True, exist_ok=True)
    path = args.workdir / f"synthetic-{width}x{height}-t{args.tile_size}-q{args.quality}-s{args.seed}.tiff"
    gen = _generated(args, path, "--child", "slide", "--width", str(width), "--height", str(height))
    return path, gen


def _out(args: argparse.Namespace, name: str) -> Path:
    d = args.workdir / "segment_bench-out"
    d.mkdir(parents=True, exist_ok=True)
    _drop_outputs(args, d / name, always=True)  # a previous run's outputs, or an interrupted run's work folder
    return d / name


def _drop_outputs(args: argparse.Namespace, out: Path, *, always: bool = False) -> None:
    """Delete ``out`` and everything beside it named after it (summary, preview, probabilities, a work folder)."""
    if always or not args.keep_outputs:
        for p in out.parent.glob(out.stem + ".*"):
            if p.is_dir():
                shutil.rmtree(p, ignore_errors=True)
            else:
                p.unlink(missing_ok=True)


# --- part 1: memory against image size ---------------------------------------------------------------------------


def part_memory(args: argparse.Namespace) -> Part:
    rows = []
    for width, height in sorted((parse_size(s) for s in args.sizes), key=lambda wh: wh[0] * wh[1]):
        print(f"memory: {width} x {height} ...", file=sys.stderr, flush=True)
        path, gen = slide(args, width, height)
        out = _out(args, f"memory-{width}x{height}.tif")
        r = _run_child(args, "--child", "segment", "--path", str(path), "--out", str(out), "--blend", "gaussian")
        _drop_outputs(args, out)
        rows.append({"width": width, "height": height, "generate": gen, **r})
    head = (
        "| size (px) | Gpx | generate s | tiles total / done / skipped | wall s | tiles/s (done) | "
        "wait / predict / consume s | baseline RSS MiB | peak RSS MiB | above baseline MiB | "
        "workers' peak MiB | load |"
    )
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        t, tm, gen = r["tiles"], r["timings"], r["generate"]
        lines.append(
            f"| {r['width']} x {r['height']} | {r['width'] * r['height'] / 1e9:.2f} | "
            f"{gen['seconds']:.0f}{' (reused)' if gen['reused'] else ''} | "
            f"{t['total']} / {t['done']} / {t['skipped']} | {r['seconds']:.1f} | {t['done'] / r['seconds']:.1f} | "
            f"{tm.get('seconds_waiting_for_tiles', 0):.0f} / {tm.get('seconds_predicting', 0):.0f} / "
            f"{tm.get('seconds_consuming', 0):.0f} | {r['baseline_rss_mb']:.0f} | {r['peak_rss_mb']:.0f} | "
            f"{r['peak_rss_mb'] - r['baseline_rss_mb']:.0f} | {r['workers_peak_rss_mb']:.0f} | "
            f"{r['load']:.1f} |"
        )
    small, big = rows[0], rows[-1]
    ratio = big["peak_rss_mb"] / small["peak_rss_mb"]
    above = (big["peak_rss_mb"] - big["baseline_rss_mb"]) / (small["peak_rss_mb"] - small["baseline_rss_mb"])
    lines += [
        "",
        f"Peak RSS, largest / smallest slide ({big['width']} x {big['height']} vs {small['width']} x "
        f"{small['height']}, {big['width'] * big['height'] / (small['width'] * small['height']):.0f}x the pixels): "
        f"{ratio:.2f} (goal <= 1.3: {'met' if ratio <= 1.3 else 'NOT met'}); above the baseline (imports + "
        f"model): {above:.2f}. Model: the fixed 3 x 3 box filter + saturation logits ({small['num_classes']} "
        f"classes); tile {args.tile}, overlap {args.overlap}, batch {args.batch_size}, gaussian blend, "
        f'{args.workers} workers, glass tiles skipped. "wait / predict / consume": segment_image\'s own split '
        "(waiting for tiles, model, stitching). Workers' peak: the largest reader worker (shared copy-on-write "
        "pages counted)." + LOAD_NOTE,
    ]
    headline = (
        f"Memory: `segment_image` peaks at {small['peak_rss_mb']:.0f} MiB on {small['width']} x {small['height']} and "
        f"{big['peak_rss_mb']:.0f} MiB on {big['width']} x {big['height']} ({big['width'] * big['height'] / 1e9:.2g} "
        f"Gpx): ratio {ratio:.2f} (goal <= 1.3)."
    )
    return Part("\n".join(lines), [headline])


# --- part 2: engine overhead -------------------------------------------------------------------------------------


def part_overhead(args: argparse.Namespace) -> Part:
    width, height = parse_size(args.overhead_size)
    print(f"overhead: {width} x {height} ...", file=sys.stderr, flush=True)
    path, _ = slide(args, width, height)
    p = ["--path", str(path)]
    cells: list[tuple[str, str, dict[str, Any]]] = []
    for n in (1, 2):
        r = _run_child(args, "--child", "read", *p, "--processes", str(n))
        cells.append(("raw `read_region` loop (no torch)", f"{n} process{'es' if n > 1 else ''}", r))
    for w in (0, 2):
        r = _run_child(args, "--child", "reader", *p, workers=w)
        cells.append(("engine reader only (TileDataset + DataLoader)", f"workers {w}", r))
    cells.append(("model only (in-memory batches)", "-", _run_child(args, "--child", "model", *p)))
    for w in (0, 2):
        out = _out(args, f"overhead-w{w}.tif")
        r = _run_child(args, "--child", "segment", *p, "--out", str(out), "--no-skip", workers=w)
        _drop_outputs(args, out)
        cells.append(("`segment_image` end to end", f"workers {w}", r))
    end = cells[-1][2]
    nulls = []
    for k in args.classes:
        out = _out(args, f"overhead-null{k}.tif")
        r = _run_child(args, "--child", "segment", *p, "--out", str(out), "--no-skip", "--model", "null",
                       "--classes", str(k), workers=2)  # fmt: skip
        _drop_outputs(args, out)
        cells.append((f"`segment_image` end to end, null model (zero logits), K = {k}", "workers 2", r))
        nulls.append((k, r))
    raw = cells[0][2]["tiles"] / cells[0][2]["seconds"]
    raw2 = cells[1][2]["tiles"] / cells[1][2]["seconds"]
    head = "| what | parallelism | tiles | seconds | tiles/s | x raw 1-process read | wait / predict / consume s | "
    head += "peak RSS MiB | workers' peak MiB | load |"
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for what, par, r in cells:
        tm = r.get("timings")
        split = (
            f"{tm['seconds_waiting_for_tiles']:.0f} / {tm['seconds_predicting']:.0f} / {tm['seconds_consuming']:.0f}"
            if tm
            else "-"
        )
        tiles = r["tiles"]["done"] if isinstance(r["tiles"], dict) else r["tiles"]
        rate = tiles / r["seconds"]
        lines.append(
            f"| {what} | {par} | {tiles} | {r['seconds']:.1f} | {rate:.1f} | {rate / raw:.2f} | {split} | "
            f"{r['peak_rss_mb']:.0f} | {f'{workers:.0f}' if (workers := r.get('workers_peak_rss_mb')) else '-'} | "
            f"{r['load']:.1f} |"
        )
    lines += [
        "",
        f"Slide {width} x {height} (generated, reused from part 1 / read_memory.py when present); the grid of "
        f"{args.tile}-pixel tiles with overlap {args.overlap}, every tile (no glass skipping), batches of "
        f"{args.batch_size}; segment_image writes the class map (pyramid TIFF), the preview and the summary. "
        '"wait / predict / consume": segment_image\'s own split of its loop (consume = stitching; band '
        "normalisation, class map and writing run on a background thread). Model only: the same fixed model on "
        f"{args.model_only_tiles} tiles of in-memory batches, torch with {torch.get_num_threads()} threads."
        + LOAD_NOTE,
    ]
    rate = end["tiles"]["done"] / end["seconds"]
    headline = (
        f"Engine overhead ({width} x {height}, cheap model): `segment_image` end to end {rate:.1f} tiles/s with 2 "
        f"workers, {rate / raw:.2f}x a bare `read_region` loop over the same grid ({raw:.1f} tiles/s)."
    )
    headlines = [headline]
    for k, r in nulls:
        rk = r["tiles"]["done"] / r["seconds"]
        headlines.append(
            f"Host ceiling ({width} x {height}, null model, K = {k}): {rk:.1f} tiles/s with 2 workers, "
            f"{rk / raw2:.2f}x bare `read_region` in 2 processes ({raw2:.1f} tiles/s)."
        )
    return Part("\n".join(lines), headlines)


# --- part 3: against mmsegmentation ------------------------------------------------------------------------------


def part_mmseg(args: argparse.Namespace) -> Part:
    width, height = parse_size(args.mmseg_size)
    print(f"mmseg: {width} x {height} ...", file=sys.stderr, flush=True)
    args.workdir.mkdir(parents=True, exist_ok=True)
    image = args.workdir / f"geotiff-{width}x{height}-s{args.seed}.tif"
    gen = _generated(args, image, "--child", "geotiff", "--width", str(width), "--height", str(height))
    ckpt = args.workdir / f"upernet_swin-t-shrunk-{args.tile}-{args.overlap}-s{args.seed}.pth"
    _generated(args, ckpt, "--child", "checkpoint")
    npy = _out(args, f"mmseg-{width}x{height}.npy")
    ref = _run_child(args, "--child", "mmseg", "--path", str(image), "--checkpoint", str(ckpt), "--out", str(npy))
    out = _out(args, f"dv-mmseg-{width}x{height}.tif")
    dv = _run_child(
        args, "--child", "segment", "--path", str(image), "--out", str(out), "--model", "mmseg",
        "--checkpoint", str(ckpt), "--blend", "constant", "--probs", "--no-skip",
    )  # fmt: skip
    probs = out.with_name(out.stem + ".probs.tif")
    cmp = _run_child(args, "--child", "compare", "--path", str(probs), "--checkpoint", str(npy), "--out", str(out))
    npy.unlink(missing_ok=True)
    _drop_outputs(args, out)
    tm = dv["timings"]
    head = "| side | image (px) | wall s | where the time went | crops / tiles | peak RSS MiB | load |"
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    lines.append(
        f"| mmseg `slide_inference` (whole image as one tensor) | {width} x {height} | {ref['seconds']:.1f} | "
        f"model {ref['seconds_model']:.1f}, read {ref['seconds_read']:.1f}, inference "
        f"{ref['seconds_inference']:.1f}, softmax {ref['seconds_softmax']:.1f} (+ {ref['seconds_save']:.1f} "
        f"saving the .npy, not counted) | {dv['tiles']['total']} | {ref['peak_rss_mb']:.0f} | {ref['load']:.1f} |"
    )
    lines.append(
        f"| densevision `segment_image` (workers {args.workers}) | {width} x {height} | {dv['seconds']:.1f} | "
        f"wait {tm['seconds_waiting_for_tiles']:.1f}, predict {tm['seconds_predicting']:.1f}, consume "
        f"{tm['seconds_consuming']:.1f}, rest (model, outputs) "
        f"{dv['seconds'] - tm['seconds_total']:.1f} | {dv['tiles']['done']} | {dv['peak_rss_mb']:.0f} "
        f"(workers {dv['workers_peak_rss_mb']:.0f}) | {dv['load']:.1f} |"
    )
    diffs = ", ".join(f"{d:.1e}" for d in cmp["max_abs_diff"])
    lines += [
        "",
        f"densevision / mmseg: time {dv['seconds'] / ref['seconds']:.2f}, peak RSS "
        f"{dv['peak_rss_mb'] / ref['peak_rss_mb']:.2f}; densevision's model-busy fraction (predict s / wall s) "
        f"{tm['seconds_predicting'] / dv['seconds']:.2f}. Largest |difference| of the softmax probabilities per class: "
        f"{diffs}; pixels whose class differs: {cmp['class_differs']:.2e} (compared band by band in row windows, "
        f"peak RSS of the comparison {cmp['peak_rss_mb']:.0f} MiB). Model: configs/segmentation/"
        f"upernet_swin-t_ade20k-512.py shrunk (Swin embed 32, depths 1-1-1-1, heads 1-2-4-8; UPerHead 64 channels;"
        f" {len(MMSEG_CLASSES)} classes), random weights (seed {args.seed}) saved with mmengine's save_checkpoint; "
        f"mmseg: crop {args.tile}, stride {args.tile - args.overlap}; densevision: tile {args.tile}, overlap "
        f"{args.overlap}, constant blend, batch {args.batch_size}, probabilities written (float32 GeoTIFF) and the "
        f"class map (COG). Input: make_geotiff (RGB.byte.tif mosaic, no nodata), generated in "
        f"{gen['seconds']:.0f} s{' (reused)' if gen['reused'] else ''}; both sides time building the model."
        + LOAD_NOTE,
    ]
    headline = (
        f"Against mmseg `slide` inference ({width} x {height}, same UperNet-Swin and weights): time "
        f"{dv['seconds'] / ref['seconds']:.2f}x, peak RSS {dv['peak_rss_mb'] / ref['peak_rss_mb']:.2f}x, model busy "
        f"{tm['seconds_predicting'] / dv['seconds']:.2f} of the wall time, largest "
        f"probability difference {max(cmp['max_abs_diff']):.1e}."
    )
    return Part("\n".join(lines), [headline])


# --- part 4: on the GPU -----------------------------------------------------------------------------------------


def part_gpu(args: argparse.Namespace) -> Part | None:
    """Tiles/s and how busy the GPU was, with a small and the full UperNet-Swin-T; None without CUDA."""
    if args.gpu_device.startswith("cuda") and not torch.cuda.is_available():
        print("gpu: no CUDA device, skipped", file=sys.stderr, flush=True)
        return None
    g = argparse.Namespace(**vars(args))
    g.device, g.batch_size, g.workers = args.gpu_device, args.gpu_batch_size, args.gpu_workers
    width, height = parse_size(args.gpu_size)
    print(f"gpu: {width} x {height} on {g.device} ...", file=sys.stderr, flush=True)
    path, _ = slide(args, width, height)
    head = (
        "| model | precision | tiles | wall s | tiles/s | wait / predict / consume s | GPU busy % (mean of "
        "100 ms samples) | GPU peak allocated MiB | peak RSS MiB | load |"
    )
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    best = None
    for model, label in (("mmseg", "UperNet-Swin shrunk (part 3's)"), ("mmseg-full", "UperNet-Swin-T (full)")):
        ckpt = args.workdir / f"upernet_swin-t-{'full' if model == 'mmseg-full' else 'shrunk'}-{args.tile}-" \
            f"{args.overlap}-s{args.seed}.pth"  # fmt: skip
        _generated(args, ckpt, "--child", "checkpoint", "--model", model)
        for amp in (False, True):
            out = _out(args, f"gpu-{model}-{'bf16' if amp else 'fp32'}.tif")
            extra = ["--amp"] if amp else []
            r = _run_child(
                g, "--child", "segment", "--path", str(path), "--out", str(out), "--model", model,
                "--checkpoint", str(ckpt), "--no-skip", *extra,
            )  # fmt: skip
            _drop_outputs(args, out)
            tm, done = r["timings"], r["tiles"]["done"]
            lines.append(
                f"| {label} | {'bf16 autocast' if amp else 'fp32'} | {done} | {r['seconds']:.1f} | "
                f"{done / r['seconds']:.1f} | {tm['seconds_waiting_for_tiles']:.1f} / {tm['seconds_predicting']:.1f}"
                f" / {tm['seconds_consuming']:.1f} | {r.get('gpu_busy_mean', float('nan')):.0f} | "
                f"{r.get('gpu_peak_allocated_mb', float('nan')):.0f} | {r['peak_rss_mb']:.0f} | {r['load']:.1f} |"
            )
            if model == "mmseg-full" and (best is None or done / r["seconds"] > best[0]):
                best = (done / r["seconds"], r, amp)
    assert best is not None
    rate, r, amp = best
    lines += [
        "",
        f"Device: {r.get('gpu_name', g.device)}. Slide {width} x {height} (generated), every tile (no glass "
        f"skipping), tile {args.tile}, overlap {args.overlap}, batch {g.batch_size}, {g.workers} reader workers, "
        "gaussian blend, class map written. Random weights (the timing does not depend on them). 'GPU busy': "
        "nvidia-smi's utilisation, the share of time a kernel ran, averaged over the run including model building "
        "and writing; 'wait' is the time the loop waited for tiles from the readers." + LOAD_NOTE,
    ]
    headline = (
        f"GPU ({r.get('gpu_name', g.device)}): UperNet-Swin-T at {rate:.3g} tiles/s of {args.tile}^2 "
        f"({'bf16' if amp else 'fp32'}), GPU busy {r.get('gpu_busy_mean', float('nan')):.0f} % on average, "
        f"{r['timings']['seconds_waiting_for_tiles']:.1f} s of {r['seconds']:.0f} s waiting for tiles."
    )
    return Part("\n".join(lines), [headline])


# --- parent ------------------------------------------------------------------------------------------------------


def revision() -> str:
    """The checkout's commit, ``-dirty`` when files differ from it (``git describe``; read only)."""
    with contextlib.suppress(OSError, subprocess.CalledProcessError):
        cmd = ["git", "-C", str(REPO), "describe", "--always", "--dirty", "--abbrev=10"]
        return subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.strip()
    return "unknown (not a git checkout)"


def _accelerator() -> str:
    if torch.cuda.is_available():
        return f"CUDA {torch.version.cuda}, {torch.cuda.get_device_name()}"
    return "no GPU"


def machine() -> str:
    import mmcv
    import mmengine
    import mmseg
    import numpy
    import openslide
    import rasterio

    import densevision

    return (
        f"{host()}, densevision {densevision.__version__}, torch {torch.__version__} "
        f"({torch.get_num_threads()} threads; {_accelerator()}), numpy {numpy.__version__}, mmseg "
        f"{mmseg.__version__}, mmcv {mmcv.__version__}, mmengine {mmengine.__version__}, rasterio "
        f"{rasterio.__version__} (GDAL {rasterio.__gdal_version__}), openslide-python {openslide.__version__} "
        f"(OpenSlide {openslide.__library_version__})"
    )


CHILDREN = {
    "slide": child_slide,
    "geotiff": child_geotiff,
    "checkpoint": child_checkpoint,
    "segment": child_segment,
    "read": child_read,
    "reader": child_reader,
    "model": child_model,
    "mmseg": child_mmseg,
    "compare": child_compare,
}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.child:
        print(json.dumps(CHILDREN[args.child](args)))
        return 0
    started = time.perf_counter()
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    parts = {"memory": part_memory, "overhead": part_overhead, "mmseg": part_mmseg, "gpu": part_gpu}
    titles = {
        "memory": "Memory against image size",
        "overhead": "Engine overhead",
        "mmseg": "Against mmsegmentation's slide inference",
        "gpu": "On the GPU",
    }
    texts = []
    for name in PARTS:
        if name in args.parts and (part := parts[name](args)) is not None:
            texts.append(f"#### {titles[name]}\n\n{part.text}")
            print(texts[-1] + "\n", flush=True)
    minutes = (time.perf_counter() - started) / 60
    if args.append:
        command = shlex.join(["python", "benchmarks/segment_bench.py", *(sys.argv[1:] if argv is None else argv)])
        when = datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z")
        body = "\n\n".join(texts)
        with open(README, "a") as f:
            f.write(
                f"\n### {when}\n\n`{command}`\n\nMachine: {machine()}. Code: {revision()}. Load average 1 min at the "
                f"start: {load:.2f}; the whole run took {minutes:.0f} min.{' ' + args.note if args.note else ''}"
                f"\n\n{body}\n"
            )
    if args.clean:
        for p in args.workdir.glob("synthetic-*.tiff"):
            with contextlib.suppress(ValueError):
                w, h = parse_size(p.name.split("-")[1])
                if w * h > KEEP_SLIDE_PIXELS:
                    p.unlink(missing_ok=True)
                    p.with_suffix(".json").unlink(missing_ok=True)
        for pattern in ("geotiff-*", "upernet_swin-t-shrunk-*"):
            for p in args.workdir.glob(pattern):
                p.unlink(missing_ok=True)
        shutil.rmtree(args.workdir / "segment_bench-out", ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
