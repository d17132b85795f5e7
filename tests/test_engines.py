"""extract.engine: ray and data.prepared: manifest write the same features as the local engine
from decoded arrays (to float rounding: a Ray actor's thread count may sum in another order), through real DVC and a local Ray cluster (the CI machine's 2 CPUs); a
manifest lists usable files only and refuses one that changed."""

from __future__ import annotations

import hashlib
import shutil
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
from conftest import dvc, dvc_repo, ran, resolved

from pipeline.data.arrays import NpyRows
from pipeline.data.decoding import DataError
from pipeline.data.files import Tree
from pipeline.data.ingest import prepare
from pipeline.data.prepared import load_split
from pipeline.features.ray_engine import RayEngine, ray_session, worker_env
from pipeline.features.stream import Budget
from pipeline.project.errors import InputError
from pipeline.project.layout import Layout
from pipeline.project.params import ConfigError, DataConfig, ExtractConfig, RayConfig

SPLITS = ("train", "val", "test")


def photos(root: Path, per_class: int = 12) -> Path:
    """JPEG photos of two colours with noise, 80 px: larger than the 32 px target, so that
    decoding takes JPEG's draft mode."""
    from PIL import Image

    rng = np.random.default_rng(0)
    for label, colour in (("red", (200, 40, 40)), ("blue", (40, 60, 200))):
        (root / label).mkdir(parents=True)
        for i in range(per_class):
            noise = rng.normal(0, 40, (80, 80, 3))
            pixels = np.clip(np.array(colour) + noise, 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(root / label / f"{i:02d}.jpg", quality=90)
    return root


def features(root: Path) -> dict[str, np.ndarray]:
    out = {}
    for split in SPLITS:
        with h5py.File(root / "features" / f"{split}.h5") as f:
            out[f"{split}/labels"] = f["labels"][:]
            for layer in f["features"]:
                out[f"{split}/{layer}"] = f["features"][layer][:]
    return out


def assert_same(got: np.ndarray, want: np.ndarray, what: str) -> None:
    """Equal to float32 rounding (labels exactly)."""
    if want.dtype.kind in "iu":
        np.testing.assert_array_equal(got, want, err_msg=what)
    else:
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6, err_msg=what)


def test_every_engine_and_prepared_form_writes_the_same_features(tmp_path):
    params = {
        "data": {"source": "folder", "path": str(photos(tmp_path / "photos")), "limit": None},
        "backbone": {"weights": "random"},
        "extract": {"batch_size": 4, "storage_dtype": "float32", "precision": "float32"},
        "train": {"heads": ["logreg"]},
    }
    layers = {"extract.layers": {"block2_pool": "avg", "block5_pool": "avg"}}
    root = dvc_repo(
        tmp_path / "repo", {**params, "data": {**params["data"], "image_size": 32}}, layers
    )
    dvc(root, "repro", "extract")
    local = features(root)
    assert (
        len(local["test/labels"]) % 4 != 0 or len(local["train/labels"]) % 4 != 0
    )  # a short batch

    source = params["data"]["path"]
    for prepared, engine, path in (
        ("arrays", "ray", source),  # Ray tasks read the prepared arrays
        ("manifest", "local", source),  # this process decodes the listed files
        ("manifest", "ray", f"file://{source}"),  # Ray tasks decode them, through pyarrow
    ):
        output = dvc(
            root,
            "exp",
            "run",
            "extract",
            *("-S", f"data.prepared={prepared}", "-S", f"extract.engine={engine}"),
            *("-S", f"data.path={path}"),
        )
        settings = f"{prepared}, {engine}, {path}"
        assert "extract" in ran(output), f"{settings}: {output}"
        got = features(root)
        assert got.keys() == local.keys()
        for key, value in local.items():
            assert_same(got[key], value, f"{settings}: {key}")
        manifest = prepared == "manifest"
        assert any((root / "data" / "prepared").glob("*_images.npy")) != manifest
        assert ("ray: 2 CPUs, 0 GPUs" in output) == (engine == "ray")


def test_a_run_killed_on_the_local_engine_resumes_on_ray_to_the_same_features(project, monkeypatch):
    """Ray's one dataset starts where the kept chunks end, and skips the finished splits."""
    from test_provenance import _extract  # runs extract_all with a reader that can die

    from pipeline.features import job
    from pipeline.features.extractor import build_extractor
    from pipeline.project.params import load_params
    from pipeline.project.provenance import current_prepared, scanned_backbone

    for stage in ("scan", "prepare"):
        project.main(stage)
    _, fingerprint = _extract(project, monkeypatch)
    clean = features(project.root)
    shutil.rmtree(project.features)
    with pytest.raises(KeyboardInterrupt):  # train dies after its first batch of 16
        _extract(project, monkeypatch, crash_split="train", crash_at=17)
    kept = list((project.scratch / fingerprint.key / "train").glob("chunk_*.npz"))
    assert len(kept) == 1

    monkeypatch.setattr(job, "load_split", load_split)
    params = load_params()
    backbone = scanned_backbone(params)
    model, _ = build_extractor(backbone)
    engine = RayEngine(backbone, params.extract, "float32", "random")
    with ray_session(RayConfig(), worker_env()):
        job.extract_all(
            model,
            current_prepared(params),
            fingerprint,
            params.extract.batch_size,
            engine=engine,
            layout=project.layout,
        )
    resumed = features(project.root)
    for key, value in clean.items():
        assert_same(resumed[key], value, key)


def test_a_listed_file_that_changed_after_prepare_is_refused(tmp_path):
    source = photos(tmp_path / "photos", per_class=6)
    cfg = DataConfig(source="folder", path=str(source), image_size=32, prepared="manifest")
    layout = Layout(tmp_path)
    record, _ = prepare(cfg, layout)
    listing = layout.prepared_files.files("train").read_text().splitlines()
    digest, name = listing[0].split("  ", 1)
    assert hashlib.sha256((source / name).read_bytes()).hexdigest() == digest
    images, labels = load_split("train", record, workers=2, layout=layout)
    assert images[:].shape == (len(labels), 32, 32, 3)

    (source / name).write_bytes((source / name).read_bytes() + b"\0")
    with pytest.raises(DataError, match=f"{name} changed after prepare listed it"):
        images[:2]


def test_a_manifest_skips_and_reports_what_is_not_an_image(tmp_path):
    source = photos(tmp_path / "photos", per_class=6)
    (source / "red" / "empty.jpg").write_bytes(b"")
    (source / "blue" / "notes.jpg").write_text("not an image")
    cfg = DataConfig(
        source="folder", path=str(source), image_size=32, prepared="manifest", test_fraction=0.3
    )
    layout = Layout(tmp_path)
    record, skipped = prepare(cfg, layout)
    assert sorted((s["path"], s["reason"]) for s in skipped) == [
        ("blue/notes.jpg", "not an image PIL can identify"),
        ("red/empty.jpg", "empty file (0 bytes)"),
    ]
    listed = [
        line.split("  ", 1)[1]
        for split in SPLITS
        for line in layout.prepared_files.files(split).read_text().splitlines()
    ]
    assert sorted(listed) == sorted(f"{c}/{i:02d}.jpg" for c in ("red", "blue") for i in range(6))
    assert sum(record.counts.values()) == 12
    assert sorted(f.name for f in layout.prepared.glob("*.npy")) == [
        f"{split}_labels.npy" for split in sorted(SPLITS)
    ]


def test_a_file_a_ray_worker_refuses_is_one_line_from_the_stage(project, tmp_path):
    """A worker's DataError comes back through Ray's wrappers as the stage's one line."""
    source = photos(tmp_path / "photos", per_class=4)
    project.write_params(
        data={"source": "folder", "path": str(source), "limit": None, "prepared": "manifest"},
        extract={"engine": "ray"},
    )
    for stage in ("scan", "prepare"):
        project.run(stage)
    name = (project.prepared / "train_files.txt").read_text().split("  ", 1)[1].splitlines()[0]
    (source / name).write_bytes((source / name).read_bytes() + b"\0")
    result = project.run("extract", check=False, env={"TQDM_DISABLE": "1"})
    assert result.returncode == 1 and "Traceback" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("extract: "), result.stderr
    assert f"{name} changed after prepare listed it" in lines[0]


def test_prepared_arrays_a_ray_worker_cannot_read_are_one_clear_error(tmp_path):
    """On a cluster without a shared filesystem the workers cannot open data/prepared."""
    np.save(tmp_path / "train_images.npy", np.zeros((8, 32, 32, 3), np.uint8))
    images = NpyRows(tmp_path / "train_images.npy")
    (tmp_path / "train_images.npy").unlink()  # this process keeps its open file
    cfg = ExtractConfig(
        layers={"block5_pool": "avg"}, batch_size=4, storage_dtype="float32", precision="float32"
    )
    engine = RayEngine(resolved("vgg16", cfg.layers), cfg, "float32", "random")
    with ray_session(RayConfig(), worker_env()):
        with pytest.raises(InputError, match="a Ray worker cannot read .*train_images.npy"):
            engine.stream(images, range(0, 8, 4), lambda *a: None, Budget(2, 2, 4), print)


def test_the_ray_engine_without_ray_says_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` raises ImportError
    with pytest.raises(ConfigError, match=r"pip install 'layerwise\[ray\]'"):
        with ray_session(RayConfig(), {}):
            pass


def test_a_uri_root_lists_and_reads_as_the_local_folder(tmp_path):
    source = photos(tmp_path / "photos", per_class=3)
    (source / ".hidden").mkdir()
    (source / ".hidden" / "x.jpg").write_bytes(b"x")
    local, remote = Tree(str(source)), Tree(f"file://{source}")
    assert remote.is_dir() and not Tree(f"file://{tmp_path}/nowhere").is_dir()
    assert remote.walk() == local.walk()
    assert [name for name, _, _ in local.walk()[1]] == [
        f"{c}/{i:02d}.jpg" for c in ("blue", "red") for i in range(3)
    ]
    assert remote.file("red/00.jpg").read_bytes() == (source / "red" / "00.jpg").read_bytes()
    assert str(remote.file("red/00.jpg")) == f"file://{source}/red/00.jpg"


def test_a_manifest_needs_a_folder_of_files():
    from pipeline.project.params import Shared, validate

    with pytest.raises(ConfigError, match="prepared 'manifest' lists image files"):
        validate(Shared, {"data": {"source": "digits", "prepared": "manifest"}})
