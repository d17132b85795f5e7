"""The one-pass extractor: uint8 images -> the backbone's own preprocessing -> its trunk ->
every requested layer reduced; the serializable Keras layers it is made of, on any backend."""

from __future__ import annotations

import keras
import numpy as np
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
        return reduce_output(x, self.mode, self.prefix)

    def compute_output_shape(self, input_shape):
        return (input_shape[0], reduced_width(input_shape[1:], self.mode))

    def get_config(self):
        return {**super().get_config(), "mode": self.mode, "prefix": self.prefix}


def reduce_output(x, mode: str, prefix: int = 0):
    """`x` (a map, tokens with `prefix` tokens before the patches, or a vector) reduced as
    features.reductions says, in float32; keras.ops alone, so that a model built with it
    needs no custom layer (the exported classifier)."""
    x = ops.cast(x, "float32")
    if len(x.shape) == 2 or mode == "none":
        return ops.reshape(x, (-1, flat_width(x.shape[1:])))
    if len(x.shape) == 3:  # tokens: the patch tokens as a square map
        cls = x[:, 0, :]
        side = patch_grid(x.shape[1], prefix)
        x = ops.reshape(x[:, prefix:, :], (-1, side, side, x.shape[-1]))
        if mode == "cls":
            return cls
        if mode == "cls_avg":
            return ops.concatenate([cls, ops.mean(x, axis=(1, 2))], axis=-1)
    if mode == "avg":
        return ops.mean(x, axis=(1, 2))
    if mode == "max":
        return ops.max(x, axis=(1, 2))
    n = grid_cells(mode)
    rows, cols = bins(x.shape[1], n), bins(x.shape[2], n)
    cells = [ops.mean(x[:, r0:r1, c0:c1, :], axis=(1, 2)) for r0, r1 in rows for c0, c1 in cols]
    return ops.concatenate(cells, axis=-1)


def preprocess_affine(backbone: BackboneRecord):
    """(kernel (3, 3), bias (3,)): the backbone's preprocessing as the affine map of a pixel's
    channels it is (RGB->BGR flips, means, scales), read off `Preprocess` at probe pixels and
    checked at random ones; a Dense layer holds it without custom code."""
    layer = Preprocess.of(backbone)
    probes = np.array([[0, 0, 0], [1, 0, 0], [0, 1, 0], [0, 0, 1]], "float32") * 255.0
    out = np.asarray(layer(probes.reshape(1, 2, 2, 3))).reshape(4, 3).astype("float64")
    bias, kernel = out[0], (out[1:] - out[0]) / 255.0
    pixels = np.random.default_rng(0).integers(0, 256, (1, 8, 8, 3)).astype("float32")
    got = np.asarray(layer(pixels)).astype("float64")
    if not np.allclose(pixels @ kernel + bias, got, rtol=1e-5, atol=1e-4):
        raise ValueError(f"{backbone.name}'s preprocessing is not an affine map of the channels")
    return kernel.astype("float32"), bias.astype("float32")


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
