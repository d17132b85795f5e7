"""Hostile and careless params (issue 21): no shell text from a head name, params read as DVC
reads them, absurd or mistyped numbers refused in one line before any work."""

from __future__ import annotations

import re
import typing

import pytest
import yaml
from conftest import REPO, SMALL_PARAMS, deep_merge, dvc, dvc_repo, ran, sh
from pydantic import BaseModel

from pipeline.inputs.params import Params
from pipeline.project.params import ConfigError, read_params, validate

# ---------------------------------------------------------------- case 5: a head name


@pytest.mark.parametrize("head", ["knn; touch pwned #", "../../tracked.txt"])
def test_a_head_name_is_never_a_stage_even_when_scan_is_skipped(tmp_path, head):
    """The train stages are the registry's heads, never a param: no head name reaches the
    shell, nor an output path DVC would remove before the command runs (a git-tracked file,
    with the old `matrix: ${train.heads}`)."""
    params = deep_merge(SMALL_PARAMS, {"train": {"heads": ["logreg", head], head: {}}})
    root = dvc_repo(tmp_path / "repo", params)
    for dep in ("features/train.h5", "data/scan/keras.json", "data/scan/scikit-learn.json"):
        (root / dep).parent.mkdir(parents=True, exist_ok=True)
        (root / dep).write_text("{}")  # present, so that DVC would run such a stage's command
    tracked = root / "tracked.txt"
    tracked.write_text("keep me")
    sh(root, "git", "add", "tracked.txt")
    sh(root, "git", "commit", "-qm", "tracked")
    output = dvc(root, "repro", "-s", f"train@{head}", check=False)
    assert not ran(output) and "Traceback" not in output, output
    assert not (root / "pwned").exists() and tracked.read_text() == "keep me", output
    assert "failed to reproduce 'scan'" in dvc(root, "repro", check=False)


# ---------------------------------------------------------------- case 16: one YAML


AMBIGUOUS = "a: 010\nb: 0o10\nc: yes\nd: on\ne: 1e3\nf: 1:20\ng: 08\nh: 1_000\n"


def test_params_are_read_as_dvc_reads_them(tmp_path):
    from dvc.utils.serialize import load_yaml

    path = tmp_path / "params.yaml"
    path.write_text(AMBIGUOUS)
    assert read_params(path) == load_yaml(str(path))


def test_no_module_of_the_package_reads_yaml_with_pyyaml():
    pyyaml = re.compile(r"^\s*(import yaml\b|from yaml\b)", re.M)
    users = [p for p in (REPO / "pipeline").rglob("*.py") if pyyaml.search(p.read_text())]
    assert not users, users


def test_a_leading_zero_means_what_dvc_says_it_means(tmp_path):
    """DVC reads `seed: 010` as 10: prepare did not change, and the stages after it agree
    (train@logreg also shows that a train stage finds its head without the command line)."""
    root = dvc_repo(tmp_path / "repo", deep_merge(SMALL_PARAMS, {"data": {"seed": 10}}))
    dvc(root, "repro", "prepare")
    text = (root / "params.yaml").read_text()
    assert text.count("  seed: 10\n") == 1
    (root / "params.yaml").write_text(text.replace("  seed: 10\n", "  seed: 010\n"))
    output = dvc(root, "repro", "train@logreg", check=False)
    assert "stale" not in output and ran(output) == {"scan", "extract", "train@logreg"}, output
    assert (root / "metrics" / "train" / "logreg").is_dir()


# ---------------------------------------------------------------- cases 15, 17: numbers


def _plain(kind):
    """`kind` without Annotated metadata or None."""
    if typing.get_origin(kind) is typing.Annotated:
        return typing.get_args(kind)[0]
    options = [a for a in typing.get_args(kind) if a is not type(None)]
    return options[0] if len(options) == 1 and typing.get_origin(kind) is not list else kind


def _numbers(model: type[BaseModel], prefix: str = "") -> dict[str, type]:
    """Every int and float param of `model`, at any depth (a list of ints by its item `.0`)."""
    found = {}
    for name, field in model.model_fields.items():
        key, kind = f"{prefix}{name}", _plain(field.annotation)
        if isinstance(kind, type) and issubclass(kind, BaseModel):
            found |= _numbers(kind, f"{key}.")
        elif typing.get_origin(kind) is list and _plain(typing.get_args(kind)[0]) is int:
            found[f"{key}.0"] = int
        elif kind in (int, float):
            found[key] = kind
    return found


def _raw(dotted: str, value) -> dict:
    """{'a': {'b': value}} for 'a.b'; a last part '0' puts `value` in a list."""
    parts = dotted.split(".")
    node, parts = ([value], parts[:-1]) if parts[-1] == "0" else (value, parts)
    for part in reversed(parts):
        node = {part: node}
    return node


NUMBERS = _numbers(Params)


def test_the_walk_finds_the_numbers():
    assert {"extract.batch_size", "data.seed", "train.dense.hidden.0"} <= set(NUMBERS)
    assert NUMBERS["finetune.learning_rate"] is float and len(NUMBERS) > 30
    assert _raw("train.dense.hidden.0", 1) == {"train": {"dense": {"hidden": [1]}}}


@pytest.mark.parametrize("key", sorted(NUMBERS))
def test_a_bool_is_no_number(key):
    with pytest.raises(ConfigError, match=re.escape(key)):
        validate(Params, _raw(key, True))


@pytest.mark.parametrize("key", sorted(k for k, kind in NUMBERS.items() if kind is int))
@pytest.mark.parametrize("value", [10**20, 1e20, 2.0])
def test_an_absurd_or_fractional_count_is_refused(key, value):
    with pytest.raises(ConfigError, match=re.escape(key)):
        validate(Params, _raw(key, value))


@pytest.mark.parametrize("value", ["1e20", "1.0e+18", "100000000000000000000", "true"])
def test_scan_refuses_an_absurd_batch_in_one_line(project, value):
    text = yaml.safe_dump(project.params, sort_keys=False)
    assert text.count("batch_size: 16\n") == 1
    (project.root / "params.yaml").write_text(
        text.replace("batch_size: 16\n", f"batch_size: {value}\n")
    )
    with pytest.raises(SystemExit) as info:
        project.main("scan")
    message = str(info.value.code)
    assert message.startswith("scan: ") and "extract.batch_size" in message
    assert "\n" not in message and not (project.root / "data" / "scan").exists()


# ---------------------------------------------------------------- case 13: init on a file


@pytest.mark.parametrize("below", ["", "sub"])
def test_init_into_a_file_is_one_line(tmp_path, below, make_image_folder):
    from pipeline import cli

    images = make_image_folder(tmp_path / "images")
    afile = tmp_path / "afile"
    afile.write_text("not a directory")
    target = afile / below if below else afile
    argv = ["init", str(target), "--images", str(images), "--image-size", "32"]
    with pytest.raises(SystemExit) as info:
        cli.main([*argv, "--weights", "random"])
    message = str(info.value.code)
    assert message.startswith("layerwise init: ") and "\n" not in message
    assert f"{afile} is a file" in message and afile.read_text() == "not a directory"
