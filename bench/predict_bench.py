"""`layerwise predict` against the bare `predict` of the same exported classifier.

An exported classifier of the default backbone (VGG16, random weights, block5_pool avg, a
linear head) is written to a temporary project, with JPEG photos of 375x500 pixels. Rows:
  a  bare `model.predict` on the photos already decoded and resized (uint8 arrays in memory)
  b  `layerwise predict` end to end: files -> PIL decode and resize on threads -> the model ->
     CSV rows
  m  peak RSS of b in a subprocess at 1x and --multiple x the files (os.wait4's ru_maxrss)

    python bench/predict_bench.py --images 48 --size 224
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def photos(folder: Path, n: int) -> list[str]:
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        small = rng.integers(0, 256, (15, 20, 3), dtype=np.uint8)  # smooth once enlarged
        path = folder / f"photo_{i:04d}.jpg"
        Image.fromarray(small).resize((500, 375), Image.Resampling.BICUBIC).save(path, quality=90)
        paths.append(str(path))
    return paths


def export(root: Path, size: int) -> None:
    """A classifier and its card, as the export stage writes them."""
    import keras
    import numpy as np

    from pipeline.backbones.keras_apps import load_backbone, tap
    from pipeline.backbones.registry import get_backbone
    from pipeline.finetuning.conversion import linear_head
    from pipeline.project.layout import Layout
    from pipeline.project.records import ClassifierCard
    from pipeline.selection.scoring import split_report
    from pipeline.winner.classifier import build_classifier, save_classifier

    backbone = get_backbone("vgg16").record("random", size, {"block5_pool": "avg"})
    model, _ = load_backbone(backbone, ["block5_pool"])
    trunk = keras.Model(model.inputs, tap(model, "block5_pool"))
    kernel = np.random.default_rng(0).normal(0, 0.01, (512, 2)).astype("float32")
    winner = SimpleNamespace(
        backbone=backbone,
        trunk=trunk,
        reduction="avg",
        storage_dtype="float16",
        head=linear_head(kernel, np.zeros(2, "float32")),
    )
    layout = Layout(root)
    save_classifier(build_classifier(winner, "bilinear"), layout.classifier)
    report = split_report(np.array([0, 1]), np.array([0, 1]), ["a", "b"])
    ClassifierCard(
        model=layout.classifier.name,
        needs=[],
        input="uint8 RGB",
        class_names=["a", "b"],
        image_side=size,
        interpolation="bilinear",
        backbone="vgg16",
        weights="random",
        layer="block5_pool",
        reduction="avg",
        head="logreg",
        cell="block5_pool-logreg",
        source="frozen",
        why="benchmark",
        test=report,
    ).write(layout.card)


def peak_rss_mb(root: Path, files: list[str], batch_size: int) -> float:
    listing = root / "files.txt"
    listing.write_text("\n".join(files))
    code = (
        "import sys; from pathlib import Path; import exported, predict_files;"
        f"predict_files(Path({str(listing)!r}).read_text().split(), exported(Path({str(root)!r})), "
        f"Path({str(root / 'rows.csv')!r}), {batch_size})"
    )
    proc = subprocess.Popen([sys.executable, "-c", code], env={**os.environ, "TQDM_DISABLE": "1"})
    _, status, usage = os.wait4(proc.pid, 0)
    assert status == 0, status
    return usage.ru_maxrss / 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=48)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--multiple", type=int, default=10)
    args = parser.parse_args()
    import keras
    import numpy as np

    from pipeline.data.decoding import decode_bytes
    from pipeline.winner.predict import exported, predict_files

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        files = photos(root / "photos", args.images)
        export(root, args.size)
        model = keras.saving.load_model(root / "models/export/classifier.keras", compile=False)
        arrays = np.stack(
            [decode_bytes(Path(f).read_bytes(), args.size, "bilinear") for f in files]
        )
        model.predict(arrays[: args.batch_size], verbose=0)  # compiled before timing
        t0 = time.perf_counter()
        model.predict(arrays, batch_size=args.batch_size, verbose=0)
        bare = len(files) / (time.perf_counter() - t0)
        os.environ["TQDM_DISABLE"] = "1"
        classifier = exported(root)
        predict_files(files[: args.batch_size], classifier, root / "warm.csv", args.batch_size)
        r = predict_files(files, classifier, root / "rows.csv", args.batch_size)
        one = peak_rss_mb(root, files, args.batch_size)
        many = peak_rss_mb(root, files * args.multiple, args.batch_size)
    print(
        f"\npredict bench: vgg16 at {args.size} px, {args.images} JPEG photos of 500x375, "
        f"batch {args.batch_size}, keras {keras.__version__} on {keras.backend.backend()}, "
        f"{os.cpu_count()} cores\n"
    )
    print("| row | what | images/s | note |\n|---|---|---:|---|")
    print(f"| a | bare model.predict, decoded uint8 arrays in memory | {bare:.2f} | |")
    print(f"| b | layerwise predict end to end (files -> CSV) | {r['per_second']:.2f} | |")
    print(f"| b/a | ratio | {r['per_second'] / bare:.3f} | goal >= 0.9 |")
    print(
        f"| m | peak RSS, {args.images} / {args.images * args.multiple} files | "
        f"{one:.0f} / {many:.0f} MB | flat: memory does not grow with the files |"
    )


if __name__ == "__main__":
    main()
