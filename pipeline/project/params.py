"""Typed, validated params: the sections every stage reads (data, backbone, extract) as frozen
pydantic models, and how any stage loads the sections it needs from params.yaml.

An unknown key or a bad value fails on load, before any work, with a message that names
the key, what is accepted and what was given. The other sections live with their owners
(selection.params: train and select; finetuning.params: finetune) and the whole file, checked
against the backbone and head registries, in inputs.params (the `scan` stage).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from pipeline.features.reductions import reduction_problem
from pipeline.project.errors import InputError

# Layer names become output paths (models/heads/<head>/<layer>-<head>): one plain component.
_LAYER_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
WEIGHTS_KEYWORDS = ("auto", "imagenet", "preset", "random")
# Bounds far past any real run: a value beyond one is a typo, refused before any work.
MAX_COUNT = 1 << 31  # images, iterations, epochs, trees, neighbours
MAX_BATCH = 1 << 16
MAX_MB = 1 << 24  # 16 TiB
MAX_SEED = 2**32 - 1  # what numpy and scikit-learn accept


class ConfigError(InputError, ValueError):
    """params.yaml is invalid: the message names the key, what is accepted and what was given."""


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=False)


def _layer_name(layer: str) -> str:
    if not isinstance(layer, str) or not _LAYER_NAME.match(layer):
        raise ValueError(
            f"layer name {layer!r} is not a Keras layer name (letters, digits, '_', '.', '-'; "
            "no '/' and not starting with '.')"
        )
    return layer


LayerName = Annotated[str, AfterValidator(_layer_name)]


def integer(default: int | None, *, ge: int, le: int = MAX_COUNT) -> Any:
    """A bounded int param, strict: `true` is not 1 and `2.0` is not 2."""
    return Field(default, ge=ge, le=le, strict=True)


def real(default: float | None, **bounds: float) -> Any:
    """A finite float param, strict: an int passes, `true` and strings do not."""
    return Field(default, strict=True, allow_inf_nan=False, **bounds)


def weights_problem(weights: str) -> str | None:
    """Why `backbone.weights` names neither a keyword nor an existing file or folder, or None."""
    if weights in WEIGHTS_KEYWORDS or Path(weights).exists():
        return None
    return (
        f"weights must be 'auto', 'imagenet', 'preset', 'random', the path of a weights file or "
        f"of a KerasHub preset folder; got {weights!r}, which is none of these and no such "
        "file or folder exists"
    )


class DataConfig(Section):
    source: Literal["digits", "cifar10", "cifar100", "mnist", "fashion_mnist", "folder"] = "digits"
    path: str | None = None
    image_size: int = integer(224, ge=8, le=1024)
    interpolation: Literal["nearest", "bilinear", "bicubic", "lanczos", "box", "hamming"] = (
        "bilinear"
    )
    limit: int | None = integer(None, ge=2)
    val_fraction: float = real(0.2, gt=0, lt=1)
    test_fraction: float = real(0.2, gt=0, lt=1)
    seed: int = integer(0, ge=0, le=MAX_SEED)
    on_bad_image: Literal["skip", "fail"] = "skip"
    # None: every core; not in the provenance
    decode_workers: int | None = integer(None, ge=1, le=4096)
    prepared: Literal["arrays", "manifest"] = "arrays"  # manifest: extract decodes the files
    # byte-identical files in two splits: warn (count and first pairs) | fail
    on_duplicate: Literal["warn", "fail"] = "warn"
    timeout_s: float = real(60.0, gt=0, le=86400)  # deadline of each call to a URI's filesystem

    def provenance(self) -> dict:
        """The params that decide the prepared arrays (not how many threads decode them, how
        long a URI may take to answer, or whether duplicates stop prepare)."""
        return self.model_dump(mode="json", exclude={"decode_workers", "on_duplicate", "timeout_s"})

    @model_validator(mode="after")
    def _check(self) -> DataConfig:
        if self.val_fraction + self.test_fraction >= 1:
            raise ValueError(
                "val_fraction + test_fraction must be < 1, "
                f"got {self.val_fraction} + {self.test_fraction}"
            )
        if self.source == "folder" and not self.path:
            raise ValueError("source 'folder' needs data.path, the directory of class folders")
        if self.prepared == "manifest" and self.source != "folder":
            raise ValueError(
                f"prepared 'manifest' lists image files, so it needs source 'folder'; "
                f"{self.source!r} is decoded from memory: use prepared 'arrays'"
            )
        return self


def _weights(weights: str) -> str:
    problem = weights_problem(weights)
    if problem:
        raise ValueError(problem)
    return weights


class BackboneConfig(Section):
    name: str = "vgg16"  # checked against backbones.registry by scan
    weights: Annotated[str, AfterValidator(_weights)] = "auto"


class RayConfig(Section):
    address: str | None = None  # None: start Ray on this host; "auto" or ray://host:10001: join
    actors: int = integer(1, ge=1, le=4096)  # backbone replicas, each with one compiled model
    # None: 1 if the cluster has GPUs, else 0
    gpus_per_actor: float | None = real(None, ge=0, le=4096)
    cpus_per_actor: float = real(1, gt=0, le=4096)
    # deadline of each wait on the cluster: joining it, its actors starting (and building)
    timeout_s: float = real(60.0, gt=0, le=86400)


class ExtractConfig(Section):
    layers: Literal["auto"] | dict[str, str] = "auto"  # auto: the backbone's own
    batch_size: int = integer(32, ge=1, le=MAX_BATCH)
    # images and outputs in flight; not in the fingerprint
    memory_mb: int = integer(512, ge=16, le=MAX_MB)
    storage_dtype: Literal["float16", "float32"] = "float16"
    precision: Literal["auto", "float32", "mixed_bfloat16", "mixed_float16"] = "auto"
    engine: Literal["local", "ray"] = "local"  # ray: Ray Data on a cluster (extra `ray`)
    ray: RayConfig = RayConfig()

    def provenance(self) -> dict:
        """The params that decide the features, not how they are computed (how much is in
        flight, where: both engines write the same features to float rounding, and a run
        killed for memory resumes under a lower budget or on another engine)."""
        return self.model_dump(mode="json", exclude={"memory_mb", "engine", "ray"})

    @field_validator("layers")
    @classmethod
    def _layers(cls, v: str | dict[str, str]) -> str | dict[str, str]:
        if v == "auto":
            return v
        if not v:
            raise ValueError("at least one layer is needed")
        for layer, reduction in v.items():
            _layer_name(layer)
            problem = reduction_problem(reduction)
            if problem:
                raise ValueError(f"reduction of layer {layer!r} {problem}")
        return v


class Shared(Section):
    """The sections every stage after scan compares its inputs with (its other sections are
    read by the stages that own them)."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    data: DataConfig = DataConfig()
    backbone: BackboneConfig = BackboneConfig()
    extract: ExtractConfig = ExtractConfig()


# Keys that were renamed; DVC's run-cache ignores any param named `size` (treeverse/dvc#10296).
RENAMED = {"data.size": "data.image_size"}
Model = TypeVar("Model", bound=BaseModel)


def _describe(error: dict, model: type[BaseModel]) -> str:
    key = ".".join(str(p) for p in error["loc"])
    message = error["msg"].removeprefix("Value error, ")
    if not key:
        return message
    if key in RENAMED:
        return f"{key} is now called {RENAMED[key]}: rename it in params.yaml"
    if error["type"] == "extra_forbidden":
        for part in error["loc"][:-1]:
            model = model.model_fields[part].annotation
        return f"unknown key {key!r}; accepted keys here: {', '.join(model.model_fields)}"
    return f"{key}: {message} (got {error['input']!r})"


def validate(model: type[Model], raw: dict | None) -> Model:
    """`raw` as `model`; a ConfigError naming every bad key at once."""
    try:
        return model.model_validate(raw or {})
    except ValidationError as exc:
        lines = [_describe(e, model) for e in exc.errors()]
        raise ConfigError("invalid params.yaml: " + "; ".join(lines)) from None


def parse_yaml(text: str, path: str | Path = "params.yaml"):
    """`text` read as DVC reads params.yaml (ruamel.yaml, YAML 1.2: `010` is 10, `yes` a
    string), so that the stages and DVC's change tracking see the same values."""
    from ruamel.yaml import YAML, YAMLError

    try:
        return YAML(typ="safe").load(text)
    except YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc).strip().splitlines()[0]
        raise ConfigError(f"{path} is not valid YAML: {problem}{where}") from None


def read_params(path: str | Path = "params.yaml") -> dict:
    """params.yaml as a mapping of sections."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path} not found: run from the project root, where params.yaml lives")
    raw = parse_yaml(path.read_text(), path)
    if raw is not None and not isinstance(raw, dict):
        raise ConfigError(f"{path} must be a mapping of sections, got {type(raw).__name__}")
    return raw or {}


def load_params(model: type[Model] = Shared, path: str | Path = "params.yaml") -> Model:
    """Read params.yaml and validate the sections `model` holds."""
    return validate(model, read_params(path))
