"""The finetune job: the best frozen head (conversion) inside one Keras model (assembly),
trained by the recipe; the checks of what it reads, evaluation, the report and the curves.

The state before training is a candidate of early stopping, so the result is never worse on
validation than the head it started from. Keras and scikit-learn are imported lazily: the
disabled path never loads TensorFlow.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np

from pipeline.backbones.adapters import load_trained_on
from pipeline.data.decoding import decode_workers
from pipeline.data.prepared import load_split
from pipeline.features.precision import use_precision
from pipeline.features.store import open_features
from pipeline.finetuning.assembly import Assembly, assemble
from pipeline.finetuning.conversion import (
    StartingHead,
    choose_head,
    refit_on_train,
)
from pipeline.finetuning.history import plot_curves, write_history
from pipeline.finetuning.params import FinetuneConfig, FinetuneParams
from pipeline.finetuning.recipe import Stacked, fit, image_batches, refit
from pipeline.project.layout import SPLITS, Layout
from pipeline.project.provenance import current_prepared, expected_features, scanned_backbone
from pipeline.project.records import BackboneRecord, BestChoice, short


def _write_json(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2) + "\n")


def write_disabled(layout: Layout, backbone: str, weights: str) -> dict:
    """finetune.enabled is false: write the stage's outputs as small stubs, in milliseconds."""
    report = {"enabled": False, "backbone": backbone, "weights": weights}
    layout.finetuned.mkdir(parents=True, exist_ok=True)
    for stale in (layout.finetuned_model, layout.finetune_curves):
        stale.unlink(missing_ok=True)
    _write_json(layout.finetune_status, report)
    write_history(layout.finetune_history, [])
    _write_json(layout.finetune_metrics, report)
    return report


def _scores(labels: np.ndarray, probs: np.ndarray) -> dict:
    """The project's scores of predicted probabilities, plus their cross-entropy."""
    from pipeline.selection.scoring import score

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


def _assembled(backbone: BackboneRecord, start: StartingHead, head, cfg: FinetuneConfig):
    """The pretrained backbone, freshly loaded, up to the head's layer, with `head`."""
    spec = start.spec
    model = load_trained_on(backbone, spec.layer, spec.record.features.weights_used, spec.cell)
    return assemble(
        model,
        backbone,
        spec.layer,
        spec.record.reduction,
        head,
        cfg.unfreeze,
        cfg.augment,
        cfg.augment_min_scale,
        cfg.augment_vflip,
    )


def _before_training(assembly: Assembly, start: StartingHead, data: dict, batch_size: int):
    """Scores of the assembled model before any training, and how often it agrees with the
    frozen head's own predictions on the val images."""
    features, probs = predict(assembly.probe, data["val"][0], batch_size)
    agreement = float(
        np.mean(np.argmax(probs, axis=1) == np.asarray(start.frozen_predict(features)))
    )
    before = {
        s: _scores(
            data[s][1], probs if s == "val" else predict(assembly.model, data[s][0], batch_size)
        )
        for s in ("val", "train", "test")
    }
    return before, agreement


def _starting_head(params: FinetuneParams, layout: Layout):
    """The checked inputs and the head fine-tuning starts from: (backbone record, prepared
    record, features fingerprint, the head as saved, the head to train from). A head refit on
    train+val after cross-validation has seen the val split: it is fitted again on train."""
    prepared = current_prepared(params, layout)
    backbone = scanned_backbone(params, layout)
    expect = expected_features(params, prepared, layout)
    features = open_features(layout.features_file("train"), expect).fingerprint
    best = BestChoice.read(layout.best, "dvc repro select")
    saved = choose_head(best, params.train, features, len(prepared.class_names), layout)
    if saved.fallback:
        print(f"NOTE: {saved.fallback}")
    start = saved
    if saved.spec.record.fit_on == "train+val":
        print(
            f"NOTE: {saved.spec.cell} was refit on train+val after cross-validation; the epochs "
            "are chosen on val from the same head fitted on train alone, then refit on train+val"
        )
        start = refit_on_train(saved, params.train, expect, layout)
    return backbone, prepared, features, saved, start


def _train(backbone, saved: StartingHead, start: StartingHead, assembly, data, before, cfg):
    """The recipe from `start`, early-stopped on val; then, like the frozen head, refit on
    train+val from the saved head when that one had seen val. Returns (assembly, history rows
    from epoch 0, best epoch, what was kept, the kept epoch's val scores before a refit)."""
    initial = {"val_accuracy": before["val"]["accuracy"], "val_loss": before["val"]["loss"]}
    rows, best_epoch = fit(assembly, data, cfg, initial)
    kept = "the starting head" if best_epoch == 0 else f"epoch {best_epoch}"
    val_before_refit = None
    if saved is not start and best_epoch == 0:  # no epoch beat the start: keep the saved head
        start.model.set_weights(saved.model.get_weights())
    elif saved is not start:
        val_before_refit = _scores(
            data["val"][1], predict(assembly.model, data["val"][0], cfg.batch_size)
        )
        print(f"refitting on train+val for the {best_epoch} epoch(s) chosen on val")
        assembly = _assembled(backbone, start, saved.model, cfg)
        images = Stacked(data["train"][0], data["val"][0])
        refit(assembly, images, np.concatenate([data["train"][1], data["val"][1]]), cfg, best_epoch)
        kept += ", refit on train+val"
    epoch0 = {
        "epoch": 0,
        "phase": "start",
        **{k: before["train"][k] for k in ("loss", "accuracy")},
        "val_loss": initial["val_loss"],
        "val_accuracy": initial["val_accuracy"],
    }
    return assembly, [epoch0, *rows], best_epoch, kept, val_before_refit


def finetune(params: FinetuneParams, layout: Layout = Layout()) -> dict:
    """Assemble, check, fine-tune and evaluate; write model, curves and the metrics report.

    Prepared data, features and every head read must be what the current params and code give."""
    import keras

    cfg = params.finetune
    precision = use_precision(cfg.precision)
    backbone, prepared, features, saved, start = _starting_head(params, layout)
    spec = start.spec
    assembly = _assembled(backbone, start, start.model, cfg)
    if assembly.note:
        print(f"NOTE: {assembly.note}")
    print(
        f"fine-tuning {backbone.name} ({short(features.weights_used)} weights) from "
        f"{assembly.unfreeze} "
        f"up to {spec.layer} + head {spec.cell}; precision {precision}; trainable backbone "
        f"layers: {len(assembly.trainable_layers)}"
    )
    workers = decode_workers(params.data)  # a manifest's files are decoded per batch
    data = {s: load_split(s, prepared, workers, layout) for s in SPLITS}
    before, agreement = _before_training(assembly, start, data, cfg.batch_size)
    print(
        f"before training: val accuracy {before['val']['accuracy']:.4f}; "
        f"agreement with the frozen head's own predictions {agreement:.4f}"
    )
    t0 = time.perf_counter()
    assembly, rows, best_epoch, kept, val_before_refit = _train(
        backbone, saved, start, assembly, data, before, cfg
    )
    fit_seconds = time.perf_counter() - t0
    probs = {s: predict(assembly.model, data[s][0], cfg.batch_size) for s in ("val", "test")}
    after = {s: _scores(data[s][1], probs[s]) for s in probs}
    if val_before_refit:  # val is no estimate of a model trained on it
        after["val"] = val_before_refit

    layout.finetuned.mkdir(parents=True, exist_ok=True)
    # a fresh functional view of the same layers: saved without the optimizer's state
    keras.Model(assembly.model.inputs, assembly.model.outputs, name="finetuned").save(
        layout.finetuned_model
    )
    write_history(layout.finetune_history, rows)
    plot_curves(rows, layout.finetune_curves)
    report = {
        "enabled": True,
        "layer": spec.layer,
        "head": spec.record.head,
        "backbone": backbone.name,
        "weights": short(features.weights_used),
        "feature_width": int(assembly.probe.outputs[0].shape[-1]),
        "model_file": str(layout.finetuned_model),
        "n_train": len(data["train"][1]),
        "val_accuracy": after["val"]["accuracy"],  # before any refit on train+val
        "val_accuracy_ci95": after["val"]["accuracy_ci95"],
        "val_macro_f1": after["val"]["macro_f1"],
        "val_estimate": "the kept epoch's, before the refit on train+val"
        if val_before_refit
        else "the kept model's",
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
    from pipeline.selection.scoring import split_report

    test_report = split_report(data["test"][1], probs["test"].argmax(axis=1), prepared.class_names)
    status = {
        **report,
        "weights": features.weights_used,  # the whole identity: export compares it
        "config": cfg.model_dump(),
        "test_report": test_report.model_dump(),
    }
    _write_json(layout.finetune_status, status)
    _write_json(layout.finetune_metrics, report)
    return report
