"""Test metrics of the best frozen head (and the fine-tuned one), confusion data, layer chart."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np

from pipeline import paths
from pipeline.config import HEADS, TrainConfig
from pipeline.heads import Plan, load_head, predict, read_head
from pipeline.provenance import code_digest, head_params
from pipeline.records import BestChoice, RecordError
from pipeline.scoring import score
from pipeline.store import open_features


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
    heads = [h for h in HEADS if any(k[1] == h for k in acc)]
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


def confusion_png(
    path: Path, class_names: list[str], actual: np.ndarray, predicted: np.ndarray, title: str
) -> None:
    """Counts and row-normalised shares side by side, for viewing without DVC's HTML."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    k = len(class_names)
    counts = np.zeros((k, k), np.int64)
    np.add.at(counts, (actual, predicted), 1)
    shares = counts / np.maximum(counts.sum(axis=1, keepdims=True), 1)
    side = 1.6 + 0.45 * k
    fig, axes = plt.subplots(1, 2, figsize=(2 * side + 1, side + 0.6), constrained_layout=True)
    for ax, values, label in ((axes[0], counts, "count"), (axes[1], shares, "share of row")):
        ax.imshow(shares, cmap="Blues", vmin=0, vmax=1)
        if k <= 20:
            for (i, j), v in np.ndenumerate(values):
                text = f"{v:d}" if values is counts else f"{v:.2f}"
                ax.text(
                    j,
                    i,
                    text,
                    ha="center",
                    va="center",
                    fontsize=8,
                    color="white" if shares[i, j] > 0.5 else "black",
                )
        ax.set_xticks(range(k), class_names, rotation=90, fontsize=8)
        ax.set_yticks(range(k), class_names, fontsize=8)
        ax.set_xlabel("predicted")
        ax.set_ylabel("actual")
        ax.set_title(label)
    fig.suptitle(title, fontsize=9)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _method(best: BestChoice) -> str:
    return f"{best.cv_folds}-fold CV over train+val" if best.selection == "cv" else "val split"


def evaluate(
    train: TrainConfig,
    expect: dict | None,
    features: Path = paths.FEATURES,
    best_file: Path = paths.BEST,
    leaderboard: Path = Path("reports/leaderboard.csv"),
    finetune_file: Path = Path("metrics/finetune.json"),
    out: Path = Path("metrics/test.json"),
    plots: Path = Path("plots"),
) -> dict:
    """Score the best frozen head on the test split; write test.json, confusion CSVs, layers.png.

    The test features must match `expect` (the current params and code), the head must have been
    trained on them under the current `train` params, and its model file must have the digest
    best.json recorded, checked before it is deserialised."""
    best = BestChoice.read(best_file, "dvc repro select")
    test = open_features(Path(features) / "test.h5", expect)
    if best.features != test.fingerprint.digest:
        raise RecordError(
            f"{best_file} was chosen among heads trained on other features than {test.path}: "
            "run `dvc repro train select`"
        )
    directory = Path(best.model).parent
    expect_head = {
        "cell": best.cell,
        "params": head_params(train, best.head),
        "features": test.fingerprint.model_dump(mode="json"),
        "code": code_digest("train"),
    }
    info = read_head(directory, expect_head, model_sha256=best.ranking[0].model_sha256)
    model = load_head(directory, info)
    layer = info.layer
    plan = Plan.for_matrix(len(test.labels), test.widths[layer], train.max_memory_mb)
    predicted = predict(model, info.kind, test, layer, plan.block_rows)
    s = score(test.labels, predicted, len(test.class_names))
    fp = test.fingerprint
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
    finetune = json.loads(Path(finetune_file).read_text()) if Path(finetune_file).is_file() else {}
    if finetune.get("enabled"):
        keys = ("test_accuracy", "test_accuracy_ci95", "test_macro_f1", "val_accuracy")
        result["finetuned"] = {k: finetune.get(k) for k in keys}
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out).write_text(json.dumps(result, indent=2) + "\n")
    for name in ("confusion.csv", "confusion_normalized.csv"):
        write_confusion(Path(plots) / name, test.class_names, test.labels, predicted)
    confusion_png(
        Path(plots) / "confusion.png",
        test.class_names,
        test.labels,
        predicted,
        f"{best.cell} on the test split ({s.n} images)",
    )
    with Path(leaderboard).open() as f:
        ranking = [{**r, "val_accuracy": float(r["val_accuracy"])} for r in csv.DictReader(f)]
    layer_chart(
        Path(plots) / "layers.png",
        ranking,
        list(fp.layers),
        f"Accuracy by layer and head ({_method(best)}): {fp.backbone['name']} "
        f"({fp.weights_used} weights); \u2605 selected",
        1.0 / len(test.class_names),
    )
    return result
