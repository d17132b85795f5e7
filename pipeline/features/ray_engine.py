"""Extraction on Ray Data (extract.engine: ray), for more images than one host reads and runs.

Each batch of images is one Ray row: CPU tasks read it from the prepared arrays, or decode
and check its files (data.prepared: manifest), an actor pool runs the backbone (one
compiled model per actor, on extract.ray.gpus_per_actor GPUs), and the outputs stream back in
order to this process, which writes them through the same stream and feature store as the
local engine: same batches, same model, same fingerprint and resume (the features equal the
local engine's to float rounding: a CPU actor may sum in another order).
"""

from __future__ import annotations

import logging
import os
import warnings
from collections.abc import Callable, Generator, Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from pipeline.data.arrays import NpyRows
from pipeline.data.prepared import FileRows, decode_listed
from pipeline.features.stream import Budget, run_stream
from pipeline.project.errors import InputError
from pipeline.project.params import ConfigError, ExtractConfig, RayConfig
from pipeline.project.records import BackboneRecord

PACKAGE = Path(__file__).resolve().parents[1]
MISSING = (
    "extract.engine: ray needs Ray Data, which is not installed: "
    "pip install 'layerwise[ray]', or set extract.engine: local"
)


@contextmanager
def ray_session(cfg: RayConfig, env: dict[str, str]):
    """Ray joined at cfg.address (None: started on this host, stopped on exit), with this
    package and `env` sent to every worker; Ray's own logs and progress bars kept quiet."""
    try:
        import ray
        import ray.data
    except ImportError:
        raise ConfigError(MISSING) from None
    started = not ray.is_initialized()
    if started:
        ray.init(
            address=cfg.address,
            runtime_env={"py_modules": [str(PACKAGE)], "env_vars": env},
            include_dashboard=False,
            log_to_driver=False,
            logging_level=logging.ERROR,
        )
    logging.getLogger("ray.data").setLevel(logging.ERROR)
    context = ray.data.DataContext.get_current()
    context.execution_options.preserve_order = True
    context.enable_progress_bars = False
    try:
        yield ray
    finally:
        if started:
            ray.shutdown()


class RayEngine:
    """The extract stream on Ray Data: `stream` has the local engine's signature. One
    dataset, so one actor pool, serves every split `plan` lists."""

    def __init__(
        self, backbone: BackboneRecord, cfg: ExtractConfig, precision: str, weights_used: str
    ):
        """Each actor builds the model this process built: `backbone`, with weights
        `weights_used`, at the `precision` extract.precision resolved to here."""
        self.model = (backbone, cfg, precision, weights_used)
        self.cfg = cfg
        self._jobs: list[tuple[object, range]] = []
        self._results: Generator[dict] | None = None

    def plan(self, jobs: list[tuple[object, range]]) -> None:
        """The (images, rows) that `stream` will be called with, in order."""
        self._jobs, self._results = list(jobs), None

    def stream(self, images, rows: range, write, budget: Budget, progress) -> None:
        if not self._jobs:  # not planned: a dataset of its own
            self.plan([(images, rows)])
        if self._results is None:
            self._results, self._next = self._run(self._jobs), 0
        job = self._next
        planned_images, planned_rows = self._jobs[job]
        if planned_images is not images or planned_rows != rows:
            raise RuntimeError("RayEngine.stream called with rows that plan did not list")
        try:
            run_stream(
                lambda i, j: (i, j),  # the cluster reads; this process only writes
                rows,
                lambda ranges: self._outputs(job, list(ranges)),
                write,
                budget,
                progress,
            )
        except BaseException:
            self._results.close()  # stops the dataset: Ray cannot shut down under it
            self.plan([])
            raise
        self._next += 1
        if self._next == len(self._jobs):
            self.plan([])

    def _outputs(self, job: int, ranges: list[tuple[int, int]]) -> Iterator[list[np.ndarray]]:
        for first, _ in ranges:
            row = next(self._results)
            if row["error"]:
                raise InputError(str(row["error"]))
            if (int(row["job"]), int(row["first"])) != (job, first):
                raise RuntimeError(
                    f"Ray returned rows {row['job']}:{row['first']}, expected {job}:{first}"
                )
            yield [row[f"out{k}"] for k in range(sum(key.startswith("out") for key in row))]

    def _run(self, jobs: list[tuple[object, range]]) -> Generator[dict]:
        import ray.data

        readers, items = [], []
        for job, (images, rows) in enumerate(jobs):
            read, job_items = _reader(images, [(i, min(i + rows.step, rows.stop)) for i in rows])
            readers.append(read)
            items.extend({"job": job, **item} for item in job_items)
        cfg = self.cfg.ray
        gpus = cfg.gpus_per_actor
        if gpus is None:
            gpus = 1 if ray.cluster_resources().get("GPU", 0) > 0 else 0
        limits = ray.data.DataContext.get_current().execution_options
        limits.resource_limits = limits.resource_limits.copy(
            object_store_memory=self.cfg.memory_mb * 2**20
        )
        with warnings.catch_warnings():  # max_restarts: a "deprecated" kwarg, still the way
            warnings.filterwarnings("ignore", "`ray_remote_args` is deprecated")
            dataset = (
                ray.data.from_items(items, override_num_blocks=max(1, len(items)))
                .map(lambda item: {"job": item["job"], **readers[item["job"]](item)}, num_cpus=1)
                .map_batches(
                    _actor(*self.model),
                    batch_size=1,
                    batch_format="numpy",
                    compute=ray.data.ActorPoolStrategy(size=cfg.actors),
                    num_gpus=gpus,
                    num_cpus=cfg.cpus_per_actor,
                    # a lost actor fails the run (which resumes from its chunks) rather than
                    # restarting, and Ray then does not log ray#53727's warning
                    max_restarts=0,
                )
            )
        return (row for row in dataset.iter_rows())


def _reader(images, ranges: list[tuple[int, int]]) -> tuple[Callable, list[dict]]:
    """The function a CPU task runs on one row, and the rows: a batch's first and stop, and
    for a manifest its files (so that no task is sent the whole listing). What the user can
    fix travels back as the row's `error`, so that the stage says it in one line."""
    if isinstance(images, NpyRows):
        path, shape = str(images.path), images.shape[1:]

        def read_arrays(item: dict) -> dict:
            first = item["first"]
            try:
                return {"first": first, "images": NpyRows(path)[first : item["stop"]], "error": ""}
            except OSError as exc:
                error = (
                    f"a Ray worker cannot read {path} ({exc.strerror or exc}): on a cluster, put "
                    "the project on a filesystem every node reads, or set data.prepared: "
                    "manifest (workers then read the files under data.path)"
                )
                return {"first": first, "images": np.zeros((0, *shape), np.uint8), "error": error}

        return read_arrays, [{"first": i, "stop": j} for i, j in ranges]
    if isinstance(images, FileRows):
        root, size, interpolation = images.root, images.shape[1], images.interpolation

        def read_files(item: dict) -> dict:
            files, digests = list(item["files"]), list(item["sha256"])
            try:
                decoded = decode_listed(root, files, digests, size, interpolation, 1)
            except InputError as exc:
                empty = np.zeros((0, size, size, 3), np.uint8)
                return {"first": item["first"], "images": empty, "error": str(exc)}
            return {"first": item["first"], "images": decoded, "error": ""}

        items = [
            {"first": i, "files": images.files[i:j], "sha256": images.sha256[i:j]}
            for i, j in ranges
        ]
        return read_files, items
    raise TypeError(f"the ray engine reads NpyRows or FileRows, not {type(images).__name__}")


def _actor(backbone: BackboneRecord, cfg: ExtractConfig, precision: str, weights_used: str) -> type:
    """The actor class (its arguments travel inside it): builds the model once, then runs
    one batch per call."""

    class Backbone:
        def __init__(self) -> None:
            from pipeline.features.extractor import build_extractor
            from pipeline.features.forward import forward_for
            from pipeline.features.precision import use_precision

            self.error = ""
            use_precision(precision)
            try:
                model, used = build_extractor(backbone)
            except InputError as exc:
                self.error = f"on a Ray worker: {exc}"
                return
            if used != weights_used:
                self.error = (
                    f"a Ray worker built the backbone with weights {used}, this process with "
                    f"{weights_used}: give backbone.weights as a file every worker can read"
                )
            self.forward = forward_for(model, cfg.batch_size, cfg.storage_dtype)

        def __call__(self, batch: dict) -> dict:
            error = self.error or str(batch["error"][0])
            if error:
                return {"job": batch["job"], "first": batch["first"], "error": [error]}
            outputs = self.forward.run(batch["images"][0])
            return {
                "job": batch["job"],
                "first": batch["first"],
                "error": [""],
                **{f"out{k}": [o] for k, o in enumerate(outputs)},
            }

    return Backbone


def worker_env() -> dict[str, str]:
    """Environment for Ray workers: this process's Keras backend, quiet backend start-up."""
    return {
        "KERAS_BACKEND": os.environ.get("KERAS_BACKEND", "tensorflow"),
        "TF_CPP_MIN_LOG_LEVEL": "3",
    }
