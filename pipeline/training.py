"""Train one head on every chosen cached layer: per layer (a cell) fit, save and score it."""

from __future__ import annotations

import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np

from pipeline import paths
from pipeline.config import TrainConfig
from pipeline.crossval import (
    Selection,
    choose_selection,
    cross_validate,
    cv_plan,
    train_and_val,
)
from pipeline.heads import MEMORY_FACTOR, Plan, fit_head, kind_of, predict, save_model
from pipeline.provenance import code_digest, head_params
from pipeline.records import CellMetrics, HeadRecord, file_sha256
from pipeline.scoring import Scores, score
from pipeline.store import FeatureFile, open_splits


@dataclass(frozen=True)
class Fit:
    """The cell's saved model, how it was read and fitted, and its selection estimate."""

    model: object
    plan: Plan
    fit_on: Literal["train", "train+val"]
    n_fit: int
    estimate: Scores
    fold_accuracies: list[float] | None


def fit_on_train(
    head: str, cfg: TrainConfig, train: FeatureFile, val: FeatureFile, layer: str, log_dir: Path
) -> Fit:
    """Fit on the train split; the estimate is the score on the val split."""
    plan = Plan.for_matrix(
        len(train.labels), train.widths[layer], cfg.max_memory_mb, MEMORY_FACTOR[head]
    )
    print(f"  {len(train.labels)} x {train.widths[layer]} features, {plan.path} path")
    model = fit_head(head, cfg, train, val, layer, plan, log_dir).model
    predicted = predict(model, kind_of(head), val, layer, plan.block_rows)
    estimate = score(val.labels, predicted, len(train.class_names))
    return Fit(model, plan, "train", len(train.labels), estimate, None)


def fit_by_cv(
    head: str,
    cfg: TrainConfig,
    train: FeatureFile,
    val: FeatureFile,
    layer: str,
    folds: int,
    log_dir: Path,
) -> Fit:
    """Cross-validate over train+val for the estimate, then refit on all of it."""
    data = train_and_val(train, val, layer)
    plan = cv_plan(cfg, head, len(data.labels), data.x.shape[1])
    print(f"  {len(data.labels)} x {data.x.shape[1]} features (train+val), {plan.path} path")
    oof, fitted = cross_validate(head, cfg, data, folds, plan, log_dir)
    estimate = score(oof.labels, oof.predicted, len(data.class_names))
    return Fit(fitted.model, plan, "train+val", len(data.labels), estimate, oof.fold_accuracies())


def train_cell(
    layer: str,
    head: str,
    cfg: TrainConfig,
    expect: dict | None,
    features: Path = paths.FEATURES,
    models: Path = paths.HEADS,
    metrics: Path = paths.TRAIN_METRICS,
) -> CellMetrics:
    """Train `head` on `layer` of the features (refused unless they match `expect`); write the
    model directory (model + head.json) and the cell's metrics (paths.cell_dir, cell_metrics).

    The selection estimate comes from cross-validation over train+val or from the val split
    (crossval.choose_selection); the test split is read only to score the saved model.
    fit_seconds covers reading the training rows and fitting, the folds included."""
    splits = open_splits(features, expect)
    train, val, test = splits["train"], splits["val"], splits["test"]
    train.check_layer(layer)
    cell, kind = paths.cell(layer, head), kind_of(head)
    out = paths.cell_dir(models, layer, head)
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    width = train.widths[layer]
    selection = choose_selection(cfg, head, width, train.labels, val.labels)
    print(("NOTE: " if selection.notice else "") + f"{cell}: selection by {selection.note}")

    start = time.perf_counter()
    if selection.method == "cv":
        fit = fit_by_cv(head, cfg, train, val, layer, selection.folds, out / "live")
    else:
        fit = fit_on_train(head, cfg, train, val, layer, out / "live")
    fit_seconds = time.perf_counter() - start

    tested = score(
        test.labels,
        predict(fit.model, kind, test, layer, fit.plan.block_rows),
        len(train.class_names),
    )
    model_file = save_model(fit.model, kind, out)
    record = HeadRecord(
        cell=cell,
        layer=layer,
        head=head,
        kind=kind,
        model=model_file,
        model_sha256=file_sha256(out / model_file),
        params=head_params(cfg, head),
        features=train.fingerprint,
        reduction=train.fingerprint.layers[layer],
        feature_width=width,
        class_names=train.class_names,
        fit_path=fit.plan.path,
        fit_on=fit.fit_on,
        code=code_digest("train"),
    )
    record.write(out / "head.json")
    result = CellMetrics(
        layer=layer,
        head=head,
        backbone=train.fingerprint.backbone["name"],
        weights=train.fingerprint.weights_used,
        feature_width=width,
        fit_path=fit.plan.path,
        n_train=fit.n_fit,
        **_selection_fields(selection, fit),
        test_accuracy=tested.accuracy,
        test_accuracy_ci95=tested.accuracy_ci95,
        test_macro_f1=tested.macro_f1,
        fit_seconds=round(fit_seconds, 3),
        model_sha256=record.model_sha256,
    )
    result.write(paths.cell_metrics(metrics, layer, head))
    print(f"{cell}: {_summary(result)}, fit {fit_seconds:.2f} s")
    return result


def train_head(
    head: str,
    layers: list[str],
    cfg: TrainConfig,
    expect: dict | None,
    features: Path = paths.FEATURES,
    models: Path = paths.HEADS,
    metrics: Path = paths.TRAIN_METRICS,
) -> list[CellMetrics]:
    """Train `head` on each of `layers`; the head's folders hold these cells and nothing else."""
    for root in (models, metrics):
        shutil.rmtree(Path(root) / head, ignore_errors=True)
    return [train_cell(layer, head, cfg, expect, features, models, metrics) for layer in layers]


def _selection_fields(selection: Selection, fit: Fit) -> dict:
    folds = fit.fold_accuracies
    return {
        "selection": selection.method,
        "selection_note": selection.note,
        "cv_folds": selection.folds,
        "n_val": fit.estimate.n,
        "val_accuracy": fit.estimate.accuracy,
        "val_accuracy_ci95": fit.estimate.accuracy_ci95,
        "val_macro_f1": fit.estimate.macro_f1,
        "val_fold_accuracies": folds,
        "val_fold_std": None if folds is None else round(float(np.std(folds)), 6),
    }


def _summary(m: CellMetrics) -> str:
    low, high = m.val_accuracy_ci95
    spread = f", fold std {m.val_fold_std:.4f}" if m.val_fold_std is not None else ""
    return (
        f"{m.selection} accuracy {m.val_accuracy:.4f} [{low:.3f}, {high:.3f}]{spread}, "
        f"test accuracy {m.test_accuracy:.4f}"
    )
