"""Decoded images: decoding a file (PIL, JPEG draft mode), and the prepared data on disk
(data/prepared: arrays, or a manifest of files decoded on demand), written once by prepare
and read back by extract and finetune.
"""

from __future__ import annotations

import hashlib
import io
import os
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from pipeline.config import DataConfig
from pipeline.errors import InputError
from pipeline.files import RemoteFile, tree
from pipeline.records import PreparedRecord

SPLITS = ("train", "val", "test")
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


def identify(data: bytes) -> None:
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
