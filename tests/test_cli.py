"""The `layerwise` command and the stages as commands: a project on one's own images, `--help`
that runs nothing, one-line errors, and no backend start-up noise."""

from __future__ import annotations

import hashlib
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from conftest import dvc, dvc_repo, ran, subprocess_env
from PIL import Image

from pipeline.heads.registry import HEAD_NAMES

STAGES = ("scan", "prepare", "extract", "train", "select", "finetune", "evaluate", "export")
NOISE = re.compile(r"absl|cuInit|cuda|oneDNN|cpu_feature_guard|^[IWE]0000 ", re.I | re.M)
LAYERWISE = Path(sys.executable).parent / "layerwise"  # the console script pyproject declares


def layerwise(*args: str, cwd: Path | None = None, check: bool = True, **env: str):
    result = subprocess.run(
        [str(LAYERWISE), *args],
        cwd=cwd,
        env=subprocess_env(**env),
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert not check or result.returncode == 0, result.stdout + result.stderr
    return result


def photos(root: Path, per_class: int = 16) -> Path:
    """Two learnable classes of 40x40 JPEGs: reddish and bluish noise."""
    rng = np.random.default_rng(0)
    for name, colour in (("cats", (190, 60, 60)), ("dogs", (60, 60, 190))):
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            pixels = rng.normal(colour, 40, (40, 40, 3)).clip(0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(root / name / f"{i:02d}.jpg")
    return root


def digests(root: Path) -> dict[str, str]:
    """Every output file of the project, by content."""
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for folder in ("data", "features", "models", "metrics", "reports", "plots")
        for p in sorted((root / folder).rglob("*"))
        if p.is_file()
    } | {"dvc.lock": hashlib.sha256((root / "dvc.lock").read_bytes()).hexdigest()}


@pytest.fixture(scope="module")
def initialised(tmp_path_factory) -> tuple[Path, str]:
    """`layerwise init` on a folder of photos, then `dvc repro` there: (project, its output)."""
    tmp = tmp_path_factory.mktemp("own")
    images = photos(tmp / "photos")
    project = tmp / "project"
    out = layerwise(
        "init", str(project), "--images", str(images), "--image-size", "32", "--weights", "random"
    ).stdout
    assert "32 images in 2 classes (cats, dogs)" in out and "block2_pool, block5_pool" in out
    params = yaml.safe_load((project / "params.yaml").read_text())
    assert params["data"]["path"] == str(images.resolve())  # absolute: queued runs find it
    assert params["extract"]["layers"] == "auto" and params["train"]["layers"] is None
    params["train"]["heads"] = ["logreg", "knn"]  # keep the test short
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    return project, dvc(project, "repro")


def test_init_makes_a_project_that_dvc_repro_runs(initialised):
    project, output = initialised
    assert {"scan", "prepare", "extract", "train@logreg", "train@knn", "evaluate"} <= ran(output)
    shown = layerwise("show", str(project)).stdout
    for cell in ("block2_pool-logreg", "block5_pool-knn"):
        assert cell in shown
    accuracy = float(re.search(r"frozen: test accuracy ([\d.]+)", shown).group(1))
    assert accuracy >= 0.75  # 8 test photos of two colours; chance is 0.5
    assert max(len(line) for line in shown.splitlines()) <= 100
    assert "exported: " in shown and "layerwise predict" in shown
    wide = layerwise("show", str(project), "--wide").stdout
    assert "| rank | cell | fit_path |" in wide
    assert (project / "plots" / "confusion.png").read_bytes()[:4] == b"\x89PNG"
    assert "dvc_plots" in (project / ".gitignore").read_text()


def test_show_says_when_results_are_stale(initialised):
    """After a params change `dvc status` lists changed stages: show says so first."""
    project, _ = initialised
    params = project / "params.yaml"
    original = params.read_text()
    assert "STALE" not in layerwise("show", str(project)).stdout
    changed = yaml.safe_load(original)
    changed["train"]["logreg"]["C"] = 0.123
    params.write_text(yaml.safe_dump(changed, sort_keys=False))
    try:
        shown = layerwise("show", str(project)).stdout
    finally:
        params.write_text(original)
    first = shown.split("\n\n")[0]
    assert first.startswith("STALE (run `dvc repro`): `dvc status` lists changed stages (")
    assert "train@logreg" in first and max(len(line) for line in shown.splitlines()) <= 100


@pytest.mark.parametrize(
    "damage",
    ['{"frozen": {"test_accuracy": 0.9', '{"frozen": {"test_accuracy": "high"}}', "[1, 2]"],
)
def test_show_reports_a_damaged_metrics_file_in_one_line(initialised, damage):
    """Truncated, a string for a number, a list for a mapping: one line naming the file."""
    project, _ = initialised
    metrics = project / "metrics" / "test.json"
    original = metrics.read_text()
    metrics.write_text(damage)
    try:
        result = layerwise("show", str(project), check=False)
    finally:
        metrics.write_text(original)
    line = one_line_error(result)
    assert "metrics/test.json cannot be read" in line and "run `dvc repro`" in line


def test_a_default_run_prints_no_backend_start_up_noise(initialised):
    _, output = initialised
    assert "Running stage 'extract'" in output
    assert not NOISE.findall(output), NOISE.findall(output)


def test_help_of_every_stage_runs_nothing(initialised):
    project, _ = initialised
    before = digests(project)
    for stage in STAGES:
        result = subprocess.run(
            [sys.executable, "-m", f"pipeline.{stage}", "--help"],
            cwd=project,
            env=subprocess_env(),
            capture_output=True,
            text=True,
            check=True,
        )
        assert result.stdout.startswith(f"usage: python -m pipeline.{stage}")
    assert digests(project) == before


def test_dvc_sees_one_pipeline_in_a_repo_holding_the_package(tmp_path):
    """The package's templates for `layerwise init` must not be collected as a second
    pipeline (it made `dvc exp run` check out outputs under pipeline/templates/)."""
    root = dvc_repo(tmp_path / "repo", {"train": {"heads": ["logreg"]}})
    expected = {s for s in STAGES if s != "train"} | {f"train@{h}" for h in HEAD_NAMES}
    listed = dvc(root, "stage", "list", "--all", "--name-only").split()
    assert sorted(listed) == sorted(expected)


def test_backbones_and_layers_list_what_params_accept():
    listing = layerwise("backbones").stdout
    assert re.search(r"mobilenet_v2\s+224\s+32\s+-\s+2\.3M / 3\.5M\s+block_6_expand_relu", listing)
    dinov2 = (
        r"^dinov2_small\s+224\s+14\s+14\s+22\.2M\s+block3:cls_avg, block6:cls_avg, final:cls_avg$"
    )
    assert re.search(dinov2, listing, re.M)  # KerasHub: any multiple of the patch size
    tokens = layerwise("layers", "dinov2_small", "--image-size", "28").stdout
    assert re.search(r"^block6\s+5x384\s+1920\s+384\s+1536\s+auto$", tokens, re.M)  # 1 + 2x2
    layers = layerwise("layers", "vgg16", "--image-size", "32").stdout
    assert re.search(r"^block5_pool\s+1x1x512\s+512\s+512\s+2048\s+auto$", layers, re.M)
    assert re.search(r"^block4_pool\s+2x2x512\s+2048\s+512\s+2048\s+\*$", layers, re.M)
    assert "fc2" not in layers  # the top needs 224 px
    convnext = layerwise("layers", "convnext_tiny", "--image-size", "32").stdout
    assert re.search(r"^add_5\s+4x4x192\s+3072\s+192\s+768\s+auto$", convnext, re.M)  # a sum
    assert re.search(r"^add_2\s+8x8x96\s+6144\s+96\s+384\s+\*$", convnext, re.M)
    line = one_line_error(layerwise("layers", "vgg61", check=False))
    assert "unknown backbone 'vgg61'; did you mean vgg19, vgg16" in line


def one_line_error(result: subprocess.CompletedProcess) -> str:
    assert result.returncode != 0
    assert "Traceback" not in result.stdout + result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    return lines[0]


def test_each_kind_of_bad_input_is_one_line_without_a_traceback(project, tmp_path):
    """Params (ConfigError), data (DataError), a stale or missing artefact (RecordError), a
    weights file of another model (BackboneError), and the `layerwise` command's own."""
    project.write_params(extract={"layers": {"block5_pol": "avg"}})
    line = one_line_error(project.run("scan", check=False))
    assert line.startswith("scan: ") and "did you mean block5_pool" in line

    project.write_params()
    line = one_line_error(project.run("extract", check=False))
    assert "meta.json not found: run `dvc repro prepare`" in line

    lonely = tmp_path / "one-class"
    (lonely / "only").mkdir(parents=True)
    project.write_params(data={"source": "folder", "path": str(lonely)})
    project.run("scan")
    line = one_line_error(project.run("prepare", check=False))
    assert line.startswith("prepare: ") and "at least two class folders" in line

    import keras

    weights = tmp_path / "other.weights.h5"
    keras.Sequential([keras.Input((4,)), keras.layers.Dense(3)]).save_weights(weights)
    project.write_params(backbone={"weights": str(weights)})
    for stage in ("scan", "prepare"):
        project.run(stage)
    line = one_line_error(project.run("extract", check=False))
    assert "does not fit vgg16 built without its classification top at 32x32" in line
    assert "1 layers with weights, with Dense layers (a classification top)" in line

    traced = project.run("extract", check=False, env={"LAYERWISE_TRACEBACK": "1"})
    assert "Traceback" in traced.stderr and "BackboneError" in traced.stderr

    line = one_line_error(layerwise("init", str(project.root), "--images", ".", check=False))
    assert line.startswith("layerwise init: ") and "is not empty" in line
    line = one_line_error(layerwise("show", str(tmp_path), check=False))
    assert "leaderboard.md not found: run `dvc repro`" in line
