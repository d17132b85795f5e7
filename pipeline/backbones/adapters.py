"""The adapter that builds a backbone record's model: keras.applications or KerasHub. Either
gives a model whose taps (keras_apps.taps) are the layers `extract.layers` names."""

from __future__ import annotations

from pipeline.project.errors import BackboneError
from pipeline.project.records import BackboneRecord, short


def load_backbone(backbone: BackboneRecord, layers: list[str]):
    """The backbone of `backbone` holding every one of `layers`, with its weights: (model, the
    weights used)."""
    if backbone.family == "keras_hub":
        from pipeline.backbones.hub import load_backbone as load
    else:
        from pipeline.backbones.keras_apps import load_backbone as load
    return load(backbone, layers)


def load_trained_on(backbone: BackboneRecord, layer: str, weights: str, cell: str):
    """`load_backbone` for a head `cell` trained on features of `weights`: refused unless the
    weights resolve to those again (a download or a changed file since)."""
    model, used = load_backbone(backbone, [layer])
    if used != weights:
        raise BackboneError(
            f"backbone.weights resolved to {short(used)}, the head {cell} was trained on "
            f"features of {short(weights)}: run `dvc repro`"
        )
    return model
