"""The adapter that builds a backbone record's model: keras.applications or KerasHub. Either
gives a model whose taps (keras_apps.taps) are the layers `extract.layers` names."""

from __future__ import annotations

from pipeline.project.records import BackboneRecord


def load_backbone(backbone: BackboneRecord, layers: list[str]):
    """The backbone of `backbone` holding every one of `layers`, with its weights: (model, the
    weights used)."""
    if backbone.family == "keras_hub":
        from pipeline.backbones.hub import load_backbone as load
    else:
        from pipeline.backbones.keras_apps import load_backbone as load
    return load(backbone, layers)
