"""Vector outputs for GIS: GeoPackage and FlatGeobuf through pyogrio (GDAL/OGR, bundled with its wheel).

Formats by suffix (:func:`vector_format`): ``.geojson`` / ``.json`` are written by
:class:`~densevision.io.writers.GeoJsonWriter` (RFC 7946, or QuPath features for slides); ``.gpkg`` and ``.fgb`` by
:class:`OgrWriter` here. Geometries come in level-0 pixels ``(col, row)`` (pixel-corner convention, as every
writer takes them) and are mapped by the affine ``transform`` into the raster's own CRS, which the file records
(GeoPackage and FlatGeobuf carry any CRS, so they are not reprojected); without a transform (slides) they stay in
pixels and the layer has no CRS. Every feature is a MultiPolygon (a layer has one geometry type).

Streaming: features are queued and written ``batch_size`` at a time. GeoPackage: each batch is appended in one
call (one SQLite transaction). FlatGeobuf cannot be appended to without rewriting the file (its index is written at
the end), so its features are staged in a GeoPackage beside the output and converted once, as an Arrow stream, when
the writer closes. Either way the output is built under ``<stem>.partial<suffix>`` (GDAL picks and checks the
format by the suffix) and renamed onto the final path only when complete.
"""

from __future__ import annotations

import contextlib
import os
import warnings
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import shapely
from affine import Affine
from rasterio.crs import CRS

from densevision.errors import ConfigError, OutputError
from densevision.io.atomic import AtomicWriter, remove_quietly
from densevision.io.writers.geojson import Geometry, to_shape

VECTOR_FORMATS = {".geojson": "GeoJSON", ".json": "GeoJSON", ".gpkg": "GPKG", ".fgb": "FlatGeobuf"}
FIELD_TYPES = (str, int, float, bool)


def vector_format(path: str | os.PathLike[str]) -> str:
    """The format written for ``path``, by its suffix: ``GeoJSON``, ``GPKG`` or ``FlatGeobuf``."""
    suffix = Path(path).suffix.lower()
    if suffix not in VECTOR_FORMATS:
        raise ConfigError(
            f"{path}: polygons are written as GeoJSON (.geojson), GeoPackage (.gpkg) or FlatGeobuf (.fgb); name the "
            "file with one of these suffixes"
        )
    return VECTOR_FORMATS[suffix]


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Without pyogrio's warning that a layer has no CRS (slides' pixel layers have none, on purpose)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="'crs' was not provided", category=UserWarning)
        yield


def _crs_text(crs: Any) -> str:
    crs = CRS.from_user_input(crs)
    epsg = crs.to_epsg()
    return f"EPSG:{epsg}" if epsg else crs.to_wkt()


class OgrWriter(AtomicWriter):
    """Write a GeoPackage or FlatGeobuf layer of MultiPolygons feature by feature; see the module doc.

    Args:
        path: ``*.gpkg`` or ``*.fgb``.
        fields: the attribute columns, name -> Python type (``str``, ``int``, ``float``, ``bool``); a feature's
            missing value is written as null.
        transform: level-0 pixel -> CRS affine (rasters); None keeps pixels (slides).
        crs: the CRS of the transform's output (recorded in the file).
        layer: the layer name.
        batch_size: features per write.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        fields: Mapping[str, type],
        *,
        transform: Affine | None = None,
        crs: Any = None,
        layer: str = "regions",
        batch_size: int = 4096,
    ) -> None:
        self.driver = vector_format(path)
        if self.driver == "GeoJSON":
            raise ConfigError(f"{path}: write GeoJSON with GeoJsonWriter; OgrWriter writes .gpkg and .fgb")
        if crs is not None and transform is None:
            raise ConfigError("a CRS was given without the affine transform from pixels to it; pass transform= too")
        bad = {k: t for k, t in fields.items() if t not in FIELD_TYPES}
        if bad:
            raise ConfigError(f"field types must be str, int, float or bool; got {bad}")
        if batch_size <= 0:
            raise ConfigError(f"batch_size must be positive, got {batch_size}")
        import pyogrio  # noqa: F401  (fail here, before any work, if it is missing)

        self.fields, self.transform, self.layer, self.batch_size = dict(fields), transform, layer, batch_size
        self.crs = _crs_text(crs) if crs is not None else None
        self.count = 0
        self._pending: list[tuple[shapely.Geometry, Mapping[str, Any]]] = []
        self._written = 0
        super().__init__(path)
        self.partial = self.path.with_name(f"{self.path.stem}.partial{self.path.suffix}")
        # FlatGeobuf: staged in a GeoPackage, converted on close.
        self._stage = self.partial if self.driver == "GPKG" else self.path.with_name(f"{self.path.stem}.partial.gpkg")
        for p in {self.partial, self._stage}:
            self._remove(p)

    @staticmethod
    def _remove(path: Path) -> None:
        for p in (path, *(path.with_name(path.name + s) for s in ("-journal", "-wal", "-shm"))):
            remove_quietly(p)

    def add(self, geometry: Geometry, properties: Mapping[str, Any] | None = None) -> None:
        """Queue one feature: ``geometry`` (polygonal) in level-0 pixels, ``properties`` by field name."""
        self._check_open()
        self._pending.append((to_shape(geometry), dict(properties or {})))
        self.count += 1
        if len(self._pending) >= self.batch_size:
            self._flush()

    def _column(self, name: str, kind: type) -> tuple[np.ndarray, np.ndarray | None]:
        values = [p.get(name) for _, p in self._pending]
        missing = np.array([v is None for v in values])
        dtype = {str: object, int: np.int64, float: np.float64, bool: np.bool_}[kind]
        fill = {str: "", int: 0, float: np.nan, bool: False}[kind]
        column: np.ndarray = np.array([fill if v is None else kind(v) for v in values], dtype=dtype)
        return column, (missing if missing.any() else None)

    def _flush(self) -> None:
        if not self._pending and self._written:
            return
        from pyogrio.raw import write

        geoms = np.array([g for g, _ in self._pending], dtype=object)
        if self.transform is not None and len(geoms):
            a, b, c, d, e, f = self.transform[:6]
            geoms = shapely.transform(
                geoms, lambda xy: np.stack([a * xy[:, 0] + b * xy[:, 1] + c, d * xy[:, 0] + e * xy[:, 1] + f], axis=1)
            )
        multi = [g if isinstance(g, shapely.MultiPolygon) else shapely.MultiPolygon([g]) for g in geoms]
        wkb = np.array([shapely.to_wkb(g) for g in multi], dtype=object)
        columns = [self._column(name, kind) for name, kind in self.fields.items()]
        masks = [m for _, m in columns]
        try:
            with _quiet():
                write(
                    str(self._stage), wkb, [c for c, _ in columns], list(self.fields),
                    field_mask=masks if any(m is not None for m in masks) else None, layer=self.layer, driver="GPKG",
                    geometry_type="MultiPolygon", crs=self.crs, append=self._written > 0,
                    # GeoPackage 1.2: read without warnings by older GDALs too (QGIS 3.22 on Debian's GDAL 3.6).
                    dataset_options=None if self._written else {"VERSION": "1.2"},
                )  # fmt: skip
        except Exception as e:
            raise OutputError(f"{self.path}: writing features failed ({e}); check the path and free space") from e
        self._written += len(self._pending)
        self._pending.clear()

    def _finish(self) -> None:
        self._flush()
        if self.driver == "FlatGeobuf":
            from pyogrio.raw import open_arrow, write_arrow

            with _quiet(), open_arrow(str(self._stage), layer=self.layer, use_pyarrow=False) as (meta, stream):
                write_arrow(
                    stream, str(self.partial), layer=self.layer, driver="FlatGeobuf",
                    geometry_name=meta["geometry_name"] or "geometry", geometry_type="MultiPolygon", crs=meta["crs"],
                )  # fmt: skip
            self._remove(self._stage)

    def _discard(self) -> None:
        self._pending.clear()
        self._remove(self._stage)
