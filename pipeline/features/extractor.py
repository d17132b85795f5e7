"""The one-pass extractor: uint8 images -> the backbone's own preprocessing -> its trunk ->
every requested layer reduced; the serializable Keras layers it is made of, on any backend."""

from __future__ import annotations

import keras
from keras import ops

from pipeline.backbones.keras_apps import load_backbone, preprocess, tap
from pipeline.features.reductions import bins, flat_width, grid_cells, reduced_width
from pipeline.project.records import BackboneRecord


@keras.saving.register_keras_serializable(package="pipeline")
class Preprocess(keras.layers.Layer):
    """uint8 images in, keras.applications.<module>.preprocess_input applied on the device."""

    def __init__(self, module: str, **kwargs):
        kwargs.setdefault("dtype", "float32")
        super().__init__(**kwargs)
        self.module = module

    def call(self, x):
        return preprocess(self.module, ops.cast(x, "float32"))

    def get_config(self):
        return {**super().get_config(), "module": self.module}


@keras.saving.register_keras_serializable(package="pipeline")
class Reduce(keras.layers.Layer):
    """A layer's output reduced as features.reductions says: none, avg, max or gridN."""

    def __init__(self, mode: str, **kwargs):
        kwargs.setdefault("dtype", "float32")
        super().__init__(**kwargs)
        self.mode = mode

    def call(self, x):
        x = ops.cast(x, "float32")
        if len(x.shape) == 2 or self.mode == "none":
            return ops.reshape(x, (-1, flat_width(x.shape[1:])))
        if self.mode == "avg":
            return ops.mean(x, axis=(1, 2))
        if self.mode == "max":
            return ops.max(x, axis=(1, 2))
        n = grid_cells(self.mode)
        rows, cols = bins(x.shape[1], n), bins(x.shape[2], n)
        cells = [ops.mean(x[:, r0:r1, c0:c1, :], axis=(1, 2)) for r0, r1 in rows for c0, c1 in cols]
        return ops.concatenate(cells, axis=-1)

    def compute_output_shape(self, input_shape):
        return (input_shape[0], reduced_width(input_shape[1:], self.mode))

    def get_config(self):
        return {**super().get_config(), "mode": self.mode}


def build_extractor(backbone: BackboneRecord):
    """One model, uint8 images in, every layer of `backbone.layers` out (reduced): (model,
    weights used)."""
    model, weights_used = load_backbone(backbone, list(backbone.layers))
    outputs = [tap(model, layer) for layer in backbone.layers]
    trunk = keras.Model(model.inputs, outputs)
    images, reduced = reduced_features(backbone.module, trunk, backbone.layers)
    return keras.Model(images, reduced, name=f"{backbone.name}_extractor"), weights_used


def reduced_features(module: str, trunk, layers: dict[str, str], augment=None):
    """uint8 images -> the backbone's preprocessing -> [augment] -> `trunk` (inference mode)
    -> each output reduced as `layers` says: (the images input, the reduced outputs)."""
    images = keras.Input(trunk.inputs[0].shape[1:], dtype="uint8", name="images")
    x = Preprocess(module)(images)
    if augment is not None:
        x = augment(x)
    outputs = trunk(x, training=False)
    outputs = outputs if isinstance(outputs, (list, tuple)) else [outputs]
    reduced = [
        Reduce(mode, name=f"{layer}_{mode}")(o) for (layer, mode), o in zip(layers.items(), outputs)
    ]
    return images, reduced
