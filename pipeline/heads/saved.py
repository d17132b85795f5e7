"""A trained head on disk: its model file and head.json (records.HeadRecord), what a head.json
must say to be the current params' and code's, and loading only after the digest matches."""

from __future__ import annotations

import hashlib
import io
from pathlib import Path
from typing import TYPE_CHECKING

import joblib

from pipeline.heads.registry import get_head
from pipeline.project.layout import HEAD_RECORD, MODEL_FILES, cell
from pipeline.project.provenance import code_digest, require
from pipeline.project.records import Fingerprint, HeadRecord, RecordError

if TYPE_CHECKING:
    from pipeline.selection.params import TrainConfig

RERUN = "dvc repro train"


def expected_head(layer: str, head: str, train: TrainConfig, features: Fingerprint) -> dict:
    """What the head.json of cell (`layer`, `head`) says when the current train code fitted it
    with the current `train` params on `features`: its writer and every reader use this."""
    return {
        "cell": cell(layer, head),
        "layer": layer,
        "head": head,
        "kind": get_head(head).kind,
        "params": train.head_params(head),
        "features": features.model_dump(mode="json"),
        "code": code_digest("train"),
    }


def save_model(model, kind: str, directory: Path) -> str:
    """Write the model file of a head of `kind` into `directory`; return its name."""
    name = MODEL_FILES[kind]
    if kind == "keras":
        model.save(directory / name)
    else:
        joblib.dump(model, directory / name)
    return name


def read_head(
    directory: str | Path, expect: dict | None = None, model_sha256: str | None = None
) -> HeadRecord:
    """head.json of a trained head, refused unless its fields match `expect` (expected_head)
    and it records `model_sha256`, when given. The model file itself is checked by
    `verify_model` or `load_head`."""
    path = Path(directory) / HEAD_RECORD
    record = HeadRecord.read(path, RERUN)
    if expect:
        require(str(path), record.model_dump(mode="json"), expect, RERUN)
    if model_sha256 is not None and model_sha256 != record.model_sha256:
        raise RecordError(
            f"{path} records model sha256 {record.model_sha256[:12]}..., "
            f"the selection recorded {model_sha256[:12]}...: run `dvc repro train select`"
        )
    return record


def verify_model(directory: str | Path, record: HeadRecord) -> bytes:
    """The model file's bytes, refused unless they have the sha256 head.json records."""
    path = Path(directory) / record.model
    if not path.is_file():
        raise RecordError(f"{path} is missing: run `{RERUN}`")
    data = path.read_bytes()
    if hashlib.sha256(data).hexdigest() != record.model_sha256:
        raise RecordError(
            f"{path} is not the model its head.json records (sha256 differs): it was replaced "
            f"or damaged, and is not loaded; run `{RERUN} --force`"
        )
    return data


def load_head(directory: str | Path, record: HeadRecord):
    """The trained model, deserialised only after its bytes match the recorded sha256."""
    data = verify_model(directory, record)
    if record.kind == "keras":
        import keras

        return keras.models.load_model(Path(directory) / record.model)
    return joblib.load(io.BytesIO(data))
