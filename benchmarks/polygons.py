"""Polygons of segmented regions (issue 17): is the tracer's memory flat in the image size, and what does
``--polygons`` add to ``segment``?

1. Memory: the class map of an N x N slide (default 4096 and 65536) is fed block by block (448-pixel blocks, the
   block rows of a 512 / 64 grid) to the same path ``segment`` uses (``densevision.apis.segment._Polygons``: the
   block tracer, measurements, a QuPath GeoJSON streamed to disk) in a fresh child process each; no array of the
   image exists: blocks are cut from a periodic 2000 x 2000 texture of nuclei-sized discs (class 1, a few pixels to
   20 wide) and tissue regions with holes (class 2, up to about 700 pixels, across many blocks and block corners),
   on background (class 0, left out). Reported: the child's peak RSS (VmHWM), regions, regions held open at most,
   seconds, output bytes.
2. Time added to segment: ``segment_image`` on a generated N x N GeoTIFF (default 4096; the texture as pixels, a
   per-pixel model that predicts it exactly, so the regions are the texture's) without polygons, with
   ``polygons=*.gpkg``, and with the second pass over the committed blocks forced (``assembly_strip`` set below the
   width, as for images wider than 8192), each in a fresh child.
3. With ``--qgis`` and QGIS importable by ``/usr/bin/python3`` (``apt-get install python3-qgis``): the outputs of
   part 2 (GeoPackage, FlatGeobuf, WGS84 GeoJSON) and a slide's QuPath GeoJSON opened headless
   (``QT_QPA_PLATFORM=offscreen``); CRS, feature count and extent checked against what was written.

    nice -n 10 python benchmarks/polygons.py                       # 4096^2 and 65536^2; segment on 4096^2
    python benchmarks/polygons.py --sizes 2048 8192 --segment-size 1024 --qgis
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
from _common import host, peak_rss_mb

REPO = Path(__file__).resolve().parents[1]
PERIOD = 2000
BLOCK = 448


def texture(seed: int = 0) -> np.ndarray:
    """``PERIOD x PERIOD`` uint8 classes: discs of class 1 (nuclei) and blobs of class 2 (tissue, with holes)."""
    rng = np.random.default_rng(seed)
    t = np.zeros((PERIOD, PERIOD), np.uint8)
    yy, xx = np.ogrid[:PERIOD, :PERIOD]
    for _ in range(5):  # tissue regions, kept off the texture's border so that tiling it joins nothing
        r = rng.uniform(60, 300)
        cy, cx = rng.uniform(r + 5, PERIOD - r - 5, 2)
        disc = (yy - cy) ** 2 + (xx - cx) ** 2 < r**2
        t[disc] = 2
        t[(yy - cy) ** 2 + (xx - cx) ** 2 < (r / 3) ** 2] = 0  # a hole
    for _ in range(1200):  # nuclei, some inside tissue, some on glass
        r = rng.uniform(1.5, 10)
        cy, cx = rng.uniform(r + 1, PERIOD - r - 1, 2)
        y0, x0 = int(cy - r), int(cx - r)
        sub = (yy[y0 : y0 + 2 * int(r) + 2] - cy) ** 2 + (xx[:, x0 : x0 + 2 * int(r) + 2] - cx) ** 2 < r**2
        t[y0 : y0 + sub.shape[0], x0 : x0 + sub.shape[1]][sub] = 1
    return t


def blocks(size: int, t: np.ndarray):
    """``(y0, x0, block)`` of the ``size x size`` tiling of ``t`` in ``BLOCK`` blocks, row-major."""
    edges = [*range(0, size, BLOCK), size]
    for y0, y1 in itertools.pairwise(edges):
        rows = np.arange(y0, y1) % PERIOD
        band = t[rows]
        for x0, x1 in itertools.pairwise(edges):
            yield y0, x0, np.ascontiguousarray(np.take(band, np.arange(x0, x1) % PERIOD, axis=1))


def child_trace(size: int, out: Path) -> dict[str, Any]:
    from densevision.apis.segment import _Polygons
    from densevision.apis.settings import Segmentation

    t = texture()
    src = SimpleNamespace(mpp=(0.25, 0.25), transform=None, crs=None, backend="openslide")
    names = ["background", "nucleus", "tissue"]
    palette = ((0, 0, 0), (40, 40, 200), (200, 100, 150))
    before = peak_rss_mb()
    started = time.perf_counter()
    polygons = _Polygons(Segmentation(polygons=out), out, src, 1.0, size, size, names, palette)  # type: ignore[arg-type]
    with polygons.writer:
        for y0, x0, block in blocks(size, t):
            polygons.add(y0, x0, block)
        polygons.finish()
    seconds = time.perf_counter() - started
    s = polygons.summary()
    return {
        "size": size, "peak_rss_mb": peak_rss_mb(), "rss_before_mb": before, "seconds": seconds,
        "regions": s["regions"], "max_open": s["max_open_regions"], "bytes": out.stat().st_size,
    }  # fmt: skip


SEGMENT = textwrap.dedent(
    """
    import json, sys, torch
    import densevision.apis.segment as seg
    from densevision import segment_image

    class Pattern(torch.nn.Module):
        num_classes, class_names = 3, ("background", "nucleus", "tissue")
        palette, size_divisor, device = ((0, 0, 0), (40, 40, 200), (200, 100, 150)), 32, torch.device("cpu")

        @torch.no_grad()
        def forward(self, batch):
            c = torch.clamp(batch[:, 0] // 80, 0, 2).long()
            return torch.nn.functional.one_hot(c, 3).permute(0, 3, 1, 2).float()

    image, out, polygons, strip = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
    if strip:
        seg.assembly_strip = lambda k, itemsize: strip
    s = segment_image(image, out=out, predictor=Pattern(), polygons=polygons if polygons != "-" else None,
                      tile=512, overlap=64, batch_size=4, workers=1, progress=False, device="cpu")
    print(json.dumps({"wall": s["timings"]["seconds_wall"], "polygons": s["timings"].get("seconds_polygons"),
                      "reading": s["timings"].get("seconds_polygons_reading"),
                      "regions": s.get("regions", {}).get("regions")}))
    """
)


def make_scene(path: Path, size: int) -> None:
    import rasterio
    from affine import Affine

    t = texture()
    profile = dict(driver="GTiff", width=size, height=size, count=3, dtype="uint8", crs="EPSG:32631", tiled=True,
                   blockxsize=512, blockysize=512, compress="deflate")  # fmt: skip
    transform = Affine.translation(399960, 5000040) @ Affine.scale(0.5, -0.5)
    with rasterio.open(path, "w", transform=transform, **profile) as dst:
        for y0 in range(0, size, 512):
            h = min(512, size - y0)
            rows = t[np.arange(y0, y0 + h) % PERIOD]
            band = np.take(rows, np.arange(size) % PERIOD, axis=1) * 80 + 40
            dst.write(np.repeat(band[None].astype(np.uint8), 3, axis=0), window=((y0, y0 + h), (0, size)))


def run_child(args: list[str]) -> dict[str, Any]:
    env = dict(os.environ, PYTHONPATH=str(REPO))
    proc = subprocess.run([sys.executable, *args], capture_output=True, text=True, env=env, check=False)
    if proc.returncode != 0:
        raise SystemExit(proc.stderr[-3000:])
    return json.loads(proc.stdout.strip().splitlines()[-1])


QGIS = textwrap.dedent(
    """
    import json, os, sys
    from qgis.core import QgsApplication, QgsVectorLayer
    app = QgsApplication([], False)
    app.initQgis()
    found = {}
    for path in sys.argv[1:]:
        layer = QgsVectorLayer(path, "regions", "ogr")
        e = layer.extent()
        found[path] = {"valid": layer.isValid(), "crs": layer.crs().authid(), "count": layer.featureCount(),
                       "extent": [e.xMinimum(), e.yMinimum(), e.xMaximum(), e.yMaximum()]}
    print(json.dumps(found), flush=True)
    os._exit(0)  # QgsApplication.exitQgis() crashes headless QGIS 3.22 at exit
    """
)


def qgis_check(paths: list[Path]) -> dict[str, Any] | str:
    probe = subprocess.run(["/usr/bin/python3", "-c", "import qgis.core"], capture_output=True, text=True)
    if probe.returncode != 0:
        return "QGIS not importable by /usr/bin/python3 (apt-get install python3-qgis); skipped"
    env = dict(os.environ, QT_QPA_PLATFORM="offscreen")
    proc = subprocess.run(["/usr/bin/python3", "-c", QGIS, *map(str, paths)], capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        return f"QGIS failed: {proc.stderr[-500:]}"
    return json.loads(proc.stdout.strip().splitlines()[-1])


def written(path: Path) -> dict[str, Any]:
    """CRS, count and extent of what densevision wrote, read by pyogrio (GDAL)."""
    import pyogrio

    info = pyogrio.read_info(path)
    _, _, wkb, _ = pyogrio.raw.read(path)
    import shapely

    bounds = shapely.total_bounds(shapely.from_wkb(wkb))
    return {"crs": info["crs"], "count": len(wkb), "extent": [float(v) for v in bounds]}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--sizes", type=int, nargs="+", default=[4096, 65536], help="slide sizes for part 1")
    p.add_argument("--segment-size", type=int, default=4096, help="GeoTIFF size for part 2 (0: skip)")
    p.add_argument("--qgis", action="store_true", help="part 3: open the outputs in QGIS (headless)")
    p.add_argument("--workdir", type=Path, default=None, help="where outputs go (default: a temporary folder)")
    p.add_argument("--child", nargs=2, metavar=("SIZE", "OUT"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        print(json.dumps(child_trace(int(args.child[0]), Path(args.child[1]))))
        return 0
    work = args.workdir or Path(tempfile.mkdtemp(prefix="dv-polygons-"))
    work.mkdir(parents=True, exist_ok=True)
    print(f"host: {host()}\n")
    rows = []
    for size in args.sizes:
        r = run_child([__file__, "--child", str(size), str(work / f"slide-{size}.geojson")])
        rows.append(r)
        print(json.dumps(r), flush=True)
    if rows:
        base = rows[0]["peak_rss_mb"]
        print(
            "\n| slide | regions | held open at most | seconds | Mpx/s | GeoJSON | peak RSS | vs first | "
            "peak RSS - RSS before tracing |"
        )
        print("|---|---|---|---|---|---|---|---|---|")
        for r in rows:
            print(f"| {r['size']}² | {r['regions']:,} | {r['max_open']:,} | {r['seconds']:.1f} | "
                  f"{r['size'] ** 2 / 1e6 / r['seconds']:.1f} | {r['bytes'] / 2**20:,.0f} MiB | "
                  f"{r['peak_rss_mb']:.0f} MiB | {r['peak_rss_mb'] / base:.2f}x | "
                  f"{r['peak_rss_mb'] - r['rss_before_mb']:.0f} MiB |")  # fmt: skip
    outputs: list[Path] = []
    if args.segment_size:
        n = args.segment_size
        scene = work / f"scene-{n}.tif"
        make_scene(scene, n)
        script = work / "segment.py"
        script.write_text(SEGMENT)
        runs = {}
        for name, poly, strip in (("without", "-", 0), ("gpkg", str(work / "scene.gpkg"), 0),
                                  ("gpkg, second pass", str(work / "scene2.gpkg"), 512),
                                  ("geojson", str(work / "scene.geojson"), 0),
                                  *((("fgb", str(work / "scene.fgb"), 0),) if args.qgis else ())):  # fmt: skip
            runs[name] = run_child([str(script), str(scene), str(work / f"seg-{len(runs)}.tif"), poly, str(strip)])
            print(name, json.dumps(runs[name]), flush=True)
        plain = runs["without"]["wall"]
        print(f"\n| segment {n}² GeoTIFF | wall s | added s | polygon step s | second pass reading s | regions |")
        print("|---|---|---|---|---|---|")
        for name, r in runs.items():
            print(f"| {name} | {r['wall']:.1f} | {r['wall'] - plain:+.1f} | {r['polygons'] or 0:.1f} | "
                  f"{r['reading'] or 0:.1f} | {r['regions'] or '-'} |")  # fmt: skip
        outputs += [work / "scene.gpkg", work / "scene.fgb", work / "scene.geojson"]
    if args.qgis:
        slide = work / f"slide-{args.sizes[0]}.geojson" if args.sizes else None
        paths = [p for p in [*outputs, slide] if p is not None and p.exists()]
        found = qgis_check(paths)
        print("\nQGIS:", json.dumps(found, indent=1))
        if isinstance(found, dict):
            for path in paths:
                if path.suffix in (".gpkg", ".fgb"):
                    print(path.name, "written:", json.dumps(written(path)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
