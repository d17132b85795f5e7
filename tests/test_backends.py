"""The same extraction on every installed Keras backend, and data-parallel over JAX devices."""

import functools
import importlib.util
import os
import shutil
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
import yaml

BACKENDS = [b for b in ("tensorflow", "jax", "torch") if importlib.util.find_spec(b)]
REPO = Path(__file__).resolve().parents[1]
LAYERS = {"block2_pool": "avg", "block5_pool": "grid2"}


def run(cwd: Path, module: str, **env) -> str:
    full_env = {**os.environ, "PYTHONPATH": str(REPO), "TF_CPP_MIN_LOG_LEVEL": "2", **env}
    proc = subprocess.run(
        [sys.executable, "-m", module], cwd=cwd, env=full_env, capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Path:
    """Prepared digits at 32 px and a VGG16 weights file shared by every backend."""
    root = tmp_path_factory.mktemp("backends")
    weights = root / "vgg16.weights.h5"
    script = (
        "import sys; from pipeline.backbones.keras_apps import build; "
        "build('VGG16', None, False, 32).save_weights(sys.argv[1])"
    )
    subprocess.run(
        [sys.executable, "-c", script, str(weights)],
        check=True,
        capture_output=True,
        env={**os.environ, "PYTHONPATH": str(REPO), "KERAS_BACKEND": "tensorflow"},
    )
    params = {
        "data": {"source": "digits", "image_size": 32, "limit": 60},
        "backbone": {"name": "vgg16", "weights": str(weights)},
        "extract": {"layers": LAYERS, "batch_size": 8},
        "train": {"layers": list(LAYERS)},
    }
    (root / "params.yaml").write_text(yaml.safe_dump(params))
    run(root, "pipeline.scan")
    run(root, "pipeline.prepare")
    return root


@functools.cache
def extract(project: Path, name: str, **env) -> tuple[dict[str, np.ndarray], str]:
    """val features and the CLI's output, extracted in a copy of `project` named `name`."""
    work = project / name
    work.mkdir()
    shutil.copy(project / "params.yaml", work)
    shutil.copytree(project / "data", work / "data")
    out = run(work, "pipeline.extract", **env)
    with h5py.File(work / "features" / "val.h5") as f:
        return {layer: f["features"][layer][:].astype(np.float32) for layer in LAYERS}, out


def rel(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def test_every_installed_backend_extracts_the_same_features(project):
    assert "tensorflow" in BACKENDS
    results = {b: extract(project, b, KERAS_BACKEND=b)[0] for b in BACKENDS}
    for backend, features in results.items():
        for layer in LAYERS:
            assert rel(features[layer], results["tensorflow"][layer]) < 2e-3, (backend, layer)


@pytest.mark.skipif("jax" not in BACKENDS, reason="JAX not installed")
def test_jax_data_parallel_over_two_devices_matches_one(project):
    one, out_one = extract(project, "jax", KERAS_BACKEND="jax")
    two, out_two = extract(
        project, "jax2", KERAS_BACKEND="jax", XLA_FLAGS="--xla_force_host_platform_device_count=2"
    )
    assert "devices: 1" in out_one and "devices: 2" in out_two
    for layer in LAYERS:
        assert rel(two[layer], one[layer]) < 1e-3
