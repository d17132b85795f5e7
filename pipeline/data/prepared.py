"""The prepared data set (data/prepared) read back: decoded arrays read a block at a time, or a
manifest's files decoded on demand and checked against the sha256 prepare listed
(data.ingest writes it)."""

from __future__ import annotations

import csv
import hashlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from pipeline.data.arrays import NpyRows
from pipeline.data.decoding import DataError, decode_bytes
from pipeline.data.files import read_sha256sum, tree
from pipeline.project.layout import Layout, PreparedFiles
from pipeline.project.records import PreparedRecord


class FileRows:
    """Rows of a manifest split (<split>_files.txt), decoded on demand on `workers` threads;
    each file is refused unless its bytes match the sha256 prepare listed. Supports len(),
    slices and index arrays, like NpyRows."""

    def __init__(self, listing: Path, root: str, size: int, interpolation: str, workers: int):
        self.path, self.root = Path(listing), root
        entries = read_sha256sum(self.path.read_text())
        self.sha256, self.files = [e[0] for e in entries], [e[1] for e in entries]
        self.shape, self.dtype = (len(entries), size, size, 3), np.dtype(np.uint8)
        self.interpolation, self.workers = interpolation, workers

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, key) -> np.ndarray:
        index = np.arange(len(self))[key]
        if np.ndim(index) == 0:
            return self[int(index) : int(index) + 1][0]
        return decode_listed(
            self.root,
            [self.files[i] for i in index],
            [self.sha256[i] for i in index],
            self.shape[1],
            self.interpolation,
            self.workers,
        )

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        return self[:] if dtype is None else self[:].astype(dtype)


def decode_listed(
    root: str, files: list[str], sha256: list[str], size: int, interpolation: str, workers: int
) -> np.ndarray:
    """The listed files under `root`, decoded as prepare would have, in order: (n, size,
    size, 3) uint8. A file whose bytes no longer match its sha256, or that cannot be decoded,
    is a DataError."""

    def one(item: tuple[str, str]) -> np.ndarray:
        name, digest = item
        path = tree(root).file(name)
        data = path.read_bytes()
        if hashlib.sha256(data).hexdigest() != digest:
            raise DataError(
                f"{path} changed after prepare listed it (its sha256 differs): "
                "run `dvc repro prepare`"
            )
        try:
            return decode_bytes(data, size, interpolation)
        except ValueError as exc:
            raise DataError(
                f"{path}: {exc}; remove it and run `dvc repro prepare`, or set "
                "data.prepared: arrays (bad images are then skipped when prepare decodes)"
            ) from None

    out = np.empty((len(files), size, size, 3), np.uint8)
    with ThreadPoolExecutor(max(1, min(workers, len(files)))) as pool:
        for i, image in enumerate(pool.map(one, zip(files, sha256))):
            out[i] = image
    return out


def load_split(
    split: str,
    record: PreparedRecord | None = None,
    workers: int = 1,
    layout: Layout = Layout(),
) -> tuple[NpyRows | FileRows, np.ndarray]:
    """Images (read, or for a manifest decoded, on demand) and labels of one prepared split.

    Refuses files of the wrong length, and image and label counts that disagree with each
    other or with `record`. A manifest needs `record` (its data.path, size, interpolation)."""
    files = layout.prepared_files
    if record is not None and record.data.get("prepared") == "manifest":
        d = record.data
        images = FileRows(
            files.files(split), d["path"], d["image_size"], d["interpolation"], workers
        )
    else:
        images = NpyRows(files.images(split))
    labels = np.load(files.labels(split))
    want = record.counts[split] if record else len(labels)
    if not len(images) == len(labels) == want:
        raise DataError(
            f"{files.directory}: the {split} split has {len(images)} images and {len(labels)} "
            f"labels, {files.record.name} says {want}: run `dvc repro prepare`"
        )
    return images, labels


def split_sources(files: PreparedFiles, split: str) -> list[str]:
    """Each image's source in `split` (a file under data.path, or the data set and its index),
    in the split's order, from manifest.csv (CSV, every text field quoted)."""
    found = {}
    with files.manifest.open(newline="") as f:
        for row_split, index, _, source in list(csv.reader(f))[1:]:
            if row_split == split:
                found[int(index)] = source
    return [found.get(i, "?") for i in range(len(found))]
