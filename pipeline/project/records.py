"""Typed records of the artefacts the pipeline writes: one model per file, shared by every
writer, reader and test fake (as `params.py` is for params).

Each record carries its provenance: the params and code digest that made it and the digests
of its inputs. `pipeline.provenance` compares them with what the current params would give.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, ValidationError

from pipeline.project.errors import InputError


class RecordError(InputError, RuntimeError):
    """An artefact is missing, unreadable or stale; the message says what to run."""


def canonical_digest(data) -> str:
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()


def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def short(text: str) -> str:
    """`text` with each sha256 cut to its first 12 hex digits, for people to read (records
    keep the whole digest)."""
    return re.sub(r"\b([0-9a-f]{12})[0-9a-f]{52}\b", r"\1…", text)


def write_text_atomic(path: str | Path, text: str) -> None:
    """Write `path` under a temporary name and rename it: readers never see half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


class Record(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    @property
    def digest(self) -> str:
        """sha256 of the record's canonical JSON: its identity for the artefacts made from it."""
        return canonical_digest(self.model_dump(mode="json"))

    def dumps(self) -> str:
        return json.dumps(self.model_dump(mode="json"), indent=2) + "\n"

    def write(self, path: str | Path) -> None:
        write_text_atomic(path, self.dumps())

    @classmethod
    def loads(cls, text: str, where: str, rerun: str):
        try:
            return cls.model_validate_json(text)
        except ValidationError as exc:
            first = exc.errors()[0]
            key = ".".join(str(p) for p in first["loc"]) or "(top)"
            raise RecordError(
                f"{where} is not a valid {cls.__name__} ({key}: {first['msg']}): run `{rerun}`"
            ) from None

    @classmethod
    def read(cls, path: str | Path, rerun: str):
        path = Path(path)
        if not path.is_file():
            raise RecordError(f"{path} not found: run `{rerun}`")
        return cls.loads(path.read_text(), str(path), rerun)


class SourceRecord(Record):
    """data/scan/source.json: the image source and a digest of its files (path, length, mtime)."""

    source: str
    path: str | None
    files: int
    files_sha256: str


class TokenLayout(Record):
    """A transformer's token outputs: `prefix` tokens (the class token first, if it has one,
    then its registers) before the patch tokens, one per `patch_size` square of the image."""

    prefix: int
    class_token: bool
    patch_size: int


class HubSpec(Record):
    """How the KerasHub adapter builds a backbone: keras_hub.models.<cls> from `preset` (a Kaggle
    handle with its version, or a local folder) or, for random weights, from `arguments`."""

    cls: str
    keras_hub: str  # the installed version, which builds it (another one re-runs extract)
    preset: str | None  # None: random weights, built from `arguments`
    encoder: str | None  # the preset's attribute holding the image encoder (CLIP, SigLIP)
    arguments: dict  # constructor arguments, image_shape left out
    any_side: bool  # position embeddings interpolate to any multiple of the patch size
    scale: list[float]  # the preset's image converter: pixels (0..255) * scale + offset
    offset: list[float]
    tokens: TokenLayout


class BackboneRecord(Record):
    """data/scan/backbone.json: the backbone asked for, resolved by scan from its registry row
    (backbones.registry) at data.image_size: everything the stages that build it need, and
    nothing about the backbones the project does not use."""

    name: str
    weights: str  # backbone.weights as asked
    identity: str  # what it resolves to: random | imagenet | auto:not-cached | file:sha256:...
    family: Literal["keras.applications", "keras_hub"]  # the adapter that builds it
    module: str  # keras.applications.<module>: the constructor and its preprocess_input
    constructor: str
    hub: HubSpec | None = None  # family keras_hub: what the adapter needs
    min_side: int  # the smallest input side it accepts without its top
    top_side: int  # the input side its classification top is made for
    image_size: int
    asked_layers: str | dict[str, str]  # extract.layers as written (auto or layer -> reduction)
    layers: dict[str, str]  # extract.layers resolved: layer -> reduction
    top_layers: list[str]  # those of `layers` in the classification top (need top_side)

    def provenance(self) -> dict:
        """What the features record of it: all but the layers (the features' `extract` holds
        them resolved, so that a stale message names the param)."""
        return self.model_dump(mode="json", exclude={"asked_layers", "layers"})


class HeadListing(Record):
    """data/scan/heads/<head>.json: whether train.heads lists the head. Its train@<head>
    stage depends on this file, not on the list, so listing another head re-runs nothing."""

    head: str
    listed: bool


class LibraryRecord(Record):
    """data/scan/<distribution>.json: the installed version of a library stages depend on."""

    library: str
    version: str


class PreparedRecord(Record):
    """data/prepared/meta.json: decoded images made once from the source."""

    data: dict  # params `data`, resolved
    source: str  # SourceRecord.digest
    code: str  # code digest of the prepare stage
    class_names: list[str]
    counts: dict[str, int]
    image_size: int
    sha256: dict[str, str]  # file name -> sha256 of the whole file


HeadKind = Literal["sklearn", "keras"]


class Fingerprint(Record):
    """Everything that determines the features (attrs `fingerprint` of features/*.h5)."""

    backbone: dict  # BackboneRecord.provenance(): the resolved row and the weights identity
    weights_used: str  # what the model was built with: random | imagenet | file:sha256:...
    extract: dict  # params `extract` (provenance), its layers resolved
    precision: str  # the compute precision `extract.precision` resolved to
    data: str  # PreparedRecord.digest
    image_size: int
    code: str  # code digest of the extract stage
    versions: dict

    @property
    def layers(self) -> dict[str, str]:
        return self.extract["layers"]

    @property
    def key(self) -> str:
        return self.digest[:20]


class HeadRecord(Record):
    """models/heads/<cell>/head.json: one trained head and what it was trained on."""

    cell: str
    layer: str
    head: str
    kind: HeadKind
    model: str  # file name inside the cell's directory
    model_sha256: str
    params: dict  # TrainConfig.head_params: what the cell's `train@<head>` stage depends on
    features: Fingerprint  # of the features it was trained on
    reduction: str
    feature_width: int
    class_names: list[str]
    fit_path: Literal["memory", "stream"]
    fit_on: Literal["train", "train+val"]  # the rows the saved model saw (train+val after CV)
    code: str  # code digest of the train stage


class CellMetrics(Record):
    """metrics/train/<cell>.json: the scores of one head, in one schema for every head.

    `val_accuracy`, `val_accuracy_ci95` (Wilson) and `val_macro_f1` are the selection
    estimate: with `selection` "cv", scores of the out-of-fold predictions of `cv_folds`-fold
    cross-validation over train+val; with "val", scores on the val split. `n_val` images are
    behind it. The test scores are those of the saved model (HeadRecord.fit_on says what it
    was fitted on; `n_train` counts those images).
    """

    layer: str
    head: str
    backbone: str
    weights: str
    feature_width: int
    fit_path: Literal["memory", "stream"]
    n_train: int
    selection: Literal["val", "cv"]
    selection_note: str  # which selection and why, one line
    cv_folds: int | None
    n_val: int
    val_accuracy: float
    val_accuracy_ci95: tuple[float, float]
    val_macro_f1: float
    val_fold_accuracies: list[float] | None
    val_fold_std: float | None  # of val_fold_accuracies (ddof 0)
    test_accuracy: float
    test_accuracy_ci95: tuple[float, float]
    test_macro_f1: float
    fit_seconds: float
    model_sha256: str


class RankedCell(Record):
    cell: str
    layer: str
    head: str
    kind: HeadKind
    val_accuracy: float
    val_macro_f1: float
    model: str  # path of the model file
    model_sha256: str


class BestChoice(Record):
    """models/best.json: the head chosen by the selection estimate (CellMetrics), and the
    ranking down to the first head Keras can express (all that fine-tuning may read), each
    with its model's digest."""

    cell: str
    layer: str
    head: str
    kind: HeadKind
    model: str
    metric: str
    value: float
    features: str  # Fingerprint.digest
    selection: Literal["val", "cv"]  # how the best cell's estimate was made
    cv_folds: int | None
    selection_note: str  # which selection the ranking used and why
    tie_break: str | None  # how a tie at the top was broken (selection.leaderboard.TIE_RULE)
    ranking: list[RankedCell]


class ClassScores(Record):
    name: str
    precision: float
    recall: float
    support: int  # test images of this class


class SplitReport(Record):
    """One model's scores on a split (the test split): the same for frozen and fine-tuned models."""

    accuracy: float
    accuracy_ci95: tuple[float, float]
    macro_f1: float
    n: int
    per_class: list[ClassScores]
    confusion: list[list[int]]  # rows: true class, columns: predicted, in class_names order


class ClassifierCard(Record):
    """models/export/card.json: what the exported classifier is, how to feed it, how it did."""

    model: str  # the Keras file beside this card
    needs: list[str]  # modules to import before keras.saving.load_model (keras_hub), or none
    input: str
    class_names: list[str]  # the order of the model's probabilities
    image_side: int
    interpolation: str  # prepare's resizing (PIL), which `layerwise predict` applies too
    backbone: str
    weights: str  # the backbone weights' identity
    layer: str
    reduction: str
    head: str
    cell: str
    source: Literal["fine-tuned", "frozen"]
    why: str  # why this model is the one exported
    test: SplitReport
