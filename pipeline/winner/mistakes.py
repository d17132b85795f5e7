"""What the winner gets wrong on the test split: reports/errors.csv (every mistake, most
confident first) and plots/mistakes.png (thumbnails of the most confident ones)."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np

from pipeline.project.layout import PreparedFiles

THUMBNAILS = 16


def test_sources(files: PreparedFiles) -> list[str]:
    """Each test image's source (a file under data.path, or the data set and its index), in
    the order of the prepared test split. manifest.csv rows are `split,index,label,<source as
    JSON>`: the label may hold commas, so the source is the first JSON string that parses."""
    found = {}
    for line in files.manifest.read_text().splitlines()[1:]:
        split, index, rest = line.split(",", 2)
        if split != "test":
            continue
        for k in (i for i, c in enumerate(rest) if c == "," and rest[i + 1 : i + 2] == '"'):
            try:
                found[int(index)] = json.loads(rest[k + 1 :])
                break
            except ValueError:
                continue
    return [found.get(i, "?") for i in range(len(found))]


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
