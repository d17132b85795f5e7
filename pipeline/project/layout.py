"""Every artefact's path and file name, relative to the project root: the DVC layout that
dvc.yaml spells out (tests/test_provenance.py checks that the two agree).

Functions take a `Layout` (the current directory by default); a test points one at a
temporary folder.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

SPLITS = ("train", "val", "test")
# What a cell's model file is called, by the kind of head (heads.registry.Head.kind).
MODEL_FILES = {"sklearn": "model.joblib", "keras": "model.keras"}
HEAD_RECORD = "head.json"
NOT_LISTED = "not_listed.txt"


def cell(layer: str, head: str) -> str:
    """A cell's name: one layer and one head."""
    return f"{layer}-{head}"


@dataclass(frozen=True)
class PreparedFiles:
    """The files of a prepared data set in `directory` (data/prepared, or where prepare writes
    it before the rename)."""

    directory: Path

    @property
    def record(self) -> Path:
        return self.directory / "meta.json"

    @property
    def report(self) -> Path:
        return self.directory / "report.json"

    @property
    def manifest(self) -> Path:
        return self.directory / "manifest.csv"

    def images(self, split: str) -> Path:
        return self.directory / f"{split}_images.npy"

    def files(self, split: str) -> Path:
        """A manifest split: each file's sha256 and path under data.path (`sha256sum` format)."""
        return self.directory / f"{split}_files.txt"

    def labels(self, split: str) -> Path:
        return self.directory / f"{split}_labels.npy"


@dataclass(frozen=True)
class Layout:
    root: Path = Path(".")

    # ------------------------------------------------------------ scan: what DVC cannot see
    @property
    def scan(self) -> Path:
        return self.root / "data" / "scan"

    @property
    def source_record(self) -> Path:
        return self.scan / "source.json"

    @property
    def backbone_record(self) -> Path:
        return self.scan / "backbone.json"

    @property
    def head_listings(self) -> Path:
        return self.scan / "heads"

    def head_listing(self, head: str) -> Path:
        return self.head_listings / f"{head}.json"

    def library_record(self, distribution: str) -> Path:
        return self.scan / f"{distribution}.json"

    # ------------------------------------------------------------ prepare
    @property
    def prepared(self) -> Path:
        return self.root / "data" / "prepared"

    @property
    def prepared_files(self) -> PreparedFiles:
        return PreparedFiles(self.prepared)

    # ------------------------------------------------------------ extract
    @property
    def features(self) -> Path:
        return self.root / "features"

    def features_file(self, split: str) -> Path:
        return self.features / f"{split}.h5"

    @property
    def extract_scratch(self) -> Path:
        """Finished chunks of interrupted extractions, outside DVC's outputs."""
        return self.root / ".cache" / "extract"

    # ------------------------------------------------------------ train
    @property
    def heads(self) -> Path:
        return self.root / "models" / "heads"

    @property
    def train_metrics(self) -> Path:
        return self.root / "metrics" / "train"

    def cell_dir(self, layer: str, head: str) -> Path:
        """A trained head's folder, inside its `train@<head>` stage's output."""
        return self.heads / head / cell(layer, head)

    def cell_metrics(self, layer: str, head: str) -> Path:
        return self.train_metrics / head / f"{cell(layer, head)}.json"

    def not_listed(self, head: str) -> tuple[Path, Path]:
        """What the `train@<head>` stage of a head train.heads does not list writes: a note."""
        return tuple(root / head / NOT_LISTED for root in (self.heads, self.train_metrics))

    # ------------------------------------------------------------ select
    @property
    def best(self) -> Path:
        return self.root / "models" / "best.json"

    @property
    def leaderboard_csv(self) -> Path:
        return self.root / "reports" / "leaderboard.csv"

    @property
    def leaderboard_md(self) -> Path:
        return self.root / "reports" / "leaderboard.md"

    @property
    def select_metrics(self) -> Path:
        return self.root / "metrics" / "select.json"

    @property
    def layer_metrics(self) -> Path:
        """Each layer's best selection accuracy, keyed by the bare layer name: the columns of
        `dvc exp show --keep` (`layers_view`), narrow enough for 100 columns."""
        return self.root / "metrics" / "layers.json"

    # ------------------------------------------------------------ finetune
    @property
    def finetuned(self) -> Path:
        return self.root / "models" / "finetuned"

    @property
    def finetuned_model(self) -> Path:
        return self.finetuned / "model.keras"

    @property
    def finetune_status(self) -> Path:
        """The report and the resolved config, next to the model."""
        return self.finetuned / "status.json"

    @property
    def finetune_metrics(self) -> Path:
        return self.root / "metrics" / "finetune.json"

    @property
    def finetune_plots(self) -> Path:
        return self.root / "plots" / "finetune"

    @property
    def finetune_history(self) -> Path:
        return self.finetune_plots / "history.csv"

    @property
    def finetune_curves(self) -> Path:
        return self.finetune_plots / "curves.png"

    # ------------------------------------------------------------ evaluate
    @property
    def test_metrics(self) -> Path:
        return self.root / "metrics" / "test.json"

    @property
    def test_report(self) -> Path:
        """The frozen baseline's and the fine-tuned model's test reports, side by side."""
        return self.root / "reports" / "test.md"

    @property
    def plots(self) -> Path:
        return self.root / "plots"

    @property
    def confusion_csvs(self) -> tuple[Path, Path]:
        """The same rows twice: DVC's confusion and confusion_normalized templates."""
        return self.plots / "confusion.csv", self.plots / "confusion_normalized.csv"

    @property
    def confusion_png(self) -> Path:
        return self.plots / "confusion.png"

    @property
    def layers_png(self) -> Path:
        return self.plots / "layers.png"

    # ------------------------------------------------------------ export: the winner, usable
    @property
    def export(self) -> Path:
        return self.root / "models" / "export"

    @property
    def classifier(self) -> Path:
        """The winner as one Keras model: raw RGB images in, class probabilities out."""
        return self.export / "classifier.keras"

    @property
    def card(self) -> Path:
        return self.export / "card.json"

    @property
    def errors_csv(self) -> Path:
        """The winner's mistakes on the test split, most confident first."""
        return self.root / "reports" / "errors.csv"

    @property
    def mistakes_png(self) -> Path:
        return self.plots / "mistakes.png"
