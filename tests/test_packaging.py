"""What the installed package carries: configs found by name or by path (``densevision.configs.find_config``), the
two real samples with their origin recorded (``densevision.samples``), and a wheel that works outside the checkout."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

import pytest

from densevision.configs import config_dir, config_names, find_config
from densevision.errors import ConfigError, ImageNotFoundError
from densevision.samples import GEOTIFF, SAMPLES, SLIDE, sample_path

REPO = Path(__file__).resolve().parents[1]
DINO = REPO / "configs" / "detection" / "dino_swin-t_fpn_coco.py"
# What a wheel is built from: nothing else of the checkout may be needed.
BUILD_INPUTS = ("pyproject.toml", "setup.py", "README.md", "densevision", "configs")


@pytest.mark.parametrize(
    "name",
    [
        "dino_swin-t_fpn_coco",
        "dino_swin-t_fpn_coco.py",
        "detection/dino_swin-t_fpn_coco",
        "detection/dino_swin-t_fpn_coco.py",
        str(DINO),
        DINO,
    ],
)
def test_a_config_is_found_by_name_or_path(name: str | Path) -> None:
    assert find_config(name) == DINO  # the editable install maps densevision.configs onto the repository's configs/


def test_a_path_wins_over_a_shipped_name(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    mine = tmp_path / "dino_swin-t_fpn_coco.py"
    mine.write_text("model = dict(type='DINO')\n")
    monkeypatch.chdir(tmp_path)
    assert find_config("dino_swin-t_fpn_coco.py") == mine  # an existing file in the current folder
    assert find_config("dino_swin-t_fpn_coco") == DINO  # no such file: the shipped config of that name


def test_every_config_file_has_a_name() -> None:
    on_disk = sorted(p.relative_to(REPO / "configs").with_suffix("").as_posix() for p in REPO.glob("configs/*/*.py"))
    assert config_names() == on_disk and "__init__" not in " ".join(on_disk)
    assert "segmentation/upernet_swin-t_ade20k-512" in on_disk and config_dir() == REPO / "configs"


@pytest.mark.parametrize(
    ("name", "says"),
    [
        ("dino_swin_t_fpn_coco", "did you mean detection/dino_swin-t_fpn_coco"),  # underscore for hyphen
        ("upernet", "segmentation/upernet_swin-t_ade20k-512"),  # a part of the name
        ("nothing/like_it", "shipped configs: demo/dino_swin-tiny_demo-256"),  # nothing close: the whole list
        ("coco_detection", "did you mean _base_/coco_detection"),  # a base is named with its folder only
    ],
)
def test_an_unknown_config_names_close_matches_on_one_line(name: str, says: str) -> None:
    with pytest.raises(ConfigError, match="neither a file nor a shipped config name") as e:
        find_config(name)
    assert says in str(e.value) and "\n" not in str(e.value)


def test_a_folder_is_not_a_config(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="is a directory"):
        find_config(tmp_path)


def test_the_type_stub_matches_the_configs_package() -> None:
    """densevision/configs.pyi (for mypy, which cannot follow the package-dir mapping) says what the code says."""
    import ast
    import inspect

    import densevision.configs as configs

    stub = ast.parse((REPO / "densevision" / "configs.pyi").read_text())
    stubbed = {
        f.name: {
            **{a.arg: ast.unparse(a.annotation) for a in f.args.args if a.annotation},
            "return": ast.unparse(f.returns),
        }
        for f in stub.body
        if isinstance(f, ast.FunctionDef) and f.returns is not None
    }
    real = {name: inspect.get_annotations(getattr(configs, name)) for name in configs.__all__}
    assert stubbed == real  # annotations are strings on both sides (from __future__ import annotations)


def test_a_shipped_config_inherits_its_base() -> None:
    from mmengine.config import Config

    cfg = Config.fromfile(str(find_config("demo/dino_swin-tiny_demo-256")))  # demo -> detection -> _base_
    assert cfg.model.type == "DINO" and cfg.test_dataloader.dataset.type == "CocoDataset"


def test_the_samples_are_the_recorded_files() -> None:
    sources = (sample_path(SLIDE).parent / "SOURCES.md").read_text()
    for name in SAMPLES:
        digest = hashlib.sha256(sample_path(name).read_bytes()).hexdigest()
        assert f"`{name}`" in sources and digest in sources, name
    assert "CC0" in sources and sample_path(GEOTIFF).parent == REPO / "densevision" / "samples"
    with pytest.raises(ImageNotFoundError, match="not a shipped sample"):
        sample_path("CMU-1.svs")


# --- the wheel, installed away from the checkout --------------------------------------------------------------------


def _run(cmd: list[str | Path], **kw: object) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, **kw)  # type: ignore[call-overload]
    assert proc.returncode == 0, f"{cmd} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


@pytest.fixture(scope="module")
def wheel_env(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A wheel built from a clean copy of the build inputs, installed with ``pip --target`` and put on the path of a
    fresh virtual environment, after which comes the stack of the environment running the tests (by a ``.pth`` that
    lists the folders, so none of that stack's own ``.pth`` files runs: not the editable install's finder)."""
    tmp = tmp_path_factory.mktemp("wheel")
    src, dist, site, venv = tmp / "src", tmp / "dist", tmp / "site", tmp / "venv"
    src.mkdir()
    skip = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info", "*.partial")
    for name in BUILD_INPUTS:  # a copy: an in-tree build/ could carry stale files of an earlier build
        if (REPO / name).is_dir():
            shutil.copytree(REPO / name, src / name, ignore=skip)
        else:
            shutil.copy2(REPO / name, src / name)
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "--no-input"]
    _run([*pip, "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-q", "-w", dist, src])
    (wheel,) = dist.glob("densevision-*.whl")
    _run([*pip, "install", "--no-deps", "--no-index", "-q", "--target", site, wheel])
    _run([sys.executable, "-m", "venv", "--without-pip", venv])
    python = venv / "bin" / "python"
    purelib = _run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"]).stdout.strip()
    stack = dict.fromkeys([sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]])
    (Path(purelib) / "densevision-wheel-test.pth").write_text("\n".join([str(site), *stack]) + "\n")
    work = tmp / "work"  # the current folder of every command: outside the checkout
    work.mkdir()
    return {"python": python, "site": site, "work": work, "cache": tmp / "cache", "wheel": wheel}


def _env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}


PROBE = """
import json, sys
import densevision, densevision.cli
from densevision.configs import config_dir, find_config
from densevision.samples import SAMPLES, sample_path
from mmengine.config import Config
cfg = Config.fromfile(str(find_config("demo/dino_swin-tiny_demo-256")))
print(json.dumps({
    "modules": sorted({m.__file__ for m in list(sys.modules.values())
                       if m.__name__.split(".")[0] == "densevision" and getattr(m, "__file__", None)}),
    "configs": str(config_dir()),
    "samples": [str(sample_path(n)) for n in SAMPLES],
    "base_type": cfg.model.type,
    "finders": [type(f).__module__ for f in sys.meta_path],
}))
"""


def test_the_wheel_imports_its_own_code_configs_and_samples(wheel_env: dict[str, Path]) -> None:
    site = wheel_env["site"]
    names = subprocess.run(
        [sys.executable, "-m", "zipfile", "-l", str(wheel_env["wheel"])], capture_output=True, text=True, check=True
    ).stdout
    shipped = ["configs/_base_/coco_detection.py", "configs/demo/dino_swin-tiny_demo-256.py", "synthetic/planted.py"]
    shipped += [f"samples/{name}" for name in (*SAMPLES, "SOURCES.md")]
    for member in shipped:
        assert f"densevision/{member}" in names, member
    assert "densevision/configs.pyi" not in names  # the checkout's stub for mypy stays out
    facts = json.loads(_run([wheel_env["python"], "-c", PROBE], cwd=wheel_env["work"], env=_env()).stdout)
    assert facts["modules"] and all(Path(f).is_relative_to(site) for f in facts["modules"]), facts["modules"]
    assert Path(facts["configs"]) == site / "densevision" / "configs" and facts["base_type"] == "DINO"
    assert all(Path(p).is_relative_to(site / "densevision" / "samples") for p in facts["samples"])
    assert not any("editable" in f for f in facts["finders"])  # the checkout cannot answer an import


def test_the_installed_command_runs_info_and_the_tiny_demo_anywhere(wheel_env: dict[str, Path]) -> None:
    python, site, work = wheel_env["python"], wheel_env["site"], wheel_env["work"]
    command = [python, site / "bin" / "densevision"]  # the wheel's entry-point script, on the fresh environment
    slide, scene = site / "densevision" / "samples" / SLIDE, site / "densevision" / "samples" / GEOTIFF
    info = json.loads(_run([*command, "info", "--json", slide, scene], cwd=work, env=_env()).stdout)
    assert [d["size"] for d in info] == [[2220, 2967], [791, 718]]
    assert info[0]["backend"] == "openslide" and "32618" in info[1]["crs"]

    started = time.perf_counter()
    args: list[str | Path] = ["demo", "--size", "tiny", "--cache-dir", wheel_env["cache"], "-q"]
    _run([*command, *args], cwd=work, env=_env(), timeout=900)
    seconds = time.perf_counter() - started
    summary = json.loads((work / "outputs" / "demo" / "demo_summary.json").read_text())  # ./outputs/demo
    assert summary["data"] == {"slide": str(slide), "geotiff": str(scene)}  # the shipped samples, no ../shared
    for task in ("segmentation", "detection"):
        assert Path(summary[task]["model"]["trained_with"]).is_relative_to(site / "densevision" / "configs")
        assert (work / summary[task]["output"]).is_file()
    # The installed scorer's numbers are the files' own, recomputed here without it.
    from test_demo import independent_scores

    iou, found = independent_scores(work / "outputs" / "demo")
    seg, det = summary["segmentation"]["scores"], summary["detection"]["scores"]
    assert {k: v for k, v in seg["iou"].items() if v is not None} == pytest.approx(iou)
    assert {k: det[k] for k in found} == found
    print(f"tiny demo from the wheel: {seconds:.0f} s")
