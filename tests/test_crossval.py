"""Selection by cross-validation over train+val (train.cv): when it applies, what the saved
model was fitted on, the pooled out-of-fold estimate, small classes, the dense head's epochs."""

from __future__ import annotations

import joblib
import numpy as np
import pytest
from conftest import sharing_features
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import StratifiedKFold, cross_val_predict
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import StandardScaler
from synthetic import write_features

from pipeline.features.store import open_splits
from pipeline.heads.blocks import Plan
from pipeline.project.layout import Layout
from pipeline.project.records import HeadRecord
from pipeline.selection import cells, crossval
from pipeline.selection.cells import train_cell
from pipeline.selection.crossval import (
    ArrayFeatures,
    choose_selection,
    cross_validate,
    stopping_split,
)
from pipeline.selection.params import TrainConfig
from pipeline.selection.scoring import wilson_interval

ROWS = {"train": 121, "val": 40, "test": 50}  # 161 rows: folds of unequal size


@pytest.fixture(scope="module")
def features(tmp_path_factory):
    root = tmp_path_factory.mktemp("cv")
    write_features(root, {"a": 16}, ROWS, n_classes=3, seed=3)
    return Layout(root)


def run_cell(tmp_path, features, head="logreg", **train):
    cfg = TrainConfig(layers=["a"], heads=[head], **train)
    layout = sharing_features(tmp_path, features.root)
    return train_cell("a", head, cfg, None, layout), layout.cell_dir("a", head)


def labels(*counts: int) -> np.ndarray:
    return np.repeat(np.arange(len(counts)), counts)


@pytest.mark.parametrize(
    "cv, method, folds, reason",
    [
        ({}, "cv", 5, "the val split has 40 < 500 images"),
        ({"when_val_under": 41}, "cv", 5, "the val split has 40 < 41 images"),
        ({"when_val_under": 40}, "val", None, "the val split has 40 >= 40 images"),
        ({"folds": 0}, "val", None, "train.cv.folds is 0"),
        ({"folds": 3}, "cv", 3, "the val split has 40 < 500 images"),
    ],
)
def test_cv_applies_under_the_threshold_and_never_with_folds_0(cv, method, folds, reason):
    s = choose_selection(TrainConfig(cv=cv), "logreg", 16, labels(40, 40, 40), labels(14, 13, 13))
    assert (s.method, s.folds, s.reason, s.notice) == (method, folds, reason, False)
    assert s.n == (160 if method == "cv" else 40)


def test_on_the_val_split_the_model_is_fitted_on_train_alone(tmp_path, features):
    metrics, out = run_cell(tmp_path, features, cv={"when_val_under": 40})
    assert (metrics.selection, metrics.cv_folds, metrics.n_val, metrics.n_train) == (
        "val",
        None,
        40,
        121,
    )
    assert metrics.val_fold_accuracies is None and metrics.val_fold_std is None
    assert HeadRecord.read(out / "head.json", "-").fit_on == "train"
    assert joblib.load(out / "model.joblib")[0].n_samples_seen_ == 121


def test_the_saved_model_is_refit_on_train_and_val_and_test_is_read_only_to_score_it(
    tmp_path, features, monkeypatch
):
    events = []
    real_open, real_fit = cells.open_splits, crossval.fit_head

    def guarded_splits(*args, **kwargs):
        splits = real_open(*args, **kwargs)
        test, real_read = splits["test"], splits["test"].read

        def read(*a, **k):
            events.append("test read")
            return real_read(*a, **k)

        test.read = read
        return splits

    def fit_head(*args, **kwargs):
        assert "test read" not in events, "the test split was read before every fit was done"
        events.append(f"fit on {len(args[2].labels)}")
        return real_fit(*args, **kwargs)

    monkeypatch.setattr(cells, "open_splits", guarded_splits)
    monkeypatch.setattr(crossval, "fit_head", fit_head)
    metrics, out = run_cell(tmp_path, features)
    fits = [e for e in events if e.startswith("fit")]
    sizes = sorted(int(e.split()[-1]) for e in fits)  # the refit fits beside the folds
    assert len(sizes) == 5 + 1 and sizes[-1] == 161 and sizes[-2] < 161  # five folds, a refit
    assert (
        events[len(fits) :] == ["test read"] * (len(events) - len(fits)) and "test read" in events
    )

    record = HeadRecord.read(out / "head.json", "-")
    model = joblib.load(out / "model.joblib")
    assert record.fit_on == "train+val" and model[0].n_samples_seen_ == 161
    assert model[-1].n_features_in_ == 16
    assert (metrics.selection, metrics.cv_folds, metrics.n_val, metrics.n_train) == (
        "cv",
        5,
        161,
        161,
    )
    splits = open_splits(features)  # the test scores are the saved (refit) model's
    accuracy = np.mean(model.predict(splits["test"].read("a")) == splits["test"].labels)
    assert metrics.test_accuracy == pytest.approx(accuracy, abs=1e-6)


def test_pooled_out_of_fold_accuracy_is_the_fold_size_weighted_mean(tmp_path, features):
    metrics, _ = run_cell(tmp_path, features, logreg={"C": 0.5, "max_iter": 500})
    splits = open_splits(features)
    x = np.concatenate([splits["train"].read("a"), splits["val"].read("a")])
    y = np.concatenate([splits["train"].labels, splits["val"].labels])
    splitter = StratifiedKFold(5, shuffle=True, random_state=0)
    sizes = np.array([len(held) for _, held in splitter.split(x, y)])
    assert len(set(sizes)) > 1  # unequal folds: a plain mean would differ
    folds = np.array(metrics.val_fold_accuracies)
    assert metrics.val_accuracy == pytest.approx((folds * sizes).sum() / sizes.sum(), abs=2e-6)
    assert metrics.val_fold_std == pytest.approx(np.std(folds), abs=1e-6)

    reference = Pipeline(
        [("s", StandardScaler()), ("c", LogisticRegression(C=0.5, max_iter=500, random_state=0))]
    )
    predicted = cross_val_predict(reference, x, y, cv=splitter)
    correct = int(np.sum(predicted == y))
    assert metrics.val_accuracy == pytest.approx(correct / len(y), abs=1e-6)
    assert metrics.val_accuracy_ci95 == pytest.approx(wilson_interval(correct, len(y)), abs=1e-4)
    expected = [np.mean(predicted[held] == y[held]) for _, held in splitter.split(x, y)]
    np.testing.assert_allclose(folds, expected, atol=1e-6)


def test_a_small_class_means_fewer_folds_or_the_val_split():
    cfg = TrainConfig()
    fewer = choose_selection(cfg, "logreg", 16, labels(10, 10, 2), labels(3, 3, 1))
    assert (fewer.method, fewer.folds, fewer.n, fewer.notice) == ("cv", 3, 29, True)
    assert "3 folds, not 5: a class has 3 images" in fewer.note
    alone = choose_selection(cfg, "logreg", 16, labels(10, 10, 1), labels(3, 3, 0))
    assert (alone.method, alone.folds, alone.n, alone.notice) == ("val", None, 6, True)
    assert alone.note == (
        "the val split alone (6 images): the val split has 6 < 500 images, "
        "but a class has 1 image in train+val"
    )
    # three folds over a class of three: each held-out part has one of them, every row predicted
    y = labels(10, 10, 3)
    x = np.random.default_rng(0).normal(size=(len(y), 4)).astype(np.float32) + y[:, None]
    data = ArrayFeatures("a", x, y, ["p", "q", "r"])
    oof, _ = cross_validate("logreg", cfg, data, 3, Plan("memory", 64), None)
    assert [int(np.sum(y[held] == 2)) for held in oof.held_out] == [1, 1, 1]
    assert sorted(np.concatenate(oof.held_out)) == list(range(len(y)))
    assert (oof.predicted >= 0).all()


def test_a_layer_too_wide_for_the_memory_budget_is_ranked_on_the_val_split():
    s = choose_selection(
        TrainConfig(max_memory_mb=1), "logreg", 4096, labels(40, 40, 40), labels(14, 13, 13)
    )
    assert (s.method, s.notice) == ("val", True)
    assert "train+val (160 x 4096) would exceed train.max_memory_mb=1" in s.note


def test_stopping_split_holds_out_part_of_each_class_that_has_two():
    y = labels(10, 5, 2, 1)
    fit, stop = stopping_split(y, 5, seed=0)
    assert sorted(np.concatenate([fit, stop])) == list(range(len(y)))
    assert [int(np.sum(y[stop] == c)) for c in range(4)] == [2, 1, 1, 0]


def test_dense_early_stops_inside_the_fold_training_part_and_refits_the_mean_best_epoch(
    monkeypatch,
):
    calls, real_fit = [], crossval.fit_head

    def fit_head(head, cfg, train, val, layer, plan, log_dir, epochs=None):
        fitted = real_fit(head, cfg, train, val, layer, plan, log_dir, epochs)
        calls.append((train.x, None if val is None else val.x, epochs, fitted.epochs))
        return fitted

    monkeypatch.setattr(crossval, "fit_head", fit_head)
    y = labels(12, 12, 12)
    x = np.random.default_rng(1).normal(size=(len(y), 6)).astype(np.float32) + y[:, None]
    data = ArrayFeatures("a", x, y, ["p", "q", "r"])
    dense = {"hidden": [8], "epochs": 8, "patience": 2, "batch_size": 16, "learning_rate": 0.05}
    cfg = TrainConfig(dense=dense)
    plan = Plan("memory", 64)
    oof, _ = cross_validate("dense", cfg, data, 3, plan, None)
    rows = {row.tobytes(): i for i, row in enumerate(x)}
    for (fit_x, stop_x, _, _), held in zip(calls, oof.held_out):
        fitted_rows = {rows[r.tobytes()] for r in fit_x}
        stopping_rows = {rows[r.tobytes()] for r in stop_x}
        assert stopping_rows and not stopping_rows & fitted_rows
        assert not (fitted_rows | stopping_rows) & set(held.tolist())  # never the held-out part
    best = [c[3] for c in calls[:-1]]
    assert len(best) == 3 and all(1 <= b <= 8 for b in best)
    refit_x, refit_stop, refit_epochs, ran = calls[-1]
    assert refit_stop is None and len(refit_x) == len(y)
    assert refit_epochs == ran == max(1, round(float(np.mean(best))))
