"""Synthetic features files (through the store's own writer) for tests and benchmarks."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np

from pipeline.features.store import ChunkWriter
from pipeline.project.layout import SPLITS, Layout
from pipeline.project.records import Fingerprint


def synthetic_fingerprint(layers, seed: int = 0, **fields) -> Fingerprint:
    """The fingerprint of synthetic features of `layers`; `fields` override its fields."""
    extract = {
        "layers": {layer: "avg" for layer in layers},
        "batch_size": 32,
        "storage_dtype": "float16",
        "precision": "float32",
    }
    defaults = {
        "backbone": {"name": "vgg16", "weights": "random", "identity": "random"},
        "weights_used": "random",
        "extract": extract,
        "precision": "float32",
        "data": f"synthetic-{seed}",
        "image_size": 32,
        "code": "synthetic",
        "versions": {},
    }
    return Fingerprint(**{**defaults, **fields})


def write_features(
    root: str | Path,
    widths: dict[str, int],
    rows: dict[str, int],
    n_classes: int = 4,
    separation: float = 1.0,
    seed: int = 0,
    sort_train: bool = False,
    block_rows: int = 2048,
    **fingerprint,
) -> Fingerprint:
    """Write the features of the project at `root` (layout.features_file): Gaussian classes in
    a 16-dim latent space, spread over each layer's width by a random map, plus unit noise.
    `fingerprint` overrides the default fingerprint fields; returns the fingerprint written."""
    layout = Layout(Path(root))
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(n_classes, 16)) * separation
    maps = {layer: rng.normal(size=(16, w)).astype(np.float32) / 4 for layer, w in widths.items()}
    fp = synthetic_fingerprint(widths, seed, **fingerprint)
    for split in SPLITS:
        n = rows[split]
        labels = rng.integers(0, n_classes, n)
        if split == "train" and sort_train:
            labels = np.sort(labels)
        scratch = layout.features / ".scratch" / split
        writer = ChunkWriter(scratch, widths, fp.extract["storage_dtype"])
        for start in range(0, n, block_rows):
            y = labels[start : start + block_rows]
            z = centers[y] + rng.normal(size=(len(y), 16))
            writer.write(
                start,
                {
                    layer: z @ m + rng.standard_normal((len(y), m.shape[1]), np.float32)
                    for layer, m in maps.items()
                },
            )
        attrs = {
            "split": split,
            "class_names": [f"class_{i}" for i in range(n_classes)],
            "fingerprint": fp.model_dump(mode="json"),
        }
        writer.assemble(layout.features_file(split), n, labels, attrs)
    shutil.rmtree(layout.features / ".scratch", ignore_errors=True)
    return fp
