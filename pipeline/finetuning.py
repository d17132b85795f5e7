"""Fine-tuning that starts from the best frozen head.

One Keras model: uint8 images -> the backbone's preprocessing -> the backbone up to the best
head's layer -> the reduction extract applied -> the head, initialised from the trained head:

- a linear scikit-learn head (scaler [-> PCA] -> logistic regression / linear SVM / SGD) is
  an affine map of the features, so it becomes one Dense layer with every step folded into
  its kernel and bias; its logits equal the pipeline's decision function;
- a Keras head is loaded with its trained weights;
- any other head (kNN, random forest) cannot be written as Keras layers: the best head of the
  ranking that can is used instead, and the report says so.

Backbone layers from `unfreeze` upward train, everything below stays frozen, and every
BatchNormalization layer is made non-trainable, which in Keras 3 is what keeps it in inference
mode: a `training=False` passed when calling the backbone inside a functional model is
overridden by `fit`'s `training=True`. The state before training is a candidate of early
stopping, so the result is never worse on validation than the head it started from.

Keras and scikit-learn are imported lazily: the disabled path never loads TensorFlow.
"""

from __future__ import annotations

import csv
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from pipeline import paths as layout
from pipeline.config import FinetuneConfig, Params
from pipeline.precision import use_precision
from pipeline.records import BestChoice, HeadRecord

MODEL_FILE = "model.keras"
STATUS_FILE = "status.json"
HISTORY_FILE = "history.csv"
CURVES_FILE = "curves.png"
HISTORY_FIELDS = ("epoch", "loss", "accuracy", "val_loss", "val_accuracy")
SEED = 0
MISSING_CLASS_BIAS = -1.0e4  # a class the head never saw: never predicted


class FinetuneError(ValueError):
    """Fine-tuning cannot start: the message says what is wrong and what to change or re-run."""


class NotExpressible(ValueError):
    """A head that cannot be written as Keras layers (the message says why)."""


@dataclass(frozen=True)
class Paths:
    """Where the stage reads and writes (the DVC layout by default)."""

    scan: Path = layout.SCAN
    prepared: Path = layout.PREPARED
    best: Path = layout.BEST
    heads: Path = layout.HEADS
    out: Path = Path("models/finetuned")
    metrics: Path = Path("metrics/finetune.json")
    plots: Path = Path("plots/finetune")


def _write_json(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2) + "\n")


def write_history(path: Path, rows: list[dict]) -> None:
    """Learning curves as CSV for `dvc plots` (epoch 0 is the state before training)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, HISTORY_FIELDS, extrasaction="ignore")
        writer.writeheader()
        for row in rows:
            writer.writerow(
                {k: (row[k] if k == "epoch" else f"{row[k]:.6g}") for k in HISTORY_FIELDS}
            )


def write_disabled(paths: Paths) -> dict:
    """finetune.enabled is false: write the stage's outputs as small stubs, in milliseconds."""
    report = {
        "enabled": False,
        "reason": "finetune.enabled is false; enable it with `dvc exp run -S finetune.enabled=true`",
    }
    paths.out.mkdir(parents=True, exist_ok=True)
    for stale in (paths.out / MODEL_FILE, paths.plots / CURVES_FILE):
        stale.unlink(missing_ok=True)
    _write_json(paths.out / STATUS_FILE, report)
    write_history(paths.plots / HISTORY_FILE, [])
    _write_json(paths.metrics, report)
    return report


# ---------------------------------------------------------------- heads


@dataclass
class HeadSpec:
    """One trained head: its folder under models/heads/ and its checked head.json."""

    cell: str
    directory: Path
    record: HeadRecord

    @property
    def layer(self) -> str:
        return self.record.layer

    @property
    def kind(self) -> str:
        return self.record.kind


def _affine_step(name: str, step) -> tuple:
    """(A, c) with step.transform(x) == x @ A + c; A is a vector when the map is diagonal."""
    from sklearn.decomposition import PCA, IncrementalPCA
    from sklearn.preprocessing import StandardScaler

    if isinstance(step, StandardScaler):
        width = step.n_features_in_
        scale = step.scale_ if step.with_std and step.scale_ is not None else np.ones(width)
        mean = step.mean_ if step.with_mean and step.mean_ is not None else np.zeros(width)
        return 1.0 / scale, -mean / scale
    if isinstance(step, (PCA, IncrementalPCA)):
        a = np.asarray(step.components_, np.float64).T  # (d, p)
        c = -np.asarray(step.mean_, np.float64) @ a
        if step.whiten:
            std = np.sqrt(step.explained_variance_)
            a, c = a / std, c / std
        return a, c
    raise NotExpressible(f"step {name!r} ({type(step).__name__}) is not an affine map")


def linear_head_weights(pipeline, n_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """Kernel (d, n_classes) and bias whose logits equal the pipeline's decision function.

    Binary heads get logits [0, f]: their softmax is the logistic regression's predict_proba.
    A multinomial logistic regression's softmax equals its predict_proba; for one-vs-rest and
    hinge-loss models the logits are the decision function, so the argmax (the prediction)
    is the same.
    """
    from sklearn.linear_model._base import LinearClassifierMixin

    steps = list(pipeline.steps) if hasattr(pipeline, "steps") else [("classifier", pipeline)]
    clf = steps[-1][1]
    if not isinstance(clf, LinearClassifierMixin):
        raise NotExpressible(f"its classifier {type(clf).__name__} is not linear")
    coef = clf.coef_.toarray() if hasattr(clf.coef_, "toarray") else np.asarray(clf.coef_)
    coef, bias = coef.astype(np.float64), np.atleast_1d(np.asarray(clf.intercept_, np.float64))
    if coef.shape[0] == 1:  # binary: one decision function f, class 1 when f > 0
        coef, bias = np.vstack([np.zeros_like(coef), coef]), np.array([0.0, bias[0]])
    kernel = coef.T  # (p, k)
    for step_name, step in reversed(steps[:-1]):
        if step is None or step == "passthrough":
            continue
        a, c = _affine_step(step_name, step)
        bias = c @ kernel + bias
        kernel = a[:, None] * kernel if a.ndim == 1 else a @ kernel
    classes = np.asarray(clf.classes_)
    if (
        not np.issubdtype(classes.dtype, np.integer)
        or classes.min() < 0
        or classes.max() >= n_classes
    ):
        raise FinetuneError(
            f"the head's classes {classes.tolist()} are not indices of the {n_classes} prepared "
            "classes: run `dvc repro train`"
        )
    full_kernel = np.zeros((kernel.shape[0], n_classes))
    full_bias = np.full(n_classes, MISSING_CLASS_BIAS)
    full_kernel[:, classes], full_bias[classes] = kernel, bias
    return full_kernel.astype(np.float32), full_bias.astype(np.float32)


def linear_head(kernel: np.ndarray, bias: np.ndarray, name: str = "head"):
    """features -> Dense (logits, layer `head_logits`) -> softmax, all in float32."""
    import keras

    features = keras.Input((kernel.shape[0],), name="features")
    dense = keras.layers.Dense(kernel.shape[1], name="head_logits", dtype="float32")
    probs = keras.layers.Activation("softmax", name="probs", dtype="float32")(dense(features))
    dense.set_weights([kernel, bias])
    return keras.Model(features, probs, name=name)


def head_to_keras(spec: HeadSpec, n_classes: int):
    """(Keras model features -> probabilities initialised from the head, frozen predict fn)."""
    from pipeline.heads import load_head

    model = load_head(spec.directory, spec.record)  # only after its digest is checked
    if spec.kind == "keras":  # its own predictions are taken before training
        return model, lambda x: np.argmax(model.predict(x, verbose=0), axis=1)
    kernel, bias = linear_head_weights(model, n_classes)
    return linear_head(kernel, bias, name=f"head_{spec.record.head}"), model.predict


@dataclass
class StartingHead:
    spec: HeadSpec
    model: object  # keras.Model: features -> class probabilities
    frozen_predict: object  # the trained head's own prediction function on features
    fallback: str | None
    ranked_val_accuracy: float | None


def choose_head(best: BestChoice, heads_dir: Path, n_classes: int) -> StartingHead:
    """The best head, or the best one of the ranking that Keras can express (with the reason).

    Each model is deserialised only if it has the digest best.json recorded."""
    from pipeline.heads import read_head

    metric = best.metric
    skipped = []
    for rank, entry in enumerate(best.ranking, start=1):
        directory = Path(heads_dir) / entry.cell
        spec = HeadSpec(
            entry.cell, directory, read_head(directory, model_sha256=entry.model_sha256)
        )
        try:
            model, predict = head_to_keras(spec, n_classes)
        except NotExpressible as exc:
            skipped.append(f"{entry.cell} ({exc})")
            continue
        fallback = None
        if skipped:
            fallback = (
                f"the best head {skipped[0]} cannot be expressed in Keras"
                + (f", nor can {', '.join(skipped[1:])}" if skipped[1:] else "")
                + f"; fine-tuning started from {entry.cell}, ranked #{rank} by {metric}"
                + f" ({getattr(entry, metric):.4f})"
            )
        return StartingHead(spec, model, predict, fallback, entry.val_accuracy)
    raise FinetuneError(
        "no head in models/best.json can be expressed in Keras: "
        + "; ".join(skipped)
        + ". Add logreg, linear_svm or dense to train.heads."
    )


# ---------------------------------------------------------------- the model


@dataclass
class Assembly:
    model: object  # uint8 images -> class probabilities
    probe: object  # uint8 images -> (reduced features, probabilities)
    trunk: object  # the backbone up to the head's layer
    unfreeze: str
    trainable_layers: list[str] = field(default_factory=list)
    note: str | None = None


def augmentation():
    import keras

    return keras.Sequential(
        [
            keras.layers.RandomFlip("horizontal", seed=SEED, dtype="float32"),
            keras.layers.RandomRotation(0.05, seed=SEED, dtype="float32"),
            keras.layers.RandomZoom(0.1, seed=SEED, dtype="float32"),
        ],
        name="augment",
    )


def assemble(
    backbone, backbone_name: str, layer: str, reduction: str, head, unfreeze: str, augment: bool
) -> Assembly:
    """Images -> preprocess -> [augment] -> backbone up to `layer` -> reduction -> head.

    Layers of the backbone from `unfreeze` upward are trainable, except BatchNormalization
    (kept non-trainable, hence in inference mode); layers below it are frozen, and their
    Dropout (EfficientNet has some) is switched off so that they compute what extract did.
    """
    import keras

    from pipeline.layers import Preprocess, Reduce

    names = [lyr.name for lyr in backbone.layers]
    if layer not in names:
        raise FinetuneError(
            f"the head's layer {layer!r} is not a layer of {backbone_name}: run `dvc repro`"
        )
    trunk = keras.Model(
        backbone.inputs, backbone.get_layer(layer).output, name=f"{backbone_name}_to_{layer}"
    )
    trunk_names = [lyr.name for lyr in trunk.layers]
    if unfreeze not in names:
        raise FinetuneError(
            f"finetune.unfreeze: unknown layer {unfreeze!r} for {backbone_name}; valid layers, "
            f"bottom to top up to the head's layer {layer}: {', '.join(trunk_names[1:])}"
        )
    note = None
    start = trunk_names.index(unfreeze) if unfreeze in trunk_names else len(trunk_names)
    if unfreeze not in trunk_names:
        note = (
            f"finetune.unfreeze={unfreeze} lies above the head's layer {layer}: nothing in the "
            f"backbone is trainable, only the head trains. Choose a layer at or below {layer} "
            f"(e.g. one of {', '.join(trunk_names[-6:])})."
        )
    trunk.trainable = True
    for i, lyr in enumerate(trunk.layers):
        lyr.trainable = i >= start and not isinstance(lyr, keras.layers.BatchNormalization)
        if i < start and isinstance(lyr, keras.layers.Dropout):
            lyr.rate = 0.0  # Dropout is the identity at inference, so this changes no prediction
    images = keras.Input(backbone.inputs[0].shape[1:], dtype="uint8", name="images")
    x = Preprocess(backbone_name)(images)
    if augment:
        x = augmentation()(x)
    # training=False states the intent; BN layers being non-trainable is what enforces it.
    reduced = Reduce(reduction, name=f"{layer}_{reduction}")(trunk(x, training=False))
    probs = head(reduced)
    if keras.backend.standardize_dtype(probs.dtype) != "float32":
        probs = keras.layers.Activation("linear", dtype="float32", name="probs_float32")(probs)
    model = keras.Model(images, probs, name="finetuned")
    probe = keras.Model(images, [reduced, probs], name="finetuned_probe")
    trainable = [lyr.name for lyr in trunk.layers if lyr.trainable and lyr.trainable_weights]
    return Assembly(model, probe, trunk, unfreeze, trainable, note)


# ---------------------------------------------------------------- training


def image_batches(
    images: np.ndarray, labels: np.ndarray | None, batch_size: int, shuffle: bool = False
):
    """A keras.utils.PyDataset over memory-mapped uint8 images: only one batch in memory."""
    import keras

    class ImageBatches(keras.utils.PyDataset):
        def __init__(self):
            super().__init__()
            self.rng = np.random.default_rng(SEED)
            self.order = self.rng.permutation(len(images)) if shuffle else np.arange(len(images))

        def __len__(self):
            return math.ceil(len(images) / batch_size)

        def __getitem__(self, i):
            idx = np.sort(self.order[i * batch_size : (i + 1) * batch_size])  # sorted: memmap reads
            x = np.asarray(images[idx])
            return x if labels is None else (x, labels[idx])

        def on_epoch_end(self):
            if shuffle:
                self.order = self.rng.permutation(len(images))

    return ImageBatches()


def _keep_best(initial: dict, patience: int, n_val: int):
    """Early stopping on val_accuracy (ties broken by val_loss) whose first candidate is the
    state before training; the best weights are restored at the end.

    Accuracies are compared as counts of correct images: Keras logs them in float32
    (44/49 = 0.8979591727) and the initial one is float64 (0.8979591837), so comparing the
    floats would make every tie with the start a loss, whatever the loss says."""
    import keras

    def correct(accuracy: float) -> int:
        return round(float(accuracy) * n_val)

    class KeepBest(keras.callbacks.Callback):
        def __init__(self):
            super().__init__()
            self.best = (correct(initial["val_accuracy"]), -initial["val_loss"])
            self.best_epoch, self.wait, self.weights = 0, 0, None

        def on_train_begin(self, logs=None):
            self.weights = [v.numpy() for v in self.model.trainable_variables]

        def on_epoch_end(self, epoch, logs=None):
            score = (correct(logs["val_accuracy"]), -logs["val_loss"])
            if score > self.best:
                self.best, self.best_epoch, self.wait = score, epoch + 1, 0
                self.weights = [v.numpy() for v in self.model.trainable_variables]
            else:
                self.wait += 1
                if self.wait >= patience:
                    self.model.stop_training = True

        def on_train_end(self, logs=None):
            for variable, value in zip(self.model.trainable_variables, self.weights):
                variable.assign(value)

    return KeepBest()


def _scores(labels: np.ndarray, probs: np.ndarray) -> dict:
    """The project's scores of predicted probabilities, plus their cross-entropy."""
    from pipeline.scoring import score

    s = score(labels, np.argmax(probs, axis=1), probs.shape[1])
    p = np.clip(probs[np.arange(len(labels)), labels], 1e-7, 1 - 1e-7)
    return {
        "accuracy": s.accuracy,
        "accuracy_ci95": list(s.accuracy_ci95),
        "macro_f1": s.macro_f1,
        "loss": float(np.mean(-np.log(p))),
    }


def fit(
    assembly: Assembly, data: dict, cfg: FinetuneConfig, initial: dict
) -> tuple[list[dict], int]:
    """Train with early stopping whose first candidate is `initial`; return (history, best epoch)."""
    import keras

    keras.utils.set_random_seed(SEED)
    assembly.model.compile(
        optimizer=keras.optimizers.Adam(cfg.learning_rate),
        loss="sparse_categorical_crossentropy",
        metrics=["accuracy"],
    )
    keep = _keep_best(initial, cfg.patience, len(data["val"][1]))
    result = assembly.model.fit(
        image_batches(*data["train"], cfg.batch_size, shuffle=True),
        validation_data=image_batches(*data["val"], cfg.batch_size),
        epochs=cfg.epochs,
        callbacks=[keep],
        verbose="auto",
    )
    epochs = len(result.history.get("loss", []))
    rows = [
        {"epoch": e + 1, **{k: result.history[k][e] for k in HISTORY_FIELDS[1:]}}
        for e in range(epochs)
    ]
    return rows, keep.best_epoch


def predict(model, images: np.ndarray, batch_size: int):
    return model.predict(image_batches(images, None, batch_size), verbose=0)


def plot_curves(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(9, 3.5))
    epochs = [r["epoch"] for r in rows]
    for ax, key in zip(axes, ("accuracy", "loss")):
        ax.plot(epochs, [r[key] for r in rows], "o-", label="train")
        ax.plot(epochs, [r[f"val_{key}"] for r in rows], "o-", label="val")
        ax.set_xlabel("epoch (0: the frozen head)")
        ax.set_title(key)
        ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=80)
    plt.close(fig)


def finetune(params: Params, paths: Paths = Paths()) -> dict:
    """Assemble, check, fine-tune and evaluate; write model, curves and the metrics report.

    Prepared data and every head read must be what the current params and code give."""
    import keras

    from pipeline.backbones import get_backbone, load_backbone
    from pipeline.data import load_split
    from pipeline.provenance import (
        code_digest,
        current_prepared,
        expected_features,
        head_params,
        require,
    )

    backbone, cfg = params.backbone, params.finetune
    precision = use_precision(cfg.precision)
    prepared = current_prepared(params, paths.prepared, paths.scan)
    best = BestChoice.read(paths.best, "dvc repro select")
    start = choose_head(best, paths.heads, len(prepared.class_names))
    spec = start.spec
    where = str(spec.directory / "head.json")
    expect = {"params": head_params(params.train, spec.record.head), "code": code_digest("train")}
    require(where, spec.record.model_dump(), expect, "dvc repro train")
    require(
        where,
        spec.record.features.model_dump(),
        expected_features(params, prepared, paths.scan),
        "dvc repro",
    )
    if start.fallback:
        print(f"NOTE: {start.fallback}")
    unfreeze = cfg.unfreeze or get_backbone(backbone.name).unfreeze_from
    model, weights_used = load_backbone(
        backbone.name, backbone.weights, prepared.image_size, [spec.layer]
    )
    if weights_used != spec.record.features.weights_used:
        raise FinetuneError(
            f"backbone.weights resolved to {weights_used}, the head {spec.cell} was trained on "
            f"features of {spec.record.features.weights_used}: run `dvc repro`"
        )
    assembly = assemble(
        model, backbone.name, spec.layer, spec.record.reduction, start.model, unfreeze, cfg.augment
    )
    if assembly.note:
        print(f"NOTE: {assembly.note}")
    print(
        f"fine-tuning {backbone.name} ({weights_used} weights) from {unfreeze} up to {spec.layer} "
        f"+ head {spec.cell}; precision {precision}; trainable backbone layers: "
        f"{len(assembly.trainable_layers)}"
    )
    data = {s: load_split(paths.prepared, s, prepared) for s in ("train", "val", "test")}

    features, probs = predict(assembly.probe, data["val"][0], cfg.batch_size)
    agreement = float(
        np.mean(np.argmax(probs, axis=1) == np.asarray(start.frozen_predict(features)))
    )
    before = {
        s: _scores(
            data[s][1], probs if s == "val" else predict(assembly.model, data[s][0], cfg.batch_size)
        )
        for s in ("val", "train", "test")
    }
    print(
        f"before training: val accuracy {before['val']['accuracy']:.4f}; "
        f"agreement with the frozen head's own predictions {agreement:.4f}"
    )
    initial = {"val_accuracy": before["val"]["accuracy"], "val_loss": before["val"]["loss"]}
    t0 = time.perf_counter()
    rows, best_epoch = fit(assembly, data, cfg, initial)
    fit_seconds = time.perf_counter() - t0
    rows.insert(
        0,
        {
            "epoch": 0,
            **{k: before["train"][k] for k in ("loss", "accuracy")},
            "val_loss": initial["val_loss"],
            "val_accuracy": initial["val_accuracy"],
        },
    )
    after = {
        s: _scores(data[s][1], predict(assembly.model, data[s][0], cfg.batch_size))
        for s in ("val", "test")
    }

    paths.out.mkdir(parents=True, exist_ok=True)
    # a fresh functional view of the same layers: saved without the optimizer's state
    keras.Model(assembly.model.inputs, assembly.model.outputs, name="finetuned").save(
        paths.out / MODEL_FILE
    )
    write_history(paths.plots / HISTORY_FILE, rows)
    plot_curves(rows, paths.plots / CURVES_FILE)
    report = {
        "enabled": True,
        "layer": spec.layer,
        "head": spec.record.head,
        "backbone": backbone.name,
        "weights": weights_used,
        "feature_width": int(assembly.probe.outputs[0].shape[-1]),
        "model_file": str(paths.out / MODEL_FILE),
        "n_train": len(data["train"][1]),
        "val_accuracy": after["val"]["accuracy"],
        "val_accuracy_ci95": after["val"]["accuracy_ci95"],
        "val_macro_f1": after["val"]["macro_f1"],
        "test_accuracy": after["test"]["accuracy"],
        "test_accuracy_ci95": after["test"]["accuracy_ci95"],
        "test_macro_f1": after["test"]["macro_f1"],
        "fit_seconds": round(fit_seconds, 3),
        "started_from": spec.cell,
        "fallback": start.fallback,
        "frozen_val_accuracy": before["val"]["accuracy"],
        "frozen_test_accuracy": before["test"]["accuracy"],
        "ranked_val_accuracy": start.ranked_val_accuracy,
        "conversion_agreement": agreement,
        "unfreeze": unfreeze,
        "trainable_backbone_layers": len(assembly.trainable_layers),
        "note": assembly.note,
        "epochs_run": len(rows) - 1,
        "best_epoch": best_epoch,
        "precision": precision,
    }
    # the resolved config goes next to the model, not into the metrics `dvc exp show` lists
    _write_json(paths.out / STATUS_FILE, {**report, "config": cfg.model_dump()})
    _write_json(paths.metrics, report)
    return report
