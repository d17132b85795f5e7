"""Decoding speed of prepare on real JPEG photographs of at least one megapixel.

The photo is scikit-image's `retina.jpg` (1411x1411, 2.0 MP; install scikit-image beside the
project, or give the file with --photo), copied --images times. Rows: plain PIL (open, RGB, resize) on one thread; the
project's `data.decode_file` (JPEG draft mode, then the same resize) on one thread; and the
project's threaded decoding (`preparation.decode_split`) on 1, 2, ... every core. Each row prints
images/s and images/s per thread.

    python bench/decode_bench.py --images 200 --size 224
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from pipeline.data.decoding import decode_file
from pipeline.data.ingest import decode_split
from pipeline.data.sources import Split
from pipeline.project.params import DataConfig


def photo(path: Path | None) -> Path:
    if path is None:
        import skimage

        path = Path(skimage.__file__).parent / "data" / "retina.jpg"
    with Image.open(path) as img:
        assert img.format == "JPEG" and img.size[0] * img.size[1] >= 1_000_000, img.size
    return path


def plain_pil(path: Path, size: int) -> np.ndarray:
    with Image.open(path) as img:
        return np.asarray(img.convert("RGB").resize((size, size), Image.BILINEAR))


def rate(work, files: list[Path]) -> float:
    work(files[0])  # warm the file cache and PIL's plugins
    start = time.perf_counter()
    for f in files:
        work(f)
    return len(files) / (time.perf_counter() - start)


def threaded_rate(files: list[Path], size: int, workers: int) -> float:
    split = Split(labels=np.zeros(len(files), np.int64), paths=files, ids=[f.name for f in files])
    cfg = DataConfig(image_size=size, decode_workers=workers)
    start = time.perf_counter()
    for _ in decode_split(f"{workers} threads", split, cfg):
        pass
    return len(files) / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=200)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--photo", type=Path, help="a JPEG of at least one megapixel")
    args = parser.parse_args()
    cores = len(os.sched_getaffinity(0))
    source = photo(args.photo)
    with tempfile.TemporaryDirectory() as tmp:
        files = [Path(tmp) / f"{i:05d}.jpg" for i in range(args.images)]
        for f in files:
            shutil.copy(source, f)
        rows = [
            ("plain PIL, 1 thread", 1, rate(lambda f: plain_pil(f, args.size), files)),
            (
                "project decode_file (draft), 1 thread",
                1,
                rate(lambda f: decode_file(f, args.size, "bilinear"), files),
            ),
        ]
        for workers in sorted({1, 2, cores}):
            speed = threaded_rate(files, args.size, workers)
            rows.append((f"project decode_split, {workers} threads", workers, speed))
    with Image.open(source) as img:
        side = "x".join(map(str, img.size))
    print(f"\n{args.images} x {source.name} ({side} JPEG) -> {args.size} px, {cores} cores\n")
    print("| row | images/s | per thread |")
    print("|---|---:|---:|")
    for name, workers, r in rows:
        print(f"| {name} | {r:.1f} | {r / workers:.1f} |")


if __name__ == "__main__":
    main()
