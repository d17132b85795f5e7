"""`layerwise predict`: the exported classifier over image files, folders (recursively) and
globs; one row per file (path, predicted class, confidence, every class's probability), or its
reason when it cannot be read. Files are decoded and resized as prepare did (PIL) on threads,
a batch ahead of the forward pass."""

from __future__ import annotations

import csv
import glob
import json
import sys
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipeline.data.decoding import decode_bytes
from pipeline.project.errors import InputError
from pipeline.project.layout import Layout
from pipeline.project.records import ClassifierCard
from pipeline.winner.choice import import_needs


def image_suffixes() -> set[str]:
    from PIL import Image

    return {s.lower() for s in Image.registered_extensions()}


def expand(paths: list[str]) -> list[str]:
    """Files as given, folders' image files (recursively, sorted), globs' matches; a path that
    is none of these is kept, and its row says so."""
    suffixes, out = image_suffixes(), []
    for p in paths:
        if glob.has_magic(p):
            matches = [m for m in sorted(glob.glob(p, recursive=True)) if Path(m).is_file()]
            out.extend(matches or [p])
        elif Path(p).is_dir():
            out.extend(
                str(f)
                for f in sorted(Path(p).rglob("*"))
                if f.is_file() and f.suffix.lower() in suffixes
            )
        else:
            out.append(p)
    return out


def load_classifier(project: Path):
    """(the exported model, its card) of the project in `project`."""
    import keras

    layout = Layout(project)
    card = ClassifierCard.read(layout.card, f"dvc repro export (in {project})")
    import_needs(card.needs)
    return keras.saving.load_model(layout.classifier, compile=False), card


def _decode(path: str, side: int, interpolation: str):
    try:
        return decode_bytes(Path(path).read_bytes(), side, interpolation), None
    except FileNotFoundError:
        return None, "no such file"
    except IsADirectoryError:
        return None, "a folder with no image files"
    except (OSError, ValueError) as exc:
        return None, str(exc).splitlines()[0] if str(exc) else type(exc).__name__


class Rows:
    """CSV (default) or JSON lines (`.jsonl` / `.json` files) of predictions: every class's
    probability, or (`top_k`) the k most probable classes."""

    def __init__(self, stream, class_names: list[str], jsonl: bool, top_k: int | None = None):
        self.stream, self.names, self.jsonl, self.k = stream, class_names, jsonl, top_k
        self.csv = None if jsonl else csv.writer(stream)
        if self.csv:
            classes = [f"top{top_k}"] if top_k else self.names
            self.csv.writerow(["path", "predicted", "confidence", "error", *classes])

    def write(self, path: str, probs: np.ndarray | None, error: str | None) -> None:
        top = None if probs is None else int(probs.argmax())
        row = {
            "path": path,
            "predicted": None if top is None else self.names[top],
            "confidence": None if top is None else round(float(probs[top]), 6),
            "error": error,
        }
        ranked = [] if probs is None or not self.k else np.argsort(-probs)[: self.k]
        if self.jsonl:
            if self.k and probs is not None:
                row[f"top{self.k}"] = [[self.names[i], round(float(probs[i]), 6)] for i in ranked]
            elif probs is not None:
                row["probabilities"] = {n: round(float(p), 6) for n, p in zip(self.names, probs)}
            self.stream.write(json.dumps(row) + "\n")
            return
        if self.k:
            values = ["; ".join(f"{self.names[i]} {probs[i]:.4f}" for i in ranked)]
        else:
            values = [] if probs is None else [f"{p:.6f}" for p in probs]
        self.csv.writerow(
            [path, row["predicted"] or "", row["confidence"] or "", error or "", *values]
        )


@dataclass
class Classifier:
    """What `predict_files` runs: uint8 images at `side` -> class probabilities."""

    predict_batch: Callable[[np.ndarray], np.ndarray]
    class_names: list[str]
    side: int
    interpolation: str
    top_k: int | None = None  # rows list the k most probable classes, not all of them


def exported(project: Path) -> Classifier:
    """The project's exported classifier."""
    model, card = load_classifier(project)
    return Classifier(
        lambda x: np.asarray(model.predict_on_batch(x)),
        card.class_names,
        card.image_side,
        card.interpolation,
    )


def predict_files(
    paths: list[str],
    classifier: Classifier,
    out: Path | None,
    batch_size: int = 32,
    workers: int = 4,
) -> dict:
    """Predict every file of `paths`; rows to `out` (stdout without), progress on stderr.
    Returns counts and images/s."""
    from tqdm import tqdm

    files = expand(paths)
    if not files:
        raise InputError("layerwise predict: no files given (files, folders or globs)")
    jsonl = out is not None and out.suffix in (".jsonl", ".json")
    stream = out.open("w", newline="") if out else sys.stdout
    rows = Rows(stream, classifier.class_names, jsonl, classifier.top_k)
    batches = [files[i : i + batch_size] for i in range(0, len(files), batch_size)]
    done = failed = 0
    start = time.perf_counter()
    try:
        with (
            ThreadPoolExecutor(workers) as pool,
            tqdm(
                total=len(files), unit="image", desc="predict", file=sys.stderr, disable=None
            ) as bar,
        ):
            ahead = deque()

            def submit(batch):
                side, interpolation = classifier.side, classifier.interpolation
                ahead.append((batch, [pool.submit(_decode, f, side, interpolation) for f in batch]))

            for batch in batches[:2]:
                submit(batch)
            for k in range(len(batches)):
                batch, futures = ahead.popleft()
                if k + 2 < len(batches):
                    submit(batches[k + 2])
                decoded = [f.result() for f in futures]
                good = [i for i, (image, _) in enumerate(decoded) if image is not None]
                probs = {}
                if good:
                    x = np.stack([decoded[i][0] for i in good])
                    probs = dict(zip(good, classifier.predict_batch(x)))
                for i, path in enumerate(batch):
                    rows.write(path, probs.get(i), decoded[i][1])
                done += len(good)
                failed += len(batch) - len(good)
                bar.update(len(batch))
    finally:
        if out:
            stream.close()
    seconds = time.perf_counter() - start
    return {"images": done, "failed": failed, "seconds": seconds, "per_second": done / seconds}
