"""Stage `train` (one head of the DVC matrix): `python -m pipeline.train --head H` fits the
head on every layer in train.layers (default: every extracted layer)."""

from pipeline.config import HEADS, load_params
from pipeline.provenance import expected_features
from pipeline.stage import run_stage
from pipeline.training import train_head


def arguments(parser) -> None:
    parser.add_argument("--head", required=True, choices=HEADS)


def main(args) -> None:
    params = load_params()
    train_head(args.head, params.train.layers, params.train, expected_features(params))


if __name__ == "__main__":
    run_stage("train", __doc__, main, arguments)
