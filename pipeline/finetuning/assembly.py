"""One Keras model for fine-tuning: uint8 images -> the backbone's preprocessing ->
[augmentation] -> the backbone up to the head's layer -> the reduction extract applied -> the
head.

Backbone layers from `unfreeze` upward train, everything below stays frozen, and every
BatchNormalization layer is made non-trainable, which in Keras 3 is what keeps it in inference
mode: a `training=False` passed when calling the backbone inside a functional model is
overridden by `fit`'s `training=True`. A KerasHub transformer unfreezes whole blocks (its
`stem`, `block1`.., `final`), each with its LayerNorms.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from pipeline.finetuning.conversion import FinetuneError
from pipeline.project.records import BackboneRecord

SEED = 0
UNFREEZE_SHARE = 0.25  # unfreeze: null trains the top quarter of the weighted layers (blocks)


@dataclass
class Assembly:
    model: object  # uint8 images -> class probabilities
    probe: object  # uint8 images -> (reduced features, probabilities)
    trunk: object  # the backbone up to the head's layer
    unfreeze: str
    trainable_layers: list[str] = field(default_factory=list)  # bottom to top
    note: str | None = None
    units: dict[str, list] | None = None  # a transformer's: block name -> its layers

    def parts(self) -> dict[str, list]:
        """What trains together, by name, bottom to top: a layer, or a transformer's block."""
        return self.units or {layer.name: [layer] for layer in self.trunk.layers}

    def train_backbone(self, on: bool) -> None:
        """Make the unfrozen backbone layers trainable (on) or freeze the whole trunk (off:
        only the head trains). Recompile the model after a change."""
        self.trunk.trainable = on
        for name, layers in self.parts().items():
            for layer in layers:
                layer.trainable = on and name in self.trainable_layers


def default_unfreeze(trunk) -> str:
    """The lowest of the top UNFREEZE_SHARE of the trunk's layers with weights (BatchNormalization
    aside): block5_conv1 for VGG16 up to block5_pool."""
    import keras

    weighted = [
        lyr.name
        for lyr in trunk.layers
        if lyr.weights and not isinstance(lyr, keras.layers.BatchNormalization)
    ]
    return weighted[-max(1, round(len(weighted) * UNFREEZE_SHARE))]


def assemble(
    backbone,
    record: BackboneRecord,
    layer: str,
    reduction: str,
    head,
    unfreeze: str | None,
    augment: bool,
    min_scale: float = 0.5,
    vflip: bool = False,
) -> Assembly:
    """Images -> preprocess -> [augment] -> backbone up to `layer` -> reduction -> head.

    Layers of the backbone from `unfreeze` upward are trainable, except BatchNormalization
    (kept non-trainable, hence in inference mode); layers below it are frozen, and their
    Dropout (EfficientNet has some) is switched off so that they compute what extract did.
    """
    import keras

    from pipeline.backbones.keras_apps import tap, taps
    from pipeline.features.extractor import reduced_features
    from pipeline.finetuning.augment import RandomResizedCropFlip

    if layer not in taps(backbone):
        raise FinetuneError(
            f"the head's layer {layer!r} is not a layer of {record.name}: run `dvc repro`"
        )
    trunk = keras.Model(backbone.inputs, tap(backbone, layer), name=f"{record.name}_to_{layer}")
    augment = RandomResizedCropFlip(min_scale, SEED, vflip, name="augment") if augment else None
    if record.family == "keras_hub":
        units, unfreeze, trainable, note = _blocks(trunk, record, layer, unfreeze)
    else:
        units = None
        unfreeze, trainable, note = _layers(backbone, trunk, layer, unfreeze, record)
    images, (reduced,) = reduced_features(record, trunk, {layer: reduction}, augment)
    probs = head(reduced)
    if keras.backend.standardize_dtype(probs.dtype) != "float32":
        probs = keras.layers.Activation("linear", dtype="float32", name="probs_float32")(probs)
    model = keras.Model(images, probs, name="finetuned")
    probe = keras.Model(images, [reduced, probs], name="finetuned_probe")
    assembly = Assembly(model, probe, trunk, unfreeze, trainable, note, units)
    assembly.train_backbone(True)
    return assembly


def _blocks(trunk, record: BackboneRecord, layer: str, unfreeze: str | None):
    """A transformer's units, the lowest to train, those that train, a note: blocks from
    `unfreeze` (null: the top quarter) up to the head's layer."""
    from pipeline.backbones.hub import units

    parts = units(trunk)
    below = list(parts)[: list(parts).index(layer) + 1]  # a tapped block computes no higher one
    blocks = [name for name in below if name.startswith("block")] or below
    unfreeze = unfreeze or blocks[-max(1, round(len(blocks) * UNFREEZE_SHARE))]
    if unfreeze not in parts:
        raise FinetuneError(
            f"finetune.unfreeze: unknown block {unfreeze!r} for {record.name}; valid, bottom to "
            f"top up to the head's layer {layer}: {', '.join(below)}"
        )
    if unfreeze not in below:
        note = (
            f"finetune.unfreeze={unfreeze} lies above the head's layer {layer}: nothing in the "
            f"backbone is trainable, only the head trains. Choose one of {', '.join(below)}."
        )
        return parts, unfreeze, [], note
    return parts, unfreeze, below[below.index(unfreeze) :], None


def _layers(backbone, trunk, layer: str, unfreeze: str | None, record: BackboneRecord):
    """A CNN's lowest layer to train, the layers that train and a note (see `assemble`)."""
    import keras

    names = [lyr.name for lyr in backbone.layers]
    trunk_names = [lyr.name for lyr in trunk.layers]
    unfreeze = unfreeze or default_unfreeze(trunk)
    if unfreeze not in names:
        raise FinetuneError(
            f"finetune.unfreeze: unknown layer {unfreeze!r} for {record.name}; valid layers, "
            f"bottom to top up to the head's layer {layer}: {', '.join(trunk_names[1:])}"
        )
    note = None
    start = trunk_names.index(unfreeze) if unfreeze in trunk_names else len(trunk_names)
    if unfreeze not in trunk_names:
        note = (
            f"finetune.unfreeze={unfreeze} lies above the head's layer {layer}: nothing in the "
            f"backbone is trainable, only the head trains. Choose a layer at or below {layer} "
            f"(e.g. one of {', '.join(trunk_names[-6:])})."
        )
    trainable = [
        lyr.name
        for lyr in trunk.layers[start:]
        if lyr.weights and not isinstance(lyr, keras.layers.BatchNormalization)
    ]
    for lyr in trunk.layers[:start]:
        if isinstance(lyr, keras.layers.Dropout):
            lyr.rate = 0.0  # Dropout is the identity at inference, so this changes no prediction
    return unfreeze, trainable, note
