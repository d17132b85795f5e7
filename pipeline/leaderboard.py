"""Leaderboard over the current train.layers x train.heads; the best head chosen on validation."""

from __future__ import annotations

import csv
import json
from pathlib import Path

from pipeline.backbones import file_digest
from pipeline.config import SelectConfig, TrainConfig

COLUMNS = [
    "rank",
    "cell",
    "layer",
    "head",
    "kind",
    "path",
    "feature_width",
    "n_train",
    "val_accuracy",
    "val_macro_f1",
    "test_accuracy",
    "test_macro_f1",
    "fit_seconds",
    "backbone",
    "weights",
]
RANKING_KEYS = ["cell", "layer", "head", "kind", "val_accuracy", "val_macro_f1"]
KERAS_EXPRESSIBLE = ("logreg", "linear_svm", "dense")  # heads fine-tuning can start from


def finetune_candidates(ranked: list[dict]) -> list[dict]:
    """The ranking down to the first head Keras can express: all that fine-tuning may read.

    Each row carries its model's sha256, so the finetune and evaluate stages depend on
    best.json alone and retraining any other head re-runs neither.
    """
    rows = []
    for r in ranked:
        rows.append({**{k: r[k] for k in RANKING_KEYS}, "model_sha256": file_digest(r["model"])})
        if r["head"] in KERAS_EXPRESSIBLE:
            break
    return rows


class SelectError(RuntimeError):
    """Train outputs missing or inconsistent; the message says what to re-run."""


def collect(train: TrainConfig, metrics: Path, models: Path) -> list[dict]:
    """One row per layer x head of `train` (never other files lying in `metrics`)."""
    rows, fingerprints = [], {}
    for layer in train.layers:
        for head in train.heads:
            cell = f"{layer}-{head}"
            m_path, h_path = Path(metrics) / f"{cell}.json", Path(models) / cell / "head.json"
            for path in (m_path, h_path):
                if not path.is_file():
                    raise SelectError(f"{path} is missing: run `dvc repro train` (cell {cell})")
            m, info = json.loads(m_path.read_text()), json.loads(h_path.read_text())
            if (m["layer"], m["head"], info["layer"], info["head"]) != (layer, head) * 2:
                raise SelectError(
                    f"{m_path} or {h_path} is not about cell {cell}: run `dvc repro train`"
                )
            fingerprints[cell] = info["fingerprint"]
            rows.append(
                {
                    **m,
                    "cell": cell,
                    "kind": info["kind"],
                    "model": f"{Path(models).as_posix()}/{cell}/{info['model']}",
                }
            )
    if len({json.dumps(f, sort_keys=True) for f in fingerprints.values()}) > 1:
        raise SelectError("the heads were trained on different features: run `dvc repro train`")
    return rows


def rank(rows: list[dict], metric: str) -> list[dict]:
    """Best first by the validation metric, then the other validation metric, then fit time."""
    other = "val_macro_f1" if metric == "val_accuracy" else "val_accuracy"
    return sorted(rows, key=lambda r: (-r[metric], -r[other], r["fit_seconds"], r["cell"]))


def markdown(ranked: list[dict], metric: str) -> str:
    cols = [
        "rank",
        "cell",
        "path",
        "feature_width",
        "val_accuracy",
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
            else str(r[c])
            for c in cols
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def select(
    train: TrainConfig,
    cfg: SelectConfig,
    metrics: Path = Path("metrics/train"),
    models: Path = Path("models/heads"),
    reports: Path = Path("reports"),
    best_file: Path = Path("models/best.json"),
    summary: Path = Path("metrics/select.json"),
) -> dict:
    """Rank every cell on validation; write the leaderboard (csv, md), best.json, select.json."""
    ranked = rank(collect(train, metrics, models), cfg.metric)
    top = ranked[0]
    best = {
        "cell": top["cell"],
        "layer": top["layer"],
        "head": top["head"],
        "kind": top["kind"],
        "model": top["model"],
        "metric": cfg.metric,
        "value": top[cfg.metric],
        "ranking": finetune_candidates(ranked),
    }
    per_layer = {
        layer: max(r["val_accuracy"] for r in ranked if r["layer"] == layer)
        for layer in train.layers
    }
    brief = {
        "best_cell": top["cell"],
        "best_layer": top["layer"],
        "best_head": top["head"],
        "best_val_accuracy": top["val_accuracy"],
        "best_val_macro_f1": top["val_macro_f1"],
        "val_accuracy_by_layer": per_layer,
    }
    Path(reports).mkdir(parents=True, exist_ok=True)
    with (Path(reports) / "leaderboard.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, COLUMNS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows({**r, "rank": i} for i, r in enumerate(ranked, 1))
    (Path(reports) / "leaderboard.md").write_text(markdown(ranked, cfg.metric))
    for path, content in ((best_file, best), (summary, brief)):
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(content, indent=2) + "\n")
    return best
