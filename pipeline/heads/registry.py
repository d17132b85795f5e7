"""The head registry: each head's name, kind, params section, memory factor and whether Keras
layers can hold it. The params' accepted head names, the fit dispatch, the memory plan, what
fine-tuning may start from and the order that breaks ties all derive from this table.

Adding a head is one entry here plus its fit code (heads.estimators for a scikit-learn head).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Literal

from pydantic import Field

from pipeline.project.errors import InputError
from pipeline.project.params import MAX_BATCH, Section, integer, real
from pipeline.project.records import HeadKind


class LogregConfig(Section):
    C: float = real(1.0, gt=0)
    max_iter: int = integer(1000, ge=1)


class LinearSvmConfig(Section):
    C: float = real(1.0, gt=0)
    max_iter: int = integer(5000, ge=1)


class KnnConfig(Section):
    n_neighbors: int = integer(5, ge=1)
    weights: Literal["uniform", "distance"] = "distance"


class RandomForestConfig(Section):
    n_estimators: int = integer(200, ge=1)
    max_depth: int | None = integer(None, ge=1)


class DenseConfig(Section):
    hidden: list[Annotated[int, Field(ge=1, le=MAX_BATCH, strict=True)]] = [256]  # units per layer
    dropout: float = real(0.5, ge=0, lt=1)
    learning_rate: float = real(1e-3, gt=0)
    epochs: int = integer(50, ge=1)
    patience: int = integer(5, ge=1)
    batch_size: int = integer(64, ge=1, le=MAX_BATCH)


@dataclass(frozen=True)
class Head:
    name: str
    kind: HeadKind  # how it is fitted and saved (layout.MODEL_FILES)
    config: type[Section]  # its params section, train.<name>
    # peak memory of a fit in memory over the size of the float32 matrix (measured on
    # 3000 x 25088: ~3.3x; liblinear copies the data into its own float64 format: ~8x)
    memory_factor: float
    keras_layers: bool  # Keras layers can hold it (an affine map or a Keras model)


# In the order that breaks ties between cells: heads fine-tuning can start from, simplest first.
HEADS: dict[str, Head] = {
    h.name: h
    for h in (
        Head("logreg", "sklearn", LogregConfig, 4, True),
        Head("linear_svm", "sklearn", LinearSvmConfig, 9, True),
        Head("dense", "keras", DenseConfig, 4, True),
        Head("knn", "sklearn", KnnConfig, 4, False),
        Head("random_forest", "sklearn", RandomForestConfig, 4, False),
    )
}
HEAD_NAMES = tuple(HEADS)
HeadName = Literal[HEAD_NAMES]


class HeadError(InputError, ValueError):
    """A head name that is not in the registry."""


def get_head(name: str) -> Head:
    try:
        return HEADS[name]
    except KeyError:
        raise HeadError(f"unknown head {name!r}; accepted: {', '.join(HEAD_NAMES)}") from None
