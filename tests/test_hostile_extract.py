"""Hostile and careless extract params and inputs (issue 21): no hang, no traceback, no Ray
process left behind. Each case runs the real `extract` stage on a small prepared project; the
Ray cases on the local cluster (this machine's 2 CPUs), with deadlines of a few seconds."""

from __future__ import annotations

import importlib.util
import os
import re
import resource
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
from conftest import Project, _make_image_folder, subprocess_env

from pipeline.project.params import MAX_BATCH, ConfigError

needs_ray = pytest.mark.skipif(importlib.util.find_spec("ray") is None, reason="needs ray")


def prepared_project(root: Path, **sections) -> Project:
    project = Project(root)
    root.mkdir(parents=True, exist_ok=True)
    project.write_params(**sections)
    for stage in ("scan", "prepare"):
        project.run(stage)
    return project


@pytest.fixture(scope="module")
def digits_template(tmp_path_factory) -> Project:
    return prepared_project(tmp_path_factory.mktemp("digits") / "project")


@pytest.fixture(scope="module")
def manifest_template(tmp_path_factory) -> Project:
    """A folder source prepared as a manifest: extract decodes the listed files. The folder
    lies inside the project (data.path relative), so that a copy of it is self-contained."""
    root = tmp_path_factory.mktemp("manifest") / "project"
    _make_image_folder(root / "photos", {"a": 6, "b": 6})
    data = {"source": "folder", "path": "photos", "limit": None, "prepared": "manifest"}
    return prepared_project(root, data=data)


def copy(template: Project, root: Path, **extract) -> Project:
    """A copy of a prepared project with `extract` params merged in (scan's and prepare's
    records stay current: they do not depend on these)."""
    shutil.copytree(template.root, root, symlinks=True)
    project = Project(root)
    project.write_params(data=template.params["data"], extract=extract)
    return project


def run_extract(
    project: Project, timeout: float, **env
) -> tuple[subprocess.CompletedProcess, float]:
    start = time.monotonic()
    result = project.run("extract", check=False, timeout=timeout, env={"TQDM_DISABLE": "1", **env})
    return result, time.monotonic() - start


def one_line(result: subprocess.CompletedProcess) -> str:
    """The stage's one error line (and nothing else on stderr, no traceback)."""
    assert result.returncode == 1, (result.returncode, result.stdout, result.stderr)
    assert "Traceback" not in result.stderr, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("extract: "), result.stderr
    return lines[0]


# ---------------------------------------------------------------- case 12: an address that is none


@needs_ray
def test_a_ray_address_that_is_no_address_is_one_line(digits_template, tmp_path):
    project = copy(
        digits_template, tmp_path / "p", engine="ray", ray={"address": "garbage address"}
    )
    result, _ = run_extract(project, timeout=120)
    line = one_line(result)
    assert "extract.ray.address 'garbage address' is not a Ray address" in line
    assert "host:port" in line and "null" in line


@pytest.mark.parametrize(
    "address", ["10.0.0.5:6379", "localhost:1", "ray://head:10001", "[::1]:6379"]
)
def test_ray_addresses_of_every_form_are_accepted(address):
    from pipeline.features.ray_engine import _host_port

    host, port = _host_port(address)
    assert address.endswith(f":{port}") and host.strip("[]") in address


@pytest.mark.parametrize(
    "address", ["garbage address", "host:notaport", "host:0", "host:70000", ""]
)
def test_ray_addresses_of_no_form_are_refused(address):
    from pipeline.features.ray_engine import _host_port

    with pytest.raises(ConfigError, match="is not a Ray address"):
        _host_port(address)


# ---------------------------------------------------------------- case 6: nobody at the address


@pytest.fixture
def silent_port():
    """A port that accepts connections and never answers (not a Ray cluster)."""
    server = socket.create_server(("0.0.0.0", 0))
    held: list[socket.socket] = []

    def accept() -> None:
        while True:
            try:
                held.append(server.accept()[0])
            except OSError:
                return

    threading.Thread(target=accept, daemon=True).start()
    yield server.getsockname()[1]
    server.close()
    for connection in held:
        connection.close()


@needs_ray
@pytest.mark.parametrize("where", ["refused", "silent"])
def test_a_ray_address_nobody_answers_at_is_one_line_within_its_deadline(
    digits_template, tmp_path, where, request
):
    address = (
        "localhost:1"
        if where == "refused"
        else f"localhost:{request.getfixturevalue('silent_port')}"
    )
    ray = {"address": address, "timeout_s": 3}
    project = copy(digits_template, tmp_path / "p", engine="ray", ray=ray)
    result, took = run_extract(project, timeout=120)
    line = one_line(result)
    assert f"extract.ray.address {address!r}" in line and "timeout_s=3" in line, line
    assert "null" in line  # what to change
    assert took < 60, f"{took:.0f} s for a deadline of 3 s"


# ---------------------------------------------------------------- case 7: more than the cluster has


@needs_ray
@pytest.mark.parametrize(
    "ray, lacking",
    [
        ({"gpus_per_actor": 64}, r"needs \d+ CPUs and 64 GPUs .* has \d+ CPUs and \d+ GPUs"),
        # as many actors as CPUs: none is left for the tasks that read the images
        ({"actors": os.cpu_count()}, rf"needs {os.cpu_count() + 1} CPUs and 0 GPUs"),
    ],
    ids=["GPUs", "CPUs"],
)
def test_actors_the_cluster_cannot_hold_are_refused_before_any_wait(
    digits_template, tmp_path, ray, lacking
):
    """With the default deadline (60 s): refused on what the cluster has, not by waiting."""
    project = copy(digits_template, tmp_path / "p", engine="ray", ray=ray)
    result, took = run_extract(project, timeout=120)
    line = one_line(result)
    assert re.search(lacking, line) and "extract.ray.actors" in line, line
    assert took < 60, f"{took:.0f} s: waited for the deadline rather than checking"


@needs_ray
def test_actors_that_do_not_start_within_the_deadline_are_one_line(digits_template, tmp_path):
    """An actor starts a worker and builds the backbone: more than a second on any machine."""
    project = copy(digits_template, tmp_path / "p", engine="ray", ray={"timeout_s": 1})
    result, _ = run_extract(project, timeout=120)
    line = one_line(result)
    assert "did not start within extract.ray.timeout_s=1 s" in line, line


def ray_processes(process) -> dict:
    import psutil

    found = {}
    with_children = [process]
    try:
        with_children += process.children(recursive=True)
    except psutil.Error:
        pass
    for child in with_children[1:]:
        try:
            found[child.pid] = (child, child.name())
        except psutil.Error:
            continue
    return found


@needs_ray
@pytest.mark.parametrize("kind", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_an_extract_killed_while_ray_starts_leaves_no_ray_process(digits_template, tmp_path, kind):
    """What dvc sends on Ctrl-C, while ray.init is starting the cluster's processes: within
    seconds the stage and every process Ray started are gone."""
    import psutil

    project = copy(digits_template, tmp_path / "p", engine="ray")
    stage = project.popen("extract", env={"TQDM_DISABLE": "1"})
    process, seen = psutil.Process(stage.pid), {}
    try:
        deadline = time.monotonic() + 120
        while not any(name == "raylet" for _, name in seen.values()):
            assert stage.poll() is None and time.monotonic() < deadline, "no raylet started"
            seen.update(ray_processes(process))
            time.sleep(0.05)
        stage.send_signal(kind)
        killed = time.monotonic()
        alive = list(seen.values())
        while time.monotonic() - killed < 10 and (stage.poll() is None or alive):
            if stage.poll() is None:
                seen.update(ray_processes(process))
            alive = [
                name
                for child, name in seen.values()
                if child.is_running() and child.status() != psutil.STATUS_ZOMBIE
            ]
            time.sleep(0.2)
        assert stage.poll() is not None, "the stage outlived its signal by 10 s"
        assert not alive, f"Ray processes 10 s after {kind.name}: {alive}"
    finally:
        stage.kill()
        stage.communicate()
        for child, _ in seen.values():
            if child.is_running():
                child.kill()


# ---------------------------------------------------------------- case 9: a listed file gone


@pytest.mark.parametrize("engine", ["local", pytest.param("ray", marks=needs_ray)])
def test_a_listed_file_removed_after_prepare_is_one_line(manifest_template, tmp_path, engine):
    project = copy(manifest_template, tmp_path / "p", engine=engine)
    listing = (project.prepared / "train_files.txt").read_text().splitlines()
    name = listing[len(listing) // 2].split("  ", 1)[1]
    (project.root / "photos" / name).unlink()
    result, _ = run_extract(project, timeout=180)
    line = one_line(result)
    assert f"{name}: No such file or directory" in line, line
    assert "dvc repro prepare" in line


# ---------------------------------------------------------------- case 15: a batch beyond memory


def limited_memory(limit: int = 8 << 30) -> None:
    """The stage's address space bounded, so that an unbounded batch fails rather than
    taking this machine's memory."""
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))


def features(project: Project) -> dict[str, np.ndarray]:
    out = {}
    for split in ("train", "val", "test"):
        with h5py.File(project.features / f"{split}.h5") as f:
            out.update({f"{split}/{k}": f["features"][k][:] for k in f["features"]})
    return out


def test_a_batch_beyond_memory_mb_is_clipped_and_said(digits_template, tmp_path):
    """MAX_BATCH images of 32 px pad VGG16's first block to 64 K x 32 x 32 x 64 floats
    (17 GB, past int32 elements): clipped to memory_mb, the features those of a small batch."""
    small = copy(digits_template, tmp_path / "small")
    small.run("extract", env={"TQDM_DISABLE": "1"})
    project = copy(digits_template, tmp_path / "big", batch_size=MAX_BATCH, memory_mb=64)
    result = subprocess.run(
        [sys.executable, "-m", "pipeline.extract"],
        cwd=project.root,
        env=subprocess_env(TQDM_DISABLE="1", CUDA_VISIBLE_DEVICES=""),
        capture_output=True,
        text=True,
        timeout=300,
        preexec_fn=limited_memory,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    clipped = re.search(rf"extract.batch_size {MAX_BATCH} runs as batches of (\d+)", result.stdout)
    assert clipped and "extract.memory_mb is 64" in result.stdout, result.stdout
    assert 1 <= int(clipped[1]) < MAX_BATCH
    want = features(small)
    got = features(project)
    assert got.keys() == want.keys()
    for key, value in want.items():
        np.testing.assert_allclose(got[key], value, rtol=1e-5, atol=1e-6, err_msg=key)
