"""Where each stage reads and writes, relative to the project root (the DVC layout)."""

from pathlib import Path

SCAN = Path("data/scan")
SOURCE_RECORD = SCAN / "source.json"
WEIGHTS_RECORD = SCAN / "weights.json"
PREPARED = Path("data/prepared")
FEATURES = Path("features")
EXTRACT_SCRATCH = Path(".cache/extract")
HEADS = Path("models/heads")
TRAIN_METRICS = Path("metrics/train")
BEST = Path("models/best.json")


def library_record(distribution: str) -> Path:
    """Where scan records a library's version (provenance.LIBRARIES)."""
    return SCAN / f"{distribution}.json"


def cell(layer: str, head: str) -> str:
    return f"{layer}-{head}"


def cell_dir(models: Path, layer: str, head: str) -> Path:
    """A trained head's folder: one folder per head (its `train@<head>` stage's output)."""
    return Path(models) / head / cell(layer, head)


def cell_metrics(metrics: Path, layer: str, head: str) -> Path:
    return Path(metrics) / head / f"{cell(layer, head)}.json"
