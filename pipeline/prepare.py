"""Stage `prepare`: decode and resize the source images once into data/prepared/."""

from pathlib import Path

from pipeline.config import load_params
from pipeline.data import prepare, save_prepared

OUT = Path("data/prepared")


def main() -> None:
    cfg = load_params().data
    prepared = prepare(cfg)
    meta = save_prepared(prepared, OUT)
    print(
        f"prepared {meta['counts']} images of {cfg.size}x{cfg.size} in {len(meta['class_names'])} classes"
    )
    if prepared.skipped:
        print(f"skipped {len(prepared.skipped)} unusable file(s); see {OUT / 'report.json'}")


if __name__ == "__main__":
    main()
