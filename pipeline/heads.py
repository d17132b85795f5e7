"""Heads on cached features: scikit-learn Pipelines (scaler first) and a small Keras dense head.

Two paths, chosen by the memory a head would need against `train.max_memory_mb`:
- memory: the layer is read whole as float32 and fitted the usual way (when the float32
  matrix times the head's MEMORY_FACTOR fits the budget);
- stream: row blocks are read from HDF5. The scaler is fitted by `partial_fit`; logreg and
  linear_svm become an SGDClassifier (log_loss / hinge) trained by `partial_fit` over shuffled
  blocks until the epoch loss stops improving (at most `max_iter` epochs); knn and
  random_forest see a Gaussian random projection of the scaled features to
  `STREAM_COMPONENTS` dims, built block by block; the dense head reads batches.
Keras is imported only for the dense head.
"""

from __future__ import annotations

import hashlib
import io
import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import joblib
import numpy as np

from pipeline.config import DenseConfig, TrainConfig
from pipeline.provenance import require
from pipeline.records import HeadRecord, RecordError
from pipeline.store import FeatureFile

if TYPE_CHECKING:  # scikit-learn is imported where it is used: reading heads does not need it
    from sklearn.linear_model import SGDClassifier
    from sklearn.pipeline import Pipeline
    from sklearn.preprocessing import StandardScaler

MODEL_FILES = {"sklearn": "model.joblib", "keras": "model.keras"}
STREAM_COMPONENTS = 256
MIN_BLOCK_ROWS = 64
# Peak memory of the memory path over the float32 matrix size (measured on 3000 x 25088:
# ~3.3x; LinearSVC ~8x, liblinear copies the data into its own float64 format).
# Heads that are Keras layers or an affine map of the features: fine-tuning can start from them.
KERAS_EXPRESSIBLE = ("logreg", "linear_svm", "dense")
MEMORY_FACTOR = {"logreg": 4, "linear_svm": 9, "knn": 4, "random_forest": 4, "dense": 4}
# A streamed block lives in ~5 copies at once (float16, float32, reordered, scaled); 8 leaves room.
BLOCK_COPIES = 8
PIECES_PER_BLOCK = 8  # a shuffled block joins this many contiguous pieces from random places
SGD_TOL, SGD_NO_CHANGE = 1e-3, 5  # scikit-learn's SGD defaults


def kind_of(head: str) -> str:
    return "keras" if head == "dense" else "sklearn"


@dataclass(frozen=True)
class Plan:
    """How a layer is read: 'memory' or 'stream', and rows per block (bounded by the budget)."""

    path: str
    block_rows: int

    @classmethod
    def for_matrix(cls, rows: int, width: int, max_memory_mb: int, factor: float = 1) -> Plan:
        """'memory' when `factor` x the float32 matrix fits in `max_memory_mb`."""
        budget = max_memory_mb * 2**20
        path = "memory" if rows * width * 4 * factor <= budget else "stream"
        return cls(path, max(MIN_BLOCK_ROWS, budget // (4 * width * BLOCK_COPIES)))


@dataclass(frozen=True)
class Fitted:
    """A fitted head; `epochs`: the dense head's best (or only) epoch count, else None."""

    model: object
    epochs: int | None = None


def sequential(
    ff: FeatureFile, layer: str, block_rows: int
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Consecutive (float32 rows, labels) blocks."""
    for start in range(0, len(ff.labels), block_rows):
        rows = slice(start, start + block_rows)
        yield ff.read(layer, rows), ff.labels[rows]


def shuffled_blocks(
    n: int, block_rows: int, rng: np.random.Generator, multiple: int = 1
) -> list[np.ndarray]:
    """Row indices of each block for one epoch: contiguous pieces (a multiple of `multiple`
    rows) in random order, up to PIECES_PER_BLOCK per block, rows shuffled within each block.
    Mixes classes even when the file is sorted by class, while reads stay contiguous."""
    piece = max(multiple, block_rows // PIECES_PER_BLOCK // multiple * multiple)
    per_block = max(1, block_rows // piece)
    starts = rng.permutation(np.arange(0, n, piece))
    blocks = []
    for i in range(0, len(starts), per_block):
        rows = np.concatenate([np.arange(s, min(s + piece, n)) for s in starts[i : i + per_block]])
        blocks.append(rng.permutation(rows))
    return blocks


def read_rows(ff: FeatureFile, layer: str, rows: np.ndarray) -> np.ndarray:
    """Rows in the given order, read as contiguous runs."""
    order = np.argsort(rows, kind="stable")
    ordered = rows[order]
    cuts = np.flatnonzero(np.diff(ordered) != 1) + 1
    runs = np.split(ordered, cuts)
    block = np.concatenate([ff.read(layer, slice(int(r[0]), int(r[-1]) + 1)) for r in runs])
    out = np.empty_like(block)
    out[order] = block
    return out


def fit_scaler(ff: FeatureFile, layer: str, plan: Plan) -> StandardScaler:
    from sklearn.preprocessing import StandardScaler

    scaler = StandardScaler()
    for x, _ in sequential(ff, layer, plan.block_rows):
        scaler.partial_fit(x)
    return scaler


# ---------------------------------------------------------------- scikit-learn


def _classifier(head: str, cfg: TrainConfig, n_train: int, stream: bool):
    from sklearn.ensemble import RandomForestClassifier
    from sklearn.linear_model import LogisticRegression, SGDClassifier
    from sklearn.neighbors import KNeighborsClassifier
    from sklearn.svm import LinearSVC

    seed = cfg.seed
    if head in ("logreg", "linear_svm"):
        c = getattr(cfg, head)
        if stream:  # alpha = 1 / (C n) is the SGD form of the same regularisation
            loss = "log_loss" if head == "logreg" else "hinge"
            return SGDClassifier(
                loss=loss,
                alpha=1.0 / (c.C * n_train),
                max_iter=c.max_iter,
                tol=SGD_TOL,
                n_iter_no_change=SGD_NO_CHANGE,
                random_state=seed,
            )
        if head == "logreg":
            return LogisticRegression(C=c.C, max_iter=c.max_iter, random_state=seed)
        return LinearSVC(C=c.C, max_iter=c.max_iter, random_state=seed)
    if head == "knn":
        return KNeighborsClassifier(n_neighbors=cfg.knn.n_neighbors, weights=cfg.knn.weights)
    if head == "random_forest":
        rf = cfg.random_forest
        return RandomForestClassifier(
            n_estimators=rf.n_estimators, max_depth=rf.max_depth, random_state=seed
        )
    raise ValueError(
        f"head must be one of logreg, linear_svm, knn, random_forest, dense; got {head!r}"
    )


def fit_sklearn(
    head: str, cfg: TrainConfig, train: FeatureFile, layer: str, plan: Plan
) -> Pipeline:
    from sklearn.linear_model import SGDClassifier
    from sklearn.pipeline import Pipeline
    from sklearn.preprocessing import StandardScaler
    from sklearn.random_projection import GaussianRandomProjection

    n = len(train.labels)
    clf = _classifier(head, cfg, n, plan.path == "stream")
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


# ---------------------------------------------------------------- Keras


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
    from pipeline.batches import row_batches

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


# ---------------------------------------------------------------- saved heads


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
    dense head only (see fit_dense)."""
    if head == "dense":
        return fit_dense(cfg, train, val, layer, plan, log_dir, epochs)
    return Fitted(fit_sklearn(head, cfg, train, layer, plan))


def save_model(model, kind: str, directory: Path) -> str:
    name = MODEL_FILES[kind]
    if kind == "keras":
        model.save(directory / name)
    else:
        joblib.dump(model, directory / name)
    return name


def read_head(
    directory: str | Path, expect: dict | None = None, model_sha256: str | None = None
) -> HeadRecord:
    """head.json of a trained head, refused unless its fields match `expect` (params, code,
    features) and it records `model_sha256`, when given. The model file itself is checked by
    `verify_model` or `load_head`."""
    directory = Path(directory)
    record = HeadRecord.read(directory / "head.json", "dvc repro train")
    if expect:
        require(
            str(directory / "head.json"), record.model_dump(mode="json"), expect, "dvc repro train"
        )
    if model_sha256 is not None and model_sha256 != record.model_sha256:
        raise RecordError(
            f"{directory / 'head.json'} records model sha256 {record.model_sha256[:12]}..., "
            f"the selection recorded {model_sha256[:12]}...: run `dvc repro train select`"
        )
    return record


def verify_model(directory: str | Path, record: HeadRecord) -> bytes:
    """The model file's bytes, refused unless they have the sha256 head.json records."""
    path = Path(directory) / record.model
    if not path.is_file():
        raise RecordError(f"{path} is missing: run `dvc repro train`")
    data = path.read_bytes()
    if hashlib.sha256(data).hexdigest() != record.model_sha256:
        raise RecordError(
            f"{path} is not the model its head.json records (sha256 differs): it was replaced "
            "or damaged, and is not loaded; run `dvc repro train --force`"
        )
    return data


def load_head(directory: str | Path, record: HeadRecord):
    """The trained model, deserialised only after its bytes match the recorded sha256."""
    data = verify_model(directory, record)
    if record.kind == "keras":
        import keras

        return keras.models.load_model(Path(directory) / record.model)
    return joblib.load(io.BytesIO(data))


def predict(model, kind: str, ff: FeatureFile, layer: str, block_rows: int) -> np.ndarray:
    """Class indices for every row of `ff`, block by block."""
    out = []
    for x, _ in sequential(ff, layer, block_rows):
        if kind == "keras":
            out.append(np.argmax(model.predict(x, batch_size=256, verbose=0), axis=1))
        else:
            out.append(model.predict(x))
    return np.concatenate(out).astype(np.int64) if out else np.zeros(0, np.int64)
