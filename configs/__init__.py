"""The shipped mmengine configs, importable as the package ``densevision.configs`` (pyproject maps this folder to
it and ships its ``*/*.py`` as package data), so a config can be named as well as given by path:

>>> find_config("dino_swin-t_fpn_coco")  # or "detection/dino_swin-t_fpn_coco", with or without ".py"
PosixPath('.../densevision/configs/detection/dino_swin-t_fpn_coco.py')

The files keep their relative ``_base_`` references (``../_base_/coco_detection.py``), which resolve the same in the
repository and in an installed wheel because the folder travels whole. This file holds code only: the configs are
the ``.py`` files in the sub-folders (``_base_``, ``demo``, ``detection``, ``instances``, ``segmentation``).
"""

from __future__ import annotations

import difflib
import os
from importlib.resources import files
from pathlib import Path
from typing import Any

from densevision.errors import ConfigError

__all__ = ["config_dir", "config_names", "find_config", "load_config"]


def config_dir() -> Path:
    """The folder holding the shipped configs (the repository's ``configs/`` in an editable install)."""
    root = files(__name__)
    if not isinstance(root, Path):  # a zipped install: mmengine needs real files to follow ``_base_``
        raise ConfigError(f"densevision's configs are not on the file system ({root}); install densevision unzipped")
    return root


def config_names() -> list[str]:
    """Every shipped config as ``folder/name`` without ``.py``, sorted (bases under ``_base_/`` included)."""
    root = config_dir()
    return sorted(p.relative_to(root).with_suffix("").as_posix() for p in root.glob("*/*.py"))


def find_config(name_or_path: str | os.PathLike[str]) -> Path:
    """The config file for a path or for a shipped config's name.

    Accepted forms, tried in this order: an existing file (returned resolved); ``folder/name`` or ``name`` of a
    shipped config, each with or without ``.py`` (``detection/dino_swin-t_fpn_coco``, ``dino_swin-t_fpn_coco.py``).
    A bare name must be unique across the folders.

    Raises:
        ConfigError: the path is a directory, or nothing matches (the message names close matches), or a bare name
            is in more than one folder.
    """
    given = os.fspath(name_or_path)
    path = Path(given).expanduser()
    if path.is_file():
        return path.resolve()
    if path.is_dir():
        raise ConfigError(f"config {given!r} is a directory; give a config file (.py) in it or a config name")
    name = given.replace(os.sep, "/").removesuffix(".py")
    names = config_names()
    if name in names:
        return config_dir() / f"{name}.py"
    by_stem = [n for n in names if n.rsplit("/", 1)[-1] == name and not n.startswith("_base_/")]
    if len(by_stem) == 1:
        return config_dir() / f"{by_stem[0]}.py"
    if by_stem:
        raise ConfigError(f"config name {given!r} is ambiguous: it is {' and '.join(by_stem)}; give the folder too")
    stems = {n.rsplit("/", 1)[-1]: n for n in names}
    close = [n for n in names if name and name in n]  # "upernet" names every UperNet config
    close += difflib.get_close_matches(name, names, n=3, cutoff=0.6)
    close += [stems[s] for s in difflib.get_close_matches(name, list(stems), n=3, cutoff=0.6)]
    close = list(dict.fromkeys(close))[:4]
    runnable = [n for n in names if not n.startswith("_base_/")]
    hint = f"did you mean {', '.join(close)}?" if close else f"shipped configs: {', '.join(runnable)}"
    raise ConfigError(f"config {given!r} is neither a file nor a shipped config name; {hint}")


def load_config(name_or_path: str | os.PathLike[str], cfg_options: dict[str, Any] | None = None) -> Any:
    """The mmengine ``Config`` of :func:`find_config`'s file, with ``cfg_options`` merged; any failure to read it
    (syntax errors, a bad ``_base_``, failed ``custom_imports``, options that do not fit) is a :class:`ConfigError`."""
    from mmengine.config import Config

    path = find_config(name_or_path)
    try:
        cfg = Config.fromfile(str(path))
    except Exception as e:
        raise ConfigError(f"{path}: cannot read the config ({type(e).__name__}: {e})") from e
    if cfg_options:
        try:
            cfg.merge_from_dict(dict(cfg_options))
        except (TypeError, KeyError) as e:
            raise ConfigError(f"{path}: --cfg-options do not fit the config ({e})") from e
    return cfg
