"""Compute precision: `auto` resolves to the fastest one that keeps accuracy on this hardware.

bf16 compute moves features by well under 1% (bench/precision_bench.py) and leaves head
accuracy unchanged, so `auto` takes it where the hardware runs it fast: a GPU of compute
capability 8 or more (or a TPU). On a CPU float32 is the fastest.
"""

from __future__ import annotations


def resolve_precision(precision: str) -> str:
    """`auto`: mixed_bfloat16 on a GPU that has bf16 (compute capability >= 8), else float32."""
    if precision != "auto":
        return precision
    import keras

    backend = keras.backend.backend()
    try:
        if backend == "tensorflow":
            import tensorflow as tf

            for gpu in tf.config.list_physical_devices("GPU"):
                if tf.config.experimental.get_device_details(gpu).get(
                    "compute_capability", (0, 0)
                ) >= (8, 0):
                    return "mixed_bfloat16"
        elif backend == "jax":
            import jax

            device = jax.devices()[0]
            if device.platform == "tpu" or (
                device.platform == "gpu" and float(getattr(device, "compute_capability", "0")) >= 8
            ):
                return "mixed_bfloat16"
        elif backend == "torch":
            import torch

            if torch.cuda.is_available() and torch.cuda.is_bf16_supported():
                return "mixed_bfloat16"
    except (ImportError, AttributeError, RuntimeError, ValueError):  # no accelerator info
        return "float32"
    return "float32"


def use_precision(precision: str) -> str:
    """Resolve `precision` and make it Keras's global dtype policy; return what was used."""
    import keras

    resolved = resolve_precision(precision)
    keras.mixed_precision.set_dtype_policy(resolved)
    return resolved
