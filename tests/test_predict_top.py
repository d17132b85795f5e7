"""`layerwise predict --top`: a keras.applications backbone with its own ImageNet top, as is,
over image files; class names from Keras's class index file, indices offline without it."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
from PIL import Image

from pipeline.cli import main
from pipeline.data.decoding import decode_bytes


@pytest.fixture(scope="module")
def top_weights(tmp_path_factory):
    """A MobileNetV2 weights file with its top (random, as no ImageNet file can be had here)
    and the probabilities that model gives three photos of other sizes, computed apart."""
    import keras

    root = tmp_path_factory.mktemp("top")
    keras.utils.set_random_seed(3)
    model = keras.applications.MobileNetV2(weights=None)
    path = root / "mobilenet_v2_top.weights.h5"
    model.save_weights(path)
    rng = np.random.default_rng(0)
    photos = []
    for i, (w, h) in enumerate([(300, 200), (224, 224), (150, 260)]):
        photo = root / "photos" / f"p{i}.png"
        photo.parent.mkdir(exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(photo)
        photos.append(photo)
    x = np.stack([decode_bytes(p.read_bytes(), 224, "bilinear") for p in photos])
    probs = model.predict(keras.applications.mobilenet_v2.preprocess_input(x.astype("float32")))
    return path, root / "photos", photos, probs


def rows(out):
    with out.open(newline="") as f:
        return list(csv.DictReader(f))


def test_the_imagenet_top_predicts_named_classes(top_weights, offline, tmp_path):
    path, folder, photos, probs = top_weights
    index = {str(i): [f"n{i:08d}", f"class {i}"] for i in range(1000)}
    (offline / "models").mkdir()
    (offline / "models" / "imagenet_class_index.json").write_text(json.dumps(index))
    out = tmp_path / "rows.csv"
    main(["predict", "--top", "--backbone", "mobilenet_v2", "--weights", str(path),
          str(folder), "--out", str(out)])  # fmt: skip
    got = rows(out)
    assert [r["path"] for r in got] == [str(p) for p in photos]
    for row, p in zip(got, probs):
        ranked = np.argsort(-p)[:5]
        assert row["predicted"] == f"class {ranked[0]}"
        assert float(row["confidence"]) == pytest.approx(p[ranked[0]], abs=1e-4)
        assert row["top5"].split("; ")[1].rsplit(" ", 1)[0] == f"class {ranked[1]}"


def test_offline_without_the_class_index_classes_are_indices(
    top_weights, offline, capsys, monkeypatch
):
    from pipeline.winner import imagenet

    path, folder, photos, probs = top_weights
    monkeypatch.setattr(imagenet, "IMAGENET_HOST", "class-index.invalid")  # RFC 2606
    main(["predict", "--top", "--backbone", "mobilenet_v2", "--weights", str(path),
          str(photos[0])])  # fmt: skip
    captured = capsys.readouterr()
    note = [line for line in captured.err.splitlines() if line.startswith("note:")]
    assert len(note) == 1 and "imagenet_class_index.json" in note[0]
    assert "classes are given by index" in note[0]
    row = next(csv.DictReader(captured.out.splitlines()))
    assert row["predicted"] == str(int(np.argmax(probs[0])))


@pytest.mark.parametrize(
    "backbone, weights, expect",
    [
        ("mobilenet_v2", "random", "--top needs trained weights"),
        ("mobilenet_v2", "auto", "--top needs trained weights"),  # nothing cached
        ("dinov2_small", "random", "has no ImageNet classification top"),
    ],
)
def test_the_top_refuses_what_cannot_classify(offline, tmp_path, backbone, weights, expect):
    photo = tmp_path / "p.png"
    Image.new("RGB", (40, 40)).save(photo)
    with pytest.raises(SystemExit) as info:  # what Python prints, on one line
        main(["predict", "--top", "--backbone", backbone, "--weights", weights, str(photo)])
    assert str(info.value).startswith("layerwise predict: ") and "\n" not in str(info.value)
    assert expect in str(info.value)
