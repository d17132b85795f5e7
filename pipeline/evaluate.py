"""Stage `evaluate`: test metrics of the best frozen head (and the fine-tuned model's), plots."""

import json

from pipeline.config import load_params
from pipeline.evaluation import evaluate
from pipeline.provenance import expected_features
from pipeline.stage import run_stage


def main(_) -> None:
    params = load_params()
    print(json.dumps(evaluate(params.train, expected_features(params)), indent=2))


if __name__ == "__main__":
    run_stage("evaluate", __doc__, main)
