"""Fine-tuning's learning curves: one row per epoch (epoch 0: the state before training) as
CSV for `dvc plots`, and as a PNG."""

from __future__ import annotations

import csv
from pathlib import Path

from pipeline.finetuning.recipe import METRICS

HISTORY_FIELDS = ("epoch", "phase", *METRICS)


def write_history(path: Path, rows: list[dict]) -> None:
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
