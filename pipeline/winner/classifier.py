"""The exported classifier: raw RGB images (uint8, any size) -> resized to the backbone's side
-> its preprocessing -> the trunk to the winner's layer -> the reduction -> [the rounding of
the features the frozen head was trained on] -> the head -> class probabilities.

Built-in Keras layers and keras.ops only, so `keras.saving.load_model` reads it in a process
that never imports this package (KerasHub backbones: after `import keras_hub`). Images already
at the side pass the resizing unchanged (`layerwise predict` resizes them as prepare does);
others are resized by Keras (antialiased), close to but not bit-equal with prepare's PIL.
"""

from __future__ import annotations

import os
from pathlib import Path

from pipeline.features.extractor import preprocess_affine, reduce_output
from pipeline.winner.choice import Winner

# PIL's filters (data.interpolation) -> Keras Resizing's nearest counterparts
KERAS_RESIZE = {
    "nearest": "nearest",
    "bilinear": "bilinear",
    "bicubic": "bicubic",
    "lanczos": "lanczos3",
    "box": "area",
    "hamming": "bilinear",
}


def build_classifier(winner: Winner, interpolation: str):
    import keras
    from keras import ops

    side = winner.backbone.image_size
    images = keras.Input((None, None, 3), dtype="uint8", name="images")
    x = keras.layers.Resizing(
        side, side, interpolation=KERAS_RESIZE[interpolation], antialias=True, name="resize"
    )(images)
    kernel, bias = preprocess_affine(winner.backbone)
    preprocess = keras.layers.Dense(3, name="preprocess", dtype="float32", trainable=False)
    x = preprocess(x)
    preprocess.set_weights([kernel, bias])
    prefix = winner.backbone.hub.tokens.prefix if winner.backbone.hub else 0
    features = reduce_output(winner.trunk(x), winner.reduction, prefix)
    if winner.storage_dtype and winner.storage_dtype != "float32":
        features = ops.cast(ops.cast(features, winner.storage_dtype), "float32")
    probs = winner.head(features)
    return keras.Model(images, probs, name="classifier")


def save_classifier(model, path: Path) -> None:
    """Saved under a temporary name and renamed: no half-written model is ever at `path`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.tmp.keras")
    model.save(tmp)
    os.replace(tmp, path)
