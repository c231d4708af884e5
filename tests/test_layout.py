"""The layout shows the flow: packages import one way (see ../shared/DESIGN.md and the README's development section),
no private module is imported from another package, the library's run path never imports the generated-data package,
and the pure layers import no torch or OpenMMLab. Read from the source with ast, so it needs nothing installed."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "densevision"

# What each package of densevision may import (besides itself). Lower layers first; a new edge is a design decision:
# make it here, on purpose.
ALLOWED: dict[str, set[str]] = {
    "errors": set(),
    "configs": {"errors"},
    "samples": {"errors"},
    "compat": {"errors"},
    "io": {"errors"},
    "tiling": {"errors"},
    "engine": {"errors", "io", "tiling"},
    "stitch": {"errors", "tiling"},
    "models": {"errors", "compat"},
    "predictors": {"errors", "compat", "configs", "models"},
    "training": {"errors", "compat", "configs", "engine"},
    "synthetic": {"errors", "io", "predictors", "samples"},
    "apis": {"errors", "compat", "io", "tiling", "engine", "stitch", "predictors", "training"},
    "demo": {"errors", "compat", "configs", "io", "apis", "synthetic", "samples"},
    "cli": {"errors", "io", "apis", "training", "demo"},
    "__init__": {"errors", "io", "apis"},
    "__main__": {"cli"},
}
# Pure layers: geometry and stitching arithmetic on arrays, readers and writers. No deep-learning stack.
NO_TORCH = {"tiling", "io"}


def _imports(path: Path) -> list[tuple[str, int]]:
    """Every absolute module name ``path`` imports (at any depth: lazy imports count too), with its line."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(a.name, node.lineno) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.append((node.module, node.lineno))
    return found


def _package_of(path: Path) -> str:
    rel = path.relative_to(PACKAGE)
    return rel.parts[0] if len(rel.parts) > 1 else rel.stem


MODULES = sorted(PACKAGE.rglob("*.py"))


def test_every_package_is_in_the_table():
    assert {_package_of(p) for p in MODULES} <= ALLOWED.keys()


def violations(own: str, imports: list[tuple[str, int]]) -> list[str]:
    """What in ``imports`` (of a module of package ``own``) breaks the layout."""
    found = []
    for name, line in imports:
        parts = name.split(".")
        if own in NO_TORCH and parts[0] in {"torch", "torchvision", "mmdet", "mmseg", "mmengine", "mmcv"}:
            found.append(f"line {line}: {own} imports {name}")
        if parts[0] != "densevision" or len(parts) == 1 or parts[1] == own:
            continue
        if parts[1] not in ALLOWED[own]:
            found.append(f"line {line}: {own} imports {name}; it may import only {sorted(ALLOWED[own])}")
        elif any(p.startswith("_") for p in parts[2:]):
            found.append(f"line {line}: {own} imports {name}, a private module of another package")
    return found


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_imports_go_one_way_and_never_into_another_packages_private_modules(path):
    assert violations(_package_of(path), _imports(path)) == []


def test_the_check_catches_a_wrong_way_a_private_and_a_heavy_import():
    imports = [("densevision.engine.runner", 1), ("densevision.io.writers._atomic", 2), ("torch", 3), ("numpy", 4)]
    assert [v.split(":")[0] for v in violations("tiling", imports)] == ["line 1", "line 2", "line 3"]
    assert violations("apis", imports[:2]) == [
        "line 2: apis imports densevision.io.writers._atomic, a private module of another package"
    ]
