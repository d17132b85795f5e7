"""A compiled, pipelined forward pass of the extractor on the active Keras backend.

On JAX: one jitted `stateless_call` with a fixed batch shape, the uint8 batch placed on the
device(s) by the active `keras.distribution` (data-parallel over every GPU when one is set),
outputs cast to the storage dtype on the device, and dispatch kept one batch ahead of the
copy back so that transfers overlap compute. Elsewhere: Keras's own `predict_on_batch`.
"""

from __future__ import annotations

import functools
from collections import deque
from collections.abc import Iterable, Iterator

import keras
import numpy as np

from pipeline.project.params import ConfigError


class Forward:
    """Runs `model` over uint8 images in fixed-shape batches (the last one padded)."""

    def __init__(self, model: keras.Model, batch_size: int, out_dtype: str = "float32"):
        self.model = model
        self.batch_size = batch_size
        self.out_dtype = np.dtype(out_dtype)
        self._jax = keras.backend.backend() == "jax"
        if self._jax:
            self._build_jax()

    def _build_jax(self) -> None:
        import jax

        model, dtype = self.model, self.out_dtype
        self._state = (
            [v.value for v in model.trainable_variables],
            [v.value for v in model.non_trainable_variables],
        )

        @jax.jit
        def step(trainable, non_trainable, x):
            outputs, _ = model.stateless_call(trainable, non_trainable, x, training=False)
            outputs = outputs if isinstance(outputs, (list, tuple)) else [outputs]
            return [o.astype(dtype) for o in outputs]

        self._step = step
        distribution = keras.distribution.distribution()
        shape = (self.batch_size, *model.inputs[0].shape[1:])
        self._sharding = (
            distribution.get_data_layout(shape).backend_layout if distribution else None
        )

    def _submit(self, batch: np.ndarray):
        if self._jax:
            import jax

            x = jax.device_put(batch, self._sharding) if self._sharding else jax.device_put(batch)
            return self._step(*self._state, x)
        result = self.model.predict_on_batch(batch)
        return result if isinstance(result, (list, tuple)) else [result]

    def _fetch(self, pending) -> list[np.ndarray]:
        return [np.asarray(o).astype(self.out_dtype, copy=False) for o in pending]

    def stream(self, batches: Iterable[np.ndarray]) -> Iterator[list[np.ndarray]]:
        """The outputs of each batch (one array per model output), in order; a batch shorter
        than batch_size is padded for the fixed shape and its outputs cut back. One batch is
        dispatched ahead of the one being copied back."""
        in_flight: deque = deque()
        for batch in batches:
            n = len(batch)
            if n < self.batch_size:
                pad = np.zeros((self.batch_size - n, *batch.shape[1:]), batch.dtype)
                batch = np.concatenate([batch, pad])
            in_flight.append((self._submit(batch), n))
            if len(in_flight) > 1:
                pending, m = in_flight.popleft()
                yield [o[:m] for o in self._fetch(pending)]
        while in_flight:
            pending, m = in_flight.popleft()
            yield [o[:m] for o in self._fetch(pending)]

    def run(self, images: np.ndarray) -> list[np.ndarray]:
        """Outputs for every image, one array per model output, in input order."""
        batches = (
            np.asarray(images[i : i + self.batch_size])
            for i in range(0, len(images), self.batch_size)
        )
        return [np.concatenate(p) for p in zip(*self.stream(batches))]


def peak_bytes(model: keras.Model) -> int:
    """Bytes one image holds at the forward pass's peak: the largest inputs plus output of
    any one layer (nested models' layers included), which is what TensorFlow's memory grows
    by per image of a batch. Tensors of unknown shape count as nothing."""

    def size(tensor) -> int:
        dims = tensor.shape[1:]
        if any(d is None for d in dims):
            return 0
        itemsize = 2 if tensor.dtype == "bfloat16" else np.dtype(tensor.dtype).itemsize
        return int(np.prod(dims, dtype=np.int64)) * itemsize

    def peak(layer) -> int:
        if isinstance(layer, keras.Model):
            return max((peak(inner) for inner in layer.layers), default=0)
        try:
            tensors = keras.tree.flatten([layer.input, layer.output])
        except (AttributeError, ValueError):  # a layer never called in the graph
            return 0
        return sum(size(t) for t in tensors if hasattr(t, "shape"))

    return max(1, peak(model))


def batch_within(
    model: keras.Model, batch_size: int, memory_mb: int, devices: int = 1
) -> tuple[int, str]:
    """(the batch the forward pass runs, a line saying why when it is not `batch_size`):
    at most what fits in `memory_mb` (peak_bytes per image), a multiple of `devices`, and
    at least one image per device."""
    per_image = peak_bytes(model)
    fits = max(1, memory_mb * 2**20 // (per_image * devices)) * devices
    if batch_size <= fits:
        return batch_size, ""
    return fits, (
        f"extract.batch_size {batch_size} runs as batches of {fits}: the forward pass holds "
        f"{per_image / 2**20:.2f} MB per image at its largest layer, and extract.memory_mb is "
        f"{memory_mb}; raise memory_mb for larger batches"
    )


@functools.lru_cache(maxsize=4)
def forward_for(model: keras.Model, batch_size: int, out_dtype: str = "float32") -> Forward:
    """One compiled Forward per model and batch shape, shared by every split."""
    return Forward(model, batch_size, out_dtype)


def distribute_over_devices(batch_size: int) -> int:
    """On JAX with several devices, extract data-parallel over all of them (keras.distribution).

    Returns the number of devices used; the batch is split evenly, so it must divide.
    """
    if keras.backend.backend() != "jax":
        return 1
    devices = keras.distribution.list_devices()
    if len(devices) > 1:
        if batch_size % len(devices):
            raise ConfigError(
                f"extract.batch_size={batch_size} must be a multiple of the {len(devices)} devices"
            )
        keras.distribution.set_distribution(keras.distribution.DataParallel(devices=devices))
    return len(devices)
