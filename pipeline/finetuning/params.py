"""Params of the finetune stage (LP-FT: the best head alone, then the top of the backbone)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from pipeline.project.params import Section, Shared
from pipeline.selection.params import TrainConfig


class FinetuneConfig(Section):
    enabled: bool = False
    unfreeze: str | None = None
    optimizer: Literal["adamw", "sgd"] = "adamw"
    learning_rate: float = Field(1e-4, gt=0)
    layer_decay: float = Field(0.3, gt=0, le=1)
    weight_decay: float = Field(1e-4, ge=0)
    head_epochs: int = Field(2, ge=0)
    warmup_epochs: float = Field(1, ge=0)
    epochs: int = Field(20, ge=1)
    patience: int = Field(8, ge=1)
    batch_size: int = Field(32, ge=1)
    augment: bool = True
    augment_min_scale: float = Field(1.0, gt=0, le=1)
    augment_vflip: bool = True
    # auto: mixed_bfloat16 on a GPU with bf16 support, float32 elsewhere
    precision: Literal["auto", "float32", "mixed_bfloat16", "mixed_float16"] = "auto"


class FinetuneParams(Shared):
    """What the finetune stage reads: the head's train params are part of its provenance."""

    train: TrainConfig = TrainConfig()
    finetune: FinetuneConfig = FinetuneConfig()
