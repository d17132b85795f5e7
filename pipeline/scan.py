"""Stage `scan` (runs first, every time): validate params.yaml and record the inputs DVC
cannot see, so that a change there re-runs what depends on it.

Writes data/scan/source.json (an image folder's files: path, length, mtime) and
data/scan/weights.json (what `backbone.weights` resolves to, a weights file by its sha256).
It takes about a second and fails before DVC removes any other stage's outputs.
"""

from pipeline import paths
from pipeline.backbones import weights_identity
from pipeline.config import load_params
from pipeline.data import source_record
from pipeline.records import WeightsRecord
from pipeline.stage import run_stage


def main(_) -> None:
    params = load_params()
    source = source_record(params.data)
    bb = params.backbone
    weights = WeightsRecord(
        backbone=bb.name, weights=bb.weights, identity=weights_identity(bb.name, bb.weights)
    )
    source.write(paths.SOURCE_RECORD)
    weights.write(paths.WEIGHTS_RECORD)
    print(
        f"scan: params valid; source {source.source} ({source.files} files); weights {weights.identity[:24]}"
    )


if __name__ == "__main__":
    run_stage("scan", __doc__, main)
