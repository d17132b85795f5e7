"""Stage `train` (one cell of the DVC matrix): `python -m pipeline.train --layer L --head H`."""

import argparse

from pipeline.config import HEADS, load_params
from pipeline.provenance import expected_features
from pipeline.records import RecordError
from pipeline.training import train_cell


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument(
        "--layer", required=True, help="a layer cached in features/ (extract.layers)"
    )
    parser.add_argument("--head", required=True, choices=HEADS)
    args = parser.parse_args(argv)
    params = load_params()
    try:
        train_cell(args.layer, args.head, params.train, expected_features(params))
    except RecordError as exc:
        raise SystemExit(f"train: {exc}") from None


if __name__ == "__main__":
    main()
