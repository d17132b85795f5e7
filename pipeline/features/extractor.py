"""The one-pass extractor: uint8 images -> the backbone's own preprocessing -> its trunk ->
every requested layer reduced; the serializable Keras layers it is made of, on any backend."""

from __future__ import annotations

import keras
from keras import ops

from pipeline.backbones.adapters import load_backbone
from pipeline.backbones.keras_apps import preprocess, tap
from pipeline.features.reductions import bins, flat_width, grid_cells, patch_grid, reduced_width
from pipeline.project.records import BackboneRecord


@keras.saving.register_keras_serializable(package="pipeline")
class Preprocess(keras.layers.Layer):
    """uint8 images in, the backbone's own preprocessing applied on the device:
    keras.applications.<module>.preprocess_input, or a KerasHub image converter's
    `pixels * scale + offset` (per channel) when `scale` is given."""

    def __init__(self, module: str, scale=None, offset=None, **kwargs):
        kwargs.setdefault("dtype", "float32")
        super().__init__(**kwargs)
        self.module, self.scale, self.offset = module, scale, offset

    def call(self, x):
        x = ops.cast(x, "float32")
        if self.scale is None:
            return preprocess(self.module, x)
        return x * ops.convert_to_tensor(self.scale) + ops.convert_to_tensor(self.offset)

    def get_config(self):
        config = {"module": self.module, "scale": self.scale, "offset": self.offset}
        return {**super().get_config(), **config}

    @classmethod
    def of(cls, backbone: BackboneRecord) -> Preprocess:
        hub = backbone.hub
        return cls(backbone.module, *((hub.scale, hub.offset) if hub else ()))


@keras.saving.register_keras_serializable(package="pipeline")
class Reduce(keras.layers.Layer):
    """A layer's output reduced as features.reductions says: none, avg, max, cls, cls_avg or
    gridN. Token outputs (batch, tokens, width) have `prefix` tokens before their patches,
    the class token first."""

    def __init__(self, mode: str, prefix: int = 0, **kwargs):
        kwargs.setdefault("dtype", "float32")
        super().__init__(**kwargs)
        self.mode, self.prefix = mode, prefix

    def call(self, x):
        x = ops.cast(x, "float32")
        if len(x.shape) == 2 or self.mode == "none":
            return ops.reshape(x, (-1, flat_width(x.shape[1:])))
        if len(x.shape) == 3:  # tokens: the patch tokens as a square map
            cls = x[:, 0, :]
            side = patch_grid(x.shape[1], self.prefix)
            x = ops.reshape(x[:, self.prefix :, :], (-1, side, side, x.shape[-1]))
            if self.mode == "cls":
                return cls
            if self.mode == "cls_avg":
                return ops.concatenate([cls, ops.mean(x, axis=(1, 2))], axis=-1)
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
        return {**super().get_config(), "mode": self.mode, "prefix": self.prefix}


def build_extractor(backbone: BackboneRecord):
    """One model, uint8 images in, every layer of `backbone.layers` out (reduced): (model,
    weights used)."""
    model, weights_used = load_backbone(backbone, list(backbone.layers))
    outputs = [tap(model, layer) for layer in backbone.layers]
    trunk = keras.Model(model.inputs, outputs)
    images, reduced = reduced_features(backbone, trunk, backbone.layers)
    return keras.Model(images, reduced, name=f"{backbone.name}_extractor"), weights_used


def reduced_features(backbone: BackboneRecord, trunk, layers: dict[str, str], augment=None):
    """uint8 images -> the backbone's preprocessing -> [augment] -> `trunk` (inference mode)
    -> each output reduced as `layers` says: (the images input, the reduced outputs)."""
    images = keras.Input(trunk.inputs[0].shape[1:], dtype="uint8", name="images")
    x = Preprocess.of(backbone)(images)
    if augment is not None:
        x = augment(x)
    outputs = trunk(x, training=False)
    outputs = outputs if isinstance(outputs, (list, tuple)) else [outputs]
    prefix = backbone.hub.tokens.prefix if backbone.hub else 0
    reduced = [
        Reduce(mode, prefix, name=f"{layer}_{mode}")(o)
        for (layer, mode), o in zip(layers.items(), outputs)
    ]
    return images, reduced
