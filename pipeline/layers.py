"""Serializable Keras layers shared by extraction and fine-tuning, on any Keras backend."""

from __future__ import annotations

import keras
from keras import ops

from pipeline.backbones import get_backbone, load_backbone


@keras.saving.register_keras_serializable(package="pipeline")
class Preprocess(keras.layers.Layer):
    """uint8 images in, the backbone's own `preprocess_input` applied on the device, float32."""

    def __init__(self, backbone: str, **kwargs):
        kwargs.setdefault("dtype", "float32")
        super().__init__(**kwargs)
        self.backbone = backbone

    def call(self, x):
        return get_backbone(self.backbone).preprocess(ops.cast(x, "float32"))

    def get_config(self):
        return {**super().get_config(), "backbone": self.backbone}


@keras.saving.register_keras_serializable(package="pipeline")
class Reduce(keras.layers.Layer):
    """Per-layer reduction of a feature map: none (flatten), avg, max, or gridN (NxN average)."""

    def __init__(self, mode: str, **kwargs):
        kwargs.setdefault("dtype", "float32")
        super().__init__(**kwargs)
        self.mode = mode

    def call(self, x):
        x = ops.cast(x, "float32")
        if len(x.shape) == 2 or self.mode == "none":
            return ops.reshape(x, (-1, _width(x.shape[1:])))
        if self.mode == "avg":
            return ops.mean(x, axis=(1, 2))
        if self.mode == "max":
            return ops.max(x, axis=(1, 2))
        n = int(self.mode.removeprefix("grid"))
        rows = [_bins(x.shape[1], n), _bins(x.shape[2], n)]
        cells = [
            ops.mean(x[:, r0:r1, c0:c1, :], axis=(1, 2)) for r0, r1 in rows[0] for c0, c1 in rows[1]
        ]
        return ops.concatenate(cells, axis=-1)

    def compute_output_shape(self, input_shape):
        return (input_shape[0], reduced_width(input_shape[1:], self.mode))

    def get_config(self):
        return {**super().get_config(), "mode": self.mode}


def _width(shape) -> int:
    width = 1
    for d in shape:
        width *= int(d)
    return width


def _bins(length: int, n: int) -> list[tuple[int, int]]:
    """Adaptive pooling bins: n windows covering `length`, each at least one wide."""
    return [
        ((i * length) // n, max(-(-(i + 1) * length // n), (i * length) // n + 1)) for i in range(n)
    ]


def reduced_width(shape, mode: str) -> int:
    if len(shape) == 1 or mode == "none":
        return _width(shape)
    if mode in ("avg", "max"):
        return int(shape[-1])
    n = int(mode.removeprefix("grid"))
    return n * n * int(shape[-1])


def build_extractor(name: str, weights: str, size: int, layers: dict[str, str]):
    """One model, uint8 images in, every requested layer out (reduced): (model, weights used)."""
    from pipeline.backbones import BackboneError

    backbone, weights_used = load_backbone(name, weights, size, list(layers))
    for layer, mode in layers.items():
        shape = backbone.get_layer(layer).output.shape
        if len(shape) != 4 and mode != "none":
            raise BackboneError(
                f"extract.layers.{layer}: reduction {mode!r} needs a spatial (4-D) output, but "
                f"{layer} is {tuple(shape)}; use none"
            )
    trunk = keras.Model(backbone.inputs, [backbone.get_layer(layer).output for layer in layers])
    images, reduced = reduced_features(name, trunk, layers)
    return keras.Model(images, reduced, name=f"{name}_extractor"), weights_used


def reduced_features(name: str, trunk, layers: dict[str, str], augment=None):
    """uint8 images -> the backbone's preprocessing -> [augment] -> `trunk` (inference mode)
    -> each output reduced as `layers` says: (the images input, the reduced outputs)."""
    images = keras.Input(trunk.inputs[0].shape[1:], dtype="uint8", name="images")
    x = Preprocess(name)(images)
    if augment is not None:
        x = augment(x)
    outputs = trunk(x, training=False)
    outputs = outputs if isinstance(outputs, (list, tuple)) else [outputs]
    reduced = [
        Reduce(mode, name=f"{layer}_{mode}")(o) for (layer, mode), o in zip(layers.items(), outputs)
    ]
    return images, reduced
