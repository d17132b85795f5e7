"""Stage `evaluate`: test metrics of the best frozen head (and the fine-tuned model's), plots."""

import json

from pipeline.evaluation import evaluate
from pipeline.store import FeatureStoreError


def main() -> None:
    try:
        result = evaluate()
    except (FeatureStoreError, FileNotFoundError) as exc:
        raise SystemExit(f"evaluate: {exc}") from None
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
