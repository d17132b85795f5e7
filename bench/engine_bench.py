"""The ray engine against the local one on the same images, on this host: wall time of the
extract stage and peak memory of its whole process tree (with Ray: the driver, Ray's GCS,
raylet and workers; shared object-store pages count in each process that maps them).

For each image count (--images, then 5x that) it writes a folder of JPEG photos (noise
around one colour per class, --photo-side px), runs the project's `scan` and `prepare`
once per data.prepared form (arrays: decoded in prepare; manifest: decoded by extract), then
`python -m pipeline.extract` with each engine, and prints one table row per run.

    python bench/engine_bench.py --images 600 --size 32
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import psutil
import yaml
from PIL import Image

REPO = Path(__file__).resolve().parents[1]


def photos(root: Path, n: int, side: int) -> Path:
    rng = np.random.default_rng(0)
    for c, colour in enumerate([(200, 40, 40), (40, 60, 200)]):
        (root / f"class{c}").mkdir(parents=True)
        for i in range(n // 2):
            pixels = np.clip(np.array(colour) + rng.normal(0, 40, (side, side, 3)), 0, 255)
            Image.fromarray(pixels.astype(np.uint8)).save(root / f"class{c}" / f"{i:05d}.jpg")
    return root


def tree_rss(proc: psutil.Process) -> int:
    total = 0
    for p in [proc, *proc.children(recursive=True)]:
        try:
            total += p.memory_info().rss
        except psutil.Error:
            continue
    return total


def timed(cwd: Path, *cmd: str) -> tuple[float, int]:
    """(seconds, peak RSS of the process tree in bytes), sampled every 50 ms."""
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    watched, peak, done = psutil.Process(proc.pid), 0, threading.Event()

    def sample() -> None:
        nonlocal peak
        while not done.is_set():
            peak = max(peak, tree_rss(watched))
            time.sleep(0.05)

    sampler = threading.Thread(target=sample)
    sampler.start()
    output = proc.communicate()[0].decode()
    seconds = time.perf_counter() - start
    done.set()
    sampler.join()
    if proc.returncode:
        sys.exit(f"{' '.join(cmd)} failed:\n{output[-3000:]}")
    return seconds, peak


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=600)
    parser.add_argument("--size", type=int, default=32, help="data.image_size")
    parser.add_argument("--photo-side", type=int, default=96)
    parser.add_argument("--batch-size", type=int, default=32)
    args = parser.parse_args()
    python = sys.executable
    print("| images | data.prepared | engine | extract s | images/s | peak memory MB |")
    print("|---:|---|---|---:|---:|---:|")
    for n in (args.images, 5 * args.images):
        with tempfile.TemporaryDirectory() as tmp:
            root = Path(tmp)
            source = photos(root / "photos", n, args.photo_side)
            shutil.copytree(REPO / "pipeline", root / "pipeline")
            params = yaml.safe_load((REPO / "params.yaml").read_text())
            params["data"].update(source="folder", path=str(source), image_size=args.size)
            params["data"].update(limit=None)
            params["backbone"]["weights"] = "random"
            params["extract"].update(layers={"block5_pool": "avg"}, batch_size=args.batch_size)
            for prepared in ("arrays", "manifest"):
                params["data"]["prepared"] = prepared
                for engine in ("local", "ray"):
                    params["extract"]["engine"] = engine
                    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
                    for stage in ("scan", "prepare"):
                        timed(root, python, "-m", f"pipeline.{stage}")
                    shutil.rmtree(root / "features", ignore_errors=True)
                    shutil.rmtree(root / ".cache", ignore_errors=True)
                    seconds, peak = timed(root, python, "-m", "pipeline.extract")
                    print(
                        f"| {n} | {prepared} | {engine} | {seconds:.1f} | {n / seconds:.0f} | "
                        f"{peak / 2**20:.0f} |",
                        flush=True,
                    )


if __name__ == "__main__":
    main()
