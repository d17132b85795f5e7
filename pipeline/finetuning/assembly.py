"""One Keras model for fine-tuning: uint8 images -> the backbone's preprocessing ->
[augmentation] -> the backbone up to the head's layer -> the reduction extract applied -> the
head.

Backbone layers from `unfreeze` upward train, everything below stays frozen, and every
BatchNormalization layer is made non-trainable, which in Keras 3 is what keeps it in inference
mode: a `training=False` passed when calling the backbone inside a functional model is
overridden by `fit`'s `training=True`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from pipeline.finetuning.conversion import FinetuneError
from pipeline.project.records import BackboneRecord

SEED = 0
UNFREEZE_SHARE = 0.25  # unfreeze: null trains the top quarter of the trunk's layers with weights


@dataclass
class Assembly:
    model: object  # uint8 images -> class probabilities
    probe: object  # uint8 images -> (reduced features, probabilities)
    trunk: object  # the backbone up to the head's layer
    unfreeze: str
    trainable_layers: list[str] = field(default_factory=list)  # bottom to top
    note: str | None = None

    def train_backbone(self, on: bool) -> None:
        """Make the unfrozen backbone layers trainable (on) or freeze the whole trunk (off:
        only the head trains). Recompile the model after a change."""
        self.trunk.trainable = on
        for layer in self.trunk.layers:
            layer.trainable = on and layer.name in self.trainable_layers


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
    names = [lyr.name for lyr in backbone.layers]
    trunk = keras.Model(backbone.inputs, tap(backbone, layer), name=f"{record.name}_to_{layer}")
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
    augment = RandomResizedCropFlip(min_scale, SEED, vflip, name="augment") if augment else None
    images, (reduced,) = reduced_features(record.module, trunk, {layer: reduction}, augment)
    probs = head(reduced)
    if keras.backend.standardize_dtype(probs.dtype) != "float32":
        probs = keras.layers.Activation("linear", dtype="float32", name="probs_float32")(probs)
    model = keras.Model(images, probs, name="finetuned")
    probe = keras.Model(images, [reduced, probs], name="finetuned_probe")
    assembly = Assembly(model, probe, trunk, unfreeze, trainable, note)
    assembly.train_backbone(True)
    return assembly
