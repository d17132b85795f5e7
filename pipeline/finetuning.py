"""Fine-tuning that starts from the best frozen head (`conversion`) inside one Keras model
(`assembly`): training with early stopping, evaluation, the report and learning curves.

The state before training is a candidate of early stopping, so the result is never worse on
validation than the head it started from. Keras and scikit-learn are imported lazily: the
disabled path never loads TensorFlow.
"""

from __future__ import annotations

import csv
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipeline import paths as layout
from pipeline.assembly import SEED, Assembly, assemble
from pipeline.config import FinetuneConfig, Params
from pipeline.conversion import FinetuneError, choose_head
from pipeline.precision import use_precision
from pipeline.records import BestChoice

MODEL_FILE = "model.keras"
STATUS_FILE = "status.json"
HISTORY_FILE = "history.csv"
CURVES_FILE = "curves.png"
HISTORY_FIELDS = ("epoch", "loss", "accuracy", "val_loss", "val_accuracy")


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
