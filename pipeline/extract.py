"""Stage `extract`: one pass of the frozen backbone, every requested layer into features/."""

from pathlib import Path

from pipeline.config import load_params
from pipeline.data import SPLITS, load_meta, load_split
from pipeline.extraction import extract_split, versions
from pipeline.forward import distribute_over_devices
from pipeline.layers import build_extractor
from pipeline.precision import use_precision

PREPARED, OUT, SCRATCH = Path("data/prepared"), Path("features"), Path(".cache/extract")


def main() -> None:
    params = load_params()
    bb, ex = params.backbone, params.extract
    meta = load_meta(PREPARED)
    precision = use_precision(ex.precision)
    devices = distribute_over_devices(ex.batch_size)
    model, weights_used = build_extractor(bb.name, bb.weights, meta["size"], ex.layers)
    print(
        f"backbone {bb.name}, weights: {weights_used}, layers: {ex.layers}, devices: {devices}, precision: {precision}"
    )
    fingerprint = {
        "backbone": bb.name,
        "weights": weights_used,
        "input_size": meta["size"],
        "preprocessing": f"keras.applications {bb.name} preprocess_input",
        "layers": ex.layers,
        "precision": precision,
        "storage_dtype": ex.storage_dtype,
        "data_sha256": meta["sha256"],
        "versions": versions(),
    }
    for split in SPLITS:
        images, labels = load_split(PREPARED, split)
        extract_split(
            model,
            images,
            labels,
            OUT / f"{split}.h5",
            fingerprint,
            {"split": split, "class_names": meta["class_names"]},
            ex.batch_size,
            ex.storage_dtype,
            SCRATCH,
            desc=split,
        )
    print(f"wrote {', '.join(str(OUT / f'{s}.h5') for s in SPLITS)}")


if __name__ == "__main__":
    main()
