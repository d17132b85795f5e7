"""Decoding one image file (PIL, JPEG draft mode, any mode to 8-bit RGB), and the error of a
data source that cannot give a usable data set."""

from __future__ import annotations

import io
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from pipeline.data.files import RemoteFile
from pipeline.project.errors import InputError
from pipeline.project.params import DataConfig

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
