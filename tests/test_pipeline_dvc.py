"""End to end: `dvc repro` and `dvc exp run` in a temporary git repo, on tiny data.

Assertions read DVC's own output: which stages ran, which were skipped or restored.
"""

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
LAYERS = ["block2_pool", "block5_pool"]
HEADS = ["logreg", "knn"]


def sh(cwd: Path, *args: str) -> str:
    env = {
        **os.environ,
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
        "TF_CPP_MIN_LOG_LEVEL": "2",
        "DVC_NO_ANALYTICS": "1",
    }
    proc = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"{' '.join(args)} failed:\n{output[-4000:]}"
    return output


def ran(output: str) -> set[str]:
    return set(re.findall(r"Running stage '([^']+)'", output))


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("e2e")
    shutil.copytree(
        REPO / "pipeline", root / "pipeline", ignore=shutil.ignore_patterns("__pycache__")
    )
    shutil.copy(REPO / "dvc.yaml", root)
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["data"].update(image_size=32, limit=150)
    params["extract"]["layers"] = {layer: "avg" for layer in LAYERS}
    params["train"].update(layers=LAYERS, heads=HEADS)
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    sh(root, "git", "init", "-q")
    sh(root, "git", "config", "user.email", "test@example.invalid")
    sh(root, "git", "config", "user.name", "test")
    sh(root, sys.executable, "-m", "dvc", "init", "-q")
    return root


@pytest.fixture(scope="module")
def reproduced(project: Path) -> str:
    output = sh(project, sys.executable, "-m", "dvc", "repro")
    sh(project, "git", "add", "-A")
    sh(project, "git", "commit", "-qm", "baseline")
    return output


def test_repro_runs_every_stage_and_writes_the_leaderboard(project, reproduced):
    cells = {f"train@{layer}-{head}" for layer in LAYERS for head in HEADS}
    assert {"prepare", "extract", "select", "finetune", "evaluate"} | cells <= ran(reproduced)
    rows = (project / "reports" / "leaderboard.csv").read_text().strip().splitlines()
    assert len(rows) - 1 == len(LAYERS) * len(HEADS)
    best = json.loads((project / "models" / "best.json").read_text())
    assert best["layer"] in LAYERS and best["head"] in HEADS
    test = json.loads((project / "metrics" / "test.json").read_text())
    assert 0 <= test["frozen"]["test_accuracy"] <= 1
    assert "disabled" in reproduced.lower()  # finetune says it did no work


def test_head_experiment_reruns_only_the_changed_cells(project, reproduced):
    output = sh(project, sys.executable, "-m", "dvc", "exp", "run", "-S", "train.logreg.C=0.05")
    assert "Stage 'extract' didn't change, skipping" in output
    trained = {s for s in ran(output) if s.startswith("train@")}
    assert trained == {f"train@{layer}-logreg" for layer in LAYERS}
    assert "prepare" not in ran(output) and "extract" not in ran(output)


def test_layer_experiment_trains_nothing_new_and_ranks_one_layer(project, reproduced):
    output = sh(
        project, sys.executable, "-m", "dvc", "exp", "run", "-S", "train.layers=[block5_pool]"
    )
    assert "Stage 'extract' didn't change, skipping" in output
    assert not {s for s in ran(output) if s.startswith("train@")}
    rows = (project / "reports" / "leaderboard.csv").read_text().strip().splitlines()
    assert len(rows) - 1 == len(HEADS)


def test_returning_to_an_earlier_backbone_restores_features_from_the_run_cache(project, reproduced):
    output = sh(project, sys.executable, "-m", "dvc", "exp", "run", "-S", "backbone.name=vgg19")
    assert "extract" in ran(output)
    output = sh(project, sys.executable, "-m", "dvc", "exp", "run", "-S", "backbone.name=vgg16")
    assert "Stage 'extract' is cached - skipping run, checking out outputs" in output
    assert "extract" not in ran(output)


def test_finetune_enabled_reports_frozen_and_finetuned_side_by_side(project, reproduced):
    output = sh(
        project,
        sys.executable,
        "-m",
        "dvc",
        "exp",
        "run",
        "-S",
        "finetune.enabled=true",
        "-S",
        "finetune.epochs=1",
    )
    assert "finetune" in ran(output) and "extract" not in ran(output)
    test = json.loads((project / "metrics" / "test.json").read_text())
    assert 0 <= test["finetuned"]["test_accuracy"] <= 1
    assert 0 <= test["frozen"]["test_accuracy"] <= 1
