"""Extraction: one pass equals separate models, reductions, the feature store, resume after a kill."""

from __future__ import annotations

import json
import re
import shutil
import signal
import time

import h5py
import numpy as np
import pytest
from conftest import (
    Project,
    adaptive_bins,
    numpy_reduce,
    relative_error,
    resolved,
    separate_layer_features,
)
from synthetic import synthetic_fingerprint

from pipeline.backbones.keras_apps import load_backbone
from pipeline.features.extractor import Reduce, build_extractor
from pipeline.features.job import extract_split
from pipeline.features.reductions import reduced_width
from pipeline.features.store import ChunkWriter, FeatureStoreError, open_features, open_splits
from pipeline.project.layout import Layout
from pipeline.project.records import Fingerprint, RecordError

LAYERS = {"block2_pool": "avg", "block3_pool": "grid2", "block4_pool": "max", "block5_pool": "none"}


def fingerprint_for(layers: dict, dtype: str = "float32", **fields) -> Fingerprint:
    extract = {"layers": layers, "batch_size": 8, "storage_dtype": dtype, "precision": "float32"}
    return synthetic_fingerprint(layers, extract=extract, **fields)


def run_extract(model, images, labels, out, scratch, layers=LAYERS, batch_size=8, dtype="float32"):
    fp = fingerprint_for(layers, dtype)
    extract_split(
        model,
        images,
        labels,
        out,
        fp,
        {"split": "train", "class_names": ["a", "b", "c"]},
        batch_size,
        scratch / fp.key / "train",
        desc="train",
    )


# ---------------------------------------------------------------- one pass, every layer


def test_one_pass_multi_layer_equals_separate_single_layer_models(
    tmp_path, small_chunks, rng_images
):
    images = rng_images(21, 32)  # not a multiple of the batch: the last batch is padded
    labels = np.arange(21) % 3
    model, _ = build_extractor(resolved("vgg16", LAYERS, 32))
    out = tmp_path / "features" / "train.h5"
    run_extract(model, images, labels, out, tmp_path / "scratch")

    ff = open_features(out, expect={"extract": fingerprint_for(LAYERS).extract})
    backbone, _ = load_backbone(resolved("vgg16", LAYERS, 32), list(LAYERS))
    want = separate_layer_features(backbone, images, LAYERS)
    assert ff.widths == {
        "block2_pool": 128,
        "block3_pool": 4 * 256,
        "block4_pool": 512,
        "block5_pool": 512,
    }
    for layer in LAYERS:
        got = ff.read(layer)
        assert got.shape == want[layer].shape
        assert relative_error(got, want[layer]) < 1e-5, layer
    np.testing.assert_array_equal(ff.labels, labels)
    assert ff.class_names == ["a", "b", "c"] and ff.fingerprint.layers == LAYERS
    assert not (tmp_path / "scratch").exists() or not any((tmp_path / "scratch").rglob("*.npz"))


def test_float16_storage_is_close_to_float32(tmp_path, rng_images):
    layers = {"block2_pool": "avg", "block5_pool": "avg"}
    images, labels = rng_images(10, 32, seed=3), np.zeros(10, int)
    model, _ = build_extractor(resolved("vgg16", layers, 32))
    run_extract(model, images, labels, tmp_path / "f16.h5", tmp_path / "s", layers, dtype="float16")
    run_extract(model, images, labels, tmp_path / "f32.h5", tmp_path / "s", layers, dtype="float32")
    with h5py.File(tmp_path / "f16.h5") as f:
        assert f["features/block5_pool"].dtype == np.float16
    f16, f32 = open_features(tmp_path / "f16.h5"), open_features(tmp_path / "f32.h5")
    for layer in layers:
        assert 0 < relative_error(f16.read(layer), f32.read(layer)) < 2e-3


# ---------------------------------------------------------------- reductions


def test_grid2_on_odd_map_by_hand():
    x = np.arange(9, dtype=np.float32).reshape(1, 3, 3, 1)  # [[0 1 2] [3 4 5] [6 7 8]]
    # 3 rows in 2 bins: rows 0-1 and 1-2 (overlapping, as adaptive average pooling)
    got = np.asarray(Reduce("grid2")(x))
    np.testing.assert_allclose(got, [[2.0, 3.0, 5.0, 6.0]])
    np.testing.assert_allclose(np.asarray(Reduce("avg")(x)), [[4.0]])
    np.testing.assert_allclose(np.asarray(Reduce("max")(x)), [[8.0]])
    np.testing.assert_allclose(np.asarray(Reduce("none")(x)), [np.arange(9.0)])


def test_adaptive_bins_reference():
    assert adaptive_bins(3, 2) == [(0, 2), (1, 3)]
    assert adaptive_bins(7, 3) == [(0, 3), (2, 5), (4, 7)]
    assert adaptive_bins(4, 2) == [(0, 2), (2, 4)]
    assert adaptive_bins(1, 2) == [(0, 1), (0, 1)]


@pytest.mark.parametrize(
    "shape", [(2, 5, 7, 3), (2, 4, 4, 2), (3, 1, 1, 4), (1, 2, 3, 5), (2, 8, 8, 1)]
)
@pytest.mark.parametrize("mode", ["none", "avg", "max", "grid1", "grid2", "grid3"])
def test_reduce_matches_numpy(shape, mode):
    x = np.random.default_rng(sum(shape)).normal(size=shape).astype(np.float32)
    layer = Reduce(mode)
    got = np.asarray(layer(x))
    want = numpy_reduce(x, mode)
    assert got.shape == want.shape == (shape[0], reduced_width(shape[1:], mode))
    assert layer.compute_output_shape((None, *shape[1:])) == (None, want.shape[1])
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    if mode == "grid1":
        np.testing.assert_allclose(got, numpy_reduce(x, "avg"), rtol=1e-5, atol=1e-6)


def test_reduce_vectors_pass_through_and_symbolic_shapes():
    import keras

    v = np.random.default_rng(0).normal(size=(4, 10)).astype(np.float32)
    np.testing.assert_allclose(np.asarray(Reduce("none")(v)), v)
    inputs = keras.Input((5, 7, 3))
    model = keras.Model(inputs, [Reduce(m)(inputs) for m in ("none", "avg", "max", "grid2")])
    assert [tuple(o.shape) for o in model.outputs] == [
        (None, 105),
        (None, 3),
        (None, 3),
        (None, 12),
    ]
    assert Reduce.from_config(Reduce("grid3").get_config()).mode == "grid3"


# ---------------------------------------------------------------- the store


def test_stale_or_mismatched_features_are_refused(tmp_path, rng_images):
    layers = {"block5_pool": "avg"}
    model, _ = build_extractor(resolved("vgg16", layers, 32))
    images, labels = rng_images(6, 32), np.zeros(6, int)
    layout = Layout(tmp_path)
    for split in ("train", "val", "test"):
        fp = fingerprint_for(layers, "float16", data="other" if split == "test" else "same")
        extract_split(
            model,
            images,
            labels,
            layout.features_file(split),
            fp,
            {"class_names": ["a"]},
            4,
            tmp_path / "s" / split,
            desc=split,
        )
    resnet = {"name": "resnet50", "weights": "random", "identity": "random"}
    with pytest.raises(
        RecordError, match="stale.*backbone.name='vgg16'.*'resnet50'.*dvc repro extract"
    ):
        open_features(layout.features_file("train"), expect={"backbone": resnet})
    with pytest.raises(FeatureStoreError, match="different extractions"):
        open_splits(layout)
    with pytest.raises(FeatureStoreError, match="no layer 'fc2'.*block5_pool"):
        open_features(layout.features_file("train")).read("fc2")
    (tmp_path / "broken.h5").write_bytes(b"not hdf5")
    with pytest.raises(FeatureStoreError, match="unreadable"):
        open_features(tmp_path / "broken.h5")
    with pytest.raises(FeatureStoreError, match="does not exist"):
        open_features(tmp_path / "missing.h5")
    ff = open_features(layout.features_file("val"))
    np.testing.assert_array_equal(
        np.concatenate(
            [ff.read("block5_pool", slice(0, 4)), ff.read("block5_pool", slice(4, None))]
        ),
        ff.read("block5_pool"),
    )


@pytest.mark.parametrize("edit", ["labels", "features"])
def test_train_run_by_hand_refuses_features_edited_after_extract(project, edit):
    """`python -m pipeline.train` outside DVC (which would restore its copy) on a features
    file edited in place with h5py, checksums and all: one line, nothing trained."""
    import h5py

    project.write_params()
    for stage in ("scan", "prepare", "extract"):
        project.main(stage)
    path = project.layout.features_file("train")
    with h5py.File(path, "r+") as f:
        if edit == "labels":
            f["labels"][:] = (f["labels"][:] + 1) % 10
        else:
            f["features"]["block5_pool"][0] *= -1
    result = project.run("train", check=False, args=["--head", "logreg"])
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode != 0 and "Traceback" not in result.stderr
    what = "its labels" if edit == "labels" else "layer 'block5_pool'"
    assert f"{what} differ from what extract wrote" in lines[-1]
    assert "dvc checkout" in lines[-1]
    assert not project.layout.cell_metrics("block5_pool", "logreg").exists()


# ---------------------------------------------------------------- resume


class CrashingImages:
    """Prepared images that make the run die when it reaches row `crash_at` (like a kill), and
    count the rows a run really reads."""

    def __init__(self, images: np.ndarray, crash_at: int | None = None):
        self.images, self.crash_at, self.rows_read = images, crash_at, 0
        self.shape, self.dtype = images.shape, images.dtype

    def __len__(self):
        return len(self.images)

    def __getitem__(self, key):
        if self.crash_at is not None and isinstance(key, slice) and (key.stop or 0) > self.crash_at:
            raise KeyboardInterrupt("simulated crash")
        part = self.images[key]
        self.rows_read += len(part)
        return part


def test_resume_after_crash_recomputes_only_the_rest(tmp_path, small_chunks, rng_images):
    layers = {"block2_pool": "avg", "block5_pool": "avg"}
    images, labels = rng_images(21, 32, seed=5), np.arange(21) % 3
    model, _ = build_extractor(resolved("vgg16", layers, 32))
    out, scratch = tmp_path / "features" / "train.h5", tmp_path / "scratch"

    with pytest.raises(KeyboardInterrupt):
        run_extract(
            model, CrashingImages(images, crash_at=10), labels, out, scratch, layers, batch_size=4
        )
    assert not list(tmp_path.rglob("*.h5"))  # no features file, not even a partial one
    chunk_dir = scratch / fingerprint_for(layers).key / "train"
    writer = ChunkWriter(chunk_dir, {k: 1 for k in layers}, "float32")
    assert writer.rows_done() == 8  # chunks [0, 4) and [4, 8) finished before the crash

    # a half-written leftover after the last good chunk is dropped, not trusted
    (chunk_dir / "chunk_0000000008.npz").write_bytes(b"PK\x03\x04 truncated")
    assert writer.rows_done() == 8 and not (chunk_dir / "chunk_0000000008.npz").exists()

    resumed = CrashingImages(images)
    run_extract(model, resumed, labels, out, scratch, layers, batch_size=4)
    assert resumed.rows_read == 21 - 8

    clean = tmp_path / "clean.h5"
    run_extract(model, images, labels, clean, tmp_path / "scratch2", layers, batch_size=4)
    a, b = open_features(out), open_features(clean)
    for layer in layers:
        np.testing.assert_array_equal(a.read(layer), b.read(layer))


def _chunk_rows(scratch, split):
    rows = 0
    for path in scratch.glob(f"*/{split}/chunk_*.npz"):
        try:
            with np.load(path) as chunk:
                rows += len(chunk[chunk.files[0]])
        except (OSError, ValueError, KeyError):  # a chunk being written right now
            continue
    return rows


def test_killed_extract_cli_resumes_to_identical_features(project, monkeypatch):
    """SIGKILL `python -m pipeline.extract` part-way, re-run it: same arrays as a run never
    interrupted; while killed, no features/*.h5 exists (a half file is never visible)."""
    project.write_params(data={"limit": 400}, extract={"batch_size": 8, "storage_dtype": "float16"})
    project.main("scan")
    project.main("prepare")
    n_train = json.loads((project.prepared / "meta.json").read_text())["counts"]["train"]

    proc = project.popen("extract", env={"PIPELINE_CHUNK_BYTES": "1"})  # one batch per chunk
    deadline = time.monotonic() + 240
    try:
        while not list(project.scratch.glob("*/train/chunk_*.npz")):
            assert proc.poll() is None, f"extract ended before any chunk: {proc.communicate()}"
            assert time.monotonic() < deadline, "no chunk file appeared"
            time.sleep(0.005)
        proc.send_signal(signal.SIGKILL)
        proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == -signal.SIGKILL

    done = _chunk_rows(project.scratch, "train")
    assert 0 < done < n_train, f"killed after {done} of {n_train} rows: not part-way"
    assert not list(project.root.glob("features/*.h5")) and not list(
        project.root.glob("features/*")
    )

    resumed = project.run("extract", env={"PIPELINE_CHUNK_BYTES": "1"})
    first = re.search(r"train:\s+\d+%\|[^|]*\|\s*(\d+)/(\d+)", resumed.stderr)
    assert first and int(first.group(1)) >= done > 0, resumed.stderr[
        -2000:
    ]  # started after the chunks
    assert not list(project.scratch.glob("*/*/chunk_*.npz"))  # scratch cleaned once complete

    clean = project.root.parent / "clean"
    clean.mkdir()
    shutil.copy(project.root / "params.yaml", clean / "params.yaml")
    shutil.copytree(project.root / "data", clean / "data")
    monkeypatch.chdir(clean)
    Project(clean).main("extract")  # the same extraction, never interrupted (in this process)
    got, want = open_splits(project.layout), open_splits(Layout(clean))
    for split in ("train", "val", "test"):
        assert got[split].fingerprint == want[split].fingerprint
        np.testing.assert_array_equal(got[split].labels, want[split].labels)
        for layer in ("block2_pool", "block5_pool"):
            np.testing.assert_array_equal(got[split].read(layer), want[split].read(layer))


def test_crash_while_assembling_the_file_leaves_no_features_file(
    tmp_path, small_chunks, rng_images, monkeypatch
):
    """Killed while the HDF5 file is assembled from the chunks: out/ shows nothing, and the
    next run still finishes from the chunks."""
    from pipeline.features import store

    layers = {"block5_pool": "avg"}
    images, labels = rng_images(12, 32, seed=7), np.zeros(12, int)
    model, _ = build_extractor(resolved("vgg16", layers, 32))
    out = tmp_path / "features" / "train.h5"
    real_load, calls = store.np.load, []

    def dying_load(path, *a, **k):
        calls.append(path)
        if len(calls) == 2:
            raise KeyboardInterrupt("killed while assembling")
        return real_load(path, *a, **k)

    monkeypatch.setattr(store.np, "load", dying_load)
    with pytest.raises(KeyboardInterrupt):
        run_extract(model, images, labels, out, tmp_path / "s", layers, batch_size=4)
    monkeypatch.setattr(store.np, "load", real_load)
    assert len(calls) == 2  # died after the first chunk was copied into the file
    assert not list(tmp_path.rglob("*.h5"))  # the partial file has another name, in scratch
    run_extract(model, images, labels, out, tmp_path / "s", layers, batch_size=4)
    assert open_features(out).read("block5_pool").shape == (12, 512)
