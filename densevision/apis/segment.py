"""``segment_image``: a whole slide or scene through a segmentation model, stitched into one class map."""

from __future__ import annotations

import bisect
import json
import math
import os
import platform
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from densevision import __version__
from densevision.compat import trusted_checkpoints
from densevision.engine.distributed import barrier, init_distributed, split_contiguous
from densevision.engine.reader import TileDataset, read_geometry
from densevision.engine.runner import BackgroundCalls, RunStats, TileRunner, resolve_device
from densevision.engine.workdir import BandStore
from densevision.errors import ConfigError
from densevision.io import GeoTiffWriter, ImageSource, PyramidTiffWriter, Thumbnail, open_image, scale_transform
from densevision.io.raster import bounded_gdal_cache
from densevision.io.scaling import ValueScale
from densevision.io.writers._atomic import check_output_path
from densevision.predictors.base import SegmentationPredictor
from densevision.stitch import SegmentationStitcher, check_blend, class_map, probabilities
from densevision.stitch.segmentation import BlockAssembler, block_edges, stitch_order
from densevision.tiling import TileGrid, tiles_with_content, tissue_mask
from densevision.tiling.grid import axis_bounds

NODATA = 255
# Classes the preview leaves unpainted, so that the input shows through where nothing was found.
UNPAINTED = frozenset({"background", "_background_", "unlabeled", "unlabelled"})
PREVIEW_SIZE = 1024


class _Outputs:
    """Finished blocks to the outputs: class map (and probabilities) to their writers, class pixel counts, and a
    nearest-neighbour preview of at most PREVIEW_SIZE pixels, one block at a time."""

    def __init__(
        self, classes: GeoTiffWriter | PyramidTiffWriter, probs: GeoTiffWriter | None, k: int, width: int, height: int
    ) -> None:
        self.classes, self.probs, self.k = classes, probs, k
        self.counts = np.zeros(k + 1, dtype=np.int64)  # last bin: nodata
        self.step = max(1, math.ceil(max(width, height) / PREVIEW_SIZE))
        self.preview = np.full((math.ceil(height / self.step), math.ceil(width / self.step)), NODATA, np.uint8)

    def __call__(self, y0: int, x0: int, cmap: np.ndarray, probs: np.ndarray | None) -> None:
        self.classes.write(cmap, x0, y0)
        if self.probs is not None and probs is not None:
            self.probs.write(probs, x0, y0)
        self.counts += np.bincount(np.minimum(cmap, self.k).ravel(), minlength=self.k + 1)
        # The preview keeps the pixels on a grid of `step`: this block's first ones are at offsets (-y0, -x0) % step.
        r, c = -y0 % self.step, -x0 % self.step
        on_grid = cmap[r :: self.step, c :: self.step]
        i, j = (y0 + r) // self.step, (x0 + c) // self.step
        self.preview[i : i + on_grid.shape[0], j : j + on_grid.shape[1]] = on_grid


# Blocks go to the writers in column strips of this many pixels, top to bottom within each strip: the writers' partial
# tiles then span a strip, not the image's width. A multiple of every tile size they use (512: 2**4 of them).
ASSEMBLY_STRIP = 8192


def _assemble(
    work: BandStore,
    out_path: Path,
    src: ImageSource,
    downsample: float,
    predictor: SegmentationPredictor,
    probability_output: bool,
    width: int,
    height: int,
    n_bands: int,
) -> _Outputs:
    """Stream the committed blocks into the final files (renamed into place only when complete), column strip by
    column strip (see ASSEMBLY_STRIP); blocks across a strip's edge are read once per strip and cut there."""
    k, names = predictor.num_classes, list(predictor.class_names)
    if work.done() != n_bands:
        raise ConfigError(f"{work.root}: only {work.done()} of {n_bands} bands are finished; run again with --resume")
    transform = scale_transform(src.transform, downsample) if src.transform else None
    if src.backend == "rasterio":
        classes: GeoTiffWriter | PyramidTiffWriter = GeoTiffWriter(
            out_path, width, height, 1, np.uint8, crs=src.crs, transform=transform, nodata=NODATA,
            colormap={i: (*c, 255) for i, c in enumerate(predictor.palette)}, class_names=names, cog=True,
        )  # fmt: skip
    else:
        mpp = (src.mpp[0] * downsample, src.mpp[1] * downsample) if src.mpp else None
        classes = PyramidTiffWriter(out_path, width, height, mpp=mpp, description=json.dumps(names))
    probs = None
    if probability_output:
        probs = GeoTiffWriter(
            out_path.with_name(out_path.stem + ".probs.tif"), width, height, k, np.float32,
            crs=src.crs if src.backend == "rasterio" else None, transform=transform, nodata=float("nan"),
            band_descriptions=names,
        )  # fmt: skip
    outputs = _Outputs(classes, probs, k, width, height)
    cols = work.cols
    try:
        for x0 in range(0, width, ASSEMBLY_STRIP):
            x1 = min(x0 + ASSEMBLY_STRIP, width)
            span = (bisect.bisect_right(cols, x0) - 1, bisect.bisect_left(cols, x1))
            for by, bx, cmap, p in work.blocks(span):
                a, b = max(x0, bx) - bx, min(x1, bx + cmap.shape[1]) - bx
                outputs(by, bx + a, cmap[:, a:b], None if p is None else p[:, a:b])
        classes.close()
        if probs is not None:
            probs.close()
    except BaseException:
        classes.abort()
        if probs is not None:
            probs.abort()
        raise
    return outputs


def _area_per_pixel(src: ImageSource, downsample: float) -> tuple[float, str] | None:
    """Physical area of one output pixel: um^2 for slides with a known mpp, m^2 for rasters in a metric CRS."""
    if src.mpp is not None:
        return src.mpp[0] * src.mpp[1] * downsample**2, "um2"
    if src.crs is not None and src.transform is not None and src.crs.linear_units in ("metre", "meter"):
        return abs(src.transform.determinant) * downsample**2, "m2"
    return None


def _write_preview(
    path: Path, thumb: Thumbnail, preview: np.ndarray, palette: tuple[tuple[int, int, int], ...], names: list[str]
) -> None:
    base = thumb.pixels[..., :3].astype(np.float32)
    if base.shape[-1] < 3:
        base = np.repeat(base[..., :1], 3, axis=-1)
    lo, hi = np.nanpercentile(base, 1), np.nanpercentile(base, 99)
    base = np.clip((base - lo) / max(hi - lo, 1e-6) * 255, 0, 255)
    size = (base.shape[1], base.shape[0])
    classes = np.asarray(Image.fromarray(preview).resize(size, Image.Resampling.NEAREST))
    colours = np.array([*palette, (0, 0, 0)] + [(0, 0, 0)] * (256 - len(palette) - 1), dtype=np.float32)
    painted = np.ones(256, bool)
    painted[NODATA] = False
    painted[[i for i, name in enumerate(names) if name.lower() in UNPAINTED]] = False
    overlay = np.where(painted[classes][..., None], 0.55 * base + 0.45 * colours[classes], base)
    tmp = path.with_name(path.name + ".partial")
    Image.fromarray(overlay.astype(np.uint8)).save(tmp, format="PNG")
    os.replace(tmp, path)


def _predict_bands(
    work: BandStore,
    grid: TileGrid,
    keep: np.ndarray,
    bands: tuple[int, int],
    predictor: SegmentationPredictor,
    blend: str,
    probability_output: bool,
    dataset: TileDataset,
    runner: TileRunner,
) -> RunStats | None:
    """Predict and stitch bands ``[a, b)`` that are not yet in ``work``, committing each as it finishes.

    Tiles go in :func:`stitch_order`; the stitcher's cells, reduced to class indices (and probabilities), are
    regrouped into the grid's blocks (:func:`block_edges`) and appended to their band's file as each is final, so
    nothing as wide as the image is held. Starting at band ``k`` (resuming, or a rank's share) redoes the tile rows
    whose windows reach into it; other rows count as skipped and their incomplete bands are dropped. Batches start
    and end where one uninterrupted run's would, so every tile is predicted in the same company and the result is the
    same to the last bit.
    """
    tiles, order = list(grid), stitch_order(grid)
    position = {t.index: i for i, t in enumerate(order)}
    first, end = bands[0] + work.done(bands[0]), bands[1]
    if first >= end:
        return None
    rows, cols = block_edges(grid, blend)
    # The first tile row that reaches into band `first` (its window; under crop its owned rows).
    reach = axis_bounds(grid.ys, grid.tile, grid.height) if blend == "crop" else [(y, y + grid.tile) for y in grid.ys]
    r0 = min(r for r, (_, y1) in enumerate(reach) if y1 > rows[first])
    background = BackgroundCalls()
    assembler = BlockAssembler(rows, cols, work.put, bands=(first, end))

    def block(y0: int, x0: int, logits: np.ndarray, valid: np.ndarray) -> None:
        if y0 >= rows[end] or y0 + valid.shape[0] <= rows[first]:
            return  # a band this call does not commit
        if probability_output:
            assembler(y0, x0, class_map(logits, valid, NODATA), np.moveaxis(probabilities(logits, valid), 0, -1))
        else:
            assembler(y0, x0, class_map(logits, valid, NODATA))

    stitcher = SegmentationStitcher(
        grid, predictor.num_classes, blend, lambda y0, x0, lg, v: background.submit(block, y0, x0, lg, v)
    )
    needed = range(r0, end)  # band k is final once tile rows up to k are in
    added = [bool(keep[t.index]) and t.row in needed for t in tiles]
    kept = [t for t in order if keep[t.index]]
    # Tiles of rows >= r0 are a suffix of the order (an interleaved pair of rows is never split by r0: its first row
    # reaches into the second's band); rows < end are a prefix, up to tiles of row `end` interleaved with row end - 1,
    # which are predicted to keep the batches aligned, but not added.
    lo = next((i for i, t in enumerate(kept) if t.row >= r0), len(kept))
    hi = max((i + 1 for i, t in enumerate(kept) if t.row < end), default=0)
    size = runner.batch_size
    dataset.tiles = kept[lo - lo % size : min(len(kept), -(-hi // size) * size)]
    skipped_to = 0  # tiles before this position of the order that are not added have been skipped

    def skip_until(i: int) -> None:
        """Skip the tiles before position ``i`` of the order that are not added, in order with the added ones
        (skipping them all up front would complete cells far below, which the assembler would have to hold)."""
        nonlocal skipped_to
        for t in order[skipped_to:i]:
            if not added[t.index]:
                stitcher.skip(t)
        skipped_to = max(skipped_to, i)

    try:

        def consume(indexes: list[int], logits: np.ndarray, valid: np.ndarray) -> None:
            for j, i in enumerate(indexes):
                if added[i]:  # the others were only computed to keep the batches aligned
                    skip_until(position[i])
                    stitcher.add(tiles[i], logits[j], valid[j])

        stats = runner.run(dataset, predictor, consume) if len(dataset) else None
        skip_until(len(order))
        stitcher.finish()
    finally:
        background.close()
        work.close()
    assembler.finish()
    return stats


def segment_image(
    image: str | os.PathLike[str],
    config: str | os.PathLike[str] | None = None,
    checkpoint: str | os.PathLike[str] | None = None,
    *,
    out: str | os.PathLike[str],
    predictor: SegmentationPredictor | None = None,
    tile: int = 512,
    overlap: int = 64,
    batch_size: int = 4,
    blend: str = "gaussian",
    level: int | None = None,
    mpp: float | None = None,
    bands: list[int] | None = None,
    value_range: tuple[float, float] | None = None,
    device: str = "auto",
    amp: bool = False,
    workers: int = 2,
    probability_output: bool = False,
    skip_empty: bool = True,
    cfg_options: dict[str, Any] | None = None,
    trust_checkpoint: bool = False,
    resume: bool = False,
    progress: bool = True,
) -> dict[str, Any]:
    """Segment a whole image tile by tile and write the stitched class map.

    Rasters get a COG with the input's CRS and transform (scaled to the working resolution); slides and plain
    images get a pyramidal TIFF with the resolution in microns. Beside ``out``: ``*.summary.json`` (inputs,
    tiles done / skipped, timings, class areas), ``*.preview.png`` (overlay), and with ``probability_output``
    ``*.probs.tif`` (float32 per class). Give ``config`` (+ ``checkpoint``) for an mmsegmentation model, or a
    ready ``predictor``. Pixels that are not uint8 are stretched to 0..255 (``value_range``, or per-band 2nd-98th
    percentiles of the thumbnail; see :mod:`densevision.io.scaling`).

    Finished bands are committed to ``<out>.partial.d/`` as the run goes; after a crash, ``resume=True`` redoes
    only what was not finished and gives the same bytes as an uninterrupted run.

    Returns:
        The run summary (also written as JSON).
    """
    started = time.perf_counter()
    out_path = check_output_path(out)
    if out_path.suffix.lower() not in (".tif", ".tiff"):
        raise ConfigError(f"{out_path}: the segmentation output is a TIFF; name it *.tif")
    check_blend(blend)
    stem = out_path.with_suffix("")
    dev = resolve_device(device)
    rank, world = init_distributed(dev)

    # The input is checked before the (slow) model build, so a wrong path fails at once.
    with open_image(image, bands=bands) as src, bounded_gdal_cache():
        geometry = read_geometry(src, level=level, mpp=mpp)
        if predictor is None:
            from densevision.predictors.mmseg import MMSegPredictor

            if config is None:
                raise ConfigError("segment_image needs a model: pass a config (-c) or a predictor")

            with trusted_checkpoints(trust_checkpoint):
                predictor = MMSegPredictor.from_config(config, checkpoint, device=dev, cfg_options=cfg_options)
        if mpp is None:
            width, height = src.level_dimensions[geometry.level]
        else:
            width, height = (max(1, round(s / geometry.downsample)) for s in src.size)
        grid = TileGrid(width, height, tile, overlap, divisor=predictor.size_divisor)
        tiles = list(grid)
        keep = np.ones(len(tiles), dtype=bool)
        thumb = src.thumbnail(PREVIEW_SIZE)
        value_scale = None
        if value_range is not None:
            value_scale = ValueScale.uniform(*value_range, src.band_count)
        elif src.dtype != np.uint8:
            value_scale = ValueScale.from_sample(thumb.pixels, thumb.valid)
        if skip_empty:
            content = tissue_mask(thumb.pixels, thumb.valid) if src.backend == "openslide" else thumb.valid
            scale = (thumb.downsample[0] / geometry.downsample, thumb.downsample[1] / geometry.downsample)
            keep = tiles_with_content(grid, content, scale)
        k = predictor.num_classes
        names = list(predictor.class_names)
        fingerprint = {
            "input": str(Path(src.path).resolve()), "input_size": list(src.size), "output_size": [width, height],
            "config": os.fspath(config) if config else None,
            "checkpoint": os.fspath(checkpoint) if checkpoint else None,
            "classes": names, "tile": tile, "overlap": overlap, "batch_size": batch_size, "blend": blend,
            "level": geometry.level, "mpp": mpp, "bands": bands, "skip_empty": skip_empty,
            "value_scale": [value_scale.lo, value_scale.hi] if value_scale else None,
            "probabilities": probability_output,
        }  # fmt: skip
        work_dir = out_path.with_name(out_path.name + ".partial.d")
        # Rank 0 creates (or checks) the work folder; the others join it once it is there.
        rows, cols = block_edges(grid, blend)
        work = BandStore(work_dir, fingerprint, resume=resume, rows=rows, cols=cols) if rank == 0 else None
        barrier(world)
        work = work or BandStore(work_dir, fingerprint, resume=True, rows=rows, cols=cols)
        bands_before = work.done()
        share = split_contiguous(np.bincount([t.row for t in tiles if keep[t.index]], minlength=len(grid.ys)), world)
        stats = _predict_bands(
            work, grid, keep, share[rank], predictor, blend, probability_output,
            TileDataset(src.path, [], geometry, {"bands": bands}, value_scale),
            TileRunner(batch_size=batch_size, workers=workers, device=dev, amp=amp, progress=progress and rank == 0),
        )  # fmt: skip
        barrier(world)
        if rank != 0:
            return {"rank": rank, "bands": list(share[rank]), "timings": stats.as_dict() if stats else {}}
        outputs = _assemble(
            work, out_path, src, geometry.downsample, predictor, probability_output, width, height, len(grid.ys)
        )
        work.remove()
        preview_path = stem.with_name(stem.name + ".preview.png")
        _write_preview(preview_path, thumb, outputs.preview, predictor.palette, list(predictor.class_names))
        area = _area_per_pixel(src, geometry.downsample)
        source_facts = src.describe()

    summary: dict[str, Any] = {
        "input": source_facts,
        "output": str(out_path),
        "probabilities": str(outputs.probs.path) if outputs.probs else None,
        "preview": str(preview_path),
        "model": {
            "config": os.fspath(config) if config else None,
            "checkpoint": os.fspath(checkpoint) if checkpoint else None,
            "classes": names,
        },
        "settings": {
            "tile": tile, "overlap": overlap, "batch_size": batch_size, "blend": blend, "level": geometry.level,
            "mpp": mpp, "downsample": geometry.downsample, "device": str(dev), "amp": amp, "workers": workers,
            "world_size": world,
            "skip_empty": skip_empty,
            "value_scale": {"lo": list(value_scale.lo), "hi": list(value_scale.hi)} if value_scale else None,
        },
        "output_size": [width, height],
        "tiles": {"total": len(tiles), "done": int(keep.sum()), "skipped": int((~keep).sum())},
        "resumed": {"bands_already_done": bands_before, "bands": len(grid.ys)} if resume else None,
        "timings": {**(stats.as_dict() if stats else {}), "seconds_wall": time.perf_counter() - started},
        "classes": [
            {
                "index": i, "name": names[i], "pixels": int(outputs.counts[i]),
                **({f"area_{area[1]}": float(outputs.counts[i] * area[0])} if area else {}),
            }
            for i in range(k)
        ],
        "nodata_pixels": int(outputs.counts[k]),
        "versions": {"densevision": __version__, "torch": torch.__version__, "python": platform.python_version()},
    }  # fmt: skip
    if not keep.any():
        summary["note"] = "no tile has content (all glass or nodata): the output is all nodata"
    summary_path = stem.with_name(stem.name + ".summary.json")
    summary["summary"] = str(summary_path)
    tmp = summary_path.with_name(summary_path.name + ".partial")
    tmp.write_text(json.dumps(summary, indent=2))
    os.replace(tmp, summary_path)
    return summary
