"""Synthetic features files (through the store's own writer) for tests and benchmarks."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from pipeline.store import SPLITS, ChunkWriter


def write_features(
    directory: str | Path,
    widths: dict[str, int],
    rows: dict[str, int],
    n_classes: int = 4,
    separation: float = 1.0,
    seed: int = 0,
    sort_train: bool = False,
    block_rows: int = 2048,
    **fingerprint,
) -> dict:
    """Write features/{train,val,test}.h5: Gaussian classes in a 16-dim latent space, spread
    over each layer's width by a random map, plus unit noise. `fingerprint` overrides the
    default fingerprint entries; returns the fingerprint written."""
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(n_classes, 16)) * separation
    maps = {layer: rng.normal(size=(16, w)).astype(np.float32) / 4 for layer, w in widths.items()}
    fp = {
        "backbone": "vgg16",
        "weights": "random",
        "input_size": 32,
        "preprocessing": "synthetic",
        "layers": {layer: "avg" for layer in widths},
        "precision": "float32",
        "storage_dtype": "float16",
        "data_sha256": f"synthetic-{seed}",
        "versions": {},
        **fingerprint,
    }
    for split in SPLITS:
        n = rows[split]
        labels = rng.integers(0, n_classes, n)
        if split == "train" and sort_train:
            labels = np.sort(labels)
        scratch = Path(directory) / ".scratch" / split
        writer = ChunkWriter(scratch, widths, fp["storage_dtype"], block_rows)
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
            "fingerprint": fp,
        }
        writer.finalize(Path(directory) / f"{split}.h5", n, labels, attrs)
    return fp
