"""Image sources (bundled digits, keras.datasets, image folders) and their seeded,
stratified train/val/test splits, before anything is decoded.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from pipeline.data.decoding import DataError
from pipeline.data.files import tree
from pipeline.project.layout import SPLITS
from pipeline.project.params import DataConfig
from pipeline.project.records import SourceRecord

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


# A folder of data.path whose name (any case) is one of these makes the layout a split one.
SPLIT_FOLDERS = {"train": "train", "val": "val", "validation": "val", "test": "test"}


@dataclass
class FolderListing:
    """What a folder source gives: class names, splits, and the entries of data.path left
    out (a dangling link, a symlink loop, ...) as report rows {path, split, reason}."""

    class_names: list[str]
    splits: dict[str, Split]
    skipped: list[dict] = field(default_factory=list)


def split_folders(shown: str, folders: list[str]) -> dict[str, str] | None:
    """{split: its folder} of a split layout, or None for a flat one (no folder at the top is
    train, val, validation or test in any case). A split layout holds nothing else at the
    top, one folder per split, and train."""
    top = [d for d in folders if "/" not in d]
    named: dict[str, list[str]] = {}
    for d in top:
        if d.lower() in SPLIT_FOLDERS:
            named.setdefault(SPLIT_FOLDERS[d.lower()], []).append(d)
    if not named:
        return None
    accepted = "a split layout holds train/, val/ (or validation/) and test/, in any case"
    for split, both in named.items():
        if len(both) > 1:
            raise DataError(
                f"{shown}: {' and '.join(f'{d}/' for d in both)} both name the {split} split; "
                f"{accepted}, one folder each: merge them or move one out of data.path"
            )
    other = [d for d in top if d.lower() not in SPLIT_FOLDERS]
    if other:
        raise DataError(
            f"{shown}: {', '.join(f'{d}/' for d in other)} is not a split folder, beside "
            f"{', '.join(f'{d[0]}/' for d in named.values())}; {accepted} (class folders "
            "inside): move it into one of them or out of data.path"
        )
    if "train" not in named:
        raise DataError(
            f"{shown}: {', '.join(f'{d[0]}/' for d in named.values())} but no train/; "
            f"{accepted}: add train/, or give class folders only (a flat layout)"
        )
    return {split: d[0] for split, d in named.items()}


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
    a local or shared path, or a URI that pyarrow reads (data.files)."""
    found = folder_listing(cfg)
    return found.class_names, found.splits


def folder_listing(cfg: DataConfig) -> FolderListing:
    """folder_source's classes and splits, with the entries its listing left out."""
    root = tree(cfg.path, cfg.timeout_s)
    if not root.is_dir():
        raise DataError(f"data.path={cfg.path!r} is not a directory")
    listing = root.walk()
    dirs, names = listing.folders, [name for name, _, _ in listing.files]
    skipped = [{"path": name, "split": None, "reason": why} for name, why in listing.skipped]
    folders = split_folders(cfg.path, dirs) or {"all": ""}
    presplit = "train" in folders
    shown = {name: f"{cfg.path.rstrip('/')}/{d}".rstrip("/") for name, d in folders.items()}
    files = {name: _class_files(d, dirs, names) for name, d in folders.items()}
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
        splits = {k: take(everything, i) for k, i in split_indices(everything.labels, cfg).items()}
        return FolderListing(class_names, splits, skipped)
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
    limited = _limit({k: splits[k] for k in SPLITS}, cfg.limit, cfg.seed)
    return FolderListing(class_names, limited, skipped)


def source_record(cfg: DataConfig) -> SourceRecord:
    """The source's identity; for a folder, a digest of every file's path, length and mtime
    (as rsync and DVC judge a file unchanged) and of every entry left out, so adding,
    removing, editing or mending one shows."""
    if cfg.source != "folder":
        return SourceRecord(source=cfg.source, path=None, files=0, files_sha256="")
    root = tree(cfg.path, cfg.timeout_s)
    if not root.is_dir():
        raise DataError(
            f"data.path={cfg.path!r} is not a directory; give a folder of class folders"
        )
    listing, h = root.walk(), hashlib.sha256()
    for name, length, mtime_ns in listing.files:
        h.update(f"{name}\0{length}\0{mtime_ns}\n".encode())
    for name, reason in listing.skipped:
        h.update(f"{name}\0skipped\0{reason}\n".encode())
    return SourceRecord(
        source="folder", path=cfg.path, files=len(listing.files), files_sha256=h.hexdigest()
    )


def load(cfg: DataConfig) -> FolderListing:
    """The source's classes and splits (and, for a folder, what its listing left out)."""
    if cfg.source == "folder":
        return folder_listing(cfg)
    return FolderListing(*(digits_source(cfg) if cfg.source == "digits" else keras_source(cfg)))


def load_source(cfg: DataConfig) -> tuple[list[str], dict[str, Split]]:
    found = load(cfg)
    return found.class_names, found.splits
