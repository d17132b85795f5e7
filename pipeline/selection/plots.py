"""The evaluate stage's pictures and plot data: confusion rows for DVC's templates, the
confusion matrices as PNG, and the accuracy of every layer x head as grouped bars."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np

from pipeline.heads.registry import HEAD_NAMES
from pipeline.project.records import SplitReport


def write_confusion(
    path: Path, class_names: list[str], actual: np.ndarray, predicted: np.ndarray
) -> None:
    """One row per test image (actual, predicted class name): DVC's confusion templates count."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["actual", "predicted"])
        writer.writerows((class_names[a], class_names[p]) for a, p in zip(actual, predicted))


def layer_chart(
    path: Path, ranking: list[dict], layers: list[str], title: str, chance: float
) -> None:
    """Grouped bars: the selection estimate of accuracy per layer (groups, in network order)
    and head (bars)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    acc = {(r["layer"], r["head"]): r["val_accuracy"] for r in ranking}
    layers = [layer for layer in layers if any(k[0] == layer for k in acc)]
    heads = [h for h in HEAD_NAMES if any(k[1] == h for k in acc)]
    best = ranking[0]
    width = 0.8 / len(heads)
    fig, ax = plt.subplots(figsize=(2.5 + 0.55 * len(layers) * len(heads), 4.2))
    colors = plt.get_cmap("tab10")
    for j, head in enumerate(heads):
        xs = [
            i + (j - (len(heads) - 1) / 2) * width
            for i, layer in enumerate(layers)
            if (layer, head) in acc
        ]
        ys = [acc[(layer, head)] for layer in layers if (layer, head) in acc]
        bars = ax.bar(xs, ys, width * 0.92, label=head, color=colors(j))
        for bar, layer, y in zip(bars, [la for la in layers if (la, head) in acc], ys):
            is_best = (layer, head) == (best["layer"], best["head"])
            if is_best:
                bar.set_edgecolor("black")
                bar.set_linewidth(2)
            ax.annotate(
                f"{y:.3f}" + ("\u2605" if is_best else ""),
                (bar.get_x() + bar.get_width() / 2, y),
                ha="center",
                va="bottom",
                fontsize=7,
                xytext=(0, 2),
                textcoords="offset points",
            )
    ax.axhline(chance, color="grey", linestyle="--", linewidth=1, label="chance")
    top = {la: max(v for (lb, _), v in acc.items() if lb == la) for la in layers}
    ax.set_xticks(range(len(layers)), [f"{la}\nbest {top[la]:.3f}" for la in layers])
    ax.set_ylim(0, 1.08)
    ax.set_ylabel("selection estimate of accuracy")
    ax.set_title(title, fontsize=10)
    ax.legend(
        fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1), title="head", title_fontsize=8
    )
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def confusion_png(path: Path, class_names: list[str], models: dict[str, SplitReport]) -> None:
    """One row per model (title -> its test report): counts and row-normalised shares side by
    side, for viewing without DVC's HTML."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    k = len(class_names)
    side = 1.6 + 0.45 * k
    fig, grid = plt.subplots(
        len(models),
        2,
        figsize=(2 * side + 1, (side + 0.6) * len(models)),
        constrained_layout=True,
        squeeze=False,
    )
    for axes, (title, report) in zip(grid, models.items()):
        counts = np.asarray(report.confusion, np.int64)
        shares = counts / np.maximum(counts.sum(axis=1, keepdims=True), 1)
        for ax, values, label in ((axes[0], counts, "count"), (axes[1], shares, "share of row")):
            ax.imshow(shares, cmap="Blues", vmin=0, vmax=1)
            if k <= 20:
                for (i, j), v in np.ndenumerate(values):
                    text = f"{v:d}" if values is counts else f"{v:.2f}"
                    color = "white" if shares[i, j] > 0.5 else "black"
                    ax.text(j, i, text, ha="center", va="center", fontsize=8, color=color)
            ax.set_xticks(range(k), class_names, rotation=90, fontsize=8)
            ax.set_yticks(range(k), class_names, fontsize=8)
            ax.set_xlabel("predicted")
            ax.set_ylabel("actual")
            ax.set_title(f"{title}: {label}", fontsize=9)
    fig.suptitle(f"test split, {next(iter(models.values())).n} images", fontsize=9)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
