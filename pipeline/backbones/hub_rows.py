"""The KerasHub rows of the backbone registry: one line per preset and one rule per family, its
facts derived from an unweighted build of the row's constructor arguments (or of a preset
folder's), cached per keras-hub version."""

from __future__ import annotations

import importlib.metadata
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

from pipeline.backbones import hub
from pipeline.backbones.facts import FORMAT, LayerFacts, layer_facts
from pipeline.features.reductions import shape_problem
from pipeline.project.errors import BackboneError, closest
from pipeline.project.records import BackboneRecord, HubSpec, TokenLayout, canonical_digest

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
        spec = self.spec if weights != "random" else self.spec.model_copy(update={"preset": None})
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
        scale, offset = normalization(self.family)
        if image:
            scale, offset = hub.channels(image["scale"], 1.0), hub.channels(image["offset"], 0.0)
        arguments = hub.encoder_arguments(arguments)
        spec = self.spec.model_copy(
            update={
                "preset": str(Path(folder).resolve()),
                "arguments": arguments,
                "scale": scale,
                "offset": offset,
                "tokens": tokens_of(self.family, arguments),
            }
        )
        key = f"hub-folder-{canonical_digest(spec.arguments)[:16]}-{side}"
        facts = layer_facts(hub_key(key), lambda: hub_facts(spec, side))
        return HubBackbone(self.row, self.family, spec, facts)


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


def hub_key(key: str) -> str:
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
    facts = layer_facts(hub_key(row.name), lambda: hub_facts(spec, row.side))
    return HubBackbone(row, family, spec, facts)
