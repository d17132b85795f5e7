"""Provenance: each stage's code digest and libraries, and the check that an artefact is
exactly what the current params and code would produce.

A stage's code is the closure of its module's imports within the `pipeline` package (lazy
imports inside functions too, and the `__init__.py` of every package on the way): the same list
dvc.yaml names as the stage's deps (`python -m pipeline.project.deps` writes them, a test
compares). Its libraries are those of LIBRARIES that this code imports; `scan` records their
versions (data/scan/<distribution>.json) and dvc.yaml names those records as deps too.
"""

from __future__ import annotations

import ast
import hashlib
import importlib.metadata
from functools import cache
from pathlib import Path

from pipeline.project.layout import Layout
from pipeline.project.params import Shared
from pipeline.project.records import BackboneRecord, PreparedRecord, RecordError, SourceRecord

PACKAGE = Path(__file__).resolve().parents[1]
ROOT = PACKAGE.parent
# import name -> distribution, for the libraries whose next version may change a stage's
# results beyond float rounding: Keras defines the backbones, their preprocessing and the dense
# head, Pillow decodes and resizes, scikit-learn splits the data and fits the heads. The
# backend (TensorFlow, JAX, PyTorch), numpy and h5py change float rounding at most, as another
# device or engine does: the features record them (Fingerprint.versions), nothing compares them.
LIBRARIES = {"keras": "keras", "PIL": "pillow", "sklearn": "scikit-learn"}


class StaleError(RecordError):
    """An artefact was made by other params, inputs or code than the current ones."""


def module_file(module: str) -> Path | None:
    """The file of dotted `module` inside this package (a module or a package), or None."""
    parts = module.split(".")
    if parts[0] != PACKAGE.name:
        return None
    base = PACKAGE.joinpath(*parts[1:])
    for path in (base.with_suffix(".py"), base / "__init__.py"):
        if path.is_file():
            return path
    return None


@cache
def _imported(path: Path) -> frozenset[str]:
    """Every dotted name the file at `path` imports, at any depth of its code."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return frozenset(names)


def _with_packages(module: str) -> set[str]:
    """`module` and every package above it (importing it runs their __init__.py)."""
    parts = module.split(".")
    return {".".join(parts[:i]) for i in range(1, len(parts) + 1)}


@cache
def stage_modules(stage: str) -> tuple[str, ...]:
    """The files of `pipeline.<stage>` and of everything it imports within the package, as
    paths relative to the repository root, sorted."""
    seen: set[Path] = set()
    todo = [f"{PACKAGE.name}.{stage}"]
    while todo:
        for module in _with_packages(todo.pop()):
            path = module_file(module)
            if path is not None and path not in seen:
                seen.add(path)
                todo.extend(_imported(path))
    return tuple(sorted(p.relative_to(ROOT).as_posix() for p in seen))


@cache
def stage_libraries(stage: str) -> tuple[str, ...]:
    """The distributions of LIBRARIES that the stage's code imports, sorted."""
    tops = {name.split(".")[0] for path in stage_modules(stage) for name in _imported(ROOT / path)}
    return tuple(sorted(LIBRARIES[top] for top in tops & set(LIBRARIES)))


def library_version(distribution: str) -> str:
    """The installed version, as pip reports it."""
    return importlib.metadata.version(distribution)


@cache
def code_digest(stage: str) -> str:
    h = hashlib.sha256()
    for path in stage_modules(stage):
        h.update(path.encode() + b"\0" + (ROOT / path).read_bytes() + b"\0")
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


def scanned_source(params: Shared, layout: Layout = Layout()) -> SourceRecord:
    expect = {"source": params.data.source, "path": params.data.path}
    return _scanned(SourceRecord, layout.source_record, expect)


def scanned_backbone(params: Shared, layout: Layout = Layout()) -> BackboneRecord:
    """The backbone scan resolved for the current params."""
    expect = {
        "name": params.backbone.name,
        "weights": params.backbone.weights,
        "image_size": params.data.image_size,
        "asked_layers": params.extract.layers,
    }
    return _scanned(BackboneRecord, layout.backbone_record, expect)


def expected_prepared(params: Shared, source: SourceRecord) -> dict:
    return {
        "data": params.data.provenance(),
        "source": source.digest,
        "code": code_digest("prepare"),
    }


def current_prepared(params: Shared, layout: Layout = Layout()) -> PreparedRecord:
    """data/prepared's record, refused unless the current params, source and code made it."""
    record = PreparedRecord.read(layout.prepared_files.record, "dvc repro prepare")
    expected = expected_prepared(params, scanned_source(params, layout))
    require(str(layout.prepared), record.model_dump(), expected, "dvc repro prepare")
    return record


def expected_features(
    params: Shared, prepared: PreparedRecord | None = None, layout: Layout = Layout()
) -> dict:
    """The fingerprint entries the current params, inputs and code give features."""
    prepared = prepared or current_prepared(params, layout)
    backbone = scanned_backbone(params, layout)
    return {
        "backbone": backbone.provenance(),
        "extract": {**params.extract.provenance(), "layers": backbone.layers},
        "data": prepared.digest,
        "code": code_digest("extract"),
    }
