"""select (leaderboard, best on validation) and evaluate (test metrics, confusion data, chart)."""

from __future__ import annotations

import csv
import hashlib
import json
import shutil

import numpy as np
import pytest
from conftest import leaderboard
from synthetic import synthetic_fingerprint, write_features

from pipeline.heads.saved import expected_head
from pipeline.project.layout import MODEL_FILES, Layout
from pipeline.project.records import CellMetrics, HeadRecord, RecordError, file_sha256
from pipeline.selection.cells import train_cell
from pipeline.selection.leaderboard import SelectError, select
from pipeline.selection.params import SelectConfig, TrainConfig
from pipeline.selection.report import evaluate
from pipeline.selection.scoring import wilson_interval

FINGERPRINT = synthetic_fingerprint(["a", "b"])


def fake_cell(
    root, layer, head, val, test, val_f1=None, fit=1.0, features=FINGERPRINT, width=8, folds=5
):
    """metrics/train/<cell>.json and models/heads/<cell>/ as a train cell writes them: the
    estimate by `folds`-fold cross-validation over 100 images (folds None: the val split)."""
    provenance = expected_head(layer, head, TrainConfig(), features)
    model = MODEL_FILES[provenance["kind"]]
    layout = Layout(root)
    folder = layout.cell_dir(layer, head)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / model).write_text(f"model of {provenance['cell']}")
    sha = file_sha256(folder / model)
    CellMetrics(
        layer=layer,
        head=head,
        backbone="vgg16",
        weights="random",
        feature_width=width,
        fit_path="memory",
        n_train=100,
        selection="val" if folds is None else "cv",
        selection_note="the val split alone" if folds is None else f"{folds}-fold cv",
        cv_folds=folds,
        n_val=100,
        val_accuracy=val,
        val_accuracy_ci95=wilson_interval(round(val * 100), 100),
        val_macro_f1=val if val_f1 is None else val_f1,
        val_fold_accuracies=None
        if folds is None
        else [val - 0.05, val + 0.05] + [val] * (folds - 2),
        val_fold_std=None if folds is None else 0.03,
        test_accuracy=test,
        test_accuracy_ci95=wilson_interval(round(test * 100), 100),
        test_macro_f1=test,
        fit_seconds=fit,
        model_sha256=sha,
    ).write(layout.cell_metrics(layer, head))
    HeadRecord(
        **provenance,
        model=model,
        model_sha256=sha,
        reduction="avg",
        feature_width=8,
        class_names=["x", "y"],
        fit_path="memory",
        fit_on="train" if folds is None else "train+val",
    ).write(folder / "head.json")


def run_select(root, layers, heads, metric="val_accuracy"):
    cfg = TrainConfig(layers=layers, heads=heads)
    return select(cfg, SelectConfig(metric=metric), FINGERPRINT, Layout(root))


def test_leaderboard_rows_are_the_current_layers_x_heads(tmp_path):
    layers, heads = ["a", "b"], ["logreg", "knn", "dense"]
    rng = np.random.default_rng(0)
    for layer in layers:
        for head in heads:
            fake_cell(tmp_path, layer, head, float(rng.uniform(0.5, 0.9)), 0.5)
    fake_cell(tmp_path, "old_layer", "logreg", 0.99, 0.99)  # stale: not in the params any more
    fake_cell(tmp_path, "a", "random_forest", 0.99, 0.99)
    best = run_select(tmp_path, layers, heads)

    rows = leaderboard(tmp_path)
    assert sorted(r["cell"] for r in rows) == sorted(f"{la}-{h}" for la in layers for h in heads)
    vals = [float(r["val_accuracy"]) for r in rows]
    assert vals == sorted(vals, reverse=True) and [r["rank"] for r in rows] == [
        "1",
        "2",
        "3",
        "4",
        "5",
        "6",
    ]
    table = [
        line
        for line in Layout(tmp_path).leaderboard_md.read_text().splitlines()
        if line.startswith("| ") and not line.startswith("| rank")
    ]
    assert [line.split(" | ")[1] for line in table] == [r["cell"] for r in rows]
    first_expressible = next(i for i, r in enumerate(rows) if r["head"] in ("logreg", "dense"))
    assert [r.cell for r in best.ranking] == [r["cell"] for r in rows[: first_expressible + 1]]
    assert best.model.endswith(f"heads/{best.head}/{best.cell}/{MODEL_FILES[best.kind]}")
    summary = json.loads(Layout(tmp_path).select_metrics.read_text())
    assert summary["best_cell"] == best.cell == rows[0]["cell"]
    assert json.loads(Layout(tmp_path).layer_metrics.read_text()) == {
        la: max(float(r["val_accuracy"]) for r in rows if r["layer"] == la) for la in layers
    }


@pytest.mark.parametrize("metric", ["val_accuracy", "val_macro_f1"])
def test_best_is_chosen_on_validation_never_on_test(tmp_path, metric):
    fake_cell(tmp_path, "a", "logreg", val=0.80, test=0.99)  # test would pick this one
    fake_cell(tmp_path, "a", "knn", val=0.90, test=0.60)
    fake_cell(tmp_path, "b", "logreg", val=0.85, test=0.95)
    fake_cell(tmp_path, "b", "knn", val=0.70, test=0.97)
    best = run_select(tmp_path, ["a", "b"], ["logreg", "knn"], metric)
    assert (best.cell, best.layer, best.head, best.kind) == (
        "a-knn",
        "a",
        "knn",
        "sklearn",
    )
    assert best.metric == metric and best.value == 0.90
    assert [r["cell"] for r in leaderboard(tmp_path)] == ["a-knn", "b-logreg", "a-logreg", "b-knn"]


def test_best_json_holds_digests_of_the_models_finetuning_may_read(tmp_path):
    vals = {"knn": 0.9, "random_forest": 0.8, "logreg": 0.7, "dense": 0.6, "linear_svm": 0.5}
    for head, val in vals.items():
        fake_cell(tmp_path, "a", head, val, 0.5)
    best = run_select(tmp_path, ["a"], list(vals))
    # down the ranking to the first head Keras can express (logreg), and no further
    assert [r.cell for r in best.ranking] == ["a-knn", "a-random_forest", "a-logreg"]
    model = Layout(tmp_path).cell_dir("a", "logreg") / "model.joblib"
    assert best.ranking[-1].model_sha256 == hashlib.sha256(model.read_bytes()).hexdigest()


def test_ties_are_broken_by_macro_f1_then_a_stated_rule(tmp_path):
    """Equal validation scores: the head fine-tuning can start from, simplest first, then the
    narrower layer; never the fit time, which differs from run to run."""
    fake_cell(tmp_path, "a", "knn", val=0.9, test=0.5, val_f1=0.85, fit=0.1, width=64)
    fake_cell(tmp_path, "a", "logreg", val=0.9, test=0.5, val_f1=0.80, fit=0.1, width=64)
    fake_cell(tmp_path, "b", "logreg", val=0.9, test=0.5, val_f1=0.85, fit=9.0, width=512)
    fake_cell(tmp_path, "b", "knn", val=0.9, test=0.5, val_f1=0.85, fit=0.1, width=512)
    fake_cell(tmp_path, "c", "logreg", val=0.9, test=0.5, val_f1=0.85, fit=5.0, width=64)
    fake_cell(tmp_path, "c", "knn", val=0.5, test=0.5, width=64)
    best = run_select(tmp_path, ["a", "b", "c"], ["logreg", "knn"])
    assert [r["cell"] for r in leaderboard(tmp_path)] == [
        "c-logreg",  # logreg before knn, then 64 features before 512
        "b-logreg",
        "a-knn",
        "b-knn",
        "a-logreg",  # lower macro-F1
        "c-knn",
    ]
    assert best.tie_break.startswith("4 cells tie on val_accuracy and val_macro_f1")
    assert best.tie_break.endswith("then to the narrower layer: c-logreg")
    assert f"Tie: {best.tie_break}." in Layout(tmp_path).leaderboard_md.read_text()
    assert json.loads(Layout(tmp_path).select_metrics.read_text())["tie_break"] == best.tie_break
    fake_cell(tmp_path, "c", "logreg", val=0.95, test=0.5)
    assert run_select(tmp_path, ["a", "b", "c"], ["logreg", "knn"]).tie_break is None


def test_leaderboard_says_how_each_cell_was_estimated_and_its_fold_spread(tmp_path):
    fake_cell(tmp_path, "a", "logreg", 0.9, 0.5)
    fake_cell(tmp_path, "b", "logreg", 0.8, 0.5, folds=None)  # e.g. too wide to cross-validate
    best = run_select(tmp_path, ["a", "b"], ["logreg"])
    rows = leaderboard(tmp_path)
    assert [(r["cell"], r["selection"], r["cv_folds"], r["n_val"]) for r in rows] == [
        ("a-logreg", "cv", "5", "100"),
        ("b-logreg", "val", "", "100"),
    ]
    assert (rows[0]["val_fold_std"], rows[1]["val_fold_std"]) == ("0.03", "")
    md = Layout(tmp_path).leaderboard_md.read_text()
    assert "| 1 | a-logreg | memory | 8 | cv5 | 100 | 0.9000 | [0.826, 0.945] | " in md
    assert "\u00b10.030 [0.850, 0.950]" in md and "| 2 | b-logreg | memory | 8 | val | 100 |" in md
    note = "mixed: 5-fold cv (a-logreg); the val split alone (b-logreg)"
    assert best.selection_note == note and f"Selection: {note}." in md
    assert (best.selection, best.cv_folds) == ("cv", 5)
    summary = json.loads(Layout(tmp_path).select_metrics.read_text())
    assert summary["selection"] == note and summary["best_val_fold_std"] == 0.03


def test_missing_or_mismatched_cells_are_reported(tmp_path):
    fake_cell(tmp_path, "a", "logreg", 0.9, 0.9)
    with pytest.raises(RecordError, match=r"knn/a-knn\.json not found: run `dvc repro train@knn`"):
        run_select(tmp_path, ["a"], ["logreg", "knn"])
    vgg19 = {"name": "vgg19", "weights": "random", "identity": "random"}
    other = synthetic_fingerprint(["a", "b"], backbone=vgg19)
    fake_cell(tmp_path, "a", "knn", 0.9, 0.9, features=other)
    with pytest.raises(RecordError, match=r"a-knn/head.json is stale.*features.backbone.name"):
        run_select(tmp_path, ["a"], ["logreg", "knn"])


def test_a_replaced_model_file_is_refused_before_it_is_read(tmp_path):
    """Another cell's model copied over the best one, or a pickle payload written in its place,
    never reaches joblib: the digest in head.json no longer matches."""
    fake_cell(tmp_path, "a", "logreg", 0.9, 0.9)
    fake_cell(tmp_path, "a", "knn", 0.8, 0.8)
    run_select(tmp_path, ["a"], ["logreg", "knn"])
    heads = Layout(tmp_path).heads
    shutil.copy(heads / "knn" / "a-knn" / "model.joblib", heads / "logreg" / "a-logreg")
    with pytest.raises(RecordError, match=r"a-logreg/model.joblib is not the model its head.json"):
        run_select(tmp_path, ["a"], ["logreg", "knn"])
    # the metrics of another cell copied in place are refused too
    fake_cell(tmp_path, "a", "logreg", 0.9, 0.9)
    metrics = Layout(tmp_path).train_metrics
    shutil.copy(metrics / "knn" / "a-knn.json", metrics / "logreg" / "a-logreg.json")
    with pytest.raises(SelectError, match=r"a-logreg.json does not score the model"):
        run_select(tmp_path, ["a"], ["logreg", "knn"])


def test_heads_trained_with_other_params_are_refused(tmp_path):
    fake_cell(tmp_path, "a", "logreg", 0.9, 0.9)
    with pytest.raises(RecordError, match=r"stale: it was made with params.logreg.C=1.0.*0.5"):
        cfg = TrainConfig(layers=["a"], heads=["logreg"], logreg={"C": 0.5})
        select(cfg, SelectConfig(), FINGERPRINT, Layout(tmp_path))


@pytest.fixture
def trained(tmp_path, monkeypatch):
    """Two real logreg cells on synthetic features, then select: a project dir as DVC leaves it."""
    monkeypatch.chdir(tmp_path)
    write_features(
        ".", {"a": 16, "b": 64}, {"train": 200, "val": 80, "test": 90}, n_classes=3, seed=2
    )
    cfg = TrainConfig(layers=["a", "b"], heads=["logreg", "knn"])
    for layer in cfg.layers:
        for head in cfg.heads:
            train_cell(layer, head, cfg, None)
    select(cfg, SelectConfig(), synthetic_fingerprint(["a", "b"], seed=2))
    return tmp_path


def run_evaluate():
    return evaluate(TrainConfig(layers=["a", "b"], heads=["logreg", "knn"]), None)


def test_evaluate_scores_the_best_frozen_head_and_writes_plots(trained):
    best = json.loads((trained / "models" / "best.json").read_text())
    result = run_evaluate()
    cell_metrics = json.loads(Layout(trained).cell_metrics(best["layer"], best["head"]).read_text())
    assert result == json.loads((trained / "metrics" / "test.json").read_text())
    assert "finetuned" not in result
    assert result["frozen"]["cell"] == best["cell"] and result["frozen"]["n_test"] == 90
    # 80 val images < train.cv.when_val_under: chosen by 5-fold cross-validation over train+val
    assert (result["frozen"]["selection"], result["frozen"]["cv_folds"]) == ("cv", 5)
    summary = json.loads((trained / "metrics" / "select.json").read_text())
    assert summary["selection"] == (
        "5-fold cross-validation over train+val (280 images): the val split has 80 < 500 images"
    )
    assert result["frozen"]["test_accuracy"] == pytest.approx(cell_metrics["test_accuracy"])
    assert result["frozen"]["test_macro_f1"] == pytest.approx(cell_metrics["test_macro_f1"])

    for name in ("confusion.csv", "confusion_normalized.csv"):
        with (trained / "plots" / name).open() as f:
            rows = list(csv.DictReader(f))
        assert len(rows) == 90 and set(rows[0]) == {"actual", "predicted"}
        assert {r["actual"] for r in rows} <= {"class_0", "class_1", "class_2"}
        hits = np.mean([r["actual"] == r["predicted"] for r in rows])
        assert hits == pytest.approx(result["frozen"]["test_accuracy"])
    png = (trained / "plots" / "layers.png").read_bytes()
    assert png.startswith(b"\x89PNG") and len(png) > 10_000


def test_evaluate_puts_the_finetuned_model_beside_the_frozen_head(trained):
    """The fine-tuned model's figures with its gains over the frozen baseline and over the head
    it started from, and the same per-class test report as the frozen head's."""
    best = json.loads((trained / "models" / "best.json").read_text())
    classes = [c["name"] for c in run_evaluate_report(trained)]
    status = {
        "enabled": True,
        "val_accuracy": 0.91,
        "test_accuracy": 0.92,
        "test_accuracy_ci95": [0.85, 0.96],
        "test_macro_f1": 0.9,
        "start_test_accuracy": 0.9,
        "started_from": "other-cell",
        "kept": "epoch 3",
        "fallback": "the best head x cannot be expressed in Keras",
        "test_report": {
            "accuracy": 0.92,
            "accuracy_ci95": [0.85, 0.96],
            "macro_f1": 0.9,
            "n": 90,
            "per_class": [
                {"name": c, "precision": 0.5, "recall": 0.25, "support": 30} for c in classes
            ],
            "confusion": [[0] * len(classes) for _ in classes],
        },
    }
    status_file = trained / "models" / "finetuned" / "status.json"
    status_file.parent.mkdir(parents=True, exist_ok=True)
    status_file.write_text(json.dumps(status))
    result = run_evaluate()
    frozen = result["frozen"]["test_accuracy"]
    assert result["finetuned"] == {
        "test_accuracy": 0.92,
        "test_accuracy_ci95": [0.85, 0.96],
        "test_macro_f1": 0.9,
        "val_accuracy": 0.91,
        "started_from": "other-cell",
        "kept": "epoch 3",
        "gain_over_frozen": round(0.92 - frozen, 6),
        "gain_over_start": round(0.92 - 0.9, 6),
        "why_not_the_chosen_cell": "the best head x cannot be expressed in Keras",
    }
    report = (trained / "reports" / "test.md").read_text()
    assert f"## frozen: {best['cell']} (the chosen cell)" in report
    assert "## fine-tuned from other-cell" in report and "| 0.500 | 0.250 | 30 |" in report
    both = png_size(trained / "plots" / "confusion.png")
    status_file.write_text(json.dumps({"enabled": False}))
    assert "finetuned" not in run_evaluate()
    frozen_only = png_size(trained / "plots" / "confusion.png")
    # one row of matrices per model: the fine-tuned model's below the frozen head's
    assert both[0] == frozen_only[0] and both[1] == pytest.approx(2 * frozen_only[1], rel=0.05)


def png_size(path) -> tuple[int, int]:
    from PIL import Image

    with Image.open(path) as image:
        return image.size


def run_evaluate_report(root) -> list[dict]:
    """The frozen head's per-class rows, as reports/test.md lists them."""
    run_evaluate()
    rows = (root / "reports" / "test.md").read_text().split("| class |")[1].splitlines()[2:]
    return [{"name": r.split("|")[1].strip()} for r in rows if r.startswith("|")]


def test_evaluate_refuses_features_the_head_was_not_trained_on(trained):
    shutil.rmtree(trained / "features")
    write_features(
        ".", {"a": 16, "b": 64}, {"train": 200, "val": 80, "test": 90}, n_classes=3, seed=3
    )
    with pytest.raises(RecordError, match="chosen among heads trained on other features"):
        run_evaluate()


def test_evaluate_refuses_a_best_model_replaced_after_select(trained):
    best = json.loads((trained / "models" / "best.json").read_text())
    heads = trained / "models" / "heads" / "logreg"
    other = next(c for c in ("a-logreg", "b-logreg") if c != best["cell"])
    shutil.copy(heads / other / "model.joblib", heads / best["cell"] / "model.joblib")
    with pytest.raises(RecordError, match=r"model.joblib is not the model its head.json records"):
        run_evaluate()
    shutil.copytree(heads / other, heads / best["cell"], dirs_exist_ok=True)
    with pytest.raises(RecordError, match=rf"stale: it was made with cell='{other}'"):
        run_evaluate()
