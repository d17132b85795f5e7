"""Feature drift and head accuracy of each compute precision against float32.

For every precision, the same backbone (same weights) extracts the same prepared images;
the table gives per layer the relative L2 drift of the features against float32 compute,
the drift of float16 *storage* alone for scale, and the val/test accuracy of the same
logistic-regression head trained on each precision's features.

    KERAS_BACKEND=jax python bench/precision_bench.py --size 32 --limit 1000
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import keras
import numpy as np
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from pipeline.backbones.registry import get_backbone
from pipeline.data.ingest import prepare
from pipeline.data.prepared import load_split
from pipeline.features.extractor import build_extractor
from pipeline.features.forward import Forward
from pipeline.project.layout import SPLITS, Layout
from pipeline.project.params import DataConfig
from pipeline.selection.scoring import score

PRECISIONS = ("float32", "mixed_bfloat16", "mixed_float16")


def rel_l2(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm(a.astype(np.float64) - b) / np.linalg.norm(b))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--backbone", default="vgg16")
    ap.add_argument("--weights", default="random")
    ap.add_argument("--size", type=int, default=32)
    ap.add_argument("--limit", type=int, default=1000)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--layers", default="block2_pool:avg,block5_pool:avg")
    args = ap.parse_args()
    layers = dict(item.split(":") for item in args.layers.split(","))
    layout = Layout(Path(tempfile.mkdtemp()))
    prepare(DataConfig(source="digits", image_size=args.size, limit=args.limit), layout)
    backbone = get_backbone(args.backbone).record(args.weights, args.size, layers)
    images, labels = {}, {}
    for split in SPLITS:
        rows, labels[split] = load_split(split, layout=layout)
        images[split] = np.asarray(rows)

    features: dict[str, dict[str, dict[str, np.ndarray]]] = {}
    speed: dict[str, float] = {}
    for precision in PRECISIONS:
        keras.mixed_precision.set_dtype_policy(precision)
        model, weights = build_extractor(backbone)
        forward = Forward(model, args.batch_size)
        forward.run(images["val"][: args.batch_size])  # compile
        start = time.perf_counter()
        outs = {split: forward.run(images[split]) for split in SPLITS}
        n = sum(len(images[s]) for s in SPLITS)
        speed[precision] = n / (time.perf_counter() - start)
        features[precision] = {s: dict(zip(layers, outs[s])) for s in SPLITS}
    keras.mixed_precision.set_dtype_policy("float32")

    print(
        f"{args.backbone} ({weights} weights), {args.size}x{args.size}, digits, "
        f"{sum(len(v) for v in labels.values())} images, backend {keras.backend.backend()}"
    )
    print(
        "| layer | compute | images/s | drift vs float32 | float16 storage drift | val acc | test acc |"
    )
    print("|---|---|---|---|---|---|---|")
    for layer in layers:
        ref = features["float32"]
        for precision in PRECISIONS:
            f = features[precision]
            drift = rel_l2(
                np.concatenate([f[s][layer] for s in SPLITS]),
                np.concatenate([ref[s][layer] for s in SPLITS]),
            )
            stored = np.concatenate([ref[s][layer] for s in SPLITS])
            storage = rel_l2(stored.astype(np.float16).astype(np.float32), stored)
            head = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000))
            head.fit(f["train"][layer], labels["train"])
            val, test = (
                score(labels[s], head.predict(f[s][layer]), 10).accuracy for s in ("val", "test")
            )
            print(
                f"| {layer} | {precision} | {speed[precision]:.0f} | {drift:.3%} | {storage:.3%} | {val:.3f} | {test:.3f} |"
            )


if __name__ == "__main__":
    main()
