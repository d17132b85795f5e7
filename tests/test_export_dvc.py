"""The winner, usable: `dvc repro` exports one classifier that plain Keras loads, and
`layerwise predict` on the test split's files gives evaluate's predictions and test accuracy."""

from __future__ import annotations

import csv
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from conftest import dvc, dvc_repo, sh
from PIL import Image

COLOURS = {"cat": (140, 110, 100), "dog": (110, 110, 140)}


def photos(root: Path, per_class: int = 24) -> Path:
    """Noisy images of two close colours (some mistakes to report), of several sizes and
    formats."""
    rng = np.random.default_rng(0)
    for name, colour in COLOURS.items():
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            h, w = (40, 56) if i % 2 else (64, 48)
            tint = np.asarray(colour) + rng.normal(0, 25, 3)  # classes overlap
            pixels = np.clip(rng.normal(tint, 40, (h, w, 3)), 0, 255).astype(np.uint8)
            suffix = ".jpg" if i % 3 == 0 else ".png"
            Image.fromarray(pixels).save(root / name / f"{name}_{i:02d}{suffix}")
    return root


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> Path:
    import keras

    base = tmp_path_factory.mktemp("export")
    images = photos(base / "photos")
    weights = base / "vgg16_notop.weights.h5"  # a local weights file, as a user gives one
    keras.utils.set_random_seed(1)
    keras.applications.VGG16(weights=None, include_top=False, input_shape=(32, 32, 3)).save_weights(
        weights
    )
    params = {
        "data": {"source": "folder", "path": str(images), "image_size": 32, "limit": None},
        "backbone": {"name": "vgg16", "weights": str(weights)},
        "extract": {"batch_size": 16, "precision": "float32"},
        "train": {"heads": ["logreg", "linear_svm"]},
    }
    root = dvc_repo(
        base / "repo", params, {"extract.layers": {"block2_pool": "avg", "block5_pool": "avg"}}
    )
    dvc(root, "repro")
    return root


def test_the_exported_classifier_loads_in_plain_keras_and_takes_any_size(exported):
    code = (
        "import sys, json, numpy as np, keras\n"
        "m = keras.saving.load_model('models/export/classifier.keras')\n"
        "x = np.random.default_rng(0).integers(0, 256, (1, 45, 61, 3)).astype('uint8')\n"
        "p = np.asarray(m.predict(x, verbose=0))\n"
        "print(json.dumps({'shape': list(p.shape), 'sum': float(p.sum()),\n"
        "                  'pipeline': [k for k in sys.modules if k.startswith('pipeline')]}))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=exported, capture_output=True, text=True, check=True
    ).stdout
    result = json.loads(out)
    assert result == {"shape": [1, 2], "sum": pytest.approx(1.0, abs=1e-5), "pipeline": []}
    card = json.loads((exported / "models/export/card.json").read_text())
    assert card["class_names"] == ["cat", "dog"] and card["source"] == "frozen"
    weights = yaml.safe_load((exported / "params.yaml").read_text())["backbone"]["weights"]
    assert card["image_side"] == 32
    assert (
        card["weights"] == f"file:sha256:{hashlib.sha256(Path(weights).read_bytes()).hexdigest()}"
    )


def test_predict_on_the_test_files_gives_evaluates_predictions_and_accuracy(exported, tmp_path):
    """Rows in test order: the predicted classes are evaluate's (plots/confusion.csv), the
    accuracy from the CSV is metrics/test.json's; unreadable and missing files are rows with
    their reason; errors.csv lists exactly the wrong rows."""
    root = Path(yaml.safe_load((exported / "params.yaml").read_text())["data"]["path"])
    from pipeline.data.prepared import split_sources
    from pipeline.project.layout import Layout

    sources = split_sources(Layout(exported).prepared_files, "test")
    (tmp_path / "broken.png").write_text("not an image")
    files = [str(root / s) for s in sources]
    out = tmp_path / "predictions.csv"
    sh(
        exported,
        "layerwise",
        "predict",
        *files,
        str(tmp_path / "broken.png"),
        str(tmp_path / "gone.jpg"),
        "--out",
        str(out),
        "--batch-size",
        "4",
    )
    with out.open() as f:
        rows = list(csv.DictReader(f))
    assert [r["path"] for r in rows] == [
        *files,
        str(tmp_path / "broken.png"),
        str(tmp_path / "gone.jpg"),
    ]
    *good, broken, gone = rows
    assert "not an image" in broken["error"] and gone["error"] == "no such file"
    with (exported / "plots/confusion.csv").open() as f:
        evaluated = list(csv.DictReader(f))
    assert [r["predicted"] for r in good] == [r["predicted"] for r in evaluated]
    for r in good:
        assert float(r["confidence"]) == pytest.approx(max(float(r["cat"]), float(r["dog"])))
    accuracy = np.mean([r["predicted"] == e["actual"] for r, e in zip(good, evaluated)])
    test = json.loads((exported / "metrics/test.json").read_text())["frozen"]
    assert accuracy == pytest.approx(test["test_accuracy"])
    card = json.loads((exported / "models/export/card.json").read_text())
    assert card["test"]["accuracy"] == pytest.approx(test["test_accuracy"])
    with (exported / "reports/errors.csv").open() as f:
        errors = list(csv.DictReader(f))
    wrong = {
        str(root / s) for s, r, e in zip(sources, good, evaluated) if r["predicted"] != e["actual"]
    }
    assert {str(root / e["file"]) for e in errors} == wrong and 0 < len(wrong) < len(good)
    confidences = [float(e["confidence"]) for e in errors]
    assert confidences == sorted(confidences, reverse=True)


def test_export_refuses_a_trunk_whose_weights_changed_since_the_head_was_trained(exported):
    """The weights file replaced after extract, export run by hand: one line, nothing written
    (under `dvc repro`, scan would see the new file and re-run every stage)."""
    import keras

    weights = Path(yaml.safe_load((exported / "params.yaml").read_text())["backbone"]["weights"])
    original = weights.read_bytes()
    before = (exported / "models" / "export" / "classifier.keras").stat().st_mtime_ns
    try:
        keras.utils.set_random_seed(2)
        model = keras.applications.VGG16(weights=None, include_top=False, input_shape=(32, 32, 3))
        model.save_weights(weights)
        env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}  # the repo's pipeline/
        result = subprocess.run(
            [sys.executable, "-m", "pipeline.export"],
            cwd=exported,
            env={**env, "TF_CPP_MIN_LOG_LEVEL": "2"},
            capture_output=True,
            text=True,
        )
    finally:
        weights.write_bytes(original)
    lines = result.stderr.strip().splitlines()
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert "the head" in lines[-1] and "was trained on features of file:sha256:" in lines[-1]
    assert "run `dvc repro`" in lines[-1]
    assert (exported / "models" / "export" / "classifier.keras").stat().st_mtime_ns == before
