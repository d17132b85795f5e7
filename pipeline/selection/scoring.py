"""The one scoring function of the project: accuracy with its 95% Wilson interval, and
macro-F1 over every class (a class never predicted scores 0), for heads, selection,
fine-tuning and evaluation alike."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

Z95 = 1.959963984540054


def wilson_interval(correct: int, n: int, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval of a proportion `correct / n` (sound for small n and p near 0 or 1)."""
    if n == 0:
        return 0.0, 1.0
    p = correct / n
    denominator = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denominator
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denominator
    return max(0.0, centre - half), min(1.0, centre + half)


@dataclass(frozen=True)
class Scores:
    accuracy: float
    accuracy_ci95: tuple[float, float]
    macro_f1: float
    n: int


def score(labels: np.ndarray, predicted: np.ndarray, n_classes: int) -> Scores:
    from sklearn.metrics import f1_score

    labels, predicted = np.asarray(labels), np.asarray(predicted)
    correct = int(np.sum(labels == predicted))
    n = len(labels)
    f1 = f1_score(labels, predicted, labels=np.arange(n_classes), average="macro", zero_division=0)
    low, high = wilson_interval(correct, n)
    return Scores(
        accuracy=round(correct / n, 6) if n else 0.0,
        accuracy_ci95=(round(low, 4), round(high, 4)),
        macro_f1=round(float(f1), 6),
        n=n,
    )


def split_report(labels: np.ndarray, predicted: np.ndarray, class_names: list[str]):
    """`score` with each class's precision, recall and support, and the confusion matrix."""
    from sklearn.metrics import confusion_matrix, precision_recall_fscore_support

    from pipeline.project.records import ClassScores, SplitReport

    k = len(class_names)
    s = score(labels, predicted, k)
    p, r, _, support = precision_recall_fscore_support(
        labels, predicted, labels=np.arange(k), zero_division=0
    )
    return SplitReport(
        accuracy=s.accuracy,
        accuracy_ci95=s.accuracy_ci95,
        macro_f1=s.macro_f1,
        n=s.n,
        per_class=[
            ClassScores(
                name=c, precision=round(float(pi), 6), recall=round(float(ri), 6), support=int(n)
            )
            for c, pi, ri, n in zip(class_names, p, r, support)
        ],
        confusion=confusion_matrix(labels, predicted, labels=np.arange(k)).tolist(),
    )
