"""`layerwise predict --top`: a keras.applications backbone with its own ImageNet top, as is,
as a classifier of the 1,000 ImageNet classes (the first of the classic uses of a pretrained
network). Class names come from Keras's class index file when it is in Keras's cache or can
be downloaded; offline without it, classes are their indices and a note says so."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from pipeline.backbones.hub_rows import HubBackbone
from pipeline.backbones.keras_apps import (
    IMAGENET_HOST,
    keras_models_dir,
    load_backbone,
    preprocess,
    reachable,
)
from pipeline.backbones.registry import get_backbone
from pipeline.project.errors import BackboneError
from pipeline.winner.predict import Classifier

CLASS_INDEX = "imagenet_class_index.json"  # Keras's name for it in its cache
CLASS_INDEX_MD5 = "c2c37ea517e94d9795004a39431a14cb"  # as keras's decode_predictions checks it


def class_names() -> tuple[list[str], str | None]:
    """The 1,000 ImageNet class names in index order, or their indices and a note."""
    cached = keras_models_dir() / CLASS_INDEX
    if not cached.is_file() and reachable(IMAGENET_HOST):
        import keras
        from keras.src.applications.imagenet_utils import CLASS_INDEX_PATH

        keras.utils.get_file(
            CLASS_INDEX, CLASS_INDEX_PATH, cache_subdir="models", file_hash=CLASS_INDEX_MD5
        )
    if cached.is_file():
        index = json.loads(cached.read_text())
        return [index[str(i)][1] for i in range(len(index))], None
    return [str(i) for i in range(1000)], (
        f"ImageNet class names need {cached} ({IMAGENET_HOST} cannot be reached to download "
        "it): classes are given by index"
    )


def top_classifier(name: str, weights: str) -> tuple[Classifier, str | None]:
    """`name` (a keras.applications backbone) with its ImageNet top and `weights` (imagenet,
    auto with Keras's file cached, or a .weights.h5 file saved with the top), rows listing the
    5 most probable classes; and why the classes are indices, when they are."""
    spec = get_backbone(name)
    if isinstance(spec, HubBackbone):
        raise BackboneError(
            f"--top: {name} is a KerasHub backbone, which has no ImageNet classification top; "
            "give a keras.applications backbone (`layerwise backbones` lists them)"
        )
    side = spec.facts.top_side
    record = spec.record(weights, side, {min(spec.top_names): "none"})
    if record.identity in ("random", "auto:not-cached"):
        raise BackboneError(
            f"--top needs trained weights, and backbone.weights={weights!r} gives {name} random "
            f"ones (ImageNet weights are not in {keras_models_dir()}): give --weights imagenet "
            "(downloaded by Keras) or a .weights.h5 file saved from a model with its top"
        )
    model, _ = load_backbone(record, list(record.layers))
    names, note = class_names()

    def predict_batch(images: np.ndarray) -> np.ndarray:
        x = preprocess(record.module, images.astype(np.float32))
        return np.asarray(model.predict_on_batch(x))

    return Classifier(predict_batch, names, side, "bilinear", top_k=5), note


def backbone_of(project: Path) -> tuple[str, str]:
    """(backbone.name, backbone.weights) of the project's params.yaml."""
    from pipeline.project.params import read_params

    backbone = read_params(Path(project) / "params.yaml").get("backbone") or {}
    return backbone.get("name", "vgg16"), str(backbone.get("weights", "auto"))
