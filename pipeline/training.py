"""One cell of the train matrix: fit a head on one cached layer, save it, score it."""

from __future__ import annotations

import shutil
import time
from pathlib import Path

from pipeline import paths
from pipeline.config import TrainConfig
from pipeline.heads import MEMORY_FACTOR, Plan, fit_head, kind_of, predict, save_model
from pipeline.provenance import code_digest, head_params
from pipeline.records import CellMetrics, HeadRecord, file_sha256
from pipeline.scoring import score
from pipeline.store import open_splits


def train_cell(
    layer: str,
    head: str,
    cfg: TrainConfig,
    expect: dict | None,
    features: Path = paths.FEATURES,
    models: Path = paths.HEADS,
    metrics: Path = paths.TRAIN_METRICS,
) -> CellMetrics:
    """Train `head` on `layer` of the features (refused unless they match `expect`); write the
    model directory models/<layer>-<head>/ (model + head.json) and metrics/<layer>-<head>.json.
    fit_seconds covers reading the training rows and fitting."""
    splits = open_splits(features, expect)
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

    n_classes = len(train.class_names)
    scored = {}
    for name, ff in (("val", val), ("test", test)):
        s = score(ff.labels, predict(model, kind, ff, layer, plan.block_rows), n_classes)
        scored[f"{name}_accuracy"], scored[f"{name}_macro_f1"] = s.accuracy, s.macro_f1
        scored[f"{name}_accuracy_ci95"] = s.accuracy_ci95
    model_file = save_model(model, kind, out)
    record = HeadRecord(
        cell=cell,
        layer=layer,
        head=head,
        kind=kind,
        model=model_file,
        model_sha256=file_sha256(out / model_file),
        params=head_params(cfg, head),
        features=train.fingerprint,
        reduction=train.fingerprint.layers[layer],
        feature_width=width,
        class_names=train.class_names,
        fit_path=plan.path,
        code=code_digest("train"),
    )
    record.write(out / "head.json")
    result = CellMetrics(
        layer=layer,
        head=head,
        backbone=train.fingerprint.backbone["name"],
        weights=train.fingerprint.weights_used,
        feature_width=width,
        fit_path=plan.path,
        n_train=len(train.labels),
        **scored,
        fit_seconds=round(fit_seconds, 3),
        model_sha256=record.model_sha256,
    )
    result.write(Path(metrics) / f"{cell}.json")
    print(
        f"{cell}: val accuracy {result.val_accuracy:.4f}, test accuracy "
        f"{result.test_accuracy:.4f}, fit {fit_seconds:.2f} s"
    )
    return result
