"""Stage `prepare`: decode and resize the source images once into data/prepared/."""

from pathlib import Path

from pipeline.config import load_params
from pipeline.data import prepare

OUT = Path("data/prepared")


def main() -> None:
    cfg = load_params().data
    meta, skipped = prepare(cfg, OUT)
    print(
        f"prepared {meta['counts']} images of {cfg.size}x{cfg.size} in {len(meta['class_names'])} classes"
    )
    if skipped:
        print(f"skipped {len(skipped)} unusable file(s); see {OUT / 'report.json'}")


if __name__ == "__main__":
    main()
