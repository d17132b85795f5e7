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
