"""Backbones as data: every registry row builds and extracts its auto layers, the derived layer
facts and their cache, the checks scan makes with them, and the weights: random, a local
file, imagenet (Keras's cache), auto."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest
from conftest import perturb_weights, relative_error, resolved, separate_layer_features

from pipeline.backbones import facts, registry
from pipeline.backbones.keras_apps import build, load_backbone, unweighted, weights_identity
from pipeline.backbones.registry import APPLICATION_NAMES, ROWS, get_backbone
from pipeline.features.extractor import build_extractor
from pipeline.project.errors import BackboneError

# ---------------------------------------------------------------- every row


def test_the_registry_holds_every_keras_applications_constructor():
    import keras

    constructors = {
        n
        for n in dir(keras.applications)
        if n[0].isupper() and callable(getattr(keras.applications, n))
    }
    assert {row.constructor for row in ROWS} == constructors
    assert len(ROWS) == len(APPLICATION_NAMES) == 40


# Where the rule lands for architectures whose tap points the literature names (timm's
# feature_info; the Keras guides for VGG): at each output stride, the last block end.
AUTO_LAYERS = {
    "vgg16": ["block2_pool", "block5_pool", "fc2"],
    "resnet50": ["conv3_block4_out", "conv4_block6_out", "conv5_block3_out"],
    "resnet50_v2": ["conv3_block3_out", "conv4_block5_out", "post_relu"],  # strides last in a stage
    "mobilenet_v2": ["block_6_expand_relu", "block_13_expand_relu", "out_relu"],
    "xception": ["block4_sepconv2_act", "block13_sepconv2_act", "block14_sepconv2_act"],
    "efficientnet_b0": ["block3b_add", "block5c_add", "top_activation"],
    "inception_v3": ["mixed2", "mixed7", "mixed10"],
    "densenet121": ["conv3_block12_concat", "conv4_block24_concat", "relu"],
    "mobilenet_v3_small": ["expanded_conv_2_add", "expanded_conv_7_add", "activation_17"],
    "convnext_tiny": ["add_5", "add_14", "layer_normalization"],  # residual sums, operations
}


@pytest.mark.parametrize("name, layers", AUTO_LAYERS.items())
def test_auto_layers_are_the_last_block_end_at_strides_8_16_32(name, layers):
    spec = get_backbone(name)
    assert list(spec.auto(spec.facts.top_side)) == layers
    ends = spec.block_ends()
    assert set(layers) <= set(ends)
    strides = [
        spec.stride(spec.facts.shape(layer)) for layer in ends if layer not in spec.top_names
    ]
    assert strides == sorted(set(strides))  # one block end per stride, early to late


def test_facts_match_the_published_sizes():
    """Input sides and parameter counts as keras.io's table of applications gives them."""
    published = {  # name: (input side, parameters with the top, in millions)
        "vgg16": (224, 138.4),
        "resnet152_v2": (224, 60.4),
        "inception_resnet_v2": (299, 55.9),
        "nasnet_large": (331, 88.9),
        "efficientnet_b7": (600, 66.7),
        "convnext_xlarge": (224, 350.1),
        "mobilenet_v3_small": (224, 2.6),
    }
    for name, (side, millions) in published.items():
        spec = get_backbone(name)
        assert spec.facts.top_side == side, name
        assert abs(spec.facts.parameters[1] / 1e6 - millions) < 0.15, (name, spec.facts.parameters)
        assert spec.facts.parameters[0] < spec.facts.parameters[1]


def test_a_warm_cache_builds_nothing(monkeypatch):
    get_backbone("vgg16")  # cached by now

    def no_build(*args, **kwargs):
        raise AssertionError("a model was built")

    monkeypatch.setattr(facts, "build_unweighted", no_build)
    assert get_backbone("vgg16").facts.top_side == 224


def test_facts_are_cached_per_keras_version(tmp_path, monkeypatch):
    monkeypatch.setenv(facts.CACHE_VARIABLE, str(tmp_path))
    built = []
    real = facts.derive
    monkeypatch.setattr(registry, "derive", lambda *a: built.append(a) or real(*a))
    first = get_backbone("mobilenet").facts
    assert get_backbone("mobilenet").facts == first and len(built) == 1
    (cached,) = tmp_path.glob("keras-*/mobilenet.json")
    assert cached.parent.name == f"keras-{first.keras}"
    cached.write_text("{not json")  # a damaged cache file is derived again
    assert get_backbone("mobilenet").facts == first and len(built) == 2


# ---------------------------------------------------------------- checks scan makes


def test_a_kerashub_backbone_without_keras_hub_is_one_line_naming_the_extra(monkeypatch):
    import importlib.metadata

    real = importlib.metadata.version

    def version(distribution):
        if distribution == "keras-hub":
            raise importlib.metadata.PackageNotFoundError(distribution)
        return real(distribution)

    monkeypatch.setattr(importlib.metadata, "version", version)
    with pytest.raises(BackboneError, match=r"need the keras-hub package.*layerwise\[hub\]"):
        get_backbone("dinov2_small")


def test_unknown_backbone_names_the_closest_rows():
    with pytest.raises(BackboneError, match=r"unknown backbone 'resnet5'; did you mean resnet50"):
        get_backbone("resnet5")


def test_input_below_min_side_is_refused():
    with pytest.raises(
        BackboneError, match="xception needs inputs of at least 71x71; data.image_size is 32"
    ):
        resolved("xception", ["block4_pool"], 32)


def test_unknown_layer_names_the_closest_valid_ones():
    with pytest.raises(BackboneError) as info:
        resolved("vgg16", ["block2_pool", "block9_pool"])
    message = str(info.value)
    assert "unknown layer 'block9_pool' for vgg16; did you mean block5_pool, block4_pool" in message
    assert "`layerwise layers vgg16` lists them all" in message and len(message) < 200


def test_fc2_needs_224_says_so():
    with pytest.raises(BackboneError) as info:
        resolved("vgg16", {"block5_pool": "avg", "fc2": "none"}, 32)
    message = str(info.value)
    assert "'fc2'" in message and "224x224" in message and "data.image_size is 32" in message
    assert "data.image_size: 224" in message


def test_fc2_at_224_builds_with_the_top(rng_images):
    backbone = resolved("vgg16", {"block5_pool": "avg", "fc2": "none"}, 224)
    assert backbone.top_layers == ["fc2"]
    extractor, _ = build_extractor(backbone)
    assert [int(o.shape[-1]) for o in extractor.outputs] == [512, 4096]
    block5, fc2 = extractor.predict_on_batch(rng_images(1, 224))
    assert block5.shape == (1, 512) and fc2.shape == (1, 4096) and (fc2 >= 0).all()  # relu


def test_spatial_reduction_of_a_vector_layer_is_refused():
    with pytest.raises(BackboneError, match="extract.layers.fc2: reduction 'avg' needs a spatial"):
        resolved("vgg16", {"fc2": "avg"}, 224)


def test_auto_named_layers_resolve_in_every_build():
    """xception leaves some layers unnamed (conv2d_1, add_1): Keras numbers them per process,
    so another model built before must not shift the names the facts recorded."""
    build("Xception", None, False, 71)  # advances Keras's name counters
    model, _ = load_backbone(resolved("xception", ["add_1", "block4_pool"], 71), ["add_1"])
    # 71 -> 35 -> 33 -> 17 (add) -> 9 (add_1)
    assert tuple(model.get_layer("add_1").output.shape[1:]) == (9, 9, 256)
    again = build("Xception", None, False, 71)
    assert [layer.name for layer in again.layers] == [layer.name for layer in model.layers]


def test_random_weights_are_reproducible():
    backbone = resolved("vgg16", ["block5_pool"])
    a, _ = load_backbone(backbone, ["block5_pool"])
    b, _ = load_backbone(backbone, ["block5_pool"])
    assert all(np.array_equal(x, y) for x, y in zip(a.get_weights(), b.get_weights()))


# ---------------------------------------------------------------- weights from a local file


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_a_weights_file_is_used_and_fingerprinted_by_hash_through_the_stages(project):
    layers = {"block2_pool": "avg", "block5_pool": "max"}
    mine = build("VGG16", None, False, 32)
    perturb_weights(mine, seed=1)
    path = project.root / "mine.weights.h5"
    mine.save_weights(path)
    project.write_params(
        backbone={"weights": "mine.weights.h5"}, replace={"extract.layers": layers}
    )
    project.main("scan")
    project.main("prepare")
    project.main("extract")

    from pipeline.data.prepared import load_split
    from pipeline.features.store import open_splits

    files = open_splits(project.layout)
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    assert files["train"].fingerprint.backbone["identity"] == f"file:sha256:{digest}"
    assert files["train"].fingerprint.weights_used == f"file:sha256:{digest}"

    images, _ = load_split("val", layout=project.layout)
    want = separate_layer_features(mine, np.asarray(images), layers)
    random_model, _ = load_backbone(resolved("vgg16", layers), list(layers))
    unlike = separate_layer_features(random_model, np.asarray(images), layers)
    for layer in layers:
        got = files["val"].read(layer)
        assert relative_error(got, want[layer]) < 1e-5, layer
        assert relative_error(unlike[layer], want[layer]) > 0.1  # the file was really used


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_weights_file_of_another_model_is_refused(tmp_path):
    path = tmp_path / "vgg19.weights.h5"
    build("VGG19", None, False, 32).save_weights(path)
    with pytest.raises(BackboneError, match="does not fit vgg16"):
        load_backbone(resolved("vgg16", ["block5_pool"], weights=str(path)), ["block5_pool"])


# ---------------------------------------------------------------- imagenet and auto, offline


def test_imagenet_offline_fails_with_a_clear_message(offline, monkeypatch, capsys):
    from pipeline.backbones import keras_apps

    monkeypatch.setattr(keras_apps, "IMAGENET_HOST", "weights.invalid")  # RFC 2606
    with pytest.raises(BackboneError) as info:
        load_backbone(resolved("vgg16", ["block5_pool"], weights="imagenet"), ["block5_pool"])
    assert "Downloading" not in capsys.readouterr().out
    message = str(info.value)
    assert "could not load ImageNet weights for vgg16" in message
    assert "~/.keras/models" in message and "weights: random or auto" in message


@pytest.mark.parametrize("host", ["unreachable", "reachable"])
def test_auto_offline_falls_back_to_random_and_records_it(
    offline, project, capsys, monkeypatch, host
):
    """Offline (the download host cannot be reached) nothing is tried and no "Downloading"
    line is printed; reachable but failing, Keras's own download fails and is reported."""
    from pipeline.backbones import keras_apps

    if host == "unreachable":
        monkeypatch.setattr(keras_apps, "IMAGENET_HOST", "weights.invalid")  # RFC 2606
    else:
        monkeypatch.setattr(keras_apps, "reachable", lambda host: True)
    project.write_params(backbone={"weights": "auto"}, data={"limit": 60})
    project.main("scan")
    project.main("prepare")
    project.main("extract")
    out = capsys.readouterr().out
    if host == "unreachable":
        assert "weights.invalid cannot be reached; using random" in out
        assert "Downloading" not in out
    else:
        assert "ImageNet weights unavailable" in out and "Downloading data from" in out

    from pipeline.data.prepared import load_split
    from pipeline.features.store import open_features

    val = open_features(project.layout.features_file("val"))
    assert val.fingerprint.backbone["identity"] == "auto:not-cached"
    assert val.fingerprint.weights_used == "random"
    images, _ = load_split("val", layout=project.layout)
    random_model, _ = load_backbone(resolved("vgg16", ["block5_pool"]), ["block5_pool"])
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

    source = build("VGG16", None, False, 32)
    perturb_weights(source, seed=2)
    cached = offline / "models" / "vgg16_weights_tf_dim_ordering_tf_kernels_notop.h5"
    cached.parent.mkdir()
    with h5py.File(cached, "w") as f:
        legacy_h5_format.save_weights_to_hdf5_group(f, source)

    real_validate = file_utils.validate_file
    monkeypatch.setattr(
        file_utils,
        "validate_file",
        lambda fpath, *a, **k: str(fpath) == str(cached) or real_validate(fpath, *a, **k),
    )
    for weights in ("imagenet", "auto"):
        backbone = resolved("vgg16", ["block5_pool"], weights=weights)
        assert backbone.identity == "imagenet"  # auto: Keras has the file cached
        model, used = load_backbone(backbone, ["block5_pool"])
        assert used == "imagenet"
        for got, want in zip(model.get_weights(), source.get_weights()):
            np.testing.assert_array_equal(got, want)


def one_per_family() -> list[str]:
    seen, names = set(), []
    for row in ROWS:
        if row.family not in seen:
            seen.add(row.family)
            names.append(row.name)
    return names


def test_scan_knows_whether_keras_has_imagenet_weights_cached(offline, monkeypatch, tmp_path):
    """`auto` resolves to imagenet exactly when Keras's cache holds the model's file: each
    family's file pattern matches the name Keras itself asks for."""
    import urllib.error

    from keras.src.utils import file_utils

    asked = []

    def record(url, path, *args, **kwargs):
        asked.append(Path(path).name)
        raise urllib.error.URLError("offline")

    monkeypatch.setattr(file_utils, "urlretrieve", record)
    for name in one_per_family():
        spec = get_backbone(name)
        prefix = spec.weights_file()
        assert weights_identity("auto", prefix) == "auto:not-cached"
        with pytest.raises(Exception, match="offline|URL|fetch"), unweighted():
            build(spec.row.constructor, "imagenet", False, None)
        assert asked[-1].startswith(prefix), (name, asked[-1])
        (offline / "models").mkdir(exist_ok=True)
        (offline / "models" / asked[-1]).write_bytes(b"cached")
        assert weights_identity("auto", prefix) == "imagenet"
    weights = tmp_path / "w.weights.h5"
    weights.write_bytes(b"some weights")
    digest = hashlib.sha256(b"some weights").hexdigest()
    assert weights_identity(str(weights), "vgg16") == f"file:sha256:{digest}"


def test_unweighted_builds_leave_no_variables_for_keras_to_initialize_later():
    """The variables of a build without weights are forgotten: kept, Keras would draw them all
    at the next build (6 GB after deriving every row's facts)."""
    from keras.src.backend.common import global_state

    def pending() -> int:
        return len(global_state.get_global_attribute("uninitialized_variables") or [])

    before = pending()
    for _ in range(2):  # the second finds the list the first left behind
        with unweighted():
            build("MobileNetV3Small", None, False, 32)
        assert pending() == before
