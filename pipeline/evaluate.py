"""Stage `evaluate`: test metrics of the best frozen head (and the fine-tuned model's), plots."""

import json

from pipeline.config import load_params
from pipeline.evaluation import evaluate
from pipeline.provenance import expected_features
from pipeline.records import RecordError


def main() -> None:
    params = load_params()
    try:
        result = evaluate(params.train, expected_features(params))
    except (RecordError, FileNotFoundError) as exc:
        raise SystemExit(f"evaluate: {exc}") from None
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
