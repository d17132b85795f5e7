"""Every registry row builds with random weights at its smallest input side and extracts its
auto layers with the widths `layerwise layers` reports (the builds: tests/every_backbone.py)."""

from __future__ import annotations

import pytest

from pipeline.backbones.registry import APPLICATION_NAMES


@pytest.fixture(scope="module")
def every_backbone() -> dict[str, dict]:
    """every_backbone.extract_auto of each row, on two worker processes (largest first)."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    from every_backbone import extract_auto

    order = list(reversed(APPLICATION_NAMES))  # the largest families first: both end together
    context = multiprocessing.get_context("spawn")  # a fresh Keras in each worker
    with ProcessPoolExecutor(2, mp_context=context) as pool:
        return dict(zip(order, pool.map(extract_auto, order)))


@pytest.mark.parametrize("name", APPLICATION_NAMES)
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
