"""Stage `evaluate`: test metrics of the best frozen head (and the fine-tuned model's), plots."""

import json

from pipeline.project.params import load_params
from pipeline.project.provenance import expected_features
from pipeline.project.stage import run_stage
from pipeline.selection.params import TrainParams
from pipeline.selection.report import evaluate


def main(_) -> None:
    params = load_params(TrainParams)
    print(json.dumps(evaluate(params.train, expected_features(params)), indent=2))


if __name__ == "__main__":
    run_stage("evaluate", __doc__, main)
