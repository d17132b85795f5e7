"""The backbones a project can choose: one row per keras.applications constructor and per
KerasHub preset, one rule per family, everything else derived from the built model
(backbones.facts): layer names and shapes, strides, the top's input side, parameter counts and
the `auto` layers.

Only scan (and the `layerwise` command) read this table: it resolves the one backbone a
project uses into data/scan/backbone.json (records.BackboneRecord), which the stages that
build a backbone depend on. Adding a row, or changing one a project does not use, re-runs
nothing.
"""

from __future__ import annotations

import difflib
import importlib.metadata
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

from pipeline.backbones import hub
from pipeline.backbones.facts import FORMAT, LayerFacts, derive, layer_facts
from pipeline.backbones.keras_apps import weights_identity
from pipeline.features.reductions import shape_problem
from pipeline.project.errors import BackboneError
from pipeline.project.records import BackboneRecord, HubSpec, TokenLayout, canonical_digest

AUTO_STRIDES = (8, 16, 32)  # `auto` takes the last block end at each of these output strides


@dataclass(frozen=True)
class Family:
    """What a family of constructors shares."""

    block_ends: str  # the taps that end a block (a regular expression of the whole name); the
    # last tap of the model without its top ends one too
    weights_file: str  # how Keras names its ImageNet file: {lower} is the constructor
    # lowercased, {variant} what follows `prefix` in it, lowercased
    prefix: str = ""
    min_side: int = 32  # the smallest input side the constructor accepts without its top
    top_side: int = 224  # for tops that take any side: the side their weights were made for
    auto: tuple[str, ...] = ()  # `auto` layers named, instead of the last block ends per stride


FAMILIES = {
    "vgg": Family(
        r"block\d_pool|fc[12]", "{lower}_weights", auto=("block2_pool", "block5_pool", "fc2")
    ),
    "resnet": Family(r"conv\d_block\d+_out", "{lower}_weights"),
    "resnet_v2": Family(r"conv\d_block\d+_out", "{lower}_weights"),
    "densenet": Family(r"conv\d_block\d+_concat", "{lower}_weights"),
    "inception_v3": Family(r"mixed\d+", "inception_v3_weights", min_side=75),
    "inception_resnet_v2": Family(
        r"mixed_\w+|block(35|17|8)_\d+(_ac)?", "inception_resnet_v2_weights", min_side=75
    ),
    "xception": Family(r"block\d+_sepconv2_act", "xception_weights", min_side=71),
    "mobilenet": Family(r"conv_pw_\d+_relu", "mobilenet_1_0_"),
    "mobilenet_v2": Family(r"block_\d+_expand_relu", "mobilenet_v2_weights"),
    "mobilenet_v3": Family(
        r"expanded_conv(_\d+)?_(add|project_bn)",
        "weights_mobilenet_v3_{variant}_224_1.0_float",
        prefix="MobileNetV3",
    ),
    "nasnet": Family(r"normal_concat_\d+", "nasnet_{variant}", prefix="NASNet"),
    "efficientnet": Family(r"block\d+[a-z]_(add|project_bn)", "{lower}"),
    "efficientnet_v2": Family(
        r"block\d+[a-z]_(add|project_bn)", "efficientnetv2-{variant}", prefix="EfficientNetV2"
    ),
    "convnext": Family(r"add(_\d+)?", "convnext_{variant}", prefix="ConvNeXt"),
}


class Row(NamedTuple):
    name: str  # backbone.name in params.yaml
    family: str
    module: str  # keras.applications.<module> holds the constructor and its preprocess_input
    constructor: str


ROWS = [
    Row("vgg16", "vgg", "vgg16", "VGG16"),
    Row("vgg19", "vgg", "vgg19", "VGG19"),
    Row("resnet50", "resnet", "resnet", "ResNet50"),
    Row("resnet101", "resnet", "resnet", "ResNet101"),
    Row("resnet152", "resnet", "resnet", "ResNet152"),
    Row("resnet50_v2", "resnet_v2", "resnet_v2", "ResNet50V2"),
    Row("resnet101_v2", "resnet_v2", "resnet_v2", "ResNet101V2"),
    Row("resnet152_v2", "resnet_v2", "resnet_v2", "ResNet152V2"),
    Row("densenet121", "densenet", "densenet", "DenseNet121"),
    Row("densenet169", "densenet", "densenet", "DenseNet169"),
    Row("densenet201", "densenet", "densenet", "DenseNet201"),
    Row("inception_v3", "inception_v3", "inception_v3", "InceptionV3"),
    Row("inception_resnet_v2", "inception_resnet_v2", "inception_resnet_v2", "InceptionResNetV2"),
    Row("xception", "xception", "xception", "Xception"),
    Row("mobilenet", "mobilenet", "mobilenet", "MobileNet"),
    Row("mobilenet_v2", "mobilenet_v2", "mobilenet_v2", "MobileNetV2"),
    Row("mobilenet_v3_small", "mobilenet_v3", "mobilenet_v3", "MobileNetV3Small"),
    Row("mobilenet_v3_large", "mobilenet_v3", "mobilenet_v3", "MobileNetV3Large"),
    Row("nasnet_mobile", "nasnet", "nasnet", "NASNetMobile"),
    Row("nasnet_large", "nasnet", "nasnet", "NASNetLarge"),
    Row("efficientnet_b0", "efficientnet", "efficientnet", "EfficientNetB0"),
    Row("efficientnet_b1", "efficientnet", "efficientnet", "EfficientNetB1"),
    Row("efficientnet_b2", "efficientnet", "efficientnet", "EfficientNetB2"),
    Row("efficientnet_b3", "efficientnet", "efficientnet", "EfficientNetB3"),
    Row("efficientnet_b4", "efficientnet", "efficientnet", "EfficientNetB4"),
    Row("efficientnet_b5", "efficientnet", "efficientnet", "EfficientNetB5"),
    Row("efficientnet_b6", "efficientnet", "efficientnet", "EfficientNetB6"),
    Row("efficientnet_b7", "efficientnet", "efficientnet", "EfficientNetB7"),
    Row("efficientnet_v2_b0", "efficientnet_v2", "efficientnet_v2", "EfficientNetV2B0"),
    Row("efficientnet_v2_b1", "efficientnet_v2", "efficientnet_v2", "EfficientNetV2B1"),
    Row("efficientnet_v2_b2", "efficientnet_v2", "efficientnet_v2", "EfficientNetV2B2"),
    Row("efficientnet_v2_b3", "efficientnet_v2", "efficientnet_v2", "EfficientNetV2B3"),
    Row("efficientnet_v2_s", "efficientnet_v2", "efficientnet_v2", "EfficientNetV2S"),
    Row("efficientnet_v2_m", "efficientnet_v2", "efficientnet_v2", "EfficientNetV2M"),
    Row("efficientnet_v2_l", "efficientnet_v2", "efficientnet_v2", "EfficientNetV2L"),
    Row("convnext_tiny", "convnext", "convnext", "ConvNeXtTiny"),
    Row("convnext_small", "convnext", "convnext", "ConvNeXtSmall"),
    Row("convnext_base", "convnext", "convnext", "ConvNeXtBase"),
    Row("convnext_large", "convnext", "convnext", "ConvNeXtLarge"),
    Row("convnext_xlarge", "convnext", "convnext", "ConvNeXtXLarge"),
]
BACKBONES = {row.name: row for row in ROWS}


def closest(name: str, names) -> str:
    """`; did you mean a, b?` for the valid names closest to a mistyped one, else ''."""
    near = difflib.get_close_matches(name, list(names), n=3, cutoff=0.5)
    return f"; did you mean {', '.join(near)}?" if near else ""


def get_row(name: str) -> Row | HubRow:
    try:
        return ALL_ROWS[name]
    except KeyError:
        raise BackboneError(
            f"unknown backbone {name!r}{closest(name, BACKBONE_NAMES)} (`layerwise backbones` "
            f"lists all {len(ALL_ROWS)})"
        ) from None


@dataclass(frozen=True)
class Backbone:
    """A row with its family's rule and its built model's facts."""

    row: Row
    family: Family
    facts: LayerFacts

    @property
    def name(self) -> str:
        return self.row.name

    @property
    def top_names(self) -> set[str]:
        return {name for name, _ in self.facts.top}

    def stride(self, shape: tuple[int, ...]) -> int | None:
        """The output stride of a spatial map of `shape` at the top's input side, as the power
        of two nearest to input side / map side; None for a vector."""
        if len(shape) != 3:
            return None
        return 2 ** round(math.log2(self.facts.top_side / shape[0]))

    def block_ends(self) -> list[str]:
        """The last block end at each output stride, early to late (timm's feature_info: "the
        latest possible point for a given feature map stride"), then those of the top."""
        pattern = re.compile(self.family.block_ends)
        last: dict[int, str] = {}
        final = self.facts.base[-1][0]
        for name, shape in self.facts.base:
            if (pattern.fullmatch(name) or name == final) and (stride := self.stride(shape)):
                last[stride] = name
        top = [name for name, _ in self.facts.top if pattern.fullmatch(name)]
        return [last[s] for s in sorted(last)] + top

    def auto(self, size: int) -> dict[str, str]:
        """`extract.layers: auto` at input side `size`: layer -> reduction. Top layers (VGG's
        fc2, flattened) only at the top's input side."""
        if self.family.auto:
            names = list(self.family.auto)
        else:
            base = dict(self.facts.base)
            by_stride = {self.stride(base[n]): n for n in self.block_ends() if n in base}
            names = [by_stride[s] for s in AUTO_STRIDES if s in by_stride]
        return {
            name: "none" if name in self.top_names else "avg"
            for name in names
            if name not in self.top_names or size == self.facts.top_side
        }

    def layer_problem(self, size: int, layers: dict[str, str]) -> str | None:
        """Why `layers` (name -> reduction) cannot be taken from this backbone at input side
        `size`, or None."""
        if size < self.family.min_side:
            side = self.family.min_side
            return f"{self.name} needs inputs of at least {side}x{side}; data.image_size is {size}"
        for layer, reduction in layers.items():
            shape = self.facts.shape(layer)
            if shape is None:
                names = [n for n, _ in [*self.facts.base, *self.facts.top]]
                return (
                    f"extract.layers: unknown layer {layer!r} for {self.name}{closest(layer, names)} "
                    f"(`layerwise layers {self.name}` lists them all)"
                )
            top = self.facts.top_side
            if layer in self.top_names and size != top:
                return (
                    f"extract.layers: layer {layer!r} belongs to {self.name}'s classification top, "
                    f"which takes {top}x{top} inputs only; data.image_size is {size}: set "
                    f"data.image_size: {top} or choose convolutional layers"
                )
            problem = shape_problem(layer, reduction, shape)
            if problem:
                return problem
        return None

    def record(self, weights: str, size: int, asked: str | dict[str, str]) -> BackboneRecord:
        """What scan writes to data/scan/backbone.json: this backbone at input side `size`
        with `weights`, its layers `asked` (auto, or layer -> reduction) resolved and checked."""
        if weights == "preset" or Path(weights).is_dir():
            raise BackboneError(
                f"backbone.weights: {weights!r} is a KerasHub preset, and {self.name} is a "
                "keras.applications backbone: give auto, imagenet, random or a .weights.h5 file"
            )
        layers = self.auto(size) if asked == "auto" else dict(asked)
        problem = self.layer_problem(size, layers)
        if problem:
            raise BackboneError(problem)
        return BackboneRecord(
            name=self.name,
            weights=weights,
            identity=weights_identity(weights, self.weights_file()),
            family="keras.applications",
            module=self.row.module,
            constructor=self.row.constructor,
            min_side=self.family.min_side,
            top_side=self.facts.top_side,
            image_size=size,
            asked_layers=asked,
            layers=layers,
            top_layers=[layer for layer in layers if layer in self.top_names],
        )

    def weights_file(self) -> str:
        """How the name of Keras's ImageNet weights file for this backbone begins."""
        constructor = self.row.constructor
        return self.family.weights_file.format(
            lower=constructor.lower(),
            variant=constructor.removeprefix(self.family.prefix).lower(),
        )

    @property
    def min_side(self) -> int:
        return self.family.min_side

    def build_unweighted(self, size: int):
        """The model at input side `size` without weights (with its top at the top's side)."""
        from pipeline.backbones.keras_apps import build_unweighted

        return build_unweighted(self.row.constructor, size == self.facts.top_side, size)

    def tap_shapes(self, model, size: int) -> list[tuple[str, tuple[int, ...]]]:
        """(name, output shape) of every tap of `model` (built at `size`): its layers and the
        operations between."""
        from pipeline.backbones.facts import shapes
        from pipeline.backbones.keras_apps import taps

        return shapes(taps(model))


# ---------------------------------------------------------------- KerasHub

IMAGENET = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))  # mean, std of pixels in 0..1
CLIP = ((0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711))
HALF = ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))


@dataclass(frozen=True)
class HubFamily:
    """What the KerasHub presets of one family share."""

    cls: str  # keras_hub.models.<cls>: the image encoder
    mlp: str  # its constructor argument for the MLP width
    normalization: tuple[tuple[float, ...], tuple[float, ...]]  # the image converter's mean, std
    encoder: str | None = None  # the attribute of a preset's backbone holding the encoder
    class_token: bool = True
    any_side: bool = False  # position embeddings interpolate to any multiple of the patch
    fixed: tuple[tuple[str, object], ...] = ()  # constructor arguments of every preset


HUB_FAMILIES = {
    "dinov2": HubFamily("DINOV2Backbone", "intermediate_dim", IMAGENET, any_side=True),
    "dinov3": HubFamily(
        "DINOV3Backbone",
        "intermediate_dim",
        IMAGENET,
        any_side=True,
        fixed=(("use_key_bias", False), ("layer_scale_init_value", 1e-5)),
    ),
    "vit": HubFamily("ViTBackbone", "mlp_dim", HALF),
    "clip": HubFamily("CLIPVisionEncoder", "intermediate_dim", CLIP, encoder="vision_encoder"),
    "siglip": HubFamily(
        "SigLIPVisionEncoder", "intermediate_dim", HALF, encoder="vision_encoder", class_token=False
    ),
}
VIT_SIZES = {  # blocks, width, attention heads, MLP width of the standard ViT sizes
    "S": (12, 384, 6, 1536),
    "B": (12, 768, 12, 3072),
    "L": (24, 1024, 16, 4096),
    "g": (40, 1536, 24, 6144),
    "so400m": (27, 1152, 16, 4304),
}
SWIGLU = (("use_swiglu_ffn", True),)


class HubRow(NamedTuple):
    name: str  # backbone.name in params.yaml
    family: str
    preset: str  # KerasHub's name for it
    version: int  # of its Kaggle handle, as KerasHub lists it
    size: str  # a key of VIT_SIZES
    patch: int
    registers: int = 0
    extra: tuple[tuple[str, object], ...] = ()  # constructor arguments of this preset only
    side: int = 224  # the input side its weights were made for

    @property
    def handle(self) -> str:
        return f"kaggle://keras/{self.family}/keras/{self.preset}/{self.version}"


HUB_ROWS = [
    HubRow("dinov2_small", "dinov2", "dinov2_small", 1, "S", 14),
    HubRow("dinov2_base", "dinov2", "dinov2_base", 1, "B", 14),
    HubRow("dinov2_large", "dinov2", "dinov2_large", 1, "L", 14),
    HubRow("dinov2_giant", "dinov2", "dinov2_giant", 1, "g", 14, 0, SWIGLU),
    HubRow("dinov2_reg_small", "dinov2", "dinov2_with_registers_small", 1, "S", 14, 4),
    HubRow("dinov2_reg_base", "dinov2", "dinov2_with_registers_base", 1, "B", 14, 4),
    HubRow("dinov2_reg_large", "dinov2", "dinov2_with_registers_large", 1, "L", 14, 4),
    HubRow("dinov2_reg_giant", "dinov2", "dinov2_with_registers_giant", 1, "g", 14, 4, SWIGLU),
    HubRow("dinov3_small", "dinov3", "dinov3_vit_small_lvd1689m", 1, "S", 16, 4),
    HubRow("dinov3_base", "dinov3", "dinov3_vit_base_lvd1689m", 1, "B", 16, 4),
    HubRow("dinov3_large", "dinov3", "dinov3_vit_large_lvd1689m", 1, "L", 16, 4),
    HubRow("vit_base_16", "vit", "vit_base_patch16_224_imagenet", 4, "B", 16),
    HubRow("vit_large_16", "vit", "vit_large_patch16_224_imagenet", 4, "L", 16),
    HubRow("vit_base_16_in21k", "vit", "vit_base_patch16_224_imagenet21k", 3, "B", 16),
    HubRow("clip_base_16", "clip", "clip_vit_base_patch16", 3, "B", 16),
    HubRow("clip_base_32", "clip", "clip_vit_base_patch32", 3, "B", 32),
    HubRow("clip_large_14", "clip", "clip_vit_large_patch14", 3, "L", 14),
    HubRow("siglip_base_16", "siglip", "siglip_base_patch16_224", 1, "B", 16),
    HubRow("siglip_so400m_14", "siglip", "siglip_so400m_patch14_224", 1, "so400m", 14),
    HubRow("siglip2_base_16", "siglip", "siglip2_base_patch16_224", 1, "B", 16),
]


@dataclass(frozen=True)
class HubBackbone:
    """A KerasHub preset (or a local preset folder of its family) with its built facts."""

    row: HubRow
    family: HubFamily
    spec: HubSpec
    facts: LayerFacts

    @property
    def name(self) -> str:
        return self.row.name

    @property
    def top_names(self) -> set[str]:
        return set()

    @property
    def min_side(self) -> int:
        return self.spec.tokens.patch_size if self.spec.any_side else self.facts.top_side

    def block_ends(self) -> list[str]:
        return [name for name, _ in self.facts.base if name.startswith("block")]

    def build_unweighted(self, size: int):
        from pipeline.backbones.keras_apps import unweighted

        with unweighted():
            return hub.build(self.spec, size, weights=False)

    def tap_shapes(self, model, size: int) -> list[tuple[str, tuple[int, ...]]]:
        return hub.tap_shapes(model, self.spec.tokens, size)

    def auto(self, size: int) -> dict[str, str]:
        """An early block, a middle one and the final norm's output: class token and patch mean
        (SigLIP: patch mean, and its pooled vector)."""
        blocks = self.block_ends()
        picks = sorted({max(1, len(blocks) // 4), max(1, len(blocks) // 2)})
        reduction = "cls_avg" if self.spec.tokens.class_token else "avg"
        layers = {blocks[i - 1]: reduction for i in picks if i < len(blocks)}
        last = ("pooled", "none") if self.facts.shape("pooled") else ("final", reduction)
        return {**layers, last[0]: last[1]}

    def layer_problem(self, size: int, layers: dict[str, str]) -> str | None:
        patch = self.spec.tokens.patch_size
        if not self.spec.any_side and size != self.facts.top_side:
            side = self.facts.top_side
            return (
                f"{self.name} takes {side}x{side} inputs only (its position embeddings are made "
                f"for them); data.image_size is {size}: set data.image_size: {side}"
            )
        if size % patch or size < patch:
            low, high = max(patch, size // patch * patch), (size // patch + 1) * patch
            return (
                f"data.image_size {size} is not a multiple of {self.name}'s patch size {patch}: "
                f"use {low} or {high}"
            )
        names = [n for n, _ in self.facts.base]
        for layer, reduction in layers.items():
            shape = self.facts.shape(layer)
            if shape is None:
                return (
                    f"extract.layers: unknown layer {layer!r} for {self.name}{closest(layer, names)} "
                    f"(`layerwise layers {self.name}` lists them all)"
                )
            problem = shape_problem(layer, reduction, shape, self.spec.tokens)
            if problem:
                return problem
        return None

    def record(self, weights: str, size: int, asked: str | dict[str, str]) -> BackboneRecord:
        if weights == "imagenet" or Path(weights).is_file():
            raise BackboneError(
                f"backbone.weights: {weights!r} is for keras.applications backbones; {self.name} "
                "is a KerasHub preset: give auto or preset (its own weights), random, or a "
                "preset folder"
            )
        if Path(weights).is_dir():
            return self.of_folder(weights).record_as(weights, size, asked)
        return self.record_as(weights, size, asked)

    def record_as(self, weights: str, size: int, asked) -> BackboneRecord:
        layers = self.auto(size) if asked == "auto" else dict(asked)
        problem = self.layer_problem(size, layers)
        if problem:
            raise BackboneError(problem)
        spec = self.spec if weights != "random" else replace_spec(self.spec, preset=None)
        return BackboneRecord(
            name=self.name,
            weights=weights,
            identity=hub.weights_identity(weights, self.row.handle),
            family="keras_hub",
            module="keras_hub.models",
            constructor=self.family.cls,
            min_side=self.min_side,
            top_side=self.facts.top_side,
            image_size=size,
            asked_layers=asked,
            layers=layers,
            top_layers=[],
            hub=spec,
        )

    def of_folder(self, folder: str) -> HubBackbone:
        """This backbone as the preset folder `folder` holds it: its own architecture and image
        converter (the family's normalization without one)."""
        cls, arguments, image = hub.folder_config(folder)
        if cls != self.family.cls and not (self.family.encoder and cls.endswith("Backbone")):
            raise BackboneError(
                f"backbone.weights: {folder} holds a {cls}; {self.name} needs a "
                f"{self.family.cls} preset folder"
            )
        side = int(arguments.get("image_shape", (self.row.side,))[0])
        if self.family.encoder and cls != self.family.cls:  # a two-tower preset: the encoder's
            vision = arguments.get(self.family.encoder, {}).get("config", {})
            arguments, side = vision, int(vision.get("image_shape", (side,))[0])
        scale, offset = (image["scale"], image["offset"]) if image else normalization(self.family)
        spec = HubSpec(
            **{
                **self.spec.model_dump(),
                "preset": str(Path(folder).resolve()),
                "arguments": hub.encoder_arguments(arguments),
                "scale": _channels(scale),
                "offset": _channels(offset),
                "tokens": tokens_of(self.family, hub.encoder_arguments(arguments)),
            }
        )
        key = f"hub-folder-{canonical_digest(spec.arguments)[:16]}-{side}"
        facts = layer_facts(_hub_key(key), lambda: hub_facts(spec, side))
        return HubBackbone(self.row, self.family, spec, facts)


def replace_spec(spec: HubSpec, **changes) -> HubSpec:
    return HubSpec(**{**spec.model_dump(), **changes})


def _channels(value) -> list[float]:
    return [float(v) for v in value] if isinstance(value, (list, tuple)) else [float(value)] * 3


def normalization(family: HubFamily) -> tuple[list[float], list[float]]:
    """The family's mean and std as an image converter's scale and offset (pixels in 0..255)."""
    mean, std = family.normalization
    return [1 / (255 * s) for s in std], [-m / s for m, s in zip(mean, std)]


def tokens_of(family: HubFamily, arguments: dict) -> TokenLayout:
    prefix = int(family.class_token) + int(arguments.get("num_register_tokens", 0))
    patch = arguments["patch_size"]
    return TokenLayout(
        prefix=prefix,
        class_token=family.class_token,
        patch_size=int(patch[0] if isinstance(patch, (list, tuple)) else patch),
    )


def hub_arguments(row: HubRow, family: HubFamily) -> dict:
    blocks, width, heads, mlp = VIT_SIZES[row.size]
    arguments = {
        "patch_size": row.patch,
        "num_layers": blocks,
        "hidden_dim": width,
        "num_heads": heads,
        family.mlp: mlp,
        **dict(family.fixed),
        **dict(row.extra),
    }
    if family.any_side:
        arguments["num_register_tokens"] = row.registers
    return arguments


def hub_facts(spec: HubSpec, side: int) -> LayerFacts:
    """Build `spec` at `side` without weights and read its taps' shapes and its parameters."""
    import keras

    from pipeline.backbones.keras_apps import unweighted

    with unweighted():
        encoder = hub.build_encoder(spec, side, weights=False)
        base = hub.tap_shapes(hub.tapped(encoder), spec.tokens, side)
        parameters = encoder.count_params()
    return LayerFacts(
        format=FORMAT,
        keras=keras.__version__,
        top_side=side,
        parameters=(parameters, parameters),
        base=base,
        top=[],
        tokens=spec.tokens,
    )


def hub_version() -> str:
    """The installed keras-hub's version; a one-line error naming the extra without it."""
    try:
        return importlib.metadata.version("keras-hub")
    except importlib.metadata.PackageNotFoundError:
        raise BackboneError(
            f"KerasHub backbones need the keras-hub package, which is not installed: {hub.EXTRA}"
        ) from None


def _hub_key(key: str) -> str:
    return f"{key}@keras-hub-{hub_version()}"


def get_hub_backbone(row: HubRow) -> HubBackbone:
    family = HUB_FAMILIES[row.family]
    arguments = hub_arguments(row, family)
    scale, offset = normalization(family)
    spec = HubSpec(
        cls=family.cls,
        keras_hub=hub_version(),
        preset=row.handle,
        encoder=family.encoder,
        arguments=arguments,
        any_side=family.any_side,
        scale=scale,
        offset=offset,
        tokens=tokens_of(family, arguments),
    )
    facts = layer_facts(_hub_key(row.name), lambda: hub_facts(spec, row.side))
    return HubBackbone(row, family, spec, facts)


def cached_facts(name: str) -> bool:
    """Whether backbone `name`'s layer facts are cached (getting it builds nothing)."""
    from pipeline.backbones.facts import cached

    row = get_row(name)
    if isinstance(row, HubRow):
        try:
            return cached(_hub_key(name))
        except BackboneError:
            return True  # nothing to build: keras-hub is not installed
    return cached(name)


def get_backbone(name: str) -> Backbone | HubBackbone:
    """The row `name` with its family's rule and its layer facts (built once per Keras
    version, then read from the cache)."""
    row = get_row(name)
    if isinstance(row, HubRow):
        return get_hub_backbone(row)
    family = FAMILIES[row.family]
    return Backbone(
        row, family, layer_facts(row.name, lambda: derive(row.constructor, family.top_side))
    )


ALL_ROWS: dict[str, Row | HubRow] = {**BACKBONES, **{row.name: row for row in HUB_ROWS}}
BACKBONE_NAMES = tuple(ALL_ROWS)
APPLICATION_NAMES = tuple(BACKBONES)  # the keras.applications rows
