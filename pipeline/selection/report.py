"""The evaluate stage: test metrics of the best frozen head (and the fine-tuned model's beside
it), with the confusion plots and the per-layer chart."""

from __future__ import annotations

import csv
import json

from pipeline.features.store import open_features
from pipeline.heads.blocks import Plan
from pipeline.heads.fit import predict
from pipeline.heads.saved import expected_head, load_head, read_head
from pipeline.project.layout import Layout
from pipeline.project.records import BestChoice, RecordError
from pipeline.selection.params import TrainConfig
from pipeline.selection.plots import confusion_png, layer_chart, write_confusion
from pipeline.selection.scoring import score


def _method(best: BestChoice) -> str:
    return f"{best.cv_folds}-fold CV over train+val" if best.selection == "cv" else "val split"


def evaluate(train: TrainConfig, expect: dict | None, layout: Layout = Layout()) -> dict:
    """Score the best frozen head on the test split; write test.json, confusion CSVs, layers.png.

    The test features must match `expect` (the current params and code), the head must have been
    trained on them under the current `train` params, and its model file must have the digest
    best.json recorded, checked before it is deserialised."""
    best = BestChoice.read(layout.best, "dvc repro select")
    test = open_features(layout.features_file("test"), expect)
    fp = test.fingerprint
    if best.features != fp.digest:
        raise RecordError(
            f"{layout.best} was chosen among heads trained on other features than {test.path}: "
            "run `dvc repro train select`"
        )
    directory = layout.cell_dir(best.layer, best.head)
    expect_head = expected_head(best.layer, best.head, train, fp)
    info = read_head(directory, expect_head, model_sha256=best.ranking[0].model_sha256)
    model = load_head(directory, info)
    plan = Plan.for_matrix(len(test.labels), test.widths[best.layer], train.max_memory_mb)
    predicted = predict(model, info.kind, test, best.layer, plan.block_rows)
    s = score(test.labels, predicted, len(test.class_names))
    result = {
        "backbone": fp.backbone["name"],
        "weights": fp.weights_used,
        "frozen": {
            "cell": best.cell,
            "test_accuracy": s.accuracy,
            "test_accuracy_ci95": list(s.accuracy_ci95),
            "test_macro_f1": s.macro_f1,
            "val_accuracy": best.ranking[0].val_accuracy,
            "selection": best.selection,
            "cv_folds": best.cv_folds,
            "n_test": s.n,
        },
    }
    report = layout.finetune_metrics
    finetune = json.loads(report.read_text()) if report.is_file() else {}
    if finetune.get("enabled"):
        keys = ("test_accuracy", "test_accuracy_ci95", "test_macro_f1", "val_accuracy")
        result["finetuned"] = {k: finetune.get(k) for k in keys}
    layout.test_metrics.parent.mkdir(parents=True, exist_ok=True)
    layout.test_metrics.write_text(json.dumps(result, indent=2) + "\n")
    for path in layout.confusion_csvs:
        write_confusion(path, test.class_names, test.labels, predicted)
    confusion_png(
        layout.confusion_png,
        test.class_names,
        test.labels,
        predicted,
        f"{best.cell} on the test split ({s.n} images)",
    )
    with layout.leaderboard_csv.open() as f:
        ranking = [{**r, "val_accuracy": float(r["val_accuracy"])} for r in csv.DictReader(f)]
    layer_chart(
        layout.layers_png,
        ranking,
        list(fp.layers),
        f"Accuracy by layer and head ({_method(best)}): {fp.backbone['name']} "
        f"({fp.weights_used} weights); \u2605 selected",
        1.0 / len(test.class_names),
    )
    return result
