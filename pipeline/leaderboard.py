"""Leaderboard over the current train.layers x train.heads; the best head chosen on validation."""

from __future__ import annotations

import csv
import json
from pathlib import Path

from pipeline import paths
from pipeline.config import SelectConfig, TrainConfig
from pipeline.heads import read_head, verify_model
from pipeline.provenance import code_digest, head_params
from pipeline.records import BestChoice, CellMetrics, Fingerprint, RankedCell, RecordError

COLUMNS = [
    "rank",
    "cell",
    "layer",
    "head",
    "kind",
    "fit_path",
    "feature_width",
    "n_train",
    "val_accuracy",
    "val_accuracy_ci95",
    "val_macro_f1",
    "test_accuracy",
    "test_accuracy_ci95",
    "test_macro_f1",
    "fit_seconds",
    "backbone",
    "weights",
]
KERAS_EXPRESSIBLE = ("logreg", "linear_svm", "dense")  # heads fine-tuning can start from
# Cells equal on both validation metrics are ranked by this rule, never by timing noise.
HEAD_PREFERENCE = (*KERAS_EXPRESSIBLE, "knn", "random_forest")
TIE_RULE = (
    "ties go to the head fine-tuning can start from, simplest first "
    f"({', '.join(HEAD_PREFERENCE)}), then to the narrower layer"
)


def finetune_candidates(ranked: list[dict]) -> list[RankedCell]:
    """The ranking down to the first head Keras can express: all that fine-tuning may read.

    Each row carries its model's sha256, so the finetune and evaluate stages depend on
    best.json alone and retraining any other head re-runs neither.
    """
    rows = []
    for r in ranked:
        rows.append(RankedCell(**{k: r[k] for k in RankedCell.model_fields}))
        if r["head"] in KERAS_EXPRESSIBLE:
            break
    return rows


class SelectError(RecordError):
    """Train outputs missing or inconsistent; the message says what to re-run."""


def collect(train: TrainConfig, features: Fingerprint, metrics: Path, models: Path) -> list[dict]:
    """One row per layer x head of `train` (never other files lying in `metrics`), each
    checked against the current params, the current `features` and its model file's digest."""
    rows, code = [], code_digest("train")
    for layer in train.layers:
        for head in train.heads:
            cell = f"{layer}-{head}"
            rerun = f"dvc repro train@{cell}"
            m = CellMetrics.read(Path(metrics) / f"{cell}.json", rerun)
            expect = {
                "cell": cell,
                "layer": layer,
                "head": head,
                "params": head_params(train, head),
                "features": features.model_dump(mode="json"),
                "code": code,
            }
            record = read_head(Path(models) / cell, expect)
            verify_model(Path(models) / cell, record)
            if (m.layer, m.head, m.model_sha256) != (layer, head, record.model_sha256):
                raise SelectError(
                    f"{Path(metrics) / f'{cell}.json'} does not score the model in "
                    f"{Path(models) / cell}: run `{rerun}`"
                )
            model = f"{Path(models).as_posix()}/{cell}/{record.model}"
            rows.append({**m.model_dump(), "cell": cell, "kind": record.kind, "model": model})
    return rows


def _other(metric: str) -> str:
    return "val_macro_f1" if metric == "val_accuracy" else "val_accuracy"


def rank(rows: list[dict], metric: str) -> list[dict]:
    """Best first by the validation metric, then the other one, then by TIE_RULE."""
    return sorted(
        rows,
        key=lambda r: (
            -r[metric],
            -r[_other(metric)],
            HEAD_PREFERENCE.index(r["head"]),
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


def markdown(ranked: list[dict], metric: str) -> str:
    cols = [
        "rank",
        "cell",
        "fit_path",
        "feature_width",
        "val_accuracy",
        "val_accuracy_ci95",
        "val_macro_f1",
        "test_accuracy",
        "test_macro_f1",
        "fit_seconds",
    ]
    lines = [
        f"# Leaderboard ({ranked[0]['backbone']}, weights {ranked[0]['weights']})",
        "",
        (
            f"Best on validation ({metric}): **{ranked[0]['cell']}**. Test columns are shown "
            "for reference and play no part in the choice."
        ),
        *([f"Tie: {note}.", ""] if (note := tie_note(ranked, metric)) else []),
        "Accuracy intervals are 95% Wilson intervals over the validation images.",
        "",
        "| " + " | ".join(cols) + " |",
        "|" + "|".join("---:" if c != "cell" else "---" for c in cols) + "|",
    ]
    for i, r in enumerate(ranked, 1):
        cells = [
            str(i)
            if c == "rank"
            else f"{r[c]:.2f}"
            if c == "fit_seconds"
            else f"{r[c]:.4f}"
            if isinstance(r[c], float)
            else f"[{r[c][0]:.3f}, {r[c][1]:.3f}]"
            if c.endswith("_ci95")
            else str(r[c])
            for c in cols
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def select(
    train: TrainConfig,
    cfg: SelectConfig,
    features: Fingerprint,
    metrics: Path = paths.TRAIN_METRICS,
    models: Path = paths.HEADS,
    reports: Path = Path("reports"),
    best_file: Path = paths.BEST,
    summary: Path = Path("metrics/select.json"),
) -> BestChoice:
    """Rank every cell on validation; write the leaderboard (csv, md), best.json, select.json."""
    ranked = rank(collect(train, features, metrics, models), cfg.metric)
    top = ranked[0]
    best = BestChoice(
        **{k: top[k] for k in ("cell", "layer", "head", "kind", "model")},
        metric=cfg.metric,
        value=top[cfg.metric],
        features=features.digest,
        tie_break=tie_note(ranked, cfg.metric),
        ranking=finetune_candidates(ranked),
    )
    per_layer = {
        layer: max(r["val_accuracy"] for r in ranked if r["layer"] == layer)
        for layer in train.layers
    }
    brief = {
        "best_cell": top["cell"],
        "best_layer": top["layer"],
        "best_head": top["head"],
        "best_val_accuracy": top["val_accuracy"],
        "best_val_accuracy_ci95": list(top["val_accuracy_ci95"]),
        "best_val_macro_f1": top["val_macro_f1"],
        "tie_break": tie_note(ranked, cfg.metric),
        "val_accuracy_by_layer": per_layer,
    }
    Path(reports).mkdir(parents=True, exist_ok=True)
    with (Path(reports) / "leaderboard.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, COLUMNS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows({**r, "rank": i} for i, r in enumerate(ranked, 1))
    (Path(reports) / "leaderboard.md").write_text(markdown(ranked, cfg.metric))
    best.write(best_file)
    Path(summary).parent.mkdir(parents=True, exist_ok=True)
    Path(summary).write_text(json.dumps(brief, indent=2) + "\n")
    return best
