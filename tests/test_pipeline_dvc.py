"""End to end: `dvc repro` and `dvc exp run` in a temporary git repo, on tiny data.

Assertions read DVC's own output: which stages ran, which were skipped or restored.
"""

import json
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import dvc_repo, leaderboard, ran, restored, sh

from pipeline.heads.registry import HEAD_NAMES
from pipeline.project.layout import Layout

LAYERS = ["block2_pool", "block5_pool"]  # VGG16's `extract.layers: auto` at 32 px
HEADS = ["logreg", "knn"]
TRAINED = {f"train@{head}" for head in HEADS}
# a train param every train@<head> stage tracks re-runs the heads train.heads does not list
# too: they write their note again, and fit nothing
EVERY_TRAIN = {f"train@{head}" for head in HEAD_NAMES}


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Path:
    """The committed params.yaml (extract.layers: auto, train.layers: null) at 32 px."""
    params = {"data": {"image_size": 32, "limit": 150}, "train": {"heads": HEADS}}
    return dvc_repo(tmp_path_factory.mktemp("e2e") / "repo", params)


@pytest.fixture(scope="module")
def reproduced(project: Path) -> str:
    output = sh(project, sys.executable, "-m", "dvc", "repro")
    sh(project, "git", "add", "-A")
    sh(project, "git", "commit", "-qm", "baseline")
    return output


def test_repro_runs_every_stage_and_writes_the_leaderboard(project, reproduced):
    assert {"prepare", "extract", "select", "finetune", "evaluate"} | TRAINED <= ran(reproduced)
    rows = leaderboard(project)
    assert {(r["layer"], r["head"]) for r in rows} == {(la, h) for la in LAYERS for h in HEADS}
    best = json.loads((project / "models" / "best.json").read_text())
    assert best["layer"] in LAYERS and best["head"] in HEADS
    # 30 val images < train.cv.when_val_under: every cell is ranked by 5-fold cross-validation
    selection = "5-fold cross-validation over train+val (120 images): the val split has 30 < 500"
    assert {(r["selection"], r["cv_folds"], r["n_val"]) for r in rows} == {("cv", "5", "120")}
    for r in rows:
        folds = json.loads(r["val_fold_accuracies"])
        assert len(folds) == 5 and float(r["val_fold_std"]) == pytest.approx(
            np.std(folds), abs=1e-5
        )
    assert "| fold_spread |" in (project / "reports" / "leaderboard.md").read_text()
    assert json.loads((project / "metrics" / "select.json").read_text())["selection"].startswith(
        selection
    )
    assert f"selection: {selection}" in reproduced
    test = json.loads((project / "metrics" / "test.json").read_text())
    frozen = test["frozen"]
    assert (frozen["selection"], frozen["cv_folds"]) == ("cv", 5)
    assert frozen["test_accuracy"] > 0.5  # digits are learnable; chance is 0.1
    assert (
        frozen["test_accuracy_ci95"][0]
        <= frozen["test_accuracy"]
        <= frozen["test_accuracy_ci95"][1]
    )
    assert "disabled" in reproduced.lower()  # finetune says it did no work


def test_head_experiment_reruns_only_the_changed_head(project, reproduced):
    output = sh(project, sys.executable, "-m", "dvc", "exp", "run", "-S", "train.logreg.C=0.05")
    assert "Stage 'extract' didn't change, skipping" in output
    trained = {s for s in ran(output) if s.startswith("train@")}
    assert trained == {"train@logreg"}
    assert "prepare" not in ran(output) and "extract" not in ran(output)


def test_a_cv_experiment_reruns_every_train_cell_but_not_extract(project, reproduced):
    output = sh(project, sys.executable, "-m", "dvc", "exp", "run", "-S", "train.cv.folds=3")
    assert "Stage 'extract' didn't change, skipping" in output
    trained = {s for s in ran(output) if s.startswith("train@")}
    assert trained == EVERY_TRAIN
    assert {r["cv_folds"] for r in leaderboard(project)} == {"3"}


def test_layer_experiment_extracts_nothing_and_ranks_one_layer(project, reproduced):
    output = sh(
        project, sys.executable, "-m", "dvc", "exp", "run", "-S", "train.layers=[block5_pool]"
    )
    assert "Stage 'extract' didn't change, skipping" in output
    assert {s for s in ran(output) if s.startswith("train@")} == EVERY_TRAIN
    assert {(r["layer"], r["head"]) for r in leaderboard(project)} == {
        ("block5_pool", h) for h in HEADS
    }


def test_returning_to_an_earlier_backbone_restores_every_stage_from_the_run_cache(
    project, reproduced
):
    """Features, heads, leaderboard and metrics come back from DVC's run-cache: no train cell
    runs (treeverse/dvc#8738: an uncached output that is not a metric turns the run-cache off)."""
    sh(project, "git", "checkout", "--", "params.yaml")  # the baseline's params, every cell
    output = sh(project, sys.executable, "-m", "dvc", "exp", "run", "-S", "backbone.name=vgg19")
    assert "extract" in ran(output)
    vgg19_best = (project / "models" / "best.json").read_text()
    output = sh(project, sys.executable, "-m", "dvc", "exp", "run", "-S", "backbone.name=vgg16")
    assert "Stage 'extract' is cached - skipping run, checking out outputs" in output
    assert TRAINED | {"extract", "select", "evaluate"} <= restored(output)
    assert ran(output) == {"scan"}  # only the always-run check of params and inputs
    best = json.loads((project / "models" / "best.json").read_text())
    assert best["features"] != json.loads(vgg19_best)["features"]
    for layer in LAYERS:
        for head in HEADS:
            path = Layout(project).cell_metrics(layer, head)
            assert json.loads(path.read_text())["backbone"] == "vgg16"
    for name in ("select.json", "test.json", "finetune.json"):
        metrics = json.loads((project / "metrics" / name).read_text())
        assert (metrics["backbone"], metrics["weights"]) == ("vgg16", "random")


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
    report = json.loads((project / "metrics" / "finetune.json").read_text())
    assert test["finetuned"]["test_accuracy"] == report["test_accuracy"] > 0.5
    n_test = test["frozen"]["n_test"]
    if report["best_epoch"]:  # an epoch beat the start on validation: refit like the head
        assert report["kept"] == f"epoch {report['best_epoch']}, refit on train+val"
    else:  # none did: the head it started from is kept, the frozen best unless a fallback
        assert report["kept"] == "the starting head"
        if report["fallback"] is None:  # float32 Dense vs scikit-learn: one image at most
            n = test["frozen"]["n_test"]
            assert abs(report["test_accuracy"] - test["frozen"]["test_accuracy"]) <= 1 / n
    card = json.loads((project / "models" / "export" / "card.json").read_text())
    assert "export" in ran(output)
    if report["best_epoch"]:  # the fine-tuned model is the winner, scored as evaluate did
        assert card["source"] == "fine-tuned" and card["cell"] == report["started_from"]
        assert card["test"]["accuracy"] == pytest.approx(report["test_accuracy"], abs=1 / n_test)
    else:
        assert card["source"] == "frozen" and "fine-tuning kept its starting head" in card["why"]
