"""Fitting a head of the registry on one cached layer, and its predictions, block by block."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from pipeline.features.store import FeatureFile
from pipeline.heads.blocks import Plan, sequential
from pipeline.heads.registry import get_head

if TYPE_CHECKING:
    from pipeline.selection.params import TrainConfig


@dataclass(frozen=True)
class Fitted:
    """A fitted head; `epochs`: the dense head's best (or only) epoch count, else None."""

    model: object
    epochs: int | None = None


def fit_head(
    head: str,
    cfg: TrainConfig,
    train: FeatureFile,
    val: FeatureFile | None,
    layer: str,
    plan: Plan,
    log_dir: Path | None,
    epochs: int | None = None,
) -> Fitted:
    """Fit `head` on `train`; `val` (early stopping), `log_dir` and `epochs` concern the
    Keras head only (heads.dense.fit_dense)."""
    if get_head(head).kind == "keras":
        from pipeline.heads.dense import fit_dense

        return fit_dense(cfg, train, val, layer, plan, log_dir, epochs)
    from pipeline.heads.estimators import fit_sklearn

    return Fitted(fit_sklearn(head, cfg, train, layer, plan))


def keras_probabilities(model, x: np.ndarray, batch_rows: int = 256) -> np.ndarray:
    """`model` called on `x` batch by batch, eagerly: `model.predict` traces a function for
    every new model, and TensorFlow warns about retracing after a few of them."""
    from keras import ops

    parts = [
        ops.convert_to_numpy(model(x[i : i + batch_rows], training=False))
        for i in range(0, len(x), batch_rows)
    ]
    return np.concatenate(parts) if parts else np.zeros((0, model.output_shape[-1]), np.float32)


def predict(model, kind: str, ff: FeatureFile, layer: str, block_rows: int) -> np.ndarray:
    """Class indices for every row of `ff`, block by block."""
    out = []
    for x, _ in sequential(ff, layer, block_rows):
        if kind == "keras":
            out.append(np.argmax(keras_probabilities(model, x), axis=1))
        else:
            out.append(model.predict(x))
    return np.concatenate(out).astype(np.int64) if out else np.zeros(0, np.int64)
