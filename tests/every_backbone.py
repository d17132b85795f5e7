"""Each registry row built with random weights at its smallest input side, its auto layers
extracted; run in worker processes (tests/test_every_backbone.py), so that the 40 builds share the
cores and their memory goes back when the workers end."""

from __future__ import annotations

import numpy as np


def extract_auto(name: str) -> dict:
    """What extracting `name`'s auto layers gives, and what `layerwise layers` reports of them."""
    import keras

    from pipeline.backbones.registry import BACKBONES, FAMILIES, get_backbone
    from pipeline.cli import layer_rows
    from pipeline.features.extractor import build_extractor

    spec = get_backbone(name)
    side = max(32, FAMILIES[BACKBONES[name].family].min_side)
    backbone = spec.record("random", side, "auto")
    extractor, used = build_extractor(backbone)
    images = np.random.default_rng(0).integers(0, 256, (2, side, side, 3), dtype=np.uint8)
    outputs = [np.asarray(o) for o in extractor(images)]  # eager: tracing would cost more
    (trunk,) = [layer for layer in extractor.layers if isinstance(layer, keras.Model)]
    rows = {row[0]: row for row in layer_rows(spec, trunk, side)}
    keras.backend.clear_session()
    return {
        "side": side,
        "used": used,
        "layers": backbone.layers,
        "shapes": [list(o.shape) for o in outputs],
        "finite": all(bool(np.isfinite(o).all()) for o in outputs),
        "reported": {layer: rows[layer] for layer in backbone.layers},
    }
