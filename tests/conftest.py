"""Shared fixtures: a small project directory with its own params.yaml, offline Keras, images.

Everything here is small on purpose (32x32 images, tens of images, random weights): the
whole suite runs on a 2-core CPU without internet.

- `project`: a fresh project dir in tmp_path (cwd switched there) with a small params.yaml;
  `project.write_params(section={...})` merges overrides, `project.run("extract")` runs a
  stage CLI in a subprocess, `project.main("prepare")` runs it in this process.
- `offline`: Keras's downloads fail as they do without internet, whatever the network, and
  Keras's cache (~/.keras) is an empty temporary folder; returns that folder.
- `make_image_folder`: writes class folders of small images (flat or train/val/test).
- `rng_images`: deterministic random uint8 images.
- `dvc_repo(root, params)`: a git + DVC repository with this checkout's pipeline/, dvc.yaml and
  the given params.yaml; `sh(cwd, ...)` runs a command there, `ran(output)` lists the stages
  DVC ran.
"""

from __future__ import annotations

import copy
import csv
import os
import re
import runpy
import shutil
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
import yaml

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

REPO = Path(__file__).resolve().parents[1]
# Layer facts of the backbones (built once per Keras version), shared by every test and the
# stages they run, outside the user's own cache.
os.environ.setdefault("LAYERWISE_CACHE", str(REPO / ".cache" / "layer-facts"))
if str(REPO) not in sys.path:  # the package need not be installed to run the tests
    sys.path.insert(0, str(REPO))

# The files that take minutes, longest first. Workers get whole files in this order
# (pyproject: --dist loadfile --no-loadscope-reorder), so that none starts a long one last.
LONGEST_FIRST = [
    "test_every_backbone.py",
    "test_pipeline_dvc.py",
    "test_reuse_dvc.py",
    "test_engines.py",
    "test_families_dvc.py",
    "test_cli.py",
    "test_hub.py",
    "test_provenance.py",
    "test_backends.py",
]


def pytest_collection_modifyitems(items):
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))


SMALL_PARAMS = {
    "data": {
        "source": "digits",
        "image_size": 32,
        "limit": 60,
        "val_fraction": 0.2,
        "test_fraction": 0.2,
        "seed": 0,
        "on_bad_image": "skip",
    },
    "backbone": {"name": "vgg16", "weights": "random"},
    "extract": {
        "layers": {"block2_pool": "avg", "block5_pool": "avg"},
        "batch_size": 16,
        "storage_dtype": "float32",
        "precision": "float32",
    },
    "train": {"layers": ["block2_pool", "block5_pool"], "heads": ["logreg"]},
}


def deep_merge(base: dict, override: dict) -> dict:
    """`base` updated by `override`, recursively for mappings.

    A mapping that must be replaced wholesale (e.g. extract.layers) goes through `replace=`
    in Project.write_params, since merging would keep the old entries.
    """
    out = copy.deepcopy(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def subprocess_env(**extra: str) -> dict:
    """Environment for a stage CLI run in a subprocess: the repo importable, TF quiet."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    env.update(extra)
    return env


def with_params(base: dict, sections: dict, replace: dict | None = None) -> dict:
    """`base` merged with `sections`; `replace` sets whole keys by dotted name."""
    params = deep_merge(base, sections)
    for dotted, value in (replace or {}).items():
        *parents, last = dotted.split(".")
        node = params
        for part in parents:
            node = node.setdefault(part, {})
        node[last] = copy.deepcopy(value)
    return params


def leaderboard(root: Path) -> list[dict]:
    """The rows of the project's reports/leaderboard.csv, as select wrote them."""
    from pipeline.project.layout import Layout

    with Layout(root).leaderboard_csv.open() as f:
        return list(csv.DictReader(f))


class Project:
    """A project directory: params.yaml, data/prepared/, features/, .cache/extract/."""

    def __init__(self, root: Path):
        self.root = Path(root)
        self.params: dict = {}

    def write_params(self, replace: dict | None = None, **sections: dict) -> dict:
        """Write params.yaml: SMALL_PARAMS merged with `sections`; `replace` sets whole keys.

        e.g. write_params(data={"limit": 100}, replace={"extract.layers": {"block1_pool": "max"}})
        """
        params = with_params(SMALL_PARAMS, sections, replace)
        self.params = params
        (self.root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
        return params

    def run(
        self,
        stage: str,
        env: dict | None = None,
        check: bool = True,
        timeout: float = 300,
        args: list[str] = (),
    ):
        """`python -m pipeline.<stage> [args]` in this directory; returns the CompletedProcess."""
        result = subprocess.run(
            [sys.executable, "-m", f"pipeline.{stage}", *args],
            cwd=self.root,
            env=subprocess_env(**(env or {})),
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
        if check and result.returncode != 0:
            raise AssertionError(
                f"pipeline.{stage} exited {result.returncode}\n"
                f"stdout:\n{result.stdout[-3000:]}\nstderr:\n{result.stderr[-3000:]}"
            )
        return result

    def popen(self, stage: str, env: dict | None = None) -> subprocess.Popen:
        return subprocess.Popen(
            [sys.executable, "-m", f"pipeline.{stage}"],
            cwd=self.root,
            env=subprocess_env(**(env or {})),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )

    def main(self, stage: str, *args: str) -> None:
        """Run a stage as its command line does, in this process (cwd must be self.root: the
        fixture does it); an error the user can fix exits with SystemExit."""
        assert Path.cwd() == self.root, "chdir into the project first"
        argv = sys.argv
        sys.argv = [stage, *args]
        try:
            runpy.run_module(f"pipeline.{stage}", run_name="__main__", alter_sys=False)
        finally:
            sys.argv = argv

    @property
    def layout(self):
        from pipeline.project.layout import Layout

        return Layout(self.root)

    @property
    def prepared(self) -> Path:
        return self.layout.prepared

    @property
    def features(self) -> Path:
        return self.layout.features

    @property
    def scratch(self) -> Path:
        return self.layout.extract_scratch


@pytest.fixture
def project(tmp_path, monkeypatch) -> Project:
    """A fresh project dir with the small params.yaml, and the cwd switched into it."""
    root = tmp_path / "project"
    root.mkdir()
    monkeypatch.chdir(root)
    p = Project(root)
    p.write_params()
    return p


@pytest.fixture
def offline(tmp_path, monkeypatch) -> Path:
    """Keras downloads fail as they do offline; Keras's cache dir is an empty temp folder.

    Only the network call is replaced (urllib's urlretrieve inside keras.utils.get_file), so
    the cache lookup, hash check and error handling are Keras's own. Returns the cache dir,
    where a test may pre-place files under models/ or datasets/.
    """
    import urllib.error

    from keras.src.backend import config as keras_config
    from keras.src.utils import file_utils

    home = tmp_path / "keras_home"
    home.mkdir()
    monkeypatch.setattr(keras_config, "_KERAS_DIR", str(home))
    monkeypatch.setenv("KERAS_HOME", str(home))  # for subprocesses

    def no_network(url, *args, **kwargs):
        raise urllib.error.URLError(f"no network in tests (would fetch {url})")

    monkeypatch.setattr(file_utils, "urlretrieve", no_network)
    return home


@pytest.fixture
def small_chunks(monkeypatch):
    """Scratch chunks of one batch each, so even tiny extractions write several chunks."""
    from pipeline.features import store

    monkeypatch.setattr(store, "TARGET_CHUNK_BYTES", 1)


def rng_images(n: int, size: int = 32, seed: int = 0) -> np.ndarray:
    """Deterministic random uint8 RGB images (n, size, size, 3), smooth enough to look natural."""
    rng = np.random.default_rng(seed)
    coarse = rng.integers(0, 256, (n, max(2, size // 4), max(2, size // 4), 3)).astype(np.float32)
    reps = -(-size // coarse.shape[1])
    up = np.repeat(np.repeat(coarse, reps, axis=1), reps, axis=2)[:, :size, :size]
    noise = rng.normal(0, 12, up.shape)
    return np.clip(up + noise, 0, 255).astype(np.uint8)


@pytest.fixture(name="rng_images")
def rng_images_fixture():
    return rng_images


def write_image(path: Path, mode: str = "RGB", size: int = 16, fmt: str | None = None) -> Path:
    """Write one small random image in PIL `mode` to `path` (format from the suffix or `fmt`)."""
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(zlib.crc32(str(path).encode()))
    rgb = Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8), "RGB")
    if mode == "I;16":
        img = Image.fromarray(np.asarray(rgb.convert("L"), np.uint16) * 257)  # 16-bit grey
    else:
        img = rgb.convert(mode)
    img.save(path, format=fmt)
    return path


def _make_image_folder(
    root: Path,
    classes: dict[str, int] | None = None,
    layout: str = "flat",
    splits: dict[str, dict[str, int]] | None = None,
    suffix: str = ".png",
) -> Path:
    """Class folders of small RGB images under `root`.

    layout "flat": root/<class>/img_<i><suffix>, counts from `classes`.
    layout "split": root/<split>/<class>/..., counts from `splits` ({"train": {"a": 10}, ...});
    split folder names are used as given (e.g. "validation").
    """
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    if layout == "flat":
        for name, count in ({"a": 10, "b": 10} if classes is None else classes).items():
            (root / name).mkdir(parents=True, exist_ok=True)
            for i in range(count):
                write_image(root / name / f"{name}_{i:03d}{suffix}")
    else:
        for split, per_class in (splits or {}).items():
            for name, count in per_class.items():
                (root / split / name).mkdir(parents=True, exist_ok=True)
                for i in range(count):
                    write_image(root / split / name / f"{split}_{name}_{i:03d}{suffix}")
    return root


@pytest.fixture(name="make_image_folder")
def make_image_folder_fixture():
    return _make_image_folder


# ---------------------------------------------------------------- independent references

VGG_BGR_MEAN = np.array([103.939, 116.779, 123.68], np.float32)


def vgg_preprocess(images: np.ndarray) -> np.ndarray:
    """VGG ("caffe") preprocessing written out in numpy: RGB->BGR, minus the ImageNet mean."""
    return images.astype(np.float32)[..., ::-1] - VGG_BGR_MEAN


def adaptive_bins(length: int, n: int) -> list[tuple[int, int]]:
    """Adaptive average pooling windows (as torch.nn.AdaptiveAvgPool2d): floor start, ceil end."""
    return [(int(np.floor(i * length / n)), int(np.ceil((i + 1) * length / n))) for i in range(n)]


def numpy_reduce(x: np.ndarray, mode: str) -> np.ndarray:
    """Reference reduction of (n, h, w, c) maps or (n, d) vectors: none | avg | max | gridN."""
    x = np.asarray(x, np.float64)
    if x.ndim == 2 or mode == "none":
        return x.reshape(len(x), -1)
    if mode == "avg":
        return x.mean(axis=(1, 2))
    if mode == "max":
        return x.max(axis=(1, 2))
    n = int(mode[4:])
    cells = [
        x[:, r0:r1, c0:c1, :].mean(axis=(1, 2))
        for r0, r1 in adaptive_bins(x.shape[1], n)
        for c0, c1 in adaptive_bins(x.shape[2], n)
    ]
    return np.concatenate(cells, axis=-1)


def separate_layer_features(
    backbone, images: np.ndarray, layers: dict[str, str], preprocess=vgg_preprocess
):
    """The tutorial way, as a reference: one single-output model per layer, float32 input
    preprocessed in numpy, reductions in numpy. Returns {layer: (n, width) float64}."""
    import keras

    x = preprocess(images)
    out = {}
    for layer, mode in layers.items():
        single = keras.Model(backbone.inputs, backbone.get_layer(layer).output)
        out[layer] = numpy_reduce(single.predict(x, batch_size=16, verbose=0), mode)
    return out


def relative_error(a: np.ndarray, b: np.ndarray) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def perturb_weights(model, seed: int) -> None:
    """Replace every weight with He-normal draws from `seed` (biases small): weights unlike
    the registry's `random` ones, so a test can tell which weights a model was built with."""
    rng = np.random.default_rng(seed)
    new = []
    for w in model.get_weights():
        if w.ndim > 1:
            fan_in = int(np.prod(w.shape[:-1]))
            new.append(rng.normal(0, np.sqrt(2.0 / fan_in), w.shape).astype(w.dtype))
        else:
            new.append(rng.normal(0, 0.05, w.shape).astype(w.dtype))
    model.set_weights(new)


# ---------------------------------------------------------------- DVC repositories


def sh(cwd: Path, *args: str, check: bool = True) -> str:
    """Run a command (DVC, git, a stage) in `cwd`; return stdout + stderr."""
    env = {
        **os.environ,
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
        "TF_CPP_MIN_LOG_LEVEL": "2",
        "DVC_NO_ANALYTICS": "1",
    }
    env.pop("PYTHONPATH", None)  # the repository's own copy of pipeline/ is the code that runs
    proc = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True)
    output = proc.stdout + proc.stderr
    if check:
        assert proc.returncode == 0, f"{' '.join(args)} failed:\n{output[-4000:]}"
    return output


def dvc(cwd: Path, *args: str, check: bool = True) -> str:
    return sh(cwd, sys.executable, "-m", "dvc", *args, check=check)


def ran(output: str) -> set[str]:
    """The stages DVC ran (not skipped, not restored from the run-cache)."""
    return set(re.findall(r"Running stage '([^']+)'", output))


def restored(output: str) -> set[str]:
    return set(re.findall(r"Stage '([^']+)' is cached - skipping run", output))


def dvc_repo(root: Path, params: dict, replace: dict | None = None) -> Path:
    """A git + DVC repository with pipeline/, dvc.yaml and params.yaml (this checkout's, merged
    with `params`, whole keys set by `replace`), committed."""
    root.mkdir(parents=True, exist_ok=True)
    shutil.copytree(
        REPO / "pipeline", root / "pipeline", ignore=shutil.ignore_patterns("__pycache__")
    )
    shutil.copy(REPO / "dvc.yaml", root)
    shutil.copy(REPO / ".gitignore", root)
    merged = with_params(yaml.safe_load((REPO / "params.yaml").read_text()), params, replace)
    (root / "params.yaml").write_text(yaml.safe_dump(merged, sort_keys=False))
    sh(root, "git", "init", "-q")
    sh(root, "git", "config", "user.email", "test@example.invalid")
    sh(root, "git", "config", "user.name", "test")
    dvc(root, "init", "-q")
    sh(root, "git", "add", "-A")
    sh(root, "git", "commit", "-qm", "init")
    return root


def sharing_features(root: Path, features_of: Path):
    """A Layout at `root` whose features/ is that of the project at `features_of` (a link):
    many tests train on one set of synthetic features, each into its own folders."""
    from pipeline.project.layout import Layout

    layout = Layout(Path(root))
    layout.root.mkdir(parents=True, exist_ok=True)
    if not layout.features.exists():
        layout.features.symlink_to(Layout(Path(features_of)).features.resolve())
    return layout


def resolved(name: str = "vgg16", layers="auto", size: int = 32, weights: str = "random"):
    """The backbone record scan writes for these params, from the real registry; `layers`: auto,
    layer -> reduction, or a list of layers (taken whole)."""
    from pipeline.backbones.registry import get_backbone

    if isinstance(layers, (list, tuple)):
        layers = dict.fromkeys(layers, "none")
    return get_backbone(name).record(weights, size, layers)
