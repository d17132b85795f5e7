"""Augmentation for fine-tuning: random resized crop and horizontal flip as one Keras layer."""

from __future__ import annotations

import math

import keras
from keras import ops


@keras.saving.register_keras_serializable(package="pipeline")
class RandomResizedCropFlip(keras.layers.Layer):
    """torchvision's RandomResizedCrop (a random share of the area in [min_scale, 1], aspect
    ratio in [3/4, 4/3], resized back) and a random horizontal flip, in one affine map per
    image; the identity at inference. min_scale 1: the flip alone (no crop, no stretch);
    vflip: a random vertical flip as well."""

    def __init__(
        self, min_scale: float = 0.5, seed: int | None = None, vflip: bool = False, **kwargs
    ):
        kwargs.setdefault("dtype", "float32")
        super().__init__(**kwargs)
        self.min_scale, self.seed, self.vflip = min_scale, seed, vflip
        self.seeds = keras.random.SeedGenerator(seed)

    def call(self, x, training=False):
        if not training:
            return x
        n, rows, cols = ops.shape(x)[0], x.shape[1], x.shape[2]
        u = [keras.random.uniform((n,), seed=self.seeds) for _ in range(5)]
        area = self.min_scale + (1 - self.min_scale) * u[0]
        aspect = ops.exp(math.log(3 / 4) + math.log(16 / 9) * u[1])
        w = ops.minimum(ops.sqrt(area * aspect), 1.0)  # the crop's share of each side
        h = ops.minimum(ops.sqrt(area / aspect), 1.0)
        if self.min_scale >= 1:  # flip only
            w = h = ops.ones_like(area)
        x0, y0 = (1 - w) * u[2] * cols, (1 - h) * u[3] * rows
        flip = u[4] < 0.5
        # output pixel (c, r) reads the input at (a0 c + a2, b1 r + b2)
        a0 = ops.where(flip, -w, w)
        a2 = ops.where(flip, x0 + w * (cols - 1), x0)
        b1, b2 = h, y0
        if self.vflip:
            vflip = keras.random.uniform((n,), seed=self.seeds) < 0.5
            b1, b2 = ops.where(vflip, -h, h), ops.where(vflip, y0 + h * (rows - 1), y0)
        zero = ops.zeros_like(w)
        transform = ops.stack([a0, zero, a2, zero, b1, b2, zero, zero], axis=1)
        return ops.image.affine_transform(x, transform, fill_mode="reflect")

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        return {
            **super().get_config(),
            "min_scale": self.min_scale,
            "seed": self.seed,
            "vflip": self.vflip,
        }
