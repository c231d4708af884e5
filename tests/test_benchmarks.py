"""The benchmark driver end to end at --quick sizes: every part runs and lands in the report with its headline."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_run_all_quick_writes_every_part(tmp_path: Path) -> None:
    parts = ["memory", "overhead", "mmseg", "seams", "gpu"]
    if importlib.util.find_spec("sahi") is not None:  # the bench extra
        parts += ["sahi", "truth"]
    out = tmp_path / "BENCHMARKS.md"
    cmd = [sys.executable, str(REPO / "benchmarks" / "run_all.py"), "--quick", "--workdir", str(tmp_path / "work")]
    env = dict(os.environ, PYTHONPATH=str(REPO))
    run = subprocess.run([*cmd, "--out", str(out), "--parts", *parts], capture_output=True, text=True, env=env)
    assert run.returncode == 0, run.stderr[-3000:]
    text = out.read_text()
    assert not out.with_name(out.name + ".partial").exists()
    assert "Quick run" in text and "## Headlines" in text
    headlines = text.split("## Headlines", 1)[1].split("\n## ", 1)[0]
    for lead in ("Memory: ", "Engine overhead", "Against mmseg", "Seams ", "GPU (cpu)"):
        assert lead in headlines, lead
    if "sahi" in parts:
        assert "Against SAHI" in headlines and "Planted objects" in headlines
    assert "largest probability difference" in headlines
    # mmseg's slide inference and segment_image agree to float precision, also at these sizes
    diff = float(headlines.split("largest probability difference ")[1].split(".\n")[0].rstrip("."))
    assert diff < 1e-4


def test_run_all_without_sahi_says_how_to_install(tmp_path: Path) -> None:
    if importlib.util.find_spec("sahi") is not None:
        pytest.skip("sahi is installed")
    cmd = [sys.executable, str(REPO / "benchmarks" / "run_all.py"), "--quick", "--parts", "sahi"]
    run = subprocess.run([*cmd, "--workdir", str(tmp_path)], capture_output=True, text=True)
    assert run.returncode == 2
    assert "pip install -e '.[bench]'" in run.stdout
