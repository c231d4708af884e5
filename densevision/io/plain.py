"""Plain single-resolution images (PNG, JPEG, BMP, untiled TIFF) through Pillow, decoded once at open."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
from PIL import Image, TiffImagePlugin

from densevision.errors import CorruptImageError, ImageTooLargeError, UnsupportedFormatError
from densevision.io.decode import WHAT_TO_DO, cause_text
from densevision.io.source import ImageFacts, ImageSource, Region, clip_window

# A plain image is decoded whole; above this many pixels it must be converted to a tiled pyramid first.
DEFAULT_MAX_PIXELS = 2**28


def _declared_tiff_bytes(path: Path) -> tuple[int, int, int, int] | None:
    """``(width, height, samples per pixel, decoded bytes)`` that the first TIFF directory declares, read from
    the tags alone (nothing decoded), or None when the directory cannot be parsed."""
    try:
        with open(path, "rb") as f, warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ifd = TiffImagePlugin.ImageFileDirectory_v2(f.read(8))
            f.seek(ifd.next)
            ifd.load(f)
            w, h, spp = int(ifd[256]), int(ifd[257]), int(ifd.get(277, 1))
            bits = max(ifd.get(258, (8,)))
    except Exception:  # unparseable header: Pillow will say so below
        return None
    return w, h, spp, w * h * spp * bits // 8


class PlainImageSource(ImageSource):
    def __init__(self, path: Path, max_pixels: int = DEFAULT_MAX_PIXELS) -> None:
        declared = _declared_tiff_bytes(path)
        # 8 bytes per pixel covers RGBA uint16; more than that is a corrupt or hostile header.
        if declared is not None and declared[3] > 8 * max_pixels:
            w, h, spp, nbytes = declared
            raise ImageTooLargeError(
                f"{path}: declares {w} x {h} pixels with {spp} samples each ({nbytes / 2**30:.1f} GiB decoded), "
                "beyond what a plain image may use; the header is corrupt, or convert the image to a tiled pyramid"
            )
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)
                img = Image.open(path)
        except Image.DecompressionBombError as e:
            raise ImageTooLargeError(f"{path}: {e}") from e
        except (OSError, SyntaxError, ValueError) as e:
            raise UnsupportedFormatError(f"{path}: not an image Pillow can read ({e})") from e
        w, h = img.size
        if w * h > max_pixels:
            raise ImageTooLargeError(
                f"{path}: declares {w} x {h} pixels, more than the {max_pixels} a plain image may have; "
                "convert it to a tiled pyramidal TIFF, or raise max_pixels if the file is genuine"
            )
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)
                has_alpha = img.mode in ("RGBA", "LA", "PA") or "transparency" in img.info
                rgba = np.asarray(img.convert("RGBA" if has_alpha else "RGB"))
        except (OSError, SyntaxError, ValueError) as e:
            raise CorruptImageError(f"{path}: cannot decode the pixel data ({cause_text(e)}); {WHAT_TO_DO}") from e
        finally:
            img.close()
        self._pixels = np.ascontiguousarray(rgba[..., :3])
        self._valid = rgba[..., 3] > 0 if has_alpha else np.ones((h, w), dtype=bool)
        super().__init__(
            path,
            ImageFacts(
                backend="pillow",
                format=img.format or "unknown",
                level_dimensions=((w, h),),
                level_downsamples=(1.0,),
                band_count=3,
                dtype=np.dtype(np.uint8),
                band_names=("red", "green", "blue"),
            ),
        )

    def _read(self, location: tuple[int, int], level: int, size: tuple[int, int]) -> Region:
        w, h = size
        pixels = np.zeros((h, w, 3), dtype=np.uint8)
        valid = np.zeros((h, w), dtype=bool)
        clip = clip_window(*location, w, h, *self.size)
        if clip is not None:
            src, dst = clip
            pixels[dst] = self._pixels[src]
            valid[dst] = self._valid[src]
        return Region(pixels, valid)

    def close(self) -> None:
        pass
