"""The whole params.yaml: every section, no unknown key, checked against the backbone registry
(name, layers, input side) and resolved: the backbone record scan writes for the stages that
build it."""

from __future__ import annotations

from pathlib import Path

from pydantic import ConfigDict

from pipeline.backbones.registry import get_backbone
from pipeline.finetuning.params import FinetuneConfig
from pipeline.project.errors import InputError, closest
from pipeline.project.params import ConfigError, Shared, read_params, validate
from pipeline.project.records import BackboneRecord
from pipeline.selection.params import SelectConfig, TrainConfig


class Params(Shared):
    """Every section of params.yaml."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    train: TrainConfig = TrainConfig()
    select: SelectConfig = SelectConfig()
    finetune: FinetuneConfig = FinetuneConfig()


def check(raw: dict | None) -> tuple[Params, BackboneRecord]:
    """`raw` validated, its backbone resolved (extract.layers: auto made explicit, every layer
    checked against the built model's facts) and train.layers checked against the extracted
    layers; a ConfigError names what is wrong."""
    params = validate(Params, raw)
    bb, size = params.backbone, params.data.image_size
    try:
        spec = get_backbone(bb.name)
    except InputError as exc:
        raise ConfigError(f"backbone.name: {exc}") from None
    try:
        backbone = spec.record(bb.weights, size, params.extract.layers)
    except InputError as exc:
        raise ConfigError(str(exc)) from None
    layers = backbone.layers
    missing = [layer for layer in params.train.layers_of(layers) if layer not in layers]
    if missing:
        raise ConfigError(
            f"train.layers {missing} are not extracted (extract.layers gives "
            f"{', '.join(layers)}){closest(missing[0], layers)} Add them to extract.layers, "
            "or drop them from train.layers (null: every extracted layer)"
        )
    return params, backbone


def load(path: str | Path = "params.yaml") -> tuple[Params, BackboneRecord]:
    """Read params.yaml and check it whole."""
    return check(read_params(path))
