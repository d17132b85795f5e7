"""Extraction on Ray Data (extract.engine: ray), for more images than one host reads and runs.

Each batch of images is one Ray row: CPU tasks read it from the prepared arrays, or decode
and check its files (data.prepared: manifest), an actor pool runs the backbone (one
compiled model per actor, on extract.ray.gpus_per_actor GPUs), and the outputs stream back in
order to this process, which writes them through the same stream and feature store as the
local engine: same batches, same model, same fingerprint and resume (the features equal the
local engine's to float rounding: a CPU actor may sum in another order).
"""

from __future__ import annotations

import io
import logging
import math
import os
import re
import signal
import socket
import sys
import tempfile
import threading
import warnings
from collections.abc import Callable, Generator, Iterator
from contextlib import contextmanager, nullcontext, suppress
from pathlib import Path

import numpy as np

from pipeline.data.arrays import NpyRows
from pipeline.data.prepared import FileRows, decode_listed
from pipeline.features.job import unreadable
from pipeline.features.stream import Budget, run_stream
from pipeline.project.errors import ClusterError, InputError
from pipeline.project.params import ConfigError, ExtractConfig, RayConfig
from pipeline.project.records import BackboneRecord

PACKAGE = Path(__file__).resolve().parents[1]
MISSING = (
    "extract.engine: ray needs Ray Data, which is not installed: "
    "pip install 'layerwise[ray]', or set extract.engine: local"
)


READ_CPUS = 1  # the CPU the tasks that read images need beside the actors (or none run)
LOCAL_HOSTS = ("localhost", "127.0.0.1", "::1")
_ADDRESS = re.compile(r"^(?:ray://)?(\[[0-9A-Fa-f:.]+\]|[^\s:/\[\]]+):(\d{1,5})$")


@contextmanager
def ray_session(cfg: RayConfig, env: dict[str, str]):
    """Ray joined at cfg.address (None: started on this host, stopped on exit with every
    process it started, also on SIGTERM or Ctrl-C), with this package and `env` sent to every
    worker; Ray's own logs and progress bars kept quiet. Joining, and the actors starting,
    wait cfg.timeout_s at most; a cluster without the resources the actors need is refused
    before any wait."""
    joining = cfg.address not in (None, "local")
    if joining:
        _host_port(cfg.address)  # a ConfigError before Ray is imported
    with _join_deadline(cfg.timeout_s) if joining else nullcontext():
        try:
            import ray
            import ray.data
        except ImportError:
            raise ConfigError(MISSING) from None
        started = not ray.is_initialized()  # else: the caller's own session
        if started:
            before = {p.pid for p in _descendants()}
            _start(ray, cfg, env, joining, before)
    if not started:
        yield _configured(ray, cfg)
        return
    with _python_sigterm():
        try:
            yield _configured(ray, cfg)
        finally:
            _stop(ray, before)


def _start(ray, cfg: RayConfig, env: dict[str, str], joining: bool, before: set[int]) -> None:
    """ray.init; on an error or a signal, what Ray started so far is stopped, and what was
    not reachable is one ClusterError."""
    try:
        target = _host_port(cfg.address) if joining else None
        if target:
            _probe(ray, cfg, *target)
        with _held_stderr() if joining else nullcontext(io.StringIO()) as held:
            ray.init(
                address=cfg.address,
                runtime_env={"py_modules": [str(PACKAGE)], "env_vars": env},
                include_dashboard=False,
                log_to_driver=False,
                logging_level=logging.ERROR,
            )
        sys.stderr.write(held.getvalue())  # Ray's warnings, once it has joined
    except BaseException as exc:
        _stop(ray, before, wait_s=0)
        if isinstance(exc, (InputError, KeyboardInterrupt, SystemExit)):
            raise
        raise _not_joined(cfg, exc) from None


def _configured(ray, cfg: RayConfig):
    """`ray` with Ray Data set up for the extract stream, once the cluster is known to have
    what the actors need."""
    # errors reach this process as exceptions: the stage says them in one line
    logging.getLogger("ray.data").setLevel(logging.CRITICAL)
    context = ray.data.DataContext.get_current()
    context.execution_options.preserve_order = True
    context.enable_progress_bars = False
    context.wait_for_min_actors_s = max(1, math.ceil(cfg.timeout_s))
    _require(cfg, ray.cluster_resources(), [n["Resources"] for n in ray.nodes() if n["Alive"]])
    return ray


def _host_port(address: str) -> tuple[str, int] | None:
    """(host, port) of a host:port or ray://host:port address, None for `auto` and `local`;
    anything else is a ConfigError."""
    if address in ("auto", "local"):
        return None
    match = _ADDRESS.match(address)
    if not match or not 0 < int(match[2]) < 65536:
        raise ConfigError(
            f"extract.ray.address {address!r} is not a Ray address: give host:port of the "
            "cluster's head (what `ray start --head` prints, e.g. 10.0.0.5:6379), "
            "ray://host:10001 (Ray Client), auto (the cluster this host runs, or $RAY_ADDRESS), "
            "or null to start Ray on this host"
        )
    return match[1].strip("[]"), int(match[2])


def _probe(ray, cfg: RayConfig, host: str, port: int) -> None:
    """Fail at once, in one line, when nothing listens at host:port."""
    if host in LOCAL_HOSTS and not cfg.address.startswith("ray://"):
        host = ray.util.get_node_ip_address()  # where Ray itself connects for localhost
    try:
        socket.create_connection((host, port), timeout=cfg.timeout_s).close()
    except OSError as exc:
        reason = exc.strerror or str(exc) or "no answer"
        raise ClusterError(
            f"extract.ray.address {cfg.address!r}: nothing answers at {host}:{port} "
            f"({reason}, extract.ray.timeout_s={cfg.timeout_s:g}); start the cluster there "
            "(`ray start --head`), correct the address, or set it to null to start Ray on "
            "this host"
        ) from None


def _not_joined(cfg: RayConfig, exc: BaseException) -> ClusterError:
    first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
    if cfg.address in (None, "local"):
        return ClusterError(f"Ray did not start on this host ({first}); run `ray stop` and retry")
    return ClusterError(
        f"extract.ray.address {cfg.address!r}: no Ray cluster answered there within "
        f"extract.ray.timeout_s={cfg.timeout_s:g} s ({first}); give the address of a running "
        "cluster of this Ray version (host:6379, or ray://host:10001), raise timeout_s, or "
        "set address: null to start Ray on this host"
    )


@contextmanager
def _join_deadline(timeout_s: float):
    """Ray's connection timeouts within `timeout_s` while joining (unless set already in the
    environment). Ray reads most of them once, on import: they hold for a first import."""
    rpc = min(5, max(1, int(timeout_s // 4)))
    gcs = min(30, max(1, int(timeout_s // 2)))
    deadline = {
        "RAY_gcs_rpc_server_connect_timeout_s": rpc,
        "RAY_py_gcs_connect_timeout_s": gcs,
        "RAY_gcs_server_port_wait_time_s": max(1, int(timeout_s // (2 * rpc + gcs + 1))),
        # Ray Client's 3 tries wait up to t, 2t and 4t, and as long again between them
        "RAY_CLIENT_INITIAL_CONNECTION_TIMEOUT_S": min(30, max(1, int(timeout_s // 14))),
    }
    saved = {key: os.environ.get(key) for key in deadline}
    for key, value in deadline.items():
        os.environ.setdefault(key, str(value))
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


@contextmanager
def _held_stderr():
    """What is written to file descriptor 2 (Ray's C++ core writes its retries there) held,
    in the StringIO this yields once the block succeeds; dropped when it raises."""
    held = io.StringIO()
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as file:
        os.dup2(file.fileno(), 2)
        try:
            yield held
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
        file.seek(0)
        held.write(file.read().decode(errors="replace"))


def _require(cfg: RayConfig, have: dict, nodes: list[dict]) -> None:
    """A ClusterError unless the cluster has the CPUs and GPUs the actors and the reading
    tasks need, and a node as large as one actor: Ray Data would wait for them forever."""
    gpus = actor_gpus(cfg, have)
    cpus, all_gpus = cfg.actors * cfg.cpus_per_actor + READ_CPUS, cfg.actors * gpus
    fits = any(n.get("CPU", 0) >= cfg.cpus_per_actor and n.get("GPU", 0) >= gpus for n in nodes)
    if have.get("CPU", 0) >= cpus and have.get("GPU", 0) >= all_gpus and fits:
        return
    where = "started on this host" if cfg.address in (None, "local") else f"at {cfg.address}"
    raise ClusterError(
        f"extract.ray needs {cpus:g} CPUs and {all_gpus:g} GPUs in all (actors: {cfg.actors}, "
        f"each with {cfg.cpus_per_actor:g} CPUs and {gpus:g} GPUs on one node, and "
        f"{READ_CPUS} CPU to read images); the Ray cluster {where} has "
        f"{have.get('CPU', 0):g} CPUs and {have.get('GPU', 0):g} GPUs on {len(nodes)} node(s): "
        "lower extract.ray.actors, cpus_per_actor or gpus_per_actor (null: 1 when the cluster "
        "has GPUs, else 0), or join a larger cluster (extract.ray.address)"
    )


def actor_gpus(cfg: RayConfig, have: dict) -> float:
    """GPUs per actor: extract.ray.gpus_per_actor, or (null) 1 when the cluster has GPUs."""
    if cfg.gpus_per_actor is not None:
        return cfg.gpus_per_actor
    return 1 if have.get("GPU", 0) > 0 else 0


def _descendants() -> list:
    import psutil  # a dependency of Ray (and of DVC)

    try:
        return psutil.Process().children(recursive=True)
    except psutil.Error:
        return []


def _stop(ray, before: set[int], wait_s: float = 2) -> None:
    """ray.shutdown(), then the processes Ray started killed if they outlive it by `wait_s`
    (the raylet's agents take a minute to notice a raylet that died with this process).
    `wait_s=0`: killed first, for a Ray that did not finish starting."""
    import psutil

    with _signals_deferred():
        ours = [p for p in _descendants() if p.pid not in before and _is_ray(p)]
        if wait_s:
            with suppress(Exception):  # what is left is killed below
                ray.shutdown()
        _, alive = psutil.wait_procs(ours, timeout=wait_s)
        for process in alive:
            with suppress(psutil.Error):
                process.kill()
        psutil.wait_procs(alive, timeout=2)
        if not wait_s:
            with suppress(Exception):
                ray.shutdown()


def _is_ray(process) -> bool:
    import psutil

    try:
        return "ray" in " ".join([process.name(), *process.cmdline()])
    except psutil.Error:
        return False


@contextmanager
def _python_sigterm():
    """SIGTERM raises SystemExit here again: Ray's core installs a handler of its own that
    prints a stack and aborts, so that no `finally` would stop Ray's processes."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.getsignal(signal.SIGTERM)
    signal.signal(signal.SIGTERM, lambda number, _: sys.exit(128 + number))
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL if previous is None else previous)


@contextmanager
def _signals_deferred():
    """SIGINT and SIGTERM held while Ray is stopped, then delivered: a second Ctrl-C does
    not leave Ray's processes behind."""
    caught: list[int] = []
    kinds = (signal.SIGINT, signal.SIGTERM)
    if threading.current_thread() is threading.main_thread():  # else: no Python handlers
        kinds = tuple(kind for kind in kinds if signal.getsignal(kind) is not None)
    else:
        kinds = ()
    saved = {kind: signal.signal(kind, lambda number, _: caught.append(number)) for kind in kinds}
    try:
        yield
    finally:
        for kind, handler in saved.items():
            signal.signal(kind, handler)
        if caught:
            signal.raise_signal(caught[0])


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
        except BaseException as exc:
            self._results.close()  # stops the dataset: Ray cannot shut down under it
            self.plan([])
            import ray.exceptions

            if isinstance(exc, ray.exceptions.GetTimeoutError):  # the actor pool's start
                raise self._late() from None
            raise
        self._next += 1
        if self._next == len(self._jobs):
            self.plan([])

    def _late(self) -> ClusterError:
        cfg = self.cfg.ray
        return ClusterError(
            f"the Ray actors (extract.ray.actors: {cfg.actors}) did not start within "
            f"extract.ray.timeout_s={cfg.timeout_s:g} s (each starts a worker and builds the "
            "backbone; the cluster "
            "may be busy, or still adding nodes): raise extract.ray.timeout_s, or lower "
            "extract.ray.actors"
        )

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
        gpus = actor_gpus(cfg, ray.cluster_resources())
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
            except (InputError, OSError) as exc:
                error = unreadable(exc) if isinstance(exc, OSError) else exc
                empty = np.zeros((0, size, size, 3), np.uint8)
                return {"first": item["first"], "images": empty, "error": str(error)}
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
