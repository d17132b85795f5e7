"""Registry of keras.applications backbones: one table drives construction, layers and tests.

Keras is imported lazily so that reading params does not pay for it.
"""

from __future__ import annotations

import difflib
import importlib
import os
import warnings
from dataclasses import dataclass
from functools import cache
from pathlib import Path

from pipeline.errors import InputError
from pipeline.records import file_sha256


@dataclass(frozen=True)
class Backbone:
    name: str
    module: str  # keras.applications submodule holding the constructor and preprocess_input
    constructor: str
    min_size: int  # smallest input side the model accepts without its top
    top_size: int  # the fixed input side the classification top (fc1, fc2, predictions) needs
    weights_prefix: str  # how Keras's ImageNet weights files for this model begin
    parameters: tuple[int, int]  # without and with the classification top
    feature_layers: tuple[str, ...]  # block ends, from early to late (timm's feature_info)
    auto_layers: tuple[str, ...]  # `extract.layers: auto`; top layers only at top_size

    def auto(self, size: int) -> dict[str, str]:
        """`extract.layers: auto` at input side `size`: layer -> reduction."""
        top = layer_table(self.name)["top"]
        return {
            layer: "none" if layer in top else "avg"
            for layer in self.auto_layers
            if layer not in top or size == self.top_size
        }

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


_VGG_BLOCKS = tuple(f"block{i}_pool" for i in range(1, 6)) + ("fc1", "fc2")
BACKBONES: dict[str, Backbone] = {
    b.name: b
    for b in (
        Backbone(
            "vgg16", "vgg16", "VGG16", 32, 224, "vgg16_weights", (14_714_688, 138_357_544),
            _VGG_BLOCKS, ("block2_pool", "block5_pool", "fc2"),
        ),
        Backbone(
            "vgg19", "vgg19", "VGG19", 32, 224, "vgg19_weights", (20_024_384, 143_667_240),
            _VGG_BLOCKS, ("block2_pool", "block5_pool", "fc2"),
        ),
        Backbone(
            "resnet50", "resnet50", "ResNet50", 32, 224, "resnet50_weights",
            (23_587_712, 25_636_712),
            ("conv2_block3_out", "conv3_block4_out", "conv4_block6_out", "conv5_block3_out"),
            ("conv3_block4_out", "conv4_block6_out", "conv5_block3_out"),
        ),
        Backbone(
            "mobilenet_v2", "mobilenet_v2", "MobileNetV2", 32, 224, "mobilenet_v2_weights",
            (2_257_984, 3_538_984),
            ("block_1_expand_relu", "block_3_expand_relu", "block_6_expand_relu",
             "block_13_expand_relu", "out_relu"),
            ("block_6_expand_relu", "block_13_expand_relu", "out_relu"),
        ),
        Backbone(
            "xception", "xception", "Xception", 71, 299, "xception_weights",
            (20_861_480, 22_910_480),
            ("block2_sepconv2_act", "block3_sepconv2_act", "block4_sepconv2_act",
             "block13_sepconv2_act", "block14_sepconv2_act"),
            ("block4_sepconv2_act", "block13_sepconv2_act", "block14_sepconv2_act"),
        ),
        Backbone(
            "efficientnet_b0", "efficientnet", "EfficientNetB0", 32, 224, "efficientnetb0",
            (4_049_571, 5_330_571),
            ("block2b_add", "block3b_add", "block4c_add", "block5c_add", "block6d_add",
             "top_activation"),
            ("block3b_add", "block5c_add", "top_activation"),
        ),
        Backbone(
            "inception_v3", "inception_v3", "InceptionV3", 75, 299, "inception_v3_weights",
            (21_802_784, 23_851_784),
            ("mixed0", "mixed2", "mixed7", "mixed10"),
            ("mixed2", "mixed7", "mixed10"),
        ),
    )
}  # fmt: skip
BACKBONE_NAMES = tuple(BACKBONES)


class BackboneError(InputError, ValueError):
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


def layer_table(name: str) -> dict[str, tuple[str, ...]]:
    """The layer names of `name` without its top ("base") and of its top alone ("top")."""
    from pipeline.layer_names import LAYER_NAMES

    return LAYER_NAMES[get_backbone(name).name]


def closest(name: str, names) -> str:
    """`; did you mean a, b?` for the valid names closest to a mistyped one, else ''."""
    near = difflib.get_close_matches(name, list(names), n=3, cutoff=0.5)
    return f"; did you mean {', '.join(near)}?" if near else ""


def layer_problem(spec: Backbone, size: int, layers: dict[str, str], base, top) -> str | None:
    """Why `layers` (name -> reduction) cannot be taken from `spec` at input side `size`, or
    None. `base`, `top`: the model's layer names without its top, and of the top alone."""
    if size < spec.min_size:
        return (
            f"{spec.name} needs inputs of at least {spec.min_size}x{spec.min_size}; "
            f"data.image_size is {size}"
        )
    for layer, reduction in layers.items():
        if layer not in base and layer not in top:
            return (
                f"extract.layers: unknown layer {layer!r} for {spec.name}{closest(layer, [*base, *top])} "
                f"(`layerwise layers {spec.name}` lists them all)"
            )
        if layer in top and size != spec.top_size:
            return (
                f"extract.layers: layer {layer!r} belongs to {spec.name}'s classification top, which takes "
                f"{spec.top_size}x{spec.top_size} inputs only; data.image_size is {size}: set "
                f"data.image_size: {spec.top_size} or choose convolutional layers"
            )
        if layer in top and reduction != "none":
            return (
                f"extract.layers: reduction {reduction!r} of {layer} needs a spatial (4-D) output, but {layer} "
                "is a vector; use none"
            )
    return None


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
        with warnings.catch_warnings():  # Keras warns once per layer it cannot match
            warnings.simplefilter("ignore")
            model.load_weights(str(path))
    except Exception as exc:
        raise BackboneError(
            f"backbone.weights: {weights} does not fit {spec.name} built "
            f"{'with' if include_top else 'without'} its classification top at {size}x{size} "
            f"({sum(1 for lyr in model.layers if lyr.weights)} layers with weights): "
            f"{_describe_weights_file(path)}. Give a file saved from keras.applications."
            f"{spec.constructor}(include_top={include_top}) with .save_weights()"
        ) from exc
    return model, f"file:sha256:{file_sha256(path)}"


def _describe_weights_file(path: Path) -> str:
    """What a Keras weights file holds, in a few words (it is not read as a model)."""
    import h5py

    try:
        with h5py.File(path, "r") as f:
            if "layers" not in f:
                return f"it is not a Keras 3 .weights.h5 file (top-level keys {list(f)[:5]})"
            weighted = [n for n, g in f["layers"].items() if len(g.get("vars", ()))]
    except OSError:
        return "it is not an HDF5 file"
    top = any(n.startswith("dense") for n in weighted)
    return f"the file holds {len(weighted)} layers with weights, " + (
        "with Dense layers (a classification top)" if top else "without a Dense top"
    )


def load_backbone(name: str, weights: str, size: int, layers: list[str] | tuple[str, ...]):
    """Build the backbone that holds every requested layer; return (model, weights identity).

    The classification top (VGG `fc1`/`fc2`, `predictions`, ...) is built only when a requested
    layer lives there, and it fixes the input side at the model's `top_size`.
    """
    spec = get_backbone(name)
    base = layer_names(name, False, max(size, spec.min_size))
    include_top = bool(set(layers) - set(base))
    top = (
        [n for n in layer_names(name, True, spec.top_size) if n not in base] if include_top else []
    )
    problem = layer_problem(spec, size, dict.fromkeys(layers, "none"), base, top)
    if problem:
        raise BackboneError(problem)
    return _load(spec, weights, include_top, size)
