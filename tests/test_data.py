"""Data sources, splits and decoding: bad files reported and skipped, every PIL mode to RGB."""

from __future__ import annotations

import json
import os
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from conftest import SMALL_PARAMS, deep_merge, write_image
from PIL import Image

from pipeline.data.decoding import DataError, decode_file
from pipeline.data.ingest import prepare
from pipeline.data.sources import folder_source, load_source
from pipeline.project.layout import Layout
from pipeline.project.params import DataConfig
from pipeline.project.records import PreparedRecord, RecordError

GOOD_MODES = [  # file name, PIL mode, format
    ("grey.png", "L", None),
    ("alpha.png", "RGBA", None),
    ("cmyk.jpg", "CMYK", None),
    ("deep16.png", "I;16", None),
    ("palette.png", "P", None),
    ("bilevel.png", "1", None),
    ("anim.gif", "RGB", "GIF"),
    ("photo.webp", "RGB", "WEBP"),
]


def data_config(**kw) -> DataConfig:
    """The data section alone (any image size: no backbone reads it here)."""
    return DataConfig.model_validate(deep_merge(SMALL_PARAMS["data"], kw))


def write_bad_files(folder: Path) -> dict[str, str]:
    """A zero-byte file, a truncated JPEG and a text file named .png; -> {name: reason part}."""
    (folder / "empty.jpg").write_bytes(b"")
    whole = folder / "whole.jpg"
    write_image(whole, "RGB", size=64)
    data = whole.read_bytes()
    whole.unlink()
    (folder / "truncated.jpg").write_bytes(data[: len(data) // 2])
    (folder / "notes.png").write_text("this is not a picture\n")
    return {"empty.jpg": "empty file", "truncated.jpg": "truncated", "notes.png": "not an image"}


@pytest.fixture
def messy_folder(tmp_path, make_image_folder):
    root = make_image_folder(tmp_path / "messy", {"cat": 10, "dog": 10})
    for name, mode, fmt in GOOD_MODES:
        write_image(root / "cat" / name, mode, fmt=fmt)
    bad = write_bad_files(root / "dog")
    return root, bad


def test_bad_images_reported_and_skipped(project, messy_folder):
    root, bad = messy_folder
    project.write_params(
        data={"source": "folder", "path": str(root), "image_size": 32, "limit": None}
    )
    project.main("scan")
    project.main("prepare")

    report = json.loads((project.prepared / "report.json").read_text())
    assert report["n_skipped"] == len(report["skipped"]) == 3
    reported = {Path(s["path"]).name: s for s in report["skipped"]}
    assert set(reported) == set(bad)
    for name, reason in bad.items():
        assert reported[name]["path"] == f"dog/{name}" and reason in reported[name]["reason"]
        assert reported[name]["split"] in ("train", "val", "test")

    meta = json.loads((project.prepared / "meta.json").read_text())
    assert sum(meta["counts"].values()) == 20 + len(GOOD_MODES)  # every good file, no bad one
    assert meta["class_names"] == ["cat", "dog"] and meta["image_size"] == 32
    manifest = (project.prepared / "manifest.csv").read_text()
    for name, _, _ in GOOD_MODES:
        assert f'"cat/{name}"' in manifest
    for name in bad:
        assert name not in manifest
    for split in ("train", "val", "test"):
        images = np.load(project.prepared / f"{split}_images.npy")
        labels = np.load(project.prepared / f"{split}_labels.npy")
        assert images.dtype == np.uint8 and images.shape[1:] == (32, 32, 3)
        assert len(images) == len(labels) == meta["counts"][split]


def test_bad_image_with_on_bad_image_fail_names_the_file(messy_folder, tmp_path):
    root, bad = messy_folder
    cfg = data_config(
        source="folder", path=str(root), image_size=16, limit=None, on_bad_image="fail"
    )
    with pytest.raises(DataError) as info:
        prepare(cfg, Layout(tmp_path))
    message = str(info.value)
    named = [name for name in bad if str(root / "dog" / name) in message]
    assert len(named) == 1 and bad[named[0]] in message and "on_bad_image=fail" in message


def _solid(mode_image: Image.Image, path: Path, **save) -> Path:
    mode_image.save(path, **save)
    return path


def test_every_mode_decodes_to_the_right_rgb(tmp_path):
    """Uniform images in each mode: the decoded 8x8 RGB pixels are the colour they show."""
    palette = Image.new("RGB", (12, 12), (0, 128, 255)).convert("P", palette=Image.Palette.ADAPTIVE)
    transparent = Image.new("RGBA", (12, 12), (10, 20, 30, 0))
    cases = [
        (_solid(Image.new("L", (12, 12), 100), tmp_path / "l.png"), (100, 100, 100), 0),
        (_solid(transparent, tmp_path / "clear.png"), (255, 255, 255), 0),  # on white
        (
            _solid(Image.new("RGBA", (12, 12), (10, 20, 30, 255)), tmp_path / "opaque.png"),
            (10, 20, 30),
            0,
        ),
        (
            _solid(Image.new("CMYK", (12, 12), (0, 255, 255, 0)), tmp_path / "red.jpg", quality=95),
            (255, 0, 0),
            4,
        ),
        (
            _solid(Image.fromarray(np.full((12, 12), 200 * 257, np.uint16)), tmp_path / "i16.png"),
            (200, 200, 200),
            0,
        ),
        (_solid(palette, tmp_path / "p.png"), (0, 128, 255), 0),
        (_solid(Image.new("1", (12, 12), 1), tmp_path / "one.png"), (255, 255, 255), 0),
        (_solid(Image.new("RGB", (12, 12), (255, 0, 0)), tmp_path / "red.gif"), (255, 0, 0), 0),
        (
            _solid(Image.new("RGB", (12, 12), (0, 200, 50)), tmp_path / "g.webp", lossless=True),
            (0, 200, 50),
            0,
        ),
    ]
    assert Image.open(tmp_path / "i16.png").mode == "I;16"
    assert Image.open(tmp_path / "red.gif").mode == "P"
    for path, rgb, tol in cases:
        got = decode_file(path, 8, "bilinear")
        assert got.shape == (8, 8, 3) and got.dtype == np.uint8, path.name
        assert np.abs(got.astype(int) - rgb).max() <= tol, (path.name, got[0, 0])


# ---------------------------------------------------------------- folder layouts and splits


def _ids(splits):
    return {name: list(s.ids) for name, s in splits.items()}


def test_flat_folder_split_is_stratified_and_seeded(tmp_path, make_image_folder):
    root = make_image_folder(tmp_path / "flat", {"a": 20, "b": 30, "c": 10})
    cfg = data_config(source="folder", path=str(root), limit=None, seed=3)
    names, splits = folder_source(cfg)
    assert names == ["a", "b", "c"]
    again = folder_source(cfg)[1]
    other = folder_source(data_config(source="folder", path=str(root), limit=None, seed=4))[1]
    assert _ids(splits) == _ids(again)
    assert _ids(splits) != _ids(other)

    every = [i for s in splits.values() for i in s.ids]
    assert len(every) == len(set(every)) == 60  # disjoint and complete
    for split, fraction in (("val", 0.2), ("test", 0.2), ("train", 0.6)):
        counts = Counter(splits[split].labels.tolist())
        for label, total in enumerate((20, 30, 10)):
            assert abs(counts[label] - fraction * total) <= 1, (split, label, counts)
    for s in splits.values():  # labels follow the class folders
        assert all(i.split("/")[0] == names[label] for i, label in zip(s.ids, s.labels))


def test_split_subfolders_with_validation_name(tmp_path, make_image_folder):
    root = make_image_folder(
        tmp_path / "pre",
        layout="split",
        splits={
            "train": {"a": 8, "b": 8},
            "validation": {"a": 3, "b": 3},
            "test": {"a": 2, "b": 2},
        },
    )
    names, splits = folder_source(data_config(source="folder", path=str(root), limit=None))
    assert names == ["a", "b"]
    for split, folder, n in (("train", "train", 16), ("val", "validation", 6), ("test", "test", 4)):
        assert len(splits[split].ids) == n
        assert all(i.startswith(f"{folder}/") for i in splits[split].ids)


def test_missing_val_is_carved_from_train(tmp_path, make_image_folder):
    root = make_image_folder(
        tmp_path / "pre",
        layout="split",
        splits={"train": {"a": 10, "b": 10}, "test": {"a": 3, "b": 3}},
    )
    _, splits = folder_source(
        data_config(source="folder", path=str(root), limit=None, val_fraction=0.2)
    )
    assert all(i.startswith("test/") for i in splits["test"].ids) and len(splits["test"].ids) == 6
    assert all(i.startswith("train/") for i in splits["val"].ids + splits["train"].ids)
    assert not set(splits["val"].ids) & set(splits["train"].ids)
    assert sorted(splits["val"].labels.tolist()) == [0, 0, 1, 1]  # 20% of train, stratified
    assert len(splits["train"].ids) == 16

    only_train = make_image_folder(
        tmp_path / "only", layout="split", splits={"train": {"a": 10, "b": 10}}
    )
    _, splits = folder_source(data_config(source="folder", path=str(only_train), limit=None))
    sizes = {k: len(s.ids) for k, s in splits.items()}
    assert sizes == {"train": 12, "val": 4, "test": 4}
    assert len({i for s in splits.values() for i in s.ids}) == 20


@pytest.mark.parametrize(
    "layout, message",
    [
        ({"a": 5, "b": 0}, r"empty class folder\(s\) in .*bad: b"),
        ({"a": 5}, r"needs at least two class folders, found \['a'\]"),
        ({}, "needs at least two class folders, found none"),
    ],
)
def test_bad_folders_fail_fast(tmp_path, make_image_folder, layout, message):
    root = make_image_folder(tmp_path / "bad", layout)
    with pytest.raises(DataError, match=message):
        load_source(data_config(source="folder", path=str(root)))


def test_missing_directory_and_unknown_split_classes_fail_fast(tmp_path, make_image_folder):
    with pytest.raises(DataError, match="data.path=.*nowhere.* is not a directory"):
        load_source(data_config(source="folder", path=str(tmp_path / "nowhere")))
    root = make_image_folder(
        tmp_path / "pre",
        layout="split",
        splits={"train": {"a": 5, "b": 5}, "val": {"a": 2, "zebra": 2}},
    )
    with pytest.raises(DataError, match="classes not in the training set: zebra"):
        load_source(data_config(source="folder", path=str(root)))


def test_class_left_without_usable_images_fails(tmp_path, make_image_folder):
    root = make_image_folder(tmp_path / "f", {"a": 10})
    (root / "b").mkdir()
    for i in range(10):
        (root / "b" / f"{i}.png").write_text("not an image")
    with pytest.raises(DataError, match="no usable training images left for class\\(es\\): b"):
        prepare(
            data_config(source="folder", path=str(root), image_size=8, limit=None), Layout(tmp_path)
        )


# ---------------------------------------------------------------- digits and keras.datasets


def test_digits_prepare_is_deterministic(project):
    project.main("scan")
    project.main("prepare")
    meta = PreparedRecord.read(project.prepared / "meta.json", "-")
    assert meta.counts == {"train": 36, "val": 12, "test": 12} and meta.image_size == 32
    images = np.load(project.prepared / "train_images.npy")
    assert images.shape == (36, 32, 32, 3) and images.dtype == np.uint8 and images.max() > 200
    assert (images[..., 0] == images[..., 2]).all()  # grey digits as RGB
    project.main("scan")
    project.main("prepare")
    assert PreparedRecord.read(project.prepared / "meta.json", "-") == meta


def test_missing_prepared_data_says_what_to_run(tmp_path):
    with pytest.raises(RecordError, match="meta.json not found: run `dvc repro prepare`"):
        PreparedRecord.read(tmp_path / "meta.json", "dvc repro prepare")


def test_keras_dataset_offline_fails_fast(offline):
    with pytest.raises(DataError) as info:
        load_source(data_config(source="mnist"))
    message = str(info.value)
    assert "data.source=mnist: could not download it" in message
    assert "data.source=digits" in message and "data.source=folder" in message


def test_keras_dataset_from_the_keras_cache(offline, monkeypatch):
    """keras.datasets' real loader on a small stand-in mnist.npz pre-placed in the Keras cache
    (its md5 check told to accept that one file): val carved from train, limit applied."""
    from keras.src.utils import file_utils

    rng = np.random.default_rng(0)
    cached = offline / "datasets" / "mnist.npz"
    cached.parent.mkdir()
    np.savez(
        cached,
        x_train=rng.integers(0, 256, (200, 28, 28), dtype=np.uint8),
        y_train=np.arange(200) % 10,
        x_test=rng.integers(0, 256, (50, 28, 28), dtype=np.uint8),
        y_test=np.arange(50) % 10,
    )
    real = file_utils.validate_file
    monkeypatch.setattr(
        file_utils, "validate_file", lambda p, *a, **k: str(p) == str(cached) or real(p, *a, **k)
    )
    names, splits = load_source(data_config(source="mnist", limit=None, val_fraction=0.2))
    assert names == [str(i) for i in range(10)]
    assert {k: len(s.labels) for k, s in splits.items()} == {"train": 160, "val": 40, "test": 50}
    assert all(i.startswith("test:") for i in splits["test"].ids)
    names, limited = load_source(data_config(source="mnist", limit=125))
    assert sum(len(s.labels) for s in limited.values()) == 125


# ---------------------------------------------------------------- decoding speed


def test_decoding_uses_every_core_unless_capped(monkeypatch, tmp_path):
    """decode_split runs decode_workers files at once (default: every core)."""
    import threading
    import time

    from pipeline.data import decoding, ingest
    from pipeline.data.ingest import decode_split
    from pipeline.data.sources import Split

    active, most, lock = [0], [0], threading.Lock()

    def slow_decode(path, size, interpolation):
        with lock:
            active[0] += 1
            most[0] = max(most[0], active[0])
        time.sleep(0.05)
        with lock:
            active[0] -= 1
        return np.zeros((size, size, 3), np.uint8)

    monkeypatch.setattr(ingest, "decode_file", slow_decode)
    files = [tmp_path / f"{i}.jpg" for i in range(12)]
    split = Split(labels=np.zeros(12, np.int64), paths=files, ids=[f.name for f in files])
    assert len(list(decode_split("t", split, data_config(decode_workers=3)))) == 12
    assert most[0] == 3
    assert decoding.decode_workers(data_config()) == len(os.sched_getaffinity(0))


def test_large_jpegs_are_decoded_in_draft_mode(tmp_path, monkeypatch):
    """A 1600x1200 JPEG wanted at 64 px is decoded at 1/8 scale (200x150), and the result is
    within a few grey levels of a full decode resized the same way."""
    from PIL import JpegImagePlugin

    from pipeline.data.decoding import decode_file, resize

    rng = np.random.default_rng(0)
    smooth = rng.integers(0, 255, (12, 16, 3)).astype(np.uint8)
    path = tmp_path / "big.jpg"
    Image.fromarray(smooth).resize((1600, 1200), Image.BICUBIC).save(path, quality=95)
    sizes = []
    draft = JpegImagePlugin.JpegImageFile.draft

    def spy(self, mode, size):
        result = draft(self, mode, size)
        sizes.append(self.size)
        return result

    monkeypatch.setattr(JpegImagePlugin.JpegImageFile, "draft", spy)
    fast = decode_file(path, 64, "bilinear")
    assert sizes == [(200, 150)]
    with Image.open(path) as img:
        img.load()
        full = resize(img, 64, "bilinear")
    assert fast.shape == full.shape == (64, 64, 3)
    assert np.abs(fast.astype(int) - full.astype(int)).mean() < 3
