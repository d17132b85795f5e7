"""The reductions a cached layer can go through, and the width each gives (no Keras here: params
checks and `layerwise layers` use it too; features.extractor.Reduce computes them).

none: flattened; avg, max: global average or maximum over the spatial map; gridN: an NxN grid
of average-pooled cells (adaptive bins, as torch's AdaptiveAvgPool2d), concatenated.
"""

from __future__ import annotations

import re

REDUCTIONS = "none, avg, max, grid1..grid9"
_PATTERN = re.compile(r"^(none|avg|max|grid[1-9])$")


def reduction_problem(reduction: object) -> str | None:
    """Why `reduction` is not one of REDUCTIONS, or None."""
    if isinstance(reduction, str) and _PATTERN.match(reduction):
        return None
    return f"must be one of {REDUCTIONS}; got {reduction!r}"


def spatial_problem(layer: str, reduction: str, shape: tuple) -> str | None:
    """Why `reduction` cannot reduce `layer`'s output of `shape` (batch axis left out): all
    but none need a spatial map (height, width, channels)."""
    if reduction != "none" and len(shape) != 3:
        return (
            f"extract.layers.{layer}: reduction {reduction!r} needs a spatial (height x width x "
            f"channels) output, but {layer} is {'x'.join(map(str, shape))}; use none"
        )
    return None


def grid_cells(reduction: str) -> int:
    """N of gridN."""
    return int(reduction.removeprefix("grid"))


def bins(length: int, n: int) -> list[tuple[int, int]]:
    """Adaptive pooling windows: n windows covering `length`, each at least one wide."""
    return [
        ((i * length) // n, max(-(-(i + 1) * length // n), (i * length) // n + 1)) for i in range(n)
    ]


def flat_width(shape) -> int:
    width = 1
    for d in shape:
        width *= int(d)
    return width


def reduced_width(shape, reduction: str) -> int:
    """Features per image of an output of `shape` (batch axis left out) under `reduction`."""
    if len(shape) == 1 or reduction == "none":
        return flat_width(shape)
    if reduction in ("avg", "max"):
        return int(shape[-1])
    return grid_cells(reduction) ** 2 * int(shape[-1])
