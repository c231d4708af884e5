"""segment_image end to end with small torch predictors whose whole-image answer is known."""

from __future__ import annotations

import json

import numpy as np
import pytest
import rasterio
import torch
from affine import Affine
from rasterio.enums import Interleaving

from densevision import open_image, segment_image
from densevision.errors import ConfigError


class ConvPredictor(torch.nn.Module):
    """Convolution-only model with a receptive-field radius of 4 px: crop blending with a halo >= 4 is exact."""

    num_classes = 4
    class_names = ("a", "b", "c", "d")
    palette = ((255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0))
    size_divisor = 16
    device = torch.device("cpu")

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = torch.nn.Sequential(
            torch.nn.Conv2d(3, 8, 5, padding=2), torch.nn.ReLU(), torch.nn.Conv2d(8, 4, 5, padding=2)
        )

    @torch.no_grad()
    def forward(self, batch: torch.Tensor) -> torch.Tensor:
        return self.net(batch / 255.0)  # raw 0 (padding) stays 0, as the whole image's zero padding


class SaturationPredictor(ConvPredictor):
    """Two classes, 'glass' and 'stained', from saturation: a stand-in with an obvious right answer."""

    num_classes = 2
    class_names = ("glass", "stained")
    palette = ((200, 200, 200), (180, 0, 180))

    @torch.no_grad()
    def forward(self, batch: torch.Tensor) -> torch.Tensor:
        hi, lo = batch.max(dim=1).values, batch.min(dim=1).values
        sat = (hi - lo) / hi.clamp(min=1)
        return torch.stack([0.1 - sat, sat - 0.1], dim=1)


@pytest.fixture
def geotiff(tmp_path):
    rng = np.random.default_rng(0)
    data = rng.integers(0, 256, (3, 250, 333), dtype=np.uint8)
    path = tmp_path / "scene.tif"
    transform = Affine.translation(399960, 5000040) @ Affine.scale(10, -10)
    profile = dict(driver="GTiff", width=333, height=250, count=3, dtype="uint8", crs="EPSG:32631")
    with rasterio.open(path, "w", transform=transform, **profile) as dst:
        dst.write(data)
    return path, data, transform


def test_crop_blend_equals_the_whole_image(geotiff, tmp_path):
    path, data, transform = geotiff
    out = tmp_path / "out" / "seg.tif"
    out.parent.mkdir()
    model = ConvPredictor()
    summary = segment_image(
        path, out=out, predictor=model, tile=64, overlap=16, batch_size=3, blend="crop",
        workers=0, probability_output=True, skip_empty=False, progress=False,
    )  # fmt: skip
    whole = model(torch.from_numpy(data).float()[None])[0]
    expected = torch.softmax(whole, dim=0).numpy()
    with rasterio.open(summary["probabilities"]) as probs:
        stitched = probs.read()
    assert np.abs(stitched - expected).max() <= 1e-5
    with rasterio.open(out) as seg:
        assert seg.crs.to_epsg() == 32631 and seg.transform == transform
        np.testing.assert_array_equal(seg.read(1), whole.argmax(0).numpy())
        assert seg.nodata == 255
    assert summary["tiles"] == {"total": 7 * 5, "done": 35, "skipped": 0}
    assert sum(c["pixels"] for c in summary["classes"]) == 333 * 250
    assert summary["classes"][0]["area_m2"] == pytest.approx(summary["classes"][0]["pixels"] * 100)
    on_disk = json.loads((tmp_path / "out" / "seg.summary.json").read_text())
    assert on_disk["tiles"] == summary["tiles"]
    assert (tmp_path / "out" / "seg.preview.png").stat().st_size > 0
    assert sorted(p.name for p in out.parent.iterdir()) == [
        "seg.preview.png", "seg.probs.tif", "seg.summary.json", "seg.tif"
    ]  # fmt: skip


def test_probabilities_in_uint8_are_the_float32_ones_rounded(geotiff, tmp_path):
    path, _, transform = geotiff
    stored = {}
    for dtype in ("float32", "uint8"):
        summary = segment_image(
            path, out=tmp_path / f"{dtype}.tif", predictor=ConvPredictor(), tile=64, overlap=16, blend="gaussian",
            workers=0, probability_output=True, probability_dtype=dtype, skip_empty=False, progress=False,
        )  # fmt: skip
        assert summary["settings"]["probability_dtype"] == dtype
        with rasterio.open(summary["probabilities"]) as probs:
            assert probs.dtypes == (dtype,) * 4 and probs.transform == transform and probs.crs.to_epsg() == 32631
            assert probs.descriptions == ConvPredictor.class_names
            assert probs.interleaving == Interleaving.band  # a class's band reads apart from the others
            stored[dtype] = (probs.read(), probs.nodata, probs.scales)
        with rasterio.open(tmp_path / "float32.tif") as a, rasterio.open(tmp_path / f"{dtype}.tif") as b:
            np.testing.assert_array_equal(a.read(), b.read())  # the same class map whatever the probabilities' dtype
    p32, nodata, scales = stored["float32"]
    assert np.isnan(nodata) and scales == (1.0,) * 4 and np.isfinite(p32).all()
    p8, nodata, scales = stored["uint8"]
    assert nodata == 255 and scales == pytest.approx((1 / 254,) * 4)
    np.testing.assert_array_equal(p8, np.round(p32 * np.float32(254)).astype(np.uint8))
    assert p8.max() <= 254 and np.abs(p8 * scales[0] - p32).max() <= 0.5 / 254 + 1e-6


def test_uint8_probabilities_mark_nodata_with_255(data_dir, tmp_path):
    summary = segment_image(
        data_dir / "geotiff/RGB.byte.tif", out=tmp_path / "seg.tif", predictor=SaturationPredictor(), tile=128,
        overlap=16, workers=0, probability_output=True, probability_dtype="uint8", progress=False,
    )  # fmt: skip
    with rasterio.open(summary["probabilities"]) as probs, rasterio.open(tmp_path / "seg.tif") as seg:
        p, cmap = probs.read(), seg.read(1)
    assert ((p == 255).all(axis=0) == (cmap == 255)).all() and (cmap == 255).any() and (cmap != 255).any()
    valid = cmap != 255
    assert (p[:, valid] <= 254).all() and (np.abs(p[:, valid].astype(int).sum(axis=0) - 254) <= 2).all()


def test_level_output_keeps_coordinates(data_dir, tmp_path):
    """Segmenting cogeo.tif at overview level 2 gives an output whose transform is scaled by 4."""
    out = tmp_path / "seg.tif"
    summary = segment_image(
        data_dir / "geotiff/cogeo.tif", out=out, predictor=SaturationPredictor(), tile=128, overlap=0,
        level=2, workers=0, progress=False,
    )  # fmt: skip
    with rasterio.open(data_dir / "geotiff/cogeo.tif") as src, rasterio.open(out) as seg:
        assert (seg.width, seg.height) == (256, 256)
        assert seg.transform.almost_equals(src.transform @ Affine.scale(4))
        assert seg.crs == src.crs
    assert summary["settings"]["downsample"] == 4


def test_slide_glass_tiles_are_skipped_and_output_is_a_pyramid(data_dir, tmp_path):
    out = tmp_path / "slide-seg.tif"
    summary = segment_image(
        data_dir / "wsi/CMU-1-Small-Region.svs", out=out, predictor=SaturationPredictor(), tile=512, overlap=32,
        batch_size=2, workers=2, progress=False,
    )  # fmt: skip
    assert summary["tiles"]["skipped"] > 0 and summary["tiles"]["done"] > 0
    assert summary["nodata_pixels"] > 0  # the skipped glass
    assert summary["classes"][1]["area_um2"] == pytest.approx(summary["classes"][1]["pixels"] * 0.499**2)
    with open_image(out) as seg:
        assert seg.size == (2220, 2967) and seg.mpp == pytest.approx((0.499, 0.499), rel=1e-3)
        assert seg.level_count >= 3
        centre = seg.read_region((1200, 2000), 0, (64, 64)).pixels[..., 0]
        corner = seg.read_region((0, 2500), 0, (64, 64)).pixels[..., 0]
    assert (centre == 1).mean() > 0.5  # stained tissue in the middle of the strip
    assert set(np.unique(corner)) <= {0, 255}  # glass: predicted glass, or skipped and written as nodata


def test_all_nodata_input_writes_an_empty_output(data_dir, tmp_path):
    out = tmp_path / "empty.tif"
    summary = segment_image(
        data_dir / "geotiff/all-nodata.tif", out=out, predictor=SaturationPredictor(), tile=64, overlap=16,
        bands=[1, 2, 3], workers=0, progress=False,
    )  # fmt: skip
    assert summary["tiles"]["done"] == 0 and "no tile has content" in summary["note"]
    with rasterio.open(out) as seg:
        assert (seg.read(1) == 255).all() and seg.crs.to_epsg() == 32628


def test_bad_arguments(geotiff, tmp_path):
    path, _, _ = geotiff
    with pytest.raises(ConfigError, match=r"\*\.tif"):
        segment_image(path, out=tmp_path / "x.png", predictor=ConvPredictor())
    with pytest.raises(ConfigError, match="blend"):
        segment_image(path, out=tmp_path / "x.tif", predictor=ConvPredictor(), blend="median")
    with pytest.raises(ConfigError, match=r"probability dtype.*float32, uint8"):
        segment_image(path, out=tmp_path / "x.tif", predictor=ConvPredictor(), probability_dtype="float16")
    with pytest.raises(ConfigError, match="multiple of the model's size divisor 16"):
        segment_image(path, out=tmp_path / "x.tif", predictor=ConvPredictor(), tile=100, progress=False)
    assert not list(tmp_path.glob("x*"))


class RangeRecorder(SaturationPredictor):
    """Records the range of the pixel values the model is given."""

    seen: list[tuple[float, float]]

    @torch.no_grad()
    def forward(self, batch: torch.Tensor) -> torch.Tensor:
        self.seen.append((float(batch.min()), float(batch.max())))
        return super().forward(batch)


def test_uint16_rasters_are_stretched_to_the_8bit_range(tmp_path):
    rng = np.random.default_rng(0)
    data = rng.integers(1000, 4001, (3, 120, 150), dtype=np.uint16)
    path = tmp_path / "u16.tif"
    transform = Affine.translation(0, 1200) @ Affine.scale(10, -10)
    with rasterio.open(
        path, "w", driver="GTiff", width=150, height=120, count=3, dtype="uint16", crs="EPSG:32631", transform=transform
    ) as dst:
        dst.write(data)
    model = RangeRecorder()
    model.seen = []
    summary = segment_image(
        path, out=tmp_path / "a.tif", predictor=model, tile=64, overlap=16, workers=0, progress=False
    )
    lo, hi = summary["settings"]["value_scale"]["lo"], summary["settings"]["value_scale"]["hi"]
    assert all(1000 <= v < 1200 for v in lo) and all(3800 < v <= 4000 for v in hi)  # 2nd / 98th percentiles
    assert min(s[0] for s in model.seen) == 0.0 and max(s[1] for s in model.seen) == 255.0
    model.seen = []
    summary = segment_image(
        path, out=tmp_path / "b.tif", predictor=model, tile=64, overlap=16, value_range=(0, 8000), workers=0,
        progress=False,
    )  # fmt: skip
    assert summary["settings"]["value_scale"] == {"lo": [0.0] * 3, "hi": [8000.0] * 3}
    assert (
        min(s[0] for s in model.seen) >= 1000 / 8000 * 255 - 0.01
        and max(s[1] for s in model.seen) <= 4000 / 8000 * 255 + 0.01
    )


def test_preview_paints_found_classes_and_leaves_background_and_nodata_unpainted(tmp_path):
    from PIL import Image

    from densevision.apis.segment import NODATA, _Preview
    from densevision.io.source import Thumbnail

    base = np.zeros((4, 6, 3), np.uint8)
    base[..., :] = np.linspace(0, 255, 6, dtype=np.uint8)[None, :, None]  # a grey ramp: stretched to itself
    classes = np.array([[0, 1, 2, NODATA, 0, 1]] * 4, np.uint8)
    out = tmp_path / "p.png"
    thumb = Thumbnail(base, np.ones((4, 6), bool), (1.0, 1.0))
    _Preview(thumb, ((9, 9, 9), (255, 0, 0), (0, 0, 255)), ["Background", "tumour", "stroma"]).save(out, classes)
    got = np.asarray(Image.open(out)).astype(int)
    unpainted = np.isin(classes, [0, NODATA])
    assert np.abs(got[unpainted] - base[unpainted]).max() <= 1
    assert (got[classes == 1][:, 0] > got[classes == 1][:, 2]).all()  # red over grey
    assert (got[classes == 2][:, 2] > got[classes == 2][:, 0]).all()  # blue over grey


@pytest.mark.parametrize("environment", [None, "64"])
def test_gdal_block_cache_is_capped_for_the_run_unless_the_environment_sets_it(environment, data_dir, tmp_path,
                                                                                monkeypatch):  # fmt: skip
    from rasterio._env import get_gdal_config

    from densevision.io.raster import GDAL_CACHE_MB

    if environment is None:
        monkeypatch.delenv("GDAL_CACHEMAX", raising=False)
    else:
        monkeypatch.setenv("GDAL_CACHEMAX", environment)
    before = get_gdal_config("GDAL_CACHEMAX")
    seen = []

    class Recording(SaturationPredictor):
        def forward(self, batch):
            seen.append(get_gdal_config("GDAL_CACHEMAX"))
            return super().forward(batch)

    segment_image(
        data_dir / "geotiff/cogeo.tif", out=tmp_path / "seg.tif", predictor=Recording(), tile=128, overlap=0,
        level=2, workers=0, progress=False,
    )  # fmt: skip
    assert seen and set(seen) == {GDAL_CACHE_MB if environment is None else before}
    assert get_gdal_config("GDAL_CACHEMAX") == before


@pytest.mark.slow
def test_compiled_model_gives_the_eager_results(geotiff, tmp_path):
    path, _, _ = geotiff
    kw = dict(tile=64, overlap=16, batch_size=3, workers=0, probability_output=True, skip_empty=False, progress=False)
    eager = segment_image(path, out=tmp_path / "eager.tif", predictor=ConvPredictor(), **kw)
    compiled = segment_image(path, out=tmp_path / "compiled.tif", predictor=ConvPredictor(), compile=True, **kw)
    assert compiled["settings"]["compile"] and compiled["request"]["compile"] and "compile" not in eager["request"]
    with rasterio.open(eager["probabilities"]) as a, rasterio.open(compiled["probabilities"]) as b:
        assert np.abs(a.read() - b.read()).max() <= 1e-5
    with rasterio.open(tmp_path / "eager.tif") as a, rasterio.open(tmp_path / "compiled.tif") as b:
        assert (a.read() == b.read()).mean() >= 0.9999


def test_probabilities_are_written_in_strips_as_wide_as_the_assembly_budget_allows():
    from densevision.apis.segment import ASSEMBLY_BYTES, ASSEMBLY_MIN_TILES, OUTPUT_TILE, assembly_strip

    for k, itemsize in [(1, 1), (2, 4), (5, 4), (5, 1), (19, 4), (150, 4), (150, 1)]:
        strip = assembly_strip(k, itemsize)
        row = OUTPUT_TILE * k * itemsize  # bytes of a row of output tiles per pixel of width
        assert strip % OUTPUT_TILE == 0 and strip >= ASSEMBLY_MIN_TILES * OUTPUT_TILE
        assert strip == ASSEMBLY_MIN_TILES * OUTPUT_TILE or strip * row <= ASSEMBLY_BYTES < (strip + OUTPUT_TILE) * row
    # 16384 wide with 5 float32 classes: one strip, so the probabilities follow the committed rows.
    assert assembly_strip(5, 4) >= 16384 and assembly_strip(150, 4) == 8192
