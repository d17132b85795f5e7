"""Typed, validated params: every section of params.yaml as a frozen pydantic model.

An unknown key or a bad value fails on load, before any work, with a message that names
the key, what is accepted and what was given.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from pipeline.backbones import BACKBONE_NAMES, closest, get_backbone, layer_problem, layer_table
from pipeline.errors import InputError

HEADS = ("logreg", "linear_svm", "knn", "random_forest", "dense")
REDUCTION_PATTERN = re.compile(r"^(none|avg|max|grid[1-9])$")
# Layer names become output paths (models/heads/<layer>-<head>): one plain path component.
LAYER_NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


class ConfigError(InputError, ValueError):
    """params.yaml is invalid: the message names the key, what is accepted and what was given."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=False)


class DataConfig(_Section):
    source: Literal["digits", "cifar10", "cifar100", "mnist", "fashion_mnist", "folder"] = "digits"
    path: str | None = None
    image_size: int = Field(224, ge=8, le=1024)
    interpolation: Literal["nearest", "bilinear", "bicubic", "lanczos", "box", "hamming"] = (
        "bilinear"
    )
    limit: int | None = Field(None, ge=2)
    val_fraction: float = Field(0.2, gt=0, lt=1)
    test_fraction: float = Field(0.2, gt=0, lt=1)
    seed: int = 0
    on_bad_image: Literal["skip", "fail"] = "skip"
    decode_workers: int | None = Field(None, ge=1)  # None: every core; not in the provenance
    prepared: Literal["arrays", "manifest"] = "arrays"  # manifest: extract decodes the files

    def provenance(self) -> dict:
        """The params that decide the prepared arrays (not how many threads decode them)."""
        return self.model_dump(mode="json", exclude={"decode_workers"})

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


class BackboneConfig(_Section):
    name: str = "vgg16"
    weights: str = "auto"

    @field_validator("name")
    @classmethod
    def _known(cls, v: str) -> str:
        if v not in BACKBONE_NAMES:
            raise ValueError(f"unknown backbone {v!r}; accepted: {', '.join(BACKBONE_NAMES)}")
        return v

    @field_validator("weights")
    @classmethod
    def _weights(cls, v: str) -> str:
        if v not in ("auto", "imagenet", "random") and not Path(v).is_file():
            raise ValueError(
                f"weights must be 'auto', 'imagenet', 'random' or the path of a weights file; "
                f"got {v!r}, which is none of these and no such file exists"
            )
        return v


class RayConfig(_Section):
    address: str | None = None  # None: start Ray on this host; "auto" or ray://host:10001: join
    actors: int = Field(1, ge=1)  # backbone replicas, each with one compiled model
    gpus_per_actor: float | None = Field(None, ge=0)  # None: 1 if the cluster has GPUs, else 0
    cpus_per_actor: float = Field(1, gt=0)


class ExtractConfig(_Section):
    layers: Literal["auto"] | dict[str, str] = "auto"  # auto: the backbone's suggested layers
    batch_size: int = Field(32, ge=1)
    memory_mb: int = Field(512, ge=16)  # images and outputs in flight; not in the fingerprint
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
    def _reductions(cls, v: str | dict[str, str]) -> str | dict[str, str]:
        if v == "auto":
            return v
        if not v:
            raise ValueError("at least one layer is needed")
        for layer, red in v.items():
            _check_layer_name(layer)
            if not isinstance(red, str) or not REDUCTION_PATTERN.match(red):
                raise ValueError(
                    f"reduction of layer {layer!r} must be one of none, avg, max, grid1..grid9; "
                    f"got {red!r}"
                )
        return v


def _check_layer_name(layer: str) -> None:
    if not isinstance(layer, str) or not LAYER_NAME_PATTERN.match(layer):
        raise ValueError(
            f"layer name {layer!r} is not a Keras layer name (letters, digits, '_', '.', '-'; "
            "no '/' and not starting with '.')"
        )


def _check_list(name: str, items: list) -> None:
    if not items:
        raise ValueError(f"train.{name} is empty; list at least one")
    repeated = sorted({str(x) for x in items if items.count(x) > 1})
    if repeated:
        raise ValueError(f"train.{name} lists {', '.join(repeated)} more than once")


class LogregConfig(_Section):
    C: float = Field(1.0, gt=0)
    max_iter: int = Field(1000, ge=1)


class LinearSvmConfig(_Section):
    C: float = Field(1.0, gt=0)
    max_iter: int = Field(5000, ge=1)


class KnnConfig(_Section):
    n_neighbors: int = Field(5, ge=1)
    weights: Literal["uniform", "distance"] = "distance"


class RandomForestConfig(_Section):
    n_estimators: int = Field(200, ge=1)
    max_depth: int | None = Field(None, ge=1)


class DenseConfig(_Section):
    hidden: list[int] = [256]
    dropout: float = Field(0.5, ge=0, lt=1)
    learning_rate: float = Field(1e-3, gt=0)
    epochs: int = Field(50, ge=1)
    patience: int = Field(5, ge=1)
    batch_size: int = Field(64, ge=1)


class CvConfig(_Section):
    """Choose layer and head by stratified k-fold cross-validation over train+val."""

    folds: int = Field(5, ge=0)  # 0: never (rank on the val split alone)
    when_val_under: int = Field(500, ge=0)  # applies when the val split has fewer images

    @field_validator("folds")
    @classmethod
    def _folds(cls, v: int) -> int:
        if v == 1:
            raise ValueError(
                "must be 0 (never: rank on the val split alone) or at least 2; "
                "fix it in params.yaml and run `dvc repro`"
            )
        return v


class TrainConfig(_Section):
    layers: list[str] | None = None  # None: every extracted layer
    heads: list[Literal["logreg", "linear_svm", "knn", "random_forest", "dense"]] = list(HEADS)
    seed: int = 0
    max_memory_mb: int = Field(2048, ge=1)
    cv: CvConfig = CvConfig()
    logreg: LogregConfig = LogregConfig()
    linear_svm: LinearSvmConfig = LinearSvmConfig()
    knn: KnnConfig = KnnConfig()
    random_forest: RandomForestConfig = RandomForestConfig()
    dense: DenseConfig = DenseConfig()

    @field_validator("layers")
    @classmethod
    def _layers(cls, v: list[str] | None) -> list[str] | None:
        if v is None:
            return v
        _check_list("layers", v)
        for layer in v:
            _check_layer_name(layer)
        return v

    @field_validator("heads")
    @classmethod
    def _heads(cls, v: list[str]) -> list[str]:
        _check_list("heads", v)
        return v


class SelectConfig(_Section):
    metric: Literal["val_accuracy", "val_macro_f1"] = "val_accuracy"


class FinetuneConfig(_Section):
    enabled: bool = False
    unfreeze: str | None = None
    optimizer: Literal["adamw", "sgd"] = "adamw"
    learning_rate: float = Field(1e-4, gt=0)
    layer_decay: float = Field(0.3, gt=0, le=1)
    weight_decay: float = Field(1e-4, ge=0)
    head_epochs: int = Field(2, ge=0)
    warmup_epochs: float = Field(1, ge=0)
    epochs: int = Field(20, ge=1)
    patience: int = Field(8, ge=1)
    batch_size: int = Field(32, ge=1)
    augment: bool = True
    augment_min_scale: float = Field(1.0, gt=0, le=1)
    augment_vflip: bool = True
    # auto: mixed_bfloat16 on a GPU with bf16 support, float32 elsewhere
    precision: Literal["auto", "float32", "mixed_bfloat16", "mixed_float16"] = "auto"


class Params(_Section):
    data: DataConfig = DataConfig()
    backbone: BackboneConfig = BackboneConfig()
    extract: ExtractConfig = ExtractConfig()
    train: TrainConfig = TrainConfig()
    select: SelectConfig = SelectConfig()
    finetune: FinetuneConfig = FinetuneConfig()

    def resolved(self) -> Params:
        """`extract.layers: auto` and `train.layers: null` made explicit, then checked against
        the backbone's table of layer names and its input sizes (no model is built)."""
        spec = get_backbone(self.backbone.name)
        size = self.data.image_size
        layers = spec.auto(size) if self.extract.layers == "auto" else dict(self.extract.layers)
        table = layer_table(spec.name)
        problem = layer_problem(spec, size, layers, table["base"], table["top"])
        if problem:
            raise ConfigError(problem)
        chosen = list(layers) if self.train.layers is None else list(self.train.layers)
        missing = [layer for layer in chosen if layer not in layers]
        if missing:
            raise ConfigError(
                f"train.layers {missing} are not extracted (extract.layers gives "
                f"{', '.join(layers)}){closest(missing[0], layers)} Add them to extract.layers, "
                "or drop them from train.layers (null: every extracted layer)"
            )
        return self.model_copy(
            update={
                "extract": self.extract.model_copy(update={"layers": layers}),
                "train": self.train.model_copy(update={"layers": chosen}),
            }
        )


# Keys that were renamed; DVC's run-cache ignores any param named `size` (treeverse/dvc#10296).
RENAMED = {"data.size": "data.image_size"}


def _describe(error: dict) -> str:
    key = ".".join(str(p) for p in error["loc"])
    message = error["msg"].removeprefix("Value error, ")
    if not key:
        return message
    if key in RENAMED:
        return f"{key} is now called {RENAMED[key]}: rename it in params.yaml"
    if error["type"] == "extra_forbidden":
        parent = error["loc"][:-1]
        model = Params
        for part in parent:
            model = model.model_fields[part].annotation
        accepted = ", ".join(model.model_fields)
        return f"unknown key {key!r}; accepted keys here: {accepted}"
    return f"{key}: {message} (got {error['input']!r})"


def parse_params(raw: dict) -> Params:
    """Validate a params mapping and resolve its layers; raise ConfigError naming every bad
    key."""
    try:
        params = Params.model_validate(raw or {})
    except ValidationError as exc:
        lines = [_describe(e) for e in exc.errors()]
        raise ConfigError("invalid params.yaml: " + "; ".join(lines)) from None
    return params.resolved()


def load_params(path: str | Path = "params.yaml") -> Params:
    """Read and validate params.yaml."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path} not found: run from the project root, where params.yaml lives")
    with path.open() as f:
        raw = yaml.safe_load(f)
    if raw is not None and not isinstance(raw, dict):
        raise ConfigError(f"{path} must be a mapping of sections, got {type(raw).__name__}")
    return parse_params(raw)
