"""The head fine-tuning starts from, as Keras layers.

- a linear scikit-learn head (scaler -> logistic regression / linear SVM / SGD) is an affine
  map of the features, so it becomes one Dense layer with the scaler folded into its kernel
  and bias; its logits equal the pipeline's decision function;
- a Keras head is loaded with its trained weights;
- any other head (kNN, random forest) cannot be written as Keras layers: the best head of the
  ranking that can is used instead, and the reason is given.

Keras and scikit-learn are imported lazily.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from pipeline.heads.fit import keras_probabilities
from pipeline.heads.registry import HEADS, get_head
from pipeline.heads.saved import expected_head, load_head, read_head
from pipeline.project.errors import InputError
from pipeline.project.layout import Layout
from pipeline.project.records import BestChoice, Fingerprint, HeadRecord
from pipeline.selection.params import TrainConfig

MISSING_CLASS_BIAS = -1.0e4  # a class the head never saw: never predicted


class FinetuneError(InputError, ValueError):
    """Fine-tuning cannot start: the message says what is wrong and what to change or re-run."""


class NotExpressible(ValueError):
    """A head that cannot be written as Keras layers (the message says why)."""


@dataclass
class HeadSpec:
    """One trained head: its folder under models/heads/ and its checked head.json."""

    cell: str
    directory: Path
    record: HeadRecord

    @property
    def layer(self) -> str:
        return self.record.layer

    @property
    def kind(self) -> str:
        return self.record.kind


def _affine_step(name: str, step) -> tuple:
    """(A, c) with step.transform(x) == x @ A + c, A a vector (the map is diagonal)."""
    from sklearn.preprocessing import StandardScaler

    if isinstance(step, StandardScaler):
        width = step.n_features_in_
        scale = step.scale_ if step.with_std and step.scale_ is not None else np.ones(width)
        mean = step.mean_ if step.with_mean and step.mean_ is not None else np.zeros(width)
        return 1.0 / scale, -mean / scale
    raise NotExpressible(f"step {name!r} ({type(step).__name__}) is not an affine map")


def linear_head_weights(pipeline, n_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """Kernel (d, n_classes) and bias whose logits equal the pipeline's decision function.

    Binary heads get logits [0, f]: their softmax is the logistic regression's predict_proba.
    A multinomial logistic regression's softmax equals its predict_proba; for one-vs-rest and
    hinge-loss models the logits are the decision function, so the argmax (the prediction)
    is the same.
    """
    from sklearn.linear_model._base import LinearClassifierMixin

    steps = list(pipeline.steps) if hasattr(pipeline, "steps") else [("classifier", pipeline)]
    clf = steps[-1][1]
    if not isinstance(clf, LinearClassifierMixin):
        raise NotExpressible(f"its classifier {type(clf).__name__} is not linear")
    coef = clf.coef_.toarray() if hasattr(clf.coef_, "toarray") else np.asarray(clf.coef_)
    coef, bias = coef.astype(np.float64), np.atleast_1d(np.asarray(clf.intercept_, np.float64))
    if coef.shape[0] == 1:  # binary: one decision function f, class 1 when f > 0
        coef, bias = np.vstack([np.zeros_like(coef), coef]), np.array([0.0, bias[0]])
    kernel = coef.T  # (p, k)
    for step_name, step in reversed(steps[:-1]):
        if step is None or step == "passthrough":
            continue
        a, c = _affine_step(step_name, step)
        bias = c @ kernel + bias
        kernel = a[:, None] * kernel
    classes = np.asarray(clf.classes_)
    if (
        not np.issubdtype(classes.dtype, np.integer)
        or classes.min() < 0
        or classes.max() >= n_classes
    ):
        raise FinetuneError(
            f"the head's classes {classes.tolist()} are not indices of the {n_classes} prepared "
            "classes: run `dvc repro train`"
        )
    full_kernel = np.zeros((kernel.shape[0], n_classes))
    full_bias = np.full(n_classes, MISSING_CLASS_BIAS)
    full_kernel[:, classes], full_bias[classes] = kernel, bias
    return full_kernel.astype(np.float32), full_bias.astype(np.float32)


def linear_head(kernel: np.ndarray, bias: np.ndarray, name: str = "head"):
    """features -> Dense (logits, layer `head_logits`) -> softmax, all in float32."""
    import keras

    features = keras.Input((kernel.shape[0],), name="features")
    dense = keras.layers.Dense(kernel.shape[1], name="head_logits", dtype="float32")
    probs = keras.layers.Activation("softmax", name="probs", dtype="float32")(dense(features))
    dense.set_weights([kernel, bias])
    return keras.Model(features, probs, name=name)


def to_keras(model, kind: str, n_classes: int, name: str):
    """(Keras model features -> probabilities initialised from a trained head, the head's own
    predict function on features)."""
    if kind == "keras":  # its own predictions are taken before training
        return model, lambda x: np.argmax(keras_probabilities(model, x), axis=1)
    kernel, bias = linear_head_weights(model, n_classes)
    return linear_head(kernel, bias, name=name), model.predict


def head_to_keras(spec: HeadSpec, n_classes: int):
    """to_keras of a saved head, deserialised only after its digest is checked."""
    model = load_head(spec.directory, spec.record)
    return to_keras(model, spec.kind, n_classes, f"head_{spec.record.head}")


@dataclass
class StartingHead:
    spec: HeadSpec
    model: object  # keras.Model: features -> class probabilities
    frozen_predict: object  # the trained head's own prediction function on features
    fallback: str | None
    ranked_val_accuracy: float | None


def choose_head(
    best: BestChoice,
    train: TrainConfig,
    features: Fingerprint,
    n_classes: int,
    layout: Layout = Layout(),
) -> StartingHead:
    """The best head, or the best one of the ranking that Keras can express (with the reason).

    Each head must be the current train params' and code's on `features`, and each model is
    deserialised only if it has the digest best.json recorded."""
    metric = best.metric
    skipped = []
    for rank, entry in enumerate(best.ranking, start=1):
        if not get_head(entry.head).keras_layers:
            skipped.append(f"{entry.cell} ({entry.head} is not a map Keras layers can hold)")
            continue
        directory = layout.cell_dir(entry.layer, entry.head)
        expect = expected_head(entry.layer, entry.head, train, features)
        spec = HeadSpec(entry.cell, directory, read_head(directory, expect, entry.model_sha256))
        try:
            model, predict = head_to_keras(spec, n_classes)
        except NotExpressible as exc:
            skipped.append(f"{entry.cell} ({exc})")
            continue
        fallback = None
        if skipped:
            fallback = (
                f"the best head {skipped[0]} cannot be expressed in Keras"
                + (f", nor can {', '.join(skipped[1:])}" if skipped[1:] else "")
                + f"; the best that can is {entry.cell}, ranked #{rank} by {metric}"
                + f" ({getattr(entry, metric):.4f})"
            )
        return StartingHead(spec, model, predict, fallback, entry.val_accuracy)
    raise FinetuneError(
        "no head in models/best.json can be expressed in Keras: "
        + "; ".join(skipped)
        + f". Add one of {', '.join(n for n, h in HEADS.items() if h.keras_layers)} to train.heads."
    )


def refit_on_train(start: StartingHead, cfg: TrainConfig, expect: dict, layout: Layout):
    """The starting head fitted again, on the train split alone (same head, params and
    features): a head refit on train+val after cross-validation has seen the val split, which
    fine-tuning holds out to stop early and to compare against."""
    import tempfile

    from pipeline.features.store import open_splits
    from pipeline.selection.cells import fit_on_train

    spec = start.spec
    splits = open_splits(layout, expect)
    with tempfile.TemporaryDirectory() as log_dir:
        fit = fit_on_train(
            spec.record.head, cfg, splits["train"], splits["val"], spec.layer, Path(log_dir)
        )
    n_classes = len(spec.record.class_names)
    model, predict = to_keras(fit.model, spec.kind, n_classes, f"head_{spec.record.head}")
    return replace(start, model=model, frozen_predict=predict)
