"""One cell of the train matrix: fit a head on one cached layer, save it, score it."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

from pipeline.config import TrainConfig
from pipeline.heads import MEMORY_FACTOR, Plan, fit_head, kind_of, predict, save_model, scores
from pipeline.store import open_splits


def train_cell(
    layer: str,
    head: str,
    cfg: TrainConfig,
    backbone: str,
    features: Path = Path("features"),
    models: Path = Path("models/heads"),
    metrics: Path = Path("metrics/train"),
) -> dict:
    """Train `head` on `layer` of the features of `backbone`; write the model directory
    models/<layer>-<head>/ (model + head.json) and metrics/<layer>-<head>.json; return the metrics.
    fit_seconds covers reading the training rows and fitting."""
    splits = open_splits(features, expect={"backbone": backbone})
    train, val, test = splits["train"], splits["val"], splits["test"]
    train.check_layer(layer)
    cell, kind = f"{layer}-{head}", kind_of(head)
    out = Path(models) / cell
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    width = train.widths[layer]
    plan = Plan.for_matrix(len(train.labels), width, cfg.max_memory_mb, MEMORY_FACTOR[head])
    print(f"{cell}: {len(train.labels)} x {width} features, {plan.path} path")

    start = time.perf_counter()
    model = fit_head(head, cfg, train, val, layer, plan, out / "live")
    fit_seconds = time.perf_counter() - start

    fingerprint = train.fingerprint
    n_classes = len(train.class_names)
    result = {
        "layer": layer,
        "head": head,
        "backbone": fingerprint["backbone"],
        "weights": fingerprint["weights"],
        "feature_width": width,
        "path": plan.path,
        "n_train": len(train.labels),
    }
    for name, ff in (("val", val), ("test", test)):
        acc, f1 = scores(ff.labels, predict(model, kind, ff, layer, plan.block_rows), n_classes)
        result[f"{name}_accuracy"], result[f"{name}_macro_f1"] = round(acc, 6), round(f1, 6)
    result["fit_seconds"] = round(fit_seconds, 3)

    info = {
        "layer": layer,
        "head": head,
        "kind": kind,
        "model": save_model(model, kind, out),
        "path": plan.path,
        "feature_width": width,
        "reduction": fingerprint["layers"][layer],
        "class_names": train.class_names,
        "fingerprint": fingerprint,
    }
    (out / "head.json").write_text(json.dumps(info, indent=2) + "\n")
    metrics_file = Path(metrics) / f"{cell}.json"
    metrics_file.parent.mkdir(parents=True, exist_ok=True)
    metrics_file.write_text(json.dumps(result, indent=2) + "\n")
    print(
        f"{cell}: val accuracy {result['val_accuracy']:.4f}, test accuracy "
        f"{result['test_accuracy']:.4f}, fit {fit_seconds:.2f} s"
    )
    return result
