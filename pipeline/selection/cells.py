"""Train one head on every chosen cached layer: per layer (a cell) fit, save and score it."""

from __future__ import annotations

import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np

from pipeline.features.store import FeatureFile, open_splits
from pipeline.heads.blocks import Plan
from pipeline.heads.fit import fit_head, predict
from pipeline.heads.registry import get_head
from pipeline.heads.saved import expected_head, save_model
from pipeline.project.errors import InputError
from pipeline.project.layout import HEAD_RECORD, Layout
from pipeline.project.records import CellMetrics, HeadListing, HeadRecord, file_sha256
from pipeline.selection.crossval import (
    Selection,
    choose_selection,
    cross_validate,
    cv_plan,
    train_and_val,
)
from pipeline.selection.params import TrainConfig
from pipeline.selection.scoring import Scores, score


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
        len(train.labels), train.widths[layer], cfg.max_memory_mb, get_head(head).memory_factor
    )
    print(f"  {len(train.labels)} x {train.widths[layer]} features, {plan.path} path")
    model = fit_head(head, cfg, train, val, layer, plan, log_dir).model
    predicted = predict(model, get_head(head).kind, val, layer, plan.block_rows)
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
    layer: str, head: str, cfg: TrainConfig, expect: dict | None, layout: Layout = Layout()
) -> CellMetrics:
    """Train `head` on `layer` of the features (refused unless they match `expect`); write the
    cell's folder (model + head.json) and its metrics.

    The selection estimate comes from cross-validation over train+val or from the val split
    (crossval.choose_selection); the test split is read only to score the saved model.
    fit_seconds covers reading the training rows and fitting, the folds included."""
    splits = open_splits(layout, expect)
    train, val, test = splits["train"], splits["val"], splits["test"]
    train.check_layer(layer)
    kind = get_head(head).kind
    provenance = expected_head(layer, head, cfg, train.fingerprint)
    out = layout.cell_dir(layer, head)
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    width = train.widths[layer]
    selection = choose_selection(cfg, head, width, train.labels, val.labels)
    print(
        ("NOTE: " if selection.notice else "")
        + f"{provenance['cell']}: selection by {selection.note}"
    )

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
        **provenance,
        model=model_file,
        model_sha256=file_sha256(out / model_file),
        reduction=train.fingerprint.layers[layer],
        feature_width=width,
        class_names=train.class_names,
        fit_path=fit.plan.path,
        fit_on=fit.fit_on,
    )
    record.write(out / HEAD_RECORD)
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
    result.write(layout.cell_metrics(layer, head))
    print(f"{record.cell}: {_summary(result)}, fit {fit_seconds:.2f} s")
    return result


def is_listed(head: str, cfg: TrainConfig, layout: Layout = Layout()) -> bool:
    """Whether train.heads lists `head`, as scan last recorded it for DVC; a run after the list
    changed without scan (by hand, or `dvc repro -f -s`) is refused: DVC's record would lie."""
    listed = head in cfg.heads
    if HeadListing.read(layout.head_listing(head), "dvc repro scan").listed != listed:
        raise InputError(
            f"train.heads {'lists' if listed else 'no longer lists'} {head} since scan ran: "
            f"run `dvc repro train@{head}` (scan first, not -s)"
        )
    return listed


def clear_head(head: str, layout: Layout = Layout()) -> None:
    for root in (layout.heads, layout.train_metrics):
        shutil.rmtree(root / head, ignore_errors=True)


def skip_head(head: str, layout: Layout = Layout()) -> None:
    """The outputs of a head train.heads does not list: a note in each of its folders."""
    clear_head(head, layout)
    for note in layout.not_listed(head):
        note.parent.mkdir(parents=True)
        note.write_text(f"{head} is not in train.heads: nothing trained\n")


def train_head(
    head: str, cfg: TrainConfig, expect: dict | None, layout: Layout = Layout()
) -> list[CellMetrics]:
    """Train `head` on each of train.layers (null: every extracted layer); the head's folders
    hold these cells and nothing else."""
    layers = cfg.layers_of(open_splits(layout, expect)["train"].fingerprint.layers)
    clear_head(head, layout)
    return [train_cell(layer, head, cfg, expect, layout) for layer in layers]


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
