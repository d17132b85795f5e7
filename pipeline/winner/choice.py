"""Which model is the winner, and its parts: the backbone up to its layer, the reduction and a
head as Keras layers.

The fine-tuned model wins when fine-tuning ran and kept an epoch that beat its starting head on
val (before any refit); else the chosen frozen cell, or, when its head cannot be Keras layers
(k-NN, random forest), the best cell of the ranking that can, and the card says so.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from pipeline.backbones.adapters import load_trained_on
from pipeline.features.store import open_features
from pipeline.finetuning.conversion import choose_head
from pipeline.finetuning.params import FinetuneParams
from pipeline.project.layout import Layout
from pipeline.project.provenance import current_prepared, expected_features, scanned_backbone
from pipeline.project.records import (
    BackboneRecord,
    BestChoice,
    PreparedRecord,
    RecordError,
)


@dataclass
class Winner:
    backbone: BackboneRecord
    prepared: PreparedRecord
    trunk: object  # keras.Model: preprocessed images -> the layer's output
    head: object  # keras.Model: reduced features -> class probabilities
    layer: str
    reduction: str
    head_name: str
    cell: str
    source: str  # fine-tuned | frozen
    why: str
    weights: str
    storage_dtype: str | None  # the features' rounding the frozen head was trained on


def _finetuned_status(params: FinetuneParams, layout: Layout, weights: str) -> dict | None:
    """finetune's report when it ran, refused unless for the current params; `kept_start` set
    when it kept its starting head."""
    if not params.finetune.enabled:
        return None
    status = (
        json.loads(layout.finetune_status.read_text()) if layout.finetune_status.is_file() else {}
    )
    current = {"config": params.finetune.model_dump(), "weights": weights, "enabled": True}
    if any(status.get(k) != v for k, v in current.items()):
        raise RecordError(
            f"{layout.finetune_status} is not the fine-tuning of the current params: "
            "run `dvc repro finetune`"
        )
    return status if status["best_epoch"] > 0 else status | {"kept_start": True}


def choose_winner(params: FinetuneParams, layout: Layout = Layout()) -> Winner:
    """The winner's parts, each checked against the current params and code."""
    import keras

    prepared = current_prepared(params, layout)
    backbone = scanned_backbone(params, layout)
    expect = expected_features(params, prepared, layout)
    features = open_features(layout.features_file("train"), expect).fingerprint
    best = BestChoice.read(layout.best, "dvc repro select")
    status = _finetuned_status(params, layout, features.weights_used)
    common = {"backbone": backbone, "prepared": prepared, "weights": features.weights_used}
    if status and not status.get("kept_start"):
        from pipeline.features.extractor import Preprocess, Reduce  # noqa: F401 (deserialised)
        from pipeline.finetuning.augment import RandomResizedCropFlip  # noqa: F401

        import_needs(needs(backbone))
        model = keras.saving.load_model(layout.finetuned_model, compile=False)
        trunk = model.get_layer(f"{backbone.name}_to_{status['layer']}")
        (head,) = [lyr for lyr in model.layers if isinstance(lyr, keras.Model) and lyr is not trunk]
        cell = status["started_from"]
        return Winner(
            **common,
            trunk=trunk,
            head=head,
            layer=status["layer"],
            reduction=features.extract["layers"][status["layer"]],
            head_name=status["head"],
            cell=cell,
            source="fine-tuned",
            why=(
                f"fine-tuning from {cell} kept epoch {status['best_epoch']}: val accuracy "
                f"{status['start_val_accuracy']:.4f} -> {status['val_accuracy']:.4f} "
                f"({status['val_estimate']})"
            ),
            storage_dtype=None,
        )
    start = choose_head(best, params.train, features, len(prepared.class_names), layout)
    model = load_trained_on(backbone, start.spec.layer, features.weights_used, start.spec.cell)
    from pipeline.backbones.keras_apps import tap

    layer = start.spec.layer
    trunk = keras.Model(model.inputs, tap(model, layer), name=f"{backbone.name}_to_{layer}")
    why = f"{best.cell} is the chosen cell ({best.metric} {best.value:.4f}, {best.selection_note})"
    if start.fallback:
        why = f"{start.fallback}: the export holds it"
    if status:
        why += "; fine-tuning kept its starting head (no epoch beat it on val)"
    return Winner(
        **common,
        trunk=trunk,
        head=start.model,
        layer=layer,
        reduction=start.spec.record.reduction,
        head_name=start.spec.record.head,
        cell=start.spec.cell,
        source="frozen",
        why=why,
        storage_dtype=params.extract.storage_dtype,
    )


def needs(backbone: BackboneRecord) -> list[str]:
    """What must be imported before the classifier loads: KerasHub's layers register there."""
    return ["keras_hub"] if backbone.family == "keras_hub" else []


def import_needs(modules: list[str]) -> None:
    """Import what a card's `needs` names, before its classifier loads."""
    import importlib

    for module in modules:
        importlib.import_module(module)
