"""Registry of keras.applications backbones: one table drives construction, layers and tests.

Keras is imported lazily so that reading params does not pay for it.
"""

from __future__ import annotations

import importlib
import os
from dataclasses import dataclass
from functools import cache
from pathlib import Path

from pipeline.records import file_sha256


@dataclass(frozen=True)
class Backbone:
    name: str
    module: str  # keras.applications submodule holding the constructor and preprocess_input
    constructor: str
    min_size: int  # smallest input side the model accepts without its top
    top_size: int  # the fixed input side the classification top (fc1, fc2, predictions) needs
    weights_prefix: str  # how Keras's ImageNet weights files for this model begin

    def _module(self):
        return importlib.import_module(f"keras.applications.{self.module}")

    def preprocess(self, x):
        """The model's own preprocess_input; works on numpy arrays and backend tensors."""
        return self._module().preprocess_input(x)

    def build(self, weights: str | None, include_top: bool, size: int):
        from keras.src.utils.naming import reset_uids

        constructor = getattr(self._module(), self.constructor)
        shape = None if include_top and weights == "imagenet" else (size, size, 3)
        # Layers the constructor leaves unnamed (xception's add_1, inception_v3's conv2d_5)
        # are numbered by a per-process counter: start it afresh so that every build, in any
        # process, gives the same names as the one `layer_names` checked.
        reset_uids()
        return constructor(weights=weights, include_top=include_top, input_shape=shape)


BACKBONES: dict[str, Backbone] = {
    b.name: b
    for b in (
        Backbone("vgg16", "vgg16", "VGG16", 32, 224, "vgg16_weights"),
        Backbone("vgg19", "vgg19", "VGG19", 32, 224, "vgg19_weights"),
        Backbone("resnet50", "resnet50", "ResNet50", 32, 224, "resnet50_weights"),
        Backbone(
            "mobilenet_v2",
            "mobilenet_v2",
            "MobileNetV2",
            32,
            224,
            "mobilenet_v2_weights",
        ),
        Backbone("xception", "xception", "Xception", 71, 299, "xception_weights"),
        Backbone(
            "efficientnet_b0",
            "efficientnet",
            "EfficientNetB0",
            32,
            224,
            "efficientnetb0",
        ),
        Backbone("inception_v3", "inception_v3", "InceptionV3", 75, 299, "inception_v3_weights"),
    )
}
BACKBONE_NAMES = tuple(BACKBONES)


class BackboneError(ValueError):
    """A backbone, layer or weights request that cannot be met."""


def get_backbone(name: str) -> Backbone:
    try:
        return BACKBONES[name]
    except KeyError:
        raise BackboneError(
            f"unknown backbone {name!r}; accepted: {', '.join(BACKBONE_NAMES)}"
        ) from None


def list_backbones() -> tuple[str, ...]:
    return BACKBONE_NAMES


def keras_models_dir() -> Path:
    """Where Keras caches downloaded weights (`$KERAS_HOME/models`, by default ~/.keras/models)."""
    return Path(os.environ.get("KERAS_HOME", Path.home() / ".keras")) / "models"


def imagenet_cached(name: str) -> bool:
    prefix = get_backbone(name).weights_prefix
    folder = keras_models_dir()
    return folder.is_dir() and any(p.name.startswith(prefix) for p in folder.iterdir())


def weights_identity(name: str, weights: str) -> str:
    """What `backbone.weights` resolves to, without building the model: `random`, `imagenet`
    (Keras checks the file's hash itself), `file:sha256:<digest>`, or for `auto` without cached
    ImageNet weights `auto:not-cached` (extract tries the download, else uses random)."""
    if weights in ("random", "imagenet"):
        return weights
    if weights == "auto":
        return "imagenet" if imagenet_cached(name) else "auto:not-cached"
    path = Path(weights)
    if not path.is_file():
        raise BackboneError(
            f"backbone.weights: no such weights file {weights!r}; give auto, imagenet, random or "
            "the path of a weights file"
        )
    return f"file:sha256:{file_sha256(path)}"


@cache
def layer_names(name: str, include_top: bool, size: int) -> tuple[str, ...]:
    """Layer names of the backbone built with random weights (cached per process)."""
    model = get_backbone(name).build(None, include_top, size)
    return tuple(layer.name for layer in model.layers)


def _load(spec: Backbone, weights: str, include_top: bool, size: int):
    """Build with `weights` in auto|imagenet|random|<file>; return (model, identity used)."""
    import keras

    keras.utils.set_random_seed(0)  # `random` weights are the same in every process
    if weights == "random":
        return spec.build(None, include_top, size), "random"
    if weights == "imagenet":
        try:
            return spec.build("imagenet", include_top, size), "imagenet"
        except Exception as exc:  # keras raises a bare Exception on a failed download
            raise BackboneError(
                f"could not load ImageNet weights for {spec.name}: {exc}. Keras downloads them "
                "to ~/.keras/models on first use; offline, place the file there, give a local "
                "weights file as backbone.weights, or use weights: random or auto."
            ) from exc
    if weights == "auto":
        try:
            return spec.build("imagenet", include_top, size), "imagenet"
        except Exception as exc:
            print(f"backbone.weights=auto: ImageNet weights unavailable ({exc}); using random")
            keras.utils.set_random_seed(0)
            return spec.build(None, include_top, size), "random"
    path = Path(weights)
    if not path.is_file():
        raise BackboneError(f"backbone.weights: no such weights file {weights!r}")
    model = spec.build(None, include_top, size)
    try:
        model.load_weights(str(path))
    except Exception as exc:
        raise BackboneError(
            f"backbone.weights: {weights!r} does not fit {spec.name} "
            f"(include_top={include_top}, input {size}x{size}): {exc}"
        ) from exc
    return model, f"file:sha256:{file_sha256(path)}"


def load_backbone(name: str, weights: str, size: int, layers: list[str] | tuple[str, ...]):
    """Build the backbone that holds every requested layer; return (model, weights identity).

    The classification top (VGG `fc1`/`fc2`, `predictions`, ...) is built only when a requested
    layer lives there, and it fixes the input side at the model's `top_size`.
    """
    spec = get_backbone(name)
    if size < spec.min_size:
        raise BackboneError(
            f"{name} needs inputs of at least {spec.min_size}x{spec.min_size}; data.image_size is {size}"
        )
    base = set(layer_names(name, False, max(size, spec.min_size)))
    missing = [layer for layer in layers if layer not in base]
    include_top = bool(missing)
    if include_top:
        top = layer_names(name, True, spec.top_size)
        unknown = [layer for layer in missing if layer not in top]
        if unknown:
            raise BackboneError(
                f"unknown layer(s) {unknown} for {name}; valid layers: {', '.join(top[1:])}"
            )
        if size != spec.top_size:
            raise BackboneError(
                f"layer(s) {missing} belong to {name}'s classification top, which takes "
                f"{spec.top_size}x{spec.top_size} inputs only; data.image_size is {size}. Set "
                f"data.image_size: {spec.top_size} or choose convolutional layers."
            )
    return _load(spec, weights, include_top, size)
