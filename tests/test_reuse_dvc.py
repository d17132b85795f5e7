"""Trustworthy reuse through real DVC: a reused artefact is exactly what the current params,
inputs and code would produce, and no param can make DVC delete anything outside the repo.

Each test has its own small git + DVC repository (32 px digits or a tiny image folder); those
that start from the same reproduced one get a copy of it.
"""

from __future__ import annotations

import csv
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import dvc, dvc_repo, ran, restored, sh

from pipeline.project.layout import NOT_LISTED

SMALL = {
    "data": {"image_size": 32, "limit": 60},
    "backbone": {"weights": "random"},
    "extract": {"batch_size": 8, "storage_dtype": "float32"},
    "train": {"layers": ["block5_pool"], "heads": ["logreg"]},
}
ONE_LAYER = {"extract.layers": {"block5_pool": "avg"}}


@pytest.fixture(scope="module")
def small_reproduced(tmp_path_factory) -> Path:
    """SMALL with ONE_LAYER after `dvc repro`, committed; copy it with `copy_of`."""
    root = dvc_repo(tmp_path_factory.mktemp("small") / "repo", SMALL, ONE_LAYER)
    dvc(root, "repro")
    sh(root, "git", "add", "-A")
    sh(root, "git", "commit", "-qm", "reproduced")
    return root


def copy_of(repo: Path, to: Path) -> Path:
    """A copy of `repo` (workspace, git, DVC cache and run-cache), without DVC's machine state."""
    shutil.copytree(repo, to, symlinks=True, ignore=shutil.ignore_patterns("tmp"))
    return to


def images_side(root: Path) -> int:
    return int(np.load(root / "data" / "prepared" / "train_images.npy", mmap_mode="r").shape[1])


def test_image_size_a_then_b_then_a_through_dvc_exp_run(tmp_path, small_reproduced):
    """DVC's run-cache ignores params named `size` (treeverse/dvc#10296): the param is
    `data.image_size`, so a new value recomputes and the old one restores its own arrays."""
    root = copy_of(small_reproduced, tmp_path / "repo")
    assert images_side(root) == 32

    output = dvc(root, "exp", "run", "-S", "data.image_size=40")
    assert {"prepare", "extract", "train@logreg"} <= ran(output)
    assert images_side(root) == 40
    fp = json.loads(sh(root, sys.executable, "-c", PRINT_FINGERPRINT))
    assert fp["image_size"] == 40

    output = dvc(root, "exp", "run", "-S", "data.image_size=32")
    assert {"prepare", "extract", "train@logreg"} <= restored(output)
    assert images_side(root) == 32
    fp = json.loads(sh(root, sys.executable, "-c", PRINT_FINGERPRINT))
    assert fp["image_size"] == 32


PRINT_FINGERPRINT = "import h5py; print(h5py.File('features/train.h5')['/'].attrs['fingerprint'])"


def test_a_param_that_would_escape_the_repo_fails_before_dvc_deletes_anything(tmp_path):
    """Layer names become output paths (models/heads/<head>/<layer>-<head>) and DVC removes
    outputs before a stage runs: the `scan` stage refuses the params first, in seconds, and
    nothing outside is touched."""
    root = dvc_repo(tmp_path / "repo", SMALL, ONE_LAYER)
    victim = tmp_path / "x-logreg"
    victim.mkdir()
    (victim / "precious.txt").write_text("keep me")
    t0 = time.monotonic()
    output = dvc(root, "exp", "run", "-S", "train.layers=[block5_pool,../../x]", check=False)
    assert time.monotonic() - t0 < 60
    assert "failed to reproduce 'scan'" in output
    assert "layer name '../../x' is not a Keras layer name" in output
    assert not ran(output) - {"scan"}
    assert (victim / "precious.txt").read_text() == "keep me"


def test_a_head_listed_or_dropped_trains_that_head_alone(tmp_path, small_reproduced):
    """The train@<head> stages are every head of the registry; each depends on scan's record
    of whether train.heads lists it, so listing one trains it and retrains no other, and
    dropping it again restores its note from the run-cache."""
    root = copy_of(small_reproduced, tmp_path / "repo")
    note = root / "models" / "heads" / "knn" / NOT_LISTED
    assert note.is_file() and (root / "metrics" / "train" / "knn" / NOT_LISTED).is_file()
    output = dvc(root, "exp", "run", "-S", "train.heads=[logreg,knn]")
    assert {s for s in ran(output) if s.startswith("train@")} == {"train@knn"}, output
    assert not note.exists()
    heads = {row["head"] for row in csv.DictReader((root / "reports/leaderboard.csv").open())}
    assert heads == {"logreg", "knn"}

    output = dvc(root, "exp", "run", "-S", "train.heads=[logreg]")
    assert "train@knn" in restored(output) and not ran(output) - {"scan", "select"}, output
    assert note.is_file()


def test_stages_run_alone_after_train_heads_changed_refuse_in_one_line(tmp_path, small_reproduced):
    """`dvc repro -s` skips scan, so train@knn's record still says knn is not listed: DVC
    skips the stage, a forced run refuses, select names what to run."""
    root = copy_of(small_reproduced, tmp_path / "repo")
    params = root / "params.yaml"
    params.write_text(params.read_text().replace("- logreg\n", "- logreg\n  - knn\n", 1))

    def refusal(*args: str) -> str:
        output = dvc(root, "repro", "-s", *args, check=False)
        assert "Traceback" not in output
        [line] = [x for x in output.splitlines() if x.startswith(f"{args[-1].split('@')[0]}: ")]
        return line

    line = refusal("-f", "train@knn")
    assert "train.heads lists knn since scan ran" in line and "dvc repro train@knn" in line
    line = refusal("select")
    assert "block5_pool-knn.json not found" in line and "dvc repro train@knn" in line, line
    assert "train@knn" in ran(dvc(root, "repro", "train@knn"))
    assert not (root / "models" / "heads" / "knn" / NOT_LISTED).exists()


def test_folder_source_changes_rerun_prepare(tmp_path, make_image_folder):
    """Adding, removing or editing an image re-runs prepare; nothing changed: nothing runs."""
    from conftest import write_image

    folder = make_image_folder(tmp_path / "photos", {"cat": 8, "dog": 8, "owl": 8})
    params = {**SMALL, "data": {"source": "folder", "path": str(folder), "image_size": 32}}
    root = dvc_repo(tmp_path / "repo", params, {"data.limit": None, **ONE_LAYER})
    assert "prepare" in ran(dvc(root, "repro", "prepare"))
    counts = json.loads((root / "data" / "prepared" / "meta.json").read_text())["counts"]
    assert "Stage 'prepare' didn't change, skipping" in dvc(root, "repro", "prepare")

    write_image(folder / "owl" / "owl_new.png")
    assert "prepare" in ran(dvc(root, "repro", "prepare"))
    grown = json.loads((root / "data" / "prepared" / "meta.json").read_text())["counts"]
    assert sum(grown.values()) == sum(counts.values()) + 1

    (folder / "cat" / "cat_000.png").unlink()
    assert "prepare" in ran(dvc(root, "repro", "prepare"))

    write_image(folder / "dog" / "dog_001.png", mode="L")  # same name, new content
    assert "prepare" in ran(dvc(root, "repro", "prepare"))
    assert "prepare" not in ran(dvc(root, "repro", "prepare"))


def test_a_module_imported_by_extract_reruns_it_when_changed(tmp_path, small_reproduced):
    """pipeline/data/decoding.py is imported by prepare, extract and finetune: a change there
    makes each of them out of date (the deps in dvc.yaml are derived, see test_provenance)."""
    root = copy_of(small_reproduced, tmp_path / "repo")
    assert "changed" not in dvc(root, "status", "extract")
    with (root / "pipeline" / "data" / "decoding.py").open("a") as f:
        f.write("\n# a change\n")
    status = dvc(root, "status")
    for stage in ("prepare:", "extract:", "finetune:"):
        assert stage in status, status


def install_metadata(root: Path, distribution: str, version: str) -> None:
    """Metadata of `distribution` at `version`, ahead of the installed one on the stages'
    sys.path (`python -m` puts the repository first): what an upgrade would report."""
    info = root / f"{distribution.replace('-', '_')}-{version}.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(
        f"Metadata-Version: 2.1\nName: {distribution}\nVersion: {version}\n"
    )


def test_a_new_library_version_reruns_exactly_the_stages_that_import_it(tmp_path, small_reproduced):
    """scan records the installed Keras, Pillow and scikit-learn. A new scikit-learn re-runs
    prepare (its splits) and the stages that fit or score heads, not the backbone: prepare
    gives the same arrays, so DVC keeps the features. A new Keras re-runs the backbone."""
    root = copy_of(small_reproduced, tmp_path / "repo")
    assert ran(dvc(root, "repro")) == {"scan"}
    install_metadata(root, "scikit-learn", "99.0")
    output = dvc(root, "repro")
    # select imports no scikit-learn: it re-runs only if a cell's metrics came out different
    assert {"prepare", "train@logreg", "evaluate"} <= ran(output)
    assert "extract" not in ran(output)
    assert json.loads((root / "data/scan/scikit-learn.json").read_text())["version"] == "99.0"
    assert ran(dvc(root, "repro")) == {"scan"}

    install_metadata(root, "keras", "99.0")
    dvc(root, "repro", "scan")
    status = dvc(root, "status", "extract")
    assert "extract:" in status and "data/scan/keras.json" in status, status


def _kill_during_extract(root: Path) -> None:
    """Run `python -m pipeline.extract` with one batch per chunk; SIGKILL it part-way."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(PIPELINE_CHUNK_BYTES="1", TF_CPP_MIN_LOG_LEVEL="2")
    proc = subprocess.Popen(
        [sys.executable, "-m", "pipeline.extract"],
        cwd=root,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 240
    try:
        while len(list(root.glob(".cache/extract/*/train/chunk_*.npz"))) < 2:
            assert proc.poll() is None, "extract ended before it was killed"
            assert time.monotonic() < deadline, "no chunk file appeared"
            time.sleep(0.005)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()


def test_resume_after_a_code_change_recomputes_every_row(tmp_path):
    """Killed part-way, then pipeline/features/extractor.py changed (avg doubled): the
    next `dvc repro` must not keep rows from the old code. The code digest is part of the
    fingerprint, so the old scratch is abandoned (and removed) and every row is new."""
    import h5py

    params = {**SMALL, "data": {"image_size": 32, "limit": 150}}
    root = dvc_repo(tmp_path / "repo", params, ONE_LAYER)
    dvc(root, "repro", "extract")
    with h5py.File(root / "features" / "train.h5") as f:
        before = f["features/block5_pool"][:]

    _kill_during_extract(root)
    old = list((root / ".cache" / "extract").glob("*/train"))
    assert len(old) == 1 and 2 <= len(list(old[0].glob("chunk_*.npz"))) < len(before) // 8

    layers = root / "pipeline" / "features" / "extractor.py"
    code = layers.read_text()
    doubled = code.replace("return ops.mean(x, axis=(1, 2))", "return 2 * ops.mean(x, axis=(1, 2))")
    assert doubled != code
    layers.write_text(doubled)
    output = dvc(root, "repro", "extract")
    assert "extract" in ran(output) and "removed abandoned scratch" in output
    assert not old[0].exists()
    with h5py.File(root / "features" / "train.h5") as f:
        after = f["features/block5_pool"][:]
    np.testing.assert_allclose(after, 2 * before, rtol=1e-6)  # every row, none from the old code
    assert not [p for p in (root / ".cache" / "extract").iterdir() if p.is_dir()]


def status_stages(root: Path) -> set[str]:
    """The stages `dvc status` lists as changed (scan always is: it runs every time)."""
    return set(re.findall(r"^(\S+):\s*$", dvc(root, "status"), re.M))


def test_a_new_registry_row_reruns_nothing_and_a_change_to_the_used_one_reruns_extract(tmp_path):
    """Only scan reads the backbone registry; the stages that build the backbone depend on
    scan's record of the one row the project uses (data/scan/backbone.json)."""
    root = dvc_repo(tmp_path / "repo", SMALL, {"train.layers": None})  # extract.layers: auto
    dvc(root, "repro")
    registry = root / "pipeline" / "backbones" / "registry.py"
    code = registry.read_text()
    grown = code.replace(
        '    Row("vgg19", "vgg", "vgg19", "VGG19"),\n',
        '    Row("vgg19", "vgg", "vgg19", "VGG19"),\n    Row("vgg19_again", "vgg", "vgg19", "VGG19"),\n',
    ).replace("min_side=71)", "min_side=72)")  # and a rule of a family the project does not use
    assert grown.count("vgg19_again") == 1 and "min_side=72" in grown
    registry.write_text(grown)
    assert status_stages(root) == {"scan"}
    assert ran(dvc(root, "repro")) == {"scan"}

    registry.write_text(
        grown.replace(
            'auto=("block2_pool", "block5_pool", "fc2")',
            'auto=("block3_pool", "block5_pool", "fc2")',
        )
    )
    output = dvc(root, "repro")
    assert {"extract", "train@logreg", "select", "evaluate"} <= ran(output)
    assert "prepare" not in ran(output)
    import h5py

    with h5py.File(root / "features" / "train.h5") as f:
        assert sorted(f["features"]) == ["block3_pool", "block5_pool"]
