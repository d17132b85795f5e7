"""Stage `select`: leaderboard over train.layers x train.heads; the best head on validation."""

from pipeline.config import load_params
from pipeline.leaderboard import SelectError, select


def main() -> None:
    params = load_params()
    try:
        best = select(params.train, params.select)
    except SelectError as exc:
        raise SystemExit(f"select: {exc}") from None
    print(
        f"best on validation: {best['cell']} ({best['metric']} {best['value']:.4f}); "
        "see reports/leaderboard.md"
    )


if __name__ == "__main__":
    main()
