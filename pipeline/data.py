"""Image sources (bundled digits, keras.datasets, image folders), stratified splits, decoding.

Everything ends as uint8 RGB arrays of one size, decoded and resized once, or (data.prepared:
manifest) as a list of checked files that extract decodes.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError
from tqdm import tqdm

from pipeline.config import DataConfig
from pipeline.errors import InputError
from pipeline.files import RemoteFile, tree
from pipeline.provenance import code_digest
from pipeline.records import PreparedRecord, SourceRecord, file_sha256

SPLITS = ("train", "val", "test")
KERAS_SETS = {
    "cifar10": [
        "airplane",
        "automobile",
        "bird",
        "cat",
        "deer",
        "dog",
        "frog",
        "horse",
        "ship",
        "truck",
    ],
    "cifar100": [str(i) for i in range(100)],
    "mnist": [str(i) for i in range(10)],
    "fashion_mnist": [
        "t-shirt",
        "trouser",
        "pullover",
        "dress",
        "coat",
        "sandal",
        "shirt",
        "sneaker",
        "bag",
        "ankle-boot",
    ],
}
RESAMPLE = {
    "nearest": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "lanczos": Image.Resampling.LANCZOS,
    "box": Image.Resampling.BOX,
    "hamming": Image.Resampling.HAMMING,
}


class DataError(InputError, ValueError):
    """The data source cannot give a usable data set; the message says what to fix."""


@dataclass
class Split:
    """One split before decoding: in-memory images or file paths, with labels and ids."""

    labels: np.ndarray
    images: np.ndarray | None = None  # (n, h, w) or (n, h, w, c) uint8
    paths: list[Path] | None = None
    ids: list[str] = field(default_factory=list)


# ---------------------------------------------------------------- splitting


def _stratified(idx: np.ndarray, labels: np.ndarray, fraction: float, seed: int, what: str):
    from sklearn.model_selection import train_test_split

    try:
        return train_test_split(idx, test_size=fraction, stratify=labels[idx], random_state=seed)
    except ValueError as exc:
        counts = np.bincount(labels[idx])
        raise DataError(
            f"cannot carve a stratified {what} split ({fraction:.0%}) from {len(idx)} images "
            f"with per-class counts {counts.tolist()}: {exc}. Add images or change the fractions."
        ) from exc


def split_indices(labels: np.ndarray, cfg: DataConfig) -> dict[str, np.ndarray]:
    """Seeded, stratified train/val/test indices over one pool of labelled items."""
    idx = np.arange(len(labels))
    rest, test = _stratified(idx, labels, cfg.test_fraction, cfg.seed, "test")
    val_share = cfg.val_fraction / (1 - cfg.test_fraction)
    train, val = _stratified(rest, labels, val_share, cfg.seed, "val")
    return {"train": np.sort(train), "val": np.sort(val), "test": np.sort(test)}


def subsample(labels: np.ndarray, n: int, seed: int) -> np.ndarray:
    """A stratified subset of `n` indices (all of them when n >= len)."""
    if n >= len(labels):
        return np.arange(len(labels))
    from sklearn.model_selection import train_test_split

    keep, _ = train_test_split(
        np.arange(len(labels)), train_size=n, stratify=labels, random_state=seed
    )
    return np.sort(keep)


def _limit(splits: dict[str, Split], limit: int | None, seed: int) -> dict[str, Split]:
    """Apply data.limit over all splits together, each keeping its share."""
    total = sum(len(s.labels) for s in splits.values())
    if not limit or limit >= total:
        return splits
    out = {}
    for name, s in splits.items():
        keep = subsample(
            s.labels, max(len(np.unique(s.labels)), round(len(s.labels) * limit / total)), seed
        )
        out[name] = Split(
            labels=s.labels[keep],
            images=None if s.images is None else s.images[keep],
            paths=None if s.paths is None else [s.paths[i] for i in keep],
            ids=[s.ids[i] for i in keep],
        )
    return out


# ---------------------------------------------------------------- sources


def digits_source(cfg: DataConfig) -> tuple[list[str], dict[str, Split]]:
    """scikit-learn's bundled 8x8 handwritten digits (1,797 images), as uint8 grey."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = np.round(digits.images * (255 / 16)).astype(np.uint8)
    labels = digits.target.astype(np.int64)
    keep = subsample(labels, cfg.limit, cfg.seed) if cfg.limit else np.arange(len(labels))
    images, labels = images[keep], labels[keep]
    parts = split_indices(labels, cfg)
    splits = {
        name: Split(labels=labels[i], images=images[i], ids=[f"digits:{keep[j]}" for j in i])
        for name, i in parts.items()
    }
    return [str(d) for d in range(10)], splits


def keras_source(cfg: DataConfig) -> tuple[list[str], dict[str, Split]]:
    """A keras.datasets set: its own train/test; val carved from train, stratified."""
    import keras

    try:
        (x_train, y_train), (x_test, y_test) = getattr(keras.datasets, cfg.source).load_data()
    except Exception as exc:
        raise DataError(
            f"data.source={cfg.source}: could not download it ({exc}). keras.datasets needs "
            f"internet on first use and then caches under ~/.keras/datasets; offline, use "
            f"data.source=digits or an image folder (data.source=folder, data.path=...)."
        ) from exc
    y_train, y_test = y_train.reshape(-1).astype(np.int64), y_test.reshape(-1).astype(np.int64)
    idx = np.arange(len(y_train))
    train, val = _stratified(idx, y_train, cfg.val_fraction, cfg.seed, "val")
    splits = {
        "train": Split(y_train[train], x_train[train], ids=[f"train:{i}" for i in train]),
        "val": Split(y_train[val], x_train[val], ids=[f"train:{i}" for i in val]),
        "test": Split(y_test, x_test, ids=[f"test:{i}" for i in range(len(y_test))]),
    }
    return KERAS_SETS[cfg.source], _limit(splits, cfg.limit, cfg.seed)


def _class_files(prefix: str, folders: list[str], files: list[str]) -> dict[str, list[str]]:
    """Class folder name -> the files anywhere below it, for the class folders in `prefix`."""
    base = f"{prefix}/" if prefix else ""
    classes = {
        d[len(base) :]: [] for d in folders if d.startswith(base) and "/" not in d[len(base) :]
    }
    for name in files:
        if name.startswith(base):
            cls, _, rest = name[len(base) :].partition("/")
            if rest and cls in classes:
                classes[cls].append(name)
    return dict(sorted(classes.items()))


def folder_source(cfg: DataConfig) -> tuple[list[str], dict[str, Split]]:
    """A directory of class folders, flat or with train/ [val/|validation/] [test/] inside;
    a local or shared path, or a URI that pyarrow reads (files.py)."""
    root = tree(cfg.path)
    if not root.is_dir():
        raise DataError(f"data.path={cfg.path!r} is not a directory")
    dirs, listing = root.walk()
    names = [name for name, _, _ in listing]
    sub = {d.lower(): d for d in dirs if "/" not in d}
    presplit = "train" in sub
    if presplit:
        folders = {
            "train": sub["train"],
            "val": sub.get("val", sub.get("validation")),
            "test": sub.get("test"),
        }
    else:
        folders = {"all": ""}
    shown = {
        name: f"{cfg.path.rstrip('/')}/{d}".rstrip("/")
        for name, d in folders.items()
        if d is not None
    }
    files = {name: _class_files(d, dirs, names) for name, d in folders.items() if d is not None}
    first = files["train" if presplit else "all"]
    class_names = sorted(first)
    if len(class_names) < 2:
        raise DataError(
            f"{shown['train' if presplit else 'all']} needs at least two class folders, "
            f"found {class_names or 'none'}"
        )
    for name, per_class in files.items():
        empty = [c for c in class_names if not per_class.get(c)]
        if empty and (name in ("all", "train")):
            raise DataError(f"empty class folder(s) in {shown[name]}: {', '.join(empty)}")
        extra = sorted(set(per_class) - set(class_names))
        if extra:
            raise DataError(
                f"{shown[name]} has classes not in the training set: {', '.join(extra)}"
            )

    def pool(per_class: dict[str, list[str]]) -> Split:
        ids = [f for c in class_names for f in per_class.get(c, [])]
        labels = np.array(
            [i for i, c in enumerate(class_names) for _ in per_class.get(c, [])], np.int64
        )
        return Split(labels=labels, paths=[root.file(f) for f in ids], ids=ids)

    def take(s: Split, i: np.ndarray) -> Split:
        return Split(s.labels[i], paths=[s.paths[j] for j in i], ids=[s.ids[j] for j in i])

    if not presplit:
        everything = pool(files["all"])
        if cfg.limit:
            everything = take(everything, subsample(everything.labels, cfg.limit, cfg.seed))
        return class_names, {
            k: take(everything, i) for k, i in split_indices(everything.labels, cfg).items()
        }
    splits = {name: pool(files[name]) for name in files}
    train = splits["train"]
    idx = np.arange(len(train.labels))
    if "test" not in splits:
        idx, test = _stratified(idx, train.labels, cfg.test_fraction, cfg.seed, "test")
        splits["test"] = take(train, np.sort(test))
    if "val" not in splits:
        share = (
            cfg.val_fraction / (1 - cfg.test_fraction) if "test" not in files else cfg.val_fraction
        )
        idx, val = _stratified(idx, train.labels, share, cfg.seed, "val")
        splits["val"] = take(train, np.sort(val))
    splits["train"] = take(train, np.sort(idx))
    return class_names, _limit({k: splits[k] for k in SPLITS}, cfg.limit, cfg.seed)


def source_record(cfg: DataConfig) -> SourceRecord:
    """The source's identity; for a folder, a digest of every file's path, length and mtime
    (as rsync and DVC judge a file unchanged), so adding, removing or editing one shows."""
    if cfg.source != "folder":
        return SourceRecord(source=cfg.source, path=None, files=0, files_sha256="")
    root = tree(cfg.path)
    if not root.is_dir():
        raise DataError(
            f"data.path={cfg.path!r} is not a directory; give a folder of class folders"
        )
    h, count = hashlib.sha256(), 0
    for name, length, mtime_ns in root.walk()[1]:
        h.update(f"{name}\0{length}\0{mtime_ns}\n".encode())
        count += 1
    return SourceRecord(source="folder", path=cfg.path, files=count, files_sha256=h.hexdigest())


def load_source(cfg: DataConfig) -> tuple[list[str], dict[str, Split]]:
    if cfg.source == "digits":
        return digits_source(cfg)
    if cfg.source == "folder":
        return folder_source(cfg)
    return keras_source(cfg)


# ---------------------------------------------------------------- decoding


def to_rgb(img: Image.Image) -> Image.Image:
    """Any PIL mode (grey, 16-bit, float, palette, alpha, CMYK) to 8-bit RGB."""
    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        a = np.asarray(img, dtype=np.float64)
        if img.mode.startswith("I;16"):
            a = a / 257.0
        elif a.max() > 255 or a.min() < 0:
            a = (a - a.min()) / max(a.max() - a.min(), 1e-12) * 255
        img = Image.fromarray(np.clip(np.round(a), 0, 255).astype(np.uint8), "L")
    if img.mode == "P":
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA"):
        img = img.convert("RGBA")
        background = Image.new("RGBA", img.size, (255, 255, 255, 255))
        img = Image.alpha_composite(background, img)
    return img.convert("RGB")


def resize(img: Image.Image, size: int, interpolation: str) -> np.ndarray:
    return np.asarray(to_rgb(img).resize((size, size), RESAMPLE[interpolation]), dtype=np.uint8)


def decode_file(path: Path | RemoteFile, size: int, interpolation: str) -> np.ndarray:
    """Decode one image file; raise ValueError with a short reason when it cannot be used."""
    return decode_bytes(
        Path(path).read_bytes() if isinstance(path, str) else path.read_bytes(), size, interpolation
    )


def decode_bytes(data: bytes, size: int, interpolation: str) -> np.ndarray:
    """Decode one image file's bytes (ValueError with a short reason when unusable)."""
    with _image(data) as img:
        # JPEG: decode at 1/2, 1/4 or 1/8 scale when that still covers size x size
        img.draft(img.mode, (size, size))
        img.load()
        return resize(ImageOps.exif_transpose(img), size, interpolation)


def _identify(data: bytes) -> None:
    """What prepare checks of a file it lists without decoding: an image PIL can identify."""
    with _image(data):
        pass


@contextmanager
def _image(data: bytes) -> Iterator[Image.Image]:
    """The image in `data`, opened lazily; what goes wrong in it is a ValueError with a
    short reason."""
    if not data:
        raise ValueError("empty file (0 bytes)")
    try:
        with Image.open(io.BytesIO(data)) as img:
            yield img
    except UnidentifiedImageError:
        raise ValueError("not an image PIL can identify") from None
    except (OSError, SyntaxError, EOFError, Image.DecompressionBombError) as exc:
        raise ValueError(f"unreadable or truncated image: {exc}") from None


def decode_workers(cfg: DataConfig) -> int:
    """data.decode_workers, or every core this process may use."""
    if cfg.decode_workers:
        return cfg.decode_workers
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()


def decode_split(name: str, split: Split, cfg: DataConfig) -> Iterator[tuple]:
    """Decode and resize a split once, in order: (index, image, None) for each usable item,
    (index, None, reason) for each unusable file. Files are decoded on decode_workers threads
    (PIL releases the GIL while it decodes and resizes)."""
    size = cfg.image_size
    if split.images is not None:
        for i, a in enumerate(tqdm(split.images, desc=f"resize {name}", unit="img", leave=False)):
            yield i, resize(Image.fromarray(np.asarray(a, np.uint8)), size, cfg.interpolation), None
        return
    yield from _over_files(
        f"decode {name}", split.paths, cfg, lambda path: decode_file(path, size, cfg.interpolation)
    )


def list_split(name: str, split: Split, cfg: DataConfig) -> Iterator[tuple]:
    """For a manifest: (index, sha256 of the file, None) for each file PIL can identify,
    (index, None, reason) for the others; nothing is decoded."""

    def check(path: Path | RemoteFile) -> str:
        data = path.read_bytes()
        _identify(data)
        return hashlib.sha256(data).hexdigest()

    yield from _over_files(f"list {name}", split.paths, cfg, check)


def _over_files(desc: str, files: list[Path], cfg: DataConfig, work) -> Iterator[tuple]:
    """(index, work(file), None) or (index, None, reason), in order, on decode_workers threads."""

    def attempt(path: Path):
        try:
            return work(path), None
        except ValueError as exc:
            return None, str(exc)

    workers = decode_workers(cfg)
    with ThreadPoolExecutor(workers) as pool:
        results = pool.map(attempt, files)
        bar = tqdm(results, total=len(files), desc=f"{desc} ({workers} threads)", unit="img")
        for i, (value, reason) in enumerate(bar):
            yield i, value, reason


# ---------------------------------------------------------------- on disk


class NpyWriter:
    """A .npy file written a row at a time (flat memory); the row count is set on close."""

    def __init__(self, path: Path, row_shape: tuple, dtype, capacity: int):
        self.path, self.count = Path(path), 0
        self._header = {
            "descr": np.lib.format.dtype_to_descr(np.dtype(dtype)),
            "fortran_order": False,
        }
        self._row_shape, self._dtype = tuple(row_shape), np.dtype(dtype)
        self._file = open(self.path, "wb")  # noqa: SIM115 - closed in close()
        self._write_header(capacity)

    def _write_header(self, rows: int) -> None:
        # numpy pads the header so that the first axis can be rewritten in place
        self._file.seek(0)
        np.lib.format.write_array_header_1_0(
            self._file, {**self._header, "shape": (rows, *self._row_shape)}
        )

    def append(self, row: np.ndarray) -> None:
        self._file.write(np.ascontiguousarray(row, self._dtype).tobytes())
        self.count += 1

    def close(self) -> int:
        end = self._file.tell()
        self._write_header(self.count)
        self._file.seek(end)
        self._file.close()
        return self.count


def prepare(cfg: DataConfig, out: Path) -> tuple[PreparedRecord, list[dict]]:
    """Write data/prepared/: <split>_images.npy (decoded once, streamed to disk; with
    data.prepared=manifest <split>_files.txt instead, each file's sha256 and path under
    data.path, in `sha256sum` format), <split>_labels.npy, manifest.csv, report.json and
    meta.json (a PreparedRecord); return
    (record, skipped). Written into `<out>.partial` and renamed: never seen half-made."""
    source, code = source_record(cfg), code_digest("prepare")  # what this run reads
    class_names, splits = load_source(cfg)
    out = Path(out)
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        record, skipped = _write_prepared(cfg, tmp, class_names, splits, source, code)
        shutil.rmtree(out, ignore_errors=True)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return record, skipped


def _write_prepared(cfg, out: Path, class_names, splits, source, code):
    side, skipped, labels = cfg.image_size, [], {}
    with (out / "manifest.csv").open("w") as manifest:
        manifest.write("split,index,label,source\n")
        for name in SPLITS:
            split = splits[name]
            listed = cfg.prepared == "manifest"
            if listed:
                out_file = (out / f"{name}_files.txt").open("w")
                items = list_split(name, split, cfg)
            else:
                out_file = NpyWriter(
                    out / f"{name}_images.npy", (side, side, 3), np.uint8, len(split.labels)
                )
                items = decode_split(name, split, cfg)
            keep = []
            for i, value, reason in items:
                if value is None:
                    if cfg.on_bad_image == "fail":
                        raise DataError(f"{split.paths[i]}: {reason} (data.on_bad_image=fail)")
                    skipped.append({"path": split.ids[i], "split": name, "reason": reason})
                    continue
                manifest.write(
                    f"{name},{len(keep)},{class_names[split.labels[i]]},{json.dumps(split.ids[i])}\n"
                )
                if listed:  # value: the file's sha256
                    out_file.write(f"{value}  {split.ids[i]}\n")
                else:  # value: the decoded image
                    out_file.append(value)
                keep.append(i)
            out_file.close()
            labels[name] = split.labels[keep].astype(np.int32)
            np.save(out / f"{name}_labels.npy", labels[name])
    counts = np.bincount(labels["train"], minlength=len(class_names))
    empty = [class_names[i] for i in np.flatnonzero(counts == 0)]
    if empty:
        raise DataError(f"no usable training images left for class(es): {', '.join(empty)}")
    for name in SPLITS:
        if len(labels[name]) == 0:
            raise DataError(f"the {name} split is empty: add images or change the fractions")
    (out / "report.json").write_text(
        json.dumps({"skipped": skipped, "n_skipped": len(skipped)}, indent=2) + "\n"
    )
    record = PreparedRecord(
        data=cfg.provenance(),
        source=source.digest,
        code=code,
        class_names=class_names,
        counts={name: len(labels[name]) for name in SPLITS},
        image_size=side,
        sha256={f.name: file_sha256(f) for f in sorted([*out.glob("*.npy"), *out.glob("*.txt")])},
    )
    record.write(out / "meta.json")
    return record, skipped


class NpyRows:
    """Rows of a .npy array read from the file on demand.

    Unlike a memory map, pages read stay out of the process's resident memory, so a pass
    over any number of images runs in flat memory. Supports len(), slices and index arrays.
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._file = open(self.path, "rb")  # noqa: SIM115 - kept open for the object's life
        version = np.lib.format.read_magic(self._file)
        read_header = {
            (1, 0): np.lib.format.read_array_header_1_0,
            (2, 0): np.lib.format.read_array_header_2_0,
        }
        self.shape, fortran, self.dtype = read_header[version](self._file)
        if fortran:
            raise DataError(f"{self.path} is in Fortran order; re-run `dvc repro prepare`")
        self._offset = self._file.tell()
        self._row_bytes = self.dtype.itemsize * int(np.prod(self.shape[1:]))
        length = os.fstat(self._file.fileno()).st_size
        if length != self._offset + self.shape[0] * self._row_bytes:
            self._file.close()
            raise DataError(
                f"{self.path} holds {length} bytes, its header promises "
                f"{self._offset + self.shape[0] * self._row_bytes}: truncated or damaged; "
                "run `dvc repro prepare`"
            )
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return self.shape[0]

    def _read(self, start: int, stop: int) -> np.ndarray:
        out = np.empty((stop - start, *self.shape[1:]), self.dtype)
        if not out.size:
            return out
        with self._lock:
            self._file.seek(self._offset + start * self._row_bytes)
            self._file.readinto(memoryview(out).cast("B"))
        return out

    def __getitem__(self, key) -> np.ndarray:
        if isinstance(key, slice) and key.step in (None, 1):
            start, stop, _ = key.indices(len(self))
            return self._read(start, max(start, stop))
        if isinstance(key, (int, np.integer)):
            return self[int(key) : int(key) + 1][0]
        index = np.arange(len(self))[key]
        return (
            np.stack([self._read(i, i + 1)[0] for i in index]) if len(index) else self._read(0, 0)
        )

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        return self[:] if dtype is None else self[:].astype(dtype)


class FileRows:
    """Rows of a manifest split (<split>_files.txt), decoded on demand on `workers` threads;
    each file is refused unless its bytes match the sha256 prepare listed. Supports len(),
    slices and index arrays, like NpyRows."""

    def __init__(self, listing: Path, root: str, size: int, interpolation: str, workers: int):
        self.path, self.root = Path(listing), root
        entries = [line.split("  ", 1) for line in self.path.read_text().splitlines()]
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
    directory: Path, split: str, record: PreparedRecord | None = None, workers: int = 1
) -> tuple[NpyRows | FileRows, np.ndarray]:
    """Images (read, or for a manifest decoded, on demand) and labels of one prepared split.

    Refuses files of the wrong length, and image and label counts that disagree with each
    other or with `record`. A manifest needs `record` (its data.path, size, interpolation)."""
    directory = Path(directory)
    if record is not None and record.data.get("prepared") == "manifest":
        d = record.data
        images = FileRows(
            directory / f"{split}_files.txt",
            d["path"],
            d["image_size"],
            d["interpolation"],
            workers,
        )
    else:
        images = NpyRows(directory / f"{split}_images.npy")
    labels = np.load(directory / f"{split}_labels.npy")
    want = record.counts[split] if record else len(labels)
    if not len(images) == len(labels) == want:
        raise DataError(
            f"{directory}: the {split} split has {len(images)} images and {len(labels)} labels, "
            f"meta.json says {want}: run `dvc repro prepare`"
        )
    return images, labels
