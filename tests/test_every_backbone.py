"""Every registry row builds with random weights at its smallest input side and extracts its
auto layers with the widths `layerwise layers` reports."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.backbones.registry import BACKBONE_NAMES


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
    del extractor, trunk
    keras.backend.clear_session()
    return {
        "used": used,
        "layers": backbone.layers,
        "shapes": [list(o.shape) for o in outputs],
        "finite": all(bool(np.isfinite(o).all()) for o in outputs),
        "reported": {layer: rows[layer] for layer in backbone.layers},
    }


@pytest.fixture(scope="module")
def every_backbone() -> dict[str, dict]:
    """extract_auto of each row, in this process: one import of TensorFlow for the 40."""
    return {name: extract_auto(name) for name in BACKBONE_NAMES}


@pytest.mark.parametrize("name", BACKBONE_NAMES)
def test_every_backbone_extracts_its_auto_layers_as_layerwise_layers_reports(name, every_backbone):
    """Built with random weights at its smallest input side, each auto layer (the last block
    end at output strides 8, 16, 32, where the side allows) comes out averaged to the width
    `layerwise layers` reports for it."""
    got = every_backbone[name]
    assert got["used"] == "random" and got["finite"]
    assert got["layers"] and set(got["layers"].values()) == {"avg"}
    for layer, shape in zip(got["layers"], got["shapes"]):
        _, output, _, avg, _, mark = got["reported"][layer]
        assert shape == [2, int(avg)] and mark == "auto", (layer, output)
        assert int(output.split("x")[-1]) == int(avg)  # avg: one value per channel
