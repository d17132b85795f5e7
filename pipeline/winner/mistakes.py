"""What the winner gets wrong on the test split: reports/errors.csv (every mistake, most
confident first) and plots/mistakes.png (thumbnails of the most confident ones)."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np

THUMBNAILS = 16


def mistakes(labels: np.ndarray, probs: np.ndarray) -> np.ndarray:
    """Indices of the wrongly predicted images, the most confident mistake first."""
    predicted = probs.argmax(axis=1)
    wrong = np.flatnonzero(predicted != labels)
    return wrong[np.argsort(-probs[wrong, predicted[wrong]], kind="stable")]


def write_errors(path: Path, sources, class_names, labels, probs, order) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["file", "true", "predicted", "confidence", "true_class_probability"])
        for i in order:
            p = int(probs[i].argmax())
            writer.writerow(
                [
                    sources[i],
                    class_names[labels[i]],
                    class_names[p],
                    f"{probs[i, p]:.4f}",
                    f"{probs[i, labels[i]]:.4f}",
                ]
            )


def mistakes_png(path: Path, images, class_names, labels, probs, order, title: str) -> None:
    """A grid of the most confident mistakes, each titled true -> predicted (confidence)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shown = list(order[:THUMBNAILS])
    cols = max(1, min(4, len(shown)))
    rows = max(1, -(-len(shown) // cols))
    fig, axes = plt.subplots(rows, cols, figsize=(2.4 * cols, 2.6 * rows + 0.4), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, i in zip(axes.flat, shown):
        p = int(probs[i].argmax())
        ax.imshow(np.asarray(images[int(i)]))
        ax.set_title(
            f"{class_names[labels[i]]} -> {class_names[p]}\n({probs[i, p]:.2f})", fontsize=8
        )
    if not shown:
        axes[0, 0].text(0.5, 0.5, "no mistakes on the test split", ha="center", va="center")
    fig.suptitle(title, fontsize=9)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
