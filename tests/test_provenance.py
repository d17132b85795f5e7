"""Provenance and crash safety: complete dvc.yaml deps, stale or damaged artefacts refused,
and an extraction that survives kills, concurrent runs, abandoned scratch and a full disk."""

from __future__ import annotations

import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
import yaml
from conftest import REPO

from pipeline.data.arrays import NpyRows
from pipeline.data.decoding import DataError
from pipeline.data.ingest import prepare
from pipeline.data.prepared import load_split
from pipeline.features import job, store
from pipeline.features.store import FeatureStoreError, open_splits
from pipeline.project import deps, provenance
from pipeline.project.layout import Layout
from pipeline.project.params import load_params
from pipeline.project.records import PreparedRecord, RecordError

# ---------------------------------------------------------------- dvc.yaml deps


def test_dvc_yaml_lists_every_module_and_library_each_stage_imports():
    """A stage's deps name exactly the modules its command imports, transitively (lazy imports
    inside functions too, and the packages' __init__.py), and scan's version records of the
    libraries that code imports, so a code change or a new library version re-runs every stage
    that runs that code (`python -m pipeline.project.deps` writes them)."""
    stages = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    records = {str(Layout().library_record(d)) for d in provenance.LIBRARIES.values()}
    assert records <= set(stages["scan"]["outs"])
    for name, stage in stages.items():
        assert stage["deps"] == deps.derived_deps(name, stage), name
        module = deps.stage_module(stage["cmd"])
        listed = {d for d in stage["deps"] if d.startswith("pipeline/")}
        assert f"pipeline/{module}.py" in listed and "pipeline/__init__.py" in listed
        if name != "scan":  # it writes them
            wanted = {str(Layout().library_record(d)) for d in provenance.stage_libraries(module)}
            assert records & set(stage["deps"]) == wanted, name
    result = subprocess.run(
        [sys.executable, "-m", "pipeline.project.deps", "--check"],
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr


def test_the_import_closure_follows_lazy_imports_and_packages():
    # finetuning.conversion imports selection.cells inside a function only
    finetune = provenance.stage_modules("finetune")
    assert {"pipeline/selection/cells.py", "pipeline/finetuning/__init__.py"} <= set(finetune)
    assert "pipeline/heads/fit.py" not in provenance.stage_modules("extract")
    assert provenance.code_digest("extract") != provenance.code_digest("train")


def test_only_scan_reads_the_backbone_registry():
    """A new registry row or family rule changes no code digest of a stage after scan: the
    stages that build a backbone read scan's record of it, the others the features'
    fingerprint."""
    stages = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    for name, stage in stages.items():
        module = deps.stage_module(stage["cmd"])
        reads = {"pipeline/backbones/registry.py", "pipeline/backbones/facts.py"}
        assert bool(reads & set(provenance.stage_modules(module))) == (name == "scan"), name
        builds = "pipeline/backbones/keras_apps.py" in provenance.stage_modules(module)
        assert builds == (name in ("scan", "extract", "finetune", "export")), name
        built = ("extract", "finetune", "export")
        assert ("data/scan/backbone.json" in stage["deps"]) == (name in built), name


def test_a_new_scikit_learn_never_reruns_the_backbone():
    """scikit-learn splits the data (prepare) and fits the heads; the extract stage's code
    does not import it, so its version is not among extract's deps."""
    assert provenance.stage_libraries("extract") == ("keras", "pillow")
    assert provenance.stage_libraries("prepare") == ("keras", "pillow", "scikit-learn")
    assert provenance.stage_libraries("train") == ("keras", "scikit-learn")


# ---------------------------------------------------------------- prepared data


def test_a_killed_prepare_leaves_no_prepared_folder(project, monkeypatch):
    from pipeline.data import arrays

    real, calls = arrays.NpyWriter.append, []

    def dying(self, row):
        calls.append(1)
        if len(calls) == 20:
            raise KeyboardInterrupt("killed")
        real(self, row)

    monkeypatch.setattr(arrays.NpyWriter, "append", dying)
    with pytest.raises(KeyboardInterrupt):
        prepare(load_params().data, project.layout)
    assert not project.prepared.exists() and not list(project.root.rglob("*.partial"))


def test_truncated_or_miscounted_prepared_files_are_refused(project):
    project.main("scan")
    project.main("prepare")
    record = PreparedRecord.read(project.prepared / "meta.json", "-")
    images = project.prepared / "val_images.npy"
    images.write_bytes(images.read_bytes()[:-100])
    with pytest.raises(
        DataError, match="val_images.npy holds .* bytes.*truncated.*dvc repro prepare"
    ):
        NpyRows(images)
    labels = project.prepared / "test_labels.npy"
    np.save(labels, np.load(labels)[:-1])
    with pytest.raises(DataError, match="test split has 12 images and 11 labels"):
        load_split("test", record, layout=project.layout)


def test_prepared_data_of_other_params_or_changed_bytes_is_refused(project):
    for stage in ("scan", "prepare"):
        project.main(stage)
    project.write_params(data={"seed": 1})
    project.main("scan")
    result = project.run("extract", check=False)
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert "data/prepared is stale: it was made with data.seed=0" in result.stderr
    assert "dvc repro prepare" in result.stderr

    project.write_params()
    project.main("scan")
    images = project.prepared / "val_images.npy"
    raw = bytearray(images.read_bytes())
    raw[-50:] = bytes(50)  # same length, other pixels
    images.write_bytes(bytes(raw))
    result = project.run("extract", check=False)
    assert result.returncode != 0 and "val_images.npy does not match the sha256" in result.stderr
    assert not project.features.exists()


# ---------------------------------------------------------------- features


@pytest.fixture
def extracted(project):
    for stage in ("scan", "prepare", "extract"):
        project.main(stage)
    return project


def test_features_copied_back_from_other_params_are_refused_by_every_reader(extracted):
    """Features of another reduction, copied over the current ones, are refused by train,
    select and evaluate, naming the param."""
    project = extracted
    project.run("train", args=["--head", "logreg"])
    for stage in ("select", "finetune", "evaluate"):
        project.run(stage)
    saved = project.root / "avg-features"
    shutil.copytree(project.features, saved)
    project.write_params(replace={"extract.layers": {"block2_pool": "avg", "block5_pool": "max"}})
    project.main("scan")
    project.main("extract")
    shutil.rmtree(project.features)
    shutil.copytree(saved, project.features)
    for stage in ("train", "select", "evaluate"):
        args = ["--head", "logreg"] if stage == "train" else []
        result = subprocess.run(
            [sys.executable, "-m", f"pipeline.{stage}", *args],
            cwd=project.root,
            env={**os.environ, "PYTHONPATH": str(REPO)},
            capture_output=True,
            text=True,
            check=False,
        )
        assert result.returncode != 0, stage
        assert "extract.layers.block5_pool='avg'" in result.stderr and "'max'" in result.stderr
        assert "Traceback" not in result.stderr


def test_bytes_changed_inside_a_dataset_fail_its_checksum(extracted):
    path = extracted.features / "train.h5"
    with h5py.File(path) as f:
        ds = f["features/block5_pool"]
        offset, n_bytes = ds.id.get_offset(), ds.id.get_storage_size()
        if offset is None:  # chunked: the first chunk's place in the file
            info = ds.id.get_chunk_info(0)
            offset, n_bytes = info.byte_offset, info.size
    raw = bytearray(path.read_bytes())
    start = offset + n_bytes // 2 - 200
    raw[start : start + 400] = os.urandom(400)
    path.write_bytes(bytes(raw))
    ff = open_splits(extracted.layout)["train"]  # attrs and labels still read
    with pytest.raises(FeatureStoreError, match="train.h5 is corrupt.*checksum"):
        ff.read("block5_pool")
    ff.read("block2_pool")  # the other dataset is intact


# ---------------------------------------------------------------- extraction: resume, locks


class Reader:
    """Prepared images that can die at a row (like a kill) and count the rows read."""

    def __init__(self, images, crash_at=None):
        self.images, self.crash_at, self.rows = images, crash_at, 0
        self.path, self.shape, self.dtype = images.path, images.shape, images.dtype

    def __len__(self):
        return len(self.images)

    def __getitem__(self, key):
        if self.crash_at is not None and key.stop > self.crash_at:
            raise KeyboardInterrupt("killed")
        part = self.images[key]
        self.rows += len(part)
        return part


def _extract(project, monkeypatch, crash_split=None, crash_at=1):
    """Run the extract stage's library call in-process; wrap each split's images in a Reader."""
    from pipeline.features.extractor import build_extractor
    from pipeline.features.job import extract_all, versions
    from pipeline.project.provenance import current_prepared, expected_features, scanned_backbone
    from pipeline.project.records import Fingerprint

    params = load_params()
    prepared = current_prepared(params)
    model, used = build_extractor(scanned_backbone(params))
    fp = Fingerprint(
        **expected_features(params, prepared),
        weights_used=used,
        precision="float32",
        image_size=32,
        versions=versions(),
    )
    readers = {}

    def reading(split, record=None, workers=1, layout=Layout()):
        images, labels = load_split(split, record, workers, layout)
        readers[split] = Reader(images, crash_at if split == crash_split else None)
        return readers[split], labels

    monkeypatch.setattr(job, "load_split", reading)
    extract_all(model, prepared, fp, 8, layout=project.layout)
    return readers, fp


def test_a_kill_during_the_test_split_keeps_train_and_val(project, monkeypatch, capsys):
    for stage in ("scan", "prepare"):
        project.main(stage)
    with pytest.raises(KeyboardInterrupt):
        _extract(project, monkeypatch, crash_split="test", crash_at=1)
    assert not project.features.exists()
    readers, fp = _extract(project, monkeypatch)
    assert set(readers) == {"test"}  # train and val were finished and kept
    assert "train: finished by an earlier run, kept" in capsys.readouterr().out
    assert {s: f.fingerprint for s, f in open_splits(project.layout).items()} == dict.fromkeys(
        ("train", "val", "test"), fp
    )
    assert not (project.scratch / fp.key).exists()


def test_abandoned_scratch_is_removed_unless_a_run_holds_it(project, monkeypatch):
    from filelock import FileLock

    for stage in ("scan", "prepare"):
        project.main(stage)
    for key in ("abandoned", "busy"):
        (project.scratch / key / "train").mkdir(parents=True)
        (project.scratch / key / "train" / "chunk_0000000000.npz").write_bytes(b"x")
    with FileLock(str(project.scratch / "busy.lock")):
        _, fp = _extract(project, monkeypatch)
        assert not (project.scratch / "abandoned").exists()
        assert (project.scratch / "busy").exists()  # another run holds it
        with FileLock(str(project.scratch / f"{fp.key}.lock")):
            with pytest.raises(FeatureStoreError, match="another extract of the same features"):
                _extract(project, monkeypatch)


def test_a_full_disk_is_a_clear_error_and_the_run_resumes(project, monkeypatch):
    for stage in ("scan", "prepare"):
        project.main(stage)
    real = shutil.disk_usage
    monkeypatch.setattr(store.shutil, "disk_usage", lambda p: real(p)._replace(free=1000))
    with pytest.raises(FeatureStoreError, match=r"disk full while writing .* free space and run"):
        _extract(project, monkeypatch)
    chunks = list(project.scratch.glob("*/train/chunk_*.npz"))
    assert chunks  # computed rows are kept
    monkeypatch.setattr(store.shutil, "disk_usage", real)
    readers, _ = _extract(project, monkeypatch)
    assert readers["train"].rows == 0  # resumed from the chunks: nothing recomputed


@pytest.fixture
def small_disk(tmp_path):
    """A 4 MB tmpfs (root can mount one here and in CI); skipped where mounting is refused."""
    mount = tmp_path / "disk"
    mount.mkdir()
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mount)], capture_output=True
    )
    if done.returncode:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode().strip()}")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=False)


def test_a_real_full_disk_while_writing_chunks(project, monkeypatch, small_disk):
    """ENOSPC from the kernel, not a simulation: a clear error; after freeing space the same
    run finishes from the chunks it had written."""
    project.write_params(
        data={"limit": 400},
        replace={"extract.layers": {"block5_pool": "none"}, "train.layers": ["block5_pool"]},
    )
    for stage in ("scan", "prepare"):
        project.main(stage)
    monkeypatch.setattr(store, "TARGET_CHUNK_BYTES", 1)  # one batch per chunk file
    filler = small_disk / "filler"
    filler.write_bytes(b"\0" * (3700 << 10))
    project.scratch.parent.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(project.scratch, ignore_errors=True)
    os.symlink(small_disk, project.scratch)
    with pytest.raises(FeatureStoreError, match="disk full while writing"):
        _extract(project, monkeypatch)
    done = len(list(small_disk.glob("*/train/chunk_*.npz")))
    assert 0 < done < 240 // 8  # the kernel said no while chunks were written
    filler.unlink()
    readers, _ = _extract(project, monkeypatch)
    assert readers["train"].rows == len(readers["train"]) - done * 8
    assert open_splits(project.layout)["train"].read("block5_pool").shape[1] == 512


def test_a_pickled_payload_never_runs(tmp_path):
    """A model.joblib replaced by a pickle that runs a command is refused before loading."""
    from synthetic import synthetic_fingerprint

    from pipeline.heads.saved import load_head
    from pipeline.project.records import HeadRecord, file_sha256

    directory = tmp_path / "a-logreg"
    directory.mkdir()
    (directory / "model.joblib").write_bytes(pickle.dumps({"weights": [1, 2]}))
    record = HeadRecord(
        cell="a-logreg",
        layer="a",
        head="logreg",
        kind="sklearn",
        model="model.joblib",
        model_sha256=file_sha256(directory / "model.joblib"),
        params={},
        features=synthetic_fingerprint(["a"]),
        reduction="avg",
        feature_width=4,
        class_names=["x"],
        fit_path="memory",
        fit_on="train",
        code="-",
    )
    assert load_head(directory, record) == {"weights": [1, 2]}
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    (directory / "model.joblib").write_bytes(pickle.dumps(Payload()))
    with pytest.raises(RecordError, match="is not the model its head.json records"):
        load_head(directory, record)
    assert not marker.exists()


def test_records_refuse_a_wrong_schema(tmp_path):
    (tmp_path / "meta.json").write_text('{"data": {}, "counts": "many"}')
    with pytest.raises(
        RecordError, match=r"meta.json is not a valid PreparedRecord.*dvc repro prepare"
    ):
        PreparedRecord.read(tmp_path / "meta.json", "dvc repro prepare")


def test_prepare_is_atomic_over_an_earlier_result(project, monkeypatch):
    """A prepare that fails part-way leaves the earlier data/prepared as it was."""
    from pipeline.data import ingest

    project.main("scan")
    project.main("prepare")
    before = (project.prepared / "meta.json").read_text()

    def failing(*args, **kwargs):
        raise DataError("a bad image")

    monkeypatch.setattr(ingest, "decode_split", failing)
    with pytest.raises(DataError, match="a bad image"):
        prepare(load_params().data, project.layout)
    assert (project.prepared / "meta.json").read_text() == before
    assert not Path(str(project.prepared) + ".partial").exists()


def test_no_stage_turns_its_run_cache_off():
    """DVC keeps no run-cache entry for a stage with an uncached output that is not a metric
    or plot (treeverse/dvc#8738), nor for a persistent one: such a stage would re-run on
    every return to an earlier configuration."""
    stages = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    for name, stage in stages.items():
        for out in stage.get("outs", []):
            options = next(iter(out.values())) if isinstance(out, dict) else {}
            assert options.get("cache", True) and not options.get("persist"), (name, out)
