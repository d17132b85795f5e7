"""What a backbone's built model says of itself: every tap's name and output shape (its layers
and the operations between them; without the classification top, and of the top alone), the
top's input side and the parameter counts.

Derived by building the model once (without drawing weights), and cached per Keras version (a JSON
file per backbone under $LAYERWISE_CACHE, by default ~/.cache/layerwise), so that checking
params and listing backbones build nothing the second time.
"""

from __future__ import annotations

import importlib.metadata
import os
from collections.abc import Callable
from pathlib import Path

from filelock import FileLock
from pydantic import BaseModel, ConfigDict, ValidationError

from pipeline.backbones.keras_apps import build_unweighted, taps
from pipeline.project.records import TokenLayout

FORMAT = 1
CACHE_VARIABLE = "LAYERWISE_CACHE"


class LayerFacts(BaseModel):
    """One backbone as Keras `keras` builds it; shapes leave out the batch axis."""

    model_config = ConfigDict(frozen=True)

    format: int
    keras: str
    top_side: int  # the input side the classification top is made for
    parameters: tuple[int, int]  # without and with the classification top
    base: list[tuple[str, tuple[int, ...]]]  # (tap, output shape at top_side), no top; in order
    top: list[tuple[str, tuple[int, ...]]]  # the top's own layers
    tokens: TokenLayout | None = None  # a transformer's: its outputs are tokens x width

    def shape(self, layer: str) -> tuple[int, ...] | None:
        """`layer`'s output shape at the top's input side, or None if there is no such layer."""
        return dict(self.base).get(layer) or dict(self.top).get(layer)


def cache_dir() -> Path:
    """Where the facts of this Keras version live."""
    root = Path(os.environ.get(CACHE_VARIABLE) or Path.home() / ".cache" / "layerwise")
    return root / f"keras-{importlib.metadata.version('keras')}"


def shapes(points: dict) -> list[tuple[str, tuple[int, ...]]]:
    """(name, output shape without the batch axis) of each of `points` (name -> operation)."""
    return [(name, tuple(int(d) for d in op.output.shape[1:])) for name, op in points.items()]


def derive(constructor: str, top_side: int | None = None) -> LayerFacts:
    """Build the backbone without and with its top (no weights) and read the facts.
    `top_side`: for constructors whose top takes any input side (its default is then used)."""
    import keras

    top = build_unweighted(constructor, True, None)
    side = top.inputs[0].shape[1] or top_side
    if top.inputs[0].shape[1] is None:
        top = build_unweighted(constructor, True, side)
    top_facts, top_params = shapes(taps(top)), top.count_params()
    del top
    base = build_unweighted(constructor, False, side)
    base_facts = shapes(taps(base))
    names = {name for name, _ in base_facts}
    return LayerFacts(
        format=FORMAT,
        keras=keras.__version__,
        top_side=side,
        parameters=(base.count_params(), top_params),
        base=base_facts,
        top=[(name, shape) for name, shape in top_facts if name not in names],
    )


def cached(key: str) -> bool:
    """Whether the facts under `key` (a backbone's name) are in the cache already."""
    return (cache_dir() / f"{key}.json").is_file()


def layer_facts(key: str, make: Callable[[], LayerFacts]) -> LayerFacts:
    """The facts under `key`, from the cache, or made by `make` (and cached) on first use."""
    path = cache_dir() / f"{key}.json"
    if path.is_file():
        try:
            facts = LayerFacts.model_validate_json(path.read_text())
            if facts.format == FORMAT:
                return facts
        except ValidationError:
            pass  # another format: derived again
    path.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(path) + ".lock"):
        if path.is_file():  # another process derived it meanwhile
            try:
                return LayerFacts.model_validate_json(path.read_text())
            except ValidationError:
                pass
        facts = make()
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text(facts.model_dump_json())
        os.replace(tmp, path)
    return facts
