"""Stage `scan` (runs first, every time): validate params.yaml and record the inputs DVC
cannot see, so that a change there re-runs what depends on it.

Writes data/scan/source.json (an image folder's files: path, length, mtime),
data/scan/weights.json (what `backbone.weights` resolves to, a weights file by its sha256)
and data/scan/<library>.json (the installed Keras, Pillow and scikit-learn: a new version
re-runs the stages whose code imports it). It takes about a second and fails before DVC
removes any other stage's outputs.
"""

from pipeline import paths
from pipeline.backbones import weights_identity
from pipeline.config import load_params
from pipeline.provenance import LIBRARIES, library_version
from pipeline.records import LibraryRecord, WeightsRecord
from pipeline.sources import source_record
from pipeline.stage import run_stage


def main(_) -> None:
    params = load_params()
    source = source_record(params.data)
    bb = params.backbone
    weights = WeightsRecord(
        backbone=bb.name, weights=bb.weights, identity=weights_identity(bb.name, bb.weights)
    )
    libraries = [LibraryRecord(library=d, version=library_version(d)) for d in LIBRARIES.values()]
    source.write(paths.SOURCE_RECORD)
    weights.write(paths.WEIGHTS_RECORD)
    for library in libraries:
        library.write(paths.library_record(library.library))
    files = f" ({source.files} files)" if source.source == "folder" else ""
    print(
        f"scan: params valid; source {source.source}{files}; weights {weights.identity[:24]}; "
        + ", ".join(f"{r.library} {r.version}" for r in libraries)
    )


if __name__ == "__main__":
    run_stage("scan", __doc__, main)
