"""HDF5 feature store: resumable streaming writes, checksummed and fingerprinted reads.

Layout of `features/<split>.h5`: one dataset per layer under `features/` (rows = images,
storage dtype float16 by default), `labels` (int32), every dataset with a fletcher32 checksum
per chunk, and attrs: `fingerprint` (a `records.Fingerprint` as JSON), `class_names` (JSON),
`sha256` (JSON: of the labels and of each layer's rows as stored, so that a file edited after
extract is refused: the labels whenever it is opened, a layer whenever it is read whole),
`complete`.

Writing is crash-safe: each finished chunk of rows goes to its own file in a scratch
directory keyed by the fingerprint (written under a temporary name, then renamed), so a run
killed at any point, SIGKILL included, resumes after the last finished chunk. Each split's
HDF5 file is assembled there too, and kept until all three splits are done, since DVC
removes `features/` before every run of extract.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np

from pipeline.project.layout import SPLITS, Layout
from pipeline.project.provenance import require
from pipeline.project.records import Fingerprint, RecordError

FORMAT_VERSION = 3
# Rows per scratch chunk are chosen to hold about this much; the environment variable
# PIPELINE_CHUNK_BYTES overrides it (tests use tiny chunks to kill a run part-way).
TARGET_CHUNK_BYTES = int(os.environ.get("PIPELINE_CHUNK_BYTES", str(32 << 20)))
H5_CHUNK_BYTES = 4 << 20
RERUN = "dvc repro extract"


class FeatureStoreError(RecordError):
    """Features missing, unreadable, incomplete, corrupt or not matching what the reader expects."""


def disk_full(path: Path, needed: int | None = None) -> FeatureStoreError:
    free = shutil.disk_usage(path).free
    wants = f"; {needed / 2**20:.0f} MB are needed" if needed else ""
    return FeatureStoreError(
        f"disk full while writing {path} ({free / 2**20:.0f} MB free{wants}): free space and "
        f"run `{RERUN}` again; finished chunks are kept and the run resumes after them"
    )


class ChunkWriter:
    """Streams rows of several named arrays into chunk files; resumes after a crash."""

    def __init__(self, scratch: Path, widths: dict[str, int], dtype: str):
        self.scratch = Path(scratch)
        self.scratch.mkdir(parents=True, exist_ok=True)
        self.widths = widths
        self.dtype = np.dtype(dtype)

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
        try:
            with open(tmp, "wb") as f:
                np.savez(f, **{name: np.asarray(a, dtype=self.dtype) for name, a in arrays.items()})
        except OSError as exc:
            tmp.unlink(missing_ok=True)
            if exc.errno == errno.ENOSPC:
                raise disk_full(self.scratch) from None
            raise
        os.replace(tmp, self._path(start))

    def assemble(self, out: Path, n: int, labels: np.ndarray, attrs: dict) -> None:
        """Assemble the chunks into `out` (HDF5, checksummed), atomically; drop the chunks."""
        out = Path(out)
        needed = n * sum(self.widths.values()) * self.dtype.itemsize * 11 // 10 + (1 << 20)
        if shutil.disk_usage(self.scratch).free < needed:
            raise disk_full(self.scratch, needed)
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_name(f"{out.name}.partial")
        try:
            self._write_h5(tmp, n, labels, attrs)
        except (OSError, RuntimeError) as exc:
            tmp.unlink(missing_ok=True)
            if isinstance(exc, OSError) and exc.errno == errno.ENOSPC or "No space" in str(exc):
                raise disk_full(self.scratch, needed) from None
            raise
        os.replace(tmp, out)
        for chunk in self.scratch.glob("chunk_*.npz"):
            chunk.unlink()

    def _write_h5(self, path: Path, n: int, labels: np.ndarray, attrs: dict) -> None:
        with h5py.File(path, "w") as f:
            group = f.create_group("features")
            datasets = {}
            for name, width in self.widths.items():
                row_bytes = max(1, width * self.dtype.itemsize)
                chunk_rows = int(max(1, min(n, H5_CHUNK_BYTES // row_bytes)))
                datasets[name] = group.create_dataset(
                    name,
                    shape=(n, width),
                    dtype=self.dtype,
                    chunks=(chunk_rows, width),
                    fletcher32=True,
                )
            digests = {name: hashlib.sha256() for name in datasets}
            start = 0
            while start < n:
                with np.load(self._path(start)) as chunk:
                    rows = 0
                    for name, ds in datasets.items():
                        block = np.ascontiguousarray(chunk[name], self.dtype)
                        rows = len(block)
                        ds[start : start + rows] = block
                        digests[name].update(block.data)
                start += rows
            labels = np.asarray(labels, dtype=np.int32)
            f.create_dataset("labels", data=labels, fletcher32=True)
            f.attrs["sha256"] = json.dumps(
                {
                    "labels": _sha256(labels),
                    "features": {k: d.hexdigest() for k, d in digests.items()},
                }
            )
            for key, value in attrs.items():
                f.attrs[key] = value if isinstance(value, (int, float, str)) else json.dumps(value)
            f.attrs["format_version"] = FORMAT_VERSION
            f.attrs["complete"] = True


@dataclass
class FeatureFile:
    """A complete, checked features file for one split."""

    path: Path
    fingerprint: Fingerprint
    class_names: list[str]
    labels: np.ndarray
    widths: dict[str, int]
    sha256: dict[str, str]  # layer -> digest of its rows as stored

    def read(self, layer: str, rows: slice = slice(None), dtype=np.float32) -> np.ndarray:
        self.check_layer(layer)
        try:
            with h5py.File(self.path, "r") as f:
                stored = f["features"][layer][rows]
        except OSError as exc:
            raise FeatureStoreError(
                f"{self.path} is corrupt: reading layer {layer!r} failed its checksum ({exc}): "
                f"run `{RERUN} --force`"
            ) from None
        if rows == slice(None) and _sha256(stored) != self.sha256[layer]:
            raise edited(self.path, f"layer {layer!r}")
        return stored.astype(dtype)

    def check_layer(self, layer: str) -> None:
        """Raise FeatureStoreError, naming the cached layers, if `layer` is not one of them."""
        if layer not in self.widths:
            raise FeatureStoreError(
                f"{self.path} has no layer {layer!r}; it holds {', '.join(self.widths)}. "
                f"Add it to extract.layers in params.yaml and run `{RERUN}`."
            )


def open_features(path: str | Path, expect: dict | None = None) -> FeatureFile:
    """Open a features file, refusing a missing, corrupt, incomplete or mismatched one.

    `expect` maps fingerprint fields to the values the current params and code give
    (`provenance.expected_features`); any difference is refused, naming the field.
    """
    path = Path(path)
    rerun = f"run `{RERUN}` to rebuild it"
    if not path.is_file():
        raise FeatureStoreError(f"{path} does not exist: {rerun}")
    try:
        with h5py.File(path, "r") as f:
            attrs = dict(f.attrs)
            if not attrs.get("complete") or attrs.get("format_version") != FORMAT_VERSION:
                raise FeatureStoreError(
                    f"{path} is incomplete or of another format version: {rerun}"
                )
            fingerprint = Fingerprint.loads(attrs["fingerprint"], f"{path} (fingerprint)", RERUN)
            widths = {name: int(ds.shape[1]) for name, ds in f["features"].items()}
            labels = f["labels"][:]
            class_names = json.loads(attrs["class_names"])
            sha256 = json.loads(attrs["sha256"])
    except RecordError:
        raise
    except Exception as exc:
        raise FeatureStoreError(f"{path} is unreadable or corrupt ({exc}): {rerun}") from None
    if _sha256(labels) != sha256["labels"]:
        raise edited(path, "its labels")
    if expect:
        require(str(path), fingerprint.model_dump(), expect, RERUN)
    return FeatureFile(path, fingerprint, class_names, labels, widths, sha256["features"])


def _sha256(array: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(array).data).hexdigest()


def edited(path: Path, what: str) -> FeatureStoreError:
    return FeatureStoreError(
        f"{path}: {what} differ from what extract wrote (the file was modified since): run "
        f"`{RERUN} --force`, or `dvc checkout {path}` to restore DVC's copy"
    )


def open_splits(layout: Layout = Layout(), expect: dict | None = None) -> dict[str, FeatureFile]:
    """Open train/val/test and check that they come from one extraction."""
    files = {split: open_features(layout.features_file(split), expect) for split in SPLITS}
    reference = files["train"]
    for ff in files.values():
        if ff.fingerprint != reference.fingerprint or ff.class_names != reference.class_names:
            raise FeatureStoreError(
                f"{ff.path} and {reference.path} come from different extractions: run `{RERUN}`"
            )
    return files
