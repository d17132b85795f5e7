"""params.yaml validation: bad params fail on load, naming the key, what is accepted, what was given."""

from __future__ import annotations

import pytest
import yaml
from conftest import SMALL_PARAMS, deep_merge
from pydantic import BaseModel, ValidationError

from pipeline.inputs.params import Params, check, load
from pipeline.project.params import ConfigError, Shared, load_params, validate
from pipeline.selection.params import TrainParams


def parse_params(raw: dict) -> Params:
    return check(raw)[0]


def test_repo_params_yaml_is_valid():
    from conftest import REPO

    params, backbone = load(REPO / "params.yaml")
    assert isinstance(params, Params)
    assert params.backbone.name == backbone.name == "vgg16"
    assert set(params.train.layers_of(backbone.layers)) <= set(backbone.layers)


def test_small_params_and_defaults():
    params, backbone = check(SMALL_PARAMS)
    assert params.data.image_size == 32 and params.extract.batch_size == 16
    assert backbone.layers == {"block2_pool": "avg", "block5_pool": "avg"}
    defaults, vgg16 = check({})  # every key has a default: VGG16's auto layers at 224
    assert defaults.extract.layers == "auto" and defaults.train.layers is None
    assert vgg16.layers == {"block2_pool": "avg", "block5_pool": "avg", "fc2": "none"}
    assert vgg16.top_layers == ["fc2"] and vgg16.identity in ("auto:not-cached", "imagenet")


def test_a_stage_reads_its_own_sections_and_scan_checks_the_whole_file():
    """prepare and extract read data, backbone and extract only; the whole file, unknown
    sections included, is scan's to refuse."""
    raw = deep_merge(SMALL_PARAMS, {"finetune": {"optimizer": "adam"}, "extra": {}})
    assert validate(Shared, raw).data.image_size == 32
    with pytest.raises(ConfigError) as info:
        parse_params(raw)
    assert "finetune.optimizer" in str(info.value) and "unknown key 'extra'" in str(info.value)
    with pytest.raises(ConfigError, match=r"train.heads.0: .*'logreg'"):
        validate(TrainParams, deep_merge(SMALL_PARAMS, {"train": {"heads": ["svm"]}}))


@pytest.mark.parametrize(
    "override, must_name",
    [
        # unknown keys, at the top, in a section and in a nested section
        ({"extrct": {}}, ["unknown key 'extrct'", "data", "backbone", "extract"]),
        ({"data": {"sise": 32}}, ["unknown key 'data.sise'", "size", "source"]),
        ({"train": {"logreg": {"c": 1.0}}}, ["unknown key 'train.logreg.c'", "C", "max_iter"]),
        # bad enums
        ({"data": {"source": "imagenet"}}, ["data.source", "digits", "folder", "'imagenet'"]),
        ({"data": {"on_bad_image": "ignore"}}, ["data.on_bad_image", "skip", "fail", "'ignore'"]),
        ({"extract": {"storage_dtype": "int8"}}, ["extract.storage_dtype", "float16", "'int8'"]),
        ({"extract": {"precision": "bf16"}}, ["extract.precision", "mixed_bfloat16", "'bf16'"]),
        # numbers out of range
        (
            {"extract": {"batch_size": -4}},
            ["extract.batch_size", "greater than or equal to 1", "-4"],
        ),
        ({"extract": {"batch_size": 0}}, ["extract.batch_size", "0"]),
        ({"data": {"image_size": 4}}, ["data.image_size", "8", "4"]),
        ({"data": {"image_size": -5}}, ["data.image_size", "-5"]),
        ({"data": {"image_size": 32.5}}, ["data.image_size", "integer", "32.5"]),
        ({"data": {"size": 64}}, ["data.size is now called data.image_size"]),
        # names that become output paths: one plain path component, no traversal
        (
            {"train": {"layers": ["block5_pool", "../../../x"]}},
            ["train.layers", "'../../../x'", "no '/'"],
        ),
        ({"extract": {"layers": {"a/b": "avg"}}}, ["extract.layers", "'a/b'"]),
        ({"extract": {"layers": {"..": "avg"}}}, ["extract.layers", "'..'"]),
        # empty or repeated lists; train.layers must have been extracted
        ({"train": {"layers": []}}, ["train.layers is empty"]),
        ({"train": {"heads": []}}, ["train.heads is empty"]),
        ({"train": {"heads": ["logreg", "knn", "logreg"]}}, ["train.heads lists logreg more"]),
        # cross-validation: 0 (never) or at least 2 folds
        (
            {"train": {"cv": {"folds": 1}}},
            ["train.cv.folds", "0 (never", "at least 2", "dvc repro", "(got 1)"],
        ),
        ({"train": {"cv": {"folds": -2}}}, ["train.cv.folds", "-2"]),
        ({"train": {"cv": {"when_val_under": -1}}}, ["train.cv.when_val_under", "-1"]),
        ({"train": {"cv": {"k": 5}}}, ["unknown key 'train.cv.k'", "folds", "when_val_under"]),
        ({"finetune": {"optimizer": "adam"}}, ["finetune.optimizer", "adamw", "sgd"]),
        ({"finetune": {"layer_decay": 1.5}}, ["finetune.layer_decay", "1.5"]),
        ({"finetune": {"head_epochs": -1}}, ["finetune.head_epochs", "-1"]),
        (
            {"train": {"layers": ["block5_pool", "block5_pool"]}},
            ["train.layers lists block5_pool more than once"],
        ),
        (
            {"train": {"layers": ["block4_pool"]}},
            ["train.layers ['block4_pool'] are not extracted", "block2_pool, block5_pool"],
        ),
        # layer names are checked against the backbone's table, with the closest names
        (
            {"extract": {"layers": {"block5_pol": "avg"}}},
            [
                "unknown layer 'block5_pol' for vgg16",
                "did you mean block5_pool",
                "layerwise layers",
            ],
        ),
        (
            {
                "backbone": {"name": "resnet50"},
                "extract": {"layers": "auto"},
                "train": {"layers": ["conv5_block3_ou"]},
            },
            ["train.layers", "conv3_block4_out", "did you mean conv5_block3_out"],
        ),
        (
            {"extract": {"layers": {"fc2": "none"}}},
            ["'fc2' belongs to vgg16's classification top", "224x224", "image_size is 32"],
        ),
        (
            {"data": {"image_size": 224}, "extract": {"layers": {"fc2": "avg"}}},
            ["extract.layers.fc2: reduction 'avg' needs a spatial", "fc2 is 4096", "use none"],
        ),
        ({"data": {"image_size": 16}}, ["at least 32x32", "image_size is 16"]),
        ({"data": {"val_fraction": 1.5}}, ["data.val_fraction", "1.5"]),
        # unknown backbone: the accepted ones are listed
        (
            {"backbone": {"name": "vgg17"}},
            [
                "backbone.name",
                "unknown backbone 'vgg17'; did you mean vgg19, vgg16",
                "layerwise backbones",
            ],
        ),
        # bad reduction: the layer and the accepted reductions are named
        (
            {"extract": {"layers": {"block5_pool": "sum"}}},
            [
                "extract.layers",
                "'block5_pool'",
                "none, avg, max, cls, cls_avg, grid1..grid9",
                "'sum'",
            ],
        ),
        ({"extract": {"layers": {"block5_pool": "grid0"}}}, ["extract.layers", "'grid0'"]),
        # weights: neither a keyword nor an existing file
        (
            {"backbone": {"weights": "no/such/file.weights.h5"}},
            [
                "backbone.weights",
                "'auto', 'imagenet', 'preset', 'random'",
                "no/such/file.weights.h5",
            ],
        ),
        # val + test fractions must leave something to train on
        (
            {"data": {"val_fraction": 0.5, "test_fraction": 0.5}},
            ["data", "val_fraction + test_fraction must be < 1", "0.5 + 0.5"],
        ),
        (
            {"data": {"val_fraction": 0.6, "test_fraction": 0.45}},
            ["val_fraction + test_fraction must be < 1"],
        ),
        ({"data": {"source": "folder", "path": None}}, ["data", "data.path"]),
    ],
)
def test_bad_params_rejected_naming_the_key(override, must_name):
    raw = deep_merge(SMALL_PARAMS, override)
    with pytest.raises(ConfigError) as info:
        parse_params(raw)
    message = str(info.value)
    for text in must_name:
        assert text in message, f"{text!r} not in: {message}"


def test_empty_layers_rejected():
    raw = deep_merge(SMALL_PARAMS, {})
    raw["extract"]["layers"] = {}
    with pytest.raises(ConfigError, match="extract.layers: at least one layer"):
        parse_params(raw)


def test_every_bad_key_is_reported_at_once():
    raw = deep_merge(SMALL_PARAMS, {"data": {"image_size": 2}, "extract": {"batch_size": 0}})
    with pytest.raises(ConfigError) as info:
        parse_params(raw)
    assert "data.image_size" in str(info.value) and "extract.batch_size" in str(info.value)


def test_weights_file_that_exists_is_accepted(tmp_path, monkeypatch):
    (tmp_path / "w.weights.h5").write_bytes(b"x")
    monkeypatch.chdir(tmp_path)  # relative paths are relative to the project dir
    params = parse_params(deep_merge(SMALL_PARAMS, {"backbone": {"weights": "w.weights.h5"}}))
    assert params.backbone.weights == "w.weights.h5"


def test_params_are_frozen():
    params = parse_params(SMALL_PARAMS)
    with pytest.raises(ValidationError, match="frozen"):
        params.data.image_size = 64


def test_load_params_file_errors(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_params(Shared, tmp_path / "params.yaml")
    bad = tmp_path / "params.yaml"
    bad.write_text("- just\n- a list\n")
    with pytest.raises(ConfigError, match="must be a mapping"):
        load(bad)
    bad.write_text(yaml.safe_dump({"extract": {"batch_size": -1}}))
    with pytest.raises(ConfigError, match="extract.batch_size"):
        load_params(Shared, bad)


def _param_names(model) -> list[str]:
    """Every key of the params schema, at any depth."""
    names = []
    for name, field in model.model_fields.items():
        names.append(name)
        if isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel):
            names.extend(_param_names(field.annotation))
    return names


def _yaml_keys(node) -> list[str]:
    if isinstance(node, dict):
        return [str(k) for k in node] + [k for v in node.values() for k in _yaml_keys(v)]
    if isinstance(node, list):
        return [k for v in node for k in _yaml_keys(v)]
    return []


def test_no_param_is_named_size_or_nfiles():
    """DVC's run-cache key leaves out every param named size or nfiles (treeverse/dvc#10296):
    such a param would change nothing and stale outputs would be restored."""
    from conftest import REPO

    blind = {"size", "nfiles"}
    assert "image_size" in _param_names(Params)  # the walk reaches nested sections
    assert not blind & set(_param_names(Params))
    keys = _yaml_keys(yaml.safe_load((REPO / "params.yaml").read_text()))
    assert "image_size" in keys and not blind & set(keys)
