"""Generated data for tests, the demo and benchmarks: big images and small datasets with objects planted at known
places, and detectors whose right answer is known. The library's run path (io, tiling, engine, stitch, predictors,
apis) never imports this package.

- :mod:`~densevision.synthetic.planted`: :class:`Planted`, the one planted-object type, and where objects go.
- :mod:`~densevision.synthetic.mosaic`: crops of a small real image, the material of the big images.
- :mod:`~densevision.synthetic.slides`: :func:`make_slide`, pyramidal JPEG TIFF slides OpenSlide opens.
- :mod:`~densevision.synthetic.rasters`: :func:`make_geotiff`, tiled GeoTIFFs with a CRS, transform and nodata.
- :mod:`~densevision.synthetic.datasets`: :func:`make_coco_dataset`, :func:`make_ade_dataset`, tiny datasets in
  real formats.
- :mod:`~densevision.synthetic.crop_datasets`: training datasets (COCO / ADE) cut from a big generated image.
- :mod:`~densevision.synthetic.scenes`: the demo's images (what is planted where, built from the real samples).
- :mod:`~densevision.synthetic.detectors`: :class:`ColourDetector`, :class:`ColourSam`, known-answer models.

Import from the modules (``from densevision.synthetic.slides import make_slide``): this file imports none of them,
so a dataset generator needs neither OpenSlide nor GDAL and a slide generator needs no torch.
"""
