"""Big generated slides: pyramidal tiled JPEG TIFFs built from crops of a real H&E slide, written streaming, with
objects planted at known boxes (:mod:`densevision.synthetic.planted`) so that results can be scored.

:func:`make_slide` writes a TIFF that OpenSlide opens as ``generic-tiff`` (one top-level IFD per level, each halved
until it fits in one tile; resolution in pixels per centimetre so ``openslide.mpp-x`` is the requested mpp).
Level-0 tiles are seeded random crops (rotated / flipped) of the real slide: tissue crops inside a few large
elliptical "tissue pieces", glass crops around them, so tissue masks and tile skipping behave as on a real slide.

Memory is bounded by one row of tiles (plus a source image of at most
:data:`~densevision.synthetic.mosaic.IN_MEMORY_SOURCE_PIXELS` kept in memory), never by the output size. The output
is built as ``<path>.partial`` and renamed onto ``path`` only when complete. Tile content depends only on ``seed``,
the tile index and the source, so the same call gives the same pixels.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import imagecodecs
import numpy as np
import openslide
import tifffile

from densevision.errors import ConfigError, OutputError, UnsupportedFormatError
from densevision.io.atomic import check_output_path, remove_quietly, replacing, sibling
from densevision.io.writers.levels import Pyramid
from densevision.io.writers.pyramid import TileSpool, halve, pyramid_dimensions
from densevision.samples import SLIDE, sample_path
from densevision.synthetic.mosaic import IN_MEMORY_SOURCE_PIXELS, Crops, check_size, random_turn, window_offsets
from densevision.synthetic.planted import Planted, PlantIndex, PlantSpec, exact_objects

# Classic TIFF offsets are 32-bit; the pyramid of raw pixels bounds the JPEG output from above.
_BIGTIFF_ABOVE = 2**32 - 2**26
_WHITE = 255


class _SlideSource:
    """Tissue and glass crop offsets in a real slide (from its thumbnail), and the crops themselves."""

    def __init__(self, path: Path, tile: int) -> None:
        try:
            self.slide = openslide.OpenSlide(path)
        except (openslide.OpenSlideError, FileNotFoundError) as e:
            raise UnsupportedFormatError(
                f"{path}: cannot open the source slide ({e}); pass source= a slide OpenSlide reads "
                f"(e.g. the shipped sample {sample_path(SLIDE)})"
            ) from e
        W, H = self.slide.dimensions
        if tile > min(W, H):
            self.slide.close()
            raise ConfigError(
                f"tile_size {tile} is larger than the source slide {path} ({W} x {H}); use a smaller tile_size "
                "or a larger source"
            )
        thumb = np.asarray(self.slide.get_thumbnail((512, 512)).convert("RGB")).astype(np.int16)
        # H&E tissue is darker or more saturated than the bright, grey glass around it.
        tissue = (thumb.mean(axis=2) < 215) | (thumb.max(axis=2) - thumb.min(axis=2) > 25)
        x, y, frac = window_offsets(tissue, W / thumb.shape[1], tile, (W, H))
        order = np.argsort(frac, kind="stable")
        n = max(1, len(order) // 10)
        hi = frac >= min(0.6, frac[order[-n]])
        lo = frac <= max(0.02, frac[order[n - 1]])
        self.tissue = np.stack([x[hi], y[hi]], axis=1)
        self.glass = np.stack([x[lo], y[lo]], axis=1)
        pixels = None
        if W * H <= IN_MEMORY_SOURCE_PIXELS:
            pixels = np.empty((H, W, 3), dtype=np.uint8)
            for y0 in range(0, H, 512):
                pixels[y0 : y0 + 512] = self._read(0, y0, W, min(512, H - y0))
        self.crop = Crops(lambda x, y, s: self._read(x, y, s, s), pixels)

    def _read(self, x: int, y: int, w: int, h: int) -> np.ndarray:
        return np.asarray(self.slide.read_region((x, y), 0, (w, h)))[..., :3]

    def close(self) -> None:
        self.slide.close()


def _tissue_pieces(width: int, height: int, rng: np.random.Generator) -> np.ndarray:
    """``n x 4`` ellipses ``(cx, cy, rx, ry)`` in level-0 pixels: where the slide has tissue (about 30%)."""
    n = int(np.clip(round(width * height / 6000**2), 1, 24))
    c = rng.uniform(0.15, 0.85, size=(n, 2)) * (width, height)
    r = rng.uniform(0.25, 0.45, size=(n, 2)) * (width, height) / np.sqrt(n)
    return np.concatenate([c, r], axis=1)


def make_slide(
    path: str | os.PathLike[str],
    width: int,
    height: int,
    *,
    source: str | os.PathLike[str] | None = None,
    tile_size: int = 512,
    mpp: float = 0.5,
    seed: int = 0,
    quality: int = 90,
    plant: Sequence[PlantSpec] | None = None,
) -> list[Planted]:
    """Write a ``width x height`` pyramidal tiled JPEG TIFF slide (OpenSlide ``generic-tiff``) to ``path``.

    Level 0 is made of ``tile_size`` crops of the real slide ``source`` (default: the shipped sample
    CMU-1-Small-Region.svs; seeded; tissue inside a few elliptical
    pieces, glass around them); each lower level is the previous one halved (2 x 2 mean, ``ceil`` sizes) until it
    fits in one tile. ``mpp`` is stored as pixels per centimetre. ``plant`` objects (:class:`Planted` or mappings
    with ``x0, y0, x1, y1`` and optional ``color``, ``shape``, ``label``) are drawn into level 0 (and so appear,
    halved, in every level).

    Memory grows with the width only: a row of level-0 tiles and its halving, and on each lower level the tiles
    started and not yet complete (:class:`~densevision.io.writers.levels.Pyramid`; measured: peak RSS +27 MiB from
    4096 to 32768 pixels wide, 2048 rows), plus the source (at most ``IN_MEMORY_SOURCE_PIXELS x 3`` bytes). Level 0
    streams into ``<path>.partial``; lower levels' encoded tiles are spooled to ``<path>.spool.partial`` (about a
    third of the output) and copied after it.

    Returns:
        The planted objects with exact boxes, in the order given (empty without ``plant``).

    Raises:
        ConfigError: bad size, tile size, quality or objects. UnsupportedFormatError: ``source`` is not a slide.
        OutputError: ``path`` cannot be written.
    """
    check_size(width, height, tile_size)
    if not 1 <= quality <= 100:
        raise ConfigError(f"JPEG quality must be in 1..100, got {quality}")
    if not mpp > 0:
        raise ConfigError(f"mpp must be positive microns per pixel, got {mpp}")
    out = check_output_path(path)
    objects = exact_objects(plant, width, height, 3)
    index = PlantIndex(objects, tile_size)
    t = tile_size
    dims = pyramid_dimensions(width, height, t)

    def encode(tile: np.ndarray) -> bytes:
        # What tifffile writes for compression="jpeg" on RGB: YCbCr, 2 x 2 chroma subsampling, a complete JPEG
        # stream per tile (no shared JPEGTables).
        return bytes(
            imagecodecs.jpeg8_encode(
                np.ascontiguousarray(tile), level=quality, colorspace="RGB", outcolorspace="YCBCR", subsampling=(2, 2)
            )
        )

    source_path = Path(source) if source is not None else sample_path(SLIDE)
    src = _SlideSource(source_path, t)
    pieces = _tissue_pieces(width, height, np.random.default_rng([seed, 0]))
    spool_path = sibling(out, ".spool.partial")

    def level0(below: Pyramid | None) -> Iterator[bytes]:
        """Level-0 tiles, one row at a time: the row is encoded and halved into the levels ``below`` before its
        tiles are handed to tifffile (which stops asking after the last tile)."""
        half = np.full((t // 2, dims[1][0] if below is not None else 1, 3), _WHITE, dtype=np.uint8)
        for ty in range(-(-height // t)):
            y, vh = ty * t, min(t, height - ty * t)
            row = []
            for tx in range(-(-width // t)):
                x, vw = tx * t, min(t, width - tx * t)
                rng = np.random.default_rng([seed, 1, ty, tx])
                cx, cy = x + vw / 2, y + vh / 2
                inside = (((cx - pieces[:, 0]) / pieces[:, 2]) ** 2 + ((cy - pieces[:, 1]) / pieces[:, 3]) ** 2) <= 1
                pool = src.tissue if inside.any() else src.glass
                ox, oy = pool[rng.integers(len(pool))]
                pixels = np.array(random_turn(src.crop(int(ox), int(oy), t), rng), order="C")  # a writable copy
                index.draw(pixels[:vh, :vw], x, y, ty)
                pixels[vh:], pixels[:, vw:] = _WHITE, _WHITE
                row.append(encode(pixels))
                if below is not None:
                    small = halve(pixels[:vh, :vw], "mean")
                    half[: small.shape[0], x // 2 : x // 2 + small.shape[1]] = small
            if below is not None:
                below.put(half[: -(-vh // 2)], 0, y // 2)
            yield from row

    raw = sum(w * h * 3 for w, h in dims)
    resolution = (1e4 / mpp, 1e4 / mpp)
    common: dict[str, Any] = dict(
        dtype=np.uint8,
        tile=(t, t),
        compression="jpeg",
        photometric="rgb",
        planarconfig="contig",
        subsampling=(2, 2),
        resolution=resolution,
        resolutionunit="CENTIMETER",
        metadata=None,
        software="densevision.synthetic",
    )
    try:
        with (
            replacing(out) as partial,
            open(spool_path, "w+b") as spool,
            tifffile.TiffWriter(partial, bigtiff=raw > _BIGTIFF_ABOVE) as tif,
        ):
            tiles = TileSpool(spool, dims[1:], t)
            below = None  # levels 1 and lower, their tiles encoded into the spool as they complete
            if len(dims) > 1:
                below = Pyramid(
                    *dims[1], 3, t, "mean", lambda level, tx, ty, tile: tiles.add(level, tx, ty, encode(tile)), _WHITE
                )
            tif.write(
                level0(below),
                shape=(height, width, 3),
                subfiletype=0,
                description=f"densevision synthetic slide: {width}x{height}, seed {seed}, source {source_path.name}",
                **common,
            )
            if below is not None and not below.complete:
                raise AssertionError("a pyramid level was left incomplete")
            for i, (w, h) in enumerate(dims[1:]):
                tif.write(tiles.tiles(i), shape=(h, w, 3), subfiletype=1, **common)
    except OSError as e:
        raise OutputError(f"{out}: writing the synthetic slide failed ({e}); check the path and free disk space") from e
    finally:
        remove_quietly(spool_path)
        src.close()
    return objects
