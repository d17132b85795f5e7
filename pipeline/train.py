"""Stage `train` (one head of the DVC matrix): `python -m pipeline.train --head H` fits the
head on every layer in train.layers (default: every extracted layer), or, when train.heads
does not list it, writes only a note saying so. Under `dvc repro` the head comes from the
stage's name (DVC_STAGE, `train@H`), never through the shell."""

import os

from pipeline.heads.registry import HEAD_NAMES, HeadError, get_head
from pipeline.project.errors import InputError
from pipeline.project.params import load_params
from pipeline.project.provenance import expected_features
from pipeline.project.stage import run_stage
from pipeline.selection.cells import is_listed, skip_head, train_head
from pipeline.selection.params import TrainParams


def arguments(parser) -> None:
    parser.add_argument("--head", choices=HEAD_NAMES, help="default: the DVC stage's, train@H")


def head_of(args) -> str:
    """--head, else the head in the name of the DVC stage running this command."""
    if args.head:
        return args.head
    stage = os.environ.get("DVC_STAGE", "")
    _, at, head = stage.partition("train@")
    if not at:
        raise InputError(
            f"which head? give --head ({', '.join(HEAD_NAMES)}) or run `dvc repro train@<head>`"
        )
    try:
        return get_head(head).name
    except HeadError as exc:
        raise InputError(
            f"DVC stage {stage!r}: {exc}; list only these in train.heads and run `dvc repro`"
        ) from None


def main(args) -> None:
    head = head_of(args)
    params = load_params(TrainParams)
    if not is_listed(head, params.train):
        skip_head(head)
        print(f"train@{head}: not in train.heads; nothing trained")
        return
    train_head(head, params.train, expected_features(params))


if __name__ == "__main__":
    run_stage("train", __doc__, main, arguments)
