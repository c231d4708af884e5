"""``detect_objects`` and ``segment_instances``: a whole slide or scene through a detector (and a box-prompted mask
model), objects merged across tiles into whole-image features.

Two phases, as for segmentation. Predict: tiles stream through the detector; each tile row's raw detections
(level-0 boxes, scores, labels, mask polygons) are committed to ``<out>.partial.d/`` as the row completes, so a
killed run resumes where it stopped and ranks of a ``torchrun`` each do a share of the rows. Merge and write: rank 0
feeds the rows to the streaming :class:`~densevision.stitch.DetectionMerger` and writes each finished object.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import shapely
from PIL import Image, ImageDraw

from densevision.apis._run import (
    PREVIEW_SIZE,
    area_per_pixel,
    stretch_for_display,
    tiles_to_run,
    value_scale_for,
    versions,
    working_size,
    write_json,
)
from densevision.compat import trusted_checkpoints
from densevision.engine.distributed import barrier, init_distributed, split_contiguous
from densevision.engine.reader import ReadGeometry, TileDataset, read_geometry
from densevision.engine.records import RecordFolder
from densevision.engine.runner import RunStats, TileRunner, resolve_device
from densevision.errors import ConfigError
from densevision.io import CocoResultsWriter, GeoJsonWriter, ImageSource, open_image
from densevision.io.raster import bounded_gdal_cache
from densevision.io.scaling import ValueScale
from densevision.io.source import resize_region
from densevision.io.writers._atomic import check_output_path
from densevision.predictors.base import DetectionPredictor, TileDetections
from densevision.stitch import DetectionMerger, Detections, merge_detections
from densevision.stitch.instances import PromptWindow, mask_to_polygons, merge_instance_polygons, prompt_windows
from densevision.tiling import TileGrid


def _polygons_wkb(geoms: Sequence[shapely.Geometry]) -> dict[str, np.ndarray]:
    """Geometries as one byte array + offsets (npz holds no objects without pickle)."""
    blobs = [shapely.to_wkb(g) for g in geoms]
    offsets = np.cumsum([0, *map(len, blobs)], dtype=np.int64)
    return {"wkb": np.frombuffer(b"".join(blobs), dtype=np.uint8), "wkb_offsets": offsets}


def _from_wkb(record: dict[str, np.ndarray]) -> list[shapely.Geometry]:
    data, offsets = record["wkb"].tobytes(), record["wkb_offsets"]
    return [shapely.from_wkb(data[a:b]) for a, b in itertools.pairwise(offsets)]


class _RowRecorder:
    """Collects tile detections row by row (tiles arrive in row-major order) and commits each finished row."""

    def __init__(self, work: RecordFolder, first: int, downsample: float, with_masks: bool) -> None:
        self.work, self.next_row, self.d, self.with_masks = work, first, downsample, with_masks
        self.parts: list[tuple[int, TileDetections, int, int]] = []

    def add(self, row: int, tile_index: int, dets: TileDetections, x: int, y: int) -> None:
        self.commit_until(row)
        self.parts.append((tile_index, dets, x, y))

    def commit_until(self, row: int) -> None:
        while self.next_row < row:
            self._commit(self.next_row)
            self.next_row += 1

    def _commit(self, row: int) -> None:
        d = self.d
        parts, self.parts = self.parts, []
        n = [len(p[1]) for p in parts]
        shifts = [np.array([x, y, x, y], dtype=np.float64) for _, _, x, y in parts]
        rec: dict[str, np.ndarray] = {
            "tile": np.repeat(np.array([p[0] for p in parts], dtype=np.int64), n),
            "boxes": np.concatenate(
                [(p[1].boxes + s) * d for p, s in zip(parts, shifts, strict=True)] or [np.zeros((0, 4))]
            ),
            "scores": np.concatenate([p[1].scores for p in parts] or [np.zeros(0)]),
            "labels": np.concatenate([p[1].labels for p in parts] or [np.zeros(0, np.int64)]).astype(np.int64),
        }
        if self.with_masks:
            geoms = [
                mask_to_polygons(m, offset=(x * d, y * d), scale=d)
                for _, dets, x, y in parts
                for m in (dets.masks if dets.masks is not None else np.zeros((len(dets), 1, 1), bool))
            ]
            rec.update(_polygons_wkb(geoms))
        self.work.put(row, rec)


def _predict_rows(
    work: RecordFolder,
    grid: TileGrid,
    keep: np.ndarray,
    rows: tuple[int, int],
    predictor: DetectionPredictor,
    geometry: ReadGeometry,
    with_masks: bool,
    dataset: TileDataset,
    runner: TileRunner,
) -> RunStats | None:
    """Predict the tile rows ``[a, b)`` not yet in ``work``, committing each row as it finishes. Batches start and
    end where an uninterrupted single-process run's would, so results are the same to the last bit."""
    first, end = rows[0] + work.done(rows[0]), rows[1]
    if first >= end:
        return None
    tiles = list(grid)
    kept = [t for t in tiles if keep[t.index]]
    lo = next((i for i, t in enumerate(kept) if t.row >= first), len(kept))
    hi = next((i for i, t in enumerate(kept) if t.row >= end), len(kept))
    size = runner.batch_size
    dataset.tiles = kept[lo - lo % size : min(len(kept), -(-hi // size) * size)]
    recorder = _RowRecorder(work, first, geometry.downsample, with_masks)

    def consume(indexes: list[int], dets: list[TileDetections], valid: np.ndarray) -> None:
        for i, d in zip(indexes, dets, strict=True):
            t = tiles[i]
            if first <= t.row < end:  # the others were only computed to keep the batches aligned
                recorder.add(t.row, t.index, d, t.x, t.y)

    stats = runner.run(dataset, predictor, consume) if len(dataset) else None
    recorder.commit_until(end)
    return stats


class _ObjectOutputs:
    """Merged objects to GeoJSON (+ COCO results), per-class counts and the preview drawing."""

    def __init__(
        self,
        src: ImageSource,
        geojson: GeoJsonWriter,
        coco: CocoResultsWriter | None,
        names: Sequence[str],
        palette: Sequence[tuple[int, int, int]],
        preview: Image.Image,
        preview_scale: tuple[float, float],
    ) -> None:
        self.src, self.geojson, self.coco, self.names, self.palette = src, geojson, coco, names, palette
        self.counts = np.zeros(len(names), dtype=np.int64)
        self.partial = 0
        self.count = 0
        self.draw = ImageDraw.Draw(preview)
        self.preview_scale = preview_scale

    def add(self, box: np.ndarray, score: float, label: int, partial: bool, views: int, geom: Any) -> None:
        k = self.count
        self.count += 1
        self.counts[label] += 1
        self.partial += int(partial)
        name = self.names[label]
        shape = geom if geom is not None else shapely.box(*box)
        if self.geojson.pixel_coordinates:
            self.geojson.add_qupath(
                shape, object_type="detection", classification=name, color=self.palette[label],
                measurements={"score": round(float(score), 6)}, id=k,
            )  # fmt: skip
        else:
            props = {"class": name, "label": int(label), "score": round(float(score), 6), "partial": bool(partial)}
            self.geojson.add(shape, {**props, "views": int(views)}, id=k)
        if self.coco is not None:
            x0, y0, x1, y1 = (float(v) for v in box)
            seg = _coco_segmentation(geom, self.src.size) if geom is not None else None
            self.coco.add(1, int(label), float(score), [x0, y0, x1 - x0, y1 - y0], segmentation=seg)
        sx, sy = self.preview_scale
        outline = tuple(self.palette[label])
        self.draw.rectangle([box[0] * sx, box[1] * sy, box[2] * sx, box[3] * sy], outline=outline, width=1)


def _coco_segmentation(geom: shapely.Geometry, image_size: tuple[int, int]) -> dict[str, Any] | None:
    """COCO RLE of a level-0 polygon, rasterised over its bounding box only."""
    from rasterio.features import rasterize
    from rasterio.transform import Affine

    from densevision.io.writers.coco import mask_to_rle

    if geom.is_empty:
        return None
    W, H = image_size
    x0, y0, x1, y1 = geom.bounds
    x0, y0 = max(0, math.floor(x0)), max(0, math.floor(y0))
    x1, y1 = min(W, math.ceil(x1)), min(H, math.ceil(y1))
    if x1 <= x0 or y1 <= y0:
        return None
    mask = rasterize([geom], out_shape=(y1 - y0, x1 - x0), transform=Affine.translation(x0, y0), dtype=np.uint8)
    return mask_to_rle(mask.astype(bool), (x0, y0), (W, H))


def _united(polygons: dict[int, shapely.Geometry], ids: np.ndarray) -> shapely.Geometry:
    """One object's outline: the union of its sources' (pieces cut by tile borders join)."""
    return merge_instance_polygons(polygons.get(int(i)) for i in ids)


def _overview(
    src: ImageSource,
    predictor: DetectionPredictor,
    tile: int,
    min_side: float,
    value_scale: ValueScale | None,
    with_masks: bool,
) -> tuple[Detections, list[shapely.Geometry]]:
    """The detector once over the whole image shrunk to fit one tile; boxes (and outlines) in level-0 pixels. Only
    objects with a side of at least ``min_side`` level-0 pixels are kept: smaller ones fit in the tiles' overlap,
    which see them whole and sharper."""
    import torch

    thumb = src.thumbnail(tile)
    h, w = thumb.valid.shape
    pixels = value_scale(thumb.pixels) if value_scale is not None else thumb.pixels.astype(np.float32)
    canvas = np.zeros((tile, tile, pixels.shape[-1]), dtype=np.float32)  # padding, as for a tile past the edge
    canvas[:h, :w] = np.where(thumb.valid[..., None], pixels, 0)
    batch = torch.from_numpy(np.ascontiguousarray(canvas.transpose(2, 0, 1)))[None].to(predictor.device)
    dets = predictor(batch)[0]
    sx, sy = thumb.downsample
    W, H = src.size
    boxes = np.clip(dets.boxes * [sx, sy, sx, sy], 0, [W, H, W, H])
    big = np.flatnonzero(np.maximum(boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]) >= min_side)
    geoms = []
    if with_masks and dets.masks is not None:
        geoms = [mask_to_polygons(dets.masks[i, :h, :w], scale=(sx + sy) / 2) for i in big]
    n = len(big)
    found = Detections(
        boxes=boxes[big], scores=dets.scores[big].astype(np.float64), labels=dets.labels[big].astype(np.int64),
        best=np.arange(n), partial=np.zeros(n, dtype=bool), offsets=np.arange(n + 1), members=np.arange(n),
    )  # fmt: skip
    return found, geoms


def _join_overview(
    objects: Detections,
    geoms: list[shapely.Geometry],
    overview: Detections,
    overview_geoms: list[shapely.Geometry],
    size: tuple[int, int],
    merge_options: dict[str, Any],
) -> tuple[Detections, dict[int, shapely.Geometry]]:
    """Merge the tiles' objects with the overview's detections (ids: objects first, then the overview's), by the
    same rules, over one window covering the image. An object is partial when no overview detection joined it and
    all its tile objects were partial."""
    whole = TileGrid(size[0], size[1], max(size))
    k = len(objects)
    boxes = np.concatenate([objects.boxes, overview.boxes])
    scores = np.concatenate([objects.scores, overview.scores])
    labels = np.concatenate([objects.labels, overview.labels])
    was_partial = np.concatenate([objects.partial, np.zeros(len(overview), dtype=bool)])
    # A partial view ranks below a whole one, as within the tiles: the overview's view of a big object then leads
    # its group and gathers the pieces the tiles saw.
    rank = np.where(was_partial, scores * 0.5, scores)
    joined = merge_detections(whole, [(next(iter(whole)), boxes, rank, labels)], **merge_options)
    members = [joined.sources(j) for j in range(len(joined))]
    partial = np.array([bool(was_partial[m].all()) for m in members], dtype=bool)
    best_score = np.array([scores[m].max() for m in members], dtype=np.float64)
    polygons = dict(enumerate(geoms))
    polygons.update({k + i: g for i, g in enumerate(overview_geoms)})
    return dataclasses.replace(joined, partial=partial, scores=best_score), polygons


def _merge_rows(
    work: RecordFolder,
    grid: TileGrid,
    keep: np.ndarray,
    downsample: float,
    with_masks: bool,
    merge_options: dict[str, Any],
    emit: Callable[[Detections, dict[int, shapely.Geometry]], None],
) -> DetectionMerger:
    """Feed the committed rows to the merger; ``emit`` gets each batch of finished objects with the polygons of
    their source detections (by id) when the detector gave masks."""
    polygons: dict[int, shapely.Geometry] = {}

    def sink(dets: Detections) -> None:
        emit(dets, polygons)
        for k in range(len(dets)):
            for i in dets.sources(k):
                polygons.pop(int(i), None)

    merger = DetectionMerger(grid, sink, scale=downsample, **merge_options)
    tiles = list(grid)
    cols = len(grid.xs)
    for row in range(len(grid.ys)):
        rec = work.get(row)
        ids = merger.added + np.arange(len(rec["tile"]))
        if with_masks:
            polygons.update(zip(ids.tolist(), _from_wkb(rec), strict=True))
        for t in tiles[row * cols : (row + 1) * cols]:
            if not keep[t.index]:
                merger.skip(t)
                continue
            sel = rec["tile"] == t.index
            merger.add(t, rec["boxes"][sel], rec["scores"][sel], rec["labels"][sel], ids[sel])
    merger.finish()
    return merger


def detect_objects(
    image: str | os.PathLike[str],
    config: str | os.PathLike[str] | None = None,
    checkpoint: str | os.PathLike[str] | None = None,
    *,
    out: str | os.PathLike[str],
    predictor: DetectionPredictor | None = None,
    tile: int = 1024,
    overlap: int = 128,
    batch_size: int = 2,
    level: int | None = None,
    mpp: float | None = None,
    bands: list[int] | None = None,
    value_range: tuple[float, float] | None = None,
    device: str = "auto",
    amp: bool = False,
    workers: int = 2,
    score_threshold: float = 0.3,
    merge: str = "nmm",
    match: str = "ios",
    match_threshold: float = 0.5,
    class_agnostic: bool = False,
    skip_empty: bool = True,
    coco_out: str | os.PathLike[str] | None = None,
    native_crs: bool = False,
    cfg_options: dict[str, Any] | None = None,
    trust_checkpoint: bool = False,
    resume: bool = False,
    progress: bool = True,
    masks: bool | None = None,
    overview: bool = False,
    sam_checkpoint: str | os.PathLike[str] | None = None,
    sam_predictor: Any = None,
) -> dict[str, Any]:
    """Detect objects over a whole image tile by tile and write the merged objects as GeoJSON.

    Rasters: features in WGS84 longitude / latitude (RFC 7946), or with ``native_crs`` in the raster's CRS.
    Slides and plain images: QuPath detection objects in level-0 pixels. Beside ``out``: ``*.summary.json`` (counts
    per class, tiles, timings) and ``*.preview.png`` (boxes on a thumbnail); ``coco_out``: COCO results JSON in
    level-0 pixels (``image_id`` 1, ``category_id`` = class index). Objects cut by tile borders are merged
    (``merge`` nms / nmm / greedy_nmm, matching by ``match`` iou / ios above ``match_threshold``, see
    :mod:`densevision.stitch.detection`); make ``overlap`` at least the size of the largest object, or add
    ``overview``: one more pass of the detector over the whole image shrunk to one tile, whose detections are
    merged with the tiles' (for objects larger than the overlap; its boxes are as coarse as its resolution).

    Give ``config`` (+ ``checkpoint``) for an mmdet detector, or a ready ``predictor``. ``masks``: None (default)
    outlines objects with the detector's own masks when it has a mask head, else with their boxes; False: boxes
    only; True: masks or an error. With ``sam_checkpoint`` / ``sam_predictor``, SAM prompted with the merged boxes
    gives the masks (see :func:`segment_instances`).

    Returns:
        The run summary (also written as JSON).
    """
    started = time.perf_counter()
    out_path = check_output_path(out)
    if out_path.suffix.lower() not in (".geojson", ".json"):
        raise ConfigError(f"{out_path}: detections are written as GeoJSON; name the output *.geojson")
    coco_path = check_output_path(coco_out) if coco_out is not None else None
    stem = out_path.with_suffix("")
    dev = resolve_device(device)
    rank, world = init_distributed(dev)
    merge_options: dict[str, Any] = {
        "method": merge,
        "match": match,
        "threshold": match_threshold,
        "class_agnostic": class_agnostic,
    }
    DetectionMerger(TileGrid(1, 1, 1), **merge_options)  # check the options before the slow parts

    with open_image(image, bands=bands) as src, bounded_gdal_cache():
        geometry = read_geometry(src, level=level, mpp=mpp)
        if predictor is None:
            if config is None:
                raise ConfigError("detect_objects needs a model: pass a config (-c) or a predictor")
            from densevision.predictors.mmdet import MMDetPredictor

            with trusted_checkpoints(trust_checkpoint):
                predictor = MMDetPredictor.from_config(
                    config, checkpoint, device=dev, cfg_options=cfg_options, score_threshold=score_threshold
                )
        if masks is False:
            sam_predictor = sam_checkpoint = None
        if sam_predictor is None and sam_checkpoint is not None:
            from densevision.predictors.sam import SamBoxPredictor

            with trusted_checkpoints(trust_checkpoint):
                sam_predictor = SamBoxPredictor.from_checkpoint(sam_checkpoint, device=dev)
        if masks and sam_predictor is None and not predictor.has_masks:
            raise ConfigError("the detector has no mask head: give a SAM checkpoint (--sam) to get instance masks")
        width, height = working_size(src, geometry, mpp)
        grid = TileGrid(width, height, tile, overlap, divisor=predictor.size_divisor)
        thumb = src.thumbnail(PREVIEW_SIZE)
        value_scale = value_scale_for(src, thumb, value_range)
        keep = tiles_to_run(src, grid, thumb, geometry, skip_empty)
        names = list(predictor.class_names)
        with_masks = predictor.has_masks and sam_predictor is None and masks is not False
        fingerprint = {
            "input": str(Path(src.path).resolve()), "input_size": list(src.size), "output_size": [width, height],
            "config": os.fspath(config) if config else None,
            "checkpoint": os.fspath(checkpoint) if checkpoint else None, "classes": names,
            "tile": tile, "overlap": overlap, "batch_size": batch_size, "level": geometry.level, "mpp": mpp,
            "bands": bands, "skip_empty": skip_empty, "score_threshold": score_threshold, "masks": with_masks,
            "value_scale": [value_scale.lo, value_scale.hi] if value_scale else None,
        }  # fmt: skip
        work_dir = out_path.with_name(out_path.name + ".partial.d")
        work = RecordFolder(work_dir, fingerprint, resume=resume, kind="row") if rank == 0 else None
        barrier(world)
        work = work or RecordFolder(work_dir, fingerprint, resume=True, kind="row")
        rows_before = work.done()
        kept_rows = np.bincount([t.row for t in grid if keep[t.index]], minlength=len(grid.ys))
        share = split_contiguous(kept_rows, world)
        stats = _predict_rows(
            work, grid, keep, share[rank], predictor, geometry, with_masks,
            TileDataset(src.path, [], geometry, {"bands": bands}, value_scale),
            TileRunner(batch_size=batch_size, workers=workers, device=dev, amp=amp, progress=progress and rank == 0),
        )  # fmt: skip
        barrier(world)
        if rank != 0:
            return {"rank": rank, "rows": list(share[rank]), "timings": stats.as_dict() if stats else {}}
        if work.done() != len(grid.ys):
            raise ConfigError(
                f"{work.root}: only {work.done()} of {len(grid.ys)} rows are finished; rerun with --resume"
            )

        merge_started = time.perf_counter()
        overview_count = None
        preview = Image.fromarray(stretch_for_display(thumb.pixels).astype(np.uint8))
        preview_scale = (1 / thumb.downsample[0], 1 / thumb.downsample[1])
        transform = src.transform if src.backend == "rasterio" else None
        geojson = GeoJsonWriter(
            out_path, transform=transform, crs=src.crs if transform is not None else None,
            native_crs=native_crs and src.crs is not None,
        )  # fmt: skip
        coco = CocoResultsWriter(coco_path) if coco_path is not None else None
        outputs = _ObjectOutputs(src, geojson, coco, names, predictor.palette, preview, preview_scale)
        sam_seconds, sam_windows = 0.0, 0
        try:
            if sam_predictor is None and not overview:
                # Stream: each finished object is written as soon as the merger lets it go.
                def emit(dets: Detections, polygons: dict[int, shapely.Geometry]) -> None:
                    for k in range(len(dets)):
                        geom = _united(polygons, dets.sources(k)) if with_masks else None
                        outputs.add(
                            dets.boxes[k], dets.scores[k], int(dets.labels[k]), bool(dets.partial[k]),
                            len(dets.sources(k)), geom,
                        )  # fmt: skip

                merger = _merge_rows(work, grid, keep, geometry.downsample, with_masks, merge_options, emit)
            else:
                # Collect the (small) merged boxes: the overview joins them, and SAM needs them all to place windows.
                found: list[Detections] = []
                geoms: list[shapely.Geometry] = []

                def collect(dets: Detections, polygons: dict[int, shapely.Geometry]) -> None:
                    found.append(dets)
                    if with_masks:
                        geoms.extend(_united(polygons, dets.sources(k)) for k in range(len(dets)))

                merger = _merge_rows(work, grid, keep, geometry.downsample, with_masks, merge_options, collect)
                objects = Detections.concatenate(found)
                polygons: dict[int, shapely.Geometry] = {}
                if overview:
                    ov, ov_geoms = _overview(
                        src, predictor, tile, overlap * geometry.downsample, value_scale, with_masks
                    )
                    overview_count = len(ov)
                    objects, polygons = _join_overview(objects, geoms, ov, ov_geoms, src.size, merge_options)
                if sam_predictor is None:
                    for k in range(len(objects)):
                        geom = _united(polygons, objects.sources(k)) if with_masks else None
                        outputs.add(
                            objects.boxes[k], objects.scores[k], int(objects.labels[k]), bool(objects.partial[k]),
                            len(objects.sources(k)), geom,
                        )  # fmt: skip
                else:
                    sam_started = time.perf_counter()
                    sam_windows = _prompt_sam(src, geometry, grid, value_scale, objects, sam_predictor, outputs)
                    sam_seconds = time.perf_counter() - sam_started
            geojson.close()
            if coco is not None:
                coco.close()
        except BaseException:
            geojson.abort()
            if coco is not None:
                coco.abort()
            raise
        merge_seconds = time.perf_counter() - merge_started - sam_seconds
        work.remove()
        preview_path = stem.with_name(stem.name + ".preview.png")
        tmp = preview_path.with_name(preview_path.name + ".partial")
        preview.save(tmp, format="PNG")
        os.replace(tmp, preview_path)
        area = area_per_pixel(src, 1.0)
        source_facts = src.describe()

    summary: dict[str, Any] = {
        "input": source_facts,
        "output": str(out_path),
        "coco": str(coco_path) if coco_path else None,
        "preview": str(preview_path),
        "coordinates": (
            "level-0 pixels (QuPath)" if transform is None
            else str(src.crs) if native_crs and src.crs is not None else "EPSG:4326 (longitude, latitude)"
        ),
        "model": {
            "config": os.fspath(config) if config else None,
            "checkpoint": os.fspath(checkpoint) if checkpoint else None,
            "classes": names, "masks": "sam" if sam_predictor is not None else "detector" if with_masks else None,
            "sam_checkpoint": os.fspath(sam_checkpoint) if sam_checkpoint else None,
        },
        "settings": {
            "tile": tile, "overlap": overlap, "batch_size": batch_size, "level": geometry.level, "mpp": mpp,
            "downsample": geometry.downsample, "device": str(dev), "amp": amp, "workers": workers,
            "world_size": world, "skip_empty": skip_empty, "score_threshold": score_threshold, **merge_options,
            "overview": overview,
            "value_scale": {"lo": list(value_scale.lo), "hi": list(value_scale.hi)} if value_scale else None,
        },
        "tiles": {"total": len(grid), "done": int(keep.sum()), "skipped": int((~keep).sum())},
        "resumed": {"rows_already_done": rows_before, "rows": len(grid.ys)} if resume else None,
        "detections": {
            "raw": merger.added, "overview": overview_count, "objects": outputs.count, "partial": outputs.partial,
            "max_held": merger.max_held,
        },
        "classes": [{"index": i, "name": n, "count": int(outputs.counts[i])} for i, n in enumerate(names)],
        "pixel_area": {"value": area[0], "unit": area[1]} if area else None,
        "timings": {
            **(stats.as_dict() if stats else {}), "seconds_merging": merge_seconds,
            "seconds_sam": sam_seconds, "sam_windows": sam_windows,
            "seconds_wall": time.perf_counter() - started,
        },
        "versions": versions(),
    }  # fmt: skip
    if not keep.any():
        summary["note"] = "no tile has content (all glass or nodata): no objects"
    summary_path = stem.with_name(stem.name + ".summary.json")
    summary["summary"] = str(summary_path)
    write_json(summary_path, summary)
    return summary


def _window_rgb(
    src: ImageSource, geometry: ReadGeometry, window: PromptWindow, value_scale: ValueScale | None
) -> np.ndarray:
    """The window's pixels as ``h x w x 3`` uint8 RGB (what SAM takes); invalid pixels black."""
    d = geometry.downsample
    lw = geometry.level_per_working
    region = src.read_region((round(window.x * d), round(window.y * d)), geometry.level,
                             (round(window.w * lw), round(window.h * lw)))  # fmt: skip
    if region.pixels.shape[1::-1] != window.size:
        region = resize_region(region, window.size)
    pixels = value_scale(region.pixels) if value_scale is not None else region.pixels
    pixels = np.where(region.valid[..., None], pixels, 0)
    if pixels.shape[-1] < 3:
        pixels = np.repeat(pixels[..., :1], 3, axis=-1)
    return np.clip(pixels[..., :3], 0, 255).astype(np.uint8)


def _prompt_sam(
    src: ImageSource,
    geometry: ReadGeometry,
    grid: TileGrid,
    value_scale: ValueScale | None,
    dets: Detections,
    sam: Any,
    outputs: _ObjectOutputs,
) -> int:
    """Prompt SAM once per merged object, in a window that contains it whole (a grid tile where one does, else a
    window around it read at a lower resolution); returns the number of windows."""
    d = geometry.downsample
    windows = prompt_windows(dets.boxes, grid, d)
    for window in windows:
        masks, _ = sam(_window_rgb(src, geometry, window, value_scale), window.local_boxes(dets.boxes, d))
        for mask, k in zip(masks, window.indices.tolist(), strict=True):
            geom = mask_to_polygons(mask, offset=window.offset(d), scale=window.pixel(d))
            outputs.add(
                dets.boxes[k], dets.scores[k], int(dets.labels[k]), bool(dets.partial[k]), len(dets.sources(k)), geom
            )
    return len(windows)


def segment_instances(
    image: str | os.PathLike[str],
    config: str | os.PathLike[str] | None = None,
    checkpoint: str | os.PathLike[str] | None = None,
    *,
    out: str | os.PathLike[str],
    sam_checkpoint: str | os.PathLike[str] | None = None,
    **options: Any,
) -> dict[str, Any]:
    """Instance masks over a whole image: the detector's boxes, merged across tiles, prompt SAM
    (``sam_checkpoint``: an official vit_b / vit_l / vit_h checkpoint) in a window that contains each whole object;
    each object's mask becomes one polygon feature with a global id. Without ``sam_checkpoint`` (or
    ``sam_predictor=``), the detector's own mask head is used and the pieces of an object cut by tile borders are
    united. Options as for :func:`detect_objects`."""
    return detect_objects(image, config, checkpoint, out=out, sam_checkpoint=sam_checkpoint, masks=True, **options)
