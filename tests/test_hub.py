"""KerasHub backbones (DINOv2, DINOv3, ViT, CLIP, SigLIP), offline: tiny encoders built from
constructor arguments with random weights and saved as preset folders, loaded back by the real
`from_preset(folder)` path."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import dvc, dvc_repo, leaderboard, ran, sh

keras_hub = pytest.importorskip("keras_hub")

from pipeline.backbones.hub import tap_points_of, tapped  # noqa: E402
from pipeline.backbones.hub_rows import HUB_FAMILIES, HUB_ROWS  # noqa: E402
from pipeline.backbones.registry import get_backbone  # noqa: E402
from pipeline.features.extractor import build_extractor  # noqa: E402
from pipeline.project.errors import BackboneError  # noqa: E402

SIDE = 32  # 8x8 patches of 4 pixels
TINY = {"num_layers": 3, "hidden_dim": 16, "num_heads": 2, "patch_size": 4}
ENCODERS = {  # a row of each family -> its tiny encoder's constructor arguments
    "dinov2_reg_small": (
        "DINOV2Backbone",
        {
            "intermediate_dim": 32,
            "num_register_tokens": 4,
            "position_embedding_shape": (SIDE, SIDE, 3),
        },
    ),
    "dinov3_small": ("DINOV3Backbone", {"intermediate_dim": 32, "num_register_tokens": 4}),
    "vit_base_16": ("ViTBackbone", {"mlp_dim": 32}),
    "clip_base_16": ("CLIPVisionEncoder", {"intermediate_dim": 32}),
    "siglip_base_16": ("SigLIPVisionEncoder", {"intermediate_dim": 32}),
}


def save_tiny(name: str, folder: Path, seed: int = 0) -> Path:
    """The tiny encoder of row `name`'s family, random weights drawn from `seed`, saved with
    save_to_preset into `folder`."""
    import keras

    cls, arguments = ENCODERS[name]
    keras.utils.set_random_seed(seed)
    encoder = getattr(keras_hub.models, cls)(**TINY, **arguments, image_shape=(SIDE, SIDE, 3))
    encoder.save_to_preset(str(folder))
    return folder


@pytest.fixture(scope="module")
def presets(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("presets")
    return {name: save_tiny(name, root / name) for name in ENCODERS}


def test_rows_name_keras_hubs_own_presets_and_their_sizes():
    """Each row's Kaggle handle is the one KerasHub lists for that preset; where the preset is
    the image encoder alone, the parameters built from the row's arguments are the preset's
    (DINO's position embeddings are built for 224 px here, for 518 in the preset: within 2%)."""
    for row in HUB_ROWS:
        family = HUB_FAMILIES[row.family]
        two_towers = family.encoder is not None
        cls = family.cls.replace("VisionEncoder", "Backbone") if two_towers else family.cls
        preset = getattr(keras_hub.models, cls).presets[row.preset]
        assert preset["kaggle_handle"] == row.handle
        ours, theirs = get_backbone(row.name).facts.parameters[0], preset["metadata"]["params"]
        if two_towers:  # the image and the text encoder
            assert ours < theirs
        else:
            assert abs(ours - theirs) <= 0.02 * theirs, row.name


@pytest.mark.parametrize("name", ENCODERS)
def test_every_family_extracts_each_reduction_of_its_blocks(name, presets):
    """stem, three blocks and the final norm, each reduction: widths as `layerwise layers`
    reports them; avg is the mean of the patch tokens alone (registers left out), cls the
    class token, grid2 the patch grid's quarters."""
    spec = get_backbone(name)
    has_cls = HUB_FAMILIES[spec.row.family].class_token
    layers = {"stem": "none", "block1": "max", "block2": "avg", "block3": "grid2", "final": "avg"}
    if has_cls:
        layers.update(block2="cls_avg", final="cls")
    backbone = spec.record(str(presets[name]), SIDE, layers)
    assert backbone.identity.startswith("folder:sha256:")
    extractor, used = build_extractor(backbone)
    assert used == backbone.identity
    images = np.random.default_rng(0).integers(0, 256, (2, SIDE, SIDE, 3), dtype=np.uint8)
    got = dict(zip(layers, (np.asarray(o) for o in extractor(images))))

    import keras

    from pipeline.cli import layer_rows

    (trunk,) = [layer for layer in extractor.layers if isinstance(layer, keras.Model)]
    rows = {row[0]: row for row in layer_rows(spec.of_folder(str(presets[name])), trunk, SIDE)}
    prefix = backbone.hub.tokens.prefix
    assert rows["block1"][1] == f"{prefix + 64}x16"  # class token, registers, 8x8 patches
    assert got["stem"].shape == (2, int(rows["stem"][2]))  # none: every token
    assert got["block1"].shape == (2, int(rows["block1"][3])) == (2, 16)
    assert got["block3"].shape == (2, int(rows["block3"][4])) == (2, 64)

    x = images.astype("float32") * np.array(backbone.hub.scale) + np.array(backbone.hub.offset)
    tokens = dict(zip(tap_points_of(trunk), (np.asarray(t) for t in trunk(x))))
    patches = tokens["block2"][:, prefix:, :]
    mean = patches.mean(axis=1)
    if has_cls:
        cls = tokens["block2"][:, 0, :]
        np.testing.assert_allclose(got["block2"], np.concatenate([cls, mean], -1), atol=1e-5)
        np.testing.assert_allclose(got["final"], tokens["final"][:, 0, :], atol=1e-5)
    else:
        np.testing.assert_allclose(got["block2"], mean, atol=1e-5)
    np.testing.assert_allclose(got["block1"], tokens["block1"][:, prefix:, :].max(1), atol=1e-5)
    grid = tokens["block3"][:, prefix:, :].reshape(2, 8, 8, 16)
    np.testing.assert_allclose(got["block3"][:, :16], grid[:, :4, :4].mean((1, 2)), atol=1e-5)


def test_scan_refuses_sides_reductions_and_layers_it_cannot_give(presets):
    dinov2 = get_backbone("dinov2_reg_small")
    with pytest.raises(
        BackboneError, match="34 is not a multiple of .* patch size 4: use 32 or 36"
    ):
        dinov2.record(str(presets["dinov2_reg_small"]), 34, "auto")
    with pytest.raises(BackboneError, match="takes 224x224 inputs only"):
        get_backbone("clip_base_16").record("random", 96, "auto")
    with pytest.raises(BackboneError, match="'cls' needs a class token"):
        get_backbone("siglip_base_16").record(
            str(presets["siglip_base_16"]), SIDE, {"block1": "cls"}
        )
    with pytest.raises(BackboneError, match="unknown layer 'blok2'.*did you mean block2"):
        dinov2.record(str(presets["dinov2_reg_small"]), SIDE, {"blok2": "avg"})
    with pytest.raises(BackboneError, match="is for keras.applications backbones"):
        dinov2.record("imagenet", 224, "auto")
    with pytest.raises(BackboneError, match="holds a CLIPVisionEncoder; dinov2_reg_small needs"):
        dinov2.record(str(presets["clip_base_16"]), SIDE, "auto")
    with pytest.raises(BackboneError, match="is a KerasHub preset, and vgg16 is a keras.appl"):
        get_backbone("vgg16").record(str(presets["clip_base_16"]), SIDE, "auto")


def test_a_named_preset_offline_is_one_line_saying_what_to_do(tmp_path):
    """The real download path: KerasHub asks Kaggle for the handle, which cannot answer."""
    code = (
        "from pipeline.backbones.registry import get_backbone\n"
        "from pipeline.backbones.adapters import load_backbone\n"
        "from pipeline.project.errors import BackboneError\n"
        "r = get_backbone('dinov2_small').record('preset', 28, 'auto')\n"
        "try:\n    load_backbone(r, list(r.layers))\n"
        "except BackboneError as e:\n    print('ERROR', e)\n"
    )
    env = {
        **os.environ,
        "HTTPS_PROXY": "http://127.0.0.1:9",
        "HTTP_PROXY": "http://127.0.0.1:9",
        "KAGGLEHUB_CACHE": str(tmp_path / "kagglehub"),
        "TF_CPP_MIN_LOG_LEVEL": "2",
    }
    out = subprocess.run(
        [sys.executable, "-c", code],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
    ).stdout
    (line,) = [line for line in out.splitlines() if line.startswith("ERROR")]
    assert (
        "could not download the KerasHub preset kaggle://keras/dinov2/keras/dinov2_small/1" in line
    )
    assert "set backbone.weights: DIR" in line


def test_a_preset_folder_through_dvc_repro_re_extracts_when_changed_and_fine_tunes(tmp_path):
    """dvc repro on a tiny DINOv2 with registers (auto: a block and the final norm, class token
    and patch mean): a leaderboard; the same folder again reruns nothing, other weights in it
    re-extract; fine-tuning trains the top block."""
    folder = save_tiny("dinov2_reg_small", tmp_path / "dino")
    params = {
        "data": {"image_size": SIDE, "limit": 60},
        "backbone": {"name": "dinov2_reg_small", "weights": str(folder)},
        "extract": {"batch_size": 16},
        "train": {"heads": ["logreg"]},
    }
    root = dvc_repo(tmp_path / "repo", params, {"extract.layers": "auto", "train.layers": None})
    output = dvc(root, "repro")
    assert {"extract", "train@logreg", "select", "evaluate"} <= ran(output)
    assert {r["layer"] for r in leaderboard(root)} == {"block1", "final"}
    record = json.loads((root / "data" / "scan" / "backbone.json").read_text())
    assert record["layers"] == {"block1": "cls_avg", "final": "cls_avg"}
    assert ran(dvc(root, "repro")) == {"scan"}
    card = json.loads((root / "models" / "export" / "card.json").read_text())
    assert card["needs"] == ["keras_hub"] and card["layer"] in ("block1", "final")
    code = (  # the exported classifier after the one import its card names
        "import sys, numpy as np, keras, keras_hub\n"
        "m = keras.saving.load_model('models/export/classifier.keras')\n"
        "x = np.random.default_rng(0).integers(0, 256, (2, 40, 50, 3)).astype('uint8')\n"
        "imported = any(k.split('.')[0] == 'pipeline' for k in sys.modules)\n"
        "print(np.asarray(m.predict(x, verbose=0)).shape, imported)\n"
    )
    loaded = subprocess.run(
        [sys.executable, "-c", code], cwd=root, capture_output=True, text=True, check=True
    )
    assert loaded.stdout.split("\n")[-2] == "(2, 10) False"
    save_tiny("dinov2_reg_small", folder, seed=1)
    output = dvc(root, "repro")
    assert "extract" in ran(output) and "prepare" not in ran(output)
    sh(root, "git", "add", "-A")
    sh(root, "git", "commit", "-qm", "reproduced")

    output = dvc(root, "exp", "run", "-S", "finetune.enabled=true", "-S", "finetune.epochs=1")
    assert "finetune" in ran(output) and "extract" not in ran(output)
    report = json.loads((root / "metrics" / "finetune.json").read_text())
    layer = json.loads((root / "models" / "best.json").read_text())["layer"]
    expected = {"block1": ("block1", 1), "final": ("block3", 2)}[layer]  # of 3 blocks: the top
    assert (report["unfreeze"], report["trainable_backbone_layers"]) == expected
    assert json.loads((root / "metrics" / "test.json").read_text())["finetuned"]["test_accuracy"]


def test_fine_tuning_unfreezes_the_top_quarter_of_blocks_with_decayed_rates(presets):
    """The head on `final` (class token and patch mean), converted from logistic regression:
    before training the assembly gives extract's features; one epoch moves block3 and the final
    norm only, block3 at `layer_decay` times the top's rate."""
    import keras
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import Pipeline
    from sklearn.preprocessing import StandardScaler

    from pipeline.backbones.adapters import load_backbone
    from pipeline.finetuning.assembly import assemble
    from pipeline.finetuning.conversion import FinetuneError, linear_head, linear_head_weights
    from pipeline.finetuning.recipe import image_batches, layer_rates

    record = get_backbone("dinov2_reg_small").record(
        str(presets["dinov2_reg_small"]), SIDE, {"final": "cls_avg"}
    )
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (32, SIDE, SIDE, 3), dtype=np.uint8)
    labels = np.arange(32) % 2
    extractor, _ = build_extractor(record)
    features = np.asarray(extractor(images))
    clf = Pipeline([("scaler", StandardScaler()), ("classifier", LogisticRegression())])
    head = linear_head(*linear_head_weights(clf.fit(features, labels), 2))
    backbone, _ = load_backbone(record, ["final"])
    assembly = assemble(backbone, record, "final", "cls_avg", head, None, augment=False)
    assert (assembly.unfreeze, assembly.trainable_layers) == ("block3", ["block3", "final"])
    reduced, _ = assembly.probe(images)
    np.testing.assert_allclose(np.asarray(reduced), features, rtol=1e-4, atol=1e-4)

    rates = layer_rates(assembly, 0.3)
    parts = assembly.parts()
    assert {rates[v.path] for v in parts["block3"][0].trainable_weights} == {0.3}
    assert {rates[v.path] for v in parts["final"][0].trainable_weights} == {1.0}
    before = {name: [w.numpy().copy() for p in ps for w in p.weights] for name, ps in parts.items()}
    assembly.model.compile(keras.optimizers.Adam(1e-2), "sparse_categorical_crossentropy")
    assembly.model.fit(image_batches(images, labels, 16, shuffle=True), epochs=1, verbose=0)
    moved = {
        name: any(
            not np.array_equal(a, w.numpy())
            for a, w in zip(before[name], (w for p in ps for w in p.weights))
        )
        for name, ps in parts.items()
    }
    assert moved == {"stem": False, "block1": False, "block2": False, "block3": True, "final": True}

    with pytest.raises(
        FinetuneError, match="unknown block 'block9'.*stem, block1, block2, block3, final"
    ):
        assemble(backbone, record, "final", "cls_avg", head, "block9", augment=False)


def test_a_folder_changed_after_scan_loads_under_its_new_identity(tmp_path):
    """extract compares the identity the adapter reports with scan's and refuses a difference."""
    from pipeline.backbones.adapters import load_backbone

    folder = save_tiny("dinov2_reg_small", tmp_path / "dino")
    record = get_backbone("dinov2_reg_small").record(str(folder), SIDE, "auto")
    assert load_backbone(record, list(record.layers))[1] == record.identity
    save_tiny("dinov2_reg_small", folder, seed=1)
    used = load_backbone(record, list(record.layers))[1]
    assert used.startswith("folder:sha256:") and used != record.identity


def copied_kaggle_cache(root: Path, handle: str, scale: list[float], offset: list[float]):
    """A KerasHub preset placed where kagglehub caches `handle` (as a copy of a machine's
    ~/.cache/kagglehub would be), with each file marked complete as a download marks it: a tiny
    DINOv2 and an image converter of `scale` and `offset`. Returns its folder."""
    from kagglehub.cache import _get_completion_marker_filepath, get_cached_path
    from kagglehub.handle import parse_model_handle

    parsed = parse_model_handle(handle.removeprefix("kaggle://"))
    folder = Path(get_cached_path(parsed))
    save_tiny("dinov2_reg_small", folder)
    converter = keras_hub.layers.ImageConverter(image_size=(SIDE, SIDE), scale=scale, offset=offset)
    converter.save_to_preset(str(folder))
    for file in folder.iterdir():
        marker = Path(_get_completion_marker_filepath(parsed, file.name))
        marker.parent.mkdir(parents=True, exist_ok=True)
        marker.touch()
    return folder


def test_a_named_preset_is_checked_against_its_own_image_converter(tmp_path, monkeypatch):
    """The real from_preset(handle) path, from a copied kagglehub cache with no network: the
    preset's converter equal to the family's normalization loads under the handle's identity;
    another one is a line saying how to use it as a folder (whose converter scan records)."""
    from pipeline.backbones.adapters import load_backbone

    monkeypatch.setenv("KAGGLEHUB_CACHE", str(tmp_path / "kagglehub"))
    monkeypatch.setenv("HTTPS_PROXY", "http://127.0.0.1:9")
    record = get_backbone("dinov2_small").record("preset", 28, {"block1": "avg", "final": "cls"})
    handle = record.hub.preset
    copied_kaggle_cache(tmp_path, handle, record.hub.scale, record.hub.offset)
    model, used = load_backbone(record, list(record.layers))
    assert used == record.identity == f"preset:{handle}"
    assert list(tap_points_of(model))[:2] == ["stem", "block1"]

    folder = copied_kaggle_cache(tmp_path, handle, [1 / 127.5] * 3, [-1.0] * 3)
    with pytest.raises(BackboneError, match=r"normalizes images by scale \[0.007843.*set backbone"):
        load_backbone(record, list(record.layers))
    record = get_backbone("dinov2_small").record(str(folder), 28, {"block1": "avg"})
    assert (record.hub.scale, record.hub.offset) == ([1 / 127.5] * 3, [-1.0] * 3)
    assert load_backbone(record, ["block1"])[1] == record.identity


@pytest.mark.parametrize("name", ["clip_base_16", "siglip_base_16"])
def test_a_two_tower_preset_folder_gives_its_image_encoder(name, tmp_path):
    """A CLIP or SigLIP preset holds both towers: scan reads the vision encoder's arguments out
    of the pair's config, extract loads the pair and taps its vision encoder alone."""
    import keras

    cls, arguments = ENCODERS[name]
    keras.utils.set_random_seed(0)
    vision = getattr(keras_hub.models, cls)(**TINY, **arguments, image_shape=(SIDE, SIDE, 3))
    text = getattr(keras_hub.models, cls.replace("Vision", "Text"))(
        vocabulary_size=50,
        embedding_dim=8,
        hidden_dim=8,
        num_layers=1,
        num_heads=2,
        intermediate_dim=16,
    )
    pair = cls.replace("VisionEncoder", "Backbone")
    extra = {"projection_dim": 8} if pair == "CLIPBackbone" else {}
    getattr(keras_hub.models, pair)(vision, text, **extra).save_to_preset(str(tmp_path / "pair"))

    layers = {"block1": "avg", "block3": "cls_avg", "final": "cls"}
    if name.startswith("siglip"):
        layers = {"block1": "avg", "block3": "avg", "pooled": "none"}
    record = get_backbone(name).record(str(tmp_path / "pair"), SIDE, layers)
    assert record.hub.arguments["num_layers"] == 3 and record.hub.arguments["hidden_dim"] == 16
    extractor, used = build_extractor(record)
    assert used == record.identity
    images = np.random.default_rng(0).integers(0, 256, (2, SIDE, SIDE, 3), dtype=np.uint8)
    x = images.astype("float32") * np.array(record.hub.scale) + np.array(record.hub.offset)
    tower = tapped(vision)  # the saved tower's own weights
    tokens = dict(zip(tap_points_of(tower), (np.asarray(t) for t in tower(x))))
    got = dict(zip(layers, (np.asarray(o) for o in extractor(images))))
    prefix = record.hub.tokens.prefix
    for layer, reduction in layers.items():
        t = tokens[layer]
        patches = t[:, prefix:].mean(1)
        want = {
            "avg": patches,
            "cls": t[:, 0],
            "cls_avg": np.concatenate([t[:, 0], patches], -1),
            "none": t.reshape(2, -1),
        }[reduction]
        np.testing.assert_allclose(got[layer], want, atol=1e-5, err_msg=layer)
