"""uint8 image arrays on disk as .npy files, written and read a row at a time in flat memory."""

from __future__ import annotations

import os
import threading
from pathlib import Path

import numpy as np

from pipeline.data.decoding import DataError


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
