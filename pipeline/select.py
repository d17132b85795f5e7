"""Stage `select`: leaderboard over train.layers x train.heads; the best head by the selection
estimate (cross-validation over train+val, or the val split)."""

from pipeline.features.store import open_features
from pipeline.project.layout import Layout
from pipeline.project.params import load_params
from pipeline.project.provenance import expected_features
from pipeline.project.stage import run_stage
from pipeline.selection.leaderboard import select
from pipeline.selection.params import TrainParams


def main(_) -> None:
    params, layout = load_params(TrainParams), Layout()
    features = open_features(layout.features_file("train"), expected_features(params))
    best = select(params.train, params.select, features.fingerprint, layout)
    print(f"selection: {best.selection_note}")
    print(
        f"best by the selection estimate: {best.cell} ({best.metric} {best.value:.4f}); "
        f"see {layout.leaderboard_md}"
    )
    if best.tie_break:
        print(f"tie: {best.tie_break}")


if __name__ == "__main__":
    run_stage("select", __doc__, main)
