"""``segment_image``: a whole slide or scene through a segmentation model, stitched into one class map.

The segmentation task of :func:`~densevision.apis.job.run_job`. Its consumer: tiles in :func:`stitch_order` feed the
:class:`~densevision.stitch.SegmentationStitcher`, whose final cells, reduced to class indices (and probabilities),
are regrouped into the grid's blocks and appended to their block row's file in the work folder. Its finishing step:
the committed blocks streamed into the class map (COG for rasters, pyramidal TIFF for slides), the probabilities,
the class counts, the preview, and the regions' polygons (:mod:`densevision.stitch.polygons`: rank 0 traces them
from the committed blocks, so they follow ``--resume`` and ``torchrun`` like the class map).
"""

from __future__ import annotations

import bisect
import contextlib
import json
import math
import os
import time
from pathlib import Path
from typing import Any

import numpy as np
import shapely
import torch
from PIL import Image

from densevision.apis.job import PREVIEW_SIZE, Job, Task, area_per_pixel, run_job, save_preview, stretch_for_display
from densevision.apis.settings import (
    SEGMENTATION_TILING,
    Compute,
    Model,
    Reading,
    Segmentation,
    Tiling,
    gather,
    refuse_unknown,
)
from densevision.compat import trusted_checkpoints
from densevision.engine.reader import TileDataset
from densevision.engine.runner import BackgroundCalls, RunStats, TileRunner, batch_aligned
from densevision.engine.workdir import BlockFolder, WorkFolder
from densevision.errors import ConfigError
from densevision.io import GeoJsonWriter, GeoTiffWriter, ImageSource, PyramidTiffWriter, Thumbnail, scale_transform
from densevision.io.atomic import check_output_path
from densevision.io.vectors import OgrWriter, vector_format
from densevision.predictors.base import SegmentationPredictor
from densevision.stitch import SegmentationStitcher
from densevision.stitch.measure import Units, measure, qupath_names, rows, units_of
from densevision.stitch.polygons import Region, RegionTracer, valid
from densevision.stitch.segmentation import (
    PROBABILITY_DTYPES,
    UINT8_PROBABILITY_NODATA,
    UINT8_PROBABILITY_SCALE,
    BlockAssembler,
    ReducedCell,
    Reduction,
    block_edges,
    stitch_order,
)
from densevision.tiling.grid import axis_bounds

NODATA = 255
# Classes the preview leaves unpainted, so that the input shows through where nothing was found.
UNPAINTED = frozenset({"background", "_background_", "unlabeled", "unlabelled"})
OUTPUT_TILE = 512  # the writers' tiles (GeoTiffWriter's and PyramidTiffWriter's default)
# With probabilities, blocks go to the writers in column strips, top to bottom within each strip: the partial output
# tiles (a row of them, K bands) then span a strip, not the image's width. A strip is as many whole output tiles as
# this many bytes of them allow, and at least 16 (see assembly_strip). Only the first strip is written as the rows
# are committed; the others after the last row (16384^2 x 5 float32 in two strips: 6.1 s after the loop, in one:
# 0.7 s). A class map alone goes row by row over the whole width (its partial tiles: about 2 * 512 bytes per column,
# 64 MB at 65536 wide), so it is written as the rows are committed.
ASSEMBLY_BYTES = 256 << 20
ASSEMBLY_MIN_TILES = 16  # 8192 pixels: the strips' width before the budget (150 float32 classes: 2.5 GB of tiles)
# Reduced cells queued for the background thread (regrouping into blocks, deflate, the work folder): it lags behind the
# model by a few cells at times (5 float32 classes: 4 MB a cell; a queue of one tile's pixels stopped the model for
# 0.46 s of a 38 s run). A cell larger than this (150 float32 classes: 120 MB) waits for an empty queue.
QUEUED_BYTES = 64 << 20


def assembly_strip(k: int, itemsize: int) -> int:
    """The width of the column strips in which probabilities of ``k`` classes, ``itemsize`` bytes each, are
    written: whole output tiles, as many as :data:`ASSEMBLY_BYTES` of a row of them hold, at least
    :data:`ASSEMBLY_MIN_TILES` (5 float32 classes: 26112 pixels; 5 uint8: 104448; 150 float32: 8192)."""
    tiles = ASSEMBLY_BYTES // (OUTPUT_TILE * OUTPUT_TILE * k * itemsize)
    return max(ASSEMBLY_MIN_TILES, tiles) * OUTPUT_TILE


class _Outputs:
    """Finished blocks to the outputs: class map (and probabilities) to their writers in whole output tiles
    (OUTPUT_TILE), class pixel counts, and a nearest-neighbour preview of at most PREVIEW_SIZE pixels, one block at a
    time."""

    def __init__(
        self, classes: GeoTiffWriter | PyramidTiffWriter, probs: GeoTiffWriter | None, k: int, width: int, height: int
    ) -> None:
        self.classes, self.probs, self.k = classes, probs, k
        self.counts = np.zeros(k + 1, dtype=np.int64)  # last bin: nodata
        self.step = max(1, math.ceil(max(width, height) / PREVIEW_SIZE))
        self.preview = np.full((math.ceil(height / self.step), math.ceil(width / self.step)), NODATA, np.uint8)
        # GDAL writes a window that cuts its tiles 4x slower than whole tiles (8192^2 x 5 float32: 21 s against
        # 5 s): the blocks are regrouped into the writers' tiles first.
        self.tiles = BlockAssembler(
            [*range(0, height, OUTPUT_TILE), height], [*range(0, width, OUTPUT_TILE), width], self._write
        )

    def _write(self, y0: int, x0: int, cmap: np.ndarray, probs: np.ndarray | None = None) -> None:
        self.classes.write(cmap, x0, y0)
        if self.probs is not None and probs is not None:
            self.probs.write_bands(probs, x0, y0)

    def __call__(self, y0: int, x0: int, cmap: np.ndarray, probs: np.ndarray | None) -> None:
        self.tiles(y0, x0, cmap, *(() if probs is None else (probs,)))
        # Counted over every byte value, then folded (nodata and anything above the classes into the last bin): a
        # pass less than clipping first (16384 x 512 uint8: 38 ms against 59).
        found = np.bincount(cmap.ravel(), minlength=self.k + 1)
        self.counts[: self.k] += found[: self.k]
        self.counts[self.k] += found[self.k :].sum()
        # The preview keeps the pixels on a grid of `step`: this block's first ones are at offsets (-y0, -x0) % step.
        r, c = -y0 % self.step, -x0 % self.step
        on_grid = cmap[r :: self.step, c :: self.step]
        i, j = (y0 + r) // self.step, (x0 + c) // self.step
        self.preview[i : i + on_grid.shape[0], j : j + on_grid.shape[1]] = on_grid


class _Preview:
    """The class map's overlay on the thumbnail: the thumbnail stretched when made (before the blocks come, beside
    the prediction), the classes painted on it once the class map's preview pixels are all in."""

    def __init__(self, thumb: Thumbnail, palette: tuple[tuple[int, int, int], ...], names: list[str]) -> None:
        self.base = stretch_for_display(thumb.pixels)
        self.colours = np.array([*palette, (0, 0, 0)] + [(0, 0, 0)] * (256 - len(palette) - 1), dtype=np.float32)
        self.painted = np.ones(256, bool)
        self.painted[NODATA] = False
        self.painted[[i for i, name in enumerate(names) if name.lower() in UNPAINTED]] = False

    def save(self, path: Path, preview: np.ndarray) -> None:
        base = self.base
        classes = np.asarray(Image.fromarray(preview).resize((base.shape[1], base.shape[0]), Image.Resampling.NEAREST))
        overlay = np.where(self.painted[classes][..., None], 0.55 * base + 0.45 * self.colours[classes], base)
        save_preview(path, Image.fromarray(overlay.astype(np.uint8)))


def traced_classes(names: list[str], exclude: tuple[str, ...] | None) -> list[int]:
    """The class indices that get polygons: all but those named in ``exclude`` (None: the background names)."""
    if exclude is None:
        return [i for i, n in enumerate(names) if n.lower() not in UNPAINTED]
    unknown = [n for n in exclude if n not in names]
    if unknown:
        raise ConfigError(
            f"cannot leave out class(es) {', '.join(map(repr, unknown))}: the model's classes are "
            f"{', '.join(names)}; name them as the model does"
        )
    return [i for i, n in enumerate(names) if n not in exclude]


class _Polygons:
    """The class map's regions to a vector file: traced block by block (:class:`RegionTracer`), small ones
    dropped, simplified, measured, mapped to level-0 pixels (slides: QuPath annotations) or through the class map's
    transform (rasters), and summed per class."""

    def __init__(self, settings: Segmentation, path: Path, src: ImageSource, downsample: float, width: int,
                 height: int, names: list[str], palette: tuple[tuple[int, int, int], ...]) -> None:  # fmt: skip
        self.names, self.palette, self.d = names, palette, downsample
        self.classes = traced_classes(names, settings.exclude_classes)
        self.simplify = settings.simplify
        self.format = vector_format(path)
        self.units = units_of(src).scaled(downsample)  # of class-map pixels
        self.min_area_px = min_area_pixels(settings, self.units)
        self.raster = src.backend == "rasterio"
        # Rasters: class-map pixels through the class map's own transform (as the COG's), exactly as
        # rasterio.features.shapes maps them; slides: class-map pixels times the downsample = level-0 pixels.
        self.transform = scale_transform(src.transform, downsample) if self.raster and src.transform else None
        crs = src.crs if self.transform is not None else None
        self.native_crs = settings.native_crs and crs is not None
        keys = [self.units.area_key, self.units.perimeter_key, "solidity", "circularity", "elongation"]
        self.writer: GeoJsonWriter | OgrWriter
        if self.format == "GeoJSON":
            self.writer = GeoJsonWriter(path, transform=self.transform, crs=crs, native_crs=self.native_crs)
        else:
            fields: dict[str, type] = {"class": str, "label": int, **dict.fromkeys(keys, float)}
            self.writer = OgrWriter(path, fields, transform=self.transform, crs=crs)
        self.tracer = RegionTracer(width, height, self.classes, self._write, connectivity=settings.connectivity)
        k = len(names)
        self.count, self.dropped = np.zeros(k, np.int64), np.zeros(k, np.int64)
        self.area, self.perimeter = np.zeros(k), np.zeros(k)
        self.seconds = 0.0  # tracing, measuring, writing
        self.seconds_reading = 0.0  # reading the blocks again (the second pass)

    def add(self, y0: int, x0: int, cmap: np.ndarray) -> None:
        started = time.perf_counter()
        self.tracer.add(y0, x0, cmap)
        self.seconds += time.perf_counter() - started

    def _write(self, regions: list[Region]) -> None:
        labels = np.array([r.label for r in regions], dtype=np.int64)
        geoms = np.array([r.geometry for r in regions], dtype=object)
        small = shapely.area(geoms) < self.min_area_px
        np.add.at(self.dropped, labels[small], 1)
        labels, geoms = labels[~small], geoms[~small]
        if self.simplify > 0:
            geoms = valid(shapely.simplify(geoms, self.simplify, preserve_topology=True))
        measured = measure(geoms, self.units)
        np.add.at(self.count, labels, 1)
        np.add.at(self.area, labels, measured[self.units.area_key])
        np.add.at(self.perimeter, labels, measured[self.units.perimeter_key])
        if self.transform is None and self.d != 1:
            geoms = shapely.transform(geoms, lambda xy: xy * self.d)
        for label, geom, values in zip(labels.tolist(), geoms, rows(measured), strict=True):
            name = self.names[label]
            if isinstance(self.writer, GeoJsonWriter) and self.writer.pixel_coordinates:
                self.writer.add_qupath(
                    geom, object_type="annotation", classification=name, color=self.palette[label],
                    measurements=qupath_names(values),
                )  # fmt: skip
            else:
                self.writer.add(geom, {"class": name, "label": label, **values})

    def finish(self) -> None:
        started = time.perf_counter()
        self.tracer.finish()
        self.seconds += time.perf_counter() - started

    def summary(self) -> dict[str, Any]:
        u = self.units
        coordinates = (
            "level-0 pixels (QuPath)" if self.transform is None
            else "EPSG:4326 (longitude, latitude)" if self.format == "GeoJSON" and not self.native_crs
            else str(self.writer.crs)
        )  # fmt: skip
        return {
            "path": str(self.writer.path), "format": self.format, "coordinates": coordinates,
            "regions": int(self.count.sum()), "dropped_below_min_area": int(self.dropped.sum()),
            "max_open_regions": self.tracer.max_open, "units": {"area": f"{u.unit}2", "length": u.unit},
            "classes": [
                {"index": i, "name": self.names[i], "regions": int(self.count[i]), u.area_key: float(self.area[i]),
                 u.perimeter_key: float(self.perimeter[i])}
                for i in self.classes
            ],
        }  # fmt: skip


def min_area_pixels(settings: Segmentation, units: Units) -> float:
    """``settings.min_area`` in class-map pixels; ``units`` are the class map's (see :class:`Units`)."""
    value, unit = settings.min_area_threshold
    if unit == "px":
        return value
    if unit is not None and unit != f"{units.unit}2":
        known = f"{units.unit}2" if units.unit != "px" else "pixels (give it in px)"
        raise ConfigError(
            f"minimum area {value:g} {unit}: this image's areas are measured in {known}; give --min-area in that unit"
        )
    return value / units.pixel_area


class SegmentationTask(Task):
    """Class map (and probabilities) of a whole image; see the module doc."""

    empty_note = "no tile has content (all glass or nodata): the output is all nodata"

    def __init__(self, settings: Segmentation, predictor: SegmentationPredictor | None = None) -> None:
        self.settings = settings.check()
        self._predictor = predictor
        self.polygons_path = None
        if settings.polygons is not None:
            vector_format(settings.polygons)
            self.polygons_path = check_output_path(settings.polygons)

    def check_output(self, out: Path) -> None:
        if out.suffix.lower() not in (".tif", ".tiff"):
            raise ConfigError(f"{out}: the segmentation output is a TIFF; name it *.tif")

    def predictor(self, model: Model, device: torch.device) -> SegmentationPredictor:
        if self._predictor is None:
            from densevision.predictors.mmseg import MMSegPredictor

            if model.config is None:
                raise ConfigError("segment_image needs a model: pass a config (-c) or a predictor")
            with trusted_checkpoints(model.trust_checkpoint):
                self._predictor = MMSegPredictor.from_config(
                    model.config, model.checkpoint, device=device, cfg_options=model.cfg_options
                )
        return self._predictor

    def fingerprint(self, job: Job) -> dict[str, Any]:
        if self.polygons_path is not None:
            # The polygon settings that need the model's classes and the image's resolution are checked here, before
            # any tile is predicted (they do not change the committed blocks).
            names = list(self.predictor(job.model, job.device).class_names)
            traced_classes(names, self.settings.exclude_classes)
            min_area_pixels(self.settings, units_of(job.src).scaled(job.geometry.downsample))
        s = self.settings
        return {"blend": s.blend, "probabilities": s.probability_dtype if s.probability_output else False}

    def work_folder(self, job: Job, root: Path, fingerprint: dict[str, Any], resume: bool) -> BlockFolder:
        rows, cols = block_edges(job.grid, self.settings.blend)
        return BlockFolder(root, fingerprint, resume=resume, rows=rows, cols=cols)

    def predict(
        self, job: Job, work: WorkFolder, rows: tuple[int, int], dataset: TileDataset, runner: TileRunner
    ) -> RunStats | None:
        """Predict and stitch block rows ``[a, b)`` that are not yet in ``work``, committing each as it finishes.

        Tiles go in :func:`stitch_order`; the stitcher's cells, reduced to class indices (and probabilities), are
        regrouped into the grid's blocks (:func:`block_edges`) and appended to their row's file as each is final, so
        nothing as wide as the image is held. Starting at block row ``k`` (resuming, or a rank's share) redoes the
        tile rows whose windows reach into it; other rows count as skipped and their incomplete blocks are dropped.
        """
        assert isinstance(work, BlockFolder)
        grid, keep, blend = job.grid, job.keep, self.settings.blend
        with_probs = self.settings.probability_output
        probs_dtype = PROBABILITY_DTYPES[self.settings.probability_dtype]
        predictor = self.predictor(job.model, job.device)
        tiles, order = list(grid), stitch_order(grid)
        position = {t.index: i for i, t in enumerate(order)}
        first, end = rows[0] + work.done(rows[0]), rows[1]
        if first >= end:
            return None
        edges = work.row_edges
        # The first tile row that reaches into block row `first` (its window; under crop its owned rows).
        reach = (
            axis_bounds(grid.ys, grid.tile, grid.height) if blend == "crop" else [(y, y + grid.tile) for y in grid.ys]
        )
        r0 = min(r for r, (_, y1) in enumerate(reach) if y1 > edges[first])
        background = BackgroundCalls(depth=QUEUED_BYTES)
        cell_bytes = 1 + (predictor.num_classes * probs_dtype.itemsize if with_probs else 0)  # per pixel
        assembler = BlockAssembler(edges, work.col_edges, work.put, block_rows=(first, end))

        def block(cell: ReducedCell) -> None:
            """On the background thread: wait for the cell's copy to the host, regroup it into the blocks."""
            cmap, probs = cell.result()
            assembler(cell.y0, cell.x0, *((cmap, probs) if with_probs else (cmap,)))

        def hand_on(cell: ReducedCell) -> None:
            """A final cell, reduced by the stitcher on the device (on CUDA queued there; on the CPU here, between the
            model's calls, not beside a model whose threads take every core), its copy to the host started."""
            h, w = cell.shape
            if cell.y0 < edges[end] and cell.y0 + h > edges[first]:  # a block row this call commits
                background.submit(block, cell, weight=h * w * cell_bytes)

        # The accumulators live where the logits are computed: only reduced cells come back to the host.
        reduction = Reduction(probs=with_probs, nodata=NODATA, probs_dtype=probs_dtype)
        stitcher = SegmentationStitcher(
            grid, predictor.num_classes, blend, hand_on, device=predictor.device, reduction=reduction
        )
        needed = range(r0, end)  # block row k is final once tile rows up to k are in
        added = [bool(keep[t.index]) and t.row in needed for t in tiles]
        # Tiles of rows >= r0 are a suffix of the order (an interleaved pair of rows is never split by r0: its first
        # row reaches into the second's block row); rows < end a prefix, up to tiles of row `end` interleaved with
        # row end - 1, which are predicted to keep the batches aligned, but not added.
        dataset.tiles = batch_aligned([t for t in order if keep[t.index]], (r0, end), runner.batch_size)
        skipped_to = 0  # tiles before this position of the order that are not added have been skipped

        def skip_until(i: int) -> None:
            """Skip the tiles before position ``i`` of the order that are not added, in order with the added ones
            (skipping them all up front would complete cells far below, which the assembler would have to hold)."""
            nonlocal skipped_to
            for t in order[skipped_to:i]:
                if not added[t.index]:
                    stitcher.skip(t)
            skipped_to = max(skipped_to, i)

        def consume(indexes: list[int], logits: torch.Tensor, valid: np.ndarray) -> None:
            for j, i in enumerate(indexes):
                if added[i]:  # the others were only computed to keep the batches aligned
                    skip_until(position[i])
                    stitcher.add(tiles[i], logits[j], valid[j])

        try:
            stats = runner.run(dataset, predictor, consume) if len(dataset) else None
            skip_until(len(order))
            stitcher.finish()
        finally:
            background.close()
            work.close()
        assembler.finish()
        return stats

    def finishes_alongside(self, job: Job) -> bool:
        return True  # numpy, GDAL and zlib only: the model's classes and palette are known before the fork

    def finish(self, job: Job, work: WorkFolder) -> dict[str, Any]:
        """Stream the committed blocks into the final files (renamed into place only when complete), column strip by
        column strip with probabilities (see :func:`assembly_strip`); blocks across a strip's edge are read once per
        strip and cut there."""
        assert isinstance(work, BlockFolder)
        src, d, grid = job.src, job.geometry.downsample, job.grid
        predictor = self.predictor(job.model, job.device)
        k, names = predictor.num_classes, list(predictor.class_names)
        width, height = grid.width, grid.height
        transform = scale_transform(src.transform, d) if src.transform else None
        if src.backend == "rasterio":
            classes: GeoTiffWriter | PyramidTiffWriter = GeoTiffWriter(
                job.out, width, height, 1, np.uint8, crs=src.crs, transform=transform, nodata=NODATA,
                colormap={i: (*c, 255) for i, c in enumerate(predictor.palette)}, class_names=names, cog=True,
            )  # fmt: skip
        else:
            mpp = (src.mpp[0] * d, src.mpp[1] * d) if src.mpp else None
            classes = PyramidTiffWriter(job.out, width, height, mpp=mpp, description=json.dumps(names))
        probs = None
        if self.settings.probability_output:
            quantised = self.settings.probability_dtype == "uint8"
            probs = GeoTiffWriter(
                job.beside(".probs.tif"), width, height, k, self.settings.probability_dtype,
                crs=src.crs if src.backend == "rasterio" else None, transform=transform,
                nodata=UINT8_PROBABILITY_NODATA if quantised else float("nan"), band_descriptions=names,
                scale=1 / UINT8_PROBABILITY_SCALE if quantised else None,
                # Float probabilities barely compress (4096^2 x 5 softmax: 82 % of the raw size at level 6, 83 % at
                # level 1, which is 2x faster).
                compression_level=6 if quantised else 1,
                interleave="band",  # as they come, C x h x w; a reader of one class reads its band only
            )  # fmt: skip
        painter = _Preview(job.thumb, predictor.palette, names)
        outputs = _Outputs(classes, probs, k, width, height)
        cols = work.col_edges
        polygons = None
        if self.polygons_path is not None:
            polygons = _Polygons(self.settings, self.polygons_path, src, d, width, height, names, predictor.palette)
        # The polygons need the blocks row-major: along with the class map when it is one strip wide, else in a
        # second pass over the committed blocks (reading and inflating them again).
        itemsize = np.dtype(self.settings.probability_dtype).itemsize
        strip = assembly_strip(k, itemsize) if probs is not None else width
        one_pass = width <= strip
        with contextlib.ExitStack() as writers:  # each writer renamed into place on success, dropped on error
            writers.enter_context(classes)
            if probs is not None:
                writers.enter_context(probs)
            if polygons is not None:
                writers.enter_context(polygons.writer)
            for x0 in range(0, width, strip):
                x1 = min(x0 + strip, width)
                span = (bisect.bisect_right(cols, x0) - 1, bisect.bisect_left(cols, x1))
                for by, bx, cmap, p in work.blocks(span):
                    a, b = max(x0, bx) - bx, min(x1, bx + cmap.shape[1]) - bx
                    outputs(by, bx + a, cmap[:, a:b], None if p is None else p[..., a:b])
                    if polygons is not None and one_pass:
                        polygons.add(by, bx, cmap)
            outputs.tiles.finish()
            if polygons is not None:
                if not one_pass:
                    started = time.perf_counter()
                    for by, bx, cmap, _ in work.blocks():
                        polygons.add(by, bx, cmap)
                    polygons.seconds_reading = time.perf_counter() - started - polygons.seconds
                polygons.finish()
            # Before the writers rename their files into place: a failure here leaves nothing that looks finished.
            work.wait_until_complete()
            preview_path = job.beside(".preview.png")
            painter.save(preview_path, outputs.preview)
        area = area_per_pixel(src, d)
        counts = outputs.counts
        s = self.settings
        return {
            "outputs": {
                "probabilities": str(probs.path) if probs else None, "preview": str(preview_path),
                "polygons": str(self.polygons_path) if self.polygons_path else None,
            },
            "model": {},
            "settings": {
                "blend": s.blend,
                **({"probability_dtype": s.probability_dtype} if s.probability_output else {}),
                **({"polygons": {
                    "connectivity": s.connectivity, "simplify": s.simplify, "min_area": s.min_area,
                    "min_area_pixels": polygons.min_area_px, "classes": [names[i] for i in polygons.classes],
                }} if polygons else {}),
            },
            "results": {
                **({"regions": polygons.summary()} if polygons else {}),
                "classes": [
                    {
                        "index": i,
                        "name": names[i],
                        "pixels": int(counts[i]),
                        **({f"area_{area[1]}": float(counts[i] * area[0])} if area else {}),
                    }
                    for i in range(k)
                ],
                "nodata_pixels": int(counts[k]),
            },
            "timings": {
                **({"seconds_polygons": polygons.seconds, "seconds_polygons_reading": polygons.seconds_reading}
                   if polygons else {}),
            },
        }  # fmt: skip


def segment_image(
    image: str | os.PathLike[str],
    config: str | os.PathLike[str] | None = None,
    checkpoint: str | os.PathLike[str] | None = None,
    *,
    out: str | os.PathLike[str],
    predictor: SegmentationPredictor | None = None,
    model: Model | None = None,
    tiling: Tiling | None = None,
    reading: Reading | None = None,
    compute: Compute | None = None,
    segmentation: Segmentation | None = None,
    resume: bool = False,
    **options: Any,
) -> dict[str, Any]:
    """Segment a whole image tile by tile and write the stitched class map.

    Rasters get a COG with the input's CRS and transform (scaled to the working resolution); slides and plain images
    get a pyramidal TIFF with the resolution in microns. Beside ``out``: ``*.summary.json`` (inputs, tiles done /
    skipped, timings, class areas), ``*.preview.png`` (overlay), and with ``probability_output`` ``*.probs.tif`` (a
    band per class, float32 or uint8: ``probability_dtype``). With ``polygons`` (``.geojson``, ``.gpkg`` or
    ``.fgb``): one polygon per connected region of each class, with its measurements (slides: QuPath annotations in
    level-0 pixels; rasters: WGS84 GeoJSON, or the raster's CRS with ``native_crs`` and always in GeoPackage /
    FlatGeobuf), summed per class in the summary's ``regions``. Give ``config`` (a path or a shipped config's name)
    + ``checkpoint`` for an mmsegmentation model, or a ready ``predictor``. Pixels that are not uint8 are stretched
    to 0..255 (``value_range``, or per-band 2nd-98th percentiles of the thumbnail; see
    :mod:`densevision.io.scaling`).

    Settings come in groups (:mod:`densevision.apis.settings`: ``tiling``, ``reading``, ``compute``,
    ``segmentation``), or as keywords naming their fields: ``tile=512, overlap=64, batch_size=4, blend="gaussian",
    level=None, mpp=None, bands=None, value_range=None, skip_empty=True, workers=2, device="auto", amp=False,
    progress=True, probability_output=False, probability_dtype="float32", polygons=None, exclude_classes=None,
    min_area=0, simplify=0, connectivity=4, native_crs=False, cfg_options=None, trust_checkpoint=False`` (see
    :class:`~densevision.apis.settings.Segmentation`).

    Finished block rows are committed to ``<out>.partial.d/`` as the run goes; after a crash, ``resume=True`` redoes
    only what was not finished and gives the same bytes as an uninterrupted run.

    Returns:
        The run summary (also written as JSON).
    """
    model = gather(model, Model(config, checkpoint), options)
    tiling = gather(tiling, SEGMENTATION_TILING, options)
    reading = gather(reading, Reading(), options)
    compute = gather(compute, Compute(), options)
    task = SegmentationTask(gather(segmentation, Segmentation(), options), predictor)
    refuse_unknown(options, "segment_image")
    return run_job(image, out, task, model=model, tiling=tiling, reading=reading, compute=compute, resume=resume)
