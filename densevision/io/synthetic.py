"""Big synthetic test images built from crops of small real ones, written streaming, with objects planted at known
boxes so that results can be scored.

- :func:`make_slide`: a pyramidal tiled JPEG TIFF that OpenSlide opens as ``generic-tiff`` (one top-level IFD per
  level, each halved until it fits in one tile; resolution in pixels per centimetre so ``openslide.mpp-x`` is the
  requested mpp). Level-0 tiles are seeded random crops (rotated / flipped) of a real H&E slide: tissue crops inside
  a few large elliptical "tissue pieces", glass crops around them, so tissue masks and tile skipping behave as on
  a real slide.
- :func:`make_geotiff`: a tiled, deflate-compressed GeoTIFF with a CRS, an affine transform and nodata, whose
  tiles are mosaics of fully valid crops of a real scene, with an optional nodata collar along the border.

Memory is bounded by one row of tiles (plus a source image of at most :data:`IN_MEMORY_SOURCE_PIXELS` kept in
memory; larger sources are read window by window), never by the output size. Both functions build
``<path>.partial`` and rename it onto ``path`` only when complete. Tile content depends only on ``seed``, the tile
index and the source, so the same call gives the same pixels.

Coordinates of planted objects are level-0 pixels, boxes half-open ``[x0, x1) x [y0, y1)``; a pixel ``(x, y)``
belongs to an ellipse when its centre ``(x + 0.5, y + 0.5)`` lies in the ellipse inscribed in the box.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, BinaryIO, Literal

import imagecodecs
import numpy as np
import openslide
import rasterio
import tifffile
from rasterio.crs import CRS
from rasterio.enums import Resampling
from rasterio.errors import CRSError, RasterioIOError
from rasterio.transform import Affine
from rasterio.windows import Window

from densevision.errors import ConfigError, OutputError, UnsupportedFormatError
from densevision.io.writers._atomic import check_output_path, remove_quietly, sibling
from densevision.io.writers.pyramid import PyramidLevel, downsample2, pyramid_dimensions

REPO = Path(__file__).resolve().parents[2]
DEFAULT_SLIDE_SOURCE = REPO.parent / "shared" / "data" / "wsi" / "CMU-1-Small-Region.svs"
DEFAULT_GEOTIFF_SOURCE = REPO.parent / "shared" / "data" / "geotiff" / "RGB.byte.tif"

# Sources up to this many level-0 pixels are decoded once into memory (CMU-1-Small-Region: 6.6 Mpx, 20 MB RGB);
# larger ones are read window by window, so a full-size real slide can serve as a source too.
IN_MEMORY_SOURCE_PIXELS = 2**24

# Classic TIFF offsets are 32-bit; the pyramid of raw pixels bounds the JPEG output from above.
_BIGTIFF_ABOVE = 2**32 - 2**26
_WHITE = 255
Shape = Literal["rect", "ellipse"]


@dataclass(frozen=True)
class Planted:
    """An object drawn into a synthetic image: a filled rectangle or ellipse of one colour.

    ``x0, y0, x1, y1`` is the half-open box in level-0 pixels. As returned by :func:`make_slide` /
    :func:`make_geotiff` the box is exact: the smallest box holding every pixel drawn (clipped to the image;
    objects drawn later may cover earlier ones).
    """

    x0: int
    y0: int
    x1: int
    y1: int
    color: tuple[int, ...] = (0, 160, 0)
    shape: Shape = "rect"
    label: str = "object"
    # For an ellipse: its centre and radii ``(cx, cy, rx, ry)`` in level-0 pixels; None: inscribed in the box.
    ellipse: tuple[float, float, float, float] | None = None

    @property
    def box(self) -> tuple[int, int, int, int]:
        return (self.x0, self.y0, self.x1, self.y1)

    @property
    def area(self) -> int:
        """Number of pixels drawn (before any later object covers some)."""
        return int(self.mask(self.x0, self.y0, self.x1 - self.x0, self.y1 - self.y0).sum())

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["color"] = list(self.color)
        d["ellipse"] = list(self.ellipse) if self.ellipse else None
        return d

    def mask(self, x: int, y: int, w: int, h: int) -> np.ndarray:
        """``h x w`` bool: the object's pixels within the window at level-0 ``(x, y)`` of ``w x h`` pixels."""
        out = np.zeros((h, w), dtype=bool)
        cx0, cy0, cx1, cy1 = max(x, self.x0), max(y, self.y0), min(x + w, self.x1), min(y + h, self.y1)
        if cx1 <= cx0 or cy1 <= cy0:
            return out
        if self.shape == "rect":
            out[cy0 - y : cy1 - y, cx0 - x : cx1 - x] = True
        else:
            fx, fy = self._terms(np.arange(cx0, cx1), np.arange(cy0, cy1))
            out[cy0 - y : cy1 - y, cx0 - x : cx1 - x] = fy[:, None] + fx[None, :] <= 1.0
        return out

    def _terms(self, xs: np.ndarray, ys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The ellipse's ``((x + 0.5 - cx) / rx)^2`` and ``((y + 0.5 - cy) / ry)^2`` for pixel columns / rows."""
        cx, cy, rx, ry = self.ellipse or (
            (self.x0 + self.x1) / 2,
            (self.y0 + self.y1) / 2,
            (self.x1 - self.x0) / 2,
            (self.y1 - self.y0) / 2,
        )
        return ((xs + 0.5 - cx) / rx) ** 2, ((ys + 0.5 - cy) / ry) ** 2


# What ``plant=`` takes: Planted objects, mappings with x0, y0, x1, y1 (or box) and optional color, shape, label,
# or plain (x0, y0, x1, y1) boxes.
PlantSpec = Planted | Mapping[str, Any] | tuple[int, int, int, int]


def scatter_objects(
    count: int,
    width: int,
    height: int,
    *,
    size: tuple[int, int] = (24, 96),
    seed: int = 0,
    shapes: Sequence[Shape] = ("rect", "ellipse"),
    colors: Sequence[tuple[int, ...]] = ((0, 160, 0), (20, 20, 220), (230, 200, 0)),
    margin: int = 8,
) -> list[Planted]:
    """``count`` non-overlapping objects of side ``size[0]..size[1]`` pixels, at seeded random places in a
    ``width x height`` image (one per cell of a grid of ``size[1] + margin`` pixel cells), ready for ``plant=``.
    The label of each is its shape."""
    lo, hi = size
    if not 0 < lo <= hi:
        raise ConfigError(f"object size must be 0 < min <= max pixels, got {size}")
    cell = hi + margin
    nx, ny = width // cell, height // cell
    if count > nx * ny:
        raise ConfigError(
            f"{count} objects of up to {hi} px do not fit apart in {width} x {height} pixels (at most {nx * ny}); "
            "ask for fewer or smaller objects"
        )
    rng = np.random.default_rng(seed)
    out = []
    for c in rng.choice(nx * ny, size=count, replace=False):
        w, h = (int(v) for v in rng.integers(lo, hi + 1, size=2))
        x = int(c % nx) * cell + int(rng.integers(0, cell - w + 1))
        y = int(c // nx) * cell + int(rng.integers(0, cell - h + 1))
        shape = shapes[int(rng.integers(len(shapes)))]
        color = tuple(colors[int(rng.integers(len(colors)))])
        out.append(Planted(x, y, x + w, y + h, color=color, shape=shape, label=shape))
    return out


def _prepare_plants(plant: Sequence[PlantSpec] | None, width: int, height: int, bands: int) -> list[Planted]:
    """Validate objects and return them with exact boxes (clipped to the image, tight around drawn pixels)."""
    out: list[Planted] = []
    for i, obj in enumerate(plant or ()):
        if isinstance(obj, Sequence) and not isinstance(obj, Planted) and len(obj) == 4:
            x0, y0, x1, y1 = (int(v) for v in obj)
            obj = Planted(x0, y0, x1, y1)
        elif isinstance(obj, Mapping):
            try:
                x0, y0, x1, y1 = obj["box"] if "box" in obj else (obj["x0"], obj["y0"], obj["x1"], obj["y1"])
            except (KeyError, TypeError, ValueError):
                raise ConfigError(
                    f"plant[{i}] = {obj!r}: give the box as x0, y0, x1, y1 (or box=(x0, y0, x1, y1)) keys"
                ) from None
            obj = Planted(
                int(x0),
                int(y0),
                int(x1),
                int(y1),
                color=tuple(obj.get("color", obj.get("colour", Planted.color))),
                shape=obj.get("shape", "rect"),
                label=str(obj.get("label", "object")),
                ellipse=tuple(obj["ellipse"]) if obj.get("ellipse") else None,
            )
        if obj.shape not in ("rect", "ellipse"):
            raise ConfigError(f"plant[{i}]: shape must be 'rect' or 'ellipse', got {obj.shape!r}")
        if len(obj.color) != bands or not all(0 <= int(c) <= 255 for c in obj.color):
            raise ConfigError(f"plant[{i}]: color must be {bands} values in 0..255, got {obj.color!r}")
        if obj.x1 <= obj.x0 or obj.y1 <= obj.y0:
            raise ConfigError(f"plant[{i}]: empty box {obj.box}; need x0 < x1 and y0 < y1")
        xs = np.arange(max(obj.x0, 0), min(obj.x1, width))
        ys = np.arange(max(obj.y0, 0), min(obj.y1, height))
        if obj.shape == "ellipse" and len(xs) and len(ys):
            fx, fy = obj._terms(xs, ys)
            xs, ys = xs[fx + fy.min() <= 1.0], ys[fy + fx.min() <= 1.0]
        if not len(xs) or not len(ys):
            raise ConfigError(f"plant[{i}]: box {obj.box} draws no pixel in the {width} x {height} image")
        # The exact box: the drawn pixels' extent; an ellipse keeps the geometry it was drawn from.
        color = tuple(int(c) for c in obj.color)
        geometry = obj.ellipse
        if obj.shape == "ellipse" and geometry is None:
            geometry = ((obj.x0 + obj.x1) / 2, (obj.y0 + obj.y1) / 2, (obj.x1 - obj.x0) / 2, (obj.y1 - obj.y0) / 2)
        box = (int(xs[0]), int(ys[0]), int(xs[-1]) + 1, int(ys[-1]) + 1)
        out.append(Planted(*box, color=color, shape=obj.shape, label=obj.label, ellipse=geometry))
    return out


class _PlantIndex:
    """Objects bucketed by the rows of tiles they touch, to draw each tile with the few objects it meets."""

    def __init__(self, objects: Sequence[Planted], tile: int) -> None:
        self.rows: dict[int, list[Planted]] = {}
        for obj in objects:
            for ty in range(obj.y0 // tile, (obj.y1 - 1) // tile + 1):
                self.rows.setdefault(ty, []).append(obj)

    def draw(self, pixels: np.ndarray, x: int, y: int, ty: int) -> None:
        """Draw the objects meeting the window of ``pixels`` (``H x W x C``) at level-0 ``(x, y)``."""
        h, w = pixels.shape[:2]
        for obj in self.rows.get(ty, ()):
            if obj.x0 < x + w and obj.x1 > x and obj.y0 < y + h and obj.y1 > y:
                pixels[obj.mask(x, y, w, h)] = obj.color


# --- sources -----------------------------------------------------------------------------------------------------


class _Crops:
    """Square crops of a source image at chosen level-0 offsets, from memory or read on demand."""

    def __init__(self, read: Callable[[int, int, int], np.ndarray], pixels: np.ndarray | None) -> None:
        self._read, self._pixels = read, pixels

    def __call__(self, x: int, y: int, size: int) -> np.ndarray:
        if self._pixels is not None:
            return self._pixels[y : y + size, x : x + size]
        return self._read(x, y, size)


def _offsets(mask: np.ndarray, scale: float, size: int, source_size: tuple[int, int]) -> tuple[np.ndarray, ...]:
    """For every ``size``-pixel window that fits in the source, placed on the grid of ``mask`` (a low-resolution
    bool map, ``scale`` level-0 pixels per mask pixel): level-0 ``x``, ``y`` and the fraction of True in it."""
    k = max(1, round(size / scale))
    h, w = mask.shape
    if k > h or k > w:
        return np.empty(0, int), np.empty(0, int), np.empty(0)
    s = np.zeros((h + 1, w + 1), dtype=np.int64)
    s[1:, 1:] = mask.cumsum(0).cumsum(1)
    count = s[k:, k:] - s[:-k, k:] - s[k:, :-k] + s[:-k, :-k]  # (h - k + 1) x (w - k + 1)
    yy, xx = np.mgrid[: count.shape[0], : count.shape[1]]
    x = np.minimum(np.round(xx.ravel() * scale).astype(int), source_size[0] - size)
    y = np.minimum(np.round(yy.ravel() * scale).astype(int), source_size[1] - size)
    return x, y, count.ravel() / (k * k)


class _SlideSource:
    """Tissue and glass crop offsets in a real slide (from its thumbnail), and the crops themselves."""

    def __init__(self, path: Path, tile: int) -> None:
        try:
            self.slide = openslide.OpenSlide(path)
        except (openslide.OpenSlideError, FileNotFoundError) as e:
            raise UnsupportedFormatError(
                f"{path}: cannot open the source slide ({e}); pass source= a slide OpenSlide reads "
                f"(e.g. {DEFAULT_SLIDE_SOURCE})"
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
        x, y, frac = _offsets(tissue, W / thumb.shape[1], tile, (W, H))
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
        self.crop = _Crops(lambda x, y, s: self._read(x, y, s, s), pixels)

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


def _flip(a: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    a = np.rot90(a, int(rng.integers(4)))
    return a[:, ::-1] if rng.integers(2) else a


# --- slides ------------------------------------------------------------------------------------------------------


def _check_size(width: int, height: int, tile: int) -> None:
    if width <= 0 or height <= 0:
        raise ConfigError(f"image size must be positive, got {width} x {height}")
    if tile <= 0 or tile % 16:
        raise ConfigError(f"tile size must be a positive multiple of 16 (TIFF tiles, JPEG blocks), got {tile}")


def make_slide(
    path: str | os.PathLike[str],
    width: int,
    height: int,
    *,
    source: str | os.PathLike[str] = DEFAULT_SLIDE_SOURCE,
    tile_size: int = 512,
    mpp: float = 0.5,
    seed: int = 0,
    quality: int = 90,
    plant: Sequence[PlantSpec] | None = None,
) -> list[Planted]:
    """Write a ``width x height`` pyramidal tiled JPEG TIFF slide (OpenSlide ``generic-tiff``) to ``path``.

    Level 0 is made of ``tile_size`` crops of the real slide ``source`` (seeded; tissue inside a few elliptical
    pieces, glass around them); each lower level is the previous one halved (2 x 2 mean, ``ceil`` sizes) until it
    fits in one tile. ``mpp`` is stored as pixels per centimetre. ``plant`` objects (:class:`Planted` or mappings
    with ``x0, y0, x1, y1`` and optional ``color``, ``shape``, ``label``) are drawn into level 0 (and so appear,
    halved, in every level).

    Memory grows with the width only: one band of ``tile_size`` rows per level and the 2 x 2 downsampling
    temporaries, under ``3 x tile_size x width x 3`` bytes (measured: +131 MiB from 4096 to 32768 pixels wide), plus
    the source (at most ``IN_MEMORY_SOURCE_PIXELS x 3`` bytes). Level 0 streams into ``<path>.partial``; lower
    levels' encoded tiles are spooled to ``<path>.spool.partial`` (about a third of the output) and copied after it.

    Returns:
        The planted objects with exact boxes, in the order given (empty without ``plant``).

    Raises:
        ConfigError: bad size, tile size, quality or objects. UnsupportedFormatError: ``source`` is not a slide.
        OutputError: ``path`` cannot be written.
    """
    _check_size(width, height, tile_size)
    if not 1 <= quality <= 100:
        raise ConfigError(f"JPEG quality must be in 1..100, got {quality}")
    if not mpp > 0:
        raise ConfigError(f"mpp must be positive microns per pixel, got {mpp}")
    out = check_output_path(path)
    objects = _prepare_plants(plant, width, height, 3)
    index = _PlantIndex(objects, tile_size)
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

    src = _SlideSource(Path(source), t)
    pieces = _tissue_pieces(width, height, np.random.default_rng([seed, 0]))
    levels = [PyramidLevel(w, h, 3, t, encode, fill=_WHITE) for w, h in dims[1:]]
    partial, spool_path = sibling(out, ".partial"), sibling(out, ".spool.partial")

    def feed(i: int, rows: np.ndarray, spool: BinaryIO) -> None:
        for band in levels[i].push(rows, spool):
            if i + 1 < len(levels):
                feed(i + 1, downsample2(band, "mean"), spool)

    def level0(spool: BinaryIO) -> Iterator[bytes]:
        """Level-0 tiles, one row at a time: the row is encoded and halved into the levels below before its tiles
        are handed to tifffile (which stops asking after the last tile)."""
        half = np.full((t // 2, dims[1][0] if levels else 1, 3), _WHITE, dtype=np.uint8)
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
                pixels = np.array(_flip(src.crop(int(ox), int(oy), t), rng), order="C")  # a writable copy
                index.draw(pixels[:vh, :vw], x, y, ty)
                pixels[vh:], pixels[:, vw:] = _WHITE, _WHITE
                row.append(encode(pixels))
                if levels:
                    small = downsample2(pixels[:vh, :vw], "mean")
                    half[: small.shape[0], x // 2 : x // 2 + small.shape[1]] = small
            if levels:
                feed(0, half[: -(-vh // 2)], spool)
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
        software="densevision.io.synthetic",
    )
    try:
        with open(spool_path, "w+b") as spool, tifffile.TiffWriter(partial, bigtiff=raw > _BIGTIFF_ABOVE) as tif:
            tif.write(
                level0(spool),
                shape=(height, width, 3),
                subfiletype=0,
                description=f"densevision synthetic slide: {width}x{height}, seed {seed}, source {Path(source).name}",
                **common,
            )
            if not all(lv.rows_done == lv.height for lv in levels):
                raise AssertionError("a pyramid level was left incomplete")
            for lv in levels:
                tif.write(lv.tiles(spool), shape=(lv.height, lv.width, 3), subfiletype=1, **common)
        os.replace(partial, out)
    except OSError as e:
        remove_quietly(partial)
        raise OutputError(f"{out}: writing the synthetic slide failed ({e}); check the path and free disk space") from e
    except BaseException:
        remove_quietly(partial)
        raise
    finally:
        remove_quietly(spool_path)
        src.close()
    return objects


# --- GeoTIFFs ----------------------------------------------------------------------------------------------------


class _RasterSource:
    """Offsets of fully valid square patches in a real raster (as large as possible, at most ``tile``), and the
    patches themselves."""

    def __init__(self, path: Path, tile: int) -> None:
        try:
            self.ds = rasterio.open(path)
        except RasterioIOError as e:
            raise UnsupportedFormatError(
                f"{path}: cannot open the source raster ({e}); pass source= a GeoTIFF (e.g. {DEFAULT_GEOTIFF_SOURCE})"
            ) from e
        ds = self.ds
        W, H = ds.width, ds.height
        small = W * H <= IN_MEMORY_SOURCE_PIXELS
        scale = 1.0 if small else max(W, H) / 2048
        shape = (max(1, round(H / scale)), max(1, round(W / scale)))
        valid = ds.dataset_mask(out_shape=shape, resampling=Resampling.nearest) > 0
        self.patch = min(tile, W, H)
        while True:
            x, y, frac = _offsets(valid, W / shape[1], self.patch, (W, H))
            if (frac >= 1).any() or self.patch <= 16:
                break
            self.patch //= 2
        if not (frac >= 1).any():
            ds.close()
            raise ConfigError(f"{path}: the source raster has no fully valid 16 x 16 window to crop; choose another")
        self.offsets = np.stack([x[frac >= 1], y[frac >= 1]], axis=1)
        self.count, self.dtype = ds.count, np.dtype(ds.dtypes[0])
        self.crop = _Crops(self._read, np.moveaxis(ds.read(), 0, -1) if small else None)

    def _read(self, x: int, y: int, size: int) -> np.ndarray:
        return np.moveaxis(self.ds.read(window=Window(x, y, size, size)), 0, -1)

    def close(self) -> None:
        self.ds.close()


def make_geotiff(
    path: str | os.PathLike[str],
    width: int,
    height: int,
    *,
    source: str | os.PathLike[str] = DEFAULT_GEOTIFF_SOURCE,
    crs: str | CRS | None = "EPSG:32618",
    pixel_size: float | tuple[float, float] | None = None,
    origin: tuple[float, float] | None = None,
    tile: int = 512,
    nodata: float | None = 0,
    collar: int = 0,
    seed: int = 0,
    overviews: bool = True,
    plant: Sequence[PlantSpec] | None = None,
) -> list[Planted]:
    """Write a ``width x height`` tiled, deflate-compressed GeoTIFF to ``path``, window by window with rasterio.

    Pixels are mosaics of seeded, rotated / flipped, fully valid patches of the real raster ``source`` (same band
    count and dtype); valid pixels never equal ``nodata`` in every band (such pixels are nudged by one). The
    georeference is ``crs`` with a north-up transform: ``pixel_size`` (map units per pixel, one number or
    ``(x, y)``; default: the source's) from the upper-left corner ``origin`` (default: the source's). ``collar``
    pixels along each border are ``nodata``. ``plant`` objects are drawn last (over the collar too), with colours
    of ``source``'s band count. ``overviews``: internal overviews 2, 4, ... (nodata-aware average) until the
    smallest fits in one tile, as a cloud-optimised GeoTIFF has.

    Memory: GDAL's block cache is capped at 64 MB while writing; otherwise about one tile.

    Returns:
        The planted objects with exact boxes in level-0 (raster) pixels, in the order given.

    Raises:
        ConfigError: bad size, tile, georeference, collar or objects. UnsupportedFormatError: ``source`` is not a
        raster. OutputError: ``path`` cannot be written.
    """
    _check_size(width, height, tile)
    out = check_output_path(path)
    if collar < 0 or (collar and nodata is None):
        raise ConfigError(f"collar must be >= 0 pixels and needs a nodata value, got collar={collar}, nodata={nodata}")
    try:
        crs_obj = CRS.from_user_input(crs) if crs is not None else None
    except CRSError as e:
        raise ConfigError(f"crs {crs!r} is not a CRS rasterio understands ({e}); give e.g. 'EPSG:32618'") from e
    src = _RasterSource(Path(source), tile)
    try:
        objects = _prepare_plants(plant, width, height, src.count)
        if nodata is not None and any(all(c == nodata for c in o.color) for o in objects):
            raise ConfigError(f"a planted colour equals nodata ({nodata}) in every band: it would read as nodata")
        if pixel_size is None:
            sx, sy = src.ds.res
        elif isinstance(pixel_size, (int, float)):
            sx = sy = pixel_size
        else:
            sx, sy = pixel_size
        if not (sx > 0 and sy > 0):
            raise ConfigError(f"pixel_size must be positive map units per pixel, got {pixel_size!r}")
        ox, oy = (src.ds.transform.c, src.ds.transform.f) if origin is None else origin
        transform = Affine(float(sx), 0.0, float(ox), 0.0, -float(sy), float(oy))
        index = _PlantIndex(objects, tile)
        profile: dict[str, Any] = dict(
            driver="GTiff",
            width=width,
            height=height,
            count=src.count,
            dtype=src.dtype,
            crs=crs_obj,
            transform=transform,
            nodata=nodata,
            tiled=True,
            blockxsize=tile,
            blockysize=tile,
            compress="deflate",
            interleave="pixel",
            bigtiff="IF_SAFER",
        )
        if src.count == 3 and src.dtype == np.uint8:
            profile["photometric"] = "RGB"
        partial = sibling(out, ".partial")
        p = src.patch
        if nodata is not None:
            top = np.iinfo(src.dtype).max if src.dtype.kind in "iu" else np.inf
            nudged = nodata + 1 if nodata + 1 <= top else nodata - 1
        try:
            with rasterio.Env(GDAL_CACHEMAX=64), rasterio.open(partial, "w", **profile) as dst:
                for ty in range(-(-height // tile)):
                    y, vh = ty * tile, min(tile, height - ty * tile)
                    for tx in range(-(-width // tile)):
                        x, vw = tx * tile, min(tile, width - tx * tile)
                        rng = np.random.default_rng([seed, 2, ty, tx])
                        pixels = np.empty((vh, vw, src.count), dtype=src.dtype)
                        for py in range(0, vh, p):
                            for px in range(0, vw, p):
                                ox_, oy_ = src.offsets[rng.integers(len(src.offsets))]
                                patch = _flip(src.crop(int(ox_), int(oy_), p), rng)
                                pixels[py : py + p, px : px + p] = patch[: vh - py, : vw - px]
                        if nodata is not None:
                            empty = (pixels == nodata).all(axis=-1)
                            pixels[empty] = nudged
                            if collar:
                                pixels[: max(0, collar - y)] = nodata
                                pixels[max(0, height - collar - y) :] = nodata
                                pixels[:, : max(0, collar - x)] = nodata
                                pixels[:, max(0, width - collar - x) :] = nodata
                        index.draw(pixels, x, y, ty)
                        dst.write(np.moveaxis(pixels, -1, 0), window=Window(x, y, vw, vh))
                factors = [2**k for k in range(1, 32) if max(width, height) / 2 ** (k - 1) > tile]
                if overviews and factors:
                    dst.build_overviews(factors, Resampling.average)
            os.replace(partial, out)
        except (OSError, RasterioIOError) as e:
            remove_quietly(partial)
            raise OutputError(
                f"{out}: writing the synthetic GeoTIFF failed ({e}); check the path and disk space"
            ) from e
        except BaseException:
            remove_quietly(partial)
            raise
    finally:
        src.close()
    return objects
