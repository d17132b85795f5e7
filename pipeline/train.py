"""Stage `train` (one head of the DVC matrix): `python -m pipeline.train --head H` fits the
head on every layer in train.layers (default: every extracted layer)."""

from pipeline.heads.registry import HEAD_NAMES
from pipeline.project.params import load_params
from pipeline.project.provenance import expected_features
from pipeline.project.stage import run_stage
from pipeline.selection.cells import train_head
from pipeline.selection.params import TrainParams


def arguments(parser) -> None:
    parser.add_argument("--head", required=True, choices=HEAD_NAMES)


def main(args) -> None:
    params = load_params(TrainParams)
    train_head(args.head, params.train, expected_features(params))


if __name__ == "__main__":
    run_stage("train", __doc__, main, arguments)
