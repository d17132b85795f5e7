"""The finetune stage: the best frozen head (`conversion`) inside one Keras model
(`assembly`), trained by `recipe`; the checks of what it reads, evaluation, the report and
learning curves.

The state before training is a candidate of early stopping, so the result is never worse on
validation than the head it started from. Keras and scikit-learn are imported lazily: the
disabled path never loads TensorFlow.
"""

from __future__ import annotations

import csv
import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipeline import paths as layout
from pipeline.assembly import assemble
from pipeline.config import Params
from pipeline.conversion import FinetuneError, choose_head, refit_on_train
from pipeline.precision import use_precision
from pipeline.recipe import METRICS, Stacked, fit, image_batches, refit
from pipeline.records import BestChoice

MODEL_FILE = "model.keras"
STATUS_FILE = "status.json"
HISTORY_FILE = "history.csv"
CURVES_FILE = "curves.png"
HISTORY_FIELDS = ("epoch", "phase", *METRICS)


@dataclass(frozen=True)
class Paths:
    """Where the stage reads and writes (the DVC layout by default)."""

    scan: Path = layout.SCAN
    prepared: Path = layout.PREPARED
    features: Path = layout.FEATURES
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
                {
                    k: (row[k] if k in ("epoch", "phase") else f"{row[k]:.6g}")
                    for k in HISTORY_FIELDS
                }
            )


def write_disabled(paths: Paths, backbone: str, weights: str) -> dict:
    """finetune.enabled is false: write the stage's outputs as small stubs, in milliseconds."""
    report = {"enabled": False, "backbone": backbone, "weights": weights}
    paths.out.mkdir(parents=True, exist_ok=True)
    for stale in (paths.out / MODEL_FILE, paths.plots / CURVES_FILE):
        stale.unlink(missing_ok=True)
    _write_json(paths.out / STATUS_FILE, report)
    write_history(paths.plots / HISTORY_FILE, [])
    _write_json(paths.metrics, report)
    return report


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

    from pipeline.backbones import load_backbone
    from pipeline.data import decode_workers, load_split
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
    features = expected_features(params, prepared, paths.scan)
    require(where, spec.record.features.model_dump(), features, "dvc repro")
    if start.fallback:
        print(f"NOTE: {start.fallback}")
    saved = start
    if spec.record.fit_on == "train+val":
        print(
            f"NOTE: {spec.cell} was refit on train+val after cross-validation; the epochs are "
            "chosen on val from the same head fitted on train alone, then refit on train+val"
        )
        start = refit_on_train(start, params.train, paths.features, features)

    def assembled(head):
        """The pretrained backbone, freshly loaded, up to the head's layer, with `head`."""
        model, weights_used = load_backbone(
            backbone.name, backbone.weights, prepared.image_size, [spec.layer]
        )
        if weights_used != spec.record.features.weights_used:
            raise FinetuneError(
                f"backbone.weights resolved to {weights_used}, the head {spec.cell} was trained "
                f"on features of {spec.record.features.weights_used}: run `dvc repro`"
            )
        layer, reduction = spec.layer, spec.record.reduction
        return assemble(
            model,
            backbone.name,
            layer,
            reduction,
            head,
            cfg.unfreeze,
            cfg.augment,
            cfg.augment_min_scale,
            cfg.augment_vflip,
        )

    assembly = assembled(start.model)
    weights_used = spec.record.features.weights_used
    if assembly.note:
        print(f"NOTE: {assembly.note}")
    print(
        f"fine-tuning {backbone.name} ({weights_used} weights) from {assembly.unfreeze} up to {spec.layer} "
        f"+ head {spec.cell}; precision {precision}; trainable backbone layers: "
        f"{len(assembly.trainable_layers)}"
    )
    workers = decode_workers(params.data)  # a manifest's files are decoded per batch
    data = {s: load_split(paths.prepared, s, prepared, workers) for s in ("train", "val", "test")}

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
    kept = "the starting head" if best_epoch == 0 else f"epoch {best_epoch}"
    if saved is not start and best_epoch == 0:  # no epoch beat the start: keep the saved head
        start.model.set_weights(saved.model.get_weights())
    elif saved is not start:  # like the frozen head, refit on train+val from the saved head
        print(f"refitting on train+val for the {best_epoch} epoch(s) chosen on val")
        assembly = assembled(saved.model)
        images = Stacked(data["train"][0], data["val"][0])
        refit(assembly, images, np.concatenate([data["train"][1], data["val"][1]]), cfg, best_epoch)
        kept += ", refit on train+val"
    fit_seconds = time.perf_counter() - t0
    rows.insert(
        0,
        {
            "epoch": 0,
            "phase": "start",
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
        "start_val_accuracy": before["val"]["accuracy"],
        "start_test_accuracy": before["test"]["accuracy"],
        "kept": kept,
        "ranked_val_accuracy": start.ranked_val_accuracy,
        "conversion_agreement": agreement,
        "unfreeze": assembly.unfreeze,
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
