# Types of densevision.configs for mypy, which cannot follow the package-dir mapping of that package onto the
# repository's configs/ folder (configs/__init__.py, the code). tests/test_packaging.py keeps the two in step.
import os
from pathlib import Path

__all__ = ["config_dir", "config_names", "find_config"]

def config_dir() -> Path: ...
def config_names() -> list[str]: ...
def find_config(name_or_path: str | os.PathLike[str]) -> Path: ...
