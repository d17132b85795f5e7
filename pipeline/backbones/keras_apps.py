"""The keras.applications adapter: build a backbone from its record (module and constructor),
apply its own preprocess_input, and load its weights (random, ImageNet through Keras's own
download and cache in ~/.keras/models, auto, or a local .weights.h5 file).

Keras is imported lazily so that reading params does not pay for it.
"""

from __future__ import annotations

import contextlib
import importlib
import io
import os
import socket
import warnings
from pathlib import Path

from pipeline.project.deadline import with_deadline
from pipeline.project.errors import BackboneError
from pipeline.project.params import weights_problem
from pipeline.project.records import BackboneRecord, file_sha256


def preprocess(module: str, x):
    """keras.applications.<module>.preprocess_input, the model's own; works on numpy arrays and
    backend tensors."""
    return importlib.import_module(f"keras.applications.{module}").preprocess_input(x)


def build(constructor: str, weights: str | None, include_top: bool, side: int | None):
    """keras.applications.<constructor> at input side `side` (None: the constructor's default,
    which the top needs for ImageNet weights)."""
    import keras
    from keras.src.utils.naming import reset_uids

    shape = None if side is None else (side, side, 3)
    # Layers a constructor leaves unnamed (xception's add_1, inception_v3's conv2d_5) are
    # numbered by a per-process counter: start it afresh so that every build, in any process,
    # gives the names that the layer facts recorded.
    reset_uids()
    with warnings.catch_warnings():  # e.g. mobilenet: "`input_shape` is undefined or non-square"
        warnings.simplefilter("ignore", UserWarning)
        return getattr(keras.applications, constructor)(
            weights=weights, include_top=include_top, input_shape=shape
        )


@contextlib.contextmanager
def unweighted():
    """Models built inside get no weights at all: every variable is left uninitialized, so that
    only names, shapes and parameter counts can be read. Five to ten times faster: most of a
    build's time is spent drawing random weights."""
    import keras
    from keras.src.backend.common import global_state

    pending = list(global_state.get_global_attribute("uninitialized_variables") or [])
    try:
        with keras.StatelessScope(initialize_variables=False):
            yield
    finally:  # forget these variables, or the next stateless scope would initialize them
        global_state.set_global_attribute("uninitialized_variables", pending)


def build_unweighted(constructor: str, include_top: bool, side: int | None):
    """`build` inside `unweighted`: names, shapes and parameter counts only."""
    with unweighted():
        return build(constructor, None, include_top, side)


def taps(model) -> dict:
    """Every point of `model` whose output can be cached, by name: its layers and the
    operations between them (ConvNeXt's residual sums are `add` operations, not layers)."""
    return {op.name: op for op in model.operations}


def tap(model, name: str):
    """The output of the layer or operation `name` of `model`."""
    return taps(model)[name].output


IMAGENET_HOST = "storage.googleapis.com"  # where keras.applications downloads its weights


def reachable(host: str, seconds: float = 5.0) -> bool:
    """Whether a TCP connection to `host`:443 opens within `seconds`, name lookup included."""
    try:
        with_deadline(seconds, host, lambda: socket.create_connection((host, 443), seconds).close())
    except OSError:  # TimeoutError included
        return False
    return True


def keras_models_dir() -> Path:
    """Where Keras caches downloaded weights (`$KERAS_HOME/models`, by default ~/.keras/models)."""
    return Path(os.environ.get("KERAS_HOME", Path.home() / ".keras")) / "models"


def weights_identity(weights: str, cached_prefix: str) -> str:
    """What `backbone.weights` resolves to, without building the model: `random`, `imagenet`
    (Keras checks the file's hash itself), `file:sha256:<digest>`, or for `auto` without cached
    ImageNet weights (no file in Keras's cache starting with `cached_prefix`) `auto:not-cached`
    (extract tries the download, else uses random)."""
    if weights in ("random", "imagenet"):
        return weights
    if weights == "auto":
        folder = keras_models_dir()
        cached = folder.is_dir() and any(p.name.startswith(cached_prefix) for p in folder.iterdir())
        return "imagenet" if cached else "auto:not-cached"
    return f"file:sha256:{file_sha256(weights)}"


def load_backbone(backbone: BackboneRecord, layers: list[str]):
    """The backbone of `backbone` that holds every one of `layers`, with its weights: (model,
    the weights used: random | imagenet | file:sha256:...).

    The classification top (VGG `fc1`/`fc2`, `predictions`, ...) is built only when one of
    `layers` lives there; scan made sure the input side is then the top's."""
    import keras

    include_top = any(layer in backbone.top_layers for layer in layers)
    side = backbone.image_size
    weights = backbone.weights

    def made(with_weights: str | None):
        imagenet_top = include_top and with_weights == "imagenet"
        return build(
            backbone.constructor, with_weights, include_top, None if imagenet_top else side
        )

    keras.utils.set_random_seed(0)  # `random` weights are the same in every process
    if weights == "random":
        model, used = made(None), "random"
    elif backbone.identity == "auto:not-cached" and not reachable(IMAGENET_HOST):
        print(
            f"backbone.weights=auto: ImageNet weights for {backbone.name} are not in "
            f"{keras_models_dir()} and {IMAGENET_HOST} cannot be reached; using random"
        )
        model, used = made(None), "random"
    elif weights in ("imagenet", "auto"):
        # offline, a file Keras has cached loads; else its "Downloading data from" line would
        # precede the failure (auto got here cached, or with the host reachable)
        quiet = io.StringIO() if weights == "imagenet" and not reachable(IMAGENET_HOST) else None
        try:
            with contextlib.redirect_stdout(quiet) if quiet else contextlib.nullcontext():
                model, used = made("imagenet"), "imagenet"
        except Exception as exc:  # keras raises a bare Exception on a failed download
            if weights == "imagenet":
                raise BackboneError(
                    f"could not load ImageNet weights for {backbone.name}: {exc}. Keras downloads "
                    "them to ~/.keras/models on first use; offline, place the file there, give a "
                    "local weights file as backbone.weights, or use weights: random or auto."
                ) from exc
            print(f"backbone.weights=auto: ImageNet weights unavailable ({exc}); using random")
            keras.utils.set_random_seed(0)
            model, used = made(None), "random"
    else:
        model = _from_file(backbone, made(None), Path(weights), include_top)
        used = f"file:sha256:{file_sha256(weights)}"
    missing = [layer for layer in layers if layer not in taps(model)]
    if missing:
        raise BackboneError(
            f"{backbone.name} built by Keras {keras.__version__} has no layer {missing[0]!r}; "
            "its layer facts are stale: delete the layerwise cache (`layerwise backbones` names "
            "it) and run `dvc repro`"
        )
    return model, used


def _from_file(backbone: BackboneRecord, model, path: Path, include_top: bool):
    problem = weights_problem(str(path))  # the file went away after scan read it
    if problem:
        raise BackboneError(f"backbone.weights: {problem}")
    try:
        with warnings.catch_warnings():  # Keras warns once per layer it cannot match
            warnings.simplefilter("ignore")
            model.load_weights(str(path))
    except Exception as exc:
        side = backbone.image_size
        raise BackboneError(
            f"backbone.weights: {path} does not fit {backbone.name} built "
            f"{'with' if include_top else 'without'} its classification top at {side}x{side} "
            f"({sum(1 for lyr in model.layers if lyr.weights)} layers with weights): "
            f"{_describe_weights_file(path)}. Give a file saved from keras.applications."
            f"{backbone.constructor}(include_top={include_top}) with .save_weights()"
        ) from exc
    return model


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
