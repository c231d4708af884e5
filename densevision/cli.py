"""The ``densevision`` command. Thin: parse, call the library, print. Bad input or usage: one line, exit 2."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from typing import Any, NoReturn

from densevision import __version__
from densevision.errors import DenseVisionError

EXIT_USAGE = 2


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        # argparse prints the whole usage block; we keep the one-line convention.
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _format_info(d: dict[str, Any]) -> str:
    lines = [
        f"path:       {d['path']}",
        f"backend:    {d['backend']} ({d['format']})",
        f"size:       {d['size'][0]} x {d['size'][1]} px (W x H)",
        f"levels:     {d['level_count']}",
    ]
    for i, lv in enumerate(d["levels"]):
        w, h = lv["dimensions"]
        lines.append(f"  level {i}:  {w} x {h} px, downsample {lv['downsample']:.6g}")
    if d["mpp"]:
        lines.append(f"mpp:        {d['mpp'][0]:.6g} x {d['mpp'][1]:.6g} um/px")
    elif d["backend"] != "rasterio":
        lines.append("mpp:        unknown")
    if d["backend"] == "rasterio":
        lines.append(f"crs:        {d['crs'] or 'none (pixel coordinates)'}")
        a, b, c, dd, e, f = d["transform"]
        lines.append(
            f"transform:  x = {c:.10g} + {a:.10g}*col + {b:.10g}*row; y = {f:.10g} + {dd:.10g}*col + {e:.10g}*row"
        )
        lines.append(f"nodata:     {d['nodata']}")
    names = f" ({', '.join(d['band_names'])})" if d["band_names"] else ""
    lines.append(f"bands:      {d['band_count']}{names}")
    lines.append(f"dtype:      {d['dtype']}")
    lines += [f"note:       {n}" for n in d["notes"]]
    return "\n".join(lines)


def cmd_info(args: argparse.Namespace) -> int:
    from densevision.io import open_image

    facts = []
    for path in args.paths:
        with open_image(path) as src:
            facts.append(src.describe())
    if args.json:
        print(json.dumps(facts if len(facts) > 1 else facts[0], indent=2))
    else:
        print("\n\n".join(_format_info(d) for d in facts))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="densevision", description=__doc__)
    parser.add_argument("--version", action="version", version=f"densevision {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    info = sub.add_parser("info", help="print size, levels, resolution / CRS, bands and dtype of images")
    info.add_argument("paths", nargs="+", metavar="PATH", help="slide, raster or image files")
    info.add_argument("--json", action="store_true", help="print JSON instead of text")
    info.set_defaults(func=cmd_info)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except DenseVisionError as e:
        print(f"densevision: error: {e}", file=sys.stderr)
        return EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main())
