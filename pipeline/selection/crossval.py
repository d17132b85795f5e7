"""The selection estimate of a train cell when the val split is small: stratified k-fold
cross-validation over train+val (params `train.cv`).

The head (the same builders and params as every fit, through `heads.fit.fit_head`) is fitted
on each fold's training part and predicts the fold's held-out part; the pooled out-of-fold
predictions are what `selection.scoring.score` scores. The head is also refitted on all of
train+val: that refit is the cell's saved model. Nothing here reads the test split.
The dense head early-stops inside a fold on ~1/folds of that fold's training part (never its
held-out part); the refit runs the folds' mean best epoch count, without early stopping.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
from joblib import Parallel, delayed
from sklearn.model_selection import StratifiedKFold

from pipeline.heads.blocks import Plan
from pipeline.heads.fit import Fitted, fit_head, predict
from pipeline.heads.registry import get_head
from pipeline.selection.params import TrainConfig


@dataclass(frozen=True)
class Selection:
    """How a cell's selection estimate is made: "cv" (`folds`-fold over train+val) or "val"
    (the val split alone); `n` images are behind it; `reason` says why; `notice`: the params
    asked for something else (a fallback or fewer folds)."""

    method: Literal["val", "cv"]
    folds: int | None
    n: int
    reason: str
    notice: bool = False

    @property
    def note(self) -> str:
        if self.method == "cv":
            return f"{self.folds}-fold cross-validation over train+val ({self.n} images): {self.reason}"
        return f"the val split alone ({self.n} images): {self.reason}"


def cv_plan(cfg: TrainConfig, head: str, rows: int, width: int) -> Plan:
    """How train+val is read for cross-validation ('memory' or it is not cross-validated).
    The whole matrix stays in memory beside each fold's copy, hence the factor's + 1."""
    return Plan.for_matrix(rows, width, cfg.max_memory_mb, get_head(head).memory_factor + 1)


def choose_selection(
    cfg: TrainConfig, head: str, width: int, train_labels: np.ndarray, val_labels: np.ndarray
) -> Selection:
    """Cross-validation when train.cv asks for it and the data allow it, else the val split."""
    cv, n_val = cfg.cv, len(val_labels)
    if cv.folds == 0:
        return Selection("val", None, n_val, "train.cv.folds is 0")
    if n_val >= cv.when_val_under:
        return Selection(
            "val", None, n_val, f"the val split has {n_val} >= {cv.when_val_under} images"
        )
    labels = np.concatenate([train_labels, val_labels])
    n, why = len(labels), f"the val split has {n_val} < {cv.when_val_under} images"
    if cv_plan(cfg, head, n, width).path != "memory":
        return Selection(
            "val",
            None,
            n_val,
            f"{why}, but train+val ({n} x {width}) would exceed "
            f"train.max_memory_mb={cfg.max_memory_mb}",
            notice=True,
        )
    smallest = int(np.unique(labels, return_counts=True)[1].min())
    if smallest < 2:
        return Selection(
            "val", None, n_val, f"{why}, but a class has 1 image in train+val", notice=True
        )
    if smallest < cv.folds:
        reason = f"{why}; {smallest} folds, not {cv.folds}: a class has {smallest} images"
        return Selection("cv", smallest, n, reason, notice=True)
    return Selection("cv", cv.folds, n, why)


@dataclass(frozen=True)
class ArrayFeatures:
    """An in-memory stand-in for store.FeatureFile holding the rows of one layer."""

    layer: str
    x: np.ndarray
    labels: np.ndarray
    class_names: list[str]

    @property
    def widths(self) -> dict[str, int]:
        return {self.layer: int(self.x.shape[1])}

    def check_layer(self, layer: str) -> None:
        if layer != self.layer:
            raise ValueError(f"these rows are of layer {self.layer!r}, not {layer!r}")

    def read(self, layer: str, rows: slice = slice(None), dtype=np.float32) -> np.ndarray:
        self.check_layer(layer)
        return self.x[rows].astype(dtype, copy=False)

    def take(self, rows: np.ndarray) -> ArrayFeatures:
        return ArrayFeatures(self.layer, self.x[rows], self.labels[rows], self.class_names)


def train_and_val(train, val, layer: str) -> ArrayFeatures:
    """The train and val rows of `layer`, in memory (float32)."""
    x = np.concatenate([train.read(layer), val.read(layer)])
    return ArrayFeatures(layer, x, np.concatenate([train.labels, val.labels]), train.class_names)


def stopping_split(labels: np.ndarray, folds: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(rows to fit, rows for early stopping): 1/folds of each class, at least one image of
    every class that has two, held out for early stopping."""
    rng = np.random.default_rng(seed)
    stop = []
    for c in np.unique(labels):
        rows = rng.permutation(np.flatnonzero(labels == c))
        if len(rows) >= 2:
            stop.append(rows[: max(1, len(rows) // folds)])
    stop = np.sort(np.concatenate(stop)) if stop else np.zeros(0, np.int64)
    return np.setdiff1d(np.arange(len(labels)), stop), stop


@dataclass(frozen=True)
class OutOfFold:
    """Out-of-fold predictions: `predicted[i]` by the fold model that never saw row i."""

    labels: np.ndarray
    predicted: np.ndarray
    held_out: list[np.ndarray]  # rows of each fold's held-out part

    def fold_accuracies(self) -> list[float]:
        return [
            round(float(np.mean(self.predicted[r] == self.labels[r])), 6) for r in self.held_out
        ]


def cross_validate(
    head: str, cfg: TrainConfig, data: ArrayFeatures, folds: int, plan: Plan, log_dir: Path | None
) -> tuple[OutOfFold, Fitted]:
    """StratifiedKFold(folds, shuffle=True, random_state=train.seed) over `data`, and the head
    refitted on all of `data` (dense: the folds' mean best epoch, no early stopping)."""
    splitter = StratifiedKFold(folds, shuffle=True, random_state=cfg.seed)
    y = data.labels
    splits = list(splitter.split(np.zeros(len(y)), y))

    def fold(rows: tuple[np.ndarray, np.ndarray]) -> tuple[np.ndarray, int | None]:
        fitted = _fit_fold(head, cfg, data.take(rows[0]), folds, plan)
        part = data.take(rows[1])
        return predict(
            fitted.model, get_head(head).kind, part, part.layer, plan.block_rows
        ), fitted.epochs

    def whole(epochs: int | None = None) -> Fitted:
        return fit_head(head, cfg, data, None, data.layer, plan, log_dir, epochs)

    if get_head(head).kind == "keras":  # runs on all cores already; the refit needs their epochs
        results = [fold(rows) for rows in splits]
        epochs = [e for _, e in results]
        fitted = whole(max(1, round(float(np.mean(epochs)))))
    else:  # scikit-learn's solvers release the GIL: folds and refit fit side by side on threads
        workers = min(folds + 1, os.cpu_count() or 1)
        *results, fitted = Parallel(n_jobs=workers, prefer="threads")(
            [delayed(fold)(rows) for rows in splits] + [delayed(whole)()]
        )
    predicted = np.full(len(y), -1, np.int64)
    for (_, held_rows), (fold_predicted, _) in zip(splits, results):
        predicted[held_rows] = fold_predicted
    oof = OutOfFold(y, predicted, [rows for _, rows in splits])
    print(f"  {folds} folds, accuracy per fold: {', '.join(map(str, oof.fold_accuracies()))}")
    return oof, fitted


def _fit_fold(head: str, cfg: TrainConfig, part: ArrayFeatures, folds: int, plan: Plan) -> Fitted:
    if get_head(head).kind != "keras":
        return fit_head(head, cfg, part, None, part.layer, plan, None)
    fit_rows, stop_rows = stopping_split(part.labels, folds, cfg.seed)
    return fit_head(head, cfg, part.take(fit_rows), part.take(stop_rows), part.layer, plan, None)
