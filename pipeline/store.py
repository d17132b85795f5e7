"""HDF5 feature store: resumable streaming writes, fingerprinted reads.

Layout of `features/<split>.h5`: one dataset per layer under `features/` (rows = images,
storage dtype float16 by default), `labels` (int32), and attrs: `fingerprint` (JSON of
everything that determines the features), `class_names` (JSON), `complete`.

Writing is crash-safe: each finished chunk of rows goes to its own file in a scratch
directory keyed by the fingerprint (written under a temporary name, then renamed), so a run
killed at any point, SIGKILL included, resumes after the last finished chunk. The HDF5 file
is assembled from the chunks under a temporary name and renamed into place when complete.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np

FORMAT_VERSION = 1
SPLITS = ("train", "val", "test")
# Rows per scratch chunk are chosen to hold about this much; the environment variable
# PIPELINE_CHUNK_BYTES overrides it (tests use tiny chunks to kill a run part-way).
TARGET_CHUNK_BYTES = int(os.environ.get("PIPELINE_CHUNK_BYTES", str(32 << 20)))
H5_CHUNK_BYTES = 4 << 20


class FeatureStoreError(RuntimeError):
    """Features missing, unreadable, incomplete or not matching what the reader expects."""


def fingerprint_key(fingerprint: dict) -> str:
    return hashlib.sha256(json.dumps(fingerprint, sort_keys=True).encode()).hexdigest()[:20]


class ChunkWriter:
    """Streams rows of several named arrays into chunk files; resumes after a crash."""

    def __init__(self, scratch: Path, widths: dict[str, int], dtype: str, rows_per_chunk: int):
        self.scratch = Path(scratch)
        self.scratch.mkdir(parents=True, exist_ok=True)
        self.widths = widths
        self.dtype = np.dtype(dtype)
        self.rows_per_chunk = rows_per_chunk

    def _path(self, start: int) -> Path:
        return self.scratch / f"chunk_{start:010d}.npz"

    def rows_done(self) -> int:
        """Rows covered by consecutive complete chunks from row 0."""
        done = 0
        while (path := self._path(done)).exists():
            try:
                with np.load(path) as chunk:
                    rows = {len(chunk[name]) for name in self.widths}
            except Exception:  # unreadable leftovers are recomputed
                path.unlink()
                break
            if len(rows) != 1:
                path.unlink()
                break
            done += rows.pop()
        return done

    def write(self, start: int, arrays: dict[str, np.ndarray]) -> None:
        tmp = self.scratch / f".tmp_{start:010d}.npz"
        with open(tmp, "wb") as f:
            np.savez(f, **{name: np.asarray(a, dtype=self.dtype) for name, a in arrays.items()})
        os.replace(tmp, self._path(start))

    def finalize(self, out: Path, n: int, labels: np.ndarray, attrs: dict) -> None:
        """Assemble the chunks into `out` (HDF5), atomically; then drop the scratch chunks."""
        out = Path(out)
        tmp = self.scratch / f"{out.name}.partial"
        with h5py.File(tmp, "w") as f:
            group = f.create_group("features")
            datasets = {}
            for name, width in self.widths.items():
                row_bytes = max(1, width * self.dtype.itemsize)
                chunk_rows = int(max(1, min(n, H5_CHUNK_BYTES // row_bytes)))
                datasets[name] = group.create_dataset(
                    name, shape=(n, width), dtype=self.dtype, chunks=(chunk_rows, width)
                )
            start = 0
            while start < n:
                with np.load(self._path(start)) as chunk:
                    rows = 0
                    for name, ds in datasets.items():
                        block = chunk[name]
                        rows = len(block)
                        ds[start : start + rows] = block
                start += rows
            f.create_dataset("labels", data=np.asarray(labels, dtype=np.int32))
            for key, value in attrs.items():
                f.attrs[key] = value if isinstance(value, (int, float, str)) else json.dumps(value)
            f.attrs["format_version"] = FORMAT_VERSION
            f.attrs["complete"] = True
        out.parent.mkdir(parents=True, exist_ok=True)
        shutil.move(str(tmp), out)  # a rename on the same filesystem
        shutil.rmtree(self.scratch, ignore_errors=True)
        try:
            self.scratch.parent.rmdir()  # the fingerprint's folder, once its last split is done
        except OSError:
            pass


@dataclass
class FeatureFile:
    """A complete, checked features file for one split."""

    path: Path
    fingerprint: dict
    class_names: list[str]
    labels: np.ndarray
    widths: dict[str, int]

    def read(self, layer: str, rows: slice = slice(None), dtype=np.float32) -> np.ndarray:
        self.check_layer(layer)
        with h5py.File(self.path, "r") as f:
            return f["features"][layer][rows].astype(dtype)

    def check_layer(self, layer: str) -> None:
        """Raise FeatureStoreError, naming the cached layers, if `layer` is not one of them."""
        if layer not in self.widths:
            raise FeatureStoreError(
                f"{self.path} has no layer {layer!r}; it holds {', '.join(self.widths)}. "
                f"Add it to extract.layers in params.yaml and run `dvc repro extract`."
            )


def open_features(path: str | Path, expect: dict | None = None) -> FeatureFile:
    """Open a features file, refusing a missing, corrupt, incomplete or mismatched one.

    `expect` maps fingerprint keys to the values the reader requires (e.g. backbone).
    """
    path = Path(path)
    rerun = "run `dvc repro extract` to rebuild it"
    if not path.is_file():
        raise FeatureStoreError(f"{path} does not exist: {rerun}")
    try:
        with h5py.File(path, "r") as f:
            attrs = dict(f.attrs)
            if not attrs.get("complete") or attrs.get("format_version") != FORMAT_VERSION:
                raise FeatureStoreError(
                    f"{path} is incomplete or of another format version: {rerun}"
                )
            fingerprint = json.loads(attrs["fingerprint"])
            widths = {name: int(ds.shape[1]) for name, ds in f["features"].items()}
            labels = f["labels"][:]
            class_names = json.loads(attrs["class_names"])
    except FeatureStoreError:
        raise
    except Exception as exc:
        raise FeatureStoreError(f"{path} is unreadable ({exc}): {rerun}") from exc
    for key, want in (expect or {}).items():
        got = fingerprint.get(key)
        if got != want:
            raise FeatureStoreError(
                f"{path} is stale: it was extracted with {key}={got!r}, but {want!r} is "
                f"expected: {rerun}"
            )
    return FeatureFile(path, fingerprint, class_names, labels, widths)


def open_splits(directory: str | Path, expect: dict | None = None) -> dict[str, FeatureFile]:
    """Open train/val/test and check that they come from one extraction."""
    files = {split: open_features(Path(directory) / f"{split}.h5", expect) for split in SPLITS}
    reference = files["train"]
    for _split, ff in files.items():
        if ff.fingerprint != reference.fingerprint or ff.class_names != reference.class_names:
            raise FeatureStoreError(
                f"{ff.path} and {reference.path} come from different extractions: "
                "run `dvc repro extract`"
            )
    return files
