"""The Keras head: Normalization -> [Dense relu -> Dropout]* -> Dense softmax, early-stopped on
validation loss, fitted from memory or from HDF5 batches; curves logged by DVCLive."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from pipeline.features.store import FeatureFile
from pipeline.heads.batches import row_batches
from pipeline.heads.blocks import Plan, fit_scaler, read_rows, shuffled_blocks
from pipeline.heads.fit import Fitted
from pipeline.heads.registry import DenseConfig

if TYPE_CHECKING:
    from pipeline.selection.params import TrainConfig


def build_dense(
    width: int, n_classes: int, cfg: DenseConfig, mean: np.ndarray, variance: np.ndarray
):
    """Normalization (given statistics) -> [Dense relu -> Dropout]* -> Dense softmax."""
    import keras

    inputs = keras.Input((width,), name="features")
    x = keras.layers.Normalization(mean=mean, variance=variance, name="normalize")(inputs)
    for units in cfg.hidden:
        x = keras.layers.Dense(units, activation="relu")(x)
        x = keras.layers.Dropout(cfg.dropout)(x)
    outputs = keras.layers.Dense(n_classes, activation="softmax", name="probabilities")(x)
    model = keras.Model(inputs, outputs, name="dense_head")
    model.compile(
        optimizer=keras.optimizers.Adam(cfg.learning_rate),
        loss="sparse_categorical_crossentropy",
        metrics=["accuracy"],
    )
    return model


def _batches(ff: FeatureFile, layer: str, plan: Plan, batch_size: int, seed: int | None):
    """(x, y) batches read from HDF5 a block at a time; shuffled per epoch if seeded."""
    rng = None if seed is None else np.random.default_rng(seed)
    n = len(ff.labels)

    def blocks():
        if rng is None:
            return [np.arange(s, min(s + plan.block_rows, n)) for s in range(0, n, plan.block_rows)]
        return shuffled_blocks(n, plan.block_rows, rng, multiple=batch_size)

    return row_batches(lambda rows: read_rows(ff, layer, rows), ff.labels, batch_size, blocks)


def fit_dense(
    cfg: TrainConfig,
    train: FeatureFile,
    val: FeatureFile | None,
    layer: str,
    plan: Plan,
    log_dir: Path | None,
    epochs: int | None = None,
) -> Fitted:
    """Train the dense head with early stopping on `val` loss (best weights kept); without
    `val`, for `epochs` epochs (default dense.epochs). Curves logged by DVCLive to `log_dir`."""
    import keras

    keras.utils.set_random_seed(cfg.seed)
    d = cfg.dense
    if plan.path == "memory":
        x = train.read(layer)
        mean, variance = x.mean(axis=0), x.var(axis=0)
    else:
        scaler = fit_scaler(train, layer, plan)
        mean, variance = scaler.mean_, scaler.var_
    model = build_dense(train.widths[layer], len(train.class_names), d, mean, variance)
    if plan.path == "memory":
        data = {"x": x, "y": train.labels, "batch_size": d.batch_size}
        if val is not None:
            data["validation_data"] = (val.read(layer), val.labels)
    else:
        data = {"x": _batches(train, layer, plan, d.batch_size, cfg.seed), "shuffle": False}
        if val is not None:
            data["validation_data"] = _batches(val, layer, plan, d.batch_size, None)
    callbacks = [] if log_dir is None else [_live_logger(log_dir)]
    if val is None:
        history = model.fit(**data, epochs=epochs or d.epochs, callbacks=callbacks, verbose=0)
        ran = len(history.history["loss"])
        print(f"  dense: {ran} epoch(s), no early stopping")
        return Fitted(model, ran)
    stop = keras.callbacks.EarlyStopping("val_loss", patience=d.patience, restore_best_weights=True)
    history = model.fit(**data, epochs=d.epochs, callbacks=[stop, *callbacks], verbose=0)
    ran = len(history.history["loss"])
    best = int(np.argmin(history.history["val_loss"])) + 1
    print(
        f"  dense: {ran} epoch(s), best val_loss at epoch {best}"
        + (" (early stop)" if ran < d.epochs else "")
    )
    return Fitted(model, best)


def _live_logger(log_dir: Path):
    """A backend-agnostic Keras callback writing each epoch's logs to a DVCLive `Live` in
    `log_dir` (dvclive.keras subclasses tf.keras, so it works on the TensorFlow backend only)."""
    import keras
    from dvclive import Live

    live = Live(str(log_dir), save_dvc_exp=False, dvcyaml=None, report=None)

    class LiveLogger(keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            for name, value in (logs or {}).items():
                split = "eval" if name.startswith("val_") else "train"
                live.log_metric(f"{split}/{name.removeprefix('val_')}", float(value))
            live.next_step()

        def on_train_end(self, logs=None):
            live.end()

    return LiveLogger()
