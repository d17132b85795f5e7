"""Stage `select`: leaderboard over train.layers x train.heads; the best head by the selection
estimate (cross-validation over train+val, or the val split)."""

from pipeline import paths
from pipeline.config import load_params
from pipeline.leaderboard import select
from pipeline.provenance import expected_features
from pipeline.stage import run_stage
from pipeline.store import open_features


def main(_) -> None:
    params = load_params()
    features = open_features(paths.FEATURES / "train.h5", expected_features(params))
    best = select(params.train, params.select, features.fingerprint)
    print(f"selection: {best.selection_note}")
    print(
        f"best by the selection estimate: {best.cell} ({best.metric} {best.value:.4f}); "
        "see reports/leaderboard.md"
    )
    if best.tie_break:
        print(f"tie: {best.tie_break}")


if __name__ == "__main__":
    run_stage("select", __doc__, main)
