"""The backbones a project can choose: one row per keras.applications constructor (here) and
per KerasHub preset (backbones.hub_rows), one rule per family, everything else derived from the
built model (backbones.facts): layer names and shapes, strides, the top's input side, parameter
counts and the `auto` layers.

Only scan (and the `layerwise` command) read this table: it resolves the one backbone a
project uses into data/scan/backbone.json (records.BackboneRecord), which the stages that
build a backbone depend on. Adding a row, or changing one a project does not use, re-runs
nothing.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

from pipeline.backbones.facts import LayerFacts, derive, layer_facts
from pipeline.backbones.hub_rows import HUB_ROWS, HubBackbone, HubRow, get_hub_backbone, hub_key
from pipeline.backbones.keras_apps import weights_identity
from pipeline.features.reductions import shape_problem
from pipeline.project.errors import BackboneError, closest
from pipeline.project.records import BackboneRecord

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


def cached_facts(name: str) -> bool:
    """Whether backbone `name`'s layer facts are cached (getting it builds nothing)."""
    from pipeline.backbones.facts import cached

    row = get_row(name)
    if isinstance(row, HubRow):
        try:
            return cached(hub_key(name))
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
