"""The reductions a cached layer can go through, and the width each gives (no Keras here: params
checks and `layerwise layers` use it too; features.extractor.Reduce computes them).

none: flattened; avg, max: global average or maximum over the spatial map; gridN: an NxN grid
of average-pooled cells (adaptive bins, as torch's AdaptiveAvgPool2d), concatenated.

A transformer's token output (tokens x width, with a records.TokenLayout) reduces over its
patch tokens as over a spatial map (avg is the mean of the patch tokens; register tokens are
never in it); cls is its class token, cls_avg the class token and the patch mean concatenated
(DINOv2's linear evaluation).
"""

from __future__ import annotations

import math
import re

REDUCTIONS = "none, avg, max, cls, cls_avg, grid1..grid9"
_PATTERN = re.compile(r"^(none|avg|max|cls|cls_avg|grid[1-9])$")


def reduction_problem(reduction: object) -> str | None:
    """Why `reduction` is not one of REDUCTIONS, or None."""
    if isinstance(reduction, str) and _PATTERN.match(reduction):
        return None
    return f"must be one of {REDUCTIONS}; got {reduction!r}"


def shape_problem(layer: str, reduction: str, shape: tuple, tokens=None) -> str | None:
    """Why `reduction` cannot reduce `layer`'s output of `shape` (batch axis left out), or None.
    `tokens`: the backbone's TokenLayout when its outputs are tokens x width. Every reduction
    but none needs a spatial map (height, width, channels) or patch tokens; cls a class token."""
    cls = reduction.startswith("cls")
    if reduction == "none" or (len(shape) == 3 and not cls):
        return None
    if len(shape) == 2 and tokens is not None and (tokens.class_token or not cls):
        return None
    if cls:
        return (
            f"extract.layers.{layer}: reduction {reduction!r} needs a class token, which "
            f"{layer} ({'x'.join(map(str, shape))}) has not; use avg, max or gridN"
        )
    return (
        f"extract.layers.{layer}: reduction {reduction!r} needs a spatial (height x width x "
        f"channels) output or patch tokens, but {layer} is {'x'.join(map(str, shape))}; use none"
    )


def grid_cells(reduction: str) -> int:
    """N of gridN."""
    return int(reduction.removeprefix("grid"))


def patch_grid(tokens: int, prefix: int) -> int:
    """The side of the square grid the patch tokens of a `tokens`-long output form."""
    return math.isqrt(tokens - prefix)


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
    if reduction in ("avg", "max", "cls"):
        return int(shape[-1])
    if reduction == "cls_avg":
        return 2 * int(shape[-1])
    return grid_cells(reduction) ** 2 * int(shape[-1])
