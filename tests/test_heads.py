"""Heads on cached features: memory and streaming paths, the Keras head, refusing bad features."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import joblib
import numpy as np
import pytest
from conftest import sharing_features
from sklearn.linear_model import LogisticRegression, SGDClassifier
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import StandardScaler
from synthetic import write_features

from pipeline.features.store import FeatureStoreError, open_splits
from pipeline.project.layout import Layout
from pipeline.project.records import CellMetrics, HeadRecord, RecordError, file_sha256
from pipeline.selection.cells import train_cell
from pipeline.selection.params import TrainConfig

WIDTHS = {"small": 24, "wide": 1024}
REPO = Path(__file__).resolve().parents[1]
ROWS = {"train": 480, "val": 160, "test": 160}  # wide train: 480 x 1024 x 4 B = 1.9 MB


@pytest.fixture(scope="module")
def features(tmp_path_factory):
    """Synthetic features written by the store's writer; train rows sorted by class (the
    streaming path must shuffle)."""
    root = tmp_path_factory.mktemp("heads")
    write_features(root, WIDTHS, ROWS, n_classes=4, sort_train=True, seed=1)
    return root


def run_cell(tmp_path, features, layer, head, expect=None, **train):
    layout = sharing_features(tmp_path, features)
    metrics = train_cell(layer, head, TrainConfig(**train), expect, layout)
    return metrics, layout.cell_dir(layer, head)


def test_linear_head_matches_sklearn_on_the_same_arrays(tmp_path, features):
    metrics, out = run_cell(
        tmp_path, features, "wide", "logreg", logreg={"C": 0.5, "max_iter": 500}, cv={"folds": 0}
    )
    assert metrics.fit_path == "memory" and metrics.selection == "val" and metrics.n_val == 160
    assert CellMetrics.read(Layout(tmp_path).cell_metrics("wide", "logreg"), "-") == metrics

    splits = open_splits(Layout(features))
    x, y = splits["train"].read("wide"), splits["train"].labels
    xv, yv = splits["val"].read("wide"), splits["val"].labels
    reference = Pipeline(
        [("s", StandardScaler()), ("c", LogisticRegression(C=0.5, max_iter=500, random_state=0))]
    )
    expected = reference.fit(x, y).predict(xv)

    info = HeadRecord.read(out / "head.json", "-")
    assert info.kind == "sklearn" and info.model == "model.joblib" and info.reduction == "avg"
    assert info.fit_on == "train" and metrics.n_train == 480
    assert info.features == splits["train"].fingerprint and info.params["logreg"]["C"] == 0.5
    assert info.model_sha256 == metrics.model_sha256 == file_sha256(out / "model.joblib")
    model = joblib.load(out / "model.joblib")
    assert isinstance(model.steps[0][1], StandardScaler)
    np.testing.assert_array_equal(model.predict(xv), expected)
    assert metrics.val_accuracy == pytest.approx(np.mean(expected == yv), abs=1e-6)


@pytest.mark.parametrize("head", ["logreg", "linear_svm", "knn", "random_forest"])
def test_streaming_path_trains_to_sensible_accuracy(tmp_path, features, head):
    common = {"random_forest": {"n_estimators": 30}, "cv": {"folds": 0}}  # both on val
    memory, _ = run_cell(tmp_path / "m", features, "wide", head, **common)
    metrics, out = run_cell(tmp_path / "s", features, "wide", head, max_memory_mb=1, **common)
    assert memory.fit_path == "memory" and metrics.fit_path == "stream"
    model = joblib.load(out / "model.joblib")
    assert isinstance(model.steps[0][1], StandardScaler)
    if head in ("logreg", "linear_svm"):
        assert isinstance(model.steps[-1][1], SGDClassifier)
    assert metrics.val_accuracy > 0.8  # chance is 0.25
    assert metrics.val_accuracy > memory.val_accuracy - 0.1


def test_dense_head_streams_and_stops_early(tmp_path, features):
    import keras

    dense = {
        "hidden": [32],
        "dropout": 0.2,
        "learning_rate": 0.01,
        "epochs": 60,
        "patience": 2,
        "batch_size": 32,
    }
    metrics, out = run_cell(tmp_path, features, "wide", "dense", max_memory_mb=1, dense=dense)
    assert metrics.fit_path == "stream" and metrics.val_accuracy > 0.8
    # train+val would not fit the budget: no cross-validation, and the metrics say why
    assert metrics.selection == "val" and metrics.cv_folds is None
    assert "would exceed train.max_memory_mb=1" in metrics.selection_note

    curve = (out / "live" / "plots" / "metrics" / "eval" / "loss.tsv").read_text().splitlines()[1:]
    val_loss = [float(line.split("\t")[1]) for line in curve]
    assert 2 < len(val_loss) < 60  # early stopping ended training
    assert np.argmin(val_loss) == len(val_loss) - 1 - 2  # after `patience` epochs without progress

    info = HeadRecord.read(out / "head.json", "-")
    assert info.kind == "keras" and info.model == "model.keras"
    model = keras.models.load_model(out / info.model)
    assert isinstance(model.layers[1], keras.layers.Normalization)
    x = open_splits(Layout(features))["val"].read("wide")[:8]
    np.testing.assert_allclose(model.predict(x, verbose=0).sum(axis=1), 1.0, rtol=1e-5)


def test_dense_cross_validation_traces_no_function_per_model(tmp_path, features, capfd, caplog):
    """Six dense models (five folds and the refit) predict without TensorFlow's warning that
    its functions are retraced; the predictions are those of `model.predict`."""
    import keras

    dense = {"hidden": [8], "epochs": 3, "patience": 1}
    metrics, out = run_cell(tmp_path, features, "small", "dense", dense=dense, cv={"folds": 5})
    assert metrics.selection == "cv" and metrics.cv_folds == 5
    assert "retracing" not in capfd.readouterr().err + caplog.text  # TF logs through logging

    from pipeline.heads.fit import keras_probabilities

    model = keras.models.load_model(out / "model.keras")
    x = open_splits(Layout(features))["val"].read("small")
    np.testing.assert_allclose(
        keras_probabilities(model, x), model.predict(x, verbose=0), rtol=1e-5, atol=1e-7
    )


@pytest.mark.parametrize(
    "field, value, named",
    [
        ("backbone", {"name": "vgg19", "weights": "random"}, "backbone.name='vgg16'"),
        ("backbone", {"identity": "file:sha256:" + "0" * 64}, "backbone.identity='random'"),
        ("extract", {"layers": {"small": "max", "wide": "avg"}}, "extract.layers.small='avg'"),
        ("data", "other-images", "data='synthetic-1'"),
        ("code", "other-code", "code='synthetic'"),
    ],
)
def test_features_made_by_other_params_inputs_or_code_are_refused(
    tmp_path, features, field, value, named
):
    have = open_splits(Layout(features))["train"].fingerprint.model_dump()
    if field in ("backbone", "extract"):
        value = {**have[field], **value}
    expect = {k: have[k] for k in ("backbone", "extract", "data", "code")}
    run_cell(tmp_path / "ok", features, "small", "logreg", expect)  # the same: accepted
    with pytest.raises(RecordError, match=rf"stale.*{re.escape(named)}.*dvc repro extract"):
        run_cell(tmp_path, features, "small", "logreg", {**expect, field: value})
    assert not Layout(tmp_path).train_metrics.exists()


def test_a_layer_that_was_not_cached_is_refused(tmp_path, features):
    with pytest.raises(FeatureStoreError, match=r"no layer 'fc2'.*small, wide.*extract.layers"):
        run_cell(tmp_path, features, "fc2", "logreg")


@pytest.mark.parametrize("damage", ["truncated", "garbage"])
def test_cli_refuses_corrupt_features_with_a_clear_message(project, damage):
    for stage in ("scan", "prepare", "extract"):
        project.main(stage)
    target = project.features / "val.h5"
    data = target.read_bytes()
    target.write_bytes(
        data[: len(data) // 2] if damage == "truncated" else b"not hdf5 at all " * 64
    )
    env = {**os.environ, "PYTHONPATH": str(REPO), "TF_CPP_MIN_LOG_LEVEL": "2"}
    result = subprocess.run(
        [sys.executable, "-m", "pipeline.train", "--head", "logreg"],
        cwd=project.root,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode != 0
    assert (
        "val.h5 is unreadable or corrupt" in result.stderr and "dvc repro extract" in result.stderr
    )
    assert "Traceback" not in result.stderr
    assert not (project.root / "models").exists()
