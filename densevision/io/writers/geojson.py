"""Streaming GeoJSON FeatureCollections: CRS coordinates for rasters, QuPath-style level-0 pixel features for slides.

Input geometries are always in level-0 pixel coordinates ``(col, row)`` with the pixel-corner convention: a box
``[x0, y0, x1, y1]`` covers pixel edges ``x0..x1`` and ``y0..y1``, and pixel ``(col, row)`` maps to the CRS
point ``transform * (col, row)`` (its top-left corner).
"""

from __future__ import annotations

import json
import os
import uuid
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, TextIO, TypeAlias

import numpy as np
import shapely
import shapely.geometry
from affine import Affine
from rasterio.crs import CRS
from rasterio.warp import transform as warp_transform

from densevision.errors import ConfigError
from densevision.io.atomic import AtomicWriter, disk_errors, jsonable

# A GeoJSON geometry mapping, a shapely geometry, or a box ``[x0, y0, x1, y1]``.
Geometry: TypeAlias = Mapping[str, Any] | shapely.Geometry | Sequence[float]

WGS84 = CRS.from_epsg(4326)
QUPATH_OBJECT_TYPES = ("annotation", "detection", "cell", "tile")


def to_shape(geometry: Geometry) -> shapely.Geometry:
    """A shapely geometry from a GeoJSON mapping, a shapely geometry, or a box ``[x0, y0, x1, y1]``."""
    if isinstance(geometry, shapely.Geometry):
        return geometry
    if isinstance(geometry, Mapping):
        return shapely.geometry.shape(geometry)
    x0, y0, x1, y1 = (float(v) for v in geometry)
    return shapely.box(x0, y0, x1, y1)


def crs_member(crs: CRS) -> dict[str, Any]:
    """The pre-RFC-7946 ``"crs"`` member naming ``crs``, as GDAL/OGR and QGIS read it."""
    epsg = crs.to_epsg()
    name = f"urn:ogc:def:crs:EPSG::{epsg}" if epsg else crs.to_wkt()
    return {"type": "name", "properties": {"name": name}}


class GeoJsonWriter(AtomicWriter):
    """Write a FeatureCollection one feature at a time; only ``batch_size`` pending features are held.

    Modes, chosen by the arguments:

    - slides (``transform=None``): coordinates stay level-0 pixels, no ``"crs"`` member; use :meth:`add_qupath`
      for features QuPath imports (``objectType``, ``classification``, ``measurements``, a UUID ``id``).
    - rasters (``transform`` and ``crs`` given): coordinates become ``transform * (col, row)``, then longitude /
      latitude in WGS84 (RFC 7946), or with ``native_crs=True`` stay in ``crs`` and the file gets a ``"crs"``
      member naming it. Polygons crossing the antimeridian are not cut.
    - ``transform`` without ``crs``: coordinates become ``transform * (col, row)``, no ``"crs"`` member.

    Polygon rings are written counter-clockwise (exterior) in the output coordinates, as RFC 7946 asks.
    ``precision`` rounds output coordinates to that many decimals (None: full precision).
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        transform: Affine | None = None,
        crs: Any = None,
        native_crs: bool = False,
        precision: int | None = None,
        batch_size: int = 1024,
    ) -> None:
        if crs is not None and transform is None:
            raise ConfigError("a CRS was given without the affine transform from pixels to it; pass transform= too")
        if native_crs and crs is None:
            raise ConfigError("native_crs=True needs crs=: the CRS to keep the coordinates in")
        if batch_size <= 0:
            raise ConfigError(f"batch_size must be positive, got {batch_size}")
        self.transform = transform
        self.crs = CRS.from_user_input(crs) if crs is not None else None
        reproject = self.crs is not None and not native_crs and self.crs != WGS84
        self._to_crs = WGS84 if reproject else None
        self.precision = precision
        self.batch_size = batch_size
        self.count = 0
        self._first = True  # no feature written yet
        self._pending: list[tuple[shapely.Geometry, Mapping[str, Any], int | str | None]] = []
        super().__init__(path)
        try:
            self._file: TextIO = open(self.partial, "w", encoding="utf-8", newline="\n")  # noqa: SIM115
        except OSError as e:
            raise self._open_error(e) from e
        head: dict[str, Any] = {"type": "FeatureCollection"}
        if native_crs and self.crs is not None:
            head["crs"] = crs_member(self.crs)
        # Everything but the closing "]}": features are streamed in between.
        self._file.write(json.dumps(head)[:-1] + ', "features": [')

    @property
    def pixel_coordinates(self) -> bool:
        """True when features are written in level-0 pixels (slides)."""
        return self.transform is None

    def add(
        self, geometry: Geometry, properties: Mapping[str, Any] | None = None, *, id: int | str | None = None
    ) -> None:
        """Queue one feature: ``geometry`` in level-0 pixels, ``properties`` JSON-ready (numpy scalars are fine).
        ``id`` defaults to the running feature count."""
        self._check_open()
        self._pending.append((to_shape(geometry), dict(properties or {}), self.count if id is None else id))
        self.count += 1
        if len(self._pending) >= self.batch_size:
            self._flush()

    def add_qupath(
        self,
        geometry: Geometry,
        *,
        object_type: str = "detection",
        classification: str | None = None,
        color: Sequence[int] | None = None,
        measurements: Mapping[str, float] | None = None,
        name: str | None = None,
        id: int | str | None = None,
    ) -> None:
        """Queue a QuPath object in level-0 pixels (slides only).

        ``id``: QuPath wants a UUID; an int (e.g. a global instance id) or other string becomes a UUID derived
        from it and the file name, so reruns give the same ids. ``color``: ``(r, g, b)`` of the class.
        """
        if not self.pixel_coordinates:
            raise ConfigError("QuPath features are in slide pixels: create the GeoJsonWriter without transform/crs")
        if object_type not in QUPATH_OBJECT_TYPES:
            raise ConfigError(f"object_type must be one of {', '.join(QUPATH_OBJECT_TYPES)}, got {object_type!r}")
        props: dict[str, Any] = {"objectType": object_type}
        if name is not None:
            props["name"] = name
        if classification is not None:
            props["classification"] = {"name": classification}
            if color is not None:
                props["classification"]["color"] = [int(c) for c in color[:3]]
        props["measurements"] = dict(measurements or {})
        self.add(geometry, props, id=self._uuid(self.count if id is None else id))

    def _uuid(self, key: int | str) -> str:
        if isinstance(key, str):
            try:
                return str(uuid.UUID(key))
            except ValueError:
                pass
        return str(uuid.uuid5(uuid.NAMESPACE_URL, f"densevision:{self.path.name}:{key}"))

    def _map_coordinates(self, xy: np.ndarray) -> np.ndarray:
        """``N x 2`` level-0 pixel ``(col, row)`` -> ``N x 2`` output coordinates."""
        if self.transform is not None:
            a, b, c, d, e, f = self.transform[:6]
            xy = np.stack([a * xy[:, 0] + b * xy[:, 1] + c, d * xy[:, 0] + e * xy[:, 1] + f], axis=1)
        if self._to_crs is not None and len(xy):
            xs, ys = warp_transform(self.crs, self._to_crs, xy[:, 0], xy[:, 1])
            xy = np.stack([np.asarray(xs), np.asarray(ys)], axis=1)
        if self.precision is not None:
            xy = np.round(xy, self.precision)
        return xy

    def _flush(self) -> None:
        if not self._pending:
            return
        geoms = shapely.transform(np.array([g for g, _, _ in self._pending], dtype=object), self._map_coordinates)
        geoms = shapely.orient_polygons(geoms, exterior_cw=False)
        for geom, (_, props, fid) in zip(geoms, self._pending, strict=True):
            feature = {"type": "Feature", "id": fid, "geometry": shapely.geometry.mapping(geom), "properties": props}
            try:
                text = json.dumps(feature, default=jsonable, allow_nan=False)
            except ValueError as e:
                raise ValueError(
                    f"{self.path}: feature {fid} has NaN or infinite values ({e}); drop or fix them"
                ) from e
            with disk_errors(self.partial):
                self._file.write(("\n" if self._first else ",\n") + text)
            self._first = False
        self._pending.clear()

    def _finish(self) -> None:
        self._flush()
        self._file.write("\n]}\n")
        self._file.close()

    def _discard(self) -> None:
        self._pending.clear()
        self._file.close()


def write_geojson(
    path: str | os.PathLike[str],
    features: Iterable[tuple[Geometry, Mapping[str, Any] | None]],
    *,
    transform: Affine | None = None,
    crs: Any = None,
    native_crs: bool = False,
    precision: int | None = None,
) -> int:
    """Write ``(geometry in level-0 pixels, properties)`` pairs as one FeatureCollection (see
    :class:`GeoJsonWriter` for the modes); ``features`` may be a generator. Returns the number of features."""
    with GeoJsonWriter(path, transform=transform, crs=crs, native_crs=native_crs, precision=precision) as w:
        for geometry, properties in features:
            w.add(geometry, properties)
    return w.count
