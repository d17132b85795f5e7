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
from pipeline.project.records import BestChoice, RecordError, SplitReport, short
from pipeline.selection.params import TrainConfig
from pipeline.selection.plots import confusion_png, layer_chart, write_confusion
from pipeline.selection.scoring import split_report


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
    s = split_report(test.labels, predicted, test.class_names)
    result = {
        "backbone": fp.backbone["name"],
        "weights": short(fp.weights_used),
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
    status = layout.finetune_status
    finetune = json.loads(status.read_text()) if status.is_file() else {}
    reports = {f"frozen: {best.cell} (the chosen cell)": s}
    if finetune.get("enabled"):
        result["finetuned"] = _finetuned(finetune, best, s)
        reports[f"fine-tuned from {finetune['started_from']}"] = SplitReport.model_validate(
            finetune["test_report"]
        )
    layout.test_report.parent.mkdir(parents=True, exist_ok=True)
    layout.test_report.write_text(report_markdown(reports, result.get("finetuned")))
    layout.test_metrics.parent.mkdir(parents=True, exist_ok=True)
    layout.test_metrics.write_text(json.dumps(result, indent=2) + "\n")
    for path in layout.confusion_csvs:
        write_confusion(path, test.class_names, test.labels, predicted)
    confusion_png(layout.confusion_png, test.class_names, reports)
    with layout.leaderboard_csv.open() as f:
        ranking = [{**r, "val_accuracy": float(r["val_accuracy"])} for r in csv.DictReader(f)]
    layer_chart(
        layout.layers_png,
        ranking,
        list(fp.layers),
        f"Accuracy by layer and head ({_method(best)}): {fp.backbone['name']} "
        f"({short(fp.weights_used)} weights); \u2605 selected",
        1.0 / len(test.class_names),
    )
    return result


def _finetuned(finetune: dict, best: BestChoice, frozen: SplitReport) -> dict:
    """The fine-tuned model's test figures, with its gain over the frozen baseline (the chosen
    cell) and over the head it started from."""
    out = {
        k: finetune[k]
        for k in ("test_accuracy", "test_accuracy_ci95", "test_macro_f1", "val_accuracy")
    }
    out.update(
        started_from=finetune["started_from"],
        kept=finetune["kept"],
        gain_over_frozen=round(finetune["test_accuracy"] - frozen.accuracy, 6),
        gain_over_start=round(finetune["test_accuracy"] - finetune["start_test_accuracy"], 6),
    )
    if finetune["started_from"] != best.cell:
        out["why_not_the_chosen_cell"] = finetune["fallback"]
    return out


def report_markdown(reports: dict[str, SplitReport], finetuned: dict | None) -> str:
    """reports/test.md: each model's test accuracy, macro-F1, per-class precision and recall."""
    lines = ["# Test report", ""]
    if finetuned:
        lines += [
            f"Fine-tuned: test accuracy {finetuned['gain_over_frozen']:+.4f} against the frozen "
            f"baseline, {finetuned['gain_over_start']:+.4f} against the head it started from "
            f"({finetuned['started_from']}, {finetuned['kept']}).",
            *(
                [f"Not the chosen cell: {finetuned['why_not_the_chosen_cell']}."]
                if finetuned.get("why_not_the_chosen_cell")
                else []
            ),
            "",
        ]
    for title, r in reports.items():
        low, high = r.accuracy_ci95
        lines += [
            f"## {title}",
            "",
            f"Accuracy {r.accuracy:.4f} [{low:.3f}, {high:.3f}] on {r.n} images, macro-F1 "
            f"{r.macro_f1:.4f}.",
            "",
            "| class | precision | recall | images |",
            "|---|---:|---:|---:|",
            *(
                f"| {c.name} | {c.precision:.3f} | {c.recall:.3f} | {c.support} |"
                for c in r.per_class
            ),
            "",
        ]
    return "\n".join(lines)
