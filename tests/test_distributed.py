"""torchrun with two CPU processes (gloo) gives the same bytes as one process."""

from __future__ import annotations

import json
import subprocess
import sys

from test_resume import _command, scene  # noqa: F401  (the scene fixture and the run script are shared)


def test_two_ranks_equal_one_process(scene, tmp_path):  # noqa: F811
    src, script = scene
    single = tmp_path / "single" / "seg.tif"
    single.parent.mkdir()
    assert subprocess.run(_command(script, src, single, 0, False), timeout=300).returncode == 0

    multi = tmp_path / "multi" / "seg.tif"
    multi.parent.mkdir()
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    proc = subprocess.run(
        [*torchrun, *_command(script, src, multi, 0, False)[1:]], capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stderr[-12000:]  # a rank's fatal-error stacks, then torchrun's report
    shares = sorted(int(line.split()[-1]) for line in proc.stdout.splitlines() if line.startswith("tiles predicted:"))
    assert len(shares) == 2 and all(n > 0 for n in shares)  # both ranks predicted
    assert sum(shares) <= 88 + 8 + 2 * 2, shares  # 88 tiles, plus one tile row and batch alignment at the cut
    for name in ("seg.tif", "seg.probs.tif"):
        assert (multi.parent / name).read_bytes() == (single.parent / name).read_bytes(), name
    summary = json.loads((multi.parent / "seg.summary.json").read_text())
    assert summary["tiles"]["done"] == summary["tiles"]["total"]
    assert not (multi.parent / "seg.tif.partial.d").exists()
