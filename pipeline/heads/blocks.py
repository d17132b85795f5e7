"""Reading one cached layer for a head: whole in memory or in row blocks from HDF5 (the plan),
in order or shuffled so that a file sorted by class still mixes classes."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from pipeline.features.store import FeatureFile

if TYPE_CHECKING:  # scikit-learn is imported where it is used: reading heads does not need it
    from sklearn.preprocessing import StandardScaler

MIN_BLOCK_ROWS = 64
# A streamed block lives in ~5 copies at once (float16, float32, reordered, scaled); 8 leaves room.
BLOCK_COPIES = 8
PIECES_PER_BLOCK = 8  # a shuffled block joins this many contiguous pieces from random places


@dataclass(frozen=True)
class Plan:
    """How a layer is read: 'memory' or 'stream', and rows per block (bounded by the budget)."""

    path: str
    block_rows: int

    @classmethod
    def for_matrix(cls, rows: int, width: int, max_memory_mb: int, factor: float = 1) -> Plan:
        """'memory' when `factor` x the float32 matrix fits in `max_memory_mb`."""
        budget = max_memory_mb * 2**20
        path = "memory" if rows * width * 4 * factor <= budget else "stream"
        return cls(path, max(MIN_BLOCK_ROWS, budget // (4 * width * BLOCK_COPIES)))


def sequential(
    ff: FeatureFile, layer: str, block_rows: int
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Consecutive (float32 rows, labels) blocks."""
    for start in range(0, len(ff.labels), block_rows):
        rows = slice(start, start + block_rows)
        yield ff.read(layer, rows), ff.labels[rows]


def shuffled_blocks(
    n: int, block_rows: int, rng: np.random.Generator, multiple: int = 1
) -> list[np.ndarray]:
    """Row indices of each block for one epoch: contiguous pieces (a multiple of `multiple`
    rows) in random order, up to PIECES_PER_BLOCK per block, rows shuffled within each block.
    Mixes classes even when the file is sorted by class, while reads stay contiguous."""
    piece = max(multiple, block_rows // PIECES_PER_BLOCK // multiple * multiple)
    per_block = max(1, block_rows // piece)
    starts = rng.permutation(np.arange(0, n, piece))
    blocks = []
    for i in range(0, len(starts), per_block):
        rows = np.concatenate([np.arange(s, min(s + piece, n)) for s in starts[i : i + per_block]])
        blocks.append(rng.permutation(rows))
    return blocks


def read_rows(ff: FeatureFile, layer: str, rows: np.ndarray) -> np.ndarray:
    """Rows in the given order, read as contiguous runs."""
    order = np.argsort(rows, kind="stable")
    ordered = rows[order]
    cuts = np.flatnonzero(np.diff(ordered) != 1) + 1
    runs = np.split(ordered, cuts)
    block = np.concatenate([ff.read(layer, slice(int(r[0]), int(r[-1]) + 1)) for r in runs])
    out = np.empty_like(block)
    out[order] = block
    return out


def fit_scaler(ff: FeatureFile, layer: str, plan: Plan) -> StandardScaler:
    from sklearn.preprocessing import StandardScaler

    scaler = StandardScaler()
    for x, _ in sequential(ff, layer, plan.block_rows):
        scaler.partial_fit(x)
    return scaler
