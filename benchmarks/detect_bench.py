"""detect_objects against SAHI's sliced prediction: time, peak memory, and agreement of the merged detections.

Both tools run the same model on the same generated GeoTIFF (``make_geotiff``, RGB.byte.tif mosaic, no nodata, with
planted objects from ``scatter_objects``) with the same tiles (SAHI's slices and densevision's grid are checked to
be identical), score threshold and the closest merge settings: densevision ``merge="nmm"``, ``match="ios"``,
``match_threshold=0.5``, class-aware; SAHI ``postprocess_type="NMM"``, ``postprocess_match_metric="IOS"``,
threshold 0.5, ``postprocess_class_agnostic=False``, ``perform_standard_pred=False`` (no full-image pass on either
side). Every run is a fresh child process, so each side's peak resident memory (``VmHWM``; densevision's reader
workers' largest peak from ``RUSAGE_CHILDREN``) is its own.

1. ``mmdet``: an mmdet detector (default: mmdet's own RTMDet-tiny config, 3 classes, with a generated checkpoint:
   seeded init, batch-norm statistics calibrated on tiles of the image, output layers scaled so that a few tens of
   boxes per tile pass the threshold; see :func:`child_checkpoint`). SAHI's ``MmdetDetectionModel`` (mmdet's
   ``DetInferencer``) against ``detect_objects``. Reported: wall time and its parts, peak RSS, raw and merged
   detection counts, and agreement: the two merged sets matched one-to-one (same class, IoU >= 0.5, most matches
   then largest total IoU; scipy ``linear_sum_assignment`` per connected group of candidate pairs).
2. ``truth``: a detector whose answer is known (densevision.synthetic ``ColourDetector``: one tight box per
   connected blob of a planted colour), wrapped as a SAHI ``DetectionModel`` subclass for SAHI's side. Each tool's
   merged objects are scored against the planted boxes: found exactly once with the box within 2 px, found once
   with a worse box, found more than once (duplicates), missed; split by where the object lies in the grid
   (inside one tile only; cut by a tile border but whole in another tile; cut in every tile that sees it).

``--config`` / ``--checkpoint`` rerun part 1 with a real trained mmdet model. The test pipeline of the config is
rewritten for SAHI's side (Resize to the tile size, no fixed-size Pad; densevision feeds tiles at their own size and
ignores the pipeline), and the rewritten config is what both sides load.

    nice -n 10 python benchmarks/detect_bench.py                      # both parts, 8192 x 8192
    python benchmarks/detect_bench.py --size 2048 --parts truth       # quick
    python benchmarks/detect_bench.py -c my_cfg.py -w my.pth --parts mmdet --append
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import importlib.metadata
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
from _common import Part, host, parse_size, peak_rss_mb

REPO = Path(__file__).resolve().parents[1]
README = REPO / "benchmarks" / "README.md"
SECTION = "## `detect_bench.py`"
MMDET_CONFIGS = REPO / ".venv" / "lib" / "python3.11" / "site-packages" / "mmdet" / ".mim" / "configs"
DEFAULT_CONFIG = "rtmdet/rtmdet_tiny_8xb32-300e_coco.py"  # under mmdet's shipped configs
DEFAULT_CLASSES = ("class_0", "class_1", "class_2")
PARTS = ("mmdet", "truth")
# The planted colours (scatter_objects' defaults) and the colour detector's classes.
COLOURS = {"green": (0, 160, 0), "blue": (20, 20, 220), "yellow": (230, 200, 0)}
# Generated checkpoint: the share of anchor points (per class) whose score passes 0.3 on the calibration tiles,
# and the spread / offset of the box-distance layer (RTMDet: distance = relu(x) * stride).
PASS_SHARE = 2e-3
CLS_STD, REG_STD, REG_BIAS = 0.1, 0.05, 2.5
CALIBRATION_TILES = 8
LOAD_NOTE = f' "load": the 1-minute load average as the side ended ({os.cpu_count()} CPUs).'


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--parts", nargs="+", choices=PARTS, default=list(PARTS), help="what to measure (default: all)")
    p.add_argument("--size", default="8192", help="image size, N (N x N) or WxH (default 8192)")
    p.add_argument("-c", "--config", type=Path, help=f"mmdet config (default: mmdet's {DEFAULT_CONFIG} with 3 classes)")
    p.add_argument("-w", "--checkpoint", type=Path, help="its checkpoint (required with --config)")
    p.add_argument("--workdir", type=Path, default=Path("/tmp/densevision-bench"), help="inputs and outputs")
    p.add_argument("--tile", type=int, default=512, help="tile / slice side (default 512)")
    p.add_argument("--overlap", type=int, default=64, help="tile overlap in pixels (default 64; SAHI: ratio 64/512)")
    p.add_argument("--batch-size", type=int, default=2, help="tiles per batch (default 2; SAHI's mmdet model: 1)")
    p.add_argument("--workers", type=int, default=2, help="densevision reader workers (default 2)")
    p.add_argument("--score-threshold", type=float, default=0.3, help="drop detections below (default 0.3)")
    p.add_argument(
        "--merge", choices=["nmm", "greedy_nmm"], default="nmm", help="nmm (SAHI NMM) or greedy_nmm (SAHI GREEDYNMM)"
    )
    p.add_argument("--match-threshold", type=float, default=0.5, help="IoS above which boxes merge (default 0.5)")
    p.add_argument("--objects", type=int, help="planted objects (default: one per 200 x 200 pixels)")
    p.add_argument("--seed", type=int, default=0, help="seed of the image, the objects and the generated weights")
    p.add_argument("--regenerate", action="store_true", help="generate the image and checkpoint even when present")
    p.add_argument("--keep-outputs", action="store_true", help="keep both sides' detections (default: deleted)")
    p.add_argument("--clean", action="store_true", help="at the end delete the generated image and checkpoint")
    p.add_argument("--append", action="store_true", help=f"add the results to {README.relative_to(REPO)}")
    p.add_argument("--note", default="", help="a sentence to record with --append (e.g. what else ran)")
    p.add_argument("--child", choices=["geotiff", "checkpoint", "densevision", "sahi", "merge"], help=argparse.SUPPRESS)
    p.add_argument("--path", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    p.add_argument(
        "--model", choices=["mmdet", "colour-constant", "colour-area"], default="mmdet", help=argparse.SUPPRESS
    )
    return p.parse_args(argv)


def _cpu_seconds() -> float:
    """User + system CPU seconds of this process and its finished children (reader workers): less sensitive than
    wall time to other jobs on a shared machine."""
    import resource

    own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def _children_peak_rss_mb() -> float:
    """The largest peak RSS of any finished child (reader workers), MiB; shared copy-on-write pages included."""
    import resource

    rss = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return rss / 2**20 if sys.platform == "darwin" else rss / 1024


def _colour_detector(scores: str) -> Any:
    """densevision.synthetic's ColourDetector; ``scores="area"``: scores grow with the box area instead of all
    being 0.9 (see :class:`AreaScored`)."""
    from densevision.synthetic.detectors import ColourDetector

    detector = ColourDetector(COLOURS)
    return AreaScored(detector) if scores == "area" else detector


class AreaScored:
    """A detector's boxes with scores ``0.5 + 0.4 * (1 - exp(-area / 2000))`` (area in px^2): a piece cut by a tile
    border scores below the whole view, as with a trained detector, and scores rarely tie."""

    def __init__(self, detector: Any) -> None:
        self.detector = detector
        for name in ("class_names", "palette", "size_divisor", "device", "has_masks"):
            setattr(self, name, getattr(detector, name))

    def __call__(self, batch: Any) -> list[Any]:
        import dataclasses

        out = []
        for d in self.detector(batch):
            area = (d.boxes[:, 2] - d.boxes[:, 0]) * (d.boxes[:, 3] - d.boxes[:, 1])
            out.append(dataclasses.replace(d, scores=0.5 + 0.4 * (1 - np.exp(-area / 2000))))
        return out


# --- children: one fresh process per measurement -----------------------------------------------------------------


def child_geotiff(args: argparse.Namespace) -> dict[str, Any]:
    """The scene: make_geotiff with ``--objects`` planted objects; their exact boxes go to ``<path>.objects.json``."""
    from densevision.synthetic.planted import scatter_objects
    from densevision.synthetic.rasters import make_geotiff

    width, height = parse_size(args.size)
    count = args.objects if args.objects is not None else width * height // 40000
    t0 = time.perf_counter()
    plant = scatter_objects(count, width, height, seed=args.seed, colors=tuple(COLOURS.values()))
    objects = make_geotiff(args.path, width, height, nodata=None, seed=args.seed, plant=plant)
    seconds = time.perf_counter() - t0
    args.path.with_suffix(".objects.json").write_text(json.dumps([o.as_dict() for o in objects]))
    return {"seconds": seconds, "objects": len(objects), "peak_rss_mb": peak_rss_mb()}


def child_checkpoint(args: argparse.Namespace) -> dict[str, Any]:
    """Weights for the default RTMDet-tiny, saved in mmengine's layout. Random weights alone detect nothing: mmdet's
    init puts every score near 0.01 and, in eval mode, the untrained batch-norm statistics shrink the features to
    about 1e-6. So: seeded ``init_weights``; batch-norm statistics measured on ``CALIBRATION_TILES`` tiles of the
    image (train-mode forwards, cumulative average); the classification layers redrawn (std ``CLS_STD``) with the
    bias set per class so that ``PASS_SHARE`` of the anchor points on those tiles score above 0.3; the box layers
    redrawn (std ``REG_STD``, bias ``REG_BIAS``) for boxes of tens of pixels. The detections mean nothing; their
    number, sizes and overlaps are those of a working detector."""
    import torch
    from mmdet.registry import MODELS
    from mmdet.utils import register_all_modules
    from mmengine.config import Config
    from mmengine.model.utils import revert_sync_batchnorm
    from mmengine.runner.checkpoint import save_checkpoint

    import densevision

    register_all_modules()
    cfg = Config.fromfile(str(args.config))
    if cfg.model.backbone.get("init_cfg"):
        cfg.model.backbone.init_cfg = None  # an ImageNet download otherwise
    torch.manual_seed(args.seed)
    model = revert_sync_batchnorm(MODELS.build(cfg.model))
    model.init_weights()
    head = model.bbox_head
    if not (hasattr(head, "rtm_cls") and hasattr(head, "rtm_reg")):
        raise SystemExit(f"{args.config}: only an RTMDet head gets generated weights; pass --checkpoint")

    rng = np.random.default_rng(args.seed)
    t = args.tile
    with densevision.open_image(args.path) as src:
        w, h = src.size
        xy = zip(
            rng.integers(0, w - t + 1, CALIBRATION_TILES), rng.integers(0, h - t + 1, CALIBRATION_TILES), strict=True
        )
        tiles = [src.read_region((int(x), int(y)), 0, (t, t)).pixels for x, y in xy]
    rgb = torch.from_numpy(np.stack(tiles).transpose(0, 3, 1, 2).astype(np.float32))
    with torch.no_grad():
        inputs = model.data_preprocessor({"inputs": list(rgb[:, [2, 1, 0]])}, False)["inputs"]  # BGR, as mmdet
        for m in model.modules():
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
                m.reset_running_stats()
                m.momentum = None
        model.train()
        model._forward(inputs)
        model.eval()

        g = torch.Generator().manual_seed(args.seed)
        logits: list[torch.Tensor] = []
        hooks = []
        for conv in head.rtm_cls:
            conv.weight.copy_(torch.randn(conv.weight.shape, generator=g) * CLS_STD)
            conv.bias.zero_()
            hooks.append(conv.register_forward_hook(lambda _m, _i, out: logits.append(out.transpose(0, 1).flatten(1))))
        for conv in head.rtm_reg:
            conv.weight.copy_(torch.randn(conv.weight.shape, generator=g) * REG_STD)
            conv.bias.fill_(REG_BIAS)
        model._forward(inputs)
        for hook in hooks:
            hook.remove()
        cut = torch.quantile(torch.cat(logits, 1), 1 - PASS_SHARE, dim=1)  # per class
        for conv in head.rtm_cls:
            conv.bias.copy_(np.log(0.3 / 0.7) - cut)
    meta = {"dataset_meta": {"classes": DEFAULT_CLASSES}, "seed": args.seed, "calibrated_on": str(args.path)}
    save_checkpoint({"state_dict": model.state_dict(), "meta": meta}, str(args.out))
    return {"parameters": sum(p.numel() for p in model.parameters()), "peak_rss_mb": peak_rss_mb()}


def _save_detections(path: Path, boxes: np.ndarray, labels: np.ndarray, scores: np.ndarray) -> None:
    path.write_text(json.dumps({"boxes": boxes.tolist(), "labels": labels.tolist(), "scores": scores.tolist()}))


def child_densevision(args: argparse.Namespace) -> dict[str, Any]:
    """detect_objects over the whole image; the merged objects (from its COCO results, level-0 pixels) to ``--out``."""
    from densevision import detect_objects

    config = checkpoint = predictor = None
    if args.model.startswith("colour"):
        predictor = _colour_detector(args.model.removeprefix("colour-"))
    else:
        config, checkpoint = args.config, args.checkpoint
        import mmdet.apis  # noqa: F401  (imported before timing, as in the SAHI child)
    coco = args.out.with_name(args.out.stem + ".coco.json")
    baseline = peak_rss_mb()
    t0 = time.perf_counter()
    summary = detect_objects(
        args.path, config, checkpoint, out=args.out.with_suffix(".geojson"), coco_out=coco, predictor=predictor,
        tile=args.tile, overlap=args.overlap, batch_size=args.batch_size, workers=args.workers, device="cpu",
        score_threshold=args.score_threshold, merge=args.merge, match="ios", match_threshold=args.match_threshold,
        skip_empty=False, progress=False,
    )  # fmt: skip
    seconds = time.perf_counter() - t0
    found = json.loads(coco.read_text())
    xywh = np.array([d["bbox"] for d in found], dtype=np.float64).reshape(-1, 4)
    boxes = np.concatenate([xywh[:, :2], xywh[:, :2] + xywh[:, 2:]], axis=1)
    labels = np.array([d["category_id"] for d in found], dtype=np.int64)
    _save_detections(args.out, boxes, labels, np.array([d["score"] for d in found]))
    return {
        "seconds": seconds,
        "cpu_seconds": _cpu_seconds(),
        "timings": summary["timings"],
        "tiles": summary["tiles"]["done"],
        "raw": summary["detections"]["raw"],
        "objects": summary["detections"]["objects"],
        "baseline_rss_mb": baseline,
        "peak_rss_mb": peak_rss_mb(),
        "workers_peak_rss_mb": _children_peak_rss_mb(),
    }


def _sahi_colour_model(detector: Any, threshold: float) -> Any:
    """ColourDetector as a SAHI DetectionModel: ``perform_inference`` on one RGB slice, boxes in slice pixels."""
    import torch
    from sahi.models.base import DetectionModel
    from sahi.prediction import ObjectPrediction
    from sahi.utils.compatibility import fix_full_shape_list, fix_shift_amount_list

    class ColourDetectionModel(DetectionModel):
        def set_model(self, model: Any, **kwargs: Any) -> None:
            self.model = model
            self.category_mapping = {str(i): n for i, n in enumerate(model.class_names)}

        def perform_inference(self, image: np.ndarray) -> None:
            batch = torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1))).float()[None]
            self._original_predictions = self.model(batch)

        def _create_object_prediction_list_from_original_predictions(
            self, shift_amount_list: Any = None, full_shape_list: Any = None
        ) -> None:
            shift = [int(v) for v in fix_shift_amount_list(shift_amount_list or [[0, 0]])[0]]
            full = fix_full_shape_list(full_shape_list)
            full = [int(v) for v in full[0]] if full else None
            dets = self._original_predictions[0]
            preds = [
                ObjectPrediction(
                    bbox=[float(v) for v in box],
                    category_id=int(label),
                    score=float(score),
                    category_name=self.category_mapping[str(int(label))],
                    shift_amount=shift,
                    full_shape=full,
                )
                for box, label, score in zip(dets.boxes, dets.labels, dets.scores, strict=True)
                if score >= self.confidence_threshold
            ]
            self._object_prediction_list_per_image = [preds]

    return ColourDetectionModel(model=detector, confidence_threshold=threshold, device="cpu")


def child_sahi(args: argparse.Namespace) -> dict[str, Any]:
    """SAHI's get_sliced_prediction on the image path (SAHI decodes the whole image into one array)."""
    from densevision.compat import patch_mmengine

    patch_mmengine()  # mmengine's torch.load under torch 2.14, before DetInferencer loads the checkpoint
    from sahi.predict import get_sliced_prediction
    from sahi.slicing import get_slice_bboxes

    from densevision.tiling import TileGrid

    if args.model == "mmdet":
        from sahi.models.mmdet import MmdetDetectionModel

    kind = {"nmm": "NMM", "greedy_nmm": "GREEDYNMM"}[args.merge]
    width, height = parse_size(args.size)
    ratio = (args.overlap + 0.5) / args.tile  # SAHI takes int(ratio * tile) pixels
    slices = get_slice_bboxes(height, width, args.tile, args.tile, False, ratio, ratio)
    grid = TileGrid(width, height, args.tile, args.overlap)
    same_grid = sorted((b[0], b[1]) for b in slices) == sorted((t.x, t.y) for t in grid)
    baseline = peak_rss_mb()
    t0 = time.perf_counter()
    if args.model == "mmdet":
        model = MmdetDetectionModel(
            model_path=str(args.checkpoint), config_path=str(args.config), device="cpu",
            confidence_threshold=args.score_threshold, image_size=args.tile,
        )  # fmt: skip
    else:
        model = _sahi_colour_model(_colour_detector(args.model.removeprefix("colour-")), args.score_threshold)
    # Keep each slice's detections before the merge (slice origin, box in slice pixels, score, class) for the
    # merge-only comparison: get_sliced_prediction calls this once per batch of slices.
    raw: list[tuple[float, ...]] = []
    convert = model.convert_original_predictions

    def convert_and_keep(shift_amount: Any = None, full_shape: Any = None) -> None:
        convert(shift_amount=shift_amount, full_shape=full_shape)
        for (sx, sy), found in zip(shift_amount, model.object_prediction_list_per_image, strict=True):
            raw.extend((sx, sy, *p.bbox.to_xyxy(), p.score.value, p.category.id) for p in found)

    model.convert_original_predictions = convert_and_keep  # type: ignore[method-assign]
    t1 = time.perf_counter()
    result = get_sliced_prediction(
        str(args.path), model, slice_height=args.tile, slice_width=args.tile, overlap_height_ratio=ratio,
        overlap_width_ratio=ratio, perform_standard_pred=False, postprocess_type=kind,
        postprocess_match_metric="IOS", postprocess_match_threshold=args.match_threshold,
        postprocess_class_agnostic=False, verbose=0, batch_size=args.batch_size, force_postprocess_type=True,
    )  # fmt: skip
    seconds = time.perf_counter() - t0
    preds = result.object_prediction_list
    boxes = np.array([p.bbox.to_xyxy() for p in preds], dtype=np.float64).reshape(-1, 4)
    labels = np.array([p.category.id for p in preds], dtype=np.int64)
    _save_detections(args.out, boxes, labels, np.array([p.score.value for p in preds], dtype=np.float64))
    args.out.with_suffix(".raw.json").write_text(json.dumps(raw))
    return {
        "seconds": seconds,
        "cpu_seconds": _cpu_seconds(),
        "seconds_model": t1 - t0,
        "durations": result.durations_in_seconds,
        "tiles": len(slices),
        "same_grid": same_grid,
        "raw": len(raw),
        "objects": len(preds),
        "image_array_mb": width * height * 3 / 2**20,
        "baseline_rss_mb": baseline,
        "peak_rss_mb": peak_rss_mb(),
    }


def child_merge(args: argparse.Namespace) -> dict[str, Any]:
    """The merges alone on the same input: the slices' detections SAHI's run kept (``--path``), merged by SAHI's
    postprocess and by densevision's ``merge_detections`` (as ``detect_objects`` calls it, and with SAHI's ranking
    and threshold: partial views not ranked down, ``>=`` the threshold). Results to ``<out>-<name>.json``."""
    from sahi.postprocess.combine import GreedyNMMPostprocess, NMMPostprocess
    from sahi.prediction import ObjectPrediction

    from densevision.stitch import merge_detections
    from densevision.tiling import TileGrid

    raw = np.array(json.loads(args.path.read_text()), dtype=np.float64).reshape(-1, 8)
    width, height = parse_size(args.size)
    grid = TileGrid(width, height, args.tile, args.overlap)
    origin, boxes = raw[:, :2], raw[:, 2:6] + np.tile(raw[:, :2], 2)
    scores, labels = raw[:, 6], raw[:, 7].astype(np.int64)
    out: dict[str, Any] = {"raw": len(raw)}

    preds = [
        ObjectPrediction(bbox=b.tolist(), category_id=int(k), score=float(v), category_name=str(k))
        for b, v, k in zip(boxes, scores, labels, strict=True)
    ]
    post = {"nmm": NMMPostprocess, "greedy_nmm": GreedyNMMPostprocess}[args.merge]
    merge = post(match_threshold=args.match_threshold, match_metric="IOS", class_agnostic=False)
    merge(preds[:2])  # SAHI picks and imports its backend on the first call
    t0 = time.perf_counter()
    merged = merge(preds)
    out["seconds_sahi"] = time.perf_counter() - t0
    _save_detections(
        args.out.with_name(args.out.stem + "-sahi.json"),
        np.array([p.bbox.to_xyxy() for p in merged], dtype=np.float64).reshape(-1, 4),
        np.array([p.category.id for p in merged], dtype=np.int64),
        np.array([p.score.value for p in merged], dtype=np.float64),
    )
    by_tile = [(t, np.flatnonzero((origin[:, 0] == t.x) & (origin[:, 1] == t.y))) for t in grid]
    variants = {
        "densevision": {},
        "densevision-sahi-like": {"edge_weight": 1.0, "threshold": float(np.nextafter(args.match_threshold, 0))},
    }
    for name, options in variants.items():
        opts = {"method": args.merge, "match": "ios", "threshold": args.match_threshold, **options}
        t0 = time.perf_counter()
        d = merge_detections(grid, [(t, boxes[i], scores[i], labels[i]) for t, i in by_tile], **opts)
        out[f"seconds_{name}"] = time.perf_counter() - t0
        _save_detections(args.out.with_name(f"{args.out.stem}-{name}.json"), d.boxes, d.labels, d.scores)
    out["peak_rss_mb"] = peak_rss_mb()
    return out


# --- comparing -----------------------------------------------------------------------------------------------------


def _load(path: Path) -> dict[str, np.ndarray]:
    d = json.loads(path.read_text())
    return {
        "boxes": np.array(d["boxes"], dtype=np.float64).reshape(-1, 4),
        "labels": np.array(d["labels"], dtype=np.int64),
        "scores": np.array(d["scores"], dtype=np.float64),
    }


def agreement(a: dict[str, np.ndarray], b: dict[str, np.ndarray], threshold: float = 0.5) -> dict[str, Any]:
    """One-to-one matching of two detection sets: same class, IoU >= ``threshold``; the most matches, then the
    largest total IoU (``linear_sum_assignment`` on each connected group of candidate pairs)."""
    from scipy.optimize import linear_sum_assignment
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    from densevision.stitch.detection import intersecting_pairs, match_values

    i, j = intersecting_pairs(a["boxes"], b["boxes"])
    iou = match_values(a["boxes"][i], b["boxes"][j], "iou")
    ok = (a["labels"][i] == b["labels"][j]) & (iou >= threshold)
    i, j, iou = i[ok], j[ok], iou[ok]
    na, nb = len(a["boxes"]), len(b["boxes"])
    graph = coo_matrix((np.ones(len(i)), (i, na + j)), shape=(na + nb, na + nb))
    _, comp = connected_components(graph, directed=False)
    matched: list[float] = []
    order = np.argsort(comp[i], kind="stable")
    for group in np.split(order, np.flatnonzero(np.diff(comp[i][order])) + 1) if len(order) else []:
        gi, gj, gv = i[group], j[group], iou[group]
        if len(group) == 1:
            matched.append(float(gv[0]))
            continue
        ri, ci = np.unique(gi, return_inverse=True)
        rj, cj = np.unique(gj, return_inverse=True)
        weight = np.zeros((len(ri), len(rj)))
        weight[ci, cj] = len(group) + 1 + gv  # any extra match outweighs every IoU gain
        rows, cols = linear_sum_assignment(weight, maximize=True)
        chosen = weight[rows, cols] > 0
        matched += (weight[rows, cols][chosen] - len(group) - 1).tolist()
    m = np.array(matched)
    return {
        "a": na,
        "b": nb,
        "matched": len(m),
        "mean_iou": float(m.mean()) if len(m) else float("nan"),
        "identical": int((m >= 0.999).sum()),
    }


GEOMETRY = ("inside one tile", "cut by a border, whole in another tile", "cut in every tile that sees it")


def object_geometry(objects: list[dict[str, Any]], width: int, height: int, tile: int, overlap: int) -> np.ndarray:
    """Per planted object: 0 inside one tile only, 1 seen by several tiles and whole in at least one, 2 whole in
    none (wider than the overlap where a border cuts it)."""
    sys.path.insert(0, str(REPO))
    from densevision.tiling.grid import axis_starts

    xs = np.array(axis_starts(width, tile, tile - overlap))
    ys = np.array(axis_starts(height, tile, tile - overlap))
    out = np.zeros(len(objects), dtype=np.int64)
    for k, o in enumerate(objects):
        whole_x = ((xs <= o["x0"]) & (o["x1"] <= xs + tile)).sum()
        whole_y = ((ys <= o["y0"]) & (o["y1"] <= ys + tile)).sum()
        seen_x = ((xs < o["x1"]) & (o["x0"] < xs + tile)).sum()
        seen_y = ((ys < o["y1"]) & (o["y0"] < ys + tile)).sum()
        whole = whole_x * whole_y
        out[k] = 2 if whole == 0 else 0 if seen_x * seen_y == 1 else 1
    return out


def score_truth(found: dict[str, np.ndarray], objects: list[dict[str, Any]], tolerance: float = 2.0) -> dict[str, Any]:
    """Each detection is given to the planted object of its class it overlaps most (IoU); per object: how many
    detections it got and, when one, whether its box is within ``tolerance`` px on every side."""
    from densevision.stitch.detection import intersecting_pairs, match_values

    names = list(COLOURS)
    truth = np.array([[o["x0"], o["y0"], o["x1"], o["y1"]] for o in objects], dtype=np.float64).reshape(-1, 4)
    label = np.array([names.index(next(n for n, c in COLOURS.items() if list(c) == o["color"])) for o in objects])

    i, j = intersecting_pairs(found["boxes"], truth)
    keep = found["labels"][i] == label[j]
    i, j = i[keep], j[keep]
    iou = match_values(found["boxes"][i], truth[j], "iou")
    best = np.full(len(found["boxes"]), -1)
    best_iou = np.zeros(len(found["boxes"]))
    for a, b, v in zip(i, j, iou, strict=True):
        if v > best_iou[a]:
            best[a], best_iou[a] = b, v
    hits = np.bincount(best[best >= 0], minlength=len(objects))
    error = np.full(len(objects), np.inf)
    for a in np.flatnonzero(best >= 0):
        error[best[a]] = np.abs(found["boxes"][a] - truth[best[a]]).max()
    return {
        "hits": hits,
        "exact": (hits == 1) & (error <= tolerance),
        "stray": int((best < 0).sum()),
    }


# --- parent ------------------------------------------------------------------------------------------------------


def _run_child(args: argparse.Namespace, *extra: str) -> dict[str, Any]:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--size", args.size, "--seed", str(args.seed)]
    cmd += ["--tile", str(args.tile), "--overlap", str(args.overlap), "--batch-size", str(args.batch_size)]
    cmd += ["--workers", str(args.workers), "--score-threshold", str(args.score_threshold), "--merge", args.merge]
    cmd += ["--match-threshold", str(args.match_threshold)]
    cmd += ["--objects", str(args.objects)] if args.objects is not None else []
    cmd += ["--config", str(args.config)] if args.config else []
    cmd += ["--checkpoint", str(args.checkpoint)] if args.checkpoint else []
    cmd += extra  # last: a child's own --config / --checkpoint win
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
    out = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if out.returncode:
        raise SystemExit(f"child {' '.join(extra[:4])} failed ({out.returncode}):\n{out.stderr[-3000:]}")
    result: dict[str, Any] = json.loads(out.stdout.strip().splitlines()[-1])
    result["load"] = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")  # how busy the machine was
    print(f"  {' '.join(extra[:4])}: {result}", file=sys.stderr, flush=True)
    return result


def scene(args: argparse.Namespace) -> tuple[Path, dict[str, Any]]:
    """The generated GeoTIFF (reused when present beside its generation record)."""
    width, height = parse_size(args.size)
    args.workdir.mkdir(parents=True, exist_ok=True)
    count = args.objects if args.objects is not None else width * height // 40000
    path = args.workdir / f"detect-{width}x{height}-n{count}-s{args.seed}.tif"
    record = path.with_suffix(".json")
    if args.regenerate or not (path.is_file() and record.is_file()):
        result = _run_child(args, "--child", "geotiff", "--path", str(path))
        record.write_text(json.dumps(result))
        return path, result | {"reused": False}
    return path, dict(json.loads(record.read_text())) | {"reused": True}


def sahi_config(args: argparse.Namespace, source: Path, name: str) -> Path:
    """``source`` with the test pipeline SAHI's DetInferencer builds from made to keep a tile as it is: Resize to the
    tile side (keep ratio: a no-op on a full tile) and no fixed-size Pad. densevision ignores the pipeline (it feeds
    tiles straight to the data preprocessor), so both sides load this file."""
    from mmengine.config import Config

    cfg = Config.fromfile(str(source))
    if name == "default":
        cfg.model.bbox_head.num_classes = len(DEFAULT_CLASSES)
        if cfg.model.backbone.get("init_cfg"):
            cfg.model.backbone.init_cfg = None
    for holder in (cfg.get("test_dataloader", {}).get("dataset", {}), cfg):
        pipeline = holder.get("pipeline" if holder is not cfg else "test_pipeline")
        if not pipeline:
            continue
        kept = []
        for step in pipeline:
            if step["type"] == "Resize":
                step["scale"] = (args.tile, args.tile)
            if step["type"] == "Pad" and step.get("size") is not None:
                continue
            kept.append(step)
        holder["pipeline" if holder is not cfg else "test_pipeline"] = kept
    out = args.workdir / f"detect_bench-{name}-t{args.tile}.py"
    cfg.dump(str(out))
    return out


def model_files(args: argparse.Namespace, image: Path) -> tuple[Path, Path, str]:
    if args.config is not None:
        if args.checkpoint is None:
            raise SystemExit("--config needs --checkpoint (random weights of most detectors detect nothing)")
        return sahi_config(args, args.config, args.config.stem), args.checkpoint, f"{args.config} + {args.checkpoint}"
    config = sahi_config(args, MMDET_CONFIGS / DEFAULT_CONFIG, "default")
    ckpt = args.workdir / f"detect_bench-rtmdet_tiny-{image.stem}.pth"
    if args.regenerate or not ckpt.is_file():
        _run_child(args, "--child", "checkpoint", "--path", str(image), "--out", str(ckpt), "--config", str(config))
    what = (
        f"mmdet's {DEFAULT_CONFIG} ({len(DEFAULT_CLASSES)} classes), generated weights (seed {args.seed}; "
        f"batch-norm statistics from {CALIBRATION_TILES} tiles of the image; output layers set so that "
        f"{PASS_SHARE:.1%} of anchor points per class pass 0.3 there)"
    )
    return config, ckpt, what


def _outputs(args: argparse.Namespace, name: str) -> Path:
    d = args.workdir / "detect_bench-out"
    d.mkdir(parents=True, exist_ok=True)
    for p in d.glob(name + ".*"):
        shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
    return d / f"{name}.json"


def _sides(args: argparse.Namespace, image: Path, model: str, extra: list[str]) -> tuple[dict[str, Any], ...]:
    p = ["--path", str(image), "--model", model, *extra]
    dv_out, sahi_out = _outputs(args, f"{model}-densevision"), _outputs(args, f"{model}-sahi")
    dv = _run_child(args, "--child", "densevision", *p, "--out", str(dv_out))
    sh = _run_child(args, "--child", "sahi", *p, "--out", str(sahi_out))
    if not sh["same_grid"]:
        raise SystemExit("SAHI's slices differ from densevision's tiles: the comparison would not be like for like")
    dv["found"], sh["found"] = _load(dv_out), _load(sahi_out)
    if model == "mmdet":
        merged = sahi_out.with_name(f"{model}-merge.json")
        raw = sahi_out.with_suffix(".raw.json")
        sh["merge_only"] = _run_child(args, "--child", "merge", "--path", str(raw), "--out", str(merged))
        for name in ("sahi", "densevision", "densevision-sahi-like"):
            sh["merge_only"][name] = _load(merged.with_name(f"{merged.stem}-{name}.json"))
    if not args.keep_outputs:
        shutil.rmtree(dv_out.parent, ignore_errors=True)
    return dv, sh


def _side_rows(dv: dict[str, Any], sh: dict[str, Any], args: argparse.Namespace, width: int, height: int) -> list[str]:
    tm, du = dv["timings"], sh["durations"]
    head = (
        "| side | wall s | CPU s | where the time went (wall s) | tiles | raw detections | merged objects | "
        "peak RSS MiB (after imports) | load |"
    )
    return [
        head,
        "|" + "---|" * (head.count("|") - 1),
        f"| SAHI `get_sliced_prediction` (whole image read into one array, {sh['image_array_mb']:.0f} MiB) | "
        f"{sh['seconds']:.1f} | {sh['cpu_seconds']:.0f} | model {sh['seconds_model']:.1f}, read + slice "
        f"{du['slice']:.1f}, predict "
        f"{du['prediction']:.1f}, merge {du['postprocess']:.1f} | {sh['tiles']} | {sh['raw']} | {sh['objects']} | "
        f"{sh['peak_rss_mb']:.0f} ({sh['baseline_rss_mb']:.0f}) | {sh['load']:.1f} |",
        f"| densevision `detect_objects` (workers {args.workers}, batch {args.batch_size}) | {dv['seconds']:.1f} | "
        f"{dv['cpu_seconds']:.0f} | "
        f"wait {tm['seconds_waiting_for_tiles']:.1f}, predict {tm['seconds_predicting']:.1f}, consume "
        f"{tm['seconds_consuming']:.1f}, merge + write after the loop {tm['seconds_finishing']:.1f} (merging "
        f"{tm['seconds_merging']:.1f}{', beside the loop' if tm['finished_alongside'] else ''}), rest (model, setup) "
        f"{dv['seconds'] - tm['seconds_total'] - tm['seconds_finishing']:.1f} | {dv['tiles']} | {dv['raw']} | "
        f"{dv['objects']} | {dv['peak_rss_mb']:.0f} ({dv['baseline_rss_mb']:.0f}; workers "
        f"{dv['workers_peak_rss_mb']:.0f}) | {dv['load']:.1f} |",
        "",
        f"densevision / SAHI on {width} x {height}: wall time {dv['seconds'] / sh['seconds']:.2f}, CPU time "
        f"{dv['cpu_seconds'] / sh['cpu_seconds']:.2f}, peak RSS "
        f"{dv['peak_rss_mb'] / sh['peak_rss_mb']:.2f}.",
    ]


def part_mmdet(args: argparse.Namespace) -> Part:
    width, height = parse_size(args.size)
    image, gen = scene(args)
    config, ckpt, what = model_files(args, image)
    print(f"mmdet: {width} x {height}, {config.name} ...", file=sys.stderr, flush=True)
    dv, sh = _sides(args, image, "mmdet", ["--config", str(config), "--checkpoint", str(ckpt)])
    ag = agreement(dv["found"], sh["found"])
    lines = _side_rows(dv, sh, args, width, height)
    lines[-1] += (
        f" Agreement of the merged objects (one-to-one, same class, IoU >= 0.5): {ag['matched']} pairs, "
        f"{ag['matched'] / max(ag['a'], 1):.1%} of densevision's {ag['a']} and {ag['matched'] / max(ag['b'], 1):.1%} "
        f"of SAHI's {ag['b']}; mean IoU of the pairs {ag['mean_iou']:.4f}, identical boxes (IoU >= 0.999) "
        f"{ag['identical']}. Model: {what}. Tile {args.tile}, overlap {args.overlap}, score >= "
        f"{args.score_threshold}, {args.merge} / IoS > {args.match_threshold}, class-aware; SAHI without the "
        f"full-image pass. Input: make_geotiff {width} x {height} (RGB.byte.tif mosaic, no nodata, "
        f"{gen['objects']} planted objects), generated in {gen['seconds']:.0f} s{' (reused)' if gen['reused'] else ''}"
        "; both sides time building the model. CPU s: user + system of the process and its reader workers." + LOAD_NOTE
    )
    lines += ["", *merge_rows(dv, sh, args)]
    headline = (
        f"Against SAHI ({width} x {height}, same mmdet RTMDet and slices): wall time "
        f"{dv['seconds'] / sh['seconds']:.2f}x, peak RSS {dv['peak_rss_mb'] / sh['peak_rss_mb']:.2f}x; "
        f"{ag['matched'] / max(ag['b'], 1):.1%} of SAHI's {ag['b']} merged objects matched one-to-one."
    )
    return Part("\n".join(lines), [headline])


def merge_rows(dv: dict[str, Any], sh: dict[str, Any], args: argparse.Namespace) -> list[str]:
    """The merge-only table: the same raw detections through each merge."""
    mo = sh["merge_only"]
    head = (
        "| merge, on the same raw detections | seconds | merged objects | same as the end-to-end run of that tool "
        "(identical boxes) | matched with SAHI's merge (of this / of SAHI's; mean IoU; identical) |"
    )
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    rows = [
        ("SAHI `NMMPostprocess`" if args.merge == "nmm" else "SAHI `GreedyNMMPostprocess`", "sahi", sh),
        ("densevision `merge_detections`, as `detect_objects` runs it", "densevision", dv),
        ("densevision `merge_detections`, SAHI's ranking and threshold", "densevision-sahi-like", None),
    ]
    for label, name, end_to_end in rows:
        found = mo[name]
        same = "-"
        if end_to_end is not None:
            e = agreement(found, end_to_end["found"], 0.999)
            same = f"{e['matched']} of {len(found['boxes'])} and {len(end_to_end['found']['boxes'])}"
        vs = "-"
        if name != "sahi":
            a = agreement(found, mo["sahi"])
            vs = (
                f"{a['matched'] / max(a['a'], 1):.1%} / {a['matched'] / max(a['b'], 1):.1%}; {a['mean_iou']:.4f}; "
                f"{a['identical']}"
            )
        lines.append(f"| {label} | {mo['seconds_' + name]:.2f} | {len(found['boxes'])} | {same} | {vs} |")
    lines += [
        "",
        f"The {mo['raw']} detections of SAHI's slices (kept before its merge; densevision's run had "
        f"{dv['raw']}), merged in one process by each tool's merge code. 'SAHI's ranking and threshold': "
        "`edge_weight=1` (partial views, boxes within 2 px of an interior tile side, are not ranked down) and a "
        "threshold just below 0.5 (densevision matches when IoS > threshold, SAHI when IoS >= threshold).",
    ]
    return lines


def part_truth(args: argparse.Namespace) -> Part:
    width, height = parse_size(args.size)
    image, _ = scene(args)
    objects = json.loads(image.with_suffix(".objects.json").read_text())
    where = object_geometry(objects, width, height, args.tile, args.overlap)
    n_where = ", ".join(f"{(where == g).sum()} {label}" for g, label in enumerate(GEOMETRY))
    head = (
        "| scores | side | wall s | peak RSS MiB | raw detections | merged objects | found once, box within 2 px "
        "(by where) | found once, box off by more | found 2+ times | missed | detections on no object | load |"
    )
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    headline = []
    for scores in ("constant", "area"):
        print(f"truth: {width} x {height}, scores {scores} ...", file=sys.stderr, flush=True)
        dv, sh = _sides(args, image, f"colour-{scores}", [])
        for name, side in (("SAHI", sh), ("densevision", dv)):
            s = score_truth(side["found"], objects)
            hits, exact = s["hits"], s["exact"]
            split = " / ".join(str(exact[where == g].sum()) for g in range(len(GEOMETRY)))
            lines.append(
                f"| {'0.9 (all equal)' if scores == 'constant' else 'grow with box area'} | {name} | "
                f"{side['seconds']:.1f} | {side['peak_rss_mb']:.0f} | {side['raw']} | {side['objects']} | "
                f"{exact.sum()} ({split}) | {((hits == 1) & ~exact).sum()} | {(hits >= 2).sum()} | "
                f"{(hits == 0).sum()} | {s['stray']} | {side['load']:.1f} |"
            )
            if scores == "constant":
                headline.append(
                    f"{name}: {exact.sum()} of {len(objects)} planted objects found once with the box within 2 px, "
                    f"{(hits >= 2).sum()} found more than once, {(hits == 0).sum()} missed."
                )
    lines += [
        "",
        f"{len(objects)} planted objects on {width} x {height} (scatter_objects: rectangles and ellipses, 24-96 px, "
        f"at least 8 px apart; {n_where}; 'cut in every tile that sees it': wider or taller than the "
        f"{args.overlap}-px overlap where a border crosses it, so no tile sees it whole). 'by where' splits the "
        "exact finds in that order. Detector: densevision.synthetic ColourDetector (one tight box per connected "
        f"blob of one of {len(COLOURS)} planted colours, at least 4 pixels; scores 0.9, or "
        "0.5 + 0.4 (1 - exp(-area / 2000)) so a piece cut by a border scores below the whole view), densevision's "
        "predictor and, for SAHI, a DetectionModel subclass calling it on each RGB slice. A detection counts for "
        "the object of its class it overlaps most (IoU); 'box within 2 px': every side. Tile "
        f"{args.tile}, overlap {args.overlap}, {args.merge} / IoS > {args.match_threshold}, class-aware; SAHI "
        "without the full-image pass." + LOAD_NOTE,
    ]
    lead = f"Planted objects ({width} x {height}, a detector that finds each blob, equal scores):"
    return Part("\n".join(lines), [" ".join([lead, *headline])])


def revision() -> str:
    """The checkout's commit, ``-dirty`` when files differ from it (``git describe``; read only)."""
    with contextlib.suppress(OSError, subprocess.CalledProcessError):
        cmd = ["git", "-C", str(REPO), "describe", "--always", "--dirty", "--abbrev=10"]
        return subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.strip()
    return "unknown (not a git checkout)"


def machine() -> str:
    v = importlib.metadata.version
    names = ("densevision", "sahi", "torch", "mmdet", "mmcv", "mmengine", "numpy", "rasterio", "shapely", "scipy")
    return f"{host()}, " + ", ".join(f"{n} {v(n)}" for n in names)


def append_results(text: str) -> None:
    """Add ``text`` at the end of this script's section of the README (before the next ``## `` heading), leaving
    the rest of the file as it is."""
    readme = README.read_text()
    start = readme.find(SECTION)
    if start < 0:
        README.write_text(readme.rstrip("\n") + "\n\n" + text.strip("\n") + "\n")
        return
    nxt = re.search(r"^## ", readme[start + len(SECTION) :], flags=re.M)
    end = start + len(SECTION) + nxt.start() if nxt else len(readme)
    README.write_text(
        readme[:end].rstrip("\n") + "\n\n" + text.strip("\n") + "\n" + ("\n" + readme[end:] if nxt else "")
    )


CHILDREN = {
    "geotiff": child_geotiff,
    "checkpoint": child_checkpoint,
    "densevision": child_densevision,
    "sahi": child_sahi,
    "merge": child_merge,
}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.child:
        print(json.dumps(CHILDREN[args.child](args)))
        return 0
    if args.overlap * 2 > args.tile:
        raise SystemExit(f"--overlap {args.overlap}: at most half the tile ({args.tile // 2})")
    started = time.perf_counter()
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    parts = {"mmdet": part_mmdet, "truth": part_truth}
    titles = {"mmdet": "Against SAHI, an mmdet detector", "truth": "Against SAHI, scored on planted objects"}
    texts = []
    for name in PARTS:
        if name in args.parts:
            texts.append(f"#### {titles[name]}\n\n{parts[name](args).text}")
            print(texts[-1] + "\n", flush=True)
    minutes = (time.perf_counter() - started) / 60
    if args.append:
        command = shlex.join(["python", "benchmarks/detect_bench.py", *(sys.argv[1:] if argv is None else argv)])
        when = datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z")
        append_results(
            f"### {when}\n\n`{command}`\n\nMachine: {machine()}. Code: {revision()}. Load average 1 min at the "
            f"start: {load:.2f}; the whole run took {minutes:.0f} min.{' ' + args.note if args.note else ''}"
            "\n\n" + "\n\n".join(texts)
        )
    if args.clean:
        for pattern in ("detect-*", "detect_bench-*"):
            for p in args.workdir.glob(pattern):
                shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
