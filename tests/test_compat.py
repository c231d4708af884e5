"""Checkpoint loading on current torch: real mmengine checkpoints load safely, planted pickles do not run."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from mmengine.logging import HistoryBuffer, MessageHub
from mmengine.runner.checkpoint import load_checkpoint as mmengine_load_checkpoint
from mmengine.runner.checkpoint import save_checkpoint

from densevision.compat import load_checkpoint, load_state_dict_strictly, patch_mmengine, trusted_checkpoints
from densevision.errors import CheckpointError, DenseVisionError, UnsafeCheckpointError


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.BatchNorm2d(8))


@pytest.fixture
def mm_checkpoint(tmp_path):
    """A checkpoint as mmengine's Runner writes it: numpy metadata and a MessageHub with HistoryBuffers."""
    hub = MessageHub.get_instance("densevision-test-compat")
    hub.update_scalar("train/loss", 0.75)
    hub.update_scalar("train/loss", 0.25)
    hub.update_info("iter", 7)
    ckpt = {
        "meta": {
            "epoch": 3,
            "iter": 7,
            "seed": np.int64(42),
            "lr": np.float32(1e-4),
            "hist": np.arange(6, dtype=np.float64).reshape(2, 3),
            "dataset_meta": {"classes": ("tumor", "stroma"), "palette": [[255, 0, 0], [0, 255, 0]]},
        },
        "state_dict": _model().state_dict(),
        "message_hub": hub.state_dict(),
    }
    path = tmp_path / "epoch_3.pth"
    save_checkpoint(ckpt, str(path))
    return path


def test_mmengine_checkpoint_with_numpy_meta_loads(mm_checkpoint):
    ckpt = load_checkpoint(mm_checkpoint)
    assert ckpt["meta"]["seed"] == 42 and isinstance(ckpt["meta"]["seed"], np.int64)
    np.testing.assert_array_equal(ckpt["meta"]["hist"], np.arange(6).reshape(2, 3))
    assert ckpt["meta"]["dataset_meta"]["classes"] == ("tumor", "stroma")
    assert ckpt["message_hub"]["log_scalars"]["train/loss"].mean() == pytest.approx(0.5)
    for k, v in _model().state_dict().items():
        torch.testing.assert_close(ckpt["state_dict"][k], v)


def test_plain_torch_load_fails_on_the_same_file(mm_checkpoint):
    """The breakage this module exists for: if torch ever accepts these files by default, revisit compat."""
    with pytest.raises(Exception, match="Weights only load failed"):
        torch.load(mm_checkpoint)


def test_mmengine_load_checkpoint_is_patched(mm_checkpoint):
    code = (
        "import torch, sys; from mmengine.runner.checkpoint import load_checkpoint\n"
        "m = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.BatchNorm2d(8))\n"
        f"load_checkpoint(m, {str(mm_checkpoint)!r})\n"
    )
    unpatched = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert unpatched.returncode != 0 and "Weights only load failed" in unpatched.stderr

    patch_mmengine()
    patch_mmengine()  # idempotent
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.BatchNorm2d(8))
    ckpt = mmengine_load_checkpoint(model, str(mm_checkpoint), strict=True)
    assert ckpt["meta"]["epoch"] == 3
    for k, v in _model().state_dict().items():
        torch.testing.assert_close(model.state_dict()[k], v)


class _Planted:
    """Unpickling this creates a directory: the stand-in for arbitrary code in a malicious checkpoint."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.makedirs, (self.marker,))


def test_planted_pickle_is_refused_and_never_runs(tmp_path):
    marker = tmp_path / "code-ran"
    path = tmp_path / "evil.pth"
    torch.save({"state_dict": {"w": torch.zeros(2)}, "payload": _Planted(str(marker))}, path)

    with pytest.raises(UnsafeCheckpointError, match=r"posix\.makedirs|os\.makedirs") as exc:
        load_checkpoint(path)
    assert isinstance(exc.value, DenseVisionError)
    assert "--trust-checkpoint" in str(exc.value) and "\n" not in str(exc.value)
    assert not marker.exists()

    # Trust is explicit and scoped: inside the block the pickle runs, outside it is refused again.
    with trusted_checkpoints():
        load_checkpoint(path)
    assert marker.exists()
    marker.rmdir()
    with pytest.raises(UnsafeCheckpointError):
        load_checkpoint(path)
    assert not marker.exists()


class _Sneaky:
    def __init__(self, target: object, name: str) -> None:
        self.target, self.name = target, name

    def __reduce__(self):
        return (getattr, (self.target, self.name))


@pytest.mark.parametrize("target,name", [(MessageHub, "get_instance"), (HistoryBuffer, "__init__")])
def test_getattr_is_allowed_only_for_history_buffer_statistics(tmp_path, target, name):
    path = tmp_path / "sneaky.pth"
    torch.save({"x": _Sneaky(target, name)}, path)
    with pytest.raises(UnsafeCheckpointError):
        load_checkpoint(path)


def test_missing_and_garbage_checkpoints(tmp_path):
    with pytest.raises(CheckpointError, match="no such checkpoint"):
        load_checkpoint(tmp_path / "nope.pth")
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"this is not a checkpoint")
    with pytest.raises(CheckpointError):
        load_checkpoint(garbage)


def test_strict_load_names_missing_unexpected_and_misshaped_keys():
    model = _model()  # 0.weight, 0.bias, 1.weight, 1.bias, 1.running_mean, 1.running_var, 1.num_batches_tracked
    before = {k: v.clone() for k, v in model.state_dict().items()}
    state = {k: torch.zeros_like(v) for k, v in model.state_dict().items()}
    del state["1.running_var"], state["0.bias"]
    state["head.weight"] = torch.zeros(2)
    state["1.weight"] = torch.zeros(3)
    with pytest.raises(CheckpointError) as err:
        load_state_dict_strictly(model, state, what="x.pth does not fit the model", fix="use its config")
    assert str(err.value) == (
        "x.pth does not fit the model: 2 missing keys: 0.bias, 1.running_var; 1 unexpected keys: head.weight; "
        "1 mis-shaped: 1.weight (3,) (model (8,)); use its config"
    )
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # nothing half-loaded


def test_strict_load_cuts_long_key_lists_and_loads_an_exact_fit():
    model = torch.nn.Sequential(*(torch.nn.Linear(1, 1) for _ in range(5)))
    with pytest.raises(
        CheckpointError,
        match=r"10 missing keys: 0\.bias, 0\.weight, 1\.bias, 1\.weight, 2\.bias, "
        r"2\.weight and 4 more; fix it$",
    ):
        load_state_dict_strictly(model, {}, what="w", fix="fix it")
    state = {k: torch.full_like(v, 0.5) for k, v in model.state_dict().items()}
    load_state_dict_strictly(model, state, what="w", fix="fix it")
    assert all(torch.equal(v, torch.full_like(v, 0.5)) for v in model.state_dict().values())
