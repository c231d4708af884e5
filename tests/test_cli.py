"""The `densevision` command: real sample files in, facts out; bad input gives one line and exit code 2."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from conftest import REPO

from densevision import __version__
from densevision.cli import main


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "densevision.cli", *args], capture_output=True, text=True, timeout=120)


def test_version(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--version"])
    assert exc.value.code == 0
    assert capsys.readouterr().out.strip() == f"densevision {__version__}"


def test_info_slide(data_dir, capsys):
    assert main(["info", str(data_dir / "wsi/CMU-1-Small-Region.svs")]) == 0
    out = capsys.readouterr().out
    assert "openslide (aperio)" in out
    assert "2220 x 2967 px" in out
    assert "mpp:        0.499 x 0.499 um/px" in out
    assert "bands:      3" in out and "dtype:      uint8" in out


def test_info_geotiff_json(data_dir, capsys):
    assert main(["info", "--json", str(data_dir / "geotiff/RGB.byte.tif")]) == 0
    facts = json.loads(capsys.readouterr().out)
    assert facts["size"] == [791, 718]
    assert facts["crs"] == "EPSG:32618"
    assert facts["nodata"] == 0.0
    assert facts["band_count"] == 3 and facts["dtype"] == "uint8"
    assert facts["transform"][2] == pytest.approx(101985.0) and facts["transform"][5] == pytest.approx(2826915.0)


def test_info_non_integer_downsamples(data_dir, capsys):
    assert main(["info", "--json", str(data_dir / "wsi/boxes.tiff")]) == 0
    facts = json.loads(capsys.readouterr().out)
    assert [lv["dimensions"] for lv in facts["levels"]] == [[300, 250], [150, 125], [75, 62], [37, 31]]
    assert facts["levels"][2]["downsample"] == pytest.approx(4.016129, rel=1e-6)
    assert facts["levels"][3]["downsample"] == pytest.approx(8.086312, rel=1e-6)
    assert facts["mpp"] is None  # 352.78 um/px is a 72-dpi default, not a measurement


@pytest.mark.parametrize(
    "name",
    ["bad/broken.svs", "bad/unopenable.tiff", "bad/truncated_image.png", "bad/oom-dimensions.tif", "missing.svs"],
)
def test_info_bad_input_one_line_exit_2(data_dir, name):
    proc = run_cli("info", str(data_dir / name))
    assert proc.returncode == 2
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("densevision: error: ") and name.split("/")[-1] in lines[0]
    assert proc.stdout == ""


def test_usage_error_one_line_exit_2():
    proc = run_cli("info")
    assert proc.returncode == 2
    assert len(proc.stderr.strip().splitlines()) == 1
    proc = run_cli("no-such-command")
    assert proc.returncode == 2
    assert len(proc.stderr.strip().splitlines()) == 1
    proc = run_cli(
        "segment", "x.tif", "-o", "out.tif", "-c", "c.py", "--probabilities", "--probability-dtype", "float16"
    )
    assert proc.returncode == 2 and "--probability-dtype" in proc.stderr and "'float32', 'uint8'" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize(
    ("args", "says"),
    [
        (["-c", "{repo}/configs/detection/dino_swin-t_fpn_coco.py", "-o", "{tmp}/o.tif"], ".geojson"),
        (["-c", "{tmp}/missing.py", "-o", "{tmp}/o.geojson"], "missing.py"),
        (
            ["-c", "{repo}/configs/detection/dino_swin-t_fpn_coco.py", "-w", "{tmp}/none.pth", "-o", "{tmp}/o.geojson"],
            "none.pth",
        ),
        (
            ["-c", "{repo}/configs/detection/dino_swin-t_fpn_coco.py", "--merge", "wbf", "-o", "{tmp}/o.geojson"],
            "--merge",
        ),
    ],
)
def test_detect_bad_input_one_line_exit_2(data_dir, tmp_path, args, says):
    args = [a.format(tmp=tmp_path, repo=REPO) for a in args]
    proc = run_cli("detect", str(data_dir / "geotiff" / "RGB.byte.tif"), *args)
    assert proc.returncode == 2
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and says in lines[0], proc.stderr
    assert list(tmp_path.iterdir()) == []
