"""Leaderboard over the current train.layers x train.heads; the best head chosen by the
selection estimate each cell recorded (cross-validation over train+val, or the val split)."""

from __future__ import annotations

import csv
import json

from pipeline.heads.registry import HEAD_NAMES, get_head
from pipeline.heads.saved import expected_head, read_head, verify_model
from pipeline.project.layout import Layout
from pipeline.project.records import (
    BestChoice,
    CellMetrics,
    Fingerprint,
    RankedCell,
    RecordError,
    short,
)
from pipeline.selection.params import SelectConfig, TrainConfig

COLUMNS = [
    "rank",
    "cell",
    "layer",
    "head",
    "kind",
    "fit_path",
    "feature_width",
    "n_train",
    "selection",
    "cv_folds",
    "n_val",
    "val_accuracy",
    "val_accuracy_ci95",
    "val_fold_std",
    "val_fold_accuracies",
    "val_macro_f1",
    "test_accuracy",
    "test_accuracy_ci95",
    "test_macro_f1",
    "fit_seconds",
    "backbone",
    "weights",
]
# Cells equal on both selection metrics are ranked by this rule, never by timing noise.
TIE_RULE = (
    "ties go to the head fine-tuning can start from, simplest first "
    f"({', '.join(HEAD_NAMES)}), then to the narrower layer"
)


def finetune_candidates(ranked: list[dict]) -> list[RankedCell]:
    """The ranking down to the first head Keras can express: all that fine-tuning may read.

    Each row carries its model's sha256, so the finetune and evaluate stages depend on
    best.json alone and retraining any other head re-runs neither.
    """
    rows = []
    for r in ranked:
        rows.append(RankedCell(**{k: r[k] for k in RankedCell.model_fields}))
        if get_head(r["head"]).keras_layers:
            break
    return rows


class SelectError(RecordError):
    """Train outputs missing or inconsistent; the message says what to re-run."""


def collect(train: TrainConfig, features: Fingerprint, layout: Layout) -> list[dict]:
    """One row per layer x head of `train` (never other files lying in the metrics folder),
    each checked against the current params, the current `features` and its model's digest."""
    rows = []
    for layer in train.layers_of(features.layers):
        for head in train.heads:
            rerun = f"dvc repro train@{head}"
            metrics_file = layout.cell_metrics(layer, head)
            folder = layout.cell_dir(layer, head)
            m = CellMetrics.read(metrics_file, rerun)
            record = read_head(folder, expected_head(layer, head, train, features))
            verify_model(folder, record)
            if (m.layer, m.head, m.model_sha256) != (layer, head, record.model_sha256):
                raise SelectError(
                    f"{metrics_file} does not score the model in {folder}: run `{rerun}`"
                )
            model = f"{folder.as_posix()}/{record.model}"
            rows.append(
                {**m.model_dump(), "cell": record.cell, "kind": record.kind, "model": model}
            )
    return rows


def _other(metric: str) -> str:
    return "val_macro_f1" if metric == "val_accuracy" else "val_accuracy"


def rank(rows: list[dict], metric: str) -> list[dict]:
    """Best first by the selection metric, then the other one, then by TIE_RULE."""
    return sorted(
        rows,
        key=lambda r: (
            -r[metric],
            -r[_other(metric)],
            HEAD_NAMES.index(r["head"]),
            r["feature_width"],
            r["cell"],
        ),
    )


def tie_note(ranked: list[dict], metric: str) -> str | None:
    """How a tie at the top was broken, or None when the best cell stands alone."""
    top = (ranked[0][metric], ranked[0][_other(metric)])
    tied = [r["cell"] for r in ranked if (r[metric], r[_other(metric)]) == top]
    if len(tied) < 2:
        return None
    return (
        f"{len(tied)} cells tie on {metric} and {_other(metric)} ({', '.join(tied)}); "
        f"{TIE_RULE}: {ranked[0]['cell']}"
    )


def selection_note(ranked: list[dict]) -> str:
    """Which selection the ranking used and why, once; per group of cells if they differ."""
    groups: dict[str, list[str]] = {}
    for r in ranked:
        groups.setdefault(r["selection_note"], []).append(r["cell"])
    if len(groups) == 1:
        return next(iter(groups))
    return "mixed: " + "; ".join(f"{note} ({', '.join(cells)})" for note, cells in groups.items())


def _estimate(r: dict) -> str:
    return f"cv{r['cv_folds']}" if r["selection"] == "cv" else "val"


def _spread(r: dict) -> str:
    """Fold spread: std of the per-fold accuracies [min, max]; '-' without folds."""
    folds = r["val_fold_accuracies"]
    if not folds:
        return "-"
    return f"\u00b1{r['val_fold_std']:.3f} [{min(folds):.3f}, {max(folds):.3f}]"


def _text(key: str):
    return lambda r: str(r[key])


def _number(key: str, digits: int = 4):
    return lambda r: f"{r[key]:.{digits}f}"


MARKDOWN = {  # column after `rank` -> how a row shows it
    "cell": _text("cell"),
    "fit_path": _text("fit_path"),
    "feature_width": _text("feature_width"),
    "estimate": _estimate,
    "n_val": _text("n_val"),
    "val_accuracy": _number("val_accuracy"),
    "val_accuracy_ci95": lambda r: "[{:.3f}, {:.3f}]".format(*r["val_accuracy_ci95"]),
    "fold_spread": _spread,
    "val_macro_f1": _number("val_macro_f1"),
    "test_accuracy": _number("test_accuracy"),
    "test_macro_f1": _number("test_macro_f1"),
    "fit_seconds": _number("fit_seconds", 2),
}


def markdown(ranked: list[dict], metric: str) -> str:
    cols = ["rank", *MARKDOWN]
    lines = [
        f"# Leaderboard ({ranked[0]['backbone']}, weights {short(ranked[0]['weights'])})",
        "",
        (
            f"Best by the selection estimate ({metric}): **{ranked[0]['cell']}**. Test columns "
            "are shown for reference and play no part in the choice."
        ),
        *([f"Tie: {note}.", ""] if (note := tie_note(ranked, metric)) else []),
        f"Selection: {selection_note(ranked)}.",
        "",
        (
            "The val_* columns are that estimate (`estimate`: cvK, the out-of-fold predictions "
            "of K-fold cross-validation over train+val; val, the val split), over `n_val` "
            "images, with its 95% Wilson interval; `fold_spread` is the standard deviation "
            "[min, max] of the per-fold accuracies."
        ),
        "",
        "| " + " | ".join(cols) + " |",
        "|" + "|".join("---:" if c != "cell" else "---" for c in cols) + "|",
    ]
    for i, r in enumerate(ranked, 1):
        lines.append("| " + " | ".join([str(i), *(show(r) for show in MARKDOWN.values())]) + " |")
    return "\n".join(lines) + "\n"


def select(
    train: TrainConfig, cfg: SelectConfig, features: Fingerprint, layout: Layout = Layout()
) -> BestChoice:
    """Rank every cell by its selection estimate; write the leaderboard (csv, md), best.json
    and select.json."""
    ranked = rank(collect(train, features, layout), cfg.metric)
    top = ranked[0]
    best = BestChoice(
        **{k: top[k] for k in ("cell", "layer", "head", "kind", "model")},
        metric=cfg.metric,
        value=top[cfg.metric],
        features=features.digest,
        selection=top["selection"],
        cv_folds=top["cv_folds"],
        selection_note=selection_note(ranked),
        tie_break=tie_note(ranked, cfg.metric),
        ranking=finetune_candidates(ranked),
    )
    per_layer = {  # each layer's best selection accuracy
        layer: max(r["val_accuracy"] for r in ranked if r["layer"] == layer)
        for layer in train.layers_of(features.layers)
    }
    brief = {
        "backbone": features.backbone["name"],
        "weights": short(features.weights_used),
        "best_cell": top["cell"],
        "best_layer": top["layer"],
        "best_head": top["head"],
        "best_val_accuracy": top["val_accuracy"],
        "best_val_accuracy_ci95": list(top["val_accuracy_ci95"]),
        "best_val_fold_std": top["val_fold_std"],
        "best_val_macro_f1": top["val_macro_f1"],
        "tie_break": best.tie_break,
        "selection": best.selection_note,  # last: the widest column of `dvc exp show`
    }
    layout.leaderboard_csv.parent.mkdir(parents=True, exist_ok=True)
    with layout.leaderboard_csv.open("w", newline="") as f:
        writer = csv.DictWriter(f, COLUMNS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows({**r, "rank": i} for i, r in enumerate(ranked, 1))
    layout.leaderboard_md.write_text(markdown(ranked, cfg.metric))
    best.write(layout.best)
    layout.select_metrics.parent.mkdir(parents=True, exist_ok=True)
    layout.select_metrics.write_text(json.dumps(brief, indent=2) + "\n")
    layout.layer_metrics.write_text(json.dumps(per_layer, indent=2) + "\n")
    return best
