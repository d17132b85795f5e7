"""One scoring function: accuracy with a Wilson interval and macro-F1 over every class."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.selection.scoring import score, wilson_interval


@pytest.mark.parametrize(
    "correct, n, low, high",
    [
        (8, 10, 0.4902, 0.9433),  # textbook values (Wilson 1927; Newcombe 1998, table I)
        (0, 10, 0.0, 0.2775),
        (10, 10, 0.7225, 1.0),
    ],
)
def test_wilson_interval_known_values(correct, n, low, high):
    got = wilson_interval(correct, n)
    assert got == pytest.approx((low, high), abs=1e-4)


def test_score_counts_every_class_and_brackets_the_accuracy():
    labels = np.array([0, 0, 1, 1, 2, 2])
    predicted = np.array([0, 0, 1, 0, 0, 0])  # class 2 never predicted
    s = score(labels, predicted, n_classes=4)  # class 3 absent from both
    assert s.accuracy == pytest.approx(3 / 6) and s.n == 6
    # per-class F1: 4/7 (0: P 2/5, R 1), 2/3 (1: P 1, R 1/2), 0 (2), 0 (3, absent): a class
    # never predicted counts as 0
    assert s.macro_f1 == pytest.approx((4 / 7 + 2 / 3) / 4, abs=1e-6)
    assert s.accuracy_ci95[0] < s.accuracy < s.accuracy_ci95[1]


def test_finetuning_scores_through_the_same_function():
    from pipeline.finetuning.job import _scores

    labels = np.array([0, 0, 1, 1, 2, 2])
    probs = np.eye(4)[[0, 0, 1, 0, 0, 0]] * 0.9 + 0.025
    got = _scores(labels, probs)
    want = score(labels, np.argmax(probs, axis=1), 4)
    assert (got["accuracy"], got["macro_f1"]) == (want.accuracy, want.macro_f1)
    assert got["accuracy_ci95"] == list(want.accuracy_ci95)
