"""Typed errors. Every message says what was wrong and what to do; the CLI prints it on one line and exits 2.

Each error also derives from the matching builtin where one exists, so ``except FileNotFoundError`` still works.
"""

from __future__ import annotations


class DenseVisionError(Exception):
    """Base class of every error densevision raises for bad input, usage or files."""


class ImageNotFoundError(DenseVisionError, FileNotFoundError):
    """The input path does not exist."""


class NotAFileError(DenseVisionError, IsADirectoryError):
    """The input path is a directory or another non-regular file."""


class EmptyFileError(DenseVisionError, ValueError):
    """The input file has zero bytes."""


class UnsupportedFormatError(DenseVisionError, ValueError):
    """No backend (OpenSlide, GDAL/rasterio, Pillow) recognises the file."""


class UnsupportedCompressionError(UnsupportedFormatError):
    """The file's container is recognised but its pixel compression is not supported by the backend."""


class CorruptImageError(DenseVisionError, ValueError):
    """The file is recognised but its pixel data cannot be decoded (truncated, bad compression, ...)."""


class ImageTooLargeError(DenseVisionError, ValueError):
    """A plain (non-tiled) image declares more pixels than may be decoded at once."""


class InvalidRegionError(DenseVisionError, ValueError):
    """A window, level or resolution does not exist in the image, or does not fit the output being written."""


class MissingResolutionError(DenseVisionError, ValueError):
    """The image has no trustworthy physical resolution and the run needs one."""


class CheckpointError(DenseVisionError, ValueError):
    """A checkpoint file is missing, unreadable, or does not fit the model."""


class UnsafeCheckpointError(CheckpointError):
    """A checkpoint would need objects outside the allow-list to unpickle (possibly code execution)."""


class ConfigError(DenseVisionError, ValueError):
    """A model or run configuration is invalid."""


class OutputError(DenseVisionError, OSError):
    """An output location cannot be written."""


class DiskFullError(OutputError):
    """The file system an output (or the work folder) is written to has no space left (or the quota is used up)."""


class DatasetError(DenseVisionError, ValueError):
    """A training / evaluation dataset is missing, malformed, or does not fit the config (checked before training)."""


class OtherRankError(DenseVisionError, RuntimeError):
    """Another rank of a torchrun failed at a step all ranks take together (its log has the reason)."""
