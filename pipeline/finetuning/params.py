"""Params of the finetune stage (LP-FT: the best head alone, then the top of the backbone)."""

from __future__ import annotations

from typing import Literal

from pipeline.project.params import MAX_BATCH, Section, Shared, integer, real
from pipeline.selection.params import TrainConfig


class FinetuneConfig(Section):
    enabled: bool = False
    unfreeze: str | None = None
    optimizer: Literal["adamw", "sgd"] = "adamw"
    learning_rate: float = real(1e-4, gt=0)
    layer_decay: float = real(0.3, gt=0, le=1)
    weight_decay: float = real(1e-4, ge=0)
    head_epochs: int = integer(2, ge=0)
    warmup_epochs: float = real(1, ge=0)
    epochs: int = integer(20, ge=1)
    patience: int = integer(8, ge=1)
    batch_size: int = integer(32, ge=1, le=MAX_BATCH)
    augment: bool = True
    augment_min_scale: float = real(1.0, gt=0, le=1)
    augment_vflip: bool = True
    # auto: mixed_bfloat16 on a GPU with bf16 support, float32 elsewhere
    precision: Literal["auto", "float32", "mixed_bfloat16", "mixed_float16"] = "auto"


class FinetuneParams(Shared):
    """What the finetune stage reads: the head's train params are part of its provenance."""

    train: TrainConfig = TrainConfig()
    finetune: FinetuneConfig = FinetuneConfig()
