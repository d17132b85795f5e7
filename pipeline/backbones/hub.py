"""The KerasHub adapter: DINOv2, DINOv3, ViT, CLIP and SigLIP image encoders, built from a preset
(a Kaggle handle, which KerasHub downloads and caches, or a local folder that `save_to_preset`
wrote) or, for random weights, from their constructor arguments.

Their taps are token outputs (batch, tokens, width), each an Identity layer named for it:
`stem` (the patch embedding), `block1`.. (each transformer block), `final` (after the last
norm) and, for SigLIP, `pooled` (its attention-pooled vector).

KerasHub is an optional dependency (`pip install 'layerwise[hub]'`), imported only here.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from pipeline.project.errors import BackboneError
from pipeline.project.records import BackboneRecord, HubSpec, TokenLayout, file_sha256

EXTRA = "pip install 'layerwise[hub]'"


def keras_hub():
    try:
        import keras_hub
    except ImportError:
        raise BackboneError(
            f"KerasHub backbones need the keras-hub package, which is not installed: {EXTRA}"
        ) from None
    return keras_hub


def folder_digest(folder: str | Path) -> str:
    """sha256 over the name and sha256 of every file in a preset folder."""
    h = hashlib.sha256()
    for path in sorted(p for p in Path(folder).rglob("*") if p.is_file()):
        h.update(f"{path.relative_to(folder).as_posix()}\0{file_sha256(path)}\0".encode())
    return h.hexdigest()


def folder_config(folder: str | Path) -> tuple[str, dict, dict | None]:
    """A preset folder's backbone class, its constructor arguments and its image converter's
    config (None without one), read as JSON."""
    folder = Path(folder)
    try:
        config = json.loads((folder / "config.json").read_text())
        cls, arguments = config["class_name"], dict(config["config"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise BackboneError(
            f"backbone.weights: {folder} is not a KerasHub preset folder (its config.json: "
            f"{exc}); write one with `save_to_preset(DIR)`"
        ) from None
    converter = folder / "image_converter.json"
    image = json.loads(converter.read_text())["config"] if converter.is_file() else None
    return cls, arguments, image


def channels(value, default: float) -> list[float]:
    """An image converter's scale or offset as one number per channel (None: `default`)."""
    if value is None:
        value = default
    return [float(v) for v in value] if isinstance(value, (list, tuple)) else [float(value)] * 3


def check_converter(spec: HubSpec) -> None:
    """A downloaded preset's image converter must be the normalization scan recorded (its
    family's); else one line saying how to use the preset as a folder, whose converter scan
    reads. A preset without a converter keeps the family's."""
    try:
        converter = keras_hub().layers.ImageConverter.from_preset(spec.preset)
    except FileNotFoundError:
        return
    scale, offset = channels(converter.scale, 1.0), channels(converter.offset, 0.0)
    if not (_close(scale, spec.scale) and _close(offset, spec.offset)):
        raise BackboneError(
            f"the KerasHub preset {spec.preset} normalizes images by scale {_short(scale)}, "
            f"offset {_short(offset)}, not the {_short(spec.scale)}, {_short(spec.offset)} "
            "of its family: save it as a folder (keras_hub.models.Backbone.from_preset(...)"
            ".save_to_preset(DIR), and its ImageConverter's) and set backbone.weights: DIR"
        )


def _close(a: list[float], b: list[float]) -> bool:
    return len(a) == len(b) and all(abs(x - y) <= 1e-5 * max(1.0, abs(y)) for x, y in zip(a, b))


def _short(values: list[float]) -> str:
    return "[" + ", ".join(f"{v:.4g}" for v in values) + "]"


def encoder_arguments(arguments: dict) -> dict:
    """Constructor arguments without those every Keras layer has and the input shape."""
    drop = {"name", "trainable", "dtype", "image_shape", "data_format"}
    return {k: v for k, v in arguments.items() if k not in drop}


def build_encoder(spec: HubSpec, side: int, weights: bool = True):
    """The image encoder of `spec` at input side `side`: from its preset, or (without one, or
    `weights` false) from its constructor arguments with random weights."""
    kh = keras_hub()
    shape = (side, side, 3)
    if spec.preset is None or not weights:
        return getattr(kh.models, spec.cls)(**spec.arguments, image_shape=shape)
    sized = {"image_shape": shape} if spec.any_side else {}
    try:
        model = kh.models.Backbone.from_preset(spec.preset, **sized)
    except Exception as exc:  # kagglehub raises whatever the network gave it
        raise BackboneError(load_failure(spec.preset, exc)) from exc
    encoder = getattr(model, spec.encoder, model) if spec.encoder else model
    if type(encoder).__name__ != spec.cls:
        raise BackboneError(
            f"backbone.weights: {spec.preset} holds a {type(encoder).__name__}, not a "
            f"{spec.cls}; give a preset of this backbone's family"
        )
    return encoder


def build(spec: HubSpec, side: int, weights: bool = True):
    """The encoder of `spec` with its taps as outputs (see `tapped`)."""
    return tapped(build_encoder(spec, side, weights))


def load_failure(preset: str, exc: Exception) -> str:
    first = str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__
    if Path(preset).is_dir():
        return f"backbone.weights: KerasHub could not load the preset folder {preset}: {first}"
    return (
        f"could not download the KerasHub preset {preset} ({type(exc).__name__}: {first}). "
        "Offline, copy the preset folder from a machine with a network (keras_hub.models."
        "Backbone.from_preset(...).save_to_preset(DIR), and its ImageConverter's) and set "
        "backbone.weights: DIR, or use weights: random"
    )


def tap_points(encoder) -> dict:
    """name -> the encoder's output there (KerasTensors of its own graph, or of a new one for
    ViT, whose blocks live inside one layer)."""
    if hasattr(encoder, "pyramid_outputs"):  # DINOv2, DINOv3: stem, stage1.. per block
        pyramid = encoder.pyramid_outputs
        blocks = [pyramid[f"stage{i}"] for i in range(1, encoder.num_layers + 1)]
        return {"stem": pyramid["stem"], **_blocks(blocks), "final": encoder.output}
    if hasattr(encoder, "encoder_layers"):  # CLIP, SigLIP: one layer per block
        blocks = [layer.output for layer in encoder.encoder_layers]
        if hasattr(encoder, "head"):  # SigLIP pools by attention, without a class token
            stem, final = encoder.embedding.output, encoder.post_layer_norm.output
            return {"stem": stem, **_blocks(blocks), "final": final, "pooled": encoder.output}
        stem, final = encoder.pre_layer_norm.output, encoder.output
        return {"stem": stem, **_blocks(blocks), "final": final}
    # ViT: run its embedding, then each block of its encoder, then the encoder's norm
    embed = encoder.get_layer("vit_patching_and_embedding")
    body = encoder.get_layer("vit_encoder")
    x = stem = embed(encoder.inputs[0])
    blocks = []
    for block in body.encoder_layers:
        x = block(x)
        blocks.append(x)
    return {"stem": stem, **_blocks(blocks), "final": body.layer_norm(x)}


def _blocks(outputs: list) -> dict:
    return {f"block{i}": o for i, o in enumerate(outputs, 1)}


def tapped(encoder):
    """`encoder` as a model whose outputs are its taps, each through an Identity layer of the
    tap's name (so that keras_apps.taps finds them like any layer)."""
    import keras

    points = tap_points(encoder)
    outputs = [keras.layers.Identity(name=name)(x) for name, x in points.items()]
    return keras.Model(encoder.inputs[0], outputs, name=encoder.name)


def tap_points_of(model) -> dict:
    """name -> operation of each tap of a `tapped` model, in order."""
    import keras

    return {op.name: op for op in model.operations if isinstance(op, keras.layers.Identity)}


def tap_shapes(model, tokens: TokenLayout, side: int) -> list[tuple[str, tuple[int, ...]]]:
    """(name, output shape without the batch axis) of each tap of a `tapped` model at input
    side `side`. Token outputs count prefix + patch tokens: KerasHub's SigLIP embedding reports
    one token more than it gives (keras-hub 0.32)."""
    count = tokens.prefix + (side // tokens.patch_size) ** 2
    shapes = []
    for name, op in tap_points_of(model).items():
        shape = tuple(int(d) for d in op.output.shape[1:])
        shapes.append((name, (count, shape[1]) if len(shape) == 2 else shape))
    return shapes


def units(model) -> dict[str, list]:
    """The parts of a `tapped` model (or of a model cut from one) that fine-tuning unfreezes,
    bottom to top, by tap name: `stem` (the patch embedding with the class token, registers and
    position embeddings; CLIP's pre-norm), `block1`.. (each transformer block with its
    LayerNorms), `final` (the last norm) and `pooled` (SigLIP's attention pooling)."""
    import keras

    stem, blocks, rest = [], [], []
    for layer in (lyr for lyr in model.layers if lyr.weights):
        inner = getattr(layer, "layers", None)
        if type(layer).__name__.endswith("Encoder") and isinstance(inner, list):  # DINO
            blocks.extend(inner)
        elif type(layer).__name__.endswith(("EncoderLayer", "EncoderBlock")):
            blocks.append(layer)
        elif not blocks:
            stem.append(layer)
        else:
            rest.append(layer)
    parts = {"stem": stem, **{f"block{i}": [b] for i, b in enumerate(blocks, 1)}}
    for layer in rest:
        name = "final" if isinstance(layer, keras.layers.LayerNormalization) else "pooled"
        parts[name] = [layer]
    return parts


def weights_identity(weights: str, handle: str) -> str:
    """What `backbone.weights` resolves to: random, preset:<handle> (auto and preset), or
    folder:sha256:<digest of its files>."""
    if weights == "random":
        return "random"
    if weights in ("auto", "preset"):
        return f"preset:{handle}"
    return f"folder:sha256:{folder_digest(weights)}"


def load_backbone(backbone: BackboneRecord, layers: list[str]):
    """The tapped encoder of `backbone`, with its weights: (model, the weights used)."""
    import keras

    spec, side = backbone.hub, backbone.image_size
    keras.utils.set_random_seed(0)  # `random` weights are the same in every process
    if spec.preset is None:
        model, used = build(spec, side), "random"
    elif backbone.weights == "auto":
        try:
            model, used = build(spec, side), backbone.identity
        except BackboneError as exc:
            print(f"backbone.weights=auto: {exc}; using random weights")
            keras.utils.set_random_seed(0)
            model, used = build(spec, side, weights=False), "random"
        else:
            check_converter(spec)
    else:  # a folder's identity is what it holds now (extract compares it with scan's)
        model = build(spec, side)
        if Path(spec.preset).is_dir():
            used = f"folder:sha256:{folder_digest(spec.preset)}"
        else:
            check_converter(spec)
            used = backbone.identity
    have = tap_points_of(model)
    missing = [layer for layer in layers if layer not in have]
    if missing:
        raise BackboneError(
            f"{backbone.name} has no tap {missing[0]!r} ({', '.join(have)}); its "
            "layer facts are stale: delete the layerwise cache (`layerwise backbones` names it) "
            "and run `dvc repro`"
        )
    return model, used
