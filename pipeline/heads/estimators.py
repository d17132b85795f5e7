"""The scikit-learn heads: a Pipeline with the scaler first, fitted in memory or streamed.

On the stream path (features/*.h5 read in row blocks, heads.blocks): the scaler is fitted by
`partial_fit`; logreg and linear_svm become an SGDClassifier (log_loss / hinge) trained by
`partial_fit` over shuffled blocks until the epoch loss stops improving (at most `max_iter`
epochs); knn and random_forest see a Gaussian random projection of the scaled features to
STREAM_COMPONENTS dims, built block by block.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import numpy as np

from pipeline.features.store import FeatureFile
from pipeline.heads.blocks import Plan, fit_scaler, read_rows, sequential, shuffled_blocks

if TYPE_CHECKING:
    from sklearn.linear_model import SGDClassifier
    from sklearn.pipeline import Pipeline

    from pipeline.selection.params import TrainConfig

STREAM_COMPONENTS = 256
SGD_TOL, SGD_NO_CHANGE = 1e-3, 5  # scikit-learn's SGD defaults


def _linear(head: str, cfg: TrainConfig, n_train: int, stream: bool):
    from sklearn.linear_model import LogisticRegression, SGDClassifier
    from sklearn.svm import LinearSVC

    c = getattr(cfg, head)
    if stream:  # alpha = 1 / (C n) is the SGD form of the same regularisation
        return SGDClassifier(
            loss="log_loss" if head == "logreg" else "hinge",
            alpha=1.0 / (c.C * n_train),
            max_iter=c.max_iter,
            tol=SGD_TOL,
            n_iter_no_change=SGD_NO_CHANGE,
            random_state=cfg.seed,
        )
    if head == "logreg":
        return LogisticRegression(C=c.C, max_iter=c.max_iter, random_state=cfg.seed)
    return LinearSVC(C=c.C, max_iter=c.max_iter, random_state=cfg.seed)


def _knn(head: str, cfg: TrainConfig, n_train: int, stream: bool):
    from sklearn.neighbors import KNeighborsClassifier

    return KNeighborsClassifier(n_neighbors=cfg.knn.n_neighbors, weights=cfg.knn.weights)


def _random_forest(head: str, cfg: TrainConfig, n_train: int, stream: bool):
    from sklearn.ensemble import RandomForestClassifier

    rf = cfg.random_forest
    return RandomForestClassifier(
        n_estimators=rf.n_estimators, max_depth=rf.max_depth, random_state=cfg.seed
    )


# head -> its classifier, from the train params, the training rows and the path
ESTIMATORS = {
    "logreg": _linear,
    "linear_svm": _linear,
    "knn": _knn,
    "random_forest": _random_forest,
}


def estimator(head: str, cfg: TrainConfig, n_train: int, stream: bool):
    return ESTIMATORS[head](head, cfg, n_train, stream)


def fit_sklearn(
    head: str, cfg: TrainConfig, train: FeatureFile, layer: str, plan: Plan
) -> Pipeline:
    from sklearn.linear_model import SGDClassifier
    from sklearn.pipeline import Pipeline
    from sklearn.preprocessing import StandardScaler
    from sklearn.random_projection import GaussianRandomProjection

    n = len(train.labels)
    clf = estimator(head, cfg, n, plan.path == "stream")
    if plan.path == "memory":
        return Pipeline([("scale", StandardScaler()), ("clf", clf)]).fit(
            train.read(layer), train.labels
        )
    scaler = fit_scaler(train, layer, plan)
    if isinstance(clf, SGDClassifier):
        _sgd_epochs(clf, scaler, train, layer, plan, np.random.default_rng(cfg.seed))
        return Pipeline([("scale", scaler), ("clf", clf)])
    width = train.widths[layer]
    project = GaussianRandomProjection(min(STREAM_COMPONENTS, width), random_state=cfg.seed)
    project.fit(np.zeros((1, width), np.float32))
    z = np.concatenate(
        [
            project.transform(scaler.transform(x))
            for x, _ in sequential(train, layer, plan.block_rows)
        ]
    )
    clf.fit(z, train.labels)
    return Pipeline([("scale", scaler), ("project", project), ("clf", clf)])


def _sgd_loss(clf: SGDClassifier, x: np.ndarray, y: np.ndarray) -> float:
    """Summed one-vs-rest loss of the current model on (x, y)."""
    f = clf.decision_function(x)
    if f.ndim == 1:
        f, target = f[:, None], (y == clf.classes_[1])[:, None]
    else:
        target = y[:, None] == clf.classes_[None, :]
    margin = np.where(target, f, -f)
    per = np.maximum(0.0, 1.0 - margin) if clf.loss == "hinge" else np.logaddexp(0.0, -margin)
    return float(per.sum())


def _sgd_epochs(clf, scaler, train: FeatureFile, layer: str, plan: Plan, rng) -> None:
    """partial_fit over shuffled blocks; stop when the progressive epoch loss stalls."""
    classes = np.unique(train.labels)
    best, stall, epochs = math.inf, 0, 0
    while epochs < clf.max_iter:
        epochs += 1
        total, rows = 0.0, 0
        for idx in shuffled_blocks(len(train.labels), plan.block_rows, rng):
            x, y = scaler.transform(read_rows(train, layer, idx)), train.labels[idx]
            if hasattr(clf, "coef_"):
                total, rows = total + _sgd_loss(clf, x, y), rows + len(y)
            clf.partial_fit(x, y, classes=classes)
        loss = total / rows if rows else math.inf
        stall = stall + 1 if loss > best - clf.tol else 0
        best = min(best, loss)
        if stall >= clf.n_iter_no_change:
            break
    print(f"  SGD stopped after {epochs} epoch(s), loss {best:.4f}")
