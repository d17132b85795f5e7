"""The extract job: one forward pass over the prepared images, every requested layer streamed
into the store, on the local engine (this process) or on Ray (features.ray_engine).

The scratch directory `.cache/extract/<fingerprint key>/` holds finished chunks and finished
splits until all three splits are done; it is locked while a run uses it, and the folders of
other fingerprints (abandoned runs) are removed when no run holds them.
"""

from __future__ import annotations

import functools
import shutil
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from filelock import FileLock, Timeout
from tqdm import tqdm

from pipeline.data.decoding import DataError
from pipeline.data.prepared import load_split
from pipeline.features import store
from pipeline.features.forward import forward_for
from pipeline.features.store import ChunkWriter, FeatureStoreError, open_features
from pipeline.features.stream import Budget, run_stream
from pipeline.project.layout import SPLITS, Layout
from pipeline.project.records import Fingerprint, PreparedRecord, file_sha256

LOCK_WAIT_S = 5


def versions() -> dict:
    """What the features record of the libraries that computed and stored them (see
    project.provenance.LIBRARIES for those a new version of re-runs extract)."""
    import importlib

    import h5py
    import keras

    backend = keras.backend.backend()
    return {
        "keras": keras.__version__,
        "backend": backend,
        "backend_version": importlib.import_module(backend).__version__,
        "numpy": np.__version__,
        "h5py": h5py.__version__,
    }


def _lock(scratch_root: Path, key: str) -> FileLock:
    return FileLock(str(scratch_root / f"{key}.lock"))


def remove_abandoned(scratch_root: Path, keep: str) -> None:
    """Delete scratch folders of other fingerprints that no running extract holds."""
    for folder in Path(scratch_root).iterdir():
        if not folder.is_dir() or folder.name == keep:
            continue
        try:
            with _lock(scratch_root, folder.name).acquire(timeout=0):
                shutil.rmtree(folder, ignore_errors=True)
            print(f"removed abandoned scratch {folder}")
        except Timeout:
            continue


def unreadable(exc: OSError) -> DataError:
    """An image file (or prepared array) that cannot be read any more, as one line."""
    what = f"{exc.filename}: {exc.strerror}" if exc.filename and exc.strerror else str(exc)
    return DataError(
        f"cannot read {what}, which prepare listed: restore it, or run `dvc repro prepare` "
        "to list the images there are now"
    )


def read_rows(images, first: int, stop: int) -> np.ndarray:
    """Rows first..stop-1 of `images`; a file gone or unreadable since prepare is a DataError."""
    try:
        return np.asarray(images[first:stop])
    except OSError as exc:
        raise unreadable(exc) from None


class LocalEngine:
    """The forward pass in this process; the stream's reader thread reads (or, for a
    manifest, decodes) the images."""

    def __init__(self, model, batch_size: int, storage_dtype: str):
        self.forward = forward_for(model, batch_size, storage_dtype)

    def stream(self, images, rows: range, write, budget: Budget, progress) -> None:
        read = functools.partial(read_rows, images)
        run_stream(read, rows, self.forward.stream, write, budget, progress)


def extract_split(
    model,
    images: np.ndarray,
    labels: np.ndarray,
    out: Path,
    fingerprint: Fingerprint,
    attrs: dict,
    batch_size: int,
    scratch: Path,
    desc: str = "extract",
    images_sha256: tuple[Path, str] | None = None,
    memory_mb: int = 512,
    engine=None,
    rows: range | None = None,
) -> None:
    """Stream `images` through `model` into `out`, resuming from the chunks in `scratch`
    (`rows`: those left, when the caller has counted the kept chunks already);
    reading, the forward pass and writing overlap within `memory_mb` (stream.run_stream), on
    `engine` (LocalEngine by default, or features.ray_engine.RayEngine).

    `images_sha256` (file, digest): the images' file is hashed while the model runs, and the
    features are refused (and their chunks dropped) if it does not match.
    """
    layers = list(fingerprint.layers)
    storage_dtype = fingerprint.extract["storage_dtype"]
    widths = _widths(model, fingerprint)
    budget = Budget.plan(
        memory_mb,
        batch_size,
        image_bytes=int(np.prod(images.shape[1:])) * images.dtype.itemsize,
        row_bytes=sum(widths.values()) * np.dtype(storage_dtype).itemsize,
        max_chunk=store.TARGET_CHUNK_BYTES,
    )
    writer = ChunkWriter(scratch, widths, storage_dtype)
    n = len(images)
    if rows is None:
        rows = range(writer.rows_done(), n, batch_size)
    done = rows.start
    engine = engine or LocalEngine(model, batch_size, storage_dtype)
    with (
        tqdm(total=n, initial=done, desc=desc, unit="img", smoothing=0.1) as bar,
        ThreadPoolExecutor(1) as hashing,
    ):
        check = hashing.submit(file_sha256, images_sha256[0]) if images_sha256 else None
        engine.stream(
            images,
            rows,
            lambda first, outputs: writer.write(first, dict(zip(layers, outputs))),
            budget,
            bar.update,
        )
        if check is not None and check.result() != images_sha256[1]:
            shutil.rmtree(scratch, ignore_errors=True)
            raise _changed_since_prepare(images_sha256[0])
    writer.assemble(out, n, labels, {**attrs, "fingerprint": fingerprint.model_dump(mode="json")})


def _widths(model, fingerprint: Fingerprint) -> dict[str, int]:
    return {layer: int(o.shape[-1]) for layer, o in zip(fingerprint.layers, model.outputs)}


def _rows_left(model, fingerprint: Fingerprint, images, scratch: Path, batch_size: int) -> range:
    """The rows extract_split will stream: from the end of the chunks already in `scratch`."""
    writer = ChunkWriter(scratch, _widths(model, fingerprint), fingerprint.extract["storage_dtype"])
    return range(writer.rows_done(), len(images), batch_size)


def _changed_since_prepare(path: Path) -> FeatureStoreError:
    return FeatureStoreError(
        f"{path} does not match the sha256 in its meta.json: it changed after prepare wrote "
        "it; run `dvc repro prepare --force`"
    )


def _finished(path: Path, fingerprint: Fingerprint) -> bool:
    try:
        return open_features(path).fingerprint == fingerprint
    except FeatureStoreError:
        return False


def extract_all(
    model,
    prepared: PreparedRecord,
    fingerprint: Fingerprint,
    batch_size: int,
    memory_mb: int = 512,
    engine=None,
    decode_workers: int = 1,
    layout: Layout = Layout(),
) -> None:
    """Extract train, val and test into layout.features; resumable at chunk and split
    granularity. `decode_workers`: threads that decode a manifest's files (local engine)."""
    scratch_root = layout.extract_scratch
    scratch_root.mkdir(parents=True, exist_ok=True)
    key = fingerprint.key
    lock = _lock(scratch_root, key)
    try:
        held = lock.acquire(timeout=LOCK_WAIT_S)
    except Timeout:
        raise FeatureStoreError(
            f"another extract of the same features holds {lock.lock_file}; wait for it to "
            "finish, then run `dvc repro extract`"
        ) from None
    with held:  # released once on exit (`with lock:` would acquire a second time)
        remove_abandoned(scratch_root, key)
        work = scratch_root / key  # each split's file is assembled here, then moved
        assembled = {split: work / layout.features_file(split).name for split in SPLITS}
        pending = []
        for split in SPLITS:
            if _finished(assembled[split], fingerprint):
                print(f"{split}: finished by an earlier run, kept")
                continue
            images, labels = load_split(split, prepared, decode_workers, layout)
            labels_file = layout.prepared_files.labels(split)
            if file_sha256(labels_file) != prepared.sha256[labels_file.name]:
                raise _changed_since_prepare(labels_file)
            rows = _rows_left(model, fingerprint, images, work / split, batch_size)
            pending.append((split, images, labels, rows))
        if hasattr(engine, "plan"):  # one pass of the engine over every split left
            engine.plan([(images, rows) for _, images, _, rows in pending])
        for split, images, labels, rows in pending:
            extract_split(
                model,
                images,
                labels,
                assembled[split],
                fingerprint,
                {"split": split, "class_names": prepared.class_names},
                batch_size,
                work / split,
                desc=split,
                images_sha256=(images.path, prepared.sha256[images.path.name]),
                memory_mb=memory_mb,
                engine=engine,
                rows=rows,
            )
        layout.features.mkdir(parents=True, exist_ok=True)
        for split in SPLITS:
            shutil.move(str(assembled[split]), layout.features_file(split))
        shutil.rmtree(work, ignore_errors=True)
