"""Provenance: each stage's code digest and libraries, and the check that an artefact is
exactly what the current params and code would produce.

A stage's code is the closure of its module's imports within `pipeline/`: the same list
dvc.yaml names as the stage's deps (tests/test_provenance.py checks the two agree). Its
libraries are those of LIBRARIES that this code imports; `scan` records their versions
(data/scan/<distribution>.json) and dvc.yaml names those records as the stage's deps too.
"""

from __future__ import annotations

import ast
import hashlib
import importlib.metadata
from functools import cache
from pathlib import Path

from pipeline import paths
from pipeline.config import Params, TrainConfig
from pipeline.records import PreparedRecord, RecordError, SourceRecord, WeightsRecord

PACKAGE = Path(__file__).resolve().parent
# import name -> distribution, for the libraries whose next version may change a stage's
# results beyond float rounding: Keras defines the backbones, their preprocessing and the dense
# head, Pillow decodes and resizes, scikit-learn splits the data and fits the heads. The
# backend (TensorFlow, JAX, PyTorch), numpy and h5py change float rounding at most, as another
# device or engine does: the features record them (Fingerprint.versions), nothing compares them.
LIBRARIES = {"keras": "keras", "PIL": "pillow", "sklearn": "scikit-learn"}


class StaleError(RecordError):
    """An artefact was made by other params, inputs or code than the current ones."""


@cache
def _imported(module: str) -> frozenset[str]:
    """Every dotted name `pipeline/<module>.py` imports, at any depth of its code."""
    tree = ast.parse((PACKAGE / f"{module}.py").read_text())
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return frozenset(names)


def _imports(module: str) -> set[str]:
    """Modules of this package that `pipeline/<module>.py` imports."""
    names = _imported(module)
    found = set()
    for name in names:
        parts = name.split(".")
        if parts[0] == "pipeline" and len(parts) > 1 and (PACKAGE / f"{parts[1]}.py").is_file():
            found.add(parts[1])
    return found


@cache
def stage_modules(stage: str) -> tuple[str, ...]:
    """`pipeline/<name>.py` of the stage's module and everything it imports, sorted."""
    seen, todo = set(), [stage]
    while todo:
        module = todo.pop()
        if module not in seen:
            seen.add(module)
            todo.extend(_imports(module) - seen)
    return tuple(sorted(f"pipeline/{m}.py" for m in seen))


@cache
def stage_libraries(stage: str) -> tuple[str, ...]:
    """The distributions of LIBRARIES that the stage's code imports, sorted."""
    tops = {
        name.split(".")[0] for path in stage_modules(stage) for name in _imported(Path(path).stem)
    }
    return tuple(sorted(LIBRARIES[top] for top in tops & set(LIBRARIES)))


def library_version(distribution: str) -> str:
    """The installed version, as pip reports it."""
    return importlib.metadata.version(distribution)


@cache
def code_digest(stage: str) -> str:
    h = hashlib.sha256()
    for path in stage_modules(stage):
        h.update(path.encode() + b"\0" + (PACKAGE.parent / path).read_bytes() + b"\0")
    return h.hexdigest()


def _show(value) -> str:
    if isinstance(value, str) and len(value) > 24 and all(c in "0123456789abcdef:" for c in value):
        return repr(value[:12] + "...")
    return repr(value)


def _difference(key: str, got, want) -> tuple[str, object, object] | None:
    """The first (dotted key, got, want) where the two differ, looking inside mappings."""
    if isinstance(got, dict) and isinstance(want, dict):
        for sub in sorted(set(got) | set(want), key=str):
            found = _difference(f"{key}.{sub}", got.get(sub), want.get(sub))
            if found:
                return found
        return None
    return None if got == want else (key, got, want)


def require(where: str, recorded: dict, expected: dict, rerun: str) -> None:
    """Raise StaleError naming the first key where `recorded` differs from `expected`."""
    found = _difference("", {k: recorded.get(k) for k in expected}, expected)
    if found:
        key, got, want = found
        raise StaleError(
            f"{where} is stale: it was made with {key.lstrip('.')}={_show(got)}, the current "
            f"params and code give {_show(want)}: run `{rerun}`"
        )


def _scanned(kind, path: Path, expect: dict):
    """A record the scan stage wrote, refused unless it was written for the current params."""
    record = kind.read(path, "dvc repro scan")
    require(str(path), record.model_dump(), expect, "dvc repro scan")
    return record


def scanned_source(params: Params, scan: Path = paths.SCAN) -> SourceRecord:
    expect = {"source": params.data.source, "path": params.data.path}
    return _scanned(SourceRecord, Path(scan) / paths.SOURCE_RECORD.name, expect)


def scanned_weights(params: Params, scan: Path = paths.SCAN) -> WeightsRecord:
    expect = {"backbone": params.backbone.name, "weights": params.backbone.weights}
    return _scanned(WeightsRecord, Path(scan) / paths.WEIGHTS_RECORD.name, expect)


def expected_prepared(params: Params, source: SourceRecord) -> dict:
    return {
        "data": params.data.provenance(),
        "source": source.digest,
        "code": code_digest("prepare"),
    }


def current_prepared(
    params: Params, directory: Path = paths.PREPARED, scan: Path = paths.SCAN
) -> PreparedRecord:
    """data/prepared's record, refused unless the current params, source and code made it."""
    record = PreparedRecord.read(Path(directory) / "meta.json", "dvc repro prepare")
    expected = expected_prepared(params, scanned_source(params, scan))
    require(str(directory), record.model_dump(), expected, "dvc repro prepare")
    return record


def expected_features(
    params: Params, prepared: PreparedRecord | None = None, scan: Path = paths.SCAN
) -> dict:
    """The fingerprint entries the current params, inputs and code give features."""
    prepared = prepared or current_prepared(params, scan=scan)
    return {
        "backbone": params.backbone.model_dump(mode="json"),
        "weights": scanned_weights(params, scan).identity,
        "extract": params.extract.provenance(),
        "data": prepared.digest,
        "code": code_digest("extract"),
    }


def head_params(train: TrainConfig, head: str) -> dict:
    """The params one train cell depends on (as dvc.yaml lists them)."""
    return {
        "seed": train.seed,
        "max_memory_mb": train.max_memory_mb,
        "cv": train.cv.model_dump(mode="json"),
        head: getattr(train, head).model_dump(mode="json"),
    }
