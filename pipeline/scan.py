"""Stage `scan` (runs first, every time): validate params.yaml and record the inputs DVC
cannot see, so that a change there re-runs what depends on it.

Writes data/scan/source.json (an image folder's files: path, length, mtime),
data/scan/backbone.json (the backbone resolved from its registry row: constructor, input
sides, the layers to extract, and what `backbone.weights` resolves to, a weights file by its
sha256) and data/scan/<library>.json (the installed Keras, Pillow and scikit-learn: a new
version re-runs the stages whose code imports it). It takes about a second and fails before
DVC removes any other stage's outputs.
"""

from pipeline.inputs.params import load
from pipeline.inputs.survey import survey
from pipeline.project.stage import run_stage


def main(_) -> None:
    params, backbone = load()
    source, libraries = survey(params, backbone)
    files = f" ({source.files} files)" if source.source == "folder" else ""
    print(
        f"scan: params valid; source {source.source}{files}; {backbone.name} layers "
        f"{', '.join(backbone.layers)}; weights {backbone.identity[:24]}; "
        + ", ".join(f"{r.library} {r.version}" for r in libraries)
    )


if __name__ == "__main__":
    run_stage("scan", __doc__, main)
