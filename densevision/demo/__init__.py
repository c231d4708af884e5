"""``densevision demo``: big images built from the real sample files with objects planted at known places,
small models trained on the same kind of images (cached), the slide segmented and the scene's objects detected
tile by tile, and everything scored against the planted truth. See :mod:`densevision.demo.run`.

Nothing heavy is imported here: the command line's parser reads :data:`SIZES`."""

SIZES = ("tiny", "small", "full")
__all__ = ["SIZES"]
