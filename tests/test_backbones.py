"""Backbone registry, layer checks and weights: random, a local file, imagenet (cache), auto.

One table drives the registry test (as Keras's applications_test MODEL_LIST): every backbone,
built with random weights at a small input, four of its named layers with the shapes that the
architecture gives at that input, each layer reduced in another way.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest
from conftest import perturb_weights, relative_error, separate_layer_features

from pipeline.assembly import default_unfreeze
from pipeline.backbones import (
    BACKBONES,
    BackboneError,
    get_backbone,
    layer_table,
    list_backbones,
    load_backbone,
)
from pipeline.layers import build_extractor

# name, input side, {layer: expected output shape at that side}; the four layers are reduced
# grid2, max, none, avg in this order (none goes on a small map).
MODEL_LIST = [
    (
        "vgg16",
        32,
        {
            "block2_pool": (8, 8, 128),
            "block1_conv1": (32, 32, 64),
            "block4_pool": (2, 2, 512),
            "block5_pool": (1, 1, 512),
        },
    ),
    (
        "vgg19",
        32,
        {
            "block3_conv4": (8, 8, 256),
            "block1_pool": (16, 16, 64),
            "block5_conv4": (2, 2, 512),
            "block5_pool": (1, 1, 512),
        },
    ),
    (
        "resnet50",
        32,
        {
            "conv2_block3_out": (8, 8, 256),
            "conv1_relu": (16, 16, 64),
            "conv4_block6_out": (2, 2, 1024),
            "conv5_block3_out": (1, 1, 2048),
        },
    ),
    (
        "mobilenet_v2",
        32,
        {
            "block_3_expand_relu": (8, 8, 144),
            "Conv1_relu": (16, 16, 32),
            "block_13_expand_relu": (2, 2, 576),
            "out_relu": (1, 1, 1280),
        },
    ),
    (
        "xception",
        71,
        {
            "block4_pool": (5, 5, 728),
            "block1_conv1_act": (35, 35, 32),
            "block13_pool": (3, 3, 1024),
            "block14_sepconv2_act": (3, 3, 2048),
        },
    ),
    (
        "efficientnet_b0",
        32,
        {
            "block3a_expand_activation": (8, 8, 144),
            "stem_activation": (16, 16, 32),
            "block6a_expand_activation": (2, 2, 672),
            "top_activation": (1, 1, 1280),
        },
    ),
    (
        "inception_v3",
        75,
        {
            "mixed0": (7, 7, 256),
            "mixed2": (7, 7, 288),
            "mixed7": (3, 3, 768),
            "mixed10": (1, 1, 2048),
        },
    ),
]
MODES = ("grid2", "max", "none", "avg")


def expected_width(shape, mode: str) -> int:
    h, w, c = shape
    return {"grid2": 4 * c, "max": c, "avg": c, "none": h * w * c}[mode]


def test_model_list_covers_the_registry():
    assert [name for name, _, _ in MODEL_LIST] == list(list_backbones()) == list(BACKBONES)
    for name, size, _ in MODEL_LIST:
        assert size == max(32, BACKBONES[name].min_size)


@pytest.mark.parametrize("name, size, layers", MODEL_LIST, ids=[m[0] for m in MODEL_LIST])
def test_registry_shapes_and_extractor_widths(name, size, layers, rng_images):
    import keras

    requested = dict(zip(layers, MODES))
    extractor, used = build_extractor(name, "random", size, requested)
    assert used == "random"
    assert extractor.inputs[0].dtype == "uint8"
    (trunk,) = [layer for layer in extractor.layers if isinstance(layer, keras.Model)]
    assert [tuple(o.shape[1:]) for o in trunk.outputs] == list(layers.values())
    unfreeze = default_unfreeze(trunk)  # the top quarter of the layers with weights
    weighted = [layer.name for layer in trunk.layers if layer.weights]
    assert unfreeze in weighted[len(weighted) // 2 :], unfreeze

    widths = [int(o.shape[-1]) for o in extractor.outputs]
    assert widths == [expected_width(layers[layer], mode) for layer, mode in requested.items()]
    outputs = extractor.predict_on_batch(rng_images(1, size))
    for out, width in zip(outputs, widths):
        assert out.shape == (1, width) and np.isfinite(out).all()


def test_unknown_backbone_lists_the_registry():
    with pytest.raises(BackboneError, match="unknown backbone 'vgg17'.*vgg16.*inception_v3"):
        get_backbone("vgg17")


def test_input_below_min_size_is_refused():
    with pytest.raises(
        BackboneError, match="xception needs inputs of at least 71x71; data.image_size is 32"
    ):
        load_backbone("xception", "random", 32, ["block4_pool"])


def test_unknown_layer_names_the_closest_valid_ones():
    with pytest.raises(BackboneError) as info:
        load_backbone("vgg16", "random", 32, ["block2_pool", "block9_pool"])
    message = str(info.value)
    assert "unknown layer 'block9_pool' for vgg16; did you mean block5_pool, block4_pool" in message
    assert "`layerwise layers vgg16` lists them all" in message and len(message) < 200


@pytest.mark.parametrize("name", list(BACKBONES))
def test_layer_table_and_suggestions_match_keras(name):
    """The static table the params checks read is what Keras builds, top included; the
    parameter counts `layerwise backbones` prints are the models'."""
    spec = get_backbone(name)
    base = spec.build(None, False, max(32, spec.min_size))
    top = spec.build(None, True, spec.top_size)
    table = layer_table(name)
    assert tuple(layer.name for layer in base.layers) == table["base"]
    assert (
        tuple(layer.name for layer in top.layers if layer.name not in table["base"])
        == (table["top"])
    )
    assert (base.count_params(), top.count_params()) == spec.parameters
    assert set(spec.auto_layers) <= set(spec.feature_layers) <= {*table["base"], *table["top"]}
    assert list(spec.auto(spec.top_size)) == list(spec.auto_layers)


def test_fc2_needs_224_says_so():
    with pytest.raises(BackboneError) as info:
        build_extractor("vgg16", "random", 32, {"block5_pool": "avg", "fc2": "none"})
    message = str(info.value)
    assert "'fc2'" in message and "224x224" in message and "data.image_size is 32" in message
    assert "data.image_size: 224" in message


def test_fc2_at_224_builds_with_the_top(rng_images):
    extractor, _ = build_extractor("vgg16", "random", 224, {"block5_pool": "avg", "fc2": "none"})
    assert [int(o.shape[-1]) for o in extractor.outputs] == [512, 4096]
    block5, fc2 = extractor.predict_on_batch(rng_images(1, 224))
    assert block5.shape == (1, 512) and fc2.shape == (1, 4096) and (fc2 >= 0).all()  # relu


def test_spatial_reduction_of_a_vector_layer_is_refused():
    with pytest.raises(BackboneError, match="extract.layers.fc2: reduction 'avg' needs a spatial"):
        build_extractor("vgg16", "random", 224, {"fc2": "avg"})


def test_auto_named_layers_resolve_in_every_build():
    """xception leaves some layers unnamed (conv2d_1, add_1): Keras numbers them per process,
    so another model built before must not shift the names the check saw."""
    get_backbone("xception").build(None, False, 71)  # advances Keras's name counters
    model, _ = load_backbone("xception", "random", 71, ["add_1", "block4_pool"])
    assert tuple(model.get_layer("add_1").output.shape[1:]) == (
        9,
        9,
        256,
    )  # 71 -> 35 -> 33 -> 17 (add) -> 9 (add_1)
    again = get_backbone("xception").build(None, False, 71)
    assert [layer.name for layer in again.layers] == [layer.name for layer in model.layers]


def test_random_weights_are_reproducible():
    a, _ = load_backbone("vgg16", "random", 32, ["block5_pool"])
    b, _ = load_backbone("vgg16", "random", 32, ["block5_pool"])
    assert all(np.array_equal(x, y) for x, y in zip(a.get_weights(), b.get_weights()))


# ---------------------------------------------------------------- weights from a local file


def test_weights_file_gives_the_in_memory_models_features(project):
    layers = {"block2_pool": "avg", "block5_pool": "max"}
    mine = get_backbone("vgg16").build(None, False, 32)
    perturb_weights(mine, seed=1)
    path = project.root / "mine.weights.h5"
    mine.save_weights(path)
    project.write_params(
        backbone={"weights": "mine.weights.h5"}, replace={"extract.layers": layers}
    )
    project.main("scan")
    project.main("prepare")
    project.main("extract")

    from pipeline.data import load_split
    from pipeline.store import open_splits

    files = open_splits(project.features)
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    assert files["train"].fingerprint.weights == f"file:sha256:{digest}"
    assert files["train"].fingerprint.weights_used == f"file:sha256:{digest}"

    images, _ = load_split(project.prepared, "val")
    want = separate_layer_features(mine, np.asarray(images), layers)
    random_model, _ = load_backbone("vgg16", "random", 32, list(layers))
    unlike = separate_layer_features(random_model, np.asarray(images), layers)
    for layer in layers:
        got = files["val"].read(layer)
        assert relative_error(got, want[layer]) < 1e-5, layer
        assert relative_error(unlike[layer], want[layer]) > 0.1  # the file was really used


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_weights_file_of_another_model_is_refused(tmp_path):
    other = get_backbone("vgg19").build(None, False, 32)
    path = tmp_path / "vgg19.weights.h5"
    other.save_weights(path)
    with pytest.raises(BackboneError, match="does not fit vgg16"):
        load_backbone("vgg16", str(path), 32, ["block5_pool"])


# ---------------------------------------------------------------- imagenet and auto, offline


def test_imagenet_offline_fails_with_a_clear_message(offline):
    with pytest.raises(BackboneError) as info:
        load_backbone("vgg16", "imagenet", 32, ["block5_pool"])
    message = str(info.value)
    assert "could not load ImageNet weights for vgg16" in message
    assert "~/.keras/models" in message and "weights: random or auto" in message


def test_auto_offline_falls_back_to_random_and_records_it(offline, project, capsys):
    project.write_params(backbone={"weights": "auto"}, data={"limit": 60})
    project.main("scan")
    project.main("prepare")
    project.main("extract")
    assert "ImageNet weights unavailable" in capsys.readouterr().out

    from pipeline.data import load_split
    from pipeline.store import open_features

    val = open_features(project.features / "val.h5")
    assert val.fingerprint.weights == "auto:not-cached"
    assert val.fingerprint.weights_used == "random"
    images, _ = load_split(project.prepared, "val")
    random_model, _ = load_backbone("vgg16", "random", 32, ["block5_pool"])
    want = separate_layer_features(random_model, np.asarray(images), {"block5_pool": "avg"})
    assert relative_error(val.read("block5_pool"), want["block5_pool"]) < 1e-5


def test_imagenet_loads_a_file_preplaced_in_the_keras_cache(offline, monkeypatch):
    """The real imagenet path: keras.applications finds its weights file in the Keras cache
    ($KERAS_HOME/models/<keras's file name>), nothing is downloaded (the network is cut).

    Keras checks the cached file against the md5 of the real ImageNet file, which a stand-in
    cannot match; that one check is told to accept our stand-in (only that file). The stand-in
    is the legacy-h5 weights file Keras expects there, written from a perturbed model."""
    import h5py
    from keras.src.legacy.saving import legacy_h5_format
    from keras.src.utils import file_utils

    source = get_backbone("vgg16").build(None, False, 32)
    perturb_weights(source, seed=2)
    cached = offline / "models" / "vgg16_weights_tf_dim_ordering_tf_kernels_notop.h5"
    cached.parent.mkdir(parents=True)
    with h5py.File(cached, "w") as f:
        legacy_h5_format.save_weights_to_hdf5_group(f, source)

    real_validate = file_utils.validate_file
    monkeypatch.setattr(
        file_utils,
        "validate_file",
        lambda fpath, *a, **k: str(fpath) == str(cached) or real_validate(fpath, *a, **k),
    )
    for weights in ("imagenet", "auto"):
        model, used = load_backbone("vgg16", weights, 32, ["block5_pool"])
        assert used == "imagenet"
        for got, want in zip(model.get_weights(), source.get_weights()):
            np.testing.assert_array_equal(got, want)


def test_scan_knows_whether_keras_has_imagenet_weights_cached(offline, monkeypatch, tmp_path):
    """`auto` resolves to imagenet exactly when Keras's cache holds the model's file: every
    registry prefix matches the file name Keras itself asks for."""
    import urllib.error

    from keras.src.utils import file_utils

    from pipeline.backbones import BACKBONES, weights_identity

    asked = []

    def record(url, path, *args, **kwargs):
        asked.append(Path(path).name)
        raise urllib.error.URLError("offline")

    monkeypatch.setattr(file_utils, "urlretrieve", record)
    for name, spec in BACKBONES.items():
        assert weights_identity(name, "auto") == "auto:not-cached"
        with pytest.raises(Exception, match="offline|URL|fetch"):
            spec.build("imagenet", False, max(spec.min_size, 75))
        assert asked[-1].startswith(spec.weights_prefix), (name, asked[-1])
        (offline / "models").mkdir(exist_ok=True)
        (offline / "models" / asked[-1]).write_bytes(b"cached")
        assert weights_identity(name, "auto") == weights_identity(name, "imagenet") == "imagenet"
    assert weights_identity("vgg16", "random") == "random"
    weights = tmp_path / "w.weights.h5"
    weights.write_bytes(b"some weights")
    digest = hashlib.sha256(b"some weights").hexdigest()
    assert weights_identity("vgg16", str(weights)) == f"file:sha256:{digest}"
