"""Params of the train and select stages: which layers and heads, each head's own section (from
the head registry), how cells are estimated (cross-validation) and ranked."""

from __future__ import annotations

from typing import Literal

from pydantic import create_model, field_validator

from pipeline.heads.registry import HEAD_NAMES, HEADS, HeadName
from pipeline.project.params import MAX_MB, MAX_SEED, LayerName, Section, Shared, integer


class CvConfig(Section):
    """Choose layer and head by stratified k-fold cross-validation over train+val."""

    folds: int = integer(5, ge=0)  # 0: never (rank on the val split alone)
    when_val_under: int = integer(500, ge=0)  # applies when the val split has fewer images

    @field_validator("folds")
    @classmethod
    def _folds(cls, v: int) -> int:
        if v == 1:
            raise ValueError(
                "must be 0 (never: rank on the val split alone) or at least 2; "
                "fix it in params.yaml and run `dvc repro`"
            )
        return v


def _unique(name: str, items: list) -> list:
    if not items:
        raise ValueError(f"train.{name} is empty; list at least one")
    repeated = sorted({str(x) for x in items if items.count(x) > 1})
    if repeated:
        raise ValueError(f"train.{name} lists {', '.join(repeated)} more than once")
    return items


class _Train(Section):
    layers: list[LayerName] | None = None  # None: every extracted layer
    heads: list[HeadName] = list(HEAD_NAMES)
    seed: int = integer(0, ge=0, le=MAX_SEED)
    max_memory_mb: int = integer(2048, ge=1, le=MAX_MB)
    cv: CvConfig = CvConfig()

    @field_validator("layers")
    @classmethod
    def _layers(cls, v: list[str] | None) -> list[str] | None:
        return v if v is None else _unique("layers", v)

    @field_validator("heads")
    @classmethod
    def _heads(cls, v: list[str]) -> list[str]:
        return _unique("heads", v)

    def layers_of(self, extracted) -> list[str]:
        """train.layers, or every extracted layer (in extraction order) when it is null."""
        return list(extracted) if self.layers is None else list(self.layers)

    def head_params(self, head: str) -> dict:
        """The params one cell of `head` depends on: those its `train@<head>` stage lists."""
        return {
            "seed": self.seed,
            "max_memory_mb": self.max_memory_mb,
            "cv": self.cv.model_dump(mode="json"),
            head: getattr(self, head).model_dump(mode="json"),
        }


# train.<head> for every head of the registry, with its defaults
TrainConfig = create_model(
    "TrainConfig",
    __base__=_Train,
    __doc__="params.yaml `train`: what the train stages fit and how cells are estimated.",
    **{name: (head.config, head.config()) for name, head in HEADS.items()},
)


class SelectConfig(Section):
    metric: Literal["val_accuracy", "val_macro_f1"] = "val_accuracy"


class TrainParams(Shared):
    """What the train, select and evaluate stages read."""

    train: TrainConfig = TrainConfig()
    select: SelectConfig = SelectConfig()
